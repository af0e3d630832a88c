//! The set of loaded plugins and how the node uses them: loading from
//! `--plugins-dir` (hot reload by polling the directory), running validators
//! before a proposal, dispatching committed changes to reactors off the apply
//! path, routing flag evaluations, and reporting status.
//!
//! Reactors see every change the node commits, unless they fall behind
//! (events dropped and counted) or the node installs a snapshot: that replaces
//! the key space and skips revisions, whose changes cannot be delivered; the
//! skipped range is logged and counted (`skipped_revisions`).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use wasmtime::Engine;

use super::bindings::types;
use super::host_api::{LogLine, LogRing};
use super::limits::{EpochTicker, Limits};
use super::runtime::{CallError, LoadError, LoadedPlugin, Stats, StatsView, engine};
use crate::flags::{FEATURE_FLAGS, FLAGS_PREFIX};
use crate::raft::history::{Continuity, gap_len};
use crate::raft::{Change, KvReader};

/// A validator's verdict that stops a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Plugin name.
    pub plugin: String,
    /// The plugin's reason (or what went wrong with the call).
    pub message: String,
}

/// Who validates writes to a key ([`PluginHost::validators_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validators {
    /// No plugin validates the key.
    None,
    /// Every validator of the key has a clean record.
    Clean,
    /// Some validator of the key timed out once or failed its last call.
    Suspect,
}

/// Whether `p` validates writes to `key`.
fn validates(p: &LoadedPlugin, key: &str) -> bool {
    p.has_hook(types::Hook::ValidateWrite) && p.matches(key)
}

/// An evaluation as answered by a plugin, or a typed error.
pub type EvalResult = Result<(String, types::Evaluation), types::EvaluationError>;

/// A file's modification time and length: a change to either is a change.
type Stamp = (SystemTime, u64);

struct Active {
    plugin: Arc<LoadedPlugin>,
    file: PathBuf,
    /// The stamp of the contents this plugin was loaded from.
    stamp: Stamp,
    /// Newer contents of the file that did not load, and why (the plugin
    /// above keeps running: [`PluginHost::rescan`]).
    rejected: Option<(Stamp, String)>,
    /// Sender into this plugin's on-change worker (None: no on-change hook).
    /// Weak references: the change history holds the changes (and bounds
    /// their bytes); one it dropped before the worker got to it is lost.
    reactor: Option<SyncSender<Weak<Change>>>,
}

#[derive(Default)]
struct PluginSet {
    /// By plugin name: validators run in this order.
    active: BTreeMap<String, Active>,
    /// Files that failed to load, with the reason.
    broken: BTreeMap<PathBuf, (Stamp, String)>,
    /// The active plugins in name order, shared with callers (rebuilt on
    /// every change, so a hook call clones one `Arc`, not a list).
    ordered: Arc<[Arc<LoadedPlugin>]>,
}

/// One entry of `GET /v1/plugins`.
#[derive(Debug, Clone, Serialize)]
pub struct PluginStatus {
    /// Plugin name (file name for a broken one).
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// The file it was loaded from.
    pub file: String,
    /// Hooks implemented.
    pub hooks: Vec<&'static str>,
    /// Key prefixes.
    pub prefixes: Vec<String>,
    /// `ok`, `unhealthy` (recent calls failed), `stale` (the file changed
    /// and does not load; the version loaded before runs) or `broken` (did
    /// not load).
    pub state: &'static str,
    /// Why it is broken or stale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<StatsView>,
}

fn hook_name(h: &types::Hook) -> &'static str {
    match h {
        types::Hook::ValidateWrite => "validate-write",
        types::Hook::OnChange => "on-change",
        types::Hook::Evaluate => "evaluate",
    }
}

/// The node's plugins.
pub struct PluginHost {
    engine: Engine,
    ticker: EpochTicker,
    limits: Limits,
    reader: KvReader,
    logs: LogRing,
    dir: PathBuf,
    set: RwLock<PluginSet>,
}

