//! The circuit breaker of an agent: stop calling a model server that keeps
//! failing, so turns fail fast with `unavailable` instead of each waiting out
//! its timeouts and retries, and the server gets room to recover.
//!
//! A pure state machine: time comes in as a parameter and every state change
//! comes back as a [`CircuitTransition`], which the owner turns into an
//! `sb.alert.agent.<name>` alert. No clock, no bus, no locks here.
//!
//! ```text
//!            threshold consecutive failures
//!   Closed ──────────────────────────────────▶ Open ◀──────────┐
//!     ▲                                         │ open_for     │ trial fails
//!     │ trial succeeds                          ▼ passed       │ (Reopened)
//!     └────────────────────────────────────── HalfOpen ────────┘
//!                                       (one trial call at a time)
//! ```

use std::time::Duration;

use tokio::time::Instant;

/// Where the circuit stands, for health reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls go through; failures are being counted.
    Closed,
    /// Calls are refused until the open period ends.
    Open,
    /// The open period has ended: the next call is a trial that decides.
    HalfOpen,
}

impl CircuitState {
    /// The value of the `switchboard_circuit_state` gauge: 0 closed,
    /// 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::HalfOpen => 1.0,
            CircuitState::Open => 2.0,
        }
    }
}

impl CircuitState {
    /// `closed`, `open` or `half_open`, for alerts and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

/// A change of state, returned by the call that caused it so the owner can
/// publish it (`sb.alert.agent.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitTransition {
    /// Closed → open after this many consecutive failures.
    Opened {
        /// The failures in a row that tripped it (the threshold).
        consecutive_failures: u32,
    },
    /// Open → half-open: the open period ended and one trial call goes through.
    HalfOpened,
    /// Half-open → open: the trial call failed; refused for another period.
    Reopened,
    /// Half-open → closed: the trial call succeeded.
    Closed,
}

impl CircuitTransition {
    /// The state the circuit is in after this transition.
    pub fn state_after(self) -> CircuitState {
        match self {
            CircuitTransition::Opened { .. } | CircuitTransition::Reopened => CircuitState::Open,
            CircuitTransition::HalfOpened => CircuitState::HalfOpen,
            CircuitTransition::Closed => CircuitState::Closed,
        }
    }
}

/// A call was refused because the circuit is open (or its one trial is
/// already under way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the circuit is open")]
pub struct CircuitOpen {
    /// How long until a trial call will be let through; `None` while a trial
    /// is in flight (it depends on that call).
    pub retry_in: Option<Duration>,
}

/// Permission to make one call; hand it back with the call's result.
///
/// It remembers whether the call is the half-open trial, so the result of a
/// call admitted earlier (before the circuit opened) cannot be mistaken for
/// the trial's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "report the call's result with `succeeded` or `failed`"]
pub struct CallPermit {
    trial: bool,
}

impl CallPermit {
    /// Whether this call is the half-open trial.
    pub fn is_trial(self) -> bool {
        self.trial
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed {
        consecutive_failures: u32,
    },
    Open {
        until: Instant,
    },
    /// The trial call is under way; everything else is refused until it ends.
    HalfOpen,
}

/// The breaker of one agent. See the module doc for the states.
///
/// ```
/// use std::time::Duration;
/// use switchboard_actors::agent::circuit::{CircuitBreaker, CircuitTransition};
/// use tokio::time::Instant;
///
/// let mut breaker = CircuitBreaker::new(2, Duration::from_secs(30));
/// let now = Instant::now();
/// let call = breaker.admit(now).unwrap().0;
/// assert_eq!(breaker.failed(call, now), None);
/// let call = breaker.admit(now).unwrap().0;
/// assert_eq!(
///     breaker.failed(call, now),
///     Some(CircuitTransition::Opened { consecutive_failures: 2 })
/// );
/// assert!(breaker.admit(now).is_err(), "open: refused without a call");
/// ```
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    threshold: u32,
    open_for: Duration,
    inner: Inner,
}

