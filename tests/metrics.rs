//! `/metrics` after a small load (issue 6): every metric the dashboard and
//! alert rules use is exported, with the values this load must give. One
//! test in its own binary, so nothing else adds to the process's counters.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchboard::server::{AgentSpec, ProviderSpec};
use switchboard_actors::agent::{AgentConfig, Price};
use switchboard_events::log::DB_DIR;

use support::front::{samples, Front, ADMIN_KEY, WAIT};

async fn scrape(front: &Front) -> HashMap<String, f64> {
    samples(&front.metrics_text().await)
}

async fn post(front: &Front, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
    let answer = front
        .request(Method::POST, path, Some(key))
        .json(&body)
        .send()
        .await
        .expect("answers");
    let status = answer.status();
    (status, answer.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_small_load_have_the_values_of_that_load() {
    // A model server that refuses connections: a port just freed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let front = Front::start_with(|config| {
        config.conversations.max_live = 1;
        // An alert webhook nobody answers: its alerts wait, and it says so.
        config.webhooks.urls = vec![format!("http://127.0.0.1:{port}/hook")];
        config.agents[0].config.prices = Price::new(1_000_000, 2_000_000);
        config.agents.push(AgentSpec {
            config: AgentConfig {
                max_retries: 0,
                circuit_failure_threshold: 1,
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
    let (status, issued) = post(
        &front,
        "/admin/keys",
        ADMIN_KEY,
        json!({
            "name": "load",
            "limits": { "rpm": 3 },
            "budget": { "micros": 1_000_000, "period": "month" },
        }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    let key = issued["key"].as_str().expect("key").to_owned();
    let key_id = issued["key_id"].as_str().expect("key_id").to_owned();

    // Two echo turns in two conversations (max_live 1: one passivation),
    // one turn on the broken agent, then a refusal by the rpm limit.
    for (conversation, agent) in [("conv-1", "echo"), ("conv-2", "echo"), ("conv-3", "down")] {
        let (status, ack) = post(
            &front,
            &format!("/v1/conversations/{conversation}/messages"),
            &key,
            json!({ "content": "count these words", "agent": agent }),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{ack}");
    }
    let (status, refused) = post(
        &front,
        "/v1/conversations/conv-4/messages",
        &key,
        json!({ "content": "one too many" }),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{refused}");

    // The gauges are sampled every second: wait until they show this load.
    let head = |front: &Front| front.server.log().head() as f64;
    let deadline = Instant::now() + WAIT;
    let metrics = loop {
        let metrics = scrape(&front).await;
        let settled = metrics.get("switchboard_turns_in_flight") == Some(&0.0)
            && metrics.get("switchboard_log_head_seq") == Some(&head(&front))
            && metrics.get("switchboard_outbox_lag_events") == Some(&0.0)
            && metrics.iter().any(|(series, value)| {
                series.starts_with("switchboard_webhook_failures_total") && *value >= 2.0
            })
            && metrics.get("switchboard_agent_latency_seconds_count{agent=\"echo\"}") == Some(&2.0);
        if settled {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "the metrics never settled: {metrics:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let value = |series: &str| -> f64 {
        *metrics
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in {metrics:#?}"))
    };

    // Requests and acknowledgments.
    assert_eq!(
        value("switchboard_requests_total{operation=\"send\",outcome=\"ok\"}"),
        3.0
    );
    assert_eq!(
        value("switchboard_requests_total{operation=\"send\",outcome=\"rate_limited\"}"),
        1.0
    );
    assert_eq!(value("switchboard_ack_latency_seconds_count"), 3.0);
    let ack_sum = value("switchboard_ack_latency_seconds_sum");
    assert!(ack_sum > 0.0 && ack_sum < 60.0, "{ack_sum}");
    assert_eq!(
        value("switchboard_ack_latency_seconds_bucket{le=\"+Inf\"}"),
        3.0
    );
    // The log: every append went through a group commit, and it is flushed
    // (one flush may make several groups durable).
    let batches = value("switchboard_log_batch_size_count");
    let appends = value("switchboard_log_batch_size_sum");
    assert!(
        batches >= 1.0 && appends >= batches,
        "{batches} batches, {appends} appends"
    );
    let flushes = value("switchboard_log_flush_seconds_count");
    assert!(
        flushes >= 1.0 && flushes <= batches,
        "{flushes} flushes of {batches} batches"
    );
    // Views and outbox caught up.
    for projection in ["history", "audit", "costs", "keys"] {
        let lag = format!("switchboard_projection_lag_events{{projection=\"{projection}\"}}");
        assert!(value(&lag) <= 1.0, "{lag}: {}", value(&lag));
    }
    assert!(value("switchboard_projections_seq") >= 1.0);
    // Actors.
    assert_eq!(value("switchboard_live_actors{kind=\"agent\"}"), 2.0);
    assert_eq!(value("switchboard_live_actors{kind=\"rate_limiter\"}"), 1.0);
    assert!(value("switchboard_live_actors{kind=\"conversation\"}") <= 2.0);
    assert!(value("switchboard_passivations_total{reason=\"capacity\"}") >= 1.0);
    // Each turn found its context in the fold its conversation's actor keeps:
    // no read of the log.
    assert_eq!(
        value("switchboard_turn_context_reads_total{from=\"cache\"}"),
        3.0
    );
    assert!(
        !metrics.contains_key("switchboard_turn_context_reads_total{from=\"log_whole\"}"),
        "{metrics:#?}"
    );
    assert_eq!(
        value(&format!(
            "switchboard_rate_limit_refusals_total{{key_id=\"{key_id}\",limit=\"rpm\"}}"
        )),
        1.0
    );
    // Agents: two echo turns, one refused connection that opened the circuit.
    assert_eq!(
        value("switchboard_agent_ttft_seconds_count{agent=\"echo\"}"),
        2.0
    );
    assert_eq!(
        value("switchboard_upstream_errors_total{agent=\"down\",status=\"connect\"}"),
        1.0
    );
    assert_eq!(value("switchboard_circuit_state{agent=\"echo\"}"), 0.0);
    assert_eq!(value("switchboard_circuit_state{agent=\"down\"}"), 2.0);
    // Money: the echo turns' tokens and cost, and the key's budget.
    let input = value("switchboard_tokens_total{model=\"echo\",direction=\"input\"}");
    let output = value("switchboard_tokens_total{model=\"echo\",direction=\"output\"}");
    assert!(input > 0.0 && output > 0.0);
    let cost = value("switchboard_cost_micros_total{model=\"echo\"}");
    // $1 and $2 per million tokens: a micro-dollar per input token, two per output token.
    assert_eq!(cost, input + 2.0 * output);
    let subject = format!("{{scope=\"key\",subject=\"{key_id}\"}}");
    assert_eq!(
        value(&format!("switchboard_budget_micros{subject}")),
        1_000_000.0
    );
    assert_eq!(
        value(&format!("switchboard_budget_remaining_micros{subject}")),
        1_000_000.0 - cost
    );
    // The webhook: stuck at the first alert (the rate limit), named by
    // scheme, host and a hash, never by the URL.
    let webhook = |name: &str| {
        let series: Vec<(&String, &f64)> = metrics
            .iter()
            .filter(|(series, _)| series.starts_with(name))
            .collect();
        assert_eq!(series.len(), 1, "{name}: {series:?}");
        let (series, value) = series[0];
        assert!(
            series.contains(&format!("webhook=\"http://127.0.0.1:{port} #")),
            "{series}"
        );
        assert!(
            !series.contains("/hook"),
            "the URL's path is a secret: {series}"
        );
        *value
    };
    let first_alert = front
        .server
        .log()
        .read_from(1)
        .map(|envelope| envelope.expect("decodes"))
        .find(|envelope| switchboard::alerts::alert_text(&envelope.event).is_some())
        .expect("an alert was stored");
    assert_eq!(
        webhook("switchboard_webhook_lag_events"),
        head(&front) - first_alert.seq as f64 + 1.0
    );
    assert!(webhook("switchboard_webhook_failures_total") >= 2.0);
    // Bus and disk.
    assert_eq!(value("switchboard_nats_connected"), 1.0);
    assert_eq!(value("switchboard_nats_reconnects_total"), 0.0);
    assert!(value("switchboard_data_dir_bytes") > 0.0);
    // No label names a conversation.
    assert!(
        metrics
            .keys()
            .all(|series| !series.contains("conv-") && !series.contains("conversation_id")),
        "a per-conversation label"
    );

    // A log whose write failed (a blob file it cannot create) says so.
    assert_eq!(value("switchboard_log_failed"), 0.0);
    let (status, issued) = post(&front, "/admin/keys", ADMIN_KEY, json!({ "name": "big" })).await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    let big_key = issued["key"].as_str().expect("key").to_owned();
    let log = front.server.log();
    std::fs::remove_dir_all(log.dir().join(DB_DIR).join("blobs")).expect("remove the blob dir");
    let (status, refused) = post(
        &front,
        "/v1/conversations/conv-big/messages",
        &big_key,
        json!({ "content": "a long message ".repeat(12_000) }),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    let deadline = Instant::now() + WAIT;
    while scrape(&front).await.get("switchboard_log_failed") != Some(&1.0) {
        assert!(
            Instant::now() < deadline,
            "switchboard_log_failed is still not 1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    front.server.shutdown().await;
}
