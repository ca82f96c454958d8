"""Tiny models that the command-line tests name as `models_for_cli:CALLABLE`.

`tiny_net` is the model most CLI tests plan and apply; `wider_net` has the same layer names with other shapes (to
apply a spec to the wrong model); `looks_at_values` is `tiny_net` with a forward that cannot run on meta tensors;
`branches_on_values` is `tiny_net` whose forward takes a branch by the values of its output, which no exported graph
can hold; `not_a_model` returns something that is not a module.
"""

from __future__ import annotations

import torch
from torch import nn


def tiny_net(width: int = 8) -> nn.Sequential:
    """Conv -> BN -> ReLU -> Conv -> ReLU -> global pool -> Linear: a producer, a user and two consumers."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 8, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def wider_net() -> nn.Sequential:
    return tiny_net(width=12)


class _LooksAtValues(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(x).all():  # a meta tensor has no values to look at
            raise ValueError("the input has non-finite values")
        return super().forward(x)


def looks_at_values() -> nn.Sequential:
    return _LooksAtValues(*tiny_net())


class _BranchesOnValues(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if y.sum() > 0:  # which branch runs depends on the values: data-dependent control flow
            return y
        return -y


def branches_on_values() -> nn.Sequential:
    return _BranchesOnValues(*tiny_net())


def not_a_model() -> list[int]:
    return [1, 2, 3]
