//! One task's life in the worker: claim → keep the lease while working → remember the prompt
//! → ask the router → remember the reply → report. Works on domain types only; the peers and
//! the report sink are traits so the edges (`grpc`, `bus`) stay at the edge and tests can
//! fake them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::config::AgentConfig;
use crate::metrics;
use crate::sandbox::{SandboxConfig, Workspace};
use crate::task::{
    ChatMessage, Checkpoint, ChildTask, Claim, Dispatch, ErrorClass, FoundMemory, Lease,
    MemoryScope, Report, Spawned, Strategy, TaskOutcome, TaskSpec, TokenChunk, ToolSpec, Usage,
    Validation, Verdict, WrittenMemory,
};
use crate::tools::{self, ToolOutcome, Toolbox};

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
    /// `Router.Complete`, offering the model `tools` (none: a plain completion).
    fn complete(
        &self,
        task: &TaskSpec,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> impl Future<Output = Result<crate::task::Completion, Error>> + Send;
    /// `Router.CompleteStream`: as [`Peers::complete`], sending the answer's text to `deltas`
    /// as the model writes it.
    fn complete_streamed(
        &self,
        task: &TaskSpec,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        deltas: &mpsc::UnboundedSender<String>,
    ) -> impl Future<Output = Result<crate::task::Completion, Error>> + Send;
    /// `Orchestrator.ReleaseTask`: gives the attempt's lease back now; whether it was ours.
    fn release(
        &self,
        task: &TaskSpec,
        worker_id: &str,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
    /// `Orchestrator.SaveCheckpoint`: `None` when saved, else why the attempt is no longer
    /// this worker's.
    fn save_checkpoint(
        &self,
        task: &TaskSpec,
        worker_id: &str,
        checkpoint: &Checkpoint,
    ) -> impl Future<Output = Result<Option<String>, Error>> + Send;
    /// The summaries (oldest first) of `messages`, made by memory: they are appended to the
    /// attempt's own context session and `Memory.CompressSession` summarises all of them.
    fn compress(
        &self,
        task: &TaskSpec,
        messages: &[ChatMessage],
    ) -> impl Future<Output = Result<Vec<String>, Error>> + Send;
    /// `Memory.SearchMemories` over what the task may see: its tenant's shared memories, its
    /// role's and its run's.
    fn search_memories(
        &self,
        task: &TaskSpec,
        query: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<FoundMemory>, Error>> + Send;
    /// `Memory.WriteMemories` with one memory.
    fn write_memory(
        &self,
        task: &TaskSpec,
        scope: MemoryScope,
        text: &str,
        importance: Option<f32>,
    ) -> impl Future<Output = Result<WrittenMemory, Error>> + Send;
    /// `Memory.SuggestStrategies` for the task's role.
    fn suggest_strategies(
        &self,
        task: &TaskSpec,
        about: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Strategy>, Error>> + Send;
    /// `Memory.RecordStrategyOutcome`: whether a strategy the task was given helped.
    fn record_strategy_outcome(
        &self,
        task: &TaskSpec,
        strategy_id: i64,
        success: bool,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// `Orchestrator.SpawnTasks`: children of this attempt, optionally parking it until they
    /// finish.
    fn spawn(
        &self,
        task: &TaskSpec,
        worker_id: &str,
        children: &[ChildTask],
        wait: bool,
    ) -> impl Future<Output = Result<Spawned, Error>> + Send;
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
    /// Publishes a piece of what the task's model is writing.
    fn tokens(
        &self,
        task: &TaskSpec,
        chunk: &TokenChunk,
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

/// What the worker needs of its configuration beyond its peers' own deadlines.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The dispatch consumer's AckWait: progress must reach the bus more often than this.
    pub ack_wait: Duration,
    /// The agent loop's bounds.
    pub agent: AgentConfig,
    /// Where workspace tools run and what their commands may use.
    pub sandbox: SandboxConfig,
}

/// The tasks running in this worker by run, so that a cancelled run's tasks stop at once
/// rather than at their next lease heartbeat.
#[derive(Default)]
struct Running {
    /// By `(tenant, run_id)`: each running task's registration number and stop token.
    runs: Mutex<HashMap<RunKey, Vec<(u64, CancellationToken)>>>,
    next: AtomicU64,
}

type RunKey = (String, String);

impl Running {
    /// A token cancelled when `task`'s run is; it unregisters when dropped.
    fn register(&self, task: &TaskSpec) -> RunningTask<'_> {
        let key = (task.tenant.clone(), task.run_id.clone());
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .push((id, token.clone()));
        RunningTask {
            running: self,
            key,
            id,
            token,
        }
    }

    fn cancel(&self, tenant: &str, run_id: &str) -> usize {
        let runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tasks) = runs.get(&(tenant.to_owned(), run_id.to_owned())) else {
            return 0;
        };
        for (_, token) in tasks {
            token.cancel();
        }
        tasks.len()
    }
}

struct RunningTask<'a> {
    running: &'a Running,
    key: RunKey,
    id: u64,
    token: CancellationToken,
}

impl Drop for RunningTask<'_> {
    fn drop(&mut self) {
        let mut runs = self
            .running
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tasks) = runs.get_mut(&self.key) {
            tasks.retain(|(id, _)| *id != self.id);
            if tasks.is_empty() {
                runs.remove(&self.key);
            }
        }
    }
}

/// How the agent loop ended.
enum LoopEnd {
    /// The model answered without calling a tool: `output`, and the loop's state with the
    /// answer as its last message.
    Answered {
        state: Checkpoint,
        output: String,
        deployment: String,
        /// The tier that answered (the task's, or the one it escalated to).
        tier: String,
    },
    /// It failed, or parked (`None`).
    Ended(Option<TaskOutcome>),
}

/// A judge's critique, or `None` when its answer starts with ACCEPT. An answer that is
/// neither ACCEPT nor REJECT counts as a rejection, its text the critique: a judge that cannot
/// say yes has not accepted.
fn rejection(verdict: &str) -> Option<String> {
    let text = verdict.trim();
    let first = text
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_uppercase();
    if first.starts_with("ACCEPT") {
        return None;
    }
    let critique = if first.starts_with("REJECT") {
        text.get("REJECT".len()..)
            .unwrap_or("")
            .trim_start_matches([':', ' ', '-'])
            .trim()
    } else {
        text
    };
    Some(if critique.is_empty() {
        "(no reason given)".to_owned()
    } else {
        critique.to_owned()
    })
}

/// How an attempt ended inside [`Worker::handle`].
enum Ended {
    Reported(&'static str),
    /// It spawned children and waits for them; the orchestrator queues it again.
    Parked,
    /// Its run was cancelled: stopped at once, not reported (the orchestrator decided).
    Cancelled,
    Lost(String),
    Abandoned,
}

/// Runs dispatched tasks. One per process, shared by every role's consumer.
pub struct Worker<P, R> {
    peers: P,
    reporter: R,
    worker_id: String,
    settings: Settings,
    slots: Slots,
    /// Cancelled when the shutdown grace runs out: every running task is abandoned.
    abandon: CancellationToken,
    running: Running,
}

impl<P: Peers, R: Reporter> Worker<P, R> {
    /// Stops every task of the run at once (a run-cancelling event): its model call is dropped
    /// and its commands' process groups are killed; nothing is reported. Returns how many.
    pub fn cancel_run(&self, tenant: &str, run_id: &str) -> usize {
        self.running.cancel(tenant, run_id)
    }

