//! The agent's control socket: creating it with its final permissions, accepting with a cap
//! and a back-off, and reading newline-delimited requests with a size limit (the framing is
//! `crate::api`'s, read with tokio-util's `LinesCodec`).
//!
//! Only root can connect, but a buggy client or an exhausted fd table must not take the
//! agent down: a full fd table makes `accept` fail at once and forever, so the loop backs off
//! instead of spinning; a request line without a newline is bounded; a line that is not
//! UTF-8 gets an error reply and the next line is still read.

use std::{
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use futures_util::StreamExt as _;
use thiserror::Error;
use tokio::{
    io::AsyncWriteExt as _,
    net::{UnixListener, UnixStream},
    sync::Semaphore,
    time::timeout,
};
use tokio_util::codec::{Decoder, FramedRead, LinesCodec, LinesCodecError};
use tracing::{info, warn};

pub use crate::api::MAX_REQUEST_LINE as MAX_LINE;
use crate::api::{Reply, Request, decode_line, encode_line, request_codec};

/// Connections served at once; one more gets an error line and is closed.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that sends no request for this long is closed, so idle clients cannot hold
/// every slot.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that does not read its reply for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// First pause after a failed `accept`, doubled on each failure in a row up to the maximum.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// At most one log line per this interval for a repeating accept error.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("creating the private directory {path} to bind the control socket in")]
    PrivateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {path}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("moving the control socket into place at {path}")]
    Publish {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the control socket at `path`, readable and writable by root only from the moment
/// it appears there: it is bound inside a fresh 0700 directory beside `path`, restricted to
/// 0600 there (where nobody else can reach it), then renamed into place, never replacing
/// anything. A chmod after binding at `path` would leave a moment in which anyone could
/// connect.
///
/// # Errors
/// The directory, the bind or the rename failing (something appeared at `path` meanwhile).
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let private = private_dir_beside(path);
    let err_path = |p: &Path| p.display().to_string();
    // Left by an agent with the same pid that died mid-bind (pid 1 in a container, say).
    let _ = std::fs::remove_file(private.join("s"));
    let _ = std::fs::remove_dir(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|source| ControlError::PrivateDir {
            path: err_path(&private),
            source,
        })?;
    let staged = private.join("s");
    let result = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged).map_err(|source| {
            ControlError::Bind {
                path: err_path(path),
                source,
            }
        })?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| ControlError::Bind {
                path: err_path(path),
                source,
            },
        )?;
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &staged,
            nix::fcntl::AT_FDCWD,
            path,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| ControlError::Publish {
            path: err_path(path),
            source: e.into(),
        })?;
        let bind_err = |source| ControlError::Bind {
            path: err_path(path),
            source,
        };
        listener.set_nonblocking(true).map_err(bind_err)?;
        UnixListener::from_std(listener).map_err(bind_err)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    result
}

fn private_dir_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "xlb.sock".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.{}.bind", std::process::id()))
}

/// Answers one request; runs on the blocking pool (it takes the agent's lock).
pub type Handler = Arc<dyn Fn(Request) -> Reply + Send + Sync>;

/// Logs a repeating error at most once per [`LOG_INTERVAL`], with how many were left out.
#[derive(Debug, Default)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn warn(&mut self, what: &str, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            warn!(
                "{what}: {error} ({} more like it in the last {} s)",
                self.suppressed,
                LOG_INTERVAL.as_secs()
            );
        } else {
            warn!("{what}: {error}");
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Serves control connections on `listener` forever.
pub async fn serve(listener: UnixListener, handler: Handler) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = ACCEPT_BACKOFF;
    let mut errors = RateLimitedLog::default();
    let mut refusals = RateLimitedLog::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF;
                stream
            }
            Err(e) => {
                errors.warn(
                    "accepting a control connection (backing off: out of file descriptors?)",
                    &e,
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            refuse_busy(&stream);
            refusals.warn(
                "refused a control connection",
                &format_args!("{MAX_CONNECTIONS} already open"),
            );
            continue;
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            serve_connection(stream, handler).await;
            drop(permit);
        });
    }
}

