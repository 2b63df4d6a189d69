//! colony
fn main() {}
