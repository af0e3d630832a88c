//! The snapshot file: its format, a streaming writer and reader, and the
//! `current` file of a node's snapshot directory.
//!
//! A snapshot never has to fit in memory. It is built by streaming the key
//! space into a file, sent to a follower as that file's bytes (openraft reads
//! `SnapshotData` in chunks at offsets), received into a file, and installed
//! by streaming the file's pairs into a fresh keyspace's tables. So the file
//! carries everything a receiver needs, metadata included:
//!
//! ```text
//! "FLGSNAP2" | u64 revision | { u32 key len | key | u32 record len | record }* | meta | u64 meta len
//! ```
//!
//! (integers big-endian, `meta` openraft's `SnapshotMeta` in MessagePack,
//! last so that a builder can stream the pairs before it knows the size).
//! Keys are strictly ascending UTF-8 (the key space's order); the reader
//! checks that, the key rules, the lengths and each record's header, so a
//! truncated or garbled file is an error, never a partial install.
//!
//! Files of the first format (`u64 meta len | meta | u64 revision | pairs`,
//! written whole from memory by earlier versions) are rewritten in this one
//! when a node opens its snapshot directory, and a snapshot received from a
//! node of such a version (`u64 revision | pairs`: the metadata came only
//! with the request) is rewritten on arrival.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::types::{SnapshotMeta, ValueRecord};

/// Name of the snapshot file in the snapshot directory.
pub const CURRENT: &str = "current";
/// First bytes of a snapshot file of this format.
const MAGIC: &[u8; 8] = b"FLGSNAP2";
/// Suffix of snapshot files being written (left over only by a crash).
const TMP_SUFFIX: &str = ".tmp";
/// Largest metadata accepted (a membership config of a few nodes is far
/// smaller): a garbled length must not allocate the file's size.
const MAX_META: u64 = 1 << 20;
/// Buffer size for streaming a snapshot to or from its file.
const IO_BUFFER: usize = 256 * 1024;
/// Makes temp file names unique within the process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt snapshot file: {what}"),
    )
}

/// The name of a temp file, removed when this is dropped unless it was
/// renamed ([`TempPath::renamed_to`]).
struct TempPath(Option<PathBuf>);

