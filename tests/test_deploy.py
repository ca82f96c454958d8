"""Deploying from stored files: a service with the model definition, a pruned checkpoint and the spec rebuilds the
pruned model in a fresh process, on the meta device, without the original weights and without tracing.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from invariant import assert_matches, random_request
from nets import randomize_norms
from safetensors.torch import load_file
from test_cli import REPO, run_cli

import prunespec

SERVICE = textwrap.dedent(
    """
    import json, sys
    import torch, torchvision
    from safetensors.torch import load_file
    import prunespec

    spec_path, checkpoint, inputs, outputs = sys.argv[1:]
    with torch.device("meta"):
        model = torchvision.models.{name}(weights=None)
    prunespec.build_pruned(model, prunespec.load_spec(spec_path))
    model.load_state_dict(load_file(checkpoint), strict=True, assign=True)
    with torch.no_grad():
        torch.save(model.eval()(torch.load(inputs)), outputs)
    print(json.dumps(sorted(name for name in sys.modules if name.startswith("prunespec"))))
    """
)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_a_fresh_process_rebuilds_the_pruned_model_from_checkpoint_and_spec(name, tmp_path):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    randomize_norms(model)  # with its initial norms, mobilenet_v2's outputs are about 1e-9: nothing to compare
    x = torch.randn(2, 3, 64, 64)
    request, _ = random_request(model, [x], seed="deploy", fraction=0.3, side="input")
    spec = prunespec.plan(model, [x], pruned_inputs=request)
    assert spec.summary.subselections > 0  # the rebuilt model must also gather its activations
    spec.model = f"torchvision:{name}"
    spec_path = tmp_path / "model.prunespec.json"
    spec.save(spec_path)
    weights = tmp_path / "dense.pt"
    torch.save(model.state_dict(), weights)

    # The pruned checkpoint, written by the command line from the dense weights.
    result = run_cli("apply", spec_path, f"torchvision:{name}", "--weights", weights, "-o", "pruned.safetensors",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    checkpoint = tmp_path / "pruned.safetensors"

    # The service: a fresh process that never sees the dense weights.
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "service.py").write_text(SERVICE.replace("{name}", name))
    done = subprocess.run(
        [sys.executable, "service.py", spec_path, checkpoint, "x.pt", "y.pt"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert "prunespec.planner" not in loaded and "prunespec.applier" in loaded

    # The same as pruning the dense model in place here, bit for bit (the service computes on as many threads as
    # this process, see conftest.py), and as its mock up to summation order: in float64, once the spec has checked
    # the float32 models.
    pruned = prunespec.prune(getattr(torchvision.models, name)(weights=None).eval(), spec)
    pruned.load_state_dict(load_file(checkpoint), strict=True)
    mock = prunespec.mock(model, spec)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), pruned(x))
        assert_matches(pruned.double()(x.double()), mock.double()(x.double()))


def test_build_pruned_refuses_a_spec_of_another_model_and_leaves_it_alone():
    model = torchvision.models.resnet18(weights=None).eval()
    spec = prunespec.plan(model, [torch.randn(1, 3, 32, 32)], pruned_inputs=[("layer1.0.conv2.weight", 3)])
    with torch.device("meta"):
        other = torchvision.models.resnet34(weights=None)
    shapes = {k: v.shape for k, v in other.state_dict().items()}
    with pytest.raises(prunespec.SpecError, match="fingerprint"):
        prunespec.build_pruned(other, spec)
    assert {k: v.shape for k, v in other.state_dict().items()} == shapes


def test_apply_checkpoint_prunes_a_safetensors_file_without_the_model(tmp_path):
    from safetensors.torch import save_file

    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    request, _ = random_request(model, [x], seed="checkpoint", fraction=0.3, side="input")
    spec = prunespec.plan(model, [x], pruned_inputs=request)
    spec.save(tmp_path / "spec.json")
    save_file(model.state_dict(), tmp_path / "dense.safetensors")
    wrong = torchvision.models.resnet34(weights=None).state_dict()
    save_file(wrong, tmp_path / "other.safetensors")

    ok = run_cli("apply-checkpoint", "spec.json", "dense.safetensors", "-o", "pruned.safetensors", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    refused = run_cli("apply-checkpoint", "spec.json", "other.safetensors", "-o", "bad.safetensors", cwd=tmp_path)
    assert refused.returncode == 1 and "fingerprint" in refused.stderr and "the checkpoint" in refused.stderr
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "dense.safetensors").read_bytes()[:5000])
    cut = run_cli("apply-checkpoint", "spec.json", "truncated.safetensors", "-o", "bad.safetensors", cwd=tmp_path)
    assert cut.returncode == 1 and "the file is truncated" in cut.stderr, cut.stderr
    assert len(cut.stderr.splitlines()) == 1 and len(refused.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.safetensors", "other.safetensors",
                                                          "pruned.safetensors", "spec.json", "truncated.safetensors"]

    expected = prunespec.prune(model, spec).state_dict()
    written = load_file(tmp_path / "pruned.safetensors")
    assert sorted(written) == sorted(expected)  # safetensors files keep no order
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor), key


@pytest.mark.parametrize(
    "damage",
    ["offset written as a float", "offset past the end", "unknown dtype", "header not JSON"],
)
def test_apply_checkpoint_refuses_a_damaged_header_and_writes_nothing(damage, tmp_path):
    from safetensors.torch import save_file

    from prunespec.applier.checkpoint import prune_checkpoint

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1))
    spec = prunespec.plan(model, [torch.randn(1, 3, 4, 4)], pruned_inputs=[("1.weight", 1)])
    save_file(model.state_dict(), tmp_path / "dense.safetensors")
    raw = (tmp_path / "dense.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    entry = header["0.bias"]
    if damage == "offset written as a float":
        entry["data_offsets"][0] = float(entry["data_offsets"][0])  # 0.0: equal, but no file offset
    elif damage == "offset past the end":
        entry["data_offsets"][1] += 10**9
    elif damage == "unknown dtype":
        entry["dtype"] = "F128"
    encoded = b"{not json" if damage == "header not JSON" else json.dumps(header).encode()
    (tmp_path / "bad.safetensors").write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + length :])
    with pytest.raises(prunespec.SpecError, match="bad.safetensors: .*(not a valid safetensors entry|not JSON)"):
        prune_checkpoint(spec, tmp_path / "bad.safetensors", tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "dense.safetensors"]


# ---------------------------------------------------------------------------------------------- floating dtypes


@pytest.fixture(scope="module")
def float32_plan():
    """resnet18 in float32, an input, and a spec planned on them with a random pattern."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    request, _ = random_request(model, [x], seed="dtype", fraction=0.3, side="input")
    return model, x, prunespec.plan(model, [x], pruned_inputs=request)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bfloat16", "float64"])
