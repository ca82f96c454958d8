"""Config: the values of a model's configuration (a Hugging Face `config.json`) that describe the pruned model.

Start with `described`. A model built from a config (``type(model)(config)``) takes its sizes from it: heads,
key/value heads, MLP width, hidden width, layer count. When pruning leaves every layer of a stack the same size, new
config values describe the pruned model, and `from_pretrained` loads it like any other. Which key gives which size is
not taken from names: for each key that may give a size (`CONFIG_SIZES`, and `head_dim`, which many configs leave to
be worked out), the model is built on the `meta` device with that key one larger, and the tensor axes that grow are
the ones it gives, by how much per unit (`_reach`). The new values then follow from the pruned model's sizes of those
axes (`_solved`). The proposal is kept only if the model built from the new config has exactly the pruned model's shapes
(`review.pruned_shapes`). Activation subselections are not in any config, so a plan with them is never described.
"""

from __future__ import annotations

import copy

import msgspec
import torch

from prunespec.review import pruned_shapes
from prunespec.schemas import PruningSpec

# The config keys that may give a size the planner changes: attention heads, key/value heads and widths. Another
# integer (`max_position_embeddings`, `vocab_size`) means something no pruning changes.
CONFIG_SIZES = (
    "num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "n_kv_heads", "num_kv_heads", "hidden_size",
    "n_embd", "d_model", "dim", "intermediate_size", "n_inner", "ffn_dim", "d_ff", "mlp_dim", "head_dim",
)  # fmt: skip


