"""The channel graph: the small data model that tracing produces and resolve / reorder read.

Start with `Slots`. Every channel of every traced tensor is labelled with a *slot*; ops that tie channels together
(an addition, a batch norm, a depthwise convolution) merge slots, so in the end each slot is one channel that is
kept or removed as a whole, in every tensor it appears in. A slot can be *pinned*: kept whatever the request,
because something reads it that the planner cannot follow (an unknown op, the model output, a grouped convolution).

The rest are plain records: a `Producer` creates new slots (its output channels), a `Consumer` reads slots through
its weight's input axis, a `Binding` says that one axis of a parameter or buffer runs along a list of slots (a bias,
a batch-norm statistic, a layer scale), `Macs` counts work for the summary, and a `Fold` records a batch norm
that could be folded into the layer before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter


class Slots:
    """Union-find over channel slots, with a reason for each pinned slot.

    >>> slots = Slots()
    >>> a, b = slots.new(2), slots.new(2)
    >>> slots.union_all(a, b)
    >>> slots.find(a[1]) == slots.find(b[1]), slots.find(a[0]) == slots.find(b[1])
    (True, False)
    >>> slots.pin([b[0]], "reaches the model output")
    >>> slots.pinned(a[0]), slots.pinned(a[1])
    ('reaches the model output', None)
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.reason: dict[int, str] = {}  # root -> why the slot is pinned
        self._roots: list[int] | None = None  # `roots_table`, until the next union or new slot


    def new(self, n: int, pin: str | None = None) -> list[int]:
        self._roots = None
        start = len(self.parent)
        ids = list(range(start, start + n))
        self.parent.extend(ids)
        if pin is not None:
            self.reason.update(dict.fromkeys(ids, pin))
        return ids

    def find(self, s: int) -> int:
        parent = self.parent
        root = s
        while parent[root] != root:
            root = parent[root]
        while parent[s] != root:  # path compression keeps later look-ups flat
            parent[s], s = root, parent[s]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb < ra:  # the older slot stays the root, so roots follow model order
            ra, rb = rb, ra
        self.parent[rb] = ra
        self._roots = None
        if rb in self.reason:
            self.reason.setdefault(ra, self.reason.pop(rb))
        return ra

    def union_all(self, a: list[int], b: list[int]) -> None:
        """`union` of ``a[i]`` and ``b[i]`` for every i.

        This is the planner's innermost loop (a squeeze-and-excitation product ties hundreds of channels at a
        time), so it resolves the roots with `find` and links them itself rather than calling `union` per pair.
        """
        if a is b:
            return
        parent, reason, find = self.parent, self.reason, self.find
        for x, y in zip(a, b):
            # Most slots are a root or one step below one: look those up here, and call `find` for the rest.
            ra, rb = parent[x], parent[y]
            if parent[ra] != ra:
                ra = find(x)
            if parent[rb] != rb:
                rb = find(y)
            if ra == rb:
                continue
            if rb < ra:
                ra, rb = rb, ra
            parent[rb] = ra
            if rb in reason:
                reason.setdefault(ra, reason.pop(rb))
        self._roots = None

    def pin(self, slots, reason: str) -> None:
        parent, pinned, find = self.parent, self.reason, self.find
        for s in slots:
            root = parent[s]  # as in `union_all`: one step up finds most roots
            if parent[root] != root:
                root = find(s)
            pinned.setdefault(root, reason)

    def pinned(self, s: int) -> str | None:
        return self.reason.get(self.find(s))

    def roots(self, slots: list[int]) -> list[int]:
        """The root of each slot, through `roots_table`.

        >>> slots = Slots()
        >>> a, b = slots.new(3), slots.new(3)
        >>> slots.union(a[2], b[0])
        2
        >>> slots.roots(b)
        [2, 4, 5]
        """
        return list(roots_of(slots, self.roots_table()))

    def roots_table(self) -> list[int]:
        """``table[s] == find(s)`` for every slot: one pass, then a list look-up per slot instead of a call.

        Tracing is the only stage that merges slots; resolve, reorder and compile read this table.
        """
        if self._roots is None:
            table = self.parent[:]
            # A parent is older than its child (`union` keeps the older root), so its root is already in the table
            # when the child comes (and a root is its own parent).
            for s, p in enumerate(table):
                table[s] = table[p]
            self._roots = table
        return self._roots


def roots_of(slots: Sequence[int], table: list[int]) -> Sequence[int]:
    """``[table[s] for s in slots]`` as a sequence, looked up in one C call (lists of 28,672 slots are common).

    >>> roots_of([2, 0], [5, 6, 7]), roots_of([1], [5, 6, 7])
    ((7, 5), [6])
    """
    return itemgetter(*slots)(table) if len(slots) > 1 else [table[s] for s in slots]


