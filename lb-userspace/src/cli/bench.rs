//! `xlb bench`: the benchmarks are a program of their own, `xlb-bench` (crate `bench/`), so
//! that `xlb` links no test topology or plotting code. As git and cargo run external
//! subcommands, `xlb bench ARGS` runs `xlb-bench ARGS` in its place: the one next to the
//! running `xlb` first, then the one on PATH.

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow};

/// The program `xlb bench` runs.
pub const BENCH_PROGRAM: &str = "xlb-bench";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// `cost`, `forward` or `scaling` and their options, as `xlb bench --help` lists them.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

/// `xlb-bench` next to `xlb`, else on PATH.
fn find_bench_program(xlb: &Path) -> Result<PathBuf> {
    let beside = xlb.with_file_name(BENCH_PROGRAM);
    if beside.is_file() {
        return Ok(beside);
    }
    which::which(BENCH_PROGRAM).map_err(|_| {
        anyhow!(
            "xlb bench runs {BENCH_PROGRAM}, which is neither next to {} nor on PATH: build it \
             with `./x build` or `cargo build --release -p xlb-bench`",
            xlb.display()
        )
    })
}

/// Replaces this process with `xlb-bench`, so its output, signals and exit status are
/// `xlb bench`'s; returns only when that cannot start.
pub fn run(BenchArgs { args }: BenchArgs) -> Result<()> {
    let xlb = std::env::current_exe().context("finding the running xlb")?;
    let program = find_bench_program(&xlb)?;
    let error = Command::new(&program).arg0("xlb bench").args(args).exec();
    Err(error).with_context(|| format!("running {}", program.display()))
}
