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
    /// Bootstrap, then run every test (unit, golden packet tests, namespace end-to-end).
    /// Needs root: the tests load XDP programs and create network namespaces.
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
            run(cargo()
                .args(["test", "--workspace", "--release", "--no-fail-fast"])
                .args(&args))
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