@dataclass(frozen=True)
class ChannelMap:
    """Which slot each channel of a tensor carries, along one axis."""

    axis: int
    slots: list[int]


@dataclass(frozen=True)
class SplitOrigin:
    """The view that split a tensor's channels over several axes, for the suspect its sizes may make.

    `positions[i]` is where split dimension i sits in the view's shape arguments, `written[i]` whether its size was
    written as a number there (rather than -1), `axis` the channel axis of the tensor that was viewed, and `module`
    the module whose forward made the view.
    """

    op: str
    ordinal: int
    positions: tuple[int, ...]
    written: tuple[bool, ...]
    axis: int
    module: str | None


@dataclass(frozen=True)
class SplitMap:
    """Channels split over several axes by a view, as attention splits them into ``(heads, head_dim)``.

    Dimension ``i`` of the split (most significant first) has `sizes[i]` entries and lies on tensor axis
    ``axes[i]``; channel ``c`` of the unsplit axis, with digits ``(i0, i1, ...)`` in these sizes, carries
    ``slots[c]``. Which dimension may shrink is decided by the first op that treats the others as fixed (a matrix
    product over ``head_dim``, a mean over a group); until then the map travels undecided through transposes and
    copies. See `ops.splits`.
    """

    axes: tuple[int, ...]
    sizes: tuple[int, ...]
    slots: list[int]
    origin: SplitOrigin


@dataclass
class Repeat:
    """Each source slot is repeated: ``copies[i]`` are the slots of the copies of ``sources[i]``.

    Grouped-query attention repeats every key/value head for its group of query heads. The pruned model still
    repeats every remaining source the same number of times, so every group keeps the same number of copies; a
    source that loses all its copies is read by nothing and goes too (see `resolve`).
    """

    sources: list[int]
    copies: list[list[int]]


@dataclass
class Heads:
    """Attention heads traced in the forward of `module`: one slot per query head and per key/value head.

    Each slot stands for a whole head: `head_dim` channels of the query, key and value projections and of the
    output projection's input, kept or removed together.
    """

    module: str
    query: list[int]
    key_value: list[int]
    head_dim: int


@dataclass
class Renorm:
    """A norm module (`module`) whose statistics are taken over the channels `slots`, which it reads on
    `input_axis` and writes on `output_axis` (negative: counted from the last axis). Pruned through, it
    normalises over the channels it keeps (planned only with ``through_norms``)."""

    module: str
    input_axis: int
    output_axis: int
    slots: list[int]


@dataclass
class Producer:
    """An op that creates channels: its weight's output axis runs along new slots."""

    weight: str  # parameter name, e.g. "layer1.0.conv1.weight"
    axis: int  # the weight's output-channel axis
    slots: list[int]


@dataclass
class Consumer:
    """An op that reads channels through its weight's input axis; column i of the weight reads `slots[i]`."""

    weight: str
    axis: int  # the weight's input-channel axis
    slots: list[int]
    fixed: str | None = None  # why this consumer cannot drop inputs, if it cannot
    no_gather: str | None = None  # why it cannot read a subset of its input (it drops only what goes everywhere)
    per_group: int | None = None  # a grouped weight's input axis holds one group: this many columns


@dataclass
class Binding:
    """Axis `axis` of tensor `tensor` (a parameter or buffer name) runs along `slots`."""

    tensor: str
    axis: int
    slots: list[int]


@dataclass
class Macs:
    """Multiply-accumulates of one call: `unit` times the product of the weight's first two dimensions."""

    weight: str
    unit: int


@dataclass(frozen=True)
class Fold:
    """Batch norm `norm` reads only the output of layer `into`, and nothing else does: for inference, the norm's
    per-channel scale and shift can be folded into that layer's weight and bias (module names)."""

    norm: str
    into: str


@dataclass
class ChannelGraph:
    """Everything tracing learned about a model, in trace order."""

    slots: Slots = field(default_factory=Slots)
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    bindings: list[Binding] = field(default_factory=list)
    macs: list[Macs] = field(default_factory=list)
    # Ops followed on trust (a size written as a number might be a constant): `verify.Suspect` records.
    suspects: list = field(default_factory=list)
    folds: list[Fold] = field(default_factory=list)
    repeats: list[Repeat] = field(default_factory=list)
    heads: list[Heads] = field(default_factory=list)
    renorms: list[Renorm] = field(default_factory=list)
    # Module name -> None when its output is its input plus a branch (dropping it leaves the input), else why not.
    blocks: dict[str, str | None] = field(default_factory=dict)
    # Names of tensors that several modules share -> the first name (`model.named_parameters()` order).
    aliases: dict[str, str] = field(default_factory=dict)

    def aliases_of(self, model) -> list[tuple[str, str]]:
        """The further names of shared tensors, each with its first name, in `state_dict` order."""
        return [(name, first) for name, first in self.aliases.items() if name != first]
