//! The Redis store passes the store conformance suite on a standalone server and on a
//! 3-master Redis Cluster, both real and on loopback (started by `oncely-testkit`). Each
//! test gets a key prefix of its own, which makes its store empty and isolated.

use oncely_redis::{RedisOptions, RedisStore, Topology};

/// A store on `url` under a fresh prefix.
async fn store_at(url: String) -> RedisStore {
    let (topology, _) = Topology::parse(&url).expect("a valid URL");
    let prefix = format!("t{}", uuid_like());
    let options = RedisOptions::default().prefix(&prefix).expect("a valid prefix");
    RedisStore::connect(&topology, options).await.expect("the store connects")
}

fn uuid_like() -> String {
    oncely::IdempotencyKey::uuid_v4().as_str().replace('-', "")
}

mod standalone {
    oncely_testkit::store_conformance!(super::store_at(oncely_testkit::redis::RedisServer::shared().url()));
}

mod cluster {
    oncely_testkit::store_conformance!(super::store_at(oncely_testkit::redis::RedisCluster::shared().url()));
}
