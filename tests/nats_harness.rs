//! Proves the `NatsServer` harness the other integration tests stand on: a real
//! server with pub/sub, request/reply and JetStream, that clients find again
//! after a restart on the same port.

mod support;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use support::nats::{listening_port, locate_binary, NatsServer};
use tokio::sync::mpsc;

/// No step of these tests should come near this; it only keeps a broken run
/// from hanging.
const WAIT: Duration = Duration::from_secs(15);

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

async fn connect(server: &NatsServer) -> async_nats::Client {
    within("connect", async_nats::connect(server.url()))
        .await
        .unwrap_or_else(|error| panic!("connect to {}: {error}", server.url()))
}

/// A client that retries quickly and reports its connection events, so a test
/// can wait for the reconnect instead of sleeping.
async fn connect_watching(
    server: &NatsServer,
) -> (
    async_nats::Client,
    mpsc::UnboundedReceiver<async_nats::Event>,
) {
    let (events_tx, events) = mpsc::unbounded_channel();
    let options = async_nats::ConnectOptions::new()
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .event_callback(move |event| {
            let events_tx = events_tx.clone();
            async move {
                let _ = events_tx.send(event);
            }
        });
    let client = within("connect", options.connect(server.url()))
        .await
        .unwrap_or_else(|error| panic!("connect to {}: {error}", server.url()));
    (client, events)
}

async fn wait_for_event(
    events: &mut mpsc::UnboundedReceiver<async_nats::Event>,
    wanted: async_nats::Event,
) {
    within(&format!("client event {wanted}"), async {
        while let Some(event) = events.recv().await {
            if event == wanted {
                return;
            }
        }
        panic!("client event stream ended before {wanted}");
    })
    .await
}

/// Publishes on a fresh subscription and checks the payload comes back.
async fn round_trip(client: &async_nats::Client, subject: &'static str, payload: &[u8]) {
    let mut subscription = client.subscribe(subject).await.expect("subscribe");
    client
        .publish(subject, payload.to_vec().into())
        .await
        .expect("publish");
    let message = within(subject, subscription.next())
        .await
        .expect("subscription open");
    assert_eq!(message.subject.as_str(), subject);
    assert_eq!(message.payload.as_ref(), payload);
}

#[tokio::test]
async fn subscriber_receives_the_exact_payload() {
    let server = NatsServer::start();
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    let client = connect(&server).await;

    // Bytes a text protocol could mangle: NUL, CRLF, non-UTF-8.
    round_trip(&client, "harness.pubsub", b"hello \x00\r\nPUB x 1\r\n\xff").await;
}

#[tokio::test]
async fn request_gets_the_reply() {
    let server = NatsServer::start();
    let client = connect(&server).await;

    let mut requests = client.subscribe("harness.echo").await.expect("subscribe");
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let Some(reply_to) = request.reply else {
                continue;
            };
            let mut answer = b"echo: ".to_vec();
            answer.extend_from_slice(&request.payload);
            responder
                .publish(reply_to, answer.into())
                .await
                .expect("publish reply");
        }
    });

    let reply = within("reply", client.request("harness.echo", "ping".into()))
        .await
        .expect("request answered");
    assert_eq!(reply.payload.as_ref(), b"echo: ping");
}

#[tokio::test]
async fn jetstream_is_enabled() {
    let server = NatsServer::start();
    let js = jetstream::new(connect(&server).await);

    within(
        "create stream",
        js.create_stream(jetstream::stream::Config {
            name: "HARNESS".to_string(),
            subjects: vec!["harness.js.>".to_string()],
            ..Default::default()
        }),
    )
    .await
    .expect("create stream");

    let ack = within("publish ack", async {
        js.publish("harness.js.first", "one".into())
            .await
            .expect("publish")
            .await
    })
    .await
    .expect("ack");
    assert_eq!(ack.stream, "HARNESS");
    assert_eq!(ack.sequence, 1);
    assert!(
        server.store_dir().join("jetstream").is_dir(),
        "JetStream stores under the temp dir"
    );
}

