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
use common::{
    Agent, AgentBuilder, TempDir, WorldReadableCopy, XLB, describe, output_within, require_root,
};

const SUITE: &str = "hostile";

/// A small prime ring keeps map setup quick.
const RING: &str = "1009";

fn topology(backends: usize) -> Topology {
    require_root();
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

/// An agent in `ns` on `ifaces` with its socket and log in `dir`, pinning under `bpffs`, on
/// the small test ring.
fn agent_in<'a>(ns: &'a Netns, ifaces: &[String], dir: &TempDir, bpffs: &Path) -> AgentBuilder<'a> {
    Agent::in_ns(ns, SUITE)
        .ifaces(ifaces)
        .dir(&dir.0)
        .bpffs(bpffs)
        .args(["--ring-size", RING])
}

/// [`agent_in`] without metrics and with `extra` arguments, started.
fn start_agent<'a>(
    ns: &'a Netns,
    ifaces: &[String],
    dir: &TempDir,
    bpffs: &Path,
    extra: &[&str],
) -> Agent<'a> {
    agent_in(ns, ifaces, dir, bpffs)
        .arg("--no-metrics")
        .args(extra)
        .start()
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
    let mut agent = start_agent(topo.lb(), &ifaces, &dir, &pins.0, &["--keep-attached"]);
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
    let agent = start_agent(topo.lb(), &ifaces, &dir, &pins.0, &[]);
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
/// An interface that already runs another tool's XDP program: the agent says which program
/// and how to go on, in one line, instead of a bare "resource busy".
#[test]
fn another_xdp_program_on_the_interface_is_named() {
    let dir = TempDir::new(SUITE, "foreign-xdp");
    let topo = topology(0);
    let ifaces = lb_ifaces(&topo);
    let pins = BpffsDir(bpffs_dir("foreign-xdp"));
    let iface = ifaces[0].clone();
    // Another program on the interface: one of xlb's benchmark floors, under its own name.
    let foreign = topo
        .lb()
        .run(move || {
            let mut ebpf =
                aya::Ebpf::load(lb_userspace::datapath::XLB_OBJECT).expect("loading the object");
            let prog: &mut aya::programs::Xdp = ebpf
                .program_mut("xlb_floor_pass")
                .expect("the floor program")
                .try_into()
                .expect("an XDP program");
            prog.load().expect("loading the floor");
            let ifindex = nix::net::if_::if_nametoindex(iface.as_str()).expect("the interface");
            prog.attach(ifindex, aya::programs::XdpMode::Skb)
                .expect("attaching the floor");
            ebpf
        })
        .expect("the LB namespace");
    refused(
        Some(topo.lb()),
        &[
            "run",
            "--iface",
            &ifaces[0],
            "--xdp-mode",
            "skb",
            "--socket",
            s(&dir.join("xlb.sock")),
            "--state",
            s(&dir.join("state.json")),
            "--bpffs",
            s(&pins.0),
            "--no-metrics",
            "--ring-size",
            RING,
        ],
        "already runs the XDP program 'xlb_floor_pass'",
    );
    assert!(
        xlb_pins(&pins.0).is_empty(),
        "a refused start leaves no pins"
    );
    drop(foreign);
}

