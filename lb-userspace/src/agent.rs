//! `xlb run`: loads and attaches the data plane, restores and persists the desired state, and
//! serves the control API until SIGINT/SIGTERM, when it detaches and cleans up.

use std::{
    collections::HashSet,
    fs,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, bail};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use xlb_core::announce::NodeState;

use crate::{
    announce::AnnounceTable,
    api::{AgentInfo, CounterValue, InterfaceStatus, NodeStatus, Reply, Request, Stats, Status},
    attach::{self as hooks, ModeChoice},
    balancer::{Balancer, BalancerError, DesiredState, Forwarding, Setting, VipSpec, VipStatus},
    config::Change,
    datapath::{Datapath, DatapathConfig, PinnedAttachment},
    encap::Encap,
    health::HealthChecker,
    ownership, paths, relink,
    validate::{self, AddressError, Reason, Role, Route},
};

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub ifaces: Vec<String>,
    pub mode: ModeChoice,
    pub bpffs: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub datapath: DatapathConfig,
    /// On exit, leave the program attached and the maps pinned, for the next agent to adopt.
    pub keep_attached: bool,
    /// Serve Prometheus metrics here.
    pub metrics: Option<std::net::SocketAddr>,
    /// Declarative config: the desired state at start, re-read by `xlb reload` and SIGHUP.
    pub config: Option<PathBuf>,
    /// `--containers ENGINE`: containers labelled `xlb.vip` become backends.
    pub containers: Option<crate::containers::EngineChoice>,
    /// `--announce-table N`: announce VIPs to routers through this routing table
    /// (`crate::announce`).
    pub announce_table: Option<u32>,
    /// `--encap-source`, `--gue-port`: the direct-server-return tunnels' settings given on
    /// the command line; they win over the config file's, at start and on every reload.
    pub encap: Encap,
}

pub fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (it loads XDP programs): run it with sudo");
    }
    Ok(())
}

/// `--keep-attached` promises a data path that outlives the agent: refuse where its pins
/// cannot, before anything is mounted or attached.
fn check_pins_outlive_agent(bpffs: &Path) -> Result<()> {
    match paths::pin_lifetime(bpffs) {
        paths::PinLifetime::OutlivesAgent => Ok(()),
        paths::PinLifetime::DiesWithAgent => {
            let netns = paths::netns_name().unwrap_or_else(|| "NAME".to_owned());
            bail!(
                "--keep-attached cannot keep the data path: this agent runs in a mount namespace \
                 of its own (as under `ip netns exec`) where no bpffs is mounted at {}, so its pins \
                 would vanish when it exits; start it with `nsenter --net=/run/netns/{netns} xlb run \
                 ...` instead of `ip netns exec`, or pass --bpffs DIR on a bpffs mounted in the \
                 host's mount namespace (e.g. `mount -t bpf bpf /run/xlb-bpf`, then --bpffs \
                 /run/xlb-bpf/{netns})",
                bpffs.parent().unwrap_or(bpffs).display()
            )
        }
        paths::PinLifetime::OnlyInPrivateNamespace => {
            warn!(
                bpffs = %bpffs.display(),
                "--keep-attached: this bpffs is mounted only in this agent's own mount namespace, \
                 so the data path lasts only as long as that namespace (under `ip netns exec` it \
                 ends with the agent); to be sure, use `nsenter --net=/run/netns/NAME` or a bpffs \
                 mounted in the host's mount namespace"
            );
            Ok(())
        }
    }
}

fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|_| {
        anyhow::anyhow!("no interface named '{name}' in this network namespace (see `ip link`)")
    })
}

/// Writes `state` so that a crash at any point leaves either the old or the new file:
/// temporary file, fsync, rename, fsync of the directory.
///
/// # Errors
/// Any step failing (a full disk, say); the previous file is then untouched.
pub fn save_state(path: &Path, state: &DesiredState) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&encode_state(state))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("saving state to {}", path.display()))
    })
}

/// A state file's contents: pretty JSON and a final newline.
#[must_use]
pub fn encode_state(state: &DesiredState) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(state).expect("state always serialises");
    bytes.push(b'\n');
    bytes
}

/// Decodes a state file's contents, as [`save_state`] writes them.
///
/// # Errors
/// The bytes are not a JSON desired state.
pub fn parse_state(bytes: &[u8]) -> serde_json::Result<DesiredState> {
    serde_json::from_slice(bytes)
}

fn load_state(path: &Path) -> Result<Option<DesiredState>> {
    match read_regular_file(path) {
        Ok(bytes) => parse_state(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a valid xlb state file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Reads `path` if it is a regular file. Opened non-blocking and checked before reading: a
/// FIFO at the state path would otherwise block the start until someone writes to it, and a
/// device or directory is no state file either.
fn read_regular_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file: refusing to use it as the state file (choose another --state)",
        ));
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Undoes a start that fails half-way: detaches the links it attached, removes the pins it
/// created (never those of a data path it adopted: they were there before) and switches
/// forwarding back off. Disarmed once the agent is up.
struct StartCleanup<'a> {
    bpffs: &'a Path,
    /// xlb pins under `bpffs` before this agent loaded anything.
    preexisting: HashSet<std::ffi::OsString>,
    links: Vec<PinnedAttachment>,
    forwarding_enabled: Vec<&'static str>,
    armed: bool,
}

impl<'a> StartCleanup<'a> {
    fn new(bpffs: &'a Path) -> Result<Self> {
        Ok(Self {
            bpffs,
            preexisting: ownership::xlb_pins(bpffs)?,
            links: Vec::new(),
            forwarding_enabled: Vec::new(),
            armed: true,
        })
    }

