//! The bus contract (DESIGN §9): one suite, written once, run against the
//! embedded `LocalBus` (`local::*`) and against `NatsBus` on a real
//! `nats-server` (`nats::*`). Whatever passes here may be relied on with
//! either bus.
//!
//! Each test gets a fresh bus (and, for NATS, its own server). `bus` and
//! `other` are two handles: clones of one embedded bus, or two separate NATS
//! connections, so a test can play a service and its client.

mod support;

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use support::nats::NatsServer;
use switchboard::bus::{Bus, BusError, Headers, LocalBus, Message, NatsBus, Subscription};

/// No step should come near this; it only keeps a broken run from hanging.
const WAIT: Duration = Duration::from_secs(15);

struct Fixture {
    bus: Bus,
    other: Bus,
    /// Kept alive for the test; `None` for the embedded bus.
    _server: Option<NatsServer>,
}

fn local_fixture() -> Fixture {
    let bus = LocalBus::new();
    Fixture {
        bus: bus.clone().into(),
        other: bus.into(),
        _server: None,
    }
}

async fn nats_fixture() -> Fixture {
    let server = NatsServer::start();
    let bus = connect(&server).await;
    let other = connect(&server).await;
    Fixture {
        bus: bus.into(),
        other: other.into(),
        _server: Some(server),
    }
}

/// A connected `NatsBus`: `connect` returns before the connection is up, and
/// tests that look at the server's limits want it up.
async fn connect(server: &NatsServer) -> NatsBus {
    let bus = NatsBus::connect(&server.url())
        .await
        .unwrap_or_else(|error| panic!("connect to {}: {error}", server.url()));
    within("the connection", async {
        while !bus.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    bus
}

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

async fn next(subscription: &mut Subscription) -> Message {
    let what = format!("a message on {}", subscription.pattern());
    within(&what, subscription.recv())
        .await
        .unwrap_or_else(|| panic!("subscription to {} ended", subscription.pattern()))
}

/// The subjects `subscription` receives up to and including `last`.
async fn subjects_until(subscription: &mut Subscription, last: &str) -> Vec<String> {
    let mut subjects = Vec::new();
    loop {
        let message = next(subscription).await;
        subjects.push(message.subject.clone());
        if message.subject == last {
            return subjects;
        }
    }
}

/// Checks nothing more arrives for a moment. It can only miss a stray
/// message, never fail a correct bus.
async fn assert_quiet(subscription: &mut Subscription) {
    if let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(200), subscription.recv()).await
    {
        panic!(
            "unexpected message on {}: {message:?}",
            subscription.pattern()
        );
    }
}

fn number(message: &Message) -> usize {
    std::str::from_utf8(&message.payload)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("payload is not a number: {message:?}"))
}

/// One copy of the suite per bus, each test a plain `async fn(Fixture)`.
macro_rules! contract {
    ($($test:ident),+ $(,)?) => {
        mod local {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::local_fixture()).await;
                }
            )+
        }
        mod nats {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::nats_fixture().await).await;
                }
            )+
        }
    };
}

contract!(
    exact_subject_reaches_only_its_subscribers,
    wildcards_match_like_nats,
    invalid_subjects_are_refused_with_a_code,
    queue_group_gets_each_message_once,
    request_reply_round_trips_headers,
    request_without_subscriber_is_no_responders,
    request_nobody_answers_times_out,
    respond_needs_a_request,
    headers_arrive_intact,
    payloads_arrive_byte_for_byte,
    unsubscribe_stops_delivery,
    one_publisher_one_subscriber_keeps_order,
);

async fn exact_subject_reaches_only_its_subscribers(f: Fixture) {
    let mut a = f.bus.subscribe("exact.a").await.expect("subscribe");
    let mut a_too = f.bus.subscribe("exact.a").await.expect("subscribe");
    let mut b = f.bus.subscribe("exact.b").await.expect("subscribe");

    for (subject, payload) in [("exact.a", "a1"), ("exact.b", "b1"), ("exact.a", "a2")] {
        f.bus
            .publish(subject, Headers::new(), payload)
            .await
            .expect("publish");
    }

    // In order, so "b1", published between them, would have shown up here.
    for subscription in [&mut a, &mut a_too] {
        for expected in ["a1", "a2"] {
            let message = next(subscription).await;
            assert_eq!(message.subject, "exact.a");
            assert_eq!(&message.payload[..], expected.as_bytes());
            assert_eq!(message.reply, None);
            assert!(message.headers.is_empty());
        }
    }
    let message = next(&mut b).await;
    assert_eq!(
        (message.subject.as_str(), &message.payload[..]),
        ("exact.b", &b"b1"[..])
    );
    assert_quiet(&mut b).await;
}

