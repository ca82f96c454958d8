"""Choosing channels by importance: each criterion on a module whose answer is worked out by hand, the amount and
rounding honoured on random models, budgets, exclusions, and the `plan --criterion` command line."""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from invariant import assert_invariant
from nets import build
from test_cli import SMALL, TINY, assert_ok, assert_one_line_error, invoke_all, run_all
from torch import nn

import prunespec
from prunespec.errors import PlanError
from prunespec.planner.select import prune_count, rounding_misses
from prunespec.schemas import parse_runs


class Chain(nn.Module):
    """1×1 convolutions a → b → c → d. a reads the model input and d writes the output, so only b and c are free."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(3 if i == 0 else width, width, 1, bias=False) for i in range(3))
        self.d = nn.Conv2d(width, 2, 1, bias=False)

    def forward(self, x):
        return self.d(self.c(self.b(self.a(x))))


def chain(b_columns=None, c_columns=None, width: int = 4) -> Chain:
    """A float64 Chain whose b and c weights have the given input columns (one list per input channel)."""
    torch.manual_seed(0)
    net = Chain(width).double().eval()
    with torch.no_grad():
        for conv, columns in ((net.b, b_columns), (net.c, c_columns)):
            if columns is not None:
                conv.weight.copy_(torch.tensor(columns, dtype=torch.float64).T.reshape(width, width, 1, 1))
    return net


X = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
# Column j is what b reads from input channel j. l1: [3, 4.4, 10, 1]; l2: [3, 2.2, 7.07, 0.71].
L1_VS_L2 = [[3, 0, 0, 0], [1.1, 1.1, 1.1, 1.1], [5, 5, 0, 0], [0.5, 0.5, 0, 0]]


def kept(runs: str) -> list[int]:
    """The indices of a spec's runs, sorted."""
    return sorted(i for lo, hi in parse_runs(runs) for i in range(lo, hi + 1))


def channels_of(pairs, weight: str) -> list[int]:
    return sorted(ch for w, ch in pairs if w == weight)


@pytest.mark.parametrize(("criterion", "expected"), [("l1", [0, 3]), ("l2", [1, 3])])
def test_l1_and_l2_pick_by_their_own_norm(criterion, expected):
    chosen, outputs = prunespec.select(chain(L1_VS_L2), X, criterion=criterion, amount=0.5, exclude=["c"])
    assert channels_of(chosen, "b.weight") == expected and chosen == [(w, c) for w, c in chosen if w == "b.weight"]
    assert outputs == []


def test_fpgm_prunes_the_channel_nearest_the_others():
    # Summed distances: col0 31.9, col1 19.3, col2 19.1, col3 34.3; the smallest norm (l2's pick) is col1.
    columns = [[10, 0, 0, 0], [1, 0, 0, 0], [1.2, 0, 0, 0], [0, 10, 0, 0]]
    net = chain(columns)
    assert prunespec.select(net, X, "fpgm", 0.25, exclude=["c"]).pruned_inputs == [("b.weight", 2)]
    assert prunespec.select(net, X, "fpgm", 0.5, exclude=["c"]).pruned_inputs == [("b.weight", 2), ("b.weight", 1)]
    assert prunespec.select(net, X, "l2", 0.25, exclude=["c"]).pruned_inputs == [("b.weight", 1)]


def test_lamp_ranks_across_layers_whatever_their_scale():
    # b's columns are c's times 10: by raw norm c would lose everything first; LAMP scores both layers alike:
    # squared norms [1, 4, 9, 16] give [1/30, 4/29, 9/25, 1], so 2 of 8 takes the smallest of each layer.
    c_columns = [[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0], [0, 0, 0, 4]]
    b_columns = [[10 * v for v in col] for col in c_columns]
    chosen = prunespec.select(chain(b_columns, c_columns), X, "lamp", 0.25, scope="global").pruned_inputs
    assert sorted(chosen) == [("b.weight", 0), ("c.weight", 0)]
    with pytest.raises(PlanError, match="use the global scope \\(scope='global'\\)"):
        prunespec.select(chain(), X, "lamp", 0.25, scope="local")


