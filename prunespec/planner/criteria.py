"""Importance criteria: how much each channel matters, so that `select` can prune the least important ones.

Start with `CRITERIA`, the registry. Every criterion scores the channels of one weight along one axis, higher
meaning more important, from the weight's *rows*: the weight moved so that the scored axis comes first and
flattened, one row per channel (`rows`). `hrank` scores feature maps instead (`feature_ranks`), which `select`
collects by running the model; `random` scores nothing but a seeded generator.

Scores of different layers are not on one scale. `rescale` puts one layer's (or one segment's) scores on a common
scale for global ranking: LAMP's own rescaling, and division by the mean for the others. Within one layer it never
changes the order, which is why LAMP chosen layer by layer is just L2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Criterion:
    """One importance criterion: `score` maps rows (channels, elements) to one score per channel."""

    name: str
    description: str
    score: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: not computed from weights
    rescale: Callable[[torch.Tensor], torch.Tensor] = lambda scores: scores / scores.mean().clamp_min(1e-300)
    global_only: bool = False  # the criterion only differs from another one when ranked across layers
    needs_features: bool = False  # scores come from feature maps of a forward pass


def rows(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """One float64 row per channel of `weight` along `axis`.

    >>> rows(torch.arange(6.).reshape(2, 3), axis=1)
    tensor([[0., 3.],
            [1., 4.],
            [2., 5.]], dtype=torch.float64)
    """
    w = weight.detach().to(torch.float64).movedim(axis, 0)
    return w.reshape(w.shape[0], -1)


def l1(r: torch.Tensor) -> torch.Tensor:
    """Sum of absolute values per channel.

    >>> l1(torch.tensor([[1., -2.], [0., 0.5]]))
    tensor([3.0000, 0.5000])
    """
    return r.abs().sum(dim=1)


def l2(r: torch.Tensor) -> torch.Tensor:
    """Euclidean norm per channel.

    >>> l2(torch.tensor([[3., 4.], [1., 0.]]))
    tensor([5., 1.])
    """
    return r.norm(dim=1)


def fpgm(r: torch.Tensor) -> torch.Tensor:
    """Summed distance of each channel to all others (FPGM, He et al. 2019).

    Channels near the geometric median of their layer are the ones the others can stand in for, so they score
    lowest. Two equal channels and one far away: the equal ones score lower.

    >>> fpgm(torch.tensor([[1., 0.], [1., 0.], [5., 3.]]))
    tensor([ 5.,  5., 10.])
    """
    return torch.cdist(r, r).sum(dim=1)


def squared(r: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean norm per channel, the magnitude LAMP starts from."""
    return r.pow(2).sum(dim=1)


def lamp(scores: torch.Tensor) -> torch.Tensor:
    """LAMP rescaling (Lee et al. 2021): each score over the sum of the scores not below it in its layer.

    The largest channel of every layer scores 1, so a layer is never emptied by a global threshold, and layers with
    many small channels are not pruned out before layers with few large ones.

    >>> lamp(torch.tensor([1., 3., 4.]))
    tensor([0.1250, 0.4286, 1.0000])
    """
    order = scores.argsort()
    ascending = scores[order]
    tails = ascending.flip(0).cumsum(0).flip(0)  # tails[i] = sum of ascending[i:]
    out = torch.empty_like(scores)
    out[order] = ascending / tails.clamp_min(1e-300)
    return out


def feature_ranks(features: torch.Tensor, axis: int) -> torch.Tensor:
    """Summed matrix rank of each channel's 2-D feature map over a batch (HRank, Lin et al. 2020).

    `features` is an activation with channels along `axis` and two spatial dimensions after it. A channel whose
    maps have low rank carries little information. `select` divides by the number of images.

    >>> x = torch.zeros(1, 2, 3, 3)
    >>> x[0, 0] = torch.eye(3)
    >>> x[0, 1, 0] = 1.0  # one non-zero row: rank 1
    >>> feature_ranks(x, axis=1)
    tensor([3., 1.], dtype=torch.float64)
    """
    maps = features.detach().movedim(axis, 1).to(torch.float64)
    return torch.linalg.matrix_rank(maps).sum(dim=0).to(torch.float64)


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("l1", "sum of absolute weights of the channel", score=l1),
        Criterion("l2", "Euclidean norm of the channel's weights", score=l2),
        Criterion("fpgm", "distance to the other channels of its layer (FPGM)", score=fpgm),
        Criterion(
            "lamp", "squared norm over the sum of the larger ones in its layer (LAMP)", squared, lamp, True, False
        ),
        Criterion("hrank", "average rank of the channel's feature maps (HRank)", needs_features=True),
        Criterion("random", "a seeded random choice, as a baseline"),
    )
}
