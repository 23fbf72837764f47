//! `/v1/conversations…`: send (202 with the ack, or the reply streamed as
//! SSE), history, the key's conversations, and a conversation's live events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use utoipa::{IntoParams, ToSchema};

use super::core::Core;
use super::error::{copy_rate_headers, ApiError};
use super::openapi::{
    Ack, BadRequest, Conflict, ConversationList, Forbidden, History, Internal, Invalid,
    PayloadTooLarge, RateLimited, Unauthorized, Unavailable, UnsupportedMediaType,
};
use super::{closed, conversation_id, within, ApiJson, ApiPath, ApiQuery, AppState};
use crate::bus::Subscription;

/// The longest a streamed reply is waited for before the stream ends with an
/// `error` event (the turn itself goes on and is stored).
const REPLY_STREAM_LIMIT: Duration = Duration::from_secs(600);
/// SSE events buffered for a slow client.
const SSE_BUFFER: usize = 256;
/// A keep-alive comment this often, so proxies keep idle streams open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The body of `POST /v1/conversations/{id}/messages`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    /// The message; blank is refused.
    pub content: String,
    /// Your id for the message and its idempotency key in the conversation
    /// (1–128 characters); default a new UUID v7.
    #[serde(default)]
    pub message_id: Option<String>,
    /// The agent to answer; default: the routes and the default agent decide.
    #[serde(default)]
    pub agent: Option<String>,
    /// The end user; default the key's owner.
    #[serde(default)]
    pub user: Option<String>,
}

/// `GET /v1/conversations?after=&limit=`: the calling key's conversations.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only conversations whose id sorts after this one (paging).
    after: Option<String>,
    /// At most this many (default 50, at most 500).
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/v1/conversations",
    tag = "conversations",
    params(ListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The calling key's conversations", body = ConversationList),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = Invalid),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let body = json!({ "after": query.after, "limit": query.limit });
    let reply = within(&state, state.core.request("conv.list", &headers, &body)).await?;
    Ok(reply.into_response(StatusCode::OK))
}

/// `GET /v1/conversations/{id}`: the history.
/// Which page of a conversation's history: by default the oldest messages.
/// Passed on as the `conv.<id>.history` body, fields left out as given.
#[derive(Debug, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// The oldest messages with a seq above this (the next page of one read
    /// forwards: its last message's seq).
    #[serde(skip_serializing_if = "Option::is_none")]
    after_seq: Option<u64>,
    /// The newest messages with a seq below this (the page before one read
    /// backwards: its first message's seq).
    #[serde(skip_serializing_if = "Option::is_none")]
    before_seq: Option<u64>,
    /// The newest messages of all (`true`), for a view that opens at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    latest: Option<bool>,
    /// At most this many messages (default and most 1000; a page also stops
    /// at about 256 KiB of JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/v1/conversations/{id}",
    tag = "conversations",
    description = "One page of the conversation's messages, oldest first. `has_more` \
        says more lie beyond the page in the direction read: after its last message \
        when read forwards (the default, or `after_seq`), before its first when read \
        backwards (`before_seq` or `latest`).",
    params(
        ("id" = String, Path, description = "The conversation: 1–128 of `[A-Za-z0-9_-]`"),
        HistoryQuery,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "User messages and completed replies; empty for a conversation nobody started", body = History),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = Invalid),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn history(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Response, ApiError> {
    let id = conversation_id(&id)?;
    let subject = format!("conv.{id}.history");
    let body = serde_json::to_value(&query).expect("a query serializes");
    let reply = within(&state, state.core.request(&subject, &headers, &body)).await?;
    Ok(reply.into_response(StatusCode::OK))
}

/// `POST /v1/conversations/{id}/messages`: 202 with the ack; with
/// `Accept: text/event-stream`, the ack and then the reply as SSE:
/// `reply_delta` events, then `reply_completed` or `reply_failed`, then the
/// stream ends.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/messages",
    tag = "conversations",
    description = "Stores a user message and answers once it is on disk. With \
        `Accept: text/event-stream` the answer is a stream instead: an `ack` event \
        (the `Ack`), `reply_delta` events (`ReplyDelta`), then `reply_completed` or \
        `reply_failed` (an `Envelope`, with its seq as the SSE id); then it ends.",
    params(("id" = String, Path, description = "The conversation: 1–128 of `[A-Za-z0-9_-]`; the first send starts it")),
    request_body = SendBody,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Stored; the reply follows as events", body = Ack),
        (status = 200, description = "`Accept: text/event-stream`: the ack, the reply's deltas and its end", content_type = "text/event-stream", body = String),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Invalid),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn send(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<SendBody>,
) -> Result<Response, ApiError> {
    let id = conversation_id(&id)?.to_owned();
    let body = json!({
        "content": body.content,
        "message_id": body.message_id,
        "agent": body.agent,
        "user": body.user,
    });
    if !wants_stream(&headers) {
        let subject = format!("conv.{id}.send");
        let reply = within(&state, state.core.request(&subject, &headers, &body)).await?;
        return Ok(reply.into_response(StatusCode::ACCEPTED));
    }
    // Subscribed before sending, so no piece of the reply can be missed.
    let events = state.core.follow_reply(&id).await?;
    let subject = format!("conv.{id}.send");
    let reply = within(&state, state.core.request(&subject, &headers, &body)).await?;
    let mut rate_headers = HeaderMap::new();
    copy_rate_headers(&reply.headers, &mut rate_headers);
    let (sender, received) = mpsc::channel(SSE_BUFFER);
    tokio::spawn(stream_reply(
        state.closing.clone(),
        state.core.clone(),
        headers,
        id,
        reply.body,
        events,
        sender,
    ));
    Ok((rate_headers, sse(received)).into_response())
}

