"""Reorder: choose the channel order of each pruned tensor so that consumers read contiguous runs.

Start with `Layout`. A *segment* is the list of slots one producer writes (producers tied by an addition share
one). Permuting a segment's channels is free at run time — the producer's weight rows, every per-channel parameter
and every consumer's weight columns are permuted alike — and it can turn a consumer's gather into a slice. A
segment is only permuted where that is provably safe: none of its slots is pinned (an op the planner cannot follow
might depend on channel order, and the model output must keep its order), and every traced tensor that holds its
slots holds all of them, as one block in the original order (a concatenation or a plain chain, not a flatten).

The order groups channels by which consumers read them, ranking the sets in reflected binary (Gray) code order so
that sets differing by one consumer sit side by side: with two consumers the order is *only A, both, only B*, and
each consumer's channels form one run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prunespec.planner.graph import ChannelGraph, roots_of
from prunespec.planner.resolve import Resolution


class Layout:
    """The pruned, possibly permuted, channel order of any traced tensor."""

    def __init__(self, graph: ChannelGraph, resolution: Resolution, reorder: bool) -> None:
        self.root = graph.slots.roots_table()
        self.dropped = resolution.dropped
        self.segments: dict[int, tuple[int, ...]] = {}  # first root of a free segment -> its roots
        self.order: dict[int, list[int]] = {}  # first root of a free segment -> permutation of its positions
        self._known: dict[int, tuple[list[int], list[int]]] = {}  # id(slots) -> (slots, positions)
        if not reorder or not resolution.gathers:  # with no gather to turn into a slice, no order is better
            return
        self._find_free_segments(graph, [c.slots for c in graph.consumers] + [b.slots for b in graph.bindings])
        self._choose_orders(graph, resolution)

    def positions(self, slots: list[int]) -> list[int]:
        """Kept positions of a tensor labelled `slots`, in the order they have after pruning.

        >>> import torch
        >>> from prunespec.planner.trace import trace
        >>> from prunespec.planner.resolve import resolve
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.Conv2d(4, 1, 1))
        >>> graph = trace(net, [torch.rand(1, 1, 2, 2)])
        >>> Layout(graph, resolve(graph, {"1.weight": {2}}, {}, False), True).positions(graph.consumers[1].slots)
        [0, 1, 3]

        Tensors often share one list of slots (a convolution's output and its batch norm's four tensors); it is
        laid out once, and the same list returned each time, so callers must not modify it.
        """
        known = self._known.get(id(slots))
        if known is not None and known[0] is slots:
            return known[1]
        roots = roots_of(slots, self.root)
        if self.segments and not self.segments.keys().isdisjoint(roots):
            out = self._positions(roots)
        elif self.dropped.isdisjoint(roots):
            out = list(range(len(roots)))  # nothing dropped here, nothing reordered: most tensors of an LLM
        else:
            dropped = self.dropped
            out = [i for i, r in enumerate(roots) if r not in dropped]
        self._known[id(slots)] = (slots, out)
        return out

    def _positions(self, roots: Sequence[int]) -> list[int]:
        """`positions` of a tensor whose roots hold the first root of a free segment."""
        out: list[int] = []
        i = 0
        while i < len(roots):
            segment = self.segments.get(roots[i])
            if segment is not None and tuple(roots[i : i + len(segment)]) == segment:
                out += [i + j for j in self.order[roots[i]] if segment[j] not in self.dropped]
                i += len(segment)
            else:
                if roots[i] not in self.dropped:
                    out.append(i)
                i += 1
        return out

    def _find_free_segments(self, graph: ChannelGraph, labelled: Iterable[list[int]]) -> None:
        root, pinned = self.root, graph.slots.reason.keys()
        # Segments are numbered, so that membership tests hash an int, not a tuple of thousands of roots.
        segments: list[tuple[int, ...]] = []
        number: dict[tuple[int, ...], int] = {}
        owner: dict[int, int] = {}  # root -> number of the segment that holds it
        frozen: set[int] = set()
        for producer in graph.producers:
            segment = tuple([root[s] for s in producer.slots])
            k = number.setdefault(segment, len(segments))
            if k < len(segments):
                continue  # producers tied by an addition write the same segment
            segments.append(segment)
            if not pinned.isdisjoint(segment) or len(set(segment)) != len(segment):
                frozen.add(k)
            for r in segment:
                other = owner.setdefault(r, k)
                if other != k:
                    frozen.update((other, k))
        seen: set[int] = set()
        for slots in labelled:
            if id(slots) in seen:  # a batch norm's four tensors share one list of slots
                continue
            seen.add(id(slots))
            roots = [root[s] for s in slots]
            i = 0
            while i < len(roots):
                k = owner.get(roots[i])
                if k is None or k in frozen:
                    i += 1
                elif tuple(roots[i : i + len(segments[k])]) == segments[k]:
                    i += len(segments[k])
                else:
                    frozen.add(k)
                    i += 1
        for k in set(owner.values()) - frozen:
            self.segments[segments[k][0]] = segments[k]

    def _choose_orders(self, graph: ChannelGraph, resolution: Resolution) -> None:
        readers: dict[int, int] = {}  # root -> the consumers that keep reading it, as a bit mask (bit ci)
        root = self.root
        for ci, consumer in enumerate(graph.consumers):
            bit = 1 << ci
            for col in resolution.columns[ci]:
                r = root[consumer.slots[col]]
                readers[r] = readers.get(r, 0) | bit
        for first, segment in self.segments.items():
            codes = [readers.get(r, 0) for r in segment]
            distinct = set(codes)
            # Renumber the consumers this segment involves as bits 0, 1, ...: few, so Gray ranks stay cheap.
            every = 0
            for c in distinct:
                every |= c
            involved = [ci for ci in range(every.bit_length()) if every >> ci & 1]
            rank = {c: _gray_rank(sum(1 << k for k, ci in enumerate(involved) if c >> ci & 1)) for c in distinct}
            ranks = [rank[c] for c in codes]
            self.order[first] = sorted(range(len(segment)), key=ranks.__getitem__)


def _gray_rank(code: int) -> int:
    """Position of `code` in the reflected binary Gray sequence 0, 1, 3, 2, 6, 7, 5, 4, ...

    >>> [_gray_rank(c) for c in (0, 1, 3, 2, 6, 7, 5, 4)]
    [0, 1, 2, 3, 4, 5, 6, 7]
    """
    rank = 0
    while code:
        rank ^= code
        code >>= 1
    return rank
