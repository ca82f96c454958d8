"""Verify: apply a compiled spec to a copy of the model and find the ops that were wrongly trusted.

Start with `suspects_to_pin`. Tracing sees sizes as plain numbers, so it cannot tell ``x.view(n, c, -1)`` with `c`
read from ``x.shape`` (which follows pruning) from the same call with `c` written as a constant (which does not).
The planner follows such ops on trust and records them as `Suspect`s. When a plan removes channels that flow
through a suspect, `plan` runs the pruned copy once under `SizeProbe`, which looks at each suspect op again: a size
that came from the tensor now equals the pruned channel count; a constant still holds the old one. The channels of
the constants are then kept, and the plan is compiled again. As a last guard the pruned copy's output is compared
with the mock's on the example inputs.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from prunespec.applier import mock, prune
from prunespec.schemas import PruningSpec

# Generous for float32 summation noise, far below what reinterpreting the channels of a tensor produces.
RELATIVE_TOLERANCE = 1e-4


@dataclass
class Suspect:
    """The `ordinal`-th call of `op`, whose size argument at `position` was taken to be the channel count."""

    op: str
    ordinal: int
    position: int  # index into the op's shape arguments
    axis: int  # the input's channel axis
    slots: list[int]
    reason: str
    span: int = 1  # the input's channels lie on this many axes from `axis` (2 once split into groups)
    factor: int = 1  # the size at `position` times this is the channel count (the group count, for a split)
    cut: tuple[int, int] | None = None  # a slice of the channels: (start, stop) before pruning

    def holds(self, x: torch.Tensor, shape: tuple) -> bool:
        """Whether the size argument still matches the channels of `x`, as a size read from `x` would."""
        channels = 1
        for n in x.shape[self.axis : self.axis + self.span]:
            channels *= n
        return shape[self.position] * self.factor == channels

    def slices_kept(self, x: torch.Tensor, index, kept: Callable[[int], bool]) -> bool:
        """Whether a slice of the pruned channels selects exactly the kept ones of the slice it was."""
        from prunespec.planner.ops.shapes import sliced

        start, stop = self.cut
        before = sum(map(kept, self.slots[:start]))
        expected = (before, before + sum(map(kept, self.slots[start:stop])))
        return sliced(index, x.shape, self.axis) == expected


def shape_arguments(args: tuple, kwargs: dict) -> tuple:
    """The target shape of a ``view``/``reshape`` call, however it was written."""
    shape = args[1:] if len(args) > 1 else (kwargs.get("shape") or kwargs.get("size") or ())
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    return tuple(shape)


def call_sizes(op: str, args: tuple, kwargs: dict) -> tuple | None:
    """The sizes a call was given as written (-1 where it asks to infer one), or None for an op without sizes.

    For ``view``/``reshape`` the target shape; for ``unflatten`` the whole target shape, with the input's other
    sizes around the given ones; for ``split`` the part size (or the list of part sizes).

    >>> x = torch.empty(2, 12, device="meta")
    >>> call_sizes("unflatten", (x, 1, (3, -1)), {}), call_sizes("split", (x, 4, 1), {})
    ((2, 3, -1), (4,))
    """
    if op in ("view", "reshape"):
        return shape_arguments(args, kwargs)
    if op == "unflatten":
        x = args[0]
        dim = (args[1] if len(args) > 1 else kwargs["dim"]) % x.ndim
        sizes = args[2] if len(args) > 2 else kwargs.get("sizes")
        return (*x.shape[:dim], *sizes, *x.shape[dim + 1 :])
    if op == "split":
        size = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
        return tuple(size) if isinstance(size, (tuple, list)) else (size,)
    return None


class SizeProbe(TorchFunctionMode):
    """Counts calls per op name like the tracer does, and checks each suspect's size against the pruned tensor."""

    def __init__(self, suspects: Sequence[Suspect], kept: Callable[[int], bool]) -> None:
        super().__init__()
        self.waiting = {(s.op, s.ordinal): s for s in suspects}
        self.counts: Counter[str] = Counter()
        self.constants: list[Suspect] = []
        self.kept = kept

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        suspect = self.waiting.pop((name, self.counts[name]), None)
        self.counts[name] += 1
        if suspect is not None:
            if suspect.cut is not None:
                holds = suspect.slices_kept(args[0], args[1], self.kept)
            else:
                holds = suspect.holds(args[0], call_sizes(name, args, kwargs))
            if not holds:
                self.constants.append(suspect)
        return func(*args, **kwargs)


def suspects_to_pin(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    spec: PruningSpec,
    at_stake: Sequence[Suspect],
    kept: Callable[[int], bool],
) -> tuple[list[Suspect], str | None]:
    """The suspects whose channels must be kept for `spec` to be exact (empty when it already is), and, when the
    pruned model fails or differs in a way no single suspect explains, what happened, to give as their reason.

    `kept` tells whether a slot is kept by `spec`.
    """
    probe = SizeProbe(at_stake, kept)
    running: list[str] = []
    on_meta = any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        # On meta nothing has values: the pruned model's run is all there is to check (its sizes, and that it runs).
        expected = None if on_meta else tree_leaves(mock(model, spec).eval()(*inputs))
        pruned = prune(copy.deepcopy(model).eval(), spec)
        names = {id(m): n for n, m in pruned.named_modules()}


        def began(module, args) -> None:
            running.append(names.get(id(module), ""))

        def ended(module, args, out) -> None:  # returns None: the output stays as it is
            running.pop()

        hooks = [register_module_forward_pre_hook(began), register_module_forward_hook(ended)]
        try:
            with probe:
                actual = tree_leaves(pruned(*inputs))
        except Exception as e:  # noqa: BLE001 -- whatever model code raises on pruned sizes (timm's CSPNet unpacks
            # `x.split(self.expand_chs // 2)` into two parts: a ValueError)
            where = f" in {running[-1]}" if running and running[-1] else ""
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            first = first if isinstance(e, RuntimeError) and first else f"{type(e).__name__}: {first}".rstrip(": ")
            return probe.constants or list(at_stake), None if probe.constants else f"the pruned model fails{where}: {first}"
        finally:
            for hook in hooks:
                hook.remove()
    if probe.constants:
        return probe.constants, None
    if expected is None or _same(actual, expected):
        return [], None
    return list(at_stake), None


def _same(actual: list, expected: list) -> bool:
    if len(actual) != len(expected):
        return False
    for a, e in zip(actual, expected):
        if not isinstance(e, torch.Tensor) or not e.numel():
            continue
        if not isinstance(a, torch.Tensor) or a.shape != e.shape:
            return False
        if e.is_meta or a.is_meta:  # planned on shapes alone: the shapes are all there is to compare
            continue
        scale = max(1.0, e.abs().max().item())
        if (a.double() - e.double()).abs().max().item() > RELATIVE_TOLERANCE * scale:
            return False
    return True
