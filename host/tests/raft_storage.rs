//! The fjall log store and state machine under openraft: the storage
//! conformance suite, and how the leader's own log flush interacts with
//! commit (three in-process Raft nodes over real fjall stores; only the
//! network between them is an in-memory router).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use flagstone::raft::{
    Command, Entry, KvReader, LogId, LogStore, NodeId, Raft, StateMachineStore, StorageError,
    TypeConfig, open_storage,
};
use openraft::error::{
    ClientWriteError, InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{BasicNode, RaftLogReader, RaftMetrics, Vote};
use tokio::sync::Mutex;

/// Builds stores for the node with this id.
struct FjallBuilder(NodeId);

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for FjallBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = open_storage(dir.path(), self.0).expect("open storage");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    // The suite's entries name node 0 as their leader: node 0's store
    // queues them for the writer thread, node 1's (a follower's) writes
    // them in place when the writer is idle. Both must pass.
    Suite::test_all(FjallBuilder(0)).expect("storage suite, writer thread");
    Suite::test_all(FjallBuilder(1)).expect("storage suite, in place");
}

// ---------------------------------------------------------------------------
// A log store whose disk can be made to stall.

/// The real [`LogStore`], with a gate: while it is closed, appends are held
/// back before they reach the store (as behind a stalled disk) but stay
/// readable, as `RaftLogStorage::append` requires; their flush is reported only
/// after the gate opens and the store has synced them.
#[derive(Clone)]
struct Gated {
    inner: LogStore,
    gate: Arc<Mutex<Gate>>,
}

#[derive(Default)]
struct Gate {
    closed: bool,
    held: Vec<(Vec<Entry>, LogFlushed<TypeConfig>)>,
}

impl Gated {
    fn new(inner: LogStore) -> Self {
        Gated {
            inner,
            gate: Arc::default(),
        }
    }

    async fn close(&self) {
        self.gate.lock().await.closed = true;
    }

    /// Number of appends held back.
    async fn held(&self) -> usize {
        self.gate.lock().await.held.len()
    }

    /// Lets the held appends through, in order.
    async fn open(&self) {
        let mut gate = self.gate.lock().await;
        gate.closed = false;
        let mut inner = self.inner.clone();
        for (entries, callback) in std::mem::take(&mut gate.held) {
            inner.append(entries, callback).await.expect("append");
        }
    }

    fn held_entries(gate: &Gate) -> impl Iterator<Item = &Entry> {
        gate.held.iter().flat_map(|(entries, _)| entries)
    }
}

