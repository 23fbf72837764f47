//! Rate-limit headers on replies to keyed requests, named as HTTP names them
//! (IETF `RateLimit-*`, OpenAI's `x-ratelimit-*`, `Retry-After`), so an HTTP
//! front copies them through unchanged and a NATS client reads the same.
//!
//! `RateLimit-*` describe the request limit (rpm) when the key has one, else
//! the token limit (tpm); `x-ratelimit-*-requests` and `-tokens` each describe
//! their own. A key with neither limit gets none of these headers: it has
//! nothing to run out of.

use std::time::Duration;

use switchboard_actors::rate_limit::Remaining;
use switchboard_events::catalog::Limits;

use crate::bus::Headers;

/// The headers for a key with `limits` and `remaining`; `retry_after` on a
/// refusal.
pub fn headers(limits: &Limits, remaining: &Remaining, retry_after: Option<Duration>) -> Headers {
    let mut headers = Headers::new();
    let reset_secs = remaining.reset.as_millis().div_ceil(1000).to_string();
    let reset_openai = openai_duration(remaining.reset);
    let requests = limits
        .rpm
        .map(|limit| (u64::from(limit), remaining.requests.unwrap_or(0)));
    let tokens = limits
        .tpm
        .map(|limit| (limit, remaining.tokens.unwrap_or(0)));
    if let Some((limit, left)) = requests.or(tokens) {
        headers.insert("RateLimit-Limit", limit.to_string());
        headers.insert("RateLimit-Remaining", left.to_string());
        headers.insert("RateLimit-Reset", reset_secs);
    }
    for (name, figures) in [("requests", requests), ("tokens", tokens)] {
        if let Some((limit, left)) = figures {
            headers.insert(format!("x-ratelimit-limit-{name}"), limit.to_string());
            headers.insert(format!("x-ratelimit-remaining-{name}"), left.to_string());
            headers.insert(format!("x-ratelimit-reset-{name}"), reset_openai.clone());
        }
    }
    if let Some(wait) = retry_after {
        headers.insert(
            "Retry-After",
            wait.as_millis().div_ceil(1000).max(1).to_string(),
        );
    }
    headers
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `1s`, `6m0s`,
/// `250ms`.
fn openai_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let secs = millis.div_ceil(1000);
    if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_the_limits_the_key_has() {
        let remaining = Remaining {
            requests: Some(3),
            tokens: Some(900),
            reset: Duration::from_millis(12_300),
        };
        let both = Limits {
            rpm: Some(5),
            tpm: Some(1000),
            max_parallel: None,
        };
        let h = headers(&both, &remaining, None);
        assert_eq!(h.get("RateLimit-Limit"), Some("5"));
        assert_eq!(h.get("RateLimit-Remaining"), Some("3"));
        assert_eq!(h.get("RateLimit-Reset"), Some("13"));
        assert_eq!(h.get("x-ratelimit-limit-tokens"), Some("1000"));
        assert_eq!(h.get("x-ratelimit-remaining-tokens"), Some("900"));
        assert_eq!(h.get("x-ratelimit-reset-requests"), Some("13s"));
        assert_eq!(h.get("Retry-After"), None);

        let tokens_only = Limits {
            tpm: Some(1000),
            ..Limits::default()
        };
        let h = headers(&tokens_only, &remaining, Some(Duration::from_millis(1)));
        assert_eq!(h.get("RateLimit-Limit"), Some("1000"));
        assert_eq!(h.get("x-ratelimit-limit-requests"), None);
        assert_eq!(h.get("Retry-After"), Some("1"));

        assert!(headers(&Limits::default(), &remaining, None).is_empty());
    }

    #[test]
    fn openai_durations() {
        assert_eq!(openai_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(openai_duration(Duration::from_millis(1001)), "2s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
    }
}
