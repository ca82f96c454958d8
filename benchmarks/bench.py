"""Performance benchmark of prunespec against its peers (upscale, torch_pruning); `make bench` runs it.

    python benchmarks/bench.py                      # everything (25-45 minutes on two cores)
    python benchmarks/bench.py --quick              # a small subset, a few minutes
    python benchmarks/bench.py --models resnet18 --skip-scaling --skip-memory --no-docs

Start at `main`, which runs the sections in order and writes `out/bench.json`, prints the tables, and rewrites
the CPU tables of docs/performance.md between `<!-- bench:start -->` and `<!-- bench:end -->`:

1. `planning`: `prunespec.plan` vs upscale's `PruningManager.compute` vs torch_pruning's `build_dependency`, and the
   peak memory of each in a fresh process (`peak_memory.py`).
2. `applying`: `load_spec` + `prune` on a copy of the model vs upscale's `compute` + `prune` (it must trace again).
3. `latency`: the dense model against the models pruned by prunespec and by upscale (reordered and not), with
   MACs from one hook-based counter (`common.count_macs`) and the realized speedup efficiency; on CPU, and on CUDA
   when available. Also the same request in constrained mode, the prunespec model with its batch norms folded,
   then also laid out channels-last (`to_channels_last`), and for `--compile-models` compiled by inductor with
   freezing (`compiled`); each against the dense model as it is and prepared the same way, for the unconstrained
   and the constrained models. Also a `torch.export`ed program of the prunespec model, and max |pruned - mock|.
4. `mark`: resnet50's efficiency at 30% random, batch 1, over several round-robin blocks, to show its spread.
5. `scaling`: planning time and peak memory over model depth/width, input resolution and batch size.
6. `profile`: torch.profiler's top ops of one pruned resnet50 from prunespec and from upscale, and of its
   channels-last and compiled exports beside the dense model prepared alike.

Every number is a median over at least `--repeats` runs after warm-up (`common.time_it`); the models compared in
one latency row are timed round-robin (`common.time_together`), so a slow spell hits them alike. Every comparison
is with a peer measured in the same run, and a peer that crashes on a model leaves its error string in the table.
Tables are rendered by `report.py`.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import report
import torch
from common import guarded, time_it

import prunespec

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0", "convnext_tiny"]
BATCH32_MODELS = ["resnet50", "mobilenet_v2"]  # batch 32 on every pattern; a forward takes seconds on two cores
COMPILE_MODELS = ["resnet50"]  # also compiled with inductor: each compile takes about a minute on two cores
SCALING_MODELS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "densenet121", "densenet161", "densenet169", "densenet201",
]  # fmt: skip
RESOLUTIONS = [112, 224, 448, 896]
BATCHES = [1, 8, 32]
PROFILE_MODEL = "resnet50"
MARK_MODEL = "resnet50"  # the `mark` section times its efficiency at 30% random, batch 1, over several blocks
QUICK = {
    "models": ["resnet18", "mobilenet_v2"],
    "batch32_models": [],
    "compile_models": [],
    "batch32_main_models": [],
    "fractions": [0.3],
    "scaling_models": ["resnet18", "resnet34"],
    "resolutions": [112, 224],
    "batches": [1, 8],
}
# Patterns chosen by an importance criterion, timed beside the random ones at the main fraction: `prunespec.select`
# with these options on the input side (its default leaves out the layers reading the image or writing the logits).
PATTERNS = {"l2": {"criterion": "l2"}, "l2/8": {"criterion": "l2", "round_to": 8}}
QUIET_LOAD = 0.5  # a 1-minute load average above this when the run starts marks the machine as busy
SLOW_AFTER = 30.0  # seconds: a single run this slow is reported as a single run rather than repeated


class Bench:
    """Holds the options and caches models and requests between sections."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.peers = common.peers()
        self._sizes: dict[str, list[tuple[str, int]]] = {}

    def log(self, *what) -> None:
        print(f"[{time.strftime('%H:%M:%S')}]", *what, file=sys.stderr, flush=True)

    def has(self, peer: str) -> bool:
        return self.peers.get(peer) is not None

    def request(
        self, name: str, model: torch.nn.Module, fraction: float, pattern: str = "random"
    ) -> list[tuple[str, int]]:
        """The (weight, input channel) pairs of a pattern: random, or chosen by a criterion (see `PATTERNS`)."""
        if pattern != "random":
            options = PATTERNS[pattern]
            return prunespec.select(
                model, common.example_input(), amount=fraction, side="input", **options
            ).pruned_inputs
        if name not in self._sizes:  # consumers do not depend on the input size
            self._sizes[name] = common.consumer_sizes(model, common.example_input(), self.args.image_channels)
        return common.random_request(self._sizes[name], fraction)

    def timed(self, fn, setup=None, **kwargs) -> dict:
        kwargs.setdefault("repeats", self.args.repeats)
        kwargs.setdefault("slow_after", SLOW_AFTER)
        return guarded(lambda: time_it(fn, setup=setup, **kwargs))

    def peak_memory(self, library: str, model: str, request, size: int = 224, batch: int = 1) -> dict:
        """Run `peak_memory.py` in a fresh process for one (library, model, input)."""
        if self.args.skip_memory:
            return {}
        if library != "prunespec" and not self.has(library):
            return {"error": "not installed"}
        path = self.workdir / f"request-{model}.json"
        path.write_text(json.dumps(request))
        command = [sys.executable, str(Path(__file__).with_name("peak_memory.py")), "--library", library,
                   "--model", model, "--size", str(size), "--batch", str(batch), "--request", str(path)]  # fmt: skip
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return {"error": "timeout (900 s)"}
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            return {"error": tail[:160]}
        return json.loads(lines[-1])

    # ------------------------------------------------------------------------------------------ 1. planning

    def planning(self) -> list[dict]:
        return [self.planning_row(name) for name in self.args.models]

    def planning_row(self, name: str) -> dict:
        self.log("planning", name)
        model = common.build_model(name)
        x = common.example_input()
        request = self.request(name, model, common.MAIN_FRACTION)

        def fresh():  # each run plans a copy, the same way for every library
            return copy.deepcopy(model)

        row = {"model": name, "requested": len(request)}
        row["prunespec"] = self.timed(lambda m: prunespec.plan(m, [x], pruned_inputs=request), fresh)
        row["upscale"] = self.peer_timed("upscale", lambda m: common.upscale_plan(m, x, request), fresh)
        row["torch_pruning"] = self.peer_timed("torch_pruning", lambda m: common.torch_pruning_plan(m, x), fresh)
        row["memory"] = {lib: self.peak_memory(lib, name, request) for lib in ("prunespec", "upscale", "torch_pruning")}
        return row

    def peer_timed(self, peer: str, fn, setup=None) -> dict:
        return self.timed(fn, setup) if self.has(peer) else {"error": "not installed"}

    # ------------------------------------------------------------------------------------------ 2. applying

    def applying(self) -> tuple[list[dict], list[dict]]:
        rows = [self.applying_row(name) for name in self.args.models]
        name = PROFILE_MODEL if PROFILE_MODEL in self.args.models else self.args.models[-1]
        return rows, profile_apply(name, common.build_model(name), self.workdir / f"{name}.prunespec.json")

    def applying_row(self, name: str) -> dict:
        self.log("applying", name)
        model = common.build_model(name)
        x = common.example_input()
        request = self.request(name, model, common.MAIN_FRACTION)
        path = self.workdir / f"{name}.prunespec.json"
        prunespec.plan(model, [x], pruned_inputs=request).save(path)
        spec = prunespec.load_spec(path)

        def fresh():  # copied before the clock starts
            return copy.deepcopy(model)

        row = {"model": name, "requested": len(request), "spec_bytes": path.stat().st_size}
        row["prunespec"] = self.timed(lambda m: prunespec.prune(m, prunespec.load_spec(path)), fresh)
        row["prunespec_load"] = self.timed(lambda: prunespec.load_spec(path))
        row["prunespec_validate"] = self.timed(lambda m: prunespec.applier.check(m, spec), fresh)
        row["upscale"] = self.peer_timed("upscale", lambda m: common.upscale_plan(m, x, request).prune(), fresh)
        return row

    # ------------------------------------------------------------------------------------------ 3. latency

    def latency(self) -> tuple[list[dict], list[dict]]:
        devices = self.args.devices
        rows, exports = [], []
        for name in self.args.models:
            model = common.build_model(name)
            x1 = common.example_input()
            dense_macs = common.count_macs(model, x1)
            runs = [(f, "random") for f in self.args.fractions if not self.args.skip_random] + [
                (common.MAIN_FRACTION, p) for p in self.args.patterns
            ]
            for fraction, pattern in runs:
                main = fraction == common.MAIN_FRACTION and pattern == "random"
                big = name in self.args.batch32_models or (main and name in self.args.batch32_main_models)
                batches = [1] + ([self.args.big_batch] if big else [])
                self.log("latency", name, f"{fraction:.0%}", pattern)
                request = self.request(name, model, fraction, pattern)
                spec = prunespec.plan(model, [x1], pruned_inputs=request)
                variants = self.pruned_variants(model, x1, spec, request, compile_=name in self.args.compile_models)
                for d in devices:
                    for b in batches:
                        # The dense model is timed again beside each pattern's pruned models, round-robin.
                        contenders = {"dense": model} | {k: v["model"] for k, v in variants.items() if "model" in v}
                        size = 224 if b == 1 else self.args.big_batch_size
                        times = self.forward_times(contenders, d, b, size)
                        row = {"model": name, "device": d, "batch": b, "size": size, "fraction": fraction,
                               "pattern": pattern,
                               "requested": len(request), "dense": times["dense"], "dense_macs": dense_macs,
                               "spec_macs": [spec.summary.macs_before, spec.summary.macs_after],
                               "compiled": name in self.args.compile_models}  # fmt: skip
                        row["variants"] = {
                            key: {k: v for k, v in info.items() if k != "model"}
                            | ({"latency": times[key]} if key in times else {})
                            for key, info in variants.items()
                        }
                        rows.append(row)
                if main and not self.args.skip_export and "model" in variants["prunespec"]:
                    exports.append({"model": name, **self.exported(variants["prunespec"]["model"], x1)})
                for info in variants.values():
                    info.pop("model", None)
        return rows, exports

    def pruned_variants(self, model, x, spec, request, compile_: bool = False) -> dict[str, dict]:
        """The prunespec model and upscale's two exports for one request, with MACs and correctness; the prunespec
        models prepared for inference beside dense models prepared the same way, compiled too when `compile_`."""
        variants: dict[str, dict] = {}
        spec_mock = prunespec.mock(model, spec)
        if compile_:
            torch._dynamo.reset()  # the previous pattern's compiled models are gone; so are their cache entries

        def build(key, make, mock=spec_mock):
            try:
                pruned = make()
                start = time.perf_counter()
                with torch.no_grad():
                    out = pruned(x)  # a compiled model compiles here, for batch 1
                first_s = time.perf_counter() - start
                diff = (out - mock(x)).abs().max().item()
                eager = getattr(pruned, "_orig_mod", pruned)  # count MACs without hooks on a compiled module
                variants[key] = {"model": pruned, "macs": common.count_macs(eager, x), "max_abs_diff_vs_mock": diff}
                if eager is not pruned:
                    variants[key]["first_call_s"] = first_s
            except Exception as e:  # noqa: BLE001
                variants[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}

        # The same request in constrained mode: more channels go, and nothing is gathered at run time.
        tight = prunespec.plan(model, [x], pruned_inputs=request, constrained=True)
        tight_mock = prunespec.mock(model, tight)
        for key, make in prepared(model, spec, tight, compile_).items():
            build(key, make, model if key.startswith("dense") else tight_mock if "constrained" in key else spec_mock)
        if self.has("upscale"):
            build("upscale", lambda: _upscale_pruned(model, x, request, reorder=True))
            build("upscale_noreorder", lambda: _upscale_pruned(model, x, request, reorder=False))
        else:
            variants["upscale"] = variants["upscale_noreorder"] = {"error": "not installed"}
        return variants

    def forward_times(
        self, models: dict[str, torch.nn.Module], device: str, batch: int, size: int = 224
    ) -> dict[str, dict]:
        """Forward latency of each model on one input, timed round-robin (`common.time_together`)."""
        x = common.example_input(size, batch).to(device)
        if device != "cpu":
            models = {key: copy.deepcopy(m).to(device) for key, m in models.items()}
        sync = torch.cuda.synchronize if device == "cuda" else None

        def forward(m):
            with torch.no_grad():
                m(x)

        rounds = max(self.args.repeats, 7) if batch == 1 else self.args.repeats
        return common.time_together(
            {key: (lambda m=m: forward(m)) for key, m in models.items()},
            rounds=rounds,
            min_time=0.05 if batch == 1 else 0.0,
            sync=sync,
        )

    def exported(self, pruned, x) -> dict:
        """Latency of the prunespec model as a `torch.export`ed program (its `.module()`), batch 1, CPU."""

        def run() -> dict:
            start = time.perf_counter()
            program = torch.export.export(pruned, (x,)).module()
            seconds = time.perf_counter() - start
            return {"export_s": seconds, **self.forward_times({"eager": pruned, "exported": program}, "cpu", 1)}

        return guarded(run)

    # ------------------------------------------------------------------------------------------ 4. mark

    def mark(self) -> dict:
        """Resnet50's efficiency at 30% random, batch 1, in `--mark-blocks` separate round-robin blocks.

        A latency row is one block, and its ratios move by a few hundredths from one run to the next; the blocks
        here show how far, for the channels-last export and its like-for-like dense peer."""
        self.log("mark", MARK_MODEL)
        model = common.build_model(MARK_MODEL)
        x = common.example_input()
        spec = prunespec.plan(model, [x], pruned_inputs=self.request(MARK_MODEL, model, common.MAIN_FRACTION))
        makers = prepared(model, spec)
        models = {"dense": model} | {
            key: makers[key]()
            for key in ("dense_channels_last", "prunespec", "prunespec_folded", "prunespec_channels_last")
        }
        blocks = [self.forward_times(models, "cpu", 1) for _ in range(self.args.mark_blocks)]
        macs = {"dense": common.count_macs(model, x), "kept": spec.summary.macs_after}
        return {"model": MARK_MODEL, "fraction": common.MAIN_FRACTION, "macs": macs, "blocks": blocks}

    # ------------------------------------------------------------------------------------------ 5. scaling

    def scaling(self) -> dict:
        out: dict[str, list] = {"models": [self.scaling_model(name) for name in self.args.scaling_models]}
        inputs = [(s, 1) for s in self.args.resolutions] + [(224, b) for b in self.args.batches if b != 1]
        out["inputs"] = [self.scaling_input("resnet50", size, batch) for size, batch in inputs]
        return out

    def scaling_model(self, name: str) -> dict:
        self.log("scaling", name)
        model = common.build_model(name)
        x = common.example_input()
        request = self.request(name, model, common.MAIN_FRACTION)
        return {
            "model": name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "consumers": len(self._sizes[name]),
            "requested": len(request),
            "prunespec": self.timed(lambda: prunespec.plan(model, [x], pruned_inputs=request)),
            "memory": {"prunespec": self.peak_memory("prunespec", name, request)},
        }

    def scaling_input(self, name: str, size: int, batch: int) -> dict:
        self.log("scaling", name, f"{batch}x3x{size}x{size}")
        model = common.build_model(name)
        request = self.request(name, model, common.MAIN_FRACTION)
        x = common.example_input(size, batch)
        row = {"model": name, "size": size, "batch": batch, "requested": len(request)}
        row["prunespec"] = self.timed(lambda: prunespec.plan(model, [x], pruned_inputs=request))
        row["memory"] = {"prunespec": self.peak_memory("prunespec", name, request, size, batch)}
        if batch == 1 and not self.args.skip_upscale_sweep:  # upscale on the resolution sweep only

            def fresh():
                return copy.deepcopy(model)

            row["upscale"] = self.peer_timed("upscale", lambda m: common.upscale_plan(m, x, request), fresh)
            row["memory"]["upscale"] = self.peak_memory("upscale", name, request, size, batch)
        return row

    # ------------------------------------------------------------------------------------------ 6. profile

    def profile(self) -> dict:
        """torch.profiler's top ops (self CPU time) of pruned resnet50, batch 1, for prunespec and upscale, and of
        the channels-last and compiled exports beside the dense model prepared alike."""
        self.log("profile", PROFILE_MODEL)
        model = common.build_model(PROFILE_MODEL)
        x = common.example_input()
        request = self.request(PROFILE_MODEL, model, common.MAIN_FRACTION)
        spec = prunespec.plan(model, [x], pruned_inputs=request)
        models = {"dense": lambda: model, "prunespec": lambda: prunespec.prune(copy.deepcopy(model), spec)}
        if self.has("upscale"):
            models["upscale"] = lambda: _upscale_pruned(model, x, request, True)
        # The exports for inference beside their like-for-like dense peers: where the lost efficiency goes.
        makers = prepared(model, spec, compile_=PROFILE_MODEL in self.args.compile_models)
        models |= {key: makers[key] for key in ("dense_channels_last", "prunespec_channels_last", "dense_compiled",
                                                 "prunespec_compiled") if key in makers}  # fmt: skip
        return {key: guarded(lambda make=make: {"ops": top_ops(make(), x)}) for key, make in models.items()}


