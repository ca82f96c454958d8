"""Hugging Face model folders, file to file: `prune_folder` writes a pruned folder, `load_pruned` loads one.

Start with `prune_folder`. It reads the folder (`read_folder`: config.json, and the safetensors weights, one file or
shards with `model.safetensors.index.json`) and checks everything before it writes a byte: the shards against
their index and their own sizes, the tensors against the spec's fingerprint, the config against the spec's
`config` values before pruning. Then it writes a new folder beside the target, one tensor at a time (see
`checkpoint`): the pruned shards and their index, config.json with the values after pruning, the spec as
`prunespec.json`, and every other file copied unchanged; and renames it into place at the end.

A tensor that modules share (tied input and output embeddings) is stored once by `save_pretrained`, under one of its
names; the spec's `tied` says which names go together, so the others may be absent, and stay absent. Keys of
dropped blocks go, and the keys of the blocks after a removed one move up (`blocks.renamed_key`).

`load_pruned` builds the unpruned architecture from config.json with the spec's values before pruning, its
parameters on the `meta` device, reshapes it with `build_pruned`, and loads the shards into it. When the spec changes
only what a config can say (blocks removed: `num_hidden_layers`), the folder also loads with plain
`from_pretrained`; otherwise (layers of different widths) `load_pruned` is the way. Only `load_pruned` needs
transformers, and it imports it when called.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunespec.applier.blocks import renamed_key
from prunespec.applier.checkpoint import (
    PlannedTensor,
    StoredTensor,
    TensorReader,
    kept_axes,
    read_header,
    write_safetensors,
)
from prunespec.applier.neighbours import check_neighbours, kept_in
from prunespec.applier.prune import build_pruned
from prunespec.applier.validate import compare_fingerprints, fingerprint
from prunespec.errors import SpecError
from prunespec.schemas import PruningSpec, load_spec

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SPEC = "prunespec.json"
# Files that hold the model's weights in some form: only the pruned safetensors may go into the pruned folder.
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|onnx|gguf)(\.index\.json)?$")


@dataclass
class ModelFolder:
    """A Hugging Face model folder, read and checked: its config and its stored tensors."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, StoredTensor]
    """Every stored tensor by name, shard by shard in the data's order."""
    weight_files: list[str]
    """The files the tensors come from, with the index: relative to `path`."""
    index_metadata: dict[str, Any] = field(default_factory=dict)
    largest_shard: int = 0
    """Bytes of tensor data in the largest file of weights."""
    metadata: dict[str, str] = field(default_factory=dict)
    """The `__metadata__` of the first file of weights."""


@dataclass
class PrunedFolder:
    """What `prune_folder` wrote."""

    path: Path
    shards: list[str]
    total_size: int
    """Bytes of tensor data in the shards."""
    copied: list[str]
    """Files copied unchanged, relative to the folder."""
    left_out: list[str]
    """Files of the input not copied: weights in another form (pickles, ONNX, other safetensors), which would hold
    the unpruned model, and hidden files and folders (.git, .cache), which describe the input's files."""


