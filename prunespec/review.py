"""Review: what a spec does (`show`) and how two specs differ (`diff`), read from the spec files alone.

Start with `layer_rows`: one `LayerRow` per touched module, with its channels and tensor sizes before and after,
worked out from the spec's fingerprint (the shapes before) and its kept indices (the sizes after), and its MACs as
the planner recorded them (since schema 1.1). `render_show` prints them as text, markdown or JSON (and hands HTML
to `prunespec.report`). `diff_specs` compares two specs layer by layer and tensor axis by tensor axis, by the
*sets* of original indices they keep, so a reordering alone is told apart from a change of channels; `render_diff`
prints the result: the verdict first, then one line per group of a layer's tensors that keep the same indices,
with long index lists cut to their first runs and a count, and markdown cut to fit a GitHub comment. Nothing here
needs the model, torch or the planner.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

import msgspec

from prunespec.schemas import LayerSpec, PruningSpec, decode_runs, encode_runs, parse_runs
from prunespec.schemas.spec import change

FORMATS = ("text", "markdown", "json")
SHOW_FORMATS = (*FORMATS, "html")  # the page is made by prunespec.report


@dataclass
class LayerRow:
    """One touched module as `show` prints it; `None` where a count does not apply (a norm has no input side)."""

    name: str
    type: str
    inputs: tuple[int, int] | None  # input channels before, after
    outputs: tuple[int, int] | None  # output channels before, after
    elements: tuple[int, int]  # elements of the module's own tensors (parameters and buffers) before, after
    macs: tuple[int, int] | None  # multiply-accumulates before, after; None: it does none, or the spec predates 1.1
    subselection: str  # "", "slice" (one contiguous run: a view) or "gather" (a memory copy at run time)


def _shape(spec: PruningSpec, tensor: str) -> list[int] | None:
    """The shape of `tensor` before pruning, from the fingerprint (``'float32[64,3,7,7]'``)."""
    text = spec.fingerprint.get(tensor)
    if text is None:
        return None
    sizes = text[text.index("[") + 1 : -1]
    return [int(n) for n in sizes.split(",")] if sizes else []


def _kept_count(runs: str | None, size: int) -> int:
    """How many indices `runs` keeps out of `size` (all of them when the axis is not listed).

    >>> _kept_count("0-3,7", 8), _kept_count(None, 8)
    (5, 8)
    """
    if runs is None:
        return size
    return sum(hi - lo + 1 for lo, hi in parse_runs(runs))


def _join(module: str, local: str) -> str:
    return f"{module}.{local}" if module else local


def _channel_axes(layer: LayerSpec) -> tuple[int | None, int | None]:
    """Which axes of the weight hold the (input, output) channels of this module type."""
    if layer.type.startswith("ConvTranspose") or layer.type == "Conv1D":  # Conv1D: GPT-2's [in, out] linear layer
        return 0, 1
    if layer.type.startswith(("Conv", "Linear")) or layer.type == "Bilinear":
        return 1, 0
    return None, 0


def layer_rows(spec: PruningSpec) -> list[LayerRow]:
    """One row per touched module, in model order.

    >>> from prunespec.schemas import LayerSpec, PruningSpec, Request, Summary
    >>> spec = PruningSpec(model="Net", inputs=[], request=Request([], [], False, True),
    ...     summary=Summary(0, 0, 0, 0, 1), fingerprint={"c.weight": "float32[8,4,3,3]", "c.bias": "float32[8]"},
    ...     layers={"c": LayerSpec("Conv2d", {}, {"weight": ["0-5", "1-3"], "bias": ["0-5"]}, macs=(288, 162))})
    >>> row = layer_rows(spec)[0]
    >>> row.inputs, row.outputs, row.elements, row.macs, row.subselection
    ((4, 3), (8, 6), (296, 168), (288, 162), '')
    """
    rows = []
    for name, layer in spec.layers.items():
        elements_before = elements_after = 0
        for local, axes in layer.tensors.items():
            shape = _shape(spec, _join(name, local)) or []
            elements_before += math.prod(shape)
            after = [_kept_count(axes[a] if a < len(axes) else None, n) for a, n in enumerate(shape)]
            elements_after += math.prod(after)
        in_axis, out_axis = _channel_axes(layer)
        weight_shape = _shape(spec, _join(name, "weight"))
        weight_axes = layer.tensors.get("weight", [])
        inputs, outputs = (_channels(weight_shape, weight_axes, axis) for axis in (in_axis, out_axis))
        subselection = ""
        if layer.input is not None:
            indices = decode_runs(layer.input.indices)
            contiguous = indices == list(range(indices[0], indices[0] + len(indices))) if indices else True
            subselection = "slice" if contiguous else "gather"
        elements = (elements_before, elements_after)
        rows.append(LayerRow(name, layer.type, inputs, outputs, elements, layer.macs, subselection))
    return rows


def pruned_shapes(spec: PruningSpec) -> dict[str, tuple[int, ...]]:
    """The shape of every state_dict entry of the pruned model, by its key there, from the spec alone.

    >>> from prunespec.schemas import LayerSpec, PruningSpec, Request, Summary
    >>> spec = PruningSpec(model="Net", inputs=[], request=Request([], [], False, True),
    ...     summary=Summary(0, 0, 0, 0, 0), fingerprint={"c.weight": "float32[8,4,3,3]", "c.bias": "float32[8]"},
    ...     layers={"c": LayerSpec("Conv2d", {}, {"weight": ["0-5", "1-3"], "bias": ["0-5"]})})
    >>> pruned_shapes(spec)
    {'c.weight': (6, 3, 3, 3), 'c.bias': (6,)}
    """
    from prunespec.applier.blocks import renamed_key

    counts: dict[tuple[str, int], int] = {}  # tensors that share their indices share the runs: count them once

    def kept(runs: str | None, size: int) -> int:
        found = counts.get((runs, size))
        if found is None:
            found = counts[runs, size] = _kept_count(runs, size)
        return found

    shapes = {}
    for key in spec.fingerprint:
        now = renamed_key(spec, key)
        if now is None:
            continue
        module, _, local = key.rpartition(".")
        layer = spec.layers.get(module)
        axes = layer.tensors.get(local, []) if layer is not None else []
        shape = _shape(spec, key) or []
        shapes[now] = tuple(kept(axes[a] if a < len(axes) else None, n) for a, n in enumerate(shape))
    return shapes


def predates_layer_macs(spec: PruningSpec) -> bool:
    """Whether the spec has no per-layer MACs because it was written before schema 1.1 recorded them.

    Every spec planned since records MACs on each touched convolution and linear layer, and any pruned channel is
    made or read by one, so a spec with layers but no MACs on any comes from an older version.
    """
    return bool(spec.layers) and all(layer.macs is None for layer in spec.layers.values())


PREDATES_LAYER_MACS = "per-layer MACs: – (the spec was written before schema 1.1 and migrated; plan again for them)"


def _channels(shape: list[int] | None, axes: list[str | None], axis: int | None) -> tuple[int, int] | None:
    """Channels before and after along one axis of a weight of `shape` whose kept runs per axis are `axes`."""
    if axis is None or shape is None or axis >= len(shape):
        return None
    return shape[axis], _kept_count(axes[axis] if axis < len(axes) else None, shape[axis])


def arrow(pair: tuple[int, int] | None) -> str:
    """A count before → after, or one count when it did not change.

    >>> arrow((64, 48)), arrow((8, 8)), arrow(None)
    ('64 → 48', '8', '–')
    """
    if pair is None:
        return "–"
    return f"{pair[0]:,}" if pair[0] == pair[1] else f"{pair[0]:,} → {pair[1]:,}"


def describe_mode(spec: PruningSpec) -> str:
    """How the spec was planned: constrained or not, reordered or not, listed or zeroed channels."""
    request = spec.request
    mode = "constrained" if request.constrained else "unconstrained"
    mode += ", reordered" if request.reorder else ", not reordered"
    return mode + (", all-zero channels" if request.zeroed else ", named or chosen channels")


def relative_change(before: int, after: int) -> str:
    """Before → after with the relative change.

    >>> relative_change(200, 150)
    '200 → 150 (-25.0%)'
    """
    return change(before, after, "→")


def _table(head: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        escape = [[cell.replace("|", "\\|") for cell in row] for row in body]
        return [f"| {' | '.join(head)} |", f"|{'|'.join('---' for _ in head)}|"] + [
            f"| {' | '.join(row)} |" for row in escape
        ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *body]]


def layer_table(rows: list[LayerRow]) -> tuple[list[str], list[list[str]]]:
    """The head and body of the per-layer table `show` prints, as text cells."""
    head = ["layer", "type", "inputs", "outputs", "tensor elements", "MACs", "subselection"]
    body = [[r.name, r.type, arrow(r.inputs), arrow(r.outputs), arrow(r.elements), arrow(r.macs),
             r.subselection or "–"] for r in rows]  # fmt: skip
    return head, body


def unit_lines(spec: PruningSpec) -> list[tuple[str, list[str]]]:
    """What the spec does besides channels, as (title, lines): heads, norms over fewer channels, dropped blocks,
    and the config values that describe the pruned model."""
    sections = []
    heads = [(name, layer.heads) for name, layer in spec.layers.items() if layer.heads is not None]
    if heads:
        lines = []
        for name, h in heads:
            kv = f" (key/value heads {arrow(h.key_value)})" if h.key_value != h.query else ""
            lines.append(f"{name}: {arrow(h.query)}{kv}, head_dim {h.head_dim}")
        sections.append((f"attention heads ({len(heads)} attentions lose heads)", lines))
    norms = [(name, layer.normalises) for name, layer in spec.layers.items() if layer.normalises is not None]
    if norms:
        lines = [f"{name}: {arrow(n.channels)}" for name, n in norms]
        sections.append((f"norms that take their statistics over fewer channels ({len(norms)})", lines))
    if spec.dropped_blocks:
        how = {"removed": "removed from its list; the blocks after it move up one place", "identity": "an identity"}
        lines = [f"{b.module}: {how[b.how]}" for b in spec.dropped_blocks]
        sections.append((f"dropped blocks ({len(spec.dropped_blocks)})", lines))
    if spec.config:
        lines = [f"{key}: {_value(before)} → {_value(after)}" for key, (before, after) in spec.config.items()]
        sections.append(("config (the pruned model's config.json says)", lines))
    return sections


def kept_words(kept) -> str:
    """A kept group in words: ``layer1.0.conv1.weight input channels 3-4``, ``model.layers.0.self_attn heads 1``."""
    if kept.side in ("input", "output"):
        return f"{kept.tensor} {kept.side} channels {kept.channels}"
    return f"{kept.tensor} {kept.side.replace('_', ' ')} {kept.channels}"


def _value(value) -> str:
    if value is None:
        return "(absent)"
    if isinstance(value, list):
        return f"[{len(value)} entries]"
    return f"{value:,}"


def render_show(spec: PruningSpec, fmt: str = "text") -> str:
    """The summary `prunespec show` prints, as text, markdown, JSON or a self-contained HTML page."""
    if fmt == "html":
        from prunespec.report import render_html  # it imports this module

        return render_html(spec)
    rows = layer_rows(spec)
    s = spec.summary
    notes = [PREDATES_LAYER_MACS] if predates_layer_macs(spec) else []
    if fmt == "json":
        data = {
            "model": spec.model,
            "schema_version": spec.schema_version,
            "mode": describe_mode(spec),
            "layers": [asdict(row) for row in rows],
            "summary": {k: getattr(s, k) for k in s.__struct_fields__},
            "kept": [
                {"tensor": k.tensor, "side": k.side, "channels": k.channels, "reason": k.reason} for k in spec.kept
            ],
            "norm_folds": [{"norm": f.norm, "into": f.into} for f in spec.norm_folds],
            "heads": {n: msgspec.to_builtins(layer.heads) for n, layer in spec.layers.items() if layer.heads},
            "normalises": {
                n: msgspec.to_builtins(layer.normalises) for n, layer in spec.layers.items() if layer.normalises
            },
            "dropped_blocks": msgspec.to_builtins(spec.dropped_blocks),
            "config": msgspec.to_builtins(spec.config),
            "notes": notes,
        }
        return json.dumps(data, indent=2)
    markdown = fmt == "markdown"
    head, body = layer_table(rows)
    gathers = sum(r.subselection == "gather" for r in rows)
    slices = sum(r.subselection == "slice" for r in rows)
    lines = [
        f"{'## ' if markdown else ''}{spec.model} (schema {spec.schema_version}, {describe_mode(spec)})",
        "",
        *_table(head, body, markdown),
        "",
        f"parameters: {relative_change(s.parameters_before, s.parameters_after)}",
        f"MACs:       {relative_change(s.macs_before, s.macs_after)}",
        (
            f"layers touched: {len(rows)}; activation subselections: {s.subselections} ({slices} slices, {gathers} "
            "gathers: a gather copies the activation at run time)"
        ),
        f"batch norms that can be folded for inference (apply --fold-norms): {len(spec.norm_folds)}",
        *notes,
    ]
    for title, section in unit_lines(spec):
        lines += ["", f"{title}:", *(f"{'- ' if markdown else '  '}{line}" for line in section)]
    if spec.kept:
        lines += ["", f"kept {len(spec.kept)} group(s) of the channels or heads asked for:"]
        lines += [f"  {kept_words(k)}: {k.reason}" for k in spec.kept]
    if markdown:
        lines = [line if line.startswith(("|", "#")) or not line else line + "  " for line in lines]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- diff


MARKDOWN_LIMIT = 65_536  # the most characters a GitHub comment holds
SHOWN_RUNS = 12  # index runs (and tensors) a summarised list shows before "… and N more"


@dataclass
class AxisChange:
    """One tensor axis whose kept indices differ between the two specs."""

    layer: str
    tensor: str  # the layer's own name for it: "weight", "running_mean"
    axis: int
    kept: tuple[int, int]  # how many indices OLD and NEW keep
    dropped: list[int]  # original indices NEW removes that OLD kept
    restored: list[int]  # original indices NEW keeps that OLD removed
    reordered: bool  # same indices, another order


@dataclass
class TensorTypeChange:
    """A tensor of the fingerprints that the two planned models do not share as it is (None: that model lacks it)."""

    tensor: str
    old: str | None
    new: str | None


@dataclass
class SpecDiff:
    """Everything `diff` reports; `equal` when the two specs prune the same model the same way."""

    models: tuple[str, str]  # the model each spec names
    fingerprint: list[TensorTypeChange] = field(default_factory=list)  # empty: planned for the same model
    added: list[str] = field(default_factory=list)  # layers only NEW touches
    removed: list[str] = field(default_factory=list)  # layers only OLD touches
    changed: list[str] = field(default_factory=list)  # layers both touch, differently; in model order
    axes: list[AxisChange] = field(default_factory=list)
    other: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # layer -> (what, how): attributes, input
    summary: dict[str, tuple[int, int]] = field(default_factory=dict)  # summary field -> (old, new), when different
    request: list[str] = field(default_factory=list)  # what differs in the request, in words
    model: list[str] = field(default_factory=list)  # what differs beyond layers (dropped blocks, config), in words

    @property
    def same_model(self) -> bool:
        return not self.fingerprint

    @property
    def equal(self) -> bool:
        differ = self.added or self.removed or self.changed or self.summary or self.request or self.model
        return self.same_model and not differ


def _runs_or_all(runs: str | None, size: int) -> list[int]:
    return list(range(size)) if runs is None else decode_runs(runs)


def _indices(indices: list[int], cap: int | None = SHOWN_RUNS) -> str:
    """Indices as ascending runs for a message; past `cap` runs, a count and the first `cap` (None: all of them).

    >>> _indices([5, 1, 2, 3])
    '1-3,5'
    >>> _indices(list(range(0, 40, 2)), cap=3)
    '20: 0,2,4 … and 17 more'
    """
    runs = encode_runs(sorted(indices)).split(",") if indices else []
    if cap is None or len(runs) <= cap:
        return ",".join(runs) or "none"
    shown = ",".join(runs[:cap])
    return f"{len(indices)}: {shown} … and {len(indices) - _kept_count(shown, 0)} more"


def diff_specs(old: PruningSpec, new: PruningSpec) -> SpecDiff:
    """Compare two specs by what they do to the model.

    >>> from prunespec.schemas import LayerSpec, PruningSpec, Request, Summary
    >>> def spec(runs):
    ...     return PruningSpec(model="Net", inputs=[], request=Request([], [], False, True),
    ...         summary=Summary(0, 0, 0, 0, 0), fingerprint={"c.weight": "float32[8,4]"},
    ...         layers={"c": LayerSpec("Linear", {}, {"weight": [runs]})})
    >>> d = diff_specs(spec("0-5"), spec("0-3,6"))
    >>> d.equal, d.changed, d.axes[0].dropped, d.axes[0].restored
    (False, ['c'], [4, 5], [6])
    >>> diff_specs(spec("0-5"), spec("0-5")).equal
    True
    """
    result = SpecDiff(models=(old.model, new.model))
    for name in dict.fromkeys([*old.fingerprint, *new.fingerprint]):
        types = old.fingerprint.get(name), new.fingerprint.get(name)
        if types[0] != types[1]:
            result.fingerprint.append(TensorTypeChange(name, *types))
    result.request = _request_changes(old, new)
    result.added = [name for name in new.layers if name not in old.layers]
    result.removed = [name for name in old.layers if name not in new.layers]
    for name in (n for n in new.layers if n in old.layers):
        axes = _axis_changes(old, new, name)
        other = _other_changes(old.layers[name], new.layers[name])
        if axes or other:
            result.changed.append(name)
            result.axes += axes
        if other:
            result.other[name] = other
    for key in old.summary.__struct_fields__:
        before, after = getattr(old.summary, key), getattr(new.summary, key)
        if before != after:
            result.summary[key] = (before, after)
    blocks = [{b.module: b.how for b in spec.dropped_blocks} for spec in (old, new)]
    for module in dict.fromkeys([*blocks[0], *blocks[1]]):
        if blocks[0].get(module) != blocks[1].get(module):
            result.model.append(f"block {module}: {blocks[0].get(module, 'kept')} → {blocks[1].get(module, 'kept')}")
    for key in dict.fromkeys([*old.config, *new.config]):
        a, b = old.config.get(key, (None, None))[1], new.config.get(key, (None, None))[1]
        if a != b:
            result.model.append(f"config {key}: {_value(a)} → {_value(b)}")
    return result


def _axis_changes(old: PruningSpec, new: PruningSpec, name: str) -> list[AxisChange]:
    """The tensor axes of layer `name` whose kept indices differ; shapes from NEW's fingerprint, else OLD's."""
    a, b = old.layers[name], new.layers[name]
    changes = []
    for local in dict.fromkeys([*a.tensors, *b.tensors]):
        axes_a, axes_b = a.tensors.get(local, []), b.tensors.get(local, [])
        shape = _shape(new, _join(name, local)) or _shape(old, _join(name, local)) or []
        for axis, size in enumerate(shape):
            runs_a = axes_a[axis] if axis < len(axes_a) else None
            runs_b = axes_b[axis] if axis < len(axes_b) else None
            if runs_a == runs_b:
                continue
            kept_a, kept_b = _runs_or_all(runs_a, size), _runs_or_all(runs_b, size)
            dropped = sorted(set(kept_a) - set(kept_b))
            restored = sorted(set(kept_b) - set(kept_a))
            reordered = not dropped and not restored
            changes.append(AxisChange(name, local, axis, (len(kept_a), len(kept_b)), dropped, restored, reordered))
    return changes


def _other_changes(a: LayerSpec, b: LayerSpec) -> list[tuple[str, str]]:
    """What else differs in a layer, as (what, how) pairs: its attributes and its input subselection."""
    changes = []
    if a.attributes != b.attributes:
        keys = dict.fromkeys([*a.attributes, *b.attributes])
        how = [f"{k} {a.attributes.get(k, '–')} → {b.attributes.get(k, '–')}" for k in keys
               if a.attributes.get(k) != b.attributes.get(k)]  # fmt: skip
        changes.append(("attributes", ", ".join(how)))
    if a.input != b.input:
        changes.append(("input subselection", f"{_subselection(a)} → {_subselection(b)}"))
    if a.heads != b.heads:
        changes.append(("heads", f"{_heads(a)} → {_heads(b)}"))
    if a.normalises != b.normalises:
        changes.append(("normalises", f"{_norm(a)} → {_norm(b)}"))
    return changes


def _heads(layer: LayerSpec) -> str:
    h = layer.heads
    return "all kept" if h is None else f"{h.query[1]} of {h.query[0]} (key/value {h.key_value[1]} of {h.key_value[0]})"


def _norm(layer: LayerSpec) -> str:
    n = layer.normalises
    return "all channels" if n is None else f"{n.channels[1]} of {n.channels[0]} channels"


def _request_changes(old: PruningSpec, new: PruningSpec) -> list[str]:
    """What differs between the two requests, in words: the export mode's flags and the tensors asked about."""
    a, b = old.request, new.request
    flags = ("constrained", "reorder", "zeroed", "through_norms", "uniform")
    words = [f"{key} {getattr(a, key)} → {getattr(b, key)}" for key in flags if getattr(a, key) != getattr(b, key)]
    for key in ("pruned_heads", "pruned_kv_heads"):
        asked_a = {r.module: r.indices for r in getattr(a, key)}
        asked_b = {r.module: r.indices for r in getattr(b, key)}
        differ = sum(asked_a.get(m) != asked_b.get(m) for m in asked_a.keys() | asked_b.keys())
        if differ:
            words.append(f"{key.replace('_', ' ')}: {differ} of {len(asked_a.keys() | asked_b.keys())} modules differ")
    if a.pruned_blocks != b.pruned_blocks:
        words.append(f"pruned blocks: {', '.join(a.pruned_blocks) or 'none'} → {', '.join(b.pruned_blocks) or 'none'}")
    for key in ("pruned_inputs", "pruned_outputs"):
        asked_a = {r.tensor: r.channels for r in getattr(a, key)}
        asked_b = {r.tensor: r.channels for r in getattr(b, key)}
        differ = sum(asked_a.get(t) != asked_b.get(t) for t in asked_a.keys() | asked_b.keys())
        if differ:
            words.append(f"{key.replace('_', ' ')}: {differ} of {len(asked_a.keys() | asked_b.keys())} tensors differ")
    return words


