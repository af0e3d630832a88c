//! A flagstone node: opens storage, starts Raft and the HTTP server, joins or
//! initializes the cluster, and offers the library API (the seed's four
//! custom-data operations plus compare-and-set and linearizable reads).
//!
//! # Write path
//! any node → (follower: forward to the leader over `/raft/forward-batch`, batched by
//! `forward.rs`) → key and size checks → group commit (`batcher.rs`), whose
//! runners call the validator plugins on the queued writes back to back
//! (`validate.rs`) → `raft.client_write` → log append (fsync per batch)
//! alongside replication → commit → apply → revision returned.
//!
//! # Read path
//! Local reads answer from this node's applied state. A linearizable read first
//! gets a read index from the leader (which confirms its leadership with a
//! quorum, or by the asking follower's vote: `raft/follower_read.rs`) and waits
//! until this node has applied up to it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::batcher::{self, WriteBatcher};
pub use crate::error::{ClusterError, NodeError, ReadError, WriteError};
use crate::evaluations::Evaluations;
use crate::forward::Forwarder;
use crate::join_intent;
use crate::keys::validate_key;
use crate::peer::PeerClient;
use crate::plugins::types::{EvalContext, Evaluation, EvaluationError};
use crate::plugins::{Limits, PluginHost};
use crate::raft::follower_read::{LeaderView, ReadIndexRequest, confirmed_read_index};
use crate::raft::network::Network;
use crate::raft::network::check_peer_addr;
use crate::raft::removal::VoteRefusals;
use crate::raft::{
    Command, CommandResult, KvReader, NodeId, Precondition, Raft, ValueRecord, open_storage,
};
use crate::read_index::ReadIndexBatcher;
use crate::validate::Validation;

/// How long a request waits for an election before answering "no leader".
const LEADER_WAIT: Duration = Duration::from_secs(3);
/// How many times a write is re-routed after a leader change.
const WRITE_ATTEMPTS: usize = 4;

/// Raft timing and log compaction settings.
#[derive(Debug, Clone)]
pub struct RaftTuning {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Election timeout range (a random value in it is used).
    pub election_timeout_ms: (u64, u64),
    /// Build a snapshot (and purge the log behind it) every this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot, for lagging followers.
    pub keep_behind_snapshot: u64,
    /// Also build a snapshot once this many bytes of entries were appended
    /// since the last one (0: by entries only); see `raft/compaction.rs`.
    pub snapshot_every_bytes: u64,
    /// Keep at most about this many bytes of entries behind a snapshot.
    pub keep_behind_snapshot_bytes: u64,
    /// Largest body a `/raft/*` request may have (default 64 MiB). A larger
    /// AppendEntries is refused with 413 and its sender retries with fewer
    /// entries; snapshot chunks are at most half of it. Keep it well above
    /// one log entry (a write batch: up to ~5 MiB).
    pub rpc_body_limit: usize,
    /// How long a write may wait to be committed (a quorum down: it never
    /// is) before it answers 503, "may or may not have been applied".
    pub write_timeout: Duration,
    /// How long adding a member waits for it to catch up as a learner
    /// before it would be promoted to voter; if it does not, it stays a
    /// learner and the request fails (a voter that cannot be reached would
    /// cost the cluster its quorum).
    pub learner_catch_up: Duration,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 100,
            election_timeout_ms: (400, 800),
            snapshot_every: 10_000,
            keep_behind_snapshot: 1_000,
            snapshot_every_bytes: 256 * 1024 * 1024,
            keep_behind_snapshot_bytes: 64 * 1024 * 1024,
            rpc_body_limit: 64 * 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            learner_catch_up: Duration::from_secs(20),
        }
    }
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id, unique in the cluster.
    pub id: NodeId,
    /// Where the database and snapshots live.
    pub data_dir: PathBuf,
    /// URL other nodes use to reach this one; defaults to `http://<listen addr>`.
    pub advertise: Option<String>,
    /// A member to ask for admission: from an empty data dir, or when the
    /// stored membership does not make this node a voter. Recorded in the
    /// data dir (`join_intent`); `None` falls back to the recorded seed.
    pub join: Option<String>,
    /// Raft timing and compaction.
    pub raft: RaftTuning,
    /// Directory of `.wasm` plugins (hot reloaded); `None`: no plugins.
    pub plugins_dir: Option<PathBuf>,
    /// Limits on every plugin call.
    pub plugin_limits: Limits,
    /// How often the plugins directory is checked for changes.
    pub plugin_reload_every: Duration,
    /// Applied changes kept in memory for watchers resuming with `since`.
    /// Watchers and plugins' on-change queues hold references to these: a
    /// change the history dropped before they got to it is lost to them
    /// (reported as lagged), so this also bounds how far they may fall
    /// behind, besides `watch_buffer` and the plugins' queue length.
    pub watch_history: usize,
    /// Bytes of those changes' keys and values kept, at most.
    pub watch_history_bytes: usize,
    /// How far a watcher (or the plugin dispatcher) may fall behind the
    /// applied changes before it is cut off (`slow_consumer`).
    pub watch_buffer: usize,
    /// Where compiled plugins are cached (default `<data_dir>/plugin-cache`);
    /// safe to share between nodes.
    pub plugin_cache_dir: Option<PathBuf>,
    /// Bytes of decoded records of hot keys kept for point reads (0: none).
    pub read_cache_bytes: u64,
    /// How long a client may take to send a request's headers, and how long
    /// a request body may pause (`http/server.rs`).
    pub http_read_timeout: Duration,
}

