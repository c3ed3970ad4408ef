//! Who a verified key acts for: the request path's view of a key record, small because the
//! verdict cache holds many. Policy decides on it and the header rewrite turns its parts into
//! identity headers, by reference.

use bytes::Bytes;
use http::HeaderValue;

use crate::key::KeyKind;
use crate::store::{KeyRecord, StoreError};

/// A known key, as the request path needs it, kept small because a cache holds many: one
/// shared buffer, in one allocation, holding a compact head (where the parts end, the kind,
/// the expiry) and then the key id, tenant, role and subject back to back. The parts are
/// checked once, when the entry is filled, to be valid header values, so a request turns
/// them into headers by reference, copying no string. Cloning it bumps the buffer's
/// reference count.
#[derive(Clone)]
pub struct Identity {
    /// The head, then the parts.
    buf: Bytes,
}

// The head, 4 to 15 bytes: a flags byte; where the key id, tenant and role end in the text
// (three bytes, or three little-endian `u16` if `WIDE`); the expiry (Unix seconds,
// little-endian `u64`) if `EXPIRES`. Most identities take 4, so that a typical one (50 bytes
// of text) fits a 64-byte allocation.
const SERVICE_ACCOUNT: u8 = 1;
const EXPIRES: u8 = 2;
const WIDE: u8 = 4;

/// The parts of an [`Identity`]'s text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The public key id.
    KeyId,
    /// The tenant.
    Tenant,
    /// The role.
    Role,
    /// The subject.
    Subject,
}

/// A buffer of at most `N` bytes kept inline, so that `Bytes::from_owner` puts the bytes and
/// their reference count in one allocation.
struct Inline<const N: usize> {
    len: u16,
    data: [u8; N],
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.data[..usize::from(self.len)]
    }
}

/// `buf` in one allocation: inline in the smallest of a few sizes that fits (each, with the
/// 8-byte reference count `from_owner` adds, one of mimalloc's size classes), else as a vector
/// (a rare long identity: two allocations once shared).
fn one_allocation(buf: &[u8]) -> Bytes {
    fn inline<const N: usize>(buf: &[u8]) -> Bytes {
        let mut data = [0; N];
        data[..buf.len()].copy_from_slice(buf);
        Bytes::from_owner(Inline {
            len: buf.len() as u16,
            data,
        })
    }
    // Sizes are the allocation less the reference count (8) and the length (2).
    match buf.len() {
        0..=54 => inline::<54>(buf),
        55..=70 => inline::<70>(buf),
        71..=86 => inline::<86>(buf),
        87..=102 => inline::<102>(buf),
        103..=118 => inline::<118>(buf),
        119..=150 => inline::<150>(buf),
        151..=182 => inline::<182>(buf),
        183..=214 => inline::<214>(buf),
        215..=246 => inline::<246>(buf),
        _ => Bytes::from(buf.to_vec()),
    }
}

impl Identity {
    /// Builds the request-path view of a record.
    pub fn from_record(r: &KeyRecord) -> Result<Self, StoreError> {
        let fields = [
            ("id", &r.id),
            ("tenant", &r.tenant),
            ("role", &r.role),
            ("subject", &r.subject),
        ];
        let mut text = Vec::with_capacity(fields.iter().map(|(_, v)| v.len()).sum());
        let mut ends = [0u16; 3];
        for (i, (field, v)) in fields.into_iter().enumerate() {
            // Visible ASCII only: a valid header value, and text wherever it is shown.
            if !v.bytes().all(|b| b.is_ascii_graphic())
                || text.len() + v.len() > usize::from(u16::MAX)
            {
                return Err(StoreError::Corrupt(format!(
                    "key {}: {field} is not a header value",
                    r.id
                )));
            }
            text.extend_from_slice(v.as_bytes());
            if i < 3 {
                ends[i] = text.len() as u16;
            }
        }
        let mut flags = 0;
        if r.kind == KeyKind::ServiceAccount {
            flags |= SERVICE_ACCOUNT;
        }
        if r.expires_at.is_some() {
            flags |= EXPIRES;
        }
        // The ends grow, so the role's is the largest.
        if ends[2] > u16::from(u8::MAX) {
            flags |= WIDE;
        }
        let mut buf = Vec::with_capacity(15 + text.len());
        buf.push(flags);
        for end in ends {
            if flags & WIDE != 0 {
                buf.extend_from_slice(&end.to_le_bytes());
            } else {
                buf.push(end as u8);
            }
        }
        if let Some(exp) = r.expires_at {
            buf.extend_from_slice(&exp.to_le_bytes());
        }
        buf.extend_from_slice(&text);
        Ok(Identity {
            buf: one_allocation(&buf),
        })
    }

    fn flags(&self) -> u8 {
        self.buf[0]
    }

    /// Where the text starts.
    fn start(&self) -> usize {
        let flags = self.flags();
        let ends = if flags & WIDE != 0 { 6 } else { 3 };
        let exp = if flags & EXPIRES != 0 { 8 } else { 0 };
        1 + ends + exp
    }

    /// Where part `i` (key id, tenant, role) ends.
    fn end(&self, i: usize) -> usize {
        let end = if self.flags() & WIDE != 0 {
            u16::from_le_bytes([self.buf[1 + 2 * i], self.buf[2 + 2 * i]])
        } else {
            u16::from(self.buf[1 + i])
        };
        self.start() + usize::from(end)
    }

