"""Render `out/bench.json` as markdown tables, and put them into docs/performance.md.

Start with `render`: one function per section of `bench.py`, each returning lines of markdown. `update_docs`
replaces what lies between `<!-- bench:start -->` and `<!-- bench:end -->` (or another marker's pair), adding a
section with the markers at the end of the page when they are missing, and touches nothing else.

    python benchmarks/report.py out/bench.json                          # print the tables again from a stored run
    python benchmarks/report.py --marker bench out/bench.json           # and rewrite the page's CPU tables
    python benchmarks/report.py --marker bench-cuda out/bench-cuda.json  # a GPU run's own section of the page
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def ms(cell: dict | None) -> str:
    """A timing cell: median ms, an error string, or a dash."""
    if not cell:
        return "–"
    if "error" in cell:
        return f"error: {cell['error'][:70]}"
    value = cell["median_ms"]
    text = f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return text + (" (1 run)" if cell.get("single_run") else "")


def ratio(a: dict | None, b: dict | None) -> str:
    """a / b of two timing cells, e.g. '0.12x'."""
    if not a or not b or "median_ms" not in a or "median_ms" not in b or not b["median_ms"]:
        return "–"
    return f"{a['median_ms'] / b['median_ms']:.2f}x"


def mib(cell: dict | None) -> str:
    if not cell:
        return "–"
    if "error" in cell:
        return f"error: {cell['error'][:50]}"
    return f"{cell['peak_increase_mib']:.0f}" + ("" if cell.get("peak_reset") else " (no reset)")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render(results: dict) -> str:
    lines = header(results["meta"])
    for key, section in (
        ("planning", planning),
        ("applying", applying),
        ("apply_profile", apply_profile),
        ("latency", latency),
        ("export", export),
        ("mark", mark),
        ("scaling", scaling),
        ("profile", profile),
    ):
        if results.get(key):
            lines += [""] + section(results[key])
    return "\n".join(lines) + "\n"


def header(meta: dict) -> list[str]:
    m = meta["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    busy = (
        f" **The machine was busy (1-minute load average {meta['load_average_before'][0]:.1f} when the run started): "
        "the timings are pessimistic and noisy.**"
        if meta.get("machine_busy")
        else ""
    )
    image = (
        "" if meta.get("image_channels") else "; without the first convolution's image channels, which upscale refuses"
    )
    cuda = f", CUDA device {m['cuda']}" if m.get("cuda") else ", no CUDA device"
    return [
        (
            f"`{meta['command']}` on {meta['date']}, {m['cpu']}, {m['cores']} cores, "
            f"torch.get_num_threads() = {m['torch_threads']}{cuda}; {versions}. "
            f"The run took {meta.get('duration_s', 0) / 60:.1f} minutes.{busy}"
        ),
        "",
        (
            f"Times are medians over at least {meta['repeats']} runs after warm-up (`time.perf_counter`), in ms; the "
            "models of one latency row (dense, prunespec, upscale) are timed round-robin, at least 7 rounds of at "
            "least 50 ms each at batch 1, so that a slow spell of the machine hits them alike. A random pattern "
            "picks every input channel of every consumer "
            f"(as listed by prunespec's tracer{image}) "
            "with probability p from `random.Random(0)`. The patterns `l2` and `l2/8` are what `prunespec.select("
            "model, x, 'l2', p)` chooses (the fraction p of every consumer's inputs with the smallest L2 norm, "
            "leaving out the first and last layers), `l2/8` with `round_to=8` so that every consumer keeps a multiple "
            "of 8 inputs. All libraries get the same (parameter name, channel) list. Ratios are prunespec / peer, "
            "measured in the same run: below 1 means prunespec is faster. Details: `out/bench.json`."
        ),
    ] + [f"\n**Note:** {note}" for note in meta.get("notes", [])]


def planning(rows: list[dict]) -> list[str]:
    out = [
        "### Planning (one 30% pattern, input 1x3x224x224)",
        "",
        (
            "prunespec: `plan(model, [x], pruned_inputs)` (unconstrained, reordered). upscale: "
            "`PruningManager(model).compute([x], pruned_inputs=...)`. torch_pruning: "
            "`DependencyGraph().build_dependency(model, example_inputs=x)` (builds its graph; no request). "
            "Peak memory: the increase of the peak resident memory (`VmHWM`) during one planning run, in a fresh "
            "process per cell, over its value after imports and model construction (the mark is first reset to "
            "the current resident size through /proc/self/clear_refs, so the import and construction peaks do not "
            "hide it; "
            "`ru_maxrss` would also carry the forking parent's peak), in MiB."
        ),
        "",
    ]
    body = [
        [r["model"], str(r["requested"]), ms(r["prunespec"]), ms(r["upscale"]), ms(r["torch_pruning"]),
         ratio(r["prunespec"], r["upscale"]), ratio(r["prunespec"], r["torch_pruning"]),
         mib(r["memory"].get("prunespec")), mib(r["memory"].get("upscale")), mib(r["memory"].get("torch_pruning"))]
        for r in rows
    ]  # fmt: skip
    head = ["model", "requested ch", "prunespec ms", "upscale ms", "torch_pruning ms", "ps/upscale", "ps/tp",
            "peak MiB ps", "peak MiB upscale", "peak MiB tp"]  # fmt: skip
    return out + table(head, body)


def applying(rows: list[dict]) -> list[str]:
    out = [
        "### Applying a stored spec (30% pattern)",
        "",
        (
            "prunespec: `load_spec(path)` + `prune(copy, spec)` on a copy made before the clock starts (no model "
            "construction, no weight loading); `load` and `validate` (`prunespec.applier.check`) are its first two "
            "steps timed alone. upscale has no stored spec: `compute` (tracing again) + `prune()`."
        ),
        "",
    ]
    body = [
        [r["model"], f"{r['spec_bytes'] / 1024:.0f}", ms(r["prunespec"]), ms(r["prunespec_load"]),
         ms(r["prunespec_validate"]), ms(r["upscale"]), ratio(r["prunespec"], r["upscale"])]
        for r in rows
    ]  # fmt: skip
    head = ["model", "spec KiB", "prunespec load+prune ms", "of which load", "of which validate",
            "upscale compute+prune ms", "ps/upscale"]  # fmt: skip
    return out + table(head, body)


def apply_profile(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = [f"Where prunespec's apply time goes ({rows[0]['model']}, cProfile, own time):", ""]
    body = [[f"`{r['function']}`", str(r["calls"]), f"{r['tottime_ms']:.1f}", f"{r['cumtime_ms']:.1f}"] for r in rows]
    return out + table(["function", "calls", "own ms", "cumulative ms"], body)


def latency(rows: list[dict]) -> list[str]:
    out = [
        "### Latency of the pruned models",
        "",
        (
            "Eager `nn.Module` under `torch.no_grad()`, float32. prunespec: unconstrained + reordered. upscale: its "
            "default reordered export (`compute` then `prune()`), and its export without reordering (`compute(..., "
            "reorder_producer=False, reorder_consumer=False)` then `prune()`). MACs: convolutions and linear layers "
            "counted with forward hooks on each model, the same counter for all (`GMACs ps` also gives "
            "`spec.summary.macs_after` in brackets). Efficiency = (dense latency / pruned latency) / (dense MACs / "
            "pruned MACs): 1 means the latency fell as much as the MACs. max|Δ| = max |prunespec pruned - prunespec "
            "mock| in float32."
        ),
    ]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["device"], r["batch"]), []).append(r)
    for (device, batch), group in groups.items():
        size = group[0].get("size", 224)
        out += ["", f"{device.upper()}, batch {batch}" + ("" if size == 224 else f", input {size}x{size}") + ":", ""]
        body = []
        for r in group:
            v = r["variants"]
            ps, up, upn = v["prunespec"], v["upscale"], v["upscale_noreorder"]
            body.append([
                r["model"], pattern(r), ms(r["dense"]), ms(ps.get("latency") or ps),
                ms(up.get("latency") or up), ms(upn.get("latency") or upn),
                ratio(ps.get("latency"), up.get("latency")), ratio(ps.get("latency"), upn.get("latency")),
                ratio(r["dense"], ps.get("latency")),
                f"{r['dense_macs'] / 1e9:.2f}", _gmacs(ps) + f" ({r['spec_macs'][1] / 1e9:.2f})", _gmacs(up),
                _eff(r, ps), _eff(r, up), _eff(r, upn),
                f"{ps['max_abs_diff_vs_mock']:.1e}" if "max_abs_diff_vs_mock" in ps else "–",
            ])  # fmt: skip
        head = ["model", "p", "dense ms", "prunespec ms", "upscale ms", "upscale no-reorder ms", "ps/upscale",
                "ps/upscale no-reorder", "ps speedup", "GMACs dense", "GMACs ps", "GMACs upscale", "eff ps",
                "eff upscale", "eff upscale no-reorder", "max\\|Δ\\| ps"]  # fmt: skip
        out += table(head, body)
        out += ["", (f"The same requests in constrained mode ({device.upper()}, batch {batch}): every channel that "
                     "one consumer asks to drop goes, so no activation is gathered and the residual streams shrink "
                     "too. Eager and unfolded, like the dense model it is measured against."), ""]  # fmt: skip
        body = [
            [r["model"], pattern(r), ms(r["dense"]), ms(c.get("latency") or c),
             ratio(r["dense"], c.get("latency")), f"{r['dense_macs'] / 1e9:.2f}", _gmacs(c), _eff(r, c),
             f"{c['max_abs_diff_vs_mock']:.1e}" if "max_abs_diff_vs_mock" in c else "–"]
            for r in group
            if (c := r["variants"].get("prunespec_constrained")) is not None
        ]  # fmt: skip
        out += table(["model", "p", "dense ms", "constrained ms", "speedup", "GMACs dense", "GMACs", "eff",
                      "max\\|Δ\\|"], body)  # fmt: skip
        for entry in INFERENCE_TABLES:
            out += inference(device, batch, group, *entry)
    return out


# (pruned variant, dense variant prepared the same way, short name, what was done to both)
INFERENCE_TABLES = [
    (
        "prunespec_folded",
        "dense_folded",
        "folded",
        "with their batch norms folded into the layers before them (`apply --fold-norms`)",
    ),
    (
        "prunespec_channels_last",
        "dense_channels_last",
        "channels-last",
        "folded, then laid out channels-last with the gathers that cost more than zero columns in the consumer's "
        "weight filled (`apply --fold-norms --channels-last`)",
    ),
    (
        "prunespec_compiled",
        "dense_compiled",
        "compiled",
        "folded, then compiled by `torch.compile` (inductor, `torch._inductor.config.freezing = True`, under "
        "`torch.no_grad()`; a static graph per batch size), which fuses the remaining gathers into the kernels "
        "around them and picks the memory layout itself",
    ),
    (
        "prunespec_channels_last_compiled",
        "dense_compiled",
        "compiled",
        "folded, laid out channels-last with the costly gathers filled as zero columns, then compiled as above",
    ),
    (
        "prunespec_constrained_channels_last",
        "dense_channels_last",
        "channels-last",
        "in constrained mode, folded and laid out channels-last (`apply --fold-norms --channels-last`)",
    ),
    (
        "prunespec_constrained_compiled",
        "dense_compiled",
        "compiled",
        "in constrained mode, folded and compiled by inductor with freezing",
    ),
]


def inference(device: str, batch: int, group: list[dict], key: str, dense_key: str, short: str, how: str) -> list[str]:
    """The pruned models again as prepared for inference (`key`), against the dense model as it is and prepared
    the same way (`dense_key`). Efficiency counts the MACs the spec keeps (`spec.summary.macs_after`; a
    constrained model runs no zero columns, so its counted MACs), however many the laid-out model runs: zero
    columns are work it does for speed, not work pruning left."""
    constrained = "constrained" in key
    body = []
    for r in group:
        v = r["variants"]
        f, dense_f = v.get(key), v.get(dense_key)
        if f is None or dense_f is None:
            continue
        latency, dense_latency = f.get("latency"), dense_f.get("latency")
        kept = f if constrained else {**f, "macs": r["spec_macs"][1]}
        body.append(
            [
                r["model"],
                pattern(r),
                ms(r["dense"]),
                ms(dense_latency or dense_f),
                ms(latency or f),
                "–" if constrained else ratio(latency, v["upscale"].get("latency")),
                "–" if constrained else ratio(latency, v["upscale_noreorder"].get("latency")),
                ratio(r["dense"], latency),
                _gmacs(f) + ("" if constrained else f" ({r['spec_macs'][1] / 1e9:.2f})"),
                _eff(r, kept),
                _eff(r, kept, dense_latency),
                f"{f['max_abs_diff_vs_mock']:.1e}" if "max_abs_diff_vs_mock" in f else "–",
            ]
        )
    if not body:
        return []
    head = [
        "model",
        "p",
        "dense ms",
        f"dense {short} ms",
        f"ps {short} ms",
        f"{short}/upscale",
        f"{short}/upscale no-reorder",
        "speedup vs dense",
        "GMACs run (kept)",
        "eff vs dense",
        f"eff vs dense {short}",
        "max\\|Δ\\|",
    ]
    compile_s = [cell["first_call_s"] for r in group for k in (key, dense_key)
                 if "first_call_s" in (cell := r["variants"].get(k, {}))]  # fmt: skip
    note = (
        f"The {'constrained' if constrained else 'unconstrained'} models {how.removeprefix('in constrained mode, ')}, "
        f"for inference: {device.upper()}, batch {batch}. `eff vs dense` measures "
        f"against the dense model as it is, `eff vs dense {short}` against the dense model prepared the same way: "
        "the second is what pruning alone gives. Both count the MACs the spec keeps; `GMACs run` also counts "
        "zero columns."
        + (f" The first call, which compiles, took {min(compile_s):.0f}-{max(compile_s):.0f} s." if compile_s else "")
    )
    return ["", note, "", *table(head, body)]


def pattern(row: dict) -> str:
    """The p column: the fraction, and the criterion pattern's name when it is not the random one."""
    name = row.get("pattern", "random")
    return f"{row['fraction']:.0%}" + ("" if name == "random" else f" {name}")