def _subselection(layer: LayerSpec) -> str:
    if layer.input is None:
        return "none"
    return f"{len(decode_runs(layer.input.indices))} of {layer.input.channels}"


def _fingerprint_counts(d: SpecDiff) -> str:
    """How the two fingerprints differ, in counts.

    >>> d = SpecDiff(("a", "b"), [TensorTypeChange("x", "f32[2]", "f32[3]"), TensorTypeChange("y", None, "f32[1]")])
    >>> _fingerprint_counts(d)
    '1 tensor differs in shape or dtype, 0 only in a, 1 only in b'
    """
    both = sum(c.old is not None and c.new is not None for c in d.fingerprint)
    only_old = sum(c.new is None for c in d.fingerprint)
    only_new = sum(c.old is None for c in d.fingerprint)
    tensors = "tensor differs" if both == 1 else "tensors differ"
    return f"{both} {tensors} in shape or dtype, {only_old} only in {d.models[0]}, {only_new} only in {d.models[1]}"


def verdict(d: SpecDiff) -> str:
    """The line that opens every diff: same, differ, or planned for different models (and which)."""
    if d.equal:
        return "same: both specs prune the model the same way"
    if d.same_model:
        lead = "differ"
    elif d.models[0] == d.models[1]:
        lead = f"planned for different models: both name {d.models[0]}, but {_fingerprint_counts(d)}"
    else:
        lead = f"planned for different models: {d.models[0]} and {d.models[1]} ({_fingerprint_counts(d)})"
    parts = []
    if d.changed or d.added or d.removed:
        parts.append(f"{len(d.changed)} layers changed, {len(d.added)} added, {len(d.removed)} removed")
    for key, label in (("parameters_after", "parameters"), ("macs_after", "MACs"), ("subselections", "subselections")):
        if key in d.summary:
            before, after = d.summary[key]
            parts.append(f"{label} {before:,} → {after:,} ({after - before:+,})")
    if d.model:
        parts.append(f"{len(d.model)} block or config changes")
    if d.request and not parts:
        parts.append("the request differs but the result is the same")
    if not parts:
        return lead
    return f"{lead}{': ' if d.same_model else '; '}{'; '.join(parts)}"


