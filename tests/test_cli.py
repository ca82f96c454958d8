"""The `prunespec` command line, run as real subprocesses (`python -m prunespec ...`) the way users run it, and in
process through typer's CliRunner (`invoke`, `invoke_all`), which runs the same code without the seconds a fresh
interpreter spends importing torch.

Start with `start_cli` / `run_all`, `invoke_all` and the `tiny_spec` fixture (a spec planned once for
`models_for_cli:tiny_net`). The success tests plan and apply; the error tests check that every expected failure is
one `error:` line on stderr, exit status 1, no traceback and no file left behind. Each kind of command runs at least
once as a real process (planning, applying to every output kind, an error of each kind, --debug, --help); the many
variations of the same path run in process. The model-loading helpers are tested in process at the end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

import prunespec
from prunespec.cli import app, parse_channel_request, parse_shape
from prunespec.models import ModelError, build_model, load_model
from prunespec.schemas import SCHEMA_VERSION, json_schema

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TINY = "models_for_cli:tiny_net"
SMALL = "1x3x16x16"
# tiny_net is Sequential(conv 0, bn 1, relu 2, conv 3, relu 4, pool 5, flatten 6, linear 7).
TINY_REQUEST = ["--prune-input", "3.weight:0-2", "--prune-output", "3.weight:1"]


def start_cli(*args: object, cwd: Path) -> subprocess.Popen[str]:
    """Start `python -m prunespec ARGS` in `cwd`, with the repo and tests/ importable (for models_for_cli)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(TESTS), env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", "prunespec", *(str(a) for a in args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return finish(start_cli(*args, cwd=cwd))


