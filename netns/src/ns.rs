use std::{
    ffi::{CString, OsStr},
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::OpenOptionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
};

use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
    sys::signal::kill,
    unistd::{Pid, gettid},
};

use crate::Error;

/// Where `ip netns` keeps its namespaces; using the same place is what lets
/// `ip netns exec`, `ip -n` and `bpftool` see ours.
const NETNS_RUN_DIR: &str = "/run/netns";

/// Long enough for a role and a pid; short keeps `ip netns list` readable.
const MAX_PREFIX_LEN: usize = 32;

/// A name can only be taken if a dead process with our pid left it behind, so
/// a handful of retries is plenty; bounding it turns a bug into an error
/// instead of a hang.
const MAX_NAME_ATTEMPTS: u32 = 64;

/// Makes names unique within this process; the pid in the name makes them
/// unique across processes.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Two threads doing `ip`'s "make /run/netns a shared mount point" dance at
/// once could both see it missing and stack two bind mounts.
static RUN_DIR_LOCK: Mutex<()> = Mutex::new(());

/// A named network namespace that lives exactly as long as this value.
///
/// Dropping it unmounts and removes `/run/netns/NAME`; the kernel frees the
/// namespace, and every interface in it (veth peers included), once nothing
/// else holds it: a thread still inside it (see [`Netns::spawn`]) or a socket
/// opened in it keeps it alive, unnamed, until that ends.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    /// Kept open so `setns` never has to resolve the path again, and so the
    /// namespace outlives an outside `ip netns del` while we use it.
    fd: OwnedFd,
    mounted: bool,
}

impl Netns {
    /// Creates `/run/netns/{prefix}{pid}-{n}` exactly as `ip netns add` does,
    /// with `lo` up and IPv6 duplicate address detection off (see below).
    ///
    /// The pid in the name is what lets [`cleanup_stale`] tell a crashed run's
    /// leftovers from a namespace another live process is using.
    ///
    /// DAD is turned off for the whole namespace because a tentative address
    /// cannot be bound or used as a source for about a second, which makes
    /// freshly built topologies flaky; link-local addresses (which
    /// [`Netns::add_address`]'s `IFA_F_NODAD` does not cover) matter for NDP.
    ///
    /// # Errors
    /// Invalid prefix (empty, too long, characters other than ASCII
    /// alphanumerics, `-`, `_`, or ending in a digit, which would make the pid
    /// ambiguous), or any failing syscall (not root, no `/run`).
    pub fn create(prefix: &str) -> Result<Self, Error> {
        validate_prefix(prefix)?;
        prepare_run_dir()?;
        let pid = std::process::id();
        for _ in 0..MAX_NAME_ATTEMPTS {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{prefix}{pid}-{n}");
            let path = Path::new(NETNS_RUN_DIR).join(&name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o000)
                .open(&path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(Error::Io {
                        op: "create namespace file",
                        path,
                        source,
                    });
                }
            }
            if let Err(e) = bind_new_netns(&path, &name) {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
            let fd = match File::open(&path) {
                Ok(f) => OwnedFd::from(f),
                Err(source) => {
                    teardown(&path);
                    return Err(Error::Io {
                        op: "open namespace",
                        path,
                        source,
                    });
                }
            };
            let ns = Self {
                name,
                path,
                fd,
                mounted: true,
            };
            ns.init()?;
            return Ok(ns);
        }
        Err(Error::NameExhausted {
            prefix: prefix.to_owned(),
            attempts: MAX_NAME_ATTEMPTS,
        })
    }

    /// The namespace the calling thread is in, unnamed and never removed by this value: for
    /// [`crate::in_fresh_netns`]. Its path is the thread's `/proc/PID/task/TID/ns/net`, valid
    /// while the thread lives, so [`Netns::command`] works from any thread meanwhile.
    pub(crate) fn of_current_thread(name: &str) -> Result<Self, Error> {
        let own = Path::new("/proc/thread-self/ns/net");
        let fd = File::open(own)
            .map(OwnedFd::from)
            .map_err(|source| Error::Io {
                op: "open namespace",
                path: own.into(),
                source,
            })?;
        Ok(Self {
            name: name.to_owned(),
            path: PathBuf::from(format!(
                "/proc/{}/task/{}/ns/net",
                std::process::id(),
                gettid()
            )),
            fd,
            mounted: false,
        })
    }

