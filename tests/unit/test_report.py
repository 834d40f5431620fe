"""meshaccel.lab.report on a synthetic bench result: files, PNG sanity, report wording."""

from __future__ import annotations

import json
import statistics
import struct
from pathlib import Path

from meshaccel.lab import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCENARIOS = ("bookinfo", "echo")
# (load, label, connections, rate)
LOADS = (
    ("closed", "c=1", 1, 0),
    ("closed", "c=16", 16, 0),
    ("open", "1000 rps", 0, 1000),
)
# Rough per-mode shape: latency and CPU multipliers against nomesh.
SHAPE = {"nomesh": (1.0, 0.0), "iptables": (3.2, 1.0), "ebpf": (2.4, 0.8), "ebpf-apps": (2.0, 0.6)}
METRICS = (
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "sidecar_cpu_per_1k",
    "app_cpu_per_1k",
    "lab_cpu_per_1k",
    "lab_sys_cpu_per_1k",
    "sidecar_sys_cpu_per_1k",
)


def _record(mode: str, scenario: str, load: tuple, rnd: int) -> dict:
    kind, label, conns, rate = load
    lat, sidecar = SHAPE[mode]
    base = 0.35 if scenario == "echo" else 0.9
    p50 = base * lat * (1 + 0.4 * (conns > 1)) * (1 + 0.03 * rnd)
    rps = rate if kind == "open" else conns * 1000 / p50 * 0.8
    requests = int(rps * 5)
    sidecar_1k = 1.1 * sidecar
    app_1k = 0.3
    lab_sys_1k = 0.25 + 0.4 * sidecar
    return {
        "mode": mode,
        "scenario": scenario,
        "load": kind,
        "label": label,
        "connections": conns,
        "rate": rate,
        "round": rnd,
        "duration": 5,
        "nodes": 1,
        "requests": requests,
        "rps": rps,
        "p50_ms": p50,
        "p90_ms": p50 * 1.35,
        "p99_ms": p50 * 1.9,
        "p999_ms": p50 * 3.1 if kind == "open" else None,  # wrk has no p99.9
        "errors": 0,
        "non2xx": 0,
        "dropped": 0,
        "sidecar_cpu_s": sidecar_1k * requests / 1000,
        "app_cpu_s": app_1k * requests / 1000,
        "lab_cpu_s": (sidecar_1k + app_1k + 0.2) * requests / 1000,
        "lab_sys_cpu_s": lab_sys_1k * requests / 1000,
        "sidecar_sys_cpu_s": 0.4 * sidecar_1k * requests / 1000,
        "sidecar_cpu_per_1k": sidecar_1k,
        "app_cpu_per_1k": app_1k,
        "lab_cpu_per_1k": sidecar_1k + app_1k + 0.2,
        "lab_sys_cpu_per_1k": lab_sys_1k,
        "sidecar_sys_cpu_per_1k": 0.4 * sidecar_1k,
        "counters": {"msg_redirected_bytes": 18_000_000 if mode.startswith("ebpf") else 0},
    }


def _medians(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["scenario"], r["label"], r["mode"]), []).append(r)
    out = []
    for rs in groups.values():
        row = {k: rs[0][k] for k in ("scenario", "load", "label", "connections", "rate", "mode")}
        row["rounds"] = len(rs)
        for m in METRICS:
            vals = [r[m] for r in rs if r[m] is not None]
            row[m] = statistics.median(vals) if vals else None
        for m in ("errors", "non2xx", "dropped"):
            row[m] = statistics.median(r[m] for r in rs)
        row["msg_redirected_bytes"] = statistics.median(
            r["counters"]["msg_redirected_bytes"] for r in rs
        )
        out.append(row)
    by = {(m["scenario"], m["label"], m["mode"]): m for m in out}
    for row in out:
        base = by.get((row["scenario"], row["label"], "nomesh"))
        row["mesh_added_p50_ms"] = row["p50_ms"] - base["p50_ms"] if base else None
    return out


def _ratios(meds: list[dict]) -> list[dict]:
    """As bench.ratios; with only ebpf, rows without a mode (as results from before
    ebpf-apps), which the report must still read."""
    by = {(m["scenario"], m["label"], m["mode"]): m for m in meds}
    with_mode = any(m["mode"] == "ebpf-apps" for m in meds)
    out = []
    for e in (m for m in meds if m["mode"] in ("ebpf", "ebpf-apps")):
        i = by.get((e["scenario"], e["label"], "iptables"))
        if i is None:
            continue
        row = {k: e[k] for k in ("scenario", "load", "label")}
        if with_mode:
            row["mode"] = e["mode"]
        for k in (*METRICS, "mesh_added_p50_ms"):
            a, b = e.get(k), i.get(k)
            row[k] = a / b if a is not None and b else None
        out.append(row)
    return out


