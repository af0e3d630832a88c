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
//! every evaluation on the node.

use crate::coalesce::Coalescer;
use crate::flags::evaluate;
use crate::plugins::PluginHost;
use crate::plugins::types::{ErrorCode, EvalContext, Evaluation, EvaluationError};
use crate::raft::KvReader;

/// One queued evaluation: the flag key and the request's context.
type Job = (String, EvalContext);

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
        key: String,
        ctx: EvalContext,
    ) -> Answer {
        if plugins.is_none() {
            return evaluate(reader, None, &key, &ctx);
        }
        let run = |batch: Vec<Job>| {
            let answers: Vec<Answer> = batch
                .iter()
                .map(|(key, ctx)| evaluate(reader, plugins, key, ctx))
                .collect();
            std::future::ready(answers)
        };
        self.queue
            .call((key, ctx), |queued| queued.len(), run)
            .await
            // The batch is evaluated synchronously once taken, so a runner
            // cannot be dropped between taking this job and answering it.
            .unwrap_or_else(|| {
                Err(EvaluationError {
                    code: ErrorCode::General,
                    message: "the evaluation got no answer".into(),
                })
            })
    }
}
