"""Check a spec against a model, and work out every change, before anything is mutated.

Start with `check`: it walks the spec (version, fingerprint, then each layer) and returns one `LayerChange` per
layer, holding the new tensors already computed. `prune` only assigns what `check` returned, so a spec that does
not fit raises `SpecError` here and the model stays exactly as it was. Every message names the layer and field:

    layer 'layer1.0.conv1': tensor 'weight' axis 1: index 70 is out of range for size 64

Layers are checked one by one, and against the data flow where the spec records it: a consumer's
`input_activation_channels` (schema 1.1) must be what its pruned weight reads, or the size its subselection picks
from; and every layer must keep what its neighbours keep (schema 1.4, `neighbours.check_neighbours`), so that a
spec whose layers are each consistent but do not fit together is refused before the model runs.

Applying a spec should cost little more than copying the kept weights, so the index runs of all fields are decoded
together up front (`_Decoder`, `_decode_together`), and each new tensor is made with one gather per pruned axis
(`select_kept`). `decode_kept` is the plain one-field decoder that finds and words every problem.
"""

from __future__ import annotations

import array
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate, chain

import msgspec
import torch
from torch import nn

from prunespec.applier.blocks import check_blocks
from prunespec.applier.fold import check_fold
from prunespec.applier.neighbours import check_neighbours
from prunespec.applier.rules import HEAD_ATTRIBUTES, Rule, head_attribute_problem, rule_for
from prunespec.errors import SpecError, nearest
from prunespec.schemas import SCHEMA_VERSION, LayerSpec, PruningSpec, parse_runs, well_formed_runs
from prunespec.schemas.spec import MAX_INDEX

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
    check_fingerprint(model, spec)
    modules = dict(model.named_modules())
    decoder = _Decoder(_index_fields(spec, modules))
    with torch.no_grad():
        changes = [_check_layer(name, layer, modules, decoder) for name, layer in spec.layers.items()]
        check_neighbours(spec, {change.name: change.kept for change in changes}, model)
    return changes


def _index_fields(spec: PruningSpec, modules: dict[str, nn.Module]) -> Iterator[tuple[str, int]]:
    """(runs, size) of each index field of the spec that names an axis of the model, to decode them together.

    Fields that do not fit are left out: `_check_layer` reports them.
    """
    for name, layer in spec.layers.items():
        module = modules.get(name)
        if module is None:
            continue
        for tensor_name, axes in layer.tensors.items():
            tensor = module._parameters.get(tensor_name)
            if tensor is None:
                tensor = module._buffers.get(tensor_name)
            if tensor is not None and len(axes) <= tensor.ndim:
                yield from ((runs, tensor.shape[axis]) for axis, runs in enumerate(axes) if isinstance(runs, str))
        if layer.input is not None and isinstance(layer.input.indices, str) and isinstance(layer.input.channels, int):
            yield layer.input.indices, layer.input.channels


def describe(tensor: torch.Tensor) -> str:
    """A tensor's dtype and shape as written in a fingerprint.

    >>> describe(torch.zeros(64, 3, 7, 7)), describe(torch.tensor(3))
    ('float32[64,3,7,7]', 'int64[]')
    """
    return f"{str(tensor.dtype).removeprefix('torch.')}[{','.join(map(str, tensor.shape))}]"


def fingerprint(model: nn.Module) -> dict[str, str]:
    """The fingerprint of a model: `describe` of every tensor in its state_dict, in state_dict order.

    >>> fingerprint(nn.Linear(3, 2))
    {'weight': 'float32[2,3]', 'bias': 'float32[2]'}
    """
    # keep_vars: the tensors themselves, not detached copies; only their dtype and shape are read.
    return {key: describe(t) for key, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}


def check_fingerprint(model: nn.Module, spec: PruningSpec) -> None:
    """Raise `SpecError` naming the first tensor where the model differs from the spec's fingerprint."""
    found = fingerprint_problems(model, spec)
    if found:
        raise SpecError(found[0])


