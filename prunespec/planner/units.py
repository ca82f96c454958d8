"""Choose whole units to prune by an importance criterion, for `select`: attention heads, key/value heads, blocks.

Start with `HeadChoice`; `BlockChoice` is the same for residual blocks. Every attention the trace found (`graph.Heads`) is one group of candidates: its query
heads (``unit="heads"``) or its key/value heads (``unit="kv_heads"``). A head's weights are the rows of the
projections that make it and the columns of the output projection that read it, found through the slot that
stands for the head; under grouped-query attention a key/value head also stands for its group of query heads.

Scores: the weight criteria (`criteria.CRITERIA`: l1, l2, fpgm, lamp) score the concatenation of a head's weights;
``random`` is a seeded draw; ``output`` runs the model on the example or calibration inputs and measures each head's
contribution to its output projection, ``|| head_output @ W_o[:, head]^T ||``, averaged over the tokens. Query heads
of a grouped-query attention are chosen in equal numbers from every key/value group.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from prunespec.errors import PlanError, nearest
from prunespec.planner.criteria import CRITERIA
from prunespec.planner.graph import ChannelGraph, Heads
from prunespec.planner.select import prune_count

UNITS = ("channels", "heads", "kv_heads", "blocks")
HEAD_CRITERIA = ("l1", "l2", "fpgm", "lamp", "output", "random")
BLOCK_CRITERIA = ("influence", "random")

Pairs = list[tuple[str, int]]


class HeadChoice:
    """Scored heads of every traced attention, and their least important ones for a given amount.

    Scores are computed once (the ``output`` criterion runs the model), so a budget search can pick for many
    amounts.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        graph: ChannelGraph,
        unit: str,
        criterion: str,
        scope: str,
        round_to: int,
        exclude: Iterable[str],
        batches: Sequence,
        progress: Callable[[list], Iterable] | None,
        seed: int,
        notes: list[str],
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if criterion not in HEAD_CRITERIA:
            raise PlanError(f"criterion {criterion!r} does not score heads; use one of {', '.join(HEAD_CRITERIA)}")
        self.attentions = _attentions(graph, list(exclude), notes)
        if not self.attentions:
            raise PlanError("no prunable attention heads were traced in this model; choose channels instead")
        self.kv = unit == "kv_heads"
        candidates = [_candidates(graph, h, self.kv) for h in self.attentions]
        tensors = tensors if tensors is not None else dict(model.named_parameters(remove_duplicate=False))
        self.scores = _scores(model, graph, self.attentions, candidates, criterion, batches, progress, seed, notes,
                              tensors)  # fmt: skip
        self.scope, self.round_to, self.criterion = scope, round_to, criterion

    def pick(self, amount: float) -> Pairs:
        """``(attention module, head)`` pairs of the least important heads: `amount` of each attention (local
        scope) or of all heads ranked together (global), each attention keeping a multiple of `round_to`."""
        counts = _counts(self.attentions, self.scores, amount, self.scope, self.round_to, self.kv, self.criterion)
        chosen: Pairs = []
        for heads, score, count in zip(self.attentions, self.scores, counts):
            if score is None or not count:
                continue
            groups = len(heads.key_value)
            if self.kv or groups == len(heads.query):
                order = torch.argsort(score, stable=True)[:count].tolist()
                chosen += [(heads.module, h) for h in sorted(order)]
                continue
            per_group = len(heads.query) // groups  # the same number from each key/value group
            for g in range(groups):
                within = torch.argsort(score[g * per_group : (g + 1) * per_group], stable=True)[: count // groups]
                chosen += [(heads.module, g * per_group + h) for h in sorted(within.tolist())]
        return chosen


def _attentions(graph: ChannelGraph, patterns: list[str], notes: list[str]) -> list[Heads]:
    """The traced attentions, without those an exclude pattern names."""
    attentions, kept = [], []
    for heads in graph.heads:
        reason = [graph.slots.pinned(s) for s in heads.query]
        if all(reason):
            kept.append(f"{heads.module} ({reason[0]})")
        else:
            attentions.append(heads)
    if kept:
        notes.append(f"left out, their heads are kept: {', '.join(kept)}")
    modules = [h.module for h in attentions]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(m, pattern) for m in modules):
            raise PlanError(f"exclude pattern {pattern!r} matches no attention module; " + nearest(pattern, modules))
    left = [m for m in modules if any(fnmatch.fnmatchcase(m, p) for p in patterns)]
    if left:
        notes.append(f"left out by exclude patterns: {', '.join(left)}")
    return [h for h in attentions if h.module not in left]


