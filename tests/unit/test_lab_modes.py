"""The lab's modes without a lab: ebpf and ebpf-apps both run the node agent (ebpf-apps
with --app-shortcut, ebpf saying --no-app-shortcut so the environment cannot change it),
both report the datapath counters, and `lab up --mode` offers every mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from meshaccel import cli as cli_module
from meshaccel.cli import cli
from meshaccel.errors import MeshaccelError
from meshaccel.lab import lifecycle, processes, topology


def test_modes() -> None:
    assert topology.MODES == ("nomesh", "iptables", "ebpf", "ebpf-apps")
    assert cli_module.LAB_MODES == topology.MODES  # the CLI's copy (it imports no lab code)
    assert [m for m in topology.MODES if topology.is_ebpf(m)] == ["ebpf", "ebpf-apps"]
    assert not topology.is_ebpf("ebpf_apps")


@pytest.mark.parametrize(
    ("mode", "flag"), [("ebpf", "--no-app-shortcut"), ("ebpf-apps", "--app-shortcut")]
)
def test_agent_argv(mode: str, flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topology, "STATE_DIR", tmp_path)
    spawned: list[list[str]] = []
    monkeypatch.setattr(lifecycle, "spawn", lambda argv, *_a, **_k: spawned.append(argv))
    monkeypatch.setattr(lifecycle, "track", lambda *_a: None)
    monkeypatch.setattr(lifecycle, "wait_for", lambda *_a: None)
    state = processes.LabState("ma-t-", mode)
    state.names.workdir.mkdir(parents=True)
    lifecycle._start_agent(state, topology.plan(1), 5)
    [argv] = spawned
    assert argv[3:6] == ["run", "--source", "file"]
    assert flag in argv and ("--app-shortcut" in argv) == (mode == "ebpf-apps")
    assert argv[argv.index("--bpffs") + 1] == "/sys/fs/bpf/ma-t-lab"


def test_unknown_mode_refused() -> None:
    with pytest.raises(MeshaccelError, match="--mode ebpf_apps: one of nomesh, iptables, ebpf, "):
        lifecycle.up("ebpf_apps")


@pytest.mark.parametrize("mode", topology.MODES)
def test_status_counters_in_ebpf_modes(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        lifecycle, "load", lambda prefix: processes.LabState(prefix, mode, phase="up")
    )
    monkeypatch.setattr(lifecycle, "admin_get", lambda *_a: (200, ""))
    monkeypatch.setattr(lifecycle.os.path, "exists", lambda path: path == "/sys/fs/bpf/ma-t-lab")
    monkeypatch.setattr(lifecycle, "read_counters", lambda _b: {"msg_redirected_bytes": 5})
    st = lifecycle.status("ma-t-")
    assert ("counters" in st) == topology.is_ebpf(mode)
    assert st["mode"] == mode
    if topology.is_ebpf(mode):
        assert "msg_redirected_bytes" in lifecycle.format_status(st)


def test_lab_up_offers_every_mode() -> None:
    out = CliRunner().invoke(cli, ["lab", "up", "--help"]).output
    assert "[nomesh|iptables|ebpf|ebpf-apps]" in out
    bad = CliRunner().invoke(cli, ["lab", "up", "--mode", "ebpf_apps"])
    assert bad.exit_code != 0 and "ebpf_apps" in bad.output


def test_bench_modes_help_names_ebpf_apps() -> None:
    out = " ".join(CliRunner().invoke(cli, ["bench", "--help"]).output.split())
    assert "ebpf-apps (meshaccel with --app-shortcut: app sockets on the shortcut too)" in out
    assert "[default: nomesh,iptables,ebpf]" in out
