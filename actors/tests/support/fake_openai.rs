//! A fake OpenAI-compatible chat-completions server on 127.0.0.1, speaking the
//! real wire format (SSE `chat.completion.chunk` objects, a usage chunk when
//! `stream_options.include_usage` asks for one, `data: [DONE]`), with one
//! misbehaviour chosen per server (or a script of them, one per request), and
//! a record of every request it got and of how many it handled at once.

// Each test binary uses its own part of the fake.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};

/// The reply the fake streams, one delta per element.
pub const REPLY: [&str; 5] = ["Hello", " from", " the", " fake", " model."];
/// The usage the fake reports when asked: prompt, completion.
pub const USAGE: (u64, u64) = (17, 5);

/// What the server does with a chat-completions request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Streams [`REPLY`], a finish reason, usage when asked, then `[DONE]`.
    Normal,
    /// Like `Normal` but never sends a usage chunk.
    NoUsage,
    /// Accepts the request and never answers (slow first byte).
    Hang,
    /// Streams this many deltas, then goes silent with the connection open.
    StallAfter(usize),
    /// 500 with OpenAI's error JSON.
    ServerError,
    /// 429 with `Retry-After: 2` and OpenAI's error JSON.
    RateLimited,
    /// 400 with OpenAI's error JSON (e.g. an unknown model).
    BadRequest,
    /// Streams this many deltas, then aborts the connection (no `[DONE]`).
    DropAfter(usize),
    /// Streams this many deltas, then ends the body cleanly, without a finish
    /// reason or `[DONE]`.
    EndAfter(usize),
    /// Streams one delta, then a chunk that is not JSON.
    MalformedChunk,
    /// Streams one delta, then an error object inside the 200 stream.
    ErrorInStream,
    /// Ignores `stream: true` and answers one `chat.completion` JSON object.
    PlainJson,
    /// 200 with a JSON body that holds only OpenAI's error object, as some
    /// gateways in front of a model server answer.
    PlainJsonError,
    /// 429 with `retry-after-ms: <ms>` and OpenAI's error JSON.
    RateLimitedMs(u64),
    /// Waits until this many requests have been in flight together (at most
    /// 5 s), holds each a little longer so any request over a cap would show
    /// up, then answers like `Normal`.
    Gate(usize),
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The JSON body.
    pub body: Value,
}

#[derive(Clone)]
struct FakeState {
    /// The n-th request gets the n-th behaviour; the last one repeats.
    script: Arc<Vec<Behaviour>>,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    in_flight: Arc<InFlight>,
}

/// Requests being handled now, and the most ever handled at once.
#[derive(Default)]
struct InFlight {
    now: AtomicUsize,
    max: AtomicUsize,
}

/// A running fake server; it stops when the test's runtime ends.
pub struct FakeOpenAi {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    in_flight: Arc<InFlight>,
}

impl FakeOpenAi {
    /// Start a server with `behaviour` on a free port of 127.0.0.1.
    pub async fn start(behaviour: Behaviour) -> FakeOpenAi {
        Self::start_script(vec![behaviour]).await
    }

    /// Start a server that answers its n-th request with `script[n]`, and every
    /// request past the end with the script's last behaviour — e.g.
    /// `[ServerError, ServerError, Normal]` fails twice, then succeeds.
    pub async fn start_script(script: Vec<Behaviour>) -> FakeOpenAi {
        assert!(!script.is_empty(), "a script needs at least one behaviour");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(InFlight::default());
        let state = FakeState {
            script: Arc::new(script),
            requests: requests.clone(),
            in_flight: in_flight.clone(),
        };
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("fake server runs");
        });
        FakeOpenAi {
            addr,
            requests,
            in_flight,
        }
    }

    /// The base URL to configure a provider with (`…/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The requests received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests
            .lock()
            .expect("no test panics holding the lock")
            .clone()
    }

    /// How many requests arrived so far.
    pub fn request_count(&self) -> usize {
        self.requests
            .lock()
            .expect("no test panics holding the lock")
            .len()
    }

    /// The most requests the server was handling at the same moment (from a
    /// request's arrival until its response starts).
    pub fn max_in_flight(&self) -> usize {
        self.in_flight.max.load(Ordering::SeqCst)
    }
}