def _candidates(graph: ChannelGraph, heads: Heads, kv: bool) -> list[list[int]]:
    """For each candidate, the slot roots it stands for: one query head, or a key/value head and its group."""
    root = graph.slots.roots_table()
    if not kv:
        return [[root[s]] for s in heads.query]
    per_group = len(heads.query) // len(heads.key_value)
    return [
        [root[s], *(root[q] for q in heads.query[g * per_group : (g + 1) * per_group])]
        for g, s in enumerate(heads.key_value)
    ]


def _scores(model, graph, attentions, candidates, criterion, batches, progress, seed, notes, tensors) -> list:
    """One score per candidate of each attention (higher is more important); None for an attention left out."""
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)
        return [torch.rand(len(c), generator=generator, dtype=torch.float64) for c in candidates]
    if criterion == "output":
        return _output_scores(model, graph, attentions, candidates, batches, progress, notes)
    rule = CRITERIA[criterion]
    vectors = _head_weights(tensors, graph, candidates)
    return [rule.score(v) for v in vectors]


def _slices(graph: ChannelGraph) -> dict[int, list[tuple[str, int, int]]]:
    """Slot root -> the (weight, axis, index) entries of producers' rows and consumers' columns it labels."""
    root = graph.slots.roots_table()
    found: dict[int, list[tuple[str, int, int]]] = {}
    seen = set()
    for record in [*graph.producers, *graph.consumers]:
        if (record.weight, record.axis) in seen:
            continue
        seen.add((record.weight, record.axis))
        for i, s in enumerate(record.slots):
            found.setdefault(root[s], []).append((record.weight, record.axis, i))
    return found


def _head_weights(tensors, graph: ChannelGraph, candidates: list[list[list[int]]]) -> list[torch.Tensor]:
    """Per attention, a matrix with one row per candidate: all the weights of its heads, laid end to end."""
    slices = _slices(graph)
    matrices = []
    for attention in candidates:
        read: dict[str, torch.Tensor] = {}  # each weight once, even when it comes from a checkpoint on disk
        rows = []
        for roots in attention:
            parts = []
            for r in roots:
                for w, axis, i in slices.get(r, []):
                    if w not in read:
                        read[w] = tensors[w].detach().to(torch.float64)
                    parts.append(read[w].select(axis, i).reshape(-1))
            rows.append(torch.cat(parts) if parts else torch.zeros(1, dtype=torch.float64))
        width = max(len(r) for r in rows)
        matrices.append(torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows]))
    return matrices


def _output_scores(model, graph, attentions, candidates, batches, progress, notes) -> list:
    """Each head's contribution to its output projection, ``|| x[..., head] @ W[:, head]^T ||``, averaged over
    the tokens of the calibration batches; a key/value head adds up its group's."""
    root = graph.slots.roots_table()
    modules = dict(model.named_modules())
    tensors = dict(model.named_parameters(remove_duplicate=False))
    readers = {}  # attention module -> (output projection weight, [columns of each query head])
    for heads in attentions:
        wanted = {root[s]: h for h, s in enumerate(heads.query)}
        for consumer in graph.consumers:
            columns = [[] for _ in heads.query]
            for col, s in enumerate(consumer.slots):
                if root[s] in wanted:
                    columns[wanted[root[s]]].append(col)
            if all(columns):
                readers[heads.module] = (consumer.weight, columns)
                break
    totals: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def record(attention: str, x) -> None:
        weight, columns = readers[attention]
        w = tensors[weight].detach().to(torch.float64)
        x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
        norms = torch.stack([(x[:, c] @ w[:, c].T).norm(dim=1).sum() for c in columns])
        totals[attention] = totals.get(attention, 0) + norms
        tokens[attention] = tokens.get(attention, 0) + x.shape[0]

    handles = [
        modules[weight.rpartition(".")[0]].register_forward_pre_hook(lambda m, args, a=a: record(a, args[0]))
        for a, (weight, _) in readers.items()
    ]
    _run(model, batches, progress, handles)
    scores, unseen = [], []
    for heads, attention in zip(attentions, candidates):
        if heads.module not in totals:
            unseen.append(heads.module)
            scores.append(None)
            continue
        per_query = totals[heads.module] / tokens[heads.module]
        index = {root[s]: h for h, s in enumerate(heads.query)}
        scores.append(torch.stack([sum(per_query[index[r]] for r in roots if r in index) for roots in attention]))
    if unseen:
        notes.append(f"left out, their output projection does not run as a module of its own: {', '.join(unseen)}")
    return scores


