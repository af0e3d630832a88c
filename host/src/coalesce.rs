//! Coalescing concurrent calls into batches, the shape shared by group
//! commit (`batcher.rs`), read-index sharing (`read_index.rs`), a
//! follower's forwarding of writes to the leader (`forward.rs`) and
//! single-flag evaluations (`evaluations.rs`, whose runners gather first:
//! [`Coalescer::gathering`]).
//!
//! A caller queues its item. If fewer than `max_inflight` runners are active
//! it becomes one: it takes a batch from the queue (every item in it arrived
//! before the batch started), runs it, hands each item its answer, and passes
//! its runner slot to the caller of the first item still queued, which runs
//! the next batch. Other callers just wait for their answer (or the slot).
//!
//! A runner runs one batch, not the queue until it is empty: a runner is an
//! ordinary caller's future (an HTTP handler), and one that went on while new
//! items kept arriving would hold its own caller's answer back for as long as
//! the load lasted (under steady load, one client's request never returned).
//! Passing the slot costs one wake-up per batch, of a caller that waits
//! anyway; it is sent last, so Tokio runs that caller next on this worker.
//!
//! A runner's future can be dropped mid-batch (an HTTP handler whose client
//! went away). The items of that batch then get no answer (their outcome is
//! unknown), and the runner's slot passes on in the same way, so nothing
//! queued behind it waits forever. A waiting caller can go away too (its
//! timeout, its client hanging up): its item is left out of every later
//! batch (nobody would get its answer, and a client that retries must not
//! find its first attempt applied behind its back), and a slot handed to it
//! just as it went passes on as well.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// What a waiting caller is sent.
enum Msg<T, R> {
    /// The answer to its item.
    Done(R),
    /// The runner slot is yours: run the next batch. The item stays first in
    /// the queue; its answer comes on the receiver.
    Lead(oneshot::Receiver<Msg<T, R>>),
}

type Reply<T, R> = oneshot::Sender<Msg<T, R>>;

struct Queue<T, R> {
    items: Vec<T>,
    replies: Vec<Reply<T, R>>,
    running: usize,
}

/// Batches concurrent calls; see the module docs.
pub struct Coalescer<T, R> {
    queue: Mutex<Queue<T, R>>,
    max_inflight: usize,
    gather: bool,
}

impl<T, R> Coalescer<T, R> {
    /// A coalescer running at most `max_inflight` batches at once (at least 1).
    pub fn new(max_inflight: usize) -> Self {
        Coalescer {
            queue: Mutex::new(Queue {
                items: Vec::new(),
                replies: Vec::new(),
                running: 0,
            }),
            max_inflight: max_inflight.max(1),
            gather: false,
        }
    }

