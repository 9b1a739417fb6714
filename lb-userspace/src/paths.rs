//! Where the agent keeps its socket, state and pins, and making sure bpffs is there.
//!
//! Defaults are per network namespace: an agent in the host's namespace uses the documented
//! paths (`/run/xlb/xlb.sock`, ...); one in another namespace gets paths with that namespace's
//! inode in them, so two agents on one host never collide and a CLI run in the same namespace
//! finds its agent without flags.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn netns_inode(pid: &str) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// `None` in the host's (PID 1's) network namespace, else this namespace's inode.
#[must_use]
pub fn namespace_tag() -> Option<u64> {
    let own = netns_inode("self")?;
    match netns_inode("1") {
        Some(init) if init == own => None,
        _ => Some(own),
    }
}

fn per_namespace(base: &str, file: &str) -> PathBuf {
    match namespace_tag() {
        None => Path::new(base).join(file),
        Some(tag) => Path::new(base).join(format!("netns-{tag}")).join(file),
    }
}

#[must_use]
pub fn default_socket() -> PathBuf {
    per_namespace("/run/xlb", "xlb.sock")
}

#[must_use]
pub fn default_state() -> PathBuf {
    per_namespace("/var/lib/xlb", "state.json")
}

#[must_use]
pub fn default_bpffs() -> PathBuf {
    match namespace_tag() {
        None => PathBuf::from("/sys/fs/bpf/xlb"),
        Some(tag) => PathBuf::from(format!("/sys/fs/bpf/xlb-netns-{tag}")),
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes `dir` a directory on bpffs, mounting bpffs on its parent when nothing is mounted
/// there (the default on these machines, and always inside `ip netns exec`).
///
/// # Errors
/// The mount or the directory creation failing.
pub fn ensure_bpffs_dir(dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    if !is_bpffs(parent) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        tracing::info!(path = %parent.display(), "bpffs not mounted: mounting it");
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting bpffs on {}", parent.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}
