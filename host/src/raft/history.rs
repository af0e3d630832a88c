//! The recent history of applied changes, for watchers that resume from a
//! revision. Changes are appended and published under one lock, so a new
//! watcher gets the backlog and the live stream with no gap and no overlap.
//!
//! History is kept in memory, bounded by a number of changes and by the
//! bytes of their keys and values (values are up to 1 MiB: 10,000 changes of
//! blobs would be gigabytes): after a restart, only the changes the node
//! re-applies from its log as it starts and later ones are available, after a
//! snapshot install only later ones, and an older `since` is answered with
//! [`Compacted`].
//!
//! The history holds the only strong references to published changes: the
//! live channel and the plugins' on-change queues carry weak ones. So what
//! subscribers have not consumed yet is bounded by the same bytes (besides
//! the channel's count), not by their count times the largest value: a
//! subscriber that falls behind the history loses those changes and is told
//! so ([`ChangeReceiver::recv`] reports them as lagged), as one that falls
//! behind the channel is. The changes of the latest publish are always kept
//! until the next one, so a subscriber that keeps up loses nothing.
//!
//! [`Continuity`] follows a live stream's revisions and names the ones a
//! snapshot install skipped (reactor dispatch and OFREP events use it).

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::state_machine::Change;

/// Follows the revisions of a stream of changes (reactor dispatch, OFREP
/// events). They are contiguous, except across a snapshot install, which
/// replaces the key space and skips every revision in between.
#[derive(Debug)]
pub struct Continuity {
    /// The last revision seen; `None` after lost events, until the next one.
    last: Option<u64>,
}

impl Continuity {
    /// Follows on from revision `last`.
    pub fn after(last: u64) -> Self {
        Continuity { last: Some(last) }
    }

    /// Records `revision`; returns the revisions skipped right before it.
    pub fn skipped_before(&mut self, revision: u64) -> Option<RangeInclusive<u64>> {
        let gap = self
            .last
            .map(|last| last.saturating_add(1)..=revision.saturating_sub(1))
            .filter(|gap| !gap.is_empty());
        if self.last.is_none_or(|last| revision > last) {
            self.last = Some(revision);
        }
        gap
    }

    /// The stream lost events (`RecvError::Lagged`, reported on its own):
    /// the next change starts over rather than being reported as a gap too.
    pub fn lost(&mut self) {
        self.last = None;
    }
}

/// How many revisions `gap` holds.
pub fn gap_len(gap: &RangeInclusive<u64>) -> u64 {
    if gap.is_empty() {
        return 0;
    }
    (gap.end() - gap.start()).saturating_add(1)
}

/// Already-applied changes to replay, then the live stream of later ones.
pub type Resume = (Vec<Arc<Change>>, ChangeReceiver);

/// A subscriber's end of the live stream of changes.
#[derive(Debug)]
pub struct ChangeReceiver {
    rx: broadcast::Receiver<Weak<Change>>,
    /// A change found right after lost ones, returned by the next `recv`.
    pending: Option<Arc<Change>>,
}

impl ChangeReceiver {
    /// A channel of `capacity` outside any history (tests of subscribers:
    /// they keep the changes alive themselves).
    #[cfg(test)]
    pub fn test_channel(capacity: usize) -> (broadcast::Sender<Weak<Change>>, ChangeReceiver) {
        let (tx, rx) = broadcast::channel(capacity);
        (tx, ChangeReceiver { rx, pending: None })
    }

    /// The next change. `Lagged(n)`: `n` changes were lost, because the
    /// subscriber fell behind the channel or behind the history (which
    /// dropped them); the changes after them follow.
    pub async fn recv(&mut self) -> Result<Arc<Change>, RecvError> {
        if let Some(change) = self.pending.take() {
            return Ok(change);
        }
        let mut lost = 0;
        loop {
            let next = if lost == 0 {
                self.rx.recv().await
            } else {
                // Count every lost change already queued, as one report.
                match self.rx.try_recv() {
                    Ok(weak) => Ok(weak),
                    Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                    Err(TryRecvError::Empty | TryRecvError::Closed) => {
                        return Err(RecvError::Lagged(lost));
                    }
                }
            };
            match next {
                Ok(weak) => match weak.upgrade() {
                    Some(change) if lost == 0 => return Ok(change),
                    Some(change) => {
                        self.pending = Some(change);
                        return Err(RecvError::Lagged(lost));
                    }
                    None => lost += 1,
                },
                Err(RecvError::Lagged(n)) => lost += n,
                Err(RecvError::Closed) => return Err(RecvError::Closed),
            }
        }
    }
}