impl TempPath {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// Renames the file to `to`; the name is no longer the guard's to remove.
    fn renamed_to(mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(self.path(), to)?;
        self.0 = None;
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A new temp file in `dir`, open for reading and writing.
fn create_tmp(dir: &Path) -> io::Result<(File, TempPath)> {
    let path = dir.join(format!(
        "{CURRENT}.{}.{}{TMP_SUFFIX}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok((file, TempPath(Some(path))))
}

/// The temp file a follower receives a snapshot into. Its name is removed
/// when this is dropped (a transfer given up; a crash leaves it to
/// [`remove_stale_tmp_files`]) unless the install adopts the file as it is
/// ([`Receiving::adopt`]): the received bytes become `current` by a
/// rename, not a copy.
pub struct Receiving {
    path: TempPath,
    /// Device and inode of the file, to recognize it when it comes back.
    id: (u64, u64),
}

fn file_id(file: &File) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

impl Receiving {
    /// A new temp file in `dir`, open for reading and writing, and its name.
    pub fn create(dir: &Path) -> io::Result<(File, Receiving)> {
        let (file, path) = create_tmp(dir)?;
        let id = file_id(&file)?;
        Ok((file, Receiving { path, id }))
    }

    /// Whether `file` is the file this names.
    pub fn holds(&self, file: &File) -> bool {
        file_id(file).is_ok_and(|id| id == self.id)
    }

    /// The received file (the one this names, complete), fsynced, ready to
    /// be checked and published like a copy of it.
    pub fn adopt(self, file: File) -> io::Result<Written> {
        file.sync_all()?;
        Ok(Written {
            file,
            path: self.path,
        })
    }
}

/// Removes temp snapshot files a crash left behind (best effort).
pub fn remove_stale_tmp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(CURRENT) && name.ends_with(TMP_SUFFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Streams a snapshot into a temp file of the snapshot directory.
pub struct SnapshotWriter {
    out: BufWriter<File>,
    path: TempPath,
}

impl SnapshotWriter {
    /// Starts a snapshot of a key space whose revision counter is `revision`.
    pub fn create(dir: &Path, revision: u64) -> io::Result<Self> {
        let (file, path) = create_tmp(dir)?;
        let mut out = BufWriter::with_capacity(IO_BUFFER, file);
        let started = out
            .write_all(MAGIC)
            .and_then(|()| out.write_all(&revision.to_be_bytes()));
        let writer = SnapshotWriter { out, path };
        started.map(|()| writer)
    }

    /// Appends one `(key, encoded record)` pair; keys must come in ascending
    /// order (the key space's iteration order).
    pub fn push(&mut self, key: &[u8], record: &[u8]) -> io::Result<()> {
        for part in [key, record] {
            let len = u32::try_from(part.len()).map_err(|_| corrupt("item over 4 GiB"))?;
            self.out.write_all(&len.to_be_bytes())?;
            self.out.write_all(part)?;
        }
        Ok(())
    }

    /// Writes the trailer and fsyncs: the file is complete, still a temp
    /// file (see [`Written::publish`]).
    pub fn finish(mut self, meta: &SnapshotMeta) -> io::Result<Written> {
        let meta_bytes = rmp_serde::to_vec(meta).map_err(io::Error::other)?;
        self.out.write_all(&meta_bytes)?;
        self.out
            .write_all(&(meta_bytes.len() as u64).to_be_bytes())?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(Written {
            file,
            path: self.path,
        })
    }
}

/// A complete, fsynced snapshot file under a temp name (removed when this is
/// dropped unpublished).
pub struct Written {
    file: File,
    path: TempPath,
}

impl Written {
    /// Copies a complete snapshot file (positioned anywhere) into a temp file
    /// of `dir` and fsyncs it.
    pub fn copy_of(dir: &Path, src: &mut File) -> io::Result<Written> {
        let (file, path) = create_tmp(dir)?;
        let copied = (|| {
            src.seek(SeekFrom::Start(0))?;
            let mut out = BufWriter::with_capacity(IO_BUFFER, &file);
            io::copy(src, &mut out)?;
            out.flush()?;
            drop(out);
            file.sync_all()
        })();
        copied.map(|()| Written { file, path })
    }

    /// Rewrites snapshot data of the first format as sent by older versions
    /// (`u64 revision | pairs`, from the start of `src`) in this format,
    /// into a temp file of `dir`, with `meta` (which came with the request).
    pub fn from_first_format_data(
        dir: &Path,
        src: &mut File,
        meta: &SnapshotMeta,
    ) -> io::Result<Written> {
        let len = src.metadata()?.len();
        src.seek(SeekFrom::Start(0))?;
        rewrite(dir, PairReader::at(src.try_clone()?, len)?, meta)
    }

    /// A handle of its own on the file (for reading it from the start).
    pub fn reopen(&self) -> io::Result<File> {
        let mut file = self.file.try_clone()?;
        file.seek(SeekFrom::Start(0))?;
        Ok(file)
    }

    /// Makes this file `dir/current` (rename, then fsync of the directory)
    /// unless `current` already holds a snapshot at least as new as `meta`
    /// (by `last_log_id`); an unreadable `current` is replaced rather than
    /// trusted. Returns the file, open at its start, and whether it
    /// replaced `current` (if not, its temp name is removed; the open file
    /// stays readable).
    ///
    /// `lock` serializes the writers of `current` (a build and an install can
    /// run at once), so a check and its rename cannot interleave.
    pub fn publish(
        self,
        dir: &Path,
        lock: &Mutex<()>,
        meta: &SnapshotMeta,
    ) -> io::Result<(File, bool)> {
        let Written { mut file, path } = self;
        let replaced = (|| -> io::Result<bool> {
            let _guard = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Ok(Some(existing)) = read_current_meta(dir)
                && existing.last_log_id >= meta.last_log_id
            {
                tracing::info!(
                    snapshot = %meta.snapshot_id,
                    current = %existing.snapshot_id,
                    "snapshot file already holds a snapshot at least as new; not replaced"
                );
                return Ok(false);
            }
            path.renamed_to(&dir.join(CURRENT))?;
            File::open(dir)?.sync_all()?;
            Ok(true)
        })()?;
        file.seek(SeekFrom::Start(0))?;
        Ok((file, replaced))
    }
}

/// Reads a snapshot file's trailer: its metadata and where its pairs end.
fn read_trailer(file: &mut File) -> io::Result<(SnapshotMeta, u64)> {
    let len = file.metadata()?.len();
    let fixed = (MAGIC.len() + 8 + 8) as u64;
    if len < fixed {
        return Err(corrupt("too short"));
    }
    let mut word = [0u8; 8];
    file.seek(SeekFrom::Start(len - 8))?;
    file.read_exact(&mut word)?;
    let meta_len = u64::from_be_bytes(word);
    if meta_len > len - fixed || meta_len > MAX_META {
        return Err(corrupt("metadata length"));
    }
    let pairs_end = len - 8 - meta_len;
    file.seek(SeekFrom::Start(pairs_end))?;
    let mut meta_bytes = vec![0u8; meta_len as usize];
    file.read_exact(&mut meta_bytes)?;
    let meta = rmp_serde::from_slice(&meta_bytes).map_err(|_| corrupt("metadata"))?;
    Ok((meta, pairs_end))
}

/// The metadata of a snapshot file, from its trailer; the file is left at
/// its start.
pub fn read_meta(file: &mut File) -> io::Result<SnapshotMeta> {
    if !starts_with_magic(file)? {
        return Err(corrupt("not a snapshot file of this format"));
    }
    let (meta, _) = read_trailer(file)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(meta)
}

/// Whether `file` is a snapshot file of this format (by its first bytes).
pub fn starts_with_magic(file: &mut File) -> io::Result<bool> {
    let mut magic = [0u8; MAGIC.len()];
    if file.metadata()?.len() < MAGIC.len() as u64 {
        return Ok(false);
    }
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut magic)?;
    Ok(&magic == MAGIC)
}

/// `dir/current`, opened; `None` when no snapshot was written yet.
fn open_current_file(dir: &Path) -> io::Result<Option<File>> {
    match File::open(dir.join(CURRENT)) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The metadata of `dir/current`; `None` when there is none.
pub fn read_current_meta(dir: &Path) -> io::Result<Option<SnapshotMeta>> {
    open_current_file(dir)?
        .map(|mut f| read_meta(&mut f))
        .transpose()
}

/// `dir/current` and its metadata, the file open at its start.
pub fn open_current(dir: &Path) -> io::Result<Option<(SnapshotMeta, File)>> {
    let Some(mut file) = open_current_file(dir)? else {
        return Ok(None);
    };
    let meta = read_meta(&mut file)?;
    Ok(Some((meta, file)))
}

/// The `(key, record)` pairs of a snapshot file, checked as they are read.
pub struct PairReader {
    src: io::Take<BufReader<File>>,
    revision: u64,
    last_key: Option<Vec<u8>>,
}

impl PairReader {
    /// Opens the pairs of a complete snapshot file of this format.
    pub fn open(mut file: File) -> io::Result<(SnapshotMeta, PairReader)> {
        if !starts_with_magic(&mut file)? {
            return Err(corrupt("not a snapshot file of this format"));
        }
        let (meta, pairs_end) = read_trailer(&mut file)?;
        let start = MAGIC.len() as u64;
        file.seek(SeekFrom::Start(start))?;
        let reader = PairReader::at(file, pairs_end - start)?;
        Ok((meta, reader))
    }

    /// Pairs read from `file`'s position on: `u64 revision` then `len - 8`
    /// bytes of pairs.
    fn at(file: File, len: u64) -> io::Result<PairReader> {
        let mut src = BufReader::with_capacity(IO_BUFFER, file).take(len);
        let mut word = [0u8; 8];
        src.read_exact(&mut word)?;
        Ok(PairReader {
            src,
            revision: u64::from_be_bytes(word),
            last_key: None,
        })
    }

    /// The key space's revision counter when the snapshot was taken.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn item(&mut self) -> io::Result<Vec<u8>> {
        let mut word = [0u8; 4];
        self.src.read_exact(&mut word)?;
        let len = u64::from(u32::from_be_bytes(word));
        if len > self.src.limit() {
            return Err(corrupt("item length past the end"));
        }
        let mut item = vec![0u8; len as usize];
        self.src.read_exact(&mut item)?;
        Ok(item)
    }

    fn next_pair(&mut self) -> io::Result<(Vec<u8>, Vec<u8>)> {
        let key = self.item()?;
        let record = self.item()?;
        let Ok(text) = std::str::from_utf8(&key) else {
            return Err(corrupt("a key is not UTF-8"));
        };
        // Every key was checked when it was written: one that breaks the
        // rules (too long for the storage, a control character) comes from
        // a forged file, and would be stored beyond the API's reach.
        if crate::keys::validate_key(text).is_err() {
            return Err(corrupt("a key breaks the key rules"));
        }
        if self.last_key.as_ref().is_some_and(|last| key <= *last) {
            return Err(corrupt("keys out of order"));
        }
        ValueRecord::decode_revision(&record).map_err(|_| corrupt("a record's header"))?;
        self.last_key = Some(key.clone());
        Ok((key, record))
    }
}

impl Iterator for PairReader {
    type Item = io::Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.src.limit() == 0 {
            return None;
        }
        let pair = self.next_pair();
        if pair.is_err() {
            // One error ends the stream.
            self.src.set_limit(0);
        }
        Some(pair)
    }
}

/// Writes `pairs` (checked as they are read) to a new snapshot file of `dir`.
fn rewrite(dir: &Path, pairs: PairReader, meta: &SnapshotMeta) -> io::Result<Written> {
    let mut writer = SnapshotWriter::create(dir, pairs.revision())?;
    for pair in pairs {
        let (key, record) = pair?;
        writer.push(&key, &record)?;
    }
    writer.finish(meta)
}

/// Rewrites a `dir/current` of the first format (metadata first) in this
/// one. Returns whether there was one to rewrite.
pub fn upgrade_first_format(dir: &Path) -> io::Result<bool> {
    let Some(mut file) = open_current_file(dir)? else {
        return Ok(false);
    };
    if starts_with_magic(&mut file)? {
        return Ok(false);
    }
    let len = file.metadata()?.len();
    let mut word = [0u8; 8];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut word)?;
    let meta_len = u64::from_be_bytes(word);
    if meta_len > len.saturating_sub(16) || meta_len > MAX_META {
        return Err(corrupt("metadata length (first format)"));
    }
    let mut meta_bytes = vec![0u8; meta_len as usize];
    file.read_exact(&mut meta_bytes)?;
    let meta: SnapshotMeta =
        rmp_serde::from_slice(&meta_bytes).map_err(|_| corrupt("metadata (first format)"))?;
    let pairs = PairReader::at(file, len - 8 - meta_len)?;
    let Written { file, path } = rewrite(dir, pairs, &meta)?;
    drop(file);
    path.renamed_to(&dir.join(CURRENT))?;
    File::open(dir)?.sync_all()?;
    tracing::info!(snapshot = %meta.snapshot_id, "rewrote the snapshot file in the streaming format");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::test_support::{meta, record};

    fn write(dir: &Path, index: u64, pairs: &[(&str, Vec<u8>)]) -> Written {
        let mut w = SnapshotWriter::create(dir, 7).unwrap();
        for (k, r) in pairs {
            w.push(k.as_bytes(), r).unwrap();
        }
        w.finish(&meta(index)).unwrap()
    }

    type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

    fn read_all(file: File) -> io::Result<(SnapshotMeta, u64, Pairs)> {
        let (meta, pairs) = PairReader::open(file)?;
        let rev = pairs.revision();
        Ok((meta, rev, pairs.collect::<io::Result<_>>()?))
    }

    #[test]
    fn pairs_round_trip_and_garbage_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let pairs = [("a", record(1, b"x")), ("b/c", record(2, &[0u8; 5000]))];
        let (file, replaced) = write(dir.path(), 4, &pairs)
            .publish(dir.path(), &Mutex::new(()), &meta(4))
            .unwrap();
        assert!(replaced);
        let good = std::fs::read(dir.path().join(CURRENT)).unwrap();
        let (m, rev, read) = read_all(file).unwrap();
        assert_eq!((m, rev), (meta(4), 7));
        assert_eq!(read.len(), 2);
        assert_eq!(
            (read[1].0.as_slice(), &read[1].1),
            (&b"b/c"[..], &pairs[1].1)
        );
        // An empty key space is a valid snapshot too.
        let (empty, _) = write(dir.path(), 5, &[])
            .publish(dir.path(), &Mutex::new(()), &meta(5))
            .unwrap();
        assert!(read_all(empty).unwrap().2.is_empty());

        let garbled = |mutate: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            mutate(&mut b);
            let path = dir.path().join("garbled");
            std::fs::write(&path, &b).unwrap();
            read_all(File::open(&path).unwrap())
        };
        assert!(garbled(&|_| {}).is_ok());
        // Truncated anywhere, a byte flipped in a length, the magic.
        for cut in [1, 9, good.len() / 2, good.len() - 1] {
            assert!(garbled(&|b| b.truncate(cut)).is_err(), "cut at {cut}");
        }
        assert!(garbled(&|b| b[16] = 0xff).is_err(), "key length");
        assert!(garbled(&|b| b[0] = b'X').is_err(), "magic");
        // Keys out of order.
        let unpublished = |pairs: &[(&str, Vec<u8>)]| {
            let w = write(dir.path(), 9, pairs);
            let file = w.file.try_clone().unwrap();
            read_all(file)
        };
        assert!(unpublished(&[("b", record(1, b"x")), ("a", record(1, b"x"))]).is_err());
        assert!(unpublished(&[("a", record(1, b"x")), ("a", record(1, b"y"))]).is_err());
        // A record without a record header.
        assert!(unpublished(&[("a", b"nope".to_vec())]).is_err());
        // Keys no write could have stored: a control character, or too
        // long for the storage (its panic, not an error, before the check).
        assert!(unpublished(&[("evil\nkey", record(1, b"x"))]).is_err());
        let long = "k".repeat(70_000);
        assert!(unpublished(&[(long.as_str(), record(1, b"x"))]).is_err());
    }

