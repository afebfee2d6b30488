#!/usr/bin/env bash
# Cost per request from 1 thousand to 10 million records, through the gateway: two
# `oncely serve` gateways side by side in front of one nginx upstream, one holding SMALL
# records and one LARGE, then measured in ROUNDS interleaved rounds of wrk: new keys, and
# replays of keys drawn uniformly over the preloaded ones (each one a look-up of a
# different record, as far from the CPU caches as the store makes it). Prints a markdown
# table of the medians and LARGE/SMALL, in req/s and in the gateway's CPU per request,
# with the share of that CPU each kind of thread took (HTTP workers, SQLite's readers and
# writer). The engine-and-store view of the same question is
# `cargo bench -p oncely --bench scale` (and `-p oncely-sqlite`); this is what a client
# of the gateway sees.
#
#   ONCELY_BIN=target/release/oncely bash bench/scale_gateway.sh
#   STORE_KIND=sqlite ONCELY_BIN=target/release/oncely bash bench/scale_gateway.sh
#
# STORE_KIND=memory (default): both gateways are preloaded through HTTP (new keys
#   scale-0 …), and replays are drawn over all of them. LARGE=10000000 needs about 8 GiB
#   of memory and 6-8 minutes of preloading on 2 cores.
# STORE_KIND=sqlite: each gateway has its own file (durability sync, the default; the
#   replay cache off, its default for SQLite). SMALL, and REPLAY_KEYS (100000) of the
#   large one's records, are written through HTTP; the large gateway is then stopped and
#   its file filled up to LARGE rows by direct inserts (copies of a written row under
#   random storage keys, so that the B-trees have LARGE rows' depth), checkpointed, and
#   the gateway started again. The written rows are scattered among the others in the
#   key's index either way; in the table (rowid order), ROWS=spread (default) moves them
#   to rowids spread over the whole table (any record replayed: the worst case for the
#   pages a replay and its hit count's flush read), ROWS=recent to its end, where the
#   newest rows of a table that grew over time are (retries replay recent keys). Replays
#   are drawn over the HTTP-written keys. About 3 GB of disk at 10 million, under TMPDIR
#   (/tmp by default), which must not be a tmpfs.
# Knobs: SMALL=1000 LARGE=10000000 ROUNDS=3 DURATION=7s WARMUP=2s THREADS=2 CONNECTIONS=32
#   BASE_PORT=19680 REPLAY_KEYS=100000 STORE_OPTIONS= (more of the store URL's options
#   for both gateways, e.g. STORE_OPTIONS='mmap_size=2GiB'). Each gateway's store is
#   opened with bounds above LARGE; the sweeper runs at its default interval (60 s)
#   throughout, finding nothing expired. After the rounds, one /metrics scrape of each
#   gateway is timed (it calls the store's stats()).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ONCELY=${ONCELY_BIN:-$ROOT/target/release/oncely}
SMALL=${SMALL:-1000}
LARGE=${LARGE:-10000000}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-7s}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
BASE_PORT=${BASE_PORT:-19680}
STORE_KIND=${STORE_KIND:-memory}
REPLAY_KEYS=${REPLAY_KEYS:-100000}
ROWS=${ROWS:-spread}
RESPONSE='{"id":"ch_1","amount":1999}'
BODY='{"amount":1999,"currency":"usd"}'
PIDS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/oncely-scale.XXXXXX")
RESULTS_DIR=${RESULTS_DIR:-$ROOT/target/bench-scale-gateway/$(date -u +%Y%m%dT%H%M%SZ)}
BENCH_NAME=scale_gateway.sh
source "$ROOT/bench/lib.sh"
[[ $STORE_KIND == memory || $STORE_KIND == sqlite ]] || die "STORE_KIND is memory or sqlite"
[[ $ROWS == spread || $ROWS == recent ]] || die "ROWS is spread or recent"
[[ $STORE_KIND == memory || $(stat -f -c %T "$WORK") != tmpfs ]] ||
    die "$WORK is on a tmpfs, where SQLite's file would be memory and its syncs free; set TMPDIR to a directory on disk"
