"""`meshaccel bench`: the lab's three modes side by side under a closed-loop `wrk` load.

For each round, for each mode in turn (A B C A B C ...): bring the lab up in that mode,
warm up, then for each connection count run `wrk -t 1 -c C -d D --latency` from inside the
client pod (its netns and the lab cgroup, so it is captured like any app) against
productpage; record requests/s, p50/p90/p99, socket errors and non-2xx responses, CPU
seconds of the sidecars (utime+stime of the Envoy PIDs) and of the whole lab (cgroup
cpu.stat, wrk included) per 1,000 requests and, in ebpf mode, the datapath counter deltas
that prove the kernel path; then tear the lab down.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from meshaccel import lab, loader, pods
from meshaccel.errors import MeshaccelError

Log = Callable[[str], None]
CLK_TCK = os.sysconf("SC_CLK_TCK")
METRICS: tuple[tuple[str, str], ...] = (
    ("rps", "requests/s"),
    ("p50_ms", "p50 latency (ms)"),
    ("p90_ms", "p90 latency (ms)"),
    ("p99_ms", "p99 latency (ms)"),
    ("sidecar_cpu_per_1k", "sidecar CPU s per 1k requests"),
    ("lab_cpu_per_1k", "lab CPU s per 1k requests"),
    ("lab_sys_cpu_per_1k", "lab kernel CPU s per 1k requests"),
)
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


@dataclass
class Record:
    mode: str
    round: int
    connections: int
    duration: float
    nodes: int
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0  # wrk socket errors (connect, read, write, timeout)
    non2xx: int = 0
    sidecar_cpu_s: float = 0.0
    lab_cpu_s: float = 0.0
    lab_sys_cpu_s: float = 0.0
    sidecar_cpu_per_1k: float = 0.0
    lab_cpu_per_1k: float = 0.0
    lab_sys_cpu_per_1k: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)  # ebpf: datapath deltas


# ---------------------------------------------------------------- wrk


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


def run_wrk(
    names: lab.Names, url: str, connections: int, duration: float, pod: str = "client"
) -> str:
    """wrk from pod's netns, in the lab cgroup (entered first, then setns, then exec)."""
    cg = names.cgroup if os.path.isdir(names.cgroup) else None
    fd = os.open(os.path.join(lab.NETNS_DIR, names.pod(pod)), os.O_RDONLY | os.O_CLOEXEC)

    def enter() -> None:
        if cg:
            Path(cg, "cgroup.procs").write_text(str(os.getpid()))
        if pods._libc.setns(fd, pods.CLONE_NEWNET) != 0:
            raise OSError("setns failed")

    dur = max(1, round(duration))
    argv = [wrk_binary(), "-t", "1", "-c", str(connections), "-d", f"{dur}s", "--latency"]
    argv += ["--timeout", "5s", url]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, preexec_fn=enter, timeout=dur + 30)
    except subprocess.TimeoutExpired:
        raise MeshaccelError(f"wrk did not finish within {dur + 30}s") from None
    finally:
        os.close(fd)
    if p.returncode:
        raise MeshaccelError(f"wrk failed (rc {p.returncode}): {p.stderr.strip()[-400:]}")
    return p.stdout


# ---------------------------------------------------------------- CPU


