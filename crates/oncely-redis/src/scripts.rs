//! The Lua scripts: every state change of a record is one of these, run by `EVALSHA`.
//!
//! **Atomicity.** Redis runs a script to the end before it serves another command, so each
//! script is one atomic step: no client can see or change the record between the read and
//! the write inside it. That is what makes claim "one atomic step that returns the
//! existing record", with no get-then-set on the client.
//!
//! **Time.** Every script reads the server's clock with `TIME`; the client's clock is never
//! used, so a client with a skewed clock cannot shorten or stretch another client's lease.
//! Redis replicates a script's effects, not the script, so `TIME` is allowed before
//! writes and replicas apply the same values.
//!
//! **Replays write nothing.** The claim script writes only when it creates or takes over a
//! record; one that finds a completed record reads it and returns. Hits are not counted
//! there: the engine counts them in the process and flushes them in batches through the
//! hits script, which is the only script with several keys.
//!
//! **Cluster.** A script touches exactly one key, `KEYS[1]`, the record's hash (the hits
//! script: several records, all of one slot, since the store groups a batch by slot). Its
//! wake-up channel (the second-to-last `ARGV`) shares the hash tag `{<storage key>}`, so a
//! sharded `SPUBLISH` from inside the script stays in the script's slot. The channel is
//! deliberately not declared in `KEYS`: it never exists as a key, and while its slot is
//! being migrated Redis answers a multi-key command with a missing key `TRYAGAIN`.
//!
//! **Re-delivery.** The Cluster client resends a command whose connection dropped, which
//! the server may already have run. Every script answers a second delivery as it did the
//! first: a claim that finds its own claim id in progress is acquired, a first-seen that
//! finds its own token is new, a repeated completion by the holder succeeds.
//!
//! **Expiry.** The scripts treat a record whose `e` (expires at, ms) has passed as absent,
//! whatever Redis has collected; `PEXPIREAT` at the same instant is only the garbage
//! collection, on the same clock.
//!
//! Every script but the hits and replica-read scripts gets the wake-up channel and the
//! pub/sub mode as its last two `ARGV` (`p` for `PUBLISH`, `s` for sharded `SPUBLISH` on
//! Cluster).
//!
//! The record is a hash with short field names (they are stored once per record):
//!
//! | field | meaning |
//! |---|---|
//! | `s` | state: `p` in progress, `c` completed |
//! | `c` | claim id, 16 bytes (kept after completion, so a repeated `complete` is recognised) |
//! | `l` | lease until, ms since the epoch (in progress only) |
//! | `f` | fingerprint, 32 bytes, or empty |
//! | `k`, `o` | the raw key and scope, for inspection |
//! | `t`, `e` | created at, expires at (ms) |
//! | `p`, `d`, `h` | payload, completed at (ms), hits flushed so far (completed only) |

use std::sync::LazyLock;

use redis::Script;

