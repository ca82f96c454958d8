"""Prune safetensors checkpoints directly, tensor by tensor, without building the model.

Start with `prune_checkpoint` (one file to one file); `folder.prune_folder` does the same for a model folder of
sharded files with the pieces here. `read_header` reads a file's header and checks every entry against the file;
`PlannedTensor` is one tensor to write (where it is stored, which indices it keeps); `write_safetensors` writes a
header and then streams the tensors one at a time: read one, keep its indices, write its bytes, let it go.

Each tensor is read through a memory map of its own bytes (`TensorReader`), dropped once the tensor is written,
rather than a map of the whole file (whose pages would stay resident until it is closed); its pruned copy is
gathered into reused buffers and written straight from their memory. So memory holds about one tensor and its pruned
copy at a time, never the whole checkpoint, and no byte is copied that need not be: a tensor the spec leaves whole,
or cut to its first rows, is copied file to file by the kernel (`os.copy_file_range`, where the system has it).
Gathers go through `numpy.take` where numpy is installed (about three times quicker than `torch.index_select` along
an inner axis), else through `torch.index_select`; both give the same bytes. Each tensor keeps the dtype it is stored
in. Outputs are written beside the target and renamed at the end.

The safetensors layout: an 8-byte little-endian header length, a JSON header mapping each name to its dtype,
shape and ``[start, end)`` byte offsets into the data that follows (and an optional ``__metadata__`` entry).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from prunespec.applier.blocks import renamed_key
from prunespec.applier.neighbours import check_neighbours, kept_in
from prunespec.applier.validate import Kept, compare_fingerprints, decode_kept
from prunespec.errors import SpecError
from prunespec.schemas import PruningSpec, atomic_path

# safetensors' dtype codes and the torch dtypes they stand for.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
MAX_HEADER = 100 * 2**20  # a header this large is not a checkpoint's
# Integer dtypes of each item size: a gather moves bytes, and numpy has no bfloat16.
_SAME_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

try:
    import numpy as _numpy
except ImportError:  # numpy is optional: torch.index_select does the same, more slowly
    _numpy = None


@dataclass
class StoredTensor:
    """One tensor of a safetensors file: what it holds, and where its bytes are (``[start, end)`` in the file)."""

    path: Path
    dtype: torch.dtype
    shape: list[int]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        """Its dtype and shape as a fingerprint writes them, e.g. ``'bfloat16[64,3]'``."""
        return f"{str(self.dtype).removeprefix('torch.')}[{','.join(map(str, self.shape))}]"


@dataclass
class PlannedTensor:
    """One tensor to write: stored where, under which name, keeping which indices of each axis (None: all)."""

    name: str
    stored: StoredTensor
    kept: list[Kept | None]

    @property
    def shape(self) -> list[int]:
        return [len(k.indices) if k is not None else n for k, n in zip(self.kept, self.stored.shape)]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.stored.dtype.itemsize

    def stored_bytes(self) -> tuple[int, int] | None:
        """Where in its file the pruned tensor's bytes lie as they are, ``(start, end)``: when the spec keeps it
        whole, or keeps a run of its first axis and every other axis whole; None when it must be gathered."""
        shape = self.stored.shape
        cut = [(axis, k) for axis, k in enumerate(self.kept) if k is not None and not k.is_identity(shape[axis])]
        if not cut:
            return self.stored.start, self.stored.end
        axis, kept = cut[0]
        if len(cut) > 1 or axis != 0 or kept.start is None:
            return None
        row = math.prod(shape[1:]) * self.stored.dtype.itemsize
        start = self.stored.start + kept.start * row
        return start, start + len(kept.indices) * row


def prune_checkpoint(spec: PruningSpec, source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Write the pruned version of the safetensors checkpoint `source` to `target`.

    Raises `SpecError` (and writes nothing) when `source` is not a safetensors file or not the checkpoint the spec
    was planned for. The result equals ``prune(model, spec).state_dict()`` for a model holding `source`'s weights,
    each tensor in the dtype it is stored in: the keys of dropped blocks go, those of the blocks after a removed one
    move up. A tensor that modules share (`PruningSpec.tied`) may be stored under one of its names only, and stays so.
    """
    stored, _ = read_header(source)
    actual = {name: tensor.describe() for name, tensor in stored.items()}
    problems = compare_fingerprints(actual, spec.fingerprint, spec.model, "the checkpoint", tied=spec.tied)
    if problems:
        raise SpecError(f"{source}: {problems[0]}")
    check_neighbours(spec, kept_in(spec))  # no model to build, but its layers must fit together all the same
    planned = [
        PlannedTensor(new, tensor, kept_axes(spec, name, tensor.shape))
        for name, tensor in stored.items()
        if (new := renamed_key(spec, name)) is not None
    ]
    with TensorReader() as reader, atomic_path(target) as tmp:
        write_safetensors(tmp, planned, reader)