def proc_cpu_s(pid: int) -> float:
    """utime+stime of a process in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


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


def _cpu_sample(state: lab.State) -> tuple[float, float, float]:
    """(sidecar, lab, lab system) CPU seconds now."""
    sidecar = sum(proc_cpu_s(p.pid) for p in state.procs if p.role == "envoy" and lab.alive(p))
    cg = cgroup_cpu(state.names.cgroup)
    if cg is None:  # no cpu.stat: all lab PIDs (wrk not included), system CPU unknown
        total = sum(proc_cpu_s(p.pid) for p in state.procs if lab.alive(p))
        return sidecar, total, 0.0
    return sidecar, cg[0], cg[1]


def _counters(state: lab.State) -> dict[str, int]:
    if state.mode != "ebpf" or not os.path.exists(state.names.bpffs):
        return {}
    return loader.read_counters(state.names.bpffs)


# ---------------------------------------------------------------- one measurement


def measure(state: lab.State, url: str, connections: int, duration: float, rnd: int) -> Record:
    rec = Record(state.mode, rnd, connections, duration, state.nodes)
    c0, cpu0 = _counters(state), _cpu_sample(state)
    out = run_wrk(state.names, url, connections, duration)
    cpu1, c1 = _cpu_sample(state), _counters(state)
    w = parse_wrk(out)
    rec.requests, rec.rps = int(w["requests"]), w["rps"]
    rec.p50_ms, rec.p90_ms, rec.p99_ms = w["p50_ms"], w["p90_ms"], w["p99_ms"]
    rec.errors, rec.non2xx = int(w["errors"]), int(w["non2xx"])
    rec.sidecar_cpu_s, rec.lab_cpu_s, rec.lab_sys_cpu_s = (
        b - a for a, b in zip(cpu0, cpu1, strict=True)
    )
    per_k = 1000 / rec.requests if rec.requests else 0.0
    rec.sidecar_cpu_per_1k = rec.sidecar_cpu_s * per_k
    rec.lab_cpu_per_1k = rec.lab_cpu_s * per_k
    rec.lab_sys_cpu_per_1k = rec.lab_sys_cpu_s * per_k
    rec.counters = {k: c1[k] - c0.get(k, 0) for k in c1}
    return rec


def _warm_up(state: lab.State, url: str) -> None:
    run_wrk(state.names, url, 1, 1)


def run(
    modes: list[str],
    rounds: int = 3,
    duration: float = 5,
    connections: list[int] | None = None,
    nodes: int = 1,
    prefix: str | None = None,
    log: Log = lambda _m: None,
    concurrency: int = 1,
) -> list[Record]:
    """Every round runs every mode (interleaved); the lab is torn down after each mode
    and on any failure."""
    for m in modes:
        if m not in lab.MODES:
            raise MeshaccelError(f"--modes {m}: one of {', '.join(lab.MODES)}")
    conns = connections or [1, 16]
    wrk_binary()
    prefix = prefix or lab.default_prefix()
    url = f"http://{lab.pod_ip('productpage', nodes)}:{lab.APP_PORT}/"
    records: list[Record] = []
    total, step = rounds * len(modes) * len(conns), 0
    for rnd in range(1, rounds + 1):
        for mode in modes:
            t0 = time.monotonic()
            state = lab.up(mode, concurrency, False, nodes, prefix)
            try:
                _warm_up(state, url)
                for c in conns:
                    step += 1
                    rec = measure(state, url, c, duration, rnd)
                    records.append(rec)
                    extra = ""
                    if mode == "ebpf":
                        extra = f", redirected {rec.counters.get('msg_redirected_bytes', 0)} B"
                    log(
                        f"[{step}/{total}] round {rnd} {mode:<8} c={c:<3} "
                        f"{rec.rps:9.1f} req/s  p50 {rec.p50_ms:.3f} ms  p99 {rec.p99_ms:.3f} ms"
                        f"  errors {rec.errors} non-2xx {rec.non2xx}{extra}"
                    )
            finally:
                lab.down(prefix)
            log(f"round {rnd} {mode}: {time.monotonic() - t0:.1f}s incl. lab up/down")
    return records


# ---------------------------------------------------------------- summary


def medians(records: list[Record]) -> list[dict]:
    """Median of every metric across rounds, per mode and connection count."""
    keys = sorted({(r.mode, r.connections) for r in records}, key=lambda k: (k[1], k[0]))
    out = []
    for mode, c in keys:
        rs = [r for r in records if r.mode == mode and r.connections == c]
        row: dict = {"mode": mode, "connections": c, "rounds": len(rs)}
        for key, _ in METRICS:
            row[key] = statistics.median(getattr(r, key) for r in rs)
        row["errors"] = sum(r.errors for r in rs)
        row["non2xx"] = sum(r.non2xx for r in rs)
        if mode == "ebpf":
            row["msg_redirected_bytes"] = statistics.median(
                r.counters.get("msg_redirected_bytes", 0) for r in rs
            )
        out.append(row)
    base = {m["connections"]: m for m in out if m["mode"] == "nomesh"}
    for m in out:
        if m["connections"] in base:
            m["mesh_added_p50_ms"] = m["p50_ms"] - base[m["connections"]]["p50_ms"]
    return out


def ratios(meds: list[dict]) -> dict[int, dict[str, float | None]]:
    """ebpf / iptables per connection count, for every metric and the mesh-added p50."""
    out: dict[int, dict[str, float | None]] = {}
    for c in sorted({m["connections"] for m in meds}):
        by = {m["mode"]: m for m in meds if m["connections"] == c}
        if "ebpf" not in by or "iptables" not in by:
            continue
        row: dict[str, float | None] = {}
        for key in [k for k, _ in METRICS] + ["mesh_added_p50_ms"]:
            a, b = by["ebpf"].get(key), by["iptables"].get(key)
            row[key] = a / b if a is not None and b else None
        out[c] = row
    return out


def format_tables(meds: list[dict]) -> str:
    modes = [m for m in lab.MODES if any(r["mode"] == m for r in meds)]
    conns = sorted({r["connections"] for r in meds})
    rat = ratios(meds)
    metrics = [*METRICS, ("mesh_added_p50_ms", "mesh-added p50 latency (ms, mode - nomesh)")]
    lines: list[str] = []
    for key, title in metrics:
        lines.append(f"{title} (median across rounds)")
        head = f"  {'conns':>5} " + "".join(f"{m:>12}" for m in modes)
        lines.append(head + ("  ebpf/iptables" if rat else ""))
        for c in conns:
            by = {r["mode"]: r for r in meds if r["connections"] == c}
            cells = ""
            for m in modes:
                v = by.get(m, {}).get(key)
                cells += f"{_fmt(v):>12}"
            ratio = rat.get(c, {}).get(key)
            tail = (
                f"  {ratio:13.2f}x" if ratio is not None else ("  " + "-".rjust(13) if rat else "")
            )
            lines.append(f"  {c:>5} {cells}{tail}")
        lines.append("")
    bad = [r for r in meds if r["errors"] or r["non2xx"]]
    for r in bad:
        lines.append(
            f"WARNING: {r['mode']} c={r['connections']}: {r['errors']} socket errors, "
            f"{r['non2xx']} non-2xx"
        )
    for r in meds:
        if r["mode"] == "ebpf" and not r.get("msg_redirected_bytes"):
            lines.append(f"WARNING: ebpf c={r['connections']}: no bytes took the sk_msg path")
    return "\n".join(lines).rstrip()


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.4f}"


def to_json(records: list[Record]) -> dict:
    meds = medians(records)
    return {
        "records": [asdict(r) for r in records],
        "medians": meds,
        "ratios_ebpf_over_iptables": {str(c): r for c, r in ratios(meds).items()},
    }
