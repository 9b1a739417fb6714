//! The control socket's request framing and decoding, as the agent runs them on every line
//! a client sends.

use bytes::BytesMut;
use lb_userspace::{
    api::{Reply, decode_line, encode_line},
    control::{RequestLines, decode_request},
};
use tokio_util::codec::{Decoder as _, LinesCodecError};

/// The reply line the agent sends, checked to be one line of JSON that reads back.
fn reply_line(reply: &Reply) -> String {
    let line = encode_line(reply);
    let line = line
        .strip_suffix('\n')
        .expect("a reply line ends with a newline");
    assert!(!line.contains('\n'), "a reply spans lines: {line}");
    let back: Reply = decode_line(line).expect("a reply reads back");
    assert_eq!(&back, reply);
    line.to_owned()
}

/// One line's fate: a request that the CLI's own encoding reproduces, or an error reply.
fn check_line(line: &[u8]) {
    match decode_request(line) {
        Ok(request) => {
            let encoded = encode_line(&request);
            let encoded = encoded
                .strip_suffix('\n')
                .expect("a request line ends with a newline");
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
/// reachable) and the second the size of the pieces the input arrives in; the rest is what a
/// client sends.
///
/// Properties: framing never panics; complete lines are exactly the input's newline-separated
/// pieces (less a `'\r'` before the newline), in order, each within the limit; a line that is
/// not UTF-8 is reported as such and the next line still read; a line over the limit ends the
/// connection, and really was over it; every complete line decodes to a request that
/// round-trips through the CLI's encoding, or gets a one-line error reply. The whole input as
/// one line (the real limit is 1 MiB) is decoded too.
pub fn check_request_stream(data: &[u8]) {
    check_line(data);
    let [limit, piece, stream @ ..] = data else {
        return;
    };
    let max = usize::from(*limit) + 1;
    let mut codec = RequestLines::new(max);
    let mut buf = BytesMut::new();
    let mut pieces = stream.chunks(usize::from(*piece).max(1));
    let mut rest = stream;
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
            let (expected, after) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &rest[rest.len()..]),
            };
            let unframed = expected.strip_suffix(b"\r").unwrap_or(expected);
            match decoded {
                Ok(None) => break,
                Err(LinesCodecError::MaxLineLengthExceeded) => {
                    assert!(
                        expected.len() > max,
                        "{} bytes called over {max}",
                        expected.len()
                    );
                    reply_line(&Reply::Error(format!(
                        "request line longer than {max} bytes"
                    )));
                    return;
                }
                Err(LinesCodecError::Io(e)) => panic!("reading from memory failed: {e}"),
                Ok(Some(Ok(line))) => {
                    assert_eq!(line.as_bytes(), unframed);
                    assert!(expected.len() <= max);
                    check_line(line.as_bytes());
                    rest = after;
                }
                Ok(Some(Err(not_utf8))) => {
                    assert!(std::str::from_utf8(unframed).is_err(), "{unframed:?}");
                    assert!(expected.len() <= max);
                    reply_line(&Reply::Error(not_utf8.to_string()));
                    rest = after;
                }
            }
        }
        if piece.is_none() {
            // A lone '\r' at the very end is the end of a line, not one.
            assert!(
                rest.is_empty() || rest == b"\r",
                "end of input with {} bytes unread",
                rest.len()
            );
            return;
        }
    }
}