def fingerprint_problems(model: nn.Module, spec: PruningSpec) -> list[str]:
    """Every tensor where the model differs from the spec's fingerprint, one message each; or, when more than a few
    differ, one message that says which model the spec was planned for (see `compare_fingerprints`)."""
    return compare_fingerprints(fingerprint(model), spec.fingerprint, spec.model, kind=type(model).__name__)


SAME_MODEL_DIFFERS_IN = 3
"""More tensors than this differ from the fingerprint: the spec belongs to another model (or was applied already),
and a message per tensor, with guesses at similar names, would only bury that."""

# Floating dtypes a spec may be planned in and applied in interchangeably: checkpoints of large models are stored in
# one (bfloat16) and planned or run in another, and the kept indices do not depend on it.
FLOATING = frozenset({"float16", "bfloat16", "float32", "float64"})


def same_tensor_type(have: str, want: str) -> bool:
    """Whether two fingerprint entries describe the same tensor: the same shape, and the same dtype unless both are
    floating (integer and bool tensors hold indices or flags, whose dtype is part of what they mean).

    >>> same_tensor_type("bfloat16[64,3]", "float32[64,3]"), same_tensor_type("int32[]", "int64[]")
    (True, False)
    """
    have_dtype, _, have_shape = have.partition("[")
    want_dtype, _, want_shape = want.partition("[")
    return have_shape == want_shape and (have_dtype == want_dtype or {have_dtype, want_dtype} <= FLOATING)


def compare_fingerprints(
    actual: dict[str, str],
    expected: dict[str, str],
    planned_for: str,
    holder: str = "the model",
    kind: str = "",
    tied: dict[str, str] | None = None,
) -> list[str]:
    """How a name -> 'dtype[shape]' mapping (a model's, or a checkpoint file's) differs from a spec's fingerprint:
    a message per tensor, or one message when more than `SAME_MODEL_DIFFERS_IN` tensors differ. Floating dtypes
    stand for one another (`same_tensor_type`).

    `tied` maps further names of shared tensors to their first name (`PruningSpec.tied`). A checkpoint may store a
    shared tensor under one of its names only, as Hugging Face's `save_pretrained` does, so a name of a shared
    tensor may be absent when another of its names is present.

    >>> spec = {"weight": "float32[2,4]", "extra": "float32[2]"}
    >>> for message in compare_fingerprints({"weight": "float32[2,3]", "bias": "float32[2]"}, spec, "Linear"):
    ...     print(message.split(" but ")[0])
    fingerprint: tensor 'weight' is float32[2,4] in the spec
    fingerprint: the spec expects tensor 'extra' (float32[2])
    fingerprint: the model has tensor 'bias' (float32[2]) that the spec does not list
    >>> other = {f"features.{i}.weight": "float32[8]" for i in range(5)}
    >>> print(compare_fingerprints(other, spec, "torchvision:resnet18", kind="MobileNetV2")[0])
    fingerprint: the spec was planned for torchvision:resnet18 (2 tensors); the model (MobileNetV2) differs in 2 of \
them and has 5 more (first: it has no tensor 'weight')
    >>> compare_fingerprints({"embed": "bfloat16[8,4]"}, {"embed": "float64[8,4]", "head": "float64[8,4]"}, "Net",
    ...                      "the file", tied={"head": "embed"})
    []
    """
    differ, extra = _differences(actual, expected, tied or {})
    if len(differ) + len(extra) > SAME_MODEL_DIFFERS_IN:
        if differ and differ[0] in actual:
            key = differ[0]
            first = f"tensor {key!r} is {expected[key]} in the spec but {actual[key]} in {holder}"
        else:
            first = f"it has no tensor {differ[0]!r}" if differ else f"the spec does not list tensor {extra[0]!r}"
        how = " and ".join(
            ([f"differs in {len(differ)} of them"] if differ else []) + ([f"has {len(extra)} more"] if extra else [])
        )
        applied = "; was the spec applied to it already?" if not extra and all(
            _smaller(actual.get(key), expected[key]) for key in differ
        ) else ""
        return [
            f"fingerprint: the spec was planned for {planned_for} ({len(expected)} tensors); "
            f"{holder}{f' ({kind})' if kind else ''} {how} (first: {first}){applied}"
        ]
    found = []
    for key in differ:
        want, have = expected[key], actual.get(key)
        if have is None:
            found.append(
                f"fingerprint: the spec expects tensor {key!r} ({want}) but {holder} has none; {nearest(key, actual)}"
            )
        else:
            found.append(
                f"fingerprint: tensor {key!r} is {want} in the spec but {have} in {holder} "
                "(was the spec planned for another model, or applied already?)"
            )
    found += [f"fingerprint: {holder} has tensor {key!r} ({actual[key]}) that the spec does not list" for key in extra]
    return found


