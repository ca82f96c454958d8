"""The invariant on small models, one per way channels flow, with random patterns and fixed seeds."""

from __future__ import annotations

import pytest

import prunespec
from invariant import assert_invariant, random_request
from nets import SMALL_NETS, build

MODES = [(False, True), (False, False), (True, True), (True, False)]  # (constrained, reorder)


@pytest.mark.parametrize("name", sorted(SMALL_NETS))
@pytest.mark.parametrize("constrained,reorder", MODES)
@pytest.mark.parametrize("side", ["input", "output", "both"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_patterns(name, constrained, reorder, side, seed, tmp_path):
    model, inputs = build(name, seed)
    pruned_inputs, pruned_outputs = random_request(model, inputs, seed, 0.3, side)
    spec, _, _ = assert_invariant(
        model, inputs, tmp_path, pruned_inputs=pruned_inputs, pruned_outputs=pruned_outputs,
        constrained=constrained, reorder=reorder,
    )
    if constrained:
        assert spec.summary.subselections == 0


@pytest.mark.parametrize("name", sorted(SMALL_NETS))
def test_everything_requested_still_exact(name, tmp_path):
    """Asking for (almost) every channel stresses pinning: whatever stays must still be exact."""
    model, inputs = build(name)
    pruned_inputs, pruned_outputs = random_request(model, inputs, 7, 0.9, "both")
    assert_invariant(model, inputs, tmp_path, pruned_inputs=pruned_inputs, pruned_outputs=pruned_outputs)


def test_unconstrained_removes_exactly_what_was_asked(tmp_path):
    model, inputs = build("fork")
    request = [("a.weight", 0), ("a.weight", 1), ("b.weight", 1), ("c.weight", 1), ("c.weight", 2)]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request)
    # only channel 1 is unwanted by all three readers
    assert pruned.stem.out_channels == 15
    assert (pruned.a.in_channels, pruned.b.in_channels, pruned.c.in_channels) == (14, 15, 14)
    assert spec.summary.subselections == 2
    assert spec.kept == []


def test_constrained_grows_the_request(tmp_path):
    model, inputs = build("fork")
    request = [("a.weight", 0), ("b.weight", 1), ("c.weight", 2)]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request, constrained=True)
    assert pruned.stem.out_channels == 13
    assert pruned.a.in_channels == pruned.b.in_channels == pruned.c.in_channels == 13
    assert pruned.bn.num_features == 13
    assert spec.summary.subselections == 0


def test_reordering_turns_gathers_into_slices(tmp_path):
    """Two consumers each drop a different half: after reordering each reads one contiguous run."""
    model, inputs = build("fork")
    request = [("a.weight", ch) for ch in range(0, 16, 2)] + [("b.weight", ch) for ch in range(1, 16, 2)]
    spec, _, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request)
    runs = {name: layer.input.indices for name, layer in spec.layers.items() if layer.input is not None}
    assert set(runs) == {"a", "b"}
    assert all("," not in r for r in runs.values()), runs
    flat, _, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request, reorder=False)
    assert any("," in layer.input.indices for layer in flat.layers.values() if layer.input is not None)


def test_unknown_op_keeps_its_channels_and_says_why(tmp_path):
    model, inputs = build("unknown_op")
    request = [("conv2.weight", 3), ("conv3.weight", 2), ("conv4.weight", 1)]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request, constrained=True)
    kept = {k.tensor: k for k in spec.kept}
    assert set(kept) == {"conv2.weight", "conv3.weight"}
    assert "does not follow" in kept["conv2.weight"].reason or "reshaped" in kept["conv2.weight"].reason
    assert pruned.conv1.out_channels == 8 and pruned.conv2.out_channels == 8
    assert pruned.conv3.out_channels == 5  # conv4's input follows the planner fine


def test_zeroed_weights_are_found(tmp_path):
    model, inputs = build("batchnorm_between")
    with __import__("torch").no_grad():
        model.conv2.weight[:, 4] = 0
        model.conv3.weight[:, 7] = 0
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path)
    assert spec.request.zeroed
    assert pruned.bn1.num_features == 9 and pruned.bn2.num_features == 11


def test_bad_requests_name_what_is_valid():
    model, inputs = build("conv_conv")
    with pytest.raises(prunespec.PlanError, match="did you mean 'conv2.weight'"):
        prunespec.plan(model, inputs, pruned_inputs=[("conv2.weigth", 1)])
    with pytest.raises(prunespec.PlanError, match="out of range; it has channels 0-11"):
        prunespec.plan(model, inputs, pruned_inputs=[("conv2.weight", 12)])


def test_planning_twice_gives_identical_bytes():
    model, inputs = build("fork")
    request = random_request(model, inputs, 3, 0.4, "both")
    first = prunespec.plan(model, inputs, *request).to_json()
    second = prunespec.plan(model, inputs, *request).to_json()
    assert first == second


def test_grouped_convolution_is_kept_with_a_reason(tmp_path):
    model, inputs = build("grouped")
    request = [("grouped.weight", 1), ("conv3.weight", 5)]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request, constrained=True)
    reason = "grouped.weight is a grouped convolution (groups=4)"
    assert [(k.tensor, k.reason) for k in spec.kept] == [("grouped.weight", reason), ("conv3.weight", reason)]
    assert pruned.conv1.out_channels == 8 and pruned.grouped.out_channels == 12 and pruned.conv3.in_channels == 12