impl NodeConfig {
    /// A config with defaults for everything but the id and data dir.
    pub fn new(id: NodeId, data_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            id,
            data_dir: data_dir.into(),
            advertise: None,
            join: None,
            raft: RaftTuning::default(),
            plugins_dir: None,
            plugin_limits: Limits::default(),
            plugin_reload_every: Duration::from_secs(1),
            plugin_cache_dir: None,
            watch_history: crate::raft::history::DEFAULT_HISTORY,
            watch_history_bytes: crate::raft::history::DEFAULT_HISTORY_BYTES,
            watch_buffer: crate::raft::state_machine::CHANGE_CHANNEL_CAPACITY,
            read_cache_bytes: crate::raft::record_cache::DEFAULT_READ_CACHE_BYTES,
            http_read_timeout: crate::http::server::DEFAULT_READ_TIMEOUT,
        }
    }
}

/// One page of a key listing ([`Node::list_page`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    /// The keys, sorted bytewise.
    pub keys: Vec<String>,
    /// Whether more keys under the prefix follow the last one.
    pub more: bool,
    /// The store's revision when the page was read.
    pub revision: u64,
}

/// Optional conditions and metadata of a put.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    /// Content-Type stored with the value.
    pub content_type: Option<String>,
    /// Compare-and-set condition.
    pub precondition: Precondition,
}

/// One member as shown by `GET /v1/cluster`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Member {
    /// Node id.
    pub id: NodeId,
    /// Advertised URL.
    pub addr: String,
    /// Voter (true) or learner (false).
    pub voter: bool,
}

/// The cluster as this node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterInfo {
    /// This node's id.
    pub node_id: NodeId,
    /// Current leader, if known.
    pub leader_id: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Voters and learners, by id.
    pub members: Vec<Member>,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index applied to the local state machine.
    pub applied_index: u64,
}

