"""Fuzz the applier with structurally mutated specs: each one is refused, or builds a model that equals its mock.

    python scripts/fuzz.py                 # 10,000 cases, half on a CNN, half on a transformer (`make fuzz`)
    python scripts/fuzz.py --cases 500 --seed 3

Start reading at `run_case`. Two valid specs are planned once: resnet18 from torchvision (a small input; pruned
inputs and outputs, so there are subselections and reordered channels) and a small random Hugging Face Llama with
grouped-query attention (query heads, a key/value head, MLP channels, hidden channels pruned through the norms and
a dropped block). Each case applies one to three `MUTATIONS` to a copy of one of them, the edits a reviewer might
make by hand: delete a layer's whole entry or one of its fields, swap or shift index lists, change counts and head
counts, delete or change dropped blocks, tied tensors, groups of neighbours. Then it must end in one of two ways:

- **refused**: `prunespec.SpecError`, one line, and the model's state_dict exactly as before, no hooks left;
- **exact**: the pruned model runs and equals `prunespec.mock` of the original within the invariant's tolerance.

Anything else is a **defect**: another exception, a changed model after a refusal, a forward pass that fails, or
an output that differs. The counts are printed, and the exit status is 1 when there is any defect. On the project's
shared two-core machine (busy with other work) 10,000 cases took 37 minutes in one process, and 9-10.5 minutes as
three shards run side by side (``--shard 0/3`` ... ``--shard 2/3``: the same cases, split). `tests/test_fuzz_spec.py`
runs a few hundred of the same cases under Hypothesis.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run as a script from anywhere: prunespec, scripts, tests helpers

import prunespec  # noqa: E402
from invariant import assert_matches  # noqa: E402
from prunespec.schemas import load_spec_bytes  # noqa: E402
from scripts import zoo  # noqa: E402


@dataclass
class Subject:
    """A model, its example inputs and a valid spec for it, as JSON."""

    name: str
    model: torch.nn.Module
    inputs: list[torch.Tensor]
    spec: dict


@cache
def cnn() -> Subject:
    """resnet18, float64, a 16x16 input; some inputs and outputs pruned, reordered, with subselections."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).double().eval()
    zoo.randomize(model, 16)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rng = random.Random(0)
    inputs = [("layer1.0.conv2.weight", c) for c in range(0, 8)] + [("layer2.0.conv1.weight", c) for c in (3, 9, 17)]
    inputs += [("layer3.1.conv1.weight", c) for c in rng.sample(range(256), 20)]
    outputs = [("layer3.0.conv1.weight", c) for c in range(16)] + [("conv1.weight", 5)]
    outputs += [("layer4.0.conv1.weight", c) for c in rng.sample(range(512), 30)]
    spec = prunespec.plan(model, [x], pruned_inputs=inputs, pruned_outputs=outputs)
    return Subject("resnet18", model, [x], json.loads(spec.to_json()))


@cache
def transformer() -> Subject:
    """A small random Llama with grouped-query attention (8 query heads in 2 key/value groups, three layers):
    query heads, a key/value head, MLP channels and hidden channels pruned through the norms, a block dropped."""
    from scripts.families import _lm

    model, inputs = _lm("LlamaForCausalLM", "LlamaConfig", head_dim=8, num_hidden_layers=3)()
    zoo.randomize(model, 7)
    spec = prunespec.plan(
        model,
        inputs,
        pruned_heads=[("model.layers.0.self_attn", h) for h in (1, 6)],
        pruned_kv_heads=[("model.layers.2.self_attn", 0)],
        pruned_inputs=[("model.layers.0.mlp.down_proj.weight", c) for c in (0, 3, 7, 40, 41, 90)],
        pruned_outputs=[("model.embed_tokens.weight", c) for c in (2, 5, 30, 31, 63)],
        through_norms=True,
        pruned_blocks=["model.layers.1"],
    )
    return Subject("llama", model, inputs, json.loads(spec.to_json()))


SUBJECTS = {"resnet18": cnn, "llama": transformer}


# ------------------------------------------------------------------------------------------------ mutations


