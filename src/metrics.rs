//! The process's metrics in the Prometheus text format, through the
//! `metrics` crate: counters and histograms are recorded where things happen
//! (`switchboard_cost_micros_total{model}` when a turn's usage is stored,
//! `switchboard_ack_latency_seconds` when a send is acknowledged), gauges of
//! state are sampled every second ([`sample`]), and `GET /metrics` renders
//! them, with the budget gauges written as the budgets stand then
//! ([`show_budgets`]). Labels are bounded: operations, outcomes, agents, models, keys —
//! never conversations.
//!
//! One recorder per process, installed by the first [`install`]; later calls
//! (another server in the same process, as in tests) share it. Counters
//! start at zero with the process, as Prometheus expects: `increase()` and
//! `rate()` handle restarts, and the costs projection keeps the all-time sums.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use switchboard_actors::budget::{BudgetStatus, Budgets};
use switchboard_projections::Projections;

/// Histogram buckets of latencies, in seconds: 0.5 ms to 60 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Histogram buckets of group-commit sizes.
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The budgets [`render`] shows, with the keys views that say which keys
/// are active, each under the id of its [`ShownBudgets`].
static BUDGETS: Mutex<Vec<(u64, Budgets, Projections)>> = Mutex::new(Vec::new());
static NEXT_SHOWN: AtomicU64 = AtomicU64::new(0);

/// The budget gauges are not kept by the recorder, which cannot drop a
/// series: [`render`] writes them from the budgets as they stand, so those
/// of a revoked or expired key leave the metrics (and rules on them, such as
/// "a budget nearly spent", stop firing for it).
type BudgetGauge = (&'static str, &'static str, fn(&BudgetStatus) -> u64);
const BUDGET_GAUGES: [BudgetGauge; 2] = [
    (
        "switchboard_budget_micros",
        "A budget per period, in micro-USD, by scope and subject.",
        |status| status.budget_micros,
    ),
    (
        "switchboard_budget_remaining_micros",
        "What is left of a budget this period, in micro-USD, by scope and subject.",
        |status| status.remaining_micros,
    ),
];

/// Shows `budgets` (the active keys' ones, as `projections`' keys view
/// lists them, and the users' checked here) in [`render`] until dropped.
pub struct ShownBudgets(u64);

pub fn show_budgets(budgets: Budgets, projections: Projections) -> ShownBudgets {
    let id = NEXT_SHOWN.fetch_add(1, Ordering::Relaxed);
    lock_budgets().push((id, budgets, projections));
    ShownBudgets(id)
}

impl Drop for ShownBudgets {
    fn drop(&mut self) {
        lock_budgets().retain(|(id, ..)| *id != self.0);
    }
}

fn lock_budgets() -> std::sync::MutexGuard<'static, Vec<(u64, Budgets, Projections)>> {
    // A list of handles: nothing a panic could leave half-changed.
    BUDGETS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Installs the Prometheus recorder, once per process. Returns false when
/// another recorder was installed first (the metrics then go to it, and
/// [`render`] has nothing).
pub fn install() -> bool {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("switchboard_log_batch_size".into()),
                    SIZE_BUCKETS,
                )
                .ok()?
                .install_recorder()
                .ok()?;
            describe();
            Some(handle)
        })
        .is_some()
}

/// Everything recorded so far, in the Prometheus text format, and the
/// budget gauges as the budgets stand now (a scan of the keys view and the
/// spend of the last moments: a scrape's worth of work).
pub fn render() -> String {
    let Some(handle) = HANDLE.get().and_then(Option::as_ref) else {
        return String::new();
    };
    let mut text = handle.render();
    let shown: Vec<(Budgets, Projections)> = lock_budgets()
        .iter()
        .map(|(_, budgets, projections)| (budgets.clone(), projections.clone()))
        .collect();
    let now = chrono::Utc::now();
    let mut statuses = Vec::new();
    for (budgets, projections) in shown {
        match projections.keys().list() {
            Ok(keys) => {
                let active = keys.iter().filter(|record| record.is_active(now));
                let keys = active.map(|record| (record.key_id.as_str(), record.budget.as_ref()));
                statuses.extend(budgets.statuses(keys, now));
            }
            Err(error) => tracing::warn!(%error, "the budget gauges cannot list the keys"),
        }
    }
    write_budget_gauges(&mut text, statuses);
    text
}

