//! Hop-by-hop header fields (RFC 9110 §7.6.1): they describe one connection, so a
//! proxy never forwards them and a replay never repeats them.

use http::header::{self, HeaderMap, HeaderName};

/// The fields that are always hop-by-hop (plus the de-facto `Proxy-Connection`), as the
/// lower-case text [`HeaderName::as_str`] gives: compared as text, removed by name.
const ALWAYS: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The lengths of the nine names, as a bit set: most names present (`content-type`,
/// `date`, `host`, …) are told apart by their length alone.
const LENGTHS: u32 = {
    let mut bits = 0u32;
    let mut i = 0;
    while i < ALWAYS.len() {
        bits |= 1 << ALWAYS[i].len();
        i += 1;
    }
    bits
};

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
    // One pass over the few names present says which of the nine are there; only those
    // are removed (a removal hashes and probes). Most requests carry none; most upstream
    // responses carry `Connection: keep-alive` and nothing else of these: one removal,
    // where removing each of the nine would cost nine.
    let mut present = [false; ALWAYS.len()];
    // Whether some `Connection` value names a field other than the nine, read in the same
    // pass (the usual `keep-alive` does not): only then is it split into names.
    let mut names_others = false;
    for (name, value) in headers.iter() {
        if let Some(i) = position(name) {
            present[i] = true;
            names_others |= i == 0 && !is_always(value.as_bytes());
        }
    }
    // `Connection` is among the nine, so a message without any names no other field.
    if !present.contains(&true) {
        return;
    }
    // The fields `Connection` names (RFC 9110 §7.6.1: every option, even `close`),
    // removed while it is there to be read. Options that are one of the nine
    // (`keep-alive`, `upgrade`, `te`, …) go below: they are not parsed into names, and
    // nothing is allocated for them. The usual value, a lone `keep-alive`, is told by one
    // comparison before any splitting.
    if names_others {
        for name in &named_by_connection(headers) {
            headers.remove(name);
        }
    }
    for (name, _) in ALWAYS.iter().zip(present).filter(|(_, present)| *present) {
        headers.remove(*name);
    }
}

/// The fields `headers`' `Connection` names beyond the nine (none allocated when it names
/// only those, as it usually does).
fn named_by_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    let options = headers.get_all(header::CONNECTION);
    if options.iter().all(|v| is_always(v.as_bytes())) {
        return Vec::new();
    }
    options
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|option| !is_always(option.as_bytes()))
        .filter_map(|name| HeaderName::try_from(name).ok())
        .collect()
}

/// The hop-by-hop fields of one message, told one name at a time: for copying a
/// message's other fields without first copying all of them and removing these (the
/// stored form of a response is written so).
///
/// It names what [`strip_hop_by_hop`] removes: the nine, and the fields `Connection`
/// names.
pub(crate) struct HopByHop {
    named: Vec<HeaderName>,
}

impl HopByHop {
    /// The hop-by-hop fields of the message whose fields are `headers`.
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        Self { named: named_by_connection(headers) }
    }

    /// Whether `name` is hop-by-hop in that message.
    pub(crate) fn contains(&self, name: &HeaderName) -> bool {
        position(name).is_some() || self.named.contains(name)
    }
}

/// Whether `option`, a `Connection` option, is one of the nine, in any case.
fn is_always(option: &[u8]) -> bool {
    ALWAYS.iter().any(|always| always.as_bytes().eq_ignore_ascii_case(option))
}

/// `name`'s place in [`ALWAYS`], if it is one of the nine.
fn position(name: &HeaderName) -> Option<usize> {
    let name = name.as_str();
    if name.len() >= 32 || LENGTHS & (1 << name.len()) == 0 {
        return None;
    }
    ALWAYS.iter().position(|always| *always == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn names(map: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn the_table_of_names_matches_the_table_of_text() {
        let names: Vec<HeaderName> = ALWAYS.iter().map(|always| HeaderName::from_static(always)).collect();
        assert_eq!(names.iter().map(HeaderName::as_str).collect::<Vec<_>>(), ALWAYS);
        for (i, name) in names.iter().enumerate() {
            assert_eq!(position(name), Some(i));
        }
        for other in [
            header::CONTENT_TYPE,
            header::HOST,
            header::DATE,
            HeaderName::from_static("x-a-name-longer-than-thirty-two-bytes"),
        ] {
            assert_eq!(position(&other), None);
        }
    }

    #[test]
    fn each_of_the_nine_is_removed_with_all_its_values() {
        for always in ALWAYS {
            let mut map = headers(&[("content-type", "application/json"), ("x-end", "1")]);
            map.append(always, HeaderValue::from_static("a"));
            map.append(always, HeaderValue::from_static("b"));
            strip_hop_by_hop(&mut map);
            assert_eq!(names(&map), ["content-type", "x-end"], "{always}");
        }
    }

    #[test]
    fn fields_named_by_connection_are_removed_in_any_case_and_across_lines() {
        let mut map = headers(&[
            ("connection", "Keep-Alive, X-Private ,x-other"),
            ("connection", "close, X-Third"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("x-other", "2"),
            ("x-third", "3"),
            ("close", "a field named by an option"),
            ("x-kept", "4"),
        ]);
        strip_hop_by_hop(&mut map);
        assert_eq!(names(&map), ["x-kept"]);
    }

    #[test]
    fn a_connection_naming_only_hop_by_hop_fields_keeps_every_other_field() {
        // Each line alone is one of the nine (the quick path), or a list of them.
        for values in [&["Keep-Alive"][..], &["keep-alive", "Upgrade"], &["keep-alive, TE"]] {
            let mut map =
                headers(&[("keep-alive", "timeout=5"), ("upgrade", "h2c"), ("te", "trailers"), ("x-kept", "1")]);
            for value in values {
                map.append(header::CONNECTION, HeaderValue::from_static(value));
            }
            strip_hop_by_hop(&mut map);
            assert_eq!(names(&map), ["x-kept"], "{values:?}");
        }
        // One line that is not, after one that is: the options are read.
        let mut map = headers(&[("connection", "keep-alive"), ("connection", "x-private"), ("x-private", "1")]);
        strip_hop_by_hop(&mut map);
        assert!(map.is_empty(), "{map:?}");
    }

    #[test]
    fn a_message_without_hop_by_hop_fields_is_untouched() {
        let fields = [("content-type", "application/json"), ("content-length", "2"), ("x-private", "1")];
        let mut map = headers(&fields);
        strip_hop_by_hop(&mut map);
        assert_eq!(map, headers(&fields));
    }

    #[test]
    fn names_that_are_not_field_names_are_ignored() {
        let mut map =
            headers(&[("connection", "keep-alive, bad name, , (x), x-private"), ("x-private", "1"), ("x-kept", "2")]);
        strip_hop_by_hop(&mut map);
        assert_eq!(names(&map), ["x-kept"]);
    }
}
