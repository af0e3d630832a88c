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
//! accepted: answers framed by `Content-Length` (interim 1xx answers are
//! skipped); anything else is an error, never a silently wrong count.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
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

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Answer {
    /// A 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// One keep-alive connection.
pub struct Connection {
    stream: TcpStream,
    addr: SocketAddr,
    /// Bytes read and not yet consumed (one answer is taken off the front).
    buf: BytesMut,
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
            buf: BytesMut::with_capacity(4096),
        })
    }

    /// Sends `request` (from [`request`]) and reads its whole answer.
    pub async fn send(&mut self, request: &[u8]) -> Result<Answer> {
        self.stream
            .write_all(request)
            .await
            .with_context(|| format!("send to {}", self.addr))?;
        loop {
            if let Some((status, head_len, total)) = parse(&self.buf)? {
                let mut answer = self.buf.split_to(total);
                if (100..200).contains(&status) {
                    continue; // an interim answer: the final one follows
                }
                let body = answer.split_off(head_len).freeze();
                return Ok(Answer { status, body });
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

/// The status, head length and whole length (head and body) of the complete
/// answer at the front of `buf`, or `None` if more bytes are needed.
fn parse(buf: &[u8]) -> Result<Option<(u16, usize, usize)>> {
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
    Ok((buf.len() >= total).then_some((status, head_len, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_answers_and_leaves_what_follows() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let (status, head_len, used) = parse(two).unwrap().unwrap();
        assert_eq!((status, head_len, used), (200, 38, 41));
        let (status, _, rest) = parse(&two[used..]).unwrap().unwrap();
        assert_eq!(status, 404);
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
        let empty = parse(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap().unwrap();
        assert_eq!(empty, (204, 27, 27));
        assert!(parse(b"garbage\r\n\r\n").is_err());
    }

    /// Answers sent in pieces, an interim 100 before the final answer, two
    /// answers on one connection.
    #[tokio::test]
    async fn reads_answers_in_pieces_on_one_connection() {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answers: [&[&[u8]]; 2] = [
            &[
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-le",
                b"ngth: 5\r\n\r\nhel",
                b"lo",
            ],
            &[b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\nno"],
        ];
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for pieces in answers {
                let mut seen = Vec::new();
                while !seen.ends_with(b"body") {
                    let mut b = [0u8; 512];
                    let n = s.read(&mut b).await.unwrap();
                    assert!(n > 0, "client closed early");
                    seen.extend_from_slice(&b[..n]);
                }
                for p in pieces {
                    s.write_all(p).await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
        });
        let mut c = Connection::open(addr).await.unwrap();
        let req = request("POST", addr, "/x", b"body");
        let a = c.send(&req).await.unwrap();
        assert_eq!((a.status, &a.body[..]), (200, &b"hello"[..]));
        let b = c.send(&req).await.unwrap();
        assert_eq!((b.status, &b.body[..]), (503, &b"no"[..]));
        server.await.unwrap();
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
