"""Resolve: decide which slots are removed and which weight columns each consumer keeps.

Start with `resolve`. The request names consumer input columns (`pruned_inputs`) and producer output channels
(`pruned_outputs`). A requested output removes its slot outright: the channel is gone from every tensor it lives in.
Requested inputs are decided per slot:

- **constrained**: a slot goes as soon as any consumer asks to drop it, so every consumer reads exactly the
  channels that remain and no activation is gathered at run time;
- **unconstrained**: a slot goes only when every consumer that reads it asks to drop it; a consumer that drops a
  channel others still need keeps reading around it through an activation subselection.

A pinned slot never goes. Every requested channel that stays in a weight is reported with the reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from prunespec.planner.graph import ChannelGraph


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
    columns: list[set[int]]  # per consumer (graph order): the weight input columns it keeps
    notes: list[Note] = field(default_factory=list)


def resolve(
    graph: ChannelGraph,
    pruned_inputs: dict[str, set[int]],
    pruned_outputs: dict[str, set[int]],
    constrained: bool,
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
    reads = [[root[s] for s in consumer.slots] for consumer in graph.consumers]
    asks = [set() if c.fixed else pruned_inputs.get(c.weight, set()) for c in graph.consumers]

    # A root goes when every (consumer, column) reading it asks (unconstrained), or any does (constrained).
    readers: Counter[int] = Counter()
    askers: Counter[int] = Counter()
    for roots, asked in zip(reads, asks):
        readers.update(roots)
        askers.update(roots[col] for col in asked)
    forced = {root[p.slots[ch]] for p in graph.producers for ch in pruned_outputs.get(p.weight, ())}
    dropped = {
        r
        for r in askers.keys() | forced
        if r not in slots.reason and (r in forced or constrained or askers[r] == readers[r])
    }

    for producer in graph.producers:  # a layer with no channels left would not run
        roots = [root[s] for s in producer.slots]
        if roots and all(r in dropped for r in roots):
            dropped.discard(roots[0])
            slots.pin([roots[0]], f"is the last channel {producer.weight} would keep")

    columns, last = [], {}
    for consumer, roots, asked in zip(graph.consumers, reads, asks):
        present = [col for col, r in enumerate(roots) if r not in dropped]
        gather = not (constrained or consumer.no_gather)
        keep = {col for col in present if col not in asked} if gather else set(present)
        if present and not keep:
            keep = {present[0]}
            last[len(columns)] = present[0]
        columns.append(keep)

    return Resolution(dropped, columns, _notes(graph, pruned_inputs, pruned_outputs, dropped, columns, last))


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
    for producer in graph.producers:
        for ch in sorted(pruned_outputs.get(producer.weight, ())):
            if graph.slots.find(producer.slots[ch]) not in dropped:
                reason = graph.slots.pinned(producer.slots[ch]) or "kept"
                kept.setdefault((producer.weight, "output", reason), set()).add(ch)
    return [Note(tensor, side, sorted(chs), reason) for (tensor, side, reason), chs in kept.items()]
