"""Tracing: run the model once and record how channels flow, as a `ChannelGraph`.

Start with `trace`. It runs `model(*inputs)` under a `TorchFunctionMode`, so every torch function and tensor method
the model calls passes through `Tracer.__torch_function__`. There the real op runs, and the rule registered for the
op's name in `ops.py` labels the output's channels with slots. An op without a rule is *opaque*: the slots of its
inputs are pinned and its output carries no channel information, so the planner keeps whatever it cannot follow.

Parameters are recognised by identity (`id(tensor)` against `model.named_parameters()`); ids never leave this
module — the graph speaks in parameter names.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from itertools import chain

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from prunespec.applier.rules import rule_for, runs_own_forward
from prunespec.applier.swap import call_with
from prunespec.errors import PlanError, on_command_line
from prunespec.planner import ops
from prunespec.planner.graph import Binding, ChannelGraph, ChannelMap, Fold, Renorm, SplitMap
from prunespec.planner.meta import made_output

OUTPUT = "reaches the model output"
UNLABELLED = "comes from a model input or a tensor made in forward"

# The arguments besides tensors that `_signature` compares by value (and type: True, 1 and 1.0 differ); bool is an int.
PLAIN = (int, float, str, type(None), type(Ellipsis), torch.dtype, torch.device, torch.layout, torch.memory_format)

# Ops whose output shows a parameter's entries, moved or broadcast: see `Tracer.tensor_of`.
VIEWS = {
    "expand", "expand_as", "broadcast_to", "unsqueeze", "squeeze", "permute", "transpose", "view", "reshape", "to",
    "view_as", "reshape_as",
    "type_as", "contiguous", "clone", "float", "double", "half", "bfloat16",
}  # fmt: skip

# What `Tracer.note_values` looks at, to tell a residual block from the data flow.
ADDITIONS = {"add", "add_", "__add__", "__radd__", "__iadd__"}
NONNEGATIVE_KEEPING = {"max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "adaptive_avg_pool2d",
                       "avg_pool2d", "contiguous", "clone", "dropout", "__getitem__"}  # fmt: skip
VALUE_OPS = ADDITIONS | NONNEGATIVE_KEEPING | {"relu", "relu_"}

# Reading these tells nothing about a tensor's values, so it does not count as a reader of a layer's output.
METADATA = {"shape", "dtype", "device", "ndim", "is_meta", "layout", "requires_grad", "size", "dim", "numel"}


class Tracer(TorchFunctionMode):
    """Labels every tensor the model computes with a `ChannelMap`, and fills a `ChannelGraph`."""

    def __init__(
        self, model: torch.nn.Module, twins: dict[str, torch.Tensor] | None = None, through_norms: bool = False
    ) -> None:
        """`twins`: the tensors the model runs with instead of its own, by name (see `_meta_twins`).
        `through_norms`: follow channels through norms over channels (see `couple`)."""
        super().__init__()
        self.graph = ChannelGraph()
        self.slots = self.graph.slots
        self.meta = bool(twins)
        # id of a parameter or buffer the model runs with -> its names (several for a tensor modules share)
        self.names: dict[int, list[str]] = {}
        named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
        self.tensors: dict[str, torch.Tensor] = dict(twins.items() if twins else named)  # name -> what runs
        for name, t in self.tensors.items():
            self.names.setdefault(id(t), []).append(name)
        self.graph.aliases = {n: names[0] for names in self.names.values() if len(names) > 1 for n in names}
        self.current_op = ""  # the name of the op whose rule is running
        self.op_counts: Counter[str] = Counter()  # calls so far per op name, to find an op again in another run
        self.calls: Counter[str] = Counter()  # weight name -> number of calls
        # id -> (tensor, map); holding the tensor keeps its id from being reused during the trace
        self._maps: dict[int, tuple[torch.Tensor, ChannelMap]] = {}
        self._why: dict[int, tuple[torch.Tensor, str]] = {}
        self._split: dict[int, tuple[torch.Tensor, SplitMap]] = {}  # tensors whose channels span several axes
        # id of a split's slot list -> (the list, (sizes, unit dimension), one slot per unit): see `ops.splits`
        self.decisions: dict[int, tuple[list[int], tuple, list[int]]] = {}
        self._joined: dict[int, tuple[torch.Tensor, list[tuple[str, int]]]] = {}  # see `join_tensors`
        self._views: dict[int, tuple[torch.Tensor, tuple]] = {}  # see `tensor_of`
        self._derivations: dict[int, tuple[torch.Tensor, ops.Derivation]] = {}  # see `ops.derived`
        # For `_why_not_a_block`: id -> (sum, its operands), (ReLU output, its input), non-negative tensor.
        self._sums: dict[int, tuple[torch.Tensor, tuple]] = {}
        self._relus: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._nonneg: dict[int, torch.Tensor] = {}
        self._relued: set[int] = set()  # tensors a ReLU changed in place
        # The modules whose forward is running, innermost last, with the tensor each was called with.
        self.modules = dict(model.named_modules())
        self._module_names = {id(m): name for name, m in self.modules.items()}
        self._running: list[list] = []  # [name, input, layers recorded before it began, couplings]
        self.through_norms = through_norms
        self._made: dict[tuple, tuple] = {}  # meta call signature -> (shape, stride, dtype) of the new tensor
        # For folding batch norms: id -> [output, layer] of each output a layer computed in its own forward, how
        # often each such output is read, the (norm, output id) pairs where a batch norm read one, and how often
        # each batch norm module ran.
        self._outputs: dict[int, list] = {}
        self._reads: Counter[int] = Counter()
        self._norm_reads: list[tuple[str, int]] = []
        self._norm_calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.current_op = getattr(func, "__name__", "")
        if self.current_op == "__get__":  # a property (x.T, x.mT, x.real): name it, not its getter
            self.current_op = getattr(getattr(func, "__self__", None), "__name__", "__get__")
        if self.meta:
            out = made_output(self.current_op, args, kwargs)
            if out is None:
                out = self._call_meta(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        self.op_counts[self.current_op] += 1
        leaves = _arguments(args, kwargs) if self._outputs or self._split else ()
        if self._outputs:
            self._count_reads(func, leaves)
        # Most models split no channels over two axes: then there is no split map to look for among the arguments.
        split = [t for t in leaves if self.split_map(t) is not None] if self._split else []
        if split:
            ops.split_rule(self, split, args, kwargs, out)
        else:
            ops.RULES.get(self.current_op, ops.opaque)(self, args, kwargs, out)
        if self.current_op in VALUE_OPS:
            self.note_values(args, out)
        if (
            (self.current_op in VIEWS or self.current_op in ops.ENTRYWISE)
            and args
            and isinstance(out, torch.Tensor)
            and self.channels(out) is None
        ):
            self._note_view(args, kwargs, out)
        return out

    def _note_view(self, args, kwargs, out: torch.Tensor) -> None:
        """Remember that `out` is a view of a parameter or buffer (``cls_token.expand(B, -1, -1)``), axis by axis."""
        from prunespec.planner.ops.shapes import moved_axes, reshaped

        operands = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        x = next((t for t in operands if self.tensor_of(t) is not None), None)
        if x is None or x is not args[0] and self.current_op in VIEWS:
            return
        if self.current_op in ops.ENTRYWISE:  # `1 + weight`, `weight.exp()`: a function of each entry
            if out.shape != x.shape or any(t is not x and t.numel() != 1 for t in operands):
                return
        name, axes = self.tensor_of(x)
        mapped = [a for a, p in enumerate(axes) if p is not None]
        if self.current_op in ("view", "reshape", "view_as", "reshape_as"):
            found = [reshaped(x.shape, out.shape, a) for a in mapped]
            landing = [b[0] if kind == "moves" else None for kind, b in found]
        elif out.shape == x.shape and self.current_op not in ("permute", "transpose"):
            landing = mapped
        else:
            landing = [moved_axes(self.current_op, x, [a], args, kwargs, out) for a in mapped]
            landing = [b[0] if b is not None else None for b in landing]
        out_axes: list[int | None] = [None] * out.ndim
        for a, b in zip(mapped, landing):
            if b is not None:
                out_axes[b] = axes[a]
        if any(p is not None for p in out_axes):
            self._views[id(out)] = (out, (name, out_axes))
            # Only views carry a derivation on: an entrywise f with f(0) != 0 breaks what `ops.derived` relies on.
            derivation = self.derivation(x) if self.current_op in VIEWS else None
            if derivation is not None:
                self._derivations[id(out)] = (out, derivation)

    def note_derived(self, out: torch.Tensor, name: str, axes: list[int | None], derivation: ops.Derivation) -> None:
        """Note that `out` shows parameter `name` along `axes`, computed as `derivation` says (see `ops.derived`)."""
        self._views[id(out)] = (out, (name, axes))
        self._derivations[id(out)] = (out, derivation)

    def derivation(self, t) -> ops.Derivation | None:
        entry = self._derivations.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def tensor_of(self, t) -> tuple[str, list[int | None]] | None:
        """The model tensor `t` is, or a view of, with the tensor's axis behind each of `t`'s (None: a new axis)."""
        name = self.name(t)
        if name is not None:
            return name, list(range(t.ndim))
        entry = self._views.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def _call_meta(self, func, args: tuple, kwargs: dict):
        """`func(*args, **kwargs)` in a meta run, made directly when the same call made a new tensor before.

        A meta output depends only on the call: the op, the shapes, strides and dtypes of its tensors and its other
        arguments. Models repeat calls (every block of a stage, every layer of a transformer), and many meta kernels
        are Python decompositions costing a tenth of a millisecond to one. This is for the calls that
        `meta.made_output` cannot make from their arguments alone. Only calls that returned a new tensor are
        remembered: not an input (an in-place op), not a view of one, not a tuple, not a tensor with data.
        """
        arguments = _signature((args, kwargs))
        key = (func, arguments) if arguments is not None else None
        made = self._made.get(key) if key is not None else None
        if made is not None:
            shape, stride, dtype = made
            return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        out = func(*args, **kwargs)
        if (
            key is not None
            and isinstance(out, torch.Tensor)
            and out.is_meta
            and out._base is None
            and out.storage_offset() == 0
            and all(out is not t for t in tree_leaves((args, kwargs)))
        ):
            self._made[key] = (out.shape, out.stride(), out.dtype)
        return out

    # ------------------------------------------------------------------ what rules use

    def channels(self, t) -> ChannelMap | None:
        entry = self._maps.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def split_map(self, t) -> SplitMap | None:
        entry = self._split.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def set_split(self, t: torch.Tensor, smap: SplitMap) -> None:
        self._maps.pop(id(t), None)
        self._split[id(t)] = (t, smap)

    def set(self, t: torch.Tensor, cmap: ChannelMap | None, why: str | None = None) -> None:
        """Label `t`; with no map, `why` says what made it unfollowable (for the notes on kept channels)."""
        self._split.pop(id(t), None)
        if cmap is None:
            self._maps.pop(id(t), None)
            if why is not None:
                self._why[id(t)] = (t, why)
        else:
            self._maps[id(t)] = (t, cmap)

    def why_unlabelled(self, t: torch.Tensor) -> str:
        entry = self._why.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1]
        return UNLABELLED

    def why_no_gather(self, weight: str, x: torch.Tensor) -> str | None:
        """Why a consumer of `weight` reading `x` could not gather its input, or None if it can.

        The applier gathers in a forward pre-hook of the module that owns the weight, so the op must run directly
        inside that module's forward, on the tensor the module was called with.
        """
        owner = weight.rpartition(".")[0]
        if not self._running or self._running[-1][0] != owner:
            return f"{weight} is used outside the forward of its module"
        if self._running[-1][1] is not x:
            return f"{weight} reads a tensor its module computes in forward, not the module's input"
        return None

    def made_by_layer(self, weight: str, bias, out: torch.Tensor) -> None:
        """Note that the layer owning `weight` computed `out` in its own forward, with its own bias (or none)."""
        layer = weight.rpartition(".")[0]
        if self._running and self._running[-1][0] == layer and (bias is None or self.name(bias) == f"{layer}.bias"):
            self._outputs[id(out)] = [out, layer]

    def normalised(self, x: torch.Tensor, running_mean) -> None:
        """Note a batch norm reading `x`, if it runs in the forward of the module that owns `running_mean`."""
        norm = self._running[-1][0] if self._running else None
        if norm is None or self.name(running_mean) != f"{norm}.running_mean":
            return
        self._norm_calls[norm] += 1
        entry = self._outputs.get(id(x))
        if entry is not None and entry[0] is x:
            self._norm_reads.append((norm, id(x)))

    def _count_reads(self, func, leaves) -> None:
        if self.current_op in METADATA:
            return
        for t in leaves:
            entry = self._outputs.get(id(t)) if isinstance(t, torch.Tensor) else None
            if entry is not None and entry[0] is t:
                self._reads[id(t)] += 1

    def folds(self, out) -> list[Fold]:
        """The batch norms that read a layer's output, where nothing else reads it and both are called once.

        Both modules must run their class's own forward (`runs_own_forward`), so that folding the norm's scale and
        shift into the layer's weight and bias changes nothing else.
        """
        returned = {id(t) for t in tree_leaves(out)}
        modules = self.modules
        found = []
        for norm, output in self._norm_reads:
            layer = self._outputs[output][1]
            if (
                self._reads[output] == 1
                and output not in returned
                and self._norm_calls[norm] == 1
                and self.calls[f"{layer}.weight"] == 1
                and all(runs_own_forward(modules[m]) for m in (norm, layer))
                and rule_for(modules[layer]).absorbs
                and rule_for(modules[norm]).folds
            ):
                found.append(Fold(norm, layer))
        return found

    def couple(self, slots: list[int], why: str) -> None:
        """Channels `slots` are mixed by a statistic over them (a mean, a norm): removing one changes the others.

        Without `through_norms` they are kept. With it, the module running the op may be a *norm* that the pruned
        model runs on its kept channels (and the mock emulates, see `applier.mock`): `leave` decides.
        """
        if not self.through_norms or not self._running or self._running[-1][0] is None:
            return self.slots.pin(slots, why)
        self._running[-1][3].append((slots, why))

    def enter(self, module, args) -> None:
        records = len(self.graph.producers) + len(self.graph.consumers)
        self._running.append([self._module_names.get(id(module)), args[0] if args else None, records, []])

    def leave(self, module, args, out) -> None:
        name, x, records, couplings = self._running.pop()
        if couplings:
            self._renormalises(name, x, out, records, couplings)
        if name and name not in self.graph.blocks:  # the first call decides; a second one makes it ambiguous
            self.graph.blocks[name] = self._why_not_a_block(x, out)
        elif name:
            self.graph.blocks[name] = "it runs more than once"

    def _why_not_a_block(self, x, out) -> str | None:
        """None when the module's output is its input plus branches (``x + f(x)``, also through several additions
        and through a ReLU of a non-negative input), which dropping the module leaves as the input; else why not."""
        y = out
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            return "its first input or its output is not a tensor"
        if y.shape != x.shape:
            return f"its output ({list(y.shape)}) is not shaped like its input ({list(x.shape)})"
        if y is x:
            return "its output is its input: there is no branch to drop"
        return None if self._adds_up_to(y, x) else "its output is not its input plus a branch"

    def _adds_up_to(self, t: torch.Tensor, x: torch.Tensor, depth: int = 0) -> bool:
        """Whether `t` is `x` plus branches (see `_why_not_a_block`). An addition in place (``out += x``) leaves
        one tensor for its result and an operand; the depth bound ends that loop."""
        if t is x:
            return True
        if depth > 64 or (id(t) in self._relued and not self._nonnegative(x)):
            return False
        entry = self._sums.get(id(t))
        if entry is not None and entry[0] is t:
            return any(isinstance(o, torch.Tensor) and self._adds_up_to(o, x, depth + 1) for o in entry[1])
        entry = self._relus.get(id(t))
        if entry is not None and entry[0] is t and self._nonnegative(x):
            return self._adds_up_to(entry[1], x, depth + 1)
        return False

    def _nonnegative(self, t: torch.Tensor) -> bool:
        entry = self._nonneg.get(id(t))
        return entry is not None and entry is t

    def note_values(self, args, out) -> None:
        """Keep what `_why_not_a_block` needs: the operands of additions, ReLUs, and which tensors are >= 0."""
        op = self.current_op
        if not isinstance(out, torch.Tensor):
            return
        x = args[0] if args else None
        if op in ADDITIONS and len(args) == 2 and op.rstrip("_") not in ("sub", "__sub", "__isub", "__rsub"):
            self._sums[id(out)] = (out, args)
        elif op in ("relu", "relu_"):
            if out is x:  # in place: the tensor now holds relu of what it held
                self._relued.add(id(out))
            else:
                self._relus[id(out)] = (out, x)
            self._nonneg[id(out)] = out
        elif op in NONNEGATIVE_KEEPING and isinstance(x, torch.Tensor) and self._nonnegative(x):
            self._nonneg[id(out)] = out

    def _renormalises(self, name: str, x, out, records: int, couplings: list) -> None:
        """A module whose forward couples its channels is a norm the pruned model runs on fewer channels when it
        holds no layers, and its input and output carry the same channels; else the coupled channels are kept."""
        y = next(iter(tree_leaves(out)), None)
        cmap_in, cmap_out = self.channels(x), self.channels(y)
        root = self.slots.find
        ok = (
            records == len(self.graph.producers) + len(self.graph.consumers)
            and cmap_in is not None
            and cmap_out is not None
            and [root(s) for s in cmap_in.slots] == [root(s) for s in cmap_out.slots]
        )
        if ok:
            inside = {root(s) for s in cmap_in.slots}
            ok = all(root(s) in inside for slots, _ in couplings for s in slots)
        if not ok:
            where = f"in {name}" if name else "in the model's own forward"
            for slots, why in couplings:
                self.slots.pin(slots, f"{why} {where}, which the planner cannot run on fewer channels")
            return
        self.graph.renorms.append(Renorm(name, cmap_in.axis - x.ndim, cmap_out.axis - y.ndim, cmap_in.slots))

    def is_multihead_attention(self, name: str) -> bool:
        return isinstance(self.modules.get(name), torch.nn.MultiheadAttention)

    def join_tensors(self, t: torch.Tensor, parts: list[tuple[str, int]]) -> None:
        """Note that `t` is the model's tensors `parts` (name, length) laid end to end along axis 0."""
        self._joined[id(t)] = (t, parts)

    def joined_tensors(self, t) -> list[tuple[str, int]] | None:
        entry = self._joined.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def running_module(self) -> str | None:
        """The name of the innermost module whose forward is running."""
        return self._running[-1][0] if self._running else None

    def name(self, t) -> str | None:
        """The name of a parameter or buffer of the model; of a shared one, the name under the running module."""
        names = self.names.get(id(t)) if isinstance(t, torch.Tensor) else None
        if not names:
            return None
        if len(names) > 1 and self._running:
            prefix = f"{self._running[-1][0]}."
            return next((n for n in names if n.startswith(prefix) and "." not in n[len(prefix) :]), names[0])
        return names[0]

    def pin_inputs(self, args, kwargs, reason: str) -> None:
        for t in tree_leaves((args, kwargs)):
            cmap = self.channels(t)
            if cmap is not None:
                self.slots.pin(cmap.slots, reason)


