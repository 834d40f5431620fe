#!/usr/bin/env python3
"""Two sets of `meshaccel bench` runs compared round by round: is one mode's ratio to another
different between the sets (e.g. two builds), beyond the rounds' own spread?

    python3 scripts/compare_runs.py before=RUN1/results.json before=RUN2/results.json \
        after=RUN3/results.json after=RUN4/results.json [--mode ebpf] [--base iptables]

Each round of a run measures every mode one after the other, so the ratio of two modes
within one round cancels the machine's drift between rounds and runs. Per set: how many
rounds, the median and quartiles of the per-round p50 and requests/s ratios. Then the
difference of the medians of the p50 ratios, with a 95% bootstrap interval (5,000 resamples
of the rounds, seeded: the same inputs print the same numbers).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path


def round_ratios(path: str, mode: str, base: str, scenario: str, label: str) -> list[dict]:
    """Per round of one run: mode / base for p50 and requests/s."""
    by_round: dict[int, dict[str, dict]] = {}
    for r in json.loads(Path(path).read_text())["records"]:
        if r["scenario"] == scenario and r["label"] == label:
            by_round.setdefault(r["round"], {})[r["mode"]] = r
    return [
        {k: m[mode][k] / m[base][k] for k in ("p50_ms", "rps")}
        for _, m in sorted(by_round.items())
        if mode in m and base in m
    ]


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="SET=RESULTS_JSON")
    ap.add_argument("--mode", default="ebpf")
    ap.add_argument("--base", default="iptables")
    ap.add_argument("--scenario", default="echo")
    ap.add_argument("--label", default="c=1")
    args = ap.parse_args()
    sets: dict[str, list[dict]] = {}
    for arg in args.runs:
        name, sep, path = arg.partition("=")
        if not sep:
            ap.error(f"{arg!r}: expected SET=RESULTS_JSON")
        try:
            rounds = round_ratios(path, args.mode, args.base, args.scenario, args.label)
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
            ap.error(f"{path}: not a readable `meshaccel bench` results.json ({e!r})")
        if not rounds:
            ap.error(f"{path}: no round with both {args.mode} and {args.base}")
        sets.setdefault(name, []).extend(rounds)
    if few := [name for name, rounds in sets.items() if len(rounds) < 2]:
        ap.error(f"set(s) {', '.join(few)}: fewer than 2 rounds, no spread to compare")
    what = f"{args.scenario} {args.label}, {args.mode} / {args.base} per round"
    for name, rounds in sets.items():
        p50 = quartiles([r["p50_ms"] for r in rounds])
        rps = quartiles([r["rps"] for r in rounds])
        print(
            f"{name}: {len(rounds)} rounds, {what}: p50 {p50[1]:.3f} ({p50[0]:.3f}-{p50[2]:.3f}), "
            f"requests/s {rps[1]:.3f} ({rps[0]:.3f}-{rps[2]:.3f})  [median (quartiles)]"
        )
    if len(sets) != 2:
        return
    (a, ra), (b, rb) = sets.items()
    pa, pb = [r["p50_ms"] for r in ra], [r["p50_ms"] for r in rb]
    rng = random.Random(1)

    def resampled_median(xs: list[float]) -> float:
        return statistics.median(rng.choices(xs, k=len(xs)))

    boots = sorted(resampled_median(pb) - resampled_median(pa) for _ in range(5000))
    diff = statistics.median(pb) - statistics.median(pa)
    print(
        f"{b} - {a}, median p50 ratio: {diff:+.3f} "
        f"(95% bootstrap interval {boots[125]:+.3f} to {boots[4874]:+.3f})"
    )


if __name__ == "__main__":
    main()
