"""Hostile and broken spec files: thousands of mutations of a valid spec, each either read and applied, building a
model that equals its mock, or refused with `prunespec.SpecError` (one line, naming what is wrong) with the model
untouched; never another exception, a partly pruned model, or a model that fails or computes something else.

The first tests damage the bytes and fields of a small spec at random. The structural ones make the edits a reviewer
might make by hand (delete a layer's entry or a field of it, shift or swap index lists, change counts, heads,
dropped blocks, groups of neighbours) to a resnet18 spec and a grouped-query Llama spec, with the mutations of
`scripts/fuzz.py`, whose `make fuzz` runs 10,000 of them.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from invariant import assert_matches

import prunespec
from prunespec.schemas import load_spec_bytes
from scripts import fuzz


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 1),
        torch.nn.Conv2d(8, 6, 1),
    ).double().eval()
    with torch.no_grad():  # statistics of their own per channel, so that a misplaced one shows in the output
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.uniform_(-1, 1)
    return model


class _Fork(torch.nn.Module):
    """Two consumers of one producer, so the spec has an activation subselection to mutate too."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _model()

    def forward(self, x):
        y = self.body[2](self.body[1](self.body[0](x)))
        return self.body[3](y) + self.body[4](y)


MODEL = _Fork()
X = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
VALID = json.loads(
    prunespec.plan(MODEL, [X], pruned_inputs=[("body.3.weight", c) for c in (0, 2, 5)]).to_json()
)
# The fixture covers subselections, the fields of schema 1.1 and the groups of neighbours of schema 1.4.
assert any("input" in layer for layer in VALID["layers"].values()) and VALID["neighbours"]
assert any({"input_activation_channels", "macs"} <= layer.keys() for layer in VALID["layers"].values())


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*path, i))


PATHS = [p for p in _paths(VALID) if p]
REPLACEMENTS = [None, -1, 0, 2**63, 10**30, 1.5, True, "x", "", [], {}, "0-999999999", "3,3", "5-2", "-1", "0-", "07",
                "0" * 5000, [None], {"bogus": 1}]  # fmt: skip


def _replacement(draw):
    """A fresh copy of one of `REPLACEMENTS`: a shared list or dict would be mutated again in place by a later step
    (into itself, even: a circular structure), and would carry the change into later examples."""
    return copy.deepcopy(draw(st.sampled_from(REPLACEMENTS)))


