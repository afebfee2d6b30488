#!/usr/bin/env bash
# Gateway-on-DynamoDB benchmark: the gateway on moto's DynamoDB emulator against the same
# gateway on the memory store, in one run, on loopback, driven by wrk.
#
#   bash bench/dynamodb.sh                 # from the repository root, on a quiet machine
#
# One run: installs wrk and nginx if missing (apt-get), and moto (PyPI, the version
# scripts/test pins, into the virtual environment scripts/test uses) if missing; builds
# the release gateway; and starts, all on 127.0.0.1:
#   upstream          nginx answering POST /payments with 201 {"id":"ch_1","amount":1999}
#   moto              moto's DynamoDB emulator, one request at a time (the testkit's
#                     crates/oncely-testkit/src/moto_server.py: moto alone does not apply a
#                     conditional write atomically), its table made with
#                     `oncely dynamodb create-table`
#   gateway-memory    oncely serve --store memory://                        --log-level warn
#   gateway-dynamodb  oncely serve --store dynamodb://bench?endpoint=…&max_attempts=1
# then measures, in ROUNDS interleaved rounds, "new keys" (a unique Idempotency-Key per
# request: claim + complete) and "replays" (one completed key, hammered: one claim) on
# each gateway, and prints a markdown table of the medians, with the store calls per
# request read off each gateway's `oncely_store_seconds_count{op}` (with max_attempts=1
# every DynamoDB store call is one request: a new key 2, a replay 1).
#
# What it measures is moto, a Python emulator that closes every connection: a ceiling for
# the gateway's overhead on top of a slow store, not DynamoDB's speed (single-digit
# milliseconds per request in a region, and far more concurrency).
#
# Knobs (environment): ROUNDS=3 DURATION=7s WARMUP=2s THREADS=2 CONNECTIONS=32
#   BASE_PORT=18280 RESULTS_DIR=target/bench-dynamodb/<timestamp>
#   ONCELY_MOTO_VENV=~/.cache/oncely/moto-venv  ONCELY=path/to/oncely (skips the release build)
#
# Exit status: 0, or 3 when a run had errors (non-2xx, socket errors). Everything started
# here is stopped on exit (trap), whatever the exit path.

set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-7s}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
BASE_PORT=${BASE_PORT:-18280}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR=${RESULTS_DIR:-$ROOT/target/bench-dynamodb/$STAMP}
PORT_UPSTREAM=$BASE_PORT
PORT_MOTO=$((BASE_PORT + 1))
PORT_MEM=$((BASE_PORT + 2))
PORT_MEM_ADMIN=$((BASE_PORT + 3))
PORT_DDB=$((BASE_PORT + 4))
PORT_DDB_ADMIN=$((BASE_PORT + 5))

BODY='{"amount":1999,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3","description":"bench order 42"}'
RESPONSE='{"id":"ch_1","amount":1999}'

BENCH_NAME=dynamodb.sh
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# ---------------------------------------------------------------------------------------
# Tools.
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v curl >/dev/null || missing+=(curl)
install_packages "${missing[@]}"

# moto: where scripts/test installs it, at the version it pins.
MOTO_VERSION=$(sed -nE 's/^MOTO_VERSION=([0-9.]+)$/\1/p' scripts/test)
[[ -n $MOTO_VERSION ]] || die "no MOTO_VERSION in scripts/test"
MOTO_VENV=${ONCELY_MOTO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/oncely/moto-venv}
if [[ ! -f $MOTO_VENV/.oncely-moto-$MOTO_VERSION ]]; then
    log "installing moto[server]==$MOTO_VERSION into $MOTO_VENV"
    mkdir -p "$(dirname "$MOTO_VENV")"
    python3 -m venv --clear "$MOTO_VENV" && "$MOTO_VENV/bin/python" -m pip install --quiet \
        --disable-pip-version-check "moto[server]==$MOTO_VERSION" || die "could not install moto"
    touch "$MOTO_VENV/.oncely-moto-$MOTO_VERSION"
fi

for port in $PORT_UPSTREAM $PORT_MOTO $PORT_MEM $PORT_MEM_ADMIN $PORT_DDB $PORT_DDB_ADMIN; do
    port_open "$port" && die "port 127.0.0.1:$port is already in use (set BASE_PORT)"
done

