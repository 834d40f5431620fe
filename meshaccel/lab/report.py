"""Render a `meshaccel bench` result as a Markdown report and PNG plots.

The result dict is what `meshaccel bench` saves as results.json: `meta`, per-round `records`,
per-(scenario, load label, mode) `medians`, `ratios` of each eBPF mode (ebpf, ebpf-apps) to
iptables and judged `targets`.
Any subset of modes, scenarios and labels may be present and any value may be None; the
report shows missing values as "–" rather than failing.

matplotlib is imported inside the plot functions so that importing this module (e.g. from
the CLI) stays cheap and works without a display.
"""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from meshaccel.errors import MeshaccelError
from meshaccel.lab import topology

Result = dict[str, Any]

MODES: tuple[str, ...] = topology.MODES
MODE_COLORS: dict[str, str] = {
    "nomesh": "#9e9e9e",  # grey: the lower bound
    "iptables": "#f28e2b",  # orange: Istio today
    "ebpf": "#4e79a7",  # blue: meshaccel (sidecar<->sidecar sockets on the shortcut)
    "ebpf-apps": "#76b7b2",  # teal: meshaccel with app sockets on the shortcut too
}
DPI = 110
DASH = "–"
PLOT_FILES: tuple[str, ...] = ("latency.png", "rps.png", "cpu.png")

# (key in medians/ratios, row title, kind); kind picks the number format.
TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("rps", "requests/s", "rps"),
    ("p50_ms", "p50 (ms)", "ms"),
    ("p90_ms", "p90 (ms)", "ms"),
    ("p99_ms", "p99 (ms)", "ms"),
    ("p999_ms", "p99.9 (ms)", "ms"),
    ("mesh_added_p50_ms", "mesh-added p50 (ms)", "ms"),
    ("sidecar_cpu_per_1k", "sidecar CPU s/1k req", "cpu"),
    ("sidecar_sys_cpu_per_1k", "sidecar kernel CPU s/1k req", "cpu"),
    ("app_cpu_per_1k", "app CPU s/1k req", "cpu"),
    ("lab_cpu_per_1k", "lab CPU s/1k req", "cpu"),
    ("lab_sys_cpu_per_1k", "lab kernel CPU s/1k req", "cpu"),
    ("dropped", "dropped", "count"),
    ("errors+non2xx", "errors + non-2xx", "count"),
)
# Counts are not meaningfully compared as a ratio (0/0, 3/0 ...).
_NO_RATIO = {"dropped", "errors+non2xx"}

LATENCY_KEYS: tuple[tuple[str, str], ...] = (
    ("p50_ms", "p50"),
    ("p90_ms", "p90"),
    ("p99_ms", "p99"),
    ("p999_ms", "p99.9"),
)
CPU_KEYS: tuple[tuple[str, str], ...] = (
    ("sidecar_cpu_per_1k", "sidecar"),
    ("app_cpu_per_1k", "app"),
    ("lab_sys_cpu_per_1k", "lab kernel"),
)


# ---------------------------------------------------------------- formatting


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def fmt(v: Any, kind: str) -> str:
    """Format one value: ms 3 decimals, rps 1 decimal, ratios 2 decimals + "×", None "–"."""
    f = _num(v)
    if f is None:
        return DASH
    if kind == "ms" or kind == "cpu":
        return f"{f:.3f}"
    if kind == "rps":
        return f"{f:,.1f}"
    if kind == "ratio":
        return f"{f:.2f}×"
    if kind == "count":
        return f"{f:,.0f}" if f.is_integer() else f"{f:,.1f}"
    return f"{f:g}"


def _compact(v: float) -> str:
    return f"{v / 1000:.1f}k" if abs(v) >= 1000 else f"{v:.0f}"


def _pct(f: float) -> str:
    return f"{f:.1f}%" if f < 10 else f"{f:.0f}%"


# ---------------------------------------------------------------- result access


