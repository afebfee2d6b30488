#!/usr/bin/env bash
# Where a SQLite replay's look-up should run: on the store's reader threads (the default,
# `sqlite://…?look_ups=threads`) or on the request's own thread (`?look_ups=inline`,
# `SqliteOptions::inline_look_ups`). One gateway binary, two gateways, each on its own
# file, replaying one completed key (the replay cache off, SQLite's default); ROUNDS
# rounds alternate the two at each concurrency of CONNECTIONS (wrk -t2, or -t1 for one
# connection; the one measured first swaps every round), and print req/s and the
# gateway's CPU per replay (its utime + stime from /proc, over the wrk run) for each,
# then the medians. wrk shares the cores with the gateways, as in bench/gateway.sh.
#
#   ONCELY_BIN=target/release/oncely bash bench/sqlite_look_ups.sh
#
# Without ONCELY_BIN the release gateway is built first. Knobs: CONNECTIONS="1 4 8 32"
# ROUNDS=3 DURATION=5s. Installs wrk, nginx and curl when missing (apt-get; it uses
# bench/lib.sh). Quiet machine only. Logs of a failed run are kept in
# target/bench-look-ups/<timestamp>/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ONCELY=${ONCELY_BIN:-}
CONNECTIONS=${CONNECTIONS:-1 4 8 32}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
RESPONSE='{"id":"ch_1","amount":1999}'
BODY='{"amount":1999,"currency":"usd"}'
PIDS=()
WORK=$(mktemp -d /tmp/oncely-look-ups.XXXXXX)
RESULTS_DIR=$ROOT/target/bench-look-ups/$(date -u +%Y%m%dT%H%M%SZ)
BENCH_NAME=sqlite_look_ups.sh
source "$ROOT/bench/lib.sh"
mkdir -p "$RESULTS_DIR" "$WORK/logs"
command -v wrk >/dev/null || install_packages wrk
command -v nginx >/dev/null || install_packages nginx-light
command -v curl >/dev/null || install_packages curl
if [[ -z $ONCELY ]]; then
    log "building the release gateway"
    (cd "$ROOT" && cargo build --release --locked -p oncely-gateway --bin oncely) || die "the build failed"
    ONCELY=$ROOT/target/release/oncely
fi
[[ -x $ONCELY ]] || die "no gateway binary at $ONCELY"
TICK=$(getconf CLK_TCK)

write_replay_config
write_wrk_scripts "$BODY"
start_nginx_upstream 19680 "$RESPONSE"

declare -A PORT PID
port=19681
for mode in threads inline; do
    "$ONCELY" --log-level warn serve --upstream http://127.0.0.1:19680 --listen "127.0.0.1:$port" \
        --store "sqlite://$WORK/$mode.db?look_ups=$mode" --config "$WORK/oncely.toml" >"$WORK/logs/$mode.log" 2>&1 &
    PIDS+=($!)
    PORT[$mode]=$port PID[$mode]=$!
    wait_port "$port" "$!" "gateway ($mode)"
    # The key every replay asks for, completed once.
    curl -fsS -o /dev/null -X POST -H 'Content-Type: application/json' -H 'Idempotency-Key: look-ups' \
        -d "$BODY" "http://127.0.0.1:$port/payments" || die "the first request to the $mode gateway failed"
    port=$((port + 1))
done

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

declare -A RPS CPU
for c in $CONNECTIONS; do
    threads=$((c < 2 ? 1 : 2))
    for mode in threads inline; do
        wrk -t"$threads" -c"$c" -d2s -s "$WORK/fixed_key.lua" "http://127.0.0.1:${PORT[$mode]}/payments" -- look-ups >/dev/null
    done
    for ((round = 1; round <= ROUNDS; round++)); do
        order="threads inline"
        ((round % 2 == 0)) && order="inline threads"
        for mode in $order; do
            t0=$(ticks "${PID[$mode]}")
            line=$(wrk -t"$threads" -c"$c" -d"$DURATION" -s "$WORK/fixed_key.lua" \
                "http://127.0.0.1:${PORT[$mode]}/payments" -- look-ups | grep '^RESULT ') || die "wrk failed"
            t1=$(ticks "${PID[$mode]}")
            [[ $(field non2xx "$line") == 0 && $(field errors "$line") == 0 ]] || die "errors: $line"
            rps=$(field rps "$line")
            cpu=$(awk -v t=$((t1 - t0)) -v n="$(field requests "$line")" -v hz="$TICK" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
            log "c=$c round $round $mode: $rps req/s, $cpu µs of CPU per replay"
            RPS[$c/$mode]+="$rps " CPU[$c/$mode]+="$cpu "
        done
    done
done

{
    echo "| connections | look-ups | req/s (median) | µs of CPU per replay (median) | inline / threads, req/s | inline / threads, CPU |"
    echo "|---:|---|---:|---:|---:|---:|"
    for c in $CONNECTIONS; do
        rt=$(median <<<"${RPS[$c/threads]}") ri=$(median <<<"${RPS[$c/inline]}")
        ct=$(median <<<"${CPU[$c/threads]}") ci=$(median <<<"${CPU[$c/inline]}")
        echo "| $c | threads | $rt | $ct | | |"
        awk -v c="$c" -v ri="$ri" -v ci="$ci" -v rt="$rt" -v ct="$ct" \
            'BEGIN { printf "| %s | inline | %s | %s | %.2f× | %.2f× |\n", c, ri, ci, ri / rt, ci / ct }'
    done
} | tee "$RESULTS_DIR/summary.md"
