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
//!
//! # Shared limits
//!
//! [`Limiter::new`] refills its buckets from this process's clock, so each router replica allows
//! the full rates. [`Limiter::shared`] makes the limits hold for every replica together: the
//! buckets live in PostgreSQL ([`super::shared`]) and refill there, and each replica *leases*
//! slices of them (what the head of its queue misses, at least a twentieth of the limit) in one
//! statement, then hands them out locally without the database. Only the head of the queue leases,
//! one lease at a time; a lease that comes back short (the shared bucket is dry) is not repeated
//! for 250 ms. What the shared bucket holds is known only as of the last lease, so a request is
//! refused only on a fresh view: one the estimate says fits, or one nobody waits ahead of, joins
//! the queue to lease and is refused (or kept) once a lease is back. Refunds from
//! [`Limiter::settle`] go to the replica's leases; [`Limiter::tend`] gives back what a replica left
//! unused for [`IDLE_HOLD`] while nobody waited, so an idle replica does not sit on tokens a busy
//! one needs. Together the replicas admit at most the shared bucket's burst plus its rate, plus
//! what reservations overran (charged to the next lease as a debt); a replica's unused slice is at
//! most one lease beyond what its queue needed.
//!
//! When a lease fails (an error, or no answer within 500 ms), the replica falls back to limiting on
//! its own: its buckets refill from its clock at `1 / replicas` of the rates
//! ([`super::SharedLimitsConfig`]), so a fleet of the configured size stays near the limits while
//! the database is away. It tries the database again every second; the first lease that succeeds
//! ends the fallback and drops what the clock made up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::shared::{Kind, SharedBuckets};
use super::{
    QUEUE_DEPTH, QUEUE_REFUSALS, QUEUE_WAIT_SECONDS, QueueConfig, RATE_LEASES, SharedLimitsConfig,
};
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

/// Leases ask for what the head of the queue is missing or this share of the limit, whichever
/// is more: a twentieth of a minute's worth is 3 s of the rate, so a replica flooding a
/// deployment goes to the database a few times a second at most, and one at a low rate holds
/// little.
const LEASE_SLICE: f64 = 1.0 / 20.0;

/// After a lease came back short (the shared bucket ran dry), the least time before this
/// replica leases again: starved replicas poll the database at most this often each.
const SHORT_LEASE_PAUSE: Duration = Duration::from_millis(250);

/// A lease not answered within this counts as a database failure: a request must not hang on
/// a database that does not answer.
const LEASE_TIMEOUT: Duration = Duration::from_millis(500);

/// While the database fails leases, how often one is tried again.
const FALLBACK_RETRY: Duration = Duration::from_secs(1);

/// Leased tokens left unused this long while nobody waits are given back by [`Limiter::tend`].
pub const IDLE_HOLD: Duration = Duration::from_secs(2);

/// How often the router calls [`Limiter::tend`].
pub const TEND_EVERY: Duration = Duration::from_secs(1);

/// One limit's bucket as this replica sees it.
#[derive(Debug)]
enum Bucket {
    /// Refilled from this process's clock: the limit holds for this replica alone.
    Local(TokenBucket),
    /// Filled by leases from the deployment's bucket in PostgreSQL, shared by every replica.
    Leased(LeasedBucket),
}

impl Bucket {
    fn capacity(&self) -> f64 {
        match self {
            Bucket::Local(bucket) => bucket.capacity(),
            Bucket::Leased(bucket) => bucket.capacity,
        }
    }

    /// Whether `amount` can be taken now without asking the database.
    fn holds(&mut self, amount: f64, now: Instant) -> bool {
        match self {
            Bucket::Local(bucket) => bucket.time_until(amount, now).is_zero(),
            Bucket::Leased(bucket) => bucket.holds(amount, now),
        }
    }

    /// How long from `now` until `amount` can be taken; for a leased bucket an estimate that
    /// counts what the shared bucket is thought to hold.
    fn time_until(&mut self, amount: f64, now: Instant) -> Duration {
        match self {
            Bucket::Local(bucket) => bucket.time_until(amount, now),
            Bucket::Leased(bucket) => bucket.time_until(amount, now),
        }
    }

    /// Takes `amount` whether or not the bucket holds it.
    fn charge(&mut self, amount: f64, now: Instant) {
        match self {
            Bucket::Local(bucket) => bucket.charge(amount, now),
            Bucket::Leased(bucket) => bucket.take(amount, now),
        }
    }

