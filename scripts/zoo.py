"""Model-zoo coverage sweep: plan and apply random pruning patterns on every torchvision model, and say which work.

    python scripts/zoo.py                            # the whole zoo; writes out/zoo.json and docs/coverage.md
    python scripts/zoo.py --models resnet18 swin_t   # some models; writes out/zoo.json only (add --docs)
    python scripts/zoo.py --family segmentation      # a family: the builder's module, e.g. resnet, swin, vit

Start reading at `main`. Each model gets two fresh worker processes of this same script, so that applying a spec
never sees anything the planner left in memory, a crash or a timeout costs one model, and memory goes back:

1. `plan_worker` builds the model (seeded, float64, eval, weights made sensitive to mistakes by `randomize`), saves
   its state dict and a seeded input, draws a random pattern per side (`random_request`) and plans it in both
   modes, saving each spec.
2. `apply_worker` rebuilds the model, loads the state dict and each stored spec, and compares
   `prune(copy, spec)(x)` with `mock(model, spec)(x)`; it prints one JSON line per spec.

Each (model, mode, side) ends up `pass`, `fail` (the outputs differ by more than `tolerated`, or the pruned model is
not smaller), `refused` (the planner raised `PlanError`, or nothing could be pruned) or `error` (anything raised,
a crash, a timeout). `render_table` turns the results into the markdown table of docs/coverage.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils._pytree import tree_leaves

import prunespec

ROOT = Path(__file__).resolve().parent.parent
MODES = ("unconstrained", "constrained")
SIDES = ("input", "output", "both")
TOLERANCE = 1e-9  # on float64 outputs, times the output scale when that exceeds 1 (see `tolerated`)
NEAR_ZERO = 1e-6  # an output this small makes the comparison say little; the table flags it
FRACTION = 0.3  # probability that a channel is requested
SEED = 0
DEFAULT_SIZE = 64
DEFAULT_BATCH = 2  # more than one sample, so that an op mixing the batch axis shows up
DOCS_PAGE = ROOT / "docs" / "coverage.md"
DOCS_START, DOCS_END = "<!-- zoo:start -->", "<!-- zoo:end -->"
Builder = Callable[[str, "int | None"], nn.Module]  # (name, size or None for the bare architecture) -> model

# The input side for models that do not run at the default sizes (32 and up): the smallest they accept.
# ViT asserts exactly its image_size; MaxViT's window partition needs a multiple of 224.
SIZE_EXCEPTIONS: dict[str, int] = {
    "alexnet": 64,
    "inception_v3": 75,
    "maxvit_t": 224,
    "vit_b_16": 224,
    "vit_b_32": 224,
    "vit_l_16": 224,
    "vit_l_32": 224,
    "vit_h_14": 224,
}

# Builder arguments beyond weights=None. GoogLeNet and Inception would otherwise initialise with a slow truncated
# normal and carry auxiliary heads that eval mode never runs.
BUILD_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"init_weights": False, "aux_logits": False},
    "inception_v3": {"init_weights": False, "aux_logits": False},
}

# Several GB each in float64 (vit_h_14 and regnet_y_128gf: ~5 GB of weights, ~3 copies at peak when applying):
# run alone, after the others, at batch 1.
HEAVY = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32"}


# ---------------------------------------------------------------------------------------------------------- models


def zoo_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models) + torchvision.models.list_models(
        module=torchvision.models.segmentation
    )


def family(name: str) -> str:
    """The builder's module inside torchvision.models: 'resnet' for resnext50_32x4d, 'segmentation.fcn', ..."""
    return torchvision.models.get_model_builder(name).__module__.removeprefix("torchvision.models.")


def build_model(name: str, size: int | None = None, seed: int = SEED) -> nn.Module:
    """The model without pretrained weights, seeded, in float64 eval mode.

    With `size`, its weights are also made sensitive to mistakes (`randomize`, calibrated on `size` x `size`
    images); without, it is only the architecture, for loading a state dict into.
    """
    kwargs: dict[str, Any] = {"weights": None, **BUILD_KWARGS.get(name, {})}
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        kwargs["weights_backbone"] = None
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, **kwargs).double().eval()
    if size is not None:
        randomize(model, size, seed)
    return model


