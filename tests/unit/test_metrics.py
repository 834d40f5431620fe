"""Metrics exposition and the health endpoint, with a fake datapath (no root needed)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshaccel.agent import daemon
from meshaccel.agent.metrics import Metrics, MetricsServer, counter_metric
from meshaccel.agent.reconciler import SyncResult
from meshaccel.cli import cli
from meshaccel.datapath.structs import COUNTERS
from meshaccel.errors import MeshaccelError
from meshaccel.lab.http_probe import get


def fake_status(attached: bool = True) -> dict:
    """Shaped like loader.status(bpffs)."""
    return {
        "bpffs": "/sys/fs/bpf/x",
        "attached": attached,
        "programs": [
            {"name": "sockops", "hook": "cgroup", "id": 7, "attached": True},
            {"name": "connect4", "hook": "cgroup", "id": 8, "attached": attached},
        ],
        "maps": {
            "pod_config": {"entries": 4, "capacity": 4096},
            "counters": {"entries": None, "capacity": 21},
            "sock_hash": {"entries": 0, "capacity": 65536},
        },
        "counters": {name: 10 * i for i, name in enumerate(COUNTERS)},
    }


def scrape(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    """Every sample by (name, sorted labels)."""
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def families(metrics: Metrics) -> dict[str, str]:
    text = metrics.exposition().decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_every_datapath_counter_is_a_counter_named_as_in_status():
    m = Metrics(fake_status)
    samples, types = scrape(m), families(m)
    for i, name in enumerate(COUNTERS):
        assert types[counter_metric(name)] == "counter"
        assert samples[(f"meshaccel_datapath_{name}_total", ())] == 10 * i
    redirected = samples[("meshaccel_datapath_msg_redirected_bytes_total", ())]
    assert redirected == 10 * COUNTERS.index("msg_redirected_bytes")
    assert samples[("meshaccel_datapath_attached", ())] == 1
    assert samples[("meshaccel_datapath_program_attached", (("program", "connect4"),))] == 1


def test_maps_occupancy_and_capacity():
    samples = scrape(Metrics(fake_status))
    assert samples[("meshaccel_map_entries", (("map", "pod_config"),))] == 4
    assert samples[("meshaccel_map_capacity", (("map", "pod_config"),))] == 4096
    assert samples[("meshaccel_map_capacity", (("map", "counters"),))] == 21
    assert ("meshaccel_map_entries", (("map", "counters"),)) not in samples  # an array
    assert samples[("meshaccel_map_entries", (("map", "sock_hash"),))] == 0


def test_not_attached_and_unreadable_datapath():
    samples = scrape(Metrics(lambda: fake_status(attached=False)))
    assert samples[("meshaccel_datapath_attached", ())] == 0
    assert samples[("meshaccel_datapath_program_attached", (("program", "connect4"),))] == 0

    def broken() -> dict:
        raise OSError(2, "No such file or directory")

    m = Metrics(broken)
    for _ in range(2):
        samples = scrape(m)  # the scrape itself still works
    assert samples[("meshaccel_datapath_attached", ())] == 0
    assert samples[("meshaccel_errors_total", (("kind", "datapath_read"),))] == 2
    assert samples[("meshaccel_pods_tracked", ())] == 0


def test_reconcile_metrics():
    m = Metrics(fake_status)
    samples = scrape(m)
    for result in ("added", "updated", "removed", "failed"):  # present before any sync
        assert samples[("meshaccel_reconcile_pods_total", (("result", result),))] == 0
    for kind in ("datapath_read", "sync", "pod_register", "source"):
        assert samples[("meshaccel_errors_total", (("kind", kind),))] == 0
    m.observe_sync(SyncResult(added=["a", "b"]), 0.003, tracked=2)
    m.observe_sync(SyncResult(removed=["b"], failed={"c": "netns gone"}), 0.2, tracked=1)
    samples = scrape(m)
    assert samples[("meshaccel_pods_tracked", ())] == 1
    assert samples[("meshaccel_reconcile_pods_total", (("result", "added"),))] == 2
    assert samples[("meshaccel_reconcile_pods_total", (("result", "removed"),))] == 1
    assert samples[("meshaccel_reconcile_pods_total", (("result", "failed"),))] == 1
    assert samples[("meshaccel_reconcile_duration_seconds_count", ())] == 2
    assert samples[("meshaccel_reconcile_duration_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("meshaccel_reconcile_duration_seconds_sum", ())] == pytest.approx(0.203)
    assert samples[("meshaccel_errors_total", (("kind", "pod_register"),))] == 1


class FakeWatchSource:
    def __init__(self) -> None:
        self.watch_restarts = 3
        self.relists = 1
        self.errors = {"watch": 2, "expired": 1}


def test_source_counters_and_errors_by_kind():
    source = FakeWatchSource()
    m = Metrics(fake_status, source)
    m.error("sync")
    samples = scrape(m)
    assert samples[("meshaccel_source_watch_restarts_total", ())] == 3
    assert samples[("meshaccel_source_relists_total", ())] == 1
    assert samples[("meshaccel_errors_total", (("kind", "watch"),))] == 2
    assert samples[("meshaccel_errors_total", (("kind", "expired"),))] == 1
    assert samples[("meshaccel_errors_total", (("kind", "sync"),))] == 1
    source.watch_restarts += 1
    assert scrape(m)[("meshaccel_source_watch_restarts_total", ())] == 4  # read on each scrape

    plain = scrape(Metrics(fake_status, object()))  # a source without watch counters
    assert not any(name.startswith("meshaccel_source_") for name, _ in plain)


def test_http_endpoints():
    waiting = "waiting for the first pod list from the file source"
    state = {"ready": (False, waiting)}
    m = Metrics(fake_status)
    server = MetricsServer(("127.0.0.1", 0), m, lambda: state["ready"])
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz") == (503, f"{waiting}\n")
        state["ready"] = (True, "ready")
        assert get(f"{base}/readyz") == (200, "ready\n")
        code, text = get(f"{base}/metrics")
        assert code == 200
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"meshaccel_pods_tracked", "meshaccel_datapath_connect_captured"} <= names
        assert get(f"{base}/nope")[0] == 404
    finally:
        server.stop()


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:15080", ("127.0.0.1", 15080)),
        ("0.0.0.0:9", ("0.0.0.0", 9)),
        ("[::1]:15080", ("::1", 15080)),
        ("fd00::5:15080", ("fd00::5", 15080)),  # $(HOST_IP):15080 on an IPv6 node
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_metrics_address(text, expected):
    assert daemon.parse_address(text) == expected


@pytest.mark.parametrize(
    "text,message",
    [
        ("foo", "--metrics-address foo: expected HOST:PORT"),
        (":15080", "--metrics-address :15080: expected HOST:PORT"),
        ("127.0.0.1:", "--metrics-address 127.0.0.1:: expected HOST:PORT"),
        ("127.0.0.1:http", "--metrics-address 127.0.0.1:http: expected HOST:PORT"),
        ("127.0.0.1:70000", "--metrics-address 127.0.0.1:70000: port must be from 1 to 65535"),
        ("zz:zz:15080", "--metrics-address zz:zz:15080: expected HOST:PORT"),
        ("[zz]:1", "--metrics-address [zz]:1: zz is not an IPv6 address"),
    ],
)
def test_bad_metrics_address_is_a_one_line_error(text, message):
    with pytest.raises(MeshaccelError) as e:
        daemon.parse_address(text)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_run_needs_the_options_of_its_source():
    with pytest.raises(MeshaccelError, match="--source file needs --pods-file"):
        daemon.make_source("file", None, None)
    with pytest.raises(MeshaccelError, match="--source kubernetes needs --node-name"):
        daemon.make_source("kubernetes", "pods.yaml", "")


def test_cli_default_metrics_address_is_the_daemons():
    run = cli.commands["run"]
    [opt] = [p for p in run.params if p.name == "metrics_address"]
    assert opt.default == daemon.DEFAULT_METRICS_ADDRESS
