# Shared by the bench scripts that source it (tls.sh, dynamodb.sh, cpu_split.sh,
# profile_vs_floor.sh, instructions.sh;
# bench/gateway.sh and postgres.sh still carry their own copies of these and should move
# here): logging, cleanup of what a script starts, installing tools, ports, an nginx
# upstream, and the wrk scripts.
#
#   BENCH_NAME=tls.sh; source "$ROOT/bench/lib.sh"
#
# A script appends the pid of each process it starts to PIDS and sets WORK (a scratch
# directory, removed on exit) and RESULTS_DIR (kept; the logs are copied there when the
# script fails).

log() { printf '[%s %(%H:%M:%S)T] %s\n' "${BENCH_NAME:-bench}" -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Kept when the script set them before sourcing this file (instructions.sh, cpu_split.sh,
# profile_vs_floor.sh and scale_gateway.sh make WORK first).
[[ -v PIDS ]] || PIDS=()
WORK=${WORK:-}
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

# The directory with PostgreSQL's initdb and postgres: Debian's newest, then PATH.
pg_bin() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x $dir/initdb && -x $dir/postgres ]] && { echo "$dir"; return 0; }
    done
    command -v initdb >/dev/null && dirname "$(readlink -f "$(command -v initdb)")"
}

# apt-get install PACKAGES, without starting their services.
install_packages() {
    (($#)) || return 0
    log "installing $*"
    local sudo=() policy=/usr/sbin/policy-rc.d made_policy=0
    ((EUID == 0)) || sudo=(sudo)
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod +x "$policy"
        made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "$@" ||
        { "${sudo[@]}" apt-get update && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y \
            --no-install-recommends "$@"; }
    ((made_policy)) && "${sudo[@]}" rm -f "$policy"
    return 0
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port pid name [seconds, default 30]
    local port=$1 pid=$2 name=$3 seconds=${4:-30} tries=0
    until port_open "$port"; do
        kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited before listening on $port; see the logs"
        ((tries++ < seconds * 10)) || die "$name did not listen on 127.0.0.1:$port within $seconds s"
        sleep 0.1
    done
}

# nginx on 127.0.0.1:PORT answering POST /payments with 201 and RESPONSE (one worker),
# and /plain the same (a path a gateway config can leave uncovered, for pass-through);
# anything else gets 405 or 404, so that a broken script shows in the error count.
start_nginx_upstream() { # port response
    local port=$1 response=$2 user_line=""
    local nginx
    nginx=$(command -v nginx || echo /usr/sbin/nginx)
    mkdir -p "$WORK/nginx"/{body,proxy,fastcgi,uwsgi,scgi} "$WORK/logs"
    ((EUID == 0)) && user_line="user root root;"
    cat >"$WORK/nginx/nginx.conf" <<CONF
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
        listen 127.0.0.1:$port;
        default_type application/json;
        location = /payments {
            if (\$request_method != POST) { return 405; }
            return 201 '$response';
        }
        location = /plain { return 201 '$response'; }
        location / { return 404; }
    }
}
CONF
    "$nginx" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" >"$WORK/logs/nginx.out.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port" "${PIDS[-1]}" nginx
}

# $WORK/oncely.toml: the gateway's configuration for measuring replays of one key: POST
# keyed and a key required, a duplicate meeting a running operation refused at once.
write_replay_config() {
    cat >"$WORK/oncely.toml" <<TOML
[defaults]
methods = ["POST"]
required = true
on_conflict = "reject"
TOML
}

# wrk scripts in $WORK posting BODY to /payments, each printing one line
# `RESULT requests=… rps=… p50_us=… p99_us=… non2xx=… errors=…` (errors: socket errors):
# new_keys.lua (a unique Idempotency-Key per request, prefixed with the script's
# argument) and fixed_key.lua (the argument).
write_wrk_scripts() { # body
    cat >"$WORK/common.lua" <<LUA
body = '$1'
function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("RESULT requests=%d rps=%.1f p50_us=%d p99_us=%d non2xx=%d errors=%d\n",
        summary.requests, summary.requests / (summary.duration / 1e6), latency:percentile(50),
        latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
LUA
    cat >"$WORK/new_keys.lua" <<LUA
dofile("$WORK/common.lua")
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
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
LUA
    cat >"$WORK/fixed_key.lua" <<LUA
dofile("$WORK/common.lua")
local req
function init(args)
    req = wrk.format("POST", "/payments", { ["Content-Type"] = "application/json", ["Idempotency-Key"] = args[1] }, body)
end
function request() return req end
LUA
}

# A route in $WORK/oncely.toml that leaves POST /plain uncovered (only PATCH is), so that
# the gateway passes it through untouched, and plain.lua, which posts BODY there (after
# write_wrk_scripts, whose common.lua it reads).
write_pass_through() { # body
    cat >>"$WORK/oncely.toml" <<'TOML'

[[routes]]
path = "/plain"
methods = ["PATCH"]
TOML
    cat >"$WORK/plain.lua" <<LUA
dofile("$WORK/common.lua")
wrk.method = "POST"; wrk.body = '$1'; wrk.headers["Content-Type"] = "application/json"
LUA
}

# A `RESULT` line's field.
field() { sed -E "s/.* $1=([0-9.]+).*/\\1/" <<<"$2"; }
# Of space-separated numbers on stdin: the median, the range, the sum.
median() { tr ' ' '\n' | grep -v '^$' | grep -v '^-$' | sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "-"; else print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
range() { tr ' ' '\n' | grep -v '^$' | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.0f–%.0f", lo, hi }'; }
total() { tr ' ' '\n' | awk '{ s += $1 } END { print s + 0 }'; }
