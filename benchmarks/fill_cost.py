"""Where zero columns beat a channel gather on channels-last memory: the measurement behind `layout.fill_pays`.

    python benchmarks/fill_cost.py [--threads 2]

For consumer shapes from pruned resnet50 and mobilenet_v2 (input channels, channels read, outputs, kernel, map
size, stride), it times a channels-last convolution that reads a gather of its input (`index_select` on the
channel axis, what `InputSubselection` does) against one that reads the whole input through zero columns, and
prints the cost model's choice beside the faster of the two. The ratio column is the model's own measure
(`extra_macs_per_gathered_value`), which it compares with `FILL_MACS_PER_GATHERED_VALUE`.
"""

from __future__ import annotations

import argparse

import common
import torch
from torch import nn

from prunespec.applier.layout import FILL_MACS_PER_GATHERED_VALUE, extra_macs_per_gathered_value, fill_pays

# (input channels, channels read, output channels, kernel, map size, stride)
SHAPES = [
    (256, 179, 41, 1, 56, 1),
    (256, 179, 256, 1, 56, 1),
    (256, 230, 64, 1, 56, 1),
    (256, 179, 64, 3, 56, 1),
    (256, 179, 512, 1, 56, 2),
    (512, 358, 90, 1, 28, 1),
    (512, 358, 512, 1, 28, 1),
    (512, 358, 128, 3, 28, 1),
    (1024, 716, 180, 1, 14, 1),
    (1024, 716, 1024, 1, 14, 1),
    (1024, 716, 2048, 1, 14, 2),
    (2048, 1433, 360, 1, 7, 1),
    (24, 17, 144, 1, 56, 1),
    (96, 67, 576, 1, 14, 1),
]


def measure(channels: int, read: int, out: int, kernel: int, size: int, stride: int) -> dict:
    generator = torch.Generator().manual_seed(common.SEED)
    indices = torch.randperm(channels, generator=generator)[:read].sort().values
    x = torch.randn(1, channels, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    gathered = nn.Conv2d(read, out, kernel, stride, kernel // 2).eval().to(memory_format=torch.channels_last)
    filled = nn.Conv2d(channels, out, kernel, stride, kernel // 2).eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        times = common.time_together(
            {"gather": lambda: gathered(x.index_select(1, indices)), "fill": lambda: filled(x)},
            rounds=15,
            min_time=0.02,
        )
    return {
        "gather_ms": times["gather"]["median_ms"],
        "fill_ms": times["fill"]["median_ms"],
        "ratio": extra_macs_per_gathered_value(gathered, channels),
        "model_fills": fill_pays(gathered, channels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads; the model fills when the ratio is <= {FILL_MACS_PER_GATHERED_VALUE}")
    print("| in | read | out | kernel | map | stride | gather ms | zero columns ms | ratio | faster | model picks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        r = measure(*shape)
        faster = "zero columns" if r["fill_ms"] < r["gather_ms"] else "gather"
        picks = "zero columns" if r["model_fills"] else "gather"
        cells = [*map(str, shape), f"{r['gather_ms']:.3f}", f"{r['fill_ms']:.3f}", f"{r['ratio']:.0f}", faster, picks]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
