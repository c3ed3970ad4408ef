//! The API key format: generation, parsing and the digest that stores and caches are keyed by.
//!
//! A key is `<prefix>_<random><checksum>`: a four-character type prefix (`kgu_` for user keys,
//! `kgs_` for service account keys), 43 base62 characters drawn from the OS CSPRNG (256 bits),
//! and a 6-character base62 CRC32 of everything before it. [`Token::parse`] accepts only strings
//! of exactly that shape, so a typo, a truncated paste, a swapped prefix or random garbage is
//! rejected without touching the cache or the store. The plaintext lives in [`Secret`] (whose
//! `Debug` is redacted) and in [`Token`] only until it is hashed into a [`KeyDigest`].

use std::fmt;

use rand::{Rng, TryRngCore};
use sha2::{Digest, Sha256};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Length of the type prefix including its underscore (`kgu_`).
const PREFIX_LEN: usize = 4;
/// Base62 characters of randomness: 62^43 > 2^256.
const RANDOM_LEN: usize = 43;
/// Base62 characters of the CRC32 checksum: 62^6 > 2^32.
const CHECKSUM_LEN: usize = 6;
/// Total length of every well-formed key.
pub const KEY_LEN: usize = PREFIX_LEN + RANDOM_LEN + CHECKSUM_LEN;

/// Who a key belongs to; the kind is also visible in the key's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// A personal access key of a user (`kgu_`).
    User,
    /// The key of a service account (`kgs_`).
    ServiceAccount,
}

impl KeyKind {
    /// The key prefix for this kind, underscore included.
    pub const fn prefix(self) -> &'static str {
        match self {
            KeyKind::User => "kgu_",
            KeyKind::ServiceAccount => "kgs_",
        }
    }

    /// The name used in identity headers and records.
    pub const fn as_str(self) -> &'static str {
        match self {
            KeyKind::User => "user",
            KeyKind::ServiceAccount => "service_account",
        }
    }

    /// Parses the name produced by [`KeyKind::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "user" => Some(KeyKind::User),
            "service_account" => Some(KeyKind::ServiceAccount),
            _ => None,
        }
    }

    fn from_prefix(prefix: &[u8]) -> Option<Self> {
        match prefix {
            b"kgu_" => Some(KeyKind::User),
            b"kgs_" => Some(KeyKind::ServiceAccount),
            _ => None,
        }
    }
}

/// Why a presented token is not a key. Deliberately coarse: the client learns only that the
/// token is malformed, never which part was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Wrong length.
    #[error("token has the wrong length")]
    Length,
    /// Unknown type prefix.
    #[error("token has an unknown prefix")]
    Prefix,
    /// A character outside base62.
    #[error("token has a character outside base62")]
    Alphabet,
    /// The checksum does not match.
    #[error("token checksum does not match")]
    Checksum,
}

/// A plaintext key. Printing it with `{:?}` or `{}` shows `[redacted]`; the only way to read it
/// is [`Secret::expose`], used where the key must be shown once to its owner.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The plaintext, for showing the key once at creation.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A token whose prefix, length, alphabet and checksum were checked. It borrows the request's
/// header bytes, so parsing allocates nothing.
#[derive(Clone, Copy)]
pub struct Token<'a> {
    bytes: &'a [u8],
    kind: KeyKind,
}

impl fmt::Debug for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}[redacted])", self.kind.prefix())
    }
}

impl<'a> Token<'a> {
    /// Parses a presented key. Runs in constant work for a given length; touches no I/O.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, TokenError> {
        if bytes.len() != KEY_LEN {
            return Err(TokenError::Length);
        }
        let kind = KeyKind::from_prefix(&bytes[..PREFIX_LEN]).ok_or(TokenError::Prefix)?;
        let body = &bytes[PREFIX_LEN..];
        if !body.iter().all(u8::is_ascii_alphanumeric) {
            return Err(TokenError::Alphabet);
        }
        let (signed, checksum) = bytes.split_at(PREFIX_LEN + RANDOM_LEN);
        if checksum != encode_checksum(crc32fast::hash(signed)) {
            return Err(TokenError::Checksum);
        }
        Ok(Token { bytes, kind })
    }

    /// The kind of key, from its prefix.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The digest the store and cache know this key by.
    pub fn digest(&self) -> KeyDigest {
        KeyDigest::of(self.bytes)
    }
}

/// SHA-256 of the whole key: the only thing caches and stores are keyed by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyDigest(pub [u8; 32]);

impl KeyDigest {
    /// Hashes a key's bytes.
    pub fn of(key: &[u8]) -> Self {
        KeyDigest(Sha256::digest(key).into())
    }

    /// Lowercase hex, as used in store keys.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses lowercase or uppercase hex.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(KeyDigest(out))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The digest is not secret, but a short form is enough to correlate log lines.
        write!(f, "KeyDigest({}…)", &hex::encode(&self.0[..4]))
    }
}

