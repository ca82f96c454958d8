"""Ops that move, cut, join and reshape tensors: the channels follow them to their new axis, or are kept.

Start with `reshape`: `align` finds where a view puts the channel axis. It may stay one axis, be merged with its
neighbours (each channel's label repeated over them; an expanded neighbour makes *copies*, see `graph.Repeat`), or be
split over several axes, which makes a `SplitMap` (see `splits`). Then `cat` and `chunk`, which lay channels end to
end or cut them into equal parts, and the axis moves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from prunespec.planner.graph import ChannelMap, Repeat
from prunespec.planner.ops import splits
from prunespec.planner.ops.base import arg, bind, opaque, rule, tie_groups, unary, untrack
from prunespec.planner.verify import Suspect, call_sizes

if TYPE_CHECKING:
    from prunespec.planner.trace import Tracer


# ------------------------------------------------------------------------------------------ reshaping


def align(before: Sequence[int], after: Sequence[int], axis: int) -> tuple[int, int, int, int] | None:
    """The smallest blocks ``before[i0:i1]``, holding `axis`, and ``after[j0:j1]`` that hold the same elements of a
    reshape from `before` to `after`: equal products before them and equal products of their own.

    >>> align((2, 3, 12), (2, 3, 4, 3), 2)  # 12 channels split into 4 x 3
    (2, 3, 2, 4)
    >>> align((2, 8, 5, 4), (16, 5, 4), 1)  # merged with the axis before
    (0, 2, 0, 1)
    >>> align((2, 6), (3, 4), 1)  # no smaller blocks hold the same elements
    (0, 2, 0, 2)
    """
    if 0 in before or 0 in after:
        return None
    inner = [1]
    for n in before:
        inner.append(inner[-1] * n)
    outer = [1]
    for n in after:
        outer.append(outer[-1] * n)
    if inner[-1] != outer[-1]:
        return None
    found = set(outer)
    i0 = max(i for i in range(axis + 1) if inner[i] in found)
    i1 = min(i for i in range(axis + 1, len(inner)) if inner[i] in found)
    j0 = max(j for j, p in enumerate(outer) if p == inner[i0])
    j1 = min(j for j, p in enumerate(outer) if p == inner[i1])
    if j1 < j0:
        return None
    return i0, i1, j0, j1


@rule("view", "reshape", "unflatten", "flatten")
@unary
def reshape(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """A view keeps the channel axis whole, merges it with its neighbours, or splits it over several axes.

    The new shape is evaluated again after pruning: a size of ``-1`` follows; a number may come from ``x.shape`` at
    run time or be a constant the planner cannot see. Such a view is followed on trust and recorded as a
    *suspect*: `plan` checks the result and keeps these channels if the pruned model differs.
    """
    if not isinstance(out, torch.Tensor):
        return opaque(tr, args, kwargs, out)
    sizes = call_sizes(tr.current_op, args, kwargs)
    if sizes is not None and len(sizes) != out.ndim:
        return opaque(tr, args, kwargs, out)
    kind, axes = reshaped(x.shape, out.shape, cmap.axis)
    if kind == "splits":
        return splits.split(tr, cmap, out, axes, sizes)
    if kind == "moves":
        why = f"is reshaped by '{tr.current_op}' with its channel count written"
        _suspect(tr, sizes, axes[0], cmap.axis, 1, cmap.slots, why)
        return tr.set(out, ChannelMap(axes[0], cmap.slots))
    if kind == "merges":
        i0, i1, _, _ = align(x.shape, out.shape, cmap.axis)
        _suspect(tr, sizes, axes[0], i0, i1 - i0, cmap.slots, f"is merged by '{tr.current_op}' with its size written")
        return tr.set(out, ChannelMap(axes[0], merged(tr, x, cmap, i0, i1)))
    opaque(tr, args, kwargs, out, "is reshaped in a way that would not follow pruning")


def reshaped(before: Sequence[int], after: Sequence[int], axis: int) -> tuple[str | None, list[int]]:
    """What a reshape from `before` to `after` does to `axis`, and the axes of `after` that then hold it:
    ``"moves"`` (one axis), ``"merges"`` (one axis, with its neighbours), ``"splits"`` (several), or None.

    >>> reshaped((2, 12), (2, 3, 4), 1), reshaped((2, 3, 4), (2, 12), 1), reshaped((2, 6), (3, 4), 1)
    (('splits', [1, 2]), ('merges', [1]), (None, []))
    """
    found = align(before, after, axis)
    if found is None:
        return None, []
    i0, i1, j0, j1 = found
    real = [j for j in range(j0, j1) if after[j] != 1]
    alone = math.prod(before[i0:i1]) == before[axis]  # nothing else in the block: the axis moves or splits
    if alone and len(real) > 1:
        return "splits", real
    if len(real) > 1 or (not real and j1 == j0):
        return None, []
    return ("moves" if alone else "merges"), [real[0] if real else j0]


def _suspect(tr: Tracer, sizes, position: int, axis: int, span: int, slots: list[int], why: str) -> None:
    if sizes is not None and sizes[position] != -1:
        ordinal = tr.op_counts[tr.current_op] - 1
        tr.graph.suspects.append(Suspect(tr.current_op, ordinal, position, axis, slots, why + " as a number", span))


def merged(tr: Tracer, x: torch.Tensor, cmap: ChannelMap, i0: int, i1: int) -> list[int]:
    """The slots of axes ``i0 .. i1 - 1`` of `x` merged into one, with the channel axis among them.

    Each channel's label is repeated over the axes after it and the whole list over the axes before it. When the
    axes after it are expanded (stride 0, as ``x[:, :, None].expand(...)`` makes them), their entries are copies
    of the channel rather than parts of it: each copy gets a slot of its own, recorded as a `Repeat`.
    """
    a = cmap.axis
    outer = math.prod(x.shape[i0:a])
    after = [k for k in range(a + 1, i1) if x.shape[k] != 1]
    inner = math.prod(x.shape[k] for k in after)
    if after and all(x.stride(k) == 0 for k in after):
        copies = [tr.slots.new(inner) for _ in cmap.slots]
        tr.graph.repeats.append(Repeat(list(cmap.slots), copies))
        one = [c for per_source in copies for c in per_source]
    else:
        one = [s for s in cmap.slots for _ in range(inner)] if inner > 1 else cmap.slots
    return one * outer if outer > 1 else one


@rule("repeat_interleave")
@unary
def repeat_interleave(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """``repeat_interleave(n, dim)`` along the channels makes `n` copies of each channel (see `graph.Repeat`)."""
    repeats, dim = arg(args, kwargs, 1, "repeats"), arg(args, kwargs, 2, "dim")
    if dim is None or not isinstance(out, torch.Tensor) or out.ndim != x.ndim:
        return opaque(tr, args, kwargs, out)
    if dim % x.ndim != cmap.axis:
        return tr.set(out, cmap)
    if not isinstance(repeats, int) or isinstance(repeats, bool):
        return opaque(tr, args, kwargs, out, "is repeated along its channels by different counts")
    copies = [tr.slots.new(repeats) for _ in cmap.slots]
    tr.graph.repeats.append(Repeat(list(cmap.slots), copies))
    tr.set(out, ChannelMap(cmap.axis, [c for per_source in copies for c in per_source]))


# ------------------------------------------------------------------------------------------ joining and cutting


@rule("cat", "concat", "concatenate")
def cat(tr: Tracer, args, kwargs, out) -> None:
    """Concatenation along the channel axis lays the parts' channels end to end; along another axis it ties them.

    An empty one-dimensional part (a cache that holds nothing yet) is left out, as `torch.cat` leaves it out.
    """
    parts = [t for t in arg(args, kwargs, 0, "tensors") if not (t.ndim == 1 and t.numel() == 0)]
    dim = arg(args, kwargs, 1, "dim", 0) % out.ndim
    maps = [tr.channels(t) for t in parts]
    if all(m is None for m in maps):
        names = [tr.name(t) for t in parts]
        if out.ndim == 1 and parts and None not in names:  # a bias joined from parameters (EVA's q, k, v biases)
            tr.join_tensors(out, [(name, t.shape[0]) for name, t in zip(names, parts)])
        return untrack(tr, out, parts[0] if parts else None)
    axes = {m.axis for m in maps if m is not None}
    if axes == {dim}:
        slots: list[int] = []
        for t, m in zip(parts, maps):
            slots += m.slots if m is not None else tr.slots.new(t.shape[dim], pin="is concatenated untracked")
        return tr.set(out, ChannelMap(dim, slots))
    if len(axes) == 1 and dim not in axes:
        axis = axes.pop()
        slots = next(m.slots for m in maps if m is not None)
        for t, m in zip(parts, maps):
            if m is not None:
                tr.slots.union_all(slots, m.slots)
            else:  # a class token or the like: a parameter joined along the tokens, whose channels follow
                bind(tr, t, slots, "is concatenated with a tensor made in forward", axis)
        return tr.set(out, ChannelMap(axis, slots))
    opaque(tr, args, kwargs, out, "is concatenated with tensors the planner cannot line up")


@rule("stack")
def stack(tr: Tracer, args, kwargs, out) -> None:
    """Stacking along a new axis ties the parts' channels, which stay on their axis (moved past the new one)."""
    parts = list(arg(args, kwargs, 0, "tensors"))
    dim = arg(args, kwargs, 1, "dim", 0) % out.ndim
    maps = [tr.channels(t) for t in parts]
    if all(m is None for m in maps):
        return untrack(tr, out, parts[0] if parts else None)
    if any(m is None or m.axis != maps[0].axis for m in maps):
        return opaque(tr, args, kwargs, out, "is stacked with tensors the planner cannot line up")
    for m in maps[1:]:
        tr.slots.union_all(maps[0].slots, m.slots)
    axis = maps[0].axis
    tr.set(out, ChannelMap(axis + (axis >= dim), maps[0].slots))


