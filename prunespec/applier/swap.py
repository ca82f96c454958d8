"""Run a model with some of its tensors replaced, correctly when a module is reachable under several names.

Start with `call_with`. `torch.func.functional_call` swaps in the given tensors name by name and swaps the originals
back the same way. A module that the model reaches from several places (timm's CoaT hands one convolutional position
encoding to several blocks, and makes `mlp2`, `mlp3` and `mlp4` one module) has one attribute under several names:
the second swap saves the first one's replacement as the "original", and the model is left holding the replacement
afterwards (a meta twin after tracing, a masked weight after a mock). `call_with` swaps each (module, attribute)
slot once, and gives every name of a shared tensor the same replacement, as `tie_weights=True` would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def call_with(model: nn.Module, tensors: Mapping[str, torch.Tensor], args: tuple, kwargs: dict | None = None) -> Any:
    """`model(*args, **kwargs)` with the named tensors replaced, the model's own ones restored afterwards.

    A name stands for its tensor wherever the model holds it (under every name of a shared parameter).

    >>> shared = nn.Linear(2, 2)
    >>> model = nn.Sequential(shared, shared)
    >>> twins = {"0.weight": torch.zeros(2, 2, device="meta"), "0.bias": torch.zeros(2, device="meta")}
    >>> call_with(model, twins, (torch.ones(1, 2, device="meta"),)).device.type
    'meta'

    >>> model[1].weight.device.type  # torch.func.functional_call leaves it on meta
    'cpu'
    """
    return torch.func.functional_call(model, once_per_slot(model, tensors), args, kwargs or {}, tie_weights=False)


def once_per_slot(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` under one name per (module, attribute) slot of `model`, extended to every slot that holds the same
    tensor as a given name (a tensor shared by several modules).

    >>> shared = nn.Linear(2, 2)
    >>> model = nn.Sequential(shared, shared)
    >>> sorted(once_per_slot(model, {"1.bias": torch.zeros(2)}))
    ['0.bias']
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    replacement: dict[int, torch.Tensor] = {}
    for name, value in tensors.items():
        replacement.setdefault(id(named[name]), value)
    modules = dict(model.named_modules(remove_duplicate=False))
    chosen: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for name, tensor in named.items():
        value = replacement.get(id(tensor))
        if value is None:
            continue
        owner, _, attribute = name.rpartition(".")
        slot = (id(modules[owner]), attribute)
        if slot not in seen:
            seen.add(slot)
            chosen[name] = value
    return chosen
