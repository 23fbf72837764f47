//! Budgets end to end (issue 5): threshold alerts received by a real NATS
//! subscriber, refusals over NATS and HTTP, raising a budget, the overspend
//! bound under 200 concurrent turns, and costs that agree to the micro-dollar
//! across `kill -9`, restart and `replay`.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchboard::bus::{Bus, NatsBus, Subscription};
use switchboard_actors::agent::Price;
use switchboard_events::{EventLog, OpenMode};
use switchboard_projections::{CostGroup, Projections};
use tokio::task::JoinSet;

use support::bus::request;
use support::front::{samples, Front, ADMIN_KEY, WAIT};
use support::nats::NatsServer;
use support::serve::{Client, ServeProcess, ADMIN_KEY as SERVE_ADMIN_KEY};

/// $1,000 per million tokens either way: a micro-dollar per token... times a thousand.
const PRICE: Price = Price::new(1_000_000_000, 1_000_000_000);

async fn issue(bus: &Bus, body: Value) -> (String, String) {
    let reply = request(bus, "sb.admin.keys.issue", ADMIN_KEY, body).await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    (
        reply["key_id"].as_str().expect("key_id").to_owned(),
        reply["key"].as_str().expect("key").to_owned(),
    )
}

async fn send(bus: &Bus, key: &str, conversation: &str, message_id: &str) -> Value {
    request(
        bus,
        &format!("sb.conv.{conversation}.send"),
        key,
        json!({ "content": "what does this cost", "message_id": message_id }),
    )
    .await
}

/// The next message on `subscription`, as JSON, within [`WAIT`].
async fn next_json(subscription: &mut Subscription, what: &str) -> Value {
    let message = tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
        .unwrap_or_else(|| panic!("the subscription for {what} ended"));
    serde_json::from_slice(&message.payload).expect("events are JSON")
}

/// Every event of `dir`'s log as wire JSON (the server must be stopped).
fn logged(data: &Path) -> Vec<Value> {
    wire(&EventLog::open(data, OpenMode::MustExist).expect("the log opens"))
}

/// Every event of `log` as wire JSON.
fn wire(log: &EventLog) -> Vec<Value> {
    log.read_from(1)
        .map(|envelope| serde_json::to_value(envelope.expect("decodes")).expect("JSON"))
        .collect()
}

fn usage_of(events: &[Value], key_id: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["type"] == json!("usage_recorded") && e["data"]["key_id"] == json!(key_id))
        .map(|e| e["data"]["cost_micros"].as_u64().expect("cost"))
        .collect()
}

