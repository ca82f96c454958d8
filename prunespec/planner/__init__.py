"""The planner: trace a model once and compile a pruning request into a `PruningSpec`.

The pipeline is one file per stage, read in this order: `trace` (with the per-op rules in `ops`, and in `meta`
the outputs it makes without running an op) builds a `graph.ChannelGraph`; `resolve` decides which channels go;
`reorder` chooses their order; `compile` writes the spec; `verify` checks plans that rely on ops followed on trust.
`plan` below runs them all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from prunespec.errors import PlanError, nearest
from prunespec.planner.compile import channel_requests, compile_spec
from prunespec.planner.config import described
from prunespec.planner.graph import ChannelGraph, Heads, Renorm
from prunespec.planner.reorder import Layout
from prunespec.planner.resolve import Units, resolve
from prunespec.planner.trace import trace
from prunespec.planner.verify import Suspect, suspects_to_pin
from prunespec.schemas import PruningSpec, Request, UnitRequest, encode_runs

Channels = Iterable[tuple[str, int]]


def plan(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    pruned_inputs: Channels | None = None,
    pruned_outputs: Channels | None = None,
    constrained: bool = False,
    reorder: bool = True,
    strict: bool = False,
    pruned_heads: Channels | None = None,
    pruned_kv_heads: Channels | None = None,
    through_norms: bool = False,
    pruned_blocks: Iterable[str] | None = None,
    uniform: bool = False,
) -> PruningSpec:
    """Compile "remove these channels" into a spec for `model`.

    Args:
        model: the model; it is run once on `example_inputs` and left as it was.
        example_inputs: tensors passed as ``model(*example_inputs)``.
        pruned_inputs: ``(weight name, input channel)`` pairs of consumers (convolutions, linear layers).
        pruned_outputs: ``(weight name, output channel)`` pairs of producers; the channel goes everywhere.
        constrained: grow the removed set until no activation has to be gathered at run time.
        reorder: permute channels so that gathers become slices where possible.
        strict: raise `PlanError` instead of keeping requested channels the planner cannot remove.
        pruned_heads: ``(attention module name, query head)`` pairs; the head goes from the query, key and value
            projections and the output projection's input. Under grouped-query attention every group must keep
            as many query heads: a request that would leave unequal groups keeps the extra heads (unconstrained)
            or removes more (constrained), and says so in `spec.kept`.
        pruned_kv_heads: ``(attention module name, key/value head)`` pairs; the key/value head goes with its
            whole group of query heads.
        through_norms: let channels that a norm normalises together go (the hidden width of a transformer, the
            residual stream of a ConvNeXt): the pruned norm then takes its statistics over the channels it keeps,
            which changes what it computes, so it is asked for explicitly. The mock emulates it, so the pruned
            model still equals the mock exactly. Norms are recognised from the data flow: a module without layers
            that takes a statistic over its channels (`layer_norm`, `rms_norm`, or a mean of squares written out).
        pruned_blocks: module names of residual blocks to drop: modules whose output the trace shows is their
            input plus a branch (``x + f(x)``), which the pruned model no longer runs. The other requests are
            planned on the model without them.
        uniform: require that the model's config (a Hugging Face config) can describe the pruned model, every
            layer of a stack keeping the same sizes, so that `from_pretrained` loads it; raise `PlanError` saying
            what differs otherwise. Whenever a plan happens to be so, the spec records the config values anyway
            (`spec.config`, see `config.described`).

    With no channels and no heads named, the channels whose weights are all zero are pruned.

    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> spec = plan(net, [torch.rand(1, 3, 8, 8)], pruned_inputs=[("2.weight", 5)])
    >>> spec.layers["0"].tensors, spec.layers["2"].tensors
    ({'weight': ['0-4,6-7'], 'bias': ['0-4,6-7']}, {'weight': [None, '0-4,6-7']})
    """
    inputs = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
    graph = trace(model, inputs, through_norms=through_norms)
    named = (pruned_inputs, pruned_outputs, pruned_heads, pruned_kv_heads, pruned_blocks)
    zeroed = all(n is None for n in named)
    blocks = block_requests(graph, list(pruned_blocks or []))
    full = graph
    if blocks:  # plan the rest on the model without the blocks; what was asked inside them goes with them
        graph = trace(model, inputs, through_norms=through_norms, bypass=blocks)
        inside = tuple(f"{b}." for b in blocks)
        pruned_inputs, pruned_outputs, pruned_heads, pruned_kv_heads = (
            [(name, i) for name, i in pairs or [] if not f"{name}.".startswith(inside)]
            for pairs in (pruned_inputs, pruned_outputs, pruned_heads, pruned_kv_heads)
        )
    units = head_requests(graph, pruned_heads or [], pruned_kv_heads or [])
    if zeroed:
        pruned_inputs, pruned_outputs = zeroed_channels(model, graph)
    requested_inputs = _requests(pruned_inputs or [], {c.weight: len(c.slots) for c in graph.consumers}, "input")
    requested_outputs = _requests(pruned_outputs or [], {p.weight: len(p.slots) for p in graph.producers}, "output")
    order = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    request = Request(
        pruned_inputs=channel_requests(requested_inputs, order),
        pruned_outputs=channel_requests(requested_outputs, order),
        constrained=constrained,
        reorder=reorder,
        zeroed=zeroed,
        pruned_heads=unit_requests(units, "heads"),
        pruned_kv_heads=unit_requests(units, "key_value_heads"),
        through_norms=through_norms,
        pruned_blocks=blocks,
        uniform=uniform,
    )

    def compiled() -> tuple[PruningSpec, set[int]]:
        resolution = resolve(graph, requested_inputs, requested_outputs, constrained, units)
        layout = Layout(graph, resolution, reorder)
        spec = compile_spec(model, inputs, graph, resolution, layout, request, blocks, full if blocks else None)
        # The config values go with the spec the checks below apply: a forward may read its sizes from the config.
        spec.config, described_not[0] = described(model, spec, inputs, {h.head_dim for h in graph.heads})
        return spec, resolution.dropped

    described_not: list[str | None] = [None]  # why no config describes the last compiled spec

    spec, dropped = compiled()
    # Heads are followed on trust too: the applier sets the head counts the planner found in attributes, and the
    # pruned model is compared with the mock; if they differ the heads stay.
    checks = graph.suspects + [heads_check(h) for h in graph.heads] + [norm_check(n) for n in graph.renorms]
    for _ in checks:  # each round keeps the channels of at least one suspect, so this ends
        at_stake = [s for s in checks if any(graph.slots.find(slot) in dropped for slot in s.slots)]
        kept = lambda slot: graph.slots.find(slot) not in dropped  # noqa: E731
        culprits, failure = suspects_to_pin(model, inputs, spec, at_stake, kept) if at_stake else ([], None)
        if not culprits:
            break
        for suspect in culprits:
            graph.slots.pin(suspect.slots, failure or suspect.reason)
        spec, dropped = compiled()
    if blocks:
        _check_dropped_blocks(model, inputs, spec)
    if uniform and described_not[0] is not None:
        raise PlanError(f"uniform: no config describes the pruned model: {described_not[0]}")
    if strict and spec.kept:
        first = spec.kept[0]
        more = f" (and {len(spec.kept) - 1} more groups)" if len(spec.kept) > 1 else ""
        raise PlanError(
            f"strict: {first.tensor} {first.side} channels {first.channels} would be kept ({first.reason}){more}; "
            "drop --strict to keep them, or ask for other channels"
        )
    return spec


def block_requests(graph: ChannelGraph, blocks: list[str]) -> list[str]:
    """The requested blocks in model order, each checked to be a residual block the trace saw."""
    found = []
    for name in dict.fromkeys(blocks):
        if not isinstance(name, str) or name not in graph.blocks:
            droppable = [n for n, why in graph.blocks.items() if why is None]
            raise PlanError(f"{name!r} is not a module that runs in forward; " + nearest(str(name), droppable))
        why = graph.blocks[name]
        if why is not None:
            raise PlanError(f"{name} cannot be dropped: {why}, so the model without it would compute another thing")
        outer = next((b for b in blocks if name.startswith(f"{b}.")), None)
        if outer is not None:
            raise PlanError(f"{name} lies inside {outer}, which is dropped too; name one of them")
        found.append(name)
    order = list(graph.blocks)
    return sorted(found, key=order.index)


def _check_dropped_blocks(model: torch.nn.Module, inputs, spec: PruningSpec) -> None:
    """Run the model without its dropped blocks once against the mock; refuse the plan if they differ."""
    check = Suspect("", -1, 0, 0, [], "the model without the dropped blocks differs from the mock")
    culprits, failure = suspects_to_pin(model, inputs, spec, [check], lambda slot: True)
    if culprits:
        blocks = ", ".join(b.module for b in spec.dropped_blocks)
        raise PlanError(f"dropping {blocks}: {failure or check.reason}; drop other blocks")


def head_requests(graph: ChannelGraph, heads: Channels, kv_heads: Channels) -> Units:
    """The slots of the requested heads, by (module, "heads" or "key_value_heads"), checking names and ranges."""
    traced = {h.module: h for h in reversed(graph.heads)}
    units: Units = {}
    for pairs, kind in ((heads, "heads"), (kv_heads, "key_value_heads")):
        for pair in pairs:
            try:
                module, index = pair
            except (TypeError, ValueError):
                raise PlanError(f"pruned {kind.replace('_', ' ')} must be (module name, index) pairs, got {pair!r}") from None
            found = traced.get(module)
            if found is None:
                known = ", ".join(f"{h.module!r} ({len(h.query)} heads, {len(h.key_value)} key/value heads)"
                                  for h in graph.heads[:4])  # fmt: skip
                more = f" and {len(graph.heads) - 4} more" if len(graph.heads) > 4 else ""
                where = f"attention modules with heads are {known}{more}" if known else "no heads were traced"
                raise PlanError(f"{module!r} is not an attention module whose heads the planner traced; {where}")
            slots = found.query if kind == "heads" else found.key_value
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(slots):
                raise PlanError(f"{module}: {kind.replace('_', ' ')} index {index!r} is out of range; it has "
                                f"{len(slots)} (0-{len(slots) - 1})")  # fmt: skip
            units.setdefault((module, kind), {})[index] = slots[index]
    return units


def unit_requests(units: Units, kind: str) -> list[UnitRequest]:
    return [UnitRequest(module, encode_runs(sorted(chosen))) for (module, k), chosen in units.items() if k == kind]


def heads_check(heads: Heads) -> Suspect:
    """A suspect that stands for an attention's heads: kept when the pruned model differs from its mock."""
    why = f"pruning heads of {heads.module} changes what its forward computes (a head count the applier cannot set?)"
    return Suspect("", -1, 0, 0, heads.query, why)


