"""Per-module-type rules: what the applier may change on each kind of layer, and how to tell the result is sound.

Start with `Rule`, then `rule_for`. A rule is one small object per module type, found through `RULES` by walking
the module's MRO, so a subclass of `nn.Conv2d` gets the convolution rule. Any module without a rule gets
`GENERIC`, which lets a spec slice the module's own parameters and buffers and nothing else.

Adding a layer type (LayerNorm, GroupNorm, PReLU, Embedding, ...) means writing one `Rule` subclass and one
`register(...)` line at the bottom of this file; `validate` and `prune` do not change.

A rule never sees the module being mutated. It is shown the module *as it would be* after pruning: the attributes
it accepts (the spec's values over the module's current ones) and all of the module's own tensors (new shapes where
the spec changes them). It answers with a one-line problem, or None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunespec.applier.attention import PrunedMultiheadAttention, multihead_attention_problem, pruned_class


class Rule:
    """How one module type is pruned. The defaults describe a module with no attributes and no input gather.

    `attributes`: the attribute names a spec may set. `input_axis`: the axis of the input activation that holds
    channels, for an activation subselection, or None when the module takes none.
    """

    attributes: frozenset[str] = frozenset()
    input_axis: int | None = None
    absorbs = False
    """A layer whose weight's axis 0 makes its output channels: a batch norm after it can be folded into it."""
    folds = False
    """A batch norm: for inference, a fixed per-channel scale and shift that can be folded into the layer before."""

    def check(self, attributes: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str | None:
        """A problem with the pruned module, or None when its attributes agree with its tensor shapes."""
        return None

    def derive(self, module: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """The attributes the planner writes for `module` once its own tensors have `shapes`."""
        return {}

    def input_channels(self, attributes: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> int:
        """How many input channels the pruned module reads (the length a subselection must have)."""
        raise NotImplementedError(f"{type(self).__name__} takes no input subselection")

    def renormalised(self, module: nn.Module, channels: int) -> dict[str, int]:
        """The attributes of a norm that takes its statistics over `channels` channels after pruning (see
        `LayerSpec.normalises`); a norm that keeps no such attribute (an RMS norm written in Python) needs none."""
        return {}

    def fills_input(self, module: nn.Module) -> bool:
        """Whether the module's weight axis 1 holds its input channels one to one, so that zero columns there can
        stand in for an input subselection (see `layout`)."""
        return False

    def set_attributes(self, module: nn.Module, attributes: Mapping[str, int]) -> None:
        """Write the spec's attributes onto the module; a rule whose attribute is not a plain int overrides this."""
        for name, value in attributes.items():
            setattr(module, name, value)


class ConvRule(Rule):
    """Conv1d/2d/3d and their transposed forms, grouped and depthwise included.

    A convolution's weight is [out, in/groups, *kernel]; a transposed one's is [in, out/groups, *kernel]. Channels
    sit just before the spatial axes, so a negative input axis serves batched and unbatched inputs alike.
    """

    attributes = frozenset({"in_channels", "out_channels", "groups"})

    def __init__(self, spatial_dims: int, transposed: bool = False):
        self.input_axis = -(spatial_dims + 1)
        self.transposed = transposed
        self.absorbs = not transposed  # a transposed weight's axis 0 holds its inputs

    def check(self, attributes, tensors):
        in_channels, out_channels, groups = (attributes[k] for k in ("in_channels", "out_channels", "groups"))
        if groups < 1:
            return f"attribute 'groups' is {groups}; it must be at least 1"
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value % groups:
                return f"attribute '{name}' is {value}, which is not divisible by groups={groups}"
        weight = tensors["weight"]
        whole, per_group = ("in_channels", "out_channels") if self.transposed else ("out_channels", "in_channels")
        if attributes[whole] != weight.shape[0]:
            return f"attribute '{whole}' is {attributes[whole]} but weight axis 0 has {weight.shape[0]}"
        if attributes[per_group] != weight.shape[1] * groups:
            return (
                f"attribute '{per_group}' is {attributes[per_group]} but weight axis 1 has {weight.shape[1]} "
                f"per group x groups={groups} = {weight.shape[1] * groups}"
            )
        return _sized("bias", tensors, out_channels, "out_channels")

    def input_channels(self, attributes, tensors):
        return attributes["in_channels"]

    def fills_input(self, module):
        return not self.transposed and module.groups == 1

    def derive(self, module, shapes):
        whole, per_group = shapes["weight"][:2]
        # A depthwise convolution stays depthwise: its groups shrink with its channels.
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        groups = whole if depthwise else module.groups
        if self.transposed:
            return {"in_channels": whole, "out_channels": per_group * groups, "groups": groups}
        return {"in_channels": per_group * groups, "out_channels": whole, "groups": groups}


class LinearRule(Rule):
    """nn.Linear: weight is [out_features, in_features]; the input's features are its last axis."""

    attributes = frozenset({"in_features", "out_features"})
    input_axis = -1
    absorbs = True

    def check(self, attributes, tensors):
        weight = tensors["weight"]
        for axis, name in enumerate(("out_features", "in_features")):
            if attributes[name] != weight.shape[axis]:
                return f"attribute '{name}' is {attributes[name]} but weight axis {axis} has {weight.shape[axis]}"
        return _sized("bias", tensors, attributes["out_features"], "out_features")

    def input_channels(self, attributes, tensors):
        return attributes["in_features"]

    def fills_input(self, module):
        return True

    def derive(self, module, shapes):
        return {"out_features": shapes["weight"][0], "in_features": shapes["weight"][1]}


class MatrixRule(Rule):
    """A linear layer that stores its weight ``[in, out]`` and multiplies ``x @ weight + bias`` (GPT-2's
    ``transformers.pytorch_utils.Conv1D``, with ``nx`` inputs and ``nf`` outputs)."""

    attributes = frozenset({"nx", "nf"})
    input_axis = -1

    def check(self, attributes, tensors):
        weight = tensors["weight"]
        for axis, name in enumerate(("nx", "nf")):
            if attributes[name] != weight.shape[axis]:
                return f"attribute '{name}' is {attributes[name]} but weight axis {axis} has {weight.shape[axis]}"
        return _sized("bias", tensors, attributes["nf"], "nf")

    def input_channels(self, attributes, tensors):
        return attributes["nx"]

    def derive(self, module, shapes):
        return {"nx": shapes["weight"][0], "nf": shapes["weight"][1]}


class EmbeddingRule(Rule):
    """nn.Embedding and nn.EmbeddingBag: weight is [num_embeddings, embedding_dim]; the hidden width prunes its
    columns. It reads token ids, not channels."""

    attributes = frozenset({"num_embeddings", "embedding_dim"})

    def check(self, attributes, tensors):
        weight = tensors["weight"]
        for axis, name in enumerate(("num_embeddings", "embedding_dim")):
            if attributes[name] != weight.shape[axis]:
                return f"attribute '{name}' is {attributes[name]} but weight axis {axis} has {weight.shape[axis]}"
        return None

    def derive(self, module, shapes):
        return {"num_embeddings": shapes["weight"][0], "embedding_dim": shapes["weight"][1]}


class PerChannelNormRule(Rule):
    """Batch and instance norms: every per-channel tensor has num_features entries. They read channels one to one,
    so an activation subselection never belongs in front of them."""

    attributes = frozenset({"num_features"})

    def check(self, attributes, tensors):
        for name in ("weight", "bias", "running_mean", "running_var"):
            problem = _sized(name, tensors, attributes["num_features"], "num_features")
            if problem:
                return problem
        return None

    def derive(self, module, shapes):
        return {"num_features": shapes["running_mean"][0] if "running_mean" in shapes else shapes["weight"][0]}


class BatchNormRule(PerChannelNormRule):
    """Batch norms: in eval mode a fixed per-channel scale and shift, which can be folded into the layer before."""

    folds = True


class LayerNormRule(Rule):
    """nn.LayerNorm and nn.RMSNorm over the channels: `normalized_shape` (one axis, written as its size) and the
    per-channel weight and bias follow the channels it keeps, over which the pruned norm takes its statistics."""

    attributes = frozenset({"normalized_shape"})

    def check(self, attributes, tensors):
        size = attributes["normalized_shape"]
        if not isinstance(size, int):
            if len(size) != 1:
                return f"attribute 'normalized_shape' is {tuple(size)}: only a norm over one axis can be pruned"
            size = size[0]
        for name in ("weight", "bias"):
            problem = _sized(name, tensors, size, "normalized_shape")
            if problem:
                return problem
        return None

    def derive(self, module, shapes):
        return {"normalized_shape": shapes["weight"][0]} if "weight" in shapes else {}

    def renormalised(self, module: nn.Module, channels: int) -> dict[str, int]:
        return {"normalized_shape": channels}

    def set_attributes(self, module, attributes):
        for name, value in attributes.items():
            setattr(module, name, (value,) if name == "normalized_shape" else value)


class GroupNormRule(Rule):
    """nn.GroupNorm: whole groups are pruned, so the pruned norm has fewer groups of the same size."""

    attributes = frozenset({"num_groups", "num_channels"})

    def check(self, attributes, tensors):
        groups, channels = attributes["num_groups"], attributes["num_channels"]
        if groups < 1 or channels % groups:
            return f"attribute 'num_channels' is {channels}, which is not divisible by num_groups={groups}"
        for name in ("weight", "bias"):
            problem = _sized(name, tensors, channels, "num_channels")
            if problem:
                return problem
        return None

    def derive(self, module, shapes):
        if "weight" not in shapes:
            return {}
        channels = shapes["weight"][0]
        return {"num_channels": channels, "num_groups": channels // (module.num_channels // module.num_groups)}


class PReLURule(Rule):
    """nn.PReLU: one slope per channel (num_parameters of them), or a single shared slope."""

    attributes = frozenset({"num_parameters"})

    def check(self, attributes, tensors):
        return _sized("weight", tensors, attributes["num_parameters"], "num_parameters")

    def derive(self, module, shapes):
        return {"num_parameters": shapes["weight"][0]}


# ---------------------------------------------------------------------------------------------- attention


class MultiheadAttentionRule(Rule):
    """nn.MultiheadAttention: heads pruned from the in-projection (rows) and the out-projection's input (its own
    `out_proj` layer). A module whose projections become narrower than `embed_dim` gets the forward of
    `attention.PrunedMultiheadAttention`; `head_dim` never changes."""

    attributes = frozenset({"num_heads", "head_dim", "embed_dim", "kdim", "vdim"})

    def check(self, attributes, tensors):
        return multihead_attention_problem(attributes, tensors)

    def derive(self, module, shapes):
        rows, columns = shapes["in_proj_weight"] if "in_proj_weight" in shapes else shapes["q_proj_weight"]
        heads = (rows // 3 if "in_proj_weight" in shapes else rows) // module.head_dim
        derived = {"num_heads": heads, "embed_dim": columns}
        if "k_proj_weight" in shapes:
            derived.update(kdim=shapes["k_proj_weight"][1], vdim=shapes["v_proj_weight"][1])
        else:
            derived.update(kdim=columns, vdim=columns)
        return derived

    def set_attributes(self, module, attributes):
        super().set_attributes(module, attributes)
        if module.num_heads * module.head_dim != module.embed_dim or isinstance(module, PrunedMultiheadAttention):
            module.__class__ = pruned_class(type(module))


# The attributes in which attention modules keep their head counts, by what each counts. An attention module's
# forward reads some of them (``view(B, T, self.num_heads, -1)``, ``repeat_kv(k, self.num_key_value_groups)``,
# ``split(self.split_size)``); the planner writes the new value of each one a module has, and the applier checks
# it against the spec's head counts. Names, not classes: they hold across model families and library versions.
HEAD_ATTRIBUTES: dict[str, str] = {
    **dict.fromkeys(("num_heads", "num_attention_heads", "n_head", "n_heads", "num_q_heads"), "query"),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "num_kv"), "key_value"),
    **dict.fromkeys(("num_key_value_groups", "n_rep", "num_queries_per_kv"), "groups"),
    **dict.fromkeys(("all_head_size", "attn_dim", "inner_dim", "split_size", "embed_dim", "hidden_size", "q_dim"),
                    "query_width"),  # fmt: skip
}


def head_attribute(kind: str, query: int, key_value: int, head_dim: int) -> int:
    """What an attribute of `kind` (see `HEAD_ATTRIBUTES`) holds for these head counts.

    >>> head_attribute("groups", 8, 2, 64), head_attribute("query_width", 8, 2, 64)
    (4, 512)
    """
    if kind == "query":
        return query
    if kind == "key_value":
        return key_value
    if kind == "groups":
        return query // key_value if key_value else 0
    return query * head_dim


def head_attribute_problem(name: str, before: Any, after: Any, counts) -> str | None:
    """Why attribute `name` cannot go from `before` (the module's value) to `after` (the spec's), given the spec's
    `HeadCounts`; None when both agree with the head counts before and after pruning."""
    kind = HEAD_ATTRIBUTES[name]
    (query, new_query), (key_value, new_key_value) = counts.query, counts.key_value
    expected = head_attribute(kind, query, key_value, counts.head_dim)
    if before != expected:
        return f"attribute {name!r} is {before!r} in the model, but {expected} for the {query} heads the spec has"
    wanted = head_attribute(kind, new_query, new_key_value, counts.head_dim)
    if after != wanted:
        return f"attribute {name!r}: {after} given, but {wanted} for the {new_query} heads it keeps"
    return None


def _sized(name: str, tensors: Mapping[str, torch.Tensor], size: int, attribute: str) -> str | None:
    """A problem when the optional 1-D tensor `name` does not have `size` entries."""
    tensor = tensors.get(name)
    if tensor is None or tensor.shape[0] == size:
        return None
    return f"tensor '{name}' has {tensor.shape[0]} entries but attribute '{attribute}' is {size}"


# ---------------------------------------------------------------------------------------------- registry

RULES: dict[type | str, Rule] = {}
GENERIC = Rule()


def register(module_type: type | str, rule: Rule) -> None:
    """Use `rule` for `module_type` and, unless they have their own, its subclasses.

    A class of another library is named by its qualified name (``"transformers.pytorch_utils.Conv1D"``), so that
    the applier does not import that library.
    """
    RULES[module_type] = rule


def _registered(cls: type) -> type | str | None:
    """The key under which `cls` has a rule: the class itself or its qualified name."""
    if cls in RULES:
        return cls
    name = f"{cls.__module__}.{cls.__qualname__}"
    return name if name in RULES else None


def runs_own_forward(module: nn.Module) -> bool:
    """True when the module runs the `forward` of the class its rule was written for, not an override.

    Folding relies on how a layer uses its weight and bias, which only the plain forward guarantees.

    >>> class Scaled(nn.Conv2d):
    ...     def forward(self, x):
    ...         return 2 * super().forward(x)
    >>> runs_own_forward(nn.Conv2d(1, 1, 1)), runs_own_forward(Scaled(1, 1, 1))
    (True, False)
    """
    cls = next((c for c in type(module).__mro__ if _registered(c) is not None), None)
    return cls is not None and type(module).forward is cls.forward


def rule_for(module: nn.Module) -> Rule:
    """The rule of the nearest class in the module's MRO that has one; `GENERIC` otherwise.

    >>> type(rule_for(nn.Conv2d(3, 8, 3))).__name__, rule_for(nn.Conv2d(3, 8, 3)).input_axis
    ('ConvRule', -3)
    >>> rule_for(nn.ReLU()) is GENERIC
    True
    """
    for cls in type(module).__mro__:
        key = _registered(cls)
        if key is not None:
            return RULES[key]
    return GENERIC


for _dims, (_conv, _transposed) in enumerate(
    [(nn.Conv1d, nn.ConvTranspose1d), (nn.Conv2d, nn.ConvTranspose2d), (nn.Conv3d, nn.ConvTranspose3d)], start=1
):
    register(_conv, ConvRule(_dims))
    register(_transposed, ConvRule(_dims, transposed=True))
register(nn.Linear, LinearRule())
for _norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register(_norm, BatchNormRule())
register(nn.SyncBatchNorm, PerChannelNormRule())  # its forward is not the plain eval-mode batch norm
for _norm in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register(_norm, PerChannelNormRule())
register(nn.PReLU, PReLURule())
register(nn.Embedding, EmbeddingRule())
register(nn.EmbeddingBag, EmbeddingRule())
register(nn.MultiheadAttention, MultiheadAttentionRule())
register(nn.LayerNorm, LayerNormRule())
register(nn.RMSNorm, LayerNormRule())
register(nn.GroupNorm, GroupNormRule())
register("transformers.pytorch_utils.Conv1D", MatrixRule())
