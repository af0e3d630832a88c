//! Single-flag evaluations that arrive together, run back to back.
//!
//! An evaluator call costs ≈ 3 µs when the plugin's code and memory are in
//! the CPU's caches and TLB, and three times that as the first call after a
//! request's HTTP work (BENCHMARKS item 43). Under load, OFREP requests
//! become ready several at once (one I/O-driver wake-up makes many
//! connections readable), so each handler queues its evaluation in a
//! gathering [`Coalescer`]: a runner first yields once, letting the other
//! ready requests of its worker queue theirs, then evaluates the batch in a
//! row on its worker thread, where each call ran before. A request alone
//! pays one yield, a re-poll of its own task.
//!
//! There is one runner slot per runtime worker, so a slow evaluator holds
//! back the batch it is in, as it held back its worker before, and not
//! every evaluation on the node. A runner yields again whenever its batch
//! has run for [`YIELD_AFTER`], so the worker's other tasks (Raft
//! heartbeats, other requests) wait for one call at most, as they did
//! before, not for a whole batch of calls near their deadline. If the
//! runner's own request goes away during such a yield, the rest of its
//! batch is evaluated by each caller itself.

use std::sync::Arc;
use std::time::Duration;

use crate::coalesce::{Coalescer, Stretch};
use crate::flags::evaluate;
use crate::plugins::PluginHost;
use crate::plugins::types::{EvalContext, Evaluation, EvaluationError};
use crate::raft::KvReader;

/// How long a runner evaluates before it lets its worker run other tasks.
pub const YIELD_AFTER: Duration = Duration::from_millis(1);

/// One queued evaluation: the flag key and the request's context (shared
/// with its caller, which evaluates it itself if its runner goes away).
type Job = Arc<(String, EvalContext)>;

type Answer = Result<Evaluation, EvaluationError>;

/// The node's queue of single-flag evaluations; see the module docs.
pub struct Evaluations {
    queue: Coalescer<Job, Answer>,
}

impl Evaluations {
    /// A queue with `runners` runner slots (one per runtime worker).
    pub fn new(runners: usize) -> Self {
        Evaluations {
            queue: Coalescer::gathering(runners),
        }
    }

    /// Evaluates flag `key` for `ctx` from local state, as
    /// [`crate::flags::evaluate`] does, in a batch with the evaluations that
    /// arrive with it. Without plugins there is no call to gather: it
    /// answers at once.
    pub async fn evaluate(
        &self,
        reader: &KvReader,
        plugins: Option<&PluginHost>,
        key: &str,
        ctx: EvalContext,
    ) -> Answer {
        if plugins.is_none() {
            return evaluate(reader, None, key, &ctx);
        }
        let run = |batch: Vec<Job>| async move {
            let mut answers = Vec::with_capacity(batch.len());
            let mut stretch = Stretch::new(YIELD_AFTER);
            for job in &batch {
                stretch.pause().await;
                let (key, ctx) = &**job;
                answers.push(evaluate(reader, plugins, key, ctx));
            }
            answers
        };
        let job = Arc::new((key.to_owned(), ctx));
        match self
            .queue
            .call(job.clone(), |queued| queued.len(), run)
            .await
        {
            Some(answer) => answer,
            // The runner's request went away while its batch yielded.
            None => evaluate(reader, plugins, key, &job.1),
        }
    }
}
