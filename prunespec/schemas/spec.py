"""The pruning spec: typed msgspec Structs, compact index runs, canonical JSON, reading and writing.

Start with `PruningSpec`: it is the whole file format. The JSON Schema in `prunespec.schema.json` is generated from
these Structs (`python -m prunespec schema`), and a test fails when the two drift apart.

A spec is keyed only by the qualified names of `model.named_modules()` and `model.state_dict()`. Indices are written
as *runs*: ``"0-4,7,9-11"`` means ``[0, 1, 2, 3, 4, 7, 9, 10, 11]`` in that order, so a reordered list such as
``"5-7,0-4"`` stays short. `to_json` writes one layer per block, in model order, so that a textual diff of two
specs shows which layers changed.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from prunespec.errors import SpecError

SCHEMA_VERSION = "1.4"
# Every version this reader reads, oldest first; see `_migrate` for the policy.
KNOWN_VERSIONS = ("1.0", "1.1", "1.2", "1.3", "1.4")
# An index above this is not a channel of any real model; refusing it early keeps hostile files cheap to reject.
MAX_INDEX = 2**31 - 1

_RUNS_PATTERN = r"^$|^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$"
IndexRuns = Annotated[
    str,
    msgspec.Meta(
        # The pattern is published in the JSON Schema but not enforced by msgspec: its regex costs more than the
        # rest of reading a spec together, so `load_spec_bytes` checks runs itself with `well_formed_runs`.
        extra_json_schema={"pattern": _RUNS_PATTERN},
        description="Channel indices as comma-separated runs: '0-4,7' is [0, 1, 2, 3, 4, 7], in that order.",
    ),
]
Count = Annotated[int, msgspec.Meta(ge=0)]
TensorType = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[a-z0-9_]+\[([0-9]+(,[0-9]+)*)?\]$",
        description="dtype and shape of a tensor, e.g. 'float32[64,3,7,7]'.",
    ),
]


class _Struct(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False):
    pass


class InputInfo(_Struct):
    """One example input the spec was planned with."""

    shape: list[Count]
    dtype: str


class ChannelRequest(_Struct):
    """Channels of one tensor that the user asked to prune."""

    tensor: str
    channels: IndexRuns


class UnitRequest(_Struct):
    """Units of one module that the user asked to prune: attention heads, or key/value heads (since schema 1.3)."""

    module: str
    indices: IndexRuns


class Request(_Struct):
    """What the user asked for: pruned consumer inputs, pruned producer outputs, heads, and the export mode."""

    pruned_inputs: list[ChannelRequest]
    pruned_outputs: list[ChannelRequest]
    constrained: bool
    reorder: bool
    zeroed: bool = msgspec.field(default=False)
    """True when the channels were found as all-zero weights rather than listed."""
    pruned_heads: list[UnitRequest] = msgspec.field(default_factory=list)
    """Query heads by attention module and head index (since schema 1.3)."""
    pruned_kv_heads: list[UnitRequest] = msgspec.field(default_factory=list)
    """Key/value heads by attention module and key/value head index (since schema 1.3)."""
    through_norms: bool = msgspec.field(default=False)
    """Whether channels that norms normalise together may be pruned, the norms then normalising over the kept
    ones (since schema 1.3)."""
    pruned_blocks: list[str] = msgspec.field(default_factory=list)
    """Residual blocks to drop, by module name (since schema 1.3)."""
    uniform: bool = msgspec.field(default=False)
    """Whether the plan had to be one the model's config can describe (since schema 1.3)."""


class KeptChannels(_Struct):
    """Requested channels the planner kept, and why (principle 6: the spec is honest).

    `side` is "input" or "output" for channels of a weight named by `tensor`; since schema 1.3 also "heads" or
    "key_value_heads", with `tensor` naming the attention module and `channels` the head indices.
    """

    tensor: str
    side: Literal["input", "output", "heads", "key_value_heads"]
    channels: IndexRuns
    reason: str


class HeadCounts(_Struct):
    """The heads of an attention module before and after pruning (since schema 1.3).

    `query` and `key_value` are ``[before, after]``; they are equal unless the attention shares key/value heads
    between groups of query heads. `head_dim` never changes.
    """

    query: tuple[Count, Count]
    key_value: tuple[Count, Count]
    head_dim: Count


