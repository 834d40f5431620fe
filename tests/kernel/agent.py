"""The agent as the kernel tests run it: `meshaccel run --source file` in a lab."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from meshaccel.lab.http_probe import free_port, get
from tests.kernel.lab import Lab
from tests.wait import wait_for

MESHACCEL = os.path.join(os.path.dirname(sys.executable), "meshaccel")


class Agent:
    """`meshaccel run --source file` for a lab, its log in a file (a pipe nobody reads
    would fill up and block it); started and killed by PID through the lab."""

    def __init__(self, lab: Lab, tmp: Path, cgroup: str, *extra: str) -> None:
        self.lab = lab
        self.pods_file = tmp / "pods.yaml"
        self.log = tmp / "agent.log"
        self.bpffs = f"/sys/fs/bpf/{lab.prefix}"
        lab.bpffs.append(self.bpffs)  # detached at teardown, whatever happens here
        self.url = f"http://127.0.0.1:{free_port()}"
        self.argv = [
            MESHACCEL, "run", "--source", "file", "--pods-file", str(self.pods_file),
            "--bpffs", self.bpffs, "--cgroup", cgroup,
            "--metrics-address", self.url.removeprefix("http://"), *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = self.lab.spawn(self.argv, stdout=log, stderr=subprocess.STDOUT)

    def write_pods(self, *netns: str, extra: tuple[dict, ...] = ()) -> None:
        """The pods file: these lab pods (by netns name), plus extra items as given."""
        items = [
            {"name": n, "ips": self.lab.pod_ips[n], "netns": f"/var/run/netns/{n}"} for n in netns
        ]
        items += extra
        tmp = self.pods_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"pods": items}))
        tmp.rename(self.pods_file)  # atomically, as a ConfigMap update does

    def ready(self, timeout: float = 60) -> None:
        ok = wait_for(lambda: get(f"{self.url}/readyz")[0] == 200, timeout, step=0.1)
        assert ok, f"agent not ready: {get(f'{self.url}/readyz')}\n{self.log.read_text()}"

    def metrics(self) -> dict[tuple[str, tuple], float]:
        code, text = get(f"{self.url}/metrics")
        assert code == 200, text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def term(self) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(15)
