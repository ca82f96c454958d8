"""Tests of the applier (`prunespec.applier`): check, prune and mock on small hand-built models and specs.

Every spec here is written by hand, so these tests do not depend on the planner. The central check is the
invariant of DESIGN.md: `prune(copy, spec)(x) == mock(model, spec)(x)` in float64 within 1e-12.
"""

from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from invariant import assert_matches, max_difference
from torch import nn

from prunespec.applier import RULES, GENERIC, InputSubselection, Rule, check, mock, prune, rule_for
from prunespec.applier.validate import _decode_together, decode_kept, problems, select_kept
from prunespec.errors import SpecError
from prunespec.schemas import LayerSpec, PruningSpec, Request, Subselection, Summary, encode_runs, parse_runs

KEEP = "0,2-4,6-7"  # channels 1 and 5 of 8 pruned
KEEP_LIST = [0, 2, 3, 4, 6, 7]


# ---------------------------------------------------------------------------------------------- helpers


def fingerprint_of(model: nn.Module) -> dict[str, str]:
    # Written out here rather than imported, so a change of format in the applier shows up as a failure.
    return {
        k: f"{str(t.dtype).removeprefix('torch.')}[{','.join(str(n) for n in t.shape)}]"
        for k, t in model.state_dict().items()
    }


def make_spec(model: nn.Module, layers: dict[str, LayerSpec]) -> PruningSpec:
    return PruningSpec(
        model=type(model).__name__,
        inputs=[],
        request=Request([], [], constrained=False, reorder=False),
        summary=Summary(0, 0, 0, 0, 0),
        layers=layers,
        fingerprint=fingerprint_of(model),
    )


def randomize(model: nn.Module) -> nn.Module:
    """Float64, eval mode, seeded initial weights, and non-trivial batch-norm statistics and affine parameters."""
    torch.manual_seed(0)
    model = model.double().eval()
    for m in model.modules():
        if hasattr(m, "reset_parameters"):  # drawn again here: the model was built before the seed was set
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    return model


def snapshot(model: nn.Module) -> dict:
    """Everything a failed prune must leave alone: tensors (values, dtypes, identity), attributes, hooks."""
    state = {}
    for name, m in model.named_modules():
        tensors = {k: (id(t), t.detach().clone()) for k, t in {**m._parameters, **m._buffers}.items() if t is not None}
        plain = {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, tuple)) or v is None}
        hooks = (len(m._forward_pre_hooks), len(m._forward_hooks), sorted(m._non_persistent_buffers_set))
        state[name] = (tensors, plain, hooks, type(m))
    return state


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        (t0, plain0, hooks0, type0), (t1, plain1, hooks1, type1) = before[name], after[name]
        assert plain0 == plain1 and hooks0 == hooks1 and type0 is type1, name
        assert t0.keys() == t1.keys(), name
        for k in t0:
            assert t0[k][0] == t1[k][0], f"{name}.{k} was replaced"
            assert t0[k][1].dtype == t1[k][1].dtype and torch.equal(t0[k][1], t1[k][1]), f"{name}.{k} changed"


