//! A deployment's rate limits: token buckets for requests and tokens per minute, with a bounded
//! FIFO wait queue in front.
//!
//! A bucket holds a full minute's worth (the per-minute limit) and refills continuously at
//! limit/60 per second, so an idle deployment takes a minute's burst and a busy one is held to
//! the limit's average rate. A call takes one request and its estimated tokens (prompt estimate
//! plus maximum output) up front; [`Limiter::settle`] then corrects the token bucket to what the
//! call really used, so the tokens-per-minute limit tracks real usage.
//!
//! Waiting is strictly first come, first served: while anyone waits, a newcomer waits behind
//! them even if the buckets have room for it. That lets a large request at the head hold back
//! smaller ones, which is the price of never starving the large one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{QUEUE_DEPTH, QUEUE_REFUSALS, QUEUE_WAIT_SECONDS, QueueConfig};
use crate::config::RateLimits;

/// Float slack when comparing a refilled level with what is asked: refill is computed from
/// elapsed time, and a waiter woken exactly at its computed instant must find room.
const EPSILON: f64 = 1e-6;

/// A continuously refilling bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    /// May go below zero when a call used more than it reserved: the debt is repaid by refill.
    level: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket for a limit of `per_minute` units a minute (more than 0).
    pub fn per_minute(per_minute: u32, now: Instant) -> Self {
        let capacity = f64::from(per_minute);
        Self {
            capacity,
            per_second: capacity / 60.0,
            level: capacity,
            updated: now,
        }
    }

    /// The most the bucket holds: a minute's worth.
    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// What the bucket holds at `now`.
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }

    /// How long from `now` until the bucket has refilled to `amount` (zero if it holds that
    /// now). `amount` may exceed the capacity: that is the time to serve a backlog, ignoring
    /// refunds to come.
    pub fn time_until(&mut self, amount: f64, now: Instant) -> Duration {
        self.refill(now);
        let missing = amount - self.level;
        if missing <= EPSILON {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / self.per_second)
        }
    }

    /// Takes `amount` if the bucket holds it.
    pub fn try_take(&mut self, amount: f64, now: Instant) -> bool {
        if self.time_until(amount, now).is_zero() {
            self.level -= amount;
            true
        } else {
            false
        }
    }

    /// Takes `amount` whether or not the bucket holds it (for usage beyond a reservation).
    pub fn charge(&mut self, amount: f64, now: Instant) {
        self.refill(now);
        self.level -= amount;
    }

    /// Returns `amount` that was taken but not used, up to the capacity.
    pub fn put_back(&mut self, amount: f64, now: Instant) {
        self.refill(now);
        self.level = (self.level + amount).min(self.capacity);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
    }
}

/// The right to make one call. The request unit is spent; `tokens` were reserved and should be
/// corrected with [`Limiter::settle`] once the call's usage is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    pub tokens: u64,
    /// How long the request waited in the queue.
    pub waited: Duration,
}

/// Why the limiter refused a request. Nothing was taken from the buckets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{waiting} requests are already waiting for this deployment's rate limits")]
    QueueFull {
        waiting: usize,
        retry_after: Duration,
    },
    #[error(
        "this deployment's rate limits would make the request wait about {expected:?}, longer than the allowed {max_wait:?}"
    )]
    WaitTooLong {
        expected: Duration,
        max_wait: Duration,
    },
    #[error(
        "the request needs {tokens} tokens but this deployment allows {limit} tokens per minute, so it can never run here"
    )]
    TooLarge { tokens: u64, limit: u32 },
}

impl Refused {
    /// When trying again may succeed: once the buckets will have refilled enough for everyone
    /// waiting now and this request. `None` when it never will (the request is too large).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Refused::QueueFull { retry_after, .. } => Some(*retry_after),
            Refused::WaitTooLong { expected, .. } => Some(*expected),
            Refused::TooLarge { .. } => None,
        }
    }

    /// The `reason` label of the refusals counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::QueueFull { .. } => "queue_full",
            Refused::WaitTooLong { .. } => "wait_too_long",
            Refused::TooLarge { .. } => "too_large",
        }
    }
}

