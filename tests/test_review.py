"""Reviewing specs: `prunespec show` (text, markdown, JSON and an HTML page checked in headless Chromium), `diff`
(also as git's external diff driver and textconv) and `validate`.

The counts `show` prints are checked against a really pruned torchvision model; the commands run as subprocesses,
as users and git run them. `_many_layers` makes large synthetic specs, for the limits of what `diff` prints.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from test_cli import REPO, TESTS, TINY, invoke, invoke_all, run_all

import prunespec
from prunespec import review
from prunespec.schemas import LayerSpec, PruningSpec, Request, Subselection, Summary, decode_runs, encode_runs

V1_0_SPEC = Path(__file__).parent / "data" / "v1.0" / "fork.unconstrained.prunespec.json"


def _runs(commands: dict[str, list], folder: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    folder.mkdir()
    return run_all(commands, folder)


def _tiny_spec(folder: Path, name: str, pruned_inputs) -> Path:
    from models_for_cli import tiny_net

    model = tiny_net().eval()
    spec = prunespec.plan(model, [torch.randn(1, 3, 16, 16)], pruned_inputs=pruned_inputs)
    spec.model = TINY
    path = folder / f"{name}.prunespec.json"
    spec.save(path)
    return path


@pytest.fixture
def specs(tmp_path: Path) -> dict[str, Path]:
    return {
        "a": _tiny_spec(tmp_path, "a", [("3.weight", c) for c in (0, 1, 2)]),
        "a_again": _tiny_spec(tmp_path, "a_again", [("3.weight", c) for c in (0, 1, 2)]),
        "b": _tiny_spec(tmp_path, "b", [("3.weight", c) for c in (0, 1, 2, 5)]),
    }


def test_show_counts_match_a_pruned_torchvision_model():
    model = torchvision.models.resnet18(weights=None).eval()
    request = [("layer1.0.conv2.weight", c) for c in range(0, 64, 3)] + [("layer2.0.conv1.weight", 7)]
    spec = prunespec.plan(model, [torch.randn(1, 3, 64, 64)], pruned_inputs=request)
    pruned = dict(prunespec.prune(torchvision.models.resnet18(weights=None).eval(), spec).named_modules())
    rows = review.layer_rows(spec)
    assert [r.name for r in rows] == list(spec.layers)
    for row in rows:
        module = pruned[row.name]
        if isinstance(module, torch.nn.Conv2d):
            assert row.inputs[1] == module.in_channels and row.outputs[1] == module.out_channels, row
        if isinstance(module, torch.nn.BatchNorm2d):
            assert row.outputs[1] == module.num_features and row.inputs is None, row
        listed = set(spec.layers[row.name].tensors)
        assert row.elements[1] == sum(t.numel() for n, t in module.state_dict().items() if n in listed), row
    gathered = {r.name for r in rows if r.subselection}
    assert gathered == {name for name, layer in spec.layers.items() if layer.input is not None}


def test_show_prints_text_markdown_and_json(specs, tmp_path):
    commands = {fmt: ["show", specs["a"], "--format", fmt] for fmt in review.FORMATS}
    runs = _runs(commands | {"v1.0": ["show", V1_0_SPEC]}, tmp_path / "runs")
    for result in runs.values():
        assert result.returncode == 0, result.stderr
    text, markdown = runs["text"].stdout, runs["markdown"].stdout
    # conv 0 loses outputs 0-2 (only conv 3 read them), so it keeps 5 of 8; conv 3 reads 5 of 8.
    assert any(line.split()[:4] == ["0", "Conv2d", "3", "8"] and "5" in line for line in text.splitlines())
    assert "parameters:" in text and "MACs:" in text and review.PREDATES_LAYER_MACS not in text
    # conv 3 on a 14x14 input gives 12x12 outputs: 144 x 8 outputs x (8 → 5 inputs) x 9 weights each
    assert "| 3 | Conv2d | 8 → 5 | 8 | 576 → 360 | 82,944 → 51,840 | – |" in markdown
    data = json.loads(runs["json"].stdout)
    conv3 = next(layer for layer in data["layers"] if layer["name"] == "3")
    assert conv3["inputs"] == [8, 5] and data["summary"]["parameters_after"] < data["summary"]["parameters_before"]
    assert conv3["macs"] == [82944, 51840] and data["notes"] == []
    # A spec written before schema 1.1 has no per-layer MACs: a dash in each row, and one note.
    old = runs["v1.0"].stdout
    assert old.count(review.PREDATES_LAYER_MACS) == 1
    assert all(line.split()[-2:] in (["–", "–"], ["–", "slice"], ["–", "gather"]) for line in _table_rows(old))


CHROMIUM = shutil.which("chromium")
CHROMIUM_MISSING = "headless Chromium is not installed (Debian package 'chromium'; `make test` installs it)"


def _chromium(page: Path, *args: str) -> str:
    """Load `page` in headless Chromium, offline-minded, with its own profile; return what it prints."""
    assert CHROMIUM is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    profile = page.parent / f"profile-{page.stem}-{len(args)}"
    command = [CHROMIUM, *flags, f"--user-data-dir={profile}", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout


def _pixels_near(image: torch.Tensor, colour: tuple[int, int, int]) -> int:
    """How many pixels of an RGB(A) image are within 8 levels of `colour` in each channel."""
    rgb = image[:3].to(torch.int32)
    return int(((rgb - torch.tensor(colour).view(3, 1, 1)).abs() <= 8).all(dim=0).sum())


@pytest.mark.skipif(CHROMIUM is None, reason=CHROMIUM_MISSING)
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29 points to torchcodec
def test_show_html_is_a_self_contained_page_that_chromium_renders(tmp_path):
    from nets import build

    from prunespec import report

    # The grouped net keeps a requested channel (a grouped convolution) and gathers in front of conv3.
    model, inputs = build("grouped")
    request = [("grouped.weight", 1), ("conv3.weight", 1), ("conv3.weight", 4)]
    small = prunespec.plan(model, inputs, pruned_inputs=request, reorder=False)
    small.model = "nets:grouped <b>&</b>"  # text that must be escaped
    assert small.kept and any(row.subselection == "gather" for row in review.layer_rows(small))
    specs_ = {"small": small, "big": _many_layers(seed=3, blocks=150)}  # 300 layers
    for name, spec in specs_.items():
        spec.save(tmp_path / f"{name}.prunespec.json")
    runs = _runs(
        {
            "small": ["show", tmp_path / "small.prunespec.json", "-f", "html", "-o", tmp_path / "small.html"],
            "big": ["show", tmp_path / "big.prunespec.json", "--format", "html", "--output", tmp_path / "big.html"],
            "stdout": ["show", tmp_path / "small.prunespec.json", "-f", "html"],
            "markdown": ["show", tmp_path / "small.prunespec.json", "-f", "markdown", "-o", tmp_path / "small.md"],
            "bad": ["show", tmp_path / "small.prunespec.json", "-f", "pdf", "-o", tmp_path / "bad.pdf"],
        },
        tmp_path / "runs",
    )
    for name in ("small", "big", "stdout", "markdown"):
        assert runs[name].returncode == 0, runs[name].stderr
    assert runs["stdout"].stdout == (tmp_path / "small.html").read_text() == report.render_html(small)
    assert (tmp_path / "small.md").read_text() == review.render_show(small, "markdown")
    assert runs["bad"].returncode == 1 and runs["bad"].stderr == (
        "error: --format 'pdf': use one of text, markdown, json, html\n"
    )
    assert not (tmp_path / "bad.pdf").exists() and not list(tmp_path.glob(".*.tmp*"))

    for name, spec in specs_.items():
        page = tmp_path / f"{name}.html"
        dom = _chromium(page, "--dump-dom")
        assert dom.count('class="layer-row"') == len(spec.layers), name  # one chart row per layer
        assert dom.count("<rect ") >= len(spec.layers) and '<svg class="chart" id="layer-chart"' in dom
        assert all(f">{layer}<" in dom for layer in spec.layers), name  # each name in the chart and the table
        assert re.search(r"https?://", dom) is None and not re.search(r"<(script|link|img|iframe)\b", dom), name
        picture = tmp_path / f"{name}.png"
        _chromium(page, f"--screenshot={picture}", "--window-size=1280,2000")
        image = torchvision.io.decode_png(torchvision.io.read_file(str(picture)))
        assert tuple(image.shape[1:]) == (2000, 1280)
        assert len(image[:3].reshape(3, -1).unique(dim=1).T) > 50, name  # text, bars and tables, not a blank page
        channels, macs = report.PANELS[0][1], report.PANELS[2][1]
        for colour in (channels, macs):  # the chart's bars after pruning are drawn
            rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
            assert _pixels_near(image, rgb) > 200, (name, colour)
    small_dom = _chromium(tmp_path / "small.html", "--dump-dom")
    assert "<h1>nets:grouped &lt;b&gt;&amp;&lt;/b&gt;</h1>" in small_dom
    assert small.kept[0].reason in small_dom and '<td class="gather">gather</td>' in small_dom


def _table_rows(text: str) -> list[str]:
    """The rows of the layer table that `show` prints as text, after its head."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer ")) + 1
    return lines[start : lines.index("", start)]


