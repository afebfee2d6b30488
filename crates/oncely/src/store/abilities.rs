//! What a store can do beyond the [`Store`](super::Store) contract, stated by the store
//! itself so that callers (the gateway's metrics and admin API, tools) need not guess it
//! from a URL.

/// What a store can do cheaply or at all, as the store states it
/// (`MemoryStore::abilities`, `SqliteStore::abilities`, …).
///
/// Built from [`StoreAbilities::NONE`] with one method per ability:
///
/// ```
/// use oncely::store::StoreAbilities;
///
/// let abilities = StoreAbilities::NONE.lists_records(true).durable(true);
/// assert!(abilities.lists_records && abilities.durable && !abilities.counts_records_cheaply);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct StoreAbilities {
    /// [`Store::stats`](super::Store::stats) is cheap enough to call on every metrics
    /// scrape: it does not read every record over the network (Redis scans its key
    /// space to count, so it says no).
    pub counts_records_cheaply: bool,
    /// [`Store::list`](super::Store::list) answers (the trait's default refuses), so an
    /// admin API or `oncely keys list` can page through the records.
    pub lists_records: bool,
    /// Several processes (gateway instances, workers) may use the same records at once
    /// and keep every promise of the contract between them.
    pub shared_between_processes: bool,
    /// Records outlive the process that wrote them: a restarted process replays what
    /// the one before it completed. How much a crash of the machine can take is in
    /// each store's docs.
    pub durable: bool,
    /// The largest payload [`Store::complete`](super::Store::complete) takes, if the
    /// store has a bound of its own (DynamoDB's 400 KB item): a caller that stores
    /// responses caps them below it, so that a completed operation is never refused its
    /// result (which would let its key lapse, and a retry run it again).
    pub max_payload: Option<usize>,
}

impl StoreAbilities {
    /// No ability: the starting point of a store's statement.
    pub const NONE: Self = Self {
        counts_records_cheaply: false,
        lists_records: false,
        shared_between_processes: false,
        durable: false,
        max_payload: None,
    };

    /// Sets [`counts_records_cheaply`](Self::counts_records_cheaply).
    pub const fn counts_records_cheaply(mut self, yes: bool) -> Self {
        self.counts_records_cheaply = yes;
        self
    }

    /// Sets [`lists_records`](Self::lists_records).
    pub const fn lists_records(mut self, yes: bool) -> Self {
        self.lists_records = yes;
        self
    }

    /// Sets [`shared_between_processes`](Self::shared_between_processes).
    pub const fn shared_between_processes(mut self, yes: bool) -> Self {
        self.shared_between_processes = yes;
        self
    }

    /// Sets [`durable`](Self::durable).
    pub const fn durable(mut self, yes: bool) -> Self {
        self.durable = yes;
        self
    }

    /// Sets [`max_payload`](Self::max_payload).
    pub const fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = Some(bytes);
        self
    }
}