/// The [`BUDGET_GAUGES`] of `statuses`, in the text format.
fn write_budget_gauges(text: &mut String, mut statuses: Vec<BudgetStatus>) {
    if statuses.is_empty() {
        return;
    }
    statuses
        .sort_by(|a, b| (a.scope.as_str(), &a.subject_id).cmp(&(b.scope.as_str(), &b.subject_id)));
    for (name, help, value) in BUDGET_GAUGES {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
        for status in &statuses {
            let _ = writeln!(
                text,
                "{name}{{scope=\"{}\",subject=\"{}\"}} {}",
                status.scope.as_str(),
                label_value(&status.subject_id),
                value(status)
            );
        }
        text.push('\n');
    }
}

/// A label value escaped as the text format wants it.
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "switchboard_requests_total",
        "Gateway requests by operation and outcome (ok or the error code)."
    );
    describe_histogram!(
        "switchboard_ack_latency_seconds",
        "From a send's arrival to its durable acknowledgment."
    );
    describe_histogram!(
        "switchboard_log_batch_size",
        "Appends committed together by one group commit."
    );
    describe_histogram!(
        "switchboard_log_flush_seconds",
        "Writing and flushing one group commit."
    );
    describe_gauge!(
        "switchboard_log_head_seq",
        "The seq of the last event in the log."
    );
    describe_gauge!(
        "switchboard_log_failed",
        "1 once a write or flush of the log failed: it refuses appends until a restart."
    );
    describe_gauge!(
        "switchboard_projections_seq",
        "The seq every projection has folded up to."
    );
    describe_gauge!(
        "switchboard_projection_lag_events",
        "Events in the log a projection has not folded yet."
    );
    describe_gauge!(
        "switchboard_outbox_lag_events",
        "Events in the log the outbox has not published yet."
    );
    describe_gauge!(
        "switchboard_webhook_lag_events",
        "Events in the log an alert webhook has not got through yet (alerts or not)."
    );
    describe_counter!(
        "switchboard_webhook_failures_total",
        "Alert webhook attempts that failed (non-2xx, connection error or timeout) and will be retried."
    );
    describe_gauge!(
        "switchboard_live_actors",
        "Live actors by kind (conversation, rate_limiter, agent)."
    );
    describe_gauge!(
        "switchboard_live_conversations",
        "Conversation actors alive now."
    );
    describe_gauge!("switchboard_turns_in_flight", "Agent turns running now.");
    describe_counter!(
        "switchboard_turn_context_reads_total",
        "Turn contexts by where they came from (cache, log_tail, log_whole)."
    );
    describe_counter!(
        "switchboard_passivations_total",
        "Conversation actors stopped, by reason (idle, capacity)."
    );
    describe_counter!(
        "switchboard_rate_limit_refusals_total",
        "Sends refused by a key's rate limit, by key and limit."
    );
    describe_histogram!(
        "switchboard_agent_latency_seconds",
        "Completed turns, from the agent taking them to their end, by agent."
    );
    describe_histogram!(
        "switchboard_agent_ttft_seconds",
        "From a provider call to its first streamed token, by agent."
    );
    describe_counter!(
        "switchboard_upstream_errors_total",
        "Failed provider calls by agent and HTTP status (or kind)."
    );
    describe_gauge!(
        "switchboard_circuit_state",
        "An agent's circuit: 0 closed, 1 half-open, 2 open."
    );
    describe_counter!(
        "switchboard_cost_micros_total",
        "What stored turns cost, in micro-USD, by model."
    );
    describe_counter!(
        "switchboard_tokens_total",
        "Tokens of stored turns, by model and direction (input, output)."
    );
    describe_gauge!(
        "switchboard_nats_connected",
        "1 while the bus reaches the NATS server (always 1 on the embedded bus)."
    );
    describe_counter!(
        "switchboard_nats_reconnects_total",
        "Disconnections from NATS, each followed by reconnection attempts."
    );
    describe_gauge!(
        "switchboard_data_dir_bytes",
        "The size of the data dir's files."
    );
}