def _layer_changes(d: SpecDiff, cap: int | None) -> dict[str, list[tuple[str, str]]]:
    """Per changed layer, (what, how) pairs: tensors that lose the same indices along the same axis share one.

    >>> d = SpecDiff(("m", "m"), changed=["bn"], axes=[AxisChange("bn", t, 0, (8, 6), [1, 5], [], False)
    ...     for t in ("weight", "bias")])
    >>> _layer_changes(d, cap=None)
    {'bn': [('weight, bias axis 0', 'keeps 8 → 6, drops 1,5')]}
    """
    groups: dict[str, dict[tuple, list[AxisChange]]] = {name: {} for name in d.changed}
    for c in d.axes:
        key = (c.axis, c.kept, tuple(c.dropped), tuple(c.restored), c.reordered)
        groups[c.layer].setdefault(key, []).append(c)
    result = {}
    for name, by_change in groups.items():
        pairs = []
        for same in by_change.values():
            c = same[0]
            how = f"reordered, keeps {c.kept[1]}" if c.reordered else f"keeps {c.kept[0]} → {c.kept[1]}"
            if c.dropped:
                how += f", drops {_indices(c.dropped, cap)}"
            if c.restored:
                how += f", restores {_indices(c.restored, cap)}"
            pairs.append((f"{', '.join(x.tensor for x in same)} axis {c.axis}", how))
        result[name] = pairs + d.other.get(name, [])
    return result


