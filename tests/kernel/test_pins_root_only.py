"""The datapath's pins are root-only: its bpffs directory is 0700 and each pin 0600, so a
process that is not root cannot open a map or program by its pin, even one given CAP_BPF
(which lifts kernel.unprivileged_bpf_disabled, but not file permissions)."""

from __future__ import annotations

import json
import os
import stat
import sys

NOBODY = 65534
# Tries every pin: its errno name, or "opened".
PROBE = r"""
import errno, json, os, sys
from meshaccel.datapath import bpfsys
out = {}
try:
    os.listdir(sys.argv[1])
    out["listdir"] = "listed"
except OSError as e:
    out["listdir"] = errno.errorcode[e.errno]
for path in sys.argv[2:]:
    try:
        os.close(bpfsys.obj_get(path))
        out[path] = "opened"
    except OSError as e:
        out[path] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


def probe(lab, bpffs: str, pins: list[str], cap_bpf: bool) -> dict[str, str]:
    """What uid nobody gets, by pin path. It reaches the directory through an fd this
    process opened (/proc/self/fd/N), so that only the directory's and the pins' own
    modes count, not those of the bpffs mount above (systemd mounts /sys/fs/bpf 0700)."""
    dirfd = os.open(bpffs, os.O_RDONLY | os.O_DIRECTORY)
    via = f"/proc/self/fd/{dirfd}"
    argv = [sys.executable, "-c", PROBE, via, *(f"{via}/{os.path.basename(p)}" for p in pins)]
    try:
        if cap_bpf:  # uid nobody, but with CAP_BPF (as a non-root container given it)
            argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                    "--inh-caps=+bpf", "--ambient-caps=+bpf", *argv]  # fmt: skip
            child = lab.spawn(argv, cwd=os.getcwd(), pass_fds=(dirfd,))
        else:
            child = lab.spawn(argv, uid=NOBODY, cwd=os.getcwd(), pass_fds=(dirfd,))
        [record] = lab.records(child)
    finally:
        os.close(dirfd)
    return {k.replace(via, bpffs): v for k, v in record.items()}


def test_pins_and_maps_are_root_only(lab):
    node = lab.node()
    pod = lab.pod("a", node, "10.244.1.10")
    bpffs = lab.attach(lab.cgroup(), pods=(pod,))
    st = os.stat(bpffs)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 0)
    pins = sorted(os.path.join(bpffs, name) for name in os.listdir(bpffs))
    assert any(os.path.basename(p).startswith("link_") for p in pins), pins  # pod add's too
    for pin in pins:
        st = os.stat(pin)
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0 and st.st_uid == 0, (pin, oct(st.st_mode))

    for cap_bpf in (False, True):
        record = probe(lab, bpffs, pins, cap_bpf)
        print(f"nobody{' with CAP_BPF' if cap_bpf else ''}: {json.dumps(record)}")
        assert record.pop("listdir") == "EACCES"
        assert set(record) == set(pins)
        assert set(record.values()) <= {"EACCES", "EPERM"}, record

    # the pins alone keep it out too, were the directory opened up
    os.chmod(bpffs, 0o755)
    try:
        record = probe(lab, bpffs, pins, cap_bpf=True)
    finally:
        os.chmod(bpffs, 0o700)
    assert record.pop("listdir") == "listed"
    assert set(record.values()) == {"EACCES"}, record
