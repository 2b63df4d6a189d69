//! A deployment's circuit breaker: after a run of failures it stops sending calls to a
//! provider that is down, then lets a few probes through to find out when it is back.
//!
//! * **Closed** (normal): calls go through. It opens after `failure_threshold` *consecutive*
//!   health failures. A run of consecutive failures was chosen over a failure rate in a time
//!   window because it needs no window or minimum-volume tuning and behaves the same for a
//!   deployment with two calls a minute as for one with two hundred; a provider that fails only
//!   some calls is left to retries and fallbacks, not the breaker.
//! * **Open**: every call is refused at once with [`Open`] until `open_duration` has passed.
//!   The first call after that moves the breaker to half-open (until then the state gauge still
//!   reads open).
//! * **Half-open**: up to `half_open_probes` calls go through at once. A probe's success closes
//!   the breaker; a probe's health failure opens it again for a full `open_duration`.
//!
//! Health failures are the classes that say the provider itself is unwell: `transient`
//! (timeouts, connection errors, 5xx) and `external_degrading` (502–504, malformed answers).
//! `user_fixable` and `permanent` describe the request or the configuration, and
//! `external_rate_limit` means the provider is up but busy (the rate limiter's concern): those
//! are neutral, neither counting towards opening nor resetting the run of failures.
//!
//! [`Breaker::allow`] hands out an [`Attempt`] that must be consumed with
//! [`Attempt::success`] or [`Attempt::failure`]. Dropping it unreported (the client went away,
//! the call was cancelled) is neutral too: it says nothing about the provider, and it frees its
//! probe slot so a half-open breaker is never stuck waiting for a report that will not come.
//! Reports from attempts let through before the latest state change are ignored, so calls still
//! in flight when the breaker opens cannot extend or end the open period.
//!
//! Beyond its metrics, a breaker can hand every state change to a channel
//! ([`Breaker::send_changes_to`]); the router publishes them on the bus from there, so the
//! breaker itself knows nothing of NATS and a slow bus never holds up a call.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use metrics::{counter, gauge};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    BREAKER_EVENTS_FAILED, BREAKER_REJECTIONS, BREAKER_STATE, BREAKER_TRANSITIONS, BreakerConfig,
};
use crate::error::ErrorClass;

/// Whether a failure of this class counts towards opening the breaker.
pub fn is_health_failure(class: ErrorClass) -> bool {
    matches!(class, ErrorClass::Transient | ErrorClass::ExternalDegrading)
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    /// The value of the state gauge.
    fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

/// A breaker's change of state, as handed to [`Breaker::send_changes_to`]'s channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub deployment: String,
    pub state: BreakerState,
    /// Bumped by every change of this breaker (from 1): orders its changes.
    pub generation: u64,
    pub at: SystemTime,
}

/// The breaker refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the deployment's circuit breaker is open after repeated provider failures")]
pub struct Open {
    /// When the breaker will let a probe through; `None` while half-open with every probe slot
    /// taken (the probes' outcome decides, not the clock).
    pub retry_in: Option<Duration>,
}

/// One deployment's circuit breaker. Share it (`Arc`) between every call to the deployment.
#[derive(Debug)]
pub struct Breaker {
    deployment: String,
    config: BreakerConfig,
    inner: Mutex<Inner>,
    /// Where state changes go besides the metrics, once wired.
    changes: OnceLock<mpsc::Sender<Change>>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Bumped on every state change; an attempt remembers the one it was let through in.
    generation: u64,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probes: u32 },
}