def run_all(commands: dict[str, list[object]], folder: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run several commands at once, each in its own empty folder `folder/NAME`: most of a run is importing torch."""
    started = {}
    for name, args in commands.items():
        (folder / name).mkdir()
        started[name] = start_cli(*args, cwd=folder / name)
    return {name: finish(process) for name, process in started.items()}


def invoke(*args: object, cwd: Path) -> Result:
    """Run `prunespec ARGS` in this process, in `cwd`."""
    before = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(before)


def invoke_all(commands: dict[str, list[object]], folder: Path) -> dict[str, Result]:
    """`run_all` in this process: each command in its own empty folder `folder/NAME`."""
    results = {}
    for name, args in commands.items():
        (folder / name).mkdir()
        results[name] = invoke(*args, cwd=folder / name)
    return results


def assert_ok(result: subprocess.CompletedProcess[str] | Result) -> None:
    code = result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code
    assert code == 0, f"exit {code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    spec_path = folder / "tiny.prunespec.json"
    result = run_cli("plan", TINY, "-o", spec_path, "--input-shape", SMALL, *TINY_REQUEST, cwd=folder)
    assert_ok(result)
    return spec_path


# ---------------------------------------------------------------------------------------------- success


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert_ok(result)
    for command in ("plan", "apply", "schema"):
        assert command in result.stdout


def test_version_names_the_package_and_the_schema() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"prunespec {prunespec.__version__} (spec schema {SCHEMA_VERSION})\n"
    declared = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert declared and declared.group(1) == prunespec.__version__


COMMANDS = [[], *[[c.name] for c in app.registered_commands]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0] if c else "prunespec")
def test_help_shows_flags_without_a_value_type(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=100)
    assert result.exit_code == 0
    assert "--help" in result.output and "<bool>" not in result.output


def test_schema_prints_the_json_schema(tmp_path: Path) -> None:
    result = invoke("schema", cwd=tmp_path)
    assert_ok(result)
    assert json.loads(result.stdout) == json_schema()
    assert result.stdout.endswith("}\n")


def test_plan_writes_a_spec_and_a_summary(tiny_spec: Path) -> None:
    spec = prunespec.load_spec(tiny_spec)
    assert spec.model == TINY
    assert [list(i.shape) for i in spec.inputs] == [[1, 3, 16, 16]]
    assert not spec.request.constrained and spec.request.reorder
    assert spec.summary.parameters_after < spec.summary.parameters_before
    assert spec.layers
    # The file is canonical: loading and writing again gives the same bytes.
    assert spec.to_json().strip() == tiny_spec.read_bytes().strip()


def test_plan_prints_where_and_what(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.json"
    result = invoke("plan", TINY, "-o", spec_path, "--input-shape", SMALL, *TINY_REQUEST, "--no-reorder", cwd=tmp_path)
    assert_ok(result)
    assert str(spec_path) in result.stdout
    assert "parameters" in result.stdout and "MACs" in result.stdout
    assert "not reordered" in result.stdout
    assert "  channels:                 named channels\n" in result.stdout
    assert "requested" not in result.stdout
    assert not prunespec.load_spec(spec_path).request.reorder


def test_apply_writes_every_output_format(tiny_spec: Path, tmp_path: Path) -> None:
    runs = run_all({"pt2": ["apply", tiny_spec, TINY, "-o", "tiny.pt2", "--verify"]}, tmp_path) | invoke_all(
        {
            "safetensors": ["apply", tiny_spec, TINY, "-o", "tiny.safetensors"],
            "pt": ["apply", tiny_spec, TINY, "-o", "tiny.pt"],
            "mock": ["apply", tiny_spec, TINY, "-o", "mock.pt2", "--mock"],
        },
        tmp_path,
    )
    for result in runs.values():
        assert_ok(result)

    # The check says what it compared, against what, and how it came out; export progress goes to stderr.
    assert re.search(
        r"^verify: max \|pruned - mock\| = \S+ \(relative \S+ of max\(1, output scale \S+\)\), tolerance 1e-09: ok$",
        runs["pt2"].stdout,
        re.MULTILINE,
    ), runs["pt2"].stdout
    assert runs["pt2"].stderr == "exporting tiny.pt2 (torch.export) ...\n"
    assert runs["safetensors"].stderr == ""
    # The exported program runs, and its convolution really is smaller.
    program = torch.export.load(tmp_path / "pt2" / "tiny.pt2")
    assert program.module()(torch.randn(1, 3, 16, 16)).shape == (1, 4)
    assert program.state_dict["0.weight"].shape[0] < 8

    # The state dicts keep every key. Input channels 0-2 of conv 3 are gone, and with them the conv 0 outputs and
    # batch-norm channels that only they read; output channel 1 of conv 3 is gone from the linear layer's input.
    state = load_file(tmp_path / "safetensors" / "tiny.safetensors")
    assert state.keys() == build_model(TINY).state_dict().keys()
    assert state["0.weight"].shape == (5, 3, 3, 3)
    assert state["1.running_mean"].shape == (5,)
    assert state["3.weight"].shape == (7, 5, 3, 3)
    assert state["7.weight"].shape == (4, 7)
    assert torch.load(tmp_path / "pt" / "tiny.pt", weights_only=True)["0.weight"].shape == (5, 3, 3, 3)

    mocked = torch.export.load(tmp_path / "mock" / "mock.pt2")
    assert mocked.module()(torch.randn(1, 3, 16, 16)).shape == (1, 4)
    assert (8, 3, 3, 3) in [tuple(t.shape) for t in mocked.state_dict.values()]


def test_plan_without_channels_prunes_zeroed_weights(tmp_path: Path) -> None:
    model = build_model(TINY)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["3.weight"][:, [2, 5]] = 0.0  # conv 3 no longer reads channels 2 and 5
    weights = tmp_path / "zeroed.safetensors"
    save_file(state, str(weights))

    spec_path = tmp_path / "zeroed.prunespec.json"
    result = invoke("plan", TINY, "-o", spec_path, "--weights", weights, "--input-shape", SMALL, cwd=tmp_path)
    assert_ok(result)
    spec = prunespec.load_spec(spec_path)
    assert spec.request.zeroed
    assert spec.summary.parameters_after < spec.summary.parameters_before

    out = tmp_path / "zeroed.pt"
    assert_ok(invoke("apply", spec_path, TINY, "-o", out, "--weights", weights, "--verify", cwd=tmp_path))
    assert torch.load(out, weights_only=True)["0.weight"].shape == (6, 3, 3, 3)


def test_resnet18_end_to_end(tmp_path: Path) -> None:
    """`make demo`: plan (in process), then apply as a real process."""
    spec_path = tmp_path / "resnet18.prunespec.json"
    result = invoke(
        "plan", "torchvision:resnet18", "-o", spec_path, "--input-shape", "1x3x64x64",
        "--prune-input", "layer1.0.conv2.weight:0-7",
        "--prune-input", "layer2.0.conv1.weight:3,9,17",
        "--prune-output", "layer3.0.conv1.weight:0-15",
        cwd=tmp_path,
    )  # fmt: skip
    assert_ok(result)
    spec = prunespec.load_spec(spec_path)
    assert spec.model == "torchvision:resnet18"
    assert spec.summary.parameters_after < spec.summary.parameters_before

    out = tmp_path / "resnet18-pruned.pt2"
    result = run_cli("apply", spec_path, "torchvision:resnet18", "-o", out, "--verify", cwd=tmp_path)
    assert_ok(result)
    assert "max |pruned - mock| = " in result.stdout
    assert torch.export.load(out).module()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_timm_model_plans_and_applies(tmp_path: Path) -> None:
    """`plan timm:NAME` on a weight-standardised network (NFNet): the standardised filters are named and go."""
    pytest.importorskip("timm")
    spec_path = tmp_path / "nf.prunespec.json"
    result = invoke(
        "plan", "timm:nf_regnet_b0", "-o", spec_path, "--input-shape", "1x3x32x32",
        "--prune-output", "stages.0.0.conv1.weight:0-3", "--prune-input", "head.fc.weight:0-3", cwd=tmp_path,
    )  # fmt: skip
    assert_ok(result)
    spec = prunespec.load_spec(spec_path)
    assert spec.model == "timm:nf_regnet_b0"
    assert spec.layers["final_conv"].attributes["out_channels"] == 960 - 4  # the filters that fed them
    # conv1's filters feed a standardised convolution, which needs all its input channels
    assert "kept: is read by a weight standardised over its input channels" in result.stdout
    result = invoke("apply", spec_path, "timm:nf_regnet_b0", "-o", tmp_path / "pruned.pt", "--verify", cwd=tmp_path)
    assert_ok(result)
    assert "max |pruned - mock| = " in result.stdout


# ---------------------------------------------------------------------------------------------- errors


def assert_one_line_error(result: subprocess.CompletedProcess[str] | Result, *fragments: str) -> str:
    """Exit status 1, exactly one stderr line starting with 'error:', no traceback; return that line."""
    lines = result.stderr.splitlines()
    code = result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code
    assert code == 1, f"exit {code}\nstderr:\n{result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_expected_failures_are_one_line_errors(tiny_spec: Path, tmp_path: Path) -> None:
    """Real processes for a model that cannot be built, a spec that cannot be read and a spec of another model; the
    rest in process."""
    corrupt = tmp_path / "corrupt.prunespec.json"
    corrupt.write_text('{"schema_version": "1.0", "model": ')
    plan_tiny = ["plan", TINY, "-o", "out.prunespec.json", "--input-shape", SMALL]
    apply_tiny = ["apply", tiny_spec, TINY]
    # name: (command, fragments the error line must contain)
    cases: dict[str, tuple[list[object], list[str]]] = {
        "bad-specifier": (["plan", "resnet18", "-o", "out.json"], ["'hf:path/to/folder' or 'package.module:"]),
        "unknown-torchvision-name": (["plan", "torchvision:resnet81", "-o", "out.json"], ["resnet81", "'resnet18'"]),
        "bad-shape": ([*plan_tiny, "--input-shape", "1x3xfoo"], ["1x3xfoo", "1x3x224x224"]),
        "bad-request": ([*plan_tiny, "--prune-input", "3.weight"], ["PARAM:CH"]),
        "unknown-parameter": ([*plan_tiny, "--prune-input", "3.wieght:0"], ["3.wieght"]),
        "missing-spec": (["apply", "missing.prunespec.json", TINY, "-o", "out.pt2"], ["missing.prunespec.json"]),
        "corrupt-spec": (["apply", corrupt, TINY, "-o", "out.pt2"], ["corrupt.prunespec.json"]),
        "wrong-model": (
            ["apply", tiny_spec, "models_for_cli:wider_net", "-o", "out.pt2"],
            [f"the spec was planned for {TINY} (11 tensors); the model (Sequential) differs in 7 of them"],
        ),
        "bad-suffix": ([*apply_tiny, "-o", "out.h5"], [".pt2", ".onnx", ".safetensors"]),
    }
    real = ("bad-specifier", "corrupt-spec", "wrong-model")
    runs = run_all({name: cases[name][0] for name in real}, tmp_path) | invoke_all(
        {name: args for name, (args, _) in cases.items() if name not in real}, tmp_path
    )
    for name, (_, fragments) in cases.items():
        assert_one_line_error(runs[name], *fragments)
        assert not any((tmp_path / name).iterdir()), f"{name} left files behind"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli("--debug", "plan", "resnet18", "-o", tmp_path / "out.json", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ModelError" in result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = invoke("plan", TINY, cwd=tmp_path)  # no -o
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr and "--output" in result.stderr


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["no_such_module_xyz:net"], ["no_such_module_xyz"]),
        (["models_for_cli:tiny_nte"], ["tiny_net"]),
        (["models_for_cli:not_a_model"], ["not a torch.nn.Module"]),
        ([TINY, "--prune-output", "3.weight:a-b"], ["3.weight:a-b"]),
        ([TINY, "--prune-input", "3.weight:7-3"], ["7-3"]),
        ([TINY, "--weights", "missing.pt"], ["missing.pt"]),
        ([TINY, "--weights", "weights.onnx"], [".safetensors"]),
    ],
    ids=[
        "unknown-module",
        "unknown-callable",
        "not-a-module",
        "bad-channel-list",
        "downward-range",
        "missing-weights",
        "weights-suffix",
    ],
)
def test_more_plan_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], fragments: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["plan", *args, "-o", "out.prunespec.json"])
    assert_one_line_error(result, *fragments)
    assert not any(tmp_path.iterdir())


def test_weights_that_do_not_fit_are_one_line(tmp_path: Path) -> None:
    weights = tmp_path / "wider.pt"
    torch.save({"state_dict": build_model("models_for_cli:wider_net").state_dict()}, weights)
    result = CliRunner().invoke(app, ["plan", TINY, "-o", str(tmp_path / "out.json"), "--weights", str(weights)])
    assert_one_line_error(result, "do not fit", "0.weight")
    assert [p.name for p in tmp_path.iterdir()] == ["wider.pt"]


def test_more_apply_errors(tiny_spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    future = tmp_path / "future.prunespec.json"
    future.write_text(tiny_spec.read_text().replace(f'"schema_version": "{SCHEMA_VERSION}"', '"schema_version": "9.0"'))
    monkeypatch.chdir(tmp_path)
    cases = [
        ([future, TINY, "-o", "out.pt2"], ["9.0"]),
        ([tiny_spec, TINY, "-o", "out.safetensors", "--mock"], ["--mock"]),
        ([tiny_spec, TINY, "-o", "no_such_folder/out.pt2"], ["no_such_folder"]),
        # A negative tolerance fails every comparison: the verify failure path, which must write nothing.
        ([tiny_spec, TINY, "-o", "out.pt2", "--verify", "--tolerance=-1"], ["tolerance"]),
    ]
    for args, fragments in cases:
        result = CliRunner().invoke(app, ["apply", *(str(a) for a in args)])
        assert_one_line_error(result, *fragments)
        assert [p.name for p in tmp_path.iterdir()] == [future.name], args
    assert result.stdout.endswith("tolerance -1: FAILED\n")  # the --verify line, then the error


def test_inputs_the_model_cannot_take_are_one_line_naming_the_layer(tmp_path: Path) -> None:
    out = tmp_path / "out.prunespec.json"
    result = CliRunner().invoke(app, ["plan", TINY, "-o", str(out), "--input-shape", "1x3x16", *TINY_REQUEST])
    line = assert_one_line_error(result, "the model cannot run on --input-shape 1x3x16: layer '0' (Conv2d) fails: ")
    assert line.endswith("; a Conv2d takes inputs of rank 4, NxCxHxW with C = 3")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- in process


def test_parse_helpers() -> None:
    assert parse_shape("2x3X8x8") == (2, 3, 8, 8)
    assert parse_channel_request("a.b:3-5,1", "--prune-output") == [("a.b", 3), ("a.b", 4), ("a.b", 5), ("a.b", 1)]
    for bad in ("", "1x0x3", "1x-3", "x3"):
        with pytest.raises(ValueError):
            parse_shape(bad)
    for bad in ("a.b:", ":3", "a.b:1,,2", "a.b:-1"):
        with pytest.raises(ValueError):
            parse_channel_request(bad)


def test_load_model_reads_wrapped_checkpoints(tmp_path: Path) -> None:
    reference = build_model(TINY)
    for wrapper in ("state_dict", "model"):
        path = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: reference.state_dict(), "epoch": 3}, path)
        model = load_model(TINY, path)
        assert not model.training
        assert torch.equal(model[0].weight, reference[0].weight)


def test_load_model_refuses_unknown_weight_files(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match=r"\.safetensors"):
        load_model(TINY, path)
    pickled = tmp_path / "object.pt"
    torch.save({"state_dict": 3}, pickled)
    with pytest.raises(ModelError, match="not a state_dict"):
        load_model(TINY, pickled)


def test_torchvision_builders_get_no_pretrained_backbone() -> None:
    # Would try to download ResNet-50 weights if weights_backbone were not set to None.
    model = build_model("torchvision:fcn_resnet50")
    assert isinstance(model, torch.nn.Module)


def test_strict_turns_kept_channels_into_an_error(tmp_path: Path) -> None:
    out = tmp_path / "strict.prunespec.json"
    args = ["plan", TINY, "-o", str(out), "--input-shape", SMALL, "--prune-output", "7.weight:1"]
    relaxed = CliRunner().invoke(app, args)
    assert relaxed.exit_code == 0, relaxed.output
    assert "7.weight output channels 1 kept: reaches the model output" in relaxed.output
    out.unlink()
    strict = CliRunner().invoke(app, [*args, "--strict"])
    assert_one_line_error(strict, "strict: 7.weight output channels 1 would be kept (reaches the model output)")
    assert not out.exists()
