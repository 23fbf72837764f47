//! Checkpoints and verification: projections resume after a restart from the
//! checkpoint stored with their rows, and `verify` finds a view that no longer
//! matches the log without touching it.

mod common;

use switchboard_events::catalog::BudgetScope;
use switchboard_events::{Event, EventLog, ExpectedVersion, NewEvent, OpenMode};
use switchboard_projections::{CostTotals, ProjectionName, Projections, ViewDifference};

use common::*;

/// A varied round of events touching every view; `round` keeps ids apart.
fn round_events(round: u8) -> Vec<Vec<Event>> {
    let conv = |n: u8| format!("c{round}-{n}");
    let key = format!("k{round}");
    vec![
        vec![issued(&key, hash(round), None)],
        vec![
            started(&conv(1), &key, Some("alice")),
            message(&conv(1), "m1", &key, "hello"),
            reply(&conv(1), "m1", "echo", "echo: hello"),
            usage(&conv(1), &key, Some("alice"), "model-a", (10, 20), 300),
        ],
        vec![started(&conv(2), "k-shared", None)],
        vec![
            message(&conv(2), "m1", "k-shared", "second"),
            usage(&conv(2), "k-shared", None, "model-b", (1, 2), 5),
        ],
        vec![rate_limited(&key)],
        vec![auth_failed("bad key")],
        vec![threshold_crossed(BudgetScope::Key, "k-shared")],
        vec![updated(&key, None, None)],
        vec![erased(&conv(1), "admin")],
        vec![admin_action("conversation.erase", &conv(1))],
        vec![revoked(&key, "admin", None)],
        vec![reply(&conv(2), "m1", "echo", "echo: second")],
    ]
}

fn append_round(f: &Fixture, round: u8) {
    for events in round_events(round) {
        f.append(events);
    }
}

fn assert_checkpoints(projections: &Projections, seq: u64) {
    for name in ProjectionName::ALL {
        assert_eq!(
            projections.checkpoint(name).expect("checkpoint"),
            seq,
            "checkpoint of {name}"
        );
    }
}

