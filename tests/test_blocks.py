"""Dropping whole residual blocks: which modules are blocks, the invariant without them, the layer counts the
applier keeps in step, generation with the key/value cache, and a plan that prunes every unit at once."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import prunespec
from invariant import assert_invariant, random_request
from scripts.families import FAMILIES, RESIDUAL, droppable, greedy, random_heads, stream_request

pytest.importorskip("transformers")
pytest.importorskip("timm")

FAMILIES_WITH_BLOCKS = ["llama", "qwen2", "gemma", "gpt2", "hf-vit", "timm-vit", "tv-vit_b_16", "tv-swin_t"]
BUILDERS = {**FAMILIES, **RESIDUAL}


@pytest.mark.parametrize("constrained", [False, True], ids=["unconstrained", "constrained"])
@pytest.mark.parametrize("family", FAMILIES_WITH_BLOCKS + sorted(RESIDUAL))
def test_random_blocks_drop_exactly(family, constrained, tmp_path):
    model, inputs = BUILDERS[family].build()
    blocks = droppable(model, inputs)
    assert blocks, f"{family}: no residual block found"
    chosen = random.Random(family).sample(blocks, min(2, len(blocks)))
    _, outputs = random_request(model, inputs, 1, 0.1, "output")
    spec, pruned, _ = assert_invariant(
        model, inputs, tmp_path, pruned_blocks=chosen, pruned_outputs=outputs, constrained=constrained
    )
    assert {b.module for b in spec.dropped_blocks} == set(chosen)
    assert not any(name.startswith(tuple(f"{b}." for b in chosen)) for name in spec.layers)
    names = dict(pruned.named_modules())
    for block in spec.dropped_blocks:
        if block.how == "identity":
            assert type(names[block.module]).__name__ == "Skipped"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt2"])
def test_generation_after_dropping_layers_and_the_counts_that_follow(family):
    model, inputs = FAMILIES[family].build()
    layers = droppable(model, inputs)
    spec = prunespec.plan(model, inputs, pruned_blocks=[layers[0]])
    assert [b.how for b in spec.dropped_blocks] == ["removed"]
    mock = prunespec.mock(model, spec)
    pruned = prunespec.prune(copy.deepcopy(model), spec)
    with torch.no_grad():
        expected, _ = greedy(mock, inputs[0], 8)
        actual, cache = greedy(pruned, inputs[0], 8)
    assert torch.equal(actual, expected)
    assert pruned.config.num_hidden_layers == model.config.num_hidden_layers - 1 == len(cache.layers)
    indices = [m.layer_idx for m in pruned.modules() if isinstance(m.__dict__.get("layer_idx"), int)]
    assert sorted(set(indices)) == [0]  # the remaining layer is layer 0 now, its attention too
    keys = set(pruned.state_dict())
    assert all(not k.startswith(layers[1] + ".") for k in keys) and any(k.startswith(layers[0] + ".") for k in keys)


def test_all_units_in_one_plan(tmp_path):
    model, inputs = FAMILIES["llama"].build()
    heads, kv_heads = random_heads(model, inputs, seed=11)
    heads = [(m, h) for m, h in heads if m.startswith("model.layers.1.")]
    kv_heads = [(m, h) for m, h in kv_heads if m.startswith("model.layers.1.")]
    mlp = [("model.layers.1.mlp.up_proj.weight", c) for c in (0, 5, 17, 40)]
    request = stream_request(model, inputs, "llama", 11) + mlp
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_outputs=request, pruned_heads=heads,
                                       pruned_kv_heads=kv_heads or None, pruned_blocks=["model.layers.0"],
                                       through_norms=True)  # fmt: skip
    assert spec.dropped_blocks and any(layer.normalises for layer in spec.layers.values())
    assert spec.layers["model.layers.1.mlp.up_proj"].attributes["out_features"] < 96
    assert spec.layers["model.layers.1.self_attn"].heads is not None
    with torch.no_grad():
        expected, _ = greedy(prunespec.mock(model, spec), inputs[0], 6)
        actual, _ = greedy(pruned, inputs[0], 6)
    assert torch.equal(actual, expected)


def test_what_is_not_a_block_is_refused_with_the_reason():
    model, inputs = FAMILIES["bert"].build()
    with pytest.raises(prunespec.PlanError, match=r"^bert.encoder.layer.0 cannot be dropped: its output is not its "
                       r"input plus a branch"):  # fmt: skip
        prunespec.plan(model, inputs, pruned_blocks=["bert.encoder.layer.0"])  # post-norm: LayerNorm(x + f(x))
    model, inputs = RESIDUAL["tv-resnet50"].build()
    with pytest.raises(prunespec.PlanError, match=r"layer2.0 cannot be dropped: its output \(\[1, 512, 8, 8\]\) is not shaped like"):
        prunespec.plan(model, inputs, pruned_blocks=["layer2.0"])  # a downsampling block
    with pytest.raises(prunespec.PlanError, match=r"'layer2.7' is not a module that runs in forward; did you mean"):
        prunespec.plan(model, inputs, pruned_blocks=["layer2.7"])
    with pytest.raises(prunespec.PlanError, match="layer1.1.conv1 cannot be dropped: its output"):
        prunespec.plan(model, inputs, pruned_blocks=["layer1.1.conv1"])


@pytest.mark.parametrize("criterion", ["influence", "random"])
def test_a_criterion_chooses_blocks(criterion, tmp_path):
    model, inputs = RESIDUAL["tv-resnet50"].build()
    selection = prunespec.select(model, inputs, criterion=criterion, amount=0.25, unit="blocks")
    assert len(selection.pruned_blocks) == 3  # a quarter of resnet50's 12 blocks without downsampling
    spec, _, _ = assert_invariant(model, inputs, tmp_path, **selection.requests())
    assert [b.module for b in spec.dropped_blocks] == selection.pruned_blocks


def test_influence_ranks_a_block_that_changes_nothing_first():
    model, inputs = FAMILIES["timm-vit"].build()
    with torch.no_grad():  # blocks.5 adds nothing to its input: its influence is 0
        for layer in (model.blocks[5].attn.proj, model.blocks[5].mlp.fc2):
            layer.weight.zero_(), layer.bias.zero_()
    selection = prunespec.select(model, inputs, criterion="influence", amount=1 / 12, unit="blocks")
    assert selection.pruned_blocks == ["blocks.5"]
