"""The Kubernetes pod source: which pods are meshed, where their netns is, and list+watch
against an in-process API double (meshaccel/lab/fake_apiserver.py). No root needed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from meshaccel.agent.kubernetes_source import (
    CachedNetnsOf,
    KubernetesSource,
    netns_from_proc,
    netns_of_pod,
    pod_spec,
)
from meshaccel.agent.reconciler import PodSpec
from meshaccel.datapath.capture import CaptureConfig, apply_annotations
from meshaccel.lab.fake_apiserver import FakeApiServer, make_pod

NODE = "node-a"
TIMEOUT = 5.0


def netns(pod: dict[str, Any]) -> str:
    """A fake netns_of: one path per pod, nothing real needed."""
    return f"/run/netns/{pod['metadata']['name']}"


def ann(spec: PodSpec | None) -> dict[str, str]:
    assert spec is not None
    return dict(spec.annotations)


# ---------------------------------------------------------------- pod_spec


def test_injected_running_pod():
    spec = pod_spec(make_pod("web", namespace="shop", ips=["10.244.1.5"]), netns)
    assert spec == PodSpec("shop/web", ("10.244.1.5",), "/run/netns/web", {})


@pytest.mark.parametrize(
    "pod",
    [
        make_pod("a", injected=False, annotations={"sidecar.istio.io/status": "{}"}),
        make_pod("a", status_annotation=False),  # an istio-proxy container
        make_pod("a", native_sidecar=True, status_annotation=False),  # init, restartPolicy Always
        make_pod("a", phase="Pending"),  # istio-init stage: the IP is there, capture it now
        make_pod(
            "a",
            labels={"sidecar.istio.io/inject": "true"},
            annotations={"sidecar.istio.io/inject": "false"},
        ),  # the label wins
    ],  # fmt: skip
    ids=["status-annotation", "proxy-container", "native-sidecar", "pending", "label-wins"],
)
def test_meshed(pod):
    assert pod_spec(pod, netns) is not None


@pytest.mark.parametrize(
    "pod",
    [
        make_pod("a", injected=False),
        make_pod("a", annotations={"sidecar.istio.io/inject": "false"}),
        make_pod("a", labels={"sidecar.istio.io/inject": "false"}),
        make_pod("a", labels={"sidecar.istio.io/inject": "False"}),
        make_pod("a", annotations={"sidecar.istio.io/interceptionMode": "NONE"}),
        make_pod("a", ips=()),
        make_pod("a", ips=(), phase="Pending"),
        make_pod("a", phase="Succeeded"),
        make_pod("a", phase="Failed"),
        make_pod("a", host_network=True),
    ],
    ids=[
        "not-injected",
        "opt-out-annotation",
        "opt-out-label",
        "opt-out-label-case",
        "interception-none",
        "no-ips",
        "pending-no-ips",
        "succeeded",
        "failed",
        "host-network",
    ],  # fmt: skip
)
def test_not_captured(pod):
    asked: list[str] = []

    def netns_of(p: dict[str, Any]) -> str:
        asked.append(p["metadata"]["name"])
        return "/proc/1/ns/net"

    assert pod_spec(pod, netns_of) is None
    assert asked == []  # the netns is only looked for when everything else says yes


def test_no_netns_yet_is_skipped():
    assert pod_spec(make_pod("a"), lambda p: None) is None


def test_dual_stack_one_address_per_family():
    pod = make_pod("a", ips=["10.244.1.5", "fd00:10:244::5"])
    assert pod_spec(pod, netns).ips == ("10.244.1.5", "fd00:10:244::5")  # type: ignore[union-attr]
    pod = make_pod("a", ips=["fd00::5", "10.244.1.5", "10.244.1.6", "fd00::6"])
    assert pod_spec(pod, netns).ips == ("fd00::5", "10.244.1.5")  # type: ignore[union-attr]


def test_pod_ip_without_pod_ips():
    pod = make_pod("a", ips=["10.244.1.5"])
    del pod["status"]["podIPs"]
    assert pod_spec(pod, netns).ips == ("10.244.1.5",)  # type: ignore[union-attr]


def test_only_capture_annotations_are_kept():
    capture = {
        "traffic.sidecar.istio.io/excludeInboundPorts": "15020,9090",
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8",
        "status.sidecar.istio.io/port": "15021",
        "sidecar.istio.io/interceptionMode": "REDIRECT",
    }
    other = {
        "sidecar.istio.io/status": "{}",
        "sidecar.istio.io/inject": "true",
        "proxy.istio.io/config": "{}",
        "prometheus.io/scrape": "true",
        "kubectl.kubernetes.io/restartedAt": "2024-01-01T00:00:00Z",
    }
    spec = pod_spec(make_pod("a", annotations={**capture, **other}), netns)
    assert ann(spec) == capture
    apply_annotations(CaptureConfig(), ann(spec))  # what capture.py knows how to read


def test_v1pod_model_reads_like_the_json():
    pod = make_pod("a", ips=["10.244.1.5", "fd00::5"], annotations={
        "traffic.sidecar.istio.io/excludeOutboundPorts": "5432"})  # fmt: skip
    model = client.ApiClient().deserialize(json.dumps(pod), "V1Pod", "application/json")
    assert isinstance(model, client.V1Pod)
    assert pod_spec(model, netns) == pod_spec(pod, netns)
    assert pod_spec(model, netns) is not None


# ---------------------------------------------------------------- netns from /proc

UID = "6d1f3a0e-2c4b-4b1e-9a57-0f0e5c1d2b3a"
CID = "a" * 64


def fake_proc(root: Path, pid: int, cgroup: str, start: int = 100, comm: str = "app") -> None:
    d = root / str(pid)
    (d / "ns").mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    fields = ["S", "1"] + ["0"] * 17 + [str(start)] + ["0"] * 30  # starttime is field 22
    (d / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")


def test_netns_systemd_driver(tmp_path):
    under = UID.replace("-", "_")
    fake_proc(tmp_path, 1, "0::/init.scope\n")
    fake_proc(tmp_path, 4242, f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-"
              f"pod{under}.slice/cri-containerd-{'b' * 64}.scope\n")  # fmt: skip
    assert netns_from_proc(UID, [], str(tmp_path)) == f"{tmp_path}/4242/ns/net"


def test_netns_cgroupfs_driver_v1(tmp_path):
    lines = [f"{i}:{c}:/kubepods/besteffort/pod{UID}/{'c' * 64}" for i, c in
             enumerate(["memory", "cpu,cpuacct", "pids"], start=2)]  # fmt: skip
    fake_proc(tmp_path, 77, "\n".join(lines) + "\n1:name=systemd:/\n")
    assert netns_from_proc(UID, [], str(tmp_path)) == f"{tmp_path}/77/ns/net"


def test_netns_by_container_id(tmp_path):
    fake_proc(tmp_path, 300, f"0::/system.slice/docker-{CID}.scope\n")
    assert netns_from_proc("", [CID], str(tmp_path)) == f"{tmp_path}/300/ns/net"
    assert netns_from_proc("some-other-uid", [CID], str(tmp_path)) == f"{tmp_path}/300/ns/net"


def test_netns_prefers_the_oldest_process_of_the_pod(tmp_path):
    path = f"0::/kubepods/pod{UID}/"
    fake_proc(tmp_path, 900, path + "app\n", start=5000)
    fake_proc(tmp_path, 950, path + "pause\n", start=1200, comm="pause) (x")  # odd comm
    fake_proc(tmp_path, 20, path + "envoy\n", start=3000)  # a lower, recycled pid
    assert netns_from_proc(UID, [], str(tmp_path)) == f"{tmp_path}/950/ns/net"


def test_netns_not_found(tmp_path):
    fake_proc(tmp_path, 1, "0::/init.scope\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "31337").mkdir()  # exited between listdir and open: no cgroup file
    (tmp_path / "sys").mkdir()
    assert netns_from_proc(UID, [CID], str(tmp_path)) is None
    assert netns_from_proc("", [], str(tmp_path)) is None
    assert netns_from_proc(UID, [], str(tmp_path / "missing")) is None


def test_netns_of_pod_uses_uid_and_container_ids(tmp_path):
    pod = make_pod("a", uid=UID)
    cid = pod["status"]["containerStatuses"][0]["containerID"].partition("://")[2]
    fake_proc(tmp_path, 555, f"0::/system.slice/cri-containerd-{cid}.scope\n")
    assert netns_of_pod(pod, str(tmp_path)) == f"{tmp_path}/555/ns/net"
    fake_proc(tmp_path, 444, f"0::/kubepods/pod{UID}/x\n", start=1)
    assert netns_of_pod(pod, str(tmp_path)) == f"{tmp_path}/444/ns/net"


def test_cached_netns_of_remembers_while_the_pid_is_the_pods(tmp_path):
    pod = make_pod("a", uid=UID)
    fake_proc(tmp_path, 700, f"0::/kubepods/pod{UID}/app\n", start=50)
    netns_of = CachedNetnsOf(str(tmp_path))
    assert netns_of(pod) == f"{tmp_path}/700/ns/net"
    fake_proc(tmp_path, 600, f"0::/kubepods/pod{UID}/pause\n", start=10)  # older: a scan
    assert netns_of(pod) == f"{tmp_path}/700/ns/net"  # would pick it; the memory holds
    (tmp_path / "700" / "cgroup").write_text("0::/kubepods/podother/x\n")  # pid reused
    assert netns_of(pod) == f"{tmp_path}/600/ns/net"


# ---------------------------------------------------------------- the source


class Collector:
    """on_desired: remembers every list it is given; waits for one that satisfies a test."""

    def __init__(self) -> None:
        self.calls: list[list[PodSpec]] = []
        self._cond = threading.Condition()

    def __call__(self, specs: list[PodSpec]) -> None:
        with self._cond:
            self.calls.append(list(specs))
            self._cond.notify_all()

    def wait(self, test: Callable[[list[PodSpec]], bool], timeout: float = TIMEOUT) -> int:
        """Waits until the latest list passes test; returns the number of calls so far."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self.calls) and test(self.calls[-1]), timeout):
                last = [p.name for p in self.calls[-1]] if self.calls else "no call"
                raise AssertionError(f"no convergence within {timeout}s; last list: {last}")
            return len(self.calls)

    def wait_names(self, *names: str) -> int:
        return self.wait(lambda specs: sorted(p.name for p in specs) == sorted(names))

    def latest(self, name: str) -> PodSpec:
        return next(p for p in self.calls[-1] if p.name == name)


