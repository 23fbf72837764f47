//! Key management shared by the offline CLI (`switchboard keys …`) and the
//! admin subjects of the gateway (`<prefix>.admin.keys.*`): what issuing,
//! revoking and listing append and show, and the admin key's bootstrap
//! (DESIGN §8).
//!
//! A key is shown once, when issued; only its SHA-256 reaches the log. Lists
//! never include the hash either: it is no secret by itself, but nobody needs
//! it and an offline guess against it is cheaper than against the server.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use switchboard_events::apikey::{hash_key, ApiKey};
use switchboard_events::catalog::{Budget, KeyIssued, KeyRevoked, KeyUpdated, Limits, Scope};
use switchboard_events::{
    AppendError, Event, EventLog, ExpectedVersion, NewEvent, ReadError, StreamId,
};
use switchboard_projections::{KeyRecord, ProjectionError, Projections};

/// The key id of the admin key `serve` bootstraps.
pub const ADMIN_KEY_ID: &str = "admin";
/// Where `serve` writes a generated admin key, inside the data dir.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// The longest key name accepted.
const MAX_NAME_CHARS: usize = 128;
/// The shortest admin key accepted from the environment: a guessable admin
/// key is worse than none.
const MIN_ADMIN_KEY_CHARS: usize = 16;

/// What a key is issued with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// A name to recognise the key by.
    pub name: String,
    /// The user or team that owns it.
    #[serde(default)]
    pub owner: Option<String>,
    /// `chat` when none are given.
    #[serde(default)]
    pub scopes: Vec<Scope>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub budget: Option<Budget>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A request the key store refuses, or a failure to store.