[[ -x $ONCELY ]] || die "no gateway binary at $ONCELY (cargo build --release -p oncely-gateway, or ONCELY_BIN=)"
command -v wrk >/dev/null || install_packages wrk
command -v nginx >/dev/null || install_packages nginx-light
mkdir -p "$RESULTS_DIR" "$WORK/logs"
log "results in $RESULTS_DIR"

write_wrk_scripts "$BODY"
# Keys scale-0 … scale-(N-1), split between wrk's threads; a thread stops once its share
# is acknowledged (201, not a replay) and says so. Requests sent meanwhile past the share
# take keys past N. wrk itself runs to its duration: preload() ends it once every thread
# has said it is done.
cat >"$WORK/preload.lua" <<LUA
dofile("$WORK/common.lua")
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
local n, next_key, acked, share, first
local headers = { ["Content-Type"] = "application/json" }
function init(args)
    n = tonumber(args[1]); threads = tonumber(args[2])
    next_key = tid - 1
    share = math.floor((n - tid) / threads) + 1
    acked = 0
end
function request()
    local key = next_key
    next_key = next_key + threads
    headers["Idempotency-Key"] = "scale-" .. key
    return wrk.format("POST", "/payments", headers, body)
end
function response(status, headers, body)
    if status == 201 and not headers["idempotent-replayed"] then acked = acked + 1 end
    if acked == share then io.write("PRELOADED thread " .. tid .. "\n"); io.flush(); wrk.thread:stop() end
end
LUA
# Replays of keys drawn uniformly from scale-0 … scale-(N-1).
cat >"$WORK/spread.lua" <<LUA
dofile("$WORK/common.lua")
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
local n
local headers = { ["Content-Type"] = "application/json" }
function init(args) n = tonumber(args[1]); math.randomseed(os.time() * 1000 + tid) end
function request()
    headers["Idempotency-Key"] = "scale-" .. math.random(0, n - 1)
    return wrk.format("POST", "/payments", headers, body)
end
LUA
write_replay_config

PORT_UPSTREAM=$BASE_PORT PORT_SMALL=$((BASE_PORT + 1)) PORT_LARGE=$((BASE_PORT + 2))
ADMIN_SMALL=$((BASE_PORT + 3)) ADMIN_LARGE=$((BASE_PORT + 4))
start_nginx_upstream "$PORT_UPSTREAM" "$RESPONSE"
store_url() { # name
    case $STORE_KIND in
        memory) echo "memory://?max_entries=$((LARGE * 2 + 1000000))&max_bytes=32GiB${STORE_OPTIONS:+&$STORE_OPTIONS}" ;;
        sqlite) echo "sqlite://$WORK/$1.db?max_records=$((LARGE * 2 + 1000000))&max_bytes=64GiB${STORE_OPTIONS:+&$STORE_OPTIONS}" ;;
    esac
}
start_gateway() { # name port admin_port; sets PID
    "$ONCELY" --log-level warn serve --upstream "http://127.0.0.1:$PORT_UPSTREAM" --listen "127.0.0.1:$2" \
        --admin-listen "127.0.0.1:$3" --store "$(store_url "$1")" --config "$WORK/oncely.toml" >>"$WORK/logs/$1.log" 2>&1 &
    PIDS+=($!)
    PID=${PIDS[-1]}
    wait_port "$2" "$PID" "$1"
}
start_gateway small "$PORT_SMALL" "$ADMIN_SMALL" && PID_SMALL=$PID
start_gateway large "$PORT_LARGE" "$ADMIN_LARGE" && PID_LARGE=$PID

