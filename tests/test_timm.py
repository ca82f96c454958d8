"""Channel tricks of timm's architectures, each reproduced on a small module, planned and checked in both modes.

- a module reached from several places (CoaT's shared convolutional position encoding, `mlp2 = mlp3 = mlp4`);
- weight standardisation (NFNets' `ScaledStdConv2d`, BiT's `StdConv2d`): the weight is normalised per filter in
  forward, so output channels prune exactly and input channels stay, with the reason;
- global response normalisation (ConvNeXt-V2's GRN): channels divided by their mean over the channel axis, a norm
  over channels, kept by default and run on the kept channels under `through_norms`, while the rest prunes.

Each test plans random patterns, stores and reloads the spec, and checks the pruned model against the mock in
float64 (`tests/invariant.py`), plus what the trick needs: the model left untouched, which channels go and which
stay with a reason. The timm models themselves are swept by `make zoo` (scripts/zoo_timm.py), and a fast subset
runs in tests/test_zoo_subset.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.invariant import assert_invariant, random_request

MODES = [False, True]
MODE_IDS = ["unconstrained", "constrained"]


# --------------------------------------------------------------------------------------------- shared modules


class SharedEncoding(nn.Module):
    """One depthwise position encoding and one MLP used by two branches, as CoaT shares its modules."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.encoding = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.first = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.first.encoding = self.encoding  # the same module under a second name, as timm writes it
        self.mlp = nn.Sequential(nn.Conv2d(8, 12, 1), nn.GELU(), nn.Conv2d(12, 8, 1))
        self.mlp_again = self.mlp
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 5, 1))  # not shared: prunes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a = self.first(x + self.first.encoding(x))
        b = self.second(a + self.encoding(a))
        return self.head(self.mlp(a) + self.mlp_again(b))


@pytest.mark.parametrize("constrained", MODES, ids=MODE_IDS)
def test_shared_module_prunes_consistently(constrained: bool, tmp_path) -> None:
    torch.manual_seed(0)
    model = SharedEncoding().double().eval()
    inputs = [torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]
    tensors = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    pruned_inputs, pruned_outputs = random_request(model, inputs, 3, 0.4, "both")
    spec, _, _ = assert_invariant(
        model, inputs, tmp_path, pruned_inputs=pruned_inputs, pruned_outputs=pruned_outputs, constrained=constrained
    )
    # Tracing and mocking swap the model's tensors for others and back: every one must be its own again.
    for name, t in model.state_dict(keep_vars=True).items():
        assert t is tensors[name] and not t.is_meta, name
    reasons = {k.reason for k in spec.kept}
    assert any("mlp.2.weight is used 2 times in forward" in r for r in reasons), reasons
    assert spec.summary.parameters_after < spec.summary.parameters_before


# ------------------------------------------------------------------------------------------ weight standardisation


class ConvStandardised(nn.Conv2d):
    """Each filter standardised over its inputs and kernel, then scaled by a learnt gain, as timm's
    ScaledStdConv2d does (and StdConv2d without the gain)."""

    def __init__(self, *args, gain: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5) if gain else None
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = (self.gain * self.scale).view(-1) if self.gain is not None else None
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=gain, training=True,
                              momentum=0.0, eps=1e-6).reshape_as(self.weight)  # fmt: skip
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Standardised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = ConvStandardised(8, 12, 3, padding=1)
        self.depthwise = ConvStandardised(12, 12, 3, padding=1, groups=12, gain=False)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.depthwise(torch.relu(self.conv(torch.relu(self.stem(x))))))


@pytest.mark.parametrize("constrained", MODES, ids=MODE_IDS)
def test_standardised_weight_prunes_its_filters(constrained: bool, tmp_path) -> None:
    torch.manual_seed(0)
    model = Standardised().double().eval()
    inputs = [torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]
    pruned_inputs, pruned_outputs = random_request(model, inputs, 5, 0.4, "both")
    asked = {w for w, _ in pruned_inputs}
    assert "conv.weight" in asked, "the standardised convolution is a consumer the request can name"
    spec, pruned, _ = assert_invariant(
        model, inputs, tmp_path, pruned_inputs=pruned_inputs, pruned_outputs=pruned_outputs, constrained=constrained
    )
    asked_outputs = {ch for w, ch in pruned_outputs if w == "conv.weight"}
    # Output channels (filters, their gains, the depthwise filters after them) go as asked (and those the head's
    # pruned inputs free)...
    assert 0 < pruned.conv.out_channels <= 12 - len(asked_outputs)
    assert pruned.conv.gain.shape[0] == pruned.depthwise.weight.shape[0] == pruned.conv.out_channels
    # ...input channels stay, with the reason.
    assert pruned.conv.in_channels == 8
    reasons = {k.reason for k in spec.kept if k.tensor == "conv.weight"}
    assert reasons == {"is read by a weight standardised over its input channels"}, reasons