/// Counts a request as in flight until dropped.
struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn enter(in_flight: &Arc<InFlight>) -> Self {
        let now = in_flight.now.fetch_add(1, Ordering::SeqCst) + 1;
        in_flight.max.fetch_max(now, Ordering::SeqCst);
        InFlightGuard(in_flight.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn chat_completions(
    State(state): State<FakeState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).expect("the provider sends JSON");
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().expect("ASCII header").to_owned());
    let _in_flight = InFlightGuard::enter(&state.in_flight);
    let behaviour = {
        let mut requests = state
            .requests
            .lock()
            .expect("no test panics holding the lock");
        requests.push(RecordedRequest {
            authorization,
            body: body.clone(),
        });
        let last = state.script.len() - 1;
        state.script[(requests.len() - 1).min(last)]
    };

    let model = body["model"].as_str().unwrap_or("unknown").to_owned();
    let include_usage = body["stream_options"]["include_usage"] == json!(true);
    let chunks = Chunks {
        model: model.clone(),
        include_usage,
    };
    match behaviour {
        Behaviour::Normal => sse(stream::iter(chunks.full_reply(include_usage))),
        Behaviour::NoUsage => sse(stream::iter(chunks.full_reply(false))),
        Behaviour::Hang => std::future::pending().await,
        Behaviour::StallAfter(n) => sse(stream::iter(chunks.deltas(n)).chain(stream::pending())),
        Behaviour::ServerError => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request.",
            "server_error",
        ),
        Behaviour::RateLimited => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached for requests",
                "requests",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, "2".parse().expect("valid header"));
            response
        }
        Behaviour::RateLimitedMs(ms) => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached for requests",
                "requests",
            );
            response.headers_mut().insert(
                "retry-after-ms",
                ms.to_string().parse().expect("valid header"),
            );
            response
        }
        Behaviour::Gate(wanted) => {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            // Once that many were in flight together, the gate stays open.
            while state.in_flight.max.load(Ordering::SeqCst) < wanted
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            sse(stream::iter(chunks.full_reply(include_usage)))
        }
        Behaviour::BadRequest => error(
            StatusCode::BAD_REQUEST,
            "The model `nope` does not exist",
            "invalid_request_error",
        ),
        Behaviour::DropAfter(n) => {
            // Pause before the cut so the deltas are flushed to the socket first,
            // as they would be when a real server dies mid-reply.
            let cut = stream::once(async {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "cut",
                ))
            });
            raw_sse(stream::iter(chunks.deltas(n)).map(Ok).chain(cut))
        }
        Behaviour::EndAfter(n) => sse(stream::iter(chunks.deltas(n))),
        Behaviour::MalformedChunk => {
            let mut frames = chunks.deltas(1);
            frames.push(Bytes::from_static(b"data: {\"choices\":[{\"delta\":\n\n"));
            frames.push(done());
            sse(stream::iter(frames))
        }
        Behaviour::ErrorInStream => {
            let mut frames = chunks.deltas(1);
            frames.push(event(&json!({"error": {
                "message": "the model crashed", "type": "server_error", "code": null
            }})));
            sse(stream::iter(frames))
        }
        Behaviour::PlainJsonError => axum::Json(json!({"error": {
            "message": "the model is overloaded", "type": "server_error", "code": 503
        }}))
        .into_response(),
        Behaviour::PlainJson => {
            let (prompt, completion) = USAGE;
            axum::Json(json!({
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": REPLY.concat()},
                    "finish_reason": "stop",
                }],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }))
            .into_response()
        }
    }
}

/// Builds `chat.completion.chunk` frames as OpenAI sends them.
struct Chunks {
    model: String,
    include_usage: bool,
}

impl Chunks {
    fn chunk(&self, choices: Value, usage: Value) -> Bytes {
        let mut chunk = json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
        });
        // With include_usage, OpenAI puts `"usage": null` on every chunk but the last.
        if self.include_usage {
            chunk["usage"] = usage;
        }
        event(&chunk)
    }

    fn delta(&self, delta: Value, finish_reason: Value) -> Bytes {
        let choice = json!([{
            "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason
        }]);
        self.chunk(choice, Value::Null)
    }

    /// The role chunk and the first `n` content deltas.
    fn deltas(&self, n: usize) -> Vec<Bytes> {
        let mut frames = vec![self.delta(
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
        )];
        for piece in REPLY.iter().take(n) {
            frames.push(self.delta(json!({"content": piece}), Value::Null));
        }
        frames
    }

    fn full_reply(&self, usage: bool) -> Vec<Bytes> {
        let mut frames = self.deltas(REPLY.len());
        frames.push(self.delta(json!({}), json!("stop")));
        if usage {
            let (prompt, completion) = USAGE;
            frames.push(self.chunk(
                json!([]),
                json!({
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                }),
            ));
        }
        frames.push(done());
        frames
    }
}

fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

fn sse(frames: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    raw_sse(frames.map(Ok::<_, Infallible>))
}

fn raw_sse<E>(frames: impl Stream<Item = Result<Bytes, E>> + Send + 'static) -> Response
where
    E: Into<axum::BoxError> + 'static,
{
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(frames))
        .expect("valid response")
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}
