"""Schema versions: every older version the reader knows is migrated, applied and shown; newer ones are refused.

`tests/data/v<version>/` holds specs written by the last release of each older version (see `tests/data/README.md`).
Each is read, migrated, applied with `prune`, and compared with a spec planned now for the same request.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import msgspec
import pytest
import torch
import torchvision
from invariant import assert_matches
from nets import SMALL_NETS, build

import prunespec
from prunespec import review
from prunespec.schemas import KNOWN_VERSIONS, SCHEMA_VERSION, decode_runs, load_spec_bytes

DATA = Path(__file__).parent / "data"
OLDER_VERSIONS = [v for v in KNOWN_VERSIONS if v != SCHEMA_VERSION]
STORED = sorted(path for version in OLDER_VERSIONS for path in (DATA / f"v{version}").glob("*.prunespec.json"))


def _model_for(path: Path) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The model and inputs a stored spec was planned with: a `nets` builder, or resnet18 (tests/data/README.md)."""
    name = path.name.split(".")[0]
    if name in SMALL_NETS:
        return build(name)
    assert name == "resnet18", path
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).double().eval()
    return model, [torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]


def _requested(spec: prunespec.PruningSpec) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """The (tensor, channel) pairs of the spec's request, to plan it again."""
    return tuple(
        [(r.tensor, c) for r in requests for c in decode_runs(r.channels)]
        for requests in (spec.request.pruned_inputs, spec.request.pruned_outputs)
    )


def test_every_older_version_has_stored_specs():
    for version in OLDER_VERSIONS:
        stored = [p for p in STORED if p.parent.name == f"v{version}"]
        assert stored, f"no stored specs of schema {version} in {DATA}"
        assert any(b'"input": {' in p.read_bytes() for p in stored), "at least one must have a subselection"
        for path in stored:
            assert json.loads(path.read_bytes())["schema_version"] == version, path


@pytest.mark.parametrize("path", STORED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_an_older_spec_is_migrated_and_prunes_like_a_spec_planned_now(path):
    spec = prunespec.load_spec(path)
    assert spec.schema_version == SCHEMA_VERSION
    model, inputs = _model_for(path)
    fresh = prunespec.plan(
        model, inputs, *_requested(spec), constrained=spec.request.constrained, reorder=spec.request.reorder
    )
    assert fresh.request == spec.request and fresh.fingerprint == spec.fingerprint
    with torch.no_grad():
        expected = prunespec.prune(copy.deepcopy(model), fresh)(*inputs)
        got = prunespec.prune(copy.deepcopy(model), spec)(*inputs)
    assert_matches(got, expected)

    for fmt in review.FORMATS:
        assert spec.model in review.render_show(spec, fmt)


@pytest.mark.parametrize("path", [p for p in STORED if p.parent.name == "v1.0"], ids=lambda p: p.name)
def test_migrating_1_0_keeps_every_field_and_leaves_the_new_ones_absent(path):
    raw = json.loads(path.read_bytes())
    spec = load_spec_bytes(path.read_bytes())
    assert msgspec.to_builtins(spec) == _migrated(raw)
    assert all(layer.macs is None and layer.input_activation_channels is None for layer in spec.layers.values())
    assert review.predates_layer_macs(spec)
    text = review.render_show(spec)
    assert text.count(review.PREDATES_LAYER_MACS) == 1
    assert all(row["macs"] is None for row in json.loads(review.render_show(spec, "json"))["layers"])


@pytest.mark.parametrize("path", [p for p in STORED if p.parent.name == "v1.1"], ids=lambda p: p.name)
def test_migrating_1_1_keeps_every_field_and_knows_no_norm_folds(path):
    raw = json.loads(path.read_bytes())
    spec = load_spec_bytes(path.read_bytes())
    assert json.loads(msgspec.json.encode(spec)) == _migrated(raw)
    assert any(layer.macs is not None for layer in spec.layers.values())
    assert not review.predates_layer_macs(spec)
    model, _ = _model_for(path)
    assert prunespec.prune(copy.deepcopy(model), spec, fold_norms=True)  # folds nothing, changes nothing else
    assert "apply --fold-norms): 0" in review.render_show(spec)


@pytest.mark.parametrize("path", [p for p in STORED if p.parent.name == "v1.2"], ids=lambda p: p.name)
def test_migrating_1_2_keeps_every_field_and_prunes_no_heads(path):
    raw = json.loads(path.read_bytes())
    spec = load_spec_bytes(path.read_bytes())
    assert json.loads(msgspec.json.encode(spec)) == _migrated(raw)
    assert all(layer.heads is None for layer in spec.layers.values())


@pytest.mark.parametrize("path", [p for p in STORED if p.parent.name == "v1.3"], ids=lambda p: p.name)
def test_migrating_1_3_keeps_every_field_and_knows_no_neighbours(path):
    raw = json.loads(path.read_bytes())
    spec = load_spec_bytes(path.read_bytes())
    assert json.loads(msgspec.json.encode(spec)) == _migrated(raw)
    assert spec.neighbours is None


def test_a_spec_of_this_version_without_neighbours_is_refused():
    """Only a migrated spec may lack them: deleting them would turn off the check that finds a deleted layer."""
    data = _planned_json()
    for value in (None, "delete"):
        if value is None:
            data["neighbours"] = None
        else:
            del data["neighbours"]
        with pytest.raises(prunespec.SpecError, match=r"neighbours: a spec of schema 1\.4 must list the channels"):
            load_spec_bytes(json.dumps(data).encode())


def _migrated(raw: dict) -> dict:
    """An older file as this version reads it: every field kept, the newer ones empty."""
    request = {"pruned_heads": [], "pruned_kv_heads": [], "through_norms": False, "pruned_blocks": [],
               "uniform": False, **raw["request"]}  # fmt: skip
    newer = {"norm_folds": [], "dropped_blocks": [], "config": {}, "tied": {}}
    return {**newer, **raw, "request": request, "schema_version": SCHEMA_VERSION, "neighbours": None}


def _planned_json() -> dict:
    model, inputs = build("conv_conv")
    return json.loads(prunespec.plan(model, inputs, [("conv2.weight", 1)]).to_json())


@pytest.mark.parametrize("version", ["1.5", "2.0"], ids=["newer minor", "newer major"])
def test_a_newer_version_is_refused_with_the_release_that_wrote_it(version):
    data = _planned_json() | {"schema_version": version, "generator": "prunespec 7.3.0"}
    with pytest.raises(
        prunespec.SpecError,
        match=rf"^spec: schema_version {version} is newer than this prunespec reads \({SCHEMA_VERSION}\); "
        r"upgrade to prunespec 7\.3\.0 \(which wrote it\) or later$",
    ):
        load_spec_bytes(json.dumps(data).encode())


@pytest.mark.parametrize("generator", [None, "other-tool 1.0", "prunespec " + "9" * 200])
def test_a_newer_version_from_an_unknown_writer_is_refused_all_the_same(generator):
    data = _planned_json() | {"schema_version": "3.0", "generator": generator}
    with pytest.raises(prunespec.SpecError, match=r"newer than this prunespec reads .*; upgrade to a release that "):
        load_spec_bytes(json.dumps(data).encode())


@pytest.mark.parametrize("version", ["0.9", "1.0.1", "v1.0", "9" * 5000 + ".0", 1.0])
def test_an_unknown_or_malformed_version_is_refused(version):
    data = _planned_json() | {"schema_version": version}
    with pytest.raises(prunespec.SpecError, match="schema_version"):
        load_spec_bytes(json.dumps(data).encode())
