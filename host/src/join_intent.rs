//! The data dir remembers that its node was started to join a cluster.
//!
//! A node started with `--join` on an empty data dir asks the seed to add
//! it, and until the leader has replicated something to it, its Raft state
//! on disk is as empty as a brand-new node's. Without a record of the join,
//! a restart in that window without `--join` (an operator's plain restart, a
//! supervisor that drops the flag) would take the empty data dir for a new
//! store and initialize a single-node cluster of its own: a second cluster
//! under a member id the real one knows, whose elections disturb it. So the
//! seed is written to `data_dir/join` (fsynced) before the first request,
//! and a start that finds no Raft state but this file keeps asking to join
//! instead of initializing.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Name of the file in the data dir.
const FILE: &str = "join";

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// Records that this data dir's node joins through `seed` (written to a
/// temp file, fsynced, renamed, directory fsynced).
pub fn record(data_dir: &Path, seed: &str) -> io::Result<()> {
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(seed.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path(data_dir))?;
    File::open(data_dir)?.sync_all()
}

/// The seed this data dir's node was started to join through, if any.
pub fn recall(data_dir: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path(data_dir)) {
        Ok(seed) => Ok(Some(seed.trim().to_owned()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_seed_is_recalled_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(recall(dir.path()).unwrap(), None);
        record(dir.path(), "http://127.0.0.1:8080").unwrap();
        assert_eq!(
            recall(dir.path()).unwrap().as_deref(),
            Some("http://127.0.0.1:8080")
        );
        record(dir.path(), "http://127.0.0.1:8081").unwrap();
        assert_eq!(
            recall(dir.path()).unwrap().as_deref(),
            Some("http://127.0.0.1:8081")
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE], "no temp file left");
    }
}
