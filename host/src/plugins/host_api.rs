//! What a plugin can do: the `store` and `log` imports of the world, backed
//! by the node's local applied state, plus the minimum of WASI that Rust's
//! `wasm32-wasip2` std needs to start (`wasi:io`, `wasi:cli` with no
//! environment, no arguments and closed stdio). **Not linked at all:**
//! `wasi:filesystem`, `wasi:sockets`, `wasi:clocks`, `wasi:random` — a plugin
//! importing them fails to load, so file and network access are impossible by
//! construction, not merely denied.

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime::component::{HasData, Linker, ResourceTable};
use wasmtime::{Engine, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::bindings::{cli, io};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{self, log, store, types};
use super::sync_io::{SyncIo, SyncIoData};
use crate::keys::MAX_KEY_BYTES;
use crate::raft::KvReader;

/// How many plugin log lines a node keeps for `GET /v1/plugins/logs`.
pub const LOG_RING: usize = 512;
/// Longest plugin log message kept, in bytes; longer ones are cut (with a
/// note of the full length), so a plugin cannot fill the node's memory or
/// its log with a few calls.
pub const MAX_LOG_MESSAGE: usize = 4096;

/// One line a plugin logged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogLine {
    /// The plugin's name.
    pub plugin: String,
    /// `trace` … `error`.
    pub level: &'static str,
    /// What it said.
    pub message: String,
}

/// The most recent plugin log lines, shared by every instance.
pub type LogRing = Arc<std::sync::Mutex<std::collections::VecDeque<LogLine>>>;

/// Per-instance host state.
pub struct HostState {
    reader: KvReader,
    logs: LogRing,
    plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: StoreLimits,
    /// `store.revision` answers, valid while the store's revision counter
    /// stays at `revisions_at` (no change applied: no key's revision moved).
    revisions: HashMap<String, Option<u64>>,
    revisions_at: u64,
}

/// Most keys a plugin instance remembers revisions of between changes.
const REVISION_CACHE: usize = 1024;

