//! The engine's settings and hooks, and the builder that checks them.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::store::Replay;
use crate::{ConfigError, IdempotencyKey, Setting, Store};

use super::{Oncely, Shared};

/// The longest retention accepted: a little over a year.
pub const MAX_RETENTION: Duration = Duration::from_secs(366 * 24 * 3600);

/// What a request does when it meets a live claim of its key. The default is to wait
/// [`DEFAULT_WAIT_TIMEOUT`]: a client that retries by itself (an SDK, a queue) then gets
/// the first request's result instead of an error it must retry again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictMode {
    /// Fail at once with [`Error::Conflict`](crate::Error::Conflict) and a retry-after hint.
    Reject,
    /// Wait for the holder to finish, up to `timeout`, then replay its result (or run, if
    /// it released the key or its lease lapsed). Waiting is woken by the store's
    /// notification; polling is only the fallback.
    Wait {
        /// How long to wait before giving up with a conflict.
        timeout: Duration,
    },
}

/// How long a duplicate waits for a running operation by default (seed 001's choice).
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ConflictMode {
    fn default() -> Self {
        Self::Wait { timeout: DEFAULT_WAIT_TIMEOUT }
    }
}

/// The engine's settings, as checked by [`OncelyBuilder::build`].
#[derive(Clone, Debug)]
pub struct Config {
    /// How long a completed result is kept for replay.
    pub retention: Duration,
    /// How long a claim blocks its key without renewal: the time a crashed holder blocks it.
    pub lease: Duration,
    /// How long the engine keeps renewing the lease of a running operation; past this a
    /// slow operation's lease lapses and a retry may take the key over. Zero: no renewal.
    pub keep_alive_ceiling: Duration,
    /// What a request does when it meets a live claim.
    pub conflict: ConflictMode,
    /// In wait mode, how often a waiter re-checks when no notification arrives.
    pub poll_interval: Duration,
    /// The longest a replay's hit stays counted only in the process before it is flushed
    /// to the store (see [`Oncely::flush_hits`]).
    pub hit_flush_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30),
            keep_alive_ceiling: Duration::from_secs(600),
            conflict: ConflictMode::default(),
            poll_interval: Duration::from_millis(500),
            hit_flush_interval: Duration::from_secs(1),
        }
    }
}

type KeyHook = Arc<dyn Fn(&IdempotencyKey) + Send + Sync>;
type ReplayHook = Arc<dyn Fn(&IdempotencyKey, &Replay) + Send + Sync>;
type ConflictHook = Arc<dyn Fn(&IdempotencyKey, SystemTime) + Send + Sync>;

/// Callbacks on each outcome. They run inline on the request's task: keep them short.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) hit: Option<ReplayHook>,
    pub(crate) miss: Option<KeyHook>,
    pub(crate) conflict: Option<ConflictHook>,
    pub(crate) mismatch: Option<KeyHook>,
    pub(crate) takeover: Option<KeyHook>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("hit", &self.hit.is_some())
            .field("miss", &self.miss.is_some())
            .field("conflict", &self.conflict.is_some())
            .field("mismatch", &self.mismatch.is_some())
            .field("takeover", &self.takeover.is_some())
            .finish()
    }
}

/// Builds an [`Oncely`] engine; [`build`](Self::build) checks every setting.
///
/// ```
/// use oncely::{ConflictMode, MemoryStore, Oncely};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), oncely::ConfigError> {
/// let oncely = Oncely::builder(MemoryStore::new())
///     .retention(Duration::from_secs(24 * 3600))
///     .lease(Duration::from_secs(30))
///     .conflict_mode(ConflictMode::Wait { timeout: Duration::from_secs(10) })
///     .on_hit(|key, replay| println!("replayed {key} ({} hits)", replay.hits))
///     .build()?;
/// # let _ = oncely; Ok(()) }
/// ```
pub struct OncelyBuilder<S> {
    store: S,
    config: Config,
    hooks: Hooks,
    background: Option<tokio_util::task::TaskTracker>,
    deferred: super::DeferredCompletions,
    /// Whether `keep_alive_ceiling` was set; unset, it follows the retention.
    ceiling_set: bool,
}

impl<S: fmt::Debug> fmt::Debug for OncelyBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OncelyBuilder").field("store", &self.store).field("config", &self.config).finish()
    }
}

impl<S: Store> OncelyBuilder<S> {
    pub(crate) fn new(store: S) -> Self {
        Self {
            store,
            config: Config::default(),
            hooks: Hooks::default(),
            background: None,
            deferred: super::DeferredCompletions::new(),
            ceiling_set: false,
        }
    }

