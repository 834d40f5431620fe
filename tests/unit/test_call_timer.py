"""CallTimer: inclusive time per call path of public functions, across a thread hop, put
back as it was on exit; private functions are refused."""

from __future__ import annotations

import threading
import types
from collections.abc import Callable

import pytest

from meshaccel.lab.profiling import CallTimer


def _module() -> types.SimpleNamespace:
    mod = types.SimpleNamespace()

    def in_thread(_where: str, fn: Callable[[], int]) -> int:
        out: list[int] = []
        t = threading.Thread(target=lambda: out.append(fn()))
        t.start()
        t.join()
        return out[0]

    mod.in_thread = in_thread
    mod.leaf = lambda: 1
    mod.outer = lambda: mod.in_thread("ns", lambda: mod.leaf() + mod.leaf())
    return mod


def test_paths_across_a_thread_hop() -> None:
    mod = _module()
    originals = (mod.outer, mod.in_thread, mod.leaf)
    timer = CallTimer(((mod, "outer"), (mod, "in_thread"), (mod, "leaf")), ("in_thread",))
    with timer.installed():
        assert mod.leaf() == 1  # from the main thread: not timed
        worker = threading.Thread(target=mod.outer)
        worker.start()
        worker.join()
    assert (mod.outer, mod.in_thread, mod.leaf) == originals
    totals = timer.reset()
    assert {path: calls for path, (calls, _) in totals.items()} == {
        "outer": 1,
        "outer/in_thread": 1,
        "outer/in_thread/leaf": 2,
    }
    assert timer.reset() == {}


def test_private_functions_refused() -> None:
    with pytest.raises(ValueError, match="_helper: only public functions"):
        CallTimer(((types.SimpleNamespace(), "_helper"),))
