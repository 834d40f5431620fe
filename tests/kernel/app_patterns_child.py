"""One app pattern, run as its own process inside a pod's netns and cgroup (standard
library only): both ends of an app<->sidecar connection in one process, the app's end
doing what the pattern is about.

    app_patterns_child.py PATTERN --role client|server --pod-ip IP [--size N] [--conns N]

--role client: the app connect()s to CALLED (captured to the sidecar's 127.0.0.1:15001,
where this process listens as the sidecar). --role server: the app listens on
0.0.0.0:APP_PORT and the sidecar connects to POD_IP:APP_PORT from 127.0.0.6, as Envoy's
inbound passthrough does (the hop to the app).

Prints one JSON record: {"outcome": {...}, "info": {...}} — "outcome" is what an app can
observe (bytes and their SHA-256 match, errors, EOF, wake-ups): the test compares it
between the shortcut and plain TCP; "info" is measured but not compared (timings,
memory, EAGAIN counts); or {"error": ...} when the pattern itself failed.
"""

from __future__ import annotations

import argparse
import array
import errno
import fcntl
import hashlib
import json
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

CALLED = ("10.244.1.30", 9080)  # what the app connect()s to as a client: captured
SIDECAR = ("127.0.0.1", 15001)  # the sidecar's outbound listener
APP_PORT = 9080
PASSTHROUGH_SRC = "127.0.0.6"  # Envoy's inbound passthrough source
FIONREAD = 0x541B
SIOCOUTQ = 0x5411
SO_MEMINFO = 55
SPLICE_F_MOVE, SPLICE_F_NONBLOCK = 1, 2
CHUNK = 64 * 1024
PERIOD = 1_048_573  # a prime: a stream is a random block of this length, repeated
WAIT = 20.0  # the longest any single wait of a pattern may take (then: "timeout")


# ------------------------------------------------------------ streams and checksums


class Stream:
    """n deterministic bytes (seeded); a chunk at an offset that is not a multiple of
    PERIOD differs from every other, so a lost, duplicated or reordered chunk changes
    the SHA-256."""

    _blocks: dict[int, bytes] = {}

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        if seed not in self._blocks:
            block = random.Random(seed).randbytes(PERIOD)
            self._blocks[seed] = block + block[: CHUNK * 16]
        self.view = memoryview(self._blocks[seed])

    def chunks(self, size: int = CHUNK) -> Iterator[memoryview]:
        off = 0
        while off < self.n:
            k = min(size, self.n - off)
            start = off % PERIOD
            yield self.view[start : start + k]
            off += k

    def sha(self) -> str:
        h = hashlib.sha256()
        for c in self.chunks(1 << 20):
            h.update(c)
        return h.hexdigest()

    def write_to(self, fd: int) -> None:
        for c in self.chunks(1 << 16):
            os.write(fd, c)


class Reader:
    """What one end received: byte count and SHA-256, with how the reading ended."""

    def __init__(self) -> None:
        self.n = 0
        self.h = hashlib.sha256()
        self.eagain = 0
        self.end = ""  # "EOF", an errno name, or "timeout"

    def add(self, data: bytes) -> None:
        self.n += len(data)
        self.h.update(data)

    def matches(self, s: Stream) -> bool:
        return self.n == s.n and self.h.hexdigest() == s.sha()

    def read_to_eof(self, sock: socket.socket, deadline: float | None = None) -> Reader:
        """Blocking reads (the socket has a kernel receive timeout) to EOF or an error;
        EAGAIN (a timeout, or a spurious wake-up) is counted and retried."""
        deadline = deadline or time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                data = sock.recv(CHUNK)
            except BlockingIOError:
                self.eagain += 1
                continue
            except OSError as e:
                self.end = errno.errorcode.get(e.errno or 0, str(e))
                return self
            if not data:
                self.end = "EOF"
                return self
            self.add(data)
        self.end = "timeout"
        return self

    def read_exact(self, sock: socket.socket, n: int, deadline: float | None = None) -> Reader:
        deadline = deadline or time.monotonic() + WAIT
        want = self.n + n
        while self.n < want and time.monotonic() < deadline:
            try:
                data = sock.recv(min(CHUNK, want - self.n))
            except BlockingIOError:
                self.eagain += 1
                continue
            except OSError as e:
                self.end = errno.errorcode.get(e.errno or 0, str(e))
                return self
            if not data:
                self.end = "EOF"
                return self
            self.add(data)
        if self.n < want:
            self.end = "timeout"
        return self


def small(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def send_stream(sock: socket.socket, s: Stream) -> str:
    """sendall the stream; "" or the errno name it failed with."""
    try:
        for c in s.chunks():
            sock.sendall(c)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))
    return ""


