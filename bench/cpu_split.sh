#!/usr/bin/env bash
# Where a replay's CPU goes: user and kernel time, and context switches, per request, of
# hyper answering by itself (`floor_proxy --answer`), of the design's replay floor
# (`floor_proxy --replay`) and of the gateway replaying one key from memory://, under
# the same wrk load, with wrk as a normal task and then under SCHED_BATCH.
#
#   ONCELY_BIN=target/release/oncely FLOOR_BIN=target/release/examples/floor_proxy \
#     bash bench/cpu_split.sh
#
# Each cell reads /proc/PID/stat (utime, stime) and every thread's
# voluntary_ctxt_switches + nonvoluntary_ctxt_switches before and after a 3 s window in
# the middle of a 6 s `wrk -t2 -c32` run, divided by the requests of that window (wrk's
# req/s times the window). wrk shares the cores with the server: each response wakes a
# wrk thread, which may preempt the server that wrote it. Under SCHED_BATCH wrk's
# threads do not preempt on wake-up, so the difference between the two halves is what
# that preemption costs the server. FLOOR_SPIN_NS (see floor_proxy.rs) adds a spin per
# request to the two floor rows. Knobs: ROUNDS=3, GATEWAY_WORKERS= (the gateway's
# `--workers`; default one per core, as the floor). Needs wrk and nginx (bench/gateway.sh
# installs both; it uses bench/lib.sh). The server logs of a failed run are kept in
# target/bench-cpu-split/<UTC time>/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ONCELY=${ONCELY_BIN:-$ROOT/target/release/oncely}
FLOOR=${FLOOR_BIN:-$ROOT/target/release/examples/floor_proxy}
ROUNDS=${ROUNDS:-3}
RESPONSE='{"id":"ch_1","amount":1999}'
BODY='{"amount":1999,"currency":"usd"}'
PIDS=()
WORK=$(mktemp -d /tmp/oncely-cpu-split.XXXXXX)
# Kept after the run (lib.sh removes $WORK), so a failed run's server logs survive.
RESULTS_DIR=$ROOT/target/bench-cpu-split/$(date -u +%Y%m%dT%H%M%SZ)
BENCH_NAME=cpu_split.sh
source "$ROOT/bench/lib.sh"
mkdir -p "$RESULTS_DIR"
command -v wrk >/dev/null || die "needs wrk (bench/gateway.sh installs it)"
TICK=$(getconf CLK_TCK)

write_replay_config
write_wrk_scripts "$BODY"

start_nginx_upstream 19380 "$RESPONSE"
"$FLOOR" 127.0.0.1:19381 --answer "$RESPONSE" >/dev/null 2>&1 & PID_ANSWER=$!; PIDS+=($!)
"$FLOOR" 127.0.0.1:19382 --replay "$RESPONSE" >/dev/null 2>&1 & PID_REPLAY=$!; PIDS+=($!)
"$ONCELY" --log-level warn serve --upstream http://127.0.0.1:19380 --listen 127.0.0.1:19383 \
    ${GATEWAY_WORKERS:+--workers "$GATEWAY_WORKERS"} --store memory:// --config "$WORK/oncely.toml" >/dev/null 2>&1 & PID_GATEWAY=$!; PIDS+=($!)
wait_port 19381 "$PID_ANSWER" hyper-answer
wait_port 19382 "$PID_REPLAY" hyper-replay
wait_port 19383 "$PID_GATEWAY" gateway
# The replayed key exists before the load starts.
for port in 19382 19383; do
    curl -s -o /dev/null -X POST -H 'Content-Type: application/json' -H 'Idempotency-Key: cpu-split' \
        -d "$BODY" "http://127.0.0.1:$port/payments"
done

# "utime stime context-switches" of a process, its threads' switches summed.
sample() {
    local stat
    stat=$(cat "/proc/$1/stat")
    read -r -a f <<<"${stat##*) }"
    echo "${f[11]} ${f[12]} $(awk '/ctxt_switches/ { s += $2 } END { print s }' /proc/"$1"/task/*/status)"
}

measure() { # label pid port sched
    local wrk=(wrk) a b t0 t1 rps
    [[ $4 == batch ]] && wrk=(chrt --batch 0 wrk)
    "${wrk[@]}" -t2 -c32 -d6s -s "$WORK/fixed_key.lua" "http://127.0.0.1:$3/payments" -- cpu-split >"$WORK/wrk.out" &
    local w=$!
    sleep 1.5
    a=$(sample "$2") t0=$(date +%s.%N)
    sleep 3
    b=$(sample "$2") t1=$(date +%s.%N)
    wait "$w"
    rps=$(awk '/Requests\/sec/ { print $2 }' "$WORK/wrk.out")
    awk -v a="$a" -v b="$b" -v t0="$t0" -v t1="$t1" -v rps="$rps" -v tick="$TICK" -v label="$1" -v sched="$4" 'BEGIN {
        split(a, x, " "); split(b, y, " "); n = rps * (t1 - t0)
        u = (y[1] - x[1]) / tick / n * 1e6; s = (y[2] - x[2]) / tick / n * 1e6
        printf "| %s | %s | %.0f | %.2f | %.2f | %.2f | %.2f |\n", label, sched, rps, u, s, u + s, (y[3] - x[3]) / n
    }'
}

echo "| server | wrk | req/s | user µs/req | kernel µs/req | total | context switches/req |"
echo "|---|---|---:|---:|---:|---:|---:|"
for sched in other batch; do
    for ((round = 1; round <= ROUNDS; round++)); do
        measure hyper-answer "$PID_ANSWER" 19381 "$sched"
        measure hyper-replay "$PID_REPLAY" 19382 "$sched"
        measure gateway "$PID_GATEWAY" 19383 "$sched"
    done
done
