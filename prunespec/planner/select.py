"""Select: choose which channels to prune by an importance criterion and an amount, as a request for `plan`.

Start with `select`. It traces the model once, as `plan` does, and lists *groups* of candidate channels:

- side ``"input"``: one group per consumer, its input channels. The choice is per consumer, which is what
  unconstrained export removes exactly;
- side ``"output"``: one group per *segment*, the producers whose output channels must agree (a residual stream,
  the producers of a concatenation's inputs). A candidate is one channel of the segment, standing for that channel
  in every producer of the segment, so constrained export removes exactly what was chosen.

Each candidate gets a score from a criterion in `criteria.CRITERIA` (for a segment, the sum over its producers);
`Choice.pick` then takes the lowest `amount` of each group (scope ``"local"``) or of all groups together, after
rescaling each group's scores (scope ``"global"``). Nothing here changes the model.

Layers that read the model input or write its output are left out unless `include_io`; so are a layer matched by
an `exclude` pattern and, on the output side, every segment that holds such a layer, because its channels cannot
go without that layer's. The notes of the returned `Selection` list what was left out and why.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from prunespec.errors import PlanError, nearest, option
from prunespec.planner.criteria import CRITERIA, Criterion, feature_ranks, rows
from prunespec.planner.graph import ChannelGraph
from prunespec.planner.trace import OUTPUT, UNLABELLED, trace
from prunespec.schemas import PruningSpec, parse_runs

Pairs = list[tuple[str, int]]
SIDES = ("input", "output")
SCOPES = ("local", "global")
TARGET_TOLERANCE = 0.01  # a searched budget counts as reached within 1% of it


@dataclass
class Group:
    """Candidate channels that are chosen among together: one consumer's inputs, or one segment's outputs."""

    name: str  # the consumer's weight, or the segment's first producer weight
    axes: dict[str, int]  # every weight whose channels these are -> its channel axis
    candidates: list[Pairs]  # per candidate: the (weight, channel) pairs it stands for
    readers: list[Pairs]  # per candidate: the (consumer weight, input column) pairs that read it, for hrank
    scores: torch.Tensor | None = None  # one per candidate, higher is more important


@dataclass
class Selection:
    """What `select` chose, in the form `plan` takes: ``plan(model, inputs, **selection.requests())``.

    It also unpacks as ``pruned_inputs, pruned_outputs``, the channels alone.
    """

    pruned_inputs: Pairs
    pruned_outputs: Pairs
    amount: float
    notes: list[str] = field(default_factory=list)
    spec: PruningSpec | None = None  # planned while searching a budget: the spec of this choice
    pruned_heads: Pairs = field(default_factory=list)
    pruned_kv_heads: Pairs = field(default_factory=list)
    pruned_blocks: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter((self.pruned_inputs, self.pruned_outputs))

    def requests(self) -> dict[str, Pairs]:
        """The keyword arguments of `plan` that name what was chosen."""
        return {
            "pruned_inputs": self.pruned_inputs,
            "pruned_outputs": self.pruned_outputs,
            "pruned_heads": self.pruned_heads,
            "pruned_kv_heads": self.pruned_kv_heads,
            "pruned_blocks": self.pruned_blocks,
        }


def select(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    criterion: str = "l2",
    amount: float | None = 0.3,
    side: str = "input",
    scope: str = "local",
    round_to: int = 1,
    exclude: Iterable[str] = (),
    include_io: bool = False,
    zeroed: bool = False,
    target_macs: float | None = None,
    target_params: float | None = None,
    constrained: bool = False,
    reorder: bool = True,
    calibration: Iterable | None = None,
    progress: Callable[[list], Iterable] | None = None,
    seed: int = 0,
    unit: str = "channels",
    report: Callable[[str], None] | None = None,
    through_norms: bool = False,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> Selection:
    """Choose the least important channels (or heads) of `model`, as a `Selection` of requests for `plan`.

    Args:
        criterion: a name in `criteria.CRITERIA`: l1, l2, fpgm, lamp (global scope only), hrank or random.
        amount: the fraction of each group's candidates to prune (local), or of all candidates (global); counts
            are rounded half up, and every group keeps at least one channel (at least `round_to`).
        side: "input" chooses per consumer, "output" per segment of producers (see the module docstring).
        scope: "local" prunes `amount` of every group, "global" ranks all candidates together.
        round_to: keep each group's channel count a multiple of this (the nearest one, at least `round_to`).
        exclude: glob patterns of weight or module names to leave untouched.
        include_io: also choose in layers that read the model input or write its output.
        zeroed: also prune every channel whose weights are all zero.
        target_macs, target_params: instead of `amount`, search the amount whose plan keeps this fraction of the
            dense model's MACs or parameters (within 1%); `constrained` and `reorder` are the mode it plans with.
        calibration: input batches for hrank (each a tensor or a tuple of tensors); default `example_inputs`.
        progress: wraps the list of calibration batches, e.g. in a progress bar.
        seed: seed of the random criterion.
        unit: "channels", or "heads" / "kv_heads" to choose whole attention heads or key/value heads, which
            `amount`, `scope` and `round_to` then count (see `units.HeadChoice`; `side` does not apply). The
            criteria l1, l2, fpgm and lamp score a head's weights; "output" its contribution to the output
            projection on the calibration inputs. "blocks" chooses residual blocks to drop, by "influence" (one
            minus the cosine similarity of a block's input and output) or "random" (`units.BlockChoice`).
        report: called with a line per step of a budget search ("search: amount 0.3125 keeps 49.2% of MACs").
        through_norms: see `prunespec.plan`: the channels of a residual stream through norms become candidates.
        weights: the tensors the criteria read, by name, for a model that has none of its own (built on meta from a
            config: `models.checkpoint_tensors` reads them from the checkpoint one at a time).

    The model's weights, modes and hooks are left as they were.

    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1), torch.nn.Conv2d(2, 2, 1))
    >>> with torch.no_grad():
    ...     _ = net[1].weight.copy_(torch.tensor([1., 0.1, 3., 2.]).view(1, 4, 1, 1).expand(2, 4, 1, 1))
    >>> select(net, torch.rand(1, 3, 4, 4), criterion="l1", amount=0.5).pruned_inputs
    [('1.weight', 1), ('1.weight', 0)]
    """
    inputs = [example_inputs] if isinstance(example_inputs, torch.Tensor) else list(example_inputs)
    _check_arguments(criterion, amount, side, scope, round_to, target_macs, target_params, unit)
    graph = trace(model, inputs, through_norms=through_norms)
    notes: list[str] = []
    tensors = _weights(model, weights)
    target = target_macs if target_macs is not None else target_params
    measure = "MACs" if target_macs is not None else "parameters"
    report = report or (lambda line: None)
    if unit == "blocks":
        from prunespec.planner.units import BlockChoice

        blocks = BlockChoice(model, graph, criterion, exclude, calibration or [inputs], progress, seed, notes)

        def chosen_blocks(a: float) -> Selection:
            return Selection([], [], a, notes, pruned_blocks=blocks.pick(a))

        if target is None:
            return chosen_blocks(amount)
        return _search(model, inputs, chosen_blocks, target, measure, constrained, reorder, report)
    if unit != "channels":
        from prunespec.planner.units import HeadChoice

        heads = HeadChoice(model, graph, unit, criterion, scope, round_to, exclude, calibration or [inputs], progress,
                           seed, notes, tensors)  # fmt: skip
        field_name = "pruned_heads" if unit == "heads" else "pruned_kv_heads"

        def chosen_heads(a: float) -> Selection:
            return Selection([], [], a, notes, **{field_name: heads.pick(a)})

        if target is None:
            return chosen_heads(amount)
        return _search(model, inputs, chosen_heads, target, measure, constrained, reorder, report)
    groups = _input_groups(graph, notes) if side == "input" else _output_groups(graph)
    groups = _without_excluded(groups, graph, list(exclude), include_io, notes)
    rule = CRITERIA[criterion]
    scales = norm_scales(model, graph, tensors) if side == "output" else {}
    groups = _scored(groups, rule, model, tensors, scales, calibration or [inputs], progress, seed, notes)
    choice = Choice(groups, rule.rescale, scope, round_to)
    extra: tuple[Pairs, Pairs] = _zeroed(model, graph) if zeroed else ([], [])

    def selection(a: float) -> Selection:
        chosen = choice.pick(a)
        on_input = chosen if side == "input" else []
        on_output = chosen if side == "output" else []
        return Selection(_union(on_input, extra[0]), _union(on_output, extra[1]), a, notes)

    if target is None:
        return selection(amount)
    return _search(model, inputs, selection, target, measure, constrained, reorder, report)


# ---------------------------------------------------------------------------------------------- candidates


def _input_groups(graph: ChannelGraph, notes: list[str]) -> list[Group]:
    groups, seen, left = [], set(), []
    for consumer in graph.consumers:
        if consumer.weight in seen:
            continue
        seen.add(consumer.weight)
        if consumer.fixed or consumer.per_group:
            left.append(f"{consumer.weight} ({consumer.fixed or 'a grouped convolution'})")
            continue
        pairs = [[(consumer.weight, col)] for col in range(len(consumer.slots))]
        groups.append(Group(consumer.weight, {consumer.weight: consumer.axis}, pairs, pairs))
    if left:
        notes.append(f"left out, their inputs cannot be chosen one by one: {', '.join(left)}")
    return groups


def _output_groups(graph: ChannelGraph) -> list[Group]:
    """One group per segment: producers that share a channel are in one segment (a small union-find)."""
    root = graph.slots.roots_table()
    pinned = graph.slots.reason
    producers = list({p.weight: p for p in graph.producers}.values())
    segment = list(range(len(producers)))

    def top(i: int) -> int:
        while segment[i] != i:
            i = segment[i]
        return i

    owner: dict[int, int] = {}  # slot root -> a producer that writes it
    for i, producer in enumerate(producers):
        for s in producer.slots:
            j = owner.setdefault(root[s], i)
            a, b = top(i), top(j)
            if a != b:
                segment[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(len(producers)):
        members.setdefault(top(i), []).append(i)

    # A channel's feature map is best seen where it is read: after the batch norm and activation that follow its
    # producers (a producer's own output has full-rank maps whatever it learned).
    readers: dict[int, Pairs] = {}
    for consumer in graph.consumers:
        if not (consumer.no_gather or consumer.fixed):
            for col, s in enumerate(consumer.slots):
                readers.setdefault(root[s], []).append((consumer.weight, col))

    groups = []
    for indices in members.values():
        channels: dict[int, Pairs] = {}  # root -> the (producer weight, channel) pairs that carry it
        for i in indices:
            for ch, s in enumerate(producers[i].slots):
                if root[s] not in pinned:
                    channels.setdefault(root[s], []).append((producers[i].weight, ch))
        axes = {producers[i].weight: producers[i].axis for i in indices}
        read = [readers.get(r, []) for r in channels]
        groups.append(Group(producers[indices[0]].weight, axes, list(channels.values()), read))
    return [g for g in groups if g.candidates]


def _without_excluded(groups: list[Group], graph: ChannelGraph, patterns: list[str], include_io: bool, notes):
    """Drop groups that touch an excluded weight, saying which and why."""
    known = {r.weight for r in (*graph.consumers, *graph.producers)}
    modules = {w.rpartition(".")[0] for w in known}
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in known | modules):
            # Suggest module prefixes too ('layer4' for 'layr4*'): a pattern usually names a block, not one weight.
            prefixes = {m.rsplit(".", k)[0] for m in modules for k in range(m.count(".") + 1)}
            bare = pattern.strip("*?[]")
            suggestion = nearest(bare, sorted(prefixes | known))
            raise PlanError(f"{option('exclude', pattern)} matches no layer; {suggestion}")

    def excluded(weight: str) -> bool:
        module = weight.rpartition(".")[0]
        return any(fnmatch.fnmatchcase(weight, p) or fnmatch.fnmatchcase(module, p) for p in patterns)

    io = set() if include_io else _io_weights(graph)
    kept, io_out, matched = [], [], []
    for group in groups:
        if io & set(group.axes):
            io_out.append(group.name)
        elif any(excluded(w) for w in group.axes):
            matched.append(group.name)
        else:
            kept.append(group)
    if io_out:
        notes.append(
            "left out, they read the model input or write its output "
            f"({option('include_io', True)} to choose there): {', '.join(io_out)}"
        )
    if matched:
        notes.append(f"left out by {option('exclude')} patterns: {', '.join(matched)}")
    return kept


def _io_weights(graph: ChannelGraph) -> set[str]:
    """Weights of layers that read the model input or write the model output."""
    reason = graph.slots.pinned
    reads_input = {c.weight for c in graph.consumers if any(reason(s) == UNLABELLED for s in c.slots)}
    writes_output = {p.weight for p in graph.producers if any(reason(s) == OUTPUT for s in p.slots)}
    return reads_input | writes_output


def _zeroed(model: torch.nn.Module, graph: ChannelGraph) -> tuple[Pairs, Pairs]:
    from prunespec.planner import zeroed_channels

    return zeroed_channels(model, graph)


def _union(a: Pairs, b: Pairs) -> Pairs:
    return list(dict.fromkeys([*a, *b]))


# ---------------------------------------------------------------------------------------------- choosing


def _weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor]:
    """The tensors criteria read: the model's own, or for a model on meta, `weights` (which must then be given)."""
    own = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    if weights is None:
        return own
    return _Weights(own, weights)