def make_result(modes: tuple[str, ...] = ("nomesh", "iptables", "ebpf")) -> dict:
    records = [
        _record(mode, s, load, rnd)
        for rnd in (1, 2)
        for s in SCENARIOS
        for load in LOADS
        for mode in modes
    ]
    meds = _medians(records)
    rats = _ratios(meds)
    targets = []
    for name, scenario, label, metric, op, limit in (
        ("mesh-added p50, bookinfo c=1", "bookinfo", "c=1", "mesh_added_p50_ms", "<=", 0.5),
        ("sidecar CPU/1k, echo c=16", "echo", "c=16", "sidecar_cpu_per_1k", "<=", 0.9),
    ):
        for mode in [m for m in ("ebpf", "ebpf-apps") if m in modes]:
            ratio = next(
                (
                    r[metric]
                    for r in rats
                    if (r["scenario"], r["label"], r.get("mode", "ebpf")) == (scenario, label, mode)
                ),
                None,
            )
            met = ratio is not None and ratio <= limit
            target = {
                "name": name,
                "scenario": scenario,
                "label": label,
                "metric": metric,
                "op": op,
                "limit": limit,
                "ratio": ratio,
                "met": met,
            }
            if "ebpf-apps" in modes:
                target["mode"] = mode
            targets.append(target)
    return {
        "meta": {
            "command": "meshaccel bench --rounds 2 --duration 5",
            "date": "2026-11-26T02:00:00Z",
            "kernel": "6.18.44",
            "cpus": 2,
            "envoy": "1.36.2",
            "rounds": 2,
            "duration": 5,
            "nodes": 1,
            "concurrency": 1,
        },
        "records": records,
        "medians": meds,
        "ratios": rats,
        "targets": targets,
    }


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_write_produces_all_files(tmp_path: Path) -> None:
    result = make_result()
    paths = report.write(result, tmp_path / "out")
    names = [p.name for p in paths]
    assert names == ["results.json", "report.md", "latency.png", "rps.png", "cpu.png"]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0, p
    for p in paths[2:]:
        w, h = png_size(p)
        assert w > 300 and h > 300, (p, w, h)
    assert json.loads(paths[0].read_text()) == result


