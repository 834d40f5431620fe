"""The CLI as a user runs it, as root: attach, status (text and JSON), detach, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from meshaccel.datapath import loader, selftest
from meshaccel.datapath.programs import PROGRAMS
from meshaccel.datapath.structs import COUNTERS
from tests.kernel.lab import ours_on

MESHACCEL = os.path.join(os.path.dirname(sys.executable), "meshaccel")


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MESHACCEL, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_attach_status_detach(lab):
    cg = lab.cgroup()
    bpffs = f"/sys/fs/bpf/{lab.prefix}"
    lab.bpffs.append(bpffs)

    env = {"MESHACCEL_ATTACH_PROXY_PORT": "15009"}
    r = cli("attach", "--cgroup", cg, "--bpffs", bpffs, "--app-shortcut", env=env)
    assert r.returncode == 0, r.stderr
    assert f"attached to {cg} (shortcut on for sidecars and apps;" in r.stdout
    assert "compiling eBPF programs" in r.stderr  # progress goes to stderr
    # for app sockets on the shortcut, the kernel self-test ran first, in its own
    # throw-away pod, and said what it found
    selftest_line = f"meshaccel: self-test: kernel {os.uname().release}: "
    assert r.stderr.index("running the kernel self-test") < r.stderr.index(selftest_line)
    assert r.stderr.index(selftest_line) < r.stderr.rindex("compiling eBPF programs")
    assert "semantics hold on the shortcut" in r.stderr
    warning = "meshaccel: warning: an app whose socket takes the shortcut"
    assert ("differ: " in r.stderr) == (warning in r.stderr)
    assert selftest.leftovers() == []
    assert json.loads(cli("status", "--json", "--bpffs", bpffs).stdout)["config"]["app_shortcut"]

    # attach's defaults: app sockets off the shortcut, so no self-test
    r = cli("attach", "--cgroup", cg, "--bpffs", bpffs, env=env)
    assert r.returncode == 0, r.stderr
    assert "settings updated (shortcut on for sidecars, apps where their pod opts in;" in r.stdout
    assert "self-test" not in r.stderr

    r = cli("status", "--json", "--bpffs", bpffs)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["attached"] is True and st["cgroup"] == cg
    assert st["config"]["shortcut"] is True and st["config"]["app_shortcut"] is False
    assert "-p 15009 -z 15006 -u 1337" in st["config"]["default_istio_iptables_args"]
    assert list(st["counters"]) == list(COUNTERS)
    assert [p["name"] for p in st["programs"]] == [p.name for p in PROGRAMS]
    assert all(p["attached"] and p["id"] for p in st["programs"])
    assert st["maps"]["sock_hash"] == {"entries": 0, "capacity": 65536}

    text = cli("status", "--bpffs", bpffs).stdout
    assert f"datapath: attached to {cg}" in text
    for name in COUNTERS:
        assert name in text

    r = cli("detach", "--bpffs", bpffs)
    assert r.returncode == 0 and "detached" in r.stdout
    assert not os.path.exists(bpffs)
    assert cli("status", "--bpffs", bpffs).stdout.strip() == f"not attached (no pins in {bpffs})"
    assert json.loads(cli("status", "--json", "--bpffs", bpffs).stdout)["attached"] is False


@pytest.mark.parametrize(
    "args,message",
    [
        (["attach", "--cgroup", "/tmp"], "--cgroup /tmp: not a cgroup v2 directory"),
        (["attach", "--cgroup", "/nonexistent/cg"], "--cgroup /nonexistent/cg: not a cgroup v2"),
        (
            ["attach", "--bpffs", "/tmp/ma-nobpffs/x"],
            "--bpffs /tmp/ma-nobpffs/x: /tmp/ma-nobpffs is not a bpf filesystem",
        ),
        (["detach", "--cgroup", "/tmp"], "--cgroup /tmp: not a cgroup v2 directory"),
    ],
)
def test_bad_paths_are_one_line_errors(lab, args, message):
    cg = lab.cgroup()
    if "--cgroup" not in args:
        args = [*args, "--cgroup", cg]
    r = cli(*args)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"meshaccel: error: {message}")
    assert ours_on(cg) == [] and not os.path.exists("/tmp/ma-nobpffs")


@pytest.mark.parametrize("command", ["attach", "detach", "status"])
def test_not_root_is_a_clear_error(lab, command):
    p = lab.spawn([MESHACCEL, command], uid=65534)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 1
    assert stderr.strip().splitlines() == [
        "meshaccel: error: must run as root (loading and attaching eBPF needs CAP_BPF, "
        "CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    ]


def test_doctor_json_on_this_machine():
    r = cli("doctor", "--json")
    report = json.loads(r.stdout)
    assert r.returncode == (0 if report["ok"] else 1)
    names = {c["name"] for c in report["checks"]}
    assert {"root", "kernel", "bcc", "kernel_headers", "cgroup2", "bpffs"} <= names
    assert "prog_type:sk_msg" in names and "map_type:sockhash" in names
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]


SEED = """-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020"""


def test_attach_takes_istio_init_args_verbatim(lab):
    cg = lab.cgroup()
    bpffs = f"/sys/fs/bpf/{lab.prefix}"
    lab.bpffs.append(bpffs)
    r = cli(
        "attach", "--cgroup", cg, "--bpffs", bpffs, "--istio-iptables-args", SEED,
        "--no-selftest",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "self-test" not in r.stderr
    args = json.loads(cli("status", "--json", "--bpffs", bpffs).stdout)["config"]
    assert args["default_istio_iptables_args"] == (
        "-p 15001 -z 15006 -u 1337 -g 1337 -m REDIRECT -i '*' -x '' -b '*' "
        "-d 15090,15021,15020 -q '' -o ''"
    )


@pytest.mark.parametrize(
    "args,message",
    [
        ("-p 15001 -i 10.0.0.0/33", '-i "10.0.0.0/33": not a CIDR'),
        ("-p 0", "-p"),
        ("-m TPROXY", "-m TPROXY: only REDIRECT mode is supported"),
        ("--bogus 1", "unknown flag --bogus"),
    ],
)
def test_attach_bad_istio_args_leave_nothing(lab, args, message):
    cg = lab.cgroup()
    bpffs = f"/sys/fs/bpf/{lab.prefix}"
    r = cli("attach", "--cgroup", cg, "--bpffs", bpffs, "--istio-iptables-args", args)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("meshaccel: error: ") and message in line, line
    assert ours_on(cg) == [] and not os.path.exists(bpffs)


def test_a_program_the_verifier_refuses_is_one_line_in_attach_and_doctor(lab, tmp_path):
    """A build whose getpeername4 reads past its map value (as Debian 12's verifier saw
    first_match do): attach says which program and why in one line and leaves nothing;
    doctor's programs_load check fails with the same reason."""
    bpf = tmp_path / "bpf"
    shutil.copytree(loader.BPF_DIR, bpf)
    source = (bpf / "getpeername.c").read_text()
    broken = source.replace(
        "\tif (od && od->family == MA_AF_INET) {",
        "\tif (od && ((__u8 *)od)[sizeof(*od) + 64] == 7)\n\t\treturn 0;\n"
        "\tif (od && od->family == MA_AF_INET) {",
    )
    assert broken != source
    (bpf / "getpeername.c").write_text(broken)
    env = {"MESHACCEL_BPF_DIR": str(bpf), "MESHACCEL_ATTACH_SELFTEST": "false"}
    cg = lab.cgroup()
    bpffs = f"/sys/fs/bpf/{lab.prefix}"
    lab.bpffs.append(bpffs)

    r = cli("attach", "--cgroup", cg, "--bpffs", bpffs, env=env)
    assert r.returncode == 1, r.stdout
    [line] = [x for x in r.stderr.splitlines() if x.startswith("meshaccel: error:")]
    assert f"kernel {os.uname().release} refused ma_getpeername4: " in line, r.stderr
    assert "invalid access to map value" in line or "outside of the allowed" in line, line
    assert "Traceback" not in r.stderr
    assert ours_on(cg) == [] and not os.path.exists(bpffs)

    report = json.loads(cli("doctor", "--json", env=env).stdout)
    [check] = [c for c in report["checks"] if c["name"] == "programs_load"]
    assert not check["ok"] and "refused ma_getpeername4" in check["detail"], check
    assert report["ok"] is False
