//! Raft RPC client: sends AppendEntries, Vote and InstallSnapshot to peers as
//! MessagePack over HTTP (`POST {peer}/raft/{append,vote,snapshot}`), each
//! peer over a keep-alive HTTP/1.1 connection of its own (hyper's client
//! connection, without a pool in between). The server side is
//! `http/raft_rpc.rs`.
//! An AppendEntries the peer refuses as too large (413) becomes openraft's
//! `PayloadTooLarge` with half the entries, so it is retried in smaller parts.
//! Snapshot chunks travel as [`SnapshotChunk`]: their bytes as MessagePack
//! binary, not openraft's array of integers. A vote a peer refuses as from a
//! non-member (403) is noted in [`VoteRefusals`] (`removal.rs`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::removal::VoteRefusals;
use super::types::{NodeId, SnapshotMeta, TypeConfig};

/// An `InstallSnapshotRequest` on the wire: its fields in its order, with
/// the chunk as MessagePack binary. openraft's own type serializes the
/// chunk's `Vec<u8>` as an array of integers — up to two bytes per byte,
/// each encoded and decoded on its own (a 1 MiB chunk of random bytes took
/// 1.5 MiB and milliseconds each way). A receiver takes either form, so
/// chunks from a sender that still used openraft's are read too.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    vote: openraft::Vote<NodeId>,
    meta: SnapshotMeta,
    offset: u64,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    done: bool,
}

impl From<InstallSnapshotRequest<TypeConfig>> for SnapshotChunk {
    fn from(r: InstallSnapshotRequest<TypeConfig>) -> Self {
        SnapshotChunk {
            vote: r.vote,
            meta: r.meta,
            offset: r.offset,
            data: r.data,
            done: r.done,
        }
    }
}

impl From<SnapshotChunk> for InstallSnapshotRequest<TypeConfig> {
    fn from(c: SnapshotChunk) -> Self {
        InstallSnapshotRequest {
            vote: c.vote,
            meta: c.meta,
            offset: c.offset,
            data: c.data,
            done: c.done,
        }
    }
}

/// Content type of Raft RPC bodies.
pub const MSGPACK: &str = "application/msgpack";

/// How long connecting to a peer may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Creates one [`PeerConnection`] per target; they all note refused votes
/// in one [`VoteRefusals`].
#[derive(Clone, Default)]
pub struct Network {
    refusals: Arc<VoteRefusals>,
}

impl Network {
    /// Connections that note refused votes in `refusals`.
    pub fn new(refusals: Arc<VoteRefusals>) -> Self {
        Network { refusals }
    }
}

/// RPC endpoint for one peer: one keep-alive HTTP/1.1 connection, opened on
/// first use and again after any failure. openraft sends one RPC at a time
/// per endpoint, so one connection is all it needs.
pub struct PeerConnection {
    target: NodeId,
    /// `host:port` of the peer (from its advertised URL), or why it is unusable.
    authority: Result<String, String>,
    conn: Option<SendRequest<Full<Bytes>>>,
    refusals: Arc<VoteRefusals>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConnection {
        PeerConnection {
            target,
            authority: authority_of(&node.addr),
            conn: None,
            refusals: self.refusals.clone(),
        }
    }
}

