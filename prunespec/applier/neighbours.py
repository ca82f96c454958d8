"""Check every layer of a spec against its neighbours: the layers, norms and heads it shares channels with.

Start with `check_neighbours`. `validate.check` has checked each layer on its own and computed its kept indices;
this checks them together, against the groups of shared channels the planner recorded (`PruningSpec.neighbours`,
schema 1.4), before anything changes. A layer is consistent on its own after a hand edit that deletes its whole
entry, a field of it, or shifts one index list; only its neighbours show that the pruned model would fail in
forward, or compute something other than its mock:

    layer 'layer1.0.bn1': no entry in the spec, so tensor 'weight' axis 0 would keep all 64 channels, but it shares
    them with 'layer1.0.conv1.weight' axis 0, which keeps 63; a layer keeps the channels its neighbours keep

Each group is checked entry by entry against its own `kept`; then every change the spec makes must be covered by
some group, so that a layer pruned by hand where the plan left it alone is refused too. A spec migrated from an older
version has no groups (`neighbours` is None) and is checked layer by layer only.
"""

from __future__ import annotations

import torch

from prunespec.errors import SpecError
from prunespec.schemas import LayerSpec, Neighbours, PruningSpec, decode_runs


def check_neighbours(
    spec: PruningSpec,
    kept: dict[str, dict[str, list[torch.Tensor | None]]],
    model: torch.nn.Module | None = None,
) -> None:
    """Raise `SpecError` at the first layer that does not keep what its neighbours keep (see the module docstring).

    `kept` holds, per layer of `spec`, the kept indices of each listed tensor axis (None: the axis is untouched),
    already checked one by one against the model (`validate.LayerChange.kept`) or a checkpoint (`kept_in`). Sizes
    come from the spec's fingerprint, which the model or checkpoint was found to match, and for buffers that no
    state dict holds (non-persistent ones, such as EVA's zero key bias) from `model`, where there is one.
    """
    if spec.neighbours is None:
        return
    _check_blocks_asked(spec)
    shapes = {name: _shape(described) for name, described in spec.fingerprint.items()}
    if model is not None:
        for name, buffer in model.named_buffers():
            shapes.setdefault(name, list(buffer.shape))
    covered: set[str] = set()
    entries = {}
    for i, group in enumerate(spec.neighbours):
        for entry in (*group.tensors, *group.readers):
            entries.setdefault(entry, i)
    for i, group in enumerate(spec.neighbours):
        _check_group(i, group, spec, shapes, kept, entries, covered)
    _check_covered(spec, kept, covered)


def _check_blocks_asked(spec: PruningSpec) -> None:
    """The blocks dropped are the blocks asked for: the plan traced the model without them, so a block that is
    no longer dropped has layers the plan never pruned alike with the channels around it."""
    dropped = [block.module for block in spec.dropped_blocks]
    for name in spec.request.pruned_blocks:
        if name not in dropped:
            raise SpecError(
                f"dropped_blocks: the request drops block {name!r} but dropped_blocks does not; the plan was made "
                "without it, so keeping it needs a new plan"
            )
    for name in dropped:
        if name not in spec.request.pruned_blocks:
            raise SpecError(f"dropped_blocks: block {name!r} is dropped but request.pruned_blocks does not ask for it")


def _split(entry: str, where: str) -> tuple[str, str, int]:
    """(module name, local tensor name, axis) of a ``"name:axis"`` entry."""
    name, colon, axis = entry.rpartition(":")
    if not colon or not axis.isdigit() or not name:
        raise SpecError(f"{where}: {entry[:60]!r} is not a tensor axis like 'layer1.0.conv1.weight:0'")
    module, _, local = name.rpartition(".")
    return module, local, int(axis)


def _shape(described: str) -> list[int]:
    """The shape in a fingerprint entry: 'float32[64,3,7,7]' -> [64, 3, 7, 7]."""
    return [int(n) for n in described.rpartition("[")[2].rstrip("]").split(",") if n]


def _tensor(shapes: dict[str, list[int]], module: str, local: str, where: str) -> list[int]:
    """The shape of a tensor of the model, by module and local name."""
    name = f"{module}.{local}" if module else local
    shape = shapes.get(name)
    if shape is None:
        raise SpecError(f"{where}: the model has no tensor {name!r}")
    return shape