impl PluginHost {
    /// Creates the host for `dir` (compiled code cached in `cache_dir`) and
    /// loads what is there; broken files are reported, not fatal.
    pub fn new(
        dir: &Path,
        cache_dir: Option<&Path>,
        reader: KvReader,
        limits: Limits,
    ) -> Result<Arc<Self>, LoadError> {
        let engine = engine(&limits, cache_dir)?;
        let ticker = EpochTicker::start(engine.clone())
            .map_err(|e| LoadError(format!("epoch thread: {e}")))?;
        let host = Arc::new(PluginHost {
            engine,
            ticker,
            limits,
            reader,
            logs: LogRing::default(),
            dir: dir.to_owned(),
            set: RwLock::new(PluginSet::default()),
        });
        host.rescan();
        Ok(host)
    }

    /// The plugin set. A panic while it was held (a bug) leaves the lock
    /// poisoned; the set is still the last one built, and reading "no
    /// plugins" instead would let every write through unvalidated.
    fn read_set(&self) -> RwLockReadGuard<'_, PluginSet> {
        self.set.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_set(&self) -> RwLockWriteGuard<'_, PluginSet> {
        self.set.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn snapshot(&self) -> Arc<[Arc<LoadedPlugin>]> {
        self.read_set().ordered.clone()
    }

    /// Loaded plugins in name order.
    pub fn plugins(&self) -> Vec<Arc<LoadedPlugin>> {
        self.snapshot().to_vec()
    }

    /// Looks at the directory and loads added or changed `.wasm` files,
    /// unloads removed ones. Returns whether anything changed.
    ///
    /// A changed file whose new contents do not load (half-copied, or a bad
    /// build) leaves its previous version running, reported as `stale`:
    /// dropping it would let every write to its keys through unvalidated
    /// until the file is fixed. A new file that does not load is `broken`.
    /// Files are loaded without holding the plugin set, so hook calls go on
    /// meanwhile.
    pub fn rescan(&self) -> bool {
        let found = self.scan_dir();
        // Files whose current contents were not tried yet.
        let to_load: Vec<(PathBuf, Stamp)> = {
            let set = self.read_set();
            found
                .iter()
                .filter(|(file, stamp)| {
                    let tried = set.active.values().any(|a| {
                        a.file == **file
                            && (a.stamp == **stamp
                                || a.rejected.as_ref().is_some_and(|(s, _)| s == *stamp))
                    }) || set.broken.get(*file).is_some_and(|(s, _)| s == *stamp);
                    !tried
                })
                .map(|(file, stamp)| (file.clone(), *stamp))
                .collect()
        };
        let loaded: Vec<_> = to_load
            .into_iter()
            .map(|(file, stamp)| {
                let result = self.load_file(&file).map_err(|e| e.0);
                (file, stamp, result)
            })
            .collect();

        let mut set = self.write_set();
        let before = (set.active.len(), set.broken.len());
        // Removed files take their plugins with them; a broken file that
        // changed is in `loaded`.
        set.active.retain(|_, a| found.contains_key(&a.file));
        set.broken
            .retain(|f, (stamp, _)| found.get(f) == Some(stamp));
        let mut changed = (set.active.len(), set.broken.len()) != before;
        // A file changed back to the contents that are running.
        for a in set.active.values_mut() {
            if found.get(&a.file) == Some(&a.stamp) && a.rejected.take().is_some() {
                changed = true;
            }
        }
        for (file, stamp, result) in loaded {
            changed = true;
            let previous = set
                .active
                .iter()
                .find(|(_, a)| a.file == file)
                .map(|(name, _)| name.clone());
            let result = result.and_then(|plugin| match set.active.get(plugin.name()) {
                Some(other) if other.file != file => Err(format!(
                    "plugin name {:?} is already used by {}",
                    plugin.name(),
                    other.file.display()
                )),
                _ => Ok(plugin),
            });
            match (result, previous) {
                (Ok(plugin), previous) => {
                    if let Some(previous) = previous {
                        set.active.remove(&previous);
                    }
                    let name = plugin.name().to_owned();
                    tracing::info!(plugin = %name, version = %plugin.info.version, file = %file.display(), "plugin loaded");
                    let plugin = Arc::new(plugin);
                    let reactor = self.start_reactor(&plugin);
                    set.active.insert(
                        name,
                        Active {
                            plugin,
                            file,
                            stamp,
                            rejected: None,
                            reactor,
                        },
                    );
                }
                (Err(error), Some(previous)) => {
                    tracing::error!(file = %file.display(), %error, plugin = %previous, "the changed plugin file does not load; its previous version keeps running");
                    if let Some(a) = set.active.get_mut(&previous) {
                        a.rejected = Some((stamp, error));
                    }
                }
                (Err(error), None) => {
                    tracing::error!(file = %file.display(), %error, "plugin failed to load");
                    set.broken.insert(file, (stamp, error));
                }
            }
        }
        if changed {
            set.ordered = set.active.values().map(|a| a.plugin.clone()).collect();
        }
        changed
    }

