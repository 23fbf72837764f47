//! `switchboard serve` end to end, as a process on a real `nats-server`:
//! load over many conversations, `kill -9` under load, a NATS restart under
//! load, and a graceful SIGTERM (DESIGN §6, §8).

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use support::nats::NatsServer;
use support::serve::{Client, ServeProcess};

/// How long a whole phase may take on a busy 2-core CI machine.
const PHASE: Duration = Duration::from_secs(120);

/// Every event of the data dir, from `switchboard log --json` (the server
/// must be stopped: the CLI opens the dir itself).
fn log_events(data: &Path) -> Vec<Value> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["log", "--json", "--data-dir"])
        .arg(data)
        .output()
        .expect("the CLI runs");
    assert!(
        output.status.success(),
        "log failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one envelope per line"))
        .collect()
}

/// `switchboard verify` passes on the data dir.
fn assert_verifies(data: &Path) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["verify", "--data-dir"])
        .arg(data)
        .output()
        .expect("the CLI runs");
    assert!(
        output.status.success(),
        "verify failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Per conversation, the `message_id`s of its `message_received` events in
/// order, and checks that each has exactly one end (`reply_completed` or
/// `reply_failed`) after it.
fn messages_and_ends(events: &[Value]) -> BTreeMap<String, Vec<String>> {
    let mut received: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ends: HashMap<(String, String), usize> = HashMap::new();
    for event in events {
        let data = &event["data"];
        let conversation = data["conversation_id"].as_str().unwrap_or_default();
        let message = data["message_id"].as_str().unwrap_or_default();
        match event["type"].as_str() {
            Some("message_received") => received
                .entry(conversation.to_owned())
                .or_default()
                .push(message.to_owned()),
            Some("reply_completed" | "reply_failed") => {
                *ends
                    .entry((conversation.to_owned(), message.to_owned()))
                    .or_default() += 1;
            }
            _ => {}
        }
    }
    for (conversation, messages) in &received {
        for message in messages {
            let count = ends
                .get(&(conversation.clone(), message.clone()))
                .copied()
                .unwrap_or(0);
            assert_eq!(count, 1, "{conversation}/{message} has {count} turn ends");
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_messages_over_fifty_conversations_are_acked_answered_and_kept_in_order() {
    const CONVERSATIONS: usize = 50;
    const PER_CONVERSATION: usize = 20;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut serve = ServeProcess::start(&data, &nats.url(), &[]);
    let client = Client::connect(&nats.url()).await;
    let (_, key) = client.issue_key(json!({ "name": "load" })).await;

    // One subscription, so what it receives is in the order published.
    let mut events = client
        .bus
        .subscribe("sb.evt.conv.*.>")
        .await
        .expect("subscribes");
    client.bus.flush().await.expect("flushes");

    let mut senders = JoinSet::new();
    for c in 0..CONVERSATIONS {
        let (client, key) = (client.clone(), key.clone());
        senders.spawn(async move {
            for m in 0..PER_CONVERSATION {
                let ack = client
                    .send(
                        &key,
                        &format!("c{c}"),
                        &format!("hello {m}"),
                        &format!("c{c}-m{m}"),
                    )
                    .await
                    .expect("answered");
                assert_eq!(ack["ok"], json!(true), "{ack}");
                assert_eq!(ack["message_id"], json!(format!("c{c}-m{m}")));
                assert!(ack["seq"].as_u64().is_some_and(|seq| seq > 0), "{ack}");
            }
        });
    }
    while let Some(done) = senders.join_next().await {
        done.expect("a sender failed");
    }

    // Every reply is published, and each of its deltas after its message
    // and before it.
    let deadline = Instant::now() + PHASE;
    let (mut received, mut answered, mut streamed) =
        (HashSet::new(), HashSet::new(), HashSet::new());
    while answered.len() < CONVERSATIONS * PER_CONVERSATION {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, events.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} replies arrived", answered.len()))
            .expect("the subscription is open");
        let body: Value = serde_json::from_slice(&message.payload).expect("JSON");
        let message_id = |body: &Value| body["message_id"].as_str().expect("message_id").to_owned();
        match message.subject.rsplit('.').next().expect("a type") {
            "message_received" => {
                received.insert(message_id(&body["data"]));
            }
            "reply_delta" => {
                for field in ["conversation_id", "reply_id", "index", "delta"] {
                    assert!(!body[field].is_null(), "{field} missing from {body}");
                }
                let id = message_id(&body);
                assert!(received.contains(&id), "a delta of {id} before its message");
                assert!(!answered.contains(&id), "a delta of {id} after its reply");
                streamed.insert(id);
            }
            "reply_completed" => {
                let id = message_id(&body["data"]);
                assert!(received.contains(&id), "{id}'s reply before its message");
                assert!(answered.insert(id.clone()), "{id} answered twice");
            }
            _ => {}
        }
    }
    assert_eq!(streamed, answered, "every reply is streamed");

    for c in 0..CONVERSATIONS {
        let history = client.history(&key, &format!("c{c}")).await;
        let messages = history["messages"].as_array().expect("messages");
        assert_eq!(messages.len(), 2 * PER_CONVERSATION, "c{c}: {history}");
        let users: Vec<&str> = messages
            .iter()
            .filter(|m| m["role"] == json!("user"))
            .map(|m| m["content"].as_str().expect("content"))
            .collect();
        let expected: Vec<String> = (0..PER_CONVERSATION)
            .map(|m| format!("hello {m}"))
            .collect();
        assert_eq!(users, expected, "c{c}: user messages out of order");
        let seqs: Vec<u64> = messages
            .iter()
            .map(|m| m["seq"].as_u64().expect("seq"))
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "c{c}: not in log order"
        );
        for m in 0..PER_CONVERSATION {
            let reply = messages
                .iter()
                .find(|x| {
                    x["role"] == json!("assistant")
                        && x["message_id"] == json!(format!("c{c}-m{m}"))
                })
                .unwrap_or_else(|| panic!("c{c}-m{m} has no reply"));
            assert_eq!(reply["content"], json!(format!("echo: hello {m}")));
        }
    }

    serve.terminate_cleanly();
    let received = messages_and_ends(&log_events(&data));
    assert_eq!(received.len(), CONVERSATIONS);
    assert_verifies(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_and_duplicates_no_acknowledged_message() {
    const CONVERSATIONS: usize = 16;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut serve = ServeProcess::start(&data, &nats.url(), &[]);
    let client = Client::connect(&nats.url()).await;
    let (_, key) = client.issue_key(json!({ "name": "crash" })).await;

    // Each sender sends until its first unanswered request, recording what
    // was acknowledged and the one message left in doubt.
    let acked = Arc::new(Mutex::new(HashSet::<String>::new()));
    let in_doubt = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let mut senders = JoinSet::new();
    for c in 0..CONVERSATIONS {
        let (client, key) = (client.clone(), key.clone());
        let (acked, in_doubt) = (acked.clone(), in_doubt.clone());
        senders.spawn(async move {
            for m in 0.. {
                let (conversation, message_id) = (format!("k{c}"), format!("k{c}-m{m}"));
                match client.send(&key, &conversation, "hi", &message_id).await {
                    Ok(ack) if ack["ok"] == json!(true) => {
                        acked.lock().expect("lock").insert(message_id);
                    }
                    _ => {
                        in_doubt
                            .lock()
                            .expect("lock")
                            .push((conversation, message_id));
                        return;
                    }
                }
            }
        });
    }
    let deadline = Instant::now() + PHASE;
    while acked.lock().expect("lock").len() < 300 {
        assert!(Instant::now() < deadline, "the load did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    serve.kill();
    while let Some(done) = senders.join_next().await {
        done.expect("a sender panicked");
    }
    let acked = acked.lock().expect("lock").clone();

    let mut serve = ServeProcess::start(&data, &nats.url(), &[]);
    // A client unsure of its last message sends it again, same message_id.
    let in_doubt = in_doubt.lock().expect("lock").clone();
    for (conversation, message_id) in &in_doubt {
        let ack = client
            .send(&key, conversation, "hi", message_id)
            .await
            .expect("answered after the restart");
        assert_eq!(ack["ok"], json!(true), "{ack}");
    }
    // A graceful stop drains running turns and ends those the kill cut off
    // (reply_failed), so the log check below sees an end for every message.
    serve.terminate_cleanly();

    let received = messages_and_ends(&log_events(&data));
    let mut stored = HashSet::new();
    for messages in received.values() {
        for message_id in messages {
            assert!(
                stored.insert(message_id.clone()),
                "{message_id} stored twice"
            );
        }
    }
    for message_id in &acked {
        assert!(
            stored.contains(message_id),
            "acknowledged {message_id} was lost"
        );
    }
    for (_, message_id) in &in_doubt {
        assert!(
            stored.contains(message_id),
            "resent {message_id} is missing"
        );
    }
    let expected: HashSet<String> = acked
        .iter()
        .cloned()
        .chain(in_doubt.iter().map(|(_, m)| m.clone()))
        .collect();
    assert_eq!(stored, expected, "the log holds messages nobody sent");
    assert_verifies(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_restart_under_load_loses_nothing_and_publishes_each_event_once() {
    const CONVERSATIONS: usize = 8;
    const PER_CONVERSATION: usize = 25;
    let mut nats = NatsServer::start();
    let url = nats.url();
    // A JetStream stream records everything published on sb.evt.>, across
    // the restart (the store survives it), deduplicating by Nats-Msg-Id.
    let observer = async_nats::connect(&url).await.expect("connects");
    let js = jetstream::new(observer.clone());
    js.create_stream(jetstream::stream::Config {
        name: "EVENTS".into(),
        subjects: vec!["sb.evt.>".into()],
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .expect("the stream is created");

    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut serve = ServeProcess::start(&data, &url, &["--outbox-jetstream", "sb.evt.>"]);
    let client = Client::connect(&url).await;
    let (_, key) = client.issue_key(json!({ "name": "restart" })).await;

    let acked = Arc::new(Mutex::new(0usize));
    let mut senders = JoinSet::new();
    for c in 0..CONVERSATIONS {
        let (client, key, acked) = (client.clone(), key.clone(), acked.clone());
        senders.spawn(async move {
            for m in 0..PER_CONVERSATION {
                let message_id = format!("r{c}-m{m}");
                let deadline = Instant::now() + PHASE;
                // Retried with the same message_id until acknowledged.
                loop {
                    match client.send(&key, &format!("r{c}"), "hi", &message_id).await {
                        Ok(ack) if ack["ok"] == json!(true) => break,
                        Ok(refused) if refused["error"]["code"] != json!("unavailable") => {
                            panic!("refused: {refused}")
                        }
                        _ => {}
                    }
                    assert!(Instant::now() < deadline, "{message_id} never acknowledged");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                *acked.lock().expect("lock") += 1;
            }
        });
    }
    let deadline = Instant::now() + PHASE;
    while *acked.lock().expect("lock") < 40 {
        assert!(Instant::now() < deadline, "the load did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _nats = tokio::task::spawn_blocking(move || {
        nats.restart();
        nats
    })
    .await
    .expect("the restart works");
    while let Some(done) = senders.join_next().await {
        done.expect("a sender failed");
    }

    serve.terminate_cleanly();
    let events = log_events(&data);
    messages_and_ends(&events);
    let published_types = [
        "conversation_started",
        "message_received",
        "agent_routed",
        "reply_completed",
        "reply_failed",
    ];
    let expected: HashSet<String> = events
        .iter()
        .filter(|e| published_types.contains(&e["type"].as_str().unwrap_or_default()))
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();

    // What reached NATS: each stored conversation event exactly once, under
    // its own id.
    let mut stream = js.get_stream("EVENTS").await.expect("the stream exists");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for seq in 1..=last {
        let Ok(message) = stream.get_raw_message(seq).await else {
            continue;
        };
        if message.subject.ends_with(".reply_delta") {
            continue;
        }
        let event: Value = serde_json::from_slice(&message.payload).expect("JSON");
        let id = event["id"].as_str().expect("id").to_owned();
        let msg_id = message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(|| {
                panic!(
                    "no Nats-Msg-Id on {}: {:?}",
                    message.subject, message.headers
                )
            });
        assert!(msg_id.starts_with(&id), "{msg_id} published for event {id}");
        if message.subject.starts_with("sb.evt.conv.")
            && !message.subject.ends_with(".usage_recorded")
        {
            *seen.entry(id).or_default() += 1;
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "published more than once: {twice:?}");
    let seen: HashSet<String> = seen.into_keys().collect();
    let missing: Vec<_> = expected.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "never published: {} events, e.g. {:?}",
        missing.len(),
        missing.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_http_wins_over_an_http_address_from_the_environment() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    // As the image sets it; a core node adds --no-http.
    let mut serve = ServeProcess::start_with_env(
        &data,
        &nats.url(),
        &["--no-http"],
        &[("SWITCHBOARD_HTTP", "127.0.0.1:0")],
    );
    assert_eq!(serve.ready["http"], Value::Null, "{}", serve.ready);
    serve.terminate_cleanly();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_file_names_the_command_but_none_of_its_secrets() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let url = nats
        .url()
        .replacen("nats://", "nats://sb:hunter2-in-the-url@", 1);
    let mut serve = ServeProcess::start(&data, &url, &[]);
    let holder = std::fs::read_to_string(data.join("switchboard.lock")).expect("the lock file");
    assert!(holder.contains("(switchboard serve)"), "{holder}");
    assert!(!holder.contains("hunter2"), "{holder}");
    serve.terminate_cleanly();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_running_turns_and_exits_zero() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut serve = ServeProcess::start(&data, &nats.url(), &[]);
    assert_eq!(serve.ready["bus"], json!(nats.url()));
    let client = Client::connect(&nats.url()).await;
    let (_, key) = client.issue_key(json!({ "name": "stop" })).await;
    for m in 0..20 {
        let ack = client
            .send(&key, "s1", &format!("m{m}"), &format!("s1-m{m}"))
            .await
            .expect("answered");
        assert_eq!(ack["ok"], json!(true));
    }
    serve.terminate_cleanly();
    // Nothing left open: every acknowledged message's turn ended before exit.
    let received = messages_and_ends(&log_events(&data));
    assert_eq!(received["s1"].len(), 20);
    let events = log_events(&data);
    let failed = events
        .iter()
        .filter(|e| e["type"] == json!("reply_failed"))
        .count();
    assert_eq!(failed, 0, "a graceful stop lets echo turns complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_sets_agents_routes_and_the_prefix_and_flags_win_over_it() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let config = dir.path().join("switchboard.toml");
    std::fs::write(
        &config,
        r#"
[nats]
prefix = "acme"
[router]
default_agent = "front"
[[agents]]
name = "front"
provider = "echo"
word_delay_ms = 20
[[agents]]
name = "legal"
provider = "echo"
max_concurrency = 4
[[routes]]
pattern = "(?i)\\bcontract\\b"
agent = "legal"
[prices.legal]
input = 2.5
output = 10.0
"#,
    )
    .expect("writes");
    let config_arg = config.to_str().expect("UTF-8 path");

    // The file's prefix, unless a flag says otherwise.
    let mut serve = ServeProcess::start(&data, &nats.url(), &["--config", config_arg]);
    assert_eq!(serve.ready["prefix"], json!("acme"));
    let mut client = Client::connect(&nats.url()).await;
    client.prefix = "acme".into();
    let (_, key) = client.issue_key(json!({ "name": "cfg" })).await;
    let mut deltas = client
        .bus
        .subscribe("acme.evt.conv.cfg1.reply_delta")
        .await
        .expect("subscribes");
    client.bus.flush().await.expect("flushes");
    for (m, content) in ["hello", "about the Contract", "more"].iter().enumerate() {
        let ack = client
            .send(&key, "cfg1", content, &format!("m{m}"))
            .await
            .expect("answered");
        assert_eq!(ack["ok"], json!(true), "{ack}");
    }
    // The front agent paces its words (word_delay_ms), so they stream apart.
    let mut first_reply = Vec::new();
    while first_reply.concat() != "echo: hello" {
        let delta = tokio::time::timeout(PHASE, deltas.recv())
            .await
            .expect("the reply streams")
            .expect("open");
        let delta: Value = serde_json::from_slice(&delta.payload).expect("JSON");
        if delta["message_id"] == json!("m0") {
            first_reply.push(delta["delta"].as_str().expect("delta").to_owned());
        }
    }
    assert_eq!(first_reply, ["echo: ", "hello"]);
    let deadline = Instant::now() + PHASE;
    let agents: Vec<String> = loop {
        let history = client.history(&key, "cfg1").await;
        let replies: Vec<String> = history["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["role"] == json!("assistant"))
            .map(|m| m["agent"].as_str().expect("agent").to_owned())
            .collect();
        if replies.len() == 3 {
            // Turns run concurrently: order the replies by their message.
            let mut by_message: Vec<(String, String)> = history["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .filter(|m| m["role"] == json!("assistant"))
                .map(|m| {
                    (
                        m["message_id"].as_str().expect("id").to_owned(),
                        m["agent"].as_str().expect("agent").to_owned(),
                    )
                })
                .collect();
            by_message.sort();
            break by_message.into_iter().map(|(_, agent)| agent).collect();
        }
        assert!(Instant::now() < deadline, "{history}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(agents, ["front", "legal", "front"]);
    serve.terminate_cleanly();
    let usage: Vec<Value> = log_events(&data)
        .into_iter()
        .filter(|e| e["type"] == json!("usage_recorded") && e["data"]["agent"] == json!("legal"))
        .collect();
    assert_eq!(usage.len(), 1);
    // $2.50 and $10.00 per million tokens, as integer micro-USD.
    assert_eq!(usage[0]["data"]["input_price"], json!(2_500_000));
    assert_eq!(usage[0]["data"]["output_price"], json!(10_000_000));

    let mut serve = ServeProcess::start(
        &data,
        &nats.url(),
        &["--config", config_arg, "--nats-prefix", "beta"],
    );
    assert_eq!(serve.ready["prefix"], json!("beta"));
    client.prefix = "beta".into();
    let ack = client
        .send(&key, "cfg2", "hi", "b1")
        .await
        .expect("answered");
    assert_eq!(ack["ok"], json!(true), "{ack}");
    serve.terminate_cleanly();
}

#[test]
fn a_bad_config_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    for (toml, needle) in [
        (
            "[nats]\nurl = \"nats://127.0.0.1:1\"\nprefx = \"x\"\n",
            "prefx",
        ),
        (
            "[[agents]]\nname = \"a\"\nprovider = \"gpt\"\n",
            "unknown provider",
        ),
        (
            "[[agents]]\nname = \"a.b\"\nprovider = \"echo\"\n",
            "agent name",
        ),
        (
            "[[agents]]\nname = \"a\"\nprovider = \"openai\"\nmodel = \"m\"\n",
            "base_url",
        ),
        (
            "[[agents]]\nname = \"a\"\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\nword_delay_ms = 5\n",
            "word_delay_ms",
        ),
        ("[router]\ndefault_agent = \"nobody\"\n", "nobody"),
        ("[[routes]]\npattern = \"(\"\nagent = \"echo\"\n", "("),
        ("[prices.echo]\ninput = -1.0\noutput = 0.0\n", "price"),
        ("[budgets]\nthresholds = [50, 150]\n", "threshold"),
        (
            "[budgets.users.ana]\nusd = -5.0\nperiod = \"month\"\n",
            "budget of user",
        ),
        (
            "[budgets.users.ana]\nusd = 5.0\nperiod = \"week\"\n",
            "week",
        ),
        (
            "[alerts]\nwebhooks = [\"ftp://hooks.example/T0/secret-path\"]\n",
            "webhooks[0]",
        ),
        (
            "[alerts]\nwebhooks = [\"https://hooks.example/T0/secret-path\", \"HTTPS://Hooks.Example/T0/secret-path\"]\n",
            "webhooks[1] repeats webhooks[0]",
        ),
        (
            "[alerts]\nwebhooks = [\"https://:8443/secret-path\"]\n",
            "webhooks[0]",
        ),
        ("[conversations]\nmax_live = 0\n", "max_live must be at least 1"),
        (
            "[conversations]\nidle_passivate_secs = 0\n",
            "idle_passivate_secs must be at least 1",
        ),
        (
            "[[agents]]\nname = \"a\"\nprovider = \"echo\"\nmax_concurrency = 0\n",
            "max_concurrency must be at least 1",
        ),
        (
            "[[agents]]\nname = \"a\"\nprovider = \"echo\"\ntimeout_secs = 0\n",
            "timeout_secs must be at least 1",
        ),
        (
            "[[agents]]\nname = \"a\"\nprovider = \"echo\"\ncircuit_failure_threshold = 0\n",
            "circuit_failure_threshold must be at least 1",
        ),
        (
            "[[agents]]\nname = \"a\"\nprovider = \"echo\"\ncircuit_open_secs = 0\n",
            "circuit_open_secs must be at least 1",
        ),
    ] {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, toml).expect("writes");
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--data-dir"])
            .arg(&data)
            .arg("--config")
            .arg(&config)
            .arg("--no-http")
            .env_remove("SWITCHBOARD_NATS_URL")
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{toml} was accepted");
        assert!(stderr.contains(needle), "{toml}: {stderr}");
        assert!(
            !stderr.contains("secret-path"),
            "a webhook URL was printed: {stderr}"
        );
        assert!(!data.exists(), "{toml} created the data dir");
    }
}

/// An unreachable NATS server, or an HTTP or metrics address another
/// process holds, is a clear error at start, before the data dir (and so the
/// admin key) is created.
#[test]
fn an_unreachable_nats_server_or_a_busy_address_is_a_clear_error_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    // A port nothing listens on: bind one, note it, let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let busy = busy.local_addr().expect("bound").to_string();
    let nats_url = format!("nats://127.0.0.1:{port}");
    for (args, needle) in [
        (
            vec!["--nats-url", nats_url.as_str()],
            "cannot reach NATS at",
        ),
        (
            vec!["--http", busy.as_str()],
            &format!("cannot listen for HTTP on {busy}") as &str,
        ),
        (
            vec!["--no-http", "--metrics-addr", busy.as_str()],
            &format!("cannot serve metrics on {busy}"),
        ),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(&args)
            .env_remove("SWITCHBOARD_NATS_URL")
            .env_remove("SWITCHBOARD_ADMIN_KEY")
            .output()
            .expect("runs");
        assert!(!output.status.success(), "{args:?} started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!data.exists(), "{args:?} created the data dir");
    }
}

/// Events the startup catch-up test writes before `serve` first opens the
/// data dir: enough that folding them (a debug build) outlasts a signal.
const BACKLOG_EVENTS: u64 = 60_000;

#[test]
fn sigterm_during_the_startup_catch_up_stops_it_cleanly_and_the_next_start_goes_on() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use switchboard_events::catalog::{AuthChannel, AuthFailed};
    use switchboard_events::{Event, EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId};
    use switchboard_projections::{ProjectionName, Projections};

    // Reaches into `serve`'s bookkeeping: the note a clean stop leaves (tree
    // `serve`, key `clean_stop`: the log's head then), which a start takes.
    fn clean_stop_note(log: &EventLog) -> Option<Vec<u8>> {
        let tree = log.db().open_tree("serve").expect("the tree");
        tree.get("clean_stop")
            .expect("reads")
            .map(|note| note.to_vec())
    }

    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    // A clean stop first, which leaves its note.
    ServeProcess::start(&data, &nats.url(), &[]).terminate_cleanly();
    // Then a backlog the projections have not seen, as after an upgrade
    // that rebuilds them: a start folds all of it before it is ready.
    let log = EventLog::open(&data, OpenMode::MustExist).expect("opens");
    let note = clean_stop_note(&log).expect("a clean stop leaves its note");
    let head_before = log.head();
    let failure = |n: u64| {
        NewEvent::new(Event::AuthFailed(AuthFailed {
            channel: AuthChannel::Nats,
            reason: "unknown key".into(),
            key_prefix: Some(format!("sb-{n:04x}")),
            remote: None,
        }))
    };
    for first in (0..BACKLOG_EVENTS).step_by(1000) {
        let events = (first..first + 1000).map(failure).collect();
        log.append_blocking(StreamId::system(), ExpectedVersion::Any, events)
            .expect("appends");
    }
    drop(log);

    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--json", "--data-dir"])
        .arg(&data)
        .args(["--nats-url", &nats.url(), "--http", "127.0.0.1:0"])
        .env("SWITCHBOARD_ADMIN_KEY", support::serve::ADMIN_KEY)
        .env("RUST_LOG", "info")
        .env_remove("SWITCHBOARD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let stderr = child.stderr.take().expect("piped");
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut said = Vec::new();
    loop {
        let line = seen
            .recv_timeout(PHASE)
            .unwrap_or_else(|_| panic!("serve never said it was catching up: {said:#?}"));
        let catching_up = line.contains("catching up the projections");
        said.push(line);
        if catching_up {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let output = child.wait_with_output().expect("serve exits");
    said.extend(seen.try_iter());
    assert!(output.status.success(), "{}: {said:#?}", output.status);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let answer: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(answer, json!({ "ready": false, "stopped": true }));

    // It stopped part way, keeping what it had folded, and nothing else;
    // the note of the last clean stop is back as it was.
    let log = EventLog::open(&data, OpenMode::MustExist).expect("reopens");
    assert_eq!(
        log.head(),
        head_before + BACKLOG_EVENTS,
        "the start appended nothing"
    );
    assert_eq!(clean_stop_note(&log), Some(note));
    let projections = Projections::open(&log).expect("opens");
    let audit = projections
        .checkpoint(ProjectionName::Audit)
        .expect("a checkpoint");
    assert!(
        audit < head_before + BACKLOG_EVENTS,
        "the catch-up was not cut short"
    );
    drop(projections);
    drop(log);

    // The next start goes on from there to views exactly as the log gives.
    let mut serve = ServeProcess::start(&data, &nats.url(), &[]);
    serve.terminate_cleanly();
    assert_verifies(&data);
}

/// The HTTP front runs beside the core: its requests take the in-process bus,
/// so none of them crosses NATS (a plain subscriber to every request subject
/// sees only the NATS client's), and it keeps storing messages while NATS is
/// away, when `/readyz` says the bus is not connected. What it stored then
/// reaches NATS once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_front_beside_the_core_skips_nats_and_stores_messages_while_nats_is_away() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    // Keeps what is published for the conversation written while NATS is
    // away, across the restart (the store survives it).
    let observer = async_nats::connect(&url).await.expect("connects");
    let js = jetstream::new(observer.clone());
    js.create_stream(jetstream::stream::Config {
        name: "AWAY".into(),
        subjects: vec!["sb.evt.conv.while-away.>".into()],
        ..Default::default()
    })
    .await
    .expect("the stream is created");
    let mut serve = ServeProcess::start(&data, &url, &[]);
    let client = Client::connect(&url).await;
    let (_, key) = client.issue_key(json!({ "name": "front" })).await;
    let base = format!(
        "http://{}",
        serve.ready["http"].as_str().expect("HTTP runs")
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let send = |conversation: &str, message_id: &str| {
        http.post(format!("{base}/v1/conversations/{conversation}/messages"))
            .bearer_auth(&key)
            .json(&json!({ "content": "hi", "message_id": message_id }))
            .send()
    };

    // Every request on the prefix, as a plain (not queue) subscriber gets it.
    let mut requests = observer.subscribe("sb.>").await.expect("subscribes");
    observer.flush().await.expect("flushed");

    let sent = send("over-http", "h1").await.expect("answered");
    assert_eq!(sent.status(), reqwest::StatusCode::ACCEPTED);
    let ack: Value = sent.json().await.expect("JSON");
    assert_eq!(ack["ok"], json!(true), "{ack}");
    let nats_ack = client
        .send(&key, "over-nats", "hi", "n1")
        .await
        .expect("acked");
    assert_eq!(nats_ack["ok"], json!(true), "{nats_ack}");
    // The NATS send's own request comes through; the HTTP send's stored
    // events do too (the outbox publishes them), but no request of its.
    let mut subjects = Vec::new();
    let deadline = Instant::now() + PHASE;
    while !subjects
        .iter()
        .any(|s: &String| s == "sb.conv.over-nats.send")
        || !subjects
            .iter()
            .any(|s| s.starts_with("sb.evt.conv.over-http."))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, futures::StreamExt::next(&mut requests))
            .await
            .unwrap_or_else(|_| panic!("seen so far: {subjects:?}"))
            .expect("the subscription lasts");
        subjects.push(message.subject.to_string());
    }
    let crossed: Vec<_> = subjects
        .iter()
        .filter(|s| s.starts_with("sb.conv.over-http."))
        .collect();
    assert!(
        crossed.is_empty(),
        "HTTP requests crossed NATS: {crossed:?}"
    );

    // NATS away: the front still stores messages, and says the bus is down.
    nats.stop();
    let deadline = Instant::now() + PHASE;
    let ready = loop {
        let ready = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("answered");
        if ready.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            break ready.json::<Value>().await.expect("JSON");
        }
        assert!(Instant::now() < deadline, "still ready with NATS stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        ready["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("bus is not connected")),
        "{ready}"
    );
    let sent = send("while-away", "w1").await.expect("answered");
    assert_eq!(sent.status(), reqwest::StatusCode::ACCEPTED);
    let away_ack: Value = sent.json().await.expect("JSON");
    // Streamed replies too: the front follows them on the core's in-process
    // bus, not on NATS.
    let streamed = http
        .post(format!("{base}/v1/conversations/streamed-away/messages"))
        .bearer_auth(&key)
        .header("Accept", "text/event-stream")
        .json(&json!({ "content": "still here", "message_id": "s1" }))
        .send()
        .await
        .expect("answered");
    assert_eq!(streamed.status(), reqwest::StatusCode::OK);
    let streamed = streamed.text().await.expect("the stream ends");
    for expected in [
        "event: ack",
        "event: reply_delta",
        "event: reply_completed",
        "echo: still here",
    ] {
        assert!(streamed.contains(expected), "no {expected:?} in {streamed}");
    }
    let completion = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({ "model": "echo", "stream": true,
            "messages": [{ "role": "user", "content": "and streaming" }] }))
        .send()
        .await
        .expect("answered");
    assert_eq!(completion.status(), reqwest::StatusCode::OK);
    let completion = completion.text().await.expect("the stream ends");
    let text: String = completion
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "echo: and streaming", "{completion}");
    assert!(completion.ends_with("data: [DONE]\n\n"), "{completion}");
    // And a conversation's live events: the front's feed has them from the
    // log, and the deltas from the gateway.
    let first = send("live-away", "l0").await.expect("answered");
    assert_eq!(first.status(), reqwest::StatusCode::ACCEPTED);
    let live = http
        .get(format!("{base}/v1/conversations/live-away/events"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("answered");
    assert_eq!(live.status(), reqwest::StatusCode::OK);
    let sent = http
        .post(format!("{base}/v1/conversations/live-away/messages"))
        .bearer_auth(&key)
        .json(&json!({ "content": "live", "message_id": "l1" }))
        .send()
        .await
        .expect("answered");
    assert_eq!(sent.status(), reqwest::StatusCode::ACCEPTED);
    let mut live = live.bytes_stream();
    let mut seen = String::new();
    let deadline = Instant::now() + PHASE;
    // Every whole SSE event so far.
    let parsed =
        |seen: &str| support::sse::parse(&seen[..seen.rfind("\n\n").map_or(0, |end| end + 2)]);
    let is_l1 = |(name, data, _): &support::sse::SseEvent, kind: &str| {
        let message_id = match name.as_str() {
            "reply_delta" => &data["message_id"],
            _ => &data["data"]["message_id"],
        };
        name == kind && message_id == "l1"
    };
    let events = loop {
        let events = parsed(&seen);
        if events.iter().any(|e| is_l1(e, "reply_completed")) {
            break events;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, futures::StreamExt::next(&mut live))
            .await
            .unwrap_or_else(|_| panic!("no live reply in time; seen: {seen}"))
            .expect("the stream stays open")
            .expect("the stream reads");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    };
    let at = |kind: &str| {
        events
            .iter()
            .position(|e| is_l1(e, kind))
            .unwrap_or_else(|| panic!("no {kind} of l1 in {seen}"))
    };
    let (received, completed) = (at("message_received"), at("reply_completed"));
    let deltas: Vec<usize> = (0..events.len())
        .filter(|&i| is_l1(&events[i], "reply_delta"))
        .collect();
    // After the message, though the feed publishes it from the log while
    // the turn already streams; before the end.
    assert!(
        received < completed && deltas.iter().all(|&i| received < i && i < completed),
        "out of order in {seen}"
    );
    let text: String = deltas
        .iter()
        .map(|&i| events[i].1["delta"].as_str().expect("a delta's text"))
        .collect();
    assert_eq!(text, "echo: live", "{seen}");
    drop(live);

    // Back: ready again, and the message stored meanwhile is published.
    nats.restart();
    let deadline = Instant::now() + PHASE;
    while http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("answered")
        .status()
        != reqwest::StatusCode::OK
    {
        assert!(Instant::now() < deadline, "not ready after NATS came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stream = js.get_stream("AWAY").await.expect("the stream is kept");
    let deadline = Instant::now() + PHASE;
    loop {
        let published = stream
            .get_last_raw_message_by_subject("sb.evt.conv.while-away.message_received")
            .await;
        if let Ok(message) = published {
            let event: Value = serde_json::from_slice(&message.payload).expect("JSON");
            assert_eq!(event["seq"], away_ack["seq"], "{event} for {away_ack}");
            break;
        }
        assert!(Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let history = client.history(&key, "while-away").await;
    assert_eq!(history["messages"][0]["content"], json!("hi"), "{history}");

    serve.terminate_cleanly();
    assert_verifies(&data);
}
