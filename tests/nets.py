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
    """A channel shuffle it follows, then a custom autograd function the planner cannot: it keeps those channels."""

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
    """A grouped convolution that is not depthwise (ResNeXt, RegNet), and a grouped transposed one."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(12, 6, 1)
        self.up = nn.ConvTranspose2d(6, 4, 3, padding=1, groups=2)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = self.conv3(F.relu(self.grouped(F.relu(self.conv1(x)))))
        return self.head(F.relu(self.up(y)))


class ChannelsLast(nn.Module):
    """A ConvNeXt block: depthwise conv, permute to channels-last, LayerNorm, MLP, layer scale, permute back."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 8)
        self.layer_scale = nn.Parameter(torch.linspace(0.5, 1.5, 8).reshape(8, 1, 1))
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return self.head(x + self.layer_scale * y.permute(0, 3, 1, 2))


class Norms(nn.Module):
    """GroupNorm (statistics across channels), InstanceNorm and PReLU (per channel)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.gn = nn.GroupNorm(4, 12)
        self.conv2 = nn.Conv2d(12, 10, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(10, affine=True)
        self.prelu = nn.PReLU(10)
        self.conv3 = nn.Conv2d(10, 8, 1)
        self.shared = nn.PReLU()
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.conv2(F.relu(self.gn(self.conv1(x))))
        y = self.conv3(self.prelu(self.inorm(y)))
        return self.head(self.shared(y))


class Chunked(nn.Module):
    """ShuffleNet-style: chunk the channels in two, transform one half, concatenate."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.branch = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(12, 4, 1)
        self.other = nn.Conv2d(3, 12, 1)
        self.split_head = nn.Conv2d(5, 4, 1)

    def forward(self, x):
        y = F.relu(self.stem(x))
        left, right = y.chunk(2, dim=1)
        y = torch.cat([left, F.relu(self.branch(right))], dim=1)
        fixed, _ = self.other(x).split([5, 7], dim=1)  # sizes written as numbers: these channels must stay
        return self.head(y) + self.split_head(fixed)


class FunctionalWeights(nn.Module):
    """Swin-style: a parent's forward uses a child Linear's weight directly, and a conv pads before convolving."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.qkv = nn.Linear(8, 12)
        self.proj = nn.Linear(12, 8)
        self.reflect = nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect")
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        x = self.embed(x)
        t = x.flatten(2).transpose(1, 2)
        t = F.linear(F.relu(F.linear(t, self.qkv.weight, self.qkv.bias)), self.proj.weight, self.proj.bias)
        x = x + t.transpose(1, 2).reshape(x.shape)
        return self.head(F.relu(self.reflect(x)))


class Conv1d3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 6, 3)
        self.c3 = nn.Conv3d(6, 5, 1)
        self.c4 = nn.Conv3d(5, 2, 1)

    def forward(self, x):
        y = F.relu(self.c2(F.relu(self.bn(self.c1(x)))))  # (n, 6, l)
        return self.c4(F.relu(self.c3(y[:, :, None, None, :])))


class Reshapes(nn.Module):
    """Two reshapes: one that re-reads its sizes from the tensor, one with the channel count written in."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.fa = nn.Linear(8, 5)
        self.fb = nn.Linear(8, 5)

    def forward(self, x):
        ya = F.relu(self.a(x))
        ya = ya.reshape(ya.shape[0], ya.shape[1], -1)  # (n, c, h*w): follows pruning
        yb = F.relu(self.b(x)).view(-1, 8, 64)  # the 8 is a constant: must not shrink
        return self.fa(ya.transpose(1, 2)) + self.fb(yb.transpose(1, 2))


class Attention(nn.Module):
    """Multi-head attention (heads stay whole, the output projection prunes) and scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 12)
        self.q = nn.Linear(12, 8)
        self.k = nn.Linear(12, 8)
        self.v = nn.Linear(12, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        t = self.embed(x)
        a, _ = self.mha(t, t, t, need_weights=False)
        h = F.relu(self.fc(a))
        o = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h))
        return self.head(o)


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle: split into groups, transpose, merge back."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 6, 1)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        n, c, h, w = y.shape
        y = y.view(n, 3, c // 3, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(F.relu(self.conv2(y)))


class TokenNet(nn.Module):
    """ViT-style tokens: patch embedding, a class token concatenated along the sequence, position embeddings,
    a Swin-style roll of the token grid, and an MLP."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 12, 2, stride=2)
        self.class_token = nn.Parameter(torch.randn(1, 1, 12))
        self.pos = nn.Parameter(torch.randn(1, 17, 12))
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        t = torch.roll(self.patch(x), shifts=(1, 1), dims=(2, 3)).flatten(2).transpose(1, 2)
        t = torch.cat([self.class_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        t = t + self.fc2(F.gelu(self.fc1(t)))
        return self.head(t[:, 0])


SMALL_NETS = {
    "tokens": (TokenNet, [(2, 3, 8, 8)]),
    "shuffle": (Shuffle, [(2, 3, 8, 8)]),
    "attention": (Attention, [(2, 5, 6)]),
    "reshapes": (Reshapes, [(2, 3, 8, 8)]),
    "channels_last": (ChannelsLast, [(2, 3, 8, 8)]),
    "norms": (Norms, [(2, 3, 8, 8)]),
    "chunked": (Chunked, [(2, 3, 8, 8)]),
    "functional_weights": (FunctionalWeights, [(2, 3, 8, 8)]),
    "conv1d_3d": (Conv1d3d, [(2, 3, 12)]),
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
    """Give normalisation layers non-trivial statistics and affine parameters, so a misplaced channel shows."""
    g = torch.Generator().manual_seed(seed + 2)
    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, norms):
                continue
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5)
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * 0.1)
