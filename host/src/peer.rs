//! Node-to-node calls that are not Raft RPCs: forwarding a write or a
//! read-index request to the leader, asking a seed to add this node, and
//! asking an address which node answers there.
//! Forwarded bodies are MessagePack, like the Raft RPCs (`http/raft_rpc.rs`
//! serves them); the join and identity calls use the public JSON API.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ReadError, WriteError};
use crate::raft::follower_read::ReadIndexRequest;
use crate::raft::network::MSGPACK;
use crate::raft::{Command, CommandResult, NodeId};

/// How long a forwarded write may take before the follower gives up.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the leader waits for a would-be member to say who it is.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP client for calls between nodes; one per node, connections kept alive.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
}

/// A peer call failed before any answer from the peer's application logic.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TransportError {
    message: String,
    /// The connection could not be made: the request was never sent.
    not_sent: bool,
    /// The peer answered 404: it has no such route (an older version).
    no_route: bool,
}

impl TransportError {
    fn new(message: String) -> Self {
        TransportError {
            message,
            not_sent: false,
            no_route: false,
        }
    }

    /// The error a call to the leader reports: `no_leader` when the request
    /// was never sent (the leader is gone: safe to retry once a new one is
    /// known), else `unavailable` with the message (outcome unknown).
    fn toward_leader<E>(self, no_leader: E, unavailable: fn(String) -> E) -> E {
        if self.not_sent {
            no_leader
        } else {
            unavailable(self.message)
        }
    }
}