impl State {
    fn public(&self) -> BreakerState {
        match self {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

/// What became of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    HealthFailure,
    /// A failure that says nothing about health, or no report at all.
    Neutral,
}

impl Breaker {
    pub fn new(deployment: &str, config: &BreakerConfig) -> Self {
        let breaker = Self {
            deployment: deployment.to_owned(),
            config: config.clone(),
            inner: Mutex::new(Inner {
                state: State::Closed { failures: 0 },
                generation: 0,
            }),
            changes: OnceLock::new(),
        };
        gauge!(BREAKER_STATE, "deployment" => breaker.deployment.clone())
            .set(BreakerState::Closed.gauge());
        breaker
    }

    /// Lets a call through, or refuses it at once while the breaker is open (or half-open with
    /// every probe slot taken). Report the call's outcome on the returned [`Attempt`].
    pub fn allow(self: &Arc<Self>) -> Result<Attempt, Open> {
        let mut inner = self.inner();
        let now = Instant::now();
        if let State::Open { until } = inner.state {
            if now < until {
                drop(inner);
                return Err(self.reject(Some(until - now)));
            }
            self.transition(&mut inner, State::HalfOpen { probes: 0 });
        }
        let probe = match &mut inner.state {
            State::Closed { .. } => false,
            State::HalfOpen { probes } if *probes < self.config.half_open_probes => {
                *probes += 1;
                true
            }
            State::HalfOpen { .. } | State::Open { .. } => {
                drop(inner);
                return Err(self.reject(None));
            }
        };
        Ok(Attempt {
            breaker: self.clone(),
            generation: inner.generation,
            probe,
            reported: false,
        })
    }

    /// Hands every later state change to `changes`, in order. Set once (a later call is
    /// ignored). Sending never waits: with the channel full, the change is dropped and counted
    /// in `colony_router_breaker_events_failed_total{reason="queue_full"}`, because a call must
    /// not wait on whoever reads the channel.
    pub fn send_changes_to(&self, changes: mpsc::Sender<Change>) {
        if self.changes.set(changes).is_err() {
            tracing::debug!(deployment = %self.deployment, "breaker changes already wired");
        }
    }

    /// Where the breaker stands now (open until the first call after the open duration).
    pub fn state(&self) -> BreakerState {
        self.inner().state.public()
    }

    fn report(&self, generation: u64, outcome: Outcome) {
        let mut inner = self.inner();
        if inner.generation != generation {
            return;
        }
        match (&mut inner.state, outcome) {
            (State::Closed { failures }, Outcome::Success) => *failures = 0,
            (State::Closed { failures }, Outcome::HealthFailure) => {
                *failures += 1;
                if *failures >= self.config.failure_threshold {
                    let failures = *failures;
                    self.open(&mut inner);
                    tracing::warn!(
                        deployment = %self.deployment,
                        failures,
                        open_for = ?self.config.open_duration,
                        "circuit breaker opened after consecutive provider failures"
                    );
                }
            }
            (State::HalfOpen { .. }, Outcome::Success) => {
                self.transition(&mut inner, State::Closed { failures: 0 });
                tracing::info!(deployment = %self.deployment, "circuit breaker closed: probe succeeded");
            }
            (State::HalfOpen { .. }, Outcome::HealthFailure) => {
                self.open(&mut inner);
                tracing::warn!(
                    deployment = %self.deployment,
                    open_for = ?self.config.open_duration,
                    "circuit breaker reopened: probe failed"
                );
            }
            (State::HalfOpen { probes }, Outcome::Neutral) => *probes = probes.saturating_sub(1),
            (State::Closed { .. }, Outcome::Neutral) | (State::Open { .. }, _) => {}
        }
    }

    fn open(&self, inner: &mut Inner) {
        let until = Instant::now() + self.config.open_duration;
        self.transition(inner, State::Open { until });
    }

    fn transition(&self, inner: &mut Inner, to: State) {
        let public = to.public();
        inner.state = to;
        inner.generation += 1;
        gauge!(BREAKER_STATE, "deployment" => self.deployment.clone()).set(public.gauge());
        counter!(
            BREAKER_TRANSITIONS,
            "deployment" => self.deployment.clone(),
            "to" => public.as_str()
        )
        .increment(1);
        // Sent under the lock, so the channel holds one breaker's changes in their order.
        if let Some(changes) = self.changes.get() {
            let change = Change {
                deployment: self.deployment.clone(),
                state: public,
                generation: inner.generation,
                at: SystemTime::now(),
            };
            match changes.try_send(change) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(change)) => {
                    counter!(BREAKER_EVENTS_FAILED, "reason" => "queue_full").increment(1);
                    tracing::warn!(
                        deployment = %change.deployment,
                        state = change.state.as_str(),
                        "breaker change not published: the publisher is behind"
                    );
                }
                // The publisher has stopped: the router is shutting down.
                Err(mpsc::error::TrySendError::Closed(change)) => tracing::debug!(
                    deployment = %change.deployment,
                    state = change.state.as_str(),
                    "breaker change not published: shutting down"
                ),
            }
        }
    }

