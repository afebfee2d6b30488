//! [`Erasures`]: how a process that keeps copies of records learns, without asking the
//! store, that a record may have been deleted through another process.
//!
//! A [`ReplayCache`](super::ReplayCache) answers replays from copies of completed
//! records. A completed record changes only when it expires (which the copy's own end
//! covers) or is deleted. A delete through the same wrapper drops the copy at once; a
//! delete through another process cannot reach it. A store that can publish a count of
//! its deletes to every process sharing it, cheaply enough to read on every cached
//! replay, offers an `Erasures`: the cache reads it on every hit and answers nothing from
//! a copy taken before the count changed. The SQLite store does (a counter in a file
//! beside the database: `oncely_sqlite::SqliteStore::erasures`).

/// A count of the deletes made through every process sharing a store.
///
/// # Contract
///
/// Once a delete through any process sharing the store has returned, every later
/// [`generation`](Self::generation), in any of those processes, answers a value different
/// from every value it answered before that delete committed. (A counter bumped after
/// each delete's commit keeps this.) A value may also change with no delete: a cache then
/// goes to the store once more than it needed to.
///
/// It is read on every cached replay, so it must be cheap: no network round trip.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use oncely::store::Erasures;
///
/// /// Deletes counted within one process (every sharer of the store is in it).
/// struct InProcess(AtomicU64);
///
/// impl Erasures for InProcess {
///     fn generation(&self) -> Option<u64> {
///         Some(self.0.load(Ordering::SeqCst))
///     }
/// }
///
/// let erasures = Arc::new(InProcess(AtomicU64::new(0)));
/// let before = erasures.generation();
/// erasures.0.fetch_add(1, Ordering::SeqCst); // what a store does after a delete commits
/// assert_ne!(erasures.generation(), before);
/// ```
pub trait Erasures: Send + Sync + 'static {
    /// The count now, or `None` when it cannot be read (an I/O error): a cache then
    /// answers nothing from its copies and asks the store.
    fn generation(&self) -> Option<u64>;
}