class Subselection(_Struct):
    """An activation subselection (a gather) in front of a consumer.

    `channels` is the size of the pruned input activation along the consumer's channel axis; `indices` are the
    positions in it that the consumer reads, in the order of its pruned weight.
    """

    channels: Count
    indices: IndexRuns


class NormChange(_Struct):
    """A norm that takes its statistics over fewer channels after pruning (since schema 1.3, planned only with
    ``through_norms``).

    It reads the channels on `input_axis` and writes them on `output_axis` (negative: counted from the last axis).
    `channels` is ``[before, after]``; `kept` lists the channels it keeps, in their pruned order. The pruned model
    runs the norm on the kept channels alone; the mock emulates that by running it on them alone too.
    """

    input_axis: int
    output_axis: int
    channels: tuple[Count, Count]
    kept: IndexRuns


class LayerSpec(_Struct, omit_defaults=True):
    """Everything the applier does to one module, and what the planner measured about it.

    `tensors` maps the module's own parameter and buffer names to the kept indices per axis (``null`` for an axis
    that is not touched). `attributes` are the module attributes to set (``in_channels``, ``groups``, ...).

    Since schema 1.1, two optional fields (absent in specs migrated from 1.0):

    - `input_activation_channels`, on consumers (convolutions, linear layers): the size of the activation the
      pruned layer is called with, along its channel axis. It equals `input.channels` when the layer has an
      activation subselection, and otherwise the channels its pruned weight reads (``in_channels``,
      ``in_features``). The planner takes it from the traced data flow, not from the layer's own tensors, so the
      applier can refuse a spec whose layers are consistent one by one but not with what flows between them.
    - `macs`: multiply-accumulates of the layer for the example inputs, before and after pruning; only on layers
      that do multiply-accumulates (convolutions, linear layers, attention projections).

    Since schema 1.3, `heads` on attention modules (see `HeadCounts`) and `normalises` on norms (`NormChange`).
    """

    type: str
    attributes: dict[str, Count] = msgspec.field(default_factory=dict)
    tensors: dict[str, list[IndexRuns | None]] = msgspec.field(default_factory=dict)
    input: Subselection | None = None
    input_activation_channels: Count | None = None
    macs: tuple[Count, Count] | None = None
    heads: HeadCounts | None = None
    """On attention modules whose heads change (since schema 1.3); the module's head-count attributes that its
    forward reads are in `attributes`."""
    normalises: NormChange | None = None
    """On norms that take their statistics over fewer channels (since schema 1.3)."""


class HeadsAt(_Struct):
    """Units `first` up to `first + count` of a group of `Neighbours` are the query or key/value heads of the
    attention `module` (since schema 1.4); a fused projection holds them beside the other heads."""

    module: str
    side: Literal["query", "key_value"]
    first: Count
    count: Count


class Neighbours(_Struct, omit_defaults=True):
    """One group of channels that several tensors, layers and norms share: the neighbours of a layer, which must
    keep the same channels in the same order (since schema 1.4).

    The planner writes one for every activation whose channels change, from the traced data flow. `channels` is
    ``[before, after]`` and `kept` the channels that stay, in their pruned order. Every entry names where they run:

    - `tensors`: ``"name:axis"`` of a parameter or buffer (a producer's weight and bias, a batch norm's statistics,
      a depthwise convolution, a layer scale, ...): the axis keeps exactly `kept`;
    - `readers`: ``"name:axis"`` of a consumer's weight (a convolution or linear layer called with these channels):
      the axis keeps `kept`, or the layer's `input` subselection picks its channels from them;
    - `norms`: norms pruned through (`LayerSpec.normalises`) that normalise over these channels;
    - `unit`: channels that go together (an attention head's ``head_dim``): `kept` holds whole units;
    - `heads`: units that are an attention's query or key/value heads (`HeadsAt`);
    - `repeated_in`: the first entry of the group whose units repeat these (grouped-query attention repeats each
      key/value head for its group of query heads);
    - `blocks`: dropped blocks (`PruningSpec.dropped_blocks`) that would read or write these channels if they ran.

    The applier checks every entry against the layer it names before anything changes, so a spec from which a
    layer, a field or an index was deleted or changed by hand is refused, not built into a model that fails or
    computes something else.
    """

    channels: tuple[Count, Count]
    kept: IndexRuns
    tensors: list[str] = msgspec.field(default_factory=list)
    readers: list[str] = msgspec.field(default_factory=list)
    norms: list[str] = msgspec.field(default_factory=list)
    unit: Annotated[int, msgspec.Meta(ge=1)] = 1
    heads: list[HeadsAt] = msgspec.field(default_factory=list)
    repeated_in: str | None = None
    blocks: list[str] = msgspec.field(default_factory=list)


