"""`meshaccel bench`: the lab's modes side by side, on the same scenarios and loads.

Every round runs every mode in turn (A B C A B C ...) so that machine noise hits all alike.
Per mode: bring the lab up, warm each scenario up, then for each scenario and load measure
from inside the client pod (its netns and the lab cgroup, so it is captured like any app):

- closed loop: `wrk -t 1 -c C --latency` (requests/s, p50/p90/p99);
- open loop: meshaccel.lab.openloop at a fixed rate (p50..p99.9 from each request's scheduled
  time, and requests dropped because no connection was free);

and around each run the CPU seconds of the sidecars, the apps and the whole lab cgroup
(total and kernel), per 1,000 requests, and in the eBPF modes (ebpf, ebpf-apps) the
datapath counter deltas that prove the kernel path was taken. Then tear the lab down (also
on failure). Each eBPF mode is compared with iptables (ebpf/iptables, ebpf-apps/iptables).
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from meshaccel.datapath.host import check_root
from meshaccel.datapath.pins import read_counters
from meshaccel.errors import MeshaccelError
from meshaccel.lab import envoy, lifecycle, openloop, processes, topology

Log = Callable[[str], None]
CLK_TCK = os.sysconf("SC_CLK_TCK")

# scenario -> (target pod, what it exercises)
SCENARIOS: dict[str, tuple[str, str]] = {
    "bookinfo": ("productpage", "client -> productpage -> details, reviews -> ratings"),
    "echo": ("echo", "client -> echo (1 KiB), same node"),
    "echo-cross-node": ("echo-remote", "client -> echo (1 KiB) on the other node"),
}
# (key, title) of every per-request metric, in table order
METRICS: tuple[tuple[str, str], ...] = (
    ("rps", "requests/s"),
    ("p50_ms", "p50 latency (ms)"),
    ("p90_ms", "p90 latency (ms)"),
    ("p99_ms", "p99 latency (ms)"),
    ("p999_ms", "p99.9 latency (ms)"),
    ("mesh_added_p50_ms", "mesh-added p50 latency (ms, mode - nomesh)"),
    ("sidecar_cpu_per_1k", "sidecar CPU s per 1k requests"),
    ("sidecar_sys_cpu_per_1k", "sidecar kernel CPU s per 1k requests"),
    ("app_cpu_per_1k", "app CPU s per 1k requests"),
    ("lab_cpu_per_1k", "lab CPU s per 1k requests"),
    ("lab_sys_cpu_per_1k", "lab kernel CPU s per 1k requests"),
)
# the performance targets, each eBPF mode / iptables: (metric, label kind, op, limit)
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("mesh_added_p50_ms", "c=1", "<=", 0.75),
    ("mesh_added_p50_ms", "open", "<=", 0.8),
    ("rps", "c=1", ">=", 1.3),
    ("sidecar_cpu_per_1k", "c=1", "<=", 0.8),
    ("lab_sys_cpu_per_1k", "c=1", "<=", 0.5),
)
CPU_KEYS = ("sidecar", "sidecar_sys", "app", "lab", "lab_sys")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


@dataclass(frozen=True)
class Load:
    kind: str  # closed / open
    connections: int
    rate: int = 0  # open loop: requests/s

    @property
    def label(self) -> str:
        return f"c={self.connections}" if self.kind == "closed" else f"{self.rate} rps"


@dataclass
class Record:
    mode: str
    scenario: str
    load: str
    label: str
    connections: int
    rate: int
    round: int
    duration: float
    nodes: int
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float | None = None  # open loop only (wrk prints no p99.9)
    errors: int = 0  # socket errors and timeouts
    non2xx: int = 0
    dropped: int = 0  # open loop: due while every connection was busy
    sidecar_cpu_s: float = 0.0
    sidecar_sys_cpu_s: float = 0.0
    app_cpu_s: float = 0.0
    lab_cpu_s: float = 0.0
    lab_sys_cpu_s: float = 0.0
    sidecar_cpu_per_1k: float = 0.0
    sidecar_sys_cpu_per_1k: float = 0.0
    app_cpu_per_1k: float = 0.0
    lab_cpu_per_1k: float = 0.0
    lab_sys_cpu_per_1k: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)  # eBPF modes: datapath deltas


# ---------------------------------------------------------------- load generators


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise MeshaccelError(f"wrk: cannot parse latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """requests, rps, p50/p90/p99 (ms), errors and non2xx from `wrk --latency` output."""
    res: dict[str, float] = {"errors": 0, "non2xx": 0}
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+(\S+)", out, re.M)
        if not m:
            raise MeshaccelError(f"wrk: no {pct}% latency in output: {out[-400:]!r}")
        res[f"p{pct}_ms"] = _ms(m.group(1))
    m = re.search(r"^\s*(\d+) requests in", out, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not m or not rps:
        raise MeshaccelError(f"wrk: no request count in output: {out[-400:]!r}")
    res["requests"], res["rps"] = int(m.group(1)), float(rps.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        res["errors"] = sum(int(g) for g in sock.groups())
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non:
        res["non2xx"] = int(non.group(1))
    return res


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if not path:
        raise MeshaccelError("wrk not found: apt-get install -y wrk (scripts/setup.sh)")
    return path


def _in_client(names: topology.Names, argv: list[str], timeout: float) -> str:
    p = processes.run_in_pod(names, "client", argv, timeout)
    if p.returncode:
        name = Path(argv[0]).name
        raise MeshaccelError(f"{name} failed (rc {p.returncode}): {p.stderr.strip()[-400:]}")
    return p.stdout


def run_wrk(names: topology.Names, url: str, connections: int, duration: float) -> dict[str, float]:
    dur = max(1, round(duration))
    argv = [wrk_binary(), "-t", "1", "-c", str(connections), "-d", f"{dur}s", "--latency"]
    return parse_wrk(_in_client(names, [*argv, "--timeout", "5s", url], dur + 30))


def run_open(
    names: topology.Names, url: str, rate: int, connections: int, duration: float
) -> dict[str, float]:
    argv = openloop.argv(url, rate, duration, connections)
    out = openloop.parse(_in_client(names, argv, duration + 30))
    out["requests"] = out["completed"]
    return out


# ---------------------------------------------------------------- CPU


def proc_cpu_s(pid: int) -> tuple[float, float]:
    """(utime+stime, stime) of a process in seconds ((0, 0) if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    user, system = int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    return user + system, system


def cgroup_cpu(cgroup: str) -> tuple[float, float] | None:
    """(total, system) CPU seconds of a cgroup v2 from cpu.stat, or None."""
    try:
        text = Path(cgroup, "cpu.stat").read_text()
    except OSError:
        return None
    stat = dict(line.split() for line in text.splitlines() if len(line.split()) == 2)
    if "usage_usec" not in stat:
        return None
    return int(stat["usage_usec"]) / 1e6, int(stat.get("system_usec", 0)) / 1e6


def cpu_sample(state: processes.LabState) -> dict[str, float]:
    """CPU seconds so far: sidecar (and its kernel part), app, lab and lab kernel."""
    out = dict.fromkeys(CPU_KEYS, 0.0)
    for p in state.procs:
        if not processes.alive(p):
            continue
        total, system = proc_cpu_s(p.pid)
        if p.role == "envoy":
            out["sidecar"] += total
            out["sidecar_sys"] += system
        elif p.role == "app":
            out["app"] += total
    cg = cgroup_cpu(state.names.cgroup)
    if cg is None:  # no cpu.stat: lab PIDs only (the load generator not included)
        out["lab"], out["lab_sys"] = out["sidecar"] + out["app"], out["sidecar_sys"]
    else:
        out["lab"], out["lab_sys"] = cg
    return out


def _counters(state: processes.LabState) -> dict[str, int]:
    if not topology.is_ebpf(state.mode) or not os.path.exists(state.names.bpffs):
        return {}
    return read_counters(state.names.bpffs)


# ---------------------------------------------------------------- one measurement


def measure(
    state: processes.LabState, scenario: str, load: Load, duration: float, rnd: int
) -> Record:
    url = scenario_url(scenario, state.nodes)
    rec = Record(
        state.mode, scenario, load.kind, load.label, load.connections, load.rate, rnd,
        duration, state.nodes,
    )  # fmt: skip
    c0, cpu0 = _counters(state), cpu_sample(state)
    if load.kind == "closed":
        res = run_wrk(state.names, url, load.connections, duration)
    else:
        res = run_open(state.names, url, load.rate, load.connections, duration)
    cpu1, c1 = cpu_sample(state), _counters(state)
    rec.requests, rec.rps = int(res["requests"]), res["rps"]
    rec.p50_ms, rec.p90_ms, rec.p99_ms = res["p50_ms"], res["p90_ms"], res["p99_ms"]
    rec.p999_ms = res.get("p999_ms")
    rec.errors, rec.non2xx = int(res["errors"]), int(res["non2xx"])
    rec.dropped = int(res.get("dropped", 0))
    per_k = 1000 / rec.requests if rec.requests else 0.0
    for key in CPU_KEYS:
        used = cpu1[key] - cpu0[key]
        setattr(rec, f"{key}_cpu_s", used)
        setattr(rec, f"{key}_cpu_per_1k", used * per_k)
    rec.counters = {k: c1[k] - c0.get(k, 0) for k in c1}
    return rec


def scenario_url(scenario: str, nodes: int) -> str:
    return f"http://{topology.pod_ip(SCENARIOS[scenario][0], nodes)}:{topology.APP_PORT}/"


def loads(connections: list[int], rate: int, open_connections: int) -> list[Load]:
    out = [Load("closed", c) for c in connections]
    if rate:
        out.append(Load("open", open_connections, rate))
    return out


def check_args(modes: list[str], scenarios: list[str], nodes: int) -> None:
    for m in modes:
        if m not in topology.MODES:
            raise MeshaccelError(f"--modes {m}: one of {', '.join(topology.MODES)}")
    for s in scenarios:
        if s not in SCENARIOS:
            raise MeshaccelError(f"--scenarios {s}: one of {', '.join(SCENARIOS)}")
    if "echo-cross-node" in scenarios and nodes != 2:
        raise MeshaccelError("--scenarios echo-cross-node needs --nodes 2")
    if not modes or not scenarios:
        raise MeshaccelError("--modes and --scenarios: at least one each")


def run(
    modes: list[str],
    scenarios: list[str],
    load_list: list[Load],
    rounds: int = 3,
    duration: float = 5,
    nodes: int = 1,
    prefix: str | None = None,
    log: Log = lambda _m: None,
    concurrency: int = 1,
    warmup: float = 1,
    ready_timeout: float = 30,
) -> list[Record]:
    """Every round runs every mode (interleaved); the lab is torn down after each mode
    and on any failure."""
    check_args(modes, scenarios, nodes)
    check_root()
    wrk_binary()
    if any(ld.kind == "open" for ld in load_list):
        openloop.binary()  # build it now, not in the middle of a round
    prefix = prefix or topology.default_prefix()
    records: list[Record] = []
    total, step = rounds * len(modes) * len(scenarios) * len(load_list), 0
    t_start = time.monotonic()
    for rnd in range(1, rounds + 1):
        for mode in modes:
            t0 = time.monotonic()
            state = lifecycle.up(mode, concurrency, False, nodes, prefix, timeout=ready_timeout)
            try:
                for scenario in scenarios:
                    run_wrk(state.names, scenario_url(scenario, nodes), 4, warmup)
                for scenario in scenarios:
                    for load in load_list:
                        step += 1
                        rec = measure(state, scenario, load, duration, rnd)
                        records.append(rec)
                        log(_progress_line(rec, step, total, time.monotonic() - t_start))
            finally:
                lifecycle.down(prefix)
            log(f"round {rnd} {mode}: {time.monotonic() - t0:.1f}s incl. lab up/down")
    return records


def _progress_line(rec: Record, step: int, total: int, elapsed: float) -> str:
    left = elapsed / step * (total - step)
    extra = f" dropped {rec.dropped}" if rec.load == "open" else ""
    if topology.is_ebpf(rec.mode):
        extra += f", sk_msg {rec.counters.get('msg_redirected_bytes', 0)} B"
    return (
        f"[{step}/{total}, ~{left:.0f}s left] round {rec.round} {rec.mode:<9} "
        f"{rec.scenario} {rec.label:<8} {rec.rps:9.1f} req/s  p50 {rec.p50_ms:.3f} ms  "
        f"p99 {rec.p99_ms:.3f} ms  errors {rec.errors} non-2xx {rec.non2xx}{extra}"
    )


# ---------------------------------------------------------------- summary


def _key(r: Record | dict) -> tuple[str, str]:
    get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    return get("scenario"), get("label")


def medians(records: list[Record]) -> list[dict]:
    """Median of every metric across rounds, per scenario, load and mode."""
    groups: dict[tuple[str, str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((*_key(r), r.mode), []).append(r)
    out = []
    for (scenario, label, mode), rs in groups.items():
        first = rs[0]
        row: dict = {
            "scenario": scenario, "load": first.load, "label": label,
            "connections": first.connections, "rate": first.rate, "mode": mode,
            "rounds": len(rs),
        }  # fmt: skip
        for key, _ in METRICS:
            values = [getattr(r, key) for r in rs if getattr(r, key, None) is not None]
            row[key] = statistics.median(values) if values else None
        for key in ("errors", "non2xx", "dropped"):
            row[key] = sum(getattr(r, key) for r in rs)
        row["msg_redirected_bytes"] = statistics.median(
            r.counters.get("msg_redirected_bytes", 0) for r in rs
        )
        out.append(row)
    base = {_key(m): m for m in out if m["mode"] == "nomesh"}
    for m in out:
        nomesh = base.get(_key(m))
        m["mesh_added_p50_ms"] = m["p50_ms"] - nomesh["p50_ms"] if nomesh else None
    order = {m: i for i, m in enumerate(topology.MODES)}
    scen = {s: i for i, s in enumerate(SCENARIOS)}
    out.sort(key=lambda m: (scen[m["scenario"]], m["load"], m["connections"], order[m["mode"]]))
    return out


def ratios(meds: list[dict]) -> list[dict]:
    """Each eBPF mode / iptables (its "mode": ebpf, ebpf-apps) per scenario and load, for
    every metric (None where undefined); per scenario and load, ebpf first."""
    out = []
    for m in meds:
        if not topology.is_ebpf(m["mode"]):
            continue
        ipt = next((i for i in meds if i["mode"] == "iptables" and _key(i) == _key(m)), None)
        if ipt is None:
            continue
        row: dict = {k: m[k] for k in ("mode", "scenario", "load", "label", "connections", "rate")}
        for key, _ in METRICS:
            a, b = m.get(key), ipt.get(key)
            row[key] = a / b if a is not None and b else None
        out.append(row)
    return out


def targets(rats: list[dict]) -> list[dict]:
    """The performance targets, judged on the ratios (every eBPF mode and scenario that has
    the load)."""
    out = []
    for metric, kind, op, limit in TARGETS:
        for r in rats:
            if not (r["load"] == "open" if kind == "open" else r["label"] == kind):
                continue
            ratio = r.get(metric)
            met = ratio is not None and (ratio <= limit if op == "<=" else ratio >= limit)
            title = dict(METRICS)[metric].split(" (")[0]
            out.append({
                "name": f"{title}, {r['scenario']} {r['label']}", "mode": r["mode"],
                "scenario": r["scenario"],
                "label": r["label"], "metric": metric, "op": op, "limit": limit,
                "ratio": ratio, "met": met,
            })  # fmt: skip
    return out


def format_tables(meds: list[dict]) -> str:
    """A table per scenario and metric: loads down, modes across, then each eBPF mode /
    iptables (ebpf/iptables, ebpf-apps/iptables)."""
    rats = {(r["mode"], *_key(r)): r for r in ratios(meds)}
    ratio_modes = [m for m in topology.MODES if any(k[0] == m for k in rats)]
    lines: list[str] = []
    for scenario in [s for s in SCENARIOS if any(m["scenario"] == s for m in meds)]:
        rows = [m for m in meds if m["scenario"] == scenario]
        modes = [m for m in topology.MODES if any(r["mode"] == m for r in rows)]
        labels = list(dict.fromkeys(r["label"] for r in rows))
        lines.append(f"== {scenario}: {SCENARIOS[scenario][1]}")
        for key, title in METRICS:
            if all(r.get(key) is None for r in rows):
                continue
            lines.append(f"{title} (median across rounds)")
            head = f"  {'load':>9} " + "".join(f"{m:>11}" for m in modes)
            lines.append(head + "".join(f"  {m}/iptables" for m in ratio_modes))
            for label in labels:
                by = {r["mode"]: r for r in rows if r["label"] == label}
                cells = "".join(f"{_fmt(by.get(m, {}).get(key)):>11}" for m in modes)
                tail = ""
                for m in ratio_modes:
                    ratio = rats.get((m, scenario, label), {}).get(key)
                    cell = "-" if ratio is None else f"{ratio:.2f}x"
                    tail += f"  {cell:>{len(m) + len('/iptables')}}"
                lines.append(f"  {label:>9} {cells}{tail}")
            lines.append("")
    return "\n".join(lines).rstrip()


def format_targets(tgts: list[dict]) -> str:
    modes = list(dict.fromkeys(t.get("mode", "ebpf") for t in tgts))
    lines = [f"performance targets ({', '.join(f'{m} / iptables' for m in modes)})"]
    for t in tgts:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        verdict = "met" if t["met"] else "MISSED"
        mode = f"{t.get('mode', 'ebpf'):<10}" if len(modes) > 1 else ""
        lines.append(
            f"  {mode}{t['name']:<48} {ratio:>7}  target {t['op']} {t['limit']}x  {verdict}"
        )
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.4f}"


def meta(argv: list[str], **settings: object) -> dict:
    try:
        version = subprocess.run(
            [envoy.envoy_binary(), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
        m = re.search(r"/(\d+\.\d+\.\d+)/", version)
        envoy_version = m.group(1) if m else version.strip()[-60:]
    except (MeshaccelError, OSError, subprocess.TimeoutExpired):
        envoy_version = None
    return {
        "command": shlex.join(argv),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "envoy": envoy_version,
        "python": sys.version.split()[0],
        **settings,
    }


def to_json(records: list[Record], meta_info: dict | None = None) -> dict:
    meds = medians(records)
    rats = ratios(meds)
    return {
        "meta": meta_info or {},
        "records": [asdict(r) for r in records],
        "medians": meds,
        "ratios": rats,
        "targets": targets(rats),
    }