def set_rcvtimeo(s: socket.socket, seconds: float) -> None:
    """A kernel receive timeout: the socket stays blocking (settimeout() would poll)."""
    sec = int(seconds)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, 0))


def set_sndtimeo(s: socket.socket, seconds: float) -> None:
    sec = int(seconds)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, 0))


def ioctl_int(s: socket.socket, req: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), req, buf)
    return buf[0]


def meminfo(s: socket.socket) -> dict[str, int]:
    """SO_MEMINFO: the socket's receive and send memory, in bytes."""
    raw = s.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 9 * 4)
    v = struct.unpack("9I", raw)
    return {"rmem_alloc": v[0], "wmem_queued": v[5], "fwd_alloc": v[4]}


def tcp_mem_bytes() -> int:
    """/proc/net/sockstat's TCP mem (pages charged to TCP sockets, system-wide)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def join(t: threading.Thread, what: str, seconds: float = WAIT + 5) -> None:
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"{what} still running after {seconds:g} s")


# ------------------------------------------------------------ the connection


class Ctx:
    """How this process opens app<->sidecar connections for its role."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.role = args.role
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.role == "client":  # the sidecar listens, the app calls out
            self.listener.bind(SIDECAR)
        else:  # the app listens, the sidecar's inbound passthrough calls it
            self.listener.bind(("0.0.0.0", APP_PORT))
        self.listener.listen(4096)

    def connect_one(self) -> socket.socket:
        s = socket.socket()
        if self.role == "client":
            s.connect(CALLED)
        else:
            s.bind((PASSTHROUGH_SRC, 0))
            s.connect((self.args.pod_ip, APP_PORT))
        return s

    def pair(self) -> tuple[socket.socket, socket.socket]:
        """(app, sidecar), both blocking with 20 s kernel receive and send timeouts."""
        caller = self.connect_one()
        callee, _ = self.listener.accept()
        app, side = (caller, callee) if self.role == "client" else (callee, caller)
        for s in (app, side):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_rcvtimeo(s, WAIT)
            set_sndtimeo(s, WAIT)
        return app, side


# ------------------------------------------------------------ the patterns


def p_blocking(ctx: Ctx) -> dict:
    """Request/response, blocking sockets: the app sends SIZE, the sidecar reads all of it
    and answers SIZE, the app reads exactly that; 5 connections, one after the other."""
    n, outcome, eagain = ctx.args.size, [], 0
    for i in range(5):
        app, side = ctx.pair()
        req, rep = Stream(n, 10 + i), Stream(n, 20 + i)
        got_req, got_rep = Reader(), Reader()

        def sidecar(side: socket.socket = side, got: Reader = got_req, rep: Stream = rep) -> None:
            got.read_exact(side, n)
            send_stream(side, rep)

        t = in_thread(sidecar)
        send_stream(app, req)
        got_rep.read_exact(app, n)
        join(t, "sidecar")
        outcome.append([got_req.matches(req), got_rep.matches(rep), got_rep.end])
        eagain += got_rep.eagain + got_req.eagain
        app.close()
        side.close()
    return {"outcome": {"conns": outcome}, "info": {"eagain": eagain}}


def p_nonblocking(ctx: Ctx) -> dict:
    """Both ends non-blocking in one select loop, writing SIZE each way at once, then each
    shuts down its write side and reads to EOF."""
    n = ctx.args.size
    app, side = ctx.pair()
    streams = {app: Stream(n, 1), side: Stream(n, 2)}
    chunks = {s: streams[s].chunks() for s in (app, side)}
    pending: dict[socket.socket, memoryview | None] = {app: None, side: None}
    readers = {app: Reader(), side: Reader()}
    for s in (app, side):
        s.setblocking(False)
    writing, reading = {app, side}, {app, side}
    eagain = 0
    deadline = time.monotonic() + WAIT * 3
    while (writing or reading) and time.monotonic() < deadline:
        r, w, _ = select.select(list(reading), list(writing), [], 1.0)
        for s in w:
            if pending[s] is None:
                pending[s] = next(chunks[s], None)
                if pending[s] is None:
                    s.shutdown(socket.SHUT_WR)
                    writing.discard(s)
                    continue
            try:
                k = s.send(pending[s])
            except BlockingIOError:
                eagain += 1
                continue
            rest = pending[s][k:]
            pending[s] = rest if len(rest) else None
        for s in r:
            try:
                data = s.recv(CHUNK)
            except BlockingIOError:
                eagain += 1
                continue
            if not data:
                readers[s].end = "EOF"
                reading.discard(s)
                continue
            readers[s].add(data)
    out = {
        "app_got": [readers[app].matches(streams[side]), readers[app].end or "timeout"],
        "side_got": [readers[side].matches(streams[app]), readers[side].end or "timeout"],
    }
    app.close()
    side.close()
    return {"outcome": out, "info": {"eagain_nonblocking": eagain}}