#[test]
fn second_agent_on_the_same_pins_is_refused() {
    let dir = TempDir::new(SUITE, "second");
    let topo = topology(1);
    let ifaces = lb_ifaces(&topo);
    let pins = BpffsDir(bpffs_dir("second"));
    let first = start_agent(topo.lb(), &ifaces, &dir, &pins.0, &[]);
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

/// The control socket used to be bound with the umask's permissions and chmod'ed to 0600
/// afterwards: under umask 000 anyone could connect in between. It must be 0600 from the
/// moment it appears, and an unprivileged user must not get through.
#[test]
fn control_socket_is_never_world_connectable() {
    use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
    let dir = TempDir::new(SUITE, "umask");
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755)).unwrap();
    let topo = topology(0);
    let ifaces = lb_ifaces(&topo);
    let pins = BpffsDir(bpffs_dir("umask"));
    let socket = dir.join("xlb.sock");
    let log = dir.join("agent.log");
    let mut cmd = common::agent_command(
        topo.lb().command(XLB),
        &ifaces,
        &socket,
        &dir.join("state.json"),
        &pins.0,
        &log,
    );
    cmd.args(["--ring-size", RING, "--no-metrics"]);
    // SAFETY: umask(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    // Every change to the socket's directory, to see how the socket got there and whether
    // its permissions changed after it appeared.
    let changes = Inotify::watch(&dir.0);
    let mut child = cmd.spawn().expect("spawning xlb run");
    // Watch for the socket as closely as a loop can: its first sighting must be 0600.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let first_mode = loop {
        if let Ok(m) = fs::symlink_metadata(&socket) {
            break m.permissions().mode() & 0o777;
        }
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "no socket appeared:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::hint::spin_loop();
    };
    let unprivileged = WorldReadableCopy::of_xlb(SUITE);
    let mut as_nobody = topo.lb().command("runuser");
    as_nobody
        .args(["-u", "nobody", "--"])
        .arg(&unprivileged.path)
        .args(["vip", "list", "--socket"])
        .arg(&socket)
        .current_dir("/");
    let out = output_within(&mut as_nobody, Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        first_mode, 0o600,
        "mode of the control socket when it appeared"
    );
    let events: Vec<u32> = changes
        .events()
        .into_iter()
        .filter(|(_, name)| name == "xlb.sock")
        .map(|(mask, _)| mask)
        .collect();
    assert!(!events.is_empty(), "no inotify event for the socket");
    assert!(
        events.iter().all(|mask| mask & libc::IN_ATTRIB == 0),
        "the socket's attributes changed after it appeared at its path (masks {events:x?})"
    );
    assert!(
        !out.status.success(),
        "nobody reached the agent: {}",
        describe(&["vip", "list"], &out)
    );
    // And is told why: permission, not a missing agent (issue 13).
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("not allowed to connect to the agent's socket"),
        "{}",
        describe(&["vip", "list"], &out)
    );
    // No private bind directory is left beside the socket.
    let leftovers: Vec<_> = fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bind"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// An inotify watch on a directory (creations, moves in, attribute changes).
struct Inotify(std::os::fd::OwnedFd);

impl Inotify {
    fn watch(dir: &Path) -> Self {
        use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
        // SAFETY: plain syscalls; the fd is owned from here on.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        let mask = libc::IN_CREATE | libc::IN_ATTRIB | libc::IN_MOVED_TO;
        // SAFETY: `path` is a valid C string and `fd` an inotify instance.
        let wd = unsafe {
            libc::inotify_add_watch(std::os::fd::AsRawFd::as_raw_fd(&fd), path.as_ptr(), mask)
        };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        Self(fd)
    }