def test_a_spec_planned_in_float32_applies_in_any_floating_dtype(dtype, float32_plan, tmp_path):
    from safetensors.torch import save_file

    from prunespec.applier.checkpoint import prune_checkpoint

    model, x, spec = float32_plan
    cast = copy.deepcopy(model).to(dtype)
    pruned = prunespec.prune(copy.deepcopy(cast), spec)
    # Pruning selects entries, so pruning in any dtype is pruning in float32 and casting.
    in_float32 = prunespec.prune(copy.deepcopy(model), spec).state_dict()
    for key, value in pruned.state_dict().items():
        expected = in_float32[key].to(dtype) if in_float32[key].is_floating_point() else in_float32[key]
        assert value.dtype == expected.dtype and torch.equal(value, expected), key
    with torch.no_grad():
        expected, actual = prunespec.mock(cast, spec)(x.to(dtype)), pruned(x.to(dtype))
    # float64: summation order only. bfloat16: each of resnet18's 18 weighted layers may round its output once more.
    tolerance = 1e-12 if dtype == torch.float64 else 18 * torch.finfo(dtype).eps
    assert (actual - expected).abs().max().item() <= tolerance * expected.abs().max().item()

    # A checkpoint stored in that dtype stays in it.
    save_file(cast.state_dict(), tmp_path / "dense.safetensors")
    prune_checkpoint(spec, tmp_path / "dense.safetensors", tmp_path / "pruned.safetensors")
    written = load_file(tmp_path / "pruned.safetensors")
    for key, value in pruned.state_dict().items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: f.update({"fc.weight": "float32[10,512]"}),
         r"^fingerprint: tensor 'fc.weight' is float32\[10,512\] in the spec but bfloat16\[1000,512\] in the model"),
        (lambda f: f.update({"fc.weights": f.pop("fc.weight")}),
         r"^fingerprint: the spec expects tensor 'fc.weights' \(float32\[1000,512\]\) but the model has none"),
        (lambda f: f.update({"bn1.num_batches_tracked": "int32[]"}),
         r"^fingerprint: tensor 'bn1.num_batches_tracked' is int32\[\] in the spec but int64\[\] in the model"),
    ],
    ids=["shape", "name", "integer dtype"],
)
def test_in_another_dtype_a_changed_shape_or_name_is_still_refused(edit, message, float32_plan):
    model, _, spec = float32_plan
    other = prunespec.schemas.load_spec_bytes(spec.to_json())
    edit(other.fingerprint)
    cast = copy.deepcopy(model).to(torch.bfloat16)
    before = {k: v.clone() for k, v in cast.state_dict().items()}
    for apply in (prunespec.prune, prunespec.mock):
        with pytest.raises(prunespec.SpecError, match=message):
            apply(cast, other)
    assert all(torch.equal(before[k], v) for k, v in cast.state_dict().items())
