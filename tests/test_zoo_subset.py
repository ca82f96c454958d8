"""The fast subset of the model-zoo sweeps (`scripts/zoo.py`, `scripts/zoo_timm.py`): one model per torchvision
family and one timm model per kind of channel trick, both modes.

Each case plans a random pattern of pruned inputs and outputs (side "both"), stores and reloads the spec, and checks
that the pruned model computes what the mock model computes in float64 and has fewer parameters. Models, inputs
and patterns come from the sweep itself, at the smallest input each model accepts and batch 1, to stay fast.
Start with `test_zoo_subset`; run the whole zoo with `make zoo`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import prunespec
from scripts.zoo import (
    NEAR_ZERO,
    SEED,
    TOLERANCE,
    build_model,
    input_size,
    make_inputs,
    max_difference,
    output_scale,
    random_request,
    tolerated,
)

SMALLEST_SIZE = 32  # every model not in scripts/zoo.py's SIZE_EXCEPTIONS runs at this side

SUBSET = [
    "alexnet",
    "vgg11",
    "resnet18",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "densenet121",
    "squeezenet1_0",
    "googlenet",
    "inception_v3",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mnasnet0_5",
    "shufflenet_v2_x0_5",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "convnext_tiny",
    "swin_t",
    "swin_v2_t",
    "vit_b_16",
    "maxvit_t",
    "lraspp_mobilenet_v3_large",
    "fcn_resnet50",
    "deeplabv3_mobilenet_v3_large",
]

_last: dict[str, tuple] = {}  # one model at a time: both modes of a model run back to back, and models are large


def model_and_request(name: str) -> tuple[nn.Module, list[torch.Tensor], tuple[list, list]]:
    if name not in _last:
        _last.clear()
        size = input_size(name, SMALLEST_SIZE)
        model = build_model(name, size)
        inputs = make_inputs(name, size, batch=1)
        _last[name] = (model, inputs, random_request(model, inputs, f"{SEED}:{name}:both", "both"))
    return _last[name]


@pytest.mark.parametrize("constrained", [False, True], ids=["unconstrained", "constrained"])
@pytest.mark.parametrize("name", SUBSET)
def test_zoo_subset(name: str, constrained: bool, tmp_path: Path) -> None:
    model, inputs, (pruned_inputs, pruned_outputs) = model_and_request(name)
    spec = prunespec.plan(model, inputs, pruned_inputs, pruned_outputs, constrained=constrained)
    path = tmp_path / f"{name}.prunespec.json"
    spec.save(path)
    stored = prunespec.load_spec(path)

    with torch.no_grad():
        expected = prunespec.mock(model, stored)(*inputs)
        pruned = prunespec.prune(copy.deepcopy(model), stored)
        actual = pruned(*inputs)
    diff, scale = max_difference(actual, expected), output_scale(expected)
    assert scale > NEAR_ZERO, "the mock's output is (almost) zero, so comparing with it says nothing"
    assert tolerated(diff, scale), (
        f"max |pruned - mock| = {diff:.3g} (output scale {scale:.3g}, tolerance {TOLERANCE:g})"
    )
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    if constrained:
        assert stored.summary.subselections == 0


# ------------------------------------------------------------------------------------------------------------ timm

# One timm model per kind of channel trick, at the smallest input `scripts/zoo_timm.py` finds for it, batch 1. (Dual
# paths, DPN, take as long as the rest together: the sweep covers them.)
TIMM_SUBSET = {
    "convnextv2_atto": 32,  # global response normalisation (a norm over channels)
    "nf_regnet_b0": 32,  # weight-standardised convolutions with gains, squeeze-excitation
    "coat_lite_tiny": 32,  # convolutional position encodings, factorised attention
    "ghostnet_050": 32,  # ghost modules: cheap channels concatenated, then cut to size
    "fasternet_t0": 32,  # partial convolutions: a split, a convolution of one part, a concatenation
    "resnest14d": 32,  # split attention: radix groups, a softmax across them
}


@pytest.mark.parametrize("constrained", [False, True], ids=["unconstrained", "constrained"])
@pytest.mark.parametrize("name", list(TIMM_SUBSET))
def test_timm_subset(name: str, constrained: bool, tmp_path: Path) -> None:
    pytest.importorskip("timm")
    from scripts.zoo_timm import create, takes_img_size

    key = f"timm:{name}"
    if key not in _last:
        _last.clear()
        size = TIMM_SUBSET[name]
        model = create(name, size, takes_img_size(name))
        from scripts.zoo import randomize

        randomize(model, size)
        inputs = make_inputs(name, size, batch=1)
        _last[key] = (model, inputs, random_request(model, inputs, f"{SEED}:{name}:both", "both"))
    model, inputs, (pruned_inputs, pruned_outputs) = _last[key]
    # ConvNeXt-V2 prunes only through its norms: every channel it has is normalised together by one.
    through_norms = name == "convnextv2_atto"
    spec = prunespec.plan(model, inputs, pruned_inputs, pruned_outputs, constrained=constrained,
                          through_norms=through_norms)  # fmt: skip
    path = tmp_path / f"{name}.prunespec.json"
    spec.save(path)
    stored = prunespec.load_spec(path)
    with torch.no_grad():
        expected = prunespec.mock(model, stored)(*inputs)
        pruned = prunespec.prune(copy.deepcopy(model), stored)
        actual = pruned(*inputs)
    diff, scale = max_difference(actual, expected), output_scale(expected)
    assert scale > NEAR_ZERO, "the mock's output is (almost) zero, so comparing with it says nothing"
    assert tolerated(diff, scale), f"max |pruned - mock| = {diff:.3g} (output scale {scale:.3g})"
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