class Scale(nn.Module):
    """A per-channel scale with no rule of its own: the generic rule slices its parameter and buffer."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, channels).view(channels, 1, 1))
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, channels).view(channels, 1, 1), persistent=False)

    def forward(self, x):
        return x * self.gamma + self.shift


def conv_net() -> nn.Sequential:
    return randomize(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), Scale(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    )


def conv_spec(model: nn.Module, keep: str = KEEP, n: int = 6) -> PruningSpec:
    return make_spec(
        model,
        {
            "0": LayerSpec("Conv2d", {"out_channels": n}, {"weight": [keep], "bias": [keep]}),
            "1": LayerSpec(
                "BatchNorm2d",
                {"num_features": n},
                {"weight": [keep], "bias": [keep], "running_mean": [keep], "running_var": [keep]},
            ),
            "2": LayerSpec("Scale", {}, {"gamma": [keep], "shift": [keep]}),
            "4": LayerSpec("Conv2d", {"in_channels": n}, {"weight": [None, keep]}),
        },
    )


def assert_mock_matches_prune(model: nn.Module, spec: PruningSpec, *inputs: torch.Tensor) -> nn.Module:
    reference = mock(model, spec)
    pruned = prune(copy.deepcopy(model), spec)
    with torch.no_grad():
        expected, got = reference(*inputs), pruned(*inputs)
    for e, g in zip(expected if isinstance(expected, tuple) else [expected], got if isinstance(got, tuple) else [got]):
        assert e.shape == g.shape
        assert_matches(g, e)
    return pruned


# ---------------------------------------------------------------------------------------------- prune and mock


def test_conv_bn_prune_matches_mock_and_keeps_state_dict_keys():
    model = conv_net()
    model[0].bias.requires_grad_(False)
    spec = conv_spec(model)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    pruned = assert_mock_matches_prune(model, spec, x)

    with torch.no_grad():  # the test is not vacuous: pruning changed the output
        assert max_difference(pruned(x), model(x)) > 1e-3
    assert pruned.state_dict().keys() == model.state_dict().keys()
    assert pruned[0].weight.shape == (6, 3, 3, 3) and pruned[0].bias.shape == (6,)
    assert pruned[1].running_var.shape == (6,) and pruned[2].gamma.shape == (6, 1, 1)
    assert pruned[4].weight.shape == (4, 6, 3, 3)
    assert torch.equal(pruned[4].weight, model[4].weight[:, KEEP_LIST])
    assert torch.equal(pruned[1].running_mean, model[1].running_mean[KEEP_LIST])
    assert (pruned[0].out_channels, pruned[1].num_features, pruned[4].in_channels) == (6, 6, 6)
    assert pruned[1].num_batches_tracked.shape == ()  # not listed, untouched
    # Parameters stay Parameters with their requires_grad; buffers stay buffers with their persistence.
    assert isinstance(pruned[0].bias, nn.Parameter) and not pruned[0].bias.requires_grad
    assert isinstance(pruned[0].weight, nn.Parameter) and pruned[0].weight.requires_grad
    assert "running_mean" in pruned[1]._buffers and "shift" in pruned[2]._non_persistent_buffers_set
    assert "2.shift" not in pruned.state_dict()

    target = copy.deepcopy(pruned)
    target.load_state_dict(pruned.state_dict(), strict=True)
    # A pruned checkpoint does not fit the unpruned model.
    with pytest.raises(RuntimeError):
        copy.deepcopy(model).load_state_dict(pruned.state_dict(), strict=True)


def test_check_computes_changes_without_touching_the_model():
    model = conv_net()
    before = snapshot(model)
    changes = check(model, conv_spec(model))
    assert_unchanged(before, snapshot(model))
    assert [c.name for c in changes] == ["0", "1", "2", "4"]
    assert changes[0].tensors["weight"].shape == (6, 3, 3, 3) and changes[0].attributes == {"out_channels": 6}
    assert [k.tolist() for k in changes[0].kept["weight"]] == [KEEP_LIST]


def test_reordered_spec():
    model = conv_net()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    # A pure permutation changes nothing the network computes.
    permuted = assert_mock_matches_prune(model, conv_spec(model, "3-7,0-2", 8), x)
    with torch.no_grad():
        assert_matches(permuted(x), model(x))
    assert torch.equal(permuted[0].weight, model[0].weight[[3, 4, 5, 6, 7, 0, 1, 2]])
    # A permutation that also removes channels 1 and 4.
    pruned = assert_mock_matches_prune(model, conv_spec(model, "5-7,0,2-3", 6), x)
    assert torch.equal(pruned[1].weight, model[1].weight[[5, 6, 7, 0, 2, 3]])


def test_linear_mlp_with_batchnorm1d():
    model = randomize(
        nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))
    )
    hidden, last = "0-3,8,10-15", "1-2,5"
    bn = {t: [hidden] for t in ("weight", "bias", "running_mean", "running_var")}
    spec = make_spec(
        model,
        {
            "0": LayerSpec("Linear", {"out_features": 11}, {"weight": [hidden], "bias": [hidden]}),
            "1": LayerSpec("BatchNorm1d", {"num_features": 11}, bn),
            "3": LayerSpec(
                "Linear", {"in_features": 11, "out_features": 3}, {"weight": [last, hidden], "bias": [last]}
            ),
            "5": LayerSpec("Linear", {"in_features": 3}, {"weight": [None, last]}),
        },
    )
    pruned = assert_mock_matches_prune(model, spec, torch.randn(7, 5, dtype=torch.float64))
    assert [p.shape for p in pruned.parameters()] == [
        (11, 5), (11,), (11,), (11,), (3, 11), (3,), (3, 3), (3,)
    ]
    assert (pruned[3].in_features, pruned[3].out_features, pruned[5].in_features) == (11, 3, 3)


def test_grouped_depthwise_and_transposed_convolutions():
    model = randomize(
        nn.Sequential(
            nn.Conv1d(2, 8, 3, padding=1),
            nn.Conv1d(8, 8, 3, padding=1, groups=8),  # depthwise: a user, its groups follow the channels
            nn.ConvTranspose1d(8, 6, 2, stride=2),
            nn.Conv1d(6, 4, 1, groups=2),
        )
    )
    out = "0,2-3,5"  # of the transposed conv's 6 outputs: positions 0 and 2 of each group of 3 of the conv after it
    spec = make_spec(
        model,
        {
            "0": LayerSpec("Conv1d", {"out_channels": 6}, {"weight": [KEEP], "bias": [KEEP]}),
            "1": LayerSpec(
                "Conv1d", {"in_channels": 6, "out_channels": 6, "groups": 6}, {"weight": [KEEP], "bias": [KEEP]}
            ),
            "2": LayerSpec(
                "ConvTranspose1d", {"in_channels": 6, "out_channels": 4}, {"weight": [KEEP, out], "bias": [out]}
            ),
            "3": LayerSpec("Conv1d", {"in_channels": 4}, {"weight": [None, "0,2"]}),
        },
    )
    pruned = assert_mock_matches_prune(model, spec, torch.randn(3, 2, 5, dtype=torch.float64))
    assert pruned[2].weight.shape == (6, 4, 2) and pruned[1].groups == 6 and pruned[3].weight.shape == (4, 2, 1)


class Fork(nn.Module):
    """One producer read by three consumers that each need a different part of its channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(8, 4, 3)
        self.b = nn.Conv2d(8, 4, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return self.a(y) + self.b(y), self.fc(y.mean((2, 3)))


def fork_spec(model: Fork) -> PruningSpec:
    # The stem drops channel 5, which no consumer reads; the pruned activation has 7 channels, where original
    # channels 0-4 sit at positions 0-4 and channels 6, 7 at positions 5, 6.
    return make_spec(
        model,
        {
            "stem": LayerSpec("Conv2d", {"out_channels": 7}, {"weight": ["0-4,6-7"], "bias": ["0-4,6-7"]}),
            "a": LayerSpec(
                "Conv2d", {"in_channels": 6}, {"weight": [None, "0-1,3-4,6-7"]}, Subselection(7, "0-1,3-6")
            ),
            "b": LayerSpec("Conv2d", {"in_channels": 3}, {"weight": [None, "2-4"]}, Subselection(7, "2-4")),
            "fc": LayerSpec("Linear", {"in_features": 4}, {"weight": [None, "7,0-2"]}, Subselection(7, "6,0-2")),
        },
    )


def test_input_subselection_hooks_and_export():
    model = randomize(Fork())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pruned = assert_mock_matches_prune(model, fork_spec(model), x)
    assert pruned.state_dict().keys() == model.state_dict().keys()

    hooks = {name: list(getattr(pruned, name)._forward_pre_hooks.values()) for name in ("stem", "a", "b", "fc")}
    assert hooks["stem"] == [] and all(len(h) == 1 and isinstance(h[0], InputSubselection) for h in
                                       (hooks["a"], hooks["b"], hooks["fc"]))
    assert (hooks["b"][0].start, hooks["b"][0].length) == (2, 3)  # one ascending run: a slice
    assert hooks["a"][0].start is None and hooks["fc"][0].start is None  # gathers
    assert pruned.fc._prunespec_input_indices.tolist() == [6, 0, 1, 2]
    assert "_prunespec_input_indices" in pruned.fc._non_persistent_buffers_set

    y = torch.arange(14.0).view(2, 7)
    assert hooks["fc"][0](pruned.fc, (y,))[0].tolist() == [[6, 0, 1, 2], [13, 7, 8, 9]]
    z = torch.randn(2, 7, 4, 4)
    (sliced,) = hooks["b"][0](pruned.b, (z,))
    assert torch.equal(sliced, z[:, 2:5]) and sliced.data_ptr() == z[:, 2:5].data_ptr()  # no copy
    assert torch.equal(hooks["a"][0](pruned.a, (z,))[0], z[:, [0, 1, 3, 4, 5, 6]])

    exported = torch.export.export(pruned, (x,))
    with torch.no_grad():
        for e, g in zip(exported.module()(x), pruned(x)):
            assert_matches(e, g)


def test_subselection_on_unbatched_convolution_input():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)))
    spec = make_spec(model, {"1": LayerSpec("Conv2d", {"in_channels": 2}, {"weight": [None, "3,1"]},
                                            Subselection(4, "3,1"))})
    pruned = prune(copy.deepcopy(model), spec)
    x = torch.randn(3, 5, 5, dtype=torch.float64)  # no batch axis: channels are axis -3 either way
    with torch.no_grad():
        assert_matches(pruned(x), mock(model, spec)(x))


