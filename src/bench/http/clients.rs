//! The closed-loop HTTP clients of `bench http`: `connections` tasks, each
//! with a client of its own holding one keep-alive connection, each sending
//! its next request when the last is answered — as `bench nats`' clients do
//! over NATS, with the same message text and the same spread over
//! conversations.

use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION};
use reqwest::StatusCode;
use serde_json::json;
use tokio::task::JoinSet;

use crate::bench::nats::load::{empty_page, Driven, HISTORY_PAGE};
use crate::bench::workload;

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A user message of typical length (`bench nats` sends the same).
pub const CONTENT: &str = "Could you summarise the attached contract and tell me which clauses \
    differ from our standard one?";

/// An HTTP client that keeps `connections` connections to a host alive and
/// never goes through a proxy from the environment.
pub fn client(connections: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("cannot build an HTTP client")
}

/// Issues a chat key without limits over `POST /admin/keys`.
pub async fn issue_key(base: &str, admin_key: &str) -> anyhow::Result<String> {
    let response = client(1)?
        .post(format!("{base}/admin/keys"))
        .bearer_auth(admin_key)
        .json(&json!({ "name": "bench" }))
        .send()
        .await
        .context("issuing the bench's key")?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .context("the key issue answer is not JSON")?;
    anyhow::ensure!(
        status == StatusCode::CREATED,
        "the key was not issued ({status}): {body}"
    );
    body["key"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("the key was not issued: {body}"))
}

/// `POST /v1/conversations/{id}/messages` for `window`, to `conversations`
/// conversations from index `conversations` on (those below are the NATS
/// baseline's); ok is a 202.
pub async fn sends(
    base: &str,
    key: &str,
    connections: usize,
    conversations: usize,
    window: Duration,
) -> anyhow::Result<Driven> {
    let headers = keyed(key, None)?;
    let base = base.to_owned();
    let (driven, _) = closed_loop(connections, window, move |http, client, slot, sent| {
        let id = workload::conversation_id((conversations + slot % conversations) as u64);
        let request = http
            .post(format!("{base}/v1/conversations/{id}/messages"))
            .headers(headers.clone())
            .json(&json!({ "content": CONTENT, "message_id": format!("http-{client}-{sent}") }));
        async move {
            answered(request, StatusCode::ACCEPTED).await?;
            Ok(None)
        }
    })
    .await?;
    Ok(driven)
}

/// `GET /v1/conversations/{id}?latest=true&limit=`[`HISTORY_PAGE`] for
/// `window`, a chat view's first page, from the conversations the NATS
/// baseline sent to (as its history reads are); ok is a 200 with messages.
pub async fn history_reads(
    base: &str,
    key: &str,
    connections: usize,
    conversations: usize,
    window: Duration,
) -> anyhow::Result<Driven> {
    let headers = keyed(key, None)?;
    let base = base.to_owned();
    let (driven, _) = closed_loop(connections, window, move |http, _, slot, _| {
        let id = workload::conversation_id((slot % conversations) as u64);
        let request = http
            .get(format!(
                "{base}/v1/conversations/{id}?latest=true&limit={HISTORY_PAGE}"
            ))
            .headers(headers.clone());
        async move {
            let body = answered(request, StatusCode::OK).await?;
            match empty_page(&body) {
                Some(why) => Err(cut(&why)),
                None => Ok(None),
            }
        }
    })
    .await?;
    Ok(driven)
}