// Multi-threaded so the client keeps running while `restart` blocks this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_restart() {
    let mut server = NatsServer::start();
    let port = server.port();
    let (client, mut events) = connect_watching(&server).await;
    round_trip(&client, "harness.before", b"before").await;

    tokio::task::block_in_place(|| server.restart());
    assert_eq!(server.port(), port, "restart keeps the port");

    wait_for_event(&mut events, async_nats::Event::Disconnected).await;
    wait_for_event(&mut events, async_nats::Event::Connected).await;
    round_trip(&client, "harness.after", b"after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_state_survives_restart() {
    let mut server = NatsServer::start();
    let (client, mut events) = connect_watching(&server).await;
    let js = jetstream::new(client);
    within(
        "create stream",
        js.create_stream(jetstream::stream::Config {
            name: "DURABLE".to_string(),
            subjects: vec!["harness.durable.>".to_string()],
            ..Default::default()
        }),
    )
    .await
    .expect("create stream");
    for n in 1..=3u64 {
        let ack = within("publish ack", async {
            js.publish("harness.durable.x", n.to_string().into())
                .await
                .expect("publish")
                .await
        })
        .await
        .expect("ack");
        assert_eq!(ack.sequence, n);
    }

    tokio::task::block_in_place(|| server.restart());
    wait_for_event(&mut events, async_nats::Event::Disconnected).await;
    wait_for_event(&mut events, async_nats::Event::Connected).await;

    let stream = within("get stream", js.get_stream("DURABLE"))
        .await
        .expect("stream still exists");
    let info = within("stream info", stream.get_info())
        .await
        .expect("stream info");
    assert_eq!(info.state.messages, 3, "log:\n{}", server.log());
    let ack = within("publish ack", async {
        js.publish("harness.durable.x", "4".into())
            .await
            .expect("publish")
            .await
    })
    .await
    .expect("ack");
    assert_eq!(ack.sequence, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_comes_back_on_the_same_port() {
    let mut server = NatsServer::start();
    let port = server.port();
    let (client, mut events) = connect_watching(&server).await;

    tokio::task::block_in_place(|| server.kill());
    assert!(!server.is_running());
    wait_for_event(&mut events, async_nats::Event::Disconnected).await;

    tokio::task::block_in_place(|| server.restart());
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    wait_for_event(&mut events, async_nats::Event::Connected).await;
    round_trip(&client, "harness.after_kill", b"back").await;
}

#[test]
fn stop_is_graceful_and_repeatable() {
    let mut server = NatsServer::start();
    server.stop();
    server.stop();
    assert!(!server.is_running());
    assert!(
        server.log().contains("Server Exiting"),
        "SIGTERM lets the server shut down cleanly; log:\n{}",
        server.log()
    );
}

#[test]
fn missing_server_is_an_error_naming_setup() {
    let empty = tempfile::tempdir().expect("temp dir");
    let error = locate_binary(None, Some(empty.path().into()), empty.path())
        .expect_err("no binary anywhere");
    assert!(error.contains("scripts/setup"), "{error}");

    let error = locate_binary(
        Some(empty.path().join("nats-server").into()),
        None,
        Path::new(env!("CARGO_MANIFEST_DIR")),
    )
    .expect_err("NATS_SERVER_BIN names no file");
    assert!(error.contains("NATS_SERVER_BIN"), "{error}");
    assert!(error.contains("scripts/setup"), "{error}");
}

#[test]
fn reads_the_port_from_the_servers_log_line() {
    let line = "[6793] 2026/11/22 03:56:34.875028 [INF] Listening for client connections on 127.0.0.1:43041\n";
    assert_eq!(listening_port(line), Some(43041));
    assert_eq!(listening_port("[6793] [INF] Server is ready"), None);
}
