//! The front's only way into the core: requests on the bus (DESIGN §1), with
//! the caller's `Authorization` and `traceparent` passed through untouched.
//! The front checks no key and decides nothing: the core's answer — a body,
//! or a coded error — becomes the HTTP response.

use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::Value;

use super::error::ApiError;
use crate::bus::{Bus, BusError, Headers, Subscription};
use crate::gateway::{CHANNEL_HEADER, FOLLOW_HEADER, REMOTE_BUS_HEADER};

/// How long the front waits for the core to answer one request.
pub const CORE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the stream of a resent message's reply looks in the log for
/// the turn's end. The first send's turn publishes its end on the bus a
/// stream follows only when that send was streamed from this front
/// ([`Core::follow_reply`]); otherwise the log is where the end shows.
pub const RESENT_END_POLL: Duration = Duration::from_millis(250);

/// Where a resent message's stream looks in the log for its turn's end:
/// after which seq, and when next ([`RESENT_END_POLL`]; the first tick is
/// at once).
pub type LogLook = Option<(u64, tokio::time::Interval)>;

/// A look for a resent message's end ([`LogLook`]): the seq to look after
/// when it is time; `None` at once when there is none to make.
pub async fn next_look(look: &mut LogLook) -> Option<u64> {
    let (after, interval) = look.as_mut()?;
    interval.tick().await;
    Some(*after)
}

/// The buses and the subject prefix of the core behind them. Cheap to clone.
#[derive(Clone)]
pub struct Core {
    /// Where requests go: the core's in-process bus when the core runs in
    /// this process, else the bus the core serves.
    pub requests: Bus,
    /// Where the core's events are published (and subscribed to).
    pub events: Bus,
    pub prefix: String,
    /// Whether `requests` is the in-process bus of a core in this process
    /// on NATS: a streamed send then has its reply followed there
    /// ([`Core::follow_reply`]).
    pub beside: bool,
}

/// A successful answer: the JSON body and the reply's headers.
#[derive(Debug)]
pub struct CoreReply {
    pub body: Value,
    pub headers: Headers,
}

impl CoreReply {
    /// The reply as a JSON response with `status` and the core's rate-limit
    /// headers.
    pub fn into_response(self, status: axum::http::StatusCode) -> axum::response::Response {
        use axum::response::IntoResponse;
        let mut headers = HeaderMap::new();
        super::error::copy_rate_headers(&self.headers, &mut headers);
        (status, headers, axum::Json(self.body)).into_response()
    }
}

impl Core {
    /// Sends `body` to `{prefix}.{subject}` with the caller's credentials; an
    /// `{"ok":false,…}` answer is the matching [`ApiError`].
    pub async fn request(
        &self,
        subject: &str,
        caller: &HeaderMap,
        body: &Value,
    ) -> Result<CoreReply, ApiError> {
        self.request_with(subject, caller, body, Headers::new(), CORE_TIMEOUT)
            .await
    }

    /// [`Core::request`] with `extra` headers, waiting up to `timeout`.
    pub async fn request_with(
        &self,
        subject: &str,
        caller: &HeaderMap,
        body: &Value,
        extra: Headers,
        timeout: Duration,
    ) -> Result<CoreReply, ApiError> {
        let subject = format!("{}.{subject}", self.prefix);
        let mut headers = extra
            .with("Content-Type", "application/json")
            .with(CHANNEL_HEADER, "http");
        if let Some(value) = caller.get("authorization").and_then(|v| v.to_str().ok()) {
            headers.insert("Authorization", value);
        }
        // Set by the front itself (any client value is replaced).
        if let Some(remote) = caller
            .get(super::REMOTE_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            headers.insert(REMOTE_BUS_HEADER, remote);
        }
        // The caller's trace, continued by this request's span when spans are exported.
        let received = caller.get("traceparent").and_then(|v| v.to_str().ok());
        let current = tracing::Span::current();
        if let Some(traceparent) = switchboard_actors::trace::next_traceparent(&current, received) {
            headers.insert("traceparent", traceparent);
        }
        let payload = serde_json::to_vec(body).expect("a JSON value serializes");
        let reply = self
            .requests
            .request(&subject, headers, payload, timeout)
            .await
            .map_err(|error| ApiError::from_bus(&error))?;
        let body: Value = serde_json::from_slice(&reply.payload).map_err(|error| {
            tracing::error!(%subject, %error, "the core answered something other than JSON");
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the core's answer was not understood",
            )
        })?;
        if body["ok"] == Value::Bool(true) {
            return Ok(CoreReply {
                body,
                headers: reply.headers,
            });
        }
        let code = body["error"]["code"]
            .as_str()
            .unwrap_or("internal")
            .to_owned();
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or("the core refused the request")
            .to_owned();
        Err(ApiError::new(ApiError::status_of(&code), code, message).with_headers(&reply.headers))
    }

    /// Subscribes to `{prefix}.{pattern}` (e.g. a conversation's events) and
    /// makes sure the server knows before returning, so nothing published
    /// after this call is missed.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, ApiError> {
        subscribe(&self.events, &format!("{}.{pattern}", self.prefix)).await
    }

    /// Subscribes to where the reply of a send made with
    /// [`Core::send_followed`] comes: its deltas and its stored end, as
    /// events of `conversation_id`. Beside the core that is the core's
    /// in-process bus, so a streamed reply needs no NATS; otherwise the bus
    /// the core publishes its events on.
    pub async fn follow_reply(&self, conversation_id: &str) -> Result<Subscription, ApiError> {
        let bus = if self.beside {
            &self.requests
        } else {
            &self.events
        };
        subscribe(
            bus,
            &format!("{}.evt.conv.{conversation_id}.>", self.prefix),
        )
        .await
    }

    /// [`Core::request`] for a send whose reply is followed with
    /// [`Core::follow_reply`] (subscribed first).
    pub async fn send_followed(
        &self,
        subject: &str,
        caller: &HeaderMap,
        body: &Value,
    ) -> Result<CoreReply, ApiError> {
        let mut extra = Headers::new();
        if self.beside {
            extra.insert(FOLLOW_HEADER, "reply");
        }
        self.request_with(subject, caller, body, extra, CORE_TIMEOUT)
            .await
    }
}

/// Subscribes to `pattern` on `bus`, the server knowing before this returns.
async fn subscribe(bus: &Bus, pattern: &str) -> Result<Subscription, ApiError> {
    let subscription = bus
        .subscribe(pattern)
        .await
        .map_err(|error| ApiError::from_bus(&error))?;
    bus.flush()
        .await
        .map_err(|error: BusError| ApiError::from_bus(&error))?;
    Ok(subscription)
}
