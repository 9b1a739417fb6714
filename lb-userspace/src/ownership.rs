//! Touching only what xlb made. Paths come from the command line, so any of them may name
//! something precious: the agent and `xlb detach` remove a pin only if its name is one xlb
//! gives (`XLB_*` maps, `link_*` attachments), a directory only once it is empty, and a
//! control socket only if it is a socket.

use std::{
    collections::HashSet,
    ffi::OsString,
    fs,
    io::ErrorKind,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Prefix of every map xlb pins (`lb_common::map_names`).
const MAP_PIN_PREFIX: &str = "XLB_";
/// Prefix of every attachment xlb pins (`attach::pin_path`).
const LINK_PIN_PREFIX: &str = "link_";

#[derive(Debug, Error)]
pub enum OwnershipError {
    #[error("{path} exists and is not a socket: refusing to replace it (choose another --socket)")]
    NotASocket { path: String },
    #[error("{path} holds no xlb pins: refusing to touch it (is --bpffs right?)")]
    NoXlbPins { path: String },
    #[error("{path} is not on bpffs, so it holds no xlb data path: refusing to touch it")]
    NotBpffs { path: String },
    #[error(
        "another xlb agent (pid {pid}) is using the data path pinned under {path}: stop it first, \
         or give this one another --bpffs"
    )]
    InUse { path: String, pid: String },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = OwnershipError> = std::result::Result<T, E>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OwnershipError {
    let path = path.display().to_string();
    move |source| OwnershipError::Io { what, path, source }
}

/// Whether `name` is one xlb gives its pins.
#[must_use]
pub fn is_xlb_pin(name: &str) -> bool {
    name.starts_with(MAP_PIN_PREFIX) || name.starts_with(LINK_PIN_PREFIX)
}

/// Names of the xlb pins directly under `dir` (none if it does not exist).
///
/// # Errors
/// `dir` cannot be read.
pub fn xlb_pins(dir: &Path) -> Result<HashSet<OsString>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(io("reading", dir)(e)),
    };
    let mut pins = HashSet::new();
    for entry in entries {
        let name = entry.map_err(io("reading", dir))?.file_name();
        if name.to_str().is_some_and(is_xlb_pin) {
            pins.insert(name);
        }
    }
    Ok(pins)
}

/// What [`remove_pins`] did.
#[derive(Debug, Default)]
pub struct Removal {
    pub pins: usize,
    /// The directory went too (it held nothing else).
    pub dir_removed: bool,
}

/// Removes the xlb pins under `dir` except those in `keep` (a data path adopted from a
/// previous agent), then `dir` itself if that leaves it empty. Anything else there stays.
///
/// # Errors
/// A pin that cannot be removed.
pub fn remove_pins(dir: &Path, keep: &HashSet<OsString>) -> Result<Removal> {
    let mut removal = Removal::default();
    for name in xlb_pins(dir)? {
        if keep.contains(&name) {
            continue;
        }
        let path = dir.join(&name);
        match fs::remove_file(&path) {
            Ok(()) => removal.pins += 1,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing", &path)(e)),
        }
    }
    // rmdir refuses a directory that is not empty: whatever else lives there is not ours.
    removal.dir_removed = fs::remove_dir(dir).is_ok();
    Ok(removal)
}

/// Refuses a `--bpffs` for `xlb detach` that is not on bpffs or holds no xlb pins.
///
/// # Errors
/// As described; `Ok(false)` when `dir` does not exist.
pub fn check_detachable(dir: &Path) -> Result<bool> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io("reading", dir)(e)),
        Ok(_) => {}
    }
    if !crate::paths::is_bpffs(dir) {
        return Err(OwnershipError::NotBpffs {
            path: dir.display().to_string(),
        });
    }
    if xlb_pins(dir)?.is_empty() {
        return Err(OwnershipError::NoXlbPins {
            path: dir.display().to_string(),
        });
    }
    Ok(true)
}

