"""Build a model from a command-line specifier and load a checkpoint into it.

Start reading at `load_model`: it parses a specifier, builds the module, loads `--weights` if given, and puts the
model in eval mode. Specifiers:

- `torchvision:NAME` and `timm:NAME`: the library's model with random initial weights (no download);
- `hf:PATH`: a local Hugging Face model folder (config.json and safetensors, single file or sharded), built with
  the transformers class its config's `architectures` names; `meta=True` builds it on the `meta` device from the
  config alone, reading no weights, which is how `plan` sees a model of any size;
- `package.module:callable`: a function or class that returns the model.

`example_inputs` makes the default example input of a model (token ids for a language model, pixel values of the
configured size for a vision model), and `checkpoint_tensors` reads single tensors of a folder's safetensors files,
for criteria that score weights of a model planned on `meta`. Every expected failure raises `ModelError` with a
one-line message that says what is wrong and what a valid form looks like, so the command line can print it as is.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunespec.errors import nearest

VALID_FORMS = "'torchvision:resnet18', 'timm:vit_tiny_patch16_224', 'hf:path/to/folder' or 'package.module:callable'"
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")

# A dotted Python path: `package.module` on the left of the colon, `callable` (or `Class.factory`) on the right.
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"


class ModelError(ValueError):
    """A model specifier or checkpoint that cannot be turned into a model."""


def load_model(specifier: str, weights: str | os.PathLike | None = None, meta: bool = False) -> nn.Module:
    """Build the model named by `specifier`, load `weights` into it (strictly), and return it in eval mode.

    An `hf:` folder's own weights are loaded unless `meta`, which builds the model on the meta device and reads no
    weights at all.
    """
    model = build_model(specifier, meta=meta)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def build_model(specifier: str, meta: bool = False) -> nn.Module:
    """Build a model from a specifier (see the module docstring); library models get random initial weights.

    >>> build_model("resnet18")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    prunespec.models.ModelError: model 'resnet18' is not a valid specifier; write it as ...
    """
    source, sep, name = specifier.partition(":")
    if not sep or not source or not name:
        raise ModelError(f"model {specifier!r} is not a valid specifier; write it as {VALID_FORMS}")
    if source == "torchvision":
        return _torchvision_model(name)
    if source == "timm":
        return _timm_model(name)
    if source == "hf":
        return _hf_model(name, meta)
    if not re.fullmatch(_DOTTED, source) or not re.fullmatch(_DOTTED, name):
        raise ModelError(f"model {specifier!r} is not a valid specifier; write it as {VALID_FORMS}")
    return _callable_model(specifier, source, name)


def _torchvision_model(name: str) -> nn.Module:
    # Imported here so that applying specs to one's own models never needs torchvision.
    try:
        import torchvision.models
    except ImportError:
        raise ModelError(
            f"torchvision is not installed, so 'torchvision:{name}' cannot be built; "
            "install it (pip install torchvision) or name the model as 'package.module:callable'"
        ) from None
    known = torchvision.models.list_models()
    if name not in known:
        raise ModelError(f"torchvision has no model {name!r}; {nearest(name, known)}")
    builder = torchvision.models.get_model_builder(name)
    kwargs: dict[str, Any] = {"weights": None}
    # Detection and segmentation builders would otherwise download ImageNet weights for their backbone.
    parameter = inspect.signature(builder).parameters.get("weights_backbone")
    if parameter is not None and parameter.kind is not inspect.Parameter.VAR_KEYWORD:
        kwargs["weights_backbone"] = None
    return torchvision.models.get_model(name, **kwargs)


def _timm_model(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelError(f"timm is not installed, so 'timm:{name}' cannot be built; install it (pip install timm)") from None
    known = timm.list_models()
    if name not in known:
        raise ModelError(f"timm has no model {name!r}; {nearest(name, known)}")
    return timm.create_model(name, pretrained=False)


def _hf_model(path: str, meta: bool) -> nn.Module:
    """A local Hugging Face folder's model: from its config on `meta`, or with its weights."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelError(f"'hf:{path}' is not a Hugging Face model folder: it has no config.json")
    try:
        import transformers
    except ImportError:
        raise ModelError(f"transformers is not installed, so 'hf:{path}' cannot be built; install it") from None
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ModelError(f"cannot read hf:{path}/config.json: {_first_line(e)}") from e
    architectures = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    if cls is None:
        raise ModelError(f"hf:{path}: its config names no architecture this transformers has ({architectures})")
    if meta:
        with torch.device("meta"):
            return cls(config)
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"hf:{path} has no safetensors weights; only the config was found")
    try:
        return cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except Exception as e:
        raise ModelError(f"cannot load the weights of hf:{path}: {_first_line(e)}") from e


