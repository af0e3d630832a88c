//! Writes run on a task of their own, not in the request's future.
//!
//! A write's future may be the runner of a batch that carries other
//! clients' writes (group commit on the leader, forwarding on a follower:
//! `coalesce.rs`). Were it the request's own future, a client that hangs up
//! (hyper then drops the future) would cancel that batch, and every write in
//! it would be answered "may or may not have been applied", although its
//! entry commits. On a task of its own a write runs to its end whether or
//! not anyone still waits for the answer; `limit` bounds it.

use std::future::Future;
use std::time::Duration;

/// Runs `work` on its own task for at most `limit` and returns its output,
/// or `failed(why)` if it ran out of time or its task ended another way.
pub async fn detached<O: Send + 'static>(
    limit: Duration,
    work: impl Future<Output = O> + Send + 'static,
    failed: impl FnOnce(String) -> O,
) -> O {
    match tokio::spawn(tokio::time::timeout(limit, work)).await {
        Ok(Ok(out)) => out,
        Ok(Err(_)) => failed(format!(
            "not committed within {limit:?} (is a quorum of the cluster up?)"
        )),
        Err(e) => failed(format!("the write's task ended before it answered: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn the_work_goes_on_when_its_caller_goes_away() {
        let done = Arc::new(AtomicBool::new(false));
        let work = {
            let done = done.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                done.store(true, Ordering::SeqCst);
                1
            }
        };
        // The caller gives up long before the work ends.
        let caller = detached(Duration::from_secs(5), work, |_| 0);
        assert!(
            tokio::time::timeout(Duration::from_millis(5), caller)
                .await
                .is_err()
        );
        tokio::time::timeout(Duration::from_secs(5), async {
            while !done.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the work finished without its caller");
    }

    #[tokio::test]
    async fn work_past_its_limit_fails() {
        let work = std::future::pending::<u32>();
        let got = detached(Duration::from_millis(10), work, |why| {
            assert!(why.contains("not committed within"), "{why}");
            7
        })
        .await;
        assert_eq!(got, 7);
        assert_eq!(
            detached(Duration::from_secs(1), async { 3 }, |_| 0).await,
            3
        );
    }
}
