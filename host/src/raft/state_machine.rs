//! The replicated state machine on fjall: applies committed commands to the
//! `kv` keyspace, answers local reads, builds and installs snapshots, and
//! publishes every applied change, in commit order, to subscribers (plugins'
//! on-change hooks and watch streams).
//!
//! Applies are not fsynced on their own: they share the journal with the Raft
//! log, whose entries are fsynced before they are acknowledged, so a crash
//! recovers a prefix of both and openraft re-applies what the state machine
//! lost. Snapshots are written to `snapshot/current` with fsync + rename.
//! Building a snapshot (openraft runs it in a task of its own) and installing
//! one can run at the same time: each write goes to a temp file of its own,
//! writes are serialized by a lock, and `current` is only ever replaced by a
//! newer snapshot (by `last_log_id`), never by an older build.

use std::collections::HashMap;
use std::io::Read;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fjall::{Database, Keyspace, Readable};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StorageIOError};
use tokio::sync::broadcast;

use super::history::{Compacted, DEFAULT_HISTORY, History, Resume};
use super::record_cache::{DEFAULT_READ_CACHE_BYTES, RecordCache};

use super::types::{
    Command, CommandResult, Entry, LogId, Precondition, SnapshotMeta, StorageError,
    StoredMembership, TypeConfig, ValueRecord,
};

const LAST_APPLIED: &str = "last_applied";
const REVISION: &str = "revision";
const MEMBERSHIP: &str = "membership";
/// Name of the snapshot file in the snapshot directory.
const CURRENT: &str = "current";
/// Suffix of snapshot files being written (left over only by a crash).
const TMP_SUFFIX: &str = ".tmp";
/// Makes temp snapshot file names unique within the process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// How many applied changes a slow subscriber may lag behind before it is told
/// it lost events (`broadcast::error::RecvError::Lagged`).
pub const CHANGE_CHANNEL_CAPACITY: usize = 4096;

/// One committed change to the key space, published after it was applied.
#[derive(Debug, Clone)]
pub struct Change {
    /// Revision of the change.
    pub revision: u64,
    /// The key written.
    pub key: String,
    /// The previous value, if the key existed.
    pub old: Option<Arc<ValueRecord>>,
    /// The new value; `None` for a delete.
    pub new: Option<Arc<ValueRecord>>,
    /// Re-applied while replaying the log at startup (it was committed, and
    /// published, before the restart).
    pub replayed: bool,
}

fn sm_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(
        ErrorSubject::StateMachine,
        verb,
        openraft::AnyError::new(&e),
    )
    .into()
}

fn encode_meta<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    rmp_serde::to_vec(value).map_err(|e| sm_err(ErrorVerb::Write, e))
}

fn snap_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(
        ErrorSubject::Snapshot(None),
        verb,
        openraft::AnyError::new(&e),
    )
    .into()
}

/// Read-only, cloneable view of the applied key space for local reads.
#[derive(Clone)]
pub struct KvReader {
    kv: Keyspace,
    cache: Arc<RecordCache>,
    applied: Arc<AtomicU64>,
    revision: Arc<AtomicU64>,
    history: History,
}

/// A read failed (I/O or a corrupt record).
#[derive(Debug, thiserror::Error)]
#[error("local read failed: {0}")]
pub struct ReadError(String);

/// Reads and decodes the record of `key` from `kv` (no cache).
fn load_record(kv: &Keyspace, key: &str) -> Result<Option<ValueRecord>, ReadError> {
    match kv.get(key).map_err(|e| ReadError(e.to_string()))? {
        None => Ok(None),
        Some(bytes) => ValueRecord::decode(&bytes)
            .map(Some)
            .map_err(|e| ReadError(e.to_string())),
    }
}

