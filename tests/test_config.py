"""Plans a model's config can describe: every layer of a stack pruned alike, so that the model built from the new
config values is the pruned model, weights and all, without prunespec. And model specifiers for Hugging Face
folders, planned on the meta device from the config alone."""

from __future__ import annotations

import copy

import pytest
import torch

import prunespec
from invariant import max_difference
from prunespec.models import example_inputs, load_model
from scripts.families import FAMILIES
from test_hidden import stream_request

transformers = pytest.importorskip("transformers")


def uniform_request(model, inputs, family: str) -> dict:
    """Half the query heads (or one key/value group), a quarter of the MLP and of the hidden width, alike in every
    layer: a criterion picks which, the counts are shared."""
    heads = prunespec.select(model, inputs, criterion="l2", amount=0.5, unit="heads")
    mlp = prunespec.select(model, inputs, criterion="l2", amount=0.25, side="output", exclude=["*attn*", "*embed*"])
    mlp = [(w, c) for w, c in mlp.pruned_outputs if any(k in w for k in ("up_proj", "gate_up_proj"))]
    return {"pruned_heads": heads.pruned_heads, "pruned_outputs": mlp + stream_request(model, inputs, family, 2)}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "phi3"])
def test_a_uniform_plan_is_described_by_the_config(family):
    model, inputs = FAMILIES[family].build()
    request = uniform_request(model, inputs, family)
    if family == "gemma":  # Gemma scales its embeddings by sqrt(hidden_size), computed when it is built
        with pytest.raises(prunespec.PlanError, match="the model built from the new config computes something else"):
            prunespec.plan(model, inputs, **request, through_norms=True, uniform=True, constrained=True)
        request["pruned_outputs"] = [(w, c) for w, c in request["pruned_outputs"] if "embed" not in w]
    spec = prunespec.plan(model, inputs, **request, through_norms=True, uniform=True, constrained=True)
    wanted = {"num_attention_heads", "intermediate_size"} | ({"hidden_size"} if family != "gemma" else set())
    assert wanted <= set(spec.config), spec.config
    assert not spec.kept
    pruned = prunespec.prune(copy.deepcopy(model), spec)
    for key, (_, after) in spec.config.items():
        assert getattr(pruned.config, key) == after
    # the model the new config builds takes the pruned weights as they are, and computes what the mock computes
    rebuilt = type(model)(copy.deepcopy(pruned.config)).double().eval()
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    with torch.no_grad():
        expected = prunespec.mock(model, spec)(*inputs).logits
        assert max_difference(rebuilt(*inputs).logits, expected) <= 1e-12 * max(1.0, expected.abs().max().item())


def test_a_plan_no_config_describes_is_refused_when_uniform_is_asked_and_recorded_otherwise():
    model, inputs = FAMILIES["gpt2"].build()  # GPT-2 works head_dim out as n_embd // n_head
    heads = prunespec.select(model, inputs, criterion="l2", amount=0.5, unit="heads").pruned_heads
    with pytest.raises(prunespec.PlanError, match=r"^uniform: no config describes the pruned model: transformer\.h"):
        prunespec.plan(model, inputs, pruned_heads=heads, uniform=True)
    assert prunespec.plan(model, inputs, pruned_heads=heads).config == {}
    model, inputs = FAMILIES["llama"].build()  # heads from one layer only: the layers differ
    with pytest.raises(prunespec.PlanError, match="uniform: no config describes the pruned model"):
        prunespec.plan(model, inputs, pruned_heads=[("model.layers.0.self_attn", 0), ("model.layers.0.self_attn", 4)],
                       uniform=True)  # fmt: skip


def test_a_uniform_plan_whose_config_transformers_would_refuse_is_not_described():
    # Llama's config validates hidden_size % num_attention_heads == 0 when it is read, so a hidden width of 63 with
    # 8 heads builds (head_dim is given) but would not load with from_pretrained: no config describes it.
    model, inputs = FAMILIES["llama"].build()
    request = [("model.embed_tokens.weight", 5)]
    with pytest.raises(prunespec.PlanError, match=r"^uniform: .*LlamaConfig refuses .*multiple of the number of att"):
        prunespec.plan(model, inputs, pruned_outputs=request, through_norms=True, uniform=True)
    spec = prunespec.plan(model, inputs, pruned_outputs=request, through_norms=True)
    assert "hidden_size" not in spec.config
    eight = [("model.embed_tokens.weight", c) for c in range(8)]  # 56 = 8 * 7: allowed, and described
    spec = prunespec.plan(model, inputs, pruned_outputs=eight, through_norms=True, uniform=True)
    assert spec.config["hidden_size"] == (64, 56)
    transformers.LlamaConfig.from_dict(prunespec.prune(copy.deepcopy(model), spec).config.to_dict())


def test_an_hf_folder_is_planned_on_meta_from_its_config(tmp_path):
    model, _ = FAMILIES["llama"].build()
    model.float().save_pretrained(tmp_path / "llama", max_shard_size="40KB")
    specifier = f"hf:{tmp_path / 'llama'}"
    network = load_model(specifier, meta=True)
    assert all(p.is_meta for p in network.parameters())
    inputs = example_inputs(network, specifier)
    assert inputs[0].dtype == torch.int64 and inputs[0].shape == (1, 8)
    spec = prunespec.plan(network, inputs, pruned_heads=[("model.layers.1.self_attn", 2)], pruned_blocks=["model.layers.0"])
    loaded = load_model(specifier).double()
    with torch.no_grad():
        ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
        expected = prunespec.mock(loaded, spec)(ids).logits
        actual = prunespec.prune(copy.deepcopy(loaded), spec)(ids).logits
    assert max_difference(actual, expected) <= 1e-12 * max(1.0, expected.abs().max().item())


def test_bad_hf_folders_are_one_line_model_errors(tmp_path):
    from prunespec.models import ModelError

    with pytest.raises(ModelError, match="is not a Hugging Face model folder: it has no config.json"):
        load_model(f"hf:{tmp_path}")
    model, _ = FAMILIES["llama"].build()
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="has no safetensors weights"):
        load_model(f"hf:{tmp_path}")
    assert load_model(f"hf:{tmp_path}", meta=True) is not None  # planning needs no weights
