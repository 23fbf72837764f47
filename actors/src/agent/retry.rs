//! How long an agent waits before trying a failed call again.
//!
//! Exponential backoff with "equal jitter": the n-th retry waits between half
//! and all of `min(backoff_max, backoff_base × 2ⁿ)`, so turns that failed
//! together do not retry together, and none retries immediately. A server that
//! says how long to wait (`Retry-After`) is obeyed — unless it asks for longer
//! than `backoff_max`, in which case the turn gives up at once rather than hold
//! its caller for a wait it was configured never to make.
//!
//! The jitter is a parameter (a random `u64` from the caller), so the rules are
//! tested without randomness.

use std::time::Duration;

use crate::provider::ProviderError;

/// The wait before retry number `retry` (0 for the first retry), or `None`
/// when `error` asks for a wait longer than `max`.
pub(crate) fn retry_delay(
    error: &ProviderError,
    retry: u32,
    base: Duration,
    max: Duration,
    jitter: u64,
) -> Option<Duration> {
    let backoff = backoff_delay(retry, base, max, jitter);
    match error {
        ProviderError::RateLimited {
            retry_after: Some(after),
        } => (*after <= max).then(|| backoff.max(*after)),
        _ => Some(backoff),
    }
}

/// `min(max, base × 2^retry)`, of which the upper half is scaled by
/// `jitter / u64::MAX`.
pub(crate) fn backoff_delay(retry: u32, base: Duration, max: Duration, jitter: u64) -> Duration {
    let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
    let ceiling = base.saturating_mul(factor).min(max);
    let half = ceiling / 2;
    let spread = (ceiling - half).as_nanos() * u128::from(jitter) / u128::from(u64::MAX);
    // `spread` ≤ the span of a `Duration` already held, so it fits in u64 nanos.
    half + Duration::from_nanos(u64::try_from(spread).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    #[test]
    fn doubles_up_to_the_maximum() {
        let full = |retry| backoff_delay(retry, BASE, MAX, u64::MAX);
        assert_eq!(full(0), Duration::from_millis(100));
        assert_eq!(full(1), Duration::from_millis(200));
        assert_eq!(full(3), Duration::from_millis(800));
        assert_eq!(full(5), MAX, "3.2 s capped at 2 s");
        assert_eq!(full(100), MAX, "no overflow on absurd retry counts");
    }

    #[test]
    fn jitter_spans_the_upper_half() {
        assert_eq!(backoff_delay(2, BASE, MAX, 0), Duration::from_millis(200));
        assert_eq!(
            backoff_delay(2, BASE, MAX, u64::MAX / 2),
            Duration::from_millis(300) - Duration::from_nanos(1),
            "the middle of 200..=400 ms, rounded down"
        );
        assert_eq!(
            backoff_delay(2, BASE, MAX, u64::MAX),
            Duration::from_millis(400)
        );
        assert_eq!(
            backoff_delay(0, Duration::ZERO, MAX, 12345),
            Duration::ZERO,
            "a zero base never waits"
        );
    }

    #[test]
    fn retry_after_is_honoured_within_the_maximum() {
        let limited = |secs| ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert_eq!(
            retry_delay(&limited(1), 0, BASE, MAX, 0),
            Some(Duration::from_secs(1)),
            "longer than the backoff: the server's wait"
        );
        assert_eq!(
            retry_delay(&limited(0), 3, BASE, MAX, u64::MAX),
            Some(Duration::from_millis(800)),
            "shorter than the backoff: the backoff"
        );
        assert_eq!(
            retry_delay(&limited(3), 0, BASE, MAX, 0),
            None,
            "longer than the maximum: give up"
        );
        let unsaid = ProviderError::RateLimited { retry_after: None };
        assert_eq!(
            retry_delay(&unsaid, 1, BASE, MAX, u64::MAX),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            retry_delay(&ProviderError::Timeout, 0, BASE, MAX, 0),
            Some(Duration::from_millis(50))
        );
    }
}
