#!/usr/bin/env python3
"""What the connect hook costs per connect(): ma_connect4's own run time, measured by the
kernel (kernel.bpf_stats_enabled), for two eBPF source trees side by side.

    sudo .venv/bin/python scripts/bench_connect.py [--base REV] [--rounds 5] [--connects 5000]

Each round builds a fresh sandbox per tree, interleaved (base, this checkout, base, ...):
a node, an app pod (10.244.1.10, with a local route 10.77.0.0/24 in its netns, so that
pod_local_routes is not empty where the tree has it) and a destination pod; the datapath
is attached from the tree's bpf/ and the app pod registered. The app (uid 1000) then
calls the destination pod's 10.244.1.20:9080 N times; each call is captured to its
sidecar's 15001 (uid 1337, accepts and closes). Prints ns per run of ma_connect4 per round,
the median per tree and their ratio, as Markdown. Everything is bounded in time and
removed after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshaccel.datapath import loader  # noqa: E402
from meshaccel.datapath.pins import Pins  # noqa: E402
from meshaccel.datapath.programs import PROGRAMS  # noqa: E402
from meshaccel.lab.profiling import bpf_stats  # noqa: E402
from meshaccel.lab.sandbox import Sandbox  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP_IP, DST_IP, PREFIX = "10.244.1.10", "10.244.1.20", "10.77.0.0/24"
CONNECT4 = next(p for p in PROGRAMS if p.func == "ma_connect4")
# the sidecar's outbound listener: accept and close, until killed
SIDECAR = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 15001))
s.listen(4096)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""
# the app: N calls, each connected then closed
APP = """
import socket, sys
n, dst = int(sys.argv[1]), sys.argv[2]
for _ in range(n):
    c = socket.create_connection((dst, 9080), timeout=5)
    c.close()
print("done", flush=True)
"""


def base_tree(rev: str, into: Path) -> Path:
    """bpf/ as it was at rev."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "bpf"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "bpf"


def connect4_stats(bpffs: str) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the sandbox's own ma_connect4."""
    out = subprocess.run(
        ["bpftool", "prog", "show", "pinned", Pins(bpffs).prog(CONNECT4), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    info = json.loads(out.stdout)
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


def one_round(bpf_dir: Path, connects: int, prefix: str) -> float:
    """ns per run of ma_connect4 over `connects` captured calls, on a fresh sandbox."""
    box = Sandbox(prefix)
    try:
        node = box.node()
        app = box.pod("app", node, APP_IP)
        box.pod("dst", node, DST_IP)
        route = box.spawn(["ip", "route", "add", "local", PREFIX, "dev", "lo"], netns=app)
        if route.wait(10) != 0:
            raise SystemExit(f"bench_connect: ip route add failed: {route.stderr.read()}")
        cg = box.cgroup()
        bpffs = box.attach(cg, pods=(app,), bpf_dir=bpf_dir)
        sidecar = box.spawn([sys.executable, "-c", SIDECAR], netns=app, cgroup=cg, uid=1337)
        if sidecar.stdout.readline().strip() != "ready":
            raise SystemExit(f"bench_connect: the sidecar did not start: {sidecar.stderr.read()}")
        t0, n0 = connect4_stats(bpffs)
        caller = box.spawn(
            [sys.executable, "-c", APP, str(connects), DST_IP], netns=app, cgroup=cg, uid=1000
        )
        out, err = caller.communicate(timeout=120)
        if caller.returncode != 0 or out.strip() != "done":
            raise SystemExit(f"bench_connect: the app's calls failed: {err.strip()}")
        t1, n1 = connect4_stats(bpffs)
        if n1 - n0 < connects:
            raise SystemExit(f"bench_connect: ma_connect4 ran {n1 - n0} times for {connects}")
        loader.detach(bpffs=bpffs)
        return (t1 - t0) / (n1 - n0)
    finally:
        box.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD~1", help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connects", type=int, default=5000, help="calls per round and tree")
    ap.add_argument("--prefix", default=f"ma-bc{os.getpid() % 10000}", help="names' prefix")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_connect: needs root (netns, cgroups, the datapath, bpf_stats)")
    with bpf_stats(), tempfile.TemporaryDirectory(prefix="ma-bc-") as tmp:
        trees = {args.base: base_tree(args.base, Path(tmp)), "this checkout": ROOT / "bpf"}
        runs: dict[str, list[float]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for i, (name, bpf_dir) in enumerate(trees.items()):
                ns = one_round(bpf_dir, args.connects, f"{args.prefix}-{r}{i}")
                runs[name].append(ns)
                print(f"round {r + 1}/{args.rounds} {name}: {ns:.0f} ns", file=sys.stderr)
    medians = {name: statistics.median(v) for name, v in runs.items()}
    base, this = medians[args.base], medians["this checkout"]
    runs_head = f"ma_connect4 ns per run ({args.connects} calls, {args.rounds} rounds)"
    print(f"| tree | {runs_head} | median |")
    print("|---|---|---|")
    for name, values in runs.items():
        print(f"| {name} | {', '.join(f'{v:.0f}' for v in values)} | {medians[name]:.0f} |")
    print(f"\nthis checkout / {args.base}: {this / base:.2f}× ({this - base:+.0f} ns per connect)")


if __name__ == "__main__":
    main()
