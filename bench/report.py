#!/usr/bin/env python3
"""Renders roomkeeper-bench output and the Node peers' output (JSON lines,
from one run) as the markdown tables of docs/benchmarks.md, with ratios.
usage: report.py results.jsonl"""
import json
import sys


def load(path):
    rows = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def kind(row):
    if "workload" in row:
        return row["workload"]
    s = row["system"]
    if s.startswith("socket.io-adapter"):
        return "rooms"
    if "setTimeout" in s:
        return "timers"
    return "dispatch"


def fmt(v):
    if isinstance(v, float):
        return f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(rows, keys, base_pred, title):
    base = next((r for r in rows if base_pred(r)), None)
    out = [f"### {title}", ""]
    head = "| system | ids | " + " | ".join(keys) + " |"
    out += [head, "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("–" if v is None else fmt(v))
        out.append(f"| {r['system']}{' (' + str(r.get('sessions', '')) + ')' if 'sessions' in r else ''} "
                   f"| {r.get('session_ids', 'string')} | " + " | ".join(cells) + " |")
    if base:
        out += ["", f"Ratios against **{base['system']}** (higher is better for roomkeeper: "
                "peer time / roomkeeper time, peer bytes / roomkeeper bytes):", ""]
        out += ["| roomkeeper line | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        for r in rows:
            if not r["system"].startswith("roomkeeper"):
                continue
            cells = []
            for k in keys:
                a, b = r.get(k), base.get(k)
                cells.append("–" if not a or not b else f"{b / a:,.1f}×")
            out.append(f"| {r['system']} ({r.get('session_ids', 'string')}, "
                       f"{r.get('sessions', r.get('timers', ''))}) | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main():
    rows = load(sys.argv[1])
    by = {"rooms": [], "timers": [], "dispatch": []}
    for r in rows:
        by[kind(r)].append(r)
    print(table(by["rooms"], ["join_ns_per_op", "fanout_ns_per_member", "leave_ns_per_op",
                              "disconnect_ns_per_session", "bytes_per_membership"],
                lambda r: r["system"].startswith("socket.io"), "W1 rooms (membership index)"))
    print(table(by["timers"], ["arm_ns_per_op", "restart_ns_per_op", "cancel_ns_per_op",
                               "bytes_per_timer", "fire_ns_per_timer"],
                lambda r: "setTimeout" in r["system"], "W2 timers"))
    asio = [r for r in by["timers"] if "asio" in r["system"]]
    if asio:
        print(table([r for r in by["timers"] if r["system"].startswith("roomkeeper")] + asio,
                    ["arm_ns_per_op", "restart_ns_per_op", "cancel_ns_per_op", "bytes_per_timer"],
                    lambda r: "asio" in r["system"], "W2 timers against Boost.Asio"))
    print(table(by["dispatch"], ["connect_ns_per_session", "typing_restart_ns_per_op",
                                 "stop_and_unsubscribe_ns_per_session",
                                 "disconnect_ns_per_session", "bytes_per_session"],
                lambda r: r["system"].startswith("seed gateway"),
                "W3 dispatch (the whole gateway)"))


if __name__ == "__main__":
    main()
