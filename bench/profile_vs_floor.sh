#!/usr/bin/env bash
# What the gateway spends per request above the floor of its design, symbol by symbol:
# `perf record` of the gateway and of the floor (examples/floor_proxy.rs: the same HTTP
# stack doing nothing else) under the same wrk load, one after the other, each sample
# turned into µs of CPU per request (samples ÷ frequency ÷ requests), then grouped
# (kernel, hyper, tokio, http, malloc, ours, …) and diffed by bench/profile_vs_floor.py.
#
#   ONCELY_BIN=target/release/oncely FLOOR_BIN=target/release/examples/floor_proxy \
#     bash bench/profile_vs_floor.sh pass-through|new-keys|new-key-floor|replays|answers
#
# pass-through and new keys are compared with the floor forwarding, new-key-floor is new
# keys compared with the design's new-key floor (`--new-key`: the fingerprint, the
# storage key, a claim and a completion in a map, the forwarding), replays with the
# floor replaying (`--replay`: the fingerprint, the storage key, a map look-up, and the
# stored answer, the work this design requires of a replay), answers with the floor
# answering by itself (`--answer`) and the gateway replaying. The gateway runs on memory://, --log-level warn.
# Needs perf, wrk and nginx (bench/gateway.sh installs the last two). Knobs: DURATION=7
# (seconds of wrk; perf records 5 of them), FREQ=1999, THREADS=2, CONNECTIONS=32.
set -euo pipefail
MODE=${1:?"usage: profile_vs_floor.sh pass-through|new-keys|new-key-floor|replays|answers"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ONCELY=${ONCELY_BIN:-$ROOT/target/release/oncely}
FLOOR=${FLOOR_BIN:-$ROOT/target/release/examples/floor_proxy}
DURATION=${DURATION:-7} FREQ=${FREQ:-1999} THREADS=${THREADS:-2} CONNECTIONS=${CONNECTIONS:-32}
RESPONSE='{"id":"ch_1","amount":1999}'
BODY='{"amount":1999,"currency":"usd"}'
KEY=profile-replay # the replayed key; new keys are KEY-tN-n
OUT=${RESULTS_DIR:-$ROOT/target/profile-vs-floor/$MODE-$(date -u +%Y%m%dT%H%M%SZ)}
PIDS=()
WORK=$(mktemp -d /tmp/oncely-profile.XXXXXX)
RESULTS_DIR=$OUT
BENCH_NAME=profile_vs_floor.sh
source "$ROOT/bench/lib.sh"
mkdir -p "$OUT"
for tool in perf wrk; do
    command -v "$tool" >/dev/null || die "needs $tool"
done

write_replay_config
write_wrk_scripts "$BODY"
# /plain is not covered by the layer: a pass-through.
write_pass_through "$BODY"

start_nginx_upstream 19280 "$RESPONSE"
case $MODE in
    pass-through) SCRIPT=plain.lua; PATH_=/plain; FLOOR_ARGS=(127.0.0.1:19280) ;;
    new-keys) SCRIPT=new_keys.lua; PATH_=/payments; FLOOR_ARGS=(127.0.0.1:19280) ;;
    new-key-floor) SCRIPT=new_keys.lua; PATH_=/payments; FLOOR_ARGS=(--new-key 127.0.0.1:19280) ;;
    replays) SCRIPT=fixed_key.lua; PATH_=/payments; FLOOR_ARGS=(--replay "$RESPONSE") ;;
    answers) SCRIPT=fixed_key.lua; PATH_=/payments; FLOOR_ARGS=(--answer "$RESPONSE") ;;
    *) die "unknown mode $MODE" ;;
esac
"$FLOOR" 127.0.0.1:19281 "${FLOOR_ARGS[@]}" >"$WORK/floor.log" 2>&1 & PID_FLOOR=$!; PIDS+=($PID_FLOOR)
"$ONCELY" --log-level warn serve --upstream http://127.0.0.1:19280 --listen 127.0.0.1:19282 \
    --store memory:// --config "$WORK/oncely.toml" >"$WORK/gateway.log" 2>&1 & PID_GATEWAY=$!; PIDS+=($PID_GATEWAY)
wait_port 19281 "$PID_FLOOR" floor
wait_port 19282 "$PID_GATEWAY" gateway
# The replayed key exists before the load starts.
curl -s -o /dev/null -X POST -H 'Content-Type: application/json' -H "Idempotency-Key: $KEY" \
    -d "$BODY" "http://127.0.0.1:19282/payments"

profile() { # name pid port
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" -s "$WORK/$SCRIPT" "http://127.0.0.1:$3$PATH_" -- "$KEY" >"$OUT/wrk-$1.txt" &
    local wrk=$!
    sleep 1
    perf record -F "$FREQ" -p "$2" -o "$OUT/perf-$1.data" -- sleep 5 >/dev/null 2>&1
    wait "$wrk"
    perf report -i "$OUT/perf-$1.data" --no-children --sort sym -F overhead,sample,sym 2>/dev/null >"$OUT/symbols-$1.txt"
}
profile floor "$PID_FLOOR" 19281
profile gateway "$PID_GATEWAY" 19282
python3 "$ROOT/bench/profile_vs_floor.py" "$OUT" "$FREQ" | tee "$OUT/summary.md"
echo "results: $OUT"