/// One deployment's requests-per-minute and tokens-per-minute limits (each optional) and the
/// queue of requests waiting for them. Share it (`Arc`) between every call to the deployment.
#[derive(Debug)]
pub struct Limiter {
    deployment: String,
    capacity: usize,
    max_wait: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    requests: Option<TokenBucket>,
    tokens: Option<TokenBucket>,
    queue: VecDeque<Waiter>,
    /// Tokens asked for by everyone in `queue`, for the expected wait of a newcomer.
    queued_tokens: u64,
    next_id: u64,
    refused: u64,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    tokens: u64,
    wake: Arc<Notify>,
}

impl State {
    /// How long from `now` until both buckets hold `requests` requests and `tokens` tokens.
    fn wait_for(&mut self, requests: u64, tokens: u64, now: Instant) -> Duration {
        let for_requests = self
            .requests
            .as_mut()
            .map_or(Duration::ZERO, |b| b.time_until(requests as f64, now));
        let for_tokens = self
            .tokens
            .as_mut()
            .map_or(Duration::ZERO, |b| b.time_until(tokens as f64, now));
        for_requests.max(for_tokens)
    }

    fn take(&mut self, tokens: u64, now: Instant) {
        if let Some(bucket) = &mut self.requests {
            bucket.charge(1.0, now);
        }
        if let Some(bucket) = &mut self.tokens {
            bucket.charge(tokens as f64, now);
        }
    }

    /// Lets the (possibly new) head of the queue look at the buckets again.
    fn wake_head(&self) {
        if let Some(head) = self.queue.front() {
            head.wake.notify_one();
        }
    }
}

impl Limiter {
    pub fn new(deployment: &str, limits: &RateLimits, queue: &QueueConfig) -> Self {
        let now = Instant::now();
        let limiter = Self {
            deployment: deployment.to_owned(),
            capacity: queue.capacity,
            max_wait: queue.max_wait,
            state: Mutex::new(State {
                // A zero limit is refused by config validation; treating it as "no limit" here
                // keeps the bucket's rate from being zero.
                requests: limits
                    .requests_per_minute
                    .filter(|&n| n > 0)
                    .map(|n| TokenBucket::per_minute(n, now)),
                tokens: limits
                    .tokens_per_minute
                    .filter(|&n| n > 0)
                    .map(|n| TokenBucket::per_minute(n, now)),
                queue: VecDeque::new(),
                queued_tokens: 0,
                next_id: 0,
                refused: 0,
            }),
        };
        limiter.record_depth(0);
        limiter
    }

