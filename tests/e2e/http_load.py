"""A bounded HTTP load run as its own process (inside a pod's netns and cgroup, as its app),
every response checked, against tests.e2e.http_peer's server.

    python -m tests.e2e.http_load HOST PORT [--bytes N] [--deadline S]

Two workers run side by side until stdin says `stop` (or closes) or the deadline passes:
`keepalive` sends all its requests on one connection (a new one only after an error),
`fresh` opens a new connection for every request. Requests alternate a GET /bytes/N (the
body's length and SHA-256 checked against tests.kernel.peer.payload(N, 2)) and a POST of
N bytes (the server's reply must name exactly the bytes sent). A stdin line `mark NAME`
prints {"mark": NAME, "ok": .., "failed": .., "corrupted": ..} at once, so that the test
can tell the requests completed after each of its steps. At the end one JSON record:
requests, ok, failed (an error instead of a response), corrupted (a response with the
wrong status, length or checksum), connects (connections opened), bytes (body bytes
checked), per worker, the marks and the first errors. Run with the repository root as
working directory (python -m).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import signal
import sys
import threading
import time

from tests.kernel.peer import payload

MAX_ERRORS = 20  # kept in the record; all of them are counted
KEYS = ("requests", "ok", "failed", "corrupted", "connects", "bytes")


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_worker: dict[str, dict[str, int]] = {}
        self.errors: list[dict] = []
        self.marks: list[dict] = []

    def add(self, worker: str, key: str, n: int = 1) -> None:
        with self.lock:
            counts = self.by_worker.setdefault(worker, dict.fromkeys(KEYS, 0))
            counts[key] += n

    def error(self, rec: dict) -> None:
        with self.lock:
            if len(self.errors) < MAX_ERRORS:
                self.errors.append({"t": round(time.monotonic() - START, 3), **rec})

    def totals(self) -> dict[str, int]:
        with self.lock:
            return {k: sum(c[k] for c in self.by_worker.values()) for k in KEYS}


START = time.monotonic()
tally = Tally()


class CountingConnection(http.client.HTTPConnection):
    """Counts every connection it opens (http.client reopens on its own after a close)."""

    worker = "?"

    def connect(self) -> None:
        super().connect()
        tally.add(self.worker, "connects")


def run_worker(name: str, args: argparse.Namespace, stop: threading.Event, deadline: float) -> None:
    n = args.bytes
    body = b"".join(payload(n, 1))
    body_sha = hashlib.sha256(body).hexdigest()
    get_sha = hashlib.sha256(b"".join(payload(n, 2))).hexdigest()
    fresh = name == "fresh"
    conn: CountingConnection | None = None
    i = 0
    while not stop.is_set() and time.monotonic() < deadline:
        if conn is None:
            conn = CountingConnection(args.host, args.port, timeout=args.timeout)
            conn.worker = name
        method = "GET" if i % 2 == 0 else "POST"
        tally.add(name, "requests")
        try:
            if method == "GET":
                conn.request("GET", f"/bytes/{n}")
                r = conn.getresponse()
                data = r.read()
                got = {"status": r.status, "bytes": len(data)}
                good = r.status == 200 and len(data) == n
                good = good and hashlib.sha256(data).hexdigest() == get_sha
            else:
                conn.request("POST", "/sha256", body=body, headers={"Content-Length": str(n)})
                r = conn.getresponse()
                raw = r.read()
                got = {"status": r.status, "reply": raw[:200].decode(errors="replace")}
                try:
                    good = r.status == 200 and json.loads(raw) == {"bytes": n, "sha256": body_sha}
                except ValueError:
                    good = False
            if good:
                tally.add(name, "ok")
                tally.add(name, "bytes", n)
            else:
                tally.add(name, "corrupted")
                tally.error({"worker": name, "request": i, "method": method, "corrupted": got})
        except (OSError, http.client.HTTPException) as e:
            tally.add(name, "failed")
            tally.error({"worker": name, "request": i, "method": method, "error": repr(e)})
            conn.close()
            conn = None
        if fresh and conn is not None:
            conn.close()
            conn = None
        i += 1
    if conn is not None:
        conn.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bytes", type=int, default=64 << 10, help="GET and POST body size")
    p.add_argument("--deadline", type=float, default=60, help="seconds at most")
    p.add_argument("--timeout", type=float, default=10, help="per request")
    args = p.parse_args()
    signal.alarm(int(args.deadline + 2 * args.timeout + 10))  # a hung worker cannot hold us
    stop = threading.Event()
    deadline = time.monotonic() + args.deadline
    workers = [
        threading.Thread(target=run_worker, args=(name, args, stop, deadline), daemon=True)
        for name in ("keepalive", "fresh")
    ]
    for w in workers:
        w.start()
    print(json.dumps({"started": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["mark"]:
            rec = {"mark": " ".join(words[1:]), "t": round(time.monotonic() - START, 3)}
            rec.update(tally.totals())
            tally.marks.append(rec)
            print(json.dumps(rec), flush=True)
        elif words[:1] == ["stop"]:
            break
    stop.set()
    for w in workers:
        w.join()
    with tally.lock:
        by_worker = {k: dict(v) for k, v in tally.by_worker.items()}
    rec = {
        **tally.totals(),
        "seconds": round(time.monotonic() - START, 3),
        "by_worker": by_worker,
        "marks": tally.marks,
        "errors": tally.errors,
    }
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
