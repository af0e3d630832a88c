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
//!
//! # What is refused before openraft sees it
//!
//! These endpoints share the client port and are **not authenticated**: put
//! the nodes on a private network. The checks below refuse what no real
//! leader or candidate sends and what would crash openraft's core or its
//! storage, so a stray or garbled request cannot; a forged request shaped
//! like a real leader's (new entries, a new membership, a snapshot) is still
//! obeyed, as in any Raft without peer authentication:
//!
//! - a term above [`MAX_TERM`] in a vote, append or snapshot (400): openraft
//!   adopts the highest term it sees and its next election adds one to it,
//!   which overflows at `u64::MAX` (a panic that every restart repeats);
//!   real terms grow by one per election;
//! - an append or snapshot whose log ids no real leader sends (a term above
//!   the sender's, a gap, falling terms, a higher term below what this node
//!   applied), whose commands break the write rules, or whose membership is
//!   empty or names a voter without an address (400, `check_append`,
//!   `check_snapshot`); a snapshot chunk that starts past the bytes received
//!   gets openraft's `SnapshotMismatch` (the vendored fork's check);
//! - a vote from a node that is not a voter of this node's membership (403):
//!   it would still move this node's term. A node that learned of a newer
//!   membership first may refuse a new voter's vote for a moment; the
//!   election then goes to another candidate.

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
use crate::raft::{Command, LogId, NodeId, TypeConfig};

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

/// The highest Raft term a request may carry (2^48: millions of elections a
/// second for centuries).
pub const MAX_TERM: u64 = 1 << 48;

/// 400 for a vote whose term is out of range (see the module docs).
fn check_term(vote: &openraft::Vote<NodeId>) -> Result<(), ApiError> {
    let term = vote.leader_id().get_term();
    if term > MAX_TERM {
        return Err(ApiError::bad_request(
            "invalid_rpc_body",
            format!("term {term} is out of range (at most {MAX_TERM})"),
        ));
    }
    Ok(())
}

/// 400 for an AppendEntries no real leader sends: a term above the
/// leader's own (or [`MAX_TERM`]) in any log id, entries that do not follow
/// `prev_log_id` and each other index by index with terms that never fall,
/// or a command that breaks the rules every write is checked against before
/// it is proposed ([`Command::check_replicated`]). openraft trusts all of
/// this: a later index with a gap panics its core, an entry of a higher term
/// would outrank every entry this node's own leadership writes afterwards
/// (no write would commit again, restarts included), and a key longer than
/// the storage can hold panics the apply, at every restart too.
fn check_append(
    req: &openraft::raft::AppendEntriesRequest<TypeConfig>,
    local: &Local,
) -> Result<(), ApiError> {
    let invalid = |msg: String| Err(ApiError::bad_request("invalid_rpc_body", msg));
    check_term(&req.vote)?;
    let term = req.vote.leader_id().get_term();
    let above = |id: &Option<LogId>| id.as_ref().is_some_and(|l| l.leader_id.get_term() > term);
    if above(&req.prev_log_id) || above(&req.leader_commit) {
        return invalid(format!(
            "a log id with a term above the leader's term {term}"
        ));
    }
    // A leader of this node's term or a later one holds every committed
    // entry, so none of its log ids at or below an index this node applied
    // has a higher term than the applied one. openraft would take such a
    // commit index for an advance and apply a range that runs backwards (a
    // panic of its core). A leader of an older term is left to openraft,
    // whose answer tells it of the newer vote.
    if let Some(applied) = local.applied.filter(|_| term >= local.term) {
        let ids = req
            .prev_log_id
            .iter()
            .chain(req.entries.iter().map(|e| &e.log_id))
            .chain(req.leader_commit.iter());
        for id in ids {
            if id.index <= applied.index && id.leader_id.get_term() > applied.leader_id.get_term() {
                return invalid(format!(
                    "log id {id} contradicts the applied {applied}: a higher term at a lower index"
                ));
            }
        }
    }
    let mut last = req.prev_log_id;
    for entry in &req.entries {
        let id = entry.log_id;
        let expected = last.map_or(0, |l| l.index + 1);
        if id.index != expected {
            return invalid(format!(
                "entry {} does not follow entry {:?}",
                id.index,
                last.map(|l| l.index)
            ));
        }
        let entry_term = id.leader_id.get_term();
        if entry_term > term || last.is_some_and(|l| l.leader_id.get_term() > entry_term) {
            return invalid(format!(
                "entry {} has term {entry_term}: above the leader's term {term} or below \
                 the entry before it",
                id.index
            ));
        }
        let checked = match &entry.payload {
            openraft::EntryPayload::Normal(cmd) => {
                cmd.check_replicated().map_err(|e| e.to_string())
            }
            openraft::EntryPayload::Membership(m) => check_membership(m),
            openraft::EntryPayload::Blank => Ok(()),
        };
        checked.map_err(|e| {
            ApiError::bad_request("invalid_rpc_body", format!("entry {}: {e}", id.index))
        })?;
        last = Some(id);
    }
    Ok(())
}

