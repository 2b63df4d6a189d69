//! colony-e2e
