//! The stored form of a response: what a replay gives back byte for byte.
//!
//! Layout (all integers big-endian): the magic `OHR1`, a flag byte (0: the body follows;
//! 1: the body is over the storage cap and was not kept; 2: the outcome is unknown, no
//! response at all), the status (u16), the header count (u16), each
//! header as name length (u16), name, value length (u32), value, and then the body, to
//! the end. Decoding checks every length; a record that does not decode is reported,
//! never replayed half.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 4] = b"OHR1";

/// A response as stored for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: StoredBody,
}

/// What a stored response holds in place of a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoredBody {
    /// The body, byte for byte.
    Kept(Bytes),
    /// The operation completed, but its body was over the storage cap.
    NotKept,
    /// Nobody knows whether the operation took effect: its answer never came.
    OutcomeUnknown,
}

/// What a completed record written by this layer holds, for tools that show records
/// (the gateway's admin API and `oncely keys`): read from the payload's head, without
/// decoding its headers or body.
///
/// ```
/// use oncely_http::{StoredKind, stored_kind};
///
/// assert_eq!(stored_kind(b"not a stored response"), None);
/// # let _ = StoredKind::OutcomeUnknown;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredKind {
    /// A response, replayed byte for byte, with its status.
    Response(StatusCode),
    /// A completed operation whose response was over the storage cap.
    NotKept(StatusCode),
    /// An operation whose outcome nobody knows: retries get 502 `outcome-unknown` until
    /// the key is deleted.
    OutcomeUnknown,
}

/// The kind of a completed record's payload, if this layer wrote it.
pub fn stored_kind(payload: &[u8]) -> Option<StoredKind> {
    let [m0, m1, m2, m3, flag, hi, lo, ..] = *payload else { return None };
    if [m0, m1, m2, m3] != *MAGIC {
        return None;
    }
    let status = StatusCode::from_u16(u16::from_be_bytes([hi, lo])).ok()?;
    match flag {
        0 => Some(StoredKind::Response(status)),
        1 => Some(StoredKind::NotKept(status)),
        2 => Some(StoredKind::OutcomeUnknown),
        _ => None,
    }
}

impl StoredResponse {
    /// The record of an unknown outcome.
    pub(crate) fn outcome_unknown() -> Self {
        Self { status: StatusCode::BAD_GATEWAY, headers: HeaderMap::new(), body: StoredBody::OutcomeUnknown }
    }
}

impl StoredResponse {
    pub(crate) fn encode(&self) -> Bytes {
        let body = match &self.body {
            StoredBody::Kept(body) => Some(body),
            _ => None,
        };
        let body_len = body.map_or(0, Bytes::len);
        let mut out = BytesMut::with_capacity(16 + self.headers.len() * 48 + body_len);
        out.put_slice(MAGIC);
        out.put_u8(match self.body {
            StoredBody::Kept(_) => 0,
            StoredBody::NotKept => 1,
            StoredBody::OutcomeUnknown => 2,
        });
        out.put_u16(self.status.as_u16());
        // Header names are at most 64 KiB by hyper's limits, and a header map stored here
        // holds far fewer than 65,536 entries; saturate rather than wrap if not.
        let count = self.headers.len().min(u16::MAX as usize);
        out.put_u16(count as u16);
        for (name, value) in self.headers.iter().take(count) {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        if let Some(body) = body {
            out.put_slice(body);
        }
        out.freeze()
    }

    pub(crate) fn decode(mut bytes: Bytes) -> Result<Self, &'static str> {
        fn need(bytes: &Bytes, n: usize) -> Result<(), &'static str> {
            if bytes.remaining() < n { Err("truncated stored response") } else { Ok(()) }
        }
        need(&bytes, 9)?;
        if &bytes[..4] != MAGIC {
            return Err("not a stored response of this version");
        }
        bytes.advance(4);
        let flag = bytes.get_u8();
        let status = StatusCode::from_u16(bytes.get_u16()).map_err(|_| "invalid stored status")?;
        let count = bytes.get_u16();
        // `with_capacity` panics past the map's limit: size it modestly and let it grow.
        // Two more than stored: a replay adds `Idempotent-Replayed` (and, for an error,
        // `Should-Retry`) without growing the map.
        let mut headers = HeaderMap::with_capacity(usize::from(count).min(64) + 2);
        for _ in 0..count {
            need(&bytes, 2)?;
            let len = bytes.get_u16() as usize;
            need(&bytes, len)?;
            let name = HeaderName::from_bytes(&bytes.split_to(len)).map_err(|_| "invalid stored header name")?;
            need(&bytes, 4)?;
            let len = bytes.get_u32() as usize;
            need(&bytes, len)?;
            let value =
                HeaderValue::from_maybe_shared(bytes.split_to(len)).map_err(|_| "invalid stored header value")?;
            headers.try_append(name, value).map_err(|_| "too many stored headers")?;
        }
        let body = match flag {
            0 => StoredBody::Kept(bytes),
            1 => StoredBody::NotKept,
            2 => StoredBody::OutcomeUnknown,
            _ => return Err("unknown stored response flag"),
        };
        Ok(Self { status, headers, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_part_exactly() {
        let mut headers = HeaderMap::new();
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        let body: Vec<u8> = (0..=255u8).collect();
        let stored = StoredResponse { status: StatusCode::CREATED, headers, body: StoredBody::Kept(Bytes::from(body)) };
        assert_eq!(StoredResponse::decode(stored.encode()), Ok(stored));
        let marker = StoredResponse { status: StatusCode::OK, headers: HeaderMap::new(), body: StoredBody::NotKept };
        assert_eq!(StoredResponse::decode(marker.encode()), Ok(marker.clone()));
        let unknown = StoredResponse::outcome_unknown();
        assert_eq!(StoredResponse::decode(unknown.encode()), Ok(unknown.clone()));
        assert_eq!(stored_kind(&unknown.encode()), Some(StoredKind::OutcomeUnknown));
        assert_eq!(stored_kind(&marker.encode()), Some(StoredKind::NotKept(StatusCode::OK)));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let stored = StoredResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: StoredBody::Kept(Bytes::from_static(b"x")),
        };
        let encoded = stored.encode();
        for cut in 0..9 {
            assert!(StoredResponse::decode(encoded.slice(..cut)).is_err());
        }
        assert!(StoredResponse::decode(Bytes::from_static(b"{\"Ok\":1}")).is_err());
        let mut bad = BytesMut::from(&b"OHR1\x00\x00\xc8\x00\x01\x00\xff"[..]);
        bad.put_slice(b"short");
        assert!(StoredResponse::decode(bad.freeze()).is_err());
    }

    #[test]
    fn more_header_values_than_a_header_map_holds_is_an_error_not_a_panic() {
        let mut many = BytesMut::from(&b"OHR1\x00\x00\xc8\xff\xff"[..]);
        for i in 0..u16::MAX {
            let name = format!("x{i}");
            many.put_u16(name.len() as u16);
            many.put_slice(name.as_bytes());
            many.put_u32(1);
            many.put_slice(b"v");
        }
        assert!(StoredResponse::decode(many.freeze()).is_err(), "65,535 distinct names overflow a HeaderMap");
    }
}
