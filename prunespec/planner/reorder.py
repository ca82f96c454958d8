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

from collections import defaultdict
from collections.abc import Iterable

from prunespec.planner.graph import ChannelGraph
from prunespec.planner.resolve import Resolution


class Layout:
    """The pruned, possibly permuted, channel order of any traced tensor."""

    def __init__(self, graph: ChannelGraph, resolution: Resolution, reorder: bool) -> None:
        self.find = graph.slots.find
        self.dropped = resolution.dropped
        self.segments: dict[int, tuple[int, ...]] = {}  # first root of a free segment -> its roots
        self.order: dict[int, list[int]] = {}  # first root of a free segment -> permutation of its positions
        if not reorder:
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
        """
        roots = [self.find(s) for s in slots]
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
        pinned = graph.slots.pinned
        owner: dict[int, tuple[int, ...]] = {}
        frozen: set[tuple[int, ...]] = set()
        for producer in graph.producers:
            segment = tuple(self.find(s) for s in producer.slots)
            if any(pinned(r) for r in segment) or len(set(segment)) != len(segment):
                frozen.add(segment)
            for r in segment:
                if owner.setdefault(r, segment) != segment:
                    frozen.update((owner[r], segment))
        for slots in labelled:
            roots = [self.find(s) for s in slots]
            i = 0
            while i < len(roots):
                segment = owner.get(roots[i])
                if segment is None or segment in frozen:
                    i += 1
                elif tuple(roots[i : i + len(segment)]) == segment:
                    i += len(segment)
                else:
                    frozen.add(segment)
                    i += 1
        for segment in set(owner.values()) - frozen:
            self.segments[segment[0]] = segment

    def _choose_orders(self, graph: ChannelGraph, resolution: Resolution) -> None:
        readers: dict[int, set[int]] = defaultdict(set)  # root -> consumers that keep reading it
        for ci, consumer in enumerate(graph.consumers):
            for col in resolution.columns[ci]:
                readers[self.find(consumer.slots[col])].add(ci)
        for first, segment in self.segments.items():
            involved = sorted(set().union(*(readers[r] for r in segment)))
            bit = {ci: 1 << k for k, ci in enumerate(involved)}
            rank = [_gray_rank(sum(bit[ci] for ci in readers[r])) for r in segment]
            self.order[first] = sorted(range(len(segment)), key=lambda j: rank[j])


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
