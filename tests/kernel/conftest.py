"""Kernel tests need root, bpffs, cgroup v2 and bcc. In CI (CI=true) a missing piece is a
failure; on a developer's machine without root the tests are skipped, saying why."""

from __future__ import annotations

import itertools
import os
import sys

import pytest

from meshaccel.lab.sandbox import sweep_dead
from tests.kernel.lab import SANDBOX_PREFIX, Lab, missing_requirement, sandbox_prefix

_ids = itertools.count()


def pytest_runtest_setup(item: pytest.Item) -> None:
    reason = missing_requirement()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the kernel tests, but: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _sweep_dead_sandboxes() -> None:
    """What an earlier run killed mid-test left (netns, cgroups with programs, pins) would
    be on the machine for good, and might collide with this run: swept first."""
    if missing_requirement() is None:
        sweep_dead(SANDBOX_PREFIX, log=lambda m: print(f"\nkernel tests: {m}", file=sys.stderr))


@pytest.fixture
def lab():
    """A Lab with a unique prefix (ma-t<pid>-<n>), cleaned up even when the test fails."""
    lab = Lab(sandbox_prefix(str(next(_ids))))
    try:
        yield lab
    finally:
        lab.cleanup()
