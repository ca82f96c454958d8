"""Per-op channel rules: how each torch function moves, mixes or creates channels.

`RULES` maps an op's name (as `TorchFunctionMode` sees it: ``conv2d``, ``add_``, ``__getitem__``) to a rule
``rule(tracer, args, kwargs, out)`` that labels `out` with a `ChannelMap` and records producers, consumers and
bindings in the tracer's graph. Start reading at `conv`, then `elementwise`.

The one safety rule: a rule that cannot say exactly where every output channel comes from calls `opaque`, which
pins the slots of all inputs (they are kept) and leaves the output unlabelled. An unlabelled tensor is treated as
fixed-size wherever it meets labelled channels, so nothing downstream of it is pruned either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves

from prunespec.planner.graph import Binding, ChannelMap, Consumer, Macs, Producer, SplitMap
from prunespec.planner.verify import Suspect, shape_arguments

if TYPE_CHECKING:
    from prunespec.planner.trace import Tracer

Rule = Callable[["Tracer", tuple, dict, Any], None]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def _arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def opaque(tr: Tracer, args, kwargs, out, why: str | None = None) -> None:
    """Keep every channel that flows in; the output carries no channel information."""
    outputs = _tensors(out)
    if not outputs:
        return  # sizes, dtypes, flags: nothing flows on
    why = why or f"passes through '{tr.current_op}', which the planner does not follow"
    tr.pin_inputs(args, kwargs, why)
    for t in outputs:
        tr.set(t, None, why.replace("passes through", "comes from", 1) if why.startswith("passes") else why)


def _untrack(tr: Tracer, out, source=None) -> None:
    """Outputs of an unlabelled tensor stay unlabelled, and inherit the reason it is."""
    why = tr.why_unlabelled(source) if isinstance(source, torch.Tensor) else None
    for t in _tensors(out):
        tr.set(t, None, why)


def unary(fn: Callable[..., None]) -> Rule:
    """For rules about one input tensor `x`: an unlabelled `x` gives unlabelled outputs, else `fn` decides.

    `fn(tr, x, cmap, args, kwargs, out)` receives `x` and its channel map.
    """

    def wrapped(tr: Tracer, args, kwargs, out) -> None:
        x = _arg(args, kwargs, 0, "input")
        cmap = tr.channels(x)
        if cmap is None:
            return _untrack(tr, out, x)
        return fn(tr, x, cmap, args, kwargs, out)

    wrapped.__doc__ = fn.__doc__
    return wrapped


# ------------------------------------------------------------------------------------------ producers/consumers


def _input_slots(tr: Tracer, x: torch.Tensor, axis: int) -> list[int]:
    """The slots a weight reads from `x` along `axis`; fresh pinned slots if `x` is not labelled there."""
    cmap = tr.channels(x)
    if cmap is not None and cmap.axis == axis:
        return cmap.slots
    if cmap is not None:
        tr.slots.pin(cmap.slots, "is read along another axis than its channels")
    return tr.slots.new(x.shape[axis], pin=tr.why_unlabelled(x))


def _mix(tr: Tracer, weight: str, bias, x, out, in_axis: int, out_axis: int, x_axis: int, y_axis: int, groups=1):
    """Record a weight that mixes input channels into new output channels (a producer and a consumer).

    With `groups > 1` every group must keep the same number of channels, so the planner ties channel `j` of each
    group to channel `j` of the others: they are kept or removed together, and the weight's per-group axis keeps
    the same positions for every group.
    """
    reads = _input_slots(tr, x, x_axis)
    made = tr.slots.new(out.shape[y_axis])
    no_gather = tr.why_no_gather(weight, x)
    per_group = None
    written = made
    if groups > 1:
        _tie_groups(tr, reads, groups)
        _tie_groups(tr, made, groups)
        no_gather = f"{weight} is a grouped convolution (groups={groups}); every group keeps the same positions"
        if in_axis == 1:
            per_group = len(reads) // groups  # [out, in/groups, *k]: the input axis counts one group
        else:
            written = made[: len(made) // groups]  # transposed: [in, out/groups, *k]
    tr.graph.consumers.append(Consumer(weight, in_axis, reads, no_gather=no_gather, per_group=per_group))
    tr.graph.producers.append(Producer(weight, out_axis, made))
    tr.graph.bindings.append(Binding(weight, out_axis, written))
    _bind_bias(tr, bias, made)
    tr.set(out, ChannelMap(y_axis, made))
    tr.made_by_layer(weight, bias, out)


def _tie_groups(tr: Tracer, slots: list[int], groups: int) -> None:
    size = len(slots) // groups
    for g in range(1, groups):
        tr.slots.union_all(slots[:size], slots[g * size : (g + 1) * size])


def _bind(tr: Tracer, tensor, slots: list[int], why: str) -> None:
    """Axis 0 of `tensor` follows `slots`; a tensor that is not the model's cannot be sliced, so they are pinned."""
    if tensor is None:
        return
    name = tr.name(tensor)
    if name is None:
        tr.slots.pin(slots, why)
    else:
        tr.graph.bindings.append(Binding(name, 0, slots))