def _gmacs(variant: dict) -> str:
    return f"{variant['macs'] / 1e9:.2f}" if "macs" in variant else "–"


def _eff(row: dict, variant: dict, dense: dict | None = None) -> str:
    """Realized speedup efficiency of `variant` against the dense model (or `dense`, a dense model's latency)."""
    lat = variant.get("latency") or {}
    dense = dense or row["dense"]
    if "median_ms" not in lat or "median_ms" not in dense or not variant.get("macs"):
        return "–"
    speedup = dense["median_ms"] / lat["median_ms"]
    return f"{speedup / (row['dense_macs'] / variant['macs']):.2f}"


def export(rows: list[dict]) -> list[str]:
    out = ["### prunespec model as a `torch.export` program (30%, CPU, batch 1)", ""]
    body = [
        [r["model"], ms(r.get("eager") or r), ms(r.get("exported") or r), ratio(r.get("exported"), r.get("eager")),
         f"{r['export_s']:.1f}" if "export_s" in r else "–"]
        for r in rows
    ]  # fmt: skip
    return out + table(["model", "eager ms", "exported ms", "exported/eager", "export s"], body)


# (column, pruned variant, dense variant it is measured against) of the mark's efficiencies
MARK_EFFICIENCIES = [
    ("eff ps", "prunespec", "dense"),
    ("eff ps folded", "prunespec_folded", "dense"),
    ("eff ps channels-last", "prunespec_channels_last", "dense"),
    ("eff ps channels-last vs dense channels-last", "prunespec_channels_last", "dense_channels_last"),
]


