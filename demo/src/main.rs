//! xlb's demo: a web server, a database and a processing service, each as replicated
//! containers behind its own VIP; real TCP traffic through the XDP load balancer; a live
//! replica swap that moves only the flows of the changed replicas; and a teardown that leaves
//! nothing behind, also on Ctrl-C.
//!
//! When `podman` is installed the containers are real podman containers (`busybox httpd`
//! from a local image, on podman's bridge), and the agent runs in the host namespace next to
//! that bridge (see [`podman`]), run with `--containers podman`: the demo then scales the web
//! service up by two replicas that carry only the label `xlb.vip` and down again with
//! `podman rm`, and xlb follows both on its own. Otherwise, or with `--no-podman`, they are network
//! namespaces with a TCP server thread each, and everything runs in namespaces named
//! `xlbdemo-*`, so the host's own network is never touched.
//!
//! Last, in both modes, direct server return ([`dsr`]): replicas behind a router in
//! namespaces of their own, a second agent tunnelling to them, replies that bypass it.

mod agent;
mod dsr;
mod lab;
mod podman;
mod report;
mod traffic;

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::{
        signal::kill,
        statfs::{BPF_FS_MAGIC, statfs},
    },
    unistd::{Pid, geteuid},
};

use crate::{
    agent::{Agent, AgentPaths, Xlb},
    lab::{LIVE_ADD, LIVE_REMOVE, LIVE_SERVICE, Lab, SERVICES},
    podman::{HostForwarding, Podman},
    report::{Row, compare, render_table, tally},
    traffic::{Server, Wire, listen, requests},
};

/// Run xlb's containers demo (needs root: it creates network namespaces and attaches XDP).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The `xlb` binary (built by `cargo build --release -p lb-userspace`).
    #[arg(long, default_value = "target/release/xlb")]
    xlb: PathBuf,

    /// Requests per VIP (at most 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    requests: u16,

    /// Passed on to `xlb run --xdp-mode` (auto, native, skb or tc); the agent's default if
    /// unset. native and skb also tune the veths the way XDP on every interface needs.
    #[arg(long)]
    xdp_mode: Option<String>,

    /// Use network-namespace containers even when podman is installed.
    #[arg(long)]
    no_podman: bool,
}

/// Namespace and container names start with this (`xlbdemo-web-1-PID-N`), so `ip netns
/// list` and `podman ps` show what they are and a later run can remove what a killed one left
/// behind.
pub const PREFIX: &str = "xlbdemo-";

/// Set by SIGINT or SIGTERM; every step checks it, and teardown runs either way.
pub struct Interrupt(Arc<AtomicBool>);

#[derive(Debug)]
struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

impl Interrupt {
    fn install() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, Arc::clone(&flag))
                .context("installing the Ctrl-C handler")?;
        }
        Ok(Self(flag))
    }

    /// # Errors
    /// [`Interrupted`] once Ctrl-C was pressed.
    pub fn check(&self) -> Result<()> {
        if self.0.load(Ordering::Relaxed) {
            Err(Interrupted.into())
        } else {
            Ok(())
        }
    }
}

