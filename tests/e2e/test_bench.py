"""`meshaccel bench` through the real command: a short run (1 round, 2 s, 1 connection, all
three modes, 1 node) gives well-formed records with no errors and no non-2xx in every mode,
the ebpf records show bytes on the sk_msg path, and nothing of the lab is left afterwards.
Own prefix (MESHACCEL_LAB_PREFIX=ma-tbench<pid>-), so it never touches a running lab."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshaccel import bench
from tests.e2e.labcheck import assert_nothing_left

MESHACCEL = str(Path(sys.prefix) / "bin" / "meshaccel")
MODES = ("nomesh", "iptables", "ebpf")


def test_parse_wrk() -> None:
    out = """Running 2s test @ http://10.244.1.11:9080/
  1 threads and 1 connections
  Latency Distribution
     50%  333.00us
     75%  350.00us
     90%    1.20ms
     99%    2.10s
  5975 requests in 2.00s, 1.39MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:   2987.90
"""
    w = bench.parse_wrk(out)
    assert w["p50_ms"] == pytest.approx(0.333)
    assert w["p90_ms"] == pytest.approx(1.2)
    assert w["p99_ms"] == pytest.approx(2100)
    assert (w["requests"], w["rps"], w["errors"], w["non2xx"]) == (5975, 2987.9, 3, 4)


def test_short_bench_all_modes(prefix: str, tmp_path: Path) -> None:
    if not shutil.which("wrk"):
        pytest.fail("wrk not installed (scripts/setup.sh)")
    out = tmp_path / "results.json"
    env = {**os.environ, "MESHACCEL_LAB_PREFIX": prefix}
    argv = [MESHACCEL, "bench", "--rounds", "1", "--duration", "2", "--connections", "1"]
    argv += ["--nodes", "1", "--json", str(out)]
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr + p.stdout
    assert "[3/3] round 1 ebpf" in p.stderr  # progress lines
    assert "ebpf/iptables" in p.stdout and "mesh-added p50" in p.stdout

    result = json.loads(out.read_text())
    records = result["records"]
    assert sorted(r["mode"] for r in records) == sorted(MODES)
    for r in records:
        assert (r["round"], r["connections"], r["duration"], r["nodes"]) == (1, 1, 2, 1)
        assert r["errors"] == 0 and r["non2xx"] == 0, r
        assert r["requests"] > 100 and r["rps"] > 0, r
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"], r
        assert r["lab_cpu_s"] > 0 and r["lab_cpu_per_1k"] > 0, r
        if r["mode"] == "nomesh":
            assert r["sidecar_cpu_s"] == 0 and r["counters"] == {}, r
        else:
            assert r["sidecar_cpu_s"] > 0, r
        if r["mode"] == "ebpf":
            assert r["counters"]["msg_redirected_bytes"] > 0, r
            assert r["counters"]["orig_dst_not_found"] == 0, r
    meds = {m["mode"]: m for m in result["medians"]}
    assert set(meds) == set(MODES)
    assert meds["nomesh"]["mesh_added_p50_ms"] == 0
    assert "1" in result["ratios_ebpf_over_iptables"]

    assert_nothing_left(prefix, [])
