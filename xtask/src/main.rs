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
    /// Build the XDP object, the `xlb` binary and `xlb-bench` next to it (release).
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
    /// Fuzz every target (fuzz/) in turn under libFuzzer, optimised, resuming from what the
    /// previous runs found (target/fuzz-corpus/). docs/reliability-fuzzing.md has more.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        seconds: u32,
    },
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
    step("building the XDP object, the xlb and xlb-bench binaries and the demo (release)");
    // `--bin` filters apply to every selected package: name every binary. xlb-bench lands
    // next to xlb, where `xlb bench` looks for it first.
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "lb-userspace",
        "-p",
        "xlb-bench",
        "-p",
        "xlb-demo",
        "--bin",
        "xlb",
        "--bin",
        "xlb-bench",
        "--bin",
        "xlb-demo",
    ]))?;
    step(
        "writing shell completions and man pages into target/release/ (from xlb's and xlb-bench's clap definitions)",
    );
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::PathBuf::from("target"),
        std::path::PathBuf::from,
    );
    let release = target.join("release");
    for program in ["xlb", "xlb-bench"] {
        run(Command::new(release.join(program))
            .arg("generate")
            .arg("--out")
            .arg(&release))?;
    }
    Ok(())
}

/// Seconds each fuzz target runs in the smoke run of `cargo xtask test`.
const FUZZ_SMOKE_SECONDS: u32 = 5;

/// How `fuzz` builds the targets and where it keeps what it finds.
struct FuzzRun {
    seconds: u32,
    /// Unoptimised: builds in a fraction of the time, fuzzes several times slower; right for
    /// a few seconds per target, wrong for a long run.
    dev: bool,
    /// New inputs go to `<scratch>/<target>/`, so the corpus in the repo only changes by
    /// hand; a long run keeps them there to resume from.
    scratch: &'static str,
    /// Empty the scratch directories first: a smoke run starts from the committed corpus only.
    fresh: bool,
}

/// Runs every fuzz target of fuzz/ under libFuzzer for `seconds` each, from the committed
/// corpus, stopping at the first crash. No sanitizer: the code under test is safe Rust, and
/// ASan would slow the build of the instrumented dependency tree further (debug assertions
/// and overflow checks stay on). See docs/reliability-fuzzing.md.
fn fuzz(run_spec: &FuzzRun) -> Result<()> {
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
    let profile = if run_spec.dev { "--dev" } else { "--release" };
    step(&format!(
        "fuzzing {} for {} s each ({}; the first run builds the instrumented targets, several minutes on a fresh clone)",
        targets.join(", "),
        run_spec.seconds,
        if run_spec.dev {
            "unoptimised build"
        } else {
            "optimised build"
        },
    ));
    for target in &targets {
        let scratch = std::path::Path::new(run_spec.scratch).join(target);
        if run_spec.fresh {
            let _ = std::fs::remove_dir_all(&scratch);
        }
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
                profile,
                target,
            ])
            .arg(&scratch)
            .arg(format!("fuzz/corpus/{target}"))
            .args([
                "--",
                &format!("-max_total_time={}", run_spec.seconds),
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
                fuzz(&FuzzRun {
                    seconds: FUZZ_SMOKE_SECONDS,
                    dev: true,
                    scratch: "target/fuzz-smoke",
                    fresh: true,
                })
            } else {
                step("fuzzing smoke run skipped: test arguments were given");
                Ok(())
            };
            tests.and(fuzz)
        }
        Task::Fuzz { seconds } => {
            bootstrap::ensure_all()?;
            fuzz(&FuzzRun {
                seconds,
                dev: false,
                scratch: "target/fuzz-corpus",
                fresh: false,
            })
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
