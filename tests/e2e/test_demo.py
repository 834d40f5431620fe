"""scripts/demo.sh, the README's main command, end to end on a shortened bench (1 round of
1 s per run): it exits 0, prints the tables and the targets, writes the report and the
plots, and leaves no lab behind. Own prefix, so it never touches a running lab."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.e2e.labcheck import assert_nothing_left

REPO = Path(__file__).resolve().parents[2]


def test_demo(prefix: str, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {
        **os.environ,
        "MESHACCEL_LAB_PREFIX": prefix,
        "MESHACCEL_DEMO_ROUNDS": "1",
        "MESHACCEL_DEMO_DURATION": "1",
    }
    p = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh"), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"lab {prefix!r} up: mode ebpf" in p.stdout  # the lab came up, then the bench ran
    assert "ebpf/iptables" in p.stdout and "performance targets (ebpf / iptables)" in p.stdout
    assert "round 1 ebpf      bookinfo 1000 rps" in p.stderr
    for name in ("results.json", "report.md", "latency.png", "rps.png", "cpu.png"):
        assert (out / name).stat().st_size > 500, name
    assert_nothing_left(prefix, [])