/// Changes kept for resuming watchers, by default.
pub const DEFAULT_HISTORY: usize = 10_000;

/// Bytes of keys and values (old and new) kept for resuming watchers, by
/// default.
pub const DEFAULT_HISTORY_BYTES: usize = 64 * 1024 * 1024;

/// Bytes a change is charged besides its key and values.
const CHANGE_OVERHEAD: usize = 128;

/// What keeping `change` costs, counted against the byte bound.
fn weight(change: &Change) -> usize {
    let value = |r: &Option<Arc<super::types::ValueRecord>>| {
        r.as_ref().map_or(0, |r| {
            r.value.len() + r.content_type.as_ref().map_or(0, String::len)
        })
    };
    change.key.len() + value(&change.old) + value(&change.new) + CHANGE_OVERHEAD
}

/// The requested revision is older than the history kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("revision {requested} is compacted; changes are available after revision {horizon}")]
pub struct Compacted {
    /// What the watcher asked to resume after.
    pub requested: u64,
    /// Every change after this revision is available.
    pub horizon: u64,
}

struct Inner {
    changes: VecDeque<Arc<Change>>,
    capacity: usize,
    max_bytes: usize,
    /// The weight of `changes`.
    bytes: usize,
    /// Every change with a revision above this is in `changes` (or live).
    horizon: u64,
}

/// Shared history + publisher of applied changes.
#[derive(Clone)]
pub struct History {
    inner: Arc<Mutex<Inner>>,
    live: broadcast::Sender<Weak<Change>>,
}

impl History {
    /// A history that knows nothing at or before `applied` and keeps up to
    /// `capacity` changes and [`DEFAULT_HISTORY_BYTES`]; live subscribers may
    /// lag by `channel` events.
    pub fn new(applied: u64, capacity: usize, channel: usize) -> Self {
        let (live, _) = broadcast::channel(channel.max(1));
        History {
            inner: Arc::new(Mutex::new(Inner {
                changes: VecDeque::new(),
                capacity: capacity.max(1),
                max_bytes: DEFAULT_HISTORY_BYTES,
                bytes: 0,
                horizon: applied,
            })),
            live,
        }
    }

    /// Changes how many changes, and how many bytes of their keys and
    /// values, are kept (whichever bound is reached first).
    pub fn set_capacity(&self, capacity: usize, max_bytes: usize) {
        if let Ok(mut h) = self.inner.lock() {
            h.capacity = capacity.max(1);
            h.max_bytes = max_bytes;
            trim(&mut h, 0);
        }
    }

    /// Replaces the live channel with one of `capacity` (existing
    /// subscribers keep the old one, which no longer receives anything).
    pub fn set_channel_capacity(&mut self, capacity: usize) {
        let (live, _) = broadcast::channel(capacity.max(1));
        self.live = live;
    }

    /// Records and publishes newly applied changes, in order. Older ones
    /// make room; these stay at least until the next publish.
    pub fn publish(&self, changes: Vec<Change>) {
        let Ok(mut h) = self.inner.lock() else { return };
        let new = changes.len();
        for change in changes {
            let change = Arc::new(change);
            h.bytes += weight(&change);
            // No receivers is fine: nobody is watching.
            let _ = self.live.send(Arc::downgrade(&change));
            h.changes.push_back(change);
        }
        trim(&mut h, new);
    }

    /// After a snapshot install at `index`: nothing at or before it is known.
    pub fn reset(&self, index: u64) {
        if let Ok(mut h) = self.inner.lock() {
            h.changes.retain(|c| c.revision > index);
            h.bytes = h.changes.iter().map(|c| weight(c)).sum();
            h.horizon = h.horizon.max(index);
        }
    }

