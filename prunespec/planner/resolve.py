"""Resolve: decide which slots are removed and which weight columns each consumer keeps.

Start with `resolve`. The request names consumer input columns (`pruned_inputs`) and producer output channels
(`pruned_outputs`). A requested output removes its slot outright: the channel is gone from every tensor it lives in.
Requested inputs are decided per slot:

- **constrained**: a slot goes as soon as any consumer asks to drop it, so every consumer reads exactly the
  channels that remain and no activation is gathered at run time;
- **unconstrained**: a slot goes only when every consumer that reads it asks to drop it; a consumer that drops a
  channel others still need keeps reading around it through an activation subselection.

A pinned slot never goes. Every requested channel that stays in a weight is reported with the reason.

Heads are requested as slots (`units`): a head is one slot standing for all its channels. Repeated slots (key/value
heads copied for a group of query heads, `graph.Repeat`) add one rule of their own, `_balance`: every source keeps
the same number of copies, because the pruned model still repeats each remaining source equally often.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from prunespec.planner.graph import ChannelGraph, roots_of


@dataclass
class Note:
    """Requested channels of one tensor that were kept, and why."""

    tensor: str
    side: str  # "input" or "output"
    channels: list[int]
    reason: str


@dataclass
class Resolution:
    dropped: set[int]  # slot roots that are removed
    columns: list[Collection[int]]  # per consumer (graph order): the weight input columns it keeps (a set or range)
    notes: list[Note] = field(default_factory=list)
    gathers: bool = True  # whether any consumer reads fewer channels than its input holds


# Requested units that are not channels of a weight: (module, kind) -> {index: slot}, kind "heads" or
# "key_value_heads" (see `plan`).
Units = dict[tuple[str, str], dict[int, int]]
UNEQUAL_GROUPS = "would leave key/value groups of unequal sizes (every group keeps as many query heads)"


def resolve(
    graph: ChannelGraph,
    pruned_inputs: dict[str, set[int]],
    pruned_outputs: dict[str, set[int]],
    constrained: bool,
    units: Units | None = None,
) -> Resolution:
    """Turn requested channels into removed slots and kept consumer columns.

    Two consumers read one producer; the first asks to drop channel 0, the second channel 1:

    >>> import torch
    >>> from prunespec.planner.trace import trace
    >>> class Fork(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.p, self.a, self.b = torch.nn.Conv2d(1, 3, 1), torch.nn.Conv2d(3, 1, 1), torch.nn.Conv2d(3, 1, 1)
    ...     def forward(self, x):
    ...         y = self.p(x)
    ...         return self.a(y) + self.b(y)
    >>> graph = trace(Fork(), [torch.rand(1, 1, 2, 2)])
    >>> request = {"a.weight": {0}, "b.weight": {0, 1}}
    >>> free = resolve(graph, request, {}, constrained=False)
    >>> len(free.dropped), [sorted(c) for c in free.columns[1:]]
    (1, [[1, 2], [2]])
    >>> tight = resolve(graph, request, {}, constrained=True)
    >>> len(tight.dropped), [sorted(c) for c in tight.columns[1:]]
    (2, [[2], [2]])
    """
    slots = graph.slots
    root = slots.roots_table()
    # Per consumer: the root each weight column reads, and the columns it asks to drop.
    reads = [roots_of(consumer.slots, root) for consumer in graph.consumers]
    asks = [set() if c.fixed else pruned_inputs.get(c.weight, set()) for c in graph.consumers]

    # A root goes when every (consumer, column) reading it asks (unconstrained), or any does (constrained).
    askers: Counter[int] = Counter()
    for roots, asked in zip(reads, asks):
        askers.update(roots[col] for col in asked)
    readers: Counter[int] = Counter()
    if askers and not constrained:  # counting every column read is costly at scale: only when it decides
        for roots in reads:
            readers.update(roots)
    forced = {root[p.slots[ch]] for p in graph.producers for ch in pruned_outputs.get(p.weight, ())}
    forced |= {root[s] for chosen in (units or {}).values() for s in chosen.values()}
    dropped = forced.difference(slots.reason)
    dropped |= {r for r in askers if r not in slots.reason and (constrained or askers[r] == readers[r])}

    for _ in range(len(graph.producers) + len(graph.repeats) + 1):  # each round pins a slot or changes nothing
        if not (_balance(graph, root, dropped, constrained) | _keep_one_channel(graph, root, dropped)):
            break

    columns, last = [], {}
    gathers = False
    for consumer, roots, asked in zip(graph.consumers, reads, asks):
        # A range stands for a whole input: an LLM's hundreds of layers would otherwise hold a set of every column.
        if dropped.isdisjoint(roots):
            present: Sequence[int] = range(len(roots))
        else:
            present = [col for col, r in enumerate(roots) if r not in dropped]
        gather = not (constrained or consumer.no_gather)
        if gather and asked:
            keep: Collection[int] = {col for col in present if col not in asked}
        else:
            keep = present if isinstance(present, range) else set(present)
        if present and not keep:
            keep = {present[0]}
            last[len(columns)] = present[0]
        columns.append(keep)
        gathers = gathers or len(keep) < len(present)

    notes = _notes(graph, pruned_inputs, pruned_outputs, dropped, columns, last)
    for (module, kind), chosen in (units or {}).items():
        kept: dict[str, list[int]] = {}
        for index, s in sorted(chosen.items()):
            if root[s] not in dropped:
                kept.setdefault(slots.pinned(s) or "kept", []).append(index)
        notes += [Note(module, kind, indices, reason) for reason, indices in kept.items()]
    return Resolution(dropped, columns, notes, gathers)


def _keep_one_channel(graph: ChannelGraph, root: list[int], dropped: set[int]) -> bool:
    """A layer with no channels left would not run: keep its first one. True when anything changed."""
    changed = False
    for producer in graph.producers:
        roots = roots_of(producer.slots, root)
        if roots and dropped.issuperset(roots):
            dropped.discard(roots[0])
            graph.slots.pin([roots[0]], f"is the last channel {producer.weight} would keep")
            changed = True
    return changed


def _balance(graph: ChannelGraph, root: list[int], dropped: set[int], constrained: bool) -> bool:
    """Make every repeat keep the same number of copies of each remaining source. True when anything changed.

    A removed source takes its copies with it, and a source with no copies left is read by nothing and goes. Then
    the remaining sources must keep equally many copies: unconstrained, the groups that would lose more keep the
    extra copies (pinned, so that the spec reports them); constrained, the others lose more, first copies first,
    as far as pinned copies allow.
    """
    pinned = graph.slots.reason
    changed = False
    for repeat in graph.repeats:
        sources = [root[s] for s in repeat.sources]
        copies = [[root[c] for c in group] for group in repeat.copies]
        for source, group in zip(sources, copies):
            if source in dropped and any(c not in dropped for c in group):
                if any(c in pinned for c in group):
                    dropped.discard(source)
                    graph.slots.pin([source], next(pinned[c] for c in group if c in pinned))
                else:
                    dropped.update(group)
                changed = True
            elif source not in dropped and source not in pinned and all(c in dropped for c in group):
                dropped.add(source)
                changed = True
        live = [group for source, group in zip(sources, copies) if source not in dropped]
        counts = [sum(c in dropped for c in group) for group in live]
        if len(set(counts)) <= 1:
            continue
        target = min(counts)
        if constrained:
            target = min(min(n + sum(c not in dropped and c not in pinned for c in g) for n, g in zip(counts, live)),
                         max(counts))  # fmt: skip
        for n, group in zip(counts, live):
            if n < target:
                dropped.update([c for c in group if c not in dropped and c not in pinned][: target - n])
            elif n > target:
                extra = [c for c in group if c in dropped][target - n :]
                dropped.difference_update(extra)
                graph.slots.pin(extra, UNEQUAL_GROUPS)
        changed = True
    return changed


def _notes(graph, pruned_inputs, pruned_outputs, dropped, columns, last) -> list[Note]:
    """Group the requested channels that stayed by tensor and reason, in trace order."""
    kept: dict[tuple[str, str, str], set[int]] = {}
    for ci, consumer in enumerate(graph.consumers):
        for col in sorted(pruned_inputs.get(consumer.weight, ())):
            if col in columns[ci]:
                reason = consumer.fixed or graph.slots.pinned(consumer.slots[col]) or consumer.no_gather
                if last.get(ci) == col:
                    reason = f"is the last input channel {consumer.weight} would keep"
                reason = reason or "still read by other layers"
                kept.setdefault((consumer.weight, "input", reason), set()).add(col)
    root = graph.slots.roots_table()
    for producer in graph.producers:
        for ch in sorted(pruned_outputs.get(producer.weight, ())):
            if root[producer.slots[ch]] not in dropped:
                reason = graph.slots.pinned(producer.slots[ch]) or "kept"
                kept.setdefault((producer.weight, "output", reason), set()).add(ch)
    return [Note(tensor, side, sorted(chs), reason) for (tensor, side, reason), chs in kept.items()]
