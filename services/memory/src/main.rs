//! colony-memory: conversation history behind the `colony.v1.Memory` gRPC API.

fn main() -> std::process::ExitCode {
    colony_runtime::main(
        "colony-memory",
        "Colony memory: conversation history over gRPC",
        colony_memory::run,
    )
}