/// Streamed `POST /v1/chat/completions` to the echo agent for `window`, in
/// conversations of their own (`X-Conversation-Id`); ok is a stream that
/// ends `data: [DONE]` with no error chunk. Also returns the time to each
/// ok stream's first `data:` chunk, in nanoseconds.
pub async fn streams(
    base: &str,
    key: &str,
    connections: usize,
    conversations: usize,
    window: Duration,
) -> anyhow::Result<(Driven, Vec<u64>)> {
    let headers = keyed(key, Some("text/event-stream"))?;
    let url = format!("{base}/v1/chat/completions");
    let body = serde_json::to_vec(&json!({
        "model": "echo",
        "stream": true,
        "messages": [{ "role": "user", "content": CONTENT }],
    }))?;
    closed_loop(connections, window, move |http, _, slot, _| {
        let request = http
            .post(&url)
            .headers(headers.clone())
            .header(
                "x-conversation-id",
                format!("stream-{}", slot % conversations),
            )
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        async move {
            let asked = Instant::now();
            let mut response = request.send().await.map_err(|e| e.to_string())?;
            let status = response.status();
            let mut first_chunk = None;
            let mut text = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
                text.extend_from_slice(&chunk);
                if first_chunk.is_none() && contains(&text, b"data:") {
                    first_chunk = Some(asked.elapsed());
                }
            }
            let text = String::from_utf8_lossy(&text);
            if status != StatusCode::OK {
                return Err(format!("{status}: {}", cut(&text)));
            }
            if text.contains("{\"error\"") || !text.trim_end().ends_with("data: [DONE]") {
                return Err(format!("a stream that did not end well: {}", cut(&text)));
            }
            Ok(first_chunk)
        }
    })
    .await
}

/// `Authorization` for `key`, and `Accept` when given.
/// Sends `request`; its body when it is answered `expected`, otherwise the
/// status and (the start of) the body.
async fn answered(
    request: reqwest::RequestBuilder,
    expected: StatusCode,
) -> Result<bytes::Bytes, String> {
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    if status != expected {
        return Err(format!(
            "{status}: {}",
            cut(&String::from_utf8_lossy(&body))
        ));
    }
    Ok(body)
}

fn keyed(key: &str, accept: Option<&'static str>) -> anyhow::Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {key}")).context("the key is not a header")?,
    );
    if let Some(accept) = accept {
        headers.insert(ACCEPT, HeaderValue::from_static(accept));
    }
    Ok(headers)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// `connections` tasks, each with its own client (one connection), calling
/// `one(client, index, slot, sent)` until `window` has passed; slots are
/// `index`, `index + connections`, … as in `bench nats`. `one` answers the
/// time to a first chunk, if it has one; the whole call is timed here.
async fn closed_loop<F, Fut>(
    connections: usize,
    window: Duration,
    one: F,
) -> anyhow::Result<(Driven, Vec<u64>)>
where
    F: Fn(reqwest::Client, usize, usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Option<Duration>, String>> + Send + 'static,
{
    let started = Instant::now();
    let deadline = started + window;
    let mut tasks = JoinSet::new();
    for index in 0..connections {
        let (http, one) = (client(1)?, one.clone());
        tasks.spawn(async move {
            let mut driven = empty();
            let mut first_chunks = Vec::new();
            let (mut slot, mut sent) = (index, 0u64);
            while Instant::now() < deadline {
                sent += 1;
                let asked = Instant::now();
                let answered = one(http.clone(), index, slot, sent).await;
                let took = asked.elapsed();
                slot += connections;
                match answered {
                    Ok(first_chunk) => {
                        driven.ok += 1;
                        driven.latencies.push(took.as_nanos() as u64);
                        first_chunks.extend(first_chunk.map(|d| d.as_nanos() as u64));
                    }
                    Err(why) => {
                        driven.failed += 1;
                        driven.first_failure.get_or_insert(why);
                    }
                }
            }
            (driven, first_chunks)
        });
    }
    let mut total = empty();
    let mut first_chunks = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (driven, firsts) = joined.context("an HTTP client panicked")?;
        total.ok += driven.ok;
        total.failed += driven.failed;
        total.first_failure = total.first_failure.or(driven.first_failure);
        total.latencies.extend(driven.latencies);
        first_chunks.extend(firsts);
    }
    total.seconds = started.elapsed().as_secs_f64();
    Ok((total, first_chunks))
}

fn empty() -> Driven {
    Driven {
        ok: 0,
        failed: 0,
        first_failure: None,
        seconds: 0.0,
        latencies: Vec::new(),
    }
}

/// At most 300 characters of `text`, for a failure's message.
pub fn cut(text: &str) -> String {
    match text.char_indices().nth(300) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}