def example_inputs(model: nn.Module, specifier: str) -> list[torch.Tensor] | None:
    """A model's default example input, or None when it has none (then `--input-shape` says).

    A Hugging Face language model takes a short batch of token ids, a vision model pixel values of its configured
    image size; a timm model the input size of its pretrained configuration.
    """
    source = specifier.partition(":")[0]
    generator = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    if source == "hf" and config is not None:
        if getattr(model, "main_input_name", "input_ids") == "pixel_values":
            vision = getattr(config, "vision_config", config)
            size = getattr(vision, "image_size", 224)
            size = size if isinstance(size, int) else size[0]
            channels = getattr(vision, "num_channels", 3)
            return [torch.randn(1, channels, size, size, generator=generator)]
        vocabulary = getattr(config, "vocab_size", None) or 2
        return [torch.randint(0, vocabulary, (1, 8), generator=generator)]
    if source == "timm":
        size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
        return [torch.randn(1, *size, generator=generator)]
    return None


def checkpoint_tensors(folder: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The tensors of a folder's safetensors files by name, each read from disk when asked for."""
    from safetensors import safe_open

    files = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), path))

    class Tensors(Mapping):
        def __getitem__(self, name: str) -> torch.Tensor:
            with safe_open(str(files[name]), framework="pt") as f:
                return f.get_tensor(name)

        def __iter__(self):
            return iter(files)

        def __len__(self) -> int:
            return len(files)

    return Tensors()


def _callable_model(specifier: str, module_name: str, attribute_path: str) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ModelError(
            f"cannot import {module_name!r} for model {specifier!r}: {e}; "
            f"check PYTHONPATH, or write the model as {VALID_FORMS}"
        ) from e
    except Exception as e:
        raise ModelError(f"importing {module_name!r} for model {specifier!r} failed: {_first_line(e)}") from e

    target: Any = module
    for part in attribute_path.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            raise ModelError(f"{module_name!r} has no attribute {attribute_path!r}; {nearest(part, names)}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"{specifier!r} is a {type(target).__name__}, not a callable that returns a model")

    try:
        model = target()
    except Exception as e:
        raise ModelError(f"calling {specifier}() failed: {_first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"{specifier}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state_dict from a `.pt`/`.pth` or `.safetensors` file into `model`; every key must match."""
    path = Path(path)
    state = read_state_dict(path)
    _check_fits(model, state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"weights {str(path)!r} do not fit the model: {_first_line(e)}") from e


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict without running pickled code; unwrap {'state_dict': ...} or {'model': ...} checkpoints."""
    what = f"weights {str(path)!r}"
    loaded = _read_tensors(Path(path), what, "as a plain state_dict")
    state = _unwrap(loaded)
    if state is None:
        raise ModelError(
            f"{what} hold a {type(loaded).__name__}, not a state_dict "
            "(a dict of tensors, or a dict with a 'state_dict' or 'model' entry)"
        )
    return dict(state)


CALIBRATION_BATCH = 32


def read_calibration(path: str | os.PathLike) -> list[torch.Tensor]:
    """Input batches for feature-map criteria, read without running pickled code.

    A `.pt`/`.pth` file holds one tensor of inputs stacked along dim 0 (run in batches of 32) or a list of batches;
    in a `.safetensors` file every tensor is one batch, in the order of their names.
    """
    what = f"calibration file {str(path)!r}"
    loaded = _read_tensors(Path(path), what, "as plain tensors")
    if isinstance(loaded, dict):  # safetensors
        loaded = [loaded[k] for k in sorted(loaded)]
    if isinstance(loaded, torch.Tensor):
        loaded = list(loaded.split(CALIBRATION_BATCH)) if loaded.ndim else []
    if not isinstance(loaded, (list, tuple)) or not loaded or not all(isinstance(t, torch.Tensor) for t in loaded):
        raise ModelError(f"{what} must hold a tensor of inputs or a non-empty list of input batches (tensors)")
    return list(loaded)


def _read_tensors(path: Path, what: str, plain: str) -> Any:
    """A `.safetensors` file as a dict, or what a `.pt`/`.pth` file holds, loaded with ``weights_only=True``."""
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelError(f"{what}: unknown file type; use one of {', '.join(WEIGHT_SUFFIXES)}")
    if not path.is_file():
        raise ModelError(f"{what} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise ModelError(f"cannot read {what}: {_first_line(e)}") from e
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        # weights_only refuses pickles with arbitrary objects; say so rather than fall back to unsafe loading.
        raise ModelError(f"cannot read {what} {plain} (loaded with weights_only=True): {_first_line(e)}") from e


def _unwrap(loaded: Any) -> Mapping[str, Any] | None:
    """The state_dict inside a checkpoint: the dict itself, or its 'state_dict' / 'model' entry."""
    if not isinstance(loaded, Mapping):
        return None
    if all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return loaded
    for key in ("state_dict", "model"):
        inner = loaded.get(key)
        if isinstance(inner, Mapping) and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return None


def _check_fits(model: nn.Module, state: Mapping[str, Any], path: Path) -> None:
    """Name missing, unexpected and mis-shaped keys in one line, instead of torch's multi-line report."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if resized:
        problems.append(f"wrong shape (file vs model) {_some(resized)}")
    if problems:
        raise ModelError(f"weights {str(path)!r} do not fit the model: " + "; ".join(problems))


def _some(items: list[str], n: int = 3) -> str:
    """A few items of a long list, for a one-line message.

    >>> _some(["a", "b", "c", "d", "e"])
    'a, b, c (and 2 more)'
    """
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