    /// The agent is up: hands over what it attached and enabled.
    fn disarm(mut self) -> (Vec<PinnedAttachment>, Vec<&'static str>) {
        self.armed = false;
        (
            std::mem::take(&mut self.links),
            std::mem::take(&mut self.forwarding_enabled),
        )
    }
}

impl Drop for StartCleanup<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for link in self.links.drain(..) {
            if link.adopted {
                link.keep();
            } else {
                let _ = link.detach();
            }
        }
        match ownership::remove_pins(self.bpffs, &self.preexisting) {
            Ok(removal) if removal.pins > 0 => info!(
                pins = removal.pins,
                bpffs = %self.bpffs.display(),
                "start failed: removed the pins it created"
            ),
            Ok(_) => {}
            Err(e) => warn!("start failed, and removing the pins it created failed too: {e}"),
        }
        for file in &self.forwarding_enabled {
            let _ = fs::write(file, "0");
        }
    }
}

/// The sysctls `enable_forwarding` may switch on, which are also the only files a
/// forwarding record may name.
const FORWARDING_SYSCTLS: [(&str, &str); 2] = [
    ("net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward"),
    (
        "net.ipv6.conf.all.forwarding",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ),
];

/// Where an agent that leaves its data path running (`--keep-attached`) records the
/// forwarding sysctls xlb switched on, so the next agent or `xlb detach` can switch them back
/// off: next to the control socket (per network namespace, like the sysctls, and gone after
/// a reboot, like them).
fn forwarding_record(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".forwarding");
    PathBuf::from(name)
}

/// The sysctl files a forwarding record names (only those xlb may switch on).
fn read_forwarding_record(record: &Path) -> Vec<&'static str> {
    let Ok(text) = fs::read_to_string(record) else {
        return Vec::new();
    };
    FORWARDING_SYSCTLS
        .iter()
        .map(|(_, file)| *file)
        .filter(|file| text.lines().any(|l| l.trim() == *file))
        .collect()
}

/// Switches the recorded sysctls back off and removes the record; returns their names.
fn restore_forwarding(files: &[&'static str], record: &Path) -> Vec<&'static str> {
    let mut restored = Vec::new();
    for (key, file) in FORWARDING_SYSCTLS {
        if !files.contains(&file) {
            continue;
        }
        match fs::write(file, "0") {
            Ok(()) => restored.push(key),
            Err(e) => warn!("could not switch {key} back off: {e}"),
        }
    }
    if let Err(e) = fs::remove_file(record)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("removing {}: {e}", record.display());
    }
    restored
}

/// xlb forwards packets, so the host must: `bpf_fib_lookup` refuses to resolve next hops on
/// an interface with forwarding off, and the stack fallback needs it too.
///
/// Returns the sysctl files it switched on, so a full stop can switch them back off.
fn enable_forwarding() -> Vec<&'static str> {
    let mut enabled = Vec::new();
    for (key, file) in FORWARDING_SYSCTLS {
        if fs::read_to_string(file).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        match fs::write(file, "1") {
            Ok(()) => {
                info!("enabled {key}: xlb forwards packets (switched back off when xlb stops)");
                enabled.push(file);
            }
            Err(e) => warn!("could not enable {key} ({e}): forwarding to backends may fail"),
        }
    }
    enabled
}

struct Agent {
    balancer: Balancer,
    state_path: PathBuf,
    /// The declarative config, when the agent was started with one: `xlb reload` and SIGHUP
    /// re-read it.
    config_path: Option<PathBuf>,
    checker: HealthChecker,
    /// (name, index) of the interfaces the data plane is attached to: a backend reached
    /// through any other interface sends replies xlb never sees.
    attached: Vec<(String, u32)>,
    /// The config file's `[agent]` table as the agent started with it: a reload cannot
    /// re-attach or re-bind, so it names what changed there instead of ignoring it.
    started_with: crate::config::AgentConfig,
    /// Container backends followed through their engine's events.
    following: crate::containers::Following,
    /// The tunnels' settings given on the command line (see [`AgentOptions::encap`]).
    encap_flags: Encap,
    /// For `xlb status` (its uptime counted from `started`).
    info: AgentInfo,
    started: std::time::Instant,
    /// The hook on each interface, kept current by re-attaching.
    hooks: Vec<InterfaceStatus>,
    /// Where the VIPs it can serve are announced to routers, if anywhere.
    announcements: Option<AnnounceTable>,
    /// `xlb node drain`: nothing announced until `xlb node undrain`.
    drained: bool,
}

/// Refuses a VIP that can never work, or that sits on a backend's address.
fn check_new_vip(balancer: &Balancer, vip: &VipSpec) -> Result<()> {
    validate::check_vip(vip)?;
    let state = balancer.desired_state();
    let backends = state
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| (v.vip, b.addr)));
    validate::check_vip_against_backends(vip, backends)?;
    Ok(())
}

/// Refuses a backend that can never work (see [`validate`]), that sits on a VIP's address, or
/// that is this host itself; returns the warnings about it (a route that bypasses xlb).
fn check_new_backend(
    balancer: &Balancer,
    attached: &[(String, u32)],
    vip: &VipSpec,
    backend: SocketAddr,
) -> Result<Vec<String>> {
    validate::check_backend(vip, backend)?;
    validate::check_backend_against_vips(backend, balancer.vip_specs())?;
    check_backend_in_namespace(attached, backend, balancer.forwarding(vip)?)
}