def _smaller(have: str | None, want: str) -> bool:
    """Whether a tensor described as `have` could be `want` pruned: a dtype that may stand for it, the same rank,
    no axis larger.

    >>> _smaller("float32[6,3]", "float32[8,3]"), _smaller("float32[12,3]", "float32[8,3]"), _smaller(None, "int64[]")
    (True, False, False)
    """
    if have is None:
        return False
    (have_type, have_shape), (want_type, want_shape) = (text.rstrip("]").split("[") for text in (have, want))
    have_sizes, want_sizes = have_shape.split(","), want_shape.split(",")
    same_type = have_type == want_type or {have_type, want_type} <= FLOATING
    return same_type and len(have_sizes) == len(want_sizes) and all(
        int(a or 0) <= int(b or 0) for a, b in zip(have_sizes, want_sizes)
    )


def _differences(
    actual: dict[str, str], expected: dict[str, str], tied: dict[str, str]
) -> tuple[list[str], list[str]]:
    """The fingerprint's tensors that `actual` lacks or has otherwise, and the tensors only `actual` has. A shared
    tensor stored under another of its names is not missing."""
    stored = {tied.get(key, key) for key in actual}
    differ = [
        key
        for key, want in expected.items()
        if (key in actual and not same_tensor_type(actual[key], want)) or (key not in actual and tied.get(key, key) not in stored)
    ]
    return differ, [key for key in actual if key not in expected]


def problems(model: nn.Module, spec: PruningSpec) -> list[str]:
    """Every way `spec` does not fit `model`, one message each; empty exactly when `check` would pass.

    Unlike `check`, it goes on after a problem, so a reviewer sees all of them at once. The model is not modified.
    The spec's `norm_folds` are checked too, although only `prune(..., fold_norms=True)` needs them. A spec planned
    for another model gets the one message that says so: its layers would not fit either.
    """
    found = []
    if spec.schema_version != SCHEMA_VERSION:
        found.append(f"schema_version: the spec has {spec.schema_version!r}; this prunespec applies {SCHEMA_VERSION!r}")
    found += fingerprint_problems(model, spec)
    if sum(map(len, _differences(fingerprint(model), spec.fingerprint, spec.tied))) > SAME_MODEL_DIFFERS_IN:
        return found
    modules = dict(model.named_modules())
    decoder = _Decoder(_index_fields(spec, modules))
    pruned = {}
    changes = []
    with torch.no_grad():
        for name, layer in spec.layers.items():
            try:
                changes.append(_check_layer(name, layer, modules, decoder))
                pruned[name] = changes[-1].tensors
            except SpecError as e:
                found.append(str(e))
        if len(changes) == len(spec.layers):  # neighbours are compared once each layer fits on its own
            try:
                check_neighbours(spec, {change.name: change.kept for change in changes}, model)
            except SpecError as e:
                found.append(str(e))
    for i, entry in enumerate(spec.norm_folds):
        try:
            check_fold(i, entry, modules, pruned)
        except SpecError as e:
            found.append(str(e))
    try:
        check_blocks(model, spec)
    except SpecError as e:
        found.append(str(e))
    return found


