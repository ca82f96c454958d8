"""Fold batch norms into the layer before them, for inference: one layer fewer to run per norm.

Start with `check_folds`. The planner lists in `PruningSpec.norm_folds` every batch norm that reads only the output
of one convolution or linear layer, where nothing else reads that output (schema 1.2). In eval mode such a norm is
a fixed per-channel map ``x * scale + shift``, so the layer can compute it itself: its weight is scaled per output
channel and its bias becomes ``bias * scale + shift``. The norm is then replaced by `nn.Identity`.

`fold_norms` folds a model, pruned or not. `prune(model, spec, fold_norms=True)` runs `check_folds` together with
the spec's other checks, before anything changes, and `fold` after the pruned tensors are in place. Folding freezes
the norms at their running statistics: the model is for inference. Its state_dict loses the norms' keys, and a
layer without a bias gains one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from prunespec.applier.rules import rule_for, runs_own_forward
from prunespec.errors import SpecError, nearest
from prunespec.schemas import NormFold, PruningSpec

if TYPE_CHECKING:
    from prunespec.applier.validate import LayerChange


@dataclass
class FoldChange:
    """One norm to fold: its module, the layer that absorbs it, and where the norm sits in its parent."""

    norm: nn.Module
    into: nn.Module
    parent: nn.Module
    child: str


def check_folds(model: nn.Module, spec: PruningSpec, changes: Sequence[LayerChange]) -> list[FoldChange]:
    """The folds of `spec` for `model` once `changes` are made; raise `SpecError` if one cannot be done exactly.

    The model is not modified.
    """
    modules = dict(model.named_modules())
    pruned = {change.name: change.tensors for change in changes}
    return [check_fold(i, entry, modules, pruned) for i, entry in enumerate(spec.norm_folds)]


def check_fold(
    i: int, entry: NormFold, modules: dict[str, nn.Module], pruned: dict[str, dict[str, torch.Tensor]]
) -> FoldChange:
    """`check_folds` for the `i`-th fold of a spec; `pruned` holds the new tensors per module name."""
    where = f"norm_folds[{i}]"
    for name in (entry.norm, entry.into):
        if name not in modules:
            raise SpecError(f"{where}: the model has no module {name!r}; {nearest(name, modules)}")
    norm, into = modules[entry.norm], modules[entry.into]
    if not rule_for(norm).folds:
        raise SpecError(f"{where}: {entry.norm!r} is a {type(norm).__name__}, not a batch norm that can be folded")
    if not rule_for(into).absorbs:
        raise SpecError(
            f"{where}: {entry.into!r} is a {type(into).__name__}; a norm folds only into a convolution or linear layer"
        )
    for name, module in ((entry.norm, norm), (entry.into, into)):
        if not runs_own_forward(module):
            raise SpecError(f"{where}: {name!r} overrides forward, so folding might not keep its output")
    if norm.running_var is None:
        raise SpecError(f"{where}: {entry.norm!r} keeps no running statistics, so it has no fixed scale to fold")
    # The layer's forward pre-hooks see only its input, which folding leaves alone.
    hooked = [name for name, m in ((entry.into, into), (entry.norm, norm)) if m._forward_hooks]
    hooked += [entry.norm] if norm._forward_pre_hooks else []
    if hooked:
        raise SpecError(
            f"{where}: {hooked[0]!r} has forward hooks, which would see folded values; remove them first, "
            "or apply without folding"
        )
    width = _tensor(pruned, entry.into, into, "weight").shape[0]
    features = _tensor(pruned, entry.norm, norm, "running_var").shape[0]
    if width != features:
        raise SpecError(
            f"{where}: {entry.into!r} makes {width} channels but {entry.norm!r} normalises {features}; "
            "the spec's layers do not fit together"
        )
    parent_name, _, child = entry.norm.rpartition(".")
    return FoldChange(norm, into, modules[parent_name], child)


def fold_norms(model: nn.Module, spec: PruningSpec) -> nn.Module:
    """Fold the batch norms `spec` lists into the layers before them, in place, and return `model`.

    `model` is the model `spec` was planned for, pruned by it or not (a norm and its layer keep the same channels
    either way). Raise `SpecError` and change nothing if a fold does not fit. `prune(model, spec, fold_norms=True)`
    prunes and folds in one step.

    >>> import torch
    >>> from prunespec.schemas import NormFold, PruningSpec, Request, Summary
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).double().eval()
    >>> spec = PruningSpec(model="Sequential", inputs=[], request=Request([], [], False, True),
    ...     summary=Summary(0, 0, 0, 0, 0), layers={}, fingerprint={}, norm_folds=[NormFold("1", "0")])
    >>> x = torch.linspace(-4, 4, 9, dtype=torch.float64).view(1, 1, 3, 3)
    >>> before = net(x)
    >>> fold_norms(net, spec)
    Sequential(
      (0): Conv2d(1, 2, kernel_size=(1, 1), stride=(1, 1))
      (1): Identity()
    )
    >>> bool((net(x) - before).abs().max() <= 1e-14 * before.abs().max())  # a few float64 roundings apart
    True
    """
    fold(check_folds(model, spec, []))
    return model


def fold(folds: Sequence[FoldChange]) -> None:
    """Fold each norm into its layer and put `nn.Identity` in the norm's place."""
    with torch.no_grad():
        for change in folds:
            absorb(change.into, *norm_affine(change.norm))
            setattr(change.parent, change.child, nn.Identity())


def norm_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch norm's per-channel ``(scale, shift)`` in eval mode: it computes ``x * scale + shift``.

    >>> bn = nn.BatchNorm1d(2, eps=0.0).eval()
    >>> bn.running_var.fill_(4.0), bn.running_mean.fill_(1.0)  # doctest: +ELLIPSIS
    (...)
    >>> [t.tolist() for t in norm_affine(bn)]
    [[0.5, 0.5], [-0.5, -0.5]]
    """
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    return scale, shift if norm.bias is None else shift + norm.bias


def absorb(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Fold ``y * scale + shift``, per output channel (axis 0 of the weight), into the layer's weight and bias.

    The layer gets new parameters, so build optimizers afterwards.

    >>> conv = nn.Conv2d(1, 2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = conv.weight.fill_(3.0)
    ...     absorb(conv, torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0]))
    >>> conv.weight.flatten().tolist(), conv.bias.tolist()
    ([6.0, 1.5], [1.0, -1.0])
    """
    weight, bias = layer.weight, layer.bias
    folded_bias = shift if bias is None else bias * scale + shift
    layer.weight = nn.Parameter(weight * scale.view(-1, *[1] * (weight.dim() - 1)), weight.requires_grad)
    layer.bias = nn.Parameter(folded_bias, weight.requires_grad)


def _tensor(pruned: dict[str, dict[str, torch.Tensor]], name: str, module: nn.Module, local: str) -> torch.Tensor:
    """`module`'s tensor `local` as it will be after pruning."""
    return pruned.get(name, {}).get(local, getattr(module, local))