def mark(section: dict) -> list[str]:
    """One row per round-robin block of the `mark` section, then the median and range of each efficiency."""
    name, p = section["model"], f"{section['fraction']:.0%}"
    mac_ratio = section["macs"]["dense"] / section["macs"]["kept"]
    keys = list(section["blocks"][0])
    effs: dict[str, list[float]] = {column: [] for column, _, _ in MARK_EFFICIENCIES}
    body = []
    for i, block in enumerate(section["blocks"], 1):
        row = [str(i)] + [ms(block.get(key)) for key in keys]
        for column, key, dense in MARK_EFFICIENCIES:
            timed = "median_ms" in block.get(key, {}) and "median_ms" in block.get(dense, {})
            if timed:
                effs[column].append(block[dense]["median_ms"] / block[key]["median_ms"] / mac_ratio)
            row.append(f"{effs[column][-1]:.2f}" if timed else "–")
        body.append(row)
    spread = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if v else "–" for v in effs.values()]
    body.append(["median (range)"] + [""] * len(keys) + spread)
    note = (
        f"{name} at {p} random, CPU, batch 1, timed in {len(section['blocks'])} separate round-robin blocks like one "
        "latency row each, to show how far one row's efficiency moves between runs. Efficiency counts the MACs the "
        f"spec keeps ({mac_ratio:.2f}x fewer than dense); channels-last is `apply --fold-norms --channels-last`."
    )
    head = ["block"] + [
        f"{key.replace('prunespec', 'ps').replace('_channels_last', ' channels-last').replace('_', ' ')} ms"
        for key in keys
    ]
    return [f"### Run-to-run spread: {name}, {p} random, batch 1, over several blocks", "", note, ""] + table(
        head + [column for column, _, _ in MARK_EFFICIENCIES], body
    )


