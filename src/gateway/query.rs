//! The read and admin requests beyond send/history, so that an HTTP front (or
//! any client) reaches everything through the bus (DESIGN §1: the front
//! decides nothing itself).
//!
//! | subject | scope | body | reply |
//! |---|---|---|---|
//! | `…conv.list` | chat/admin | `{"after"?, "limit"?}` | `{"ok":true,"conversations":[summary…]}`: the caller's |
//! | `…conv.<id>.events` | chat/admin, owner or admin | `{"after_seq"?, "after_version"?, "limit"?}` | `{"ok":true,"events":[envelope…],"head"}`: stored events after `after_seq`, messages before the last erasure with empty `content` |
//! | `…usage` | chat/admin | `{}` | `{"ok":true,"key_id","name","limits","budget","spent":{requests,tokens_in,tokens_out,cost_micros,…},"budgets":[{scope,subject_id,period,period_start,budget_micros,spent_micros,remaining_micros}],"rate_limit":{remaining_requests,remaining_tokens,reset_ms}}` |
//! | `…agents` | chat/admin | `{}` | `{"ok":true,"agents":[{"name","default"}]}` |
//! | `…admin.costs` | admin | `{"by","since"?,"until"?}` (days `YYYY-MM-DD`) | `{"ok":true,"by","rows":[{group,requests,tokens_in,tokens_out,cost_micros,…}]}` |
//! | `…admin.audit` | admin | `{"since"?,"until"?,"key"?,"type"?,"cursor"?,"limit"?}` | `{"ok":true,"events":[…],"next_cursor"}` |
//! | `…admin.conv.<id>.erase` | admin | `{}` | `{"ok":true,"conversation_id","seq","already"}` |
//! | `…health` | none | `{}` | `{"ok":true,"log_head","projections_at","live_conversations","turns_in_flight"}` |

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_events::catalog::Scope;
use switchboard_events::{Envelope, Event, EventLog, ReadError, StreamId};
use switchboard_projections::{AuditQuery, CostGroup, HistoryMessage, PageFrom};

use super::auth::Caller;
use super::wire::{decode_body, history_json, BodyFormat, GatewayError};
use super::{header, Gateway, RequestMeta};
use crate::bus::Message;

/// Most conversations one `conv.list` returns.
const MAX_LIST: usize = 500;
/// Most events one `conv.<id>.events` returns.
const MAX_EVENTS: usize = 5000;
/// About the most JSON one `conv.<id>.events` page holds (at least one
/// event): well under the bus's maximum payload, 1 MiB by default.
const MAX_EVENTS_BYTES: usize = 256 * 1024;
/// Most messages one `conv.<id>.history` page holds.
const MAX_HISTORY: usize = 1000;
/// About the most JSON one history page holds (at least one message).
const MAX_HISTORY_BYTES: usize = 256 * 1024;
/// Most audit events one page holds.
const MAX_AUDIT_PAGE: usize = 1000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListRequest {
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

/// `…conv.<id>.history`: `{"after_seq"?, "before_seq"?, "latest"?, "limit"?}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryRequest {
    /// The oldest messages after this seq (the default, from the first).
    #[serde(default)]
    after_seq: Option<u64>,
    /// The newest messages before this seq.
    #[serde(default)]
    before_seq: Option<u64>,
    /// The newest messages of all.
    #[serde(default)]
    latest: bool,
    #[serde(default)]
    limit: Option<usize>,
}

impl HistoryRequest {
    pub(super) fn decode(message: &Message) -> Result<HistoryRequest, GatewayError> {
        let request: HistoryRequest = body(message)?;
        if request.after_seq.is_some() && (request.before_seq.is_some() || request.latest) {
            return Err(GatewayError::InvalidRequest(
                "after_seq reads forwards, before_seq and latest backwards: give one direction"
                    .into(),
            ));
        }
        if request.before_seq.is_some() && request.latest {
            return Err(GatewayError::InvalidRequest(
                "before_seq and latest both say where to start: give one".into(),
            ));
        }
        Ok(request)
    }

