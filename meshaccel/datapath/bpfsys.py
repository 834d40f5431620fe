"""Thin ctypes access to libbpf's low-level bpf(2) wrappers (Debian libbpf1).

Used for everything after loading: pinning, attaching, detaching, querying and reading
maps. It needs no compiler, so `status` and `detach` work without bcc or headers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator

from meshaccel.errors import MeshaccelError

# enum bpf_attach_type (include/uapi/linux/bpf.h)
CGROUP_SOCK_OPS = 3
SK_SKB_STREAM_VERDICT = 5
SK_MSG_VERDICT = 7
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_GETSOCKOPT = 21
CGROUP_INET4_GETPEERNAME = 29
CGROUP_INET6_GETPEERNAME = 30
SK_LOOKUP = 36

PROG_TYPE_SK_LOOKUP = 30  # enum bpf_prog_type

F_ALLOW_MULTI = 2  # coexist with other programs on the same cgroup hook
F_REPLACE = 4  # with F_ALLOW_MULTI: swap one attached program for another in its slot

MAP_TYPE_ARRAY = 2  # enum bpf_map_type


class MapInfo(ctypes.Structure):
    """Leading part of struct bpf_map_info (the kernel accepts a shorter info_len)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class ProgInfo(ctypes.Structure):
    """Leading part of struct bpf_prog_info, up to the name."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


def _load_libbpf() -> ctypes.CDLL:
    path = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(path, use_errno=True)
    except OSError as e:
        raise MeshaccelError(f"cannot load libbpf ({e}): apt-get install libbpf1") from e
    for name in ("bpf_obj_get", "bpf_prog_get_fd_by_id", "libbpf_num_possible_cpus"):
        getattr(lib, name).restype = ctypes.c_int
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_prog_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
    lib.bpf_prog_detach2.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.bpf_prog_query.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
    ]
    lib.bpf_obj_get_info_by_fd.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint32),
    ]
    lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.bpf_prog_attach_opts.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    lib.bpf_link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.bpf_map_create.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint32,
        ctypes.c_uint32,
        ctypes.c_uint32,
        ctypes.c_void_p,
    ]
    lib.bpf_map_create.restype = ctypes.c_int
    lib.bpf_prog_load.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
    ]
    lib.bpf_prog_load.restype = ctypes.c_int
    lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
    for name in ("bpf_map_lookup_elem", "bpf_map_update_elem", "bpf_map_get_next_key"):
        getattr(lib, name).argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + (
            [ctypes.c_uint64] if name == "bpf_map_update_elem" else []
        )
    return lib


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load_libbpf()
    return _lib


def _check(ret: int, what: str) -> int:
    """libbpf 1.x returns -errno on failure."""
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def obj_get(path: str) -> int:
    """fd of a pinned map or program; FileNotFoundError if the pin is not there."""
    return _check(lib().bpf_obj_get(path.encode()), f"open pin {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    _check(lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(lib().bpf_prog_detach2(prog_fd, target_fd, attach_type), "detach")


class _AttachOpts(ctypes.Structure):
    """struct bpf_prog_attach_opts up to replace_prog_fd (libbpf takes a shorter sz)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("flags", ctypes.c_uint32),
        ("replace_prog_fd", ctypes.c_int),
    ]


class _LinkUpdateOpts(ctypes.Structure):
    """struct bpf_link_update_opts up to old_prog_fd."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("flags", ctypes.c_uint32),
        ("old_prog_fd", ctypes.c_uint32),
    ]


def prog_replace(prog_fd: int, target_fd: int, attach_type: int, old_prog_fd: int) -> None:
    """Swap old_prog_fd's program attached (multi) to a cgroup hook for prog_fd's, in the
    same slot: the kernel rebuilds the hook's effective array with the new program where
    the old one was and publishes it at once (no moment with neither, none with both)."""
    opts = _AttachOpts(ctypes.sizeof(_AttachOpts), F_ALLOW_MULTI | F_REPLACE, old_prog_fd)
    _check(
        lib().bpf_prog_attach_opts(prog_fd, target_fd, attach_type, ctypes.byref(opts)),
        "replace attached program",
    )


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int) -> None:
    """Point a BPF link at another program, only if it still runs old_prog_fd's
    (BPF_F_REPLACE); for a netns link this swaps one slot of the netns' run array."""
    opts = _LinkUpdateOpts(ctypes.sizeof(_LinkUpdateOpts), F_REPLACE, old_prog_fd)
    _check(lib().bpf_link_update(link_fd, new_prog_fd, ctypes.byref(opts)), "update link")


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    """A new map (fd), made from userspace rather than compiled C."""
    fd = lib().bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries, None)
    return _check(fd, f"create map {name}")


