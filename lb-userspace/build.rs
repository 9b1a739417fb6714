//! Builds the XDP object (`lb-ebpf`) for the bpfel target and embeds it in the `xlb` binary.
//! A failed eBPF compile fails this build: no stale or missing object can ship.

use anyhow::{Context as _, anyhow};

/// The toolchain the workspace pins (rust-toolchain.toml); its LLVM matches bpf-linker's.
const EBPF_TOOLCHAIN: &str = "nightly-2026-08-01";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("lb-userspace has no parent directory"))?
        .join("lb-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    println!("cargo::rerun-if-changed={ebpf_dir}/../lb-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the XDP program (lb-ebpf); run `cargo xtask bootstrap` if bpf-linker or rust-src is missing")
}
