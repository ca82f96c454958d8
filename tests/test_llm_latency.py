"""The MAC counting behind benchmarks/llm_latency.py: FlopCounterMode with a formula for CPU flash attention, checked
against MACs worked out by hand from a tiny Llama's config, and against the spec's own per-layer MACs. Timing is
the benchmark's business; nothing here measures speed."""

from __future__ import annotations

import copy

import pytest
import torch

import prunespec
from benchmarks import llm_latency

transformers = pytest.importorskip("transformers")


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def by_hand(config, batch: int, tokens: int) -> tuple[int, int]:
    """(linear MACs, attention MACs) of a causal prefill with logits for every token."""
    h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    width, mlp = config.hidden_size, config.intermediate_size
    per_token = config.num_hidden_layers * (width * h * d * 2 + width * kv * d * 2 + 3 * width * mlp)
    linear = batch * tokens * (per_token + width * config.vocab_size)
    entries = tokens * (tokens + 1) // 2  # the causal triangle, diagonal included
    attention = config.num_hidden_layers * batch * h * entries * 2 * d
    return linear, attention


def test_prefill_macs_are_the_linear_layers_and_the_causal_attention_triangle():
    model = tiny_llama()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    counted = llm_latency.count_macs(lambda: model(ids))
    linear, attention = by_hand(model.config, 2, 9)
    assert counted["by_op"].get("aten.mm", 0) + counted["by_op"].get("aten.addmm", 0) == linear
    assert counted["total"] == linear + attention, counted["by_op"]


def test_the_counter_agrees_with_the_spec_layer_by_layer():
    model = tiny_llama()
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(1))
    mlp = [(f"model.layers.{i}.mlp.up_proj.weight", c) for i in range(2) for c in range(0, 48, 3)]
    spec = prunespec.plan(model, [ids], pruned_outputs=mlp, uniform=True, constrained=True)
    pruned = prunespec.prune(copy.deepcopy(model), spec)
    after = llm_latency.check_macs(pruned, spec, ids)
    before = llm_latency.check_macs(model, spec, ids, after=False)
    assert after["equal"] and before["equal"], (after, before)
    assert after["layers_checked"] >= 4 and not after["layers_differ"] and not before["layers_differ"]
    assert after["counted_linear"] < before["counted_linear"]
