"""meshaccel.lab.bench's summary of the rounds, without a lab: medians per scenario, load and
mode, mesh-added latency against nomesh, ebpf/iptables and ebpf-apps/iptables ratios, the
performance targets, the text tables, and argument checks."""

from __future__ import annotations

import pytest

from meshaccel.errors import MeshaccelError
from meshaccel.lab import bench

C1 = bench.Load("closed", 1)
OPEN = bench.Load("open", 64, 1000)


def rec(
    mode: str, rnd: int, load: bench.Load, p50: float, rps: float, kernel: float
) -> bench.Record:
    r = bench.Record(mode, "echo", load.kind, load.label, load.connections, load.rate, rnd, 5, 1)
    r.p50_ms, r.rps, r.lab_sys_cpu_per_1k = p50, rps, kernel
    r.p90_ms, r.p99_ms = p50 * 1.2, p50 * 2
    r.sidecar_cpu_per_1k = 0.0 if mode == "nomesh" else kernel * 2
    if load.kind == "open":
        r.p999_ms = p50 * 4
    if mode in ("ebpf", "ebpf-apps"):
        r.counters = {"msg_redirected_bytes": 1000 * rnd}
    return r


def rounds() -> list[bench.Record]:
    out = []
    # three rounds; the middle value is the median, the outlier must not move it
    for rnd, noise in ((1, 0.0), (2, 0.5), (3, 0.01)):
        out += [
            rec("nomesh", rnd, C1, 0.07 + noise, 14000, 0.05),
            rec("iptables", rnd, C1, 0.21 + noise, 4500, 0.11),
            rec("ebpf", rnd, C1, 0.15 + noise, 6300, 0.07),
            rec("nomesh", rnd, OPEN, 0.06, 1000, 0.04),
            rec("iptables", rnd, OPEN, 0.34, 1000, 0.15),
            rec("ebpf", rnd, OPEN, 0.27, 1000, 0.09),
        ]
    return out


def test_medians_and_mesh_added() -> None:
    meds = {(m["label"], m["mode"]): m for m in bench.medians(rounds())}
    assert [k for k in meds] == [
        ("c=1", "nomesh"), ("c=1", "iptables"), ("c=1", "ebpf"),
        ("1000 rps", "nomesh"), ("1000 rps", "iptables"), ("1000 rps", "ebpf"),
    ]  # fmt: skip
    assert meds[("c=1", "ebpf")]["p50_ms"] == pytest.approx(0.16)  # 0.15, 0.16, 0.65
    assert meds[("c=1", "ebpf")]["rounds"] == 3
    assert meds[("c=1", "nomesh")]["mesh_added_p50_ms"] == 0
    assert meds[("c=1", "iptables")]["mesh_added_p50_ms"] == pytest.approx(0.14)
    assert meds[("c=1", "ebpf")]["mesh_added_p50_ms"] == pytest.approx(0.08)
    assert meds[("c=1", "ebpf")]["p999_ms"] is None  # wrk gives none
    assert meds[("1000 rps", "ebpf")]["p999_ms"] == pytest.approx(1.08)
    assert meds[("c=1", "ebpf")]["msg_redirected_bytes"] == 2000


def test_ratios_and_targets() -> None:
    result = bench.to_json(rounds(), {"command": "meshaccel bench"})
    by = {r["label"]: r for r in result["ratios"]}
    assert by["c=1"]["mesh_added_p50_ms"] == pytest.approx(0.08 / 0.14)
    assert by["c=1"]["rps"] == pytest.approx(6300 / 4500)
    assert by["1000 rps"]["p999_ms"] == pytest.approx(0.27 / 0.34)
    targets = {(t["metric"], t["label"]): t for t in result["targets"]}
    assert len(targets) == len(bench.TARGETS)
    assert targets[("mesh_added_p50_ms", "c=1")]["met"]  # 0.57 <= 0.75
    assert targets[("rps", "c=1")]["met"]  # 1.4 >= 1.3
    assert targets[("mesh_added_p50_ms", "1000 rps")]["met"]  # 0.21/0.28 = 0.75 <= 0.8
    kernel = targets[("lab_sys_cpu_per_1k", "c=1")]
    assert kernel["ratio"] == pytest.approx(0.07 / 0.11) and not kernel["met"]
    text = bench.format_targets(result["targets"])
    assert "lab kernel CPU s per 1k requests, echo c=1" in text and "MISSED" in text


def with_ebpf_apps() -> list[bench.Record]:
    """rounds() plus ebpf-apps (app sockets on the shortcut too): faster than ebpf."""
    out = rounds()
    for rnd, noise in ((1, 0.0), (2, 0.5), (3, 0.01)):
        out += [
            rec("ebpf-apps", rnd, C1, 0.12 + noise, 7200, 0.05),
            rec("ebpf-apps", rnd, OPEN, 0.22, 1000, 0.06),
        ]
    return out


