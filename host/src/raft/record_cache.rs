//! A bounded cache of decoded value records in front of the `kv` keyspace.
//!
//! A point read of a hot key skips the LSM lookup (the memtable's skip list,
//! then each table's filter, index and data block) and the record decode. On
//! a store that has taken many writes that lookup is most of a local read's
//! own CPU time (BENCHMARKS.md, item 25).
//!
//! # Never stale
//!
//! The state machine is the only writer of `kv`, and it updates the cache
//! itself: [`RecordCache::begin`] before it commits a batch, then
//! [`Update::finish`] with every key the batch wrote (or
//! [`Update::finish_replacing_all`] after a snapshot install), after the
//! commit and before it advances the applied index. So a reader that waits for an
//! applied index (a linearizable read) or that saw a change published finds
//! the new record in the cache or nothing.
//!
//! Readers fill the cache on a miss with what they read from `kv` — a key's
//! absence included, so a write that creates a key, validated on this node
//! and then applied here, reads `kv` for it once, not twice — and that read
//! may race with a commit. A sequence number (odd while an update is
//! under way) guards it: a reader notes the number before its read and
//! inserts only if it is even and unchanged, checked under the lock the
//! state machine takes to begin and finish an update. Either the insert comes
//! before the update begins (and the update then overwrites or removes the
//! key), or the number moved and the reader leaves the cache alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use quick_cache::Weighter;
use quick_cache::sync::Cache;

use super::types::ValueRecord;

/// Bytes a cached entry is charged besides its key, value and content type.
const ENTRY_OVERHEAD: u64 = 96;

/// What the cache knows of a key: its record, or (`None`) that it is absent.
type Known = Option<Arc<ValueRecord>>;

/// Default capacity of the cache, in bytes of keys, values and overhead.
pub const DEFAULT_READ_CACHE_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Clone)]
struct RecordWeight;

impl Weighter<String, Known> for RecordWeight {
    fn weight(&self, key: &String, known: &Known) -> u64 {
        let record = known.as_ref().map_or(0, |r| {
            r.content_type.as_ref().map_or(0, String::len) + r.value.len()
        });
        (key.len() + record) as u64 + ENTRY_OVERHEAD
    }
}

/// Decoded records of recently read or written keys, and recently read
/// absent keys (see the module docs).
pub struct RecordCache {
    /// `None` when the capacity is 0: caching is off.
    records: Option<Cache<String, Known, RecordWeight>>,
    /// Odd while the state machine is updating `kv` and the cache.
    seq: AtomicU64,
    /// Taken to begin and to finish an update, and by a reader to fill.
    lock: Mutex<()>,
}

impl RecordCache {
    /// A cache holding at most `capacity` bytes (0: no caching).
    pub fn new(capacity: u64) -> Self {
        // quick_cache sizes its tables from an item count; 1 KiB per record
        // is a guess that only affects the initial allocation.
        let records = (capacity > 0).then(|| {
            let items = (capacity / 1024).clamp(16, 1 << 20) as usize;
            Cache::with_weighter(items, capacity, RecordWeight)
        });
        RecordCache {
            records,
            seq: AtomicU64::new(0),
            lock: Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded data is `()`: a panic elsewhere cannot leave it broken.
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record of `key` (`None`: absent): from the cache, else from
    /// `load` (a read of `kv`), which then fills the cache unless an update
    /// raced with it.
    pub fn get<E>(
        &self,
        key: &str,
        load: impl FnOnce() -> Result<Option<ValueRecord>, E>,
    ) -> Result<Known, E> {
        let Some(records) = &self.records else {
            return Ok(load()?.map(Arc::new));
        };
        if let Some(hit) = records.get(key) {
            return Ok(hit);
        }
        let seen = self.seq.load(Ordering::Acquire);
        let known = load()?.map(Arc::new);
        if seen.is_multiple_of(2) {
            let _guard = self.lock();
            if self.seq.load(Ordering::Acquire) == seen {
                records.insert(key.to_owned(), known.clone());
            }
        }
        Ok(known)
    }

    /// What the cache knows of `key` without reading `kv`: `None` if
    /// nothing, `Some(None)` if it knows the key is absent.
    pub fn cached(&self, key: &str) -> Option<Known> {
        self.records.as_ref()?.get(key)
    }

    /// Marks an update of `kv` as under way; call before committing it.
    pub fn begin(&self) -> Update<'_> {
        let _guard = self.lock();
        self.seq.fetch_add(1, Ordering::AcqRel);
        Update { cache: Some(self) }
    }

    /// Ends an update: applies `apply` to the records and lets fills resume.
    fn end(&self, apply: impl FnOnce(&Cache<String, Known, RecordWeight>)) {
        let _guard = self.lock();
        if let Some(records) = &self.records {
            apply(records);
        }
        self.seq.fetch_add(1, Ordering::AcqRel);
    }
}

/// An update of `kv` under way; [`Update::finish`] once it is committed.
/// Dropped unfinished (the commit failed), it empties the cache: what the
/// failed update did to `kv` is unknown.
#[must_use = "finish the update once it is committed"]
pub struct Update<'a> {
    cache: Option<&'a RecordCache>,
}