    fn init(&self) -> Result<(), Error> {
        if self.run(|| Path::new("/proc/sys/net/ipv6").exists())? {
            self.sysctl("net/ipv6/conf/all/accept_dad", "0")?;
            self.sysctl("net/ipv6/conf/default/accept_dad", "0")?;
        }
        self.set_link_up("lo")
    }

    /// The name under `/run/netns`, for `ip netns exec NAME` and friends.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for tools that take a namespace path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the namespace now and reports failures that `Drop` has to
    /// swallow.
    ///
    /// # Errors
    /// The unmount or the removal of the file failed.
    pub fn delete(mut self) -> Result<(), Error> {
        if !std::mem::replace(&mut self.mounted, false) {
            return Ok(());
        }
        remove(&self.path)
    }

    /// Moves the calling thread into the namespace. Only for threads this
    /// crate creates: the thread never gets back to where it was.
    pub(crate) fn enter(&self) -> Result<(), Error> {
        setns(&self.fd, CloneFlags::CLONE_NEWNET).map_err(|source| Error::Sys {
            op: "setns",
            ns: self.name.clone(),
            source,
        })
    }

    /// Runs `f` inside the namespace and returns its result.
    ///
    /// `f` gets a fresh OS thread because `setns` moves only the calling
    /// thread and there is no safe way back for a thread we do not own. The
    /// thread is scoped, so `f` may borrow. Sockets, and anything else bound
    /// to a network namespace, that `f` creates stay in this namespace even
    /// when returned to another thread. A panic in `f` is resumed here.
    ///
    /// # Errors
    /// The thread could not be started or could not enter the namespace.
    pub fn run<F, T>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(thread_name(&self.name))
                .spawn_scoped(scope, || {
                    self.enter()?;
                    Ok(f())
                })
                .map_err(|source| Error::Thread {
                    ns: self.name.clone(),
                    source,
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Starts a long-running thread inside the namespace, e.g. a server.
    ///
    /// Returns only once the thread is inside, so a setns failure is an error
    /// here rather than a panic in a thread nobody joins. The thread keeps the
    /// namespace alive after this `Netns` is dropped, so bound its run time.
    ///
    /// # Errors
    /// The thread could not be started or could not enter the namespace.
    pub fn spawn<F, T>(&self, f: F) -> Result<JoinHandle<T>, Error>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let thread_err = |source| Error::Thread {
            ns: self.name.clone(),
            source,
        };
        let fd = self.fd.try_clone().map_err(thread_err)?;
        let ns = self.name.clone();
        let (tx, rx) = mpsc::sync_channel(1);
        let handle = thread::Builder::new()
            .name(thread_name(&self.name))
            .spawn(move || {
                let entered = setns(&fd, CloneFlags::CLONE_NEWNET);
                drop(fd);
                let ok = entered.is_ok();
                let _ = tx.send(entered);
                if !ok {
                    // Unwinds without running the panic hook, so nothing is
                    // printed: the caller already has the error.
                    std::panic::resume_unwind(Box::new("setns failed"));
                }
                f()
            })
            .map_err(thread_err)?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(source)) => Err(Error::Sys {
                op: "setns",
                ns,
                source,
            }),
            // The thread died before reporting; only possible if it panicked.
            Err(mpsc::RecvError) => match handle.join() {
                Ok(_) => unreachable!("thread returned without reporting setns"),
                Err(panic) => std::panic::resume_unwind(panic),
            },
        }
    }

    /// A [`Command`] whose child joins the namespace before `exec`, like
    /// `ip netns exec NAME program` without `ip`.
    ///
    /// The child opens `/run/netns/NAME` itself rather than inheriting our
    /// descriptor, so a `Command` spawned after this `Netns` is gone fails
    /// cleanly instead of joining whatever namespace reused the fd number.
    /// Unlike `ip netns exec`, `/sys` is not remounted: tools that read
    /// `/sys/class/net` see the caller's interfaces; netlink, ioctls and
    /// `/proc/net` see the namespace.
    #[must_use]
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let path = CString::new(self.path.as_os_str().as_bytes())
            .expect("namespace path has no NUL: the prefix was validated");
        // SAFETY: between fork and exec only async-signal-safe calls are
        // allowed; open/setns/close are plain syscalls, `path` was allocated
        // before the fork, and `last_os_error` only reads errno.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let rc = libc::setns(fd, libc::CLONE_NEWNET);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if rc == 0 { Ok(()) } else { Err(err) }
            });
        }
        cmd
    }

    /// Writes `/proc/sys/KEY` from inside the namespace, where `/proc/sys/net`
    /// shows this namespace's values. `key` is dotted (`net.ipv4.ip_forward`)
    /// or slashed (`net/ipv4/conf/eth0.100/rp_filter`, needed when a
    /// component itself contains a dot).
    ///
    /// # Errors
    /// The key has `..` or is empty, the file does not exist, or the kernel
    /// rejected the value.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), Error> {
        let path = sysctl_path(key)?;
        self.run(|| fs::write(&path, value))?
            .map_err(|source| Error::Io {
                op: "write sysctl",
                path,
                source,
            })
    }

    /// Reads `/proc/sys/KEY` inside the namespace, trimmed; see
    /// [`Netns::sysctl`] for the key syntax.
    ///
    /// # Errors
    /// As for [`Netns::sysctl`].
    pub fn read_sysctl(&self, key: &str) -> Result<String, Error> {
        let path = sysctl_path(key)?;
        self.run(|| fs::read_to_string(&path))?
            .map(|s| s.trim().to_owned())
            .map_err(|source| Error::Io {
                op: "read sysctl",
                path,
                source,
            })
    }

    /// Makes the namespace a router for both families; a fresh namespace
    /// forwards nothing.
    ///
    /// # Errors
    /// As for [`Netns::sysctl`].
    pub fn enable_forwarding(&self) -> Result<(), Error> {
        self.set_forwarding(true)
    }

    /// Turns routing on or off for both families, on every interface (`ip_forward` is
    /// `conf/all/forwarding` under another name) and on those made later.
    ///
    /// # Errors
    /// As for [`Netns::sysctl`].
    pub fn set_forwarding(&self, on: bool) -> Result<(), Error> {
        let value = if on { "1" } else { "0" };
        self.sysctl("net/ipv4/ip_forward", value)?;
        self.sysctl("net/ipv6/conf/all/forwarding", value)
    }
}