impl KvReader {
    /// The value stored under `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Arc<ValueRecord>>, ReadError> {
        self.cache.get(key, || load_record(&self.kv, key))
    }

    /// The revision of `key` without copying its value.
    pub fn revision(&self, key: &str) -> Result<Option<u64>, ReadError> {
        if let Some(record) = self.cache.cached(key) {
            return Ok(Some(record.revision));
        }
        match self.kv.get(key).map_err(|e| ReadError(e.to_string()))? {
            None => Ok(None),
            Some(bytes) => ValueRecord::decode_revision(&bytes)
                .map(Some)
                .map_err(|e| ReadError(e.to_string())),
        }
    }

    /// Keys starting with `prefix`, sorted bytewise (which is UTF-8 order).
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, ReadError> {
        let mut keys = Vec::new();
        for item in self.kv.prefix(prefix) {
            let key = item.key().map_err(|e| ReadError(e.to_string()))?;
            keys.push(String::from_utf8_lossy(&key).into_owned());
        }
        Ok(keys)
    }

    /// The last applied Raft log index (what linearizable reads wait for).
    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// The store's current revision: the last one given to a change.
    pub fn revision_now(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Subscribes to committed changes, in commit order, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.history.subscribe()
    }

    /// Applied changes after `since` plus a receiver for all later ones, or
    /// [`Compacted`] if some of them are no longer kept.
    pub fn watch_from(&self, since: u64) -> Result<Resume, Compacted> {
        self.history.watch_from(since)
    }
}

/// The state machine handed to openraft.
pub struct StateMachineStore {
    db: Database,
    kv: Keyspace,
    meta: Keyspace,
    snapshot_dir: PathBuf,
    /// Serializes writes of `snapshot_dir/current` (builds and installs).
    snapshot_lock: Arc<Mutex<()>>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    applied: Arc<AtomicU64>,
    /// Last revision given out (persisted with every apply).
    rev: u64,
    revision: Arc<AtomicU64>,
    history: History,
    /// Decoded records of hot keys; updated here, around every commit.
    cache: Arc<RecordCache>,
    snapshot_seq: u64,
    replay_until: u64,
}

impl StateMachineStore {
    /// How many applied changes are kept for resuming watchers.
    pub fn set_history_capacity(&mut self, capacity: usize) {
        self.history.set_capacity(capacity);
    }

    /// How many published changes a subscriber may lag behind. Call before
    /// any reader subscribes.
    pub fn set_watch_buffer(&mut self, capacity: usize) {
        self.history.set_channel_capacity(capacity);
    }

    /// Bytes of decoded records kept for reads (0: none). Call before any
    /// [`StateMachineStore::reader`] is taken.
    pub fn set_read_cache(&mut self, bytes: u64) {
        self.cache = Arc::new(RecordCache::new(bytes));
    }

    /// Marks changes up to `index` (the commit index stored before a restart)
    /// as replayed rather than new.
    pub fn set_replay_until(&mut self, index: u64) {
        self.replay_until = index;
    }

    /// Opens (or creates) the state machine keyspaces in `db`; snapshots are
    /// kept under `data_dir/snapshot`.
    pub fn open(db: &Database, data_dir: &Path) -> Result<Self, StorageError> {
        let open_err = |e: fjall::Error| sm_err(ErrorVerb::Read, e);
        let kv = db
            .keyspace("kv", fjall::KeyspaceCreateOptions::default)
            .map_err(open_err)?;
        let meta = db
            .keyspace("sm_meta", fjall::KeyspaceCreateOptions::default)
            .map_err(open_err)?;
        let snapshot_dir = data_dir.join("snapshot");
        std::fs::create_dir_all(&snapshot_dir).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        Self::remove_stale_tmp_files(&snapshot_dir);
        let read = |key: &str| -> Result<Option<fjall::Slice>, StorageError> {
            meta.get(key).map_err(|e| sm_err(ErrorVerb::Read, e))
        };
        let last_applied: Option<LogId> = match read(LAST_APPLIED)? {
            Some(b) => rmp_serde::from_slice(&b).map_err(|e| sm_err(ErrorVerb::Read, e))?,
            None => None,
        };
        let membership: StoredMembership = match read(MEMBERSHIP)? {
            Some(b) => rmp_serde::from_slice(&b).map_err(|e| sm_err(ErrorVerb::Read, e))?,
            None => StoredMembership::default(),
        };
        let rev: u64 = match read(REVISION)? {
            Some(b) => rmp_serde::from_slice(&b).map_err(|e| sm_err(ErrorVerb::Read, e))?,
            None => 0,
        };
        let history = History::new(rev, DEFAULT_HISTORY, CHANGE_CHANNEL_CAPACITY);
        let mut sm = StateMachineStore {
            db: db.clone(),
            kv,
            meta,
            snapshot_dir,
            snapshot_lock: Arc::new(Mutex::new(())),
            applied: Arc::new(AtomicU64::new(last_applied.map_or(0, |l| l.index))),
            last_applied,
            membership,
            rev,
            revision: Arc::new(AtomicU64::new(rev)),
            history,
            cache: Arc::new(RecordCache::new(DEFAULT_READ_CACHE_BYTES)),
            snapshot_seq: 0,
            replay_until: 0,
        };
        sm.catch_up_with_snapshot_file()?;
        Ok(sm)
    }