@rule("chunk", "split", "tensor_split", "unbind")
@unary
def chunk(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Splitting along other axes keeps the labels; cutting the channels into equal parts ties the parts.

    After pruning, ``chunk(n)`` still cuts the (smaller) tensor into n equal parts, so channel `j` of every part
    is tied to channel `j` of the others. ``split(size)`` with equal parts does too, if `size` follows pruning:
    written as a number it is a suspect, checked like a view's sizes (GPT-2 splits its fused projection by
    ``self.split_size``, an attribute the applier updates). Unequal parts are kept.
    """
    op = tr.current_op
    dim = arg(args, kwargs, 2 if op != "unbind" else 1, "dim", 0) % x.ndim
    parts = list(out) if isinstance(out, (tuple, list)) else [out]
    if dim != cmap.axis:
        for part in parts:
            tr.set(part, ChannelMap(cmap.axis - (op == "unbind" and dim < cmap.axis), cmap.slots))
        return
    size = x.shape[dim]
    n = len(parts)
    if op in ("tensor_split", "unbind") or size % n or any(p.shape[dim] != size // n for p in parts):
        return opaque(tr, args, kwargs, out, f"is split along its channels by '{op}' with fixed sizes")
    if op == "split":
        why = "is split into parts by 'split' with the part size written as a number"
        ordinal = tr.op_counts[op] - 1
        tr.graph.suspects.append(Suspect(op, ordinal, 0, cmap.axis, cmap.slots, why, factor=n))
    step = size // n
    tie_groups(tr, cmap.slots, n)
    for i, part in enumerate(parts):
        tr.set(part, ChannelMap(dim, cmap.slots[i * step : (i + 1) * step]))


@rule("__getitem__")
@unary
def getitem(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Indexing that keeps every channel (``x[:, :, 1:]``, ``x[..., None]``) keeps the labels.

    A slice of the channels (``qkv[..., :q_size]``, a fused projection cut into its parts) takes the labels of the
    channels it selects. Its bounds are numbers that must follow pruning: a suspect, checked against the pruned
    model like a view's sizes.
    """
    landing = index_map(args[1], x.shape)
    axis = landing[cmap.axis] if landing is not None else None
    if axis is not None and axis >= 0:
        return tr.set(out, ChannelMap(axis, cmap.slots))
    cut = sliced(args[1], x.shape, cmap.axis)
    if axis == CUT and cut is not None:
        start, stop = cut
        out_axis = index_map(args[1], x.shape, cuts=False)[cmap.axis]
        why = "is sliced along its channels with bounds the pruned model does not follow"
        ordinal = tr.op_counts[tr.current_op] - 1
        tr.graph.suspects.append(Suspect("__getitem__", ordinal, 0, cmap.axis, cmap.slots, why, cut=(start, stop)))
        return tr.set(out, ChannelMap(out_axis, cmap.slots[start:stop]))
    opaque(tr, args, kwargs, out, "is indexed or sliced along its channels")