    fn put_back(&mut self, amount: f64, now: Instant) {
        match self {
            Bucket::Local(bucket) => bucket.put_back(amount, now),
            Bucket::Leased(bucket) => bucket.put_back(amount, now),
        }
    }

    /// What to lease from the shared bucket for `amount` to be held here; `None` when it is
    /// held already or the bucket is not shared.
    fn lease_want(&mut self, amount: f64, now: Instant) -> Option<(Kind, f64)> {
        match self {
            Bucket::Local(_) => None,
            Bucket::Leased(bucket) => {
                (!bucket.holds(amount, now)).then(|| (bucket.kind, bucket.want(amount)))
            }
        }
    }

    fn leased(&mut self) -> Option<&mut LeasedBucket> {
        match self {
            Bucket::Local(_) => None,
            Bucket::Leased(bucket) => Some(bucket),
        }
    }
}

/// A replica's part of a shared bucket: tokens it leased and has not handed out yet. It never
/// refills from the clock while the database answers; that is the shared bucket's job.
#[derive(Debug)]
struct LeasedBucket {
    kind: Kind,
    capacity: f64,
    per_second: f64,
    /// Below zero when calls used more than they reserved: the next lease repays the debt.
    held: f64,
    /// When `held` was last leased into or taken from.
    touched: Instant,
    /// The shared level the last lease left, and when; `None` before the first (thought full).
    shared: Option<(f64, Instant)>,
    /// Set while the database fails leases: since then `held` refills from this process's clock
    /// at `fallback_share` of the rate (the instant is that of the last refill).
    fallback: Option<Instant>,
    fallback_share: f64,
}

impl LeasedBucket {
    fn new(kind: Kind, per_minute: u32, fallback_share: f64, now: Instant) -> Self {
        let capacity = f64::from(per_minute);
        Self {
            kind,
            capacity,
            per_second: capacity / 60.0,
            held: 0.0,
            touched: now,
            shared: None,
            fallback: None,
            fallback_share,
        }
    }

    fn refill_fallback(&mut self, now: Instant) {
        if let Some(since) = &mut self.fallback {
            let ceiling = self.capacity * self.fallback_share;
            let elapsed = now.saturating_duration_since(*since).as_secs_f64();
            if self.held < ceiling {
                let rate = self.per_second * self.fallback_share;
                self.held = (self.held + elapsed * rate).min(ceiling);
            }
            *since = now;
        }
    }

    fn holds(&mut self, amount: f64, now: Instant) -> bool {
        self.refill_fallback(now);
        amount - self.held <= EPSILON
    }

    fn time_until(&mut self, amount: f64, now: Instant) -> Duration {
        self.refill_fallback(now);
        let (available, rate) = if self.fallback.is_some() {
            (self.held, self.per_second * self.fallback_share)
        } else {
            (self.held + self.shared_estimate(now), self.per_second)
        };
        let missing = amount - available;
        if missing <= EPSILON {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / rate)
        }
    }

    /// What the shared bucket holds at `now` if no other replica took from it since the last
    /// lease: an upper bound, good enough for expected waits.
    fn shared_estimate(&self, now: Instant) -> f64 {
        match self.shared {
            Some((level, at)) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                (level + elapsed * self.per_second).min(self.capacity)
            }
            None => self.capacity,
        }
    }

    fn want(&self, amount: f64) -> f64 {
        (amount - self.held).max(self.capacity * LEASE_SLICE)
    }

    fn take(&mut self, amount: f64, now: Instant) {
        self.refill_fallback(now);
        self.held -= amount;
        self.touched = now;
    }

    fn put_back(&mut self, amount: f64, now: Instant) {
        self.refill_fallback(now);
        self.held = (self.held + amount).min(self.capacity);
    }

    /// Adds a lease's grant; true when it ends a fallback.
    fn leased(&mut self, granted: f64, remaining: f64, now: Instant) -> bool {
        let recovered = self.fallback.take().is_some();
        if recovered {
            // What the clock added during the fallback never came from the shared bucket:
            // drop it (a debt stays owed) rather than give it to the fleet.
            self.held = self.held.min(0.0);
        }
        self.held += granted;
        self.shared = Some((remaining, now));
        self.touched = now;
        recovered
    }

    /// Notes a failed lease; true when it starts a fallback.
    fn failed(&mut self, now: Instant) -> bool {
        if self.fallback.is_some() {
            return false;
        }
        self.fallback = Some(now);
        true
    }

    /// Takes out, for giving back, what is held unused since `idle_since` (everything with
    /// `None`); nothing while in fallback (those tokens were never leased).
    fn take_idle(&mut self, idle_since: Option<Instant>, now: Instant) -> Option<f64> {
        if self.fallback.is_some() || self.held <= EPSILON {
            return None;
        }
        if idle_since.is_some_and(|since| self.touched > since) {
            return None;
        }
        let amount = self.held;
        self.held = 0.0;
        self.touched = now;
        Some(amount)
    }

    /// Notes tokens given back to the shared bucket in the estimate of its level.
    fn gave_back(&mut self, amount: f64, now: Instant) {
        let level = (self.shared_estimate(now) + amount).min(self.capacity);
        self.shared = Some((level, now));
    }
}