def test_hrank_prunes_the_lowest_rank_feature_maps():
    # a is the identity, so b reads the input itself: channel ranks 4 (identity), 1 (an outer product), 0 (zeros).
    net = Chain(width=3).double().eval()
    with torch.no_grad():
        net.a.weight.copy_(torch.eye(3, dtype=torch.float64).view(3, 3, 1, 1))
        net.b.weight.copy_(torch.eye(3, dtype=torch.float64).view(3, 3, 1, 1))
    x = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    x[0, 0] = torch.eye(4)
    x[0, 1] = torch.outer(torch.arange(1.0, 5.0), torch.ones(4))
    kw = {"criterion": "hrank", "exclude": ["c"]}
    assert prunespec.select(net, x, amount=1 / 3, **kw).pruned_inputs == [("b.weight", 2)]
    assert prunespec.select(net, x, amount=2 / 3, **kw).pruned_inputs == [("b.weight", 2), ("b.weight", 1)]
    # Output side: b's own outputs are the same maps (b is the identity too).
    assert prunespec.select(net, x, amount=1 / 3, side="output", **kw).pruned_outputs == [("b.weight", 2)]
    # Calibration batches replace the example input: with the maps swapped, channel 0 is now the zero one.
    swapped = x[:, [2, 1, 0]]
    chosen = prunespec.select(net, X[:, :3], amount=1 / 3, calibration=[swapped], **kw).pruned_inputs
    assert chosen == [("b.weight", 0)]


def test_random_is_seeded_and_honours_the_amount():
    net = chain(width=64)
    first = prunespec.select(net, X, "random", 0.3, exclude=["c"], seed=1).pruned_inputs
    assert first == prunespec.select(net, X, "random", 0.3, exclude=["c"], seed=1).pruned_inputs
    assert first != prunespec.select(net, X, "random", 0.3, exclude=["c"], seed=2).pruned_inputs
    assert len(first) == 19  # 0.3 * 64 = 19.2


class Residual(nn.Module):
    """stem → p1 → p2, and p1 + p2 feeds the head: p1 and p2 form one segment, their channels must agree."""

    def __init__(self):
        super().__init__()
        self.stem, self.p1, self.p2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.p1(self.stem(x))
        return self.head(y + self.p2(y))


def test_output_side_scores_a_segment_by_all_its_producers():
    torch.manual_seed(0)
    net = Residual().double().eval()
    with torch.no_grad():  # l1 of the output rows: p1 [1, 5, 5, 5], p2 [5, 0.5, 5, 5]; summed [6, 5.5, 10, 10]
        for conv, norms in ((net.p1, [1, 5, 5, 5]), (net.p2, [5, 0.5, 5, 5])):
            conv.weight.copy_(torch.tensor(norms, dtype=torch.float64).view(4, 1, 1, 1) / 4 * torch.ones(4, 4, 1, 1))
    selection = prunespec.select(net, X, "l1", 0.25, side="output")
    assert selection.pruned_outputs == [("p1.weight", 1), ("p2.weight", 1)]
    assert any("stem.weight" in note for note in selection.notes)  # the stem reads the model input
    spec = prunespec.plan(net, [X], *selection, constrained=True)
    assert spec.kept == [] and spec.summary.subselections == 0
    for producer in ("p1", "p2"):
        assert kept(spec.layers[producer].tensors["weight"][0]) == [0, 2, 3]


def test_io_layers_are_left_out_unless_asked():
    net = chain()
    selection = prunespec.select(net, X, "l2", 0.5)
    assert {w for w, _ in selection.pruned_inputs} == {"b.weight", "c.weight"}
    assert any("(include_io=True to choose there): a.weight, d.weight" in note for note in selection.notes)
    with_io = prunespec.select(net, X, "l2", 0.5, include_io=True).pruned_inputs
    assert {w for w, _ in with_io} == {"a.weight", "b.weight", "c.weight", "d.weight"}
    excluded = prunespec.select(net, X, "l2", 0.5, exclude=["b*"])
    assert {w for w, _ in excluded.pruned_inputs} == {"c.weight"}
    assert any("exclude" in note and "b.weight" in note for note in excluded.notes)
    with pytest.raises(PlanError, match="did you mean 'b'"):
        prunespec.select(net, X, "l2", 0.5, exclude=["bb"])