class NormFold(_Struct):
    """A batch norm that, for inference, can be folded into the layer before it (since schema 1.2).

    The planner writes one wherever the norm reads the output of a convolution or linear layer `into` and nothing
    else reads that output. Folding is asked for when the spec is applied (`prune(..., fold_norms=True)`); the
    norm's scale and shift then go into the layer's weight and bias, and the norm becomes `nn.Identity`.
    """

    norm: str
    into: str


class DroppedBlock(_Struct):
    """A residual block the pruned model no longer runs (since schema 1.3): its output was its input plus a branch,
    so without it the input goes on. `how` it goes: "removed" from its `ModuleList` (the blocks after it move up
    one place, their state_dict keys too, and what counts them follows: each one's `layer_idx`, the model config's
    `num_hidden_layers` and `layer_types`), or replaced by an "identity" (every other key stays)."""

    module: str
    how: Literal["removed", "identity"]


ConfigValue = int | list[str] | None  # None: the key is not in the config


class Summary(_Struct):
    """Size of the model before and after pruning (multiply-accumulates for the example inputs)."""

    parameters_before: int
    parameters_after: int
    macs_before: int
    macs_after: int
    subselections: int

    def __str__(self) -> str:
        """One line for people (the JSON keeps the fields).

        >>> print(Summary(parameters_before=200, parameters_after=150, macs_before=4000, macs_after=3000,
        ...               subselections=1))
        parameters 200 -> 150 (-25.0%), MACs 4,000 -> 3,000 (-25.0%), 1 activation subselection(s)
        """
        return (
            f"parameters {change(self.parameters_before, self.parameters_after)}, "
            f"MACs {change(self.macs_before, self.macs_after)}, {self.subselections} activation subselection(s)"
        )


def change(before: int, after: int, arrow: str = "->") -> str:
    """Before -> after, with the relative change.

    >>> change(200, 150), change(0, 0), change(200, 150, "→")
    ('200 -> 150 (-25.0%)', '0 -> 0', '200 → 150 (-25.0%)')
    """
    percent = f" ({(after - before) / before * 100:+.1f}%)" if before else ""
    return f"{before:,} {arrow} {after:,}{percent}"


