//! Node-to-node calls that are not Raft RPCs: forwarding a write or a
//! read-index request to the leader, and asking a seed to add this node.
//! Bodies are MessagePack, like the Raft RPCs (`http/raft_rpc.rs` serves them).

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ReadError, WriteError};
use crate::raft::follower_read::ReadIndexRequest;
use crate::raft::network::MSGPACK;
use crate::raft::{Command, CommandResult, NodeId};

/// How long a forwarded write may take before the follower gives up.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

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
}

impl TransportError {
    fn new(message: String) -> Self {
        TransportError {
            message,
            not_sent: false,
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
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        Ok(PeerClient { http })
    }

    /// The underlying HTTP client (shared with the Raft network).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
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
            })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| TransportError::new(format!("{url}: {e}")))?;
        if !status.is_success() {
            return Err(TransportError::new(format!(
                "{url}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        rmp_serde::from_slice(&bytes)
            .map_err(|e| TransportError::new(format!("{url}: bad answer: {e}")))
    }

    /// Sends `cmds` to the leader at `addr`, which validates and proposes
    /// each; one answer per command, in order.
    pub async fn forward_writes(
        &self,
        addr: &str,
        cmds: &[Command],
    ) -> Result<Vec<Result<CommandResult, WriteError>>, WriteError> {
        self.call(format!("{addr}/raft/forward"), &cmds, FORWARD_TIMEOUT)
            .await
            .map_err(|e| e.toward_leader(WriteError::NoLeader, WriteError::Unavailable))
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