def _half_close(ctx: Ctx, closer_is_app: bool) -> dict:
    """The closer sends SIZE and shuts down its write side; the other end reads to EOF,
    answers SIZE and closes; the closer reads the answer to EOF (blocking); 10
    connections, one after the other."""
    n, conns = ctx.args.size, 10
    out, eagain = [], 0
    for i in range(conns):
        app, side = ctx.pair()
        closer, other = (app, side) if closer_is_app else (side, app)
        req, rep = Stream(n, 30 + i), Stream(n, 40 + i)
        got_req, got_rep = Reader(), Reader()

        def answer(other: socket.socket = other, got: Reader = got_req, rep: Stream = rep) -> None:
            got.read_to_eof(other)
            time.sleep(0.02)  # (as a server that logs the request first)
            send_stream(other, rep)
            other.close()

        t = in_thread(answer)
        send_stream(closer, req)
        closer.shutdown(socket.SHUT_WR)
        got_rep.read_to_eof(closer)
        join(t, "the answering end")
        closer.close()
        out.append([got_req.matches(req), got_req.end, got_rep.matches(rep), got_rep.end])
        eagain += got_req.eagain + got_rep.eagain
    # a blocking recv failing with EAGAIN is what an app sees (the count varies by run)
    seen = "in some connections" if eagain else "none"
    return {"outcome": {"conns": out, "blocking_recv_eagain": seen}, "info": {"eagain": eagain}}


def p_halfclose_app(ctx: Ctx) -> dict:
    return _half_close(ctx, closer_is_app=True)


def p_halfclose_side(ctx: Ctx) -> dict:
    return _half_close(ctx, closer_is_app=False)