/// Whether the client asked for an event stream.
fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("text/event-stream"))
}

fn sse(received: mpsc::Receiver<Event>) -> impl IntoResponse {
    let stream = ReceiverStream::new(received).map(Ok::<Event, Infallible>);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

/// An SSE event named `kind` with a JSON body.
fn event(kind: &str, data: &Value) -> Event {
    Event::default()
        .event(kind)
        .data(serde_json::to_string(data).expect("JSON serializes"))
}

/// Relays one message's reply: the ack, its deltas, its end.
async fn stream_reply(
    closing: watch::Receiver<bool>,
    core: Core,
    caller: HeaderMap,
    conversation_id: String,
    ack: Value,
    mut events: Subscription,
    sender: mpsc::Sender<Event>,
) {
    let message_id = ack["message_id"].as_str().unwrap_or_default().to_owned();
    if sender.send(event("ack", &ack)).await.is_err() {
        return;
    }
    let until = tokio::time::Instant::now() + REPLY_STREAM_LIMIT;
    // A resent message's turn may be over already: its end is then in the
    // log. One stored later comes on `events`, subscribed before the send.
    if ack["duplicate"] == json!(true) {
        let after = ack["seq"].as_u64().unwrap_or(1).saturating_sub(1);
        let mut end = None;
        let looked = core.look_in_log(&caller, &conversation_id, after, until, |envelope| {
            let found = is_end_of(envelope, &message_id);
            if found {
                end = Some(stored_event(envelope));
            }
            found
        });
        if let Err(error) = looked.await {
            let error = json!({ "code": error.code, "message": error.message });
            let _ = sender.send(event("error", &error)).await;
            return;
        }
        if let Some(end) = end {
            let _ = sender.send(end).await;
            return;
        }
    }
    let deadline = tokio::time::sleep_until(until);
    tokio::pin!(deadline);
    loop {
        let message = tokio::select! {
            message = events.recv() => message,
            () = &mut deadline => {
                let _ = sender.send(event("error", &json!({
                    "code": "timeout",
                    "message": "no end of the reply in time; it will be in the history",
                }))).await;
                return;
            }
            () = sender.closed() => return,
            () = closed(closing.clone()) => return,
        };
        let Some(message) = message else { return };
        let Ok(body) = serde_json::from_slice::<Value>(&message.payload) else {
            continue;
        };
        if message.subject.ends_with(".reply_delta") {
            if body["message_id"] == json!(message_id)
                && sender.send(event("reply_delta", &body)).await.is_err()
            {
                return;
            }
            continue;
        }
        if is_end_of(&body, &message_id) {
            let _ = sender.send(stored_event(&body)).await;
            return;
        }
    }
}

/// Whether a stored event ends the turn of `message_id`.
fn is_end_of(envelope: &Value, message_id: &str) -> bool {
    matches!(
        envelope["type"].as_str(),
        Some("reply_completed" | "reply_failed")
    ) && envelope["data"]["message_id"] == json!(message_id)
}

/// A stored event as SSE: named by its type, with its seq as the id.
fn stored_event(envelope: &Value) -> Event {
    let kind = envelope["type"].as_str().unwrap_or("event");
    let mut event = event(kind, envelope);
    if let Some(seq) = envelope["seq"].as_u64() {
        event = event.id(seq.to_string());
    }
    event
}

/// `GET /v1/conversations/{id}/events`: the conversation's stored events
/// after `Last-Event-ID` (a seq; 0 when absent), then live ones as they are
/// published, each with its seq as the SSE id; `reply_delta`s pass through
/// without one (they are not stored).
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}/events",
    tag = "conversations",
    description = "The conversation's stored events after `Last-Event-ID`, then live ones, \
        as SSE events named by their type with an `Envelope` as data and its seq as id; \
        `reply_delta` events (`ReplyDelta`, no id) pass through live, after their \
        message's `message_received` and before their reply's end. Open until the \
        client leaves, or until an `error` event ends it: the key and its right to the \
        conversation are checked again at every stored event, so a revoked key, or a \
        conversation another key starts, ends the stream. Messages before the last \
        erasure come with empty `content`.",
    params(
        ("id" = String, Path, description = "The conversation"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this seq (default 0: from the start)"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = String),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = Invalid),
        (status = 500, response = Internal),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = conversation_id(&id)?.to_owned();
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| ApiError::invalid("Last-Event-ID must be a seq (a whole number)"))?,
    };
    let live = state.core.subscribe(&format!("evt.conv.{id}.>")).await?;
    // The first page also checks the key and its right to the conversation.
    let subject = format!("conv.{id}.events");
    let first = within(
        &state,
        state
            .core
            .request(&subject, &headers, &json!({ "after_seq": after })),
    )
    .await?;
    let mut rate_headers = HeaderMap::new();
    copy_rate_headers(&first.headers, &mut rate_headers);
    let (sender, received) = mpsc::channel(SSE_BUFFER);
    let follower = Follower {
        core: state.core.clone(),
        caller: headers,
        subject,
        last_seq: after,
        last_version: 0,
        owned: false,
        ended: VecDeque::new(),
        sender,
    };
    tokio::spawn(follower.run(state.closing.clone(), first.body, live));
    Ok((rate_headers, sse(received)).into_response())
}