def _modes(result: Result) -> list[str]:
    seen = {r.get("mode") for r in result.get("medians") or []}
    return [m for m in MODES if m in seen]


def _label_key(row: dict) -> tuple:
    # Closed loop first by connections, then open loop by rate.
    load = row.get("load") or "closed"
    return (
        load != "closed",
        _num(row.get("connections")) or 0,
        _num(row.get("rate")) or 0,
        str(row.get("label")),
    )


def _scenarios(result: Result) -> list[str]:
    out: list[str] = []
    for r in result.get("medians") or []:
        if r.get("scenario") not in out:
            out.append(r.get("scenario"))
    return out


def _labels(result: Result, scenario: str) -> list[dict]:
    """One representative medians row per load label of a scenario, in display order."""
    by: dict[str, dict] = {}
    for r in result.get("medians") or []:
        if r.get("scenario") == scenario:
            by.setdefault(r.get("label"), r)
    return sorted(by.values(), key=_label_key)


def _panels(result: Result) -> list[tuple[str, str]]:
    return [(s, r.get("label")) for s in _scenarios(result) for r in _labels(result, s)]


def _median(result: Result, scenario: str, label: str, mode: str) -> dict | None:
    for r in result.get("medians") or []:
        if r.get("scenario") == scenario and r.get("label") == label and r.get("mode") == mode:
            return r
    return None


def _value(row: dict | None, key: str) -> float | None:
    if row is None:
        return None
    if key == "errors+non2xx":
        a, b = _num(row.get("errors")), _num(row.get("non2xx"))
        return None if a is None and b is None else (a or 0) + (b or 0)
    return _num(row.get(key))


def _ratio_modes(modes: list[str]) -> list[str]:
    """The eBPF modes shown as a ratio to iptables (both measured)."""
    return [m for m in modes if topology.is_ebpf(m) and "iptables" in modes]


def _ratio(result: Result, scenario: str, label: str, key: str, mode: str) -> float | None:
    for r in result.get("ratios") or []:
        # (results from before ebpf-apps have ebpf rows only, without a mode)
        if (r.get("scenario"), r.get("label"), r.get("mode", "ebpf")) == (scenario, label, mode):
            return _num(r.get(key))
    return None


def _load_desc(row: dict) -> str:
    if (row.get("load") or "closed") == "closed":
        c = row.get("connections")
        return f"closed loop, wrk with {c} connection{'s' if c != 1 else ''}"
    rate = _num(row.get("rate"))
    return f"open loop at a fixed {rate:,.0f} requests/s" if rate else "open loop"


# ---------------------------------------------------------------- markdown


def _table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    sep = {"l": ":---", "r": "---:", "c": ":---:"}
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep[a] for a in align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _meta_lines(result: Result) -> list[str]:
    meta = result.get("meta") or {}
    lines: list[str] = []
    if meta.get("command"):
        lines += ["```", str(meta["command"]), "```", ""]

    def m(key: str, unit: str = "") -> str:
        v = meta.get(key)
        return DASH if v is None or v == "" else f"{v}{unit}"

    lines += [
        f"- **Date:** {m('date')}",
        f"- **Kernel:** {m('kernel')}, **CPUs:** {m('cpus')}, **Envoy:** {m('envoy')}",
        f"- **Rounds:** {m('rounds')} × {m('duration', ' s')} per load, "
        f"**nodes:** {m('nodes')}, **concurrency:** {m('concurrency')}",
    ]
    return lines


