#!/usr/bin/env python3
"""Where the time goes: the lab under the same closed-loop load in each mode, profiled.

    sudo .venv/bin/python scripts/profile_lab.py [--scenario bookinfo] [--duration 8]

Per mode (nomesh, iptables, ebpf; each on a fresh lab): warm up, then run wrk from the
client pod while `perf record -e cpu-clock -a` samples every CPU (this VM has no hardware
counters), with kernel.bpf_stats_enabled=1 so the kernel times our BPF programs, and the
sidecars' Envoy stats read before and after. Prints a Markdown report: CPU per 1,000
requests by process (Envoy, apps, wrk) split into user and kernel, the kernel part split
by what it does (TCP/IP, netfilter, sockmap and BPF, wakeups and context switches,
syscalls and epoll, memory), the BPF programs' own run time, and Envoy's connection
reuse. perf's CPU shares are samples, so the numbers are estimates (+-5% at 8 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshaccel.lab import bench, lifecycle, processes  # noqa: E402
from meshaccel.lab.profiling import bpf_stats  # noqa: E402

HZ = 1999  # perf sampling frequency per CPU
# Kernel symbols by what they do; the first matching pattern wins.
KERNEL_BUCKETS: tuple[tuple[str, str], ...] = (
    (
        "sockmap, sk_msg and BPF",
        r"^(tcp_bpf|sk_msg|__sk_msg|sk_psock|sock_hash|sock_map|bpf|__bpf"
        r"|__cgroup_bpf|__htab|htab_|lookup_nulls)",
    ),
    ("netfilter and conntrack", r"^(nf_|__nf_|ipt_|nft_|iptable_|hash_conntrack|ct_)"),
    (
        "TCP/IP, veth, bridge, softirq",
        r"^(tcp|__tcp|ip_|__ip|ipv4|inet|__inet|skb|__skb|kfree_skb"
        r"|consume_skb|dev_|__dev|netif|__netif|net_rx|napi|__napi|veth|br_|eth_|fib|__fib|dst_"
        r"|neigh|loopback|process_backlog|handle_softirqs|__local_bh|sk_|__sk_|sock_def|raw_v4"
        r"|validate_xmit|__netdev|netdev|tcp4|lock_sock|release_sock|__release_sock)",
    ),
    (
        "wakeups and context switches",
        r"(sched|switch|wake|_raw_spin_unlock_irq|enqueue|dequeue"
        r"|pick_next|update_curr|update_load|psi_|ttwu|select_task|__smp_call|call_function"
        r"|hrtimer|tick|rseq|idle)",
    ),
    (
        "syscalls, epoll, VFS, copies",
        r"(syscall|entry_|epoll|^ep_|fdget|fput|vfs_|^__sys_"
        r"|^sys_|sock_poll|tcp_poll|copy|iov|import_|rw_verify|exit_to_user|irqentry|sock_"
        r"|__sock|sockfd|security_|apparmor|fsnotify|__fget|clock_gettime|ktime)",
    ),
    (
        "memory",
        r"(kmem_cache|kfree|kmalloc|__kmalloc|page|mas_|mm_|vma|memcg|slab|alloc"
        r"|__free|free_|mmap|unmap|rcu)",
    ),
)
ROLES = (  # comm -> who; Envoy names its worker threads "wrk:worker_N"
    ("envoy", r"^(envoy|wrk:worker|dog:|grpc_global|memfd:)"),
    ("apps and agent (python)", r"^python"),
    ("load generator (wrk)", r"^wrk$"),
    ("idle", r"^swapper"),
)
EVENTS = {  # counted on the whole machine by perf stat
    "raw_syscalls:sys_enter": "syscalls per request",
    "context-switches": "context switches per request",
}
ENVOY_STATS = (
    "http.outbound.downstream_rq_total",
    "http.inbound.downstream_rq_total",
    "cluster.PassthroughCluster.upstream_cx_total",
    "cluster.InboundPassthroughCluster.upstream_cx_total",
)


def role(comm: str) -> str:
    return next((r for r, pat in ROLES if re.search(pat, comm)), "other")


def bucket(sym: str) -> str:
    return next((b for b, pat in KERNEL_BUCKETS if re.search(pat, sym)), "other kernel")


def perf_samples(data: str) -> list[tuple[int, str, bool, str]]:
    """(samples, comm, kernel?, symbol) rows of a perf.data file."""
    out = subprocess.run(
        ["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
         "--sort", "comm,dso,sym", "-F", "sample,comm,dso,sym", "-t", "|"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if line.startswith("#") or len(parts) != 4 or not parts[0].isdigit():
            continue
        n, comm, dso, sym = parts
        kernel = sym.startswith("[k]")
        rows.append((int(n), comm, kernel, sym[4:] if kernel or sym.startswith("[.]") else sym))
    return rows


def perf_stat(out: str) -> dict[str, int]:
    """event -> count from `perf stat -x ,` output."""
    counts = {}
    for line in out.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].replace(".", "").isdigit():
            counts[fields[2]] = int(float(fields[0]))
    return counts


def bpf_prog_stats() -> dict[str, tuple[int, int]]:
    """name -> (run_time_ns, run_cnt) of our (ma_) programs."""
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True)
    stats: dict[str, tuple[int, int]] = defaultdict(lambda: (0, 0))
    for p in json.loads(out.stdout or "[]"):
        name = p.get("name", "")
        if name.startswith("ma_"):
            t, c = stats[name]
            stats[name] = (t + p.get("run_time_ns", 0), c + p.get("run_cnt", 0))
    return dict(stats)


def envoy_stats(state: processes.LabState) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for name in {p.pod for p in state.procs if p.role == "envoy"}:
        code, body = lifecycle.admin_get(state.names.pod(name), "/stats?format=json")
        if code != 200:
            continue
        for s in json.loads(body).get("stats", []):
            if s.get("name") in ENVOY_STATS:
                total[s["name"]] += int(s.get("value", 0))
    return dict(total)


def profile(mode: str, scenario: str, duration: int, prefix: str, tmp: str) -> dict:
    state = lifecycle.up(mode, 1, False, 1, prefix)
    try:
        url = bench.scenario_url(scenario, 1)
        bench.run_wrk(state.names, url, 1, 2)
        data = f"{tmp}/perf-{mode}.data"
        s0, b0 = envoy_stats(state), bpf_prog_stats()
        perf = subprocess.Popen(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(HZ), "-a", "-o", data,
             "--", "sleep", str(duration)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        counts = subprocess.Popen(
            ["perf", "stat", "-a", "-x", ",", "-e", ",".join(EVENTS), "--", "sleep", str(duration)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        res = bench.run_wrk(state.names, url, 1, duration)
        perf.wait()
        events = perf_stat(counts.communicate()[1])
        s1, b1 = envoy_stats(state), bpf_prog_stats()
    finally:
        lifecycle.down(prefix)
    return {
        "requests": res["requests"], "rps": res["rps"], "p50_ms": res["p50_ms"],
        "samples": perf_samples(data),
        "events": events,
        "envoy": {k: s1.get(k, 0) - s0.get(k, 0) for k in ENVOY_STATS},
        "bpf": {k: (v[0] - b0.get(k, (0, 0))[0], v[1] - b0.get(k, (0, 0))[1])
                for k, v in b1.items()},
    }  # fmt: skip


def per_1k(samples: float, requests: int) -> float:
    """CPU milliseconds per 1,000 requests (wrk ran for the whole perf window)."""
    return samples / HZ * 1000 / requests * 1000


def report(results: dict[str, dict], scenario: str, duration: int) -> str:
    modes = list(results)
    out = [
        f"### {scenario}, wrk 1 connection, {duration} s per mode",
        "",
        "| | " + " | ".join(modes) + " |",
        "|---|" + "---:|" * len(modes),
        "| requests/s | " + " | ".join(f"{results[m]['rps']:.0f}" for m in modes) + " |",
        "| p50 (ms) | " + " | ".join(f"{results[m]['p50_ms']:.3f}" for m in modes) + " |",
    ]
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for m in modes:
        agg: dict[str, float] = defaultdict(float)
        for n, comm, kernel, sym in results[m]["samples"]:
            who = role(comm)
            if who == "idle":
                continue
            agg[f"{who}: {'kernel' if kernel else 'user'}"] += n
            if kernel:
                agg[f"kernel: {bucket(sym)}"] += n
                agg["kernel: all"] += n
            agg["all CPU (not idle)"] += n
        for k, v in agg.items():
            table[k][m] = per_1k(v, results[m]["requests"])
    for ev, title in EVENTS.items():
        cells = [f"{results[m]['events'].get(ev, 0) / results[m]['requests']:.1f}" for m in modes]
        out.append(f"| {title} (whole machine) | " + " | ".join(cells) + " |")
    out.append("| **CPU ms per 1k requests (perf samples)** |" + " |" * len(modes))
    for k in sorted(table, key=lambda k: (not k.startswith("all"), k.startswith("kernel"), k)):
        out.append(f"| {k} | " + " | ".join(f"{table[k].get(m, 0):.0f}" for m in modes) + " |")
    out.append("| **BPF programs (bpf_stats): ns per request** |" + " |" * len(modes))
    progs = sorted({p for m in modes for p in results[m]["bpf"]})
    for p in progs:
        cells = []
        for m in modes:
            t, c = results[m]["bpf"].get(p, (0, 0))
            cells.append(
                f"{t / results[m]['requests']:.0f} ({c / results[m]['requests']:.1f} runs)"
                if c
                else ""
            )
        out.append(f"| {p} | " + " | ".join(cells) + " |")
    out.append("| **Envoy stats per request** |" + " |" * len(modes))
    for k in ENVOY_STATS:
        cells = [f"{results[m]['envoy'].get(k, 0) / results[m]['requests']:.3f}" for m in modes]
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="bookinfo", choices=["bookinfo", "echo"])
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--modes", default="nomesh,iptables,ebpf")
    ap.add_argument("--prefix", default="ma-prof-")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("profile_lab: needs root (the lab, perf -a, kernel.bpf_stats_enabled)")
    if not shutil.which("perf") or not shutil.which("bpftool"):
        sys.exit("profile_lab: needs perf and bpftool (apt-get install linux-perf bpftool)")
    with bpf_stats(), tempfile.TemporaryDirectory(prefix="ma-prof-") as tmp:
        results = {}
        for mode in args.modes.split(","):
            print(f"profiling {mode} ...", file=sys.stderr, flush=True)
            results[mode] = profile(mode, args.scenario, args.duration, args.prefix, tmp)
    print(report(results, args.scenario, args.duration))


if __name__ == "__main__":
    main()
