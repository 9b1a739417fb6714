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

use lb_userspace::api::Stats;
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

/// Fails the calling test unless it runs as root. Root-only tests call it first, so that
/// elsewhere they fail with this message instead of an obscure one (and never pass).
#[allow(dead_code)]
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it creates network namespaces and loads eBPF programs): run \
         the suite as root with the README's test command, `./x test`"
    );
}

/// A per-test directory under the system temp dir, removed on drop.
#[allow(dead_code)]
pub struct TempDir(pub PathBuf);

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

/// A copy of the `xlb` binary in a fresh directory under the system temp dir, both
/// world-readable and the copy executable: for running it as an unprivileged user, who may
/// not be able to enter the checkout. Removed on drop.
#[allow(dead_code)]
pub struct WorldReadableCopy {
    /// Holds the copy; removing it is all it is kept for.
    _dir: TempDir,
    pub path: PathBuf,
}

#[allow(dead_code)]
impl WorldReadableCopy {
    /// Copies the build's `xlb`, in a temp dir named after `suite`.
    pub fn of_xlb(suite: &str) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = TempDir::new(suite, "bin");
        let path = dir.join("xlb");
        copy_executable(Path::new(XLB), &path);
        for p in [&dir.0, &path] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755))
                .unwrap_or_else(|e| panic!("chmod 755 {}: {e}", p.display()));
        }
        // Every ancestor of the temp dir must be enterable too, or the copy is as far out of
        // reach as the original.
        for ancestor in dir.0.ancestors().skip(1) {
            let mode = fs::metadata(ancestor)
                .unwrap_or_else(|e| panic!("stat {}: {e}", ancestor.display()))
                .permissions()
                .mode();
            assert!(
                mode & 0o001 != 0,
                "{} (mode {mode:o}) is not enterable by other users: point TMPDIR elsewhere",
                ancestor.display()
            );
        }
        Self { _dir: dir, path }
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

/// Spawns `cmd`, retrying while the kernel says its program is being written ("text file
/// busy"). A binary a test has just copied can be held open for writing for a moment by a
/// child another test thread forked meanwhile (the descriptor is only closed at that child's
/// exec); the copy itself is complete.
pub fn spawn(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let mut attempts = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && attempts < 100 => {
                attempts += 1;
                thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// Copies an executable to `to` by a `cp` child, never through a descriptor of this process:
/// a test thread forking meanwhile would inherit that write descriptor until its child's
/// exec, and running the copy would fail with "text file busy".
#[allow(dead_code)]
pub fn copy_executable(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg(from)
        .arg(to)
        .status()
        .unwrap_or_else(|e| panic!("running cp: {e}"));
    assert!(
        status.success(),
        "cp {} {}: {status}",
        from.display(),
        to.display()
    );
}

/// `cmd` with its output captured, killed if it runs longer than `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(cmd).unwrap_or_else(|e| panic!("spawning {what}: {e}"));
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
    xlb_in(Some(ns), socket, args)
}

/// [`xlb`] in `ns`, or in the host's namespace for `None`.
pub fn xlb_in(ns: Option<&Netns>, socket: &Path, args: &[&str]) -> Output {
    let mut cmd = xlb_command(ns);
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
fn signal(child: &mut Child, signal: libc::c_int) {
    if matches!(child.try_wait(), Ok(None)) {
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, signal) };
    }
}

