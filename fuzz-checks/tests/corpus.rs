//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through each target's check:
//! the deterministic part of fuzzing, run on every `cargo test --workspace`, with or without
//! cargo-fuzz installed.

use std::{fs, path::PathBuf};

#[test]
fn every_corpus_input_passes_its_check() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, check) in xlb_fuzz_checks::TARGETS {
        let dir = corpus.join(target);
        let mut inputs: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|entry| entry.expect("a directory entry").path())
            .collect();
        inputs.sort();
        // An empty directory would make this test pass without checking anything.
        assert!(
            inputs.len() >= 5,
            "{}: only {} seeds",
            dir.display(),
            inputs.len()
        );
        for input in inputs {
            let bytes = fs::read(&input).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
            let outcome = std::panic::catch_unwind(|| check(&bytes));
            assert!(outcome.is_ok(), "{target} fails on {}", input.display());
        }
    }
}

#[test]
fn rewrite_seeds_reach_the_checksum_comparison() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/packet_rewrite");
    let seeds: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
        })
        .collect();
    let skipped: Vec<&PathBuf> = seeds
        .iter()
        .filter(|p| !xlb_fuzz_checks::packet::rewrite_is_checked(&fs::read(p).unwrap()))
        .collect();
    assert!(seeds.len() >= 10, "{} rewrite seeds", seeds.len());
    // Every seed is a balanceable frame: one that stops early checks nothing.
    assert!(
        skipped.is_empty(),
        "seeds that never reach a rewrite: {skipped:?}"
    );
}
