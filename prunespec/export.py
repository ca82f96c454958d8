"""Export: write a pruned (or mock) model to a file a deployment loads, and run an ONNX file to check it.

Start with `write_model`. By the file's suffix it writes a `torch.export` program (.pt2), an ONNX graph (.onnx,
through torch's dynamo exporter) or a state dict (.safetensors, .pt, .pth); every output appears whole or not at
all. `run_onnx` runs an ONNX file with onnxruntime, for `apply --verify`. ONNX needs the `onnx`, `onnxscript` and
(to check) `onnxruntime` packages, which are optional.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from prunespec.errors import SpecError
from prunespec.schemas import atomic_path

SUFFIXES = (".pt2", ".onnx", ".safetensors", ".pt", ".pth")


class ExportError(ValueError):
    """A model that cannot be written in the asked format; nothing was written."""


def write_model(
    model: nn.Module, inputs: Sequence[torch.Tensor], path: str | os.PathLike, say: Callable[[str], None] | None = None
) -> None:
    """Write `model` to `path` in the format its suffix names; `inputs` are example inputs for the exporters.

    `say` is told what is happening during an export, which can take a while.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ExportError(f"{str(path)!r}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    if suffix == ".pt2":
        (say or (lambda line: None))(f"exporting {path} (torch.export) ...")
        program = torch.export.export(model, tuple(inputs), kwargs=plain_call(model))
        with atomic_path(path) as tmp, warnings.catch_warnings():
            # torch warns of every weight that is not contiguous in NCHW order, channels-last ones included, and
            # then stores its whole storage, which is right for them (tests/test_layout.py compares the outputs).
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            torch.export.save(program, tmp)
    elif suffix == ".onnx":
        (say or (lambda line: None))(f"exporting {path} (torch.onnx, dynamo) ...")
        _write_onnx(model, inputs, path)
    else:
        state = plain_state_dict(model)
        with atomic_path(path) as tmp:
            if suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file(state, str(tmp))
            else:
                torch.save(state, tmp)


def plain_call(model: nn.Module) -> dict:
    """Keyword arguments that make a model's forward return plain tensors: a Hugging Face model without its
    key/value cache object, which exporters cannot hold."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if config is not None and hasattr(config, "use_cache") else {}


def _write_onnx(model: nn.Module, inputs: Sequence[torch.Tensor], path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise ExportError("writing ONNX needs the onnx and onnxscript packages: pip install onnx onnxscript") from None
    # The exporter prints the graph it got stuck on and logs warnings on the way: the one line below says it all.
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, tuple(inputs), kwargs=plain_call(model), dynamo=True, verbose=False)
    except Exception as e:  # the exporter's own failure is the answer: say it in one line
        raise ExportError(f"torch.onnx cannot export this model: {export_failure(e)}") from e
    finally:
        torch_logger.setLevel(level)
    with atomic_path(path) as tmp:
        program.save(str(tmp))


# Root causes of a failed export that have a reason a user can act on, by the name of the exception's class.
EXPORT_REASONS = {
    "GuardOnDataDependentSymNode": "the forward branches on, or takes a size from, the values of a tensor "
    "(data-dependent control flow), which a graph cannot hold; save a state dict (.safetensors) instead, or make "
    "the forward independent of the values (torch.cond, torch.where)",
    "UserError": "torch.export refuses the forward (see the exportdb page of the PyTorch documentation)",
}


def export_failure(error: BaseException) -> str:
    """One line for a failed export: the innermost cause (the exporter wraps it in a page of advice), and why.

    >>> export_failure(RuntimeError("step 1/3 failed\\n- advice"))
    'RuntimeError: step 1/3 failed'
    """
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [line.strip() for line in _ANSI.sub("", str(cause)).splitlines() if line.strip()]
    text = f"{type(cause).__name__}: {lines[0] if lines else ''}"
    reason = EXPORT_REASONS.get(type(cause).__name__)
    return f"{text} -- {reason}" if reason else text


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the exporter colours its messages for a terminal


def run_onnx(path: str | os.PathLike, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs of the ONNX file `path` on `inputs`, run with onnxruntime on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("checking an ONNX file needs onnxruntime: pip install onnxruntime") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise SpecError(f"{path}: onnxruntime cannot load it: {str(e).strip().splitlines()[0]}") from None
    names = [i.name for i in session.get_inputs()]
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, with tied tensors copied: safetensors refuses tensors that share memory."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        state[key] = tensor
    return state
