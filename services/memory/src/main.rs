//! colony-memory
fn main() {}
