//! Hop-by-hop header fields (RFC 9110 §7.6.1): they describe one connection, so a
//! proxy never forwards them and a replay never repeats them.

use http::header::{self, HeaderMap, HeaderName};

/// The fields that are always hop-by-hop (plus the de-facto `Proxy-Connection`).
const ALWAYS: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop fields from `headers`: the fixed ones, and any field the
/// `Connection` field names.
///
/// ```
/// use http::{HeaderMap, HeaderValue};
/// use oncely_http::strip_hop_by_hop;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("connection", HeaderValue::from_static("keep-alive, x-private"));
/// headers.insert("x-private", HeaderValue::from_static("1"));
/// headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
/// headers.insert("content-type", HeaderValue::from_static("application/json"));
/// strip_hop_by_hop(&mut headers);
/// assert_eq!(headers.len(), 1);
/// assert!(headers.contains_key("content-type"));
/// ```
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the few names present answers that, where
    // removing each of the nine would hash and probe nine times (twice per proxied
    // request, measured in docs/benchmarks.md). `Connection` is among them, so a message
    // without any has no named ones either.
    if !headers.keys().any(|name| ALWAYS.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named.iter().chain(ALWAYS.iter()) {
        headers.remove(name);
    }
}