def _rst(ctx: Ctx, aborter_is_app: bool) -> dict:
    """Mid-stream reset, twice. (1) The aborter writes SIZE bytes (within the initial
    window: all of them reach the reader); once the reader has read a quarter of them,
    the aborter closes with SO_LINGER 0 (RST). The reader then reads on: how many bytes (a
    prefix of the stream?), then what (ECONNRESET, EOF), then what a recv and a send give
    it. (2) The reader has read everything and is blocked in recv when the RST comes
    (0.1 s later): it must wake, with what plain TCP gives it."""
    n = ctx.args.size
    out: dict = {}
    info: dict = {}
    for phase in ("queued", "blocked"):
        app, side = ctx.pair()
        aborter, reader = (app, side) if aborter_is_app else (side, app)
        s = Stream(n, 50)
        got = Reader()
        read_some = threading.Event()
        woke_at = [0.0]

        def read(
            reader: socket.socket = reader,
            got: Reader = got,
            ev: threading.Event = read_some,
            phase: str = phase,
            woke_at: list = woke_at,
        ) -> None:
            got.read_exact(reader, n // 4 if phase == "queued" else n)
            ev.set()
            if phase == "queued":
                time.sleep(0.1)  # the RST is there before the reader reads on
            got.end = ""
            got.read_to_eof(reader)
            woke_at[0] = time.monotonic()

        # fmt: skip

        t = in_thread(read)
        err = send_stream(aborter, s)
        read_some.wait(WAIT)
        end = time.monotonic() + 2
        while ioctl_int(aborter, SIOCOUTQ) and time.monotonic() < end:  # all delivered
            time.sleep(0.005)
        if phase == "blocked":
            time.sleep(0.3)  # (the reader is blocked in recv by then, even on a busy machine)
        aborter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t0 = time.monotonic()
        aborter.close()
        join(t, "reader")
        try:
            after = reader.recv(10)
            then_recv = "EOF" if after == b"" else repr(after)
        except OSError as e:
            then_recv = errno.errorcode.get(e.errno or 0, str(e))
        try:
            reader.send(b"x")
            reader.send(b"y")
            then_send = "ok"
        except OSError as e:
            then_send = errno.errorcode.get(e.errno or 0, str(e))
        reader.close()
        out[phase] = {
            "writer_error": err,
            "reader_bytes": f"{got.n} of {n}",
            "reader_prefix_ok": got.h.hexdigest() == Stream(got.n, 50).sha(),
            "reader_end": got.end,
            "blocking_recv_eagain": got.eagain > 0,  # (a blocking recv failing so)
            "then_recv": then_recv,
            "then_send": then_send,
        }
        info[f"{phase}_reader_woke_after_s"] = round(woke_at[0] - t0, 3)
    return {"outcome": out, "info": info}


def p_rst_app(ctx: Ctx) -> dict:
    return _rst(ctx, aborter_is_app=True)


def p_rst_side(ctx: Ctx) -> dict:
    return _rst(ctx, aborter_is_app=False)


def p_sendfile(ctx: Ctx) -> dict:
    """The app sends a SIZE-byte file with sendfile(2); the sidecar reads to EOF."""
    n = ctx.args.size
    s = Stream(n, 60)
    with tempfile.TemporaryFile(dir="/tmp") as f:
        s.write_to(f.fileno())
        f.flush()
        app, side = ctx.pair()
        got = Reader()
        t = in_thread(lambda: got.read_to_eof(side))
        off, calls, err = 0, 0, ""
        try:
            while off < n:
                k = os.sendfile(app.fileno(), f.fileno(), off, n - off)
                if k == 0:
                    break
                off += k
                calls += 1
        except OSError as e:
            err = errno.errorcode.get(e.errno or 0, str(e))
        app.shutdown(socket.SHUT_WR)
        join(t, "sidecar")
    app.close()
    side.close()
    out = {"sent": off, "error": err, "side_got": [got.matches(s), got.end]}
    return {"outcome": out, "info": {"sendfile_calls": calls}}


def p_splice_write(ctx: Ctx) -> dict:
    """The app moves SIZE bytes pipe -> socket with splice(2) (a thread fills the pipe);
    the sidecar reads to EOF."""
    n = ctx.args.size
    s = Stream(n, 61)
    r, w = os.pipe()
    app, side = ctx.pair()
    got = Reader()
    t = in_thread(lambda: got.read_to_eof(side))
    filler = in_thread(lambda: (s.write_to(w), os.close(w)))
    moved, calls, err = 0, 0, ""
    try:
        while moved < n:
            k = os.splice(r, app.fileno(), CHUNK, flags=SPLICE_F_MOVE)
            if k == 0:
                break
            moved += k
            calls += 1
    except OSError as e:
        err = errno.errorcode.get(e.errno or 0, str(e))
    join(filler, "pipe filler")
    os.close(r)
    app.shutdown(socket.SHUT_WR)
    join(t, "sidecar")
    app.close()
    side.close()
    out = {"moved": moved, "error": err, "side_got": [got.matches(s), got.end]}
    return {"outcome": out, "info": {"splice_calls": calls}}


def _epoll(ctx: Ctx, edge: bool) -> dict:
    """The sidecar writes 20 times 1,000 bytes; after each write the app waits in epoll
    (1 s) and reads only 300 bytes. Level-triggered: epoll_wait reports the socket again
    at once while bytes remain; edge-triggered: every write wakes the app."""
    rounds, size, part = 20, 1000, 300
    app, side = ctx.pair()
    app.setblocking(False)
    s = Stream(rounds * size, 70)
    chunks = list(s.chunks(size))
    ep = select.epoll()
    ep.register(app.fileno(), select.EPOLLIN | (select.EPOLLET if edge else 0))
    got = Reader()
    woke, again = 0, 0
    for c in chunks:
        side.sendall(c)
        if ep.poll(1.0):
            woke += 1
        try:
            got.add(app.recv(part))
        except BlockingIOError:
            pass
        if not edge and ep.poll(0):  # bytes remain: level-triggered reports them again
            again += 1
    end = time.monotonic() + 2
    while got.n < s.n and time.monotonic() < end:  # the rest, by plain reads
        try:
            got.add(app.recv(CHUNK))
        except BlockingIOError:
            time.sleep(0.005)
    ep.close()
    app.close()
    side.close()
    out = {"woke": f"{woke} of {rounds}", "bytes_ok": got.matches(s)}
    if not edge:
        out["reported_again_with_bytes_left"] = f"{again} of {rounds}"
    return {"outcome": out, "info": {}}


def p_epoll_level(ctx: Ctx) -> dict:
    return _epoll(ctx, edge=False)


def p_epoll_edge(ctx: Ctx) -> dict:
    return _epoll(ctx, edge=True)


def _backpressure(ctx: Ctx, writer_is_app: bool) -> dict:
    """The reader stops reading while the writer (non-blocking, waiting in select) writes
    SIZE bytes. Once the writer has made no progress for 0.5 s (or after 10 s), the
    memory queued for the connection is measured; then the reader reads every byte."""
    n = ctx.args.size
    app, side = ctx.pair()
    writer, reader = (app, side) if writer_is_app else (side, app)
    s = Stream(n, 80)
    mem0 = tcp_mem_bytes()
    progress = {"written": 0, "eagain": 0, "last": time.monotonic(), "done": False, "err": ""}
    go = threading.Event()

    def write() -> None:
        writer.setblocking(False)
        try:
            for c in s.chunks():
                while len(c):
                    try:
                        k = writer.send(c)
                    except BlockingIOError:
                        progress["eagain"] += 1
                        select.select([], [writer], [], 0.1)
                        continue
                    c = c[k:]
                    progress["written"] += k
                    progress["last"] = time.monotonic()
        except OSError as e:
            progress["err"] = errno.errorcode.get(e.errno or 0, str(e))
        progress["done"] = True
        go.wait(WAIT)
        writer.shutdown(socket.SHUT_WR)

    t = in_thread(write)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10 and not progress["done"]:
        time.sleep(0.1)
        if progress["written"] and time.monotonic() - progress["last"] > 0.5:
            break
    stalled = not progress["done"]
    written_at_stop = progress["written"]
    stopped_after = time.monotonic() - t0
    queued = {
        "writer_outq": ioctl_int(writer, SIOCOUTQ),
        "reader_inq": ioctl_int(reader, FIONREAD),
        "writer_mem": meminfo(writer),
        "reader_mem": meminfo(reader),
        "tcp_mem_delta": tcp_mem_bytes() - mem0,
    }
    go.set()
    got = Reader()
    reader.setblocking(True)
    set_rcvtimeo(reader, WAIT)
    got.read_to_eof(reader, time.monotonic() + WAIT * 6)
    join(t, "writer")
    app.close()
    side.close()
    out = {
        "writer_stalled": stalled,
        "writer_saw_eagain": progress["eagain"] > 0,
        "writer_error": progress["err"],
        "reader_got": [got.matches(s), got.end],
    }
    info = {
        "written_before_stall": written_at_stop,
        "stall_after_s": round(stopped_after, 2),
        **queued,
    }
    return {"outcome": out, "info": info}


def p_backpressure_app_writes(ctx: Ctx) -> dict:
    return _backpressure(ctx, writer_is_app=True)


def p_backpressure_sidecar_writes(ctx: Ctx) -> dict:
    return _backpressure(ctx, writer_is_app=False)


def p_stream(ctx: Ctx) -> dict:
    """SIZE bytes each way at once, blocking sockets, one thread per direction and end."""
    n = ctx.args.size
    app, side = ctx.pair()
    up, down = Stream(n, 90), Stream(n, 91)
    got_up, got_down = Reader(), Reader()
    dl = time.monotonic() + WAIT * 30
    errs: dict[str, str] = {}

    def writer(sock: socket.socket, st: Stream, name: str) -> Callable[[], None]:
        def run() -> None:
            errs[name] = send_stream(sock, st)
            sock.shutdown(socket.SHUT_WR)

        return run

    t0 = time.monotonic()
    threads = [
        in_thread(writer(app, up, "app")),
        in_thread(writer(side, down, "side")),
        in_thread(lambda: got_up.read_to_eof(side, dl)),
        in_thread(lambda: got_down.read_to_eof(app, dl)),
    ]
    for t in threads:
        join(t, "stream", WAIT * 31)
    took = time.monotonic() - t0
    app.close()
    side.close()
    out = {
        "up": [got_up.matches(up), got_up.end],
        "down": [got_down.matches(down), got_down.end],
        "errors": errs,
    }
    info = {"seconds": round(took, 2), "mib_per_s_each_way": round(n / took / 2**20, 1)}
    return {"outcome": out, "info": {**info, "eagain": got_up.eagain + got_down.eagain}}


def p_many(ctx: Ctx) -> dict:
    """CONNS connections open at once through the one sidecar; then each carries 1,000
    bytes of its own each way (checked per connection) while all stay open. The
    accepting end runs in a process of its own (forked), so that neither needs more than
    CONNS descriptors."""
    n, size = ctx.args.conns, 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 256), hard))
    r, w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the accepting end: the sidecar (app as client) or the app (as server)
        os.close(r)
        os.close(done_w)
        bad, held = [], []
        try:
            ctx.listener.settimeout(WAIT)
            for _ in range(n):
                c, _ = ctx.listener.accept()
                c.settimeout(WAIT)
                held.append(c)
            for c in held:
                data = b""
                while len(data) < size:
                    k = c.recv(size - len(data))
                    if not k:
                        break
                    data += k
                (i,) = struct.unpack("I", data[:4]) if len(data) >= 4 else (-1,)
                if i < 0 or data[4:] != small(size - 4, 1000 + i):
                    bad.append(i)
                c.sendall(small(size, 5000 + i))
            os.read(done_r, 1)  # all stay open until the caller has checked its replies
            rec = {"accepted": len(held), "bad": bad[:10]}
        except Exception as e:  # noqa: BLE001 - reported to the parent
            rec = {"error": f"{type(e).__name__}: {e}", "accepted": len(held)}
        os.write(w, json.dumps(rec).encode())
        os._exit(0)
    os.close(w)
    os.close(done_r)
    ctx.listener.close()
    t0 = time.monotonic()
    callers = [ctx.connect_one() for _ in range(n)]
    opened = time.monotonic() - t0
    bad_reply = []
    for i, c in enumerate(callers):
        c.settimeout(WAIT)
        c.sendall(struct.pack("I", i) + small(size - 4, 1000 + i))
    for i, c in enumerate(callers):
        data = b""
        while len(data) < size:
            k = c.recv(size - len(data))
            if not k:
                break
            data += k
        if data != small(size, 5000 + i):
            bad_reply.append(i)
    took = time.monotonic() - t0
    os.write(done_w, b"x")
    os.close(done_w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    acc = json.loads(b"".join(chunks) or b"{}")
    for c in callers:
        c.close()
    if "error" in acc:
        raise OSError(f"accepting end: {acc['error']}")
    calls_in = "app" if ctx.role == "client" else "sidecar"
    out = {"conns": acc.get("accepted"), "bad_from_caller": acc.get("bad"),
           "bad_from_accepter": bad_reply[:10]}  # fmt: skip
    info = {"caller": calls_in, "open_s": round(opened, 2), "total_s": round(took, 2)}
    return {"outcome": out, "info": info}


# ------------------------------------------------------------ read-side patterns
# The app reads, the sidecar writes, the app as client or as server alike (except
# fionread_early, whose receiving end is whichever end accept()s): how recv's flags,
# SO_RCVLOWAT, FIONREAD and splice(2) behave on the app's socket. Every byte read is
# compared with what was written, however it was read.


def intact(got: Reader, data: bytes) -> bool:
    return got.n == len(data) and got.h.hexdigest() == hashlib.sha256(data).hexdigest()


def settle_fionread(s: socket.socket, n: int, seconds: float) -> int:
    """FIONREAD once it reached n, or after `seconds`."""
    end = time.monotonic() + seconds
    while ioctl_int(s, FIONREAD) < n and time.monotonic() < end:
        time.sleep(0.005)
    return ioctl_int(s, FIONREAD)


def errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e))