    /// Subscribes from now on (no backlog).
    pub fn subscribe(&self) -> ChangeReceiver {
        ChangeReceiver {
            rx: self.live.subscribe(),
            pending: None,
        }
    }

    /// The changes after `since` that are already applied, and a receiver
    /// for every later one. `Err` if changes after `since` were dropped.
    pub fn watch_from(&self, since: u64) -> Result<Resume, Compacted> {
        let h = self.inner.lock().map_err(|_| Compacted {
            requested: since,
            horizon: u64::MAX,
        })?;
        if since < h.horizon {
            return Err(Compacted {
                requested: since,
                horizon: h.horizon,
            });
        }
        let backlog = h
            .changes
            .iter()
            .filter(|c| c.revision > since)
            .cloned()
            .collect();
        Ok((backlog, self.subscribe()))
    }
}

/// Drops the oldest changes until both bounds hold, but never the newest
/// `keep`.
fn trim(h: &mut Inner, keep: usize) {
    while (h.changes.len() > h.capacity || h.bytes > h.max_bytes) && h.changes.len() > keep {
        let Some(old) = h.changes.pop_front() else {
            break;
        };
        h.bytes -= weight(&old);
        h.horizon = h.horizon.max(old.revision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(revision: u64) -> Change {
        Change {
            revision,
            key: format!("k{revision}"),
            old: None,
            new: None,
            replayed: false,
        }
    }

    #[tokio::test]
    async fn resumes_without_gaps_and_reports_compaction() {
        let h = History::new(10, 3, 16);
        assert_eq!(h.watch_from(9).unwrap_err().horizon, 10);
        let (backlog, _rx) = h.watch_from(10).unwrap();
        assert!(backlog.is_empty());
        h.publish(vec![change(11), change(12), change(14)]);
        let (backlog, mut rx) = h.watch_from(11).unwrap();
        assert_eq!(
            backlog.iter().map(|c| c.revision).collect::<Vec<_>>(),
            vec![12, 14]
        );
        h.publish(vec![change(15)]);
        assert_eq!(rx.recv().await.unwrap().revision, 15);
        // Capacity 3: 11 is gone, so resuming after 10 is refused, after 11 is fine.
        let compacted = h.watch_from(10).unwrap_err();
        assert_eq!(
            compacted,
            Compacted {
                requested: 10,
                horizon: 11
            }
        );
        let (backlog, _rx) = h.watch_from(11).unwrap();
        let revs: Vec<u64> = backlog.iter().map(|c| c.revision).collect();
        assert_eq!(revs, vec![12, 14, 15]);
        h.reset(20);
        assert_eq!(h.watch_from(15).unwrap_err().horizon, 20);
    }

    fn put(revision: u64, value_len: usize) -> Change {
        let record = Arc::new(super::super::types::ValueRecord {
            revision,
            create_revision: revision,
            version: 1,
            content_type: None,
            value: vec![0; value_len],
        });
        Change {
            new: Some(record),
            ..change(revision)
        }
    }

    /// Large values: the byte bound, not the count, decides what is kept.
    #[test]
    fn history_is_bounded_by_bytes_too() {
        let h = History::new(0, 1_000, 16);
        h.set_capacity(1_000, 3 * (1 << 20) + 3 * 200);
        for r in 1..=5 {
            h.publish(vec![put(r, 1 << 20)]);
        }
        // Three 1 MiB changes fit; 1 and 2 were dropped.
        assert_eq!(h.watch_from(1).unwrap_err().horizon, 2);
        let (backlog, _rx) = h.watch_from(2).unwrap();
        assert_eq!(backlog.len(), 3);
        // Small changes push out big ones until the bytes fit again.
        h.publish((6..=10).map(|r| put(r, 10)).collect());
        let (backlog, _rx) = h.watch_from(3).unwrap();
        assert_eq!(backlog.first().map(|c| c.revision), Some(4));
        // A change over the whole bound is kept until the next publish.
        h.publish(vec![put(11, 4 << 20)]);
        assert_eq!(h.watch_from(10).unwrap().0.len(), 1);
        h.publish(vec![put(12, 1)]);
        assert_eq!(h.watch_from(10).unwrap_err().horizon, 11);
        assert_eq!(h.watch_from(11).unwrap().0.len(), 1);
        // A reset recounts what is left.
        h.reset(11);
        assert_eq!(h.inner.lock().unwrap().bytes, weight(&put(12, 1)));
    }

    /// Subscribers hold weak references: what the history dropped before a
    /// subscriber got to it is reported as lost, once for a run of them,
    /// and the stream goes on after them.
    #[tokio::test]
    async fn a_subscriber_behind_the_history_loses_changes_and_is_told() {
        let h = History::new(0, 1_000, 64);
        h.set_capacity(3, usize::MAX);
        let mut fast = h.subscribe();
        let mut slow = h.subscribe();
        for r in 1..=3 {
            h.publish(vec![put(r, 8)]);
            assert_eq!(fast.recv().await.unwrap().revision, r);
        }
        // One batch larger than the history: all of it is kept for now.
        h.publish((4..=8).map(|r| put(r, 8)).collect());
        for r in 4..=8 {
            assert_eq!(fast.recv().await.unwrap().revision, r);
        }
        // The slow one finds 1..=3 gone, reported once, then 4 onwards.
        assert!(matches!(slow.recv().await, Err(RecvError::Lagged(3))));
        assert_eq!(slow.recv().await.unwrap().revision, 4);
        h.publish(vec![put(9, 8)]);
        // 4..=6 went with that publish (capacity 3): 5 and 6 are lost now.
        assert!(matches!(slow.recv().await, Err(RecvError::Lagged(2))));
        assert_eq!(slow.recv().await.unwrap().revision, 7);
        let mut late = h.subscribe();
        h.publish(vec![put(10, 8)]);
        h.publish(vec![put(11, 8), put(12, 8), put(13, 8)]);
        assert!(matches!(late.recv().await, Err(RecvError::Lagged(1))));
        assert_eq!(late.recv().await.unwrap().revision, 11);
        // Lost changes with nothing after them are reported too.
        let mut last = h.subscribe();
        h.publish(vec![put(14, 8)]);
        h.set_capacity(1, 0);
        assert!(matches!(last.recv().await, Err(RecvError::Lagged(1))));
    }

    #[test]
    fn a_revision_jump_is_a_gap() {
        let mut seen = Continuity::after(0);
        assert_eq!(seen.skipped_before(1), None);
        assert_eq!(seen.skipped_before(2), None);
        // A snapshot install replaced 3 and 4.
        assert_eq!(seen.skipped_before(5), Some(3..=4));
        assert_eq!(seen.skipped_before(6), None);
        assert_eq!(seen.skipped_before(8), Some(7..=7));
    }

    #[test]
    fn revisions_already_seen_are_no_gap() {
        // Subscribed before reading the revision: changes up to it may still arrive.
        let mut seen = Continuity::after(10);
        assert_eq!(seen.skipped_before(9), None);
        assert_eq!(seen.skipped_before(10), None);
        assert_eq!(seen.skipped_before(11), None);
        assert_eq!(seen.skipped_before(13), Some(12..=12));
    }

    #[test]
    fn lost_events_are_not_a_gap_but_later_jumps_are() {
        let mut seen = Continuity::after(3);
        seen.lost();
        assert_eq!(seen.skipped_before(40), None);
        assert_eq!(seen.skipped_before(41), None);
        assert_eq!(seen.skipped_before(100), Some(42..=99));
    }

    #[test]
    fn extreme_revisions_do_not_panic() {
        let mut seen = Continuity::after(u64::MAX);
        assert_eq!(seen.skipped_before(u64::MAX), None);
        assert_eq!(seen.skipped_before(0), None);
        let mut seen = Continuity::after(0);
        let gap = seen.skipped_before(u64::MAX).unwrap();
        assert_eq!(gap, 1..=u64::MAX - 1);
        assert_eq!(gap_len(&gap), u64::MAX - 1);
        assert_eq!(gap_len(&(3..=4)), 2);
        assert_eq!(gap_len(&RangeInclusive::new(5, 4)), 0);
    }
}