def test_pruned_model_deepcopies_pickles_and_moves():
    model = randomize(Fork())
    pruned = prune(copy.deepcopy(model), fork_spec(model))
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = pruned(x)
        buffer = io.BytesIO()
        torch.save(pruned, buffer)
        buffer.seek(0)
        for clone in (copy.deepcopy(pruned), pickle.loads(pickle.dumps(pruned)),
                      torch.load(buffer, weights_only=False)):
            assert isinstance(next(iter(clone.a._forward_pre_hooks.values())), InputSubselection)
            for e, g in zip(expected, clone(x)):
                assert torch.equal(e, g)
    moved = copy.deepcopy(pruned).float().to("meta")
    assert moved.fc._prunespec_input_indices.device.type == "meta"
    assert moved.fc._prunespec_input_indices.dtype == torch.int64  # a dtype cast leaves the indices alone


def test_empty_spec_is_a_validated_no_op():
    model = conv_net()
    before = snapshot(model)
    assert prune(model, make_spec(model, {})) is model
    assert_unchanged(before, snapshot(model))
    bad = make_spec(model, {})
    bad.fingerprint["0.weight"] = "float32[1]"
    with pytest.raises(SpecError, match="'0.weight'"):
        prune(model, bad)


def test_spec_applied_twice_is_refused():
    model = conv_net()
    spec = conv_spec(model)
    prune(model, spec)
    message = (
        "fingerprint: the spec was planned for Sequential (10 tensors); the model (Sequential) differs in 8 of them "
        "(first: tensor '0.weight' is float64[8,3,3,3] in the spec but float64[6,3,3,3] in the model); was the spec "
        "applied to it already?"
    )
    with pytest.raises(SpecError, match=f"^{re.escape(message)}$"):
        prune(model, spec)


