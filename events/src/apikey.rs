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
/// characters, never more.
pub fn key_prefix(presented: &str) -> String {
    presented.chars().take(8).collect()
}
