"""The two exceptions prunespec raises on bad input.

`SpecError` means a pruning spec is unreadable or does not fit the model it is applied to; `PlanError` means a
planning request is wrong (an unknown parameter name, a channel out of range). Both subclass `ValueError` and carry a
one-line message that names the offending field or layer and says what would be right.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpecError(ValueError):
    """A spec that cannot be read, or that does not fit the model; nothing was changed."""


class PlanError(ValueError):
    """A planning request that names unknown tensors or out-of-range channels."""


def nearest(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Format the valid choices closest to `word`, for an error message.

    >>> nearest("layer1.0.conv.weight", ["layer1.0.conv1.weight", "fc.weight"])
    "did you mean 'layer1.0.conv1.weight'?"
    """
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    shown = ", ".join(repr(c) for c in choices[:5])
    more = f" (and {len(choices) - 5} more)" if len(choices) > 5 else ""
    return f"valid names are {shown}{more}" if choices else "there is nothing valid to choose from"
