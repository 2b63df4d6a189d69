//! One task's life in the worker: claim → keep the lease while working → remember the prompt
//! → ask the router → remember the reply → report. Works on domain types only; the peers and
//! the report sink are traits so the edges (`grpc`, `bus`) stay at the edge and tests can
//! fake them.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::metrics;
use crate::task::{ChatMessage, Claim, Dispatch, Lease, Report, TaskOutcome, TaskSpec};

/// Delay before a dispatch whose claim could not be made is redelivered.
pub const CLAIM_RETRY: Duration = Duration::from_secs(1);
/// First line of a context message that names a dependency's output by reference
/// (`colony-ref: task-output <task_id>`); the worker fetches the output before the prompt.
pub const OUTPUT_REF_PREFIX: &str = "colony-ref: task-output ";
/// Lease heartbeats are never sent more often than this.
const MIN_LEASE_HEARTBEAT: Duration = Duration::from_millis(200);
/// First and longest pause between report publish attempts.
const REPORT_BACKOFF_START: Duration = Duration::from_millis(100);
const REPORT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The three services a worker calls, in domain terms. Every call carries its own deadline.
pub trait Peers: Send + Sync + 'static {
    /// `Orchestrator.ClaimTask` for the dispatched attempt.
    fn claim(
        &self,
        dispatch: &Dispatch,
        worker_id: &str,
    ) -> impl Future<Output = Result<Claim, Error>> + Send;
    /// `Orchestrator.HeartbeatTask`: extends the lease or says it is lost.
    fn heartbeat(
        &self,
        task: &TaskSpec,
        worker_id: &str,
    ) -> impl Future<Output = Result<Lease, Error>> + Send;
    /// `Memory.AppendMessages` to the run's session.
    fn append(
        &self,
        task: &TaskSpec,
        messages: &[ChatMessage],
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// `Orchestrator.GetTaskOutput`: the output of a succeeded task of the same tenant.
    fn task_output(
        &self,
        task: &TaskSpec,
        task_id: &str,
    ) -> impl Future<Output = Result<String, Error>> + Send;
    /// `Router.Complete`.
    fn complete(
        &self,
        task: &TaskSpec,
        messages: &[ChatMessage],
    ) -> impl Future<Output = Result<crate::task::Completion, Error>> + Send;
}

/// Where reports go (the REPORTS stream), and the attempt's steps (for memory's replay log).
pub trait Reporter: Send + Sync + 'static {
    fn publish(&self, report: &Report) -> impl Future<Output = Result<(), Error>> + Send;
    /// Publishes `messages` as steps `first`, `first + 1`, … of the attempt.
    fn steps(
        &self,
        task: &TaskSpec,
        first: u32,
        messages: &[ChatMessage],
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

/// Tells the bus that work on a delivered message is still going on.
pub trait Progress: Send + Sync {
    fn progress(&self) -> impl Future<Output = ()> + Send;
}

/// What the edge should do with the dispatch message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Handled (reported, refused, lost or abandoned): acknowledge it.
    Done,
    /// The claim could not be made; redeliver after the delay.
    Retry(Duration),
    /// The claim can never be made; terminate the message (it is dead-lettered).
    Reject(String),
}

/// How many tasks run now; shared with the worker heartbeat.
#[derive(Debug, Clone, Default)]
pub struct Slots {
    busy: Arc<AtomicU32>,
}

impl Slots {
    pub fn busy(&self) -> u32 {
        self.busy.load(Ordering::Relaxed)
    }

    fn occupy(&self) -> SlotGuard {
        let busy = self.busy.fetch_add(1, Ordering::Relaxed) + 1;
        ::metrics::gauge!(metrics::SLOTS_BUSY).set(f64::from(busy));
        SlotGuard {
            busy: self.busy.clone(),
        }
    }
}

/// Frees a slot when the task ends, however it ends.
struct SlotGuard {
    busy: Arc<AtomicU32>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let busy = self.busy.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        ::metrics::gauge!(metrics::SLOTS_BUSY).set(f64::from(busy));
    }
}

/// Timing the worker needs beyond its peers' own deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The dispatch consumer's AckWait: progress must reach the bus more often than this.
    pub ack_wait: Duration,
}

