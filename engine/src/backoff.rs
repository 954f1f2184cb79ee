//! Retry timing: exponential backoff with jitter, and the server's own `Retry-After`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `base * 2^attempt`, capped at `cap`, with ±20% jitter so concurrent batches that failed
/// together do not retry in lockstep. Never above `cap`.
pub fn backoff_delay(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    jittered(attempt, base, cap, clock ^ u64::from(attempt).rotate_left(32))
}

/// The deterministic core of [`backoff_delay`], testable with a fixed seed.
pub(crate) fn jittered(attempt: u32, base: Duration, cap: Duration, seed: u64) -> Duration {
    // 2^31 * any sane base already exceeds every cap; the clamp keeps the shift in range.
    let exponential = base.saturating_mul(1u32 << attempt.min(31)).min(cap);
    let permille = (xorshift(seed) % 401) as u128 + 800; // 800..=1200
    let nanos = exponential.as_nanos() * permille / 1000;
    Duration::from_nanos(nanos.min(cap.as_nanos()) as u64)
}

fn xorshift(seed: u64) -> u64 {
    // xorshift64 is stuck at zero, so mix the seed with a non-zero constant first.
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A `Retry-After` header value: delta-seconds or an HTTP-date (a date in the past means
/// "now"). `None` if it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn jitter_is_deterministic_and_bounded() {
        assert_eq!(jittered(0, MS(200), MS(60_000), 0), jittered(0, MS(200), MS(60_000), 0));
        let expected = |seed: u64| MS(200) * 4 * ((xorshift(seed) % 401) as u32 + 800) / 1000;
        assert_eq!(jittered(2, MS(200), MS(60_000), 42), expected(42));
        for seed in 0..2000u64 {
            let d = jittered(3, MS(200), MS(60_000), seed);
            assert!(d >= MS(1280) && d <= MS(1920), "{d:?}");
            // At the cap, jitter may only go down.
            let capped = jittered(20, MS(200), MS(60_000), seed);
            assert!(capped >= MS(48_000) && capped <= MS(60_000), "{capped:?}");
        }
        assert!(jittered(u32::MAX, Duration::from_secs(u64::MAX / 2), MS(60_000), 7) <= MS(60_000));
    }

    #[test]
    fn backoff_grows_exponentially() {
        for attempt in 0..6 {
            let d = backoff_delay(attempt, MS(100), MS(60_000));
            let nominal = MS(100) * 2u32.pow(attempt);
            assert!(
                d >= nominal * 8 / 10 && d <= nominal * 12 / 10,
                "attempt {attempt}: {d:?}"
            );
        }
        assert!(backoff_delay(30, MS(100), MS(5_000)) <= MS(5_000));
    }

    #[test]
    fn retry_after_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }
}
