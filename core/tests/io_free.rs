//! The core does no I/O: nothing it builds with may be a crate that touches the kernel's BPF
//! maps, runs an event loop, parses command lines or makes system calls. Checked on the
//! dependency graph `cargo metadata` reports, following only the optional dependencies the
//! features actually enabled switch on (lb-common pulls aya in only for its `user` feature).

use std::collections::BTreeSet;

mod cargo_graph;
use cargo_graph::Graph;

/// What the core must never depend on, directly or through anything.
const FORBIDDEN: [&str; 5] = ["aya", "tokio", "clap", "libc", "nix"];

fn forbidden_in(names: &BTreeSet<String>) -> Vec<&'static str> {
    FORBIDDEN
        .into_iter()
        .filter(|f| names.contains(*f))
        .collect()
}

#[test]
fn the_core_builds_with_no_io_crate() {
    let graph = Graph::load();
    let closure = graph.closure("xlb-core", &["default"]);
    assert!(closure.contains("lb-common"), "{closure:?}");
    assert_eq!(forbidden_in(&closure), Vec::<&str>::new(), "{closure:?}");
    // The fake maps too: other crates' tests may enable them.
    let with_fake = graph.closure("xlb-core", &["default", "fake"]);
    assert_eq!(
        forbidden_in(&with_fake),
        Vec::<&str>::new(),
        "{with_fake:?}"
    );
}

/// The walk does see these crates where they are: through lb-common's `user` feature, and
/// everywhere in the agent.
#[test]
fn the_check_finds_io_crates_where_they_are() {
    let graph = Graph::load();
    assert_eq!(
        forbidden_in(&graph.closure("lb-common", &["std"])),
        Vec::<&str>::new()
    );
    assert_eq!(
        forbidden_in(&graph.closure("lb-common", &["user"])),
        vec!["aya", "libc"]
    );
    assert_eq!(
        forbidden_in(&graph.closure("lb-userspace", &["default"])),
        FORBIDDEN.to_vec()
    );
}
