//! Group commit at the Raft level. One entry per client write would mean an
//! fsync on every node and a replication round per write (openraft 0.9
//! followers flush each append before taking the next). Instead, writes that
//! arrive while a proposal is in flight
//! wait for the next one, which carries all of them as a single
//! [`Command::Batch`] entry: one append, one fsync per node, one replication
//! round for the whole group. Each write still gets its own result and
//! revision. Up to `max_inflight` proposals overlap (`coalesce.rs` does the
//! queueing).

use std::future::Future;

use crate::coalesce::Coalescer;
use crate::error::WriteError;
use crate::raft::{Command, CommandResult};

/// Default number of proposals in flight at once.
pub const DEFAULT_INFLIGHT: usize = 1;
/// Most value bytes carried by one batch entry.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Most writes carried by one batch entry.
pub const MAX_BATCH_LEN: usize = 1024;

/// Collects concurrent writes into batch proposals.
pub struct WriteBatcher {
    writes: Coalescer<Command, Result<CommandResult, WriteError>>,
}

/// Key and value bytes a command carries (what the batch limits count).
pub fn command_size(cmd: &Command) -> usize {
    match cmd {
        Command::Put { key, value, .. } => key.len() + value.len(),
        Command::Delete { key, .. } => key.len(),
        Command::Batch(cmds) => cmds.iter().map(command_size).sum(),
    }
}

/// How many of the queued items (each carrying the write `command(item)`) the
/// next batch takes: at most [`MAX_BATCH_LEN`] and [`MAX_BATCH_BYTES`] (a
/// single larger write goes alone). Also cuts a follower's forwards.
pub fn batch_len<T>(queued: &[T], command: impl Fn(&T) -> &Command) -> usize {
    let (mut bytes, mut n) = (0, 0);
    for item in queued {
        let b = command_size(command(item));
        if n > 0 && (bytes + b > MAX_BATCH_BYTES || n == MAX_BATCH_LEN) {
            break;
        }
        bytes += b;
        n += 1;
    }
    n
}

/// Proposes `cmds` as one entry (a lone write as itself) and splits the
/// result: one per write, in order.
async fn propose_batch<F, Fut>(
    propose: &F,
    mut cmds: Vec<Command>,
) -> Vec<Result<CommandResult, WriteError>>
where
    F: Fn(Command) -> Fut,
    Fut: Future<Output = Result<CommandResult, WriteError>>,
{
    let n = cmds.len();
    if n == 1 {
        let cmd = cmds.pop().expect("one write");
        return vec![propose(cmd).await];
    }
    match propose(Command::Batch(cmds)).await {
        Ok(CommandResult::Batch(results)) if results.len() == n => {
            results.into_iter().map(Ok).collect()
        }
        Ok(other) => vec![
            Err(WriteError::Unavailable(format!(
                "unexpected batch result {other:?}"
            )));
            n
        ],
        Err(e) => vec![Err(e); n],
    }
}

impl WriteBatcher {
    /// A batcher allowing `max_inflight` overlapping proposals.
    pub fn new(max_inflight: usize) -> Self {
        WriteBatcher {
            writes: Coalescer::new(max_inflight),
        }
    }

    /// Proposes `cmd` with others waiting at the same time; `propose` does
    /// the real `client_write` of a single command or a batch.
    pub async fn submit<F, Fut>(
        &self,
        cmd: Command,
        propose: F,
    ) -> Result<CommandResult, WriteError>
    where
        F: Fn(Command) -> Fut,
        Fut: Future<Output = Result<CommandResult, WriteError>>,
    {
        self.submit_all(vec![cmd], propose)
            .await
            .pop()
            .unwrap_or_else(cancelled)
    }

    /// Proposes `cmds` (writes that arrived together, such as a follower's
    /// forwarded batch) in the same proposal as far as the batch limits
    /// allow, with others waiting at the same time; one result per write,
    /// in order.
    pub async fn submit_all<F, Fut>(
        &self,
        cmds: Vec<Command>,
        propose: F,
    ) -> Vec<Result<CommandResult, WriteError>>
    where
        F: Fn(Command) -> Fut,
        Fut: Future<Output = Result<CommandResult, WriteError>>,
    {
        let propose = &propose;
        self.writes
            .call_all(
                cmds,
                |q| batch_len(q, |c| c),
                |cmds| propose_batch(propose, cmds),
            )
            .await
            .into_iter()
            .map(|answer| answer.unwrap_or_else(cancelled))
            .collect()
    }
}

/// The answer of a write whose proposal's runner was dropped.
fn cancelled() -> Result<CommandResult, WriteError> {
    Err(WriteError::Unavailable(
        "the request proposing this write's batch was cancelled; \
         it may or may not have been applied"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_proposals_and_keep_their_own_results() {
        let b = Arc::new(WriteBatcher::new(1));
        let proposals = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..50u64 {
            let (b, proposals) = (b.clone(), proposals.clone());
            tasks.push(tokio::spawn(async move {
                let cmd = Command::Delete {
                    key: format!("k{i}"),
                    precondition: Default::default(),
                };
                let r = b
                    .submit(cmd, |c| {
                        let proposals = proposals.clone();
                        async move {
                            proposals.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                            let revision_of = |c: &Command| match c {
                                Command::Delete { key, .. } => key[1..].parse::<u64>().unwrap(),
                                _ => unreachable!(),
                            };
                            Ok(match c {
                                Command::Batch(cs) => CommandResult::Batch(
                                    cs.iter()
                                        .map(|c| CommandResult::Delete {
                                            deleted: true,
                                            revision: revision_of(c),
                                        })
                                        .collect(),
                                ),
                                c => CommandResult::Delete {
                                    deleted: true,
                                    revision: revision_of(&c),
                                },
                            })
                        }
                    })
                    .await
                    .unwrap();
                assert_eq!(
                    r,
                    CommandResult::Delete {
                        deleted: true,
                        revision: i
                    }
                );
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let n = proposals.load(Ordering::SeqCst);
        assert!(n < 50, "{n} proposals for 50 writes: nothing was batched");
    }
}
