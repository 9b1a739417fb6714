//! The direct-server-return step: the web service's replicas behind a router, prepared with
//! `xlb backend prepare`, reached through IPIP and GUE tunnels from a second agent, and
//! answering the client straight through the router, never through the balancer.
//!
//! It always uses namespace containers (also in podman mode): podman's containers hang off
//! the host's bridge next to the balancer, while DSR needs the replies to take a path that
//! avoids the balancer, which `xlb_netns::DsrTopology`'s router gives.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use socket2::SockRef;
use xlb_netns::DsrTopology;

use crate::{
    Interrupt,
    agent::{Agent, AgentPaths, Xlb},
    report::{Row, render_table, tally},
    step,
};

/// Namespaces `xlbdemo-dsr-{role}-PID-N`: the main demo's leftover check covers them.
const NS_PREFIX: &str = "xlbdemo-dsr-";
const REPLICAS: usize = 2;
const IPIP_PORT: u16 = 8080;
const GUE_PORT: u16 = 8081;
/// Every answer carries this much after the replica's name, so the replies clearly outweigh
/// everything the client sends (which is all the balancer should receive).
const BODY_LEN: usize = 16 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// The agent resolves the tunnels' next hop every few seconds; until then the data path drops
/// what it cannot send, so the first requests are retried for this long.
const WARM_UP: Duration = Duration::from_secs(20);
const ACCEPT_POLL_MS: u16 = 100;

fn replica_name(i: usize) -> String {
    format!("web-dsr-{}", i + 1)
}

fn body_byte(i: usize) -> u8 {
    // Period 251 (prime): a dropped or repeated segment shows up as a mismatch.
    u8::try_from(i % 251).expect("below 251")
}

/// What the step creates; dropping it undoes everything (also on failure or Ctrl-C):
/// agent, servers, `xlb backend unprepare`, namespaces.
pub struct DsrLab {
    xlb: Xlb,
    agent: Option<Agent>,
    servers: Vec<DsrServer>,
    prepared: Vec<String>,
    topo: Option<DsrTopology>,
}

impl DsrLab {
    /// Stops and removes everything; returns what it did, for the demo's output.
    fn teardown(&mut self) -> Vec<String> {
        let mut done = Vec::new();
        if let Some(mut agent) = self.agent.take() {
            match agent.stop() {
                Ok(how) => done.push(format!("DSR agent {how}")),
                Err(e) => done.push(format!("stopping the DSR agent failed: {e:#}")),
            }
        }
        for s in &mut self.servers {
            s.stop();
        }
        self.servers.clear();
        for netns in self.prepared.drain(..) {
            let args = ["backend", "unprepare", "--netns", netns.as_str()];
            match self.xlb.output(&args) {
                Ok(_) => done.push(format!("{netns}: unprepared")),
                Err(e) => done.push(format!("{netns}: unprepare failed: {e:#}")),
            }
        }
        if let Some(topo) = self.topo.take() {
            let n = 3 + topo.backend_links.len();
            drop(topo);
            done.push(format!("{n} DSR namespaces deleted"));
        }
        done
    }
}

impl Drop for DsrLab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A replica's server: answers each connection's request line with its name, a newline and
/// [`BODY_LEN`] pattern bytes.
struct DsrServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DsrServer {
    fn start(listener: TcpListener, name: String) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name(format!("dsr-{name}"))
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, PollTimeout::from(ACCEPT_POLL_MS)) {
                        Ok(n) if n > 0 => {}
                        _ => continue,
                    }
                    if let Ok((stream, _)) = listener.accept() {
                        // A failed exchange only loses that answer, which the client reports.
                        let _ = answer(&stream, &name);
                    }
                }
            })
            .context("starting a DSR server thread")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(stream: &TcpStream, name: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream.take(1024)).read_line(&mut line)?;
    let mut reply = format!("{name}\n").into_bytes();
    reply.extend((0..BODY_LEN).map(body_byte));
    (&*stream).write_all(&reply)?;
    stream.shutdown(Shutdown::Write)
}

/// One request from the client's namespace; returns the replica's name and the reply's size
/// after every body byte was checked.
fn request(vip: SocketAddrV4) -> Result<(String, usize)> {
    let stream =
        TcpStream::connect_timeout(&SocketAddr::from(vip), IO_TIMEOUT).context("connect")?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    (&stream)
        .write_all(b"GET name\n")
        .context("sending the request")?;
    let mut reply = Vec::with_capacity(BODY_LEN + 64);
    (&stream)
        .take(4 * BODY_LEN as u64)
        .read_to_end(&mut reply)
        .context("reading the answer")?;
    // No TIME_WAIT left behind in the client's namespace.
    SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    let Some(newline) = reply.iter().position(|&b| b == b'\n') else {
        bail!("an answer without a name ({} bytes)", reply.len());
    };
    let name = String::from_utf8_lossy(&reply[..newline]).into_owned();
    let body = &reply[newline + 1..];
    if body.len() != BODY_LEN {
        bail!("{name} answered {} body bytes, not {BODY_LEN}", body.len());
    }
    if let Some(at) = body
        .iter()
        .enumerate()
        .position(|(i, &b)| b != body_byte(i))
    {
        bail!("{name}'s answer differs from what it sent at byte {at}");
    }
    Ok((name, reply.len()))
}