/// A running node. Cheap to share (`Arc<Node>`); stop it with [`Node::shutdown`].
pub struct Node {
    id: NodeId,
    advertise: String,
    local_addr: SocketAddr,
    raft: Raft,
    reader: KvReader,
    committed: Arc<AtomicU64>,
    peers: PeerClient,
    /// Votes other nodes refused as from a non-member ([`Node::removed`]).
    refusals: Arc<VoteRefusals>,
    membership_lock: Mutex<()>,
    plugins: Option<Arc<PluginHost>>,
    evaluations: Evaluations,
    read_index: ReadIndexBatcher,
    batcher: WriteBatcher,
    forwarder: Forwarder,
    rpc_body_limit: usize,
    write_timeout: Duration,
    learner_catch_up: Duration,
    /// A leader whose quorum has not answered for longer is not ready.
    quorum_stale_ms: u64,
    leader_read_index: ReadIndexBatcher,
    shutdown_tx: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    background: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Node {
    /// Opens the data dir, starts Raft and serves the HTTP API on `listener`.
    /// A fresh node without `join` (given or recorded in the data dir)
    /// initializes a single-node cluster; with one it asks that member to
    /// add it. An existing data dir resumes; with a seed, a node it does not
    /// make a voter asks to be added again.
    pub async fn start(config: NodeConfig, listener: TcpListener) -> Result<Arc<Node>, NodeError> {
        let local_addr = listener
            .local_addr()
            .map_err(|e| NodeError::Network(e.to_string()))?;
        let advertise = check_config(&config, local_addr)?;
        if let Some(dir) = config.plugins_dir.as_ref().filter(|d| !d.is_dir()) {
            tracing::warn!(
                dir = %dir.display(),
                "the plugins dir is not a directory (yet): no plugins until it is"
            );
        }
        let (mut log_store, mut state_machine) = open_storage(&config.data_dir, config.id)?;
        log_store.purge_after(&state_machine.coverage());
        state_machine.set_history_capacity(config.watch_history, config.watch_history_bytes);
        state_machine.set_watch_buffer(config.watch_buffer);
        state_machine.set_read_cache(config.read_cache_bytes);
        let fresh = {
            use openraft::storage::RaftLogStorage;
            let state = log_store
                .get_log_state()
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            let vote = log_store
                .read_vote()
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            state.last_log_id.is_none() && vote.is_none() && state_machine.is_fresh()
        };
        let reader = state_machine.reader();
        let plugins = match &config.plugins_dir {
            None => None,
            Some(dir) => {
                // wasmtime's cache wants an absolute directory.
                let cache = config
                    .plugin_cache_dir
                    .clone()
                    .unwrap_or_else(|| config.data_dir.join("plugin-cache"));
                let cache = std::path::absolute(cache)
                    .map_err(|e| NodeError::Plugins(format!("plugin cache dir: {e}")))?;
                let host = PluginHost::new(
                    dir,
                    Some(&cache),
                    reader.clone(),
                    config.plugin_limits.clone(),
                )
                .map_err(|e| NodeError::Plugins(e.to_string()))?;
                Some(host)
            }
        };
        let committed = log_store.committed_index();
        let peers = PeerClient::new().map_err(|e| NodeError::Network(e.to_string()))?;
        let tuning = &config.raft;
        let raft_config = openraft::Config {
            cluster_name: "flagstone".into(),
            heartbeat_interval: tuning.heartbeat_ms,
            election_timeout_min: tuning.election_timeout_ms.0,
            election_timeout_max: tuning.election_timeout_ms.1,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_every),
            max_in_snapshot_log_to_keep: tuning.keep_behind_snapshot,
            snapshot_max_chunk_size: (1024 * 1024).min(tuning.rpc_body_limit as u64 / 2).max(1),
            // Also how long the last chunk may take, and that one includes
            // the install (a bulk load of the whole snapshot: 0.4 s for
            // 200 MiB here). At openraft's 200 ms a big install timed out
            // and the leader sent the whole snapshot again.
            install_snapshot_timeout: 10_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        let compaction_log = log_store.clone();
        let refusals = Arc::new(VoteRefusals::default());
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            Network::new(refusals.clone()),
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let compaction = tokio::spawn(crate::raft::compaction::run(
            raft.clone(),
            compaction_log,
            crate::raft::compaction::ByBytes {
                snapshot_every: config.raft.snapshot_every_bytes,
                keep_behind: config.raft.keep_behind_snapshot_bytes,
                keep_behind_entries: config.raft.keep_behind_snapshot,
            },
            shutdown_rx.clone(),
        ));
        let node = Arc::new(Node {
            id: config.id,
            advertise,
            local_addr,
            raft,
            reader,
            committed,
            peers,
            refusals,
            membership_lock: Mutex::new(()),
            plugins,
            evaluations: Evaluations::new(
                tokio::runtime::Handle::current().metrics().num_workers(),
            ),
            read_index: ReadIndexBatcher::default(),
            batcher: WriteBatcher::new(crate::batcher::DEFAULT_INFLIGHT),
            forwarder: Forwarder::default(),
            rpc_body_limit: config.raft.rpc_body_limit,
            write_timeout: config.raft.write_timeout,
            learner_catch_up: config.raft.learner_catch_up,
            quorum_stale_ms: 2 * config.raft.election_timeout_ms.1,
            leader_read_index: ReadIndexBatcher::default(),
            shutdown_tx,
            tasks: std::sync::Mutex::new(Vec::new()),
            background: std::sync::Mutex::new(Vec::new()),
        });

        node.track_background(tokio::spawn(report_removal(Arc::downgrade(&node))));
        if let Some(host) = &node.plugins {
            node.track_background(host.dispatch_changes());
            node.track_background(host.watch_dir(config.plugin_reload_every));
        }
        let app = crate::http::router(node.clone());
        let read_timeout = config.http_read_timeout;
        let stop = node.stopping();
        let server = tokio::spawn(crate::http::server::serve(
            listener,
            app,
            read_timeout,
            stop,
        ));
        node.track(server);
        node.track(compaction);

        // Whom to ask to be added: `--join`, else the seed an earlier start
        // with `--join` recorded in the data dir (`join_intent.rs`).
        let recorded = join_intent::recall(&config.data_dir).map_err(NodeError::JoinIntent)?;
        let seed = config
            .join
            .as_deref()
            .map(with_scheme)
            .or_else(|| recorded.clone());
        if fresh {
            match seed {
                None => {
                    let members = BTreeMap::from([(node.id, BasicNode::new(&node.advertise))]);
                    node.raft
                        .initialize(members)
                        .await
                        .map_err(|e| NodeError::Raft(e.to_string()))?;
                    tracing::info!(id = node.id, "initialized a single-node cluster");
                }
                Some(seed) => {
                    if config.join.is_none() {
                        tracing::info!(
                            seed,
                            "the data dir was started to join a cluster: asking again, not initializing one"
                        );
                    }
                    // On disk before the first request: from then on the
                    // leader may count this node a member.
                    if recorded.as_deref() != Some(seed.as_str()) {
                        join_intent::record(&config.data_dir, &seed)
                            .map_err(NodeError::JoinIntent)?;
                    }
                    let task =
                        tokio::spawn(join_loop(node.clone(), seed, shutdown_rx, Start::Fresh));
                    node.track(task);
                }
            }
        } else if let Some(seed) = seed {
            // A node the leader made a learner but never promoted (the leader
            // or this node failed in between) has cluster state without being
            // a voter: it asks again, as often as a fresh node would.
            let task = tokio::spawn(join_loop(node.clone(), seed, shutdown_rx, Start::Resumed));
            node.track(task);
        }
        Ok(node)
    }

    fn track(&self, task: JoinHandle<()>) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.push(task);
        }
    }

    /// Tasks that run until the node stops (aborted by `shutdown`).
    fn track_background(&self, task: JoinHandle<()>) {
        if let Ok(mut tasks) = self.background.lock() {
            tasks.push(task);
        }
    }

    /// Resolves once the node is shutting down: long-lived responses (watch
    /// and OFREP event streams) end on it, so a graceful shutdown does not
    /// wait on them.
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + use<> {
        let mut rx = self.shutdown_tx.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Serves until `shutdown` resolves, then stops cleanly ([`Node::shutdown`]).
    pub async fn serve_until(&self, shutdown: impl std::future::Future<Output = ()>) {
        shutdown.await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }

    /// Stops serving (in-flight requests finish), stops Raft and flushes.
    pub async fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
        if let Ok(mut bg) = self.background.lock() {
            bg.drain(..).for_each(|t| t.abort());
        }
        let tasks: Vec<_> = match self.tasks.lock() {
            Ok(mut t) => t.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for task in tasks {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                tracing::warn!("a task did not stop within 5 s");
            }
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The socket address the HTTP server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Largest body a `/raft/*` request may have (see [`RaftTuning`]).
    pub fn rpc_body_limit(&self) -> usize {
        self.rpc_body_limit
    }

    /// The URL other nodes use to reach this node.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// The Raft handle (for the RPC server and introspection).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The local read view.
    pub fn reader(&self) -> &KvReader {
        &self.reader
    }

    /// The plugin host, when the node runs with a plugins directory.
    pub fn plugins(&self) -> Option<&Arc<PluginHost>> {
        self.plugins.as_ref()
    }

    /// Evaluates flag `key` for `ctx` from local state, in a batch with the
    /// single-flag evaluations that arrive with it (see [`crate::evaluations`]).
    pub async fn evaluate(
        &self,
        key: &str,
        ctx: EvalContext,
    ) -> Result<Evaluation, EvaluationError> {
        self.evaluations
            .evaluate(&self.reader, self.plugins.as_deref(), key, ctx)
            .await
    }

    /// The peer client.
    pub(crate) fn peers(&self) -> &PeerClient {
        &self.peers
    }

    /// The current leader and its URL, if known.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        known_leader(&self.raft.metrics().borrow())
    }

    /// The leader once one is known that is a member (bounded wait). A
    /// leader just removed from the membership still counts as leader here
    /// until the others elect a new one: a request waits for that election
    /// rather than failing at once.
    async fn wait_for_leader(&self) -> Option<(NodeId, String)> {
        if let Some(l) = self.leader() {
            return Some(l);
        }
        let _ = self
            .raft
            .wait(Some(LEADER_WAIT))
            .metrics(|m| known_leader(m).is_some(), "leader known")
            .await;
        self.leader()
    }

    /// After `stale` failed to act as leader: waits (bounded) until this node
    /// learns of another leader, so the retry goes somewhere new.
    async fn wait_for_leader_change(&self, stale: NodeId) {
        let _ = self
            .raft
            .wait(Some(LEADER_WAIT))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != stale),
                "leader change",
            )
            .await;
    }

    // ---- library API: the seed's four operations --------------------------

    /// Stores `value` under `key` on the cluster; returns the write's revision.
    pub async fn set_custom_data(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
    ) -> Result<u64, WriteError> {
        self.put(key, value.into(), PutOptions::default()).await
    }

    /// Reads `key` from this node's applied state.
    pub async fn get_custom_data(&self, key: &str) -> Result<Option<Vec<u8>>, ReadError> {
        validate_key(key)?;
        Ok(self.reader.get(key)?.map(|r| r.value.clone()))
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete_custom_data(&self, key: &str) -> Result<bool, WriteError> {
        self.delete(key, Precondition::None)
            .await
            .map(|(deleted, _)| deleted)
    }

    /// Keys starting with `prefix` (`""`: all), sorted, from local state.
    pub async fn list_custom_data_keys(&self, prefix: &str) -> Result<Vec<String>, ReadError> {
        Ok(self.reader.list(prefix)?)
    }

    // ---- full API ---------------------------------------------------------

    /// Stores a value with options (content type, compare-and-set).
    pub async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        opts: PutOptions,
    ) -> Result<u64, WriteError> {
        let cmd = Command::Put {
            key: key.to_owned(),
            value,
            content_type: opts.content_type,
            precondition: opts.precondition,
        };
        // Here too, not only on the leader: a follower refuses before it
        // forwards.
        cmd.check()?;
        match self.write(cmd).await? {
            CommandResult::Put { revision } => Ok(revision),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a key, optionally only at a given revision; returns
    /// `(existed, revision)`.
    pub async fn delete(
        &self,
        key: &str,
        precondition: Precondition,
    ) -> Result<(bool, u64), WriteError> {
        let cmd = Command::Delete {
            key: key.to_owned(),
            precondition,
        };
        cmd.check()?;
        match self.write(cmd).await? {
            CommandResult::Delete { deleted, revision } => Ok((deleted, revision)),
            other => Err(unexpected(other)),
        }
    }

    /// Reads a key with its metadata; `linearizable` confirms with the leader
    /// first that this node has applied every write committed before the call.
    pub async fn get(
        &self,
        key: &str,
        linearizable: bool,
    ) -> Result<Option<Arc<ValueRecord>>, ReadError> {
        validate_key(key)?;
        if linearizable {
            self.read_barrier().await?;
        }
        Ok(self.reader.get(key)?)
    }

    /// At most `limit` keys under `prefix` that sort after `after` (`""`:
    /// from the first), with whether more follow and the revision the page
    /// was read at (the listing holds every change up to it).
    pub async fn list_page(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
        linearizable: bool,
    ) -> Result<KeyPage, ReadError> {
        if linearizable {
            self.read_barrier().await?;
        }
        let revision = self.reader.revision_now();
        let (keys, more) = self.reader.list_page(prefix, after, limit)?;
        Ok(KeyPage {
            keys,
            more,
            revision,
        })
    }

    /// Runs `local` if this node leads, else `remote` with the leader's URL.
    /// When the answer says leadership moved (`moved`), waits (bounded) for the
    /// next leader and tries again, a few times.
    async fn with_leader<T, E, L, LF, R, RF>(
        &self,
        no_leader: fn() -> E,
        moved: fn(&E) -> bool,
        local: L,
        remote: R,
    ) -> Result<T, E>
    where
        L: Fn() -> LF,
        LF: std::future::Future<Output = Result<T, E>>,
        R: Fn(String) -> RF,
        RF: std::future::Future<Output = Result<T, E>>,
    {
        let mut last = None;
        for attempt in 0..WRITE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
            }
            let Some((leader, addr)) = self.wait_for_leader().await else {
                return Err(no_leader());
            };
            let result = if leader == self.id {
                local().await
            } else {
                remote(addr).await
            };
            match result {
                Err(e) if moved(&e) => {
                    last = Some(e);
                    self.wait_for_leader_change(leader).await;
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(no_leader))
    }

    /// Routes a command to the leader (forwarding from followers) and turns a
    /// failed precondition into an error.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, WriteError> {
        let write = self.with_leader(
            || WriteError::NoLeader,
            |e| matches!(e, WriteError::NotLeader { .. } | WriteError::NoLeader),
            || self.write_local(cmd.clone()),
            |addr| self.forwarder.forward(&self.peers, self, addr, cmd.clone()),
        );
        let result = tokio::time::timeout(self.write_timeout, write)
            .await
            .unwrap_or_else(|_| {
                Err(WriteError::Unavailable(format!(
                    "not committed within {:?} (is a quorum of the cluster up?)",
                    self.write_timeout
                )))
            });
        match result {
            Ok(CommandResult::PreconditionFailed { current }) => {
                Err(WriteError::PreconditionFailed { current })
            }
            Err(WriteError::NotLeader { .. }) => Err(WriteError::NoLeader),
            other => other,
        }
    }

    /// Proposes a command on this node, which must be the leader. Concurrent
    /// writes are proposed together (see `batcher.rs`); the validator plugins
    /// admit each before its batch is proposed, back to back with the other
    /// writes queued (`validate.rs`).
    pub async fn write_local(&self, cmd: Command) -> Result<CommandResult, WriteError> {
        let cmd = self.checked(cmd)?;
        self.batcher
            .submit(cmd, &self.validation(), |c| self.propose(c))
            .await
    }

    /// [`Node::write_local`] for writes that arrived together (a follower's
    /// forwarded batch): each is checked on its own, and those that pass are
    /// queued for proposal at once, so they share one entry instead of the
    /// first going alone. One result per write, in order.
    pub async fn write_local_all(
        &self,
        cmds: Vec<Command>,
    ) -> Vec<Result<CommandResult, WriteError>> {
        let checked = cmds.into_iter().map(|cmd| self.checked(cmd));
        let validation = self.validation();
        batcher::in_order(
            checked,
            |passed| {
                self.batcher
                    .submit_all(passed, &validation, |c| self.propose(c))
            },
            || {
                Err(WriteError::Unavailable(
                    "a write of the batch got no answer".into(),
                ))
            },
        )
        .await
    }

    /// A write as the leader queues it: an empty content type made none (as
    /// over HTTP), then checked ([`Command::check`]).
    fn checked(&self, cmd: Command) -> Result<Command, WriteError> {
        let cmd = without_empty_content_type(cmd);
        cmd.check()?;
        Ok(cmd)
    }

    /// What admits this node's writes: its validator plugins.
    fn validation(&self) -> Validation<'_> {
        Validation {
            host: self.plugins.as_ref(),
            reader: &self.reader,
        }
    }

    async fn propose(&self, cmd: Command) -> Result<CommandResult, WriteError> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader {
                    leader: f.leader_id,
                })
            }
            // Appended, then replaced by a newer leader's entries: a copy
            // elsewhere may still commit, so it is not retried.
            Err(RaftError::APIError(ClientWriteError::EntryTruncated(t))) => Err(
                WriteError::Unavailable(format!("{t}: it may or may not have been applied")),
            ),
            Err(RaftError::APIError(e)) => Err(WriteError::Unavailable(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(WriteError::Unavailable(e.to_string())),
        }
    }

    /// On the leader: the index a linearizable read must wait for, after
    /// confirming leadership with a quorum.
    pub async fn read_index_local(&self) -> Result<u64, ReadError> {
        match self.raft.get_read_log_id().await {
            Ok((read_log_id, _)) => Ok(read_log_id.map_or(0, |l| l.index)),
            Err(RaftError::APIError(_)) => Err(ReadError::NoLeader),
            Err(RaftError::Fatal(e)) => Err(ReadError::Unavailable(e.to_string())),
        }
    }

    /// On the leader, for a follower's read-index request: answered from the
    /// leader's state when the request itself confirms the leadership
    /// (`raft/follower_read.rs`); otherwise concurrent requests share one
    /// heartbeat round. `None`: a request without the follower's vote.
    pub async fn read_index_for_peer(
        &self,
        req: Option<ReadIndexRequest>,
    ) -> Result<u64, ReadError> {
        if let Some(req) = req {
            let id = self.id;
            let confirmed = self
                .raft
                .with_raft_state(move |st| {
                    let view = LeaderView {
                        id,
                        leading: st.server_state == ServerState::Leader,
                        vote: st.vote_ref(),
                        committed: st.committed.as_ref(),
                        voter_sets: st
                            .membership_state
                            .effective()
                            .membership()
                            .get_joint_config(),
                    };
                    confirmed_read_index(&view, &req)
                })
                .await
                .map_err(|e| ReadError::Unavailable(e.to_string()))?;
            if let Some(index) = confirmed {
                return Ok(index);
            }
        }
        self.leader_read_index
            .read_index(|| self.read_index_local())
            .await
    }

    /// Waits until this node has applied everything committed before the
    /// call. Concurrent callers share read-index requests. Bounded like a
    /// write (the write timeout, 10 s by default): a node cut off from the
    /// leader answers 503 then, not after retrying for as long as it may.
    pub async fn read_barrier(&self) -> Result<(), ReadError> {
        tokio::time::timeout(self.write_timeout, self.read_barrier_unbounded())
            .await
            .unwrap_or_else(|_| {
                Err(ReadError::Unavailable(format!(
                    "could not confirm this read with the leader within {:?}",
                    self.write_timeout
                )))
            })
    }

    async fn read_barrier_unbounded(&self) -> Result<(), ReadError> {
        let index = self
            .read_index
            .read_index(|| self.fetch_read_index())
            .await?;
        if self.reader.applied_index() >= index {
            return Ok(());
        }
        self.raft
            .wait(Some(LEADER_WAIT))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map(|_| ())
            .map_err(|e| ReadError::Unavailable(e.to_string()))
    }

    /// One read-index request: from this node if it leads, else from the leader.
    async fn fetch_read_index(&self) -> Result<u64, ReadError> {
        self.with_leader(
            || ReadError::NoLeader,
            |e| matches!(e, ReadError::NoLeader),
            || self.read_index_local(),
            |addr| async move {
                // Read after the reads this request serves arrived (the batcher
                // starts a request only after its reads), inside the Raft core.
                let vote = self
                    .raft
                    .with_raft_state(|st| *st.vote_ref())
                    .await
                    .map_err(|e| ReadError::Unavailable(e.to_string()))?;
                let req = ReadIndexRequest {
                    from: self.id,
                    vote,
                };
                self.peers.read_index(&addr, &req, LEADER_WAIT).await
            },
        )
        .await
    }

    // ---- cluster ----------------------------------------------------------

    /// The cluster as this node sees it.
    pub fn cluster_info(&self) -> ClusterInfo {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        let applied_index = m.last_applied.map_or(0, |l| l.index);
        ClusterInfo {
            node_id: self.id,
            leader_id: m.current_leader,
            term: m.current_term,
            members,
            commit_index: self.committed.load(Ordering::Relaxed).max(applied_index),
            applied_index,
        }
    }

    /// Whether this node is a voter in the membership it knows.
    pub fn is_voter(&self) -> bool {
        self.has_voter(self.id)
    }

    /// Whether `id` is a voter of the latest membership this node knows
    /// (committed or not; either half of a joint one).
    pub fn has_voter(&self, id: NodeId) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .voter_ids()
            .any(|v| v == id)
    }

    /// Ready: Raft running, a member of a cluster whose leader is a known
    /// member, caught up locally;
    /// a leader also heard from a quorum within two election timeouts (else
    /// its writes cannot commit).
    pub fn is_ready(&self) -> bool {
        let info = self.cluster_info();
        let member = |id: NodeId| info.members.iter().any(|m| m.id == id);
        self.raft_failure().is_none()
            && info.leader_id.is_some_and(member)
            && member(self.id)
            && info.applied_index >= info.commit_index
            && (info.leader_id != Some(self.id)
                || self
                    .millis_since_quorum_ack()
                    .is_some_and(|ms| ms <= self.quorum_stale_ms))
    }

    /// Whether this node looks removed from its cluster: it knows no leader
    /// and every other voter of its membership refused its votes lately as
    /// from a non-member (see `raft/removal.rs`).
    pub fn removed(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        known_leader(&m).is_none()
            && self.refusals.refused_by_all(
                m.membership_config
                    .membership()
                    .voter_ids()
                    .filter(|id| *id != self.id),
                std::time::Instant::now(),
            )
    }

    /// Why this node's Raft core stopped, if it did (a storage error, a
    /// panic, or the node stopping): it then neither writes nor follows
    /// until restarted.
    pub fn raft_failure(&self) -> Option<String> {
        let metrics = self.raft.metrics();
        // The core owns the sending side: the channel closes when its task
        // ends, a panic included (which leaves `running_state` as it was).
        if metrics.has_changed().is_err() {
            return Some("its task ended".into());
        }
        let running = metrics.borrow().running_state.clone();
        running.err().map(|e| e.to_string())
    }

    /// On a leader: how long ago a quorum last acknowledged it.
    pub fn millis_since_quorum_ack(&self) -> Option<u64> {
        self.raft.metrics().borrow().millis_since_quorum_ack
    }

    /// On the leader: adds `id` at `addr` as a learner, waits for it to catch
    /// up, then promotes it to voter. Idempotent for an existing voter.
    /// Refuses (409) an address another member has, or one that answers as
    /// another node; promotes only once the address answers as `id`.
    pub async fn add_member(&self, id: NodeId, addr: &str) -> Result<ClusterInfo, ClusterError> {
        let _guard = self.membership_lock.lock().await;
        let current = self.cluster_info();
        if let Some(other) = current
            .members
            .iter()
            .find(|m| m.id != id && m.addr == addr)
        {
            return Err(ClusterError::AddrInUse {
                addr: addr.to_owned(),
                id: other.id,
            });
        }
        let existing = current.members.iter().find(|m| m.id == id);
        if let Some(m) = existing {
            if m.addr != addr {
                return Err(ClusterError::Conflict {
                    id,
                    addr: m.addr.clone(),
                });
            }
            if m.voter {
                return Ok(current);
            }
        }
        // Whatever answers at `addr` now must be node `id`; nothing there yet
        // is fine (a member may be added before it starts: the wait below
        // covers it).
        if let Ok(found) = self.peers.node_id_at(addr).await
            && found != id
        {
            return Err(ClusterError::WrongNode {
                id,
                addr: addr.to_owned(),
                found,
            });
        }
        let upto = if existing.is_some() {
            // A learner already (a retry): its catch-up is under way, and
            // adding it again would restart it (a new membership rebuilds
            // the replication streams, a snapshot transfer included).
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config.log_id().map_or(0, |l| l.index)
        } else {
            // Not openraft's blocking add: its wait for the learner gives up
            // after half a second and promotes the node all the same.
            self.raft
                .add_learner(id, BasicNode::new(addr), false)
                .await
                .map_err(cluster_err)?
                .log_id
                .index
        };
        self.wait_caught_up(id, upto).await?;
        // A vote only for a node that says it is `id`: one node answering for
        // two ids would count twice towards every quorum.
        match self.peers.node_id_at(addr).await {
            Ok(found) if found == id => {}
            Ok(found) => {
                return Err(ClusterError::WrongNode {
                    id,
                    addr: addr.to_owned(),
                    found,
                });
            }
            Err(e) => {
                return Err(ClusterError::Unconfirmed {
                    id,
                    addr: addr.to_owned(),
                    reason: e.to_string(),
                });
            }
        }
        let mut voters: BTreeSet<NodeId> = current
            .members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect();
        voters.insert(id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(cluster_err)?;
        tracing::info!(id, addr, "added voter");
        Ok(self.cluster_info())
    }

    /// Waits until the leader has replicated to learner `id` everything up
    /// to log index `upto` (the entry that added it), within
    /// `learner_catch_up`.
    async fn wait_caught_up(&self, id: NodeId, upto: u64) -> Result<(), ClusterError> {
        let matched = |m: &openraft::RaftMetrics<NodeId, BasicNode>| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(&id))
                .and_then(|l| l.as_ref())
                .is_some_and(|l| l.index >= upto)
        };
        let me = self.id;
        let waited = self
            .raft
            .wait(Some(self.learner_catch_up))
            .metrics(
                |m| matched(m) || m.current_leader != Some(me),
                "learner caught up",
            )
            .await;
        match waited {
            Ok(m) if matched(&m) => Ok(()),
            Ok(_) => Err(ClusterError::NoLeader),
            Err(openraft::metrics::WaitError::Timeout(..)) => {
                tracing::warn!(id, waited = ?self.learner_catch_up, "learner did not catch up; not promoted");
                Err(ClusterError::NotCaughtUp {
                    id,
                    waited: self.learner_catch_up,
                })
            }
            Err(e) => Err(ClusterError::Failed(e.to_string())),
        }
    }

    /// On the leader: removes `id` from the cluster (voter or learner).
    pub async fn remove_member(&self, id: NodeId) -> Result<ClusterInfo, ClusterError> {
        let _guard = self.membership_lock.lock().await;
        let current = self.cluster_info();
        let Some(member) = current.members.iter().find(|m| m.id == id) else {
            return Err(ClusterError::NotMember(id));
        };
        if member.voter {
            let voters: BTreeSet<NodeId> = current
                .members
                .iter()
                .filter(|m| m.voter && m.id != id)
                .map(|m| m.id)
                .collect();
            if voters.is_empty() {
                return Err(ClusterError::Invalid("cannot remove the last voter".into()));
            }
            self.raft
                .change_membership(voters, false)
                .await
                .map_err(cluster_err)?;
        } else {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(cluster_err)?;
        }
        tracing::info!(id, "removed member");
        Ok(self.cluster_info())
    }
}

