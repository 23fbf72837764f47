//! keys: API keys by hash (to authenticate) and by id (to manage).
//!
//! Rows: `h` hash → key id; `k` key id → [`KeyRecord`]. Only the SHA-256 of a
//! key is ever stored; see `KeyIssued`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use switchboard_events::catalog::{Budget, KeyHash, Limits, Scope};
use switchboard_events::{time, Envelope, Event};

use crate::view::{decode_row, row_key, ProjectionError, Staged};

pub const NAME: &str = "keys";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    #[serde(with = "time::serde_at")]
    pub at: DateTime<Utc>,
    pub by: String,
    pub reason: Option<String>,
}

/// Everything known about a key but the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub name: String,
    pub owner: Option<String>,
    pub key_hash: KeyHash,
    pub scopes: Vec<Scope>,
    pub limits: Limits,
    pub budget: Option<Budget>,
    #[serde(with = "time::serde_at")]
    pub issued_at: DateTime<Utc>,
    #[serde(with = "time::serde_opt_at")]
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked: Option<Revocation>,
}

impl KeyRecord {
    /// Whether the key may be used at `now`: not revoked and not expired.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.revoked.is_none() && self.expires_at.is_none_or(|expiry| now < expiry)
    }
}

fn record_key(key_id: &str) -> Vec<u8> {
    row_key(b'k', &[key_id.as_bytes()])
}

fn hash_key(hash: &KeyHash) -> Vec<u8> {
    row_key(b'h', &[&hash.0])
}

pub fn apply(view: &mut Staged, envelope: &Envelope) -> Result<(), ProjectionError> {
    match &envelope.event {
        Event::KeyIssued(e) => {
            // Issuing an existing id again replaces its secret: the old hash stops
            // authenticating. A revocation is never undone by it.
            let previous = view.get::<KeyRecord>(&record_key(&e.key_id))?;
            if let Some(previous) = &previous {
                view.delete(hash_key(&previous.key_hash));
            }
            view.put(hash_key(&e.key_hash), &e.key_id);
            view.put(
                record_key(&e.key_id),
                &KeyRecord {
                    key_id: e.key_id.clone(),
                    name: e.name.clone(),
                    owner: e.owner.clone(),
                    key_hash: e.key_hash,
                    scopes: e.scopes.clone(),
                    limits: e.limits.clone(),
                    budget: e.budget.clone(),
                    issued_at: envelope.at,
                    expires_at: e.expires_at,
                    revoked: previous.and_then(|p| p.revoked),
                },
            );
        }
        Event::KeyUpdated(e) => {
            let key = record_key(&e.key_id);
            if let Some(mut record) = view.get::<KeyRecord>(&key)? {
                if let Some(limits) = &e.limits {
                    record.limits = limits.clone();
                }
                if let Some(budget) = &e.budget {
                    record.budget = Some(budget.clone());
                }
                view.put(key, &record);
            }
        }
        Event::KeyRevoked(e) => {
            let key = record_key(&e.key_id);
            if let Some(mut record) = view.get::<KeyRecord>(&key)? {
                if record.revoked.is_none() {
                    record.revoked = Some(Revocation {
                        at: envelope.at,
                        by: e.by.clone(),
                        reason: e.reason.clone(),
                    });
                    view.put(key, &record);
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Read access to the keys view.
#[derive(Clone)]
pub struct KeysView {
    pub(crate) tree: sled::Tree,
}

impl KeysView {
    /// The key whose SHA-256 is `hash`. The lookup is by hash, so comparing the
    /// presented key to stored secrets never happens byte by byte.
    pub fn by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, ProjectionError> {
        let key = hash_key(hash);
        match self.tree.get(&key)? {
            None => Ok(None),
            Some(id) => {
                let key_id: String = decode_row(NAME, &key, &id)?;
                Ok(self.get(&key_id)?.filter(|record| record.key_hash == *hash))
            }
        }
    }

    pub fn get(&self, key_id: &str) -> Result<Option<KeyRecord>, ProjectionError> {
        let key = record_key(key_id);
        self.tree
            .get(&key)?
            .map(|value| decode_row(NAME, &key, &value))
            .transpose()
    }

    /// Every key, by id.
    pub fn list(&self) -> Result<Vec<KeyRecord>, ProjectionError> {
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix([b'k']) {
            let (key, value) = entry?;
            out.push(decode_row(NAME, &key, &value)?);
        }
        Ok(out)
    }
}