class PruningSpec(_Struct):
    """A compiled pruning request for one model: what to keep, per tensor and axis, and where to gather.

    A spec written by hand in code leaves `neighbours` None and is applied with the checks layer by layer; to be
    stored it needs them (an empty list: no channels shared by layers change).

    >>> spec = PruningSpec(model="Net", inputs=[], request=Request([], [], False, True),
    ...                    summary=Summary(10, 8, 100, 80, 0), layers={}, fingerprint={}, neighbours=[])
    >>> load_spec_bytes(spec.to_json()) == spec
    True
    """

    model: str
    inputs: list[InputInfo]
    request: Request
    summary: Summary
    layers: dict[str, LayerSpec]
    fingerprint: dict[str, TensorType]
    kept: list[KeptChannels] = msgspec.field(default_factory=list)
    norm_folds: list[NormFold] = msgspec.field(default_factory=list)
    dropped_blocks: list[DroppedBlock] = msgspec.field(default_factory=list)
    config: dict[str, tuple[ConfigValue, ConfigValue]] = msgspec.field(default_factory=dict)
    """Values of the model's configuration (a Hugging Face `config.json`) before and after pruning (since schema
    1.3): `num_hidden_layers` and `layer_types` when blocks are removed; `num_attention_heads`,
    `num_key_value_heads`, `intermediate_size` and `hidden_size` when every layer of the stack ends up the same
    size, so that the config alone describes the pruned model. Empty for a model without such a config."""
    tied: dict[str, str] = msgspec.field(default_factory=dict)
    """Tensors that modules share: each further name -> the first (tied input and output embeddings, which a
    checkpoint may store once; since schema 1.3)."""
    neighbours: list[Neighbours] | None = None
    """The groups of channels that layers share, for every activation whose channels change (see `Neighbours`;
    since schema 1.4, where it is required). None only in a spec migrated from an older version, which the applier
    checks layer by layer."""
    schema_version: str = SCHEMA_VERSION
    generator: str = "prunespec"

    def __repr__(self) -> str:
        """Short: the fields' own repr runs to megabytes on a large model.

        >>> PruningSpec(model="Net", inputs=[], request=Request([], [], False, True),
        ...             summary=Summary(10, 8, 100, 80, 0), layers={}, fingerprint={})
        <PruningSpec of Net, schema 1.4: 0 layers, parameters 10 -> 8 (-20.0%)>
        """
        s = self.summary
        return (
            f"<PruningSpec of {self.model}, schema {self.schema_version}: {len(self.layers)} layers, "
            f"parameters {change(s.parameters_before, s.parameters_after)}>"
        )

    def __str__(self) -> str:
        """What `print(spec)` shows: the model, the schema and mode, the summary and what else the spec holds.

        >>> print(PruningSpec(model="Net", inputs=[], request=Request([], [], False, True),
        ...                   summary=Summary(10, 8, 100, 80, 0), layers={}, fingerprint={}))
        pruning spec of Net (schema 1.4, unconstrained, reordered)
          parameters 10 -> 8 (-20.0%), MACs 100 -> 80 (-20.0%), 0 activation subselection(s)
          0 layers touched, 0 groups of channels kept, 0 batch norms to fold
        """
        mode = "constrained" if self.request.constrained else "unconstrained"
        mode += ", reordered" if self.request.reorder else ", not reordered"
        return (
            f"pruning spec of {self.model} (schema {self.schema_version}, {mode})\n  {self.summary}\n"
            f"  {len(self.layers)} layers touched, {len(self.kept)} groups of channels kept, "
            f"{len(self.norm_folds)} batch norms to fold"
        )

    def to_json(self) -> bytes:
        """Canonical JSON: the same spec always gives the same bytes."""
        return canonical_json(_ordered(self)).encode()

    def save(self, path: str | os.PathLike) -> None:
        """Write the spec atomically: either the whole file appears, or the old one stays."""
        write_atomic(path, self.to_json())


def _ordered(spec: PruningSpec) -> dict[str, Any]:
    """Builtins in reading order: version first, the long fingerprint last."""
    data = msgspec.to_builtins(spec)
    head = ["schema_version", "generator", "model", "inputs", "request", "summary", "kept", "dropped_blocks", "config",
            "layers", "norm_folds", "neighbours"]  # fmt: skip
    return {key: data[key] for key in head + [k for k in data if k not in head]}


# ---------------------------------------------------------------------------------------------- index runs


def encode_runs(indices: Sequence[int]) -> str:
    """Write indices as runs of consecutive ascending integers.

    >>> encode_runs([0, 1, 2, 3, 7, 9, 10, 5])
    '0-3,7,9-10,5'
    >>> encode_runs([])
    ''
    """
    if not len(indices):
        return ""
    parts: list[str] = []
    first = last = indices[0]
    for index in indices[1:]:
        if index - last != 1:  # the run from `first` ends at `last`
            parts.append(f"{first}-{last}" if first != last else str(first))
            first = index
        last = index
    parts.append(f"{first}-{last}" if first != last else str(first))
    return ",".join(parts)


