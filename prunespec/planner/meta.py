"""Outputs of common ops in a meta trace, made from the arguments' shapes instead of by the ops' meta kernels.

Start with `made_output`; `trace` calls it for every op of a meta run before running the op. Many meta kernels are
Python decompositions behind several wrappers: here a convolution costs about 0.1 ms, a broadcasting product or an
adaptive pooling 0.3 to 0.4 ms, a concatenation 0.5 ms, and a model makes hundreds of such calls, so they were most
of a trace. For the ops below the output's shape follows from the arguments in a line or two *when the arguments are
plain*: meta tensors, contiguous, all of one floating dtype. Then the output is contiguous too, with that dtype.
Anything else (channels-last tensors, mixed dtypes, an ``out=``, string padding, arguments the op would reject)
makes a maker return None, and the op's own meta kernel runs and raises what it raises.

`tests/test_meta.py` compares every maker with the real meta kernel, on plain and on unusual arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Maker = Callable[[str, tuple, dict], "torch.Tensor | None"]


def made_output(op: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The output of ``op(*args, **kwargs)`` on meta tensors, or None when it is not plain to see.

    >>> x = torch.empty(1, 8, 6, 6, device="meta")
    >>> made_output("conv2d", (x, torch.empty(4, 8, 3, 3, device="meta")), {"stride": 2}).shape
    torch.Size([1, 4, 2, 2])
    >>> made_output("cat", ([x, x],), {"dim": 1}).shape
    torch.Size([1, 16, 6, 6])
    >>> made_output("mul", (x, x.to(torch.float64)), {}) is None  # mixed dtypes: the meta kernel promotes
    True
    """
    maker = MAKERS.get(op)
    return maker(op, args, kwargs) if maker is not None else None


def _plain(*tensors: Any) -> bool:
    """Meta, contiguous, and all of one floating dtype."""
    return (
        all(
            isinstance(t, torch.Tensor) and t.is_meta and t.is_contiguous() and t.dtype == tensors[0].dtype
            for t in tensors
        )
        and tensors[0].dtype.is_floating_point
    )


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device="meta")


def _like_input(op: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Normalisations and activations: the input's shape and dtype; an in-place call returns its input."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or not x.is_meta:
        return None
    if op.endswith("_") or kwargs.get("inplace") is True:
        return x
    return _empty(x.shape, x)


def _broadcast(op: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``a + b``, ``a * b`` and the like: the operands' broadcast shape; in place, `a` itself."""
    if len(args) != 2 or set(kwargs) - {"alpha"}:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    numbers = [a for a in args if not isinstance(a, torch.Tensor)]
    if not tensors or not _plain(*tensors) or not all(isinstance(n, (int, float)) for n in numbers):
        return None
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError:
        return None
    if op.endswith("_"):
        return args[0] if isinstance(args[0], torch.Tensor) and args[0].shape == shape else None
    return _empty(shape, tensors[0])


def _cat(op: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``torch.cat``: the operands' shape, summed along `dim`."""
    if len(args) > 2 or set(kwargs) - {"tensors", "dim"}:
        return None
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors or not _plain(*tensors) or type(dim) is not int:
        return None
    first = tensors[0].shape
    if not -len(first) <= dim < len(first):
        return None
    dim %= len(first)
    if any(len(t.shape) != len(first) or _without(t.shape, dim) != _without(first, dim) for t in tensors):
        return None
    return _empty((*first[:dim], sum(t.shape[dim] for t in tensors), *first[dim + 1 :]), tensors[0])


def _without(shape: torch.Size, dim: int) -> tuple[int, ...]:
    return (*shape[:dim], *shape[dim + 1 :])


def _adaptive_pool(op: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``adaptive_avg_pool{1,2,3}d``: the input's leading dimensions, then the output size."""
    if len(args) > 2 or set(kwargs) - {"input", "output_size"}:
        return None
    bound = {**dict(zip(("input", "output_size"), args)), **kwargs}
    x, size, spatial = bound.get("input"), bound.get("output_size"), int(op[-2])
    if not _plain(x) or x.dim() not in (spatial + 1, spatial + 2):
        return None
    size = [size] * spatial if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else []
    if len(size) != spatial or not all(s is None or (type(s) is int and s > 0) for s in size):
        return None
    inner = x.shape[-spatial:]
    return _empty((*x.shape[:-spatial], *(i if s is None else s for s, i in zip(size, inner))), x)


_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _conv(op: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``conv{1,2,3}d``: ``(size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1`` per spatial axis."""
    if len(args) > len(_CONV_ARGUMENTS) or set(kwargs) - set(_CONV_ARGUMENTS):
        return None
    bound = {**dict(zip(_CONV_ARGUMENTS, args)), **kwargs}
    x, weight, bias, spatial = bound.get("input"), bound.get("weight"), bound.get("bias"), int(op[-2])
    if not _plain(x, weight, *([] if bias is None else [bias])) or x.dim() != spatial + 2 or weight.dim() != x.dim():
        return None
    groups = bound.get("groups", 1)
    if type(groups) is not int or groups < 1 or x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        return None
    stride = _per_axis(bound.get("stride", 1), spatial)
    padding = _per_axis(bound.get("padding", 0), spatial)
    dilation = _per_axis(bound.get("dilation", 1), spatial)
    if stride is None or padding is None or dilation is None or min(stride + dilation) < 1 or min(padding) < 0:
        return None
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return None
    sizes = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    ]
    return _empty((x.shape[0], weight.shape[0], *sizes), x) if min(sizes) > 0 else None


def _per_axis(value: Any, spatial: int) -> tuple[int, ...] | None:
    """An int or a sequence of `spatial` ints as a tuple; None for anything else (a string padding, say)."""
    values = (value,) * spatial if type(value) is int else tuple(value) if isinstance(value, (list, tuple)) else ()
    return values if len(values) == spatial and all(type(v) is int for v in values) else None


# Normalisations and activations: the output has the input's shape.
_SHAPED_LIKE_INPUT = [
    *("batch_norm", "instance_norm", "layer_norm", "group_norm", "softplus", "mish", "celu", "selu", "elu", "gelu"),
    *("relu", "relu_", "relu6", "hardtanh", "hardtanh_", "sigmoid", "sigmoid_", "tanh", "tanh_", "leaky_relu"),
    *("silu", "hardswish", "hardsigmoid", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout"),
    "feature_alpha_dropout",
]

MAKERS: dict[str, Maker] = {
    **dict.fromkeys(_SHAPED_LIKE_INPUT, _like_input),
    **dict.fromkeys(["add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"], _broadcast),
    "cat": _cat,
    **dict.fromkeys(["adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"], _adaptive_pool),
    **dict.fromkeys(["conv1d", "conv2d", "conv3d"], _conv),
}