def norm_check(renorm: Renorm) -> Suspect:
    """A suspect that stands for a norm pruned through: kept when the pruned model differs from its mock."""
    why = f"is normalised by {renorm.module}, which does not run the same on fewer channels"
    return Suspect("", -1, 0, 0, renorm.slots, why)


def _requests(pairs: Channels, sizes: dict[str, int], side: str) -> dict[str, set[int]]:
    """Group (name, channel) pairs by name, checking names and ranges."""
    # An LLM's request has hundreds of thousands of pairs: group them first, check each name's channels at once,
    # and only when a check fails go through the pairs one by one for the message about the first bad one.
    pairs = list(pairs)  # read twice when a check fails
    listed: dict[str, list[int]] = {}
    try:
        for name, channel in pairs:
            listed.setdefault(name, []).append(channel)
        if all(
            name in sizes and all(type(c) is int for c in chosen) and 0 <= min(chosen) and max(chosen) < sizes[name]
            for name, chosen in listed.items()
        ):
            return {name: set(chosen) for name, chosen in listed.items()}
    except (TypeError, ValueError):  # not a pair, an unhashable name: the message comes from the pair-by-pair check
        pass
    return _checked_requests(pairs, sizes, side)


def _checked_requests(pairs: Channels, sizes: dict[str, int], side: str) -> dict[str, set[int]]:
    """`_requests` pair by pair, raising `PlanError` at the first bad pair."""
    role = "consumer" if side == "input" else "producer"
    grouped: dict[str, set[int]] = {}
    for pair in pairs:
        try:
            name, channel = pair
        except (TypeError, ValueError):
            raise PlanError(f"pruned {side}s must be (weight name, channel) pairs, got {pair!r}") from None
        if name not in sizes:
            raise PlanError(
                f"{name!r} is not the weight of a {role} (convolution or linear layer) used in forward; "
                + nearest(str(name), sizes)
            )
        if not isinstance(channel, int) or isinstance(channel, bool) or not 0 <= channel < sizes[name]:
            raise PlanError(f"{name}: {side} channel {channel!r} is out of range; it has channels 0-{sizes[name] - 1}")
        grouped.setdefault(name, set()).add(channel)
    return grouped


def zeroed_channels(model: torch.nn.Module, graph: ChannelGraph) -> tuple[list, list]:
    """Consumer input channels and producer output channels whose weights are entirely zero."""
    tensors = dict(model.named_parameters())
    inputs, outputs = [], []
    for records, found in ((graph.consumers, inputs), (graph.producers, outputs)):
        for name, axis in dict.fromkeys((r.weight, r.axis) for r in records):
            w = tensors[name].detach().movedim(axis, 0)
            zero = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
            found += [(name, int(i)) for i in torch.nonzero(zero).flatten()]
    return inputs, outputs