def randomize(model: nn.Module, size: int, seed: int = SEED) -> None:
    """Give every channel a say in the output, so that a misplaced one changes it.

    - Parameters whose entries are all equal get noise: zero biases would hide a misplaced bias entry, ViT's zero
      head makes its output identically zero, ConvNeXt's 1e-6 layer scales shrink a branch's mistakes a millionfold.
    - Norms get random affine parameters.
    - Batch norms get statistics measured on a random calibration batch, then perturbed per channel. Made-up
      statistics (mean ~0, variance ~1) do not fit the activations and the signal dies with depth: EfficientNet's
      output then depends on the image only in the 13th digit, and no mistake before its head could show.
    """
    g = torch.Generator().manual_seed(seed + 2)

    def noise(shape: torch.Size | int) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64)

    def uniform(shape: torch.Size | int) -> torch.Tensor:
        return torch.rand(shape, generator=g, dtype=torch.float64)

    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))]
    batch_norms = [m for m in norms if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(noise(p.shape) * 0.1)
        for m in norms:
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(uniform(m.weight.shape) + 0.5)
                m.bias.copy_(noise(m.bias.shape) * 0.1)
        if batch_norms:
            momenta = [m.momentum for m in batch_norms]
            for m in batch_norms:
                m.reset_running_stats()
                m.momentum = None  # a plain average over the one calibration batch
            torch.manual_seed(seed)  # dropout and stochastic depth are active in train mode
            model.train()
            model(noise((4, 3, size, size)))
            model.eval()
            for m, momentum in zip(batch_norms, momenta, strict=True):
                m.momentum = momentum
                m.running_mean.add_(noise(m.num_features) * 0.1 * m.running_var.sqrt())
                m.running_var.mul_(uniform(m.num_features) + 0.5)


def input_size(name: str, default: int = DEFAULT_SIZE) -> int:
    return SIZE_EXCEPTIONS.get(name, default)


def make_inputs(name: str, size: int, batch: int, seed: int = SEED) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)]


def random_request(
    model: nn.Module, inputs: list[torch.Tensor], seed: str, side: str, fraction: float = FRACTION, graph=None
):
    """Random (weight, channel) pairs: each input channel of every consumer and/or each output channel of every
    producer is picked with probability `fraction`. The same seed gives the same pattern in both modes. `graph`:
    the model's traced channel graph, if at hand."""
    from prunespec.planner.trace import trace  # the planner's own view of who consumes and produces what

    graph = graph if graph is not None else trace(model, inputs)
    rng = random.Random(seed)
    pruned_inputs: list[tuple[str, int]] = []
    pruned_outputs: list[tuple[str, int]] = []
    if side in ("input", "both"):
        for weight, n in dict.fromkeys((c.weight, len(c.slots)) for c in graph.consumers):
            pruned_inputs += [(weight, ch) for ch in range(n) if rng.random() < fraction]
    if side in ("output", "both"):
        for weight, n in dict.fromkeys((p.weight, len(p.slots)) for p in graph.producers):
            pruned_outputs += [(weight, ch) for ch in range(n) if rng.random() < fraction]
    return pruned_inputs, pruned_outputs


def weight_axes(graph) -> dict[str, tuple[int | None, int | None]]:
    """(input axis, output axis) of each weight the planner sees as a consumer or producer in a traced `graph`."""
    found: dict[str, list[int | None]] = {}
    for c in graph.consumers:
        found.setdefault(c.weight, [None, None])[0] = c.axis
    for p in graph.producers:
        found.setdefault(p.weight, [None, None])[1] = p.axis
    return {w: (a[0], a[1]) for w, a in found.items()}


def removed_share(model: nn.Module, spec: prunespec.PruningSpec, pruned_inputs, pruned_outputs, axes) -> float | None:
    """The share of the requested weight entries (the rows and columns of the requested channels) that the plan
    removes: 1 when everything asked for goes, 0 when the planner kept it all. None when nothing was requested."""
    from prunespec.applier.validate import check

    kept = {f"{c.name}.{t}" if c.name else t: per_axis for c in check(model, spec) for t, per_axis in c.kept.items()}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    requested: dict[str, torch.Tensor] = {}
    for pairs, which in ((pruned_inputs, 0), (pruned_outputs, 1)):
        for weight, channel in pairs:
            mask = requested.setdefault(weight, torch.zeros(tensors[weight].shape, dtype=torch.bool))
            mask.narrow(axes[weight][which], channel, 1).fill_(True)
    asked = gone = 0
    for weight, mask in requested.items():
        stays = torch.ones_like(mask)
        for axis, indices in enumerate(kept.get(weight, [])):
            if indices is not None:
                keep = torch.zeros(mask.shape[axis], dtype=torch.bool)
                keep[torch.as_tensor(indices, dtype=torch.long)] = True
                stays &= keep.view([-1 if a == axis else 1 for a in range(mask.ndim)])
        asked += int(mask.sum())
        gone += int((mask & ~stays).sum())
    return gone / asked if asked else None


