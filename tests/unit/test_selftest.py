"""The self-test's verdicts and report, from made-up probe runs (no root needed)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from meshaccel.cli import cli
from meshaccel.datapath import doctor, selftest, selftest_probes
from meshaccel.datapath.selftest import DIFFERS, HOLDS, UNMEASURED

SEM = next(s for s in selftest.SEMANTICS if s.name == "so_rcvlowat")
PROBE = selftest.PROBE_BY_NAME["rcvlowat"]


def run(holds: bool = True, seen: str = "4 recv calls", bytes_ok: bool = True, **kw) -> dict:
    result = {
        "checks": {"so_rcvlowat": {"holds": holds, "seen": seen}},
        "bytes_ok": bytes_ok,
        "bytes_seen": "64 of 64 bytes in 1 streams intact" if bytes_ok else "stream 0: 63 of 64",
    }
    return {"budget": 4, "seconds": 0.4, "result": result, "path": "2 sockets joined", **kw}


def test_holds_when_the_shortcut_does_what_plain_tcp_does():
    v = selftest.judge(SEM, run(seen="4 calls"), run(seen="4 calls, plain"))
    assert v["status"] == HOLDS
    assert v["shortcut"] == "4 calls" and v["plain"] == "4 calls, plain"


def test_differs_with_what_was_seen():
    v = selftest.judge(SEM, run(holds=False, seen="64 recv calls returned [1, 1]"), run())
    assert v["status"] == DIFFERS and v["detail"] == "64 recv calls returned [1, 1]"


@pytest.mark.parametrize(
    "off,why",
    [
        (run(holds=False, seen="returned 1"), "plain TCP did not behave as expected: returned 1"),
        (run(bytes_ok=False), "plain TCP run: bytes not intact (stream 0: 63 of 64)"),
        ({"budget": 4, "timed_out": True}, "plain TCP run gave no result within 4 s"),
        ({"budget": 4, "error": "probe exited 1: EADDRINUSE"}, "failed: probe exited 1"),
        (run(path_problem="with attach's defaults, 2 sockets joined"), "2 sockets joined"),
        ({"budget": 4, "result": {"checks": {}, "bytes_ok": True}}, "bytes not intact"),
    ],
)
def test_no_verdict_without_a_sound_plain_tcp_run(off, why):
    v = selftest.judge(SEM, run(holds=False), off)
    assert v["status"] == UNMEASURED and why in v["detail"]


def test_a_shortcut_run_off_the_shortcut_measures_nothing():
    on = run(holds=False, path_problem="0 of 2 sockets joined the sockhash")
    v = selftest.judge(SEM, on, run())
    assert v["status"] == UNMEASURED and "not on the shortcut: 0 of 2" in v["detail"]


def test_a_shortcut_run_that_hangs_differs_and_one_that_crashes_is_unknown():
    hung = selftest.judge(SEM, {"budget": 4, "timed_out": True}, run())
    assert hung["status"] == DIFFERS and "no result within 4 s" in hung["detail"]
    crashed = selftest.judge(SEM, {"budget": 4, "error": "probe exited 1: boom"}, run())
    assert crashed["status"] == UNMEASURED and "boom" in crashed["detail"]


def test_lost_or_corrupted_bytes_on_the_shortcut_differ_even_if_the_semantic_held():
    v = selftest.judge(SEM, run(bytes_ok=False), run())
    assert v["status"] == DIFFERS and "bytes lost or corrupted: stream 0: 63 of 64" in v["detail"]


@pytest.mark.parametrize(
    "shortcut,delta,problem",
    [
        (True, {"connect_captured": 1, "sock_inserted": 2, "msg_redirected_bytes": 64}, None),
        (True, {"connect_captured": 0}, "0 of 1 connections were captured"),
        (True, {"connect_captured": 1, "sock_inserted": 1}, "1 of 2 sockets joined"),
        (
            True,
            {"connect_captured": 1, "sock_inserted": 2, "msg_redirected_bytes": 10,
             "msg_fallback_bytes": 54},
            "10 bytes redirected, 54 took the TCP path",
        ),
        (False, {"connect_captured": 1}, None),
        (False, {"connect_captured": 1, "sock_inserted": 2}, "defaults, 2 sockets joined"),
    ],
)  # fmt: skip
def test_path_problem(shortcut, delta, problem):
    found = selftest.path_problem(PROBE, shortcut, delta)
    assert found is None if problem is None else problem in found


def test_path_of_a_plain_probe_connection():
    plain = selftest.PROBE_BY_NAME["tcp_queue"]
    assert selftest.path_problem(plain, True, {}) is None
    assert "put on the shortcut" in selftest.path_problem(plain, True, {"sock_inserted": 2})


def full_runs(differ: set[str] = frozenset(), broken: set[str] = frozenset()) -> dict:
    runs = {}
    for p in selftest.PROBES:
        checks = {
            s.name: {"holds": s.name not in differ, "seen": f"{s.name} seen"}
            for s in selftest.SEMANTICS
            if s.probe == p.name
        }
        for on in (True, False):
            r = {"budget": p.budget, "seconds": 0.1, "path": "x", "result": None}
            if on or not broken & set(checks):
                r["result"] = {
                    "checks": checks if on else {k: {"holds": True, "seen": "ok"} for k in checks},
                    "bytes_ok": True,
                    "bytes_seen": "all intact",
                }
            else:
                r["error"] = "probe exited 1: boom"
            runs[(p.name, on)] = r
    return runs


def test_report_sorts_semantics_by_verdict_and_keeps_each_probe_run():
    runs = full_runs(differ={"splice_read", "msg_waitall"}, broken={"msg_peek"})
    report = selftest.build_report(runs, "6.18.44", 21.04, 9.96)
    assert report["differs"] == ["splice_read", "msg_waitall"]
    assert report["unmeasured"] == ["msg_peek"]
    assert len(report["holds"]) == len(selftest.SEMANTICS) - 3
    assert (report["seconds"], report["setup_seconds"], report["kernel"]) == (21.0, 10.0, "6.18.44")
    assert report["probes"]["splice"] == {
        "shortcut_seconds": 0.1, "shortcut_path": "x", "shortcut_bytes_ok": True,
        "shortcut_bytes": "all intact", "plain_seconds": 0.1, "plain_path": "x",
        "plain_bytes_ok": True, "plain_bytes": "all intact",
    }  # fmt: skip
    assert report["probes"]["peek"]["plain_bytes_ok"] is False


def test_report_of_some_probes_judges_only_their_semantics():
    runs = {k: v for k, v in full_runs().items() if k[0] == "tcp_queue"}
    report = selftest.build_report(runs, "6.18.44", 1, 1)
    assert [s["name"] for s in report["semantics"]] == [
        "fionread_tcp_queue", "fionread_tcp_early", "epoll_tcp_queue",
    ]  # fmt: skip
    assert list(report["probes"]) == ["tcp_queue"]


def test_text_names_what_differs_and_says_what_to_do():
    report = selftest.build_report(full_runs(differ={"splice_read"}), "6.18.44", 20, 9)
    text = selftest.format_text(report)
    first = text.splitlines()[0]
    assert first == (
        f"kernel 6.18.44: {len(selftest.SEMANTICS) - 1} of {len(selftest.SEMANTICS)} semantics "
        "hold on the shortcut; differ: splice_read; mitigations on: app_sockets_off, "
        "tcp_bytes_verdict (20 s)"
    )
    splice = text[text.index("DIFFERS  splice_read") :]
    assert "splice_read seen" in splice and "plain TCP: ok" in splice
    assert "--app-shortcut" in text
    assert "HOLDS    fionread" in text and "shortcut: fionread seen" in text


def test_text_without_differences_gives_no_advice():
    report = selftest.build_report(full_runs(broken={"msg_peek"}), "6.1.0", 20, 9)
    text = selftest.format_text(report)
    assert selftest.ADVICE not in text
    assert "UNKNOWN  msg_peek" in text and "could not be measured: msg_peek" in text


def test_report_says_which_mitigations_this_run_proved_on():
    captured = sum(1 for p in selftest.PROBES if p.captured)
    report = selftest.build_report(full_runs(differ={"splice_read"}), "6.18", 1, 1)
    assert [(m["name"], m["on"]) for m in report["mitigations"]] == [
        ("app_sockets_off", True), ("tcp_bytes_verdict", True),
    ]  # fmt: skip
    assert f"{captured} of {captured} probes kept the app off" in report["mitigations"][0]["proof"]
    assert report["mitigations"][1]["proof"] == "fionread_tcp_queue holds, epoll_tcp_queue holds"
    text = selftest.format_text(report)
    assert "ON         app_sockets_off" in text and "ON         tcp_bytes_verdict" in text

    # a defaults run that failed, or a semantic the verdict program keeps that differs
    report = selftest.build_report(
        full_runs(differ={"epoll_tcp_queue"}, broken={"msg_peek"}), "6.18", 1, 1
    )
    assert [m["on"] for m in report["mitigations"]] == [False, False]
    assert f"{captured - 1} of {captured} probes" in report["mitigations"][0]["proof"]
    assert "epoll_tcp_queue differs" in report["mitigations"][1]["proof"]
    assert "not proven on: app_sockets_off, tcp_bytes_verdict" in selftest.summary(report)
    assert "NOT PROVEN app_sockets_off" in selftest.format_text(report)


def test_doctor_warns_naming_what_differs():
    report = selftest.build_report(full_runs(differ={"so_rcvlowat", "splice_read"}), "6.18", 1, 1)
    check = doctor.selftest_check(report)
    assert not check.ok and not check.required  # WARN, never FAIL
    assert "differ: so_rcvlowat, splice_read" in check.detail
    assert "--app-shortcut" in check.fix and "meshaccel selftest" in check.fix


def test_doctor_ok_when_everything_holds_and_warns_when_unmeasured():
    assert doctor.selftest_check(selftest.build_report(full_runs(), "6.18", 1, 1)).ok
    unknown = doctor.selftest_check(
        selftest.build_report(full_runs(broken={"msg_peek"}), "x", 1, 1)
    )
    assert not unknown.ok and unknown.fix == "meshaccel selftest shows why"


def test_doctor_reports_a_selftest_that_cannot_run():
    def fails() -> dict:
        raise OSError(1, "Operation not permitted")

    check = doctor.check_selftest(fails)
    assert not check.ok and not check.required
    assert "could not run" in check.detail and "Operation not permitted" in check.detail


def test_doctor_runs_the_selftest_only_when_asked(monkeypatch):
    seen = []
    monkeypatch.setattr(doctor, "check_selftest", lambda run: seen.append(run) or None)
    monkeypatch.setattr(doctor, "check_other_programs", lambda bpffs: None)
    monkeypatch.setattr(doctor, "run_bpftool_probe", doctor.FeatureProbe)
    doctor.run_checks()
    assert seen == []
    doctor.run_checks(selftest=True)
    assert len(seen) == 1


def test_cli_doctor_selftest_flag_and_selftest_help(monkeypatch):
    asked = {}

    def fake_run_checks(bpffs_root, bpffs, selftest=False, log=None):
        asked["selftest"] = selftest
        return []

    monkeypatch.setattr(doctor, "run_checks", fake_run_checks)
    assert CliRunner().invoke(cli, ["doctor", "--selftest"]).exit_code == 0
    assert asked["selftest"] is True
    out = CliRunner().invoke(cli, ["selftest", "--help"]).output
    assert "--json" in out and "ma-selftest-<pid>" in out


def test_product_text_names_no_development_issue():
    text = " ".join(s.what for s in selftest.SEMANTICS) + selftest.ADVICE
    assert "issue" not in text.lower() and "#" not in text


def test_semantics_keep_their_names_and_order_new_ones_come_last():
    """Tools parse the JSON report: a semantic is never renamed or moved; new ones are
    appended."""
    first = [
        "so_rcvlowat", "splice_read", "recv_after_shutdown", "fionread", "fionread_tcp_queue",
        "fionread_tcp_early", "epoll_tcp_queue", "msg_peek", "msg_waitall", "epoll_edge",
        "epoll_level", "sendfile", "splice_write", "rst_queued", "rst_blocked",
        "backlog_bounded",
    ]  # fmt: skip
    names = [s.name for s in selftest.SEMANTICS]
    assert names[: len(first)] == first
    assert {s.probe for s in selftest.SEMANTICS} == set(selftest.PROBE_BY_NAME)
    assert set(selftest_probes.CHILD_PROBES) == set(selftest.PROBE_BY_NAME)