/// One deployment's requests-per-minute and tokens-per-minute limits (each optional) and the
/// queue of requests waiting for them. Share it (`Arc`) between every call to the deployment.
#[derive(Debug)]
pub struct Limiter {
    deployment: String,
    capacity: usize,
    max_wait: Duration,
    /// Where leased buckets lease from; `None` when the limits are this replica's alone.
    shared: Option<SharedBuckets>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    queue: VecDeque<Waiter>,
    /// Tokens asked for by everyone in `queue`, for the expected wait of a newcomer.
    queued_tokens: u64,
    next_id: u64,
    refused: u64,
    /// A lease or give-back is under way: one at a time, so that the replica never holds more
    /// than one slice beyond what its queue needs.
    leasing: bool,
    /// No lease before this (after a short one, or while the database fails them).
    next_lease: Instant,
    /// Leases completed (granted or failed), to tell a fresh view of the shared buckets.
    leases: u64,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    tokens: u64,
    wake: Arc<Notify>,
}

/// What the head of the queue does next.
enum Step {
    Lease(Vec<(Kind, f64)>),
    /// Look again at this instant, or sooner if woken.
    Sleep(Instant),
    /// Look again when woken (someone else is leasing, or this waiter is not the head).
    Wait,
}

impl State {
    fn buckets(&mut self) -> impl Iterator<Item = &mut Bucket> {
        self.requests.iter_mut().chain(self.tokens.iter_mut())
    }

    fn leased(&mut self, kind: Kind) -> Option<&mut LeasedBucket> {
        match kind {
            Kind::Requests => self.requests.as_mut()?.leased(),
            Kind::Tokens => self.tokens.as_mut()?.leased(),
        }
    }

    fn in_fallback(&mut self) -> bool {
        self.buckets()
            .any(|b| b.leased().is_some_and(|b| b.fallback.is_some()))
    }

    /// How long from `now` until both buckets hold `requests` requests and `tokens` tokens
    /// (an estimate when they are shared).
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

    /// Whether one request and `tokens` tokens can be taken now without the database.
    fn holds(&mut self, tokens: u64, now: Instant) -> bool {
        let requests = self.requests.as_mut().is_none_or(|b| b.holds(1.0, now));
        let tokens = self
            .tokens
            .as_mut()
            .is_none_or(|b| b.holds(tokens as f64, now));
        requests && tokens
    }

    fn lease_wants(&mut self, tokens: u64, now: Instant) -> Vec<(Kind, f64)> {
        let requests = self.requests.as_mut().and_then(|b| b.lease_want(1.0, now));
        let tokens = self
            .tokens
            .as_mut()
            .and_then(|b| b.lease_want(tokens as f64, now));
        requests.into_iter().chain(tokens).collect()
    }

    fn take(&mut self, tokens: u64, now: Instant) {
        if let Some(bucket) = &mut self.requests {
            bucket.charge(1.0, now);
        }
        if let Some(bucket) = &mut self.tokens {
            bucket.charge(tokens as f64, now);
        }
    }

    /// For the head of the queue, which does not hold what it needs: lease now if the shared
    /// buckets probably have it (or to probe a database that failed, or to check a stale
    /// estimate with `probe`), else sleep until they probably will.
    fn next_step(&mut self, tokens: u64, probe: bool, now: Instant) -> Step {
        let wait = self.wait_for(1, tokens, now);
        let wants = self.lease_wants(tokens, now);
        if wants.is_empty() {
            return Step::Sleep(now + wait);
        }
        if self.leasing {
            return Step::Wait;
        }
        let fallback = self.in_fallback();
        if now >= self.next_lease && (fallback || probe || wait.is_zero()) {
            self.leasing = true;
            return Step::Lease(wants);
        }
        let at = now + wait;
        // In fallback the local refill may serve the head before the next try of the
        // database; otherwise only a lease can.
        Step::Sleep(if fallback {
            at.min(self.next_lease)
        } else {
            at.max(self.next_lease)
        })
    }