/// Makes room for a control socket at `path`: removes a stale socket left by an agent that
/// died, refuses anything else.
///
/// # Errors
/// `path` is something other than a socket, or cannot be removed.
pub fn clear_socket_path(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("reading", path)(e)),
        Ok(m) if m.file_type().is_socket() => {
            fs::remove_file(path).map_err(io("removing the stale socket", path))
        }
        Ok(_) => Err(OwnershipError::NotASocket {
            path: path.display().to_string(),
        }),
    }
}

/// The control socket this agent bound, recognised by its inode so that stopping removes it
/// and never what someone put at the same path since.
#[derive(Debug)]
pub struct OwnSocket {
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

impl OwnSocket {
    /// Records the socket just bound at `path`.
    #[must_use]
    pub fn bound_at(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            identity: identity(path),
        }
    }

    /// Removes the socket if it is still the one bound.
    pub fn remove(&self) {
        if self.identity.is_some() && identity(&self.path) == self.identity {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_socket())
        .map(|m| (m.dev(), m.ino()))
}

/// An exclusive claim on the data path pinned under a `--bpffs` directory, held for the
/// agent's lifetime: a second agent on the same pins would adopt them from under the first.
/// It is an `flock` on the directory itself (bpffs takes no lock files), so it is released
/// when the agent dies, however it dies.
#[derive(Debug)]
pub struct DataPathLock {
    _lock: nix::fcntl::Flock<fs::File>,
}

/// Takes the [`DataPathLock`] on `dir`, which must exist.
///
/// # Errors
/// Another process holds it (its pid in the message), or `dir` cannot be opened.
pub fn lock_data_path(dir: &Path) -> Result<DataPathLock> {
    let file = fs::File::open(dir).map_err(io("opening", dir))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(DataPathLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(OwnershipError::InUse {
            path: dir.display().to_string(),
            pid: lock_holder(dir).map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
        }),
        Err((_, errno)) => Err(io("locking", dir)(errno.into())),
    }
}

/// The pid holding an `flock` on `path`, from `/proc/locks` (`N: FLOCK ADVISORY WRITE PID
/// MAJ:MIN:INODE 0 EOF`, device numbers in hex).
fn lock_holder(path: &Path) -> Option<u32> {
    let m = fs::metadata(path).ok()?;
    let wanted = format!(
        "{:02x}:{:02x}:{}",
        libc::major(m.dev()),
        libc::minor(m.dev()),
        m.ino()
    );
    fs::read_to_string("/proc/locks")
        .ok()?
        .lines()
        .filter(|l| !l.contains("->"))
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&wanted.as_str()))
                .then(|| fields.get(4)?.parse().ok())
                .flatten()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_xlb_names_count_as_pins() {
        assert!(is_xlb_pin("XLB_CONNTRACK"));
        assert!(is_xlb_pin("link_eth0:tc"));
        assert!(!is_xlb_pin("passwd"));
        assert!(!is_xlb_pin("xlb.sock"));
    }

    #[test]
    fn removal_spares_foreign_files_and_their_directory() {
        let dir = std::env::temp_dir().join(format!("xlb-ownership-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for name in ["XLB_VIPS", "XLB_MAGLEV", "link_eth0:tc", "precious.txt"] {
            fs::write(dir.join(name), b"x").unwrap();
        }
        let keep = HashSet::from([OsString::from("XLB_MAGLEV")]);
        let removal = remove_pins(&dir, &keep).unwrap();
        assert_eq!(removal.pins, 2);
        assert!(!removal.dir_removed);
        assert!(dir.join("precious.txt").exists());
        assert!(dir.join("XLB_MAGLEV").exists());
        fs::remove_file(dir.join("precious.txt")).unwrap();
        let removal = remove_pins(&dir, &HashSet::new()).unwrap();
        assert_eq!(removal.pins, 1);
        assert!(removal.dir_removed);
        assert!(!dir.exists());
    }

    #[test]
    fn a_regular_file_is_not_a_socket_to_clear() {
        let file = std::env::temp_dir().join(format!("xlb-ownership-{}.txt", std::process::id()));
        fs::write(&file, b"data").unwrap();
        assert!(matches!(
            clear_socket_path(&file),
            Err(OwnershipError::NotASocket { .. })
        ));
        assert_eq!(fs::read(&file).unwrap(), b"data");
        fs::remove_file(&file).unwrap();
    }
}
