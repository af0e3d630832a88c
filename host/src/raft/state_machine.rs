//! The replicated state machine on fjall: applies committed commands to the
//! `kv` keyspace, answers local reads, builds and installs snapshots, and
//! publishes every applied change, in commit order, to subscribers (plugins'
//! on-change hooks and watch streams).
//!
//! Applies are not fsynced on their own: they share the journal with the Raft
//! log, whose entries are fsynced before they are acknowledged, so a crash
//! recovers a prefix of both and openraft re-applies what the state machine
//! lost.
//!
//! # Snapshots
//!
//! Snapshots are streamed, never held in memory (format and files:
//! `snapshot_file.rs`). A build streams a consistent fjall view of the key
//! space into a temp file and makes it `snapshot/current` (fsync + rename);
//! a build and an install can run at the same time, and `current` is only
//! ever replaced by a newer snapshot (by `last_log_id`). A follower receives
//! a snapshot into a temp file of the snapshot directory (removed if the
//! transfer is given up, or at the next open after a crash).
//!
//! An install fsyncs the received file, streams its pairs into the tables of
//! a fresh keyspace (`kv-<generation>`, a generation never used before in
//! this database, reserved on disk first; fjall's bulk ingestion: no
//! journal, no memtable), renames the file to `current` (no copy), then switches in
//! one fsynced batch (the live generation, the applied log id, membership
//! and revision) and drops the old keyspace. Readers see the old key space
//! until the switch and the new one after it, never a mix; a crash before
//! the switch leaves the old one and a stray keyspace (removed after the
//! next install's switch), and if `current` is then ahead of the key space,
//! the open installs it.
//!
//! A key-space keyspace is only ever deleted while one with a higher fjall
//! id (the live one) exists. fjall 3.1.13 recovers its sequence counter
//! from the user keyspaces alone and gives a deleted keyspace's id out again
//! when it was the highest; a keyspace created under such an id after a
//! restart can be shadowed by its predecessor's deletion at the next
//! restart: gone (the node came back with an empty key space) or failing
//! every start in fjall's recovery ("should exist").

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use fjall::{Database, Keyspace, PersistMode, Readable};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StorageIOError};

use super::history::{ChangeReceiver, Compacted, DEFAULT_HISTORY, History, Resume};
use super::record_cache::{DEFAULT_READ_CACHE_BYTES, RecordCache};
use super::snapshot_file::{self, PairReader, SnapshotWriter, Written};

use super::types::{
    Command, CommandResult, Entry, LogId, Precondition, SnapshotMeta, StorageError,
    StoredMembership, TypeConfig, ValueRecord,
};

const LAST_APPLIED: &str = "last_applied";
const REVISION: &str = "revision";
const MEMBERSHIP: &str = "membership";
/// Which keyspace holds the key space (see [`kv_keyspace_name`]).
const KV_GENERATION: &str = "kv_generation";
/// The highest key-space generation ever handed to an install (fsynced
/// before its keyspace is created): a generation's keyspace name is never
/// used twice in one database, so a stray keyspace is never mistaken for
/// the one an install is filling.
const KV_RESERVED: &str = "kv_reserved";

/// The keyspace holding generation `generation` of the key space; each
/// snapshot install fills the next one.
fn kv_keyspace_name(generation: u64) -> String {
    match generation {
        0 => "kv".to_owned(),
        n => format!("kv-{n}"),
    }
}

/// The generation a key-space keyspace's name stands for (0 for `kv`).
fn kv_generation_of(name: &str) -> u64 {
    name.strip_prefix("kv-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn is_kv_keyspace_name(name: &str) -> bool {
    name == "kv"
        || name
            .strip_prefix("kv-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Deletes the key-space keyspaces of `db` other than `live` (the ones it
/// replaced, which a crash may have left, and installs a crash or an error
/// interrupted), except the one fjall created last if that is not `live`:
/// deleting the keyspace with the highest fjall id lets fjall hand its id
/// out again (see the module docs). That one goes after the next install's
/// switch, so at most one such copy of the key space stays on disk.
fn delete_replaced_keyspaces(db: &Database, live: &Keyspace) -> Result<(), StorageError> {
    let write_err = |e: fjall::Error| sm_err(ErrorVerb::Write, e);
    let mut others = Vec::new();
    for name in db.list_keyspace_names() {
        if is_kv_keyspace_name(&name) && name != *live.name() {
            others.push(
                db.keyspace(&name, fjall::KeyspaceCreateOptions::default)
                    .map_err(write_err)?,
            );
        }
    }
    let newest = others
        .iter()
        .map(Keyspace::id)
        .max()
        .filter(|&id| id > live.id());
    for other in others {
        let name = other.name().clone();
        if Some(other.id()) == newest {
            tracing::info!(
                keyspace = &*name,
                "keeping an interrupted install's keyspace until the next install"
            );
            continue;
        }
        tracing::info!(keyspace = &*name, "removing a replaced key-space keyspace");
        db.delete_keyspace(other).map_err(write_err)?;
    }
    Ok(())
}

/// How far the state machine's durable state reaches: the index up to which
/// a restart finds every change in the key space or in `snapshot/current`.
/// The log must not be purged past it (see [`Coverage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Covered {
    /// Log index covered.
    pub index: u64,
    /// The last install failed: what it would have covered never will be.
    pub failed: bool,
}

/// The state machine's side of [`Covered`], watched by the log store.
///
/// openraft 0.9 purges a follower's log as soon as it has *handed* a
/// snapshot to the state machine, not once the install is done: a crash in
/// between left a log purged past everything the restarted node had, which
/// openraft refuses at startup (`purge_upto <= committed`), for good. The
/// log store waits for this instead ([`super::LogStore::purge_after`]).
#[derive(Debug, Clone)]
pub struct Coverage(Arc<tokio::sync::watch::Sender<Covered>>);

impl Coverage {
    pub(crate) fn new(index: u64) -> Self {
        Coverage(Arc::new(
            tokio::sync::watch::channel(Covered {
                index,
                failed: false,
            })
            .0,
        ))
    }

    /// Everything up to `index` is durable.
    pub(crate) fn advance(&self, index: u64) {
        self.0.send_if_modified(|c| {
            let changed = index > c.index || c.failed;
            if changed {
                *c = Covered {
                    index: c.index.max(index),
                    failed: false,
                };
            }
            changed
        });
    }

    /// An install failed.
    pub(crate) fn fail(&self) {
        self.0.send_modify(|c| c.failed = true);
    }

    /// A receiver for the log store.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Covered> {
        self.0.subscribe()
    }
}

/// The keyspace that holds the key space now, shared by the state machine
/// and its readers; an install swaps it.
#[derive(Clone)]
struct LiveKeyspace(Arc<RwLock<Keyspace>>);

impl LiveKeyspace {
    fn get(&self) -> Keyspace {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, kv: Keyspace) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = kv;
    }
}

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

