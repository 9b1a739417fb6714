//! The control socket's request framing and decoding, as the agent runs them on every line
//! a client sends.

use std::{
    pin::pin,
    task::{Context, Poll, Waker},
};

use lb_userspace::{
    api::Reply,
    control::{Line, decode_request, read_line},
};
use tokio::io::BufReader;

/// Runs a future that never waits: reads from memory are always ready.
fn ready<T>(future: impl Future<Output = T>) -> T {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("a read from memory waited"),
    }
}

/// The reply line the agent sends, checked to be one line of JSON that reads back.
fn reply_line(reply: &Reply) -> String {
    let line = serde_json::to_string(reply).expect("replies always serialise");
    assert!(!line.contains('\n'), "a reply spans lines: {line}");
    let back: Reply = serde_json::from_str(&line).expect("a reply reads back");
    assert_eq!(&back, reply);
    line
}

/// One line's fate: a request that the CLI's own encoding reproduces, or an error reply.
fn check_line(line: &[u8]) {
    match decode_request(line) {
        Ok(request) => {
            let encoded = serde_json::to_string(&request).expect("requests always serialise");
            assert!(!encoded.contains('\n'));
            let again = decode_request(encoded.as_bytes())
                .unwrap_or_else(|e| panic!("{encoded} does not decode again: {e}"));
            assert_eq!(again, request, "{encoded}");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("malformed request: "), "{message}");
            reply_line(&Reply::Error(message));
        }
    }
}

/// The first input byte chooses the line limit (1..=256 bytes, so that over-long lines are
/// reachable) and the second the read buffer's size; the rest is what a client sends.
///
/// Properties: framing never panics; complete lines are exactly the input's newline-separated
/// pieces, in order, each within the limit; a line over the limit ends the connection, and
/// really was over it; every complete line decodes to a request that round-trips through
/// the CLI's encoding, or gets a one-line error reply. The whole input as one line (the
/// real limit is 1 MiB) is decoded too.
pub fn check_request_stream(data: &[u8]) {
    check_line(data);
    let [limit, capacity, stream @ ..] = data else {
        return;
    };
    let max = usize::from(*limit) + 1;
    let mut reader = BufReader::with_capacity(usize::from(*capacity).max(1), stream);
    let mut buf = Vec::new();
    let mut rest = stream;
    loop {
        let line = ready(read_line(&mut reader, max, &mut buf)).expect("memory never fails");
        let (expected, after) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        match line {
            Line::Eof => {
                assert!(rest.is_empty(), "EOF with {} bytes unread", rest.len());
                return;
            }
            Line::TooLong => {
                assert!(buf.is_empty(), "an over-long line is kept");
                assert!(
                    expected.len() > max,
                    "{} bytes called over {max}",
                    expected.len()
                );
                let reply = Reply::Error(format!("request line longer than {max} bytes"));
                reply_line(&reply);
                return;
            }
            Line::Complete => {
                assert_eq!(buf, expected);
                assert!(buf.len() <= max);
                check_line(&buf);
                rest = after;
            }
        }
    }
}