    fn reject(&self, retry_in: Option<Duration>) -> Open {
        counter!(BREAKER_REJECTIONS, "deployment" => self.deployment.clone()).increment(1);
        Open { retry_in }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the state consistent before anything can panic, so a
        // poisoned lock still holds usable state.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A call the breaker let through. Consume it with [`Attempt::success`] or
/// [`Attempt::failure`]; dropping it unreported is neutral (see the module docs).
#[derive(Debug)]
#[must_use = "report the call's outcome with success() or failure(class)"]
pub struct Attempt {
    breaker: Arc<Breaker>,
    generation: u64,
    probe: bool,
    reported: bool,
}

impl Attempt {
    /// Whether this call is a half-open probe whose outcome decides the breaker's state.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The provider answered.
    pub fn success(mut self) {
        self.finish(Outcome::Success);
    }

    /// The call failed with `class`; only health failures count (see [`is_health_failure`]).
    pub fn failure(mut self, class: ErrorClass) {
        let outcome = if is_health_failure(class) {
            Outcome::HealthFailure
        } else {
            Outcome::Neutral
        };
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Outcome) {
        self.reported = true;
        self.breaker.report(self.generation, outcome);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.reported {
            self.finish(Outcome::Neutral);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::advance;

    use super::*;

    fn breaker(failure_threshold: u32, half_open_probes: u32) -> Arc<Breaker> {
        Arc::new(Breaker::new(
            "test",
            &BreakerConfig {
                failure_threshold,
                open_duration: Duration::from_secs(30),
                half_open_probes,
            },
        ))
    }

    fn fail(breaker: &Arc<Breaker>, times: u32) {
        for _ in 0..times {
            breaker.allow().unwrap().failure(ErrorClass::Transient);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_of_consecutive_failures() {
        let breaker = breaker(3, 1);
        fail(&breaker, 2);
        breaker.allow().unwrap().success();
        fail(&breaker, 2);
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker
            .allow()
            .unwrap()
            .failure(ErrorClass::ExternalDegrading);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(
            breaker.allow().unwrap_err().retry_in,
            Some(Duration::from_secs(30))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rejects_while_open_then_lets_a_probe_through() {
        let breaker = breaker(1, 1);
        fail(&breaker, 1);
        advance(Duration::from_secs(29)).await;
        assert_eq!(
            breaker.allow().unwrap_err().retry_in,
            Some(Duration::from_secs(1))
        );
        advance(Duration::from_secs(1)).await;
        let probe = breaker.allow().unwrap();
        assert!(probe.is_probe());
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        // The only probe slot is taken: the probe's outcome decides, not the clock.
        assert_eq!(breaker.allow().unwrap_err().retry_in, None);
        drop(probe);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_success_closes() {
        let breaker = breaker(1, 1);
        fail(&breaker, 1);
        advance(Duration::from_secs(30)).await;
        breaker.allow().unwrap().success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        let attempt = breaker.allow().unwrap();
        assert!(!attempt.is_probe());
        attempt.success();
    }

    #[tokio::test(start_paused = true)]
    async fn every_change_is_sent_in_order_and_a_full_channel_drops_without_waiting() {
        let breaker = breaker(1, 1);
        let (changes, mut received) = mpsc::channel(2);
        breaker.send_changes_to(changes);
        fail(&breaker, 1);
        advance(Duration::from_secs(30)).await;
        breaker.allow().unwrap().success();
        let mut seen = Vec::new();
        while let Ok(change) = received.try_recv() {
            assert_eq!(change.deployment, "test");
            seen.push((change.state, change.generation));
        }
        // Open, then half-open: the channel (2) was full when the probe closed it.
        assert_eq!(seen, [(BreakerState::Open, 1), (BreakerState::HalfOpen, 2)]);
        assert_eq!(breaker.state(), BreakerState::Closed);
        fail(&breaker, 1);
        assert_eq!(
            received.try_recv().map(|c| (c.state, c.generation)).ok(),
            Some((BreakerState::Open, 4))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_failure_reopens_for_the_full_duration() {
        let breaker = breaker(1, 1);
        fail(&breaker, 1);
        advance(Duration::from_secs(45)).await;
        breaker.allow().unwrap().failure(ErrorClass::Transient);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(
            breaker.allow().unwrap_err().retry_in,
            Some(Duration::from_secs(30))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_that_are_not_about_health_are_neutral() {
        let breaker = breaker(3, 1);
        for class in [
            ErrorClass::UserFixable,
            ErrorClass::Permanent,
            ErrorClass::ExternalRateLimit,
        ] {
            assert!(!is_health_failure(class));
            for _ in 0..10 {
                breaker.allow().unwrap().failure(class);
            }
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        // Neutral also means they do not reset a run of health failures.
        fail(&breaker, 2);
        breaker.allow().unwrap().failure(ErrorClass::UserFixable);
        fail(&breaker, 1);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn probes_are_limited_and_an_unreported_one_frees_its_slot() {
        let breaker = breaker(1, 2);
        fail(&breaker, 1);
        advance(Duration::from_secs(30)).await;
        let first = breaker.allow().unwrap();
        let second = breaker.allow().unwrap();
        assert!(first.is_probe() && second.is_probe());
        assert!(breaker.allow().is_err());
        // Cancelled: neutral, the slot is free again and the breaker stays half-open.
        drop(first);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        let third = breaker.allow().unwrap();
        // A rate-limited probe says nothing either.
        third.failure(ErrorClass::ExternalRateLimit);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        breaker.allow().unwrap().success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        // The second probe finishing after the breaker closed changes nothing.
        second.failure(ErrorClass::Transient);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_when_it_opens_do_not_move_it() {
        let breaker = breaker(2, 1);
        let slow_success = breaker.allow().unwrap();
        let slow_failure = breaker.allow().unwrap();
        fail(&breaker, 2);
        assert_eq!(breaker.state(), BreakerState::Open);
        slow_success.success();
        assert_eq!(breaker.state(), BreakerState::Open);
        advance(Duration::from_secs(20)).await;
        slow_failure.failure(ErrorClass::Transient);
        // Still the original open period, not extended by the late failure.
        assert_eq!(
            breaker.allow().unwrap_err().retry_in,
            Some(Duration::from_secs(10))
        );
    }
}