/// The checks only the agent's own network namespace can answer: is the backend one of its
/// addresses (refused), and does its route leave through an interface xlb is attached to
/// (warned about). A failed netlink query is a warning, not a refusal: it says nothing about
/// the backend.
fn check_backend_in_namespace(
    attached: &[(String, u32)],
    backend: SocketAddr,
    forwarding: Forwarding,
) -> Result<Vec<String>> {
    let refuse = |reason| AddressError {
        role: Role::Backend,
        addr: backend.to_string(),
        reason,
    };
    let mut warnings = Vec::new();
    match validate::local_owner(backend.ip()) {
        Ok(Some(iface)) => return Err(refuse(Reason::Local { iface }).into()),
        Ok(None) => {}
        Err(e) => warnings.push(format!(
            "could not check whether backend {backend} is this host's own address: {}",
            error_chain(&e)
        )),
    }
    match validate::route_interface(backend.ip()) {
        Ok(Route::Local) => return Err(refuse(Reason::LocalRoute).into()),
        // A subnet's directed broadcast: only the namespace's routes tell it from a host.
        Ok(Route::Broadcast) => return Err(refuse(Reason::Broadcast).into()),
        Ok(route) => warnings.extend(validate::route_warning(
            backend, forwarding, &route, attached,
        )),
        Err(e) => warnings.push(format!(
            "could not look up the route to backend {backend}: {}",
            error_chain(&e)
        )),
    }
    Ok(warnings)
}

fn done_with(warnings: Vec<String>) -> Reply {
    if warnings.is_empty() {
        Reply::Done
    } else {
        Reply::DoneWithWarnings(warnings)
    }
}

impl Agent {
    fn handle(&mut self, request: Request) -> Reply {
        let mutates = request.mutates();
        let reply = self.apply(request);
        if let Err(e) = self.sync_announcements() {
            warn!("{e:#}");
        }
        match reply {
            Ok(reply) => {
                self.sync_health_targets();
                if mutates {
                    self.following.ensure_watching(&self.balancer);
                    // A new tunnelled backend's next hop, resolved before its first packet
                    // rather than at the next sweep.
                    self.keep_tunnel_hops_resolved();
                }
                if mutates
                    && let Err(e) = save_state(&self.state_path, &self.balancer.desired_state())
                {
                    warn!("{e:#}");
                    return Reply::Error(format!(
                        "applied, but not persisted (the previous state file is intact): {e:#}"
                    ));
                }
                reply
            }
            Err(e) => Reply::Error(format!("{e:#}")),
        }
    }

    fn apply(&mut self, request: Request) -> Result<Reply> {
        // A change by hand to an agent that runs from a config file would be undone, without
        // a word, by the next reload: refused unless the operator says so.
        if request.forced() == Some(false)
            && let Some(path) = &self.config_path
        {
            bail!(
                "this agent runs from {path}: a change made here would be undone by the next \
                 `xlb reload`; edit the file and run `xlb reload` (see `xlb config diff {path}`), \
                 or add --force to change the running state until the next reload",
                path = path.display()
            );
        }
        let b = &mut self.balancer;
        Ok(match request {
            Request::VipAdd {
                vip,
                health,
                idle_timeout_s,
                forwarding,
                ..
            } => {
                if let Some(spec) = &health {
                    spec.validate_for(&vip).context("invalid health check")?;
                }
                check_new_vip(b, &vip)?;
                b.add_vip_with(vip, idle_timeout_s, forwarding)?;
                b.set_vip_health(&vip, health)?;
                Reply::Done
            }
            Request::VipSet { vip, settings, .. } => {
                if let Setting::To(spec) = &settings.health {
                    spec.validate_for(&vip).context("invalid health check")?;
                }
                // One plan through the core: checked whole, undone on a failing write.
                b.set_vip(&vip, &settings)?;
                Reply::Done
            }
            Request::VipDel { vip, .. } => {
                b.remove_vip(&vip)?;
                Reply::Done
            }
            Request::VipList => {
                let status = b.status()?;
                Reply::Vips(self.with_health(status))
            }
            Request::BackendAdd {
                vip,
                backend,
                weight,
                ..
            } => {
                // Given without a port: a direct-server-return VIP's own.
                let backend = b.resolve_backend(&vip, backend)?;
                let warnings = check_new_backend(b, &self.attached, &vip, backend)?;
                b.add_backend(&vip, backend, weight)?;
                for warning in &warnings {
                    warn!(%vip, %backend, "{warning}");
                }
                done_with(warnings)
            }
            Request::ContainerBackendAdd {
                vip,
                container,
                port,
                weight,
                ..
            } => {
                let found = crate::containers::find(self.following.engines(), &container)?;
                let backend = found.endpoint(&vip, port)?;
                let warnings = check_new_backend(b, &self.attached, &vip, backend)?;
                b.add_backend(&vip, backend, weight)?;
                b.set_backend_container(&vip, backend, Some(container.clone()), false)?;
                for warning in &warnings {
                    warn!(%vip, %backend, "{warning}");
                }
                info!(%vip, %backend, container, "container backend added: followed from now on");
                Reply::ContainerBackendAdded { backend, warnings }
            }
            Request::BackendDel { vip, backend, .. } => {
                b.remove_backend(&vip, backend)?;
                Reply::Done
            }
            Request::BackendSet {
                vip,
                backend,
                weight,
                state,
                ..
            } => {
                b.update_backend(&vip, backend, weight, state)?;
                Reply::Done
            }
            Request::BackendList { vip } => {
                let status = b.vip_status_with_flows(&vip)?;
                Reply::Vip(self.with_health(vec![status]).remove(0))
            }
            Request::Stats => Reply::Stats(self.stats()?),
            Request::Status => {
                let Stats { vips, global } = self.stats()?;
                Reply::Status(Box::new(Status {
                    agent: AgentInfo {
                        uptime_s: self.started.elapsed().as_secs(),
                        ..self.info.clone()
                    },
                    interfaces: self.hooks.clone(),
                    vips,
                    global,
                }))
            }
            Request::Conns {
                vip,
                backend,
                limit,
            } => Reply::Conns(b.conns(&vip, backend, limit as usize)?),
            Request::Explain { client, vip } => Reply::Explanation(b.explain(client, &vip)?),
            Request::Reload { dry_run } => Reply::Changes(self.reload(dry_run)?),
            Request::Node { drain } => {
                if let Some(drain) = drain {
                    self.drained = drain;
                    info!(drained = drain, "node drain set by request");
                }
                self.sync_announcements()?;
                Reply::Node(self.node_status())
            }
        })
    }

