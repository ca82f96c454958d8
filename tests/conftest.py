"""Every test starts from the same random state, and torch computes on one thread.

A test that draws from torch's or Python's global generator (a module's initial weights, `torch.randn`) then draws
the same numbers whether it runs alone, in another order, or after a new test is added. Tests still seed what they
compare explicitly; this is the floor under the ones that only need shapes.

One thread: the test models are small, so torch's thread pool gains little, and on a busy machine its threads spin
waiting for each other (a sweep of tests/test_layout.py used twice the CPU time with two threads than with one
next to two busy processes). `OMP_NUM_THREADS` carries the setting to the command-line runs the tests start.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test() -> None:
    torch.manual_seed(0)
    random.seed(0)
