//! colony-orchestrator
fn main() {}
