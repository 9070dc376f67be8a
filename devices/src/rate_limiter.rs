//! Token-bucket rate limiting for device I/O: one bucket for bytes and one
//! for operations, each refilled at its rate and holding at most one
//! second's worth. A request larger than a whole bucket may drive it into
//! debt rather than wait forever; the next request then waits until the debt
//! is paid. When blocked, a timerfd fires when tokens are back, so a device
//! worker can sleep in epoll instead of polling.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Tokens per second.
    rate: u64,
    /// Tokens available now; negative while in debt.
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate,
            tokens: rate as f64,
        }
    }

    fn refill(&mut self, elapsed: Duration) {
        let cap = self.rate as f64;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * cap).min(cap);
    }

    /// Time until the bucket is out of debt (has at least one token).
    fn wait(&self) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate as f64)
        }
    }
}

/// A limiter over bytes/s and operations/s; unlimited where a rate is absent or 0.
pub struct RateLimiter {
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
    last: Instant,
    timer: TimerFd,
    timer_armed: bool,
    /// Requests that had to wait.
    pub throttled: u64,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: Option<u64>, ops_per_sec: Option<u64>) -> io::Result<RateLimiter> {
        Ok(RateLimiter {
            bytes: bytes_per_sec.filter(|&r| r > 0).map(Bucket::new),
            ops: ops_per_sec.filter(|&r| r > 0).map(Bucket::new),
            last: Instant::now(),
            timer: TimerFd::new()?,
            timer_armed: false,
            throttled: 0,
        })
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.bytes.is_some() || self.ops.is_some()
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now - self.last;
        self.last = now;
        for bucket in [&mut self.bytes, &mut self.ops].into_iter().flatten() {
            bucket.refill(elapsed);
        }
    }

    /// Takes one operation of `bytes` bytes if the buckets allow it now.
    /// Otherwise arms the timer for when they will and returns false.
    pub fn consume(&mut self, bytes: u64) -> bool {
        if !self.is_limited() {
            return true;
        }
        self.refill();
        let wait = [self.bytes, self.ops]
            .iter()
            .flatten()
            .map(Bucket::wait)
            .max()
            .unwrap_or(Duration::ZERO);
        if wait > Duration::ZERO {
            self.throttled += 1;
            self.arm(wait);
            return false;
        }
        if let Some(b) = &mut self.bytes {
            b.tokens -= bytes as f64;
        }
        if let Some(o) = &mut self.ops {
            o.tokens -= 1.0;
        }
        true
    }

    fn arm(&mut self, wait: Duration) {
        // At least a millisecond: avoids a storm of wakeups for tiny waits.
        let wait = wait.max(Duration::from_millis(1));
        if self.timer.reset(wait, None).is_ok() {
            self.timer_armed = true;
        }
    }

    /// The timerfd to watch for readability while throttled.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Acknowledges a timer expiry; returns whether the timer had been armed.
    pub fn on_timer(&mut self) -> bool {
        // Reading clears the expiry count; an error means nothing had expired.
        let _ = self.timer.wait();
        std::mem::replace(&mut self.timer_armed, false)
    }

    /// Whether a request is waiting for the timer.
    pub fn is_blocked(&self) -> bool {
        self.timer_armed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_blocks() {
        let mut rl = RateLimiter::new(None, Some(0)).unwrap();
        assert!(!rl.is_limited());
        for _ in 0..1000 {
            assert!(rl.consume(1 << 20));
        }
    }

    #[test]
    fn ops_bucket_limits_the_rate() {
        let mut rl = RateLimiter::new(None, Some(100)).unwrap();
        let mut granted = 0;
        for _ in 0..1000 {
            if rl.consume(0) {
                granted += 1;
            }
        }
        // One second's burst, give or take the time the loop took.
        assert!((100..=102).contains(&granted), "{granted}");
        assert!(rl.is_blocked());
        assert!(rl.throttled > 0);
    }

    #[test]
    fn a_large_request_goes_into_debt_and_the_next_waits() {
        let mut rl = RateLimiter::new(Some(1000), None).unwrap();
        assert!(
            rl.consume(5000),
            "a request larger than the bucket is not refused forever"
        );
        assert!(!rl.consume(1), "the debt must be paid first");
        let start = Instant::now();
        while !rl.consume(1) {
            std::thread::sleep(Duration::from_millis(50));
            assert!(start.elapsed() < Duration::from_secs(10));
        }
        // About 4 s of debt at 1000 B/s.
        assert!(
            start.elapsed() >= Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }
}
