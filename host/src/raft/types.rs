//! The Raft type configuration and the replicated data model: what a log entry
//! carries ([`Command`]), what applying it returns ([`CommandResult`]) and how a
//! stored value is laid out on disk ([`ValueRecord`]).
//!
//! Revisions count changes: every applied put, and every delete of an
//! existing key, takes the next revision (a counter kept by the state
//! machine, like etcd's). A key's revision is the one of its last write, the
//! store's revision is the last one given out. Applying is deterministic, so
//! revisions are identical on every node; they are unique per change even
//! when many client writes travel in one Raft entry ([`Command::Batch`]).

use serde::{Deserialize, Serialize};

use crate::error::WriteError;
use crate::keys::{MAX_VALUE_BYTES, validate_content_type, validate_key};

/// Identifier of a node in the cluster (`--id`).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft type configuration of flagstone.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        SnapshotData = tokio::fs::File,
);

/// The openraft handle specialised for flagstone.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id (term + index).
pub type LogId = openraft::LogId<NodeId>;
/// Persisted membership.
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
/// Storage error type used by the log store and the state machine.
pub type StorageError = openraft::StorageError<NodeId>;

/// A condition checked atomically when the command is applied.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precondition {
    /// Unconditional write.
    #[default]
    None,
    /// `If-Match: <revision>`: the key must exist with exactly this revision.
    Revision(u64),
    /// `If-None-Match: *`: the key must not exist (create only).
    Absent,
    /// `If-Match: *`: the key must exist (update or delete only).
    Present,
}

/// A replicated state-machine command (the `D` of the Raft log).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Store `value` under `key`.
    Put {
        /// The key (validated before proposal).
        key: String,
        /// The raw value, at most [`crate::keys::MAX_VALUE_BYTES`].
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The Content-Type given by the writer, returned on reads.
        content_type: Option<String>,
        /// Compare-and-set condition.
        precondition: Precondition,
    },
    /// Remove `key`.
    Delete {
        /// The key.
        key: String,
        /// Compare-and-set condition.
        precondition: Precondition,
    },
    /// Independent writes from concurrent clients proposed as one entry
    /// (one fsync and one replication round for all of them), applied in
    /// order, each with its own result and revision.
    Batch(Vec<Command>),
}

impl Command {
    /// The key a single write touches (`None` for a batch).
    pub fn key(&self) -> Option<&str> {
        match self {
            Command::Put { key, .. } | Command::Delete { key, .. } => Some(key),
            Command::Batch(_) => None,
        }
    }

    /// The checks a client's write passes before it is proposed: a single
    /// key within the key rules, a value within the size limit and a valid
    /// content type. A batch is refused: only the leader forms them.
    pub fn check(&self) -> Result<(), WriteError> {
        let Some(key) = self.key() else {
            return Err(WriteError::InvalidKey(
                "batches are formed by the leader only".into(),
            ));
        };
        validate_key(key)?;
        if let Command::Put {
            value,
            content_type,
            ..
        } = self
        {
            if value.len() > MAX_VALUE_BYTES {
                return Err(WriteError::ValueTooLarge(value.len()));
            }
            if let Some(ct) = content_type {
                validate_content_type(ct)?;
            }
        }
        Ok(())
    }

    /// The checks a replicated entry's command passes before a follower
    /// appends it: [`Command::check`] for a write, or for each write of a
    /// batch (one level: the leader never nests them). Every leader checked
    /// its entries before proposing them, so only a forged AppendEntries
    /// fails this — which would otherwise store what the API refuses, or a
    /// key the state machine's storage cannot hold.
    pub fn check_replicated(&self) -> Result<(), WriteError> {
        match self {
            Command::Batch(cmds) => cmds.iter().try_for_each(Command::check),
            single => single.check(),
        }
    }
}

/// What applying one log entry did (the `R` of the Raft log).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub enum CommandResult {
    /// A blank or membership entry: nothing changed in the key space.
    #[default]
    Noop,
    /// The value was stored at `revision`.
    Put {
        /// Revision of the write (the next change revision).
        revision: u64,
    },
    /// The key was deleted (or was already absent) at `revision`.
    Delete {
        /// Whether the key existed.
        deleted: bool,
        /// Revision of the delete; the store's current revision when the key
        /// was already absent (nothing changed).
        revision: u64,
    },
    /// The precondition did not hold; nothing changed.
    PreconditionFailed {
        /// Revision the key had when the entry was applied (`None`: absent).
        current: Option<u64>,
    },
    /// The results of a [`Command::Batch`], in order.
    Batch(Vec<CommandResult>),
}