#[derive(Debug, thiserror::Error)]
pub enum KeyAdminError {
    /// A bad name, owner, scope list or expiry; nothing was stored.
    #[error("{0}")]
    Invalid(String),
    /// No key has this id.
    #[error("no key with id {0:?}")]
    UnknownKey(String),
    #[error("cannot append to the log: {0}")]
    Append(#[from] AppendError),
    #[error("cannot read the keys view: {0}")]
    View(#[from] ProjectionError),
    #[error("cannot read the log: {0}")]
    Read(#[from] ReadError),
    #[error("cannot write {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A freshly issued key: the secret (show it once) and what was stored.
pub struct IssuedKey {
    pub key_id: String,
    pub key: ApiKey,
    pub seq: u64,
}

/// A key id: `key_` and 16 hex digits of randomness.
pub fn new_key_id() -> String {
    let random = uuid::Uuid::new_v4();
    format!("key_{}", &random.simple().to_string()[..16])
}

/// Checks `spec` and builds the `key_issued` event of a new key (not yet
/// stored), with the generated secret.
pub fn issue_event(
    spec: KeySpec,
    now: DateTime<Utc>,
) -> Result<(String, ApiKey, KeyIssued), KeyAdminError> {
    let name = spec.name.trim();
    if name.is_empty()
        || name.chars().count() > MAX_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        return Err(KeyAdminError::Invalid(format!(
            "name must be 1-{MAX_NAME_CHARS} characters without control characters"
        )));
    }
    if let Some(owner) = &spec.owner {
        // The owner is the usage's user when a send names none, and a part
        // of the costs view's row keys, which NUL separates.
        if owner.is_empty()
            || owner.chars().count() > MAX_NAME_CHARS
            || owner.chars().any(char::is_control)
        {
            return Err(KeyAdminError::Invalid(format!(
                "owner must be 1-{MAX_NAME_CHARS} characters without control characters"
            )));
        }
    }
    if spec.expires_at.is_some_and(|at| at <= now) {
        return Err(KeyAdminError::Invalid(
            "expires_at must be in the future".into(),
        ));
    }
    let mut scopes = spec.scopes;
    if scopes.is_empty() {
        scopes.push(Scope::Chat);
    }
    scopes.dedup();
    let key = ApiKey::generate();
    let key_id = new_key_id();
    let event = KeyIssued {
        key_id: key_id.clone(),
        name: name.to_owned(),
        owner: spec.owner,
        key_hash: key.hash(),
        scopes,
        limits: spec.limits,
        budget: spec.budget,
        expires_at: spec.expires_at,
    };
    Ok((key_id, key, event))
}

/// Issues a key: appends its `key_issued` to `key/<id>`, durably.
pub async fn issue(log: &EventLog, spec: KeySpec) -> Result<IssuedKey, KeyAdminError> {
    let (key_id, key, event) = issue_event(spec, Utc::now())?;
    let appended = log
        .append(
            StreamId::key(&key_id).map_err(|e| KeyAdminError::Invalid(e.to_string()))?,
            ExpectedVersion::Exact(0),
            vec![NewEvent::new(Event::KeyIssued(event))],
        )
        .await?;
    Ok(IssuedKey {
        key_id,
        key,
        seq: appended.first().seq,
    })
}

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// Revoked now, by the event at this seq.
    Now { seq: u64 },
    /// It already was, at this time.
    Already { at: DateTime<Utc> },
}

/// Revokes `key_id` on behalf of `by`. Revoking a revoked key changes nothing.
pub async fn revoke(
    log: &EventLog,
    projections: &Projections,
    key_id: &str,
    by: &str,
    reason: Option<String>,
) -> Result<Revoked, KeyAdminError> {
    let record = find(projections, key_id)?;
    if let Some(revocation) = &record.revoked {
        return Ok(Revoked::Already { at: revocation.at });
    }
    let event = Event::KeyRevoked(KeyRevoked {
        key_id: record.key_id.clone(),
        by: by.to_owned(),
        reason,
    });
    let stream =
        StreamId::key(&record.key_id).map_err(|e| KeyAdminError::Invalid(e.to_string()))?;
    let appended = log
        .append(stream, ExpectedVersion::Any, vec![NewEvent::new(event)])
        .await?;
    Ok(Revoked::Now {
        seq: appended.first().seq,
    })
}

/// A change of a key's limits or budget (`…admin.keys.update`,
/// `PATCH /admin/keys/{id}`): a given `limits` replaces the key's limits
/// (a limit left out is unlimited), a given `budget` its budget; what is
/// not given stays.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyChange {
    #[serde(default)]
    pub limits: Option<Limits>,
    #[serde(default)]
    pub budget: Option<Budget>,
}

/// Appends `key_updated` for an active key; returns its seq. A change with
/// nothing in it, or to a revoked key, is refused.
pub async fn update(
    log: &EventLog,
    projections: &Projections,
    key_id: &str,
    change: KeyChange,
) -> Result<u64, KeyAdminError> {
    if change.limits.is_none() && change.budget.is_none() {
        return Err(KeyAdminError::Invalid(
            "nothing to update: give limits or budget".into(),
        ));
    }
    let record = find(projections, key_id)?;
    if record.revoked.is_some() {
        return Err(KeyAdminError::Invalid(format!(
            "key {key_id} is revoked; a revoked key cannot be changed"
        )));
    }
    let event = Event::KeyUpdated(KeyUpdated {
        key_id: record.key_id.clone(),
        limits: change.limits,
        budget: change.budget,
    });
    let stream =
        StreamId::key(&record.key_id).map_err(|e| KeyAdminError::Invalid(e.to_string()))?;
    let appended = log
        .append(stream, ExpectedVersion::Any, vec![NewEvent::new(event)])
        .await?;
    Ok(appended.first().seq)
}

/// The key with this id, from the keys view.
pub fn find(projections: &Projections, key_id: &str) -> Result<KeyRecord, KeyAdminError> {
    projections
        .keys()
        .get(key_id)?
        .ok_or_else(|| KeyAdminError::UnknownKey(key_id.to_owned()))
}

/// A key record as listed: everything but the hash.
pub fn public(record: &KeyRecord) -> Value {
    let mut value = serde_json::to_value(record).expect("key records serialize");
    if let Some(fields) = value.as_object_mut() {
        fields.remove("key_hash");
    }
    value
}

/// What the admin key bootstrap did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminBootstrap {
    /// The admin key already existed (and matches the configured one, if any).
    Existing,
    /// The configured key (`SWITCHBOARD_ADMIN_KEY`) was stored (as its hash).
    FromConfig,
    /// A key was generated and written to this file (mode 0600).
    Generated(PathBuf),
}

