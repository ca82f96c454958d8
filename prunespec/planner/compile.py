"""Compile: turn a resolved, laid-out channel graph into a `PruningSpec` keyed by module and tensor names.

Start with `compile_spec`. For every tensor axis that runs along channels it writes the kept indices in their new
order; for every consumer whose weight reads fewer channels than its input holds it writes an activation
subselection; then the attributes each module needs (from the applier's rule for that module type), the width of
each consumer's pruned input activation and each layer's MACs, the request, the notes on kept channels, a
fingerprint of the model, a summary of parameters and MACs, and the batch norms that can be folded.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from prunespec.applier.blocks import config_changes
from prunespec.applier.rules import HEAD_ATTRIBUTES, head_attribute, rule_for
from prunespec.errors import PlanError
from prunespec.planner.graph import ChannelGraph
from prunespec.planner.reorder import Layout
from prunespec.planner.resolve import Resolution
from prunespec.schemas import (
    ChannelRequest,
    DroppedBlock,
    HeadCounts,
    HeadsAt,
    NormChange,
    InputInfo,
    KeptChannels,
    LayerSpec,
    Neighbours,
    NormFold,
    PruningSpec,
    Request,
    Subselection,
    Summary,
    encode_runs,
)


def compile_spec(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    graph: ChannelGraph,
    resolution: Resolution,
    layout: Layout,
    request: Request,
    blocks: Sequence[str] = (),
    full: ChannelGraph | None = None,
) -> PruningSpec:
    """The spec of a resolved plan. With dropped `blocks`, `graph` was traced with them bypassed and `full`, the
    trace of the whole model, gives the MACs before."""
    parameters = dict(model.named_parameters())
    # Every name of every tensor: a tensor that modules share is pruned under each of its names.
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    kept: dict[str, dict[int, list[int]]] = defaultdict(dict)  # tensor name -> axis -> kept indices in order
    gathers: dict[str, Subselection] = {}  # module name -> subselection of its input
    # module name -> channels of its pruned input activation: what the layer before it writes, from the data flow
    activations: dict[str, int] = {}

    for binding in graph.bindings:
        indices = layout.positions(binding.slots)
        earlier = kept[binding.tensor].setdefault(binding.axis, indices)
        if earlier != indices:
            raise PlanError(f"{binding.tensor} axis {binding.axis} would need two different channel orders")

    for ci, consumer in enumerate(graph.consumers):
        present = layout.positions(consumer.slots)
        activations.setdefault(_module_of(consumer.weight), len(present))
        if consumer.fixed:
            continue  # it reads only pinned slots, all of them
        if consumer.per_group:  # channels are tied across groups: group 0 speaks for all
            kept[consumer.weight][consumer.axis] = sorted(c for c in resolution.columns[ci] if c < consumer.per_group)
            continue
        keep = resolution.columns[ci]
        if len(keep) == len(present):  # `keep` is a subset of `present`: the weight reads all of its input
            kept[consumer.weight][consumer.axis] = present
            continue
        reads = [i for i, p in enumerate(present) if p in keep]  # what the weight reads of the pruned input
        kept[consumer.weight][consumer.axis] = [present[i] for i in reads]
        if len(reads) != len(present):
            gathers[_module_of(consumer.weight)] = Subselection(len(present), encode_runs(reads))

    for alias, first in graph.aliases.items():
        if first in kept and alias not in kept:
            kept[alias] = kept[first]
    new_shapes = {name: _shape(tensors[name], axes) for name, axes in kept.items()}
    macs = _macs(graph, tensors, new_shapes)
    heads = _head_counts(graph, resolution)
    norms = _norm_changes(graph, layout)
    layers = _layers(model, tensors, kept, new_shapes, gathers, activations, macs, heads, norms)
    return PruningSpec(
        model=type(model).__name__,
        inputs=[InputInfo(list(x.shape), _dtype(x)) for x in inputs],
        request=request,
        summary=_summary(parameters, new_shapes, macs, _macs(full, tensors, {}) if full else macs, len(gathers), blocks),
        layers=layers,
        fingerprint={name: f"{_dtype(t)}[{','.join(map(str, t.shape))}]" for name, t in model.state_dict().items()},
        kept=[KeptChannels(n.tensor, n.side, encode_runs(n.channels), n.reason) for n in resolution.notes],
        norm_folds=[NormFold(fold.norm, fold.into) for fold in graph.folds],
        generator=f"prunespec {_version()}",
        dropped_blocks=[DroppedBlock(name, _how_dropped(model, name)) for name in blocks],
        config=_config_changes(model, blocks),
        tied=dict(graph.aliases_of(model)),
        neighbours=_neighbours(graph, layout, kept, heads, blocks, full),
    )


def _neighbours(
    graph: ChannelGraph,
    layout: Layout,
    kept,
    heads,
    blocks: Sequence[str] = (),
    full: ChannelGraph | None = None,
) -> list[Neighbours]:
    """The groups of channels that layers share, for every activation whose channels change (see `Neighbours`).

    Tensor axes and consumer inputs share a group when they run along the same slots, in the same order. A group
    is written when its kept channels are not all of them in order, when a reader of it keeps other ones (a
    subselection), when it holds the heads of an attention that loses some, or when its units are repeated in a
    group that is written (or repeat one that is).
    """
    root = graph.slots.roots_table()
    groups: dict[tuple[int, ...], dict] = {}

    keys: dict[int, tuple[int, ...]] = {}  # id(slots) -> their roots: bindings of one layer share their slots

    def group(slots: list[int]) -> dict:
        key = keys.get(id(slots))
        if key is None:
            key = keys[id(slots)] = tuple(map(root.__getitem__, slots))
        found = groups.get(key)
        if found is None:
            found = groups[key] = {"slots": slots, "tensors": [], "readers": [], "norms": [], "heads": [],
                                   "repeated_in": None, "changed": False, "blocks": []}  # fmt: skip
        return found

    further = defaultdict(list)  # first name of a shared tensor -> its further names
    for alias, first in graph.aliases.items():
        if alias != first:
            further[first].append(alias)
    for binding in graph.bindings:
        members = group(binding.slots)["tensors"]
        for name in (binding.tensor, *further[binding.tensor]):
            if f"{name}:{binding.axis}" not in members:
                members.append(f"{name}:{binding.axis}")
    per_group = []  # the input axis of a grouped weight holds the columns of one group, not the activation's
    for consumer in graph.consumers:
        if consumer.per_group:
            indices = kept.get(consumer.weight, {}).get(consumer.axis)
            if indices is not None and indices != list(range(consumer.per_group)):
                per_group.append(Neighbours((consumer.per_group, len(indices)), encode_runs(indices),
                                            tensors=[f"{consumer.weight}:{consumer.axis}"]))  # fmt: skip
            continue
        found = group(consumer.slots)
        found["readers"].append(f"{consumer.weight}:{consumer.axis}")
        if kept.get(consumer.weight, {}).get(consumer.axis, layout.positions(consumer.slots)) != layout.positions(
            consumer.slots
        ):
            found["changed"] = True
    for renorm in graph.renorms:
        group(renorm.slots)["norms"].append(renorm.module)

    for block, entry in _block_streams(blocks, full):
        found = next((g for g in groups.values() if entry in g["tensors"] or entry in g["readers"]), None)
        if found is not None and block not in found["blocks"]:
            found["blocks"].append(block)

    def unit_roots(key: tuple[int, ...]) -> tuple[list[int], int]:
        """The slot of each unit of a group, and the unit's size: slots come in runs of one size (heads) or not."""
        if len(set(key)) == len(key):  # every slot its own unit: the common case, decided without a Python loop
            return list(key), 1
        runs = [1]
        for a, b in zip(key, key[1:]):
            if a == b:
                runs[-1] += 1
            else:
                runs.append(1)
        size = runs[0] if len(set(runs)) == 1 else 1
        return list(key[::size]), size

    by_unit_root: dict[int, list[tuple]] = defaultdict(list)
    for key in groups:
        units, size = unit_roots(key)
        groups[key]["unit"] = size
        groups[key]["units"] = units
        if size > 1:
            for r in units:
                by_unit_root[r].append(key)

    for record in graph.heads:
        if record.module not in heads:
            continue
        for side, slots in (("query", record.query), ("key_value", record.key_value)):
            wanted = [root[s] for s in slots]
            for key in by_unit_root.get(wanted[0], []):
                units = groups[key]["units"]
                first = units.index(wanted[0])  # a fused projection holds the query heads beside the others
                if groups[key]["unit"] == record.head_dim and units[first : first + len(wanted)] == wanted:
                    groups[key]["heads"].append(HeadsAt(record.module, side, first, len(wanted)))
                    groups[key]["changed"] = True
    for repeat in graph.repeats:
        sources = [root[s] for s in repeat.sources]
        copies = [root[s] for copied in repeat.copies for s in copied]
        if len({len(c) for c in repeat.copies}) != 1:
            continue
        for source_key in by_unit_root.get(sources[0], []):
            for copy_key in by_unit_root.get(copies[0], []):
                source, copied = groups[source_key], groups[copy_key]
                if source["units"] == sources and copied["units"] == copies and source["unit"] == copied["unit"]:
                    source["repeated_in"] = copy_key

    def first_entry(found: dict) -> str:
        return (found["tensors"] or found["readers"])[0]

    written = {}
    for key, found in groups.items():
        positions = layout.positions(found["slots"])
        if not (found["tensors"] or found["readers"]):
            continue
        if found["changed"] or positions != list(range(len(key))):
            written[key] = found
    for key, found in groups.items():  # a repeat relates two groups: both are written, or neither
        target = found["repeated_in"]
        if target is not None and (key in written or target in written):
            written[key] = found
            written[target] = groups[target]
    out = []
    for key, found in groups.items():
        if key not in written:
            continue
        positions = layout.positions(found["slots"])
        target = found["repeated_in"]
        out.append(
            Neighbours(
                channels=(len(key), len(positions)),
                kept=encode_runs(positions),
                tensors=found["tensors"],
                readers=found["readers"],
                norms=found["norms"],
                unit=found["unit"],
                heads=found["heads"],
                blocks=found["blocks"],
                repeated_in=None if target is None else first_entry(groups[target]),
            )
        )
    return out + per_group


