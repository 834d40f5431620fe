"""Ordering and warnings for other programs on meshaccel's hooks, on plain data (no root)."""

from __future__ import annotations

import os

import pytest

from meshaccel.cli import format_status
from meshaccel.datapath import bpfsys, doctor, neighbors

CG = "/sys/fs/cgroup/kubepods"


# ---------------------------------------------------------------- pure functions


def test_relative_order_follows_the_run_array():
    assert neighbors.relative_order([7, 3], ours=3, theirs=7) == "before"
    assert neighbors.relative_order([3, 7], ours=3, theirs=7) == "after"
    # not in the array (an overridden ancestor's program never runs; meshaccel detached)
    assert neighbors.relative_order([3], ours=3, theirs=7) is None
    assert neighbors.relative_order([7], ours=3, theirs=7) is None
    assert neighbors.relative_order([7], ours=None, theirs=7) is None


@pytest.mark.parametrize(
    "hook,order,warns",
    [
        ("connect4", "before", True),
        ("connect6", "before", True),
        ("connect4", "after", False),
        ("connect4", None, False),
        ("getsockopt", "after", True),
        ("getsockopt", "before", False),
        ("sk_lookup", "before", True),
        ("sk_lookup", "after", True),
        ("sockops", "before", False),
        ("getpeername4", "after", False),
    ],
)
def test_warnings_only_for_orders_that_break_istio(hook, order, warns):
    text = neighbors.warning(hook, order)
    assert bool(text) == warns
    if text:
        assert "\n" not in text and " -- " in text  # one line: what breaks -- what to do
    if hook.startswith("connect") and warns:
        assert "socketLB.hostNamespaceOnly=true" in text and hook in text
    if hook == "getsockopt" and warns:
        assert "SO_ORIGINAL_DST" in text


def test_relation():
    assert neighbors.relation(CG, CG) == "same cgroup"
    assert neighbors.relation(CG + "/pod1/ctr", CG) == "descendant"
    assert neighbors.relation("/sys/fs/cgroup", CG) == "ancestor"
    assert neighbors.relation(CG + "-other", CG) is None  # a sibling, not a descendant


def test_ours_by_pinned_id_or_name():
    assert neighbors.is_ours(5, "whatever", [5])
    assert neighbors.is_ours(6, "ma_connect4", [5])  # another meshaccel datapath
    assert not neighbors.is_ours(6, "cil_sock4_connect", [5])


# ---------------------------------------------------------------- a fake kernel


class FakeKernel:
    """Programs attached per (cgroup, attach type), in list order, and the effective
    arrays the kernel would build from them (compute_effective_progs, all ALLOW_MULTI:
    the cgroup's own programs, then its parent's, up to the root)."""

    def __init__(self, root: str, attached: dict[tuple[str, int], list[int]], names: dict):
        self.root = root
        self.attached = attached
        self.names = names
        self.cgroups = sorted({cg for cg, _ in attached} | {root})

    def effective(self, cgroup: str, attach_type: int) -> list[int]:
        out = []
        path = cgroup
        while True:
            out += self.attached.get((path, attach_type), [])
            if path == self.root:
                return out
            path = os.path.dirname(path)

    def install(self, monkeypatch) -> None:
        def query_cgroup(path: str, attach_types, flags: int = 0) -> dict[int, list[int]]:
            if flags & bpfsys.QUERY_EFFECTIVE:
                return {t: self.effective(path, t) for t in attach_types}
            return {t: list(self.attached.get((path, t), [])) for t in attach_types}

        def describe(prog_id: int):
            return self.names[prog_id], "cgroup_sock_addr", f"{prog_id:016x}"

        def ancestors(cgroup: str) -> list[str]:
            out = []
            while cgroup != self.root:
                cgroup = os.path.dirname(cgroup)
                out.append(cgroup)
            return out

        def descendants(cgroup: str):
            return [c for c in self.cgroups if c.startswith(cgroup + "/")]

        monkeypatch.setattr(neighbors, "_query_cgroup", query_cgroup)
        monkeypatch.setattr(neighbors, "_describe", describe)
        monkeypatch.setattr(neighbors, "ancestors", ancestors)
        monkeypatch.setattr(neighbors, "descendants", descendants)


C4, SOCKOPT = bpfsys.CGROUP_INET4_CONNECT, bpfsys.CGROUP_GETSOCKOPT
ROOT = "/sys/fs/cgroup"
MA = {"connect4": 10, "getsockopt": 11}
NAMES = {10: "ma_connect4", 11: "ma_getsockopt", 20: "lb_early", 21: "lb_late", 22: "lb_root"}
NAMES |= {23: "lb_pod", 24: "sockopt_late", 25: "sockopt_pod", 26: "ma_connect4"}


def found_by_id(monkeypatch, attached) -> dict[int, dict]:
    FakeKernel(ROOT, attached, NAMES).install(monkeypatch)
    found = [f.as_dict() for f in neighbors.cgroup_programs(CG, MA)]
    return {f["id"]: f for f in found}


