//! What travels on the gateway's subjects: request bodies in, JSON replies out
//! (DESIGN §6).
//!
//! Requests are JSON unless `Content-Type: application/postcard` says they are
//! postcard of the same [`SendRequest`]. Replies are always JSON, whatever the
//! request's encoding: the error shape has optional fields and an `ok` switch
//! that postcard (not self-describing) cannot carry, and one reply format keeps
//! every client's decoder the same.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchboard_actors::budget::BudgetRefused;
use switchboard_actors::conversation_actor::{Ack, ConversationError};
use switchboard_actors::rate_limiter::AdmitError;
use switchboard_projections::HistoryMessage;

/// The largest request body accepted; bigger ones are `invalid_request`.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// The longest `message_id`, `agent` or `user` accepted.
const MAX_FIELD_CHARS: usize = 128;

/// The body of `<prefix>.conv.<id>.send`.
///
/// Field order is the postcard encoding: `content`, `message_id`, `agent`,
/// `user`, each optional one as postcard's `Option` (a 0 or 1 tag byte).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    pub content: String,
    #[serde(default)]
    pub message_id: Option<String>,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// How a request body is encoded, from its `Content-Type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    Postcard,
}

impl BodyFormat {
    /// The format a `Content-Type` value names (parameters such as
    /// `; charset=utf-8` are ignored); absent means JSON.
    pub fn from_content_type(value: Option<&str>) -> Result<BodyFormat, GatewayError> {
        let Some(value) = value else {
            return Ok(BodyFormat::Json);
        };
        let media = value.split(';').next().unwrap_or("").trim();
        if media.eq_ignore_ascii_case("application/json") || media.is_empty() {
            Ok(BodyFormat::Json)
        } else if media.eq_ignore_ascii_case("application/postcard") {
            Ok(BodyFormat::Postcard)
        } else {
            Err(GatewayError::InvalidRequest(format!(
                "unsupported Content-Type {media:?} (expected application/json or application/postcard)"
            )))
        }
    }
}

/// Decodes a request body of at most [`MAX_BODY_BYTES`] in `format`; any
/// failure is `invalid_request` saying what was wrong.
pub fn decode_body<T: DeserializeOwned>(
    body: &[u8],
    format: BodyFormat,
) -> Result<T, GatewayError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(GatewayError::InvalidRequest(format!(
            "body of {} bytes exceeds the limit of {MAX_BODY_BYTES} bytes",
            body.len()
        )));
    }
    match format {
        BodyFormat::Json => serde_json::from_slice(body)
            .map_err(|e| GatewayError::InvalidRequest(format!("malformed JSON body: {e}"))),
        BodyFormat::Postcard => {
            let (request, rest) = postcard::take_from_bytes(body).map_err(|e| {
                GatewayError::InvalidRequest(format!("malformed postcard body: {e}"))
            })?;
            if !rest.is_empty() {
                return Err(GatewayError::InvalidRequest(format!(
                    "malformed postcard body: {} trailing bytes",
                    rest.len()
                )));
            }
            Ok(request)
        }
    }
}

impl SendRequest {
    /// Decodes and checks a send body: size, encoding, a non-blank `content`,
    /// and short non-empty optional fields.
    pub fn decode(body: &[u8], format: BodyFormat) -> Result<SendRequest, GatewayError> {
        let request: SendRequest = decode_body(body, format)?;
        request.check()?;
        Ok(request)
    }

    fn check(&self) -> Result<(), GatewayError> {
        if self.content.trim().is_empty() {
            return Err(GatewayError::InvalidRequest(
                "content must not be empty".into(),
            ));
        }
        for (name, value) in [
            ("message_id", &self.message_id),
            ("agent", &self.agent),
            ("user", &self.user),
        ] {
            let Some(value) = value else { continue };
            let chars = value.chars().count();
            if chars == 0 || chars > MAX_FIELD_CHARS || value.chars().any(char::is_control) {
                return Err(GatewayError::InvalidRequest(format!(
                    "{name} must be 1-{MAX_FIELD_CHARS} characters without control characters"
                )));
            }
        }
        Ok(())
    }
}

