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
//! Truncations and purges go through the same queue, in order; until the
//! writer has applied a truncation, readers do not see the truncated
//! entries. The vote is fsynced before `save_vote` returns.
//!
//! # A follower flushes in place
//!
//! A follower answers an AppendEntries only once its entries are on disk,
//! so its Raft task waits for the flush anyway; on this path the writer
//! thread costs two thread wake-ups (the task waking the writer, the writer
//! waking the task), each tens of microseconds when the other CPU sleeps.
//! So entries appended for another leader (the log id names who made them)
//! are written and `fdatasync`ed by the calling task itself when nothing is
//! queued for the writer, with the same group write and the same flush
//! report; the task's worker is busy for the fsync. A leader's own entries
//! always go to the writer thread, so its fsync overlaps replication.
//!
//! # The tail in memory
//!
//! Once flushed, an entry stays in memory too, among the newest
//! [`RECENT_BYTES`] of entries (`Shared::recent`). openraft reads every entry
//! back soon after its append: each replication task to send it, the Raft
//! core to apply it once committed. A read that starts inside the
//! entries held in memory (unflushed and recent together are one
//! contiguous run of the log: only a prefix leaves by trimming or purging,
//! only a suffix by truncation) is answered from memory, without the fjall
//! range read and the MessagePack decode of every entry; reads further back
//! (a follower catching up) go to fjall.
//!
//! The committed log id does not wake the writer (that cost a thread
//! wake-up, and often a preemption of the Raft task, on every commit): it
//! is kept in memory and written with the writer's next group. It is an
//! optimization for restarts (openraft re-learns the commit index from the
//! leader), so being behind is harmless; it is never ahead of the entries
//! on disk, because the writer takes it before it collects the appends
//! queued so far, and `save_committed(c)` only follows the append of `c`.
//! The writer takes a copy: the value stays in memory, and readable, until
//! the group that carries it is in fjall (then it is dropped unless a newer
//! one was saved meanwhile), so `read_committed` never falls back to an
//! older value on disk while the newer one is being written.
//!
//! # Write errors
//!
//! If the writer fails to write or sync a group, every append in that group
//! is reported failed (`LogFlushed::log_io_completed(Err(..))`), the error is
//! logged, and the store is marked failed: from then on it writes nothing
//! (later groups are reported failed without being applied), and appends,
//! truncations, purges, saving the vote or committed id and reading entries
//! or the log state all return an error, so openraft stops the node. What
//! is on disk is then only a prefix of what was asked for, which a restart
//! recovers from like from a crash.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use fjall::{Database, Keyspace, PersistMode};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, StorageIOError, Vote};

use super::state_machine::{Coverage, Covered};
use super::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

/// What the writer thread does, in queue order.
enum Op {
    Append(Vec<(LogId, Vec<u8>)>),
    Truncate(u64, u64),
    Purge(LogId),
}

/// A queued op and, for an append, the callback to report its flush to.
type Queued = (Op, Option<LogFlushed<TypeConfig>>);

/// State shared between the Raft task, readers and the writer thread.
#[derive(Default)]
struct Shared {
    /// Appended entries not yet known to be in fjall.
    pending: BTreeMap<u64, Kept>,
    /// The newest flushed entries (see "The tail in memory").
    recent: BTreeMap<u64, Kept>,
    /// Encoded bytes of the entries in `recent`.
    recent_bytes: usize,
    /// Truncations queued but not yet applied to fjall: (ticket, from index).
    truncating: Vec<(u64, u64)>,
    next_ticket: u64,
    /// The committed log id (encoded) not yet handed to the writer.
    committed: Option<Vec<u8>>,
    /// Set when the writer failed to write a group: the store refuses all
    /// further work (its disk state is no longer what openraft believes).
    failed: Option<String>,
}

/// An entry held in memory, with the size of its encoding.
struct Kept {
    entry: Entry,
    bytes: usize,
}

/// How many bytes of flushed entries (encoded) stay in memory. openraft reads
/// an entry back within milliseconds of its append; 2 MiB hold a few hundred
/// group-commit entries, a third of a second at the heaviest write load
/// measured (BENCHMARKS item 30). A follower further behind reads from fjall.
pub const RECENT_BYTES: usize = 2 * 1024 * 1024;

/// About how many encoded bytes of entries one AppendEntries carries at most
/// (one entry more when a single entry is larger). openraft 0.9 gives an
/// AppendEntries one heartbeat interval (100 ms) to be answered, the
/// follower's fsync included, and resends the same entries after a timeout:
/// a catch-up on large values sent 40 MiB at a time never finished.
pub const PAYLOAD_BYTES: usize = 1024 * 1024;

impl Shared {
    /// The first index of the entries held in memory (unflushed or recent).
    fn first_in_memory(&self) -> Option<u64> {
        let recent = self.recent.first_key_value().map(|(i, _)| *i);
        let pending = self.pending.first_key_value().map(|(i, _)| *i);
        match (recent, pending) {
            (Some(r), Some(p)) => Some(r.min(p)),
            (r, p) => r.or(p),
        }
    }

