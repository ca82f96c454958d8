"""Weights that a module computes in forward from its own parameter, such as weight standardisation.

Start with `standardise`. timm's `StdConv2d` and `ScaledStdConv2d` (NFNets, BiT ResNetV2) normalise each filter
before convolving: ``F.batch_norm(weight.reshape(1, out, -1), None, None, gain, training=True)``, then
``.reshape_as(weight)``. Recognised from the data flow, not the class: a batch norm over a view of a parameter, with
statistics of the batch (not running ones), normalises each entry of the parameter's axis that lands on its
channels over the parameter's other axes. So the parameter's axis on the channels still follows channels one to one
(a filter's output channel prunes exactly: a pruned filter is zero in the mock, and a zero filter standardises to
zero), while its other axes are coupled: removing an input channel changes every filter's mean and variance, so
a layer that reads the computed weight keeps its input channels, with the reason.

The tracer remembers the result as a view of the parameter (`Tracer.tensor_of`, followed through later views such
as ``reshape_as``) plus a `Derivation`: why the axes that lost their labels are coupled, and the per-channel
tensors (the gain) that follow the kept axis. `derived_weight` turns that into what a layer rule needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from prunespec.planner.graph import Consumer
from prunespec.planner.ops.base import arg, bind

if TYPE_CHECKING:
    from prunespec.planner.trace import Tracer


@dataclass
class Derivation:
    """How a tensor was computed from a parameter, beyond which axes it shows (see the module docstring)."""

    coupled: str  # why the parameter's axes that are not shown cannot shrink alone
    followers: list[tuple[torch.Tensor, int, int]] = field(default_factory=list)
    """(tensor, its axis, the parameter axis it follows): per-channel tensors of the computation, such as a gain."""


@dataclass
class DerivedWeight:
    """A layer's weight computed from the parameter `name` (see `derived_weight`)."""

    name: str
    coupled: str | None  # why the layer's input axis cannot shrink, or None when it follows one to one
    followers: list[tuple[torch.Tensor, int, int]]

    def record(self, tr: Tracer, consumer: Consumer | None, made: list[int]) -> None:
        """After the layer rule ran: keep the layer's inputs when they are coupled, and bind the followers of the
        output axis to the channels `made` (or, for a depthwise layer, carried)."""
        if consumer is not None and self.coupled is not None:
            tr.slots.pin(consumer.slots, self.coupled)
            consumer.fixed = self.coupled
        for tensor, axis, _ in self.followers:
            bind(tr, tensor, made, "is standardised with a per-channel tensor that is not a model tensor", axis)


def derived_weight(tr: Tracer, weight, out_axis: int, in_axis: int) -> DerivedWeight | None:
    """The parameter behind a layer's `weight` when the layer computes it in forward, else None.

    The weight must come from a recognised `Derivation` (one that computes zero from a zero filter, so that the mock's
    zeroed filters stay zero), be shaped like the parameter and show its output axis at `out_axis`. Anything else
    is left to the caller (opaque): ``weight.exp()`` is not zero where the mock zeroes the parameter.
    """
    source = tr.tensor_of(weight)
    if source is None:
        return None
    name, axes = source
    parameter = tr.tensors.get(name)
    if parameter is None or tuple(parameter.shape) != tuple(weight.shape) or axes[out_axis] != out_axis:
        return None
    derivation = tr.derivation(weight)
    if derivation is None or axes[in_axis] not in (None, in_axis):
        return None
    coupled = None if axes[in_axis] == in_axis or weight.shape[in_axis] == 1 else derivation.coupled
    followers = [f for f in derivation.followers if f[2] == out_axis]
    return DerivedWeight(name, coupled, followers)


def standardise(tr: Tracer, args, kwargs, out) -> bool:
    """A batch norm over a view of a parameter: note the result as a view of it (see the module docstring).

    Returns whether it was one; the batch norm rule treats anything else as opaque.
    """
    x = arg(args, kwargs, 0, "input")
    source = tr.tensor_of(x)
    if source is None or not isinstance(out, torch.Tensor) or out.shape != x.shape or x.ndim < 2:
        return False
    name, axes = source
    kept = axes[1]  # batch_norm's channel axis
    if kept is None:
        return False
    batch_statistics = arg(args, kwargs, 5, "training", False) or arg(args, kwargs, 1, "running_mean") is None
    followers = []
    for i, key in ((3, "weight"), (4, "bias")):
        t = arg(args, kwargs, i, key)
        if t is None:
            continue
        behind = tr.tensor_of(t)
        if behind is None or t.ndim != 1 or behind[1][0] is None:
            return False  # a gain the planner cannot slice: the caller keeps the channels
        followers.append((t, 0, kept))
    if not batch_statistics:
        return False  # running statistics of a parameter: not a standardisation
    out_axes: list[int | None] = [None] * out.ndim
    out_axes[1] = kept
    why = "is read by a weight standardised over its input channels"
    tr.note_derived(out, name, out_axes, Derivation(why, followers))
    return True
