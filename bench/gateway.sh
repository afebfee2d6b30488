#!/usr/bin/env bash
# Gateway load benchmark: the `oncely` gateway against a plain nginx reverse-proxy hop,
# both in front of the same nginx upstream, on loopback, driven by wrk.
#
#   bash bench/gateway.sh                 # from the repository root
#
# One run installs wrk and nginx if missing (apt-get), builds the release gateway, and
# starts, all on 127.0.0.1:
#   upstream         nginx answering POST /payments with 201 {"id":"ch_1","amount":1999}
#   nginx-hop        nginx reverse proxy to the upstream (keepalive pool): the floor any proxy pays
#   hyper-floor      crates/oncely-gateway/examples/floor_proxy.rs: the gateway's HTTP stack (hyper,
#                    hyper-util's client, a worker per core) forwarding as is, nothing else: the
#                    floor of this design (built here; FLOOR_BIN= to measure another build)
#   hyper-answer     the same program answering 201 with the upstream's body itself, after reading
#                    the request body: what answering costs this stack
#   hyper-replay     the same program doing what this design requires of a replay and nothing else
#                    (fingerprint, storage key, a map look-up, the stored answer with
#                    Idempotent-Replayed): the floor of a replay, which the gateway answers from its store
#   hyper-newkey     the same program doing what this design requires of a new key and nothing else
#                    (fingerprint, storage key, a claim in a map, the request forwarded, the response
#                    read whole and stored): the floor of a new key on the memory store
#   gateway-memory   oncely serve --store memory://                --log-level warn
#   gateway-sqlite   oncely serve --store sqlite://$WORK/bench.db  --log-level warn (sync durability;
#                    the replay cache on, its default on SQLite since stop 40; older binaries: off)
# and, with EXTRA=1 (the default), rows that help explain the others:
#   gateway-memory pass-through   POST without a key to a path the layer does not cover: the proxy alone
#   gateway-memory-info           the memory gateway at --log-level info (one access-log line per request)
#   gateway-memory-shared         the memory gateway with --workers 0: connections served on the
#                                 shared multi-threaded runtime instead of a worker thread per core
#   gateway-sqlite-relaxed        sqlite://...?durability=relaxed (WAL synced on an interval)
#   gateway-sqlite-nocache        sqlite:// with --replay-cache false (every replay a look-up in the file)
# and, with REDIS=1 (the default when redis-server is installed):
#   gateway-redis    oncely serve --store redis://127.0.0.1:PORT  against a redis-server started here
#                    with appendonly yes, appendfsync everysec, maxmemory-policy noeviction; the
#                    replay cache is on (the default for Redis)
#   gateway-redis-nocache         the same with --replay-cache false
#   redis-server's own ceiling for the same scripts (redis-benchmark EVALSHA with the claim and
#   complete scripts the gateway sends, their SHAs read off MONITOR), printed after the table.
# and, with BASELINE=/path/to/an/older/oncely, the memory gateway (warn and info)
# and SQLite gateways of that binary beside this one's, for a before/after in one run:
# gateway-memory-baseline, gateway-memory-info-baseline, gateway-sqlite-baseline.
# It measures "new keys" (a unique Idempotency-Key per request) on every target and
# "replays" (one completed key, hammered) on the gateways, in ROUNDS interleaved rounds,
# and prints a markdown table of the medians, then what each goal would need of the proxy
# (bench/goal_budget.py: the CPU per request a goal leaves the proxy, beside the floor's).
#
# Knobs (environment): ROUNDS=3 DURATION=7s WARMUP=2s THREADS=2 CONNECTIONS=32 EXTRA=1
#   REDIS=1 NGINX_WORKERS=auto BASE_PORT=18080 RESULTS_DIR=target/bench-gateway/<timestamp>
#   WRK_SCHED=other (batch: wrk runs under SCHED_BATCH, so that its threads, woken by every
#   response, do not preempt the server that wrote it; on a box where wrk shares the cores
#   that preemption costs the server kernel time in proportion to its own CPU per request)
#   BASELINE= (an older binary to measure beside this one) ONCELY_BIN= (measure this binary;
#   do not build)
#   WAIT_FOR_QUIET=900 (seconds to wait for other load)  BUSY_LIMIT=20 (% CPU that counts
#   as other load before a run)  FOREIGN_LIMIT=5 (% CPU used by other processes during a
#   run before it is redone)  ATTEMPTS=3 (tries per run)
#
# Exit status: 0, or 3 when a run had errors (non-2xx, socket errors) or other load, or
# the SQLite store lost an acknowledged completion. Everything started here is stopped on
# exit (trap), whatever the exit path.

set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-7s}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
EXTRA=${EXTRA:-1}
if command -v redis-server >/dev/null; then REDIS=${REDIS:-1}; else REDIS=${REDIS:-0}; fi
NGINX_WORKERS=${NGINX_WORKERS:-auto}
BASE_PORT=${BASE_PORT:-18080}
WAIT_FOR_QUIET=${WAIT_FOR_QUIET:-900}
BUSY_LIMIT=${BUSY_LIMIT:-20}
FOREIGN_LIMIT=${FOREIGN_LIMIT:-5}
ATTEMPTS=${ATTEMPTS:-3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS_DIR=${RESULTS_DIR:-$ROOT/target/bench-gateway/$STAMP}

PORT_UPSTREAM=$BASE_PORT
PORT_HOP=$((BASE_PORT + 1))
PORT_MEM=$((BASE_PORT + 2))
PORT_SQLITE=$((BASE_PORT + 3))
PORT_MEM_INFO=$((BASE_PORT + 4))
PORT_MEM_SHARED=$((BASE_PORT + 5))
PORT_SQLITE_RELAXED=$((BASE_PORT + 6))
PORT_REDIS_SERVER=$((BASE_PORT + 7))
PORT_REDIS=$((BASE_PORT + 8))
PORT_REDIS_NOCACHE=$((BASE_PORT + 9))
PORT_SQLITE_NOCACHE=$((BASE_PORT + 10))
PORT_BASE_MEM=$((BASE_PORT + 11))
PORT_BASE_MEM_INFO=$((BASE_PORT + 12))
PORT_BASE_SQLITE=$((BASE_PORT + 13))
PORT_FLOOR=$((BASE_PORT + 14))
PORT_ANSWER=$((BASE_PORT + 15))
PORT_REPLAY=$((BASE_PORT + 16))
PORT_NEWKEY=$((BASE_PORT + 17))
WRK_SCHED=${WRK_SCHED:-other}
case $WRK_SCHED in
    other) WRK=(wrk) ;;
    batch) WRK=(chrt --batch 0 wrk) ;;
    *)
        echo "WRK_SCHED is other or batch, not $WRK_SCHED" >&2
        exit 2
        ;;