def described(model: torch.nn.Module, spec: PruningSpec, inputs, head_dims: set[int]) -> tuple[dict, str | None]:
    """Config values (before, after) that describe the model `spec` prunes, and why there are none when they
    cannot (None when they can, or when the plan changes no size). `head_dims`: those of the traced attentions."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not spec.layers:
        return dict(spec.config), None if config is not None or not spec.layers else "the model has no config"
    if spec.summary.subselections:
        return dict(spec.config), "the plan gathers activations, which no config says"
    # The sizes are solved from the config with the blocks already gone (the layer counts the spec records).
    without_blocks = copy.deepcopy(model.config)
    for key, (_, after) in spec.config.items():
        setattr(without_blocks, key, copy.deepcopy(after))
    pruned = pruned_shapes(spec)
    # Which key gives which axis is measured on one layer of the stack (the layers of a stack are alike, and a
    # model of 80 layers is built in seconds even on meta); the model built from the new config is then checked
    # whole, so a layer that differs from the others is found there.
    small = _one_layer(without_blocks)
    try:
        base = _shapes(_built(model, small))
    except Exception:  # a model whose config cannot say one layer: measured on them all
        small = without_blocks
        try:
            base = _shapes(_built(model, small))
        except Exception as e:  # a model that cannot be built from its config
            return dict(spec.config), f"the model cannot be built from its config ({_first_line(e)})"
    config, proposals = _with_head_dim(small, model, head_dims, base)
    # head_dim never changes (pruning takes or leaves whole heads): it stays out of the sizes solved for.
    keys = {k: v for k, v in config.to_dict().items() if k in CONFIG_SIZES and k != "head_dim" and type(v) is int}
    solved, conflict = _solved(model, config, keys, base, pruned)
    if conflict is not None:
        return dict(spec.config), conflict
    for key, after in solved.items():
        proposals[key] = (keys[key], after)
    if not proposals:
        return dict(spec.config), None if pruned == _shapes(_built(model, without_blocks)) else (
            "no size of the config changes, but the pruned model's do"
        )
    changed = copy.deepcopy(without_blocks)
    for key, (_, after) in proposals.items():
        setattr(changed, key, copy.deepcopy(after))
    refused = _refused(changed)
    if refused is not None:
        return dict(spec.config), refused
    try:
        rebuilt = _shapes(_built(model, changed))
    except Exception as e:
        return dict(spec.config), f"no model can be built from the config it would take ({_first_line(e)})"
    for name, shape in pruned.items():
        if rebuilt.get(name) != shape:
            return dict(spec.config), (
                f"{name} is {list(shape)} in the pruned model but {list(rebuilt.get(name, ()))} from any config "
                "(layers of one stack keep different sizes, or the model works a size out itself)"
            )
    # Shapes are not all a config gives: a model may work values out of its sizes when it is built (Gemma scales
    # its embeddings by the square root of hidden_size). Where the model has weights, the model built from the
    # new config is run against the pruned one; where it has none (planned on meta), only the sizes that a model
    # reads for shapes alone in every model family this was tried on are described.
    described_spec = msgspec.structs.replace(spec, config={**spec.config, **proposals})
    problem = _runs_differently(model, described_spec, changed, inputs) if _runnable(model) else None
    if problem is not None:
        return dict(spec.config), problem
    if not _runnable(model):
        unchecked = [k for k in proposals if k not in SHAPES_ONLY]
        if unchecked:
            return dict(spec.config), f"{unchecked[0]} may change more than shapes, and a model on meta cannot show"
    return {**spec.config, **proposals}, None


# Sizes that models read for the shapes of their tensors only, which the check of shapes covers.
SHAPES_ONLY = {"num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "n_kv_heads", "num_kv_heads",
               "intermediate_size", "n_inner", "ffn_dim", "d_ff", "mlp_dim", "head_dim"}  # fmt: skip
RUNNABLE = 2 * 10**8  # parameters up to which the model built from a new config is run, to compare outputs


def _runnable(model: torch.nn.Module) -> bool:
    parameters = list(model.parameters())
    return not any(p.is_meta for p in parameters) and sum(p.numel() for p in parameters) <= RUNNABLE


def _runs_differently(model, spec: PruningSpec, config, inputs) -> str | None:
    """Why the model built from `config`, with the pruned weights, computes something else than the pruned model;
    None when it computes the same on the example inputs."""
    from torch.utils._pytree import tree_leaves

    from prunespec.applier import prune

    pruned = prune(copy.deepcopy(model), spec).eval()
    rebuilt = type(model)(copy.deepcopy(config)).to(next(model.parameters()).dtype).eval()
    try:
        rebuilt.load_state_dict(pruned.state_dict(), strict=True)
        with torch.no_grad():
            want = [t for t in tree_leaves(pruned(*inputs)) if isinstance(t, torch.Tensor)]
            have = [t for t in tree_leaves(rebuilt(*inputs)) if isinstance(t, torch.Tensor)]
    except Exception as e:
        return f"the model built from the new config does not take the pruned weights ({_first_line(e)})"
    for a, b in zip(want, have):
        if a.shape != b.shape or not torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6 * a.abs().max()):
            return "the model built from the new config computes something else (it works values out of its sizes)"
    return None


def _refused(config) -> str | None:
    """Why the config class refuses these values when it reads them from a file, as `from_pretrained` does; None
    when it takes them. Setting attributes checks nothing, but a config read from config.json is validated (Llama's
    wants `hidden_size` a multiple of `num_attention_heads`, even where `head_dim` is given)."""
    if not hasattr(config, "to_dict") or not hasattr(type(config), "from_dict"):
        return None
    try:
        type(config).from_dict(config.to_dict())
    except Exception as e:
        cause = e
        while cause.__cause__ is not None:  # huggingface_hub wraps the validator's own message
            cause = cause.__cause__
        return f"{type(config).__name__} refuses the values it would take ({_first_line(cause)})"
    return None


def _one_layer(config):
    """`config` with one layer in its stack, if it says how many it has; else `config` itself."""
    if type(getattr(config, "num_hidden_layers", None)) is not int or config.num_hidden_layers <= 1:
        return config
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = small.layer_types[:1]
    return small


def _with_head_dim(config, model, head_dims: set[int], base: dict) -> tuple:
    """`config` with `head_dim` written out, when it is not and the model reads it (so that the head count alone
    gives the projections' widths, whatever the hidden width), and the proposal that writes it; else the config as
    it is."""
    if "head_dim" in config.to_dict() or len(head_dims) != 1:
        return config, {}
    written = copy.deepcopy(config)
    written.head_dim = next(iter(head_dims))
    try:
        same = _shapes(_built(model, written)) == base
    except Exception:
        same = False
    return (written, {"head_dim": (None, written.head_dim)}) if same else (config, {})


def _solved(model, config, keys: dict[str, int], base: dict, pruned: dict) -> tuple[dict[str, int], str | None]:
    """New values of `keys` under which every axis they give has the pruned model's size, where there are such.

    An axis may take its size from several keys (a fused projection: heads and key/value heads), so the sizes are
    solved together: each axis's change is the sum over the keys of its growth per unit times the key's change.
    """
    reach = {key: _reach(model, config, key, value, base) for key, value in keys.items()}
    reach = {key: axes for key, axes in reach.items() if axes}
    axes = sorted({(name, axis) for found in reach.values() for name, axis, _ in found})
    if not axes:
        return {}, None
    names = list(reach)
    slopes = torch.zeros(len(axes), len(names), dtype=torch.float64)
    row = {a: i for i, a in enumerate(axes)}
    for j, key in enumerate(names):
        for name, axis, slope in reach[key]:
            slopes[row[(name, axis)], j] = slope
    change = torch.tensor([pruned[n][a] - base[n][a] if n in pruned else 0 for n, a in axes], dtype=torch.float64)
    solution = torch.linalg.lstsq(slopes, change[:, None]).solution[:, 0].round()
    missed = (slopes @ solution != change).nonzero().flatten().tolist()
    if missed:
        name, axis = axes[missed[0]]
        size = base[name][axis] + int(change[missed[0]])
        return {}, (
            f"{name} axis {axis} is {size} in the pruned model, but {base[name][axis] + int((slopes @ solution)[missed[0]])}"
            " with any one value of the config's sizes (the layers of a stack keep different sizes)"
        )
    return {key: keys[key] + int(d) for key, d in zip(names, solution.tolist()) if d}, None


def _reach(model, config, key: str, start: int, base: dict) -> list[tuple[str, int, int]]:
    """The tensor axes that `key` gives: (tensor, axis, growth per unit of the key)."""
    grown = copy.deepcopy(config)
    setattr(grown, key, start + 1)
    try:
        shapes = _shapes(_built(model, grown))
    except Exception:  # the key does not stand alone (a count others must divide): it gives no size by itself
        return []
    reach = []
    for name, shape in base.items():  # the written-out head_dim changes no shape: `base` stands for `config`
        other = shapes.get(name)
        if other is None or len(other) != len(shape):
            continue
        for axis, (a, b) in enumerate(zip(shape, other)):
            if a != b:
                reach.append((name, axis, b - a))
    return reach


def _built(model: torch.nn.Module, config) -> torch.nn.Module:
    """The model's class built from `config` on the meta device, in the model's floating dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with torch.device("meta"):
        return type(model)(copy.deepcopy(config)).to(dtype)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:120] if text else ''}"
