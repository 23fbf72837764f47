//! The process's metrics in the Prometheus text format, through the
//! `metrics` crate: counters and gauges are recorded where things happen
//! (`switchboard_cost_micros_total{model}` when a turn's usage is stored,
//! `switchboard_budget_remaining_micros{scope,subject}` when a budget is
//! checked) and rendered by `GET /metrics`.
//!
//! One recorder per process, installed by the first [`install`]; later calls
//! (another server in the same process, as in tests) share it. Counters
//! start at zero with the process, as Prometheus expects: `increase()` and
//! `rate()` handle restarts, and the costs projection keeps the all-time sums.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder, once per process. Returns false when
/// another recorder was installed first (the metrics then go to it, and
/// [`render`] has nothing).
pub fn install() -> bool {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new().install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .is_some()
}

/// Everything recorded so far, in the Prometheus text format.
pub fn render() -> String {
    HANDLE
        .get()
        .and_then(Option::as_ref)
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}

fn describe() {
    metrics::describe_counter!(
        "switchboard_cost_micros_total",
        "What stored turns cost, in micro-USD, by model."
    );
    metrics::describe_counter!(
        "switchboard_tokens_total",
        "Tokens of stored turns, by model and direction (input, output)."
    );
    metrics::describe_gauge!(
        "switchboard_budget_remaining_micros",
        "What is left of a budget this period, in micro-USD, by scope (key, user) and subject."
    );
}
