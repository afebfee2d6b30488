//! The gateway's configuration file: `RawConfig::parse` (TOML) then `Config::resolve`
//! (every check that names the key at fault), as `oncely serve` and `oncely check-config`
//! run them.
//!
//! Checks: no panic on any text; an error names something; a resolved configuration
//! keeps its invariants (lease within ttl, the completion limit between the upstream
//! timeout and the ttl, sizes and durations above zero, routes longest first, each route
//! found by its own path) and publishes a policy for every route.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oncely_gateway::config::{Config, RawConfig, RawSettings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let raw = match RawConfig::parse(text) {
        Ok(raw) => raw,
        Err(e) => {
            assert!(!e.0.is_empty(), "an empty parse error");
            return;
        }
    };
    // The file's own [defaults] again as flags: overrides take the same path.
    let overrides = raw.defaults.clone();
    for overrides in [RawSettings::default(), overrides] {
        let config = match Config::resolve(&raw, &overrides) {
            Ok(config) => config,
            Err(e) => {
                assert!(!e.0.is_empty(), "an empty config error");
                continue;
            }
        };
        for route in std::iter::once(&config.defaults).chain(&config.routes) {
            let policy = &route.policy;
            assert!(policy.lease_seconds <= policy.retention_seconds, "{route:?}");
            assert!(policy.lease_seconds > 0.0 && policy.max_body > 0, "{route:?}");
            assert!(route.completion_limit >= config.upstream.timeout, "{route:?}");
            assert!(route.completion_limit.as_secs_f64() <= policy.retention_seconds, "{route:?}");
            assert!(route.path.starts_with('/'), "{route:?}");
        }
        assert!(config.routes.windows(2).all(|w| w[0].path.len() >= w[1].path.len()), "routes out of order");
        for route in &config.routes {
            assert_eq!(config.route_for(&route.path).path, route.path, "a route not found by its own path");
        }
        assert!(!config.upstream.timeout.is_zero());
        assert!(config.published_policy()["routes"].as_array().is_some_and(|r| r.len() == config.routes.len()));
    }
});
