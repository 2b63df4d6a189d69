//! colony-router: routes model calls to deployments and accounts for their usage and cost.

fn main() -> std::process::ExitCode {
    colony_runtime::main(
        "colony-router",
        "Colony router: the gateway between agents and model providers",
        colony_router::run,
    )
}