def scaling(section: dict) -> list[str]:
    out = ["### Scaling of planning (prunespec; 30% pattern)", ""]
    body = [
        [r["model"], f"{r['parameters'] / 1e6:.1f}", str(r["consumers"]), str(r["requested"]), ms(r["prunespec"]),
         mib(r["memory"].get("prunespec"))]
        for r in section.get("models", [])
    ]  # fmt: skip
    out += table(["model (224)", "params M", "consumers", "requested ch", "plan ms", "peak MiB"], body)
    body = [
        [f"{r['batch']}x3x{r['size']}x{r['size']}", ms(r["prunespec"]), mib(r["memory"].get("prunespec")),
         ms(r.get("upscale")), mib(r["memory"].get("upscale")), ratio(r["prunespec"], r.get("upscale"))]
        for r in section.get("inputs", [])
    ]  # fmt: skip
    if body:
        out += ["", "resnet50 over input size and batch (upscale on the resolution sweep only):", ""]
        out += table(["input", "prunespec ms", "peak MiB ps", "upscale ms", "peak MiB upscale", "ps/upscale"], body)
    return out


def profile(section: dict) -> list[str]:
    out = ["### Where the pruned resnet50 spends its time (torch.profiler, CPU, batch 1, 30%, self CPU per forward)"]
    for key, cell in section.items():
        out += ["", f"{key}:", ""]
        if "error" in cell:
            out.append(f"error: {cell['error']}")
            continue
        body = [[f"`{o['op']}`", str(o["calls"]), f"{o['self_cpu_ms']:.2f}", f"{o['share']:.0%}"] for o in cell["ops"]]
        out += table(["op", "calls", "self CPU ms", "share"], body)
    return out


def update_docs(path: Path, text: str, marker: str = "bench") -> None:
    """Replace the text between the `marker` markers of `path`; append a section when the markers are missing."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    page = path.read_text()
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in page and end in page and page.index(start) < page.index(end):
        before, rest = page.split(start, 1)
        after = rest.split(end, 1)[1]
        page = before + block + after
    else:
        page = page.rstrip("\n") + "\n\n## Benchmark results\n\n" + block + "\n"
    path.write_text(page)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print stored benchmark runs as markdown, or put them in the docs.")
    parser.add_argument("runs", nargs="*", type=Path, default=[Path("out/bench.json")], help="bench.py --out files")
    parser.add_argument(
        "--marker",
        metavar="NAME",
        help="replace docs/performance.md's text between <!-- NAME:start --> and <!-- NAME:end --> with the tables",
    )
    args = parser.parse_args(argv)
    text = "\n".join(render(json.loads(path.read_text())) for path in args.runs)
    print(text)
    if args.marker:
        update_docs(DOCS_PAGE, text, args.marker)


if __name__ == "__main__":
    main()
