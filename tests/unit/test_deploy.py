"""deploy/: the manifests are valid Kubernetes objects and agree with the CLI (no cluster).

The API server would reject a manifest with an unknown field, a wrong type or a missing
required field; the official client's models catch the last two, and a walk over their
field maps catches the first. The rest checks that the agent's flags, ports and paths in
the manifests are the ones meshaccel actually has, so a CLI change cannot silently break
the DaemonSet.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import kubernetes.client
import pytest
import yaml
from kubernetes.utils import parse_quantity

from meshaccel.agent import daemon, kubernetes_source
from meshaccel.cli import cli
from meshaccel.datapath import host, loader

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = ["daemonset.yaml", "uninstall-job.yaml"]
NAMESPACE = "meshaccel-system"

# What the downward API gives the containers, to expand $(VAR) in args as the kubelet does.
SAMPLE_ENV = {"NODE_NAME": "node-1", "HOST_IP": "10.0.0.7"}

# include/uapi/linux/capability.h, CAP_CHOWN (0) .. CAP_CHECKPOINT_RESTORE (40); Kubernetes
# spells them without the CAP_ prefix.
LINUX_CAPABILITIES = {
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
}  # fmt: skip


# ---------------------------------------------------------------- loading and validating


def load(name: str) -> list[dict]:
    with open(DEPLOY / name) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def all_objects() -> list[tuple[str, dict]]:
    return [(name, doc) for name in MANIFESTS for doc in load(name)]


def unknown_fields(data: object, type_name: str, where: str) -> list[str]:
    """Paths of keys the API would reject as unknown: the models' from_dict drops them."""
    if m := re.fullmatch(r"List\[(.+)\]", type_name):
        items = data if isinstance(data, list) else []
        return [p for i, v in enumerate(items) for p in unknown_fields(v, m[1], f"{where}[{i}]")]
    if m := re.fullmatch(r"Dict\[str, (.+)\]", type_name):
        items = data.items() if isinstance(data, dict) else []
        return [p for k, v in items for p in unknown_fields(v, m[1], f"{where}.{k}")]
    model = getattr(kubernetes.client, type_name, None)
    if model is None or not isinstance(data, dict):
        return []  # a primitive: its type is the models' job
    attr_of = {json_key: attr for attr, json_key in model.attribute_map.items()}
    problems = [f"{where}.{key}" for key in data if key not in attr_of]
    for key, value in data.items():
        if key in attr_of:
            problems += unknown_fields(value, model.openapi_types[attr_of[key]], f"{where}.{key}")
    return problems


def model_type(doc: dict) -> str:
    """apps/v1 DaemonSet -> V1DaemonSet, the client's model for it."""
    version = doc["apiVersion"].rpartition("/")[2]
    return version[0].upper() + version[1:] + doc["kind"]


def validate(doc: dict):
    """The object as the official client's model; raises on anything the API would reject."""
    type_name = model_type(doc)
    assert hasattr(kubernetes.client, type_name), f"no such Kubernetes kind: {type_name}"
    unknown = unknown_fields(doc, type_name, doc["kind"])
    assert not unknown, f"unknown fields: {unknown}"
    # The models check types strictly and required fields (pydantic).
    return kubernetes.client.ApiClient().deserialize(json.dumps(doc), type_name, "application/json")