async fn wildcards_match_like_nats(f: Fixture) {
    let mut one = f.bus.subscribe("w.*.end").await.expect("subscribe");
    let mut rest = f.bus.subscribe("w.>").await.expect("subscribe");
    let mut under_a = f.bus.subscribe("w.a.>").await.expect("subscribe");
    let mut both = f.bus.subscribe("*.a.*").await.expect("subscribe");

    // The last subject matches every pattern, so it ends each list.
    let published = [
        "w.x.end",
        "w.x.y.end",
        "w.a.b",
        "w",
        "w.a",
        "v.a.end",
        "other.x.end",
        "w.a.end",
    ];
    for subject in published {
        f.bus
            .publish(subject, Headers::new(), subject)
            .await
            .expect("publish");
    }

    assert_eq!(
        subjects_until(&mut one, "w.a.end").await,
        ["w.x.end", "w.a.end"],
        "`*` matches exactly one token"
    );
    assert_eq!(
        subjects_until(&mut rest, "w.a.end").await,
        ["w.x.end", "w.x.y.end", "w.a.b", "w.a", "w.a.end"],
        "`>` matches one or more trailing tokens, not zero"
    );
    assert_eq!(
        subjects_until(&mut under_a, "w.a.end").await,
        ["w.a.b", "w.a.end"],
    );
    assert_eq!(
        subjects_until(&mut both, "w.a.end").await,
        ["w.a.b", "v.a.end", "w.a.end"],
    );
}

async fn invalid_subjects_are_refused_with_a_code(f: Fixture) {
    let code = |outcome: Result<Subscription, BusError>| match outcome {
        Ok(subscription) => panic!("{} was accepted", subscription.pattern()),
        Err(error) => error.code(),
    };
    for pattern in ["", "a..b", ".a", "a.", "a b", "a.\r\n", "a.>.b"] {
        assert_eq!(
            code(f.bus.subscribe(pattern).await),
            "invalid_subject",
            "{pattern:?}"
        );
    }
    match f.bus.subscribe("a.>.b").await {
        Err(BusError::InvalidSubject { source, .. }) => {
            assert_eq!(source.code(), "full_wildcard_not_last")
        }
        other => panic!("expected InvalidSubject, got {other:?}"),
    }
    assert_eq!(
        code(f.bus.queue_subscribe("a.b", "").await),
        "invalid_queue_group"
    );
    assert_eq!(
        code(f.bus.queue_subscribe("a.b", "two words").await),
        "invalid_queue_group"
    );

    // Publishing and requesting need one subject, not a pattern.
    for subject in ["a.*", "a.>", "a..b", "has space"] {
        let error = f
            .bus
            .publish(subject, Headers::new(), "x")
            .await
            .expect_err(subject);
        assert_eq!(error.code(), "invalid_subject", "{subject:?}");
        let error = f
            .bus
            .request(subject, Headers::new(), "x", WAIT)
            .await
            .expect_err(subject);
        assert_eq!(error.code(), "invalid_subject", "{subject:?}");
    }
    match f.bus.publish("a.*", Headers::new(), "x").await {
        Err(BusError::InvalidSubject { source, .. }) => {
            assert_eq!(source.code(), "wildcard_in_literal")
        }
        other => panic!("expected InvalidSubject, got {other:?}"),
    }
}

