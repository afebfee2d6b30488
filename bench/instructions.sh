#!/usr/bin/env bash
# The instructions a replay costs, counted, not timed: the gateway replaying one key from
# memory://, and the design's replay floor (`floor_proxy --replay`), each run under
# valgrind's callgrind while a client on one keep-alive connection sends SHORT and then
# LONG replays of the key. (LONG - SHORT) requests' worth of instructions, divided by
# their number, is what one replay costs in user space, start-up and shutdown cancelled
# out. Unlike time on a shared, noisy two-core box, the count varies by well under 1%
# between runs, so a change that saves a few hundred instructions a replay shows. What it
# does not show: cache misses, contention between cores, and the kernel (see
# bench/cpu_split.sh for those).
#
#   ONCELY_BIN=target/release/oncely FLOOR_BIN=target/release/examples/floor_proxy \
#     bash bench/instructions.sh [BASELINE_BIN]
#
# With BASELINE_BIN, a second gateway binary is counted the same way, and callgrind's
# per-function counts of the two are kept in the results directory
# (`callgrind_annotate` them, or diff the `*.top` files). Knobs: SHORT=200, LONG=2200,
# KEYS=new (a new key per request instead of replays: the gateway forwards each to an
# nginx upstream, which is not counted; the floor rows are then hyper-floor forwarding
# and hyper-newkey, `floor_proxy --new-key`: the design's own work for a new key), or
# KEYS=none (no key: the gateway's pass-through against hyper-floor forwarding), and
# LOG_LEVEL=warn (the gateways' --log-level; `info`, the default of `oncely serve`, writes
# an access-log line per request, so the difference between two runs is what that costs),
# and STORE=memory:// (or sqlite://, on a fresh file in the work directory for each count,
# with STORE_OPTIONS such as `look_ups=inline` after its `?`; the floor rows stay as they
# are). Under callgrind the threads run one at a time, so a SQLite count includes the
# writer and reader threads' instructions but none of what handing work between threads
# costs on real cores.
# Needs valgrind (installed when missing) and python3.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ONCELY=${ONCELY_BIN:-$ROOT/target/release/oncely}
FLOOR=${FLOOR_BIN:-$ROOT/target/release/examples/floor_proxy}
BASELINE=${1:-}
SHORT=${SHORT:-200}
LONG=${LONG:-2200}
KEYS=${KEYS:-replays}
LOG_LEVEL=${LOG_LEVEL:-warn}
RESPONSE='{"id":"ch_1","amount":1999}'
BODY='{"amount":1999,"currency":"usd"}'
PIDS=()
WORK=$(mktemp -d /tmp/oncely-instructions.XXXXXX)
RESULTS_DIR=$ROOT/target/bench-instructions/$(date -u +%Y%m%dT%H%M%SZ)
BENCH_NAME=instructions.sh
source "$ROOT/bench/lib.sh"
[[ $KEYS == replays || $KEYS == new || $KEYS == none ]] || die "KEYS is replays, new or none"
mkdir -p "$RESULTS_DIR" "$WORK/logs"
command -v valgrind >/dev/null || install_packages valgrind
command -v nginx >/dev/null || install_packages nginx-light

write_replay_config
if [[ $KEYS == none ]]; then
    # POST /plain is not covered (only PATCH is): the gateway passes it through untouched.
    cat >>"$WORK/oncely.toml" <<'TOML'

[[routes]]
path = "/plain"
methods = ["PATCH"]
TOML
fi

# Sends N replays of one key on one connection (the first request stores it), or N + 1
# requests with a new key each, or N + 1 with no key.
cat >"$WORK/client.py" <<'PY'
import http.client, sys, uuid
port, n, body, keys = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
conn = http.client.HTTPConnection("127.0.0.1", port)
run = uuid.uuid4().hex
for i in range(n + 1):
    headers = {"Content-Type": "application/json"}
    if keys != "none":
        headers["Idempotency-Key"] = f"instructions-{run}-{i}" if keys == "new" else "instructions"
    conn.request("POST", "/plain" if keys == "none" else "/payments", body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    replayed = response.getheader("Idempotent-Replayed") == "true"
    if response.status != 201 or replayed != (keys == "replays" and i > 0):
        sys.exit(f"request {i}: status {response.status}, replayed {replayed}")
PY

start_nginx_upstream 19480 "$RESPONSE"

# Total instructions of one run of `name` (command after the name) serving N requests.
count() { # name requests command...
    local name=$1 requests=$2 out="$WORK/$1-$2.callgrind"
    shift 2
    # Each count starts from an empty store (a SQLite file would keep the last one's key).
    rm -f "$WORK"/count.db*
    valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >"$WORK/logs/$name-$requests.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port 19481 "$pid" "$name" 120
    python3 "$WORK/client.py" 19481 "$requests" "$BODY" "$KEYS"
    kill -TERM "$pid"
    wait "$pid" || true
    [[ -s $out ]] || die "$name: callgrind wrote nothing; see $WORK/logs"
    awk '/^summary:/ { print $2 }' "$out"
}

per_request() { # name command...
    local name=$1 short long
    shift
    short=$(count "$name" "$SHORT" "$@")
    long=$(count "$name" "$LONG" "$@")
    cp "$WORK/$name-$LONG.callgrind" "$RESULTS_DIR/"
    callgrind_annotate --inclusive=no "$RESULTS_DIR/$name-$LONG.callgrind" 2>/dev/null | head -60 >"$RESULTS_DIR/$name.top" || true
    awk -v s="$short" -v l="$long" -v n=$((LONG - SHORT)) -v name="$name" \
        'BEGIN { printf "| %s | %d | %d | %.0f |\n", name, s, l, (l - s) / n }'
}

STORE=${STORE:-memory://}
case $STORE in
    memory://) ;;
    sqlite://) STORE="sqlite://$WORK/count.db${STORE_OPTIONS:+?$STORE_OPTIONS}" ;;
    *) die "STORE is memory:// or sqlite://" ;;
esac
GATEWAY_ARGS=(--log-level "$LOG_LEVEL" serve --upstream http://127.0.0.1:19480 --listen 127.0.0.1:19481
    --store "$STORE" --config "$WORK/oncely.toml")

log "counting; results in $RESULTS_DIR"
{
    echo "| server ($KEYS, log level $LOG_LEVEL) | instructions, $SHORT requests | instructions, $LONG requests | instructions per request |"
    echo "|---|---:|---:|---:|"
    if [[ $KEYS == replays ]]; then
        per_request hyper-replay "$FLOOR" 127.0.0.1:19481 --replay "$RESPONSE"
    else
        per_request hyper-floor "$FLOOR" 127.0.0.1:19481 127.0.0.1:19480
    fi
    if [[ $KEYS == new ]]; then
        per_request hyper-newkey "$FLOOR" 127.0.0.1:19481 --new-key 127.0.0.1:19480
    fi
    per_request gateway "$ONCELY" "${GATEWAY_ARGS[@]}"
    if [[ -n $BASELINE ]]; then
        per_request baseline "$BASELINE" "${GATEWAY_ARGS[@]}"
    fi
} | tee "$RESULTS_DIR/summary.md"