def test_ratios_and_targets_per_ebpf_mode() -> None:
    meds = bench.medians(with_ebpf_apps())
    assert [(m["label"], m["mode"]) for m in meds][:4] == [
        ("c=1", "nomesh"), ("c=1", "iptables"), ("c=1", "ebpf"), ("c=1", "ebpf-apps"),
    ]  # fmt: skip
    result = bench.to_json(with_ebpf_apps(), {"command": "meshaccel bench"})
    # per scenario and load: ebpf first (what a reader of ratios[0] has always got)
    assert [(r["label"], r["mode"]) for r in result["ratios"]] == [
        ("c=1", "ebpf"), ("c=1", "ebpf-apps"), ("1000 rps", "ebpf"), ("1000 rps", "ebpf-apps"),
    ]  # fmt: skip
    by = {(r["label"], r["mode"]): r for r in result["ratios"]}
    assert by[("c=1", "ebpf")]["rps"] == pytest.approx(6300 / 4500)
    assert by[("c=1", "ebpf-apps")]["rps"] == pytest.approx(7200 / 4500)
    assert by[("c=1", "ebpf-apps")]["mesh_added_p50_ms"] == pytest.approx(0.05 / 0.14)
    assert by[("1000 rps", "ebpf-apps")]["p999_ms"] == pytest.approx(0.22 / 0.34)
    targets = {(t["metric"], t["label"], t["mode"]): t for t in result["targets"]}
    assert len(targets) == 2 * len(bench.TARGETS)
    kernel = targets[("lab_sys_cpu_per_1k", "c=1", "ebpf-apps")]
    assert kernel["ratio"] == pytest.approx(0.05 / 0.11) and kernel["met"]
    assert not targets[("lab_sys_cpu_per_1k", "c=1", "ebpf")]["met"]
    text = bench.format_targets(result["targets"])
    assert text.splitlines()[0] == "performance targets (ebpf / iptables, ebpf-apps / iptables)"
    assert "  ebpf-apps lab kernel CPU s per 1k requests, echo c=1" in text


def test_ratios_without_iptables_or_ebpf() -> None:
    only_apps = [r for r in with_ebpf_apps() if r.mode != "ebpf"]
    rats = bench.ratios(bench.medians(only_apps))
    assert {r["mode"] for r in rats} == {"ebpf-apps"}
    no_iptables = [r for r in with_ebpf_apps() if r.mode != "iptables"]
    assert bench.ratios(bench.medians(no_iptables)) == []


def test_format_tables_both_ebpf_modes() -> None:
    lines = bench.format_tables(bench.medians(with_ebpf_apps())).splitlines()
    rps = lines.index("requests/s (median across rounds)")
    assert lines[rps + 1].split() == [
        "load", "nomesh", "iptables", "ebpf", "ebpf-apps", "ebpf/iptables", "ebpf-apps/iptables",
    ]  # fmt: skip
    assert lines[rps + 2].split() == [
        "c=1", "14000.0", "4500.0", "6300.0", "7200.0", "1.40x", "1.60x",
    ]  # fmt: skip
    # the ratio columns line up with their headings (right-aligned)
    assert len(lines[rps + 2]) == len(lines[rps + 1])


def test_format_tables() -> None:
    text = bench.format_tables(bench.medians(rounds()))
    assert text.startswith("== echo: client -> echo (1 KiB), same node")
    lines = text.splitlines()
    rps = lines.index("requests/s (median across rounds)")
    assert "ebpf/iptables" in lines[rps + 1]
    assert lines[rps + 2].split() == ["c=1", "14000.0", "4500.0", "6300.0", "1.40x"]


@pytest.mark.parametrize(
    ("modes", "scenarios", "nodes", "message"),
    [
        (["ebpf", "fast"], ["echo"], 1, "--modes fast"),
        (["ebpf_apps"], ["echo"], 1, "one of nomesh, iptables, ebpf, ebpf-apps"),
        (["ebpf"], ["shop"], 1, "--scenarios shop"),
        (["ebpf"], ["echo-cross-node"], 1, "needs --nodes 2"),
        ([], ["echo"], 1, "at least one"),
    ],
)
def test_check_args(modes: list[str], scenarios: list[str], nodes: int, message: str) -> None:
    with pytest.raises(MeshaccelError, match=message):
        bench.check_args(modes, scenarios, nodes)


def test_loads() -> None:
    assert [ld.label for ld in bench.loads([1, 16], 1000, 64)] == ["c=1", "c=16", "1000 rps"]
    assert [ld.label for ld in bench.loads([1], 0, 64)] == ["c=1"]