/// One client's `/events` stream. Stored events reach it only through
/// `conv.<id>.events`, which checks the key and its right to the
/// conversation on every page; a live event is only the sign that there is
/// more to read. So a key revoked, or a conversation another key started
/// after the stream opened, ends the stream with an `error` event at its
/// next stored event; and an event the bus dropped on the way (a slow client,
/// a reconnect) is read with the next one, never skipped.
///
/// Deltas pass through as they come. The log's follower on the same bus
/// publishes a turn's deltas only after the turn's `message_received`
/// ([`crate::outbox::DeltaQueue`]), so the stream has sent that message by
/// then, or it was stored before the stream's `Last-Event-ID`.
struct Follower {
    core: Core,
    caller: HeaderMap,
    subject: String,
    /// The seq and stream version of the last stored event sent.
    last_seq: u64,
    last_version: u64,
    /// A page with an event came back: the caller may read this conversation,
    /// so its `reply_delta`s, which are not stored, may be passed on.
    owned: bool,
    /// The messages whose turn's end was sent last (at most [`ENDED_KEPT`]):
    /// a delta of one of them, come late (its turn's end read from the log
    /// ahead of it), is not passed on after its end.
    ended: VecDeque<String>,
    sender: mpsc::Sender<Event>,
}

/// How many ended turns an `/events` stream remembers ([`Follower::ended`]).
const ENDED_KEPT: usize = 16;

