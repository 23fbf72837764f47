//! The per-key `RateLimiter` actors against a real sled log, in paused time:
//! rpm, tpm and concurrency limits with their `retry_after_ms`, permits freed
//! by finish, drop and panic, changed limits, refusals coalesced into
//! `rate_limited` events with none lost, idle passivation of many keys, and
//! the flush at shutdown.
//!
//! Time moves only by `tokio::time::sleep` (the paused clock jumps to each
//! timer in order); waiting for the log's writer thread yields instead of
//! sleeping, so the clock stands still while a report reaches the disk.

use std::time::Duration;

use switchboard_actors::rate_limit::Remaining;
use switchboard_actors::rate_limiter::{
    AdmitError, Permit, RateLimiterConfig, RateLimiters, Refused,
};
use switchboard_events::catalog::{LimitKind, Limits, RateLimited};
use switchboard_events::{Event, EventLog, OpenMode, StreamId};
use tokio::time::{sleep, Instant};

fn limits(rpm: Option<u32>, tpm: Option<u64>, max_parallel: Option<u32>) -> Limits {
    Limits {
        rpm,
        tpm,
        max_parallel,
    }
}

fn setup(config: RateLimiterConfig) -> (tempfile::TempDir, EventLog, RateLimiters) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
    let limiters = RateLimiters::new(log.clone(), config);
    (dir, log, limiters)
}

async fn admitted(limiters: &RateLimiters, key_id: &str, limits: &Limits) -> Permit {
    limiters
        .admit(key_id, limits.clone())
        .await
        .unwrap_or_else(|e| panic!("{key_id} refused: {e}"))
}

async fn refused(limiters: &RateLimiters, key_id: &str, limits: &Limits) -> Refused {
    match limiters.admit(key_id, limits.clone()).await {
        Err(AdmitError::RateLimited(refused)) => refused,
        Err(other) => panic!("{key_id}: expected a refusal, got {other}"),
        Ok(permit) => panic!("{key_id}: expected a refusal, admitted {permit:?}"),
    }
}

/// The `rate_limited` events on `key/<key_id>`, in order.
fn reports(log: &EventLog, key_id: &str) -> Vec<RateLimited> {
    let stream = StreamId::key(key_id).expect("valid key id");
    log.read_stream(&stream, 1)
        .map(|envelope| match envelope.expect("decodes").event {
            Event::RateLimited(limited) => limited,
            other => panic!("unexpected event on {stream}: {other:?}"),
        })
        .collect()
}

/// Waits, without moving the paused clock, until the key's reports satisfy
/// `done`; returns them. Bounded in real time so a missing report fails the
/// test instead of hanging it.
async fn reports_when(
    log: &EventLog,
    key_id: &str,
    what: &str,
    done: impl Fn(&[RateLimited]) -> bool,
) -> Vec<RateLimited> {
    let started = std::time::Instant::now();
    loop {
        let found = reports(log, key_id);
        if done(&found) {
            return found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{key_id}: still waiting for {what}; the log holds {found:?}"
        );
        tokio::task::yield_now().await;
    }
}

fn total(reports: &[RateLimited]) -> u64 {
    reports.iter().map(|r| r.count).sum()
}

