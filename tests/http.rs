//! The HTTP front (DESIGN §7) over a real socket: every route's success and
//! errors, the headers, streamed replies and resumable event streams, and
//! malformed input that changes nothing.

mod support;

use support::front::{Front, ADMIN_KEY, WAIT};
use support::sse::{self, read_until};

use std::time::Duration;

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchboard_events::log::DB_DIR;

impl Front {
    async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut request = self.client.request(method, self.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("the request is answered")
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let response = self.call(method, path, key, body).await;
        let status = response.status();
        (status, response.json().await.expect("JSON body"))
    }

    async fn issue(&self, body: Value) -> (String, String) {
        let (status, issued) = self
            .json(Method::POST, "/admin/keys", Some(ADMIN_KEY), Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{issued}");
        (
            issued["key_id"].as_str().expect("key_id").to_owned(),
            issued["key"].as_str().expect("key").to_owned(),
        )
    }

    /// Polls the history until it holds `n` messages.
    async fn history_of(&self, key: &str, id: &str, n: usize) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, history) = self
                .json(
                    Method::GET,
                    &format!("/v1/conversations/{id}"),
                    Some(key),
                    None,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{history}");
            if history["messages"].as_array().map_or(0, Vec::len) == n {
                return history;
            }
            assert!(tokio::time::Instant::now() < deadline, "{history}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[track_caller]
fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], json!(code), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Reads an SSE body into its events until it ends.
async fn sse_events(response: reqwest::Response) -> Vec<sse::SseEvent> {
    let mut text = String::new();
    read_until(&mut response.bytes_stream(), &mut text, |_| false).await;
    sse::parse(&text)
}

#[tokio::test]
async fn a_message_is_accepted_and_its_history_read_with_rate_limit_headers() {
    let front = Front::start().await;
    let (_, key) = front
        .issue(json!({ "name": "ana", "limits": { "rpm": 10, "tpm": 100000 } }))
        .await;
    let response = front
        .call(
            Method::POST,
            "/v1/conversations/c1/messages",
            Some(&key),
            Some(json!({ "content": "hello", "message_id": "m1" })),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let headers = response.headers().clone();
    assert_eq!(headers["ratelimit-limit"], "10");
    assert_eq!(headers["ratelimit-remaining"], "9");
    assert!(headers.contains_key("ratelimit-reset"));
    assert_eq!(headers["x-ratelimit-limit-requests"], "10");
    assert_eq!(headers["x-ratelimit-limit-tokens"], "100000");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(headers["content-security-policy"]
        .to_str()
        .expect("ascii")
        .contains("default-src 'none'"));
    assert!(
        !headers.contains_key("access-control-allow-origin"),
        "CORS is off"
    );
    let ack: Value = response.json().await.expect("JSON");
    assert_eq!(ack["ok"], json!(true));
    assert_eq!(ack["message_id"], json!("m1"));

    let history = front.history_of(&key, "c1", 2).await;
    assert_eq!(history["messages"][1]["content"], json!("echo: hello"));
    let (status, listed) = front
        .json(Method::GET, "/v1/conversations", Some(&key), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["conversations"][0]["conversation_id"], json!("c1"));
    let (status, usage) = front.json(Method::GET, "/v1/usage", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["spent"]["requests"], json!(1));
    front.server.shutdown().await;
}

#[tokio::test]
async fn a_streamed_send_relays_the_deltas_and_ends_with_the_reply() {
    let front = Front::start().await;
    let (_, key) = front.issue(json!({ "name": "ana" })).await;
    let response = front
        .client
        .post(front.url("/v1/conversations/s1/messages"))
        .bearer_auth(&key)
        .header("Accept", "text/event-stream")
        .json(&json!({ "content": "one two three", "message_id": "m1" }))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/event-stream"));
    let events = sse_events(response).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"ack"));
    assert_eq!(kinds.last(), Some(&"reply_completed"), "{kinds:?}");
    let text: String = events
        .iter()
        .filter(|(k, _, _)| k == "reply_delta")
        .map(|(_, d, _)| d["delta"].as_str().expect("delta").to_owned())
        .collect();
    assert_eq!(text, "echo: one two three");
    let (_, end, id) = events.last().expect("an end");
    assert_eq!(end["data"]["content"], json!("echo: one two three"));
    assert_eq!(
        id.as_deref(),
        end["seq"].as_u64().map(|s| s.to_string()).as_deref()
    );

    // A resend streams the stored end at once.
    let again = front
        .client
        .post(front.url("/v1/conversations/s1/messages"))
        .bearer_auth(&key)
        .header("Accept", "text/event-stream")
        .json(&json!({ "content": "one two three", "message_id": "m1" }))
        .send()
        .await
        .expect("answered");
    let events = sse_events(again).await;
    assert_eq!(events[0].1["duplicate"], json!(true));
    assert_eq!(events.last().expect("end").0, "reply_completed");

    // So does the resend of a message big enough that its stored end is on
    // the log's next page (a page holds about 256 KiB).
    let big = "word ".repeat(40_000);
    let send_big = || {
        front
            .client
            .post(front.url("/v1/conversations/s2/messages"))
            .bearer_auth(&key)
            .header("Accept", "text/event-stream")
            .json(&json!({ "content": big, "message_id": "big" }))
            .send()
    };
    let first = sse_events(send_big().await.expect("answered")).await;
    assert_eq!(first.last().expect("an end").0, "reply_completed");
    let events = sse_events(send_big().await.expect("answered")).await;
    assert_eq!(events[0].1["duplicate"], json!(true));
    let (kind, end, _) = events.last().expect("an end");
    assert_eq!(kind, "reply_completed");
    assert_eq!(end["data"]["message_id"], json!("big"));
    front.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_resumes_after_last_event_id() {
    let front = Front::start().await;
    let (_, key) = front.issue(json!({ "name": "ana" })).await;
    front
        .call(
            Method::POST,
            "/v1/conversations/r1/messages",
            Some(&key),
            Some(json!({ "content": "first" })),
        )
        .await;
    front.history_of(&key, "r1", 2).await;

    let response = front
        .client
        .get(front.url("/v1/conversations/r1/events"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.contains("usage_recorded") {
        assert!(tokio::time::Instant::now() < deadline, "only got {seen}");
        let chunk = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("moves")
            .expect("open");
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
    }
    let ids: Vec<u64> = seen
        .lines()
        .filter_map(|l| l.strip_prefix("id:"))
        .map(|v| v.trim().parse().expect("a seq"))
        .collect();
    assert_eq!(ids.len(), 5, "{seen}");
    let resume_after = ids[2];

    // Live: a second message shows up on the open stream.
    front
        .call(
            Method::POST,
            "/v1/conversations/r1/messages",
            Some(&key),
            Some(json!({ "content": "second" })),
        )
        .await;
    while !seen.contains("echo: second") {
        assert!(
            tokio::time::Instant::now() < deadline + WAIT,
            "only got {seen}"
        );
        let chunk = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("moves")
            .expect("open");
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
    }
    drop(stream);

    let resumed = front
        .client
        .get(front.url("/v1/conversations/r1/events"))
        .bearer_auth(&key)
        .header("Last-Event-ID", resume_after.to_string())
        .send()
        .await
        .expect("answered");
    let mut stream = resumed.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    // After agent_routed of the first exchange: its reply and usage, then the
    // second exchange's four events.
    while text.lines().filter(|l| l.starts_with("id:")).count() < 6 {
        assert!(tokio::time::Instant::now() < deadline, "only got {text}");
        let chunk = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("moves")
            .expect("open");
        text.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
    }
    let ids: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id:"))
        .map(|v| v.trim().parse().expect("a seq"))
        .collect();
    assert!(ids.iter().all(|id| *id > resume_after), "{ids:?}");
    assert_eq!(ids.first(), Some(&(resume_after + 1)), "{text}");
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "no duplicates, in order: {ids:?}"
    );

    let (status, body) = {
        let response = front
            .client
            .get(front.url("/v1/conversations/r1/events"))
            .bearer_auth(&key)
            .header("Last-Event-ID", "yesterday")
            .send()
            .await
            .expect("answered");
        (
            response.status(),
            response.json::<Value>().await.expect("JSON"),
        )
    };
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
    );
    front.server.shutdown().await;
}

/// Reads an open SSE body until `done` holds for the text so far, or until it
/// ends; the text read.
async fn read_sse_until(response: reqwest::Response, done: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    read_until(&mut response.bytes_stream(), &mut text, done).await;
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_shows_a_message_before_its_replys_deltas_and_them_before_its_end() {
    events_in_order(Front::start().await).await;
}

/// As above, with the core on NATS: the front's streams follow the
/// in-process bus, fed by the front's feed and the gateway's deltas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_a_core_on_nats_an_event_stream_shows_every_delta_between_its_message_and_its_end() {
    let nats = support::nats::NatsServer::start();
    let url = nats.url();
    events_in_order(Front::start_with(move |config| config.nats_url = Some(url)).await).await;
}

async fn events_in_order(front: Front) {
    let (_, key) = front.issue(json!({ "name": "ana" })).await;
    front
        .call(
            Method::POST,
            "/v1/conversations/o1/messages",
            Some(&key),
            Some(json!({ "content": "first", "message_id": "m0" })),
        )
        .await;
    front.history_of(&key, "o1", 2).await;
    let following = front
        .request(Method::GET, "/v1/conversations/o1/events", Some(&key))
        .send()
        .await
        .expect("answered");
    assert_eq!(following.status(), StatusCode::OK);
    let mut stream = following.bytes_stream();
    let mut text = String::new();
    // Streamed sends start their turn before their message is durable;
    // plain ones start it once it is, and the stream hears of the message
    // from the log's follower while the turn streams.
    // Eight at a time, so turns and the log's followers race.
    const SENDS: usize = 64;
    let send = |n: usize| {
        let request = front
            .client
            .post(front.url("/v1/conversations/o1/messages"))
            .bearer_auth(&key)
            .json(&json!({ "content": format!("message {n}"), "message_id": format!("m{n}") }));
        let request = match n % 2 {
            0 => request.header("Accept", "text/event-stream"),
            _ => request,
        };
        async move {
            let response = request.send().await.expect("answered");
            assert!(response.status().is_success(), "{}", response.status());
            let _ = response.bytes().await;
        }
    };
    for first in (1..=SENDS).step_by(8) {
        futures::future::join_all((first..first + 8).map(send)).await;
    }
    read_until(&mut stream, &mut text, |text| {
        text.matches("event: reply_completed").count() > SENDS
    })
    .await;
    drop(stream);
    let mut received = std::collections::HashSet::new();
    let mut ended = std::collections::HashSet::new();
    let mut deltas = std::collections::HashMap::<String, String>::new();
    for (kind, data, _) in sse::parse(&text) {
        let message_id = match kind.as_str() {
            "reply_delta" => data["message_id"].as_str(),
            _ => data["data"]["message_id"].as_str(),
        }
        .unwrap_or_default()
        .to_owned();
        match kind.as_str() {
            "message_received" => {
                received.insert(message_id);
            }
            "reply_delta" => {
                assert!(
                    received.contains(&message_id),
                    "a delta of {message_id} before its message: {text}"
                );
                assert!(
                    !ended.contains(&message_id),
                    "a delta of {message_id} after its end: {text}"
                );
                let delta = data["delta"].as_str().expect("a delta");
                deltas.entry(message_id).or_default().push_str(delta);
            }
            "reply_completed" => {
                assert!(received.contains(&message_id), "{text}");
                ended.insert(message_id);
            }
            _ => {}
        }
    }
    for n in 1..=SENDS {
        assert_eq!(
            deltas.get(&format!("m{n}")).map(String::as_str),
            Some(format!("echo: message {n}").as_str()),
            "every delta of m{n}, in order: {text}"
        );
    }
    front.server.shutdown().await;
}

#[tokio::test]
async fn an_event_stream_shows_nothing_of_a_conversation_another_key_starts() {
    let front = Front::start().await;
    let (_, watcher) = front.issue(json!({ "name": "watcher" })).await;
    let (_, owner) = front.issue(json!({ "name": "owner" })).await;
    // Opened before anybody started the conversation: allowed, and empty.
    let watching = front
        .request(Method::GET, "/v1/conversations/s42/events", Some(&watcher))
        .send()
        .await
        .expect("answered");
    assert_eq!(watching.status(), StatusCode::OK);

    let response = front
        .call(
            Method::POST,
            "/v1/conversations/s42/messages",
            Some(&owner),
            Some(json!({ "content": "the secret of the owner" })),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    front.history_of(&owner, "s42", 2).await;

    // The watcher's stream ends with `forbidden` at the first sign of the
    // conversation, and shows none of it.
    let text = read_sse_until(watching, |_| false).await;
    assert!(text.contains("event: error"), "{text}");
    assert!(text.contains("\"code\":\"forbidden\""), "{text}");
    assert!(!text.contains("secret"), "{text}");
    assert!(!text.contains("id:"), "no stored event was sent: {text}");
    front.server.shutdown().await;
}

#[tokio::test]
async fn an_erased_conversations_events_hold_no_content_and_a_revoked_key_stops_following() {
    let front = Front::start().await;
    let (key_id, key) = front.issue(json!({ "name": "ana" })).await;
    let send = |content: &'static str| {
        front.call(
            Method::POST,
            "/v1/conversations/e1/messages",
            Some(&key),
            Some(json!({ "content": content })),
        )
    };
    send("the old secret").await;
    front.history_of(&key, "e1", 2).await;
    let erase = || {
        front.call(
            Method::DELETE,
            "/admin/conversations/e1",
            Some(ADMIN_KEY),
            None,
        )
    };
    assert_eq!(erase().await.status(), StatusCode::OK);
    send("after the erasure").await;
    front.history_of(&key, "e1", 2).await;

    let events = front
        .request(Method::GET, "/v1/conversations/e1/events", Some(&key))
        .send()
        .await
        .expect("answered");
    assert_eq!(events.status(), StatusCode::OK);
    let mut stream = Box::pin(events.bytes_stream());
    let mut text = String::new();
    read_until(&mut stream, &mut text, |t| {
        t.contains("echo: after the erasure")
    })
    .await;
    assert!(
        text.contains("echo: after the erasure"),
        "the stream ended: {text}"
    );
    assert!(!text.contains("secret"), "{text}");
    let before_erasure = text
        .split("event: conversation_erased")
        .next()
        .expect("a part");
    assert_eq!(
        before_erasure.matches("\"content\":\"\"").count(),
        2,
        "{text}"
    );

    // Revoked, the key sees no more: the stream ends at the next stored event.
    let revoked = front
        .call(
            Method::DELETE,
            &format!("/admin/keys/{key_id}"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(revoked.status(), StatusCode::OK);
    assert_eq!(erase().await.status(), StatusCode::OK);
    let mut rest = String::new();
    read_until(&mut stream, &mut rest, |_| false).await;
    assert!(rest.contains("event: error"), "{rest}");
    assert!(rest.contains("\"code\":\"unauthorized\""), "{rest}");
    assert!(!rest.contains("conversation_erased"), "{rest}");
    front.server.shutdown().await;
}

#[tokio::test]
async fn a_conversation_larger_than_a_bus_message_streams_and_reads_in_pages() {
    let front = Front::start().await;
    let (_, key) = front.issue(json!({ "name": "ana" })).await;
    // Four turns of 200 KB each way: 1.6 MB of events, over the bus's 1 MiB.
    for turn in 0..4 {
        let content = format!("{turn}{}", "x".repeat(200_000));
        let response = front
            .call(
                Method::POST,
                "/v1/conversations/big/messages",
                Some(&key),
                Some(json!({ "content": content })),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let response = front
        .request(Method::GET, "/v1/conversations/big/events", Some(&key))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
    let text = read_sse_until(response, |text| {
        text.matches("event: usage_recorded").count() == 4
    })
    .await;
    let ids: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id:"))
        .map(|v| v.trim().parse().expect("a seq"))
        .collect();
    assert_eq!(ids.len(), 1 + 4 * 4, "every event once");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    // The history comes in pages under the bus's limit: here one 200 KB
    // message a page, forwards from the start and backwards from the end.
    let history = |query: String| {
        let (front, key) = (&front, key.clone());
        async move {
            let path = format!("/v1/conversations/big{query}");
            front.json(Method::GET, &path, Some(&key), None).await
        }
    };
    let history = &history;
    let page = |query: String| async move {
        let (status, body) = history(query.clone()).await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        let seqs: Vec<u64> = body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["seq"].as_u64().expect("seq"))
            .collect();
        (seqs, body["has_more"] == json!(true))
    };
    let mut forwards = Vec::new();
    let mut query = String::new();
    loop {
        let (seqs, more) = page(query).await;
        assert_eq!(seqs.len(), 1, "one 200 KB message fits a page, two do not");
        forwards.extend(&seqs);
        if !more {
            break;
        }
        query = format!("?after_seq={}", seqs[0]);
    }
    assert_eq!(forwards.len(), 8, "4 messages and 4 replies: {forwards:?}");
    assert!(forwards.windows(2).all(|w| w[0] < w[1]), "{forwards:?}");
    let (last, more) = page("?latest=true&limit=5".into()).await;
    assert_eq!((last.as_slice(), more), (&forwards[7..], true));
    let (before, more) = page(format!("?before_seq={}&limit=5", forwards[1])).await;
    assert_eq!((before.as_slice(), more), (&forwards[..1], false));
    for query in [
        "?limit=ten",
        "?after_seq=-1",
        "?page=2",
        "?after_seq=1&before_seq=9",
        "?latest=yes",
    ] {
        let (status, body) = history(query.to_owned()).await;
        assert_error(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        );
    }
    front.server.shutdown().await;
}

#[tokio::test]
async fn cors_when_configured_allows_the_headers_the_api_reads_and_exposes_those_it_sets() {
    let front = Front::start_with(|config| {
        let mut http = switchboard::http::HttpConfig::new("127.0.0.1:0".parse().expect("addr"));
        http.cors_origins = vec!["https://app.example".to_owned()];
        config.http = Some(http);
    })
    .await;
    let preflight = front
        .client
        .request(Method::OPTIONS, front.url("/v1/chat/completions"))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type,idempotency-key,traceparent,x-conversation-id",
        )
        .send()
        .await
        .expect("answered");
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_lowercase();
    for name in ["idempotency-key", "traceparent", "x-conversation-id"] {
        assert!(allowed.contains(name), "{name} in {allowed}");
    }
    let (_, key) = front
        .issue(json!({ "name": "ana", "limits": { "rpm": 10, "tpm": 1000 } }))
        .await;
    let response = front
        .request(Method::GET, "/v1/usage", Some(&key))
        .header("Origin", "https://app.example")
        .send()
        .await
        .expect("answered");
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .expect("ascii")
        .to_lowercase();
    for name in [
        "ratelimit-remaining",
        "x-ratelimit-remaining-requests",
        "retry-after",
    ] {
        assert!(exposed.contains(name), "{name} in {exposed}");
    }
    front.server.shutdown().await;
}

#[tokio::test]
async fn a_live_fold_that_fails_makes_the_service_unready_and_refuse_keys() {
    let front = Front::start().await;
    let (_, key) = front.issue(json!({ "name": "ana" })).await;
    let send = || {
        front.call(
            Method::POST,
            "/v1/conversations/c1/messages",
            Some(&key),
            Some(json!({ "content": "hi" })),
        )
    };
    assert_eq!(send().await.status(), StatusCode::ACCEPTED);
    front.history_of(&key, "c1", 2).await;
    let (status, _) = front.json(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK);

    // The conversation's summary row, garbled under the running fold: the
    // next message's fold fails.
    let history = front
        .server
        .log()
        .db()
        .open_tree("proj.history")
        .expect("the history tree");
    history.insert(b"cc1", vec![0xff; 10]).expect("garbled");
    assert_eq!(send().await.status(), StatusCode::ACCEPTED);

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = front.json(Method::GET, "/readyz", None, None).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("projections stopped")),
                "{body}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Keys are not checked against a view that no longer changes.
    let (status, body) = front.json(Method::GET, "/v1/usage", Some(&key), None).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    );
    front.server.shutdown().await;
}

/// A write the log could not make (here a message large enough for sled to
/// keep in a blob file of its own, whose directory is gone; in service, a
/// full disk) fails its send with a coded error, acknowledges nothing, and
/// makes the service unready, saying why, so a load balancer stops sending
/// it work; later sends are refused the same way until a restart.
#[tokio::test]
async fn a_failed_event_log_makes_the_service_unready_and_refuses_sends_with_a_code() {
    let front = Front::start().await;
    let (_, key) = front.issue(json!({ "name": "ana" })).await;
    let send = |content: String| {
        front.json(
            Method::POST,
            "/v1/conversations/c1/messages",
            Some(&key),
            Some(json!({ "content": content })),
        )
    };
    let (status, body) = send("hi".into()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    front.history_of(&key, "c1", 2).await;
    let (status, _) = front.json(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK);

    let log = front.server.log();
    std::fs::remove_dir_all(log.dir().join(DB_DIR).join("blobs")).expect("remove the blob dir");
    let head = log.head();
    let (status, body) = send("a long message ".repeat(12_000)).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    );
    assert!(body.get("seq").is_none(), "nothing acknowledged: {body}");

    let (status, ready) = front.json(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert!(
        ready["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("event log refuses appends")),
        "{ready}"
    );
    let (status, body) = send("and a short one".into()).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    );
    assert_eq!(log.head(), head, "nothing was appended after the failure");
    front.server.shutdown().await;
}

#[tokio::test]
async fn admin_routes_issue_list_revoke_report_audit_and_erase() {
    let front = Front::start().await;
    let (key_id, key) = front.issue(json!({ "name": "ana", "owner": "team" })).await;
    front
        .call(
            Method::POST,
            "/v1/conversations/a1/messages",
            Some(&key),
            Some(json!({ "content": "private" })),
        )
        .await;
    front.history_of(&key, "a1", 2).await;

    let (status, listed) = front
        .json(Method::GET, "/admin/keys", Some(ADMIN_KEY), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .any(|k| k["key_id"] == json!(key_id)));
    let (status, denied) = front
        .json(Method::GET, "/admin/keys", Some(&key), None)
        .await;
    assert_error(status, &denied, StatusCode::FORBIDDEN, "forbidden");

    let (status, costs) = front
        .json(Method::GET, "/admin/costs?by=model", Some(ADMIN_KEY), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{costs}");
    assert_eq!(costs["rows"][0]["group"], json!("echo"));
    let (status, bad) = front
        .json(Method::GET, "/admin/costs?by=planet", Some(ADMIN_KEY), None)
        .await;
    assert_error(
        status,
        &bad,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
    );

    let (status, erased) = front
        .json(
            Method::DELETE,
            "/admin/conversations/a1",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{erased}");
    let (status, missing) = front
        .json(
            Method::DELETE,
            "/admin/conversations/nope",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_error(status, &missing, StatusCode::NOT_FOUND, "not_found");
    let history = front.history_of(&key, "a1", 0).await;
    assert_eq!(history["erased"], json!(true));

    let (status, revoked) = front
        .json(
            Method::DELETE,
            &format!("/admin/keys/{key_id}?reason=rotated"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    let (status, body) = front.json(Method::GET, "/v1/usage", Some(&key), None).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");

    let (status, audit) = front
        .json(
            Method::GET,
            "/admin/audit?type=key_revoked",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(audit["events"][0]["data"]["key_id"], json!(key_id));
    assert_eq!(audit["events"][0]["data"]["reason"], json!("rotated"));
    front.server.shutdown().await;
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let front = Front::start().await;
    let (status, health) = front.json(Method::GET, "/healthz", None, None).await;
    assert_eq!(
        (status, health["status"].clone()),
        (StatusCode::OK, json!("ok"))
    );
    let (status, ready) = front.json(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["status"], json!("ready"));
    let metrics = front.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.expect("text");
    assert!(
        text.contains("# TYPE switchboard_log_head_seq gauge"),
        "{text}"
    );
    assert!(text
        .lines()
        .any(|l| l.starts_with("switchboard_log_head_seq ") && !l.ends_with(" 0")));
    front.server.shutdown().await;
}

#[tokio::test]
async fn malformed_input_gets_the_right_status_and_changes_nothing() {
    let front = Front::start().await;
    let (_, key) = front.issue(json!({ "name": "ana" })).await;
    let head = front.server.log().head();
    let huge = "x".repeat(300 * 1024);
    let send = "/v1/conversations/c1/messages";
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            send,
            Some(&key),
            Some(json!({})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            Method::POST,
            send,
            Some(&key),
            Some(json!({ "content": 5 })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            Method::POST,
            send,
            Some(&key),
            Some(json!({ "content": "x", "extra": 1 })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            Method::POST,
            send,
            Some(&key),
            Some(json!({ "content": "  " })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            Method::POST,
            send,
            Some(&key),
            Some(json!({ "content": huge })),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            Method::POST,
            "/v1/conversations/bad.id/messages",
            Some(&key),
            Some(json!({ "content": "x" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/conversations/bad.id",
            Some(&key),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        // Not UTF-8 once decoded: the JSON error, not axum's plain text.
        (
            Method::GET,
            "/v1/conversations/%FF",
            Some(&key),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            Method::DELETE,
            "/admin/keys/%FF%FE",
            Some(ADMIN_KEY),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            Method::DELETE,
            "/admin/keys/key_nobody",
            Some(ADMIN_KEY),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            send,
            None,
            Some(json!({ "content": "x" })),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Method::POST,
            send,
            Some("sb-garbage-key-000000"),
            Some(json!({ "content": "x" })),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Method::POST,
            send,
            Some(&key),
            Some(json!({ "content": "x", "agent": "nobody" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/nothing-here",
            Some(&key),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::PUT,
            "/v1/usage",
            Some(&key),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::POST,
            "/admin/keys",
            Some(ADMIN_KEY),
            Some(json!({ "name": 7 })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            Method::POST,
            "/admin/keys",
            Some(ADMIN_KEY),
            Some(json!([1])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
    ];
    for (method, path, key, body, status, code) in cases {
        let (got, reply) = front.json(method.clone(), path, key, body).await;
        assert_error(got, &reply, status, code);
        assert!(
            !reply.to_string().contains(&key_text(key)),
            "{method} {path}: the key is echoed"
        );
    }
    // Syntax errors and a missing content type.
    let raw = front
        .client
        .post(front.url(send))
        .bearer_auth(&key)
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("answered");
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    let plain = front
        .client
        .post(front.url(send))
        .bearer_auth(&key)
        .body("hi")
        .send()
        .await
        .expect("answered");
    assert_eq!(plain.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Only audit events were appended (the refused keys), and it still serves.
    let appended: Vec<String> = front
        .server
        .log()
        .read_from(head + 1)
        .map(|e| e.expect("decodes").event.type_name().to_owned())
        .collect();
    assert!(appended.iter().all(|t| t == "auth_failed"), "{appended:?}");
    assert_eq!(appended.len(), 2);
    // Recorded as HTTP failures, from the client's address.
    for envelope in front.server.log().read_from(head + 1) {
        let switchboard_events::Event::AuthFailed(failed) = envelope.expect("decodes").event else {
            unreachable!("only auth_failed");
        };
        assert_eq!(
            failed.channel,
            switchboard_events::catalog::AuthChannel::Http
        );
        let remote = failed.remote.expect("the client's address");
        assert!(remote.starts_with("127.0.0.1:"), "{remote}");
    }
    let (status, _) = front.json(Method::GET, "/v1/usage", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK);
    front.server.shutdown().await;
}

/// A request and the error it must get: method, path, key, body, status, code.
type Case<'a> = (
    Method,
    &'a str,
    Option<&'a str>,
    Option<Value>,
    StatusCode,
    &'a str,
);

fn key_text(key: Option<&str>) -> String {
    key.map_or_else(|| "\u{0}".to_owned(), str::to_owned)
}
