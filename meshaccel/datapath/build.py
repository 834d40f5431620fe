"""Compile the datapath's programs with bcc and load them into the kernel (not pinned,
not attached), and check a build's maps against what this release's userspace reads and
writes. The loader and upgrades build this way; doctor loads every program to ask the
verifier.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from meshaccel.datapath import bpfsys, programs, structs, version
from meshaccel.datapath.programs import Program
from meshaccel.errors import MeshaccelError


def bpf_source(bpf_dir: Path) -> str:
    """All programs as one C text, with the project's own headers inlined.

    bcc rewrites map method calls (counters.lookup(...)) only in the main file, so the
    headers that use them must be part of it; each header is inlined once.
    """
    seen: set[str] = set()

    def expand(path: Path) -> str:
        out = []
        for line in path.read_text().splitlines():
            m = re.match(r'#include "(.+)"', line)
            if m:
                if m.group(1) not in seen:
                    seen.add(m.group(1))
                    out.append(expand(bpf_dir / "include" / m.group(1)))
                continue
            out.append(line)
        return "\n".join(out)

    try:
        return "\n".join(expand(bpf_dir / src) for src in programs.sources())
    except OSError as e:  # e.g. MESHACCEL_BPF_DIR naming another release's bpf/
        raise MeshaccelError(
            f"eBPF source {e.filename}: {e.strerror} (MESHACCEL_BPF_DIR={bpf_dir})"
        ) from e


def compile_bpf(bpf_dir: Path, cflags: list[str] | None = None):  # -> bcc.BPF
    """Compile every program (not loaded). cflags: -D overrides of bpf/include/config.h."""
    try:
        from bcc import BPF
    except ImportError as e:
        raise MeshaccelError(
            "bcc is not importable: apt-get install python3-bpfcc and use a venv made by "
            "/usr/bin/python3 -m venv --system-site-packages (see meshaccel doctor)"
        ) from e
    try:
        return BPF(text=bpf_source(bpf_dir).encode(), cflags=cflags or [])
    except Exception as e:
        raise MeshaccelError(
            f"compiling the eBPF programs failed ({e}); run meshaccel doctor"
        ) from e


def load_program(b, prog: Program):  # (b: bcc.BPF) -> bcc's function object
    """Load one program (not pinned, not attached). A verifier refusal is one line: the
    kernel, the program and the verifier's reason (bcc prints the whole log, often
    megabytes, on fd 2 and raises a bare Exception)."""
    expected = -1 if prog.hook == "sock_hash" else prog.attach_type
    with _captured_fd2() as log:
        try:
            return b.load_func(prog.func.encode(), programs.prog_type(prog), attach_type=expected)
        except Exception as e:  # noqa: BLE001 - bcc raises plain Exceptions
            error = e
    reason = verifier_reason(log.read().decode(errors="replace")) or str(error).strip()
    raise MeshaccelError(
        f"kernel {os.uname().release} refused {prog.func}: {reason} (meshaccel doctor "
        "loads every program and says which ones this kernel refuses)"
    ) from error


def verifier_reason(log: str) -> str:
    """The line of a verifier log that says why: the last one before its statistics."""
    stats = ("processed ", "verification time", "stack depth", "max_states_per_insn")
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    while lines and lines[-1].startswith(stats):
        lines.pop()
    return lines[-1] if lines else ""


@contextlib.contextmanager
def _captured_fd2() -> Iterator[io.BytesIO]:
    """What C code (bcc, libbpf) writes on fd 2 meanwhile; readable once the block ends."""
    out = io.BytesIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.write(tmp.read())
            out.seek(0)


def compiled_layouts(b) -> dict[str, version.MapLayout]:
    """Each map's layout as bcc created it for a compiled (not yet loaded) build."""
    from bcc import lib

    fds = {name: lib.bpf_table_fd(b.module, name.encode()) for name in structs.MAPS}
    # (a map this release knows may be absent from another release's source: fd -1)
    return {name: version.MapLayout.of(bpfsys.map_info(fd)) for name, fd in fds.items() if fd >= 0}


def check_userspace(build: version.Build, bpf_dir: Path) -> None:
    """Refuse a build whose maps this release's userspace would read or write with another
    layout (e.g. MESHACCEL_BPF_DIR pointing at another release's bpf/)."""
    bad = version.userspace_mismatches(build.maps)
    if bad:
        raise MeshaccelError(
            f"the eBPF source in {bpf_dir} does not match this meshaccel {build.release} "
            f"({'; '.join(bad)}): refusing, nothing changed"
        )
