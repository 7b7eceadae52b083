#!/usr/bin/env python3
"""Turns criterion's results (target/criterion) into the markdown table of BENCHMARKS.md.

Each row is one benchmark group; the columns are the median time per iteration of each codec and,
for each peer, how many times faster mqtt-proto is (peer time / our time, so >1 means we win).
"""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
OURS = "mqtt-proto"
rows = {}
for bench in root.rglob("new/benchmark.json"):
    meta = json.loads(bench.read_text())
    est = json.loads((bench.parent / "estimates.json").read_text())
    rows.setdefault(meta["group_id"], {})[meta["function_id"]] = est["median"]["point_estimate"]


def fmt(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


print("| benchmark | mqtt-proto | rumqttc | mqttrs | vs rumqttc | vs mqttrs |")
print("|---|---|---|---|---|---|")
for group in sorted(rows, key=lambda g: (g.split("/")[0], g)):
    r = rows[group]
    ours = r.get(OURS)
    if ours is None:
        continue
    cells = [group, fmt(ours)]
    ratios = []
    for peer in ("rumqttc", "mqttrs"):
        t = r.get(peer)
        cells.append(fmt(t) if t else "–")
        ratios.append(f"{t / ours:.2f}x" if t else "–")
    print("| " + " | ".join(cells + ratios) + " |")
    for extra in sorted(set(r) - {OURS, "rumqttc", "mqttrs"}):
        label = extra.split("(")[-1].rstrip(")")
        vs = [f"{r[peer] / r[extra]:.2f}x" if peer in r else "–" for peer in ("rumqttc", "mqttrs")]
        print(f"| {group} ({label}) | {fmt(r[extra])} | | | {vs[0]} | {vs[1]} |")