def parse_runs(runs: str, where: str = "indices") -> list[tuple[int, int]]:
    """The runs as inclusive ``(first, last)`` pairs, without expanding them.

    >>> parse_runs('0-3,7,9-10')
    [(0, 3), (7, 7), (9, 10)]
    >>> parse_runs('4-2')
    Traceback (most recent call last):
    ...
    prunespec.errors.SpecError: indices: run '4-2' must go upwards (write it as '2-4' or list the indices)
    """
    if not isinstance(runs, str) or not re.fullmatch(_RUNS_PATTERN, runs):
        raise SpecError(f"{where}: {str(runs)[:40]!r} is not a list of index runs like '0-4,7'")
    pairs = []
    for part in runs.split(",") if runs else ():
        start, dash, stop = part.partition("-")
        try:
            lo = int(start)
            hi = int(stop) if dash else lo
        except ValueError:  # more digits than int() reads (sys.get_int_max_str_digits)
            raise SpecError(f"{where}: index {max(start, stop, key=len)[:20]}... is too large") from None
        if hi > MAX_INDEX:
            raise SpecError(f"{where}: index {hi} is too large")
        if dash and hi <= lo:
            raise SpecError(f"{where}: run {part!r} must go upwards (write it as '{hi}-{lo}' or list the indices)")
        pairs.append((lo, hi))
    return pairs


def decode_runs(runs: str, where: str = "indices") -> list[int]:
    """Read runs back into a list; `where` names the field in error messages.

    >>> decode_runs('0-3,7,9-10,5')
    [0, 1, 2, 3, 7, 9, 10, 5]
    """
    return [i for lo, hi in parse_runs(runs, where) for i in range(lo, hi + 1)]


_DIGITS = b"0123456789"
_SHAPE = bytes.maketrans(b"0123456789-", b"0000000000,")  # digits to '0', separators to ','


def well_formed_runs(runs: str) -> bool:
    """Whether `runs` matches `_RUNS_PATTERN`: the same test as the regex, in a few passes over bytes.

    >>> [well_formed_runs(r) for r in ("", "0-4,7", "1-2-3", "1,,2", "1-", "x", "\u0661")]
    [True, True, False, False, False, False, False]
    """
    if not runs:
        return True
    if not runs.isascii():
        return False
    data = runs.encode()
    separators = data.translate(None, _DIGITS)
    shape = data.translate(_SHAPE)
    return (
        not separators.translate(None, b",-")  # only digits, commas and dashes
        and b"--" not in separators  # at most one dash per run
        and shape[:1] == b"0" == shape[-1:]
        and b",," not in shape  # no empty number
    )


# ---------------------------------------------------------------------------------------------- JSON text


def canonical_json(value: Any, indent: int = 0) -> str:
    """Stable, diff-friendly JSON: containers of scalars on one line, everything else one item per line.

    >>> print(canonical_json({"a": {"w": ["0-3", None]}, "b": [1, 2]}))
    {
      "a": {"w": ["0-3", null]},
      "b": [1, 2]
    }
    """
    if isinstance(value, dict):
        if not value:
            return "{}"
        if _flat(value.values()):
            return "{" + ", ".join(f"{json.dumps(k)}: {canonical_json(v)}" for k, v in value.items()) + "}"
        pad = "  " * (indent + 1)
        items = [f"{pad}{json.dumps(k)}: {canonical_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(value, list):
        if _flat(value):
            return "[" + ", ".join(canonical_json(v) for v in value) + "]"
        pad = "  " * (indent + 1)
        return "[\n" + ",\n".join(pad + canonical_json(v, indent + 1) for v in value) + "\n" + "  " * indent + "]"
    return json.dumps(value, ensure_ascii=False)


def _flat(values) -> bool:
    """A container goes on one line when it holds only scalars, or lists of scalars."""
    return all(
        not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v))
        for v in values
    )


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` (plus a final newline) to `path` so that a failure leaves no partial file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data if data.endswith(b"\n") else data + b"\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` on success and is removed on failure."""
    path = Path(path)
    # Keep the real suffix last: some writers choose their format by it.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it what open() would
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------- reading


def load_spec(path: str | os.PathLike) -> PruningSpec:
    """Read a spec file. Never executes code: JSON only. Raises `SpecError` on anything unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read spec {str(path)!r}: {e.strerror or e}") from None
    return load_spec_bytes(data, source=str(path))