async fn queue_group_gets_each_message_once(f: Fixture) {
    const N: usize = 300;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(
            f.bus
                .queue_subscribe("jobs.run", "workers")
                .await
                .expect("queue subscribe"),
        );
    }
    let mut auditors = Vec::new();
    for _ in 0..2 {
        auditors.push(
            f.bus
                .queue_subscribe("jobs.*", "auditors")
                .await
                .expect("queue subscribe"),
        );
    }
    let mut watcher = f.bus.subscribe("jobs.>").await.expect("subscribe");

    for n in 0..N {
        f.bus
            .publish("jobs.run", Headers::new(), n.to_string())
            .await
            .expect("publish");
    }
    f.bus.flush().await.expect("flush");

    // The plain subscriber sees every message, in order.
    for n in 0..N {
        assert_eq!(number(&next(&mut watcher).await), n);
    }

    for (group, members) in [("workers", workers), ("auditors", auditors)] {
        let count = members.len();
        let mut merged = stream::select_all(
            members
                .into_iter()
                .enumerate()
                .map(|(member, subscription)| subscription.map(move |message| (member, message))),
        );
        let mut seen = BTreeSet::new();
        let mut per_member = vec![0usize; count];
        for _ in 0..N {
            let (member, message) = within(group, merged.next())
                .await
                .expect("group subscriptions open");
            let n = number(&message);
            assert!(seen.insert(n), "{group}: message {n} delivered twice");
            per_member[member] += 1;
        }
        assert_eq!(seen.len(), N, "{group}: every message delivered");
        assert!(
            per_member.iter().all(|&received| received > 0),
            "{group}: work is spread over the members: {per_member:?}"
        );
        if let Ok(Some((member, message))) =
            tokio::time::timeout(Duration::from_millis(200), merged.next()).await
        {
            panic!("{group}: member {member} got an extra message {message:?}");
        }
    }
}

async fn request_reply_round_trips_headers(f: Fixture) {
    // The service runs on the other handle, as in another process.
    let mut requests = f
        .other
        .queue_subscribe("svc.echo", "svc")
        .await
        .expect("subscribe");
    f.other.flush().await.expect("flush");
    let service = f.other.clone();
    let responder = tokio::spawn(async move {
        let request = requests.recv().await.expect("a request");
        let mut headers = request.headers.clone();
        headers.append("X-Reply", "yes");
        let mut body = b"echo: ".to_vec();
        body.extend_from_slice(&request.payload);
        service
            .respond(&request, headers, body)
            .await
            .expect("respond");
        request
    });

    let headers = Headers::new()
        .with("Authorization", "Bearer sb-test")
        .with("X-Multi", "1")
        .with("X-Multi", "2");
    let reply = within(
        "the reply",
        f.bus
            .request("svc.echo", headers.clone(), "ping", Duration::from_secs(10)),
    )
    .await
    .expect("answered");
    assert_eq!(&reply.payload[..], b"echo: ping");
    assert_eq!(reply.headers.get("X-Reply"), Some("yes"));
    assert_eq!(reply.headers.get("Authorization"), Some("Bearer sb-test"));
    assert_eq!(
        reply.headers.get_all("X-Multi").collect::<Vec<_>>(),
        ["1", "2"]
    );

    let request = within("the responder", responder)
        .await
        .expect("responder finished");
    assert_eq!(request.subject, "svc.echo");
    assert_eq!(request.headers, headers);
    assert!(request.reply.is_some(), "a request carries a reply subject");
}

async fn request_without_subscriber_is_no_responders(f: Fixture) {
    // A long timeout: the answer must come from "nobody listens", and the
    // test's own limit (shorter) would fail it if it came from waiting.
    let outcome = within(
        "no responders",
        f.bus.request(
            "nobody.home",
            Headers::new(),
            "hello?",
            Duration::from_secs(60),
        ),
    )
    .await;
    match outcome {
        Err(BusError::NoResponders { subject }) => assert_eq!(subject, "nobody.home"),
        other => panic!("expected NoResponders, got {other:?}"),
    }

    // A subscription on a different subject does not count.
    let _elsewhere = f.bus.subscribe("somebody.home").await.expect("subscribe");
    let outcome = within(
        "no responders",
        f.bus
            .request("nobody.home", Headers::new(), "", Duration::from_secs(60)),
    )
    .await;
    assert_eq!(
        outcome.map(|_| ()).map_err(|e| e.code()),
        Err("no_responders")
    );
}

