"""Compile the datapath and load every program the way `meshaccel attach` does, without
pinning or attaching anything; print, per program, whether the verifier accepted it and
how many instructions it processed (bpf_prog_info.verified_insns, kernel >= 5.16).

    PYTHONPATH=. python3 vagrant/load-check.py [--dump-xlated PROG]

Exit code 0 when every program loads; a refused one shows the verifier's reason. Run
as root, on the host or in the VM (vagrant/run-in-vm.sh bookworm -- python3
vagrant/load-check.py).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import struct
import subprocess
import sys
import time

from meshaccel.datapath import loader
from meshaccel.datapath.build import load_program
from meshaccel.datapath.programs import PROGRAMS
from meshaccel.errors import MeshaccelError

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump-xlated", metavar="PROG", help="bpftool prog dump xlated of PROG")
    args = ap.parse_args()

    print(f"kernel {platform.release()}", flush=True)
    t0 = time.monotonic()
    b = loader.compile_bpf()
    print(f"compiled in {time.monotonic() - t0:.1f}s", flush=True)
    failed = []
    for prog in PROGRAMS:
        t = time.monotonic()
        try:
            fn = load_program(b, prog)
        except MeshaccelError as e:
            print(f"LOAD FAILED {prog.func}: {e}", flush=True)
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
    n = len(PROGRAMS)
    print(f"{n - len(failed)}/{n} programs loaded", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("load-check: must run as root")
    sys.exit(main())