/// Writes `records` to the meta keyspace `meta` of `db` in one batch and
/// fsyncs it (with everything the journal holds before it).
fn write_meta_synced(
    db: &Database,
    meta: &Keyspace,
    records: impl IntoIterator<Item = (&'static str, Vec<u8>)>,
) -> Result<(), StorageError> {
    let mut batch = db.batch();
    for (key, value) in records {
        batch.insert(meta, key, value);
    }
    batch.commit().map_err(|e| sm_err(ErrorVerb::Write, e))?;
    db.persist(PersistMode::SyncData)
        .map_err(|e| sm_err(ErrorVerb::Write, e))
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
    kv: LiveKeyspace,
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
        self.cache.get(key, || load_record(&self.kv.get(), key))
    }

    /// The revision of `key` without copying its value.
    pub fn revision(&self, key: &str) -> Result<Option<u64>, ReadError> {
        if let Some(known) = self.cache.cached(key) {
            return Ok(known.map(|r| r.revision));
        }
        match self
            .kv
            .get()
            .get(key)
            .map_err(|e| ReadError(e.to_string()))?
        {
            None => Ok(None),
            Some(bytes) => ValueRecord::decode_revision(&bytes)
                .map(Some)
                .map_err(|e| ReadError(e.to_string())),
        }
    }

    /// Keys starting with `prefix`, sorted bytewise (which is UTF-8 order).
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, ReadError> {
        Ok(self.list_page(prefix, "", usize::MAX)?.0)
    }

    /// At most `limit` keys starting with `prefix` and sorting after `after`
    /// (`""`: from the first), sorted bytewise, and whether more follow.
    pub fn list_page(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<String>, bool), ReadError> {
        let kv = self.kv.get();
        // Every key under `prefix` sorts at or after it, so a cursor before
        // the prefix changes nothing.
        let items = if after.as_bytes() >= prefix.as_bytes() && !after.is_empty() {
            kv.range::<&[u8], _>((Bound::Excluded(after.as_bytes()), Bound::Unbounded))
        } else {
            kv.prefix(prefix)
        };
        let mut keys = Vec::new();
        for item in items {
            let key = item.key().map_err(|e| ReadError(e.to_string()))?;
            if !key.starts_with(prefix.as_bytes()) {
                break;
            }
            if keys.len() == limit {
                return Ok((keys, true));
            }
            keys.push(String::from_utf8_lossy(&key).into_owned());
        }
        Ok((keys, false))
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
    pub fn subscribe(&self) -> ChangeReceiver {
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
    /// The live keyspace (also in `live`, for readers).
    kv: Keyspace,
    live: LiveKeyspace,
    kv_generation: u64,
    /// See [`KV_RESERVED`].
    kv_reserved: u64,
    meta: Keyspace,
    snapshot_dir: PathBuf,
    /// The file the snapshot being received goes into (see
    /// [`snapshot_file::Receiving`]).
    receiving: Option<snapshot_file::Receiving>,
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
    coverage: Coverage,
}

impl StateMachineStore {
    /// How many applied changes, and bytes of their keys and values, are
    /// kept for resuming watchers.
    pub fn set_history_capacity(&mut self, changes: usize, bytes: usize) {
        self.history.set_capacity(changes, bytes);
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
        let meta = db
            .keyspace("sm_meta", fjall::KeyspaceCreateOptions::default)
            .map_err(open_err)?;
        let snapshot_dir = data_dir.join("snapshot");
        std::fs::create_dir_all(&snapshot_dir).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        snapshot_file::remove_stale_tmp_files(&snapshot_dir);
        snapshot_file::upgrade_first_format(&snapshot_dir)
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        // A meta record, or its type's default before it was ever written.
        fn read<T: serde::de::DeserializeOwned + Default>(
            meta: &Keyspace,
            key: &str,
        ) -> Result<T, StorageError> {
            match meta.get(key).map_err(|e| sm_err(ErrorVerb::Read, e))? {
                Some(b) => rmp_serde::from_slice(&b).map_err(|e| sm_err(ErrorVerb::Read, e)),
                None => Ok(T::default()),
            }
        }
        let mut last_applied: Option<LogId> = read(&meta, LAST_APPLIED)?;
        let mut membership: StoredMembership = read(&meta, MEMBERSHIP)?;
        let mut rev: u64 = read(&meta, REVISION)?;
        let kv_generation: u64 = read(&meta, KV_GENERATION)?;
        let mut kv_reserved: u64 = read(&meta, KV_RESERVED)?;
        kv_reserved = kv_reserved.max(kv_generation);
        // (A data dir of an earlier version may hold a stray of a generation
        // it never reserved.)
        for name in db.list_keyspace_names() {
            if is_kv_keyspace_name(&name) {
                kv_reserved = kv_reserved.max(kv_generation_of(&name));
            }
        }
        let live_name = kv_keyspace_name(kv_generation);
        if kv_generation > 0 && !db.keyspace_exists(&live_name) {
            // Installs made it: `current` holds what it held at the switch
            // or later, and the log is kept from there on.
            let current = snapshot_file::read_current_meta(&snapshot_dir)
                .map_err(|e| snap_err(ErrorVerb::Read, e))?;
            if current.is_none() {
                return Err(sm_err(
                    ErrorVerb::Read,
                    std::io::Error::other(format!(
                        "the key space's keyspace {live_name} is gone and there is no snapshot \
                         file to rebuild it from"
                    )),
                ));
            }
            tracing::error!(
                keyspace = live_name,
                applied = ?last_applied,
                "the key space's keyspace is gone (lost by the storage engine): rebuilding it \
                 from the snapshot file and the log"
            );
            (last_applied, membership, rev) = (None, StoredMembership::default(), 0);
            // On disk before the empty keyspace exists: a rebuild killed
            // (or failing) after it made the keyspace must find "nothing
            // applied" at the next start, and install the file again, not
            // trust an empty key space with the old applied index.
            write_meta_synced(
                db,
                &meta,
                [
                    (LAST_APPLIED, encode_meta(&last_applied)?),
                    (MEMBERSHIP, encode_meta(&membership)?),
                    (REVISION, encode_meta(&rev)?),
                ],
            )?;
        }
        let kv = db
            .keyspace(&live_name, super::bulk_keyspace)
            .map_err(open_err)?;
        delete_replaced_keyspaces(db, &kv)?;
        let history = History::new(rev, DEFAULT_HISTORY, CHANGE_CHANNEL_CAPACITY);
        let mut sm = StateMachineStore {
            db: db.clone(),
            live: LiveKeyspace(Arc::new(RwLock::new(kv.clone()))),
            kv,
            kv_generation,
            kv_reserved,
            meta,
            snapshot_dir,
            receiving: None,
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
            coverage: Coverage::new(0),
        };
        sm.catch_up_with_snapshot_file()?;
        // What the key space holds now is what a restart finds (a prefix of
        // the journal), and the snapshot file is no further ahead of it.
        sm.coverage.advance(sm.last_applied.map_or(0, |l| l.index));
        Ok(sm)
    }

    /// Streams a snapshot file's pairs into a fresh keyspace for generation
    /// `generation` (blocking: run it off the async workers for big files).
    /// Returns the keyspace and the snapshot's revision counter.
    fn ingest(
        db: &Database,
        generation: u64,
        file: std::fs::File,
    ) -> Result<(Keyspace, u64), StorageError> {
        let write_err = |e: fjall::Error| sm_err(ErrorVerb::Write, e);
        let read_err = |e: std::io::Error| snap_err(ErrorVerb::Read, e);
        let name = kv_keyspace_name(generation);
        if db.keyspace_exists(&name) {
            return Err(sm_err(
                ErrorVerb::Write,
                std::io::Error::other(format!(
                    "keyspace {name} exists: its generation was not reserved"
                )),
            ));
        }
        let kv = db
            .keyspace(&name, super::bulk_keyspace)
            .map_err(write_err)?;
        let (_, pairs) = PairReader::open(file).map_err(read_err)?;
        let rev = pairs.revision();
        // Written to tables directly, in key order (the reader checks it).
        let mut ingestion = kv.start_ingestion().map_err(write_err)?;
        for pair in pairs {
            let (key, record) = pair.map_err(read_err)?;
            ingestion.write(key, record).map_err(write_err)?;
        }
        ingestion.finish().map_err(write_err)?;
        Ok((kv, rev))
    }

    /// Makes `kv` (filled by [`Self::ingest`] for the next generation from
    /// the snapshot `meta`, revision counter `rev`) the key space: one
    /// fsynced batch records the switch, then readers move over and the old
    /// keyspace is dropped.
    fn switch_to(
        &mut self,
        kv: Keyspace,
        generation: u64,
        meta: &SnapshotMeta,
        rev: u64,
    ) -> Result<(), StorageError> {
        // Applies ride on the log's fsyncs, but the old keyspace is about to
        // be deleted: the switch must be on disk first.
        write_meta_synced(
            &self.db,
            &self.meta,
            [
                (KV_GENERATION, encode_meta(&generation)?),
                (LAST_APPLIED, encode_meta(&meta.last_log_id)?),
                (MEMBERSHIP, encode_meta(&meta.last_membership)?),
                (REVISION, encode_meta(&rev)?),
            ],
        )?;
        self.kv_generation = generation;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.rev = rev;
        let update = self.cache.begin();
        self.kv = kv.clone();
        self.live.set(kv);
        update.finish_replacing_all();
        let index = meta.last_log_id.map_or(0, |l| l.index);
        self.applied.store(index, Ordering::Release);
        self.revision.store(rev, Ordering::Release);
        self.history.reset(rev);
        // The new keyspace is the newest: every other one goes (readers
        // still holding the old one finish their reads; its files go when
        // the last handle does).
        if let Err(e) = delete_replaced_keyspaces(&self.db, &self.kv) {
            tracing::warn!(error = %e, "could not delete the replaced keyspaces; the next start will");
        }
        Ok(())
    }

    /// A key-space generation no keyspace of this database was ever created
    /// for, recorded on disk before the caller creates one ([`KV_RESERVED`]).
    fn reserve_generation(&mut self) -> Result<u64, StorageError> {
        let generation = self.kv_reserved + 1;
        write_meta_synced(
            &self.db,
            &self.meta,
            [(KV_RESERVED, encode_meta(&generation)?)],
        )?;
        self.kv_reserved = generation;
        Ok(generation)
    }

    /// At open: a snapshot file ahead of what the key space says it applied
    /// is installed. An install makes the file `current` before it switches
    /// the key space (and the key space's own writes are not fsynced: they
    /// ride on the log's), so a crash between the two, or after a build from
    /// applies the journal then lost, leaves exactly this; meanwhile the log
    /// may already be purged up to the snapshot, so the entries to get there
    /// by re-applying can be gone.
    fn catch_up_with_snapshot_file(&mut self) -> Result<(), StorageError> {
        let read_err = |e| snap_err(ErrorVerb::Read, e);
        let Some((meta, file)) =
            snapshot_file::open_current(&self.snapshot_dir).map_err(read_err)?
        else {
            return Ok(());
        };
        if meta.last_log_id <= self.last_applied {
            return Ok(());
        }
        tracing::warn!(
            snapshot = %meta.snapshot_id,
            applied = ?self.last_applied,
            "the state machine is behind its snapshot file (a crash mid-install?): installing it"
        );
        let generation = self.reserve_generation()?;
        let (kv, rev) = Self::ingest(&self.db, generation, file)?;
        self.switch_to(kv, generation, &meta, rev)
    }

    /// Installs a snapshot received into `snapshot` (see the module docs).
    async fn install(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        let mut file = snapshot.into_std().await;
        // The file this node received into (not a copy someone else handed
        // over) is published as it is.
        let received = self.receiving.take().filter(|r| r.holds(&file));
        let generation = self.reserve_generation()?;
        let db = self.db.clone();
        let (dir, lock, want) = (
            self.snapshot_dir.clone(),
            self.snapshot_lock.clone(),
            meta.clone(),
        );
        let (kv, rev, bytes) =
            tokio::task::spawn_blocking(move || -> Result<(Keyspace, u64, u64), StorageError> {
                let read_err = |e| snap_err(ErrorVerb::Read, e);
                let write_err = |e| snap_err(ErrorVerb::Write, e);
                let bytes = file.metadata().map_err(read_err)?.len();
                let copy = if snapshot_file::starts_with_magic(&mut file).map_err(read_err)? {
                    // The data names the snapshot it holds: it must be this one.
                    let named = snapshot_file::read_meta(&mut file).map_err(read_err)?;
                    if named != want {
                        return Err(read_err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "snapshot data holds snapshot {}, not {}",
                                named.snapshot_id, want.snapshot_id
                            ),
                        )));
                    }
                    match received {
                        Some(received) => received.adopt(file).map_err(write_err)?,
                        None => Written::copy_of(&dir, &mut file).map_err(write_err)?,
                    }
                } else {
                    // From a node of an older version: data without metadata.
                    Written::from_first_format_data(&dir, &mut file, &want).map_err(read_err)?
                };
                // Every pair is checked while it is ingested: a bad file
                // fails here, before anything is published or switched.
                let (kv, rev) = Self::ingest(&db, generation, copy.reopen().map_err(read_err)?)?;
                copy.publish(&dir, &lock, &want).map_err(write_err)?;
                Ok((kv, rev, bytes))
            })
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))??;
        self.switch_to(kv, generation, meta, rev)?;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "installed snapshot"
        );
        Ok(())
    }

    /// How far this state machine's durable state reaches (for the log
    /// store's purges).
    pub fn coverage(&self) -> Coverage {
        self.coverage.clone()
    }

    /// A read handle sharing this state machine's keyspace and counters.
    pub fn reader(&self) -> KvReader {
        KvReader {
            kv: self.live.clone(),
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
        // No fill on a miss: the batch writes this key, and its commit puts
        // the new record in the cache.
        if let Some(known) = self.cache.cached(key) {
            return Ok(known);
        }
        load_record(&self.kv, key)
            .map(|r| r.map(Arc::new))
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
    coverage: Coverage,
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
        let (file, bytes) =
            tokio::task::spawn_blocking(move || -> Result<(std::fs::File, u64), StorageError> {
                let write_err = |e| snap_err(ErrorVerb::Write, e);
                let mut writer = SnapshotWriter::create(&dir, rev).map_err(write_err)?;
                for item in view.iter(&kv) {
                    let (k, v) = item
                        .into_inner()
                        .map_err(|e| snap_err(ErrorVerb::Read, e))?;
                    writer.push(&k, &v).map_err(write_err)?;
                }
                // If a newer snapshot was installed meanwhile, `current`
                // keeps it; this one is still a valid snapshot of the state
                // it names, and its open file serves this build's caller.
                let (file, _) = writer
                    .finish(&file_meta)
                    .and_then(|w| w.publish(&dir, &lock, &file_meta))
                    .map_err(write_err)?;
                let bytes = file.metadata().map_err(write_err)?.len();
                Ok((file, bytes))
            })
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))??;
        // `current` now holds this snapshot or a newer one.
        self.coverage
            .advance(self.last_applied.map_or(0, |l| l.index));
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
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
            coverage: self.coverage.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        // openraft receives one snapshot at a time: a new one means the
        // previous transfer was given up, and its file's name goes now.
        let (file, receiving) = snapshot_file::Receiving::create(&self.snapshot_dir)
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        self.receiving = Some(receiving);
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let installed = self.install(meta, snapshot).await;
        match &installed {
            Ok(()) => self
                .coverage
                .advance(meta.last_log_id.map_or(0, |l| l.index)),
            Err(_) => self.coverage.fail(),
        }
        installed
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let dir = self.snapshot_dir.clone();
        let found = tokio::task::spawn_blocking(move || snapshot_file::open_current(&dir))
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))?
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(found.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::test_support::{meta, record};

    /// A published snapshot file in `dir` at revision `rev` holding `pairs`
    /// (keys in order), described by `meta`; returns it open.
    fn snapshot_in(
        dir: &Path,
        meta: &SnapshotMeta,
        rev: u64,
        pairs: &[(&str, &[u8])],
    ) -> std::fs::File {
        let mut writer = SnapshotWriter::create(dir, rev).expect("create");
        for (key, value) in pairs {
            writer
                .push(key.as_bytes(), &record(rev, value))
                .expect("push");
        }
        let written = writer.finish(meta).expect("finish");
        written
            .publish(dir, &Mutex::new(()), meta)
            .expect("publish")
            .0
    }

    /// A snapshot as a follower receives it: its own file, apart from the
    /// state machine's directory.
    fn received(meta: &SnapshotMeta, rev: u64, pairs: &[(&str, &[u8])]) -> Box<tokio::fs::File> {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = snapshot_in(dir.path(), meta, rev, pairs);
        Box::new(tokio::fs::File::from_std(file))
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

        // Absent keys are cached as absent until a write creates them.
        assert_eq!(value("k"), None);
        assert_eq!(reader.revision("k").unwrap(), None);
        assert_eq!(value("fresh"), None);
        sm.apply([put_entry(1, "k", "v1"), put_entry(2, "other", "o1")])
            .await
            .unwrap();
        assert_eq!(value("k").as_deref(), Some(&b"v1"[..]));
        assert!(
            matches!(sm.cache.cached("k"), Some(Some(_))),
            "the write was cached"
        );
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
        let snapshot = received(&meta(20), 9, &[("fresh", b"f"), ("k", b"snap")]);
        sm.install_snapshot(&meta(20), snapshot).await.unwrap();
        assert_eq!(value("other"), None);
        assert_eq!(value("k").as_deref(), Some(&b"snap"[..]));
        assert_eq!(
            value("fresh").as_deref(),
            Some(&b"f"[..]),
            "absence outlived the install"
        );
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
        snapshot_in(
            &sm.snapshot_dir,
            &meta(9),
            5,
            &[("k", b"from the snapshot")],
        );
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

    fn open_db(dir: &Path) -> Database {
        Database::builder(dir.join("db")).open().expect("db")
    }

    fn value_of(reader: &KvReader, key: &str) -> Option<Vec<u8>> {
        reader.get(key).unwrap().map(|r| r.value.clone())
    }

    /// An install lands in the next generation's keyspace and survives a
    /// restart; the keyspace it replaced is gone.
    #[tokio::test]
    async fn an_install_survives_a_restart_in_a_new_keyspace() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let db = open_db(dir.path());
            let mut sm = StateMachineStore::open(&db, dir.path()).expect("open");
            sm.apply([put_entry(1, "old", "o")]).await.unwrap();
            let pairs: [(&str, &[u8]); 2] = [("a", b"1"), ("b/c", b"2")];
            sm.install_snapshot(&meta(30), received(&meta(30), 12, &pairs))
                .await
                .unwrap();
            assert_eq!(value_of(&sm.reader(), "b/c").as_deref(), Some(&b"2"[..]));
            sm.apply([put_entry(31, "after", "x")]).await.unwrap();
            db.persist(PersistMode::SyncData).unwrap();
        }
        let db = open_db(dir.path());
        assert!(db.keyspace_exists("kv-1") && !db.keyspace_exists("kv"));
        let sm = StateMachineStore::open(&db, dir.path()).expect("reopen");
        assert_eq!((sm.last_applied, sm.rev), (meta(31).last_log_id, 13));
        let reader = sm.reader();
        assert_eq!(value_of(&reader, "old"), None);
        assert_eq!(value_of(&reader, "a").as_deref(), Some(&b"1"[..]));
        assert_eq!(value_of(&reader, "after").as_deref(), Some(&b"x"[..]));
        assert_eq!(reader.list("").unwrap(), ["a", "after", "b/c"]);

        // A snapshot built from the installed keyspace holds it all.
        use openraft::RaftSnapshotBuilder;
        let mut sm = sm;
        let built = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(built.meta.last_log_id, meta(31).last_log_id);
        let (_, pairs) = PairReader::open(built.snapshot.into_std().await).unwrap();
        let keys: Vec<Vec<u8>> = pairs.map(|p| p.unwrap().0).collect();
        assert_eq!(keys, [&b"a"[..], b"after", b"b/c"]);
    }

    /// A crash after an install filled its keyspace but before the switch:
    /// the next open keeps the old key space, and the next install removes
    /// the interrupted one's keyspace.
    #[tokio::test]
    async fn a_crash_before_the_switch_leaves_the_old_key_space() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let db = open_db(dir.path());
            let mut sm = StateMachineStore::open(&db, dir.path()).expect("open");
            sm.apply([put_entry(1, "k", "v")]).await.unwrap();
            let other = tempfile::tempdir().expect("temp dir");
            let file = snapshot_in(other.path(), &meta(40), 3, &[("new", b"n")]);
            StateMachineStore::ingest(&db, 1, file).expect("ingest");
            db.persist(PersistMode::SyncData).unwrap();
        }
        let db = open_db(dir.path());
        assert!(
            db.keyspace_exists("kv-1"),
            "the interrupted install's keyspace"
        );
        let sm = StateMachineStore::open(&db, dir.path()).expect("reopen");
        assert!(
            db.keyspace_exists("kv-1"),
            "kept at open: fjall's newest keyspace (see the module docs)"
        );
        assert_eq!(sm.last_applied, meta(1).last_log_id);
        let reader = sm.reader();
        assert_eq!(value_of(&reader, "k").as_deref(), Some(&b"v"[..]));
        assert_eq!(value_of(&reader, "new"), None);

        // The next install does not use the stray's name, removes it once
        // its own keyspace is live, and what it installed, and applied
        // after it, is there after a restart.
        let mut sm = sm;
        let pairs: [(&str, &[u8]); 1] = [("new", b"n")];
        sm.install_snapshot(&meta(40), received(&meta(40), 3, &pairs))
            .await
            .unwrap();
        sm.apply([put_entry(41, "after", "x")]).await.unwrap();
        db.persist(PersistMode::SyncData).unwrap();
        assert!(db.keyspace_exists("kv-2") && !db.keyspace_exists("kv-1"));
        drop((sm, reader, db));
        let db = open_db(dir.path());
        let sm = StateMachineStore::open(&db, dir.path()).expect("reopen");
        assert_eq!(sm.last_applied, meta(41).last_log_id);
        let reader = sm.reader();
        assert_eq!(value_of(&reader, "new").as_deref(), Some(&b"n"[..]));
        assert_eq!(value_of(&reader, "after").as_deref(), Some(&b"x"[..]));
        assert_eq!(value_of(&reader, "k"), None);
    }

    /// Interrupted installs, each followed by restarts, never cost a later
    /// install its keyspace. fjall (3.1.13) recovers its sequence counter
    /// from the user keyspaces only, and hands out the id of a deleted
    /// keyspace again when that keyspace had the highest id: a keyspace
    /// created under such an id could be shadowed by its predecessor's
    /// deletion after a restart, and vanish (the node came back empty) or
    /// fail every later start ("should exist", in fjall's recovery).
    #[tokio::test]
    async fn installs_after_interrupted_ones_survive_restarts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let other = tempfile::tempdir().expect("temp dir");
        let mut index = 1;
        for round in 1..=6u64 {
            // Installs that fill their keyspace, then the process dies.
            for _ in 0..2 {
                let db = open_db(dir.path());
                let mut sm = StateMachineStore::open(&db, dir.path()).expect("open");
                let generation = sm.reserve_generation().expect("reserve");
                let file = snapshot_in(other.path(), &meta(1000 + round), 3, &[("lost", b"l")]);
                StateMachineStore::ingest(&db, generation, file).expect("ingest");
                db.persist(PersistMode::SyncData).unwrap();
            }
            // A start that only cleans up: the newest interrupted install's
            // keyspace stays (see the module docs), no other.
            {
                let db = open_db(dir.path());
                drop(StateMachineStore::open(&db, dir.path()).expect("open"));
                let kv = db.list_keyspace_names();
                let kv = kv.iter().filter(|n| is_kv_keyspace_name(n)).count();
                assert_eq!(kv, 2, "round {round}");
            }
            // A start that installs, applies, and stops.
            {
                let db = open_db(dir.path());
                let mut sm = StateMachineStore::open(&db, dir.path()).expect("open");
                index += 10;
                let key = format!("r{round}");
                let pairs: [(&str, &[u8]); 1] = [(&key, b"x")];
                sm.install_snapshot(&meta(index), received(&meta(index), round, &pairs))
                    .await
                    .unwrap();
                index += 1;
                sm.apply([put_entry(index, "after", "a")]).await.unwrap();
                db.persist(PersistMode::SyncData).unwrap();
            }
            let db = open_db(dir.path());
            let sm = StateMachineStore::open(&db, dir.path()).expect("reopen");
            assert_eq!(sm.last_applied, meta(index).last_log_id, "round {round}");
            let reader = sm.reader();
            assert_eq!(
                reader.list("").unwrap(),
                ["after".to_owned(), format!("r{round}")],
                "round {round}"
            );
        }
    }

    /// A live keyspace the storage engine lost (as fjall could, see the
    /// module docs) is rebuilt from the snapshot file, and the state machine
    /// says it applied only that far (openraft re-applies the log after
    /// it); with no snapshot file to rebuild from, the open fails.
    #[tokio::test]
    async fn a_lost_key_space_is_rebuilt_from_the_snapshot_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let db = open_db(dir.path());
            let mut sm = StateMachineStore::open(&db, dir.path()).expect("open");
            let pairs: [(&str, &[u8]); 1] = [("snap", b"s")];
            sm.install_snapshot(&meta(20), received(&meta(20), 7, &pairs))
                .await
                .unwrap();
            sm.apply([put_entry(21, "after", "a")]).await.unwrap();
            db.persist(PersistMode::SyncData).unwrap();
        }
        let lose_the_live_keyspace = || {
            let db = open_db(dir.path());
            let name = db
                .list_keyspace_names()
                .into_iter()
                .find(|n| is_kv_keyspace_name(n))
                .expect("a key-space keyspace");
            let live = db
                .keyspace(&name, fjall::KeyspaceCreateOptions::default)
                .unwrap();
            db.delete_keyspace(live).unwrap();
        };
        lose_the_live_keyspace();
        let db = open_db(dir.path());
        let sm = StateMachineStore::open(&db, dir.path()).expect("reopen");
        assert_eq!((sm.last_applied, sm.rev), (meta(20).last_log_id, 7));
        let reader = sm.reader();
        assert_eq!(reader.list("").unwrap(), ["snap"]);
        drop((sm, reader, db));

        // A rebuild that stops after it made the new, empty keyspace (killed,
        // or here: the file's pairs unreadable) must not leave that keyspace
        // trusted with the old applied index: the next start rebuilds again.
        lose_the_live_keyspace();
        let current = dir.path().join("snapshot").join(snapshot_file::CURRENT);
        let good = std::fs::read(&current).unwrap();
        let mut garbled = good.clone();
        garbled[16..20].fill(0xFF); // the first key's length
        std::fs::write(&current, &garbled).unwrap();
        let db = open_db(dir.path());
        assert!(
            StateMachineStore::open(&db, dir.path()).is_err(),
            "garbled pairs"
        );
        drop(db);
        // What it left on disk says nothing is applied, whatever became of
        // the keyspace it made.
        let applied_on_disk = {
            let db = open_db(dir.path());
            let meta = db
                .keyspace("sm_meta", fjall::KeyspaceCreateOptions::default)
                .unwrap();
            let bytes = meta.get(LAST_APPLIED).unwrap().expect("a record");
            rmp_serde::from_slice::<Option<LogId>>(&bytes).unwrap()
        };
        assert_eq!(applied_on_disk, None);
        std::fs::write(&current, &good).unwrap();
        let db = open_db(dir.path());
        let sm = StateMachineStore::open(&db, dir.path()).expect("reopen");
        assert_eq!((sm.last_applied, sm.rev), (meta(20).last_log_id, 7));
        assert_eq!(sm.reader().list("").unwrap(), ["snap"]);
        drop((sm, db));

        lose_the_live_keyspace();
        std::fs::remove_dir_all(dir.path().join("snapshot")).unwrap();
        let db = open_db(dir.path());
        let err = StateMachineStore::open(&db, dir.path())
            .err()
            .expect("nothing to rebuild from");
        assert!(err.to_string().contains("is gone"), "{err}");
    }

    /// Snapshot data that is not the snapshot it claims to be, or is
    /// garbled, is refused and changes nothing; a good one installs after.
    #[tokio::test]
    async fn a_bad_snapshot_is_refused_and_changes_nothing() {
        use tokio::io::AsyncWriteExt;

        let dir = tempfile::tempdir().expect("temp dir");
        let db = open_db(dir.path());
        let mut sm = StateMachineStore::open(&db, dir.path()).expect("open");
        sm.apply([put_entry(1, "k", "v")]).await.unwrap();
        let reader = sm.reader();
        let unchanged = |sm: &StateMachineStore| {
            assert_eq!(sm.last_applied, meta(1).last_log_id);
            assert_eq!(value_of(&reader, "k").as_deref(), Some(&b"v"[..]));
            assert_eq!(reader.applied_index(), 1);
            let current = snapshot_file::read_current_meta(&sm.snapshot_dir).unwrap();
            assert_eq!(current, None, "nothing published");
        };

        let other = received(&meta(50), 4, &[("x", b"1")]);
        let err = sm.install_snapshot(&meta(51), other).await.unwrap_err();
        assert!(err.to_string().contains("holds snapshot 1-50"), "{err}");
        unchanged(&sm);

        // The same snapshot with its second pair's record cut short.
        let whole = {
            let mut f = received(&meta(52), 4, &[("x", b"1"), ("y", b"2")]);
            let mut bytes = Vec::new();
            use tokio::io::AsyncReadExt;
            f.read_to_end(&mut bytes).await.unwrap();
            bytes
        };
        let meta_len = u64::from_be_bytes(whole[whole.len() - 8..].try_into().unwrap()) as usize;
        let pairs_end = whole.len() - 8 - meta_len;
        let mut garbled = whole[..pairs_end - 3].to_vec();
        garbled.extend_from_slice(&whole[pairs_end..]);
        let mut file = sm.begin_receiving_snapshot().await.unwrap();
        file.write_all(&garbled).await.unwrap();
        file.shutdown().await.unwrap();
        assert!(sm.install_snapshot(&meta(52), file).await.is_err());
        unchanged(&sm);

        let mut file = sm.begin_receiving_snapshot().await.unwrap();
        file.write_all(&whole).await.unwrap();
        file.shutdown().await.unwrap();
        sm.install_snapshot(&meta(52), file).await.unwrap();
        assert_eq!(value_of(&reader, "y").as_deref(), Some(&b"2"[..]));
        assert_eq!(value_of(&reader, "k"), None);
        assert_eq!(reader.applied_index(), 52);
    }

    /// The file a snapshot is received into becomes `current` by a rename
    /// (the same inode: no copy of the snapshot on disk), and a transfer
    /// given up leaves no file behind.
    #[tokio::test]
    async fn a_received_snapshot_is_published_without_a_copy() {
        use std::os::unix::fs::MetadataExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let dir = tempfile::tempdir().expect("temp dir");
        let db = open_db(dir.path());
        let mut sm = StateMachineStore::open(&db, dir.path()).expect("open");
        let mut bytes = Vec::new();
        received(&meta(30), 2, &[("a", b"1"), ("b", b"2")])
            .read_to_end(&mut bytes)
            .await
            .unwrap();
        let names = |sm: &StateMachineStore| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(&sm.snapshot_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };

        let mut given_up = sm.begin_receiving_snapshot().await.unwrap();
        given_up.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
        given_up.flush().await.unwrap();
        assert_eq!(names(&sm).len(), 1, "{:?}", names(&sm));
        let mut file = sm.begin_receiving_snapshot().await.unwrap();
        drop(given_up);
        assert_eq!(names(&sm).len(), 1, "the given-up file's name is gone");
        file.write_all(&bytes).await.unwrap();
        file.shutdown().await.unwrap();
        let inode = file.metadata().await.unwrap().ino();

        sm.install_snapshot(&meta(30), file).await.unwrap();
        assert_eq!(names(&sm), vec![snapshot_file::CURRENT.to_owned()]);
        let current = std::fs::metadata(sm.snapshot_dir.join(snapshot_file::CURRENT)).unwrap();
        assert_eq!(current.ino(), inode, "current is the received file itself");
        assert_eq!(value_of(&sm.reader(), "b").as_deref(), Some(&b"2"[..]));
        assert_eq!(sm.reader().applied_index(), 30);
    }

    /// A node of an older version sends `u64 revision | pairs` without the
    /// metadata: it installs, and becomes a `current` of this format.
    #[tokio::test]
    async fn a_snapshot_from_an_older_version_installs() {
        use tokio::io::AsyncWriteExt;

        let dir = tempfile::tempdir().expect("temp dir");
        let db = open_db(dir.path());
        let mut sm = StateMachineStore::open(&db, dir.path()).expect("open");
        let mut old = 8u64.to_be_bytes().to_vec();
        for (key, value) in [("a", b"1"), ("b", b"2")] {
            let rec = record(8, value);
            old.extend_from_slice(&(key.len() as u32).to_be_bytes());
            old.extend_from_slice(key.as_bytes());
            old.extend_from_slice(&(rec.len() as u32).to_be_bytes());
            old.extend_from_slice(&rec);
        }
        let mut file = sm.begin_receiving_snapshot().await.unwrap();
        file.write_all(&old).await.unwrap();
        file.shutdown().await.unwrap();
        sm.install_snapshot(&meta(60), file).await.unwrap();
        let reader = sm.reader();
        assert_eq!(value_of(&reader, "b").as_deref(), Some(&b"2"[..]));
        assert_eq!((reader.applied_index(), reader.revision_now()), (60, 8));
        let current = snapshot_file::read_current_meta(&sm.snapshot_dir).unwrap();
        assert_eq!(current, Some(meta(60)));
    }

    /// Large values travel through a build, a transfer in chunks written at
    /// offsets (as openraft's receiver does) and an install, byte for byte.
    #[tokio::test]
    async fn a_snapshot_of_large_values_round_trips_in_chunks() {
        use openraft::RaftSnapshotBuilder;
        use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

        let dir = tempfile::tempdir().expect("temp dir");
        let db = open_db(&dir.path().join("a"));
        let mut sm = StateMachineStore::open(&db, &dir.path().join("a")).expect("open");
        let big: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 1 << 20]).collect();
        let mut entries = Vec::new();
        for (i, value) in big.iter().enumerate() {
            let cmd = Command::Put {
                key: format!("blob/{i}"),
                value: value.clone(),
                content_type: Some("application/octet-stream".into()),
                precondition: Precondition::None,
            };
            entries.push(entry(i as u64 + 1, cmd));
        }
        for i in 0..500u64 {
            entries.push(put_entry(100 + i, &format!("small/{i:04}"), "s"));
        }
        sm.apply(entries).await.unwrap();
        let mut built = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();

        let target_dir = dir.path().join("b");
        let target_db = open_db(&target_dir);
        let mut target = StateMachineStore::open(&target_db, &target_dir).expect("open");
        let mut rx = target.begin_receiving_snapshot().await.unwrap();
        let len = built
            .snapshot
            .seek(std::io::SeekFrom::End(0))
            .await
            .unwrap();
        let chunk = 300 * 1024;
        // Chunks in order, the second one sent twice (a retried RPC).
        let mut offsets: Vec<u64> = (0..len).step_by(chunk).collect();
        offsets.insert(2, chunk as u64);
        for offset in offsets {
            let mut buf = vec![0u8; chunk.min((len - offset) as usize)];
            built
                .snapshot
                .seek(std::io::SeekFrom::Start(offset))
                .await
                .unwrap();
            built.snapshot.read_exact(&mut buf).await.unwrap();
            rx.seek(std::io::SeekFrom::Start(offset)).await.unwrap();
            rx.write_all(&buf).await.unwrap();
        }
        rx.shutdown().await.unwrap();
        target.install_snapshot(&built.meta, rx).await.unwrap();

        let reader = target.reader();
        assert_eq!(reader.applied_index(), 599);
        assert_eq!(reader.list("small/").unwrap().len(), 500);
        for (i, value) in big.iter().enumerate() {
            let record = reader.get(&format!("blob/{i}")).unwrap().expect("blob");
            assert!(record.value == *value, "blob {i}");
            assert_eq!(
                record.content_type.as_deref(),
                Some("application/octet-stream")
            );
        }
        let current = target
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("current");
        assert_eq!(current.meta, built.meta);
    }
}
