"""Channels split over several axes: attention heads, channel groups, the three parts of a fused projection.

Start with `split`. A view such as ``q.view(B, T, -1, head_dim)`` spreads one channel axis over several axes, and
after pruning the view is evaluated again on fewer channels. That stays exact only when the kept channels form a
*product*: for one *unit* dimension some entries are kept, and every other dimension keeps all of its entries.
Removing whole heads keeps ``head_dim`` whole; a channel shuffle removes the same position from every group.

Which dimension is the unit is not known at the view: it is decided by the first op that treats the others as
fixed (`split_rule`): a matrix product over ``head_dim``, a rotary embedding that cuts ``head_dim`` in halves, a
mean over a group of channels, a mask of one entry per head. Until then the `SplitMap` travels undecided through
transposes, copies and products with scalars. `decide` ties the channels of each unit together, so that they are
kept or removed as one slot, and turns the map into an ordinary `ChannelMap` on the unit's axis.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from prunespec.planner.graph import ChannelMap, SplitMap, SplitOrigin
from prunespec.planner.ops.base import ELEMENTWISE_OPS, RULES, SAME_SHAPE_OPS, arg, opaque, tensors
from prunespec.planner.verify import Suspect

if TYPE_CHECKING:
    from prunespec.planner.trace import Tracer


def split(tr: Tracer, cmap: ChannelMap, out: torch.Tensor, axes: list[int], sizes: tuple | None) -> None:
    """Label `out`, whose axes `axes` hold the channels of `cmap` split apart, with an undecided `SplitMap`."""
    written = tuple(sizes is not None and sizes[b] != -1 for b in axes)
    origin = SplitOrigin(tr.current_op, tr.op_counts[tr.current_op] - 1, tuple(axes), written, cmap.axis,
                         tr.running_module())  # fmt: skip
    tr.set_split(out, SplitMap(tuple(axes), tuple(out.shape[b] for b in axes), cmap.slots, origin))


def units(smap: SplitMap, dim: int) -> list[list[int]]:
    """The slots of each entry of split dimension `dim`, across all the other dimensions.

    >>> origin = SplitOrigin("view", 0, (1, 2), (False, True), 1, None)
    >>> units(SplitMap((1, 2), (2, 3), list(range(6)), origin), 0)
    [[0, 1, 2], [3, 4, 5]]
    >>> units(SplitMap((1, 2), (2, 3), list(range(6)), origin), 1)
    [[0, 3], [1, 4], [2, 5]]
    """
    n = smap.sizes[dim]
    stride = math.prod(smap.sizes[dim + 1 :])
    slots = smap.slots
    if stride == 1:  # every n-th slot
        return [slots[k::n] for k in range(n)]
    # Entry k holds `stride` consecutive slots in each block of n * stride (slices: these lists are long).
    blocks = range(0, len(slots), n * stride)
    return [[s for start in blocks for s in slots[start + k * stride : start + (k + 1) * stride]] for k in range(n)]


def decide(tr: Tracer, smap: SplitMap, dim: int) -> ChannelMap:
    """Make split dimension `dim` the unit: tie each of its entries' channels together, keep the others whole."""
    known = tr.decisions.get(id(smap.slots))
    if known is not None and known[0] is smap.slots and known[1] == (smap.sizes, dim):
        return ChannelMap(smap.axes[dim], known[2])
    members = units(smap, dim)
    for m in members:
        tr.slots.union_all([m[0]] * (len(m) - 1), m[1:])
    heads = [m[0] for m in members]
    tr.decisions[id(smap.slots)] = (smap.slots, (smap.sizes, dim), heads)
    origin = smap.origin
    if origin.written[dim]:
        why = f"is split into {smap.sizes[dim]} parts by '{origin.op}' with their count written as a number"
        factor = len(smap.slots) // smap.sizes[dim]
        tr.graph.suspects.append(
            Suspect(origin.op, origin.ordinal, origin.positions[dim], origin.axis, smap.slots, why, factor=factor)
        )
    return ChannelMap(smap.axes[dim], heads)


def choose(tr: Tracer, smap: SplitMap, allowed: list[int]) -> int | None:
    """The unit among the `allowed` split dimensions: one decided before for these channels, else one that needs
    no new ties (the channels along the others are tied already), else the one on the first tensor axis."""
    if not allowed:
        return None
    known = tr.decisions.get(id(smap.slots))
    if known is not None and known[0] is smap.slots and known[1][0] == smap.sizes and known[1][1] in allowed:
        return known[1][1]
    find = tr.slots.find
    for dim in allowed:
        if all(len({find(s) for s in m}) == 1 for m in units(smap, dim)):
            return dim
    return min(allowed, key=lambda d: smap.axes[d])


