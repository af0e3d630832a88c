//! Group commit at the Raft level. One entry per client write would mean an
//! fsync on every node and a replication round per write (openraft 0.9
//! followers flush each append before taking the next). Instead, writes that
//! arrive while a proposal is in flight
//! wait for the next one, which carries all of them as a single
//! [`Command::Batch`] entry: one append, one fsync per node, one replication
//! round for the whole group. Each write still gets its own result and
//! revision. Up to `max_inflight` proposals overlap (`coalesce.rs` does the
//! queueing).
//!
//! Writes are admitted by the validator plugins (`validate.rs`) before they
//! are proposed, back to back rather than one per request: while an entry is
//! in flight, its runner validates the writes queued for the next one (woken
//! every [`WAKE_EVERY`] writes that need it), so a batch's own runner is left
//! with the few that came too late. A rejected write gets its own error and
//! is left out of the proposal.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::coalesce::{Coalescer, Stretch};
use crate::error::WriteError;
use crate::raft::{Command, CommandResult};
use crate::validate::Admit;

/// Default number of proposals in flight at once.
pub const DEFAULT_INFLIGHT: usize = 1;
/// Most value bytes carried by one batch entry.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Most writes carried by one batch entry.
pub const MAX_BATCH_LEN: usize = 1024;

/// A runner waiting for its entry is woken to validate the writes queued
/// behind it once this many that need validators have arrived.
pub const WAKE_EVERY: usize = 8;
/// Longest stretch of validator calls a runner makes in one go on its
/// worker: ahead of time it then stops until the next wake-up; on its own
/// batch it yields to other tasks first.
pub const HOLD_AT_MOST: Duration = Duration::from_millis(1);

/// A queued write, and its validators' verdict once known.
struct Queued {
    cmd: Command,
    verdict: OnceLock<Result<(), WriteError>>,
}

type Item = Arc<Queued>;

/// Collects concurrent writes into batch proposals.
pub struct WriteBatcher {
    writes: Coalescer<Item, Result<CommandResult, WriteError>>,
    /// Queued writes that need validators since a runner last looked (a
    /// wake-up hint, not an exact count).
    unverified: AtomicUsize,
    /// Wakes the runner of the entry in flight to validate ahead.
    ahead: Notify,
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
    if n == 0 {
        return Vec::new();
    }
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

/// Runs `run` on the writes that passed (`Ok`) and puts each answer in its
/// write's place: one answer per write, in order; a write that failed answers
/// its error, one that passed but got no answer from `run`, `missing()`.
pub async fn in_order<Fut>(
    writes: impl IntoIterator<Item = Result<Command, WriteError>>,
    run: impl FnOnce(Vec<Command>) -> Fut,
    missing: fn() -> Result<CommandResult, WriteError>,
) -> Vec<Result<CommandResult, WriteError>>
where
    Fut: Future<Output = Vec<Result<CommandResult, WriteError>>>,
{
    let mut answers = Vec::new();
    let mut passed = Vec::new();
    for write in writes {
        match write {
            Ok(cmd) => {
                answers.push(None);
                passed.push(cmd);
            }
            Err(e) => answers.push(Some(Err(e))),
        }
    }
    let mut results = run(passed).await.into_iter();
    answers
        .into_iter()
        .map(|answer| answer.or_else(|| results.next()).unwrap_or_else(missing))
        .collect()
}

/// Gives every write of `batch` that has no verdict yet its validators'
/// verdict: inline ones back to back, blocking-pool ones side by side.
async fn verify<A: Admit>(admit: &A, batch: &[Item]) {
    let mut blocking = Vec::new();
    let mut held = Stretch::new(HOLD_AT_MOST);
    for item in batch.iter().filter(|i| i.verdict.get().is_none()) {
        match admit.now(&item.cmd) {
            Some(v) => {
                let _ = item.verdict.set(v);
            }
            None => blocking.push((item, admit.blocking(&item.cmd))),
        }
        held.pause().await;
    }
    for (item, task) in blocking {
        let v = task
            .await
            .unwrap_or_else(|e| Err(WriteError::Unavailable(format!("validator task: {e}"))));
        let _ = item.verdict.set(v);
    }
}

/// The write out of its queue entry (copied only if someone still holds
/// the entry, which a finished look-ahead does not).
fn into_command(item: Item) -> Command {
    Arc::try_unwrap(item)
        .map(|q| q.cmd)
        .unwrap_or_else(|shared| shared.cmd.clone())
}

impl WriteBatcher {
    /// A batcher allowing `max_inflight` overlapping proposals.
    pub fn new(max_inflight: usize) -> Self {
        WriteBatcher {
            writes: Coalescer::new(max_inflight),
            unverified: AtomicUsize::new(0),
            ahead: Notify::new(),
        }
    }

