#!/usr/bin/env bash
# Boots a Debian image of SUITE on its own kernel under QEMU emulation (TCG, 1 vCPU: this
# machine's /dev/kvm cannot run stock Debian kernels), with this checkout shared
# read-only at /src, runs COMMAND there as root, prints the console as it goes and exits
# with COMMAND's exit code:
#
#   vagrant/run-in-vm.sh [--timeout SECS] [--mem MIB] [--src DIR] [--keep] [--out DIR] IMAGE -- COMMAND...
#   e.g. vagrant/run-in-vm.sh bookworm -- python3 vagrant/load-check.py
#
# IMAGE is what vagrant/build-image.sh builds: a codename (bookworm) or CODENAME-ABI
# (bookworm-6.1.0-47). --out DIR copies the run directory (cmd, rc, output.log,
# console.log, and whatever COMMAND wrote under /run/ma in the guest) to DIR at the end,
# also after a timeout.
# --src shares DIR (e.g. a `git archive` of another commit) at /src instead of this checkout.
# The image comes from vagrant/build-image.sh (built or reused from the cache first).
# Its root filesystem is booted with -snapshot, so nothing a run does stays. COMMAND runs
# under bash in /src with PYTHONPATH=/src, bpffs at /sys/fs/bpf and cgroup v2 at
# /sys/fs/cgroup; the guest has no network. Its output and exit code also land in the
# run directory (kept with --keep, else removed). The VM is killed after --timeout
# seconds (default 1200; boot takes well under a minute), and then this exits 124.
set -euo pipefail

say() { printf '[run-in-vm] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

TIMEOUT=1200
MEM=2048
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) TIMEOUT=$2; shift ;;
    --mem) MEM=$2; shift ;;
    --src) SRC_OPT=$2; shift ;;
    --keep) KEEP=1 ;;
    --out) OUT_OPT=$2; shift ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1" ;;
    *) [ -z "${SUITE:-}" ] || die "one SUITE only (got $SUITE and $1)"; SUITE=$1 ;;
  esac
  shift
done
[ -n "${SUITE:-}" ] && [ $# -gt 0 ] || die "usage: $0 [--timeout SECS] [--mem MIB] [--src DIR] [--keep] [--out DIR] IMAGE -- COMMAND..."
[[ $TIMEOUT =~ ^[0-9]+$ ]] && [[ $MEM =~ ^[0-9]+$ ]] || die "--timeout and --mem take numbers"

HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "${SRC_OPT:-$HERE/..}" && pwd)
CACHE=${MESHACCEL_VM_CACHE:-/var/cache/meshaccel-vm}
IMG=$CACHE/$SUITE

t0=$(date +%s)
"$HERE/build-image.sh" "$SUITE"
say "image checked in $(($(date +%s) - t0))s"

RUN=$(mktemp -d "$CACHE/run-$SUITE.XXXXXX")
QPID=
cleanup() {
  if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
    say "stopping the VM (pid $QPID)"
    kill "$QPID" 2>/dev/null || true
    sleep 2
    kill -9 "$QPID" 2>/dev/null || true
  fi
  if [ -n "${OUT_OPT:-}" ]; then
    mkdir -p "$OUT_OPT" && cp -a "$RUN/." "$OUT_OPT/" || say "could not copy the run directory to $OUT_OPT"
  fi
  if [ "$KEEP" = 1 ]; then say "run directory kept: $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

{
  echo "export PYTHONPATH=/src"
  printf '%q ' "$@"
  echo
} >"$RUN/cmd"

say "sharing $SRC read-only at /src"
say "booting $SUITE (kernel $(cat "$IMG/kernel-release")) under TCG: 1 vCPU, $MEM MiB, timeout ${TIMEOUT}s"
t1=$(date +%s)
: >"$RUN/console.log"
qemu-system-x86_64 \
  -machine pc -accel tcg -cpu max -smp 1 -m "$MEM" \
  -display none -monitor none -serial "file:$RUN/console.log" -nic none -no-reboot \
  -pidfile "$RUN/qemu.pid" \
  -kernel "$IMG/vmlinuz" -initrd "$IMG/initrd.img" \
  -append "console=ttyS0 root=/dev/vda rw init=/usr/local/sbin/ma-init quiet loglevel=3 panic=-1" \
  -drive "file=$IMG/rootfs.ext4,format=raw,if=virtio,snapshot=on" \
  -virtfs "local,path=$SRC,mount_tag=src,security_model=none,readonly=on" \
  -virtfs "local,path=$RUN,mount_tag=run,security_model=none" \
  </dev/null >"$RUN/qemu.log" 2>&1 &
QPID=$!

# the console, as it comes (serial output has CRLF line ends)
tail -n +1 -F --pid="$QPID" "$RUN/console.log" 2>/dev/null | sed -u 's/\r$//; s/^/[vm] /' &
deadline=$((t1 + TIMEOUT))
while kill -0 "$QPID" 2>/dev/null; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    say "timeout: no power-off after ${TIMEOUT}s, killing the VM"
    kill "$QPID" 2>/dev/null || true
    sleep 2
    kill -9 "$QPID" 2>/dev/null || true
    wait "$QPID" 2>/dev/null || true
    QPID=
    exit 124
  fi
  sleep 1
done
wait "$QPID" 2>/dev/null || true
QPID=
sleep 1 # let tail print the last lines
if [ -s "$RUN/qemu.log" ]; then sed 's/^/[qemu] /' "$RUN/qemu.log" >&2; fi
if [ ! -f "$RUN/rc" ]; then
  say "the VM stopped after $(($(date +%s) - t1))s without an exit code from COMMAND (see the console above)"
  exit 125
fi
rc=$(cat "$RUN/rc")
say "VM ran $(($(date +%s) - t1))s in all (boot + COMMAND + power-off); COMMAND exited $rc"
exit "$rc"