class Running:
    """source.run(collector, stop) in a thread, stopped (promptly) at the end."""

    def __init__(self, source: KubernetesSource, collector: Collector | None = None) -> None:
        self.source = source
        self.collector = collector or Collector()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.source.run(self.collector, self.stop)
        except BaseException as e:  # noqa: BLE001 - reported by __exit__
            self.error = e

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(2)
        assert not self.thread.is_alive(), "run() did not return within 2 s of stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as s:
        yield s


def source_for(server: FakeApiServer, **kwargs: Any) -> KubernetesSource:
    api = client.CoreV1Api(client.ApiClient(client.Configuration(host=server.url)))
    kwargs.setdefault("netns_of", netns)
    kwargs.setdefault("backoff", (0.01, 0.05))
    return KubernetesSource(NODE, api, **kwargs)


def annotate(server: FakeApiServer, name: str, key: str, value: str, record: bool = True) -> None:
    def change(pod: dict[str, Any]) -> None:
        pod["metadata"].setdefault("annotations", {})[key] = value

    server.modify("default", name, change, record=record)


def watching(n: int = 1) -> Callable[[FakeApiServer], bool]:
    return lambda s: s.open_watches == n


def test_lists_only_this_nodes_meshed_pods(server):
    server.create(make_pod("a", ips=["10.244.1.5"]))
    server.create(make_pod("b", node="node-b", ips=["10.244.2.5"]))
    server.create(make_pod("plain", injected=False, ips=["10.244.1.6"]))
    server.create(make_pod("out", ips=["10.244.1.7"], labels={"sidecar.istio.io/inject": "false"}))
    with Running(source_for(server)) as run:
        run.collector.wait_names("default/a")
        server.wait(watching())
        server.create(make_pod("b2", node="node-b", ips=["10.244.2.6"]))
        server.create(make_pod("a2", ips=["10.244.1.8"]))
        run.collector.wait_names("default/a", "default/a2")
    assert run.collector.calls[0] == [PodSpec("default/a", ("10.244.1.5",), "/run/netns/a")]
    for req in server.served:  # the selector is the server's business: node-b never sent
        assert req.query["fieldSelector"] == f"spec.nodeName={NODE}"
        assert not any(n.startswith("default/b") for n in req.names), req