    /// Proposes `cmd` with others waiting at the same time, once `admit`
    /// lets it through; `propose` does the real `client_write` of a single
    /// command or a batch.
    pub async fn submit<A, F, Fut>(
        &self,
        cmd: Command,
        admit: &A,
        propose: F,
    ) -> Result<CommandResult, WriteError>
    where
        A: Admit,
        F: Fn(Command) -> Fut,
        Fut: Future<Output = Result<CommandResult, WriteError>>,
    {
        self.submit_all(vec![cmd], admit, propose)
            .await
            .pop()
            .unwrap_or_else(cancelled)
    }

    /// Proposes `cmds` (writes that arrived together, such as a follower's
    /// forwarded batch) in the same proposal as far as the batch limits
    /// allow, with others waiting at the same time; one result per write,
    /// in order.
    pub async fn submit_all<A, F, Fut>(
        &self,
        cmds: Vec<Command>,
        admit: &A,
        propose: F,
    ) -> Vec<Result<CommandResult, WriteError>>
    where
        A: Admit,
        F: Fn(Command) -> Fut,
        Fut: Future<Output = Result<CommandResult, WriteError>>,
    {
        let items = cmds
            .into_iter()
            .map(|cmd| self.queue_entry(cmd, admit))
            .collect();
        let propose = &propose;
        self.writes
            .call_all(
                items,
                |q| batch_len(q, |i| &i.cmd),
                |batch| self.run(batch, admit, propose),
            )
            .await
            .into_iter()
            .map(|answer| answer.unwrap_or_else(cancelled))
            .collect()
    }

    /// `cmd` ready to queue: admitted already if no validator looks at it;
    /// otherwise counted towards waking the runner in flight.
    fn queue_entry<A: Admit>(&self, cmd: Command, admit: &A) -> Item {
        let verdict = OnceLock::new();
        if !admit.needed(&cmd) {
            let _ = verdict.set(Ok(()));
        } else if self.unverified.fetch_add(1, Ordering::Relaxed) + 1 >= WAKE_EVERY {
            self.unverified.store(0, Ordering::Relaxed);
            self.ahead.notify_one();
        }
        Arc::new(Queued { cmd, verdict })
    }

    /// Runs one batch: its writes' verdicts, then the proposal of those
    /// admitted, validating the writes queued behind it meanwhile. One answer
    /// per write, in order.
    async fn run<A, F, Fut>(
        &self,
        batch: Vec<Item>,
        admit: &A,
        propose: &F,
    ) -> Vec<Result<CommandResult, WriteError>>
    where
        A: Admit,
        F: Fn(Command) -> Fut,
        Fut: Future<Output = Result<CommandResult, WriteError>>,
    {
        verify(admit, &batch).await;
        let verdicts = batch.into_iter().map(|item| match item.verdict.get() {
            Some(Ok(())) => Ok(into_command(item)),
            Some(Err(e)) => Err(e.clone()),
            None => Err(WriteError::Unavailable(
                "a write got no validator verdict".into(),
            )),
        });
        in_order(
            verdicts,
            |admitted| async move {
                let proposal = propose_batch(propose, admitted);
                tokio::pin!(proposal);
                loop {
                    tokio::select! {
                        biased;
                        results = &mut proposal => break results,
                        () = self.ahead.notified() => self.validate_ahead(admit),
                    }
                }
            },
            cancelled,
        )
        .await
    }

    /// Validates the queued writes that need it and can be validated inline,
    /// for at most [`HOLD_AT_MOST`]; the rest wait for the next wake-up or
    /// their own runner.
    fn validate_ahead<A: Admit>(&self, admit: &A) {
        self.unverified.store(0, Ordering::Relaxed);
        let started = Instant::now();
        for item in self.writes.queued(|i| i.verdict.get().is_none()) {
            if let Some(v) = admit.now(&item.cmd) {
                let _ = item.verdict.set(v);
            }
            if started.elapsed() >= HOLD_AT_MOST {
                break;
            }
        }
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
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64};

    use super::*;

    fn delete(i: u64) -> Command {
        Command::Delete {
            key: format!("k{i}"),
            precondition: Default::default(),
        }
    }

    fn number(c: &Command) -> u64 {
        match c {
            Command::Delete { key, .. } => key[1..].parse().unwrap(),
            other => panic!("not a test write: {other:?}"),
        }
    }

    /// Admits the writes whose number `allowed` accepts; those divisible by 5
    /// go to the blocking pool. Counts every validation, and those made while
    /// a proposal was in flight.
    struct Fake {
        allowed: fn(u64) -> bool,
        validated: Mutex<Vec<u64>>,
        in_flight: AtomicBool,
        ahead: AtomicU64,
    }

