//! Snapshots and log purges by bytes, next to openraft's by entries.
//!
//! openraft 0.9 builds a snapshot every `snapshot_every` entries and keeps
//! `keep_behind_snapshot` entries behind it. Entries range from a few hundred
//! bytes to 4 MiB (a group-commit batch of large values), so counts alone
//! let the log on disk reach tens of gigabytes between snapshots in a store
//! of blobs. This task also asks for a snapshot once the log has taken
//! [`ByBytes::snapshot_every`] bytes since the last one, and after each
//! snapshot purges the log behind it down to [`ByBytes::keep_behind`] bytes
//! (openraft never purges past its snapshot, and a follower that needs the
//! purged entries gets the snapshot instead).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use super::log_store::LogStore;
use super::types::Raft;

/// The byte thresholds.
#[derive(Debug, Clone, Copy)]
pub struct ByBytes {
    /// Ask for a snapshot once this many bytes of entries were appended
    /// since the last one (0: never by bytes).
    pub snapshot_every: u64,
    /// Keep about this many bytes of entries behind a snapshot, at most
    /// (openraft's count may keep fewer).
    pub keep_behind: u64,
    /// openraft's count of entries kept behind a snapshot: the bytes are
    /// only looked at within it.
    pub keep_behind_entries: u64,
}

/// How often the task looks.
const EVERY: Duration = Duration::from_millis(500);

/// Runs until `stop` turns true.
pub async fn run(raft: Raft, log: LogStore, limits: ByBytes, mut stop: watch::Receiver<bool>) {
    let appended = log.appended_bytes();
    let mut metrics = raft.metrics();
    let mut snapshot = metrics.borrow().snapshot.map(|l| l.index);
    let mut since = appended.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (now_snapshot, purged) = {
            let m = metrics.borrow_and_update();
            (m.snapshot.map(|l| l.index), m.purged.map(|l| l.index))
        };
        let bytes = appended.load(Ordering::Relaxed);
        if now_snapshot != snapshot {
            snapshot = now_snapshot;
            since = bytes;
            if let Some(upto) = now_snapshot {
                purge_behind(&raft, &log, upto, purged, limits).await;
            }
        } else if limits.snapshot_every > 0 && bytes.saturating_sub(since) >= limits.snapshot_every
        {
            tracing::info!(
                bytes = bytes - since,
                "the log took its snapshot threshold in bytes: building a snapshot"
            );
            // Not again until this one lands (or as many bytes more).
            since = bytes;
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}

async fn purge_behind(
    raft: &Raft,
    log: &LogStore,
    upto: u64,
    purged: Option<u64>,
    limits: ByBytes,
) {
    let log = log.clone();
    let floor = upto
        .saturating_sub(limits.keep_behind_entries)
        .max(purged.unwrap_or(0));
    let point =
        tokio::task::spawn_blocking(move || log.purge_point(floor, upto, limits.keep_behind)).await;
    match point {
        Ok(Ok(Some(point))) if purged.is_none_or(|p| point > p) => {
            tracing::info!(
                upto = point,
                snapshot = upto,
                "purging the log behind the snapshot by bytes"
            );
            let _ = raft.trigger().purge_log(point).await;
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not size the log behind the snapshot"),
        Err(e) => tracing::warn!(error = %e, "sizing the log behind the snapshot panicked"),
    }
}
