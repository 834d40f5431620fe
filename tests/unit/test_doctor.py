import json
import subprocess

import pytest

from meshaccel.datapath import doctor, host
from meshaccel.datapath.bpfsys import BPF_FS_MAGIC
from meshaccel.datapath.doctor import Check

FULL_CAPS = "000001fffeffffff"  # what root has on this machine

STATUS_TEMPLATE = """Name:\tpython3
Uid:\t{uid}\t{uid}\t{uid}\t{uid}
CapInh:\t0000000000000000
CapPrm:\t{cap}
CapEff:\t{cap}
CapBnd:\t000001ffffffffff
"""

MOUNTINFO = """\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
31 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 23 0:39 / /sys/fs/bpf rw,relatime - bpf bpf rw
"""

BPFTOOL_OUTPUT = """\
Scanning eBPF program types...
eBPF program_type socket_filter is available
eBPF program_type sock_ops is available
eBPF program_type sk_msg is available
eBPF program_type cgroup_sock_addr is available
eBPF program_type cgroup_sockopt is NOT available
eBPF program_type lirc_mode2 is NOT available

Scanning eBPF map types...
eBPF map_type hash is available
eBPF map_type percpu_array is available
eBPF map_type lru_hash is available
eBPF map_type sockhash is NOT available

Scanning eBPF helper functions...
eBPF helpers supported for program type sock_ops:
\t- bpf_get_netns_cookie
"""


def status_file(tmp_path, uid=0, cap=FULL_CAPS):
    path = tmp_path / "status"
    path.write_text(STATUS_TEMPLATE.format(uid=uid, cap=cap))
    return str(path)


# --- root / capabilities -----------------------------------------------------------------


def test_parse_cap_eff():
    assert host.parse_cap_eff(STATUS_TEMPLATE.format(uid=0, cap=FULL_CAPS)) == 0x1FFFEFFFFFF
    assert host.parse_cap_eff("Name:\tx\n") is None


def test_root_ok_with_full_caps(tmp_path):
    check = doctor.check_root(euid=0, status_path=status_file(tmp_path))
    assert check.ok and check.required and check.name == "root"
    assert "euid 0" in check.detail and "CAP_BPF" in check.detail
    assert check.fix == ""


def test_non_root_with_the_three_caps_fails_as_attach_does(tmp_path):
    # the pins are root's files: attach, status and pod add refuse anyone else
    cap = hex((1 << 39) | (1 << 12) | (1 << 21))[2:].zfill(16)
    check = doctor.check_root(euid=1000, status_path=status_file(tmp_path, 1000, cap))
    assert not check.ok
    assert "euid 1000" in check.detail and "must run as root" in check.detail


def test_missing_caps_are_named(tmp_path):
    cap = hex(1 << 12)[2:].zfill(16)  # only CAP_NET_ADMIN
    check = doctor.check_root(euid=0, status_path=status_file(tmp_path, 0, cap))
    assert not check.ok
    assert "CAP_BPF" in check.detail and "CAP_SYS_ADMIN" in check.detail
    assert "CAP_NET_ADMIN" not in check.detail
    assert "run as root" in check.fix


def test_root_without_caps_fails(tmp_path):
    # e.g. root in a container that dropped capabilities: bpf() would fail
    check = doctor.check_root(euid=0, status_path=status_file(tmp_path, 0, "0" * 16))
    assert not check.ok


def test_unreadable_status_falls_back_to_euid(tmp_path):
    missing = str(tmp_path / "nope")
    assert doctor.check_root(euid=0, status_path=missing).ok
    check = doctor.check_root(euid=1000, status_path=missing)
    assert not check.ok and "must run as root" in check.detail


# --- kernel version ------------------------------------------------------------------------


def test_parse_kernel_version():
    assert doctor.parse_kernel_version("6.18.44-fc-v657") == (6, 18, 44)
    assert doctor.parse_kernel_version("5.15.0-91-generic") == (5, 15, 0)
    assert doctor.parse_kernel_version("6.1.0-56-amd64") == (6, 1, 0)
    assert doctor.parse_kernel_version("6.9") == (6, 9)
    assert doctor.parse_kernel_version("6.10rc1") == (6, 10)
    assert doctor.parse_kernel_version("garbage") is None