/// A stored value with its metadata, as kept in the state machine keyspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueRecord {
    /// Revision of the last write of this key.
    pub revision: u64,
    /// Revision at which the key was created.
    pub create_revision: u64,
    /// Number of writes since creation (1 for a new key).
    pub version: u64,
    /// Content-Type given by the writer.
    pub content_type: Option<String>,
    /// The raw value.
    pub value: Vec<u8>,
}

/// The on-disk record could not be decoded (corruption or a format change).
#[derive(Debug, thiserror::Error)]
#[error("corrupt value record: {0}")]
pub struct RecordError(&'static str);

const RECORD_FORMAT: u8 = 1;
const HEADER: usize = 1 + 8 + 8 + 8 + 2;

impl ValueRecord {
    /// Encodes the record: a fixed header followed by the content type and the
    /// value bytes, so a read never has to parse a self-describing format.
    pub fn encode(&self) -> Vec<u8> {
        let ct = self.content_type.as_deref().unwrap_or("");
        // At most u16::MAX bytes, cut at a character boundary so the record
        // always decodes (HTTP only lets short ASCII content types through;
        // the library API takes any string).
        let ct_len = ct.floor_char_boundary(u16::MAX as usize);
        let ct = ct.as_bytes();
        let mut out = Vec::with_capacity(HEADER + ct_len + self.value.len());
        out.push(RECORD_FORMAT);
        out.extend_from_slice(&self.revision.to_be_bytes());
        out.extend_from_slice(&self.create_revision.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&(ct_len as u16).to_be_bytes());
        out.extend_from_slice(&ct[..ct_len]);
        out.extend_from_slice(&self.value);
        out
    }

    /// Decodes a record written by [`ValueRecord::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.len() < HEADER {
            return Err(RecordError("record shorter than its header"));
        }
        if bytes[0] != RECORD_FORMAT {
            return Err(RecordError("unknown record format"));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let ct_len = u16::from_be_bytes([bytes[25], bytes[26]]) as usize;
        let rest = &bytes[HEADER..];
        if rest.len() < ct_len {
            return Err(RecordError("content type runs past the record"));
        }
        let content_type = if ct_len == 0 {
            None
        } else {
            Some(
                std::str::from_utf8(&rest[..ct_len])
                    .map_err(|_| RecordError("content type is not UTF-8"))?
                    .to_owned(),
            )
        };
        Ok(ValueRecord {
            revision: u64_at(1),
            create_revision: u64_at(9),
            version: u64_at(17),
            content_type,
            value: rest[ct_len..].to_vec(),
        })
    }

    /// Reads only the revision of an encoded record.
    pub fn decode_revision(bytes: &[u8]) -> Result<u64, RecordError> {
        if bytes.len() < HEADER || bytes[0] != RECORD_FORMAT {
            return Err(RecordError("bad record header"));
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[1..9]);
        Ok(u64::from_be_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let r = ValueRecord {
            revision: 42,
            create_revision: 7,
            version: 3,
            content_type: Some("application/json".into()),
            value: b"{\"a\":1}".to_vec(),
        };
        let bytes = r.encode();
        assert_eq!(ValueRecord::decode(&bytes).unwrap(), r);
        assert_eq!(ValueRecord::decode_revision(&bytes).unwrap(), 42);
        let bare = ValueRecord {
            content_type: None,
            value: vec![],
            ..r
        };
        assert_eq!(ValueRecord::decode(&bare.encode()).unwrap(), bare);
    }

    #[test]
    fn an_overlong_content_type_is_cut_at_a_character_boundary() {
        // 65,534 ASCII bytes, then a 3-byte character across the u16 limit.
        let ct = format!("{}€tail", "a".repeat(u16::MAX as usize - 1));
        let r = ValueRecord {
            revision: 1,
            create_revision: 1,
            version: 1,
            content_type: Some(ct),
            value: b"v".to_vec(),
        };
        let back = ValueRecord::decode(&r.encode()).expect("decodes");
        assert_eq!(
            back.content_type.unwrap(),
            "a".repeat(u16::MAX as usize - 1)
        );
        assert_eq!(back.value, b"v");
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        assert!(ValueRecord::decode(&[]).is_err());
        assert!(ValueRecord::decode(&[9; 40]).is_err());
        let mut bytes = ValueRecord {
            revision: 1,
            create_revision: 1,
            version: 1,
            content_type: Some("text/plain".into()),
            value: vec![1],
        }
        .encode();
        bytes.truncate(30);
        assert!(ValueRecord::decode(&bytes).is_err());
    }
}
