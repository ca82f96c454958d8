"""Planning and streaming at LLM scale: the figures of the "Large language models" section of docs/performance.md.

    python benchmarks/llm_scale.py                   # everything: 20-30 minutes on two cores
    python benchmarks/llm_scale.py --skip-stream     # planning and spec sizes only: about 6 minutes
    python benchmarks/llm_scale.py --no-docs         # leave docs/performance.md alone
    python benchmarks/llm_scale.py --render out/llm_scale.json   # the tables of a stored run, into the docs again

Start at `main`. Three parts, each case in a fresh process so that its peak memory is its own:

- **Planning** (`plan_case`): Llama-3-70B's shape (hidden 8192, 64 query and 8 key/value heads, MLP 28672,
  vocabulary 128256) with 8, 16, 32 and 80 layers, and Llama-2-7B's (32 layers, hidden 4096, 32 heads, MLP 11008),
  built on `meta` from a `transformers.LlamaConfig` (no weights) and planned with 30% of every layer's MLP channels
  and a quarter of its key/value groups, chosen at random (`random.Random(0)`). Each case runs `--repeats` times; the
  table gives the medians of the planning time (`time.perf_counter`) and of its CPU time (`time.process_time`, which
  a busy machine inflates less), and the peak resident memory of the whole process (VmHWM: Python, torch,
  transformers, the meta model, the request and the plan) beside what the process held before planning.
- **Spec size** at 80 layers, for three patterns: the random one above; `contiguous`, the last 30% of every layer's
  MLP channels and its last two key/value groups, whose index lists are one run each (what a plan looks like when
  every layer keeps the same positions); and `l2`, the channels `prunespec.select` picks by the L2 norm of their
  weights. A criterion needs weights, which a model on `meta` has not: `l2` is measured on a small Llama with random
  weights (`torch.manual_seed(0)`; 4 layers, hidden 1024, MLP 3584), choosing MLP channels only, next to random
  MLP channels on that model. Bytes of the spec file and of the file gzipped. Then a **one-layer change**: the
  random plan again with layer 40's MLP channels drawn anew, compared with the first by
  `prunespec.review.diff_specs` (the changed layers) and by a line diff of the two files (`difflib`, the hunks `git
  diff` would show).
- **Streaming** (`stream_case`): `folder_memory.make` writes a sharded TinyLlama-shaped folder of random bfloat16
  tensors with 22 and 44 layers (2.2 and 4.1 GB) and its spec (heads, key/value groups, MLP channels, a quarter of
  the hidden width through the norms, a block dropped). Then, `--stream-repeats` times in turn, each in a fresh
  process (`folder_memory.measure`): a plain copy of the folder's files (`shutil.copyfile`) and `prune_folder`; each
  output is deleted once measured. Throughput is the checkpoint's bytes over the seconds the work took; the peak is
  the process's high-water mark over what it held before the work.

Writes every figure to out/llm_scale.json and the tables between `<!-- llm-scale:start -->` and
`<!-- llm-scale:end -->` of docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import gzip
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

# name: (layers, hidden, intermediate, query heads, key/value heads, vocabulary)
SHAPES = {
    "70B": (80, 8192, 28672, 64, 8, 128256),
    "7B": (32, 4096, 11008, 32, 32, 32000),
    "small": (4, 1024, 3584, 16, 4, 32000),  # with weights, for a criterion's pattern
}
PLAN_CASES = [("70B", 8), ("70B", 16), ("70B", 32), ("70B", 80), ("7B", 32)]
MLP_FRACTION, KV_FRACTION = 0.3, 0.25
CHANGED_LAYER = 40
STREAM_LAYERS = (22, 44)


# ---------------------------------------------------------------------------------------------- planning


def build(shape: str, layers: int, meta: bool = True):
    """A Llama of `shape` with `layers` layers: on `meta` (no weights), or with random weights."""
    import torch
    import transformers

    _, hidden, intermediate, heads, kv_heads, vocab = SHAPES[shape]
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    if not meta:
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config).eval()


def request(shape: str, layers: int, pattern: str, changed: int | None = None) -> dict:
    """`plan`'s keyword arguments for `pattern` ("random" or "contiguous"); with `changed`, that layer's MLP
    channels are drawn with another seed."""
    _, _, intermediate, _, kv_heads, _ = SHAPES[shape]
    mlp, kv = int(MLP_FRACTION * intermediate), int(KV_FRACTION * kv_heads)
    outputs, groups = [], []
    rng = random.Random(0)
    for i in range(layers):
        if pattern == "contiguous":
            channels, chosen = range(intermediate - mlp, intermediate), range(kv_heads - kv, kv_heads)
        else:
            channels = sorted(rng.sample(range(intermediate), mlp))
            chosen = sorted(rng.sample(range(kv_heads), kv))
            if i == changed:
                channels = sorted(random.Random(1).sample(range(intermediate), mlp))
        outputs += [(f"model.layers.{i}.mlp.up_proj.weight", c) for c in channels]
        groups += [(f"model.layers.{i}.self_attn", h) for h in chosen]
    return {"pruned_outputs": outputs, "pruned_kv_heads": groups}


def plan_case(shape: str, layers: int, pattern: str, spec_path: str, changed: int | None = None) -> dict:
    """Plan one case in this process and return its figures (called in a fresh process by `main`)."""
    import torch

    import prunespec
    from prunespec.planner import plan  # noqa: F401 (the planner's imports count as before planning)

    before_build = _status_mib()
    start = time.perf_counter()
    x = [torch.zeros(1, 8, dtype=torch.long, device="meta")]
    if pattern == "l2":  # a criterion needs weights: the small model, with random ones
        model = build(shape, layers, meta=False)
        x = [torch.zeros(1, 8, dtype=torch.long)]
        # Only the MLP channels, as in the random request: the attention, the stream (down_proj writes it) and the
        # output layer are left out.
        left_out = ["*self_attn*", "*embed_tokens*", "lm_head*", "*down_proj*"]
        chosen = prunespec.select(model, x, "l2", MLP_FRACTION, side="output", exclude=left_out)
        kwargs = {"pruned_inputs": chosen.pruned_inputs or None, "pruned_outputs": chosen.pruned_outputs}
    else:
        model = build(shape, layers, meta=pattern != "random-weights")
        if pattern == "random-weights":
            x = [torch.zeros(1, 8, dtype=torch.long)]
        kwargs = request(shape, layers, "random" if pattern == "random-weights" else pattern, changed)
        if pattern == "random-weights":  # MLP channels only, as `l2` picks them
            del kwargs["pruned_kv_heads"]
    build_seconds = time.perf_counter() - start
    before = _status_mib()
    start, cpu = time.perf_counter(), time.process_time()
    spec = prunespec.plan(model, x, **kwargs)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    spec.save(spec_path)
    save_seconds = time.perf_counter() - start
    data = Path(spec_path).read_bytes()
    summary = spec.summary
    return {
        "shape": shape, "layers": layers, "pattern": pattern, "changed_layer": changed,
        # MLP channels asked for, once each (a criterion names a channel on both projections of its segment)
        "requested_channels": sum(name.endswith("up_proj.weight") for name, _ in kwargs.get("pruned_outputs") or []),
        "requested_kv_heads": len(kwargs.get("pruned_kv_heads") or []),
        "build_seconds": build_seconds, "seconds": seconds, "cpu_seconds": cpu_seconds, "save_seconds": save_seconds,
        "rss_before_build_mib": before_build, "rss_before_mib": before,
        "peak_rss_mib": _status_mib("VmHWM"),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "spec_bytes": len(data), "spec_gzip_bytes": len(gzip.compress(data, 6)),
        "parameters": [summary.parameters_before, summary.parameters_after],
        "macs": [summary.macs_before, summary.macs_after], "subselections": summary.subselections,
        "config": {key: list(value) for key, value in spec.config.items()},
    }  # fmt: skip


def _status_mib(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc/self/status. VmHWM, the peak, is this process's own: `ru_maxrss`
    also remembers the peak of the parent whose image the process replaced (see `peak_memory.py`)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_plan(shape: str, layers: int, pattern: str, spec_path: Path, changed: int | None = None) -> dict:
    """`plan_case` in a fresh process."""
    command = [sys.executable, __file__, "--plan-case", shape, str(layers), pattern, str(spec_path)]
    if changed is not None:
        command.append(str(changed))
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[1:])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def medians(runs: list[dict]) -> dict:
    """The first run's figures, with the timed and measured ones replaced by their medians, and the runs kept."""
    keys = ("build_seconds", "seconds", "cpu_seconds", "save_seconds", "rss_before_mib", "peak_rss_mib")
    return {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in keys}, "runs": runs}


