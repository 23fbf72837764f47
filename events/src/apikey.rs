//! API keys: `sb-` followed by 256 random bits (base64url). Only the SHA-256 of
//! a key is ever stored or logged about; the key itself is shown once, at issue.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::catalog::KeyHash;

/// The prefix every switchboard API key starts with.
pub const KEY_PREFIX: &str = "sb-";

/// A freshly generated secret key. Not `Debug`, so it cannot end up in a log line.
pub struct ApiKey(String);

impl ApiKey {
    /// Generates a key from the operating system's random source.
    pub fn generate() -> ApiKey {
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        ApiKey(format!("{KEY_PREFIX}{encoded}"))
    }

    /// The key, to show to its owner once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> KeyHash {
        hash_key(&self.0)
    }
}

/// The stored form of a presented key.
pub fn hash_key(key: &str) -> KeyHash {
    KeyHash(Sha256::digest(key.as_bytes()).into())
}

/// Whether a presented key hashes to `stored`, compared in constant time.
pub fn key_matches(presented: &str, stored: &KeyHash) -> bool {
    hash_key(presented).0.ct_eq(&stored.0).into()
}

/// The part of a presented key that may appear in audit events: its first 8
/// characters, and nothing when that would be the whole of it (a short
/// "key" is still a secret someone typed).
pub fn key_prefix(presented: &str) -> Option<String> {
    let prefix: String = presented.chars().take(8).collect();
    (prefix.len() < presented.len()).then_some(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_prefix_is_never_the_whole_key() {
        let key = ApiKey::generate();
        assert_eq!(key.expose().len(), 3 + 43);
        assert_eq!(
            key_prefix(key.expose()).as_deref(),
            Some(&key.expose()[..8])
        );
        assert_eq!(
            key_prefix("sb-short"),
            None,
            "8 characters are the whole key"
        );
        assert_eq!(key_prefix("abc"), None);
        assert_eq!(key_prefix(""), None);
        assert_eq!(key_prefix("sb-shorter"), Some("sb-short".to_owned()));
    }

    #[test]
    fn keys_match_their_hash_only() {
        let key = ApiKey::generate();
        assert!(key_matches(key.expose(), &key.hash()));
        assert!(!key_matches(ApiKey::generate().expose(), &key.hash()));
    }
}
