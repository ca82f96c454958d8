"""Shared checks for the invariant: prune(copy, spec)(x) == mock(model, spec)(x) in float64.

`random_request` draws a random pruning pattern from a traced model with a fixed seed; `assert_invariant` plans,
stores and reloads the spec, then compares the pruned model with the mock, and the input activation sizes and MACs
the spec records per layer with those measured on the running models.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import prunespec
from prunespec.applier import rule_for
from prunespec.applier.blocks import renamed_key
from scripts import zoo

TOLERANCE = 1e-12
"""max |pruned - mock| in float64, relative to the output scale where that exceeds 1 (DESIGN.md's invariant). Two
orders of summing n products differ by at most about n·eps·(the sum of their magnitudes), eps = 2.2e-16 in float64:
1e-12 leaves room for the thousands of products per output of a real network's layers, and for depth."""


def random_request(model, inputs, seed: int, fraction: float, side: str):
    """Random (weight, channel) pairs: each channel of every consumer (or producer) is picked with `fraction`.

    The same drawing as the zoo sweep's, so a failing pattern found there reproduces here.
    """
    return zoo.random_request(model, inputs, seed, side, fraction)


def tensors(output) -> list[torch.Tensor]:
    """The tensors of a model's output; other leaves (a key/value cache object) are not compared."""
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def max_difference(a, b) -> float:
    diffs = [(x - y).abs().max().item() for x, y in zip(tensors(a), tensors(b), strict=True)]
    return math.nan if any(math.isnan(d) for d in diffs) else max(diffs, default=0.0)  # max() misorders NaN


def assert_matches(actual, expected, tolerance: float = TOLERANCE) -> float:
    """Assert max |actual - expected| <= tolerance × max(1, max |expected|) and return the difference.

    Relative above an output scale of 1: random deep networks reach large outputs, whose last digits move with the
    summation order alone. An expected output of almost zero fails: the comparison would say nothing.
    """
    scale = max((t.abs().max().item() for t in tensors(expected)), default=1.0)
    assert scale > zoo.NEAR_ZERO, f"the expected output is (almost) zero ({scale:.3g}): comparing with it says nothing"
    diff = max_difference(actual, expected)
    assert diff <= tolerance * max(1.0, scale), f"max |difference| = {diff:.3g} (output scale {scale:.3g})"
    return diff


def rounding_bound(dtype: torch.dtype, terms: int, magnitude: float) -> float:
    """How far apart two orders of summing `terms` numbers may put the result, in `dtype`, when their magnitudes sum
    to at most `magnitude`: each order is within γ(n) = n·u/(1 - n·u) of the exact sum (u = eps/2, Higham, Accuracy
    and Stability of Numerical Algorithms, 3.1), so the two are within 2·γ(n)·magnitude.

    >>> f"{rounding_bound(torch.float64, 9, 1.0):.2g}", f"{rounding_bound(torch.float32, 9, 1.0):.2g}"
    ('2e-15', '1.1e-06')
    """
    u = torch.finfo(dtype).eps / 2
    return 2 * terms * u / (1 - terms * u) * magnitude


def assert_invariant(model, inputs, tmp_path, tolerance: float = TOLERANCE, **plan_kwargs):
    """Plan, save, reload, then check pruned == mock and that the original model was left alone."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = prunespec.plan(model, inputs, **plan_kwargs)
    path = tmp_path / "model.prunespec.json"
    spec.save(path)
    stored = prunespec.load_spec(path)
    assert stored == spec

    mock = prunespec.mock(model, stored)
    pruned = prunespec.prune(copy.deepcopy(model), stored)
    with torch.no_grad(), _measuring(model) as unpruned_layers, _measuring(pruned) as pruned_layers:
        expected = mock(*inputs)  # runs `model`'s modules
        actual = pruned(*inputs)
    _assert_recorded_layers(stored, unpruned_layers, pruned_layers)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed in the original model"
    diff = assert_matches(actual, expected, tolerance)
    n_params = sum(p.numel() for p in pruned.parameters())
    assert n_params == stored.summary.parameters_after
    return stored, pruned, diff


@contextlib.contextmanager
def _measuring(model: nn.Module) -> Iterator[dict[str, tuple[set[int], int]]]:
    """For each convolution and linear layer called while inside: (the channels of the input activations it was
    called with, its multiply-accumulates summed over calls), by name. Worked out here from the activations, not
    the way the planner does."""
    found: dict[str, tuple[set[int], int]] = {}

    def called(name: str, module: nn.Module) -> tuple[Callable, Callable]:
        def before(module, args) -> None:
            found.setdefault(name, (set(), 0))[0].add(args[0].shape[rule_for(module).input_axis])

        def after(module, args, out) -> None:
            transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
            # Each output (input, for a transposed convolution) element takes one MAC per weight entry of its row.
            macs = (args[0] if transposed else out).numel() * math.prod(module.weight.shape[1:])
            widths, total = found[name]
            found[name] = (widths, total + macs)

        return before, after

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            before, after = called(name, module)
            # prepend: the width as it arrives, before an activation subselection picks from it
            handles += [module.register_forward_pre_hook(before, prepend=True), module.register_forward_hook(after)]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _assert_recorded_layers(spec, unpruned: dict, pruned: dict) -> None:
    """The spec's `input_activation_channels` and `macs` per layer agree with the running models."""
    for name, layer in spec.layers.items():
        now = renamed_key(spec, f"{name}.weight")  # where the layer is once blocks before it were removed
        now = now.rpartition(".")[0] if now else None
        if now not in pruned:  # not a convolution or linear layer, or its weight is used outside its forward
            continue
        widths, macs_after = pruned[now]
        assert layer.macs == (unpruned[name][1], macs_after), name
        if layer.input_activation_channels is not None:
            assert widths == {layer.input_activation_channels}, name
        else:  # a depthwise convolution: a per-channel user, not a consumer
            assert layer.type.startswith("Conv") and layer.attributes["groups"] == layer.attributes["in_channels"], name
