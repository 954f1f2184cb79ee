//! A destination's request budget, shared by every concurrent batch: [`TokenBucket`] within
//! one process, [`SharedGcra`] across processes (several workers delivering to the same
//! destination draw on one budget kept in shared memory).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What delivery needs from a rate limit. `&self`, so concurrent batches of one task can share
/// it; implementations never hold a borrow or lock across calls.
pub trait RateBudget {
    /// Takes one request's worth of budget now, or says how long to wait before trying again.
    fn try_acquire(&self) -> Result<(), Duration>;
}

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

/// A [`TokenBucket`] as a [`RateBudget`] for one process (tests, and callers with no shared
/// memory).
#[derive(Debug)]
pub struct LocalBucket(RefCell<TokenBucket>);

impl LocalBucket {
    pub fn new(bucket: TokenBucket) -> Self {
        LocalBucket(RefCell::new(bucket))
    }
}

impl RateBudget for LocalBucket {
    fn try_acquire(&self) -> Result<(), Duration> {
        self.0.borrow_mut().try_acquire(Instant::now())
    }
}

/// GCRA (generic cell rate algorithm) over one atomic, so processes that map the same memory
/// share one budget without a lock. The atomic holds the "theoretical arrival time" (TAT) in
/// nanoseconds of CLOCK_MONOTONIC, which on Linux is one system-wide clock, so every process
/// reads comparable values. A request at `now` is allowed when `max(TAT, now) - now` is at most
/// the tolerance `(burst - 1) / rate`, and then moves the TAT on by `1 / rate`: the same
/// behaviour as a [`TokenBucket`] of that rate and burst. An atomic holding 0 (fresh shared
/// memory) is a full budget.
///
/// The state is only a point in time, so holders with different settings (say, one worker
/// still on the rate from before an ALTER SERVER) can share it safely: each applies its own
/// rate and burst to the common TAT.
#[derive(Clone, Copy, Debug)]
pub struct SharedGcra<'a> {
    tat: &'a AtomicU64,
    /// Nanoseconds per request (1 / rate), at least 1.
    interval: u64,
    /// How far ahead of now the TAT may be for a request to pass: (burst - 1) intervals.
    tolerance: u64,
}

impl<'a> SharedGcra<'a> {
    /// `rate_per_sec` requests per second after a burst of `burst`, over the budget in `tat`.
    pub fn new(tat: &'a AtomicU64, rate_per_sec: f64, burst: f64) -> Self {
        assert!(
            rate_per_sec > 0.0 && rate_per_sec.is_finite() && burst >= 1.0 && burst.is_finite(),
            "rate must be > 0 and burst >= 1"
        );
        // Float-to-int casts saturate, so absurdly slow rates cannot wrap around.
        let interval = ((1e9 / rate_per_sec).round() as u64).max(1);
        let tolerance = ((burst - 1.0) * interval as f64).round() as u64;
        SharedGcra {
            tat,
            interval,
            tolerance,
        }
    }

    /// The burst the worker uses: one second's worth of requests, at least one (as
    /// [`TokenBucket::per_second`]).
    pub fn per_second(tat: &'a AtomicU64, rate_per_sec: f64) -> Self {
        Self::new(tat, rate_per_sec, rate_per_sec.max(1.0))
    }

    /// [`RateBudget::try_acquire`] at a given CLOCK_MONOTONIC reading.
    pub(crate) fn try_acquire_at(&self, now: u64) -> Result<(), Duration> {
        // Relaxed is enough: the TAT is the only shared datum, and every update of a single
        // atomic is seen in one order by all processes; nothing else is published through it.
        let mut stored = self.tat.load(Ordering::Relaxed);
        loop {
            let tat = stored.max(now);
            let ahead = tat - now;
            if ahead > self.tolerance {
                return Err(Duration::from_nanos(ahead - self.tolerance));
            }
            let next = tat.saturating_add(self.interval);
            match self
                .tat
                .compare_exchange_weak(stored, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                // Another batch or process got there first: judge again against its TAT.
                Err(current) => stored = current,
            }
        }
    }
}

impl RateBudget for SharedGcra<'_> {
    fn try_acquire(&self) -> Result<(), Duration> {
        self.try_acquire_at(monotonic_ns())
    }
}

/// CLOCK_MONOTONIC in nanoseconds. Not `Instant`: its value is opaque, and the TAT must mean
/// the same thing in every process.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always supported on
    // Linux, so the call cannot fail.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
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

    #[test]
    fn local_bucket_is_a_budget() {
        let bucket = LocalBucket::new(TokenBucket::new(10.0, 2.0));
        let budget: &dyn RateBudget = &bucket;
        assert_eq!(budget.try_acquire(), Ok(()));
        assert_eq!(budget.try_acquire(), Ok(()));
        let wait = budget.try_acquire().unwrap_err();
        assert!(wait > Duration::ZERO && wait <= MS(100), "{wait:?}");
    }

    /// A CLOCK_MONOTONIC reading some time after boot, in nanoseconds.
    const T0: u64 = 1_000 * 1_000_000_000;

    fn ms(n: u64) -> u64 {
        n * 1_000_000
    }

    #[test]
    fn gcra_burst_then_steady_rate() {
        let tat = AtomicU64::new(0);
        let gcra = SharedGcra::new(&tat, 5.0, 5.0);
        for _ in 0..5 {
            assert_eq!(gcra.try_acquire_at(T0), Ok(()));
        }
        assert_eq!(gcra.try_acquire_at(T0), Err(MS(200)));
        assert_eq!(gcra.try_acquire_at(T0 + ms(100)), Err(MS(100)));
        assert_eq!(gcra.try_acquire_at(T0 + ms(200)), Ok(()));
        assert_eq!(gcra.try_acquire_at(T0 + ms(200)), Err(MS(200)));
        // A long idle period refills only up to the burst.
        let later = T0 + ms(60_000);
        for _ in 0..5 {
            assert_eq!(gcra.try_acquire_at(later), Ok(()));
        }
        assert_eq!(gcra.try_acquire_at(later), Err(MS(200)));
    }

    #[test]
    fn gcra_slow_rates_fractional_bursts_and_default_burst() {
        let tat = AtomicU64::new(0);
        let slow = SharedGcra::per_second(&tat, 0.5);
        assert_eq!(slow.try_acquire_at(T0), Ok(()));
        assert_eq!(slow.try_acquire_at(T0), Err(MS(2000)));
        assert_eq!(slow.try_acquire_at(T0 + ms(1500)), Err(MS(500)));
        assert_eq!(slow.try_acquire_at(T0 + ms(2000)), Ok(()));

        let tat = AtomicU64::new(0);
        let fast = SharedGcra::per_second(&tat, 100.0);
        for _ in 0..100 {
            assert_eq!(fast.try_acquire_at(T0), Ok(()));
        }
        assert_eq!(fast.try_acquire_at(T0), Err(MS(10)));

        // Burst 2.5, like a token bucket: two at once, the third 0.5 token (200 ms) later.
        let tat = AtomicU64::new(0);
        let gcra = SharedGcra::per_second(&tat, 2.5);
        let mut tb = TokenBucket::per_second(2.5);
        let t = Instant::now();
        for _ in 0..2 {
            assert_eq!(gcra.try_acquire_at(T0), Ok(()));
            assert_eq!(tb.try_acquire(t), Ok(()));
        }
        assert_eq!(gcra.try_acquire_at(T0), Err(MS(200)));
        assert_eq!(tb.try_acquire(t), Err(MS(200)));
    }

    #[test]
    fn gcra_fresh_memory_is_a_full_budget_even_just_after_boot() {
        let tat = AtomicU64::new(0);
        let gcra = SharedGcra::new(&tat, 1.0, 3.0);
        for _ in 0..3 {
            assert_eq!(gcra.try_acquire_at(5), Ok(()));
        }
        assert_eq!(gcra.try_acquire_at(5), Err(MS(1000)));
    }

    #[test]
    fn gcra_values_over_one_atomic_share_one_budget() {
        let (shared, other) = (AtomicU64::new(0), AtomicU64::new(0));
        let a = SharedGcra::new(&shared, 5.0, 5.0);
        let b = SharedGcra::new(&shared, 5.0, 5.0);
        for gcra in [&a, &b, &a, &b, &a] {
            assert_eq!(gcra.try_acquire_at(T0), Ok(()));
        }
        assert_eq!(b.try_acquire_at(T0), Err(MS(200)));
        assert_eq!(a.try_acquire_at(T0), Err(MS(200)));
        assert_eq!(b.try_acquire_at(T0 + ms(200)), Ok(()));
        assert_eq!(a.try_acquire_at(T0 + ms(200)), Err(MS(200)));
        // Another destination's budget is untouched.
        assert_eq!(SharedGcra::new(&other, 5.0, 5.0).try_acquire_at(T0), Ok(()));
        // Different settings over one TAT: each applies its own to the common time. The TAT
        // is now 1 s ahead; with no burst tolerance that is a full 1 s wait.
        let strict = SharedGcra::new(&shared, 1.0, 1.0);
        assert_eq!(strict.try_acquire_at(T0 + ms(200)), Err(MS(1000)));
    }

    #[test]
    fn gcra_loses_no_update_under_contention() {
        // Eight threads race for one budget at the same instant: exactly `burst` pass.
        let tat = AtomicU64::new(0);
        let granted = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let gcra = SharedGcra::new(&tat, 1.0, 10.0);
                    scope.spawn(move || (0..1000).filter(|_| gcra.try_acquire_at(T0).is_ok()).count())
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum::<usize>()
        });
        assert_eq!(granted, 10);
        assert_eq!(tat.load(Ordering::Relaxed), T0 + ms(10_000));
    }

    #[test]
    fn gcra_threads_on_the_real_clock_get_one_rate_between_them() {
        // Four "processes" at 50/s, burst 1, for one second: 50 grants in all, not 200.
        let tat = AtomicU64::new(0);
        let end = Instant::now() + Duration::from_secs(1);
        let granted = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let gcra = SharedGcra::new(&tat, 50.0, 1.0);
                    scope.spawn(move || {
                        let mut granted = 0;
                        while let Some(left) = end.checked_duration_since(Instant::now()) {
                            match gcra.try_acquire() {
                                Ok(()) => granted += 1,
                                // Poll often, so the threads collide at every free slot.
                                Err(wait) => std::thread::sleep(wait.min(left).min(MS(1))),
                            }
                        }
                        granted
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum::<u32>()
        });
        assert!((48..=52).contains(&granted), "{granted} grants");
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