class _Weights(Mapping):
    """The model's tensors, each on meta read from `weights` when asked for."""

    def __init__(self, own: dict[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> None:
        self.own, self.weights = own, weights

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.own[name]
        if not tensor.is_meta:
            return tensor
        if name not in self.weights:
            raise PlanError(f"the criterion reads {name}, which the checkpoint does not hold")
        return self.weights[name]

    def __iter__(self):
        return iter(self.own)

    def __len__(self) -> int:
        return len(self.own)


def _scored(groups: list[Group], rule: Criterion, model, tensors, scales, batches, progress, seed: int, notes):
    """The groups with `Group.scores` filled in by `rule`; hrank drops groups it has no feature maps for.

    `scales` multiply a weight's rows before scoring (`norm_scales`: producers folded with their batch norm).
    """
    if rule.needs_features:
        return _feature_scores(model, groups, batches, progress, notes)
    if rule.score is None:  # random
        generator = torch.Generator().manual_seed(seed)
        for group in groups:
            group.scores = torch.rand(len(group.candidates), generator=generator, dtype=torch.float64)
        return groups
    for group in groups:
        per_weight = {}
        for weight, axis in group.axes.items():
            r = rows(tensors[weight], axis)
            scale = scales.get(weight)
            per_weight[weight] = rule.score(r * scale[:, None] if scale is not None and len(scale) == len(r) else r)
        group.scores = _summed(group, per_weight)
    return groups


def norm_scales(model: torch.nn.Module, graph: ChannelGraph, tensors: Mapping) -> dict[str, torch.Tensor]:
    """Per producer weight, how the batch norm right after it scales each output channel: |γ| / √(var + ε).

    A filter's norm says little when a batch norm rescales its output; scored folded with the norm, a filter counts
    as it acts. The norm right after a producer is the one whose statistics run along the producer's own slots.
    """
    bound = {b.tensor: b for b in graph.bindings}
    after: dict[int, torch.Tensor] = {}
    for name, binding in bound.items():
        module_name, _, local = name.rpartition(".")
        module = model.get_submodule(module_name)
        if local != "running_var" or not hasattr(module, "eps"):
            continue
        var = tensors[name].detach().double()
        gamma = f"{module_name}.weight"
        weight = tensors[gamma].detach().double().abs() if gamma in bound else torch.ones_like(var)
        after[id(binding.slots)] = weight / (var + module.eps).sqrt()
    return {p.weight: after[id(p.slots)] for p in graph.producers if id(p.slots) in after}


def _summed(group: Group, per_weight: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each candidate's score: the sum over the (weight, channel) pairs it stands for."""
    return torch.tensor(
        [sum(float(per_weight[w][ch]) for w, ch in pairs) for pairs in group.candidates], dtype=torch.float64
    )


class Choice:
    """Scored groups, and their lowest-scoring candidates for a given amount."""

    def __init__(self, groups: list[Group], rescale, scope: str, round_to: int) -> None:
        self.groups = groups
        self.rescale = rescale  # puts one group's scores on the scale of the others, for the global scope
        self.scope = scope
        self.round_to = round_to

    def pick(self, amount: float) -> Pairs:
        """The (weight, channel) pairs of the lowest-scoring candidates for `amount`."""
        counts = self._global_counts(amount) if self.scope == "global" else None
        chosen: Pairs = []
        for i, group in enumerate(self.groups):
            n = len(group.candidates)
            k = counts[i] if counts is not None else prune_count(amount, n, self.round_to)
            order = torch.argsort(group.scores, stable=True)[:k].tolist()
            chosen += [pair for c in order for pair in group.candidates[c]]
        return chosen

    def _global_counts(self, amount: float) -> list[int]:
        """How many candidates each group loses when all are ranked together on rescaled scores."""
        scaled = [self.rescale(g.scores) for g in self.groups]
        sizes = [len(g.candidates) for g in self.groups]
        floor = max(1, self.round_to)
        caps = [max(0, n - floor) for n in sizes]
        flat = torch.cat(scaled) if scaled else torch.zeros(0, dtype=torch.float64)
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
        wanted = math.floor(amount * sum(sizes) + 0.5)
        counts = [0] * len(sizes)
        taken = 0
        for i in owner[torch.argsort(flat, stable=True)].tolist():
            if taken == wanted:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                taken += 1
        return [prune_count(c / n if n else 0.0, n, self.round_to) for c, n in zip(counts, sizes)]


def prune_count(amount: float, n: int, round_to: int = 1) -> int:
    """How many of `n` channels to prune: `amount` of them, rounded half up, leaving a multiple of `round_to`.

    At least one channel (at least `round_to`) stays. Channel counts are rounded to the nearest multiple that fits.

    >>> prune_count(0.3, 64), prune_count(0.3, 64, round_to=8), prune_count(1.0, 10), prune_count(0.5, 6, 8)
    (19, 16, 9, 0)
    """
    k = math.floor(amount * n + 0.5)
    if round_to > 1 and k > 0:
        if n < round_to:
            return 0
        multiples = round((n - k) / round_to)
        return n - min(max(multiples, 1), n // round_to) * round_to
    return min(k, n - 1) if n else 0


def _feature_scores(model, groups: list[Group], batches, progress, notes) -> list[Group]:
    """HRank: the average rank of each candidate's feature maps over the calibration batches.

    The maps are the inputs of the consumers that read the candidate (`Group.readers`); a channel read by several
    scores the mean of their ranks. A group with a candidate that no convolution reads as 2-D maps is left out.
    """
    modules = dict(model.named_modules())
    totals: dict[str, torch.Tensor] = {}
    images: dict[str, int] = {}
    problems: dict[str, str] = {}

    def record(weight: str, activation) -> None:
        if not isinstance(activation, torch.Tensor) or activation.ndim != 4:
            shape = tuple(activation.shape) if isinstance(activation, torch.Tensor) else type(activation).__name__
            problems.setdefault(weight, f"reads {shape}, not a batch of 2-D feature maps")
            return
        ranks = feature_ranks(activation, axis=1)
        totals[weight] = totals[weight] + ranks if weight in totals else ranks
        images[weight] = images.get(weight, 0) + activation.shape[0]

    weights = {w for g in groups for pairs in g.readers for w, _ in pairs}
    handles = [
        modules[w.rpartition(".")[0]].register_forward_pre_hook(
            lambda m, args, w=w: record(w, args[0] if args else None)
        )
        for w in weights
    ]
    modes = {m: m.training for m in model.modules()}
    batches = list(batches)
    try:
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(progress(batches) if progress else batches):
                args = [batch] if isinstance(batch, torch.Tensor) else list(batch)
                try:
                    model(*args)
                except Exception as e:  # the user's batches do not fit the model: say which, in one line
                    shapes = ", ".join(str(list(a.shape)) for a in args if isinstance(a, torch.Tensor))
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise PlanError(
                        f"calibration batch {i} (shape {shapes}) does not run through the model: {first}"
                    ) from e
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training

    mean = {w: totals[w] / images[w] for w in totals if w not in problems}
    kept, unseen = [], []
    for group in groups:
        seen = [[mean[w][col] for w, col in pairs if w in mean and col < len(mean[w])] for pairs in group.readers]
        if all(seen):
            group.scores = torch.tensor([float(sum(r) / len(r)) for r in seen], dtype=torch.float64)
            kept.append(group)
        else:
            unseen.append(group.name)
    if unseen:
        why = "; ".join(f"{w} {why}" for w, why in problems.items())
        notes.append(
            "left out, hrank sees no 2-D feature maps of some of their channels: "
            + ", ".join(unseen)
            + (f" ({why})" if why else "")
        )
    return kept


# ---------------------------------------------------------------------------------------------- budgets


def _search(
    model, inputs, selection, target: float, measure: str, constrained: bool, reorder: bool, report: Callable
) -> Selection:
    """Bisect the amount whose plan keeps `target` of the dense model's MACs or parameters."""
    from prunespec.planner import plan

    def planned(a: float) -> tuple[Selection, float]:
        chosen = selection(a)
        spec = plan(model, inputs, **chosen.requests(), constrained=constrained, reorder=reorder)
        s = spec.summary
        before, after = (
            (s.macs_before, s.macs_after) if measure == "MACs" else (s.parameters_before, s.parameters_after)
        )
        chosen.spec = spec
        kept = after / before if before else 1.0
        report(f"search: amount {a:.4f} keeps {kept:.1%} of {measure}")
        return chosen, kept

    # The best plan fits the budget (up to the tolerance) and comes closest to it; MACs and parameters fall in steps
    # as the amount grows, so a small model may have no plan within 1%.
    def fits(fraction: float) -> bool:
        return fraction <= target * (1 + TARGET_TOLERANCE)

    tried = [planned(0.0)]
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-4 and not any(fits(f) and f >= target * (1 - TARGET_TOLERANCE) for _, f in tried):
        mid = (lo + hi) / 2
        tried.append(planned(mid))
        lo, hi = (mid, hi) if tried[-1][1] > target else (lo, mid)
    fitting = [(chosen, f) for chosen, f in tried if fits(f)]
    if fitting:
        best, reached = max(fitting, key=lambda t: t[1])
        above = min((f for _, f in tried if not fits(f)), default=None)
        verdict = (
            "reached"
            if reached >= target * (1 - TARGET_TOLERANCE)
            else "could not reach within 1%, as the counts fall in steps"
            + (f" (the next step up keeps {above:.2%})" if above is not None else "")
            + "; the closest plan within it keeps"
        )
    else:
        best, reached = min(tried, key=lambda t: t[1])
        verdict = "cannot get down to it; the smallest plan keeps"
    best.notes = [
        *best.notes,
        f"target {measure} {target:.1%} of the dense model: {verdict} {reached:.2%} at "
        f"{option('amount', round(best.amount, 4))}",
    ]
    return best


def _check_arguments(criterion, amount, side, scope, round_to, target_macs, target_params, unit) -> None:
    from prunespec.planner.units import BLOCK_CRITERIA, HEAD_CRITERIA, UNITS

    if unit not in UNITS:
        raise PlanError(f"{option('unit', unit)}: use one of {', '.join(UNITS)}")
    known = {"channels": CRITERIA, "blocks": BLOCK_CRITERIA}.get(unit, HEAD_CRITERIA)
    if criterion not in known:
        raise PlanError(f"{option('criterion', criterion)} does not choose {unit}; use one of {', '.join(known)}")
    if side not in SIDES:
        raise PlanError(f"{option('side', side)}: use 'input' (per consumer) or 'output' (per segment of producers)")
    if scope not in SCOPES:
        raise PlanError(f"{option('scope', scope)}: use 'local' (per layer) or 'global' (ranked across layers)")
    if criterion in CRITERIA and CRITERIA[criterion].global_only and scope != "global":
        raise PlanError(
            f"{criterion} ranks channels across layers; layer by layer it picks the same channels as l2: "
            f"use the global scope ({option('scope', 'global')}), or {option('criterion', 'l2')}"
        )
    if not isinstance(round_to, int) or round_to < 1:
        raise PlanError(
            f"{option('round_to', round_to)}: give a whole number of channels, 1 or more (8 suits most hardware)"
        )
    if target_macs is not None and target_params is not None:
        raise PlanError("give a MACs target or a parameters target, not both")
    for what, value in (("target_macs", target_macs), ("target_params", target_params)):
        if value is not None and not 0 < value <= 1:
            raise PlanError(
                f"{option(what, value)}: give the fraction of the dense model to keep, above 0 and at most 1"
            )
    if target_macs is None and target_params is None and (amount is None or not 0 <= amount <= 1):
        raise PlanError(f"{option('amount', amount)}: give the fraction of channels to prune, from 0 to 1, such as 0.3")


# ---------------------------------------------------------------------------------------------- reporting


def rounding_misses(spec: PruningSpec, round_to: int) -> list[str]:
    """Pruned weight axes whose channel count is not a multiple of `round_to`: ``"name axis k: count"``.

    The mode decides some counts: an unconstrained producer keeps every channel that one reader still needs.
    """
    if round_to <= 1:
        return []
    misses = []
    for module, layer in spec.layers.items():
        weight = layer.tensors.get("weight")
        if not weight or len(weight) < 2:  # a norm's weight follows its producer, which is reported already
            continue
        for axis, runs in enumerate(weight[:2]):
            if runs is None:
                continue
            count = sum(hi - lo + 1 for lo, hi in parse_runs(runs))
            if count % round_to:
                misses.append(f"{module}.weight axis {axis}: {count}")
    return misses
