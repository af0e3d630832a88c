//! Per-call limits on plugins: an epoch deadline for each hook and a memory
//! cap per instance. One ticker thread advances the engine's epoch every
//! millisecond while a call runs (and sleeps otherwise); a call gets
//! `deadline_ms` ticks before it is interrupted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Advances the engine's epoch every [`TICK`] while a plugin call runs, and
/// sleeps while none does: an idle node does not wake up a thousand times a
/// second for nothing. Stops when dropped.
pub struct EpochTicker {
    shared: Arc<TickShared>,
}

/// Handle used by plugin calls to keep the ticker running ([`Ticking::call`]).
#[derive(Clone)]
pub struct Ticking(Arc<TickShared>);

struct TickShared {
    /// Low 32 bits: calls running now; high 32 bits: calls begun (wrapping),
    /// so the ticker also sees calls that began and ended within one tick.
    calls: AtomicU64,
    /// Set by the ticker thread before it parks.
    parked: AtomicBool,
    stop: AtomicBool,
    /// Epoch increments so far (for tests and metrics).
    ticks: AtomicU64,
    thread: std::thread::Thread,
}

const ONE_CALL: u64 = 1 | (1 << 32);

fn running(calls: u64) -> u64 {
    calls & 0xffff_ffff
}

impl EpochTicker {
    /// Starts the ticker thread for `engine`.
    pub fn start(engine: Engine) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<TickShared>>(1);
        let handle = std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                if let Ok(shared) = rx.recv() {
                    shared.run(&engine);
                }
            })?;
        let shared = Arc::new(TickShared {
            calls: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
            thread: handle.thread().clone(),
        });
        tx.send(shared.clone())
            .map_err(|_| std::io::Error::other("epoch thread exited at start"))?;
        Ok(EpochTicker { shared })
    }

    /// A handle for plugin calls.
    pub fn ticking(&self) -> Ticking {
        Ticking(self.shared.clone())
    }

    /// Epoch increments so far.
    pub fn ticks(&self) -> u64 {
        self.shared.ticks.load(Ordering::Relaxed)
    }
}

impl TickShared {
    fn run(&self, engine: &Engine) {
        let mut seen_begun = u64::MAX;
        while !self.stop.load(Ordering::Relaxed) {
            let calls = self.calls.load(Ordering::SeqCst);
            if running(calls) == 0 && calls >> 32 == seen_begun {
                // No call now and none began during the last tick: sleep
                // until one begins. `parked` is set before the second
                // look, so a call beginning meanwhile either is seen here
                // or sees `parked` and unparks this thread.
                self.parked.store(true, Ordering::SeqCst);
                if running(self.calls.load(Ordering::SeqCst)) == 0
                    && !self.stop.load(Ordering::SeqCst)
                {
                    std::thread::park();
                }
                self.parked.store(false, Ordering::SeqCst);
                continue;
            }
            seen_begun = calls >> 32;
            std::thread::sleep(TICK);
            engine.increment_epoch();
            self.ticks.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Ticking {
    /// Marks a plugin call as running until the guard drops, waking the
    /// ticker if it sleeps.
    pub fn call(&self) -> CallGuard<'_> {
        let before = self.0.calls.fetch_add(ONE_CALL, Ordering::SeqCst);
        if running(before) == 0 && self.0.parked.load(Ordering::SeqCst) {
            self.0.thread.unpark();
        }
        CallGuard(&self.0)
    }
}

/// A running plugin call (see [`Ticking::call`]).
pub struct CallGuard<'a>(&'a TickShared);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.thread.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (bounded) until `f` holds.
    fn wait_for(what: &str, f: impl Fn() -> bool) {
        for _ in 0..2000 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("timed out waiting for {what}");
    }

    #[test]
    fn ticks_only_while_a_call_runs() {
        let engine = Engine::default();
        let ticker = EpochTicker::start(engine).unwrap();
        let ticking = ticker.ticking();
        wait_for("the idle ticker to park", || {
            ticker.shared.parked.load(Ordering::SeqCst)
        });
        let idle = ticker.ticks();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(ticker.ticks(), idle, "the epoch moved with no call running");

        let call = ticking.call();
        wait_for("ticks during a call", || ticker.ticks() >= idle + 5);
        drop(call);
        wait_for("the ticker to park again", || {
            ticker.shared.parked.load(Ordering::SeqCst)
        });
        let after = ticker.ticks();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(ticker.ticks(), after);
    }

    #[test]
    fn many_short_calls_never_leave_a_running_call_unticked() {
        let engine = Engine::default();
        let ticker = EpochTicker::start(engine).unwrap();
        let ticking = ticker.ticking();
        // Calls begin and end from two threads while the ticker keeps
        // parking in between; a last call held open must still see ticks.
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for i in 0..20_000u32 {
                        let _g = ticking.call();
                        if i % 1000 == 0 {
                            std::thread::sleep(Duration::from_micros(1500));
                        }
                    }
                });
            }
        });
        let held = ticking.call();
        let now = ticker.ticks();
        wait_for("ticks during the held call", || ticker.ticks() >= now + 3);
        drop(held);
    }

    #[test]
    fn dropping_the_ticker_stops_its_thread() {
        let ticker = EpochTicker::start(Engine::default()).unwrap();
        let ticking = ticker.ticking();
        let _call = ticking.call();
        let shared = ticker.shared.clone();
        drop(ticker);
        wait_for("the thread to stop", || Arc::strong_count(&shared) == 2);
    }
}