def test_kernel_new_enough():
    check = doctor.check_kernel("6.18.44-fc-v657")
    assert check.ok and check.name == "kernel"
    assert check.detail == "6.18.44-fc-v657 (>= 6.1 needed)"


def test_kernel_boundaries():
    assert doctor.check_kernel("6.1.0-47-amd64").ok
    assert not doctor.check_kernel("5.15.0").ok
    assert not doctor.check_kernel("6.0.1").ok
    old = doctor.check_kernel("5.10.0-28-amd64")
    assert not old.ok and old.required
    assert "5.10.0-28-amd64" in old.detail and "6.1" in old.fix and "COMPATIBILITY.md" in old.fix


def test_kernel_unparsable():
    check = doctor.check_kernel("weird")
    assert not check.ok and "cannot parse" in check.detail


# --- bpftool feature probe -------------------------------------------------------------------


def test_parse_bpftool_probe():
    probe = doctor.parse_bpftool_probe(BPFTOOL_OUTPUT)
    assert "program_type sock_ops" in probe.available
    assert "map_type lru_hash" in probe.available
    assert "program_type cgroup_sockopt" in probe.unavailable
    assert "map_type sockhash" in probe.unavailable
    assert "program_type cgroup_sockopt" not in probe.available
    assert probe.error == ""


def test_feature_checks():
    probe = doctor.parse_bpftool_probe(BPFTOOL_OUTPUT)
    ok = doctor.check_bpf_feature("program_type", "sock_ops", probe, "CONFIG_CGROUP_BPF")
    assert ok.name == "prog_type:sock_ops" and ok.ok and ok.required and ok.fix == ""
    assert "available" in ok.detail

    missing = doctor.check_bpf_feature("map_type", "sockhash", probe, "CONFIG_BPF_STREAM_PARSER")
    assert missing.name == "map_type:sockhash" and not missing.ok
    assert "NOT available" in missing.detail
    assert "CONFIG_BPF_STREAM_PARSER=y" in missing.fix

    unlisted = doctor.check_bpf_feature("map_type", "ringbuf", probe)
    assert not unlisted.ok and "not listed" in unlisted.detail


def test_bpftool_missing():
    probe = doctor.run_bpftool_probe(bpftool="/nonexistent/bpftool")
    assert probe.error
    check = doctor.check_bpf_feature("program_type", "sk_msg", probe)
    assert not check.ok
    assert check.fix == "apt-get install bpftool"


def fake_runner(returncode, stdout="", stderr=""):
    calls = []

    def run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)

    return run, calls


def test_bpftool_runner_output_is_parsed(tmp_path):
    fake = tmp_path / "bpftool"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    run, calls = fake_runner(0, stdout=BPFTOOL_OUTPUT)
    probe = doctor.run_bpftool_probe(bpftool=str(fake), runner=run)
    assert calls == [[str(fake), "feature", "probe", "kernel"]]
    assert "program_type sk_msg" in probe.available


def test_bpftool_without_privileges(tmp_path):
    fake = tmp_path / "bpftool"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    err = "Error: missing CAP_SYS_ADMIN, CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, required ...\n"
    run, _ = fake_runner(255, stderr=err)
    probe = doctor.run_bpftool_probe(bpftool=str(fake), runner=run)
    check = doctor.check_bpf_feature("map_type", "sockhash", probe)
    assert not check.ok
    assert "missing CAP_SYS_ADMIN" in check.detail
    assert "root" in check.fix


# --- BTF ---------------------------------------------------------------------------------------


def test_btf(tmp_path):
    present = tmp_path / "vmlinux"
    present.write_bytes(b"\x9f\xeb")
    assert doctor.check_btf(str(present)).ok
    missing = doctor.check_btf(str(tmp_path / "missing"))
    assert not missing.ok and not missing.required
    assert "missing" in missing.detail and "CONFIG_DEBUG_INFO_BTF" in missing.fix


