"""The self-test's probes, each run in a child process inside the throw-away pod:
`python -m meshaccel.datapath.selftest_probes --child PROBE --budget S --bpffs DIR
--netns-cookie N [--join]` prints one JSON record (what each semantic showed, and whether
every byte arrived intact).

Standard library only, so that a child starts fast.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

CALLED = ("10.244.255.30", 9080)  # what the app connect()s to: captured to the sidecar
SIDECAR = ("127.0.0.1", 15001)  # the sidecar's outbound listener (attach's default -p)

SO_RCVLOWAT = socket.SO_RCVLOWAT
FIONREAD = 0x541B
SIOCOUTQ = 0x5411
SPLICE_F_NONBLOCK = 2


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class Ctx:
    """What a probe child has: how to open an app<->sidecar connection in this netns."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(SIDECAR)
        self.listener.listen(16)
        self.sent: list[bytes] = []  # every stream sent, with what was received of it
        self.received: list[bytes] = []

    def pair(self, captured: bool = True) -> tuple[socket.socket, socket.socket]:
        """(app, sidecar): the app connects to a pod address, which the datapath captures
        to the sidecar's listener (captured=False: straight to the listener, not captured).
        Both blocking, no timeout."""
        app = socket.socket()
        app.connect(CALLED if captured else SIDECAR)
        side, _ = self.listener.accept()
        side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return app, side

    def check(self, sent: bytes, received: bytes) -> None:
        self.sent.append(sent)
        self.received.append(received)

    def bytes_record(self) -> dict:
        ok = all(s == r for s, r in zip(self.sent, self.received, strict=True))
        total = sum(len(s) for s in self.sent)
        got = sum(len(r) for r in self.received)
        bad = [
            f"stream {i}: {len(r)} of {len(s)} bytes, sha256 {sha(r)} (sent {sha(s)})"
            for i, (s, r) in enumerate(zip(self.sent, self.received, strict=True))
            if s != r
        ]
        seen = (
            f"{got} of {total} bytes in {len(self.sent)} streams intact"
            if ok
            else "; ".join(bad[:3])
        )
        return {"bytes_ok": ok and bool(self.sent), "bytes": got, "bytes_seen": seen}


def set_rcvtimeo(s: socket.socket, seconds: float) -> None:
    """A kernel receive timeout: the socket stays blocking (Python's settimeout() would
    make it non-blocking and poll first, which is not what the probe is about)."""
    sec = int(seconds)
    tv = struct.pack("ll", sec, int((seconds - sec) * 1e6))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)


def fionread(s: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), FIONREAD, buf)
    return buf[0]


def recv_exact(s: socket.socket, n: int, deadline: float) -> bytes:
    """n bytes (fewer at EOF or deadline) from a socket with a receive timeout set."""
    out = bytearray()
    while len(out) < n and time.monotonic() < deadline:
        try:
            data = s.recv(n - len(out))
        except BlockingIOError:  # EAGAIN: timeout (or a spurious wake-up): retry
            continue
        if not data:
            break
        out += data
    return bytes(out)