    /// Where the page starts.
    fn start(&self) -> PageFrom {
        match (self.after_seq, self.before_seq, self.latest) {
            (_, Some(before), _) => PageFrom::Before(before),
            (_, None, true) => PageFrom::Before(u64::MAX),
            (after, None, false) => PageFrom::After(after.unwrap_or(0)),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsRequest {
    #[serde(default)]
    after_seq: u64,
    /// The stream version of the event at `after_seq`, when the caller knows
    /// it: the read then starts past it instead of at the stream's start.
    #[serde(default)]
    after_version: u64,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CostsRequest {
    by: CostGroup,
    #[serde(default)]
    since: Option<NaiveDate>,
    #[serde(default)]
    until: Option<NaiveDate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditRequest {
    #[serde(default)]
    since: Option<DateTime<Utc>>,
    #[serde(default)]
    until: Option<DateTime<Utc>>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default, rename = "type")]
    event_type: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

/// An empty body reads as `{}`: these requests have only optional fields.
fn body<T: serde::de::DeserializeOwned + Default>(message: &Message) -> Result<T, GatewayError> {
    if message.payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let format = BodyFormat::from_content_type(header(&message.headers, "Content-Type"))?;
    decode_body(&message.payload, format)
}

fn unavailable(
    what: &str,
) -> impl Fn(switchboard_projections::ProjectionError) -> GatewayError + '_ {
    move |error| {
        tracing::error!(%error, "cannot read the {what}");
        GatewayError::Unavailable(format!("the {what} cannot be read"))
    }
}

impl Gateway {
    /// `…conv.list`: the caller's conversations, by id.
    pub(super) async fn list_conversations(
        &self,
        message: &Message,
        meta: &RequestMeta,
    ) -> Result<Value, GatewayError> {
        let caller = self
            .keyed(message, &[Scope::Chat, Scope::Admin], meta)
            .await?;
        let request: ListRequest = body(message)?;
        self.caught_up().await?;
        let limit = request.limit.unwrap_or(50).clamp(1, MAX_LIST);
        let history = self.projections.history();
        let key_id = caller.record.key_id.clone();
        let conversations = tokio::task::spawn_blocking(move || {
            history.conversations_of_key(&key_id, request.after.as_deref(), limit)
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("the listing failed: {e}")))?
        .map_err(unavailable("history"))?;
        Ok(json!({ "ok": true, "conversations": conversations }))
    }

    /// `…conv.<id>.history`: one page of the conversation's messages, oldest
    /// first, with `has_more` when more lie beyond it in the direction read;
    /// an empty page for a conversation nobody started.
    pub(super) async fn history_page(
        &self,
        caller: &Caller,
        conversation_id: &str,
        request: HistoryRequest,
        meta: &RequestMeta,
    ) -> Result<Value, GatewayError> {
        let limit = request.limit.unwrap_or(MAX_HISTORY).clamp(1, MAX_HISTORY);
        // A page's messages as JSON stay within MAX_HISTORY_BYTES.
        let mut bytes = 0;
        let fits = move |message: &HistoryMessage| {
            bytes += json_len(message);
            bytes <= MAX_HISTORY_BYTES
        };
        let page = self
            .read_history(caller, conversation_id, request.start(), limit, fits, meta)
            .await?;
        Ok(match page {
            Some(page) => history_json(
                conversation_id,
                &page.messages,
                page.summary.erased,
                page.has_more,
            ),
            None => history_json(conversation_id, &[], false, false),
        })
    }

    /// `…conv.<id>.events`: the conversation's stored events after a seq, for
    /// a live view resuming where it left off. The owner is read from the
    /// stream itself (its `conversation_started`), so a conversation started
    /// between two pages is checked as well as one that existed before; the
    /// content of every message before the stream's last erasure is emptied,
    /// as the history shows none.
    pub(super) async fn conversation_events(
        &self,
        message: &Message,
        meta: &RequestMeta,
        conversation_id: &str,
    ) -> Result<Value, GatewayError> {
        let caller = self
            .keyed(message, &[Scope::Chat, Scope::Admin], meta)
            .await?;
        let request: EventsRequest = body(message)?;
        let limit = request.limit.unwrap_or(MAX_EVENTS).clamp(1, MAX_EVENTS);
        let log = self.log.clone();
        let stream = StreamId::conversation(conversation_id)
            .map_err(|e| GatewayError::InvalidRequest(e.to_string()))?;
        let head = log.head();
        let page = tokio::task::spawn_blocking(move || events_page(&log, &stream, &request, limit))
            .await
            .map_err(|e| GatewayError::Internal(format!("the read failed: {e}")))?
            .map_err(|error| {
                tracing::error!(%error, "cannot read a conversation's stream");
                GatewayError::Unavailable("the conversation cannot be read".into())
            })?;
        match page.owner {
            Owner::Key(owner) => {
                if owner != caller.record.key_id && !caller.has(Scope::Admin) {
                    return Err(self.refuse_not_owner(&caller, meta).await);
                }
            }
            Owner::Nobody => {}
            // Not written by this version: the history view decides.
            Owner::Unknown => {
                let any = |_: &HistoryMessage| true;
                self.read_history(&caller, conversation_id, PageFrom::After(0), 1, any, meta)
                    .await?;
            }
        }
        let mut events = Vec::with_capacity(page.events.len());
        let mut bytes = 0;
        for envelope in &page.events {
            let event = serde_json::to_value(envelope)
                .map_err(|e| GatewayError::Internal(format!("an event did not encode: {e}")))?;
            bytes += json_len(&event);
            if bytes > MAX_EVENTS_BYTES && !events.is_empty() {
                break;
            }
            events.push(event);
        }
        Ok(
            json!({ "ok": true, "conversation_id": conversation_id, "events": events, "head": head }),
        )
    }

    /// `…usage`: the calling key's limits, budget and spend.
    pub(super) async fn usage(
        &self,
        message: &Message,
        meta: &RequestMeta,
    ) -> Result<Value, GatewayError> {
        let caller = self
            .keyed(message, &[Scope::Chat, Scope::Admin], meta)
            .await?;
        self.caught_up().await?;
        let spent = self
            .projections
            .costs()
            .key_totals(&caller.record.key_id)
            .map_err(unavailable("costs"))?;
        let record = &caller.record;
        let budgets = match self.coordinator.budgets() {
            Some(budgets) => budgets.status(
                &record.key_id,
                record.owner.as_deref(),
                record.budget.as_ref(),
            ),
            None => Vec::new(),
        };
        let remaining = self
            .limiters
            .remaining(&record.key_id, record.limits.clone())
            .await;
        Ok(json!({
            "ok": true,
            "key_id": record.key_id,
            "name": record.name,
            "owner": record.owner,
            "scopes": record.scopes,
            "limits": record.limits,
            "budget": record.budget,
            "expires_at": record.expires_at,
            "spent": spent,
            "budgets": budgets,
            "rate_limit": {
                "remaining_requests": remaining.requests,
                "remaining_tokens": remaining.tokens,
                "reset_ms": u64::try_from(remaining.reset.as_millis()).unwrap_or(u64::MAX),
            },
        }))
    }

    /// `…agents`: the configured agents' names.
    pub(super) async fn agents(
        &self,
        message: &Message,
        meta: &RequestMeta,
    ) -> Result<Value, GatewayError> {
        self.keyed(message, &[Scope::Chat, Scope::Admin], meta)
            .await?;
        let default = self.coordinator.default_agent();
        let agents: Vec<Value> = self
            .coordinator
            .agent_names()
            .into_iter()
            .map(|name| json!({ "name": name, "default": name == default }))
            .collect();
        Ok(json!({ "ok": true, "agents": agents }))
    }

    /// `…admin.costs`.
    pub(super) async fn costs(
        &self,
        message: &Message,
        meta: &RequestMeta,
    ) -> Result<Value, GatewayError> {
        self.keyed(message, &[Scope::Admin], meta).await?;
        let format = BodyFormat::from_content_type(header(&message.headers, "Content-Type"))?;
        let request: CostsRequest = decode_body(&message.payload, format)?;
        if let (Some(since), Some(until)) = (request.since, request.until) {
            if since > until {
                return Err(GatewayError::InvalidRequest("since is after until".into()));
            }
        }
        self.caught_up().await?;
        let costs = self.projections.costs();
        let rows = tokio::task::spawn_blocking(move || {
            costs.report(request.by, request.since, request.until)
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("the report failed: {e}")))?
        .map_err(unavailable("costs"))?;
        Ok(json!({ "ok": true, "by": request.by, "rows": rows }))
    }

    /// `…admin.audit`.
    pub(super) async fn audit(
        &self,
        message: &Message,
        meta: &RequestMeta,
    ) -> Result<Value, GatewayError> {
        self.keyed(message, &[Scope::Admin], meta).await?;
        let request: AuditRequest = body(message)?;
        self.caught_up().await?;
        let query = AuditQuery {
            since: request.since,
            until: request.until,
            key_id: request.key,
            event_type: request.event_type,
            cursor: request.cursor,
            limit: request.limit.unwrap_or(100).clamp(1, MAX_AUDIT_PAGE),
        };
        let audit = self.projections.audit();
        let page = tokio::task::spawn_blocking(move || audit.query(&query))
            .await
            .map_err(|e| GatewayError::Internal(format!("the query failed: {e}")))?
            .map_err(|error| match error {
                switchboard_projections::ProjectionError::InvalidQuery(why) => {
                    GatewayError::InvalidRequest(why)
                }
                other => unavailable("audit trail")(other),
            })?;
        Ok(json!({ "ok": true, "events": page.events, "next_cursor": page.next_cursor }))
    }

    /// `…admin.conv.<id>.erase`: appends `conversation_erased` through the
    /// conversation's single writer.
    pub(super) async fn erase(
        &self,
        message: &Message,
        meta: &RequestMeta,
        conversation_id: &str,
    ) -> Result<Value, GatewayError> {
        let caller = self.keyed(message, &[Scope::Admin], meta).await?;
        let erased = self
            .coordinator
            .erase(conversation_id, &caller.record.key_id)
            .await?;
        self.record_action(&caller, "erase_conversation", conversation_id, meta)
            .await;
        Ok(json!({
            "ok": true,
            "conversation_id": conversation_id,
            "seq": erased.seq,
            "already": erased.seq.is_none(),
        }))
    }

    /// `…health`: no key needed; says how far the core is.
    pub(super) async fn health(&self) -> Result<Value, GatewayError> {
        // Asked over the front's own bus, the answer does not show it.
        if !self.bus.is_connected() {
            return Err(GatewayError::Unavailable(
                "the bus is not connected: events wait in the log until it is back".into(),
            ));
        }
        if let Some(why) = self.log.failure() {
            return Err(GatewayError::Unavailable(format!(
                "the event log refuses appends until a restart: {why}"
            )));
        }
        if let Some(why) = self.projections.failure() {
            return Err(GatewayError::Unavailable(format!(
                "the projections stopped: {why}"
            )));
        }
        Ok(json!({
            "ok": true,
            "log_head": self.log.head(),
            "projections_at": self.projections.caught_up_to(),
            "live_conversations": self.coordinator.live_conversations(),
            "turns_in_flight": self.coordinator.turns_in_flight(),
        }))
    }

    /// The caller, if its key is valid and has one of `scopes`; notes its
    /// rate-limit figures for the reply's headers.
    pub(super) async fn keyed(
        &self,
        message: &Message,
        scopes: &[Scope],
        meta: &RequestMeta,
    ) -> Result<Caller, GatewayError> {
        let caller = self
            .auth
            .authenticate(&message.headers, scopes, meta)
            .await?;
        self.note_rate(&caller, meta).await;
        Ok(caller)
    }
}

/// Who started a conversation, by its stream's first event.
#[derive(Debug, PartialEq)]
enum Owner {
    /// The key of its `conversation_started`.
    Key(String),
    /// The stream is empty: nobody started it (yet).
    Nobody,
    /// The stream does not begin with `conversation_started`.
    Unknown,
}

/// One page of `conv.<id>.events`.
#[derive(Debug)]
struct EventsPage {
    owner: Owner,
    events: Vec<Envelope>,
}

/// Reads who owns `stream` and its first `limit` events past the request's
/// position. The rest of the stream is read too, to find its last erasure:
/// the page's messages before it have their content emptied.
fn events_page(
    log: &EventLog,
    stream: &StreamId,
    request: &EventsRequest,
    limit: usize,
) -> Result<EventsPage, ReadError> {
    let owner_of = |first: Option<&Envelope>| match first {
        None => Owner::Nobody,
        Some(Envelope {
            event: Event::ConversationStarted(started),
            ..
        }) => Owner::Key(started.key_id.clone()),
        Some(_) => Owner::Unknown,
    };
    let from = request.after_version.saturating_add(1);
    // Read from the start, the page's own first event is the stream's first.
    let mut owner = if from > 1 {
        Some(owner_of(
            log.read_stream(stream, 1).next().transpose()?.as_ref(),
        ))
    } else {
        None
    };
    let mut events = Vec::new();
    let mut last_erasure = 0;
    for envelope in log.read_stream(stream, from) {
        let envelope = envelope?;
        owner.get_or_insert_with(|| owner_of(Some(&envelope)));
        if envelope.seq <= request.after_seq {
            continue;
        }
        if matches!(envelope.event, Event::ConversationErased(_)) {
            last_erasure = envelope.seq;
        }
        if events.len() < limit {
            events.push(envelope);
        }
    }
    for envelope in events.iter_mut().take_while(|e| e.seq < last_erasure) {
        match &mut envelope.event {
            Event::MessageReceived(message) => message.content.clear(),
            Event::ReplyCompleted(reply) => reply.content.clear(),
            _ => {}
        }
    }
    Ok(EventsPage {
        owner: owner.unwrap_or(Owner::Nobody),
        events,
    })
}

/// The bytes `value` takes as JSON.
fn json_len(value: &impl serde::Serialize) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value).expect("counting cannot fail");
    counter.0
}
