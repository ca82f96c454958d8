"""The two exceptions prunespec raises on bad input.

`SpecError` means a pruning spec is unreadable or does not fit the model it is applied to; `PlanError` means a
planning request is wrong (an unknown parameter name, a channel out of range). Both subclass `ValueError` and carry a
one-line message that names the offending field or layer and says what would be right.

Messages and notes name an option with `option`, so that a Python caller reads `round_to=0` where the command line
(inside `naming_flags`) reads `--round-to 0`.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from collections.abc import Iterable, Iterator

_flags = contextvars.ContextVar("prunespec_naming_flags", default=False)


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


def option(name: str, value: object = None) -> str:
    """Option `name` (set to `value`) in the words of the caller: Python's parameter, or the command line's flag.

    >>> option("round_to", 0), option("scope", "global"), option("include_io", True), option("exclude")
    ('round_to=0', "scope='global'", 'include_io=True', 'exclude')
    >>> with naming_flags():
    ...     option("round_to", 0), option("scope", "global"), option("include_io", True), option("exclude")
    ('--round-to 0', '--scope global', '--include-io', '--exclude')
    """
    if not on_command_line():
        return name if value is None else f"{name}={value!r}"
    flag = "--" + name.replace("_", "-")
    return flag if value is None or value is True else f"{flag} {value}"


def on_command_line() -> bool:
    """Whether messages are for the command line (inside `naming_flags`)."""
    return _flags.get()


@contextlib.contextmanager
def naming_flags() -> Iterator[None]:
    """Within, `option` names options as the command line's flags: the CLI plans inside it."""
    token = _flags.set(True)
    try:
        yield
    finally:
        _flags.reset(token)