/// SIGTERM, then waits up to `limit` for the exit; `None` if the child is still running.
fn terminate(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
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

/// How long an agent gets to exit after SIGTERM before it is killed (or, for
/// [`AgentProcess::stop`], the test fails).
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// A spawned `xlb run` and its log file; SIGTERM (then SIGKILL) when dropped.
pub struct AgentProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl AgentProcess {
    /// Spawns `cmd` (see [`agent_command`]; it logs to `log`) and polls `probe` every `poll`
    /// until it says the agent answers; panics with the log if the agent exits first or
    /// `limit` passes.
    pub fn start(
        mut cmd: Command,
        log: PathBuf,
        limit: Duration,
        poll: Duration,
        mut probe: impl FnMut() -> Result<(), String>,
    ) -> Self {
        let child = cmd.spawn().expect("spawning `xlb run`");
        let mut agent = Self {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = agent.child_mut().try_wait().expect("polling the agent") {
                panic!("xlb run exited early ({status}):\n{}", agent.log());
            }
            let complaint = match probe() {
                Ok(()) => return agent,
                Err(complaint) => complaint,
            };
            assert!(
                Instant::now() < deadline,
                "xlb run did not answer within {} s: {complaint}\nagent log:\n{}",
                limit.as_secs(),
                agent.log()
            );
            thread::sleep(poll);
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("agent already stopped")
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Its process id, while it runs.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent already stopped").id()
    }

    /// Whether it has been neither stopped nor terminated yet.
    #[allow(dead_code)]
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    #[allow(dead_code)]
    pub fn signal(&mut self, signal: libc::c_int) {
        self::signal(self.child_mut(), signal);
    }

    /// SIGTERM, then waits (bounded) for the exit; panics (after SIGKILL) if it does not come.
    #[allow(dead_code)]
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        terminate(&mut child, STOP_LIMIT).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "xlb run ignored SIGTERM for {} s:\n{}",
                STOP_LIMIT.as_secs(),
                self.log()
            );
        })
    }

    /// SIGTERM, then SIGKILL if that did not end it in time; a no-op once stopped.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take()
            && terminate(&mut child, STOP_LIMIT).is_none()
        {
            eprintln!(
                "xlb agent ignored SIGTERM for {} s; killing it",
                STOP_LIMIT.as_secs()
            );
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.terminate();
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

/// Whether a server should keep going: neither stopped nor past its lifetime. Handed to
/// every connection handler so that no server thread outlives its test.
pub struct Liveness {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    deadline: Instant,
}

#[allow(dead_code)]
impl Liveness {
    pub fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }
}

/// A server's thread and its stop flag: [`ServerThread::stop`] (or drop) raises the flag and
/// joins the thread, which polls its [`Liveness`].
struct ServerThread {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Runs `body` on a thread of its own until it returns; it should return once its
    /// [`Liveness`] says so, at the latest after `lifetime`.
    fn spawn(lifetime: Duration, body: impl FnOnce(Liveness) + Send + 'static) -> Self {
        use std::sync::{Arc, atomic::AtomicBool};
        let stop = Arc::new(AtomicBool::new(false));
        let liveness = Liveness {
            stop: Arc::clone(&stop),
            deadline: Instant::now() + lifetime,
        };
        Self {
            stop,
            thread: Some(thread::spawn(move || body(liveness))),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long a backend server lives at most, whatever its test does.
const BACKEND_LIFETIME: Duration = Duration::from_secs(300);

/// A TCP server in a namespace: each connection goes to a handler on a thread of its own.
/// It stops by itself after its lifetime; [`TcpServer::stop`] (or drop) closes the listener
/// and joins every connection thread.
#[allow(dead_code)]
pub struct TcpServer(ServerThread);

#[allow(dead_code)]
impl TcpServer {
    /// On `[::]:port` (dual-stack), `serve` per connection.
    pub fn start(
        ns: &Netns,
        port: u16,
        lifetime: Duration,
        serve: fn(std::net::TcpStream) -> std::io::Result<()>,
    ) -> Self {
        let any = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port);
        Self::listen(ns, any, lifetime, move |conn, _| {
            if let Err(e) = serve(conn) {
                eprintln!("server connection: {e}");
            }
        })
    }

    /// On `addr` in `ns`; `serve` gets each connection (blocking) and the server's
    /// [`Liveness`], which it polls to stop in time.
    pub fn listen(
        ns: &Netns,
        addr: SocketAddr,
        lifetime: Duration,
        serve: impl Fn(std::net::TcpStream, &Liveness) + Send + Sync + 'static,
    ) -> Self {
        use std::sync::Arc;
        // std sets SO_REUSEADDR, so the port can be bound again right after a stop.
        let listener = ns
            .run(move || std::net::TcpListener::bind(addr))
            .expect("entering the server's namespace")
            .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let serve = Arc::new(serve);
        Self(ServerThread::spawn(lifetime, move |liveness| {
            let liveness = Arc::new(liveness);
            let mut conns: Vec<thread::JoinHandle<()>> = Vec::new();
            while liveness.running() {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (serve, liveness) = (Arc::clone(&serve), Arc::clone(&liveness));
                        conns.push(thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            serve(conn, &liveness);
                        }));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => {
                        eprintln!("server accept on {addr}: {e}");
                        thread::sleep(Duration::from_millis(10));
                    }
                }
                // Join finished connections as we go: a long test makes many.
                let (done, live): (Vec<_>, Vec<_>) =
                    conns.into_iter().partition(thread::JoinHandle::is_finished);
                for c in done {
                    let _ = c.join();
                }
                conns = live;
            }
            drop(listener);
            for c in conns {
                let _ = c.join();
            }
        }))
    }

    /// Closes the listener (new connections are refused) and ends every connection.
    pub fn stop(&mut self) {
        self.0.stop();
    }
}

