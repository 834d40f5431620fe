"""What a datapath's pins hold: where each map and program is pinned, and the state,
settings, version record and counters read back from them.

Everything here works from the pins alone (no compiler), so status, detach and pod add
work from any process.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from meshaccel.datapath import bpfsys, programs, structs, version
from meshaccel.datapath.capture import ISTIO_INJECTION_DEFAULT_ARGS
from meshaccel.datapath.programs import Program

# pin names of the links in each registered pod's netns, with its netns cookie after
# them (both "link_": what a release before tags removes at detach, as it should)
LINK_PREFIX = "link_sk_lookup_"
TAG_LINK_PREFIX = "link_tag_"


class Pins:
    """Where each map and program of one datapath is pinned."""

    def __init__(self, bpffs: str) -> None:
        self.dir = bpffs.rstrip("/")

    def map(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def prog(self, prog: Program) -> str:
        return f"{self.dir}/prog_{prog.name}"

    def all(self) -> list[str]:
        return [self.map(m) for m in structs.MAPS] + [self.prog(p) for p in programs.PROGRAMS]

    def link(self, netns_cookie: int) -> str:
        """The pinned sk_lookup link of one pod's netns."""
        return f"{self.dir}/{LINK_PREFIX}{netns_cookie}"

    def tag_link(self, netns_cookie: int) -> str:
        """The pinned link of one pod's tag program (lookup_tag.py), which runs before
        its sk_lookup link; absent for a pod linked by a release before tags."""
        return f"{self.dir}/{TAG_LINK_PREFIX}{netns_cookie}"

    def links(self) -> list[str]:
        """Every pod's sk_lookup link (the ones that run ma_sk_lookup; not tag links)."""
        return self._named(LINK_PREFIX)

    def tag_links(self) -> list[str]:
        """Every pod's tag link (each runs a program of its own, never ma_sk_lookup)."""
        return self._named(TAG_LINK_PREFIX)

    def _named(self, prefix: str) -> list[str]:
        if not os.path.isdir(self.dir):
            return []
        return [f"{self.dir}/{n}" for n in sorted(os.listdir(self.dir)) if n.startswith(prefix)]

    def record(self) -> str:
        """The version record (not in all(): a datapath pinned by a release before records
        is complete without one)."""
        return f"{self.dir}/{version.RECORD_MAP}"

    def present(self) -> list[str]:
        found = [p for p in self.all() if os.path.exists(p)] + self.tag_links() + self.links()
        return found + ([self.record()] if os.path.exists(self.record()) else [])


_fds: dict[str, int] = {}


def pin_fd(pin: str) -> int:
    """fd of a pin, opened once per process and per pin inode."""
    key = f"{pin}:{os.stat(pin).st_ino}"
    if key not in _fds:
        _fds[key] = bpfsys.obj_get(pin)
    return _fds[key]


def write_settings(pins: Pins, cgroup: str, defaults: str, mode: int) -> None:
    """The settings into the pinned config_map and attach_info_map."""
    config_fd, info_fd = pin_fd(pins.map("config_map")), pin_fd(pins.map("attach_info_map"))
    write_settings_to(config_fd, info_fd, cgroup, defaults, mode)


def write_settings_to(config_fd: int, info_fd: int, cgroup: str, defaults: str, mode: int) -> None:
    """The settings (mode: enum shortcut_mode) into config_map and attach_info_map (given
    by fd: pinned or new)."""
    cfg = structs.MaConfig(shortcut=mode)
    bpfsys.map_update(config_fd, ctypes.c_uint32(0), cfg)
    info = structs.AttachInfo(
        cgroup_id=os.stat(cgroup).st_ino,
        cgroup_path=cgroup.encode(),
        default_args=defaults.encode(),
    )
    bpfsys.map_update(info_fd, ctypes.c_uint32(0), info)


def attach_info(pins: Pins) -> structs.AttachInfo | None:
    path = pins.map("attach_info_map")
    if not os.path.exists(path):
        return None
    info = structs.AttachInfo()
    bpfsys.map_lookup(pin_fd(path), ctypes.c_uint32(0), info)
    return info


def pinned_tags(pins: Pins) -> dict[str, str]:
    """Tag of each pinned program, by name."""
    out = {}
    for prog in programs.PROGRAMS:
        if os.path.exists(pins.prog(prog)):
            fd = bpfsys.obj_get(pins.prog(prog))
            try:
                out[prog.name] = bpfsys.prog_tag(fd)
            finally:
                os.close(fd)
    return out