def _run(model, batches, progress, handles) -> None:
    """Run the model on the batches in eval mode without gradients, then remove the hooks and restore the modes."""
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
                    raise PlanError(f"calibration batch {i} (shape {shapes}) does not run through the model: {first}") from e
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training


def _counts(attentions, scores, amount: float, scope: str, round_to: int, kv: bool, criterion: str) -> list[int]:
    """How many candidates each attention loses. Query heads of a grouped-query attention come in equal numbers
    from every group, so their count is a multiple of the group count."""
    steps = [1 if kv or len(h.key_value) == len(h.query) else len(h.key_value) for h in attentions]
    sizes = [len(h.key_value) if kv else len(h.query) for h in attentions]
    if scope == "global":
        rescale = CRITERIA[criterion].rescale if criterion in CRITERIA else (lambda s: s / s.mean().clamp_min(1e-300))
        live = [i for i, s in enumerate(scores) if s is not None]
        flat = torch.cat([rescale(scores[i]) for i in live]) if live else torch.zeros(0)
        owner = [i for i in live for _ in range(sizes[i])]
        wanted = math.floor(amount * sum(sizes[i] for i in live) + 0.5)
        counts = [0] * len(attentions)
        for position in torch.argsort(flat, stable=True)[:wanted].tolist():
            counts[owner[position]] += 1
        fractions = [c / n for c, n in zip(counts, sizes)]
    else:
        fractions = [amount] * len(attentions)
    counts = []
    for fraction, n, step in zip(fractions, sizes, steps):
        k = prune_count(fraction, n // step, 1) * step  # whole rounds: one head from each group
        while k and (n - k) % round_to:  # keep a multiple of round_to, removing fewer if need be
            k -= step
        counts.append(min(k, n - step))
    return counts


class BlockChoice:
    """The residual blocks of a model, scored, and the least important ones for a given amount.

    ``influence`` is ShortGPT's Block Influence: one minus the cosine similarity between a block's input and output
    (along the channels, averaged over tokens or positions and over the calibration batches). A block that barely
    changes its input matters little. ``random`` is a seeded draw.
    """

    def __init__(self, model, graph: ChannelGraph, criterion: str, exclude: Iterable[str], batches, progress, seed,
                 notes: list[str]) -> None:  # fmt: skip
        if criterion not in BLOCK_CRITERIA:
            raise PlanError(f"criterion {criterion!r} does not score blocks; use one of {', '.join(BLOCK_CRITERIA)}")
        found = [name for name, why in graph.blocks.items() if why is None]
        # The smallest blocks: a stack of blocks is a block too, but dropping it is dropping them all.
        blocks = [b for b in found if not any(o.startswith(f"{b}.") for o in found)]
        patterns = list(exclude)
        self.blocks = [b for b in blocks if not any(fnmatch.fnmatchcase(b, p) for p in patterns)]
        if not self.blocks:
            raise PlanError("no residual block to drop was traced in this model (a block's output is its input plus "
                            "a branch)")  # fmt: skip
        if criterion == "random":
            self.scores = torch.rand(len(self.blocks), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        else:
            self.scores = _influence(model, self.blocks, batches, progress)

    def pick(self, amount: float) -> list[str]:
        """The `amount` of the blocks that matter least (rounded half up; at least one block stays)."""
        count = min(math.floor(amount * len(self.blocks) + 0.5), len(self.blocks) - 1)
        order = torch.argsort(self.scores, stable=True)[:count].tolist()
        return [self.blocks[i] for i in sorted(order)]


def _influence(model, blocks: list[str], batches, progress) -> torch.Tensor:
    """1 - cos(input, output) of each block, along the channels (axis 1 of images, the last axis of tokens)."""
    modules = dict(model.named_modules())
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)

    def record(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        axis = 1 if x.ndim == 4 else -1
        similarity = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=axis)
        totals[i] += (1 - similarity).sum()
        counts[i] += similarity.numel()

    handles = [
        modules[name].register_forward_hook(lambda m, args, out, i=i: record(i, args[0], out))
        for i, name in enumerate(blocks)
    ]
    _run(model, batches, progress, handles)
    return totals / counts.clamp_min(1)
