"""Channels-last layout for inference (`prunespec.to_channels_last`, `apply --channels-last`).

The laid-out model must still equal the mock in float64 for random patterns, folded or not; the gathers the cost
model picks must become zero columns and the rest must stay gathers; and the CLI writes such a model only as an
exported program.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from invariant import assert_matches, max_difference, random_request, rounding_bound
from nets import inputs_for, randomize_norms
from test_cli import assert_ok, assert_one_line_error, invoke_all, run_all
from torch import nn

import prunespec
from prunespec.applier import INDICES_BUFFER, InputSubselection
from prunespec.applier.layout import fill_pays


def _subselections(model: nn.Module) -> dict[str, InputSubselection]:
    return {
        name: hook
        for name, module in model.named_modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, InputSubselection)
    }


def _planned(name: str, seed: int, dtype: torch.dtype = torch.float64, **plan_kwargs):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None).to(dtype).eval()
    randomize_norms(model, seed)
    inputs = [x.to(dtype) for x in inputs_for([(2, 3, 64, 64)], seed)]
    spec = prunespec.plan(model, inputs, *random_request(model, inputs, seed, 0.3, "input"), **plan_kwargs)
    return model, inputs, spec


MODES = {
    "reordered": {},
    "not reordered": {"reorder": False},  # more gathers: no slices
    "constrained": {"constrained": True},  # no gathers at all: only the layout changes
}


@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "folded"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "densenet121"])
def test_a_channels_last_pruned_model_equals_the_mock(name, seed, mode, fold):
    model, inputs, spec = _planned(name, seed, **MODES[mode])
    pruned = prunespec.prune(copy.deepcopy(model), spec, fold_norms=fold)
    before = _subselections(pruned)
    gathers = {n: h for n, h in before.items() if h.start is None}
    read = {n: (getattr(pruned.get_submodule(n), INDICES_BUFFER), pruned.get_submodule(n).weight) for n in gathers}

    prunespec.to_channels_last(pruned)

    after = _subselections(pruned)
    filled = [n for n in gathers if n not in after]
    if mode == "constrained":
        assert not before and not after
    else:
        assert filled, "the pattern should give at least one gather worth filling"
    for n in filled:
        module = pruned.get_submodule(n)
        assert module.weight.shape[1] == gathers[n].channels == module.in_channels
        assert INDICES_BUFFER not in module._buffers
        indices, weight = read[n]
        assert torch.equal(module.weight[:, indices], weight)
        unread = torch.ones(gathers[n].channels, dtype=torch.bool)
        unread[indices] = False
        assert unread.any() and module.weight[:, unread].count_nonzero() == 0
    for n, hook in after.items():
        assert n in before and (hook.start is not None or not fill_pays(pruned.get_submodule(n), hook.channels))
    for tensor in pruned.state_dict().values():
        if tensor.dim() == 4:
            assert tensor.is_contiguous(memory_format=torch.channels_last)

    with torch.no_grad():
        assert_matches(pruned(*inputs), prunespec.mock(model, spec)(*inputs))


def test_an_unpruned_model_only_changes_layout():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        laid_out = prunespec.to_channels_last(copy.deepcopy(model))
        assert_matches(laid_out(x), expected)
    assert laid_out.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert laid_out.layer1[0].conv1.weight.shape == model.layer1[0].conv1.weight.shape


class Doubled(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


CONSUMERS = {
    "grouped": lambda: nn.Conv2d(4, 4, 1, groups=2),
    "own forward": lambda: Doubled(2, 8, 1),
    "too little saved": lambda: nn.Conv2d(2, 64, 1),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("make", CONSUMERS.values(), ids=CONSUMERS)
def test_a_gather_that_cannot_or_should_not_be_filled_stays(make, seed):
    channels = 8  # the plain Doubled would be filled: 6 zero columns x 8 outputs <= 128 x 2 channels read
    torch.manual_seed(seed)
    consumer = make().double()
    indices = torch.arange(consumer.in_channels) * 2
    consumer.register_buffer(INDICES_BUFFER, indices, persistent=False)
    hook = InputSubselection(axis=-3, start=None, length=len(indices), channels=channels)
    consumer.register_forward_pre_hook(hook)
    x = torch.randn(1, channels, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        before = consumer(x)
        prunespec.to_channels_last(consumer)
        after = consumer(x)
    assert list(consumer._forward_pre_hooks.values()) == [hook] and INDICES_BUFFER in consumer._buffers
    assert consumer.weight.shape[1] * consumer.groups == consumer.in_channels == len(indices)
    # Only the memory layout changed, so only the summation order may: each output sums one row of the weight times
    # the input, and the bias (Doubled doubles that, exactly).
    weight, bias = consumer.weight.flatten(1), consumer.bias
    magnitude = 2 * (x.abs().max() * weight.abs().sum(1).max() + bias.abs().max()).item()
    assert max_difference(after, before) <= rounding_bound(torch.float64, weight.shape[1] + 1, magnitude)


def test_the_cli_writes_a_channels_last_program_and_refuses_other_outputs(tmp_path):
    model, inputs, spec = _planned("mobilenet_v2", 0, torch.float32)  # the CLI builds the model in float32
    spec_path = tmp_path / "mobilenet_v2.prunespec.json"
    spec.save(spec_path)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    pruned = prunespec.prune(copy.deepcopy(model), spec)
    gathers = {n: h for n, h in _subselections(pruned).items() if h.start is None}
    filled = [n for n, h in gathers.items() if fill_pays(pruned.get_submodule(n), h.channels)]
    assert filled

    apply = ["apply", spec_path, "torchvision:mobilenet_v2", "--weights", tmp_path / "weights.pt", "--channels-last"]
    runs = run_all({"pt2": [*apply, "-o", "out.pt2", "--fold-norms", "--verify"]}, tmp_path) | invoke_all(
        {"state": [*apply, "-o", "out.safetensors"], "mock": [*apply, "-o", "out.pt2", "--mock"]}, tmp_path
    )
    assert_ok(runs["pt2"])
    assert "channels-last" in runs["pt2"].stdout and "max |pruned - mock| = " in runs["pt2"].stdout
    assert runs["pt2"].stderr == "exporting out.pt2 (torch.export) ...\n"  # progress only, none of torch's warnings
    program = torch.export.load(tmp_path / "pt2" / "out.pt2")
    weights = program.state_dict
    for name in filled:
        assert weights[f"{name}.weight"].shape[1] == gathers[name].channels
    # The stored channels-last weights come back with their values: the program computes what the model did (in
    # float64, where the summation order of the two runs alone moves far fewer digits than TOLERANCE).
    laid_out = prunespec.to_channels_last(prunespec.prune(copy.deepcopy(model), spec, fold_norms=True))
    assert all(torch.equal(weights[key], tensor) for key, tensor in laid_out.state_dict().items())
    with torch.no_grad():
        assert_matches(program.module().double()(inputs[0].double()), laid_out.double()(inputs[0].double()))
    assert_one_line_error(runs["state"], "--channels-last", ".pt2")
    assert_one_line_error(runs["mock"], "--mock", "--channels-last")
    assert not any((tmp_path / "state").iterdir()) and not any((tmp_path / "mock").iterdir())