# How `trace` runs the model, cheapest first; each is tried when the one before it fails.
#   meta: activations and a shape-only twin of every parameter and buffer live on the `meta` device, so no op
#         computes anything; a forward that looks at values, or mixes in tensors it makes on another device, fails;
#   fake: `FakeTensorMode` (shapes only, but slower), which also accepts real tensors made in forward;
#   real: the model as it is, on the inputs as given.
RUNS = ("meta", "fake", "real")


def trace(
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    fake: bool = True,
    through_norms: bool = False,
    bypass: Sequence[str] = (),
) -> ChannelGraph:
    """Run `model(*inputs)` in eval mode without gradients and return its channel graph.

    With `fake`, activations carry shapes and dtypes but no data (see `RUNS`), so tracing costs the same at any
    input resolution or batch size; a model whose forward looks at values falls back to a real run. The model's
    train/eval modes are restored afterwards; nothing else about it changes. The modules named in `bypass` (blocks
    to drop) return their input instead of running.

    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    >>> graph = trace(net, [torch.rand(1, 3, 5, 5)])
    >>> [p.weight for p in graph.producers], [c.weight for c in graph.consumers]
    (['0.weight', '2.weight'], ['0.weight', '2.weight'])
    >>> graph.slots.pinned(graph.producers[1].slots[0])  # the last layer writes the output
    'reaches the model output'
    """
    if fake:
        for run in RUNS[:-1]:
            try:
                return _trace(model, inputs, run, through_norms, bypass)
            except Exception:  # data-dependent control flow, mixed devices, ops without a meta kernel, ...
                pass
    try:
        return _trace(model, inputs, "real", through_norms, bypass)
    except _RunFailed as failed:
        raise PlanError(does_not_run(model, inputs, failed.layer, failed.error)) from failed.error


