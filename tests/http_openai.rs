//! The OpenAI-compatible routes (`/v1/chat/completions`, `/v1/models`) over
//! a real socket: whole and streamed completions, the conversation header,
//! idempotent retries, and errors in OpenAI's shape.

mod support;

use support::front::{Front, ADMIN_KEY, WAIT};
use support::nats::NatsServer;
use support::sse::{self, read_until};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchboard::server::{AgentSpec, ProviderSpec};
use switchboard_actors::agent::AgentConfig;

const COMPLETIONS: &str = "/v1/chat/completions";

/// A response read whole.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Front {
    async fn answer(request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("the request is answered");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.json().await.expect("a JSON body");
        Answer {
            status,
            headers,
            body,
        }
    }

    /// `POST /v1/chat/completions` with `body`, and `X-Conversation-Id` when given.
    async fn complete(&self, key: Option<&str>, conversation: Option<&str>, body: Value) -> Answer {
        let mut request = self.request(Method::POST, COMPLETIONS, key).json(&body);
        if let Some(id) = conversation {
            request = request.header("X-Conversation-Id", id);
        }
        Front::answer(request).await
    }

    async fn issue(&self, body: Value) -> String {
        let issued = Front::answer(
            self.request(Method::POST, "/admin/keys", Some(ADMIN_KEY))
                .json(&body),
        )
        .await;
        assert_eq!(issued.status, StatusCode::CREATED, "{}", issued.body);
        issued.body["key"].as_str().expect("key").to_owned()
    }

    /// Polls a conversation's history until it holds `n` messages.
    async fn history_of(&self, key: &str, id: &str, n: usize) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let path = format!("/v1/conversations/{id}");
            let history = Front::answer(self.request(Method::GET, &path, Some(key))).await;
            assert_eq!(history.status, StatusCode::OK, "{}", history.body);
            if history.body["messages"].as_array().map_or(0, Vec::len) == n {
                return history.body;
            }
            assert!(tokio::time::Instant::now() < deadline, "{}", history.body);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn chat(model: &str, text: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": text }] })
}

fn conversation_header(headers: &HeaderMap) -> String {
    headers["x-conversation-id"]
        .to_str()
        .expect("ascii")
        .to_owned()
}

/// An error in OpenAI's shape with this status, `type` and `code`.
#[track_caller]
fn assert_openai_error(answer: &Answer, status: StatusCode, kind: &str, code: &str) {
    let body = &answer.body;
    assert_eq!(answer.status, status, "{body}");
    assert_eq!(body["error"]["type"], json!(kind), "{body}");
    assert_eq!(body["error"]["code"], json!(code), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        body["error"]
            .as_object()
            .expect("object")
            .contains_key("param"),
        "{body}"
    );
}

/// The `data:` payloads of an SSE body, in order, until it ends; fails on a
/// named event (OpenAI's chunks have none).
async fn data_lines(response: reqwest::Response) -> Vec<String> {
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut lines = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the stream moves on")
    {
        buffer.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            for line in block.lines() {
                assert!(!line.starts_with("event:"), "a named event: {block}");
                if let Some(data) = line.strip_prefix("data:") {
                    lines.push(data.trim_start().to_owned());
                }
            }
        }
    }
    lines
}

/// Streams a completion; answers the response headers and the chunks before
/// `[DONE]`, checking that `[DONE]` ends the stream.
async fn stream(front: &Front, key: &str, body: Value) -> (HeaderMap, Vec<Value>) {
    let response = front
        .request(Method::POST, COMPLETIONS, Some(key))
        .json(&body)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert!(headers["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/event-stream"));
    (headers, chunks_to_done(response).await)
}

/// The JSON chunks of a streamed completion, which must end `data: [DONE]`.
async fn chunks_to_done(response: reqwest::Response) -> Vec<Value> {
    let mut lines = data_lines(response).await;
    assert_eq!(lines.pop().as_deref(), Some("[DONE]"), "{lines:?}");
    lines
        .iter()
        .map(|line| serde_json::from_str(line).expect("a JSON chunk"))
        .collect()
}

fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[tokio::test]
async fn a_completion_answers_with_the_reply_and_its_usage() {
    let front = Front::start().await;
    let key = front
        .issue(json!({ "name": "ana", "limits": { "rpm": 10, "tpm": 100000 } }))
        .await;
    let body = json!({
        "model": "echo",
        "messages": [
            { "role": "system", "content": "be brief" },
            { "role": "user", "content": "ignored: the conversation is the context" },
            { "role": "assistant", "content": "ok" },
            { "role": "user", "content": [{ "type": "text", "text": "hello" }, { "type": "text", "text": "there" }] },
        ],
        "temperature": 0.2,
        "max_tokens": 50,
        "user": "ana@example.com",
    });
    let answer = front.complete(Some(&key), None, body).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let completion = &answer.body;
    assert_eq!(completion["object"], json!("chat.completion"));
    assert_eq!(completion["model"], json!("echo"));
    assert!(completion["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert!(completion["created"].as_i64().is_some_and(|t| t > 0));
    let choice = &completion["choices"][0];
    assert_eq!(choice["index"], json!(0));
    assert_eq!(choice["message"]["role"], json!("assistant"));
    assert_eq!(choice["message"]["content"], json!("echo: hello\nthere"));
    assert_eq!(choice["finish_reason"], json!("stop"));
    let usage = &completion["usage"];
    let (prompt, completion_tokens) = (
        usage["prompt_tokens"].as_u64().expect("prompt_tokens"),
        usage["completion_tokens"]
            .as_u64()
            .expect("completion_tokens"),
    );
    assert!(prompt > 0 && completion_tokens > 0, "{usage}");
    assert_eq!(usage["total_tokens"], json!(prompt + completion_tokens));

    // The rate-limit headers of the send, and the new conversation's id.
    assert_eq!(answer.headers["x-ratelimit-limit-requests"], "10");
    assert_eq!(answer.headers["x-ratelimit-remaining-requests"], "9");
    assert_eq!(answer.headers["ratelimit-limit"], "10");
    let id = conversation_header(&answer.headers);
    assert!(id.starts_with("chat-"), "{id}");
    // Only the last message was sent: one exchange in the conversation.
    let history = front.history_of(&key, &id, 2).await;
    assert_eq!(history["messages"][0]["content"], json!("hello\nthere"));
    front.server.shutdown().await;
}

#[tokio::test]
async fn a_streamed_completion_sends_the_role_the_text_the_finish_and_the_usage() {
    let front = Front::start().await;
    let key = front.issue(json!({ "name": "ana" })).await;
    let mut body = chat("echo", "one two three");
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    let (headers, chunks) = stream(&front, &key, body).await;
    assert!(conversation_header(&headers).starts_with("chat-"));
    assert!(chunks.len() >= 4, "{chunks:?}");
    let first = &chunks[0];
    assert_eq!(
        first["choices"][0]["delta"],
        json!({ "role": "assistant", "content": "" })
    );
    let id = first["id"].as_str().expect("id");
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["object"], json!("chat.completion.chunk"), "{chunk}");
        assert_eq!(chunk["id"], json!(id), "one id for the whole stream");
        assert_eq!(chunk["model"], json!("echo"));
    }
    assert_eq!(streamed_text(&chunks), "echo: one two three");
    let (usage_chunk, rest) = chunks.split_last().expect("chunks");
    assert_eq!(usage_chunk["choices"], json!([]));
    let usage = &usage_chunk["usage"];
    assert!(
        usage["prompt_tokens"].as_u64().is_some_and(|n| n > 0),
        "{usage}"
    );
    assert!(
        usage["completion_tokens"].as_u64().is_some_and(|n| n > 0),
        "{usage}"
    );
    let (last, before) = rest.split_last().expect("a finish chunk");
    assert_eq!(last["choices"][0]["finish_reason"], json!("stop"));
    assert_eq!(last["choices"][0]["delta"], json!({}));
    for chunk in before {
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null, "{chunk}");
        assert_eq!(chunk["usage"], Value::Null, "usage: null until the end");
    }

    // Without include_usage: no usage chunk, and no usage field.
    let mut body = chat("echo", "four five");
    body["stream"] = json!(true);
    let (_, chunks) = stream(&front, &key, body).await;
    assert_eq!(streamed_text(&chunks), "echo: four five");
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"][0]["finish_reason"], json!("stop"));
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    front.server.shutdown().await;
}