def _block_streams(blocks: Sequence[str], full: ChannelGraph | None) -> list[tuple[str, str]]:
    """(dropped block, an entry outside it) for each tensor axis or reader outside a dropped block that runs along the
    channels some tensor axis or reader inside it does, in `full`, the trace of the model with the blocks: the
    channels a dropped block would read and write if it ran."""
    if not blocks or full is None:
        return []
    root = full.slots.roots_table()
    inside = tuple(f"{b}." for b in blocks)
    entries = [(b.tensor, b.axis, b.slots) for b in full.bindings]
    entries += [(c.weight, c.axis, c.slots) for c in full.consumers if not c.per_group]
    outside: dict[tuple[int, ...], str] = {}
    for name, axis, slots in entries:
        if not name.startswith(inside):
            outside.setdefault(tuple(root[s] for s in slots), f"{name}:{axis}")
    found = []
    for block in blocks:
        for name, axis, slots in entries:
            entry = outside.get(tuple(root[s] for s in slots)) if name.startswith(f"{block}.") else None
            if entry is not None and (block, entry) not in found:
                found.append((block, entry))
    return found


def _config_changes(model: torch.nn.Module, blocks: Sequence[str]) -> dict[str, tuple]:
    """What the model's config says once the blocks removed from its `ModuleList`s are gone: (before, after)."""
    config = getattr(model, "config", None)
    if config is None or not blocks:
        return {}
    removed: dict[str, list[int]] = {}
    for name in blocks:
        parent, _, index = name.rpartition(".")
        if isinstance(model.get_submodule(parent), torch.nn.ModuleList):
            removed.setdefault(parent, []).append(int(index))
    values = {key: getattr(config, key, None) for key in ("num_hidden_layers", "layer_types")}
    changes = {}
    for parent, indices in removed.items():
        for key, value in config_changes(values, len(model.get_submodule(parent)), indices).items():
            changes[key] = (values[key], value)
    return changes


