"""timm coverage sweep: one model per timm architecture family, random pruning patterns, both modes.

    python scripts/zoo_timm.py                           # every family; writes out/zoo_timm.json and docs/coverage.md
    python scripts/zoo_timm.py --family convnext nfnet    # some families; merges into out/zoo_timm.json (add --docs)
    python scripts/zoo_timm.py --docs-only                # the table from out/zoo_timm.json as it is
    python scripts/zoo_timm.py --docs-only --merge other.json  # first add the rows of another (partial) run

Start reading at `main`. A family is a module of `timm.models` (`timm.list_modules()`); its model is the variant with
the fewest parameters among a few candidates that its names mark small (`candidates`; counted on the meta device, so
nothing is computed; the choice is stored in scripts/zoo_timm_families.json), with a 10-class head. Each model runs in
fresh worker processes of this script, as in `scripts/zoo.py`, whose workers, request drawing and comparison this
reuses:

1. The plan worker first probes (`probe`) the smallest square input the model accepts (`SIZES`; built with
   `img_size` when its class takes one, as timm's vision transformers do) and times a dense float64 forward there:
   a model slower than `--slow` seconds is skipped, with the reason in the table. Then `zoo.plan_worker` plans the
   three random patterns (pruned inputs, pruned outputs, both) in both modes and stores the specs.
2. `zoo.apply_worker` applies each in a fresh process and compares the pruned model with the mock.

The table lists, per family, the result of each mode, the share of the requested weight entries the plans removed
(`zoo.removed_share`: "kept everything, honestly" shows as 0 %), and under it the reasons channels were kept,
grouped over families. timm is a zoo extra, never a dependency of prunespec.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts import zoo  # noqa: E402  (the worker runs this file as a script)

ROOT = zoo.ROOT
SIZES = (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384)  # input sides tried, smallest first
SLOW_S = 3.0  # a dense float64 forward slower than this (batch 2) is skipped: planning and applying run it often
MAX_PARAMETERS = 30_000_000  # more is skipped: float64 copies of the model (mock, pruned, state dict) need GBs each
DOCS_START, DOCS_END = "<!-- zoo-timm:start -->", "<!-- zoo-timm:end -->"
OUT = ROOT / "out" / "zoo_timm.json"


# ---------------------------------------------------------------------------------------------------------- models


# Words timm's model names use for their smaller variants, smallest first: `candidates` counts the parameters of the
# few variants of a family that these words (then the shortest names) put first, not of all ~1,400 models.
SMALL_WORDS = ("atto", "femto", "pico", "nano", "mini", "xxxs", "xxs", "xs", "micro", "tiny", "t", "s", "small", "lite",
               "050", "075", "100", "b0", "18", "26")  # fmt: skip
CANDIDATES = 6
FAMILIES_FILE = Path(__file__).resolve().parent / "zoo_timm_families.json"

# Variants swept besides each family's smallest, for a channel trick the smallest does not play: family -> models.
EXTRA = {
    "convnext": ["convnextv2_atto"],  # global response normalisation
    "resnetv2": ["resnetv2_50x1_bit"],  # weight-standardised convolutions (StdConv2d)
    "nfnet": ["nf_resnet26"],  # scaled weight standardisation (ScaledStdConv2d)
}
# Planning options per model. Every channel of ConvNeXt-V2 is normalised together with others (layer norms on the
# residual stream, global response norms in the MLPs), so by default it keeps everything: its row plans through them.
OPTIONS: dict[str, dict[str, Any]] = {"convnextv2_atto": {"through_norms": True}}


def candidates(names: list[str], n: int = CANDIDATES) -> list[str]:
    """The `n` names most likely to be a family's smallest variant.

    >>> candidates(["vit_base_patch16_224", "vit_tiny_patch16_224", "vit_small_patch16_224"], 2)
    ['vit_tiny_patch16_224', 'vit_small_patch16_224']
    """

    def rank(name: str) -> tuple[int, int]:
        words = name.replace("-", "_").split("_")
        found = [i for i, w in enumerate(SMALL_WORDS) if w in words or any(p.startswith(w) for p in words[1:2])]
        return (min(found) if found else len(SMALL_WORDS), len(name))

    return sorted(names, key=rank)[:n]


def smallest_per_family(path: Path = FAMILIES_FILE) -> dict[str, tuple[str, int]]:
    """Each timm family (module of timm.models) -> its model with the fewest parameters among its `candidates`,
    and that count (on the meta device: nothing is computed). Stored in `path` per timm version, since building
    the candidates takes minutes."""
    import timm

    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("timm") == timm.__version__:
            return {f: (n, c) for f, (n, c) in stored["families"].items()}
    chosen: dict[str, tuple[str, int]] = {}
    for family in timm.list_modules():
        for name in candidates(timm.list_models(module=family)):
            try:
                with torch.device("meta"):
                    count = sum(p.numel() for p in timm.create_model(name, num_classes=10).parameters())
            except Exception:  # noqa: BLE001 -- a variant that cannot be built is not the family's smallest
                continue
            if family not in chosen or count < chosen[family][1]:
                chosen[family] = (name, count)
        print(f"{family}: {chosen.get(family)}", file=sys.stderr, flush=True)
    path.write_text(json.dumps({"timm": timm.__version__, "families": chosen}, indent=1) + "\n")
    return chosen


def create(name: str, size: int | None, img_size: bool) -> nn.Module:
    """timm's model without pretrained weights, seeded, float64, eval, with 10 classes (and `img_size=size`)."""
    import timm

    torch.manual_seed(zoo.SEED)
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 10}
    if img_size:
        kwargs["img_size"] = size
    return timm.create_model(name, **kwargs).double().eval()