esac

BODY='{"amount":1999,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3","description":"bench order 42"}'
RESPONSE='{"id":"ch_1","amount":1999}'

log() { printf '[gateway.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ---------------------------------------------------------------------------------------
# Cleanup: every process started here is recorded in PIDS and stopped on exit.
PIDS=()
WORK=""
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local pid tries
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        tries=0
        while kill -0 "$pid" 2>/dev/null && ((tries < 50)); do
            sleep 0.1
            tries=$((tries + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "process $pid ignored SIGTERM for 5 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if ((status != 0)) && [[ -d $RESULTS_DIR ]]; then
            cp -r "$WORK/logs" "$RESULTS_DIR/" 2>/dev/null || true
            log "exit $status; server logs copied to $RESULTS_DIR/logs"
        fi
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
# Other benchmarks (criterion) on this machine disturb ours and we theirs: wait for them.
# Anything else keeping the CPUs busy (a build, a test run) disturbs us as much, so the
# machine must also be mostly idle (under BUSY_LIMIT percent over one second). Our own
# servers are idle between runs.
OTHER_LOAD_NOTES=()
busy_pct() {
    local a b
    read -r -a a < <(head -1 /proc/stat)
    sleep 1
    read -r -a b < <(head -1 /proc/stat)
    local busy=$((b[1] + b[2] + b[3] + b[6] + b[7] + b[8] - a[1] - a[2] - a[3] - a[6] - a[7] - a[8]))
    local idle=$((b[4] + b[5] - a[4] - a[5]))
    echo $((busy + idle > 0 ? 100 * busy / (busy + idle) : 0))
}
wait_for_quiet() {
    local what=$1 waited=0 busy others
    while :; do
        others=$(pgrep -f 'criterion|/engine-|cargo bench' | tr '\n' ' ' || true)
        busy=$(busy_pct)
        [[ -z $others ]] && ((busy < BUSY_LIMIT)) && break
        if ((waited >= WAIT_FOR_QUIET)); then
            log "still busy after ${waited}s (benchmarks: ${others:-none}; CPU ${busy}%); going ahead with '$what' under load"
            OTHER_LOAD_NOTES+=("$what: started under other load (benchmarks: ${others:-none}; CPU ${busy}% busy)")
            return 0
        fi
        ((waited == 0)) && log "busy (benchmarks: ${others:-none}; CPU ${busy}%); waiting before '$what'"
        sleep 20
        waited=$((waited + 20))
    done
    ((waited > 0)) && OTHER_LOAD_NOTES+=("$what: waited ${waited}s for other load to finish")
    return 0
}

# ---------------------------------------------------------------------------------------
# Tools.
install_if_missing() {
    local missing=()
    command -v wrk >/dev/null || missing+=(wrk)
    command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
    command -v curl >/dev/null || missing+=(curl)
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]}"
    local sudo=()
    ((EUID == 0)) || sudo=(sudo)
    # Debian's nginx package starts a system nginx on :80 unless policy-rc.d forbids it;
    # forbid it for the duration of the install when nothing does already.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod +x "$policy"
        made_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}" || rc=$?
    if ((rc != 0)); then
        log "apt-get install failed; running apt-get update once and retrying"
        rc=0
        { "${sudo[@]}" apt-get update && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y \
            --no-install-recommends "${missing[@]}"; } || rc=$?
    fi
    ((made_policy)) && "${sudo[@]}" rm -f "$policy"
    ((rc == 0)) || die "could not install ${missing[*]}"
}
install_if_missing
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits (bounded) until `port` accepts connections; fails if `pid` died meanwhile.
wait_port() {
    local port=$1 pid=$2 name=$3 tries=0
    until port_open "$port"; do
        kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited before listening on $port; see the logs"
        ((tries++ < 150)) || die "$name did not listen on 127.0.0.1:$port within 15 s"
        sleep 0.1
    done
}

for port in $PORT_UPSTREAM $PORT_HOP $PORT_FLOOR $PORT_ANSWER $PORT_REPLAY $PORT_NEWKEY $PORT_MEM $PORT_SQLITE $PORT_MEM_INFO $PORT_MEM_SHARED $PORT_SQLITE_RELAXED; do
    port_open "$port" && die "port 127.0.0.1:$port is already in use (set BASE_PORT)"
done

# ---------------------------------------------------------------------------------------
# Build.
wait_for_quiet "cargo build"
if [[ -n ${ONCELY_BIN:-} ]]; then
    ONCELY=$ONCELY_BIN
    log "measuring the gateway binary $ONCELY (ONCELY_BIN; not built here)"
else
    log "building the gateway (cargo build --release -p oncely-gateway)"
    cargo build --release -p oncely-gateway
    ONCELY="$ROOT/target/release/oncely"
fi
if [[ -n ${FLOOR_BIN:-} ]]; then
    FLOOR=$FLOOR_BIN
else
    log "building the floor (cargo build --release -p oncely-gateway --example floor_proxy)"
    cargo build --release -p oncely-gateway --example floor_proxy
    FLOOR="$ROOT/target/release/examples/floor_proxy"
fi
[[ -x $ONCELY ]] || die "$ONCELY was not built"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/oncely-bench.XXXXXX")
mkdir -p "$WORK/logs" "$RESULTS_DIR"
log "work dir $WORK; results in $RESULTS_DIR"