    /// Makes the announce table hold what the node can serve now (`xlb_core::announce`).
    /// Called after every request and event that may change it, and on a timer that retries
    /// a failed sync.
    fn sync_announcements(&mut self) -> Result<()> {
        let Some(table) = &mut self.announcements else {
            return Ok(());
        };
        let node = NodeState {
            attached: true,
            drained: self.drained,
        };
        let wanted = xlb_core::announce::announced(self.balancer.vip_readiness(), node);
        let changes = table
            .sync(&wanted)
            .with_context(|| format!("updating announce table {}", table.table()))?;
        for addr in &changes.announce {
            info!(vip = %addr, table = table.table(), "announced");
        }
        for addr in &changes.withdraw {
            info!(vip = %addr, table = table.table(), "withdrawn");
        }
        Ok(())
    }

    fn node_status(&self) -> NodeStatus {
        NodeStatus {
            drained: self.drained,
            announce_table: self.announcements.as_ref().map(AnnounceTable::table),
            announced: self
                .announcements
                .as_ref()
                .map(|t| t.announced().iter().copied().collect())
                .unwrap_or_default(),
        }
    }

    /// Adds each backend's last health check to a status listing.
    fn with_health(&self, mut vips: Vec<VipStatus>) -> Vec<VipStatus> {
        for v in &mut vips {
            for b in &mut v.backends {
                b.health = self.checker.status(&v.vip, b.addr);
            }
        }
        vips
    }

    fn stats(&self) -> Result<Stats> {
        let global = self
            .balancer
            .datapath()
            .global_counters()?
            .into_iter()
            .map(|(c, v)| CounterValue::new(c, v))
            .collect();
        Ok(Stats {
            vips: self.with_health(self.balancer.status()?),
            global,
        })
    }

    fn metrics(&self) -> String {
        match self.stats() {
            Ok(stats) => {
                let health: Vec<_> = stats
                    .vips
                    .iter()
                    .flat_map(|v| v.backends.iter().map(|b| (v.vip, b.addr, b.healthy)))
                    .collect();
                crate::metrics::render(&stats, &health)
            }
            Err(e) => {
                warn!("metrics: {e:#}");
                String::new()
            }
        }
    }

    /// Probes exactly the backends of VIPs that have a health check.
    fn sync_health_targets(&mut self) {
        let targets = self.balancer.health_targets();
        let vips: Vec<VipSpec> = targets.iter().map(|(v, _, _)| *v).collect();
        for (vip, spec, backends) in targets {
            if spec.is_none() {
                // Unchecked backends count as healthy: undo verdicts of checks now gone.
                for backend in &backends {
                    if let Err(e) = self.balancer.set_health(&vip, *backend, true) {
                        warn!(%vip, %backend, "{}", error_chain(&e));
                    }
                }
            }
            if let Err(e) = self.checker.set_targets(vip, spec, &backends) {
                warn!(%vip, "health checks not started: {e}");
            }
        }
        self.checker.retain_vips(&vips);
    }

    /// Logs a warning for every backend whose route bypasses xlb (a restored state, or a
    /// config read at start).
    fn warn_about_backend_routes(&self) {
        for vip in self.balancer.desired_state().vips {
            for b in vip.backends {
                match validate::route_interface(b.addr.ip()) {
                    Ok(route) => {
                        if let Some(w) =
                            validate::route_warning(b.addr, vip.forwarding, &route, &self.attached)
                        {
                            warn!(vip = %vip.vip, "{w}");
                        }
                    }
                    Err(e) => {
                        warn!(vip = %vip.vip, backend = %b.addr, "route lookup failed: {}", error_chain(&e))
                    }
                }
            }
        }
    }

    /// Asks the kernel to keep the next hops of tunnelled backends resolved (see
    /// `neighbours`): the data path cannot leave a tunnelled packet to the stack to resolve.
    fn keep_tunnel_hops_resolved(&self) {
        let backends: Vec<std::net::IpAddr> = self
            .balancer
            .desired_state()
            .vips
            .into_iter()
            .filter(|v| v.forwarding != Forwarding::Nat)
            .flat_map(|v| v.backends.into_iter().map(|b| b.addr.ip()))
            .collect();
        if backends.is_empty() {
            return;
        }
        match crate::neighbours::keep_resolved(&backends) {
            Ok(added) if !added.is_empty() => {
                info!(next_hops = ?added, "managed neighbour entries for tunnelled backends");
            }
            Ok(_) => {}
            Err(e) => warn!("tunnelled backends' next hops: {}", error_chain(&e)),
        }
    }

