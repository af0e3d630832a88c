//! Test harness: in-process nodes and `flagstone` processes on 127.0.0.1:0,
//! a small HTTP client, and bounded waits.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flagstone::node::RaftTuning;
use flagstone::{Node, NodeConfig};

/// Raft timings for tests: quick elections, frequent snapshots when asked.
pub fn fast_tuning() -> RaftTuning {
    RaftTuning {
        heartbeat_ms: 50,
        election_timeout_ms: (250, 500),
        ..RaftTuning::default()
    }
}

/// Polls `check` every 25 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Starts an in-process node on 127.0.0.1:0 with test timings, after
/// `configure` has adjusted its config.
pub async fn start_with(id: u64, dir: &Path, configure: impl FnOnce(&mut NodeConfig)) -> Arc<Node> {
    start_on(0, id, dir, configure).await
}

/// [`start_with`] on `127.0.0.1:port` (0: any free port).
pub async fn start_on(
    port: u16,
    id: u64,
    dir: &Path,
    configure: impl FnOnce(&mut NodeConfig),
) -> Arc<Node> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let mut config = NodeConfig::new(id, dir.join(format!("node-{id}")));
    config.raft = fast_tuning();
    configure(&mut config);
    Node::start(config, listener).await.unwrap()
}

/// Starts an in-process node on 127.0.0.1:0.
pub async fn start_node(id: u64, dir: &Path, join: Option<&str>, tuning: RaftTuning) -> Arc<Node> {
    start_with(id, dir, |c| {
        c.join = join.map(str::to_owned);
        c.raft = tuning;
    })
    .await
}

/// A port on 127.0.0.1 with nothing listening on it (yet).
pub fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A single-node cluster in a fresh temporary directory, ready for writes.
pub async fn single_node(
    configure: impl FnOnce(&mut NodeConfig),
) -> (tempfile::TempDir, Arc<Node>) {
    let dir = tempfile::tempdir().unwrap();
    let node = start_with(1, dir.path(), configure).await;
    wait_converged(std::slice::from_ref(&node), 1).await;
    (dir, node)
}

/// Waits until `nodes` all agree on one leader and on `voters` voters.
pub async fn wait_converged(nodes: &[Arc<Node>], voters: usize) -> u64 {
    wait_for("cluster to converge", Duration::from_secs(20), || async {
        let infos: Vec<_> = nodes.iter().map(|n| n.cluster_info()).collect();
        let leader = infos[0].leader_id?;
        let ok = infos.iter().all(|i| {
            i.leader_id == Some(leader)
                && i.term == infos[0].term
                && i.members.iter().filter(|m| m.voter).count() == voters
        });
        ok.then_some(leader)
    })
    .await
}

/// A 3-node in-process cluster: node 1 initializes, 2 and 3 join it.
pub async fn cluster3(dir: &Path, tuning: RaftTuning) -> Vec<Arc<Node>> {
    let n1 = start_node(1, dir, None, tuning.clone()).await;
    let seed = n1.advertise().to_owned();
    let n2 = start_node(2, dir, Some(&seed), tuning.clone()).await;
    let n3 = start_node(3, dir, Some(&seed), tuning).await;
    let nodes = vec![n1, n2, n3];
    wait_converged(&nodes, 3).await;
    nodes
}