    impl Fake {
        fn new(allowed: fn(u64) -> bool) -> Self {
            Fake {
                allowed,
                validated: Mutex::new(Vec::new()),
                in_flight: AtomicBool::new(false),
                ahead: AtomicU64::new(0),
            }
        }

        fn verdict(&self, cmd: &Command) -> Result<(), WriteError> {
            let n = number(cmd);
            self.validated.lock().unwrap().push(n);
            if self.in_flight.load(Ordering::SeqCst) {
                self.ahead.fetch_add(1, Ordering::SeqCst);
            }
            if (self.allowed)(n) {
                Ok(())
            } else {
                Err(WriteError::RejectedByPlugin {
                    plugin: "fake".into(),
                    message: format!("k{n} is refused"),
                })
            }
        }

        /// A proposal that takes 2 ms and gives each write its key's number
        /// as revision, after checking that every write in it was admitted.
        async fn propose(
            &self,
            c: Command,
            proposals: &AtomicU64,
        ) -> Result<CommandResult, WriteError> {
            proposals.fetch_add(1, Ordering::SeqCst);
            self.in_flight.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
            self.in_flight.store(false, Ordering::SeqCst);
            let result = |c: &Command| {
                let n = number(c);
                assert!((self.allowed)(n), "k{n} was proposed");
                CommandResult::Delete {
                    deleted: true,
                    revision: n,
                }
            };
            Ok(match c {
                Command::Batch(cs) => CommandResult::Batch(cs.iter().map(result).collect()),
                c => result(&c),
            })
        }
    }

    impl Admit for Fake {
        fn needed(&self, _: &Command) -> bool {
            true
        }

        fn now(&self, cmd: &Command) -> Option<Result<(), WriteError>> {
            (!number(cmd).is_multiple_of(5)).then(|| self.verdict(cmd))
        }

        fn blocking(&self, cmd: &Command) -> tokio::task::JoinHandle<Result<(), WriteError>> {
            let v = self.verdict(cmd);
            tokio::task::spawn_blocking(move || v)
        }
    }

    /// 50 concurrent writes through one batcher, admitted by `allowed`: each
    /// gets its own answer (its revision, or its rejection) and is validated
    /// exactly once. Returns the proposals made and the validations made
    /// while a proposal was in flight.
    async fn fifty_writes(allowed: fn(u64) -> bool) -> (u64, u64) {
        let b = Arc::new(WriteBatcher::new(1));
        let fake = Arc::new(Fake::new(allowed));
        let proposals = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..50u64 {
            let (b, fake, proposals) = (b.clone(), fake.clone(), proposals.clone());
            tasks.push(tokio::spawn(async move {
                let r = b
                    .submit(delete(i), &*fake, |c| fake.propose(c, &proposals))
                    .await;
                if allowed(i) {
                    let expected = CommandResult::Delete {
                        deleted: true,
                        revision: i,
                    };
                    assert_eq!(r, Ok(expected), "k{i}");
                } else {
                    assert!(
                        matches!(&r, Err(WriteError::RejectedByPlugin { message, .. })
                            if *message == format!("k{i} is refused")),
                        "k{i}: {r:?}"
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut validated = fake.validated.lock().unwrap().clone();
        validated.sort_unstable();
        assert_eq!(
            validated,
            (0..50).collect::<Vec<_>>(),
            "each write validated once"
        );
        (
            proposals.load(Ordering::SeqCst),
            fake.ahead.load(Ordering::SeqCst),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_proposals_and_keep_their_own_results() {
        let (proposals, ahead) = fifty_writes(|_| true).await;
        assert!(
            proposals < 50,
            "{proposals} proposals for 50 writes: nothing was batched"
        );
        assert!(
            ahead > 0,
            "no write was validated while an entry was in flight"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rejected_writes_get_their_own_error_and_are_left_out_of_the_proposal() {
        let (proposals, _) = fifty_writes(|i| i.is_multiple_of(2)).await;
        assert!(
            proposals < 25,
            "{proposals} proposals for 25 admitted writes: nothing was batched"
        );
    }

    #[tokio::test]
    async fn a_batch_with_nothing_admitted_proposes_nothing() {
        let b = WriteBatcher::new(1);
        let fake = Fake::new(|_| false);
        let proposals = AtomicU64::new(0);
        let answers = b
            .submit_all((1..=3).map(delete).collect(), &fake, |c| {
                fake.propose(c, &proposals)
            })
            .await;
        assert_eq!(answers.len(), 3);
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, Err(WriteError::RejectedByPlugin { .. })))
        );
        assert_eq!(proposals.load(Ordering::SeqCst), 0);
    }
}
