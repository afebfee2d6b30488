#!/usr/bin/env bash
# Two gateway builds against each other, A (the baseline) and B, on one load, in many
# short alternating rounds: for changes of a few per cent, which bench/gateway.sh's three
# rounds per row cannot resolve on a shared two-core box (its rows move by 10–20% between
# runs). Both gateways run side by side on memory:// (bounds raised), --log-level warn,
# in front of one nginx upstream; each round runs `wrk` against A and then B (the order swapped every
# other round, so that neither always runs second), and reads each gateway's CPU time
# (utime + stime from /proc/PID/stat) around its run. What it reports: per round, each
# build's req/s and µs of CPU per request, and B's CPU per request over A's in the same
# round; then the medians. A ratio from two runs a few seconds apart cancels most of the
# box's drift (the other tenants, the frequency), which a ratio of two medians taken
# minutes apart does not.
#
#   BASELINE=/path/to/oncely-A ONCELY_BIN=/path/to/oncely-B bash bench/ab.sh new-keys|replays|pass-through
#
# Knobs: ROUNDS=8, DURATION=5 (seconds of wrk per build and round), THREADS=2,
# CONNECTIONS=32. Needs wrk and nginx (installed when missing). Quiet machine only.
set -euo pipefail
MODE=${1:?"usage: ab.sh new-keys|replays|pass-through"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
A_BIN=${BASELINE:?"BASELINE names build A, the baseline"}
B_BIN=${ONCELY_BIN:-$ROOT/target/release/oncely}
ROUNDS=${ROUNDS:-8} DURATION=${DURATION:-5} THREADS=${THREADS:-2} CONNECTIONS=${CONNECTIONS:-32}
RESPONSE='{"id":"ch_1","amount":1999}'
BODY='{"amount":1999,"currency":"usd"}'
KEY=ab-replay # the replayed key; new keys are KEY-rN-tN-n
case $MODE in
    new-keys | replays | pass-through) ;;
    *) echo "ab.sh: unknown mode $MODE (new-keys, replays or pass-through)" >&2; exit 2 ;;
esac
PIDS=()
WORK=$(mktemp -d /tmp/oncely-ab.XXXXXX)
RESULTS_DIR=$ROOT/target/bench-ab/$MODE-$(date -u +%Y%m%dT%H%M%SZ)
BENCH_NAME=ab.sh
source "$ROOT/bench/lib.sh"
mkdir -p "$RESULTS_DIR" "$WORK/logs"
command -v wrk >/dev/null || install_packages wrk
command -v nginx >/dev/null || install_packages nginx-light

write_replay_config
write_wrk_scripts "$BODY"
write_pass_through "$BODY"
# wrk's script, path and argument in round $1: new keys take a prefix of their own each
# round (and build), so that no key repeats; replays all take the key made at start.
load() {
    case $MODE in
        new-keys) echo "new_keys.lua /payments $KEY-r$1" ;;
        replays) echo "fixed_key.lua /payments $KEY" ;;
        pass-through) echo "plain.lua /plain -" ;;
    esac
}

# Bounds well above what the rounds create (the defaults, a million records, would
# refuse new keys with 503 after a few rounds).
STORE="memory://?max_entries=100000000&max_bytes=16GiB"
start_nginx_upstream 19380 "$RESPONSE"
start_gateway() { # binary port
    "$1" --log-level warn serve --upstream http://127.0.0.1:19380 --listen "127.0.0.1:$2" \
        --store "$STORE" --config "$WORK/oncely.toml" >"$WORK/logs/gateway-$2.log" 2>&1 &
    PIDS+=($!)
    wait_port "$2" "$!" "gateway on $2"
    # The replayed key exists before the load starts.
    curl -s -o /dev/null -X POST -H 'Content-Type: application/json' -H "Idempotency-Key: $KEY" \
        -d "$BODY" "http://127.0.0.1:$2/payments"
}
start_gateway "$A_BIN" 19381
PID_A=${PIDS[-1]}
start_gateway "$B_BIN" 19382
PID_B=${PIDS[-1]}