    /// (mask, name) of the events so far.
    fn events(&self) -> Vec<(u32, String)> {
        let mut file = fs::File::from(self.0.try_clone().unwrap());
        let mut bytes = Vec::new();
        let mut buf = [0_u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut file, &mut buf) {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
        }
        let mut events = Vec::new();
        let mut at = 0;
        // struct inotify_event { int wd; u32 mask, cookie, len; char name[len]; }
        while at + 16 <= bytes.len() {
            let field =
                |i: usize| u32::from_ne_bytes(bytes[at + i..at + i + 4].try_into().unwrap());
            let (mask, len) = (field(4), field(12) as usize);
            let name = &bytes[at + 16..at + 16 + len];
            let name = String::from_utf8_lossy(name)
                .trim_end_matches('\0')
                .to_owned();
            events.push((mask, name));
            at += 16 + len;
        }
        events
    }
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// CPU time `pid` has used, in clock ticks (utime + stime from /proc/PID/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at "state".
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn connect(
    socket: &Path,
) -> (
    std::os::unix::net::UnixStream,
    std::io::BufReader<std::os::unix::net::UnixStream>,
) {
    let conn = std::os::unix::net::UnixStream::connect(socket).expect("connecting");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let reader = std::io::BufReader::new(conn.try_clone().unwrap());
    (conn, reader)
}

/// A control connection the agent is serving, proven by one answered request: it holds
/// one of the agent's connection slots. A slot can stay taken a moment after its client
/// closed (the start-up probe's, on a loaded machine), so a connection refused as one too
/// many is opened again, a bounded number of times.
fn served_connection(
    socket: &Path,
) -> (
    std::os::unix::net::UnixStream,
    std::io::BufReader<std::os::unix::net::UnixStream>,
) {
    use std::io::Write as _;
    for _ in 0..50 {
        let (mut conn, mut reader) = connect(socket);
        conn.write_all(b"{\"op\":\"vip_list\"}\n")
            .expect("sending a request");
        let reply = read_reply(&mut reader);
        if reply["kind"] != "error" {
            return (conn, reader);
        }
        assert!(
            reply["data"]
                .as_str()
                .is_some_and(|d| d.contains("control connections")),
            "{reply}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the agent kept refusing a control connection below its cap");
}

fn read_reply(reader: &mut impl std::io::BufRead) -> serde_json::Value {
    let mut line = String::new();
    reader.read_line(&mut line).expect("reading a reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply not JSON ({e}): {line:?}"))
}

/// A request line had no size limit (100 MB without a newline grew the agent by 100 MB),
/// and invalid UTF-8 closed the connection without a reply, losing the requests after it.
#[test]
fn control_lines_are_bounded_and_invalid_utf8_is_answered() {
    use std::io::Write as _;
    let dir = TempDir::new(SUITE, "lines");
    let topo = topology(0);
    let ifaces = lb_ifaces(&topo);
    let pins = BpffsDir(bpffs_dir("lines"));
    let agent = start_agent(topo.lb(), &ifaces, &dir, &pins.0, &[]);

    // Invalid UTF-8 pipelined with a good request: both answered, in order.
    let (mut conn, mut reader) = connect(&agent.socket);
    conn.write_all(b"{\"op\":\"vip_list\xff\"}\n{\"op\":\"vip_list\"}\n")
        .unwrap();
    let first = read_reply(&mut reader);
    assert_eq!(first["kind"], "error", "{first}");
    assert!(first["data"].as_str().unwrap().contains("UTF-8"), "{first}");
    let second = read_reply(&mut reader);
    assert_eq!(second["kind"], "vips", "{second}");

    // 100 MB without a newline: an error reply, the connection closed, memory bounded.
    let before = rss_kib(agent.process.pid());
    let (conn, mut reader) = connect(&agent.socket);
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        let mut conn = conn;
        for _ in 0..100 {
            if conn.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let reply = read_reply(&mut reader);
    assert_eq!(reply["kind"], "error", "{reply}");
    assert!(
        reply["data"].as_str().unwrap().contains("longer than"),
        "{reply}"
    );
    writer.join().unwrap();
    let grown = rss_kib(agent.process.pid()).saturating_sub(before);
    assert!(grown < 16 * 1024, "the agent grew by {grown} KiB");
    agent.ok(&["vip", "list"]);
}

/// Control connections were not capped. Beyond 64 open ones a client gets an error line and
/// is closed; once they go, the agent serves again.
#[test]
fn control_connections_are_capped() {
    let dir = TempDir::new(SUITE, "cap");
    let topo = topology(0);
    let ifaces = lb_ifaces(&topo);
    let pins = BpffsDir(bpffs_dir("cap"));
    let agent = start_agent(topo.lb(), &ifaces, &dir, &pins.0, &[]);
    let held: Vec<_> = (0..64).map(|_| served_connection(&agent.socket)).collect();
    let (_conn, mut reader) = connect(&agent.socket);
    let mut line = String::new();
    let read = std::io::BufRead::read_line(&mut reader, &mut line);
    assert!(
        read.is_ok()
            && line.contains("\"kind\":\"error\"")
            && line.contains("64 control connections"),
        "the 65th connection: {read:?} {line:?}"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    agent.ok(&["vip", "list"]);
}

/// Out of file descriptors, the accept loop used to spin at 100 % CPU and log ~140 MB in 5 s.
/// With the agent's fd limit lowered to what it has open plus a few, a burst of connections
/// must leave it mostly idle, with a short log, and serving again once they close.
#[test]
fn accept_errors_back_off() {
    let dir = TempDir::new(SUITE, "fds");
    let topo = topology(0);
    let ifaces = lb_ifaces(&topo);
    let pins = BpffsDir(bpffs_dir("fds"));
    let agent = start_agent(topo.lb(), &ifaces, &dir, &pins.0, &[]);
    let pid = agent.process.pid();

    let soft_limit = |value: &str| {
        let out = output_within(
            Command::new("prlimit")
                .arg(format!("--pid={pid}"))
                .arg(format!("--nofile={value}:")),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "{}",
            describe(&["prlimit", value], &out)
        );
    };
    let original = fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .expect("the agent's soft fd limit");
    let open_fds = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    soft_limit(&(open_fds + 4).to_string());
    let log_before = agent.process.log().len();
    let held: Vec<_> = (0..20)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&agent.socket).ok())
        .collect();
    let ticks_before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu_ticks(pid) - ticks_before;
    let log = agent.process.log();
    let log_growth = log.len().saturating_sub(log_before);
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
    assert!(
        ticks < hz * 3 / 10,
        "the agent used {ticks} ticks ({hz}/s) in 3 s while out of file descriptors"
    );
    assert!(
        log_growth < 16 * 1024,
        "the log grew by {log_growth} bytes in 3 s"
    );
    drop(held);
    soft_limit(&original);
    // Serving again after the back-off (at most 2 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = common::xlb(topo.lb(), &agent.socket, &["vip", "list"]);
        if out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            describe(&["vip", "list"], &out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET /metrics` on `addr` from inside `ns`: the status line, within `limit`.
fn scrape(ns: &Netns, addr: std::net::SocketAddr, limit: Duration) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    ns.run(move || {
        let mut conn = std::net::TcpStream::connect_timeout(&addr, limit)
            .map_err(|e| format!("connect: {e}"))?;
        conn.set_read_timeout(Some(limit)).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .map_err(|e| format!("write: {e}"))?;
        let mut text = String::new();
        conn.read_to_string(&mut text)
            .map_err(|e| format!("read: {e}"))?;
        Ok(text.lines().next().unwrap_or_default().to_owned())
    })
    .expect("namespace")
}

/// 64 idle connections to the metrics endpoint used to block a scrape for over 5 s, and a
/// scrape flood slowed the control socket. A scrape must be answered at once while idle
/// clients hold every slot, and control requests stay quick under a flood of scrapes.
#[test]
fn metrics_floods_do_not_block_scrapes_or_the_control_socket() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let dir = TempDir::new(SUITE, "metrics");
    let topo = topology(1);
    let ifaces = lb_ifaces(&topo);
    let pins = BpffsDir(bpffs_dir("metrics"));
    let port = 19_464;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let metrics_arg = addr.to_string();
    let agent = agent_in(topo.lb(), &ifaces, &dir, &pins.0)
        .args(["--metrics", &metrics_arg])
        .start();
    agent.ok(&["vip", "add", "10.100.0.1:80/tcp"]);
    agent.ok(&["backend", "add", "10.100.0.1:80/tcp", "10.11.0.2:8080"]);
    assert_eq!(
        scrape(topo.lb(), addr, Duration::from_secs(5)).as_deref(),
        Ok("HTTP/1.1 200 OK")
    );

    let idle: Vec<std::net::TcpStream> = topo
        .lb()
        .run(move || {
            (0..72)
                .filter_map(|_| std::net::TcpStream::connect(addr).ok())
                .collect()
        })
        .unwrap();
    assert_eq!(idle.len(), 72);
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let status = scrape(topo.lb(), addr, Duration::from_secs(8));
    assert_eq!(
        status.as_deref(),
        Ok("HTTP/1.1 200 OK"),
        "scrape with 72 idle clients"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a scrape took {} ms while idle clients were connected",
        started.elapsed().as_millis()
    );
    drop(idle);

    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..8)
        .map(|_| {
            let stop = Arc::clone(&stop);
            topo.lb()
                .spawn(move || {
                    let deadline = std::time::Instant::now() + Duration::from_secs(20);
                    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                        if let Ok(mut conn) = std::net::TcpStream::connect(addr) {
                            use std::io::{Read as _, Write as _};
                            let _ = conn.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
                            let _ = conn.read_to_end(&mut Vec::new());
                        }
                    }
                })
                .unwrap()
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let (mut conn, mut reader) = connect(&agent.socket);
        let started = std::time::Instant::now();
        std::io::Write::write_all(&mut conn, b"{\"op\":\"stats\"}\n").unwrap();
        let reply = read_reply(&mut reader);
        slowest = slowest.max(started.elapsed());
        assert_eq!(reply["kind"], "stats", "{reply}");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a stats request took {} ms during a scrape flood",
        slowest.as_millis()
    );
}

/// `--container --latest` reached `podman inspect` as an option and resolved an unrelated
/// container. Names must follow podman's rule; the CLI refuses others before anything runs,
/// and leaves resolving valid ones to the agent (which passes them after `--`). A fake
/// `podman` on PATH records whether it is called.
#[test]
fn container_names_are_never_options() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new(SUITE, "container");
    let calls = dir.join("calls");
    let fake = dir.join("podman");
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\necho '10.11.0.2 '\n",
            calls.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.0.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let socket = dir.join("nobody-here.sock");
    let run = |container: &str| {
        let mut cmd = Command::new(XLB);
        cmd.args(["backend", "add", "10.100.0.1:80/tcp"])
            .arg(format!("--container={container}"))
            .arg("--socket")
            .arg(&socket)
            .env("PATH", &path)
            .env_remove("XLB_SOCKET");
        output_within(&mut cmd, Duration::from_secs(20))
    };
    for bad in ["--latest", "-l", ".x", "a b", "a/b"] {
        let out = run(&format!("{bad}:8080"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("is not a valid container name"),
            "{bad}: {}",
            describe(&["backend", "add", "--container", bad], &out)
        );
    }
    assert!(
        !calls.exists(),
        "podman ran for an invalid name: {:?}",
        fs::read_to_string(&calls)
    );
    // A valid name goes to the agent, which resolves it: here the missing agent is reported,
    // and the CLI itself never ran podman.
    let out = run("web-1.blue_2:8080");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no xlb agent"),
        "{}",
        describe(
            &["backend", "add", "--container", "web-1.blue_2:8080"],
            &out
        )
    );
    assert!(
        !calls.exists(),
        "the CLI ran podman itself: {:?}",
        fs::read_to_string(&calls)
    );
}

/// A TCP server on `0.0.0.0:port` in `ns` that greets each connection with `greeting` (or,
/// while `stalled` is set, accepts and never answers, like a stopped process), until dropped.
struct Server {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(
        ns: &Netns,
        port: u16,
        greeting: &'static str,
        stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        use std::{io::Write as _, sync::atomic::Ordering};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = std::sync::Arc::clone(&stop);
        let thread = ns
            .spawn(move || {
                let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind");
                listener.set_nonblocking(true).unwrap();
                ready_tx.send(()).unwrap();
                let mut stalled_conns = Vec::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(120);
                while !flag.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                    match listener.accept() {
                        Ok((mut conn, _)) if !stalled.load(Ordering::Relaxed) => {
                            let _ = conn.write_all(greeting.as_bytes());
                        }
                        Ok((conn, _)) => stalled_conns.push(conn),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
            .expect("server thread");
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server ready");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a connection from the client to `addr` reads, within a second.
fn ask(topo: &Topology, addr: std::net::SocketAddr) -> Result<String, String> {
    use std::io::Read as _;
    topo.client()
        .run(move || {
            let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .map_err(|e| format!("connect: {e}"))?;
            conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut text = String::new();
            conn.read_to_string(&mut text)
                .map_err(|e| format!("read: {e}"))?;
            Ok(text)
        })
        .expect("client namespace")
}

/// An HTTP health check on a backend that stops answering (accepts, never replies, like a
/// SIGSTOPped server) must fail on time: the backend leaves the ring within interval × fall
/// plus the timeout, and new connections through the VIP work again.
#[test]
fn stalled_backends_fail_their_health_checks_on_time() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let dir = TempDir::new(SUITE, "stall");
    let topo = topology(2);
    let ifaces = lb_ifaces(&topo);
    let pins = BpffsDir(bpffs_dir("stall"));
    let stalled = Arc::new(AtomicBool::new(false));
    let ok_reply = "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
    let _b0 = Server::start(topo.backend(0), 8080, ok_reply, Default::default());
    let _b1 = Server::start(topo.backend(1), 8080, ok_reply, Arc::clone(&stalled));
    let agent = start_agent(topo.lb(), &ifaces, &dir, &pins.0, &[]);
    let (interval_ms, timeout_ms, fall) = (200_u64, 100_u64, 2_u64);
    agent.ok(&[
        "vip",
        "add",
        "10.100.0.1:80/tcp",
        "--health",
        "http",
        "--health-path",
        "/",
        "--health-interval-ms",
        &interval_ms.to_string(),
        "--health-timeout-ms",
        &timeout_ms.to_string(),
        "--health-fall",
        &fall.to_string(),
        "--health-rise",
        "1",
    ]);
    for b in ["10.11.0.2:8080", "10.11.1.2:8080"] {
        agent.ok(&["backend", "add", "10.100.0.1:80/tcp", b]);
    }
    let healthy = |addr: &str| -> Option<bool> {
        let list: serde_json::Value =
            serde_json::from_str(&agent.ok(&["backend", "list", "10.100.0.1:80/tcp", "--json"]))
                .unwrap();
        list["backends"]
            .as_array()?
            .iter()
            .find(|b| b["addr"] == addr)?
            .get("health")?
            .get("healthy")?
            .as_bool()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while healthy("10.11.1.2:8080") != Some(true) {
        assert!(
            std::time::Instant::now() < deadline,
            "b1 never checked healthy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stalled.store(true, Ordering::Relaxed);
    let stalled_at = std::time::Instant::now();
    let limit = Duration::from_millis(interval_ms * fall + timeout_ms + 700);
    while healthy("10.11.1.2:8080") != Some(false) {
        assert!(
            stalled_at.elapsed() < limit,
            "b1 still counted healthy {} ms after it stopped answering:\n{}",
            stalled_at.elapsed().as_millis(),
            agent.ok(&["backend", "list", "10.100.0.1:80/tcp"])
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let vip: std::net::SocketAddr = "10.100.0.1:80".parse().unwrap();
    for _ in 0..20 {
        let reply = ask(&topo, vip);
        assert!(
            reply
                .as_deref()
                .is_ok_and(|r| r.starts_with("HTTP/1.0 200")),
            "a new connection failed after b1 left the ring: {reply:?}"
        );
    }
}

/// A refused start used to leave its pinned maps (and links) behind, for the next start to
/// adopt with whatever they held; a FIFO as the state file hung the start. A state path that
/// is not a regular file is refused at once, and a refused start removes what it created but
/// keeps a data path it adopted.
#[test]
fn refused_starts_leave_nothing_behind() {
    let dir = TempDir::new(SUITE, "refused");
    let topo = topology(0);
    let ifaces = lb_ifaces(&topo);
    let pins = BpffsDir(bpffs_dir("refused"));
    let run_args = |socket: &Path, state: &Path| -> Vec<String> {
        [
            "run",
            "--iface",
            &ifaces[0],
            "--socket",
            s(socket),
            "--state",
            s(state),
            "--bpffs",
            s(&pins.0),
            "--no-metrics",
            "--ring-size",
            RING,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let refused_run = |args: &[String], needle: &str| {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(Some(topo.lb()), &argv, needle);
    };

    let fifo = dir.join("state.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    refused_run(&run_args(&dir.join("a.sock"), &fifo), "not a regular file");
    assert_eq!(xlb_pins(&pins.0), Vec::<String>::new());

    // Refused after loading and attaching: its socket's directory cannot be created.
    let unreachable = Path::new("/proc")
        .join(common::unique(SUITE, "nodir"))
        .join("xlb.sock");
    let state = dir.join("state.json");
    refused_run(&run_args(&unreachable, &state), "creating /proc/");
    assert_eq!(
        xlb_pins(&pins.0),
        Vec::<String>::new(),
        "pins of a refused start"
    );
    assert!(!common::xlb_attached(topo.lb(), &ifaces[0]));

    // A data path a previous agent kept: a refused start leaves it as it was.
    {
        let mut kept = start_agent(topo.lb(), &ifaces, &dir, &pins.0, &["--keep-attached"]);
        kept.ok(&["vip", "add", "10.100.0.1:80/tcp"]);
        kept.process.stop();
    }
    let mut before = xlb_pins(&pins.0);
    before.sort();
    assert!(!before.is_empty());
    refused_run(
        &run_args(&unreachable, &dir.join("state.json")),
        "creating /proc/",
    );
    let mut after = xlb_pins(&pins.0);
    after.sort();
    assert_eq!(
        after, before,
        "a refused start keeps the data path it adopted"
    );
    assert!(common::xlb_attached(topo.lb(), &ifaces[0]));
    let agent = start_agent(topo.lb(), &ifaces, &dir, &pins.0, &[]);
    assert!(agent.ok(&["vip", "list"]).contains("10.100.0.1:80/tcp"));
}

/// An interface deleted and re-created under the same name (a container restart) used to
/// stay unattached: replies from behind it bypassed xlb. Traffic through the VIP must work
/// again within a few seconds.
#[test]
fn recreated_interfaces_are_reattached() {
    let dir = TempDir::new(SUITE, "relink");
    let topo = topology(1);
    let ifaces = lb_ifaces(&topo);
    let pins = BpffsDir(bpffs_dir("relink"));
    let _server = Server::start(topo.backend(0), 8080, "b0\n", Default::default());
    let agent = start_agent(topo.lb(), &ifaces, &dir, &pins.0, &[]);
    agent.ok(&["vip", "add", "10.100.0.1:80/tcp"]);
    agent.ok(&["backend", "add", "10.100.0.1:80/tcp", "10.11.0.2:8080"]);
    let vip: std::net::SocketAddr = "10.100.0.1:80".parse().unwrap();
    assert_eq!(ask(&topo, vip).as_deref(), Ok("b0\n"));

    // The container restarts: its veth goes, a new one with the same names comes.
    let lb_end = &ifaces[1];
    let backend_end = &topo.backend_links[0].b.ifname;
    let old_index = topo.lb().ifindex(lb_end).unwrap();
    topo.lb().delete_link(lb_end).unwrap();
    topo.lb()
        .add_veth(lb_end, topo.backend(0), backend_end)
        .unwrap();
    let lb_addr: std::net::Ipv4Addr = "10.11.0.1".parse().unwrap();
    topo.lb()
        .add_address(lb_end, ipnet_v4(lb_addr, 24))
        .unwrap();
    topo.backend(0)
        .add_address(backend_end, ipnet_v4("10.11.0.2".parse().unwrap(), 24))
        .unwrap();
    topo.lb().set_link_up(lb_end).unwrap();
    topo.backend(0).set_link_up(backend_end).unwrap();
    topo.backend(0).add_default_route(lb_addr.into()).unwrap();
    assert_ne!(topo.lb().ifindex(lb_end).unwrap(), old_index);

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last;
    loop {
        last = ask(&topo, vip);
        if last.as_deref() == Ok("b0\n") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no traffic through the VIP 10 s after the re-creation: {last:?}\n{}",
            agent.process.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(common::xlb_attached(topo.lb(), lb_end));
    assert!(
        agent.process.log().contains("re-attached"),
        "{}",
        agent.process.log()
    );
}

fn ipnet_v4(addr: std::net::Ipv4Addr, prefix: u8) -> xlb_netns::ipnet::Ipv4Net {
    xlb_netns::ipnet::Ipv4Net::new(addr, prefix).unwrap()
}

/// An engine that is down (here a `podman` whose event stream fails at once, as without its
/// socket) is reported in one clear line, retried with growing pauses, and the container
/// backends stay as they are meanwhile.
#[test]
fn an_engine_that_is_down_keeps_container_backends_and_is_retried() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new(SUITE, "engine-down");
    let topo = topology(1);
    let ifaces = lb_ifaces(&topo);
    let backend_ip = topo.backend_links[0].b.ip4();
    let fake = dir.join("podman");
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n\
             inspect) echo '[{{\"Name\":\"web-1\",\"State\":{{\"Running\":true}},\
             \"NetworkSettings\":{{\"Networks\":{{\"n\":{{\"IPAddress\":\"{backend_ip}\"}}}}}}}}]' ;;\n\
             events) echo 'Error: unable to connect to Podman socket: no such file' >&2; exit 125 ;;\n\
             *) exit 1 ;;\nesac\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let pins = BpffsDir(bpffs_dir("engine-down"));
    let path = format!(
        "{}:{}",
        dir.0.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let agent = agent_in(topo.lb(), &ifaces, &dir, &pins.0)
        .arg("--no-metrics")
        .env("PATH", &path)
        .start();
    agent.ok(&["vip", "add", "10.100.0.1:80/tcp"]);
    let said = agent.ok(&[
        "backend",
        "add",
        "10.100.0.1:80/tcp",
        "--container",
        "web-1:8080",
    ]);
    assert!(
        said.contains(&format!("added backend {backend_ip}:8080 (container web-1")),
        "{said}"
    );
    // Retried after 1 s, then 2 s: the third report comes about 3 s after the first.
    let started = std::time::Instant::now();
    while !agent.process.log().contains("retrying in 4 s") {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no back-off in the log:\n{}",
            agent.process.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = agent.process.log();
    for wait in [1, 2, 4] {
        let line = format!(
            "container engine podman: `podman events` exited (exit status: 125): Error: unable \
             to connect to Podman socket: no such file; container backends are kept as they \
             are; retrying in {wait} s"
        );
        assert_eq!(
            log.matches(&line).count(),
            1,
            "{line:?} not once in:\n{log}"
        );
    }
    let listed = agent.ok(&["backend", "list", "10.100.0.1:80/tcp", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let b = &status["backends"][0];
    assert_eq!(b["container"], "web-1", "{status}");
    assert_eq!(b["container_running"], true, "{status}");
    assert!(b["slots"].as_u64().unwrap() > 0, "{status}");
}
