//! The `oncely` gateway: a reverse proxy that puts `Idempotency-Key` semantics in front
//! of any HTTP API.
//!
//! ```text
//! oncely serve --upstream http://127.0.0.1:3000 --listen 127.0.0.1:7100 \
//!              --store sqlite://oncely.db --config oncely.toml --admin-listen 127.0.0.1:7101
//! ```
//!
//! - [`cli`]: the commands (`serve`, `demo`, `check-config`, `keys`, `stats`);
//! - [`config`]: the TOML file and its checks;
//! - [`stores`]: the store, opened from its URL by `oncely_stores`, timed on every call;
//! - [`proxy`]: forwarding to the upstream;
//! - [`routing`]: per-route idempotency layers, longest prefix first;
//! - [`admin`]: health, readiness, metrics, keys;
//! - [`server`]: starting, metrics, logs and graceful shutdown;
//! - [`listener`]: the accept loop and the limits on client connections;
//! - [`workers`]: the threads, one per core, that serve proxy connections;
//! - [`tls`]: https upstreams and HTTPS listeners (rustls), certificate reload;
//! - [`demo`]: the built-in payments API for `oncely demo`.

pub mod admin;
pub mod cli;
pub mod config;
pub mod demo;
pub mod idle_timeout;
pub mod listener;
pub mod logs;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod stores;
pub mod tls;
mod when_woken;
pub mod workers;