def kept_in(spec: PruningSpec) -> dict[str, dict[str, list[torch.Tensor | None]]]:
    """The kept indices of every listed tensor axis of `spec`, for `check_neighbours` where there is no model to
    check the layers against (a checkpoint pruned file to file): each field decoded and checked against the size the
    fingerprint gives."""
    from prunespec.applier.validate import decode_kept  # validate imports this module

    kept: dict[str, dict[str, list[torch.Tensor | None]]] = {}
    for name, layer in spec.layers.items():
        for local, axes in layer.tensors.items():
            key = f"{name}.{local}" if name else local
            described = spec.fingerprint.get(key)
            if described is None:
                raise SpecError(f"layer {name!r}: tensor {local!r}: the fingerprint lists no tensor {key!r}")
            shape = _shape(described)
            if len(axes) > len(shape):
                raise SpecError(f"layer {name!r}: tensor {local!r}: {len(axes)} axes listed but it has {len(shape)}")
            where = f"layer {name!r}: tensor {local!r} axis"
            kept.setdefault(name, {})[local] = [
                None if runs is None else decode_kept(runs, shape[axis], f"{where} {axis}").indices
                for axis, runs in enumerate(axes)
            ]
    return kept


def _kept_axis(kept: dict, module: str, local: str, axis: int, size: int) -> torch.Tensor:
    """The indices the spec keeps of one axis: all of them, in order, where the spec leaves it alone."""
    axes = kept.get(module, {}).get(local)
    if axes is None or axis >= len(axes) or axes[axis] is None:
        return torch.arange(size)
    return axes[axis]


def _describe(indices: torch.Tensor, size: int, reference: torch.Tensor) -> str:
    """How `indices` of `size` channels differ from what the neighbours keep (`reference`)."""
    if len(indices) != len(reference):
        return f"all {size}" if torch.equal(indices, torch.arange(size)) else f"{len(indices)} of {size}"
    if set(indices.tolist()) == set(reference.tolist()):
        return f"the same {len(indices)} of {size} in another order"
    return f"{len(indices)} of {size}, but not the same ones"


def _which(entry: str) -> str:
    name, _, axis = entry.rpartition(":")
    return f"{name!r} axis {axis}"


def _check_group(
    i: int,
    group: Neighbours,
    spec: PruningSpec,
    shapes: dict[str, list[int]],
    kept: dict,
    entries: dict[str, int],
    covered: set[str],
) -> None:
    where = f"neighbours[{i}]"
    before, after = group.channels
    reference = torch.tensor(decode_runs_checked(group.kept, before, f"{where} kept"), dtype=torch.long)
    if len(reference) != after:
        raise SpecError(f"{where}: channels says {after} are kept but kept lists {len(reference)}")
    if not group.tensors and not group.readers:
        raise SpecError(f"{where}: it names no tensor and no reader")
    whole = torch.equal(reference, torch.arange(before))
    _check_units(where, group, reference)
    anchor = (group.tensors or group.readers)[0]

    for entry in group.tensors:
        module, local, axis = _split(entry, f"{where} tensors")
        shape = _tensor(shapes, module, local, f"{where} tensors")
        if axis >= len(shape) or shape[axis] != before:
            raise SpecError(f"{where}: tensor {entry.rpartition(':')[0]!r} has no axis {axis} of {before} channels")
        indices = _kept_axis(kept, module, local, axis, before)
        if not torch.equal(indices, reference):
            raise SpecError(_disagrees(spec, module, f"tensor {local!r} axis {axis}", indices, before, reference,
                                       entry, group))  # fmt: skip
        covered.add(entry)

    for entry in group.readers:
        module, local, axis = _split(entry, f"{where} readers")
        shape = _tensor(shapes, module, local, f"{where} readers")
        if axis >= len(shape):
            raise SpecError(f"{where}: tensor {entry.rpartition(':')[0]!r} has no axis {axis}")
        layer = spec.layers.get(module)
        indices = _kept_axis(kept, module, local, axis, shape[axis])
        gather = layer.input if layer is not None else None
        if gather is None:
            if shape[axis] != before or not torch.equal(indices, reference):
                reads = _describe(indices, shape[axis], reference)
                what = f"tensor {local!r} axis {axis} reads {reads} channels of its input and has no subselection"
                raise SpecError(_disagrees(spec, module, what, None, before, reference, entry, group))
        else:
            if gather.channels != after:
                raise SpecError(
                    f"layer {module!r}: input: it picks from {gather.channels} channels, but it is called with the "
                    f"{after} that its neighbours keep (e.g. {_which(anchor)}); {_missing_hint(spec, module)}"
                )
            positions = torch.tensor(decode_runs(gather.indices), dtype=torch.long)  # checked by validate
            if not torch.equal(reference[positions], indices):
                raise SpecError(
                    f"layer {module!r}: input: the channels it picks are not the ones its tensor {local!r} axis "
                    f"{axis} reads, of the {after} its neighbours keep (e.g. {_which(anchor)})"
                )
        covered.add(entry)
        covered.add(f"{module}:input")

    for norm in group.norms:
        layer = spec.layers.get(norm)
        normalises = layer.normalises if layer is not None else None
        if normalises is None:
            if not whole:
                raise SpecError(
                    f"layer {norm!r}: it normalises over {before} channels of which its neighbours keep {after} "
                    f"(e.g. {_which(anchor)}), but {_no_field(layer, 'normalises')}"
                )
        else:
            normalised = torch.tensor(decode_runs(normalises.kept), dtype=torch.long)
            if tuple(normalises.channels) != (before, after) or not torch.equal(normalised, reference):
                raise SpecError(
                    f"layer {norm!r}: normalises: it keeps {_describe(normalised, normalises.channels[0], reference)} "
                    f"channels, but its neighbours keep {after} of {before} (e.g. {_which(anchor)})"
                )
            covered.add(f"{norm}:normalises")

    dropped = {block.module for block in spec.dropped_blocks}
    for block in group.blocks:
        if block not in dropped and not whole:
            raise SpecError(
                f"block {block!r}: it would read and write {before} channels of which its neighbours keep {after} "
                f"(e.g. {_which(anchor)}), but dropped_blocks does not drop it; the plan was made without it, so "
                "keeping it needs a new plan"
            )
    if group.heads:
        _check_heads(where, group, spec, reference, anchor, covered)
    if group.repeated_in is not None:
        _check_repeat(where, group, reference, spec, entries)