/// A UDP socket in a namespace whose datagrams go to `answer`; what it returns is sent back
/// to the sender. Stops by itself after its lifetime; stopping (or drop) closes the socket,
/// so datagrams to the port draw ICMP port-unreachable from then on.
#[allow(dead_code)]
pub struct UdpServer(ServerThread);

#[allow(dead_code)]
impl UdpServer {
    pub fn listen(
        ns: &Netns,
        addr: SocketAddr,
        lifetime: Duration,
        answer: impl Fn(&[u8], SocketAddr) -> Option<Vec<u8>> + Send + 'static,
    ) -> Self {
        let socket = ns
            .run(move || std::net::UdpSocket::bind(addr))
            .expect("entering the server's namespace")
            .unwrap_or_else(|e| panic!("binding udp {addr}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
        Self(ServerThread::spawn(lifetime, move |liveness| {
            let mut buf = [0_u8; 2048];
            while liveness.running() {
                if let Ok((len, from)) = socket.recv_from(&mut buf)
                    && let Some(reply) = answer(&buf[..len], from)
                    && let Err(e) = socket.send_to(&reply, from)
                {
                    eprintln!("udp reply from {addr} to {from}: {e}");
                }
            }
        }))
    }

    /// Closes the socket and waits until it is gone.
    pub fn stop(&mut self) {
        self.0.stop();
    }
}

/// How a backend's server answers. Every answer carries the backend's name, so a test can
/// tell where the balancer sent a connection or datagram.
#[allow(dead_code)]
#[derive(Clone)]
pub enum Reply {
    /// TCP: writes `NAME` and closes. UDP: answers every datagram with `NAME`.
    Name,
    /// TCP: greets with `NAME\n`, then answers every line `L` with `NAME L`. UDP: answers
    /// every datagram `D` with `NAME D`.
    NamedEcho,
    /// TCP: greets with `NAME\n`, then echoes every byte back as it comes.
    GreetThenEcho,
    /// Answers every line (TCP) or datagram (UDP) with `NAME CLIENT\n`, the client address
    /// the backend saw.
    NameAndClient,
    /// HTTP/1.0 for health checks (TCP): `GET /healthz` gets the status in the cell, any
    /// other path 200 with `NAME\n` as the body.
    Http(std::sync::Arc<std::sync::atomic::AtomicU16>),
    /// UDP: takes datagrams and never answers.
    Silent,
}

/// `NAME CLIENT\n`, with an IPv4 client seen on a dual-stack socket written as IPv4.
#[allow(dead_code)]
pub fn name_and_client(name: &str, client: SocketAddr) -> String {
    format!("{name} {}\n", client.ip().to_canonical())
}

/// A backend's TCP or UDP server on one address, answering as its [`Reply`] says; it can be
/// stopped and started again on the same address. Stopped and joined on drop.
#[allow(dead_code)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    reply: Reply,
    udp: bool,
    tcp_server: Option<TcpServer>,
    udp_server: Option<UdpServer>,
}

#[allow(dead_code)]
impl Backend {
    /// A TCP server named `name` on `addr` in `ns`.
    pub fn tcp(ns: &Netns, name: &str, addr: SocketAddr, reply: Reply) -> Self {
        let mut backend = Self::new(name, addr, reply, false);
        backend.restart(ns);
        backend
    }

