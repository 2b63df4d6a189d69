//! Domain types of one task's life in a worker. The edges (`grpc`, `bus`) convert to and from
//! prost types; nothing here knows the wire.

use std::time::{Duration, SystemTime};

/// A dispatch hint as it came off the bus: which attempt of which task to claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub tenant: String,
    pub run_id: String,
    pub task_id: String,
    /// Fencing token: claims and reports for any other attempt are refused.
    pub attempt: u32,
    pub role: String,
    /// When the orchestrator dispatched it (its clock), if it said.
    pub dispatched_at: Option<SystemTime>,
}

/// One chat message, sent to memory and to the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// "system", "user", "assistant" or "tool".
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// What a granted claim hands the worker: everything needed to run the attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    pub tenant: String,
    pub run_id: String,
    pub task_id: String,
    pub attempt: u32,
    pub role: String,
    pub instructions: String,
    /// Model tier for the router; empty for its default.
    pub tier: String,
    pub max_tokens: u32,
    /// Messages that come before the instructions (system prompt, earlier results).
    pub context: Vec<ChatMessage>,
    /// A no-op task: reported as succeeded with its instructions as the output, with no model
    /// call and no memory.
    pub noop: bool,
}

/// The orchestrator's answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker owns the attempt for `lease` unless it heartbeats.
    Granted { task: TaskSpec, lease: Duration },
    /// Someone else owns it, it is stale or finished: the dispatch was only a hint.
    Refused { reason: String },
}

/// The orchestrator's answer to a lease heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// Still ours; `lease` is the new lease length when the orchestrator said.
    Held { lease: Option<Duration> },
    /// No longer ours (a newer attempt owns the task): stop and do not report.
    Lost { reason: String },
}

/// Tokens and cost of model calls; cost in millionths of a US dollar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micros_usd: u64,
}

/// A successful model call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub content: String,
    pub usage: Usage,
    /// The deployment that answered.
    pub deployment: String,
}

/// The five classes every failure is sorted into; each has its own retry policy (applied by
/// the orchestrator, not the worker).
pub use colony_proto::ErrorClass;

/// How an attempt ended, as far as the worker can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutcome {
    Succeeded {
        output: String,
        usage: Usage,
        deployment: String,
    },
    Failed {
        class: ErrorClass,
        /// Human-readable, for the run's owner: `router: <what went wrong>`.
        message: String,
        usage: Usage,
    },
}

impl TaskOutcome {
    /// `succeeded` or `failed`: the last token of the report subject and a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            TaskOutcome::Succeeded { .. } => "succeeded",
            TaskOutcome::Failed { .. } => "failed",
        }
    }
}

/// What the worker tells the orchestrator when an attempt ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub tenant: String,
    pub run_id: String,
    pub task_id: String,
    pub attempt: u32,
    pub worker_id: String,
    pub outcome: TaskOutcome,
    pub finished_at: SystemTime,
}

impl Report {
    /// The `Nats-Msg-Id` of this report: one per attempt, so a repeated publish is dropped.
    pub fn msg_id(&self) -> String {
        format!("report-{}-{}", self.task_id, self.attempt)
    }
}
