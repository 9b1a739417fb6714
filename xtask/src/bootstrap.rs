//! Fresh-machine setup. Each check is cheap, so on a prepared machine this adds well under a
//! second; each install says what it is doing.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{run, step};

/// The nightly that rust-toolchain.toml pins; its LLVM (22) matches Debian's llvm-22-dev.
const TOOLCHAIN: &str = "nightly-2026-08-01";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Runs the fuzz targets (fuzz/) under libFuzzer for the smoke run of `cargo xtask test`.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Packages to build bpf-linker (LLVM 22), to run the tests, the fuzz targets and the demo,
/// for the benchmarks' comparisons (nftables DNAT, HAProxy), and BIRD for the scale-out test.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "ethtool",
    "nftables",
    "haproxy",
    // Real containers for the podman test and the demo's podman mode: runc because crun
    // fails on hybrid cgroups; netavark and the iptables it calls named explicitly because
    // without recommends apt may pick the CNI plugins instead; busybox-static is the whole
    // image (no registry is needed).
    "podman",
    "runc",
    "netavark",
    "iptables",
    "busybox-static",
    // libfuzzer-sys compiles libFuzzer (C++) for the fuzz targets.
    "g++",
    // The BGP daemon of the scale-out test (router and nodes) and docs/scale-out.md.
    "bird2",
];

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("this needs root: {why}; run it with sudo");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn missing_apt_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn ensure_apt() -> Result<()> {
    let missing = missing_apt_packages();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing {} from apt", missing.join(" ")));
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_toolchain() -> Result<()> {
    let has_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", TOOLCHAIN])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"));
    if has_src {
        return Ok(());
    }
    step(&format!(
        "installing Rust {TOOLCHAIN} with rust-src (rustup)"
    ));
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src,rustfmt,clippy",
    ]))
}

fn ensure_bpf_linker() -> Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if current.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 4 minutes on 2 cores)"
    ));
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new("cargo")
        .args([
            &format!("+{TOOLCHAIN}"),
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("PATH", path))
    .context("building bpf-linker")
}

fn ensure_cargo_fuzz() -> Result<()> {
    let current = Command::new("cargo").args(["fuzz", "--version"]).output();
    if current.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    step(&format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} for the fuzzing smoke run (about 1 minute on 2 cores)"
    ));
    run(Command::new("cargo").args([
        &format!("+{TOOLCHAIN}"),
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
    .context("installing cargo-fuzz")
}

pub fn ensure_all() -> Result<()> {
    ensure_apt()?;
    ensure_toolchain()?;
    ensure_bpf_linker()?;
    ensure_cargo_fuzz()?;
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker is installed but not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}
