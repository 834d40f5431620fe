"""Kernel tests need root, bpffs, cgroup v2 and bcc. In CI (CI=true) a missing piece is a
failure; on a developer's machine without root the tests are skipped, saying why."""

from __future__ import annotations

import itertools
import os

import pytest

from tests.kernel.lab import Lab

_ids = itertools.count()


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root (eBPF, netns, cgroups)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (apt-get install python3-bpfcc; run scripts/test.sh)"
    if not os.path.ismount("/sys/fs/bpf"):
        return "bpffs is not mounted at /sys/fs/bpf (scripts/test.sh mounts it)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the kernel tests, but: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def lab():
    """A Lab with a unique prefix (ma-t<pid>-<n>), cleaned up even when the test fails."""
    lab = Lab(f"ma-t{os.getpid() % 100000}-{next(_ids)}")
    try:
        yield lab
    finally:
        lab.cleanup()