class _ProgLoadOpts(ctypes.Structure):
    """struct bpf_prog_load_opts up to log_buf (libbpf 1.1, Debian 12's; a newer libbpf
    takes the shorter sz)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
        ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_void_p),
    ]


def prog_load(prog_type: int, name: str, insns: bytes, expected_attach_type: int = 0) -> int:
    """Load raw instructions (struct bpf_insn, 8 bytes each; license GPL) as a program:
    its fd. A refusal is one MeshaccelError line with the verifier's reason (libbpf asks
    the kernel again with the log on when the first try fails)."""
    log = ctypes.create_string_buffer(1 << 16)
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts))
    opts.expected_attach_type = expected_attach_type
    opts.log_size, opts.log_buf = len(log), ctypes.addressof(log)
    code = ctypes.create_string_buffer(insns, len(insns))
    fd = lib().bpf_prog_load(
        prog_type, name.encode(), b"GPL", code, len(insns) // 8, ctypes.byref(opts)
    )
    if fd >= 0:
        return fd
    stats = ("processed ", "verification time", "stack depth", "max_states_per_insn")
    lines = [ln.strip() for ln in log.value.decode(errors="replace").splitlines() if ln.strip()]
    while lines and lines[-1].startswith(stats):
        lines.pop()
    reason = lines[-1] if lines else os.strerror(-fd)
    raise MeshaccelError(f"kernel {os.uname().release} refused {name}: {reason}")


def prog_tag(fd: int) -> str:
    """The kernel's tag of a program (hash of its instructions, map references zeroed):
    equal tags, same code."""
    return bytes(prog_info(fd).tag).hex()


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link (e.g. sk_lookup into a netns); it lasts while its fd or a pin does."""
    return _check(lib().bpf_link_create(prog_fd, target_fd, attach_type, None), "link")


QUERY_EFFECTIVE = 1  # BPF_F_QUERY_EFFECTIVE: a cgroup's effective array, in run order


def prog_query(target_fd: int, attach_type: int, flags: int = 0) -> list[int]:
    """IDs of the programs attached to a cgroup or netns at one hook (with
    QUERY_EFFECTIVE: the array the kernel runs, in run order, ancestors' included)."""
    size = 64
    while True:
        ids = (ctypes.c_uint32 * size)()
        cnt = ctypes.c_uint32(size)
        attach_flags = ctypes.c_uint32(0)
        ret = lib().bpf_prog_query(
            target_fd, attach_type, flags, ctypes.byref(attach_flags), ids, ctypes.byref(cnt)
        )
        if ret == -errno.ENOSPC and cnt.value > size:  # more than fit: ask again
            size = cnt.value
            continue
        _check(ret, "query attached programs")
        return list(ids[: cnt.value])


def prog_fd_by_id(prog_id: int) -> int:
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "prog info")
    return info


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return info


def possible_cpus() -> int:
    return _check(lib().libbpf_num_possible_cpus(), "count possible CPUs")


def map_update(fd: int, key: ctypes.Structure | ctypes._SimpleCData, value: object) -> None:
    _check(
        lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0),  # type: ignore[arg-type]
        "map update",
    )


def map_lookup(fd: int, key: object, value: object) -> bool:
    """Fills value; False if the key is absent."""
    ret = lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))  # type: ignore[arg-type]
    if ret == -2:  # ENOENT
        return False
    _check(ret, "map lookup")
    return True


def map_delete(fd: int, key: object) -> bool:
    """False if the key was not there."""
    ret = lib().bpf_map_delete_elem(fd, ctypes.byref(key))  # type: ignore[arg-type]
    if ret == -2:  # ENOENT
        return False
    _check(ret, "map delete")
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key of a hash-like map (including sockhash), as raw bytes."""
    prev = None
    key = ctypes.create_string_buffer(key_size)
    while True:
        ret = lib().bpf_map_get_next_key(fd, prev, key)
        if ret == -2:  # ENOENT: no more keys
            return
        _check(ret, "map iterate")
        yield key.raw
        prev = ctypes.create_string_buffer(key.raw, key_size)


BPF_FS_MAGIC = 0xCAFE4A11
CGROUP2_SUPER_MAGIC = 0x63677270


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


def statfs_type(path: str) -> int | None:
    """statfs(2) f_type of the filesystem holding path, or None if it can't be read."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = _StatFs()
    if libc.statfs(path.encode(), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF
