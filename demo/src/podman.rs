//! Podman mode: the services run as real podman containers (`busybox httpd` from a local
//! image built from the host's static busybox), on podman's default bridge `podman0`.
//!
//! podman0 lives in the host namespace, so here the agent runs there too and attaches to the
//! client's veth and to podman0, both on the TC hook by default. The client is a namespace
//! joined to the host by a veth. Requests: xlb on the host's veth rewrites VIP -> container
//! and redirects the packet into podman0, which delivers it to the container. Replies: the
//! containers send them to their gateway, so they come up on podman0, where xlb puts the VIP
//! back and redirects them to the client's veth.
//!
//! Every podman call passes `--runtime runc` (crun fails on hybrid cgroups) and a
//! `CONTAINERS_CONF` of the demo's own (lowered ulimits), so the user's podman configuration
//! is untouched. podman runs in its own process group, so Ctrl-C reaches only the demo,
//! which then removes the containers itself.

use std::{
    fs,
    net::Ipv4Addr,
    os::{
        fd::AsRawFd,
        unix::{fs::symlink, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{sys::signal::kill, unistd::Pid};
use xlb_netns::{Netns, ipnet::Ipv4Net};

use crate::{Interrupt, PREFIX};

/// Shared with xlb's podman test: the same bytes either way, imported once.
pub const IMAGE: &str = "localhost/xlb-busybox:latest";
/// The bridge podman's default network uses.
pub const BRIDGE: &str = "podman0";
/// Bounds every podman and `ip` command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// podman with the demo's runtime and configuration.
pub struct Podman {
    conf: PathBuf,
}

impl Podman {
    /// Writes the demo's `containers.conf` into `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        let conf = dir.join("containers.conf");
        fs::write(
            &conf,
            "[containers]\ndefault_ulimits = [\"nofile=1024:20000\", \"nproc=4096:4096\"]\n",
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        Ok(Self { conf })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", &self.conf)
            .args(["--runtime", "runc"]);
        cmd
    }

    /// Runs `podman ARGS`; returns stdout, or an error with stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        bounded(self.command().args(args))
    }

    /// Imports [`IMAGE`] from a rootfs holding only the host's static busybox, unless it
    /// exists. Returns whether it had to.
    pub fn ensure_image(&self, scratch: &Path) -> Result<bool> {
        if self.run(&["image", "exists", IMAGE]).is_ok() {
            return Ok(false);
        }
        let busybox = which::which("busybox")
            .ok()
            .context("busybox not found: install busybox-static (`cargo xtask bootstrap` does)")?;
        let elf = fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?;
        if has_interpreter(&elf) {
            bail!(
                "{} is dynamically linked: install busybox-static (`cargo xtask bootstrap` does)",
                busybox.display()
            );
        }
        let rootfs = scratch.join("rootfs");
        fs::create_dir_all(rootfs.join("bin"))?;
        fs::create_dir_all(rootfs.join("tmp"))?;
        fs::copy(&busybox, rootfs.join("bin/busybox")).context("copying busybox")?;
        symlink("busybox", rootfs.join("bin/sh")).context("linking /bin/sh")?;
        let tar = scratch.join("rootfs.tar");
        bounded(
            Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        )?;
        self.run(&["import", &tar.display().to_string(), IMAGE])?;
        let _ = fs::remove_dir_all(&rootfs);
        let _ = fs::remove_file(&tar);
        Ok(true)
    }

    /// Starts `name` serving HTTP on `port`, answering every request with `answer`.
    pub fn start(&self, name: &str, answer: &str, port: u16) -> Result<()> {
        self.start_labelled(name, answer, port, &[])
    }

    /// As [`Self::start`], with `labels` (`KEY=VALUE`) on the container.
    pub fn start_labelled(
        &self,
        name: &str,
        answer: &str,
        port: u16,
        labels: &[String],
    ) -> Result<()> {
        let script = format!(
            "mkdir -p /www && echo {answer} > /www/index.html && exec busybox httpd -f -p {port} -h /www"
        );
        let mut args = vec!["run", "-d", "--name", name];
        for label in labels {
            args.extend(["--label", label]);
        }
        args.extend([IMAGE, "/bin/sh", "-c", &script]);
        self.run(&args).map(drop)
    }

    /// The container's address on podman's network.
    pub fn addr(&self, name: &str) -> Result<Ipv4Addr> {
        let text = self.run(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            name,
        ])?;
        text.split_whitespace()
            .find_map(|w| w.parse().ok())
            .with_context(|| format!("container {name} has no IPv4 address"))
    }

    /// `podman rm -f -t 0` (busybox httpd as PID 1 ignores SIGTERM); missing ones are fine.
    pub fn remove(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let mut args = vec!["rm", "-f", "-i", "-t", "0"];
        args.extend(names.iter().map(String::as_str));
        self.run(&args).map(drop)
    }

    /// The demo's containers that exist, this run's (`pid`) or, with `None`, dead runs'.
    pub fn ours(&self, pid: Option<u32>) -> Vec<String> {
        let Ok(text) = self.run(&[
            "ps",
            "-a",
            "--filter",
            &format!("name=^{PREFIX}"),
            "--format",
            "{{.Names}}",
        ]) else {
            return Vec::new();
        };
        text.split_whitespace()
            .filter(|n| match (container_pid(n), pid) {
                (Some(p), Some(want)) => p == want,
                (Some(p), None) => {
                    i32::try_from(p).is_ok_and(|p| kill(Pid::from_raw(p), None).is_err())
                }
                (None, _) => false,
            })
            .map(str::to_owned)
            .collect()
    }
}

/// An exclusive `flock` on `/run/lock/xlb-podman0.lock`, held while the demo uses podman0:
/// only one XDP program can sit there, and xlb's podman test takes the same lock.
pub struct Podman0Lock {
    _file: fs::File,
}

impl Podman0Lock {
    const PATH: &'static str = "/run/lock/xlb-podman0.lock";

    pub fn acquire() -> Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Self::PATH)
            .with_context(|| format!("opening {}", Self::PATH))?;
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "another xlb run (the demo or xlb's podman test) is using podman0 ({} is \
                 locked): wait for it, or pass --no-podman",
                Self::PATH
            );
        }
        Ok(Self { _file: file })
    }
}

