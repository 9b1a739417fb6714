//! The properties xlb's fuzz targets check, one function per target. Each takes the raw
//! fuzz input, never fails on input it cannot use, and panics when a property breaks: that
//! is what libFuzzer (fuzz/fuzz_targets) reports as a crash, and what the corpus replay test
//! (tests/corpus.rs) fails on.
//!
//! - [`packet::check_parse`]: the data plane's header parser against etherparse.
//! - [`packet::check_rewrite`]: the NAT rewrite's incremental checksum updates (RFC 1624)
//!   against checksums etherparse recomputes from scratch.
//! - [`control::check_request_stream`]: the control socket's line framing and request
//!   decoder.
//! - [`config::check_config`]: the `xlb.toml` loader and validation.
//! - [`state::check_state_file`]: the agent's state-file loader.

pub mod config;
pub mod control;
pub mod packet;
pub mod state;

/// A property check over one fuzz input; it panics when the property breaks.
pub type Check = fn(&[u8]);

/// The fuzz targets, by name, with the check each runs: the names of the directories under
/// `fuzz/corpus/` and of the binaries in `fuzz/fuzz_targets/`.
pub const TARGETS: [(&str, Check); 5] = [
    ("packet_parse", packet::check_parse),
    ("packet_rewrite", packet::check_rewrite),
    ("control_request", control::check_request_stream),
    ("config_toml", config::check_config),
    ("state_file", state::check_state_file),
];
