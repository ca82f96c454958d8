"""Element-wise ops, pooling, reductions and softmax: ops that keep channels where they are, or mix them all.

Start with `elementwise`: broadcasting ops tie the channels of their full-size operands together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prunespec.planner.graph import ChannelMap
from prunespec.planner.ops.base import (
    ELEMENTWISE_OPS,
    SAME_SHAPE_OPS,
    arg,
    bind,
    opaque,
    rule,
    tensors,
    unary,
    untrack,
)

if TYPE_CHECKING:
    from prunespec.planner.trace import Tracer


@rule(*ELEMENTWISE_OPS)
def elementwise(tr: Tracer, args, kwargs, out) -> None:
    """Broadcasting element-wise ops tie the channels of all their full-size operands together.

    A model parameter that broadcasts along the channel axis (a layer scale) is bound to the channels; any other
    full-size tensor without labels (a constant made in forward) cannot shrink, so the channels are pinned.
    """
    if not isinstance(out, torch.Tensor):
        return opaque(tr, args, kwargs, out)
    operands = tensors((args, kwargs))
    labelled = [(t, tr.channels(t)) for t in operands if tr.channels(t) is not None]
    axes = {cmap.axis + out.ndim - t.ndim for t, cmap in labelled}
    if not labelled:
        return untrack(tr, out, operands[0] if operands else None)
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
        bind(tr, t, slots, "is combined with a fixed-size tensor made in forward", t_axis)
    tr.set(out, ChannelMap(axis, slots))


@rule("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "size", "dim", "numel")
def made_from_sizes(tr: Tracer, args, kwargs, out) -> None:
    """A tensor made from sizes given as numbers, or a size read off a tensor: no channels flow into it."""
    untrack(tr, out)


@rule(*SAME_SHAPE_OPS, "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like")
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
    """Pooling, resizing and padding act on the spatial axes only; channels stay at axis 1. Padding may pad any
    axes but the channels' (Swin pads its channels-last windows)."""
    results = tensors(out)
    if tr.current_op == "pad":
        widths = arg(args, kwargs, 1, "pad")
        padded = {x.ndim - 1 - i // 2 for i, w in enumerate(widths) if w}  # pairs from the last axis back
        if cmap.axis not in padded and all(t.shape[cmap.axis] == x.shape[cmap.axis] for t in results):
            return tr.set(out, cmap)
    if cmap.axis != 1 or any(t.ndim != x.ndim or t.shape[1] != x.shape[1] for t in results):
        return opaque(tr, args, kwargs, out, "is padded or resized along its channels")
    for t in results:
        tr.set(t, cmap)


# Where a reduction takes its dimensions and keepdim: (position of dim, position of keepdim), for positional calls.
REDUCTIONS = {
    "mean": (1, 2), "sum": (1, 2), "amax": (1, 2), "amin": (1, 2), "logsumexp": (1, 2), "var": (1, 3),
    "std": (1, 3), "norm": (2, 3), "vector_norm": (2, 3), "prod": (1, 2),
}  # fmt: skip


def reduced_dims(op: str, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[set[int], bool]:
    """The axes of `x` a reduction runs over (all of them when none are given) and its keepdim.

    >>> x = torch.empty(2, 3, 4, device="meta")
    >>> reduced_dims("mean", x, (x, -1), {"keepdim": True}), reduced_dims("norm", x, (x,), {"p": 2, "dim": (0, 1)})
    (({2}, True), ({0, 1}, False))
    """
    dim_at, keep_at = REDUCTIONS[op]
    dims = arg(args, kwargs, dim_at, "dim")
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not dims:
        return set(range(x.ndim)), bool(arg(args, kwargs, keep_at, "keepdim", False))
    return {d % x.ndim for d in dims}, bool(arg(args, kwargs, keep_at, "keepdim", False))


@rule(*REDUCTIONS)
@unary
def reduce(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Reductions over other axes keep the channels; a reduction over the channels mixes them all."""
    if not isinstance(out, torch.Tensor):
        return opaque(tr, args, kwargs, out, "is reduced over its channels")
    dims, keepdim = reduced_dims(tr.current_op, x, args, kwargs)
    if cmap.axis in dims:
        if not tr.through_norms:
            return opaque(tr, args, kwargs, out, "is reduced over its channels")
        tr.couple(cmap.slots, "is reduced over its channels")  # a norm's statistic, if the module is a norm
        return untrack(tr, out)
    shift = 0 if keepdim else sum(1 for d in dims if d < cmap.axis)
    tr.set(out, ChannelMap(cmap.axis - shift, cmap.slots))


@rule("softmax", "log_softmax")
@unary
def softmax(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Softmax over another axis keeps the channels; over the channels it mixes them."""
    dim = arg(args, kwargs, 1, "dim")
    if dim is None or dim % x.ndim == cmap.axis:
        return opaque(tr, args, kwargs, out, "goes through a softmax over its channels")
    tr.set(out, cmap)