def decode_runs_checked(runs: str, size: int, where: str) -> list[int]:
    from prunespec.applier.validate import decode_kept  # validate imports this module

    return decode_kept(runs, size, where).indices.tolist()


def _check_units(where: str, group: Neighbours, reference: torch.Tensor) -> None:
    """Units (heads) go whole: the kept channels are whole units, each in its own order."""
    unit = group.unit
    if unit == 1:
        return
    if group.channels[0] % unit or len(reference) % unit:
        raise SpecError(f"{where}: {group.channels} channels are not whole units of {unit}")
    blocks = reference.view(-1, unit)
    in_order = torch.equal(blocks - blocks[:, :1], torch.arange(unit).expand_as(blocks))
    if bool((blocks[:, 0] % unit).any()) or not in_order:
        raise SpecError(f"{where}: kept does not keep whole units of {unit} channels (attention heads go whole)")


def _check_heads(where: str, group: Neighbours, spec: PruningSpec, reference: torch.Tensor, anchor: str,
                 covered: set) -> None:  # fmt: skip
    """The attention's head counts (`LayerSpec.heads`) are the heads its group keeps."""
    units = reference[:: group.unit] // group.unit
    for at in group.heads:
        layer = spec.layers.get(at.module)
        heads = layer.heads if layer is not None else None
        after = int(((units >= at.first) & (units < at.first + at.count)).sum())
        what = "query" if at.side == "query" else "key/value"
        if heads is None:
            if after != at.count:
                raise SpecError(
                    f"layer {at.module!r}: its {what} heads keep {after} of {at.count} (e.g. {_which(anchor)}), but "
                    f"{_no_field(layer, 'heads')}"
                )
            continue
        counts = heads.query if at.side == "query" else heads.key_value
        if heads.head_dim != group.unit or tuple(counts) != (at.count, after):
            raise SpecError(
                f"layer {at.module!r}: heads: {at.side} is {list(counts)} with head_dim {heads.head_dim}, but its "
                f"neighbours keep {after} of {at.count} heads of {group.unit} channels (e.g. {_which(anchor)})"
            )
        covered.add(f"{at.module}:{at.side}")


