"""The examples still run: `examples/digits.py --quick` trains, prunes in every mode, reports sane numbers, and
writes its table between the markers of (a copy of) docs/accuracy.md."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_digits_quick(tmp_path: Path) -> None:
    out = tmp_path / "digits.json"
    page = tmp_path / "accuracy.md"
    shutil.copy(REPO / "docs" / "accuracy.md", page)
    before = page.read_text()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "digits.py"), "--quick", "--out", str(out), "--docs", str(page)],
        check=False,  # the assertion below shows the example's stderr
        cwd=tmp_path,  # not the repository: the example must not need it as working directory, nor touch docs/
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())

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
    assert "| criterion | amount | mode | accuracy |" in result.stdout
    after = page.read_text()
    start, end = "<!-- digits:start -->", "<!-- digits:end -->"
    assert f"{start}\n{result.stdout.rstrip()}\n{end}" in after
    assert after.partition(start)[0] == before.partition(start)[0]
    assert after.partition(end)[2] == before.partition(end)[2]