impl RaftLogReader<TypeConfig> for Gated {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let gate = self.gate.lock().await;
        let mut out = self.inner.try_get_log_entries(range.clone()).await?;
        out.extend(
            Gated::held_entries(&gate)
                .filter(|e| range.contains(&e.log_id.index))
                .cloned(),
        );
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for Gated {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let gate = self.gate.lock().await;
        let mut state = self.inner.get_log_state().await?;
        if let Some(last) = Gated::held_entries(&gate).last() {
            state.last_log_id = Some(last.log_id);
        }
        Ok(state)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.inner.save_vote(vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.inner.read_vote().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.inner.save_committed(committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.inner.read_committed().await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut gate = self.gate.lock().await;
        if gate.closed {
            gate.held.push((entries.into_iter().collect(), callback));
            Ok(())
        } else {
            self.inner.append(entries, callback).await
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        assert_eq!(self.held().await, 0, "truncating behind a closed gate");
        self.inner.truncate(log_id).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.inner.purge(log_id).await
    }
}

// ---------------------------------------------------------------------------
// An in-memory network between in-process nodes, with links that can be cut.

#[derive(Clone, Default)]
struct Router {
    nodes: Arc<StdMutex<HashMap<NodeId, Raft>>>,
    isolated: Arc<StdMutex<BTreeSet<NodeId>>>,
    /// Every AppendEntries request delivered, in order.
    appends: Arc<StdMutex<Vec<Append>>>,
}

/// What one delivered AppendEntries carried.
#[derive(Debug, Clone, Copy)]
struct Append {
    to: NodeId,
    /// Index of its last entry (`None`: a heartbeat).
    last_entry: Option<u64>,
    /// The leader's commit index it carried.
    commit: Option<u64>,
}

struct Link {
    router: Router,
    from: NodeId,
    to: NodeId,
}

impl Router {
    fn isolate(&self, id: NodeId) {
        self.isolated.lock().unwrap().insert(id);
    }

    fn heal(&self, id: NodeId) {
        self.isolated.lock().unwrap().remove(&id);
    }

    fn appends_to(&self, id: NodeId) -> u64 {
        let appends = self.appends.lock().unwrap();
        appends.iter().filter(|a| a.to == id).count() as u64
    }

    fn appends_log(&self) -> Vec<Append> {
        self.appends.lock().unwrap().clone()
    }

    /// The node at `to`, unless either end is isolated.
    fn target(&self, from: NodeId, to: NodeId) -> Option<Raft> {
        let isolated = self.isolated.lock().unwrap();
        if isolated.contains(&from) || isolated.contains(&to) {
            return None;
        }
        self.nodes.lock().unwrap().get(&to).cloned()
    }
}

/// One node's view of the router.
struct Endpoint {
    router: Router,
    from: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for Endpoint {
    type Network = Link;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Link {
        Link {
            router: self.router.clone(),
            from: self.from,
            to: target,
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Link {
    fn raft(&self) -> Option<Raft> {
        self.router.target(self.from, self.to)
    }

    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new(self.to, e))
    }

    fn cut<E: std::error::Error>(&self) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        let cut = std::io::Error::other(format!("link {} -> {} is cut", self.from, self.to));
        RPCError::Unreachable(Unreachable::new(&cut))
    }
}

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let raft = self.raft().ok_or_else(|| self.cut())?;
        self.router.appends.lock().unwrap().push(Append {
            to: self.to,
            last_entry: rpc.entries.last().map(|e| e.log_id.index),
            commit: rpc.leader_commit.map(|c| c.index),
        });
        raft.append_entries(rpc).await.map_err(|e| self.remote(e))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let raft = self.raft().ok_or_else(|| self.cut())?;
        raft.install_snapshot(rpc).await.map_err(|e| self.remote(e))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let raft = self.raft().ok_or_else(|| self.cut())?;
        raft.vote(rpc).await.map_err(|e| self.remote(e))
    }
}

/// Three nodes on fjall; node 1 is the leader.
struct Cluster {
    dirs: Vec<tempfile::TempDir>,
    config: Arc<openraft::Config>,
    router: Router,
    rafts: Vec<Raft>,
    logs: Vec<Gated>,
    readers: Vec<KvReader>,
}

/// Starts node `id` on the stores in `dir` and connects it to `router`.
async fn start_node(
    id: NodeId,
    dir: &std::path::Path,
    config: &Arc<openraft::Config>,
    router: &Router,
) -> (Raft, Gated, KvReader) {
    let (log, sm) = open_storage(dir, id).expect("open storage");
    let log = Gated::new(log);
    let reader = sm.reader();
    let endpoint = Endpoint {
        router: router.clone(),
        from: id,
    };
    let raft = Raft::new(id, config.clone(), endpoint, log.clone(), sm)
        .await
        .expect("raft");
    router.nodes.lock().unwrap().insert(id, raft.clone());
    (raft, log, reader)
}

/// Copies the directory tree `from` into `to`.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

impl Cluster {
    async fn start() -> Cluster {
        Cluster::start_with(300, 600).await
    }

    /// Heartbeats every 50 ms, election timeouts between `min` and `max` ms.
    async fn start_with(election_timeout_min: u64, election_timeout_max: u64) -> Cluster {
        Cluster::start_tuned(50, election_timeout_min, election_timeout_max).await
    }

    async fn start_tuned(
        heartbeat_interval: u64,
        election_timeout_min: u64,
        election_timeout_max: u64,
    ) -> Cluster {
        let router = Router::default();
        let config = Arc::new(
            openraft::Config {
                heartbeat_interval,
                election_timeout_min,
                election_timeout_max,
                ..Default::default()
            }
            .validate()
            .expect("raft config"),
        );
        let (mut dirs, mut rafts, mut logs, mut readers) = (vec![], vec![], vec![], vec![]);
        for id in 1..=3 {
            let dir = tempfile::tempdir().expect("temp dir");
            let (raft, log, reader) = start_node(id, dir.path(), &config, &router).await;
            dirs.push(dir);
            rafts.push(raft);
            logs.push(log);
            readers.push(reader);
        }
        let members: BTreeMap<NodeId, BasicNode> = (1..=3)
            .map(|id| (id, BasicNode::new(format!("node-{id}"))))
            .collect();
        rafts[0].initialize(members).await.expect("initialize");
        rafts[0]
            .wait(Some(Duration::from_secs(10)))
            .current_leader(1, "node 1 leads")
            .await
            .expect("leader");
        Cluster {
            dirs,
            config,
            router,
            rafts,
            logs,
            readers,
        }
    }

    /// Stops node `i` as a crash would leave its disk (appends held behind
    /// its gate never reach it) and starts it again from that disk.
    async fn crash_and_restart(&mut self, i: usize) {
        let id = i as NodeId + 1;
        self.router.nodes.lock().unwrap().remove(&id);
        self.rafts[i].shutdown().await.expect("shutdown");
        let dir = tempfile::tempdir().expect("temp dir");
        copy_dir(self.dirs[i].path(), dir.path());
        let (raft, log, reader) = start_node(id, dir.path(), &self.config, &self.router).await;
        self.dirs[i] = dir;
        (self.rafts[i], self.logs[i], self.readers[i]) = (raft, log, reader);
    }

    /// The index in `rafts` of the leader that node `watcher` knows once
    /// `holds` is true of its metrics (within 10 s).
    async fn leader_once(
        &self,
        watcher: usize,
        holds: impl Fn(&RaftMetrics<NodeId, BasicNode>) -> bool + Send,
        what: &str,
    ) -> usize {
        let m = self.rafts[watcher]
            .wait(Some(Duration::from_secs(10)))
            .metrics(holds, what)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        m.current_leader.expect("leader") as usize - 1
    }

    async fn shutdown(self) {
        for raft in &self.rafts {
            raft.shutdown().await.expect("shutdown");
        }
    }
}

fn put(key: &str) -> Command {
    Command::Put {
        key: key.into(),
        value: b"v".to_vec(),
        content_type: None,
        precondition: Default::default(),
    }
}

/// Writes `key` through `raft` and returns the log index it committed at.
async fn write_at(raft: &Raft, key: &str) -> u64 {
    raft.client_write(put(key))
        .await
        .expect("write")
        .log_id
        .index
}

/// The leader sends entries to its followers while its own disk is still busy
/// with them: two followers on disk are a majority, so the write commits with
/// the leader's fsync still outstanding (openraft 0.9 as published waited for
/// the leader's flush before replicating; the vendored patch does not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_replicates_while_its_own_flush_is_pending() {
    let cluster = Cluster::start().await;
    let leader = &cluster.logs[0];
    leader.close().await;

    let written = tokio::time::timeout(
        Duration::from_secs(10),
        cluster.rafts[0].client_write(put("k")),
    )
    .await
    .expect("the write commits on the followers' disks")
    .expect("client write");
    assert!(
        leader.held().await > 0,
        "the leader's own append is still held"
    );
    let index = written.log_id.index;
    for (i, reader) in cluster.readers.iter().enumerate() {
        wait_applied(reader, index).await;
        assert!(reader.get("k").unwrap().is_some(), "node {} has k", i + 1);
    }

    leader.open().await;
    cluster.shutdown().await;
}

/// With one follower unreachable, the leader's own copy is needed for a
/// majority, and it must count only once it is on disk: the write waits for
/// the stalled flush and commits when it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_counts_its_own_copy_only_once_flushed() {
    let cluster = Cluster::start().await;
    cluster.router.isolate(3);
    let leader = &cluster.logs[0];
    leader.close().await;