/// `host:port` of an advertised `http://host:port` URL.
fn authority_of(addr: &str) -> Result<String, String> {
    let uri: Uri = addr
        .parse()
        .map_err(|e| format!("peer address {addr:?}: {e}"))?;
    if uri.scheme_str().is_some_and(|s| s != "http") {
        return Err(format!("peer address {addr:?}: only http:// is supported"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("peer address {addr:?} has no host"))?;
    Ok(match authority.port() {
        Some(_) => authority.as_str().to_owned(),
        None => format!("{}:80", authority.host()),
    })
}

/// Checks an address given for a new member: `http://host[:port]` that
/// `authority_of` can use, with a port that fits in 16 bits and nothing
/// but the authority (no user info, path, query or fragment).
pub fn check_peer_addr(addr: &str) -> Result<(), String> {
    authority_of(addr)?;
    let uri: Uri = addr.parse().map_err(|e| format!("{addr:?}: {e}"))?;
    let Some(authority) = uri.authority() else {
        return Err(format!("{addr:?} has no host"));
    };
    if uri.scheme_str() != Some("http") {
        return Err(format!("{addr:?}: must start with http://"));
    }
    if authority.as_str().contains('@') {
        return Err(format!("{addr:?}: no user info"));
    }
    // `port()` is `None` for a port that does not fit in 16 bits: look at
    // what follows the host instead.
    let port = authority
        .as_str()
        .strip_prefix(authority.host())
        .unwrap_or("");
    let valid_port = port
        .strip_prefix(':')
        .and_then(|p| p.parse::<u16>().ok())
        .is_some_and(|p| p != 0);
    if !port.is_empty() && !valid_port {
        return Err(format!("{addr:?}: the port must be 1-65535"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() || addr.contains('#') {
        return Err(format!("{addr:?}: no path, query or fragment"));
    }
    Ok(())
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

/// A transport failure of one attempt: before anything was sent (connect),
/// after (exchange), or no answer in time.
enum Failure {
    Connect(std::io::Error),
    Exchange(std::io::Error),
    Timeout(std::io::Error),
}

impl PeerConnection {
    async fn connect(authority: &str, ttl: Duration) -> std::io::Result<SendRequest<Full<Bytes>>> {
        let limit = CONNECT_TIMEOUT.min(ttl);
        let stream = tokio::time::timeout(limit, tokio::net::TcpStream::connect(authority))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        // Ends when the connection closes, which dropping `sender` does.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// One request on the kept connection (a new one if there is none or it
    /// closed); the connection is kept only after a complete answer.
    async fn exchange(
        conn: &mut Option<SendRequest<Full<Bytes>>>,
        authority: &str,
        path: &'static str,
        body: Bytes,
        ttl: Duration,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let mut sender = match conn.take().filter(|c| !c.is_closed()) {
            Some(s) => s,
            None => Self::connect(authority, ttl)
                .await
                .map_err(Failure::Connect)?,
        };
        let request = Request::post(path)
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, MSGPACK)
            .body(Full::new(body))
            .map_err(|e| Failure::Exchange(std::io::Error::other(e)))?;
        let answer = tokio::time::timeout(ttl, async {
            sender.ready().await?;
            let resp = sender.send_request(request).await?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, bytes))
        })
        .await;
        match answer {
            Ok(Ok(answer)) => {
                *conn = Some(sender);
                Ok(answer)
            }
            Ok(Err(e)) => Err(Failure::Exchange(std::io::Error::other(e))),
            Err(_) => Err(Failure::Timeout(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {ttl:?}"),
            ))),
        }
    }

    /// One RPC. `entries` is the number of log entries `req` carries: when
    /// the peer refuses the body as too large (413) and there is more than
    /// one, openraft is asked to retry with half as many.
    async fn call<Req, Resp, E>(
        &mut self,
        path: &'static str,
        req: &Req,
        option: &RPCOption,
        entries: usize,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let PeerConnection {
            target,
            authority,
            conn,
            refusals,
        } = self;
        let authority = match authority {
            Ok(a) => a.as_str(),
            Err(msg) => {
                return Err(RPCError::Unreachable(Unreachable::new(
                    &std::io::Error::other(msg.clone()),
                )));
            }
        };
        let body = Bytes::from(
            rmp_serde::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?,
        );
        let reused = conn.as_ref().is_some_and(|c| !c.is_closed());
        let ttl = option.hard_ttl();
        let mut result = Self::exchange(conn, authority, path, body.clone(), ttl).await;
        // A kept connection the peer closed meanwhile (it restarted, or timed
        // the connection out) fails at once, without an answer: try once more
        // on a new one. Raft RPCs may be delivered twice. (A timeout is not
        // retried: the peer is slow or gone, and openraft decides what next.)
        if reused && matches!(result, Err(Failure::Exchange(_))) {
            result = Self::exchange(conn, authority, path, body, ttl).await;
        }
        let (status, bytes) = result.map_err(|f| match f {
            Failure::Connect(e) => RPCError::Unreachable(Unreachable::new(&e)),
            Failure::Exchange(e) | Failure::Timeout(e) => RPCError::Network(NetworkError::new(&e)),
        })?;
        if status == StatusCode::PAYLOAD_TOO_LARGE && entries > 1 {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint((entries / 2) as u64),
            ));
        }
        if path == "/raft/vote" && status == StatusCode::FORBIDDEN {
            // `not_a_voter`: the peer's membership does not have this node.
            refusals.refused_by(*target);
        }
        if !status.is_success() {
            let msg = format!(
                "peer answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
            return Err(RPCError::Network(NetworkError::new(
                &std::io::Error::other(msg),
            )));
        }
        let result: Result<Resp, RaftError<NodeId, E>> =
            rmp_serde::from_slice(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(*target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        let entries = rpc.entries.len();
        self.call("/raft/append", &rpc, &option, entries).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let chunk = SnapshotChunk::from(rpc);
        self.call("/raft/snapshot", &chunk, &option, 0).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        let answer = self.call("/raft/vote", &rpc, &option, 0).await;
        if answer.is_ok() {
            self.refusals.answered_by(self.target);
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use axum::extract::{ConnectInfo, State};
    use axum::response::IntoResponse;
    use openraft::Vote;

    use super::*;

    /// A chunk travels as binary, and a receiver still reads one in
    /// openraft's own form (an array of integers).
    #[test]
    fn snapshot_chunks_are_binary_and_the_old_form_is_read() {
        let data: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
        let request = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(openraft::testing::log_id(3, 1, 40)),
                last_membership: Default::default(),
                snapshot_id: "3-40-1".into(),
            },
            offset: 1 << 20,
            data,
            done: true,
        };
        let binary = rmp_serde::to_vec(&SnapshotChunk::from(request.clone())).unwrap();
        let old_form = rmp_serde::to_vec(&request).unwrap();
        assert!(
            binary.len() < request.data.len() + 200,
            "{} bytes",
            binary.len()
        );
        assert!(
            old_form.len() > request.data.len() * 3 / 2,
            "{} bytes",
            old_form.len()
        );
        for bytes in [&binary, &old_form] {
            let chunk: SnapshotChunk = rmp_serde::from_slice(bytes).unwrap();
            assert_eq!(InstallSnapshotRequest::from(chunk), request);
        }
    }

    /// A peer answering `/raft/vote` that records the client address of
    /// each request (one per connection), and with `close` asks the client
    /// to close after each answer (`Connection: close`).
    async fn peer(close: bool) -> (PeerConnection, Arc<Mutex<HashSet<SocketAddr>>>) {
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let vote = |State((seen, close)): State<(Arc<Mutex<HashSet<SocketAddr>>>, bool)>,
                    ConnectInfo(from): ConnectInfo<SocketAddr>| async move {
            seen.lock().unwrap().insert(from);
            let answer: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
                Ok(VoteResponse::new(Vote::new(1, 1), None, true));
            let body = rmp_serde::to_vec(&answer).unwrap();
            let mut resp = body.into_response();
            if close {
                resp.headers_mut()
                    .insert(header::CONNECTION, "close".parse().unwrap());
            }
            resp
        };
        let app = axum::Router::new()
            .route("/raft/vote", axum::routing::post(vote))
            .with_state((seen.clone(), close));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });
        let node = BasicNode::new(format!("http://{addr}"));
        (Network::default().new_client(2, &node).await, seen)
    }

    async fn vote(c: &mut PeerConnection) -> bool {
        let req = VoteRequest::new(Vote::new(1, 1), None);
        c.vote(req, RPCOption::new(Duration::from_secs(5)))
            .await
            .expect("vote RPC")
            .vote_granted
    }

    #[tokio::test]
    async fn rpcs_to_a_peer_share_one_kept_connection() {
        let (mut c, seen) = peer(false).await;
        for _ in 0..5 {
            assert!(vote(&mut c).await);
        }
        assert_eq!(
            seen.lock().unwrap().len(),
            1,
            "one connection for five RPCs"
        );
    }

    #[tokio::test]
    async fn a_peer_closing_after_each_answer_fails_no_rpc() {
        let (mut c, seen) = peer(true).await;
        for _ in 0..3 {
            assert!(vote(&mut c).await);
            // Give the close time to arrive before the next RPC.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen.lock().unwrap().len(), 3, "a new connection per RPC");
    }

    #[test]
    fn peer_addresses_give_host_and_port() {
        assert_eq!(
            authority_of("http://127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            authority_of("http://127.0.0.1:8080/").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(authority_of("http://[::1]:9000").unwrap(), "[::1]:9000");
        assert_eq!(
            authority_of("http://node-2.internal").unwrap(),
            "node-2.internal:80"
        );
        assert!(
            authority_of("https://127.0.0.1:8080").is_err(),
            "no TLS client"
        );
        assert!(authority_of("http://").is_err());
        assert!(authority_of("not a url").is_err());
    }

    #[test]
    fn member_addresses_are_checked() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://[::1]:9000",
            "http://node-2.internal",
        ] {
            assert_eq!(check_peer_addr(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://a b:notaport",
            "http://host:99999",
            "http://host:0",
            "http://host:port",
            "http://user@host:1",
            "http://host:1/path",
            "http://host:1?q",
            "http://host:1#f",
            "https://host:1",
            "ftp://host:1",
            "http://",
            "host:1",
        ] {
            assert!(check_peer_addr(bad).is_err(), "{bad}");
        }
    }
}
