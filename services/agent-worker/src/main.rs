//! colony-agent-worker
fn main() {}