def split_rule(tr: Tracer, split_inputs: list[torch.Tensor], args, kwargs, out) -> None:
    """An op on tensors whose channels are split: carry the split on, or decide it and apply the op's own rule."""
    op = tr.current_op
    if not tensors(out):
        return  # a size, a dtype, a flag: nothing flows on
    if op in SPLIT_AWARE:
        return RULES[op](tr, args, kwargs, out)
    carry = CARRIERS.get(op)
    if carry is not None and carry(tr, args, kwargs, out):
        return
    for t in split_inputs:
        smap = tr.split_map(t)
        if smap is None:
            continue  # the same tensor twice among the arguments: decided already
        touched = touched_axes(op, t, args, kwargs, out)
        allowed = [d for d, a in enumerate(smap.axes) if touched is not None and a not in touched]
        dim = choose(tr, smap, allowed)
        if dim is None:
            why = f"is split into groups and passes through '{op}'"
            tr.slots.pin(smap.slots, why)
            tr.set(t, None, why)
        else:
            tr.set(t, decide(tr, smap, dim))
    RULES.get(op, opaque)(tr, args, kwargs, out)


def decided_on(tr: Tracer, t: torch.Tensor, axis: int) -> ChannelMap | None:
    """`t`'s channels on `axis`: its channel map if it has its channels there, or its split decided with the
    dimension on `axis` as the unit; None otherwise."""
    cmap = tr.channels(t)
    if cmap is not None:
        return cmap if cmap.axis == axis else None
    smap = tr.split_map(t)
    if smap is None or axis not in smap.axes:
        return None
    cmap = decide(tr, smap, smap.axes.index(axis))
    tr.set(t, cmap)
    return cmap


# Rules that take split inputs themselves (attention decides its inputs on the heads axis).
SPLIT_AWARE = {"scaled_dot_product_attention"}


# ------------------------------------------------------------------------------------------ carrying a split on


def _carry(tr: Tracer, x: torch.Tensor, out, landing: list[int] | None) -> bool:
    """Label `out` with `x`'s split moved to axes `landing`; False (nothing done) when there are none."""
    smap = tr.split_map(x)
    if landing is None or not isinstance(out, torch.Tensor):
        return False
    tr.set_split(out, SplitMap(tuple(landing), smap.sizes, smap.slots, smap.origin))
    return True


def _carry_same(tr: Tracer, args, kwargs, out) -> bool:
    x = arg(args, kwargs, 0, "input")
    if tr.split_map(x) is None or not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return False
    return _carry(tr, x, out, list(tr.split_map(x).axes))


def _carry_move(tr: Tracer, args, kwargs, out) -> bool:
    from prunespec.planner.ops.shapes import moved_axes

    x = arg(args, kwargs, 0, "input")
    smap = tr.split_map(x)
    if smap is None:
        return False
    return _carry(tr, x, out, moved_axes(tr.current_op, x, list(smap.axes), args, kwargs, out))


def _carry_index(tr: Tracer, args, kwargs, out) -> bool:
    from prunespec.planner.ops.shapes import index_map

    x = args[0]
    smap = tr.split_map(x)
    landing = index_map(args[1], x.shape) if smap is not None else None
    if landing is None or any(landing[a] is None or landing[a] < 0 for a in smap.axes):
        return False
    return _carry(tr, x, out, [landing[a] for a in smap.axes])


def _carry_reshape(tr: Tracer, args, kwargs, out) -> bool:
    """A view that keeps each split axis whole (and only reshapes the others) carries the split."""
    from prunespec.planner.ops.shapes import reshaped

    x = arg(args, kwargs, 0, "input")
    smap = tr.split_map(x)
    if smap is None or not isinstance(out, torch.Tensor):
        return False
    landing = []
    for a in smap.axes:
        kind, axes = reshaped(x.shape, out.shape, a)
        if kind != "moves":
            return False
        landing.append(axes[0])
    return _carry(tr, x, out, landing)