/// Pushes `id` on the back of `kept`, dropping from the front past `max`.
fn remember(kept: &mut VecDeque<String>, id: &str, max: usize) {
    if kept.len() == max {
        kept.pop_front();
    }
    kept.push_back(id.to_owned());
}

/// The client left or the stream ended with an `error` event.
struct Ended;

impl Follower {
    async fn run(mut self, closing: watch::Receiver<bool>, first: Value, mut live: Subscription) {
        // The rest of what was stored when the first page was read; what came
        // after is on `live`, subscribed before that read.
        let head = first["head"].as_u64();
        if self.send_page(first, None).await.is_err() || self.catch_up(head).await.is_err() {
            return;
        }
        loop {
            let message = tokio::select! {
                message = live.recv() => message,
                () = self.sender.closed() => return,
                () = closed(closing.clone()) => return,
            };
            let Some(message) = message else { return };
            let Ok(body) = serde_json::from_slice::<Value>(&message.payload) else {
                continue;
            };
            let more = if message.subject.ends_with(".reply_delta") {
                self.pass_delta(body).await
            } else if let Some(seq) = body["seq"].as_u64().filter(|&seq| seq > self.last_seq) {
                self.catch_up(Some(seq)).await
            } else {
                Ok(())
            };
            if more.is_err() {
                return;
            }
        }
    }

    /// A delta of a conversation the caller has been shown to own; before
    /// that, the stored events are read first (which checks). A delta of a
    /// turn whose end was sent already is dropped.
    async fn pass_delta(&mut self, delta: Value) -> Result<(), Ended> {
        if !self.owned {
            self.catch_up(None).await?;
        }
        let id = delta["message_id"].as_str().unwrap_or_default();
        if !self.owned || self.ended.iter().any(|ended| ended == id) {
            return Ok(());
        }
        self.send(event("reply_delta", &delta)).await
    }

    /// Sends the stored events past the last one sent, page by page, up to
    /// `through` when given: the seq of the live event that called for it,
    /// so that what came live after that event (a delta) is not overtaken
    /// by stored events published after it.
    async fn catch_up(&mut self, through: Option<u64>) -> Result<(), Ended> {
        loop {
            let request = json!({ "after_seq": self.last_seq, "after_version": self.last_version });
            let page = match self
                .core
                .request(&self.subject, &self.caller, &request)
                .await
            {
                Ok(page) => page.body,
                Err(error) => {
                    let error = json!({ "code": error.code, "message": error.message });
                    let _ = self.send(event("error", &error)).await;
                    return Err(Ended);
                }
            };
            if !self.send_page(page, through).await? {
                return Ok(());
            }
        }
    }

    /// Sends one page's events up to seq `through`; whether there may be
    /// more to send (it held some, and `through` is not reached).
    async fn send_page(&mut self, page: Value, through: Option<u64>) -> Result<bool, Ended> {
        let stored = page["events"].as_array().cloned().unwrap_or_default();
        for envelope in &stored {
            let seq = envelope["seq"].as_u64().unwrap_or(self.last_seq);
            if through.is_some_and(|through| seq > through) {
                return Ok(false);
            }
            self.send(stored_event(envelope)).await?;
            if let (Some("reply_completed" | "reply_failed"), Some(message_id)) = (
                envelope["type"].as_str(),
                envelope["data"]["message_id"].as_str(),
            ) {
                remember(&mut self.ended, message_id, ENDED_KEPT);
            }
            self.last_seq = seq;
            self.last_version = envelope["version"].as_u64().unwrap_or(self.last_version);
            self.owned = true;
        }
        Ok(!stored.is_empty() && through.is_none_or(|through| self.last_seq < through))
    }

    async fn send(&self, event: Event) -> Result<(), Ended> {
        self.sender.send(event).await.map_err(|_| Ended)
    }
}
