//! The machine's floor: what a durable write costs here with no server
//! software in the way, so the 1-client rows can be read against it.
//!
//! - [`fdatasync`]: one writer appends 300 bytes to a preallocated file and
//!   `fdatasync`s it, over and over (the disk alone).
//! - [`replicated_write`]: the least any Raft write can do on three nodes — a
//!   client sends 300 bytes to a leader; the leader sends the entry to two
//!   followers over loopback TCP and meanwhile appends it to its own log and
//!   `fdatasync`s; each follower appends, `fdatasync`s and acknowledges; the
//!   leader answers the client once its own flush and one follower's
//!   acknowledgement are in (a majority on disk). Plain threads, blocking
//!   sockets, `TCP_NODELAY`, logs preallocated with `set_len` as fjall's
//!   journal is; no parsing, no framing beyond a fixed size, no batching.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Bytes per entry (a 12-byte key, a 256-byte value and some framing).
const ENTRY: usize = 300;
/// Each log file is preallocated to this size (sparse).
const LOG_BYTES: u64 = 64 << 20;
/// No socket waits longer than this: a stuck peer fails the measurement.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A floor measurement: its work directory, warm-up and measured time.
pub type Measure = fn(&Path, Duration, Duration) -> Result<Floor>;

/// Throughput and latency of one floor measurement.
pub struct Floor {
    /// Operations per second over the measured time.
    pub ops_per_sec: f64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
}

/// A log file of [`LOG_BYTES`] under `dir`, written at increasing offsets.
struct Log {
    file: File,
    offset: u64,
}

impl Log {
    fn create(path: &Path) -> Result<Log> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("create {}", path.display()))?;
        file.set_len(LOG_BYTES)?;
        file.sync_all()?;
        Ok(Log { file, offset: 0 })
    }

    /// Appends `entry` (wrapping around at the end) and makes it durable.
    fn append(&mut self, entry: &[u8]) -> Result<()> {
        if self.offset + entry.len() as u64 > LOG_BYTES {
            self.offset = 0;
        }
        self.file.write_all_at(entry, self.offset)?;
        self.offset += entry.len() as u64;
        self.file.sync_data()?;
        Ok(())
    }
}

/// Times `op` in a closed loop: `warmup` unrecorded, then `measure`.
fn closed_loop(
    warmup: Duration,
    measure: Duration,
    mut op: impl FnMut() -> Result<()>,
) -> Result<Floor> {
    let mut hist = crate::load::latency_histogram()?;
    let start = Instant::now();
    let (measured_from, until) = (start + warmup, start + warmup + measure);
    let mut n = 0u64;
    loop {
        let t = Instant::now();
        if t >= until {
            break;
        }
        op()?;
        if t >= measured_from {
            hist.record(t.elapsed().as_micros().max(1) as u64)?;
            n += 1;
        }
    }
    Ok(Floor {
        ops_per_sec: n as f64 / measure.as_secs_f64(),
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
    })
}

/// One writer: append 300 bytes, `fdatasync`, repeat.
pub fn fdatasync(dir: &Path, warmup: Duration, measure: Duration) -> Result<Floor> {
    let mut log = Log::create(&dir.join("floor-alone.log"))?;
    let entry = [b'e'; ENTRY];
    closed_loop(warmup, measure, || log.append(&entry))
}

fn nodelay(stream: &TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(())
}

