"""Folding batch norms into the layer before them (`norm_folds`, `prune(..., fold_norms=True)`, `fold_norms`).

The planner must list a norm only where folding is exact: the norm reads a convolution's or linear layer's output
and nothing else does. The folded, pruned model must equal the mock in float64 for random patterns, and a fold that
does not fit the model is one `SpecError` that changes nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from invariant import assert_matches, max_difference, random_request
from nets import build, inputs_for, randomize_norms
from test_cli import assert_ok, assert_one_line_error, invoke, run_cli
from torch import nn

import prunespec
from prunespec.schemas import NormFold


def _folds(model: nn.Module, *shapes) -> list[tuple[str, str]]:
    spec = prunespec.plan(model, inputs_for(shapes))
    return [(f.norm, f.into) for f in spec.norm_folds]


class ConvNorm(nn.Module):
    """conv -> bn -> relu, then `tail` decides what else reads the convolution's output."""

    def __init__(self, tail: str = "", **norm):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4, **norm)
        self.tail = tail

    def forward(self, x):
        y = self.conv(x)
        if self.tail == "in_place":
            y.mul_(2)
        if self.tail == "shape":
            assert y.shape[1] == 4 and y.dim() == 4 and y.size(1) == 4
        z = torch.relu(self.bn(y))
        if self.tail == "also_added":
            return z + y
        if self.tail == "returned":
            return z, y
        if self.tail == "norm_twice":
            return self.bn(z)
        return z


class FunctionalNorm(ConvNorm):
    """The norm's statistics used through `F.batch_norm` in the parent's forward, not the norm's own."""

    def forward(self, x):
        bn = self.bn
        return nn.functional.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias)


class Scaled(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    ("tail", "norm", "expected"),
    [
        ("", {}, [("bn", "conv")]),
        ("shape", {}, [("bn", "conv")]),
        ("in_place", {}, []),
        ("also_added", {}, []),
        ("returned", {}, []),
        ("norm_twice", {}, []),
        ("", {"track_running_stats": False}, []),
    ],
    ids=["plain", "shape read", "changed in place", "also read", "also returned", "norm called twice", "no stats"],
)
def test_a_norm_is_listed_only_where_nothing_else_reads_the_layer_output(tail, norm, expected):
    assert _folds(ConvNorm(tail, **norm).double().eval(), (1, 3, 6, 6)) == expected


def test_layers_the_applier_cannot_fold_into_are_not_listed():
    for first in (Scaled(3, 4, 3), nn.ConvTranspose2d(3, 4, 3)):
        assert _folds(nn.Sequential(first, nn.BatchNorm2d(4)).double().eval(), (1, 3, 6, 6)) == []
    assert _folds(FunctionalNorm().double().eval(), (1, 3, 6, 6)) == []


def test_depthwise_convolutions_and_linear_layers_fold():
    depthwise = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6))
    assert _folds(depthwise.double().eval(), (1, 3, 6, 6)) == [("2", "1")]
    mlp = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 2))
    assert _folds(mlp.double().eval(), (4, 5)) == [("1", "0")]


def test_norms_after_a_concatenation_are_not_listed():
    model = torchvision.models.densenet121(weights=None).double().eval()
    folds = _folds(model, (1, 3, 32, 32))
    norms = {norm for norm, _ in folds}
    assert "features.denseblock1.denselayer1.norm2" in norms  # reads conv1 alone
    assert not any(norm.endswith("norm1") for norm in norms)  # reads torch.cat of earlier features
    assert len(folds) == 59


def _torchvision(name: str, seed: int) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None).double().eval()
    randomize_norms(model, seed)
    return model, inputs_for([(2, 3, 48, 48)], seed)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
@pytest.mark.parametrize("constrained", [False, True], ids=["unconstrained", "constrained"])
def test_a_folded_pruned_model_equals_the_mock(name, seed, constrained):
    model, inputs = _torchvision(name, seed)
    spec = prunespec.plan(model, inputs, *random_request(model, inputs, seed, 0.3, "both"), constrained=constrained)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(spec.norm_folds) == norms

    pruned = prunespec.prune(copy.deepcopy(model), spec, fold_norms=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())
    with torch.no_grad():
        # Folding rounds differently from the mock, (w·s)·x against s·(w·x): a few roundings more per layer.
        assert_matches(pruned(*inputs), prunespec.mock(model, spec)(*inputs))


def test_folding_an_unpruned_model_keeps_its_output_and_drops_the_norm_keys():
    model, inputs = _torchvision("resnet18", 0)
    spec = prunespec.plan(model, inputs)
    folded = prunespec.fold_norms(copy.deepcopy(model), spec)
    with torch.no_grad():
        assert_matches(folded(*inputs), model(*inputs))
    keys = set(folded.state_dict())
    assert not any(".bn" in key or key.startswith("bn1") for key in keys)
    assert {"conv1.bias", "layer1.0.conv1.bias", "layer2.0.downsample.0.bias"} <= keys