def prepared(model, spec, tight=None, compile_: bool = False) -> dict[str, Callable[[], torch.nn.Module]]:
    """How prunespec's models are made for each latency variant (unconstrained from `spec`, constrained from
    `tight`), and the dense peers prepared alike; compiled ones with `compile_`."""
    laid_out = prunespec.to_channels_last
    made = {
        "prunespec": lambda: prunespec.prune(copy.deepcopy(model), spec),
        # Batch norms folded into the layers before them, and the dense model folded the same way for a fair peer.
        "prunespec_folded": lambda: prunespec.prune(copy.deepcopy(model), spec, fold_norms=True),
        "dense_folded": lambda: prunespec.fold_norms(copy.deepcopy(model), spec),
        # Folded, then channels-last with the costly gathers filled as zero columns (`apply --fold-norms
        # --channels-last`), and the dense model laid out the same way.
        "prunespec_channels_last": lambda: laid_out(prunespec.prune(copy.deepcopy(model), spec, fold_norms=True)),
        "dense_channels_last": lambda: laid_out(prunespec.fold_norms(copy.deepcopy(model), spec)),
    }
    if tight is not None:  # the constrained model as it is, and prepared the same ways
        made["prunespec_constrained"] = lambda: prunespec.prune(copy.deepcopy(model), tight)
        made["prunespec_constrained_channels_last"] = lambda: laid_out(
            prunespec.prune(copy.deepcopy(model), tight, fold_norms=True)
        )
    if compile_:
        # Folded, then compiled; inductor picks the memory layout itself and fuses the remaining gathers.
        made["prunespec_compiled"] = lambda: compiled(prunespec.prune(copy.deepcopy(model), spec, fold_norms=True))
        made["dense_compiled"] = lambda: compiled(prunespec.fold_norms(copy.deepcopy(model), spec))
        # The channels-last export compiled: its costly gathers are zero columns already, so inductor gets fewer
        # gathers to materialise before its convolutions (which it runs as external oneDNN kernels).
        made["prunespec_channels_last_compiled"] = lambda: compiled(
            laid_out(prunespec.prune(copy.deepcopy(model), spec, fold_norms=True))
        )
        if tight is not None:
            made["prunespec_constrained_compiled"] = lambda: compiled(
                prunespec.prune(copy.deepcopy(model), tight, fold_norms=True)
            )
    return made


