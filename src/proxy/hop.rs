//! Hop-by-hop headers (RFC 9110 §7.6.1): the ones that describe one connection, and every
//! header the sender named in `Connection`, are never forwarded, in either direction.
//!
//! The one exception is an upgrade keygate passes through (`proxy/upgrade.rs`): its request
//! and its `101` answer get `Connection: upgrade` and the `Upgrade` they switch to set again
//! after the strip ([`set_upgrade`]), and nothing else of the connection's headers.

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

/// The bit of `Upgrade` among the bits of [`hop_by_hop`].
pub(super) const UPGRADE_BIT: u16 = 1 << 8;

/// The only protocol an HTTP/1.1 `Upgrade` is passed through for. Others (`h2c` above all,
/// which would let a client send requests keygate never sees over the switched connection)
/// are stripped like any hop-by-hop header, and the request goes on as a plain one.
pub(super) static WEBSOCKET: HeaderValue = HeaderValue::from_static("websocket");
static UPGRADE_TOKEN: HeaderValue = HeaderValue::from_static("upgrade");

/// Whether a request head asks to switch to a WebSocket: `Upgrade: websocket` (that one
/// protocol, any case) and `Connection` naming `upgrade`.
pub(super) fn asks_for_websocket(headers: &HeaderMap) -> bool {
    let mut upgrade = headers.get_all(header::UPGRADE).iter();
    let websocket = matches!(
        (upgrade.next(), upgrade.next()),
        (Some(v), None) if trim(v.as_bytes()).eq_ignore_ascii_case(WEBSOCKET.as_bytes())
    );
    websocket
        && headers.get_all(CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| trim(t).eq_ignore_ascii_case(b"upgrade"))
        })
}

/// The upgrade exception to the strip: `Connection: upgrade` and `Upgrade: protocol`, set on
/// a head whose hop-by-hop headers are already gone.
pub(super) fn set_upgrade(headers: &mut HeaderMap, protocol: &HeaderValue) {
    headers.insert(CONNECTION, UPGRADE_TOKEN.clone());
    headers.insert(header::UPGRADE, protocol.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_a_websocket_upgrade_named_in_connection_is_one() {
        for yes in [
            head(&[("upgrade", "websocket"), ("connection", "Upgrade")]),
            head(&[
                ("upgrade", "WebSocket"),
                ("connection", "keep-alive, upgrade"),
            ]),
            head(&[
                ("upgrade", " websocket "),
                ("connection", "x"),
                ("connection", "upgrade"),
            ]),
        ] {
            assert!(asks_for_websocket(&yes), "{yes:?}");
        }
        for no in [
            head(&[("upgrade", "websocket")]),
            head(&[
                ("upgrade", "h2c"),
                ("connection", "upgrade, http2-settings"),
            ]),
            head(&[("upgrade", "websocket, h2c"), ("connection", "upgrade")]),
            head(&[
                ("upgrade", "websocket"),
                ("upgrade", "h2c"),
                ("connection", "upgrade"),
            ]),
            head(&[("upgrade", "websocket"), ("connection", "upgraded")]),
            head(&[("connection", "upgrade")]),
        ] {
            assert!(!asks_for_websocket(&no), "{no:?}");
        }
    }

    #[test]
    fn the_upgrade_exception_sets_only_its_two_headers_again() {
        let mut h = head(&[
            ("connection", "upgrade, x-secret"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        strip_hop_by_hop(&mut h);
        set_upgrade(&mut h, &WEBSOCKET);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert!(!h.contains_key("x-secret") && !h.contains_key("keep-alive"));
    }
}