/// How an attempt ended inside [`Worker::handle`].
enum Ended {
    Reported(&'static str),
    Lost(String),
    Abandoned,
}

/// Runs dispatched tasks. One per process, shared by every role's consumer.
pub struct Worker<P, R> {
    peers: P,
    reporter: R,
    worker_id: String,
    timing: Timing,
    slots: Slots,
    /// Cancelled when the shutdown grace runs out: every running task is abandoned.
    abandon: CancellationToken,
}

impl<P: Peers, R: Reporter> Worker<P, R> {
    pub fn new(
        peers: P,
        reporter: R,
        worker_id: String,
        timing: Timing,
        slots: Slots,
        abandon: CancellationToken,
    ) -> Self {
        Self {
            peers,
            reporter,
            worker_id,
            timing,
            slots,
            abandon,
        }
    }

    /// Handles one dispatch received by the consumer of `role` (the metric label; the role in
    /// the message is not trusted for labels).
    #[tracing::instrument(
        skip_all,
        fields(tenant = %dispatch.tenant, run_id = %dispatch.run_id, task_id = %dispatch.task_id, attempt = dispatch.attempt)
    )]
    pub async fn handle(
        &self,
        role: &str,
        dispatch: Dispatch,
        progress: impl Progress,
    ) -> Disposition {
        let (task, lease) = match self.peers.claim(&dispatch, &self.worker_id).await {
            Ok(Claim::Granted { task, lease }) => (task, lease),
            Ok(Claim::Refused { reason }) => {
                ::metrics::counter!(metrics::CLAIMS, "result" => "refused").increment(1);
                // The dispatch was only a hint; the orchestrator's database said no.
                tracing::debug!(%reason, "claim refused; dropping the dispatch");
                return Disposition::Done;
            }
            Err(error) => {
                ::metrics::counter!(metrics::CLAIMS, "result" => "error").increment(1);
                if error.is_retryable() {
                    tracing::warn!(%error, delay = ?CLAIM_RETRY, "claim failed; will retry");
                    return Disposition::Retry(CLAIM_RETRY);
                }
                tracing::warn!(%error, code = error.code(), "claim rejected; terminating the dispatch");
                return Disposition::Reject(format!("claim rejected: {error}"));
            }
        };
        ::metrics::counter!(metrics::CLAIMS, "result" => "granted").increment(1);
        if let Some(latency) = dispatch
            .dispatched_at
            .and_then(|at| SystemTime::now().duration_since(at).ok())
        {
            ::metrics::histogram!(metrics::DISPATCH_LATENCY_SECONDS).record(latency.as_secs_f64());
        }

        let _slot = self.slots.occupy();
        let started = Instant::now();
        let token = self.abandon.child_token();
        let ended = tokio::select! {
            biased;
            () = token.cancelled() => Ended::Abandoned,
            reason = self.keep_lease(&task, lease, &progress) => Ended::Lost(reason),
            kind = self.run_and_report(&task, &token) => kind.map_or(Ended::Abandoned, Ended::Reported),
        };
        // Whatever ended the task, nothing of it may keep running.
        token.cancel();
        let role = role.to_owned();
        match ended {
            Ended::Reported(kind) => {
                ::metrics::counter!(metrics::TASKS, "role" => role.clone(), "outcome" => kind)
                    .increment(1);
                ::metrics::histogram!(metrics::TASK_SECONDS, "role" => role)
                    .record(started.elapsed().as_secs_f64());
                tracing::info!(outcome = kind, "task reported");
            }
            Ended::Lost(reason) => {
                ::metrics::counter!(metrics::TASKS, "role" => role, "outcome" => "lost")
                    .increment(1);
                tracing::info!(%reason, "lease lost; stopped without reporting");
            }
            Ended::Abandoned => {
                ::metrics::counter!(metrics::TASKS, "role" => role, "outcome" => "lost")
                    .increment(1);
                tracing::warn!(
                    "shutdown grace ran out; task abandoned (its lease expires and the \
                     orchestrator dispatches it again)"
                );
            }
        }
        Disposition::Done
    }

    /// Heartbeats the lease (and the dispatch message) until the orchestrator says the lease
    /// is lost; returns why. Never returns while the lease holds: it runs inside the caller's
    /// `select!`, which also waits on the task's token, so cancellation drops it.
    async fn keep_lease(
        &self,
        task: &TaskSpec,
        lease: Duration,
        progress: &impl Progress,
    ) -> String {
        let mut period = lease_heartbeat_period(lease, self.timing.ack_wait);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            progress.progress().await;
            match self.peers.heartbeat(task, &self.worker_id).await {
                Ok(Lease::Held { lease }) => {
                    let next = lease.map_or(period, |lease| {
                        lease_heartbeat_period(lease, self.timing.ack_wait)
                    });
                    if next != period {
                        period = next;
                        ticker =
                            tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                Ok(Lease::Lost { reason }) => return reason,
                Err(error) => {
                    // The lease may still be valid; the next tick tries again.
                    ::metrics::counter!(metrics::LEASE_HEARTBEAT_FAILURES).increment(1);
                    tracing::warn!(%error, "lease heartbeat failed; retrying next tick");
                }
            }
        }
    }

    /// Runs the task and publishes its report. `None` when the token was cancelled before the
    /// report went out.
    async fn run_and_report(
        &self,
        task: &TaskSpec,
        token: &CancellationToken,
    ) -> Option<&'static str> {
        let outcome = self.execute(task).await;
        let report = Report {
            tenant: task.tenant.clone(),
            run_id: task.run_id.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            worker_id: self.worker_id.clone(),
            outcome,
            finished_at: SystemTime::now(),
        };
        self.publish(&report, token)
            .await
            .then(|| report.outcome.kind())
    }

    /// The task's context with every output reference replaced by the output it names.
    async fn resolve_context(&self, task: &TaskSpec) -> Result<Vec<ChatMessage>, Error> {
        let mut context = Vec::with_capacity(task.context.len());
        for message in &task.context {
            let Some(reference) = message.content.strip_prefix(OUTPUT_REF_PREFIX) else {
                context.push(message.clone());
                continue;
            };
            let (task_id, heading) = reference.split_once('\n').unwrap_or((reference, ""));
            let output = self.peers.task_output(task, task_id.trim()).await?;
            let content = if heading.is_empty() {
                output
            } else {
                format!("{heading}\n{output}")
            };
            context.push(ChatMessage::new(message.role.clone(), content));
        }
        Ok(context)
    }

    async fn execute(&self, task: &TaskSpec) -> TaskOutcome {
        if task.noop {
            return TaskOutcome::Succeeded {
                output: task.instructions.clone(),
                usage: crate::task::Usage::default(),
                deployment: String::new(),
            };
        }
        let mut prompt = match self.resolve_context(task).await {
            Ok(context) => context,
            Err(error) => {
                tracing::warn!(%error, class = %error.class(), "fetching a dependency output failed");
                return TaskOutcome::Failed {
                    class: error.class(),
                    message: error.to_string(),
                    usage: crate::task::Usage::default(),
                };
            }
        };
        prompt.push(ChatMessage::new("user", task.instructions.clone()));
        self.remember(task, &prompt, "prompt", 1).await;
        match self.peers.complete(task, &prompt).await {
            Ok(completion) => {
                let reply = [ChatMessage::new("assistant", completion.content.clone())];
                let next_step = u32::try_from(prompt.len()).unwrap_or(u32::MAX - 1) + 1;
                self.remember(task, &reply, "reply", next_step).await;
                TaskOutcome::Succeeded {
                    output: completion.content,
                    usage: completion.usage,
                    deployment: completion.deployment,
                }
            }
            Err(error) => {
                tracing::warn!(%error, class = %error.class(), "model call failed");
                TaskOutcome::Failed {
                    class: error.class(),
                    message: error.to_string(),
                    usage: crate::task::Usage::default(),
                }
            }
        }
    }

    /// Appends to the run's conversation and publishes the messages as the attempt's steps
    /// from `first_step` on. v1: a failure is logged and counted, and the task goes on without
    /// it.
    async fn remember(
        &self,
        task: &TaskSpec,
        messages: &[ChatMessage],
        step: &'static str,
        first_step: u32,
    ) {
        if let Err(error) = self.peers.append(task, messages).await {
            ::metrics::counter!(metrics::MEMORY_FAILURES, "step" => step).increment(1);
            tracing::warn!(%error, step, "memory append failed; continuing without it");
        }
        if let Err(error) = self.reporter.steps(task, first_step, messages).await {
            ::metrics::counter!(metrics::TRAJECTORY_FAILURES, "step" => step).increment(1);
            tracing::warn!(%error, step, "trajectory publish failed; continuing without it");
        }
    }

    /// Publishes `report`, retrying with backoff while `token` is live (the message id makes
    /// repeats harmless). Returns whether it went out.
    async fn publish(&self, report: &Report, token: &CancellationToken) -> bool {
        let mut delay = REPORT_BACKOFF_START;
        loop {
            match self.reporter.publish(report).await {
                Ok(()) => return true,
                Err(error) => {
                    ::metrics::counter!(metrics::REPORT_PUBLISH_FAILURES).increment(1);
                    tracing::warn!(%error, retry_in = ?delay, "report publish failed");
                }
            }
            tokio::select! {
                () = token.cancelled() => return false,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(REPORT_BACKOFF_MAX);
        }
    }
}