impl CircuitBreaker {
    /// A closed breaker that opens after `threshold` consecutive failures (at
    /// least 1) and stays open for `open_for` before letting a trial through.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        CircuitBreaker {
            threshold: threshold.max(1),
            open_for,
            inner: Inner::Closed {
                consecutive_failures: 0,
            },
        }
    }

    /// The state at `now`: an open circuit whose period has ended reports
    /// half-open (the next call will be the trial).
    pub fn state(&self, now: Instant) -> CircuitState {
        match self.inner {
            Inner::Closed { .. } => CircuitState::Closed,
            Inner::Open { until } if now < until => CircuitState::Open,
            Inner::Open { .. } | Inner::HalfOpen => CircuitState::HalfOpen,
        }
    }

    /// Whether a call at `now` would be refused — without taking the trial
    /// slot. Lets a caller fail fast before queueing for a concurrency permit.
    pub fn would_refuse(&self, now: Instant) -> bool {
        match self.inner {
            Inner::Closed { .. } => false,
            Inner::Open { until } => now < until,
            Inner::HalfOpen => true,
        }
    }

    /// Ask to make a call at `now`. When the open period has just ended, this
    /// call becomes the trial and the transition to half-open comes back with it.
    pub fn admit(
        &mut self,
        now: Instant,
    ) -> Result<(CallPermit, Option<CircuitTransition>), CircuitOpen> {
        match self.inner {
            Inner::Closed { .. } => Ok((CallPermit { trial: false }, None)),
            Inner::Open { until } if now < until => Err(CircuitOpen {
                retry_in: Some(until - now),
            }),
            Inner::Open { .. } => {
                self.inner = Inner::HalfOpen;
                Ok((
                    CallPermit { trial: true },
                    Some(CircuitTransition::HalfOpened),
                ))
            }
            Inner::HalfOpen => Err(CircuitOpen { retry_in: None }),
        }
    }

    /// The call answered: the server is up. Resets the failure count; a
    /// successful trial closes the circuit.
    pub fn succeeded(&mut self, permit: CallPermit, _now: Instant) -> Option<CircuitTransition> {
        match self.inner {
            Inner::Closed { .. } => {
                self.inner = Inner::Closed {
                    consecutive_failures: 0,
                };
                None
            }
            Inner::HalfOpen if permit.trial => {
                self.inner = Inner::Closed {
                    consecutive_failures: 0,
                };
                Some(CircuitTransition::Closed)
            }
            // A call admitted before the circuit opened says little about now.
            Inner::HalfOpen | Inner::Open { .. } => None,
        }
    }

    /// The call failed in a way that says the server is unwell (a transient
    /// error). Opens the circuit at the threshold; a failed trial reopens it.
    pub fn failed(&mut self, permit: CallPermit, now: Instant) -> Option<CircuitTransition> {
        match self.inner {
            Inner::Closed {
                consecutive_failures,
            } => {
                let consecutive_failures = consecutive_failures.saturating_add(1);
                if consecutive_failures >= self.threshold {
                    self.inner = Inner::Open {
                        until: now + self.open_for,
                    };
                    Some(CircuitTransition::Opened {
                        consecutive_failures,
                    })
                } else {
                    self.inner = Inner::Closed {
                        consecutive_failures,
                    };
                    None
                }
            }
            Inner::HalfOpen if permit.trial => {
                self.inner = Inner::Open {
                    until: now + self.open_for,
                };
                Some(CircuitTransition::Reopened)
            }
            // Stragglers admitted before the circuit opened: already counted.
            Inner::HalfOpen | Inner::Open { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(30);

    fn fail(breaker: &mut CircuitBreaker, now: Instant) -> Option<CircuitTransition> {
        let (permit, _) = breaker.admit(now).expect("admitted");
        breaker.failed(permit, now)
    }

    fn succeed(breaker: &mut CircuitBreaker, now: Instant) -> Option<CircuitTransition> {
        let (permit, _) = breaker.admit(now).expect("admitted");
        breaker.succeeded(permit, now)
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let now = Instant::now();
        let mut breaker = CircuitBreaker::new(3, OPEN_FOR);
        assert_eq!(fail(&mut breaker, now), None);
        assert_eq!(fail(&mut breaker, now), None);
        assert_eq!(breaker.state(now), CircuitState::Closed);
        assert_eq!(
            fail(&mut breaker, now),
            Some(CircuitTransition::Opened {
                consecutive_failures: 3
            })
        );
        assert_eq!(breaker.state(now), CircuitState::Open);
        assert!(breaker.would_refuse(now));
        assert_eq!(
            breaker.admit(now + Duration::from_secs(10)),
            Err(CircuitOpen {
                retry_in: Some(Duration::from_secs(20))
            })
        );
    }

    #[test]
    fn a_success_resets_the_count() {
        let now = Instant::now();
        let mut breaker = CircuitBreaker::new(2, OPEN_FOR);
        assert_eq!(fail(&mut breaker, now), None);
        assert_eq!(succeed(&mut breaker, now), None);
        assert_eq!(fail(&mut breaker, now), None, "the count restarted");
        assert_eq!(breaker.state(now), CircuitState::Closed);
    }

    #[test]
    fn half_open_lets_one_trial_through_and_closes_on_success() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(1, OPEN_FOR);
        assert!(fail(&mut breaker, start).is_some());
        let later = start + OPEN_FOR;
        assert_eq!(breaker.state(later), CircuitState::HalfOpen);
        assert!(!breaker.would_refuse(later));

        let (trial, transition) = breaker.admit(later).expect("the trial");
        assert!(trial.is_trial());
        assert_eq!(transition, Some(CircuitTransition::HalfOpened));
        assert_eq!(
            breaker.admit(later),
            Err(CircuitOpen { retry_in: None }),
            "one trial at a time"
        );
        assert!(breaker.would_refuse(later));

        assert_eq!(
            breaker.succeeded(trial, later),
            Some(CircuitTransition::Closed)
        );
        assert_eq!(breaker.state(later), CircuitState::Closed);
        assert_eq!(succeed(&mut breaker, later), None);
    }

    #[test]
    fn a_failed_trial_reopens_for_another_period() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(1, OPEN_FOR);
        assert!(fail(&mut breaker, start).is_some());
        let later = start + OPEN_FOR + Duration::from_secs(1);
        let (trial, _) = breaker.admit(later).expect("the trial");
        assert_eq!(
            breaker.failed(trial, later),
            Some(CircuitTransition::Reopened)
        );
        assert_eq!(breaker.state(later), CircuitState::Open);
        assert_eq!(
            breaker.admit(later + Duration::from_secs(5)),
            Err(CircuitOpen {
                retry_in: Some(OPEN_FOR - Duration::from_secs(5))
            }),
            "the new period counts from the failed trial"
        );
        let (_, transition) = breaker.admit(later + OPEN_FOR).expect("another trial");
        assert_eq!(transition, Some(CircuitTransition::HalfOpened));
    }

    #[test]
    fn stragglers_do_not_decide_the_trial() {
        let now = Instant::now();
        let mut breaker = CircuitBreaker::new(1, OPEN_FOR);
        // Two calls admitted while closed; the first failure opens the circuit.
        let (first, _) = breaker.admit(now).expect("closed");
        let (second, _) = breaker.admit(now).expect("closed");
        assert!(breaker.failed(first, now).is_some());
        assert_eq!(breaker.failed(second, now), None, "already open");
        assert_eq!(breaker.succeeded(second, now), None, "stays open");
        assert_eq!(breaker.state(now), CircuitState::Open);

        let later = now + OPEN_FOR;
        let (trial, _) = breaker.admit(later).expect("the trial");
        assert_eq!(breaker.succeeded(second, later), None, "not the trial");
        assert_eq!(breaker.failed(second, later), None, "not the trial");
        assert_eq!(breaker.state(later), CircuitState::HalfOpen);
        assert_eq!(
            breaker.succeeded(trial, later),
            Some(CircuitTransition::Closed)
        );
    }

    #[test]
    fn a_zero_threshold_means_one() {
        let now = Instant::now();
        let mut breaker = CircuitBreaker::new(0, OPEN_FOR);
        assert_eq!(succeed(&mut breaker, now), None);
        assert_eq!(
            fail(&mut breaker, now),
            Some(CircuitTransition::Opened {
                consecutive_failures: 1
            })
        );
    }

    #[test]
    fn transitions_name_the_state_they_lead_to() {
        assert_eq!(
            CircuitTransition::Opened {
                consecutive_failures: 3
            }
            .state_after(),
            CircuitState::Open
        );
        assert_eq!(
            CircuitTransition::Reopened.state_after(),
            CircuitState::Open
        );
        assert_eq!(
            CircuitTransition::HalfOpened.state_after().as_str(),
            "half_open"
        );
        assert_eq!(
            CircuitTransition::Closed.state_after(),
            CircuitState::Closed
        );
    }
}
