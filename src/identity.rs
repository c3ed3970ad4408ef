//! Who a verified key acts for: the request path's view of a key record, small because the
//! verdict cache holds many. Policy decides on it and the header rewrite turns its parts into
//! identity headers, by reference.

use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use http::HeaderValue;

use crate::key::KeyKind;
use crate::store::{KeyRecord, StoreError};

/// A known key, as the request path needs it, kept small because a cache holds many: the
/// key id, tenant, role and subject share one buffer, checked once (when the entry is filled)
/// to be valid header values, so a request turns them into headers by reference, copying no
/// string.
#[derive(Debug)]
pub struct Identity {
    /// Key id, tenant, role and subject, back to back.
    text: Bytes,
    /// Where the key id, tenant and role end in `text` (the subject runs to its end).
    ends: [u16; 3],
    /// User or service account.
    pub kind: KeyKind,
    /// Expiry, Unix seconds.
    pub expires_at: Option<u64>,
    /// When this entry last queued a last-used note (Unix seconds): the rate limit that makes
    /// recording use cost one atomic load on most requests.
    pub(crate) last_noted: AtomicU64,
}

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

impl Identity {
    /// Builds the request-path view of a record.
    pub fn from_record(r: &KeyRecord) -> Result<Self, StoreError> {
        let fields = [("id", &r.id), ("tenant", &r.tenant), ("role", &r.role)];
        let mut text =
            Vec::with_capacity(r.id.len() + r.tenant.len() + r.role.len() + r.subject.len());
        let mut ends = [0u16; 3];
        for (i, (field, v)) in fields
            .into_iter()
            .chain([("subject", &r.subject)])
            .enumerate()
        {
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
        Ok(Identity {
            text: Bytes::from(text),
            ends,
            kind: r.kind,
            expires_at: r.expires_at,
            last_noted: AtomicU64::new(0),
        })
    }

    fn range(&self, part: Part) -> std::ops::Range<usize> {
        let [id, tenant, role] = self.ends.map(usize::from);
        match part {
            Part::KeyId => 0..id,
            Part::Tenant => id..tenant,
            Part::Role => tenant..role,
            Part::Subject => role..self.text.len(),
        }
    }

    /// One part as text.
    pub fn get(&self, part: Part) -> &str {
        // Checked to be ASCII when built.
        std::str::from_utf8(&self.text[self.range(part)]).unwrap_or_default()
    }

    /// One part as a header value, sharing this identity's buffer.
    pub fn header(&self, part: Part) -> HeaderValue {
        HeaderValue::from_maybe_shared(self.text.slice(self.range(part)))
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
        assert_eq!(id.header(Part::Tenant), "acme");
        assert_eq!(id.header(Part::Subject), "alice");
        let mut bad = KeyRecord::example(crate::key::KeyDigest([0; 32]));
        bad.subject = "two words".into();
        let err = Identity::from_record(&bad).unwrap_err().to_string();
        assert!(err.contains("subject"), "{err}");
        bad.subject = "caf\u{e9}".into();
        assert!(Identity::from_record(&bad).is_err());
    }
}