/// Makes sure an admin key exists (DESIGN §8).
///
/// With `configured` (from `SWITCHBOARD_ADMIN_KEY`): a key with its hash and
/// the `admin` scope is used as it is; otherwise its hash is stored as key
/// `admin` — replacing the key `admin` had (re-issuing a key id retires its
/// old hash) — or, when `admin` was revoked (a revocation is never undone),
/// under a new key id. A configured key that was itself revoked is refused:
/// choose another.
///
/// Without: the first start generates a key, writes it to
/// `<data dir>/admin.key` with mode 0600 — before storing its hash, so a
/// crash in between leaves no admin key nobody can read — and later starts
/// leave it. If `admin` was revoked and no other active key has the `admin`
/// scope, a new one is generated the same way under a new key id.
///
/// `projections` must be caught up with the log.
pub async fn bootstrap_admin(
    log: &EventLog,
    projections: &Projections,
    configured: Option<&str>,
) -> Result<AdminBootstrap, KeyAdminError> {
    let keys = projections.keys();
    let now = Utc::now();
    let admin = keys.get(ADMIN_KEY_ID)?;
    let admin_revoked = admin.as_ref().is_some_and(|r| r.revoked.is_some());
    let (key_id, hash, outcome) = match configured {
        Some(key) => {
            if key.chars().count() < MIN_ADMIN_KEY_CHARS || key.chars().any(char::is_whitespace) {
                return Err(KeyAdminError::Invalid(format!(
                    "SWITCHBOARD_ADMIN_KEY must be at least {MIN_ADMIN_KEY_CHARS} characters \
                     without whitespace"
                )));
            }
            let hash = hash_key(key);
            if let Some(record) = keys.by_hash(&hash)? {
                if record.revoked.is_some() {
                    return Err(KeyAdminError::Invalid(format!(
                        "SWITCHBOARD_ADMIN_KEY is key {} and was revoked; set another",
                        record.key_id
                    )));
                }
                if !record.scopes.contains(&Scope::Admin) || !record.is_active(now) {
                    return Err(KeyAdminError::Invalid(format!(
                        "SWITCHBOARD_ADMIN_KEY is key {}, which is not an active admin key; \
                         set another",
                        record.key_id
                    )));
                }
                return Ok(AdminBootstrap::Existing);
            }
            let key_id = if admin_revoked {
                new_key_id()
            } else {
                ADMIN_KEY_ID.to_owned()
            };
            (key_id, hash, AdminBootstrap::FromConfig)
        }
        None => {
            if admin.is_some() && !admin_revoked {
                return Ok(AdminBootstrap::Existing);
            }
            let key_id = if admin_revoked {
                let another = keys
                    .list()?
                    .into_iter()
                    .any(|r| r.scopes.contains(&Scope::Admin) && r.is_active(now));
                if another {
                    return Ok(AdminBootstrap::Existing);
                }
                new_key_id()
            } else {
                ADMIN_KEY_ID.to_owned()
            };
            let key = ApiKey::generate();
            let path = log.dir().join(ADMIN_KEY_FILE);
            write_secret(&path, key.expose())?;
            (key_id, key.hash(), AdminBootstrap::Generated(path))
        }
    };
    let event = KeyIssued {
        key_id: key_id.clone(),
        name: "admin".to_owned(),
        owner: None,
        key_hash: hash,
        scopes: vec![Scope::Admin, Scope::Chat],
        limits: Limits::default(),
        budget: None,
        expires_at: None,
    };
    let stream = StreamId::key(&key_id).map_err(|e| KeyAdminError::Invalid(e.to_string()))?;
    log.append(
        stream,
        ExpectedVersion::Any,
        vec![NewEvent::new(Event::KeyIssued(event))],
    )
    .await?;
    Ok(outcome)
}

/// Writes `secret` to `path`, readable by its owner only.
fn write_secret(path: &Path, secret: &str) -> Result<(), KeyAdminError> {
    let error = |source| KeyAdminError::File {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(error)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(error)?;
    }
    file.write_all(secret.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked() {
        let now = Utc::now();
        let spec = |name: &str| KeySpec {
            name: name.into(),
            ..KeySpec::default()
        };
        assert!(matches!(
            issue_event(spec("  "), now),
            Err(KeyAdminError::Invalid(_))
        ));
        let mut expired = spec("old");
        expired.expires_at = Some(now - chrono::Duration::seconds(1));
        assert!(matches!(
            issue_event(expired, now),
            Err(KeyAdminError::Invalid(_))
        ));
        let mut owner = spec("bot");
        owner.owner = Some("team\0a".into());
        assert!(matches!(
            issue_event(owner, now),
            Err(KeyAdminError::Invalid(_))
        ));
        let (key_id, key, event) = issue_event(spec(" bot "), now).expect("valid");
        assert_eq!(event.key_id, key_id);
        assert_eq!(event.name, "bot");
        assert_eq!(event.scopes, vec![Scope::Chat]);
        assert_eq!(event.key_hash, key.hash());
    }

    #[test]
    fn spec_json() {
        let spec: KeySpec =
            serde_json::from_str(r#"{"name":"bot","scopes":["chat","admin"],"limits":{"rpm":5}}"#)
                .expect("valid");
        assert_eq!(spec.limits.rpm, Some(5));
        assert_eq!(spec.scopes, vec![Scope::Chat, Scope::Admin]);
        assert!(serde_json::from_str::<KeySpec>(r#"{"name":"x","key":"sb-1"}"#).is_err());
    }
}