def p_peek(ctx: Ctx) -> dict:
    """recv(MSG_PEEK). The app peeks (blocking, 2 s receive timeout) before anything has
    come: the sidecar writes 1,000 bytes 0.1 s later; the peek waits for them and shows
    them. The sidecar writes 9 more times 1,000 bytes (9 segments, or 9 messages); the
    app peeks for 10,000 until it sees all of them (1 s at most), peeks 100 again (the
    same first bytes), then recv reads 10,000: the bytes peeked."""
    writes, size = 10, 1000
    n = writes * size
    app, side = ctx.pair()
    set_rcvtimeo(app, 2)
    data = small(n, 100)

    def first_write() -> None:
        time.sleep(0.1)
        side.sendall(data[:size])

    t = in_thread(first_write)
    t0 = time.monotonic()
    try:
        first = app.recv(n, socket.MSG_PEEK)
        if not first:
            blocking = "returned 0 (EOF)"
        elif data.startswith(first):
            blocking = "woke with the first bytes"
        else:
            blocking = f"returned {len(first)} bytes, not the first ones"
    except OSError as e:
        first, blocking = b"", errname(e)
    waited = time.monotonic() - t0
    join(t, "sidecar")
    for i in range(1, writes):
        side.sendall(data[i * size : (i + 1) * size])
    seen, peeks, prefix_ok = 0, 0, True
    end = time.monotonic() + 1
    while seen < n and time.monotonic() < end:
        try:
            peeked = app.recv(n, socket.MSG_PEEK)
        except BlockingIOError:
            peeked = b""
        peeks += 1
        prefix_ok = prefix_ok and data.startswith(peeked)
        seen = max(seen, len(peeked))
        if seen < n:
            time.sleep(0.01)
    again = app.recv(100, socket.MSG_PEEK)
    got = Reader().read_exact(app, n, time.monotonic() + 2)
    app.close()
    side.close()
    out = {
        "blocking_peek": blocking,
        "peek_showed": f"{seen} of {n}",
        "peeked_bytes_ok": prefix_ok,
        "peek_again_same": again == data[:100],
        "then_recv": [intact(got, data), got.end or "complete"],
    }
    info = {"first_peek_bytes": len(first), "first_peek_after_s": round(waited, 3),
            "peeks_until_all_seen": peeks}  # fmt: skip
    return {"outcome": out, "info": info}