#[test]
fn catch_up_after_restart_folds_only_new_events() {
    let f = Fixture::new();
    assert_checkpoints(&f.projections, 0);
    append_round(&f, 1);
    let first_head = f.fold();
    assert_eq!(first_head, f.log.head());
    assert_checkpoints(&f.projections, first_head);
    let before_restart = dump(&f.log);

    let f = f.reopen();
    // Rows and checkpoints are durable, and nothing is folded at open.
    assert_checkpoints(&f.projections, first_head);
    assert_dumps_equal(&before_restart, &dump(&f.log), "rows after reopening");

    append_round(&f, 2);
    let mut progress = Vec::new();
    let head = f
        .projections
        .catch_up(&mut |seq| progress.push(seq))
        .expect("catch up");
    assert_eq!(head, f.log.head());
    assert_checkpoints(&f.projections, head);
    let expected: Vec<u64> = (first_head + 1..=head).collect();
    assert_eq!(progress, expected, "only the new events are folded");

    // Shared key k-shared got usage in both sessions: counted once each.
    assert_eq!(
        f.projections
            .costs()
            .key_totals("k-shared")
            .expect("totals"),
        CostTotals {
            requests: 2,
            tokens_in: 2,
            tokens_out: 4,
            cost_micros: 10,
            estimated_requests: 0,
        }
    );

    let resumed = logical_dump(&f.log);
    assert_eq!(
        f.projections.replay(None, &mut |_| {}).expect("replay"),
        head
    );
    assert_checkpoints(&f.projections, head);
    assert_dumps_equal(
        &resumed,
        &logical_dump(&f.log),
        "resumed views against a replay",
    );
    let replayed = dump(&f.log);
    f.assert_verifies();

    // Catching up when caught up folds nothing and changes nothing.
    let mut folded = 0;
    assert_eq!(
        f.projections
            .catch_up(&mut |_| folded += 1)
            .expect("catch up"),
        head
    );
    assert_eq!(folded, 0);
    assert_dumps_equal(&replayed, &dump(&f.log), "a second catch-up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_fold_resumes_from_its_checkpoint_after_restart() {
    let dir = tempfile::tempdir().expect("temporary dir");

    async fn session(dir: &std::path::Path, round: u8) -> u64 {
        let log = EventLog::open(dir, OpenMode::CreateIfMissing).expect("open the log");
        let projections = Projections::open(&log).expect("open the projections");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let live = projections.clone();
        let task = tokio::spawn(async move {
            live.run_live(async {
                let _ = stopped.await;
            })
            .await
        });
        for events in round_events(round) {
            let stream = stream_of(&events[0]);
            log.append(
                stream,
                ExpectedVersion::Any,
                events.into_iter().map(NewEvent::new).collect(),
            )
            .await
            .expect("append");
        }
        let head = log.head();
        projections.wait_for(head).await;
        stop.send(()).expect("the live fold is running");
        task.await.expect("join").expect("live fold");
        assert_checkpoints(&projections, head);
        head
    }

    let first = session(dir.path(), 1).await;
    let second = session(dir.path(), 2).await;
    assert!(second > first);
    // Again: the live fold starts at its checkpoint, not at seq 1.
    let third = session(dir.path(), 3).await;
    assert!(third > second);

    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("open the log");
    let projections = Projections::open(&log).expect("open the projections");
    assert_checkpoints(&projections, third);
    let resumed = logical_dump(&log);
    projections.replay(None, &mut |_| {}).expect("replay");
    assert_dumps_equal(
        &resumed,
        &logical_dump(&log),
        "resumed live views against a replay",
    );
    assert_eq!(
        projections
            .costs()
            .key_totals("k-shared")
            .expect("totals")
            .requests,
        3
    );
}

/// A log with every view populated, folded.
fn folded() -> Fixture {
    let f = Fixture::new();
    append_round(&f, 1);
    append_round(&f, 2);
    f.fold();
    f.assert_verifies();
    f
}

fn tree(f: &Fixture, projection: ProjectionName) -> sled::Tree {
    f.log
        .db()
        .open_tree(format!("proj.{projection}"))
        .expect("open a view tree")
}

fn only(differences: &[ViewDifference], projection: ProjectionName) -> &ViewDifference {
    assert_eq!(differences.len(), 1, "{differences:?}");
    assert_eq!(differences[0].projection, projection, "{differences:?}");
    assert!(differences[0].to_string().contains(projection.as_str()));
    &differences[0]
}

#[test]
fn verify_names_a_changed_costs_row() {
    let f = folded();
    let costs = tree(&f, ProjectionName::Costs);
    let key = b"ak1".to_vec();
    let stored = costs
        .get(&key)
        .expect("read")
        .expect("k1's all-time totals");
    let mut totals: CostTotals = postcard::from_bytes(&stored).expect("a totals row");
    assert_eq!(totals.cost_micros, 300);
    totals.cost_micros += 1;
    costs
        .insert(&key, postcard::to_stdvec(&totals).expect("encode"))
        .expect("tamper");
    assert_eq!(
        f.projections
            .costs()
            .key_totals("k1")
            .expect("totals")
            .cost_micros,
        301,
        "the changed row is what the view answers"
    );

    let tampered = dump(&f.log);
    let differences = f.projections.verify(&mut |_| {}).expect("verify");
    let difference = only(&differences, ProjectionName::Costs);
    assert!(difference.detail.contains("ak1"), "{difference}");
    assert_dumps_equal(&tampered, &dump(&f.log), "verify changed the views");

    // Rebuilding the costs view repairs it.
    f.projections
        .replay(Some(ProjectionName::Costs), &mut |_| {})
        .expect("replay costs");
    assert_eq!(
        f.projections
            .costs()
            .key_totals("k1")
            .expect("totals")
            .cost_micros,
        300
    );
    f.assert_verifies();
}

#[test]
fn verify_names_a_deleted_history_row() {
    let f = folded();
    let history = tree(&f, ProjectionName::History);
    let (key, _) = history
        .scan_prefix(b"m")
        .next()
        .expect("a message row")
        .expect("read");
    history.remove(&key).expect("tamper");

    let tampered = dump(&f.log);
    let differences = f.projections.verify(&mut |_| {}).expect("verify");
    let difference = only(&differences, ProjectionName::History);
    assert!(difference.detail.contains("lacks"), "{difference}");
    assert_dumps_equal(&tampered, &dump(&f.log), "verify changed the views");

    // Replaying another view leaves the damage; replaying history repairs it.
    f.projections
        .replay(Some(ProjectionName::Costs), &mut |_| {})
        .expect("replay costs");
    only(
        &f.projections.verify(&mut |_| {}).expect("verify"),
        ProjectionName::History,
    );
    f.projections
        .replay(Some(ProjectionName::History), &mut |_| {})
        .expect("replay history");
    f.assert_verifies();
}

#[test]
fn verify_names_every_tampered_view_and_changes_none() {
    let f = folded();
    // audit: an extra row.
    tree(&f, ProjectionName::Audit)
        .insert(b"t-forged", b"".to_vec())
        .expect("tamper audit");
    // keys: a record pointed at by a forged hash.
    tree(&f, ProjectionName::Keys)
        .insert(
            [b"h".as_slice(), &[0x77; 32]].concat(),
            postcard::to_stdvec("k1").expect("encode"),
        )
        .expect("tamper keys");
    // history: a summary changed.
    let history = tree(&f, ProjectionName::History);
    let (key, value) = history
        .scan_prefix(b"c")
        .next()
        .expect("a summary row")
        .expect("read");
    let mut value = value.to_vec();
    let last = value.len() - 1;
    value[last] ^= 1; // the `erased` flag
    history.insert(key, value).expect("tamper history");

    let tampered = dump(&f.log);
    let differences = f.projections.verify(&mut |_| {}).expect("verify");
    let named: Vec<ProjectionName> = differences.iter().map(|d| d.projection).collect();
    assert_eq!(
        named,
        vec![
            ProjectionName::History,
            ProjectionName::Audit,
            ProjectionName::Keys
        ],
        "{differences:?}"
    );
    assert_dumps_equal(&tampered, &dump(&f.log), "verify changed the views");

    f.projections.replay(None, &mut |_| {}).expect("replay");
    f.assert_verifies();
}

#[test]
fn verify_compares_only_up_to_the_live_checkpoint() {
    let f = folded();
    let checkpoint = f.log.head();
    append_round(&f, 3);
    assert!(f.log.head() > checkpoint);
    let behind = dump(&f.log);
    // Views behind the log are not wrong, only behind.
    f.assert_verifies();
    assert_checkpoints(&f.projections, checkpoint);
    assert_dumps_equal(&behind, &dump(&f.log), "verify changed the views");
}

#[test]
fn views_at_different_checkpoints_catch_up_together() {
    let f = Fixture::new();
    append_round(&f, 1);
    let first = f.fold();
    append_round(&f, 2);
    // Rebuild costs alone: it is now ahead of the others.
    let head = f
        .projections
        .replay(Some(ProjectionName::Costs), &mut |_| {})
        .expect("replay costs");
    assert_eq!(head, f.log.head());
    assert_eq!(
        f.projections
            .checkpoint(ProjectionName::Costs)
            .expect("checkpoint"),
        head
    );
    for name in [
        ProjectionName::History,
        ProjectionName::Audit,
        ProjectionName::Keys,
    ] {
        assert_eq!(f.projections.checkpoint(name).expect("checkpoint"), first);
    }
    f.assert_verifies();

    append_round(&f, 3);
    let head = f.fold();
    assert_checkpoints(&f.projections, head);
    let caught_up = logical_dump(&f.log);
    f.projections.replay(None, &mut |_| {}).expect("replay");
    assert_dumps_equal(
        &caught_up,
        &logical_dump(&f.log),
        "uneven catch-up against a replay",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_fold_starts_views_at_their_own_checkpoints() {
    let dir = tempfile::tempdir().expect("temporary dir");
    let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
    let projections = Projections::open(&log).expect("open the projections");
    let append = |events: Vec<Event>| {
        let log = log.clone();
        async move {
            log.append(
                stream_of(&events[0]),
                ExpectedVersion::Any,
                events.into_iter().map(NewEvent::new).collect(),
            )
            .await
            .expect("append")
        }
    };
    for events in round_events(1) {
        append(events).await;
    }
    projections.catch_up(&mut |_| {}).expect("catch up");
    for events in round_events(2) {
        append(events).await;
    }
    projections
        .replay(Some(ProjectionName::Keys), &mut |_| {})
        .expect("replay keys");

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = projections.clone();
    let task = tokio::spawn(async move {
        live.run_live(async {
            let _ = stopped.await;
        })
        .await
    });
    for events in round_events(3) {
        append(events).await;
    }
    let head = log.head();
    projections.wait_for(head).await;
    stop.send(()).expect("the live fold is running");
    task.await.expect("join").expect("live fold");
    assert_checkpoints(&projections, head);

    let live_rows = logical_dump(&log);
    projections.replay(None, &mut |_| {}).expect("replay");
    assert_dumps_equal(
        &live_rows,
        &logical_dump(&log),
        "uneven live fold against a replay",
    );
}

/// More events than one commit takes (8192), folded live from seq 1 and then
/// replayed: both cross intermediate commits and must agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_log_folds_across_several_commits() {
    const EVENTS: u64 = 9_000;
    const PER_APPEND: u64 = 1_000;
    let dir = tempfile::tempdir().expect("temporary dir");
    let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
    for chunk in 0..EVENTS / PER_APPEND {
        let conversation = format!("long{chunk}");
        let events = (0..PER_APPEND)
            .map(|i| {
                let n = chunk * PER_APPEND + i;
                let event = match n % 3 {
                    0 => message(&conversation, &format!("m{n}"), "k1", "hi"),
                    1 => usage(&conversation, "k1", None, "model-a", (n, 1), n),
                    _ => reply(&conversation, &format!("m{n}"), "echo", "echo: hi"),
                };
                NewEvent::new(event)
            })
            .collect();
        log.append(
            stream_of(&started(&conversation, "k1", None)),
            ExpectedVersion::Any,
            events,
        )
        .await
        .expect("append");
    }
    assert_eq!(log.head(), EVENTS);

    let projections = Projections::open(&log).expect("open the projections");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = projections.clone();
    let task = tokio::spawn(async move {
        live.run_live(async {
            let _ = stopped.await;
        })
        .await
    });
    projections.wait_for(EVENTS).await;
    stop.send(()).expect("the live fold is running");
    task.await.expect("join").expect("live fold");
    assert_checkpoints(&projections, EVENTS);

    let usage_seqs = (0..EVENTS).filter(|n| n % 3 == 1);
    assert_eq!(
        projections.costs().key_totals("k1").expect("totals"),
        CostTotals {
            requests: usage_seqs.clone().count() as u64,
            tokens_in: usage_seqs.clone().sum(),
            tokens_out: usage_seqs.clone().count() as u64,
            cost_micros: usage_seqs.sum(),
            estimated_requests: 0,
        }
    );
    let live_rows = logical_dump(&log);
    let mut folded = 0;
    assert_eq!(
        projections
            .replay(None, &mut |_| folded += 1)
            .expect("replay"),
        EVENTS
    );
    assert_eq!(folded, EVENTS);
    assert_dumps_equal(
        &live_rows,
        &logical_dump(&log),
        "a long live fold against a replay",
    );
}

/// A retried append (same event id) is deduplicated by the log, so the views
/// count it once.
#[test]
fn a_retried_append_is_folded_once() {
    let f = Fixture::new();
    let event = NewEvent::new(usage("c1", "k1", None, "model-a", (3, 4), 25));
    let stream = stream_of(&event.event);
    let first = f
        .log
        .append_blocking(stream.clone(), ExpectedVersion::Any, vec![event.clone()])
        .expect("append");
    f.fold();
    let retried = f
        .log
        .append_blocking(stream, ExpectedVersion::Any, vec![event])
        .expect("retry");
    assert!(retried.deduplicated);
    assert_eq!(retried.positions, first.positions);
    f.fold();
    assert_eq!(
        f.projections.costs().key_totals("k1").expect("totals"),
        CostTotals {
            requests: 1,
            tokens_in: 3,
            tokens_out: 4,
            cost_micros: 25,
            estimated_requests: 0,
        }
    );
}