    /// Replaces the key space with a snapshot's `pairs` (revision counter
    /// `rev`, described by `meta`) in one batch; the counters follow.
    fn load_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        rev: u64,
        pairs: Pairs<'_>,
    ) -> Result<(), StorageError> {
        let mut batch = self.db.batch();
        for item in self.kv.iter() {
            let key = item.key().map_err(|e| sm_err(ErrorVerb::Read, e))?;
            batch.remove(&self.kv, key);
        }
        for (k, v) in pairs {
            batch.insert(&self.kv, k, v);
        }
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        batch.insert(&self.meta, LAST_APPLIED, encode_meta(&self.last_applied)?);
        batch.insert(&self.meta, MEMBERSHIP, encode_meta(&self.membership)?);
        self.rev = rev;
        batch.insert(&self.meta, REVISION, encode_meta(&self.rev)?);
        let update = self.cache.begin();
        batch.commit().map_err(|e| sm_err(ErrorVerb::Write, e))?;
        update.finish_replacing_all();
        let index = meta.last_log_id.map_or(0, |l| l.index);
        self.applied.store(index, Ordering::Release);
        self.revision.store(rev, Ordering::Release);
        self.history.reset(rev);
        Ok(())
    }

    /// At open: a snapshot file ahead of what the key space says it applied
    /// is loaded. The file is fsynced before the key space changes (and the
    /// key space's own writes are not fsynced: they ride on the log's), so a
    /// crash between an install's file and its batch, or after a build from
    /// applies the journal then lost, leaves exactly this; meanwhile the log
    /// may already be purged up to the snapshot, so the entries to get there
    /// by re-applying can be gone.
    fn catch_up_with_snapshot_file(&mut self) -> Result<(), StorageError> {
        let read_err = |e| snap_err(ErrorVerb::Read, e);
        // The header decides; the (large) data is read only when it is ahead.
        let ahead = Self::read_snapshot_meta(&self.snapshot_dir)
            .map_err(read_err)?
            .is_some_and(|meta| meta.last_log_id > self.last_applied);
        if !ahead {
            return Ok(());
        }
        if let Some((meta, data)) =
            Self::read_snapshot_file(&self.snapshot_dir).map_err(read_err)?
        {
            tracing::warn!(
                snapshot = %meta.snapshot_id,
                applied = ?self.last_applied,
                "the state machine is behind its snapshot file (a crash mid-install?): loading it"
            );
            let (rev, pairs) =
                decode_snapshot(&data).ok_or_else(|| read_err(corrupt_snapshot_file()))?;
            self.load_snapshot(&meta, rev, pairs)?;
        }
        Ok(())
    }

    /// A read handle sharing this state machine's keyspace and counters.
    pub fn reader(&self) -> KvReader {
        KvReader {
            kv: self.kv.clone(),
            cache: self.cache.clone(),
            applied: self.applied.clone(),
            revision: self.revision.clone(),
            history: self.history.clone(),
        }
    }

    /// Whether anything was ever applied or installed (an existing node).
    pub fn is_fresh(&self) -> bool {
        self.last_applied.is_none() && self.membership.log_id().is_none()
    }

    fn current(
        &self,
        overlay: &HashMap<String, Option<Arc<ValueRecord>>>,
        key: &str,
    ) -> Result<Option<Arc<ValueRecord>>, StorageError> {
        if let Some(v) = overlay.get(key) {
            return Ok(v.clone());
        }
        self.cache
            .get(key, || load_record(&self.kv, key))
            .map_err(|e| sm_err(ErrorVerb::Read, e))
    }

    fn apply_command(
        &mut self,
        cmd: Command,
        index: u64,
        batch: &mut fjall::OwnedWriteBatch,
        overlay: &mut HashMap<String, Option<Arc<ValueRecord>>>,
        changes: &mut Vec<Change>,
    ) -> Result<CommandResult, StorageError> {
        // A put carries its new value and content type; a delete carries none.
        let (key, precondition, put) = match cmd {
            Command::Batch(cmds) => {
                let mut results = Vec::with_capacity(cmds.len());
                for c in cmds {
                    results.push(self.apply_command(c, index, batch, overlay, changes)?);
                }
                return Ok(CommandResult::Batch(results));
            }
            Command::Put {
                key,
                value,
                content_type,
                precondition,
            } => (key, precondition, Some((value, content_type))),
            Command::Delete { key, precondition } => (key, precondition, None),
        };
        let old = self.current(overlay, &key)?;
        let current_rev = old.as_ref().map(|r| r.revision);
        let holds = match precondition {
            Precondition::None => true,
            Precondition::Absent => old.is_none(),
            Precondition::Present => old.is_some(),
            Precondition::Revision(r) => current_rev == Some(r),
        };
        if !holds {
            return Ok(CommandResult::PreconditionFailed {
                current: current_rev,
            });
        }
        let replayed = index <= self.replay_until;
        match put {
            Some((value, content_type)) => {
                self.rev += 1;
                let revision = self.rev;
                let record = Arc::new(ValueRecord {
                    revision,
                    create_revision: old.as_ref().map_or(revision, |o| o.create_revision),
                    version: old.as_ref().map_or(1, |o| o.version + 1),
                    content_type,
                    value,
                });
                batch.insert(&self.kv, key.as_bytes(), record.encode());
                overlay.insert(key.clone(), Some(record.clone()));
                changes.push(Change {
                    revision,
                    key,
                    old,
                    new: Some(record),
                    replayed,
                });
                Ok(CommandResult::Put { revision })
            }
            None => {
                let deleted = old.is_some();
                if deleted {
                    self.rev += 1;
                    batch.remove(&self.kv, key.as_bytes());
                    overlay.insert(key.clone(), None);
                    changes.push(Change {
                        revision: self.rev,
                        key,
                        old,
                        new: None,
                        replayed,
                    });
                }
                Ok(CommandResult::Delete {
                    deleted,
                    revision: self.rev,
                })
            }
        }
    }

    /// Writes a snapshot to `dir/current` (temp file, fsync, rename, fsync of
    /// the directory) unless `current` already holds a snapshot at least as
    /// new (by `last_log_id`). Returns whether `current` was replaced.
    ///
    /// `lock` serializes writers, so a check and its rename cannot interleave
    /// with another write; each write also has a temp file of its own.
    fn write_snapshot_file(
        dir: &Path,
        lock: &Mutex<()>,
        meta: &SnapshotMeta,
        data: &[u8],
    ) -> std::io::Result<bool> {
        let meta_bytes = rmp_serde::to_vec(meta).map_err(std::io::Error::other)?;
        let _guard = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // An unreadable `current` is replaced rather than trusted.
        if let Ok(Some(existing)) = Self::read_snapshot_meta(dir)
            && existing.last_log_id >= meta.last_log_id
        {
            tracing::info!(
                snapshot = %meta.snapshot_id,
                current = %existing.snapshot_id,
                "snapshot file already holds a snapshot at least as new; not replaced"
            );
            return Ok(false);
        }
        let tmp = dir.join(format!(
            "{CURRENT}.{}.{}{TMP_SUFFIX}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&(meta_bytes.len() as u64).to_be_bytes())?;
            f.write_all(&meta_bytes)?;
            f.write_all(data)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, dir.join(CURRENT))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::File::open(dir)?.sync_all()?;
        Ok(true)
    }

    /// `dir/current`, opened; `None` when no snapshot was written yet.
    fn open_snapshot_file(dir: &Path) -> std::io::Result<Option<std::fs::File>> {
        match std::fs::File::open(dir.join(CURRENT)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads the header of a snapshot file, `[u64 meta len][meta]`, leaving
    /// `f` at the start of the snapshot data.
    fn read_snapshot_header(f: &mut std::fs::File) -> std::io::Result<SnapshotMeta> {
        let mut len_bytes = [0u8; 8];
        f.read_exact(&mut len_bytes)?;
        let meta_len = u64::from_be_bytes(len_bytes);
        if meta_len > f.metadata()?.len() {
            return Err(corrupt_snapshot_file());
        }
        let mut meta_bytes =
            vec![0u8; usize::try_from(meta_len).map_err(|_| corrupt_snapshot_file())?];
        f.read_exact(&mut meta_bytes)?;
        rmp_serde::from_slice(&meta_bytes).map_err(|_| corrupt_snapshot_file())
    }

    /// The metadata of the snapshot in `dir/current`, read from its header only.
    fn read_snapshot_meta(dir: &Path) -> std::io::Result<Option<SnapshotMeta>> {
        Self::open_snapshot_file(dir)?
            .map(|mut f| Self::read_snapshot_header(&mut f))
            .transpose()
    }

    /// Removes temp snapshot files a crash left behind (best effort).
    fn remove_stale_tmp_files(dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(CURRENT) && name.ends_with(TMP_SUFFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn read_snapshot_file(dir: &Path) -> std::io::Result<Option<(SnapshotMeta, Vec<u8>)>> {
        let Some(mut f) = Self::open_snapshot_file(dir)? else {
            return Ok(None);
        };
        let meta = Self::read_snapshot_header(&mut f)?;
        let mut data = Vec::new();
        f.read_to_end(&mut data)?;
        Ok(Some((meta, data)))
    }
}

fn corrupt_snapshot_file() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, "corrupt snapshot file")
}

/// Snapshot data: `[u64 revision]` then a sequence of
/// `[u32 key len][key][u32 record len][record]`.
fn encode_pair(out: &mut Vec<u8>, key: &[u8], record: &[u8]) {
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(record.len() as u32).to_be_bytes());
    out.extend_from_slice(record);
}

/// Splits snapshot data into its revision and `(key, record)` pairs; `None`
/// if it is malformed.
fn decode_snapshot(data: &[u8]) -> Option<(u64, Pairs<'_>)> {
    let rev = u64::from_be_bytes(data.get(..8)?.try_into().ok()?);
    Some((rev, decode_pairs(&data[8..])?))
}

/// `(key, encoded record)` pairs borrowed from snapshot data.
type Pairs<'a> = Vec<(&'a [u8], &'a [u8])>;

fn decode_pairs(mut data: &[u8]) -> Option<Pairs<'_>> {
    fn take<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
        let item = data.get(4..4 + len)?;
        *data = &data[4 + len..];
        Some(item)
    }
    let mut pairs = Vec::new();
    while !data.is_empty() {
        let key = take(&mut data)?;
        let record = take(&mut data)?;
        ValueRecord::decode_revision(record).ok()?;
        pairs.push((key, record));
    }
    Some(pairs)
}

