"""scripts/compare_runs.py: per-round ratios of two modes, pooled per set, and one-line
errors for input that is not a bench results.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts/compare_runs.py"


def results(path: Path, p50s: list[tuple[float, float]]) -> str:
    """A results.json with one echo c=1 round per (iptables p50, ebpf p50)."""
    records = [
        {"scenario": "echo", "label": "c=1", "round": i, "mode": mode, "p50_ms": p50,
         "rps": 1000 / p50}
        for i, pair in enumerate(p50s, 1)
        for mode, p50 in zip(("iptables", "ebpf"), pair, strict=True)
    ]  # fmt: skip
    path.write_text(json.dumps({"records": records}))
    return str(path)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_pools_rounds_per_set_and_compares_the_p50_ratio(tmp_path):
    before = results(tmp_path / "b.json", [(1.0, 0.9), (1.0, 0.9), (2.0, 1.8)])
    after = results(tmp_path / "a.json", [(1.0, 0.8), (0.5, 0.4), (1.0, 0.8)])
    p = run(f"before={before}", f"after={after}")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("before: 3 rounds, echo c=1, ebpf / iptables per round: p50 0.900")
    assert lines[1].startswith("after: 3 rounds, echo c=1, ebpf / iptables per round: p50 0.800")
    assert lines[2].startswith("after - before, median p50 ratio: -0.100 (95% bootstrap")


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    one = results(tmp_path / "one.json", [(1.0, 0.9)])
    for args, says in [
        (["nope"], "'nope': expected SET=RESULTS_JSON"),
        ([f"a={tmp_path / 'missing.json'}"], "not a readable `meshaccel bench` results.json"),
        ([f"a={tmp_path / 'x.json'}"], "not a readable `meshaccel bench` results.json"),
        ([f"a={one}"], "set(s) a: fewer than 2 rounds"),
    ]:
        p = run(*args)
        assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr
