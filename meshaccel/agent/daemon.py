"""The node agent (`meshaccel run`): attach or adopt the datapath, keep the pod registry in
step with a pod source, serve metrics and health, stop cleanly on SIGTERM/SIGINT.

The datapath outlives the agent: on start, loader.attach adopts a datapath already pinned
at --bpffs if this release built it (it only updates the settings: live connections are not
touched) and replaces it in place if another release or source did (meshaccel.datapath.upgrade); on
exit the agent leaves it attached unless told to detach, so traffic keeps flowing while
the agent restarts or is upgraded. The pods it registered stay registered; the first sync of
the next agent adds, updates and removes entries to match the pods of that moment.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

from meshaccel.agent import file_source, reconciler
from meshaccel.agent.address_watch import AddressWatch
from meshaccel.agent.file_source import FileSource
from meshaccel.agent.metrics import Metrics, MetricsServer
from meshaccel.agent.reconciler import PodSource, PodSpec, Reconciler, SyncResult
from meshaccel.datapath import loader
from meshaccel.datapath.capture import ISTIO_INJECTION_DEFAULT_ARGS
from meshaccel.datapath.host import default_cgroup
from meshaccel.datapath.pins import Pins, read_state
from meshaccel.errors import MeshaccelError, one_line

log = logging.getLogger("meshaccel.agent.daemon")

# Node-local by default: the agent is privileged and its endpoints are unauthenticated, so
# they are not offered to the network unless asked for (--metrics-address 0.0.0.0:15080 or
# the node IP, for a Prometheus outside the node). With hostNetwork the kubelet reaches
# 127.0.0.1 (probes with host: 127.0.0.1). 15080 is free in Istio's 150xx port range.
DEFAULT_METRICS_ADDRESS = "127.0.0.1:15080"
RESYNC_SECONDS = 30.0  # re-apply the last pod list: repairs entries changed behind our back
# read every pod's netns for addresses put on it since (a pod's netns is read at once when
# it changes; this is for one that could not be watched, or changed during its pod add)
ADDRESS_CHECK_SECONDS = 300.0
RETRY_SECONDS = 2.0  # first retry after a sync that failed (for some pods: netns not there
# yet, say); doubled while it keeps failing, up to RESYNC_SECONDS
SOURCES = ("kubernetes", "file")


def parse_address(text: str, option: str = "--metrics-address") -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT or ADDR:PORT) -> (host, port), or a one-line error."""
    host, sep, port = text.rpartition(":")
    shown = one_line(text)
    bad = f"{option} {shown}: expected HOST:PORT, e.g. {DEFAULT_METRICS_ADDRESS} or [::1]:15080"
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise MeshaccelError(bad)
    if host.startswith("["):
        if not host.endswith("]"):
            raise MeshaccelError(bad)
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise MeshaccelError(f"{option} {shown}: {host} is not an IPv6 address") from None
    elif ":" in host:
        # unbracketed IPv6 (as $(HOST_IP):15080 gives on an IPv6 node): the last colon
        # separates the port
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise MeshaccelError(bad) from None
    if not 1 <= int(port) <= 65535:
        raise MeshaccelError(f"{option} {shown}: port must be from 1 to 65535")
    return host, int(port)


def make_source(source_kind: str, pods_file: str | None, node_name: str | None) -> PodSource:
    """The pod source for --source, after checking the options it needs."""
    if source_kind == "file":
        if not pods_file:
            raise MeshaccelError("--source file needs --pods-file PATH")
        return FileSource(pods_file)
    if source_kind == "kubernetes":
        if not node_name:
            raise MeshaccelError(
                "--source kubernetes needs --node-name NAME (or NODE_NAME from the downward API)"
            )
        try:
            from meshaccel.agent.kubernetes_source import KubernetesSource, default_api
        except ImportError as e:
            raise MeshaccelError(f"--source kubernetes is not available here: {e}") from e
        # credentials are loaded now, so that without them nothing gets attached
        return KubernetesSource(node_name, api=default_api())
    raise MeshaccelError(f"--source {source_kind}: expected one of {', '.join(SOURCES)}")


class _SourceErrors(logging.Handler):
    """Counts the ERROR lines of the reconciler's and the pods file source's loggers (that
    source reports its errors only as log lines) and keeps the last one for /readyz."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(logging.ERROR)
        self.metrics = metrics
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.metrics.error("source")
        self.last = record.getMessage()


class Agent:
    """One run of the agent; run() blocks until stop is set (by a signal, or a source that
    gave up)."""

    def __init__(
        self,
        source_kind: str,
        source: PodSource,
        bpffs: str,
        cgroup: str | None,
        istio_args: str,
        shortcut: bool,
        detach_on_exit: bool,
        metrics_address: tuple[str, int],
        selftest: bool = True,
        app_shortcut: bool = False,
    ) -> None:
        self.source_kind = source_kind
        self.source = source
        self.bpffs = bpffs
        self.cgroup = cgroup
        self.istio_args = istio_args
        self.shortcut = shortcut
        self.app_shortcut = app_shortcut
        self.selftest = selftest
        self.detach_on_exit = detach_on_exit
        self.metrics_address = metrics_address
        self.stop = threading.Event()
        self.metrics = Metrics(lambda: loader.status(bpffs), source)
        self.reconciler = Reconciler(bpffs)
        self.attached = False
        self.synced = False
        self._source_errors = _SourceErrors(self.metrics)
        self._sync_lock = threading.Lock()
        self._desired: list[PodSpec] | None = None
        self._next_sync = float("inf")
        self._next_address_check = time.monotonic() + ADDRESS_CHECK_SECONDS
        self.addresses = AddressWatch()
        self._recheck: set[str] = set()  # netns of pods the last syncs registered
        self._recheck_lock = threading.Lock()
        self._retry_delay = RETRY_SECONDS
        self._failure: str | None = None  # why the source gave up
        self._datapath_whole = True  # as last seen by _watch_datapath

    # ------------------------------------------------------------ readiness

    def readiness(self) -> tuple[bool, str]:
        if not self.attached:
            return False, "attaching the datapath"
        state = read_state(self.bpffs)
        if not state.complete:
            missing = state.missing or [n for n, ok in state.attached.items() if not ok]
            return False, f"datapath at {self.bpffs} is not attached ({', '.join(missing)})"
        if not self.synced:
            why = f" (last error: {self._source_errors.last})" if self._source_errors.last else ""
            return False, f"waiting for the first pod list from the {self.source_kind} source{why}"
        return True, "ready: datapath attached, pods synced"

    # ------------------------------------------------------------ syncing

    def on_desired(self, desired: list[PodSpec]) -> None:
        """The source's callback: apply its full list of pods."""
        with self._sync_lock:
            self._desired = list(desired)
            self._sync()

    def _resync_if_due(self) -> None:
        with self._sync_lock:
            if self._desired is not None and time.monotonic() >= self._next_sync:
                self._sync()

    def _sync(self) -> None:
        assert self._desired is not None
        start = time.monotonic()
        try:
            result = self.reconciler.sync(self._desired)
        except Exception as e:  # noqa: BLE001 - one line, count it, retry; keep running
            self.metrics.error("sync")
            delay = self._retry_later()
            log.error("sync failed (retrying in %.0fs): %s: %s", delay, type(e).__name__, e)
            return
        seconds = time.monotonic() - start
        registered = {*result.added, *result.updated}
        with self._recheck_lock:
            self._recheck |= {s.netns for s in self._desired if s.name in registered}
        tracked = len(self._desired) - len(result.failed)
        self.metrics.observe_sync(result, seconds, tracked)
        summary = f"{tracked} pods tracked ({_changes(result)}) in {seconds * 1000:.1f} ms"
        if result.failed:  # (the reconciler logged why, one line per pod)
            summary += f"; retrying in {self._retry_later():.0f}s"
        else:
            self._retry_delay = RETRY_SECONDS
            self._next_sync = time.monotonic() + RESYNC_SECONDS
        if not self.synced:
            self.synced = True
            log.info("first sync: %s; ready", summary)
        elif result.added or result.updated or result.removed or result.failed:
            log.info("sync: %s", summary)

    def _check_addresses_if_due(self) -> None:
        """Pods whose netns holds other addresses or local routes than registered for
        them (put on or taken off since) are registered again: those whose netns changed
        (AddressWatch), whose watch just began or whose registration the last sync
        wrote, and every ADDRESS_CHECK_SECONDS all of them."""
        with self._recheck_lock:
            recheck, self._recheck = self._recheck, set()
        desired = self._desired
        if desired is None:
            return
        changed = self.addresses.follow(s.netns for s in desired) | recheck
        changed |= self.addresses.changed()
        if time.monotonic() >= self._next_address_check:
            self._next_address_check = time.monotonic() + ADDRESS_CHECK_SECONDS
        else:
            desired = [s for s in desired if s.netns in changed]
        if not desired:
            return
        try:
            result = self.reconciler.register_new_addresses(desired)
        except Exception as e:  # noqa: BLE001 - one line, count it, try again later
            self.metrics.error("sync")
            log.error("address check failed: %s: %s", type(e).__name__, e)
            return
        self.metrics.count_pods(result)
        if result.updated:
            log.info("addresses changed: %s registered again", ", ".join(result.updated))

    def _retry_later(self) -> float:
        """Schedule a retry of the last pod list; back off while it keeps failing."""
        delay = self._retry_delay
        self._retry_delay = min(delay * 2, RESYNC_SECONDS)
        self._next_sync = time.monotonic() + delay
        return delay

    def _watch_datapath(self) -> None:
        """Pins removed or the bpffs unmounted behind the agent: say so in one line when it
        happens (and when it is whole again); /readyz says it on every probe."""
        try:
            state = read_state(self.bpffs)
            whole, missing = state.complete, state.missing
            missing = missing or [n for n, ok in state.attached.items() if not ok]
        except OSError as e:  # (a pin vanishing while it is read)
            whole, missing = False, [str(e)]
        if whole == self._datapath_whole:
            return
        self._datapath_whole = whole
        if whole:
            log.info("datapath at %s is complete again", self.bpffs)
            return
        more = f", +{len(missing) - 4} more" if len(missing) > 4 else ""
        log.error(
            "datapath at %s lost (%s missing): the programs still attached to the cgroup "
            "keep capturing; the pods' sk_lookup links (inbound capture) went with their "
            "pins; not ready until it is attached again (a restart of the agent does it)",
            self.bpffs,
            ", ".join(missing[:4]) + more,
        )

    def _run_source(self) -> None:
        try:
            self.source.run(self.on_desired, self.stop)
        except Exception as e:  # noqa: BLE001 - the source gave up: so does the agent
            self.metrics.error("source")
            self._failure = f"the {self.source_kind} source stopped: {e}"
            self.stop.set()

    # ------------------------------------------------------------ lifecycle

    def run(self) -> None:
        host, port = self.metrics_address
        try:
            server = MetricsServer(self.metrics_address, self.metrics, self.readiness)
        except OSError as e:
            raise MeshaccelError(f"--metrics-address {host}:{port}: cannot listen ({e})") from e
        server.start()
        log.info("serving /metrics, /healthz, /readyz on %s:%d", host, port)
        source_logs = [logging.getLogger(m.__name__) for m in (reconciler, file_source)]
        for source_log in source_logs:
            source_log.addHandler(self._source_errors)
        try:
            log.info("%s", self._attach())
            self.attached = True
            source = threading.Thread(target=self._run_source, name="pod-source", daemon=True)
            source.start()
            log.info("watching pods (%s source)", self.source_kind)
            while not self.stop.wait(0.5):
                self._resync_if_due()
                self._watch_datapath()
                self._check_addresses_if_due()
            source.join(10)
            if source.is_alive():
                log.warning("the pod source did not stop within 10s; exiting anyway")
        finally:
            server.stop()
            self.addresses.close()
            for source_log in source_logs:
                source_log.removeHandler(self._source_errors)
            self._exit()
        if self._failure:
            raise MeshaccelError(self._failure)

    def _attach(self) -> str:
        """loader.attach; a fresh datapath is compiled and attached by a child process (the
        `meshaccel attach` command): bcc's LLVM stays resident in whichever process compiled
        (~120 MiB), and the agent runs for long. So is replacing a datapath of another
        release or source (an upgrade or downgrade). Adopting one built from this release's
        source needs no compiling: done here."""
        if read_state(self.bpffs).complete and loader.datapath_matches(self.bpffs):
            return loader.attach(
                self.cgroup, self.bpffs, self.istio_args, log=log.info, shortcut=self.shortcut,
                app_shortcut=self.app_shortcut,
            )  # fmt: skip
        self._detach_orphans()
        argv = [sys.executable, "-c", "from meshaccel.cli import main; main()", "attach"]
        argv += ["--bpffs", self.bpffs, "--istio-iptables-args", self.istio_args]
        argv += ["--shortcut" if self.shortcut else "--no-shortcut"]
        argv += ["--app-shortcut" if self.app_shortcut else "--no-app-shortcut"]
        argv += ["--selftest" if self.selftest else "--no-selftest"]
        argv += ["--cgroup", self.cgroup] if self.cgroup else []
        # (only what run was given: no MESHACCEL_ATTACH_* settings from the environment)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHACCEL_ATTACH_")}
        child = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        assert child.stderr is not None and child.stdout is not None
        error = None
        for line in child.stderr:  # progress lines, as they come; then maybe the error
            line = line.rstrip().removeprefix("meshaccel: ")
            if line.startswith("error: "):
                error = line.removeprefix("error: ")
            elif line.startswith("warning: "):
                log.warning("%s", line.removeprefix("warning: "))
            elif line:
                log.info("%s", line)
        summary = child.stdout.read().strip()
        if child.wait() != 0:
            raise MeshaccelError(error or f"meshaccel attach exited {child.returncode}")
        return summary

    def _detach_orphans(self) -> None:
        """No pins at --bpffs, yet meshaccel programs on the cgroup: a datapath whose pins
        were removed or whose bpffs was unmounted. Attaching beside it would leave it in
        front, capturing with maps nobody can reach (and surviving detach): detach it."""
        if Pins(self.bpffs).present():
            return
        cgroup = self.cgroup or default_cgroup()
        found: list[str] = []
        loader.detach(cgroup, self.bpffs, log=found.append)  # (by name: no pins)
        if found:
            log.warning(
                "a datapath without pins at %s was attached to %s (its pins removed or its "
                "bpffs unmounted): %s",
                self.bpffs,
                cgroup,
                ", ".join(found),
            )

    def _exit(self) -> None:
        if not self.attached:
            return
        if self.detach_on_exit:
            log.info("%s", loader.detach(bpffs=self.bpffs, log=log.info))
        else:
            log.info(
                "stopped; the datapath stays attached and the pods registered "
                "(meshaccel detach --bpffs %s removes it)",
                self.bpffs,
            )


