"""Peak memory and throughput of `prunespec.prune_folder` on a synthetic multi-gigabyte sharded Llama checkpoint.

    python benchmarks/folder_memory.py                       # TinyLlama's shape: 1.1B parameters, 2.2 GB in bf16
    python benchmarks/folder_memory.py --layers 44 --keep    # twice as deep; keep the folders in --dir

Start at `main`. It builds a Llama configuration on the `meta` device (no weights), plans on it (heads, key/value
groups, MLP channels, a quarter of the hidden width through the norms, and one block dropped), and writes the
unpruned folder: config.json and safetensors shards of random bfloat16 tensors, written one tensor at a time. Then,
each in a fresh process (`measure`), `--repeats` times in turn: a plain copy of the folder's files
(`shutil.copyfile`) and the pruning (`prune_folder`), so that both see the files in the page cache alike and a slow
spell of the disk (shared with other machines, on a virtual machine) hits both.

Each measurement reports the seconds the work took (and the CPU seconds, user and system, of the process: on a busy
machine the work waits for a core, and the more so the more CPU it needs), the seconds `os.sync()` took after it
(writing the dirty pages to the disk: the work itself writes into the page cache), and the peak resident memory
over the process as it stood before the work: Linux's high-water mark (VmHWM), reset first by writing 5 to
/proc/self/clear_refs (see `peak_memory.py`). `ru_maxrss` is printed too. The page cache is not resident memory of
the process, so the peak is what the process itself holds: for `prune_folder`, the mapped pages of the tensor it
prunes and its pruned copy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peak_memory import high_water_mib, reset_peak

SHARD_BYTES = 500 * 10**6


def make(folder: Path, layers: int) -> tuple[int, int]:
    """Write the unpruned folder and its spec (`folder`/spec.json); return (checkpoint bytes, largest tensor bytes)."""
    import torch
    import transformers

    import prunespec
    from prunespec.applier.checkpoint import tensor_bytes

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048, dtype="bfloat16",
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randperm(2048, generator=generator)[:512].tolist()
    kept = [i for i in range(layers) if i != layers // 2]  # the middle block goes
    start = time.perf_counter()
    spec = prunespec.plan(
        model, [torch.zeros(1, 8, dtype=torch.long, device="meta")],
        pruned_outputs=[("model.embed_tokens.weight", c) for c in hidden]
        + [(f"model.layers.{i}.mlp.up_proj.weight", c) for i in kept for c in range(i % 4, 5632, 4)],
        pruned_heads=[(f"model.layers.{i}.self_attn", h) for i in kept if i % 2 for h in (0, 9, 18, 27)],
        pruned_kv_heads=[(f"model.layers.{i}.self_attn", 1) for i in kept if not i % 2],
        pruned_blocks=[f"model.layers.{layers // 2}"], through_norms=True,
    )  # fmt: skip
    print(f"planned on meta in {time.perf_counter() - start:.1f} s: {spec.summary.parameters_before:,} -> "
          f"{spec.summary.parameters_after:,} parameters", flush=True)  # fmt: skip

    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    spec.save(folder.parent / "spec.json")
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            nbytes = shapes[name].numel() * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(folder / file, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little") + encoded)
            for name in names:  # one tensor in memory at a time
                out.write(tensor_bytes(torch.randn(shapes[name], generator=generator, dtype=torch.bfloat16)))
    total = sum(shape.numel() * 2 for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total, max(shape.numel() * 2 for shape in shapes.values())


def measure(what: str, source: Path, target: Path, spec_path: Path) -> dict:
    """Run one job in this process and return its figures (called in a fresh process by `main`)."""
    import prunespec  # imported before the baseline, as a service would have it

    spec = prunespec.load_spec(spec_path)
    reset = reset_peak()
    baseline = high_water_mib()
    start, cpu = time.perf_counter(), time.process_time()
    if what == "prune":
        prunespec.prune_folder(spec, source, target)
    else:
        target.mkdir()
        for path in source.iterdir():
            shutil.copyfile(path, target / path.name)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak = high_water_mib()
    start = time.perf_counter()
    os.sync()
    return {"what": what, "seconds": seconds, "cpu_seconds": cpu_seconds, "sync_seconds": time.perf_counter() - start,
            "peak_mib": peak, "peak_increase_mib": peak - baseline, "baseline_mib": baseline, "peak_reset": reset,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "written_bytes": sum(p.stat().st_size for p in target.rglob("*") if p.is_file())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="Llama blocks (22: TinyLlama, 1.1B parameters)")
    parser.add_argument("--dir", type=Path, help="where to write the folders (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the folders")
    parser.add_argument("--repeats", type=int, default=2, help="copies and prunings, in turn")
    parser.add_argument("--measure", nargs=4, metavar=("WHAT", "SOURCE", "TARGET", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        what, source, target, spec = args.measure
        print(json.dumps(measure(what, Path(source), Path(target), Path(spec))))
        return

    work = args.dir or Path(tempfile.mkdtemp(prefix="prunespec-folder-bench-"))
    try:
        checkpoint, largest = make(work / "unpruned", args.layers)
        os.sync()
        print(f"checkpoint: {checkpoint / 1e9:.2f} GB in {len(list((work / 'unpruned').glob('*.safetensors')))} "
              f"shards; largest tensor {largest / 2**20:.0f} MiB", flush=True)  # fmt: skip
        results = []
        for what, target in [(what, f"{what}{i}") for i in range(args.repeats) for what in ("copy", "prune")]:
            done = subprocess.run(
                [sys.executable, __file__, "--measure", what, work / "unpruned", work / target, work / "spec.json"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            result = json.loads(done.stdout.splitlines()[-1])
            results.append(result)
            rate = checkpoint / result["seconds"] / 1e6
            sync = result["sync_seconds"]
            print(f"{what:6s} {result['seconds']:6.2f} s ({rate:4.0f} MB/s read), sync {sync:5.2f} s; "
                  f"peak RSS {result['peak_mib']:6.0f} MiB, {result['peak_increase_mib']:6.0f} MiB over the "
                  f"{result['baseline_mib']:.0f} MiB before (ru_maxrss {result['ru_maxrss_mib']:.0f} MiB); "
                  f"wrote {result['written_bytes'] / 1e9:.2f} GB", flush=True)  # fmt: skip
        print(json.dumps({"checkpoint_bytes": checkpoint, "largest_tensor_bytes": largest, "runs": results}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
