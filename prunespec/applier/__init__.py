"""Apply a pruning spec to a model: check it, emulate it (`mock`), or prune in place (`prune`).

Reading order: `validate.check` (everything a spec must satisfy, and the changes it implies), `prune.prune` (assign
those changes), `mock.mock` (the same result computed by zeroing instead of removing), `rules` (one small rule per
module type, which is where a new layer type is taught), `fold` (batch norms folded into the layer before them,
for inference), `layout` (channels-last memory for inference on CPU, with costly gathers folded into weights),
`checkpoint` (safetensors files pruned tensor by tensor) and `folder` (Hugging Face model folders, pruned and loaded).
This package imports only torch, msgspec, the standard library, `prunespec.schemas` and `prunespec.errors`, never
the planner (`load_pruned` imports transformers when it is called).
"""

from prunespec.applier.fold import fold_norms
from prunespec.applier.folder import load_pruned, prune_folder
from prunespec.applier.layout import to_channels_last
from prunespec.applier.mock import MockPrunedModel, mock
from prunespec.applier.prune import InputSubselection, build_pruned, prune
from prunespec.applier.rules import GENERIC, RULES, Rule, register, rule_for
from prunespec.applier.validate import INDICES_BUFFER, LayerChange, check, describe, fingerprint

__all__ = [
    "GENERIC",
    "INDICES_BUFFER",
    "RULES",
    "InputSubselection",
    "LayerChange",
    "MockPrunedModel",
    "Rule",
    "build_pruned",
    "check",
    "describe",
    "fingerprint",
    "fold_norms",
    "load_pruned",
    "mock",
    "prune",
    "prune_folder",
    "register",
    "rule_for",
    "to_channels_last",
]
