"""Compile the datapath and load every program the way `meshaccel attach` does, without
pinning or attaching anything; print, per program, whether the verifier accepted it and
how many instructions it processed (bpf_prog_info.verified_insns, kernel >= 5.16).

    PYTHONPATH=. python3 vagrant/load-check.py [--dump-xlated PROG]

Exit code 0 when every program loads. Run as root, on the host or in the VM
(vagrant/run-in-vm.sh bookworm -- python3 vagrant/load-check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from meshaccel import loader

_INFO_SIZE = 232  # struct bpf_prog_info up to attach_btf_id (kernel 5.16+)
_OFF_ID = 4
_OFF_XLATED_LEN = 20
_OFF_VERIFIED_INSNS = 216


def prog_info(fd: int) -> tuple[int, int, int]:
    """(id, xlated bytes, verified_insns) of a loaded program."""
    from bcc import lib

    buf = ctypes.create_string_buffer(_INFO_SIZE)
    size = ctypes.c_uint32(_INFO_SIZE)
    if lib.bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)) != 0:
        return (0, 0, 0)
    raw = buf.raw[: size.value]
    prog_id = struct.unpack_from("<I", raw, _OFF_ID)[0]
    xlated = struct.unpack_from("<I", raw, _OFF_XLATED_LEN)[0]
    verified = struct.unpack_from("<I", raw, _OFF_VERIFIED_INSNS)[0] if size.value > 216 else 0
    return (prog_id, xlated, verified)


@contextlib.contextmanager
def verifier_log() -> Iterator[io.StringIO]:
    """What bcc (C code) writes on fd 2 meanwhile: the verifier log of a failed load,
    which for a complex program is megabytes, so the caller shows only its end."""
    out = io.StringIO()
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
            out.write(tmp.read().decode(errors="replace"))
            out.seek(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump-xlated", metavar="PROG", help="bpftool prog dump xlated of PROG")
    ap.add_argument("--log-lines", type=int, default=12, help="verifier log lines on failure")
    args = ap.parse_args()

    print(f"kernel {platform.release()}", flush=True)
    t0 = time.monotonic()
    b = loader.compile_bpf()
    print(f"compiled in {time.monotonic() - t0:.1f}s", flush=True)
    failed = []
    for prog in loader.PROGRAMS:
        expected = -1 if prog.hook == "sock_hash" else prog.attach_type
        t = time.monotonic()
        try:
            with verifier_log() as log:
                fn = b.load_func(prog.func.encode(), loader._prog_type(prog), attach_type=expected)
        except Exception as e:  # bcc raises a plain Exception after printing the log
            tail = log.read().splitlines()[-args.log_lines :]
            print(f"LOAD FAILED {prog.func}: {e}; end of the verifier log:", flush=True)
            print("\n".join(f"    {line}" for line in tail), flush=True)
            failed.append(prog.func)
            continue
        prog_id, xlated, verified = prog_info(fn.fd)
        print(
            f"loaded {prog.func:16s} verified_insns={verified:>7d} xlated={xlated // 8:>5d} insns "
            f"({time.monotonic() - t:.1f}s)",
            flush=True,
        )
        if args.dump_xlated == prog.func:
            subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(prog_id)], check=False)
    b.cleanup()
    n = len(loader.PROGRAMS)
    print(f"{n - len(failed)}/{n} programs loaded", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("load-check: must run as root")
    sys.exit(main())
