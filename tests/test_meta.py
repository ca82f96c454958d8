"""The meta-trace shortcuts (`prunespec.planner.meta`) against the ops' own meta kernels.

For each call: where `made_output` makes a tensor, it has the shape, strides and dtype that the real meta kernel
gives (and in place, it is the input); where the kernel raises, the shortcut makes nothing, so the kernel still
raises during a trace; for arguments that are not plain, it makes nothing and the kernel runs.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from prunespec.planner.meta import MAKERS, made_output


def meta(*shape, dtype=torch.float32, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def agrees(func, op: str, *args, **kwargs) -> bool:
    """Whether the shortcut made a tensor; fails the test if it differs from the kernel's output."""
    made = made_output(op, args, kwargs)
    try:
        real = func(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError):
        assert made is None, f"{op}{args}: the kernel raises, the shortcut made {made.shape}"
        return False
    if made is None:
        return False
    assert (made.shape, made.stride(), made.dtype) == (real.shape, real.stride(), real.dtype), (op, args, kwargs)
    first = args[0] if args else None
    assert (made is first) == (real is first)
    return True


def _random_conv(rng: random.Random, spatial: int) -> tuple:
    groups = rng.choice([1, 1, 2, 4])
    cin, cout = groups * rng.randint(1, 4), groups * rng.randint(1, 4)
    kernel = [rng.randint(1, 4) for _ in range(spatial)]
    x = meta(rng.randint(1, 3), cin, *[rng.randint(1, 12) for _ in range(spatial)])
    weight = meta(cout, cin // groups, *kernel)
    bias = meta(cout) if rng.random() < 0.5 else None
    stride = rng.choice([1, 2, 3, [rng.randint(1, 3) for _ in range(spatial)]])
    padding = rng.choice([0, 1, 2, [rng.randint(0, 2) for _ in range(spatial)]])
    dilation = rng.choice([1, 2, [rng.randint(1, 2) for _ in range(spatial)]])
    return x, weight, bias, stride, padding, dilation, groups


@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_convolutions_match_the_kernel_on_random_arguments(spatial):
    func = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}[spatial]
    rng = random.Random(spatial)
    made = 0
    for _ in range(150):
        x, weight, bias, stride, padding, dilation, groups = _random_conv(rng, spatial)
        if rng.random() < 0.5:
            made += agrees(func, f"conv{spatial}d", x, weight, bias, stride, padding, dilation, groups)
        else:
            kwargs = {"bias": bias, "stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
            made += agrees(func, f"conv{spatial}d", x, weight, **kwargs)
    assert made > 75  # most random convolutions are plain; the rest (kernel larger than the input) raise


def test_convolutions_that_are_not_plain_run_the_kernel():
    x, w = meta(1, 4, 8, 8), meta(6, 4, 3, 3)
    assert agrees(torch.conv2d, "conv2d", x, w, None, 1, 1)
    unusual = [
        (meta(1, 4, 8, 8, channels_last=True), w),  # channels last: the kernel decides the output's layout
        (x, meta(6, 4, 3, 3, channels_last=True)),
        (meta(1, 4, 8, 8, dtype=torch.float64), w),  # mixed dtypes: the kernel raises
        (meta(4, 8, 8), w),  # unbatched
    ]
    for args in unusual:
        assert made_output("conv2d", args, {}) is None
        agrees(torch.conv2d, "conv2d", *args)
    assert made_output("conv2d", (x, w), {"padding": "same"}) is None
    assert not agrees(torch.conv2d, "conv2d", x, meta(6, 3, 3, 3))  # channels do not match: the kernel raises
    assert not agrees(torch.conv2d, "conv2d", meta(1, 4, 2, 2), w)  # kernel larger than the input


@pytest.mark.parametrize(
    "a, b",
    [
        ((1, 8, 5, 5), (1, 8, 1, 1)),  # squeeze-and-excitation
        ((1, 8, 1, 1), (1, 8, 5, 5)),
        ((2, 8, 5, 5), (8, 1, 1)),
        ((8,), (3, 8)),
        ((), (2, 3)),
        ((1, 8, 5, 5), (1, 8, 5, 5)),
        ((1, 1, 1, 1), (1, 8, 1, 1)),
        ((3, 4), (4, 3)),  # does not broadcast: the kernel raises
    ],
)
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_broadcasting_products_match_the_kernel(op, a, b):
    func = getattr(torch, op)
    shape = torch.broadcast_shapes(a, b) if a != (3, 4) else None
    assert agrees(func, op, meta(*a), meta(*b)) == (shape is not None)
    assert agrees(func, op, meta(*a), 2.5) and agrees(func, op, 3, meta(*b))
    in_place = getattr(torch.Tensor, op + "_")
    assert agrees(in_place, op + "_", meta(*a), meta(*b)) == (shape == a)


def test_broadcasting_products_that_are_not_plain_run_the_kernel():
    x = meta(1, 8, 5, 5)
    for args, kwargs in [
        ((x, meta(1, 8, 5, 5, dtype=torch.float64)), {}),  # promotion
        ((meta(1, 8, 5, 5, dtype=torch.int64), 2), {}),  # integer division makes floats
        ((x, meta(1, 8, 5, 5, channels_last=True)), {}),
        ((x, 1j), {}),
        ((x, x), {"out": meta(1, 8, 5, 5)}),
    ]:
        assert made_output("div", args, kwargs) is None
        agrees(torch.div, "div", *args, **kwargs)
    assert agrees(torch.add, "add", x, x, alpha=2)


@pytest.mark.parametrize("dim", [0, 1, 3, -1, -4])
def test_concatenations_match_the_kernel(dim):
    shapes = [[2, 3, 4, 5], [2, 3, 4, 5], [2, 1, 4, 5], [1, 3, 1, 5]]
    for n in range(1, 4):
        tensors = []
        for shape in shapes[:n]:
            grown = list(shape)
            grown[dim] += n
            tensors.append(meta(*grown))
        agrees(torch.cat, "cat", tensors, dim)
        agrees(torch.cat, "cat", tensors, dim=dim)
    same = [meta(2, 3, 4, 5), meta(2, 3, 4, 5)]
    assert agrees(torch.cat, "cat", same, dim) and agrees(torch.cat, "cat", tensors=same, dim=dim)
    assert not agrees(torch.cat, "cat", [meta(2, 3, 4, 5), meta(2, 3)], dim)  # the kernel raises
    assert not agrees(torch.cat, "cat", [meta(2, 3, 4, 5), meta(2, 3, 4, 5, channels_last=True)], dim)
    assert not agrees(torch.cat, "cat", same, 4)  # out of range: the kernel raises


@pytest.mark.parametrize("size", [1, 3, (2, 5), (None, 4), (7, None), [1, 1]])
def test_adaptive_average_pooling_matches_the_kernel(size):
    for shape in [(1, 8, 7, 7), (2, 3, 9, 4), (3, 7, 7)]:
        assert agrees(F.adaptive_avg_pool2d, "adaptive_avg_pool2d", meta(*shape), size)
    assert not agrees(F.adaptive_avg_pool2d, "adaptive_avg_pool2d", meta(1, 8, 7, 7, channels_last=True), size)
    assert agrees(F.adaptive_avg_pool1d, "adaptive_avg_pool1d", meta(2, 8, 9), 3)
    assert agrees(F.adaptive_avg_pool3d, "adaptive_avg_pool3d", meta(2, 8, 9, 4, 4), (1, 2, None))


def test_activations_keep_the_input_shape_and_in_place_ones_return_the_input():
    x = meta(1, 8, 5, 5)
    assert agrees(F.relu, "relu", x) and agrees(torch.relu_, "relu_", x)
    assert agrees(F.silu, "silu", x, inplace=True)
    assert made_output("relu", (torch.zeros(2),), {}) is None  # a real tensor runs the real op


def test_every_maker_is_for_an_op_torch_has():
    for op in MAKERS:
        assert any(hasattr(where, op) for where in (torch, F, torch.Tensor)), op
