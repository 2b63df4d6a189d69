//! Logical subjects (before the installation prefix). Versioned and hierarchical; the last
//! tokens carry the role or the event kind, never an id, so consumers filter cheaply.

pub const DISPATCH: &str = "colony.v1.task.dispatch";
pub const REPORT: &str = "colony.v1.task.report";
pub const EVENT_RUN: &str = "colony.v1.event.run";
pub const EVENT_TASK: &str = "colony.v1.event.task";
pub const WORKER_HEARTBEAT: &str = "colony.v1.worker.heartbeat";
pub const USAGE_RECORDED: &str = "colony.v1.usage.recorded";
pub const DEAD_LETTER: &str = "colony.v1.deadletter";
/// A step of a task attempt, for the memory service's replay log.
pub const TRAJECTORY_STEP: &str = "colony.v1.event.trajectory.step";
/// Text a running task's model is writing (`TaskTokens`), for whoever watches the run.
pub const TASK_TOKENS: &str = "colony.v1.event.tokens";
/// Memories changed on one memory replica; the others refresh their index.
pub const MEMORY_CHANGED: &str = "colony.v1.event.memory.changed";
/// A router replica's circuit breaker changed state (`BreakerChanged`), for the monitor.
pub const BREAKER_CHANGED: &str = "colony.v1.event.breaker";

/// `colony.v1.task.dispatch.<role>`.
pub fn dispatch(role: &str) -> String {
    format!("{DISPATCH}.{role}")
}

/// `colony.v1.task.report.<outcome>`.
pub fn report(outcome: &str) -> String {
    format!("{REPORT}.{outcome}")
}

/// `colony.v1.event.run.<kind>`.
pub fn run_event(kind: &str) -> String {
    format!("{EVENT_RUN}.{kind}")
}

/// `colony.v1.event.task.<kind>`.
pub fn task_event(kind: &str) -> String {
    format!("{EVENT_TASK}.{kind}")
}

/// The dead-letter subject for a message that arrived on logical `subject`.
pub fn dead_letter(subject: &str) -> String {
    let rest = subject.strip_prefix("colony.v1.").unwrap_or(subject);
    format!("{DEAD_LETTER}.{rest}")
}

/// A low-cardinality label for a logical subject: its first four tokens
/// (`colony.v1.event.run`), which name the message type but never an id or role.
pub fn kind_of(subject: &str) -> String {
    subject.split('.').take(4).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_hierarchical() {
        assert_eq!(dispatch("planner"), "colony.v1.task.dispatch.planner");
        assert_eq!(
            dead_letter("colony.v1.task.report.succeeded"),
            "colony.v1.deadletter.task.report.succeeded"
        );
        assert_eq!(
            kind_of("colony.v1.event.run.created"),
            "colony.v1.event.run"
        );
    }
}
