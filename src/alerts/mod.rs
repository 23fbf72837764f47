//! Alerts pushed out of switchboard to where people look: budget thresholds,
//! exhausted budgets and rate-limit refusals.
//!
//! The alert events are exactly those the outbox also publishes on an
//! `{prefix}.alert.…` subject (DESIGN §6): `budget_threshold_crossed`,
//! `budget_exceeded` and `rate_limited`. [`alert_text`] picks them and words
//! each as one human line; a sink carries that line (and the event) out.
//!
//! Sinks follow the durable log, not live NATS, so an alert recorded while a
//! receiver (or NATS) was away is still sent once it is back. The one sink so
//! far is the [`webhook`] (Slack incoming webhooks, or anything that takes
//! JSON); see its module doc for the guarantees.

pub mod webhook;

use std::fmt::Write as _;

use switchboard_events::catalog::{BudgetScope, LimitKind};
use switchboard_events::Event;

pub use webhook::{WebhookConfig, WebhookError, WebhookHandle, WebhookSink};

/// The human line for an alert event; `None` for every other event.
///
/// Money is formatted from the events' integer micro-USD without floats: two
/// decimals, more only when the amount has sub-cent digits (`$0.80`,
/// `$0.001234`). Ids are escaped for Slack (`&`, `<`, `>`), so an id cannot
/// turn into a mention or a link.
///
/// ```
/// use switchboard::alerts::alert_text;
/// use switchboard_events::catalog::{BudgetPeriod, BudgetScope, BudgetThresholdCrossed};
/// use switchboard_events::Event;
///
/// let event = Event::BudgetThresholdCrossed(BudgetThresholdCrossed {
///     scope: BudgetScope::Key,
///     subject_id: "key_ab12".into(),
///     period: BudgetPeriod::Day,
///     period_start: chrono::Utc::now(),
///     threshold_pct: 80,
///     spent_micros: 800_000,
///     budget_micros: 1_000_000,
/// });
/// assert_eq!(
///     alert_text(&event).as_deref(),
///     Some(":warning: key key_ab12 reached 80% of its day budget: $0.80 of $1.00"),
/// );
/// ```
pub fn alert_text(event: &Event) -> Option<String> {
    // Exhaustive on purpose, like the outbox's routes: a new event type needs
    // a decision here, and the two must agree on what an alert is.
    match event {
        Event::BudgetThresholdCrossed(e) => Some(format!(
            ":warning: {} reached {}% of its {} budget: {} of {}",
            whose(e.scope, &e.subject_id),
            e.threshold_pct,
            e.period.as_str(),
            dollars(e.spent_micros),
            dollars(e.budget_micros),
        )),
        Event::BudgetExceeded(e) => Some(format!(
            ":no_entry: {} used up its {} budget: {} of {}",
            whose(e.scope, &e.subject_id),
            e.period.as_str(),
            dollars(e.spent_micros),
            dollars(e.budget_micros),
        )),
        Event::RateLimited(e) => Some(format!(
            ":hourglass: key {} hit its {} limit: {} {} refused, retry after {}",
            slack_escape(&e.key_id),
            match e.limit {
                LimitKind::Rpm => "requests-per-minute",
                LimitKind::Tpm => "tokens-per-minute",
                LimitKind::Parallel => "concurrent-requests",
            },
            e.count,
            if e.count == 1 { "request" } else { "requests" },
            millis(e.retry_after_ms),
        )),
        Event::ConversationStarted(_)
        | Event::MessageReceived(_)
        | Event::AgentRouted(_)
        | Event::ReplyCompleted(_)
        | Event::ReplyFailed(_)
        | Event::ConversationErased(_)
        | Event::UsageRecorded(_)
        | Event::KeyIssued(_)
        | Event::KeyUpdated(_)
        | Event::KeyRevoked(_)
        | Event::AuthFailed(_)
        | Event::AdminAction(_) => None,
    }
}

fn whose(scope: BudgetScope, id: &str) -> String {
    format!("{} {}", scope.as_str(), slack_escape(id))
}

/// `$1.50`, `$0.001234`: cents always, sub-cent digits when there are any.
fn dollars(micros: u64) -> String {
    let mut fraction = format!("{:06}", micros % 1_000_000);
    while fraction.len() > 2 && fraction.ends_with('0') {
        fraction.pop();
    }
    format!("${}.{fraction}", micros / 1_000_000)
}

/// `250 ms`, `1.2 s`, `60 s`: tenths of a second, truncated.
fn millis(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms} ms");
    }
    let mut text = format!("{}", ms / 1000);
    let tenths = ms % 1000 / 100;
    if tenths != 0 {
        let _ = write!(text, ".{tenths}");
    }
    text.push_str(" s");
    text
}

/// The three characters Slack's message formatting gives meaning to.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
