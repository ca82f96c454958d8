"""The documentation holds together: its links resolve, its Python examples run, and the scripts that write
generated tables into docs pages (`make zoo`, `make bench`) rewrite only what lies between their markers.

Start with `test_relative_links_resolve`: it reads every markdown link and image in README.md and docs/*.md, outside
code, and checks that a relative target exists and that an `#anchor` names a heading of the target, slugged as
GitHub does (`github_slug`). `test_readme_python_tour_runs_in_order` runs the README's ```python blocks one after
another in one namespace, in an empty directory, as a new user would paste them; docs/python-api.md gets the same.
The digits study's table is checked in tests/test_examples.py, which runs the study.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


def without_code(text: str) -> str:
    """The text with fenced blocks and inline code removed: links and headings there are not links or headings."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup and punctuation dropped, lower case, spaces to hyphens.

    >>> github_slug("Run-to-run spread: resnet50, 30% random, batch 1")
    'run-to-run-spread-resnet50-30-random-batch-1'
    >>> github_slug("prunespec model as a `torch.export` program")
    'prunespec-model-as-a-torchexport-program'
    >>> github_slug("[Python API](python-api.md) and *more*")
    'python-api-and-more'
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = re.sub(r"[`*]|<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of `page`; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links of `page` whose file or heading does not exist, as 'target: why'."""
    problems = []
    for target in LINK.findall(without_code(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{target}: no heading #{anchor} in {file.name}")
    return problems


def test_the_docs_pages_exist_and_the_readme_links_each() -> None:
    readme = (REPO / "README.md").read_text()
    names = [p.name for p in PAGES[1:]]
    assert {"index.md", "cli.md", "python-api.md", "spec-format.md", "how-it-works.md", "coverage.md",
            "performance.md", "accuracy.md"} <= set(names)  # fmt: skip
    unlinked = [n for n in names if n != "index.md" and f"(docs/{n})" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"
    index = (REPO / "docs" / "index.md").read_text()
    assert [n for n in names if n != "index.md" and f"({n})" not in index] == []


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(REPO).as_posix() for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    assert LINK.findall(without_code(page.read_text())), f"{page.name} has no links at all"
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path) -> None:
    other = "# Other page\n\n## A section: with punctuation\n\n```sh\n# not a heading\n```\n"
    (tmp_path / "other.md").write_text(other)
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n"
        "[fine](other.md#a-section-with-punctuation) [also fine](#title) ![image](other.md) [web](https://x.org/y)\n"
        "[missing file](nowhere.md) [missing anchor](other.md#not-a-heading) [self](#nothing)\n"
        "`[in code](ignored.md)`\n\n```md\n[in a block](ignored.md)\n```\n"
    )
    assert broken_links(page) == [
        f"nowhere.md: no file {tmp_path / 'nowhere.md'}",
        "other.md#not-a-heading: no heading #not-a-heading in other.md",
        "#nothing: no heading #nothing in page.md",
    ]


def test_readme_gives_the_two_commands_for_a_fresh_machine() -> None:
    # The CI entry point (.ci/run) runs what the README says a newcomer should run.
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^make demo\b", readme, re.MULTILINE) and re.search(r"^make test\b", readme, re.MULTILINE)


def run_python_blocks(page: Path) -> dict:
    """Run the ```python blocks of `page` in order in one namespace, in the working directory; return it."""
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)
    assert blocks, f"{page.name} has no python blocks"
    torch.manual_seed(0)  # the example inputs are torch.randn
    namespace: dict = {"__name__": f"__{page.stem}__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.name}, python block {i + 1}", "exec"), namespace)
    return namespace


def size(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_readme_python_tour_runs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # the snippets write their files to the working directory
    namespace = run_python_blocks(REPO / "README.md")
    assert size(namespace["pruned"]) < size(namespace["model"])  # the copy was pruned, the model left whole
    assert size(namespace["fresh"]) == size(namespace["pruned"])
    assert {p.name for p in tmp_path.iterdir()} == {"resnet18.prunespec.json", "resnet18-pruned.safetensors"}
    printed = capsys.readouterr().out
    difference = float(re.search(r"max \|pruned - mock\| = (\S+)", printed)[1])
    assert difference < 1e-4  # float32 rounding of sums over a few thousand terms, not a pruning mistake


def test_python_api_examples_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = run_python_blocks(REPO / "docs" / "python-api.md")
    model, spec = namespace["model"], namespace["spec"]
    for pruned in ("pruned", "fresh", "folded", "fast", "net"):
        assert size(namespace[pruned]) < size(model), pruned
    target = namespace["chosen"].spec.summary  # the budget search: half the dense MACs, within 1%
    assert abs(target.macs_after / target.macs_before - 0.5) <= 0.01
    assert spec.norm_folds and not any(isinstance(m, torch.nn.BatchNorm2d) for m in namespace["folded"].modules())


# ---------------------------------------------------------------------------------------------- generated tables


def rewritten(page: Path, tmp_path: Path, write) -> tuple[str, str]:
    """Copy `page`, let `write(copy)` rewrite it, and return the text before and after."""
    copy = tmp_path / page.name
    shutil.copy(page, copy)
    before = copy.read_text()
    write(copy)
    return before, copy.read_text()


def outside(text: str, marker: str) -> tuple[str, str]:
    head, _, rest = text.partition(f"<!-- {marker}:start -->")
    return head, rest.partition(f"<!-- {marker}:end -->")[2]


def test_zoo_writes_its_table_into_the_coverage_page(tmp_path: Path) -> None:
    from scripts import zoo

    assert zoo.DOCS_PAGE == REPO / "docs" / "coverage.md"
    before, after = rewritten(zoo.DOCS_PAGE, tmp_path, lambda copy: zoo.write_docs("| new | table |", copy))
    assert "<!-- zoo:start -->\n| new | table |\n<!-- zoo:end -->" in after
    assert outside(after, "zoo") == outside(before, "zoo") and len(outside(before, "zoo")[0]) > 500  # the prose stays


@pytest.mark.parametrize("marker", ["bench", "bench-cuda", "bench-compile", "llm-latency", "llm-scale"])
def test_the_benchmark_report_writes_its_tables_into_the_performance_page(tmp_path: Path, marker: str) -> None:
    from benchmarks import report

    assert report.DOCS_PAGE == REPO / "docs" / "performance.md"
    before, after = rewritten(
        report.DOCS_PAGE, tmp_path, lambda copy: report.update_docs(copy, "### New tables\n", marker)
    )
    assert f"<!-- {marker}:start -->\n### New tables\n<!-- {marker}:end -->" in after
    assert outside(after, marker) == outside(before, marker) and len(outside(before, marker)[0]) > 500