def load_spec_bytes(data: bytes, source: str = "spec") -> PruningSpec:
    """Parse, check the schema version, migrate older versions, and validate every field."""
    try:
        raw = msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the top level must be a JSON object with a 'schema_version' field")
    if raw.get("schema_version") == SCHEMA_VERSION and raw.get("neighbours") is None:
        # Only a migrated spec may lack the record of which layers share channels: without it the applier could
        # not tell a layer deleted from the spec by hand from one the plan leaves alone.
        raise SpecError(
            f"{source}: neighbours: a spec of schema {SCHEMA_VERSION} must list the channels its layers share "
            "(was the field deleted? plan again to write it)"
        )
    raw = _migrate(raw, source)
    try:
        spec = msgspec.convert(raw, type=PruningSpec)
    except msgspec.ValidationError as e:
        raise SpecError(f"{source}: {e}") from None
    _check_runs_are_well_formed(spec, source)
    return spec


def _check_runs_are_well_formed(spec: PruningSpec, source: str) -> None:
    """Raise `SpecError` at the first index runs field that does not match `_RUNS_PATTERN` (see `IndexRuns`)."""

    well_formed: set[str] = set()  # a spec repeats runs on many tensors: check each string once

    def check(runs: str, path: str) -> None:
        if runs not in well_formed:
            if not well_formed_runs(runs):
                raise SpecError(f"{source}: {path}: {runs[:40]!r} is not a list of index runs like '0-4,7'")
            well_formed.add(runs)

    for side in ("pruned_inputs", "pruned_outputs"):
        for i, request in enumerate(getattr(spec.request, side)):
            check(request.channels, f"request.{side}[{i}].channels")
    for side in ("pruned_heads", "pruned_kv_heads"):
        for i, unit in enumerate(getattr(spec.request, side)):
            check(unit.indices, f"request.{side}[{i}].indices")
    for i, kept in enumerate(spec.kept):
        check(kept.channels, f"kept[{i}].channels")
    for name, layer in spec.layers.items():
        for tensor, axes in layer.tensors.items():
            for axis, runs in enumerate(axes):
                if runs is not None:
                    check(runs, f"layers[{name!r}].tensors[{tensor!r}][{axis}]")
        if layer.input is not None:
            check(layer.input.indices, f"layers[{name!r}].input.indices")
        if layer.normalises is not None:
            check(layer.normalises.kept, f"layers[{name!r}].normalises.kept")
    for i, group in enumerate(spec.neighbours or ()):
        check(group.kept, f"neighbours[{i}].kept")


