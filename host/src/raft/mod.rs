//! Raft plumbing: type configuration, the fjall-backed log store and state
//! machine, the streamed snapshot files, and the HTTP network client. Nothing
//! here knows about the HTTP API.

// openraft's storage traits dictate `StorageError` (about 224 bytes) as the
// error type; boxing it in helpers would only add conversions at every call.
#![allow(clippy::result_large_err)]

pub mod compaction;
pub mod follower_read;
pub mod history;
pub mod log_store;
pub mod network;
pub mod record_cache;
pub mod removal;
pub mod snapshot_file;
pub mod state_machine;
pub mod types;

use std::path::Path;

pub use log_store::LogStore;
pub use state_machine::{Change, KvReader, StateMachineStore};
pub use types::*;

/// Opening the on-disk store failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// fjall could not open or create the database.
    #[error("opening the database at {path}: {source}")]
    Database {
        /// The database directory.
        path: String,
        /// The underlying error.
        source: fjall::Error,
    },
    /// The stored state could not be read.
    #[error("reading stored state: {0}")]
    State(#[from] StorageError),
    /// The data dir holds another node's state.
    #[error(
        "the data dir {dir} belongs to node {found}, not node {id} (start node {found} on it, \
         or node {id} on a data dir of its own)"
    )]
    OtherNode {
        /// The data dir.
        dir: String,
        /// The node id recorded in it.
        found: NodeId,
        /// The id this node was started with.
        id: NodeId,
    },
    /// The data dir's node id file could not be read or written.
    #[error("the node id file {path}: {source}")]
    NodeIdFile {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
}

/// The file in a data dir that names the node it belongs to.
const NODE_ID_FILE: &str = "node-id";

/// Records `id` in `data_dir` on first use, and refuses a data dir that
/// another node id recorded: its log, vote and membership are that node's,
/// and run as another id they would make a stranger of it (a data dir of
/// an earlier version, without the file, takes the id it is started with).
pub fn claim_data_dir(data_dir: &Path, id: NodeId) -> Result<(), OpenError> {
    std::fs::create_dir_all(data_dir).map_err(|source| OpenError::NodeIdFile {
        path: data_dir.display().to_string(),
        source,
    })?;
    let path = data_dir.join(NODE_ID_FILE);
    let file_err = |source| OpenError::NodeIdFile {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let found: NodeId = text.trim().parse().map_err(|_| {
                file_err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not a node id: {:?}", text.trim()),
                ))
            })?;
            if found != id {
                return Err(OpenError::OtherNode {
                    dir: data_dir.display().to_string(),
                    found,
                    id,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = data_dir.join(format!("{NODE_ID_FILE}.tmp"));
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                std::io::Write::write_all(&mut f, format!("{id}\n").as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            };
            write().map_err(file_err)
        }
        Err(e) => Err(file_err(e)),
    }
}

/// The memtable size of the two keyspaces that take every write's bytes:
/// the Raft log and the key space. fjall's default, 64 MiB each, left a node
/// at ≈ 230 MiB resident after a 6-second burst of small writes and ≈ 400 MiB
/// under 1 MiB blob writes; 32 MiB takes ≈ 50 MiB and ≈ 60 MiB off those,
/// with the same write throughput, at the cost of more frequent flushes
/// (≈ 1 ms more at p99 under 64 writers, ≈ 13 % more bytes written for
/// blobs through compactions; BENCHMARKS item 61). Stored with a keyspace
/// when it is created: a data dir keeps what it was created with until its
/// key space is replaced by a snapshot install.
pub const MEMTABLE_BYTES: u64 = 32 * 1024 * 1024;

/// Creation options of the Raft log and key-space keyspaces.
pub(crate) fn bulk_keyspace() -> fjall::KeyspaceCreateOptions {
    fjall::KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
}

/// Opens the database under `data_dir` (created if missing) for node `id` and
/// returns the log store and state machine, which share one fjall journal.
pub fn open_storage(
    data_dir: &Path,
    id: NodeId,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    let db_path = data_dir.join("db");
    let db_err = |source| OpenError::Database {
        path: db_path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(|e| db_err(fjall::Error::from(e)))?;
    claim_data_dir(data_dir, id)?;
    let db = fjall::Database::builder(&db_path).open().map_err(db_err)?;
    let log = LogStore::open(&db, id).map_err(db_err)?;
    let mut sm = StateMachineStore::open(&db, data_dir)?;
    sm.set_replay_until(
        log.committed_index()
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    Ok((log, sm))
}

/// Helpers shared by the unit tests of the state machine and snapshot files.
#[cfg(test)]
pub(crate) mod test_support {
    use super::types::{SnapshotMeta, StoredMembership, ValueRecord};

    /// The encoding of a record created and last written at `rev`.
    pub fn record(rev: u64, value: &[u8]) -> Vec<u8> {
        ValueRecord {
            revision: rev,
            create_revision: rev,
            version: 1,
            content_type: None,
            value: value.to_vec(),
        }
        .encode()
    }

    /// The metadata of a snapshot at `index` (term 1, leader 1).
    pub fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::testing::log_id(1, 1, index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("1-{index}"),
        }
    }
}
