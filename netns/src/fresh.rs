//! A thread of its own in a network namespace of its own, for code that acts on "the calling
//! thread's namespace" rather than on a named one: `BPF_PROG_TEST_RUN` feeds an XDP frame in
//! through the caller's `lo`, and `bpf_fib_lookup` consults the caller's routes and
//! neighbours.

use std::{
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    sync::mpsc,
    thread,
    time::Duration,
};

use nix::sched::{CloneFlags, unshare};

use crate::{Error, Netns};

/// Runs `f` on a new thread that has unshared its network namespace, and hands it that
/// namespace (only a `lo`, down, as the kernel makes it) for netlink and sysctls.
///
/// Only that thread moves: the rest of the process stays where it was. The namespace has no
/// name under `/run/netns`, so nothing is left behind even if the process is killed; it is
/// freed when the thread ends. A panic in `f` is resumed here.
///
/// # Errors
/// The thread could not be started, `unshare` failed (not root), or `f` did not return
/// within `limit`: the thread is then left running, to end with the process, and the
/// caller gets [`Error::TimedOut`] instead of a hang.
pub fn in_fresh_netns<T, F>(name: &str, limit: Duration, f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce(&Netns) -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let thread_name = name.to_owned();
    let worker = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let entered = unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|source| Error::Sys {
                    op: "unshare(CLONE_NEWNET)",
                    ns: thread_name.clone(),
                    source,
                })
                .and_then(|()| Netns::of_current_thread(&thread_name));
            let outcome = entered.map(|ns| catch_unwind(AssertUnwindSafe(|| f(&ns))));
            let _ = tx.send(outcome);
        })
        .map_err(|source| Error::Thread {
            ns: name.to_owned(),
            source,
        })?;
    match rx.recv_timeout(limit) {
        Ok(outcome) => {
            let _ = worker.join();
            match outcome {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(panic)) => resume_unwind(panic),
                Err(e) => Err(e),
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::TimedOut {
            ns: name.to_owned(),
            limit,
        }),
        // Only a panic outside `f` gets here; join hands it over.
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Ok(()) => unreachable!("the namespace thread ended without reporting"),
            Err(panic) => resume_unwind(panic),
        },
    }
}
