//! `/raft/*`: the node-to-node endpoints. Bodies are MessagePack; a body that
//! does not decode gets 400 with the JSON error, never a panic. A body over
//! the node's `rpc_body_limit` (default 64 MiB) gets 413: an AppendEntries
//! sender then retries with fewer entries (`raft/network.rs`).
//!
//! - `append`, `vote`, `snapshot`: openraft RPCs (client: `raft/network.rs`).
//! - `forward-batch`: a follower forwards client writes to the leader
//!   (`forward.rs`), a list per request; `forward`: one write per request, the
//!   shape nodes before `forward-batch` send (and that newer followers fall
//!   back to when the leader does not know `forward-batch`).
//! - `read-index`: a follower asks the leader for a linearizable read index.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::node::Node;
use crate::raft::follower_read::ReadIndexRequest;
use crate::raft::network::MSGPACK;
use crate::raft::{Command, NodeId, TypeConfig};

/// The request's MessagePack body as `T`: 413 over the body limit, 400 for
/// a body that cannot be read or decoded.
fn decode<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "rpc_body_too_large",
                format!("Raft RPC body over this node's limit: {}", e.body_text()),
            )
        } else {
            ApiError::bad_request("invalid_rpc_body", e.body_text())
        }
    })?;
    rmp_serde::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_rpc_body",
            format!("cannot decode MessagePack body: {e}"),
        )
    })
}

fn reply<T: Serialize>(value: &T) -> Response {
    match rmp_serde::to_vec(value) {
        Ok(bytes) => ([(header::CONTENT_TYPE, MSGPACK)], bytes).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encode_failed",
            e.to_string(),
        )
        .into_response(),
    }
}

/// `POST /raft/append`
pub async fn append(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: openraft::raft::AppendEntriesRequest<TypeConfig> = decode(body)?;
    Ok(reply(&node.raft().append_entries(req).await))
}

/// `POST /raft/vote`
pub async fn vote(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: openraft::raft::VoteRequest<NodeId> = decode(body)?;
    Ok(reply(&node.raft().vote(req).await))
}

/// `POST /raft/snapshot` (one chunk of a snapshot)
pub async fn snapshot(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let chunk: crate::raft::network::SnapshotChunk = decode(body)?;
    Ok(reply(&node.raft().install_snapshot(chunk.into()).await))
}

/// `POST /raft/forward`: validate and propose one write a follower forwarded.
pub async fn forward(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let cmd: Command = decode(body)?;
    Ok(reply(&node.write_local(cmd).await))
}

/// `POST /raft/forward-batch`: validate and propose writes a follower
/// forwarded (a list; they join this leader's group commit); one answer per
/// write, in order.
pub async fn forward_batch(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let cmds: Vec<Command> = decode(body)?;
    Ok(reply(&node.write_local_all(cmds).await))
}

/// `POST /raft/read-index`: confirm leadership and return the read index. The
/// body is the follower's [`ReadIndexRequest`] (nil from older nodes: they get
/// the heartbeat-round confirmation).
pub async fn read_index(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: Option<ReadIndexRequest> = decode(body)?;
    Ok(reply(&node.read_index_for_peer(req).await))
}
