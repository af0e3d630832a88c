//! A follower's forwarding of client writes to the leader, batched: writes
//! that arrive while forwards are in flight travel together in the next
//! `POST /raft/forward-batch` (one HTTP exchange each way for all of them; the
//! leader validates and proposes each, its group commit joins them into one
//! entry) and each gets its own answer back.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::batcher;
use crate::coalesce::Coalescer;
use crate::error::WriteError;
use crate::peer::PeerClient;
use crate::raft::{Command, CommandResult};

/// Forward batches in flight at once, per leader. One: the leader proposes
/// each forward as one entry (`Node::write_local_all`), so writes that queue
/// here while a forward is out all travel, and commit, together. With two,
/// each forward carried about half as many writes and the leader made twice
/// the entries (17 instead of 31 writes per entry at 64 clients, BENCHMARKS
/// item 28), and per-entry work (fsyncs, AppendEntries, apply) costs more
/// than the idle round trip saves on this CPU-bound path.
const FORWARDS_IN_FLIGHT: usize = 1;

/// How long a forward already sent may still answer once another leader is
/// known (and at least this long after it was sent: the watch for a new
/// leader starts only then, so the cut-off comes one to two of these after
/// the change). A leader that stepped down answers at once (its writes are
/// then retried at the new one); one cut off by a partition never answers,
/// and without this limit its forward would hold its queue until the
/// forward timeout (10 s).
const ANSWER_GRACE: Duration = Duration::from_secs(1);

type Answer = Result<CommandResult, WriteError>;

/// What forwarding needs to know about who leads.
pub trait LeaderWatch: Sync {
    /// Whether the leader is (still) the node at `addr`.
    fn leads_at(&self, addr: &str) -> bool;
    /// Resolves once a leader at another address is known.
    fn moved_from<'a>(&'a self, addr: &'a str) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// Batches writes forwarded to the leader: one queue per leader address, so
/// writes for a new leader never wait behind a forward to the old one.
#[derive(Default)]
pub struct Forwarder {
    queues: Mutex<HashMap<String, Arc<Coalescer<Command, Answer>>>>,
}

impl Forwarder {
    fn queue(&self, addr: &str) -> Arc<Coalescer<Command, Answer>> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues
            .entry(addr.to_owned())
            .or_insert_with(|| Arc::new(Coalescer::new(FORWARDS_IN_FLIGHT)))
            .clone()
    }

    /// Sends `cmd` to the leader at `addr`, with whatever else is waiting for
    /// it. Writes still queued when another node leads are not sent: they
    /// answer `NotLeader`, and the caller retries them at the new leader. A
    /// forward already sent that has not answered one to two
    /// [`ANSWER_GRACE`]s after another leader is known answers `Unavailable`
    /// (it may or may not have been applied).
    pub async fn forward(
        &self,
        peers: &PeerClient,
        leader: &impl LeaderWatch,
        addr: String,
        cmd: Command,
    ) -> Answer {
        let addr = addr.as_str();
        self.queue(addr)
            .call(
                cmd,
                |queued| batcher::batch_len(queued, |c| c),
                |batch| async move {
                    if !leader.leads_at(addr) {
                        return vec![Err(WriteError::NotLeader { leader: None }); batch.len()];
                    }
                    let cut_off = async {
                        // (Not watching during the first wait: a forward
                        // normally answers long before, and the watch would
                        // wake this task at every change of the Raft metrics.)
                        tokio::time::sleep(ANSWER_GRACE).await;
                        leader.moved_from(addr).await;
                        tokio::time::sleep(ANSWER_GRACE).await;
                    };
                    tokio::select! {
                        answers = peers.forward_writes(addr, &batch) => answers,
                        () = cut_off => vec![
                            Err(WriteError::Unavailable(
                                "another node leads now and the one this write was forwarded \
                                 to did not answer; it may or may not have been applied"
                                    .into(),
                            ));
                            batch.len()
                        ],
                    }
                },
            )
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