    /// How long results are kept for replay (default 24 h; at most [`MAX_RETENTION`]).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.config.retention = retention;
        self
    }

    /// Every setting at once, for programs that read them from elsewhere (the gateway's
    /// configuration file). Unless [`keep_alive_ceiling`](Self::keep_alive_ceiling) is
    /// called too, the ceiling is cut to the retention at build, as with the defaults.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// How long a claim blocks its key without renewal (default 30 s; at most the
    /// retention). The engine renews it every third of the lease while the operation runs.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// How long a running operation's lease keeps being renewed (default 10 min, or the
    /// retention if that is shorter; zero turns renewal off; at most the retention).
    pub fn keep_alive_ceiling(mut self, ceiling: Duration) -> Self {
        self.config.keep_alive_ceiling = ceiling;
        self.ceiling_set = true;
        self
    }

    /// Reject or wait on a live claim (default: wait [`DEFAULT_WAIT_TIMEOUT`]).
    pub fn conflict_mode(mut self, mode: ConflictMode) -> Self {
        self.config.conflict = mode;
        self
    }

    /// Runs the engine's background work on `tracker`, so that a server can wait for it
    /// at shutdown (`tracker.close(); tracker.wait().await`). The background work is the
    /// storing of a result the store could not take at once (see
    /// [`ClaimGuard::complete`](crate::ClaimGuard::complete)): dropped at exit, its
    /// operation could run again once the lease lapses.
    pub fn track_background(mut self, tracker: tokio_util::task::TaskTracker) -> Self {
        self.background = Some(tracker);
        self
    }

    /// Where results the store could not take are kept until it can (default: a registry
    /// of this engine's own). Give engines on the same store one registry, so that each
    /// writes every kept result before its next claim and one readiness check sees them
    /// all. See [`DeferredCompletions`](super::DeferredCompletions).
    pub fn deferred_completions(mut self, registry: super::DeferredCompletions) -> Self {
        self.deferred = registry;
        self
    }

    /// How often a waiter re-checks when no notification comes (default 500 ms). Only a
    /// fallback: stores notify waiters of completions and releases.
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.config.poll_interval = every;
        self
    }

    /// How long a replay's hit may stay counted only in this process before it is
    /// flushed to the store (default 1 s; 1 ms..=1 h). A crash loses at most this much of
    /// the counts; see [`Oncely::flush_hits`].
    pub fn hit_flush_interval(mut self, every: Duration) -> Self {
        self.config.hit_flush_interval = every;
        self
    }

    /// Called when a retry gets a stored result (the seeds' `onCacheHit`); the replay
    /// carries the hit count as this process knows it, this one included.
    pub fn on_hit(mut self, hook: impl Fn(&IdempotencyKey, &Replay) + Send + Sync + 'static) -> Self {
        self.hooks.hit = Some(Arc::new(hook));
        self
    }

    /// Called when a request claims its key and will run the operation (`onCacheMiss`).
    pub fn on_miss(mut self, hook: impl Fn(&IdempotencyKey) + Send + Sync + 'static) -> Self {
        self.hooks.miss = Some(Arc::new(hook));
        self
    }

    /// Called when a request first meets a live claim of its key (before it waits or is
    /// rejected), with the holder's lease end.
    pub fn on_conflict(mut self, hook: impl Fn(&IdempotencyKey, SystemTime) + Send + Sync + 'static) -> Self {
        self.hooks.conflict = Some(Arc::new(hook));
        self
    }

    /// Called when a key is reused with another fingerprint.
    pub fn on_mismatch(mut self, hook: impl Fn(&IdempotencyKey) + Send + Sync + 'static) -> Self {
        self.hooks.mismatch = Some(Arc::new(hook));
        self
    }

    /// Called when a request takes over a key whose holder's lease lapsed.
    pub fn on_takeover(mut self, hook: impl Fn(&IdempotencyKey) + Send + Sync + 'static) -> Self {
        self.hooks.takeover = Some(Arc::new(hook));
        self
    }

    /// Checks the settings and builds the engine.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first setting that is zero or out of range.
    pub fn build(mut self) -> Result<Oncely<S>, ConfigError> {
        if !self.ceiling_set {
            self.config.keep_alive_ceiling = self.config.keep_alive_ceiling.min(self.config.retention);
        }
        self.config.validate()?;
        Ok(Oncely::from_shared(Shared {
            store: self.store,
            config: self.config,
            hooks: self.hooks,
            background: self.background,
            deferred: self.deferred,
            hits: Default::default(),
            waiting: Default::default(),
            outcomes: Default::default(),
        }))
    }
}

impl Config {
    /// Checks every setting, naming the first that is zero or out of range: what
    /// [`OncelyBuilder::build`] checks, for programs that take settings from elsewhere
    /// (the gateway's configuration file) and want to refuse them before starting.
    ///
    /// # Errors
    /// [`ConfigError`] naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ms = Duration::from_millis(1);
        let hour = Duration::from_secs(3600);
        check(Setting::Retention, self.retention, ms, MAX_RETENTION)?;
        check(Setting::Lease, self.lease, ms, self.retention)?;
        check(Setting::KeepAliveCeiling, self.keep_alive_ceiling, Duration::ZERO, self.retention)?;
        check(Setting::PollInterval, self.poll_interval, ms, hour)?;
        check(Setting::HitFlushInterval, self.hit_flush_interval, ms, hour)?;
        if let ConflictMode::Wait { timeout } = self.conflict {
            check(Setting::WaitTimeout, timeout, ms, MAX_WAIT)?;
        }
        Ok(())
    }
}

/// The longest wait-mode timeout accepted.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

fn check(setting: Setting, value: Duration, min: Duration, max: Duration) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError { setting, value, min, max });
    }
    Ok(())
}
