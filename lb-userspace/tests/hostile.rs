//! Hostile and unlucky inputs to the agent and the CLI (issue 11): paths that name something
//! that is not xlb's, a second agent on the same pins, floods on the control socket and the
//! metrics endpoint, backends that stop answering, interfaces that disappear and come back.
//! Each test says what it guards against.
//!
//! Needs root (namespaces, bpffs, XDP). Every test builds its own namespaces (prefix
//! `xlbh-`), temp dirs and bpffs directories (`xlb-hostile-`) and removes them.

use std::{
    fs,
    os::unix::fs::FileTypeExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use xlb_netns::{Netns, Topology};

mod common;
use common::{AgentProcess, TempDir, XLB, describe, output_within};

const SUITE: &str = "hostile";

/// A small prime ring keeps map setup quick.
const RING: &str = "1009";

fn topology(backends: usize) -> Topology {
    Topology::with_prefix("xlbh-", backends).expect("topology")
}

/// A directory name under /sys/fs/bpf no other test uses.
fn bpffs_dir(tag: &str) -> PathBuf {
    Path::new("/sys/fs/bpf").join(common::unique(SUITE, tag))
}

/// Removes a bpffs directory a test made, pins and all.
struct BpffsDir(PathBuf);

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The LB interfaces of `topo`: the client's link and every backend's.
fn lb_ifaces(topo: &Topology) -> Vec<String> {
    let mut ifaces = vec![topo.client_link.a.ifname.clone()];
    ifaces.extend(topo.backend_links.iter().map(|l| l.a.ifname.clone()));
    ifaces
}

/// A running agent, stopped (SIGTERM) when dropped.
struct Agent<'a> {
    ns: &'a Netns,
    process: AgentProcess,
    socket: PathBuf,
}

impl<'a> Agent<'a> {
    fn start(
        ns: &'a Netns,
        ifaces: &[String],
        dir: &TempDir,
        bpffs: &Path,
        extra: &[&str],
    ) -> Self {
        let socket = dir.join("xlb.sock");
        let state = dir.join("state.json");
        let log = dir.join(&format!("agent-{}.log", common::seq()));
        let mut cmd = common::agent_command(ns.command(XLB), ifaces, &socket, &state, bpffs, &log);
        cmd.args(["--ring-size", RING, "--no-metrics"])
            .args(extra)
            .env_remove("XLB_SOCKET");
        let process = AgentProcess::start(
            cmd,
            log,
            Duration::from_secs(15),
            Duration::from_millis(50),
            common::vip_list_probe(|args| common::xlb(ns, &socket, args)),
        );
        Self {
            ns,
            process,
            socket,
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        common::ok(self.ns, &self.socket, args)
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        self.process.terminate_and_report();
    }
}

/// `xlb ARGS` (root, in `ns` if given), which must fail within 20 s with one line on stderr
/// containing `needle`.
fn refused(ns: Option<&Netns>, args: &[&str], needle: &str) -> Output {
    let mut cmd = ns.map_or_else(|| Command::new(XLB), |ns| ns.command(XLB));
    cmd.args(args)
        .env_remove("XLB_SOCKET")
        .env("RUST_LOG", "warn");
    let out = output_within(&mut cmd, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("xlb:")).collect();
    assert!(
        !out.status.success() && error_lines.len() == 1 && error_lines[0].contains(needle),
        "expected a one-line refusal containing {needle:?}: {}",
        describe(args, &out)
    );
    out
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Whether xlb's maps or links are pinned under `dir`.
fn xlb_pins(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("XLB_") || n.starts_with("link_"))
                .collect()
        })
        .unwrap_or_default()
}

/// `xlb detach --bpffs DIR` used to `rm -rf` whatever DIR was. It must refuse a directory
/// that is not on bpffs or holds no xlb pins, and otherwise remove only xlb's pins.
#[test]
fn detach_removes_only_xlb_pins() {
    let dir = TempDir::new(SUITE, "detach");
    let socket = dir.join("none.sock");

    // An ordinary directory with a file in it.
    let plain = dir.join("plain");
    fs::create_dir_all(&plain).unwrap();
    fs::write(plain.join("precious.txt"), b"keep me").unwrap();
    refused(
        None,
        &["detach", "--bpffs", s(&plain), "--socket", s(&socket)],
        "not on bpffs",
    );
    assert_eq!(fs::read(plain.join("precious.txt")).unwrap(), b"keep me");

    // A bpffs directory that is someone else's (a subdirectory is all a test can put there).
    let theirs = BpffsDir(bpffs_dir("theirs"));
    fs::create_dir_all(theirs.0.join("their-pins")).unwrap();
    refused(
        None,
        &["detach", "--bpffs", s(&theirs.0), "--socket", s(&socket)],
        "holds no xlb pins",
    );
    assert!(theirs.0.join("their-pins").is_dir());

    // A kept-attached data path with someone else's directory beside it: xlb's pins go,
    // theirs and the directory stay.
    let topo = topology(0);
    let ifaces = lb_ifaces(&topo);
    let pins = BpffsDir(bpffs_dir("kept"));
    let mut agent = Agent::start(topo.lb(), &ifaces, &dir, &pins.0, &["--keep-attached"]);
    agent.ok(&["vip", "add", "10.100.0.1:80/tcp"]);
    agent.process.stop();
    assert!(!xlb_pins(&pins.0).is_empty(), "kept-attached pins");
    fs::create_dir_all(pins.0.join("their-pins")).unwrap();
    let args = ["detach", "--bpffs", s(&pins.0), "--socket", s(&socket)];
    let out = output_within(Command::new(XLB).args(args), Duration::from_secs(20));
    assert!(out.status.success(), "{}", describe(&args, &out));
    assert_eq!(xlb_pins(&pins.0), Vec::<String>::new());
    assert!(pins.0.join("their-pins").is_dir());
    assert!(!common::xlb_attached(topo.lb(), &ifaces[0]));
}

