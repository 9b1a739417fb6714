//! Real podman containers as backends: `busybox httpd` containers on podman's
//! default bridge (`podman0`, 10.88.0.0/16), added with `xlb backend add VIP
//! --container NAME:8080`, answer HTTP requests that a client namespace sends
//! to a VIP nobody owns.
//!
//! ```text
//! client ns --veth-- host (xlb at TC on the veth and on podman0) --podman0-- containers
//! ```
//!
//! The agent runs in the host namespace, because podman0 lives there, with
//! the default `--xdp-mode auto`, which puts both interfaces on the TC hook.
//! The request path: TC on the host's veth rewrites VIP -> container and
//! redirects the packet into podman0, which forwards it to the container's
//! port. The reply path: the containers send to their gateway's MAC, so the
//! frames come up on podman0, where TC puts the VIP back as the source and
//! redirects them to the client's veth.
//!
//! Every end keeps the kernel's default offloads, as a user's containers do:
//! TSO/GSO segments of 64 KB and `CHECKSUM_PARTIAL` from local senders on
//! both sides. Besides many small requests the client downloads 1 MB from
//! each container and uploads 1 MB that the container echoes back, so bulk
//! TCP through the bridge is checked byte for byte both ways.
//!
//! Needs root and podman (`cargo xtask bootstrap` installs it); fails without.
//! Every podman call passes `--runtime runc` (crun fails on hybrid cgroups)
//! and a `CONTAINERS_CONF` file of its own (lowered ulimits), so the user's
//! podman configuration is not touched. Left behind on purpose: the image
//! [`IMAGE`] (a cache, rebuilt only when missing) and the `ip nat` / `ip
//! filter` nft tables that netavark creates and never removes.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use xlb_netns::Netns;

mod common;
use common::{Agent, XLB, counter, output_within};

/// Names of everything this suite creates start with this (containers
/// `xlbpm-PID-N`, namespaces `xlbpm-client-PID-N`, the host veth `xlbpmPID`),
/// so a later run can remove what a killed one left behind.
const PREFIX: &str = "xlbpm-";

/// Built from the host's static busybox; shared with the demo's podman mode.
const IMAGE: &str = "localhost/xlb-busybox:latest";
const HTTP_PORT: u16 = 8080;
const CONTAINERS: usize = 3;
const REQUESTS: usize = 30;
/// Bulk transfers: large enough for GSO/TSO segments and many windows.
const BULK_BYTES: usize = 1 << 20;
/// A whole bulk transfer, both ways; they take milliseconds when they work.
const BULK_TIMEOUT: Duration = Duration::from_secs(20);
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 214, 0, 10), 80);

/// Bounds every podman/ip command; a hung one fails the test instead of the CI job.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------
// Bounded commands
// ---------------------------------------------------------------------------

fn must(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = output_within(cmd, COMMAND_TIMEOUT);
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether an ELF64 executable names a dynamic loader (has a `PT_INTERP`
/// program header), i.e. cannot run alone in an otherwise empty image.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let field = |at: usize, len: usize| -> usize {
        elf.get(at..at + len).map_or(0, |b| {
            b.iter()
                .rev()
                .fold(0, |acc, &byte| (acc << 8) | usize::from(byte))
        })
    };
    assert!(
        elf.starts_with(b"\x7fELF") && elf.get(4) == Some(&2),
        "busybox is not an ELF64 executable"
    );
    let (phoff, phentsize, phnum) = (field(0x20, 8), field(0x36, 2), field(0x38, 2));
    (0..phnum).any(|i| field(phoff + i * phentsize, 4) == PT_INTERP as usize)
}

/// Holds an exclusive `flock` on [`PODMAN0_LOCK`] while alive.
///
/// Only one XDP program can sit on podman0, so two runs at once (this test
/// from two `cargo test`s, or with xlb-demo's podman mode, which takes the same
/// lock) would fail each other's attach; the second waits instead.
struct Podman0Lock {
    _file: fs::File,
}

const PODMAN0_LOCK: &str = "/run/lock/xlb-podman0.lock";

