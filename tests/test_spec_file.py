"""The spec file format: the committed JSON Schema, canonical bytes, index runs, versions."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torchvision

import prunespec
from invariant import random_request
from nets import build
from prunespec.schemas import (
    SCHEMA_PATH,
    decode_runs,
    encode_runs,
    json_schema,
    load_spec_bytes,
    parse_runs,
    well_formed_runs,
)
from prunespec.schemas.spec import _RUNS_PATTERN


def test_committed_schema_matches_the_structs():
    committed = json.loads(SCHEMA_PATH.read_text())
    assert committed == json_schema(), "prunespec.schema.json is stale: run `make schema` and commit it"


@pytest.mark.parametrize("constrained", [False, True])
def test_planned_specs_validate_against_the_committed_schema(constrained):
    schema = json.loads(SCHEMA_PATH.read_text())
    model, inputs = build("fork")
    spec = prunespec.plan(model, inputs, *random_request(model, inputs, 0, 0.4, "both"), constrained=constrained)
    jsonschema.validate(json.loads(spec.to_json()), schema)


def test_schema_rejects_what_the_reader_rejects():
    schema = json.loads(SCHEMA_PATH.read_text())
    model, inputs = build("conv_conv")
    data = json.loads(prunespec.plan(model, inputs, [("conv2.weight", 1)]).to_json())
    data["layers"]["conv1"]["tensors"]["weight"] = ["0-3,x"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)
    with pytest.raises(prunespec.SpecError, match="layers"):
        load_spec_bytes(json.dumps(data).encode())


def test_same_request_gives_byte_identical_files_across_processes(tmp_path):
    """Dict order, slot numbering and ids must not leak into the file: plan in two fresh interpreters."""
    script = (
        "import sys, torch, torchvision, prunespec; torch.manual_seed(0);"
        "m = torchvision.models.resnet18(weights=None).eval();"
        "s = prunespec.plan(m, [torch.rand(1, 3, 32, 32)],"
        " [('layer1.0.conv2.weight', 3), ('layer2.0.conv1.weight', 7)], [('layer3.0.conv1.weight', 5)]);"
        "sys.stdout.buffer.write(s.to_json())"
    )
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1]
    assert b'"layer1.0.conv2": {' in runs[0]


def test_a_textual_diff_shows_the_changed_layers():
    model = torchvision.models.resnet18(weights=None).eval()
    x = [torch.rand(1, 3, 32, 32)]
    a = prunespec.plan(model, x, [("layer4.1.conv2.weight", 3)], reorder=False).to_json().decode().splitlines()
    b = prunespec.plan(model, x, [("layer4.1.conv2.weight", 4)], reorder=False).to_json().decode().splitlines()
    assert len(a) == len(b)
    changed = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    # the request, then one line each for the producer, its batch norm and the consumer, and for the group of
    # channels they share
    sections = [next(line for line in reversed(a[:i]) if line.endswith((": {", '"neighbours": ['))).strip()
                for i in changed]  # fmt: skip
    assert sections == ['"request": {', '"layer4.1.conv1": {', '"layer4.1.bn1": {', '"layer4.1.conv2": {',
                        '"neighbours": [']  # fmt: skip
    assert '"layer4.1.bn1.weight:0"' in a[changed[-1]]


def test_runs_round_trip():
    for indices in ([], [0], [5, 6, 7, 0, 1], list(range(100)), [9, 3, 4, 5, 1]):
        assert decode_runs(encode_runs(indices)) == indices


@pytest.mark.parametrize("bad", ["1-", "a", "3-1", "-1", "1,,2", "99999999999"])
def test_bad_runs_are_spec_errors(bad):
    with pytest.raises(prunespec.SpecError):
        decode_runs(bad)


RUNS_PIECES = ["0", "1", "7", "12", "007", "2147483647", "2147483648", ",", "-", "x", " ", "+", "_", "\u0663", "\n"]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(RUNS_PIECES), max_size=9).map("".join))
def test_well_formed_runs_agrees_with_the_published_pattern(runs):
    assert well_formed_runs(runs) == bool(re.fullmatch(_RUNS_PATTERN, runs))


def test_parse_runs_refuses_a_number_too_long_for_int():
    with pytest.raises(prunespec.SpecError, match="is too large"):
        parse_runs("1" * 5000)


@pytest.mark.parametrize(
    "path, where",
    [
        (["request", "pruned_inputs", 0, "channels"], "request.pruned_inputs[0].channels"),
        (["kept", 0, "channels"], "kept[0].channels"),
        (["layers", "conv1", "tensors", "weight", 0], "layers['conv1'].tensors['weight'][0]"),
        (["layers", "conv2", "input", "indices"], "layers['conv2'].input.indices"),
    ],
)
def test_every_runs_field_is_checked_when_a_spec_is_read(path, where):
    model, inputs = build("conv_conv")
    data = json.loads(prunespec.plan(model, inputs, [("conv2.weight", 1)]).to_json())
    data["kept"] = [{"tensor": "conv2.weight", "side": "input", "channels": "0", "reason": "a test"}]
    data["layers"]["conv2"]["input"] = {"channels": 4, "indices": "0-3"}
    load_spec_bytes(json.dumps(data).encode())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "1-2-3"
    with pytest.raises(prunespec.SpecError, match=re.escape(f"spec: {where}: '1-2-3' is not a list of index runs")):
        load_spec_bytes(json.dumps(data).encode())


def test_a_spec_prints_short_and_readable_and_its_json_is_unchanged():
    model, inputs = build("fork")
    spec = prunespec.plan(model, inputs, [("a.weight", 1)])
    s = spec.summary
    assert str(s) == (
        f"parameters {s.parameters_before:,} -> {s.parameters_after:,} "
        f"({(s.parameters_after - s.parameters_before) / s.parameters_before:+.1%}), MACs {s.macs_before:,} -> "
        f"{s.macs_after:,} ({(s.macs_after - s.macs_before) / s.macs_before:+.1%}), {s.subselections} activation "
        "subselection(s)"
    )
    assert repr(spec).startswith(f"<PruningSpec of Fork, schema {spec.schema_version}: {len(spec.layers)} layers,")
    assert str(s) in str(spec) and "\n" not in repr(spec)
    data = json.loads(spec.to_json())
    assert data["summary"] == {"parameters_before": s.parameters_before, "parameters_after": s.parameters_after,
                               "macs_before": s.macs_before, "macs_after": s.macs_after,
                               "subselections": s.subselections}  # fmt: skip
    assert load_spec_bytes(spec.to_json()) == spec
