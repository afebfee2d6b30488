#!/usr/bin/env bash
# What TLS to the store costs: the gateway on Redis and on PostgreSQL, each reached in
# plain text and over TLS, in one run, on 127.0.0.1.
#
#   bash bench/tls.sh                      # from the repository root
#
# Installs wrk, nginx, openssl, Redis and PostgreSQL if missing (apt-get), builds the
# release gateway, makes a throwaway CA and a server certificate for 127.0.0.1 (openssl),
# and starts
#   redis-server     one server, plain on one port and TLS (--tls-port) on another
#   postgres         one cluster with ssl = on (plain connections still accepted)
#   upstream         nginx answering POST /payments with 201
#   4 gateways       redis://, rediss://…?ca_file=…, postgres://…?sslmode=disable,
#                    postgres://…?sslmode=verify-full&sslrootcert=…
# then measures each gateway in ROUNDS interleaved rounds with wrk: new keys (a unique
# Idempotency-Key per request: claim + complete) and replays (one completed key), and
# prints a markdown table of the medians with TLS's cost per request in CPU-time terms
# (the difference of 1/throughput, since the machine's cores are the bottleneck).
#
# Knobs (environment): ROUNDS=3 DURATION=7s WARMUP=2s THREADS=2 CONNECTIONS=32
#   BASE_PORT=18280 RESULTS_DIR=target/bench-tls/<timestamp>

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
RESULTS_DIR=${RESULTS_DIR:-$ROOT/target/bench-tls/$STAMP}
PORT_UPSTREAM=$BASE_PORT
PORT_REDIS=$((BASE_PORT + 1))
PORT_REDIS_TLS=$((BASE_PORT + 2))
PORT_PG=$((BASE_PORT + 3))
# The gateways: name → port.
declare -A GW_PORT=([redis]=$((BASE_PORT + 4)) [rediss]=$((BASE_PORT + 5)) [pg-plain]=$((BASE_PORT + 6))
    [pg-tls]=$((BASE_PORT + 7)))
GATEWAYS=(redis rediss pg-plain pg-tls)

BODY='{"amount":1999,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3","description":"bench order 42"}'
RESPONSE='{"id":"ch_1","amount":1999}'

BENCH_NAME=tls.sh
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
command -v redis-server >/dev/null || missing+=(redis-server)
pg_bin >/dev/null || missing+=(postgresql)
install_packages "${missing[@]}"
PG_BIN=$(pg_bin) || die "no PostgreSQL binaries after installing"

log "building the gateway (cargo build --release -p oncely-gateway)"
cargo build --release -p oncely-gateway
ONCELY="${CARGO_TARGET_DIR:-$ROOT/target}/release/oncely"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/oncely-bench-tls.XXXXXX")
mkdir -p "$WORK/logs" "$WORK/tls" "$RESULTS_DIR"
chmod 755 "$WORK"

# A CA and a server certificate for 127.0.0.1 and localhost (ECDSA P-256).
(
    cd "$WORK/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
        -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
        -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >ext.cnf
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf \
        -out server.pem 2>/dev/null
)
CA=$WORK/tls/ca.pem

# Redis: plain and TLS ports on one server.
mkdir -p "$WORK/redis"
redis-server --bind 127.0.0.1 --port "$PORT_REDIS" --tls-port "$PORT_REDIS_TLS" --tls-cert-file "$WORK/tls/server.pem" \
    --tls-key-file "$WORK/tls/server.key" --tls-ca-cert-file "$CA" --tls-auth-clients no --dir "$WORK/redis" --save "" \
    --appendonly no >"$WORK/logs/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$PORT_REDIS" "${PIDS[-1]}" redis-server
wait_port "$PORT_REDIS_TLS" "${PIDS[-1]}" redis-server

# PostgreSQL with ssl = on, as the `postgres` user when we are root.
as_pg=()
if ((EUID == 0)); then
    as_pg=(runuser -u postgres --)
    mkdir -p "$WORK/pg" && chown postgres: "$WORK/pg"
fi
mkdir -p "$WORK/pg"
"${as_pg[@]}" "$PG_BIN/initdb" -D "$WORK/pg/data" -U postgres --auth=trust --encoding=UTF8 --locale=C --no-sync \
    >"$WORK/logs/initdb.log" 2>&1 || die "initdb failed"
cp "$WORK/tls/server.pem" "$WORK/tls/server.key" "$WORK/pg/data/"
((EUID == 0)) && chown postgres: "$WORK/pg/data/server.pem" "$WORK/pg/data/server.key"
chmod 600 "$WORK/pg/data/server.key"
"${as_pg[@]}" "$PG_BIN/postgres" -D "$WORK/pg/data" -k "$WORK/pg" -h 127.0.0.1 -p "$PORT_PG" -c ssl=on \
    -c ssl_cert_file=server.pem -c ssl_key_file=server.key -c fsync=on -c synchronous_commit=on \
    -c shared_buffers=256MB -c max_connections=200 >"$WORK/logs/postgres.log" 2>&1 &
