//! colony-monitor
fn main() {}
