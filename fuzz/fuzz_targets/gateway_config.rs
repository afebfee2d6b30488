//! The gateway's configuration file: `RawConfig::parse` (TOML) then `Config::resolve`
//! (every check that names the key at fault), as `oncely serve` and `oncely check-config`
//! run them.
//!
//! Checks: no panic on any text; an error names something; a resolved configuration
//! keeps its invariants (lease within ttl, sizes and durations above zero, routes longest
//! first, each route found by its own path).
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
            assert!(route.lease <= route.ttl, "{route:?}");
            assert!(!route.lease.is_zero() && route.max_body > 0, "{route:?}");
            assert!(route.path.starts_with('/'), "{route:?}");
        }
        assert!(config.routes.windows(2).all(|w| w[0].path.len() >= w[1].path.len()), "routes out of order");
        for route in &config.routes {
            assert_eq!(config.route_for(&route.path).path, route.path, "a route not found by its own path");
        }
        assert!(!config.upstream_timeout.is_zero());
    }
});
