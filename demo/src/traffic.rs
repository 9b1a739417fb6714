//! The containers' tiny TCP servers and the client that talks to the VIPs.
//!
//! The protocol is one line each way: the client sends a request line, the server answers
//! with its container name and closes (in podman mode, HTTP/1.0 to `busybox httpd`). The client then resets the connection (`SO_LINGER`
//! 0), so no side keeps a `TIME_WAIT` socket and the same source port can connect again at
//! once in the second round.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::Interrupt;

/// Bounds every connect, read and write, so a data path that drops packets makes the demo
/// fail in seconds instead of hanging. Above 1 s so one SYN retransmission fits.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// How often an idle server looks at its stop flag.
const ACCEPT_POLL_MS: u16 = 100;

/// The longest request line a server reads.
const MAX_REQUEST: u64 = 1024;

/// A running container server; [`Server::stop`] ends and joins its thread.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `listener` (already bound, inside the container's namespace) on a new thread,
    /// answering every connection with `name`.
    pub fn start(listener: TcpListener, name: String) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name(format!("srv-{name}"))
            .spawn(move || serve(&listener, &name, &flag))
            .context("starting a server thread")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds the server socket; call it inside the container's namespace.
pub fn listen(port: u16) -> io::Result<TcpListener> {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
}

fn serve(listener: &TcpListener, name: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ACCEPT_POLL_MS)) {
            Ok(n) if n > 0 => {}
            _ => continue,
        }
        if let Ok((stream, _)) = listener.accept() {
            // One client at a time is plenty for the demo; a failed exchange only loses
            // that one answer, which the client reports.
            let _ = answer(stream, name);
        }
    }
}

fn answer(stream: TcpStream, name: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    (&stream).write_all(format!("{name}\n").as_bytes())?;
    stream.shutdown(Shutdown::Write)
}

/// What the containers speak: the namespace servers' one line each way, or HTTP/1.0 to
/// podman containers' `busybox httpd` (whose page is the container's name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    Line,
    Http,
}

/// The body of an HTTP/1.0 response, or why there is none.
fn http_body(response: &str) -> Result<&str> {
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("not an HTTP response: {response:?}");
    };
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1) != Some("200") {
        bail!("HTTP error: {:?}", head.lines().next().unwrap_or_default());
    }
    Ok(body)
}

/// `GET /` to `addr` from the calling thread's namespace; returns the trimmed body.
pub fn http_get(addr: SocketAddrV4) -> Result<String> {
    let stream = TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT).context("connect")?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    (&stream).write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    (&stream).take(64 * 1024).read_to_string(&mut response)?;
    Ok(http_body(&response)?.trim().to_owned())
}

/// One request to `vip` from `local_port`; returns the name of the container that answered.
/// Call it inside the client's namespace.
pub fn request(vip: SocketAddrV4, local_port: u16, protocol: Wire) -> Result<String> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, local_port)).into())
        .with_context(|| format!("binding source port {local_port}"))?;
    sock.connect_timeout(&SocketAddr::from(vip).into(), IO_TIMEOUT)
        .context("connect")?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let request = match protocol {
        Wire::Line => format!("GET name from port {local_port}\n"),
        Wire::Http => "GET / HTTP/1.0\r\n\r\n".to_owned(),
    };
    (&stream)
        .write_all(request.as_bytes())
        .context("sending the request")?;
    let mut reply = String::new();
    (&stream)
        .take(64 * 1024)
        .read_to_string(&mut reply)
        .context("reading the answer")?;
    // An abortive close: no TIME_WAIT on either side, so the port is reusable right away.
    SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    let name = match protocol {
        Wire::Line => reply.trim(),
        Wire::Http => http_body(&reply)?.trim(),
    };
    if name.is_empty() {
        bail!("the connection closed without an answer");
    }
    Ok(name.to_owned())
}

/// Sends `n` requests to `vip` from source ports `first_port..first_port + n`, one
/// connection each, in order; returns the answers in port order. Stops at the first failure
/// (with the request it was) or on Ctrl-C.
pub fn requests(
    vip: SocketAddrV4,
    first_port: u16,
    n: u16,
    protocol: Wire,
    interrupt: &Interrupt,
) -> Result<Vec<String>> {
    let mut answers = Vec::with_capacity(n.into());
    for i in 0..n {
        interrupt.check()?;
        let port = first_port + i;
        let name = request(vip, port, protocol).with_context(|| {
            format!("request {} of {n} to {vip} from source port {port}", i + 1)
        })?;
        answers.push(name);
    }
    Ok(answers)
}
