"""A pod's tag program: the sk_lookup program linked into the pod's netns ahead of
ma_sk_lookup, which writes the pod's netns cookie into sk_lookup_netns for the lookup
under way (struct lookup_tag). ma_sk_lookup cannot learn its netns itself (sk_lookup
programs get neither bpf_get_netns_cookie nor an attach cookie), and without it finds a
pod only by a destination address pod add registered.

One program per pod, the cookie a constant in it: a few raw instructions assembled here
(no compiler, so pod add needs none) and loaded through bpfsys. It lives as long as its
link, pinned beside the pod's sk_lookup link (Pins.tag_link).
"""

from __future__ import annotations

import socket
import struct

from meshaccel.datapath import bpfsys

NAME = "ma_lookup_tag"  # the kernel's name of it ("ma_": meshaccel's, to neighbors.py)

# offsets in the kernel's struct bpf_sk_lookup (include/uapi/linux/bpf.h)
_FAMILY, _REMOTE_IP4, _REMOTE_IP6, _REMOTE_PORT, _LOCAL_PORT = 8, 16, 20, 36, 60
# struct lookup_tag on the stack at r10 - 40 (structs.LookupTag), the map key below it
_TAG, _KEY = -40, -48
_COOKIE, _IP, _FAM, _LPORT, _RPORT = 0, 8, 24, 28, 32
_AF_INET = 2

# opcodes (include/uapi/linux/bpf.h)
_LDX, _STX, _ST = 0x61, 0x63, 0x62  # class | BPF_MEM | BPF_W
_W, _H, _DW = 0x00, 0x08, 0x18  # sizes, or'ed into the above
_MOV64_REG, _MOV64_IMM, _ADD64_IMM = 0xBF, 0xB7, 0x07
_JNE_IMM, _JA, _CALL, _EXIT, _LD_IMM64 = 0x55, 0x05, 0x85, 0x95, 0x18
_TO_BE = 0xDC  # BPF_ALU | BPF_END | BPF_TO_BE: host to network order
_PSEUDO_MAP_FD = 1
_MAP_UPDATE_ELEM = 2  # BPF_FUNC_map_update_elem
_SK_PASS = 1


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def _ld_imm64(dst: int, value: int, src: int = 0) -> bytes:
    lo, hi = value & 0xFFFFFFFF, value >> 32
    return _insn(_LD_IMM64, dst, src, 0, _s32(lo)) + _insn(0, 0, 0, 0, _s32(hi))


def _s32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


def instructions(netns_cookie: int, map_fd: int) -> bytes:
    """The tag program of the pod in netns netns_cookie, writing into map_fd's map."""
    mapped = _s32(struct.unpack("=I", socket.inet_pton(socket.AF_INET6, "::ffff:0:0")[8:12])[0])
    v4 = [  # remote_ip = ::ffff:remote_ip4
        _insn(_ST | _W, 10, 0, _TAG + _IP + 8, mapped),
        _insn(_LDX | _W, 3, 6, _REMOTE_IP4),
        _insn(_STX | _W, 10, 3, _TAG + _IP + 12),
    ]
    v6 = [
        op
        for i in range(4)
        for op in (
            _insn(_LDX | _W, 3, 6, _REMOTE_IP6 + 4 * i),
            _insn(_STX | _W, 10, 3, _TAG + _IP + 4 * i),
        )
    ]
    v4.append(_insn(_JA, off=len(v6)))  # over the v6 part
    prog = [
        _insn(_MOV64_REG, 6, 1),  # r6 = ctx
        *(_insn(_ST | _DW, 10, 0, _TAG + 8 * i, 0) for i in range(5)),  # tag = {}
        _ld_imm64(1, netns_cookie),
        _insn(_STX | _DW, 10, 1, _TAG + _COOKIE),
        _insn(_LDX | _W, 2, 6, _FAMILY),
        _insn(_STX | _W, 10, 2, _TAG + _FAM),
        _insn(_JNE_IMM, 2, 0, len(v4), _AF_INET),  # AF_INET6: to v6
        *v4,
        *v6,
        _insn(_LDX | _H, 3, 6, _REMOTE_PORT),
        _insn(_TO_BE, 3, 0, 0, 16),  # (network order in the ctx, host order in the tag)
        _insn(_STX | _H, 10, 3, _TAG + _RPORT),
        _insn(_LDX | _W, 3, 6, _LOCAL_PORT),
        _insn(_STX | _W, 10, 3, _TAG + _LPORT),
        _insn(_ST | _W, 10, 0, _KEY, 0),  # key 0
        _ld_imm64(1, map_fd, _PSEUDO_MAP_FD),
        _insn(_MOV64_REG, 2, 10),
        _insn(_ADD64_IMM, 2, 0, 0, _KEY),
        _insn(_MOV64_REG, 3, 10),
        _insn(_ADD64_IMM, 3, 0, 0, _TAG),
        _insn(_MOV64_IMM, 4, 0, 0, 0),  # BPF_ANY
        _insn(_CALL, imm=_MAP_UPDATE_ELEM),
        _insn(_MOV64_IMM, 0, 0, 0, _SK_PASS),  # never selects a socket, never drops
        _insn(_EXIT),
    ]
    return b"".join(prog)


def load(netns_cookie: int, map_fd: int) -> int:
    """fd of a new tag program for this pod (MeshaccelError if the verifier refuses)."""
    return bpfsys.prog_load(
        bpfsys.PROG_TYPE_SK_LOOKUP,
        NAME,
        instructions(netns_cookie, map_fd),
        bpfsys.SK_LOOKUP,
    )
