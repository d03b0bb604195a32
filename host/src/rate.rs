//! Per-token rate limits of plugin API routes and jobs: token buckets
//! ([`RateLimiter`]) by [`RateKey`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Buckets kept before full (idle) ones are dropped.
const MAX_BUCKETS: usize = 10_000;

/// Who a rate limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// An API token (by id).
    Token(i64),
    /// An anonymous caller of a public route, by client address.
    Client(IpAddr),
    /// Anonymous callers whose address is unknown: one shared bucket.
    Anonymous,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Per-token token-bucket rate limiter for plugin API routes: each key may make
/// `rate_per_sec` requests a second on average and `burst` at once.
#[derive(Debug, Default)]
pub struct RateLimiter {
    /// Tokens added per second; 0 disables the limit.
    rate: f64,
    /// Bucket size.
    capacity: f64,
    buckets: Mutex<HashMap<RateKey, Bucket>>,
}

impl RateLimiter {
    /// A limiter of `rate_per_sec` requests a second per key with bursts of up to
    /// `burst` (at least 1); `rate_per_sec` 0: no limit.
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate_per_sec),
            capacity: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// True when the limiter never refuses.
    pub fn is_unlimited(&self) -> bool {
        self.rate <= 0.0
    }

    /// Takes one request from `key`'s bucket.
    ///
    /// # Errors
    ///
    /// The whole seconds to wait (at least 1) when the bucket is empty.
    pub fn check(&self, key: RateKey) -> Result<(), u64> {
        if self.is_unlimited() {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&key) {
            let (rate, capacity) = (self.rate, self.capacity);
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.last).as_secs_f64() * rate < capacity
            });
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.capacity,
            last: now,
        });
        let elapsed = now.duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.capacity);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - bucket.tokens) / self.rate).ceil();
            // `wait` is a small positive number of seconds (at most 1 / rate).
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Err((wait as u64).max(1))
        }
    }
}
