//! The per-key rate limit: requests per minute, tokens per minute and concurrent
//! requests (DESIGN §5), as a state machine the `RateLimiter` actor drives.
//!
//! Time comes in as a parameter, so tests step it instead of sleeping. Windows
//! slide: a request admitted at `t` counts against the minute `(t - 60s, t]`,
//! so a key with rpm 5 gets exactly 5 admissions in any minute, never 10 across
//! a window boundary. Tokens are known only when a turn ends; a turn's tokens
//! count from when they are recorded.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use switchboard_events::catalog::{LimitKind, Limits};

/// The window of `rpm` and `tpm`.
pub const WINDOW: Duration = Duration::from_secs(60);

/// What to tell a refused caller about concurrency: turns usually end within
/// seconds, and nothing better is known when the refusal is made.
pub const PARALLEL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Refusals are summarised into at most one `rate_limited` event per key per
/// this interval.
pub const REFUSAL_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Why a request was refused, and when trying again can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub limit: LimitKind,
    pub retry_after: Duration,
}

/// What is left of each limit, for `RateLimit-*` headers. `None`: unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
    /// When the oldest admission (under an rpm) or token record (under a tpm)
    /// leaves the window; zero when nothing limited is in it.
    pub reset: Duration,
}

/// A refusal summary due for the audit trail: `count` refusals since the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalReport {
    pub limit: LimitKind,
    pub count: u64,
    pub retry_after: Duration,
}

/// The limit state of one key.
#[derive(Debug)]
pub struct KeyRateLimit {
    limits: Limits,
    admitted: VecDeque<Instant>,
    tokens: VecDeque<(Instant, u64)>,
    tokens_in_window: u64,
    in_flight: u32,
    unreported: u64,
    /// The latest of the unreported refusals: what a flushed report names.
    last_refusal: Option<Refusal>,
    last_report: Option<Instant>,
}