    /// A coalescer whose runners, when they start on their own (not handed
    /// the slot by a previous runner), yield once before taking their batch:
    /// the calls that became ready together with theirs (other connections
    /// made readable by the same I/O event) then join it. For batches whose
    /// work is short and synchronous, which would otherwise be run alone as
    /// soon as each call arrives.
    pub fn gathering(max_inflight: usize) -> Self {
        Coalescer {
            gather: true,
            ..Self::new(max_inflight)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<T, R>> {
        // Nothing panics while holding the lock; recover rather than wedge.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Submits `item` and waits for its answer. `cut(queued)` says how many
    /// of the queued items (at least one is taken) form the next batch;
    /// `run(batch)` returns one answer per item, in order. `None`: the item
    /// got no answer (its batch's runner was dropped, or `run` returned too
    /// few answers).
    pub async fn call<C, F, Fut>(&self, item: T, cut: C, run: F) -> Option<R>
    where
        C: Fn(&[T]) -> usize,
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Vec<R>>,
    {
        let mut answers = self.call_all(vec![item], cut, run).await;
        answers.pop().flatten()
    }

    /// Submits several items at once and waits for every answer, in order.
    /// They are queued together, so they share a batch as far as `cut`
    /// allows: a runner never starts a batch with the first of them while
    /// the rest are not queued yet (a list that arrived in one request
    /// becomes one batch, not one lone item and then the others).
    pub async fn call_all<C, F, Fut>(&self, items: Vec<T>, cut: C, run: F) -> Vec<Option<R>>
    where
        C: Fn(&[T]) -> usize,
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Vec<R>>,
    {
        let mut waiting = Vec::with_capacity(items.len());
        let lead = {
            let mut q = self.lock();
            for item in items {
                let (tx, rx) = oneshot::channel();
                q.items.push(item);
                q.replies.push(tx);
                waiting.push(Waiting { owner: self, rx });
            }
            let lead = !waiting.is_empty() && q.running < self.max_inflight;
            if lead {
                q.running += 1;
            }
            lead
        };
        if lead {
            self.lead(&cut, &run, self.gather).await;
        }
        let mut answers = Vec::with_capacity(waiting.len());
        for rx in waiting {
            answers.push(self.answer(rx, &cut, &run).await);
        }
        answers
    }

    /// Clones of the queued items (not yet taken by a runner) that `keep`
    /// selects, in queue order. For work a runner can do ahead on the items
    /// behind its batch while the batch runs; the items stay queued.
    pub fn queued(&self, keep: impl Fn(&T) -> bool) -> Vec<T>
    where
        T: Clone,
    {
        self.lock()
            .items
            .iter()
            .filter(|i| keep(i))
            .cloned()
            .collect()
    }

    /// Waits for the answer behind `waiting`; handed the runner slot, runs a
    /// batch (which holds this item: it is first in the queue) and waits on.
    async fn answer<C, F, Fut>(&self, mut waiting: Waiting<'_, T, R>, cut: &C, run: &F) -> Option<R>
    where
        C: Fn(&[T]) -> usize,
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Vec<R>>,
    {
        loop {
            match (&mut waiting.rx).await {
                Ok(Msg::Done(answer)) => return Some(answer),
                Ok(Msg::Lead(next)) => {
                    // The slot came with the message: `running` already counts
                    // it, and from here `lead`'s guard passes it on.
                    waiting.rx = next;
                    self.lead(cut, run, false).await;
                }
                Err(_) => return None,
            }
        }
    }

    /// Runs one batch holding a runner slot, then passes the slot on;
    /// `gather`: yield once first (see [`Coalescer::gathering`]).
    async fn lead<C, F, Fut>(&self, cut: &C, run: &F, gather: bool)
    where
        C: Fn(&[T]) -> usize,
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Vec<R>>,
    {
        // Passes the slot on as it drops: after the batch, when the queue is
        // empty, or when this future is dropped mid-batch (or mid-yield).
        let _slot = Slot { owner: self };
        if gather {
            tokio::task::yield_now().await;
        }
        let (items, replies) = {
            let mut q = self.lock();
            drop_abandoned(&mut q);
            if q.items.is_empty() {
                // `q` drops before `_slot`, which takes the lock again.
                return;
            }
            let n = cut(&q.items).clamp(1, q.items.len());
            let items: Vec<T> = q.items.drain(..n).collect();
            let replies: Vec<Reply<T, R>> = q.replies.drain(..n).collect();
            (items, replies)
        };
        let answers = run(items).await;
        for (reply, answer) in replies.into_iter().zip(answers) {
            let _ = reply.send(Msg::Done(answer));
        }
    }
}

/// Hands the runner slot to the caller of the first queued item that is
/// still waiting (items of callers that went away are dropped unanswered on
/// the way); with none, the slot is released.
fn pass_slot<T, R>(q: &mut Queue<T, R>) {
    while !q.replies.is_empty() {
        let (tx, rx) = oneshot::channel();
        let first = std::mem::replace(&mut q.replies[0], tx);
        if first.send(Msg::Lead(rx)).is_ok() {
            return;
        }
        q.items.remove(0);
        q.replies.remove(0);
    }
    q.running -= 1;
}

/// Takes out of the queue the items whose callers went away (their answer
/// could reach no one; a write whose client timed out and may retry must not
/// be proposed behind its back). [`pass_slot`] only skips such items at the
/// head of the queue; a batch must not carry them from further back.
fn drop_abandoned<T, R>(q: &mut Queue<T, R>) {
    if q.replies.iter().all(|r| !r.is_closed()) {
        return;
    }
    // One reading per reply: a caller may go away while this runs, and
    // items and replies must stay paired.
    let keep: Vec<bool> = q.replies.iter().map(|r| !r.is_closed()).collect();
    let mut k = keep.iter();
    q.items.retain(|_| *k.next().unwrap_or(&true));
    let mut k = keep.iter();
    q.replies.retain(|_| *k.next().unwrap_or(&true));
}

/// A caller's wait for its item's answer. If the caller goes away after the
/// runner slot was sent to it but before it took the slot, the slot passes
/// on as this drops; otherwise `running` would count a runner that never
/// runs, and with one slot nothing queued would ever run again.
struct Waiting<'a, T, R> {
    owner: &'a Coalescer<T, R>,
    rx: oneshot::Receiver<Msg<T, R>>,
}

impl<T, R> Drop for Waiting<'_, T, R> {
    fn drop(&mut self) {
        // After `close`, nothing more can be sent; what was sent before is
        // still there to take.
        self.rx.close();
        if let Ok(Msg::Lead(next)) = self.rx.try_recv() {
            // The item's answer would go to `next`: dropping it makes the
            // item abandoned, and `pass_slot` skips it.
            drop(next);
            pass_slot(&mut self.owner.lock());
        }
    }
}

/// A held runner slot; as it drops (its batch done, or the runner's future
/// dropped mid-batch) it passes to the first waiting caller.
struct Slot<'a, T, R> {
    owner: &'a Coalescer<T, R>,
}

impl<T, R> Drop for Slot<'_, T, R> {
    fn drop(&mut self) {
        pass_slot(&mut self.owner.lock());
    }
}