def find(kind: str, name: str, manifest: str = "daemonset.yaml") -> dict:
    found = [d for d in load(manifest) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{manifest}: expected one {kind}/{name}"
    return found[0]


def agent_ds() -> dict:
    return find("DaemonSet", "meshaccel")


def cleanup_ds() -> dict:
    return find("DaemonSet", "meshaccel-cleanup", "uninstall-job.yaml")


def container(ds: dict, name: str) -> dict:
    (c,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def expand(arg: str, env: dict[str, str]) -> str:
    """$(VAR) -> value, as the kubelet expands container args from the container's env."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], arg)


def mounts(ds: dict, c: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume)."""
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in c["volumeMounts"]}


# ---------------------------------------------------------------- the objects themselves


@pytest.mark.parametrize("manifest,index", [(m, i) for m in MANIFESTS for i in range(len(load(m)))])
def test_every_object_is_a_valid_kubernetes_object(manifest, index):
    doc = load(manifest)[index]
    validate(doc)
    if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
        assert doc["metadata"]["namespace"] == NAMESPACE


def test_validation_rejects_what_the_api_server_would():
    ds = agent_ds()
    ds["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}  # typo
    with pytest.raises(AssertionError, match="securityContex"):
        validate(ds)
    ds = agent_ds()
    ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "15080"
    with pytest.raises(ValueError, match="containerPort"):
        validate(ds)


def test_kustomization_installs_the_agent_but_not_the_cleanup():
    (kust,) = load("kustomization.yaml")
    assert kust["kind"] == "Kustomization"
    assert kust["resources"] == ["daemonset.yaml"]  # never uninstall-job.yaml


def test_cluster_role_only_reads_pods():
    role = find("ClusterRole", "meshaccel")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    binding = find("ClusterRoleBinding", "meshaccel")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "meshaccel",
    }
    sa = find("ServiceAccount", "meshaccel")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert agent_ds()["spec"]["template"]["spec"]["serviceAccountName"] == "meshaccel"
    find("Namespace", NAMESPACE)


@pytest.mark.parametrize("ds", [agent_ds(), cleanup_ds()], ids=["agent", "cleanup"])
def test_daemonset_runs_on_every_node(ds):
    spec = ds["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert {"operator": "Exists"} in pod["tolerations"]  # every taint, NoExecute included
    assert pod["priorityClassName"] == "system-node-critical"


def test_agent_pod_settings():
    ds = agent_ds()
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] and pod["hostPID"]
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert 5 <= pod["terminationGracePeriodSeconds"] <= 60
    # The pod sources look for pods' processes in /proc; hostPID makes that the host's.
    assert inspect.signature(kubernetes_source.netns_of_pod).parameters["proc"].default == "/proc"


def test_agent_resources_fit_the_rss_target():
    res = container(agent_ds(), "agent")["resources"]
    for kind in ("cpu", "memory"):
        assert parse_quantity(res["requests"][kind]) <= parse_quantity(res["limits"][kind])
    # request at least the 150 MiB steady-state target, limit with room for bcc's compile
    assert parse_quantity(res["requests"]["memory"]) >= parse_quantity("150Mi")
    assert parse_quantity(res["limits"]["memory"]) >= 2 * parse_quantity("150Mi")


# ---------------------------------------------------------------- the agent's command line


def run_context() -> click.Context:
    """Parse the agent container's args with the real CLI, $(VAR)s expanded."""
    c = container(agent_ds(), "agent")
    declared = {e["name"] for e in c["env"]}
    referenced = {v for a in c["args"] for v in re.findall(r"\$\((\w+)\)", a)}
    assert referenced <= declared, "the kubelet leaves undeclared $(VAR) unexpanded"
    args = [expand(a, SAMPLE_ENV) for a in c["args"]]
    assert args[0] in cli.commands, f"no command meshaccel {args[0]}"
    command = cli.commands[args[0]]
    flags = {o for p in command.params for o in getattr(p, "opts", []) + p.secondary_opts}
    for arg in args[1:]:
        if arg.startswith("--"):
            assert arg.partition("=")[0] in flags, f"meshaccel {args[0]} has no {arg}"
    # click itself rejects unknown options, bad choices, missing values
    return command.make_context(args[0], args[1:])


def test_agent_args_are_options_of_meshaccel_run():
    ctx = run_context()
    assert ctx.command.name == "run"
    assert ctx.params["source_kind"] == "kubernetes"
    assert ctx.params["node_name"] == SAMPLE_ENV["NODE_NAME"]
    assert not ctx.params["detach_on_exit"]  # the datapath must outlive the agent's restarts


def test_node_name_comes_from_the_downward_api():
    env = {e["name"]: e for e in container(agent_ds(), "agent")["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"


def test_probes_and_scrape_use_the_metrics_address():
    host, port = daemon.parse_address(run_context().params["metrics_address"])
    # reachable from the kubelet and Prometheus: the node's address, not loopback
    assert host == SAMPLE_ENV["HOST_IP"]
    ds = agent_ds()
    c = container(ds, "agent")
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert c["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }


def cli_envvars() -> set[str]:
    """Every environment variable the CLI reads: explicit envvar= plus click's auto names
    (MESHACCEL_<COMMAND>_<PARAM NAME>, the parameter's Python name, as click builds it)."""
    names: set[str] = set()

    def walk(command: click.Command, prefix: str) -> None:
        for p in command.params:
            if isinstance(p, click.Option):
                if p.envvar:
                    names.update([p.envvar] if isinstance(p.envvar, str) else p.envvar)
                if p.allow_from_autoenv and p.name:
                    names.add(f"{prefix}_{p.name.upper()}")
        for sub_name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{prefix}_{sub_name.upper().replace('-', '_')}")

    walk(cli, "MESHACCEL")
    return names


def test_meshaccel_environment_variables_are_real_options():
    known = cli_envvars()
    assert "MESHACCEL_ATTACH_PROXY_PORT" in known  # the README's example: the walk is right
    used = {
        e["name"]
        for _, doc in all_objects()
        if doc["kind"] == "DaemonSet"
        for c in doc["spec"]["template"]["spec"].get("initContainers", [])
        + doc["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
    }
    used |= set(dockerfile_env())
    # read by the loader directly (where bcc finds the C sources), not a CLI option
    not_options = {"MESHACCEL_BPF_DIR"}
    assert 'os.environ.get("MESHACCEL_BPF_DIR"' in inspect.getsource(loader)
    for name in sorted(used):
        if name.startswith("MESHACCEL_") and name not in not_options:
            assert name in known, f"{name} is not an option's environment variable"


# ---------------------------------------------------------------- host mounts and privileges


def test_bpffs_mount_is_where_the_cli_pins():
    (bpffs,) = [p for p in cli.commands["run"].params if p.name == "bpffs"]
    assert bpffs.default == loader.DEFAULT_BPFFS
    parent = os.path.dirname(loader.DEFAULT_BPFFS)  # must be the bpffs mount itself
    for ds, name in ((agent_ds(), "agent"), (cleanup_ds(), "detach")):
        mount, volume = mounts(ds, container(ds, name))[parent]
        assert volume["hostPath"]["path"] == parent
        assert mount["mountPropagation"] == "HostToContainer"
    # mount-bpffs puts a bpffs on the host where there is none: its mount must propagate
    # back to the host, which the API server allows for privileged containers only.
    ds = agent_ds()
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    mount, volume = mounts(ds, init)[parent]
    assert mount["mountPropagation"] == "Bidirectional"
    assert init["securityContext"]["privileged"] is True
    # decided by filesystem type: the bind mount is a mount point even without a bpffs
    assert f'"$(stat -f -c %T {parent})" = bpf_fs' in init["command"][-1]
    assert f"mount -t bpf bpf {parent}" in init["command"][-1]


def test_only_privileged_containers_use_bidirectional_propagation():
    for _, doc in all_objects():
        if doc["kind"] != "DaemonSet":
            continue
        pod = doc["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            if any(m.get("mountPropagation") == "Bidirectional" for m in c["volumeMounts"]):
                assert c["securityContext"].get("privileged") is True, c["name"]


def test_cgroup_mount_is_the_one_the_agent_attaches_to(tmp_path):
    for ds, name in ((agent_ds(), "agent"), (cleanup_ds(), "detach")):
        mount, volume = mounts(ds, container(ds, name))["/sys/fs/cgroup"]
        assert volume["hostPath"]["path"] == "/sys/fs/cgroup" and not mount.get("readOnly")
    # --cgroup's default is the cgroup2 mount doctor finds. In the container the runtime's
    # own (namespaced) cgroup2 mount sits under the host's one at /sys/fs/cgroup: the path
    # resolves to the top mount, the host's root cgroup.
    unified = tmp_path / "unified"
    unified.write_text(
        "30 25 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw\n"
        "40 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
    )
    assert host.cgroup2_mount(str(unified)) == "/sys/fs/cgroup"
    # hybrid hosts: the recursive hostPath mount brings /sys/fs/cgroup/unified along
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(
        "40 25 0:30 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "41 40 0:31 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    assert host.cgroup2_mount(str(hybrid)) == "/sys/fs/cgroup/unified"


def test_kernel_headers_are_mounted_read_only_for_bcc():
    ds = agent_ds()
    found = mounts(ds, container(ds, "agent"))
    for path in ("/lib/modules", "/usr/src"):  # build -> /usr/src/linux-headers-*
        mount, volume = found[path]
        assert mount["readOnly"] is True and volume["hostPath"]["path"] == path


@pytest.mark.parametrize(
    "ds,name", [(agent_ds(), "agent"), (cleanup_ds(), "detach")], ids=["agent", "cleanup"]
)
def test_capabilities_are_real_and_minimal(ds, name):
    sc = container(ds, name)["securityContext"]
    assert not sc.get("privileged")
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0  # meshaccel checks euid 0
    caps = sc["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert set(caps["add"]) <= LINUX_CAPABILITIES
    assert len(set(caps["add"])) == len(caps["add"])
    # what `meshaccel doctor` requires
    assert {n.removeprefix("CAP_") for n in host.NEEDED_CAPS} <= set(caps["add"])
    # the API server refuses allowPrivilegeEscalation: false together with CAP_SYS_ADMIN
    assert sc.get("allowPrivilegeEscalation", True) is True
    assert "/tmp" in mounts(ds, container(ds, name))  # writable scratch space


def test_agent_capabilities_are_exactly_the_needed_ones():
    add = container(agent_ds(), "agent")["securityContext"]["capabilities"]["add"]
    assert set(add) == {"BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE"}


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_every_added_capability_says_why(manifest):
    """In the YAML text, each capability line follows a comment that names it."""
    lines = (DEPLOY / manifest).read_text().splitlines()
    caps = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*- [A-Z_]+", line)]
    assert caps
    for i in caps:
        cap = lines[i].split("- ")[1]
        j = i - 1
        while lines[j].strip().startswith("#") and f"# {cap}:" not in lines[j]:
            j -= 1
        assert f"# {cap}:" in lines[j], f"no comment explaining {cap}"


# ---------------------------------------------------------------- uninstall


def test_cleanup_runs_detach_with_real_options():
    c = container(cleanup_ds(), "detach")
    script = c["command"][-1]
    calls = [shlex.split(line.strip()) for line in script.splitlines()]
    calls = [args[1:] for args in calls if args and args[0] == "meshaccel"]
    assert calls and all(args[0] == "detach" for args in calls)
    for args in calls:
        args = [a.replace("$cg", "/sys/fs/cgroup") for a in args]
        cli.commands["detach"].make_context("detach", args[1:])
    # Ready only once detach succeeded: `kubectl rollout status` then means every node
    assert "touch /tmp/detached" in script
    assert script.index("meshaccel detach") < script.index("touch /tmp/detached")
    assert c["readinessProbe"]["exec"]["command"] == ["test", "-e", "/tmp/detached"]
    assert cleanup_ds()["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_images_are_the_project_version():
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    for _, doc in all_objects():
        if doc["kind"] == "DaemonSet":
            pod = doc["spec"]["template"]["spec"]
            for c in pod.get("initContainers", []) + pod["containers"]:
                assert c["image"] == f"meshaccel:{version}"


# ---------------------------------------------------------------- the image


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) with continuation lines joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction, rest in dockerfile():
        if instruction == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(rest))
    return env


def test_dockerfile_installs_what_setup_sh_installs():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    # (gcc, wrk and perf serve the benchmarks, nginx the app-pattern tests, ruby the
    # Vagrantfile's syntax test; not the agent)
    benches = {"gcc", "wrk", "linux-perf", "nginx-light", "ruby"}
    wanted = set(re.search(r"^PACKAGES=\((.*)\)$", setup, re.M)[1].split()) - benches
    (apt,) = [rest for ins, rest in dockerfile() if ins == "RUN" and "apt-get install" in rest]
    words = shlex.split(apt)
    after = words[words.index("install") + 1 :]
    packages = set()
    for w in after:
        if w == "&&":
            break
        if not w.startswith("-"):
            packages.add(w)
    assert packages == wanted
    assert not any(p.startswith("linux-headers") for p in packages)  # the host's are mounted


def test_dockerfile_builds_the_venv_and_entrypoint():
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "debian:bookworm-slim")
    runs = [rest for ins, rest in instructions if ins == "RUN"]
    assert "/usr/bin/python3 -m venv --system-site-packages /opt/venv" in runs
    copied = {w for ins, rest in instructions if ins == "COPY" for w in rest.split()[:-1]}
    assert {"pyproject.toml", "README.md", "meshaccel/", "bpf/"} <= copied
    # the C sources are not in the installed package: the loader is pointed at the copy
    workdir = [rest for ins, rest in instructions if ins == "WORKDIR"][-1]
    assert dockerfile_env()["MESHACCEL_BPF_DIR"] == f"{workdir}/bpf"
    assert ("ENTRYPOINT", '["meshaccel"]') in instructions
    assert 'meshaccel = "meshaccel.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert not any(ins == "USER" for ins, _ in instructions)  # eBPF needs uid 0


def test_the_image_leaves_the_lab_out_and_the_rest_needs_none_of_it(tmp_path: Path):
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "meshaccel/lab/" in ignore
    # the package as the image gets it: every module imports, and the lab's commands say
    # in one line that the lab is not there
    shutil.copytree(ROOT / "meshaccel", tmp_path / "meshaccel",
                    ignore=shutil.ignore_patterns("lab", "__pycache__"))  # fmt: skip
    modules = [".".join(p.relative_to(tmp_path).with_suffix("").parts)
               for p in (tmp_path / "meshaccel").rglob("*.py")]  # fmt: skip
    # (without an editable install's finder, which would find the checkout's meshaccel.lab)
    alone = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]"
    code = f"{alone}; import importlib; [importlib.import_module(m) for m in {modules!r}]"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    cli = [sys.executable, "-c", f"{alone}; from meshaccel.cli import main; main()"]
    r = subprocess.run([*cli, "lab", "status"], capture_output=True, text=True, env=env,
                       cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "Error: the lab is not part of this installation (the node agent's image ships the "
        "datapath and the agent only): run it from a checkout (scripts/setup.sh)"
    )