def _bind_bias(tr: Tracer, bias, slots: list[int]) -> None:
    _bind(tr, bias, slots, "has a bias that is not a parameter of the model")


@rule("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv(tr: Tracer, args, kwargs, out) -> None:
    """Convolutions: a producer and a consumer when `groups == 1`, a per-channel user when depthwise.

    The weight is ``[out, in/groups, *k]``, or ``[in, out/groups, *k]`` for transposed convolutions.
    """
    x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    name = tr.name(weight)
    if name is None:
        return opaque(tr, args, kwargs, out, "is convolved with a weight that is not a model parameter")
    tr.calls[name] += 1
    transposed = "transpose" in tr.current_op
    c_in, c_out = x.shape[1], out.shape[1]
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    groups = c_out // weight.shape[1] if transposed else c_in // weight.shape[1]
    kernel = math.prod(weight.shape[2:])
    unit = (x.numel() // c_in if transposed else out.numel() // c_out) * kernel
    tr.graph.macs.append(Macs(name, unit))
    if groups == 1:
        return _mix(tr, name, bias, x, out, in_axis, out_axis, 1, 1)
    if groups == c_in == c_out:
        cmap = tr.channels(x)
        if cmap is None or cmap.axis != 1:
            return opaque(tr, args, kwargs, out)
        tr.graph.bindings.append(Binding(name, 0, cmap.slots))
        _bind_bias(tr, bias, cmap.slots)
        tr.made_by_layer(name, bias, out)
        return tr.set(out, cmap)
    _mix(tr, name, bias, x, out, in_axis, out_axis, 1, 1, groups=groups)


@rule("linear")
def linear(tr: Tracer, args, kwargs, out) -> None:
    """A linear layer mixes the last axis: weight ``[out, in]``."""
    x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    name = tr.name(weight)
    if name is None:
        return opaque(tr, args, kwargs, out, "is multiplied by a weight that is not a model parameter")
    tr.calls[name] += 1
    tr.graph.macs.append(Macs(name, out.numel() // out.shape[-1]))
    _mix(tr, name, bias, x, out, 1, 0, x.ndim - 1, out.ndim - 1)


@rule("batch_norm")
def batch_norm(tr: Tracer, args, kwargs, out) -> None:
    """Batch norm keeps channels one to one; its statistics and affine parameters follow them."""
    x = _arg(args, kwargs, 0, "input")
    cmap = tr.channels(x)
    if cmap is None or cmap.axis != 1:
        return opaque(tr, args, kwargs, out)
    for i, key in enumerate(("running_mean", "running_var", "weight", "bias"), start=1):
        _bind(tr, _arg(args, kwargs, i, key), cmap.slots, "is normalised with statistics that are not model tensors")
    tr.set(out, cmap)
    tr.normalised(x, _arg(args, kwargs, 1, "running_mean"))


@rule("instance_norm")
def instance_norm(tr: Tracer, args, kwargs, out) -> None:
    """Instance norm has per-channel statistics, like batch norm, and the same argument order."""
    batch_norm(tr, args, kwargs, out)


@rule("layer_norm", "group_norm")
def shared_statistics_norm(tr: Tracer, args, kwargs, out) -> None:
    """Layer and group norm compute statistics across channels: removing one would change the others.

    The channels they normalise together are kept; the output carries the same labels, so the layers after it can
    still drop what they do not read. A layer norm over other axes (channels outside the normalised shape) keeps
    its channels apart, and they stay free.
    """
    x = _arg(args, kwargs, 0, "input")
    cmap = tr.channels(x)
    if cmap is None:
        return _untrack(tr, out, x)
    if tr.current_op == "layer_norm":
        normalized = len(_arg(args, kwargs, 1, "normalized_shape"))
        first = x.ndim - normalized
        weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    else:
        first = 1
        weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    if cmap.axis >= first:
        tr.slots.pin(cmap.slots, f"is normalised together with other channels by {tr.current_op}")
        for t in (weight, bias):
            name = tr.name(t)
            if name is not None and t.ndim > cmap.axis - first:
                tr.graph.bindings.append(Binding(name, cmap.axis - first, cmap.slots))
    tr.set(out, cmap)


@rule("prelu")
def prelu(tr: Tracer, args, kwargs, out) -> None:
    """PReLU has one slope per channel (axis 1), or one shared slope."""
    x, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    cmap = tr.channels(x)
    if cmap is None:
        return _untrack(tr, out, x)
    if cmap.axis != 1 and weight.numel() != 1:
        return opaque(tr, args, kwargs, out)
    if weight.numel() != 1:
        _bind(tr, weight, cmap.slots, "has PReLU slopes that are not model parameters")
    tr.set(out, cmap)


@rule("multi_head_attention_forward", "_native_multi_head_attention")
def attention(tr: Tracer, args, kwargs, out) -> None:
    """Multi-head attention: the heads need the whole embedding, but the output projection is a producer.

    Query, key and value keep their channels (the per-head split and the 1/sqrt(head_dim) scale depend on the
    embedding size); the rows of ``out_proj`` are new channels that the layers after the attention may prune.
    """
    native = tr.current_op == "_native_multi_head_attention"
    in_weight = _arg(args, kwargs, 5, "qkv_weight" if native else "in_proj_weight")
    out_weight = _arg(args, kwargs, 7 if native else 11, "proj_weight" if native else "out_proj_weight")
    out_bias = _arg(args, kwargs, 8 if native else 12, "proj_bias" if native else "out_proj_bias")
    y = out[0] if isinstance(out, (tuple, list)) else out
    name = tr.name(out_weight)
    if name is None or not isinstance(y, torch.Tensor):
        return opaque(tr, args, kwargs, out)
    why = "is attended to by multi-head attention, whose heads need the whole embedding"
    unit = y.numel() // y.shape[-1]
    in_name = tr.name(in_weight)
    if in_name is not None:  # a consumer that cannot drop anything, so requests on it are reported
        query = _arg(args, kwargs, 0, "query")
        tr.graph.consumers.append(Consumer(in_name, 1, _input_slots(tr, query, query.ndim - 1), fixed=why))
        tr.graph.macs.append(Macs(in_name, unit))
    tr.pin_inputs(args, kwargs, why)
    _untrack(tr, out)
    tr.calls[name] += 1
    tr.graph.macs.append(Macs(name, unit))
    made = tr.slots.new(y.shape[-1])
    tr.graph.producers.append(Producer(name, 0, made))
    tr.graph.bindings.append(Binding(name, 0, made))
    _bind_bias(tr, out_bias, made)
    tr.set(y, ChannelMap(y.ndim - 1, made))


@rule("scaled_dot_product_attention")
def scaled_dot_product_attention(tr: Tracer, args, kwargs, out) -> None:
    """The output's channels are the value's, one to one; query and key channels are mixed into the scores."""
    query, key, value = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    tr.pin_inputs((query, key), {}, "is a query or key of scaled_dot_product_attention")
    cmap = tr.channels(value)
    if cmap is None or cmap.axis != value.ndim - 1 or out.shape[-1] != value.shape[-1]:
        return opaque(tr, args, kwargs, out, "is a value of scaled_dot_product_attention")
    tr.set(out, ChannelMap(out.ndim - 1, cmap.slots))


# ------------------------------------------------------------------------------------------ element-wise


@rule(
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "where", "maximum", "minimum",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "clamp", "clamp_", "clip", "pow", "__pow__",
)  # fmt: skip
def elementwise(tr: Tracer, args, kwargs, out) -> None:
    """Broadcasting element-wise ops tie the channels of all their full-size operands together.

    A model parameter that broadcasts along the channel axis (a layer scale) is bound to the channels; any other
    full-size tensor without labels (a constant made in forward) cannot shrink, so the channels are pinned.
    """
    if not isinstance(out, torch.Tensor):
        return opaque(tr, args, kwargs, out)
    operands = _tensors((args, kwargs))
    labelled = [(t, tr.channels(t)) for t in operands if tr.channels(t) is not None]
    axes = {cmap.axis + out.ndim - t.ndim for t, cmap in labelled}
    if not labelled:
        return _untrack(tr, out, operands[0] if operands else None)
    if len(axes) > 1:
        return opaque(tr, args, kwargs, out, "is combined with a tensor whose channels lie on another axis")
    axis = axes.pop()
    size = out.shape[axis]
    slots = None
    for t, cmap in labelled:
        if t.shape[cmap.axis] != size:
            tr.slots.pin(cmap.slots, "is broadcast across channels")
        elif slots is None:
            slots = cmap.slots
        else:
            tr.slots.union_all(slots, cmap.slots)
    if slots is None:
        return tr.set(out, None)
    for t in operands:
        if tr.channels(t) is not None:
            continue
        t_axis = axis - (out.ndim - t.ndim)
        if t_axis < 0 or t.shape[t_axis] == 1:
            continue  # broadcasts over the channels: nothing to slice
        name = tr.name(t)
        if name is None:
            tr.slots.pin(slots, "is combined with a fixed-size tensor made in forward")
        else:
            tr.graph.bindings.append(Binding(name, t_axis, slots))
    tr.set(out, ChannelMap(axis, slots))


@rule(
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "sigmoid", "sigmoid_", "tanh", "tanh_", "silu", "hardswish",
    "hardsigmoid", "gelu", "elu", "selu", "celu", "leaky_relu", "mish", "softplus", "neg", "abs", "exp", "log",
    "sqrt", "rsqrt", "square", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to",
)  # fmt: skip
@unary
def same(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Ops that keep every channel where it is: the output carries the first argument's labels."""
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return opaque(tr, args, kwargs, out)
    tr.set(out, cmap)


@rule(
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "max_pool2d_with_indices", "lp_pool2d", "interpolate", "upsample", "pad",
)  # fmt: skip
@unary
def spatial(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Pooling, resizing and padding act on the spatial axes only; channels stay at axis 1."""
    results = _tensors(out)
    if cmap.axis != 1 or any(t.ndim != x.ndim or t.shape[1] != x.shape[1] for t in results):
        return opaque(tr, args, kwargs, out, "is padded or resized along its channels")
    for t in results:
        tr.set(t, cmap)


# ------------------------------------------------------------------------------------------ structure


@rule("cat", "concat", "concatenate")
def cat(tr: Tracer, args, kwargs, out) -> None:
    """Concatenation along the channel axis lays the parts' channels end to end; along another axis it ties them."""
    parts = list(_arg(args, kwargs, 0, "tensors"))
    dim = _arg(args, kwargs, 1, "dim", 0) % out.ndim
    maps = [tr.channels(t) for t in parts]
    if all(m is None for m in maps):
        return tr.set(out, None)
    axes = {m.axis for m in maps if m is not None}
    if axes == {dim}:
        slots: list[int] = []
        for t, m in zip(parts, maps):
            slots += m.slots if m is not None else tr.slots.new(t.shape[dim], pin="is concatenated untracked")
        return tr.set(out, ChannelMap(dim, slots))
    if len(axes) == 1 and all(m is not None for m in maps):
        axis = axes.pop()
        for m in maps[1:]:
            tr.slots.union_all(maps[0].slots, m.slots)
        return tr.set(out, ChannelMap(axis, maps[0].slots))
    opaque(tr, args, kwargs, out, "is concatenated with tensors the planner cannot line up")


@rule("chunk", "split", "tensor_split", "unbind")
@unary
def chunk(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Splitting along other axes keeps the labels; ``chunk(n)`` along the channels splits them evenly.

    After pruning, ``chunk(n)`` still cuts the (smaller) tensor into n equal parts, so channel `j` of every part
    is tied to channel `j` of the others. Split sizes written as numbers would not shrink: those are opaque.
    """
    dim = _arg(args, kwargs, 2 if tr.current_op != "unbind" else 1, "dim", 0) % x.ndim
    parts = list(out) if isinstance(out, (tuple, list)) else [out]
    if dim != cmap.axis:
        for part in parts:
            tr.set(part, ChannelMap(cmap.axis - (tr.current_op == "unbind" and dim < cmap.axis), cmap.slots))
        return
    size = x.shape[dim]
    n = len(parts)
    if tr.current_op != "chunk" or size % n or any(p.shape[dim] != size // n for p in parts):
        return opaque(tr, args, kwargs, out, f"is split along its channels by '{tr.current_op}' with fixed sizes")
    step = size // n
    _tie_groups(tr, cmap.slots, n)
    for i, part in enumerate(parts):
        tr.set(part, ChannelMap(dim, cmap.slots[i * step : (i + 1) * step]))


@rule("flatten")
@unary
def flatten(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Flattening from the channel axis repeats each channel's label over the dimensions merged into it."""
    start = _arg(args, kwargs, 1, "start_dim", 0) % max(x.ndim, 1)
    end = _arg(args, kwargs, 2, "end_dim", -1) % max(x.ndim, 1)
    tr.set(out, _flattened(tr, x, cmap, start, end, args, kwargs, out))


def _flattened(tr: Tracer, x, cmap: ChannelMap, start: int, end: int, args, kwargs, out) -> ChannelMap | None:
    a = cmap.axis
    if end < a:
        return ChannelMap(a - (end - start), cmap.slots)
    if start > a or start == end:
        return cmap
    if start == a:
        inner = math.prod(x.shape[a + 1 : end + 1])
        return ChannelMap(a, [s for s in cmap.slots for _ in range(inner)])
    opaque(tr, args, kwargs, out, "is flattened together with the axes before its channels")
    return None


@rule("view", "reshape")
@unary
def reshape(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Reshapes that keep the channel axis whole, or flatten it into ``x.view(n, -1)``.

    The channel axis survives a reshape when some output axis has its size and the same product of sizes before
    it. The new shape is evaluated again after pruning: a channel size of ``-1`` follows; a number may come from
    ``x.shape`` at run time or be a constant the planner cannot see. Such a reshape is followed on trust and
    recorded as a *suspect*: `plan` checks the result and keeps these channels if the pruned model differs.
    """
    shape = shape_arguments(args, kwargs)
    if not isinstance(out, torch.Tensor) or len(shape) != out.ndim:
        return opaque(tr, args, kwargs, out)
    a = cmap.axis
    if _splits_channels(x, out, a):
        return _split(tr, cmap, shape, a, out)
    before = math.prod(x.shape[:a])
    for b in range(out.ndim):
        if math.prod(out.shape[:b]) == before and out.shape[b] == x.shape[a]:
            if shape[b] != -1:
                why = f"is reshaped by '{tr.current_op}' with its channel count written as a number"
                ordinal = tr.op_counts[tr.current_op] - 1
                tr.graph.suspects.append(Suspect(tr.current_op, ordinal, b, a, cmap.slots, why))
            return tr.set(out, ChannelMap(b, cmap.slots))
    if out.ndim == a + 1 and tuple(out.shape[:a]) == tuple(x.shape[:a]) and shape[a] == -1:
        return tr.set(out, _flattened(tr, x, cmap, a, x.ndim - 1, args, kwargs, out))
    opaque(tr, args, kwargs, out, "is reshaped in a way that would not follow pruning")


def _splits_channels(x: torch.Tensor, out, a: int) -> bool:
    """True for ``view(n, groups, c // groups, ...)``: the channel axis becomes two axes, nothing else changes."""
    return (
        isinstance(out, torch.Tensor)
        and out.ndim == x.ndim + 1
        and out.shape[:a] == x.shape[:a]
        and out.shape[a + 2 :] == x.shape[a + 1 :]
        and out.shape[a] > 1
        and out.shape[a + 1] > 1
    )


def _split(tr: Tracer, cmap: ChannelMap, shape: tuple, a: int, out: torch.Tensor) -> None:
    """Split the channels into groups; channel `j` of every group is tied to channel `j` of the others.

    Each group then keeps the same positions, so after pruning ``c // groups`` still splits the channels evenly
    and a shuffle of the pruned channels is the pruned shuffle.
    """
    groups = out.shape[a]
    _tie_groups(tr, cmap.slots, groups)
    if shape[a + 1] != -1:
        why = f"is split into groups by '{tr.current_op}' with the group size written as a number"
        ordinal = tr.op_counts[tr.current_op] - 1
        tr.graph.suspects.append(Suspect(tr.current_op, ordinal, a + 1, a, cmap.slots, why, factor=groups))
    tr.set_split(out, SplitMap(a, groups, cmap.slots))


def split_rule(tr: Tracer, split: list[torch.Tensor], args, kwargs, out) -> None:
    """Ops on channels split into groups: transposing the two axes, copying, and merging them back.

    Anything else keeps the channels (the op might depend on the grouping in ways the planner cannot see).
    """
    x = args[0] if args else None
    smap = tr.split_map(x)
    op = tr.current_op
    if smap is not None and split == [x] and isinstance(out, torch.Tensor):
        a = smap.axis
        if op in ("contiguous", "clone") and out.shape == x.shape:
            return tr.set_split(out, smap)
        if op in ("transpose", "swapaxes") and {d % x.ndim for d in args[1:3]} == {a, a + 1}:
            return tr.set_split(out, SplitMap(a, smap.groups, smap.slots, not smap.swapped))
        merges = out.ndim == x.ndim - 1 and out.shape[:a] == x.shape[:a] and out.shape[a + 1 :] == x.shape[a + 2 :]
        if op in ("view", "reshape") and merges:
            shape = shape_arguments(args, kwargs)
            if shape[a] != -1:
                why = f"is merged from groups by '{op}' with its channel count written as a number"
                tr.graph.suspects.append(Suspect(op, tr.op_counts[op] - 1, a, a, smap.slots, why, span=2))
            return tr.set(out, ChannelMap(a, _merged(smap)))
    for t in split:
        tr.slots.pin(tr.split_map(t).slots, f"is split into groups and passes through '{op}'")
    _untrack(tr, out)


def _merged(smap: SplitMap) -> list[int]:
    """Slots in the order the merged axis holds them.

    >>> _merged(SplitMap(1, 2, [0, 1, 2, 3, 4, 5], swapped=True))  # a shuffle of 2 groups of 3
    [0, 3, 1, 4, 2, 5]
    """
    if not smap.swapped:
        return smap.slots
    size = len(smap.slots) // smap.groups
    return [smap.slots[g * size + j] for j in range(size) for g in range(smap.groups)]


@rule("__getitem__")
@unary
def getitem(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Indexing that keeps every channel (``x[:, :, 1:]``, ``x[..., None]``) keeps the labels; else opaque."""
    axis = _index_axis(args[1], x.ndim, cmap.axis, x.shape[cmap.axis])
    if axis is None:
        return opaque(tr, args, kwargs, out, "is indexed or sliced along its channels")
    tr.set(out, ChannelMap(axis, cmap.slots))


def _index_axis(index, ndim: int, axis: int, size: int) -> int | None:
    """Where the channel axis lands after `tensor[index]`, or None when the index touches channels.

    >>> _index_axis((slice(None), slice(None), 0), 4, 1, 8), _index_axis((Ellipsis, None), 4, 1, 8)
    (1, 1)
    >>> _index_axis((slice(None), slice(0, 4)), 4, 1, 8) is None
    True
    """
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (torch.Tensor, list, bool)) for i in items):
        return None
    real = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        expanded += [slice(None)] * (ndim - real) if i is Ellipsis else [i]
    if Ellipsis not in items:
        expanded += [slice(None)] * (ndim - real)
    in_dim = out_dim = 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if in_dim == axis:
            full = isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1)
            if not (full and (i.stop is None or i.stop >= size)):
                return None
            return out_dim
        in_dim += 1
        out_dim += 0 if isinstance(i, int) else 1
    return None


@rule("mean", "sum", "amax", "amin")
@unary
def reduce(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Reductions over other axes keep the channels; a reduction over the channels mixes them all."""
    dims = _arg(args, kwargs, 1, "dim")
    keepdim = _arg(args, kwargs, 2, "keepdim", False)
    if dims is None or not isinstance(out, torch.Tensor):
        return opaque(tr, args, kwargs, out, "is reduced over its channels")
    dims = {d % x.ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    if cmap.axis in dims:
        return opaque(tr, args, kwargs, out, "is reduced over its channels")
    shift = 0 if keepdim else sum(1 for d in dims if d < cmap.axis)
    tr.set(out, ChannelMap(cmap.axis - shift, cmap.slots))


@rule("permute", "transpose", "swapaxes", "unsqueeze", "movedim")
@unary
def move_axes(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Axis moves carry the labels to the channel axis's new position."""
    # Apply the same move to a meta tensor whose only non-1 dimension is the channel axis.
    shape = [1] * x.ndim
    shape[cmap.axis] = 2
    probe = torch.empty(shape, device="meta")
    moved = getattr(probe, tr.current_op)(*args[1:], **kwargs)
    axes = [d for d, n in enumerate(moved.shape) if n == 2]
    if len(axes) != 1 or out.shape[axes[0]] != x.shape[cmap.axis]:
        return opaque(tr, args, kwargs, out, "is moved in a way the planner cannot follow")
    tr.set(out, ChannelMap(axes[0], cmap.slots))


@rule("roll", "flip")
@unary
def roll(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Rolling or flipping other axes (Swin's shifted windows) keeps the channels where they are."""
    dims = _arg(args, kwargs, 2 if tr.current_op == "roll" else 1, "dims")
    if dims is None or not isinstance(out, torch.Tensor):
        return opaque(tr, args, kwargs, out, f"is moved along its channels by '{tr.current_op}'")
    dims = {d % x.ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    if cmap.axis in dims:
        return opaque(tr, args, kwargs, out, f"is moved along its channels by '{tr.current_op}'")
    tr.set(out, cmap)


@rule("softmax", "log_softmax")
@unary
def softmax(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Softmax over another axis keeps the channels; over the channels it mixes them."""
    dim = _arg(args, kwargs, 1, "dim")
    if dim is None or dim % x.ndim == cmap.axis:
        return opaque(tr, args, kwargs, out, "goes through a softmax over its channels")
    tr.set(out, cmap)


@rule("__setitem__")
def setitem(tr: Tracer, args, kwargs, out) -> None:
    """Writing into a tensor in place changes it in ways the labels cannot describe."""
    tr.pin_inputs(args, kwargs, "is written in place with __setitem__")
    tr.set(args[0], None)
