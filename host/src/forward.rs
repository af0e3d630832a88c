//! A follower's forwarding of client writes to the leader, batched: writes
//! that arrive while forwards are in flight travel together in the next
//! `POST /raft/forward-batch` (one HTTP exchange each way for all of them; the
//! leader validates and proposes each, its group commit joins them into one
//! entry) and each gets its own answer back.

use crate::batcher;
use crate::coalesce::Coalescer;
use crate::error::WriteError;
use crate::peer::PeerClient;
use crate::raft::{Command, CommandResult};

/// Forward batches in flight at once. One: the leader proposes each forward
/// as one entry (`Node::write_local_all`), so writes that queue here while a
/// forward is out all travel, and commit, together. With two, each forward
/// carried about half as many writes and the leader made twice the entries
/// (17 instead of 31 writes per entry at 64 clients, BENCHMARKS item 28), and
/// per-entry work (fsyncs, AppendEntries, apply) costs more than the idle
/// round trip saves on this CPU-bound path.
const FORWARDS_IN_FLIGHT: usize = 1;

type Answer = Result<CommandResult, WriteError>;

/// Batches writes forwarded to the leader.
pub struct Forwarder {
    writes: Coalescer<(String, Command), Answer>,
}

impl Default for Forwarder {
    fn default() -> Self {
        Forwarder {
            writes: Coalescer::new(FORWARDS_IN_FLIGHT),
        }
    }
}

/// The next batch: queued writes for the same leader address as the first,
/// within the leader's batch limits.
fn batch_len(queued: &[(String, Command)]) -> usize {
    let Some((addr, _)) = queued.first() else {
        return 0;
    };
    let same_leader = queued.iter().take_while(|(a, _)| a == addr).count();
    batcher::batch_len(&queued[..same_leader], |(_, cmd)| cmd)
}

impl Forwarder {
    /// Sends `cmd` to the leader at `addr`, with whatever else is waiting.
    pub async fn forward(&self, peers: &PeerClient, addr: String, cmd: Command) -> Answer {
        self.writes
            .call((addr, cmd), batch_len, |batch| async move {
                let addr = batch[0].0.clone();
                let cmds: Vec<Command> = batch.into_iter().map(|(_, c)| c).collect();
                peers.forward_writes(&addr, &cmds).await
            })
            .await
            .unwrap_or_else(|| {
                Err(WriteError::Unavailable(
                    "the forward carrying this write was cancelled or lost its answer; \
                     it may or may not have been applied"
                        .into(),
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::{MAX_BATCH_BYTES, MAX_BATCH_LEN};

    fn put(key: &str, len: usize) -> Command {
        Command::Put {
            key: key.into(),
            value: vec![0; len],
            content_type: None,
            precondition: Default::default(),
        }
    }

    #[test]
    fn a_batch_goes_to_one_leader_within_the_limits() {
        let a = || "http://a".to_string();
        let b = || "http://b".to_string();
        assert_eq!(batch_len(&[]), 0);
        let q = vec![(a(), put("k", 1)), (a(), put("k", 1)), (b(), put("k", 1))];
        assert_eq!(batch_len(&q), 2, "stops at another address");
        let big = MAX_BATCH_BYTES / 2;
        let q = vec![
            (a(), put("k", big)),
            (a(), put("k", big)),
            (a(), put("k", 1)),
        ];
        assert_eq!(batch_len(&q), 1, "stops before the byte limit");
        let q: Vec<_> = (0..MAX_BATCH_LEN + 5).map(|_| (a(), put("k", 1))).collect();
        assert_eq!(batch_len(&q), MAX_BATCH_LEN);
    }
}