def prune_folder(
    spec: PruningSpec,
    source: str | os.PathLike,
    target: str | os.PathLike,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
) -> PrunedFolder:
    """Write the pruned version of the Hugging Face model folder `source` as the folder `target`.

    The shards hold at most `max_shard_size` bytes of tensors each (an int, or a size like ``"5GB"``; by default as
    many as the input's largest file of weights, so a single-file model stays one file). Memory holds about two
    copies of the largest tensor, whatever the size of the model. `source` is never written to. Raises `SpecError`
    with one line, leaving no `target` behind, when the folder is not a model folder, its weights are damaged, the
    spec was planned for another model, `target` exists (unless `overwrite`: then it is replaced once the new folder
    is complete), or writing fails (a full disk). The new folder is written as a hidden ``.NAME.*.tmp`` beside
    `target` and renamed at the end: a process killed on the way leaves that behind, never a half-written `target`.
    """
    source, target = Path(source), Path(target)
    folder = read_folder(source)
    _check_target(source, target, overwrite)
    names = model_names(folder, spec.fingerprint, lambda: _build(folder, meta=True))
    actual = {names[name]: tensor.describe() for name, tensor in folder.tensors.items()}
    problems = compare_fingerprints(actual, spec.fingerprint, spec.model, "the checkpoint", tied=spec.tied)
    if problems:
        raise SpecError(f"{source}: {problems[0]}")
    check_neighbours(spec, kept_in(spec))  # no model is built, but its layers must fit together all the same
    config = pruned_config(folder.config, spec, source / CONFIG)
    # Stored as the input stores them: a block that moves up takes the stored name of the one it replaces.
    stored_name = {model: stored for stored, model in names.items()}
    planned = [
        PlannedTensor(stored_name.get(new, new), tensor, kept_axes(spec, names[name], tensor.shape))
        for name, tensor in folder.tensors.items()
        if (new := renamed_key(spec, names[name])) is not None
    ]
    shards = _pack(planned, _size(max_shard_size) if max_shard_size is not None else folder.largest_shard)
    files = [WEIGHTS] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in
                                                  range(1, len(shards) + 1)]  # fmt: skip
    others = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    others = [p for p in others if p not in {Path(name) for name in (*folder.weight_files, CONFIG, SPEC)}]
    left_out = [str(p) for p in others if _WEIGHT_FILE.fullmatch(p.name) or any(n.startswith(".") for n in p.parts)]
    copied = [str(p) for p in others if str(p) not in left_out]
    total = sum(tensor.nbytes for tensor in planned)
    try:
        with _folder_aside(target) as tmp, TensorReader() as reader:
            for name, shard in zip(files, shards):
                write_safetensors(tmp / name, shard, reader, folder.metadata)
            if len(shards) > 1:
                metadata = {**folder.index_metadata, "total_size": total}
                if isinstance(metadata.get("total_parameters"), int):  # less what pruning removed
                    removed = sum(t.numel for t in folder.tensors.values()) - sum(t.numel for t in planned)
                    metadata["total_parameters"] -= removed
                weight_map = {tensor.name: name for name, shard in zip(files, shards) for tensor in shard}
                _write_json(tmp / INDEX, {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})
            _write_json(tmp / CONFIG, config)
            (tmp / SPEC).write_bytes(spec.to_json() + b"\n")
            for name in copied:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, tmp / name)
    except OSError as e:
        raise SpecError(
            f"{target}: cannot write the pruned folder ({e.strerror or e}); it needs about {total} bytes of tensors, "
            "and nothing was written"
        ) from None
    return PrunedFolder(target, files, total, copied, left_out)