class _RunFailed(Exception):
    """The model's forward raised `error` while layer `layer` ran (the innermost module; "" for the model's own
    code, None when no module was running)."""

    def __init__(self, layer: str | None, error: Exception) -> None:
        super().__init__(layer, error)
        self.layer, self.error = layer, error


def does_not_run(model: torch.nn.Module, inputs: Sequence[torch.Tensor], layer: str | None, error: Exception) -> str:
    """The one-line message for a model whose forward fails on the example inputs: their shapes, the layer that
    failed with torch's own words, and the inputs that layer takes.

    >>> conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    >>> print(does_not_run(conv, [torch.empty(1, 3, 64)], "0", RuntimeError("Expected 3D or 4D input")))
    the model cannot run on example inputs of shape [1, 3, 64]: layer '0' (Conv2d) fails: RuntimeError: Expected \
3D or 4D input; a Conv2d takes inputs of rank 4, NxCxHxW with C = 3
    """
    shapes = [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
    if on_command_line():
        given = " ".join(f"--input-shape {'x'.join(map(str, s))}" for s in shapes)
    else:
        given = f"example inputs of shape {' and '.join(map(str, shapes))}"
    text = str(error).strip()
    why = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    if layer:
        module = model.get_submodule(layer)
        where = f"layer {layer!r} ({type(module).__name__}) fails"
        takes = _takes(module)
        takes = f"; a {type(module).__name__} takes {takes}" if takes else ""
    else:
        where, takes = "its forward fails", ""
    return f"the model cannot run on {given}: {where}: {why}{takes}"


def _takes(module: torch.nn.Module) -> str | None:
    """The inputs a layer reads, for `does_not_run`: a convolution's or batch norm's layout, a linear layer's width."""
    axes = {1: "L", 2: "HxW", 3: "DxHxW"}
    if isinstance(module, torch.nn.modules.conv._ConvNd) and len(module.kernel_size) in axes:
        spatial = len(module.kernel_size)
        return f"inputs of rank {spatial + 2}, NxCx{axes[spatial]} with C = {module.in_channels}"
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, torch.nn.BatchNorm1d):
        spatial = {torch.nn.BatchNorm2d: 2, torch.nn.BatchNorm3d: 3}.get(type(module))
        if spatial:
            return f"inputs of rank {spatial + 2}, NxCx{axes[spatial]} with C = {module.num_features}"
    if isinstance(module, torch.nn.Linear):
        return f"inputs whose last axis has {module.in_features} features"
    return None