/// A freshly generated key: the plaintext (to show once) and its digest (to store).
#[derive(Debug)]
pub struct GeneratedKey {
    /// The plaintext key, shown once to its owner.
    pub secret: Secret,
    /// Its digest, the only form that is stored.
    pub digest: KeyDigest,
}

/// Generates a new key of the given kind from the OS CSPRNG.
pub fn generate(kind: KeyKind) -> GeneratedKey {
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(kind.prefix());
    key.push_str(&random_base62(RANDOM_LEN));
    let checksum = encode_checksum(crc32fast::hash(key.as_bytes()));
    key.push_str(std::str::from_utf8(&checksum).expect("base62 is ASCII"));
    let digest = KeyDigest::of(key.as_bytes());
    GeneratedKey {
        secret: Secret(key),
        digest,
    }
}

/// A public, non-secret identifier, e.g. `key_3fJ9…` for keys.
pub fn generate_id(prefix: &str) -> String {
    format!("{prefix}_{}", random_base62(16))
}

/// Uniform base62 characters from the OS CSPRNG, by rejection sampling (no modulo bias).
fn random_base62(len: usize) -> String {
    let mut rng = rand::rngs::OsRng.unwrap_err();
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let b: u8 = rng.random();
        // 248 = 4 * 62: bytes at or above it would bias the low characters.
        if b < 248 {
            out.push(ALPHABET[(b % 62) as usize] as char);
        }
    }
    out
}

fn encode_checksum(mut crc: u32) -> [u8; CHECKSUM_LEN] {
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(crc % 62) as usize];
        crc /= 62;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        for kind in [KeyKind::User, KeyKind::ServiceAccount] {
            let k = generate(kind);
            let s = k.secret.expose();
            assert_eq!(s.len(), KEY_LEN);
            assert!(s.starts_with(kind.prefix()));
            let t = Token::parse(s.as_bytes()).unwrap();
            assert_eq!(t.kind(), kind);
            assert_eq!(t.digest(), k.digest);
        }
    }

    #[test]
    fn secret_and_token_never_print_the_key() {
        let k = generate(KeyKind::User);
        let plain = k.secret.expose().to_owned();
        assert_eq!(format!("{:?}", k.secret), "[redacted]");
        assert_eq!(format!("{}", k.secret), "[redacted]");
        assert!(!format!("{k:?}").contains(&plain));
        let t = Token::parse(plain.as_bytes()).unwrap();
        assert!(!format!("{t:?}").contains(&plain[4..]));
    }

    #[test]
    fn swapped_prefix_fails_the_checksum() {
        let k = generate(KeyKind::User);
        let swapped = k.secret.expose().replacen("kgu_", "kgs_", 1);
        assert_eq!(
            Token::parse(swapped.as_bytes()).unwrap_err(),
            TokenError::Checksum
        );
    }

    #[test]
    fn malformed_tokens_are_rejected_with_their_reason() {
        let k = generate(KeyKind::User);
        let s = k.secret.expose();
        assert_eq!(Token::parse(b"").unwrap_err(), TokenError::Length);
        assert_eq!(
            Token::parse(&s.as_bytes()[..KEY_LEN - 1]).unwrap_err(),
            TokenError::Length
        );
        let other = format!("abc_{}", &s[4..]);
        assert_eq!(
            Token::parse(other.as_bytes()).unwrap_err(),
            TokenError::Prefix
        );
        let mut bad = s.as_bytes().to_vec();
        bad[10] = b'-';
        assert_eq!(Token::parse(&bad).unwrap_err(), TokenError::Alphabet);
    }

    #[test]
    fn digest_hex_round_trips() {
        let d = generate(KeyKind::User).digest;
        assert_eq!(KeyDigest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(KeyDigest::from_hex("zz"), None);
    }

    proptest! {
        #[test]
        fn random_strings_are_rejected(s in "\\PC{0,80}") {
            // A random string passes only with a 1 in 2^32 chance even when shaped right.
            prop_assert!(Token::parse(s.as_bytes()).is_err());
        }

        #[test]
        fn well_shaped_random_strings_fail_the_checksum(body in "[0-9A-Za-z]{49}") {
            let s = format!("kgu_{body}");
            prop_assert!(Token::parse(s.as_bytes()).is_err());
        }

        #[test]
        fn any_single_character_change_is_rejected(pos in 0usize..KEY_LEN, c in proptest::char::range('!', '~')) {
            let k = generate(KeyKind::ServiceAccount);
            let mut bytes = k.secret.expose().as_bytes().to_vec();
            prop_assume!(bytes[pos] != c as u8);
            bytes[pos] = c as u8;
            prop_assert!(Token::parse(&bytes).is_err());
        }

        #[test]
        fn generated_keys_always_parse(_i in 0u8..64, user in any::<bool>()) {
            let kind = if user { KeyKind::User } else { KeyKind::ServiceAccount };
            let k = generate(kind);
            prop_assert!(Token::parse(k.secret.expose().as_bytes()).is_ok());
        }
    }
}
