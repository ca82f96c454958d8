"""`nn.MultiheadAttention` with pruned heads: its rule, and the forward a pruned one runs.

Start with `MultiheadAttentionRule`. Pruning heads makes the in-projection ``num_heads * head_dim`` rows wide
instead of ``embed_dim``, which the stock forward (`F.multi_head_attention_forward`) does not allow: it takes the
projection width from the input. A module that loses heads therefore gets `PrunedMultiheadAttention` as its class,
whose forward computes the same attention with projections of any width. Parameters, buffers and state_dict keys
stay as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` whose projections are ``num_heads * head_dim`` wide, not ``embed_dim``.

    The forward takes the arguments of `nn.MultiheadAttention.forward` and returns what it returns. Attention
    masks are 2-D (``[target, source]``) or absent; a 3-D mask has one entry per original head and is refused.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # [tokens, channels], whatever batch_first says
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        target, batch, _ = query.shape
        source = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        width = heads * head_dim
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.split(width)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.split(width) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = (
            F.linear(t, w, b).view(length, batch, heads, head_dim).permute(1, 2, 0, 3)
            for t, w, b, length in zip((query, key, value), weights, biases, (target, source, source))
        )
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype, batch, target, source, is_causal)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
            if mask is not None:
                scores = scores + mask
            attention = scores.softmax(dim=-1)
            out = F.dropout(attention, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
            attention = None
        out = F.linear(out.permute(2, 0, 1, 3).reshape(target, batch, width), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if attention is not None:
            attention = attention.mean(dim=1) if average_attn_weights else attention
            attention = attention if batched else attention.squeeze(0)
        return out, attention


def _additive_mask(attn_mask, key_padding_mask, dtype, batch: int, target: int, source: int, is_causal: bool):
    """The attention and key padding masks as one float mask ``[batch or 1, 1, target, source]`` to add to the
    scores (True in a boolean mask means "may not attend", as in `nn.MultiheadAttention`); None without masks."""
    if is_causal and attn_mask is None:
        raise RuntimeError("is_causal needs attn_mask, as in nn.MultiheadAttention")
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() != 2:
            raise RuntimeError(
                f"attn_mask of shape {list(attn_mask.shape)}: after pruning heads only a 2-D [target, source] mask "
                "is accepted (a 3-D mask has one entry per original head)"
            )
        mask = _as_float(attn_mask, dtype).view(1, 1, target, source)
    if key_padding_mask is not None:
        padding = _as_float(key_padding_mask, dtype).view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


_PRUNED_CLASSES: dict[type, type] = {nn.MultiheadAttention: PrunedMultiheadAttention}


def pruned_class(cls: type) -> type:
    """The class a pruned module of class `cls` gets: `PrunedMultiheadAttention`, or for a subclass of
    `nn.MultiheadAttention` a subclass of both, so that its other methods stay."""
    if issubclass(cls, PrunedMultiheadAttention):
        return cls
    if cls not in _PRUNED_CLASSES:
        _PRUNED_CLASSES[cls] = type(f"Pruned{cls.__name__}", (PrunedMultiheadAttention, cls), {})
    return _PRUNED_CLASSES[cls]


def multihead_attention_problem(attributes: Mapping, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Whether the projections' shapes fit ``num_heads * head_dim`` and the input widths."""
    width = attributes["num_heads"] * attributes["head_dim"]
    if "in_proj_weight" in tensors:
        shape = tuple(tensors["in_proj_weight"].shape)
        if shape != (3 * width, attributes["embed_dim"]):
            return (
                f"tensor 'in_proj_weight' is {list(shape)} but num_heads={attributes['num_heads']} x "
                f"head_dim={attributes['head_dim']} needs [{3 * width}, embed_dim={attributes['embed_dim']}]"
            )
    else:
        for name, columns in (("q_proj_weight", "embed_dim"), ("k_proj_weight", "kdim"), ("v_proj_weight", "vdim")):
            shape = tuple(tensors[name].shape)
            if shape != (width, attributes[columns]):
                return f"tensor {name!r} is {list(shape)} but the heads need [{width}, {columns}={attributes[columns]}]"
    bias = tensors.get("in_proj_bias")
    if bias is not None and bias.shape[0] != 3 * width:
        return f"tensor 'in_proj_bias' has {bias.shape[0]} entries but the heads need {3 * width}"
    return None