#[tokio::test(start_paused = true)]
async fn rpm_admits_exactly_the_limit_in_a_minute() {
    let (_dir, _log, limiters) = setup(RateLimiterConfig::default());
    let rpm5 = limits(Some(5), None, None);
    for i in 0..5u64 {
        let permit = admitted(&limiters, "k_rpm", &rpm5).await;
        assert_eq!(permit.remaining().requests, Some(4 - i));
        permit.finish(0);
        sleep(Duration::from_secs(1)).await;
    }
    // Admissions at t = 0..4 s; the sixth comes at t = 10 s.
    sleep(Duration::from_secs(5)).await;
    let sixth = refused(&limiters, "k_rpm", &rpm5).await;
    assert_eq!(sixth.limit, LimitKind::Rpm);
    // The oldest admission (t = 0) leaves the window at t = 60 s.
    assert_eq!(sixth.retry_after_ms, 50_000);
    assert_eq!(sixth.remaining.requests, Some(0));
    assert_eq!(sixth.remaining.reset, Duration::from_secs(50));

    sleep(Duration::from_millis(49_999)).await;
    let almost = refused(&limiters, "k_rpm", &rpm5).await;
    assert_eq!(almost.retry_after_ms, 1);
    sleep(Duration::from_millis(1)).await;
    let permit = admitted(&limiters, "k_rpm", &rpm5).await;
    assert_eq!(permit.remaining().requests, Some(0));
    // The next frees when the admission of t = 1 s leaves, at t = 61 s.
    assert_eq!(
        refused(&limiters, "k_rpm", &rpm5).await.retry_after_ms,
        1_000
    );
    drop(permit);
    limiters.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn concurrency_slots_come_back_by_finish_drop_and_panic() {
    let (_dir, _log, limiters) = setup(RateLimiterConfig::default());
    let two = limits(None, None, Some(2));
    let first = admitted(&limiters, "k_par", &two).await;
    let second = admitted(&limiters, "k_par", &two).await;
    let third = refused(&limiters, "k_par", &two).await;
    assert_eq!(third.limit, LimitKind::Parallel);
    assert_eq!(third.retry_after_ms, 1_000);

    first.finish(0);
    let third = admitted(&limiters, "k_par", &two).await;
    refused(&limiters, "k_par", &two).await;

    drop(second);
    let fourth = admitted(&limiters, "k_par", &two).await;
    refused(&limiters, "k_par", &two).await;

    // A caller that panics mid-turn frees its slot as it unwinds.
    drop(third);
    let caller = limiters.clone();
    let panicked = tokio::spawn(async move {
        let _permit = admitted(&caller, "k_par", &limits(None, None, Some(2))).await;
        panic!("a caller fails mid-turn");
    })
    .await;
    assert!(panicked.expect_err("the task panicked").is_panic());
    let fifth = admitted(&limiters, "k_par", &two).await;
    refused(&limiters, "k_par", &two).await;
    drop((fourth, fifth));
    admitted(&limiters, "k_par", &two).await.finish(0);
    limiters.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn tpm_counts_the_tokens_of_finished_turns() {
    let (_dir, _log, limiters) = setup(RateLimiterConfig::default());
    let tpm = limits(None, Some(1_000), None);
    let turn = admitted(&limiters, "k_tpm", &tpm).await;
    assert_eq!(turn.remaining().tokens, Some(1_000));
    sleep(Duration::from_secs(1)).await;
    turn.finish(600); // t = 1 s
    sleep(Duration::from_secs(1)).await;
    let turn = admitted(&limiters, "k_tpm", &tpm).await; // 600 < 1000
    assert_eq!(turn.remaining().tokens, Some(400));
    sleep(Duration::from_secs(3)).await;
    turn.finish(600); // t = 5 s: 1200 in the window
    sleep(Duration::from_secs(1)).await;

    let over = refused(&limiters, "k_tpm", &tpm).await; // t = 6 s
    assert_eq!(over.limit, LimitKind::Tpm);
    // The 600 recorded at t = 1 s leave at t = 61 s, bringing the sum under.
    assert_eq!(over.retry_after_ms, 55_000);
    assert_eq!(over.remaining.tokens, Some(0));
    assert_eq!(
        limiters.remaining("k_tpm", tpm.clone()).await,
        Remaining {
            requests: None,
            tokens: Some(0),
            reset: Duration::from_secs(55),
        }
    );

    sleep(Duration::from_millis(54_999)).await;
    refused(&limiters, "k_tpm", &tpm).await;
    sleep(Duration::from_millis(1)).await;
    let turn = admitted(&limiters, "k_tpm", &tpm).await;
    assert_eq!(turn.remaining().tokens, Some(400));
    turn.finish(0);
    limiters.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn refusals_are_coalesced_into_at_most_one_event_a_second_and_none_is_lost() {
    let (_dir, log, limiters) = setup(RateLimiterConfig::default());
    let rpm1 = limits(Some(1), None, None);

    // 50 refusals within one second: the first is reported at once...
    let _held = admitted(&limiters, "k_burst", &rpm1).await;
    for i in 0..50 {
        if i > 0 {
            sleep(Duration::from_millis(20)).await;
        }
        let refusal = refused(&limiters, "k_burst", &rpm1).await;
        assert_eq!(refusal.limit, LimitKind::Rpm);
    }
    // (t = 980 ms: the interval is not over, and the clock stands still.)
    let first = reports_when(&log, "k_burst", "the first report", |r| !r.is_empty()).await;
    assert_eq!(first.len(), 1, "one event within the second: {first:?}");
    assert_eq!(
        first[0].count, 1,
        "the report covers the refusals made by then"
    );
    assert_eq!(first[0].key_id, "k_burst");
    assert_eq!(first[0].limit, LimitKind::Rpm);
    assert_eq!(first[0].retry_after_ms, 60_000);

    // ...and the other 49 when the interval ends, with no further refusal.
    sleep(Duration::from_secs(1)).await;
    let all = reports_when(&log, "k_burst", "the flushed report", |r| total(r) >= 50).await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(total(&all), 50);
    assert!(all
        .iter()
        .all(|r| r.limit == LimitKind::Rpm && r.retry_after_ms <= 60_000));

    // Sustained refusals for five seconds: one event a second, counts exact.
    let _held = admitted(&limiters, "k_steady", &rpm1).await;
    let start = Instant::now();
    let mut seen_at: Vec<Duration> = Vec::new();
    for step in 0..50u32 {
        if step > 0 {
            sleep(Duration::from_millis(100)).await;
        }
        refused(&limiters, "k_steady", &rpm1).await;
        let elapsed = start.elapsed();
        // One report at t = 0 and one at each whole second since.
        let expected = elapsed.as_secs() as usize + 1;
        let found = reports_when(&log, "k_steady", "this second's report", |r| {
            r.len() >= expected
        })
        .await;
        assert_eq!(found.len(), expected, "at {elapsed:?}: {found:?}");
        seen_at.resize(found.len(), elapsed);
    }
    sleep(Duration::from_secs(2)).await;
    let steady = reports_when(&log, "k_steady", "every refusal reported", |r| {
        total(r) >= 50
    })
    .await;
    assert_eq!(total(&steady), 50, "{steady:?}");
    assert_eq!(steady.len(), 6, "reports at 0-4 s and the flush at 5 s");
    seen_at.push(start.elapsed());
    for pair in seen_at.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_secs(1),
            "two reports within a second: {seen_at:?}"
        );
    }

    // Quiet keys report nothing more.
    sleep(Duration::from_secs(10)).await;
    assert_eq!(reports(&log, "k_burst").len(), 2);
    assert_eq!(reports(&log, "k_steady").len(), 6);
    limiters.shutdown().await;
    assert_eq!(total(&reports(&log, "k_burst")), 50);
    assert_eq!(total(&reports(&log, "k_steady")), 50);
}

#[tokio::test(start_paused = true)]
async fn changed_limits_take_effect_at_the_next_call() {
    let (_dir, _log, limiters) = setup(RateLimiterConfig::default());
    let key = "k_changed";
    admitted(&limiters, key, &limits(Some(1), None, None))
        .await
        .finish(0);
    refused(&limiters, key, &limits(Some(1), None, None)).await;

    // Raised: two more fit in the minute.
    let rpm3 = limits(Some(3), None, None);
    admitted(&limiters, key, &rpm3).await.finish(0);
    let third = admitted(&limiters, key, &rpm3).await;
    assert_eq!(third.remaining().requests, Some(0));
    third.finish(0);
    refused(&limiters, key, &rpm3).await;

    // Lowered again, and a concurrency limit added.
    let strict = limits(Some(1), None, Some(1));
    assert_eq!(refused(&limiters, key, &strict).await.limit, LimitKind::Rpm);
    assert_eq!(
        limiters
            .remaining(key, limits(Some(10), None, None))
            .await
            .requests,
        Some(7),
        "three admissions in the window"
    );

    // No rpm any more: only concurrency counts.
    let parallel = limits(None, None, Some(1));
    let held = admitted(&limiters, key, &parallel).await;
    assert_eq!(
        refused(&limiters, key, &parallel).await.limit,
        LimitKind::Parallel
    );
    held.finish(0);

    // Unlimited: admitted without asking the actor at all.
    let free = admitted(&limiters, key, &Limits::default()).await;
    assert_eq!(
        free.remaining(),
        Remaining {
            requests: None,
            tokens: None,
            reset: Duration::ZERO
        }
    );
    free.finish(1_000_000);
    admitted(&limiters, key, &parallel).await.finish(0);
    limiters.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_passivated_and_come_back_fresh() {
    let (_dir, _log, limiters) = setup(RateLimiterConfig {
        idle_after: Duration::from_secs(5),
    });
    let rpm2 = limits(Some(2), Some(10_000), None);

    // Keys without limits spawn nothing.
    for i in 0..100 {
        admitted(&limiters, &format!("free_{i}"), &Limits::default())
            .await
            .finish(10);
    }
    assert_eq!(limiters.live_count(), 0);

    for i in 0..1_000 {
        admitted(&limiters, &format!("key_{i}"), &rpm2)
            .await
            .finish(7);
    }
    assert_eq!(limiters.live_count(), 1_000);
    // Idle for longer than idle_after, but their windows still hold requests.
    sleep(Duration::from_secs(30)).await;
    assert_eq!(limiters.live_count(), 1_000);
    // A key in use stays, whatever its windows.
    let busy = admitted(&limiters, "key_busy", &rpm2).await;

    sleep(Duration::from_secs(60)).await;
    let started = std::time::Instant::now();
    while limiters.live_count() > 1 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} actors still live",
            limiters.live_count()
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(
        limiters.live_count(),
        1,
        "only the key with a request in flight"
    );

    // A passivated key starts from empty windows: nothing was lost.
    let again = admitted(&limiters, "key_0", &rpm2).await;
    assert_eq!(again.remaining().requests, Some(1));
    assert_eq!(again.remaining().tokens, Some(10_000));
    again.finish(0);
    busy.finish(0);
    sleep(Duration::from_secs(120)).await;
    assert_eq!(limiters.live_count(), 0);
    limiters.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_stores_pending_refusals_and_stops_every_actor() {
    let (_dir, log, limiters) = setup(RateLimiterConfig::default());
    let rpm1 = limits(Some(1), None, None);
    let held = admitted(&limiters, "k_shut", &rpm1).await;
    let start = Instant::now();
    for _ in 0..5 {
        refused(&limiters, "k_shut", &rpm1).await;
    }
    reports_when(&log, "k_shut", "the first report", |r| !r.is_empty()).await;
    admitted(&limiters, "k_other", &rpm1).await.finish(0);
    assert_eq!(limiters.live_count(), 2);

    limiters.shutdown().await;
    let stored = reports(&log, "k_shut");
    assert_eq!(
        stored.iter().map(|r| r.count).collect::<Vec<_>>(),
        [1, 4],
        "the pending four stored before shutdown returned"
    );
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "even the last report keeps to one a second"
    );
    assert_eq!(limiters.live_count(), 0);
    let after = limiters
        .admit("k_shut", rpm1.clone())
        .await
        .expect_err("shut down");
    assert_eq!(after.code(), "unavailable");
    held.finish(3); // a permit outliving its limiter frees nothing and does not fail
}