def test_cgroup_order_and_warnings(monkeypatch):
    pod = CG + "/pod1"
    found = found_by_id(
        monkeypatch,
        {
            (CG, C4): [20, 10, 21],  # one attached before meshaccel, one after
            (ROOT, C4): [22, 26],  # an ancestor's (and another datapath's, skipped)
            (pod, C4): [23],  # a descendant's
            (CG, SOCKOPT): [11, 24],
            (pod, SOCKOPT): [25],
        },
    )
    assert sorted(found) == [20, 21, 22, 23, 24, 25]
    expect = {
        20: ("same cgroup", "before", True),
        21: ("same cgroup", "after", False),
        22: ("ancestor", "after", False),
        23: ("descendant", "before", True),
        24: ("same cgroup", "after", True),  # getsockopt after: may overwrite the answer
        25: ("descendant", "before", False),
    }
    for prog_id, (where, order, warns) in expect.items():
        f = found[prog_id]
        assert (f["where"], f["order"], bool(f["warning"])) == (where, order, warns), f
    assert found[23]["attached_to"] == pod and found[22]["attached_to"] == ROOT
    assert found[20]["hook"] == "connect4" and found[24]["hook"] == "getsockopt"
    assert found[20]["name"] == "lb_early" and found[20]["tag"] == f"{20:016x}"


def test_nothing_else_attached(monkeypatch):
    assert found_by_id(monkeypatch, {(CG, C4): [10], (CG, SOCKOPT): [11]}) == {}


def test_preorder_ancestor_is_read_from_the_kernel_not_guessed(monkeypatch):
    """An ancestor's BPF_F_PREORDER program (6.15+) runs first: the order comes from the
    effective array the kernel reports, whatever the cgroup relation suggests."""
    kernel = FakeKernel(ROOT, {(CG, C4): [10], (ROOT, C4): [22]}, NAMES)
    kernel.effective = lambda cgroup, attach_type: [22, 10] if attach_type == C4 else []
    kernel.install(monkeypatch)
    [f] = neighbors.cgroup_programs(CG, MA)
    assert (f.where, f.order) == ("ancestor", "before") and neighbors.warning(f.hook, f.order)


# ---------------------------------------------------------------- output


LB = {
    "hook": "connect4",
    "id": 20,
    "name": "cil_sock4_conne",
    "type": "cgroup_sock_addr",
    "tag": "00",
    "where": "same cgroup",
    "attached_to": CG,
    "order": "before",
    "warning": neighbors.warning("connect4", "before"),
}
QUIET = LB | {"hook": "sockops", "id": 21, "name": "", "order": "after", "warning": None}


def test_format_text_and_summary():
    assert neighbors.format_text([]) == ["other programs on meshaccel's hooks: none"]
    lines = neighbors.format_text([LB, QUIET])
    assert lines[0] == "other programs on meshaccel's hooks:"
    assert "connect4" in lines[1] and "id 20" in lines[1] and "runs before meshaccel's" in lines[1]
    assert lines[2].startswith("    WARNING: runs before meshaccel's connect4")
    assert "sockops" in lines[3] and "runs after" in lines[3] and len(lines) == 4
    assert neighbors.summary([]) == "none"
    assert neighbors.summary([LB, QUIET]) == (
        "connect4 cil_sock4_conne (id 20, runs before meshaccel's); "
        "sockops ? (id 21, runs after meshaccel's)"
    )
    assert neighbors.warnings([LB, QUIET]) == [LB]


def test_status_text_shows_them():
    st = {
        "bpffs": "/sys/fs/bpf/meshaccel",
        "attached": True,
        "cgroup": CG,
        "programs": [{"name": "connect4", "hook": "cgroup", "id": 10, "attached": True}],
        "maps": {},
        "counters": {},
        "config": None,
        "other_programs": [LB],
    }
    text = format_status(st)
    assert "other programs on meshaccel's hooks:" in text and "WARNING:" in text
    assert format_status(st | {"other_programs": []}).endswith(
        "other programs on meshaccel's hooks: none"
    )


# ---------------------------------------------------------------- doctor


def test_doctor_warns_but_does_not_fail():
    check = doctor.check_other_programs("/x", euid=0, find=lambda _: [LB, QUIET])
    assert not check.ok and not check.required and doctor.exit_code([check]) == 0
    assert "cil_sock4_conne (id 20, runs before" in check.detail
    assert "socketLB.hostNamespaceOnly=true" in check.fix
    assert doctor.format_text([check]).startswith("WARN  other_programs  other programs on")


def test_doctor_ok_lists_them_or_none():
    check = doctor.check_other_programs("/x", euid=0, find=lambda _: [QUIET])
    assert check.ok and check.detail.endswith("sockops ? (id 21, runs after meshaccel's)")
    check = doctor.check_other_programs("/x", euid=0, find=lambda _: [])
    assert check.ok and check.detail == "other programs on meshaccel's hooks: none"


def test_doctor_without_root_or_datapath():
    check = doctor.check_other_programs("/nonexistent", euid=1000)
    assert not check.ok and not check.required and "needs root" in check.detail
    check = doctor.check_other_programs("/nonexistent/meshaccel", euid=0)
    assert check.ok and "not attached" in check.detail


def test_doctor_reports_a_failing_read():
    def broken(_bpffs: str) -> list[dict]:
        raise OSError(1, "Operation not permitted")

    check = doctor.check_other_programs("/x", euid=0, find=broken)
    assert not check.ok and not check.required and "could not list" in check.detail
