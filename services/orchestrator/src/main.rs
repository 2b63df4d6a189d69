//! colony-orchestrator: runs, tasks, dispatch and the public REST API.

fn main() -> std::process::ExitCode {
    colony_runtime::main(
        "colony-orchestrator",
        "Colony orchestrator: runs, tasks, dispatch and the REST API",
        colony_orchestrator::run,
    )
}
