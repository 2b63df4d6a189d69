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
    /// On an assistant message: the tools it called.
    pub tool_calls: Vec<ToolCall>,
    /// On a tool message: the id of the call it answers.
    pub tool_call_id: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: String::new(),
        }
    }

    /// The model's turn: its text and the tools it called.
    pub fn assistant(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self {
            tool_calls,
            ..Self::new("assistant", content)
        }
    }

    /// The answer to tool call `call_id`.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: call_id.into(),
            ..Self::new("tool", content)
        }
    }
}

/// One call of a tool by the model, OpenAI function-calling style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, exactly as the model wrote them.
    pub arguments: String,
}

/// A piece of what the model is writing in model call `model_call` of an attempt: `text` as
/// chunk `seq` of the call's stream, or its end (`done`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenChunk {
    pub model_call: u32,
    pub seq: u32,
    pub text: String,
    pub done: bool,
}

/// A tool offered to the model: its name, what it does, and its arguments' JSON Schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSpec {
    pub name: &'static str,
    pub description: &'static str,
    pub parameters: serde_json::Value,
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
    /// The tools the role may use (from the roster); the model is offered these only.
    pub tools: Vec<String>,
    /// Cost budgets in micro-USD (0: none), named in every model call for the router to
    /// enforce: the task's and its run's.
    pub task_budget_micros_usd: u64,
    pub run_budget_micros_usd: u64,
    /// Where an earlier attempt's agent loop was: this attempt resumes from it.
    pub checkpoint: Option<Checkpoint>,
    /// How the answer is checked before it is reported; `None`: not checked.
    pub validation: Option<Validation>,
    /// The context window in tokens of the task's tier; 0 when unknown (never compressed).
    pub context_window: u64,
    /// A larger-context tier to move to when the conversation would overflow.
    pub escalation: Option<Escalation>,
    /// Most tokens the task may use over all its model calls (a resumed attempt's checkpoint
    /// carries the tokens used before it); 0: no limit.
    pub task_token_budget: u64,
}

/// A tier with a larger context window the task may move to on overflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalation {
    pub tier: String,
    pub context_window: u64,
}

/// Judges that check an answer (LLM as judge with a rubric) and the bounded regeneration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    pub judges: Vec<Judge>,
    pub rubric: String,
    /// Regenerations with a judge's critique before the policy decides.
    pub max_rounds: u32,
    /// Still rejected after `max_rounds`: fail the task, or report the answer with a warning.
    pub fail_on_reject: bool,
}

/// One judge: `self` or a reviewer/validator role, with its prompt and model tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judge {
    pub name: String,
    pub prompt: String,
    pub tier: String,
}

/// Where an attempt's agent loop was after a step, saved through the orchestrator so that the
/// next attempt of the task resumes there.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Model calls made so far, over every attempt that contributed.
    pub model_calls: u32,
    /// The conversation so far: prompt, the model's turns, tool results.
    pub messages: Vec<ChatMessage>,
    /// Usage of those model calls.
    pub usage: Usage,
}

/// The orchestrator's answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker owns the attempt for `lease` unless it heartbeats.
    Granted {
        task: Box<TaskSpec>,
        lease: Duration,
    },
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

impl Usage {
    /// Both calls' tokens and cost together.
    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens.saturating_add(other.prompt_tokens),
            completion_tokens: self
                .completion_tokens
                .saturating_add(other.completion_tokens),
            cost_micros_usd: self.cost_micros_usd.saturating_add(other.cost_micros_usd),
        }
    }
}

/// A successful model call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub content: String,
    pub usage: Usage,
    /// The deployment that answered.
    pub deployment: String,
    /// The tools the model called; empty when `content` is its final answer.
    pub tool_calls: Vec<ToolCall>,
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
    /// How the answer fared with the judges; `None` when it was not validated.
    pub verdict: Option<Verdict>,
}

/// The judges' verdict on an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The tier whose model wrote the answer.
    pub tier: String,
    /// Accepted in the end, or still rejected after the rounds.
    pub accepted: bool,
    /// Rejections before the end.
    pub rejections: u32,
}

impl Report {
    /// The `Nats-Msg-Id` of this report: one per attempt, so a repeated publish is dropped.
    pub fn msg_id(&self) -> String {
        format!("report-{}-{}", self.task_id, self.attempt)
    }
}

/// Which memories a `memory_write` tool call files a memory under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryScope {
    /// Shared by every run of the tenant.
    Tenant,
    /// Shared by the tasks of the same role.
    Role,
    /// This run only.
    Run,
}

impl MemoryScope {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "tenant" => Some(Self::Tenant),
            "role" => Some(Self::Role),
            "run" => Some(Self::Run),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::Role => "role",
            Self::Run => "run",
        }
    }
}

/// A memory found by a search, as the model sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundMemory {
    pub id: i64,
    pub text: String,
    /// Similarity combined with recency and importance, as memory ranks.
    pub score: f32,
}

/// What `memory_write` stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenMemory {
    pub id: i64,
    /// It nearly duplicated an existing memory and was merged into it.
    pub merged: bool,
}

/// A strategy memory suggests for a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Strategy {
    pub id: i64,
    pub title: String,
    pub when_to_use: String,
    pub strategy: String,
    pub wins: u32,
    pub losses: u32,
}

/// A child task asked for by `spawn_tasks`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildTask {
    /// Unique among the children; what `depends_on` names.
    pub key: String,
    pub role: String,
    pub instructions: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
}

/// The orchestrator's answer to `SpawnTasks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawned {
    /// `(key, task_id)` of each child, in request order.
    pub children: Vec<(String, String)>,
    /// The parent parked until its children finish: stop working on it and do not report.
    pub parked: bool,
}
