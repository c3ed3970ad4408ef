//! Hop-by-hop headers (RFC 9110 §7.6.1): the ones that describe one connection, and every
//! header the sender named in `Connection`, are never forwarded, in either direction.

use http::header::{self, HeaderName, AUTHORIZATION, CONNECTION};
use http::{HeaderMap, HeaderValue};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
pub(super) fn hop_by_hop() -> [&'static HeaderName; 9] {
    [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

/// Removes hop-by-hop headers, including every header named in `Connection` (for a response:
/// the request side goes through [`super::headers::rewrite_request_headers`]).
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few names present finds which hop-by-hop headers to remove: cheaper
    // than nine removals by hash, and most responses carry none but `Connection`.
    let hop = hop_by_hop();
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop.iter().position(|h| *h == name) {
            present |= 1 << i;
        }
    }
    remove_hop_by_hop(headers, present);
}

/// Removes the hop-by-hop headers whose bits are set in `present`.
pub(super) fn remove_hop_by_hop(headers: &mut HeaderMap, present: u16) {
    if present == 0 {
        return;
    }
    let hop = hop_by_hop();
    // `hop[0]` is `Connection`. The names it lists are removed by reference: a token that
    // names no header present (`keep-alive`, `close`) costs a lookup, never an allocation.
    if present & 1 != 0 {
        let mut values = headers.get_all(CONNECTION).iter();
        let first = values.next().cloned();
        // Empty, so not allocated, unless `Connection` appears more than once.
        let more: Vec<HeaderValue> = values.cloned().collect();
        for value in first.iter().chain(&more) {
            for token in value.as_bytes().split(|&b| b == b',') {
                match std::str::from_utf8(trim(token)) {
                    // The credential the decision was made on stays (when it is forwarded);
                    // every other header keygate decides on is set again after this.
                    Ok(name) if name.eq_ignore_ascii_case(AUTHORIZATION.as_str()) => {}
                    Ok(name) => {
                        headers.remove(name);
                    }
                    Err(_) => {}
                }
            }
        }
    }
    for (i, name) in hop.into_iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}