    /// Re-reads the config file and applies the difference, whole or not at all: unchanged
    /// VIPs and backends are not touched (they keep their ring slots and flows).
    fn reload(&mut self, dry_run: bool) -> Result<Vec<String>> {
        let path = self.config_path.clone().context(
            "this agent was started without --config: change it with the vip/backend commands",
        )?;
        let config = crate::config::load(&path)?;
        let mut wanted = config.desired_state();
        let running = self.balancer.desired_state();
        let (declared, container_warnings) = crate::containers::resolve_declared(
            &mut wanted,
            &config,
            self.following.engines(),
            Some(&running),
        );
        self.following.keep_discovered(&running, &mut wanted);
        // Whole or not at all: a config this agent cannot hold is refused before any change.
        self.balancer
            .check_limits(&wanted)
            .with_context(|| format!("{}: not applied, nothing changed", path.display()))?;
        let changes = crate::config::diff(&without_ids(&running), &wanted);
        let encap = self.encap_flags.over(config.agent.encap);
        let encap_change = crate::config::describe_encap_change(&self.info.encap, &encap);
        if dry_run {
            // What a reload would do, worded as it would say it, without touching anything.
            let mut lines = crate::config::describe_changes(&running, &wanted);
            lines.extend(encap_change);
            return Ok(lines);
        }
        if encap_change.is_some() {
            encap
                .check_local()
                .with_context(|| format!("{}: not applied, nothing changed", path.display()))?;
        }
        // The file passed every check it can make on its own; what only this namespace can
        // tell is checked before anything changes, so a refused reload changes nothing.
        let mut warnings = container_warnings;
        for change in &changes {
            if let Change::AddBackend { vip, backend } = change {
                let forwarding = wanted
                    .vips
                    .iter()
                    .find(|v| v.vip == *vip)
                    .map_or_else(Forwarding::default, |v| v.forwarding);
                let found = check_backend_in_namespace(&self.attached, backend.addr, forwarding)
                    .with_context(|| format!("{}: VIP {vip}", path.display()))?;
                warnings.extend(found);
            }
        }
        let mut lines = crate::config::describe_changes(&running, &wanted);
        // One plan for the whole file, written in an order no packet sees half-done; a
        // failing write undoes the ones before it.
        if let Err(e) = self.balancer.apply(&wanted) {
            if matches!(e, BalancerError::PartlyApplied { .. }) {
                bail!(
                    "{}: {}; fix the cause and reload again",
                    path.display(),
                    error_chain(&e)
                );
            }
            bail!(
                "{}: not applied, nothing changed: {}",
                path.display(),
                error_chain(&e)
            );
        }
        if let Some(line) = encap_change {
            self.balancer
                .datapath_mut()
                .set_encap(&encap.settings())
                .with_context(|| {
                    format!(
                        "{}: VIPs and backends applied, but not the tunnels' settings",
                        path.display()
                    )
                })?;
            self.info.encap = encap;
            info!(%encap, "tunnels' settings applied");
            lines.push(line);
        }
        self.following.declare(declared);
        info!(path = %path.display(), changes = lines.len(), "reloaded");
        warnings.extend(crate::config::agent_changes(&self.started_with, &config.agent).into_iter().map(
            |field| {
                format!(
                    "[agent] {field} changed in {}: a reload does not apply it; restart the agent \
                     to apply it (with --keep-attached, established flows survive the restart)",
                    path.display()
                )
            },
        ));
        for warning in warnings {
            warn!("{warning}");
            lines.push(format!("warning: {warning}"));
        }
        Ok(lines)
    }
}

/// The state as a config file would describe it: ids are the agent's business.
fn without_ids(state: &DesiredState) -> DesiredState {
    let mut state = state.clone();
    for vip in &mut state.vips {
        vip.id = None;
        vip.health = None;
        for b in &mut vip.backends {
            b.id = None;
        }
    }
    state
}

/// Ids recorded in the state file, carried over to the same VIPs and backends of a config,
/// so a restarted agent adopting a running data path keeps every flow.
fn with_recorded_ids(mut wanted: DesiredState, recorded: Option<&DesiredState>) -> DesiredState {
    let Some(recorded) = recorded else {
        return wanted;
    };
    for vip in &mut wanted.vips {
        let Some(old) = recorded.vips.iter().find(|v| v.vip == vip.vip) else {
            continue;
        };
        vip.id = old.id;
        for b in &mut vip.backends {
            b.id = old
                .backends
                .iter()
                .find(|o| o.addr == b.addr)
                .and_then(|o| o.id);
        }
    }
    wanted
}

