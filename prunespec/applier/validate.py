"""Check a spec against a model, and work out every change, before anything is mutated.

Start with `check`: it walks the spec (version, fingerprint, then each layer) and returns one `LayerChange` per
layer, holding the new tensors already computed. `prune` only assigns what `check` returned, so a spec that does
not fit raises `SpecError` here and the model stays exactly as it was. Every message names the layer and field:

    layer 'layer1.0.conv1': tensor 'weight' axis 1: index 70 is out of range for size 64
"""

from __future__ import annotations

import array
from dataclasses import dataclass, field
from itertools import chain

import torch
from torch import nn

from prunespec.applier.rules import Rule, rule_for
from prunespec.errors import SpecError, nearest
from prunespec.schemas import SCHEMA_VERSION, LayerSpec, PruningSpec, parse_runs

# The non-persistent buffer on a consumer that holds the input positions it reads; see `prune.InputSubselection`.
INDICES_BUFFER = "_prunespec_input_indices"


@dataclass
class InputGather:
    """An activation subselection for one consumer: read `indices` of the `channels` on `axis` of its input."""

    axis: int
    channels: int
    indices: torch.Tensor
    start: int | None
    """First index when the indices are one ascending run, so a slice does the job; None when a gather is needed."""


@dataclass
class LayerChange:
    """Everything `prune` will do to one module, computed without touching it."""

    name: str
    module: nn.Module
    rule: Rule
    kept: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    """Per listed tensor, the kept indices per axis (None: axis untouched)."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """The new value of each tensor that changes."""
    attributes: dict[str, int] = field(default_factory=dict)
    input: InputGather | None = None


def check(model: nn.Module, spec: PruningSpec) -> list[LayerChange]:
    """Validate `spec` against `model` and return the changes `prune` would make; raise `SpecError` if it does not fit.

    The model is not modified. New tensors are computed without autograd, on the device of the old ones.
    """
    if spec.schema_version != SCHEMA_VERSION:
        raise SpecError(
            f"schema_version: the spec has {spec.schema_version!r} but this prunespec applies {SCHEMA_VERSION!r}; "
            "read spec files with prunespec.load_spec, which migrates older versions"
        )
    check_fingerprint(model, spec.fingerprint)
    modules = dict(model.named_modules())
    with torch.no_grad():
        return [_check_layer(name, layer, modules) for name, layer in spec.layers.items()]


def describe(tensor: torch.Tensor) -> str:
    """A tensor's dtype and shape as written in a fingerprint.

    >>> describe(torch.zeros(64, 3, 7, 7)), describe(torch.tensor(3))
    ('float32[64,3,7,7]', 'int64[]')
    """
    return f"{str(tensor.dtype).removeprefix('torch.')}[{','.join(str(n) for n in tensor.shape)}]"


def fingerprint(model: nn.Module) -> dict[str, str]:
    """The fingerprint of a model: `describe` of every tensor in its state_dict, in state_dict order.

    >>> fingerprint(nn.Linear(3, 2))
    {'weight': 'float32[2,3]', 'bias': 'float32[2]'}
    """
    return {key: describe(t) for key, t in model.state_dict().items() if isinstance(t, torch.Tensor)}


def check_fingerprint(model: nn.Module, expected: dict[str, str]) -> None:
    """Raise `SpecError` naming the first tensor where the model differs from the spec's fingerprint."""
    actual = fingerprint(model)
    for key, want in expected.items():
        have = actual.get(key)
        if have is None:
            raise SpecError(
                f"fingerprint: the spec expects tensor {key!r} ({want}) but the model has none; "
                f"{nearest(key, actual)}"
            )
        if have != want:
            raise SpecError(
                f"fingerprint: tensor {key!r} is {want} in the spec but {have} in the model "
                "(was the spec planned for another model, or applied already?)"
            )
    for key, have in actual.items():
        if key not in expected:
            raise SpecError(f"fingerprint: the model has tensor {key!r} ({have}) that the spec does not list")


