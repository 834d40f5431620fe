"""Which datapath is which: the release, source and map layout a pinned datapath came from,
and how two of them compare. Pure data and comparisons (no kernel access here): the loader
reads and writes the record, meshaccel.datapath.upgrade acts on the comparison.

The record is one JSON value in a small array map pinned beside the datapath
(`datapath_version`), written when a datapath is attached or replaced. It names the
programs' tags, so a record that does not describe the programs actually pinned (say,
after an older release changed them) is not believed. A datapath without a believable
record is of unknown version and always counts as differing.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from meshaccel import __version__
from meshaccel.datapath import structs

RECORD_MAP = "datapath_version"  # pin name, beside the maps
RECORD_VALUE_SIZE = 4096  # one JSON value, NUL-padded
RECORD_SCHEMA = 1

# enum bpf_map_type names, for people (include/uapi/linux/bpf.h)
MAP_TYPES = {
    1: "hash",
    2: "array",
    6: "percpu_array",
    9: "lru_hash",
    18: "sockhash",
    24: "sk_storage",
}


@dataclass(frozen=True)
class MapLayout:
    """What a program compiled against a map relies on: type, key and value size,
    capacity, flags (as bpf_obj_get_info_by_fd reports them)."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0

    @classmethod
    def of(cls, info: object) -> MapLayout:
        """From a bpfsys.MapInfo."""
        return cls(
            info.type,  # type: ignore[attr-defined]
            info.key_size,  # type: ignore[attr-defined]
            info.value_size,  # type: ignore[attr-defined]
            info.max_entries,  # type: ignore[attr-defined]
            info.map_flags,  # type: ignore[attr-defined]
        )

    def as_list(self) -> list[int]:
        return [self.type, self.key_size, self.value_size, self.max_entries, self.flags]

    def describe(self) -> str:
        kind = MAP_TYPES.get(self.type, f"type {self.type}")
        flags = f", flags {self.flags:#x}" if self.flags else ""
        return f"{kind} {self.key_size}->{self.value_size} x{self.max_entries}{flags}"


@dataclass
class Build:
    """One datapath: the release that built it, the hash of its source (as compiled, with
    its cflags), its maps' layouts and its programs' tags (empty before loading)."""

    release: str
    source: str
    cflags: tuple[str, ...] = ()
    maps: dict[str, MapLayout] = field(default_factory=dict)
    programs: dict[str, str] = field(default_factory=dict)

    def short(self) -> str:
        return f"{self.release} (source {self.source[:12]})"


def source_hash(source: str, cflags: Iterable[str] = ()) -> str:
    """sha256 of the C text exactly as compiled (build.bpf_source) and its cflags."""
    h = hashlib.sha256(source.encode())
    for flag in cflags:
        h.update(b"\0" + flag.encode())
    return h.hexdigest()


def encode(build: Build) -> bytes:
    """The record's value: JSON, NUL-padded to RECORD_VALUE_SIZE."""
    data = {
        "schema": RECORD_SCHEMA,
        "release": build.release,
        "source": build.source,
        "cflags": list(build.cflags),
        "maps": {name: layout.as_list() for name, layout in sorted(build.maps.items())},
        "programs": dict(sorted(build.programs.items())),
    }
    raw = json.dumps(data, separators=(",", ":")).encode()
    if len(raw) >= RECORD_VALUE_SIZE:
        raise ValueError(f"version record of {len(raw)} bytes: over {RECORD_VALUE_SIZE}")
    return raw.ljust(RECORD_VALUE_SIZE, b"\0")


