"""Transformer coverage sweep: random heads, channels, hidden width, blocks and all of them at once, on every
attention family of `scripts/families.py`, planned, stored, and applied in a fresh process.

    python scripts/zoo_transformers.py                  # every family; writes out/zoo_transformers.json and the
                                                        # table in docs/coverage.md
    python scripts/zoo_transformers.py --families llama gpt2     # some; writes the JSON only (add --docs)

Start reading at `main`. Each family gets two fresh worker processes of this script, as in `scripts/zoo.py`:
`plan_worker` draws three seeded patterns per unit (`patterns`), plans each in both modes and stores the specs;
`apply_worker` rebuilds the model (the builders are seeded), applies every stored spec without importing the
planner, compares `prune(copy, spec)(x)` with `mock(model, spec)(x)` in float64, and for causal language models
also compares greedy generation with the key/value cache.

Each case ends `pass` (equal outputs, equal tokens, fewer parameters), `kept` (the plan removed nothing, for the
reasons it gives), `refused` (PlanError), `fail` (a mismatch: the worst outcome) or `error` (anything else).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import prunespec  # noqa: E402
from scripts import zoo  # noqa: E402
from scripts.families import FAMILIES, RESIDUAL, STREAM, droppable, greedy, random_heads, stream_request  # noqa: E402

BUILDERS = {**FAMILIES, **RESIDUAL}
UNITS = ("heads", "channels", "hidden", "blocks", "all")
MODES = ("unconstrained", "constrained")
SEEDS = (0, 1, 2)
CHANNELS = 0.3  # probability that a producer's output channel is requested in the `channels` unit
TOLERANCE = 1e-12  # the invariant's, relative to the output scale above 1
DOCS_START, DOCS_END = "<!-- transformers:start -->", "<!-- transformers:end -->"
STATUS_ORDER = ("error", "fail", "refused", "kept", "pass")


def patterns(family: str, model, inputs, seed: int) -> dict[str, dict[str, Any] | None]:
    """plan() arguments per unit for one seed; None where the family has no such unit."""
    heads, kv_heads = random_heads(model, inputs, seed)
    _, channels = zoo.random_request(model, inputs, seed, "output", CHANNELS)
    stream = stream_request(model, inputs, family, seed) if family in STREAM else None
    blocks = droppable(model, inputs)
    block = random.Random(f"{family}:{seed}").sample(blocks, 1) if blocks else None
    found = {
        "heads": dict(pruned_heads=heads, pruned_kv_heads=kv_heads) if heads or kv_heads else None,
        "channels": dict(pruned_outputs=channels),
        "hidden": dict(pruned_outputs=stream, through_norms=True) if stream else None,
        "blocks": dict(pruned_blocks=block) if block else None,
    }
    _, few = zoo.random_request(model, inputs, seed, "output", CHANNELS / 3)
    found["all"] = dict(
        pruned_heads=heads, pruned_kv_heads=kv_heads, pruned_outputs=few + (stream or []),
        pruned_blocks=block or [], through_norms=True,
    )  # fmt: skip
    return found


def _tensors(output) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def _difference(actual, expected) -> tuple[float, float]:
    pairs = list(zip(_tensors(actual), _tensors(expected), strict=True))
    diff = max((a - e).abs().max().item() for a, e in pairs)
    return diff, max(e.abs().max().item() for _, e in pairs)


# --------------------------------------------------------------------------------------------------------- workers


def plan_worker(family: str, workdir: Path) -> None:
    model, inputs = BUILDERS[family].build()
    records: dict[str, dict[str, Any]] = {}
    for seed in SEEDS:
        for unit, request in patterns(family, model, inputs, seed).items():
            if request is None:
                continue
            for mode in MODES:
                key = f"{unit}-{seed}-{mode}"
                record: dict[str, Any] = {"unit": unit, "seed": seed, "mode": mode}
                records[key] = record
                try:
                    spec = prunespec.plan(model, inputs, constrained=mode == "constrained", **request)
                except prunespec.PlanError as error:
                    record.update(status="refused", reason=zoo.one_line(error))
                    continue
                except Exception as error:  # noqa: BLE001 -- a sweep records every failure and goes on
                    record.update(status="error", reason=zoo.one_line(error), traceback=traceback.format_exc())
                    continue
                record.update(
                    parameters_before=spec.summary.parameters_before,
                    parameters_after=spec.summary.parameters_after,
                    kept_reasons=dict(Counter(k.reason for k in spec.kept)),
                )
                if spec.summary.parameters_after >= spec.summary.parameters_before:
                    record["status"] = "kept"
                else:
                    spec.save(workdir / f"{key}.prunespec.json")
                    record["spec"] = f"{key}.prunespec.json"
    (workdir / "plan.json").write_text(json.dumps(records))


def apply_worker(family: str, workdir: Path) -> None:
    model, inputs = BUILDERS[family].build()
    records = json.loads((workdir / "plan.json").read_text())
    for key, record in records.items():
        if "spec" not in record:
            continue
        result: dict[str, Any] = {"key": key}
        try:
            spec = prunespec.load_spec(workdir / record["spec"])
            with torch.no_grad():
                mock = prunespec.mock(model, spec)
                pruned = prunespec.prune(copy.deepcopy(model), spec)
                diff, scale = _difference(pruned(*inputs), mock(*inputs))
                same_tokens = None
                if BUILDERS[family].causal_lm:
                    same_tokens = torch.equal(greedy(pruned, inputs[0], 6)[0], greedy(mock, inputs[0], 6)[0])
            parameters = sum(p.numel() for p in pruned.parameters())
            result.update(diff=diff, scale=scale, parameters_pruned=parameters)
            if not diff <= TOLERANCE * max(1.0, scale):
                result.update(status="fail", reason=f"max |pruned - mock| = {diff:.3g} (output scale {scale:.3g})")
            elif same_tokens is False:
                result.update(status="fail", reason="greedy generation gives other tokens than the mock's")
            elif parameters != spec.summary.parameters_after:
                result.update(status="fail", reason=f"{parameters} parameters, the spec says {spec.summary}")
            else:
                result["status"] = "pass"
        except Exception as error:  # noqa: BLE001
            result.update(status="error", reason=zoo.one_line(error), traceback=traceback.format_exc())
        print(json.dumps(result), flush=True)
    # The applier must not need the planner (checked here, where a stored spec was applied in a fresh process).
    planner = sorted(m for m in sys.modules if m.startswith("prunespec.planner"))
    print(json.dumps({"key": None, "planner_imported": planner}), flush=True)


def run_family(family: str, timeout: float) -> dict[str, Any]:
    """Plan then apply one family in two fresh processes; never raises."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"zoo-{family}-") as tmp:
        worker = [sys.executable, str(Path(__file__).resolve()), "--worker", "--dir", tmp, "--families", family]
        problem = zoo._run_worker([*worker, "--stage", "plan"], timeout)
        plan = Path(tmp) / "plan.json"
        records = json.loads(plan.read_text()) if plan.exists() else {}
        entry: dict[str, Any] = {"records": records}
        if problem:
            entry["problem"] = problem
        if any("spec" in r for r in records.values()):
            applied, problem = zoo._run_apply([*worker, "--stage", "apply"], timeout)
            for key, result in applied.items():
                if key is None:
                    entry["planner_imported"] = result["planner_imported"]
                else:
                    records[key].update({k: v for k, v in result.items() if k != "key"})
            for record in records.values():
                if "spec" in record and "status" not in record:
                    record.update(status="error", reason=problem or "no result from the apply worker")
    entry["wall_s"] = round(time.perf_counter() - start, 1)
    return entry