def planning(work: Path, repeats: int) -> dict:
    section: dict = {"cases": [], "sizes": [], "diff": None}
    for shape, layers in PLAN_CASES:
        runs = [run_plan(shape, layers, "random", work / f"{shape}-{layers}.json") for _ in range(repeats)]
        case = medians(runs)
        section["cases"].append(case)
        print(f"plan {shape} {layers:2d} layers: {case['seconds']:5.2f} s ({case['cpu_seconds']:5.2f} s CPU), "
              f"peak RSS {case['peak_rss_mib']:6.0f} MiB ({case['rss_before_mib']:.0f} before), spec "
              f"{case['spec_bytes'] / 1e6:.1f} MB", flush=True)  # fmt: skip
    full = SHAPES["70B"][0]
    random_case = next(c for c in section["cases"] if c["shape"] == "70B" and c["layers"] == full)
    section["sizes"].append(random_case)
    for shape, pattern, layers in (("70B", "contiguous", full), ("small", "random-weights", 4), ("small", "l2", 4)):
        case = run_plan(shape, layers, pattern, work / f"{pattern}.json")
        section["sizes"].append(case)
        print(f"spec {pattern} ({layers} layers): {case['spec_bytes']:,} bytes, {case['spec_gzip_bytes']:,} gzipped",
              flush=True)  # fmt: skip
    changed = run_plan("70B", full, "random", work / "changed.json", CHANGED_LAYER)
    section["diff"] = one_layer_diff(work / f"70B-{full}.json", work / "changed.json")
    print(f"one-layer change: {section['diff']}", flush=True)
    section["diff"]["plan_seconds"] = changed["seconds"]
    return section


