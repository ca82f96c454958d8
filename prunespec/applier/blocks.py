"""Dropped residual blocks (`PruningSpec.dropped_blocks`): checking them, taking them out, and what follows.

Start with `check_blocks`, which `prune` and `mock` call before changing anything. A block is either *removed* from
its `nn.ModuleList` (the blocks after it move up one place, with their state_dict keys; `renamed_key` says where a
key went) or replaced by `Skipped`, an identity. Code around a `ModuleList` of layers counts them: each layer's
`layer_idx` (which a key/value cache is indexed by), which `drop_blocks` keeps in step, and a Hugging Face config's
`num_hidden_layers` and `layer_types`, which the planner works out with `config_changes` and the spec records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunespec.errors import SpecError, nearest
from prunespec.schemas import PruningSpec


class Skipped(nn.Module):
    """What stands where a block was dropped: it returns its first argument, whatever else it is called with."""

    def forward(self, x, *args, **kwargs):
        return x


@dataclass
class BlockDrop:
    """One dropped block, found in the model: its container and its name there."""

    name: str
    parent: nn.Module
    child: str
    how: str


def check_blocks(model: nn.Module, spec: PruningSpec) -> list[BlockDrop]:
    """The dropped blocks of `spec`, found in `model`; `SpecError` if one does not fit."""
    modules = dict(model.named_modules())
    found = []
    for i, block in enumerate(spec.dropped_blocks):
        where = f"dropped_blocks[{i}] {block.module!r}"
        if block.module not in modules or not block.module:
            raise SpecError(f"{where}: no such module in the model; {nearest(block.module, modules)}")
        parent_name, _, child = block.module.rpartition(".")
        parent = modules[parent_name]
        listed = isinstance(parent, nn.ModuleList)
        if (block.how == "removed") != listed:
            kind = type(parent).__name__
            raise SpecError(f"{where}: how is {block.how!r} but its container is a {kind}")
        if listed and not child.isdigit():
            raise SpecError(f"{where}: not an entry of its ModuleList")
        inside = [name for name in spec.layers if name.startswith(f"{block.module}.")]
        if inside:
            raise SpecError(f"{where}: layer {inside[0]!r} lies inside it, but a dropped block has no layers left")
        if any(earlier.module == block.module for earlier in spec.dropped_blocks[:i]):
            # Removing it twice from its ModuleList would remove the block after it too.
            raise SpecError(f"{where}: listed twice; a block is dropped once")
        outer = next((b.module for b in spec.dropped_blocks if block.module.startswith(f"{b.module}.")), None)
        if outer is not None:
            raise SpecError(f"{where}: it lies inside {outer!r}, which is dropped too")
        found.append(BlockDrop(block.module, parent, child, block.how))
    return found


def drop_blocks(model: nn.Module, drops: list[BlockDrop]) -> None:
    """Take the checked blocks out of `model` and renumber what counts the layers of their lists."""
    lists: dict[int, tuple[nn.ModuleList, list[int]]] = {}
    for drop in drops:
        if drop.how == "identity":
            setattr(drop.parent, drop.child, Skipped())
        else:
            lists.setdefault(id(drop.parent), (drop.parent, []))[1].append(int(drop.child))
    for container, removed in lists.values():
        kept = [i for i in range(len(container)) if i not in removed]
        for new, old in enumerate(kept):
            for module in container[old].modules():
                if module.__dict__.get("layer_idx") == old:
                    module.layer_idx = new
        for i in sorted(removed, reverse=True):
            del container[i]


def config_changes(config: Mapping[str, Any], length: int, removed: list[int]) -> dict[str, Any]:
    """What a model config says about a list of `length` layers once the layers `removed` are gone.

    >>> config_changes({"num_hidden_layers": 4, "layer_types": ["full", "sliding", "full", "sliding"]}, 4, [1])
    {'num_hidden_layers': 3, 'layer_types': ['full', 'full', 'sliding']}
    >>> config_changes({"num_hidden_layers": 12}, 6, [1])  # another list: the config counts something else
    {}
    """
    changes: dict[str, Any] = {}
    if config.get("num_hidden_layers") == length:
        changes["num_hidden_layers"] = length - len(removed)
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == length:
        changes["layer_types"] = [t for i, t in enumerate(types) if i not in removed]
    return changes


def renamed_key(spec: PruningSpec, key: str) -> str | None:
    """Where a state_dict key of the unpruned model goes once the spec's blocks are dropped; None if it goes.

    >>> from prunespec.schemas import DroppedBlock, PruningSpec, Request, Summary
    >>> spec = PruningSpec(model="Net", inputs=[], request=Request([], [], False, True),
    ...     summary=Summary(0, 0, 0, 0, 0), layers={}, fingerprint={},
    ...     dropped_blocks=[DroppedBlock("layers.1", "removed")])
    >>> renamed_key(spec, "layers.1.mlp.weight"), renamed_key(spec, "layers.3.mlp.weight")
    (None, 'layers.2.mlp.weight')
    """
    removed: dict[str, list[int]] = {}
    for block in spec.dropped_blocks:
        if key.startswith(f"{block.module}."):
            return None
        if block.how == "removed":
            parent, _, index = block.module.rpartition(".")
            removed.setdefault(parent, []).append(int(index))
    for parent, indices in removed.items():
        prefix = f"{parent}." if parent else ""
        head, dot, rest = key[len(prefix) :].partition(".")
        if key.startswith(prefix) and head.isdigit() and dot:
            return f"{prefix}{int(head) - sum(i < int(head) for i in indices)}.{rest}"
    return key


def skip_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    """For the mock: a dropped block's output is its input."""
    return args[0]
