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
    request = [("conv3.weight", 2), ("conv4.weight", 1)]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request, constrained=True)
    reason = "is moved along its channels by 'roll'"
    assert [(k.tensor, k.reason) for k in spec.kept] == [("conv3.weight", reason)]
    assert pruned.conv2.out_channels == 8 and pruned.conv3.in_channels == 8
    assert pruned.conv3.out_channels == 5  # conv4's input follows the planner fine


def test_channel_shuffle_is_followed_group_by_group(tmp_path):
    model, inputs = build("shuffle")  # 3 groups of 4: input channel 1 of conv2 is conv1's channel 4
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=[("conv2.weight", 1)], constrained=True)
    assert pruned.conv1.out_channels == 9  # channel 4 and its partners 0 and 8 in the other groups
    assert spec.layers["conv1"].tensors["weight"] == ["1-3,5-7,9-11"]
    assert spec.layers["conv2"].tensors["weight"] == [None, "3-11"]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=[("conv2.weight", 1)])
    assert pruned.conv1.out_channels == 12 and spec.summary.subselections == 1


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


def test_grouped_convolution_keeps_groups_equal(tmp_path):
    """Channel j of every group goes together, so each group keeps the same number of channels."""
    model, inputs = build("grouped")  # conv1 (8) -> grouped (groups=4: 2 in, 3 out per group) -> conv3
    request = [("grouped.weight", 1), ("grouped.weight", 3), ("grouped.weight", 5), ("grouped.weight", 7)]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request)
    assert pruned.conv1.out_channels == 4 and pruned.grouped.in_channels == 4 and pruned.grouped.groups == 4
    assert spec.layers["grouped"].tensors["weight"] == [None, "0"]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_outputs=[("grouped.weight", 4)])
    assert pruned.grouped.out_channels == 8 and pruned.conv3.in_channels == 8  # position 1 of all four groups
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=[("grouped.weight", 1)])
    assert pruned.conv1.out_channels == 8  # one group alone cannot give up a channel
    assert [k.tensor for k in spec.kept] == ["grouped.weight"] and "grouped convolution" in spec.kept[0].reason


def test_layer_norm_keeps_its_channels_but_the_mlp_prunes(tmp_path):
    model, inputs = build("channels_last")
    request = [("fc2.weight", ch) for ch in range(0, 32, 3)] + [("fc1.weight", 2), ("head.weight", 1)]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request, constrained=True)
    assert pruned.fc1.out_features == 32 - len(range(0, 32, 3))
    assert pruned.norm.normalized_shape == (8,) and pruned.stem.out_channels == 8
    reasons = {k.tensor: k.reason for k in spec.kept}
    assert reasons == {"fc1.weight": "is normalised together with other channels by layer_norm",
                       "head.weight": "is normalised together with other channels by layer_norm"}


def test_group_norm_loses_whole_groups_while_instance_norm_and_prelu_follow(tmp_path):
    model, inputs = build("norms")
    request = [("conv2.weight", 3), ("conv3.weight", 4), ("conv3.weight", 7)]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request)
    assert pruned.conv1.out_channels == 12 and pruned.gn.num_channels == 12
    assert pruned.conv2.out_channels == 8
    assert pruned.inorm.num_features == 8 and pruned.prelu.num_parameters == 8
    assert spec.kept == [] and spec.layers["conv2"].input is not None  # conv2 reads around channel 3
    # Constrained, channel 3 takes its group (channels 3-5 of 4 groups of 3) with it: the other groups' statistics
    # stay as they were.
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request, constrained=True)
    assert pruned.conv1.out_channels == 9 and pruned.conv2.in_channels == 9
    assert (pruned.gn.num_groups, pruned.gn.num_channels) == (3, 9) and spec.kept == []


def test_chunk_ties_the_halves_and_fixed_splits_pin(tmp_path):
    model, inputs = build("chunked")
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_outputs=[("stem.weight", 1)])
    assert pruned.stem.out_channels == 10  # channel 1 and its partner 7 in the other half
    assert pruned.branch.in_channels == 5 and pruned.head.in_channels == 11  # 5 kept + 6 from the branch
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_outputs=[("other.weight", 1)])
    assert pruned.other.out_channels == 12
    assert "split along its channels" in spec.kept[0].reason


def test_weights_used_outside_their_module_are_never_gathered(tmp_path):
    model, inputs = build("functional_weights")
    request = [("qkv.weight", 2), ("reflect.weight", 5), ("proj.weight", 0)]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request)
    reasons = {k.tensor: k.reason for k in spec.kept}
    assert reasons["qkv.weight"] == "qkv.weight is used outside the forward of its module"
    assert "not the module's input" in reasons["reflect.weight"]
    assert pruned.qkv.out_features == 11 and "proj.weight" not in reasons  # the hidden channel goes everywhere
    assert spec.summary.subselections == 0


def test_reshape_follows_run_time_sizes_and_keeps_written_ones(tmp_path):
    model, inputs = build("reshapes")
    request = [("a.weight", 1), ("b.weight", 1)]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_outputs=request)
    assert pruned.a.out_channels == 7 and pruned.b.out_channels == 8
    assert [k.tensor for k in spec.kept] == ["b.weight"] and "reshaped" in spec.kept[0].reason


def test_attention_prunes_its_input_and_output_channels_around_whole_heads(tmp_path):
    model, inputs = build("attention")
    request = [("mha.in_proj_weight", 3), ("fc.weight", 5), ("head.weight", 2)]
    spec, pruned, _ = assert_invariant(
        model, inputs, tmp_path, pruned_inputs=request, pruned_outputs=[("q.weight", 1)], constrained=True
    )
    # The in-projection reads one channel fewer; its four heads of four stay whole.
    assert pruned.mha.in_proj_weight.shape == (48, 15) and pruned.embed.out_features == 15
    assert pruned.mha.num_heads == 4 and spec.layers["mha"].heads is None
    assert pruned.mha.out_proj.out_features == 15 and pruned.fc.in_features == 15
    assert pruned.v.out_features == 9 and pruned.head.in_features == 9
    reasons = {k.tensor: k.reason for k in spec.kept}
    assert set(reasons) == {"q.weight"}
    assert reasons["q.weight"] == "is a query or key of scaled_dot_product_attention"


def test_tokens_with_class_token_position_embedding_and_roll(tmp_path):
    model, inputs = build("tokens")
    request = [("fc2.weight", 3), ("fc2.weight", 9), ("head.weight", 5)]
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=request, constrained=True)
    assert pruned.fc1.out_features == 18 and pruned.fc2.in_features == 18
    # the class token and the position embedding follow the token channels: channel 5 goes from all of them
    assert pruned.patch.out_channels == 11 and pruned.class_token.shape == (1, 1, 11) and spec.kept == []
    assert pruned.pos.shape == (1, 17, 11)
