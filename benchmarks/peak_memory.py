"""Peak memory of one planning run, measured in a fresh process (run by `bench.py`, one process per cell).

    python benchmarks/peak_memory.py --library prunespec --model resnet50 --size 224 --batch 1 --request req.json

Start at `main`. The process imports the library (and its planner), builds the model and the input, and reads
the request (a JSON list of [weight name, channel] pairs). Then it resets the kernel's high-water mark of resident
memory to the current resident size (writing 5 to /proc/self/clear_refs, Linux 4.0 and later), reads it, plans
once, and reads it again. It prints one JSON line: the increase in MiB, i.e. the peak memory that planning needed
on top of the process as it stood after model construction, plus the baseline and the planning time.

The high-water mark is read as `VmHWM` from /proc/self/status. `getrusage(RUSAGE_SELF).ru_maxrss` reports the
same mark but also remembers the peak of the process image replaced at exec, i.e. of the parent that forked this
worker (`bench.py`, well over 1 GiB), so it would hide planning entirely; without the reset, the import and model
construction peaks would hide it too. `peak_reset` says whether the reset worked (where it did not, the increase
is over the mark left by construction and may read 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def high_water_mib() -> float:
    """VmHWM: the peak resident size of this process (since the last reset), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: the best there is


def reset_peak() -> bool:
    """Set the high-water mark (VmHWM) to the current resident size, where Linux allows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", required=True, choices=["prunespec", "upscale", "torch_pruning"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--request", type=Path, help="JSON list of [weight name, channel] pairs")
    args = parser.parse_args()

    if args.library == "prunespec":
        import prunespec
        import prunespec.planner  # `plan` imports it lazily; count the import before the baseline

        def run(model, x, request):
            prunespec.plan(model, [x], pruned_inputs=request)
    elif args.library == "upscale":
        import upscale.pruning.manager  # noqa: F401

        def run(model, x, request):
            common.upscale_plan(model, x, request)
    else:
        import torch_pruning  # noqa: F401

        def run(model, x, request):
            common.torch_pruning_plan(model, x)

    model = common.build_model(args.model)
    x = common.example_input(args.size, args.batch)
    request = [tuple(pair) for pair in json.loads(args.request.read_text())] if args.request else []
    gc.collect()
    reset = reset_peak()
    baseline = high_water_mib()
    start = time.perf_counter()
    run(model, x, request)
    seconds = time.perf_counter() - start
    peak = high_water_mib()
    print(json.dumps({"peak_increase_mib": peak - baseline, "baseline_mib": baseline, "peak_reset": reset,
                      "seconds": seconds}))  # fmt: skip


if __name__ == "__main__":
    main()