async fn request_nobody_answers_times_out(f: Fixture) {
    let mut silent = f.bus.subscribe("svc.silent").await.expect("subscribe");
    let timeout = Duration::from_millis(300);
    let outcome = within(
        "the timeout",
        f.bus
            .request("svc.silent", Headers::new(), "hello?", timeout),
    )
    .await;
    match outcome {
        Err(BusError::Timeout {
            subject,
            timeout: waited,
        }) => {
            assert_eq!(subject, "svc.silent");
            assert_eq!(waited, timeout);
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    // The request did arrive; it was just never answered.
    let request = next(&mut silent).await;
    assert_eq!(&request.payload[..], b"hello?");
    assert!(request.reply.is_some());

    // A late reply goes nowhere and hurts nobody.
    f.bus
        .respond(&request, Headers::new(), "too late")
        .await
        .expect("respond late");
    f.bus.flush().await.expect("flush");
}

async fn respond_needs_a_request(f: Fixture) {
    let mut plain = f.bus.subscribe("plain.msg").await.expect("subscribe");
    f.bus
        .publish("plain.msg", Headers::new(), "no reply wanted")
        .await
        .expect("publish");
    let message = next(&mut plain).await;
    let error = f
        .bus
        .respond(&message, Headers::new(), "reply")
        .await
        .expect_err("nowhere to respond to");
    assert_eq!(error.code(), "no_reply_subject");
}

async fn headers_arrive_intact(f: Fixture) {
    let mut subscription = f.other.subscribe("hdr.>").await.expect("subscribe");
    f.other.flush().await.expect("flush");

    let headers = Headers::new()
        .with("Nats-Msg-Id", "0192f3a4-7b2c-7def-8a01-23456789abcd")
        .with("Authorization", "Bearer sb-abc.def")
        .with("Content-Type", "application/postcard")
        .with(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with("X-Multi", "first")
        .with("X-Multi", "second, with comma")
        .with("X-Multi", "third: with colon")
        .with("X-Empty", "")
        .with("X-Unicode", "héllo wörld ✓");
    f.bus
        .publish("hdr.full", headers.clone(), "body")
        .await
        .expect("publish");
    f.bus
        .publish("hdr.none", Headers::new(), "body")
        .await
        .expect("publish");

    let message = next(&mut subscription).await;
    assert_eq!(message.subject, "hdr.full");
    assert_eq!(message.headers, headers);
    assert_eq!(
        message.headers.get("Nats-Msg-Id"),
        Some("0192f3a4-7b2c-7def-8a01-23456789abcd")
    );
    assert_eq!(
        message.headers.get_all("X-Multi").collect::<Vec<_>>(),
        ["first", "second, with comma", "third: with colon"]
    );
    assert_eq!(&message.payload[..], b"body");

    let message = next(&mut subscription).await;
    assert_eq!(message.subject, "hdr.none");
    assert!(message.headers.is_empty());

    // What cannot be written as a header line is refused before sending.
    for bad in [
        Headers::new().with("Bad Name", "v"),
        Headers::new().with("Bad:Name", "v"),
        Headers::new().with("X-Injected", "v\r\nEvil: yes"),
    ] {
        let error = f
            .bus
            .publish("hdr.bad", bad.clone(), "")
            .await
            .expect_err("bad header");
        assert_eq!(error.code(), "invalid_header", "{bad:?}");
    }
    assert_quiet(&mut subscription).await;
}

async fn payloads_arrive_byte_for_byte(f: Fixture) {
    let mut subscription = f.bus.subscribe("bytes").await.expect("subscribe");
    let every_byte: Vec<u8> = (0..=255u8).collect();
    let protocol_lookalike = b"hello \x00\r\nPUB x 1\r\n\r\n\xff\xfe".to_vec();
    let large: Vec<u8> = (0..512 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    let payloads = [every_byte, protocol_lookalike, Vec::new(), large];

    for payload in &payloads {
        f.bus
            .publish("bytes", Headers::new(), payload.clone())
            .await
            .expect("publish");
    }
    // With headers the body must still be exact.
    f.bus
        .publish(
            "bytes",
            Headers::new().with("X-Kind", "empty"),
            Vec::<u8>::new(),
        )
        .await
        .expect("publish");

    for payload in &payloads {
        let message = next(&mut subscription).await;
        assert_eq!(message.payload.len(), payload.len());
        assert!(message.payload[..] == payload[..], "payload changed");
    }
    let message = next(&mut subscription).await;
    assert!(message.payload.is_empty());
    assert_eq!(message.headers.get("X-Kind"), Some("empty"));

    // Past the server's 1 MiB default: refused, with or without headers.
    let too_large = vec![7u8; 2 * 1024 * 1024];
    for headers in [Headers::new(), Headers::new().with("X-Kind", "big")] {
        let error = f
            .bus
            .publish("bytes", headers, too_large.clone())
            .await
            .expect_err("too large");
        assert_eq!(error.code(), "payload_too_large", "{error}");
    }
    // And the bus still works afterwards.
    f.bus
        .publish("bytes", Headers::new(), "still here")
        .await
        .expect("publish");
    assert_eq!(&next(&mut subscription).await.payload[..], b"still here");
}

async fn unsubscribe_stops_delivery(f: Fixture) {
    // Explicit unsubscribe: the very next request already finds nobody.
    let mut subscription = f.bus.subscribe("gone.explicit").await.expect("subscribe");
    f.bus
        .publish("gone.explicit", Headers::new(), "1")
        .await
        .expect("publish");
    assert_eq!(&next(&mut subscription).await.payload[..], b"1");
    subscription.unsubscribe().await.expect("unsubscribe");
    let outcome = f
        .bus
        .request("gone.explicit", Headers::new(), "", WAIT)
        .await;
    assert_eq!(
        outcome.map(|_| ()).map_err(|e| e.code()),
        Err("no_responders")
    );

    // Dropping unsubscribes too (on NATS, an instant later: the client
    // sends the unsubscribe from a task it spawns on drop).
    let dropped = f.bus.subscribe("gone.dropped").await.expect("subscribe");
    let mut kept = f.bus.subscribe("gone.kept").await.expect("subscribe");
    drop(dropped);
    within("the dropped subscription to go", async {
        loop {
            let outcome = f
                .bus
                .request(
                    "gone.dropped",
                    Headers::new(),
                    "",
                    Duration::from_millis(100),
                )
                .await;
            match outcome {
                Err(BusError::NoResponders { .. }) => break,
                // Still subscribed for the moment.
                Err(BusError::Timeout { .. }) => continue,
                other => panic!("expected NoResponders, got {other:?}"),
            }
        }
    })
    .await;
    // Other subscriptions are untouched.
    f.bus
        .publish("gone.kept", Headers::new(), "2")
        .await
        .expect("publish");
    assert_eq!(&next(&mut kept).await.payload[..], b"2");
}

async fn one_publisher_one_subscriber_keeps_order(f: Fixture) {
    const N: u32 = 1_000;
    let mut subscription = f.other.subscribe("order.x").await.expect("subscribe");
    f.other.flush().await.expect("flush");
    for n in 0..N {
        f.bus
            .publish("order.x", Headers::new(), n.to_be_bytes().to_vec())
            .await
            .expect("publish");
    }
    f.bus.flush().await.expect("flush");
    for n in 0..N {
        let message = next(&mut subscription).await;
        assert_eq!(
            &message.payload[..],
            n.to_be_bytes(),
            "message {n} in order"
        );
    }
    assert_quiet(&mut subscription).await;
}

/// NATS only: the bus rides out a server restart. Multi-threaded so the
/// client keeps running while `restart` blocks this thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_bus_reconnects_after_server_restart() {
    let mut server = NatsServer::start();
    let bus = Bus::from(connect(&server).await);

    // A service and a subscription made before the restart...
    let mut requests = bus
        .queue_subscribe("svc.ping", "svc")
        .await
        .expect("subscribe");
    let service = bus.clone();
    tokio::spawn(async move {
        while let Some(request) = requests.recv().await {
            let _ = service.respond(&request, Headers::new(), "pong").await;
        }
    });
    let mut events = bus.subscribe("evt.>").await.expect("subscribe");
    let reply = within(
        "the first reply",
        bus.request("svc.ping", Headers::new(), "", Duration::from_secs(5)),
    )
    .await
    .expect("answered before the restart");
    assert_eq!(&reply.payload[..], b"pong");

    tokio::task::block_in_place(|| server.restart());

    // ...work again once the client is back: requests reach the old service.
    within("a reply after the restart", async {
        loop {
            match bus
                .request("svc.ping", Headers::new(), "", Duration::from_millis(500))
                .await
            {
                Ok(reply) => {
                    assert_eq!(&reply.payload[..], b"pong");
                    break;
                }
                // Down, reconnecting, or resubscribing: try again.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;

    // The old subscription and a new one both receive.
    let mut fresh = bus.subscribe("evt.after").await.expect("subscribe");
    bus.publish(
        "evt.after",
        Headers::new().with("Nats-Msg-Id", "e-1"),
        "back",
    )
    .await
    .expect("publish");
    for subscription in [&mut events, &mut fresh] {
        let message = next(subscription).await;
        assert_eq!(message.subject, "evt.after");
        assert_eq!(&message.payload[..], b"back");
        assert_eq!(message.headers.get("Nats-Msg-Id"), Some("e-1"));
    }
    match &bus {
        Bus::Nats(nats) => assert!(nats.is_connected()),
        Bus::Local(_) => unreachable!("this test builds a NATS bus"),
    }
}
