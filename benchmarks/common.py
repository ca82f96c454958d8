"""Shared pieces of the benchmarks: models, pruning patterns, timing, MAC counting, and the peer libraries.

Start with `random_request` (the pruning pattern every library is given) and `time_it` (how every number is
measured: warm-up runs, then the median of repeated `time.perf_counter` runs). `count_macs` is the one MAC counter
used for every model, dense or pruned by any library, so that efficiencies are comparable. `peers` says which of
the peer libraries (`upscale`, `torch_pruning`) can be imported; a missing one is reported, never fatal.
"""

from __future__ import annotations

import importlib
import logging
import math
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torchvision
from torch import nn

SEED = 0
FRACTIONS = (0.1, 0.3, 0.5)  # probability that a consumer input channel is requested
MAIN_FRACTION = 0.3  # the pattern used where one pattern is enough (planning, applying, scaling)

warnings.filterwarnings("ignore")
logging.getLogger("pruning").setLevel(logging.ERROR)  # upscale's logger: a warning per op it cannot follow


def build_model(name: str) -> nn.Module:
    """A torchvision model without pretrained weights, seeded, in eval mode, float32."""
    torch.manual_seed(SEED)
    return getattr(torchvision.models, name)(weights=None).eval()


def example_input(size: int = 224, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(SEED))


def consumer_sizes(model: nn.Module, x: torch.Tensor, image_channels: bool = False) -> list[tuple[str, int]]:
    """(weight name, number of input channels) of every consumer, in trace order, from prunespec's tracer.

    Unless `image_channels`, consumers that read the model's input itself (the first convolution, reading RGB)
    are left out: removing an image channel is not a pruning anyone asks for, and upscale refuses it
    (`AssertionError: Invalid layer for input pruning`), which would void every comparison with a pattern that
    happens to pick one.
    """
    from prunespec.planner.trace import trace

    graph = trace(model, [x])
    sizes = list(dict.fromkeys((c.weight, len(c.slots)) for c in graph.consumers))
    if image_channels:
        return sizes
    reads_input = set()

    def hook(module, args):
        if args and args[0] is x:
            reads_input.add(module)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if hasattr(m, "weight")]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    skipped = {f"{name}.weight" for name, m in model.named_modules() if m in reads_input}
    return [(name, n) for name, n in sizes if name not in skipped]


def random_request(sizes: list[tuple[str, int]], fraction: float, seed: int = SEED) -> list[tuple[str, int]]:
    """Pick each input channel of each consumer with probability `fraction`.

    One random number is drawn per channel whatever the fraction, so with the same seed the 10% pattern is a
    subset of the 30% one, which is a subset of the 50% one.

    >>> random_request([("a.weight", 4), ("b.weight", 2)], 0.5)
    [('a.weight', 2), ('a.weight', 3), ('b.weight', 1)]
    """
    rng = random.Random(seed)
    return [(name, c) for name, n in sizes for c in range(n) if rng.random() < fraction]


# ---------------------------------------------------------------------------------------------- timing


def time_it(
    fn: Callable[[], object],
    setup: Callable[[], object] | None = None,
    repeats: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
    max_repeats: int = 50,
    sync: Callable[[], None] | None = None,
    slow_after: float = float("inf"),
) -> dict:
    """Median wall time of `fn` in ms over at least `repeats` runs after `warmup` runs.

    When `setup` is given it runs before each call outside the timed region and its result is passed to `fn`
    (used to deepcopy a model before applying a spec to it). Runs continue past `repeats` until
    `min_time` seconds of timed runs have accumulated, at most `max_repeats`. `sync` (e.g.
    `torch.cuda.synchronize`) is called before starting and before stopping the clock. When the first warm-up run
    takes longer than `slow_after` seconds, that single run is the result (`n` = 1, `single_run` set), to keep the
    whole benchmark within its time.
    """
    sync = sync or (lambda: None)

    def once() -> float:
        arg = setup() if setup is not None else None
        sync()
        start = time.perf_counter()
        fn(arg) if setup is not None else fn()
        sync()
        return time.perf_counter() - start

    for i in range(warmup):
        first = once()
        if i == 0 and first > slow_after:
            return {"median_ms": first * 1e3, "min_ms": first * 1e3, "max_ms": first * 1e3, "n": 1, "single_run": True}
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_time and len(times) < max_repeats):
        times.append(once())
    times_ms = sorted(t * 1e3 for t in times)
    return {
        "median_ms": statistics.median(times_ms),
        "min_ms": times_ms[0],
        "max_ms": times_ms[-1],
        "n": len(times_ms),
    }


