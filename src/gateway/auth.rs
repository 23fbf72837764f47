//! Who is calling: the `Authorization: Bearer <key>` header checked against the
//! keys projection, and the `auth_failed` event every refusal leaves in the
//! `system` stream.
//!
//! The key itself is never stored, logged or echoed: lookups go by its SHA-256
//! ([`hash_key`]) and audit events carry at most its first 8 characters
//! ([`key_prefix`]), and only when the presented key is longer than that.

use std::time::Duration;

use chrono::Utc;
use switchboard_events::apikey::{hash_key, key_prefix};
use switchboard_events::catalog::{AuthFailed, Scope};
use switchboard_events::{Event, EventLog, ExpectedVersion, NewEvent, StreamId};
use switchboard_projections::{KeyRecord, Projections};

use super::wire::GatewayError;
use super::{header, RequestMeta};
use crate::bus::Headers;

/// How long a key that looks unknown, revoked or expired waits for the keys
/// projection to fold the log's head before the refusal stands: a key issued
/// (or a revocation) just before the request is honoured.
const KEY_FRESHNESS_WAIT: Duration = Duration::from_secs(2);

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub record: KeyRecord,
    /// The first characters of the key it presented, for audit events.
    pub key_prefix: Option<String>,
}

impl Caller {
    pub fn has(&self, scope: Scope) -> bool {
        self.record.scopes.contains(&scope)
    }
}

/// Why a caller was refused: the `reason` of its `auth_failed` event and
/// the reply's message.
#[derive(Debug, Clone)]
pub struct AuthFailure {
    reason: &'static str,
    message: String,
    key_prefix: Option<String>,
    /// `forbidden` (a valid key without the right) rather than `unauthorized`.
    forbidden: bool,
}

impl AuthFailure {
    fn unauthorized(reason: &'static str, message: impl Into<String>, key: Option<&str>) -> Self {
        AuthFailure {
            reason,
            message: message.into(),
            key_prefix: key.and_then(key_prefix),
            forbidden: false,
        }
    }

    /// A valid key refused for want of a right.
    pub fn forbidden(reason: &'static str, message: impl Into<String>, caller: &Caller) -> Self {
        AuthFailure {
            reason,
            message: message.into(),
            key_prefix: caller.key_prefix.clone(),
            forbidden: true,
        }
    }
}

/// Checks callers' keys and records refusals.
#[derive(Clone)]
pub struct Authenticator {
    projections: Projections,
    log: EventLog,
}

impl Authenticator {
    pub fn new(projections: Projections, log: EventLog) -> Self {
        Authenticator { projections, log }
    }

    /// The caller behind `headers`' `Authorization`, if its key is known,
    /// active and holds one of `scopes`. A refusal is appended as
    /// `auth_failed` and returned as `unauthorized` or `forbidden`.
    pub async fn authenticate(
        &self,
        headers: &Headers,
        scopes: &[Scope],
        meta: &RequestMeta,
    ) -> Result<Caller, GatewayError> {
        // The keys view stopped changing: a key revoked since would pass.
        if let Some(why) = self.projections.failure() {
            return Err(GatewayError::Unavailable(format!(
                "the projections stopped ({why}); keys cannot be checked"
            )));
        }
        let caller = match self.check_key(headers).await {
            Ok(caller) => caller,
            Err(Ok(failure)) => return Err(self.refuse(failure, meta).await),
            Err(Err(error)) => return Err(error),
        };
        if !scopes.iter().any(|scope| caller.has(*scope)) {
            let wanted: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
            let failure = AuthFailure::forbidden(
                "missing_scope",
                format!("the key lacks the {} scope", wanted.join(" or ")),
                &caller,
            );
            return Err(self.refuse(failure, meta).await);
        }
        Ok(caller)
    }