def _index_lists(data: dict) -> list[tuple[dict | list, str | int]]:
    """(container, key) of every index-runs string in the spec's layers and groups of neighbours."""
    found = []
    for layer in data["layers"].values():
        for axes in layer.get("tensors", {}).values():
            found += [(axes, i) for i, runs in enumerate(axes) if isinstance(runs, str)]
        for field in ("input", "normalises"):
            if isinstance(layer.get(field), dict):
                found.append((layer[field], "indices" if field == "input" else "kept"))
    found += [(group, "kept") for group in data.get("neighbours") or ()]
    return found


def _runs(indices: list[int]) -> str:
    return prunespec.schemas.encode_runs(indices)


def _shifted(runs: str, rng: random.Random) -> str:
    """Another list of nearly the same indices: shifted by one, rotated, reversed, one index swapped or dropped."""
    indices = prunespec.schemas.decode_runs(runs)
    if not indices:
        return "0"
    how = rng.choice(["shift", "rotate", "reverse", "swap", "drop", "add"])
    if how == "shift":
        indices = [i + rng.choice([-1, 1]) for i in indices]
        indices = [i for i in indices if i >= 0]
    elif how == "rotate":
        k = rng.randrange(len(indices))
        indices = indices[k:] + indices[:k]
    elif how == "reverse":
        indices = indices[::-1]
    elif how == "swap" and len(indices) > 1:
        a, b = rng.sample(range(len(indices)), 2)
        indices[a], indices[b] = indices[b], indices[a]
    elif how == "drop":
        del indices[rng.randrange(len(indices))]
    elif how == "add":
        indices.append(max(indices) + 1)
    return _runs(indices)


def delete_layer(data, rng):
    del data["layers"][rng.choice(list(data["layers"]))]


def delete_layer_field(data, rng):
    layer = data["layers"][rng.choice(list(data["layers"]))]
    field = rng.choice(sorted(layer))
    if field == "tensors" and layer["tensors"] and rng.random() < 0.6:
        tensor = rng.choice(sorted(layer["tensors"]))
        axes = layer["tensors"][tensor]
        if rng.random() < 0.5 or len(axes) < 2:
            del layer["tensors"][tensor]
        else:
            axes[rng.randrange(len(axes))] = None
    elif field == "attributes" and layer["attributes"] and rng.random() < 0.6:
        del layer["attributes"][rng.choice(sorted(layer["attributes"]))]
    else:
        del layer[field]


def shift_index_list(data, rng):
    container, key = rng.choice(_index_lists(data))
    container[key] = _shifted(container[key], rng)


def swap_index_lists(data, rng):
    lists = _index_lists(data)
    (a, i), (b, j) = rng.sample(lists, 2)
    a[i], b[j] = b[j], a[i]


def copy_layer_entry(data, rng):
    """Prune a layer the plan left alone like another of its type (or put one layer's entry on another)."""
    name = rng.choice(list(data["layers"]))
    targets = [key.rpartition(".")[0] for key in data["fingerprint"]]
    target = rng.choice(targets)
    if target != name:
        data["layers"][target] = copy.deepcopy(data["layers"][name])


def change_count(data, rng):
    """An attribute, a subselection's size, an activation size or a norm's channel count off by one."""
    layer = data["layers"][rng.choice(list(data["layers"]))]
    places = [(layer["attributes"], k) for k in layer.get("attributes", {})]
    if isinstance(layer.get("input"), dict):
        places.append((layer["input"], "channels"))
    if "input_activation_channels" in layer:
        places.append((layer, "input_activation_channels"))
    if isinstance(layer.get("normalises"), dict):
        places.append((layer["normalises"]["channels"], 1))
    if places:
        container, key = rng.choice(places)
        container[key] = max(0, container[key] + rng.choice([-1, 1]))


def change_heads(data, rng):
    attentions = [layer for layer in data["layers"].values() if isinstance(layer.get("heads"), dict)]
    if not attentions:
        return
    heads = rng.choice(attentions)["heads"]
    how = rng.choice(["query", "key_value", "head_dim", "delete", "attribute"])
    if how in ("query", "key_value"):
        heads[how][1] = max(0, heads[how][1] + rng.choice([-1, 1]))
    elif how == "head_dim":
        heads["head_dim"] += rng.choice([-1, 1])
    elif how == "delete":
        for layer in data["layers"].values():
            if layer.get("heads") is heads:
                del layer["heads"]
    else:
        for layer in data["layers"].values():
            if layer.get("heads") is heads and layer["attributes"]:
                key = rng.choice(sorted(layer["attributes"]))
                layer["attributes"][key] = max(0, layer["attributes"][key] + rng.choice([-1, 1]))


