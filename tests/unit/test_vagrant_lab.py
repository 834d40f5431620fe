"""The Vagrant lab's files without Vagrant: the Vagrantfile's settings that keep the lab on
QEMU emulation and user-mode networking only, and the lab's scripts parse."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT = Path(__file__).resolve().parents[2] / "vagrant"
SCRIPTS = ["build-box.sh", "install-host.sh", "lab.sh", "provision.sh"]


@pytest.fixture(scope="module")
def vagrantfile() -> str:
    return (VAGRANT / "Vagrantfile").read_text()


def test_libvirt_with_qemu_emulation(vagrantfile):
    assert 'lv.driver = "qemu"' in vagrantfile
    assert 'lv.uri = "qemu:///system"' in vagrantfile


def test_no_libvirt_network_only_user_mode_with_ssh_on_localhost(vagrantfile):
    code = "\n".join(line for line in vagrantfile.splitlines() if not line.lstrip().startswith("#"))
    assert "lv.mgmt_attach = false" in code
    assert not re.search(r"private_network|public_network|libvirt__network", code)
    netdev = re.search(r'"user,id=labnet,([^"]*)"', code)
    assert netdev, "no user-mode netdev in the qemuargs"
    opts = netdev.group(1).split(",")
    assert "restrict=on" in opts
    assert [o for o in opts if o.startswith("hostfwd=")] == [
        "hostfwd=tcp:127.0.0.1:#{SSH_PORT}-:22"
    ]
    assert 'm.ssh.host = "127.0.0.1"' in code


def test_checkout_synced_by_rsync_without_venv(vagrantfile):
    assert re.search(r'synced_folder CHECKOUT, "/meshaccel", type: "rsync"', vagrantfile)
    assert '".venv/"' in vagrantfile


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses_and_is_strict(name):
    text = (VAGRANT / name).read_text()
    assert "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(VAGRANT / name)], check=True)


def test_provisioning_script_installs_nothing_from_the_network():
    text = (VAGRANT / "provision.sh").read_text()
    assert 'pip" install -q --no-index' in text
    assert "apt-get" not in text


@pytest.mark.skipif(
    shutil.which("ruby") is None and not os.environ.get("CI"),
    reason="ruby not installed (scripts/setup.sh installs it as root)",
)
def test_vagrantfile_is_valid_ruby():
    subprocess.run(["ruby", "-c", str(VAGRANT / "Vagrantfile")], check=True, capture_output=True)
