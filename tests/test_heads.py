"""Attention heads and key/value groups, pruned whole: the invariant on every attention family, generation with the
key/value cache, the head counts the applier sets, and requests the planner refuses.

The families are small random configurations built offline (`scripts/families.py`). Each is planned with random,
seeded head patterns in both modes, stored, reloaded, applied, and compared with its mock in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch

import prunespec
from invariant import assert_invariant
from prunespec.planner.trace import trace
from scripts.families import FAMILIES, greedy, random_heads

pytest.importorskip("transformers")
pytest.importorskip("timm")

# Families whose heads the planner keeps, each for a reason it states: Swin adds a per-head bias it makes in forward
# (relative positions); EVA reshapes the attention output to the input's width; Phi-3 cuts its fused projection at
# bounds read from the model's shared config, which only a plan that prunes every layer alike may change.
KEEPS_HEADS = {"tv-swin_t": "is combined with a fixed-size tensor made in forward",
               "timm-eva02": "is merged by 'reshape' with its size written as a number",
               "phi3": "is sliced along its channels with bounds the pruned model does not follow"}  # fmt: skip


@pytest.mark.parametrize("constrained", [False, True], ids=["unconstrained", "constrained"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_head_patterns_prune_exactly(family, constrained, tmp_path):
    model, inputs = FAMILIES[family].build()
    heads, kv_heads = random_heads(model, inputs, seed=len(family))
    assert heads or kv_heads, "the pattern asks for nothing"
    spec, pruned, _ = assert_invariant(
        model, inputs, tmp_path, pruned_heads=heads, pruned_kv_heads=kv_heads, constrained=constrained
    )
    lost = {name: layer.heads for name, layer in spec.layers.items() if layer.heads is not None}
    if family in KEEPS_HEADS:
        reasons = {k.reason for k in spec.kept if k.side in ("heads", "key_value_heads")}
        assert not lost and reasons, f"{family}: {lost}"
        assert any(KEEPS_HEADS[family] in reason for reason in reasons), reasons
    else:
        assert lost, f"{family}: no attention lost a head; kept: {spec.kept}"
        asked = {module for module, _ in heads + kv_heads}
        assert set(lost) <= asked


@pytest.mark.parametrize("family", sorted(f for f, spec in FAMILIES.items() if spec.causal_lm))
def test_generation_with_the_cache_gives_the_mock_tokens(family):
    model, inputs = FAMILIES[family].build()
    heads, kv_heads = random_heads(model, inputs, seed=7)
    spec = prunespec.plan(model, inputs, pruned_heads=heads, pruned_kv_heads=kv_heads)
    mock = prunespec.mock(model, spec)
    pruned = prunespec.prune(copy.deepcopy(model), spec)
    with torch.no_grad():
        expected, dense_cache = greedy(mock, inputs[0], 8)
        actual, pruned_cache = greedy(pruned, inputs[0], 8)
    assert torch.equal(actual, expected)
    # The cache holds each layer's key/value heads: as many as the spec keeps.
    for i, record in enumerate(trace(model, inputs).heads):
        layer = spec.layers.get(record.module)
        kept = layer.heads.key_value[1] if layer is not None and layer.heads is not None else len(record.key_value)
        assert dense_cache.layers[i].keys.shape[1] == len(record.key_value)
        assert pruned_cache.layers[i].keys.shape[1] == kept
    if family not in KEEPS_HEADS:
        assert any(layer.heads is not None and layer.heads.key_value[1] < layer.heads.key_value[0]
                   for layer in spec.layers.values()), "the pattern removes no key/value head"  # fmt: skip


@pytest.mark.parametrize("criterion", ["l2", "output", "random"])
@pytest.mark.parametrize("unit", ["heads", "kv_heads"])
def test_a_criterion_chooses_whole_heads_in_equal_numbers_per_group(criterion, unit, tmp_path):
    model, inputs = FAMILIES["llama"].build()
    selection = prunespec.select(model, inputs, criterion=criterion, amount=0.5, unit=unit)
    chosen = selection.pruned_heads if unit == "heads" else selection.pruned_kv_heads
    assert chosen and not selection.pruned_inputs and not selection.pruned_outputs
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, **selection.requests())
    for layer in spec.layers.values():
        if layer.heads is not None:  # 8 query heads in 2 groups: half of each group, or one of the 2 groups
            assert (layer.heads.query[1], layer.heads.key_value[1]) == ((4, 2) if unit == "heads" else (4, 1))
    assert not spec.kept


def test_global_scope_ranks_heads_across_attentions_and_round_to_counts_heads():
    model, inputs = FAMILIES["gpt2"].build()
    selection = prunespec.select(model, inputs, criterion="l2", amount=0.25, unit="heads", scope="global", round_to=2)
    per_module: dict[str, int] = {}
    for module, _ in selection.pruned_heads:
        per_module[module] = per_module.get(module, 0) + 1
    # a quarter of 16 heads, ranked together; each attention's count rounded down to keep an even number of heads
    assert per_module and sum(per_module.values()) <= 4 and all(n % 2 == 0 for n in per_module.values())


def test_head_requests_name_what_is_wrong():
    model, inputs = FAMILIES["llama"].build()
    with pytest.raises(prunespec.PlanError, match=r"'model.layers.0.mlp' is not an attention module whose heads .*"
                       r"'model.layers.0.self_attn' \(8 heads, 2 key/value heads\)"):  # fmt: skip
        prunespec.plan(model, inputs, pruned_heads=[("model.layers.0.mlp", 0)])
    with pytest.raises(prunespec.PlanError, match=r"key value heads index 2 is out of range; it has 2 \(0-1\)"):
        prunespec.plan(model, inputs, pruned_kv_heads=[("model.layers.0.self_attn", 2)])
    with pytest.raises(prunespec.PlanError, match="criterion='hrank' does not choose heads"):
        prunespec.select(model, inputs, criterion="hrank", amount=0.3, unit="heads")


def test_unequal_groups_are_kept_unconstrained_and_grown_constrained(tmp_path):
    model, inputs = FAMILIES["llama"].build()
    attention = "model.layers.0.self_attn"
    request = [(attention, 0), (attention, 1), (attention, 4)]  # two from group 0, one from group 1
    spec, _, _ = assert_invariant(model, inputs, tmp_path, pruned_heads=request)
    assert spec.layers[attention].heads.query == (8, 6)
    assert [(k.tensor, k.side, k.channels) for k in spec.kept] == [(attention, "heads", "1")]
    assert "unequal sizes" in spec.kept[0].reason
    spec, _, _ = assert_invariant(model, inputs, tmp_path, pruned_heads=request, constrained=True)
    assert spec.layers[attention].heads.query == (8, 4) and not spec.kept