impl Podman0Lock {
    fn acquire() -> Self {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(PODMAN0_LOCK)
            .unwrap_or_else(|e| panic!("opening {PODMAN0_LOCK}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            // SAFETY: flock(2) on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Self { _file: file };
            }
            assert!(
                Instant::now() < deadline,
                "another xlb run has held {PODMAN0_LOCK} (podman0) for 300 s"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

// ---------------------------------------------------------------------------
// podman
// ---------------------------------------------------------------------------

/// podman with this suite's runtime and configuration.
struct Podman {
    dir: PathBuf,
    conf: PathBuf,
}

impl Podman {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
        fs::create_dir_all(&dir).expect("creating the test's temp dir");
        let conf = dir.join("containers.conf");
        fs::write(
            &conf,
            "[containers]\ndefault_ulimits = [\"nofile=1024:20000\", \"nproc=4096:4096\"]\n",
        )
        .expect("writing containers.conf");
        Self { dir, conf }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", &self.conf)
            .args(["--runtime", "runc"]);
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        must(self.command().args(args))
    }

    /// Imports [`IMAGE`] from a rootfs holding only the host's static busybox,
    /// unless it exists already.
    fn ensure_image(&self) {
        let exists = output_within(
            self.command().args(["image", "exists", IMAGE]),
            COMMAND_TIMEOUT,
        );
        if exists.status.success() {
            return;
        }
        let busybox = which::which("busybox")
            .expect("busybox not found: install busybox-static (`cargo xtask bootstrap` does)");
        let bytes = fs::read(&busybox).expect("reading busybox");
        assert!(
            !has_interpreter(&bytes),
            "{} is dynamically linked: install busybox-static (`cargo xtask bootstrap` does)",
            busybox.display()
        );
        let rootfs = self.dir.join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).expect("creating the rootfs");
        fs::create_dir_all(rootfs.join("tmp")).expect("creating the rootfs");
        fs::copy(&busybox, rootfs.join("bin/busybox")).expect("copying busybox");
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("linking /bin/sh");
        let tar = self.dir.join("rootfs.tar");
        must(
            Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        );
        self.run(&["import", &tar.display().to_string(), IMAGE]);
        let _ = fs::remove_dir_all(&rootfs);
        let _ = fs::remove_file(&tar);
    }

    /// Removes containers of earlier runs that were killed before their guard ran.
    fn remove_stale(&self) {
        let names = self.run(&[
            "ps",
            "-a",
            "--filter",
            &format!("name=^{PREFIX}"),
            "--format",
            "{{.Names}}",
        ]);
        let stale: Vec<&str> = names
            .split_whitespace()
            .filter(|n| {
                n.strip_prefix(PREFIX)
                    .and_then(|rest| rest.split('-').next())
                    .and_then(|pid| pid.parse().ok())
                    .is_some_and(|pid| !pid_alive(pid))
            })
            .collect();
        if !stale.is_empty() {
            eprintln!("removing containers of dead runs: {stale:?}");
            let mut args = vec!["rm", "-f", "-t", "0"];
            args.extend(stale);
            self.run(&args);
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The running containers; `podman rm -f -t 0` on drop (busybox httpd as PID 1
/// ignores SIGTERM, so a plain stop would wait out the timeout).
struct Containers<'p> {
    podman: &'p Podman,
    names: Vec<String>,
}

impl<'p> Containers<'p> {
    fn start(podman: &'p Podman, n: usize) -> Self {
        let mut containers = Self {
            podman,
            names: Vec::new(),
        };
        for i in 0..n {
            containers.add(&format!("{PREFIX}{}-{i}", std::process::id()), &[]);
        }
        containers
    }

    /// Runs one more container `name`, with `extra` options for `podman run` (labels, an
    /// address); it answers `GET /` with its name.
    fn add(&mut self, name: &str, extra: &[&str]) {
        // /big: 1 MiB of "xlb\n" to download; /cgi-bin/echo sends a POST body back.
        let script = format!(
            "mkdir -p /www/cgi-bin && echo {name} > /www/index.html && \
             yes xlb | head -c {BULK_BYTES} > /www/big && \
             printf '#!/bin/sh\\nprintf \"Content-Type: application/octet-stream\\\\r\\\\n\\\\r\\\\n\"\\nexec cat\\n' > /www/cgi-bin/echo && \
             chmod +x /www/cgi-bin/echo && \
             exec busybox httpd -f -p {HTTP_PORT} -h /www"
        );
        // Recorded before `run` so a half-created container is removed too.
        if !self.names.iter().any(|n| n == name) {
            self.names.push(name.to_owned());
        }
        let mut args = vec!["run", "-d", "--name", name];
        args.extend(extra);
        args.extend([IMAGE, "/bin/sh", "-c", &script]);
        self.podman.run(&args);
    }

    fn addr(&self, name: &str) -> Ipv4Addr {
        let text = self.podman.run(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            name,
        ]);
        text.split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("container {name} has no IPv4 address: {text:?}"))
    }

    /// Waits until every container's httpd answers from the host.
    fn wait_serving(&self) {
        for name in &self.names {
            self.wait_one_serving(name);
        }
    }

    fn wait_one_serving(&self, name: &str) {
        let addr = SocketAddr::from((self.addr(name), HTTP_PORT));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match http_get(addr) {
                Ok(body) if body == *name => break,
                Ok(body) => panic!("{name} at {addr} answered {body:?}"),
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "{name} at {addr} does not answer 10 s after starting: {e}"
                ),
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `podman rm -f -t 0 name`: killed hard, gone.
    fn remove(&mut self, name: &str) {
        self.podman.run(&["rm", "-f", "-t", "0", name]);
        self.names.retain(|n| n != name);
    }
}

impl Drop for Containers<'_> {
    fn drop(&mut self) {
        if self.names.is_empty() {
            return;
        }
        let mut args = vec!["rm", "-f", "-t", "0"];
        args.extend(self.names.iter().map(String::as_str));
        let out = output_within(self.podman.command().args(&args), COMMAND_TIMEOUT);
        if !out.status.success() {
            eprintln!(
                "removing containers {:?} failed: {}",
                self.names,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The client's link to the host
// ---------------------------------------------------------------------------

/// A veth from the host namespace into the client namespace, with a /30 whose
/// place in 10.213.0.0/16 depends on the pid; the client routes everything
/// (the VIP included) to the host. Deleted on drop.
struct ClientLink {
    host_if: String,
    host_ip: Ipv4Addr,
    client_ip: Ipv4Addr,
}

impl ClientLink {
    const CLIENT_IF: &'static str = "eth0";

    fn create(client: &Netns) -> Self {
        let pid = std::process::id();
        let host_if = format!("xlbpm{pid}");
        let slot = pid % 16_384;
        let base = u32::from(Ipv4Addr::new(10, 213, 0, 0)) + slot * 4;
        let (host_ip, client_ip) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        // A veth of a killed earlier run with the same pid would be in the way.
        let _ = output_within(
            Command::new("ip").args(["link", "del", &host_if]),
            COMMAND_TIMEOUT,
        );
        must(Command::new("ip").args([
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            Self::CLIENT_IF,
            "netns",
            client.name(),
        ]));
        let link = Self {
            host_if,
            host_ip,
            client_ip,
        };
        must(Command::new("ip").args([
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &link.host_if,
        ]));
        must(Command::new("ip").args(["link", "set", &link.host_if, "up"]));
        client
            .add_address(
                Self::CLIENT_IF,
                xlb_netns::ipnet::Ipv4Net::new(client_ip, 30).expect("valid prefix"),
            )
            .expect("addressing the client");
        client
            .set_link_up(Self::CLIENT_IF)
            .expect("bringing the client's link up");
        client
            .add_default_route(host_ip.into())
            .expect("routing the client via the host");
        link
    }
}

impl Drop for ClientLink {
    fn drop(&mut self) {
        let _ = output_within(
            Command::new("ip").args(["link", "del", &self.host_if]),
            COMMAND_TIMEOUT,
        );
    }
}

/// The host's `net.ipv6.conf.all.forwarding`, put back on drop: the agent turns
/// forwarding on in the namespace it runs in, here the host's.
struct HostForwarding(Vec<(&'static str, String)>);

impl HostForwarding {
    const FILES: [&'static str; 2] = [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ];

    fn save() -> Self {
        Self(
            Self::FILES
                .iter()
                .filter_map(|f| Some((*f, fs::read_to_string(f).ok()?)))
                .collect(),
        )
    }
}

impl Drop for HostForwarding {
    fn drop(&mut self) {
        for (file, value) in &self.0 {
            if fs::read_to_string(file).ok().as_deref() != Some(value) {
                let _ = fs::write(file, value.trim());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The agent, in the host namespace
// ---------------------------------------------------------------------------

/// Names of the agent's temp dir and pins start `xlb-podman-`.
const SUITE: &str = "podman";

/// `xlb run` in the host's namespace on `ifaces` (hooks chosen per interface), with `extra`
/// options (`--containers podman`). It attaches to host interfaces, so it must not outlive
/// the test.
fn start_agent(ifaces: &[&str], extra: &[&str]) -> Agent<'static> {
    Agent::on_host(SUITE)
        .ifaces(ifaces)
        .args(["--xdp-mode", "auto"])
        .args(extra)
        .env("NO_COLOR", "1")
        .dies_with_test()
        .start()
}

/// `xlb ARGS` against the agent at `socket`, with the time podman lookups may take.
fn cli_at(socket: &Path, args: &[&str]) -> Output {
    output_within(
        Command::new(XLB).env("XLB_SOCKET", socket).args(args),
        COMMAND_TIMEOUT,
    )
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// `GET /` over HTTP/1.0; returns the trimmed body, or an error for a failed
/// connection, a non-200 status or a missing body.
fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let response = common::http_get(addr, "/", IO_TIMEOUT)?;
    let bad = |why: &str| std::io::Error::other(format!("{why}: {response:?}"));
    if response.status != 200 {
        return Err(bad("not a 200 response"));
    }
    let body = response.body.trim();
    if body.is_empty() {
        return Err(bad("empty body"));
    }
    Ok(body.to_owned())
}

/// One HTTP/1.0 exchange carrying `body` (a POST when there is one); returns the response
/// body, or an error for a failed connection, a non-200 status or a stalled transfer.
fn http_bulk(addr: SocketAddr, path: &str, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = if body.is_empty() {
        format!("GET {path} HTTP/1.0\r\n\r\n")
    } else {
        format!(
            "POST {path} HTTP/1.0\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
    };
    stream.write_all(head.as_bytes())?;
    // The echo streams back while the body is still arriving: read on a thread of its own.
    let mut reader = stream.try_clone()?;
    let responses = thread::spawn(move || {
        let mut response = Vec::new();
        (&mut reader)
            .take(2 * BULK_BYTES as u64 + 4096)
            .read_to_end(&mut response)
            .map(|_| response)
    });
    stream.write_all(body)?;
    let response = responses
        .join()
        .map_err(|_| std::io::Error::other("reader panicked"))??;
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::other(format!("no end of headers in {} bytes", response.len()))
        })?;
    let status = String::from_utf8_lossy(&response[..end]);
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(std::io::Error::other(format!(
            "not a 200 response: {status:?}"
        )));
    }
    Ok(response[end + 4..].to_vec())
}

/// 1 MiB of "xlb\n", as the containers' /big holds.
fn big_file() -> Vec<u8> {
    b"xlb\n".iter().copied().cycle().take(BULK_BYTES).collect()
}

/// 1 MiB that no shorter period repeats, to upload.
fn upload_body() -> Vec<u8> {
    (0..BULK_BYTES as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

/// Downloads /big and echoes an upload through the VIP `rounds` times, checking every byte.
fn bulk_both_ways(rounds: usize) {
    let (expected_download, upload) = (big_file(), upload_body());
    for round in 0..rounds {
        let started = Instant::now();
        let got =
            http_bulk(VIP.into(), "/big", &[]).unwrap_or_else(|e| panic!("download {round}: {e}"));
        assert!(
            got == expected_download,
            "download {round}: {} bytes, not the {BULK_BYTES} bytes of /big",
            got.len()
        );
        let echoed = http_bulk(VIP.into(), "/cgi-bin/echo", &upload)
            .unwrap_or_else(|e| panic!("upload {round}: {e}"));
        assert!(
            echoed == upload,
            "upload {round}: {} bytes came back, not the {BULK_BYTES} sent",
            echoed.len()
        );
        let took = started.elapsed();
        assert!(took < BULK_TIMEOUT, "round {round} took {took:?}");
        eprintln!("bulk round {round}: 1 MiB down, 1 MiB up and back in {took:?}");
    }
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[test]
fn http_to_podman_containers_through_the_vip() {
    assert!(
        which::which("podman").ok().is_some(),
        "podman is not installed: `cargo xtask bootstrap` installs podman, runc and \
         busybox-static; this test needs real podman containers"
    );
    let _podman0 = Podman0Lock::acquire();
    let started = Instant::now();
    let podman = Podman::new();
    podman.remove_stale();
    xlb_netns::cleanup_stale(&format!("{PREFIX}client-")).expect("removing stale namespaces");
    podman.ensure_image();

    let containers = Containers::start(&podman, CONTAINERS);
    containers.wait_serving();
    eprintln!(
        "{CONTAINERS} containers serving after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let client = Netns::create(&format!("{PREFIX}client-")).expect("creating the client namespace");
    let link = ClientLink::create(&client);
    let _forwarding = HostForwarding::save();
    let agent = start_agent(&[&link.host_if, "podman0"], &[]);

    let vip = format!("{VIP}/tcp");
    agent.cli(&["vip", "add", &vip]);
    let mut addrs = BTreeMap::new();
    for name in &containers.names {
        agent.cli(&[
            "backend",
            "add",
            &vip,
            "--container",
            &format!("{name}:{HTTP_PORT}"),
        ]);
        addrs.insert(SocketAddr::from((containers.addr(name), HTTP_PORT)), name);
    }
    let listed: serde_json::Value =
        serde_json::from_str(&agent.cli(&["backend", "list", &vip, "--json"]))
            .expect("`xlb backend list --json` prints JSON");
    for addr in addrs.keys() {
        assert!(
            listed.to_string().contains(&addr.to_string()),
            "`--container` did not resolve to {addr}: {listed}"
        );
    }

    let answers: Vec<String> = client
        .run(|| {
            (0..REQUESTS)
                .map(|i| {
                    http_get(VIP.into())
                        .unwrap_or_else(|e| panic!("request {} of {REQUESTS}: {e}", i + 1))
                })
                .collect()
        })
        .expect("entering the client namespace");
    // Bulk TCP through the bridge, on the default offloads (GSO, partial checksums).
    client
        .run(|| bulk_both_ways(CONTAINERS * 2))
        .expect("entering the client namespace");
    let mut served: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &answers {
        assert!(
            containers.names.contains(a),
            "an answer that names no container: {a:?}"
        );
        *served.entry(a.as_str()).or_default() += 1;
    }
    eprintln!(
        "{REQUESTS} requests from {} served by {served:?}",
        link.client_ip
    );
    assert!(
        served.len() > 1,
        "every request went to one container: {served:?}"
    );

    let stats = agent.stats();
    let status = stats
        .vips
        .iter()
        .find(|v| v.vip.to_string() == vip)
        .unwrap_or_else(|| panic!("{vip} missing from stats"));
    let bulk_flows = (CONTAINERS * 2 * 2) as u64;
    assert_eq!(
        status.new_flows,
        REQUESTS as u64 + bulk_flows,
        "one new flow per request and per bulk transfer: {status:?}"
    );
    let mut small_flows = 0;
    for b in &status.backends {
        let name = addrs[&b.addr];
        let answered = served.get(name.as_str()).copied().unwrap_or(0) as u64;
        assert!(
            b.new_flows >= answered,
            "{name}'s new flows ({}) are fewer than the answers it gave ({answered})",
            b.new_flows
        );
        small_flows += answered;
    }
    assert_eq!(small_flows, REQUESTS as u64);
    assert!(
        status.bytes >= (CONTAINERS * 2 * BULK_BYTES) as u64,
        "the uploads did not cross the VIP: {} bytes",
        status.bytes
    );
    let reverse_nat = counter(&stats, "reverse_nat");
    assert!(
        reverse_nat >= 2 * REQUESTS as u64,
        "replies were not un-NATed on podman0 (reverse_nat = {reverse_nat})"
    );
    assert_eq!(counter(&stats, "xdp_aborted"), 0, "XDP_ABORTED seen");
    eprintln!(
        "stats: new flows {}, reverse_nat {reverse_nat}, xdp_redirect {}, xdp_pass {}; host {} ({})",
        status.new_flows,
        counter(&stats, "xdp_redirect"),
        counter(&stats, "xdp_pass"),
        link.host_if,
        link.host_ip
    );

    drop(agent);
    drop(link);
    drop(client);
    drop(containers);
    let left = podman.run(&[
        "ps",
        "-a",
        "--filter",
        &format!("name=^{PREFIX}{}-", std::process::id()),
        "--format",
        "{{.Names}}",
    ]);
    assert!(left.trim().is_empty(), "containers left behind: {left}");
    eprintln!(
        "done in {:.1} s (left on purpose: image {IMAGE}, netavark's nft tables)",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// Containers followed by name, and discovered by label
// ---------------------------------------------------------------------------

/// Everything a following test needs, torn down in field order: the agent, the client's
/// link and namespace, the host's forwarding settings, podman's temp files, then podman0.
struct Lab {
    agent: std::cell::OnceCell<Agent<'static>>,
    _link: ClientLink,
    client: Netns,
    _forwarding: HostForwarding,
    podman: Podman,
    _podman0: Podman0Lock,
}

impl Lab {
    /// Everything but the agent, which needs podman0, which exists only while a container
    /// runs: see [`Self::start_agent`].
    fn new() -> Self {
        assert!(
            which::which("podman").ok().is_some(),
            "podman is not installed: `cargo xtask bootstrap` installs podman, runc and \
             busybox-static; this test needs real podman containers"
        );
        let podman0 = Podman0Lock::acquire();
        let podman = Podman::new();
        podman.remove_stale();
        xlb_netns::cleanup_stale(&format!("{PREFIX}client-")).expect("removing stale namespaces");
        podman.ensure_image();
        let client =
            Netns::create(&format!("{PREFIX}client-")).expect("creating the client namespace");
        let link = ClientLink::create(&client);
        let forwarding = HostForwarding::save();
        Self {
            agent: std::cell::OnceCell::new(),
            _link: link,
            client,
            _forwarding: forwarding,
            podman,
            _podman0: podman0,
        }
    }

    fn start_agent(&self, options: &[&str]) {
        let agent = start_agent(&[&self._link.host_if, "podman0"], options);
        assert!(self.agent.set(agent).is_ok(), "one agent per lab");
    }

    fn agent(&self) -> &Agent<'static> {
        self.agent.get().expect("the agent is started")
    }

    /// The VIP's backends as `backend list --json` gives them; None while the VIP is missing.
    fn backends(&self) -> Option<Vec<lb_userspace::balancer::BackendStatus>> {
        let args = ["backend", "list", &format!("{VIP}/tcp"), "--json"];
        let out = cli_at(&self.agent().socket, &args);
        out.status.success().then(|| {
            common::parse_json::<lb_userspace::balancer::VipStatus>(
                &args,
                &String::from_utf8_lossy(&out.stdout),
            )
            .backends
        })
    }

    /// `n` requests to the VIP from the client, each answer the container's name; panics on
    /// the first that fails.
    fn requests(&self, n: usize) -> BTreeMap<String, usize> {
        self.client
            .run(|| {
                let mut served = BTreeMap::new();
                for i in 0..n {
                    let body = http_get(VIP.into())
                        .unwrap_or_else(|e| panic!("request {} of {n}: {e}", i + 1));
                    *served.entry(body).or_default() += 1;
                }
                served
            })
            .expect("entering the client namespace")
    }
}

/// Polls `done` every 50 ms until it holds; panics after `limit`. Returns how long it took.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

/// How long the agent may take to act on a container event: podman writes it to its events
/// file, `podman events` reads it, the agent inspects the container.
const FOLLOW_LIMIT: Duration = Duration::from_secs(15);

fn backend_of<'a>(
    backends: &'a [lb_userspace::balancer::BackendStatus],
    name: &str,
) -> Option<&'a lb_userspace::balancer::BackendStatus> {
    backends
        .iter()
        .find(|b| b.container.as_deref() == Some(name))
}

/// An address on podman's default network (10.88.0.0/16) that no container holds, for a
/// container that must come back somewhere else.
fn free_podman_address(podman: &Podman, not: Ipv4Addr) -> Ipv4Addr {
    let mut used: Vec<Ipv4Addr> = vec![not];
    for id in podman.run(&["ps", "-a", "-q"]).split_whitespace() {
        let text = podman.run(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            id,
        ]);
        used.extend(
            text.split_whitespace()
                .filter_map(|w| w.parse::<Ipv4Addr>().ok()),
        );
    }
    let first = u32::from(Ipv4Addr::new(10, 88, 200, 2));
    let pid = std::process::id();
    (0..200u32)
        .map(|i| Ipv4Addr::from(first + (pid + i * 7) % 5_000))
        .find(|a| !used.contains(a))
        .expect("a free address on podman's network")
}

#[test]
fn followed_containers_leave_the_ring_while_stopped_and_come_back_where_they_are() {
    let started = Instant::now();
    let lab = Lab::new();
    let pid = std::process::id();
    let names: Vec<String> = (0..3).map(|i| format!("{PREFIX}{pid}-f{i}")).collect();
    let mut containers = Containers::start(&lab.podman, 0);
    containers.add(&names[0], &[]);
    containers.add(&names[1], &[]);
    // The third exposes its port: `--container NAME` finds it.
    containers.add(&names[2], &["--expose", "8080"]);
    containers.wait_serving();
    lab.start_agent(&[]);
    let agent = lab.agent();
    let vip = format!("{VIP}/tcp");
    agent.cli(&["vip", "add", &vip]);

    // No port given, none exposed: refused, saying why, on one line.
    let refused = cli_at(
        &agent.socket,
        &["backend", "add", &vip, "--container", &names[0]],
    );
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        message.contains(&format!("container '{}' exposes no tcp port", names[0]))
            && message.trim().lines().count() == 1,
        "{message}"
    );
    for name in &names[..2] {
        let said = agent.cli(&[
            "backend",
            "add",
            &vip,
            "--container",
            &format!("{name}:{HTTP_PORT}"),
        ]);
        assert!(
            said.contains(&format!("container {name}, followed")),
            "{said}"
        );
    }
    agent.cli(&["backend", "add", &vip, "--container", &names[2]]);
    let listed = lab.backends().expect("the VIP is there");
    for name in &names {
        let b =
            backend_of(&listed, name).unwrap_or_else(|| panic!("{name} not listed: {listed:?}"));
        assert_eq!(b.addr, SocketAddr::from((containers.addr(name), HTTP_PORT)));
        assert_eq!(b.container_running, Some(true));
    }
    let text = agent.cli(&["backend", "list", &vip]);
    for name in &names {
        assert!(text.contains(&format!("({name})")), "{text}");
    }
    let served = lab.requests(30);
    assert!(
        served.len() > 1,
        "one container took every request: {served:?}"
    );

    // Stopped: out of the ring, and not one new connection reaches it.
    lab.podman.run(&["stop", "-t", "0", &names[1]]);
    let noticed = wait_until(
        "the stopped container leaves the ring",
        FOLLOW_LIMIT,
        || {
            lab.backends()
                .and_then(|l| {
                    backend_of(&l, &names[1])
                        .map(|b| b.container_running == Some(false) && b.slots == 0)
                })
                .unwrap_or(false)
        },
    );
    eprintln!("stop noticed after {noticed:?}");
    let before = backend_of(&lab.backends().unwrap(), &names[1])
        .unwrap()
        .new_flows;
    let served = lab.requests(30);
    assert!(!served.contains_key(&names[1]), "{served:?}");
    let after = lab.backends().unwrap();
    assert_eq!(
        backend_of(&after, &names[1]).unwrap().new_flows,
        before,
        "{after:?}"
    );
    assert!(agent.cli(&["backend", "list", &vip]).contains("stopped"));

    // Started again: back in the ring at whatever address podman gave it.
    lab.podman.run(&["start", &names[1]]);
    containers.wait_one_serving(&names[1]);
    let back = SocketAddr::from((containers.addr(&names[1]), HTTP_PORT));
    let noticed = wait_until("the restarted container is back", FOLLOW_LIMIT, || {
        lab.backends()
            .and_then(|l| backend_of(&l, &names[1]).map(|b| b.addr == back && b.slots > 0))
            .unwrap_or(false)
    });
    eprintln!("start noticed after {noticed:?}");
    assert!(lab.requests(30).contains_key(&names[1]));

    // Replaced by a container of the same name elsewhere: followed to its new address.
    let old = containers.addr(&names[1]);
    containers.remove(&names[1]);
    wait_until(
        "the removed container leaves the ring",
        FOLLOW_LIMIT,
        || {
            lab.backends()
                .and_then(|l| backend_of(&l, &names[1]).map(|b| b.container_running == Some(false)))
                .unwrap_or(false)
        },
    );
    assert!(!lab.requests(20).contains_key(&names[1]));
    let elsewhere = free_podman_address(&lab.podman, old);
    containers.add(&names[1], &["--ip", &elsewhere.to_string()]);
    containers.wait_one_serving(&names[1]);
    let moved = SocketAddr::from((elsewhere, HTTP_PORT));
    let noticed = wait_until(
        "the container is followed to its new address",
        FOLLOW_LIMIT,
        || {
            lab.backends().is_some_and(|l| {
                backend_of(&l, &names[1]).is_some_and(|b| b.addr == moved && b.slots > 0)
                    && !l.iter().any(|b| b.addr.ip() == IpAddr::V4(old))
            })
        },
    );
    eprintln!("move from {old} to {elsewhere} followed after {noticed:?}");
    assert!(lab.requests(30).contains_key(&names[1]));
    // The state file knows the container by name at its new address.
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&agent.state).expect("reading the state file"))
            .expect("the state file is JSON");
    let recorded = state["vips"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["container"] == names[1].as_str())
        .unwrap_or_else(|| panic!("{} not in the state file: {state}", names[1]));
    assert_eq!(recorded["addr"], moved.to_string());
    assert_eq!(counter(&agent.stats(), "xdp_aborted"), 0);
    drop(containers);
    drop(lab);
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
}

/// One request of a stream: when it started and ended, and the container that answered.
struct Answer {
    started: Instant,
    ended: Instant,
    result: Result<String, String>,
}

#[test]
fn labelled_containers_scale_from_one_to_three_and_back_under_new_connections() {
    let started = Instant::now();
    let lab = Lab::new();
    let pid = std::process::id();
    let names: Vec<String> = (0..3).map(|i| format!("{PREFIX}{pid}-s{i}")).collect();
    let labels = [
        "--label",
        &format!("xlb.vip={VIP}/tcp"),
        "--label",
        "xlb.port=8080",
    ]
    .map(|s| s.to_owned());
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let mut containers = Containers::start(&lab.podman, 0);
    containers.add(&names[0], &labels);
    // Running before the agent: found when it first asks podman.
    lab.start_agent(&["--containers", "podman"]);
    let took = wait_until(
        "the first labelled container becomes a backend",
        FOLLOW_LIMIT,
        || {
            lab.backends().is_some_and(|l| {
                l.len() == 1 && l[0].slots > 0 && backend_of(&l, &names[0]).is_some()
            })
        },
    );
    eprintln!("1 labelled container a backend (its VIP created) after {took:?}");
    containers.wait_one_serving(&names[0]);

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (answers, marks) = thread::scope(|scope| {
        let stream = scope.spawn(|| {
            lab.client
                .run(|| {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let mut answers = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && Instant::now() < deadline
                    {
                        let started = Instant::now();
                        let result = http_get(VIP.into()).map_err(|e| e.to_string());
                        answers.push(Answer {
                            started,
                            ended: Instant::now(),
                            result,
                        });
                        thread::sleep(Duration::from_millis(20));
                    }
                    answers
                })
                .expect("entering the client namespace")
        });
        let scale = || {
            thread::sleep(Duration::from_secs(1));
            for name in &names[1..] {
                containers.add(name, &labels);
            }
            let took = wait_until(
                "three labelled containers in the ring",
                FOLLOW_LIMIT,
                || {
                    lab.backends()
                        .is_some_and(|l| l.len() == 3 && l.iter().all(|b| b.slots > 0))
                },
            );
            eprintln!("scaled to 3 in the ring {took:?} after the last `podman run`");
            // Recorded as the labels' doing, so a restarted agent still removes them.
            let state = fs::read_to_string(&lab.agent().state).expect("reading the state file");
            assert_eq!(state.matches("\"discovered\": true").count(), 3, "{state}");
            thread::sleep(Duration::from_secs(2));
            // Each replica killed hard, then waited for until xlb has removed it: new
            // connections sent to it in between are in flight to a container killed hard.
            let mut windows = Vec::new();
            for name in &names[1..] {
                let killing = Instant::now();
                containers.remove(name);
                let took = wait_until("the killed replica is removed", FOLLOW_LIMIT, || {
                    lab.backends()
                        .is_some_and(|l| backend_of(&l, name).is_none())
                });
                eprintln!("{name} removed {took:?} after `podman rm -f` returned");
                windows.push((killing, Instant::now()));
            }
            assert_eq!(lab.backends().map(|l| l.len()), Some(1));
            thread::sleep(Duration::from_secs(2));
            windows
        };
        let marks = std::panic::catch_unwind(std::panic::AssertUnwindSafe(scale));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let answers = stream.join().expect("the client stream");
        (
            answers,
            marks.unwrap_or_else(|p| std::panic::resume_unwind(p)),
        )
    });
    let windows = marks;
    let back_to_one = windows.last().expect("two kills").1;
    let failed: Vec<&Answer> = answers.iter().filter(|a| a.result.is_err()).collect();
    let mut served: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &answers {
        if let Ok(name) = &a.result {
            assert!(
                names.contains(name),
                "an answer naming no container: {name:?}"
            );
            *served.entry(name).or_default() += 1;
        }
    }
    eprintln!(
        "{} requests, {} failed, served by {served:?}",
        answers.len(),
        failed.len()
    );
    assert!(served.len() == 3, "not every container served: {served:?}");
    // Only a request sent while a replica was being killed, before xlb had taken it out,
    // may fail.
    for a in &failed {
        assert!(
            windows
                .iter()
                .any(|(killing, removed)| a.ended >= *killing && a.started <= *removed),
            "a request failed outside the kills: {:?}",
            a.result
        );
    }
    let window_ms: Vec<u128> = windows
        .iter()
        .map(|(k, r)| r.duration_since(*k).as_millis())
        .collect();
    eprintln!(
        "failed: {:?}, all within the kill windows of {window_ms:?} ms",
        failed
            .iter()
            .map(|a| a.result.as_ref().err())
            .collect::<Vec<_>>()
    );
    for a in answers.iter().filter(|a| a.started > back_to_one) {
        assert_eq!(
            a.result.as_deref(),
            Ok(names[0].as_str()),
            "a request after the scale-down"
        );
    }
    assert_eq!(counter(&lab.agent().stats(), "xdp_aborted"), 0);
    drop(containers);
    drop(lab);
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn config_containers_are_found_at_start_and_added_when_they_start() {
    let lab = Lab::new();
    let pid = std::process::id();
    let (early, late) = (format!("{PREFIX}{pid}-c0"), format!("{PREFIX}{pid}-c1"));
    let mut containers = Containers::start(&lab.podman, 0);
    containers.add(&early, &["--expose", "8080"]);
    containers.wait_serving();
    let config = lab.podman.dir.join("xlb.toml");
    fs::write(
        &config,
        format!(
            "[[vip]]\naddress = \"{VIP}/tcp\"\n\
             [[vip.backend]]\ncontainer = \"{early}\"\n\
             [[vip.backend]]\ncontainer = \"{late}\"\nport = {HTTP_PORT}\nweight = 2\n"
        ),
    )
    .expect("writing the config");
    lab.start_agent(&["--config", &config.display().to_string()]);
    // The running one at its exposed port; the other is not there yet.
    let listed = lab.backends().expect("the config's VIP");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let first = backend_of(&listed, &early).expect("the running container");
    assert_eq!(
        first.addr,
        SocketAddr::from((containers.addr(&early), HTTP_PORT))
    );
    assert!(
        lab.agent()
            .process
            .log()
            .contains(&format!("container {late}: no container named '{late}'")),
        "no warning about the missing container:\n{}",
        lab.agent().process.log()
    );

    containers.add(&late, &[]);
    containers.wait_one_serving(&late);
    let took = wait_until("the config's second container joins", FOLLOW_LIMIT, || {
        lab.backends().is_some_and(|l| {
            backend_of(&l, &late).is_some_and(|b| {
                b.weight == 2
                    && b.slots > 0
                    && b.addr == SocketAddr::from((containers.addr(&late), HTTP_PORT))
            })
        })
    });
    eprintln!("the config's container joined {took:?} after it served");
    let served = lab.requests(30);
    assert!(
        served.contains_key(&early) && served.contains_key(&late),
        "{served:?}"
    );
    // The file still says the same: a reload finds nothing to change.
    let said = lab.agent().cli(&["reload"]);
    assert!(said.contains("nothing changed"), "{said}");
    assert_eq!(lab.backends().expect("the VIP").len(), 2);
    drop(containers);
    drop(lab);
}