def takes_img_size(name: str) -> bool:
    """Whether the model's class is built for an input size (`img_size`), as timm's vision transformers are."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=10)
    except Exception:  # noqa: BLE001 -- the probe then reports why the model does not build
        return False
    return "img_size" in inspect.signature(type(model).__init__).parameters


def probe(name: str, workdir: Path) -> None:
    """Write `build.json`: the smallest side in `SIZES` the model runs at, whether it is built for it, and how long a
    float64 forward of a batch of two takes there."""
    uses_img_size = takes_img_size(name)
    tried = []
    for size in SIZES:
        try:
            model = create(name, size, uses_img_size)
            with torch.no_grad():
                model(torch.randn(1, 3, size, size, dtype=torch.float64))
        except Exception as error:  # noqa: BLE001 -- too small for the model: try the next size
            tried.append(f"{size}: {zoo.one_line(error)}")
            continue
        x = torch.randn(zoo.DEFAULT_BATCH, 3, size, size, dtype=torch.float64)
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        forward_s = time.perf_counter() - start
        found = {"size": size, "img_size": uses_img_size, "forward_s": round(forward_s, 3)}
        (workdir / "build.json").write_text(json.dumps(found))
        return
    (workdir / "build.json").write_text(json.dumps({"size": None, "tried": tried[-1:]}))


def builder(workdir: Path):
    """The `zoo.Builder` for the model probed into `workdir`."""
    found = json.loads((workdir / "build.json").read_text())

    def build(name: str, size: int | None) -> nn.Module:
        model = create(name, found["size"], found["img_size"])
        if size is not None:
            zoo.randomize(model, size)
        return model

    return build


# ---------------------------------------------------------------------------------------------------- orchestrator


def run_model(family: str, name: str, timeout: float, threads: int, slow_s: float) -> dict[str, Any]:
    """Probe, plan and apply one model in fresh processes; never raises."""
    entry: dict[str, Any] = {"family": family, "model": name, "batch": zoo.DEFAULT_BATCH}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"zoo-timm-{name}-") as tmp:
        workdir = Path(tmp)
        worker = [sys.executable, str(Path(__file__).resolve()), "--worker", "--dir", tmp, "--model", name,
                  "--threads", str(threads)]  # fmt: skip
        problem = zoo._run_worker(worker + ["--stage", "plan", "--slow", str(slow_s)], timeout)
        found = json.loads((workdir / "build.json").read_text()) if (workdir / "build.json").exists() else {}
        entry["size"] = found.get("size")
        entry["forward_s"] = found.get("forward_s")
        if found.get("size") is None or found["forward_s"] > slow_s:
            if found.get("size") is None:
                tried = "; ".join(found.get("tried", []))
                why = f"runs at none of the sizes {SIZES[0]}..{SIZES[-1]} ({tried})"
                if problem is not None and problem.startswith("timeout"):
                    why = f"finding the smallest input it takes ran past the time box ({problem})"
                elif problem is not None:
                    why = problem
            else:
                why = f"a dense float64 forward takes {found['forward_s']:.0f} s (limit {slow_s:.0f} s)"
            entry.update(skipped=why, wall_s=round(time.perf_counter() - start, 1))
            return entry
        plan_path = workdir / "plan.json"
        plan = json.loads(plan_path.read_text()) if plan_path.exists() else {"records": {}}
        records: dict[str, dict[str, Any]] = plan["records"]
        entry["input_dependence"] = plan.get("input_dependence")
        if problem is not None:
            entry["plan_problem"] = problem
        if any("spec" in r for r in records.values()):
            applied, problem = zoo._run_apply(worker + ["--stage", "apply"], timeout)
            for key, result in applied.items():
                if key is not None:
                    records[key].update({k: v for k, v in result.items() if k != "key"})
            for record in records.values():
                if "spec" in record and "status" not in record:
                    record.update(status="error", stage="apply", reason=problem or "no result from apply worker")
        for mode in zoo.MODES:
            for side in zoo.SIDES:
                record = records.setdefault(f"{mode}-{side}", {"mode": mode, "side": side})
                if "status" not in record:
                    record.update(status="error", stage="plan", reason=entry.get("plan_problem", "no plan result"))
    entry["results"] = records
    entry["wall_s"] = round(time.perf_counter() - start, 1)
    return entry


def run_in_budget(family: str, name: str, args: argparse.Namespace, threads: int, start: float) -> dict[str, Any]:
    """`run_model`, unless the sweep has run past `--budget` seconds: then the row says so."""
    if args.budget and time.perf_counter() - start > args.budget:
        why = f"not run: the sweep's time budget (--budget {args.budget:.0f} s) ran out before this model"
        return {"family": family, "model": name, "batch": zoo.DEFAULT_BATCH, "skipped": why, "wall_s": 0.0}
    return run_model(family, name, args.timeout, threads, args.slow)


def cut_short(entry: dict[str, Any]) -> bool:
    """Whether a row ended at a time box (of its workers or of the sweep), so that `--resume` runs it again."""
    reasons = [entry.get("skipped", "")] + [r.get("reason", "") for r in entry.get("results", {}).values()]
    return any(r.startswith(("timeout", "not run")) or "time box" in r for r in reasons)


# ------------------------------------------------------------------------------------------------------- the table


def generic(reason: str) -> str:
    """A keep reason without the layer names and counts in it, so that reasons group over models.

    >>> generic("blocks.0.mlp.fc2.weight is used 3 times in forward")
    '<layer> is used N times in forward'
    """
    reason = re.sub(r"'[^']*'", lambda m: m.group(0) if "." not in m.group(0) else "<layer>", reason)
    reason = re.sub(r"\b[\w-]+(\.[\w-]+)+\b", "<layer>", reason)
    return re.sub(r"\b\d+\b", "N", reason)


def mode_summary(entry: dict[str, Any], mode: str) -> tuple[str, float | None]:
    """The cell of one (family, mode): the worst status over the three patterns, and the mean removed share."""
    records = [entry["results"][f"{mode}-{side}"] for side in zoo.SIDES]
    shares = [r["requested_removed"] for r in records if r.get("requested_removed") is not None]
    share = sum(shares) / len(shares) if shares else None
    worst = min(records, key=lambda r: zoo.STATUS_ORDER.index(r["status"]))
    if worst["status"] == "pass":
        return "pass", share
    hit = [r for r in records if r["status"] == worst["status"]]
    sides = "" if len(hit) == len(records) else f" [{', '.join(r['side'] for r in hit)}]"
    if worst["status"] == "fail":
        return f"FAIL {worst.get('reason', '')}{sides}", share
    if worst["status"] == "error" and worst.get("reason", "").startswith("timeout"):
        return f"timeout: {worst['reason']} (time box; {len(records) - len(hit)} of 3 patterns done)", share
    reason = worst.get("reason", "")
    reason = reason if len(reason) <= 110 else reason[:107] + "..."
    return f"{worst['status']}: {reason}{sides}".replace("|", "\\|"), share


def totals(results: dict[str, Any]) -> Counter:
    count: Counter = Counter()
    for entry in results["models"].values():
        if "skipped" in entry:
            count["not run" if entry["skipped"].startswith("not run") else "skipped"] += 1
            continue
        for mode in zoo.MODES:
            count[mode_summary(entry, mode)[0].split(":")[0].split(" ")[0]] += 1
    return count


def render_table(results: dict[str, Any]) -> str:
    models = dict(results["models"])
    if FAMILIES_FILE.exists():  # every family has a row, also when a sweep was stopped before it
        ran = {e["family"] for e in models.values()}
        for family, (name, _) in json.loads(FAMILIES_FILE.read_text())["families"].items():
            if family not in ran:
                why = "not run: the sweep stopped before this model"
                models[family] = {"family": family, "model": name, "batch": zoo.DEFAULT_BATCH, "skipped": why}
    results = {**results, "models": models}
    count = totals(results)
    shares = [s for e in models.values() if "skipped" not in e for m in zoo.MODES
              if (s := mode_summary(e, m)[1]) is not None]  # fmt: skip
    mean_share = f"{100 * sum(shares) / len(shares):.0f} %" if shares else "n/a"
    cells = ", ".join(f"{count[s]} {s}" for s in ("pass", "FAIL", "refused", "error", "timeout") if count[s])
    lines = [
        f"`{results['command']}` on {results['date']}, torch {results['torch']}, timm {results['timm']}: "
        f"{len({e['family'] for e in models.values()})} families in {len(models)} rows ({count['skipped']} skipped"
        f"{f', {n} not run within the time budget' if (n := count['not run']) else ''}), "
        f"{cells} (row, mode) cells; on average the plans "
        f"removed {mean_share} of the requested weight entries. Each cell covers three random patterns (pruned "
        f"inputs, pruned outputs, both; each channel picked with probability {zoo.FRACTION}), planned, stored and "
        f"applied in a fresh process; `pass` means max |pruned - mock| <= {zoo.TOLERANCE:g} x max(1, max |mock|) in "
        "float64 for all three. `removed` is the share of the requested weight entries (rows and columns of the "
        "requested channels) that the plans removed, averaged over the three patterns: 0 % means the planner kept "
        "everything asked for, with its reasons below. Details: `out/zoo_timm.json`.",
        "",
        "| family | model | input | unconstrained | removed | constrained | removed |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in sorted(models):
        entry = models[family]
        size = f"{entry['batch']}x3x{entry['size']}x{entry['size']}" if entry.get("size") else "-"
        if "skipped" in entry:
            why = entry["skipped"].replace("|", "\\|")
            why = why if why.startswith("not run") else f"skipped: {why}"
            lines.append(f"| {family} | {entry['model']} | {size} | {why[:150]} | | | |")
            continue
        row = [family, entry["model"], size]
        for mode in zoo.MODES:
            status, share = mode_summary(entry, mode)
            row += [status, f"{100 * share:.0f} %" if share is not None else "-"]
        lines.append("| " + " | ".join(row) + " |")
    reasons: dict[str, set[str]] = defaultdict(set)
    notes: Counter = Counter()
    for family, entry in models.items():
        for record in entry.get("results", {}).values():
            for reason, n in record.get("kept_reasons", {}).items():
                reasons[generic(reason)].add(family)
                notes[generic(reason)] += n
    lines += [
        "",
        "Why requested channels were kept, over all families and patterns (notes: kept channel groups, counted once "
        "per plan):",
        "",
        "| reason | families | notes |",
        "|---|---|---|",
    ]
    for reason, families in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shown = ", ".join(sorted(families)[:8]) + (f", ... ({len(families)})" if len(families) > 8 else "")
        lines.append(f"| {reason.replace('|', chr(92) + '|')} | {shown} | {notes[reason]} |")
    return "\n".join(lines)


def write_docs(table: str, page: Path = zoo.DOCS_PAGE) -> None:
    text = page.read_text()
    block = f"{DOCS_START}\n{table}\n{DOCS_END}"
    if DOCS_START in text and DOCS_END in text:
        head, rest = text.split(DOCS_START, 1)
        text = head + block + rest.split(DOCS_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Coverage of the timm families\n\n" + block + "\n"
    page.write_text(text)


# ------------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", help="timm.models modules, e.g. convnext nfnet coat")
    parser.add_argument("--jobs", type=int, default=4, help="models at once")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per worker process (the time box)")
    parser.add_argument("--slow", type=float, default=SLOW_S, help="skip models whose dense forward takes longer")
    parser.add_argument("--max-parameters", type=float, default=MAX_PARAMETERS, help="skip larger models")
    parser.add_argument("--budget", type=float, default=0, help="seconds for the whole sweep; later rows say so")
    parser.add_argument("--resume", action="store_true", help="keep the rows of --out that ran to the end")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                        help="rewrite the table in docs/coverage.md (default: only when running every family)")
    parser.add_argument("--docs-only", action="store_true", help="only rewrite the table from --out")
    parser.add_argument("--merge", type=Path, nargs="+", help="with --docs-only: add these results files to --out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=["plan", "apply"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)  # fmt: skip

    if args.worker:
        torch.set_num_threads(args.threads)
        if args.stage == "plan":  # probing first saves a process start (torch and timm take seconds to import)
            probe(args.model, args.dir)
            found = json.loads((args.dir / "build.json").read_text())
            if found["size"] is not None and found["forward_s"] <= args.slow:
                zoo.plan_worker(args.model, args.dir, found["size"], zoo.DEFAULT_BATCH, build=builder(args.dir),
                                options=OPTIONS.get(args.model))  # fmt: skip
        else:
            zoo.apply_worker(args.model, args.dir, build=builder(args.dir))
        return 0
    if args.docs_only:
        results = json.loads(args.out.read_text())
        for path in args.merge or []:  # partial runs over other families (run side by side with --out elsewhere)
            other = json.loads(path.read_text())
            families = {e["family"] for e in other["models"].values()}  # their rows replace the old ones
            results["models"] = {r: e for r, e in results["models"].items() if e["family"] not in families}
            results["models"].update(other["models"])
            results["command"] += f"`, `{other['command']}"  # the table names every run it shows
            results["wall_s"] = max(results.get("wall_s", 0), other.get("wall_s", 0))
        if args.merge:
            zoo.save(results, args.out)
        write_docs(render_table(results))
        return 0

    import timm

    start = time.perf_counter()
    chosen = smallest_per_family()
    if args.family:
        unknown = sorted(set(args.family) - set(chosen))
        if unknown:
            raise SystemExit(f"error: unknown timm famil{'ies' if len(unknown) > 1 else 'y'}: {', '.join(unknown)}")
    rows = {}  # table row -> (family, model)
    for family in sorted(chosen):
        if not args.family or family in args.family:
            rows[family] = (family, chosen[family][0])
            for extra in EXTRA.get(family, []):
                if extra != chosen[family][0]:
                    options = "".join(f", {k}" for k in OPTIONS.get(extra, {}))
                    rows[f"{family} ({extra}{options})"] = (family, extra)
    results: dict[str, Any] = {"models": {}}
    if (args.family or args.resume) and args.out.exists():
        results = json.loads(args.out.read_text())  # merge: the families run now replace their old rows
        results["models"] = {r: e for r, e in results["models"].items() if e["family"] not in (args.family or [])}
    if args.resume:  # rows that ran to the end stay; those cut short by a time box run again
        results["models"] = {r: e for r, e in results["models"].items() if not cut_short(e)}
        rows = {r: fm for r, fm in rows.items() if r not in results["models"]}
    # Smallest models first: when the sweep's budget runs out, it has done as many families as it could.
    rows = dict(sorted(rows.items(), key=lambda kv: chosen[kv[1][0]][1]))
    command = "python scripts/zoo_timm.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    if results.get("command"):  # rows of earlier runs stay: the table names every run it shows
        command = f"{results['command']}`, `{command}"
    results.update(
        command=command,
        date=datetime.datetime.now().strftime("%Y-%m-%d"),
        torch=torch.__version__,
        timm=timm.__version__,
        tolerance=zoo.TOLERANCE,
    )
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    done = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {}
        for row, (family, name) in rows.items():
            count = chosen[family][1] if name == chosen[family][0] else None
            if count is not None and count > args.max_parameters:
                results["models"][row] = {"family": family, "model": name, "batch": zoo.DEFAULT_BATCH,
                                          "skipped": f"{count / 1e6:.0f} M parameters, more than --max-parameters"}
                continue
            futures[pool.submit(run_in_budget, family, name, args, threads, start)] = row
        for future in as_completed(futures):
            family = futures[future]  # the row: the family, or the family and an extra model
            entry = future.result()
            results["models"][family] = entry
            zoo.save(results, args.out)
            done += 1
            if "skipped" in entry:
                line = f"skipped: {entry['skipped']}"
            else:
                line = "  ".join(f"{m}: {mode_summary(entry, m)[0]}" for m in zoo.MODES)
            print(f"[{done}/{len(rows)}] {family} {entry['model']} {entry['wall_s']}s  {line}",
                  file=sys.stderr, flush=True)  # fmt: skip
    results["wall_s"] = round(time.perf_counter() - start, 1)
    zoo.save(results, args.out)
    if args.docs or (args.docs is None and not args.family and not args.resume):
        write_docs(render_table(results))
        print(f"{zoo.DOCS_PAGE.relative_to(ROOT)} timm table updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
