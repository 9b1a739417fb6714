//! The `xlb` agent process in the LB namespace, and the `xlb` CLI that talks to it.

use std::{
    ffi::OsStr,
    fs::{self, File},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use xlb_netns::Netns;

use crate::Interrupt;

/// How long the agent may take to load and attach the program and open its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to detach and exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);

/// The `xlb` binary and the socket its CLI commands talk to.
pub struct Xlb {
    pub bin: PathBuf,
    pub socket: PathBuf,
}

impl Xlb {
    fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(&self.bin);
        // Its own process group: Ctrl-C is the demo's to handle (between commands), not a
        // half-done `xlb backend add` to die of.
        cmd.args(args)
            .env("XLB_SOCKET", &self.socket)
            .process_group(0);
        cmd
    }

    /// Runs `xlb ARGS`, printing it as a user would type it and its output indented.
    ///
    /// # Errors
    /// The command could not run or failed; the error carries its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        println!("    $ xlb {}", args.join(" "));
        let out = self.output(args)?;
        for line in out.lines() {
            println!("      {line}");
        }
        Ok(out)
    }

    /// Runs `xlb ARGS` without printing anything.
    pub fn output(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "`xlb {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Where the agent keeps its files.
pub struct AgentPaths<'a> {
    pub state: &'a Path,
    pub bpffs: &'a Path,
    pub log: &'a Path,
}

/// The running `xlb run` process. [`Agent::stop`] ends it gracefully; dropping it kills it.
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    /// Starts `xlb run` inside `lb` (the host namespace if `None`) on `ifaces`, logging to
    /// `paths.log`.
    ///
    /// The agent gets its own process group, so the terminal's Ctrl-C reaches only the demo,
    /// which then stops the agent itself in the right order; and it gets SIGTERM if the demo
    /// dies without doing so.
    pub fn start(
        xlb: &Xlb,
        lb: Option<&Netns>,
        ifaces: &[String],
        paths: &AgentPaths<'_>,
        xdp_mode: Option<&str>,
        extra: &[&str],
    ) -> Result<Self> {
        let mut args: Vec<&OsStr> = vec![OsStr::new("run")];
        args.extend(extra.iter().map(OsStr::new));
        for iface in ifaces {
            args.extend([OsStr::new("--iface"), OsStr::new(iface)]);
        }
        if let Some(mode) = xdp_mode {
            args.extend([OsStr::new("--xdp-mode"), OsStr::new(mode)]);
        }
        args.extend([
            OsStr::new("--socket"),
            xlb.socket.as_os_str(),
            OsStr::new("--state"),
            paths.state.as_os_str(),
            OsStr::new("--bpffs"),
            paths.bpffs.as_os_str(),
        ]);
        let log =
            File::create(paths.log).with_context(|| format!("creating {}", paths.log.display()))?;
        let mut cmd = lb.map_or_else(|| Command::new(&xlb.bin), |ns| ns.command(&xlb.bin));
        cmd.args(&args)
            .env("XLB_SOCKET", &xlb.socket)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
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
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} run", xlb.bin.display()))?;
        Ok(Self {
            child: Some(child),
            log: paths.log.to_owned(),
        })
    }

    /// Waits until `xlb vip list` answers, i.e. the program is attached and the socket is up.
    ///
    /// # Errors
    /// The agent exited, did not answer within [`READY_TIMEOUT`], or Ctrl-C.
    pub fn wait_ready(&mut self, xlb: &Xlb, interrupt: &Interrupt) -> Result<Duration> {
        let start = Instant::now();
        loop {
            interrupt.check()?;
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("the agent exited ({status}) before it was ready");
            }
            let last = match xlb.output(&["vip", "list"]) {
                Ok(_) => return Ok(start.elapsed()),
                Err(e) => e,
            };
            if start.elapsed() > READY_TIMEOUT {
                return Err(last.context(format!(
                    "the agent did not answer within {} s",
                    READY_TIMEOUT.as_secs()
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// The last `n` lines of the agent's log, for error reports.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_TIMEOUT`]. Returns how it
    /// ended.
    pub fn stop(&mut self) -> Result<String> {
        let Some(mut child) = self.child.take() else {
            return Ok("already exited".to_owned());
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        if child.try_wait()?.is_none() {
            let _ = kill(pid, Signal::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(format!("exited ({status})"));
            }
            if start.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let status = child.wait()?;
                return Ok(format!(
                    "did not exit within {} s of SIGTERM; killed ({status})",
                    STOP_TIMEOUT.as_secs()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
