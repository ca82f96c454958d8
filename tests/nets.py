"""Small models that each exercise one way channels flow, for the invariant tests.

Every class builds in float64-friendly form and takes inputs made by `inputs_for`.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class ConvConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 10, 3)
        self.conv3 = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class ConstantArithmetic(nn.Module):
    """Scalars and broadcast constants between layers: nothing to prune in them, nothing to pin."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3)
        self.conv2 = nn.Conv2d(12, 6, 3)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.conv1(x) * 2.0 + 1.0
        y = (y - 0.5) / 3.0
        y = torch.sigmoid(self.conv2(y)) * 4
        return self.conv3(y.clamp(0.1, 3.0) ** 2)


class Residual(nn.Module):
    """Two producers added together: their channels are one."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.a = nn.Conv2d(10, 10, 3, padding=1)
        self.b = nn.Conv2d(10, 10, 1)
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.a(x) + self.b(x)
        y = y + x
        return self.head(F.relu(y))


class Concat(nn.Module):
    """Producers concatenated along channels, read by one consumer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(15, 7, 3)
        self.out = nn.Conv2d(7, 3, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), F.relu(self.b(x)), self.c(x)], dim=1)
        return self.out(F.relu(self.head(y)))


class Fork(nn.Module):
    """One producer, several consumers that disagree about what they need."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 6, 1)
        self.b = nn.Conv2d(16, 6, 3, padding=1)
        self.c = nn.Conv2d(16, 6, 1)
        self.head = nn.Conv2d(18, 4, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        return self.head(torch.cat([self.a(y), self.b(y), self.c(y)], 1))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(12, 10, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.up2 = nn.ConvTranspose2d(10, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(F.relu(self.up2(F.relu(self.bn(self.up(F.relu(self.down(x))))))))


class Depthwise(nn.Module):
    """A MobileNet-style block: expand, depthwise, project, with a residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 24, 1)
        self.bn1 = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.bn2 = nn.BatchNorm2d(24)
        self.project = nn.Conv2d(24, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        return self.head(x + self.project(y))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.fc2 = nn.Linear(32, 24)
        self.bn = nn.BatchNorm1d(24)
        self.fc3 = nn.Linear(24, 16)
        self.fc4 = nn.Linear(16, 3)

    def forward(self, x):
        x = F.gelu(self.fc1(x))
        x = F.relu(self.bn(self.fc2(x)))
        return self.fc4(torch.tanh(self.fc3(x)) + 0.1)


class ConvFlattenLinear(nn.Module):
    """VGG-style: the linear layer reads every spatial position of every channel."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 1)
        x = F.relu(self.conv2(x))
        x = x.view(x.size(0), -1) if x.shape[0] > 1 else torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(2, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x, z):
        y = F.relu(self.a(x)) * torch.sigmoid(self.b(z))
        return self.head(F.relu(self.mix(y)))


class BatchNormBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 12, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))))


class SqueezeExcite(nn.Module):
    """Global pooling -> conv -> sigmoid -> multiply, as in EfficientNet."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.fc1 = nn.Conv2d(12, 4, 1)
        self.fc2 = nn.Conv2d(4, 12, 1)
        self.head = nn.Conv2d(12, 3, 1)

    def forward(self, x):
        y = F.silu(self.conv(x))
        scale = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(y * scale)


class LayerScale(nn.Module):
    """A bare parameter multiplied on the channel axis must shrink with the channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 10).reshape(10, 1, 1))
        self.conv2 = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        return self.conv2(self.gamma * F.relu(self.conv1(x)))


class UnknownOp(nn.Module):
    """A channel shuffle and a custom autograd function the planner cannot follow: it must keep those channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.conv4 = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        y = self.conv2(y)
        y = _Twice.apply(y)
        return self.conv4(F.relu(self.conv3(y)))


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.roll(x, 1, dims=1) * 2

    @staticmethod
    def backward(ctx, grad):
        return torch.roll(grad, -1, dims=1) * 2


class Grouped(nn.Module):
    """A grouped convolution that is not depthwise: the planner keeps its channels (for now) and says so."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.grouped(F.relu(self.conv1(x)))))


SMALL_NETS = {
    "grouped": (Grouped, [(2, 3, 8, 8)]),
    "conv_conv": (ConvConv, [(2, 3, 10, 10)]),
    "constant_arithmetic": (ConstantArithmetic, [(2, 3, 10, 10)]),
    "residual": (Residual, [(2, 3, 8, 8)]),
    "concat": (Concat, [(2, 3, 8, 8)]),
    "fork": (Fork, [(2, 3, 8, 8)]),
    "transposed": (Transposed, [(2, 3, 8, 8)]),
    "depthwise": (Depthwise, [(2, 3, 8, 8)]),
    "mlp": (MLP, [(4, 10)]),
    "conv_flatten_linear": (ConvFlattenLinear, [(2, 3, 8, 8)]),
    "two_inputs": (TwoInputs, [(2, 3, 8, 8), (2, 2, 8, 8)]),
    "batchnorm_between": (BatchNormBetween, [(2, 3, 10, 10)]),
    "squeeze_excite": (SqueezeExcite, [(2, 3, 8, 8)]),
    "layer_scale": (LayerScale, [(2, 3, 8, 8)]),
    "unknown_op": (UnknownOp, [(2, 3, 8, 8)]),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    """The named model in float64 eval mode with randomised batch-norm statistics, and seeded inputs."""
    cls, shapes = SMALL_NETS[name]
    torch.manual_seed(seed)
    model = cls().double().eval()
    randomize_norms(model, seed)
    return model, inputs_for(shapes, seed)


def inputs_for(shapes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Give batch norms non-trivial statistics, so a misplaced channel changes the output."""
    g = torch.Generator().manual_seed(seed + 2)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g, dtype=m.running_mean.dtype) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g, dtype=m.running_var.dtype) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g, dtype=m.weight.dtype) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g, dtype=m.bias.dtype) * 0.1)