def _how_dropped(model: torch.nn.Module, name: str) -> str:
    """A block in a `ModuleList` is removed from it (the code around it counts the list); elsewhere an identity
    takes its place, which keeps every other state_dict key as it was."""
    parent = model.get_submodule(name.rpartition(".")[0])
    return "removed" if isinstance(parent, torch.nn.ModuleList) else "identity"


def _head_counts(graph: ChannelGraph, resolution: Resolution) -> dict[str, HeadCounts]:
    """Query and key/value heads before and after pruning, for each attention module that loses heads."""
    root, dropped = graph.slots.roots_table(), resolution.dropped
    counts = {}
    for heads in graph.heads:
        query = sum(root[s] not in dropped for s in heads.query)
        key_value = len({root[s] for s in heads.key_value if root[s] not in dropped})
        if query != len(heads.query) or key_value != len(heads.key_value):
            before = (len(heads.query), len(heads.key_value))
            counts[heads.module] = HeadCounts((before[0], query), (before[1], key_value), heads.head_dim)
    return counts


def _norm_changes(graph: ChannelGraph, layout: Layout) -> dict[str, NormChange]:
    """The norms that take their statistics over fewer channels after pruning, by module name."""
    changes = {}
    for renorm in graph.renorms:
        kept = layout.positions(renorm.slots)
        if len(kept) < len(renorm.slots):
            channels = (len(renorm.slots), len(kept))
            changes[renorm.module] = NormChange(renorm.input_axis, renorm.output_axis, channels, encode_runs(kept))
    return changes


def _head_attributes(module: torch.nn.Module, counts: HeadCounts) -> dict[str, int]:
    """The new values of the head-count attributes `module` has (see `rules.HEAD_ATTRIBUTES`)."""
    (query, new_query), (key_value, new_key_value) = counts.query, counts.key_value
    found = {}
    for name, kind in HEAD_ATTRIBUTES.items():
        value = module.__dict__.get(name)
        if type(value) is int and value == head_attribute(kind, query, key_value, counts.head_dim):
            found[name] = head_attribute(kind, new_query, new_key_value, counts.head_dim)
    return found