    /// Appends the failure's `auth_failed` to `system` and returns the error
    /// to answer with. A failed append is logged; the refusal stands.
    pub async fn refuse(&self, failure: AuthFailure, meta: &RequestMeta) -> GatewayError {
        let mut event = NewEvent::new(Event::AuthFailed(AuthFailed {
            channel: meta.channel,
            reason: failure.reason.to_owned(),
            key_prefix: failure.key_prefix,
            remote: meta.remote.clone(),
        }));
        event.correlation_id = Some(meta.correlation_id);
        event.traceparent = meta.traceparent.clone();
        let appended = self
            .log
            .append(StreamId::system(), ExpectedVersion::Any, vec![event])
            .await;
        if let Err(error) = appended {
            tracing::error!(reason = failure.reason, %error, "auth_failed was not stored");
        }
        tracing::info!(
            reason = failure.reason,
            correlation_id = %meta.correlation_id,
            "request refused"
        );
        if failure.forbidden {
            GatewayError::Forbidden(failure.message)
        } else {
            GatewayError::Unauthorized(failure.message)
        }
    }

    /// The caller, an auth failure to record, or an error reading the keys.
    async fn check_key(
        &self,
        headers: &Headers,
    ) -> Result<Caller, Result<AuthFailure, GatewayError>> {
        let Some(value) = header(headers, "Authorization") else {
            return Err(Ok(AuthFailure::unauthorized(
                "missing_key",
                "no Authorization header (expected \"Bearer <key>\")",
                None,
            )));
        };
        let Some(key) = bearer_token(value) else {
            return Err(Ok(AuthFailure::unauthorized(
                "malformed_authorization",
                "the Authorization header is not \"Bearer <key>\"",
                Some(value),
            )));
        };
        let mut record = self.lookup(key).map_err(Err)?;
        if !record.as_ref().is_some_and(|r| r.is_active(Utc::now())) {
            // Perhaps issued or revoked a moment ago: look again once the
            // projection has caught up with the log.
            let caught_up = self.projections.wait_for(self.log.head());
            let _ = tokio::time::timeout(KEY_FRESHNESS_WAIT, caught_up).await;
            record = self.lookup(key).map_err(Err)?;
        }
        let Some(record) = record else {
            return Err(Ok(AuthFailure::unauthorized(
                "unknown_key",
                "unknown API key",
                Some(key),
            )));
        };
        if record.revoked.is_some() {
            return Err(Ok(AuthFailure::unauthorized(
                "revoked_key",
                "the API key was revoked",
                Some(key),
            )));
        }
        if !record.is_active(Utc::now()) {
            return Err(Ok(AuthFailure::unauthorized(
                "expired_key",
                "the API key has expired",
                Some(key),
            )));
        }
        Ok(Caller {
            record,
            key_prefix: key_prefix(key),
        })
    }

    fn lookup(&self, key: &str) -> Result<Option<KeyRecord>, GatewayError> {
        self.projections
            .keys()
            .by_hash(&hash_key(key))
            .map_err(|error| {
                tracing::error!(%error, "cannot read the keys projection");
                GatewayError::Unavailable("the key store cannot be read".into())
            })
    }
}

/// The key of `Bearer <key>` (scheme case-insensitive), if that is the shape.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(char::is_whitespace)?;
    let token = token.trim();
    let single = !token.is_empty() && !token.contains(char::is_whitespace);
    (scheme.eq_ignore_ascii_case("bearer") && single).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer_token("Bearer sb-abc"), Some("sb-abc"));
        assert_eq!(bearer_token("bearer   sb-abc "), Some("sb-abc"));
        assert_eq!(bearer_token("Basic sb-abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer a b"), None);
        assert_eq!(bearer_token("sb-abc"), None);
    }

    #[test]
    fn audit_prefix_is_never_the_whole_key() {
        assert_eq!(key_prefix("sb-0123456789"), Some("sb-01234".into()));
        assert_eq!(key_prefix("sb-01234"), None);
        assert_eq!(key_prefix("short"), None);
    }
}