def test_added_updated_deleted(server):
    key = "traffic.sidecar.istio.io/excludeInboundPorts"
    with Running(source_for(server)) as run:
        run.collector.wait_names()
        server.wait(watching())
        server.create(make_pod("a", ips=["10.244.1.5", "fd00::5"], annotations={key: "8080"}))
        run.collector.wait_names("default/a")
        assert run.collector.latest("default/a").ips == ("10.244.1.5", "fd00::5")
        annotate(server, "a", key, "9090")
        run.collector.wait(lambda specs: bool(specs) and ann(specs[0]) == {key: "9090"})
        server.delete("default", "a")
        run.collector.wait_names()
    assert run.source.relists == 0 and run.source.errors == dict.fromkeys(run.source.errors, 0)


def test_changes_that_do_not_matter_do_not_call_back(server):
    server.create(make_pod("a", ips=["10.244.1.5"]))
    with Running(source_for(server)) as run:
        before = run.collector.wait_names("default/a")
        server.wait(watching())
        server.modify("default", "a", lambda p: p["metadata"].update(labels={"x": "1"}))
        server.create(make_pod("b", node="node-b", ips=["10.244.2.5"]))  # other node
        server.create(make_pod("plain", injected=False, ips=["10.244.1.6"]))  # not meshed
        server.delete("default", "plain")
        server.create(make_pod("marker", ips=["10.244.1.9"]))
        after = run.collector.wait_names("default/a", "default/marker")
    assert after == before + 1  # only the marker changed what is desired