/// Reads the server clock into `now` (ms) and defines `publish`, which wakes waiters on the
/// channel in `ARGV[#ARGV - 1]` by `PUBLISH` or, on Cluster, sharded `SPUBLISH`.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function ms(x) return string.format('%.0f', x) end
local function publish()
  local channel = ARGV[#ARGV - 1]
  if ARGV[#ARGV] == 's' then redis.call('SPUBLISH', channel, '1') else redis.call('PUBLISH', channel, '1') end
end
-- The record's state, claim id and expiry when ARGV[1]'s claim holds it in progress.
local function held()
  local r = redis.call('HMGET', KEYS[1], 's', 'c', 'e')
  if r[1] ~= 'p' or tonumber(r[3]) <= now or r[2] ~= ARGV[1] then return nil end
  return r
end
local function live()
  local e = redis.call('HGET', KEYS[1], 'e')
  return e and tonumber(e) > now
end
"#;

/// Claim. ARGV: claim id, fingerprint (empty for none), raw key, scope, lease ms,
/// retention ms, channel, pub/sub mode. Returns `{'a'}` acquired, `{'t'}` taken over,
/// `{'c', payload, completed at, hits, expires at}` completed, `{'i', lease until}` in progress, or
/// `{'m'}` mismatch. The record lives at least as long as the lease, so it cannot expire
/// under a live claim.
///
/// **A replay is a read.** On a completed record (and on an in-progress one, a mismatch
/// or a re-delivery) the script runs only `TIME` and `HMGET`: Redis 7 replicates a
/// script's effects, so a script that wrote nothing sends nothing to the AOF or the
/// replicas and leaves the server's dirty counter as it was. Hits are counted by the
/// engine and flushed with the hits script.
const CLAIM: &str = r#"
local r = redis.call('HMGET', KEYS[1], 's', 'l', 'f', 'e', 'c', 'p', 'd', 'h')
local lease_until = now + tonumber(ARGV[5])
local expires = math.max(now + tonumber(ARGV[6]), lease_until)
if r[1] and tonumber(r[4]) > now then
  if r[3] ~= ARGV[2] then
    return {'m'}
  end
  if r[1] == 'c' then
    return {'c', r[6], r[7], r[8], r[4]}
  end
  if r[5] == ARGV[1] then
    return {'a'}
  end
  if tonumber(r[2]) > now then
    return {'i', r[2]}
  end
  redis.call('HSET', KEYS[1], 'c', ARGV[1], 'l', ms(lease_until), 'e', ms(expires))
  redis.call('PEXPIREAT', KEYS[1], ms(expires))
  publish()
  return {'t'}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 's', 'p', 'c', ARGV[1], 'l', ms(lease_until), 'f', ARGV[2],
  'k', ARGV[3], 'o', ARGV[4], 't', ms(now), 'e', ms(expires))
redis.call('PEXPIREAT', KEYS[1], ms(expires))
return {'a'}
"#;

/// Complete. ARGV: claim id, payload, retention ms, channel, pub/sub mode. Returns 1, or 0 when the
/// claim no longer holds the record. A second `complete` by the same claim (a retry after
/// a lost reply) answers 1 and changes nothing.
const COMPLETE: &str = r#"
local r = redis.call('HMGET', KEYS[1], 's', 'c', 'e')
if not r[1] or tonumber(r[3]) <= now or r[2] ~= ARGV[1] then return 0 end
if r[1] == 'c' then return 1 end
local expires = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 's', 'c', 'p', ARGV[2], 'd', ms(now), 'h', '0', 'e', ms(expires))
redis.call('HDEL', KEYS[1], 'l')
redis.call('PEXPIREAT', KEYS[1], ms(expires))
publish()
return 1
"#;

/// Release. ARGV: claim id, channel, pub/sub mode. Returns 1, or 0 when the claim does not hold it.
const RELEASE: &str = r#"
if not held() then return 0 end
redis.call('DEL', KEYS[1])
publish()
return 1
"#;

/// Touch. ARGV: claim id, lease ms, channel, pub/sub mode. Returns 1, or 0 when the claim does not
/// hold it. A renewed lease never outlives the record: `e` moves out with it.
const TOUCH: &str = r#"
local r = held()
if not r then return 0 end
local lease_until = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'l', ms(lease_until))
if lease_until > tonumber(r[3]) then
  redis.call('HSET', KEYS[1], 'e', ms(lease_until))
  redis.call('PEXPIREAT', KEYS[1], ms(lease_until))
end
return 1
"#;

/// Get. Returns the record's fields, or an empty array when absent or
/// expired. Counts no hit.
const GET: &str = r#"
if not live() then return {} end
return redis.call('HGETALL', KEYS[1])
"#;

/// State. Returns `p` (in progress) or `c` (completed) for a live record, nil otherwise.
const STATE: &str = r#"
if not live() then return false end
return redis.call('HGET', KEYS[1], 's')
"#;

/// Delete. Returns 1 when a live record was removed.
const DELETE: &str = r#"
local was_live = live()
redis.call('DEL', KEYS[1])
if was_live then publish() return 1 end
return 0
"#;