    /// Takes one request and `tokens` tokens: at once when the buckets have room and nobody
    /// waits; after waiting in line when the queue has space and the expected wait is within
    /// the maximum; otherwise refused at once. Dropping the returned future while it waits
    /// gives up its place in line.
    pub async fn acquire(&self, tokens: u64) -> Result<Permit, Refused> {
        let start = Instant::now();
        let (id, wake) = {
            let mut state = self.state();
            if let Some(bucket) = &state.tokens
                && tokens as f64 > bucket.capacity()
            {
                // `capacity` came from a u32; the cast back is exact.
                let limit = bucket.capacity() as u32;
                return Err(self.refuse(&mut state, Refused::TooLarge { tokens, limit }));
            }
            if state.queue.is_empty() && state.wait_for(1, tokens, start).is_zero() {
                state.take(tokens, start);
                return Ok(Permit {
                    tokens,
                    waited: Duration::ZERO,
                });
            }
            let waiting = state.queue.len();
            let queued_tokens = state.queued_tokens + tokens;
            let expected = state.wait_for(waiting as u64 + 1, queued_tokens, start);
            if waiting >= self.capacity {
                let refusal = Refused::QueueFull {
                    waiting,
                    retry_after: expected,
                };
                return Err(self.refuse(&mut state, refusal));
            }
            if expected > self.max_wait {
                let refusal = Refused::WaitTooLong {
                    expected,
                    max_wait: self.max_wait,
                };
                return Err(self.refuse(&mut state, refusal));
            }
            let id = state.next_id;
            state.next_id += 1;
            let wake = Arc::new(Notify::new());
            state.queue.push_back(Waiter {
                id,
                tokens,
                wake: wake.clone(),
            });
            state.queued_tokens += tokens;
            self.record_depth(state.queue.len());
            (id, wake)
        };
        // From here on, dropping this future (the client went away) leaves the queue.
        let mut place = Place {
            limiter: self,
            id,
            admitted: false,
        };
        loop {
            let deadline = {
                let mut state = self.state();
                let now = Instant::now();
                if state.queue.front().map(|w| w.id) == Some(id) {
                    let wait = state.wait_for(1, tokens, now);
                    if wait.is_zero() {
                        state.take(tokens, now);
                        state.queue.pop_front();
                        state.queued_tokens -= tokens;
                        place.admitted = true;
                        state.wake_head();
                        self.record_depth(state.queue.len());
                        let waited = now.saturating_duration_since(start);
                        histogram!(QUEUE_WAIT_SECONDS, "deployment" => self.deployment.clone())
                            .record(waited.as_secs_f64());
                        return Ok(Permit { tokens, waited });
                    }
                    Some(now + wait)
                } else {
                    None
                }
            };
            match deadline {
                // At the head: the buckets will have room by the deadline, or sooner if a
                // refund wakes us.
                Some(deadline) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline) => {}
                        () = wake.notified() => {}
                    }
                }
                // Behind someone: woken when the waiter ahead is admitted or leaves.
                None => wake.notified().await,
            }
        }
    }

    /// Corrects the token bucket once a call's usage is known: returns what `permit` reserved
    /// but the call did not use, or takes what it used beyond the reservation.
    pub fn settle(&self, permit: &Permit, used_tokens: u64) {
        if used_tokens < permit.tokens {
            self.refund(permit.tokens - used_tokens);
        } else if used_tokens > permit.tokens {
            let mut state = self.state();
            if let Some(bucket) = &mut state.tokens {
                bucket.charge((used_tokens - permit.tokens) as f64, Instant::now());
            }
        }
    }

    /// Returns `tokens` reserved but not used (capped at the bucket's capacity), which may let
    /// the head of the queue go sooner.
    pub fn refund(&self, tokens: u64) {
        let mut state = self.state();
        if let Some(bucket) = &mut state.tokens {
            bucket.put_back(tokens as f64, Instant::now());
            state.wake_head();
        }
    }

    /// Requests waiting now.
    pub fn queue_depth(&self) -> usize {
        self.state().queue.len()
    }

    /// Requests refused since the limiter was made.
    pub fn refused(&self) -> u64 {
        self.state().refused
    }

    fn refuse(&self, state: &mut State, refusal: Refused) -> Refused {
        state.refused += 1;
        counter!(
            QUEUE_REFUSALS,
            "deployment" => self.deployment.clone(),
            "reason" => refusal.reason()
        )
        .increment(1);
        refusal
    }

    fn record_depth(&self, depth: usize) {
        gauge!(QUEUE_DEPTH, "deployment" => self.deployment.clone()).set(depth as f64);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before anything can panic, so a
        // poisoned lock still holds usable state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A waiter's place in line, given up when dropped before admission.
struct Place<'a> {
    limiter: &'a Limiter,
    id: u64,
    admitted: bool,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if self.admitted {
            return;
        }
        let mut state = self.limiter.state();
        let Some(index) = state.queue.iter().position(|w| w.id == self.id) else {
            return;
        };
        if let Some(waiter) = state.queue.remove(index) {
            state.queued_tokens -= waiter.tokens;
        }
        if index == 0 {
            state.wake_head();
        }
        self.limiter.record_depth(state.queue.len());
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use futures::future::join_all;

    use super::*;

    fn limiter(rpm: Option<u32>, tpm: Option<u32>, capacity: usize, max_wait: u64) -> Limiter {
        Limiter::new(
            "test",
            &RateLimits {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
            },
            &QueueConfig {
                capacity,
                max_wait: Duration::from_secs(max_wait),
            },
        )
    }

    /// Spends the whole requests bucket.
    async fn drain(limiter: &Limiter, requests: u32) {
        for _ in 0..requests {
            limiter.acquire(0).await.unwrap();
        }
    }

    fn near(actual: Duration, expected: Duration) -> bool {
        actual.abs_diff(expected) <= Duration::from_millis(2)
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_held_to_the_burst_plus_the_rate() {
        let limiter = limiter(Some(600), None, 0, 10);
        let start = Instant::now();
        let mut admitted = 0;
        while start.elapsed() < Duration::from_secs(5) {
            for _ in 0..20 {
                if limiter.acquire(0).await.is_ok() {
                    admitted += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A minute's burst (600) plus 10 a second for 5 s.
        assert!((649..=651).contains(&admitted), "admitted {admitted}");
        assert!(limiter.refused() > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_admitted_in_order_at_the_refill_rate() {
        let limiter = limiter(Some(60), None, 10, 10);
        drain(&limiter, 60).await;
        let start = Instant::now();
        let order = RefCell::new(Vec::new());
        join_all((0..5).map(|i| {
            let (limiter, order) = (&limiter, &order);
            async move {
                let permit = limiter.acquire(0).await.unwrap();
                order.borrow_mut().push((i, start.elapsed(), permit.waited));
            }
        }))
        .await;
        let order = order.into_inner();
        assert_eq!(
            order.iter().map(|(i, ..)| *i).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        for (i, elapsed, waited) in order {
            let expected = Duration::from_secs(i + 1);
            assert!(near(elapsed, expected), "{i}: {elapsed:?}");
            assert!(near(waited, expected), "{i}: waited {waited:?}");
        }
        assert_eq!(limiter.queue_depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_newcomer_waits_behind_the_queue_even_when_it_would_fit() {
        // 600 tokens a minute: 10 a second.
        let limiter = limiter(None, Some(600), 10, 60);
        limiter.acquire(590).await.unwrap();
        let start = Instant::now();
        let order = RefCell::new(Vec::new());
        // The big one needs 40 more tokens (4 s); the small one would fit now but must not
        // overtake it.
        let big = async {
            limiter.acquire(50).await.unwrap();
            order.borrow_mut().push(("big", start.elapsed()));
        };
        let small = async {
            limiter.acquire(5).await.unwrap();
            order.borrow_mut().push(("small", start.elapsed()));
        };
        futures::join!(big, small);
        let order = order.into_inner();
        assert_eq!(order[0].0, "big");
        assert!(near(order[0].1, Duration::from_secs(4)), "{order:?}");
        assert!(near(order[1].1, Duration::from_millis(4500)), "{order:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_reserved_up_front_and_settled_to_real_usage() {
        let limiter = limiter(None, Some(1000), 0, 10);
        let permit = limiter.acquire(800).await.unwrap();
        // 200 left; 300 more needs 100 tokens of refill at 1000/60 a second = 6 s.
        let refused = limiter.acquire(300).await.unwrap_err();
        assert!(
            near(refused.retry_after().unwrap(), Duration::from_secs(6)),
            "{refused:?}"
        );
        // The call used only 300 of its 800: 500 come back, so 300 fit now.
        limiter.settle(&permit, 300);
        let second = limiter.acquire(300).await.unwrap();
        assert_eq!(second.waited, Duration::ZERO);
        // 400 left; this call used 600 instead of 300: the bucket owes nothing but holds 100.
        limiter.settle(&second, 600);
        assert!(limiter.acquire(101).await.is_err());
        assert!(limiter.acquire(100).await.is_ok());
        // A refund never fills the bucket beyond a minute's worth.
        limiter.refund(5000);
        assert!(limiter.acquire(1000).await.is_ok());
        assert!(limiter.acquire(1).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_lets_the_head_go_sooner() {
        let limiter = limiter(None, Some(600), 10, 60);
        let permit = limiter.acquire(600).await.unwrap();
        let start = Instant::now();
        let waiter = async {
            limiter.acquire(300).await.unwrap();
            start.elapsed()
        };
        let refund = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            limiter.settle(&permit, 100);
        };
        let (elapsed, ()) = futures::join!(waiter, refund);
        // Without the refund it would wait 30 s.
        assert!(near(elapsed, Duration::from_secs(1)), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_with_the_time_to_serve_it() {
        let limiter = limiter(Some(60), None, 2, 60);
        drain(&limiter, 60).await;
        let mut first = std::pin::pin!(limiter.acquire(0));
        let mut second = std::pin::pin!(limiter.acquire(0));
        assert!(futures::poll!(first.as_mut()).is_pending());
        assert!(futures::poll!(second.as_mut()).is_pending());
        assert_eq!(limiter.queue_depth(), 2);
        let refused = limiter.acquire(0).await.unwrap_err();
        assert!(matches!(refused, Refused::QueueFull { waiting: 2, .. }));
        // Two ahead and this one at one a second.
        assert!(near(refused.retry_after().unwrap(), Duration::from_secs(3)));
        assert_eq!(refused.reason(), "queue_full");
        assert_eq!(limiter.refused(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_beyond_the_maximum_is_refused_at_once() {
        let limiter = limiter(Some(60), None, 10, 2);
        drain(&limiter, 60).await;
        let mut first = std::pin::pin!(limiter.acquire(0));
        let mut second = std::pin::pin!(limiter.acquire(0));
        assert!(futures::poll!(first.as_mut()).is_pending());
        assert!(futures::poll!(second.as_mut()).is_pending());
        let start = Instant::now();
        let refused = limiter.acquire(0).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(matches!(refused, Refused::WaitTooLong { .. }), "{refused}");
        assert!(near(refused.retry_after().unwrap(), Duration::from_secs(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_gives_up_its_place() {
        let limiter = limiter(Some(60), None, 2, 60);
        drain(&limiter, 60).await;
        let start = Instant::now();
        {
            // Boxed so that `drop` drops the future itself, not a pinned reference to it.
            let mut gone = Box::pin(limiter.acquire(0));
            assert!(futures::poll!(gone.as_mut()).is_pending());
            let mut stays = std::pin::pin!(limiter.acquire(0));
            assert!(futures::poll!(stays.as_mut()).is_pending());
            assert!(matches!(
                limiter.acquire(0).await,
                Err(Refused::QueueFull { .. })
            ));
            // The head's client goes away: the one behind moves up and goes at 1 s, not 2 s.
            drop(gone);
            assert_eq!(limiter.queue_depth(), 1);
            let permit = stays.await.unwrap();
            assert!(near(permit.waited, Duration::from_secs(1)), "{permit:?}");
        }
        assert_eq!(limiter.queue_depth(), 0);
        // Nothing leaked: the next request waits only for the next refill.
        let permit = limiter.acquire(0).await.unwrap();
        assert!(
            near(start.elapsed(), Duration::from_secs(2)),
            "{:?}",
            start.elapsed()
        );
        assert!(near(permit.waited, Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_returns_its_tokens_to_the_estimate() {
        let limiter = limiter(None, Some(600), 4, 10);
        limiter.acquire(600).await.unwrap();
        {
            // 60 tokens take 6 s to refill.
            let mut big = std::pin::pin!(limiter.acquire(60));
            assert!(futures::poll!(big.as_mut()).is_pending());
            assert!(matches!(
                limiter.acquire(50).await,
                Err(Refused::WaitTooLong { .. })
            ));
        }
        // With the big one gone, 50 tokens are 5 s away: within the maximum.
        let permit = limiter.acquire(50).await.unwrap();
        assert!(near(permit.waited, Duration::from_secs(5)), "{permit:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_limit_is_refused_for_good() {
        let limiter = limiter(Some(60), Some(1000), 10, 10);
        let refused = limiter.acquire(1001).await.unwrap_err();
        assert_eq!(
            refused,
            Refused::TooLarge {
                tokens: 1001,
                limit: 1000
            }
        );
        assert_eq!(refused.retry_after(), None);
        assert!(
            refused.to_string().contains("can never run here"),
            "{refused}"
        );
        assert!(limiter.acquire(1000).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn no_limits_admit_everything() {
        let limiter = limiter(None, None, 0, 0);
        for _ in 0..10_000 {
            assert_eq!(
                limiter.acquire(1_000_000).await.unwrap().waited,
                Duration::ZERO
            );
        }
    }
}