impl AsFd for Netns {
    /// For netlink attributes such as `IFLA_NET_NS_FD` that move a link into
    /// this namespace.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.mounted {
            teardown(&self.path);
        }
    }
}

/// Removes `/run/netns` entries named `{prefix}{pid}-{n}` whose pid is not
/// running, i.e. what a killed test run left behind, and returns their names.
///
/// Namespaces of live processes are kept, so parallel runs are safe; a dead
/// pid reused by an unrelated process only delays the cleanup.
///
/// # Errors
/// `/run/netns` exists but cannot be read, or a stale entry cannot be removed.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>, Error> {
    let dir = match fs::read_dir(NETNS_RUN_DIR) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Io {
                op: "read",
                path: NETNS_RUN_DIR.into(),
                source,
            });
        }
    };
    let mut removed = Vec::new();
    for entry in dir.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some(pid) = creator_pid(&name, prefix) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        remove(&entry.path())?;
        removed.push(name);
    }
    Ok(removed)
}

/// Parses `{prefix}{anything not ending in a digit}{pid}-{n}`, so a Network
/// prefix also matches its per-role namespace names.
fn creator_pid(name: &str, prefix: &str) -> Option<i32> {
    let rest = name.strip_prefix(prefix)?;
    let (head, counter) = rest.rsplit_once('-')?;
    if counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = head.bytes().rev().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    head[head.len() - digits..].parse().ok()
}

fn pid_alive(pid: i32) -> bool {
    // EPERM means it exists but is not ours; only ESRCH means gone.
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

fn validate_prefix(prefix: &str) -> Result<(), Error> {
    let invalid = |why| {
        Err(Error::InvalidName {
            name: prefix.to_owned(),
            max: MAX_PREFIX_LEN,
            why,
        })
    };
    if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN {
        return invalid("bad length");
    }
    if !prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return invalid("bad character");
    }
    if prefix.ends_with(|c: char| c.is_ascii_digit()) {
        return invalid("must not end in a digit: the pid follows it");
    }
    Ok(())
}

