//! Every metric the agent-worker records.

/// Attempts that ended in this worker, by `role` and `outcome` (`succeeded`, `failed`,
/// `parked`: it spawned children to wait for, or `lost`: the lease was lost or the shutdown
/// grace ran out; nothing is reported for the last two).
pub const TASKS: &str = "colony_agent_worker_tasks_total";
/// Time from a granted claim to a published report, by `role`.
pub const TASK_SECONDS: &str = "colony_agent_worker_task_duration_seconds";
/// Claims, by `result` (`granted`, `refused`, `error`).
pub const CLAIMS: &str = "colony_agent_worker_claims_total";
/// Time from the orchestrator's `dispatched_at` to a granted claim.
pub const CLAIM_BATCH: &str = "colony_agent_worker_claim_batch_size";
/// Histogram.
pub const DISPATCH_LATENCY_SECONDS: &str = "colony_agent_worker_dispatch_latency_seconds";
/// Tasks running now (claimed and not yet ended).
pub const SLOTS_BUSY: &str = "colony_agent_worker_slots_busy";
/// Tasks this worker can run at once: `slots × roles`.
pub const SLOTS: &str = "colony_agent_worker_slots";
/// Failed memory appends, by `step` (`prompt`, `reply`, `tool`). They do not fail the task.
pub const MEMORY_FAILURES: &str = "colony_agent_worker_memory_failures_total";
/// Trajectory steps (for memory's replay log) that could not be published, by `step`.
pub const TRAJECTORY_FAILURES: &str = "colony_agent_worker_trajectory_failures_total";
/// Failed lease heartbeats (`Orchestrator.HeartbeatTask`); retried on the next tick.
pub const LEASE_HEARTBEAT_FAILURES: &str = "colony_agent_worker_lease_heartbeat_failures_total";
/// Failed report publishes; retried with backoff while the task is live.
pub const REPORT_PUBLISH_FAILURES: &str = "colony_agent_worker_report_publish_failures_total";

/// Time one model call took as the worker saw it (`Router.Complete`, round trip).
pub const MODEL_CALL_SECONDS: &str = "colony_agent_worker_model_call_duration_seconds";
/// Judges' verdicts on answers, by `verdict` (`accepted`, `rejected`, and how a task ended
/// still rejected: `accepted_with_warning` or `failed`).
pub const VALIDATIONS: &str = "colony_agent_worker_validations_total";
/// Checkpoints of the agent loop, by `result` (`saved`, `refused`, `error`).
pub const CHECKPOINTS: &str = "colony_agent_worker_checkpoints_total";
/// Conversations that would have overflowed the model's context window, by `action`
/// (`escalated`, `compressed`, `failed`).
pub const CONTEXT_OVERFLOWS: &str = "colony_agent_worker_context_overflows_total";
/// Chunks of streamed model text published for watchers, by `result` (`published`, `error`).
pub const TOKEN_CHUNKS: &str = "colony_agent_worker_token_chunks_total";
/// Attempts that resumed from an earlier attempt's checkpoint.
pub const RESUMED: &str = "colony_agent_worker_resumed_total";
/// Tool calls made by agents, by `tool` and `result` (`ok`, `error`).
pub const TOOL_CALLS: &str = "colony_agent_worker_tool_calls_total";
/// Time one tool call took, by `tool`.
pub const TOOL_SECONDS: &str = "colony_agent_worker_tool_call_duration_seconds";
/// Model calls per finished attempt (the agent loop's steps).
pub const AGENT_STEPS: &str = "colony_agent_worker_agent_steps";
/// Attempts the agent loop ended without a final answer, by `reason` (`max_steps`,
/// `token_budget`).
pub const AGENT_STOPPED: &str = "colony_agent_worker_agent_stopped_total";
/// Sandbox commands, by `outcome`: `succeeded` (exit code 0), `failed` (another exit code or a
/// signal), `timed_out`, `cancelled`, or `refused` (a check failed or it could not start).
pub const SANDBOX_COMMANDS: &str = "colony_agent_worker_sandbox_commands_total";

/// Registers descriptions so `/metrics` explains every series.
pub fn describe() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        TASKS,
        "Task attempts that ended in this worker, by role and outcome (succeeded, failed, parked, lost)."
    );
    describe_histogram!(
        TASK_SECONDS,
        Unit::Seconds,
        "Time from a granted claim to the published report, by role."
    );
    describe_counter!(
        CLAIMS,
        "Orchestrator.ClaimTask calls, by result (granted, refused, error)."
    );
    describe_histogram!(
        DISPATCH_LATENCY_SECONDS,
        Unit::Seconds,
        "Time from the orchestrator's dispatched_at to a granted claim."
    );
    describe_histogram!(
        CLAIM_BATCH,
        Unit::Count,
        "Claims sent in one ClaimTasks call."
    );
    describe_gauge!(SLOTS_BUSY, "Tasks this worker is running now.");
    describe_gauge!(
        SLOTS,
        "Tasks this worker can run at once (slots per role times roles)."
    );
    describe_counter!(
        MEMORY_FAILURES,
        "Failed Memory.AppendMessages calls, by step (prompt, reply, tool); the task goes on."
    );
    describe_counter!(
        TRAJECTORY_FAILURES,
        "Trajectory steps for the replay log that could not be published, by step (prompt, reply, tool); the task goes on."
    );
    describe_counter!(
        LEASE_HEARTBEAT_FAILURES,
        "Failed Orchestrator.HeartbeatTask calls; retried on the next tick."
    );
    describe_counter!(
        REPORT_PUBLISH_FAILURES,
        "Failed TaskReport publishes; retried with backoff while the task is live."
    );
    describe_histogram!(
        MODEL_CALL_SECONDS,
        Unit::Seconds,
        "Time one model call took as the worker saw it (Router.Complete round trip)."
    );
    describe_counter!(
        VALIDATIONS,
        "Judges' verdicts on answers, by verdict (accepted, rejected, accepted_with_warning, failed)."
    );
    describe_counter!(
        CHECKPOINTS,
        "Checkpoints of the agent loop saved through the orchestrator, by result (saved, refused, error)."
    );
    describe_counter!(
        RESUMED,
        "Attempts that resumed from an earlier attempt's checkpoint instead of starting over."
    );
    describe_counter!(
        TOOL_CALLS,
        "Tool calls made by agents, by tool and result (ok, error)."
    );
    describe_histogram!(
        TOOL_SECONDS,
        Unit::Seconds,
        "Time one tool call took, by tool."
    );
    describe_histogram!(
        AGENT_STEPS,
        Unit::Count,
        "Model calls the agent loop made in one attempt."
    );
    describe_counter!(
        CONTEXT_OVERFLOWS,
        "Conversations that would have overflowed the model's context window, by action (escalated, compressed, failed)."
    );
    describe_counter!(
        TOKEN_CHUNKS,
        "Chunks of streamed model text published on the bus for watchers, by result (published, error)."
    );
    describe_counter!(
        AGENT_STOPPED,
        "Attempts the agent loop ended without a final answer, by reason (max_steps, token_budget)."
    );
    describe_counter!(
        SANDBOX_COMMANDS,
        "Sandbox commands, by outcome (succeeded, failed, timed_out, cancelled, refused)."
    );
    colony_bus::metrics::describe();
}