/// `--socket FILE` on a regular file: the agent used to delete it at start and stop.
#[test]
fn run_refuses_a_socket_path_that_is_not_a_socket() {
    let dir = TempDir::new(SUITE, "socket");
    let topo = topology(0);
    let ifaces = lb_ifaces(&topo);
    let file = dir.join("notes.txt");
    fs::write(&file, b"keep me").unwrap();
    let pins = BpffsDir(bpffs_dir("socket"));
    let state = dir.join("state.json");
    refused(
        Some(topo.lb()),
        &[
            "run",
            "--iface",
            &ifaces[0],
            "--socket",
            s(&file),
            "--state",
            s(&state),
            "--bpffs",
            s(&pins.0),
            "--no-metrics",
            "--ring-size",
            RING,
        ],
        "is not a socket",
    );
    assert_eq!(fs::read(&file).unwrap(), b"keep me");
    assert!(
        !common::xlb_attached(topo.lb(), &ifaces[0]),
        "a refused start attaches nothing"
    );
    assert_eq!(xlb_pins(&pins.0), Vec::<String>::new());

    // A socket left by an agent that died is still cleaned up.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(
        fs::symlink_metadata(&stale)
            .unwrap()
            .file_type()
            .is_socket()
    );
    let agent = Agent::start(topo.lb(), &ifaces, &dir, &pins.0, &[]);
    drop(agent);
}

/// `--bpffs DIR` where DIR's parent is an ordinary directory: the agent used to mount bpffs
/// over it, hiding its files.
#[test]
fn run_refuses_to_mount_bpffs_over_files() {
    let dir = TempDir::new(SUITE, "mount");
    let topo = topology(0);
    let ifaces = lb_ifaces(&topo);
    let data = dir.join("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("precious.txt"), b"keep me").unwrap();
    let bpffs = data.join("xlb");
    let state = dir.join("state.json");
    let socket = dir.join("xlb.sock");
    let args = [
        "run",
        "--iface",
        &ifaces[0],
        "--socket",
        s(&socket),
        "--state",
        s(&state),
        "--bpffs",
        s(&bpffs),
        "--no-metrics",
        "--ring-size",
        RING,
    ];
    // Under `timeout`: before the fix the agent started and ran on.
    let mut cmd = topo.lb().command("timeout");
    cmd.args(["-s", "KILL", "10", XLB])
        .args(args)
        .env_remove("XLB_SOCKET");
    let out = output_within(&mut cmd, Duration::from_secs(20));
    let mounted = fs::read(data.join("precious.txt")).is_err();
    if mounted {
        let _ = nix::mount::umount2(&data, nix::mount::MntFlags::MNT_DETACH);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("would hide") && !mounted,
        "expected a refusal and no mount (mounted: {mounted}): {}",
        describe(&args, &out)
    );
    assert_eq!(fs::read(data.join("precious.txt")).unwrap(), b"keep me");
    assert!(!common::xlb_attached(topo.lb(), &ifaces[0]));
}

/// A second agent on the same `--bpffs` used to adopt the running data path from under the
/// first. It must be refused, naming the first agent's pid; so must `xlb detach`.
#[test]
fn second_agent_on_the_same_pins_is_refused() {
    let dir = TempDir::new(SUITE, "second");
    let topo = topology(1);
    let ifaces = lb_ifaces(&topo);
    let pins = BpffsDir(bpffs_dir("second"));
    let first = Agent::start(topo.lb(), &ifaces, &dir, &pins.0, &[]);
    first.ok(&["vip", "add", "10.100.0.1:80/tcp"]);
    let other = TempDir::new(SUITE, "second-other");
    let out = refused(
        Some(topo.lb()),
        &[
            "run",
            "--iface",
            &ifaces[0],
            "--socket",
            s(&other.join("xlb.sock")),
            "--state",
            s(&other.join("state.json")),
            "--bpffs",
            s(&pins.0),
            "--no-metrics",
            "--ring-size",
            RING,
        ],
        "another xlb agent (pid ",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let pid: u32 = stderr
        .split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {stderr}"));
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "xlb", "pid {pid} is the first agent");
    refused(
        None,
        &[
            "detach",
            "--bpffs",
            s(&pins.0),
            "--socket",
            s(&other.join("xlb.sock")),
        ],
        "another xlb agent (pid ",
    );
    // The first agent still owns its data path.
    let list = first.ok(&["vip", "list"]);
    assert!(list.contains("10.100.0.1:80/tcp"), "{list}");
    assert!(common::xlb_attached(topo.lb(), &ifaces[0]));
}