# --- cgroup2 / bpffs -------------------------------------------------------------------------


def test_cgroup2_mount_found(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text(MOUNTINFO)
    assert host.cgroup2_mount(str(mi)) == "/sys/fs/cgroup/unified"
    check = doctor.check_cgroup2(str(mi))
    assert check.ok and check.name == "cgroup2"
    assert "/sys/fs/cgroup/unified" in check.detail


def test_cgroup2_prefers_sys_fs_cgroup_and_unescapes(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "50 1 0:40 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n"
        "51 1 0:41 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    assert host.cgroup2_mount(str(mi)) == "/sys/fs/cgroup"
    mi.write_text("50 1 0:40 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n")
    assert host.cgroup2_mount(str(mi)) == "/mnt/my cg"


def test_cgroup2_missing(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text("31 23 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs ro\n")
    assert host.cgroup2_mount(str(mi)) is None
    check = doctor.check_cgroup2(str(mi))
    assert not check.ok and check.required
    assert "mount -t cgroup2" in check.fix
    assert host.cgroup2_mount(str(tmp_path / "nope")) is None


def test_program_types_come_from_the_program_table():
    from meshaccel.datapath import programs

    assert set(doctor.PROG_TYPES) == {p.prog_type.lower() for p in programs.PROGRAMS}
    assert "sk_lookup" in doctor.PROG_TYPES
    assert programs.sources()[0] == programs.PROGRAMS[0].source
    assert set(programs.sources()) == {p.source for p in programs.PROGRAMS}


def test_attach_refuses_a_bpffs_as_doctor_reports_it(tmp_path):
    from meshaccel.datapath import host
    from meshaccel.errors import MeshaccelError

    with pytest.raises(MeshaccelError, match=f"^--bpffs {tmp_path}/x/p: {tmp_path}/x is not a bpf"):
        host.check_bpffs(f"{tmp_path}/x/p")
    assert (
        doctor.check_bpffs(f"{tmp_path}/x").detail
        == f"{tmp_path}/x is not a bpf filesystem: it does not exist"
    )


def test_is_bpffs_real_statfs_on_tmp(tmp_path):
    assert doctor.statfs_type(str(tmp_path)) not in (None, BPF_FS_MAGIC)
    assert doctor.statfs_type(str(tmp_path / "nope")) is None
    assert not host.is_bpffs(str(tmp_path))


def test_bpffs_ok_with_fake_statfs(tmp_path):
    check = doctor.check_bpffs(str(tmp_path), fstype_of=lambda p: BPF_FS_MAGIC)
    assert check.ok and check.name == "bpffs" and check.fix == ""


def test_bpffs_not_mounted(tmp_path):
    check = doctor.check_bpffs(str(tmp_path), fstype_of=lambda p: 0x62656572)  # sysfs
    assert not check.ok and check.required
    assert "0x62656572" in check.detail
    assert f"mount -t bpf bpf {tmp_path}" in check.fix


def test_bpffs_root_missing(tmp_path):
    root = tmp_path / "bpf"
    check = doctor.check_bpffs(str(root), fstype_of=lambda p: BPF_FS_MAGIC)
    assert not check.ok and "does not exist" in check.detail
    assert check.fix == f"mkdir -p {root} && mount -t bpf bpf {root}"


# --- kernel headers ------------------------------------------------------------------------


REL = "6.18.44-fc-v657"


def debian_headers(tmp_path):
    """Debian layout: -amd64 has generated files, -common has include/linux/kconfig.h."""
    usr_src = tmp_path / "usr_src"
    arch = usr_src / "linux-headers-6.1.0-56-amd64"
    common = usr_src / "linux-headers-6.1.0-56-common"
    (arch / "include" / "generated").mkdir(parents=True)
    (common / "include" / "linux").mkdir(parents=True)
    (common / "include" / "linux" / "kconfig.h").write_text("/* kconfig */\n")
    return usr_src, arch, common


def test_kernel_headers_linked(tmp_path):
    usr_src, arch, common = debian_headers(tmp_path)
    mod = tmp_path / "modules" / REL
    mod.mkdir(parents=True)
    (mod / "build").symlink_to(arch)
    (mod / "source").symlink_to(common)
    check = doctor.check_kernel_headers(REL, str(tmp_path / "modules"), str(usr_src))
    assert check.ok and check.name == "kernel_headers" and check.fix == ""
    assert str(arch) in check.detail and str(common) in check.detail


def test_kernel_headers_in_build_only(tmp_path):
    build = tmp_path / "modules" / REL / "build"
    (build / "include" / "linux").mkdir(parents=True)
    (build / "include" / "linux" / "kconfig.h").write_text("")
    assert doctor.check_kernel_headers(REL, str(tmp_path / "modules"), str(tmp_path)).ok


def test_kernel_headers_missing_names_installed_dirs(tmp_path):
    usr_src, arch, common = debian_headers(tmp_path)
    modules = tmp_path / "modules"
    check = doctor.check_kernel_headers(REL, str(modules), str(usr_src))
    assert not check.ok and check.required
    assert f"{modules}/{REL}/build missing" in check.detail
    assert f"ln -sfn {arch} {modules}/{REL}/build" in check.fix
    assert f"ln -sfn {common} {modules}/{REL}/source" in check.fix
    assert "scripts/test.sh" in check.fix


def test_kernel_headers_missing_nothing_installed(tmp_path):
    check = doctor.check_kernel_headers(REL, str(tmp_path / "modules"), str(tmp_path / "src"))
    assert not check.ok
    assert "apt-get install linux-headers-amd64" in check.fix
    assert "linux-headers-<v>-amd64" in check.fix and "linux-headers-<v>-common" in check.fix


def test_kernel_headers_dangling_link(tmp_path):
    mod = tmp_path / "modules" / REL
    mod.mkdir(parents=True)
    (mod / "build").symlink_to(tmp_path / "gone")
    check = doctor.check_kernel_headers(REL, str(tmp_path / "modules"), str(tmp_path))
    assert not check.ok and "dangling" in check.detail


def test_kernel_headers_without_kconfig(tmp_path):
    (tmp_path / "modules" / REL / "build" / "include").mkdir(parents=True)
    check = doctor.check_kernel_headers(REL, str(tmp_path / "modules"), str(tmp_path))
    assert not check.ok and "kconfig.h not found" in check.detail


# --- bcc -------------------------------------------------------------------------------------


def test_bcc_import_fails():
    check = doctor.check_bcc("meshaccel_no_such_module_xyz")
    assert not check.ok and check.name == "bcc" and check.required
    assert "ModuleNotFoundError" in check.detail
    assert "python3-bpfcc" in check.fix and "--system-site-packages" in check.fix


def test_bcc_wrong_package():
    check = doctor.check_bcc("json")  # imports, but has no BPF class (like PyPI's 'bcc')
    assert not check.ok and "no BPF class" in check.detail
    assert "pip uninstall bcc" in check.fix


# --- output --------------------------------------------------------------------------------


SAMPLE = [
    Check("kernel", True, True, "6.18.44 (>= 6.1 needed)", ""),
    Check("bpffs", False, True, "/sys/fs/bpf is not bpffs", "mount -t bpf bpf /sys/fs/bpf"),
    Check("btf", False, False, "/sys/kernel/btf/vmlinux missing", "optional"),
]


def test_format_text():
    lines = doctor.format_text(SAMPLE).splitlines()
    assert lines == [
        "OK    kernel  6.18.44 (>= 6.1 needed)",
        "FAIL  bpffs   /sys/fs/bpf is not bpffs -- fix: mount -t bpf bpf /sys/fs/bpf",
        "WARN  btf     /sys/kernel/btf/vmlinux missing -- fix: optional",
    ]
    assert doctor.format_text([]) == ""


def test_exit_code():
    assert doctor.exit_code(SAMPLE) == 1
    assert doctor.exit_code([SAMPLE[0], SAMPLE[2]]) == 0  # failed optional check only
    assert doctor.exit_code([]) == 0


def test_as_dict_is_json_ready():
    d = SAMPLE[1].as_dict()
    assert d == {
        "name": "bpffs",
        "ok": False,
        "required": True,
        "detail": "/sys/fs/bpf is not bpffs",
        "fix": "mount -t bpf bpf /sys/fs/bpf",
    }
    json.dumps({"ok": False, "checks": [c.as_dict() for c in SAMPLE]})


def test_run_checks_for_real():
    checks = doctor.run_checks()
    assert checks
    for check in checks:
        assert isinstance(check, Check)
        assert check.detail
        assert check.ok or check.fix
    names = [c.name for c in checks]
    assert len(names) == len(set(names))
    assert {"root", "kernel", "bcc", "kernel_headers", "btf", "cgroup2", "bpffs"} <= set(names)
    assert "prog_type:sock_ops" in names and "map_type:sockhash" in names


def test_libbpf_check_reports_load_failure():
    def broken() -> None:
        raise OSError("libbpf.so.1: cannot open shared object file")

    check = doctor.check_libbpf(broken)
    assert not check.ok and "cannot open" in check.detail and check.fix == "apt-get install libbpf1"
    assert doctor.check_libbpf(lambda: None).ok


def test_programs_load_names_what_the_verifier_refused():
    fine = doctor.check_programs_load(lambda: (9, []))
    assert fine.ok and "all 9 programs" in fine.detail
    refused = (
        "kernel 6.1.0 refused ma_sk_lookup: R0 min value is outside of the allowed memory range"
    )
    bad = doctor.check_programs_load(lambda: (9, [refused]))
    assert not bad.ok and bad.required and bad.detail == refused and bad.fix


def test_verifier_reason_is_the_line_before_the_statistics():
    from meshaccel.datapath.build import verifier_reason

    log = """0: (b7) r0 = 0
12: (71) r1 = *(u8 *)(r0 +5278)
invalid access to map value, value_size=5232 off=5278 size=1
R0 min value is outside of the allowed memory range
processed 30590 insns (limit 1000000) max_states_per_insn 4 total_states 120 peak_states 120
"""
    assert verifier_reason(log) == "R0 min value is outside of the allowed memory range"
    assert verifier_reason("") == ""


@pytest.mark.parametrize(
    "config,shortcuts,expected",
    [
        ({"shortcut": True, "app_shortcut": False}, ["default", "off"], "apps keep plain TCP"),
        (
            {"shortcut": True, "app_shortcut": False},
            ["default", "apps", "apps except ports 6379"],
            "apps keep plain TCP but for 2 pod(s) that opt in: p1, p2",
        ),
        ({"shortcut": True, "app_shortcut": True}, [], "on for sidecars and every app"),
        (
            {"shortcut": True, "app_shortcut": False},
            ["default", "none"],
            "apps keep plain TCP; 1 pod(s) keep every hop off (shortcut none): p1",
        ),
        ({"shortcut": False, "app_shortcut": False}, ["apps"], "off: every byte on TCP"),
    ],
)
def test_shortcut_check_says_which_sockets_take_it(config, shortcuts, expected):
    listed = [{"name": f"p{i}", "shortcut": s} for i, s in enumerate(shortcuts)]
    check = doctor.check_shortcut(status=lambda: {"config": config, "pods": listed})
    assert check.ok and not check.required and expected in check.detail, check


def test_shortcut_check_reports_an_unreadable_datapath():
    def broken() -> dict:
        raise OSError(13, "Permission denied")

    check = doctor.check_shortcut("/sys/fs/bpf/x", status=broken)
    assert not check.ok and "Permission denied" in check.detail
    assert check.fix == "meshaccel status --bpffs /sys/fs/bpf/x"