def read_folder(path: Path) -> ModelFolder:
    """Read a model folder's config and the headers of its weights, checking that they fit together."""
    if not path.is_dir():
        raise SpecError(f"{path}: not a folder; give a Hugging Face model folder (config.json and safetensors)")
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no {CONFIG}, so not a Hugging Face model folder") from None
    except (OSError, ValueError) as e:
        raise SpecError(f"{path / CONFIG}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise SpecError(f"{path / CONFIG}: not a JSON object")
    index_metadata: dict[str, Any] = {}
    if (path / WEIGHTS).is_file():
        files, weight_map = [WEIGHTS], None
    elif (path / INDEX).is_file():
        weight_map, index_metadata = _read_index(path / INDEX)
        files = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in files if not (path / name).is_file()]
        if missing:
            raise SpecError(f"{path / INDEX}: names {len(missing)} shard(s) that are missing, e.g. {missing[0]!r}")
    else:
        found = sorted(p.name for p in path.iterdir() if _WEIGHT_FILE.fullmatch(p.name))
        also = f" (it has {', '.join(found[:3])}: prunespec reads safetensors only)" if found else ""
        raise SpecError(f"{path}: no {WEIGHTS} or {INDEX}, so no weights to prune{also}")

    tensors: dict[str, StoredTensor] = {}
    metadata: dict[str, str] = {}
    for name in files:
        stored, file_metadata = read_header(path / name)
        metadata = metadata or file_metadata
        for key, tensor in stored.items():
            if weight_map is not None and weight_map.get(key) != name:
                where = f"in {weight_map[key]!r}" if key in weight_map else "nowhere"
                raise SpecError(f"{path / name}: holds tensor {key!r}, which {INDEX} places {where}")
            tensors[key] = tensor
    if weight_map is not None:
        absent = next((key for key in weight_map if key not in tensors), None)
        if absent is not None:
            raise SpecError(f"{path / INDEX}: places tensor {absent!r} in {weight_map[absent]!r}, which lacks it")
    sizes: dict[Path, int] = {}
    for tensor in tensors.values():
        sizes[tensor.path] = sizes.get(tensor.path, 0) + tensor.end - tensor.start
    largest = max(sizes.values(), default=0)
    return ModelFolder(path, config, tensors, files + ([INDEX] if weight_map else []), index_metadata, largest,
                       metadata)  # fmt: skip


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The weight map of a shard index (tensor name -> shard file name), and its metadata."""
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpecError(f"{path}: not readable JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SpecError(f"{path}: not a shard index (it needs a 'weight_map' of tensor names to shard files)")
    for shard in weight_map.values():
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise SpecError(f"{path}: shard {shard!r} is not a file name in the folder")
    metadata = index.get("metadata")
    return weight_map, metadata if isinstance(metadata, dict) else {}


def model_names(folder: ModelFolder, expected: Collection[str], build: Callable[[], nn.Module]) -> dict[str, str]:
    """The model's name (its state_dict key) of each stored tensor, by stored name.

    They are the same unless transformers renames a checkpoint's keys as it loads them (ViT's, since transformers
    5): then, when some stored name is not in `expected`, the model that `build` makes (on `meta`) says how, as
    transformers does when it loads. A tensor transformers converts (experts merged into one tensor) is refused.
    """
    names = {name: name for name in folder.tensors}
    if names.keys() <= set(expected):
        return names
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # no transformers, or one that loads keys as they are
        return names
    model = build()
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    for stored in folder.tensors:
        name, converted = rename_source_key(stored, renamings, converters, model.base_model_prefix, state)
        if converted is not None:
            raise SpecError(
                f"{folder.path}: tensor {stored!r} is stored in a form transformers converts when it loads it "
                f"(into {name!r}); prunespec prunes only tensors stored as the model holds them"
            )
        names[stored] = name
    if len(set(names.values())) < len(names):
        raise SpecError(f"{folder.path}: two stored tensors load into one tensor of the model")
    return names


def _build(folder: ModelFolder, meta: bool, restore: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """The model that the folder's config.json describes, with the `restore`d config values, built with its
    parameters on `meta` (and its buffers too, when `meta`), by the class its ``architectures`` names (or the
    ``model_class`` in `kwargs`)."""
    try:
        import transformers
    except ImportError:
        raise SpecError("building a model from config.json needs transformers: install it") from None
    try:
        config = transformers.AutoConfig.from_pretrained(folder.path)
    except (OSError, ValueError, KeyError) as e:
        raise SpecError(f"{folder.path / CONFIG}: transformers cannot read it ({str(e).splitlines()[0]})") from None
    for key, value in (restore or {}).items():
        if value is None:  # the key was not in the config before pruning (a head_dim worked out from sizes)
            if hasattr(config, key):
                delattr(config, key)
        else:
            setattr(config, key, value)
    model_class = kwargs.pop("model_class", None)
    if model_class is None:
        architectures = getattr(config, "architectures", None) or [None]
        model_class = getattr(transformers, str(architectures[0]), None)
        if model_class is None:
            raise SpecError(f"{folder.path / CONFIG}: architectures {architectures!r} names no transformers class")
    with torch.device("meta") if meta else parameters_on_meta():
        return model_class._from_config(config, **kwargs)


def pruned_config(config: dict[str, Any], spec: PruningSpec, where: Path) -> dict[str, Any]:
    """`config` (a config.json's contents) with the spec's `config` values after pruning.

    Raises `SpecError` unless each value is what the spec says it was before. A config may store a value under
    its own key (GPT-2's ``n_layer`` for ``num_hidden_layers``); `transformers`, when installed, says which.

    >>> from prunespec.schemas import PruningSpec, Request, Summary
    >>> spec = PruningSpec(model="Net", inputs=[], request=Request([], [], False, True),
    ...     summary=Summary(0, 0, 0, 0, 0), layers={}, fingerprint={}, config={"num_hidden_layers": (4, 3)})
    >>> pruned_config({"num_hidden_layers": 4, "vocab_size": 9}, spec, Path("config.json"))
    {'num_hidden_layers': 3, 'vocab_size': 9}
    """
    result = dict(config)
    for key, (before, after) in spec.config.items():
        stored = key if key in config else _attribute_map(config).get(key, key)
        if stored not in config and before is not None:
            raise SpecError(f"{where}: has no {key!r}, which the spec changes from {before!r} to {after!r}")
        if config.get(stored) != before:
            raise SpecError(f"{where}: {stored} is {config[stored]!r} but the spec was planned with {before!r}")
        result[stored] = after
    return result


def _attribute_map(config: dict[str, Any]) -> dict[str, str]:
    """The config class's own keys for the usual names (``num_hidden_layers`` -> ``n_layer``), if transformers says."""
    try:
        from transformers import CONFIG_MAPPING

        return dict(CONFIG_MAPPING[config.get("model_type")].attribute_map)
    except (ImportError, KeyError, AttributeError):  # no transformers, or a model type it does not know
        return {}


def _pack(tensors: list[PlannedTensor], limit: int) -> list[list[PlannedTensor]]:
    """`tensors` in order, in as few shards of at most `limit` bytes as that allows (a larger tensor goes alone)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _size(text: int | str) -> int:
    """A size in bytes, from an int or a text like ``"5GB"`` (decimal units) or ``"5GiB"`` (binary units).

    >>> _size("20KB"), _size("2GiB"), _size(1000)
    (20000, 2147483648, 1000)
    """
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]+)\s*(([KMGT])(i?))?B?\s*", str(text), re.IGNORECASE)
        if match is None:
            raise SpecError(f"max_shard_size: {text!r} is not a size like 5GB, 500MB or 2GiB")
        number, _, unit, binary = match.groups()
        size = int(number) * ((1024 if binary else 1000) ** ("KMGT".index(unit.upper()) + 1) if unit else 1)
    if size <= 0:
        raise SpecError(f"max_shard_size: {text!r} must be positive")
    return size


def _check_target(source: Path, target: Path, overwrite: bool) -> None:
    source, resolved = source.resolve(), target.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise SpecError(f"{target}: the pruned folder can be neither the input folder nor inside it, nor hold it")
    if not resolved.parent.is_dir():
        raise SpecError(f"{target}: its parent folder does not exist")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise SpecError(f"{target}: exists already; give another folder, or overwrite it")


@contextlib.contextmanager
def _folder_aside(target: Path) -> Iterator[Path]:
    """A new folder beside `target` to write in: it becomes `target` on success (replacing what was there only
    then) and is removed on failure, so `target` is either the old one or the new one, complete."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private; give it what mkdir would
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "replaced")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it
    os.umask(mask)
    return mask


def _write_json(path: Path, value: Any) -> None:
    """JSON the way transformers writes it: keys sorted, indented by 2, a final newline."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- loading


def load_pruned(folder: str | os.PathLike, dtype: torch.dtype | str | None = None, **kwargs: Any) -> nn.Module:
    """Load a model folder written by `prune_folder`: exactly the pruned model, in eval mode.

    The architecture comes from config.json's ``architectures`` (or the class given as ``model_class=``), built with
    the spec's config values before pruning and reshaped by the spec; the tensors come from the shards, each in its
    stored dtype, or every floating one in `dtype` when given (``torch_dtype`` is read as `dtype` too). Other keyword
    arguments go to the model class's ``_from_config`` (e.g. ``attn_implementation``). Nothing is unpickled and the
    planner is not imported. Raises `SpecError` with one line for a folder prunespec did not write, or whose shards,
    config and spec do not fit together.
    """
    folder = Path(folder)
    dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
    dtype = getattr(torch, dtype, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if dtype == "auto":
        dtype = None
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise SpecError(f"dtype: {dtype!r} is not a floating dtype (float32, bfloat16, ...)")
    if not (folder / SPEC).is_file():
        raise SpecError(
            f"{folder}: no {SPEC}, so not a folder written by prunespec.prune_folder (a plain model folder loads "
            "with from_pretrained)"
        )
    spec = load_spec(folder / SPEC)
    stored = read_folder(folder)
    for key, (_, after) in spec.config.items():
        # The value under the config's own key (GPT-2's n_layer), as `pruned_config` wrote it.
        value = stored.config.get(key, stored.config.get(_attribute_map(stored.config).get(key, key)))
        if value != after:
            raise SpecError(f"{folder / CONFIG}: {key} is {value!r} but {SPEC} gives {after!r}")
    restore = {key: before for key, (before, _) in spec.config.items()}
    model = _build(stored, False, restore, **({"dtype": dtype} if dtype is not None else {}), **kwargs)
    try:
        build_pruned(model, spec)
    except SpecError as e:  # the config does not build the model the spec was planned for
        raise SpecError(f"{folder}: the shards do not fit {SPEC}: {str(e).removeprefix('fingerprint: ')}") from None

    tied = {renamed_key(spec, alias): renamed_key(spec, first) for alias, first in spec.tied.items()}
    tied = {alias: first for alias, first in tied.items() if alias is not None and first is not None}
    expected = fingerprint(model)
    names = model_names(stored, expected, lambda: model)
    actual = {names[name]: tensor.describe() for name, tensor in stored.tensors.items()}
    problems = compare_fingerprints(actual, expected, spec.model, "the shards", tied=tied)
    if problems:
        raise SpecError(f"{folder}: the shards do not fit {SPEC}: {problems[0].removeprefix('fingerprint: ')}")
    state = {}
    with TensorReader() as reader:
        for name, tensor in stored.tensors.items():
            value = reader.read_new(tensor)
            state[names[name]] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    for alias, first in tied.items():  # a shared tensor is stored under one of its names
        if alias not in state:
            state[alias] = state[first]
        elif first not in state:
            state[first] = state[alias]
    model.load_state_dict(state, strict=True, assign=True)
    _tie(model, tied)
    on_meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if on_meta is not None:
        raise SpecError(f"{folder}: tensor {on_meta!r} is neither in the shards nor made by the model")
    return model.eval()


def _tie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make each further name of a shared tensor name the first one's tensor again, as in the planned model."""
    for alias, first in tied.items():
        module, _, name = alias.rpartition(".")
        setattr(model.get_submodule(module), name, _tensor(model, first))
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # what the model itself ties, and its own bookkeeping of it
    for alias, first in tied.items():
        if _tensor(model, alias) is not _tensor(model, first):
            raise SpecError(f"{alias} and {first} are one tensor in the spec, but the loaded model keeps two")


def _tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter or buffer `name` of `model`."""
    module, _, local = name.rpartition(".")
    owner = model.get_submodule(module)
    return owner._parameters.get(local, owner._buffers.get(local))


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the `meta` device and their buffers real.

    Parameters come from the checkpoint, so allocating and initialising them would be wasted; buffers that no
    state_dict holds (rotary frequencies, position ids) are computed by the constructor, so they must be real.

    >>> with parameters_on_meta():
    ...     layer = nn.BatchNorm1d(3)
    >>> layer.weight.device.type, layer.running_mean.device.type
    ('meta', 'cpu')
    """
    # Every module built meanwhile, in any thread, gets its parameters on meta: `load_pruned` builds one model here.
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
