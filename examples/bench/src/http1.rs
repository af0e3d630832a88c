//! The load generator's HTTP/1.1 client: one keep-alive connection, one
//! request at a time, driven by the task that waits for the answer.
//!
//! hyper's client runs a connection as a task of its own (or, driven from
//! the caller's task, wakes that task once more per request through its
//! dispatch channel); either way an answer costs two task polls and often a
//! wake-up of the other worker thread. The generator shares the servers' two
//! cores — what it spends they do not get — so it uses the shape of `wrk`:
//! the request's bytes are built up front, written with one `write_all`, and
//! the answer is read into a reused buffer and framed with `httparse` (the
//! parser hyper itself uses). Only what the two benchmarked servers send is
//! accepted: a `Content-Length` body; anything else is an error, never a
//! silently wrong count.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The bytes of one HTTP/1.1 request with a `Content-Length` body (empty
/// for `GET`).
pub fn request(method: &str, addr: SocketAddr, path: &str, body: &[u8]) -> Bytes {
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// The part of an answer the generator looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body_len: usize,
}

/// One keep-alive connection.
pub struct Connection {
    stream: TcpStream,
    addr: SocketAddr,
    /// Bytes read and not yet consumed (one answer is taken off the front).
    buf: Vec<u8>,
}

/// Largest answer head the generator accepts.
const MAX_HEAD: usize = 16 * 1024;

impl Connection {
    pub async fn open(addr: SocketAddr) -> Result<Connection> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            addr,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request` (from [`request`]) and reads its whole answer.
    pub async fn send(&mut self, request: &[u8]) -> Result<Answer> {
        self.stream
            .write_all(request)
            .await
            .with_context(|| format!("send to {}", self.addr))?;
        loop {
            if let Some((answer, used)) = parse(&self.buf)? {
                self.buf.drain(..used);
                return Ok(answer);
            }
            if self.buf.len() > MAX_HEAD + 2 * 1024 * 1024 {
                bail!("answer from {} is too large", self.addr);
            }
            self.buf.reserve(4096);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .with_context(|| format!("read from {}", self.addr))?;
            if n == 0 {
                bail!("connection to {} closed mid-answer", self.addr);
            }
        }
    }
}

/// One complete answer at the front of `buf` and how many bytes it spans,
/// or `None` if more bytes are needed.
fn parse(buf: &[u8]) -> Result<Option<(Answer, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf).context("malformed answer")? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() > MAX_HEAD => bail!("answer head too large"),
        httparse::Status::Partial => return Ok(None),
    };
    let status = resp.code.context("answer without a status")?;
    let mut body_len = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .context("bad content-length")?;
            body_len = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("transfer-encoding answers are not supported by the load generator");
        }
    }
    // No body by definition (RFC 9112 §6.3); everything else must say its length.
    let body_len = match status {
        100..=199 | 204 | 304 => 0,
        _ => body_len.context("answer without content-length")?,
    };
    let total = head_len + body_len;
    Ok((buf.len() >= total).then_some((Answer { status, body_len }, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_answers_and_leaves_what_follows() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let (a, used) = parse(two).unwrap().unwrap();
        assert_eq!(
            a,
            Answer {
                status: 200,
                body_len: 3
            }
        );
        let (b, rest) = parse(&two[used..]).unwrap().unwrap();
        assert_eq!(b.status, 404);
        assert_eq!(used + rest, two.len());
    }

    #[test]
    fn waits_for_the_whole_body_and_refuses_other_framing() {
        assert!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
                .unwrap()
                .is_none()
        );
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap().is_none());
        assert!(parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        let (empty, _) = parse(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap().unwrap();
        assert_eq!(empty.body_len, 0);
        assert!(parse(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn builds_a_request_with_its_length() {
        let r = request("PUT", "127.0.0.1:1".parse().unwrap(), "/v1/kv/a", b"xy");
        assert_eq!(
            &r[..],
            b"PUT /v1/kv/a HTTP/1.1\r\nhost: 127.0.0.1:1\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\nxy"
        );
    }
}