/// Builds a snapshot from a consistent fjall snapshot taken when it was asked for.
pub struct SnapshotBuilder {
    view: fjall::Snapshot,
    kv: Keyspace,
    dir: PathBuf,
    lock: Arc<Mutex<()>>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    rev: u64,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let started = std::time::Instant::now();
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.seq),
            None => format!("0-0-{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let view = self.view.clone();
        let rev = self.rev;
        let kv = self.kv.clone();
        let dir = self.dir.clone();
        let lock = self.lock.clone();
        let file_meta = meta.clone();
        let data = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, StorageError> {
            let mut data = rev.to_be_bytes().to_vec();
            for item in view.iter(&kv) {
                let (k, v) = item
                    .into_inner()
                    .map_err(|e| snap_err(ErrorVerb::Read, e))?;
                encode_pair(&mut data, &k, &v);
            }
            // If a newer snapshot was installed meanwhile, `current` keeps
            // it; this one is still a valid snapshot of the state it names.
            StateMachineStore::write_snapshot_file(&dir, &lock, &file_meta, &data)
                .map_err(|e| snap_err(ErrorVerb::Write, e))?;
            Ok(data)
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))??;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes = data.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = self.db.batch();
        let mut overlay = HashMap::new();
        let mut changes = Vec::new();
        let mut results = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => CommandResult::Noop,
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResult::Noop
                }
                EntryPayload::Normal(cmd) => self.apply_command(
                    cmd,
                    entry.log_id.index,
                    &mut batch,
                    &mut overlay,
                    &mut changes,
                )?,
            };
            results.push(result);
        }
        batch.insert(&self.meta, LAST_APPLIED, encode_meta(&self.last_applied)?);
        batch.insert(&self.meta, MEMBERSHIP, encode_meta(&self.membership)?);
        batch.insert(&self.meta, REVISION, encode_meta(&self.rev)?);
        // The cache holds the new records before the applied index moves: a
        // linearizable read that waits for the index must not find old ones.
        let update = self.cache.begin();
        batch.commit().map_err(|e| sm_err(ErrorVerb::Write, e))?;
        update.finish(overlay.iter().map(|(k, v)| (k.as_str(), v.as_ref())));
        self.revision.store(self.rev, Ordering::Release);
        if let Some(l) = self.last_applied {
            self.applied.store(l.index, Ordering::Release);
        }
        self.history.publish(changes);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        SnapshotBuilder {
            view: self.db.snapshot(),
            kv: self.kv.clone(),
            dir: self.snapshot_dir.clone(),
            lock: self.snapshot_lock.clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            rev: self.rev,
            seq: self.snapshot_seq,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let invalid = || {
            snap_err(
                ErrorVerb::Read,
                std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed snapshot data"),
            )
        };
        let (rev, pairs) = decode_snapshot(&data).ok_or_else(invalid)?;
        StateMachineStore::write_snapshot_file(
            &self.snapshot_dir,
            &self.snapshot_lock,
            meta,
            &data,
        )
        .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        self.load_snapshot(meta, rev, pairs)?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let dir = self.snapshot_dir.clone();
        let found =
            tokio::task::spawn_blocking(move || StateMachineStore::read_snapshot_file(&dir))
                .await
                .map_err(|e| snap_err(ErrorVerb::Read, e))?
                .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(found.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_pairs_round_trip_and_reject_garbage() {
        let rec = ValueRecord {
            revision: 3,
            create_revision: 3,
            version: 1,
            content_type: None,
            value: b"v".to_vec(),
        }
        .encode();
        let mut data = Vec::new();
        encode_pair(&mut data, b"a", &rec);
        encode_pair(&mut data, b"b/c", &rec);
        let mut snapshot = 7u64.to_be_bytes().to_vec();
        snapshot.extend_from_slice(&data);
        let (rev, pairs) = decode_snapshot(&snapshot).unwrap();
        assert_eq!(rev, 7);
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1].0, b"b/c");
        assert!(decode_snapshot(&snapshot[..snapshot.len() - 1]).is_none());
        assert!(decode_snapshot(&[0, 0, 0]).is_none());
        assert!(decode_pairs(&[0, 0, 0, 9, 1]).is_none());
    }

    /// Snapshot data at revision `rev` holding `key`, created and last written
    /// at `rev`.
    fn one_record_snapshot(rev: u64, key: &[u8], value: &[u8]) -> Vec<u8> {
        let rec = ValueRecord {
            revision: rev,
            create_revision: rev,
            version: 1,
            content_type: None,
            value: value.to_vec(),
        }
        .encode();
        let mut data = rev.to_be_bytes().to_vec();
        encode_pair(&mut data, key, &rec);
        data
    }

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::testing::log_id(1, 1, index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("1-{index}"),
        }
    }

    fn entry(index: u64, cmd: Command) -> Entry {
        Entry {
            log_id: openraft::testing::log_id(1, 1, index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    fn put(key: &str, value: &str, precondition: Precondition) -> Command {
        Command::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            content_type: None,
            precondition,
        }
    }

    fn put_entry(index: u64, key: &str, value: &str) -> Entry {
        entry(index, put(key, value, Precondition::None))
    }

    /// Reads go through the record cache: every apply and snapshot install
    /// must leave it agreeing with the key space, or a read (served from
    /// the cache once the key was read) would return an old value.
    #[tokio::test]
    async fn reads_see_every_apply_and_install_through_the_cache() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Database::builder(dir.path().join("db")).open().expect("db");
        let mut sm = StateMachineStore::open(&db, dir.path()).expect("open");
        let reader = sm.reader();
        let value = |key: &str| reader.get(key).unwrap().map(|r| r.value.clone());

        sm.apply([put_entry(1, "k", "v1"), put_entry(2, "other", "o1")])
            .await
            .unwrap();
        assert_eq!(value("k").as_deref(), Some(&b"v1"[..]));
        assert!(sm.cache.cached("k").is_some(), "the write was cached");
        sm.apply([put_entry(3, "k", "v2")]).await.unwrap();
        assert_eq!(value("k").as_deref(), Some(&b"v2"[..]));
        assert_eq!(reader.revision("k").unwrap(), Some(3));
        let delete = entry(
            4,
            Command::Delete {
                key: "k".into(),
                precondition: Precondition::None,
            },
        );
        sm.apply([delete]).await.unwrap();
        assert_eq!(value("k"), None);
        assert_eq!(reader.revision("k").unwrap(), None);
        // A precondition sees the cached current record too.
        sm.apply([put_entry(5, "k", "v3")]).await.unwrap();
        let cas = entry(6, put("k", "v4", Precondition::Revision(4)));
        let results = sm.apply([cas]).await.unwrap();
        assert!(matches!(
            results[..],
            [CommandResult::PreconditionFailed { current: Some(5) }]
        ));

        // An install replaces the key space: cached keys it lacks are gone.
        assert_eq!(value("other").as_deref(), Some(&b"o1"[..]));
        let data = one_record_snapshot(9, b"k", b"snap");
        sm.install_snapshot(&meta(20), Box::new(Cursor::new(data)))
            .await
            .unwrap();
        assert_eq!(value("other"), None);
        assert_eq!(value("k").as_deref(), Some(&b"snap"[..]));
    }

    /// A crash after an install's snapshot file was written but before its
    /// key-space batch reached the journal: at the next open the state
    /// machine loads the file instead of staying behind it.
    #[test]
    fn a_snapshot_file_ahead_of_the_key_space_is_loaded_at_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Database::builder(dir.path().join("db")).open().expect("db");
        let sm = StateMachineStore::open(&db, dir.path()).expect("open");
        assert_eq!(sm.last_applied, None);
        let data = one_record_snapshot(5, b"k", b"from the snapshot");
        StateMachineStore::write_snapshot_file(
            &sm.snapshot_dir,
            &sm.snapshot_lock,
            &meta(9),
            &data,
        )
        .expect("write snapshot");
        drop(sm);

        let sm = StateMachineStore::open(&db, dir.path()).expect("reopen");
        assert_eq!(sm.last_applied, meta(9).last_log_id);
        assert_eq!(sm.rev, 5);
        let reader = sm.reader();
        assert_eq!(reader.applied_index(), 9);
        assert_eq!(
            reader.get("k").unwrap().unwrap().value,
            b"from the snapshot"
        );

        // A file not ahead of the key space is left alone.
        drop(sm);
        let sm = StateMachineStore::open(&db, dir.path()).expect("reopen again");
        assert_eq!(sm.last_applied, meta(9).last_log_id);
    }

    /// Many snapshot writes at once (as a build and an install can be): the
    /// file is never torn, ends up holding the newest snapshot, and an older
    /// one never replaces a newer one.
    #[test]
    fn concurrent_snapshot_writes_keep_the_newest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let lock = Arc::new(Mutex::new(()));
        let threads: Vec<_> = [5u64, 12, 3, 16, 9, 1, 14, 7, 11, 2, 15, 8, 4, 13, 6, 10]
            .into_iter()
            .map(|index| {
                let (dir, lock) = (dir.path().to_path_buf(), lock.clone());
                std::thread::spawn(move || {
                    let data = vec![index as u8; 256 * 1024];
                    StateMachineStore::write_snapshot_file(&dir, &lock, &meta(index), &data)
                        .expect("write snapshot");
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer thread");
        }
        let (m, data) = StateMachineStore::read_snapshot_file(dir.path())
            .expect("read")
            .expect("a snapshot");
        assert_eq!(m, meta(16));
        assert!(data.len() == 256 * 1024 && data.iter().all(|b| *b == 16));

        // Older or equal snapshots do not replace it; a newer one does.
        let older = StateMachineStore::write_snapshot_file(dir.path(), &lock, &meta(15), b"x");
        assert!(!older.expect("write"));
        let same = StateMachineStore::write_snapshot_file(dir.path(), &lock, &meta(16), b"y");
        assert!(!same.expect("write"));
        assert_eq!(
            StateMachineStore::read_snapshot_file(dir.path())
                .unwrap()
                .unwrap()
                .0,
            meta(16)
        );
        assert!(
            StateMachineStore::write_snapshot_file(dir.path(), &lock, &meta(17), b"z")
                .expect("write")
        );
        let (m, data) = StateMachineStore::read_snapshot_file(dir.path())
            .unwrap()
            .unwrap();
        assert_eq!((m, data), (meta(17), b"z".to_vec()));

        // No temp files are left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![CURRENT.to_string()]);
    }
}
