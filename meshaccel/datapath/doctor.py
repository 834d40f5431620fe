"""Environment checks behind `meshaccel doctor [--json]`.

Every check is a small function that takes its inputs (paths, release strings, probe
output) as parameters with real defaults, so tests can feed fake inputs. `run_checks()`
runs them all against the real machine.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from meshaccel.datapath import build, host, loader, lookup_tag, neighbors, programs
from meshaccel.datapath.bpfsys import statfs_type
from meshaccel.datapath.host import (
    NEEDED_CAPS,
    cgroup2_mount,
)
from meshaccel.datapath.pins import Pins
from meshaccel.errors import MeshaccelError

MIN_KERNEL = (6, 1)  # measured: COMPATIBILITY.md (5.10 lacks bpf_get_netns_cookie)

# Needed program types (from the program table) and map types -> the kernel option that
# provides them (used in the fix text).
PROG_TYPES = programs.prog_types()
MAP_TYPES = {
    "sockhash": "CONFIG_BPF_STREAM_PARSER",
    "lru_hash": "CONFIG_BPF_SYSCALL",
    "percpu_array": "CONFIG_BPF_SYSCALL",
}


@dataclass(frozen=True)
class Check:
    """Result of one doctor check."""

    name: str  # short stable id, e.g. "kernel", "prog_type:sock_ops"
    ok: bool
    required: bool  # a failed required check makes doctor exit non-zero
    detail: str  # what was found
    fix: str  # "" when ok, else a concrete command/instruction

    def as_dict(self) -> dict:
        """JSON-ready dict with keys name, ok, required, detail, fix."""
        return dataclasses.asdict(self)


def _check(name: str, ok: bool, detail: str, fix: str, required: bool = True) -> Check:
    return Check(name=name, ok=ok, required=required, detail=detail, fix="" if ok else fix)


# --- root / capabilities -------------------------------------------------------------


def check_root(euid: int | None = None, status_path: str = "/proc/self/status") -> Check:
    """Root, as attach requires (host.check_root), with CAP_BPF, CAP_NET_ADMIN and
    CAP_SYS_ADMIN in CapEff when it is readable (root in a container may lack some)."""
    euid = os.geteuid() if euid is None else euid
    fix = (
        "run as root (sudo meshaccel ...), with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN "
        "(in a container: securityContext.capabilities.add)"
    )
    try:
        host.check_root(euid)
    except MeshaccelError as e:
        return _check("root", False, f"euid {euid}: {e}", fix)
    missing = host.missing_caps(status_path)
    if missing is None:
        return _check("root", True, f"euid {euid}; CapEff unreadable ({status_path})", fix)
    if missing:
        return _check("root", False, f"euid {euid}; CapEff lacks {', '.join(missing)}", fix)
    return _check("root", True, f"euid {euid}; CapEff has {', '.join(NEEDED_CAPS)}", fix)


# --- kernel version --------------------------------------------------------------------


def parse_kernel_version(release: str) -> tuple[int, ...] | None:
    """Leading numeric parts of a release string: "6.18.44-fc-v657" -> (6, 18, 44)."""
    parts = []
    for piece in release.split("-", 1)[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):  # "15rc1": stop after the numeric prefix
            break
    return tuple(parts) if len(parts) >= 2 else None


def check_kernel(release: str | None = None) -> Check:
    """Kernel release must be >= MIN_KERNEL."""
    release = os.uname().release if release is None else release
    need = ".".join(map(str, MIN_KERNEL))
    version = parse_kernel_version(release)
    fix = (
        f"boot a kernel >= {need}, the oldest measured to run every program (COMPATIBILITY.md; "
        "5.10 lacks bpf_get_netns_cookie in sk_msg, sockops and sockopt programs), e.g. "
        "Debian 12: apt-get install linux-image-amd64; reboot"
    )
    if version is None:
        return _check("kernel", False, f"cannot parse release {release!r}", fix)
    return _check("kernel", version[:2] >= MIN_KERNEL, f"{release} (>= {need} needed)", fix)


# --- BPF program / map types via bpftool ----------------------------------------------


@dataclass(frozen=True)
class FeatureProbe:
    """Parsed `bpftool feature probe kernel`; `error`/`fix` set when it could not run."""

    available: frozenset[str] = frozenset()  # e.g. "program_type sock_ops"
    unavailable: frozenset[str] = frozenset()  # listed as "is NOT available"
    error: str = ""
    fix: str = ""


def parse_bpftool_probe(text: str) -> FeatureProbe:
    """Parse lines like "eBPF program_type sock_ops is available" / "... is NOT available"."""
    available, unavailable = set(), set()
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 5 and words[0] == "eBPF" and words[1] in ("program_type", "map_type"):
            key = f"{words[1]} {words[2]}"
            if words[3:] == ["is", "available"]:
                available.add(key)
            elif words[3:] == ["is", "NOT", "available"]:
                unavailable.add(key)
    return FeatureProbe(frozenset(available), frozenset(unavailable))


def find_bpftool(name: str = "bpftool") -> str | None:
    """bpftool lives in /usr/sbin on Debian, which is not on a normal user's PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def run_bpftool_probe(
    bpftool: str = "bpftool", runner: Callable[..., subprocess.CompletedProcess] = subprocess.run
) -> FeatureProbe:
    """Run `bpftool feature probe kernel` once and parse it."""
    path = find_bpftool(bpftool)
    if path is None:
        return FeatureProbe(error=f"{bpftool} not found", fix="apt-get install bpftool")
    try:
        proc = runner(
            [path, "feature", "probe", "kernel"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as e:
        return FeatureProbe(error=f"{path} failed: {e}", fix="apt-get install --reinstall bpftool")
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout or "").strip().splitlines()
        first = msg[0] if msg else f"exit status {proc.returncode}"
        if "CAP_" in first or "Operation not permitted" in first:
            fix = "run meshaccel doctor as root"
        else:
            fix = f"run `{path} feature probe kernel` and fix the error it reports"
        return FeatureProbe(error=f"bpftool feature probe kernel failed: {first}", fix=fix)
    return parse_bpftool_probe(proc.stdout)


def check_bpf_feature(kind: str, name: str, probe: FeatureProbe, config: str = "") -> Check:
    """kind is "program_type" or "map_type"; check id is "prog_type:<name>"/"map_type:<name>"."""
    check_name = f"{'prog_type' if kind == 'program_type' else kind}:{name}"
    if probe.error:
        return _check(check_name, False, probe.error, probe.fix)
    key = f"{kind} {name}"
    config_hint = f"{config}=y" if config else "it"
    fix = f"the kernel lacks {kind} {name}: boot a kernel built with {config_hint}"
    if key in probe.available:
        return _check(check_name, True, "available (bpftool feature probe kernel)", fix)
    if key in probe.unavailable:
        return _check(check_name, False, "NOT available (bpftool feature probe kernel)", fix)
    return _check(check_name, False, "not listed by bpftool feature probe kernel", fix)


# --- BTF -------------------------------------------------------------------------------


def check_btf(path: str = "/sys/kernel/btf/vmlinux") -> Check:
    """Kernel BTF is nice to have (bcc compiles against headers instead)."""
    ok = os.path.exists(path)
    detail = f"{path} present" if ok else f"{path} missing"
    fix = "optional: boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (bcc does not need it)"
    return _check("btf", ok, detail, fix, required=False)


# --- mounts: cgroup2 and bpffs ---------------------------------------------------------


def check_cgroup2(mountinfo_path: str = "/proc/self/mountinfo") -> Check:
    """A cgroup v2 hierarchy must be mounted (controllers are not needed)."""
    path = cgroup2_mount(mountinfo_path)
    fix = "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified"
    if path is None:
        return _check("cgroup2", False, f"no cgroup2 mount in {mountinfo_path}", fix)
    return _check("cgroup2", True, f"mounted at {path}", fix)


def check_bpffs(
    bpffs_root: str = "/sys/fs/bpf", fstype_of: Callable[[str], int | None] = statfs_type
) -> Check:
    """bpffs_root must be a bpf filesystem so maps/links can be pinned (attach asks the
    same of its --bpffs directory's parent)."""
    problem = host.bpffs_problem(bpffs_root, fstype_of)
    if problem is None:
        return _check("bpffs", True, f"{bpffs_root} is a bpf filesystem", "")
    return _check("bpffs", False, *problem)


# --- kernel headers for bcc ------------------------------------------------------------


def check_kernel_headers(
    release: str | None = None, modules_dir: str = "/lib/modules", usr_src: str = "/usr/src"
) -> Check:
    """bcc compiles C at run time against /lib/modules/<rel>/build (and .../source).

    Debian splits headers into -amd64 (build: generated/config) and -common (source:
    include/linux/kconfig.h), so kconfig.h is accepted under either link.
    """
    release = os.uname().release if release is None else release
    build = os.path.join(modules_dir, release, "build")
    source = os.path.join(modules_dir, release, "source")

    arch_dirs = sorted(glob.glob(os.path.join(usr_src, "linux-headers-*-amd64")))
    if arch_dirs:
        arch = arch_dirs[-1]
        common = arch[: -len("-amd64")] + "-common"
        how = f"ln -sfn {arch} {build} && ln -sfn {common} {source}"
    else:
        how = (
            f"apt-get install linux-headers-amd64, then link {build} -> "
            f"{usr_src}/linux-headers-<v>-amd64 and {source} -> {usr_src}/linux-headers-<v>-common"
        )
    fix = f"mkdir -p {os.path.dirname(build)} && {how} (scripts/test.sh does this)"

    if not os.path.isdir(build):
        dangling = os.path.islink(build)
        what = f"{build} -> {os.readlink(build)} is dangling" if dangling else f"{build} missing"
        return _check("kernel_headers", False, what, fix)
    for top in (build, source):
        if os.path.isfile(os.path.join(top, "include", "linux", "kconfig.h")):
            detail = f"{build} -> {os.path.realpath(build)}"
            if top == source:
                detail += f", {source} -> {os.path.realpath(source)}"
            return _check("kernel_headers", True, detail, fix)
    detail = f"include/linux/kconfig.h not found under {build} or {source}"
    return _check("kernel_headers", False, detail, fix)


# --- bcc -------------------------------------------------------------------------------


def check_bcc(module: str = "bcc") -> Check:
    """`import bcc` must work in this interpreter (Debian's python3-bpfcc)."""
    fix = (
        "apt-get install python3-bpfcc; run from a venv made with "
        "/usr/bin/python3 -m venv --system-site-packages"
    )
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or OSError when libbcc.so is missing
        detail = f"import {module} failed under {sys.executable}: {type(e).__name__}: {e}"
        return _check("bcc", False, detail, fix)
    where = os.path.dirname(getattr(mod, "__file__", None) or "?")
    if not hasattr(mod, "BPF"):
        detail = f"{module} from {where} has no BPF class (PyPI 'bcc' is an unrelated package)"
        return _check("bcc", False, detail, f"pip uninstall bcc; {fix}")
    version = getattr(mod, "__version__", "unknown version")
    return _check("bcc", True, f"bcc {version} from {where}", fix)


def check_libbpf(load: Callable[[], object] | None = None) -> Check:
    """libbpf (Debian libbpf1) must load: pin, attach, detach and status use it."""
    if load is None:
        from meshaccel.datapath import bpfsys

        load = bpfsys.lib
    try:
        load()
    except Exception as e:  # MeshaccelError or OSError from ctypes
        return _check("libbpf", False, str(e), "apt-get install libbpf1")
    return _check("libbpf", True, "libbpf.so.1 loads", "apt-get install libbpf1")


# --- other programs on meshaccel's hooks -----------------------------------------------


def check_other_programs(
    bpffs: str | None = None,
    euid: int | None = None,
    find: Callable[[str], list[dict]] | None = None,
) -> Check:
    """Other BPF programs on meshaccel's hooks (e.g. Cilium's socket LB on connect4): OK
    with the list; WARN, never FAIL, when one's order is known to break Istio semantics
    (it may be fine, e.g. an LB that leaves pod netns alone)."""
    bpffs = bpffs or loader.DEFAULT_BPFFS
    name = "other_programs"
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        detail = "not checked: reading BPF attachments needs root"
        return _check(name, False, detail, "run meshaccel doctor as root", required=False)
    if find is None:
        if not Pins(bpffs).present():
            detail = f"nothing to compare: meshaccel is not attached (no pins in {bpffs})"
            return _check(name, True, detail, "", required=False)
        find = neighbors.find
    try:
        found = find(bpffs)
    except Exception as e:  # MeshaccelError or OSError: doctor reports, never crashes
        detail = f"could not list the programs on meshaccel's hooks: {e}"
        return _check(name, False, detail, f"meshaccel status --bpffs {bpffs}", required=False)
    bad = neighbors.warnings(found)
    detail = f"other programs on meshaccel's hooks: {neighbors.summary(found)}"
    fix = "; ".join(f"{f['hook']} {f['name'] or '?'} (id {f['id']}) {f['warning']}" for f in bad)
    return _check(name, not bad, detail, fix, required=False)


def check_shortcut(bpffs: str | None = None, status: Callable[[], dict] | None = None) -> Check:
    """Which sockets take the shortcut on the attached datapath: OK, saying so; app
    sockets on it (node-wide or per pod) are the ones the self-test's differences apply
    to. Never FAIL: it reports a choice."""
    from meshaccel.datapath import pods  # (it loads pyroute2: only when attached)

    bpffs = bpffs or loader.DEFAULT_BPFFS
    if status is None and os.geteuid() != 0:
        detail = "not checked: reading the datapath's settings needs root"
        return _check("shortcut", False, detail, "run meshaccel doctor as root", required=False)
    try:
        if status is None:
            if not Pins(bpffs).present():
                detail = f"not attached (no pins in {bpffs})"
                return _check("shortcut", True, detail, "", required=False)
            st = {
                "config": loader.status(bpffs)["config"] or {},
                "pods": pods.list_pods(bpffs, count_sockets=False),
            }
        else:
            st = status()
    except Exception as e:  # MeshaccelError or OSError: doctor reports, never crashes
        detail = f"could not read the datapath's settings: {e}"
        return _check("shortcut", False, detail, f"meshaccel status --bpffs {bpffs}", False)
    config = st["config"]
    opted_in = sorted(p["name"] for p in st["pods"] if p.get("shortcut", "").startswith("apps"))
    kept_off = sorted(p["name"] for p in st["pods"] if p.get("shortcut") == "none")
    if not config.get("shortcut"):
        detail = "off: every byte on TCP (attached with --no-shortcut)"
    elif config.get("app_shortcut"):
        detail = "on for sidecars and every app (--app-shortcut): apps see the sockmap semantics"
    else:
        detail = "on for sidecar-to-sidecar connections; apps keep plain TCP"
        if opted_in:
            shown = ", ".join(opted_in[:5]) + (", ..." if len(opted_in) > 5 else "")
            detail += f" but for {len(opted_in)} pod(s) that opt in: {shown}"
    if kept_off and config.get("shortcut"):
        shown = ", ".join(kept_off[:5]) + (", ..." if len(kept_off) > 5 else "")
        detail += f"; {len(kept_off)} pod(s) keep every hop off (shortcut none): {shown}"
    return _check("shortcut", True, detail, "", required=False)


# --- the kernel self-test (optional: it takes 10-30 s) ------------------------------------


def check_selftest(run: Callable[[], dict] | None = None) -> Check:
    """Run the kernel self-test (meshaccel.datapath.selftest): WARN, never FAIL, naming the TCP
    semantics that differ on the shortcut on this kernel, or that could not be measured."""
    from meshaccel.datapath import selftest

    try:
        report = (run or selftest.run)()
    except Exception as e:  # MeshaccelError, OSError, a bcc compile error: report it
        detail = f"the self-test could not run: {e}"
        return _check("selftest", False, detail, "run meshaccel selftest as root", required=False)
    return selftest_check(report)


def selftest_check(report: dict) -> Check:
    """The doctor check of a self-test report."""
    from meshaccel.datapath import selftest

    detail = selftest.summary(report)
    fix = ""
    if report["differs"]:
        fix = f"{selftest.ADVICE} (details: meshaccel selftest)"
    elif report["unmeasured"]:
        fix = "meshaccel selftest shows why"
    return _check("selftest", not fix, detail, fix, required=False)


# --- all together ----------------------------------------------------------------------


def check_programs_load(load_all: Callable[[], tuple[int, list[str]]] | None = None) -> Check:
    """Every datapath program loads on this kernel: compiled with bcc and given to the
    verifier, nothing pinned or attached. Probing program types is not enough: verifiers
    differ in what they can bound (Debian 12's 6.1 refused a loop 6.12 accepts)."""
    try:
        n, refused = (load_all or _load_all)()
    except MeshaccelError as e:
        return _check("programs_load", False, str(e), "see the bcc and kernel_headers checks")
    if refused:
        return _check(
            "programs_load",
            False,
            "; ".join(refused),
            "this meshaccel does not run on this kernel: report the line above",
        )
    return _check("programs_load", True, f"all {n} programs pass this kernel's verifier", "")


def _load_all() -> tuple[int, list[str]]:
    """Every compiled program, and the tag program pod add assembles for each pod."""
    from bcc import lib

    b = loader.compile_bpf()
    refused = []
    try:
        for prog in programs.PROGRAMS:
            try:
                build.load_program(b, prog)
            except MeshaccelError as e:
                refused.append(str(e).split(" (meshaccel doctor")[0])
        try:
            os.close(lookup_tag.load(1, lib.bpf_table_fd(b.module, b"sk_lookup_netns")))
        except MeshaccelError as e:
            refused.append(str(e))
    finally:
        b.cleanup()
    return len(programs.PROGRAMS) + 1, refused


def run_checks(
    bpffs_root: str = "/sys/fs/bpf",
    bpffs: str | None = None,
    selftest: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[Check]:
    """Run every check against this machine (bpftool is run once).

    bpffs: the datapath's pin directory, for the other-programs check (default:
    meshaccel's default). selftest: also run the kernel self-test (10-30 s; log gets
    its progress lines)."""
    checks = [
        check_root(),
        check_kernel(),
        check_bcc(),
        check_libbpf(),
        check_kernel_headers(),
        check_btf(),
        check_cgroup2(),
        check_bpffs(bpffs_root),
    ]
    if all(c.ok for c in checks if c.name in ("root", "bcc", "kernel_headers")):
        checks.append(check_programs_load())
    else:
        fix = "fix the root, bcc and kernel_headers checks first"
        checks.append(_check("programs_load", False, "not checked", fix))
    probe = run_bpftool_probe()
    checks += [check_bpf_feature("program_type", n, probe, c) for n, c in PROG_TYPES.items()]
    checks += [check_bpf_feature("map_type", n, probe, c) for n, c in MAP_TYPES.items()]
    checks.append(check_other_programs(bpffs))
    checks.append(check_shortcut(bpffs))
    if selftest:
        from meshaccel.datapath import selftest as selftest_mod

        checks.append(check_selftest(lambda: selftest_mod.run(log=log or (lambda _m: None))))
    return checks


def _status(check: Check) -> str:
    if check.ok:
        return "OK"
    return "FAIL" if check.required else "WARN"


def format_text(checks: list[Check]) -> str:
    """One aligned line per check: "OK    name  detail" / "FAIL  name  detail -- fix: ..."."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        line = f"{_status(c):<4}  {c.name:<{width}}  {c.detail}"
        if not c.ok and c.fix:
            line += f" -- fix: {c.fix}"
        lines.append(line)
    return "\n".join(lines)


def exit_code(checks: list[Check]) -> int:
    """0 if every required check passed, else 1."""
    return 0 if all(c.ok or not c.required for c in checks) else 1