# ---------------------------------------------------------------------------------------
# Build.
if [[ -z ${ONCELY:-} ]]; then
    log "building the gateway (cargo build --release -p oncely-gateway)"
    cargo build --release -p oncely-gateway
    ONCELY="${CARGO_TARGET_DIR:-$ROOT/target}/release/oncely"
fi
[[ -x $ONCELY ]] || die "$ONCELY was not built"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/oncely-bench-ddb.XXXXXX")
mkdir -p "$WORK/logs" "$RESULTS_DIR"
log "work dir $WORK; results in $RESULTS_DIR"

# ---------------------------------------------------------------------------------------
# moto, and the table.
"$MOTO_VENV/bin/python" crates/oncely-testkit/src/moto_server.py 127.0.0.1 "$PORT_MOTO" "$WORK/logs/moto.log" &
PID_MOTO=$!
PIDS+=("$PID_MOTO")
wait_port "$PORT_MOTO" "$PID_MOTO" moto 60
DDB_URL="dynamodb://bench?endpoint=http://127.0.0.1:$PORT_MOTO&region=us-east-1"
"$ONCELY" --log-level warn dynamodb create-table --store "$DDB_URL" || die "create-table failed"

# ---------------------------------------------------------------------------------------
# The upstream.
start_nginx_upstream "$PORT_UPSTREAM" "$RESPONSE"

# ---------------------------------------------------------------------------------------
# The gateways. The key is required, so a broken request shows as 400s in the error count.
cat >"$WORK/oncely.toml" <<'EOF'
[defaults]
methods = ["POST", "PATCH"]
required = true
ttl = "24h"
lease = "30s"
on_conflict = "reject"
EOF
start_gateway() { # name port admin-port store
    "$ONCELY" --log-level warn serve --upstream "http://127.0.0.1:$PORT_UPSTREAM" --listen "127.0.0.1:$2" \
        --admin-listen "127.0.0.1:$3" --store "$4" --config "$WORK/oncely.toml" \
        >"$WORK/logs/$1.out.log" 2>"$WORK/logs/$1.err.log" &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$2" "$pid" "$1"
}
start_gateway gateway-memory "$PORT_MEM" "$PORT_MEM_ADMIN" "memory://"
start_gateway gateway-dynamodb "$PORT_DDB" "$PORT_DDB_ADMIN" "$DDB_URL&max_attempts=1&timeout=10s&connect_timeout=5s"

# ---------------------------------------------------------------------------------------
# wrk scripts: one RESULT line per run; latencies in µs.
write_wrk_scripts "$BODY"

RUN=$STAMP-$$
REPLAY_KEY="replay-$RUN"
post() { # port key
    curl -sS -o "$WORK/b" -D "$WORK/h" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
        -H "Idempotency-Key: $2" --data-binary "$BODY" "http://127.0.0.1:$1/payments"
}
for port in $PORT_MEM $PORT_DDB; do
    [[ $(post "$port" "$REPLAY_KEY") == 201 && $(<"$WORK/b") == "$RESPONSE" ]] || die "gateway on $port: first request failed"
    [[ $(post "$port" "$REPLAY_KEY") == 201 ]] && grep -qi '^idempotent-replayed: true' "$WORK/h" ||
        die "gateway on $port: no replay"
done

# The store calls a gateway has made, by operation: `op=count` words.
store_calls() { # admin-port
    curl -sS "http://127.0.0.1:$1/metrics" |
        sed -nE 's/^oncely_store_seconds_count\{op="([a-z_]+)"\} ([0-9]+)$/\1=\2/p' | tr '\n' ' '
}
call_count() { # op calls: the op's count, 0 when it has none yet
    local n
    n=$(sed -nE "s/.*(^| )$1=([0-9]+).*/\\2/p" <<<"$2")
    echo "${n:-0}"
}

# ---------------------------------------------------------------------------------------
ROWS=()
declare -A R_RPS R_P50 R_P99 R_ERR R_CALLS
FLAGGED=()
add_row() { [[ -v "R_RPS[$1]" ]] || ROWS+=("$1"); }