/// First seen. ARGV: raw key, scope, window ms, a random token of this call, channel,
/// pub/sub mode. Returns 1 for a new id (now marked seen, with the token in `c`), 0 for a
/// repeat (hit counted). A re-delivery of the same call finds its own token: 1 again.
const FIRST_SEEN: &str = r#"
if live() then
  local r = redis.call('HMGET', KEYS[1], 's', 'c')
  if r[2] == ARGV[4] then return 1 end
  if r[1] == 'c' then redis.call('HINCRBY', KEYS[1], 'h', 1) end
  return 0
end
local expires = now + tonumber(ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 's', 'c', 'c', ARGV[4], 'f', '', 'k', ARGV[1], 'o', ARGV[2], 't', ms(now),
  'e', ms(expires), 'p', '', 'd', ms(now), 'h', '0')
redis.call('PEXPIREAT', KEYS[1], ms(expires))
return 1
"#;

/// Hits. KEYS: records; ARGV: the count to add to each, in the same order. Adds each
/// count to a live completed record and skips any other (absent, expired, in progress).
/// Returns how many records were counted. One run is atomic, and each record it counts is
/// checked and incremented under that one run, so a count never lands on a record that
/// expired or was replaced in between. A key of another type, or a count that would
/// overflow, is skipped (`pcall`) rather than abandoning the run half-way: a script's
/// writes are not rolled back when it fails. On Cluster every key of one run is in one
/// slot.
const HITS: &str = r#"
local counted = 0
for i, key in ipairs(KEYS) do
  local r = redis.pcall('HMGET', key, 's', 'e')
  if not r.err and r[1] == 'c' and tonumber(r[2]) > now then
    if type(redis.pcall('HINCRBY', key, 'h', ARGV[i])) == 'number' then counted = counted + 1 end
  end
end
return counted
"#;

/// Replica read, for the opt-in replays from a replica (run there with `EVALSHA_RO`, so the
/// server refuses it any write). ARGV: fingerprint (empty for none). Returns
/// `{'c', payload, completed at, hits, expires at}` for a live completed record with that fingerprint,
/// by the replica's clock, and an empty array for anything else, which the primary's claim
/// script then decides.
const REPLICA_READ: &str = r#"
local r = redis.call('HMGET', KEYS[1], 's', 'f', 'e', 'p', 'd', 'h')
if r[1] == 'c' and tonumber(r[3]) > now and r[2] == ARGV[1] then
  return {'c', r[4], r[5], r[6], r[3]}
end
return {}
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// The claim script, ready for `EVALSHA`.
pub static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(CLAIM));
/// The complete script, ready for `EVALSHA`.
pub static COMPLETE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(COMPLETE));
/// The release script, ready for `EVALSHA`.
pub static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(RELEASE));
/// The touch script, ready for `EVALSHA`.
pub static TOUCH_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(TOUCH));
/// The get script, ready for `EVALSHA`.
pub static GET_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(GET));
/// The state script, ready for `EVALSHA`.
pub static STATE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(STATE));
/// The delete script, ready for `EVALSHA`.
pub static DELETE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(DELETE));
/// The first-seen script, ready for `EVALSHA`.
pub static FIRST_SEEN_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(FIRST_SEEN));
/// The hits script, ready for `EVALSHA`.
pub static HITS_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(HITS));

/// The replica read script, for `EVALSHA_RO` on a replica. Not among [`all`]: it is
/// loaded on the replica, not the primary.
pub static REPLICA_READ_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(REPLICA_READ));

/// Every script, for loading them all once at connect (`SCRIPT LOAD`).
pub fn all() -> [&'static Script; 9] {
    [
        &CLAIM_SCRIPT,
        &COMPLETE_SCRIPT,
        &RELEASE_SCRIPT,
        &TOUCH_SCRIPT,
        &GET_SCRIPT,
        &STATE_SCRIPT,
        &DELETE_SCRIPT,
        &FIRST_SEEN_SCRIPT,
        &HITS_SCRIPT,
    ]
}