#[tokio::test]
async fn the_conversation_header_continues_a_conversation_and_its_absence_starts_one() {
    let front = Front::start().await;
    let key = front.issue(json!({ "name": "ana" })).await;
    let first = front
        .complete(Some(&key), Some("oa-1"), chat("echo", "first"))
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(conversation_header(&first.headers), "oa-1");
    let mut body = chat("echo", "second");
    body["stream"] = json!(true);
    let response = front
        .request(Method::POST, COMPLETIONS, Some(&key))
        .header("X-Conversation-Id", "oa-1")
        .json(&body)
        .send()
        .await
        .expect("answered");
    assert_eq!(conversation_header(response.headers()), "oa-1");
    assert_eq!(
        data_lines(response).await.last().map(String::as_str),
        Some("[DONE]")
    );
    // Both exchanges are in the one conversation: its history is the context.
    let history = front.history_of(&key, "oa-1", 4).await;
    let contents: Vec<&str> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["content"].as_str().expect("content"))
        .collect();
    assert_eq!(contents, ["first", "echo: first", "second", "echo: second"]);

    // Another key may not continue it.
    let other = front.issue(json!({ "name": "bob" })).await;
    let denied = front
        .complete(Some(&other), Some("oa-1"), chat("echo", "mine now"))
        .await;
    assert_openai_error(
        &denied,
        StatusCode::FORBIDDEN,
        "permission_error",
        "forbidden",
    );

    // Without the header, each call is a new conversation.
    let a = front.complete(Some(&key), None, chat("echo", "x")).await;
    let b = front.complete(Some(&key), None, chat("echo", "y")).await;
    let (a, b) = (
        conversation_header(&a.headers),
        conversation_header(&b.headers),
    );
    assert_ne!(a, b);
    front.history_of(&key, &a, 2).await;
    front.history_of(&key, &b, 2).await;
    front.server.shutdown().await;
}