def read_header(path: str | os.PathLike) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors of a safetensors file by name, in the order of their data, and the header's ``__metadata__``.

    Raises `SpecError` naming the file when it is not a safetensors file, an entry does not fit it, or the file is
    cut short.
    """
    path = Path(path)
    try:
        with open(path, "rb") as reader:
            size = os.fstat(reader.fileno()).st_size
            length = int.from_bytes(reader.read(8), "little")
            if 2 <= length <= MAX_HEADER and length > size - 8:
                raise SpecError(f"{path}: the file is truncated: it ends inside its header")
            if not 2 <= length <= min(MAX_HEADER, size - 8):
                raise SpecError(f"{path}: not a safetensors file (its first 8 bytes give a header of {length} bytes)")
            header = reader.read(length)
    except OSError as e:
        raise SpecError(f"{path}: cannot read it: {e.strerror or e}") from None
    try:
        raw = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SpecError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = raw.pop("__metadata__", None)
    data_start = 8 + length
    entries = {}
    for name, info in raw.items():
        try:
            dtype, shape, (start, end) = _DTYPES[info["dtype"]], [int(n) for n in info["shape"]], info["data_offsets"]
            fits = (
                type(start) is int and type(end) is int  # JSON numbers with a fraction would pass the comparisons
                and 0 <= start <= end
                and end - start == math.prod(shape) * dtype.itemsize
            )
        except (KeyError, TypeError, ValueError):
            fits = False
        if not fits:
            raise SpecError(f"{path}: tensor {name!r}: its header entry is not a valid safetensors entry")
        entries[name] = StoredTensor(path, dtype, shape, data_start + start, data_start + end)
    last = max(entries.values(), key=lambda t: t.end, default=None)
    if last is not None and last.end > size:
        name = next(n for n, t in entries.items() if t is last)
        raise SpecError(
            f"{path}: the file is truncated: tensor {name!r} ends at byte {last.end} but the file has {size}"
        )
    if not isinstance(metadata, dict):
        metadata = {"format": "pt"}
    return dict(sorted(entries.items(), key=lambda item: item[1].start)), metadata


def kept_axes(spec: PruningSpec, name: str, shape: list[int]) -> list[Kept | None]:
    """The kept indices of each axis of the state_dict entry `name` (None where the spec leaves an axis whole)."""
    module, _, local = name.rpartition(".")
    layer = spec.layers.get(module)
    axes = layer.tensors.get(local, []) if layer is not None else []
    where = f"layer {module!r}: tensor {local!r}"
    return [
        decode_kept(axes[axis], size, f"{where} axis {axis}") if axis < len(axes) and axes[axis] is not None else None
        for axis, size in enumerate(shape)
    ]


class TensorReader:
    """Reads stored tensors one at a time, and makes their pruned copies, in memory reused from one to the next.

    A tensor is read through a memory map of its bytes alone (`read`), which lives as long as the tensor read (or a
    view of it) does. Its pruned copy is gathered into two buffers, which grow to the largest copy (and the largest
    step on the way, when several axes are gathered). Fresh memory for each copy would let the C allocator keep the
    freed blocks of every size it has seen: measured on a 1.1B-parameter Llama, resident memory grew by 1.3 GB over
    the run that way, against a largest tensor of 125 MiB. The files it reads from stay open until it is closed (use
    it as a context manager).
    """

    def __init__(self) -> None:
        self._copies = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self._files: dict[Path, BinaryIO] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        for file in self._files.values():
            file.close()

    def read(self, tensor: StoredTensor) -> torch.Tensor:
        """The tensor, mapped from its file: valid as long as it is kept (writes to it would stay in memory)."""
        length = tensor.end - tensor.start
        if not length:
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        file = self._file(tensor)
        if os.fstat(file.fileno()).st_size < tensor.end:  # reading a mapped page past the end would kill the process
            raise SpecError(f"{tensor.path}: the file is truncated: it ends inside a tensor")
        offset = tensor.start - tensor.start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(file.fileno(), tensor.end - offset, access=mmap.ACCESS_COPY, offset=offset)
        # The tensor holds the map, which is unmapped when the tensor and its views are gone.
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=length, offset=tensor.start - offset)
        return flat.view(tensor.dtype).reshape(tensor.shape)

    def read_pruned(self, tensor: PlannedTensor) -> torch.Tensor:
        """The tensor with only its kept entries, contiguous, in the reader's buffers: valid until the next read.

        The same values as `validate.select_kept`: slices first, then one gather per axis that needs one.
        """
        selected = self.read(tensor.stored)
        shape = selected.shape
        changed = [(axis, k) for axis, k in enumerate(tensor.kept) if k is not None and not k.is_identity(shape[axis])]
        for axis, kept in changed:
            if kept.start is not None:
                selected = selected.narrow(axis, kept.start, len(kept.indices))
        step = 0
        for axis, kept in changed:
            if kept.start is None:
                shape = [*selected.shape[:axis], len(kept.indices), *selected.shape[axis + 1 :]]
                out = self._copy(step % 2, shape, selected.dtype)
                selected = _take(selected, axis, kept, out)
                step += 1
        if not selected.is_contiguous():  # slices only, or a slice after the last gather
            selected = self._copy(step % 2, list(selected.shape), selected.dtype).copy_(selected)
        return selected

    def read_new(self, tensor: StoredTensor) -> torch.Tensor:
        """The tensor, in memory of its own."""
        result = torch.empty(tensor.shape, dtype=tensor.dtype)
        buffer = tensor_bytes(result)
        file = self._file(tensor)
        file.seek(tensor.start)
        if file.readinto(buffer) != len(buffer):
            raise SpecError(f"{tensor.path}: the file is truncated: it ends inside a tensor")
        return result

    def copy_bytes(self, stored: StoredTensor, start: int, end: int, out: BinaryIO) -> bool:
        """Copy bytes ``[start, end)`` of `stored`'s file to the end of `out` inside the kernel, without reading
        them into memory; False (nothing copied) where the system cannot (no `os.copy_file_range`, another file
        system)."""
        copy = getattr(os, "copy_file_range", None)
        if copy is None:
            return False
        source, position = self._file(stored).fileno(), out.tell()
        out.flush()
        done = 0
        try:
            while done < end - start:
                n = copy(source, out.fileno(), end - start - done, start + done)
                if n == 0:
                    raise SpecError(f"{stored.path}: the file is truncated: it ends inside a tensor")
                done += n
        except OSError as e:
            if done or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            return False
        out.seek(position + done)
        return True

    def _file(self, tensor: StoredTensor) -> BinaryIO:
        file = self._files.get(tensor.path)
        if file is None:
            file = self._files[tensor.path] = open(tensor.path, "rb")
        return file

    def _copy(self, which: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Buffer `which` as an empty tensor of `shape` and `dtype`, grown first if it is too small."""
        size = math.prod(shape) * dtype.itemsize
        if self._copies[which].numel() < size:
            self._copies[which] = torch.empty(0, dtype=torch.uint8)  # let the old one go first
            self._copies[which] = torch.empty(size, dtype=torch.uint8)
        return self._copies[which][:size].view(dtype).view(shape)