    /// A UDP server named `name` on `addr` in `ns`.
    pub fn udp(ns: &Netns, name: &str, addr: SocketAddr, reply: Reply) -> Self {
        let mut backend = Self::new(name, addr, reply, true);
        backend.restart(ns);
        backend
    }

    fn new(name: &str, addr: SocketAddr, reply: Reply, udp: bool) -> Self {
        Self {
            name: name.to_owned(),
            addr,
            reply,
            udp,
            tcp_server: None,
            udp_server: None,
        }
    }

    /// Closes the socket (TCP: refusing new connections, ending open ones) and waits until
    /// it is gone.
    pub fn stop(&mut self) {
        self.tcp_server = None;
        self.udp_server = None;
    }

    /// Starts a stopped server again on the same address, in `ns`.
    pub fn restart(&mut self, ns: &Netns) {
        assert!(
            self.tcp_server.is_none() && self.udp_server.is_none(),
            "restart a stopped server"
        );
        let (name, reply) = (self.name.clone(), self.reply.clone());
        if self.udp {
            self.udp_server = Some(UdpServer::listen(
                ns,
                self.addr,
                BACKEND_LIFETIME,
                move |datagram, from| answer_udp(&name, &reply, datagram, from),
            ));
        } else {
            self.tcp_server = Some(TcpServer::listen(
                ns,
                self.addr,
                BACKEND_LIFETIME,
                move |conn, liveness| serve_tcp(conn, &name, &reply, liveness),
            ));
        }
    }
}

fn answer_udp(name: &str, reply: &Reply, datagram: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    match reply {
        Reply::Name => Some(name.as_bytes().to_vec()),
        Reply::NamedEcho => {
            let mut answer = format!("{name} ").into_bytes();
            answer.extend_from_slice(datagram);
            Some(answer)
        }
        Reply::NameAndClient => Some(name_and_client(name, from).into_bytes()),
        Reply::GreetThenEcho | Reply::Http(_) | Reply::Silent => None,
    }
}

fn serve_tcp(mut conn: std::net::TcpStream, name: &str, reply: &Reply, liveness: &Liveness) {
    use std::io::{ErrorKind, Write as _};
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(3)));
    let peer = match conn.peer_addr() {
        Ok(peer) => peer,
        Err(_) => return,
    };
    match reply {
        Reply::Name => {
            let _ = conn.write_all(name.as_bytes());
            return;
        }
        Reply::NamedEcho | Reply::GreetThenEcho
            if conn.write_all(format!("{name}\n").as_bytes()).is_err() =>
        {
            return;
        }
        _ => {}
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while liveness.running() {
        match conn.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) if matches!(reply, Reply::GreetThenEcho) => {
                if conn.write_all(&chunk[..n]).is_err() {
                    return;
                }
                continue;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        if let Reply::Http(status) = reply {
            if !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                continue;
            }
            let head = String::from_utf8_lossy(&buf);
            let path = head.split(' ').nth(1).unwrap_or("/");
            let code = if path == "/healthz" {
                status.load(Ordering::Relaxed)
            } else {
                200
            };
            let body = format!("{name}\n");
            let _ = conn.write_all(
                format!(
                    "HTTP/1.0 {code} X\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            return;
        }
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let answer = match reply {
                Reply::NameAndClient => name_and_client(name, peer).into_bytes(),
                _ => {
                    let mut answer = format!("{name} ").into_bytes();
                    answer.extend_from_slice(&line);
                    answer
                }
            };
            if conn.write_all(&answer).is_err() {
                return;
            }
        }
    }
}

/// Where the `xlb` binary runs: in a namespace the test created, or in the host's (the
/// podman tests, whose containers sit on the host's bridge).
#[allow(dead_code)]
pub fn xlb_command(ns: Option<&Netns>) -> Command {
    ns.map_or_else(|| Command::new(XLB), |ns| ns.command(XLB))
}

/// How long a starting agent gets to answer on its control socket.
const START_LIMIT: Duration = Duration::from_secs(15);