/// Same steps as iproute2's `netns_add`: make `/run/netns` a shared mount
/// point, so unmounting a namespace here also unmounts it in other mount
/// namespaces (otherwise a copy there would keep it alive).
fn prepare_run_dir() -> Result<(), Error> {
    let dir = Path::new(NETNS_RUN_DIR);
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        op: "create",
        path: dir.into(),
        source,
    })?;
    let sys = |op, source| Error::Sys {
        op,
        ns: NETNS_RUN_DIR.to_owned(),
        source,
    };
    let _guard = RUN_DIR_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match mount(None::<&str>, dir, Some("none"), shared, None::<&str>) {
        Ok(()) => return Ok(()),
        // EINVAL: not a mount point yet.
        Err(Errno::EINVAL) => {}
        Err(e) => return Err(sys("mount --make-shared /run/netns", e)),
    }
    let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(Some(dir), dir, Some("none"), bind, None::<&str>)
        .map_err(|e| sys("mount --bind /run/netns /run/netns", e))?;
    mount(None::<&str>, dir, Some("none"), shared, None::<&str>)
        .map_err(|e| sys("mount --make-shared /run/netns", e))
}

/// Creates the namespace on a throwaway thread, since `unshare` moves only
/// the calling thread, and pins it with a bind mount before the thread exits.
fn bind_new_netns(path: &Path, name: &str) -> Result<(), Error> {
    let sys = |op, source| Error::Sys {
        op,
        ns: name.to_owned(),
        source,
    };
    thread::scope(|scope| {
        thread::Builder::new()
            .name(thread_name(name))
            .spawn_scoped(scope, || {
                unshare(CloneFlags::CLONE_NEWNET).map_err(|e| sys("unshare(CLONE_NEWNET)", e))?;
                // thread-self, not self: /proc/self/ns/net is the main
                // thread's namespace.
                mount(
                    Some("/proc/thread-self/ns/net"),
                    path,
                    Some("none"),
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| sys("bind-mount namespace", e))
            })
            .map_err(|source| Error::Thread {
                ns: name.to_owned(),
                source,
            })?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn remove(path: &Path) -> Result<(), Error> {
    match umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not mounted, e.g. a half-created leftover.
        Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
        Err(source) => {
            return Err(Error::Sys {
                op: "umount",
                ns: path.display().to_string(),
                source,
            });
        }
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            op: "remove",
            path: path.into(),
            source,
        }),
    }
}

fn teardown(path: &Path) {
    let _ = remove(path);
}

fn sysctl_path(key: &str) -> Result<PathBuf, Error> {
    let rel = if key.contains('/') {
        key.to_owned()
    } else {
        key.replace('.', "/")
    };
    if rel.is_empty() || rel.split('/').any(|c| c.is_empty() || c == "..") {
        return Err(Error::InvalidName {
            name: key.to_owned(),
            max: 255,
            why: "not a sysctl key",
        });
    }
    Ok(Path::new("/proc/sys").join(rel))
}

/// Linux keeps 15 bytes of a thread name; the counter at the end of the
/// namespace name is what tells threads apart in a debugger.
fn thread_name(ns: &str) -> String {
    let start = ns.len().saturating_sub(15);
    ns[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_creator_pid() {
        assert_eq!(creator_pid("xlbt12-3", "xlbt"), Some(12));
        assert_eq!(creator_pid("xlbt-client-4567-0", "xlbt-"), Some(4567));
        assert_eq!(creator_pid("xlbtc12-3", "xlbt"), Some(12));
        assert_eq!(creator_pid("xlbt12-", "xlbt"), None);
        assert_eq!(creator_pid("xlbt-3", "xlbt"), None);
        assert_eq!(creator_pid("other12-3", "xlbt"), None);
        assert_eq!(creator_pid("xlbt12-3x", "xlbt"), None);
    }

    #[test]
    fn validates_prefix() {
        assert!(validate_prefix("xlbt-").is_ok());
        assert!(validate_prefix("xlb_c").is_ok());
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("x/y").is_err());
        assert!(validate_prefix("xlb1").is_err());
        assert!(validate_prefix(&"x".repeat(MAX_PREFIX_LEN + 1)).is_err());
    }

    #[test]
    fn sysctl_keys() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/rp_filter").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
        assert!(sysctl_path("net/../../etc/passwd").is_err());
        assert!(sysctl_path("").is_err());
    }
}
