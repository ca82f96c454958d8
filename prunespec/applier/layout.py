"""Lay a pruned model out for inference on CPU: channels-last memory, with costly channel gathers folded away.

Start with `to_channels_last`. On CPU, PyTorch's convolutions (oneDNN) run faster on channels-last (NHWC) memory,
and more so on the odd channel counts that pruning leaves: on resnet50 with 30% of every consumer's inputs pruned
at random, the folded model took about a fifth less time channels-last, the dense one about a tenth less (see
docs/performance.md). But an activation subselection that gathers channels (`index_select` on the channel axis) is
slow on channels-last memory, where each pixel's channels lie together: 2-2.5 ms for a 56x56 map of 256 channels
on the benchmark machine, more than the convolution that reads it.

So before converting, each consumer whose subselection is a gather is checked by a cost model (`fill_pays`): where
it pays, the gather goes and the consumer reads the whole activation through a weight with zero columns at the
channels it did not read. Zero times a finite value is zero, so the output is the same, up to summation order;
only a non-finite value in a channel the consumer skipped would now reach its output. The model is for inference
afterwards, like a folded one: training it would make the zero columns non-zero, and its state dict no longer
fits `build_pruned`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunespec.applier.prune import InputSubselection
from prunespec.applier.rules import rule_for, runs_own_forward
from prunespec.applier.validate import INDICES_BUFFER

FILL_MACS_PER_GATHERED_VALUE = 128
"""Zero columns pay when they add at most this many multiply-accumulates per value the gather would copy.

Measured on the 2-core benchmark machine with `python benchmarks/fill_cost.py`: a gather on channels-last memory
cost as much as 100-250 multiply-accumulates per value it copied, the most on large maps."""


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert `model`, pruned by `prune` or not, to channels-last memory for inference, in place, and return it.

    Consumers whose input gathers cost more than zero columns in their weight read their whole input instead (see
    `fill_pays`). Then every 4-D parameter and buffer is made channels-last; a convolution with a channels-last
    weight also gives channels-last outputs, so the model can be called with ordinary (NCHW) inputs.

    >>> conv = nn.Conv2d(3, 2, 1)
    >>> with torch.no_grad():  # small whole numbers: every sum is exact, in any order
    ...     _ = conv.weight.copy_(torch.arange(6.0).view(2, 3, 1, 1)), conv.bias.fill_(1.0)
    >>> conv.register_buffer(INDICES_BUFFER, torch.tensor([4, 0, 2]), persistent=False)
    >>> _ = conv.register_forward_pre_hook(InputSubselection(axis=-3, start=None, length=3, channels=5))
    >>> x = torch.arange(80.0).view(1, 5, 4, 4)
    >>> before = conv(x)
    >>> to_channels_last(conv)
    Conv2d(5, 2, kernel_size=(1, 1), stride=(1, 1))
    >>> conv.weight[:, [1, 3]].abs().sum().item(), torch.equal(conv(x), before)
    (0.0, True)
    >>> conv(x).is_contiguous(memory_format=torch.channels_last)
    True
    """
    for module in model.modules():
        gather = _gather_of(module)
        if gather is not None and fill_pays(module, gather.channels):
            _fill_input(module, gather)
    return model.to(memory_format=torch.channels_last)


def fill_pays(module: nn.Module, channels: int) -> bool:
    """Whether `module` should read all `channels` of its input through zero columns rather than gather some.

    Only a 2-D convolution (the layers whose memory `to_channels_last` changes) whose rule says its weight's axis 1
    holds its input channels one to one (``groups=1``), and which runs its own forward, can take zero columns;
    then they pay when `extra_macs_per_gathered_value` is at most `FILL_MACS_PER_GATHERED_VALUE`.

    >>> fill_pays(nn.Conv2d(179, 64, 1), channels=256)  # a resnet50 stage-1 block's first convolution
    True
    >>> fill_pays(nn.Conv2d(1433, 360, 1), channels=2048)  # a stage-4 one: the extra arithmetic costs more
    False
    >>> fill_pays(nn.Conv2d(8, 8, 3, groups=8), channels=16)  # depthwise: each channel has its own filter
    False
    """
    weight = getattr(module, "weight", None)
    fillable = isinstance(weight, torch.Tensor) and weight.dim() == 4 and rule_for(module).fills_input(module)
    if not (fillable and runs_own_forward(module)):
        return False
    return extra_macs_per_gathered_value(module, channels) <= FILL_MACS_PER_GATHERED_VALUE


def extra_macs_per_gathered_value(conv: nn.Conv2d, channels: int) -> float:
    """The multiply-accumulates zero columns would add to `conv`, per value a gather of its input copies.

    Per pixel of the input, a gather copies one value for each channel the convolution reads. Zero columns cost
    ``(channels - read) * out_channels * kernel size`` extra multiply-accumulates per output pixel, and a strided
    convolution has fewer output pixels than input pixels.

    >>> extra_macs_per_gathered_value(nn.Conv2d(2, 8, 3, stride=2), channels=6)  # 4 * 8 * 9 / 4 per 2 read
    36.0
    """
    weight = conv.weight
    read = weight.shape[1]
    return (channels - read) * weight.shape[0] * math.prod(weight.shape[2:]) / math.prod(conv.stride) / read


def _gather_of(module: nn.Module) -> InputSubselection | None:
    """The module's input subselection when it gathers. A slice is left alone: on channels-last memory it is copied
    too, but at a fraction of a gather's cost, and zero columns in its place gained nothing measurable."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, InputSubselection) and hook.start is None:
            return hook
    return None


def _fill_input(module: nn.Module, gather: InputSubselection) -> None:
    """Widen the module's weight to all `gather.channels` input channels, with zeros at those it did not read, and
    drop the gather."""
    weight = module.weight
    filled = weight.new_zeros(weight.shape[0], gather.channels, *weight.shape[2:])
    filled.index_copy_(1, getattr(module, INDICES_BUFFER).to(weight.device), weight.detach())
    module.weight = nn.Parameter(filled, weight.requires_grad)
    rule = rule_for(module)
    rule.set_attributes(module, rule.derive(module, {"weight": tuple(filled.shape)}))
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is gather:
            del module._forward_pre_hooks[key]
    del module._buffers[INDICES_BUFFER]
    module._non_persistent_buffers_set.discard(INDICES_BUFFER)