def pinned_layouts(pins: Pins) -> dict[str, version.MapLayout]:
    """Each pinned map's layout, as the kernel reports it."""
    out = {}
    for name in structs.MAPS:
        if os.path.exists(pins.map(name)):
            out[name] = version.MapLayout.of(bpfsys.map_info(pin_fd(pins.map(name))))
    return out


def read_record(pins: Pins) -> version.Build | None:
    """The version record as written, believable or not (None: absent or unreadable)."""
    if not os.path.exists(pins.record()):
        return None
    raw = ctypes.create_string_buffer(version.RECORD_VALUE_SIZE)
    fd = pin_fd(pins.record())
    if bpfsys.map_info(fd).value_size != version.RECORD_VALUE_SIZE:
        return None
    if not bpfsys.map_lookup(fd, ctypes.c_uint32(0), raw):
        return None
    return version.decode(raw.raw)


def running_build(bpffs: str) -> version.Build | None:
    """The running datapath's Build if its record describes the programs pinned now, else
    None (unknown version: pinned by an older release, or changed since)."""
    pins = Pins(bpffs)
    record = read_record(pins)
    return record if version.believable(record, pinned_tags(pins)) else None


def write_record(pins: Pins, build: version.Build) -> None:
    """Create (once) and fill the version record map."""
    path = pins.record()
    if not os.path.exists(path):
        fd = bpfsys.map_create(bpfsys.MAP_TYPE_ARRAY, "ma_version", 4, version.RECORD_VALUE_SIZE, 1)
        try:
            bpfsys.obj_pin(fd, path)
        finally:
            os.close(fd)
    raw = ctypes.create_string_buffer(version.encode(build), version.RECORD_VALUE_SIZE)
    bpfsys.map_update(pin_fd(path), ctypes.c_uint32(0), raw)


def default_args(bpffs: str) -> str:
    """The istio-iptables args a pod gets when added without its own."""
    info = attach_info(Pins(bpffs))
    return info.default_args.decode() if info else ISTIO_INJECTION_DEFAULT_ARGS


# ---------------------------------------------------------------- state


@dataclass
class State:
    bpffs: str
    cgroup: str | None
    missing: list[str]  # pins that should be there and are not
    attached: dict[str, bool]  # program name -> found on its hook

    @property
    def complete(self) -> bool:
        return not self.missing and all(self.attached.values())


def read_state(bpffs: str) -> State:
    pins = Pins(bpffs)
    missing = [os.path.basename(p) for p in pins.all() if not os.path.exists(p)]
    cgroup = attached_cgroup(pins)
    attached: dict[str, bool] = {}
    for prog in programs.PROGRAMS:
        path = pins.prog(prog)
        if not os.path.exists(path):
            attached[prog.name] = False
        elif prog.hook != "cgroup":
            attached[prog.name] = True  # lives as long as its pin (and map, and pod links)
        else:
            attached[prog.name] = cgroup is not None and prog_id(path) in _query(cgroup, prog)
    return State(bpffs, cgroup, missing, attached)


def attached_cgroup(pins: Pins) -> str | None:
    info = attach_info(pins)
    return (info.cgroup_path.decode() or None) if info else None


def prog_id(pin: str) -> int:
    return bpfsys.prog_info(pin_fd(pin)).id


def _query(cgroup: str, prog: Program) -> list[int]:
    try:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return []
    try:
        return bpfsys.prog_query(fd, prog.attach_type)
    finally:
        os.close(fd)


def read_counters(bpffs: str) -> dict[str, int]:
    """Every counter summed over CPUs, by its name in structs.COUNTERS."""
    fd = pin_fd(Pins(bpffs).map("counters"))
    ncpu = bpfsys.possible_cpus()
    out = {}
    for idx, name in enumerate(structs.COUNTERS):
        per_cpu = (ctypes.c_uint64 * ncpu)()
        bpfsys.map_lookup(fd, ctypes.c_uint32(idx), per_cpu)
        out[name] = sum(per_cpu)
    return out


def forget_fds() -> None:
    """Close every fd pin_fd opened (the pins behind them were removed or replaced)."""
    for fd in _fds.values():
        os.close(fd)
    _fds.clear()
