//! The Raft log on fjall: entries, vote, committed and purged log ids.
//!
//! Entries live in the `raft_log` keyspace keyed by big-endian index (so fjall's
//! order is log order); the vote and the committed / purged log ids live in
//! `raft_meta`. Both share the database journal with the state machine, so a
//! crash always recovers a prefix of what was written.
//!
//! # Durability: group commit
//!
//! `append` writes the entries to the journal (visible to readers at once) and
//! hands openraft's flush callback to a dedicated flusher thread. The flusher
//! takes every callback that is waiting, issues **one** `fdatasync`
//! (`PersistMode::SyncData`) covering all of them, then reports them flushed.
//! openraft only treats entries as stored (and a leader only counts its own
//! vote towards commit) once the callback fired, so nothing is acknowledged to
//! a client before it is on disk, while concurrent writers share one fsync.
//! The vote is fsynced before `save_vote` returns.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use fjall::{Database, Keyspace, PersistMode};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, StorageIOError, Vote};

use super::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

/// Log storage handle; cheap to clone (clones share the flusher).
#[derive(Clone)]
pub struct LogStore {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
    committed_index: Arc<AtomicU64>,
}

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

impl LogStore {
    /// Opens (or creates) the log keyspaces in `db` and starts the flusher thread.
    pub fn open(db: &Database) -> Result<Self, fjall::Error> {
        let log = db.keyspace("raft_log", fjall::KeyspaceCreateOptions::default)?;
        let meta = db.keyspace("raft_meta", fjall::KeyspaceCreateOptions::default)?;
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flusher(flush_db, rx))
            .map_err(fjall::Error::from)?;
        let store = LogStore {
            db: db.clone(),
            log,
            meta,
            flusher: tx,
            committed_index: Arc::new(AtomicU64::new(0)),
        };
        if let Ok(Some(Some(c))) = store.read_meta::<Option<LogId>>(COMMITTED) {
            store.committed_index.store(c.index, Ordering::Relaxed);
        }
        Ok(store)
    }

    /// The highest index known committed on this node (0 if none).
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed_index.clone()
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let Some(bytes) = self.meta.get(key).map_err(read_err)? else {
            return Ok(None);
        };
        rmp_serde::from_slice(&bytes).map(Some).map_err(read_err)
    }

    fn write_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError> {
        let bytes = rmp_serde::to_vec(value).map_err(write_err)?;
        self.meta.insert(key, bytes).map_err(write_err)
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        match self.log.last_key_value() {
            None => Ok(None),
            Some(guard) => {
                let value = guard.value().map_err(read_err)?;
                let entry: Entry = rmp_serde::from_slice(&value).map_err(read_err)?;
                Ok(Some(entry.log_id))
            }
        }
    }
}

/// Drains flush requests, one `fdatasync` per group of waiting appends.
fn flusher(db: Database, rx: mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        group.extend(rx.try_iter());
        let result = db.persist(PersistMode::SyncData);
        for cb in group {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            cb.log_io_completed(r);
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn to_bound(b: Bound<&u64>) -> Bound<[u8; 8]> {
    match b {
        Bound::Included(i) => Bound::Included(index_key(*i)),
        Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let bounds = (to_bound(range.start_bound()), to_bound(range.end_bound()));
        let mut out = Vec::new();
        for item in self.log.range(bounds) {
            let (_, value) = item.into_inner().map_err(read_err)?;
            out.push(rmp_serde::from_slice::<Entry>(&value).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.read_meta::<LogId>(PURGED)?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes =
            rmp_serde::to_vec(vote).map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        self.meta
            .insert(VOTE, bytes)
            .and_then(|_| self.db.persist(PersistMode::SyncData))
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        if let Some(c) = committed {
            self.committed_index.fetch_max(c.index, Ordering::Relaxed);
        }
        self.write_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = self.db.batch();
        for entry in entries {
            let bytes = rmp_serde::to_vec(&entry).map_err(write_err)?;
            batch.insert(&self.log, index_key(entry.log_id.index), bytes);
        }
        batch.commit().map_err(write_err)?;
        self.flusher
            .send(callback)
            .map_err(|_| write_err(std::io::Error::other("log flusher thread has stopped")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Removing a suffix needs no fsync of its own: if it is lost in a crash the
        // log is as it was before, which was valid; the next append's fsync covers it.
        let mut batch = self.db.batch();
        for item in self.log.range(index_key(log_id.index)..) {
            let key = item.key().map_err(read_err)?;
            batch.remove(&self.log, key);
        }
        batch.commit().map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = self.db.batch();
        batch.insert(
            &self.meta,
            PURGED,
            rmp_serde::to_vec(&log_id).map_err(write_err)?,
        );
        for item in self.log.range(..=index_key(log_id.index)) {
            let key = item.key().map_err(read_err)?;
            batch.remove(&self.log, key);
        }
        batch.commit().map_err(write_err)
    }
}