impl PeerClient {
    /// Builds the shared client.
    pub fn new() -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            // Below the servers' idle close (`http/server.rs`, 30 s): a
            // connection is dropped here before the other node closes it
            // under a request.
            .pool_idle_timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        Ok(PeerClient { http })
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        url: String,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, TransportError> {
        let body = rmp_serde::to_vec(req).map_err(|e| TransportError::new(e.to_string()))?;
        let resp = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, MSGPACK)
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| TransportError {
                message: format!("{url}: {e}"),
                not_sent: e.is_connect(),
                no_route: false,
            })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| TransportError::new(format!("{url}: {e}")))?;
        if !status.is_success() {
            return Err(TransportError {
                message: format!("{url}: {status}: {}", String::from_utf8_lossy(&bytes)),
                not_sent: false,
                no_route: status == reqwest::StatusCode::NOT_FOUND,
            });
        }
        rmp_serde::from_slice(&bytes)
            .map_err(|e| TransportError::new(format!("{url}: bad answer: {e}")))
    }

    /// Sends `cmds` to the leader at `addr`, which validates and proposes
    /// each; one answer per command, in order. A leader of a version before
    /// `/raft/forward-batch` (404: nothing was run) gets them one per request
    /// on `/raft/forward`, so writes keep working during a rolling upgrade.
    pub async fn forward_writes(
        &self,
        addr: &str,
        cmds: &[Command],
    ) -> Vec<Result<CommandResult, WriteError>> {
        let to_leader =
            |e: TransportError| e.toward_leader(WriteError::NoLeader, WriteError::Unavailable);
        let batch = self
            .call(format!("{addr}/raft/forward-batch"), &cmds, FORWARD_TIMEOUT)
            .await;
        match batch {
            Ok(answers) => answers,
            Err(e) if e.no_route => {
                tracing::debug!(
                    leader = addr,
                    "no /raft/forward-batch: forwarding one by one"
                );
                let url = format!("{addr}/raft/forward");
                futures::future::join_all(cmds.iter().map(|cmd| async {
                    self.call::<_, Result<CommandResult, WriteError>>(
                        url.clone(),
                        cmd,
                        FORWARD_TIMEOUT,
                    )
                    .await
                    .map_err(to_leader)?
                }))
                .await
            }
            Err(e) => vec![Err(to_leader(e)); cmds.len()],
        }
    }

    /// Asks the leader at `addr` for a read index (confirmed with a quorum).
    pub async fn read_index(
        &self,
        addr: &str,
        req: &ReadIndexRequest,
        timeout: Duration,
    ) -> Result<u64, ReadError> {
        self.call::<_, Result<u64, ReadError>>(format!("{addr}/raft/read-index"), req, timeout)
            .await
            .map_err(|e| e.toward_leader(ReadError::NoLeader, ReadError::Unavailable))?
    }

    /// Asks the member at `seed` to add node `id` reachable at `addr`.
    pub async fn join(&self, seed: &str, id: NodeId, addr: &str) -> Result<(), TransportError> {
        let resp = self
            .http
            .post(format!("{}/v1/cluster/members", seed.trim_end_matches('/')))
            .timeout(Duration::from_secs(30))
            .json(&serde_json::json!({ "id": id, "addr": addr }))
            .send()
            .await
            .map_err(|e| TransportError::new(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        Err(TransportError::new(format!("{status}: {body}")))
    }

    /// Asks whatever serves `addr` which node it is (`GET /v1/cluster`).
    /// The leader does before it adds a member at `addr`, and again before it
    /// makes it a voter: a second id at one node's address would count that
    /// node's votes twice.
    pub async fn node_id_at(&self, addr: &str) -> Result<NodeId, TransportError> {
        #[derive(serde::Deserialize)]
        struct Identity {
            node_id: NodeId,
        }
        let url = format!("{}/v1/cluster", addr.trim_end_matches('/'));
        let resp = self
            .http
            .get(&url)
            .timeout(IDENTITY_TIMEOUT)
            .send()
            .await
            .map_err(|e| TransportError::new(format!("{url}: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(TransportError::new(format!("{url}: {status}")));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| TransportError::new(format!("{url}: {e}")))?;
        serde_json::from_slice::<Identity>(&body)
            .map(|i| i.node_id)
            .map_err(|e| TransportError::new(format!("{url}: not a flagstone node ({e})")))
    }

    /// Relays a JSON request to another node and returns its status and body.
    pub async fn relay_json(
        &self,
        method: reqwest::Method,
        url: String,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, bytes::Bytes), TransportError> {
        let mut req = self
            .http
            .request(method, &url)
            .timeout(Duration::from_secs(30));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| TransportError::new(format!("{url}: {e}")))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| TransportError::new(e.to_string()))?;
        Ok((status, bytes))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;

    use super::*;
    use crate::raft::Precondition;

    fn put(key: &str) -> Command {
        Command::Put {
            key: key.into(),
            value: b"v".to_vec(),
            content_type: None,
            precondition: Precondition::None,
        }
    }

    /// Serves `router` on 127.0.0.1:0; returns its base URL.
    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}")
    }

    /// A leader of the version before `/raft/forward-batch`: one MessagePack
    /// command per `/raft/forward` request, one result back; every other
    /// route is 404. Keys starting with `bad` are rejected, as a validator
    /// would.
    fn leader_before_forward_batch(revisions: Arc<AtomicU64>) -> Router {
        async fn forward(State(rev): State<Arc<AtomicU64>>, body: Bytes) -> Vec<u8> {
            let cmd: Command = rmp_serde::from_slice(&body).unwrap();
            let answer: Result<CommandResult, WriteError> = match cmd.key() {
                Some(k) if k.starts_with("bad") => Err(WriteError::RejectedByPlugin {
                    plugin: "p".into(),
                    message: format!("{k} refused"),
                }),
                _ => Ok(CommandResult::Put {
                    revision: rev.fetch_add(1, Ordering::SeqCst) + 1,
                }),
            };
            rmp_serde::to_vec(&answer).unwrap()
        }
        Router::new()
            .route("/raft/forward", post(forward))
            .with_state(revisions)
    }

    #[tokio::test]
    async fn writes_reach_a_leader_without_forward_batch_one_by_one() {
        let revisions = Arc::new(AtomicU64::new(0));
        let leader = serve(leader_before_forward_batch(revisions.clone())).await;
        let peers = PeerClient::new().unwrap();
        let answers = peers
            .forward_writes(&leader, &[put("a"), put("bad1"), put("b")])
            .await;
        assert_eq!(answers.len(), 3);
        assert!(matches!(answers[0], Ok(CommandResult::Put { .. })));
        assert_eq!(
            answers[1],
            Err(WriteError::RejectedByPlugin {
                plugin: "p".into(),
                message: "bad1 refused".into()
            })
        );
        assert!(matches!(answers[2], Ok(CommandResult::Put { .. })));
        assert_eq!(revisions.load(Ordering::SeqCst), 2, "each write ran once");
    }

    #[tokio::test]
    async fn other_failures_of_the_batch_call_are_not_retried() {
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let leader = serve(Router::new().fallback(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }
        }))
        .await;
        let peers = PeerClient::new().unwrap();
        let answers = peers.forward_writes(&leader, &[put("a"), put("b")]).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no fallback after a 500");
        for a in answers {
            assert!(
                matches!(a, Err(WriteError::Unavailable(ref m)) if m.contains("boom")),
                "{a:?}"
            );
        }
    }
}
