"""The open-loop HTTP load generator of `meshaccel bench`: a small C program, built on demand.

Closed-loop tools (wrk, ab) send the next request on a connection only when the previous one
has been answered, so a slow server slows the load down and its slowness mostly disappears
from the latencies (coordinated omission). An open-loop generator sends at a fixed arrival
rate whatever the server does: request i is due at t0 + i/rate and its latency is measured
from that scheduled time, so queueing delay is included. This is the latency real clients of
a mesh see at a given load, and the numbers stay comparable between modes.

Semantics follow k6's constant-arrival-rate executor: requests go over `connections`
keep-alive HTTP/1.1 connections, one request in flight per connection; a request that comes
due while no connection is idle is *dropped* (counted, not sent), like k6's
dropped_iterations. Requests without an answer within `timeout` are errors. See openloop.c.

It is C (single-threaded, epoll, timerfd) because it runs on the same two cores as the system
under test and must resolve latency differences of tens of microseconds; k6 is AGPL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from meshaccel.errors import MeshaccelError

SOURCE = Path(__file__).with_name("openloop.c")
CFLAGS = ("-O2", "-Wall")
# every key of the JSON object openloop prints
KEYS = (
    "scheduled",
    "sent",
    "completed",
    "dropped",
    "errors",
    "non2xx",
    "duration_s",
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "max_ms",
    "mean_ms",
)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/meshaccel, or ~/.cache/meshaccel."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "meshaccel"


def binary(cache_dir: Path | None = None) -> str:
    """Path of the compiled generator, compiling it first if this source has not been.

    The file name holds a hash of the source and flags, so an edited source is rebuilt; the
    build goes to a temporary name and is renamed into place, so concurrent callers and
    interrupted builds never leave a half-written binary behind.
    """
    try:
        src = SOURCE.read_bytes()
    except OSError as e:
        raise MeshaccelError(f"openloop: cannot read its source {SOURCE}: {e}") from e
    digest = hashlib.sha256(src + " ".join(CFLAGS).encode()).hexdigest()[:12]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"openloop-{digest}"
    if os.access(target, os.X_OK):
        return str(target)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise MeshaccelError("openloop: no C compiler (apt-get install gcc; scripts/setup.sh)")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".openloop-build-", dir=cache))
    except OSError as e:
        raise MeshaccelError(f"openloop: cannot build into {cache}: {e.strerror}") from None
    try:
        out = tmp / "openloop"
        try:
            p = subprocess.run(
                [cc, *CFLAGS, "-o", str(out), str(SOURCE), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise MeshaccelError(f"openloop: running {cc} failed: {e}") from e
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip()[-1500:]
            raise MeshaccelError(f"openloop: {cc} failed to compile {SOURCE}:\n{tail}")
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def argv(
    url: str,
    rate: int,
    duration: float,
    connections: int,
    timeout: float = 5,
    warmup: float = 0,
    cache_dir: Path | None = None,
) -> list[str]:
    """The command line that sends `rate` requests/s to `url` for `duration` seconds over
    `connections` connections (after `warmup` seconds at the same rate, not counted)."""
    return [
        binary(cache_dir),
        "--url",
        url,
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--connections",
        str(connections),
        "--timeout",
        str(timeout),
        "--warmup",
        str(warmup),
    ]


def parse(out: str) -> dict[str, Any]:
    """The result object from openloop's stdout (its last line that is a JSON object):
    scheduled, sent, completed, dropped, errors, non2xx (counts), duration_s, rps, and
    p50/p90/p99/p999/max/mean latency in ms over completed requests."""
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith("{")]
    if not lines:
        raise MeshaccelError(f"openloop: no JSON result in its output: {out.strip()[-300:]!r}")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise MeshaccelError(f"openloop: malformed JSON result ({e}): {lines[-1][:300]!r}") from e
    if not isinstance(result, dict):
        raise MeshaccelError(f"openloop: result is not a JSON object: {lines[-1][:300]!r}")
    missing = [k for k in KEYS if k not in result]
    if missing:
        raise MeshaccelError(f"openloop: result lacks {', '.join(missing)}: {lines[-1][:300]!r}")
    bad = [k for k in KEYS if isinstance(result[k], bool) or not isinstance(result[k], int | float)]
    if bad:
        raise MeshaccelError(f"openloop: result has non-numbers for {', '.join(bad)}")
    return result