def _trace(
    model: torch.nn.Module, inputs: Sequence[torch.Tensor], run: str, through_norms: bool, bypass: Sequence[str]
) -> ChannelGraph:
    twins = _meta_twins(model) if run == "meta" else {}
    tracer = Tracer(model, twins, through_norms)
    modes = {m: m.training for m in tracer.modules.values()}
    bypassed = [tracer.modules[name] for name in bypass]
    for module in bypassed:
        module.forward = _passes_input
    # Global hooks, not hooks on the model: they see every module's forward and leave the model untouched.
    hooks = [register_module_forward_pre_hook(tracer.enter), register_module_forward_hook(tracer.leave)]
    # Under the fake mode parameters stay real (their identity names them); it converts them on the fly.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if run == "fake" else contextlib.nullcontext()
    try:
        model.eval()
        with torch.no_grad(), fake_mode:
            args = [_shape_only(x, run, fake_mode, model) for x in inputs]
            with tracer:
                try:
                    if twins:
                        out = call_with(model, twins, tuple(args))  # once per module slot: see `swap`
                    else:
                        out = model(*args)
                except Exception as e:  # whatever the model's own forward raises
                    running = [entry[0] for entry in tracer._running if entry[0] is not None]
                    raise _RunFailed(running[-1] if running else None, e) from e
    finally:
        for handle in hooks:
            handle.remove()
        for m, training in modes.items():
            m.training = training
        for module in bypassed:
            del module.forward
    for t in tree_leaves(out):
        cmap = tracer.channels(t)
        if cmap is not None:
            tracer.slots.pin(cmap.slots, OUTPUT)
    tracer.graph.folds = tracer.folds(out)
    _pin_shared_weights(tracer.graph, tracer.calls)
    _tie_shared_axes(tracer.graph)
    _link_key_value_heads(tracer.graph)
    return tracer.graph


