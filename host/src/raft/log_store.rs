//! The Raft log on fjall: entries, vote, committed and purged log ids.
//!
//! Entries live in the `raft_log` keyspace keyed by big-endian index (so fjall's
//! order is log order); the vote and the committed / purged log ids live in
//! `raft_meta`. Both share the database journal with the state machine, so a
//! crash always recovers a prefix of what was written.
//!
//! # Durability: group commit on a writer thread
//!
//! fjall holds its journal lock while it fsyncs, so writing entries on the
//! Raft task would make every append wait for the previous fsync, one entry
//! per fsync. Instead `append` only puts the entries in an in-memory pending
//! map (readable at once, as openraft requires) and queues them for the
//! writer thread. The writer takes everything queued, writes it as one fjall
//! batch, issues **one** `fdatasync` (`PersistMode::SyncData`) and only then
//! reports those appends flushed. openraft counts an entry towards commit
//! (the leader's own copy included) only after that report, so nothing is
//! acknowledged before it is on disk, while concurrent writes share one fsync.
//! A leader does not wait for the report before it replicates (our openraft
//! patch, `vendor/README.md`): its fsync and the followers' run at the same
//! time, and replication reads the entries from the pending map meanwhile.
//! Truncations, purges and the committed id go through the same queue, in
//! order; until the writer has applied a truncation, readers do not see the
//! truncated entries. The vote is fsynced before `save_vote` returns.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use fjall::{Database, Keyspace, PersistMode};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, StorageIOError, Vote};

use super::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

/// What the writer thread does, in queue order.
enum Op {
    Append(Vec<(LogId, Vec<u8>)>, LogFlushed<TypeConfig>),
    Truncate(u64, u64),
    Purge(LogId),
    Committed(Vec<u8>),
}

/// State shared between the Raft task, readers and the writer thread.
#[derive(Default)]
struct Shared {
    /// Appended entries not yet known to be in fjall.
    pending: BTreeMap<u64, Entry>,
    /// Truncations queued but not yet applied to fjall: (ticket, from index).
    truncating: Vec<(u64, u64)>,
    next_ticket: u64,
}

impl Shared {
    fn hidden_from(&self) -> Option<u64> {
        self.truncating.iter().map(|(_, i)| *i).min()
    }
}

