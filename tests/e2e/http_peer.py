"""An HTTP/1.1 server and client run as their own processes (inside pod netns and cgroups).

    python -m tests.e2e.http_peer serve ADDR PORT
    python -m tests.e2e.http_peer client HOST PORT [--post-bytes N] [--get-bytes N]

serve prints {"ready": true} once bound, then answers POST (any path) with the JSON
{"bytes": n, "sha256": ..} of the request body, and GET /bytes/N with N deterministic bytes
(tests.kernel.peer.payload, seed 2). client does one POST and one GET on one keep-alive
connection and prints one JSON record (statuses, byte counts, SHA-256s, connects made).
Run with the repository root as working directory (python -m).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.kernel.peer import CHUNK, payload

REPLY_SEED = 2


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, Content-Length framed

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass

    def _reply(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> tuple[int, str]:
        h = hashlib.sha256()
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data = self.rfile.read(size)
                h.update(data)
                n += len(data)
                self.rfile.readline()  # CRLF after the chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return n, h.hexdigest()
        left = int(self.headers.get("Content-Length", 0))
        while left:
            data = self.rfile.read(min(CHUNK, left))
            if not data:
                break
            h.update(data)
            n += len(data)
            left -= len(data)
        return n, h.hexdigest()

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        n, sha = self._body()
        self._reply(200, json.dumps({"bytes": n, "sha256": sha}).encode())

    def do_GET(self) -> None:  # noqa: N802
        parts = self.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "bytes" or not parts[1].isdigit():
            self._reply(404, b'{"error": "not found"}')
            return
        n = int(parts[1])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        for c in payload(n, REPLY_SEED):
            self.wfile.write(c)


class Server(ThreadingHTTPServer):
    # a burst of connections (Envoy opening one per concurrent request) must not find
    # socketserver's default backlog of 5 full: dropped SYNs leave connects in SYN-SENT
    request_queue_size = 128
    daemon_threads = True


def serve(args: argparse.Namespace) -> None:
    server = Server((args.addr, args.port), Handler)
    print(json.dumps({"ready": True}), flush=True)
    server.serve_forever()


class CountingConnection(http.client.HTTPConnection):
    connects = 0

    def connect(self) -> None:
        super().connect()
        self.connects += 1


def client(args: argparse.Namespace) -> None:
    conn = CountingConnection(args.host, args.port, timeout=args.timeout)
    rec: dict = {}

    sent = hashlib.sha256()

    def body():
        for c in payload(args.post_bytes, seed=1):
            sent.update(c)
            yield c

    conn.request("POST", "/sha256", body=body(), headers={"Content-Length": str(args.post_bytes)})
    r = conn.getresponse()
    rec["post"] = {
        "status": r.status,
        "sent": args.post_bytes,
        "sent_sha256": sent.hexdigest(),
        "server": json.loads(r.read() or b"{}"),
    }
    sock = conn.sock
    rec["local"] = "{}:{}".format(*sock.getsockname()[:2])
    rec["peer"] = "{}:{}".format(*sock.getpeername()[:2])

    conn.request("GET", f"/bytes/{args.get_bytes}")
    r = conn.getresponse()
    got = hashlib.sha256()
    n = 0
    while data := r.read(CHUNK):
        got.update(data)
        n += len(data)
    rec["get"] = {"status": r.status, "received": n, "received_sha256": got.hexdigest()}
    rec["same_socket"] = conn.sock is sock
    rec["connects"] = conn.connects
    conn.close()
    print(json.dumps(rec), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("serve")
    sp.add_argument("addr")
    sp.add_argument("port", type=int)
    cp = sub.add_parser("client")
    cp.add_argument("host")
    cp.add_argument("port", type=int)
    cp.add_argument("--post-bytes", type=int, default=0)
    cp.add_argument("--get-bytes", type=int, default=0)
    cp.add_argument("--timeout", type=float, default=30)
    args = p.parse_args()
    try:
        serve(args) if args.cmd == "serve" else client(args)
    except (OSError, http.client.HTTPException) as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
