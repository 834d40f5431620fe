"""A test peer run as its own process (inside a pod's netns and cgroup, as any uid).

    peer.py listen ADDR PORT [--conns N] [--reply-bytes N] [--accept-delay S]
    peer.py connect ADDR PORT [--send-bytes N] [--seed S] [--bind ADDR:PORT] [--udp] [--hold]
    peer.py blocking ADDR PORT [--conns N] [--send-bytes N]

Each prints JSON lines on stdout: listen prints {"ready": true} once bound, then one
record per connection (original destination from SO_ORIGINAL_DST, bytes received and
their SHA-256); connect prints one record (addresses, bytes sent/received, SHA-256s).
Payloads are deterministic (seeded), so each side can recompute the other's checksum.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import random
import signal
import socket
import struct
import sys
import time

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IPV6 = 41  # (not exported by the socket module)
CHUNK = 64 * 1024


def payload(n: int, seed: int):
    """n deterministic pseudo-random bytes, in chunks."""
    rnd = random.Random(seed)
    while n > 0:
        k = min(CHUNK, n)
        yield rnd.randbytes(k)
        n -= k


def payload_sha(n: int, seed: int) -> str:
    h = hashlib.sha256()
    for c in payload(n, seed):
        h.update(c)
    return h.hexdigest()


def original_dst(conn: socket.socket) -> str | None:
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, ip = struct.unpack_from("!2xH4s", raw)
            return f"{ipaddress.IPv4Address(ip)}:{port}"
        raw = conn.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port, ip = struct.unpack_from("!2xH4x16s", raw)
        addr = ipaddress.IPv6Address(ip)
        return f"{addr.ipv4_mapped}:{port}" if addr.ipv4_mapped else f"[{addr}]:{port}"
    except OSError as e:
        return f"error:{e.errno}"


def addr(sockaddr: tuple) -> str:
    return f"{sockaddr[0]}:{sockaddr[1]}"


def out(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def recv_all(conn: socket.socket, slow_for: float = 0) -> tuple[int, str]:
    """Read to EOF; for the first slow_for seconds pause 50 ms between reads, so that
    what the peer sends queues up on this side."""
    h = hashlib.sha256()
    n = 0
    slow_until = time.monotonic() + slow_for
    while True:
        data = conn.recv(CHUNK)
        if not data:
            return n, h.hexdigest()
        h.update(data)
        n += len(data)
        if time.monotonic() < slow_until:
            time.sleep(0.05)


def listen(args) -> None:
    family = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((args.addr, args.port))
    s.listen(64)
    out({"ready": True})
    time.sleep(args.accept_delay)
    for _ in range(args.conns):
        conn, peer = s.accept()
        with conn:
            rec = {"peer": f"{peer[0]}:{peer[1]}", "orig_dst": original_dst(conn)}
            rec["bytes"], rec["sha256"] = recv_all(conn, args.slow_for)
            for c in payload(args.reply_bytes, seed=2):
                conn.sendall(c)
        out(rec)


def connect(args) -> None:
    if args.udp:
        s = socket.socket(
            socket.AF_INET6 if ":" in args.addr else socket.AF_INET, socket.SOCK_DGRAM
        )
        s.connect((args.addr, args.port))
        out({"local": addr(s.getsockname()), "peer": addr(s.getpeername())})
        return
    family = socket.AF_INET6 if ":" in args.addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    if args.bind:
        host, port = args.bind.rsplit(":", 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host.strip("[]"), int(port)))
    s.settimeout(args.timeout)
    s.connect((args.addr, args.port))
    rec = {"local": addr(s.getsockname()), "peer": addr(s.getpeername())}
    if args.hold:  # let the test line connections up: report, then wait for a go
        out({"connected": True, **rec})
        sys.stdin.readline()
    sent = hashlib.sha256()
    for c in payload(args.send_bytes, seed=args.seed):
        s.sendall(c)
        sent.update(c)
    s.shutdown(socket.SHUT_WR)
    rec["sent"], rec["sent_sha256"] = args.send_bytes, sent.hexdigest()
    rec["received"], rec["received_sha256"] = recv_all(s)
    s.close()
    out(rec)


def blocking(args) -> None:
    """Connections on plain blocking sockets (no timeout: the way many apps read), each
    sending, half-closing and reading the reply to EOF. A blocking recv() should never
    fail with EAGAIN; count it when it does (and retry) rather than die. SIGALRM bounds
    the whole run."""
    signal.alarm(int(args.deadline))
    eagain, replies, where = 0, set(), set()
    for _ in range(args.conns):
        s = socket.socket(socket.AF_INET6 if ":" in args.addr else socket.AF_INET)
        s.connect((args.addr, args.port))
        for c in payload(args.send_bytes, seed=1):
            s.sendall(c)
        s.shutdown(socket.SHUT_WR)
        h, n = hashlib.sha256(), 0
        while True:
            try:
                data = s.recv(CHUNK)
            except BlockingIOError:
                eagain += 1
                where.add("mid-stream" if n < args.expect_bytes else "before EOF")
                continue
            if not data:
                break
            h.update(data)
            n += len(data)
        s.close()
        replies.add((n, h.hexdigest()))
    out({"conns": args.conns, "eagain": eagain, "where": sorted(where), "replies": sorted(replies)})


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("listen")
    lp.add_argument("addr")
    lp.add_argument("port", type=int)
    lp.add_argument("--conns", type=int, default=1)
    lp.add_argument("--reply-bytes", type=int, default=0)
    lp.add_argument("--accept-delay", type=float, default=0, help="seconds before accept()")
    lp.add_argument("--slow-for", type=float, default=0, help="seconds of slow reading first")
    cp = sub.add_parser("connect")
    cp.add_argument("addr")
    cp.add_argument("port", type=int)
    cp.add_argument("--send-bytes", type=int, default=0)
    cp.add_argument("--seed", type=int, default=1)
    cp.add_argument("--bind")
    cp.add_argument("--udp", action="store_true")
    cp.add_argument("--hold", action="store_true", help="after connecting, wait for a stdin line")
    cp.add_argument("--timeout", type=float, default=20)
    bp = sub.add_parser("blocking")
    bp.add_argument("addr")
    bp.add_argument("port", type=int)
    bp.add_argument("--conns", type=int, default=1)
    bp.add_argument("--send-bytes", type=int, default=0)
    bp.add_argument("--deadline", type=float, default=60)
    bp.add_argument("--expect-bytes", type=int, default=0, help="reply size, to place EAGAINs")
    args = p.parse_args()
    try:
        {"listen": listen, "connect": connect, "blocking": blocking}[args.cmd](args)
    except OSError as e:
        out({"error": f"{type(e).__name__}: {e}", "errno": e.errno})
        sys.exit(1)


if __name__ == "__main__":
    main()