def max_difference(a: Any, b: Any) -> float:
    """Largest |a - b| over all output tensors (dicts and tuples included); NaN when either side is not finite."""
    diffs = [(x - y).abs().max().item() for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True)]
    return math.nan if any(math.isnan(d) for d in diffs) else max(diffs, default=0.0)  # max() misorders NaN


def input_dependence(model: nn.Module, inputs: list[torch.Tensor]) -> float | None:
    """How much the output differs between the first two images of the batch, relative to its scale. Near zero,
    the output ignores the image and comparing outputs cannot show a mistake made before the last layers."""
    if inputs[0].shape[0] < 2:
        return None
    with torch.no_grad():
        leaves = tree_leaves(model(*inputs))
    scale = output_scale(leaves)
    return max((t[0] - t[1]).abs().max().item() for t in leaves) / scale if scale > 0 else 0.0


def tolerated(diff: float, scale: float) -> bool:
    """Whether pruned and mock agree. Relative above an output scale of 1: deep networks with random weights
    reach outputs of 1e3 to 1e9 (resnet152), where float64 summation order alone moves the last digits past 1e-9."""
    return diff <= TOLERANCE * max(1.0, scale)  # False for NaN


def output_scale(a: Any) -> float:
    return max((t.abs().max().item() for t in tree_leaves(a)), default=0.0)


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux reports KiB


# --------------------------------------------------------------------------------------------------------- workers


def plan_worker(
    name: str, workdir: Path, size: int, batch: int, build: Builder | None = None, options: dict | None = None
) -> None:
    """Plan all (mode, side) specs of one model into `workdir`; `plan.json` is rewritten after each, so a timeout
    keeps what was done. `build(name, size)` makes the model (default: `build_model`, torchvision's); `options`
    go to `prunespec.plan` (``through_norms``)."""
    records: dict[str, dict[str, Any]] = {}
    dependence: float | None = None

    def write() -> None:
        tmp = workdir / "plan.json.tmp"
        tmp.write_text(json.dumps({"records": records, "input_dependence": dependence, "peak_rss_gb": peak_rss_gb()}))
        tmp.replace(workdir / "plan.json")

    model = (build or build_model)(name, size)
    inputs = make_inputs(name, size, batch)
    torch.save(model.state_dict(), workdir / "state.pt")
    torch.save(inputs, workdir / "inputs.pt")
    dependence = input_dependence(model, inputs)
    requests = {}
    graph = axes = None
    for side in SIDES:
        try:
            if graph is None:
                from prunespec.planner.trace import trace

                graph = trace(model, inputs)  # once for the three patterns
            requests[side] = random_request(model, inputs, f"{SEED}:{name}:{side}", side, graph=graph)
        except Exception as error:  # noqa: BLE001 -- a sweep records every failure and goes on
            requests[side] = error
    for mode in MODES:
        for side in SIDES:
            key = f"{mode}-{side}"
            record: dict[str, Any] = {"mode": mode, "side": side}
            records[key] = record
            request = requests[side]
            if isinstance(request, Exception):
                record.update(status="error", stage="trace", reason=one_line(request))
                write()
                continue
            record["requested"] = [len(request[0]), len(request[1])]
            start = time.perf_counter()
            try:
                spec = prunespec.plan(model, inputs, *request, constrained=mode == "constrained", **(options or {}))
            except prunespec.PlanError as error:
                record.update(status="refused", stage="plan", reason=one_line(error))
            except Exception as error:  # noqa: BLE001
                record.update(status="error", stage="plan", reason=one_line(error), traceback=traceback.format_exc())
            else:
                record.update(
                    plan_s=round(time.perf_counter() - start, 3),
                    kept=len(spec.kept),
                    kept_reasons=dict(Counter(k.reason for k in spec.kept).most_common()),
                    subselections=spec.summary.subselections,
                    parameters_before=spec.summary.parameters_before,
                    parameters_after=spec.summary.parameters_after,
                )
                try:
                    axes = axes or weight_axes(graph)
                    record["requested_removed"] = removed_share(model, spec, *request, axes)
                except Exception as error:  # noqa: BLE001
                    record["requested_removed_error"] = one_line(error)
                if spec.summary.parameters_after >= spec.summary.parameters_before:
                    reasons = Counter(k.reason for k in spec.kept).most_common(1)
                    why = f" (most kept: {reasons[0][0]})" if reasons else ""
                    record.update(status="refused", stage="plan", reason=f"nothing could be pruned{why}")
                else:
                    spec.save(workdir / f"{key}.prunespec.json")
                    record["spec"] = f"{key}.prunespec.json"
            write()
    write()


