//! Duplicates that wait on one key in one process poll the store together.
//!
//! A waiter (wait mode) wakes on the store's notification, or on its timer: at the poll
//! interval, or when the holder's lease could lapse. Without coordination every waiter's
//! timer is a claim of its own, so a burst of N duplicates costs N store calls per poll
//! interval for as long as the holder runs. That load is not only billed (a DynamoDB
//! claim is a write): it can queue the holder's own lease renewals behind the waiters'
//! claims on a slow store until the lease lapses, and then a waiter takes over a holder
//! that is alive (the engine's test `waiters_on_one_key_poll_the_store_together`
//! counted 4,101 claims for 100 waiters over a 2 s hold before this module, 300-odd
//! after).
//!
//! **Invariant, enforced by [`Member::take_turn`]:** of the waiters of one storage key in
//! this process, at most one claims on its timer per poll interval. The others keep
//! waiting, and re-claim only when that claim found the key no longer in progress
//! ([`Member::changed`], a round counter every member watches) or when the store
//! notifies them. Turns are time-based, so a member dropped mid-claim (its caller gone)
//! holds no one up: the next member's timer takes the next turn.
//!
//! What a turn's claim saw of the holder's lease is shared, so that members that skip
//! their turn time their next wake on the renewed lease, not on the one they saw.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::StorageKey;

/// The waiters of each key in one engine (and its clones), by storage key, with how many
/// members each group has. The count is kept under the map's lock, so the last member out
/// removes the entry whatever the order in which members drop (an `Arc`'s strong count
/// would not do: a member's `Arc` is released only after its `drop` has let go of the
/// lock, so two members leaving at once could each see the other still there).
#[derive(Debug, Default)]
pub(crate) struct WaitGroups {
    groups: Mutex<crate::key::KeyMap<(Arc<Group>, usize)>>,
}

/// The waiters of one key.
#[derive(Debug)]
struct Group {
    /// When a member last claimed on its timer; the latest end of lease a member saw.
    turn: Mutex<(Option<Instant>, Option<SystemTime>)>,
    /// Bumped when a member's claim found the key no longer in progress.
    round: watch::Sender<u64>,
}

impl WaitGroups {
    /// Joins the waiters of `key`; leaving is dropping the [`Member`].
    pub(crate) fn join(&self, key: StorageKey) -> Member<'_> {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        let (group, members) = groups
            .entry(key)
            .or_insert_with(|| (Arc::new(Group { turn: Mutex::new((None, None)), round: watch::channel(0).0 }), 0));
        *members += 1;
        let group = Arc::clone(group);
        let round = group.round.subscribe();
        Member { groups: self, key, group, round }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// One waiter of a key.
#[derive(Debug)]
pub(crate) struct Member<'a> {
    groups: &'a WaitGroups,
    key: StorageKey,
    group: Arc<Group>,
    round: watch::Receiver<u64>,
}

impl Member<'_> {
    /// Takes the turn to claim on a timer now, when no member of this key has within
    /// `every`; otherwise `Err` with when the next turn starts. Taking the turn starts the
    /// next interval.
    pub(crate) fn take_turn(&self, now: Instant, every: Duration) -> Result<(), Instant> {
        let mut turn = self.group.turn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(last) = turn.0
            && now < last + every
        {
            return Err(last + every);
        }
        turn.0 = Some(now);
        Ok(())
    }

    /// Notes a holder's end of lease seen by a claim; answers the latest one any member
    /// of this key saw (a renewal moves it forward).
    pub(crate) fn lease_seen(&self, lease_until: SystemTime) -> SystemTime {
        let mut turn = self.group.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let latest = turn.1.map_or(lease_until, |seen| seen.max(lease_until));
        turn.1 = Some(latest);
        latest
    }

    /// The latest end of lease a member of this key saw.
    pub(crate) fn latest_lease(&self) -> Option<SystemTime> {
        self.group.turn.lock().unwrap_or_else(PoisonError::into_inner).1
    }

    /// Marks the rounds seen so far as seen: [`changed`](Self::changed) resolves only for
    /// a later one. Called before each of this member's claims.
    pub(crate) fn catch_up(&mut self) {
        self.round.borrow_and_update();
    }

    /// Tells the other members that a claim found the key settled (a replay or a
    /// mismatch): they re-claim. The lease seen so far is forgotten with it.
    pub(crate) fn announce_change(&self) {
        self.group.turn.lock().unwrap_or_else(PoisonError::into_inner).1 = None;
        self.group.round.send_modify(|round| *round = round.wrapping_add(1));
    }

    /// Resolves when another member announced a change since this one's last
    /// [`catch_up`](Self::catch_up).
    pub(crate) async fn changed(&mut self) {
        // The sender lives in the group, which this member holds: `changed` cannot fail
        // while `self` exists; pend rather than spin if it somehow did.
        if self.round.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        let mut groups = self.groups.groups.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, members)) = groups.get_mut(&self.key) {
            *members -= 1;
            if *members == 0 {
                groups.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> StorageKey {
        StorageKey::derive_raw("tests", &n.to_string())
    }

    #[tokio::test(start_paused = true)]
    async fn one_timer_claim_per_interval_among_members() {
        let groups = WaitGroups::default();
        let members: Vec<_> = (0..50).map(|_| groups.join(key(1))).collect();
        let other = groups.join(key(2));
        let every = Duration::from_millis(500);
        let now = Instant::now();
        let turns = members.iter().filter(|m| m.take_turn(now, every).is_ok()).count();
        assert_eq!(turns, 1, "one member of a key takes a turn");
        assert!(other.take_turn(now, every).is_ok(), "another key has turns of its own");
        let later = now + Duration::from_millis(499);
        assert!(members.iter().all(|m| m.take_turn(later, every) == Err(now + every)), "the next turn is told");
        assert_eq!(members.iter().filter(|m| m.take_turn(now + every, every).is_ok()).count(), 1, "the next interval");
    }

    #[tokio::test(start_paused = true)]
    async fn an_announced_change_wakes_every_other_member() {
        let groups = WaitGroups::default();
        let mut a = groups.join(key(1));
        let mut b = groups.join(key(1));
        a.catch_up();
        b.catch_up();
        let seen = SystemTime::now();
        assert_eq!(a.lease_seen(seen), seen);
        assert_eq!(b.lease_seen(seen - Duration::from_secs(1)), seen, "the latest lease is kept");
        a.announce_change();
        tokio::time::timeout(Duration::from_secs(1), b.changed()).await.expect("b wakes");
        assert_eq!(b.latest_lease(), None, "the lease is forgotten with a change");
        b.catch_up();
        assert!(tokio::time::timeout(Duration::from_secs(1), b.changed()).await.is_err(), "no change since");
    }

    #[test]
    fn members_leaving_at_once_from_many_threads_leave_no_entry() {
        let groups = WaitGroups::default();
        for round in 0..200u32 {
            let key = StorageKey::derive_raw("tests", &round.to_string());
            let members: Vec<_> = (0..8).map(|_| groups.join(key)).collect();
            let barrier = std::sync::Barrier::new(members.len());
            std::thread::scope(|scope| {
                for member in members {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        barrier.wait();
                        drop(member);
                    });
                }
            });
        }
        assert_eq!(groups.len(), 0, "every group was removed by its last member");
    }

    #[test]
    fn the_last_member_out_removes_its_key() {
        let groups = WaitGroups::default();
        let a = groups.join(key(1));
        let b = groups.join(key(1));
        assert_eq!(groups.len(), 1);
        drop(a);
        assert_eq!(groups.len(), 1);
        drop(b);
        assert_eq!(groups.len(), 0);
    }
}
