"""CLI parsing, help and error output (no root needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from meshaccel.cli import cli, format_status


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real console entry point, as a user runs it."""
    code = "from meshaccel.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize("command", ["doctor", "attach", "detach", "status"])
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage: cli " + command in result.output or f"{command} [OPTIONS]" in result.output


def test_attach_help_teaches_defaults():
    out = CliRunner().invoke(cli, ["attach", "--help"]).output
    for text in ("--proxy-port", "15001", "--proxy-uid", "1337", "/sys/fs/bpf/meshaccel"):
        assert text in out


def test_unknown_option_is_a_usage_error():
    r = run("attach", "--bogus")
    assert r.returncode == 2
    assert "No such option" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["attach", "--proxy-port", "0"], "--proxy-port 0: must be a TCP port from 1 to 65535"),
        (
            ["attach", "--proxy-port", "70000"],
            "--proxy-port 70000: must be a TCP port from 1 to 65535",
        ),
        (["attach", "--proxy-uid", "-1"], "--proxy-uid -1: must be a uid from 0 to 4294967294"),
    ],
)
def test_bad_values_are_one_line_errors(args, message):
    r = run(*args)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"meshaccel: error: {message}"]


def test_options_have_environment_spelling():
    env = {"MESHACCEL_ATTACH_PROXY_PORT": "0", "PATH": "/usr/bin:/bin"}
    r = run("attach", env=env)
    assert "--proxy-port 0" in r.stderr and r.returncode == 1


def test_format_status_names_every_counter():
    st = {
        "bpffs": "/sys/fs/bpf/meshaccel",
        "attached": True,
        "cgroup": "/sys/fs/cgroup",
        "config": {
            "shortcut": True,
            "app_shortcut": False,
            "shortcut_mode": 2,
            "default_istio_iptables_args": "-p 15001 -u 1337",
        },
        "programs": [{"name": "connect4", "hook": "cgroup", "id": 7, "attached": True}],
        "maps": {"sock_hash": {"entries": 2, "capacity": 65536}},
        "counters": {"msg_redirected_bytes": 1234, "orig_dst_answered": 1},
    }
    text = format_status(st)
    assert "attached to /sys/fs/cgroup" in text
    assert "shortcut on for sidecars, apps where their pod opts in" in text
    assert "pods get: -p 15001 -u 1337" in text
    assert "msg_redirected_bytes" in text and "1234" in text
    assert "2 / 65536" in text


def test_format_status_when_not_attached():
    st = {"bpffs": "/x", "attached": False, "programs": []}
    assert format_status(st) == "not attached (no pins in /x)"
