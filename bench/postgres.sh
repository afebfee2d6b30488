#!/usr/bin/env bash
# Gateway-on-PostgreSQL benchmark, with the database's own ceiling in the same run.
#
#   bash bench/postgres.sh                 # from the repository root
#
# One run, all on 127.0.0.1: installs wrk, nginx and PostgreSQL if missing (apt-get),
# builds the release gateway, and starts
#   postgres         a fresh cluster (initdb into a temporary directory; as the `postgres` OS
#                    user when run as root), defaults for durability: fsync = on,
#                    synchronous_commit = on; shared_buffers 256MB, max_connections 200
#   upstream         nginx answering POST /payments with 201 {"id":"ch_1","amount":1999}
#   gateway-postgres oncely serve --store postgres://…/bench?pool=$POOL --log-level warn
# then measures, in ROUNDS interleaved rounds:
#   gateway-postgres new-keys   wrk, a unique Idempotency-Key per request (claim + complete)
#   gateway-postgres replays    wrk, one completed key hammered (one claim, counting the hit)
#   pgbench new-keys            pgbench -M prepared -f bench/postgres/claim_complete.sql: the
#                               store's own claim and completion statements, straight to the
#                               database (one pgbench transaction = one new key)
#   pgbench replays             pgbench -M prepared -f bench/postgres/replay.sql
# and prints a markdown table of the medians.
#
# Knobs (environment): ROUNDS=3 DURATION=7s WARMUP=2s THREADS=2 CONNECTIONS=32 POOL=16
#   PGBENCH_CLIENTS=16 BASE_PORT=18180 RESULTS_DIR=target/bench-postgres/<timestamp>
#
# Everything started here is stopped on exit (trap), whatever the exit path.

set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-7s}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
POOL=${POOL:-16}
PGBENCH_CLIENTS=${PGBENCH_CLIENTS:-16}
BASE_PORT=${BASE_PORT:-18180}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR=${RESULTS_DIR:-$ROOT/target/bench-postgres/$STAMP}
PORT_UPSTREAM=$BASE_PORT
PORT_GATEWAY=$((BASE_PORT + 1))
PORT_PG=$((BASE_PORT + 2))

BODY='{"amount":1999,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3","description":"bench order 42"}'
RESPONSE='{"id":"ch_1","amount":1999}'

log() { printf '[postgres.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

PIDS=()
WORK=""
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -n $WORK && -d $WORK ]]; then
        ((status != 0)) && cp -r "$WORK/logs" "$RESULTS_DIR/" 2>/dev/null || true
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
# Tools.
pg_bin() { # the directory with initdb, postgres and pgbench: PATH first, then Debian's
    local dir
    if command -v initdb >/dev/null; then
        dir=$(dirname "$(readlink -f "$(command -v initdb)")")
        [[ -x $dir/postgres && -x $dir/pgbench ]] && { echo "$dir"; return 0; }
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x $dir/initdb && -x $dir/postgres && -x $dir/pgbench ]] && { echo "$dir"; return 0; }
    done
    return 1
}
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v curl >/dev/null || missing+=(curl)
pg_bin >/dev/null || missing+=(postgresql)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    sudo=()
    ((EUID == 0)) || sudo=(sudo)
    # Debian's packages start system services unless policy-rc.d forbids it.
    policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod +x "$policy"
        made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}" ||
        { "${sudo[@]}" apt-get update && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y \
            --no-install-recommends "${missing[@]}"; }
    ((made_policy)) && "${sudo[@]}" rm -f "$policy"
fi
PG_BIN=$(pg_bin) || die "no PostgreSQL binaries after installing"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
    local port=$1 pid=$2 name=$3 tries=0
    until port_open "$port"; do
        kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited before listening on $port; see the logs"
        ((tries++ < 300)) || die "$name did not listen on 127.0.0.1:$port within 30 s"
        sleep 0.1
    done
}
for port in $PORT_UPSTREAM $PORT_GATEWAY $PORT_PG; do
    port_open "$port" && die "port 127.0.0.1:$port is already in use (set BASE_PORT)"
