//! Per-call limits on plugins: an epoch deadline for each hook and a memory
//! cap per instance. One ticker thread advances the engine's epoch every
//! millisecond; a call gets `deadline_ms` ticks before it is interrupted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::Engine;

/// Resource limits applied to every plugin call.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Deadline of `validate-write` (default 50 ms).
    pub validate: Duration,
    /// Deadline of `evaluate` (default 10 ms).
    pub evaluate: Duration,
    /// Deadline of `on-change` (default 100 ms).
    pub on_change: Duration,
    /// Deadline of `describe` when a plugin is loaded (default 1 s).
    pub describe: Duration,
    /// Linear memory cap per instance (default 32 MiB).
    pub memory_bytes: usize,
    /// Events an on-change queue holds before further events are dropped (and counted).
    pub on_change_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            validate: Duration::from_millis(50),
            evaluate: Duration::from_millis(10),
            on_change: Duration::from_millis(100),
            describe: Duration::from_secs(1),
            memory_bytes: 32 * 1024 * 1024,
            on_change_queue: 1024,
        }
    }
}

/// Length of one epoch tick.
pub const TICK: Duration = Duration::from_millis(1);

/// Deadline in epoch ticks for a duration (at least one tick).
pub fn ticks(d: Duration) -> u64 {
    (d.as_micros() / TICK.as_micros()).max(1) as u64
}

/// Advances the engine epoch every [`TICK`] until dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    /// Starts the ticker thread for `engine`.
    pub fn start(engine: Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })?;
        Ok(EpochTicker { stop })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
