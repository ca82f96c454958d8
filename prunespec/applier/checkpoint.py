"""Prune a checkpoint file directly, tensor by tensor, without building the model.

Start with `prune_checkpoint`. It reads the safetensors header, checks it against the spec's fingerprint, works out
every pruned shape, writes the new header, then streams the tensors one at a time: read one, keep its indices,
write its bytes, let it go. Tensors are read with plain file reads rather than a memory map of the whole file
(whose pages would stay resident until it is closed), so memory holds about one tensor and its pruned copy at a
time, never the whole checkpoint. The output is written beside the target and renamed at the end.

The safetensors layout: an 8-byte little-endian header length, a JSON header mapping each name to its dtype,
shape and ``[start, end)`` byte offsets into the data that follows (and an optional ``__metadata__`` entry).
"""

from __future__ import annotations

import ctypes
import json
import math
import os

import torch

from prunespec.applier.validate import Kept, compare_fingerprints, decode_kept, select_kept
from prunespec.errors import SpecError
from prunespec.schemas import PruningSpec, atomic_path

# safetensors' dtype codes and the torch dtypes they stand for.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
MAX_HEADER = 100 * 2**20  # a header this large is not a checkpoint's


def prune_checkpoint(spec: PruningSpec, source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Write the pruned version of the safetensors checkpoint `source` to `target`.

    Raises `SpecError` (and writes nothing) when `source` is not a safetensors file or not the checkpoint the spec
    was planned for. The result equals ``prune(model, spec).state_dict()`` for a model holding `source`'s weights.
    """
    with open(source, "rb") as reader:
        entries, data_start = _read_header(reader, str(source))
        actual = {name: f"{str(e['dtype']).removeprefix('torch.')}[{','.join(map(str, e['shape']))}]"
                  for name, e in entries.items()}  # fmt: skip
        problems = compare_fingerprints(actual, spec.fingerprint, spec.model, "the checkpoint")
        if problems:
            raise SpecError(f"{source}: {problems[0]}")
        kept = {name: _kept(spec, name, e["shape"]) for name, e in entries.items()}

        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, entry in entries.items():
            shape = [len(k.indices) if k is not None else n for k, n in zip(kept[name], entry["shape"])]
            size = math.prod(shape) * entry["dtype"].itemsize
            header[name] = {"dtype": _CODES[entry["dtype"]], "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writers do

        # One buffer, reused for every tensor read, so freed reads do not pile up in the allocator.
        scratch = bytearray(max((e["end"] - e["start"] for e in entries.values()), default=0))
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            for name, entry in entries.items():
                # Written before the next read reuses `scratch`, which an unpruned tensor still points into.
                tensor = select_kept(_read_tensor(reader, data_start, entry, scratch), kept[name]).contiguous()
                out.write(ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size()))


def _read_header(reader, source: str) -> tuple[dict[str, dict], int]:
    """The tensors of a safetensors file by name (dtype, shape, byte offsets), and where their data starts."""
    size = os.fstat(reader.fileno()).st_size
    length = int.from_bytes(reader.read(8), "little")
    if not 2 <= length <= min(MAX_HEADER, size - 8):
        raise SpecError(f"{source}: not a safetensors file (its first 8 bytes give a header of {length} bytes)")
    try:
        raw = json.loads(reader.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SpecError(f"{source}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: not a safetensors file (its header is not a JSON object)")
    entries = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = _DTYPES[info["dtype"]], [int(n) for n in info["shape"]], info["data_offsets"]
            fits = (
                type(start) is int and type(end) is int  # JSON numbers with a fraction would pass the comparisons
                and 0 <= start <= end <= size - 8 - length
                and end - start == math.prod(shape) * dtype.itemsize
            )
        except (KeyError, TypeError, ValueError):
            fits = False
        if not fits:
            raise SpecError(f"{source}: tensor {name!r}: its header entry is not a valid safetensors entry")
        entries[name] = {"dtype": dtype, "shape": shape, "start": start, "end": end}
    return entries, 8 + length


def _read_tensor(reader, data_start: int, entry: dict, scratch: bytearray) -> torch.Tensor:
    """One tensor, read from the file into the start of `scratch` (which it then shares)."""
    buffer = memoryview(scratch)[: entry["end"] - entry["start"]]
    reader.seek(data_start + entry["start"])
    if reader.readinto(buffer) != len(buffer):
        raise SpecError(f"{reader.name}: the file ends inside a tensor")
    if not buffer:
        return torch.empty(entry["shape"], dtype=entry["dtype"])
    return torch.frombuffer(buffer, dtype=entry["dtype"]).reshape(entry["shape"])

def _kept(spec: PruningSpec, name: str, shape: list[int]) -> list[Kept | None]:
    """The kept indices of each axis of the state_dict entry `name` (None where the spec leaves an axis whole)."""
    module, _, local = name.rpartition(".")
    layer = spec.layers.get(module)
    axes = layer.tensors.get(local, []) if layer is not None else []
    where = f"layer {module!r}: tensor {local!r}"
    return [
        decode_kept(axes[axis], size, f"{where} axis {axis}") if axis < len(axes) and axes[axis] is not None else None
        for axis, size in enumerate(shape)
    ]