PIDS+=($!)
wait_port "$PORT_PG" "${PIDS[-1]}" postgres
for _ in $(seq 100); do
    "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$PORT_PG" -U postgres -d postgres -c 'CREATE DATABASE bench' \
        >/dev/null 2>&1 && break
    sleep 0.1
done

start_nginx_upstream "$PORT_UPSTREAM" "$RESPONSE"

cat >"$WORK/oncely.toml" <<'EOF'
[defaults]
required = true
on_conflict = "reject"
EOF
declare -A GW_STORE=(
    [redis]="redis://127.0.0.1:$PORT_REDIS"
    [rediss]="rediss://127.0.0.1:$PORT_REDIS_TLS?ca_file=$CA"
    [pg-plain]="postgres://postgres@127.0.0.1:$PORT_PG/bench?sslmode=disable&table=plain"
    [pg-tls]="postgres://postgres@127.0.0.1:$PORT_PG/bench?sslmode=verify-full&sslrootcert=$CA&table=tls"
)
for gw in "${GATEWAYS[@]}"; do
    "$ONCELY" --log-level warn serve --upstream "http://127.0.0.1:$PORT_UPSTREAM" \
        --listen "127.0.0.1:${GW_PORT[$gw]}" --store "${GW_STORE[$gw]}" --config "$WORK/oncely.toml" \
        >"$WORK/logs/gateway-$gw.out.log" 2>"$WORK/logs/gateway-$gw.err.log" &
    PIDS+=($!)
    wait_port "${GW_PORT[$gw]}" "${PIDS[-1]}" "gateway $gw"
done

write_wrk_scripts "$BODY"

RUN=$STAMP-$$
for gw in "${GATEWAYS[@]}"; do
    for _ in 1 2; do
        code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
            -H "Idempotency-Key: replay-$RUN" --data-binary "$BODY" "http://127.0.0.1:${GW_PORT[$gw]}/payments")
        [[ $code == 201 ]] || die "gateway $gw answered $code; see $WORK/logs/gateway-$gw.err.log"
    done
done

declare -A R_RPS R_P50
measure() { # round gateway mode script arg
    local round=$1 gw=$2 mode=$3 script=$4 arg=$5 out line
    out="$RESULTS_DIR/$gw-$mode.r$round.txt"
    if ((round == 1)); then
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$WORK/$script" "http://127.0.0.1:${GW_PORT[$gw]}/payments" \
            -- "warm-$arg" >/dev/null 2>&1
    fi
    [[ $script == new_keys.lua ]] && arg="$arg-r$round"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$WORK/$script" \
        "http://127.0.0.1:${GW_PORT[$gw]}/payments" -- "$arg" >"$out" 2>&1 || die "wrk failed; see $out"
    line=$(grep '^RESULT ' "$out") || die "no RESULT line in $out"
    (($(field non2xx "$line") + $(field errors "$line") == 0)) || die "$gw $mode: errors; see $out"
    R_RPS[$gw/$mode]+="$(field rps "$line") " R_P50[$gw/$mode]+="$(field p50_us "$line") "
    log "round $round: $gw $mode -> $(field rps "$line") req/s"
}
for ((round = 1; round <= ROUNDS; round++)); do
    for gw in "${GATEWAYS[@]}"; do
        measure "$round" "$gw" new-keys new_keys.lua "$RUN-$gw"
        measure "$round" "$gw" replays fixed_key.lua "replay-$RUN"
    done
done

{
    echo "## TLS to the store ($STAMP)"
    echo
    echo "- machine: $(nproc) CPUs ($(lscpu | sed -nE 's/^Model name:[[:space:]]+//p')), kernel $(uname -r); $("$ONCELY" --version)"
    echo "- $(redis-server --version | awk '{ print $1, $2, $3 }'); $("$PG_BIN/postgres" --version); TLS 1.3, ECDSA P-256 certificate, rustls (ring)"
    echo "- wrk \`-t$THREADS -c$CONNECTIONS -d$DURATION\`, $ROUNDS interleaved rounds, medians; required keys, reject mode"
    echo
    echo "| store | mode | plain req/s | TLS req/s | TLS/plain | p50 plain | p50 TLS | TLS cost per request |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    for pair in "redis rediss Redis" "pg-plain pg-tls PostgreSQL"; do
        read -r plain tls name <<<"$pair"
        for mode in new-keys replays; do
            p=$(median <<<"${R_RPS[$plain/$mode]}") t=$(median <<<"${R_RPS[$tls/$mode]}")
            awk -v n="$name" -v m="$mode" -v p="$p" -v t="$t" -v lp="$(median <<<"${R_P50[$plain/$mode]}")" \
                -v lt="$(median <<<"${R_P50[$tls/$mode]}")" \
                'BEGIN { printf "| %s | %s | %.0f | %.0f | %.2f | %d µs | %d µs | %+.1f µs |\n", n, m, p, t, t / p, lp, lt, (1e6 / t - 1e6 / p) }'
        done
    done
} | tee "$RESULTS_DIR/summary.md"
