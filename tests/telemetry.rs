//! Traces across the hops (issue 6): one HTTP request with a `traceparent`
//! yields spans, exported over OTLP to a local receiver, that share its trace
//! id across the HTTP front, the NATS hop (the gateway), the conversation
//! actor and the model call — `switchboard serve` as a process on a real
//! nats-server. Also `--metrics-addr` and `--log-format json`.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::nats::NatsServer;
use support::serve::{Client, ServeProcess};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP receiver (JSON encoding) on a free port: every span it got.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::clone(&spans);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let store = Arc::clone(&store);
            async move {
                let mut spans = store.lock().expect("lock");
                for resource in body["resourceSpans"].as_array().into_iter().flatten() {
                    for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                        for span in scope["spans"].as_array().into_iter().flatten() {
                            let mut span = span.clone();
                            span["resource"] = resource["resource"].clone();
                            spans.push(span);
                        }
                    }
                }
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

/// A span's attributes as `key → JSON value` (OTLP JSON: `{"key","value":{"stringValue"|"intValue"…}}`).
fn attributes(span: &Value) -> HashMap<String, Value> {
    span["attributes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|attribute| {
            let value = attribute["value"].as_object()?.values().next()?.clone();
            Some((attribute["key"].as_str()?.to_owned(), value))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http_request_is_one_trace_across_the_front_nats_the_actor_and_the_model_call() {
    let nats = NatsServer::start();
    let (otlp, spans) = otlp_receiver().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut serve = ServeProcess::start_with_env(
        &data,
        &nats.url(),
        &[
            "--otlp-endpoint",
            &otlp,
            "--metrics-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
    );
    assert_eq!(serve.ready["otlp"], json!(true), "{}", serve.ready);
    let http = serve.ready["http"]
        .as_str()
        .expect("the HTTP address")
        .to_owned();
    let metrics = serve.ready["metrics"]
        .as_str()
        .expect("the metrics address")
        .to_owned();

    let client = Client::connect(&nats.url()).await;
    let (key_id, key) = client.issue_key(json!({ "name": "traced" })).await;
    let mut done = client
        .bus
        .subscribe("sb.evt.conv.traced.reply_completed")
        .await
        .expect("subscribes");
    client.bus.flush().await.expect("flushes");
    let web = reqwest::Client::new();
    let answer = web
        .post(format!("http://{http}/v1/conversations/traced/messages"))
        .bearer_auth(&key)
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .json(&json!({ "content": "follow me", "message_id": "m1" }))
        .send()
        .await
        .expect("answers");
    assert_eq!(answer.status(), reqwest::StatusCode::ACCEPTED);
    tokio::time::timeout(Duration::from_secs(20), futures::StreamExt::next(&mut done))
        .await
        .expect("the reply is stored")
        .expect("the subscription is open");

    // The separate metrics listener answers.
    let scraped = web
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("text");
    assert!(scraped.contains("switchboard_requests_total"), "{scraped}");

    // A clean stop flushes the exporter.
    serve.terminate_cleanly();
    let deadline = Instant::now() + Duration::from_secs(20);
    let names = |spans: &[Value]| -> Vec<String> {
        spans
            .iter()
            .filter(|span| span["traceId"] == json!(TRACE_ID))
            .filter_map(|span| span["name"].as_str().map(str::to_owned))
            .collect()
    };
    let wanted = [
        "POST /v1/conversations/{id}/messages",
        "send process",
        "conversation.send",
        "chat echo",
    ];
    loop {
        let got = names(&spans.lock().expect("lock"));
        if wanted.iter().all(|name| got.iter().any(|g| g == name)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans of the trace: {got:?}; all spans: {:#?}",
            spans.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spans = spans.lock().expect("lock").clone();
    let span = |name: &str| {
        spans
            .iter()
            .find(|s| s["traceId"] == json!(TRACE_ID) && s["name"] == json!(name))
            .expect("found above")
    };
    // The HTTP span continues the caller's span; the gateway's continues the
    // HTTP span over NATS; the actor's and the model call's continue the gateway's.
    let front = span("POST /v1/conversations/{id}/messages");
    assert_eq!(front["parentSpanId"], json!(PARENT_ID));
    let gateway = span("send process");
    assert_eq!(gateway["parentSpanId"], front["spanId"]);
    assert_eq!(span("conversation.send")["parentSpanId"], gateway["spanId"]);
    let chat = span("chat echo");
    assert_eq!(chat["parentSpanId"], gateway["spanId"]);

    // The domain ids, never the key; the GenAI attributes on the model call.
    let actor = attributes(span("conversation.send"));
    assert_eq!(actor["conversation_id"], json!("traced"));
    assert_eq!(actor["message_id"], json!("m1"));
    assert_eq!(actor["key_id"], json!(key_id));
    let model = attributes(chat);
    assert_eq!(model["gen_ai.operation.name"], json!("chat"));
    assert_eq!(model["gen_ai.request.model"], json!("echo"));
    assert_eq!(model["gen_ai.provider.name"], json!("echo"));
    for tokens in ["gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"] {
        let count: u64 = match &model[tokens] {
            Value::String(text) => text.parse().expect("an integer"),
            other => other.as_u64().expect("an integer"),
        };
        assert!(count > 0, "{tokens}: {count}");
    }
    let service = front["resource"]["attributes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["key"] == json!("service.name"))
        .map(|a| a["value"]["stringValue"].clone());
    assert_eq!(service, Some(json!("switchboard")));
    let everything = serde_json::to_string(&spans).expect("JSON");
    assert!(!everything.contains(&key), "the key itself was exported");

    // Logs were JSON lines.
    let stderr = serve.stderr();
    let line = stderr
        .lines()
        .find(|line| line.contains("shutting down"))
        .unwrap_or_else(|| panic!("no shutdown line in {stderr}"));
    let parsed: Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(parsed["level"], json!("INFO"), "{parsed}");
}