def compiled(module: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` with inductor and freezing (weights become constants: prepacked, conv-bn folded), for
    inference under `torch.no_grad()`. It compiles on the first call, once per input shape: automatic dynamic
    shapes are off, so that batch 1 and batch 32 each get a static graph, as a deployment compiling for one batch
    size does."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.recompile_limit = 64  # several models of one class, each at two batch sizes
    return torch.compile(module.eval(), backend="inductor")


def _upscale_pruned(model, x, request, reorder: bool):
    pruned = copy.deepcopy(model)
    common.upscale_plan(pruned, x, request, reorder=reorder).prune()
    return pruned


def top_ops(model, x, iterations: int = 10, top: int = 12) -> list[dict]:
    """Top ops by self CPU time per forward, from torch.profiler over `iterations` forwards after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iterations):
                model(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "op": e.key,
            "self_cpu_ms": e.self_cpu_time_total / iterations / 1e3,
            "calls": e.count // iterations,
            "share": e.self_cpu_time_total / total if total else 0.0,
        }
        for e in events[:top]
    ]


def profile_apply(name: str, model, path: Path, top: int = 10) -> list[dict]:
    """cProfile of `prune(copy, load_spec(path))`: the functions with the most own time."""
    target = copy.deepcopy(model)
    profiler = cProfile.Profile()
    profiler.enable()
    prunespec.prune(target, prunespec.load_spec(path))
    profiler.disable()
    stats = pstats.Stats(profiler).sort_stats("tottime")
    rows = []
    for (filename, line, function), (_, calls, tottime, cumtime, _) in list(stats.stats.items()):
        where = f"{Path(filename).name}:{line}({function})" if line else function
        rows.append({"model": name, "function": where, "calls": calls, "tottime_ms": tottime * 1e3,
                     "cumtime_ms": cumtime * 1e3})  # fmt: skip
    return sorted(rows, key=lambda r: r["tottime_ms"], reverse=True)[:top]


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset: two models, one pattern, no batch 32")
    parser.add_argument("--models", nargs="+", help=f"models for planning, applying, latency (default: {MODELS})")
    parser.add_argument(
        "--batch32-models",
        nargs="*",
        help=f"models also timed at batch 32 on every pattern (default: {BATCH32_MODELS})",
    )
    parser.add_argument(
        "--compile-models",
        nargs="*",
        help=f"models also compiled by torch.compile (inductor, freezing), dense, pruned (default: {COMPILE_MODELS})",
    )
    parser.add_argument(
        "--batch32-main-models",
        nargs="*",
        help=f"models also timed at batch 32 on the {common.MAIN_FRACTION:.0%}% random pattern (default: all --models)",
    )
    parser.add_argument("--scaling-models", nargs="*", help="models of the scaling sweep")
    parser.add_argument("--fractions", nargs="+", type=float, help="pruned fractions (default: 0.1 0.3 0.5)")
    parser.add_argument(
        "--patterns", nargs="*", choices=sorted(PATTERNS), default=list(PATTERNS),
        help=f"criterion patterns also timed at {common.MAIN_FRACTION:.0%}% (default: all of them)",
    )  # fmt: skip
    parser.add_argument(
        "--big-batch",
        type=int,
        default=32,
        help="the batch size of the second rows of --batch32-models and --batch32-main-models (default 32)",
    )
    parser.add_argument(
        "--big-batch-size", type=int, default=224, help="the input size of the --big-batch rows (default 224)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, at least (default 5)")
    parser.add_argument(
        "--mark-blocks", type=positive, default=5, help=f"round-robin blocks of the {MARK_MODEL} mark (default 5)"
    )
    parser.add_argument("--skip-random", action="store_true", help="time the criterion patterns only")
    for section in ("planning", "apply", "latency", "mark", "scaling", "profile", "memory", "export", "upscale-sweep"):
        parser.add_argument(f"--skip-{section}", action="store_true")
    parser.add_argument(
        "--image-channels", action="store_true", help="also request channels of the model input (upscale refuses)"
    )
    parser.add_argument(
        "--devices",
        nargs="+",
        choices=["cpu", "cuda"],
        help="devices of the latency tables (default: cpu, and cuda if present)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--settle-s", type=float, default=180.0, help="wait at most this long for a quiet machine (default 180)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench.json")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the tables in docs/performance.md")
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else {}
    args.models = args.models or quick.get("models", MODELS)
    if args.batch32_models is None:
        args.batch32_models = quick.get("batch32_models", BATCH32_MODELS)
    if args.compile_models is None:
        args.compile_models = quick.get("compile_models", COMPILE_MODELS)
    if args.batch32_main_models is None:
        args.batch32_main_models = quick.get("batch32_main_models", args.models)
    args.fractions = args.fractions or quick.get("fractions", list(common.FRACTIONS))
    if args.scaling_models is None:
        args.scaling_models = quick.get("scaling_models", SCALING_MODELS)
    args.devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    args.resolutions = quick.get("resolutions", RESOLUTIONS)
    args.batches = quick.get("batches", BATCHES)
    return args


def settle(limit_s: float = 180.0) -> float:
    """Wait until the 1-minute load average falls under `QUIET_LOAD`, at most `limit_s` seconds; return the wait.

    `make bench` installs the peers first, and a minute of pip would otherwise make the run start on a machine that
    looks busy. The average decays by a factor e per minute: from 2 (two busy cores) to 0.5 in under 1.5 minutes."""
    start = time.perf_counter()
    if os.getloadavg()[0] > QUIET_LOAD:
        print(f"waiting up to {limit_s:.0f} s for the load average to fall under {QUIET_LOAD}", file=sys.stderr)
    while os.getloadavg()[0] > QUIET_LOAD and time.perf_counter() - start < limit_s:
        time.sleep(5)
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    waited_s = settle(args.settle_s)
    started = time.perf_counter()
    load_before = os.getloadavg()
    results: dict = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": common.machine(),
            "load_average_before": load_before,
            "waited_for_quiet_s": waited_s,
            # Something else was running when the benchmark started: timings are then pessimistic and noisy.
            "machine_busy": load_before[0] > QUIET_LOAD,
            "repeats": args.repeats,
            "fractions": args.fractions,
            "image_channels": args.image_channels,
        }
    }
    bench = Bench(args, Path(tempfile.mkdtemp(prefix="prunespec-bench-")))
    bench.log("machine", results["meta"]["machine"], "load", load_before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sections = [
        ("planning", args.skip_planning, lambda: {"planning": bench.planning()}),
        ("apply", args.skip_apply, lambda: dict(zip(("applying", "apply_profile"), bench.applying()))),
        ("latency", args.skip_latency, lambda: dict(zip(("latency", "export"), bench.latency()))),
        ("mark", args.skip_mark, lambda: {"mark": bench.mark()}),
        ("scaling", args.skip_scaling, lambda: {"scaling": bench.scaling()}),
        ("profile", args.skip_profile, lambda: {"profile": bench.profile()}),
    ]
    for _, skipped, run in sections:
        if not skipped:
            results.update(run())
            results["meta"]["load_average_after"] = os.getloadavg()
            results["meta"]["duration_s"] = time.perf_counter() - started
            args.out.write_text(json.dumps(results, indent=1) + "\n")  # after each section, so a stopped run keeps some
    text = report.render(results)
    print(text)
    if not args.no_docs:
        report.update_docs(report.DOCS_PAGE, text)
    bench.log(f"done in {results['meta']['duration_s'] / 60:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    main()
