"""An HTTP/2 client (h2c, prior knowledge) running many concurrent streams on ONE connection,
as its own process (inside a pod's netns and cgroup: an app, captured like any other).

    python -m tests.e2e.h2_client HOST PORT SPEC [--alone N] [--timeout S]

SPEC is JSON: a list of [method, size]; GET fetches /bytes/SIZE, POST sends SIZE bytes
(tests.kernel.peer.payload, seed 1) to /sha256. The first N streams run alone, one after
the other, to their end; then every other stream is opened at once, request
bodies are sent a frame per stream in turn (as flow control allows), and the responses
are read as they come, interleaved. Prints one JSON record: per stream its status and
the size and SHA-256 of what it sent and received (a POST's reply is the server's JSON
count and SHA-256 of what it got), the TCP connections opened (one), and how concurrent
the streams were: most streams open at once, most with a response begun and not ended,
most receiving body bytes at once, and how often consecutive DATA frames changed stream.
Run with the repository root as working directory (python -m).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import select
import socket
import sys
import time
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import H2Error, StreamClosedError
from h2.settings import SettingCodes

from tests.kernel.peer import payload

POST_SEED = 1
STREAM_WINDOW = 256 << 10  # our receive windows: flow control still paces multi-MiB bodies
CONNECTION_WINDOW = 4 << 20
OUT_HIGH = 256 << 10  # stop producing DATA while this much is waiting for the socket


@dataclass
class Stream:
    index: int
    method: str
    size: int
    sid: int = 0
    chunks: object = None  # the request body still to send (an iterator of chunks)
    pending: bytes = b""
    sent: int = 0
    sent_sha: object = field(default_factory=hashlib.sha256)
    upload_done: bool = False
    status: int | None = None
    received: int = 0
    got_sha: object = field(default_factory=hashlib.sha256)
    body: bytearray | None = None  # kept for a POST's (short JSON) reply
    head: bytes = b""  # a body's first bytes, shown for a status other than 200
    ended: bool = False
    error: str | None = None

    @property
    def path(self) -> str:
        return f"/bytes/{self.size}" if self.method == "GET" else "/sha256"

    def record(self) -> dict:
        rec = {
            "i": self.index,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "bytes": self.received,
            "sha256": self.got_sha.hexdigest(),
        }
        if self.method == "POST":
            rec["sent"] = self.sent
            rec["sent_sha256"] = self.sent_sha.hexdigest()
            try:
                rec["server"] = json.loads(bytes(self.body or b"") or b"{}")
            except ValueError:
                rec["server"] = {"unparsed": bytes(self.body or b"")[:200].decode("latin-1")}
        if self.status != 200:
            rec["text"] = self.head.decode("latin-1")
        if self.error:
            rec["error"] = self.error
        return rec


class Client:
    def __init__(
        self, host: str, port: int, streams: list[Stream], alone: int, timeout: float
    ) -> None:
        self.host, self.port, self.streams, self.alone = host, port, streams, alone
        self.deadline = time.monotonic() + timeout
        self.by_sid: dict[int, Stream] = {}
        self.connects = 0
        self.max_open = self.max_responding = self.max_receiving = 0
        self.switches = self.data_frames = 0
        self.last_data_sid = 0
        self.out = bytearray()
        self.sock: socket.socket | None = None

    # ---------------------------------------------------------------- bookkeeping
    def _measure(self) -> None:
        live = [s for s in self.streams if s.sid and not s.ended]
        self.max_open = max(self.max_open, len(live))
        responding = sum(1 for s in live if s.status is not None)
        self.max_responding = max(self.max_responding, responding)
        receiving = sum(1 for s in live if s.received)
        self.max_receiving = max(self.max_receiving, receiving)

    def _end(self, st: Stream, error: str | None = None) -> None:
        st.ended = True
        st.error = st.error or error

    # ---------------------------------------------------------------- the connection
    def run(self) -> dict:
        started = time.monotonic()
        self.sock = socket.create_connection((self.host, self.port), timeout=10)
        self.connects += 1
        local = "{}:{}".format(*self.sock.getsockname()[:2])
        peer = "{}:{}".format(*self.sock.getpeername()[:2])
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        for st in self.streams[: self.alone]:  # one by one, each to its end
            self._open(conn, [st])
            self._until_ended(conn, [st])
        rest = self.streams[self.alone :]
        self._open(conn, rest)  # every other stream opened at once, in SPEC's order
        self._until_ended(conn, rest)
        conn.close_connection()
        self.out += conn.data_to_send()
        self.sock.setblocking(True)
        self.sock.settimeout(max(1.0, self.deadline - time.monotonic()))
        self.sock.sendall(self.out)
        self.sock.shutdown(socket.SHUT_WR)
        while self.sock.recv(1 << 16):  # until the peer closes too
            pass
        self.sock.close()
        return {
            "connects": self.connects,
            "local": local,
            "peer": peer,
            "streams": [s.record() for s in self.streams],
            "max_open": self.max_open,
            "max_responding": self.max_responding,
            "max_receiving": self.max_receiving,
            "data_frames": self.data_frames,
            "stream_switches": self.switches,
            "seconds": round(time.monotonic() - started, 3),
        }

    def _open(self, conn: H2Connection, streams: list[Stream]) -> None:
        authority = f"{self.host}:{self.port}"
        for st in streams:
            st.sid = conn.get_next_available_stream_id()
            self.by_sid[st.sid] = st
            headers = [
                (":method", st.method),
                (":scheme", "http"),
                (":authority", authority),
                (":path", st.path),
                ("user-agent", "meshaccel-h2-client"),
            ]
            if st.method == "POST":
                headers.append(("content-length", str(st.size)))
                st.chunks = iter(payload(st.size, POST_SEED))
            else:
                st.upload_done = True
            conn.send_headers(st.sid, headers, end_stream=st.method == "GET")
        self._measure()

    def _until_ended(self, conn: H2Connection, streams: list[Stream]) -> None:
        """Send and receive until these streams have ended."""
        while not all(s.ended for s in streams):
            self._pump(conn)
            self.out += conn.data_to_send()
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{sum(not s.ended for s in streams)} streams unfinished")
            readable, writable, _ = select.select(
                [self.sock], [self.sock] if self.out else [], [], min(left, 1.0)
            )
            if writable:
                try:
                    n = self.sock.send(self.out)
                    del self.out[:n]
                except BlockingIOError:
                    pass
            if readable:
                try:
                    data = self.sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    raise ConnectionError("connection closed by the peer")
                goaway = self._handle(conn, conn.receive_data(data))
                if goaway:
                    for st in self.streams:
                        if not st.ended:
                            self._end(st, f"GOAWAY {goaway}")

    def _pump(self, conn: H2Connection) -> None:
        """One frame per uploading stream per pass, while flow control and our buffer
        allow: the request bodies go out interleaved."""
        progressed = True
        while progressed and len(self.out) < OUT_HIGH:
            progressed = False
            for st in self.streams:
                if not st.sid or st.upload_done or st.ended:
                    continue
                if not st.pending:
                    st.pending = next(st.chunks, b"")
                    if not st.pending:
                        conn.end_stream(st.sid)
                        st.upload_done = True
                        progressed = True
                        continue
                try:
                    window = conn.local_flow_control_window(st.sid)
                except StreamClosedError:
                    st.upload_done = True
                    continue
                k = min(window, conn.max_outbound_frame_size, len(st.pending))
                if k <= 0:
                    continue
                chunk, st.pending = st.pending[:k], st.pending[k:]
                conn.send_data(st.sid, chunk)
                st.sent += k
                st.sent_sha.update(chunk)
                progressed = True
            self.out += conn.data_to_send()

    def _handle(self, conn: H2Connection, events: list) -> str | None:
        goaway = None
        for ev in events:
            st = self.by_sid.get(getattr(ev, "stream_id", 0) or 0)
            if isinstance(ev, ResponseReceived) and st:
                st.status = int(dict(ev.headers)[":status"])
                if st.method == "POST":
                    st.body = bytearray()
            elif isinstance(ev, DataReceived) and st:
                self.data_frames += 1
                if self.last_data_sid and ev.stream_id != self.last_data_sid:
                    self.switches += 1
                self.last_data_sid = ev.stream_id
                st.received += len(ev.data)
                st.got_sha.update(ev.data)
                if len(st.head) < 300:
                    st.head += ev.data[: 300 - len(st.head)]
                if st.body is not None:
                    st.body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, TrailersReceived) and st:
                pass
            elif isinstance(ev, StreamEnded) and st:
                self._end(st)
            elif isinstance(ev, StreamReset) and st:
                self._end(st, f"reset {ev.error_code!r}")
            elif isinstance(ev, ConnectionTerminated):
                goaway = f"{ev.error_code!r} last stream {ev.last_stream_id}"
            self._measure()
        return goaway


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("spec")
    p.add_argument("--alone", type=int, default=0, help="run SPEC's first N streams alone")
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    streams = [Stream(i, m, int(n)) for i, (m, n) in enumerate(json.loads(args.spec))]
    client = Client(args.host, args.port, streams, args.alone, args.timeout)
    try:
        rec = client.run()
    except (OSError, ValueError, H2Error) as e:
        rec = {
            "error": f"{type(e).__name__}: {e}",
            "connects": client.connects,
            "streams": [s.record() for s in streams],
        }
        print(json.dumps(rec), flush=True)
        sys.exit(1)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
