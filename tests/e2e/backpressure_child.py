"""The apps of tests/e2e/test_backpressure_envoy.py, each run as its own process in its pod
(python -m tests.e2e.backpressure_child ROLE ...; the test writes lines to its stdin to
move it on, and reads one JSON record per line from its stdout).

    server PORT: listens on 0.0.0.0:PORT ({"ready": true}), accepts one connection
      ({"accepted": peer}), then reads nothing until the line "read" comes; then reads
      to EOF and prints {"bytes", "sha256", "seconds"}, and closes.
    client HOST PORT --bytes N: connects (captured to its sidecar), writes N bytes
      non-blocking; once a write has made no progress for --stall seconds (the writer
      stalled), or every byte is written, prints {"stalled", "written", "after_s",
      "eagain"} and waits for the line "go"; then writes the rest (waiting in select),
      SHUT_WR, reads to EOF and prints {"written", "sha256", "seconds", "received"}.
    --http (both): the upload is the body of one HTTP/1.1 POST (Content-Length); the
      server reads the body and answers 200; the client reads the answer's status line
      ("received") instead of SHUT_WR and EOF.

The payload is tests/kernel/app_patterns_child.py's Stream (deterministic, fast), so a
lost, duplicated or reordered chunk changes the SHA-256. Both ends give up after
--budget seconds (SIGALRM)."""

from __future__ import annotations

import argparse
import hashlib
import json
import select
import signal
import socket
import sys
import time

from tests.kernel.app_patterns_child import CHUNK, Stream

SEED = 81


def out(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def wait_for(line: str) -> None:
    got = sys.stdin.readline().strip()
    if got != line:
        raise SystemExit(f"expected {line!r} on stdin, got {got!r}")


def server(args: argparse.Namespace) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", args.port))
    ls.listen(1)
    out({"ready": True})
    conn, peer = ls.accept()
    ls.close()
    out({"accepted": f"{peer[0]}:{peer[1]}"})
    wait_for("read")
    conn.settimeout(60)
    t0 = time.monotonic()
    h, n = hashlib.sha256(), 0
    left = -1  # to EOF; --http: the request's Content-Length
    data = b""
    if args.http:
        while b"\r\n\r\n" not in data:
            more = conn.recv(4096)
            if not more:
                raise SystemExit(f"EOF in the request's head: {data!r}")
            data += more
        head, data = data.split(b"\r\n\r\n", 1)
        length = [ln for ln in head.lower().split(b"\r\n") if ln.startswith(b"content-length:")]
        left = int(length[0].split(b":")[1]) - len(data)
        h.update(data)
        n += len(data)
    while left and (data := conn.recv(1 << 20 if left < 0 else min(left, 1 << 20))):
        h.update(data)
        n += len(data)
        left -= len(data) if left > 0 else 0
    seconds = round(time.monotonic() - t0, 2)
    if args.http:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn.close()
    out({"bytes": n, "sha256": h.hexdigest(), "seconds": seconds})


def client(args: argparse.Namespace) -> None:
    s = socket.create_connection((args.host, args.port), timeout=10)
    if args.http:  # the head of one POST whose body is the upload
        head = f"POST /upload HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
        s.sendall(f"{head}Content-Length: {args.bytes}\r\n\r\n".encode())
    s.setblocking(False)
    stream = Stream(args.bytes, SEED)
    t0 = last = time.monotonic()
    written = eagain = 0
    reported = False

    def report(stalled: bool) -> None:
        after = round((last if stalled else time.monotonic()) - t0, 2)
        out({"stalled": stalled, "written": written, "after_s": after, "eagain": eagain})
        wait_for("go")

    for chunk in stream.chunks(CHUNK):
        while len(chunk):
            try:
                k = s.send(chunk)
            except BlockingIOError:
                eagain += 1
                if not reported and time.monotonic() - last > args.stall:
                    report(stalled=True)
                    reported = True
                select.select([], [s], [], 0.1)
                continue
            chunk = chunk[k:]
            written += k
            last = time.monotonic()
    if not reported:
        report(stalled=False)
    if not args.http:
        s.shutdown(socket.SHUT_WR)
    s.setblocking(True)
    s.settimeout(60)
    received = b""
    while not args.http or b"\r\n\r\n" not in received:
        data = s.recv(CHUNK)
        if not data:
            break
        received += data
    s.close()
    out(
        {
            "written": written,
            "sha256": stream.sha(),
            "seconds": round(time.monotonic() - t0, 2),
            "received": received.decode(errors="replace").split("\r\n")[0],
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=300)
    sub = ap.add_subparsers(dest="role", required=True)
    sp = sub.add_parser("server")
    sp.add_argument("port", type=int)
    sp.add_argument("--http", action="store_true", help="one HTTP/1.1 POST, answered 200")
    cp = sub.add_parser("client")
    cp.add_argument("host")
    cp.add_argument("port", type=int)
    cp.add_argument("--bytes", type=int, required=True)
    cp.add_argument("--stall", type=float, default=1.0)
    cp.add_argument("--http", action="store_true", help="the upload as one POST's body")
    args = ap.parse_args()
    signal.alarm(args.budget)  # a backstop: never linger
    {"server": server, "client": client}[args.role](args)


if __name__ == "__main__":
    main()