/// Tells a client beyond the cap why it is closed, without waiting on it.
fn refuse_busy(stream: &UnixStream) {
    let reply = Reply::Error(format!(
        "the agent is serving {MAX_CONNECTIONS} control connections already: try again later"
    ));
    // Best effort: a fresh socket's send buffer takes one short line.
    let _ = stream.try_write(encode_line(&reply).as_bytes());
}

/// The agent's framing of request lines: [`request_codec`], except that a line that is not
/// UTF-8 is an item (answered with an error, the next line still read) rather than an error,
/// which would end the stream.
#[derive(Debug)]
pub struct RequestLines(LinesCodec);

impl RequestLines {
    /// Lines of at most `max` bytes; the agent's are [`MAX_LINE`].
    #[must_use]
    pub fn new(max: usize) -> Self {
        Self(LinesCodec::new_with_max_length(max))
    }
}

impl Default for RequestLines {
    fn default() -> Self {
        Self(request_codec())
    }
}

impl Decoder for RequestLines {
    /// A line without its newline, or why it cannot be a request.
    type Item = Result<String, RequestError>;
    /// A line over the limit, or the connection failing: either ends the connection.
    type Error = LinesCodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        not_utf8_as_item(self.0.decode(buf))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        not_utf8_as_item(self.0.decode_eof(buf))
    }
}

/// `LinesCodec` has consumed a line it reports as not UTF-8 (its only `InvalidData`), so
/// the next call starts at the next line.
fn not_utf8_as_item(
    decoded: Result<Option<String>, LinesCodecError>,
) -> Result<Option<Result<String, RequestError>>, LinesCodecError> {
    match decoded {
        Ok(line) => Ok(line.map(Ok)),
        Err(LinesCodecError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            Ok(Some(Err(RequestError::NotUtf8)))
        }
        Err(e) => Err(e),
    }
}

/// Who is on the other end of a control connection (`SO_PEERCRED`), for the log of changes.
#[derive(Clone, Copy, Debug)]
struct Peer {
    uid: Option<u32>,
    pid: Option<i32>,
}

async fn serve_connection(stream: UnixStream, handler: Handler) {
    let peer = stream.peer_cred().map_or(
        Peer {
            uid: None,
            pid: None,
        },
        |cred| Peer {
            uid: Some(cred.uid()),
            pid: cred.pid(),
        },
    );
    let (read, mut write) = stream.into_split();
    let mut lines = FramedRead::new(read, RequestLines::default());
    loop {
        let line = match timeout(IDLE_TIMEOUT, lines.next()).await {
            Err(_) | Ok(None) => return,
            Ok(Some(line)) => line,
        };
        let (reply, close) = match line {
            Ok(Ok(line)) => (answer(decode_line(&line), &handler, peer).await, false),
            Ok(Err(refused)) => (Reply::Error(refused.to_string()), false),
            Err(LinesCodecError::MaxLineLengthExceeded) => (
                Reply::Error(format!(
                    "request line longer than {MAX_LINE} bytes: closing the connection"
                )),
                true,
            ),
            Err(LinesCodecError::Io(e)) => {
                warn!("control connection: {e}");
                return;
            }
        };
        match timeout(
            WRITE_TIMEOUT,
            write.write_all(encode_line(&reply).as_bytes()),
        )
        .await
        {
            Ok(Ok(())) if !close => {}
            _ => return,
        }
    }
}

