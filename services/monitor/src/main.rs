//! colony-monitor: metrics, a worker registry and a status API from the EVENTS stream.

fn main() -> std::process::ExitCode {
    colony_runtime::main(
        "colony-monitor",
        "Colony monitor: metrics, worker registry and status API from the events stream",
        colony_monitor::run,
    )
}
