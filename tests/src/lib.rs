//! Helpers for xlb's golden packet tests (`tests/golden.rs`): fixtures built with an
//! independent packet library, a private network namespace per test, and the harness that
//! runs the compiled XDP program on each fixture and checks action, bytes and counters.

pub mod harness;
pub mod netns;
pub mod packet;
