"""The lab's workloads: tiny asyncio HTTP/1.1 apps (keep-alive, no framework) and a client.

    python -m meshaccel.lab.apps serve --name reviews --port 9080 --calls http://IP:9080/
    python -m meshaccel.lab.apps get http://IP:9080/ [URL ...]

`serve` answers every GET with a small JSON body {"service", "path", "calls": [...]}, after
calling each --calls URL (concurrently, over pooled keep-alive connections) and nesting
their answers; with --size N the body is N bytes of filler instead (the echo pod). A
failed call is reported in the body and turns the answer into a 502. `get` fetches each
URL on its own connection and prints one JSON line: [{"url", "status", "body"} or
{"url", "error"}]. Both are cheap: one process, one uvloop event loop (libuv: less CPU
per request than asyncio's own loop), no threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

import uvloop

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
T = TypeVar("T")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response: (status, body); Content-Length or chunked bodies."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, body
            body += chunk[:-2]
    return status, await reader.readexactly(int(headers.get("content-length", "0")))


class Pool:
    """Idle keep-alive connections per (host, port)."""

    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[Conn]] = {}

    async def get(self, url: str) -> tuple[int, bytes]:
        parts = urlsplit(url)
        key = (parts.hostname or "", parts.port or 80)
        path = parts.path or "/"
        for attempt in range(2):  # a pooled connection may have been closed by the peer
            idle = self.idle.setdefault(key, [])
            conn = idle.pop() if idle else await asyncio.open_connection(*key)
            reader, writer = conn
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {key[0]}\r\n\r\n".encode())
                await writer.drain()
                status, body = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                writer.close()
                if attempt:
                    raise
                continue
            idle.append(conn)
            return status, body
        raise AssertionError("unreachable")


class App:
    def __init__(self, name: str, calls: list[str], size: int) -> None:
        self.name, self.calls, self.size = name, calls, size
        self.pool = Pool()

    async def call(self, url: str) -> dict:
        try:
            status, body = await self.pool.get(url)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            return {"url": url, "error": f"{type(e).__name__}: {e}"}
        try:
            return {"url": url, "status": status, **json.loads(body)}
        except ValueError:
            return {"url": url, "status": status, "bytes": len(body)}

    async def answer(self, path: str) -> tuple[int, bytes]:
        if self.size:
            return 200, b"x" * self.size
        called = await asyncio.gather(*(self.call(u) for u in self.calls))
        ok = all(c.get("status") == 200 for c in called)
        body = {"service": self.name, "path": path, "calls": called}
        return (200 if ok else 502), json.dumps(body, separators=(",", ":")).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request = head.decode("latin-1").split("\r\n")
                path = request[0].split()[1]
                length = 0
                for line in request[1:]:
                    key, _, value = line.partition(":")
                    if key.strip().lower() == "content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                status, body = await self.answer(path)
                kind = "text/plain" if self.size else "application/json"
                writer.write(
                    f"HTTP/1.1 {status} {'OK' if status == 200 else 'Bad Gateway'}\r\n"
                    f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError):
            pass
        finally:
            writer.close()


async def serve(name: str, port: int, calls: list[str], size: int) -> None:
    app = App(name, calls, size)
    server = await asyncio.start_server(app.handle, "0.0.0.0", port, backlog=1024)
    print(json.dumps({"ready": True, "service": name, "port": port}), flush=True)
    async with server:
        await server.serve_forever()


async def get_all(urls: list[str], timeout: float) -> list[dict]:
    out = []
    for url in urls:
        try:
            status, body = await asyncio.wait_for(Pool().get(url), timeout)
            out.append({"url": url, "status": status, "body": body.decode(errors="replace")})
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as e:
            out.append({"url": url, "error": f"{type(e).__name__}: {e}"})
    return out


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run coro on a uvloop event loop (uvloop.run needs uvloop >= 0.18; Debian 12 has 0.17)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m meshaccel.lab.apps")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run one app")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=9080)
    s.add_argument("--calls", nargs="*", default=[], help="URLs to call for every request")
    s.add_argument("--size", type=int, default=0, help="answer N filler bytes (echo)")
    g = sub.add_parser("get", help="GET each URL once, print JSON")
    g.add_argument("urls", nargs="+")
    g.add_argument("--timeout", type=float, default=10)
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            run(serve(args.name, args.port, args.calls, args.size))
        except KeyboardInterrupt:
            pass
    else:
        print(json.dumps(run(get_all(args.urls, args.timeout))), flush=True)


if __name__ == "__main__":
    sys.exit(main())
