"""The invariant on real torchvision models, every mode, random patterns with fixed seeds (small inputs, float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import prunespec
from invariant import assert_invariant, assert_matches, max_difference, random_request
from nets import randomize_norms

MODELS = ["resnet18", "mobilenet_v2", "densenet121", "googlenet", "efficientnet_b0", "squeezenet1_0"]
EXTRA = {"googlenet": {"init_weights": False, "aux_logits": False}}


def zoo_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, **EXTRA.get(name, {})).double().eval()
    randomize_norms(model, seed)
    return model


def zoo_inputs(seed: int = 0, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("constrained,reorder", [(False, True), (False, False), (True, True), (True, False)])
def test_zoo_invariant(name, constrained, reorder, tmp_path):
    model, inputs = zoo_model(name), zoo_inputs()
    side = "input" if not constrained else "both"
    pruned_inputs, pruned_outputs = random_request(model, inputs, seed=len(name), fraction=0.3, side=side)
    spec, pruned, _ = assert_invariant(
        model, inputs, tmp_path, pruned_inputs=pruned_inputs, pruned_outputs=pruned_outputs,
        constrained=constrained, reorder=reorder,
    )
    assert spec.summary.parameters_after < spec.summary.parameters_before
    assert spec.summary.macs_after < spec.summary.macs_before
    if constrained:
        assert spec.summary.subselections == 0


def test_seed_example_resnet18_single_channel(tmp_path):
    """The seed's own example, through the seed-compatible facade."""
    net = zoo_model("resnet18")
    x = zoo_inputs(size=224)[0][:1]
    manager = prunespec.PruningManager(net).compute([x], pruned_inputs=[("layer1.1.conv1.weight", 5)])
    with torch.no_grad():
        y_mock = manager.get_mock_model()(x)
        manager.prune()
        y_pruned = net(x)
    assert net.layer1[1].conv1.in_channels == 63
    assert_matches(y_pruned, y_mock)
    assert manager.spec.summary.subselections == 1


def test_pruned_model_exports_with_torch_export():
    model = zoo_model("resnet18")
    inputs = zoo_inputs()
    request = random_request(model, inputs, 5, 0.3, "input")
    spec = prunespec.plan(model, inputs, *request)
    assert spec.summary.subselections > 0
    pruned = prunespec.prune(copy.deepcopy(model), spec)
    program = torch.export.export(pruned, tuple(inputs))
    with torch.no_grad():
        assert max_difference(program.module()(*inputs), pruned(*inputs)) == 0.0
        assert_matches(pruned(*inputs), prunespec.mock(model, spec)(*inputs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pruned_model_runs_on_cuda():
    model = zoo_model("mobilenet_v2")
    inputs = zoo_inputs()
    spec = prunespec.plan(model, inputs, *random_request(model, inputs, 1, 0.3, "input"))
    pruned = prunespec.prune(copy.deepcopy(model), spec).cuda()
    mock = prunespec.mock(model.cuda(), spec)
    x = inputs[0].cuda()
    with torch.no_grad():
        assert_matches(pruned(x), mock(x))
