//! The front's only way into the core: requests on the bus (DESIGN §1), with
//! the caller's `Authorization` and `traceparent` passed through untouched.
//! The front checks no key and decides nothing: the core's answer — a body,
//! or a coded error — becomes the HTTP response.

use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::Value;

use super::error::ApiError;
use crate::bus::{Bus, BusError, Headers, Subscription};
use crate::gateway::{CHANNEL_HEADER, REMOTE_BUS_HEADER};

/// How long the front waits for the core to answer one request.
pub const CORE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stream waits before reading the log again after a read failed
/// ([`Core::look_in_log`]).
pub const LOOK_RETRY: Duration = Duration::from_millis(250);

/// The bus and the subject prefix of the core behind them. Cheap to clone.
#[derive(Clone)]
pub struct Core {
    /// Where requests go and the core's conversation events and reply
    /// deltas are followed: the core's in-process bus when the core runs in
    /// this process (its events fed there by
    /// [`crate::outbox::spawn_front_feed`]), else the bus the core serves.
    pub bus: Bus,
    pub prefix: String,
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
            .bus
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
        subscribe(&self.bus, &format!("{}.{pattern}", self.prefix)).await
    }

    /// Hands `conversation_id`'s stored events after seq `after` to `take`,
    /// oldest first and page by page, until `take` says it has what it
    /// wanted (`true`) or the log has no more. A read that fails is tried
    /// again every [`LOOK_RETRY`] until `deadline`, then its error returned.
    pub async fn look_in_log(
        &self,
        caller: &HeaderMap,
        conversation_id: &str,
        after: u64,
        deadline: tokio::time::Instant,
        mut take: impl FnMut(&Value) -> bool,
    ) -> Result<(), ApiError> {
        let subject = format!("conv.{conversation_id}.events");
        let (mut after, mut version) = (after, 0);
        loop {
            let request = serde_json::json!({ "after_seq": after, "after_version": version });
            let page = match self.request(&subject, caller, &request).await {
                Ok(page) => page.body,
                Err(error) if tokio::time::Instant::now() + LOOK_RETRY < deadline => {
                    tracing::warn!(code = %error.code, "cannot read the conversation's events; trying again");
                    tokio::time::sleep(LOOK_RETRY).await;
                    continue;
                }
                Err(error) => return Err(error),
            };
            let events = page["events"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            for envelope in events {
                if take(envelope) {
                    return Ok(());
                }
                after = envelope["seq"].as_u64().unwrap_or(after);
                version = envelope["version"].as_u64().unwrap_or(version);
            }
            if events.is_empty() {
                return Ok(());
            }
        }
    }

    /// Subscribes to `conversation_id`'s events, where its replies'
    /// deltas and stored ends come.
    pub async fn follow_reply(&self, conversation_id: &str) -> Result<Subscription, ApiError> {
        self.subscribe(&format!("evt.conv.{conversation_id}.>"))
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

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tokio::time::Instant;

    use super::*;
    use crate::bus::LocalBus;

    /// A core on `bus` that answers `sb.conv.c1.events` with `answers`, one
    /// per request in turn, and records each request's body.
    async fn core_answering(bus: &Bus, answers: Vec<Value>) -> tokio::task::JoinHandle<Vec<Value>> {
        let bus = bus.clone();
        let mut requests = bus
            .subscribe("sb.conv.c1.events")
            .await
            .expect("subscribes");
        tokio::spawn(async move {
            let mut asked = Vec::new();
            for answer in answers {
                let request = requests.recv().await.expect("a request");
                asked.push(serde_json::from_slice(&request.payload).expect("JSON"));
                let body = serde_json::to_vec(&answer).expect("JSON");
                bus.respond(&request, Headers::new(), body)
                    .await
                    .expect("answers");
            }
            asked
        })
    }

    fn envelope(seq: u64, version: u64) -> Value {
        json!({ "seq": seq, "version": version, "type": "message_received" })
    }

    fn unavailable() -> Value {
        json!({ "ok": false, "error": { "code": "unavailable", "message": "the log is busy" } })
    }

    fn core(bus: &Bus) -> Core {
        Core {
            bus: bus.clone(),
            prefix: "sb".to_owned(),
        }
    }

    #[tokio::test]
    async fn a_failed_read_of_the_log_is_tried_again_and_goes_on_where_it_was() {
        let bus = Bus::from(LocalBus::new());
        let answers = vec![
            json!({ "ok": true, "events": [envelope(5, 1), envelope(7, 2)] }),
            unavailable(),
            unavailable(),
            json!({ "ok": true, "events": [envelope(9, 3)] }),
            json!({ "ok": true, "events": [] }),
        ];
        let responder = core_answering(&bus, answers).await;
        let started = Instant::now();
        let mut seen = Vec::new();
        core(&bus)
            .look_in_log(
                &HeaderMap::new(),
                "c1",
                4,
                started + Duration::from_secs(10),
                |envelope| {
                    seen.push(envelope["seq"].as_u64().expect("seq"));
                    false
                },
            )
            .await
            .expect("found once the core answers");
        assert_eq!(seen, [5, 7, 9]);
        assert!(started.elapsed() >= LOOK_RETRY * 2, "waited between tries");
        let asked = responder.await.expect("the core");
        let after = |request: &Value| {
            (
                request["after_seq"].clone(),
                request["after_version"].clone(),
            )
        };
        let asked: Vec<_> = asked.iter().map(after).collect();
        assert_eq!(
            asked,
            [
                (json!(4), json!(0)),
                (json!(7), json!(2)),
                (json!(7), json!(2)),
                (json!(7), json!(2)),
                (json!(9), json!(3)),
            ],
            "each try asks from the last event taken"
        );
    }

    #[tokio::test]
    async fn a_read_that_keeps_failing_gives_its_error_at_the_deadline() {
        let bus = Bus::from(LocalBus::new());
        let responder = core_answering(&bus, vec![unavailable(); 8]).await;
        let started = Instant::now();
        let failed = core(&bus)
            .look_in_log(&HeaderMap::new(), "c1", 0, started + LOOK_RETRY * 3, |_| {
                true
            })
            .await
            .expect_err("never answered");
        assert_eq!(failed.code, "unavailable");
        assert_eq!(failed.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            started.elapsed() < LOOK_RETRY * 4,
            "{:?}",
            started.elapsed()
        );
        responder.abort();
    }

    #[tokio::test]
    async fn the_read_stops_where_the_taker_has_what_it_wanted() {
        let bus = Bus::from(LocalBus::new());
        let answers =
            vec![json!({ "ok": true, "events": [envelope(1, 1), envelope(2, 2), envelope(3, 3)] })];
        let responder = core_answering(&bus, answers).await;
        let mut seen = Vec::new();
        core(&bus)
            .look_in_log(
                &HeaderMap::new(),
                "c1",
                0,
                Instant::now() + Duration::from_secs(10),
                |envelope| {
                    seen.push(envelope["seq"].as_u64().expect("seq"));
                    envelope["seq"] == json!(2)
                },
            )
            .await
            .expect("found");
        assert_eq!(seen, [1, 2]);
        assert_eq!(responder.await.expect("the core").len(), 1, "one page read");
    }
}