    /// Lets the (possibly new) head of the queue look at the buckets again.
    fn wake_head(&self) {
        if let Some(head) = self.queue.front() {
            head.wake.notify_one();
        }
    }
}

impl Limiter {
    /// Limits for this replica alone, refilled from its clock.
    pub fn new(deployment: &str, limits: &RateLimits, queue: &QueueConfig) -> Self {
        let now = Instant::now();
        // A zero limit is refused by config validation; treating it as "no limit" here keeps
        // the bucket's rate from being zero.
        let local = |per_minute: Option<u32>| {
            per_minute
                .filter(|&n| n > 0)
                .map(|n| Bucket::Local(TokenBucket::per_minute(n, now)))
        };
        Self::build(
            deployment,
            queue,
            local(limits.requests_per_minute),
            local(limits.tokens_per_minute),
            None,
        )
    }

    /// Limits shared by every replica through `pool` (`router.rate_buckets`): this replica
    /// leases slices of the shared buckets and hands them out locally. Call [`Limiter::sync`]
    /// once at start to apply the configured limits to the shared buckets.
    pub fn shared(
        deployment: &str,
        limits: &RateLimits,
        queue: &QueueConfig,
        fallback: &SharedLimitsConfig,
        pool: PgPool,
    ) -> Self {
        let now = Instant::now();
        let share = 1.0 / f64::from(fallback.replicas.max(1));
        let leased = |kind, per_minute: Option<u32>| {
            per_minute
                .filter(|&n| n > 0)
                .map(|n| Bucket::Leased(LeasedBucket::new(kind, n, share, now)))
        };
        let requests = leased(Kind::Requests, limits.requests_per_minute);
        let tokens = leased(Kind::Tokens, limits.tokens_per_minute);
        let capacities: Vec<(Kind, f64)> = [&requests, &tokens]
            .into_iter()
            .flatten()
            .filter_map(|b| match b {
                Bucket::Leased(b) => Some((b.kind, b.capacity)),
                Bucket::Local(_) => None,
            })
            .collect();
        let shared =
            (!capacities.is_empty()).then(|| SharedBuckets::new(pool, deployment, capacities));
        Self::build(deployment, queue, requests, tokens, shared)
    }

    fn build(
        deployment: &str,
        queue: &QueueConfig,
        requests: Option<Bucket>,
        tokens: Option<Bucket>,
        shared: Option<SharedBuckets>,
    ) -> Self {
        let limiter = Self {
            deployment: deployment.to_owned(),
            capacity: queue.capacity,
            max_wait: queue.max_wait,
            shared,
            state: Mutex::new(State {
                requests,
                tokens,
                queue: VecDeque::new(),
                queued_tokens: 0,
                next_id: 0,
                refused: 0,
                leasing: false,
                next_lease: Instant::now(),
                leases: 0,
            }),
        };
        limiter.record_depth(0);
        limiter
    }

    /// Creates the shared buckets or applies changed limits to them (a no-op for limits that
    /// are not shared).
    pub async fn sync(&self) -> Result<(), sqlx::Error> {
        match &self.shared {
            Some(shared) => shared.sync().await,
            None => Ok(()),
        }
    }