@st.composite
def mutated(draw) -> bytes:
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            kind = draw(st.sampled_from(["replace", "delete", "extra", "off by one"]))
            if kind == "replace":
                parent[path[-1]] = _replacement(draw)
            elif kind == "off by one" and type(parent[path[-1]]) is int:  # a size or count that nearly fits
                parent[path[-1]] += draw(st.sampled_from([-1, 1]))
            elif kind == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            elif kind == "extra" and isinstance(parent, dict):
                parent["unexpected_field"] = _replacement(draw)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed or replaced the path
            pass
    text = json.dumps(data).encode()
    damage = draw(st.sampled_from(["none", "truncate", "bad utf-8"]))
    cut = draw(st.integers(0, len(text)))
    if damage == "truncate":
        text = text[:cut]
    elif damage == "bad utf-8":
        text = text[:cut] + b"\xff\xfe" + text[cut:]
    return text


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_a_mutated_spec_is_applied_correctly_or_refused_with_a_spec_error(data):
    try:
        spec = load_spec_bytes(data, "fuzzed.json")
    except prunespec.SpecError as e:
        _assert_one_line_naming_something(e)
        return
    model = copy.deepcopy(MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        prunespec.prune(model, spec)
    except prunespec.SpecError as e:
        _assert_one_line_naming_something(e)
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert not any(m._forward_pre_hooks for m in model.modules())
        return
    # Accepted: every layer keeps what its neighbours keep, so the pruned model runs and equals its mock.
    with torch.no_grad():
        assert_matches(model(X), prunespec.mock(MODEL, spec)(X))


def _assert_one_line_naming_something(error: Exception) -> None:
    message = str(error)
    assert message and "\n" not in message and ":" in message, message


def test_deleting_any_subselection_is_refused():
    """The edit the data-flow check exists for: every layer is still consistent on its own, the forward pass is not."""
    subselected = [name for name, layer in VALID["layers"].items() if "input" in layer]
    for name in subselected:
        data = copy.deepcopy(VALID)
        del data["layers"][name]["input"]
        spec = load_spec_bytes(json.dumps(data).encode())
        with pytest.raises(prunespec.SpecError, match=rf"^layer '{name}': input_activation_channels: the layer is"):
            prunespec.prune(copy.deepcopy(MODEL), spec)


# ------------------------------------------------------------------------------------------------ structural


def _assert_refused_or_exact(subject: fuzz.Subject, data: bytes) -> str:
    outcome = fuzz.run_case(subject, data)
    assert outcome.kind in ("refused", "exact"), outcome.detail
    return outcome.kind


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_structural_mutations_of_a_cnn_spec_are_refused_or_exact(rng):
    _assert_refused_or_exact(fuzz.cnn(), fuzz.mutate(fuzz.cnn().spec, rng)[0])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_structural_mutations_of_a_transformer_spec_are_refused_or_exact(rng):
    pytest.importorskip("transformers")
    _assert_refused_or_exact(fuzz.transformer(), fuzz.mutate(fuzz.transformer().spec, rng)[0])


def test_the_structural_mutations_reach_both_outcomes():
    """Not all refused: some edits leave a consistent spec (an attribute or count deleted and derived again, a
    shifted list that a neighbour check then must find), and those must build an exact model."""
    rng = random.Random(0)
    kinds = Counter(fuzz.run_case(fuzz.cnn(), fuzz.mutate(fuzz.cnn().spec, rng)[0]).kind for _ in range(30))
    assert kinds["refused"] and kinds["exact"] and not kinds["defect"], kinds


def test_deleting_any_layer_of_resnet18_is_refused_naming_the_layer():
    """The edit fuzzing found first: a layer's whole entry deleted, as a reviewer might do to "keep" the layer. Its
    neighbours then disagree with it (`running_mean should contain 64 elements not 63` in forward, before)."""
    subject = fuzz.cnn()
    model = copy.deepcopy(subject.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in subject.spec["layers"]:
        data = copy.deepcopy(subject.spec)
        del data["layers"][name]
        spec = load_spec_bytes(json.dumps(data).encode())
        with pytest.raises(prunespec.SpecError, match=rf"^layer '{re.escape(name)}': no entry in the spec"):
            prunespec.prune(model, spec)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_deleting_any_layer_or_the_dropped_block_of_a_llama_spec_is_refused():
    pytest.importorskip("transformers")
    subject = fuzz.transformer()
    for name in subject.spec["layers"]:
        data = copy.deepcopy(subject.spec)
        del data["layers"][name]
        with pytest.raises(prunespec.SpecError, match=rf"'{re.escape(name)}'"):
            prunespec.prune(copy.deepcopy(subject.model), load_spec_bytes(json.dumps(data).encode()))
    data = copy.deepcopy(subject.spec)
    [block] = data["dropped_blocks"]
    data["dropped_blocks"], data["request"]["pruned_blocks"] = [], []
    with pytest.raises(prunespec.SpecError, match=rf"^block '{block['module']}': .* dropped_blocks does not drop it"):
        prunespec.prune(copy.deepcopy(subject.model), load_spec_bytes(json.dumps(data).encode()))


def test_a_block_dropped_twice_is_refused():
    """Found by `make fuzz`: removed twice from its ModuleList, it took the block after it along, unlike the mock."""
    pytest.importorskip("transformers")
    subject = fuzz.transformer()
    data = copy.deepcopy(subject.spec)
    data["dropped_blocks"] *= 2
    data["request"]["pruned_blocks"] *= 2
    assert fuzz.run_case(subject, json.dumps(data).encode()).detail.endswith("listed twice; a block is dropped once")


def test_apply_checkpoint_refuses_a_deleted_layer_and_writes_nothing(tmp_path):
    """Pruning a checkpoint file to file builds no model, but the layers must fit together all the same."""
    from safetensors.torch import save_file

    from prunespec.applier.checkpoint import prune_checkpoint

    subject = fuzz.cnn()
    save_file(subject.model.state_dict(), tmp_path / "dense.safetensors")
    data = copy.deepcopy(subject.spec)
    del data["layers"]["layer1.0.bn1"]
    spec = load_spec_bytes(json.dumps(data).encode())
    with pytest.raises(prunespec.SpecError, match=r"^layer 'layer1\.0\.bn1': no entry in the spec \(was it deleted"):
        prune_checkpoint(spec, tmp_path / "dense.safetensors", tmp_path / "pruned.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.safetensors"]