/// What [`sample`] reads, every [`SAMPLE_EVERY`].
pub struct Sources {
    pub log: switchboard_events::EventLog,
    pub projections: switchboard_projections::Projections,
    pub outbox: tokio::sync::watch::Receiver<u64>,
    pub registry: switchboard_actors::conversation_actor::ConversationRegistry,
    pub limiters: switchboard_actors::rate_limiter::RateLimiters,
    pub coordinator: switchboard_actors::turns::TurnCoordinator,
    pub agents: usize,
    pub bus: crate::bus::Bus,
    /// Each alert webhook's label and how far it has got.
    pub webhooks: Vec<(String, tokio::sync::watch::Receiver<u64>)>,
}

/// How often the gauges of [`Sources`] are read.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// The data dir's size is summed every this many samples (it lists files).
const DISK_EVERY: u32 = 10;

/// Sets the gauges that are states rather than events (log head, lags, live
/// actors, connection, data dir size) every [`SAMPLE_EVERY`] until `stop`.
pub async fn sample(sources: Sources, stop: impl std::future::Future<Output = ()>) {
    use switchboard_projections::ProjectionName;

    metrics::counter!("switchboard_nats_reconnects_total").increment(0);
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut n: u32 = 0;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = &mut stop => return,
        }
        let head = sources.log.head();
        metrics::gauge!("switchboard_log_head_seq").set(head as f64);
        let failed = sources.log.failure().is_some();
        metrics::gauge!("switchboard_log_failed").set(if failed { 1.0 } else { 0.0 });
        metrics::gauge!("switchboard_projections_seq")
            .set(sources.projections.caught_up_to() as f64);
        for name in ProjectionName::ALL {
            if let Ok(at) = sources.projections.folded_to(name) {
                metrics::gauge!("switchboard_projection_lag_events", "projection" => name.as_str())
                    .set(head.saturating_sub(at) as f64);
            }
        }
        let published = *sources.outbox.borrow();
        metrics::gauge!("switchboard_outbox_lag_events").set(head.saturating_sub(published) as f64);
        for (label, through) in &sources.webhooks {
            metrics::gauge!("switchboard_webhook_lag_events", "webhook" => label.clone())
                .set(head.saturating_sub(*through.borrow()) as f64);
        }
        let live = [
            ("conversation", sources.registry.live_count()),
            ("rate_limiter", sources.limiters.live_count()),
            ("agent", sources.agents),
        ];
        for (kind, count) in live {
            metrics::gauge!("switchboard_live_actors", "kind" => kind).set(count as f64);
        }
        metrics::gauge!("switchboard_live_conversations").set(live[0].1 as f64);
        metrics::gauge!("switchboard_turns_in_flight")
            .set(sources.coordinator.turns_in_flight() as f64);
        metrics::gauge!("switchboard_nats_connected")
            .set(f64::from(u8::from(sources.bus.is_connected())));
        if n.is_multiple_of(DISK_EVERY) {
            let dir = sources.log.dir().to_owned();
            if let Ok(bytes) = tokio::task::spawn_blocking(move || dir_bytes(&dir)).await {
                metrics::gauge!("switchboard_data_dir_bytes").set(bytes as f64);
            }
        }
        n = n.wrapping_add(1);
    }
}

/// The size of the files under `dir`, recursively (unreadable entries count 0).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A listener serving only `GET /metrics`, for a core node without the HTTP front.
pub struct MetricsListener {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsListener {
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Serves [`render`] on `GET /metrics` at `addr`.
pub async fn listen(addr: std::net::SocketAddr) -> std::io::Result<MetricsListener> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                render(),
            )
        }),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        if let Err(error) = served.await {
            tracing::error!(%error, "the metrics listener stopped");
        }
    });
    Ok(MetricsListener { addr, stop, task })
}