fn step(msg: impl fmt::Display) {
    println!("==> {msg}");
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.chain().any(|c| c.is::<Interrupted>()) => {
            eprintln!("xlb-demo: interrupted; everything was torn down");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("xlb-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if !geteuid().is_root() {
        bail!(
            "the demo needs root (it creates network namespaces and attaches XDP): run it with sudo"
        );
    }
    let bin = fs::canonicalize(&args.xlb).with_context(|| {
        format!(
            "the xlb binary is not at {}: build it with `cargo build --release -p lb-userspace`, \
             or pass --xlb PATH",
            args.xlb.display()
        )
    })?;
    let interrupt = Interrupt::install()?;
    let use_podman = if args.no_podman {
        println!("--no-podman: using network-namespace containers");
        false
    } else if which::which("podman").ok().is_some() {
        println!("podman found: using podman containers");
        true
    } else {
        println!("podman not found: using network-namespace containers");
        false
    };
    let start = Instant::now();
    let mut demo = Demo::default();
    demo.use_podman = use_podman;
    let result = demo.run(args, bin, &interrupt);
    if let Err(e) = &result
        && !e.chain().any(|c| c.is::<Interrupted>())
        && let Some(agent) = &demo.agent
    {
        if let Ok(stats) = xlb_stats(&demo) {
            eprintln!("xlb-demo: `xlb stats` at the failure:");
            for line in stats.lines() {
                eprintln!("    {line}");
            }
        }
        let tail = agent.log_tail(20);
        if !tail.is_empty() {
            eprintln!("xlb-demo: the agent's last log lines:");
            for line in tail.lines() {
                eprintln!("    {line}");
            }
        }
    }
    if result
        .as_ref()
        .is_err_and(|e| e.chain().any(|c| c.is::<Interrupted>()))
    {
        println!();
        println!("interrupted (Ctrl-C)");
    }
    let teardown = demo.teardown();
    if result.is_ok() && teardown.is_ok() {
        println!("done in {:.1} s", start.elapsed().as_secs_f64());
    }
    match (result, teardown) {
        (Err(e), Err(t)) => Err(e.context(format!("teardown also failed: {t:#}"))),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// Everything the demo creates, so teardown can undo exactly what exists, in order.
#[derive(Default)]
struct Demo {
    bin: Option<PathBuf>,
    work: Option<Workdir>,
    lab: Option<Lab>,
    servers: Vec<Server>,
    agent: Option<Agent>,
    use_podman: bool,
    podman: Option<Podman>,
    /// podman names of every container started (or being started), for teardown.
    podman_containers: Vec<String>,
    /// Podman mode: the host's forwarding sysctls as they were, for teardown.
    forwarding: Option<HostForwarding>,
    /// Podman mode: podman0 is ours until teardown ends.
    podman0_lock: Option<podman::Podman0Lock>,
}

impl Demo {
    fn run(&mut self, args: &Args, bin: PathBuf, interrupt: &Interrupt) -> Result<()> {
        let pid = std::process::id();
        let work = self.work.insert(Workdir::create(pid)?);
        self.bin = Some(bin.clone());
        if self.use_podman {
            self.podman0_lock = Some(podman::Podman0Lock::acquire()?);
            let podman = self.podman.insert(Podman::new(&work.dir)?);
            let stale = podman.ours(None);
            if !stale.is_empty() {
                println!("removing containers of earlier runs: {}", stale.join(", "));
                podman.remove(&stale)?;
            }
        }
        let xlb = Xlb {
            bin,
            socket: work.dir.join("xlb.sock"),
        };
        let plan = lab::container_plan();

        let names = plan
            .iter()
            .map(|(n, _, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        // Only XDP on every interface needs the veths tuned; the agent's default puts veths
        // and bridges on the TC hook, which takes them as the kernel sets them up.
        let tune_for_xdp = matches!(args.xdp_mode.as_deref(), Some("native" | "skb"));
        let protocol = if self.use_podman {
            self.build_podman_lab(interrupt, &names, tune_for_xdp)?;
            Wire::Http
        } else {
            self.build_netns_lab(interrupt, &names, tune_for_xdp)?;
            Wire::Line
        };
        let work = self.work.as_ref().context("no work directory")?;
        let lab = self.lab.as_ref().context("no lab")?;
        interrupt.check()?;

        step(if lab.lb.is_some() {
            "starting the xlb agent in the lb namespace"
        } else {
            "starting the xlb agent in the host namespace (next to podman0)"
        });
        let paths = AgentPaths {
            state: &work.dir.join("state.json"),
            bpffs: &work.pins,
            log: &work.dir.join("xlb.log"),
        };
        // Podman mode: the agent also turns labelled containers into backends.
        let discovery: &[&str] = if self.use_podman {
            &["--containers", "podman"]
        } else {
            &[]
        };
        println!(
            "    $ xlb run{} --iface {}{} --socket {} --state {} --bpffs {}",
            discovery
                .iter()
                .map(|a| format!(" {a}"))
                .collect::<String>(),
            lab.lb_ifaces.join(" --iface "),
            args.xdp_mode
                .as_deref()
                .map(|m| format!(" --xdp-mode {m}"))
                .unwrap_or_default(),
            xlb.socket.display(),
            paths.state.display(),
            paths.bpffs.display()
        );
        let agent = self.agent.insert(Agent::start(
            &xlb,
            lab.lb.map(|id| lab.ns(id)),
            &lab.lb_ifaces,
            &paths,
            args.xdp_mode.as_deref(),
            discovery,
        )?);
        let waited = agent.wait_ready(&xlb, interrupt)?;
        println!(
            "    ready after {:.1} s (log: {})",
            waited.as_secs_f64(),
            paths.log.display()
        );

        step(format!(
            "configuring {} VIPs and their backends (export XLB_SOCKET={})",
            SERVICES.len(),
            xlb.socket.display()
        ));
        for (s, svc) in SERVICES.iter().enumerate() {
            interrupt.check()?;
            xlb.run(&["vip", "add", &svc.vip_arg()])?;
            for c in lab
                .containers
                .iter()
                .filter(|c| c.service == s && c.initial)
            {
                backend_add(&xlb, &svc.vip_arg(), c)?;
            }
        }

        step(format!(
            "sending {} requests to each VIP from the client namespace, one TCP connection each",
            args.requests
        ));
        let client = lab.ns(lab.client);
        let mut first_round = Vec::new();
        let mut rows = Vec::new();
        for (s, svc) in SERVICES.iter().enumerate() {
            let t = Instant::now();
            let answers = client
                .run(|| requests(svc.vip, svc.first_port, args.requests, protocol, interrupt))??;
            println!(
                "    {} {}: {} answers in {:.2} s",
                svc.label,
                svc.vip,
                answers.len(),
                t.elapsed().as_secs_f64()
            );
            let names: Vec<&str> = lab
                .containers
                .iter()
                .filter(|c| c.service == s && c.initial)
                .map(|c| c.name.as_str())
                .collect();
            rows.extend(table_rows(svc, &answers, &names));
            first_round.push(answers);
        }
        println!();
        print!("{}", render_table(&rows));
        println!();

        let svc = &SERVICES[LIVE_SERVICE];
        let removed = lab.container(LIVE_SERVICE, LIVE_REMOVE);
        let added = lab.container(LIVE_SERVICE, LIVE_ADD);
        let last_port = svc.first_port + args.requests - 1;
        step(format!(
            "live change: {} leaves, {} joins, while the same source ports {}-{last_port} connect again",
            removed.name, added.name, svc.first_port
        ));
        xlb.run(&["backend", "del", &svc.vip_arg(), &removed.addr_arg()])?;
        backend_add(&xlb, &svc.vip_arg(), added)?;
        interrupt.check()?;
        let after = client
            .run(|| requests(svc.vip, svc.first_port, args.requests, protocol, interrupt))??;
        let before = &first_round[LIVE_SERVICE];
        let names: Vec<&str> = lab
            .containers
            .iter()
            .filter(|c| c.service == LIVE_SERVICE && c.name != removed.name)
            .map(|c| c.name.as_str())
            .collect();
        println!();
        print!("{}", render_table(&table_rows(svc, &after, &names)));
        println!();
        let moves = compare(before, &after, &removed.name, &added.name);
        println!(
            "    flows that moved: {} of {} (the other {} kept their container)",
            moves.moved,
            moves.flows,
            moves.flows - moves.moved
        );
        for ((from, to), n) in &moves.pairs {
            println!("      {from} -> {to}: {n}");
        }
        let mark = if moves.minimal() { "ok" } else { "FAILED" };
        println!(
            "    check [{mark}]: {} of {} moved flows were on {} before or are on {} after; \
             {} flows still reach {}",
            moves.explained,
            moves.moved,
            removed.name,
            added.name,
            moves.on_removed_after,
            removed.name
        );

        if let Some(podman) = &self.podman {
            scale_by_labels(
                podman,
                &mut self.podman_containers,
                &xlb,
                client,
                args.requests,
                protocol,
                interrupt,
            )?;
        }

        step("xlb stats");
        xlb.run(&["stats"])?;

        let work = self.work.as_ref().context("no work directory")?;
        dsr::run(
            &xlb.bin,
            &work.dir,
            &work.dsr_pins(),
            args.requests,
            interrupt,
        )?;

        if !moves.minimal() {
            bail!(
                "{} flows moved between unchanged replicas or still reach {}: that is not Maglev's \
                 minimal disruption",
                moves.moved - moves.explained,
                removed.name
            );
        }
        Ok(())
    }

    /// Namespace mode: the namespaces and a TCP server thread in each container's.
    fn build_netns_lab(
        &mut self,
        interrupt: &Interrupt,
        names: &str,
        tune_for_xdp: bool,
    ) -> Result<()> {
        step(format!(
            "creating {} network namespaces: client, lb, and one per container ({names})",
            lab::container_plan().len() + 2,
        ));
        let lab = self.lab.insert(Lab::build(interrupt, tune_for_xdp)?);
        println!(
            "    client {} --veth-- lb (routes, forwards; xlb on every interface) --veth-- containers",
            lab.client_addr
        );
        for c in &lab.containers {
            println!(
                "    {:<7} {:<15} serves {}",
                c.name, c.addr, SERVICES[c.service].label
            );
        }

        step(format!(
            "starting {} containers: a TCP server in each that answers with its name",
            lab.containers.len()
        ));
        for c in &lab.containers {
            let port = SERVICES[c.service].backend_port;
            let ns = c.ns.context("a namespace container without a namespace")?;
            let listener = lab
                .ns(ns)
                .run(|| listen(port))?
                .with_context(|| format!("{}: listening on port {port}", c.name))?;
            self.servers.push(Server::start(listener, c.name.clone())?);
        }
        Ok(())
    }

    /// Podman mode: the client namespace, its veth to the host, and the podman containers.
    fn build_podman_lab(
        &mut self,
        interrupt: &Interrupt,
        names: &str,
        tune_for_xdp: bool,
    ) -> Result<()> {
        let podman = self.podman.as_ref().context("no podman")?;
        let work = self.work.as_ref().context("no work directory")?;
        if podman.ensure_image(&work.dir)? {
            println!(
                "built the image {} from the host's static busybox",
                podman::IMAGE
            );
        }
        step(format!(
            "starting {} podman containers from {} (runtime runc), `busybox httpd` answering \
             with the container's name: {names}",
            lab::container_plan().len(),
            podman::IMAGE
        ));
        self.forwarding = Some(HostForwarding::save());
        let lab = self.lab.insert(Lab::podman(
            podman,
            &mut self.podman_containers,
            interrupt,
            tune_for_xdp,
        )?);
        let link = lab.host_link.as_ref().context("no host link")?;
        println!(
            "    client {} --veth-- host {} {} (routes; xlb here and on {}) --{}-- containers",
            lab.client_addr,
            link.host_if,
            link.host_ip,
            podman::BRIDGE,
            podman::BRIDGE
        );
        for c in &lab.containers {
            println!(
                "    {:<7} {:<15} serves {:<11} (podman container {})",
                c.name,
                c.addr,
                SERVICES[c.service].label,
                c.podman.as_deref().unwrap_or("?")
            );
        }
        let mut slowest = std::time::Duration::ZERO;
        for c in &lab.containers {
            let addr = std::net::SocketAddrV4::new(c.addr, SERVICES[c.service].backend_port);
            slowest = slowest.max(podman::wait_serving(&c.name, addr, interrupt)?);
        }
        println!(
            "    all {} answer HTTP (waited {:.1} s)",
            lab.containers.len(),
            slowest.as_secs_f64()
        );
        Ok(())
    }

    /// Undoes what exists, in reverse order of creation: agent, servers, namespaces, files.
    /// Every step is bounded; failures are collected so one does not skip the rest.
    fn teardown(&mut self) -> Result<()> {
        self.teardown_printing(true)
    }

    /// [`Demo::teardown`], printing what it does only if `print`: a panic that came from
    /// printing (stdout closed) must not stop the cleanup with a second one.
    fn teardown_printing(&mut self, print: bool) -> Result<()> {
        if self.work.is_none() {
            return Ok(());
        }
        let say = |msg: &str| {
            if print {
                println!("{msg}");
            }
        };
        say("==> tearing down");
        let mut failures = Vec::new();
        if let Some(mut agent) = self.agent.take() {
            match agent.stop() {
                Ok(how) => say(&format!("    agent {how}")),
                Err(e) => failures.push(format!("stopping the agent: {e:#}")),
            }
        }
        let n = self.servers.len();
        for s in &mut self.servers {
            s.stop();
        }
        self.servers.clear();
        if n > 0 {
            say(&format!("    {n} container servers stopped"));
        }
        if let Some(lab) = self.lab.take() {
            let podman_mode = lab.host_link.is_some();
            let namespaces = if podman_mode {
                1
            } else {
                lab.containers.len() + 2
            };
            drop(lab);
            if podman_mode {
                say("    client namespace and its veth to the host deleted");
            } else {
                say(&format!("    {namespaces} network namespaces deleted"));
            }
        }
        if let Some(podman) = &self.podman
            && !self.podman_containers.is_empty()
        {
            match podman.remove(&self.podman_containers) {
                Ok(()) => say(&format!(
                    "    {} podman containers removed (the image {} stays, as a cache)",
                    self.podman_containers.len(),
                    podman::IMAGE
                )),
                Err(e) => failures.push(format!("removing the podman containers: {e:#}")),
            }
            self.podman_containers.clear();
        }
        // Checked before the work directory (holding podman's config) goes.
        let mut podman_left: Vec<String> = self
            .podman
            .take()
            .map(|p| p.ours(Some(std::process::id())))
            .unwrap_or_default()
            .into_iter()
            .map(|c| format!("podman container {c}"))
            .collect();
        if let Some(forwarding) = self.forwarding.take() {
            for sysctl in forwarding.restore() {
                say(&format!("    {sysctl} restored"));
            }
        }
        if let Some(work) = self.work.take() {
            if let Err(e) = work.remove() {
                failures.push(format!("{e:#}"));
            } else {
                say("    pins, socket, state and log removed");
            }
        }
        let mut left = leftovers(std::process::id());
        left.append(&mut podman_left);
        self.podman0_lock = None;
        if left.is_empty() && failures.is_empty() {
            say("    left behind: nothing");
        }
        failures.extend(left.into_iter().map(|l| format!("left behind: {l}")));
        if failures.is_empty() {
            Ok(())
        } else {
            bail!("teardown: {}", failures.join("; "))
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // Only does something if `teardown` was skipped (a panic).
        let _ = self.teardown_printing(!std::thread::panicking());
    }
}

/// Podman mode: scales the live service up by two replicas that only carry the label
/// `xlb.vip` (the agent, run with `--containers podman`, adds them itself), shows the new
/// distribution, then removes them and shows that their flows went back to the others.
fn scale_by_labels(
    podman: &Podman,
    started: &mut Vec<String>,
    xlb: &Xlb,
    client: &xlb_netns::Netns,
    n: u16,
    protocol: Wire,
    interrupt: &Interrupt,
) -> Result<()> {
    let svc = &SERVICES[LIVE_SERVICE];
    let vip = svc.vip_arg();
    let labels = [
        format!("xlb.vip={vip}"),
        format!("xlb.port={}", svc.backend_port),
    ];
    let replicas: Vec<String> = (LIVE_ADD + 1..=LIVE_ADD + 2)
        .map(|i| format!("{}-{i}", svc.key))
        .collect();
    step(format!(
        "scaling the {} up with the container engine alone: podman run --label {} --label {}",
        svc.label, labels[0], labels[1]
    ));
    let pid = std::process::id();
    let t = Instant::now();
    for name in &replicas {
        let podman_name = podman::container_name(pid, name);
        println!(
            "    $ podman run -d --name {podman_name} --label {} --label {} {} ...",
            labels[0],
            labels[1],
            podman::IMAGE
        );
        started.push(podman_name.clone());
        podman.start_labelled(&podman_name, name, svc.backend_port, &labels)?;
    }
    let podman_names: Vec<String> = replicas
        .iter()
        .map(|r| podman::container_name(pid, r))
        .collect();
    // The replicas' backends: (container, ring slots).
    let listed = || -> Result<Vec<(String, u64)>> {
        let text = xlb.output(&["backend", "list", &vip, "--json"])?;
        let status: serde_json::Value =
            serde_json::from_str(&text).context("`xlb backend list --json` is not JSON")?;
        Ok(status["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| {
                let name = b["container"].as_str()?;
                podman_names
                    .iter()
                    .any(|p| p == name)
                    .then(|| (name.to_owned(), b["slots"].as_u64().unwrap_or(0)))
            })
            .collect())
    };
    wait_for("xlb to add the labelled replicas", interrupt, || {
        let found = listed()?;
        Ok(found.len() == podman_names.len() && found.iter().all(|(_, slots)| *slots > 0))
    })?;
    println!(
        "    xlb added them {:.1} s after the first `podman run`",
        t.elapsed().as_secs_f64()
    );
    xlb.run(&["backend", "list", &vip])?;
    let answers = client.run(|| requests(svc.vip, svc.first_port, n, protocol, interrupt))??;
    let mut names: Vec<&str> = vec![];
    for a in &answers {
        if !names.contains(&a.as_str()) {
            names.push(a);
        }
    }
    names.sort_unstable();
    println!();
    print!("{}", render_table(&table_rows(svc, &answers, &names)));
    println!();
    if let Some(idle) = replicas.iter().find(|r| !answers.contains(r)) {
        bail!("{idle} was added by its label but served none of {n} requests");
    }

    step(format!(
        "scaling back down: podman rm {}",
        podman_names.join(" ")
    ));
    let t = Instant::now();
    podman.remove(&podman_names)?;
    started.retain(|c| !podman_names.contains(c));
    wait_for("xlb to remove the stopped replicas", interrupt, || {
        Ok(listed()?.is_empty())
    })?;
    println!(
        "    xlb removed them {:.1} s after `podman rm`",
        t.elapsed().as_secs_f64()
    );
    let answers = client.run(|| requests(svc.vip, svc.first_port, n, protocol, interrupt))??;
    let names: Vec<&str> = names
        .into_iter()
        .filter(|n| !replicas.iter().any(|r| r == n))
        .collect();
    println!();
    print!("{}", render_table(&table_rows(svc, &answers, &names)));
    println!();
    if let Some(gone) = replicas.iter().find(|r| answers.contains(r)) {
        bail!("{gone} still served requests after it was removed");
    }
    Ok(())
}

/// Polls `done` every 100 ms for up to 15 s.
fn wait_for(
    what: &str,
    interrupt: &Interrupt,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done()? {
        interrupt.check()?;
        if Instant::now() > deadline {
            bail!("waited 15 s for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `xlb backend add VIP ...`, by container name in podman mode.
fn backend_add(xlb: &Xlb, vip: &str, c: &lab::Container) -> Result<String> {
    let mut args = vec!["backend", "add", vip];
    let backend = c.backend_args();
    args.extend(backend.iter().map(String::as_str));
    xlb.run(&args)
}

/// `xlb stats`, quietly, for error reports.
fn xlb_stats(demo: &Demo) -> Result<String> {
    let work = demo.work.as_ref().context("no work directory")?;
    let xlb = Xlb {
        bin: demo.bin.clone().context("no xlb binary")?,
        socket: work.dir.join("xlb.sock"),
    };
    xlb.output(&["stats"])
}

fn table_rows(svc: &lab::Service, answers: &[String], containers: &[&str]) -> Vec<Row> {
    tally(answers, containers)
        .into_iter()
        .map(|(container, served)| Row {
            service: svc.label.to_owned(),
            vip: svc.vip.to_string(),
            container,
            served,
            total: answers.len(),
        })
        .collect()
}

const BPFFS_ROOT: &str = "/sys/fs/bpf";
const WORK_ROOT: &str = "/tmp";

/// The demo's files: `/tmp/xlbdemo-PID` (socket, state, log) and the agent's pin directory,
/// `/sys/fs/bpf/xlbdemo-PID` when bpffs is mounted there, otherwise a bpffs the demo mounts
/// at `/tmp/xlbdemo-PID/bpffs` (so nothing is mounted on the host's `/sys/fs/bpf`).
struct Workdir {
    dir: PathBuf,
    pins: PathBuf,
    private_bpffs: Option<PathBuf>,
}

impl Workdir {
    fn create(pid: u32) -> Result<Self> {
        cleanup_stale_runs();
        let dir = Path::new(WORK_ROOT).join(format!("{}{pid}", PREFIX));
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        }
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut work = Self {
            pins: PathBuf::new(),
            private_bpffs: None,
            dir,
        };
        if is_bpffs(Path::new(BPFFS_ROOT)) {
            work.pins = Path::new(BPFFS_ROOT).join(format!("{}{pid}", PREFIX));
        } else {
            let mnt = work.dir.join("bpffs");
            fs::create_dir(&mnt).with_context(|| format!("creating {}", mnt.display()))?;
            mount(
                Some("bpf"),
                &mnt,
                Some("bpf"),
                MsFlags::empty(),
                None::<&str>,
            )
            .with_context(|| format!("mounting bpffs at {}", mnt.display()))?;
            work.pins = mnt.join("xlb");
            work.private_bpffs = Some(mnt);
        }
        Ok(work)
    }

    /// The DSR step's agent pins beside the main agent's, so neither sees the other's maps.
    fn dsr_pins(&self) -> PathBuf {
        let mut name = self.pins.file_name().unwrap_or_default().to_owned();
        name.push("-dsr");
        self.pins.with_file_name(name)
    }

    fn remove(self) -> Result<()> {
        remove_dir_if_present(&self.pins)?;
        remove_dir_if_present(&self.dsr_pins())?;
        if let Some(mnt) = &self.private_bpffs {
            umount2(mnt, MntFlags::MNT_DETACH)
                .with_context(|| format!("unmounting {}", mnt.display()))?;
        }
        remove_dir_if_present(&self.dir)
    }
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// The pid in `xlbdemo-PID`, if `name` is one of ours.
fn run_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    // The DSR step's pins: `xlbdemo-PID-dsr`.
    rest.strip_suffix("-dsr").unwrap_or(rest).parse().ok()
}

/// Removes the files and pins of demo runs whose process is gone (killed with SIGKILL);
/// their namespaces are removed by `Network::new`. Best effort: a leftover that cannot be
/// removed is reported by the final check of this run only if it is this run's.
fn cleanup_stale_runs() {
    for root in [WORK_ROOT, BPFFS_ROOT] {
        let Ok(entries) = fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(run_pid) else {
                continue;
            };
            if kill(Pid::from_raw(pid), None).is_ok() {
                continue;
            }
            let path = entry.path();
            let _ = umount2(&path.join("bpffs"), MntFlags::MNT_DETACH);
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// What this run would have left behind: namespaces, files, pins.
fn leftovers(pid: u32) -> Vec<String> {
    let mut left = Vec::new();
    let tag = format!("-{pid}-");
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && name.contains(&tag) {
                left.push(format!("namespace {name}"));
            }
        }
    }
    for root in [WORK_ROOT, BPFFS_ROOT] {
        for suffix in ["", "-dsr"] {
            let p = Path::new(root).join(format!("{PREFIX}{pid}{suffix}"));
            if p.exists() {
                left.push(p.display().to_string());
            }
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_pid_parses_only_our_names() {
        assert_eq!(run_pid("xlbdemo-1234"), Some(1234));
        assert_eq!(run_pid("xlbdemo-1234-dsr"), Some(1234));
        assert_eq!(run_pid("xlbdemo-web-1-1234-3"), None);
        assert_eq!(run_pid("other-1234"), None);
    }

    #[test]
    fn args_default_to_the_release_binary() {
        let a = Args::try_parse_from(["xlb-demo"]).unwrap();
        assert_eq!(a.xlb, PathBuf::from("target/release/xlb"));
        assert_eq!(a.requests, 100);
        assert!(Args::try_parse_from(["xlb-demo", "--requests", "0"]).is_err());
    }
}
