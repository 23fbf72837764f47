//! Errors in OpenAI's shape, `{"error":{"message","type","param","code"}}`,
//! with the status OpenAI would answer (see the mapping in the parent's doc).

use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::CONVERSATION_HEADER;
use crate::http::error::ApiError;
use crate::http::MAX_BODY_BYTES;

/// The `Retry-After` of a turn the model server rate-limited, in seconds.
pub(super) const MODEL_RATE_LIMIT_RETRY_AFTER_SECS: u32 = 10;

/// An error in OpenAI's shape, with the headers to send along (rate limits,
/// `Retry-After`, the conversation id).
#[derive(Debug)]
pub(super) struct OpenAiError {
    status: StatusCode,
    /// OpenAI's `type`.
    kind: &'static str,
    code: String,
    message: String,
    param: Option<String>,
    /// Boxed: a `HeaderMap` is large, and this is the `Err` of most results here.
    headers: Box<HeaderMap>,
}

impl OpenAiError {
    pub(super) fn new(
        status: StatusCode,
        kind: &'static str,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        OpenAiError {
            status,
            kind,
            code: code.into(),
            message: message.into(),
            param: None,
            headers: Box::default(),
        }
    }

    /// A 400 naming the parameter that is wrong.
    pub(super) fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut error = OpenAiError::bad_request(message);
        error.param = Some(param.into());
        error
    }

    /// A 400 about no one parameter (the body as a whole, a header).
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        OpenAiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
    }

    pub(super) fn model_not_found(model: &str) -> Self {
        let mut error = OpenAiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` does not exist: it names no configured agent"),
        );
        error.param = Some("model".into());
        error
    }

    /// A turn that ended `reply_failed` with `code`. One the model server
    /// rate-limited (after the agent's own retries) is a 429 with
    /// [`MODEL_RATE_LIMIT_RETRY_AFTER_SECS`] as its `Retry-After`: the
    /// server's own wait is not kept with the turn.
    pub(super) fn turn_failed(code: &str, message: &str) -> Self {
        let (status, kind) = match code {
            "timeout" => (StatusCode::GATEWAY_TIMEOUT, "server_error"),
            "rate_limited" => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"),
            "unavailable" => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
            "internal" => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            _ => (StatusCode::BAD_GATEWAY, "server_error"),
        };
        let mut error =
            OpenAiError::new(status, kind, code, format!("the reply failed: {message}"));
        if status == StatusCode::TOO_MANY_REQUESTS {
            error.headers.insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from(MODEL_RATE_LIMIT_RETRY_AFTER_SECS),
            );
        }
        error
    }

    /// Adds `headers` (the ack's rate-limit headers) to the error's, keeping
    /// the error's own where both have one.
    pub(super) fn with_headers(mut self, headers: &HeaderMap) -> Self {
        for (name, value) in headers {
            if !self.headers.contains_key(name) {
                self.headers.insert(name.clone(), value.clone());
            }
        }
        self
    }

    pub(super) fn timeout() -> Self {
        OpenAiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "timeout",
            "no reply in time; it will be in the conversation's history",
        )
    }

    pub(super) fn with_conversation(mut self, id: &HeaderValue) -> Self {
        self.headers.insert(CONVERSATION_HEADER, id.clone());
        self
    }

    /// The `{"error":{…}}` object, as a body or a stream chunk.
    pub(super) fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        } })
    }
}

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        let (status, kind, code) = match error.code.as_str() {
            "unauthorized" => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
            ),
            "forbidden" => (StatusCode::FORBIDDEN, "permission_error", "forbidden"),
            "invalid_request" => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            "rate_limited" => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "rate_limit_exceeded",
            ),
            "budget_exceeded" => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "insufficient_quota",
            ),
            "unavailable" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "service_unavailable",
            ),
            _ if error.status.is_server_error() => (error.status, "server_error", ""),
            _ => (error.status, "invalid_request_error", ""),
        };
        let code = if code.is_empty() {
            error.code
        } else {
            code.to_owned()
        };
        let mut converted = OpenAiError::new(status, kind, code, error.message);
        converted.headers = error.headers;
        converted
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = Json(self.body());
        (self.status, *self.headers, body).into_response()
    }
}

pub(super) fn body_rejection(rejection: BytesRejection) -> OpenAiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return OpenAiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "payload_too_large",
            format!("the body exceeds {MAX_BODY_BYTES} bytes"),
        );
    }
    OpenAiError::new(
        rejection.status(),
        "invalid_request_error",
        "invalid_request",
        rejection.body_text(),
    )
}