#[tokio::test]
async fn an_idempotency_key_makes_a_retry_the_same_message() {
    let front = Front::start().await;
    let key = front.issue(json!({ "name": "ana" })).await;
    let send = |stream: bool| {
        let mut body = chat("echo", "only once");
        body["stream"] = json!(stream);
        front
            .request(Method::POST, COMPLETIONS, Some(&key))
            .header("X-Conversation-Id", "idem")
            .header("Idempotency-Key", "retry-me")
            .json(&body)
    };
    let first = Front::answer(send(false)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let again = Front::answer(send(false)).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(again.body["choices"], first.body["choices"]);
    assert_eq!(again.body["usage"], first.body["usage"]);
    // A streamed retry gets the stored reply whole.
    let response = send(true).send().await.expect("answered");
    let lines = data_lines(response).await;
    let chunks: Vec<Value> = lines[..lines.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(chunks[0]["id"], first.body["id"]);
    assert_eq!(streamed_text(&chunks), "echo: only once");
    front.history_of(&key, "idem", 2).await;

    // Without X-Conversation-Id the retry finds the first attempt's
    // conversation; another key's request with the same idempotency key
    // is its own.
    let other = front.issue(json!({ "name": "bo" })).await;
    let send = |key: &str| {
        front
            .request(Method::POST, COMPLETIONS, Some(key))
            .header("Idempotency-Key", "no-conversation-id")
            .json(&chat("echo", "just once"))
    };
    let first = Front::answer(send(&key)).await;
    let again = Front::answer(send(&key)).await;
    let others = Front::answer(send(&other)).await;
    for answer in [&first, &again, &others] {
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    let conversation = conversation_header(&first.headers);
    assert_eq!(conversation_header(&again.headers), conversation);
    assert_eq!(again.body["id"], first.body["id"]);
    assert_ne!(conversation_header(&others.headers), conversation);
    let history = front.history_of(&key, &conversation, 2).await;
    assert_eq!(history["messages"][0]["content"], json!("just once"));
    front
        .history_of(&other, &conversation_header(&others.headers), 2)
        .await;
    front.server.shutdown().await;
}

#[tokio::test]
async fn models_lists_the_agents() {
    let front = Front::start().await;
    let key = front.issue(json!({ "name": "ana" })).await;
    let models = Front::answer(front.request(Method::GET, "/v1/models", Some(&key))).await;
    assert_eq!(models.status, StatusCode::OK, "{}", models.body);
    assert_eq!(models.body["object"], json!("list"));
    let data = models.body["data"].as_array().expect("data");
    let echo = data
        .iter()
        .find(|m| m["id"] == json!("echo"))
        .expect("echo is listed");
    assert_eq!(
        echo,
        &json!({ "id": "echo", "object": "model", "created": 0, "owned_by": "switchboard" })
    );
    let one = Front::answer(front.request(Method::GET, "/v1/models/echo", Some(&key))).await;
    assert_eq!(one.body["id"], json!("echo"));
    let none = Front::answer(front.request(Method::GET, "/v1/models/nobody", Some(&key))).await;
    assert_openai_error(
        &none,
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "model_not_found",
    );
    let garbled = Front::answer(front.request(Method::GET, "/v1/models/%FF", Some(&key))).await;
    assert_eq!(garbled.status, StatusCode::BAD_REQUEST, "{}", garbled.body);
    assert_eq!(
        garbled.body["error"]["type"],
        json!("invalid_request_error")
    );
    let anonymous = Front::answer(front.request(Method::GET, "/v1/models", None)).await;
    assert_openai_error(
        &anonymous,
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_api_key",
    );
    front.server.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_send_nothing() {
    let front = Front::start().await;
    let key = front.issue(json!({ "name": "ana" })).await;
    let head = front.server.log().head();

    let unknown = front
        .complete(Some(&key), None, chat("nobody", "hello"))
        .await;
    assert_openai_error(
        &unknown,
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "model_not_found",
    );
    assert_eq!(unknown.body["error"]["param"], json!("model"));

    let user = |content: Value| json!({ "model": "echo", "messages": [{ "role": "user", "content": content }] });
    let with = |field: &str, value: Value| {
        let mut body = chat("echo", "x");
        body[field] = value;
        body
    };
    let two = json!([{ "role": "user", "content": "x" }, { "role": "assistant", "content": "y" }]);
    let image = json!([{ "type": "image_url", "image_url": { "url": "data:," } }]);
    let cases: Vec<(Value, Option<&str>)> = vec![
        (json!([1, 2]), None),
        (
            json!({ "messages": [{ "role": "user", "content": "x" }] }),
            Some("model"),
        ),
        (json!({ "model": "echo" }), Some("messages")),
        (with("messages", json!([])), Some("messages")),
        (
            with("messages", json!([{ "content": "x" }])),
            Some("messages[0].role"),
        ),
        (with("messages", two), Some("messages[1].role")),
        (user(json!(5)), Some("messages[0].content")),
        (user(json!("   ")), Some("messages[0].content")),
        (user(image), Some("messages[0].content[0]")),
        (with("stream", json!("yes")), Some("stream")),
        (with("stream_options", json!(true)), Some("stream_options")),
        (with("n", json!(2)), Some("n")),
        (with("user", json!(7)), Some("user")),
    ];
    for (body, param) in cases {
        let answer = front.complete(Some(&key), None, body.clone()).await;
        assert_openai_error(
            &answer,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
        );
        assert_eq!(answer.body["error"]["param"], json!(param), "{body}");
    }
    let bad_id = front
        .complete(Some(&key), Some("bad.id"), chat("echo", "x"))
        .await;
    assert_openai_error(
        &bad_id,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_request",
    );
    assert!(bad_id.body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("X-Conversation-Id")));
    let not_json = Front::answer(
        front
            .request(Method::POST, COMPLETIONS, Some(&key))
            .header("Content-Type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_openai_error(
        &not_json,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_request",
    );
    let huge = front
        .complete(Some(&key), None, chat("echo", &"x".repeat(300 * 1024)))
        .await;
    assert_eq!(huge.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", huge.body);
    assert_eq!(huge.body["error"]["type"], json!("invalid_request_error"));

    // A bad key is 401 before anything else is complained about, whether the
    // front knows the model already (echo, by now) or not.
    for key in [None, Some("sb-garbage-key-000000")] {
        for (id, body) in [
            (None, chat("echo", "x")),
            (None, chat("nobody", "x")),
            (None, json!([1, 2])),
            (Some("bad.id"), chat("echo", "x")),
        ] {
            let answer = front.complete(key, id, body.clone()).await;
            assert_openai_error(
                &answer,
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
            );
        }
    }

    // Nothing was sent: the log holds only the refused keys' audit events.
    let appended: Vec<String> = front
        .server
        .log()
        .read_from(head + 1)
        .map(|e| e.expect("decodes").event.type_name().to_owned())
        .collect();
    assert!(appended.iter().all(|t| t == "auth_failed"), "{appended:?}");
    front.server.shutdown().await;
}

#[tokio::test]
async fn a_rate_limited_key_gets_429_with_retry_after_in_openai_shape() {
    let front = Front::start().await;
    let key = front
        .issue(json!({ "name": "ana", "limits": { "rpm": 1 } }))
        .await;
    let first = front
        .complete(Some(&key), Some("rl"), chat("echo", "one"))
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.headers["x-ratelimit-remaining-requests"], "0");
    let refused = front
        .complete(Some(&key), Some("rl"), chat("echo", "two"))
        .await;
    assert_openai_error(
        &refused,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_exceeded",
        "rate_limit_exceeded",
    );
    let retry_after: u64 = refused.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(refused.headers["x-ratelimit-limit-requests"], "1");
    assert_eq!(conversation_header(&refused.headers), "rl");

    // A streamed request is refused the same way, before any stream.
    let mut body = chat("echo", "three");
    body["stream"] = json!(true);
    let streamed = front.complete(Some(&key), None, body).await;
    assert_eq!(streamed.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(streamed.headers.contains_key("retry-after"));
    front.server.shutdown().await;
}

/// A model server that answers every completion 429, in OpenAI's shape.
async fn always_rate_limited() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            (
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                axum::Json(json!({ "error": {
                    "message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"
                } })),
            )
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/v1")
}

#[tokio::test]
async fn a_turn_the_model_server_rate_limits_is_a_429_with_retry_after_and_the_keys_figures() {
    let upstream = always_rate_limited().await;
    let front = Front::start_with(|config| {
        config.agents.push(AgentSpec {
            config: AgentConfig {
                max_retries: 0,
                ..AgentConfig::new("busy")
            },
            provider: ProviderSpec::OpenAi {
                base_url: upstream,
                model: "busy-model".to_owned(),
                api_key: None,
            },
        });
    })
    .await;
    let key = front
        .issue(json!({ "name": "ana", "limits": { "rpm": 10, "tpm": 100000 } }))
        .await;
    let refused = front
        .complete(Some(&key), Some("busy-1"), chat("busy", "hello"))
        .await;
    assert_openai_error(
        &refused,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_exceeded",
        "rate_limited",
    );
    let retry: u64 = refused.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(refused.headers["x-ratelimit-limit-requests"], "10");
    assert_eq!(conversation_header(&refused.headers), "busy-1");

    // An unknown model still tells the key's figures.
    let unknown = front
        .complete(Some(&key), None, chat("nobody", "hello"))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.body);
    assert_eq!(unknown.headers["x-ratelimit-limit-requests"], "10");
    front.server.shutdown().await;
}

#[tokio::test]
async fn a_failed_turn_is_a_server_error_or_an_error_chunk() {
    // An agent whose model server refuses connections: a port just freed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let front = Front::start_with(|config| {
        config.agents.push(AgentSpec {
            config: AgentConfig {
                max_retries: 0,
                ..AgentConfig::new("down")
            },
            provider: ProviderSpec::OpenAi {
                base_url: format!("http://127.0.0.1:{port}/v1"),
                model: "nothing".to_owned(),
                api_key: None,
            },
        });
    })
    .await;
    let key = front.issue(json!({ "name": "ana" })).await;
    let failed = front
        .complete(Some(&key), Some("down-1"), chat("down", "hello"))
        .await;
    assert_openai_error(&failed, StatusCode::BAD_GATEWAY, "server_error", "connect");
    assert_eq!(conversation_header(&failed.headers), "down-1");

    let mut body = chat("down", "hello again");
    body["stream"] = json!(true);
    let response = front
        .request(Method::POST, COMPLETIONS, Some(&key))
        .json(&body)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), StatusCode::OK, "the stream had begun");
    let lines = data_lines(response).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let error: Value = serde_json::from_str(&lines[0]).expect("JSON");
    assert_eq!(error["error"]["type"], json!("server_error"), "{error}");
    assert_eq!(error["error"]["code"], json!("connect"), "{error}");
    assert_eq!(lines[1], "[DONE]");
    front.server.shutdown().await;
}