    /// `id` was written to fjall: its entry, if still the one appended
    /// there, moves from `pending` to `recent`, which keeps its newest
    /// [`RECENT_BYTES`].
    fn flushed(&mut self, id: &LogId) {
        // Superseded (truncated, then appended again) since it was queued.
        let current = self.pending.get(&id.index);
        if current.is_none_or(|k| k.entry.log_id != *id) {
            return;
        }
        if let Some(kept) = self.pending.remove(&id.index) {
            self.recent_bytes += kept.bytes;
            if let Some(old) = self.recent.insert(id.index, kept) {
                self.recent_bytes -= old.bytes;
            }
        }
        while self.recent_bytes > RECENT_BYTES {
            match self.recent.pop_first() {
                Some((_, k)) => self.recent_bytes -= k.bytes,
                None => break,
            }
        }
    }

    /// Drops the in-memory entries from `index` on (a truncation).
    fn forget_from(&mut self, index: u64) {
        self.pending.split_off(&index);
        for (_, k) in self.recent.split_off(&index) {
            self.recent_bytes -= k.bytes;
        }
    }

    /// Drops the in-memory entries up to `index` (a purge).
    fn forget_upto(&mut self, index: u64) {
        self.pending.retain(|i, _| *i > index);
        while let Some(first) = self.recent.first_entry() {
            if *first.key() > index {
                break;
            }
            self.recent_bytes -= first.remove().bytes;
        }
    }

    fn hidden_from(&self) -> Option<u64> {
        self.truncating.iter().map(|(_, i)| *i).min()
    }

    /// An error if the store has failed (for calls that write).
    fn check_writable(&self) -> Result<(), StorageError> {
        match &self.failed {
            None => Ok(()),
            Some(e) => Err(write_err(failed_err(e))),
        }
    }

    /// An error if the store has failed (for calls that read: a failed
    /// truncation may still be hiding entries).
    fn check_readable(&self) -> Result<(), StorageError> {
        match &self.failed {
            None => Ok(()),
            Some(e) => Err(read_err(failed_err(e))),
        }
    }
}

fn failed_err(e: &str) -> std::io::Error {
    std::io::Error::other(format!("log store failed earlier: {e}"))
}

/// Test-only ways to stall the writer and make its writes fail.
#[cfg(test)]
#[derive(Default)]
struct Hooks {
    /// While set, the writer waits after taking the first op of a group
    /// (and the committed id to write with it), so everything queued
    /// meanwhile becomes part of that group.
    hold: std::sync::atomic::AtomicBool,
    /// Set while the writer waits on `hold`.
    holding: std::sync::atomic::AtomicBool,
    /// Makes the next `Truncate` the writer applies fail.
    fail_truncate: std::sync::atomic::AtomicBool,
    /// Groups written in place by the appending task.
    in_place: AtomicU64,
}

