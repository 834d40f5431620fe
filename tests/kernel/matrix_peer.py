"""Many connections per process, for the parity matrix (tests/kernel/test_parity.py).

    matrix_peer.py listen NAME LOGFD ADDR:PORT [ADDR:PORT ...]
    matrix_peer.py connect < [{"tag": ..., "dst": ..., "port": ..., "bind": ...}, ...]

listen binds every ADDR:PORT ("0.0.0.0:9080", "[::]:9080"; IPv6 ones IPV6_V6ONLY, so a
v4 and a v6 socket can share a port, as Envoy's do), prints {"ready": true} on stdout,
then for every accepted connection reads the client's tag (one line), writes one JSON
line (tag, listener name, listening port, local and peer address, SO_ORIGINAL_DST) to the
inherited file descriptor LOGFD and sends it back to the client. It exits when its stdin
closes.

connect makes the connections given as a JSON list on stdin one after another (connect
and reply timeouts of TIMEOUT seconds), optionally binding a source address first, and
prints one JSON line per connection: the tag, "ok" with the listener's record, or the
error (refused, unreachable, timeout, ...).
"""

from __future__ import annotations

import json
import select
import socket
import sys
from typing import Any

import peer  # tests/kernel/peer.py, beside this file (run as a script from here)

# No case is expected to time out (a refused or captured connection answers in ms): this
# only bounds a wrong one. 1 s was too short in an emulated VM on a busy host (a correct
# case timed out on 6.1 under TCG).
TIMEOUT = 10.0


def hostport(sockaddr: tuple) -> str:
    host = sockaddr[0]
    return f"[{host}]:{sockaddr[1]}" if ":" in host else f"{host}:{sockaddr[1]}"


def original_dst(conn: socket.socket) -> str | None:
    """SO_ORIGINAL_DST as `ip:port` / `[ip6]:port`, or None when the kernel has none."""
    found = peer.original_dst(conn)
    return None if found is None or found.startswith("error:") else found


def read_line(s: socket.socket, limit: int = 4096) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = s.recv(limit)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def listen(name: str, log_fd: int, specs: list[str]) -> None:
    socks: dict[int, socket.socket] = {}
    for spec in specs:
        host, port = spec.rsplit(":", 1)
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, int(port)))
        s.listen(128)
        socks[s.fileno()] = s
    print(json.dumps({"ready": True}), flush=True)
    stdin = sys.stdin.fileno()
    with open(log_fd, "a") as log:
        while True:
            ready, _, _ = select.select([stdin, *socks], [], [])
            if stdin in ready and not sys.stdin.buffer.read1(4096):
                return  # stdin closed: the test is done with us
            for fd in ready:
                if fd == stdin:
                    continue
                conn, _ = socks[fd].accept()
                with conn:
                    conn.settimeout(TIMEOUT)
                    rec: dict[str, Any] = {
                        "name": name,
                        "port": socks[fd].getsockname()[1],
                        "local": hostport(conn.getsockname()),
                        "peer": hostport(conn.getpeername()),
                        "orig_dst": original_dst(conn),
                    }
                    try:
                        rec["tag"] = read_line(conn).decode(errors="replace")
                    except OSError as e:
                        rec["tag"], rec["error"] = None, f"{type(e).__name__}: {e}"
                    line = json.dumps(rec)
                    log.write(line + "\n")
                    log.flush()
                    try:
                        conn.sendall(line.encode() + b"\n")
                    except OSError:
                        pass  # the client gave up; the log has the record


def connect_one(case: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"tag": case["tag"]}
    dst = case["dst"]
    s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(TIMEOUT)
        if case.get("bind"):
            s.bind((case["bind"], 0))
        s.connect((dst, case["port"]))
        out["local"] = hostport(s.getsockname())
        s.sendall(case["tag"].encode() + b"\n")
        line = read_line(s)
        out["ok"] = json.loads(line) if line else None
        if not line:
            out["error"] = "connected, but no listener record came back"
    except ConnectionRefusedError:
        out["error"] = "refused"
    except TimeoutError:
        out["error"] = "timeout"
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e.strerror or e}"
    finally:
        s.close()
    return out


def main() -> None:
    if sys.argv[1:2] == ["listen"] and len(sys.argv) >= 5:
        listen(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    elif sys.argv[1:] == ["connect"]:
        for case in json.load(sys.stdin):
            print(json.dumps(connect_one(case)), flush=True)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
