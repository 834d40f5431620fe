"""End-to-end tests: real Envoy as the sidecar of a lab pod. They share the kernel tests'
requirements and hook (CI=true: a missing piece fails; elsewhere: skipped, saying why)."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshaccel.lab import lifecycle
from tests.kernel.conftest import (  # noqa: F401 - fixtures and the hook, shared
    _sweep_dead_sandboxes,
    lab,
    pytest_runtest_setup,
)
from tests.kernel.lab import LAB_PREFIX, Lab, lab_prefix, missing_requirement

_base_ids = itertools.count()
_lab_ids = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def _sweep_dead_labs() -> None:
    """Labs an earlier run killed mid-test left (Envoys, netns, an attached datapath)."""
    if missing_requirement() is None:
        lifecycle.sweep_dead(LAB_PREFIX, log=lambda m: print(f"\ne2e tests: {m}", file=sys.stderr))


@pytest.fixture
def envoy_dir() -> Iterator[Path]:
    """A directory uid 1337 can reach (pytest's tmp_path sits under a 0700 directory) for
    Envoy's config and log; the log is printed at teardown (pytest shows it on failure)."""
    path = Path(tempfile.mkdtemp(prefix="ma-e2e-envoy-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for log in sorted(path.glob("*.log")):
            print(f"--- {log}:\n{log.read_text(errors='replace')}--- end of {log.name}")
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def base_id() -> int:
    """An Envoy --base-id no other Envoy of this run uses (its shared memory is global)."""
    return (os.getpid() % 100000) * 100 + next(_base_ids) % 100


CLIENT_IP, SERVER_IP = "10.244.1.10", "10.244.1.20"


@dataclass
class Pods:
    client: str  # pod netns: the calling app and its sidecar
    server: str  # pod netns: the called app and its sidecar
    cgroup: str  # both pods' processes (pods are told apart by netns)
    bpffs: str


@pytest.fixture
def pods(lab: Lab) -> Pods:  # noqa: F811 - lab: the fixture imported above
    """Two registered pods on one node, client and server, in one attached cgroup."""
    node = lab.node()
    client = lab.pod("cli", node, CLIENT_IP)
    server = lab.pod("srv", node, SERVER_IP)
    cg = lab.cgroup()
    return Pods(client, server, cg, lab.attach(cg, pods=(client, server)))


@pytest.fixture
def base_ids(base_id: int) -> tuple[int, int]:
    """Two Envoy --base-ids for one test (base_id's counter wraps at 100: +50 stays free)."""
    return base_id, base_id + 50


@pytest.fixture
def prefix() -> Iterator[str]:
    """A lab prefix no running lab uses (tests never touch a real lab); the lab is taken
    down after the test either way."""
    name = lab_prefix(next(_lab_ids))
    try:
        yield name
    finally:
        lifecycle.down(name)