measure() { # round label mode port admin-port script arg
    local round=$1 label=$2 mode=$3 port=$4 admin=$5 script=$6 arg=$7 row="$2/$3" out line before after
    add_row "$row"
    out="$RESULTS_DIR/wrk-$label-$mode.r$round.txt"
    if ((round == 1)); then
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$WORK/$script" "http://127.0.0.1:$port/payments" \
            -- "warm-$arg-$round" >"$RESULTS_DIR/wrk-$label-$mode.warmup.txt" 2>&1 || die "wrk warm-up failed"
    fi
    [[ $script == new_keys.lua ]] && arg="$arg-r$round"
    log "round $round: $row (wrk -t$THREADS -c$CONNECTIONS -d$DURATION)"
    before=$(store_calls "$admin")
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$WORK/$script" \
        "http://127.0.0.1:$port/payments" -- "$arg" >"$out" 2>&1 || die "wrk failed; see $out"
    after=$(store_calls "$admin")
    line=$(grep '^RESULT ' "$out") || die "no RESULT line in $out"
    local requests errors calls op n
    requests=$(field requests "$line")
    errors=$(($(field non2xx "$line") + $(field errors "$line")))
    calls=""
    for op in claim complete release touch; do
        n=$(($(call_count "$op" "$after") - $(call_count "$op" "$before")))
        ((n > 0)) && calls+="$op $(awk -v n="$n" -v r="$requests" 'BEGIN { printf "%.2f", r ? n / r : 0 }') "
    done
    ((errors == 0)) || FLAGGED+=("$row round $round: $errors errors (see $out)")
    R_RPS[$row]+="$(field rps "$line") " R_P50[$row]+="$(field p50_us "$line") "
    R_P99[$row]+="$(field p99_us "$line") " R_ERR[$row]+="$errors " R_CALLS[$row]="${calls:-none}"
    log "  -> $(field rps "$line") req/s; store calls per request: ${calls:-none}"
}

for ((round = 1; round <= ROUNDS; round++)); do
    measure "$round" gateway-memory new-keys "$PORT_MEM" "$PORT_MEM_ADMIN" new_keys.lua "$RUN"
    measure "$round" gateway-memory replays "$PORT_MEM" "$PORT_MEM_ADMIN" fixed_key.lua "$REPLAY_KEY"
    measure "$round" gateway-dynamodb new-keys "$PORT_DDB" "$PORT_DDB_ADMIN" new_keys.lua "$RUN"
    measure "$round" gateway-dynamodb replays "$PORT_DDB" "$PORT_DDB_ADMIN" fixed_key.lua "$REPLAY_KEY"
done

STATS=$("$ONCELY" --log-level warn stats --store "$DDB_URL" 2>&1 || true)

{
    echo "## Gateway on DynamoDB (moto) against the memory store ($STAMP)"
    echo
    echo "- machine: $(nproc) CPUs ($(lscpu | sed -nE 's/^Model name:[[:space:]]+//p')), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)"
    echo "- moto $MOTO_VERSION ($("$MOTO_VENV/bin/python" --version 2>&1)), one request at a time; wrk $(wrk -v 2>&1 | head -1 | awk '{ print $2 }'); $("$ONCELY" --version)"
    echo "- gateways: required keys, 24 h ttl, 30 s lease, reject mode; \`--store $DDB_URL&max_attempts=1\`; upstream nginx (1 worker)"
    echo "- wrk \`-t$THREADS -c$CONNECTIONS -d$DURATION --latency\`, $ROUNDS interleaved rounds, medians; everything shares the same $(nproc) CPUs"
    echo
    echo "| target | mode | req/s (median) | range | p50 | p99 | errors | store calls per request |"
    echo "|---|---|---:|---:|---:|---:|---:|---|"
    for row in "${ROWS[@]}"; do
        printf '| %s | %s | %.0f | %s | %s µs | %s µs | %s | %s |\n' "${row%%/*}" "${row#*/}" \
            "$(median <<<"${R_RPS[$row]}")" "$(range <<<"${R_RPS[$row]}")" "$(median <<<"${R_P50[$row]}")" \
            "$(median <<<"${R_P99[$row]}")" "$(total <<<"${R_ERR[$row]}")" "${R_CALLS[$row]}"
    done
    echo
    echo "(Store calls per request, last round, from \`oncely_store_seconds_count\`: with max_attempts=1 each DynamoDB store call is one request, so a new key should read claim 1.00 complete 1.00 and a replay claim 1.00.)"
    echo
    echo "Table after the run: $(tr '\n' ' ' <<<"$STATS")"
    if ((${#FLAGGED[@]})); then
        echo
        echo "**FLAGGED RUNS**"
        for f in "${FLAGGED[@]}"; do echo "- $f"; done
    fi
} | tee "$RESULTS_DIR/summary.md"

log "wrk outputs and summary.md in $RESULTS_DIR"
((${#FLAGGED[@]} == 0)) || exit 3