def _layers(model, tensors, kept, new_shapes, gathers, activations, macs, heads, norms) -> dict[str, LayerSpec]:
    """One LayerSpec per touched module, in `named_modules()` order; untouched axes are left out.

    A module takes `input_activation_channels` only where the applier has a rule for its input (convolutions and
    linear layers): a multi-head attention reads its input through a weight of its own, but the applier cannot
    change what it reads.
    """
    touched: dict[str, dict[str, list[str | None]]] = defaultdict(dict)
    # Tensors bound to one list of slots share one list of indices: write its runs once.
    written: dict[tuple[int, int], tuple[list[int], str | None]] = {}  # (id(indices), size) -> (indices, runs)
    for name, axes in kept.items():
        t = tensors[name]
        runs: list[str | None] = [None] * (max(axes) + 1)
        for axis, indices in axes.items():
            key = (id(indices), t.shape[axis])
            known = written.get(key)
            if known is None or known[0] is not indices:
                whole = len(indices) == t.shape[axis] and indices == list(range(t.shape[axis]))
                known = written[key] = (indices, None if whole else encode_runs(indices))
            runs[axis] = known[1]
        while runs and runs[-1] is None:
            runs.pop()
        if runs:
            touched[_module_of(name)][name.rpartition(".")[2]] = runs
    layers = {}
    for module_name, module in model.named_modules():
        if not any(module_name in found for found in (touched, gathers, heads, norms)):
            continue
        own = {local: new_shapes.get(_join(module_name, local), tuple(t.shape)) for local, t in _own(module)}
        rule = rule_for(module)
        runs = touched.get(module_name, {})
        attributes = rule.derive(module, own) if own else {}
        if module_name in norms:
            attributes = {**rule.renormalised(module, norms[module_name].channels[1]), **attributes}
        if module_name in heads:
            attributes.update((k, v) for k, v in _head_attributes(module, heads[module_name]).items()
                              if k not in rule.attributes)  # fmt: skip
        layers[module_name] = LayerSpec(
            type=type(module).__name__,
            attributes=attributes,
            heads=heads.get(module_name),
            normalises=norms.get(module_name),
            tensors={local: runs[local] for local in own if local in runs},  # in the module's own order
            input=gathers.get(module_name),
            input_activation_channels=activations.get(module_name) if rule.input_axis is not None else None,
            macs=macs.get(module_name),
        )
    return layers


def _macs(graph: ChannelGraph, tensors, new_shapes) -> dict[str, tuple[int, int]]:
    """Multiply-accumulates before and after pruning, per module that does any, in trace order."""
    per_module: dict[str, tuple[int, int]] = {}
    for m in graph.macs:
        old = tensors[m.weight].shape
        new = new_shapes.get(m.weight, old)
        before, after = per_module.get(_module_of(m.weight), (0, 0))
        per_module[_module_of(m.weight)] = (before + m.unit * old[0] * old[1], after + m.unit * new[0] * new[1])
    return per_module


def _summary(parameters, new_shapes, macs, full_macs, subselections: int, blocks: Sequence[str]) -> Summary:
    """Sizes before and after; `parameters` are the model's, by name, each shared one once. Parameters of dropped
    `blocks` are gone; `full_macs` are the MACs of the whole model, blocks included."""
    inside = tuple(f"{b}." for b in blocks)
    before = sum(p.numel() for p in parameters.values())
    after = sum(
        math.prod(new_shapes.get(name, p.shape)) for name, p in parameters.items() if not name.startswith(inside)
    )
    macs_before = sum(b for b, _ in full_macs.values())
    macs_after = sum(a for _, a in macs.values())
    return Summary(before, after, macs_before, macs_after, subselections)


def _shape(t: torch.Tensor, axes: dict[int, list[int]]) -> tuple[int, ...]:
    return tuple(len(axes[a]) if a in axes else n for a, n in enumerate(t.shape))


def _own(module: torch.nn.Module):
    yield from ((k, v) for k, v in module._parameters.items() if v is not None)
    yield from ((k, v) for k, v in module._buffers.items() if v is not None)


def _module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def _join(module_name: str, local: str) -> str:
    return f"{module_name}.{local}" if module_name else local


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _version() -> str:
    from prunespec import __version__

    return __version__


def channel_requests(pairs: dict[str, set[int]], order: list[str]) -> list[ChannelRequest]:
    """Requested channels per tensor, in model order, as runs."""
    rank = {name: i for i, name in enumerate(order)}
    return [ChannelRequest(name, encode_runs(sorted(pairs[name]))) for name in sorted(pairs, key=rank.__getitem__)]