def wait_for(cond: Callable[[], bool], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def probe_rcvlowat(ctx: Ctx) -> dict:
    lowat, n = 16, 64
    app, side = ctx.pair()
    app.setsockopt(socket.SOL_SOCKET, SO_RCVLOWAT, lowat)
    set_rcvtimeo(app, 2)
    data = payload(n, 1)

    def trickle() -> None:
        for i in range(n):
            side.send(data[i : i + 1])
            time.sleep(0.005)
        # TCP wakes a reader when SO_RCVLOWAT bytes wait, not fewer: without the FIN, a
        # last recv for fewer bytes would sleep until its timeout
        side.shutdown(socket.SHUT_WR)

    t = in_thread(trickle)
    sizes, got, short = [], bytearray(), 0
    t0 = time.monotonic()
    deadline = t0 + 3
    while len(got) < n and time.monotonic() < deadline:
        want = n - len(got)
        try:
            chunk = app.recv(want)
        except BlockingIOError:
            sizes.append(-1)
            continue
        if not chunk:
            break
        sizes.append(len(chunk))
        short += len(chunk) < min(lowat, want)
        got += chunk
    took = time.monotonic() - t0
    t.join(2)
    ctx.check(data, bytes(got))
    app.close()
    side.close()
    shown = sizes if len(sizes) <= 8 else sizes[:8] + ["..."]
    seen = f"{len(sizes)} recv calls returned {shown} in {took:.2f} s"
    return {"so_rcvlowat": {"holds": short == 0 and -1 not in sizes, "seen": seen}}


def probe_splice(ctx: Ctx) -> dict:
    n = 100_000
    app, side = ctx.pair()
    data = payload(n, 2)
    side.sendall(data)
    app.setblocking(False)
    r, w = os.pipe()
    os.set_blocking(r, False)
    got, zeros, eagains = bytearray(), 0, 0
    t0 = time.monotonic()
    deadline = t0 + 1.5
    while len(got) < n and time.monotonic() < deadline:
        try:
            moved = os.splice(app.fileno(), w, n - len(got), flags=SPLICE_F_NONBLOCK)
        except BlockingIOError:
            eagains += 1
            time.sleep(0.01)  # (poll may say readable while splice finds nothing)
            continue
        if moved == 0:  # "EOF", though the sidecar has not closed
            zeros += 1
            time.sleep(0.05)
            continue
        got += os.read(r, moved)
    spliced, took = len(got), time.monotonic() - t0
    rest_deadline = time.monotonic() + 1.5  # what splice left: read it, check every byte
    while len(got) < n and time.monotonic() < rest_deadline:
        try:
            chunk = app.recv(n - len(got))
        except BlockingIOError:
            select.select([app], [], [], 0.05)
            continue
        if not chunk:
            break
        got += chunk
    ctx.check(data, bytes(got))
    os.close(r)
    os.close(w)
    app.close()
    side.close()
    seen = f"splice moved {spliced} of {n} bytes in {took:.2f} s"
    if spliced < n:
        seen += f" (returned 0 {zeros} times, EAGAIN {eagains} times; recv read the rest)"
    return {"splice_read": {"holds": spliced == n, "seen": seen}}


def probe_shutdown(ctx: Ctx) -> dict:
    """The sidecar sends the reply and closes 50 ms later (as a server that logs the
    request first): the app is blocked in recv, its queue empty, when the FIN comes."""
    conns, request, reply = 10, payload(1000, 3), payload(4 << 20, 4)
    eagain, failed_conns, where = 0, 0, set()
    for _ in range(conns):
        app, side = ctx.pair()

        def sidecar(side: socket.socket = side) -> None:
            got = bytearray()
            while chunk := side.recv(65536):
                got += chunk
            ctx.check(request, bytes(got))
            side.sendall(reply)
            time.sleep(0.05)
            side.close()

        t = in_thread(sidecar)
        app.sendall(request)
        app.shutdown(socket.SHUT_WR)
        got, mine = bytearray(), 0
        while True:  # blocking, no timeout: as such apps read
            try:
                chunk = app.recv(65536)
            except BlockingIOError:
                mine += 1
                where.add("after the whole reply" if len(got) == len(reply) else "mid-reply")
                continue
            if not chunk:
                break
            got += chunk
        t.join(5)
        app.close()
        ctx.check(reply, bytes(got))
        eagain += mine
        failed_conns += mine > 0
    seen = f"{eagain} recv calls failed with EAGAIN, in {failed_conns} of {conns} connections"
    if where:
        seen += f" ({', '.join(sorted(where))})"
    return {"recv_after_shutdown": {"holds": eagain == 0, "seen": seen}}


def probe_fionread(ctx: Ctx) -> dict:
    n, first = 20_000, 5_000
    app, side = ctx.pair()
    set_rcvtimeo(app, 1)
    data = payload(n, 5)
    empty = fionread(app)
    side.sendall(data)
    wait_for(lambda: fionread(app) >= n, 1)
    full = fionread(app)
    got = recv_exact(app, first, time.monotonic() + 1)
    rest = fionread(app)
    got += recv_exact(app, n - len(got), time.monotonic() + 1)
    ctx.check(data, got)
    app.close()
    side.close()
    holds = (empty, full, rest) == (0, n, n - first)
    seen = f"FIONREAD {empty} before, {full} with {n} bytes waiting, {rest} after reading {first}"
    return {"fionread": {"holds": holds, "seen": seen}}


def join_sockhash(args: argparse.Namespace, s: socket.socket) -> None:
    """Put a socket into the datapath's sockhash as sockops would (its own 4-tuple and
    netns cookie as the key): the socket's recvmsg, poll and ioctl become the sockmap's."""
    from meshaccel.datapath import bpfsys, structs

    local, remote = s.getsockname(), s.getpeername()
    key = structs.SockKey(
        netns_cookie=args.netns_cookie, local_ip=structs.ip_words(local[0]),
        remote_ip=structs.ip_words(remote[0]), local_port=local[1], remote_port=remote[1],
    )  # fmt: skip
    fd = bpfsys.obj_get(os.path.join(args.bpffs, "sock_hash"))
    try:
        bpfsys.map_update(fd, key, ctypes.c_uint64(s.fileno()))
    finally:
        os.close(fd)


def probe_tcp_queue(ctx: Ctx) -> dict:
    """Bytes that take the TCP path to a socket in the sockhash: a plain connection whose
    app socket joins the sockhash (with --join) after some bytes arrived."""
    before, after = 3_000, 2_000
    app, side = ctx.pair(captured=False)
    app.setblocking(False)
    data = payload(before + after, 6)
    side.sendall(data[:before])
    wait_for(lambda: fionread(app) >= before, 1)
    if ctx.args.join:
        join_sockhash(ctx.args, app)
    queued = fionread(app)
    ep = select.epoll()
    ep.register(app.fileno(), select.EPOLLIN | select.EPOLLET)
    ep.poll(0)  # (data already waiting may report once: not what is asked)
    side.sendall(data[before:])
    woke = bool(ep.poll(1.0))
    wait_for(lambda: fionread(app) >= before + after, 0.5)
    both = fionread(app)
    got = bytearray()
    deadline = time.monotonic() + 1.5
    while len(got) < before + after and time.monotonic() < deadline:
        try:
            chunk = app.recv(65536)
        except BlockingIOError:
            select.select([app], [], [], 0.05)
            continue
        if not chunk:
            break
        got += chunk
    ctx.check(data, bytes(got))
    ep.close()
    app.close()
    side.close()
    where = "in the sockhash" if ctx.args.join else "plain"
    seen = (
        f"socket {where}: FIONREAD {queued} with {before} bytes that came before it joined, "
        f"{both} after {after} more came over TCP"
    )
    fion = {"holds": both == before + after, "seen": seen}
    early = {"holds": queued == before, "seen": seen}
    wake = {"holds": woke, "seen": f"socket {where}: {'woke' if woke else 'no wake-up in 1 s'}"}
    return {"fionread_tcp_queue": fion, "fionread_tcp_early": early, "epoll_tcp_queue": wake}


def probe_peek(ctx: Ctx) -> dict:
    n = 10_000
    app, side = ctx.pair()
    set_rcvtimeo(app, 1)
    data = payload(n, 7)

    def later() -> None:
        time.sleep(0.05)
        side.sendall(data)

    t = in_thread(later)
    t0 = time.monotonic()
    try:
        first = app.recv(n, socket.MSG_PEEK)  # blocking: waits for the bytes
        blocked = f"a blocking peek returned {len(first)} bytes after {time.monotonic() - t0:.2f} s"
    except BlockingIOError:
        first = b""
        blocked = f"a blocking peek failed with EAGAIN after {time.monotonic() - t0:.2f} s"
    t.join(2)
    peeked = b""
    end = time.monotonic() + 1
    while len(peeked) < n and time.monotonic() < end:
        try:
            peeked = app.recv(n, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        time.sleep(0.005)
    again = app.recv(100, socket.MSG_PEEK)
    got = recv_exact(app, n, time.monotonic() + 1)
    ctx.check(data, got)
    app.close()
    side.close()
    holds = bool(first) and first == data[: len(first)] and peeked == data and again == data[:100]
    seen = (
        f"{blocked}; peek showed {len(peeked)} of {n} bytes"
        f"{' (the same bytes recv then read)' if peeked == got else ' (NOT what recv read)'}"
    )
    return {"msg_peek": {"holds": holds, "seen": seen}}


def probe_waitall(ctx: Ctx) -> dict:
    n, chunk = 256 * 1024, 4096
    app, side = ctx.pair()
    set_rcvtimeo(app, 3)
    data = payload(n, 8)

    def writer() -> None:
        for i in range(0, n, chunk):
            side.sendall(data[i : i + chunk])
            time.sleep(0.001)

    t = in_thread(writer)
    calls = []
    got = bytearray()
    deadline = time.monotonic() + 4
    while len(got) < n and time.monotonic() < deadline:
        try:
            part = app.recv(n - len(got), socket.MSG_WAITALL)
        except BlockingIOError:
            calls.append(-1)
            continue
        if not part:
            break
        calls.append(len(part))
        got += part
    t.join(2)
    ctx.check(data, bytes(got))
    app.close()
    side.close()
    shown = calls if len(calls) <= 8 else calls[:8] + ["..."]
    seen = f"{len(calls)} recv(MSG_WAITALL) calls returned {shown}"
    return {"msg_waitall": {"holds": calls == [n], "seen": seen}}


def probe_epoll(ctx: Ctx) -> dict:
    rounds, size = 20, 1000
    app, side = ctx.pair()
    app.setblocking(False)
    data = payload(rounds * size, 9)
    ep = select.epoll()
    ep.register(app.fileno(), select.EPOLLIN | select.EPOLLET)
    got, missed = bytearray(), []
    for i in range(rounds):
        side.sendall(data[i * size : (i + 1) * size])
        if not ep.poll(1.0):
            missed.append(i)
        if i % 2:  # read only part: the next write must wake the app all the same
            try:
                got += app.recv(size // 2)
            except BlockingIOError:
                pass
            continue
        while True:
            try:
                chunk = app.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
    got += recv_exact(app, len(data) - len(got), time.monotonic() + 1)
    ctx.check(data, bytes(got))
    ep.close()
    app.close()
    side.close()
    seen = f"{rounds - len(missed)} of {rounds} writes woke the app"
    if missed:
        seen += f" (missed: writes {missed[:6]})"
    return {"epoll_edge": {"holds": not missed, "seen": seen}}


def probe_epoll_level(ctx: Ctx) -> dict:
    rounds, size, part = 20, 1000, 300
    app, side = ctx.pair()
    app.setblocking(False)
    data = payload(rounds * size, 10)
    ep = select.epoll()
    ep.register(app.fileno(), select.EPOLLIN)
    got, missed, again = bytearray(), [], 0
    for i in range(rounds):
        side.sendall(data[i * size : (i + 1) * size])
        if not ep.poll(1.0):
            missed.append(i)
        try:
            got += app.recv(part)
        except BlockingIOError:
            pass
        again += bool(ep.poll(0))  # bytes remain: level-triggered reports them again
    got += recv_exact(app, len(data) - len(got), time.monotonic() + 1)
    ctx.check(data, bytes(got))
    ep.close()
    app.close()
    side.close()
    seen = f"{rounds - len(missed)} of {rounds} writes woke the app, reported again {again} times"
    return {"epoll_level": {"holds": not missed and again == rounds, "seen": seen}}


def probe_write_paths(ctx: Ctx) -> dict:
    """The app writes with sendfile(2) (from a file) and splice(2) (from a pipe)."""
    import tempfile

    n, checks = 1 << 20, {}
    for name, seed in (("sendfile", 11), ("splice_write", 12)):
        app, side = ctx.pair()
        set_rcvtimeo(side, 2)
        data = payload(n, seed)
        result: list[bytes] = []
        t = in_thread(lambda s=side, out=result: out.append(recv_exact(s, n, time.monotonic() + 3)))
        moved, err = 0, ""
        try:
            if name == "sendfile":
                with tempfile.TemporaryFile() as f:
                    f.write(data)
                    f.flush()
                    while moved < n and (k := os.sendfile(app.fileno(), f.fileno(), moved, n)):
                        moved += k
            else:
                r, w = os.pipe()
                filler = in_thread(lambda w=w, d=data: (os.write(w, d), os.close(w)))
                while moved < n and (k := os.splice(r, app.fileno(), 65536)):
                    moved += k
                filler.join(2)
                os.close(r)
        except OSError as e:
            err = f" ({errno.errorcode.get(e.errno or 0, e)})"
        t.join(4)
        got = result[0] if result else b""
        ctx.check(data, got)
        app.close()
        side.close()
        seen = f"{name} moved {moved} of {n} bytes{err}, the sidecar read {len(got)}"
        checks[name] = {"holds": moved == n and got == data, "seen": seen}
    return checks


def probe_rst(ctx: Ctx) -> dict:
    """The sidecar closes with SO_LINGER 0: once while bytes wait for the app, once while
    the app is blocked in recv."""
    n, checks = 64 << 10, {}
    for name, first in (("rst_queued", 16 << 10), ("rst_blocked", 64 << 10)):
        app, side = ctx.pair()
        set_rcvtimeo(app, 2)
        data = payload(n, 13)
        side.sendall(data)
        got = recv_exact(app, first, time.monotonic() + 1)
        end = time.monotonic() + 1
        while send_queue(side) and time.monotonic() < end:  # all delivered
            time.sleep(0.005)

        def reset(side: socket.socket = side) -> None:
            time.sleep(0.3)  # the app is blocked in recv by then, even in a slow VM
            side.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            side.close()

        if name == "rst_queued":
            reset()
        else:
            t = in_thread(reset)
        ends, t0 = [], time.monotonic()
        while len(ends) < 2 and time.monotonic() < t0 + 2:
            try:
                chunk = app.recv(65536)
            except BlockingIOError:
                ends.append("EAGAIN")
                continue
            except OSError as e:
                ends.append(errno.errorcode.get(e.errno or 0, str(e)))
                continue
            if not chunk:
                ends.append("EOF")
                continue
            got += chunk
        if name == "rst_blocked":
            t.join(2)
        ctx.check(data, got)
        app.close()
        seen = f"read {len(got)} of {n} bytes, then {', '.join(ends) or 'nothing'}"
        seen += f" after {time.monotonic() - t0:.2f} s"
        checks[name] = {"holds": got == data and ends == ["ECONNRESET", "EOF"], "seen": seen}
    return checks


def send_queue(s: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), SIOCOUTQ, buf)
    return buf[0]


def probe_backlog(ctx: Ctx) -> dict:
    n, bound = 32 << 20, 16 << 20
    app, side = ctx.pair()
    data = payload(1 << 20, 14) * 32
    side.setblocking(False)
    view, sent = memoryview(data), 0
    while sent < n:  # the app reads nothing yet
        try:
            sent += side.send(view[sent : sent + 65536])
        except BlockingIOError:
            break
    queued = sent

    def rest() -> None:
        nonlocal sent
        while sent < n:
            try:
                sent += side.send(view[sent : sent + 65536])
            except BlockingIOError:
                select.select([], [side], [], 0.1)
        side.shutdown(socket.SHUT_WR)

    t = in_thread(rest)
    set_rcvtimeo(app, 2)
    got = recv_exact(app, n, time.monotonic() + 4)
    t.join(4)
    ctx.check(data, got)
    app.close()
    side.close()
    stalled = queued < n
    seen = (
        f"the sidecar's send failed with EAGAIN after {queued} bytes"
        if stalled
        else f"all {n} bytes queued for the app, no EAGAIN"
    )
    return {"backlog_bounded": {"holds": stalled and queued < bound, "seen": seen}}


CHILD_PROBES: dict[str, Callable[[Ctx], dict]] = {
    "rcvlowat": probe_rcvlowat,
    "splice": probe_splice,
    "shutdown": probe_shutdown,
    "fionread": probe_fionread,
    "tcp_queue": probe_tcp_queue,
    "peek": probe_peek,
    "waitall": probe_waitall,
    "epoll": probe_epoll,
    "epoll_level": probe_epoll_level,
    "write_paths": probe_write_paths,
    "rst": probe_rst,
    "backlog": probe_backlog,
}


def child_main(argv: list[str] | None = None) -> int:
    """One probe's run: its JSON record on stdout; exit status 1 if it could not run."""
    p = argparse.ArgumentParser(prog="python -m meshaccel.datapath.selftest_probes")
    p.add_argument("--child", required=True, choices=sorted(CHILD_PROBES))
    p.add_argument("--budget", type=float, required=True, help="seconds the probe may take")
    p.add_argument("--bpffs", required=True)
    p.add_argument("--netns-cookie", type=int, required=True)
    p.add_argument("--join", action="store_true", help="the shortcut is on")
    args = p.parse_args(argv)
    signal.alarm(int(args.budget) + 5)  # a backstop: never linger
    t0 = time.monotonic()
    try:
        ctx = Ctx(args)
        checks = CHILD_PROBES[args.child](ctx)
        rec = {"checks": checks, **ctx.bytes_record()}
    except OSError as e:
        rec = {"error": f"{type(e).__name__}: {e}"}
    rec["seconds"] = round(time.monotonic() - t0, 3)
    print(json.dumps(rec), flush=True)
    return 1 if "error" in rec else 0


if __name__ == "__main__":
    sys.exit(child_main())