# ------------------------------------------------------------------------------------ global response normalisation


class ResponseNorm(nn.Module):
    """Global response normalisation on a channels-last input, written as timm's GlobalResponseNorm is."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.bias = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_g = x.norm(p=2, dim=(1, 2), keepdim=True)
        x_n = x_g / (x_g.mean(dim=-1, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1), x * x_n)


class ResponseNormBlock(nn.Module):
    """A ConvNeXt-V2 block without its layer norm: depthwise convolution, then an MLP with GRN, on a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dwconv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc1, self.grn, self.fc2 = nn.Linear(8, 16), ResponseNorm(16), nn.Linear(16, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.fc2(self.grn(F.gelu(self.fc1(y)))).permute(0, 3, 1, 2)
        return self.head(x + y)


@pytest.mark.parametrize("through_norms", [False, True], ids=["default", "through_norms"])
@pytest.mark.parametrize("constrained", MODES, ids=MODE_IDS)
def test_response_norm_is_a_norm_over_channels(constrained: bool, through_norms: bool, tmp_path) -> None:
    torch.manual_seed(0)
    model = ResponseNormBlock().double().eval()
    inputs = [torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]
    pruned_inputs, pruned_outputs = random_request(model, inputs, 2, 0.4, "both")
    spec, pruned, _ = assert_invariant(model, inputs, tmp_path, pruned_inputs=pruned_inputs,
                                       pruned_outputs=pruned_outputs, constrained=constrained,
                                       through_norms=through_norms)  # fmt: skip
    # The residual stream prunes either way...
    assert pruned.stem.out_channels < 8
    hidden = pruned.fc1.out_features
    if through_norms:  # ...and the hidden channels go too: the pruned GRN takes its mean over those it keeps
        assert hidden < 16 and pruned.grn.weight.shape[0] == pruned.fc2.in_features == hidden
        assert spec.layers["grn"].normalises is not None
    else:  # ...while the channels GRN normalises together stay, with the reason
        assert hidden == 16
        reasons = {k.reason for k in spec.kept if k.tensor in ("fc1.weight", "fc2.weight")}
        assert reasons == {"is reduced over its channels"}, reasons


# ------------------------------------------------------------------------------- a split the pruned model cannot run


class SplitInTwo(nn.Module):
    """Channels split at a size kept as an attribute and unpacked into two, as timm's CSPNet does: pruned unevenly,
    the split gives another number of parts and the model's own code raises a ValueError."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.half = 4
        self.left, self.right = nn.Conv2d(4, 5, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.expand(x).split(self.half, dim=1)
        return self.left(a) + self.right(b)


@pytest.mark.parametrize("constrained", MODES, ids=MODE_IDS)
def test_model_code_failing_on_pruned_sizes_keeps_channels(constrained: bool, tmp_path) -> None:
    model = SplitInTwo().double().eval()
    inputs = [torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]
    spec, _, _ = assert_invariant(model, inputs, tmp_path, pruned_outputs=[("expand.weight", c) for c in range(5)],
                                  constrained=constrained)  # fmt: skip
    # Checking the plan runs the pruned model, which raises: the channels stay, with the split named as the reason.
    reasons = {k.reason for k in spec.kept if k.tensor == "expand.weight"}
    assert "is split into parts by 'split' with the part size written as a number" in reasons, reasons


# ------------------------------------------------------------------ a depthwise filter held by a module that is no conv


class Blur(nn.Module):
    """A fixed depthwise blur with its channel count kept as a number, as timm's BlurPool2d (TResNet) holds it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("filt", torch.full((channels, 1, 3, 3), 1 / 9, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.filt, padding=1, groups=self.channels)


@pytest.mark.parametrize("constrained", MODES, ids=MODE_IDS)
def test_depthwise_filter_of_another_module_keeps_its_channels(constrained: bool, tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Blur(8), nn.Conv2d(8, 4, 1)).double().eval()
    inputs = [torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]
    spec, _, _ = assert_invariant(model, inputs, tmp_path, pruned_outputs=[("0.weight", 1), ("0.weight", 5)],
                                  constrained=constrained)  # fmt: skip
    assert {k.reason for k in spec.kept} == {"is convolved depthwise with 1.filt, whose module holds the group count "
                                             "as a number"}  # fmt: skip