# ---------------------------------------------------------------------------------------
# nginx: two instances (upstream, hop), each with its own prefix, config, pid and logs,
# in the foreground (`daemon off`) with a master process, so that the PID we hold is the
# master's and SIGTERM stops it and its workers.
nginx_conf() {
    local name=$1 http_block=$2 dir="$WORK/nginx-$1"
    mkdir -p "$dir"/{body,proxy,fastcgi,uwsgi,scgi,logs}
    local user_line=""
    ((EUID == 0)) && user_line="user root root;"
    cat >"$dir/nginx.conf" <<EOF
$user_line
daemon off;
master_process on;
worker_processes $NGINX_WORKERS;
pid $dir/nginx.pid;
error_log $WORK/logs/nginx-$name.error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    # nginx closes a keep-alive connection after 1000 requests by default; do not let
    # reconnects weigh on the nginx rows only.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
$http_block
}
EOF
    echo "$dir"
}

start_nginx() {
    local name=$1 dir=$2 port=$3
    "$NGINX" -t -q -p "$dir/" -c "$dir/nginx.conf" 2>>"$WORK/logs/nginx-$name.error.log" ||
        die "nginx config for $name is invalid: $(cat "$WORK/logs/nginx-$name.error.log")"
    "$NGINX" -p "$dir/" -c "$dir/nginx.conf" >>"$WORK/logs/nginx-$name.out.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$port" "$pid" "nginx $name"
    echo "$pid"
}

UPSTREAM_DIR=$(nginx_conf upstream "
    server {
        listen 127.0.0.1:$PORT_UPSTREAM;
        default_type application/json;
        location = /payments {
            if (\$request_method != POST) { return 405; }
            return 201 '$RESPONSE';
        }
        # The same answer on /plain, which the gateways pass through untouched (see
        # oncely.toml): the proxy's own cost, without the idempotency layer.
        location = /plain {
            if (\$request_method != POST) { return 405; }
            return 201 '$RESPONSE';
        }
        location / { return 404; }
    }")
HOP_DIR=$(nginx_conf hop "
    upstream backend {
        server 127.0.0.1:$PORT_UPSTREAM;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$PORT_HOP;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }")

# PIDs come back through a file: `$(start_nginx ...)` would run in a subshell, whose
# PIDS array the trap would never see.
start_nginx upstream "$UPSTREAM_DIR" "$PORT_UPSTREAM" >"$WORK/pid" && PID_UPSTREAM=$(<"$WORK/pid")
start_nginx hop "$HOP_DIR" "$PORT_HOP" >"$WORK/pid" && PID_HOP=$(<"$WORK/pid")
"$FLOOR" "127.0.0.1:$PORT_FLOOR" "127.0.0.1:$PORT_UPSTREAM" >"$WORK/logs/hyper-floor.log" 2>&1 &
PID_FLOOR=$!
PIDS+=("$PID_FLOOR")
wait_port "$PORT_FLOOR" "$PID_FLOOR" hyper-floor
"$FLOOR" "127.0.0.1:$PORT_ANSWER" --answer "$RESPONSE" >"$WORK/logs/hyper-answer.log" 2>&1 &
PID_ANSWER=$!
PIDS+=("$PID_ANSWER")
wait_port "$PORT_ANSWER" "$PID_ANSWER" hyper-answer
"$FLOOR" "127.0.0.1:$PORT_REPLAY" --replay "$RESPONSE" >"$WORK/logs/hyper-replay.log" 2>&1 &
PID_REPLAY=$!
PIDS+=("$PID_REPLAY")
wait_port "$PORT_REPLAY" "$PID_REPLAY" hyper-replay
"$FLOOR" "127.0.0.1:$PORT_NEWKEY" --new-key "127.0.0.1:$PORT_UPSTREAM" >"$WORK/logs/hyper-newkey.log" 2>&1 &
PID_NEWKEY=$!
PIDS+=("$PID_NEWKEY")
wait_port "$PORT_NEWKEY" "$PID_NEWKEY" hyper-newkey

# ---------------------------------------------------------------------------------------
# Gateways. The config spells out the defaults and makes the key required, so that a
# request without one (a broken Lua script) shows up as a 400 in the error count.
cat >"$WORK/oncely.toml" <<'EOF'
[defaults]
methods = ["POST", "PATCH"]
required = true
ttl = "24h"
lease = "30s"
on_conflict = "reject"

# POST /plain is not covered (only PATCH is): passed through untouched.
[[routes]]
path = "/plain"
methods = ["PATCH"]
EOF

# GW_BIN (another binary: BASELINE's) and GW_ARGS (more `serve` flags) apply to one call:
# `GW_ARGS="--replay-cache false" start_gateway ...`.
start_gateway() { # name port store log-level [VAR=value for the environment]...
    local name=$1 port=$2 store=$3 level=$4
    shift 4
    local -a more
    read -r -a more <<<"${GW_ARGS:-}"
    env "$@" "${GW_BIN:-$ONCELY}" --log-level "$level" serve --upstream "http://127.0.0.1:$PORT_UPSTREAM" \
        --listen "127.0.0.1:$port" --store "$store" --config "$WORK/oncely.toml" "${more[@]}" \
        >"$WORK/logs/$name.out.log" 2>"$WORK/logs/$name.err.log" &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$port" "$pid" "$name"
    echo "$pid"
}

start_gateway gateway-memory "$PORT_MEM" "memory://" warn >"$WORK/pid" && PID_MEM=$(<"$WORK/pid")
start_gateway gateway-sqlite "$PORT_SQLITE" "sqlite://$WORK/bench.db" warn >"$WORK/pid" && PID_SQLITE=$(<"$WORK/pid")
if ((EXTRA)); then
    start_gateway gateway-memory-info "$PORT_MEM_INFO" "memory://" info >"$WORK/pid" && PID_MEM_INFO=$(<"$WORK/pid")
    GW_ARGS="--workers 0" start_gateway gateway-memory-shared "$PORT_MEM_SHARED" "memory://" warn >"$WORK/pid" &&
        PID_MEM_SHARED=$(<"$WORK/pid")
    start_gateway gateway-sqlite-relaxed "$PORT_SQLITE_RELAXED" "sqlite://$WORK/bench-relaxed.db?durability=relaxed" \
        warn >"$WORK/pid" && PID_SQLITE_RELAXED=$(<"$WORK/pid")
    GW_ARGS="--replay-cache false" start_gateway gateway-sqlite-nocache "$PORT_SQLITE_NOCACHE" \
        "sqlite://$WORK/bench-nocache.db" warn >"$WORK/pid" && PID_SQLITE_NOCACHE=$(<"$WORK/pid")
fi
if [[ -n ${BASELINE:-} ]]; then
    [[ -x $BASELINE ]] || die "BASELINE=$BASELINE is not an executable"
    GW_BIN=$BASELINE start_gateway gateway-memory-baseline "$PORT_BASE_MEM" "memory://" warn >"$WORK/pid" &&
        PID_BASE_MEM=$(<"$WORK/pid")
    GW_BIN=$BASELINE start_gateway gateway-memory-info-baseline "$PORT_BASE_MEM_INFO" "memory://" info >"$WORK/pid" &&
        PID_BASE_MEM_INFO=$(<"$WORK/pid")
    GW_BIN=$BASELINE start_gateway gateway-sqlite-baseline "$PORT_BASE_SQLITE" "sqlite://$WORK/bench-baseline.db" warn \
        >"$WORK/pid" && PID_BASE_SQLITE=$(<"$WORK/pid")
fi
if ((REDIS)); then
    mkdir -p "$WORK/redis"
    redis-server --port "$PORT_REDIS_SERVER" --bind 127.0.0.1 --dir "$WORK/redis" --save "" \
        --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
        >"$WORK/logs/redis-server.log" 2>&1 &
    PID_REDIS_SERVER=$!
    PIDS+=("$PID_REDIS_SERVER")
    wait_port "$PORT_REDIS_SERVER" "$PID_REDIS_SERVER" redis-server
    start_gateway gateway-redis "$PORT_REDIS" "redis://127.0.0.1:$PORT_REDIS_SERVER" warn >"$WORK/pid" &&
        PID_REDIS=$(<"$WORK/pid")
    GW_ARGS="--replay-cache false" start_gateway gateway-redis-nocache "$PORT_REDIS_NOCACHE" \
        "redis://127.0.0.1:$PORT_REDIS_SERVER" warn >"$WORK/pid" && PID_REDIS_NOCACHE=$(<"$WORK/pid")
fi
log "all servers up"

# ---------------------------------------------------------------------------------------
# wrk scripts. `done` prints one machine-readable RESULT line (latencies in µs);
# summary.errors.status counts responses with a status >= 400 (wrk's "Non-2xx" count).
cat >"$WORK/common.lua" <<EOF
body = '$BODY'
function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "RESULT requests=%d duration_us=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d max_us=%d non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
        summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
        e.status, e.connect, e.read, e.write, e.timeout))
