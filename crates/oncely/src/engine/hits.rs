//! Replay counts, kept in the process and flushed to the store in batches.
//!
//! A replay is a read in every store: counting it inside the claim made every replay a
//! write (a Redis script on the primary, a PostgreSQL row lock and WAL record, a place in
//! SQLite's single writer queue). So the engine counts replays here, per storage key, and
//! a flusher hands the counts to [`Store::record_hits`] in one call per batch, at most
//! one flush interval after the first unflushed replay.
//!
//! **What a crash loses:** the counts of the replays since the last flush (one interval
//! at most). [`Oncely::flush_hits`](crate::Oncely::flush_hits) writes them at a graceful
//! shutdown. Counts are statistics: nothing decides on them, so losing some never lets
//! an operation run twice.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::StorageKey;

/// How many shards the counts are spread over, so that replays of different keys on
/// different cores rarely meet on one lock.
const SHARDS: usize = 16;

/// The most distinct keys kept unflushed. Past it (a store that refuses the flush for a
/// long time), new keys' counts are dropped and counted in `oncely_hits_dropped_total`.
pub(crate) const MAX_PENDING_KEYS: usize = 100_000;

#[derive(Debug, Default)]
pub(crate) struct HitCounts {
    shards: [Mutex<crate::key::KeyMap<u64>>; SHARDS],
    /// How many keys hold a count. Every access to it and to `flusher_running` is
    /// `SeqCst`: a replay adds its key, then checks the flag; the flusher clears the flag,
    /// then checks for keys. Only a single total order guarantees that one of the two
    /// sees the other (otherwise both could read the old value, and a count would wait
    /// for the next replay to start a flusher).
    keys: AtomicUsize,
    /// Whether a flusher task is running (or being started).
    pub(crate) flusher_running: AtomicBool,
}

impl HitCounts {
    fn shard(&self, key: &StorageKey) -> std::sync::MutexGuard<'_, crate::key::KeyMap<u64>> {
        let index = usize::from(key.as_bytes()[0]) % SHARDS;
        self.shards[index].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts `n` replays of `key`; the unflushed count for it afterwards.
    pub(crate) fn add(&self, key: &StorageKey, n: u64) -> u64 {
        let mut shard = self.shard(key);
        if let Some(count) = shard.get_mut(key) {
            *count = count.saturating_add(n);
            return *count;
        }
        if self.keys.load(Ordering::SeqCst) >= MAX_PENDING_KEYS {
            metrics::counter!("oncely_hits_dropped_total").increment(n);
            return n;
        }
        shard.insert(*key, n);
        self.keys.fetch_add(1, Ordering::SeqCst);
        n
    }

    /// The unflushed count for `key`.
    pub(crate) fn peek(&self, key: &StorageKey) -> u64 {
        self.shard(key).get(key).copied().unwrap_or(0)
    }

    /// True when no count waits to be flushed.
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.load(Ordering::SeqCst) == 0
    }

    /// Takes every unflushed count.
    pub(crate) fn take(&self) -> Vec<(StorageKey, u64)> {
        let mut batch = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            self.keys.fetch_sub(shard.len(), Ordering::SeqCst);
            batch.extend(shard.drain());
        }
        batch
    }

    /// Puts back a batch the store did not take, to be flushed with the next one.
    pub(crate) fn restore(&self, batch: &[(StorageKey, u64)]) {
        for (key, n) in batch {
            self.add(key, *n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_summed_per_key_and_taken_once() {
        let counts = HitCounts::default();
        let (a, b) = (StorageKey::derive_raw("s", "a"), StorageKey::derive_raw("s", "b"));
        assert_eq!(counts.add(&a, 1), 1);
        assert_eq!(counts.add(&a, 1), 2);
        assert_eq!(counts.add(&b, 3), 3);
        let mut batch = counts.take();
        batch.sort();
        let mut expected = vec![(a, 2), (b, 3)];
        expected.sort();
        assert_eq!(batch, expected);
        assert!(counts.is_empty());
        assert!(counts.take().is_empty());
        counts.restore(&batch);
        assert_eq!(counts.add(&a, 1), 3);
    }
}