fn lock(agent: &Mutex<Agent>) -> std::sync::MutexGuard<'_, Agent> {
    // A panic in a request handler must not take the agent down with it.
    agent
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An error and its causes on one line.
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Runs the agent until SIGINT or SIGTERM.
///
/// # Errors
/// Anything that prevents the data plane from being attached or the API from being served;
/// each with what to do about it.
pub async fn run(options: AgentOptions) -> Result<()> {
    require_root("xlb run")?;
    if options.ifaces.is_empty() {
        bail!("no interface given: use --iface IF (repeatable)");
    }
    let ifaces = options
        .ifaces
        .iter()
        .map(|name| ifindex(name).map(|index| (name.clone(), index)))
        .collect::<Result<Vec<_>>>()?;
    if std::os::unix::net::UnixStream::connect(&options.socket).is_ok() {
        bail!(
            "another xlb agent is already running on {} (stop it, or use a different --socket)",
            options.socket.display()
        );
    }
    ownership::clear_socket_path(&options.socket)?;
    let recorded = load_state(&options.state)?;
    // A config file says what is wanted; the state file still supplies the ids a running
    // data path knows its VIPs and backends by.
    // Counted and checked before anything else: an oversized file is refused at once, with
    // nothing loaded or written.
    let check = |state: &DesiredState, origin: &Path| {
        crate::balancer::check_limits(state, options.datapath.max_vips, options.datapath.ring_size)
            .with_context(|| format!("{}: refused, nothing written", origin.display()))
    };
    let mut declared = Vec::new();
    let started_with = match &options.config {
        Some(path) => crate::config::load(path)?.agent,
        None => crate::config::AgentConfig::default(),
    };
    let encap = options.encap.over(started_with.encap);
    // Before anything is loaded: a source this host does not have is refused at once.
    encap.check_local()?;
    let restored = match &options.config {
        Some(path) => {
            let config = crate::config::load(path)?;
            let mut wanted = config.desired_state();
            let (found, warnings) = crate::containers::resolve_declared(
                &mut wanted,
                &config,
                options
                    .containers
                    .unwrap_or(crate::containers::EngineChoice::Auto),
                recorded.as_ref(),
            );
            for warning in warnings {
                warn!("{}: {warning}", path.display());
            }
            declared = found;
            check(&wanted, path)?;
            Some(with_recorded_ids(wanted, recorded.as_ref()))
        }
        None => {
            if let Some(state) = &recorded {
                check(state, &options.state)?;
            }
            recorded
        }
    };
    let metrics = match options.metrics {
        Some(addr) => Some(
            crate::metrics::MetricsServer::bind(addr)
                .await
                .with_context(|| {
                    format!("serving metrics on {addr} (use --metrics ADDR or --no-metrics)")
                })?,
        ),
        None => None,
    };

    if options.keep_attached {
        check_pins_outlive_agent(&options.bpffs)?;
    }
    paths::ensure_bpffs_dir(&options.bpffs)?;
    let _data_path_lock = ownership::lock_data_path(&options.bpffs)?;
    let mut cleanup = StartCleanup::new(&options.bpffs)?;
    let mut datapath =
        Datapath::load_pinned(options.datapath, &options.bpffs).with_context(|| {
            format!(
                "loading the XDP program with its maps pinned under {} (`xlb detach` removes \
                 a data path left there)",
                options.bpffs.display()
            )
        })?;
    datapath
        .set_encap(&encap.settings())
        .context("writing the tunnels' settings")?;
    info!(%encap, "tunnels for direct server return");
    match datapath.logger() {
        Ok(logger) => {
            tokio::spawn(forward_data_plane_logs(logger));
        }
        Err(e) => warn!("data-plane logs unavailable: {}", error_chain(&e)),
    }
    let mut balancer = Balancer::new(datapath);
    // Even with nothing to restore: pinned maps may hold VIPs a lost state file forgot.
    let state = restored.unwrap_or_default();
    let adoption = balancer
        .adopt(&state)
        .with_context(|| format!("restoring {}", options.state.display()))?;
    info!(
        vips = state.vips.len(),
        kept = adoption.kept_vips,
        removed = adoption.removed_vips,
        map_writes = adoption.writes,
        path = %options.state.display(),
        "restored state"
    );
    cleanup.forwarding_enabled = enable_forwarding();
    // Before listing the interfaces: a re-creation in between is then not missed.
    let mut link_changes = relink::watch()
        .map_err(|e| {
            warn!(
                "interfaces deleted and re-created will not be re-attached until the next \
                 check (every {} s): {}",
                RELINK_SWEEP.as_secs(),
                error_chain(&e)
            );
        })
        .ok();
    let host_links = hooks::links().await?;
    for link in hooks::redirect_targets(&host_links, options.mode) {
        if let Err(e) = balancer.allow_egress(link.index) {
            warn!(iface = %link.name, "not usable for XDP redirect: {}", error_chain(&e));
        }
    }

    for (name, index) in &ifaces {
        let link = host_links
            .iter()
            .find(|l| l.index == *index)
            .cloned()
            .unwrap_or_else(|| hooks::Link {
                name: name.clone(),
                index: *index,
                kind: hooks::LinkKind::Device,
                xdp_program: None,
            });
        cleanup.links.push(hooks::attach(
            balancer.datapath_mut(),
            &link,
            options.mode,
            &options.bpffs,
        )?);
    }
    let listed: Vec<String> = ifaces.iter().map(|(name, _)| name.clone()).collect();
    for iface in hooks::detach_unlisted(&options.bpffs, &listed)? {
        info!(
            iface = %iface,
            "detached the data path a previous agent left on an interface this one is not given"
        );
    }
    // This build's program now runs wherever xlb does: the previous one writes its retired
    // tables no more, so what it wrote since they were carried over can follow.
    match balancer.datapath_mut().finish_carry_over() {
        Ok(0) => {}
        Ok(entries) => info!(
            entries,
            "carried over the entries the previous program wrote during the switch"
        ),
        Err(e) => warn!(
            "entries the previous program wrote during the switch are lost (their flows are \
             balanced afresh): {}",
            error_chain(&e)
        ),
    }

    if let Some(dir) = options.socket.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    ownership::clear_socket_path(&options.socket)?;
    let listener = crate::control::bind(&options.socket)?;
    let own_socket = ownership::OwnSocket::bound_at(&options.socket);
    info!(socket = %options.socket.display(), "xlb agent ready");

    let announcements = options
        .announce_table
        .map(AnnounceTable::open)
        .transpose()
        .context("--announce-table")?;
    let (events, mut health_events) = tokio::sync::mpsc::channel(256);
    let (notices, mut container_notices) = tokio::sync::mpsc::channel(256);
    let agent = Arc::new(Mutex::new(Agent {
        balancer,
        state_path: options.state.clone(),
        config_path: options.config.clone(),
        checker: HealthChecker::new(events),
        attached: ifaces.clone(),
        started_with,
        following: crate::containers::Following::new(options.containers, notices),
        encap_flags: options.encap,
        info: AgentInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_s: 0,
            socket: options.socket.display().to_string(),
            bpffs: options.bpffs.display().to_string(),
            state_file: options.state.display().to_string(),
            config: options.config.as_ref().map(|p| p.display().to_string()),
            keep_attached: options.keep_attached,
            encap,
            encap_flags: options.encap,
        },
        started: std::time::Instant::now(),
        hooks: Vec::new(),
        announcements,
        drained: false,
    }));
    let (links, mut forwarding_enabled) = cleanup.disarm();
    // A data path a previous agent left running may have had forwarding switched on by xlb:
    // still xlb's to switch off when the data path goes.
    let record = forwarding_record(&options.socket);
    for file in read_forwarding_record(&record) {
        if !forwarding_enabled.contains(&file) {
            forwarding_enabled.push(file);
        }
    }
    let mut attachments = relink::Attachments::new(
        ifaces
            .iter()
            .cloned()
            .zip(links)
            .map(|((name, index), attachment)| relink::Attached {
                name,
                index,
                attachment: Some(attachment),
            })
            .collect(),
        options.mode,
        &options.bpffs,
    );
    lock(&agent).hooks = attachments.hooks();
    let mut relink_sweep = tokio::time::interval(RELINK_SWEEP);
    let mut announce_retry = tokio::time::interval(ANNOUNCE_RETRY);
    let mut neighbour_sweep = tokio::time::interval(NEIGHBOUR_SWEEP);
    lock(&agent).sync_health_targets();
    lock(&agent).keep_tunnel_hops_resolved();
    lock(&agent).warn_about_backend_routes();
    {
        let agent = &mut *lock(&agent);
        agent.following.declare(declared);
        agent.following.ensure_watching(&agent.balancer);
    }
    if let Some(server) = metrics {
        info!(addr = %server.local_addr(), "serving Prometheus metrics on /metrics");
        let agent = Arc::clone(&agent);
        tokio::spawn(server.run(move || lock(&agent).metrics()));
    }
    let handler: crate::control::Handler = {
        let agent = Arc::clone(&agent);
        Arc::new(move |request| lock(&agent).handle(request))
    };
    tokio::spawn(crate::control::serve(listener, handler));
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            Some(event) = health_events.recv() => {
                let mut agent = lock(&agent);
                match agent.balancer.set_health(&event.vip, event.backend, event.healthy) {
                    Ok(true) if event.healthy => info!(vip = %event.vip, backend = %event.backend, detail = %event.detail, "backend healthy again: back in the ring"),
                    Ok(true) => warn!(vip = %event.vip, backend = %event.backend, detail = %event.detail, "backend failed its health checks: out of the ring, its flows move"),
                    Ok(false) => {}
                    // Removed while the event was in flight.
                    Err(e) => info!("health event for a backend that is gone: {}", error_chain(&e)),
                }
                if let Err(e) = agent.sync_announcements() {
                    warn!("{e:#}");
                }
            }
            _ = announce_retry.tick() => {
                if let Err(e) = lock(&agent).sync_announcements() {
                    warn!("{e:#}");
                }
            }
            Some(notice) = container_notices.recv() => {
                let mut agent = lock(&agent);
                let agent = &mut *agent;
                let changes = agent.following.on_notice(&mut agent.balancer, notice);
                if !changes.is_empty() {
                    for change in &changes {
                        info!("{change}");
                    }
                    agent.sync_health_targets();
                    agent.keep_tunnel_hops_resolved();
                    if let Err(e) = save_state(&agent.state_path, &agent.balancer.desired_state()) {
                        warn!("{e:#}");
                    }
                    if let Err(e) = agent.sync_announcements() {
                        warn!("{e:#}");
                    }
                }
            }
            Some(change) = next_link_change(&mut link_changes) => {
                if attachments.lost(&change) {
                    warn!(?change, "interface gone, and its attachment with it: re-attached when an interface of that name appears");
                }
                if let Some((name, index)) = attachments.recreated(&change) {
                    reattach(&agent, &mut attachments, options.mode, &name, index).await;
                }
            }
            _ = neighbour_sweep.tick() => lock(&agent).keep_tunnel_hops_resolved(),
            _ = relink_sweep.tick() => {
                for (name, index) in attachments.moved() {
                    reattach(&agent, &mut attachments, options.mode, &name, index).await;
                }
            }
            _ = sighup.recv() => {
                let reply = lock(&agent).handle(Request::Reload { dry_run: false });
                match reply {
                    Reply::Error(e) => warn!("SIGHUP: reload failed, nothing changed: {e}"),
                    _ => info!("SIGHUP: reloaded the config"),
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }

    own_socket.remove();
    let links = attachments.into_attachments();
    if options.keep_attached {
        info!(
            pins = %options.bpffs.display(),
            "stopping, leaving the data path attached: the next `xlb run` adopts it, `xlb detach` removes it"
        );
        for link in links {
            link.keep();
        }
        if !forwarding_enabled.is_empty() {
            let lines: String = forwarding_enabled
                .iter()
                .map(|f| format!("{f}\n"))
                .collect();
            if let Err(e) = fs::write(&record, lines) {
                warn!(
                    "could not record {}: `xlb detach` will leave forwarding on ({e})",
                    record.display()
                );
            }
        }
        return Ok(());
    }
    // Routers stop sending here before the data path goes, not after.
    if let Some(table) = &mut lock(&agent).announcements {
        match table.withdraw_all() {
            Ok(changes) if !changes.withdraw.is_empty() => {
                info!(
                    table = table.table(),
                    vips = changes.withdraw.len(),
                    "withdrawn"
                );
            }
            Ok(_) => {}
            Err(e) => warn!("withdrawing the announced VIPs: {}", error_chain(&e)),
        }
    }
    info!("stopping: detaching from {} interface(s)", links.len());
    for link in links {
        if let Err(e) = link.detach() {
            warn!("detaching: {e}");
        }
    }
    drop(agent);
    if let Err(e) = ownership::remove_pins(&options.bpffs, &HashSet::new()) {
        warn!("removing the pinned maps: {e}");
    }
    // Leave the host as we found it (a kept-attached data path still needs forwarding).
    for key in restore_forwarding(&forwarding_enabled, &record) {
        info!("switched {key} back off");
    }
    Ok(())
}