impl HostState {
    /// State for an instance of `plugin` reading from `reader`, with its
    /// linear memory capped at `memory_bytes`.
    pub fn new(reader: KvReader, logs: LogRing, plugin: Arc<str>, memory_bytes: usize) -> Self {
        HostState {
            reader,
            logs,
            plugin,
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(memory_bytes)
                .instances(4)
                .tables(8)
                .memories(2)
                .trap_on_grow_failure(false)
                .build(),
            revisions: HashMap::new(),
            revisions_at: 0,
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl store::Host for HostState {
    fn get(&mut self, key: String) -> Option<types::Entry> {
        if key.len() > MAX_KEY_BYTES {
            return None; // no such key can be stored
        }
        let record = self.reader.get(&key).ok().flatten()?;
        Some(types::Entry {
            value: record.value.clone(),
            content_type: record.content_type.clone(),
            revision: record.revision,
        })
    }

    fn revision(&mut self, key: String) -> Option<u64> {
        // Plugins check this on every call to validate their caches; while
        // nothing was applied it cannot have changed, so skip the lookup.
        // (The counter moves only after an apply is visible in fjall.)
        let now = self.reader.revision_now();
        if now != self.revisions_at || self.revisions.len() >= REVISION_CACHE {
            self.revisions.clear();
            self.revisions_at = now;
        }
        if key.len() > MAX_KEY_BYTES {
            return None; // no such key can be stored; and not worth caching
        }
        if let Some(r) = self.revisions.get(&key) {
            return *r;
        }
        let r = self.reader.revision(&key).ok()?;
        self.revisions.insert(key, r);
        r
    }

    fn list(&mut self, prefix: String) -> Vec<String> {
        if prefix.len() > MAX_KEY_BYTES {
            return Vec::new();
        }
        self.reader.list(&prefix).unwrap_or_default()
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        let message = cut_message(message);
        let plugin = &*self.plugin;
        let level = match level {
            log::Level::Trace => {
                tracing::trace!(plugin, "{message}");
                "trace"
            }
            log::Level::Debug => {
                tracing::debug!(plugin, "{message}");
                "debug"
            }
            log::Level::Info => {
                tracing::info!(plugin, "{message}");
                "info"
            }
            log::Level::Warn => {
                tracing::warn!(plugin, "{message}");
                "warn"
            }
            log::Level::Error => {
                tracing::error!(plugin, "{message}");
                "error"
            }
        };
        if let Ok(mut ring) = self.logs.lock() {
            if ring.len() == LOG_RING {
                ring.pop_front();
            }
            ring.push_back(LogLine {
                plugin: plugin.to_owned(),
                level,
                message,
            });
        }
    }
}

/// `message`, cut to [`MAX_LOG_MESSAGE`] bytes at a character boundary.
fn cut_message(mut message: String) -> String {
    if message.len() <= MAX_LOG_MESSAGE {
        return message;
    }
    let full = message.len();
    message.truncate(message.floor_char_boundary(MAX_LOG_MESSAGE));
    message.push_str(&format!("… ({full} bytes)"));
    message
}

struct Io;
impl HasData for Io {
    type Data<'a> = &'a mut ResourceTable;
}

struct Own;
impl HasData for Own {
    type Data<'a> = &'a mut HostState;
}

/// The linker every plugin is instantiated with: the world's imports and the
/// WASI subset described in the module docs.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut l = Linker::new(engine);
    bindings::Plugin::add_to_linker::<HostState, Own>(&mut l, |s| s)?;
    io::error::add_to_linker::<HostState, Io>(&mut l, |s| &mut s.table)?;
    // Streams and polling that never block a thread (see `sync_io.rs`).
    wasmtime_wasi::p2::bindings::sync::io::poll::add_to_linker::<HostState, SyncIoData>(
        &mut l,
        |s| SyncIo(&mut s.table),
    )?;
    wasmtime_wasi::p2::bindings::sync::io::streams::add_to_linker::<HostState, SyncIoData>(
        &mut l,
        |s| SyncIo(&mut s.table),
    )?;
    use wasmtime_wasi::cli::{WasiCli, WasiCliCtxView, WasiCliView};
    fn cli_view(s: &mut HostState) -> WasiCliCtxView<'_> {
        s.cli()
    }
    cli::exit::add_to_linker::<HostState, WasiCli>(&mut l, cli_view)?;
    cli::environment::add_to_linker::<HostState, WasiCli>(&mut l, cli_view)?;
    cli::stdin::add_to_linker::<HostState, WasiCli>(&mut l, cli_view)?;
    cli::stdout::add_to_linker::<HostState, WasiCli>(&mut l, cli_view)?;
    cli::stderr::add_to_linker::<HostState, WasiCli>(&mut l, cli_view)?;
    cli::terminal_input::add_to_linker::<HostState, WasiCli>(&mut l, cli_view)?;
    cli::terminal_output::add_to_linker::<HostState, WasiCli>(&mut l, cli_view)?;
    cli::terminal_stdin::add_to_linker::<HostState, WasiCli>(&mut l, cli_view)?;
    cli::terminal_stdout::add_to_linker::<HostState, WasiCli>(&mut l, cli_view)?;
    cli::terminal_stderr::add_to_linker::<HostState, WasiCli>(&mut l, cli_view)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::{MAX_LOG_MESSAGE, cut_message};

    #[test]
    fn long_log_messages_are_cut_at_a_character_boundary() {
        assert_eq!(cut_message("short".into()), "short");
        let exact = "x".repeat(MAX_LOG_MESSAGE);
        assert_eq!(cut_message(exact.clone()), exact);
        // A 2-byte character straddles the limit: the cut falls before it.
        let long = format!("{}é{}", "x".repeat(MAX_LOG_MESSAGE - 1), "y".repeat(100));
        let cut = cut_message(long.clone());
        assert_eq!(
            cut,
            format!(
                "{}… ({} bytes)",
                "x".repeat(MAX_LOG_MESSAGE - 1),
                long.len()
            )
        );
    }
}