/// A follower: every entry (an 8-byte index, then [`ENTRY`] bytes) is
/// appended and flushed, then its index is sent back. Ends when the leader
/// closes the connection.
fn follower(listener: TcpListener, mut log: Log) -> Result<()> {
    let (mut conn, _) = listener.accept()?;
    nodelay(&conn)?;
    let mut frame = [0u8; 8 + ENTRY];
    loop {
        match conn.read_exact(&mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        log.append(&frame[8..])?;
        conn.write_all(&frame[..8])?;
    }
}

/// The highest entry index any follower acknowledged.
#[derive(Default)]
struct Acked {
    index: Mutex<u64>,
    moved: Condvar,
}

impl Acked {
    fn record(&self, index: u64) {
        if let Ok(mut i) = self.index.lock() {
            *i = (*i).max(index);
            self.moved.notify_all();
        }
    }

    /// Waits (at most `timeout`) until some follower acknowledged `index`.
    fn wait_for(&self, index: u64, timeout: Duration) -> Result<()> {
        let guard = self
            .index
            .lock()
            .map_err(|_| anyhow::anyhow!("ack lock poisoned"))?;
        let (guard, timeout) = self
            .moved
            .wait_timeout_while(guard, timeout, |i| *i < index)
            .map_err(|_| anyhow::anyhow!("ack lock poisoned"))?;
        if timeout.timed_out() && *guard < index {
            bail!("no follower acknowledged entry {index} within {timeout:?}");
        }
        Ok(())
    }
}

/// Reads a follower's acknowledgements until it closes the connection.
fn ack_reader(mut conn: TcpStream, acked: &Acked) {
    let mut index = [0u8; 8];
    while conn.read_exact(&mut index).is_ok() {
        acked.record(u64::from_be_bytes(index));
    }
}

/// The leader: per client request, sends the entry to both followers,
/// appends and flushes it itself, waits for one acknowledgement, answers.
fn leader(
    listener: TcpListener,
    mut log: Log,
    mut followers: Vec<TcpStream>,
    acked: &Acked,
) -> Result<()> {
    let (mut client, _) = listener.accept()?;
    nodelay(&client)?;
    let mut frame = [0u8; 8 + ENTRY];
    for index in 1u64.. {
        match client.read_exact(&mut frame[8..]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        frame[..8].copy_from_slice(&index.to_be_bytes());
        for f in &mut followers {
            f.write_all(&frame)?;
        }
        log.append(&frame[8..])?;
        acked.wait_for(index, IO_TIMEOUT)?;
        client.write_all(b"k")?;
    }
    // The ack readers hold clones of these sockets: only a shutdown tells
    // the followers that no entry follows.
    for f in &followers {
        f.shutdown(Shutdown::Write)?;
    }
    Ok(())
}

/// The 3-node floor (see the module docs), one client in a closed loop.
pub fn replicated_write(dir: &Path, warmup: Duration, measure: Duration) -> Result<Floor> {
    let bind = || TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0");
    let acked = Arc::new(Acked::default());
    let leader_listener = bind()?;
    let leader_addr = leader_listener.local_addr()?;
    let leader_log = Log::create(&dir.join("floor-leader.log"))?;
    // Every connection is made before the thread that accepts it starts, so
    // no thread can be left waiting in `accept` if a step fails.
    std::thread::scope(|s| -> Result<Floor> {
        let mut follower_threads = Vec::new();
        let mut to_followers = Vec::new();
        for i in 0..2 {
            let listener = bind()?;
            let conn = TcpStream::connect(listener.local_addr()?)?;
            nodelay(&conn)?;
            let reader = conn.try_clone()?;
            let log = Log::create(&dir.join(format!("floor-follower-{i}.log")))?;
            follower_threads.push(s.spawn(move || follower(listener, log)));
            let acked = acked.clone();
            s.spawn(move || ack_reader(reader, &acked));
            to_followers.push(conn);
        }
        let mut conn = TcpStream::connect(leader_addr)?;
        nodelay(&conn)?;
        let acked_for_leader = acked.clone();
        let leader_thread =
            s.spawn(move || leader(leader_listener, leader_log, to_followers, &acked_for_leader));
        let entry = [b'e'; ENTRY];
        let mut answer = [0u8; 1];
        let floor = closed_loop(warmup, measure, || {
            conn.write_all(&entry)?;
            conn.read_exact(&mut answer)?;
            Ok(())
        });
        // Closing the client ends the leader, whose follower connections
        // close in turn and end the followers and the ack readers.
        drop(conn);
        let joined = |h: std::thread::ScopedJoinHandle<'_, Result<()>>| {
            h.join()
                .map_err(|_| anyhow::anyhow!("floor thread panicked"))?
        };
        joined(leader_thread)?;
        for f in follower_threads {
            joined(f)?;
        }
        floor
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replicated_floor_answers_every_write_and_shuts_down() {
        let dir = tempfile::tempdir().unwrap();
        let f = replicated_write(dir.path(), Duration::ZERO, Duration::from_millis(200)).unwrap();
        assert!(
            f.ops_per_sec > 0.0 && f.p50_us > 0,
            "{} {}",
            f.ops_per_sec,
            f.p50_us
        );
        // Every entry reached all three logs (followers drain their
        // connection before they end).
        for name in [
            "floor-leader.log",
            "floor-follower-0.log",
            "floor-follower-1.log",
        ] {
            let mut first = [0u8; ENTRY];
            let file = File::open(dir.path().join(name)).unwrap();
            file.read_exact_at(&mut first, 0).unwrap();
            assert_eq!(first, [b'e'; ENTRY], "{name}");
        }
    }

    #[test]
    fn a_silent_follower_fails_the_wait_instead_of_hanging() {
        let acked = Acked::default();
        acked.record(3);
        let short = Duration::from_millis(50);
        assert!(acked.wait_for(3, short).is_ok());
        let started = Instant::now();
        // Nothing acknowledges 4: the wait gives up after its timeout.
        assert!(acked.wait_for(4, short).is_err());
        assert!(started.elapsed() >= short);
    }
}