def _scenario_lines(result: Result, scenario: str, modes: list[str]) -> list[str]:
    ratio_modes = _ratio_modes(modes)
    lines = [f"## Scenario: {scenario}", ""]
    for rep in _labels(result, scenario):
        label = rep.get("label")
        rounds = {
            int(n)
            for md in modes
            if (n := _num((_median(result, scenario, label, md) or {}).get("rounds"))) is not None
        }
        rounds_txt = f", median of {max(rounds)} rounds" if rounds else ""
        lines += [f"### {scenario} · {label}", "", f"_{_load_desc(rep)}{rounds_txt}_", ""]
        header = ["metric", *modes] + [f"{md}/iptables" for md in ratio_modes]
        rows = []
        for key, title, kind in TABLE_ROWS:
            row = [title] + [
                fmt(_value(_median(result, scenario, label, md), key), kind) for md in modes
            ]
            for md in ratio_modes:
                r = None if key in _NO_RATIO else _ratio(result, scenario, label, key, md)
                row.append(fmt(r, "ratio"))
            rows.append(row)
        lines += _table(header, rows, ["l"] + ["r"] * (len(header) - 1)) + [""]
    return lines


def _target_status(t: dict) -> str:
    value, limit = _num(t.get("ratio")), float(t["limit"])
    if value is None:
        return "not measured"
    if t["met"]:
        return "met"
    # relative to the limit: 0.64x against <= 0.5x is "missed by 28%"
    return f"**missed by {_pct(abs(value - limit) / limit * 100)}**"


def _targets_lines(result: Result) -> list[str]:
    targets = result.get("targets") or []
    if not targets:
        return []
    # (results from before ebpf-apps judge ebpf only, without a mode)
    modes = list(dict.fromkeys(str(t.get("mode", "ebpf")) for t in targets))
    rows = []
    for t in targets:
        op = {"<=": "≤", ">=": "≥"}.get(t.get("op"), t.get("op") or "")
        limit = fmt(t.get("limit"), "ratio")
        rows.append(
            ([str(t.get("mode", "ebpf"))] if len(modes) > 1 else [])
            + [
                str(t.get("name", DASH)),
                fmt(t.get("ratio"), "ratio"),
                f"{op} {limit}".strip(),
                _target_status(t),
            ]
        )
    ratios = ", ".join(f"{m} / iptables" for m in modes)
    lines = ["## Targets", "", f"Judged on the medians; ratios are {ratios}.", ""]
    header, align = ["target", "ratio", "limit", "status"], ["l", "r", "r", "l"]
    if len(modes) > 1:
        header, align = ["mode", *header], ["l", *align]
    lines += _table(header, rows, align) + [""]
    if not all(t.get("met") for t in targets):
        lines += [
            "Where the time goes: `scripts/profile_lab.py` splits each mode's CPU per request "
            "(perf: Envoy, apps, and the kernel by TCP/IP, netfilter, sockmap, wake-ups, "
            "syscalls), with the BPF programs' own run time and Envoy's stats; "
            "docs/bench-lab.md analyses the recorded runs.",
            "",
        ]
    return lines


def warnings(result: Result) -> list[str]:
    """Reasons to distrust some numbers: failed requests, drops, an unused kernel path."""
    out: list[str] = []
    records = result.get("records") or []
    # Per round when records exist (they say which round), else from the medians.
    rows = records or result.get("medians") or []
    for r in rows:
        bits = []
        for key, what in (("errors", "socket errors"), ("non2xx", "non-2xx responses")):
            n = _num(r.get(key))
            if n:
                bits.append(f"{fmt(n, 'count')} {what}")
        n = _num(r.get("dropped"))
        if n:
            bits.append(f"{fmt(n, 'count')} dropped")
        if bits:
            where = f"{r.get('mode')} · {r.get('scenario')} · {r.get('label')}"
            if r.get("round") is not None:
                where += f", round {r.get('round')}"
            out.append(f"{where}: {', '.join(bits)}")

    # An eBPF mode with no bytes through sk_msg measures the fallback (TCP) path.
    idle: dict[tuple[str, str, str], list[str]] = {}
    for r in result.get("medians") or []:
        if topology.is_ebpf(str(r.get("mode"))) and "msg_redirected_bytes" in r:
            if _num(r["msg_redirected_bytes"]) == 0:
                idle.setdefault((r["mode"], r.get("scenario"), r.get("label")), [])
    for r in records:
        counters = r.get("counters") or {}
        if topology.is_ebpf(str(r.get("mode"))) and "msg_redirected_bytes" in counters:
            if _num(counters["msg_redirected_bytes"]) == 0:
                key = (r["mode"], r.get("scenario"), r.get("label"))
                idle.setdefault(key, []).append(str(r.get("round")))
    for (mode, scenario, label), rounds in idle.items():
        when = f" (round{'s' if len(rounds) > 1 else ''} {', '.join(rounds)})" if rounds else ""
        out.append(
            f"{mode} · {scenario} · {label}: msg_redirected_bytes = 0{when} — kernel path not taken"
        )
    return out