pub fn url(node: &Node, path: &str) -> String {
    format!("{}{path}", node.advertise())
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A `flagstone serve` child process.
pub struct Proc {
    pub id: u64,
    pub data_dir: PathBuf,
    pub url: String,
    /// Extra `serve` arguments, given again on restart.
    args: Vec<String>,
    child: Option<Child>,
}

/// Where a node's log goes: nowhere, or appended to `node-<id>.log` in
/// `FLAGSTONE_TEST_NODE_LOGS` (a directory) when that is set, to look into a
/// failure.
fn node_stderr(id: u64) -> Stdio {
    let Some(dir) = std::env::var_os("FLAGSTONE_TEST_NODE_LOGS") else {
        return Stdio::null();
    };
    let path = Path::new(&dir).join(format!("node-{id}.log"));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map(Stdio::from)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

impl Proc {
    /// Spawns a node; `listen` may be `127.0.0.1:0`.
    pub fn spawn(id: u64, data_dir: &Path, listen: &str, join: Option<&str>) -> Proc {
        Proc::spawn_with(id, data_dir, listen, join, &[])
    }

    /// [`Proc::spawn`] with extra `serve` arguments.
    pub fn spawn_with(
        id: u64,
        data_dir: &Path,
        listen: &str,
        join: Option<&str>,
        args: &[&str],
    ) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flagstone"));
        cmd.args([
            "serve",
            "--id",
            &id.to_string(),
            "--listen",
            listen,
            "--data-dir",
        ])
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        // Exercises `--threads` (via its env var) in every process test.
        .env("FLAGSTONE_THREADS", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(node_stderr(id));
        if let Some(j) = join {
            cmd.args(["--join", j]);
        }
        cmd.args(args);
        let mut child = cmd.spawn().expect("spawn flagstone");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http://"))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Proc {
            id,
            data_dir: data_dir.to_owned(),
            url,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: Some(child),
        }
    }

    /// The `host:port` the node listens on.
    pub fn listen(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the node.
    pub fn signal(&self, signal: &str) {
        let c = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .args([format!("-{signal}"), c.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} node {}", self.id);
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let pid = c.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "node {} ignored SIGTERM",
                self.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the node again on the same address and data dir.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        let listen = self.listen().to_owned();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let again = Proc::spawn_with(self.id, &self.data_dir, &listen, None, &args);
        assert_eq!(again.url, self.url);
        *self = again;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `GET /v1/cluster` as JSON.
pub async fn cluster_json(c: &reqwest::Client, base: &str) -> Option<serde_json::Value> {
    c.get(format!("{base}/v1/cluster"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// Waits until the process cluster agrees on a leader with `voters` voters.
pub async fn wait_proc_converged(c: &reqwest::Client, procs: &[&Proc], voters: usize) -> u64 {
    wait_for(
        "process cluster to converge",
        Duration::from_secs(30),
        || async {
            let mut leader = None;
            for p in procs {
                let j = cluster_json(c, &p.url).await?;
                let l = j["leader_id"].as_u64()?;
                let v = j["members"]
                    .as_array()?
                    .iter()
                    .filter(|m| m["voter"] == true)
                    .count();
                if v != voters || leader.is_some_and(|x| x != l) {
                    return None;
                }
                leader = Some(l);
            }
            leader
        },
    )
    .await
}

/// Builds the guest plugins (flag-schema, rollout, audit and the test
/// plugins) for wasm32-wasip2 once per test process, in their own target
/// dir, and returns the directory holding the `.wasm` files.
pub fn plugin_wasm_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .to_owned();
            let target = root.join("target/plugins");
            let status = Command::new(env!("CARGO"))
                .current_dir(&root)
                .args([
                    "build",
                    "--target",
                    "wasm32-wasip2",
                    "--profile",
                    "plugin",
                    "--target-dir",
                ])
                .arg(&target)
                .args(["-p", "flag-schema", "-p", "rollout", "-p", "audit"])
                .args([
                    "-p", "looper", "-p", "membomb", "-p", "trapper", "-p", "escaper",
                ])
                .status()
                .expect("run cargo to build the plugins");
            assert!(status.success(), "building the plugins failed");
            target.join("wasm32-wasip2/plugin")
        })
        .clone()
}

/// A fresh plugins directory holding copies of the named plugins
/// (file names without `.wasm`, e.g. `flag_schema`).
pub fn plugins_dir(under: &Path, names: &[&str]) -> PathBuf {
    let built = plugin_wasm_dir();
    let dir = under.join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    for n in names {
        std::fs::copy(
            built.join(format!("{n}.wasm")),
            dir.join(format!("{n}.wasm")),
        )
        .unwrap();
    }
    dir
}

/// Compiled plugins are cached here, shared by every test node.
pub fn shared_plugin_cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins/compile-cache")
}

/// Starts an in-process node that loads plugins from `plugins`.
pub async fn start_plugin_node(
    id: u64,
    dir: &Path,
    join: Option<&str>,
    plugins: &Path,
    limits: flagstone::plugins::Limits,
) -> Arc<Node> {
    start_with(id, dir, |c| {
        c.join = join.map(str::to_owned);
        c.plugins_dir = Some(plugins.to_owned());
        c.plugin_limits = limits;
        c.plugin_reload_every = Duration::from_millis(100);
        c.plugin_cache_dir = Some(shared_plugin_cache());
    })
    .await
}

/// Limits for tests that check answers, not deadlines: on a loaded 2-core
/// machine running debug builds, a 10 ms wall-clock deadline can expire
/// while the thread is merely descheduled. Deadline tests use the defaults.
pub fn generous_limits() -> flagstone::plugins::Limits {
    flagstone::plugins::Limits {
        validate: Duration::from_secs(2),
        evaluate: Duration::from_secs(2),
        on_change: Duration::from_secs(2),
        ..flagstone::plugins::Limits::default()
    }
}

/// `GET url` as JSON (panics on transport errors or a non-JSON body).
pub async fn get_json(c: &reqwest::Client, url: impl reqwest::IntoUrl) -> serde_json::Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

/// The store's revision as `GET /v1/kv` reports it on `base`.
pub async fn list_revision(c: &reqwest::Client, base: &str) -> u64 {
    get_json(c, format!("{base}/v1/kv")).await["revision"]
        .as_u64()
        .unwrap()
}
