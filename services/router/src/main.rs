//! colony-router
fn main() {}