CUT = -1  # `index_map`: the index cuts this axis


def _expanded(index, ndim: int) -> list[Any] | None:
    """One index entry per axis, Ellipsis spelled out (None entries, which add axes, kept); None when advanced."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (torch.Tensor, list, bool)) or i is True or i is False for i in items):
        return None
    real = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        expanded += [slice(None)] * (ndim - real) if i is Ellipsis else [i]
    if Ellipsis not in items:
        expanded += [slice(None)] * (ndim - real)
    return expanded


def index_map(index, shape: Sequence[int], cuts: bool = True) -> list[int | None] | None:
    """For each axis of a tensor of `shape`, the axis it lands on after ``tensor[index]``: None where an integer
    removes it, `CUT` where the index keeps only some of its entries (with `cuts`; without, where they land). None
    when the index is advanced (tensors, lists, booleans), which may move axes around.

    >>> index_map((slice(None), slice(None), 0), (2, 8, 3)), index_map((Ellipsis, None), (2, 8))
    ([0, 1, None], [0, 1])
    >>> index_map((slice(None), slice(0, 4)), (2, 8))
    [0, -1]
    """
    expanded = _expanded(index, len(shape))
    if expanded is None:
        return None
    landing: list[int | None] = []
    out_dim = 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if isinstance(i, int):
            landing.append(None)
            continue
        size = shape[len(landing)]
        whole = isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1)
        whole = whole and (i.stop is None or i.stop >= size)
        landing.append(out_dim if whole or not cuts else CUT)
        out_dim += 1
    return landing


def sliced(index, shape: Sequence[int], axis: int) -> tuple[int, int] | None:
    """The ``(start, stop)`` that `index` keeps of `axis`, when it is a plain slice there (step 1); else None.

    >>> sliced((Ellipsis, slice(4, None)), (2, 12), 1), sliced((slice(None), slice(0, 8, 2)), (2, 12), 1)
    ((4, 12), None)
    """
    expanded = _expanded(index, len(shape))
    if expanded is None:
        return None
    item = [i for i in expanded if i is not None][axis]
    if not isinstance(item, slice) or item.step not in (None, 1):
        return None
    start, stop, _ = item.indices(shape[axis])
    return (start, stop) if stop > start else None


# ------------------------------------------------------------------------------------------ moving axes


@rule("permute", "transpose", "swapaxes", "moveaxis", "movedim", "unsqueeze", "squeeze", "expand", "expand_as",
      "broadcast_to")  # fmt: skip
@unary
def move_axes(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Axis moves, new axes and broadcasts carry the labels to the channel axis's new position."""
    landing = moved_axes(tr.current_op, x, [cmap.axis], args, kwargs, out)
    if landing is None:
        return opaque(tr, args, kwargs, out, "is moved in a way the planner cannot follow")
    tr.set(out, ChannelMap(landing[0], cmap.slots))


