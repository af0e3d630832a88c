//! Coalesces concurrent linearizable reads into shared read-index requests
//! (as etcd's linearizable read loop does): a read that arrives while a
//! request is in flight waits for the *next* request, which starts after it
//! arrived and so is a valid read index for it; every read waiting then
//! shares that one request. Under load, one leader round trip serves many
//! reads instead of one each.

use std::future::Future;

use crate::coalesce::Coalescer;
use crate::error::ReadError;

/// The batcher; `fetch` in [`ReadIndexBatcher::read_index`] does the real request.
pub struct ReadIndexBatcher {
    reads: Coalescer<(), Result<u64, ReadError>>,
}

impl Default for ReadIndexBatcher {
    fn default() -> Self {
        // One request at a time: each costs a round on the leader, and more
        // in flight measured slower (BENCHMARKS.md).
        ReadIndexBatcher {
            reads: Coalescer::new(1),
        }
    }
}

impl ReadIndexBatcher {
    /// A read index valid for a read that starts now. `fetch` is called by
    /// at most one caller at a time, for a whole batch of waiting reads.
    pub async fn read_index<F, Fut>(&self, fetch: F) -> Result<u64, ReadError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<u64, ReadError>>,
    {
        let fetch = &fetch;
        self.reads
            .call(
                (),
                |waiting| waiting.len(),
                |batch| async move { vec![fetch().await; batch.len()] },
            )
            .await
            .unwrap_or_else(|| {
                Err(ReadError::Unavailable(
                    "the request fetching this read index was cancelled".into(),
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_share_requests_and_each_gets_a_fresh_one() {
        let b = Arc::new(ReadIndexBatcher::default());
        let calls = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (b, calls) = (b.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                let before = calls.load(Ordering::SeqCst);
                let got = b
                    .read_index(|| {
                        let calls = calls.clone();
                        async move {
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                            Ok(calls.fetch_add(1, Ordering::SeqCst) + 1)
                        }
                    })
                    .await
                    .unwrap();
                // The answer comes from a request that started after this read.
                assert!(got > before);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let n = calls.load(Ordering::SeqCst);
        assert!(n < 64, "{n} requests for 64 reads: nothing was shared");
    }
}
