//! `xlb bench ...` is `xlb-bench ...`: the `xlb` built next to this crate's program runs it
//! with the arguments as given, so the benchmarks' help and argument errors are what the user
//! of `xlb bench` sees. Needs no root. (How `xlb` finds the program, and what it says when
//! there is none: lb-userspace/tests/cli.rs, with a stand-in.)

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

const XLB_BENCH: &str = env!("CARGO_BIN_EXE_xlb-bench");

/// The `xlb` of the same build: `cargo build --release --workspace` (and the README's test
/// command) places both binaries in one directory.
fn xlb() -> PathBuf {
    let xlb = Path::new(XLB_BENCH).with_file_name("xlb");
    assert!(
        xlb.is_file(),
        "{} is missing: build it next to xlb-bench (`cargo build --release -p lb-userspace`, \
         or the workspace's `cargo test --workspace --release`)",
        xlb.display()
    );
    xlb
}

fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "xlb {}: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_xlb(args: &[&str]) -> Output {
    Command::new(xlb())
        .args(args)
        .env_remove("XLB_SOCKET")
        .output()
        .unwrap_or_else(|e| panic!("running xlb {args:?}: {e}"))
}

#[test]
fn bench_help_comes_from_xlb_bench_through_xlb() {
    let out = run_xlb(&["bench", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("Usage: xlb bench <COMMAND>")
            && ["cost", "forward", "scaling"]
                .iter()
                .all(|verb| text.lines().any(|l| l.trim_start().starts_with(verb))),
        "{}",
        describe(&["bench", "--help"], &out)
    );
    for (verb, option) in [
        ("cost", "--calls <CALLS>"),
        ("forward", "--no-dsr"),
        ("scaling", "--quick"),
    ] {
        let args = ["bench", verb, "--help"];
        let out = run_xlb(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && text.contains(&format!("Usage: xlb bench {verb} [OPTIONS]"))
                && text.contains(option)
                && !text.contains("--socket"),
            "{}",
            describe(&args, &out)
        );
    }
}

/// Argument errors are xlb-bench's, on one line, with clap's usage status (2); `xlb bench`
/// alone shows the help, and that is no success either.
#[test]
fn bench_argument_errors_keep_their_status_through_xlb() {
    for verb in ["cost", "forward"] {
        let args = ["bench", verb, "--socket", "/nowhere"];
        let out = run_xlb(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2)
                && stderr.lines().count() == 1
                && stderr.starts_with("xlb bench: unexpected argument '--socket'"),
            "{}",
            describe(&args, &out)
        );
    }
    let out = run_xlb(&["bench"]);
    assert!(
        out.status.code() == Some(2) && String::from_utf8_lossy(&out.stderr).contains("Usage:"),
        "{}",
        describe(&["bench"], &out)
    );
}

/// `xlb-bench generate` writes the page `man xlb-bench` finds and completions for the
/// program, listing the benchmarks and their options.
#[test]
fn xlb_bench_writes_its_man_page_and_completions() {
    let out_dir = std::env::temp_dir().join(format!("xlb-bench-generate-{}", std::process::id()));
    let out = Command::new(XLB_BENCH)
        .arg("generate")
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("running xlb-bench generate");
    let read = |rel: &str| std::fs::read_to_string(out_dir.join(rel));
    let (man, bash) = (read("man/xlb-bench.1"), read("completions/xlb-bench.bash"));
    let _ = std::fs::remove_dir_all(&out_dir);
    assert!(
        out.status.success(),
        "{}",
        describe(&["(xlb-bench) generate"], &out)
    );
    let man = man.expect("man/xlb-bench.1");
    assert!(
        man.contains(".TH xlb-bench 1") && man.contains("scaling"),
        "{man}"
    );
    assert!(
        bash.expect("completions/xlb-bench.bash")
            .contains("--no-dsr")
    );
}
