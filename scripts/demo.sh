#!/usr/bin/env bash
# The one-command demo: install what is missing, bring the lab up in ebpf mode and show
# it working, then a short bench of bookinfo in all three modes (nomesh, iptables, ebpf;
# about 2 minutes on 2 cores), print the tables and write results.json, report.md and
# PNG plots into the directory given (default ./demo-results). The lab is torn down at
# the end, also when something fails or on Ctrl-C.
#   sudo scripts/demo.sh [OUT_DIR]
# MESHACCEL_DEMO_ROUNDS and MESHACCEL_DEMO_DURATION (seconds per run) shorten it (tests).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo-results}
PREFIX=${MESHACCEL_LAB_PREFIX:-ma-demo-}
ROUNDS=${MESHACCEL_DEMO_ROUNDS:-2}
DURATION=${MESHACCEL_DEMO_DURATION:-5}
if [ "$(id -u)" != 0 ]; then
  echo "demo.sh: needs root (network namespaces, cgroups, eBPF): sudo $0 $*" >&2
  exit 1
fi
say() { printf '\n== %s\n' "$*" >&2; }
started=$SECONDS

say "setup: packages, kernel headers, bpffs, .venv (skipped when present)"
scripts/setup.sh
M=(.venv/bin/meshaccel)
"${M[@]}" doctor
trap '"${M[@]}" lab --prefix "$PREFIX" down >/dev/null 2>&1 || true' EXIT
"${M[@]}" lab --prefix "$PREFIX" down >/dev/null  # what a crashed earlier run left

say "lab up: bookinfo + client + echo on 1 node, Envoy sidecars, meshaccel datapath"
"${M[@]}" lab --prefix "$PREFIX" up --mode ebpf --nodes 1
"${M[@]}" lab --prefix "$PREFIX" status
"${M[@]}" lab --prefix "$PREFIX" down

say "bench: nomesh, iptables, ebpf interleaved; bookinfo; c=1, c=16 and 1000 requests/s"
"${M[@]}" bench --prefix "$PREFIX" --scenarios bookinfo --connections 1,16 --rate 1000 \
  --rounds "$ROUNDS" --duration "$DURATION" --out "$OUT"

say "done in $((SECONDS - started))s: $OUT/report.md, $OUT/latency.png, $OUT/rps.png, $OUT/cpu.png"
