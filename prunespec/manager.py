"""`PruningManager`: the seed package's high-level API, kept so that its users can switch with few edits.

    manager = PruningManager(net).compute([x], pruned_inputs=[("layer1.1.conv1.weight", 5)])
    mock = manager.get_mock_model()
    manager.prune()

It is a thin facade over `prunespec.plan`, `prunespec.mock` and `prunespec.prune`; `manager.spec` is the
`PruningSpec`, which can be saved and applied elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import prunespec
from prunespec.schemas import PruningSpec


class PruningManager:
    """Plan, mock and prune one model, in the seed's vocabulary."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net
        self.spec: PruningSpec | None = None

    def compute(
        self,
        inputs: Sequence[torch.Tensor],
        pruned_inputs=None,
        pruned_outputs=None,
        constrained: bool = False,
        reorder: bool = True,
    ) -> PruningManager:
        """Plan the spec; with no channels given, prune the all-zero ones. Returns the manager for chaining."""
        self.spec = prunespec.plan(
            self.net, inputs, pruned_inputs, pruned_outputs, constrained=constrained, reorder=reorder
        )
        return self

    def get_mock_model(self) -> torch.nn.Module:
        """A module that emulates the pruned model; `net` is unchanged."""
        return prunespec.mock(self.net, self._computed())

    def prune(self) -> torch.nn.Module:
        """Prune `net` in place and return it. The spec stays available for saving."""
        return prunespec.prune(self.net, self._computed())

    def _computed(self) -> PruningSpec:
        if self.spec is None:
            raise RuntimeError("call PruningManager.compute(inputs, ...) before mocking or pruning")
        return self.spec
