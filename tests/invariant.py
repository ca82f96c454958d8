"""Shared checks for the invariant: prune(copy, spec)(x) == mock(model, spec)(x) in float64.

`random_request` draws a random pruning pattern from a traced model with a fixed seed; `assert_invariant` plans,
stores and reloads the spec, then compares the pruned model with the mock.
"""

from __future__ import annotations

import copy
import math

import torch
from torch.utils._pytree import tree_leaves

import prunespec
from scripts import zoo

TOLERANCE = 1e-12


def random_request(model, inputs, seed: int, fraction: float, side: str):
    """Random (weight, channel) pairs: each channel of every consumer (or producer) is picked with `fraction`.

    The same drawing as the zoo sweep's, so a failing pattern found there reproduces here.
    """
    return zoo.random_request(model, inputs, seed, side, fraction)


def max_difference(a, b) -> float:
    diffs = [(x - y).abs().max().item() for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True)]
    return math.nan if any(math.isnan(d) for d in diffs) else max(diffs, default=0.0)  # max() misorders NaN


def assert_invariant(model, inputs, tmp_path, tolerance: float = TOLERANCE, **plan_kwargs):
    """Plan, save, reload, then check pruned == mock and that the original model was left alone."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = prunespec.plan(model, inputs, **plan_kwargs)
    path = tmp_path / "model.prunespec.json"
    spec.save(path)
    stored = prunespec.load_spec(path)
    assert stored == spec

    mock = prunespec.mock(model, stored)
    with torch.no_grad():
        expected = mock(*inputs)
        pruned = prunespec.prune(copy.deepcopy(model), stored)
        actual = pruned(*inputs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed in the original model"
    for (key, a), (key2, b) in zip(model.state_dict().items(), pruned.state_dict().items(), strict=True):
        assert key == key2
    scale = max((t.abs().max().item() for t in tree_leaves(expected)), default=1.0)
    diff = max_difference(actual, expected)
    assert diff <= tolerance * max(1.0, scale), f"max |pruned - mock| = {diff:.3g} (output scale {scale:.3g})"
    n_params = sum(p.numel() for p in pruned.parameters())
    assert n_params == stored.summary.parameters_after
    return stored, pruned, diff