/// A model server that holds every completion until `gate` has a permit
/// for it, then streams `reply` in OpenAI's wire format; `received` counts
/// the completions it was asked for.
async fn held_upstream(
    reply: &'static str,
) -> (String, Arc<tokio::sync::Semaphore>, Arc<AtomicUsize>) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (held, counted) = (gate.clone(), received.clone());
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let (gate, received) = (held.clone(), counted.clone());
            async move {
                received.fetch_add(1, Ordering::SeqCst);
                gate.acquire().await.expect("the gate stays open").forget();
                let chunk = |delta: Value, finish: Value| {
                    json!({ "id": "chatcmpl-held", "object": "chat.completion.chunk",
                        "created": 0, "model": "held-model",
                        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
                };
                let usage = json!({ "id": "chatcmpl-held", "object": "chat.completion.chunk",
                    "created": 0, "model": "held-model", "choices": [],
                    "usage": { "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5 } });
                let body: String = [
                    chunk(
                        json!({ "role": "assistant", "content": reply }),
                        Value::Null,
                    ),
                    chunk(json!({}), json!("stop")),
                    usage,
                ]
                .iter()
                .map(|chunk| format!("data: {chunk}\n\n"))
                .chain(["data: [DONE]\n\n".to_owned()])
                .collect();
                ([("content-type", "text/event-stream")], body)
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), gate, received)
}

/// Waits until the [`held_upstream`] counting in `received` has been asked
/// for `turns` completions; panics after [`WAIT`].
async fn until_received(received: &AtomicUsize, turns: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while received.load(Ordering::SeqCst) < turns {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {turns} turns reached the model",
            received.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A front beside a core on `nats` (or on the embedded bus), with agent
/// `agent` on the model server at `upstream` (model `held-model`).
async fn front_on_model_server(nats: Option<&NatsServer>, agent: &str, upstream: String) -> Front {
    Front::start_with(|config| {
        config.nats_url = nats.map(NatsServer::url);
        config.agents.push(AgentSpec {
            config: AgentConfig::new(agent),
            provider: ProviderSpec::OpenAi {
                base_url: upstream,
                model: "held-model".to_owned(),
                api_key: None,
            },
        });
    })
    .await
}

/// `GET …/events` holds a delta back until its message is sent. A stream
/// resumed after the message of a turn under way never sends it: it must
/// still pass the turn's deltas on, before their end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_resumed_after_a_message_still_passes_its_turns_deltas_before_its_end() {
    let (upstream, gate, received) = held_upstream(HELD_REPLY).await;
    let front = front_on_model_server(None, "held", upstream).await;
    let key = front.issue(json!({ "name": "ana" })).await;
    let sent = front
        .request(
            Method::POST,
            "/v1/conversations/resumed/messages",
            Some(&key),
        )
        .json(&json!({ "content": "hello", "message_id": "m1", "agent": "held" }))
        .send()
        .await
        .expect("answered");
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    until_received(&received, 1).await;
    let events = |after: Option<u64>| {
        let request = front.request(Method::GET, "/v1/conversations/resumed/events", Some(&key));
        match after {
            Some(seq) => request.header("Last-Event-ID", seq.to_string()),
            None => request,
        }
        .send()
    };
    // The seq of the message's `message_received`.
    let from_start = events(None).await.expect("answered");
    assert_eq!(from_start.status(), StatusCode::OK);
    let mut text = String::new();
    read_until(&mut from_start.bytes_stream(), &mut text, |text| {
        text.contains("event: message_received") && text.ends_with("\n\n")
    })
    .await;
    let seq: u64 = sse::parse(&text)
        .iter()
        .find(|(kind, _, _)| kind == "message_received")
        .and_then(|(_, _, id)| id.as_deref()?.parse().ok())
        .expect("the message's event, with its seq");

    let resumed = events(Some(seq)).await.expect("answered");
    assert_eq!(resumed.status(), StatusCode::OK);
    let mut resumed = resumed.bytes_stream();
    gate.add_permits(1);
    let mut text = String::new();
    read_until(&mut resumed, &mut text, |text| {
        text.contains("event: reply_completed") && text.ends_with("\n\n")
    })
    .await;
    let events = sse::parse(&text);
    let kinds: Vec<&str> = events.iter().map(|(kind, _, _)| kind.as_str()).collect();
    let end = kinds.iter().position(|kind| *kind == "reply_completed");
    let delta = kinds.iter().position(|kind| *kind == "reply_delta");
    assert!(
        delta.is_some() && delta < end && !kinds.contains(&"message_received"),
        "{text}"
    );
    let deltas: String = events
        .iter()
        .filter(|(kind, _, _)| kind == "reply_delta")
        .map(|(_, data, _)| data["delta"].as_str().expect("a delta's text"))
        .collect();
    assert_eq!(deltas, HELD_REPLY, "{text}");
    front.server.shutdown().await;
}

const HELD_REPLY: &str = "held back, then said";

/// Beside a core on NATS the front follows a streamed reply on the core's
/// in-process bus, where the gateway publishes every reply's deltas and the
/// front's feed every stored conversation event. A resend's first send was
/// not streamed, and its turn ends after the resend: its stream must still
/// end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_a_core_on_nats_a_streamed_resend_ends_though_its_first_send_was_not_streamed() {
    let nats = NatsServer::start();
    let (upstream, gate, received) = held_upstream(HELD_REPLY).await;
    let front = front_on_model_server(Some(&nats), "held", upstream).await;
    let key = front.issue(json!({ "name": "ana" })).await;
    let message = json!({ "content": "hello", "message_id": "m1", "agent": "held" });
    let send_message = |stream: bool| {
        let request = front
            .request(Method::POST, "/v1/conversations/held/messages", Some(&key))
            .json(&message);
        match stream {
            true => request.header("Accept", "text/event-stream"),
            false => request,
        }
    };
    let complete = |stream: bool| {
        let mut body = chat("held", "hello");
        body["stream"] = json!(stream);
        front
            .request(Method::POST, COMPLETIONS, Some(&key))
            .header("X-Conversation-Id", "held-chat")
            .header("Idempotency-Key", "c1")
            .json(&body)
    };

    // The first sends, not streamed; the model server holds both turns.
    let sent = send_message(false).send().await.expect("answered");
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    let first_completion = tokio::spawn(Front::answer(complete(false)));
    until_received(&received, 2).await;

    // Their resends, streamed while the turns run; then the turns go on.
    let resent_message = send_message(true).send().await.expect("answered");
    assert_eq!(resent_message.status(), StatusCode::OK);
    let resent_completion = complete(true).send().await.expect("answered");
    assert_eq!(resent_completion.status(), StatusCode::OK);
    gate.add_permits(2);

    let streamed = tokio::time::timeout(WAIT, resent_message.text())
        .await
        .expect("the resent message's stream ends")
        .expect("a body");
    assert!(streamed.contains(r#""duplicate":true"#), "{streamed}");
    assert!(streamed.contains("event: reply_completed"), "{streamed}");
    assert!(streamed.contains(HELD_REPLY), "{streamed}");
    let chunks = chunks_to_done(resent_completion).await;
    assert_eq!(streamed_text(&chunks), HELD_REPLY);
    let first = first_completion.await.expect("the first completion");
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(
        first.body["choices"][0]["message"]["content"],
        json!(HELD_REPLY)
    );
    front.server.shutdown().await;
}

/// Beside a core on NATS, a reply over NATS's 1 MiB maximum payload still
/// reaches the front whole, streamed or not: the front's in-process bus
/// carries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_a_core_on_nats_a_reply_over_a_mebibyte_reaches_the_front_whole() {
    let nats = NatsServer::start();
    let reply: &'static str = "a long reply ".repeat(120_000).leak();
    let (upstream, gate, _) = held_upstream(reply).await;
    gate.add_permits(2);
    let front = front_on_model_server(Some(&nats), "long", upstream).await;
    let key = front.issue(json!({ "name": "ana" })).await;

    let whole = Front::answer(
        front
            .request(Method::POST, COMPLETIONS, Some(&key))
            .json(&chat("long", "say a lot")),
    );
    let whole = tokio::time::timeout(WAIT, whole)
        .await
        .expect("the whole reply in time");
    assert_eq!(whole.status, StatusCode::OK, "{}", whole.body);
    let content = whole.body["choices"][0]["message"]["content"].as_str();
    assert_eq!(content.map(str::len), Some(reply.len()));

    let mut body = chat("long", "say a lot again");
    body["stream"] = json!(true);
    let streamed = front
        .request(Method::POST, COMPLETIONS, Some(&key))
        .json(&body)
        .send()
        .await
        .expect("answered");
    assert_eq!(streamed.status(), StatusCode::OK);
    let chunks = tokio::time::timeout(WAIT, chunks_to_done(streamed))
        .await
        .expect("the stream ends in time");
    assert_eq!(streamed_text(&chunks).len(), reply.len());
    front.server.shutdown().await;
}