def p_waitall(ctx: Ctx) -> dict:
    """recv(256 KiB, MSG_WAITALL), blocking (3 s receive timeout), while the sidecar writes
    4 KiB every millisecond, starting 0.1 s later (the app is in recv by then): one call
    returns all 256 KiB."""
    n, chunk = 256 << 10, 4096
    app, side = ctx.pair()
    set_rcvtimeo(app, 3)
    data = small(n, 101)

    def writer() -> None:
        time.sleep(0.1)
        for i in range(0, n, chunk):
            side.sendall(data[i : i + chunk])
            time.sleep(0.001)

    t = in_thread(writer)
    calls: list[int] = []
    got = Reader()
    deadline = time.monotonic() + 6
    while got.n < n and time.monotonic() < deadline:
        try:
            part = app.recv(n - got.n, socket.MSG_WAITALL)
        except BlockingIOError:
            calls.append(-1)  # a blocking recv failing with EAGAIN
            continue
        except OSError as e:
            got.end = errname(e)
            break
        if not part:
            got.end = "EOF"
            break
        calls.append(len(part))
        got.add(part)
    join(t, "sidecar")
    app.close()
    side.close()
    out = {
        "one_call_returned_all": calls == [n],
        "blocking_recv_eagain": -1 in calls,
        "bytes": [intact(got, data), got.end or "complete"],
    }
    shown = calls if len(calls) <= 8 else [*calls[:8], "..."]
    info = {"recv_calls": len(calls), "returned": shown,
            "largest": max(calls, default=0)}  # fmt: skip
    return {"outcome": out, "info": info}