done

# ---------------------------------------------------------------------------------------
# Build.
log "building the gateway (cargo build --release -p oncely-gateway)"
cargo build --release -p oncely-gateway
ONCELY="${CARGO_TARGET_DIR:-$ROOT/target}/release/oncely"
[[ -x $ONCELY ]] || die "$ONCELY was not built"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/oncely-bench-pg.XXXXXX")
mkdir -p "$WORK/logs" "$RESULTS_DIR"
log "work dir $WORK; results in $RESULTS_DIR"

# ---------------------------------------------------------------------------------------
# PostgreSQL, as the `postgres` user when we are root (it refuses root).
as_pg=()
if ((EUID == 0)); then
    as_pg=(runuser -u postgres --)
    chown postgres: "$WORK"
fi
"${as_pg[@]}" "$PG_BIN/initdb" -D "$WORK/pgdata" -U postgres --auth=trust --encoding=UTF8 --locale=C --no-sync \
    >"$WORK/logs/initdb.log" 2>&1 || die "initdb failed; see $WORK/logs/initdb.log"
"${as_pg[@]}" "$PG_BIN/postgres" -D "$WORK/pgdata" -k "$WORK" -h 127.0.0.1 -p "$PORT_PG" \
    -c fsync=on -c synchronous_commit=on -c shared_buffers=256MB -c max_connections=200 \
    >"$WORK/logs/postgres.log" 2>&1 &
PID_PG=$!
PIDS+=("$PID_PG")
wait_port "$PORT_PG" "$PID_PG" postgres
PSQL=("$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT_PG" -U postgres)
for _ in $(seq 100); do "${PSQL[@]}" -d postgres -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.1; done
"${PSQL[@]}" -d postgres -c 'CREATE DATABASE bench'
DB_URL="postgres://postgres@127.0.0.1:$PORT_PG/bench"

# ---------------------------------------------------------------------------------------
# The upstream: nginx in the foreground with a master process (so SIGTERM stops it all).
mkdir -p "$WORK/nginx"/{body,proxy,fastcgi,uwsgi,scgi}
user_line=""
((EUID == 0)) && user_line="user root root;"
cat >"$WORK/nginx/nginx.conf" <<EOF
$user_line
daemon off;
master_process on;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/logs/nginx.error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$PORT_UPSTREAM;
        default_type application/json;
        location = /payments {
            if (\$request_method != POST) { return 405; }
            return 201 '$RESPONSE';
        }
        location / { return 404; }
    }
}
EOF
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" >"$WORK/logs/nginx.out.log" 2>&1 &
PID_UPSTREAM=$!
PIDS+=("$PID_UPSTREAM")
wait_port "$PORT_UPSTREAM" "$PID_UPSTREAM" nginx

# ---------------------------------------------------------------------------------------
# The gateway. The key is required, so a broken script shows as 400s in the error count.
cat >"$WORK/oncely.toml" <<'EOF'
[defaults]
methods = ["POST", "PATCH"]
required = true
ttl = "24h"
lease = "30s"
on_conflict = "reject"
EOF
"$ONCELY" --log-level warn serve --upstream "http://127.0.0.1:$PORT_UPSTREAM" --listen "127.0.0.1:$PORT_GATEWAY" \
    --store "$DB_URL?pool=$POOL" --config "$WORK/oncely.toml" \
    >"$WORK/logs/gateway.out.log" 2>"$WORK/logs/gateway.err.log" &
PID_GATEWAY=$!
PIDS+=("$PID_GATEWAY")
wait_port "$PORT_GATEWAY" "$PID_GATEWAY" gateway

