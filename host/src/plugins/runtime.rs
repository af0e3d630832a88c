//! One wasmtime [`Engine`] per node and the plugins loaded into it: each
//! component is compiled once (and cached on disk across restarts), its
//! imports resolved once (`InstancePre`), and warm instances are pooled so a
//! call costs a function call, not an instantiation. Every call runs under
//! an epoch deadline and a memory cap; a trap or timeout discards the
//! instance and is counted, never propagated.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use super::bindings::{self, types};
use super::host_api::{HostState, LogRing, linker};
use super::limits::{Limits, Ticking, ticks};
use crate::raft::KvReader;

/// Warm instances kept per plugin.
const MAX_IDLE_INSTANCES: usize = 8;
/// Consecutive failed calls after which a plugin is reported unhealthy.
const UNHEALTHY_AFTER: u64 = 3;

/// Why a plugin call did not return normally.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    /// The call ran past its deadline and was interrupted.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The plugin trapped (panic, out of memory, unreachable, …).
    #[error("trapped: {0}")]
    Trap(String),
    /// The plugin could not be instantiated.
    #[error("could not instantiate: {0}")]
    Instantiate(String),
}

/// Loading a plugin failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// Creates the engine: component model, epoch interruption, pooling
/// allocator sized for plugin instances, compiled-code cache in `cache_dir`.
pub fn engine(limits: &Limits, cache_dir: Option<&Path>) -> Result<Engine, LoadError> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // Profiling aid: name JIT-compiled plugin functions for `perf`
    // (writes /tmp/perf-<pid>.map).
    if std::env::var_os("FLAGSTONE_WASM_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(256);
    pool.total_core_instances(512);
    pool.total_memories(512);
    pool.total_tables(512);
    pool.max_memory_size(limits.memory_bytes);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    if let Some(dir) = cache_dir {
        let mut cache_config = wasmtime::CacheConfig::new();
        cache_config.with_directory(dir);
        let cache = wasmtime::Cache::new(cache_config)
            .map_err(|e| LoadError(format!("compile cache: {e}")))?;
        config.cache(Some(cache));
    }
    Engine::new(&config).map_err(|e| LoadError(format!("wasmtime engine: {e}")))
}

/// Call counters of one plugin, as shown by `GET /v1/plugins`.
#[derive(Debug, Default)]
pub struct Stats {
    calls: AtomicU64,
    rejections: AtomicU64,
    traps: AtomicU64,
    timeouts: AtomicU64,
    dropped_events: AtomicU64,
    skipped_revisions: AtomicU64,
    nanos: AtomicU64,
    consecutive_failures: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatsView {
    /// Hook calls made.
    pub calls: u64,
    /// Writes this validator rejected (traps and timeouts included).
    pub rejections: u64,
    /// Calls that trapped.
    pub traps: u64,
    /// Calls interrupted by their deadline.
    pub timeouts: u64,
    /// on-change events dropped because the plugin's queue was full or the
    /// node's dispatch fell behind.
    pub dropped_events: u64,
    /// Revisions the on-change hook never saw because the node installed a
    /// snapshot that replaced them (whatever their keys: they are gone).
    pub skipped_revisions: u64,
    /// Mean wall time per call, in microseconds.
    pub mean_call_us: f64,
}

impl Stats {
    /// Current values.
    pub fn view(&self) -> StatsView {
        let calls = self.calls.load(Ordering::Relaxed);
        let nanos = self.nanos.load(Ordering::Relaxed);
        StatsView {
            calls,
            rejections: self.rejections.load(Ordering::Relaxed),
            traps: self.traps.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            dropped_events: self.dropped_events.load(Ordering::Relaxed),
            skipped_revisions: self.skipped_revisions.load(Ordering::Relaxed),
            mean_call_us: if calls == 0 {
                0.0
            } else {
                nanos as f64 / calls as f64 / 1000.0
            },
        }
    }