def _passes_input(x, *args, **kwargs):
    """The forward of a block that is bypassed: its input goes on."""
    return x


def _arguments(args: tuple, kwargs: dict) -> list:
    """An op's arguments, flattened: the plain list when none is a container, which is most calls and cheaper than
    `tree_leaves`.

    >>> _arguments((1, [2, (3,)]), {"dim": 0}), _arguments((1, 2), {})
    ([1, 2, 3, 0], [1, 2])
    """
    flat = [*args, *kwargs.values()]
    if any(isinstance(a, (list, tuple, dict)) for a in flat):
        return tree_leaves(flat)
    return flat


def _signature(value) -> tuple | None:
    """What a meta call's output can depend on in its arguments `value`, as a hashable tuple.

    None when `value` holds anything but tensors, plain values (`PLAIN`, compared by value and type) and tuples,
    lists and dicts of them.

    >>> a, b = torch.empty(2, 3, device="meta"), torch.empty(2, 3, device="meta")
    >>> _signature(((a, 1), {})) == _signature(((b, 1), {}))
    True
    >>> _signature(((a, 1), {})) == _signature(((a, 1.0), {}))  # an int and a float promote differently
    False
    >>> _signature(((a.t(), 1), {})) == _signature(((a, 1), {}))
    False
    >>> _signature(((a, object()), {})) is None
    True
    """
    if isinstance(value, torch.Tensor):
        return (type(value), value.device, value.dtype, tuple(value.shape), value.stride(), value.storage_offset())
    if isinstance(value, (tuple, list)):
        parts = tuple(_signature(v) for v in value)
        return None if None in parts else (type(value), parts)
    if isinstance(value, dict):
        parts = tuple((k, _signature(v)) for k, v in value.items())
        return None if any(not isinstance(k, str) or p is None for k, p in parts) else (dict, parts)
    if isinstance(value, PLAIN):
        return (type(value), value)
    return None