def test_a_spec_of_another_model_says_whose_it_is():
    model = conv_net()
    spec = conv_spec(model)
    spec.model = "models:conv_net"
    other = randomize(Fork())
    before = snapshot(other)
    message = (
        "fingerprint: the spec was planned for models:conv_net (10 tensors); the model (Fork) differs in 10 of them "
        "and has 8 more (first: it has no tensor '0.weight')"
    )
    with pytest.raises(SpecError, match=f"^{re.escape(message)}$"):
        prune(other, spec)
    assert problems(other, spec) == [message]  # and no guesses at similar names for each tensor and layer
    assert_unchanged(before, snapshot(other))
    # A few tensors that differ are still named one by one.
    spec = conv_spec(model)
    spec.fingerprint["4.bias"] = "float64[5]"
    assert problems(model, spec) == [
        "fingerprint: tensor '4.bias' is float64[5] in the spec but float64[4] in the model (was the spec planned for "
        "another model, or applied already?)"
    ]


def test_mock_leaves_the_model_unchanged_and_passes_gradients():
    model = conv_net()
    spec = conv_spec(model)
    before = snapshot(model)
    reference = mock(model, spec)
    assert reference.model is model and reference.spec is spec
    assert reference.state_dict().keys() == {"model." + k for k in model.state_dict()}
    reference(torch.randn(2, 3, 9, 9, dtype=torch.float64)).sum().backward()
    assert_unchanged(before, snapshot(model))
    grad = model[0].weight.grad
    assert grad[[1, 5]].abs().sum() == 0 and grad[KEEP_LIST].abs().sum() > 0
    assert reference.eval() is reference and not model.training