def test_a_folded_checkpoint_loads_into_a_model_built_from_the_spec(tmp_path):
    model, inputs = _torchvision("mobilenet_v2", 0)
    spec = prunespec.plan(model, inputs, *random_request(model, inputs, 0, 0.3, "input"))
    folded = prunespec.prune(copy.deepcopy(model), spec, fold_norms=True)
    torch.save(folded.state_dict(), tmp_path / "folded.pt")

    with torch.device("meta"):
        skeleton = torchvision.models.mobilenet_v2(weights=None).double().eval()
    rebuilt = prunespec.build_pruned(skeleton, spec, fold_norms=True)
    state = torch.load(tmp_path / "folded.pt", weights_only=True)
    rebuilt.load_state_dict(state, strict=True, assign=True)
    with torch.no_grad():
        assert max_difference(rebuilt(*inputs), folded(*inputs)) == 0.0

    # Or load the unfolded pruned checkpoint and fold after loading.
    with torch.device("meta"):
        skeleton = torchvision.models.mobilenet_v2(weights=None).double().eval()
    unfolded = prunespec.prune(copy.deepcopy(model), spec).state_dict()
    prunespec.build_pruned(skeleton, spec).load_state_dict(unfolded, strict=True, assign=True)
    with torch.no_grad():
        assert max_difference(prunespec.fold_norms(skeleton, spec)(*inputs), folded(*inputs)) == 0.0


def _bad(spec: prunespec.PruningSpec, **change) -> prunespec.PruningSpec:
    fold = spec.norm_folds[0]
    return prunespec.PruningSpec(
        **{f: getattr(spec, f) for f in spec.__struct_fields__ if f != "norm_folds"},
        norm_folds=[NormFold(change.get("norm", fold.norm), change.get("into", fold.into)), *spec.norm_folds[1:]],
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"norm": "layer1.0.bnn1"}, r"^norm_folds\[0\]: the model has no module 'layer1.0.bnn1'; did you mean"),
        ({"norm": "relu"}, r"'relu' is a ReLU, not a batch norm that can be folded"),
        ({"into": "layer1"}, r"'layer1' is a Sequential; a norm folds only into a convolution or linear layer"),
        ({"into": "layer1.0.conv1"}, r"'layer1.0.conv1' makes 64 channels but 'bn1' normalises 48"),
    ],
    ids=["missing", "not a norm", "not a layer", "widths"],
)
def test_a_fold_that_does_not_fit_is_one_error_and_changes_nothing(change, message):
    model, inputs = _torchvision("resnet18", 0)
    spec = prunespec.plan(model, inputs, pruned_outputs=[("conv1.weight", c) for c in range(16)], constrained=True)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(prunespec.SpecError, match=message):
        prunespec.prune(model, _bad(spec, **change), fold_norms=True)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_validate_reports_every_fold_that_does_not_fit():
    from prunespec.applier.validate import problems

    model, inputs = _torchvision("resnet18", 0)
    spec = prunespec.plan(model, inputs)
    folds = [NormFold("relu", spec.norm_folds[0].into), spec.norm_folds[1], NormFold(spec.norm_folds[2].norm, "fc")]
    fields = {f: getattr(spec, f) for f in spec.__struct_fields__ if f != "norm_folds"}
    bad = prunespec.PruningSpec(**fields, norm_folds=folds + spec.norm_folds[3:])
    assert problems(model, spec) == []
    assert problems(model, bad) == [
        "norm_folds[0]: 'relu' is a ReLU, not a batch norm that can be folded",
        "norm_folds[2]: 'fc' makes 1000 channels but 'layer1.0.bn2' normalises 64; the spec's layers do not fit together",
    ]


def test_a_hooked_norm_is_not_folded():
    model, inputs = build("batchnorm_between")
    spec = prunespec.plan(model, inputs)
    assert spec.norm_folds
    norm = model.get_submodule(spec.norm_folds[0].norm)
    norm.register_forward_hook(lambda module, args, out: None)
    with pytest.raises(prunespec.SpecError, match="has forward hooks, which would see folded values"):
        prunespec.prune(copy.deepcopy(model), spec, fold_norms=True)
    assert prunespec.prune(copy.deepcopy(model), spec)  # without folding the hook is no concern


def test_the_cli_folds_verifies_and_refuses_folding_a_mock(tmp_path):
    spec_path = tmp_path / "tiny.prunespec.json"
    tiny = ["models_for_cli:tiny_net"]
    request = ["--input-shape", "1x3x16x16", "--prune-input", "3.weight:0-2"]
    assert_ok(invoke("plan", *tiny, "-o", spec_path, *request, cwd=tmp_path))
    result = run_cli("apply", spec_path, *tiny, "-o", tmp_path / "out.pt", "--fold-norms", "--verify", cwd=tmp_path)
    assert_ok(result)
    assert "1 batch norms folded" in result.stdout and "max |pruned - mock| = " in result.stdout
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert "1.running_mean" not in state and state["0.bias"].shape == (5,)

    refused = invoke("apply", spec_path, *tiny, "-o", tmp_path / "mock.pt", "--fold-norms", "--mock", cwd=tmp_path)
    assert_one_line_error(refused, "--fold-norms")
    assert not (tmp_path / "mock.pt").exists()