    /// Counts a rejected write.
    pub fn rejected(&self) {
        self.rejections.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts dropped on-change events.
    pub fn dropped(&self, n: u64) {
        self.dropped_events.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts revisions a snapshot install skipped.
    pub fn skipped(&self, n: u64) {
        self.skipped_revisions.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether the plugin failed its last few calls in a row.
    pub fn unhealthy(&self) -> bool {
        self.consecutive_failures.load(Ordering::Relaxed) >= UNHEALTHY_AFTER
    }

    /// Whether the plugin has never timed out and did not fail its last
    /// call: its calls can be trusted to return quickly.
    pub fn clean(&self) -> bool {
        self.timeouts.load(Ordering::Relaxed) == 0
            && self.consecutive_failures.load(Ordering::Relaxed) == 0
    }
}

type Warm = (Store<HostState>, bindings::Plugin);

/// Whether `prefix` is a prefix of `head` + `tail`.
fn prefix_of_joined(prefix: &str, head: &str, tail: &str) -> bool {
    match prefix.strip_prefix(head) {
        Some(rest) => tail.starts_with(rest),
        None => head.starts_with(prefix),
    }
}

/// Longest plugin name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// A plugin's name shows up in URLs, logs, metrics and thread names: it must
/// be non-empty, at most [`MAX_NAME_BYTES`], and free of whitespace and
/// control characters.
fn check_name(name: &str) -> Result<(), LoadError> {
    if name.is_empty() {
        return Err(LoadError("describe returned an empty name".into()));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(LoadError(format!(
            "describe returned a name of {} bytes (at most {MAX_NAME_BYTES})",
            name.len()
        )));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(LoadError(format!(
            "describe returned the name {name:?}: no spaces or control characters"
        )));
    }
    Ok(())
}

/// A loaded, described plugin with its instance pool.
pub struct LoadedPlugin {
    /// What the plugin said about itself.
    pub info: types::PluginInfo,
    /// Counters.
    pub stats: Stats,
    engine: Engine,
    ticking: Ticking,
    pre: bindings::PluginPre<HostState>,
    reader: KvReader,
    logs: LogRing,
    limits: Limits,
    name: Arc<str>,
    code_hash: u64,
    idle: Mutex<Vec<Warm>>,
}

impl LoadedPlugin {
    /// Compiles (or fetches from the cache) and links `wasm`, then calls
    /// `describe` on a first instance.
    pub fn load(
        engine: &Engine,
        ticking: Ticking,
        wasm: &[u8],
        reader: KvReader,
        logs: LogRing,
        limits: Limits,
    ) -> Result<Self, LoadError> {
        let component = Component::new(engine, wasm)
            .map_err(|e| LoadError(format!("not a valid component: {e:#}")))?;
        let linker = linker(engine).map_err(|e| LoadError(format!("linker: {e:#}")))?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError(format!("imports something flagstone does not grant: {e:#}")))?;
        let pre = bindings::PluginPre::new(instance_pre)
            .map_err(|e| LoadError(format!("not a flagstone plugin: {e:#}")))?;
        let mut plugin = LoadedPlugin {
            info: types::PluginInfo {
                name: String::new(),
                version: String::new(),
                key_prefixes: vec![],
                hooks: vec![],
            },
            stats: Stats::default(),
            engine: engine.clone(),
            ticking,
            pre,
            reader,
            logs,
            limits: limits.clone(),
            name: Arc::from("(loading)"),
            code_hash: {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                wasm.hash(&mut h);
                h.finish()
            },
            idle: Mutex::new(Vec::new()),
        };
        let info = plugin
            .call(limits.describe, |store, p| {
                p.flagstone_plugin_manifest().call_describe(store)
            })
            .map_err(|e| LoadError(format!("describe failed: {e}")))?;
        check_name(&info.name)?;
        plugin.name = Arc::from(info.name.as_str());
        // Instances created while describing carry the placeholder name in their logs.
        plugin.idle.lock().map(|mut v| v.clear()).ok();
        plugin.info = info;
        Ok(plugin)
    }

    /// A hash of the component's bytes: equal on every node running the same file.
    pub fn code_hash(&self) -> u64 {
        self.code_hash
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the plugin implements `hook`.
    pub fn has_hook(&self, hook: types::Hook) -> bool {
        self.info.hooks.contains(&hook)
    }

    /// Whether one of the plugin's prefixes matches `key`.
    pub fn matches(&self, key: &str) -> bool {
        self.info
            .key_prefixes
            .iter()
            .any(|p| key.starts_with(p.as_str()))
    }

    /// Whether one of the plugin's prefixes matches the key `head` + `tail`
    /// (without building it).
    pub fn matches_joined(&self, head: &str, tail: &str) -> bool {
        self.info
            .key_prefixes
            .iter()
            .any(|p| prefix_of_joined(p, head, tail))
    }

    fn instance(&self) -> Result<Warm, CallError> {
        if let Some(w) = self.idle.lock().ok().and_then(|mut v| v.pop()) {
            return Ok(w);
        }
        let state = HostState::new(
            self.reader.clone(),
            self.logs.clone(),
            self.name.clone(),
            self.limits.memory_bytes,
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        // Instantiation runs the component's start code: bound it too.
        store.set_epoch_deadline(ticks(self.limits.describe));
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| CallError::Instantiate(format!("{e:#}")))?;
        Ok((store, instance))
    }

    /// Runs one hook call on a warm instance under `deadline`.
    pub fn call<R>(
        &self,
        deadline: Duration,
        f: impl FnOnce(&mut Store<HostState>, &bindings::Plugin) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let started = Instant::now();
        // The epoch advances only while some call holds this.
        let _running = self.ticking.call();
        let (mut store, instance) = self.instance()?;
        store.set_epoch_deadline(ticks(deadline));
        let result = f(&mut store, &instance);
        let s = &self.stats;
        s.calls.fetch_add(1, Ordering::Relaxed);
        s.nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match result {
            Ok(r) => {
                s.consecutive_failures.store(0, Ordering::Relaxed);
                if let Ok(mut idle) = self.idle.lock()
                    && idle.len() < MAX_IDLE_INSTANCES
                {
                    idle.push((store, instance));
                }
                Ok(r)
            }
            Err(e) => {
                // The instance may be in any state: drop it.
                s.consecutive_failures.fetch_add(1, Ordering::Relaxed);
                if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                    s.timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(plugin = %self.name, ?deadline, "plugin call timed out");
                    Err(CallError::Timeout(deadline))
                } else {
                    s.traps.fetch_add(1, Ordering::Relaxed);
                    let msg = format!("{e:#}");
                    tracing::warn!(plugin = %self.name, error = %msg, "plugin trapped");
                    Err(CallError::Trap(msg))
                }
            }
        }
    }

    /// `validate-write`: `Ok(Err(reason))` is a rejection by the plugin.
    pub fn validate(&self, write: &types::Write) -> Result<Result<(), String>, CallError> {
        self.call(self.limits.validate, |store, p| {
            p.flagstone_plugin_validator()
                .call_validate_write(store, write)
        })
    }

    /// `evaluate`.
    pub fn evaluate(
        &self,
        flag_key: &str,
        context: &types::EvalContext,
    ) -> Result<Result<types::Evaluation, types::EvaluationError>, CallError> {
        self.call(self.limits.evaluate, |store, p| {
            p.flagstone_plugin_evaluator()
                .call_evaluate(store, flag_key, context)
        })
    }

    /// `on-change`.
    pub fn on_change(&self, change: &types::Change) -> Result<(), CallError> {
        self.call(self.limits.on_change, |store, p| {
            p.flagstone_plugin_reactor().call_on_change(store, change)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Stats, check_name, prefix_of_joined};

    #[test]
    fn plugin_names() {
        for ok in ["audit", "flag-schema", "my_plugin.v2", "é"] {
            assert!(check_name(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            " ",
            "audit\0",
            "a b",
            "tab\t",
            "line\n",
            &"x".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn prefix_of_joined_agrees_with_concatenation() {
        let prefixes = [
            "",
            "f",
            "flags/",
            "flags/a",
            "flags/ab",
            "flags/b",
            "feature_flags",
            "x",
        ];
        for p in prefixes {
            for tail in ["", "a", "ab", "abc", "b"] {
                let joined = format!("flags/{tail}");
                assert_eq!(
                    prefix_of_joined(p, "flags/", tail),
                    joined.starts_with(p),
                    "{p:?} vs {joined:?}"
                );
            }
        }
    }

    #[test]
    fn skipped_revisions_are_counted_apart_from_dropped_events() {
        let stats = Stats::default();
        stats.dropped(2);
        stats.skipped(3);
        stats.skipped(4);
        let view = stats.view();
        assert_eq!(view.dropped_events, 2);
        assert_eq!(view.skipped_revisions, 7);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["skipped_revisions"], 7, "{json}");
    }
}