/// The one way the tests start `xlb run`: [`Agent::in_ns`] or [`Agent::on_host`], then the
/// options that differ from the defaults, then [`AgentBuilder::start`].
///
/// Defaults: a temp dir of its own (named after the suite) for the socket, state file and log;
/// a bpffs directory of its own; info logging. Whatever the builder creates is removed when
/// the [`Agent`] is dropped; paths the test passes in stay the test's.
#[must_use = "an agent starts only with `start()`"]
pub struct AgentBuilder<'n> {
    ns: Option<&'n Netns>,
    suite: String,
    ifaces: Vec<std::ffi::OsString>,
    dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    state: Option<PathBuf>,
    bpffs: Option<PathBuf>,
    args: Vec<std::ffi::OsString>,
    envs: Vec<(String, String)>,
    start_limit: Duration,
    dies_with_test: bool,
}

#[allow(dead_code)]
impl<'n> AgentBuilder<'n> {
    /// Attaches to `iface` (repeatable).
    pub fn iface(mut self, iface: impl AsRef<OsStr>) -> Self {
        self.ifaces.push(iface.as_ref().to_owned());
        self
    }

    pub fn ifaces<S: AsRef<OsStr>>(mut self, ifaces: impl IntoIterator<Item = S>) -> Self {
        self.ifaces
            .extend(ifaces.into_iter().map(|i| i.as_ref().to_owned()));
        self
    }

    /// The test's own directory for the socket, state file and logs (several agents in turn
    /// may share it, e.g. to restart on the same state); not removed on drop.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_owned());
        self
    }

    pub fn socket(mut self, socket: &Path) -> Self {
        self.socket = Some(socket.to_owned());
        self
    }

    pub fn state(mut self, state: &Path) -> Self {
        self.state = Some(state.to_owned());
        self
    }

    /// Pins maps under the test's `bpffs` directory, which the test then cleans up.
    pub fn bpffs(mut self, bpffs: &Path) -> Self {
        self.bpffs = Some(bpffs.to_owned());
        self
    }

    /// `--config FILE`.
    pub fn config(self, file: &Path) -> Self {
        self.arg("--config").arg(file)
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// How long it may take until the control socket answers (15 s unless set).
    pub fn start_limit(mut self, limit: Duration) -> Self {
        self.start_limit = limit;
        self
    }

    /// SIGTERM to the agent if the test process dies, e.g. an agent attached to host
    /// interfaces, which no namespace teardown would detach.
    pub fn dies_with_test(mut self) -> Self {
        self.dies_with_test = true;
        self
    }

    /// Spawns the agent and waits (bounded) until `vip list` through its socket succeeds;
    /// panics with its log if it exits first or does not answer in time.
    pub fn start(self) -> Agent<'n> {
        require_root();
        let mut owned = Vec::new();
        let dir = self.dir.unwrap_or_else(|| {
            let dir = std::env::temp_dir().join(unique(&self.suite, "agent"));
            fs::create_dir_all(&dir).expect("creating the agent's temp dir");
            owned.push(dir.clone());
            dir
        });
        let bpffs = self.bpffs.unwrap_or_else(|| {
            let pins = Path::new("/sys/fs/bpf").join(unique(&self.suite, "pins"));
            owned.push(pins.clone());
            pins
        });
        let socket = self.socket.unwrap_or_else(|| dir.join("xlb.sock"));
        let state = self.state.unwrap_or_else(|| dir.join("state.json"));
        let log = dir.join(format!("agent-{}.log", seq()));
        let mut cmd = agent_command(
            xlb_command(self.ns),
            &self.ifaces,
            &socket,
            &state,
            &bpffs,
            &log,
        );
        cmd.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env_remove("XLB_SOCKET");
        if self.dies_with_test {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: prctl is async-signal-safe and touches no memory of ours.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let ns = self.ns;
        let probe_socket = socket.clone();
        let process = AgentProcess::start(
            cmd,
            log,
            self.start_limit,
            Duration::from_millis(25),
            vip_list_probe(move |args| xlb_in(ns, &probe_socket, args)),
        );
        Agent {
            ns,
            process,
            socket,
            state,
            bpffs,
            owned,
        }
    }
}

/// The bpffs directory of agents run with `--keep-attached`. On drop, `xlb detach`
/// (bounded) takes down what the last of them left attached, and the directory is removed.
/// Declare it before the agents: locals drop in reverse order, and `detach` refuses while an
/// agent answers on the socket.
#[allow(dead_code)]
pub struct KeptPins<'n> {
    ns: &'n Netns,
    pub dir: PathBuf,
    /// The agents' control socket, which `detach` checks.
    pub socket: PathBuf,
}