/// A third of the lease, and a third of the bus AckWait so the dispatch message is not
/// redelivered while the task runs; never under [`MIN_LEASE_HEARTBEAT`]. A lease of 0 (the
/// orchestrator did not say) counts as AckWait.
pub fn lease_heartbeat_period(lease: Duration, ack_wait: Duration) -> Duration {
    let lease = if lease.is_zero() { ack_wait } else { lease };
    (lease.min(ack_wait) / 3).max(MIN_LEASE_HEARTBEAT)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::error::Peer;
    use crate::task::{Completion, ErrorClass, Usage};

    #[test]
    fn lease_heartbeats_fit_lease_and_ack_wait() {
        let s = Duration::from_secs;
        assert_eq!(lease_heartbeat_period(s(30), s(30)), s(10));
        assert_eq!(lease_heartbeat_period(s(90), s(30)), s(10));
        assert_eq!(lease_heartbeat_period(s(6), s(30)), s(2));
        assert_eq!(lease_heartbeat_period(s(0), s(30)), s(10));
        assert_eq!(
            lease_heartbeat_period(Duration::from_millis(300), s(30)),
            MIN_LEASE_HEARTBEAT
        );
    }

    /// Grants every claim; heartbeats answer from a script; the router answers after `delay`.
    struct FakePeers {
        lease_lost_after: Option<usize>,
        heartbeats: AtomicUsize,
        router_delay: Duration,
        router: Result<Completion, ErrorClass>,
        appends: Mutex<Vec<Vec<ChatMessage>>>,
        noop: bool,
    }

    impl FakePeers {
        fn new(router: Result<Completion, ErrorClass>) -> Self {
            Self {
                lease_lost_after: None,
                heartbeats: AtomicUsize::new(0),
                router_delay: Duration::ZERO,
                router,
                appends: Mutex::new(Vec::new()),
                noop: false,
            }
        }
    }

    fn spec() -> TaskSpec {
        TaskSpec {
            tenant: "acme".into(),
            run_id: "r1".into(),
            task_id: "t1".into(),
            attempt: 2,
            role: "generalist".into(),
            instructions: "say hi".into(),
            tier: "budget".into(),
            max_tokens: 64,
            context: vec![ChatMessage::new("system", "be brief")],
            noop: false,
        }
    }

    impl Peers for FakePeers {
        async fn claim(&self, _: &Dispatch, _: &str) -> Result<Claim, Error> {
            Ok(Claim::Granted {
                task: TaskSpec {
                    noop: self.noop,
                    ..spec()
                },
                lease: Duration::from_secs(3),
            })
        }

        async fn heartbeat(&self, _: &TaskSpec, _: &str) -> Result<Lease, Error> {
            let n = self.heartbeats.fetch_add(1, Ordering::SeqCst) + 1;
            match self.lease_lost_after {
                Some(limit) if n >= limit => Ok(Lease::Lost {
                    reason: "attempt 3 owns the task".into(),
                }),
                _ => Ok(Lease::Held { lease: None }),
            }
        }

        async fn append(&self, _: &TaskSpec, messages: &[ChatMessage]) -> Result<(), Error> {
            self.appends.lock().unwrap().push(messages.to_vec());
            Err(Error::Call {
                peer: Peer::Memory,
                class: ErrorClass::Transient,
                message: "unreachable".into(),
            })
        }

        async fn task_output(&self, _: &TaskSpec, task_id: &str) -> Result<String, Error> {
            Ok(format!("the long output of {task_id}"))
        }

        async fn complete(&self, _: &TaskSpec, _: &[ChatMessage]) -> Result<Completion, Error> {
            tokio::time::sleep(self.router_delay).await;
            self.router.clone().map_err(|class| Error::Call {
                peer: Peer::Router,
                class,
                message: "provider says slow down".into(),
            })
        }
    }

    /// Fails the first `failures` publishes, then records.
    #[derive(Default)]
    struct FakeReporter {
        failures: AtomicUsize,
        attempts: AtomicUsize,
        published: Mutex<Vec<Report>>,
        /// First and last step number of each `steps` call.
        steps: Mutex<Vec<(u32, u32)>>,
    }

    impl Reporter for FakeReporter {
        async fn publish(&self, report: &Report) -> Result<(), Error> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(Error::Bus(colony_bus::Error::Publish {
                    subject: "colony.v1.task.report.succeeded".into(),
                    message: "no responders".into(),
                }));
            }
            self.published.lock().unwrap().push(report.clone());
            Ok(())
        }

        async fn steps(
            &self,
            _: &TaskSpec,
            first: u32,
            messages: &[ChatMessage],
        ) -> Result<(), Error> {
            let last = first + messages.len() as u32 - 1;
            self.steps.lock().unwrap().push((first, last));
            Ok(())
        }
    }

    #[derive(Default)]
    struct CountProgress(AtomicUsize);

    impl Progress for &CountProgress {
        async fn progress(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn dispatch() -> Dispatch {
        Dispatch {
            tenant: "acme".into(),
            run_id: "r1".into(),
            task_id: "t1".into(),
            attempt: 2,
            role: "generalist".into(),
            dispatched_at: Some(SystemTime::now()),
        }
    }

    fn worker(peers: FakePeers, reporter: FakeReporter) -> Worker<FakePeers, FakeReporter> {
        Worker::new(
            peers,
            reporter,
            "w1".into(),
            Timing {
                ack_wait: Duration::from_secs(30),
            },
            Slots::default(),
            CancellationToken::new(),
        )
    }

    fn completion() -> Completion {
        Completion {
            content: "hi".into(),
            usage: Usage {
                prompt_tokens: 7,
                completion_tokens: 1,
                cost_micros_usd: 3,
            },
            deployment: "mock".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_noop_task_succeeds_with_its_instructions_without_model_or_memory() {
        // The router would fail the task if it were asked.
        let peers = FakePeers {
            noop: true,
            ..FakePeers::new(Err(ErrorClass::Permanent))
        };
        let worker = worker(peers, FakeReporter::default());
        let progress = CountProgress::default();
        let disposition = worker.handle("noop", dispatch(), &progress).await;
        assert_eq!(disposition, Disposition::Done);
        let published = worker.reporter.published.lock().unwrap();
        assert_eq!(published.len(), 1);
        assert_eq!(
            published[0].outcome,
            TaskOutcome::Succeeded {
                output: "say hi".into(),
                usage: Usage::default(),
                deployment: String::new(),
            }
        );
        assert!(worker.peers.appends.lock().unwrap().is_empty());
        assert!(worker.reporter.steps.lock().unwrap().is_empty());
        assert_eq!(worker.slots.busy(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn report_is_retried_until_published_and_memory_failures_do_not_fail_it() {
        let reporter = FakeReporter {
            failures: AtomicUsize::new(3),
            ..FakeReporter::default()
        };
        let worker = worker(FakePeers::new(Ok(completion())), reporter);
        let progress = CountProgress::default();
        let disposition = worker.handle("generalist", dispatch(), &progress).await;
        assert_eq!(disposition, Disposition::Done);
        assert_eq!(worker.reporter.attempts.load(Ordering::SeqCst), 4);
        let published = worker.reporter.published.lock().unwrap();
        assert_eq!(published.len(), 1);
        let report = &published[0];
        assert_eq!(report.msg_id(), "report-t1-2");
        assert_eq!(report.worker_id, "w1");
        assert_eq!(
            report.outcome,
            TaskOutcome::Succeeded {
                output: "hi".into(),
                usage: completion().usage,
                deployment: "mock".into()
            }
        );
        let appends = worker.peers.appends.lock().unwrap();
        assert_eq!(
            *appends,
            [
                vec![
                    ChatMessage::new("system", "be brief"),
                    ChatMessage::new("user", "say hi")
                ],
                vec![ChatMessage::new("assistant", "hi")],
            ]
        );
        // The same messages are the attempt's steps 1-2 (prompt) and 3 (reply).
        assert_eq!(*worker.reporter.steps.lock().unwrap(), [(1, 2), (3, 3)]);
        assert_eq!(worker.slots.busy(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn output_references_are_fetched_before_the_prompt() {
        let worker = worker(FakePeers::new(Ok(completion())), FakeReporter::default());
        let task = TaskSpec {
            context: vec![
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "Output of task \"a\":\nsmall"),
                ChatMessage::new(
                    "user",
                    format!("{OUTPUT_REF_PREFIX}t0\nOutput of task \"b\" (9 bytes):"),
                ),
            ],
            ..spec()
        };
        let context = worker.resolve_context(&task).await.unwrap();
        assert_eq!(
            context,
            [
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "Output of task \"a\":\nsmall"),
                ChatMessage::new(
                    "user",
                    "Output of task \"b\" (9 bytes):\nthe long output of t0"
                ),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn router_errors_become_failed_reports_with_their_class() {
        let worker = worker(
            FakePeers::new(Err(ErrorClass::ExternalRateLimit)),
            FakeReporter::default(),
        );
        let progress = CountProgress::default();
        worker.handle("generalist", dispatch(), &progress).await;
        let published = worker.reporter.published.lock().unwrap();
        assert_eq!(
            published[0].outcome,
            TaskOutcome::Failed {
                class: ErrorClass::ExternalRateLimit,
                message: "router: provider says slow down".into(),
                usage: Usage::default(),
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_stops_the_task_without_a_report() {
        let mut peers = FakePeers::new(Ok(completion()));
        peers.lease_lost_after = Some(2);
        peers.router_delay = Duration::from_secs(60);
        let worker = worker(peers, FakeReporter::default());
        let progress = CountProgress::default();
        let started = tokio::time::Instant::now();
        let disposition = worker.handle("generalist", dispatch(), &progress).await;
        assert_eq!(disposition, Disposition::Done);
        // Lease 3s → a heartbeat every second; the second one says the lease is lost.
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(worker.peers.heartbeats.load(Ordering::SeqCst), 2);
        assert_eq!(progress.0.load(Ordering::SeqCst), 2);
        assert!(worker.reporter.published.lock().unwrap().is_empty());
        assert_eq!(worker.slots.busy(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn abandonment_stops_report_retries() {
        let reporter = FakeReporter {
            failures: AtomicUsize::new(usize::MAX),
            ..FakeReporter::default()
        };
        let worker = Arc::new(worker(FakePeers::new(Ok(completion())), reporter));
        let abandon = worker.abandon.clone();
        let tracker = tokio_util::task::TaskTracker::new();
        let running = {
            let worker = worker.clone();
            tracker.spawn(async move {
                let progress = CountProgress::default();
                worker.handle("generalist", dispatch(), &progress).await
            })
        };
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(worker.reporter.attempts.load(Ordering::SeqCst) > 3);
        abandon.cancel();
        assert_eq!(running.await.unwrap(), Disposition::Done);
        assert!(worker.reporter.published.lock().unwrap().is_empty());
    }
}
