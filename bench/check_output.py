#!/usr/bin/env python3
"""Smoke check for roomkeeper-bench output: every line is a JSON object with
workload and system, every *_left count (and every count in "left") is 0,
and the workloads asked for are all present. Exit 1 with a reason if not."""
import json
import sys

def main() -> int:
    lines = [l for l in sys.stdin.read().splitlines() if l.strip()]
    if not lines:
        print("no output"); return 1
    seen = set()
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            print(f"line {n} is not JSON: {e}: {line[:120]}"); return 1
        for key in ("workload", "system"):
            if key not in obj:
                print(f"line {n} lacks {key}"); return 1
        seen.add(obj["workload"])
        for key, value in obj.items():
            if key.endswith("_left") and value != 0:
                print(f"line {n} ({obj['system']}): {key} = {value}"); return 1
        left = obj.get("left", {})
        for key, value in left.items():
            if key == "bytes":
                continue  # bytes held is a size, not a count: reported, not required 0
            if value != 0:
                print(f"line {n} ({obj['system']}): left.{key} = {value}"); return 1
        if obj["workload"] == "cluster":
            for key in ("lost", "orphan_keys", "presence_missing"):
                if obj.get(key) != 0:
                    print(f"line {n}: cluster {key} = {obj.get(key)}"); return 1
            if obj.get("kill_to_clean_ms") is None or obj["kill_to_clean_ms"] > 10000:
                print(f"line {n}: cluster kill_to_clean_ms = {obj.get('kill_to_clean_ms')}"); return 1
        if obj["workload"] == "dispatch_threads":
            if not obj.get("day_ns_per_session", 0) > 0 or "scaling" not in obj:
                print(f"line {n}: dispatch_threads without day_ns_per_session/scaling"); return 1
            if "multi-loop" in obj["system"] and obj.get("left", {}).get("bytes") != 0:
                print(f"line {n}: multi-loop left {obj['left'].get('bytes')} bytes"); return 1
        if obj["workload"] == "ratelimit":
            want_allowed = obj.get("keys", 0) * obj.get("rounds", 0) * 6
            if obj.get("refused") != 0 or obj.get("allowed") != want_allowed or want_allowed == 0:
                print(f"line {n}: ratelimit allowed {obj.get('allowed')} of {want_allowed}, "
                      f"refused {obj.get('refused')}"); return 1
        if obj["workload"] == "timers" and "fired" in obj:
            if obj["fired"] != obj["timers"] or obj.get("early", 0) or obj.get("late", 0):
                print(f"line {n}: fired {obj['fired']} of {obj['timers']}, "
                      f"early {obj.get('early')}, late {obj.get('late')}"); return 1
    want = set(sys.argv[1:]) or {"rooms", "timers", "dispatch"}
    if not want <= seen:
        print(f"missing workloads: {sorted(want - seen)}"); return 1
    print(f"ok: {len(lines)} lines, workloads {sorted(seen)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