# ---------------------------------------------------------------------------------------
# wrk scripts (as bench/gateway.sh): one RESULT line per run; latencies in µs.
cat >"$WORK/common.lua" <<EOF
body = '$BODY'
function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "RESULT requests=%d rps=%.1f p50_us=%d p99_us=%d non2xx=%d errors=%d\n",
        summary.requests, summary.requests / (summary.duration / 1e6),
        latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
EOF
cat >"$WORK/new_keys.lua" <<EOF
dofile("$WORK/common.lua")
local threads = 0
function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
end
local counter = 0
local prefix, headers
function init(args)
    prefix = (args[1] or "run") .. "-t" .. tostring(tid) .. "-"
    headers = { ["Content-Type"] = "application/json" }
end
function request()
    counter = counter + 1
    headers["Idempotency-Key"] = prefix .. counter
    return wrk.format("POST", "/payments", headers, body)
end
EOF
cat >"$WORK/fixed_key.lua" <<EOF
dofile("$WORK/common.lua")
local req
function init(args)
    req = wrk.format("POST", "/payments",
        { ["Content-Type"] = "application/json", ["Idempotency-Key"] = args[1] }, body)
end
function request()
    return req
end
EOF

RUN=$STAMP-$$
REPLAY_KEY="replay-$RUN"
post() {
    curl -sS -o "$WORK/b" -D "$WORK/h" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
        -H "Idempotency-Key: $1" --data-binary "$BODY" "http://127.0.0.1:$PORT_GATEWAY/payments"
}
[[ $(post "$REPLAY_KEY") == 201 && $(<"$WORK/b") == "$RESPONSE" ]] || die "gateway: first request failed"
[[ $(post "$REPLAY_KEY") == 201 ]] && grep -qi '^idempotent-replayed: true' "$WORK/h" || die "gateway: no replay"

# pgbench's replay key: a completed record of its own.
"${PSQL[@]}" -d bench -c "INSERT INTO oncely_records (storage_key, key, scope, created_at, expires_at, payload,
    completed_at) VALUES (sha256(convert_to('pgbench-replay-$RUN', 'UTF8')), 'pgbench-replay', 'bench', now(),
    now() + interval '1 day', convert_to(repeat('x', 200), 'UTF8'), now())"

# ---------------------------------------------------------------------------------------
ROWS=()
declare -A R_RPS R_P50 R_P99 R_ERR
field() { sed -E "s/.* $1=([0-9.]+).*/\\1/" <<<"$2"; }
add_row() { [[ -v "R_RPS[$1]" ]] || ROWS+=("$1"); }

measure_wrk() { # round mode script arg
    local round=$1 mode=$2 script=$3 arg=$4 row="gateway-postgres/$2" out line
    add_row "$row"
    out="$RESULTS_DIR/wrk-$mode.r$round.txt"
    if ((round == 1)); then
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$WORK/$script" "http://127.0.0.1:$PORT_GATEWAY/payments" \
            -- "warm-$arg-$round" >"$RESULTS_DIR/wrk-$mode.warmup.txt" 2>&1 || die "wrk warm-up failed"
    fi
    [[ $script == new_keys.lua ]] && arg="$arg-r$round"
    log "round $round: $row (wrk -t$THREADS -c$CONNECTIONS -d$DURATION)"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$WORK/$script" \
        "http://127.0.0.1:$PORT_GATEWAY/payments" -- "$arg" >"$out" 2>&1 || die "wrk failed; see $out"
    line=$(grep '^RESULT ' "$out") || die "no RESULT line in $out"
    R_RPS[$row]+="$(field rps "$line") " R_P50[$row]+="$(field p50_us "$line") "
    R_P99[$row]+="$(field p99_us "$line") " R_ERR[$row]+="$(($(field non2xx "$line") + $(field errors "$line"))) "
    log "  -> $(field rps "$line") req/s"
}