def p_rcvlowat(ctx: Ctx) -> dict:
    """SO_RCVLOWAT = 16 on the app's socket (blocking, 1 s receive timeout). The sidecar
    writes 5 bytes: select (0.2 s) does not report the socket readable, and a blocking
    recv waits for 16 bytes, returning the 5 only when its timeout expires. Then the
    sidecar writes the other 59 bytes one by one, every 5 ms, and shuts down its write
    side: every blocking recv returns at least 16 bytes (or all that is left), then EOF."""
    lowat, head, n = 16, 5, 64
    app, side = ctx.pair()
    app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
    set_rcvtimeo(app, 1)
    data = small(n, 102)
    side.sendall(data[:head])
    readable = bool(select.select([app], [], [], 0.2)[0])
    got = Reader()
    t0 = time.monotonic()
    try:
        part = app.recv(n)
        got.add(part)
        first = f"{len(part)} bytes"
    except OSError as e:
        first = errname(e)
    waited = time.monotonic() - t0
    first += " after the receive timeout" if waited >= 0.9 else " at once"

    def trickle() -> None:
        for i in range(head, n):
            time.sleep(0.005)
            side.send(data[i : i + 1])
        side.shutdown(socket.SHUT_WR)

    t = in_thread(trickle)
    sizes: list[int] = []
    short = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        want = n - got.n
        try:
            part = app.recv(max(want, 1))
        except BlockingIOError:
            sizes.append(-1)
            continue
        except OSError as e:
            got.end = errname(e)
            break
        if not part:
            got.end = "EOF"
            break
        sizes.append(len(part))
        short += len(part) < min(lowat, want)
        got.add(part)
    join(t, "sidecar")
    app.close()
    side.close()
    out = {
        "select_readable_below_lowat": readable,
        "first_recv": first,
        "reads_below_lowat": "none" if not short else "some",
        "blocking_recv_eagain": -1 in sizes,
        "bytes": [intact(got, data), got.end or "timeout"],
    }
    shown = sizes if len(sizes) <= 12 else [*sizes[:12], "..."]
    info = {"first_recv_after_s": round(waited, 3), "recv_sizes": shown,
            "reads_below_lowat": short}  # fmt: skip
    return {"outcome": out, "info": info}