def render_diff(d: SpecDiff, fmt: str = "text", names: tuple[str, str] = ("OLD", "NEW"), full: bool = False) -> str:
    """The report `prunespec diff` prints: the verdict first, then what differs, layer by layer.

    Long index lists show their first runs and a count, unless `full`. Markdown stays under `MARKDOWN_LIMIT`
    characters (a GitHub comment) even when `full`: what does not fit is cut, with a note that says how to get it.
    JSON is always complete.
    """
    if fmt == "json":
        data = asdict(d) | {"same_model": d.same_model, "equal": d.equal, "verdict": verdict(d)}
        return json.dumps(data, indent=2)
    markdown = fmt == "markdown"
    cap = None if full else SHOWN_RUNS
    code = (lambda name: f"`{name}`") if markdown else (lambda name: name)
    first, _, rest = verdict(d).partition(": ")
    lines = [f"**{first}**{': ' + rest if rest else ''}", ""] if markdown else [verdict(d)]
    lines += [f"prunespec diff {code(names[0])} → {code(names[1])}", ""]
    blocks: list[tuple[str, list[str]]] = []
    if d.summary:
        blocks.append(("summary", [f"{key}: {relative_change(*pair)}" for key, pair in d.summary.items()]))
    if d.request:
        blocks.append(("request", d.request))
    if d.model:
        blocks.append(("blocks and config", d.model))
    if d.fingerprint:
        shown = d.fingerprint if cap is None else d.fingerprint[:cap]
        items = [f"{code(c.tensor)}: {c.old or 'absent'} → {c.new or 'absent'}" for c in shown]
        if len(shown) < len(d.fingerprint):
            items.append(f"… and {len(d.fingerprint) - len(shown)} more (--full lists them)")
        blocks.append((f"fingerprints ({len(d.fingerprint)} tensors differ)", items))
    for title, layers in (("layers added", d.added), ("layers removed", d.removed)):
        if layers:
            blocks.append((f"{title} ({len(layers)})", [code(name) for name in layers]))
    for title, items in blocks:
        lines += [f"{title}:", *(f"{'- ' if markdown else '  '}{item}" for item in items), ""]
    changes = _layer_changes(d, cap)
    if changes:
        lines.append(f"layers changed ({len(changes)}):")
        if markdown:
            lines += ["", "| layer | tensors | change |", "|---|---|---|"]
            for name, pairs in changes.items():
                for i, (what, how) in enumerate(pairs):
                    row = [code(name) if i == 0 else "", what, how]
                    lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        else:
            lines += [f"  {name}: {what}: {how}" for name, pairs in changes.items() for what, how in pairs]
    text = "\n".join(lines).rstrip("\n") + "\n"
    return _fit(text, names) if markdown else text


