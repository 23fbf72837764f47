//! `POST /v1/chat/completions` and `GET /v1/models` (and `/v1/models/{id}`):
//! a drop-in for OpenAI clients (DESIGN §7). `model` names an agent; the
//! reply comes back whole with `usage`, or as `chat.completion.chunk` events
//! (the role first, the text, the `finish_reason`, a usage chunk when
//! `stream_options.include_usage` is set) ending `data: [DONE]`.
//!
//! Like the rest of the front, these routes decide nothing: each turns into
//! the core's `agents`, `conv.<id>.send`, `conv.<id>.events` and
//! `evt.conv.<id>.>` subjects, and every keyed answer carries the core's
//! rate-limit headers. A non-streamed completion is one send that waits for
//! its stored reply (`Switchboard-Wait: reply`); a streamed one follows the
//! conversation's events. A reply is waited for 10 minutes at most (then 504,
//! or an error chunk); the turn goes on and is stored regardless.
//!
//! **Messages.** OpenAI clients resend the whole chat on every call, but a
//! conversation here keeps its own history, which is what the agent sees as
//! context. So only the *last* message is sent, and it must have role `user`;
//! earlier messages (system prompts included: an agent has its own) are read
//! for their shape and otherwise ignored. To keep context across calls, pass
//! `X-Conversation-Id`; without it every call starts a new conversation, whose
//! id comes back in the `X-Conversation-Id` response header, so a client that
//! sends three messages and no id gets a reply to the third alone.
//! Content is a string or an array of `{"type":"text","text"}` parts, joined
//! with newlines; other parts are refused. Other OpenAI parameters
//! (`temperature`, `max_tokens`, `tools`, …) are accepted and ignored — the
//! agent's config decides them — except `n`, which must be 1.
//!
//! **Retries.** OpenAI SDKs retry 429 and 5xx on their own, and each retry
//! would be a new message. A request with an `Idempotency-Key` header (the
//! SDKs send none unless told, e.g. with `extra_headers`) sends it as the
//! message id, so a retry is the same message: stored once, and answered
//! with the turn's stored end. Without `X-Conversation-Id`, such a request's
//! conversation is derived from the key and the idempotency key, so that
//! the retry finds the first attempt's conversation.
//!
//! **Errors** are OpenAI's shape, `{"error":{"message","type","param","code"}}`,
//! which SDKs turn into their typed exceptions. Bad parameters get **400**, as
//! OpenAI answers them, not the 422 of the rest of the API. The core's codes
//! map as: `unauthorized` 401 `invalid_api_key`; `forbidden` 403
//! `permission_error`; `invalid_request` 400; an unknown model 404
//! `model_not_found`; `rate_limited` 429 `rate_limit_exceeded` with
//! `Retry-After`; `budget_exceeded` 429 `insufficient_quota` (OpenAI's "out of
//! credit"; with `Retry-After` when the budget's period ends, none for a
//! `total` budget, which no wait renews); `unavailable` 503; others 500. A
//! turn that ends `reply_failed` maps its failure code: `timeout` 504,
//! `rate_limited` (the model server's, after the agent's retries) 429 with
//! `Retry-After: 10`, `unavailable` (the agent's circuit is open) 503, `internal` 500, and
//! the model server's other failures (`upstream`, `connect`, `rejected`, …)
//! 502, each with the failure code as `code`. Once a stream has begun, an
//! error is sent as a chunk `{"error":{…}}` followed by `data: [DONE]`, as
//! OpenAI does.

mod error;
mod request;
mod response;
mod turn;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::{copy_rate_headers, ApiError};
use super::openapi::{ChatCompletion, ChatCompletionRequest, Model, ModelList, OpenAiErrors};
use super::{within, AppState};
use crate::bus::Headers;
use crate::gateway::WAIT_HEADER;
use error::{body_rejection, OpenAiError};
use request::{conversation_of, message_id_of, ChatRequest};
use response::{relay_chunks, ResponseShape};
use turn::TurnFollower;

/// Chunks buffered for a slow client.
const CHUNK_BUFFER: usize = 256;
/// A keep-alive comment this often, so proxies keep idle streams open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