def test_select_changes_nothing_in_the_model():
    model, inputs = build("residual")
    model.train()
    before = copy.deepcopy(model.state_dict())
    for criterion in ("l1", "fpgm", "hrank", "random"):
        prunespec.select(model, inputs, criterion, 0.4, side="output")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_zeroed_channels_join_the_choice():
    net = chain(L1_VS_L2)
    with torch.no_grad():
        net.c.weight[:, 1] = 0
    chosen = prunespec.select(net, X, "l2", 0.25, exclude=["c"], zeroed=True).pruned_inputs
    assert chosen == [("b.weight", 3), ("c.weight", 1)]


# ---------------------------------------------------------------------------------------------- amounts


@pytest.mark.parametrize("name", ["residual", "concat", "mlp", "squeeze_excite", "depthwise", "conv_flatten_linear"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_amount_is_honoured_and_the_choice_plans_exactly(name, side, tmp_path):
    """Random amounts with a fixed seed: every group loses its share, and pruned == mock in both modes."""
    model, inputs = build(name)
    rng = random.Random(f"{name}-{side}")
    for _ in range(2):
        amount = rng.uniform(0.05, 0.8)
        criterion = rng.choice(["l1", "l2", "fpgm", "random"])
        selection = prunespec.select(model, inputs, criterion, amount, side=side, include_io=True)
        chosen = selection.pruned_inputs if side == "input" else selection.pruned_outputs
        per_weight: dict[str, int] = {}
        for weight, _ in chosen:
            per_weight[weight] = per_weight.get(weight, 0) + 1
        params = dict(model.named_parameters())
        axis = 1 if side == "input" else 0
        for weight, count in per_weight.items():
            n = params[weight].shape[axis]
            # An output-side segment counts its channels once; every producer in it loses the same number.
            assert count <= n - 1
            if side == "input":
                assert count == min(int(amount * n + 0.5), n - 1), (weight, amount, n)
        for constrained in (False, True):
            assert_invariant(model, inputs, tmp_path, pruned_inputs=selection.pruned_inputs,
                             pruned_outputs=selection.pruned_outputs, constrained=constrained)  # fmt: skip


def test_global_scope_prunes_the_amount_of_all_channels():
    net = chain(width=16)
    chosen = prunespec.select(net, X, "l2", 0.3, scope="global").pruned_inputs
    assert len(chosen) == round(0.3 * 32)
    counts = [len(channels_of(chosen, w)) for w in ("b.weight", "c.weight")]
    assert max(counts) <= 15  # every layer keeps a channel


def test_round_to_keeps_consumer_inputs_at_multiples():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    selection = prunespec.select(model, x, "l2", 0.3, round_to=8)
    spec = prunespec.plan(model, [x], *selection)
    consumers = {w for w, _ in selection.pruned_inputs}
    for weight in consumers:
        count = len(kept(spec.layers[weight.rpartition(".")[0]].tensors["weight"][1]))
        assert count % 8 == 0, (weight, count)
    # The producers' outputs follow the mode (a channel stays while one reader needs it) and are reported.
    misses = rounding_misses(spec, 8)
    assert all(m.split(" axis ")[1].startswith("0:") for m in misses)


def test_prune_count_rounds_and_keeps_a_channel():
    assert [prune_count(a, 10) for a in (0, 0.04, 0.05, 0.5, 1.0)] == [0, 0, 1, 5, 9]
    assert prune_count(0.3, 100, round_to=16) == 100 - 64 and prune_count(0.9, 20, round_to=8) == 12


@pytest.mark.parametrize(("measure", "target"), [("macs", 0.5), ("params", 0.6)])
def test_budget_search_reaches_the_target(measure, target):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    selection = prunespec.select(model, x, "l1", None, **{f"target_{measure}": target})
    s = selection.spec.summary
    reached = s.macs_after / s.macs_before if measure == "macs" else s.parameters_after / s.parameters_before
    assert abs(reached / target - 1) <= 0.01
    assert "reached" in selection.notes[-1] and f"{reached:.2%}" in selection.notes[-1]
    replanned = prunespec.plan(model, [x], *selection)
    assert replanned == selection.spec


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"criterion": "l3"}, "criterion='l3' does not choose channels"),
        ({"side": "both"}, "side='both'"),
        ({"amount": 1.5}, "amount=1.5"),
        ({"round_to": 0}, "round_to=0"),
        ({"target_macs": 0.5, "target_params": 0.5}, "not both"),
        ({"target_macs": 2.0}, "target_macs=2.0"),
        ({"criterion": "lamp", "scope": "local"}, "scope='global'"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(kwargs, message):
    with pytest.raises(PlanError, match=message) as info:
        prunespec.select(chain(), X, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("choose", [prunespec.plan, prunespec.select], ids=["plan", "select"])
def test_inputs_the_model_cannot_take_are_one_plan_error(choose):
    with pytest.raises(PlanError) as info:
        choose(chain(), [X.flatten(2)])  # rank 3: torch reads it as one unbatched 3x16 map of a single channel
    assert str(info.value).startswith(
        "the model cannot run on example inputs of shape [1, 3, 16]: layer 'a' (Conv2d) fails: RuntimeError: "
    )
    assert str(info.value).endswith("; a Conv2d takes inputs of rank 4, NxCxHxW with C = 3")


# ---------------------------------------------------------------------------------------------- command line


def test_plan_with_a_criterion_from_the_command_line(tmp_path):
    calibration = tmp_path / "cal.pt"
    torch.save(torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)), calibration)
    common = ["plan", TINY, "--input-shape", SMALL, "-o", "out.prunespec.json"]
    # The budget search as a real process, to see its progress on stderr; the rest in process.
    budget = [*common, "--criterion", "fpgm", "--side", "output", "--target-params", "0.8", "--constrained"]
    results = run_all({"budget": budget}, tmp_path) | invoke_all(
        {
            "l2": [*common, "--criterion", "l2", "--amount", "0.5", "--prune-input", "7.weight:0"],
            "hrank": [*common, "--criterion", "hrank", "--amount", "0.5", "--calibration", calibration],
            "lamp_local": [*common, "--criterion", "lamp", "--amount", "0.3"],
            "no_criterion": [*common, "--amount", "0.3"],
            "bad_exclude": [*common, "--criterion", "l1", "--amount", "0.3", "--exclude", "nothing*"],
        },
        tmp_path,
    )
    for name in ("l2", "hrank", "budget"):
        assert_ok(results[name])
        assert (tmp_path / name / "out.prunespec.json").is_file()
    assert "chosen by l2, input side, local scope" in results["l2"].stdout
    # The notes speak of flags, as the command line does.
    assert "(--include-io to choose there): 0.weight" in results["l2"].stdout
    assert "include_io" not in results["l2"].stdout
    spec = prunespec.load_spec(tmp_path / "l2" / "out.prunespec.json")
    # Explicit channels join the criterion's choice (7 is the linear layer, left out by the criterion itself).
    assert ("7.weight", "0") in {(r.tensor, r.channels) for r in spec.request.pruned_inputs}
    assert "target parameters 80.0%" in results["budget"].stdout
    # Each step of the search shows on stderr; stdout is the report alone.
    steps = results["budget"].stderr.splitlines()
    assert len(steps) > 1
    assert all(re.fullmatch(r"search: amount [0-9.]+ keeps [0-9.]+% of parameters", step) for step in steps)
    assert "search:" not in results["budget"].stdout
    assert "  channels:                 channels chosen by hrank\n" in results["hrank"].stdout
    assert "  channels:                 named channels and channels chosen by l2\n" in results["l2"].stdout
    for name, message in [("lamp_local", "--scope global"), ("no_criterion", "--amount needs --criterion"),
                          ("bad_exclude", "--exclude nothing* matches no layer")]:  # fmt: skip
        assert_one_line_error(results[name], message)
        assert not (tmp_path / name / "out.prunespec.json").exists()


