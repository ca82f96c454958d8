"""Emulate a pruned model without changing it: the reference side of the invariant every test guards.

Start with `mock`. It validates the spec like `prune` does, then wraps the model in `MockPrunedModel`, whose forward
runs the original model through `torch.func.functional_call` with every pruned entry of every listed tensor set to
zero. Removing a channel and zeroing all the weights that produce or read it give the same output, so

    prune(copy.deepcopy(model), spec)(x) == mock(model, spec)(x)    (up to summation order)

Only which indices are kept matters here: reordering and activation subselections change where channels sit in
memory, not what the network computes. The one exception is a norm pruned through (planned with `through_norms`):
it takes its statistics over the channels it keeps, which zeros cannot emulate, so the mock runs it on those
channels alone (`NormEmulation`). A dropped block returns its input.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from prunespec.applier.blocks import check_blocks, skip_hook
from prunespec.applier.swap import call_with
from prunespec.applier.validate import LayerChange, check
from prunespec.schemas import NormChange, PruningSpec, decode_runs


def mock(model: nn.Module, spec: PruningSpec) -> MockPrunedModel:
    """Validate `spec` against `model` and return a module that computes what the pruned model would.

    `model` keeps its weights and gets no hooks; gradients of the mock flow to its parameters.

    >>> from prunespec.schemas import LayerSpec, PruningSpec, Request, Summary
    >>> from prunespec.applier.validate import fingerprint
    >>> model = nn.Linear(2, 2)
    >>> spec = PruningSpec(model="Linear", inputs=[], request=Request([], [], False, False),
    ...     summary=Summary(6, 3, 0, 0, 0), fingerprint=fingerprint(model),
    ...     layers={"": LayerSpec("Linear", {"out_features": 1}, {"weight": ["1"], "bias": ["1"]})})
    >>> mock(model, spec)(torch.ones(1, 2))[0, 0].item()
    0.0
    """
    changes = check(model, spec)
    blocks = [drop.name for drop in check_blocks(model, spec)]
    masks: dict[str, torch.Tensor] = {}
    norms = []
    for change in changes:
        module_tensors = {**change.module._parameters, **change.module._buffers}
        for name, axes in change.kept.items():
            mask = _mask(module_tensors[name].shape, axes)
            if mask is not None:
                masks[f"{change.name}.{name}" if change.name else name] = mask
        normalises = spec.layers[change.name].normalises
        if normalises is not None:
            norms.append(NormEmulation(change, normalises))
    # A tensor that modules share (tied embeddings) is masked once, under its first name: `call_with` gives the
    # others the same mask.
    named = _named_tensors(model)
    first: dict[int, str] = {}
    for name, tensor in named.items():
        first.setdefault(id(tensor), name)
    masks = {name: mask for name, mask in masks.items() if first[id(named[name])] == name}
    return MockPrunedModel(model, spec, masks, norms, blocks)


class NormEmulation:
    """A norm pruned through (`LayerSpec.normalises`), as the pruned model runs it: on the kept channels alone.

    Called as a forward hook of the norm, it runs a copy of the norm with the pruned attributes on the kept
    channels of the norm's input and with the kept entries of its (masked) tensors, and puts the result back at
    the kept channels of a zero output.
    """

    def __init__(self, change: LayerChange, normalises: NormChange) -> None:
        self.name = change.name
        self.input_axis, self.output_axis = normalises.input_axis, normalises.output_axis
        self.kept = torch.tensor(decode_runs(normalises.kept), dtype=torch.long)
        self.axes = change.kept  # tensor name -> kept indices per axis
        self.pruned = copy.deepcopy(change.module)
        change.rule.set_attributes(self.pruned, change.attributes)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x, *rest = args
        kept = self.kept.to(x.device)
        tensors = {}
        for name in (*module._parameters, *module._buffers):
            tensor = getattr(module, name)  # inside `functional_call`: the masked tensor
            if tensor is not None:
                for axis, indices in enumerate(self.axes.get(name, [])):
                    if indices is not None:
                        tensor = tensor.index_select(axis, indices.to(tensor.device))
                tensors[name] = tensor
        y = torch.func.functional_call(self.pruned, tensors, (x.index_select(self.input_axis, kept), *rest), kwargs)
        return torch.zeros_like(output).index_copy(self.output_axis, kept, y)


class MockPrunedModel(nn.Module):
    """`model` with the pruned entries of its tensors zeroed at forward time.

    `.model` is the wrapped model and `.spec` the spec; `.eval()`, `.train()` and `.to()` reach the model, and
    `.to(device)` moves the masks too.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: PruningSpec,
        masks: dict[str, torch.Tensor],
        norms: list[NormEmulation] = (),
        blocks: list[str] = (),
    ):
        super().__init__()
        self.model = model
        self.spec = spec
        self._norms = list(norms)  # not submodules: the mock's state_dict is the model's
        self._blocks = list(blocks)  # dropped: each returns its input
        # Buffer names cannot hold dots, so masks are numbered buffers and `_masked` maps each tensor to one.
        # Non-persistent: the mock's state_dict is the model's. Bool: a float model never casts them.
        self._masked: dict[str, str] = {}
        for i, (key, mask) in enumerate(masks.items()):
            self.register_buffer(f"_mask{i}", mask, persistent=False)
            self._masked[key] = f"_mask{i}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tensors = _named_tensors(self.model)
        masked = {}
        for key, buffer in self._masked.items():
            tensor = tensors[key]
            # `where` rather than multiplying by zero: a pruned entry that is inf or nan must vanish as it does
            # from the pruned model. Gradients still reach the kept entries of the original tensor.
            masked[key] = torch.where(getattr(self, buffer).to(tensor.device), tensor, 0)
        modules = dict(self.model.named_modules())
        hooks = [modules[n.name].register_forward_hook(n, with_kwargs=True) for n in self._norms]
        hooks += [modules[name].register_forward_hook(skip_hook) for name in self._blocks]
        try:
            return call_with(self.model, masked, args, kwargs)
        finally:
            for hook in hooks:
                hook.remove()


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def _mask(shape: torch.Size, axes: list[list[int] | None]) -> torch.Tensor | None:
    """A bool tensor that broadcasts against `shape` and is True where an entry is kept on every listed axis.

    >>> _mask(torch.Size([3, 2]), [[2, 0], None]).tolist()
    [[True], [False], [True]]
    >>> _mask(torch.Size([3]), [[1, 0, 2]]) is None
    True
    """
    mask = None
    for axis, kept in enumerate(axes):
        if kept is None or len(kept) == shape[axis]:  # every index kept, maybe reordered: nothing to zero
            continue
        keep = torch.zeros(shape[axis], dtype=torch.bool)
        keep[kept] = True
        keep = keep.view([-1 if a == axis else 1 for a in range(len(shape))])
        mask = keep if mask is None else mask & keep
    return mask
