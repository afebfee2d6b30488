"""What the gateway spends per request above the floor, from bench/profile_vs_floor.sh.

    python3 bench/profile_vs_floor.py RESULTS_DIR FREQ [TOP]

Reads symbols-{floor,gateway}.txt (perf report --sort sym with sample counts) and
wrk-{floor,gateway}.txt, turns each symbol's samples into µs of CPU per request
(samples / FREQ / requests in the 5 s recorded) and prints, as markdown, the groups
(kernel, hyper, tokio, http, malloc, ours, …) and the TOP symbols that differ most.
"""

import re
import sys
from pathlib import Path

RECORDED_SECONDS = 5


def requests_per_second(path):
    for line in path.read_text().splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise SystemExit(f"{path}: no Requests/sec")


def per_request(path, freq, rps):
    """{(kind, symbol): µs of CPU per request}, kind 'k' for the kernel."""
    costs = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+\[(.)\]\s+(.*)", line)
        if m:
            key = (m.group(2), m.group(3).strip()[:100])
            costs[key] = costs.get(key, 0.0) + int(m.group(1)) / freq / (rps * RECORDED_SECONDS) * 1e6
    return costs


def group(key):
    kind, symbol = key
    if kind == "k":
        return "kernel"
    if symbol.startswith(("mi_", "_mi_")) or "malloc" in symbol or symbol in ("free", "cfree"):
        return "allocator"
    if "memmove" in symbol or "memcpy" in symbol or "memset" in symbol:
        return "mem*"
    for name in ("oncely", "hyper", "tokio", "tracing", "metrics", "bytes"):
        if name in symbol:
            return "ours" if name == "oncely" else name
    if symbol.startswith(("http::", "<http::")):
        return "http"
    return "other"


def main():
    out, freq = Path(sys.argv[1]), int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    rps = {name: requests_per_second(out / f"wrk-{name}.txt") for name in ("floor", "gateway")}
    floor = per_request(out / "symbols-floor.txt", freq, rps["floor"])
    gateway = per_request(out / "symbols-gateway.txt", freq, rps["gateway"])
    keys = set(floor) | set(gateway)
    print(f"floor {rps['floor']:,.0f} req/s, gateway {rps['gateway']:,.0f} req/s (µs of CPU per request)\n")
    print("| group | floor | gateway | gateway − floor |\n|---|---:|---:|---:|")
    groups = {}
    for key in keys:
        g = groups.setdefault(group(key), [0.0, 0.0])
        g[0] += floor.get(key, 0.0)
        g[1] += gateway.get(key, 0.0)
    for name, (f, g) in sorted(groups.items(), key=lambda item: item[1][0] - item[1][1]):
        print(f"| {name} | {f:.2f} | {g:.2f} | {g - f:+.2f} |")
    total_f, total_g = sum(floor.values()), sum(gateway.values())
    print(f"| **total** | {total_f:.2f} | {total_g:.2f} | {total_g - total_f:+.2f} |\n")
    print(f"The {top} symbols the gateway spends most above the floor:\n")
    print("| gateway − floor | floor | gateway | symbol |\n|---:|---:|---:|---|")
    for key in sorted(keys, key=lambda k: floor.get(k, 0.0) - gateway.get(k, 0.0))[:top]:
        f, g = floor.get(key, 0.0), gateway.get(key, 0.0)
        print(f"| {g - f:+.3f} | {f:.3f} | {g:.3f} | `{key[1]}` |")


if __name__ == "__main__":
    main()