# ------------------------------------------------------------------------------------------------------- the table


def cell(records: list[dict[str, Any]]) -> str:
    """One table cell for the cases of a (family, unit): the worst status, how many passed, what was removed."""
    if not records:
        return "–"
    worst = min(records, key=lambda r: STATUS_ORDER.index(r["status"]))
    passed = sum(r["status"] == "pass" for r in records)
    removed = [1 - r["parameters_after"] / r["parameters_before"] for r in records if r["status"] == "pass"]
    if worst["status"] == "pass":
        return f"{passed}/{len(records)} pass, −{100 * sum(removed) / len(removed):.0f}% params"
    if worst["status"] == "kept":
        reasons = Counter(reason for r in records for reason in r.get("kept_reasons", {}))
        why = reasons.most_common(1)[0][0] if reasons else "nothing to remove"
        return f"{passed}/{len(records)} pass; kept: {why[:80]}".replace("|", "\\|")
    return f"**{worst['status']}** {passed}/{len(records)} pass: {worst.get('reason', '')[:90]}".replace("|", "\\|")


def render_table(results: dict[str, Any]) -> str:
    count = Counter(r["status"] for e in results["families"].values() for r in e["records"].values())
    parts = ", ".join(f"{count[s]} {s}" for s in reversed(STATUS_ORDER) if count[s])
    lines = [
        f"`{results['command']}` on {results['date']}, torch {results['torch']}, transformers "
        f"{results['transformers']}, timm {results['timm']}: {len(results['families'])} families, "
        f"{sum(count.values())} cases ({parts}). Each cell covers {len(SEEDS)} seeded patterns × both modes: "
        "`heads` drops random query heads (equally per key/value group) or key/value groups per attention; "
        f"`channels` requests each producer's output channel with probability {CHANNELS}; `hidden` a quarter of "
        "the residual stream's channels through norms; `blocks` one random residual block; `all` every unit in "
        "one plan. `pass` means pruned == mock in float64 (≤ 1e-12 relative), the same greedy tokens with the "
        "key/value cache for causal language models, and fewer parameters; the figure is the mean fraction of "
        "parameters removed. `kept` cells name the reason the planner gives most often. Details: "
        "`out/zoo_transformers.json`.",
        "",
        f"| family | {' | '.join(UNITS)} |",
        f"|---|{'---|' * len(UNITS)}",
    ]
    for family, entry in results["families"].items():
        by_unit = {u: [r for r in entry["records"].values() if r["unit"] == u] for u in UNITS}
        if "problem" in entry and not entry["records"]:
            lines.append(f"| {family} | **error**: {entry['problem'][:100]} |{' |' * (len(UNITS) - 1)}")
            continue
        lines.append(f"| {family} | {' | '.join(cell(by_unit[u]) for u in UNITS)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=sorted(BUILDERS), help="default: all")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker process")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "zoo_transformers.json")
    parser.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                        help="rewrite the table in docs/coverage.md (default: when running every family)")  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=["plan", "apply"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        (plan_worker if args.stage == "plan" else apply_worker)(args.families[0], args.dir)
        return 0

    import timm
    import transformers

    families = args.families or list(BUILDERS)
    results: dict[str, Any] = {
        "command": "python scripts/zoo_transformers.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "transformers": transformers.__version__, "timm": timm.__version__,
        "families": {},
    }  # fmt: skip
    for family in families:
        entry = run_family(family, args.timeout)
        results["families"][family] = entry
        statuses = Counter(r["status"] for r in entry["records"].values())
        print(f"{family}: {dict(statuses)} {entry.get('problem', '')} ({entry['wall_s']} s)", flush=True)
        if entry.get("planner_imported"):
            print(f"  the applier imported the planner: {entry['planner_imported']}", flush=True)
    zoo.save(results, args.out)
    table = render_table(results)
    if args.docs or (args.docs is None and not args.families):
        zoo.write_docs(table, page=zoo.DOCS_PAGE, start=DOCS_START, end=DOCS_END,
                       title="Coverage of transformer families")  # fmt: skip
    print(table)
    bad = [r for e in results["families"].values() for r in e["records"].values() if r["status"] in ("fail", "error")]
    return 1 if bad or any(e.get("planner_imported") for e in results["families"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
