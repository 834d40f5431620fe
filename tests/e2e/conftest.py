"""End-to-end tests: real Envoy as the sidecar of a lab pod. They share the kernel tests'
requirements and hook (CI=true: a missing piece fails; elsewhere: skipped, saying why)."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshaccel import lab as meshaccel_lab
from tests.kernel.conftest import lab, pytest_runtest_setup  # noqa: F401

_base_ids = itertools.count()
_lab_ids = itertools.count()


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


@pytest.fixture
def prefix() -> Iterator[str]:
    """A lab prefix no running lab uses (tests never touch a real lab); the lab is taken
    down after the test either way."""
    name = f"ma-tlab{os.getpid() % 100000}-{next(_lab_ids)}-"
    try:
        yield name
    finally:
        meshaccel_lab.down(name)