def test_pod_scheduled_then_given_an_address(server):
    server.create(make_pod("a", node="", ips=(), phase="Pending"))
    with Running(source_for(server)) as run:
        run.collector.wait_names()
        server.wait(watching())
        server.modify("default", "a", lambda p: p["spec"].update(nodeName=NODE))  # bound
        server.modify("default", "a", lambda p: p["status"].update(
            podIP="10.244.1.5", podIPs=[{"ip": "10.244.1.5"}]))  # fmt: skip
        run.collector.wait_names("default/a")


@pytest.mark.parametrize("gone_as", ["event", "http"])
def test_410_gone_on_reconnect_relists(gone_as):
    with FakeApiServer(gone_as=gone_as) as server:
        server.create(make_pod("a", ips=["10.244.1.5"]))
        server.create(make_pod("b", ips=["10.244.1.6"]))
        with Running(source_for(server)) as run:
            run.collector.wait_names("default/a", "default/b")
            server.wait(watching())
            server.delete("default", "a", record=False)  # changes no event will tell of
            server.create(make_pod("c", ips=["10.244.1.7"]), record=False)
            server.compact()  # and the source's resourceVersion is now too old
            server.drop_watches()
            run.collector.wait_names("default/b", "default/c")
            server.wait(watching())
        src = run.source
        assert (src.relists, src.errors["expired"], src.errors["watch"]) == (1, 1, 1)
        lists = [r.query for r in server.served if r.kind == "list"]
        assert len(lists) == 2
        assert lists[0]["resourceVersion"] == "0"  # from the watch cache: cheap for the server
        assert "resourceVersion" not in lists[1]  # after 410: consistent, never back in time


