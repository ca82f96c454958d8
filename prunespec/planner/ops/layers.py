"""Layers with weights: convolutions, linear layers and matrix products with a parameter, embeddings, PReLU.

Start with `mix`: a weight that mixes input channels into new output channels is a *consumer* of the slots it reads
and a *producer* of the slots it makes. An embedding is a producer only: its columns are new channels.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from prunespec.planner.graph import Binding, Consumer, Macs, Producer
from prunespec.planner.ops.base import arg, bind, bind_bias, input_slots, label, opaque, rule, tie_groups, untrack
from prunespec.applier.rules import rule_for
from prunespec.planner.ops.derived import derived_weight

if TYPE_CHECKING:
    from prunespec.planner.trace import Tracer


def mix(tr: Tracer, weight: str, bias, x, out, in_axis: int, out_axis: int, x_axis: int, y_axis: int, groups=1):
    """Record a weight that mixes input channels into new output channels (a producer and a consumer).

    With `groups > 1` every group must keep the same number of channels, so the planner ties channel `j` of each
    group to channel `j` of the others: they are kept or removed together, and the weight's per-group axis keeps
    the same positions for every group.
    """
    reads = input_slots(tr, x, x_axis)
    made = tr.slots.new(out.shape[y_axis])
    no_gather = tr.why_no_gather(weight, x)
    per_group = None
    written = made
    if groups > 1:
        tie_groups(tr, reads, groups)
        tie_groups(tr, made, groups)
        no_gather = f"{weight} is a grouped convolution (groups={groups}); every group keeps the same positions"
        if in_axis == 1:
            per_group = len(reads) // groups  # [out, in/groups, *k]: the input axis counts one group
        else:
            written = made[: len(made) // groups]  # transposed: [in, out/groups, *k]
    tr.graph.consumers.append(Consumer(weight, in_axis, reads, no_gather=no_gather, per_group=per_group))
    tr.graph.producers.append(Producer(weight, out_axis, made))
    tr.graph.bindings.append(Binding(weight, out_axis, written))
    bind_bias(tr, bias, made)
    label(tr, out, y_axis, made)
    tr.made_by_layer(weight, bias, out)


@rule("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv(tr: Tracer, args, kwargs, out) -> None:
    """Convolutions: a producer and a consumer when `groups == 1`, a per-channel user when depthwise.

    The weight is ``[out, in/groups, *k]``, or ``[in, out/groups, *k]`` for transposed convolutions.
    """
    x, weight, bias = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    transposed = "transpose" in tr.current_op
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    name, derived = tr.name(weight), None
    if name is None:
        derived = derived_weight(tr, weight, out_axis, in_axis)  # computed in forward, e.g. standardised
        if derived is None:
            return opaque(tr, args, kwargs, out, "is convolved with a weight that is not a model parameter")
        name = derived.name
    tr.calls[name] += 1
    c_in, c_out = x.shape[1], out.shape[1]
    groups = c_out // weight.shape[1] if transposed else c_in // weight.shape[1]
    kernel = math.prod(weight.shape[2:])
    unit = (x.numel() // c_in if transposed else out.numel() // c_out) * kernel
    tr.graph.macs.append(Macs(name, unit))
    if groups == c_in == c_out and groups > 1:
        cmap = tr.channels(x)
        if cmap is None or cmap.axis != 1:
            return opaque(tr, args, kwargs, out)
        owner = tr.modules.get(name.rpartition(".")[0])
        if owner is None or "groups" not in getattr(rule_for(owner), "attributes", ()):
            # The pruned model passes `groups` as its module holds it (timm's BlurPool2d: `groups=self.channels`),
            # and only a convolution's rule updates that number.
            why = f"is convolved depthwise with {name}, whose module holds the group count as a number"
            return opaque(tr, args, kwargs, out, why)
        tr.graph.bindings.append(Binding(name, 0, cmap.slots))
        bind_bias(tr, bias, cmap.slots)
        tr.made_by_layer(name, bias, out)
        tr.set(out, cmap)
        if derived is not None:
            derived.record(tr, None, cmap.slots)
        return
    mix(tr, name, bias, x, out, in_axis, out_axis, 1, 1, groups=groups)
    if derived is not None:
        derived.record(tr, tr.graph.consumers[-1], tr.graph.producers[-1].slots)


@rule("linear")
def linear(tr: Tracer, args, kwargs, out) -> None:
    """A linear layer mixes the last axis: weight ``[out, in]``."""
    x, weight, bias = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    name, derived = tr.name(weight), None
    if name is None:
        derived = derived_weight(tr, weight, 0, 1)  # computed in forward, e.g. standardised
        if derived is None:
            return opaque(tr, args, kwargs, out, "is multiplied by a weight that is not a model parameter")
        name = derived.name
    tr.calls[name] += 1
    tr.graph.macs.append(Macs(name, out.numel() // out.shape[-1]))
    mix(tr, name, bias, x, out, 1, 0, x.ndim - 1, out.ndim - 1)
    if derived is not None:
        derived.record(tr, tr.graph.consumers[-1], tr.graph.producers[-1].slots)


def matmul_weight(tr: Tracer, name: str, bias, x: torch.Tensor, out: torch.Tensor) -> None:
    """``x @ weight`` with a ``[in, out]`` parameter, as GPT-2's ``Conv1D`` computes it with ``addmm``."""
    tr.calls[name] += 1
    tr.graph.macs.append(Macs(name, out.numel() // out.shape[-1]))
    mix(tr, name, bias, x, out, 0, 1, x.ndim - 1, out.ndim - 1)


@rule("addmm")
def addmm(tr: Tracer, args, kwargs, out) -> None:
    """``addmm(bias, x, weight)``: a linear layer with its weight stored ``[in, out]`` (GPT-2's ``Conv1D``)."""
    bias, x, weight = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "mat1"), arg(args, kwargs, 2, "mat2")
    name = tr.name(weight)
    plain = arg(args, kwargs, 3, "beta", 1) == 1 and arg(args, kwargs, 4, "alpha", 1) == 1
    if name is None or not plain or not isinstance(bias, torch.Tensor) or bias.ndim != 1 or tr.channels(weight):
        return opaque(tr, args, kwargs, out, "is multiplied by a matrix that is not a model parameter")
    matmul_weight(tr, name, bias, x, out)


@rule("embedding")
def embedding(tr: Tracer, args, kwargs, out) -> None:
    """An embedding table ``[vocabulary, width]`` looked up by indices: its columns are new channels."""
    indices, weight = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
    name = tr.name(weight)
    if name is None or arg(args, kwargs, 3, "max_norm") is not None or not isinstance(out, torch.Tensor):
        # max_norm renormalises each looked-up row over all its columns
        return opaque(tr, args, kwargs, out, "is looked up in a table the planner cannot follow")
    tr.pin_inputs((indices,), {}, "is used as indices into an embedding")
    made = tr.slots.new(weight.shape[1])
    tr.graph.producers.append(Producer(name, 1, made))
    tr.graph.bindings.append(Binding(name, 1, made))
    label(tr, out, out.ndim - 1, made)


@rule("prelu")
def prelu(tr: Tracer, args, kwargs, out) -> None:
    """PReLU has one slope per channel (axis 1), or one shared slope."""
    x, weight = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
    cmap = tr.channels(x)
    if cmap is None:
        return untrack(tr, out, x)
    if cmap.axis != 1 and weight.numel() != 1:
        return opaque(tr, args, kwargs, out)
    if weight.numel() != 1:
        bind(tr, weight, cmap.slots, "has PReLU slopes that are not model parameters")
    tr.set(out, cmap)
