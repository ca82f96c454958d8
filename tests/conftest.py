"""Every test starts from the same random state, Hypothesis draws the same examples every run, and torch computes on
one thread.

A test that draws from torch's or Python's global generator (a module's initial weights, `torch.randn`) then draws
the same numbers whether it runs alone, in another order, or after a new test is added. Tests still seed what they
compare explicitly; this is the floor under the ones that only need shapes. Hypothesis runs derandomized, so a run
finds what the last one found; `pytest --hypothesis-profile explore` draws new examples.

One thread: the test models are small, so torch's thread pool gains little, and on a shared machine its threads wait
for each other on every op (tests/test_invariant.py took 124 s with torch's two threads and 14 s with one, on two
cores). `OMP_NUM_THREADS` carries the setting to the command-line runs the tests start.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from hypothesis import settings

os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

settings.register_profile("seeded", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("seeded")


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test() -> None:
    torch.manual_seed(0)
    random.seed(0)