def _changes(result: SyncResult) -> str:
    parts = []
    for what in ("added", "updated", "removed", "failed"):
        names = list(getattr(result, what))
        shown = ", ".join(names[:5]) + (f", +{len(names) - 5} more" if len(names) > 5 else "")
        parts.append(f"{len(names)} {what}" + (f": {shown}" if names else ""))
    return "; ".join(parts)


def run(
    source_kind: str,
    pods_file: str | None = None,
    node_name: str | None = None,
    metrics_address: str = DEFAULT_METRICS_ADDRESS,
    bpffs: str = loader.DEFAULT_BPFFS,
    cgroup: str | None = None,
    istio_args: str = ISTIO_INJECTION_DEFAULT_ARGS,
    shortcut: bool = True,
    detach_on_exit: bool = False,
    selftest: bool = True,
    app_shortcut: bool = False,
) -> None:
    """Run the agent until SIGTERM or SIGINT. Bad options are MeshaccelErrors raised before
    anything is attached."""
    address = parse_address(metrics_address)
    source = make_source(source_kind, pods_file, node_name)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s meshaccel %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    agent = Agent(
        source_kind, source, bpffs, cgroup, istio_args, shortcut, detach_on_exit, address,
        selftest=selftest, app_shortcut=app_shortcut,
    )  # fmt: skip

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        agent.stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