def markdown(result: Result) -> str:
    """The report a platform engineer reads: meta, per-scenario tables, targets, warnings."""
    modes = _modes(result)
    lines = ["# meshaccel bench report", ""]
    lines += _meta_lines(result) + [""]
    lines += [
        "Modes: **nomesh** = no sidecars (lower bound), **iptables** = Istio today, "
        "**ebpf** = meshaccel (sidecar↔sidecar sockets on the sk_msg shortcut, its default), "
        "**ebpf-apps** = meshaccel with app sockets on the shortcut too (`--app-shortcut`). "
        "Values are medians across rounds. For the ratios to iptables (ebpf/iptables, "
        "ebpf-apps/iptables), "
        "below 1× is better for latency and CPU, above 1× is better for requests/s. "
        "Mesh-added p50 is the mode's p50 minus nomesh's. CPU: sidecar = the Envoy "
        "processes, app = the lab's apps, lab = the lab cgroup (apps, sidecars and the load "
        "generator); kernel = their system time.",
        "",
    ]
    if not result.get("medians"):
        lines += ["_No measurements in this result._", ""]
    for scenario in _scenarios(result):
        lines += _scenario_lines(result, scenario, modes)
    lines += _targets_lines(result)
    warns = warnings(result)
    if warns:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warns] + [""]
    lines += ["## Plots", ""]
    for name in PLOT_FILES:
        lines += [f"![{name.removesuffix('.png')}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- plots


def _figure(n: int, max_cols: int = 3, size: tuple[float, float] = (4.4, 3.3)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, min(max_cols, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(size[0] * cols, size[1] * rows + 0.5),
        squeeze=False,
        layout="constrained",
    )
    flat = list(axes.flat)
    for ax in flat[max(n, 1) :]:
        ax.set_visible(False)
    return plt, fig, flat[:n] if n else flat[:1]


def _grouped(ax, groups: list[str], series: dict[str, list[float | None]], modes: list[str]):
    """Bars for each mode side by side within each group; None leaves a gap."""
    width = 0.8 / max(1, len(series))
    for i, (mode, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        pts = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        if pts:
            ax.bar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                width,
                label=mode,
                color=MODE_COLORS[mode],
                edgecolor="white",
                linewidth=0.5,
            )
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)


def _finish(plt, fig, path: Path, title: str, modes: list[str], empty: bool) -> None:
    from matplotlib.patches import Patch

    fig.suptitle(title, fontsize=12)
    if empty:
        fig.axes[0].text(0.5, 0.5, "no data", ha="center", va="center", fontsize=14)
        fig.axes[0].set_axis_off()
    elif modes:
        # One legend for the whole figure: colours are fixed per mode, so per-axes legends
        # would only repeat themselves and cover bars.
        handles = [Patch(color=MODE_COLORS[m], label=m) for m in modes]
        try:
            fig.legend(handles=handles, loc="outside lower center", ncols=len(modes), frameon=False)
        except ValueError:  # matplotlib < 3.7 (Debian 12 has 3.6): no "outside" placement
            fig.legend(handles=handles, loc="lower center", ncol=len(modes), frameon=False)
    try:
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)