def decode(raw: bytes) -> Build | None:
    """A record's Build, or None if it is empty or not one this release can read."""
    text = raw.split(b"\0", 1)[0]
    if not text:
        return None
    try:
        data = json.loads(text)
        if data.get("schema") != RECORD_SCHEMA:
            return None
        return Build(
            release=str(data["release"]),
            source=str(data["source"]),
            cflags=tuple(data.get("cflags", ())),
            maps={name: MapLayout(*layout) for name, layout in data["maps"].items()},
            programs=dict(data["programs"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


def believable(record: Build | None, pinned_tags: Mapping[str, str]) -> bool:
    """Whether the record describes the programs pinned now (every one, by tag)."""
    return record is not None and bool(pinned_tags) and dict(pinned_tags) == record.programs


@dataclass
class MapPlan:
    """How the maps of a running datapath and of a new build relate, by name."""

    same: list[str]  # layout unchanged: the new programs use the pinned map as it is
    changed: dict[str, tuple[MapLayout, MapLayout]]  # old, new: a new map, contents migrated
    added: list[str]  # only in the new build: a new, empty map
    dropped: list[str]  # only in the running one: unpinned once nothing uses it

    @property
    def identical(self) -> bool:
        return not (self.changed or self.added or self.dropped)

    def describe(self) -> str:
        if self.identical:
            return "map layouts unchanged"
        parts = [f"{n}: {a.describe()} -> {b.describe()}" for n, (a, b) in self.changed.items()]
        parts += [f"{n}: new" for n in self.added] + [f"{n}: gone" for n in self.dropped]
        return "map layouts changed (" + "; ".join(parts) + ")"


def compare_maps(running: Mapping[str, MapLayout], new: Mapping[str, MapLayout]) -> MapPlan:
    same = [n for n in new if n in running and running[n] == new[n]]
    changed = {n: (running[n], new[n]) for n in new if n in running and running[n] != new[n]}
    added = [n for n in new if n not in running]
    dropped = [n for n in running if n not in new]
    return MapPlan(same, changed, added, dropped)


def _size(t: type[ctypes.Structure] | type[ctypes._SimpleCData]) -> int:
    return ctypes.sizeof(t)


# What this release's userspace (structs.py, pods.py, pins.py and loader.py in meshaccel/datapath)
# reads and writes in each map: key size, value size. A build that disagrees would have
# userspace write values that programs read with another layout, or misread theirs.
USERSPACE: dict[str, tuple[int, int]] = {
    "config_map": (4, _size(structs.MaConfig)),
    "pod_config": (_size(structs.IpKey), _size(structs.PodConfig)),
    "pod_by_netns": (8, _size(structs.IpKey)),
    "pod_shortcut": (8, _size(structs.ShortcutPolicy)),
    "pod_local_routes": (_size(structs.LocalRouteKey), 1),
    # written by the tag programs userspace assembles (lookup_tag.py), read by sk_lookup
    "sk_lookup_netns": (4, _size(structs.LookupTag)),
    "attach_info_map": (4, _size(structs.AttachInfo)),
    "counters": (4, 8),
    "orig_dst_by_cookie": (8, _size(structs.OrigDst)),
    "orig_dst_by_sock": (_size(structs.SockKey), _size(structs.OrigDst)),
    "sock_hash": (_size(structs.SockKey), 4),
    "nat_peer": (_size(structs.SockKey), _size(structs.SockKey)),
    # (programs only: listed so that a build's layout is checked like every map's)
    "fell_back_sk": (4, 1),
    "fell_back": (_size(structs.SockKey), 1),
    "inbound_listener": (_size(structs.IpKey), 8),
}


# Maps userspace cannot work without: it writes them (settings, pods, adopted listeners)
# or reads them for every status. Any other may be absent from a build (one from before
# it): userspace then reads nothing there (pod_shortcut: every pod reads as on;
# sk_lookup_netns: pods are linked without a tag program, found by address alone;
# pod_local_routes: no prefix routed into a pod counts as local to it).
REQUIRED = frozenset(
    {"config_map", "attach_info_map", "pod_config", "pod_by_netns", "inbound_listener", "counters"}
)
OPTIONAL = frozenset(USERSPACE) - REQUIRED


def userspace_mismatches(layouts: Mapping[str, MapLayout]) -> list[str]:
    """Where a build's maps differ from what this release's userspace reads and writes
    (empty: they agree)."""
    out = []
    for name, (key, value) in USERSPACE.items():
        layout = layouts.get(name)
        if layout is None and name in OPTIONAL:
            continue
        if layout is None:
            out.append(f"{name}: missing")
        elif (layout.key_size, layout.value_size) != (key, value):
            out.append(
                f"{name}: {layout.key_size}->{layout.value_size} bytes, "
                f"this release uses {key}->{value}"
            )
    # (the number of counters may differ: userspace only reads them, a counter it does not
    # know is not shown and one the build lacks reads as 0)
    return out


def cli_build(source: str, cflags: Iterable[str] = ()) -> Build:
    """This release's build of a source text (layouts and tags known only once compiled)."""
    cflags = tuple(cflags)
    return Build(__version__, source_hash(source, cflags), cflags)


def describe(build: Build | None) -> str:
    return build.short() if build else "unknown version"
