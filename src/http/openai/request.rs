//! Reading an OpenAI chat completion request: what is sent to the core,
//! and a 400 naming the parameter when something is wrong. The body it reads
//! is described by `openapi::ChatCompletionRequest`: change both together.

use axum::http::HeaderMap;
use serde_json::{json, Value};

use super::error::OpenAiError;
use super::CONVERSATION_HEADER;
use crate::http::conversation_id;

/// What a chat completion request asks of the core.
#[derive(Debug)]
pub(super) struct ChatRequest {
    /// The agent.
    pub(super) model: String,
    /// The last message's text: the only one sent (see the module doc).
    pub(super) content: String,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) user: Option<String>,
}

impl ChatRequest {
    /// Reads an OpenAI request body, naming the parameter that is wrong.
    pub(super) fn parse(body: &[u8]) -> Result<ChatRequest, OpenAiError> {
        let body: Value = serde_json::from_slice(body).map_err(|error| {
            OpenAiError::bad_request(format!("the body is not valid JSON: {error}"))
        })?;
        if !body.is_object() {
            return Err(OpenAiError::bad_request("the body must be a JSON object"));
        }
        let model = match &body["model"] {
            Value::String(model) if !model.is_empty() => model.clone(),
            _ => return Err(OpenAiError::invalid("model", "model must name an agent")),
        };
        let Some(messages) = body["messages"].as_array().filter(|m| !m.is_empty()) else {
            return Err(OpenAiError::invalid(
                "messages",
                "messages must be a non-empty array",
            ));
        };
        for (i, message) in messages.iter().enumerate() {
            if !message["role"].is_string() {
                return Err(OpenAiError::invalid(
                    format!("messages[{i}].role"),
                    "every message needs a role",
                ));
            }
        }
        let last = messages.len() - 1;
        if messages[last]["role"] != json!("user") {
            return Err(OpenAiError::invalid(
                format!("messages[{last}].role"),
                "the last message must have role \"user\": it is the one sent",
            ));
        }
        let content = text_of(&messages[last]["content"], last)?;
        let flag = |name: &str, value: &Value| match value {
            Value::Null => Ok(false),
            Value::Bool(flag) => Ok(*flag),
            _ => Err(OpenAiError::invalid(
                name,
                format!("{name} must be a boolean"),
            )),
        };
        let stream = flag("stream", &body["stream"])?;
        let include_usage = match &body["stream_options"] {
            Value::Null => false,
            Value::Object(options) => flag(
                "stream_options.include_usage",
                options.get("include_usage").unwrap_or(&Value::Null),
            )?,
            _ => {
                return Err(OpenAiError::invalid(
                    "stream_options",
                    "stream_options must be an object",
                ))
            }
        };
        let user = match &body["user"] {
            Value::Null => None,
            Value::String(user) => Some(user.clone()),
            _ => return Err(OpenAiError::invalid("user", "user must be a string")),
        };
        if !matches!(&body["n"], Value::Null) && body["n"] != json!(1) {
            return Err(OpenAiError::invalid(
                "n",
                "n must be 1: one choice per request",
            ));
        }
        Ok(ChatRequest {
            model,
            content,
            stream,
            include_usage,
            user,
        })
    }
}

/// A message's text: a string, or its text parts joined with newlines.
fn text_of(content: &Value, index: usize) -> Result<String, OpenAiError> {
    let param = format!("messages[{index}].content");
    let text = match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (i, part) in parts.iter().enumerate() {
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => texts.push(text),
                    _ => {
                        return Err(OpenAiError::invalid(
                            format!("{param}[{i}]"),
                            "only {\"type\":\"text\",\"text\"} parts are supported",
                        ))
                    }
                }
            }
            texts.join("\n")
        }
        _ => {
            return Err(OpenAiError::invalid(
                param,
                "content must be a string or an array of text parts",
            ))
        }
    };
    if text.trim().is_empty() {
        return Err(OpenAiError::invalid(param, "the last message has no text"));
    }
    Ok(text)
}

/// The conversation: `X-Conversation-Id` when given (and valid). Else, for a
/// request with an `Idempotency-Key` (`message_id`), one derived from it and
/// the caller's key, so that a retry lands in the same conversation and is
/// the same message there; else a new id.
pub(super) fn conversation_of(
    headers: &HeaderMap,
    message_id: Option<&str>,
) -> Result<String, OpenAiError> {
    let Some(value) = headers.get(&CONVERSATION_HEADER) else {
        return Ok(match message_id {
            Some(message_id) => retried_conversation(headers, message_id),
            None => format!("chat-{}", uuid::Uuid::now_v7().simple()),
        });
    };
    let id = value
        .to_str()
        .map_err(|_| OpenAiError::bad_request("X-Conversation-Id must be text"))?;
    conversation_id(id).map_err(|error| {
        OpenAiError::bad_request(format!("X-Conversation-Id: {}", error.message))
    })?;
    Ok(id.to_owned())
}

/// `chat-` and 128 bits of SHA-256 over the `Authorization` header and the
/// idempotency key: the same for a client's retries, different for another
/// key's, and telling nothing of the key.
fn retried_conversation(headers: &HeaderMap, message_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .map_or(&b""[..], |value| value.as_bytes());
    let digest = Sha256::new()
        .chain_update(b"switchboard idempotency\0")
        .chain_update(authorization)
        .chain_update(b"\0")
        .chain_update(message_id.as_bytes())
        .finalize();
    format!("chat-{}", hex::encode(&digest[..16]))
}

/// The message id: `Idempotency-Key` when given, so that a client's retry is
/// the same message; else the core makes one.
pub(super) fn message_id_of(headers: &HeaderMap) -> Result<Option<String>, OpenAiError> {
    headers
        .get("idempotency-key")
        .map(|value| {
            value
                .to_str()
                .map(str::to_owned)
                .map_err(|_| OpenAiError::bad_request("Idempotency-Key must be text"))
        })
        .transpose()
}
