//! Typed errors of the library API. They cross the wire between nodes (a
//! follower forwards a write and gets the leader's error back), so they are
//! serializable; `http/error.rs` maps them onto HTTP statuses.

use serde::{Deserialize, Serialize};

use crate::keys::KeyError;
use crate::raft::NodeId;

/// Why a write (put or delete) did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum WriteError {
    /// The key is not acceptable.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The value is over the size limit.
    #[error("value is {0} bytes; the limit is {max}", max = crate::keys::MAX_VALUE_BYTES)]
    ValueTooLarge(usize),
    /// The value's content type is not acceptable.
    #[error("invalid content type: {0}")]
    InvalidContentType(String),
    /// `If-Match` / `If-None-Match` did not hold when the write was applied.
    #[error("precondition failed: the key's current revision is {}", current.map_or("none (absent)".to_string(), |r| r.to_string()))]
    PreconditionFailed {
        /// Revision of the key when the write was applied (`None`: absent).
        current: Option<u64>,
    },
    /// A validator plugin refused the write; nothing was proposed.
    #[error("rejected by plugin {plugin}: {message}")]
    RejectedByPlugin {
        /// The plugin's name.
        plugin: String,
        /// The plugin's reason.
        message: String,
    },
    /// There is no leader right now (election in progress or no quorum).
    #[error("no leader is known; retry shortly")]
    NoLeader,
    /// This node is not the leader (returned to a forwarding follower).
    #[error("node is not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<NodeId>,
    },
    /// Forwarding to the leader failed or the node is shutting down. If the
    /// leader went away mid-request the write may or may not have been
    /// applied: check, or retry with `If-Match` / `If-None-Match`.
    #[error("leader unavailable (the write may or may not have been applied): {0}")]
    Unavailable(String),
}

impl From<crate::keys::ContentTypeError> for WriteError {
    fn from(e: crate::keys::ContentTypeError) -> Self {
        WriteError::InvalidContentType(e.to_string())
    }
}

impl From<KeyError> for WriteError {
    fn from(e: KeyError) -> Self {
        WriteError::InvalidKey(e.to_string())
    }
}

/// Why a read did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ReadError {
    /// The key is not acceptable.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A linearizable read could not confirm leadership or catch up.
    #[error("no leader is known; retry shortly")]
    NoLeader,
    /// Leader unreachable, shutdown, or a timeout while catching up.
    #[error("linearizable read unavailable: {0}")]
    Unavailable(String),
    /// Local storage failed.
    #[error("storage: {0}")]
    Storage(String),
}

impl From<KeyError> for ReadError {
    fn from(e: KeyError) -> Self {
        ReadError::InvalidKey(e.to_string())
    }
}

impl From<crate::raft::state_machine::ReadError> for ReadError {
    fn from(e: crate::raft::state_machine::ReadError) -> Self {
        ReadError::Storage(e.to_string())
    }
}

/// Why a membership change failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ClusterError {
    /// The request is malformed (bad id or address).
    #[error("invalid member: {0}")]
    Invalid(String),
    /// The node id is already a member with another address.
    #[error("node {id} is already a member at {addr}")]
    Conflict {
        /// The node id.
        id: NodeId,
        /// Its current address.
        addr: String,
    },
    /// Another member already has this address.
    #[error("{addr} is already the address of node {id}")]
    AddrInUse {
        /// The address asked for.
        addr: String,
        /// The member that has it.
        id: NodeId,
    },
    /// The address answers as another node than the one to add.
    #[error("{addr} answers as node {found}, not node {id}")]
    WrongNode {
        /// The node id asked for.
        id: NodeId,
        /// The address asked for.
        addr: String,
        /// The id the node at `addr` reported.
        found: NodeId,
    },
    /// The learner caught up, but its address could not say which node it
    /// is, so it was not made a voter (it stays a learner).
    #[error(
        "node {id} caught up, but {addr} could not confirm it is node {id} ({reason}), so it \
         is not a voter; ask again to promote it, or remove it"
    )]
    Unconfirmed {
        /// The node id.
        id: NodeId,
        /// Its address.
        addr: String,
        /// Why the address did not answer.
        reason: String,
    },
    /// The node is not a member.
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    /// No leader right now.
    #[error("no leader is known; retry shortly")]
    NoLeader,
    /// Raft refused or failed the change.
    #[error("membership change failed: {0}")]
    Failed(String),
    /// The node was added as a learner but did not catch up in time, so it
    /// was not made a voter (it stays a learner: ask again, or remove it).
    #[error(
        "node {id} was added as a learner but did not catch up within {waited:?}, so it is \
         not a voter (can the leader reach its address?); ask again to promote it, or remove it"
    )]
    NotCaughtUp {
        /// The node id.
        id: NodeId,
        /// How long the leader waited.
        waited: std::time::Duration,
    },
}

/// Starting a node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A setting cannot work (an advertised or seed address that is not
    /// `http://host:port`).
    #[error("{0}")]
    Config(String),
    /// The data directory could not be opened.
    #[error(transparent)]
    Storage(#[from] crate::raft::OpenError),
    /// Raft could not be started or initialized.
    #[error("raft: {0}")]
    Raft(String),
    /// The plugin runtime could not be set up.
    #[error("plugins: {0}")]
    Plugins(String),
    /// The listener or the HTTP client could not be set up.
    #[error("network: {0}")]
    Network(String),
    /// The seed to join through could not be read from or recorded in the
    /// data dir.
    #[error("data dir: join seed: {0}")]
    JoinIntent(#[source] std::io::Error),
}