/// Why a request line is refused; its message is the error reply.
#[derive(Debug, Error)]
pub enum RequestError {
    #[error("malformed request: not UTF-8")]
    NotUtf8,
    #[error("malformed request: {0}")]
    Json(#[from] serde_json::Error),
}

/// Decodes one request line (without its newline), as the agent does.
///
/// # Errors
/// The line is not UTF-8, or not one JSON request.
pub fn decode_request(line: &[u8]) -> Result<Request, RequestError> {
    let text = std::str::from_utf8(line).map_err(|_| RequestError::NotUtf8)?;
    Ok(decode_line::<Request>(text)?)
}

async fn answer(
    request: Result<Request, serde_json::Error>,
    handler: &Handler,
    peer: Peer,
) -> Reply {
    match request.map_err(RequestError::from) {
        Ok(request) => {
            // A change is logged once, here, with who asked (the time is the log's): the
            // one place every change by the API passes through.
            let change = request
                .mutates()
                .then(|| (request.name(), encode_line(&request).trim_end().to_owned()));
            let handler = Arc::clone(handler);
            let reply = tokio::task::spawn_blocking(move || handler(request))
                .await
                .unwrap_or_else(|e| Reply::Error(format!("internal error: {e}")));
            if let Some((op, request)) = change {
                let (uid, pid) = (
                    peer.uid.map_or("?".to_owned(), |u| u.to_string()),
                    peer.pid.map_or("?".to_owned(), |p| p.to_string()),
                );
                match &reply {
                    Reply::Error(e) => {
                        info!(%op, %uid, %pid, %request, "API change refused: {e}");
                    }
                    _ => info!(%op, %uid, %pid, %request, "API change applied"),
                }
            }
            reply
        }
        Err(e) => Reply::Error(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the agent reads from `input` arriving in pieces of `chunk` bytes, up to the end
    /// or the first error.
    fn lines_of(input: &[u8], max: usize, chunk: usize) -> Vec<Result<String, String>> {
        let mut codec = RequestLines::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut pieces = input.chunks(chunk);
        loop {
            let piece = pieces.next();
            if let Some(piece) = piece {
                buf.extend_from_slice(piece);
            }
            loop {
                let decoded = match piece {
                    Some(_) => codec.decode(&mut buf),
                    None => codec.decode_eof(&mut buf),
                };
                match decoded {
                    Ok(Some(line)) => out.push(line.map_err(|e| e.to_string())),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(format!("fatal: {e}")));
                        return out;
                    }
                }
            }
            if piece.is_none() {
                return out;
            }
        }
    }

    #[test]
    fn request_lines_decode_or_say_why_not() {
        assert_eq!(
            decode_request(br#"{"op":"stats"}"#).unwrap(),
            Request::Stats
        );
        assert_eq!(
            decode_request(b"{\"op\":\"stats\xff\"}")
                .unwrap_err()
                .to_string(),
            "malformed request: not UTF-8"
        );
        let unknown = decode_request(br#"{"op":"shutdown"}"#).unwrap_err();
        assert!(
            unknown
                .to_string()
                .starts_with("malformed request: unknown variant `shutdown`"),
            "{unknown}"
        );
    }

    #[test]
    fn lines_are_split_and_bounded() {
        let ok = |line: &str| Ok(line.to_owned());
        for chunk in [1, 3, 64] {
            assert_eq!(
                lines_of(b"ab\n\xff\r\ncd\r\n{}", 8, chunk),
                [
                    ok("ab"),
                    Err("malformed request: not UTF-8".to_owned()),
                    ok("cd"),
                    ok("{}"),
                ],
                "pieces of {chunk}"
            );
            assert_eq!(
                lines_of(b"0123456789\nnext\n", 8, chunk),
                [Err("fatal: max line length exceeded".to_owned())],
                "pieces of {chunk}"
            );
            assert_eq!(
                lines_of(b"01234567\n", 8, chunk),
                [ok("01234567")],
                "pieces of {chunk}"
            );
        }
    }

    #[test]
    fn both_ends_frame_alike() {
        let line = encode_line(&Request::Stats);
        assert_eq!(line, "{\"op\":\"stats\"}\n");
        let lines = lines_of(line.as_bytes(), MAX_LINE, 4);
        assert_eq!(lines.len(), 1);
        let request: Request = decode_line(lines[0].as_ref().unwrap()).unwrap();
        assert_eq!(request, Request::Stats);
        let reply = Reply::Error("two\nlines".into());
        let line = encode_line(&reply);
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert_eq!(decode_line::<Reply>(&line).unwrap(), reply);
    }
}
