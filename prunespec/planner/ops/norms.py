"""Normalisations: per-channel ones (batch and instance norm) and those that couple channels (layer, group, RMS).

Start with `batch_norm`: statistics and affine parameters follow the channels one to one. A norm whose statistics
are taken across channels (`shared_statistics_norm`) keeps them: removing one would change the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunespec.planner.graph import Binding
from prunespec.planner.ops.base import arg, bind, opaque, rule, untrack

if TYPE_CHECKING:
    from prunespec.planner.trace import Tracer


@rule("batch_norm")
def batch_norm(tr: Tracer, args, kwargs, out) -> None:
    """Batch norm keeps channels one to one; its statistics and affine parameters follow them."""
    x = arg(args, kwargs, 0, "input")
    cmap = tr.channels(x)
    if cmap is None or cmap.axis != 1:
        return opaque(tr, args, kwargs, out)
    for i, key in enumerate(("running_mean", "running_var", "weight", "bias"), start=1):
        bind(tr, arg(args, kwargs, i, key), cmap.slots, "is normalised with statistics that are not model tensors")
    tr.set(out, cmap)
    tr.normalised(x, arg(args, kwargs, 1, "running_mean"))


@rule("instance_norm")
def instance_norm(tr: Tracer, args, kwargs, out) -> None:
    """Instance norm has per-channel statistics, like batch norm, and the same argument order."""
    batch_norm(tr, args, kwargs, out)


@rule("layer_norm", "group_norm", "rms_norm")
def shared_statistics_norm(tr: Tracer, args, kwargs, out) -> None:
    """Layer, group and RMS norms compute statistics across channels: removing one would change the others.

    The channels they normalise together are kept; the output carries the same labels, so the layers after it can
    still drop what they do not read. A norm over other axes (channels outside the normalised shape) keeps its
    channels apart, and they stay free.
    """
    x = arg(args, kwargs, 0, "input")
    cmap = tr.channels(x)
    if cmap is None:
        return untrack(tr, out, x)
    if tr.current_op == "group_norm":
        first = 1
    else:
        normalized = arg(args, kwargs, 1, "normalized_shape")
        first = x.ndim - (len(normalized) if isinstance(normalized, (tuple, list)) else 1)
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    if tr.current_op == "rms_norm":
        bias = None  # rms_norm(input, normalized_shape, weight, eps)
    if cmap.axis >= first:
        tr.slots.pin(cmap.slots, f"is normalised together with other channels by {tr.current_op}")
        for t in (weight, bias):
            name = tr.name(t)
            if name is not None and t.ndim > cmap.axis - first:
                tr.graph.bindings.append(Binding(name, cmap.axis - first, cmap.slots))
    tr.set(out, cmap)