ticks() { # pid: utime + stime, in clock ticks
    local f
    read -r -a f <"/proc/$1/stat"
    echo $((f[13] + f[14]))
}
HZ=$(getconf CLK_TCK)
run() { # name pid port round: prints "req/s µs-of-CPU-per-request"
    local before after line requests script path arg
    read -r script path arg < <(load "$4")
    before=$(ticks "$2")
    line=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" -s "$WORK/$script" "http://127.0.0.1:$3$path" \
        -- "$arg" | tee "$RESULTS_DIR/wrk-$1.r$4.txt" | grep '^RESULT')
    after=$(ticks "$2")
    requests=$(field requests "$line")
    # A refused request costs far less than an answered one: a round with any is no
    # measure of the path under test.
    [[ $(field non2xx "$line") == 0 && $(field errors "$line") == 0 ]] || die "$1, round $4: errors: $line"
    awk -v r="$(field rps "$line")" -v t=$((after - before)) -v n="$requests" -v hz="$HZ" \
        'BEGIN { printf "%.0f %.2f\n", r, t / hz / n * 1e6 }'
}

# A warm-up each: the first seconds of a process are not its steady state.
run warmup-a "$PID_A" 19381 0 >/dev/null
run warmup-b "$PID_B" 19382 0 >/dev/null
{
    echo "## A/B: $MODE, $ROUNDS rounds of \`wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s\` each"
    echo
    echo "- A (baseline): \`$A_BIN\`; B: \`$B_BIN\`; $STORE, --log-level warn, one nginx upstream"
    echo "- machine: $(nproc) CPUs ($(lscpu | sed -n 's/^Model name: *//p' | head -1)), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo
    echo "| round | A req/s | B req/s | A µs CPU/req | B µs CPU/req | B/A CPU per request |"
    echo "|---|---:|---:|---:|---:|---:|"
} >"$RESULTS_DIR/summary.md"
RATIOS=() A_CPU=() B_CPU=() A_RPS=() B_RPS=()
for round in $(seq 1 "$ROUNDS"); do
    if ((round % 2)); then
        a=$(run a "$PID_A" 19381 "$round") && b=$(run b "$PID_B" 19382 "$round") || exit 1
    else
        b=$(run b "$PID_B" 19382 "$round") && a=$(run a "$PID_A" 19381 "$round") || exit 1
    fi
    read -r a_rps a_cpu <<<"$a"
    read -r b_rps b_cpu <<<"$b"
    ratio=$(awk -v a="$a_cpu" -v b="$b_cpu" 'BEGIN { printf "%.3f", b / a }')
    log "round $round: A $a_rps req/s, $a_cpu µs/req; B $b_rps req/s, $b_cpu µs/req; B/A $ratio"
    echo "| $round | $a_rps | $b_rps | $a_cpu | $b_cpu | $ratio |" >>"$RESULTS_DIR/summary.md"
    RATIOS+=("$ratio") A_CPU+=("$a_cpu") B_CPU+=("$b_cpu") A_RPS+=("$a_rps") B_RPS+=("$b_rps")
done
{
    echo "| **median** | $(echo "${A_RPS[*]}" | median) | $(echo "${B_RPS[*]}" | median) | $(echo "${A_CPU[*]}" | median) | $(echo "${B_CPU[*]}" | median) | **$(echo "${RATIOS[*]}" | median)** |"
    echo
    echo "B/A per round ranged $(echo "${RATIOS[*]}" | tr ' ' '\n' | sort -g | sed -n '1p;$p' | paste -sd ' ' | sed 's/ / to /'); below 1 B spends less CPU per request."
} >>"$RESULTS_DIR/summary.md"
cat "$RESULTS_DIR/summary.md"
echo "results: $RESULTS_DIR"