def apply_worker(name: str, workdir: Path, build: Builder | None = None) -> None:
    """Apply each stored spec to a model rebuilt from the saved state dict; one JSON line per spec on stdout.
    `build(name, None)` makes the architecture (default: `build_model`)."""
    records = json.loads((workdir / "plan.json").read_text())["records"]
    model = (build or build_model)(name, None)
    model.load_state_dict(torch.load(workdir / "state.pt", mmap=True, weights_only=True))
    inputs = torch.load(workdir / "inputs.pt", weights_only=True)
    original_parameters = sum(p.numel() for p in model.parameters())
    for key, record in records.items():
        if "spec" not in record:
            continue
        result: dict[str, Any] = {"key": key}
        start = time.perf_counter()
        try:
            spec = prunespec.load_spec(workdir / record["spec"])
            with torch.no_grad():
                expected = prunespec.mock(model, spec)(*inputs)
                pruned = prunespec.prune(copy.deepcopy(model), spec)
                actual = pruned(*inputs)
            pruned_parameters = sum(p.numel() for p in pruned.parameters())
            del pruned
            diff, scale = max_difference(actual, expected), output_scale(expected)
            result.update(
                diff=diff, scale=scale, parameters_original=original_parameters, parameters_pruned=pruned_parameters
            )
            if not tolerated(diff, scale):
                result.update(status="fail", reason=f"max |pruned - mock| = {diff:.3g} (output scale {scale:.3g})")
            elif pruned_parameters >= original_parameters:
                result.update(status="fail", reason=f"not smaller: {pruned_parameters} >= {original_parameters}")
            else:
                result["status"] = "pass"
        except Exception as error:  # noqa: BLE001
            result.update(status="error", stage="apply", reason=one_line(error), traceback=traceback.format_exc())
        result["apply_s"] = round(time.perf_counter() - start, 3)
        print(json.dumps(result), flush=True)
    print(json.dumps({"key": None, "peak_rss_gb": peak_rss_gb()}), flush=True)


# ---------------------------------------------------------------------------------------------------- orchestrator


def run_model(name: str, timeout: float, threads: int, size: int) -> dict[str, Any]:
    """Plan then apply one model in two fresh processes; never raises."""
    batch = 1 if name in HEAVY else DEFAULT_BATCH
    side = input_size(name, size)
    entry: dict[str, Any] = {"family": family(name), "size": side, "batch": batch}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"zoo-{name}-") as tmp:
        workdir = Path(tmp)
        worker = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            "--dir",
            tmp,
            "--models",
            name,
            "--threads",
            str(threads),
        ]
        problem = _run_worker(worker + ["--stage", "plan", "--size", str(side), "--batch", str(batch)], timeout)
        plan_path = workdir / "plan.json"
        plan = json.loads(plan_path.read_text()) if plan_path.exists() else {"records": {}}
        records: dict[str, dict[str, Any]] = plan["records"]
        entry["plan_rss_gb"] = plan.get("peak_rss_gb")
        entry["input_dependence"] = plan.get("input_dependence")
        if problem is not None:
            entry["plan_problem"] = problem
        if any("spec" in r for r in records.values()):
            applied, problem = _run_apply(worker + ["--stage", "apply"], timeout)
            for key, result in applied.items():
                if key is None:
                    entry["apply_rss_gb"] = result.get("peak_rss_gb")
                else:
                    records[key].update({k: v for k, v in result.items() if k != "key"})
            for record in records.values():
                if "spec" in record and "status" not in record:
                    record.update(status="error", stage="apply", reason=problem or "no result from apply worker")
        for mode in MODES:
            for s in SIDES:
                record = records.setdefault(f"{mode}-{s}", {"mode": mode, "side": s})
                if "status" not in record:  # the plan worker died before reaching it
                    reason = entry.get("plan_problem", "no result from plan worker")
                    record.update(status="error", stage="plan", reason=reason)
    entry["results"] = records
    entry["wall_s"] = round(time.perf_counter() - start, 1)
    return entry