def change_dropped_blocks(data, rng):
    blocks = data["dropped_blocks"]
    how = rng.choice(["delete", "delete both", "other block", "how", "add"])
    candidates = sorted({key.rpartition(".")[0].rpartition(".")[0] for key in data["fingerprint"]})
    if how == "add" or not blocks:
        name = rng.choice(candidates)
        blocks.append({"module": name, "how": rng.choice(["removed", "identity"])})
        if rng.random() < 0.5:
            data["request"]["pruned_blocks"].append(name)
    elif how == "delete":
        del blocks[rng.randrange(len(blocks))]
    elif how == "delete both":
        block = blocks.pop(rng.randrange(len(blocks)))
        if block["module"] in data["request"]["pruned_blocks"]:
            data["request"]["pruned_blocks"].remove(block["module"])
    elif how == "other block":
        block = rng.choice(blocks)
        old, block["module"] = block["module"], rng.choice(candidates)
        if rng.random() < 0.5 and old in data["request"]["pruned_blocks"]:
            data["request"]["pruned_blocks"][data["request"]["pruned_blocks"].index(old)] = block["module"]
    else:
        block = rng.choice(blocks)
        block["how"] = "identity" if block["how"] == "removed" else "removed"


def change_tied(data, rng):
    if data["tied"] and rng.random() < 0.5:
        del data["tied"][rng.choice(sorted(data["tied"]))]
    else:
        names = list(data["fingerprint"])
        data["tied"][rng.choice(names)] = rng.choice(names)


def change_neighbours(data, rng):
    groups = data.get("neighbours") or []
    if not groups:
        return
    i = rng.randrange(len(groups))
    group = groups[i]
    how = rng.choice(["delete group", "delete entry", "channels", "unit", "heads", "repeated_in", "move entry"])
    if how == "delete group":
        del groups[i]
    elif how in ("delete entry", "move entry"):
        lists = [key for key in ("tensors", "readers", "norms") if group.get(key)]
        if lists:
            key = rng.choice(lists)
            entry = group[key].pop(rng.randrange(len(group[key])))
            if how == "move entry":
                rng.choice(groups).setdefault(key, []).append(entry)
    elif how == "channels":
        group["channels"][rng.randrange(2)] += rng.choice([-1, 1])
    elif how == "unit":
        group["unit"] = max(1, group.get("unit", 1) + rng.choice([-1, 1, 7]))
    elif how == "heads":
        if group.get("heads"):
            at = rng.choice(group["heads"])
            key = rng.choice(["first", "count", "delete"])
            if key == "delete":
                group["heads"].remove(at)
            else:
                at[key] = max(0, at[key] + rng.choice([-1, 1]))
        else:
            group["heads"] = [{"module": "model.layers.0.self_attn", "side": "query", "first": 0, "count": 8}]
    else:
        group.pop("repeated_in", None) if "repeated_in" in group else group.__setitem__(
            "repeated_in", rng.choice(groups).get("tensors", ["x:0"])[0]
        )


def change_norm_folds(data, rng):
    folds = data["norm_folds"]
    if folds and rng.random() < 0.5:
        fold = rng.choice(folds)
        fold[rng.choice(["norm", "into"])] = rng.choice(list(data["layers"]) + [f["norm"] for f in folds])
    elif folds:
        del folds[rng.randrange(len(folds))]


MUTATIONS = [delete_layer, delete_layer_field, shift_index_list, swap_index_lists, copy_layer_entry, change_count,
             change_heads, change_dropped_blocks, change_tied, change_neighbours, change_norm_folds]  # fmt: skip
# A reviewer's commonest edits: deleting a layer's entry, or part of one, to "keep" it.
WEIGHTS = [4, 3, 3, 2, 1, 2, 2, 2, 1, 2, 1]


