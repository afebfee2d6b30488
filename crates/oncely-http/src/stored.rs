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

use crate::problem::SHOULD_RETRY;

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

/// The stored form of a response whose fields `headers()` gives, in the layout the
/// [module docs](self) give. The fields are read twice, to size the buffer exactly and
/// then to write them, so a caller filters them on the way (a filter is cheap to run
/// twice) rather than copying a header map to remove some from it.
pub(crate) fn encode<'a, I>(status: StatusCode, headers: impl Fn() -> I, body: &StoredBody) -> Bytes
where
    I: Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
{
    let (flag, body) = match body {
        StoredBody::Kept(body) => (0, Some(body)),
        StoredBody::NotKept => (1, None),
        StoredBody::OutcomeUnknown => (2, None),
    };
    // Header names are at most 64 KiB by hyper's limits, and a response stored here has
    // far fewer than 65,536 fields; any past that are left out rather than the count
    // wrapped.
    let headers = || headers().take(u16::MAX as usize);
    let (count, fields_len) =
        headers().fold((0u16, 0usize), |(n, len), (name, value)| (n + 1, len + 6 + name.as_str().len() + value.len()));
    let mut out = BytesMut::with_capacity(MAGIC.len() + 5 + fields_len + body.map_or(0, Bytes::len));
    out.put_slice(MAGIC);
    out.put_u8(flag);
    out.put_u16(status.as_u16());
    out.put_u16(count);
    for (name, value) in headers() {
        out.put_u16(name.as_str().len() as u16);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
    if let Some(body) = body {
        out.put_slice(body);
    }
    debug_assert_eq!(out.len(), out.capacity(), "sized exactly");
    out.freeze()
}

impl StoredResponse {
    pub(crate) fn encode(&self) -> Bytes {
        encode(self.status, || self.headers.iter(), &self.body)
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

impl StoredResponse {
    /// Adds what every replay of a kept response carries on top of its stored headers:
    /// `Stripe-Should-Retry: false` for an error (the same answer, whatever the retry: an
    /// SDK must stop here), then `marker: true`. Nothing for the other kinds, which are
    /// answered with a problem.
    fn mark_as_replay(&mut self, marker: &HeaderName) {
        if let StoredBody::Kept(_) = self.body {
            if self.status.is_client_error() || self.status.is_server_error() {
                self.headers.insert(SHOULD_RETRY, HeaderValue::from_static("false"));
            }
            self.headers.insert(marker.clone(), HeaderValue::from_static("true"));
        }
    }

    /// The stored response in `payload`, [`decode`](Self::decode)d and marked as a replay
    /// with `marker` (see `mark_as_replay`), through this thread's memo: the same result,
    /// computed once per hot record (see the `memo` module for why a hit is exact).
    pub(crate) fn decode_for_replay(payload: Bytes, marker: &HeaderName) -> Result<Self, &'static str> {
        memo::decode_for_replay(payload, marker)
    }
}

/// Stored responses already decoded and marked on this thread, so that the replays of a
/// hot key do not parse the same header names and values again each time.
///
/// A payload goes through the memo only when something else holds its allocation too
/// (the memory store, the replay cache): only such a payload can come back as the same
/// allocation. A payload read afresh from a store (Redis, SQLite) is owned by this replay
/// alone and is decoded directly.
///
/// **Invariant (why a hit is exact):** a slot keeps a clone of the payload it decoded,
/// so that allocation stays alive, immutable (`Bytes` is never written through while
/// shared), and cannot be reused for another payload while the slot holds it. A payload
/// at the same address with the same length is therefore the same bytes. What a slot
/// holds is a function of those bytes and of the marker (decoding, then
/// `mark_as_replay`), and the slot keeps the marker and a hit compares it. The memo
/// changes the cost of a replay, never its answer.
///
/// **Bounds:** [`MEMO_SLOTS`](memo::MEMO_SLOTS) slots per thread, each for a payload of
/// at most [`MEMO_MAX_PAYLOAD`](memo::MEMO_MAX_PAYLOAD) bytes with at most
/// [`MEMO_MAX_HEADERS`](memo::MEMO_MAX_HEADERS) headers; a slot is overwritten by the
/// next payload that maps to it. A slot keeps the payload's whole allocation alive (this
/// layer's own encoding allocates exactly what it writes) and a decoded header map:
/// about 20 KiB a slot, some 1.3 MiB per thread at most, which may hold deleted records'
/// payloads until their slots are reused.
mod memo {
    use super::StoredResponse;
    use bytes::Bytes;
    use http::HeaderName;
    use std::cell::RefCell;

    pub(super) const MEMO_SLOTS: usize = 64;
    pub(super) const MEMO_MAX_PAYLOAD: usize = 16 * 1024;
    pub(super) const MEMO_MAX_HEADERS: usize = 64;

    struct Slot {
        payload: Bytes,
        marker: HeaderName,
        ready: StoredResponse,
    }

    thread_local! {
        static SLOTS: RefCell<[Option<Slot>; MEMO_SLOTS]> = const { RefCell::new([const { None }; MEMO_SLOTS]) };
    }

    /// The slot of an allocation: its address, mixed (Fibonacci hashing), top 6 bits.
    fn slot_of(payload: &Bytes) -> usize {
        const { assert!(MEMO_SLOTS == 64) };
        ((payload.as_ptr() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize
    }

    pub(super) fn decode_for_replay(payload: Bytes, marker: &HeaderName) -> Result<StoredResponse, &'static str> {
        let fresh = |payload: Bytes| {
            let mut ready = StoredResponse::decode(payload)?;
            ready.mark_as_replay(marker);
            Ok(ready)
        };
        if payload.len() > MEMO_MAX_PAYLOAD || payload.is_empty() || payload.is_unique() {
            return fresh(payload);
        }
        let index = slot_of(&payload);
        // `try_with`: a thread being torn down goes without the memo.
        let hit = SLOTS.try_with(|slots| {
            let slots = slots.try_borrow().ok()?;
            let slot = slots[index].as_ref()?;
            let same = slot.payload.as_ptr() == payload.as_ptr()
                && slot.payload.len() == payload.len()
                && slot.marker == marker;
            same.then(|| slot.ready.clone())
        });
        if let Ok(Some(ready)) = hit {
            return Ok(ready);
        }
        let ready = fresh(payload.clone())?;
        if ready.headers.len() <= MEMO_MAX_HEADERS {
            let _ = SLOTS.try_with(|slots| {
                if let Ok(mut slots) = slots.try_borrow_mut() {
                    slots[index] = Some(Slot { payload, marker: marker.clone(), ready: ready.clone() });
                }
            });
        }
        Ok(ready)
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
    fn the_memo_answers_each_payload_with_its_own_decoding() {
        // More payloads than slots, all held elsewhere (as a store holds them), decoded
        // in an order that makes them evict each other, some more than once.
        let payloads: Vec<Bytes> = (0..300u32)
            .map(|i| {
                let mut headers = HeaderMap::new();
                headers.insert("x-record", HeaderValue::from(i));
                let body = StoredBody::Kept(Bytes::from(format!("body {i}")));
                StoredResponse {
                    status: StatusCode::from_u16(200 + (i % 100) as u16).expect("a status from 200 to 299"),
                    headers,
                    body,
                }
                .encode()
            })
            .collect();
        let (marker, other) = (HeaderName::from_static("x-replayed"), HeaderName::from_static("x-other"));
        for round in 0..3 {
            for i in (0..payloads.len()).map(|i| (i * 7 + round) % payloads.len()) {
                let shared = payloads[i].clone();
                let marker = if round == 1 { &other } else { &marker };
                let mut expected = StoredResponse::decode(payloads[i].clone());
                if let Ok(expected) = &mut expected {
                    expected.mark_as_replay(marker);
                }
                assert_eq!(StoredResponse::decode_for_replay(shared, marker), expected, "{i}");
            }
        }
        // A payload owned by the replay alone, a garbled shared one, an empty one.
        let unique = Bytes::from(payloads[1].to_vec());
        let mut expected = StoredResponse::decode(payloads[1].clone());
        if let Ok(expected) = &mut expected {
            expected.mark_as_replay(&marker);
        }
        assert_eq!(StoredResponse::decode_for_replay(unique, &marker), expected);
        let garbled = payloads[2].slice(..9);
        assert!(StoredResponse::decode_for_replay(garbled.clone(), &marker).is_err());
        assert!(StoredResponse::decode_for_replay(garbled, &marker).is_err(), "an error is not memoised");
        assert!(StoredResponse::decode_for_replay(Bytes::new(), &marker).is_err());
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
