//! Requests per source address: a token bucket per IP, refilled at the configured rate up to
//! the burst. Over it a request is answered 503 with `Retry-After` and not relayed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// The buckets; idle ones are dropped once the map grows.
pub struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .finish()
    }
}

/// Sources tracked before idle (full) buckets are swept.
const SWEEP_AT: usize = 10_000;

impl Limiter {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `ip` at `now`; false when its bucket is empty.
    pub fn allow_at(&self, ip: IpAddr, now: Instant) -> bool {
        let Ok(mut m) = self.buckets.lock() else {
            return true;
        };
        if m.len() >= SWEEP_AT {
            let (rate, burst) = (self.rate, self.burst);
            m.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = m.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate)
            .min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn allow(&self, ip: IpAddr) -> bool {
        self.allow_at(ip, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::Limiter;
    use std::time::{Duration, Instant};

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let l = Limiter::new(10, 5);
        let a = std::net::IpAddr::from([192, 0, 2, 1]);
        let b = std::net::IpAddr::from([192, 0, 2, 2]);
        let t0 = Instant::now();
        assert_eq!((0..8).filter(|_| l.allow_at(a, t0)).count(), 5);
        assert!(l.allow_at(b, t0));
        // 10/s: one more token after 100 ms, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.allow_at(a, t1));
        assert!(!l.allow_at(a, t1));
        // Refills up to the burst, no further.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| l.allow_at(a, t2)).count(), 5);
    }
}