/// A stretch of synchronous work a runner does on its worker (validator or
/// evaluator calls back to back): [`Stretch::pause`] lets the worker's other
/// tasks run once the stretch has lasted `at_most`, then starts a new one.
pub struct Stretch {
    started: Instant,
    at_most: Duration,
}

impl Stretch {
    /// A stretch starting now.
    pub fn new(at_most: Duration) -> Self {
        Stretch {
            started: Instant::now(),
            at_most,
        }
    }

    /// Yields once if the stretch has lasted `at_most`.
    pub async fn pause(&mut self) {
        if self.started.elapsed() >= self.at_most {
            tokio::task::yield_now().await;
            self.started = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    fn echo_slowly(
        batches: Arc<AtomicUsize>,
        delay: Duration,
    ) -> impl Fn(Vec<u32>) -> std::pin::Pin<Box<dyn Future<Output = Vec<u32>> + Send>> {
        move |items| {
            batches.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                items.into_iter().map(|i| i * 10).collect()
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_batches_and_get_their_own_answers() {
        let c = Arc::new(Coalescer::<u32, u32>::new(1));
        let batches = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50u32)
            .map(|i| {
                let (c, batches) = (c.clone(), batches.clone());
                tokio::spawn(async move {
                    let run = echo_slowly(batches, Duration::from_millis(2));
                    c.call(i, |q| q.len(), run).await
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), Some(i as u32 * 10));
        }
        let n = batches.load(Ordering::SeqCst);
        assert!(n < 50, "{n} batches for 50 calls: nothing was shared");
    }

    #[tokio::test]
    async fn items_submitted_together_form_one_batch() {
        let c = Coalescer::<u32, u32>::new(1);
        let batches = Arc::new(AtomicUsize::new(0));
        let run = echo_slowly(batches.clone(), Duration::from_millis(1));
        let got = c.call_all(vec![1, 2, 3, 4], |q| q.len(), &run).await;
        assert_eq!(got, vec![Some(10), Some(20), Some(30), Some(40)]);
        assert_eq!(
            batches.load(Ordering::SeqCst),
            1,
            "the idle coalescer split the list"
        );
        // `cut` still bounds the batches; answers stay in order.
        let got = c.call_all(vec![5, 6, 7], |q| q.len().min(2), &run).await;
        assert_eq!(got, vec![Some(50), Some(60), Some(70)]);
        assert_eq!(batches.load(Ordering::SeqCst), 3);
        assert_eq!(c.call_all(vec![], |q| q.len(), &run).await, vec![]);
    }

    /// `n` tasks that become ready together, each calling `c` with a
    /// synchronous `run`; returns the sizes of the batches that ran.
    async fn ready_together(c: Arc<Coalescer<u32, u32>>, n: u32) -> Vec<usize> {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let (c, sizes) = (c.clone(), sizes.clone());
                tokio::spawn(async move {
                    let run = |items: Vec<u32>| {
                        sizes.lock().unwrap().push(items.len());
                        std::future::ready(items.into_iter().map(|i| i + 1).collect())
                    };
                    c.call(i, |q| q.len(), run).await
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), Some(i as u32 + 1));
        }
        // Every task is done and has dropped its clone.
        Arc::try_unwrap(sizes).unwrap().into_inner().unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_gathering_runner_takes_the_calls_ready_with_it() {
        // On one thread the spawned tasks run in turn. A plain runner finds
        // only its own call queued; a gathering one yields first, and the
        // other nine queue theirs meanwhile.
        let plain = ready_together(Arc::new(Coalescer::new(1)), 10).await;
        assert_eq!(plain, vec![1; 10]);
        let gathered = ready_together(Arc::new(Coalescer::gathering(1)), 10).await;
        assert_eq!(gathered, vec![10]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cut_bounds_a_batch() {
        let c = Arc::new(Coalescer::<u32, u32>::new(1));
        let largest = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..40u32)
            .map(|i| {
                let (c, largest) = (c.clone(), largest.clone());
                tokio::spawn(async move {
                    let run = |items: Vec<u32>| {
                        largest.fetch_max(items.len(), Ordering::SeqCst);
                        async move {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            items
                        }
                    };
                    c.call(i, |q| q.len().min(3), run).await
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), Some(i as u32));
        }
        assert!(largest.load(Ordering::SeqCst) <= 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_runner_passes_its_slot_on() {
        let c = Arc::new(Coalescer::<u32, u32>::new(1));
        let batches = Arc::new(AtomicUsize::new(0));
        // The runner: its batch takes long, and its caller gives up.
        let runner = {
            let (c, batches) = (c.clone(), batches.clone());
            tokio::spawn(async move {
                c.call(
                    1,
                    |q| q.len(),
                    echo_slowly(batches, Duration::from_secs(60)),
                )
                .await
            })
        };
        until("the runner's batch starts", || {
            batches.load(Ordering::SeqCst) > 0
        })
        .await;
        // Two callers queue behind the running batch.
        let waiters: Vec<_> = [2u32, 3]
            .into_iter()
            .map(|i| {
                let (c, batches) = (c.clone(), batches.clone());
                tokio::spawn(async move {
                    c.call(i, |q| q.len(), echo_slowly(batches, Duration::ZERO))
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        runner.abort();
        assert!(runner.await.unwrap_err().is_cancelled());
        for (t, want) in waiters.into_iter().zip([20, 30]) {
            let got = tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("a waiter took over the slot")
                .unwrap();
            assert_eq!(got, Some(want));
        }
        // And the coalescer still works afterwards.
        let after = c
            .call(4, |q| q.len(), echo_slowly(batches, Duration::ZERO))
            .await;
        assert_eq!(after, Some(40));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runner_answers_its_caller_while_later_batches_run() {
        // Each batch waits for its own gate; the test opens them one by one.
        let c = Arc::new(Coalescer::<u32, u32>::new(1));
        let gates = Arc::new([
            tokio::sync::Semaphore::new(0),
            tokio::sync::Semaphore::new(0),
        ]);
        let started = Arc::new(AtomicUsize::new(0));
        let call = |i: u32| {
            let (c, gates, started) = (c.clone(), gates.clone(), started.clone());
            tokio::spawn(async move {
                let run = |items: Vec<u32>| {
                    let n = started.fetch_add(1, Ordering::SeqCst);
                    let gates = gates.clone();
                    async move {
                        let _ = gates[n.min(1)].acquire().await.unwrap();
                        items
                    }
                };
                c.call(i, |q| q.len(), run).await
            })
        };
        let first = call(1);
        until("the first batch starts", || {
            started.load(Ordering::SeqCst) > 0
        })
        .await;
        // A second caller queues behind the running batch.
        let second = call(2);
        until("the second caller queues", || !c.lock().items.is_empty()).await;
        gates[0].add_permits(1);
        // The first caller is answered although the second batch is still
        // running (it used to run the queue until it was empty first).
        let got = within(
            "the runner's own call returns while the next batch runs",
            first,
        )
        .await;
        assert_eq!(got.unwrap(), Some(1));
        until(
            "the second caller takes the slot and starts its batch",
            || started.load(Ordering::SeqCst) >= 2,
        )
        .await;
        gates[1].add_permits(1);
        let got = within("the second caller runs its batch", second).await;
        assert_eq!(got.unwrap(), Some(2));
    }

    /// A coalescer whose first batch waits for `gate`; every batch's items
    /// are recorded in `seen`.
    struct Gated {
        c: Arc<Coalescer<u32, u32>>,
        gate: Arc<tokio::sync::Semaphore>,
        seen: Arc<Mutex<Vec<Vec<u32>>>>,
    }

    impl Gated {
        fn new() -> Self {
            Gated {
                c: Arc::new(Coalescer::new(1)),
                gate: Arc::new(tokio::sync::Semaphore::new(0)),
                seen: Arc::new(Mutex::new(Vec::new())),
            }
        }

        fn call(&self, i: u32) -> impl Future<Output = Option<u32>> + Send + 'static {
            let (c, gate, seen) = (self.c.clone(), self.gate.clone(), self.seen.clone());
            async move {
                let run = |items: Vec<u32>| {
                    let first = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(items.clone());
                        seen.len() == 1
                    };
                    let gate = gate.clone();
                    async move {
                        if first {
                            let _ = gate.acquire().await.unwrap();
                        }
                        items.into_iter().map(|i| i * 10).collect()
                    }
                };
                c.call(i, |q| q.len(), run).await
            }
        }

        /// Calls with item 1 and returns once its batch runs (held at the
        /// gate), with the call's task.
        async fn first_batch_running(&self) -> tokio::task::JoinHandle<Option<u32>> {
            let runner = tokio::spawn(self.call(1));
            until("the first batch runs", || {
                !self.seen.lock().unwrap().is_empty()
            })
            .await;
            runner
        }

        fn queued(&self) -> usize {
            self.c.lock().items.len()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_gone_before_it_took_the_slot_passes_it_on() {
        let g = Gated::new();
        let runner = g.first_batch_running().await;
        // A caller queues behind it (polled once, then never again).
        let mut gone = Box::pin(g.call(2));
        assert!(futures::poll!(&mut gone).is_pending());
        assert_eq!(g.queued(), 1);
        // The batch ends and hands the slot to that caller, which goes away
        // (a timeout, a client that hung up) before it takes it.
        g.gate.add_permits(1);
        assert_eq!(
            within("the runner's answer", runner).await.unwrap(),
            Some(10)
        );
        drop(gone);
        // The slot was not lost with it: later calls still run.
        assert_eq!(within("a later call", g.call(3)).await, Some(30));
        assert_eq!(*g.seen.lock().unwrap(), vec![vec![1], vec![3]]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_leaves_out_the_items_of_callers_gone() {
        let g = Gated::new();
        let runner = g.first_batch_running().await;
        let second = tokio::spawn(g.call(2));
        until("the second caller queues", || g.queued() == 1).await;
        let mut gone = Box::pin(g.call(3));
        assert!(futures::poll!(&mut gone).is_pending());
        let fourth = tokio::spawn(g.call(4));
        until("the fourth caller queues", || g.queued() == 3).await;
        // The third caller gives up while it waits in the middle of the queue.
        drop(gone);
        g.gate.add_permits(1);
        assert_eq!(within("the runner", runner).await.unwrap(), Some(10));
        assert_eq!(within("the second", second).await.unwrap(), Some(20));
        assert_eq!(within("the fourth", fourth).await.unwrap(), Some(40));
        assert_eq!(*g.seen.lock().unwrap(), vec![vec![1], vec![2, 4]]);
    }

    /// Yields until `holds()`; fails the test, naming `what`, after 5 s.
    async fn until(what: &str, holds: impl Fn() -> bool) {
        within(what, async {
            while !holds() {
                tokio::task::yield_now().await;
            }
        })
        .await
    }

    /// `fut`'s output; fails the test, naming `what`, after 5 s.
    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .unwrap_or_else(|_| panic!("not within 5 s: {what}"))
    }

    #[tokio::test]
    async fn too_few_answers_leave_the_rest_unanswered() {
        let c = Coalescer::<u32, u32>::new(1);
        let got = c.call(7, |q| q.len(), |_items| async { Vec::new() }).await;
        assert_eq!(got, None);
    }
}