/// Why a request was refused; [`code`](Self::code) is the error code of
/// DESIGN §6 and the message is safe to show the caller (it never holds a key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// No key, or one that is unknown, revoked or expired.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A valid key without the right to do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A bad subject token or body; the same request will never succeed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// What the request names does not exist (a key id).
    #[error("not found: {0}")]
    NotFound(String),
    /// The core refused or failed the send.
    #[error(transparent)]
    Conversation(#[from] ConversationError),
    /// The key's rate limiter refused or could not answer.
    #[error(transparent)]
    Admission(#[from] AdmitError),
    /// The key's or its owner's budget is spent.
    #[error("budget exceeded: {0}")]
    Budget(#[from] BudgetRefused),
    /// A dependency (the log, the projections) is not answering in time.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug: retrying will not help.
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    /// The code of DESIGN §6.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::Unauthorized(_) => "unauthorized",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::InvalidRequest(_) => "invalid_request",
            GatewayError::NotFound(_) => "not_found",
            GatewayError::Conversation(error) => error.code(),
            GatewayError::Admission(error) => error.code(),
            GatewayError::Budget(_) => "budget_exceeded",
            GatewayError::Unavailable(_) => "unavailable",
            GatewayError::Internal(_) => "internal",
        }
    }

    /// The message without the code.
    pub fn message(&self) -> String {
        match self {
            GatewayError::Unauthorized(m)
            | GatewayError::Forbidden(m)
            | GatewayError::InvalidRequest(m)
            | GatewayError::NotFound(m)
            | GatewayError::Unavailable(m)
            | GatewayError::Internal(m) => m.clone(),
            GatewayError::Conversation(error) => error.message().to_owned(),
            GatewayError::Admission(AdmitError::RateLimited(refused)) => refused.to_string(),
            GatewayError::Admission(AdmitError::Unavailable(m) | AdmitError::Internal(m)) => {
                m.clone()
            }
            GatewayError::Budget(refused) => refused.to_string(),
        }
    }

    /// When trying again can succeed, for a refusal that knows.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            GatewayError::Admission(error) => error.retry_after_ms(),
            GatewayError::Budget(refused) => refused
                .retry_after
                .map(|wait| u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)),
            _ => None,
        }
    }

    /// `{"ok":false,"error":{"code","message","retry_after_ms"?}}`.
    pub fn to_json(&self) -> Value {
        let mut error = json!({ "code": self.code(), "message": self.message() });
        if let Some(ms) = self.retry_after_ms() {
            error["retry_after_ms"] = json!(ms);
        }
        json!({ "ok": false, "error": error })
    }
}

/// `{"ok":true,"conversation_id","message_id","seq"}`, with `"duplicate":true`
/// when an earlier send stored the message.
pub fn ack_json(ack: &Ack) -> Value {
    let mut reply = json!({
        "ok": true,
        "conversation_id": ack.conversation_id,
        "message_id": ack.message_id,
        "seq": ack.seq,
    });
    if ack.duplicate {
        reply["duplicate"] = Value::Bool(true);
    }
    reply
}

/// `{"ok":true,"conversation_id","messages":[…],"erased","has_more"}`; each
/// message is `{message_id, role, content, agent, at, seq}`.
pub fn history_json(
    conversation_id: &str,
    messages: &[HistoryMessage],
    erased: bool,
    has_more: bool,
) -> Value {
    json!({
        "ok": true,
        "conversation_id": conversation_id,
        "messages": messages,
        "erased": erased,
        "has_more": has_more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_postcard_decode_alike() {
        let request = SendRequest {
            content: "hi".into(),
            message_id: Some("m1".into()),
            agent: None,
            user: Some("ada".into()),
        };
        let json = serde_json::to_vec(&request).expect("serializes");
        let postcard = postcard::to_stdvec(&request).expect("serializes");
        assert_eq!(
            SendRequest::decode(&json, BodyFormat::Json).expect("valid"),
            request
        );
        assert_eq!(
            SendRequest::decode(&postcard, BodyFormat::Postcard).expect("valid"),
            request
        );
    }

    #[test]
    fn bad_bodies_are_invalid_requests() {
        let huge = vec![b' '; MAX_BODY_BYTES + 1];
        for (body, format, needle) in [
            (&b"{"[..], BodyFormat::Json, "malformed JSON"),
            (br#"{"content":""}"#, BodyFormat::Json, "content"),
            (br#"{"message_id":"m"}"#, BodyFormat::Json, "content"),
            (br#"{"content":5}"#, BodyFormat::Json, "malformed JSON"),
            (br#"{"content":"x","user":""}"#, BodyFormat::Json, "user"),
            (&[0xff, 0xff][..], BodyFormat::Postcard, "postcard"),
            (&huge[..], BodyFormat::Json, "exceeds"),
        ] {
            let error = SendRequest::decode(body, format).expect_err(needle);
            assert_eq!(error.code(), "invalid_request");
            assert!(error.message().contains(needle), "{error}");
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(
            BodyFormat::from_content_type(None).expect("ok"),
            BodyFormat::Json
        );
        assert_eq!(
            BodyFormat::from_content_type(Some("application/json; charset=utf-8")).expect("ok"),
            BodyFormat::Json
        );
        assert_eq!(
            BodyFormat::from_content_type(Some("Application/Postcard")).expect("ok"),
            BodyFormat::Postcard
        );
        assert!(BodyFormat::from_content_type(Some("text/plain")).is_err());
    }
}
