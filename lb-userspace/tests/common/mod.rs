//! Helpers the integration tests share: unique names, temp dirs, running `xlb` with a time
//! limit, and starting, probing and stopping an `xlb run` agent.
//!
//! Each test binary compiles this module on its own and uses only part of it, hence the
//! `dead_code` allowances on the items not every binary needs.

use std::{
    ffi::OsStr,
    fs,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde::de::DeserializeOwned;
use xlb_netns::Netns;

pub const XLB: &str = env!("CARGO_BIN_EXE_xlb");

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A number no other call in this process gets.
#[allow(dead_code)]
pub fn seq() -> usize {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// `xlb-SUITE-TAG-PID-N`: unique across the tests of a binary and across binaries.
#[allow(dead_code)]
pub fn unique(suite: &str, tag: &str) -> String {
    format!("xlb-{suite}-{tag}-{}-{}", std::process::id(), seq())
}

/// A per-test directory under the system temp dir, removed on drop.
#[allow(dead_code)]
pub struct TempDir(PathBuf);

#[allow(dead_code)]
impl TempDir {
    pub fn new(suite: &str, tag: &str) -> Self {
        let path = std::env::temp_dir().join(unique(suite, tag));
        fs::create_dir_all(&path).expect("creating temp dir");
        Self(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[allow(dead_code)]
pub fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// Backend `i`'s address in [`xlb_netns::Topology`] (`10.11.i.2`), on `port`.
#[allow(dead_code)]
pub fn backend_v4(i: usize, port: u16) -> SocketAddr {
    v4(
        Ipv4Addr::new(10, 11, u8::try_from(i).expect("< 256 backends"), 2),
        port,
    )
}

/// `cmd` with its output captured, killed if it runs longer than `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    // Drain both pipes on their own threads so a chatty child can never block on a full pipe.
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = pipe.read_to_end(&mut v);
            v
        })
    };
    let out_reader = drain(Box::new(child.stdout.take().expect("piped")));
    let err_reader = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}

/// Runs `xlb ARGS --socket SOCKET` in `ns`, within 40 s.
#[allow(dead_code)]
pub fn xlb(ns: &Netns, socket: &Path, args: &[&str]) -> Output {
    let mut cmd = ns.command(XLB);
    cmd.args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("XLB_SOCKET");
    output_within(&mut cmd, Duration::from_secs(40))
}

pub fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "xlb {}: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The stdout of `xlb ARGS`, which must have succeeded.
pub fn success(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "expected success: {}",
        describe(args, &out)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// What `xlb ARGS` printed, as JSON.
pub fn parse_json<T: DeserializeOwned>(args: &[&str], text: &str) -> T {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("xlb {}: not JSON ({e}):\n{text}", args.join(" ")))
}

/// Runs a command that must succeed; returns its stdout.
#[allow(dead_code)]
pub fn ok(ns: &Netns, socket: &Path, args: &[&str]) -> String {
    success(args, xlb(ns, socket, args))
}

#[allow(dead_code)]
pub fn json(ns: &Netns, socket: &Path, args: &[&str]) -> serde_json::Value {
    parse_json(args, &ok(ns, socket, args))
}

/// kill(2) on `child`, unless it has been reaped already (its pid may be reused by then).
pub fn signal(child: &mut Child, signal: libc::c_int) {
    if matches!(child.try_wait(), Ok(None)) {
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, signal) };
    }
}

/// SIGTERM, then waits up to `limit` for the exit; `None` if the child is still running.
pub fn terminate(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    signal(child, libc::SIGTERM);
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() <= deadline => thread::sleep(Duration::from_millis(10)),
            // An error means there is nothing left to wait for.
            Ok(None) | Err(_) => return None,
        }
    }
}

/// [`terminate`], then SIGKILL if that did not end it.
pub fn terminate_or_kill(child: &mut Child, limit: Duration) {
    if terminate(child, limit).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `xlb run --iface I... --socket S --state F --bpffs B` on `cmd` (an `xlb` command), with
/// info logging into `log` and no stdin; callers add what else they need.
pub fn agent_command<'a>(
    mut cmd: Command,
    ifaces: impl IntoIterator<Item = &'a (impl AsRef<OsStr> + 'a + ?Sized)>,
    socket: &Path,
    state: &Path,
    bpffs: &Path,
    log: &Path,
) -> Command {
    let log_file = fs::File::create(log).expect("creating the agent log");
    cmd.arg("run");
    for iface in ifaces {
        cmd.arg("--iface").arg(iface);
    }
    cmd.arg("--socket")
        .arg(socket)
        .arg("--state")
        .arg(state)
        .arg("--bpffs")
        .arg(bpffs)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup log"))
        .stderr(log_file);
    cmd
}

/// Polls `probe` every `poll` until it says the agent answers; panics with `log()` if the
/// agent exits first or `limit` passes (with the probe's last complaint).
pub fn wait_ready(
    child: &mut Child,
    limit: Duration,
    poll: Duration,
    mut probe: impl FnMut() -> Result<(), String>,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("polling the agent") {
            panic!("xlb run exited early ({status}):\n{}", log());
        }
        let complaint = match probe() {
            Ok(()) => return,
            Err(complaint) => complaint,
        };
        assert!(
            Instant::now() < deadline,
            "xlb run did not answer within {} s: {complaint}\nagent log:\n{}",
            limit.as_secs(),
            log()
        );
        thread::sleep(poll);
    }
}

/// `vip list` through `run` as a readiness probe for [`wait_ready`].
pub fn vip_list_probe(run: impl Fn(&[&str]) -> Output) -> impl FnMut() -> Result<(), String> {
    move || {
        let out = run(&["vip", "list"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(describe(&["vip", "list"], &out))
        }
    }
}