    let raft = cluster.rafts[0].clone();
    let mut write = tokio::spawn(async move { raft.client_write(put("k")).await });
    let early = tokio::time::timeout(Duration::from_millis(500), &mut write).await;
    assert!(
        early.is_err(),
        "acknowledged with one copy on disk and the leader's still pending"
    );
    assert!(cluster.readers[0].get("k").unwrap().is_none());

    leader.open().await;
    let written = tokio::time::timeout(Duration::from_secs(10), write)
        .await
        .expect("commits once the leader's flush completes")
        .expect("task")
        .expect("client write");
    wait_applied(&cluster.readers[0], written.log_id.index).await;
    assert!(cluster.readers[0].get("k").unwrap().is_some());
    cluster.shutdown().await;
}

/// The leader's followers can hold and commit entries its own disk never got
/// (its flush runs alongside replication). So a leader that crashes and comes
/// back must not resume leading from its saved vote — in the same term it
/// would hand out those log ids again, for other entries, and followers that
/// match log ids by term and index would keep the old ones: replicas diverge.
/// It restarts as a follower; leadership comes from an election in a higher
/// term, which voters with a longer log refuse it. (Published openraft 0.9
/// restores leadership at startup: this test times out on it.)
/// A write whose entry a newer leader replaced before it committed gets
/// `EntryTruncated` (the vendored patch of `DeleteConflictLog`): its outcome
/// is unknown, since in a larger cluster a copy elsewhere could still
/// commit, so it must not look like `ForwardToLeader`, which flagstone
/// retries because it means "refused before the append".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_replaced_by_a_newer_leader_is_reported_truncated() {
    let cluster = Cluster::start().await;
    let first = cluster.rafts[0]
        .client_write(put("first"))
        .await
        .expect("client write");
    // The leader is cut off; its next write is appended to its log only.
    cluster.router.isolate(1);
    let old_leader = cluster.rafts[0].clone();
    let lost = tokio::spawn(async move { old_leader.client_write(put("lost")).await });
    let leader = cluster
        .leader_once(
            1,
            |m| m.current_leader.is_some_and(|l| l != 1),
            "the other two elect a leader",
        )
        .await;
    let next = cluster.rafts[leader]
        .client_write(put("next"))
        .await
        .expect("client write on the new leader");
    cluster.router.heal(1);
    let answer = tokio::time::timeout(Duration::from_secs(10), lost)
        .await
        .expect("the old leader answers once its entry is replaced")
        .expect("task");
    match answer {
        Err(RaftError::APIError(ClientWriteError::EntryTruncated(t))) => {
            assert!(t.index > first.log_id.index, "{t}");
        }
        other => panic!("expected EntryTruncated, got {other:?}"),
    }
    for reader in &cluster.readers {
        wait_applied(reader, next.log_id.index).await;
        assert!(reader.get("next").unwrap().is_some());
        assert!(reader.get("lost").unwrap().is_none());
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leader_leads_again_only_after_an_election() {
    // Election timeouts well above the restart time, so the followers do
    // not start an election while the leader is down.
    let mut cluster = Cluster::start_with(1_500, 2_000).await;
    let first = cluster.rafts[0]
        .client_write(put("first"))
        .await
        .expect("client write");
    let term = first.log_id.leader_id.term;

    // `second` commits on the followers; the leader's own append is held.
    cluster.logs[0].close().await;
    let second = tokio::time::timeout(
        Duration::from_secs(10),
        cluster.rafts[0].client_write(put("second")),
    )
    .await
    .expect("commits on the followers' disks")
    .expect("client write");
    for reader in &cluster.readers[1..] {
        wait_applied(reader, second.log_id.index).await;
    }
    cluster.crash_and_restart(0).await;

    let leader = cluster
        .leader_once(
            0,
            |m| m.current_term > term && m.current_leader.is_some(),
            "a leader elected in a higher term after the restart",
        )
        .await;
    let third = cluster.rafts[leader]
        .client_write(put("third"))
        .await
        .expect("client write");
    assert!(third.log_id.leader_id.term > term);
    for (i, reader) in cluster.readers.iter().enumerate() {
        wait_applied(reader, third.log_id.index).await;
        for key in ["first", "second", "third"] {
            assert!(
                reader.get(key).unwrap().is_some(),
                "node {} has {key}",
                i + 1
            );
        }
    }
    cluster.logs[0].open().await;
    cluster.shutdown().await;
}

/// A new commit index reaches followers on the next AppendEntries when one
/// follows soon (the vendored patch of `replication/mod.rs`), instead of in a
/// heartbeat of its own per commit, and in a heartbeat when none follows —
/// long before the periodic one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_ride_on_the_next_append_or_a_prompt_heartbeat() {
    // Periodic heartbeats every 2 s: none fall inside the test.
    let cluster = Cluster::start_tuned(2_000, 5_000, 6_000).await;
    let leader = &cluster.rafts[0];
    let warm = write_at(leader, "warm-up").await;
    // A steady state first: the follower has applied what the leader has,
    // however slow the machine (the bound here is not what is tested).
    for _ in 0..1000 {
        if cluster.readers[1].applied_index() >= warm {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        cluster.readers[1].applied_index() >= warm,
        "follower never caught up"
    );

    // One AppendEntries per write, plus a heartbeat where the next write came
    // later than the ride delay; a heartbeat per commit would make it 2 per
    // write (75 for 40 before the patch). A write is late only when the
    // machine is busy (other tests run alongside), so a round over the bound
    // is measured again, up to three times: without the patch every round
    // fails.
    const WRITES: u64 = 40;
    let mut rounds = Vec::new();
    for round in 0..3 {
        let before = cluster.router.appends_to(2);
        let mut last = 0;
        for i in 0..WRITES {
            last = write_at(leader, &format!("r{round}-k{i}")).await;
        }
        // The last commit reaches the follower without any further write, well
        // before the next periodic heartbeat (2 s).
        let started = std::time::Instant::now();
        while cluster.readers[1].applied_index() < last {
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "the last commit did not reach the follower promptly"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let sent = cluster.router.appends_to(2) - before;
        rounds.push(sent);
        if sent < WRITES * 3 / 2 {
            break;
        }
    }
    assert!(
        rounds.last().is_some_and(|&sent| sent < WRITES * 3 / 2),
        "AppendEntries to a follower for {WRITES} writes, per round: {rounds:?}"
    );
    cluster.shutdown().await;
}

/// With one write at a time, every write is committed before the next is
/// proposed, so the AppendEntries carrying write `e` carries commit index
/// `e - 1` at least: the leader hands a replication stream the commit index
/// with its next entries (not only with the heartbeat sent when no write
/// follows within the ride delay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_append_carries_the_commit_of_the_write_before() {
    let cluster = Cluster::start_tuned(2_000, 5_000, 6_000).await;
    let leader = &cluster.rafts[0];
    let first = write_at(leader, "warm-up").await;
    let mut last = first;
    for i in 0..40 {
        last = write_at(leader, &format!("k{i}")).await;
    }
    let appends: Vec<Append> = cluster
        .router
        .appends_log()
        .into_iter()
        .filter(|a| a.last_entry.is_some_and(|e| e > first && e <= last))
        .collect();
    assert!(
        appends.len() >= 40,
        "entries were not replicated: {appends:?}"
    );
    for a in &appends {
        let e = a.last_entry.unwrap_or_default();
        assert!(
            a.commit >= Some(e - 1),
            "the AppendEntries of entry {e} to node {} carried commit {:?}: {appends:?}",
            a.to,
            a.commit
        );
    }
    cluster.shutdown().await;
}

async fn wait_applied(reader: &KvReader, index: u64) {
    for _ in 0..200 {
        if reader.applied_index() >= index {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("index {index} not applied within 2 s");
}

/// Applies puts of `keys` at indexes `first..` in term 1.
async fn apply_puts(sm: &mut StateMachineStore, first: u64, keys: &[&str]) {
    use openraft::storage::RaftStateMachine;
    let entries = keys.iter().zip(first..).map(|(key, index)| Entry {
        log_id: openraft::testing::log_id(1, 1, index),
        payload: openraft::EntryPayload::Normal(put(key)),
    });
    sm.apply(entries).await.expect("apply");
}

/// A snapshot build that was started before a newer snapshot was installed,
/// and finishes after it (or at the same time), must not replace the
/// installed snapshot file with its older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_snapshot_build_does_not_replace_an_installed_snapshot() {
    use openraft::RaftSnapshotBuilder;
    use openraft::storage::RaftStateMachine;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    async fn bytes_of(mut file: Box<tokio::fs::File>) -> Vec<u8> {
        let mut bytes = Vec::new();
        file.seek(std::io::SeekFrom::Start(0)).await.expect("seek");
        file.read_to_end(&mut bytes).await.expect("read snapshot");
        bytes
    }

    // The newer snapshot, built on another node that applied more.
    let other_dir = tempfile::tempdir().expect("temp dir");
    let (_log, mut other) = open_storage(other_dir.path(), 1).expect("open storage");
    apply_puts(&mut other, 1, &["a", "b", "c", "d", "e"]).await;
    let newer = other
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build");
    let newer_data = bytes_of(newer.snapshot).await;

    for concurrent in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_log, mut sm) = open_storage(dir.path(), 1).expect("open storage");
        apply_puts(&mut sm, 1, &["a", "b"]).await;
        let mut builder = sm.get_snapshot_builder().await;
        // Received as a follower does, through the state machine's own file.
        let mut data = sm.begin_receiving_snapshot().await.expect("receive");
        data.write_all(&newer_data).await.expect("write");
        data.shutdown().await.expect("flush");
        let built = if concurrent {
            let build = tokio::spawn(async move { builder.build_snapshot().await });
            sm.install_snapshot(&newer.meta, data)
                .await
                .expect("install");
            build.await.expect("task").expect("build")
        } else {
            sm.install_snapshot(&newer.meta, data)
                .await
                .expect("install");
            builder.build_snapshot().await.expect("build")
        };
        // The build still returns the snapshot it was asked for.
        assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(2));

        let current = sm
            .get_current_snapshot()
            .await
            .expect("read current")
            .expect("a current snapshot");
        assert_eq!(current.meta, newer.meta, "concurrent: {concurrent}");
        assert!(bytes_of(current.snapshot).await == newer_data);
        let reader = sm.reader();
        assert_eq!(reader.applied_index(), 5);
        assert!(reader.get("e").unwrap().is_some());
    }
}