    /// The `.wasm` files of the plugins directory and their stamps.
    fn scan_dir(&self) -> BTreeMap<PathBuf, Stamp> {
        let mut found = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_some_and(|x| x == "wasm")
                    && let Ok(meta) = e.metadata()
                    && meta.is_file()
                {
                    let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.insert(path, (modified, meta.len()));
                }
            }
        }
        found
    }

    fn load_file(&self, file: &Path) -> Result<LoadedPlugin, LoadError> {
        let wasm = std::fs::read(file)
            .map_err(|e| LoadError(format!("reading {}: {e}", file.display())))?;
        LoadedPlugin::load(
            &self.engine,
            self.ticker.ticking(),
            &wasm,
            self.reader.clone(),
            self.logs.clone(),
            self.limits.clone(),
        )
    }

    /// Starts the worker thread that feeds this plugin's on-change hook, in
    /// commit order, from a bounded queue.
    fn start_reactor(&self, plugin: &Arc<LoadedPlugin>) -> Option<SyncSender<Weak<Change>>> {
        if !plugin.has_hook(types::Hook::OnChange) {
            return None;
        }
        let (tx, rx) = sync_channel::<Weak<Change>>(self.limits.on_change_queue);
        let p = plugin.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("on-change-{}", p.name()))
            .spawn(move || {
                while let Ok(change) = rx.recv() {
                    let Some(change) = change.upgrade() else {
                        p.stats.dropped(1);
                        tracing::warn!(plugin = %p.name(), "on-change worker fell behind the change history; event dropped");
                        continue;
                    };
                    let c = types::Change {
                        key: change.key.clone(),
                        old_value: change.old.as_ref().map(|r| r.value.clone()),
                        new_value: change.new.as_ref().map(|r| r.value.clone()),
                        revision: change.revision,
                    };
                    // Failures are counted and logged by `call`.
                    let _ = p.on_change(&c);
                }
            });
        spawned.ok().map(|_| tx)
    }

    /// Polls the directory every `every` until the returned task is aborted.
    pub fn watch_dir(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let host = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(h) = host.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || h.rescan()).await;
            }
        })
    }

    /// Feeds committed changes to reactors until the change stream closes.
    /// Changes re-applied while the node replays its log at startup were
    /// delivered before the restart and are skipped. Revisions a snapshot
    /// install skipped are logged and counted.
    pub fn dispatch_changes(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let mut rx = self.reader.subscribe();
        // Read after subscribing: every later revision arrives, so the first
        // change is never mistaken for a gap.
        let mut seen = Continuity::after(self.reader.revision_now());
        let host = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let event = rx.recv().await;
                let Some(h) = host.upgrade() else { return };
                match event {
                    Ok(change) => {
                        if let Some(gap) = seen.skipped_before(change.revision) {
                            h.skipped(gap);
                        }
                        if !change.replayed {
                            h.deliver(change);
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        seen.lost();
                        tracing::warn!(dropped = n, "on-change dispatch lagged; events dropped");
                        h.reactor_stats(|s| s.dropped(n));
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        })
    }

    /// Applies `f` to the counters of every plugin with an on-change hook.
    fn reactor_stats(&self, f: impl Fn(&Stats)) {
        for p in self.snapshot().iter() {
            if p.has_hook(types::Hook::OnChange) {
                f(&p.stats);
            }
        }
    }

    /// Reports revisions a snapshot install replaced: no reactor saw them.
    fn skipped(&self, gap: RangeInclusive<u64>) {
        let n = gap_len(&gap);
        tracing::warn!(
            from = gap.start(),
            to = gap.end(),
            skipped = n,
            "a snapshot install replaced changes; on-change plugins never saw them"
        );
        self.reactor_stats(|s| s.skipped(n));
    }

    fn deliver(&self, change: Arc<Change>) {
        let set = self.read_set();
        for a in set.active.values() {
            let Some(tx) = &a.reactor else { continue };
            if !a.plugin.matches(&change.key) {
                continue;
            }
            match tx.try_send(Arc::downgrade(&change)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    a.plugin.stats.dropped(1);
                    tracing::warn!(plugin = %a.plugin.name(), revision = change.revision, "on-change queue full; event dropped");
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }

    /// Who validates writes to `key`: nobody (the caller can skip building
    /// the write record), only plugins with a clean record (never timed out,
    /// last call fine: safe to call on an async worker), or some other.
    pub fn validators_of(&self, key: &str) -> Validators {
        let mut found = Validators::None;
        for p in self.snapshot().iter().filter(|p| validates(p, key)) {
            if !p.stats.clean() {
                return Validators::Suspect;
            }
            found = Validators::Clean;
        }
        found
    }

    /// Runs every matching validator, in name order. The first rejection wins;
    /// a trap or a timeout rejects too (fail closed).
    pub fn validate(&self, write: &types::Write) -> Result<(), Rejection> {
        for p in self.snapshot().iter() {
            if !validates(p, &write.key) {
                continue;
            }
            let message = match p.validate(write) {
                Ok(Ok(())) => continue,
                Ok(Err(reason)) => reason,
                Err(CallError::Timeout(d)) => {
                    format!("validator timed out after {d:?}; write rejected")
                }
                Err(e) => format!("validator failed ({e}); write rejected"),
            };
            p.stats.rejected();
            return Err(Rejection {
                plugin: p.name().to_owned(),
                message,
            });
        }
        Ok(())
    }

    /// Evaluates `flag_key` with the evaluators that care about it (a prefix
    /// matching `flags/<key>` or `feature_flags`), in name order; the first
    /// answer other than FLAG_NOT_FOUND wins.
    pub fn evaluate(&self, flag_key: &str, context: &types::EvalContext) -> EvalResult {
        let mut last = None;
        for p in self.snapshot().iter() {
            if !p.has_hook(types::Hook::Evaluate)
                || !(p.matches_joined(FLAGS_PREFIX, flag_key) || p.matches(FEATURE_FLAGS))
            {
                continue;
            }
            match p.evaluate(flag_key, context) {
                Ok(Ok(e)) => return Ok((p.name().to_owned(), e)),
                Ok(Err(e)) if e.code == types::ErrorCode::FlagNotFound => last = Some(e),
                Ok(Err(e)) => return Err(e),
                Err(e) => {
                    return Err(types::EvaluationError {
                        code: types::ErrorCode::General,
                        message: format!("evaluator {} failed: {e}", p.name()),
                    });
                }
            }
        }
        Err(last.unwrap_or_else(|| types::EvaluationError {
            code: types::ErrorCode::FlagNotFound,
            message: format!("no evaluator knows flag {flag_key:?}"),
        }))
    }

    /// The most recent lines plugins logged, oldest first.
    pub fn recent_logs(&self) -> Vec<LogLine> {
        self.logs
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Status of every plugin, loaded and broken.
    pub fn status(&self) -> Vec<PluginStatus> {
        let set = self.read_set();
        let mut out: Vec<PluginStatus> = set
            .active
            .values()
            .map(|a| PluginStatus {
                name: a.plugin.name().to_owned(),
                version: a.plugin.info.version.clone(),
                file: a.file.display().to_string(),
                hooks: a.plugin.info.hooks.iter().map(hook_name).collect(),
                prefixes: a.plugin.info.key_prefixes.clone(),
                state: if a.rejected.is_some() {
                    "stale"
                } else if a.plugin.stats.unhealthy() {
                    "unhealthy"
                } else {
                    "ok"
                },
                error: a.rejected.as_ref().map(|(_, error)| {
                    format!("the file changed and does not load: {error}; the version loaded before keeps running")
                }),
                counters: Some(a.plugin.stats.view()),
            })
            .collect();
        out.extend(set.broken.iter().map(|(file, (_, err))| {
            PluginStatus {
                name: file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                version: String::new(),
                file: file.display().to_string(),
                hooks: vec![],
                prefixes: vec![],
                state: "broken",
                error: Some(err.clone()),
                counters: None,
            }
        }));
        out
    }
}