rss_mib() { awk '/^VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
preload() { # name port n
    local start=$SECONDS
    log "preloading $1 with $3 records"
    local out="$RESULTS_DIR/preload-$1.txt" pid
    wrk -t"$THREADS" -c"$CONNECTIONS" -d3600s -s "$WORK/preload.lua" "http://127.0.0.1:$2/payments" -- "$3" "$THREADS" \
        >"$out" 2>&1 &
    pid=$!
    until (($(grep -c '^PRELOADED' "$out") == THREADS)); do
        kill -0 "$pid" 2>/dev/null || die "wrk ended before preloading $1; see $out"
        ((SECONDS - start < 3600)) || die "preloading $1 took over an hour"
        sleep 1
    done
    kill -INT "$pid" 2>/dev/null || true
    wait "$pid" || true
    log "  $1: preloaded in $((SECONDS - start)) s"
}
# Fills the stopped large gateway's file up to LARGE rows (see the header); prints the
# file's bytes per row once checkpointed.
fill_sqlite() { # file rows
    python3 - "$1" "$2" "$ROWS" <<'PY'
import sqlite3, sys, time
path, target = sys.argv[1], int(sys.argv[2])
assert sqlite3.sqlite_version_info >= (3, 37), f"SQLite {sqlite3.sqlite_version} cannot read STRICT tables"
conn = sqlite3.connect(path, isolation_level=None)
# The usage triggers call octet_length, which SQLite has from 3.43; an older library
# (Python's) is given it, for the text and blobs they pass.
conn.create_function("octet_length", 1, lambda v: None if v is None else len(v.encode() if isinstance(v, str) else v),
                     deterministic=True)
# Setup only: no journal, no syncs, a page cache large enough for the indexes.
conn.execute("PRAGMA journal_mode = OFF")
conn.execute("PRAGMA synchronous = OFF")
conn.execute("PRAGMA cache_size = -4194304")
columns = "storage_key, key, scope, fingerprint, created_at, expires_at, state, claim_id, lease_until, payload, completed_at, hits"
written = conn.execute(f"SELECT {columns} FROM records").fetchall()
assert 0 < len(written) <= target, f"{len(written)} rows written over HTTP, for {target} in all"
template = next(row for row in written if row[6] == 1)
# Rowids 1 … target: the rows written over HTTP (the ones replayed) take len(written) of
# them, the fill the rest. ROWS=spread: spread evenly, so a replay's reads and its hit
# count's write land anywhere in the table, not only in the key's index (any record
# replayed). ROWS=recent: the last ones, where SQLite puts the newest rows of a table
# that grew over time (retries replay recent keys). Each written row is taken out and put
# back at its place.
n, rows_mode = len(written), sys.argv[3]
spots = [j * target // n + 1 for j in range(n)] if rows_mode == "spread" else list(range(target - n + 1, target + 1))
conn.execute("BEGIN")
conn.execute("DELETE FROM records")
conn.execute("CREATE TEMP TABLE spots (n INTEGER PRIMARY KEY)")
conn.executemany("INSERT INTO spots (n) VALUES (?)", ((n,) for n in spots))
conn.execute("COMMIT")
started, batch = time.time(), 1_000_000
for low in range(1, target + 1, batch):
    high = min(low + batch - 1, target)
    conn.execute("BEGIN")
    conn.execute(
        f"""WITH RECURSIVE i(n) AS (SELECT ?1 UNION ALL SELECT n + 1 FROM i WHERE n < ?2)
        INSERT INTO records (rowid, {columns})
        SELECT i.n, randomblob(32), 'fill-' || i.n, ?3, ?4, ?5, ?6, 1, NULL, NULL, ?7, ?8, 0
        FROM i WHERE i.n NOT IN (SELECT n FROM spots)""",
        (low, high, template[2], template[3], template[4], template[5], template[9], template[10]),
    )
    conn.execute("COMMIT")
    print(f"  filled rowids up to {high} of {target} ({high / (time.time() - started):.0f}/s)", file=sys.stderr)
conn.execute("BEGIN")
conn.executemany(f"INSERT INTO records (rowid, {columns}) VALUES (?, {', '.join('?' * 12)})",
                 ((spot, *row) for spot, row in zip(spots, written)))
conn.execute("COMMIT")
conn.execute("PRAGMA journal_mode = WAL")
rows = conn.execute("SELECT records FROM records_usage WHERE id = 0").fetchone()[0]
assert rows == target, f"the usage row counts {rows}, not {target}"
pages, size = conn.execute("PRAGMA page_count").fetchone()[0], conn.execute("PRAGMA page_size").fetchone()[0]
conn.close()
print(f"{pages * size / rows:.0f}")
PY
}
preload small "$PORT_SMALL" "$SMALL"
if [[ $STORE_KIND == memory ]]; then
    preload large "$PORT_LARGE" "$LARGE"
    REPLAYED=$LARGE
else
    ((REPLAY_KEYS <= LARGE)) || die "REPLAY_KEYS ($REPLAY_KEYS) is more than LARGE ($LARGE)"
    preload large "$PORT_LARGE" "$REPLAY_KEYS"
    REPLAYED=$REPLAY_KEYS
    kill -TERM "$PID_LARGE"
    wait "$PID_LARGE" || true
    start=$SECONDS
    log "filling large.db up to $LARGE rows"
    BYTES_PER_ROW=$(fill_sqlite "$WORK/large.db" "$LARGE") || die "the fill failed"
    log "  filled in $((SECONDS - start)) s; $BYTES_PER_ROW bytes of file per row"
    start_gateway large "$PORT_LARGE" "$ADMIN_LARGE" && PID_LARGE=$PID
fi
# The preloaded keys must now be replays: sample the ends and the middle. (Not scale-0:
# wrk's first request of the first connection is built before that connection exists and
# is not always the one sent; the rounds below store it if it is drawn.)
for spec in "small $PORT_SMALL $SMALL" "large $PORT_LARGE $REPLAYED"; do
    read -r name port n <<<"$spec"
    for key in 1 $((n / 2)) $((n - 1)); do
        curl -s -o /dev/null -D "$WORK/h" -X POST -H 'Content-Type: application/json' -H "Idempotency-Key: scale-$key" \
            --data "$BODY" "http://127.0.0.1:$port/payments" || die "$name: no answer for scale-$key"
        grep -qi '^idempotent-replayed: true' "$WORK/h" ||
            die "$name: scale-$key was not stored by the preload: $(tr -d '\r' <"$WORK/h" | tr '\n' ' ')"
    done
done
RSS_SMALL=$(rss_mib "$PID_SMALL") RSS_LARGE=$(rss_mib "$PID_LARGE")
log "RSS after preloading: small $RSS_SMALL MiB, large $RSS_LARGE MiB"

# The gateway's CPU time (user + system, in clock ticks) and the bytes it has had written
# to storage, for the CPU and disk cost per request of a round: steadier than req/s on a
# shared box, where the load generator and other work take their share of the cores.
TICK_US=$((1000000 / $(getconf CLK_TCK)))
cost_sample() { # pid
    local stat
    stat=$(<"/proc/$1/stat")
    read -r -a f <<<"${stat##*) }"
    echo "$((f[11] + f[12])) $(awk '/^write_bytes/ { print $2 }' "/proc/$1/io")"
}
# The same ticks per thread, summed by thread name without its number (the HTTP workers,
# SQLite's readers, its writer): which part of the gateway a round's CPU went to.
thread_ticks() { # pid
    local task stat
    for task in /proc/"$1"/task/*; do
        stat=$(<"$task/stat") || continue
        read -r -a f <<<"${stat##*) }"
        echo "$(tr ' ' _ <"$task/comm") $((f[11] + f[12]))"
    done | awk '{ sub(/-[0-9]+$/, "", $1); ticks[$1] += $2 } END { for (name in ticks) print name, ticks[name] }' | sort
}
# "name share%, …" of the ticks between two thread_ticks samples.
thread_shares() { # before after
    join <(echo "$1") <(echo "$2") |
        awk '{ d[$1] = $3 - $2; total += $3 - $2 }
             END { for (n in d) if (d[n] > 0) printf "%s %.0f%%\n", n, 100 * d[n] / total }' |
        sort -k2 -rn | paste -sd, - | sed 's/,/, /g'
}
declare -A RPS CPU WRITTEN THREADS_SPLIT
measure() { # round name port mode n pid
    # New keys: a prefix of their own for each run and warm-up. Replays: the key count.
    local out="$RESULTS_DIR/wrk-$2-$4.r$1.txt" script arg warm_arg
    case $4 in
        new-keys) script=new_keys.lua arg="new-$2-r$1" warm_arg="warm-new-$2-r$1" ;;
        replays) script=spread.lua arg=$5 warm_arg=$5 ;;
    esac
    if (($1 == 1)); then
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$WORK/$script" "http://127.0.0.1:$3/payments" -- "$warm_arg" \
            >"$RESULTS_DIR/wrk-$2-$4.warmup.txt" 2>&1 || die "wrk failed warming up $2"
    fi
    local before after threads_before
    threads_before=$(thread_ticks "$6")
    before=$(cost_sample "$6")
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$WORK/$script" "http://127.0.0.1:$3/payments" -- "$arg" \
        >"$out" 2>&1 || die "wrk failed: $out"
    after=$(cost_sample "$6")
    THREADS_SPLIT[$2/$4]=$(thread_shares "$threads_before" "$(thread_ticks "$6")")
    local line requests
    line=$(grep '^RESULT ' "$out") || die "no RESULT in $out"
    [[ $(field non2xx "$line") == 0 && $(field errors "$line") == 0 ]] || die "errors in $out: $line"
    requests=$(field requests "$line")
    RPS[$2/$4]+=" $(field rps "$line")"
    read -r ticks0 written0 <<<"$before"
    read -r ticks1 written1 <<<"$after"
    CPU[$2/$4]+=" $(awk -v t=$((ticks1 - ticks0)) -v us="$TICK_US" -v n="$requests" 'BEGIN { printf "%.1f", t * us / n }')"
    WRITTEN[$2/$4]+=" $(awk -v b=$((written1 - written0)) -v n="$requests" 'BEGIN { printf "%.0f", b / n }')"
    log "round $1: $2 $4: $(field rps "$line") req/s, ${CPU[$2/$4]##* } µs of CPU and ${WRITTEN[$2/$4]##* } B of page cache dirtied per request"
    log "  by thread: ${THREADS_SPLIT[$2/$4]}"
}
for ((round = 1; round <= ROUNDS; round++)); do
    for mode in replays new-keys; do
        measure "$round" small "$PORT_SMALL" "$mode" "$SMALL" "$PID_SMALL"
        measure "$round" large "$PORT_LARGE" "$mode" "$REPLAYED" "$PID_LARGE"
    done
done

list() { sed 's/^ *//; s/ \+/, /g'; }
scrape_ms() { # port
    curl -s -o /dev/null -w '%{time_total}' "http://127.0.0.1:$1/metrics" | awk '{ printf "%.0f", $1 * 1000 }'
}
{
    echo "| $STORE_KIND store${STORE_OPTIONS:+ ($STORE_OPTIONS)}$([[ $STORE_KIND == sqlite ]] && echo ", ROWS=$ROWS") | $SMALL records | $LARGE records | large / small |"
    echo "|---|---:|---:|---:|"
    for mode in replays new-keys; do
        s=$(median <<<"${RPS[small/$mode]}") l=$(median <<<"${RPS[large/$mode]}")
        echo "| $mode (req/s, median of $ROUNDS; rounds $(range <<<"${RPS[small/$mode]}") and $(range <<<"${RPS[large/$mode]}")) | $s | $l | $(awk -v s="$s" -v l="$l" 'BEGIN { printf "%.2f×", l / s }') |"
    done
    # CPU per request: the ratio is small / large, so that, like req/s, below 1 is slower.
    for mode in replays new-keys; do
        s=$(median <<<"${CPU[small/$mode]}") l=$(median <<<"${CPU[large/$mode]}")
        echo "| $mode, the gateway's CPU per request (µs, median; rounds $(list <<<"${CPU[small/$mode]}") and $(list <<<"${CPU[large/$mode]}")) | $s | $l | $(awk -v s="$s" -v l="$l" 'BEGIN { printf "%.2f×", s / l }') |"
    done
    if [[ $STORE_KIND == sqlite ]]; then
        for mode in replays new-keys; do
            echo "| $mode, page-cache bytes the gateway dirtied per request (write_bytes, median) | $(median <<<"${WRITTEN[small/$mode]}") | $(median <<<"${WRITTEN[large/$mode]}") | |"
        done
        echo "| file bytes per row, after the fill's checkpoint | | $BYTES_PER_ROW | |"
    fi
    for mode in replays new-keys; do
        echo "| $mode, the gateway's CPU by thread (last round) | ${THREADS_SPLIT[small/$mode]} | ${THREADS_SPLIT[large/$mode]} | |"
    done
    echo "| RSS after preloading (MiB) | $RSS_SMALL | $RSS_LARGE | |"
    echo "| one /metrics scrape after the rounds (ms) | $(scrape_ms "$ADMIN_SMALL") | $(scrape_ms "$ADMIN_LARGE") | |"
} | tee "$RESULTS_DIR/summary.md"
