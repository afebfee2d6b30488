#!/usr/bin/env python3
"""What each of issue 13's throughput goals would need of the proxy, from one run of
bench/gateway.sh.

usage: python3 bench/goal_budget.py target/bench-gateway/<run>/summary.md [CPUS]

Every process of a row shares the same CPUS (default: this machine's count): wrk, the
nginx upstream, the proxy under test and, on the Redis rows, redis-server. A row's
throughput is therefore bounded by the CPU that one request costs the whole box:

    req/s <= CPUS * 1e6 / (proxy CPU per request + CPU per request of everything else)

"Everything else" is taken from the row itself: the box's busy time per request (the
"box busy" column times CPUS over req/s) minus the proxy's own CPU per request. A goal
of `ratio` times the nginx hop's req/s then needs, even with the box 100% busy,

    proxy CPU per request <= CPUS * 1e6 / (ratio * hop req/s) - everything else

which the table prints ("the proxy may spend") beside what the proxy spent and what the
floor of this design spent in the same run (hyper-floor: the gateway's HTTP stack forwarding as is;
hyper-replay: the same stack doing only the work this design requires of a replay, a
replay's floor; runs made before that row existed fall back to hyper-answer, the stack
answering by itself; hyper-newkey: the same for a new key on the memory store, falling
back to hyper-floor). A goal whose allowed
CPU is below the floor's cannot be met by this HTTP stack on this machine, whatever the
gateway does besides. The bound is optimistic for the goal: "everything else" shrinks a
little as throughput rises (wrk and nginx batch more per wake-up), and the box is never
quite 100% busy. So the table also prints the most generous bound ("… with the hop's
everything else"): the same, with everything else costing no more than it costs behind
the nginx hop (replays, which never reach the upstream, keep their own, lower figure). On the Redis rows that leaves redis-server's own CPU
out, so only the first bound applies there.

Where a floor row's own ratio was measured, that ratio is the better test. With wrk on
the same cores, "everything else" is not a fixed cost: a server that spends more per
request is preempted more often by wrk's wake-ups, and wrk and the kernel spend more per
request too (bench/cpu_split.sh). The budgets printed here are pessimistic for that
reason: in one run the replay floor reached 1.70x the hop although its CPU per request
was above the replays budget this script printed.
"""

import os
import sys

GOALS = [
    # (goal, row, ratio to the hop, the floor row)
    ("pass-through", ("gateway-memory", "pass-through"), 0.9, ("hyper-floor", "new-keys")),
    ("memory, new keys", ("gateway-memory", "new-keys"), 0.8, ("hyper-newkey", "new-keys")),
    ("memory, replays", ("gateway-memory", "replays"), 1.5, ("hyper-replay", "replays")),
    ("SQLite, new keys", ("gateway-sqlite", "new-keys"), 0.6, ("hyper-floor", "new-keys")),
    ("SQLite, replays (its defaults)", ("gateway-sqlite", "replays"), 1.5, ("hyper-replay", "replays")),
    ("SQLite, replays, no replay cache", ("gateway-sqlite-nocache", "replays"), 1.5, ("hyper-replay", "replays")),
    ("Redis, new keys", ("gateway-redis", "new-keys"), 0.5, ("hyper-floor", "new-keys")),
    ("Redis, replays, replay cache", ("gateway-redis", "replays"), 1.5, ("hyper-replay", "replays")),
    ("(hyper-floor itself, at the pass-through goal)", ("hyper-floor", "new-keys"), 0.9, None),
    ("(hyper-newkey itself, at the memory new-keys goal)", ("hyper-newkey", "new-keys"), 0.8, None),
]


def rows_of(summary):
    """The main table of a summary.md: (target, mode) -> req/s, proxy CPU, box µs."""
    rows = {}
    cpus = CPUS
    with open(summary, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.split("|")]
            if len(cells) < 13 or not cells[3].replace(".", "").isdigit():
                continue
            rps = float(cells[3])
            proxy = float(cells[9]) if cells[9] != "-" else 0.0
            busy = float(cells[11].rstrip("%")) / 100
            box = busy * cpus * 1e6 / rps
            rows[(cells[1], cells[2])] = {"rps": rps, "proxy": proxy, "others": box - proxy}
    return rows


def main():
    rows = rows_of(sys.argv[1])
    hop = rows.get(("nginx-hop", "new-keys"))
    if hop is None:
        sys.exit(f"{sys.argv[1]}: no nginx-hop row")
    print(f"CPU budget per goal ({CPUS} CPUs; nginx hop {hop['rps']:.0f} req/s; µs of CPU per request):")
    print()
    print(
        "| goal | measured | everything else | the proxy may spend | … with the hop's everything else "
        "| the proxy spent | the floor spent |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for goal, row, ratio, floor in GOALS:
        r = rows.get(row)
        if r is None:
            continue
        budget = CPUS * 1e6 / (ratio * hop["rps"])
        allowed = budget - r["others"]
        generous = budget - min(r["others"], hop["others"])
        f = rows.get(floor) if floor else None
        if f is None and floor == ("hyper-replay", "replays"):
            f = rows.get(("hyper-answer", "replays"))
        if f is None and floor == ("hyper-newkey", "new-keys"):
            f = rows.get(("hyper-floor", "new-keys"))
        floor_cpu = f"{f['proxy']:.1f}" if f else ""
        print(
            f"| {goal} ≥ {ratio}× | {r['rps'] / hop['rps']:.2f}× | {r['others']:.1f} | **{allowed:.1f}** "
            f"| {generous:.1f} | {r['proxy']:.1f} | {floor_cpu} |"
        )


CPUS = int(sys.argv[2]) if len(sys.argv) > 2 else (os.cpu_count() or 1)

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main()
