"""The rule registry and the helpers every rule uses.

A rule is ``rule(tracer, args, kwargs, out)``: it labels `out` with a `ChannelMap` and records producers, consumers
and bindings in the tracer's graph. `rule(...)` registers one under the names `TorchFunctionMode` sees (``conv2d``,
``add_``, ``__getitem__``). The one safety rule: a rule that cannot say exactly where every output channel comes
from calls `opaque`, which pins the slots of all inputs (they are kept) and leaves the output unlabelled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves

from prunespec.planner.graph import Binding, ChannelMap

if TYPE_CHECKING:
    from prunespec.planner.trace import Tracer

Rule = Callable[["Tracer", tuple, dict, Any], None]
RULES: dict[str, Rule] = {}

# Broadcasting element-wise ops, and ops whose output has the first argument's shape and channels (`elementwise`).
ELEMENTWISE_OPS = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "where", "maximum", "minimum",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "clamp", "clamp_", "clip", "pow", "__pow__", "masked_fill",
    "masked_fill_", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "lerp",
)  # fmt: skip
SAME_SHAPE_OPS = (
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "sigmoid", "sigmoid_", "tanh", "tanh_", "silu", "hardswish",
    "hardsigmoid", "gelu", "elu", "selu", "celu", "leaky_relu", "mish", "softplus", "neg", "abs", "exp", "log",
    "sqrt", "rsqrt", "square", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type_as",
    "__neg__",
)  # fmt: skip


def rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    """Argument `index` of a call, or its keyword `name`."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def opaque(tr: Tracer, args, kwargs, out, why: str | None = None) -> None:
    """Keep every channel that flows in; the output carries no channel information."""
    outputs = tensors(out)
    if not outputs:
        return  # sizes, dtypes, flags: nothing flows on
    why = why or f"passes through '{tr.current_op}', which the planner does not follow"
    tr.pin_inputs(args, kwargs, why)
    for t in outputs:
        tr.set(t, None, why.replace("passes through", "comes from", 1) if why.startswith("passes") else why)


def untrack(tr: Tracer, out, source=None) -> None:
    """Outputs of an unlabelled tensor stay unlabelled, and inherit the reason it is."""
    why = tr.why_unlabelled(source) if isinstance(source, torch.Tensor) else None
    for t in tensors(out):
        tr.set(t, None, why)


def unary(fn: Callable[..., None]) -> Rule:
    """For rules about one input tensor `x`: an unlabelled `x` gives unlabelled outputs, else `fn` decides.

    `fn(tr, x, cmap, args, kwargs, out)` receives `x` and its channel map.
    """

    def wrapped(tr: Tracer, args, kwargs, out) -> None:
        x = arg(args, kwargs, 0, "input")
        cmap = tr.channels(x)
        if cmap is None:
            return untrack(tr, out, x)
        return fn(tr, x, cmap, args, kwargs, out)

    wrapped.__doc__ = fn.__doc__
    return wrapped


def input_slots(tr: Tracer, x: torch.Tensor, axis: int) -> list[int]:
    """The slots a weight reads from `x` along `axis`; fresh pinned slots if `x` is not labelled there."""
    cmap = tr.channels(x)
    if cmap is not None and cmap.axis == axis:
        return cmap.slots
    if cmap is not None:
        tr.slots.pin(cmap.slots, "is read along another axis than its channels")
    return tr.slots.new(x.shape[axis], pin=tr.why_unlabelled(x))


def tie_groups(tr: Tracer, slots: list[int], groups: int) -> None:
    """Tie channel ``j`` of every one of `groups` equal parts of `slots` together."""
    size = len(slots) // groups
    for g in range(1, groups):
        tr.slots.union_all(slots[:size], slots[g * size : (g + 1) * size])


def bind(tr: Tracer, tensor, slots: list[int], why: str, axis: int = 0) -> None:
    """Axis `axis` of `tensor` follows `slots`; a tensor that is not the model's cannot be sliced, so they are
    pinned."""
    if tensor is None:
        return
    source = tr.tensor_of(tensor)
    parts = tr.joined_tensors(tensor) if source is None and axis == 0 else None
    if parts is not None and sum(n for _, n in parts) == len(slots):
        start = 0
        for part, n in parts:
            tr.graph.bindings.append(Binding(part, 0, slots[start : start + n]))
            start += n
    elif source is None or source[1][axis] is None:
        tr.slots.pin(slots, why)
    else:
        tr.graph.bindings.append(Binding(source[0], source[1][axis], slots))


def bind_bias(tr: Tracer, bias, slots: list[int]) -> None:
    bind(tr, bias, slots, "has a bias that is not a parameter of the model")


def label(tr: Tracer, t: torch.Tensor, axis: int, slots: list[int]) -> None:
    tr.set(t, ChannelMap(axis, slots))
