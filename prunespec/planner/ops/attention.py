"""Attention: matrix products between activations, `scaled_dot_product_attention`, and `nn.MultiheadAttention`.

Start with `scaled_dot_product_attention`. Query, key and value arrive as ``[..., heads, tokens, head_dim]``, their
heads split from the projections' channels (see `splits`); attention mixes tokens and ``head_dim`` but keeps heads
apart, so query head ``i`` is tied to key and value head ``i`` (under grouped-query attention, to a copy of its
group's key/value head, see `graph.Repeat`), and the output carries the heads on. Each attention records a
`graph.Heads` for the module whose forward runs it. `matmul` does the same for attention written out as
``softmax(q @ k.transpose(-2, -1)) @ v``: axes that a matrix product batches over are tied like an addition's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prunespec.planner.graph import Binding, ChannelMap, Consumer, Heads, Macs, Producer, Repeat
from prunespec.planner.ops.base import arg, bind_bias, input_slots, label, opaque, rule, untrack
from prunespec.planner.ops.layers import matmul_weight
from prunespec.planner.ops.splits import decided_on

if TYPE_CHECKING:
    from prunespec.planner.trace import Tracer


@rule("matmul", "__matmul__", "__rmatmul__", "bmm")
def matmul(tr: Tracer, args, kwargs, out) -> None:
    """``a @ b``: the batch axes carry channels like an addition, ``a``'s rows and ``b``'s columns carry theirs
    to the output's rows and columns; channels on the axis summed over are mixed (kept), unless ``b`` is a
    ``[in, out]`` parameter, which makes the product a linear layer."""
    a, b = (args[1], args[0]) if tr.current_op == "__rmatmul__" else (args[0], args[1])
    if not isinstance(out, torch.Tensor) or a.ndim < 2 or b.ndim < 2:
        return opaque(tr, args, kwargs, out)
    weight = tr.name(b)
    if weight is not None and b.ndim == 2 and tr.channels(b) is None:
        return matmul_weight(tr, weight, None, a, out)
    nd = out.ndim
    carried: list[tuple[int, list[int]]] = []  # (output axis, slots)
    for t, summed, free in ((a, a.ndim - 1, a.ndim - 2), (b, b.ndim - 2, b.ndim - 1)):
        cmap = tr.channels(t)
        if cmap is None:
            continue
        if cmap.axis == summed:
            tr.slots.pin(cmap.slots, "is summed over in a matrix product with a tensor made in forward")
            continue
        target = nd - 2 + (t is b) if cmap.axis == free else cmap.axis + nd - t.ndim
        if out.shape[target] != t.shape[cmap.axis]:
            tr.slots.pin(cmap.slots, "is broadcast across channels")
            continue
        carried.append((target, cmap.slots))
    if not carried:
        return untrack(tr, out, a)
    if len({axis for axis, _ in carried}) > 1:
        return opaque(tr, args, kwargs, out, "is multiplied with channels on another axis")
    axis, slots = carried[0]
    for _, other in carried[1:]:
        tr.slots.union_all(slots, other)
    if axis < nd - 2:  # a batch axis: an unlabelled operand that does not broadcast over it cannot shrink
        for t in (a, b):
            t_axis = axis - (nd - t.ndim)
            if tr.channels(t) is None and t_axis >= 0 and t.shape[t_axis] != 1:
                tr.slots.pin(slots, "is multiplied with a fixed-size tensor made in forward")
        if len(carried) == 2:
            _record_heads(tr, slots, a.shape[-1])
    label(tr, out, axis, slots)


def _record_heads(tr: Tracer, query: list[int], head_dim: int) -> None:
    """Note the heads of an attention in the module that runs it (the key/value heads are found after tracing)."""
    module = tr.running_module()
    if module is not None and all(h.module != module for h in tr.graph.heads):
        tr.graph.heads.append(Heads(module, list(query), list(query), head_dim))


@rule("scaled_dot_product_attention")
def scaled_dot_product_attention(tr: Tracer, args, kwargs, out) -> None:
    """Heads of query, key and value tied one to one (or query heads to copies of their group's key/value head
    under ``enable_gqa``); the output has the query's heads and the value's channels.

    Inputs without heads (``[batch, tokens, channels]``): the output's channels are the value's, one to one; query
    and key channels are mixed into the scores and kept.
    """
    query, key, value = (arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = arg(args, kwargs, 3, "attn_mask")
    if query.ndim >= 4 and isinstance(out, torch.Tensor):
        axis = query.ndim - 3
        maps = [decided_on(tr, t, axis) for t in (query, key, value)]
        if all(m is not None for m in maps):
            return _heads(tr, maps, kwargs.get("enable_gqa", False), mask, out, query.shape[-1])
    for t in (query, key, value):
        if tr.split_map(t) is not None:
            tr.slots.pin(tr.split_map(t).slots, "is split into heads the planner cannot line up")
            tr.set(t, None)
    tr.pin_inputs((query, key), {}, "is a query or key of scaled_dot_product_attention")
    cmap = tr.channels(value)
    if cmap is None or cmap.axis != value.ndim - 1 or out.shape[-1] != value.shape[-1]:
        return opaque(tr, args, kwargs, out, "is a value of scaled_dot_product_attention")
    tr.set(out, ChannelMap(out.ndim - 1, cmap.slots))


def _heads(tr: Tracer, maps: list[ChannelMap], gqa: bool, mask, out: torch.Tensor, head_dim: int) -> None:
    q, k, v = maps
    heads, kv_heads = len(q.slots), len(k.slots)
    if len(v.slots) != kv_heads:
        for m in maps:
            tr.slots.pin(m.slots, "is attended to with key and value heads the planner cannot line up")
        return untrack(tr, out)
    if heads == kv_heads:
        tr.slots.union_all(q.slots, k.slots)
        tr.slots.union_all(q.slots, v.slots)
    elif gqa and heads % kv_heads == 0:
        group = heads // kv_heads
        copies = [q.slots[g * group : (g + 1) * group] for g in range(kv_heads)]
        tr.graph.repeats.append(Repeat(list(k.slots), copies))
        tr.graph.repeats.append(Repeat(list(v.slots), copies))
    else:
        for m in maps:
            tr.slots.pin(m.slots, "is attended to with a head count the planner cannot line up")
        return untrack(tr, out)
    axis = out.ndim - 3
    if isinstance(mask, torch.Tensor) and mask.ndim >= 3 and mask.shape[-3] != 1:
        mask_map = tr.channels(mask)
        if mask_map is not None and mask_map.axis == mask.ndim - 3 and len(mask_map.slots) == heads:
            tr.slots.union_all(q.slots, mask_map.slots)
        else:
            tr.slots.pin(q.slots, "is attended to with a per-head mask made in forward")
    _record_heads(tr, q.slots, head_dim)
    label(tr, out, axis, q.slots)


_MHA_ARGUMENTS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k", "bias_v",
    "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask", "need_weights",
    "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "static_k",
    "static_v", "average_attn_weights", "is_causal",
)  # fmt: skip


@rule("multi_head_attention_forward")
def multi_head_attention(tr: Tracer, args, kwargs, out) -> None:
    """`nn.MultiheadAttention`'s whole forward in one op: in-projection, heads, attention, out-projection.

    Each head is one slot: its ``head_dim`` rows in the query, key and value parts of the in-projection and its
    columns of the out-projection. The in-projection reads the inputs' channels (a consumer that cannot gather: it
    reads query, key and value through one weight); the out-projection makes new channels. The applier gives a
    module that loses heads a forward of its own (`applier.attention.PrunedMultiheadAttention`), since the stock
    one assumes the projections are as wide as the input.
    """
    a = {name: arg(args, kwargs, i, name) for i, name in enumerate(_MHA_ARGUMENTS)}
    y = out[0] if isinstance(out, (tuple, list)) else out
    out_name = tr.name(a["out_proj_weight"])
    if out_name is None or not isinstance(y, torch.Tensor):
        return opaque(tr, args, kwargs, out)
    separate = bool(a["use_separate_proj_weight"])
    projections = ("q_proj_weight", "k_proj_weight", "v_proj_weight") if separate else ("in_proj_weight",)
    in_names = [tr.name(a[p]) for p in projections]
    module = tr.running_module()
    why = None
    if a["bias_k"] is not None or a["add_zero_attn"] or a["static_k"] is not None or a["static_v"] is not None:
        why = "is attended to by multi-head attention with extra key/value entries, whose heads the planner keeps"
    elif None in in_names or module is None or not tr.is_multihead_attention(module):
        why = "is attended to by multi_head_attention_forward outside an nn.MultiheadAttention"
    elif isinstance(a["attn_mask"], torch.Tensor) and a["attn_mask"].ndim == 3:
        why = "is attended to with a mask per head"
    if why is not None and None in in_names:
        return _opaque_attention(tr, args, kwargs, out, out_name, y, why)
    query, key, value = a["query"], a["key"], a["value"]
    embed, heads = a["embed_dim_to_check"], a["num_heads"]
    head_dim = embed // heads
    tokens = y.numel() // y.shape[-1]
    no_gather = "reads query, key and value inside multi_head_attention_forward"
    units = tr.slots.new(heads, pin=why)
    rows = [h for h in units for _ in range(head_dim)]
    if separate:
        for name, t in zip(in_names, (query, key, value)):
            tr.graph.consumers.append(Consumer(name, 1, input_slots(tr, t, t.ndim - 1), no_gather=no_gather))
            tr.graph.producers.append(Producer(name, 0, rows))
            tr.graph.bindings.append(Binding(name, 0, rows))
            tr.graph.macs.append(Macs(name, t.numel() // t.shape[-1]))
            tr.calls[name] += 1
    else:
        reads = input_slots(tr, query, query.ndim - 1)
        for t in (key, value):
            if t is not query:  # one weight reads all three: their channels go together
                tr.slots.union_all(reads, input_slots(tr, t, t.ndim - 1))
        tr.graph.consumers.append(Consumer(in_names[0], 1, reads, no_gather=no_gather))
        tr.graph.producers.append(Producer(in_names[0], 0, rows * 3))
        tr.graph.bindings.append(Binding(in_names[0], 0, rows * 3))
        tr.graph.macs.append(Macs(in_names[0], tokens))
        tr.calls[in_names[0]] += 1
    bind_bias(tr, a["in_proj_bias"], rows * 3)
    reason = "reads the attention output inside multi_head_attention_forward"
    tr.graph.consumers.append(Consumer(out_name, 1, rows, no_gather=reason))
    made = tr.slots.new(y.shape[-1])
    tr.graph.producers.append(Producer(out_name, 0, made))
    tr.graph.bindings.append(Binding(out_name, 0, made))
    bind_bias(tr, a["out_proj_bias"], made)
    tr.graph.macs.append(Macs(out_name, tokens))
    tr.calls[out_name] += 1
    untrack(tr, out)
    weights = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
    if isinstance(weights, torch.Tensor) and weights.ndim >= 3 and not a["average_attn_weights"]:
        label(tr, weights, weights.ndim - 3, units)
    if module is not None and why is None:
        _record_heads(tr, units, head_dim)
    label(tr, y, y.ndim - 1, made)


def _opaque_attention(tr: Tracer, args, kwargs, out, out_name: str, y: torch.Tensor, why: str) -> None:
    """Attention the planner cannot see into: every input channel is kept; the out-projection still makes new
    channels."""
    tr.pin_inputs(args, kwargs, why)
    untrack(tr, out)
    tr.calls[out_name] += 1
    tr.graph.macs.append(Macs(out_name, y.numel() // y.shape[-1]))
    made = tr.slots.new(y.shape[-1])
    tr.graph.producers.append(Producer(out_name, 0, made))
    tr.graph.bindings.append(Binding(out_name, 0, made))
    bind_bias(tr, arg(args, kwargs, 12, "out_proj_bias"), made)
    label(tr, y, y.ndim - 1, made)