measure_pgbench() { # round mode file [-D var=value]
    local round=$1 mode=$2 file=$3 row="pgbench/$2" out tps lat
    shift 3
    add_row "$row"
    out="$RESULTS_DIR/pgbench-$mode.r$round.txt"
    log "round $round: $row (pgbench -M prepared -c$PGBENCH_CLIENTS -j$THREADS -T${DURATION%s})"
    "$PG_BIN/pgbench" -n -M prepared -c "$PGBENCH_CLIENTS" -j "$THREADS" -T "${DURATION%s}" -f "$ROOT/bench/postgres/$file" \
        "$@" -h 127.0.0.1 -p "$PORT_PG" -U postgres bench >"$out" 2>&1 || die "pgbench failed; see $out"
    tps=$(sed -nE 's/^tps = ([0-9.]+).*/\1/p' "$out" | head -1)
    lat=$(sed -nE 's/^latency average = ([0-9.]+) ms/\1/p' "$out")
    R_RPS[$row]+="$tps " R_P50[$row]+="$(awk -v l="$lat" 'BEGIN { printf "%d", l * 1000 }') " R_P99[$row]+="- "
    R_ERR[$row]+="$(sed -nE 's/^number of failed transactions: ([0-9]+).*/\1/p' "$out" | head -1) "
    log "  -> $tps tps"
}

for ((round = 1; round <= ROUNDS; round++)); do
    measure_wrk "$round" new-keys new_keys.lua "$RUN"
    measure_wrk "$round" replays fixed_key.lua "$REPLAY_KEY"
    measure_pgbench "$round" new-keys claim_complete.sql
    measure_pgbench "$round" replays replay.sql -D "replay_key=pgbench-replay-$RUN"
done

STATS=$("$ONCELY" --log-level warn stats --store "$DB_URL" 2>&1 || true)

median() { tr ' ' '\n' | grep -v '^$' | grep -v '^-$' | sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "-"; else print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
range() { tr ' ' '\n' | grep -v '^$' | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.0f–%.0f", lo, hi }'; }
total() { tr ' ' '\n' | awk '{ s += $1 } END { print s + 0 }'; }
{
    echo "## Gateway on PostgreSQL ($STAMP)"
    echo
    echo "- machine: $(nproc) CPUs ($(lscpu | sed -nE 's/^Model name:[[:space:]]+//p')), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r); data directory on $(df -T "$WORK" | awk 'NR == 2 { print $2 }')"
    echo "- $("$PG_BIN/postgres" --version), fsync = on, synchronous_commit = on, shared_buffers 256MB; wrk $(wrk -v 2>&1 | head -1 | awk '{ print $2 }'); $("$ONCELY" --version)"
    echo "- gateway: \`--store $DB_URL?pool=$POOL\`, required keys, 24 h ttl, 30 s lease, reject mode; upstream nginx (1 worker)"
    echo "- wrk \`-t$THREADS -c$CONNECTIONS -d$DURATION --latency\`; pgbench \`-n -M prepared -c$PGBENCH_CLIENTS -j$THREADS -T${DURATION%s}\`; $ROUNDS interleaved rounds, medians; everything shares the same $(nproc) CPUs"
    echo
    echo "| target | mode | per second (median) | range | p50 | p99 | errors |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    for row in "${ROWS[@]}"; do
        printf '| %s | %s | %.0f | %s | %s µs | %s | %s |\n' "${row%%/*}" "${row#*/}" "$(median <<<"${R_RPS[$row]}")" \
            "$(range <<<"${R_RPS[$row]}")" "$(median <<<"${R_P50[$row]}")" \
            "$(p=$(median <<<"${R_P99[$row]}"); [[ $p == - ]] && echo - || echo "$p µs")" "$(total <<<"${R_ERR[$row]}")"
    done
    echo
    echo "(pgbench rows: p50 is pgbench's average latency per transaction; one transaction is one new key — claim and completion, two statements — or one replay claim.)"
    echo
    echo "Store after the run: $(tr '\n' ' ' <<<"$STATS")"
} | tee "$RESULTS_DIR/summary.md"