def moved_axes(op: str, x: torch.Tensor, axes: list[int], args, kwargs, out) -> list[int] | None:
    """Where axes `axes` of `x` land after an axis move, or None when one is broadcast or removed.

    The move is applied to a meta tensor of `x`'s shape in which each of `axes` has a size found nowhere else.
    """
    if not isinstance(out, torch.Tensor):
        return None
    if op in ("expand", "expand_as", "broadcast_to"):
        shift = out.ndim - x.ndim
        landing = [a + shift for a in axes]
        return landing if all(out.shape[b] == x.shape[a] for a, b in zip(axes, landing)) else None
    shape = list(x.shape)
    markers = []
    marker = max(shape, default=1) + 1
    for a in axes:
        marker += 1
        shape[a] = marker
        markers.append(marker)
    try:
        moved = getattr(torch.empty(shape, device="meta"), op)(*args[1:], **kwargs)
    except (RuntimeError, TypeError, IndexError, ValueError):
        return None
    landing = []
    for a, m in zip(axes, markers):
        found = [d for d, n in enumerate(moved.shape) if n == m]
        if len(found) != 1 or out.shape[found[0]] != x.shape[a]:
            return None
        landing.append(found[0])
    return landing


@rule("roll", "flip")
@unary
def roll(tr: Tracer, x, cmap: ChannelMap, args, kwargs, out) -> None:
    """Rolling or flipping other axes (Swin's shifted windows) keeps the channels where they are."""
    dims = arg(args, kwargs, 2 if tr.current_op == "roll" else 1, "dims")
    if dims is None or not isinstance(out, torch.Tensor):
        return opaque(tr, args, kwargs, out, f"is moved along its channels by '{tr.current_op}'")
    dims = {d % x.ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    if cmap.axis in dims:
        return opaque(tr, args, kwargs, out, f"is moved along its channels by '{tr.current_op}'")
    tr.set(out, cmap)


@rule("__setitem__")
def setitem(tr: Tracer, args, kwargs, out) -> None:
    """Writing into a tensor in place changes it in ways the labels cannot describe."""
    tr.pin_inputs(args, kwargs, "is written in place with __setitem__")
    tr.set(args[0], None)
