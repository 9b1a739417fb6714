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

/// `None` in the host's (PID 1's) network namespace, else this namespace's inode. Where PID
/// 1's namespace cannot be looked at (an unprivileged user, a sandbox hiding PID 1), the
/// host's is assumed, so the paths are the documented ones: see [`namespace_unknown`].
#[must_use]
pub fn namespace_tag() -> Option<u64> {
    let own = netns_inode("self")?;
    match netns_inode("1") {
        Some(init) if init != own => Some(own),
        _ => None,
    }
}

/// Why the host's network namespace cannot be told from this one (then [`namespace_tag`]
/// assumes it is the host's), or `None` when it can.
#[must_use]
pub fn namespace_unknown() -> Option<String> {
    match fs::metadata("/proc/1/ns/net") {
        Ok(_) => None,
        Err(e) => Some(format!(
            "cannot read /proc/1/ns/net ({e}), so this may or may not be the host's network namespace"
        )),
    }
}

/// The name `ip netns` knows this network namespace by (its bind mount under
/// `/run/netns`), if any.
#[must_use]
pub fn netns_name() -> Option<String> {
    let own = fs::metadata("/proc/self/ns/net").ok()?;
    fs::read_dir("/run/netns")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let m = fs::metadata(entry.path()).ok()?;
            (m.dev() == own.dev() && m.ino() == own.ino())
                .then(|| entry.file_name().to_string_lossy().into_owned())
        })
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

/// Whether `path` lies on a bpffs.
#[must_use]
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Whether pins made under a bpffs directory outlive the agent (what `--keep-attached`
/// relies on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinLifetime {
    /// The agent shares the host's mount namespace (PID 1's, see `host_reference`), or the
    /// bpffs is one the host sees at the same path: the pins stay until removed.
    OutlivesAgent,
    /// The agent runs in a mount namespace of its own (`ip netns exec` makes one and mounts
    /// a fresh `/sys`) with no bpffs there: the bpffs it would mount, and every pin on it,
    /// is gone once the agent exits and the namespace with it.
    DiesWithAgent,
    /// A bpffs is mounted there, but only in the agent's own mount namespace: the pins last
    /// as long as that namespace, which may end with the agent.
    OnlyInPrivateNamespace,
}

fn mount_namespace(pid: u32) -> Option<(u64, u64)> {
    fs::metadata(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn parent_of(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
}

/// The process whose mount namespace stands for the host's: PID 1, or where PID 1 cannot
/// be looked at (some sandboxes hide it), the outermost ancestor that can.
fn host_reference() -> Option<u32> {
    if mount_namespace(1).is_some() {
        return Some(1);
    }
    let mut outermost = None;
    let mut pid = std::os::unix::process::parent_id();
    // Bounded: a chain of parents is short, and a racing exit must not loop forever.
    for _ in 0..64 {
        if pid <= 1 || mount_namespace(pid).is_none() {
            break;
        }
        outermost = Some(pid);
        match parent_of(pid) {
            Some(parent) => pid = parent,
            None => break,
        }
    }
    outermost
}

/// How long pins under `dir` would last (see [`PinLifetime`]); looked at before
/// [`ensure_bpffs_dir`] mounts anything.
#[must_use]
pub fn pin_lifetime(dir: &Path) -> PinLifetime {
    let Some(host) = host_reference() else {
        // No way to tell: do not stand in the way.
        return PinLifetime::OutlivesAgent;
    };
    if mount_namespace(std::process::id()) == mount_namespace(host) {
        return PinLifetime::OutlivesAgent;
    }
    // The directory's bpffs, or where `ensure_bpffs_dir` would mount one.
    let at = if is_bpffs(dir) {
        dir
    } else {
        dir.parent().unwrap_or(Path::new("/sys/fs/bpf"))
    };
    if !is_bpffs(at) {
        return PinLifetime::DiesWithAgent;
    }
    // Every bpffs mount is a file system of its own: the host sees the same one at this path
    // only if it is mounted in the host's namespace (or propagated there).
    let host_view =
        Path::new(&format!("/proc/{host}/root")).join(at.strip_prefix("/").unwrap_or(at));
    match (fs::metadata(at), fs::metadata(host_view)) {
        (Ok(here), Ok(there)) if here.dev() == there.dev() => PinLifetime::OutlivesAgent,
        _ => PinLifetime::OnlyInPrivateNamespace,
    }
}

/// Makes `dir` a directory on bpffs, mounting bpffs on its parent when nothing is mounted
/// there (the default on these machines, and always inside `ip netns exec`). It mounts only
/// on a directory that is empty or that it creates: a mount over anything else would hide
/// what is there.
///
/// # Errors
/// The parent holding files, or the mount or the directory creation failing.
pub fn ensure_bpffs_dir(dir: &Path) -> Result<()> {
    if is_bpffs(dir) {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    if !is_bpffs(parent) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let occupied = fs::read_dir(parent)
            .with_context(|| format!("reading {}", parent.display()))?
            .next()
            .is_some();
        if occupied {
            anyhow::bail!(
                "{} is not on bpffs and {} is not empty: mounting bpffs there would hide its \
                 files; choose a --bpffs under a bpffs (e.g. /sys/fs/bpf/xlb) or mount one \
                 yourself (`mount -t bpf bpf DIR`)",
                dir.display(),
                parent.display()
            );
        }
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
