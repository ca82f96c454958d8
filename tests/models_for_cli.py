"""Tiny models that the command-line tests name as `models_for_cli:CALLABLE`.

`tiny_net` is the model most CLI tests plan and apply; `wider_net` has the same layer names with other shapes (to
apply a spec to the wrong model); `not_a_model` returns something that is not a module.
"""

from __future__ import annotations

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


def not_a_model() -> list[int]:
    return [1, 2, 3]