def _check_repeat(where: str, group: Neighbours, reference: torch.Tensor, spec: PruningSpec, entries: dict) -> None:
    """Grouped-query attention: each kept key/value head is repeated for the query heads of its group that stay,
    which must be the same number for every group, in the order of the key/value heads."""
    target = entries.get(group.repeated_in)
    if target is None:
        raise SpecError(f"{where}: repeated_in: no group of neighbours names {group.repeated_in[:80]!r}")
    copies = spec.neighbours[target]
    if copies.unit != group.unit:
        raise SpecError(f"{where}: repeated_in: its units have {group.unit} channels but the copies' {copies.unit}")
    unit = group.unit
    sources = (reference[::unit] // unit).tolist()
    copied_reference = torch.tensor(decode_runs(copies.kept), dtype=torch.long)
    copied = (copied_reference[::unit] // unit).tolist()
    before_sources, before_copies = group.channels[0] // unit, copies.channels[0] // unit
    if not before_sources or before_copies % before_sources:
        raise SpecError(f"{where}: repeated_in: {before_copies} copies do not repeat {before_sources} units evenly")
    ratio = before_copies // before_sources
    if (not sources and copied) or (sources and len(copied) % len(sources)):
        raise SpecError(
            f"{where}: {len(copied)} kept copies (in {_which(group.repeated_in)}) do not repeat the {len(sources)} "
            f"kept units of {_which((group.tensors or group.readers)[0])} evenly"
        )
    new_ratio = len(copied) // len(sources) if sources else 0
    for j, unit_copied in enumerate(copied):
        if unit_copied // ratio != sources[j // new_ratio]:
            raise SpecError(
                f"{where}: kept unit {unit_copied} of {_which(group.repeated_in)} copies unit {unit_copied // ratio} "
                f"of {_which((group.tensors or group.readers)[0])}, but the pruned model would give it unit "
                f"{sources[j // new_ratio]}"
            )


def _no_field(layer: LayerSpec | None, field: str) -> str:
    return "the spec has no entry for it (was it deleted?)" if layer is None else f"its entry has no {field!r}"


def _missing_hint(spec: PruningSpec, module: str) -> str:
    return "the spec has no entry for it (was it deleted?)" if module not in spec.layers else "a layer reads what its "\
        "neighbours keep"


def _disagrees(spec, module, what, indices, size, reference, entry, group) -> str:
    """One line: which layer keeps what, which neighbour keeps what, and why that cannot be."""
    partner = next((e for e in (*group.tensors, *group.readers) if e.rpartition(".")[0] != module), None)
    if indices is not None:
        what = f"{what} keeps {_describe(indices, size, reference)} channels"
    if module not in spec.layers:
        what = what.replace(" keeps ", " would keep ", 1).replace(" reads ", " would read ", 1)
        lead = f"layer {module!r}: no entry in the spec (was it deleted?), so {what}"
    else:
        lead = f"layer {module!r}: {what}"
    theirs = f"{_which(partner)}, which keeps" if partner else "its neighbours, which keep"
    return (
        f"{lead}, but it shares them with {theirs} {len(reference)} of {size}; a layer keeps the channels its "
        "neighbours keep, in the same order"
    )


def _check_covered(spec: PruningSpec, kept: dict, covered: set[str]) -> None:
    """Every change the spec makes belongs to a group of neighbours: a layer pruned where the plan left it alone
    would not fit the layers around it."""
    for name, layer in spec.layers.items():
        prefix = f"{name}." if name else ""
        for local, axes in kept.get(name, {}).items():
            for axis, indices in enumerate(axes):
                if indices is None or f"{prefix}{local}:{axis}" in covered:
                    continue
                if torch.equal(indices, torch.arange(len(indices))) and _whole(spec, name, local, axis, len(indices)):
                    continue
                raise SpecError(
                    f"layer {name!r}: tensor {local!r} axis {axis}: pruned, but no group of neighbours lists it, so "
                    "the layers around it would not fit (the plan left it alone; plan again to prune it)"
                )
        if layer.input is not None and f"{name}:input" not in covered:
            raise SpecError(f"layer {name!r}: input: a subselection, but no group of neighbours lists the layer")
        if layer.normalises is not None and f"{name}:normalises" not in covered:
            raise SpecError(f"layer {name!r}: normalises: no group of neighbours lists the norm")
        for side, counts in (("query", layer.heads and layer.heads.query),
                             ("key_value", layer.heads and layer.heads.key_value)):  # fmt: skip
            if counts and counts[0] != counts[1] and f"{name}:{side}" not in covered:
                raise SpecError(f"layer {name!r}: heads: {side} heads change, but no group of neighbours holds them")


def _whole(spec: PruningSpec, module: str, local: str, axis: int, kept: int) -> bool:
    """Whether the fingerprint says the axis has `kept` entries: it is listed, but keeps all in order."""
    described = spec.fingerprint.get(f"{module}.{local}" if module else local)
    if described is None:
        return False
    shape = described.rpartition("[")[2].rstrip("]")
    sizes = [int(n) for n in shape.split(",") if n]
    return axis < len(sizes) and sizes[axis] == kept