/// How often the agent re-checks its announcements, so a failed route change is retried.
/// Every change of the model re-checks them at once; this is only the fallback.
const ANNOUNCE_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// How often the agent compares its interfaces' indexes with the ones it attached to, in
/// case a link notification was lost.
const RELINK_SWEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// How often the agent makes sure tunnelled backends' next hops have managed neighbour
/// entries: a backend added since, or an entry the kernel learned and let expire.
const NEIGHBOUR_SWEEP: std::time::Duration = std::time::Duration::from_secs(5);

async fn next_link_change(
    changes: &mut Option<tokio::sync::mpsc::Receiver<relink::LinkChange>>,
) -> Option<relink::LinkChange> {
    match changes {
        Some(changes) => changes.recv().await,
        None => std::future::pending().await,
    }
}

/// Attaches to the device now named `name` (index `index`), which replaced the one the
/// agent was attached to.
async fn reattach(
    agent: &Mutex<Agent>,
    attachments: &mut relink::Attachments,
    mode: ModeChoice,
    name: &str,
    index: u32,
) {
    let link = match hooks::links().await {
        Ok(links) => links
            .into_iter()
            .find(|l| l.index == index && l.name == name),
        Err(e) => {
            warn!(
                iface = name,
                "interface re-created, but listing interfaces failed: {e:#}"
            );
            return;
        }
    };
    // Gone again already: the next notification says what became of it.
    let Some(link) = link else { return };
    let mut agent = lock(agent);
    match attachments.reattach(agent.balancer.datapath_mut(), &link) {
        Ok(()) => info!(
            iface = name,
            index, "interface re-created (a container restart?): re-attached"
        ),
        Err(e) => warn!(
            iface = name,
            index, "interface re-created, but re-attaching failed: {e:#}"
        ),
    }
    if !hooks::redirect_targets(std::slice::from_ref(&link), mode).is_empty()
        && let Err(e) = agent.balancer.allow_egress(link.index)
    {
        warn!(
            iface = name,
            "not usable for XDP redirect: {}",
            error_chain(&e)
        );
    }
    agent.attached = attachments.interfaces();
    agent.hooks = attachments.hooks();
}