/// A webhook receiver on a free port: the JSON bodies it was sent.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let store = Arc::clone(&store);
            async move {
                store.lock().expect("lock").push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_budget_alerts_at_50_80_and_100_percent_once_each_then_refuses_until_raised() {
    let nats = NatsServer::start();
    let url = nats.url();
    let (hook, hooked) = webhook_receiver().await;
    let front = Front::start_with(|config| {
        config.nats_url = Some(url);
        config.agents[0].config.prices = PRICE;
        config.webhooks.urls = vec![hook];
    })
    .await;
    let watcher = Bus::from(NatsBus::connect(&nats.url()).await.expect("connects"));
    let mut alerts = watcher
        .subscribe("sb.alert.budget.>")
        .await
        .expect("subscribes");
    let bus = front.server.bus().clone();

    // What one turn costs, measured with a key without a budget.
    let (probe_id, probe) = issue(&bus, json!({ "name": "probe" })).await;
    let mut probe_usage = watcher
        .subscribe(&format!("sb.evt.usage.{probe_id}"))
        .await
        .expect("subscribes");
    watcher.flush().await.expect("flushes");
    assert_eq!(send(&bus, &probe, "probe", "p1").await["ok"], json!(true));
    let cost = next_json(&mut probe_usage, "the probe's usage").await["data"]["cost_micros"]
        .as_u64()
        .expect("cost");
    assert!(cost > 0, "a priced turn costs something");

    // 3.5 turns' worth: turns 2, 3 and 4 cross 50, 80 and 100 %.
    let budget = cost * 7 / 2;
    let (key_id, key) = issue(
        &bus,
        json!({ "name": "tiny", "budget": { "micros": budget, "period": "day" } }),
    )
    .await;
    let mut usage = watcher
        .subscribe(&format!("sb.evt.usage.{key_id}"))
        .await
        .expect("subscribes");
    watcher.flush().await.expect("flushes");
    for turn in 1..=4 {
        let ack = send(&bus, &key, &format!("c{turn}"), &format!("m{turn}")).await;
        assert_eq!(ack["ok"], json!(true), "turn {turn}: {ack}");
        let used = next_json(&mut usage, "the turn's usage").await;
        assert_eq!(used["data"]["message_id"], json!(format!("m{turn}")));
    }

    // The budget is spent: the next send is refused, over NATS and HTTP,
    // until the day rolls over.
    let refused = send(&bus, &key, "c5", "m5").await;
    assert_eq!(refused["ok"], json!(false), "{refused}");
    assert_eq!(
        refused["error"]["code"],
        json!("budget_exceeded"),
        "{refused}"
    );
    let retry = refused["error"]["retry_after_ms"]
        .as_u64()
        .expect("retry_after_ms");
    assert!((1..=86_400_000).contains(&retry), "{refused}");
    // A resend of the turn that spent it still gets that turn's ack.
    let resent = send(&bus, &key, "c4", "m4").await;
    assert_eq!(resent["ok"], json!(true), "{resent}");
    assert_eq!(resent["duplicate"], json!(true), "{resent}");
    let http = front
        .request(Method::POST, "/v1/conversations/c5/messages", Some(&key))
        .json(&json!({ "content": "still there?" }))
        .send()
        .await
        .expect("answers");
    assert_eq!(http.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(http.headers().contains_key("retry-after"));
    let body: Value = http.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], json!("budget_exceeded"), "{body}");
    let openai = front
        .request(Method::POST, "/v1/chat/completions", Some(&key))
        .json(&json!({ "model": "echo", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .expect("answers");
    assert_eq!(openai.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = openai.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], json!("insufficient_quota"), "{body}");

    // /v1/usage says where the budget stands.
    let usage_now: Value = front
        .request(Method::GET, "/v1/usage", Some(&key))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    let status = &usage_now["budgets"][0];
    assert_eq!(status["scope"], json!("key"), "{usage_now}");
    assert_eq!(status["budget_micros"], json!(budget));
    assert_eq!(status["spent_micros"], json!(4 * cost));
    assert_eq!(status["remaining_micros"], json!(0));

    // So does /metrics (its counters are the process's: other tests add to them).
    let metrics = front
        .request(Method::GET, "/metrics", None)
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("text");
    let figure = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert_eq!(
        figure(&format!(
            "switchboard_budget_remaining_micros{{scope=\"key\",subject=\"{key_id}\"}}"
        )),
        0.0
    );
    assert!(figure("switchboard_cost_micros_total{model=\"echo\"}") >= (5 * cost) as f64);
    assert!(figure("switchboard_tokens_total{model=\"echo\",direction=\"output\"}") > 0.0);

    // The alerts, in order, each once: 50, 80, 100 %, then the refusal.
    let mut received = Vec::new();
    for _ in 0..4 {
        received.push(next_json(&mut alerts, "a budget alert").await);
    }
    let seen: Vec<(String, Value)> = received
        .iter()
        .map(|a| {
            (
                a["type"].as_str().unwrap_or_default().to_owned(),
                a["data"]["threshold_pct"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("budget_threshold_crossed".to_owned(), json!(50)),
            ("budget_threshold_crossed".to_owned(), json!(80)),
            ("budget_threshold_crossed".to_owned(), json!(100)),
            ("budget_exceeded".to_owned(), Value::Null),
        ],
        "{received:?}"
    );
    for alert in &received {
        assert_eq!(alert["data"]["subject_id"], json!(key_id));
        assert_eq!(alert["data"]["budget_micros"], json!(budget));
    }
    assert_eq!(received[0]["data"]["spent_micros"], json!(2 * cost));
    assert_eq!(received[2]["data"]["spent_micros"], json!(4 * cost));

    // The webhook got the same four, with a line for people.
    let deadline = Instant::now() + WAIT;
    while hooked.lock().expect("lock").len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the webhook got {:?}",
            hooked.lock()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hooked_ids: Vec<Value> = hooked
        .lock()
        .expect("lock")
        .iter()
        .map(|body| {
            assert!(
                body["text"].as_str().is_some_and(|t| t.contains(&key_id)),
                "{body}"
            );
            body["event"]["id"].clone()
        })
        .collect();
    let alert_ids: Vec<Value> = received.iter().map(|a| a["id"].clone()).collect();
    assert_eq!(hooked_ids, alert_ids);

    // Raising the budget lets requests through again.
    let raised = request(
        &bus,
        "sb.admin.keys.update",
        ADMIN_KEY,
        json!({ "key_id": key_id, "budget": { "micros": budget * 100, "period": "day" } }),
    )
    .await;
    assert_eq!(raised["ok"], json!(true), "{raised}");
    assert_eq!(raised["key"]["budget"]["micros"], json!(budget * 100));
    let ack = send(&bus, &key, "c6", "m6").await;
    assert_eq!(ack["ok"], json!(true), "after the raise: {ack}");
    next_json(&mut usage, "the usage after the raise").await;

    let data = front.server.log().dir().to_owned();
    front.server.shutdown().await;
    // Nothing more was alerted (4 % of the raised budget crosses nothing)...
    let late = tokio::time::timeout(Duration::from_millis(500), alerts.next()).await;
    assert!(late.is_err(), "an unexpected alert: {late:?}");
    // ...and the log holds each alert once, and key_updated.
    let events = logged(&data);
    let count = |kind: &str| events.iter().filter(|e| e["type"] == json!(kind)).count();
    assert_eq!(count("budget_threshold_crossed"), 3);
    assert_eq!(count("budget_exceeded"), 1);
    assert_eq!(count("key_updated"), 1);
    assert_eq!(usage_of(&events, &key_id), vec![cost; 5]);
}

/// Sends until acknowledged or refused for the budget, waiting out
/// `rate_limited` refusals; returns whether it was acknowledged.
async fn send_until_settled(bus: Bus, key: String, n: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let reply = send(&bus, &key, &format!("conv{n}"), &format!("m{n}")).await;
        match reply["error"]["code"].as_str() {
            None => {
                assert_eq!(reply["ok"], json!(true), "{reply}");
                return true;
            }
            Some("budget_exceeded") => return false,
            Some("rate_limited") => {
                assert!(Instant::now() < deadline, "still rate limited: {reply}");
                let wait = reply["error"]["retry_after_ms"].as_u64().unwrap_or(10);
                tokio::time::sleep(Duration::from_millis(wait.clamp(1, 100))).await;
            }
            Some(other) => panic!("send {n} failed with {other}: {reply}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_turns_overspend_by_less_than_max_parallel_turns() {
    const PARALLEL: u64 = 8;
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut config = switchboard::server::ServerConfig::new(&data);
    config.admin_key = Some(ADMIN_KEY.to_owned());
    config.agents[0].config.prices = PRICE;
    let server = switchboard::server::Server::start(config)
        .await
        .expect("starts");
    let bus = server.bus().clone();

    // Every turn has the same prompt and reply, so the same cost.
    let (probe_id, probe) = issue(&bus, json!({ "name": "probe" })).await;
    assert_eq!(send(&bus, &probe, "probe", "p1").await["ok"], json!(true));
    let deadline = Instant::now() + WAIT;
    let cost = loop {
        if let Some(cost) = usage_of(&wire(server.log()), &probe_id).first() {
            break *cost;
        }
        assert!(
            Instant::now() < deadline,
            "the probe's turn was not charged"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    let budget = cost * 100 + cost / 2;
    let (key_id, key) = issue(
        &bus,
        json!({
            "name": "busy",
            "limits": { "max_parallel": PARALLEL },
            "budget": { "micros": budget, "period": "total" },
        }),
    )
    .await;
    let mut sends = JoinSet::new();
    for n in 0..200 {
        sends.spawn(send_until_settled(bus.clone(), key.clone(), n));
    }
    let mut acked = 0;
    while let Some(result) = sends.join_next().await {
        acked += usize::from(result.expect("the sender did not panic"));
    }
    server.shutdown().await;

    let events = logged(&data);
    let spent: u64 = usage_of(&events, &key_id).iter().sum();
    eprintln!(
        "{acked} of 200 acknowledged; spent {spent} of a {budget} micro-USD budget \
         (a turn costs {cost}; the bound is {} more)",
        PARALLEL * cost
    );
    assert_eq!(
        usage_of(&events, &key_id).len(),
        acked,
        "every acknowledged turn is charged once"
    );
    assert!(
        spent >= budget,
        "the budget was reached: {spent} of {budget}"
    );
    // The bound: a request is admitted only while the charged spend is below
    // the budget, and at most max_parallel turns are uncharged at any time.
    assert!(
        spent < budget + PARALLEL * cost,
        "overspent by {} micro-USD, more than {PARALLEL} turns of {cost}",
        spent - budget
    );
    assert!(acked < 200, "the budget refused some of the 200");

    // The costs projection is the sum of the usage events.
    let log = EventLog::open(&data, OpenMode::MustExist).expect("opens");
    let projections = Projections::open(&log).expect("opens");
    projections.catch_up(&mut |_| {}).expect("folds");
    let rows = projections
        .costs()
        .report(CostGroup::Key, None, None)
        .expect("reads");
    let row = rows
        .iter()
        .find(|r| r.group == key_id)
        .expect("the key's row");
    assert_eq!(row.totals.cost_micros, spent);
    assert_eq!(row.totals.requests, acked as u64);
}

/// `switchboard <args> --json --data-dir <data>`: its JSON lines, as an array.
fn cli_json(data: &Path, args: &[&str]) -> Value {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .arg("--json")
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("the CLI runs");
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines = String::from_utf8(output.stdout).expect("UTF-8");
    Value::Array(
        lines
            .lines()
            .map(|line| serde_json::from_str(line).expect("JSON lines"))
            .collect(),
    )
}

/// Cost rows as `group → cost_micros`; `column` names the group.
fn by_key(rows: &Value, column: &str) -> BTreeMap<String, u64> {
    rows.as_array()
        .expect("rows")
        .iter()
        .map(|row| {
            (
                row[column].as_str().expect("the group").to_owned(),
                row["cost_micros"].as_u64().expect("cost"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn costs_agree_to_the_micro_dollar_before_a_kill_9_after_restart_and_after_replay() {
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let config = dir.path().join("switchboard.toml");
    std::fs::write(&config, "[prices.echo]\ninput = 1000.0\noutput = 1000.0\n").expect("written");
    let config = config.to_str().expect("UTF-8").to_owned();
    let mut serve = ServeProcess::start(&data, &nats.url(), &["--config", &config]);
    let client = Client::connect(&nats.url()).await;
    let (_, a) = client.issue_key(json!({ "name": "a" })).await;
    let (_, b) = client.issue_key(json!({ "name": "b" })).await;

    // Acknowledged work, fully charged before the crash.
    let mut usage = client
        .bus
        .subscribe("sb.evt.usage.>")
        .await
        .expect("subscribes");
    client.bus.flush().await.expect("flushes");
    for n in 0..20 {
        let key = if n % 2 == 0 { &a } else { &b };
        let ack = client
            .send(
                key,
                &format!("before{n}"),
                "what does this cost",
                &format!("m{n}"),
            )
            .await
            .expect("answered");
        assert_eq!(ack["ok"], json!(true), "{ack}");
    }
    let mut charged = HashSet::new();
    while charged.len() < 20 {
        let event = next_json(&mut usage, "usage before the crash").await;
        charged.insert(event["id"].as_str().expect("id").to_owned());
    }
    let before = client
        .request("sb.admin.costs", SERVE_ADMIN_KEY, json!({ "by": "key" }))
        .await
        .expect("answered");
    assert_eq!(before["ok"], json!(true), "{before}");
    let before = by_key(&before["rows"], "group");
    assert_eq!(before.len(), 2, "{before:?}");

    // More load, and kill -9 in the middle of it.
    let mut load = JoinSet::new();
    for n in 0..200 {
        let client = client.clone();
        let key = if n % 2 == 0 { a.clone() } else { b.clone() };
        load.spawn(async move {
            let _ = client
                .send(
                    &key,
                    &format!("during{n}"),
                    "what does this cost",
                    &format!("d{n}"),
                )
                .await;
        });
    }
    while charged.len() < 60 {
        let event = next_json(&mut usage, "usage under load").await;
        charged.insert(event["id"].as_str().expect("id").to_owned());
    }
    serve.kill();
    load.abort_all();
    nats.stop();

    let after_crash = by_key(&cli_json(&data, &["costs", "--by", "key"]), "key");
    let events = cli_json(&data, &["log"]).as_array().expect("lines").clone();
    for (key_id, cost) in &after_crash {
        let sum: u64 = usage_of(&events, key_id).iter().sum();
        assert_eq!(
            *cost, sum,
            "costs of {key_id} = the sum of its usage events"
        );
    }
    for (key_id, cost) in &before {
        assert!(
            after_crash[key_id] >= *cost,
            "{key_id}: work acknowledged before the crash is kept"
        );
    }
    // The 20 turns charged before the crash cost what the server reported.
    let pre: u64 = events
        .iter()
        .filter(|e| e["type"] == json!("usage_recorded"))
        .filter(|e| {
            e["data"]["message_id"]
                .as_str()
                .is_some_and(|m| m.starts_with('m'))
        })
        .map(|e| e["data"]["cost_micros"].as_u64().expect("cost"))
        .sum();
    assert_eq!(pre, before.values().sum::<u64>());

    let replayed = {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["replay", "--data-dir"])
            .arg(&data)
            .output()
            .expect("runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        by_key(&cli_json(&data, &["costs", "--by", "key"]), "key")
    };
    assert_eq!(replayed, after_crash, "replay gives the same costs");

    nats.restart();
    let mut serve = ServeProcess::start(&data, &nats.url(), &["--config", &config]);
    let client = Client::connect(&nats.url()).await;
    let restarted = client
        .request("sb.admin.costs", SERVE_ADMIN_KEY, json!({ "by": "key" }))
        .await
        .expect("answered");
    assert_eq!(
        by_key(&restarted["rows"], "group"),
        after_crash,
        "the restarted server agrees"
    );
    serve.terminate_cleanly();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_budget_counts_every_key_they_own_and_refuses_all_of_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = switchboard::server::ServerConfig::new(dir.path().join("data"));
    config.admin_key = Some(ADMIN_KEY.to_owned());
    config.agents[0].config.prices = PRICE;
    // Whatever one turn costs, one turn spends it: two cannot fit.
    config.budgets.users.insert(
        "ana@example.com".to_owned(),
        switchboard_events::catalog::Budget {
            micros: 1,
            period: switchboard_events::catalog::BudgetPeriod::Month,
        },
    );
    let server = switchboard::server::Server::start(config)
        .await
        .expect("starts");
    let bus = server.bus().clone();
    let mut alerts = bus
        .subscribe("sb.alert.budget.user.>")
        .await
        .expect("subscribes");
    let owned = |name: &str| json!({ "name": name, "owner": "ana@example.com" });
    let (_, laptop) = issue(&bus, owned("laptop")).await;
    let (_, phone) = issue(&bus, owned("phone")).await;
    let (_, other) = issue(&bus, json!({ "name": "bob", "owner": "bob@example.com" })).await;

    assert_eq!(send(&bus, &laptop, "u1", "m1").await["ok"], json!(true));
    // The turn's cost spends the user's budget: the 100 % alert says so.
    let crossed = loop {
        let alert = next_json(&mut alerts, "the user's budget alert").await;
        if alert["data"]["threshold_pct"] == json!(100) {
            break alert;
        }
    };
    assert_eq!(crossed["data"]["scope"], json!("user"), "{crossed}");
    assert_eq!(crossed["data"]["subject_id"], json!("ana@example.com"));

    // Every key of the user is refused now, whichever spent it; others are not.
    for key in [&laptop, &phone] {
        let refused = send(&bus, key, "u2", &format!("m-{}", &key[..8])).await;
        assert_eq!(
            refused["error"]["code"],
            json!("budget_exceeded"),
            "{refused}"
        );
        let message = refused["error"]["message"].as_str().expect("message");
        assert!(message.contains("user ana@example.com"), "{message}");
    }
    assert_eq!(send(&bus, &other, "u3", "m3").await["ok"], json!(true));
    let exceeded = loop {
        let alert = next_json(&mut alerts, "budget_exceeded").await;
        if alert["type"] == json!("budget_exceeded") {
            break alert;
        }
    };
    assert_eq!(exceeded["data"]["subject_id"], json!("ana@example.com"));
    server.shutdown().await;
}

/// The budget gauges follow the keys: an active key's budget shows before
/// any request (at its whole amount), a changed budget shows at once, and a
/// revoked key's figures leave the metrics (also once a send checked it), so
/// no rule keeps firing on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_gauges_follow_the_active_keys_and_their_budgets() {
    let front = Front::start().await;
    let post = |path: String, key: String, body: Value| {
        let request = front.request(Method::POST, &path, Some(&key)).json(&body);
        async move {
            let answer = request.send().await.expect("answers");
            let status = answer.status();
            (status, answer.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let issue = |name: &'static str, micros: u64| {
        post(
            "/admin/keys".to_owned(),
            ADMIN_KEY.to_owned(),
            json!({ "name": name, "budget": { "micros": micros, "period": "day" } }),
        )
    };
    let (status, spent) = issue("spent", 500_000).await;
    assert_eq!(status, StatusCode::CREATED, "{spent}");
    let (status, kept) = issue("kept", 1_000_000).await;
    assert_eq!(status, StatusCode::CREATED, "{kept}");
    let series = |name: &str, issued: &Value| {
        let key_id = issued["key_id"].as_str().expect("key_id");
        format!("{name}{{scope=\"key\",subject=\"{key_id}\"}}")
    };
    let budget_of = |issued: &Value| series("switchboard_budget_micros", issued);
    let remaining_of = |issued: &Value| series("switchboard_budget_remaining_micros", issued);

    let metrics = samples(&front.metrics_text().await);
    assert_eq!(metrics.get(&budget_of(&spent)), Some(&500_000.0));
    assert_eq!(metrics.get(&remaining_of(&spent)), Some(&500_000.0));
    assert_eq!(metrics.get(&budget_of(&kept)), Some(&1_000_000.0));

    // A send checks the key against its budget, so the core holds it too.
    let spent_key = spent["key"].as_str().expect("key");
    let (status, ack) = post(
        "/v1/conversations/budgeted/messages".to_owned(),
        spent_key.to_owned(),
        json!({ "content": "checked against the budget" }),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ack}");

    let kept_id = kept["key_id"].as_str().expect("key_id");
    let changed = front
        .request(
            Method::PATCH,
            &format!("/admin/keys/{kept_id}"),
            Some(ADMIN_KEY),
        )
        .json(&json!({ "budget": { "micros": 2_000_000, "period": "day" } }))
        .send()
        .await
        .expect("answers");
    assert_eq!(changed.status(), StatusCode::OK);
    let spent_id = spent["key_id"].as_str().expect("key_id");
    let revoked = front
        .request(
            Method::DELETE,
            &format!("/admin/keys/{spent_id}"),
            Some(ADMIN_KEY),
        )
        .send()
        .await
        .expect("answers");
    assert_eq!(revoked.status(), StatusCode::OK);

    let text = front.metrics_text().await;
    let metrics = samples(&text);
    assert_eq!(metrics.get(&budget_of(&kept)), Some(&2_000_000.0));
    assert_eq!(metrics.get(&remaining_of(&kept)), Some(&2_000_000.0));
    assert_eq!(
        metrics.get(&budget_of(&spent)),
        None,
        "a revoked key's budget"
    );
    assert_eq!(metrics.get(&remaining_of(&spent)), None);
    let kept_series = budget_of(&kept);
    let kept_lines = text
        .lines()
        .filter(|line| line.starts_with(&format!("{kept_series} ")))
        .count();
    assert_eq!(kept_lines, 1, "one series per budget");
    for family in [
        "switchboard_budget_micros",
        "switchboard_budget_remaining_micros",
    ] {
        let declared = text
            .lines()
            .filter(|line| *line == format!("# TYPE {family} gauge"))
            .count();
        assert_eq!(declared, 1, "{family} declared once");
    }
    front.server.shutdown().await;
}