def plot_latency(result: Result, path: Path) -> None:
    """p50/p90/p99/p99.9 per mode, one subplot per (scenario, load label)."""
    modes = _modes(result)
    panels = _panels(result)
    plt, fig, axes = _figure(len(panels))
    for ax, (scenario, label) in zip(axes, panels, strict=False):
        rows = {m: _median(result, scenario, label, m) for m in modes}
        # Drop a percentile nobody measured (wrk gives no p99.9) instead of an empty group.
        keys = [
            (k, t) for k, t in LATENCY_KEYS if any(_value(r, k) is not None for r in rows.values())
        ]
        series = {m: [_value(rows[m], k) for k, _ in keys] for m in modes if rows[m]}
        _grouped(ax, [t for _, t in keys], series, modes)
        ax.set_title(f"{scenario} · {label}", fontsize=10)
        ax.set_ylabel("latency (ms)")
    _finish(plt, fig, path, "Latency by percentile (median across rounds)", modes, not panels)


def plot_rps(result: Result, path: Path) -> None:
    """Requests/s per mode, one subplot per scenario, one bar group per load label."""
    modes = _modes(result)
    scenarios = _scenarios(result)
    plt, fig, axes = _figure(len(scenarios))
    for ax, scenario in zip(axes, scenarios, strict=False):
        labels = [r.get("label") for r in _labels(result, scenario)]
        series = {
            m: [_value(_median(result, scenario, lb, m), "rps") for lb in labels] for m in modes
        }
        _grouped(ax, [str(lb) for lb in labels], series, modes)
        # Closed-loop c=1 bars are tiny next to c=64; the numbers keep them readable.
        # Vertical so neighbouring labels never collide, however many modes and loads.
        for bars in ax.containers:
            ax.bar_label(
                bars,
                labels=[_compact(v) for v in bars.datavalues],
                fontsize=7,
                padding=2,
                rotation=90,
            )
        ax.yaxis.set_major_formatter("{x:,.0f}")
        ax.margins(y=0.18)
        ax.set_title(scenario, fontsize=10)
        ax.set_ylabel("requests/s")
    _finish(plt, fig, path, "Throughput (median across rounds)", modes, not scenarios)


def plot_cpu(result: Result, path: Path) -> None:
    """CPU seconds per 1,000 requests per mode, one subplot per (scenario, load label)."""
    modes = _modes(result)
    panels = _panels(result)
    plt, fig, axes = _figure(len(panels))
    for ax, (scenario, label) in zip(axes, panels, strict=False):
        rows = {m: _median(result, scenario, label, m) for m in modes}
        # Grouped, not stacked: lab kernel CPU already contains the sidecars' system time.
        series = {m: [_value(rows[m], k) for k, _ in CPU_KEYS] for m in modes if rows[m]}
        _grouped(ax, [t for _, t in CPU_KEYS], series, modes)
        ax.set_title(f"{scenario} · {label}", fontsize=10)
        ax.set_ylabel("CPU s per 1k requests")
    _finish(plt, fig, path, "CPU cost per 1,000 requests (median across rounds)", modes, not panels)


# ---------------------------------------------------------------- output


def prepare(outdir: Path) -> None:
    """Fail before a long bench rather than after it: outdir writable, matplotlib there."""
    try:
        Path(outdir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=outdir):
            pass
    except OSError as e:
        raise MeshaccelError(f"--out {outdir}: cannot write there ({e.strerror})") from None
    if importlib.util.find_spec("matplotlib") is None:
        raise MeshaccelError("--out needs matplotlib for the plots: pip install 'meshaccel[bench]'")


def write(result: Result, outdir: Path) -> list[Path]:
    """Write results.json, report.md and the three plots into outdir; return their paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / "results.json", outdir / "report.md"]
    paths[0].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(result))
    for name, plot in zip(PLOT_FILES, (plot_latency, plot_rps, plot_cpu), strict=True):
        plot(result, outdir / name)
        paths.append(outdir / name)
    return paths
