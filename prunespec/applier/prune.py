"""Prune a model in place from a spec.

Start with `prune`: it asks `validate.check` for every change first (so a bad spec changes nothing), then swaps in
the smaller tensors, sets the attributes, installs `InputSubselection` on consumers that read only some
channels of their input, and takes dropped blocks out (`blocks`). The state_dict keys stay the same; only shapes shrink (unless batch norms are folded,
for inference: see `fold`).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from prunespec.applier.blocks import check_blocks, drop_blocks
from prunespec.applier.fold import check_folds, fold
from prunespec.applier.validate import INDICES_BUFFER, InputGather, check
from prunespec.errors import SpecError
from prunespec.schemas import PruningSpec


def prune(model: nn.Module, spec: PruningSpec, fold_norms: bool = False) -> nn.Module:
    """Apply `spec` to `model` in place and return it; raise `SpecError` and leave it untouched if it does not fit.

    Pruned parameters are new `nn.Parameter` objects (same `requires_grad`), so build optimizers afterwards. With
    `fold_norms`, the batch norms the spec lists in `norm_folds` are folded into the layers before them, for
    inference (see `fold`): the model then runs one layer fewer per norm, and its state_dict loses their keys.

    >>> from prunespec.schemas import LayerSpec, PruningSpec, Request, Summary
    >>> from prunespec.applier.validate import fingerprint
    >>> model = nn.Linear(4, 3)
    >>> spec = PruningSpec(model="Linear", inputs=[], request=Request([], [], False, False),
    ...     summary=Summary(15, 10, 0, 0, 0), fingerprint=fingerprint(model),
    ...     layers={"": LayerSpec("Linear", {"out_features": 2}, {"weight": ["0,2"], "bias": ["0,2"]})})
    >>> prune(model, spec)
    Linear(in_features=4, out_features=2, bias=True)
    """
    changes = check(model, spec)
    drops = check_blocks(model, spec)
    config = check_config(model, spec)
    folds = check_folds(model, spec, changes) if fold_norms else []
    # A tensor that several modules share (tied input and output embeddings) stays shared: the first pruned copy
    # of it replaces it everywhere.
    replaced: dict[int, tuple[Any, Any]] = {}  # id of an old tensor -> (it, kept alive so the id stays its; its copy)
    for change in changes:
        module = change.module
        for name, tensor in change.tensors.items():
            old = module._parameters[name] if name in module._parameters else module._buffers[name]
            if id(old) not in replaced:
                new = nn.Parameter(tensor, requires_grad=old.requires_grad) if name in module._parameters else tensor
                replaced[id(old)] = (old, new)
            new = replaced[id(old)][1]
            if name in module._parameters:
                module._parameters[name] = new
            else:
                # Assigning into _buffers keeps the buffer's entry in _non_persistent_buffers_set as it was.
                module._buffers[name] = new
        change.rule.set_attributes(module, change.attributes)
        if change.input is not None:
            _install_subselection(module, change.input)
    fold(folds)
    drop_blocks(model, drops)
    for key, (_, after) in spec.config.items():
        setattr(config, key, copy.deepcopy(after))
    return model


def check_config(model: nn.Module, spec: PruningSpec) -> Any:
    """The model's config, whose values the spec changes; `SpecError` unless each is what the spec says it was."""
    if not spec.config:
        return None
    config = getattr(model, "config", None)
    if config is None:
        raise SpecError(f"config: the spec changes {', '.join(spec.config)} of a config, but the model has none")
    for key, (before, _) in spec.config.items():
        if getattr(config, key, None) != before:
            raise SpecError(f"config: {key} is {getattr(config, key, None)!r} in the model but {before!r} in the spec")
    return config


def build_pruned(model: nn.Module, spec: PruningSpec, fold_norms: bool = False) -> nn.Module:
    """Reshape an unpruned `model` to the architecture `spec` describes, to load a pruned checkpoint into it.

    This is `prune` for deployment without the original weights: build the model on the meta device, so that
    nothing is allocated or computed, reshape it, and load the pruned state dict with ``assign=True``. The
    activation subselections' indices are not part of a state dict, so they are made on the CPU; `.to(device)`
    moves them with the model. No tracing, no planner. Pass the `fold_norms` that the checkpoint was saved with.

    >>> import torch
    >>> from prunespec.schemas import LayerSpec, PruningSpec, Request, Summary
    >>> from prunespec.applier.validate import fingerprint
    >>> spec = PruningSpec(model="Linear", inputs=[], request=Request([], [], False, False),
    ...     summary=Summary(15, 10, 0, 0, 0), fingerprint=fingerprint(nn.Linear(4, 3)),
    ...     layers={"": LayerSpec("Linear", {"out_features": 2}, {"weight": ["0,2"], "bias": ["0,2"]})})
    >>> with torch.device("meta"):
    ...     model = nn.Linear(4, 3)
    >>> build_pruned(model, spec).weight.shape
    torch.Size([2, 4])
    >>> model.load_state_dict({"weight": torch.ones(2, 4), "bias": torch.zeros(2)}, strict=True, assign=True)
    <All keys matched successfully>
    >>> model(torch.ones(1, 4))
    tensor([[4., 4.]], grad_fn=<AddmmBackward0>)
    """
    return prune(model, spec, fold_norms)


class InputSubselection:
    """A forward pre-hook that makes a consumer read only some channels of its input activation.

    The positions live on the module as the non-persistent buffer `_prunespec_input_indices`, so `.to(device)`
    moves them and the state_dict keys stay those of the unpruned model. When the positions are one ascending run
    the hook slices (`narrow`, no copy); otherwise it gathers (`index_select`). `channels` is the size of the input
    along `axis`, before the subselection. It is a plain class rather than a closure so that `torch.save(model)`
    and `copy.deepcopy` work.

    >>> import torch
    >>> conv = nn.Conv2d(2, 1, 1)
    >>> conv.register_buffer(INDICES_BUFFER, torch.tensor([3, 0]), persistent=False)
    >>> hook = InputSubselection(axis=-3, start=None, length=2, channels=4)
    >>> hook(conv, (torch.arange(4.).view(1, 4, 1, 1),))[0].flatten()
    tensor([3., 0.])
    """

    def __init__(self, axis: int, start: int | None, length: int, channels: int):
        self.axis = axis
        self.start = start
        self.length = length
        self.channels = channels

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x, *rest = args
        if self.start is not None:
            x = x.narrow(self.axis, self.start, self.length)
        else:
            x = x.index_select(self.axis, getattr(module, INDICES_BUFFER))
        return (x, *rest)

    def __repr__(self) -> str:
        how = f"narrow({self.start}, {self.length})" if self.start is not None else f"index_select({self.length})"
        return f"InputSubselection(axis={self.axis}, {how} of {self.channels})"


def _install_subselection(module: nn.Module, gather: InputGather) -> None:
    module.register_buffer(INDICES_BUFFER, gather.indices, persistent=False)
    module.register_forward_pre_hook(InputSubselection(gather.axis, gather.start, len(gather.indices), gather.channels))
