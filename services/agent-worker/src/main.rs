//! colony-agent-worker: runs dispatched tasks (claim → model call → report).

fn main() -> std::process::ExitCode {
    colony_runtime::main(
        "colony-agent-worker",
        "Colony agent-worker: claims dispatched tasks, calls models, reports",
        colony_agent_worker::run,
    )
}
