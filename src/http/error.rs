//! The HTTP front's errors: `{"error":{"code","message"}}` with the status
//! that fits (DESIGN §7), carrying the rate-limit headers the core sent.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::bus::{BusError, Headers};

/// An error answer. Internal details are logged where they happen; the
/// message here is safe to show the caller and never holds a key.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// The code of DESIGN §6 (`unauthorized`, `rate_limited`, …) or an HTTP
    /// one (`not_found`, `payload_too_large`, `timeout`).
    pub code: String,
    pub message: String,
    /// Headers to send with it (`Retry-After`, `RateLimit-*`); boxed, as
    /// most errors have none and `Result`s stay small.
    pub headers: Box<HeaderMap>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            headers: Box::default(),
        }
    }

    /// The status for a core error code.
    pub fn status_of(code: &str) -> StatusCode {
        match code {
            "unauthorized" => StatusCode::UNAUTHORIZED,
            "forbidden" => StatusCode::FORBIDDEN,
            "invalid_request" => StatusCode::UNPROCESSABLE_ENTITY,
            "not_found" => StatusCode::NOT_FOUND,
            "conflict" => StatusCode::CONFLICT,
            "rate_limited" | "budget_exceeded" => StatusCode::TOO_MANY_REQUESTS,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A 422 naming what is wrong with the request.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    /// The bus failed to carry a request to the core.
    pub fn from_bus(error: &BusError) -> Self {
        tracing::warn!(%error, "a request to the core failed");
        match error {
            BusError::NoResponders { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the core is not running",
            ),
            BusError::Timeout { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the core did not answer in time",
            ),
            _ => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the bus is not available",
            ),
        }
    }

    /// Adds the bus headers that matter to an HTTP client.
    pub fn with_headers(mut self, headers: &Headers) -> Self {
        copy_rate_headers(headers, &mut self.headers);
        self
    }
}

/// Copies `RateLimit-*`, `x-ratelimit-*` and `Retry-After` from a core reply.
pub fn copy_rate_headers(from: &Headers, to: &mut HeaderMap) {
    for (name, value) in from.iter() {
        let lower = name.to_ascii_lowercase();
        if !(lower.starts_with("ratelimit-")
            || lower.starts_with("x-ratelimit-")
            || lower == "retry-after")
        {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            to.insert(name, value);
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": { "code": self.code, "message": self.message } }));
        (self.status, *self.headers, body).into_response()
    }
}
