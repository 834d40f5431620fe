"""The open-loop load generator against small real HTTP servers on loopback (no root needed)."""

from __future__ import annotations

import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meshaccel.errors import MeshaccelError
from meshaccel.lab import openloop
from meshaccel.lab.http_probe import free_port


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive; the path picks the behaviour."""

    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes: without this, Nagle holds the body back
    # until the client's delayed ACK (40 ms)
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server: CountingServer = self.server  # type: ignore[assignment]
        with server.lock:
            server.count += 1
            server.seen.append((self.path, self.headers.get("Host"), self.headers["User-Agent"]))
        if self.path == "/slow":
            time.sleep(0.05)
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"hello ", b"chunked " * 500, b"world"):
                self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
            return
        status = 503 if self.path == "/fail" else 200
        body = b"x" * (20000 if self.path == "/big" else 2)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if self.path == "/close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], family: int = socket.AF_INET) -> None:
        self.address_family = family
        super().__init__(addr, Handler)
        self.lock = threading.Lock()
        self.count = 0
        self.seen: list[tuple[str, str | None, str | None]] = []


def serving(server: socketserver.BaseServer) -> Iterator[socketserver.BaseServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def http() -> Iterator[CountingServer]:
    yield from serving(CountingServer(("127.0.0.1", 0)))  # type: ignore[misc]


def url(server: socketserver.BaseServer, path: str) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("openloop-cache")
    openloop.binary(path)
    return path


def run(cache: Path, target: str, rate: int, duration: float, connections: int, **kw) -> dict:
    argv = openloop.argv(target, rate, duration, connections, cache_dir=cache, **kw)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    out = openloop.parse(p.stdout)
    assert out["completed"] + out["dropped"] + out["errors"] == out["scheduled"], out
    assert out["sent"] == out["completed"] + out["errors"], out
    return out


def test_fixed_rate_keep_alive(cache: Path, http: CountingServer) -> None:
    t0 = time.monotonic()
    out = run(cache, url(http, "/ok"), 200, 1, 4)
    assert 1 <= time.monotonic() - t0 < 3
    assert out["scheduled"] == 200
    assert out["completed"] >= 190
    assert out["errors"] == 0 and out["non2xx"] == 0
    assert 0 < out["p50_ms"] <= out["p90_ms"] <= out["p99_ms"] <= out["p999_ms"] <= out["max_ms"]
    assert out["p50_ms"] <= out["mean_ms"] * 10
    assert 1.0 <= out["duration_s"] < 1.5
    assert out["rps"] == pytest.approx(out["completed"] / out["duration_s"], rel=0.01)
    assert http.count == out["sent"]
    port = http.server_address[1]
    assert set(http.seen) == {("/ok", f"127.0.0.1:{port}", "meshaccel-openloop")}


def test_warmup_is_not_counted(cache: Path, http: CountingServer) -> None:
    out = run(cache, url(http, "/ok"), 100, 0.3, 2, warmup=0.2)
    assert out["scheduled"] == 30
    assert out["completed"] + out["dropped"] == 30
    assert out["duration_s"] < 0.6  # measured from the end of the warm-up
    assert 45 <= http.count <= 50


def test_non_2xx_counted_with_latency(cache: Path, http: CountingServer) -> None:
    out = run(cache, url(http, "/fail"), 50, 0.4, 2)
    assert out["completed"] >= 15
    assert out["non2xx"] == out["completed"]
    assert out["p50_ms"] > 0


def test_slow_server_drops_and_counts_queueing(cache: Path, http: CountingServer) -> None:
    out = run(cache, url(http, "/slow"), 100, 1, 1)
    assert out["scheduled"] == 100
    assert out["dropped"] >= 80
    assert out["errors"] == 0
    assert out["p50_ms"] >= 50
    assert http.count == out["sent"]


@pytest.mark.parametrize("path", ["/chunked", "/big", "/close"])
def test_bodies_and_closing(cache: Path, http: CountingServer, path: str) -> None:
    """Chunked bodies (with extensions and trailers), bodies larger than one read, and a
    server that closes after every response (so every request needs a new connection)."""
    out = run(cache, url(http, path), 50, 0.3, 4)
    assert out["errors"] == 0 and out["non2xx"] == 0
    assert out["completed"] >= 13
    assert http.count == out["sent"]


def test_ipv6(cache: Path) -> None:
    try:
        server = CountingServer(("::1", 0), socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback")
    for srv in serving(server):
        out = run(cache, url(srv, "/ok"), 50, 0.2, 1)
        assert out["completed"] == 10 and out["errors"] == 0


class Scripted(socketserver.ThreadingTCPServer):
    """Answers every request with `respond(conn)` (raw bytes, any way it likes)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, respond: Callable[[socket.socket], None]) -> None:
        self.respond = respond
        super().__init__(("127.0.0.1", 0), ScriptedHandler)


class ScriptedHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = self.request.recv(4096)
                if not data:
                    return
                buf += data
            buf = buf.split(b"\r\n\r\n", 1)[1]
            self.server.respond(self.request)  # type: ignore[attr-defined]


def test_responses_split_over_many_reads(cache: Path) -> None:
    response = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 201 Created\r\ncontent-LENGTH: 5\r\nX: y\r\n\r\nhello"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )

    head = response[: response.index(b"hello") + 5]

    def respond(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # the 100 and the 201, with a pause at every awkward place: inside a \r\n\r\n, the
        # status code, a header name, the body
        cuts = [
            head.index(b"\r\n\r\n") + 2,
            head.index(b"201") + 1,
            head.index(b"LENGTH") + 3,
            head.rindex(b"\r\n\r\n") + 1,
            len(head) - 2,
            len(head),
        ]
        for start, end in zip([0, *cuts], cuts, strict=False):
            conn.sendall(head[start:end])
            time.sleep(0.002)

    for srv in serving(Scripted(respond)):
        out = run(cache, url(srv, "/"), 20, 0.3, 2)
        assert out["completed"] == 6 and out["errors"] == 0 and out["non2xx"] == 0
        assert out["p50_ms"] >= 10  # all the pauses were waited for

    chunked = response[response.index(b"hello") + 5 :]

    def respond_chunked(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(chunked)):  # one byte per segment
            conn.sendall(chunked[i : i + 1])
            time.sleep(0.0002)

    for srv in serving(Scripted(respond_chunked)):
        out = run(cache, url(srv, "/"), 20, 0.3, 2)
        assert out["completed"] == 6 and out["errors"] == 0


def test_no_answer_is_an_error_after_timeout(cache: Path) -> None:
    for srv in serving(Scripted(lambda conn: None)):
        t0 = time.monotonic()
        out = run(cache, url(srv, "/"), 20, 0.2, 2, timeout=0.3)
        assert time.monotonic() - t0 < 2
        assert out["completed"] == 0 and out["errors"] >= 2 and out["sent"] == out["errors"]
        assert out["p50_ms"] == 0 and out["max_ms"] == 0 and out["rps"] == 0


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",  # then closes
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * 20000 + b"\r\n\r\n",  # headers too big
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_broken_answers_are_errors(cache: Path, answer: bytes) -> None:
    def respond(conn: socket.socket) -> None:
        conn.sendall(answer)
        conn.shutdown(socket.SHUT_RDWR)

    for srv in serving(Scripted(respond)):
        out = run(cache, url(srv, "/"), 20, 0.2, 2)
        assert out["completed"] == 0 and out["errors"] >= 3


def test_connect_failure_exits_1(cache: Path) -> None:
    p = subprocess.run(
        openloop.argv(f"http://127.0.0.1:{free_port()}/", 10, 0.1, 1, cache_dir=cache),
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert p.returncode == 1
    assert "connect" in p.stderr and p.stdout == ""


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--url", "https://127.0.0.1/"),
        ("--url", "http://localhost:8080/"),
        ("--url", "http://127.0.0.1:99999/"),
        ("--url", "http://[fd00::1/"),
        ("--url", "http://127.0.0.1/a b"),
        ("--rate", "0"),
        ("--rate", "-5"),
        ("--rate", "fast"),
        ("--duration", "1s"),
        ("--connections", "1.5"),
        ("--timeout", "0"),
        ("--warmup", "-1"),
    ],
)
def test_bad_arguments_exit_2(cache: Path, flag: str, value: str) -> None:
    args = {"--url": "http://127.0.0.1:1/", "--rate": "10", "--duration": "1"}
    args |= {"--connections": "1", flag: value}
    argv = [openloop.binary(cache), *(x for kv in args.items() for x in kv)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert p.returncode == 2
    assert flag in p.stderr and value in p.stderr
    assert p.stdout == ""


def test_missing_and_unknown_flags_exit_2(cache: Path) -> None:
    exe = openloop.binary(cache)
    p = subprocess.run([exe, "--url", "http://127.0.0.1/", "--rate", "5"], capture_output=True)
    assert p.returncode == 2 and b"--duration" in p.stderr
    p = subprocess.run([exe, "--rate=5", "--bogus", "1"], capture_output=True)
    assert p.returncode == 2 and b"--bogus" in p.stderr


def test_binary_is_cached_and_rebuilt_on_change(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = openloop.binary(cache)
    mtime = Path(first).stat().st_mtime_ns
    assert openloop.binary(cache) == first and Path(first).stat().st_mtime_ns == mtime
    src = tmp_path / "openloop.c"
    src.write_text(openloop.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(openloop, "SOURCE", src)
    rebuilt = openloop.binary(cache)
    assert rebuilt != first and Path(rebuilt).parent == cache
    assert openloop.binary(cache) == rebuilt
    names = sorted(p.name for p in cache.iterdir())  # and no build leftovers
    assert names == sorted([Path(first).name, Path(rebuilt).name])


def test_compile_errors_and_no_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "openloop.c"
    src.write_text("int main(void) { return undeclared; }\n")
    monkeypatch.setattr(openloop, "SOURCE", src)
    with pytest.raises(MeshaccelError, match="undeclared"):
        openloop.binary(tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())
    monkeypatch.setattr(openloop.shutil, "which", lambda name: None)
    with pytest.raises(MeshaccelError, match="no C compiler"):
        openloop.binary(tmp_path / "cache")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert openloop.default_cache_dir() == tmp_path / "meshaccel"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert openloop.default_cache_dir() == Path.home() / ".cache" / "meshaccel"


def test_argv(cache: Path) -> None:
    argv = openloop.argv("http://10.0.0.1:9080/x", 1000, 2.5, 8, cache_dir=cache)
    assert argv[0] == openloop.binary(cache)
    assert argv[1:] == [
        "--url",
        "http://10.0.0.1:9080/x",
        "--rate",
        "1000",
        "--duration",
        "2.5",
        "--connections",
        "8",
        "--timeout",
        "5",
        "--warmup",
        "0",
    ]


@pytest.mark.parametrize(
    "out",
    [
        "",
        "garbage\n",
        '{"scheduled": 1,',
        "[1, 2]",
        '{"scheduled": 1}',
        '{"scheduled":1,"sent":1,"completed":1,"dropped":0,"errors":0,"non2xx":0,'
        '"duration_s":1,"rps":1,"p50_ms":"x","p90_ms":1,"p99_ms":1,"p999_ms":1,'
        '"max_ms":1,"mean_ms":1}',
    ],
)
def test_parse_rejects_garbage(out: str) -> None:
    with pytest.raises(MeshaccelError, match="openloop"):
        openloop.parse(out)


def test_parse_takes_the_json_line() -> None:
    line = '{"scheduled":2,' + ",".join(f'"{k}":0' for k in openloop.KEYS[1:]) + "}"
    assert openloop.parse(f"warning: something\n{line}\n")["scheduled"] == 2