def p_splice_read(ctx: Ctx) -> dict:
    """splice(2) from the app's socket into a pipe, 100,000 bytes waiting: blocking splice
    calls (1 s receive timeout) move them all, a pipe's worth at a time (the app empties
    the pipe after each). recv reads whatever splice did not move."""
    n = 100_000
    app, side = ctx.pair()
    set_rcvtimeo(app, 1)
    data = small(n, 103)
    side.sendall(data)
    r, w = os.pipe()
    got = Reader()
    stopped, calls = "", 0
    t0 = time.monotonic()
    deadline = t0 + 4
    while got.n < n and time.monotonic() < deadline:
        try:
            k = os.splice(app.fileno(), w, n - got.n)
        except OSError as e:
            stopped = errname(e)
            break
        calls += 1
        if k == 0:
            stopped = "returned 0"
            break
        while k:
            part = os.read(r, k)
            got.add(part)
            k -= len(part)
    spliced, took = got.n, time.monotonic() - t0
    got.read_exact(app, n - got.n, time.monotonic() + 2)
    os.close(r)
    os.close(w)
    app.close()
    side.close()
    out = {
        "spliced": f"{spliced} of {n}",
        "splice_stopped_with": stopped,
        "bytes": [intact(got, data), got.end or "complete"],
    }
    info = {"splice_calls": calls, "splice_s": round(took, 3)}
    return {"outcome": out, "info": info}


def p_fionread(ctx: Ctx) -> dict:
    """FIONREAD on the app's socket: before anything came, with 20,000 bytes waiting, and
    after the app read 5,000 of them."""
    n, first = 20_000, 5_000
    app, side = ctx.pair()
    set_rcvtimeo(app, 2)
    data = small(n, 104)
    empty = ioctl_int(app, FIONREAD)
    side.sendall(data)
    waiting = settle_fionread(app, n, 1)
    got = Reader().read_exact(app, first, time.monotonic() + 2)
    rest = ioctl_int(app, FIONREAD)
    got.read_exact(app, n - first, time.monotonic() + 2)
    app.close()
    side.close()
    out = {"fionread": [empty, waiting, rest], "bytes": [intact(got, data), got.end or "complete"]}
    return {"outcome": out, "info": {}}


def p_fionread_early(ctx: Ctx) -> dict:
    """FIONREAD for bytes that came by TCP before the receiving end was accept()ed. The
    accepting end's listener has TCP_DEFER_ACCEPT, so its end of the connection is made
    (and joins the sockhash) only with the caller's first data segment; the caller
    writes 3,000 bytes at once after connect() (on the shortcut its end found no peer,
    so this and every later write of it take TCP). The callee accept()s: FIONREAD,
    select; the caller writes 2,000 more: do they wake the callee in edge-triggered
    epoll, and FIONREAD; the callee reads all 5,000 and answers 20,000: the caller's
    FIONREAD. The callee is the app when it is the server, the sidecar when the app is
    the client."""
    early, more, reply = 3000, 2000, 20_000
    ctx.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
    data, rep = small(early + more, 105), small(reply, 106)
    caller = ctx.connect_one()
    set_rcvtimeo(caller, 2)
    caller.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    caller.sendall(data[:early])
    if not select.select([ctx.listener], [], [], 3)[0]:
        raise TimeoutError("the caller's first bytes made no connection to accept")
    callee, _ = ctx.listener.accept()
    set_rcvtimeo(callee, 2)
    callee.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    first = ioctl_int(callee, FIONREAD)
    readable = bool(select.select([callee], [], [], 0)[0])
    ep = select.epoll()
    ep.register(callee.fileno(), select.EPOLLIN | select.EPOLLET)
    ep.poll(0)  # (the bytes already waiting may report once: not what is asked)
    caller.sendall(data[early:])
    woke = bool(ep.poll(1.0))
    ep.close()
    with_more = settle_fionread(callee, early + more, 1)
    got = Reader().read_exact(callee, early + more, time.monotonic() + 2)
    callee.sendall(rep)
    reply_waiting = settle_fionread(caller, reply, 1)
    got_rep = Reader().read_exact(caller, reply, time.monotonic() + 2)
    caller.close()
    callee.close()
    out = {
        "callee_fionread": [first, with_more],
        "callee_readable": readable,
        "callee_woken_by_more": woke,
        "caller_fionread_reply": reply_waiting,
        "bytes": [intact(got, data), intact(got_rep, rep)],
    }
    app_is = "caller" if ctx.role == "client" else "callee"
    return {"outcome": out, "info": {"app_is": app_is}}


PATTERNS: dict[str, Callable[[Ctx], dict]] = {
    name[2:]: fn for name, fn in globals().items() if name.startswith("p_") and callable(fn)
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("pattern", choices=sorted(PATTERNS))
    p.add_argument("--role", choices=("client", "server"), required=True)
    p.add_argument("--pod-ip", required=True)
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--budget", type=int, default=120)
    args = p.parse_args()
    signal.alarm(args.budget)  # a backstop: never linger
    t0 = time.monotonic()
    try:
        rec = PATTERNS[args.pattern](Ctx(args))
    except (OSError, TimeoutError) as e:
        rec = {"error": f"{type(e).__name__}: {e}"}
    rec["seconds"] = round(time.monotonic() - t0, 3)
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