def _fit(markdown: str, names: tuple[str, str]) -> str:
    """`markdown` cut at a line to stay under MARKDOWN_LIMIT characters, with a note on how to get the rest."""
    if len(markdown) < MARKDOWN_LIMIT:
        return markdown
    lines = markdown.splitlines()
    old, new = names if names[0] != names[1] else ("OLD", "NEW")
    note = (
        f"*Cut to fit a GitHub comment ({MARKDOWN_LIMIT:,} characters): {{}} more lines not shown. "
        f"`prunespec diff --full {old} {new}` prints all of it as text; `--format json` gives it as data.*"
    )
    room = MARKDOWN_LIMIT - len(note) - 40  # the count of lines and the blank line before the note
    kept = 0
    for line in lines:
        room -= len(line) + 1
        if room < 0:
            break
        kept += 1
    return "\n".join([*lines[:kept], "", note.format(f"{len(lines) - kept:,}")]) + "\n"


def git_diff_arguments(paths: list[str]) -> tuple[str, str] | None:
    """The OLD and NEW files when git runs prunespec as an external diff driver (seven arguments), else None.

    Git passes ``path old-file old-hex old-mode new-file new-hex new-mode``.

    >>> git_diff_arguments(["a.json", "/tmp/x", "abc", "100644", "a.json", "def", "100644"])
    ('/tmp/x', 'a.json')
    """
    if len(paths) == 7 and re.fullmatch(r"[0-7]{6}|\.", paths[3]) and re.fullmatch(r"[0-7]{6}|\.", paths[6]):
        return paths[1], paths[4]
    return None
