//! Token bucket: the destination's request budget, shared by every concurrent batch.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    /// When `tokens` was last brought up to date; `None` until first use, so a bucket built
    /// long before its first request still starts full and no earlier.
    updated: Option<Instant>,
}

impl TokenBucket {
    /// `rate_per_sec` tokens are added per second, up to `burst`; the bucket starts full.
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        assert!(rate_per_sec > 0.0 && burst >= 1.0, "rate must be > 0 and burst >= 1");
        TokenBucket {
            rate: rate_per_sec,
            burst,
            tokens: burst,
            updated: None,
        }
    }

    /// The burst the worker uses: one second's worth of requests, at least one.
    pub fn per_second(rate_per_sec: f64) -> Self {
        Self::new(rate_per_sec, rate_per_sec.max(1.0))
    }

    /// Takes a token, or says how long until one is available.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(updated) = self.updated {
            let elapsed = now.saturating_duration_since(updated).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.updated = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        // Rounded to the microsecond (float noise), never zero: waiting a hair too long is fine,
        // a zero wait would spin.
        let micros = ((1.0 - self.tokens) / self.rate * 1e6).round().max(1.0);
        Err(Duration::from_micros(micros as u64))
    }

    pub async fn acquire(&mut self) {
        while let Err(wait) = self.try_acquire(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn burst_then_steady_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(5.0, 5.0);
        for _ in 0..5 {
            assert_eq!(bucket.try_acquire(t0), Ok(()));
        }
        assert_eq!(bucket.try_acquire(t0), Err(MS(200)));
        assert_eq!(bucket.try_acquire(t0 + MS(100)), Err(MS(100)));
        assert_eq!(bucket.try_acquire(t0 + MS(200)), Ok(()));
        assert_eq!(bucket.try_acquire(t0 + MS(200)), Err(MS(200)));
        // A long idle period refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert_eq!(bucket.try_acquire(later), Ok(()));
        }
        assert_eq!(bucket.try_acquire(later), Err(MS(200)));
    }

    #[test]
    fn slow_rates_and_default_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::per_second(0.5);
        assert_eq!(bucket.try_acquire(t0), Ok(()));
        assert_eq!(bucket.try_acquire(t0), Err(MS(2000)));
        assert_eq!(bucket.try_acquire(t0 + MS(1500)), Err(MS(500)));
        assert_eq!(bucket.try_acquire(t0 + MS(2000)), Ok(()));
        let mut fast = TokenBucket::per_second(100.0);
        for _ in 0..100 {
            assert_eq!(fast.try_acquire(t0), Ok(()));
        }
        assert_eq!(fast.try_acquire(t0), Err(MS(10)));
    }

    #[tokio::test]
    async fn acquire_sleeps_until_a_token_is_free() {
        let mut bucket = TokenBucket::new(10.0, 1.0);
        let start = Instant::now();
        bucket.acquire().await;
        bucket.acquire().await;
        assert!(start.elapsed() >= MS(100), "{:?}", start.elapsed());
    }
}
