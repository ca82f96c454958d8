"""Every test starts from the same random state.

A test that draws from torch's or Python's global generator (a module's initial weights, `torch.randn`) then draws
the same numbers whether it runs alone, in another order, or after a new test is added. Tests still seed what they
compare explicitly; this is the floor under the ones that only need shapes.
"""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test() -> None:
    torch.manual_seed(0)
    random.seed(0)