#[allow(dead_code)]
impl<'n> KeptPins<'n> {
    /// A fresh directory under /sys/fs/bpf named after `suite`.
    pub fn new(ns: &'n Netns, suite: &str, socket: PathBuf) -> Self {
        Self::at(
            ns,
            Path::new("/sys/fs/bpf").join(unique(suite, "pins")),
            socket,
        )
    }

    /// `dir`, e.g. on a bpffs the test mounted itself.
    pub fn at(ns: &'n Netns, dir: PathBuf, socket: PathBuf) -> Self {
        Self { ns, dir, socket }
    }
}

impl Drop for KeptPins<'_> {
    fn drop(&mut self) {
        if self.dir.exists() {
            let mut cmd = self.ns.command(XLB);
            cmd.arg("detach")
                .arg("--bpffs")
                .arg(&self.dir)
                .arg("--socket")
                .arg(&self.socket)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // No panic here: this may run while a failing test unwinds.
            if let Ok(mut child) = spawn(&mut cmd) {
                let deadline = Instant::now() + Duration::from_secs(20);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A running `xlb run` (see [`AgentBuilder`]). On drop: if the test is failing, `stats`
/// and its log are printed; SIGTERM (SIGKILL if ignored); what the builder created is removed.
#[allow(dead_code)]
pub struct Agent<'n> {
    ns: Option<&'n Netns>,
    pub process: AgentProcess,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub bpffs: PathBuf,
    /// Directories the builder created, removed on drop.
    owned: Vec<PathBuf>,
}

#[allow(dead_code)]
impl<'n> Agent<'n> {
    /// An agent in `ns`; its temp dir and pins are named after `suite`.
    pub fn in_ns(ns: &'n Netns, suite: &str) -> AgentBuilder<'n> {
        Self::builder(Some(ns), suite)
    }

    /// An agent in the host's namespace.
    pub fn on_host(suite: &str) -> AgentBuilder<'n> {
        Self::builder(None, suite)
    }

    fn builder(ns: Option<&'n Netns>, suite: &str) -> AgentBuilder<'n> {
        AgentBuilder {
            ns,
            suite: suite.to_owned(),
            ifaces: Vec::new(),
            dir: None,
            socket: None,
            state: None,
            bpffs: None,
            args: Vec::new(),
            envs: Vec::new(),
            start_limit: START_LIMIT,
            dies_with_test: false,
        }
    }

    /// `xlb ARGS --socket SOCKET` where the agent runs, within 40 s; any outcome.
    pub fn run(&self, args: &[&str]) -> Output {
        xlb_in(self.ns, &self.socket, args)
    }

    /// Runs an `xlb` command against this agent; panics if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        success(args, self.run(args))
    }

    /// [`Self::cli`] under the name the CLI tests use.
    pub fn ok(&self, args: &[&str]) -> String {
        self.cli(args)
    }

    /// What a successful `xlb ARGS` printed, as JSON.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        parse_json(args, &self.cli(args))
    }

    pub fn stats(&self) -> Stats {
        parse_json(&["stats", "--json"], &self.cli(&["stats", "--json"]))
    }

    /// Where it runs: its namespace's name, or `host`.
    pub fn place(&self) -> &str {
        self.ns.map_or("host", Netns::name)
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// SIGTERM, then waits (bounded) for the exit; panics if it does not come.
    pub fn stop(&mut self) -> ExitStatus {
        self.process.stop()
    }

    pub fn signal(&mut self, signal: libc::c_int) {
        self.process.signal(signal);
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        let failing = thread::panicking();
        if failing && self.process.is_running() {
            let stats = self.run(&["stats", "--json"]);
            eprintln!(
                "--- xlb stats --json ---\n{}",
                String::from_utf8_lossy(&stats.stdout)
            );
        }
        self.process.terminate();
        if failing {
            eprintln!("---- xlb agent log ----\n{}", self.process.log());
        }
        for dir in &self.owned {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// What an HTTP server answered: its status and body.
#[allow(dead_code)]
#[derive(Debug)]
pub struct HttpResponse {
    /// The first line, e.g. `HTTP/1.0 200 OK`.
    pub status_line: String,
    pub status: u16,
    pub body: String,
}

/// One `GET PATH HTTP/1.0` to `addr` from the calling thread's namespace, with a `Host`
/// header; the connect and every read or write within `limit`, at most 1 MiB read. An error
/// for a failed connection or an answer that is not HTTP; any status is a response.
#[allow(dead_code)]
pub fn http_get(addr: SocketAddr, path: &str, limit: Duration) -> std::io::Result<HttpResponse> {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, limit)?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.take(1 << 20).read_to_string(&mut response)?;
    let not_http = || std::io::Error::other(format!("not an HTTP response: {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(not_http)?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(not_http)?;
    Ok(HttpResponse {
        status_line: status_line.to_owned(),
        status,
        body: body.to_owned(),
    })
}

/// Whether xlb's data path is attached to `ifname` in `ns`: an XDP program (native or
/// generic) or a program at its tcx ingress hook, where `--xdp-mode auto` puts veths.
#[allow(dead_code)]
pub fn xlb_attached(ns: &Netns, ifname: &str) -> bool {
    xdp_attached(ns, ifname) || tcx_ingress_attached(ns, ifname)
}

/// Whether any program sits at `ifname`'s tcx ingress hook in `ns`.
#[allow(dead_code)]
pub fn tcx_ingress_attached(ns: &Netns, ifname: &str) -> bool {
    use aya::programs::{SchedClassifier, TcAttachType};
    let ifindex = ns.ifindex(ifname).expect("interface index");
    ns.run(move || {
        SchedClassifier::query_tcx(ifindex, TcAttachType::Ingress)
            .map(|(_, programs)| !programs.is_empty())
            .unwrap_or_else(|e| panic!("querying tcx ingress of {ifname}: {e}"))
    })
    .expect("entering namespace")
}

/// Runs one netlink query inside `ns`: a netlink socket speaks for the namespace it was
/// opened in, so it is opened on a thread that has entered `ns`, with a runtime of its own.
#[allow(dead_code)]
pub fn netlink_in<F, Fut, T>(ns: &Netns, query: F) -> T
where
    F: FnOnce(rtnetlink::Handle) -> Fut + Send,
    Fut: std::future::Future<Output = T>,
    T: Send,
{
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let (connection, handle, _) = rtnetlink::new_connection().expect("netlink");
            let task = tokio::spawn(connection);
            let out = query(handle).await;
            task.abort();
            out
        })
    })
    .expect("entering the namespace")
}

/// Whether any XDP program is attached to `ifname` in `ns`, asked over netlink (IFLA_XDP).
#[allow(dead_code)]
pub fn xdp_attached(ns: &Netns, ifname: &str) -> bool {
    use futures_util::TryStreamExt as _;
    use rtnetlink::packet_route::link::{LinkAttribute, LinkXdp, XdpAttached};
    let ifname = ifname.to_owned();
    netlink_in(ns, |handle| async move {
        let msg = handle
            .link()
            .get()
            .match_name(ifname.clone())
            .execute()
            .try_next()
            .await
            .unwrap_or_else(|e| panic!("getting link {ifname}: {e}"))
            .unwrap_or_else(|| panic!("no link {ifname}"));
        msg.attributes.iter().any(|a| {
            matches!(a, LinkAttribute::Xdp(xdp) if xdp.iter().any(|x| match x {
                LinkXdp::Attached(how) => !matches!(how, XdpAttached::None),
                LinkXdp::ProgId(id) | LinkXdp::DrvProgId(id) | LinkXdp::SkbProgId(id) => *id != 0,
                _ => false,
            }))
        })
    })
}

/// A global counter from `xlb stats --json`.
#[allow(dead_code)]
pub fn counter(stats: &Stats, name: &str) -> u64 {
    stats
        .global
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no global counter {name} in {:?}", stats.global))
        .value
}

/// Raises `flag` when dropped: client threads that poll it stop even when the test panics
/// before it raises the flag itself.
#[allow(dead_code)]
pub struct RaiseOnDrop(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for RaiseOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