    /// Takes one request and `tokens` tokens: at once when the buckets have room and nobody
    /// waits; after waiting in line when the queue has space and the expected wait is within
    /// the maximum; otherwise refused at once. Dropping the returned future while it waits
    /// gives up its place in line.
    ///
    /// With shared limits, "room" counts what the shared buckets are thought to hold: a request
    /// this replica cannot serve from its leases but the shared buckets probably can is not
    /// refused for a full queue; it goes to the head of the queue and leases.
    pub async fn acquire(&self, tokens: u64) -> Result<Permit, Refused> {
        let start = Instant::now();
        let (id, wake, unchecked_since) = {
            let mut state = self.state();
            if let Some(bucket) = &state.tokens
                && tokens as f64 > bucket.capacity()
            {
                // `capacity` came from a u32; the cast back is exact.
                let limit = bucket.capacity() as u32;
                return Err(self.refuse(&mut state, Refused::TooLarge { tokens, limit }));
            }
            if state.queue.is_empty() && state.holds(tokens, start) {
                state.take(tokens, start);
                return Ok(Permit {
                    tokens,
                    waited: Duration::ZERO,
                });
            }
            let waiting = state.queue.len();
            let queued_tokens = state.queued_tokens + tokens;
            let expected = state.wait_for(waiting as u64 + 1, queued_tokens, start);
            // With shared limits, a request is refused only on a fresh view of the shared
            // buckets: one the estimate says they can serve, or one nobody waits ahead of,
            // joins the queue to lease and passes the refusal checks once a lease is back
            // (other replicas give back, so an estimate may be stale). The pause after a short
            // lease keeps that from being a query per refusal.
            let only_lease = self.shared.is_some()
                && (expected.is_zero()
                    || (waiting == 0 && !state.leasing && start >= state.next_lease));
            if !only_lease {
                self.may_wait(&mut state, waiting, expected)?;
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
            (id, wake, only_lease.then_some(state.leases))
        };
        // From here on, dropping this future (the client went away) leaves the queue.
        let mut place = Place {
            limiter: self,
            id,
            admitted: false,
        };
        // Set while it still has to pass the refusal checks: the leases completed when it came.
        let mut unchecked_since = unchecked_since;
        loop {
            let step = {
                let mut state = self.state();
                let now = Instant::now();
                if state.queue.front().map(|w| w.id) != Some(id) {
                    Step::Wait
                } else if state.holds(tokens, now) {
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
                } else if unchecked_since.is_some_and(|seen| state.leases > seen) {
                    let expected = state.wait_for(1, tokens, now);
                    if expected.is_zero() {
                        // The shared buckets still seem to hold enough: lease again.
                        unchecked_since = Some(state.leases);
                        state.next_step(tokens, true, now)
                    } else {
                        // A lease since it came says the shared buckets have too little: from
                        // here on it is a waiter like any other, if the queue would have taken
                        // it. Dropping `place` on the way out gives up its place.
                        unchecked_since = None;
                        self.may_wait(&mut state, 0, expected)?;
                        state.next_step(tokens, false, now)
                    }
                } else {
                    state.next_step(tokens, unchecked_since.is_some(), now)
                }
            };
            match step {
                Step::Lease(wants) => {
                    if let Some(shared) = &self.shared {
                        self.lease(shared, wants).await;
                    }
                }
                // At the head: the buckets will have room by the deadline, or sooner if a
                // refund wakes us.
                Step::Sleep(deadline) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline) => {}
                        () = wake.notified() => {}
                    }
                }
                // Behind someone: woken when the waiter ahead is admitted or leaves.
                Step::Wait => wake.notified().await,
            }
        }
    }

    /// One lease from the shared buckets (the caller set `leasing`); its grant goes to this
    /// replica's buckets. A failure puts the failed buckets in fallback.
    async fn lease(&self, shared: &SharedBuckets, wants: Vec<(Kind, f64)>) {
        let mut in_flight = LeaseInFlight {
            limiter: self,
            done: false,
        };
        let result = tokio::time::timeout(LEASE_TIMEOUT, shared.lease(&wants)).await;
        let now = Instant::now();
        let mut state = self.state();
        state.leasing = false;
        state.leases += 1;
        in_flight.done = true;
        let error = match result {
            Ok(Ok(leases)) => {
                let mut short = false;
                let mut recovered = false;
                for lease in leases {
                    let wanted = wants
                        .iter()
                        .find(|(kind, _)| *kind == lease.kind)
                        .map_or(0.0, |(_, amount)| *amount);
                    let outcome = if lease.granted + EPSILON < wanted {
                        short = true;
                        "short"
                    } else {
                        "granted"
                    };
                    self.count_lease(lease.kind, outcome);
                    if let Some(bucket) = state.leased(lease.kind) {
                        recovered |= bucket.leased(lease.granted, lease.remaining, now);
                    }
                }
                state.next_lease = if short { now + SHORT_LEASE_PAUSE } else { now };
                if recovered {
                    tracing::info!(
                        deployment = %self.deployment,
                        "rate limits are shared again: the database answers leases"
                    );
                }
                state.wake_head();
                return;
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {LEASE_TIMEOUT:?}"),
        };
        let mut started = false;
        for (kind, _) in &wants {
            self.count_lease(*kind, "failed");
            if let Some(bucket) = state.leased(*kind) {
                started |= bucket.failed(now);
            }
        }
        state.next_lease = now + FALLBACK_RETRY;
        if started {
            tracing::warn!(
                deployment = %self.deployment,
                %error,
                "rate lease failed: limiting on this replica alone, at its fallback share of \
                 the rates, until the database answers"
            );
        }
        state.wake_head();
    }

    /// Gives back to the shared buckets what this replica leased and left unused for
    /// [`IDLE_HOLD`] while nobody waited, and probes a database that failed leases. A no-op for
    /// limits that are not shared. The router calls it every [`TEND_EVERY`]; without it unused
    /// leases stay with the replica, which only lowers what the fleet admits.
    pub async fn tend(&self) {
        self.give_back(false).await;
    }

    /// Gives back everything leased and not in use (at shutdown, so a replica that stops does
    /// not take its slices with it).
    pub async fn release(&self) {
        self.give_back(true).await;
    }

    async fn give_back(&self, everything: bool) {
        let Some(shared) = &self.shared else {
            return;
        };
        let now = Instant::now();
        let idle_since = (!everything).then(|| now.checked_sub(IDLE_HOLD).unwrap_or(now));
        let idle = {
            let mut state = self.state();
            if state.leasing || (!everything && !state.queue.is_empty()) {
                return;
            }
            let mut idle = Vec::new();
            for bucket in state.buckets() {
                if let Some(bucket) = bucket.leased()
                    && let Some(amount) = bucket.take_idle(idle_since, now)
                {
                    idle.push((bucket.kind, amount));
                }
            }
            idle
        };
        if !idle.is_empty() {
            let result = tokio::time::timeout(LEASE_TIMEOUT, shared.give_back(&idle)).await;
            let now = Instant::now();
            let mut state = self.state();
            let given = matches!(result, Ok(Ok(())));
            for (kind, amount) in &idle {
                self.count_lease(*kind, if given { "returned" } else { "return_failed" });
                if let Some(bucket) = state.leased(*kind) {
                    if given {
                        bucket.gave_back(*amount, now);
                    } else {
                        bucket.put_back(*amount, now);
                    }
                }
            }
            state.wake_head();
        }
        // The flag is set and the lease started in one poll, so no await can leave it set.
        let probe: Vec<(Kind, f64)> = {
            let mut state = self.state();
            let now = Instant::now();
            if state.leasing || now < state.next_lease {
                return;
            }
            let probe: Vec<(Kind, f64)> = state
                .buckets()
                .filter_map(|b| b.leased())
                .filter(|b| b.fallback.is_some())
                .map(|b| (b.kind, 0.0))
                .collect();
            state.leasing = !probe.is_empty();
            probe
        };
        if !probe.is_empty() {
            self.lease(shared, probe).await;
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
    /// the head of the queue go sooner. With shared limits they return to this replica's
    /// leases, and to the shared bucket when left unused (see [`Limiter::tend`]).
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

    /// Whether a request may wait behind `waiting` others for about `expected`: refused when
    /// the queue is full or the wait would pass `max_wait`.
    fn may_wait(
        &self,
        state: &mut State,
        waiting: usize,
        expected: Duration,
    ) -> Result<(), Refused> {
        if waiting >= self.capacity {
            let refusal = Refused::QueueFull {
                waiting,
                retry_after: expected,
            };
            return Err(self.refuse(state, refusal));
        }
        if expected > self.max_wait {
            let refusal = Refused::WaitTooLong {
                expected,
                max_wait: self.max_wait,
            };
            return Err(self.refuse(state, refusal));
        }
        Ok(())
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

    fn count_lease(&self, kind: Kind, outcome: &'static str) {
        counter!(
            RATE_LEASES,
            "deployment" => self.deployment.clone(),
            "kind" => kind.as_str(),
            "outcome" => outcome
        )
        .increment(1);
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

/// A lease under way; if its future is dropped before the answer (the waiting client went
/// away), the next head may lease. Whatever the database granted then is lost to this replica,
/// which only lowers what the fleet admits.
struct LeaseInFlight<'a> {
    limiter: &'a Limiter,
    done: bool,
}

impl Drop for LeaseInFlight<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = self.limiter.state();
        state.leasing = false;
        state.wake_head();
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