fn cluster_err(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ClusterError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => ClusterError::NoLeader,
        other => ClusterError::Failed(other.to_string()),
    }
}

fn unexpected(r: CommandResult) -> WriteError {
    WriteError::Unavailable(format!("unexpected apply result {r:?}"))
}

/// A node URL from what a user typed: `host:port` means `http://host:port`;
/// no trailing slash.
fn with_scheme(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

/// A put with an empty content type stores none, as over HTTP (an older
/// follower forwards `""` for an empty `Content-Type` header).
fn without_empty_content_type(cmd: Command) -> Command {
    match cmd {
        Command::Put {
            key,
            value,
            content_type: Some(ct),
            precondition,
        } if ct.is_empty() => Command::Put {
            key,
            value,
            content_type: None,
            precondition,
        },
        other => other,
    }
}

/// How a node with `--join` started.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// From an empty data dir.
    Fresh,
    /// From a data dir with cluster state.
    Resumed,
}

/// How long a resumed node waits for Raft to report the membership it
/// loaded before it judges whether it is a voter.
const LOADED_MEMBERSHIP_WAIT: Duration = Duration::from_secs(2);

/// Asks the seed to add this node until it succeeds, this node is a voter,
/// or the node stops. A resumed node asks only if the membership it loaded
/// does not make it a voter (a learner nobody promoted).
async fn join_loop(node: Arc<Node>, seed: String, mut stop: watch::Receiver<bool>, start: Start) {
    if start == Start::Resumed {
        // Until its core has run once, Raft reports an empty membership; a
        // data dir without any (only a vote) stays empty: not a voter.
        let _ = node
            .raft
            .wait(Some(LOADED_MEMBERSHIP_WAIT))
            .metrics(
                |m| m.membership_config.log_id().is_some(),
                "the stored membership",
            )
            .await;
        if !node.is_voter() {
            tracing::info!(seed, "resuming as a non-voter: asking to be added again");
        }
    }
    let mut delay = Duration::from_millis(100);
    loop {
        if node.is_voter() {
            tracing::info!("a voter of the cluster: no join needed");
            return;
        }
        match node.peers.join(&seed, node.id, &node.advertise).await {
            Ok(()) => {
                tracing::info!(seed, "joined the cluster");
                return;
            }
            Err(e) => tracing::warn!(seed, error = %e, "join failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Checks what can be checked of `config` before a node starts on
/// `local_addr` (which [`Node::start`] does too), and returns the address
/// the node advertises: the advertised and seed addresses must be usable
/// `http://host:port`, and the data dir must not belong to another node id
/// (it is claimed for this one if it belongs to none).
#[expect(
    clippy::result_large_err,
    reason = "called once per start, with the error type Node::start returns"
)]
pub fn check_config(config: &NodeConfig, local_addr: SocketAddr) -> Result<String, NodeError> {
    let advertise = with_scheme(
        &config
            .advertise
            .clone()
            .unwrap_or_else(|| local_addr.to_string()),
    );
    // Peers reach this node at `advertise` and members are added at such
    // addresses: one they could not use would be refused as a member's.
    check_peer_addr(&advertise)
        .map_err(|e| NodeError::Config(format!("the advertised address: {e}")))?;
    if let Some(seed) = &config.join {
        check_peer_addr(&with_scheme(seed))
            .map_err(|e| NodeError::Config(format!("the seed to join: {e}")))?;
    }
    crate::raft::claim_data_dir(&config.data_dir, config.id)?;
    Ok(advertise)
}

impl crate::forward::LeaderWatch for Node {
    fn leads_at(&self, addr: &str) -> bool {
        self.leader().is_some_and(|(_, a)| a == addr)
    }

    fn moved_from<'a>(
        &'a self,
        addr: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let moved = self
                .raft
                .wait(None)
                .metrics(
                    |m| known_leader(m).is_some_and(|(_, a)| a != addr),
                    "another leader",
                )
                .await;
            if moved.is_err() {
                // The node is stopping: the forward ends some other way.
                std::future::pending::<()>().await;
            }
        })
    }
}

