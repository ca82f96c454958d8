"""prunespec: compile channel-pruning requests into versioned spec files, and apply them without re-tracing.

    spec = prunespec.plan(model, [x], pruned_inputs=[("layer1.0.conv1.weight", 5)])
    spec.save("model.prunespec.json")
    prunespec.prune(model, prunespec.load_spec("model.prunespec.json"))

The planner (`prunespec.planner`) traces the model and writes the spec; the applier (`prunespec.applier`) reads a
spec and needs only torch, msgspec and the standard library. Importing this package does not import the planner:
`plan` and `PruningManager` load it on first use, so a deployment that only applies specs never does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prunespec.applier import build_pruned, fold_norms, load_pruned, mock, prune, prune_folder, to_channels_last
from prunespec.errors import PlanError, SpecError
from prunespec.schemas import SCHEMA_VERSION, PruningSpec, load_spec

if TYPE_CHECKING:
    from prunespec.manager import PruningManager

__version__ = "0.3.0"

__all__ = [
    "SCHEMA_VERSION",
    "PlanError",
    "PruningManager",
    "PruningSpec",
    "SpecError",
    "build_pruned",
    "fold_norms",
    "load_pruned",
    "load_spec",
    "mock",
    "plan",
    "prune",
    "prune_folder",
    "select",
    "to_channels_last",
]


def plan(model, example_inputs, pruned_inputs=None, pruned_outputs=None, **options):
    """Trace `model` on `example_inputs` and compile the requested channels, heads and blocks into a `PruningSpec`.

    See `prunespec.planner.plan` for the arguments.
    """
    from prunespec.planner import plan as _plan

    return _plan(model, example_inputs, pruned_inputs=pruned_inputs, pruned_outputs=pruned_outputs, **options)


def select(model, example_inputs, criterion="l2", amount=0.3, side="input", scope="local", **options):
    """Choose the least important channels (or heads) by `criterion`, as a `Selection`: pass
    ``**selection.requests()`` to `plan`.

    See `prunespec.planner.select.select` for the arguments. The model's weights are left as they were.
    """
    from prunespec.planner.select import select as _select

    return _select(model, example_inputs, criterion=criterion, amount=amount, side=side, scope=scope, **options)


def __getattr__(name: str) -> Any:
    if name == "PruningManager":
        from prunespec.manager import PruningManager

        return PruningManager
    raise AttributeError(f"module 'prunespec' has no attribute {name!r}")