const CONVERSATION_HEADER: HeaderName = HeaderName::from_static("x-conversation-id");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(retrieve_model))
}

/// The configured agents' names; the request also checks the caller's key.
async fn agents(
    state: &AppState,
    caller: &HeaderMap,
) -> Result<(Vec<String>, HeaderMap), ApiError> {
    let reply = within(state, state.core.request("agents", caller, &json!({}))).await?;
    let names: Vec<String> = reply.body["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|agent| agent["name"].as_str().map(str::to_owned))
        .collect();
    let mut known = state.known_agents.write().expect("agents lock");
    known.clear();
    known.extend(names.iter().cloned());
    drop(known);
    let mut headers = HeaderMap::new();
    copy_rate_headers(&reply.headers, &mut headers);
    Ok((names, headers))
}

fn model_object(name: &str) -> Value {
    json!({ "id": name, "object": "model", "created": 0, "owned_by": "switchboard" })
}

/// `GET /v1/models`: the agents.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The configured agents", body = ModelList),
        OpenAiErrors,
    ),
)]
async fn list_models(
    State(state): State<AppState>,
    caller: HeaderMap,
) -> Result<Response, OpenAiError> {
    let (names, headers) = agents(&state, &caller).await?;
    let data: Vec<Value> = names.iter().map(|name| model_object(name)).collect();
    Ok((headers, Json(json!({ "object": "list", "data": data }))).into_response())
}

/// `GET /v1/models/{model}`: one agent, or 404 `model_not_found`.
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    tag = "openai",
    params(("model" = String, Path, description = "An agent's name")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The agent", body = Model),
        OpenAiErrors,
    ),
)]
async fn retrieve_model(
    State(state): State<AppState>,
    caller: HeaderMap,
    model: Result<Path<String>, PathRejection>,
) -> Result<Response, OpenAiError> {
    let (names, headers) = agents(&state, &caller).await?;
    let Path(model) = model.map_err(|rejection| OpenAiError::bad_request(rejection.body_text()))?;
    if !names.contains(&model) {
        return Err(OpenAiError::model_not_found(&model).with_headers(&headers));
    }
    Ok((headers, Json(model_object(&model))).into_response())
}

/// `POST /v1/chat/completions`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    description = "OpenAI's chat completion: the last message is sent to the agent named \
        by `model`, in the conversation `X-Conversation-Id` names (a new one without it). \
        With `stream` the reply is SSE `data:` lines, each a `ChatCompletionChunk`, \
        ending `data: [DONE]`; an error after the stream began is an `OpenAiErrorBody` chunk.",
    params(
        ("X-Conversation-Id" = Option<String>, Header, description = "The conversation to continue (1–128 of `[A-Za-z0-9_-]`); without it a new one starts"),
        ("Idempotency-Key" = Option<String>, Header, description = "Sent as the message id, so a retry is the same message"),
    ),
    request_body = ChatCompletionRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The reply, whole or streamed", headers(
            ("X-Conversation-Id" = String, description = "The conversation, given or new"),
        ), content(
            (ChatCompletion = "application/json"),
            (String = "text/event-stream"),
        )),
        OpenAiErrors,
    ),
)]
async fn chat_completions(
    State(state): State<AppState>,
    caller: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let body = body.map_err(body_rejection)?;
    let checked = ChatRequest::parse(&body).and_then(|request| {
        let message_id = message_id_of(&caller)?;
        Ok((
            request,
            conversation_of(&caller, message_id.as_deref())?,
            message_id,
        ))
    });
    let known = |model: &str| {
        let known = state.known_agents.read().expect("agents lock");
        known.contains(model)
    };
    // The key first, as OpenAI does (401 before any complaint about the
    // request): a send checks it, so a request for a known agent goes
    // straight on; anything else asks the core for the agents, which checks
    // the key too.
    if !checked
        .as_ref()
        .is_ok_and(|(request, ..)| known(&request.model))
    {
        let (agents, headers) = agents(&state, &caller).await?;
        if let Ok((request, ..)) = &checked {
            if !agents.contains(&request.model) {
                return Err(OpenAiError::model_not_found(&request.model).with_headers(&headers));
            }
        }
    }
    let (request, id, message_id) = checked?;
    let id_header =
        HeaderValue::from_str(&id).expect("a checked conversation id is a header value");
    let failed = |error: ApiError| OpenAiError::from(error).with_conversation(&id_header);

    let send = json!({
        "content": request.content,
        "message_id": message_id,
        "agent": request.model,
        "user": request.user,
    });
    let subject = format!("conv.{id}.send");
    let shape = ResponseShape {
        model: request.model,
        created: chrono::Utc::now().timestamp(),
        include_usage: request.include_usage,
    };
    if !request.stream {
        return whole_reply(&state, caller, id, &subject, &send, shape)
            .await
            .map_err(|error| error.with_conversation(&id_header));
    }

    // Subscribed before sending, so no piece of the reply can be missed.
    let events = state.core.follow_reply(&id).await.map_err(failed)?;
    let ack = within(&state, state.core.request(&subject, &caller, &send))
        .await
        .map_err(|error| send_refused(&state, &shape.model, error).with_conversation(&id_header))?;
    let headers = reply_headers(&ack.headers, &id);
    let turn = TurnFollower::start(state.core.clone(), caller, id, &ack.body, events, false).await;
    let (sender, received) = mpsc::channel(CHUNK_BUFFER);
    tokio::spawn(relay_chunks(turn, shape, sender, state.closing.clone()));
    let stream = ReceiverStream::new(received).map(Ok::<Event, Infallible>);
    let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE));
    Ok((headers, sse).into_response())
}