impl Drop for Update<'_> {
    fn drop(&mut self) {
        if let Some(cache) = self.cache.take() {
            cache.end(|records| records.clear());
        }
    }
}

impl Update<'_> {
    /// Ends the update (once, whichever way) with `apply` to the records.
    fn end(mut self, apply: impl FnOnce(&Cache<String, Known, RecordWeight>)) {
        if let Some(cache) = self.cache.take() {
            cache.end(apply);
        }
    }

    /// The update is committed: `written` holds each key it wrote with its
    /// new record (`None`: deleted).
    pub fn finish<'k>(
        self,
        written: impl IntoIterator<Item = (&'k str, Option<&'k Arc<ValueRecord>>)>,
    ) {
        self.end(|records| {
            for (key, record) in written {
                match record {
                    Some(r) => records.insert(key.to_owned(), Some(r.clone())),
                    // Not cached as absent: a large delete would push the
                    // records of live keys out.
                    None => {
                        records.remove(key);
                    }
                }
            }
        });
    }

    /// The update is committed and replaced the whole key space (a snapshot
    /// install): every cached record is dropped.
    pub fn finish_replacing_all(self) {
        self.end(|records| records.clear());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(revision: u64, value: &str) -> ValueRecord {
        ValueRecord {
            revision,
            create_revision: 1,
            version: revision,
            content_type: None,
            value: value.as_bytes().to_vec(),
        }
    }

    type Loaded = Result<Option<ValueRecord>, ()>;

    #[test]
    fn a_miss_fills_and_a_hit_skips_the_load() {
        let cache = RecordCache::new(1 << 20);
        let got = cache.get("k", || Loaded::Ok(Some(record(1, "a")))).unwrap();
        assert_eq!(got.unwrap().value, b"a");
        let got = cache
            .get("k", || -> Loaded { panic!("a hit must not load") })
            .unwrap();
        assert_eq!(got.unwrap().revision, 1);
    }

    #[test]
    fn an_absent_key_is_cached_until_a_write_creates_it() {
        let cache = RecordCache::new(1 << 20);
        assert!(cache.get("new", || Loaded::Ok(None)).unwrap().is_none());
        assert!(matches!(cache.cached("new"), Some(None)));
        let again = cache
            .get("new", || -> Loaded {
                panic!("a known absence must not load")
            })
            .unwrap();
        assert!(again.is_none());
        // The write that creates the key replaces what the cache knew.
        let created = Arc::new(record(2, "b"));
        cache.begin().finish([("new", Some(&created))]);
        let got = cache.get("new", || -> Loaded { panic!("cached") }).unwrap();
        assert_eq!(got.unwrap().revision, 2);
        // A delete forgets the key rather than caching its absence.
        cache.begin().finish([("new", None)]);
        assert!(cache.cached("new").is_none());
    }

    #[test]
    fn an_absence_read_racing_the_write_that_creates_the_key_is_not_cached() {
        let cache = RecordCache::new(1 << 20);
        let created = Arc::new(record(1, "created"));
        let got = cache
            .get("k", || {
                // The read found nothing; meanwhile a batch created the key.
                cache.begin().finish([("k", Some(&created))]);
                Loaded::Ok(None)
            })
            .unwrap();
        assert!(got.is_none(), "the read returns what it read");
        let got = cache.get("k", || -> Loaded { panic!("cached") }).unwrap();
        assert_eq!(
            got.unwrap().value,
            b"created",
            "the stale absence was cached"
        );
    }

    #[test]
    fn an_update_overwrites_removes_and_clears() {
        let cache = RecordCache::new(1 << 20);
        for k in ["a", "b", "c"] {
            cache.get(k, || Loaded::Ok(Some(record(1, k)))).unwrap();
        }
        let new = Arc::new(record(2, "a2"));
        cache.begin().finish([("a", Some(&new)), ("b", None)]);
        let a = cache.get("a", || -> Loaded { panic!("cached") }).unwrap();
        assert_eq!(a.unwrap().value, b"a2");
        let b = cache.get("b", || Loaded::Ok(None)).unwrap();
        assert!(b.is_none(), "a deleted key is not served from the cache");
        cache.begin().finish_replacing_all();
        let c = cache
            .get("c", || Loaded::Ok(Some(record(3, "c3"))))
            .unwrap();
        assert_eq!(c.unwrap().revision, 3, "clear drops every record");
    }

    #[test]
    fn a_read_racing_an_update_does_not_fill() {
        let cache = RecordCache::new(1 << 20);
        // The read loads the old record while an update is committed and
        // finished (with the key evicted meanwhile, or written by a batch
        // the reader's load did not see): its fill must be dropped.
        let got = cache
            .get("k", || {
                cache.begin().finish([]);
                Loaded::Ok(Some(record(1, "old")))
            })
            .unwrap();
        assert_eq!(got.unwrap().value, b"old");
        let got = cache
            .get("k", || Loaded::Ok(Some(record(2, "new"))))
            .unwrap();
        assert_eq!(got.unwrap().value, b"new", "the stale read was cached");
        // The same while an update is still under way.
        let cache = RecordCache::new(1 << 20);
        let update = cache.begin();
        cache
            .get("k", || Loaded::Ok(Some(record(1, "old"))))
            .unwrap();
        update.finish([]);
        let got = cache
            .get("k", || Loaded::Ok(Some(record(2, "new"))))
            .unwrap();
        assert_eq!(
            got.unwrap().value,
            b"new",
            "a read during an update was cached"
        );
    }

    #[test]
    fn an_update_dropped_unfinished_empties_the_cache_and_fills_resume() {
        let cache = RecordCache::new(1 << 20);
        cache.get("k", || Loaded::Ok(Some(record(1, "a")))).unwrap();
        drop(cache.begin());
        assert!(cache.cached("k").is_none());
        cache.get("k", || Loaded::Ok(Some(record(2, "b")))).unwrap();
        assert_eq!(cache.cached("k").flatten().unwrap().revision, 2);
    }

    #[test]
    fn capacity_zero_turns_caching_off_and_big_records_are_bounded() {
        let off = RecordCache::new(0);
        off.get("k", || Loaded::Ok(Some(record(1, "a")))).unwrap();
        let got = off.get("k", || Loaded::Ok(Some(record(2, "b")))).unwrap();
        assert_eq!(got.unwrap().revision, 2);

        let small = RecordCache::new(64 * 1024);
        let big = "x".repeat(16 * 1024);
        for i in 0..64 {
            small
                .get(&format!("k{i}"), || Loaded::Ok(Some(record(1, &big))))
                .unwrap();
        }
        let held: u64 = (0..64)
            .filter_map(|i| small.records.as_ref().unwrap().peek(&format!("k{i}"))?)
            .map(|r| r.value.len() as u64)
            .sum();
        assert!(held <= 64 * 1024, "holds {held} bytes");
    }
}