    fn range(&self, part: Part) -> std::ops::Range<usize> {
        match part {
            Part::KeyId => self.start()..self.end(0),
            Part::Tenant => self.end(0)..self.end(1),
            Part::Role => self.end(1)..self.end(2),
            Part::Subject => self.end(2)..self.buf.len(),
        }
    }

    /// User or service account.
    pub fn kind(&self) -> KeyKind {
        if self.flags() & SERVICE_ACCOUNT != 0 {
            KeyKind::ServiceAccount
        } else {
            KeyKind::User
        }
    }

    /// Expiry, Unix seconds.
    pub fn expires_at(&self) -> Option<u64> {
        let flags = self.flags();
        (flags & EXPIRES != 0).then(|| {
            let at = if flags & WIDE != 0 { 7 } else { 4 };
            let mut exp = [0; 8];
            exp.copy_from_slice(&self.buf[at..at + 8]);
            u64::from_le_bytes(exp)
        })
    }

    /// One part as text.
    pub fn get(&self, part: Part) -> &str {
        // Checked to be ASCII when built.
        std::str::from_utf8(&self.buf[self.range(part)]).unwrap_or_default()
    }

    /// One part as a header value, sharing this identity's buffer.
    pub fn header(&self, part: Part) -> HeaderValue {
        HeaderValue::from_maybe_shared(self.buf.slice(self.range(part)))
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The public key id.
    pub fn key_id(&self) -> &str {
        self.get(Part::KeyId)
    }

    /// The key's tenant.
    pub fn tenant(&self) -> &str {
        self.get(Part::Tenant)
    }

    /// The key's role.
    pub fn role(&self) -> &str {
        self.get(Part::Role)
    }

    /// Who the key acts for.
    pub fn subject(&self) -> &str {
        self.get(Part::Subject)
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("key_id", &self.key_id())
            .field("tenant", &self.tenant())
            .field("role", &self.role())
            .field("subject", &self.subject())
            .field("kind", &self.kind())
            .field("expires_at", &self.expires_at())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_parts_share_one_buffer_and_become_headers() {
        let id =
            Identity::from_record(&KeyRecord::example(crate::key::KeyDigest([0; 32]))).unwrap();
        assert_eq!(
            [id.key_id(), id.tenant(), id.role(), id.subject()],
            ["key_1", "acme", "admin", "alice"]
        );
        assert_eq!((id.kind(), id.expires_at()), (KeyKind::User, None));
        assert_eq!(id.header(Part::Tenant), "acme");
        assert_eq!(id.header(Part::Subject), "alice");
        let mut bad = KeyRecord::example(crate::key::KeyDigest([0; 32]));
        bad.subject = "two words".into();
        let err = Identity::from_record(&bad).unwrap_err().to_string();
        assert!(err.contains("subject"), "{err}");
        bad.subject = "caf\u{e9}".into();
        assert!(Identity::from_record(&bad).is_err());
    }

    #[test]
    fn kind_expiry_and_parts_survive_every_buffer_size() {
        // Across the inline sizes and past them (the vector fallback), with an empty part.
        for len in [0, 1, 39, 40, 55, 56, 231, 232, 300, 5_000] {
            let mut r = KeyRecord::example(crate::key::KeyDigest([0; 32]));
            r.subject = "s".repeat(len);
            r.role = String::new();
            r.kind = KeyKind::ServiceAccount;
            r.expires_at = Some(u64::MAX - 1);
            let id = Identity::from_record(&r).unwrap();
            assert_eq!(
                [id.key_id(), id.tenant(), id.role(), id.subject()],
                ["key_1", "acme", "", r.subject.as_str()]
            );
            assert_eq!(id.kind(), KeyKind::ServiceAccount);
            assert_eq!(id.expires_at(), Some(u64::MAX - 1));
            assert_eq!(id.clone().header(Part::Subject), r.subject.as_str());
        }
        // Ends past 255 (two bytes each), with and without an expiry.
        for expires_at in [None, Some(7)] {
            let mut r = KeyRecord::example(crate::key::KeyDigest([0; 32]));
            r.tenant = "t".repeat(300);
            r.role = "r".repeat(255);
            r.expires_at = expires_at;
            let id = Identity::from_record(&r).unwrap();
            assert_eq!(
                [id.key_id(), id.tenant(), id.role(), id.subject()],
                ["key_1", r.tenant.as_str(), r.role.as_str(), "alice"]
            );
            assert_eq!((id.kind(), id.expires_at()), (KeyKind::User, expires_at));
        }
        // The role ending at 255 and at 256: one byte per end, then two.
        for role in [246, 247] {
            let mut r = KeyRecord::example(crate::key::KeyDigest([0; 32]));
            r.role = "r".repeat(role);
            r.expires_at = Some(9);
            let id = Identity::from_record(&r).unwrap();
            assert_eq!(id.role(), r.role);
            assert_eq!((id.subject(), id.expires_at()), ("alice", Some(9)));
        }
        let mut r = KeyRecord::example(crate::key::KeyDigest([0; 32]));
        r.expires_at = Some(0);
        assert_eq!(Identity::from_record(&r).unwrap().expires_at(), Some(0));
        // The longest text a head can describe, and one byte past it.
        r.subject = "s".repeat(usize::from(u16::MAX) - "key_1acmeadmin".len());
        assert!(Identity::from_record(&r).is_ok());
        r.subject.push('s');
        assert!(Identity::from_record(&r).is_err());
    }
}