/// A non-streamed completion: the send waits for its turn's stored end
/// (`Switchboard-Wait: reply`), so no events are followed. A resend of a
/// message (its turn started by the first send) follows the conversation's
/// events for it instead.
async fn whole_reply(
    state: &AppState,
    caller: HeaderMap,
    id: String,
    subject: &str,
    send: &Value,
    shape: ResponseShape,
) -> Result<Response, OpenAiError> {
    let wait = Headers::new().with(WAIT_HEADER, "reply");
    // The bus waits a little longer than the reply, so a reply that takes too
    // long is this timeout's 504, not the bus's 503.
    let request = state.core.request_with(
        subject,
        &caller,
        send,
        wait,
        turn::REPLY_WAIT + Duration::from_secs(5),
    );
    let ack = tokio::time::timeout(turn::REPLY_WAIT, request)
        .await
        .map_err(|_| OpenAiError::timeout())?
        .map_err(|error| send_refused(state, &shape.model, error))?;
    let headers = reply_headers(&ack.headers, &id);
    let turn = match TurnFollower::ended(state.core.clone(), caller.clone(), id.clone(), &ack.body)
    {
        Some(turn) => turn,
        None => {
            let events = state.core.follow_reply(&id).await?;
            TurnFollower::start(state.core.clone(), caller, id, &ack.body, events, true).await
        }
    };
    // A failed turn still tells the client its rate-limit figures.
    let reply = turn
        .into_reply()
        .await
        .map_err(|error| error.with_headers(&headers))?;
    Ok((headers, Json(shape.completion(&reply))).into_response())
}

/// The error of a refused send. A send for an agent the core does not have
/// (it was in the front's list, but the core restarted without it) is
/// OpenAI's 404, and the list is asked for again next time.
fn send_refused(state: &AppState, model: &str, error: ApiError) -> OpenAiError {
    if error.code == "invalid_request" && error.message.starts_with("unknown agent ") {
        let mut known = state.known_agents.write().expect("agents lock");
        known.remove(model);
        return OpenAiError::model_not_found(model);
    }
    OpenAiError::from(error)
}

/// The core's rate-limit headers and the conversation's id.
fn reply_headers(core: &Headers, conversation_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    copy_rate_headers(core, &mut headers);
    let id = HeaderValue::from_str(conversation_id)
        .expect("a checked conversation id is a header value");
    headers.insert(CONVERSATION_HEADER, id);
    headers
}
