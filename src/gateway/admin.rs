//! `<prefix>.admin.keys.issue|revoke|update|list` (DESIGN §6): key management for
//! callers holding the `admin` scope.
//!
//! | subject | body | reply |
//! |---|---|---|
//! | `…admin.keys.issue` | a [`KeySpec`]: `{"name","owner"?,"scopes"?,"limits"?,"budget"?,"expires_at"?}` | `{"ok":true,"key_id","key","seq"}` — the key, once |
//! | `…admin.keys.revoke` | `{"key_id","reason"?}` | `{"ok":true,"key_id","revoked":true,"already":bool}` |
//! | `…admin.keys.update` | `{"key_id","limits"?,"budget"?}` ([`KeyChange`]) | `{"ok":true,"key":{…},"seq"}` — the key as listed, changed |
//! | `…admin.keys.list` | `{}` (or empty) | `{"ok":true,"keys":[…]}` without hashes |
//!
//! Each change also appends an `admin_action` naming the admin key that made
//! it, so the audit trail says who did what.

use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_events::catalog::{AdminAction, Budget, Limits, Scope};
use switchboard_events::{Event, ExpectedVersion, NewEvent, StreamId};

use super::auth::Caller;
use super::wire::{decode_body, BodyFormat, GatewayError};
use super::{header, Gateway, RequestMeta};
use crate::bus::Message;
use crate::keys::{self, KeyAdminError, KeyChange, KeySpec, Revoked};

/// The body of `…admin.keys.update`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRequest {
    key_id: String,
    #[serde(default)]
    limits: Option<Limits>,
    #[serde(default)]
    budget: Option<Budget>,
}

/// The body of `…admin.keys.revoke`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    key_id: String,
    #[serde(default)]
    reason: Option<String>,
}

impl Gateway {
    /// Serves one `…admin.keys.<operation>` request.
    pub(super) async fn admin_keys(
        &self,
        message: &Message,
        meta: &RequestMeta,
    ) -> Result<Value, GatewayError> {
        let caller = self
            .auth
            .authenticate(&message.headers, &[Scope::Admin], meta)
            .await?;
        let operation = message
            .subject
            .strip_prefix(self.admin_keys_start.as_str())
            .unwrap_or_default();
        let format = BodyFormat::from_content_type(header(&message.headers, "Content-Type"))?;
        match operation {
            "issue" => {
                self.issue_key(&caller, decode_body(&message.payload, format)?, meta)
                    .await
            }
            "revoke" => {
                self.revoke_key(&caller, decode_body(&message.payload, format)?, meta)
                    .await
            }
            "update" => {
                self.update_key(&caller, decode_body(&message.payload, format)?, meta)
                    .await
            }
            "list" => self.list_keys().await,
            other => Err(GatewayError::InvalidRequest(format!(
                "unknown key operation {other:?} (expected issue, revoke, update or list)"
            ))),
        }
    }

    async fn issue_key(
        &self,
        caller: &Caller,
        spec: KeySpec,
        meta: &RequestMeta,
    ) -> Result<Value, GatewayError> {
        let issued = keys::issue(&self.log, spec).await.map_err(admin_error)?;
        self.record_action(caller, "issue_key", &issued.key_id, meta)
            .await;
        Ok(json!({
            "ok": true,
            "key_id": issued.key_id,
            "key": issued.key.expose(),
            "seq": issued.seq,
        }))
    }

    async fn revoke_key(
        &self,
        caller: &Caller,
        request: RevokeRequest,
        meta: &RequestMeta,
    ) -> Result<Value, GatewayError> {
        self.caught_up().await?;
        let revoked = keys::revoke(
            &self.log,
            &self.projections,
            &request.key_id,
            &caller.record.key_id,
            request.reason,
        )
        .await
        .map_err(admin_error)?;
        let already = match revoked {
            Revoked::Now { seq } => {
                self.record_action(caller, "revoke_key", &request.key_id, meta)
                    .await;
                // The answer means the key no longer works: wait until the
                // key store has taken the revocation in.
                self.folded(seq, "the revocation").await?;
                false
            }
            Revoked::Already { .. } => true,
        };
        Ok(json!({
            "ok": true,
            "key_id": request.key_id,
            "revoked": true,
            "already": already,
        }))
    }

    async fn update_key(
        &self,
        caller: &Caller,
        request: UpdateRequest,
        meta: &RequestMeta,
    ) -> Result<Value, GatewayError> {
        self.caught_up().await?;
        let seq = keys::update(
            &self.log,
            &self.projections,
            &request.key_id,
            KeyChange {
                limits: request.limits,
                budget: request.budget,
            },
        )
        .await
        .map_err(admin_error)?;
        self.record_action(caller, "update_key", &request.key_id, meta)
            .await;
        // Read-your-writes: the next request with the key sees the change.
        self.folded(seq, "the change").await?;
        let record = keys::find(&self.projections, &request.key_id).map_err(admin_error)?;
        Ok(json!({ "ok": true, "key": keys::public(&record), "seq": seq }))
    }

    async fn list_keys(&self) -> Result<Value, GatewayError> {
        self.caught_up().await?;
        let records = self.projections.keys().list().map_err(|error| {
            tracing::error!(%error, "cannot read the keys projection");
            GatewayError::Unavailable("the key store cannot be read".into())
        })?;
        let keys: Vec<Value> = records.iter().map(keys::public).collect();
        Ok(json!({ "ok": true, "keys": keys }))
    }

    /// Appends `admin_action`; a failure is logged, the change it records stands.
    pub(super) async fn record_action(
        &self,
        caller: &Caller,
        action: &str,
        target: &str,
        meta: &RequestMeta,
    ) {
        let mut event = NewEvent::new(Event::AdminAction(AdminAction {
            actor: caller.record.key_id.clone(),
            action: action.to_owned(),
            target: target.to_owned(),
        }));
        event.correlation_id = Some(meta.correlation_id);
        event.traceparent = meta.traceparent.clone();
        if let Err(error) = self
            .log
            .append(StreamId::system(), ExpectedVersion::Any, vec![event])
            .await
        {
            tracing::error!(action, target, %error, "admin_action was not stored");
        }
    }
}

fn admin_error(error: KeyAdminError) -> GatewayError {
    match error {
        KeyAdminError::Invalid(message) => GatewayError::InvalidRequest(message),
        KeyAdminError::UnknownKey(id) => GatewayError::NotFound(format!("no key with id {id:?}")),
        other => {
            tracing::error!(error = %other, "key administration failed");
            GatewayError::Unavailable("the key store cannot be changed right now".into())
        }
    }
}
