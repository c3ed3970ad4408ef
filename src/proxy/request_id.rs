//! Request ids: the client's `x-request-id` when it is sane, else a fresh one, sent upstream,
//! returned to the client and carried by the request's log span.

use http::{HeaderMap, HeaderName, HeaderValue};

/// `x-request-id`: kept from the client when sane, else generated; sent upstream and back.
pub(super) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A request id from the client, if it is sane (1–128 visible ASCII characters).
pub(super) fn client_request_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    headers.get(&X_REQUEST_ID).filter(|v| {
        (1..=128).contains(&v.len()) && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    })
}

/// Length of a generated request id.
const REQUEST_ID_LEN: usize = 16;

/// Request ids carved per block: one allocation serves this many requests.
const REQUEST_IDS_PER_BLOCK: usize = 256;

thread_local! {
    /// The block this thread carves request ids from. An id keeps its block alive until the
    /// id is dropped (the end of its request), so a block is at most 4 KiB held by live ids.
    static REQUEST_IDS: std::cell::RefCell<bytes::BytesMut> =
        std::cell::RefCell::new(bytes::BytesMut::new());
}

/// A fresh request id: 16 random hex characters. Ids are carved from a per-thread block, so
/// making one, and cloning it into the upstream request, allocates nothing on most requests.
pub(super) fn new_request_id() -> HeaderValue {
    let n: u64 = rand::random();
    let mut hex = [0u8; REQUEST_ID_LEN];
    hex::encode_to_slice(n.to_be_bytes(), &mut hex).expect("16 hex digits");
    let id = REQUEST_IDS.with(|block| {
        let mut block = block.borrow_mut();
        if block.capacity() < REQUEST_ID_LEN {
            // A new block: the old one is freed when its last id is.
            block.reserve(REQUEST_ID_LEN * REQUEST_IDS_PER_BLOCK);
        }
        block.extend_from_slice(&hex);
        block.split_to(REQUEST_ID_LEN).freeze()
    });
    HeaderValue::from_maybe_shared(id).expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_validated_or_generated() {
        let mut h = HeaderMap::new();
        assert!(client_request_id(&h).is_none());
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(client_request_id(&h).unwrap(), "abc-123");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert!(client_request_id(&h).is_none());
        let a = new_request_id();
        assert_eq!(a.len(), 16);
        assert_ne!(a, new_request_id());
        // Across blocks, ids stay intact while later ones are carved.
        let ids: Vec<HeaderValue> = (0..3 * REQUEST_IDS_PER_BLOCK)
            .map(|_| new_request_id())
            .collect();
        for id in &ids {
            assert_eq!(id.len(), 16);
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
        }
        let distinct: std::collections::HashSet<&HeaderValue> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }
}
