"""Compile, load, pin, attach and detach the datapath; its status.

Everything attach creates is pinned under one bpffs directory, so that detach and status
work from any later process: cgroup attachments outlive the process that made them.
The programs are listed in programs.py and built in build.py; what the pins hold is read
and written in pins.py.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from meshaccel.datapath import bpfsys, build, programs, structs, version
from meshaccel.datapath.build import (
    check_userspace,
    compiled_layouts,
    load_program,
)
from meshaccel.datapath.capture import ISTIO_INJECTION_DEFAULT_ARGS, parse_istio_args, to_istio_args
from meshaccel.datapath.host import check_bpffs, check_cgroup, check_root, default_cgroup
from meshaccel.datapath.pins import (
    Pins,
    attached_cgroup,
    default_args,
    forget_fds,
    pin_fd,
    pinned_tags,
    prog_id,
    read_counters,
    read_record,
    read_state,
    running_build,
    write_record,
    write_settings,
)
from meshaccel.datapath.programs import ADDED_PROGRAMS, Program
from meshaccel.errors import MeshaccelError

BPF_DIR = Path(os.environ.get("MESHACCEL_BPF_DIR", Path(__file__).resolve().parents[2] / "bpf"))
DEFAULT_BPFFS = "/sys/fs/bpf/meshaccel"

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def check_port(option: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise MeshaccelError(f"{option} {port}: must be a TCP port from 1 to 65535")


# ---------------------------------------------------------------- compile


def bpf_source(bpf_dir: Path = BPF_DIR) -> str:
    """All programs as one C text (build.bpf_source), from BPF_DIR by default."""
    return build.bpf_source(bpf_dir)


def compile_bpf(bpf_dir: Path | None = None, cflags: list[str] | None = None):  # -> bcc.BPF
    """Every program compiled from BPF_DIR by default (build.compile_bpf), not loaded."""
    return build.compile_bpf(bpf_dir or BPF_DIR, cflags)


# ---------------------------------------------------------------- attach


def attach(
    cgroup: str | None = None,
    bpffs: str = DEFAULT_BPFFS,
    istio_args: str = ISTIO_INJECTION_DEFAULT_ARGS,
    proxy_port: int | None = None,
    proxy_uid: int | None = None,
    log: Log = _quiet,
    shortcut: bool = True,
    bpf_dir: Path | None = None,
    cflags: list[str] | None = None,
    before_shortcut: Callable[[], None] | None = None,
    app_shortcut: bool = False,
) -> str:
    """Attach the datapath to a cgroup (idempotent, all-or-nothing). Returns a summary.

    Only pods registered with meshaccel.datapath.pods.add are captured; istio_args (with
    proxy_port/proxy_uid overriding its -p/-u) are what a pod gets when it is added
    without its own. shortcut=False keeps capture and SO_ORIGINAL_DST but leaves all
    bytes on TCP. With the shortcut, sidecar<->sidecar sockets take it, and app<->sidecar
    sockets only with app_shortcut=True or where their pod opts in (pods.add's annotation):
    on it, an app sees the kernel's sockmap semantics (see README, known limitations).

    A datapath already attached there from the same source is adopted (settings
    updated); one from another source (another release, or of unknown version) is
    replaced in place under traffic (meshaccel.datapath.upgrade), or the attach is refused with
    nothing changed. bpf_dir and cflags: the C source to build (default BPF_DIR, none).
    before_shortcut runs once the arguments are checked, before anything is loaded, when
    the shortcut is to be on for apps (the CLI's kernel self-test).
    """
    defaults = default_capture(istio_args, proxy_port, proxy_uid)
    mode = shortcut_mode(shortcut, app_shortcut)
    check_root()
    cgroup = check_cgroup(cgroup or default_cgroup())
    check_bpffs(bpffs)
    if mode == structs.SHORTCUT_ALL and before_shortcut:
        before_shortcut()
    pins = Pins(bpffs)
    bpf_dir = bpf_dir or BPF_DIR
    cflags = list(cflags or [])

    if pins.present():
        state = read_state(bpffs)
        # every program pinned and on its hook: a datapath, maybe of another release with
        # other maps or without a program added since (the replace makes what it lacks)
        whole = all(ok or name in ADDED_PROGRAMS for name, ok in state.attached.items())
        if whole and state.cgroup == cgroup:
            running = running_build(bpffs)
            cli = version.cli_build(bpf_source(bpf_dir), cflags)
            if state.complete and running is not None and running.source == cli.source:
                write_settings(pins, cgroup, defaults, mode)
                return (
                    f"already attached to {cgroup} (datapath {running.short()}); settings "
                    f"updated ({_settings(defaults, mode)})"
                )
            from meshaccel.datapath import upgrade  # (it imports this module)

            summary = upgrade.replace(
                cgroup, pins, defaults, mode, running, cli, bpf_dir, cflags, log
            )
            return f"{summary} ({_settings(defaults, mode)})"
        if whole and state.cgroup:
            raise MeshaccelError(
                f"{bpffs} is already attached to {state.cgroup}: run meshaccel detach "
                f"--bpffs {bpffs} first, or use another --bpffs"
            )
        log(f"{bpffs} holds a partial datapath ({', '.join(state.missing)} missing): removing it")
        detach(bpffs=bpffs, log=log)

    undo: list[Callable[[], None]] = []
    try:
        _attach_fresh(cgroup, pins, defaults, mode, log, undo, bpf_dir, cflags)
    except BaseException as e:
        log("attach failed: undoing what was done")
        for step in reversed(undo):
            try:
                step()
            except OSError:
                pass
        forget_fds()
        if isinstance(e, MeshaccelError):
            raise
        if isinstance(e, OSError):
            raise MeshaccelError(f"attach failed, nothing left attached: {e}") from e
        raise
    return f"attached to {cgroup} ({_settings(defaults, mode)}), pinned in {bpffs}"


def default_capture(istio_args: str, proxy_port: int | None, proxy_uid: int | None) -> str:
    """The istio-iptables args pods get by default, validated and spelled out."""
    cfg = parse_istio_args(istio_args)
    if proxy_port is not None:
        check_port("--proxy-port", proxy_port)
        cfg = replace(cfg, proxy_port=proxy_port)
    if proxy_uid is not None:
        if not 0 <= proxy_uid <= 0xFFFFFFFE:
            raise MeshaccelError(f"--proxy-uid {proxy_uid}: must be a uid from 0 to 4294967294")
        cfg = replace(cfg, proxy_uids=(proxy_uid,), proxy_gids=(proxy_uid,))
    defaults = shlex.join(to_istio_args(cfg))
    if len(defaults.encode()) > 511:  # (recorded whole in attach_info, or not at all)
        raise MeshaccelError(
            f"--istio-iptables-args: {len(defaults.encode())} bytes spelled out, the datapath "
            "records at most 511 (fewer CIDRs or ports; give pods longer lists by annotation)"
        )
    return defaults


def shortcut_mode(shortcut: bool, app_shortcut: bool) -> int:
    """config_map's enum shortcut_mode for attach's two switches."""
    if not shortcut:
        return structs.SHORTCUT_OFF
    return structs.SHORTCUT_ALL if app_shortcut else structs.SHORTCUT_SIDECARS


SHORTCUT_MODE_TEXT = {
    structs.SHORTCUT_OFF: "off",
    structs.SHORTCUT_ALL: "on for sidecars and apps",
    structs.SHORTCUT_SIDECARS: "on for sidecars, apps where their pod opts in",
}


def _settings(defaults: str, mode: int) -> str:
    return f"shortcut {SHORTCUT_MODE_TEXT[mode]}; pods get: {defaults}"


def _attach_fresh(
    cgroup: str,
    pins: Pins,
    defaults: str,
    mode: int,
    log: Log,
    undo: list[Callable[[], None]],
    bpf_dir: Path,
    cflags: list[str],
) -> None:
    log("compiling eBPF programs with bcc (a few seconds)")
    this_build = version.cli_build(bpf_source(bpf_dir), cflags)
    b = compile_bpf(bpf_dir, cflags)
    try:
        this_build.maps = compiled_layouts(b)
        check_userspace(this_build, bpf_dir)
        _load_pin_attach(b, cgroup, pins, defaults, mode, log, undo)
        this_build.programs = pinned_tags(pins)
        undo.append(lambda: os.path.exists(pins.record()) and os.unlink(pins.record()))
        write_record(pins, this_build)
    finally:
        b.cleanup()  # closes our fds; pins and attachments keep everything alive


def _load_pin_attach(
    b,
    cgroup: str,
    pins: Pins,
    defaults: str,
    mode: int,
    log: Log,
    undo: list[Callable[[], None]],
) -> None:
    from bcc import lib

    os.mkdir(pins.dir, 0o700)  # root-only; the pins in it are 0600 (bpffs' own default)
    undo.append(lambda: os.rmdir(pins.dir))
    for name in structs.MAPS:
        # (bcc 0.26 cannot wrap a SOCKHASH in get_table(): take every fd the same raw way)
        fd = lib.bpf_table_fd(b.module, name.encode())
        if fd >= 0:  # (absent from another release's source, which check_userspace allowed)
            _pin(fd, pins.map(name), undo)
    write_settings(pins, cgroup, defaults, mode)

    cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for prog in programs.PROGRAMS:
            fn = load_program(b, prog)
            _pin(fn.fd, pins.prog(prog), undo)
            if prog.hook == "netns":
                log(f"loaded {prog.name} (linked into each pod's netns by meshaccel pod add)")
                continue
            if prog.hook == "cgroup":
                bpfsys.prog_attach(fn.fd, cgroup_fd, prog.attach_type, bpfsys.F_ALLOW_MULTI)
            else:
                bpfsys.prog_attach(fn.fd, pin_fd(pins.map(prog.hook)), prog.attach_type)
            # (undo runs after bcc closed its fds: it works from the pins, like detach)
            undo.append(lambda prog=prog: _detach_prog(pins, prog, cgroup))
            log(f"attached {prog.name} to {cgroup if prog.hook == 'cgroup' else prog.hook}")
    finally:
        os.close(cgroup_fd)


def _pin(fd: int, path: str, undo: list[Callable[[], None]]) -> None:
    bpfsys.obj_pin(fd, path)
    undo.append(lambda: os.unlink(path))


def datapath_matches(bpffs: str, bpf_dir: Path | None = None) -> bool:
    """Whether the datapath pinned at bpffs was built from this release's source (then
    attach only adopts it; otherwise it compiles and replaces)."""
    running = running_build(bpffs)
    return running is not None and running.source == version.source_hash(
        bpf_source(bpf_dir or BPF_DIR)
    )


def datapath_version(bpffs: str) -> dict:
    """The running datapath's version next to this CLI's, and whether they match
    (JSON-ready; the "datapath" key of status)."""
    pins = Pins(bpffs)
    cli = version.cli_build(bpf_source(BPF_DIR))
    record = read_record(pins)
    running = record if version.believable(record, pinned_tags(pins)) else None
    note = None
    if running is None and not os.path.exists(pins.record()):
        note = "no version record (pinned by a release before records)"
    elif running is None:
        note = (
            "a version record this release cannot read"
            if record is None
            else "the record does not describe the programs pinned now"
        )
    return {
        "running": {
            "release": running.release if running else None,
            "source": running.source if running else None,
            "cflags": list(running.cflags) if running else None,
            "version": version.describe(running),
            "note": note,
        },
        "cli": {"release": cli.release, "source": cli.source, "version": cli.short()},
        "matches": running is not None and running.source == cli.source,
    }


def status(bpffs: str = DEFAULT_BPFFS) -> dict:
    """What is attached where, map occupancy and every counter (JSON-ready)."""
    from meshaccel.datapath import neighbors  # (it imports this module)

    check_root()
    pins = Pins(bpffs)
    if not pins.present():
        return {
            "bpffs": bpffs,
            "attached": False,
            "cgroup": None,
            "programs": [],
            "maps": {},
            "counters": {},
            "config": None,
            "other_programs": [],
            "datapath": None,
        }
    state = read_state(bpffs)
    progs = []
    for prog in programs.PROGRAMS:
        path = pins.prog(prog)
        progs.append(
            {
                "name": prog.name,
                "hook": prog.hook,
                "id": prog_id(path) if os.path.exists(path) else None,
                "attached": state.attached[prog.name],
            }
        )
    map_stats = {}
    for name in structs.MAPS:
        path = pins.map(name)
        if not os.path.exists(path):
            continue
        info = bpfsys.map_info(pin_fd(path))
        entries = None
        if name in structs.ENTRY_MAPS:
            entries = sum(1 for _ in bpfsys.map_keys(pin_fd(path), info.key_size))
        map_stats[name] = {"entries": entries, "capacity": info.max_entries}
    config = None
    if os.path.exists(pins.map("config_map")):
        cfg = structs.MaConfig()
        bpfsys.map_lookup(pin_fd(pins.map("config_map")), ctypes.c_uint32(0), cfg)
        config = {
            "shortcut": cfg.shortcut != structs.SHORTCUT_OFF,
            "app_shortcut": cfg.shortcut == structs.SHORTCUT_ALL,
            "shortcut_mode": cfg.shortcut,
            "default_istio_iptables_args": default_args(bpffs),
        }
    return {
        "bpffs": bpffs,
        "attached": state.complete,
        "cgroup": state.cgroup,
        "missing": state.missing,
        "programs": progs,
        "maps": map_stats,
        "counters": read_counters(bpffs) if os.path.exists(pins.map("counters")) else {},
        "config": config,
        # other programs on the same hooks, and whether their order breaks capture
        "other_programs": neighbors.find(bpffs, state.cgroup),
        # which release and source the running datapath came from, next to this CLI's
        "datapath": datapath_version(bpffs),
    }


# ---------------------------------------------------------------- detach


def detach(cgroup: str | None = None, bpffs: str = DEFAULT_BPFFS, log: Log = _quiet) -> str:
    """Remove every attachment and pin of the datapath in bpffs. Idempotent.

    Works from any process: program fds come from the pins. When the pins are gone but a
    cgroup is named, programs with meshaccel's names found on that cgroup are detached.
    """
    check_root()
    pins = Pins(bpffs)
    if cgroup is not None:
        cgroup = check_cgroup(cgroup)
    if not pins.present():
        if cgroup is None:
            return f"nothing attached from {bpffs}"
        n = _detach_by_name(cgroup, log)
        return f"no pins in {bpffs}; detached {n} meshaccel program(s) found on {cgroup}"
    cgroup = cgroup or attached_cgroup(pins)
    for prog in reversed(programs.PROGRAMS):
        if prog.name == "getsockopt":  # capture (connect4/6) is gone by now
            _wait_for_captured(pins, log)
        if os.path.exists(pins.prog(prog)):
            _detach_prog(pins, prog, cgroup)
            os.unlink(pins.prog(prog))
            log(f"detached {prog.name}")
    for path in pins.present():
        os.unlink(path)
    try:
        os.rmdir(pins.dir)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ENOTEMPTY:
            raise
        log(f"left {pins.dir} in place: it holds pins meshaccel did not make")
    forget_fds()
    return f"detached from {cgroup or 'its cgroup'} and removed the pins in {bpffs}"


CAPTURED_WAIT_SECONDS = 5.0


def _wait_for_captured(pins: Pins, log: Log, timeout: float = CAPTURED_WAIT_SECONDS) -> None:
    """Connections connect4/6 sent to a sidecar that has not yet read SO_ORIGINAL_DST (it
    accepts them late under load) still need getsockopt: conntrack cannot tell where they
    were going, the rewrite came before any NAT, and a sidecar told "127.0.0.1:15001"
    forwards the connection to itself. Wait for them, up to timeout."""
    path = pins.map("orig_dst_by_sock")
    if not os.path.exists(path):
        return
    time.sleep(0.05)  # handshakes under way on loopback: their entries reach the map
    deadline = time.monotonic() + timeout
    said = False
    while waiting := _unasked(pin_fd(path)):
        if time.monotonic() >= deadline:
            log(f"{waiting} captured connection(s) not accepted by their sidecar: detaching")
            return
        if not said:
            log(f"waiting for the sidecars to accept {waiting} captured connection(s)")
            said = True
        time.sleep(0.05)


def _unasked(fd: int) -> int:
    """Entries of orig_dst_by_sock for rewritten connections whose sidecar has not asked."""
    n = 0
    value = structs.OrigDst()
    for raw in bpfsys.map_keys(fd, ctypes.sizeof(structs.SockKey)):
        if bpfsys.map_lookup(fd, structs.SockKey.from_buffer_copy(raw), value):
            n += (value.flags & (structs.OD_REWRITTEN | structs.OD_ASKED)) == structs.OD_REWRITTEN
    return n


def _detach_prog(pins: Pins, prog: Program, cgroup: str | None) -> None:
    """Detach one pinned program from its hook (if it is still attached there)."""
    fd = pin_fd(pins.prog(prog))
    if prog.hook == "netns":
        for link in pins.links():  # one per pod: unpinning the link detaches it
            os.unlink(link)
    elif prog.hook != "cgroup":
        map_pin = pins.map(prog.hook)
        if os.path.exists(map_pin):
            _detach_quietly(fd, pin_fd(map_pin), prog.attach_type)
    elif cgroup and os.path.isdir(cgroup):
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _detach_quietly(fd, cg_fd, prog.attach_type)
        finally:
            os.close(cg_fd)


def _detach_by_name(cgroup: str, log: Log) -> int:
    names = {p.func: p for p in programs.PROGRAMS if p.hook == "cgroup"}
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    n = 0
    try:
        for attach_type in sorted({p.attach_type for p in names.values()}):
            for prog_id in bpfsys.prog_query(cg_fd, attach_type):
                fd = bpfsys.prog_fd_by_id(prog_id)
                try:
                    name = bpfsys.prog_info(fd).name.decode()
                    if name in names:
                        _detach_quietly(fd, cg_fd, attach_type)
                        log(f"detached {name} (id {prog_id})")
                        n += 1
                finally:
                    os.close(fd)
    finally:
        os.close(cg_fd)
    return n


def _detach_quietly(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """Detach; a program that is not (or no longer) attached there is fine."""
    try:
        bpfsys.prog_detach(prog_fd, target_fd, attach_type)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EINVAL):
            raise
