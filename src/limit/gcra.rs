//! The generic cell rate algorithm, as pure arithmetic on one number per bucket: the
//! theoretical arrival time (TAT) of the next request, in nanoseconds of the limiter's clock.
//!
//! A limit of `N` per period `P` has the emission interval `I = P / N`; a request at `now` is
//! admitted while `max(tat, now) + I - now <= N * I`, and moves the TAT on by `I`. So a fresh
//! bucket admits exactly `N` at once, and then one per `I`: the TAT never runs more than a
//! period ahead of the clock. The Redis script of fleet mode does the same arithmetic
//! (`store/redis/rate.lua`), so both modes answer alike.

use super::spec::RateLimit;

/// One limit's constants, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// The emission interval `I`.
    interval: u64,
    /// `N * I`: how far ahead of the clock the TAT may run after an admitted request (the
    /// period, rounded down to whole intervals so that a burst is never `N + 1`).
    window: u64,
    /// `N`.
    count: u32,
}

/// What a bucket says after one request: admitted or not, and what the headers report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State {
    /// Whether the request was admitted.
    pub allowed: bool,
    /// Requests that could be admitted right now, after this one.
    pub remaining: u32,
    /// Nanoseconds until the bucket is full again (all `N` available).
    pub reset: u64,
    /// Nanoseconds until the next request would be admitted (0 when one would be now).
    pub retry_after: u64,
}

impl Gcra {
    /// The constants of `limit`.
    pub fn new(limit: &RateLimit) -> Self {
        let period = u64::from(limit.period_secs) * 1_000_000_000;
        let count = limit.count;
        let interval = (period / u64::from(count)).max(1);
        Gcra {
            interval,
            window: interval * u64::from(count),
            count,
        }
    }

    /// The emission interval, in nanoseconds.
    pub fn interval(&self) -> u64 {
        self.interval
    }

    /// A request at `now` against a bucket whose TAT is `tat` (0 for a fresh one): the new
    /// TAT if it is admitted (`None`: the bucket is unchanged), and the bucket's state.
    pub fn check(&self, tat: u64, now: u64) -> (Option<u64>, State) {
        self.take(tat, now, 1)
    }

    /// Like [`Gcra::check`] for `cost` requests at once (a fleet lease): all or none.
    pub fn take(&self, tat: u64, now: u64, cost: u32) -> (Option<u64>, State) {
        let tat = tat.max(now);
        let cost = u64::from(cost).max(1);
        let next = tat.saturating_add(self.interval.saturating_mul(cost));
        if next - now <= self.window {
            let ahead = next - now;
            let state = State {
                allowed: true,
                remaining: ((self.window - ahead) / self.interval) as u32,
                reset: ahead,
                retry_after: (ahead + self.interval).saturating_sub(self.window),
            };
            (Some(next), state)
        } else {
            let ahead = tat - now;
            let state = State {
                allowed: false,
                remaining: ((self.window.saturating_sub(ahead)) / self.interval) as u32,
                reset: ahead,
                retry_after: next - now - self.window,
            };
            (None, state)
        }
    }

    /// How many requests a bucket whose TAT is `tat` could admit at `now`, at most `N`.
    pub fn available(&self, tat: u64, now: u64) -> u32 {
        let ahead = tat.max(now) - now;
        (self.window.saturating_sub(ahead) / self.interval).min(u64::from(self.count)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn limit(s: &str) -> Gcra {
        Gcra::new(&s.parse().unwrap())
    }

    /// Runs `n` requests at `now`, returning how many were admitted and the last state.
    fn burst(g: &Gcra, tat: &mut u64, now: u64, n: u32) -> (u32, State) {
        let mut admitted = 0;
        let mut last = None;
        for _ in 0..n {
            let (next, state) = g.check(*tat, now);
            if let Some(next) = next {
                *tat = next;
                admitted += 1;
            }
            last = Some(state);
        }
        (admitted, last.unwrap())
    }

    #[test]
    fn a_fresh_bucket_admits_exactly_its_count_at_once() {
        for (s, n) in [
            ("1/s", 1),
            ("5/s", 5),
            ("100/s", 100),
            ("7/min", 7),
            ("3/h", 3),
        ] {
            let g = limit(s);
            let mut tat = 0;
            let now = 1_000 * SEC;
            let (admitted, state) = burst(&g, &mut tat, now, n * 3);
            assert_eq!(admitted, n, "{s}");
            assert!(!state.allowed);
            assert_eq!(state.remaining, 0);
        }
    }

    #[test]
    fn remaining_counts_down_and_the_refusal_says_when_to_retry() {
        let g = limit("4/s");
        let now = 10 * SEC;
        let mut tat = 0;
        let remaining: Vec<u32> = (0..4)
            .map(|_| {
                let (next, state) = g.check(tat, now);
                tat = next.unwrap();
                assert_eq!(
                    state.retry_after,
                    if state.remaining > 0 { 0 } else { SEC / 4 }
                );
                state.remaining
            })
            .collect();
        assert_eq!(remaining, [3, 2, 1, 0]);
        let (next, refused) = g.check(tat, now);
        assert_eq!(next, None);
        assert_eq!(refused.retry_after, SEC / 4);
        assert_eq!(refused.reset, SEC);
    }

    #[test]
    fn the_bucket_refills_one_per_interval_on_the_clock() {
        let g = limit("10/s");
        let mut tat = 0;
        let start = 5 * SEC;
        assert_eq!(burst(&g, &mut tat, start, 10).0, 10);
        // Just before one interval has passed: still nothing.
        assert_eq!(burst(&g, &mut tat, start + SEC / 10 - 1, 5).0, 0);
        // At one interval: exactly one.
        assert_eq!(burst(&g, &mut tat, start + SEC / 10, 5).0, 1);
        // A whole period idle: the full burst again, never more.
        assert_eq!(burst(&g, &mut tat, start + 5 * SEC, 50).0, 10);
        assert_eq!(g.available(tat, start + 5 * SEC), 0);
        assert_eq!(g.available(tat, start + 100 * SEC), 10);
    }

    #[test]
    fn a_steady_rate_at_the_limit_is_admitted_indefinitely() {
        let g = limit("50/s");
        let mut tat = 0;
        let mut now = SEC;
        for _ in 0..10_000 {
            let (next, state) = g.check(tat, now);
            assert!(state.allowed);
            tat = next.unwrap();
            now += g.interval();
        }
    }

    #[test]
    fn a_lease_takes_all_it_asks_for_or_nothing() {
        let g = limit("10/s");
        let now = SEC;
        let (tat, state) = g.take(0, now, 6);
        assert!(state.allowed);
        assert_eq!(state.remaining, 4);
        let (none, state) = g.take(tat.unwrap(), now, 5);
        assert_eq!(none, None);
        assert_eq!(state.remaining, 4);
        assert_eq!(g.take(tat.unwrap(), now, 4).1.remaining, 0);
    }
}
