"""Normalisations: per-channel ones (batch and instance norm) and those that couple channels (layer, group, RMS).

Start with `batch_norm`: statistics and affine parameters follow the channels one to one. A norm whose statistics
are taken across channels (`shared_statistics_norm`) keeps them: removing one would change the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunespec.planner.ops.base import arg, bind, opaque, rule, untrack
from prunespec.planner.ops.derived import standardise

if TYPE_CHECKING:
    from prunespec.planner.trace import Tracer


@rule("batch_norm")
def batch_norm(tr: Tracer, args, kwargs, out) -> None:
    """Batch norm keeps channels one to one; its statistics and affine parameters follow them."""
    x = arg(args, kwargs, 0, "input")
    cmap = tr.channels(x)
    if cmap is None and standardise(tr, args, kwargs, out):
        return  # a weight computed from a parameter (`derived`)
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


@rule("layer_norm", "rms_norm")
def shared_statistics_norm(tr: Tracer, args, kwargs, out) -> None:
    """Layer and RMS norms compute statistics across channels: removing one changes the others.

    The channels they normalise together are coupled (`Tracer.couple`): kept, unless the plan goes through norms
    and the norm runs in a module of its own. The output carries the same labels, so the layers after it can
    still drop what they do not read. A norm over other axes (channels outside the normalised shape) keeps its
    channels apart, and they stay free.
    """
    x = arg(args, kwargs, 0, "input")
    cmap = tr.channels(x)
    if cmap is None:
        return untrack(tr, out, x)
    normalized = arg(args, kwargs, 1, "normalized_shape")
    first = x.ndim - (len(normalized) if isinstance(normalized, (tuple, list)) else 1)
    weight = arg(args, kwargs, 2, "weight")
    bias = arg(args, kwargs, 3, "bias") if tr.current_op == "layer_norm" else None  # rms_norm(x, shape, w, eps)
    if cmap.axis >= first:
        tr.couple(cmap.slots, f"is normalised together with other channels by {tr.current_op}")
        for t in (weight, bias):
            if t is not None and t.ndim > cmap.axis - first:
                bind(tr, t, cmap.slots, "is normalised with parameters that are not model tensors", cmap.axis - first)
    tr.set(out, cmap)


@rule("group_norm")
def group_norm(tr: Tracer, args, kwargs, out) -> None:
    """Group norm takes statistics per group of channels: whole groups go, and the others keep their statistics.

    The channels of each group are tied into one unit (removing a group leaves every other group's mean and
    variance as they were), so the pruned norm only has fewer groups, which the applier sets.
    """
    x, groups = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "num_groups")
    cmap = tr.channels(x)
    if cmap is None:
        return untrack(tr, out, x)
    if cmap.axis != 1 or not isinstance(groups, int) or x.shape[1] % groups:
        return opaque(tr, args, kwargs, out, "is normalised by a group norm the planner cannot follow")
    size = x.shape[1] // groups
    for g in range(groups):
        members = cmap.slots[g * size : (g + 1) * size]
        tr.slots.union_all([members[0]] * (size - 1), members[1:])
    for i, key in ((2, "weight"), (3, "bias")):
        bind(tr, arg(args, kwargs, i, key), cmap.slots, "is normalised with parameters that are not model tensors")
    tr.set(out, cmap)
