//! The hook per interface across restarts and reloads: a restart with another `--xdp-mode`
//! moves the interfaces to the new hook (it does not adopt the old one), a restart with fewer
//! interfaces takes the data path off the ones left out, and a reload that changes the
//! config's `[agent]` table says it needs a restart instead of ignoring it.
//!
//! Needs root. Namespaces, temp dirs and pins are unique to the test and torn down by guards.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use xlb_netns::{Netns, Topology};

mod common;
use common::{Agent, TcpServer, XLB, require_root, tcx_ingress_attached, xdp_attached};

const NS_PREFIX: &str = "xhook-";
const SUITE: &str = "hooks";
const PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// One agent run's files; the bpffs directory outlives runs (that is the point).
struct Run {
    dir: PathBuf,
    bpffs: PathBuf,
}

impl Run {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(common::unique(SUITE, "agent"));
        fs::create_dir_all(&dir).expect("creating the agent's temp dir");
        Self {
            dir,
            bpffs: Path::new("/sys/fs/bpf").join(common::unique(SUITE, "pins")),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("xlb.sock")
    }

    /// `xlb ARGS` against this run's agent, within the common time limit.
    fn cli(&self, lb: &Netns, args: &[&str]) -> Output {
        common::xlb(lb, &self.socket(), args)
    }

    fn start<'n>(&self, lb: &'n Netns, ifaces: &[&str], extra: &[&str]) -> Agent<'n> {
        Agent::in_ns(lb, SUITE)
            .dir(&self.dir)
            .bpffs(&self.bpffs)
            .ifaces(ifaces)
            .args(extra)
            .arg("--no-metrics")
            .start()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = std::process::Command::new(XLB)
            .args(["detach", "--bpffs"])
            .arg(&self.bpffs)
            .arg("--socket")
            .arg(self.socket())
            .output();
        let _ = fs::remove_dir_all(&self.bpffs);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The backend's answer to every connection.
fn say_ok(mut conn: TcpStream) -> std::io::Result<()> {
    conn.write_all(b"ok\n")
}

fn request_through_vip(client: &Netns, vip: SocketAddr) -> Result<String, String> {
    client
        .run(move || {
            let conn = TcpStream::connect_timeout(&vip, IO_TIMEOUT).map_err(|e| e.to_string())?;
            conn.set_read_timeout(Some(IO_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let mut line = String::new();
            BufReader::new(conn)
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            Ok(line.trim().to_owned())
        })
        .expect("entering the client namespace")
}

#[test]
fn restarts_move_interfaces_to_the_hook_asked_for_and_off_unlisted_ones() {
    xlb_netns::cleanup_stale(NS_PREFIX).expect("removing stale namespaces");
    require_root();
    let topo = Topology::with_prefix(NS_PREFIX, 1).expect("building the topology");
    let (lb, client) = (topo.lb(), topo.client());
    let _server = TcpServer::start(topo.backend(0), PORT, Duration::from_secs(120), say_ok);
    let client_if = topo.client_link.a.ifname.clone();
    let backend_if = topo.backend_links[0].a.ifname.clone();
    let ifaces = [client_if.as_str(), backend_if.as_str()];
    let vip = SocketAddr::from((Topology::VIP_V4, 80));
    let backend = SocketAddr::from((topo.backend_links[0].b.ip4(), PORT));
    let run = Run::new();

    // 1. Native XDP, kept attached on exit.
    let mut agent = run.start(lb, &ifaces, &["--xdp-mode", "native", "--keep-attached"]);
    for args in [
        vec!["vip", "add", "10.100.0.1:80/tcp"],
        vec!["backend", "add", "10.100.0.1:80/tcp", &backend.to_string()],
    ] {
        common::success(&args, run.cli(lb, &args));
    }
    assert!(agent.stop().success(), "agent exit:\n{}", agent.log());
    for iface in ifaces {
        assert!(xdp_attached(lb, iface), "native XDP kept on {iface}");
        assert!(!tcx_ingress_attached(lb, iface), "no TC on {iface} yet");
    }

    // 2. Restarted with the default (auto): the veths move to TC, the XDP links go.
    let mut agent = run.start(lb, &ifaces, &["--keep-attached"]);
    let log = agent.log();
    for iface in ifaces {
        assert!(
            !xdp_attached(lb, iface),
            "XDP still on {iface} after a restart in auto mode:\n{log}"
        );
        assert!(
            tcx_ingress_attached(lb, iface),
            "TC not on {iface} after a restart in auto mode:\n{log}"
        );
    }
    assert!(
        log.contains("hook changed"),
        "the agent did not say it moved the interfaces:\n{log}"
    );
    assert_eq!(
        request_through_vip(client, vip).as_deref(),
        Ok("ok"),
        "the VIP after moving to TC:\n{log}"
    );
    assert!(agent.stop().success(), "agent exit:\n{}", agent.log());

    // 3. Restarted with the backend interface left out: it loses the data path.
    let mut agent = run.start(lb, &ifaces[..1], &[]);
    let log = agent.log();
    assert!(
        !tcx_ingress_attached(lb, &backend_if) && !xdp_attached(lb, &backend_if),
        "{backend_if} still carries the data path though no longer listed:\n{log}"
    );
    assert!(tcx_ingress_attached(lb, &client_if), "{client_if}:\n{log}");
    assert!(agent.stop().success(), "agent exit:\n{}", agent.log());
    for iface in ifaces {
        assert!(
            !tcx_ingress_attached(lb, iface) && !xdp_attached(lb, iface),
            "{iface} still attached after a full stop"
        );
    }
}

#[test]
fn a_reload_that_changes_the_agent_table_says_a_restart_applies_it() {
    xlb_netns::cleanup_stale(NS_PREFIX).expect("removing stale namespaces");
    require_root();
    let topo = Topology::with_prefix(NS_PREFIX, 1).expect("building the topology");
    let lb = topo.lb();
    let client_if = topo.client_link.a.ifname.clone();
    let backend_if = topo.backend_links[0].a.ifname.clone();
    let run = Run::new();
    let config = run.dir.join("xlb.toml");
    let write_config = |ifaces: &[&str]| {
        let list = ifaces
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ");
        fs::write(&config, format!("[agent]\nifaces = [{list}]\n")).expect("writing the config");
    };
    write_config(&[&client_if]);
    let config_arg = config.to_string_lossy().into_owned();
    let mut agent = run.start(lb, &[], &["--config", &config_arg]);
    write_config(&[&client_if, &backend_if]);
    let out = run.cli(lb, &["reload"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "reload failed: {text}");
    assert!(
        text.contains("[agent] ifaces changed") && text.contains("restart the agent"),
        "the reload did not say that the changed interfaces need a restart: {text}"
    );
    assert!(
        !tcx_ingress_attached(lb, &backend_if),
        "a reload attached {backend_if} though it said it would not"
    );
    assert!(agent.stop().success(), "agent exit:\n{}", agent.log());
}