def _check_layer(name: str, layer: LayerSpec, modules: dict[str, nn.Module], decode: _Decoder) -> LayerChange:
    where = f"layer {name!r}"
    module = modules.get(name)
    if module is None:
        raise SpecError(f"{where}: no such module in the model; {nearest(name, modules)}")
    if layer.type != type(module).__name__:
        raise SpecError(f"{where}: type: the spec says {layer.type!r} but the model has {type(module).__name__!r}")
    change = LayerChange(name, module, rule_for(module))

    tensors = _own_tensors(module)  # the module as it will be after pruning: the changed ones are replaced below
    for tensor_name, axes in layer.tensors.items():
        if tensor_name not in tensors:
            raise SpecError(
                f"{where}: tensor {tensor_name!r}: not a parameter or buffer of this {layer.type}; "
                f"{nearest(tensor_name, tensors)}"
            )
        tensor = tensors[tensor_name]
        if len(axes) > tensor.ndim:
            raise SpecError(f"{where}: tensor {tensor_name!r}: {len(axes)} axes listed but it has only {tensor.ndim}")
        kept = [
            None if runs is None else decode(runs, tensor.shape[axis], f"{where}: tensor {tensor_name!r} axis {axis}")
            for axis, runs in enumerate(axes)
        ]
        change.kept[tensor_name] = [None if k is None else k.indices for k in kept]
        selected = select_kept(tensor, kept)
        if selected is not tensor:
            tensors[tensor_name] = change.tensors[tensor_name] = selected

    head_attributes = HEAD_ATTRIBUTES.keys() - change.rule.attributes if layer.heads is not None else ()
    for attribute, value in layer.attributes.items():
        if attribute not in change.rule.attributes and attribute not in head_attributes:
            accepted = ", ".join(repr(a) for a in sorted(change.rule.attributes)) or "none"
            raise SpecError(
                f"{where}: attribute {attribute!r}: a {layer.type} takes no such attribute (accepted: {accepted})"
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SpecError(f"{where}: attribute {attribute!r}: {value!r} is not a non-negative integer")
        if attribute in head_attributes:
            problem = head_attribute_problem(attribute, getattr(module, attribute, None), value, layer.heads)
            if problem:
                raise SpecError(f"{where}: {problem}")
    change.attributes = dict(layer.attributes)
    before = {a: getattr(module, a) for a in change.rule.attributes}
    after = {a: layer.attributes.get(a, value) for a, value in before.items()}
    problem = change.rule.check(after, tensors)
    if problem:
        raise SpecError(f"{where}: {problem}")

    if layer.input_activation_channels is not None:
        _check_input_activation(where, layer, module, change.rule, before, after, tensors)
    if layer.input is not None:
        change.input = _check_input(where, layer, module, change.rule, after, tensors, decode)
    return change


def _check_input_activation(
    where: str, layer: LayerSpec, module: nn.Module, rule: Rule, before, after, tensors
) -> None:
    """Check the layer against the activation it is called with, as the planner saw it in the data flow."""
    where = f"{where}: input_activation_channels"
    channels = layer.input_activation_channels
    if rule.input_axis is None:
        raise SpecError(f"{where}: only a layer whose input the applier can change records it, not a {layer.type}")
    unpruned = rule.input_channels(before, _own_tensors(module))
    if channels > unpruned:
        raise SpecError(
            f"{where}: {channels}, but the unpruned {layer.type} reads only {unpruned}; pruning never widens an input"
        )
    if layer.input is not None:
        if layer.input.channels != channels:
            raise SpecError(
                f"{where}: {channels}, but the input subselection picks from input.channels={layer.input.channels}"
            )
        return
    reads = rule.input_channels(after, tensors)
    if reads != channels:
        raise SpecError(
            f"{where}: the layer is called with {channels} channels but the pruned {layer.type} reads {reads}, and "
            "it has no input subselection"
        )


def _check_input(
    where: str, layer: LayerSpec, module: nn.Module, rule: Rule, after, tensors, decode: _Decoder
) -> InputGather:
    where = f"{where}: input"
    if rule.input_axis is None:
        raise SpecError(f"{where}: a {layer.type} takes no input subselection")
    if INDICES_BUFFER in module._buffers:
        raise SpecError(f"{where}: the module already has an input subselection (was the spec applied already?)")
    kept = decode(layer.input.indices, layer.input.channels, f"{where} indices")
    reads = rule.input_channels(after, tensors)
    if len(kept.indices) != reads:
        raise SpecError(
            f"{where} indices: {len(kept.indices)} given but the pruned {layer.type} reads {reads} channels"
        )
    device = next(iter(tensors.values())).device if tensors else None
    if device is not None and device.type == "meta":
        # A model built on meta to receive a pruned checkpoint: the indices are not in the state_dict, so loading
        # would never fill them; they must be real now.
        device = torch.device("cpu")
    return InputGather(
        axis=rule.input_axis,
        channels=layer.input.channels,
        # A copy of its own: the decoded indices are shared with every other field that has the same runs.
        indices=kept.indices.to(device, copy=True),
        start=kept.start,
    )


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters and buffers by local name."""
    return {n: t for n, t in chain(module._parameters.items(), module._buffers.items()) if t is not None}


@dataclass
class Kept:
    """The kept indices of one axis, decoded from runs."""

    indices: torch.Tensor
    start: int | None
    """The first index when the indices are one ascending run (0 when there are none), so a slice selects them;
    None when a gather is needed."""
    _gather_indices: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    def is_identity(self, size: int) -> bool:
        """Whether these indices keep every one of `size` entries in order."""
        return self.start == 0 and len(self.indices) == size

    def gather_indices(self, device: torch.device) -> torch.Tensor:
        """The indices for `index_select` on `device`, made once however many tensors they select from.

        int32: on CPU, `index_select` of conv and linear weights measured 20-40% faster with int32 indices than
        with int64 ones. Indices never exceed MAX_INDEX, so they fit.
        """
        indices = self._gather_indices.get(device)
        if indices is None:
            indices = self._gather_indices[device] = self.indices.to(device, torch.int32)
        return indices


class _Decoder:
    """`decode_kept` for one `check`, made cheap for a whole spec.

    Each distinct (runs, size) is decoded once: a spec repeats a producer's kept channels on its norm's tensors and
    on every consumer that reads them. The fields named up front are decoded together by `_decode_together`, whose
    cost hardly grows with their number. If any of them is not valid, none is decoded up front, and `decode_kept`
    decodes each field when `check` asks for it, so the first problem in spec order is the one reported.
    """

    def __init__(self, fields: Iterable[tuple[str, int]] = ()) -> None:
        unique = list(dict.fromkeys(fields))
        kept = _decode_together(unique) if unique else None
        self._decoded: dict[tuple[str, int], Kept] = {} if kept is None else dict(zip(unique, kept))

    def __call__(self, runs: str, size: int, where: str) -> Kept:
        if not isinstance(runs, str):  # unhashable, perhaps: decode_kept words the error
            return decode_kept(runs, size, where)
        kept = self._decoded.get((runs, size))
        if kept is None:
            kept = self._decoded[runs, size] = decode_kept(runs, size, where)
        return kept


def decode_kept(runs: str, size: int, where: str) -> Kept:
    """Decode runs into kept indices, checking each index is in [0, size) and appears once.

    One field, run by run: the reference that `_decode_together` is tested against, and where every problem is
    found and worded. Runs are checked before they are expanded, so a hostile ``'0-2000000000'`` costs nothing.

    >>> decode_kept("3-4,0", 5, "here")
    Kept(indices=tensor([3, 4, 0]), start=None)
    >>> decode_kept("0-1,2-3", 5, "here")
    Kept(indices=tensor([0, 1, 2, 3]), start=0)
    >>> decode_kept("1,1", 5, "here")
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
        return Kept(torch.empty(0, dtype=torch.long), start=0)
    expanded = array.array("q")  # filling a C array from ranges is far quicker than any tensor op for this
    for lo, hi in pairs:
        expanded.extend(range(lo, hi + 1))
    ascending = all(later == earlier + 1 for (_, earlier), (later, _) in zip(pairs, pairs[1:]))
    return Kept(torch.frombuffer(expanded, dtype=torch.long), start=pairs[0][0] if ascending else None)


_INTEGERS = msgspec.json.Decoder(list[int])


def _decode_together(fields: list[tuple[str, int]]) -> list[Kept] | None:
    """`decode_kept` of many fields at once, or None when any of them is not valid.

    The runs of all fields are joined by commas and decoded as one, so each step below is one tensor op for the
    whole spec, where `decode_kept` costs Python work per run. It checks less finely: anything unusual (a malformed
    field, an index out of range or repeated, a number written with leading zeros) gives None, and `decode_kept`
    finds and words it.

    >>> [k.indices.tolist() for k in _decode_together([("3-4,0", 5), ("", 3), ("2-8", 9)])]
    [[3, 4, 0], [], [2, 3, 4, 5, 6, 7, 8]]
    >>> _decode_together([("3-4,0", 5), ("1,1", 3)]) is None
    True
    """
    texts = [runs for runs, _ in fields]
    if not all(isinstance(runs, str) and well_formed_runs(runs) for runs in texts):
        return None
    if not all(type(size) is int for _, size in fields):
        return None
    text = ",".join(filter(None, texts)).encode()
    if not text:
        return [Kept(torch.empty(0, dtype=torch.long), start=0) for _ in fields]
    try:
        # With dashes made commas, the runs are a JSON list of integers, which msgspec reads quickest.
        numbers = _INTEGERS.decode(b"[" + text.replace(b"-", b",") + b"]")
        numbers = torch.frombuffer(array.array("q", numbers), dtype=torch.long)
    except (msgspec.DecodeError, OverflowError):  # a leading zero, a number past int64
        return None

    separators = text.translate(None, b"0123456789")  # the one between numbers i and i + 1 is separators[i]
    if separators:
        commas = (torch.frombuffer(bytearray(separators), dtype=torch.uint8) == ord(",")).nonzero().squeeze(1)
    else:  # a single number; frombuffer refuses an empty buffer
        commas = torch.zeros(0, dtype=torch.long)
    # A run starts at the first number and just after each comma, and ends just before the next run starts.
    first_at = torch.cat([torch.zeros(1, dtype=torch.long), commas + 1])
    last_at = torch.cat([first_at[1:] - 1, torch.tensor([len(numbers) - 1])])
    lo, hi = numbers[first_at], numbers[last_at]
    upward = first_at != last_at  # the runs written 'a-b', which need a < b
    run_counts = [runs.count(",") + 1 if runs else 0 for runs in texts]
    # No index goes past MAX_INDEX, whatever the size.
    sizes = torch.tensor([min(size, MAX_INDEX + 1) for _, size in fields])
    if bool(((hi <= lo) & upward).any()) or bool((hi >= sizes.repeat_interleave(torch.tensor(run_counts))).any()):
        return None

    # Sorted by field and then by first index, a field's runs overlap exactly when some index appears twice. Once
    # they do not, each field has at most `size` indices, so expanding them is safe.
    field_of_run = torch.arange(len(fields)).repeat_interleave(torch.tensor(run_counts))
    key = field_of_run * (MAX_INDEX + 1) + lo
    if bool((key[1:] >= key[:-1]).all()):  # in order already, as planned specs mostly are: a sort costs more
        lo_sorted, hi_sorted, field_sorted = lo, hi, field_of_run
    else:
        by_start = key.argsort()
        lo_sorted, hi_sorted, field_sorted = lo[by_start], hi[by_start], field_of_run[by_start]
    if bool(((lo_sorted[1:] <= hi_sorted[:-1]) & (field_sorted[1:] == field_sorted[:-1])).any()):
        return None
    lengths = hi - lo + 1
    ends = lengths.cumsum(0)
    total = int(ends[-1])
    # An index is its run's first index plus its place in the run: its place overall less where the run starts.
    indices = (lo - (ends - lengths)).repeat_interleave(lengths, output_size=total) + torch.arange(total)
    run_bounds = [0, *accumulate(run_counts)]  # field i has runs run_bounds[i] up to run_bounds[i + 1]
    field_runs = torch.tensor(run_bounds)
    indices_before = torch.cat([torch.zeros(1, dtype=torch.long), ends])
    counts = (indices_before[field_runs[1:]] - indices_before[field_runs[:-1]]).tolist()

    # A field is one ascending run when each of its runs but the first starts just past where the one before ends.
    first_runs = [first for first, count in zip(run_bounds, run_counts) if count]  # of the fields that have runs
    breaks = torch.ones(len(lo), dtype=torch.bool)
    breaks[1:] = lo[1:] != hi[:-1] + 1
    breaks[first_runs] = True
    breaks_before = torch.cat([torch.zeros(1, dtype=torch.long), breaks.cumsum(0)])
    ascending = (breaks_before[field_runs[1:]] - breaks_before[field_runs[:-1]] <= 1).tolist()
    first_indices = iter(lo[first_runs].tolist())
    starts = [next(first_indices) if count else 0 for count in run_counts]
    return [
        Kept(field_indices, start=start if one_run else None)
        for field_indices, start, one_run in zip(indices.split(counts), starts, ascending)
    ]


def select_kept(tensor: torch.Tensor, kept: list[Kept | None]) -> torch.Tensor:
    """`tensor` with only the kept entries along each axis, as a new contiguous tensor; `tensor` itself when every
    listed axis keeps all of its entries in order.

    Axes kept as one ascending run are sliced first (`narrow`: a view, no copy), so that the gathers that follow
    (`index_select`, axis 0 up) read only what stays; the last gather writes the new tensor. A convolution weight
    gathered on both of its channel axes is the exception: its kernels are rows of a (out * in, kernel) matrix, and
    one gather of those rows is 1.3-2.5x quicker than two passes when a kernel has two entries or more (1x1 kernels
    and linear weights: two passes are quicker). A result that is only slices is cloned: the pruned model must not
    pin the storage of the old tensor.

    >>> t = torch.arange(12).view(3, 4)
    >>> select_kept(t, [decode_kept("2,0", 3, ""), decode_kept("1-2", 4, "")]).tolist()
    [[9, 10], [1, 2]]
    >>> select_kept(t, [None, decode_kept("0-3", 4, "")]) is t
    True
    """
    changed = [(axis, k) for axis, k in enumerate(kept) if k is not None and not k.is_identity(tensor.shape[axis])]
    selected = tensor
    for axis, axis_kept in changed:
        if axis_kept.start is not None:
            selected = selected.narrow(axis, axis_kept.start, len(axis_kept.indices))
    gathers = [(axis, axis_kept) for axis, axis_kept in changed if axis_kept.start is None]
    if [axis for axis, _ in gathers] == [0, 1] and len(changed) == 2 and math.prod(tensor.shape[2:]) >= 2:
        return _gather_kernels(tensor, gathers[0][1], gathers[1][1])
    for axis, axis_kept in gathers:
        selected = selected.index_select(axis, axis_kept.gather_indices(selected.device))
    if changed and not gathers:
        selected = selected.clone(memory_format=torch.contiguous_format)
    return selected


def _gather_kernels(tensor: torch.Tensor, outputs: Kept, inputs: Kept) -> torch.Tensor:
    """`tensor` with only the kept output and input channels, in one gather of whole kernels.

    >>> t = torch.arange(24).view(3, 2, 4)
    >>> _gather_kernels(t, decode_kept("2,0", 3, ""), decode_kept("1", 2, "")).tolist()
    [[[20, 21, 22, 23]], [[4, 5, 6, 7]]]
    """
    out_channels, in_channels = tensor.shape[:2]
    kernels = outputs.indices.unsqueeze(1) * in_channels + inputs.indices.unsqueeze(0)
    index_type = torch.int32 if out_channels * in_channels <= MAX_INDEX else torch.long
    rows = tensor.contiguous().view(out_channels * in_channels, -1)
    selected = rows.index_select(0, kernels.view(-1).to(tensor.device, index_type))
    return selected.view(len(outputs.indices), len(inputs.indices), *tensor.shape[2:])