def test_markdown_content(tmp_path: Path) -> None:
    result = make_result()
    report.write(result, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# ")
    assert "meshaccel bench --rounds 2 --duration 5" in md
    for fact in ("2026-11-26T02:00:00Z", "6.18.44", "1.36.2"):
        assert fact in md
    for scenario in SCENARIOS:
        assert f"## Scenario: {scenario}" in md
        for _, label, _, _ in LOADS:
            assert f"### {scenario} · {label}" in md
    assert "| metric | nomesh | iptables | ebpf | ebpf/iptables |" in md
    for title in ("requests/s", "p99.9 (ms)", "mesh-added p50 (ms)", "lab kernel CPU s/1k req"):
        assert f"| {title} |" in md
    for name in report.PLOT_FILES:
        assert f"({name})" in md
    # The mesh-added target is missed (0.64x vs 0.5x: 27% over), the CPU one met (0.8x vs 0.9x).
    targets = md.split("## Targets")[1]
    assert "| mesh-added p50, bookinfo c=1 | 0.64× | ≤ 0.50× | **missed by 27%** |" in targets
    assert "| sidecar CPU/1k, echo c=16 | 0.80× | ≤ 0.90× | met |" in targets
    assert "## Warnings" not in md


def test_closed_loop_p999_is_dash() -> None:
    md = report.markdown(make_result())
    section = md.split("### bookinfo · c=1")[1].split("###")[0]
    p999 = next(line for line in section.splitlines() if line.startswith("| p99.9 (ms) |"))
    assert p999 == "| p99.9 (ms) | – | – | – | – |"
    section = md.split("### bookinfo · 1000 rps")[1].split("##")[0]
    p999 = next(line for line in section.splitlines() if line.startswith("| p99.9 (ms) |"))
    assert "–" not in p999


def test_warnings_for_errors_and_idle_kernel_path() -> None:
    result = make_result()
    rec = next(
        r
        for r in result["records"]
        if (r["mode"], r["scenario"], r["label"], r["round"]) == ("iptables", "echo", "c=16", 2)
    )
    rec["non2xx"] = 7
    for r in result["records"]:
        if r["mode"] == "ebpf" and r["scenario"] == "echo" and r["label"] == "c=1":
            r["counters"]["msg_redirected_bytes"] = 0
    md = report.markdown(result)
    assert "## Warnings" in md
    warns = md.split("## Warnings")[1].split("##")[0]
    assert "iptables · echo · c=16, round 2: 7 non-2xx responses" in warns
    assert "ebpf · echo · c=1" in warns and "kernel path not taken" in warns


def test_partial_modes_render(tmp_path: Path) -> None:
    result = make_result(modes=("iptables", "ebpf"))
    assert all(m["mesh_added_p50_ms"] is None for m in result["medians"])
    paths = report.write(result, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| metric | iptables | ebpf | ebpf/iptables |" in md
    assert "| mesh-added p50 (ms) | – | – | – |" in md
    assert "| mesh-added p50, bookinfo c=1 | – | ≤ 0.50× | not measured |" in md
    for p in paths[2:]:
        assert min(png_size(p)) > 300


def test_single_mode_and_empty_result(tmp_path: Path) -> None:
    result = make_result(modes=("ebpf",))
    result["ratios"] = []
    result["targets"] = []
    report.write(result, tmp_path / "one")
    md = (tmp_path / "one" / "report.md").read_text()
    assert "| metric | ebpf |\n" in md and "| ebpf/iptables |" not in md

    paths = report.write({"meta": {}, "records": [], "medians": []}, tmp_path / "empty")
    assert "No measurements" in paths[1].read_text()
    for p in paths[2:]:
        assert min(png_size(p)) > 300


def test_import_does_not_load_matplotlib() -> None:
    import subprocess
    import sys

    code = "import sys, meshaccel.lab.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


ALL_MODES = ("nomesh", "iptables", "ebpf", "ebpf-apps")


def test_every_lab_mode_has_a_colour() -> None:
    assert report.MODES == ("nomesh", "iptables", "ebpf", "ebpf-apps")
    assert set(report.MODE_COLORS) == set(report.MODES)
    assert len(set(report.MODE_COLORS.values())) == len(report.MODES)


def test_ebpf_apps_ratios_beside_ebpf(tmp_path: Path) -> None:
    """Both eBPF modes: a column each, its own ratio to iptables, targets per mode."""
    result = make_result(modes=ALL_MODES)
    paths = report.write(result, tmp_path)
    md = paths[1].read_text()
    header = (
        "| metric | nomesh | iptables | ebpf | ebpf-apps | ebpf/iptables | ebpf-apps/iptables |"
    )
    assert header in md
    assert "**ebpf-apps** = meshaccel with app sockets on the shortcut too" in md
    section = md.split("### echo · c=1")[1].split("###")[0]
    sidecar = next(line for line in section.splitlines() if line.startswith("| sidecar CPU s/"))
    # sidecar CPU per 1k: ebpf 0.8 and ebpf-apps 0.6 of iptables' (SHAPE)
    assert sidecar.endswith("| 0.80× | 0.60× |"), sidecar
    p50 = next(line for line in section.splitlines() if line.startswith("| p50 (ms) |"))
    assert p50.endswith("| 0.75× | 0.63× |"), p50  # 2.4 / 3.2 and 2.0 / 3.2
    targets = md.split("## Targets")[1].split("##")[0]
    assert "ratios are ebpf / iptables, ebpf-apps / iptables" in targets
    assert "| mode | target | ratio | limit | status |" in targets
    assert "| ebpf | sidecar CPU/1k, echo c=16 | 0.80× | ≤ 0.90× | met |" in targets
    assert "| ebpf-apps | sidecar CPU/1k, echo c=16 | 0.60× | ≤ 0.90× | met |" in targets
    for p in paths[2:]:
        assert min(png_size(p)) > 300


def test_ebpf_apps_without_ebpf(tmp_path: Path) -> None:
    result = make_result(modes=("nomesh", "iptables", "ebpf-apps"))
    md = report.markdown(result)
    assert "| metric | nomesh | iptables | ebpf-apps | ebpf-apps/iptables |" in md
    assert "| ebpf/iptables |" not in md


def test_ratio_rows_before_ebpf_apps_are_ebpf() -> None:
    """results.json from before ebpf-apps: ratio rows and targets without a mode."""
    result = make_result()
    assert all("mode" not in r for r in result["ratios"] + result["targets"])
    md = report.markdown(result)
    assert "| metric | nomesh | iptables | ebpf | ebpf/iptables |" in md
    assert "ratios are ebpf / iptables." in md and "| mode |" not in md


def test_warning_names_the_idle_ebpf_apps_mode() -> None:
    result = make_result(modes=ALL_MODES)
    for r in result["records"]:
        if r["mode"] == "ebpf-apps" and r["scenario"] == "bookinfo" and r["label"] == "c=16":
            r["counters"]["msg_redirected_bytes"] = 0
    warns = report.warnings(result)
    assert warns == [
        "ebpf-apps · bookinfo · c=16: msg_redirected_bytes = 0 (rounds 1, 2) — kernel path not "
        "taken"
    ]