def test_mock_follows_dtype_and_device():
    model = conv_net()
    reference = mock(model, conv_spec(model)).float().to("meta")
    assert model[0].weight.dtype == torch.float32 and model[0].weight.device.type == "meta"
    assert reference(torch.randn(1, 3, 9, 9, device="meta")).shape == (1, 4, 7, 7)


def test_mock_treats_nonfinite_pruned_entries_as_removed():
    model = conv_net()
    spec = conv_spec(model)
    with torch.no_grad():
        model[4].weight[:, 5] = float("inf")  # input channel 5 of the last conv is pruned
    assert_mock_matches_prune(model, spec, torch.randn(1, 3, 9, 9, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- rules


def test_rules_are_found_through_the_mro_and_can_be_added(monkeypatch):
    class MyConv(nn.Conv2d):
        pass

    assert rule_for(MyConv(3, 3, 1)) is RULES[nn.Conv2d]
    assert rule_for(nn.ReLU()) is GENERIC and rule_for(Scale(2)) is GENERIC

    class ScaleRule(Rule):
        attributes = frozenset({"channels"})

        def check(self, attributes, tensors):
            if attributes["channels"] != tensors["gamma"].shape[0]:
                return f"attribute 'channels' is {attributes['channels']} but gamma has {tensors['gamma'].shape[0]}"
            return None

    monkeypatch.setitem(RULES, Scale, ScaleRule())
    model = randomize(nn.Sequential(Scale(4)))
    model[0].channels = 4
    good = make_spec(model, {"0": LayerSpec("Scale", {"channels": 2}, {"gamma": ["1-2"], "shift": ["1-2"]})})
    assert prune(copy.deepcopy(model), good)[0].channels == 2
    bad = make_spec(model, {"0": LayerSpec("Scale", {"channels": 3}, {"gamma": ["1-2"], "shift": ["1-2"]})})
    with pytest.raises(SpecError, match="layer '0': attribute 'channels' is 3 but gamma has 2"):
        check(model, bad)


# ---------------------------------------------------------------------------------------------- bad specs


def _set(path, value):
    """A spec edit: set the attribute or item at `path` (a list of keys) to `value`."""

    def edit(spec):
        target = spec
        for key in path[:-1]:
            target = target[key] if isinstance(target, dict) else getattr(target, key)
        if isinstance(target, dict):
            target[path[-1]] = value
        else:
            setattr(target, path[-1], value)

    return edit


def _all(*edits):
    """Several spec edits, in order."""
    return lambda spec: [edit(spec) for edit in edits]


def _delete_fingerprint(key):
    return lambda spec: spec.fingerprint.pop(key)


BAD_SPECS = {
    "newer schema_version": (_set(["schema_version"], "9.0"), r"^schema_version: .*'9.0'"),
    "fingerprint shape mismatch": (
        _set(["fingerprint", "4.weight"], "float32[4,8,5,5]"),
        r"^fingerprint: tensor '4.weight' is float32\[4,8,5,5\] in the spec but float64\[4,8,3,3\] in the model",
    ),
    "fingerprint integer dtype mismatch": (
        _set(["fingerprint", "1.num_batches_tracked"], "int32[]"),
        r"^fingerprint: tensor '1.num_batches_tracked' is int32\[\] in the spec but int64\[\] in the model",
    ),
    "fingerprint key missing from the spec": (
        _delete_fingerprint("1.running_var"),
        r"^fingerprint: the model has tensor '1.running_var' \(float64\[8\]\) that the spec does not list",
    ),
    "fingerprint key missing from the model": (
        _set(["fingerprint", "0.weights"], "float64[8,3,3,3]"),
        r"^fingerprint: the spec expects tensor '0.weights' .* did you mean '0.weight'",
    ),
    "unknown layer": (_set(["layers", "9"], LayerSpec("Conv2d")), r"^layer '9': no such module"),
    "wrong type name": (
        _set(["layers", "1", "type"], "BatchNorm1d"),
        r"^layer '1': type: the spec says 'BatchNorm1d' but the model has 'BatchNorm2d'$",
    ),
    "unknown tensor": (_set(["layers", "0", "tensors", "weights"], ["0"]), r"^layer '0': tensor 'weights': not a"),
    "index out of range": (
        _set(["layers", "4", "tensors", "weight"], [None, "0,2-4,6-8"]),
        r"^layer '4': tensor 'weight' axis 1: index 8 is out of range for size 8$",
    ),
    "huge index run": (
        _set(["layers", "4", "tensors", "weight"], [None, "0-2000000000"]),
        r"^layer '4': tensor 'weight' axis 1: index 2000000000 is out of range for size 8$",
    ),
    "duplicate index": (
        _set(["layers", "2", "tensors", "gamma"], ["0,2-4,6-7,3"]),
        r"^layer '2': tensor 'gamma' axis 0: index 3 appears twice$",
    ),
    "malformed runs": (_set(["layers", "0", "tensors", "bias"], ["1;2"]), r"^layer '0': tensor 'bias' axis 0: "),
    "too many axes": (
        _set(["layers", "0", "tensors", "bias"], [KEEP, None]),
        r"^layer '0': tensor 'bias': 2 axes listed but it has only 1$",
    ),
    "bad attribute name": (
        _set(["layers", "0", "attributes", "out_features"], 6),
        r"^layer '0': attribute 'out_features': a Conv2d takes no such attribute",
    ),
    "attribute on a generic module": (
        _set(["layers", "2", "attributes", "channels"], 6),
        r"^layer '2': attribute 'channels': a Scale takes no such attribute \(accepted: none\)",
    ),
    "inconsistent attribute": (
        _set(["layers", "0", "attributes", "out_channels"], 5),
        r"^layer '0': attribute 'out_channels' is 5 but weight axis 0 has 6$",
    ),
    "missing attribute": (
        _set(["layers", "4", "attributes"], {}),
        r"^layer '4': attribute 'in_channels' is 8 but weight axis 1 has 6",
    ),
    "inconsistent batch norm": (
        _set(["layers", "1", "tensors", "running_var"], [None]),
        r"^layer '1': tensor 'running_var' has 8 entries but attribute 'num_features' is 6$",
    ),
    "negative attribute": (
        _set(["layers", "1", "attributes", "num_features"], -1),
        r"^layer '1': attribute 'num_features': -1 is not a non-negative integer$",
    ),
    "subselection index out of range": (
        _set(["layers", "4", "input"], Subselection(6, "0-4,6")),
        r"^layer '4': input indices: index 6 is out of range for size 6$",
    ),
    "subselection duplicate index": (
        _set(["layers", "4", "input"], Subselection(6, "0-4,4")),
        r"^layer '4': input indices: index 4 appears twice$",
    ),
    "subselection of the wrong length": (
        _set(["layers", "4", "input"], Subselection(8, "0-4")),
        r"^layer '4': input indices: 5 given but the pruned Conv2d reads 6 channels$",
    ),
    "subselection on a batch norm": (
        _set(["layers", "1", "input"], Subselection(6, "0-5")),
        r"^layer '1': input: a BatchNorm2d takes no input subselection$",
    ),
    # The data flow (schema 1.1): layer 4 is called with the 6 channels layer 0 keeps.
    "input activation wider than the pruned weight reads": (
        _set(["layers", "4", "input_activation_channels"], 8),
        (
            r"^layer '4': input_activation_channels: the layer is called with 8 channels but the pruned Conv2d reads "
            "6, and it has no input subselection$"
        ),
    ),
    "input activation wider than before pruning": (
        _set(["layers", "4", "input_activation_channels"], 9),
        r"^layer '4': input_activation_channels: 9, but the unpruned Conv2d reads only 8; pruning never widens",
    ),
    "input activation other than the subselection's": (
        _all(
            _set(["layers", "4", "input"], Subselection(7, "0-5")),
            _set(["layers", "4", "input_activation_channels"], 6),
        ),
        r"^layer '4': input_activation_channels: 6, but the input subselection picks from input.channels=7$",
    ),
    "input activation of a batch norm": (
        _set(["layers", "1", "input_activation_channels"], 6),
        (
            r"^layer '1': input_activation_channels: only a layer whose input the applier can change records it, "
            "not a BatchNorm2d$"
        ),
    ),
}


@pytest.mark.parametrize("edit, message", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_spec_raises_and_changes_nothing(edit, message):
    model = conv_net()
    spec = conv_spec(model)
    edit(spec)
    before = snapshot(model)
    for apply in (check, prune, mock):
        with pytest.raises(SpecError, match=message):
            apply(model, spec)
        assert_unchanged(before, snapshot(model))


def test_input_activations_that_fit_the_data_flow_are_accepted():
    model = randomize(Fork())
    spec = fork_spec(model)
    for name in ("stem", "a", "b", "fc"):
        layer = spec.layers[name]
        layer.input_activation_channels = 3 if name == "stem" else 7
    assert_mock_matches_prune(model, spec, torch.randn(2, 3, 6, 6, dtype=torch.float64))


def test_a_deleted_subselection_is_refused_by_the_data_flow():
    """Each layer alone is consistent once the subselection is gone; only the activation size shows the mistake."""
    model = randomize(Fork())
    spec = fork_spec(model)
    spec.layers["b"].input = None
    pruned = prune(copy.deepcopy(model), spec)  # without the activation size nothing tells until the model runs
    with pytest.raises(RuntimeError):
        pruned(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    spec.layers["b"].input_activation_channels = 7
    before = snapshot(model)
    with pytest.raises(SpecError, match=r"^layer 'b': input_activation_channels: the layer is called with 7 "
                                        r"channels but the pruned Conv2d reads 3"):  # fmt: skip
        prune(model, spec)
    assert_unchanged(before, snapshot(model))


def test_a_prior_subselection_is_not_stacked():
    model = randomize(Fork())
    prune(model, fork_spec(model))
    again = make_spec(model, {"b": LayerSpec("Conv2d", {}, {}, Subselection(3, "0-2"))})
    with pytest.raises(SpecError, match="layer 'b': input: the module already has an input subselection"):
        prune(model, again)


@settings(max_examples=40, deadline=None)
@given(order=st.permutations(range(8)), count=st.integers(1, 8))
def test_any_kept_subset_in_any_order_matches_mock(order, count):
    model = conv_net()
    kept = list(order[:count])
    spec = conv_spec(model, encode_runs(kept), count)
    pruned = assert_mock_matches_prune(model, spec, torch.randn(1, 3, 6, 6, dtype=torch.float64))
    assert torch.equal(pruned[0].weight, model[0].weight[kept])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda():
    model = randomize(Fork())
    spec = fork_spec(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device="cuda")
    moved_after = prune(copy.deepcopy(model), spec).cuda()
    pruned_there = prune(copy.deepcopy(model).cuda(), spec)
    assert moved_after.a._prunespec_input_indices.is_cuda and pruned_there.fc._prunespec_input_indices.is_cuda
    mock_moved = mock(copy.deepcopy(model), spec).cuda()
    gpu_model = copy.deepcopy(model)
    mock_of_moved_model = mock(gpu_model, spec)
    gpu_model.cuda()  # the mock's masks stay on the CPU here and must follow the weights
    exported = torch.export.export(pruned_there, (x,)).module()
    with torch.no_grad():
        expected = mock_moved(x)
        for outputs in (moved_after(x), pruned_there(x), mock_of_moved_model(x), exported(x)):
            for e, g in zip(expected, outputs):
                assert_matches(g, e)


# ---------------------------------------------------------------------------------------------- decoding runs


def _runs_and_size(draw) -> tuple[str, int]:
    """A field as a spec may hold it: canonical runs, runs split where they need not be ('0-1,2-3'), or a
    mistake (a repeated or out-of-range index, a downward run, a leading zero, a stray character)."""
    size = draw(st.integers(0, 24))
    indices = draw(st.permutations(range(size)))[: draw(st.integers(0, size))]
    if draw(st.booleans()):
        indices = sorted(indices)
    parts = []
    for lo, hi in parse_runs(encode_runs(indices)):
        cut = draw(st.integers(lo, hi))
        pieces = [(lo, cut - 1), (cut, hi)] if cut > lo and draw(st.booleans()) else [(lo, hi)]
        parts += [str(a) if a == b else f"{a}-{b}" for a, b in pieces]
    mistake = draw(st.sampled_from([None] * 6 + ["repeat", "range", "downward", "zero", "stray"]))
    if mistake == "repeat" and indices:
        parts.append(str(draw(st.sampled_from(indices))))
    elif mistake == "range":
        parts.append(str(size + draw(st.integers(0, 3))))
    elif mistake == "downward":
        parts.append("5-2")
    elif mistake == "zero" and parts:
        parts[-1] = "0" + parts[-1]
    elif mistake == "stray":
        parts.append(draw(st.sampled_from(["", "-", "1--2", "x", " 1", "1-2-3"])))
    return ",".join(parts), size


@settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.composite(_runs_and_size)(), min_size=1, max_size=5))
def test_decoding_fields_together_matches_decoding_them_one_by_one(fields):
    try:
        expected = [decode_kept(runs, size, "field") for runs, size in fields]
    except SpecError:
        expected = None
    together = _decode_together(fields)
    if expected is None:
        assert together is None
    elif together is None:  # refusing is allowed where decode_kept needs to look closer, and only there
        assert any(re.search(r"(^|[,-])0[0-9]", runs) for runs, _ in fields)
    else:
        for got, want in zip(together, expected, strict=True):
            assert got.indices.dtype == torch.long and torch.equal(got.indices, want.indices)
            assert got.start == want.start


def test_runs_split_where_they_need_not_be_are_still_one_slice():
    model = randomize(Fork())
    spec = fork_spec(model)
    spec.layers["b"].input = Subselection(7, "2,3-4")
    pruned = assert_mock_matches_prune(model, spec, torch.randn(1, 3, 6, 6, dtype=torch.float64))
    assert "narrow(2, 3)" in repr(list(pruned.b._forward_pre_hooks.values()))


def test_the_first_problem_in_spec_order_is_reported():
    model = conv_net()
    spec = conv_spec(model)
    spec.layers["0"].tensors["weights"] = [KEEP]  # an unknown tensor in the first layer ...
    spec.layers["4"].tensors["weight"] = [None, "0,0"]  # ... and a repeated index in a later one
    with pytest.raises(SpecError, match=r"^layer '0': tensor 'weights': not a"):
        check(model, spec)


@pytest.mark.parametrize("keep", ["2-7", "5,0-4", "0-7"], ids=["one run: a slice", "gathered", "all kept"])
def test_pruned_tensors_are_contiguous_and_own_their_memory(keep):
    model = conv_net()
    n = len(decode_kept(keep, 8, "").indices)
    spec = conv_spec(model, keep, n)
    spec.layers["4"].tensors["weight"] = [None, keep]
    target = copy.deepcopy(model)
    old_storages = {t.untyped_storage().data_ptr() for t in target.state_dict().values()}
    pruned = prune(target, spec)
    for key, tensor in pruned.state_dict().items():
        assert tensor.is_contiguous(), key
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), key
        if tensor.shape != model.state_dict()[key].shape:
            assert tensor.untyped_storage().data_ptr() not in old_storages, key


@st.composite
def _tensor_and_kept(draw):
    """A tensor of 1-4 axes and, per axis, nothing listed, every entry in order, one ascending run, or any subset in
    any order (a gather)."""
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    kept = []
    for axis, size in enumerate(shape):
        # Gathers on both channel axes of a convolution weight take their own path: make them common.
        how = draw(st.sampled_from((["gather"] * 3 if axis < 2 else []) + ["none", "all", "run", "gather"]))
        if how == "none":
            kept.append(None)
            continue
        if how == "all":
            indices = list(range(size))
        elif how == "run":
            start = draw(st.integers(0, size - 1))
            indices = list(range(start, draw(st.integers(start, size))))
        else:
            indices = draw(st.permutations(range(size)))[: draw(st.integers(0, size))]
        kept.append(encode_runs(indices))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    return torch.randn(shape, dtype=torch.float64, generator=generator), kept


@settings(max_examples=300, deadline=None)
@given(case=_tensor_and_kept())
def test_select_kept_matches_indexing_axis_by_axis(case):
    tensor, runs = case
    kept = [None if r is None else decode_kept(r, size, "") for r, size in zip(runs, tensor.shape)]
    expected = tensor
    for axis, k in enumerate(kept):
        if k is not None:
            expected = expected.index_select(axis, k.indices)
    selected = select_kept(tensor, kept)
    assert torch.equal(selected, expected)
    if selected is not tensor:
        assert selected.is_contiguous()
        assert selected.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