end
EOF

# New keys: each thread gets an id in setup(), each request a counter; the tag (the
# script argument) keeps the keys of different runs apart.
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

# Replays: one fixed key (the argument), completed before the run; the request is built
# once per thread.
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

# No key, a path whose POSTs the layer does not cover: the proxy alone.
cat >"$WORK/plain.lua" <<EOF
dofile("$WORK/common.lua")
local req
function init(args)
    req = wrk.format("POST", "/plain", { ["Content-Type"] = "application/json" }, body)
end
function request()
    return req
end
EOF

# ---------------------------------------------------------------------------------------
# Sanity checks with curl before measuring: 201 with the upstream's body; on gateways a
# second request with the same key is a replay.
post() { # url key -> writes headers to $WORK/h, body to $WORK/b, prints the status
    local args=(-sS -o "$WORK/b" -D "$WORK/h" -w '%{http_code}' -X POST -H 'Content-Type: application/json'
        --data-binary "$BODY")
    [[ -n $2 ]] && args+=(-H "Idempotency-Key: $2")
    curl "${args[@]}" "$1"
}
check_target() {
    local name=$1 port=$2 key=${3:-}
    local status
    status=$(post "http://127.0.0.1:$port/payments" "$key")
    [[ $status == 201 && $(<"$WORK/b") == "$RESPONSE" ]] ||
        die "$name: expected 201 $RESPONSE, got $status $(<"$WORK/b")"
    if [[ -n $key ]]; then
        grep -qi '^idempotent-replayed' "$WORK/h" && die "$name: the first request with $key was a replay"
        status=$(post "http://127.0.0.1:$port/payments" "$key")
        [[ $status == 201 && $(<"$WORK/b") == "$RESPONSE" ]] || die "$name: replay gave $status $(<"$WORK/b")"
        grep -qi '^idempotent-replayed: true' "$WORK/h" || die "$name: the second request with $key was not a replay"
    fi
    return 0
}

RUN=$STAMP-$$
REPLAY_KEY="replay-$RUN"
check_target upstream "$PORT_UPSTREAM"
check_target nginx-hop "$PORT_HOP"
check_target hyper-floor "$PORT_FLOOR"
check_target hyper-answer "$PORT_ANSWER"
check_target hyper-replay "$PORT_REPLAY" "$REPLAY_KEY"
check_target hyper-newkey "$PORT_NEWKEY" "$REPLAY_KEY"
check_target gateway-memory "$PORT_MEM" "$REPLAY_KEY"
check_target gateway-sqlite "$PORT_SQLITE" "$REPLAY_KEY"
if ((EXTRA)); then
    check_target gateway-memory-info "$PORT_MEM_INFO" "$REPLAY_KEY"
    check_target gateway-memory-shared "$PORT_MEM_SHARED" "$REPLAY_KEY"
    check_target gateway-sqlite-relaxed "$PORT_SQLITE_RELAXED" "$REPLAY_KEY"
    check_target gateway-sqlite-nocache "$PORT_SQLITE_NOCACHE" "$REPLAY_KEY"
    if [[ $(post "http://127.0.0.1:$PORT_MEM/plain" "") != 201 ]]; then
        die "gateway-memory: POST /plain was not passed through: $(<"$WORK/b")"
    fi