def _take(source: torch.Tensor, axis: int, kept: Kept, out: torch.Tensor) -> torch.Tensor:
    """``torch.index_select(source, axis, kept indices, out=out)``, through numpy where it is installed."""
    if _numpy is None or not source.numel():
        return torch.index_select(source, axis, kept.gather_indices(source.device), out=out)
    as_int = _SAME_SIZE[source.dtype.itemsize]
    # The indices were checked against the axis when they were decoded: "wrap" skips checking them again (and
    # numpy's buffered "raise" path is slower).
    _numpy.take(source.view(as_int).numpy(), kept.indices.numpy(), axis=axis, out=out.view(as_int).numpy(), mode="wrap")
    return out


def write_safetensors(
    path: Path, tensors: list[PlannedTensor], reader: TensorReader, metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors`, pruned, to the safetensors file `path`, reading each from where it is stored."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        code = _CODES[tensor.stored.dtype]
        header[tensor.name] = {"dtype": code, "shape": tensor.shape, "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writers do
    with open(path, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for tensor in tensors:
            stored = tensor.stored_bytes()
            if stored is None or not reader.copy_bytes(tensor.stored, *stored, out):
                _write(out, reader.read_pruned(tensor))  # before the next read reuses the reader's buffers


def _write(out: BinaryIO, tensor: torch.Tensor) -> None:
    out.write(tensor_bytes(tensor))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor as bytes, without copying it; the view keeps the tensor alive.

    >>> bytes(tensor_bytes(torch.tensor([1, 2], dtype=torch.int16)))
    b'\\x01\\x00\\x02\\x00'
    """
    size = tensor.numel() * tensor.element_size()
    if not size:
        return memoryview(bytearray())
    memory = (ctypes.c_char * size).from_address(tensor.data_ptr())
    memory.owner = tensor  # the view holds `memory`, which holds the tensor
    return memoryview(memory).cast("B")
