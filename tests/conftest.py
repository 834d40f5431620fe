"""Suite-wide: the `long` marker and the default run's time budget.

Cases marked `long` (1 GiB streams and backlogs, 10,000 connections) are left out of the
default run, which still runs a smaller case of each kind; `pytest -m long` runs them, and
any `-m` expression chooses for itself. In CI the default run must finish within
BUDGET_S: a suite that grows past it fails, so that the test command stays usable.
MESHACCEL_TEST_BUDGET_S sets another budget (0: none), as the kernel matrix does for its
emulated VMs, which run the suite several times slower than the CI machine."""

from __future__ import annotations

import os
import time

import pytest

BUDGET_S = int(os.environ.get("MESHACCEL_TEST_BUDGET_S", 30 * 60))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "long: a large case (1 GiB, 10,000 connections); run with -m long"
    )
    config.stash[_started] = time.monotonic()


_started = pytest.StashKey[float]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("markexpr"):
        return
    long = [i for i in items if i.get_closest_marker("long")]
    if long:
        config.hook.pytest_deselected(items=long)
        items[:] = [i for i in items if not i.get_closest_marker("long")]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    took = time.monotonic() - session.config.stash[_started]
    over = BUDGET_S and took > BUDGET_S
    if os.environ.get("CI") and not session.config.getoption("markexpr") and over:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter:
            reporter.ensure_newline()
            reporter.write_line(
                f"the default run took {took / 60:.1f} min, over its {BUDGET_S // 60} min "
                "budget: mark the largest cases long (tests/conftest.py)",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