def test_410_gone_on_an_open_watch_relists(server):
    server.create(make_pod("a", ips=["10.244.1.5"]))
    with Running(source_for(server)) as run:
        run.collector.wait_names("default/a")
        server.wait(watching())
        server.delete("default", "a", record=False)
        server.expire_watches()
        run.collector.wait_names()
    assert (run.source.relists, run.source.errors["expired"]) == (1, 1)
    assert run.source.errors["watch"] == 0


def test_bookmarks_advance_the_resource_version(server):
    server.create(make_pod("a", ips=["10.244.1.5"]))
    with Running(source_for(server)) as run:
        run.collector.wait_names("default/a")
        server.wait(watching())
        for i in range(5):  # history the source never sees: another node's pods
            server.create(make_pod(f"b{i}", node="node-b", ips=[f"10.244.2.{i + 1}"]))
        assert run.source.resource_version != server.resource_version
        server.bookmark()
        rv = server.resource_version
        server.wait(lambda s: run.source.resource_version == rv)
        server.compact()  # without the bookmark the source would now be too old: 410
        server.drop_watches()
        server.wait(lambda s: len([r for r in s.served if r.kind == "watch"]) == 2)
        server.wait(watching())
        server.create(make_pod("c", ips=["10.244.1.7"]))
        run.collector.wait_names("default/a", "default/c")
    assert server.served[-1].query["resourceVersion"] == rv
    assert run.source.relists == 0 and run.source.errors["expired"] == 0


def test_dropped_stream_resumes_without_losing_events(server):
    key = "traffic.sidecar.istio.io/includeInboundPorts"
    server.create(make_pod("a", ips=["10.244.1.5"]))
    server.create(make_pod("b", ips=["10.244.1.6"]))
    with Running(source_for(server)) as run:
        run.collector.wait_names("default/a", "default/b")
        server.wait(watching())
        rv = server.resource_version
        with server.hold_watches():  # the reconnection waits until the changes are made
            server.drop_watches()
            server.wait(lambda s: s.held_watches == 1)
            server.create(make_pod("c", ips=["10.244.1.7"]))
            annotate(server, "a", key, "80")
            server.delete("default", "b")
        run.collector.wait(
            lambda specs: (
                [p.name for p in specs] == ["default/a", "default/c"]
                and ann(specs[0]) == {key: "80"}
            )
        )
    resumed = [r for r in server.served if r.kind == "watch"][1]
    assert resumed.query["resourceVersion"] == rv
    assert resumed.names == ["default/c", "default/a", "default/b"]  # replayed in order
    src = run.source
    assert (src.relists, src.watch_restarts, src.errors["watch"]) == (0, 1, 1)


def test_pods_deleted_while_stopped_are_gone_from_the_next_list(server):
    server.create(make_pod("a", ips=["10.244.1.5"]))
    server.create(make_pod("b", ips=["10.244.1.6"]))
    source = source_for(server)
    with Running(source) as run:
        run.collector.wait_names("default/a", "default/b")
    server.delete("default", "a")
    server.create(make_pod("c", ips=["10.244.1.7"]))
    with Running(source) as run:  # the same source, started again
        run.collector.wait_names("default/b", "default/c")
    assert [p.name for p in run.collector.calls[0]] == ["default/b", "default/c"]


