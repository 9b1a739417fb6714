//! `cargo xtask`: sets up a fresh machine (toolchain, LLVM, bpf-linker), builds, tests and
//! runs the demo. Every step says what it does; steps whose result is present are skipped.

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bootstrap;

#[derive(Parser)]
#[command(about = "xlb development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building xlb needs: LLVM 22 (apt), the pinned nightly with rust-src,
    /// bpf-linker built against LLVM 22, and the tools the tests use.
    Bootstrap,
    /// Build the XDP object and the `xlb` binary (release).
    Build,
    /// Bootstrap, then run every test (unit, golden packet tests, namespace end-to-end, the
    /// fuzz corpus replay), then fuzz each target for a few seconds. Needs root: the tests
    /// load XDP programs and create network namespaces.
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Bootstrap, build, and run the containers demo.
    Demo,
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub fn step(what: &str) {
    println!("==> {what}");
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build() -> Result<()> {
    step("building the XDP object, the xlb binary and the demo (release)");
    // `--bin` filters apply to every selected package: name both binaries.
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "lb-userspace",
        "-p",
        "xlb-demo",
        "--bin",
        "xlb",
        "--bin",
        "xlb-demo",
    ]))
}

/// Seconds each fuzz target runs in the smoke run of `cargo xtask test`.
const FUZZ_SMOKE_SECONDS: u32 = 5;

/// Runs every fuzz target of fuzz/ under libFuzzer for a few seconds, from the committed
/// corpus. New inputs go to a scratch directory under target/, so the corpus in the repo only
/// changes by hand. No sanitizer: the code under test is safe Rust, and ASan would double
/// the build of the instrumented dependency tree (debug assertions and overflow checks stay
/// on). The long run is described in docs/reliability-fuzzing.md.
fn fuzz_smoke() -> Result<()> {
    let list = Command::new("cargo")
        .args(["fuzz", "list", "--fuzz-dir", "fuzz"])
        .output()
        .context("listing the fuzz targets (cargo fuzz list)")?;
    if !list.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&list.stderr)
        );
    }
    let targets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!("cargo fuzz list found no fuzz targets in fuzz/");
    }
    step(&format!(
        "fuzzing {} for {FUZZ_SMOKE_SECONDS} s each (the first builds the instrumented targets, a few minutes on a fresh clone)",
        targets.join(", ")
    ));
    for target in &targets {
        let scratch = std::path::Path::new("target/fuzz-smoke").join(target);
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        run(Command::new("cargo")
            .args([
                "fuzz",
                "run",
                "--fuzz-dir",
                "fuzz",
                "--sanitizer",
                "none",
                target,
            ])
            .arg(&scratch)
            .arg(format!("fuzz/corpus/{target}"))
            .args([
                "--",
                &format!("-max_total_time={FUZZ_SMOKE_SECONDS}"),
                "-print_final_stats=1",
            ]))
        .with_context(|| {
            format!(
                "fuzz target {target} failed: the crashing input is under fuzz/artifacts/{target}/"
            )
        })?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Paths below (target/release/...) are relative to the workspace root, wherever
    // `cargo xtask` was started from.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    std::env::set_current_dir(root).with_context(|| format!("entering {}", root.display()))?;
    match cli.task {
        Task::Bootstrap => bootstrap::ensure_all(),
        Task::Build => {
            bootstrap::ensure_all()?;
            build()
        }
        Task::Test { args } => {
            bootstrap::ensure_all()?;
            bootstrap::require_root("the tests load XDP programs and create network namespaces")?;
            step(
                "running the test suite (unit, golden packets through the real program, namespaces)",
            );
            let tests = run(cargo()
                .args(["test", "--workspace", "--release", "--no-fail-fast"])
                .args(&args));
            // A filter asks for some tests, not for the whole suite.
            let fuzz = if args.is_empty() {
                fuzz_smoke()
            } else {
                step("fuzzing smoke run skipped: test arguments were given");
                Ok(())
            };
            tests.and(fuzz)
        }
        Task::Demo => {
            bootstrap::ensure_all()?;
            bootstrap::require_root("the demo attaches XDP and creates network namespaces")?;
            build()?;
            step("running the demo");
            run(Command::new("target/release/xlb-demo").args(["--xlb", "target/release/xlb"]))
        }
    }
}
