//! Helpers for xlb's golden packet tests (`tests/golden.rs`): fixtures built with an
//! independent packet library, the host each test runs on (a private network namespace over `xlb-netns`), and the harness that
//! runs the compiled XDP program on each fixture and checks action, bytes and counters.

pub mod harness;
pub mod host;
pub mod packet;