/// Log storage handle; cheap to clone (clones share the writer).
#[derive(Clone)]
pub struct LogStore {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    shared: Arc<Mutex<Shared>>,
    writer: mpsc::Sender<Queued>,
    /// Writes a group in the calling task (see "A follower flushes in place").
    in_place: Writer,
    /// This node: entries whose log id names another leader are a follower's.
    id: NodeId,
    committed_index: Arc<AtomicU64>,
    /// When set, a purge waits until the state machine's durable state
    /// covers it ([`LogStore::purge_after`]).
    covered: Option<tokio::sync::watch::Receiver<Covered>>,
    /// Encoded bytes of every entry appended since the store was opened.
    appended_bytes: Arc<AtomicU64>,
    #[cfg(test)]
    hooks: Arc<Hooks>,
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
    /// Opens (or creates) the log keyspaces in `db` for node `id` and starts
    /// the writer thread.
    pub fn open(db: &Database, id: NodeId) -> Result<Self, fjall::Error> {
        let log = db.keyspace("raft_log", super::bulk_keyspace)?;
        let meta = db.keyspace("raft_meta", fjall::KeyspaceCreateOptions::default)?;
        let (tx, rx) = mpsc::channel::<Queued>();
        let shared = Arc::new(Mutex::new(Shared::default()));
        #[cfg(test)]
        let hooks = Arc::new(Hooks::default());
        let writer = Writer {
            db: db.clone(),
            log: log.clone(),
            meta: meta.clone(),
            shared: shared.clone(),
            turn: Arc::new(Turn::default()),
            #[cfg(test)]
            hooks: hooks.clone(),
        };
        let in_place = writer.clone();
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
            in_place,
            id,
            committed_index: Arc::new(AtomicU64::new(0)),
            covered: None,
            appended_bytes: Arc::new(AtomicU64::new(0)),
            #[cfg(test)]
            hooks,
        };
        if let Ok(Some(Some(c))) = store.read_meta::<Option<LogId>>(COMMITTED) {
            store.committed_index.store(c.index, Ordering::Relaxed);
        }
        Ok(store)
    }

    /// Purges wait until `coverage` (the state machine's) reaches them: the
    /// log is never purged past what a restart would find in the key space
    /// or the snapshot file. Without it (a log store on its own, as in
    /// openraft's storage suite) purges go ahead at once.
    pub fn purge_after(&mut self, coverage: &Coverage) {
        self.covered = Some(coverage.subscribe());
    }

    /// Encoded bytes of the entries appended since the store was opened.
    pub fn appended_bytes(&self) -> Arc<AtomicU64> {
        self.appended_bytes.clone()
    }

    /// Where to purge the log so that at most about `keep` bytes of entries
    /// stay at or before `upto` (a snapshot's index): the index of the newest
    /// entry that does not fit, or `None` when every entry after `floor`
    /// (where a purge goes anyway) up to `upto` fits.
    pub fn purge_point(
        &self,
        floor: u64,
        upto: u64,
        keep: u64,
    ) -> Result<Option<u64>, StorageError> {
        let mut bytes = 0u64;
        let range = (
            Bound::Excluded(index_key(floor)),
            Bound::Included(index_key(upto)),
        );
        for item in self.log.range(range).rev() {
            let (key, value) = item.into_inner().map_err(read_err)?;
            bytes = bytes.saturating_add(value.len() as u64);
            if bytes > keep {
                let index = key
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| read_err(std::io::Error::other("a log key is not an index")))?;
                return Ok(Some(index));
            }
        }
        Ok(None)
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

    fn send(&self, op: Op, callback: Option<LogFlushed<TypeConfig>>) -> Result<(), StorageError> {
        let turn = &self.in_place.turn;
        turn.queued.fetch_add(1, Ordering::SeqCst);
        self.writer.send((op, callback)).map_err(|_| {
            turn.queued.fetch_sub(1, Ordering::SeqCst);
            write_err(std::io::Error::other("log writer thread has stopped"))
        })
    }

    /// The state shared with the writer thread.
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Shared>, StorageError> {
        self.shared.lock().map_err(|_| poisoned())
    }

    /// An error if the store has failed, for calls that write.
    fn check_writable(&self) -> Result<(), StorageError> {
        self.lock()?.check_writable()
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

/// Who writes a group now: the writer thread or a task writing in place.
/// Ops reach fjall in the order they were queued, so a task writes in place
/// only while nothing is queued and no group is being written.
#[derive(Default)]
struct Turn {
    /// Held while a group is written.
    writing: Mutex<()>,
    /// Ops sent to the writer thread and not yet written.
    queued: std::sync::atomic::AtomicUsize,
}

/// The writer thread (and a follower's task writing in place): one fjall
/// batch and one fsync per group of ops.
#[derive(Clone)]
struct Writer {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    shared: Arc<Mutex<Shared>>,
    turn: Arc<Turn>,
    #[cfg(test)]
    hooks: Arc<Hooks>,
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<Queued>) {
        while let Ok(first) = rx.recv() {
            let _writing = self
                .turn
                .writing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Take the committed id before collecting the rest of the
            // group: its entry's append was queued before it was saved, so
            // that append is in this group or an earlier one.
            let committed = self.committed_to_write();
            #[cfg(test)]
            {
                self.hooks.holding.store(true, Ordering::SeqCst);
                while self.hooks.hold.load(Ordering::SeqCst) {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                self.hooks.holding.store(false, Ordering::SeqCst);
            }
            let mut group = vec![first];
            group.extend(rx.try_iter());
            let n = group.len();
            self.write_group(group, committed);
            self.turn.queued.fetch_sub(n, Ordering::SeqCst);
        }
    }

    /// The committed id saved but not yet written (a copy: it stays
    /// readable in memory until [`Writer::written_committed`]).
    fn committed_to_write(&self) -> Option<Vec<u8>> {
        self.shared.lock().ok().and_then(|s| s.committed.clone())
    }

    /// `committed` is in fjall now: memory forgets it unless a newer one was
    /// saved meanwhile.
    fn written_committed(&self, committed: &[u8]) {
        if let Ok(mut s) = self.shared.lock()
            && s.committed.as_deref() == Some(committed)
        {
            s.committed = None;
        }
    }

    /// Writes `op` in the calling thread if it is the writer's turn to be
    /// idle; otherwise hands `op` back to be queued.
    fn write_in_place(
        &self,
        op: Op,
        callback: LogFlushed<TypeConfig>,
    ) -> Option<(Op, LogFlushed<TypeConfig>)> {
        let Ok(_writing) = self.turn.writing.try_lock() else {
            return Some((op, callback));
        };
        if self.turn.queued.load(Ordering::SeqCst) > 0 {
            return Some((op, callback));
        }
        let committed = self.committed_to_write();
        self.write_group(vec![(op, Some(callback))], committed);
        #[cfg(test)]
        self.hooks.in_place.fetch_add(1, Ordering::SeqCst);
        None
    }

    /// Applies one group and reports the flush of every append in it: all of
    /// them succeed or all of them get the error.
    fn write_group(&self, group: Vec<Queued>, committed: Option<Vec<u8>>) {
        // Take every callback out first, so none is lost when an op fails.
        let mut ops = Vec::with_capacity(group.len());
        let mut callbacks = Vec::new();
        for (op, cb) in group {
            ops.push(op);
            callbacks.extend(cb);
        }
        let result = self.write_ops(ops, committed.clone(), callbacks.len());
        if let (Ok(()), Some(c)) = (&result, &committed) {
            self.written_committed(c);
        }
        for cb in callbacks {
            cb.log_io_completed(result.clone().map_err(std::io::Error::other));
        }
    }

    /// Writes `ops` (carrying `appends` appends) unless the store failed
    /// before; a failure now marks it failed.
    fn write_ops(
        &self,
        ops: Vec<Op>,
        committed: Option<Vec<u8>>,
        appends: usize,
    ) -> Result<(), String> {
        // Nothing more is written after a failure: the disk is a prefix of
        // what openraft asked for, and must stay one.
        let failed_before = self.shared.lock().map_or_else(
            |_| Some("log store state poisoned".to_string()),
            |s| s.failed.clone(),
        );
        if let Some(e) = failed_before {
            return Err(failed_err(&e).to_string());
        }
        let mut written: Vec<LogId> = Vec::new();
        if let Err(e) = self.apply(ops, committed, &mut written) {
            let e = e.to_string();
            tracing::error!(
                error = %e,
                appends,
                "raft log write failed; the log store refuses further work"
            );
            let mut s = self
                .shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.failed = Some(e.clone());
            return Err(e);
        }
        if let Ok(mut s) = self.shared.lock() {
            for id in &written {
                s.flushed(id);
            }
        }
        Ok(())
    }

    fn apply(
        &self,
        ops: Vec<Op>,
        committed: Option<Vec<u8>>,
        written: &mut Vec<LogId>,
    ) -> Result<(), fjall::Error> {
        let mut batch = self.db.batch();
        let mut sync = false;
        for op in ops {
            match op {
                Op::Append(entries) => {
                    for (id, bytes) in entries {
                        batch.insert(&self.log, index_key(id.index), bytes);
                        written.push(id);
                    }
                    sync = true;
                }
                Op::Truncate(ticket, from) => {
                    std::mem::replace(&mut batch, self.db.batch()).commit()?;
                    #[cfg(test)]
                    if self.hooks.fail_truncate.swap(false, Ordering::SeqCst) {
                        return Err(std::io::Error::other("injected truncate failure").into());
                    }
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
        if let Some(bytes) = committed {
            batch.insert(&self.meta, COMMITTED, bytes);
        }
        batch.commit()?;
        if sync {
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
        self.read_entries(range, usize::MAX)
    }

    /// What replication sends in one AppendEntries: entries from `start`, up
    /// to about [`PAYLOAD_BYTES`] of them. openraft asks for up to 300
    /// entries at a time, and an entry carries up to 4 MiB of values: a
    /// follower catching up after a stretch of large writes would otherwise
    /// get them all in one request that cannot be answered in time (and the
    /// leader would read and encode up to a gigabyte at once).
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_entries(start..end, PAYLOAD_BYTES)
    }
}

impl LogStore {
    /// Entries in `range`; reading from fjall stops after the entry that
    /// brings the encoded bytes read to `budget` (always at least one), so
    /// the result may be a prefix of the range. Entries held in memory are
    /// few (the tail is bounded by [`RECENT_BYTES`]) and always all returned.
    fn read_entries<RB: RangeBounds<u64> + Clone>(
        &self,
        range: RB,
        budget: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        // Hold the lock while reading fjall so the writer cannot move an entry
        // from `pending` to fjall (or finish a truncation) half-way through.
        let s = self.lock()?;
        s.check_readable()?;
        let start = match range.start_bound() {
            Bound::Included(i) => Some(*i),
            Bound::Excluded(i) => i.checked_add(1),
            Bound::Unbounded => None,
        };
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        if let (Some(start), Some(first)) = (start, s.first_in_memory())
            && start >= first
        {
            // Entirely within the entries held in memory. Every recent entry
            // precedes every pending one: the writer flushes in append order,
            // and a truncation drops the recent entries it cuts off.
            let mut out: Vec<Entry> = s
                .recent
                .range(bounds)
                .map(|(_, k)| k.entry.clone())
                .collect();
            out.extend(s.pending.range(bounds).map(|(_, k)| k.entry.clone()));
            debug_assert!(out.is_sorted_by_key(|e| e.log_id.index));
            return Ok(out);
        }
        let hidden_from = s.hidden_from();
        let mut out: BTreeMap<u64, Entry> = BTreeMap::new();
        let (mut bytes, mut cut) = (0usize, None);
        for item in self
            .log
            .range((to_bound(range.start_bound()), to_bound(range.end_bound())))
        {
            let (_, value) = item.into_inner().map_err(read_err)?;
            let entry: Entry = rmp_serde::from_slice(&value).map_err(read_err)?;
            let index = entry.log_id.index;
            if hidden_from.is_some_and(|h| index >= h) {
                break;
            }
            out.insert(index, entry);
            bytes = bytes.saturating_add(value.len());
            if bytes >= budget {
                cut = Some(index);
                break;
            }
        }
        for (i, k) in s.pending.range(bounds) {
            if cut.is_some_and(|c| *i > c) {
                break;
            }
            out.insert(*i, k.entry.clone());
        }
        Ok(out.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.read_meta::<LogId>(PURGED)?;
        let (pending_last, hidden_from) = {
            let s = self.lock()?;
            s.check_readable()?;
            (
                s.pending.last_key_value().map(|(_, k)| k.entry.log_id),
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
        self.check_writable()?;
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
        let bytes = rmp_serde::to_vec(&committed).map_err(write_err)?;
        let mut s = self.lock()?;
        s.check_writable()?;
        if let Some(c) = committed {
            self.committed_index.fetch_max(c.index, Ordering::Relaxed);
        }
        s.committed = Some(bytes);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let unwritten = self.lock()?.committed.clone();
        if let Some(bytes) = unwritten {
            return rmp_serde::from_slice(&bytes).map_err(read_err);
        }
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
        let bytes: usize = encoded.iter().map(|(_, b)| b.len()).sum();
        self.appended_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        // Another leader's entries: this node is a follower, whose Raft task
        // waits for the flush anyway.
        let follower = entries
            .first()
            .is_some_and(|e| e.log_id.leader_id.node_id != self.id);
        {
            let mut s = self.lock()?;
            s.check_writable()?;
            for (entry, (_, bytes)) in entries.into_iter().zip(&encoded) {
                let bytes = bytes.len();
                s.pending.insert(entry.log_id.index, Kept { entry, bytes });
            }
        }
        let (op, callback) = if follower {
            match self.in_place.write_in_place(Op::Append(encoded), callback) {
                None => return Ok(()),
                Some(back) => back,
            }
        } else {
            (Op::Append(encoded), callback)
        };
        self.send(op, Some(callback))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Removing a suffix needs no fsync of its own: if it is lost in a crash the
        // log is as it was before, which was valid; the next append's fsync covers it.
        let ticket = {
            let mut s = self.lock()?;
            s.check_writable()?;
            s.forget_from(log_id.index);
            s.next_ticket += 1;
            let t = s.next_ticket;
            s.truncating.push((t, log_id.index));
            t
        };
        self.send(Op::Truncate(ticket, log_id.index), None)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.check_writable()?;
        if let Some(covered) = &self.covered {
            // After a snapshot install openraft purges at once, while the
            // install may still be running (see `Coverage`). Waiting here
            // holds the Raft core for the rest of the install.
            let mut covered = covered.clone();
            let reached = covered
                .wait_for(|c| c.failed || c.index >= log_id.index)
                .await
                .map(|c| !c.failed);
            if !matches!(reached, Ok(true)) {
                return Err(write_err(std::io::Error::other(format!(
                    "not purging the log up to {}: the state machine does not cover it",
                    log_id.index
                ))));
            }
        }
        self.meta
            .insert(PURGED, rmp_serde::to_vec(&log_id).map_err(write_err)?)
            .map_err(write_err)?;
        if let Ok(mut s) = self.shared.lock() {
            s.forget_upto(log_id.index);
        }
        self.send(Op::Purge(log_id), None)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openraft::storage::RaftLogStorageExt;
    use openraft::testing::{blank_ent, log_id};

    use super::*;

    /// Appends blank entries `1..=last` of leader 1 in term 1 and waits
    /// until they are flushed.
    async fn append_blanks(store: &mut LogStore, last: u64) {
        store
            .blocking_append((1..=last).map(|i| blank_ent::<TypeConfig>(1, 1, i)))
            .await
            .expect("append");
    }

    fn open() -> (tempfile::TempDir, LogStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_at(dir.path(), 1);
        (dir, store)
    }

    /// Node `id`'s log store on the database under `dir` (opened or reopened).
    fn store_at(dir: &std::path::Path, id: NodeId) -> LogStore {
        let db = Database::builder(dir.join("db")).open().expect("open db");
        LogStore::open(&db, id).expect("open log store")
    }

    async fn wait_failed(store: &LogStore) {
        wait_until(
            "the store to be marked failed",
            Duration::from_secs(5),
            || store.shared.lock().unwrap().failed.is_some(),
        )
        .await;
    }

    /// Polls `holds` until it is true; fails the test, naming `what`, once
    /// `limit` has passed.
    async fn wait_until(what: &str, limit: Duration, holds: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !holds() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not within {limit:?}: {what}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// A purge waits until the state machine covers it, and is refused if
    /// the install that was to cover it failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_waits_for_the_state_machine_to_cover_it() {
        let (_dir, mut store) = open();
        append_blanks(&mut store, 10).await;
        let coverage = Coverage::new(3);
        store.purge_after(&coverage);
        store.purge(log_id(1, 1, 2)).await.expect("covered already");
        let mut purger = store.clone();
        let purge = tokio::spawn(async move { purger.purge(log_id(1, 1, 8)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!purge.is_finished(), "purged past the state machine");
        coverage.advance(8);
        purge.await.unwrap().expect("purge once covered");
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 8)));

        let mut purger = store.clone();
        let purge = tokio::spawn(async move { purger.purge(log_id(1, 1, 10)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        coverage.fail();
        assert!(
            purge.await.unwrap().is_err(),
            "a failed install covers nothing"
        );
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 8)));
    }

    /// Replication reads about [`PAYLOAD_BYTES`] of large entries at a time
    /// (a prefix of what it asked for, never nothing); small entries, and
    /// every other read, come whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replication_reads_large_entries_a_few_at_a_time() {
        let (_dir, mut store) = open();
        let big = |i: u64| Entry {
            log_id: log_id(1, 1, i),
            payload: openraft::EntryPayload::Normal(crate::raft::Command::Put {
                key: format!("blob/{i}"),
                value: vec![i as u8; PAYLOAD_BYTES / 4],
                content_type: None,
                precondition: crate::raft::Precondition::None,
            }),
        };
        store
            .blocking_append((1..=24).map(big))
            .await
            .expect("append");
        let limited = store.limited_get_log_entries(1, 25).await.unwrap();
        let indexes: Vec<u64> = limited.iter().map(|e| e.log_id.index).collect();
        // Each a little over a quarter of the budget.
        assert_eq!(indexes, (1..=4).collect::<Vec<_>>());
        assert_eq!(limited[3], big(4));
        let whole = store.try_get_log_entries(1..25).await.unwrap();
        assert_eq!(whole.len(), 24);
        // One entry over the budget still goes, alone.
        let one = store.read_entries(3..25, 1).unwrap();
        assert_eq!(one.len(), 1);
        // The tail held in memory comes whole.
        let tail = store.limited_get_log_entries(23, 25).await.unwrap();
        assert_eq!(tail.len(), 2);
        // Keeping a budget's worth behind index 24: 22..=24 fit, 21 does not.
        let budget = PAYLOAD_BYTES as u64;
        assert_eq!(store.purge_point(0, 24, budget).unwrap(), Some(21));
        assert_eq!(store.purge_point(0, 24, u64::MAX).unwrap(), None);
        // Entries at or before the floor are not looked at.
        assert_eq!(store.purge_point(21, 24, budget).unwrap(), None);
        assert!(store.appended_bytes().load(Ordering::Relaxed) > 24 * budget / 4);

        store
            .blocking_append((25..=400).map(|i| blank_ent::<TypeConfig>(1, 1, i)))
            .await
            .expect("append");
        let blanks = store.limited_get_log_entries(25, 401).await.unwrap();
        assert_eq!(blanks.len(), 376);
    }

    /// The store's disk refuses a write: every append of the failed group
    /// (including those queued after the failing op) gets the error, and the
    /// store refuses all later work instead of hiding entries from readers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_fails_every_append_of_its_group_and_the_store() {
        let (_dir, mut store) = open();
        append_blanks(&mut store, 3).await;

        // One group: [Truncate(2) (fails), Append(2..=3 in term 2)].
        store.hooks.hold.store(true, Ordering::SeqCst);
        store.hooks.fail_truncate.store(true, Ordering::SeqCst);
        store
            .truncate(log_id(1, 1, 2))
            .await
            .expect("truncate queued");
        let mut appender = store.clone();
        let append = tokio::spawn(async move {
            appender
                .blocking_append((2..=3).map(|i| blank_ent::<TypeConfig>(2, 1, i)))
                .await
        });
        for _ in 0..500 {
            let queued = store
                .shared
                .lock()
                .unwrap()
                .pending
                .get(&3)
                .is_some_and(|k| k.entry.log_id == log_id(2, 1, 3));
            if queued {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        store.hooks.hold.store(false, Ordering::SeqCst);

        let err = tokio::time::timeout(Duration::from_secs(10), append)
            .await
            .expect("the append is reported")
            .expect("task")
            .expect_err("the append after the failed truncate fails");
        assert!(
            err.to_string().contains("injected truncate failure"),
            "reported with the write error, not dropped: {err}"
        );
        wait_failed(&store).await;

        // Everything after the failure is refused.
        assert!(
            store
                .blocking_append([blank_ent::<TypeConfig>(2, 1, 4)])
                .await
                .is_err()
        );
        assert!(store.truncate(log_id(1, 1, 1)).await.is_err());
        assert!(store.purge(log_id(1, 1, 1)).await.is_err());
        assert!(store.save_committed(Some(log_id(1, 1, 1))).await.is_err());
        assert!(store.save_vote(&Vote::new(3, 1)).await.is_err());
        // Readers do not silently hide what the failed truncate was to remove.
        assert!(store.try_get_log_entries(1..).await.is_err());
        assert!(store.get_log_state().await.is_err());
    }

    /// A failed group without appends (nobody to report to) still marks the
    /// store failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_without_callbacks_is_not_silent() {
        let (_dir, mut store) = open();
        append_blanks(&mut store, 3).await;
        store.hooks.fail_truncate.store(true, Ordering::SeqCst);
        store
            .truncate(log_id(1, 1, 2))
            .await
            .expect("truncate queued");
        wait_failed(&store).await;
        assert!(store.save_committed(Some(log_id(1, 1, 1))).await.is_err());
        assert!(store.try_get_log_entries(1..).await.is_err());
    }

    /// Without failures the group commit still works (appends, truncate,
    /// purge in one group).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mixed_group_succeeds() {
        let (_dir, store) = open();
        let first = (1..=3).map(|i| blank_ent::<TypeConfig>(1, 1, i)).collect();
        let ids =
            append_truncate_append_held(&store, first, log_id(1, 1, 3), blank_ent(2, 1, 3)).await;
        assert_eq!(ids, vec![log_id(1, 1, 1), log_id(1, 1, 2), log_id(2, 1, 3)]);
    }

    /// With the writer thread held, so all of it forms one group: appends
    /// `first`, truncates from `cut`, appends `then`; then lets the writer
    /// go and returns the log ids the store reads back.
    async fn append_truncate_append_held(
        store: &LogStore,
        first: Vec<Entry>,
        cut: LogId,
        then: Entry,
    ) -> Vec<LogId> {
        store.hooks.hold.store(true, Ordering::SeqCst);
        let n = first.len();
        let mut appender = store.clone();
        let first = tokio::spawn(async move { appender.blocking_append(first).await });
        while store.shared.lock().unwrap().pending.len() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        store.clone().truncate(cut).await.expect("truncate");
        let index = then.log_id.index;
        let mut appender = store.clone();
        let second = tokio::spawn(async move { appender.blocking_append([then]).await });
        while !store.shared.lock().unwrap().pending.contains_key(&index) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        store.hooks.hold.store(false, Ordering::SeqCst);
        first.await.expect("task").expect("first append");
        second.await.expect("task").expect("second append");
        log_ids(store).await
    }

    /// The log ids of every entry the store reads back.
    async fn log_ids(store: &LogStore) -> Vec<LogId> {
        store
            .clone()
            .try_get_log_entries(1..)
            .await
            .expect("read")
            .into_iter()
            .map(|e| e.log_id)
            .collect()
    }

    /// The committed id does not wake the writer: it is readable at once and
    /// reaches disk with the next group, never ahead of the entries there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_committed_id_is_written_with_the_next_group() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut store = store_at(dir.path(), 1);
            append_blanks(&mut store, 3).await;
            store
                .save_committed(Some(log_id(1, 1, 3)))
                .await
                .expect("save committed");
            assert_eq!(
                store.read_committed().await.expect("read"),
                Some(log_id(1, 1, 3))
            );
            assert!(
                store.shared.lock().unwrap().committed.is_some(),
                "not written by itself"
            );
            store
                .blocking_append([blank_ent::<TypeConfig>(1, 1, 4)])
                .await
                .expect("append");
            assert!(store.shared.lock().unwrap().committed.is_none());
            // A commit saved after the last group stays in memory only.
            store
                .save_committed(Some(log_id(1, 1, 4)))
                .await
                .expect("save committed");
        }
        let mut store = store_at(dir.path(), 1);
        assert_eq!(
            store.read_committed().await.expect("read"),
            Some(log_id(1, 1, 3))
        );
        assert_eq!(store.committed_index().load(Ordering::Relaxed), 3);
        let state = store.get_log_state().await.expect("state");
        assert_eq!(state.last_log_id, Some(log_id(1, 1, 4)));
    }

    /// While the group carrying a saved committed id is being written, the
    /// id stays readable: it is not taken out of memory before it is on
    /// disk (the openraft suite caught a read in that gap, which found the
    /// older id on disk).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_committed_id_stays_readable_while_it_is_written() {
        let (_dir, mut store) = open();
        append_blanks(&mut store, 2).await;
        store
            .save_committed(Some(log_id(1, 1, 2)))
            .await
            .expect("save committed");
        store.hooks.hold.store(true, Ordering::SeqCst);
        store.purge(log_id(1, 1, 1)).await.expect("purge");
        wait_until(
            "the writer to hold its group",
            Duration::from_secs(2),
            || store.hooks.holding.load(Ordering::SeqCst),
        )
        .await;
        // The writer has the id for its group, which is not written yet.
        assert_eq!(
            store.read_committed().await.expect("read"),
            Some(log_id(1, 1, 2))
        );
        store.hooks.hold.store(false, Ordering::SeqCst);
        // Written with that group: memory lets go of it.
        wait_until(
            "memory to let go of the written id",
            Duration::from_secs(2),
            || store.shared.lock().unwrap().committed.is_none(),
        )
        .await;
        assert_eq!(
            store.read_committed().await.expect("read"),
            Some(log_id(1, 1, 2))
        );
    }

    /// A follower's append (entries made by another leader) is written and
    /// flushed by the appending task, durably; the leader's own go to the
    /// writer thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_followers_append_is_flushed_in_place() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut store = store_at(dir.path(), 2);
            append_blanks(&mut store, 3).await;
            assert_eq!(store.hooks.in_place.load(Ordering::SeqCst), 1);
            // Node 2 leads term 2: its own entries are the writer's.
            store
                .blocking_append([blank_ent::<TypeConfig>(2, 2, 4)])
                .await
                .expect("append");
            assert_eq!(store.hooks.in_place.load(Ordering::SeqCst), 1);
        }
        let store = store_at(dir.path(), 2);
        assert_eq!(
            log_ids(&store).await,
            vec![
                log_id(1, 1, 1),
                log_id(1, 1, 2),
                log_id(1, 1, 3),
                log_id(2, 2, 4)
            ]
        );
    }

    /// While an op waits for the writer thread, a follower's append queues
    /// behind it instead of overtaking it in place: fjall gets them in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_in_place_never_overtakes_a_queued_op() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = store_at(dir.path(), 2);
        // Node 2's own entries and truncation wait for the held writer;
        // written in place, the follower's entry 2 would land before the
        // truncation removes "entry 2 and after".
        let own = (1..=2).map(|i| blank_ent::<TypeConfig>(1, 2, i)).collect();
        let ids =
            append_truncate_append_held(&store, own, log_id(1, 2, 2), blank_ent(2, 1, 2)).await;
        assert_eq!(store.hooks.in_place.load(Ordering::SeqCst), 0);
        assert_eq!(ids, vec![log_id(1, 2, 1), log_id(2, 1, 2)]);
        // With the queue drained, the next follower append is in place. The
        // writer reports a flush before it gives up its turn: wait for that.
        wait_until("the writer to be idle", Duration::from_secs(5), || {
            store.in_place.turn.writing.try_lock().is_ok()
        })
        .await;
        store
            .blocking_append([blank_ent::<TypeConfig>(2, 1, 3)])
            .await
            .expect("append");
        assert_eq!(store.hooks.in_place.load(Ordering::SeqCst), 1);
    }

    /// An entry with `len` bytes of value.
    fn put_ent(term: u64, index: u64, len: usize) -> Entry {
        Entry {
            log_id: log_id(term, 1, index),
            payload: openraft::EntryPayload::Normal(crate::raft::Command::Put {
                key: format!("k{index}"),
                value: vec![b'v'; len],
                content_type: None,
                precondition: Default::default(),
            }),
        }
    }

    fn indexes(entries: &[Entry]) -> Vec<(u64, u64)> {
        entries
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    /// Reads of the log's tail come from memory: they still answer after the
    /// entries were removed from fjall behind the store's back, and follow
    /// truncations and purges; the tail held is bounded, and reads from
    /// before it go to fjall.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tail_is_read_from_memory() {
        let (_dir, mut store) = open();
        store
            .blocking_append((1..=4).map(|i| put_ent(1, i, 10)))
            .await
            .expect("append");
        for i in 1..=4 {
            store.log.remove(index_key(i)).expect("remove from fjall");
        }
        let read = store.try_get_log_entries(2..).await.expect("read");
        assert_eq!(indexes(&read), vec![(1, 2), (1, 3), (1, 4)]);

        // A truncation hides the suffix at once; new entries replace it.
        store.truncate(log_id(1, 1, 3)).await.expect("truncate");
        let read = store.try_get_log_entries(1..).await.expect("read");
        assert_eq!(indexes(&read), vec![(1, 1), (1, 2)]);
        store
            .blocking_append([put_ent(2, 3, 10)])
            .await
            .expect("append");
        let read = store.try_get_log_entries(1..=3).await.expect("read");
        assert_eq!(indexes(&read), vec![(1, 1), (1, 2), (2, 3)]);

        // A purge drops the prefix from memory too.
        store.purge(log_id(1, 1, 1)).await.expect("purge");
        assert_eq!(
            store.shared.lock().unwrap().first_in_memory(),
            Some(2),
            "purged entries stay in memory"
        );

        // Past RECENT_BYTES, the oldest flushed entries leave memory; reading
        // them goes to fjall (where the first ones were removed above).
        let big = RECENT_BYTES / 4;
        store
            .blocking_append((4..=9).map(|i| put_ent(2, i, big)))
            .await
            .expect("append");
        let (first, held) = {
            let s = store.shared.lock().unwrap();
            (s.first_in_memory(), s.recent_bytes)
        };
        assert!(held <= RECENT_BYTES, "{held} bytes held");
        assert!(first.is_some_and(|f| f > 4), "first in memory: {first:?}");
        let read = store.try_get_log_entries(2..=5).await.expect("read");
        assert_eq!(
            indexes(&read),
            vec![(2, 3), (2, 4), (2, 5)],
            "from fjall: entry 2 was removed from it, 3.. were written"
        );
    }
}