def test_diff_exit_status_and_report(specs, tmp_path):
    runs = _runs(
        {
            "equal": ["diff", specs["a"], specs["a_again"]],
            "differ": ["diff", specs["a"], specs["b"]],
            "markdown": ["diff", specs["a"], specs["b"], "--format", "markdown"],
            "json": ["diff", specs["a"], specs["b"], "--format", "json"],
            "missing": ["diff", specs["a"], tmp_path / "nope.json"],
            "one": ["diff", specs["a"]],
        },
        tmp_path / "runs",
    )
    assert runs["equal"].returncode == 0
    assert runs["equal"].stdout.splitlines()[0] == "same: both specs prune the model the same way"
    differ = runs["differ"]
    assert differ.returncode == 1, differ.stderr
    # The verdict comes first.
    assert differ.stdout.splitlines()[0].startswith("differ: 3 layers changed, 0 added, 0 removed; parameters")
    # b also asks to drop input 5 of conv 3, which only conv 3 reads: conv 0 and the batch norm drop channel 5,
    # each tensor of a layer that loses it on one line.
    assert "  0: weight, bias axis 0: keeps 5 → 4, drops 5\n" in differ.stdout
    assert "  1: weight, bias, running_mean, running_var axis 0: keeps 5 → 4, drops 5\n" in differ.stdout
    markdown = runs["markdown"]
    assert markdown.returncode == 1 and markdown.stdout.startswith("**differ**: 3 layers changed")
    assert "| `3` | weight axis 1 | keeps 5 → 4, drops 5 |" in markdown.stdout
    data = json.loads(runs["json"].stdout)
    assert not data["equal"] and data["same_model"] and data["verdict"] == differ.stdout.splitlines()[0]
    assert {(c["layer"], c["tensor"]) for c in data["axes"]} >= {("0", "bias"), ("1", "running_mean"), ("3", "weight")}
    for name in ("missing", "one"):
        assert runs[name].returncode == 2 and runs[name].stderr.startswith("error: "), runs[name].stderr