/// Retries one request until the tunnel to a replica works (at most [`WARM_UP`]).
fn warm_up(vip: SocketAddrV4, interrupt: &Interrupt) -> Result<Duration> {
    let start = Instant::now();
    loop {
        interrupt.check()?;
        let err = match request(vip) {
            Ok(_) => return Ok(start.elapsed()),
            Err(e) => e,
        };
        if start.elapsed() > WARM_UP {
            return Err(err.context(format!(
                "no answer through the tunnel to {vip} within {} s",
                WARM_UP.as_secs()
            )));
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the DSR step with its own agent (socket, state, pins and log under `work_dir` and
/// `pins`) and tears it down before returning, whatever happened.
pub fn run(
    bin: &Path,
    work_dir: &Path,
    pins: &Path,
    requests: u16,
    interrupt: &Interrupt,
) -> Result<()> {
    let mut lab = DsrLab {
        xlb: Xlb {
            bin: bin.to_owned(),
            socket: work_dir.join("xlb-dsr.sock"),
        },
        agent: None,
        servers: Vec::new(),
        prepared: Vec::new(),
        topo: None,
    };
    let result = run_in(&mut lab, work_dir, pins, requests, interrupt);
    println!("    tearing the DSR lab down:");
    for line in lab.teardown() {
        println!("      {line}");
    }
    result
}

fn run_in(
    lab: &mut DsrLab,
    work_dir: &Path,
    pins: &Path,
    requests: u16,
    interrupt: &Interrupt,
) -> Result<()> {
    let vip = DsrTopology::VIP_V4;
    step(format!(
        "direct server return: {REPLICAS} web replicas behind a router, VIP {vip} with \
         --forwarding ipip (:{IPIP_PORT}) and gue (:{GUE_PORT})"
    ));
    println!(
        "    (namespace containers in both modes: the replies must take a path around the \
         balancer, which the router gives)"
    );
    let topo = lab.topo.insert(
        DsrTopology::with_prefix(NS_PREFIX, REPLICAS).context("building the DSR namespaces")?,
    );
    println!(
        "    client {} --veth-- router --veth-- lb {} (xlb, tunnels)",
        topo.client_link.b.ip4(),
        topo.lb_link.b.ip4()
    );
    for (i, link) in topo.backend_links.iter().enumerate() {
        println!(
            "                         router --veth-- {} {}",
            replica_name(i),
            link.b.ip4()
        );
    }
    interrupt.check()?;

    for i in 0..REPLICAS {
        let netns = topo.backend(i).name().to_owned();
        lab.xlb.run(&[
            "backend",
            "prepare",
            "--vip",
            &vip.to_string(),
            "--netns",
            &netns,
        ])?;
        lab.prepared.push(netns);
        for port in [IPIP_PORT, GUE_PORT] {
            let listener = topo
                .backend(i)
                .run(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))
                .context("entering a replica's namespace")?
                .with_context(|| format!("{}: binding port {port}", replica_name(i)))?;
            lab.servers
                .push(DsrServer::start(listener, replica_name(i))?);
        }
    }
    interrupt.check()?;

    let paths = AgentPaths {
        state: &work_dir.join("state-dsr.json"),
        bpffs: pins,
        log: &work_dir.join("xlb-dsr.log"),
    };
    println!(
        "    $ xlb run --iface router --socket {} (a second agent, in the DSR balancer's namespace)",
        lab.xlb.socket.display()
    );
    let agent = lab.agent.insert(Agent::start(
        &lab.xlb,
        Some(topo.lb()),
        &["router".to_owned()],
        &paths,
        None,
        &[],
    )?);
    let waited = agent.wait_ready(&lab.xlb, interrupt);
    let waited = match waited {
        Ok(w) => w,
        Err(e) => {
            let tail = agent.log_tail(10);
            return Err(e.context(format!("the DSR agent's log:\n{tail}")));
        }
    };
    println!("    ready after {:.1} s", waited.as_secs_f64());

    for (port, forwarding) in [(IPIP_PORT, "ipip"), (GUE_PORT, "gue")] {
        let vip_arg = format!("{vip}:{port}/tcp");
        lab.xlb
            .run(&["vip", "add", &vip_arg, "--forwarding", forwarding])?;
        for link in &topo.backend_links {
            lab.xlb.run(&[
                "backend",
                "add",
                &vip_arg,
                &format!("{}:{port}", link.b.ip4()),
            ])?;
        }
    }

    let client = topo.client();
    for (port, forwarding) in [(IPIP_PORT, "ipip"), (GUE_PORT, "gue")] {
        let to = SocketAddrV4::new(vip, port);
        let waited = client.run(|| warm_up(to, interrupt))??;
        step(format!(
            "{requests} requests to {to} ({forwarding}) from the client, each answered with \
             {BODY_LEN} bytes (first answer after {:.1} s)",
            waited.as_secs_f64()
        ));
        let before = topo
            .lb()
            .link_stats("router")
            .context("the balancer's link counters")?;
        let t = Instant::now();
        let mut names = Vec::with_capacity(requests.into());
        let mut reply_bytes = 0u64;
        for k in 0..requests {
            interrupt.check()?;
            let (name, len) = client
                .run(|| request(to))?
                .with_context(|| format!("request {} of {requests} to {to}", k + 1))?;
            names.push(name);
            reply_bytes += len as u64;
        }
        let after = topo
            .lb()
            .link_stats("router")
            .context("the balancer's link counters")?;
        println!(
            "    {} answers in {:.2} s, every byte checked",
            names.len(),
            t.elapsed().as_secs_f64()
        );
        let replicas: Vec<String> = (0..REPLICAS).map(replica_name).collect();
        let refs: Vec<&str> = replicas.iter().map(String::as_str).collect();
        let rows: Vec<Row> = tally(&names, &refs)
            .into_iter()
            .map(|(container, served)| Row {
                service: format!("web (dsr/{forwarding})"),
                vip: to.to_string(),
                container,
                served,
                total: names.len(),
            })
            .collect();
        println!();
        print!("{}", render_table(&rows));
        println!();
        if let Some(idle) = replicas.iter().find(|r| !names.contains(r)) {
            bail!("{idle} served none of {requests} requests to {to}");
        }
        let received = after.rx_bytes.saturating_sub(before.rx_bytes);
        // The balancer's link carries the client's requests and acknowledgements; if the
        // replies crossed it too, it would have received at least their bytes.
        let ok = received < reply_bytes / 2;
        println!(
            "    check [{}]: the replicas' replies were {reply_bytes} bytes; the balancer's link \
             received {received} bytes (the client's requests and ACKs only): the replies went \
             through the router, not the balancer",
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            bail!(
                "the balancer's link received {received} bytes for {reply_bytes} bytes of replies: \
                 they did not bypass it"
            );
        }
    }

    let client_addr = format!("{}:40000", topo.client_link.b.ip4());
    step(format!("which replica a new flow from {client_addr} gets"));
    let explained = lab
        .xlb
        .run(&["explain", &client_addr, &format!("{vip}:{IPIP_PORT}/tcp")])?;
    if !explained.contains("dsr/ipip to ") {
        bail!("`xlb explain` does not name the tunnel (dsr/ipip to ...)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback_listener() -> (TcpListener, SocketAddrV4) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding loopback");
        let SocketAddr::V4(addr) = listener.local_addr().expect("address") else {
            unreachable!("bound to IPv4")
        };
        (listener, addr)
    }

    #[test]
    fn a_replica_answer_is_its_name_and_the_checked_body() {
        let (listener, addr) = loopback_listener();
        let mut server = DsrServer::start(listener, "web-dsr-7".to_owned()).expect("server");
        let (name, len) = request(addr).expect("request");
        server.stop();
        assert_eq!(name, "web-dsr-7");
        assert_eq!(len, "web-dsr-7\n".len() + BODY_LEN);
    }

    #[test]
    fn a_damaged_or_short_answer_is_an_error() {
        for (damage, expected) in [
            (Some(100), "differs from what it sent at byte 100"),
            (None, "body bytes, not"),
        ] {
            let (listener, addr) = loopback_listener();
            let server = thread::spawn(move || {
                let (stream, _) = listener.accept().expect("accept");
                let mut line = String::new();
                BufReader::new((&stream).take(1024))
                    .read_line(&mut line)
                    .expect("request line");
                let mut body: Vec<u8> = (0..BODY_LEN).map(body_byte).collect();
                match damage {
                    Some(at) => body[at] ^= 0xff,
                    None => body.truncate(BODY_LEN - 1),
                }
                (&stream).write_all(b"web-dsr-1\n").expect("name");
                (&stream).write_all(&body).expect("body");
                stream.shutdown(Shutdown::Write).expect("shutdown");
            });
            let err = request(addr).expect_err("a damaged answer must not pass");
            server.join().expect("server thread");
            assert!(format!("{err:#}").contains(expected), "{err:#}");
        }
    }
}