def _run_worker(command: list[str], timeout: float) -> str | None:
    """Run a worker; None when it exited cleanly, else a one-line description of what went wrong."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout:.0f} s"
    if done.returncode != 0:
        return _crash_line(done.returncode, done.stderr)
    return None


def _run_apply(command: list[str], timeout: float) -> tuple[dict[str | None, dict[str, Any]], str | None]:
    """Run the apply worker and collect the JSON lines it printed, even when it was cut short."""
    problem = None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
        stdout = done.stdout
        if done.returncode != 0:
            problem = _crash_line(done.returncode, done.stderr)
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        problem = f"timeout after {timeout:.0f} s"
    results: dict[str | None, dict[str, Any]] = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["key"]] = result
    return results, problem


def _crash_line(returncode: int, stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    killed = " (killed: out of memory?)" if returncode in (-9, 137) else ""
    return f"worker exited with {returncode}{killed}: {lines[-1][:300] if lines else 'no output'}"


# ------------------------------------------------------------------------------------------------- cells and table

STATUS_ORDER = ["error", "fail", "refused", "pass"]  # a cell shows its worst side


def cell(records: list[dict[str, Any]]) -> str:
    """One table cell for the three sides of a (model, mode)."""
    worst = min(records, key=lambda r: STATUS_ORDER.index(r["status"]))
    status = worst["status"]
    if status == "pass":
        kept = max(r.get("kept", 0) for r in records)
        near_zero = [r["side"] for r in records if r["scale"] < NEAR_ZERO]
        notes = ([f"{kept} kept"] if kept else []) + ([f"output ≈ 0 [{', '.join(near_zero)}]"] if near_zero else [])
        return f"pass ({'; '.join(notes)})" if notes else "pass"
    hit = [r for r in records if r["status"] == status]
    sides = "" if len(hit) == len(records) else f" [{', '.join(r['side'] for r in hit)}]"
    if status == "fail":
        diffs = [r["diff"] for r in hit if not tolerated(r["diff"], r["scale"])]
        if not diffs:
            return f"FAIL not smaller{sides}"
        worst_diff = float("nan") if any(math.isnan(d) for d in diffs) else max(diffs)  # max() misorders NaN
        return f"FAIL {worst_diff:.0e}{sides}"
    reason = worst.get("reason", "")
    if len(reason) > 90:
        reason = reason[:87] + "..."
    return f"{status}: {reason}{sides}".replace("|", "\\|")


def render_table(results: dict[str, Any]) -> str:
    models = results["models"]
    header = (
        f"`{results['command']}` on {results['date']}, torch {results['torch']}, torchvision "
        f"{results['torchvision']}: {totals_line(results)}. Each cell covers three random patterns (pruned inputs, "
        f"pruned outputs, both; each channel picked with probability {FRACTION}), planned, stored, and applied in a "
        f"fresh process; `pass` means max |pruned - mock| <= {TOLERANCE:g} x max(1, max |mock|) in float64 and "
        "fewer parameters for "
        "all three, `k kept` the most notes of requested channels the planner had to keep, `[sides]` which "
        "patterns a failure concerns. Details: `out/zoo.json`."
    )
    lines = [
        header,
        "",
        "| family | model | input | unconstrained | constrained |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(models, key=lambda n: (models[n]["family"], n)):
        entry = models[name]
        cells = []
        for mode in MODES:
            cells.append(cell([entry["results"][f"{mode}-{side}"] for side in SIDES]))
        size = f"{entry['batch']}x3x{entry['size']}x{entry['size']}"
        dependence = entry.get("input_dependence")
        weak = " (weak check: output ignores the image)" if dependence is not None and dependence < NEAR_ZERO else ""
        lines.append(f"| {entry['family']} | {name}{weak} | {size} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def totals(results: dict[str, Any]) -> Counter:
    """Statuses of (model, mode) cells, by their worst side."""
    count: Counter = Counter()
    for entry in results["models"].values():
        for mode in MODES:
            records = [entry["results"][f"{mode}-{side}"] for side in SIDES]
            count[min((r["status"] for r in records), key=STATUS_ORDER.index)] += 1
    return count


def totals_line(results: dict[str, Any]) -> str:
    count = totals(results)
    parts = ", ".join(f"{count[s]} {s}" for s in ("pass", "fail", "refused", "error") if count[s])
    return f"{len(results['models'])} models, {sum(count.values())} (model, mode) cells: {parts}"


def write_docs(
    table: str,
    page: Path = DOCS_PAGE,
    start: str = DOCS_START,
    end: str = DOCS_END,
    title: str = "Coverage of the torchvision models",
) -> None:
    """Replace what lies between the `start` and `end` markers of `page`; add a section with the markers if there is
    none."""
    text = page.read_text()
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n" + block + "\n"
    page.write_text(text)


# ------------------------------------------------------------------------------------------------------------ main


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def select(models: list[str] | None, families: list[str] | None) -> list[str]:
    names = zoo_names()
    if models:
        unknown = sorted(set(models) - set(names))
        if unknown:
            raise SystemExit(f"error: unknown model(s): {', '.join(unknown)}")
        names = [n for n in names if n in models]
    if families:
        names = [n for n in names if any(family(n) == f or family(n).split(".")[0] == f for f in families)]
    return sorted(names, key=lambda n: (family(n), n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="model names (default: the whole zoo)")
    parser.add_argument("--family", nargs="+", help="builder modules, e.g. resnet vit segmentation")
    parser.add_argument("--jobs", type=int, default=2, help="models at once (heavy ones always run alone)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per worker process")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="input side, except for SIZE_EXCEPTIONS")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "zoo.json")
    parser.add_argument(
        "--resume", action="store_true", help="keep the models already in --out (an interrupted run) and run the rest"
    )
    parser.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite the table in docs/coverage.md (default: only when running the whole zoo)",
    )
    # Internal: one stage of one model, in a fresh process.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=["plan", "apply"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        torch.set_num_threads(args.threads)
        if args.stage == "plan":
            plan_worker(args.models[0], args.dir, args.size, args.batch)
        else:
            apply_worker(args.models[0], args.dir)
        return 0

    names = select(args.models, args.family)
    whole_zoo = not args.models and not args.family
    cores = os.cpu_count() or 1
    results: dict[str, Any] = {
        "command": "python scripts/zoo.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now().strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "tolerance": TOLERANCE,
        "models": {},
    }
    earlier_s = 0.0
    if args.resume and args.out.exists():
        previous = json.loads(args.out.read_text())
        results["models"] = {n: e for n, e in previous["models"].items() if n in names}
        earlier_s = previous.get("wall_s", 0.0)
        names = [n for n in names if n not in results["models"]]
        print(f"resuming: {len(results['models'])} models done, {len(names)} to go", file=sys.stderr)
    light = [n for n in names if n not in HEAVY]
    heavy = [n for n in names if n in HEAVY]
    start = time.perf_counter()
    done = 0

    def report(name: str, entry: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        results["models"][name] = entry
        results["wall_s"] = round(earlier_s + time.perf_counter() - start, 1)
        save(results, args.out)  # after every model, so that an interrupted sweep can --resume
        cells = [cell([entry["results"][f"{m}-{s}"] for s in SIDES]) for m in MODES]
        print(
            f"[{done}/{len(names)}] {name} {entry['wall_s']}s  unconstrained: {cells[0]}  constrained: {cells[1]}",
            file=sys.stderr,
            flush=True,
        )

    jobs = max(1, args.jobs)
    threads = max(1, cores // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_model, n, args.timeout, threads, args.size): n for n in light}
        for future in as_completed(futures):
            report(futures[future], future.result())
    for name in heavy:
        report(name, run_model(name, args.timeout, cores, args.size))
    results["wall_s"] = round(earlier_s + time.perf_counter() - start, 1)
    save(results, args.out)
    print(f"{totals_line(results)}; {results['wall_s']} s; results in {args.out}", file=sys.stderr)
    if args.docs or (args.docs is None and whole_zoo):
        write_docs(render_table(results))
        print(f"{DOCS_PAGE.relative_to(ROOT)} table updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
