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


def find(rows, pred):
    return next((r for r in rows if pred(r)), None)


def targets(by):
    """The targets of the benchmark issue, checked against this run."""
    rk = lambda w, ids="string", S=None, name="": (lambda r: r["system"].startswith("roomkeeper")
                                                   and name in r["system"]
                                                   and r.get("session_ids", "string") == ids
                                                   and (S is None or r.get("sessions") == S))
    sio = find(by["rooms"], lambda r: r["system"].startswith("socket.io"))
    node = find(by["timers"], lambda r: "setTimeout" in r["system"])
    asio = find(by["timers"], lambda r: "asio" in r["system"])
    seed = find(by["dispatch"], lambda r: r["system"].startswith("seed gateway"))
    w1 = find(by["rooms"], rk("rooms"))
    w1h = find(by["rooms"], rk("rooms", "handle"))
    w2 = find(by["timers"], rk("timers"))
    w3 = find(by["dispatch"], rk("dispatch", "string", 20000, "Keeper"))
    w3h = find(by["dispatch"], rk("dispatch", "handle", 20000, "Keeper"))
    w3big = find(by["dispatch"], rk("dispatch", "string", 200000, "Keeper"))
    w3bigh = find(by["dispatch"], rk("dispatch", "handle", 200000, "Keeper"))
    out = ["### Targets of the benchmark issue, this run", "",
           "| target | measured (ids; handles) | met |", "|---|---|---|"]

    def ratio(peer, mine, key):
        if not peer or not mine or not mine.get(key) or not peer.get(key):
            return None
        return peer[key] / mine[key]

    def row(text, want, a, b=None, unit="×", less=False):
        if a is None:
            out.append(f"| {text} | – | – |")
            return
        shown = f"{a:,.1f}{unit}" + (f"; {b:,.1f}{unit}" if b is not None else "")
        best = a if b is None else (min(a, b) if less else max(a, b))
        ok = best <= want if less else best >= want
        out.append(f"| {text} | {shown} | {'yes' if ok else '**no**'} |")

    row("W1 join ≥ 20× socket.io", 20, ratio(sio, w1, "join_ns_per_op"), ratio(sio, w1h, "join_ns_per_op"))
    row("W1 disconnect ≥ 20× socket.io", 20, ratio(sio, w1, "disconnect_ns_per_session"),
        ratio(sio, w1h, "disconnect_ns_per_session"))
    row("W1 bytes per membership ≤ 1/3 of socket.io's (≥ 3×)", 3,
        ratio(sio, w1, "bytes_per_membership"))
    row("W2 restart ≥ 15× Node", 15, ratio(node, w2, "restart_ns_per_op"))
    row("W2 restart ≥ 20× Boost.Asio", 20, ratio(asio, w2, "restart_ns_per_op"))
    row("W2 bytes per timer ≤ 32", 32, w2 and w2["bytes_per_timer"], unit=" B", less=True)
    row("W2 restart in random order ≤ 15 ns", 15, w2 and w2.get("restart_random_ns_per_op"),
        unit=" ns", less=True)
    row("W2 restart in random order ≥ 25× Node", 25, ratio(node, w2, "restart_random_ns_per_op"))
    row("W3 connect ≥ 20× seed gateway", 20, ratio(seed, w3, "connect_ns_per_session"),
        ratio(seed, w3h, "connect_ns_per_session"))
    row("W3 typing restart ≥ 20× seed gateway", 20, ratio(seed, w3, "typing_restart_ns_per_op"),
        ratio(seed, w3h, "typing_restart_ns_per_op"))
    row("W3 disconnect ≥ 100× seed gateway", 100, ratio(seed, w3, "disconnect_ns_per_session"),
        ratio(seed, w3h, "disconnect_ns_per_session"))
    row("W3 bytes per session ≤ 1/5 of the seed's (≥ 5×)", 5, ratio(seed, w3, "bytes_per_session"))
    grow = (w3big["disconnect_ns_per_session"] / w3["disconnect_ns_per_session"]
            if w3big and w3 else None)
    growh = (w3bigh["disconnect_ns_per_session"] / w3h["disconnect_ns_per_session"]
             if w3bigh and w3h else None)
    row("W3 disconnect at 200,000 within 1.5× of 20,000", 1.5, grow, growh, unit="×", less=True)
    return "\n".join(out) + "\n"


def main():
    rows = load(sys.argv[1])
    by = {"rooms": [], "timers": [], "dispatch": []}
    for r in rows:
        if kind(r) in by:  # dispatch_threads and cluster lines have tables of their own
            by[kind(r)].append(r)
    print(table(by["rooms"], ["join_ns_per_op", "fanout_ns_per_member", "leave_ns_per_op",
                              "disconnect_ns_per_session", "bytes_per_membership"],
                lambda r: r["system"].startswith("socket.io"), "W1 rooms (membership index)"))
    print(table(by["timers"], ["arm_ns_per_op", "restart_ns_per_op", "restart_random_ns_per_op",
                               "cancel_ns_per_op",
                               "bytes_per_timer", "fire_ns_per_timer"],
                lambda r: "setTimeout" in r["system"], "W2 timers"))
    asio = [r for r in by["timers"] if "asio" in r["system"]]
    if asio:
        print(table([r for r in by["timers"] if r["system"].startswith("roomkeeper")] + asio,
                    ["arm_ns_per_op", "restart_ns_per_op", "restart_random_ns_per_op",
                     "cancel_ns_per_op", "bytes_per_timer"],
                    lambda r: "asio" in r["system"], "W2 timers against Boost.Asio"))
    print(table(by["dispatch"], ["connect_ns_per_session", "typing_restart_ns_per_op",
                                 "stop_and_unsubscribe_ns_per_session",
                                 "disconnect_ns_per_session", "bytes_per_session"],
                lambda r: r["system"].startswith("seed gateway"),
                "W3 dispatch (the whole gateway)"))
    print(targets(by))


if __name__ == "__main__":
    main()
