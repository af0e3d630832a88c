//! Starting the two systems side by side on 127.0.0.1: three `flagstone
//! serve` processes (with the example plugins) and three `etcd` members, both
//! with their default durability (fsync). Only processes started here are
//! stopped, by their handles.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// What processes used so far: CPU time (1/100 s) and context switches.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_ticks: u64,
    pub switches: u64,
}

/// A process this tool started; killed when dropped.
pub struct Proc {
    /// Client address.
    pub addr: SocketAddr,
    child: Child,
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time used so far (user + system), in clock ticks of 1/100 s
    /// (Linux's `USER_HZ`); 0 if `/proc` cannot tell.
    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks_of(self.child.id())
    }

    /// Context switches so far, voluntary and not, summed over the
    /// process's live threads (`/proc/PID/task/*/status`); 0 if `/proc`
    /// cannot tell.
    pub fn switches(&self) -> u64 {
        switches_of(self.child.id())
    }

    /// Resident set size (VmRSS) in MiB.
    pub fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

/// Context switches of process `pid`'s live threads so far (see
/// [`Proc::switches`]).
pub fn switches_of(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// CPU time (user + system) process `pid` used so far, in clock ticks of
/// 1/100 s (Linux's `USER_HZ`); 0 if `/proc` cannot tell.
pub fn cpu_ticks_of(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are
    // the 14th and 15th fields of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Blocking JSON request with a short timeout (set-up only, not measured).
pub fn http_json(method: &str, url: &str, body: Option<&str>) -> Result<Value> {
    let out = Command::new("curl")
        .args(["-sS", "-m", "5", "-X", method, url])
        .args(
            body.map(|b| {
                vec![
                    "-H".to_owned(),
                    "content-type: application/json".to_owned(),
                    "-d".to_owned(),
                    b.to_owned(),
                ]
            })
            .unwrap_or_default(),
        )
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!("{method} {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
}

/// A flagstone node's view of the cluster (`GET /v1/cluster`).
fn cluster_view(addr: SocketAddr) -> Result<Value> {
    http_json("GET", &format!("http://{addr}/v1/cluster"), None)
}

/// The highest Raft index a flagstone node has applied, if it answers.
pub fn applied_index(addr: SocketAddr) -> Option<u64> {
    cluster_view(addr).ok()?["applied_index"].as_u64()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out waiting for {what}")
}

/// Three flagstone nodes; returns them with the leader's index.
/// `threads`: worker threads per node (`--threads`), default one per CPU.
pub fn flagstone(
    bin: &Path,
    dir: &Path,
    plugins: &Path,
    threads: Option<usize>,
) -> Result<(Vec<Proc>, usize)> {
    let mut procs: Vec<Proc> = Vec::new();
    for id in 1..=3u64 {
        let mut cmd = Command::new(bin);
        cmd.args([
            "serve",
            "--id",
            &id.to_string(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.join(format!("flagstone-{id}")))
        .arg("--plugins-dir")
        .arg(plugins)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_NODE_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(match std::env::var_os("BENCH_NODE_LOG_DIR") {
            Some(d) => Stdio::from(std::fs::File::create(
                PathBuf::from(d).join(format!("node-{id}.log")),
            )?),
            None => Stdio::null(),
        });
        if let Some(seed) = procs.first() {
            cmd.args(["--join", &format!("http://{}", seed.addr)]);
        }
        if let Some(n) = threads {
            cmd.args(["--threads", &n.to_string()]);
        }
        if let Ok(extra) = std::env::var("BENCH_NODE_ARGS") {
            cmd.args(extra.split_whitespace());
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let url = line
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .trim_start_matches("http://")
            .to_owned();
        let addr: SocketAddr = url
            .parse()
            .with_context(|| format!("unexpected first line {line:?}"))?;
        procs.push(Proc { addr, child });
    }
    let mut leader = None;
    wait_until(
        "flagstone to form a 3-voter cluster",
        Duration::from_secs(30),
        || {
            let views: Vec<Value> = procs
                .iter()
                .filter_map(|p| cluster_view(p.addr).ok())
                .collect();
            let ok = views.len() == 3
                && views.iter().all(|v| {
                    v["leader_id"] == views[0]["leader_id"]
                        && !v["leader_id"].is_null()
                        && v["members"]
                            .as_array()
                            .is_some_and(|m| m.iter().filter(|x| x["voter"] == true).count() == 3)
                });
            if ok {
                leader = views[0]["leader_id"].as_u64();
            }
            ok
        },
    )?;
    let leader = leader.context("no leader")? as usize - 1;
    Ok((procs, leader))
}

/// Three etcd members (`etcd` from Debian's `etcd-server`); returns them with
/// the leader's index.
/// `threads`: `GOMAXPROCS` per member, default one per CPU.
pub fn etcd(dir: &Path, threads: Option<usize>) -> Result<(Vec<Proc>, usize)> {
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_>>()?;
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
        .collect();
    let mut procs = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let mut cmd = Command::new("etcd");
        if let Some(n) = threads {
            cmd.env("GOMAXPROCS", n.to_string());
        }
        let child = cmd
            .args(["--name", &format!("e{i}"), "--data-dir"])
            .arg(dir.join(format!("etcd-{i}")))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args([
                "--initial-cluster-state",
                "new",
                "--log-level",
                "error",
                "--logger",
                "zap",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd (apt-get install etcd-server)")?;
        procs.push(Proc {
            addr: format!("127.0.0.1:{client}").parse()?,
            child,
        });
    }
    let mut leader_id = String::new();
    wait_until(
        "etcd to elect a leader",
        Duration::from_secs(30),
        || match http_json(
            "POST",
            &format!("http://{}/v3/maintenance/status", procs[0].addr),
            Some("{}"),
        ) {
            Ok(v) if v["leader"].is_string() && v["leader"] != "0" => {
                leader_id = v["leader"].as_str().unwrap_or_default().to_owned();
                true
            }
            _ => false,
        },
    )?;
    for (i, p) in procs.iter().enumerate() {
        let v = http_json(
            "POST",
            &format!("http://{}/v3/maintenance/status", p.addr),
            Some("{}"),
        )?;
        if v["header"]["member_id"].as_str() == Some(leader_id.as_str()) {
            return Ok((procs, i));
        }
    }
    bail!("could not find the etcd leader {leader_id}")
}

/// Makes sure `etcd` is installed (Debian's `etcd-server`).
pub fn ensure_etcd() -> Result<()> {
    if Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("installing etcd-server (apt-get)…");
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()?
        .success()
        && Command::new("apt-get")
            .args(["install", "-y", "-qq", "etcd-server"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?
            .success();
    if !ok {
        bail!("could not install etcd-server");
    }
    Ok(())
}

/// Builds the example plugins and, unless `bin` names a binary to run
/// instead (`--flagstone-bin`, to compare builds), the flagstone binary
/// (the `dist` profile, what one deploys); returns the binary and a plugins
/// directory with flag-schema and rollout.
pub fn build(root: &Path, work: &Path, bin: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let host_ok = bin.is_some()
        || Command::new(&cargo)
            .current_dir(root)
            .args(["build", "--profile", "dist", "-p", "flagstone"])
            .status()?
            .success();
    let ok = host_ok
        && Command::new(&cargo)
            .current_dir(root)
            .args([
                "build",
                "--target",
                "wasm32-wasip2",
                "--profile",
                "plugin",
                "--target-dir",
                "target/plugins",
            ])
            .args(["-p", "flag-schema", "-p", "rollout"])
            .status()?
            .success();
    if !ok {
        bail!("build failed");
    }
    let plugins = work.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    for p in ["flag_schema", "rollout"] {
        std::fs::copy(
            root.join(format!("target/plugins/wasm32-wasip2/plugin/{p}.wasm")),
            plugins.join(format!("{p}.wasm")),
        )?;
    }
    let bin = bin.map_or_else(|| root.join("target/dist/flagstone"), Path::to_owned);
    Ok((bin, plugins))
}