def time_together(
    fns: dict[str, Callable[[], object]],
    rounds: int = 7,
    min_time: float = 0.0,
    sync: Callable[[], None] | None = None,
) -> dict[str, dict]:
    """Median wall time in ms of each of `fns`, timed round-robin: one warm-up call each, then `rounds` rounds.

    In each round every function runs once (more often while the round has taken less than `min_time` seconds
    per function), in a fixed order. A slow spell of the machine then hits every function alike, so ratios between
    them stay meaningful when absolute times drift. A function that raises gets {"error": ...} and drops out.
    """
    sync = sync or (lambda: None)
    samples: dict[str, list[float]] = {key: [] for key in fns}
    results: dict[str, dict] = {}

    def once(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def warm_up(fn) -> dict:
        once(fn)
        return {}

    for key, fn in fns.items():
        results[key] = guarded(lambda fn=fn: warm_up(fn))
    live = {key: fn for key, fn in fns.items() if "error" not in results[key]}
    for _ in range(rounds):
        for key, fn in live.items():
            spent = 0.0
            while True:
                seconds = once(fn)
                samples[key].append(seconds)
                spent += seconds
                if spent >= min_time:
                    break
    for key in live:
        times_ms = sorted(t * 1e3 for t in samples[key])
        results[key] = {
            "median_ms": statistics.median(times_ms),
            "min_ms": times_ms[0],
            "max_ms": times_ms[-1],
            "n": len(times_ms),
        }
    return results


def guarded(fn: Callable[[], dict]) -> dict:
    """Run one measurement; an exception becomes {"error": "..."} so that one crash costs one cell."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a peer crashing on a model is a result, not a bug here
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}


# ---------------------------------------------------------------------------------------------- MACs


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the convolutions and linear layers of one forward, per sample.

    Counted with forward hooks from the weight actually used, so the same counter serves the dense model and
    models pruned by any library (upscale wraps consumers in `nn.Sequential(Subselect, layer)`; the hooks still
    see the layer). Element-wise ops, norms and pooling are not counted.
    """
    total = 0

    def hook(module, args, out):
        nonlocal total
        w = module.weight
        per_output = w.shape[1] * math.prod(w.shape[2:]) if isinstance(module, nn.modules.conv._ConvNd) else w.shape[1]
        total += out.numel() * per_output

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total // x.shape[0]


# ---------------------------------------------------------------------------------------------- peers


def peers() -> dict[str, str | None]:
    """Import name -> version, or None when the library is not installed."""
    found: dict[str, str | None] = {}
    for name, dist in (("upscale", "apple-upscale"), ("torch_pruning", "torch-pruning")):
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001
            found[name] = None
            continue
        found[name] = (
            _dist_version(dist) or getattr(module, "__version__", None) or "unknown"
        )  # 1.6.1's module says 1.6.0
    return found


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def upscale_plan(model: nn.Module, x: torch.Tensor, request, reorder: bool = True):
    """upscale's planning step: trace and compute its pruning spec; returns the manager."""
    from upscale.pruning.manager import PruningManager

    kwargs = {} if reorder else {"reorder_producer": False, "reorder_consumer": False}
    return PruningManager(model).compute([x], pruned_inputs=list(request), **kwargs)


def torch_pruning_plan(model: nn.Module, x: torch.Tensor):
    """torch_pruning's planning step: build the dependency graph (it needs no request to do so)."""
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=x)


# ---------------------------------------------------------------------------------------------- machine


def machine() -> dict:
    """CPU model, core count, threads, load, and library versions."""
    import os

    import prunespec

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "prunespec": prunespec.__version__}
    versions.update({k: v or "not installed" for k, v in peers().items()})
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info
