"""Per-op channel rules: how each torch function moves, mixes or creates channels.

`RULES` maps an op's name (as `TorchFunctionMode` sees it: ``conv2d``, ``add_``, ``__getitem__``) to a rule
``rule(tracer, args, kwargs, out)`` that labels `out` with a `ChannelMap` and records producers, consumers and
bindings in the tracer's graph. The rules live in one module per kind of op, all registering into one table:

- `layers`: convolutions, linear layers, embeddings (start with `layers.mix`);
- `elementwise`: broadcasting arithmetic, activations, pooling, reductions;
- `norms`: batch, instance, layer, group and RMS norms;
- `shapes`: views, concatenation, splitting, indexing, axis moves;
- `splits`: channels split over several axes (heads, groups) and when to decide how they may shrink;
- `attention`: matrix products between activations, scaled dot-product and multi-head attention;
- `derived`: weights a module computes in forward from its own parameter (weight standardisation).

The one safety rule: a rule that cannot say exactly where every output channel comes from calls `opaque`, which
pins the slots of all inputs (they are kept) and leaves the output unlabelled. An unlabelled tensor is treated as
fixed-size wherever it meets labelled channels, so nothing downstream of it is pruned either.
"""

from prunespec.planner.ops import attention, elementwise, layers, norms, shapes  # noqa: F401  (they register)
from prunespec.planner.ops.base import ELEMENTWISE_OPS, RULES, SAME_SHAPE_OPS, opaque
from prunespec.planner.ops.derived import Derivation, derived_weight
from prunespec.planner.ops.splits import split_rule

# Ops that compute each entry of their output from the same entry of one tensor (and scalars).
ENTRYWISE = frozenset(ELEMENTWISE_OPS) | frozenset(SAME_SHAPE_OPS)

__all__ = ["ENTRYWISE", "RULES", "Derivation", "derived_weight", "opaque", "split_rule"]