class Widths(nn.Module):
    """a → b → c → d with any widths: b and c are the free consumers (b reads `w1` channels, c reads `w2`)."""

    def __init__(self, w1: int, w2: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, w1, 1), nn.Conv2d(w1, w2, 1)
        self.c, self.d = nn.Conv2d(w2, 5, 1), nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.d(self.c(self.b(self.a(x))))


@settings(max_examples=60, deadline=None)
@given(
    w1=st.integers(1, 40),
    w2=st.integers(1, 40),
    amount=st.floats(0, 1),
    round_to=st.sampled_from([1, 2, 4, 8]),
    scope=st.sampled_from(["local", "global"]),
    criterion=st.sampled_from(["l1", "l2", "fpgm", "random"]),
)
def test_amount_property(w1, w2, amount, round_to, scope, criterion):
    torch.manual_seed(w1 * 41 + w2)
    net = Widths(w1, w2).eval()
    chosen = prunespec.select(net, X.float(), criterion, amount, scope=scope, round_to=round_to).pruned_inputs
    assert len(set(chosen)) == len(chosen)
    counts = {w: len(channels_of(chosen, w)) for w in ("b.weight", "c.weight")}
    assert {w for w, _ in chosen} <= set(counts)  # a and d read the input and write the output
    widths = {"b.weight": w1, "c.weight": w2}
    for weight, k in counts.items():
        n = widths[weight]
        assert k <= n - 1 or n == 0  # a layer always keeps a channel
        if round_to > 1 and k:
            assert (n - k) % round_to == 0 and n - k >= round_to
    if round_to == 1 and scope == "local":
        assert counts == {w: min(int(amount * n + 0.5), n - 1) for w, n in widths.items()}
    elif round_to == 1:
        assert sum(counts.values()) == min(int(amount * (w1 + w2) + 0.5), w1 - 1 + w2 - 1)


