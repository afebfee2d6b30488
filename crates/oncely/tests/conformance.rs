//! The memory store passes the store conformance suite.

oncely_testkit::store_conformance!(async { oncely::MemoryStore::new() });

/// The bounded, single-shard configuration keeps the contract too.
mod bounded {
    oncely_testkit::store_conformance!(async { oncely::MemoryStore::builder().max_entries(10_000).shards(1).build() });
}