def _meta_twins(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A meta tensor for every parameter and buffer name; names of one shared tensor share one twin."""
    twins: dict[int, torch.Tensor] = {}
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    return {name: twins.setdefault(id(t), t.detach().to("meta")) for name, t in named}


def _shape_only(x, run: str, fake_mode, model: torch.nn.Module):
    """`x` as the given run needs it: a meta or fake twin, or `x` itself for a real run."""
    if not isinstance(x, torch.Tensor) or run == "real":
        return x
    if run == "meta":
        return x.to("meta")
    if x.device.type != "meta":
        return fake_mode.from_tensor(x)
    # A meta input (shape only) becomes fake on the device of the model's parameters.
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with fake_mode:
        return torch.empty(x.shape, dtype=x.dtype, device=device)


def _tie_shared_axes(graph: ChannelGraph) -> None:
    """One axis of one tensor keeps one set of indices: tie the slots of every record that labels it.

    A tied input and output embedding is one tensor, whose columns the embedding makes and the output layer reads.
    """
    seen: dict[tuple[str, int], list[int]] = {}
    for record in [*graph.bindings, *graph.consumers]:
        name = record.tensor if isinstance(record, Binding) else record.weight
        slots = seen.setdefault((graph.aliases.get(name, name), record.axis), record.slots)
        if slots is not record.slots:
            if len(slots) == len(record.slots):
                graph.slots.union_all(slots, record.slots)
            else:
                graph.slots.pin([*slots, *record.slots], "belongs to a tensor read along one axis in two ways")


def _link_key_value_heads(graph: ChannelGraph) -> None:
    """Each attention's key/value heads: the sources of the repeats whose copies are its query heads."""
    find = graph.slots.find  # a few slots per attention: cheaper than the whole `roots_table`
    source_of: dict[int, tuple[int, int]] = {}  # root of a copy -> (repeat number, source index)
    for n, repeat in enumerate(graph.repeats):
        for i, copies in enumerate(repeat.copies):
            for c in copies:
                source_of.setdefault(find(c), (n, i))
    for heads in graph.heads:
        found = [source_of.get(find(q)) for q in heads.query]
        if found and all(f is not None and f[0] == found[0][0] for f in found):
            repeat = graph.repeats[found[0][0]]
            heads.key_value = [repeat.sources[i] for i in dict.fromkeys(f[1] for f in found)]


def _pin_shared_weights(graph: ChannelGraph, calls: Counter) -> None:
    """A module called more than once must prune the same way for every call; keep all its channels."""
    for record in [*graph.consumers, *graph.producers]:
        if calls[record.weight] > 1:
            reason = f"{record.weight} is used {calls[record.weight]} times in forward"
            graph.slots.pin(record.slots, reason)
            if hasattr(record, "fixed"):
                record.fixed = reason
