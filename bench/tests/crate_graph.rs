//! The product links no benchmark or test topology code: what the `xlb` binary builds with
//! (`lb-userspace`, normal dependencies, through the features actually enabled) holds neither
//! this crate nor `xlb-netns` nor plotters. Checked on `cargo metadata`'s graph, walked as in
//! `core/tests/io_free.rs`; docs/architecture.md states the rule.

#[path = "../../core/tests/cargo_graph/mod.rs"]
mod cargo_graph;

use std::collections::BTreeSet;

use cargo_graph::Graph;

/// What only the benchmarks and the tests may build with.
const BENCH_ONLY: [&str; 3] = ["xlb-bench", "xlb-netns", "plotters"];

fn bench_only_in(names: &BTreeSet<String>) -> Vec<&'static str> {
    BENCH_ONLY
        .into_iter()
        .filter(|name| names.contains(*name))
        .collect()
}

#[test]
fn the_xlb_product_builds_with_no_bench_or_topology_crate() {
    let graph = Graph::load();
    let product = graph.closure("lb-userspace", &["default"]);
    assert!(
        product.contains("xlb-core") && product.contains("aya"),
        "the walk must reach the product's own dependencies: {product:?}"
    );
    assert_eq!(bench_only_in(&product), Vec::<&str>::new(), "{product:?}");
}

/// The walk does see these crates where they are: all three in the benchmarks' own graph.
#[test]
fn the_check_finds_bench_crates_where_they_are() {
    let graph = Graph::load();
    let bench = graph.closure("xlb-bench", &["default"]);
    assert!(bench.contains("lb-userspace"), "{bench:?}");
    assert_eq!(bench_only_in(&bench), BENCH_ONLY.to_vec(), "{bench:?}");
}