class ConvBnRelu(nn.Module):
    """stem → conv → bn → relu → head: the conv's output channels are scored as the batch norm and ReLU leave them."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(self.stem(x)))))


def conv_bn_relu() -> ConvBnRelu:
    torch.manual_seed(0)
    net = ConvBnRelu().double().eval()
    with torch.no_grad():
        net.conv.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1).expand(4, 4, 3, 3) / 6)
        net.bn.running_var.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))
        net.bn.weight.copy_(torch.tensor([1.0, 1.0, 1.0, 1e-3]))  # channel 3: largest filter, silenced by the norm
        net.bn.bias.copy_(torch.tensor([0.0, -1e3, 0.0, 0.0]))  # channel 1: always negative, ReLU zeroes it
    return net


def test_output_side_weights_are_scored_folded_with_their_batch_norm():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # Filter norms alone rank channel 0 lowest; folded with the norm's scale |γ|/√(var+ε), channel 3 is the weakest.
    assert prunespec.select(conv_bn_relu(), x, "l2", 0.25, side="output").pruned_outputs == [("conv.weight", 3)]
    assert prunespec.select(conv_bn_relu(), x, "l2", 0.25, side="input").pruned_inputs[0][0] == "conv.weight"


def test_hrank_on_the_output_side_reads_the_maps_after_norm_and_activation():
    # Every channel of the convolution's own output has full-rank maps; after the ReLU, channel 1 is all zeros.
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    chosen = prunespec.select(conv_bn_relu(), x, "hrank", 0.25, side="output").pruned_outputs
    assert chosen == [("conv.weight", 1)]


def test_a_budget_out_of_reach_says_so_and_stays_within_it():
    net = chain(width=4)  # two free layers of 4 channels: MACs fall in big steps
    selection = prunespec.select(net, X, "l2", None, target_macs=0.7)
    s = selection.spec.summary
    reached = s.macs_after / s.macs_before
    assert reached <= 0.7 * 1.01
    assert "could not reach within 1%" in selection.notes[-1] and f"{reached:.2%}" in selection.notes[-1]


def test_calibration_batches_that_do_not_fit_are_one_plan_error():
    net = chain()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(PlanError, match=r"calibration batch 1 \(shape \[2, 5, 4, 4\]\) does not run") as info:
        prunespec.select(net, X, "hrank", 0.5, calibration=[X, torch.zeros(2, 5, 4, 4, dtype=torch.float64)])
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(not m._forward_pre_hooks for m in net.modules())