/// Logs when this node starts (and stops) looking removed from its cluster
/// ([`Node::removed`]), until the node is gone.
async fn report_removal(node: std::sync::Weak<Node>) {
    let mut was = false;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(node) = node.upgrade() else { return };
        let now = node.removed();
        if now && !was {
            tracing::warn!(
                "every other voter refuses this node's votes as from a non-member: it was \
                 removed from the cluster. Stop it (to add it again, start it on an empty data \
                 dir with --join)"
            );
        } else if was && !now {
            tracing::info!("this node is counted as a voter again");
        }
        was = now;
    }
}

/// The leader `m` names and its address, if the leader is a member.
fn known_leader(
    m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>,
) -> Option<(NodeId, String)> {
    let id = m.current_leader?;
    let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
    Some((id, addr))
}

/// Runs a node on `listener` until `shutdown` resolves, then stops it cleanly.
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let node = Node::start(config, listener).await?;
    node.serve_until(shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::with_scheme;

    #[test]
    fn node_urls_get_a_scheme_and_lose_the_trailing_slash() {
        assert_eq!(with_scheme("127.0.0.1:7000"), "http://127.0.0.1:7000");
        assert_eq!(with_scheme("http://a:1/"), "http://a:1");
        assert_eq!(with_scheme(" https://a:1 "), "https://a:1");
    }
}