def _carry_elementwise(tr: Tracer, args, kwargs, out) -> bool:
    """A product with a scalar, or anything that broadcasts over every split axis, carries the split."""
    if not isinstance(out, torch.Tensor):
        return False
    operands = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    split = [t for t in operands if tr.split_map(t) is not None]
    first = tr.split_map(split[0])
    shift = out.ndim - split[0].ndim
    landing = [a + shift for a in first.axes]
    for t in operands:
        smap = tr.split_map(t)
        if smap is not None:
            if smap.slots is not first.slots or [a + out.ndim - t.ndim for a in smap.axes] != landing:
                return False
            continue
        for b in landing:
            axis = b - (out.ndim - t.ndim)
            if axis >= 0 and t.shape[axis] != 1:
                return False
    tr.set_split(out, SplitMap(tuple(landing), first.sizes, first.slots, first.origin))
    return True


def _carry_cat(tr: Tracer, args, kwargs, out) -> bool:
    """Joining along another axis, with nothing but empty parts or the same split beside it (a key/value cache)."""
    parts = [t for t in arg(args, kwargs, 0, "tensors") if not (t.ndim == 1 and t.numel() == 0)]
    dim = arg(args, kwargs, 1, "dim", 0) % out.ndim
    maps = [tr.split_map(t) for t in parts]
    if not parts or any(m is None or m.slots is not maps[0].slots or m.axes != maps[0].axes for m in maps):
        return False
    if dim in maps[0].axes:
        return False
    return _carry(tr, parts[0], out, list(maps[0].axes))


CARRIERS = {
    **dict.fromkeys(SAME_SHAPE_OPS, _carry_same),
    **dict.fromkeys(("permute", "transpose", "swapaxes", "moveaxis", "movedim", "unsqueeze", "squeeze", "expand",
                     "expand_as", "broadcast_to"), _carry_move),  # fmt: skip
    "__getitem__": _carry_index,
    **dict.fromkeys(("view", "reshape", "flatten", "unflatten"), _carry_reshape),
    **dict.fromkeys(ELEMENTWISE_OPS, _carry_elementwise),
    **dict.fromkeys(("cat", "concat", "concatenate"), _carry_cat),
}


# ------------------------------------------------------------------------------------------ what an op touches


def touched_axes(op: str, t: torch.Tensor, args, kwargs, out) -> set[int] | None:
    """The axes of `t` that `op` treats as a whole (reduces, cuts, multiplies against a full tensor), which must
    keep all their entries; None when the op is not known here, so every axis counts as touched."""
    from prunespec.planner.ops.elementwise import REDUCTIONS, reduced_dims
    from prunespec.planner.ops.shapes import CUT, index_map, reshaped

    ndim = t.ndim
    if op in REDUCTIONS:
        return reduced_dims(op, t, args, kwargs)[0]
    if op in ("softmax", "log_softmax"):
        dim = arg(args, kwargs, 1, "dim")
        return {dim % ndim} if isinstance(dim, int) else None
    if op == "__getitem__" and args and args[0] is t:
        landing = index_map(args[1], t.shape)
        return None if landing is None else {a for a, b in enumerate(landing) if b is None or b == CUT}
    if op in ELEMENTWISE_OPS and isinstance(out, torch.Tensor):
        touched = set()
        for other in (*args, *kwargs.values()):
            if isinstance(other, torch.Tensor) and other is not t:
                for a in range(ndim):
                    b = a - (ndim - other.ndim)
                    if b >= 0 and other.shape[b] != 1:
                        touched.add(a)
        return touched
    if op in ("cat", "concat", "concatenate", "chunk", "split", "unbind", "tensor_split", "stack"):
        dim = arg(args, kwargs, 1 if op in ("cat", "concat", "concatenate", "unbind", "stack") else 2, "dim", 0)
        return {dim % ndim}
    if op in ("matmul", "__matmul__", "__rmatmul__", "bmm"):
        first = args[1] if op == "__rmatmul__" else args[0]
        return {ndim - 1} if t is first else {ndim - 2}
    if op in ("linear", "layer_norm", "rms_norm"):
        normalized = arg(args, kwargs, 1, "normalized_shape") if op != "linear" else (0,)
        count = len(normalized) if isinstance(normalized, (tuple, list)) else 1
        return set(range(ndim - count, ndim))
    if op in ("view", "reshape", "flatten", "unflatten") and isinstance(out, torch.Tensor):
        return {a for a in range(ndim) if reshaped(t.shape, out.shape, a)[0] is None}
    if op in ("roll", "flip"):
        dims = arg(args, kwargs, 2 if op == "roll" else 1, "dims")
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        return {d % ndim for d in dims if isinstance(d, int)}
    return None