def test_resync_repairs_drift(server):
    key = "traffic.sidecar.istio.io/excludeOutboundPorts"
    server.create(make_pod("a", ips=["10.244.1.5"]))
    with Running(source_for(server, resync_seconds=0.5)) as run:
        run.collector.wait_names("default/a")
        server.wait(watching())
        annotate(server, "a", key, "1", record=False)
        run.collector.wait(lambda specs: bool(specs) and ann(specs[0]) == {key: "1"})
    assert run.source.relists >= 1
    assert [r.query["resourceVersion"] for r in server.served if r.kind == "list"][:2] == ["0"] * 2
    watches = [r for r in server.served if r.kind == "watch"]
    assert int(watches[0].query["timeoutSeconds"]) <= 1  # the watch ends when resync is due


def test_errors_are_retried_with_backoff(server):
    server.create(make_pod("a", ips=["10.244.1.5"]))
    server.fail_next(3, status=503, reason="ServiceUnavailable")
    with Running(source_for(server)) as run:
        run.collector.wait_names("default/a")
        server.wait(watching())
        assert run.source.errors["list"] == 3
        server.fail_next(2)
        server.drop_watches()  # a cut stream, then two failed reconnections
        server.wait(lambda s: len([r for r in s.served if r.kind == "watch"]) == 4)
        server.create(make_pod("b", ips=["10.244.1.6"]))
        run.collector.wait_names("default/a", "default/b")
    assert [r.status for r in server.served] == [503] * 3 + [200, 200, 500, 500, 200]
    assert run.source.errors["watch"] == 3 and run.source.relists == 0


def test_stop_is_prompt_while_the_watch_is_idle(server):
    with Running(source_for(server)) as run:
        run.collector.wait_names()
        server.wait(watching())
        t0 = time.monotonic()
        run.stop.set()
        run.thread.join(2)
    assert time.monotonic() - t0 < 1.0


def test_on_desired_errors_end_run(server):
    def broken(specs: list[PodSpec]) -> None:
        raise RuntimeError("reconciler is broken")

    source = source_for(server)
    with pytest.raises(RuntimeError, match="reconciler is broken"):
        source.run(broken, threading.Event())
    assert source.errors["list"] == 0


def test_a_broken_pod_is_reported_by_name_and_field_and_the_others_are_served(server, caplog):
    bad_ip = make_pod("bad-ip", ips=["10.244.1.300"])
    server.create(make_pod("a", ips=["10.244.1.5"]))
    server.create(bad_ip)
    server.create(make_pod("b", ips=["10.244.1.6"]))
    source = source_for(server)
    with Running(source) as run:
        run.collector.wait_names("default/a", "default/b")
        server.wait(watching())
        # a served pod whose object breaks keeps what it had (its capture stays on) ...
        server.modify("default", "a", lambda p: p["status"].update(podIPs=[{"ip": 5}]))
        server.create(make_pod("c", ips=["10.244.1.7"]))
        run.collector.wait_names("default/a", "default/b", "default/c")
        assert run.collector.latest("default/a").ips == ("10.244.1.5",)
        # ... and follows it again once it is readable
        server.modify("default", "a", lambda p: p["status"].update(podIPs=[{"ip": "10.244.1.9"}]))
        run.collector.wait(lambda specs: ("10.244.1.9",) in [p.ips for p in specs])
    assert source.errors["pod"] == 2
    assert 'pod default/bad-ip: status.podIPs "10.244.1.300": not an IP address' in caplog.text
    assert "pod default/a: status.podIPs: not a list of {ip: ADDRESS}" in caplog.text


def test_a_pod_with_a_bad_annotation_is_served_to_the_reconciler(server):
    # annotation values are the reconciler's to refuse, per pod (see test_controller_file)
    key = "traffic.sidecar.istio.io/excludeInboundPorts"
    server.create(make_pod("a", ips=["10.244.1.5"]))
    server.create(make_pod("bad", ips=["10.244.1.6"], annotations={key: "80,http"}))
    with Running(source_for(server)) as run:
        run.collector.wait_names("default/a", "default/bad")
        assert run.collector.latest("default/bad").annotations == {key: "80,http"}