def mutate(spec: dict, rng: random.Random) -> tuple[bytes, list[str]]:
    """A copy of `spec` with one to three mutations, as JSON bytes, and the names of the mutations."""
    data = copy.deepcopy(spec)
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        mutation = rng.choices(MUTATIONS, WEIGHTS)[0]
        try:
            mutation(data, rng)
            done.append(mutation.__name__)
        except (IndexError, KeyError, TypeError, ValueError, AttributeError):  # an earlier mutation took its target
            pass
    return json.dumps(data).encode(), done


# ------------------------------------------------------------------------------------------------ one case


@dataclass
class Outcome:
    kind: str  # "refused", "exact" or "defect"
    detail: str = ""


def run_case(subject: Subject, data: bytes) -> Outcome:
    """Load and apply one mutated spec; say how it ended (see the module docstring)."""
    try:
        spec = load_spec_bytes(data, "fuzzed.json")
    except prunespec.SpecError as e:
        return _refused(e)
    except Exception as e:  # noqa: BLE001 - any other exception is the defect this looks for
        return Outcome("defect", f"reading raised {type(e).__name__}: {e}")
    model = copy.deepcopy(subject.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        pruned = prunespec.prune(model, spec)
    except prunespec.SpecError as e:
        after = model.state_dict()
        if after.keys() != before.keys() or not all(torch.equal(after[k], before[k]) for k in before):
            return Outcome("defect", f"refused ({e}) but the model changed")
        if any(m._forward_pre_hooks or m._forward_hooks for m in model.modules()):
            return Outcome("defect", f"refused ({e}) but hooks were left on the model")
        return _refused(e)
    except Exception as e:  # noqa: BLE001
        return Outcome("defect", f"prune raised {type(e).__name__}: {e}")
    try:
        with torch.no_grad():
            got = pruned(*subject.inputs)
            expected = prunespec.mock(subject.model, spec)(*subject.inputs)
        assert_matches(got, expected)
    except Exception as e:  # noqa: BLE001 - a failed forward or comparison
        return Outcome("defect", f"accepted, then {type(e).__name__}: {str(e)[:300]}")
    return Outcome("exact")


def _refused(error: prunespec.SpecError) -> Outcome:
    message = str(error)
    if not message or "\n" in message or ":" not in message:
        return Outcome("defect", f"refused, but not in one line naming what is wrong: {message[:200]!r}")
    return Outcome("refused", message)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases in all, split between the subjects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subjects", nargs="+", choices=sorted(SUBJECTS), default=sorted(SUBJECTS))
    parser.add_argument("--show", type=int, default=5, help="defects to print in full")
    parser.add_argument("--shard", default="0/1", help="K/N: run only the cases whose number is K modulo N (the same "
                        "cases as a whole run, shared between N processes)")  # fmt: skip
    args = parser.parse_args(argv)
    shard, shards = (int(n) for n in args.shard.split("/"))
    torch.set_num_threads(1)
    start = time.perf_counter()
    counts: Counter = Counter()
    defects = []
    for k, name in enumerate(args.subjects):
        subject = SUBJECTS[name]()
        cases = args.cases // len(args.subjects) + (k < args.cases % len(args.subjects))
        rng = random.Random(f"{args.seed}:{name}")
        for case in range(cases):
            data, done = mutate(subject.spec, rng)  # drawn for every case, so that each shard sees the same ones
            if case % shards != shard:
                continue
            outcome = run_case(subject, data)
            counts[name, outcome.kind] += 1
            if outcome.kind == "defect":
                defects.append((name, case, done, outcome.detail))
    seconds = time.perf_counter() - start
    for name in args.subjects:
        print(f"{name}: refused {counts[name, 'refused']}, applied and exact {counts[name, 'exact']}, "
              f"defects {counts[name, 'defect']}")  # fmt: skip
    total = Counter()
    for (_, kind), n in counts.items():
        total[kind] += n
    print(f"all {sum(total.values())} cases: refused {total['refused']}, applied and exact {total['exact']}, "
          f"defects {total['defect']} ({seconds:.0f} s)")  # fmt: skip
    for name, case, done, detail in defects[: args.show]:
        print(f"defect: {name} case {case} ({', '.join(done)}): {detail}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
