"""tests/conftest.py: `long` cases leave the default run, `-m long` runs them, and a CI
run over its time budget fails (checked on a copy of the conftest in a scratch suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
SUITE = """import pytest

@pytest.mark.long
def test_big():
    pass

def test_small():
    pass
"""


def run(tmp_path: Path, *args: str, budget: int | None = None, ci: bool = False) -> str:
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_scratch.py").write_text(SUITE)
    env = {"PATH": "/usr/bin:/bin", **({"CI": "true"} if ci else {})}
    if budget is not None:
        env["MESHACCEL_TEST_BUDGET_S"] = str(budget)
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    return f"rc={p.returncode} {p.stdout}"


def test_long_cases_are_left_out_of_the_default_run(tmp_path):
    out = run(tmp_path, "-v")
    assert "rc=0" in out and "1 passed, 1 deselected" in out, out
    assert "::test_small PASSED" in out, out


def test_dash_m_long_runs_them(tmp_path):
    out = run(tmp_path, "-v", "-m", "long")
    assert "rc=0" in out and "::test_big PASSED" in out and "1 deselected" in out, out


def test_a_ci_run_over_its_budget_fails(tmp_path):
    out = run(tmp_path, budget=-1, ci=True)
    assert out.startswith("rc=1") and "min budget: mark the largest cases long" in out, out
    assert run(tmp_path, budget=-1).startswith("rc=0")  # outside CI: no budget
    assert run(tmp_path, budget=0, ci=True).startswith("rc=0")  # 0: none (emulated VMs)