    pub fn new(
        peers: P,
        reporter: R,
        worker_id: String,
        settings: Settings,
        slots: Slots,
        abandon: CancellationToken,
    ) -> Self {
        Self {
            peers,
            reporter,
            worker_id,
            settings,
            slots,
            abandon,
            running: Running::default(),
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
        let run = self.running.register(&task);
        let ended = tokio::select! {
            biased;
            () = token.cancelled() => Ended::Abandoned,
            () = run.token.cancelled() => Ended::Cancelled,
            reason = self.keep_lease(&task, lease, &progress) => Ended::Lost(reason),
            ended = self.run_and_report(&task, &token) => ended,
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
            Ended::Parked => {
                ::metrics::counter!(metrics::TASKS, "role" => role, "outcome" => "parked")
                    .increment(1);
            }
            Ended::Cancelled => {
                ::metrics::counter!(metrics::TASKS, "role" => role, "outcome" => "cancelled")
                    .increment(1);
                tracing::info!("run cancelled; stopped without reporting");
                self.remove_workspace(&task);
                // One heartbeat tells the orchestrator the task has stopped (it answers
                // "cancelled" and ends it) instead of it waiting for the lease to expire.
                if let Err(error) = self.peers.heartbeat(&task, &self.worker_id).await {
                    tracing::debug!(%error, "could not confirm the cancelled task's stop");
                }
            }
            Ended::Lost(reason) => {
                ::metrics::counter!(metrics::TASKS, "role" => role, "outcome" => "lost")
                    .increment(1);
                tracing::info!(%reason, "lease lost; stopped without reporting");
                if reason == "cancelled" {
                    self.remove_workspace(&task);
                }
            }
            Ended::Abandoned => {
                ::metrics::counter!(metrics::TASKS, "role" => role, "outcome" => "lost")
                    .increment(1);
                // Given back, the lease ends now and the orchestrator's reaper queues the
                // task again at its next pass; otherwise it does when the lease expires.
                match self.peers.release(&task, &self.worker_id).await {
                    Ok(true) => tracing::warn!(
                        "shutdown grace ran out; task abandoned and its lease released for \
                         another worker"
                    ),
                    Ok(false) => tracing::warn!(
                        "shutdown grace ran out; task abandoned (its attempt was no longer ours)"
                    ),
                    Err(error) => tracing::warn!(
                        %error,
                        "shutdown grace ran out; task abandoned, its lease not released (it \
                         expires and the orchestrator dispatches the task again)"
                    ),
                }
            }
        }
        Disposition::Done
    }

    /// Deletes the task's workspace, if it has one (a task that will not run again here).
    fn remove_workspace(&self, task: &TaskSpec) {
        if let Err(error) = Workspace::remove_named(&self.settings.sandbox.root, &task.task_id) {
            tracing::warn!(%error, "could not remove the task's workspace");
        }
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
        let mut period = lease_heartbeat_period(lease, self.settings.ack_wait);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            progress.progress().await;
            match self.peers.heartbeat(task, &self.worker_id).await {
                Ok(Lease::Held { lease }) => {
                    let next = lease.map_or(period, |lease| {
                        lease_heartbeat_period(lease, self.settings.ack_wait)
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

    /// Runs the task and publishes its report.
    async fn run_and_report(&self, task: &TaskSpec, token: &CancellationToken) -> Ended {
        let Some((outcome, verdict)) = self.execute(task, token).await else {
            return Ended::Parked;
        };
        let report = Report {
            tenant: task.tenant.clone(),
            run_id: task.run_id.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            worker_id: self.worker_id.clone(),
            outcome,
            finished_at: SystemTime::now(),
            verdict,
        };
        if self.publish(&report, token).await {
            Ended::Reported(report.outcome.kind())
        } else {
            Ended::Abandoned
        }
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

    /// The attempt's outcome; `None` when it parked (spawned children to wait for) and must
    /// not be reported.
    async fn execute(
        &self,
        task: &TaskSpec,
        token: &CancellationToken,
    ) -> Option<(TaskOutcome, Option<Verdict>)> {
        let failed = |class, message| {
            Some((
                TaskOutcome::Failed {
                    class,
                    message,
                    usage: Usage::default(),
                },
                None,
            ))
        };
        if task.noop {
            return Some((
                TaskOutcome::Succeeded {
                    output: task.instructions.clone(),
                    usage: Usage::default(),
                    deployment: String::new(),
                },
                None,
            ));
        }
        // Strategies given to the agent, scored by the verdict on its answer.
        let suggested = Mutex::new(Vec::new());
        let resume = match &task.checkpoint {
            Some(checkpoint) => {
                tracing::info!(
                    model_calls = checkpoint.model_calls,
                    messages = checkpoint.messages.len(),
                    "resuming from the checkpoint of an earlier attempt"
                );
                ::metrics::counter!(metrics::RESUMED).increment(1);
                checkpoint.clone()
            }
            None => {
                let mut prompt = match self.resolve_context(task).await {
                    Ok(context) => context,
                    Err(error) => {
                        tracing::warn!(%error, class = %error.class(), "fetching a dependency output failed");
                        return failed(error.class(), error.to_string());
                    }
                };
                if let Some(recalled) = self.recall(task, &suggested).await {
                    prompt.push(recalled);
                }
                prompt.push(ChatMessage::new("user", task.instructions.clone()));
                // Remembered by the loop, alongside its first model call.
                Checkpoint {
                    model_calls: 0,
                    messages: prompt,
                    usage: Usage::default(),
                }
            }
        };
        let offered = tools::offered(task);
        // A workspace only for roles that may use it; it outlives a parked attempt (the
        // parent's next attempt may run here again) and goes when the task is reported.
        let workspace = offered
            .iter()
            .any(|tool| tools::WORKSPACE_TOOLS.contains(&tool.name))
            .then(|| Workspace::create(&self.settings.sandbox.root, &task.task_id));
        let outcome = self
            .answer_and_validate(
                task,
                resume,
                &offered,
                workspace.as_ref(),
                &suggested,
                token,
            )
            .await;
        if outcome.is_some()
            && let Some(Ok(workspace)) = workspace
            && let Err(error) = workspace.remove()
        {
            tracing::warn!(%error, "could not remove the task's workspace");
        }
        outcome
    }

    /// What memory holds for a fresh prompt, as one `system` message before the instructions:
    /// the memories most relevant to the instructions when the role may use `memory_search`,
    /// and strategies for similar tasks when it may use `suggest_strategy` (noted as given, so
    /// the verdict scores them). A failed lookup is logged and counted; the prompt goes
    /// without it.
    async fn recall(&self, task: &TaskSpec, suggested: &Mutex<Vec<i64>>) -> Option<ChatMessage> {
        let may = |tool: &str| task.tools.iter().any(|allowed| allowed == tool);
        let agent = &self.settings.agent;
        let memories = async {
            if agent.prompt_memories == 0 || !may(tools::MEMORY_SEARCH) {
                return Vec::new();
            }
            recalled(
                self.peers
                    .search_memories(task, &task.instructions, agent.prompt_memories)
                    .await,
                "memories",
            )
        };
        let strategies = async {
            if agent.prompt_strategies == 0 || !may(tools::SUGGEST_STRATEGY) {
                return Vec::new();
            }
            recalled(
                self.peers
                    .suggest_strategies(task, &task.instructions, agent.prompt_strategies)
                    .await,
                "strategies",
            )
        };
        let (memories, strategies) = tokio::join!(memories, strategies);
        if memories.is_empty() && strategies.is_empty() {
            return None;
        }
        let mut text = RECALLED_HEADING.to_owned();
        if !memories.is_empty() {
            text.push_str("\n\nMemories, most relevant first:\n");
            text.push_str(&tools::list_memories(&memories));
        }
        if !strategies.is_empty() {
            tools::note_suggested(suggested, &strategies);
            text.push_str("\n\nStrategies for similar tasks of your role:\n");
            text.push_str(&tools::list_strategies(&strategies));
        }
        Some(ChatMessage::new("system", text))
    }

    /// Runs the agent loop to an answer, then has the task's judges check it: a rejection goes
    /// back to the model as a critique and the loop answers again, at most `max_rounds` times;
    /// then the policy reports the answer with a warning or fails the task. The verdict is
    /// reported (the orchestrator measures the tier's quality by it) and decides whether the
    /// strategies the agent was given count as wins or losses.
    async fn answer_and_validate(
        &self,
        task: &TaskSpec,
        mut state: Checkpoint,
        offered: &[ToolSpec],
        workspace: Option<&Result<Workspace, crate::sandbox::Error>>,
        suggested: &Mutex<Vec<i64>>,
        token: &CancellationToken,
    ) -> Option<(TaskOutcome, Option<Verdict>)> {
        let mut rounds = 0;
        loop {
            let (answered, output, deployment, tier) = match self
                .agent_loop(task, state, offered, workspace, suggested, token)
                .await
            {
                LoopEnd::Answered {
                    state,
                    output,
                    deployment,
                    tier,
                } => (state, output, deployment, tier),
                LoopEnd::Ended(outcome) => return outcome.map(|outcome| (outcome, None)),
            };
            let Some(validation) = &task.validation else {
                let outcome = TaskOutcome::Succeeded {
                    output,
                    usage: answered.usage,
                    deployment,
                };
                return Some((outcome, None));
            };
            let mut usage = answered.usage;
            let (judge, critique) = match self.judge(task, validation, &output, &mut usage).await {
                Ok(None) => {
                    ::metrics::counter!(metrics::VALIDATIONS, "verdict" => "accepted").increment(1);
                    let outcome = TaskOutcome::Succeeded {
                        output,
                        usage,
                        deployment,
                    };
                    return Some(
                        self.judged(task, outcome, tier, true, rounds, suggested)
                            .await,
                    );
                }
                Ok(Some(rejection)) => rejection,
                Err(error) => {
                    tracing::warn!(%error, "a judge's model call failed");
                    let outcome = TaskOutcome::Failed {
                        class: error.class(),
                        message: format!("validating the answer: {error}"),
                        usage,
                    };
                    return Some((outcome, None));
                }
            };
            ::metrics::counter!(metrics::VALIDATIONS, "verdict" => "rejected").increment(1);
            if rounds >= validation.max_rounds {
                let summary = format!(
                    "judge {judge} still rejected the answer after {rounds} regeneration(s): \
                     {critique}"
                );
                let outcome = if validation.fail_on_reject {
                    ::metrics::counter!(metrics::VALIDATIONS, "verdict" => "failed").increment(1);
                    TaskOutcome::Failed {
                        class: ErrorClass::UserFixable,
                        message: summary,
                        usage,
                    }
                } else {
                    ::metrics::counter!(metrics::VALIDATIONS, "verdict" => "accepted_with_warning")
                        .increment(1);
                    tracing::warn!(warning = %summary, "answer reported with a warning");
                    TaskOutcome::Succeeded {
                        output,
                        usage,
                        deployment,
                    }
                };
                return Some(
                    self.judged(task, outcome, tier, false, rounds + 1, suggested)
                        .await,
                );
            }
            rounds += 1;
            tracing::info!(%judge, rounds, "answer rejected; regenerating with the critique");
            let critique = ChatMessage::new(
                "user",
                format!(
                    "A reviewer ({judge}) rejected your answer:\n{critique}\n\nRevise your \
                     answer so that it meets the rubric."
                ),
            );
            let step = step_number(answered.messages.len()) + 1;
            self.remember(task, std::slice::from_ref(&critique), "critique", step)
                .await;
            let mut messages = answered.messages;
            messages.push(critique);
            state = Checkpoint {
                model_calls: answered.model_calls,
                messages,
                usage,
            };
        }
    }

    /// The judged outcome with its verdict, after telling memory whether the strategies the
    /// agent was given (`suggested`) helped: a win when the answer was accepted in the end, a
    /// loss when it was still rejected. A failed record is logged; the report goes on.
    async fn judged(
        &self,
        task: &TaskSpec,
        outcome: TaskOutcome,
        tier: String,
        accepted: bool,
        rejections: u32,
        suggested: &Mutex<Vec<i64>>,
    ) -> (TaskOutcome, Option<Verdict>) {
        let strategies =
            std::mem::take(&mut *suggested.lock().unwrap_or_else(PoisonError::into_inner));
        let recorded = strategies.iter().map(|&id| async move {
            if let Err(error) = self.peers.record_strategy_outcome(task, id, accepted).await {
                tracing::warn!(%error, strategy = id, "could not record the strategy's outcome");
            }
        });
        futures::future::join_all(recorded).await;
        let verdict = Verdict {
            tier,
            accepted,
            rejections,
        };
        (outcome, Some(verdict))
    }

    /// Asks each judge in turn; the first rejection ends it. `Ok(None)`: accepted by all;
    /// `Ok(Some((judge, critique)))`: rejected. The judges' usage is added to `usage`.
    async fn judge(
        &self,
        task: &TaskSpec,
        validation: &Validation,
        output: &str,
        usage: &mut Usage,
    ) -> Result<Option<(String, String)>, Error> {
        for judge in &validation.judges {
            let messages = [
                ChatMessage::new(
                    "system",
                    format!(
                        "{}\n\nYou are checking another agent's answer against this rubric:\n{}\n\n\
                         Reply ACCEPT on the first line if the answer meets the rubric. \
                         Otherwise reply REJECT on the first line, then what must change.",
                        judge.prompt, validation.rubric
                    ),
                ),
                ChatMessage::new(
                    "user",
                    format!("Task:\n{}\n\nAnswer:\n{output}", task.instructions),
                ),
            ];
            if let Some(reason) = over_token_budget(task, *usage, &messages) {
                ::metrics::counter!(metrics::AGENT_STOPPED, "reason" => "token_budget")
                    .increment(1);
                return Err(Error::TokenBudget(format!(
                    "judge {}: {reason}",
                    judge.name
                )));
            }
            let as_judge = TaskSpec {
                tier: judge.tier.clone(),
                checkpoint: None,
                ..task.clone()
            };
            let verdict = self.peers.complete(&as_judge, &messages, &[]).await?;
            *usage = usage.plus(verdict.usage);
            if let Some(critique) = rejection(&verdict.content) {
                return Ok(Some((judge.name.clone(), critique)));
            }
        }
        Ok(None)
    }

    /// Model call → tool calls → their results → model call …, until the model answers
    /// without calling a tool (its answer is the output), a call fails, a tool parks the task,
    /// or `agent.max_steps` model calls were made.
    async fn agent_loop(
        &self,
        task: &TaskSpec,
        start: Checkpoint,
        offered: &[ToolSpec],
        workspace: Option<&Result<Workspace, crate::sandbox::Error>>,
        suggested: &Mutex<Vec<i64>>,
        token: &CancellationToken,
    ) -> LoopEnd {
        let toolbox = Toolbox {
            peers: &self.peers,
            task,
            worker_id: &self.worker_id,
            config: &self.settings.agent,
            sandbox: &self.settings.sandbox,
            workspace,
            suggested,
            cancel: token,
        };
        let Checkpoint {
            model_calls,
            mut messages,
            mut usage,
        } = start;
        // A fresh prompt is not in memory yet; it is appended while the first call runs (the
        // reply is appended after both, so the session keeps its order).
        let mut unremembered = if model_calls == 0 { messages.len() } else { 0 };
        // Trajectory steps are numbered across the attempt: the prompt took 1..=len (after a
        // resume, the conversation so far stands where the prompt would).
        let mut next_step = step_number(messages.len()) + 1;
        // The task as asked of a larger-context tier, once the conversation outgrew its own.
        let mut escalated: Option<TaskSpec> = None;
        for call in model_calls.saturating_add(1)..=self.settings.agent.max_steps {
            let window = escalated.as_ref().unwrap_or(task).context_window;
            if overflows(&messages, window, self.settings.agent.context_fill) {
                if unremembered > 0 {
                    // The prompt is stored as it was, before any of it is compressed.
                    self.remember(task, &messages[..unremembered], "prompt", 1)
                        .await;
                    unremembered = 0;
                }
                match self.fit_context(task, &mut escalated, &mut messages).await {
                    Ok(Some(summary)) => {
                        self.remember(task, std::slice::from_ref(&summary), "summary", next_step)
                            .await;
                        next_step += 1;
                    }
                    Ok(None) => {}
                    Err((class, message)) => {
                        return LoopEnd::Ended(Some(TaskOutcome::Failed {
                            class,
                            message,
                            usage,
                        }));
                    }
                }
            }
            let asking = escalated.as_ref().unwrap_or(task);
            if let Some(reason) = over_token_budget(task, usage, &messages) {
                ::metrics::counter!(metrics::AGENT_STOPPED, "reason" => "token_budget")
                    .increment(1);
                return LoopEnd::Ended(Some(TaskOutcome::Failed {
                    class: ErrorClass::UserFixable,
                    message: reason,
                    usage,
                }));
            }
            let asked = Instant::now();
            let (deltas, written) = mpsc::unbounded_channel();
            let call_model = async {
                // Dropped when the call ends, which ends the forwarding below.
                let deltas = deltas;
                let answer = if self.settings.agent.stream_tokens {
                    self.peers
                        .complete_streamed(asking, &messages, offered, &deltas)
                        .await
                } else {
                    self.peers.complete(asking, &messages, offered).await
                };
                ::metrics::histogram!(metrics::MODEL_CALL_SECONDS)
                    .record(asked.elapsed().as_secs_f64());
                answer
            };
            let remember_prompt = async {
                if unremembered > 0 {
                    self.remember(task, &messages[..unremembered], "prompt", 1)
                        .await;
                }
            };
            let (answer, (), ()) = tokio::join!(
                call_model,
                remember_prompt,
                self.forward_tokens(task, call, written)
            );
            unremembered = 0;
            let completion = match answer {
                Ok(completion) => completion,
                Err(error) => {
                    tracing::warn!(%error, class = %error.class(), call, "model call failed");
                    let message = if call == 1 {
                        error.to_string()
                    } else {
                        format!("{error} (model call {call} of the agent loop)")
                    };
                    return LoopEnd::Ended(Some(TaskOutcome::Failed {
                        class: error.class(),
                        message,
                        usage,
                    }));
                }
            };
            usage = usage.plus(completion.usage);
            let reply =
                ChatMessage::assistant(completion.content.clone(), completion.tool_calls.clone());
            self.remember(task, std::slice::from_ref(&reply), "reply", next_step)
                .await;
            next_step += 1;
            messages.push(reply);
            if completion.tool_calls.is_empty() {
                ::metrics::histogram!(metrics::AGENT_STEPS).record(f64::from(call));
                return LoopEnd::Answered {
                    state: Checkpoint {
                        model_calls: call,
                        messages,
                        usage,
                    },
                    output: completion.content,
                    deployment: completion.deployment,
                    tier: asking.tier.clone(),
                };
            }
            let mut results = Vec::with_capacity(completion.tool_calls.len());
            for tool_call in &completion.tool_calls {
                match toolbox.call(tool_call).await {
                    ToolOutcome::Answer { content, failed } => {
                        if failed {
                            tracing::info!(tool = %tool_call.name, %content, "tool call failed; the model is told");
                        }
                        results.push(ChatMessage::tool_result(tool_call.id.clone(), content));
                    }
                    ToolOutcome::Parked { children } => {
                        self.remember(task, &results, "tool", next_step).await;
                        ::metrics::histogram!(metrics::AGENT_STEPS).record(f64::from(call));
                        tracing::info!(
                            children,
                            "spawned child tasks and parked until they finish; not reporting"
                        );
                        return LoopEnd::Ended(None);
                    }
                }
            }
            self.remember(task, &results, "tool", next_step).await;
            next_step += step_number(results.len());
            messages.extend(results);
            self.checkpoint(task, call, &messages, usage).await;
        }
        ::metrics::histogram!(metrics::AGENT_STEPS)
            .record(f64::from(self.settings.agent.max_steps));
        ::metrics::counter!(metrics::AGENT_STOPPED, "reason" => "max_steps").increment(1);
        let last_tools: Vec<&str> = messages
            .iter()
            .rev()
            .find(|message| !message.tool_calls.is_empty())
            .map(|message| {
                message
                    .tool_calls
                    .iter()
                    .map(|call| call.name.as_str())
                    .collect()
            })
            .unwrap_or_default();
        LoopEnd::Ended(Some(TaskOutcome::Failed {
            class: ErrorClass::UserFixable,
            message: format!(
                "the agent made {} model calls (agent.max_steps) without a final answer; it was \
                 still calling tools ({})",
                self.settings.agent.max_steps,
                last_tools.join(", ")
            ),
            usage,
        }))
    }

    /// Publishes what the model writes in model call `call` as it arrives, joining the deltas
    /// that arrive while the previous chunk is published, then the call's end. A failed
    /// publish is counted and skipped: watchers miss text, the task goes on.
    async fn forward_tokens(
        &self,
        task: &TaskSpec,
        call: u32,
        mut written: mpsc::UnboundedReceiver<String>,
    ) {
        let mut seq = 0;
        let mut streamed = false;
        while let Some(mut text) = written.recv().await {
            while let Ok(more) = written.try_recv() {
                text.push_str(&more);
            }
            streamed = true;
            self.publish_tokens(task, call, &mut seq, text, false).await;
        }
        if streamed {
            self.publish_tokens(task, call, &mut seq, String::new(), true)
                .await;
        }
    }

    async fn publish_tokens(
        &self,
        task: &TaskSpec,
        call: u32,
        seq: &mut u32,
        text: String,
        done: bool,
    ) {
        let chunk = TokenChunk {
            model_call: call,
            seq: *seq,
            text,
            done,
        };
        *seq += 1;
        let result = match self.reporter.tokens(task, &chunk).await {
            Ok(()) => "published",
            Err(error) => {
                tracing::debug!(%error, "streamed tokens not published");
                "error"
            }
        };
        ::metrics::counter!(metrics::TOKEN_CHUNKS, "result" => result).increment(1);
    }

    /// Makes `messages` fit the share `agent.context_fill` of the model's context window
    /// before a call: moves the task to its escalation tier when the conversation fits there
    /// (once per attempt), otherwise replaces its older turns by memory's summaries of them
    /// (the system prompt, the instructions and the most recent turns stay as they are).
    /// Returns the summary message when it compressed; an error when it cannot fit.
    async fn fit_context(
        &self,
        task: &TaskSpec,
        escalated: &mut Option<TaskSpec>,
        messages: &mut Vec<ChatMessage>,
    ) -> Result<Option<ChatMessage>, (ErrorClass, String)> {
        let fill = self.settings.agent.context_fill;
        let window = escalated.as_ref().unwrap_or(task).context_window;
        if !overflows(messages, window, fill) {
            return Ok(None);
        }
        let limit = fill_limit(window, fill);
        let needed = estimate_tokens(messages);
        if escalated.is_none()
            && let Some(larger) = &task.escalation
            && needed <= fill_limit(larger.context_window, fill)
        {
            ::metrics::counter!(metrics::CONTEXT_OVERFLOWS, "action" => "escalated").increment(1);
            tracing::info!(
                needed,
                limit,
                tier = %larger.tier,
                "the conversation outgrew the context window; escalating to a larger tier"
            );
            *escalated = Some(TaskSpec {
                tier: larger.tier.clone(),
                context_window: larger.context_window,
                escalation: None,
                checkpoint: None,
                ..task.clone()
            });
            return Ok(None);
        }
        let failed = |message: String| {
            ::metrics::counter!(metrics::CONTEXT_OVERFLOWS, "action" => "failed").increment(1);
            (ErrorClass::UserFixable, message)
        };
        let Some(plan) = plan_compression(messages, &task.instructions, limit / 2) else {
            return Err(failed(format!(
                "the conversation needs about {needed} tokens, more than {limit} \
                 (agent.context_fill of the {window}-token context window), and has no older \
                 turns left to compress"
            )));
        };
        let older: Vec<ChatMessage> = plan.older.iter().map(|&i| messages[i].clone()).collect();
        let summaries = match self.peers.compress(task, &older).await {
            Ok(summaries) if !summaries.is_empty() => summaries,
            Ok(_) => {
                return Err(failed(
                    "compressing the conversation through memory returned no summary".into(),
                ));
            }
            Err(error) => {
                tracing::warn!(%error, "compressing the conversation through memory failed");
                ::metrics::counter!(metrics::CONTEXT_OVERFLOWS, "action" => "failed").increment(1);
                return Err((
                    error.class(),
                    format!("compressing the conversation through memory failed: {error}"),
                ));
            }
        };
        let summary = ChatMessage::new(
            "user",
            format!(
                "{COMPRESSED_HEADING} ({} messages):\n{}",
                older.len(),
                summaries.join("\n\n")
            ),
        );
        let mut compressed = Vec::with_capacity(messages.len() - older.len() + 1);
        compressed.extend(
            messages
                .drain(..plan.tail_start)
                .enumerate()
                .filter_map(|(i, message)| (!plan.older.contains(&i)).then_some(message)),
        );
        compressed.push(summary.clone());
        compressed.append(messages);
        *messages = compressed;
        let after = estimate_tokens(messages);
        if after > limit {
            return Err(failed(format!(
                "the conversation still needs about {after} tokens after compressing {} older \
                 messages, more than {limit} (agent.context_fill of the {window}-token context \
                 window)",
                older.len()
            )));
        }
        ::metrics::counter!(metrics::CONTEXT_OVERFLOWS, "action" => "compressed").increment(1);
        tracing::info!(
            needed,
            after,
            limit,
            compressed = older.len(),
            "the conversation outgrew the context window; older turns compressed through memory"
        );
        Ok(Some(summary))
    }

    /// Saves where the loop is after model call `call` and its tools. A failure is logged and
    /// counted: the attempt goes on, and a later one resumes from an older checkpoint.
    async fn checkpoint(&self, task: &TaskSpec, call: u32, messages: &[ChatMessage], usage: Usage) {
        let checkpoint = Checkpoint {
            model_calls: call,
            messages: messages.to_vec(),
            usage,
        };
        let result = match self
            .peers
            .save_checkpoint(task, &self.worker_id, &checkpoint)
            .await
        {
            Ok(None) => "saved",
            Ok(Some(reason)) => {
                tracing::info!(%reason, "checkpoint refused; the lease check will stop the task");
                "refused"
            }
            Err(error) => {
                tracing::warn!(%error, "checkpoint not saved; continuing");
                "error"
            }
        };
        ::metrics::counter!(metrics::CHECKPOINTS, "result" => result).increment(1);
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
        // Neither waits for the other: both are on the task's critical path.
        let (appended, published) = tokio::join!(
            self.peers.append(task, messages),
            self.reporter.steps(task, first_step, messages)
        );
        if let Err(error) = appended {
            ::metrics::counter!(metrics::MEMORY_FAILURES, "step" => step).increment(1);
            tracing::warn!(%error, step, "memory append failed; continuing without it");
        }
        if let Err(error) = published {
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

/// First words of the message that brings retrieved memories and strategies into a prompt.
pub const RECALLED_HEADING: &str = "What Colony remembers that may help with this task";

/// First words of the message that stands for compressed turns.
pub const COMPRESSED_HEADING: &str =
    "Summary of the earlier conversation, compressed to fit the model's context window";

/// Tokens of `messages` as memory estimates them: one per four characters of content and tool
/// calls, at least one per message.
fn estimate_tokens(messages: &[ChatMessage]) -> u64 {
    messages
        .iter()
        .map(|message| {
            let chars = message.content.chars().count()
                + message
                    .tool_calls
                    .iter()
                    .map(|call| call.name.len() + call.arguments.chars().count())
                    .sum::<usize>();
            u64::try_from(chars.div_ceil(4).max(1)).unwrap_or(u64::MAX)
        })
        .fold(0, u64::saturating_add)
}

/// What a lookup for the prompt found; nothing when it failed (logged and counted: the prompt
/// goes without it).
fn recalled<T>(found: Result<Vec<T>, Error>, what: &str) -> Vec<T> {
    found.unwrap_or_else(|error| {
        ::metrics::counter!(metrics::MEMORY_FAILURES, "step" => "recall").increment(1);
        tracing::warn!(%error, what, "retrieving for the prompt failed; going on without");
        Vec::new()
    })
}

/// Why a model call with `messages` could pass the task's token budget, given `used` so far:
/// the prompt as estimated plus the most the answer may take (`max_tokens`). `None` when it
/// fits, or when the task has no token budget.
fn over_token_budget(task: &TaskSpec, used: Usage, messages: &[ChatMessage]) -> Option<String> {
    if task.task_token_budget == 0 {
        return None;
    }
    let spent = used.prompt_tokens.saturating_add(used.completion_tokens);
    let prompt = estimate_tokens(messages);
    let worst = spent
        .saturating_add(prompt)
        .saturating_add(u64::from(task.max_tokens));
    (worst > task.task_token_budget).then(|| {
        format!(
            "the next model call could pass the task's token budget of {} \
             (task_token_budget): {spent} tokens used so far, about {prompt} in its prompt and \
             up to {} in its answer",
            task.task_token_budget, task.max_tokens
        )
    })
}

/// The tokens a conversation may take of a `window`-token context; 0 when the window is
/// unknown (no limit).
fn fill_limit(window: u64, fill: f64) -> u64 {
    // Context windows are far below 2^52: the conversion is exact.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a product of a token count and a share in (0, 1]"
    )]
    let limit = (window as f64 * fill) as u64;
    limit
}

/// Whether `messages` take more than the share `fill` of a `window`-token context (never
/// when the window is unknown).
fn overflows(messages: &[ChatMessage], window: u64, fill: f64) -> bool {
    let limit = fill_limit(window, fill);
    limit > 0 && estimate_tokens(messages) > limit
}

/// Which messages a compression replaces.
#[derive(Debug, PartialEq, Eq)]
struct CompressionPlan {
    /// Indexes of the messages to summarise, in order: everything before `tail_start` but the
    /// leading system messages and the task's instructions.
    older: Vec<usize>,
    /// The first of the recent messages kept as they are.
    tail_start: usize,
}

/// Keeps the most recent messages within `tail_tokens` (never starting at a tool result, whose
/// call would be summarised away); `None` when nothing older is left to summarise.
fn plan_compression(
    messages: &[ChatMessage],
    instructions: &str,
    tail_tokens: u64,
) -> Option<CompressionPlan> {
    let head = messages
        .iter()
        .take_while(|message| message.role == "system")
        .count();
    let mut tail_start = messages.len();
    let mut tokens = 0;
    while tail_start > head {
        let next = estimate_tokens(&messages[tail_start - 1..tail_start]);
        if tokens + next > tail_tokens {
            break;
        }
        tokens += next;
        tail_start -= 1;
    }
    while tail_start < messages.len() && messages[tail_start].role == "tool" {
        tail_start += 1;
    }
    let older: Vec<usize> = (head..tail_start)
        .filter(|&i| !(messages[i].role == "user" && messages[i].content == instructions))
        .collect();
    (!older.is_empty()).then_some(CompressionPlan { older, tail_start })
}

/// A count of messages as a trajectory step number (saturating; attempts are far shorter).
fn step_number(count: usize) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX / 2)
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
    use crate::task::{Completion, ErrorClass, Escalation, Usage};

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

    /// Grants every claim; heartbeats answer from a script; the router answers after `delay`
    /// from `script` first, then with `router`.
    struct FakePeers {
        lease_lost_after: Option<usize>,
        heartbeats: AtomicUsize,
        router_delay: Duration,
        router: Result<Completion, ErrorClass>,
        script: Mutex<std::collections::VecDeque<Result<Completion, ErrorClass>>>,
        /// What each model call was sent: the messages and the names of the tools offered.
        calls: Mutex<Vec<(Vec<ChatMessage>, Vec<&'static str>)>>,
        appends: Mutex<Vec<Vec<ChatMessage>>>,
        /// Memory searches: the queries.
        searches: Mutex<Vec<String>>,
        spawned: Mutex<Vec<Vec<ChildTask>>>,
        checkpoints: Mutex<Vec<Checkpoint>>,
        noop: bool,
        tools: Vec<String>,
        /// Handed to the claimed task, as an earlier attempt's.
        resume_from: Option<Checkpoint>,
        validation: Option<Validation>,
        /// The claimed task's context window and escalation.
        context_window: u64,
        escalation: Option<Escalation>,
        /// The tier each model call asked for.
        tiers: Mutex<Vec<String>>,
        /// What each compression was given.
        compressions: Mutex<Vec<Vec<ChatMessage>>>,
        /// Strategy outcomes recorded: the strategy and whether it helped.
        outcomes: Mutex<Vec<(i64, bool)>>,
        /// Leases given back.
        released: AtomicUsize,
        /// The claimed task's token budget.
        token_budget: u64,
    }

    impl FakePeers {
        fn new(router: Result<Completion, ErrorClass>) -> Self {
            Self {
                lease_lost_after: None,
                heartbeats: AtomicUsize::new(0),
                router_delay: Duration::ZERO,
                router,
                script: Mutex::default(),
                calls: Mutex::default(),
                appends: Mutex::new(Vec::new()),
                searches: Mutex::default(),
                spawned: Mutex::default(),
                checkpoints: Mutex::default(),
                noop: false,
                tools: Vec::new(),
                resume_from: None,
                validation: None,
                context_window: 0,
                escalation: None,
                tiers: Mutex::default(),
                compressions: Mutex::default(),
                outcomes: Mutex::default(),
                released: AtomicUsize::new(0),
                token_budget: 0,
            }
        }

        fn scripted(script: Vec<Result<Completion, ErrorClass>>, tools: &[&str]) -> Self {
            Self {
                script: Mutex::new(script.into()),
                tools: tools.iter().map(|tool| (*tool).to_owned()).collect(),
                ..Self::new(Err(ErrorClass::Permanent))
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
            tools: Vec::new(),
            task_budget_micros_usd: 0,
            run_budget_micros_usd: 0,
            checkpoint: None,
            validation: None,
            context_window: 0,
            escalation: None,
            task_token_budget: 0,
        }
    }

    impl Peers for FakePeers {
        async fn claim(&self, _: &Dispatch, _: &str) -> Result<Claim, Error> {
            Ok(Claim::Granted {
                task: Box::new(TaskSpec {
                    noop: self.noop,
                    tools: self.tools.clone(),
                    checkpoint: self.resume_from.clone(),
                    validation: self.validation.clone(),
                    context_window: self.context_window,
                    escalation: self.escalation.clone(),
                    task_token_budget: self.token_budget,
                    ..spec()
                }),
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

        async fn compress(
            &self,
            _: &TaskSpec,
            messages: &[ChatMessage],
        ) -> Result<Vec<String>, Error> {
            self.compressions.lock().unwrap().push(messages.to_vec());
            Ok(vec![format!("{} messages, briefly", messages.len())])
        }

        async fn complete(
            &self,
            task: &TaskSpec,
            messages: &[ChatMessage],
            tools: &[ToolSpec],
        ) -> Result<Completion, Error> {
            self.tiers.lock().unwrap().push(task.tier.clone());
            self.calls.lock().unwrap().push((
                messages.to_vec(),
                tools.iter().map(|tool| tool.name).collect(),
            ));
            tokio::time::sleep(self.router_delay).await;
            let next = self.script.lock().unwrap().pop_front();
            next.unwrap_or_else(|| self.router.clone())
                .map_err(|class| Error::Call {
                    peer: Peer::Router,
                    class,
                    message: "provider says slow down".into(),
                })
        }

        async fn complete_streamed(
            &self,
            task: &TaskSpec,
            messages: &[ChatMessage],
            tools: &[ToolSpec],
            deltas: &mpsc::UnboundedSender<String>,
        ) -> Result<Completion, Error> {
            let completion = self.complete(task, messages, tools).await?;
            for word in completion.content.split_inclusive(' ') {
                deltas.send(word.to_owned()).unwrap();
            }
            Ok(completion)
        }

        async fn release(&self, _: &TaskSpec, _: &str) -> Result<bool, Error> {
            self.released.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        }

        async fn save_checkpoint(
            &self,
            _: &TaskSpec,
            _: &str,
            checkpoint: &Checkpoint,
        ) -> Result<Option<String>, Error> {
            self.checkpoints.lock().unwrap().push(checkpoint.clone());
            Ok(None)
        }

        async fn search_memories(
            &self,
            _: &TaskSpec,
            query: &str,
            _: u32,
        ) -> Result<Vec<FoundMemory>, Error> {
            self.searches.lock().unwrap().push(query.to_owned());
            Ok(vec![FoundMemory {
                id: 7,
                text: "staging needs the VPN".into(),
                score: 0.9,
            }])
        }

        async fn write_memory(
            &self,
            _: &TaskSpec,
            _: MemoryScope,
            _: &str,
            _: Option<f32>,
        ) -> Result<WrittenMemory, Error> {
            Ok(WrittenMemory {
                id: 8,
                merged: false,
            })
        }

        async fn suggest_strategies(
            &self,
            _: &TaskSpec,
            _: &str,
            _: u32,
        ) -> Result<Vec<Strategy>, Error> {
            Ok(vec![Strategy {
                id: 41,
                title: "ask for the VPN first".into(),
                when_to_use: "staging access".into(),
                strategy: "check the VPN before anything else".into(),
                wins: 3,
                losses: 1,
            }])
        }

        async fn record_strategy_outcome(
            &self,
            _: &TaskSpec,
            strategy_id: i64,
            success: bool,
        ) -> Result<(), Error> {
            self.outcomes.lock().unwrap().push((strategy_id, success));
            Ok(())
        }

        async fn spawn(
            &self,
            _: &TaskSpec,
            _: &str,
            children: &[ChildTask],
            wait: bool,
        ) -> Result<Spawned, Error> {
            self.spawned.lock().unwrap().push(children.to_vec());
            Ok(Spawned {
                children: children
                    .iter()
                    .map(|child| (child.key.clone(), format!("task-{}", child.key)))
                    .collect(),
                parked: wait,
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
        tokens: Mutex<Vec<TokenChunk>>,
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

        async fn tokens(&self, _: &TaskSpec, chunk: &TokenChunk) -> Result<(), Error> {
            self.tokens.lock().unwrap().push(chunk.clone());
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

    /// A worker whose prompts hold no retrieved memories or strategies (see
    /// [`recalling_worker`]).
    fn worker(peers: FakePeers, reporter: FakeReporter) -> Worker<FakePeers, FakeReporter> {
        worker_with(
            peers,
            reporter,
            AgentConfig {
                max_steps: 4,
                prompt_memories: 0,
                prompt_strategies: 0,
                ..AgentConfig::default()
            },
        )
    }

    fn recalling_worker(peers: FakePeers) -> Worker<FakePeers, FakeReporter> {
        worker_with(
            peers,
            FakeReporter::default(),
            AgentConfig {
                max_steps: 4,
                ..AgentConfig::default()
            },
        )
    }

    fn worker_with(
        peers: FakePeers,
        reporter: FakeReporter,
        agent: AgentConfig,
    ) -> Worker<FakePeers, FakeReporter> {
        Worker::new(
            peers,
            reporter,
            "w1".into(),
            Settings {
                ack_wait: Duration::from_secs(30),
                agent,
                sandbox: SandboxConfig {
                    root: std::env::temp_dir()
                        .join(format!("colony-worker-unit-{}", std::process::id())),
                    ..SandboxConfig::default()
                },
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
            tool_calls: Vec::new(),
        }
    }

    /// A model turn that calls `name` with `arguments`.
    fn calls_tool(id: &str, name: &str, arguments: &str) -> Result<Completion, ErrorClass> {
        Ok(Completion {
            content: String::new(),
            tool_calls: vec![crate::task::ToolCall {
                id: id.into(),
                name: name.into(),
                arguments: arguments.into(),
            }],
            ..completion()
        })
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

    /// Handles the test dispatch on a task of its own.
    fn handle_in_background(
        worker: &Arc<Worker<FakePeers, FakeReporter>>,
    ) -> tokio::task::JoinHandle<Disposition> {
        let worker = worker.clone();
        tokio_util::task::TaskTracker::new().spawn(async move {
            let progress = CountProgress::default();
            worker.handle("generalist", dispatch(), &progress).await
        })
    }

    #[tokio::test(start_paused = true)]
    async fn abandonment_stops_report_retries() {
        let reporter = FakeReporter {
            failures: AtomicUsize::new(usize::MAX),
            ..FakeReporter::default()
        };
        let worker = Arc::new(worker(FakePeers::new(Ok(completion())), reporter));
        let abandon = worker.abandon.clone();
        let running = handle_in_background(&worker);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(worker.reporter.attempts.load(Ordering::SeqCst) > 3);
        abandon.cancel();
        assert_eq!(running.await.unwrap(), Disposition::Done);
        assert!(worker.reporter.published.lock().unwrap().is_empty());
        assert_eq!(
            worker.peers.released.load(Ordering::SeqCst),
            1,
            "lease given back"
        );
    }

    fn published_outcome(worker: &Worker<FakePeers, FakeReporter>) -> TaskOutcome {
        let published = worker.reporter.published.lock().unwrap();
        assert_eq!(published.len(), 1, "one report");
        published[0].outcome.clone()
    }

    #[tokio::test(start_paused = true)]
    async fn tool_results_go_back_to_the_model_until_it_answers() {
        let peers = FakePeers::scripted(
            vec![
                calls_tool("c1", tools::MEMORY_SEARCH, r#"{"query": "staging access"}"#),
                // A tool the role may not use, and arguments that are not JSON: both answered
                // with an error the model reads, not a failed task.
                calls_tool("c2", "rm_rf", "{}"),
                calls_tool("c3", tools::MEMORY_WRITE, "not json"),
                Ok(Completion {
                    content: "use the VPN".into(),
                    ..completion()
                }),
            ],
            &[tools::MEMORY_SEARCH, tools::MEMORY_WRITE],
        );
        let worker = worker(peers, FakeReporter::default());
        let progress = CountProgress::default();
        worker.handle("generalist", dispatch(), &progress).await;

        let TaskOutcome::Succeeded { output, usage, .. } = published_outcome(&worker) else {
            panic!("the task succeeds");
        };
        assert_eq!(output, "use the VPN");
        // Four model calls' usage, summed.
        assert_eq!(usage.prompt_tokens, 28);
        assert_eq!(usage.cost_micros_usd, 12);
        assert_eq!(*worker.peers.searches.lock().unwrap(), ["staging access"]);

        let calls = worker.peers.calls.lock().unwrap();
        assert_eq!(calls.len(), 4);
        assert_eq!(calls[0].1, [tools::MEMORY_SEARCH, tools::MEMORY_WRITE]);
        let last = &calls[3].0;
        // system, user, then (assistant, tool) three times.
        assert_eq!(last.len(), 8);
        assert_eq!(last[2].tool_calls[0].name, tools::MEMORY_SEARCH);
        assert_eq!(last[3].role, "tool");
        assert_eq!(last[3].tool_call_id, "c1");
        assert!(
            last[3].content.contains("staging needs the VPN"),
            "{}",
            last[3].content
        );
        assert!(
            last[5].content.starts_with("error: tool \"rm_rf\" is not available to role \"generalist\"; available: memory_search, memory_write"),
            "{}",
            last[5].content
        );
        assert!(
            last[7]
                .content
                .starts_with("error: the arguments of memory_write do not match its schema"),
            "{}",
            last[7].content
        );
        // Trajectory: prompt 1-2, then one step per message after it.
        assert_eq!(
            *worker.reporter.steps.lock().unwrap(),
            [
                (1, 2),
                (3, 3),
                (4, 4),
                (5, 5),
                (6, 6),
                (7, 7),
                (8, 8),
                (9, 9)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_never_answers_stops_at_max_steps() {
        let script = (0..10)
            .map(|n| {
                calls_tool(
                    &format!("c{n}"),
                    tools::MEMORY_SEARCH,
                    r#"{"query": "more"}"#,
                )
            })
            .collect();
        let worker = worker(
            FakePeers::scripted(script, &[tools::MEMORY_SEARCH]),
            FakeReporter::default(),
        );
        let progress = CountProgress::default();
        worker.handle("generalist", dispatch(), &progress).await;
        let TaskOutcome::Failed {
            class,
            message,
            usage,
        } = published_outcome(&worker)
        else {
            panic!("the task fails");
        };
        assert_eq!(class, ErrorClass::UserFixable);
        assert_eq!(
            message,
            "the agent made 4 model calls (agent.max_steps) without a final answer; it was \
             still calling tools (memory_search)"
        );
        assert_eq!(usage.prompt_tokens, 28);
        assert_eq!(worker.peers.calls.lock().unwrap().len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_model_call_mid_loop_keeps_the_usage_so_far() {
        let peers = FakePeers::scripted(
            vec![
                calls_tool("c1", tools::MEMORY_SEARCH, r#"{"query": "x"}"#),
                Err(ErrorClass::UserFixable),
            ],
            &[tools::MEMORY_SEARCH],
        );
        let worker = worker(peers, FakeReporter::default());
        let progress = CountProgress::default();
        worker.handle("generalist", dispatch(), &progress).await;
        assert_eq!(
            published_outcome(&worker),
            TaskOutcome::Failed {
                class: ErrorClass::UserFixable,
                message: "router: provider says slow down (model call 2 of the agent loop)".into(),
                usage: completion().usage,
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn spawning_children_to_wait_for_parks_without_a_report() {
        let peers = FakePeers::scripted(
            vec![calls_tool(
                "c1",
                tools::SPAWN_TASKS,
                r#"{"children": [{"key": "a", "role": "researcher", "instructions": "look"}]}"#,
            )],
            &[tools::SPAWN_TASKS],
        );
        let worker = worker(peers, FakeReporter::default());
        let progress = CountProgress::default();
        assert_eq!(
            worker.handle("generalist", dispatch(), &progress).await,
            Disposition::Done
        );
        assert!(worker.reporter.published.lock().unwrap().is_empty());
        let spawned = worker.peers.spawned.lock().unwrap();
        assert_eq!(spawned.len(), 1);
        assert_eq!(spawned[0][0].role, "researcher");
        assert_eq!(worker.slots.busy(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_run_stops_its_tasks_at_once_without_a_report() {
        let mut peers = FakePeers::new(Ok(completion()));
        peers.router_delay = Duration::from_secs(600);
        let worker = Arc::new(worker(peers, FakeReporter::default()));
        let running = handle_in_background(&worker);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(worker.cancel_run("acme", "other-run"), 0);
        assert_eq!(worker.cancel_run("acme", "r1"), 1);
        let started = tokio::time::Instant::now();
        assert_eq!(running.await.unwrap(), Disposition::Done);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(worker.reporter.published.lock().unwrap().is_empty());
        assert_eq!(worker.slots.busy(), 0);
        // Unregistered once it stopped.
        assert_eq!(worker.cancel_run("acme", "r1"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn each_tool_round_is_checkpointed_and_a_later_attempt_resumes_from_it() {
        let search = || calls_tool("c1", tools::MEMORY_SEARCH, r#"{"query": "vpn"}"#);
        let first = FakePeers::scripted(
            vec![search(), search(), Err(ErrorClass::Transient)],
            &[tools::MEMORY_SEARCH],
        );
        let worker1 = worker(first, FakeReporter::default());
        let progress = CountProgress::default();
        worker1.handle("generalist", dispatch(), &progress).await;
        // Two tool rounds, two checkpoints; the third model call failed the attempt.
        let saved = worker1.peers.checkpoints.lock().unwrap().clone();
        assert_eq!(saved.len(), 2);
        let last = saved[1].clone();
        assert_eq!(last.model_calls, 2);
        // system, user, (assistant, tool) twice.
        assert_eq!(last.messages.len(), 6);
        assert_eq!(last.usage.prompt_tokens, 14);

        // The next attempt starts from there: no prompt again, the conversation as saved,
        // and the calls already made count against max_steps (4).
        let mut second = FakePeers::scripted(
            vec![
                search(),
                Ok(Completion {
                    content: "resumed".into(),
                    ..completion()
                }),
            ],
            &[tools::MEMORY_SEARCH],
        );
        second.resume_from = Some(last.clone());
        let worker2 = worker(second, FakeReporter::default());
        worker2.handle("generalist", dispatch(), &progress).await;
        let TaskOutcome::Succeeded { output, usage, .. } = published_outcome(&worker2) else {
            panic!("the resumed attempt succeeds");
        };
        assert_eq!(output, "resumed");
        // Four model calls in all, two of them in this attempt.
        assert_eq!(usage.prompt_tokens, 28);
        let calls = worker2.peers.calls.lock().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].0, last.messages);
        // Nothing of the prompt was appended to memory again.
        let appends = worker2.peers.appends.lock().unwrap();
        assert!(appends.iter().all(|messages| {
            messages
                .iter()
                .all(|message| message.role == "assistant" || message.role == "tool")
        }));
    }

    fn searches(rounds: usize, answer: &str) -> Vec<Result<Completion, ErrorClass>> {
        let mut script: Vec<_> = (0..rounds)
            .map(|i| {
                calls_tool(
                    &format!("c{i}"),
                    tools::MEMORY_SEARCH,
                    r#"{"query": "staging access"}"#,
                )
            })
            .collect();
        script.push(says(answer));
        script
    }

    #[test]
    fn compression_keeps_the_prompt_and_recent_turns_and_never_starts_at_a_tool_result() {
        let call = |id: &str| {
            ChatMessage::assistant(
                String::new(),
                vec![crate::task::ToolCall {
                    id: id.into(),
                    name: "read_file".into(),
                    arguments: r#"{"path": "notes.txt"}"#.into(),
                }],
            )
        };
        let messages = vec![
            ChatMessage::new("system", "be brief"),
            ChatMessage::new("user", "dependency output ".repeat(20)),
            ChatMessage::new("user", "say hi"),
            call("a"),
            ChatMessage::tool_result("a", "x".repeat(80)),
            call("b"),
            ChatMessage::tool_result("b", "y".repeat(40)),
        ];
        // The last result (10 tokens) fits 12 tokens, its call (9) does not: the result alone
        // would be an orphan, so neither is kept.
        let plan = plan_compression(&messages, "say hi", 12).unwrap();
        assert_eq!(
            plan,
            CompressionPlan {
                older: vec![1, 3, 4, 5, 6],
                tail_start: 7
            }
        );
        let plan = plan_compression(&messages, "say hi", 19).unwrap();
        assert_eq!(
            plan,
            CompressionPlan {
                older: vec![1, 3, 4],
                tail_start: 5
            }
        );
        // Only the system prompt and the instructions: nothing to compress.
        assert_eq!(plan_compression(&messages[..1], "say hi", 0), None);
        assert_eq!(
            plan_compression(&[messages[0].clone(), messages[2].clone()], "say hi", 0),
            None
        );
        assert!(
            !overflows(&messages, 0, 0.75),
            "an unknown window never overflows"
        );
        assert!(overflows(&messages, 100, 0.75));
        assert!(!overflows(&messages, 1000, 0.75));
    }

    #[tokio::test]
    async fn a_conversation_outgrowing_the_window_has_its_older_turns_compressed_through_memory() {
        let mut peers = FakePeers::scripted(searches(3, "use the VPN"), &[tools::MEMORY_SEARCH]);
        peers.context_window = 80;
        let worker = worker(peers, FakeReporter::default());
        worker
            .handle("generalist", dispatch(), &CountProgress::default())
            .await;

        let TaskOutcome::Succeeded { output, .. } = published_outcome(&worker) else {
            panic!("the task succeeds");
        };
        assert_eq!(output, "use the VPN");
        let compressions = worker.peers.compressions.lock().unwrap();
        assert_eq!(compressions.len(), 1, "compressed once");
        // The first two tool rounds went to memory; neither the system prompt nor the
        // instructions did.
        assert_eq!(compressions[0].len(), 4);
        assert!(
            compressions[0]
                .iter()
                .all(|m| m.role != "system" && m.content != "say hi")
        );
        let calls = worker.peers.calls.lock().unwrap();
        let limit = fill_limit(80, 0.75);
        for (messages, _) in calls.iter() {
            assert!(estimate_tokens(messages) <= limit, "{messages:?}");
        }
        let last = &calls[3].0;
        assert_eq!(last[0].content, "be brief");
        assert_eq!(last[1].content, "say hi");
        assert!(
            last[2].content.starts_with(COMPRESSED_HEADING),
            "{}",
            last[2].content
        );
        assert!(
            last[2].content.ends_with("4 messages, briefly"),
            "{}",
            last[2].content
        );
        // The most recent round stays as it was: the call, then its result.
        assert_eq!(last[3].tool_calls[0].id, "c2");
        assert_eq!(last[4].tool_call_id, "c2");
        assert_eq!(last.len(), 5);
        // The summary is remembered as a step of its own.
        assert!(
            worker
                .peers
                .appends
                .lock()
                .unwrap()
                .iter()
                .any(|messages| messages[0].content.starts_with(COMPRESSED_HEADING))
        );
    }

    #[tokio::test]
    async fn the_loop_stops_before_a_call_that_could_pass_the_token_budget() {
        let mut peers = FakePeers::scripted(searches(3, "use the VPN"), &[tools::MEMORY_SEARCH]);
        peers.token_budget = 110;
        let worker = worker(peers, FakeReporter::default());
        worker
            .handle("generalist", dispatch(), &CountProgress::default())
            .await;

        let TaskOutcome::Failed {
            class,
            message,
            usage,
        } = published_outcome(&worker)
        else {
            panic!("the task fails");
        };
        assert_eq!(class, ErrorClass::UserFixable);
        assert!(
            message.starts_with(
                "the next model call could pass the task's token budget of 110 \
                 (task_token_budget): 16 tokens used so far"
            ),
            "{message}"
        );
        // Two calls were made and paid for; the third was not.
        assert_eq!(worker.peers.calls.lock().unwrap().len(), 2);
        assert_eq!(usage.prompt_tokens + usage.completion_tokens, 16);
    }

    #[tokio::test]
    async fn a_role_with_a_larger_tier_escalates_instead_of_compressing() {
        let mut peers = FakePeers::scripted(searches(3, "use the VPN"), &[tools::MEMORY_SEARCH]);
        peers.context_window = 80;
        peers.escalation = Some(Escalation {
            tier: "frontier".into(),
            context_window: 1000,
        });
        let worker = worker(peers, FakeReporter::default());
        worker
            .handle("generalist", dispatch(), &CountProgress::default())
            .await;

        assert!(matches!(
            published_outcome(&worker),
            TaskOutcome::Succeeded { .. }
        ));
        assert!(worker.peers.compressions.lock().unwrap().is_empty());
        assert_eq!(
            *worker.peers.tiers.lock().unwrap(),
            ["budget", "budget", "budget", "frontier"]
        );
    }

    #[tokio::test]
    async fn a_conversation_that_cannot_fit_fails_with_the_numbers() {
        let mut peers = FakePeers::scripted(searches(3, "use the VPN"), &[tools::MEMORY_SEARCH]);
        peers.context_window = 10;
        let worker = worker(peers, FakeReporter::default());
        worker
            .handle("generalist", dispatch(), &CountProgress::default())
            .await;

        let TaskOutcome::Failed { class, message, .. } = published_outcome(&worker) else {
            panic!("the task fails");
        };
        assert_eq!(class, ErrorClass::UserFixable);
        assert!(
            message.starts_with("the conversation still needs about ")
                && message.contains("(agent.context_fill of the 10-token context window)"),
            "{message}"
        );
        assert_eq!(worker.peers.calls.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_answer_is_streamed_to_watchers_as_it_is_written() {
        let peers = FakePeers::scripted(
            vec![
                calls_tool("c1", tools::MEMORY_SEARCH, r#"{"query": "vpn"}"#),
                says("use the VPN now"),
            ],
            &[tools::MEMORY_SEARCH],
        );
        let worker = worker(peers, FakeReporter::default());
        worker
            .handle("generalist", dispatch(), &CountProgress::default())
            .await;

        assert!(matches!(
            published_outcome(&worker),
            TaskOutcome::Succeeded { .. }
        ));
        let tokens = worker.reporter.tokens.lock().unwrap();
        // The tool-calling first call wrote no text: nothing streamed for it.
        assert!(
            tokens.iter().all(|chunk| chunk.model_call == 2),
            "{tokens:?}"
        );
        let text: String = tokens.iter().map(|chunk| chunk.text.as_str()).collect();
        assert_eq!(text, "use the VPN now");
        assert!(
            tokens
                .iter()
                .enumerate()
                .all(|(i, chunk)| chunk.seq as usize == i)
        );
        let last = tokens.last().unwrap();
        assert!(last.done && last.text.is_empty());
        assert_eq!(tokens.iter().filter(|chunk| chunk.done).count(), 1);
    }

    #[tokio::test]
    async fn a_fresh_prompt_holds_what_memory_recalls_for_roles_that_may_search_it() {
        let peers = FakePeers::scripted(
            vec![says("use the VPN")],
            &[tools::MEMORY_SEARCH, tools::SUGGEST_STRATEGY],
        );
        let worker = recalling_worker(peers);
        worker
            .handle("generalist", dispatch(), &CountProgress::default())
            .await;
        assert!(matches!(
            published_outcome(&worker),
            TaskOutcome::Succeeded { .. }
        ));
        // Looked up by the instructions.
        assert_eq!(*worker.peers.searches.lock().unwrap(), ["say hi"]);
        let prompt = worker.peers.calls.lock().unwrap()[0].0.clone();
        assert_eq!(prompt.len(), 3);
        assert_eq!(prompt[1].role, "system");
        let recalled = &prompt[1].content;
        assert!(recalled.starts_with(RECALLED_HEADING), "{recalled}");
        assert!(
            recalled.contains("1. [id 7, score 0.90] staging needs the VPN"),
            "{recalled}"
        );
        assert!(
            recalled.contains("- ask for the VPN first (id 41, 3 wins, 1 losses)"),
            "{recalled}"
        );
        assert_eq!(prompt[2].content, "say hi");
        // The strategy it was given is scored only when a judge gives a verdict: none here.
        assert!(worker.peers.outcomes.lock().unwrap().is_empty());

        // A role without memory tools gets a plain prompt.
        let worker = recalling_worker(FakePeers::scripted(vec![says("hi")], &[]));
        worker
            .handle("generalist", dispatch(), &CountProgress::default())
            .await;
        assert!(worker.peers.searches.lock().unwrap().is_empty());
        assert_eq!(worker.peers.calls.lock().unwrap()[0].0.len(), 2);
    }

    fn says(content: &str) -> Result<Completion, ErrorClass> {
        Ok(Completion {
            content: content.into(),
            ..completion()
        })
    }

    fn reviewed(rounds: u32, fail_on_reject: bool) -> Option<Validation> {
        Some(Validation {
            judges: vec![crate::task::Judge {
                name: "reviewer".into(),
                prompt: "You review answers.".into(),
                tier: "frontier".into(),
            }],
            rubric: "Name the city.".into(),
            max_rounds: rounds,
            fail_on_reject,
        })
    }

    #[test]
    fn verdicts_are_read_from_the_first_line() {
        assert_eq!(rejection("ACCEPT"), None);
        assert_eq!(rejection("  accept - fine\nmore"), None);
        assert_eq!(
            rejection("REJECT: name the city"),
            Some("name the city".into())
        );
        assert_eq!(rejection("Reject\nit is vague"), Some("it is vague".into()));
        assert_eq!(rejection("REJECT"), Some("(no reason given)".into()));
        // Neither: not accepted.
        assert_eq!(
            rejection("looks good to me"),
            Some("looks good to me".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_answer_is_regenerated_with_the_critique_until_the_judge_accepts() {
        let mut peers = FakePeers::scripted(
            vec![
                calls_tool("s1", tools::SUGGEST_STRATEGY, r#"{"task": "capitals"}"#),
                says("somewhere in France"),
                says("REJECT: name the city"),
                says("Paris"),
                says("ACCEPT"),
            ],
            &[tools::SUGGEST_STRATEGY],
        );
        peers.validation = reviewed(2, true);
        let worker = worker(peers, FakeReporter::default());
        let progress = CountProgress::default();
        worker.handle("generalist", dispatch(), &progress).await;
        let TaskOutcome::Succeeded { output, usage, .. } = published_outcome(&worker) else {
            panic!("the task succeeds");
        };
        assert_eq!(output, "Paris");
        // A strategy call, two answers and two verdicts.
        assert_eq!(usage.prompt_tokens, 35);
        // Accepted after one regeneration: the verdict goes with the report, and the strategy
        // the agent was given counts as a win.
        assert_eq!(
            worker.reporter.published.lock().unwrap()[0].verdict,
            Some(Verdict {
                tier: "budget".into(),
                accepted: true,
                rejections: 1
            })
        );
        assert_eq!(*worker.peers.outcomes.lock().unwrap(), [(41, true)]);
        let calls = worker.peers.calls.lock().unwrap();
        assert_eq!(calls.len(), 5);
        // The judge saw the rubric and the answer, with no tools.
        assert!(calls[2].0[0].content.contains("Name the city."));
        assert!(
            calls[2].0[1]
                .content
                .ends_with("Answer:\nsomewhere in France")
        );
        assert!(calls[2].1.is_empty());
        // The regeneration saw its first answer and the critique.
        let regenerate = &calls[3].0;
        assert_eq!(regenerate[4].content, "somewhere in France");
        assert!(
            regenerate[5]
                .content
                .contains("(reviewer) rejected your answer:\nname the city"),
            "{}",
            regenerate[5].content
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_still_rejected_after_the_rounds_fails_or_passes_with_a_warning() {
        for fail_on_reject in [true, false] {
            let mut peers = FakePeers::scripted(
                vec![
                    says("France"),
                    says("REJECT: vague"),
                    says("Europe"),
                    says("REJECT: worse"),
                ],
                &[],
            );
            peers.validation = reviewed(1, fail_on_reject);
            let worker = worker(peers, FakeReporter::default());
            let progress = CountProgress::default();
            worker.handle("generalist", dispatch(), &progress).await;
            let outcome = published_outcome(&worker);
            assert_eq!(
                worker.reporter.published.lock().unwrap()[0].verdict,
                Some(Verdict {
                    tier: "budget".into(),
                    accepted: false,
                    rejections: 2
                })
            );
            if fail_on_reject {
                assert_eq!(
                    outcome,
                    TaskOutcome::Failed {
                        class: ErrorClass::UserFixable,
                        message: "judge reviewer still rejected the answer after 1 \
                                  regeneration(s): worse"
                            .into(),
                        usage: Usage {
                            prompt_tokens: 28,
                            completion_tokens: 4,
                            cost_micros_usd: 12,
                        },
                    }
                );
            } else {
                let TaskOutcome::Succeeded { output, .. } = outcome else {
                    panic!("accepted with a warning");
                };
                assert_eq!(output, "Europe");
            }
        }
    }
}