fi
if ((REDIS)); then
    # The scripts' SHAs, as the gateway sends them: read off MONITOR during one new key.
    redis-cli -p "$PORT_REDIS_SERVER" monitor >"$WORK/monitor.txt" &
    MONITOR_PID=$!
    sleep 0.5
    check_target gateway-redis "$PORT_REDIS" "$REPLAY_KEY"
    sleep 0.5
    kill "$MONITOR_PID" 2>/dev/null || true
    wait "$MONITOR_PID" 2>/dev/null || true
    mapfile -t SHAS < <(grep -o '"EVALSHA" "[0-9a-f]*"' "$WORK/monitor.txt" | awk '{ gsub(/"/, "", $2); print $2 }')
    ((${#SHAS[@]} >= 3)) || die "could not read the scripts' SHAs off MONITOR"
    CLAIM_SHA=${SHAS[0]} COMPLETE_SHA=${SHAS[1]}
    check_target gateway-redis-nocache "$PORT_REDIS_NOCACHE" "$REPLAY_KEY-nocache"
fi
if [[ -n ${BASELINE:-} ]]; then
    check_target gateway-memory-baseline "$PORT_BASE_MEM" "$REPLAY_KEY"
    check_target gateway-memory-info-baseline "$PORT_BASE_MEM_INFO" "$REPLAY_KEY"
    check_target gateway-sqlite-baseline "$PORT_BASE_SQLITE" "$REPLAY_KEY"
fi
# Each gateway now holds one completed key from its check: the SQLite one counts it.
SQLITE_ACKED=1

# ---------------------------------------------------------------------------------------
# CPU accounting from /proc, around each run: the ticks of a process and its children
# (nginx workers), of all our servers, of wrk (this shell's waited-for children), and of
# the whole machine. The machine's busy ticks minus ours are other load.
CLK_TCK=$(getconf CLK_TCK)
proc_ticks() {
    local total=0 pid line rest
    for pid in "$1" $(pgrep -P "$1" || true); do
        line=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        rest=${line##*) }
        read -r -a f <<<"$rest"
        # after "pid (comm) ", utime and stime are fields 14 and 15 of stat (0-based 11, 12)
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
servers_ticks() {
    local total=0 pid
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null && total=$((total + $(proc_ticks "$pid")))
    done
    echo "$total"
}
children_ticks() {
    local line rest
    line=$(<"/proc/$$/stat")
    rest=${line##*) }
    read -r -a f <<<"$rest"
    # cutime and cstime: fields 16 and 17 of stat (0-based 13 and 14 after "(comm) ")
    echo $((f[13] + f[14]))
}
machine_ticks() { # prints "busy total"
    local _cpu user nice system idle iowait irq softirq steal _rest
    read -r _cpu user nice system idle iowait irq softirq steal _rest </proc/stat
    echo "$((user + nice + system + irq + softirq + steal)) $((user + nice + system + idle + iowait + irq + softirq + steal))"
}
field() { sed -E "s/.* $1=([0-9.]+).*/\\1/" <<<"$2"; }

# ---------------------------------------------------------------------------------------
# Measuring. Per row (LABEL/MODE), each round appends its numbers to these lists.
ROWS=()
declare -A R_RPS R_P50 R_P99 R_NON2XX R_SOCK R_PCPU R_UCPU R_BUSY R_FOREIGN
FLAGGED=()

# measure ROUND LABEL MODE PORT PROXY_PID SCRIPT ARG
#
# The first round warms each target up first. A run during which other processes used
# more than FOREIGN_LIMIT percent of the machine is redone (up to ATTEMPTS times), then
# flagged.
measure() {
    local round=$1 label=$2 mode=$3 port=$4 pid=$5 script=$6 arg=$7
    local row="$label/$mode" url="http://127.0.0.1:$port/payments"
    local out="$RESULTS_DIR/wrk-$label-$mode.r$round.txt"
    local attempt run_arg warm_arg line n
    local p0 u0 s0 c0 m0 p1 u1 s1 c1 m1 mb0 mt0 mb1 mt1 foreign busy
    [[ -v "R_RPS[$row]" ]] || ROWS+=("$row")
    for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
        wait_for_quiet "$row"
        log "round $round: $row (wrk -t$THREADS -c$CONNECTIONS -d$DURATION), attempt $attempt"
        # New keys: every run and warm-up gets keys of its own. Replays: the completed key.
        run_arg=$arg warm_arg=$arg
        if [[ $script == new_keys.lua ]]; then
            run_arg="$arg-r$round-a$attempt"
            warm_arg="warm-$run_arg"
        fi
        if ((round == 1 && attempt == 1)); then
            "${WRK[@]}" -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$WORK/$script" "$url" -- "$warm_arg" \
                >"$RESULTS_DIR/wrk-$label-$mode.warmup.txt" 2>&1 || die "wrk failed against $label (warm-up)"
            if [[ $row == gateway-sqlite/new-keys ]]; then
                n=$(sed -nE 's/^RESULT requests=([0-9]+).*/\1/p' "$RESULTS_DIR/wrk-$label-$mode.warmup.txt")
                SQLITE_ACKED=$((SQLITE_ACKED + ${n:-0}))
            fi
        fi
        p0=$(proc_ticks "$pid") u0=$(proc_ticks "$PID_UPSTREAM") s0=$(servers_ticks) c0=$(children_ticks)
        m0=$(machine_ticks)
        "${WRK[@]}" -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$WORK/$script" "$url" -- "$run_arg" \
            >"$out" 2>&1 || die "wrk failed against $label; see $out"
        m1=$(machine_ticks)
        p1=$(proc_ticks "$pid") u1=$(proc_ticks "$PID_UPSTREAM") s1=$(servers_ticks) c1=$(children_ticks)
        line=$(grep '^RESULT ' "$out") || die "no RESULT line in $out"
        if [[ $row == gateway-sqlite/new-keys ]]; then
            SQLITE_ACKED=$((SQLITE_ACKED + $(field requests "$line")))
        fi
        read -r mb0 mt0 <<<"$m0"
        read -r mb1 mt1 <<<"$m1"
        foreign=$(awk -v b=$((mb1 - mb0)) -v ours=$((s1 - s0 + c1 - c0)) -v t=$((mt1 - mt0)) \
            'BEGIN { f = t ? 100 * (b - ours) / t : 0; printf "%.0f", f < 0 ? 0 : f }')
        busy=$(awk -v b=$((mb1 - mb0)) -v t=$((mt1 - mt0)) 'BEGIN { printf "%.0f", t ? 100 * b / t : 0 }')
        ((foreign <= FOREIGN_LIMIT)) && break
        log "  other processes used ${foreign}% of the machine during this run"
        if ((attempt < ATTEMPTS)); then
            sleep 20
        else
            FLAGGED+=("$row round $round: other processes used ${foreign}% of the machine during the run (after $ATTEMPTS attempts)")
        fi
    done
    local requests rps p50 p99 non2xx sockerr proxy_cpu upstream_cpu
    requests=$(field requests "$line") rps=$(field rps "$line") p50=$(field p50_us "$line") p99=$(field p99_us "$line")
    non2xx=$(field non2xx "$line")
    sockerr=$(($(field connect "$line") + $(field read "$line") + $(field write "$line") + $(field timeout "$line")))
    proxy_cpu=$(awk -v t=$((p1 - p0)) -v n="$requests" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", n ? t / hz * 1e6 / n : 0 }')
    upstream_cpu=$(awk -v t=$((u1 - u0)) -v n="$requests" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", n ? t / hz * 1e6 / n : 0 }')
    if ((non2xx > 0 || sockerr > 0)); then
        FLAGGED+=("$row round $round: $non2xx responses >= 400, $sockerr socket errors (see $out)")
    fi
    R_RPS[$row]+="$rps " R_P50[$row]+="$p50 " R_P99[$row]+="$p99 " R_NON2XX[$row]+="$non2xx "
    R_SOCK[$row]+="$sockerr " R_PCPU[$row]+="$proxy_cpu " R_UCPU[$row]+="$upstream_cpu "
    R_BUSY[$row]+="$busy " R_FOREIGN[$row]+="$foreign "
    log "  -> $rps req/s, p50 ${p50}us, p99 ${p99}us, non-2xx $non2xx, socket errors $sockerr, other load ${foreign}%"
}

for ((round = 1; round <= ROUNDS; round++)); do
    measure "$round" upstream new-keys "$PORT_UPSTREAM" "$PID_UPSTREAM" new_keys.lua "$RUN"
    measure "$round" nginx-hop new-keys "$PORT_HOP" "$PID_HOP" new_keys.lua "$RUN"
    measure "$round" hyper-floor new-keys "$PORT_FLOOR" "$PID_FLOOR" new_keys.lua "$RUN"
    measure "$round" hyper-answer replays "$PORT_ANSWER" "$PID_ANSWER" fixed_key.lua "$REPLAY_KEY"
    measure "$round" hyper-replay replays "$PORT_REPLAY" "$PID_REPLAY" fixed_key.lua "$REPLAY_KEY"
    measure "$round" hyper-newkey new-keys "$PORT_NEWKEY" "$PID_NEWKEY" new_keys.lua "$RUN"
    measure "$round" gateway-memory new-keys "$PORT_MEM" "$PID_MEM" new_keys.lua "$RUN"
    measure "$round" gateway-memory replays "$PORT_MEM" "$PID_MEM" fixed_key.lua "$REPLAY_KEY"
    measure "$round" gateway-sqlite new-keys "$PORT_SQLITE" "$PID_SQLITE" new_keys.lua "$RUN"
    measure "$round" gateway-sqlite replays "$PORT_SQLITE" "$PID_SQLITE" fixed_key.lua "$REPLAY_KEY"
    if ((REDIS)); then
        measure "$round" gateway-redis new-keys "$PORT_REDIS" "$PID_REDIS" new_keys.lua "$RUN"
        measure "$round" gateway-redis replays "$PORT_REDIS" "$PID_REDIS" fixed_key.lua "$REPLAY_KEY"
        measure "$round" gateway-redis-nocache new-keys "$PORT_REDIS_NOCACHE" "$PID_REDIS_NOCACHE" new_keys.lua "$RUN-nc"
        measure "$round" gateway-redis-nocache replays "$PORT_REDIS_NOCACHE" "$PID_REDIS_NOCACHE" fixed_key.lua \
            "$REPLAY_KEY-nocache"
    fi
    if [[ -n ${BASELINE:-} ]]; then
        measure "$round" gateway-memory-baseline new-keys "$PORT_BASE_MEM" "$PID_BASE_MEM" new_keys.lua "$RUN"
        measure "$round" gateway-memory-baseline replays "$PORT_BASE_MEM" "$PID_BASE_MEM" fixed_key.lua "$REPLAY_KEY"
        measure "$round" gateway-memory-baseline pass-through "$PORT_BASE_MEM" "$PID_BASE_MEM" plain.lua "$RUN"
        measure "$round" gateway-memory-info-baseline new-keys "$PORT_BASE_MEM_INFO" "$PID_BASE_MEM_INFO" \
            new_keys.lua "$RUN"
        measure "$round" gateway-sqlite-baseline new-keys "$PORT_BASE_SQLITE" "$PID_BASE_SQLITE" new_keys.lua "$RUN"
    fi
    if ((EXTRA)); then
        measure "$round" gateway-memory pass-through "$PORT_MEM" "$PID_MEM" plain.lua "$RUN"
        measure "$round" gateway-memory-info new-keys "$PORT_MEM_INFO" "$PID_MEM_INFO" new_keys.lua "$RUN"
        measure "$round" gateway-memory-shared new-keys "$PORT_MEM_SHARED" "$PID_MEM_SHARED" new_keys.lua "$RUN"
        measure "$round" gateway-memory-shared pass-through "$PORT_MEM_SHARED" "$PID_MEM_SHARED" plain.lua "$RUN"
        measure "$round" gateway-sqlite-relaxed new-keys "$PORT_SQLITE_RELAXED" "$PID_SQLITE_RELAXED" new_keys.lua "$RUN"
        measure "$round" gateway-sqlite-nocache replays "$PORT_SQLITE_NOCACHE" "$PID_SQLITE_NOCACHE" fixed_key.lua \
            "$REPLAY_KEY"
    fi
done

ACCESS_LINES="-"
if ((EXTRA)); then
    ACCESS_LINES=$(grep -c 'oncely::access' "$WORK/logs/gateway-memory-info.err.log" || true)
fi

# Every new-key request the SQLite gateway acknowledged must have left a completed
# record: stop it (gracefully: running operations store their results) and count.
kill -TERM "$PID_SQLITE"
for _ in $(seq 100); do
    kill -0 "$PID_SQLITE" 2>/dev/null || break
    sleep 0.1
done
wait "$PID_SQLITE" 2>/dev/null || true
SQLITE_STATS=$("$ONCELY" --log-level warn stats --store "sqlite://$WORK/bench.db" 2>&1 || true)
SQLITE_COMPLETED=$(sed -nE 's/^completed: ([0-9]+)/\1/p' <<<"$SQLITE_STATS")
SQLITE_INPROGRESS=$(sed -nE 's/^in_progress: ([0-9]+)/\1/p' <<<"$SQLITE_STATS")
STORE_CHECK="${SQLITE_COMPLETED:-?} completed records and ${SQLITE_INPROGRESS:-?} in progress after a graceful stop, for $SQLITE_ACKED new-key 201s counted by wrk (more records than 201s: requests in flight when wrk stops still complete)"
if [[ -z ${SQLITE_COMPLETED:-} ]] || ((SQLITE_COMPLETED < SQLITE_ACKED)); then
    FLAGGED+=("sqlite: fewer completed records (${SQLITE_COMPLETED:-?}) than acknowledged new keys ($SQLITE_ACKED)")
fi

# The Redis server's own ceiling for the gateway's command mix: the same scripts (by SHA),
# with arguments of the same shape (16-byte claim id, 32-byte fingerprint, 100-byte
# payload), from redis-benchmark with CONNECTIONS clients, without and with pipelining:
#   claim, new key   the claim script on random keys from a space of 10^9 (all but new);
#   complete         the complete script on a space of 100k keys all claimed beforehand
#                    (unmeasured), as many calls as keys: ~63% first completions, the rest
#                    repeats, which stop after one HMGET;
#   claim, replay    the claim script on one completed key.
# A new operation costs one claim and one complete; a replay one claim.
REDIS_CEILING=()
if ((REDIS)); then
    CLAIM_ID=cccccccccccccccc FP=ffffffffffffffffffffffffffffffff
    PAYLOAD=$(printf 'p%.0s' $(seq 100))
    RB_REQUESTS=${RB_REQUESTS:-300000}
    rb() { # label pipeline requests keyspace EVALSHA args...
        local label=$1 pipeline=$2 requests=$3 keyspace=$4
        shift 4
        local line rps
        line=$(redis-benchmark -h 127.0.0.1 -p "$PORT_REDIS_SERVER" -c "$CONNECTIONS" -n "$requests" -r "$keyspace" \
            -P "$pipeline" --csv "$@" 2>/dev/null | tail -1)
        rps=$(awk -F'","' '{ print $2 }' <<<"$line")
        [[ -n $label ]] && REDIS_CEILING+=("| $label | $pipeline | ${rps%.*} |")
        [[ -n $label ]] && log "redis-benchmark $label -P $pipeline: $rps ops/s"
        return 0
    }
    claim() { echo EVALSHA "$CLAIM_SHA" 1 "$1" "$CLAIM_ID" "$FP" key scope 30000 86400000 "$1:w" p; }
    complete() { echo EVALSHA "$COMPLETE_SHA" 1 "$1" "$CLAIM_ID" "$PAYLOAD" 86400000 "$1:w" p; }
    for pipeline in 1 16; do
        # shellcheck disable=SC2046 # the words are the command's arguments
        rb "claim, new key" "$pipeline" "$RB_REQUESTS" 1000000000 $(claim "new$pipeline:{__rand_int__}")
        # shellcheck disable=SC2046
        rb "" 16 500000 100000 $(claim "done$pipeline:{__rand_int__}")
        # shellcheck disable=SC2046
        rb "complete" "$pipeline" 100000 100000 $(complete "done$pipeline:{__rand_int__}")
        # shellcheck disable=SC2046
        redis-cli -p "$PORT_REDIS_SERVER" $(claim "replay$pipeline:{x}") >/dev/null
        # shellcheck disable=SC2046
        redis-cli -p "$PORT_REDIS_SERVER" $(complete "replay$pipeline:{x}") >/dev/null
        # shellcheck disable=SC2046
        rb "claim, replay" "$pipeline" "$RB_REQUESTS" 1 $(claim "replay$pipeline:{x}")
    done
fi

# ---------------------------------------------------------------------------------------
# Report: per row, the median over the rounds (errors: the sum; other load: the maximum).
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
total() { tr ' ' '\n' | awk '{ s += $1 } END { print s + 0 }'; }
maximum() { tr ' ' '\n' | grep -v '^$' | sort -g | tail -1; }
range() { tr ' ' '\n' | grep -v '^$' | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.0f–%.0f", lo, hi }'; }
us() { awk -v u="$1" 'BEGIN { if (u >= 1000) printf "%.2f ms", u / 1000; else printf "%d µs", u }'; }
med_rps() { median <<<"${R_RPS[$1]:-0}"; }
HOP=$(med_rps nginx-hop/new-keys)
ratio() { awk -v a="$1" -v b="$HOP" 'BEGIN { printf "%.2f", b ? a / b : 0 }'; }
verdict() { # row threshold
    local r
    r=$(ratio "$(med_rps "$1")")
    if awk -v r="$r" -v t="$2" 'BEGIN { exit !(r >= t) }'; then echo "met (${r}× ≥ ${2}×)"; else echo "MISSED (${r}× < ${2}×)"; fi
}

{
    echo "## Gateway load benchmark ($STAMP)"
    echo
    echo "- machine: $(nproc) CPUs ($(lscpu | sed -nE 's/^Model name:[[:space:]]+//p')), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)"
    echo "- wrk $(wrk -v 2>&1 | head -1 | awk '{ print $2 }'), nginx $("$NGINX" -v 2>&1 | sed 's/^nginx version: nginx\///'), $(rustc -V), $("$ONCELY" --version)"
    echo "- SQLite file system: $(df -T "$WORK" | awk 'NR == 2 { print $2 " on " $1 }')"
    echo "- load: \`${WRK[*]} -t$THREADS -c$CONNECTIONS -d$DURATION --latency\`, $ROUNDS interleaved rounds (medians below; a $WARMUP warm-up per target first), POST /payments, ${#BODY}-byte JSON body, Content-Type: application/json"
    echo "- nginx: worker_processes $NGINX_WORKERS, access_log off, keepalive_requests 1000000; hop: upstream keepalive 64, proxy_http_version 1.1, Connection \"\""
    echo "- gateways: \`required = true\` for POST/PATCH, other settings default (ttl 24h, lease 30s, reject); one proxy worker thread per CPU (\`server.workers\`, the default) unless the row says otherwise"
    echo "- wrk, both nginx instances and the gateway share the same $(nproc) CPUs: a row's req/s is what the whole box does, and CPU a proxy spends is taken from wrk and the upstream."
    for note in "${OTHER_LOAD_NOTES[@]}"; do echo "- other load: $note"; done
    echo
    echo "| target | mode | req/s (median) | req/s (range) | p50 | p99 | vs nginx hop | non-2xx, socket errors | proxy CPU µs/req | upstream CPU µs/req | box busy | other load (max) |"
    echo "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    for row in "${ROWS[@]}"; do
        label=${row%%/*} mode=${row#*/}
        rps=$(med_rps "$row")
        errors="$(total <<<"${R_NON2XX[$row]}"), $(total <<<"${R_SOCK[$row]}")"
        [[ $errors == "0, 0" ]] || errors="**$errors**"
        ucpu=$(median <<<"${R_UCPU[$row]}")
        [[ $label == upstream ]] && ucpu="-"
        printf '| %s | %s | %.0f | %s | %s | %s | %s× | %s | %s | %s | %s%% | %s%% |\n' "$label" "$mode" "$rps" \
            "$(range <<<"${R_RPS[$row]}")" "$(us "$(median <<<"${R_P50[$row]}")")" "$(us "$(median <<<"${R_P99[$row]}")")" \
            "$(ratio "$rps")" "$errors" "$(median <<<"${R_PCPU[$row]}")" "$ucpu" "$(median <<<"${R_BUSY[$row]}")" \
            "$(maximum <<<"${R_FOREIGN[$row]}")"
    done
    echo
    echo "Targets (median req/s over the nginx hop's median new-key req/s):"
    echo "- new keys, memory store ≥ 0.8×: $(verdict gateway-memory/new-keys 0.8)"
    echo "- new keys, SQLite (sync) ≥ 0.6×: $(verdict gateway-sqlite/new-keys 0.6)"
    echo "- replays, memory store ≥ 1.5×: $(verdict gateway-memory/replays 1.5)"
    echo "- replays, SQLite (its defaults) ≥ 1.5×: $(verdict gateway-sqlite/replays 1.5)"
    if ((EXTRA)); then
        echo "- pass-through, memory gateway ≥ 0.9×: $(verdict gateway-memory/pass-through 0.9)"
        echo "- replays, SQLite without the replay cache (--replay-cache false) ≥ 1.5×: $(verdict gateway-sqlite-nocache/replays 1.5)"
        echo "- access log: gateway-memory-info new keys at $(ratio "$(med_rps gateway-memory-info/new-keys)")× against $(ratio "$(med_rps gateway-memory/new-keys)")× at warn"
    fi
    if ((REDIS)); then
        echo "- new keys, Redis ≥ 0.5×: $(verdict gateway-redis/new-keys 0.5)"
        echo "- replays, Redis with the replay cache ≥ 1.5×: $(verdict gateway-redis/replays 1.5)"
    fi
    echo
    echo "The floor of this design (hyper-floor: the same HTTP stack forwarding as is) at $(ratio "$(med_rps hyper-floor/new-keys)")× the nginx hop; over the floor:"
    floor_ratio() { awk -v a="$(med_rps "$1")" -v b="$(med_rps hyper-floor/new-keys)" 'BEGIN { printf "%.2f", b ? a / b : 0 }'; }
    ((EXTRA)) && echo "- pass-through: $(floor_ratio gateway-memory/pass-through)×"
    echo "- new keys, memory store: $(floor_ratio gateway-memory/new-keys)×; SQLite: $(floor_ratio gateway-sqlite/new-keys)×"
    echo "- new keys, memory store, over hyper-newkey (a new key's floor, at $(ratio "$(med_rps hyper-newkey/new-keys)")× the hop): $(awk -v a="$(med_rps gateway-memory/new-keys)" -v b="$(med_rps hyper-newkey/new-keys)" 'BEGIN { printf "%.2f", b ? a / b : 0 }')×"
    echo "- replays, memory store, over hyper-replay (a replay's floor, at $(ratio "$(med_rps hyper-replay/replays)")× the hop; hyper-answer at $(ratio "$(med_rps hyper-answer/replays)")×): $(awk -v a="$(med_rps gateway-memory/replays)" -v b="$(med_rps hyper-replay/replays)" 'BEGIN { printf "%.2f", b ? a / b : 0 }')×"
    echo
    echo "- SQLite store check: $STORE_CHECK"
    echo "- access-log lines written by gateway-memory-info: $ACCESS_LINES"
    if ((REDIS)); then
        echo
        echo "Redis server ceiling, \`redis-benchmark -c $CONNECTIONS -n $RB_REQUESTS -r 1000000 -P N EVALSHA …\` ($(redis-server --version | awk '{ print $3 }'), appendonly yes, appendfsync everysec):"
        echo
        echo "| script | pipeline | ops/s |"
        echo "|---|---:|---:|"
        printf '%s\n' "${REDIS_CEILING[@]}"
    fi
    if ((${#FLAGGED[@]})); then
        echo
        echo "**FLAGGED RUNS**"
        for f in "${FLAGGED[@]}"; do echo "- $f"; done
    fi
} | tee "$RESULTS_DIR/summary.md"

# What each goal would need of the proxy, from the table above (see the script's docs).
if command -v python3 >/dev/null; then
    { echo; python3 "$(dirname "$0")/goal_budget.py" "$RESULTS_DIR/summary.md" "$(nproc)"; } \
        | tee -a "$RESULTS_DIR/summary.md"
fi

log "wrk outputs and summary.md in $RESULTS_DIR"
((${#FLAGGED[@]} == 0)) || exit 3