/// What the checks compare a request with: this node's term and the last
/// log id it applied.
struct Local {
    term: u64,
    applied: Option<LogId>,
}

impl Local {
    fn of(node: &Node) -> Self {
        let metrics = node.raft().metrics();
        let m = metrics.borrow();
        Local {
            term: m.current_term,
            applied: m.last_applied,
        }
    }
}

/// A membership no leader proposes: no configuration, an empty one, or a
/// voter without a node entry (openraft's core panics when it has to reach
/// it). Which nodes it names, and their addresses, cannot be judged here: a
/// leader may well remove this node, and members added before addresses
/// were checked keep theirs.
fn check_membership(m: &openraft::Membership<NodeId, openraft::BasicNode>) -> Result<(), String> {
    let configs = m.get_joint_config();
    if configs.is_empty() || configs.iter().any(|c| c.is_empty()) {
        return Err("a membership with an empty configuration".into());
    }
    if let Some(id) = m.voter_ids().find(|id| m.get_node(id).is_none()) {
        return Err(format!("a membership whose voter {id} has no address"));
    }
    Ok(())
}

/// 400 for a snapshot whose log ids carry a term above the sender's, or
/// whose membership no leader proposes ([`check_membership`]).
fn check_snapshot(
    req: &openraft::raft::InstallSnapshotRequest<TypeConfig>,
) -> Result<(), ApiError> {
    check_term(&req.vote)?;
    check_membership(req.meta.last_membership.membership())
        .map_err(|e| ApiError::bad_request("invalid_rpc_body", format!("snapshot: {e}")))?;
    let term = req.vote.leader_id().get_term();
    let ids = [req.meta.last_log_id, *req.meta.last_membership.log_id()];
    if ids.iter().flatten().any(|l| l.leader_id.get_term() > term) {
        return Err(ApiError::bad_request(
            "invalid_rpc_body",
            format!("a snapshot log id with a term above the leader's term {term}"),
        ));
    }
    Ok(())
}

/// 403 unless `candidate` is a voter of this node's membership
/// ([`Node::has_voter`]).
fn check_voter(node: &Node, candidate: Option<NodeId>) -> Result<(), ApiError> {
    if !candidate.is_some_and(|id| node.has_voter(id)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_a_voter",
            format!("vote request from {candidate:?}, which is not a voter of this node's cluster"),
        ));
    }
    Ok(())
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
    check_append(&req, &Local::of(&node))?;
    Ok(reply(&node.raft().append_entries(req).await))
}

/// `POST /raft/vote`
pub async fn vote(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: openraft::raft::VoteRequest<NodeId> = decode(body)?;
    check_term(&req.vote)?;
    check_voter(&node, req.vote.leader_id().voted_for())?;
    Ok(reply(&node.raft().vote(req).await))
}

/// `POST /raft/snapshot` (one chunk of a snapshot)
pub async fn snapshot(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let chunk: crate::raft::network::SnapshotChunk = decode(body)?;
    let req: openraft::raft::InstallSnapshotRequest<TypeConfig> = chunk.into();
    check_snapshot(&req)?;
    Ok(reply(&node.raft().install_snapshot(req).await))
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
