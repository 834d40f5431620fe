#!/usr/bin/env bash
# Inside the VM (vagrant/run-in-vm.sh SUITE -- vagrant/guest-kernel-tests.sh [PYTEST ARGS]):
# runs the kernel test suite on the guest's own kernel with Debian's Python packages
# (the image has no network, so no pip). The checkout at /src is read-only: no pytest
# cache, no bytecode, and the `meshaccel` command the tests call beside sys.executable
# is a small wrapper in a venv made here rather than an installed entry point.
set -euo pipefail
cd /src
venv=/tmp/meshaccel-venv
/usr/bin/python3 -m venv --system-site-packages --without-pip "$venv"
cat >"$venv/bin/meshaccel" <<EOF
#!$venv/bin/python
import sys
sys.path.insert(0, "/src")
from meshaccel.cli import main
sys.exit(main())
EOF
chmod 755 "$venv/bin/meshaccel"
"$venv/bin/python" - <<'EOF'
import importlib

for name in ("bcc", "pytest", "pyroute2", "click", "yaml", "psutil", "prometheus_client", "kubernetes", "aiohttp"):
    mod = importlib.import_module(name)
    print(f"{name} {getattr(mod, '__version__', '?')}")
EOF
# A node running Istio has nf_conntrack loaded (istio-init's nat rules need it), and the
# tests expect its answers (SO_ORIGINAL_DST on an unknown connection: ENOENT; without the
# module the kernel says ENOPROTOOPT). A fresh VM has loaded nothing yet.
modprobe nf_conntrack
# (CI=true: a missing dependency fails, never skips. No time budget: the suite's 30 min
# are the CI machine's, and one emulated vCPU runs it several times slower)
export CI=true PYTHONPATH=/src PYTHONDONTWRITEBYTECODE=1 MESHACCEL_TEST_BUDGET_S=0
exec "$venv/bin/python" -m pytest -p no:cacheprovider "${@:-tests/kernel}"