impl KeyRateLimit {
    pub fn new(limits: Limits) -> Self {
        KeyRateLimit {
            limits,
            admitted: VecDeque::new(),
            tokens: VecDeque::new(),
            tokens_in_window: 0,
            in_flight: 0,
            unreported: 0,
            last_refusal: None,
            last_report: None,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Applies changed limits (`key_updated`); history in the window is kept.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Admits a request now, or says which limit refuses it and for how long.
    /// An admitted request holds a concurrency slot until [`Self::finish`].
    pub fn try_admit(&mut self, now: Instant) -> Result<(), Refusal> {
        self.expire(now);
        if let Some(max) = self.limits.max_parallel {
            if self.in_flight >= max {
                return Err(Refusal {
                    limit: LimitKind::Parallel,
                    retry_after: PARALLEL_RETRY_AFTER,
                });
            }
        }
        // A limit of 0 pauses the key: every request is refused, and a
        // minute is as good a guess as any of when to ask again.
        if self.limits.rpm == Some(0) || self.limits.tpm == Some(0) {
            return Err(Refusal {
                limit: if self.limits.rpm == Some(0) {
                    LimitKind::Rpm
                } else {
                    LimitKind::Tpm
                },
                retry_after: WINDOW,
            });
        }
        if let Some(rpm) = self.limits.rpm {
            if self.admitted.len() as u64 >= u64::from(rpm) {
                // Room comes back when enough old admissions leave the window.
                let excess = self.admitted.len() - rpm as usize;
                let frees_at = self.admitted[excess] + WINDOW;
                return Err(Refusal {
                    limit: LimitKind::Rpm,
                    retry_after: frees_at.saturating_duration_since(now),
                });
            }
        }
        if let Some(tpm) = self.limits.tpm {
            if self.tokens_in_window >= tpm {
                return Err(Refusal {
                    limit: LimitKind::Tpm,
                    retry_after: self.tokens_free_at(tpm, now).saturating_duration_since(now),
                });
            }
        }
        self.admitted.push_back(now);
        self.in_flight += 1;
        Ok(())
    }

    /// Ends an admitted request: frees its concurrency slot and counts its tokens.
    pub fn finish(&mut self, now: Instant, tokens: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if tokens > 0 {
            self.tokens.push_back((now, tokens));
            self.tokens_in_window += tokens;
        }
        self.expire(now);
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    pub fn remaining(&mut self, now: Instant) -> Remaining {
        self.expire(now);
        let oldest = [
            self.admitted
                .front()
                .copied()
                .filter(|_| self.limits.rpm.is_some()),
            self.tokens
                .front()
                .map(|(at, _)| *at)
                .filter(|_| self.limits.tpm.is_some()),
        ]
        .into_iter()
        .flatten()
        .min();
        Remaining {
            requests: self
                .limits
                .rpm
                .map(|rpm| u64::from(rpm).saturating_sub(self.admitted.len() as u64)),
            tokens: self
                .limits
                .tpm
                .map(|tpm| tpm.saturating_sub(self.tokens_in_window)),
            reset: oldest.map_or(Duration::ZERO, |at| {
                (at + WINDOW).saturating_duration_since(now)
            }),
        }
    }

    /// Counts a refusal; returns a summary when one is due (at most one per
    /// [`REFUSAL_REPORT_INTERVAL`]), covering every refusal since the last.
    /// When none is due the refusal waits for [`Self::flush_refusals`] at
    /// [`Self::report_due_at`].
    pub fn note_refusal(&mut self, now: Instant, refusal: Refusal) -> Option<RefusalReport> {
        self.unreported += 1;
        self.last_refusal = Some(refusal);
        self.flush_refusals(now)
    }

    /// The summary of the refusals not yet reported, if there are any and one
    /// is due. A report names the latest refusal's limit and `retry_after`.
    pub fn flush_refusals(&mut self, now: Instant) -> Option<RefusalReport> {
        let refusal = self.last_refusal?;
        let due = self
            .last_report
            .is_none_or(|last| now.saturating_duration_since(last) >= REFUSAL_REPORT_INTERVAL);
        if !due || self.unreported == 0 {
            return None;
        }
        self.last_report = Some(now);
        self.last_refusal = None;
        Some(RefusalReport {
            limit: refusal.limit,
            count: std::mem::take(&mut self.unreported),
            retry_after: refusal.retry_after,
        })
    }

    /// When the unreported refusals may be reported (`now` if already);
    /// `None` when there are none.
    pub fn report_due_at(&self, now: Instant) -> Option<Instant> {
        self.last_refusal?;
        Some(
            self.last_report
                .map_or(now, |last| (last + REFUSAL_REPORT_INTERVAL).max(now)),
        )
    }

    /// Takes back a report that could not be stored, to be included in the
    /// next one: its refusals are counted again as unreported.
    pub fn restore_report(&mut self, report: RefusalReport) {
        self.unreported += report.count;
        self.last_refusal.get_or_insert(Refusal {
            limit: report.limit,
            retry_after: report.retry_after,
        });
    }

    /// True when forgetting this key loses nothing: no request in flight, the
    /// windows empty and no refusal unreported. A fresh `KeyRateLimit` with the
    /// same limits would answer exactly the same from here on.
    pub fn is_idle(&mut self, now: Instant) -> bool {
        self.expire(now);
        self.in_flight == 0
            && self.admitted.is_empty()
            && self.tokens.is_empty()
            && self.last_refusal.is_none()
    }

    /// The earliest time the tokens in the window drop below `tpm` (`now` if
    /// they already are).
    fn tokens_free_at(&self, tpm: u64, now: Instant) -> Instant {
        let mut sum = self.tokens_in_window;
        for (at, tokens) in &self.tokens {
            if sum < tpm {
                break;
            }
            sum -= tokens;
            if sum < tpm {
                return *at + WINDOW;
            }
        }
        now
    }

    fn expire(&mut self, now: Instant) {
        while self
            .admitted
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= WINDOW)
        {
            self.admitted.pop_front();
        }
        while let Some((at, tokens)) = self.tokens.front().copied() {
            if now.saturating_duration_since(at) < WINDOW {
                break;
            }
            self.tokens.pop_front();
            self.tokens_in_window -= tokens;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: Option<u32>, tpm: Option<u64>, max_parallel: Option<u32>) -> Limits {
        Limits {
            rpm,
            tpm,
            max_parallel,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn rpm_admits_exactly_the_limit_in_any_minute() {
        let start = Instant::now();
        let mut limit = KeyRateLimit::new(limits(Some(5), None, None));
        for i in 0..5 {
            limit.try_admit(start + secs(i)).expect("within rpm");
            limit.finish(start + secs(i), 0);
        }
        let refused = limit
            .try_admit(start + secs(10))
            .expect_err("sixth in the minute");
        assert_eq!(refused.limit, LimitKind::Rpm);
        // The first admission (t=0) leaves the window at t=60.
        assert_eq!(refused.retry_after, secs(50));
        assert!(limit.try_admit(start + secs(59)).is_err());
        limit
            .try_admit(start + secs(60))
            .expect("the first left the window");
        // Sliding: at t=60.5 the window holds t=1..4 and t=60: full again.
        assert!(limit
            .try_admit(start + Duration::from_millis(60_500))
            .is_err());
        // Across many minutes, never more than 5 in any 60 s.
        let mut admitted: Vec<Instant> = Vec::new();
        let mut limit = KeyRateLimit::new(limits(Some(5), None, None));
        for step in 0..600u64 {
            let now = start + Duration::from_millis(step * 700);
            if limit.try_admit(now).is_ok() {
                limit.finish(now, 0);
                admitted.push(now);
            }
        }
        for (i, at) in admitted.iter().enumerate() {
            let in_window = admitted[i..]
                .iter()
                .take_while(|later| later.saturating_duration_since(*at) < WINDOW)
                .count();
            assert!(in_window <= 5, "{in_window} admissions within a minute");
        }
        assert!(
            admitted.len() >= 5 * 6,
            "the limit must also admit: {}",
            admitted.len()
        );
    }

    #[test]
    fn a_zero_limit_refuses_everything_with_a_minute_to_wait() {
        let start = Instant::now();
        for (limits, kind) in [
            (limits(Some(0), None, None), LimitKind::Rpm),
            (limits(None, Some(0), None), LimitKind::Tpm),
            (limits(Some(0), Some(0), Some(3)), LimitKind::Rpm),
        ] {
            let mut limit = KeyRateLimit::new(limits);
            for i in 0..3 {
                let refused = limit.try_admit(start + secs(i * 100)).expect_err("paused");
                assert_eq!(refused.limit, kind);
                assert_eq!(refused.retry_after, WINDOW);
            }
            assert_eq!(limit.in_flight(), 0);
        }
    }

    #[test]
    fn retry_after_is_exact_when_several_are_over() {
        let start = Instant::now();
        let mut limit = KeyRateLimit::new(limits(Some(3), None, None));
        for i in 0..3 {
            limit.try_admit(start + secs(i * 10)).expect("within rpm");
        }
        limit.set_limits(limits(Some(1), None, None));
        // Three in the window, limit one: a fourth fits only when all three have
        // left — the last, admitted at t=20, leaves at t=80.
        let refused = limit
            .try_admit(start + secs(30))
            .expect_err("over the lowered limit");
        assert_eq!(refused.retry_after, secs(50));
        limit
            .try_admit(start + secs(79))
            .expect_err("t=20 is still in the window");
        limit
            .try_admit(start + secs(80))
            .expect("the window is empty");
    }

    #[test]
    fn tpm_refuses_until_enough_tokens_leave_the_window() {
        let start = Instant::now();
        let mut limit = KeyRateLimit::new(limits(None, Some(1000), None));
        limit.try_admit(start).expect("no tokens yet");
        limit.finish(start + secs(1), 600);
        limit.try_admit(start + secs(2)).expect("600 < 1000");
        limit.finish(start + secs(5), 600);
        let refused = limit.try_admit(start + secs(6)).expect_err("1200 >= 1000");
        assert_eq!(refused.limit, LimitKind::Tpm);
        // The 600 recorded at t=1 leave at t=61, bringing the sum to 600.
        assert_eq!(refused.retry_after, secs(55));
        // Without an rpm, the admission at t=0 does not set the reset.
        assert_eq!(limit.remaining(start + secs(6)).reset, secs(55));
        limit
            .try_admit(start + secs(61))
            .expect("back under the limit");
        assert_eq!(limit.remaining(start + secs(61)).tokens, Some(400));
    }

    #[test]
    fn concurrency_is_held_until_finish() {
        let now = Instant::now();
        let mut limit = KeyRateLimit::new(limits(None, None, Some(2)));
        limit.try_admit(now).expect("first");
        limit.try_admit(now).expect("second");
        let refused = limit.try_admit(now).expect_err("third while two run");
        assert_eq!(
            refused,
            Refusal {
                limit: LimitKind::Parallel,
                retry_after: PARALLEL_RETRY_AFTER
            }
        );
        limit.finish(now, 0);
        assert_eq!(limit.in_flight(), 1);
        limit.try_admit(now).expect("a slot came back");
    }

    #[test]
    fn unlimited_keys_are_always_admitted() {
        let now = Instant::now();
        let mut limit = KeyRateLimit::new(Limits::default());
        for _ in 0..10_000 {
            limit.try_admit(now).expect("unlimited");
        }
        let remaining = limit.remaining(now);
        assert_eq!((remaining.requests, remaining.tokens), (None, None));
    }

    #[test]
    fn remaining_counts_down_and_resets_with_the_oldest_entry() {
        let start = Instant::now();
        let mut limit = KeyRateLimit::new(limits(Some(10), Some(100), None));
        limit.try_admit(start).expect("admit");
        limit.finish(start + secs(3), 30);
        let remaining = limit.remaining(start + secs(5));
        assert_eq!(remaining.requests, Some(9));
        assert_eq!(remaining.tokens, Some(70));
        assert_eq!(remaining.reset, secs(55));
        let later = limit.remaining(start + secs(64));
        assert_eq!(
            (later.requests, later.tokens, later.reset),
            (Some(10), Some(100), Duration::ZERO)
        );
    }

    #[test]
    fn refusals_are_reported_at_most_once_a_second_with_their_count() {
        let start = Instant::now();
        let mut limit = KeyRateLimit::new(limits(Some(1), None, None));
        limit.try_admit(start).expect("admit");
        let mut reports = Vec::new();
        for step in 0..25u64 {
            let now = start + Duration::from_millis(step * 100);
            let refusal = limit.try_admit(now).expect_err("over rpm");
            reports.extend(limit.note_refusal(now, refusal));
        }
        // Refusals at 0.0..=2.4 s: reports at 0.0, 1.0 and 2.0 s.
        assert_eq!(reports.len(), 3);
        assert_eq!(
            reports.iter().map(|r| r.count).collect::<Vec<_>>(),
            [1, 10, 10]
        );
        assert!(reports.iter().all(|r| r.limit == LimitKind::Rpm));
    }

    #[test]
    fn pending_refusals_are_flushed_once_their_interval_ends() {
        let start = Instant::now();
        let mut limit = KeyRateLimit::new(limits(None, None, Some(1)));
        limit.try_admit(start).expect("admit");
        assert_eq!(limit.report_due_at(start), None, "nothing to report");
        let refusal = limit.try_admit(start).expect_err("over max_parallel");
        let first = limit
            .note_refusal(start, refusal)
            .expect("the first is reported");
        assert_eq!(first.count, 1);
        for ms in [100, 200, 300] {
            let now = start + Duration::from_millis(ms);
            assert_eq!(limit.note_refusal(now, refusal), None);
        }
        let due = limit.report_due_at(start).expect("three pending");
        assert_eq!(due, start + REFUSAL_REPORT_INTERVAL);
        assert_eq!(limit.flush_refusals(due - Duration::from_millis(1)), None);
        let flushed = limit.flush_refusals(due).expect("due");
        assert_eq!((flushed.limit, flushed.count), (LimitKind::Parallel, 3));
        assert_eq!(limit.flush_refusals(due + secs(5)), None, "nothing left");
        assert_eq!(limit.report_due_at(due), None);
    }

    #[test]
    fn a_restored_report_is_counted_into_the_next() {
        let start = Instant::now();
        let mut limit = KeyRateLimit::new(limits(Some(1), None, None));
        limit.try_admit(start).expect("admit");
        let refusal = limit.try_admit(start).expect_err("over rpm");
        let lost = limit.note_refusal(start, refusal).expect("reported");
        limit.restore_report(lost);
        assert_eq!(
            limit.report_due_at(start),
            Some(start + REFUSAL_REPORT_INTERVAL)
        );
        assert_eq!(
            limit.note_refusal(start, refusal),
            None,
            "within the second"
        );
        let next = limit
            .flush_refusals(start + REFUSAL_REPORT_INTERVAL)
            .expect("due");
        assert_eq!(next.count, 2, "the lost refusal and the new one");
    }

    #[test]
    fn a_key_is_idle_once_nothing_is_in_flight_in_a_window_or_unreported() {
        let start = Instant::now();
        let mut limit = KeyRateLimit::new(limits(Some(1), Some(100), None));
        assert!(limit.is_idle(start), "a fresh key");
        limit.try_admit(start).expect("admit");
        assert!(!limit.is_idle(start), "in flight");
        limit.finish(start + secs(10), 5);
        assert!(!limit.is_idle(start + secs(10)), "in the windows");
        let refusal = limit.try_admit(start + secs(20)).expect_err("over rpm");
        limit.note_refusal(start + secs(20), refusal);
        limit.note_refusal(start + secs(20), refusal);
        // The admission left at 60 s, the tokens at 70 s; one refusal is unreported.
        assert!(!limit.is_idle(start + secs(70)));
        limit.flush_refusals(start + secs(70)).expect("due");
        assert!(limit.is_idle(start + secs(70)));
    }
}
