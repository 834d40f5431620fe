"""The smoke run on Debian 12's own kernel: a VM booted on bookworm's newest 6.1 under QEMU
emulation (vagrant/run-in-vm.sh; image built by vagrant/build-image.sh on first use and
cached) runs `meshaccel doctor` and a few kernel test files against this checkout.

It proves on every CI run that the programs pass 6.1's verifier and that the datapath
captures and redirects there (the full suite per kernel: python3 vagrant/matrix.py, see
COMPATIBILITY.md). About 5 minutes, more when the image is built. MESHACCEL_VM_SMOKE=0
skips it on a developer's machine; in CI it always runs."""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "bookworm"  # Debian 12, its newest 6.1 kernel
TESTS = "tests/kernel/test_layout.py tests/kernel/test_redirect.py"
LIMIT = 900  # seconds the VM may run before it is killed


@pytest.mark.skipif(
    os.environ.get("MESHACCEL_VM_SMOKE") == "0" and not os.environ.get("CI"),
    reason="MESHACCEL_VM_SMOKE=0",
)
def test_debian_12_kernel_passes_doctor_and_the_datapath_tests(tmp_path):
    out = tmp_path / "vm"
    guest = (
        "vagrant/matrix-step.sh doctor /run/ma/out && "
        f"MATRIX_KERNEL_TESTS='{TESTS}' vagrant/matrix-step.sh kernel /run/ma/out"
    )
    p = subprocess.run(
        [str(ROOT / "vagrant/run-in-vm.sh"), "--timeout", str(LIMIT), "--out", str(out), IMAGE,
         "--", "bash", "-c", guest],
        cwd=ROOT, capture_output=True, text=True, timeout=LIMIT + 900,
    )  # fmt: skip
    tail = (p.stdout + p.stderr)[-3000:]
    assert p.returncode == 0, f"run-in-vm.sh exited {p.returncode}: {tail}"
    results = out / "out"
    assert (results / "uname.txt").read_text().startswith("6.1."), tail

    assert (results / "doctor.rc").read_text().strip() == "0", tail
    doctor = json.loads((results / "doctor.json").read_text())
    failed = [c for c in doctor["checks"] if c["required"] and not c["ok"]]
    assert failed == [], failed

    assert (results / "kernel.rc").read_text().strip() == "0", tail
    suite = ET.parse(results / "kernel.xml").getroot().find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] >= 10 and counts["failures"] == counts["errors"] == 0, counts
    assert counts["skipped"] == 0, counts