    /// Many snapshot writes at once (as a build and an install can be): the
    /// file is never torn, ends up holding the newest snapshot, and an older
    /// one never replaces a newer one.
    #[test]
    fn concurrent_publishes_keep_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let lock = std::sync::Arc::new(Mutex::new(()));
        let threads: Vec<_> = [5u64, 12, 3, 16, 9, 1, 14, 7, 11, 2, 15, 8, 4, 13, 6, 10]
            .into_iter()
            .map(|index| {
                let (dir, lock) = (dir.path().to_path_buf(), lock.clone());
                std::thread::spawn(move || {
                    let value = vec![index as u8; 64 * 1024];
                    let keys: Vec<String> = (0..4).map(|i| format!("k{i}")).collect();
                    let pairs: Vec<_> = keys
                        .iter()
                        .map(|k| (k.as_str(), record(index, &value)))
                        .collect();
                    write(&dir, index, &pairs)
                        .publish(&dir, &lock, &meta(index))
                        .unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (m, file) = open_current(dir.path()).unwrap().unwrap();
        assert_eq!(m, meta(16));
        let (_, _, pairs) = read_all(file).unwrap();
        assert_eq!(pairs.len(), 4);
        assert!(
            pairs
                .iter()
                .all(|(_, r)| *r == record(16, &[16u8; 64 * 1024]))
        );

        // Older or equal snapshots do not replace it; a newer one does.
        for (index, replaces) in [(15, false), (16, false), (17, true)] {
            let (_, replaced) = write(dir.path(), index, &[])
                .publish(dir.path(), &lock, &meta(index))
                .unwrap();
            assert_eq!(replaced, replaces, "snapshot at {index}");
        }
        assert_eq!(read_current_meta(dir.path()).unwrap(), Some(meta(17)));

        // No temp files are left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![CURRENT.to_string()]);
    }

    #[test]
    fn a_first_format_file_is_rewritten_and_keeps_its_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let meta_bytes = rmp_serde::to_vec(&meta(3)).unwrap();
        let mut old = (meta_bytes.len() as u64).to_be_bytes().to_vec();
        old.extend_from_slice(&meta_bytes);
        old.extend_from_slice(&11u64.to_be_bytes());
        for (k, r) in [("a", record(10, b"1")), ("b", record(11, b"2"))] {
            old.extend_from_slice(&(k.len() as u32).to_be_bytes());
            old.extend_from_slice(k.as_bytes());
            old.extend_from_slice(&(r.len() as u32).to_be_bytes());
            old.extend_from_slice(&r);
        }
        std::fs::write(dir.path().join(CURRENT), &old).unwrap();
        assert!(
            read_current_meta(dir.path()).is_err(),
            "not this format yet"
        );

        assert!(upgrade_first_format(dir.path()).unwrap());
        let (m, file) = open_current(dir.path()).unwrap().unwrap();
        assert_eq!(m, meta(3));
        let (_, rev, pairs) = read_all(file).unwrap();
        assert_eq!(rev, 11);
        assert_eq!(pairs[1], (b"b".to_vec(), record(11, b"2")));
        assert!(
            !upgrade_first_format(dir.path()).unwrap(),
            "already upgraded"
        );
    }
}
