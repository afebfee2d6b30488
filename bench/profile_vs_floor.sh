#!/usr/bin/env bash
# What the gateway spends per request above the floor of its design, symbol by symbol:
# `perf record` of the gateway and of the floor (examples/floor_proxy.rs: the same HTTP
# stack doing nothing else) under the same wrk load, one after the other, each sample
# turned into µs of CPU per request (samples ÷ frequency ÷ requests), then grouped
# (kernel, hyper, tokio, http, malloc, ours, …) and diffed by bench/profile_vs_floor.py.
#
#   ONCELY_BIN=target/release/oncely FLOOR_BIN=target/release/examples/floor_proxy \
#     bash bench/profile_vs_floor.sh pass-through|new-keys|replays|answers
#
# pass-through and new keys are compared with the floor forwarding, replays with the
# floor replaying (`--replay`: the fingerprint, the storage key, a map look-up, and the
# stored answer, the work this design requires of a replay), answers with the floor
# answering by itself (`--answer`) and the gateway replaying. The gateway runs on memory://, --log-level warn.
# Needs perf, wrk and nginx (bench/gateway.sh installs the last two). Knobs: DURATION=7
# (seconds of wrk; perf records 5 of them), FREQ=1999, THREADS=2, CONNECTIONS=32.
set -euo pipefail
MODE=${1:?"usage: profile_vs_floor.sh pass-through|new-keys|replays|answers"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ONCELY=${ONCELY_BIN:-$ROOT/target/release/oncely}
FLOOR=${FLOOR_BIN:-$ROOT/target/release/examples/floor_proxy}
DURATION=${DURATION:-7} FREQ=${FREQ:-1999} THREADS=${THREADS:-2} CONNECTIONS=${CONNECTIONS:-32}
RESPONSE='{"id":"ch_1","amount":1999}'
BODY='{"amount":1999,"currency":"usd"}'
WORK=$(mktemp -d /tmp/oncely-profile.XXXXXX)
OUT=${RESULTS_DIR:-$ROOT/target/profile-vs-floor/$MODE-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT" "$WORK/nginx"/{body,proxy,fastcgi,uwsgi,scgi,logs}
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
for tool in perf wrk nginx; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || { echo "needs $tool" >&2; exit 2; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cat >"$WORK/nginx/nginx.conf" <<NGINX
daemon off; worker_processes 1; pid $WORK/nginx/nginx.pid; error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $WORK/nginx/body; proxy_temp_path $WORK/nginx/proxy; fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi; scgi_temp_path $WORK/nginx/scgi;
  server { listen 127.0.0.1:19280; default_type application/json;
    location = /payments { return 201 '$RESPONSE'; }
    location = /plain { return 201 '$RESPONSE'; } } }
NGINX
# /plain is not covered by the layer: a pass-through.
cat >"$WORK/oncely.toml" <<TOML
[defaults]
methods = ["POST"]
required = true
on_conflict = "reject"
[[routes]]
path = "/plain"
methods = ["PATCH"]
TOML
cat >"$WORK/new.lua" <<LUA
local n = 0
function setup(thread) n = n + 1; thread:set("tid", n) end
local c = 0
function request()
  c = c + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["Idempotency-Key"] = "p" .. tid .. "-" .. os.time() .. "-" .. c}, '$BODY')
end
LUA
cat >"$WORK/fixed.lua" <<LUA
wrk.method = "POST"; wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"; wrk.headers["Idempotency-Key"] = "profile-replay"
LUA
cat >"$WORK/plain.lua" <<LUA
wrk.method = "POST"; wrk.body = '$BODY'; wrk.headers["Content-Type"] = "application/json"
LUA

"$NGINX" -p "$WORK/nginx/" -c "$WORK/nginx/nginx.conf" >/dev/null 2>&1 & PIDS+=($!)
case $MODE in
    pass-through) SCRIPT=plain.lua; PATH_=/plain; FLOOR_ARGS=(127.0.0.1:19280) ;;
    new-keys) SCRIPT=new.lua; PATH_=/payments; FLOOR_ARGS=(127.0.0.1:19280) ;;
    replays) SCRIPT=fixed.lua; PATH_=/payments; FLOOR_ARGS=(--replay "$RESPONSE") ;;
    answers) SCRIPT=fixed.lua; PATH_=/payments; FLOOR_ARGS=(--answer "$RESPONSE") ;;
    *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac
"$FLOOR" 127.0.0.1:19281 "${FLOOR_ARGS[@]}" >"$WORK/floor.log" 2>&1 & PID_FLOOR=$!; PIDS+=($PID_FLOOR)
"$ONCELY" --log-level warn serve --upstream http://127.0.0.1:19280 --listen 127.0.0.1:19282 \
    --store memory:// --config "$WORK/oncely.toml" >"$WORK/gateway.log" 2>&1 & PID_GATEWAY=$!; PIDS+=($PID_GATEWAY)
for port in 19280 19281 19282; do
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done
# The replayed key exists before the load starts.
curl -s -o /dev/null -X POST -H 'Content-Type: application/json' -H 'Idempotency-Key: profile-replay' \
    -d "$BODY" "http://127.0.0.1:19282/payments"

profile() { # name pid port
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" -s "$WORK/$SCRIPT" "http://127.0.0.1:$3$PATH_" >"$OUT/wrk-$1.txt" &
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