def _check_layer(name: str, layer: LayerSpec, modules: dict[str, nn.Module]) -> LayerChange:
    where = f"layer {name!r}"
    module = modules.get(name)
    if module is None:
        raise SpecError(f"{where}: no such module in the model; {nearest(name, modules)}")
    if layer.type != type(module).__name__:
        raise SpecError(f"{where}: type: the spec says {layer.type!r} but the model has {type(module).__name__!r}")
    change = LayerChange(name, module, rule_for(module))

    # The module as it will be after pruning: all of its own tensors, the changed ones replaced.
    tensors = {n: t for n, t in chain(module._parameters.items(), module._buffers.items()) if t is not None}
    for tensor_name, axes in layer.tensors.items():
        if tensor_name not in tensors:
            raise SpecError(
                f"{where}: tensor {tensor_name!r}: not a parameter or buffer of this {layer.type}; "
                f"{nearest(tensor_name, tensors)}"
            )
        tensor = tensors[tensor_name]
        if len(axes) > tensor.ndim:
            raise SpecError(f"{where}: tensor {tensor_name!r}: {len(axes)} axes listed but it has only {tensor.ndim}")
        change.kept[tensor_name] = []
        for axis, runs in enumerate(axes):
            field_name = f"{where}: tensor {tensor_name!r} axis {axis}"
            kept = None if runs is None else _indices(runs, tensor.shape[axis], field_name)
            change.kept[tensor_name].append(kept)
            if kept is not None and not _is_identity(kept, tensor.shape[axis]):
                tensor = tensor.index_select(axis, kept.to(tensor.device))
        if tensor is not tensors[tensor_name]:
            tensors[tensor_name] = change.tensors[tensor_name] = tensor

    for attribute, value in layer.attributes.items():
        if attribute not in change.rule.attributes:
            accepted = ", ".join(repr(a) for a in sorted(change.rule.attributes)) or "none"
            raise SpecError(
                f"{where}: attribute {attribute!r}: a {layer.type} takes no such attribute (accepted: {accepted})"
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SpecError(f"{where}: attribute {attribute!r}: {value!r} is not a non-negative integer")
    change.attributes = dict(layer.attributes)
    after = {a: layer.attributes.get(a, getattr(module, a)) for a in change.rule.attributes}
    problem = change.rule.check(after, tensors)
    if problem:
        raise SpecError(f"{where}: {problem}")

    if layer.input is not None:
        change.input = _check_input(where, layer, module, change.rule, after, tensors)
    return change


def _check_input(where: str, layer: LayerSpec, module: nn.Module, rule: Rule, after, tensors) -> InputGather:
    where = f"{where}: input"
    if rule.input_axis is None:
        raise SpecError(f"{where}: a {layer.type} takes no input subselection")
    if INDICES_BUFFER in module._buffers:
        raise SpecError(f"{where}: the module already has an input subselection (was the spec applied already?)")
    indices = _indices(layer.input.indices, layer.input.channels, f"{where} indices")
    reads = rule.input_channels(after, tensors)
    if len(indices) != reads:
        raise SpecError(f"{where} indices: {len(indices)} given but the pruned {layer.type} reads {reads} channels")
    start = int(indices[0]) if len(indices) else 0
    contiguous = bool((indices == torch.arange(start, start + len(indices))).all())
    device = next(iter(tensors.values())).device if tensors else None
    return InputGather(
        axis=rule.input_axis,
        channels=layer.input.channels,
        indices=indices.to(device),
        start=start if contiguous else None,
    )


def _indices(runs: str, size: int, where: str) -> torch.Tensor:
    """Decode runs into an index tensor, checking each index is in [0, size) and appears once.

    Runs are checked before they are expanded, so a hostile ``'0-2000000000'`` costs nothing.

    >>> _indices("3-4,0", 5, "here").tolist()
    [3, 4, 0]
    >>> _indices("1,1", 5, "here")
    Traceback (most recent call last):
    ...
    prunespec.errors.SpecError: here: index 1 appears twice
    """
    pairs = parse_runs(runs, where)
    for lo, hi in pairs:
        if hi >= size:
            raise SpecError(f"{where}: index {lo if lo >= size else hi} is out of range for size {size}")
    last = -1
    for lo, hi in sorted(pairs):  # ascending runs overlap exactly when some index appears twice
        if lo <= last:
            raise SpecError(f"{where}: index {lo} appears twice")
        last = hi
    if not pairs:
        return torch.empty(0, dtype=torch.long)
    expanded = array.array("q")  # filling a C array from ranges is far quicker than any tensor op for this
    for lo, hi in pairs:
        expanded.extend(range(lo, hi + 1))
    return torch.frombuffer(expanded, dtype=torch.long)


def _is_identity(indices: torch.Tensor, size: int) -> bool:
    return len(indices) == size and bool((indices == torch.arange(size)).all())