def _many_layers(seed: int, blocks: int = 120, width: int = 256) -> PruningSpec:
    """A spec of a chain of 1x1 convolutions (on 8x8 inputs) and batch norms where each block keeps a seeded random
    70% of its channels and two convolutions in three gather their input: large enough that index lists are long."""
    rng = random.Random(seed)
    fingerprint: dict[str, str] = {}
    layers: dict[str, LayerSpec] = {}
    before: str | None = None  # the runs the previous block keeps: this convolution's inputs
    for i in range(blocks):
        conv, norm = f"blocks.{i}.conv", f"blocks.{i}.norm"
        kept = encode_runs(sorted(rng.sample(range(width), width * 7 // 10)))
        fingerprint[f"{conv}.weight"] = f"float32[{width},{width},1,1]"
        fingerprint |= {f"{norm}.{t}": f"float32[{width}]" for t in ("weight", "bias", "running_mean", "running_var")}
        gather = Subselection(width, encode_runs(sorted(rng.sample(range(width), width // 2)))) if i % 3 else None
        inputs = len(decode_runs(before)) if before else width
        macs = (64 * width**2, 64 * inputs * len(decode_runs(kept)))
        layers[conv] = LayerSpec("Conv2d", tensors={"weight": [kept, before]}, input=gather, macs=macs)
        layers[norm] = LayerSpec("BatchNorm2d", tensors={t: [kept] for t in ("weight", "bias", "running_mean",
                                                                               "running_var")})  # fmt: skip
        before = kept
    request = Request([], [], constrained=False, reorder=True)
    spec = PruningSpec(f"synthetic:chain{blocks}", [], request, Summary(0, 0, 0, 0, 0), layers, fingerprint)
    rows = review.layer_rows(spec)
    elements = [sum(r.elements[side] for r in rows) for side in (0, 1)]
    macs = [sum(r.macs[side] for r in rows if r.macs) for side in (0, 1)]
    gathers = sum(layer.input is not None for layer in layers.values())
    spec.summary = Summary(elements[0], elements[1], macs[0], macs[1], gathers)
    spec.neighbours = []  # a stored spec of this schema must have them; this one is only shown, never applied
    return spec


def test_diff_of_large_specs_fits_a_github_comment(tmp_path):
    old, new = _many_layers(seed=1), _many_layers(seed=2)
    paths = [tmp_path / "old.prunespec.json", tmp_path / "new.prunespec.json"]
    old.save(paths[0])
    new.save(paths[1])
    commands = {"text": ["diff", *paths], "markdown_full": ["diff", *paths, "-f", "markdown", "--full"]}
    runs = _runs(commands, tmp_path / "runs")
    assert all(run.returncode == 1 for run in runs.values()), {k: r.stderr for k, r in runs.items()}
    result = review.diff_specs(old, new)
    full = review.render_diff(result, "text", full=True)
    assert len(full) > 2 * review.MARKDOWN_LIMIT  # all of it would not fit a comment twice over
    markdowns = {"markdown": review.render_diff(result, "markdown", tuple(map(str, paths)))}
    for name, markdown in (markdowns | {"markdown_full": runs["markdown_full"].stdout}).items():
        assert len(markdown) < review.MARKDOWN_LIMIT, (name, len(markdown))
        assert markdown.startswith("**differ**: 240 layers changed, 0 added, 0 removed\n"), name
        note = markdown.rstrip().splitlines()[-1]
        assert note.startswith("*Cut to fit a GitHub comment (65,536 characters): ") and "more lines not shown" in note
        assert f"`prunespec diff --full {paths[0]} {paths[1]}` prints all of it as text" in note
    # Without --full, every index list shows its first 12 runs and a count of the rest.
    text = runs["text"].stdout
    assert text.splitlines()[0] == "differ: 240 layers changed, 0 added, 0 removed"
    assert max(map(len, text.splitlines())) < 500
    line = next(line for line in text.splitlines() if line.startswith("  blocks.7.norm: "))
    assert line.startswith("  blocks.7.norm: weight, bias, running_mean, running_var axis 0: keeps 179 → 179, drops ")
    dropped = set(decode_runs(old.layers["blocks.7.norm"].tensors["weight"][0])) - set(
        decode_runs(new.layers["blocks.7.norm"].tensors["weight"][0])
    )
    runs_shown = re.search(r"drops (\d+): ([0-9,-]+) … and (\d+) more", line)
    assert runs_shown is not None and int(runs_shown[1]) == len(dropped), line
    assert len(runs_shown[2].split(",")) == review.SHOWN_RUNS
    assert len(decode_runs(runs_shown[2])) + int(runs_shown[3]) == len(dropped)
    assert f"drops {encode_runs(sorted(dropped))}," in full  # --full: all of them
    # JSON is complete: every axis of every layer, with every index.
    data = json.loads(review.render_diff(result, "json"))
    assert len(data["axes"]) == 120 * 4 + 120 * 2 - 1  # norms: 4 tensors; convs: both axes but the first's input
    norm = next(c for c in data["axes"] if (c["layer"], c["tensor"]) == ("blocks.7.norm", "weight"))
    assert set(norm["dropped"]) == dropped


def test_diff_of_specs_for_different_models_says_so_first(specs, tmp_path):
    from models_for_cli import wider_net

    wider = prunespec.plan(wider_net().eval(), [torch.randn(1, 3, 16, 16)], pruned_inputs=[("3.weight", 0)])
    wider.model = "models_for_cli:wider_net"
    wider.save(tmp_path / "wider.prunespec.json")
    renamed = prunespec.load_spec(specs["a"])
    renamed.fingerprint["7.weight"] = "float32[10,8]"  # the same name, another classifier
    renamed.save(tmp_path / "renamed.prunespec.json")
    runs = _runs(
        {
            "text": ["diff", specs["a"], tmp_path / "wider.prunespec.json"],
            "markdown": ["diff", specs["a"], tmp_path / "wider.prunespec.json", "-f", "markdown"],
            "same_name": ["diff", specs["a"], tmp_path / "renamed.prunespec.json"],
        },
        tmp_path / "runs",
    )
    first = runs["text"].stdout.splitlines()[0]
    assert runs["text"].returncode == 1
    # wider_net has the same layer names; conv 0, its batch norm and conv 3 have other shapes.
    assert first.startswith(
        f"planned for different models: {TINY} and models_for_cli:wider_net (7 tensors differ in shape or dtype, "
        f"0 only in {TINY}, 0 only in models_for_cli:wider_net); "
    ), first
    assert "  `0.weight`: float32[8,3,3,3] → float32[12,3,3,3]" in runs["markdown"].stdout.replace("- ", "  ")
    assert runs["markdown"].stdout.startswith(f"**planned for different models**: {TINY} and models_for_cli:wider_net")
    assert runs["same_name"].stdout.splitlines()[0] == (
        f"planned for different models: both name {TINY}, but 1 tensor differs in shape or dtype, 0 only in {TINY}, "
        f"0 only in {TINY}"
    )
    assert "  7.weight: float32[4,8] → float32[10,8]" in runs["same_name"].stdout


def test_diff_groups_the_tensors_of_a_layer_that_keep_the_same_indices():
    old, new = _many_layers(seed=1, blocks=2, width=16), _many_layers(seed=2, blocks=2, width=16)
    new.layers["blocks.1.norm"].tensors["running_var"] = old.layers["blocks.1.norm"].tensors["running_var"]
    lines = review.render_diff(review.diff_specs(old, new)).splitlines()
    mine = [line.split(": ", 2)[1] for line in lines if line.startswith(("  blocks.0.", "  blocks.1."))]
    assert mine == [
        "weight axis 0",
        "weight, bias, running_mean, running_var axis 0",
        "weight axis 0",
        "weight axis 1",
        "input subselection",  # the second convolution gathers (see _many_layers)
        "weight, bias, running_mean axis 0",  # running_var keeps what it kept
    ]


def test_diff_reports_a_reordering_apart_from_a_change(specs):
    old = prunespec.load_spec(specs["a"])
    new = prunespec.load_spec(specs["a"])
    weight = new.layers["0"].tensors["weight"]
    kept = decode_runs(weight[0])
    weight[0] = ",".join(str(i) for i in reversed(kept))
    result = review.diff_specs(old, new)
    assert [(c.tensor, c.reordered, c.dropped, c.restored) for c in result.axes] == [("weight", True, [], [])]
    assert not result.equal


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_diff_uses_prunespec_as_driver_and_textconv(specs, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    python = f"PYTHONPATH={REPO}:{TESTS} {sys.executable} -m prunespec"

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
        return done.stdout

    git("init", "-q")
    git("config", "user.email", "ci@example.com")
    git("config", "user.name", "ci")
    (repo / ".gitattributes").write_text("*.prunespec.json diff=prunespec\n")
    shutil.copy(specs["a"], repo / "model.prunespec.json")
    git("add", ".")
    git("commit", "-qm", "spec a")
    shutil.copy(specs["b"], repo / "model.prunespec.json")

    git("config", "diff.prunespec.command", f"{python} diff")
    driven = git("diff")
    assert "0: weight, bias axis 0: keeps 5 → 4, drops 5" in driven and "differ: 3 layers changed" in driven

    git("config", "--unset", "diff.prunespec.command")
    git("config", "diff.prunespec.textconv", f"{python} show")
    converted = git("diff")
    assert "-0" in converted and "+0" in converted and "8 → 5" in converted and "8 → 4" in converted


def test_validate_reports_every_problem(specs, tmp_path):
    data = json.loads(specs["a"].read_text())
    data["summary"]["macs_after"] = "many"
    data["layers"]["3"]["tensors"]["weight"] = [None, "2-1,x"]
    del data["fingerprint"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes(specs["a"].read_bytes()[:100])
    (tmp_path / "runs").mkdir()
    wrong_model = ["validate", specs["a"], "--model", "models_for_cli:wider_net"]
    runs = run_all({"wrong_model": wrong_model}, tmp_path / "runs") | invoke_all(  # one real process is enough
        {
            "valid": ["validate", specs["a"]],
            "valid_model": ["validate", specs["a"], "--model", TINY],
            "broken": ["validate", broken],
            "truncated": ["validate", truncated],
        },
        tmp_path / "runs",
    )
    assert runs["valid"].exit_code == 0 and "valid (JSON Schema)" in runs["valid"].stdout
    assert runs["valid_model"].exit_code == 0 and f"model {TINY}, forward pass)" in runs["valid_model"].stdout
    broken_out = runs["broken"].stdout
    assert runs["broken"].exit_code == 1 and "error: " in runs["broken"].stderr
    assert "summary/macs_after" in broken_out and "layers/3/tensors/weight/1" in broken_out
    assert "'fingerprint' is a required property" in broken_out
    assert runs["truncated"].exit_code == 1 and "not a JSON file" in runs["truncated"].stdout
    # One line says whose spec it is: conv 0, its bias, four tensors of the batch norm and conv 3's weight differ.
    wrong = runs["wrong_model"]
    assert wrong.returncode == 1
    assert wrong.stdout.splitlines() == [
        f"{specs['a']}: fingerprint: the spec was planned for {TINY} (11 tensors); the model (Sequential) differs in 7 "
        "of them (first: tensor '0.weight' is float32[8,3,3,3] in the spec but float32[12,3,3,3] in the model)"
    ]


def test_validate_runs_the_pruned_model_on_meta_tensors(specs, tmp_path):
    data = json.loads(specs["a"].read_text())
    del data["layers"]["0"], data["layers"]["1"]  # conv 3 now reads 8 channels where it takes 5
    no_producer = tmp_path / "no_producer.json"
    no_producer.write_text(json.dumps(data))
    # Migrated from schema 1.3, which does not record which layers share channels: only the forward pass can tell.
    data = data | {"schema_version": "1.3"}
    del data["neighbours"]
    migrated = tmp_path / "migrated.json"
    migrated.write_text(json.dumps(data))
    (tmp_path / "runs").mkdir()
    runs = invoke_all(
        {
            "no_producer": ["validate", no_producer, "--model", TINY],
            "migrated": ["validate", migrated, "--model", TINY],
            "not_on_meta": ["validate", specs["a"], "--model", "models_for_cli:looks_at_values"],
        },
        tmp_path / "runs",
    )
    # Each layer fits on its own (conv 3 records the 5 channels it reads): its neighbours show the mistake.
    assert runs["no_producer"].exit_code == 1
    (line,) = runs["no_producer"].stdout.splitlines()
    assert "layer '0': no entry in the spec (was it deleted?), so tensor 'weight' axis 0 would keep all 8" in line
    assert runs["migrated"].exit_code == 1
    (line,) = runs["migrated"].stdout.splitlines()
    assert line.startswith(
        f"{migrated}: forward pass on inputs 1x3x16x16: the pruned model fails in layer '3', called with shape "
        "[1, 8, 14, 14]: RuntimeError: "  # then torch's own words
    )
    not_on_meta = runs["not_on_meta"]
    assert not_on_meta.exit_code == 0, not_on_meta.stderr
    assert "note: the forward pass was not checked: the unpruned model does not run on the meta device" in (
        not_on_meta.stdout
    )
    assert not_on_meta.stdout.rstrip().endswith("valid (JSON Schema, model models_for_cli:looks_at_values)")


def test_validate_needs_a_model_for_weights(specs, tmp_path):
    result = invoke("validate", specs["a"], "--weights", tmp_path / "w.pt", cwd=tmp_path)
    assert result.exit_code == 1 and "--weights needs --model" in result.stderr