def one_layer_diff(old: Path, new: Path) -> dict:
    """What changes between two specs: the layers `diff_specs` names, and the hunks of a line diff of the files."""
    import prunespec
    from prunespec.review import diff_specs

    result = diff_specs(prunespec.load_spec(old), prunespec.load_spec(new))
    changed = result.added + result.removed + result.changed
    before, after = old.read_text().splitlines(), new.read_text().splitlines()
    lines = list(difflib.unified_diff(before, after, n=0, lineterm=""))
    changed_lines = [line for line in lines if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    # The hunks `git diff` shows: with three lines of context, changes up to six lines apart make one hunk.
    hunks = [line for line in difflib.unified_diff(before, after, n=3, lineterm="") if line.startswith("@@")]
    return {"changed_layers": changed, "hunks": len(hunks), "changed_lines": len(changed_lines),
            "hunk_headers": hunks, "file_lines": len(before)}  # fmt: skip


# ---------------------------------------------------------------------------------------------- streaming


def stream_case(work: Path, layers: int, repeats: int) -> dict:
    """Write a synthetic folder, then copy it and prune it `repeats` times in turn, each in a fresh process."""
    import folder_memory

    folder = work / f"unpruned-{layers}"
    checkpoint, largest = folder_memory.make(folder, layers)
    spec = folder.parent / "spec.json"
    os.sync()
    runs = []
    for i in range(repeats):
        for what in ("copy", "prune"):
            target = work / f"{what}-{layers}-{i}"
            done = subprocess.run(
                [sys.executable, str(HERE / "folder_memory.py"), "--measure", what, folder, target, spec],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            if done.returncode:
                raise RuntimeError(f"{what} of {layers} layers failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.splitlines()[-1])
            shutil.rmtree(target)
            result["mb_per_s"] = checkpoint / result["seconds"] / 1e6
            runs.append(result)
            print(f"stream {layers} layers {what:5s}: {result['seconds']:6.2f} s ({result['mb_per_s']:4.0f} MB/s), "
                  f"sync {result['sync_seconds']:.2f} s, peak {result['peak_increase_mib']:.0f} MiB over "
                  f"{result['baseline_mib']:.0f}", flush=True)  # fmt: skip
    shutil.rmtree(folder)
    spec.unlink()
    copies = [r for r in runs if r["what"] == "copy"]
    prunes = [r for r in runs if r["what"] == "prune"]
    # Each pruning against the copy just before it: the pair saw the machine in the same state.
    ratios = [p["mb_per_s"] / c["mb_per_s"] for c, p in zip(copies, prunes)]
    return {
        "layers": layers, "checkpoint_bytes": checkpoint, "largest_tensor_bytes": largest,
        "copy_mb_per_s": statistics.median(r["mb_per_s"] for r in copies),
        "prune_mb_per_s": statistics.median(r["mb_per_s"] for r in prunes),
        "ratio": statistics.median(ratios), "ratios": ratios,
        "prune_peak_increase_mib": max(r["peak_increase_mib"] for r in prunes),
        "copy_peak_increase_mib": max(r["peak_increase_mib"] for r in copies),
        "written_bytes": prunes[0]["written_bytes"], "runs": runs,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- report


def render(results: dict) -> str:
    meta = results["meta"]
    busy = (
        f" **The machine was busy (1-minute load average {meta['load_average_before'][0]:.1f} when the run started, "
        f"{meta['load_average_after'][0]:.1f} at its end): wall-clock times are pessimistic; the CPU times less so.**"
        if max(meta["load_average_before"][0], meta["load_average_after"][0]) > 1.0
        else ""
    )
    lines = [
        f"`{meta['command']}` on {meta['date']}, {meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, prunespec {meta['prunespec']}. The run took "
        f"{meta['duration_s'] / 60:.1f} minutes.{busy}",
        "",
    ]
    plan = results.get("planning")
    if plan:
        lines += [
            "**Planning** on `meta`, 30% of every layer's MLP channels and a quarter of its key/value groups at "
            f"random; medians of {meta['repeats']} runs, each in a fresh process:",
            "",
            "| shape | layers | parameters | asked for | plan (s) | CPU (s) | per layer (ms CPU) | peak RSS (GiB) | "
            "before planning (GiB) | spec (MB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in plan["cases"]:
            lines.append(
                f"| Llama {c['shape']} | {c['layers']} | {c['parameters'][0] / 1e9:.1f}B | "
                f"{c['requested_channels']:,} channels, {c['requested_kv_heads']} groups | {c['seconds']:.2f} | "
                f"{c['cpu_seconds']:.2f} | {c['cpu_seconds'] / c['layers'] * 1e3:.0f} | "
                f"{c['peak_rss_mib'] / 1024:.2f} | {c['rss_before_mib'] / 1024:.2f} | {c['spec_bytes'] / 1e6:.1f} |"
            )
        lines += ["", "**Spec size** (bytes of the file, gzipped, and per MLP channel removed):", "",
                  "| pattern | model | spec bytes | gzipped | bytes per MLP channel |", "|---|---|---:|---:|---:|"]
        names = {"random": "random (above)", "contiguous": "contiguous: the last 30% of each layer",
                 "random-weights": "random, on the model with weights", "l2": "`l2` (select, output side)"}  # fmt: skip
        for c in plan["sizes"]:
            per = c["spec_bytes"] / max(1, c["requested_channels"])
            model = f"Llama {c['shape']}, {c['layers']} layers"
            lines.append(f"| {names[c['pattern']]} | {model} | {c['spec_bytes']:,} | "
                         f"{c['spec_gzip_bytes']:,} | {per:.1f} |")  # fmt: skip
        d = plan["diff"]
        lines += ["", f"Drawing layer {CHANGED_LAYER}'s MLP channels anew changes "
                      f"{', '.join(d['changed_layers'] or []) or 'no layer'} by `prunespec diff`, and "
                      f"{d['changed_lines']} of the file's {d['file_lines']} lines, in {d['hunks']} hunks of a line "
                      "diff (`difflib`)."]  # fmt: skip
    stream = results.get("streaming")
    if stream:
        lines += [
            "",
            "**Streaming a checkpoint** (`prune_folder` against a plain copy of the same files; medians of "
            f"{meta['stream_repeats']} runs in turn, each in a fresh process):",
            "",
            "| checkpoint | largest tensor | copy (MB/s) | prune (MB/s) | prune / copy | CPU, copy / prune (s/GB) | "
            "peak over baseline | 2x largest + 300 MB | written |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in stream:
            limit = (2 * s["largest_tensor_bytes"] + 300e6) / 2**20
            lines.append(
                f"| {s['layers']} layers, {s['checkpoint_bytes'] / 1e9:.1f} GB | "
                f"{s['largest_tensor_bytes'] / 2**20:.0f} MiB | {s['copy_mb_per_s']:.0f} | {s['prune_mb_per_s']:.0f} | "
                f"{s['ratio']:.2f} ({min(s['ratios']):.2f}-{max(s['ratios']):.2f}) | "
                f"{_cpu_per_gb(s, 'copy')} / {_cpu_per_gb(s, 'prune')} | "
                f"{s['prune_peak_increase_mib']:.0f} MiB | {limit:.0f} MiB | {s['written_bytes'] / 1e9:.2f} GB |"
            )
    return "\n".join(lines) + "\n"


def _cpu_per_gb(stream: dict, what: str) -> str:
    """The median CPU seconds (user and system) of the copies or prunings per GB of checkpoint, where the runs
    recorded them (the kernel's work for a copy counts as system time)."""
    cpu = [r["cpu_seconds"] for r in stream["runs"] if r["what"] == what and "cpu_seconds" in r]
    return f"{statistics.median(cpu) / (stream['checkpoint_bytes'] / 1e9):.2f}" if cpu else "-"


def machine() -> dict:
    import torch
    import transformers

    import prunespec

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "prunespec": prunespec.__version__}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each planning case (medians)")
    parser.add_argument("--stream-repeats", type=int, default=3, help="copies and prunings of each checkpoint")
    parser.add_argument("--skip-plan", action="store_true", help="leave out planning and spec sizes")
    parser.add_argument("--skip-stream", action="store_true", help="leave out streaming checkpoints")
    parser.add_argument("--dir", type=Path, help="where to write specs and folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "llm_scale.json")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/performance.md alone")
    parser.add_argument("--render", type=Path, metavar="JSON", help="print (and put in the docs) a stored run's tables")
    parser.add_argument("--plan-case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        text = render(json.loads(args.render.read_text()))
        print(text)
        if not args.no_docs:
            from report import DOCS_PAGE, update_docs

            update_docs(DOCS_PAGE, text, "llm-scale")
        return
    if args.plan_case:
        shape, layers, pattern, spec_path, *changed = args.plan_case
        print(json.dumps(plan_case(shape, int(layers), pattern, spec_path, int(changed[0]) if changed else None)))
        return

    started = time.perf_counter()
    results: dict = {"meta": {
        "command": "python benchmarks/llm_scale.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_before": os.getloadavg(), "repeats": args.repeats, "stream_repeats": args.stream_repeats,
        **machine(),
    }}  # fmt: skip
    work = args.dir or Path(tempfile.mkdtemp(prefix="prunespec-llm-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_plan:
            results["planning"] = planning(work, args.repeats)
        if not args.skip_stream:
            results["streaming"] = [stream_case(work, layers, args.stream_repeats) for layers in STREAM_LAYERS]
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    results["meta"]["duration_s"] = time.perf_counter() - started
    results["meta"]["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    text = render(results)
    print(text)
    if not args.no_docs:
        from report import DOCS_PAGE, update_docs

        update_docs(DOCS_PAGE, text, "llm-scale")


if __name__ == "__main__":
    main()