/// Log storage handle; cheap to clone (clones share the writer).
#[derive(Clone)]
pub struct LogStore {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    shared: Arc<Mutex<Shared>>,
    writer: mpsc::Sender<Op>,
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

fn poisoned() -> StorageError {
    write_err(std::io::Error::other("log store state poisoned"))
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

impl LogStore {
    /// Opens (or creates) the log keyspaces in `db` and starts the writer thread.
    pub fn open(db: &Database) -> Result<Self, fjall::Error> {
        let log = db.keyspace("raft_log", fjall::KeyspaceCreateOptions::default)?;
        let meta = db.keyspace("raft_meta", fjall::KeyspaceCreateOptions::default)?;
        let (tx, rx) = mpsc::channel::<Op>();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let writer = Writer {
            db: db.clone(),
            log: log.clone(),
            meta: meta.clone(),
            shared: shared.clone(),
        };
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(fjall::Error::from)?;
        let store = LogStore {
            db: db.clone(),
            log,
            meta,
            shared,
            writer: tx,
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

    fn send(&self, op: Op) -> Result<(), StorageError> {
        self.writer
            .send(op)
            .map_err(|_| write_err(std::io::Error::other("log writer thread has stopped")))
    }

    /// The last entry in fjall below `before` (exclusive), if any.
    fn last_stored(&self, before: Option<u64>) -> Result<Option<LogId>, StorageError> {
        let upper = before.map_or(Bound::Unbounded, |i| Bound::Excluded(index_key(i)));
        match self
            .log
            .range::<[u8; 8], _>((Bound::Unbounded, upper))
            .next_back()
        {
            None => Ok(None),
            Some(guard) => {
                let (_, value) = guard.into_inner().map_err(read_err)?;
                Ok(Some(
                    rmp_serde::from_slice::<Entry>(&value)
                        .map_err(read_err)?
                        .log_id,
                ))
            }
        }
    }
}

/// The writer thread: one fjall batch and one fsync per group of queued ops.
struct Writer {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    shared: Arc<Mutex<Shared>>,
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut ops = vec![first];
            ops.extend(rx.try_iter());
            let mut callbacks = Vec::new();
            let mut written: Vec<LogId> = Vec::new();
            let result = self.apply(ops, &mut callbacks, &mut written);
            if result.is_ok()
                && let Ok(mut s) = self.shared.lock()
            {
                for id in &written {
                    if s.pending.get(&id.index).is_some_and(|e| e.log_id == *id) {
                        s.pending.remove(&id.index);
                    }
                }
            }
            for cb in callbacks {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                };
                cb.log_io_completed(r);
            }
        }
    }

    fn apply(
        &self,
        ops: Vec<Op>,
        callbacks: &mut Vec<LogFlushed<TypeConfig>>,
        written: &mut Vec<LogId>,
    ) -> Result<(), fjall::Error> {
        let mut batch = self.db.batch();
        for op in ops {
            match op {
                Op::Append(entries, cb) => {
                    for (id, bytes) in entries {
                        batch.insert(&self.log, index_key(id.index), bytes);
                        written.push(id);
                    }
                    callbacks.push(cb);
                }
                Op::Committed(bytes) => batch.insert(&self.meta, COMMITTED, bytes),
                Op::Truncate(ticket, from) => {
                    std::mem::replace(&mut batch, self.db.batch()).commit()?;
                    for item in self.log.range(index_key(from)..) {
                        batch.remove(&self.log, item.key()?);
                    }
                    std::mem::replace(&mut batch, self.db.batch()).commit()?;
                    if let Ok(mut s) = self.shared.lock() {
                        s.truncating.retain(|(t, _)| *t != ticket);
                    }
                }
                Op::Purge(upto) => {
                    std::mem::replace(&mut batch, self.db.batch()).commit()?;
                    for item in self.log.range(..=index_key(upto.index)) {
                        batch.remove(&self.log, item.key()?);
                    }
                }
            }
        }
        batch.commit()?;
        if !callbacks.is_empty() {
            self.db.persist(PersistMode::SyncData)?;
        }
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        // Hold the lock while reading fjall so the writer cannot move an entry
        // from `pending` to fjall (or finish a truncation) half-way through.
        let s = self.shared.lock().map_err(|_| poisoned())?;
        let hidden_from = s.hidden_from();
        let mut out: BTreeMap<u64, Entry> = BTreeMap::new();
        let bounds = (to_bound(range.start_bound()), to_bound(range.end_bound()));
        for item in self.log.range(bounds) {
            let (_, value) = item.into_inner().map_err(read_err)?;
            let entry: Entry = rmp_serde::from_slice(&value).map_err(read_err)?;
            if hidden_from.is_some_and(|h| entry.log_id.index >= h) {
                break;
            }
            out.insert(entry.log_id.index, entry);
        }
        for (i, e) in s
            .pending
            .range((range.start_bound().cloned(), range.end_bound().cloned()))
        {
            out.insert(*i, e.clone());
        }
        Ok(out.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.read_meta::<LogId>(PURGED)?;
        let (pending_last, hidden_from) = {
            let s = self.shared.lock().map_err(|_| poisoned())?;
            (
                s.pending.last_key_value().map(|(_, e)| e.log_id),
                s.hidden_from(),
            )
        };
        let last_log_id = pending_last
            .or(self.last_stored(hidden_from)?)
            .or(last_purged_log_id);
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
        self.send(Op::Committed(
            rmp_serde::to_vec(&committed).map_err(write_err)?,
        ))
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut encoded = Vec::with_capacity(entries.len());
        for e in &entries {
            encoded.push((e.log_id, rmp_serde::to_vec(e).map_err(write_err)?));
        }
        {
            let mut s = self.shared.lock().map_err(|_| poisoned())?;
            for e in entries {
                s.pending.insert(e.log_id.index, e);
            }
        }
        self.send(Op::Append(encoded, callback))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Removing a suffix needs no fsync of its own: if it is lost in a crash the
        // log is as it was before, which was valid; the next append's fsync covers it.
        let ticket = {
            let mut s = self.shared.lock().map_err(|_| poisoned())?;
            s.pending.split_off(&log_id.index);
            s.next_ticket += 1;
            let t = s.next_ticket;
            s.truncating.push((t, log_id.index));
            t
        };
        self.send(Op::Truncate(ticket, log_id.index))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.meta
            .insert(PURGED, rmp_serde::to_vec(&log_id).map_err(write_err)?)
            .map_err(write_err)?;
        if let Ok(mut s) = self.shared.lock() {
            s.pending.retain(|i, _| *i > log_id.index);
        }
        self.send(Op::Purge(log_id))
    }
}
