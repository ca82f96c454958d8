"""Channel tricks of timm's architectures, each reproduced on a small module, planned and checked in both modes.

- a module reached from several places (CoaT's shared convolutional position encoding, `mlp2 = mlp3 = mlp4`);

Each test plans random patterns, stores and reloads the spec, and checks the pruned model against the mock in
float64 (`tests/invariant.py`), plus what the trick needs: the model left untouched, which channels go and which
stay with a reason. The timm models themselves are swept by `make zoo` (scripts/zoo_timm.py), and a fast subset
runs in tests/test_zoo_subset.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunespec
from tests.invariant import assert_invariant, random_request

MODES = [False, True]
MODE_IDS = ["unconstrained", "constrained"]


# --------------------------------------------------------------------------------------------- shared modules


class SharedEncoding(nn.Module):
    """One depthwise position encoding and one MLP used by two branches, as CoaT shares its modules."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.encoding = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.first = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.first.encoding = self.encoding  # the same module under a second name, as timm writes it
        self.mlp = nn.Sequential(nn.Conv2d(8, 12, 1), nn.GELU(), nn.Conv2d(12, 8, 1))
        self.mlp_again = self.mlp
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 5, 1))  # not shared: prunes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a = self.first(x + self.first.encoding(x))
        b = self.second(a + self.encoding(a))
        return self.head(self.mlp(a) + self.mlp_again(b))


@pytest.mark.parametrize("constrained", MODES, ids=MODE_IDS)
def test_shared_module_prunes_consistently(constrained: bool, tmp_path) -> None:
    torch.manual_seed(0)
    model = SharedEncoding().double().eval()
    inputs = [torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]
    tensors = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    pruned_inputs, pruned_outputs = random_request(model, inputs, 3, 0.4, "both")
    spec, _, _ = assert_invariant(
        model, inputs, tmp_path, pruned_inputs=pruned_inputs, pruned_outputs=pruned_outputs, constrained=constrained
    )
    # Tracing and mocking swap the model's tensors for others and back: every one must be its own again.
    for name, t in model.state_dict(keep_vars=True).items():
        assert t is tensors[name] and not t.is_meta, name
    reasons = {k.reason for k in spec.kept}
    assert any("mlp.2.weight is used 2 times in forward" in r for r in reasons), reasons
    assert spec.summary.parameters_after < spec.summary.parameters_before
