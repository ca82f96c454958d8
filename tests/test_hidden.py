"""Hidden width through norms and embeddings: the invariant when norms normalise over fewer channels.

With ``through_norms`` the planner lets the channels of a residual stream go: embedding columns, every block's
output projection, position embeddings and class tokens, and the norms on the stream, which then take their
statistics over the channels they keep. The mock emulates that, so pruned == mock still holds in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunespec
from invariant import assert_invariant, random_request
from scripts.families import FAMILIES, greedy, random_heads, stream_request

pytest.importorskip("transformers")
pytest.importorskip("timm")

# Families that keep their stream, for the reason they state: the attention reshapes its output to the width of its
# input (EVA, Swin's heads too), or the patches are reshaped with the width written as a number (torchvision ViT).
KEEPS_HIDDEN = {
    "timm-eva02": "the pruned model fails in blocks.0.attn",
    "tv-swin_t": "the pruned model fails in features.1.0.attn",
    "tv-vit_b_16": "is reshaped by 'reshape' with its channel count written as a number",
}
WITHOUT_NORMS = {"torch-mha"}


@pytest.mark.parametrize("constrained", [False, True], ids=["unconstrained", "constrained"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hidden_width_prunes_exactly_through_norms(family, constrained, tmp_path):
    model, inputs = FAMILIES[family].build()
    request = stream_request(model, inputs, family, seed=len(family))
    spec, pruned, _ = assert_invariant(
        model, inputs, tmp_path, pruned_outputs=request, through_norms=True, constrained=constrained
    )
    assert spec.request.through_norms
    if family in KEEPS_HIDDEN:
        assert spec.summary.parameters_after == spec.summary.parameters_before
        assert any(KEEPS_HIDDEN[family] in k.reason for k in spec.kept), spec.kept
        return
    norms = [layer.normalises for layer in spec.layers.values() if layer.normalises is not None]
    assert norms or family in WITHOUT_NORMS, f"{family}: no norm lost a channel"
    assert all(n.channels[1] < n.channels[0] for n in norms)
    assert spec.summary.parameters_after < spec.summary.parameters_before


@pytest.mark.parametrize("family", ["llama", "gpt2", "timm-vit"])
def test_without_through_norms_the_stream_is_kept_with_the_reason(family, tmp_path):
    model, inputs = FAMILIES[family].build()
    spec, _, _ = assert_invariant(model, inputs, tmp_path, pruned_outputs=stream_request(model, inputs, family, 0))
    assert not any(layer.normalises for layer in spec.layers.values())
    assert spec.summary.parameters_after == spec.summary.parameters_before
    assert any("normalised together" in k.reason or "reduced over its channels" in k.reason for k in spec.kept)


@pytest.mark.parametrize("family", sorted(f for f, spec in FAMILIES.items() if spec.causal_lm))
def test_generation_after_heads_hidden_and_mlp_in_one_plan(family):
    model, inputs = FAMILIES[family].build()
    heads, kv_heads = random_heads(model, inputs, seed=3)
    _, mlp = random_request(model, inputs, 3, 0.2, "output")
    mlp = [(w, c) for w, c in mlp if "mlp" in w and ("up" in w or "fc" in w or "c_fc" in w)]
    request = stream_request(model, inputs, family, 3) + mlp
    spec = prunespec.plan(model, inputs, pruned_outputs=request, pruned_heads=heads, pruned_kv_heads=kv_heads,
                          through_norms=True)  # fmt: skip
    mock = prunespec.mock(model, spec)
    pruned = prunespec.prune(copy.deepcopy(model), spec)
    with torch.no_grad():
        expected, _ = greedy(mock, inputs[0], 8)
        actual, _ = greedy(pruned, inputs[0], 8)
    assert torch.equal(actual, expected)
    assert any(layer.normalises for layer in spec.layers.values())


def test_tied_embeddings_prune_both_sides_and_stay_tied(tmp_path):
    model, inputs = FAMILIES["gpt2"].build()
    assert model.lm_head.weight is model.transformer.wte.weight
    spec, pruned, _ = assert_invariant(
        model, inputs, tmp_path, pruned_outputs=stream_request(model, inputs, "gpt2", 1), through_norms=True
    )
    assert pruned.lm_head.weight is pruned.transformer.wte.weight
    assert pruned.lm_head.weight.shape == (64, 48) and pruned.transformer.wpe.weight.shape == (64, 48)
    assert pruned.transformer.wte.embedding_dim == pruned.transformer.wpe.embedding_dim == 48
    assert spec.layers["lm_head"].tensors["weight"] == spec.layers["transformer.wte"].tensors["weight"]


class PythonRMSNorm(nn.Module):
    """RMSNorm written out as Hugging Face writes it, with a float32 upcast."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, generator=torch.Generator().manual_seed(5)))

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32) if dtype != torch.float64 else x
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + 1e-6)).to(dtype)


class Channels(nn.Module):
    """A stream through every kind of norm the planner recognises, with a statistic that escapes its module."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.rms = PythonRMSNorm(16)
        self.ln = nn.LayerNorm(16)
        self.torch_rms = nn.RMSNorm(16)
        self.mid = nn.Linear(16, 16)
        self.group = nn.GroupNorm(4, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.torch_rms(self.ln(self.rms(h))) + h
        g = self.group(self.mid(h).transpose(1, 2)).transpose(1, 2)
        return self.out(g)


def test_each_norm_kind_renormalises_and_group_norm_loses_whole_groups(tmp_path):
    model = Channels().double().eval()
    inputs = [torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)]
    request = [("inp.weight", 1), ("inp.weight", 9), ("mid.weight", 4)]
    spec, pruned, _ = assert_invariant(
        model, inputs, tmp_path, pruned_outputs=request, pruned_inputs=[("out.weight", 13)], through_norms=True
    )
    assert {n for n, layer in spec.layers.items() if layer.normalises} == {"rms", "ln", "torch_rms"}
    assert pruned.ln.normalized_shape == (14,) and pruned.torch_rms.normalized_shape == (14,)
    assert spec.layers["rms"].normalises.channels == (16, 14) and pruned.rms.weight.shape == (14,)
    # channel 4 takes its group (channels 4-7) with it; channel 13 alone would break group 3, so the group stays
    # and the last layer reads around it
    assert pruned.group.num_groups == 3 and pruned.group.num_channels == 12
    assert pruned.out.in_features == 11 and spec.layers["out"].input is not None and not spec.kept


class EscapingStatistic(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h / h.norm(dim=-1, keepdim=True))  # a norm inline, in a module with layers


def test_a_statistic_outside_a_norm_module_keeps_its_channels(tmp_path):
    model = EscapingStatistic().double().eval()
    inputs = [torch.randn(2, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)]
    spec, _, _ = assert_invariant(model, inputs, tmp_path, pruned_outputs=[("inp.weight", 2)], through_norms=True)
    assert spec.summary.parameters_after == spec.summary.parameters_before
    assert "which the planner cannot run on fewer channels" in spec.kept[0].reason