/// podman's name for a demo container: `xlbdemo-PID-web-1`.
pub fn container_name(pid: u32, name: &str) -> String {
    format!("{PREFIX}{pid}-{name}")
}

fn container_pid(podman_name: &str) -> Option<u32> {
    podman_name
        .strip_prefix(PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Whether an ELF64 executable names a dynamic loader (a `PT_INTERP` program header), so
/// cannot run alone in an otherwise empty image.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: usize = 3;
    let field = |at: usize, len: usize| -> usize {
        elf.get(at..at + len).map_or(0, |b| {
            b.iter()
                .rev()
                .fold(0, |acc, &byte| (acc << 8) | usize::from(byte))
        })
    };
    if !elf.starts_with(b"\x7fELF") || elf.get(4) != Some(&2) {
        return true;
    }
    let (phoff, phentsize, phnum) = (field(0x20, 8), field(0x36, 2), field(0x38, 2));
    (0..phnum).any(|i| field(phoff + i * phentsize, 4) == PT_INTERP)
}

/// Runs `cmd` in its own process group (Ctrl-C is the demo's to handle) within
/// [`COMMAND_TIMEOUT`]; returns stdout, or an error with stderr.
fn bounded(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{what} did not finish within {} s",
                COMMAND_TIMEOUT.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The client's veth into the host namespace: `xlbdemoPID` on the host, `eth0` in the
/// client, `10.212.0.1/30` and `.2`; the client routes everything to the host. Deleted on
/// drop (deleting the client namespace would delete it too).
pub struct HostLink {
    pub host_if: String,
    pub host_ip: Ipv4Addr,
    pub client_ip: Ipv4Addr,
}

impl HostLink {
    pub const CLIENT_IF: &'static str = "eth0";

    /// `tune_for_xdp`: the agent will run XDP on the host's end (`--xdp-mode native|skb`).
    pub fn create(client: &Netns, pid: u32, tune_for_xdp: bool) -> Result<Self> {
        let host_if = format!("xlbdemo{pid}");
        let (host_ip, client_ip) = (Ipv4Addr::new(10, 212, 0, 1), Ipv4Addr::new(10, 212, 0, 2));
        // A killed run's veth with the same pid would be in the way.
        let _ = bounded(Command::new("ip").args(["link", "del", &host_if]));
        bounded(Command::new("ip").args([
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
        ]))
        .context("creating the client's veth to the host")?;
        let link = Self {
            host_if,
            host_ip,
            client_ip,
        };
        bounded(Command::new("ip").args([
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &link.host_if,
        ]))?;
        bounded(Command::new("ip").args(["link", "set", &link.host_if, "up"]))?;
        client.add_address(Self::CLIENT_IF, Ipv4Net::new(client_ip, 30)?)?;
        if tune_for_xdp {
            // TX checksum offload off: XDP cannot finish a partial checksum after it rewrote
            // what the client sends (see `Netns::set_tx_checksum`).
            client.set_tx_checksum(Self::CLIENT_IF, false)?;
        }
        client.set_link_up(Self::CLIENT_IF)?;
        client.add_default_route(host_ip.into())?;
        Ok(link)
    }

    /// Whether another demo run (alive) uses the host side of the link's subnet.
    pub fn subnet_in_use() -> bool {
        bounded(Command::new("ip").args(["-4", "-o", "addr", "show", "to", "10.212.0.0/30"]))
            .is_ok_and(|out| !out.trim().is_empty())
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        let _ = bounded(Command::new("ip").args(["link", "del", &self.host_if]));
    }
}

/// The host's forwarding sysctls, put back by [`HostForwarding::restore`]: the agent turns
/// forwarding on in the namespace it runs in, here the host's.
pub struct HostForwarding(Vec<(&'static str, String)>);

impl HostForwarding {
    const FILES: [&'static str; 2] = [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ];

    pub fn save() -> Self {
        Self(
            Self::FILES
                .iter()
                .filter_map(|f| Some((*f, fs::read_to_string(f).ok()?)))
                .collect(),
        )
    }

    /// Returns the sysctls it changed back.
    pub fn restore(&self) -> Vec<&'static str> {
        let mut restored = Vec::new();
        for (file, value) in &self.0 {
            if fs::read_to_string(file).ok().as_deref() != Some(value)
                && fs::write(file, value.trim()).is_ok()
            {
                restored.push(*file);
            }
        }
        restored
    }
}

/// Waits until `name`'s server answers at `addr` (from the host).
pub fn wait_serving(
    name: &str,
    addr: std::net::SocketAddrV4,
    interrupt: &Interrupt,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        interrupt.check()?;
        match crate::traffic::http_get(addr) {
            Ok(_) => return Ok(start.elapsed()),
            Err(e) if start.elapsed() > Duration::from_secs(10) => {
                return Err(e.context(format!("{name} does not answer at {addr} after 10 s")));
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_carry_the_pid() {
        let n = container_name(1234, "web-1");
        assert_eq!(n, "xlbdemo-1234-web-1");
        assert_eq!(container_pid(&n), Some(1234));
        assert_eq!(container_pid("xlbdemo-web-1"), None);
        assert_eq!(container_pid("web-1"), None);
    }

    #[test]
    fn static_and_dynamic_binaries_are_told_apart() {
        // This test binary is dynamically linked.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&me));
        assert!(has_interpreter(b"not an elf"));
    }
}