def _migrate(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Bring a spec of any version in `KNOWN_VERSIONS` up to `SCHEMA_VERSION`, one step per version.

    The policy. Versions are ``MAJOR.MINOR``. A new minor version only adds optional fields, so its migration
    step can leave them absent; its docstring says what an older file cannot supply. A new major version may change
    or remove fields, and its step rewrites them. Every version this reader has written stays readable, and
    `tests/test_versions.py` reads a stored spec of each.

    A version newer than this reader, a newer *minor* version included, is refused with the prunespec release that
    wrote the file: its new fields may change what the applier must do (the Structs forbid unknown fields for
    this reason), and applying it without them could build a wrong model without a word.

    >>> _migrate({"schema_version": "1.0", "generator": "prunespec 0.1.0"}, "spec")["schema_version"]
    '1.4'
    >>> _migrate({"schema_version": "1.5", "generator": "prunespec 0.5.0"}, "spec")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    prunespec.errors.SpecError: spec: schema_version 1.5 is newer than this prunespec reads (1.4); upgrade to ...
    """
    version = raw.get("schema_version")
    if not isinstance(version, str) or not re.fullmatch(r"[0-9]{1,9}\.[0-9]{1,9}", version):
        raise SpecError(f"{source}: 'schema_version' must be a string like {SCHEMA_VERSION!r}, got {version!r}")
    if _version_key(version) > _version_key(SCHEMA_VERSION):
        writer = raw.get("generator")
        release = re.fullmatch(r"prunespec ([0-9][0-9A-Za-z.+-]{0,40})", writer) if isinstance(writer, str) else None
        needed = f"prunespec {release[1]} (which wrote it) or later" if release else "a release that reads it"
        raise SpecError(
            f"{source}: schema_version {version} is newer than this prunespec reads ({SCHEMA_VERSION}); "
            f"upgrade to {needed}"
        )
    if version not in KNOWN_VERSIONS:
        raise SpecError(f"{source}: unknown schema_version {version}; known versions are {', '.join(KNOWN_VERSIONS)}")
    for older, step in _MIGRATIONS.items():
        if _version_key(older) >= _version_key(version):
            raw = step(raw)
    return raw


def _version_key(version: str) -> tuple[int, int]:
    major, minor = version.split(".")
    return int(major), int(minor)


def _from_1_0(raw: dict[str, Any]) -> dict[str, Any]:
    """1.0 -> 1.1: layers gain `input_activation_channels` and `macs` (see `LayerSpec`); both stay absent.

    Lost: neither can be worked out from a 1.0 file. The activation sizes come from the traced data flow and the
    MACs from the example inputs' spatial sizes, which a spec does not hold. (A layer with a subselection has its
    activation size in `input.channels`, but a record of some consumers and not others would only look complete.)
    So a migrated spec is applied with the per-layer checks of 1.0 (a layer that disagrees with the data flow is
    found when the model runs, or by `prunespec validate --model`), and `show` has no per-layer MACs for it.
    Planning again records both.
    """
    return {**raw, "schema_version": "1.1"}


def _from_1_1(raw: dict[str, Any]) -> dict[str, Any]:
    """1.1 -> 1.2: the spec gains `norm_folds` (see `NormFold`), left empty.

    Lost: which batch norms can be folded comes from the traced data flow, which a 1.1 file does not hold. A
    migrated spec applies as before; asking it to fold norms folds none. Planning again records them.
    """
    return {**raw, "schema_version": "1.2"}


def _from_1_2(raw: dict[str, Any]) -> dict[str, Any]:
    """1.2 -> 1.3: requests gain `pruned_heads`, `pruned_kv_heads`, `through_norms` and `pruned_blocks`, layers
    `heads` and `normalises`, the spec `dropped_blocks`, `config` and `tied`, and kept channels the sides "heads"
    and "key_value_heads"; all stay empty.

    Lost: nothing. A 1.2 file was planned without heads, blocks, or pruning through norms.
    """
    return {**raw, "schema_version": "1.3"}


def _from_1_3(raw: dict[str, Any]) -> dict[str, Any]:
    """1.3 -> 1.4: the spec gains `neighbours` (see `Neighbours`), left None.

    Lost: which layers share channels comes from the traced data flow, which a 1.3 file does not hold. A migrated
    spec is applied with the checks of 1.3: each layer on its own, and each consumer against the activation size it
    records; a layer deleted from it by hand is found only when the model runs (`prunespec validate --model` runs
    it on meta tensors). Planning again records them.
    """
    return {**raw, "schema_version": "1.4", "neighbours": None}


# The step from each version to the next, oldest first; a new version adds one entry here and one to KNOWN_VERSIONS.
_MIGRATIONS = {"1.0": _from_1_0, "1.1": _from_1_1, "1.2": _from_1_2, "1.3": _from_1_3}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec file, generated from the Structs above."""
    schema = _canonical(msgspec.json.schema(PruningSpec))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"prunespec pruning spec, schema version {SCHEMA_VERSION}"
    return schema


def _canonical(node: Any) -> Any:
    r"""`node` the same whatever msgspec wrote it: versions differ in the indentation of the docstrings they copy
    into descriptions and in the order of `anyOf` alternatives, neither of which changes what the schema accepts.

    >>> _canonical({"anyOf": [{"type": "null"}, {"$ref": "#/$defs/A"}], "description": "One.\n\n    Two."})
    {'anyOf': [{'$ref': '#/$defs/A'}, {'type': 'null'}], 'description': 'One.\n\nTwo.'}
    """
    if isinstance(node, list):
        return [_canonical(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _canonical(value) for key, value in node.items()}
    if isinstance(out.get("description"), str):
        out["description"] = inspect.cleandoc(out["description"])
    if "anyOf" in out:
        out["anyOf"] = sorted(out["anyOf"], key=lambda alternative: json.dumps(alternative, sort_keys=True))
    return out


SCHEMA_PATH = Path(__file__).with_name("prunespec.schema.json")