/// `xlb detach`: removes a data path an agent left attached (`--keep-attached`): the pinned
/// links (which detaches the program) and the pinned maps.
///
/// # Errors
/// An agent still running on `socket`, or a pin that cannot be removed.
pub fn detach(bpffs: &Path, socket: &Path) -> Result<()> {
    require_root("xlb detach")?;
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!(
            "an xlb agent is running on {}: stop it instead (it detaches on exit unless started with --keep-attached)",
            socket.display()
        );
    }
    if !ownership::check_detachable(bpffs)? {
        println!("nothing to detach: {} does not exist", bpffs.display());
        return Ok(());
    }
    let _data_path_lock = ownership::lock_data_path(bpffs)?;
    let detached = hooks::detach_all(bpffs)?;
    for iface in &detached {
        println!("detached from {iface}");
    }
    let removal = ownership::remove_pins(bpffs, &HashSet::new())?;
    if removal.dir_removed {
        println!(
            "removed {} ({} attachment(s), pinned maps with the connection table)",
            bpffs.display(),
            detached.len()
        );
    } else {
        println!(
            "removed xlb's pins under {} ({} attachment(s), pinned maps); left the directory: it \
             holds files that are not xlb's",
            bpffs.display(),
            detached.len()
        );
    }
    let record = forwarding_record(socket);
    for key in restore_forwarding(&read_forwarding_record(&record), &record) {
        println!("switched {key} back off (the agent had switched it on)");
    }
    Ok(())
}

/// Relays the XDP program's aya-log records (rare events only) into the agent's log.
async fn forward_data_plane_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's fd and keeps it open while registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        warn!("data-plane logs unavailable: cannot poll the log ring buffer");
        return;
    };
    loop {
        let Ok(mut ready) = fd.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::{BackendConfig, BackendState};

    #[test]
    fn state_files_load_back_what_was_saved() {
        let state = DesiredState {
            vips: vec![crate::balancer::VipConfig {
                vip: "10.0.0.1:80/tcp".parse().unwrap(),
                backends: vec![BackendConfig {
                    addr: "10.1.0.2:8080".parse().unwrap(),
                    weight: 3,
                    state: BackendState::Draining,
                    id: Some(7),
                    container: None,
                    discovered: false,
                }],
                id: Some(2),
                health: None,
                idle_timeout_s: Some(900),
                forwarding: crate::balancer::Forwarding::Ipip,
            }],
        };
        let bytes = encode_state(&state);
        assert!(
            bytes.ends_with(b"}\n"),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(parse_state(&bytes).unwrap(), state);
        assert!(parse_state(&bytes[..bytes.len() / 2]).is_err());
    }
}
