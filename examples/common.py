"""What the example studies share: a line naming the machine they ran on, and the page section they rewrite.

The studies run as scripts (`python examples/digits.py`), which puts this folder first on the import path.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch


def machine() -> str:
    """The CPU model, its core count and torch's thread count, for the line above a generated table."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores (torch on {threads} thread{'s' if threads > 1 else ''})"


def docs_parts(page: Path, start: str, end: str) -> tuple[str, str]:
    """`page` before the `start` marker and after the `end` marker; exits with one line if either is missing.

    No fallback that appends a section: the prose around the markers explains the table, so a page without them
    would get numbers with no explanation.
    """
    head, found_start, rest = page.read_text().partition(start)
    _, found_end, tail = rest.partition(end)
    if not (found_start and found_end):
        raise SystemExit(f"error: {page} has no {start} ... {end} section to rewrite")
    return head, tail


def add_docs_option(parser: argparse.ArgumentParser, page: Path, markers: str) -> None:
    """`--docs [PAGE]`: rewrite the study's table between its `markers` markers of `page` (or of PAGE)."""
    parser.add_argument("--docs", nargs="?", const=page, type=Path, metavar="PAGE",
                        help=f"rewrite the table between the {markers} markers of {page.parent.name}/{page.name} "
                             "(or of PAGE)")  # fmt: skip


def command_line(script: str, argv: list[str] | None) -> str:
    """How the study was run, for the line above its table."""
    return f"python examples/{script}" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
