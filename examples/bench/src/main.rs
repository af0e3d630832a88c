//! `cargo run --release -p flagstone-bench`: flagstone and etcd side by side
//! on this machine (3 nodes each, 127.0.0.1, default fsync durability),
//! driven by the same load generator with the same connections, key and
//! value sizes. Prints throughput and p50/p99 per scenario and the ratio,
//! then flagstone-only scenarios, the machine's floor for a durable write
//! (`floor.rs`) and resident memory per node.

mod cluster;
mod floor;
mod http1;
mod load;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use clap::Parser;
use flagstone::plugins::PluginHost;
use http1::request;
use load::{MakeRequest, Stats};

#[derive(Parser)]
#[command(about = "Benchmark flagstone against etcd on this machine")]
struct Args {
    /// Seconds measured per scenario (after one second of warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent clients of the "many clients" scenarios.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Skip etcd (flagstone scenarios only).
    #[arg(long)]
    no_etcd: bool,
    /// Run only the scenarios whose name contains this text (e.g. `writes`,
    /// `linearizable`, `validator`, `OFREP`, `floor`).
    #[arg(long)]
    only: Option<String>,
    /// Keep the clusters running this many seconds before the scenarios
    /// (time to attach a profiler; their PIDs are printed).
    #[arg(long, default_value_t = 0)]
    pause: u64,
    /// Threads per server process, the same for both systems: flagstone's
    /// `--threads`, etcd's `GOMAXPROCS` (default: each uses one per CPU).
    #[arg(long)]
    node_threads: Option<usize>,
    /// Run this `flagstone` binary instead of building one (to compare builds).
    #[arg(long)]
    flagstone_bin: Option<PathBuf>,
    /// Also print every round of each scenario (rate and CPU per request) to
    /// stderr, to see whether a paired ratio comes from one disturbed round.
    #[arg(long)]
    each_round: bool,
}

const VALUE_LEN: usize = 256;
const READ_KEYS: u64 = 1000;

/// A 12-byte key.
fn key(n: u64) -> String {
    format!("k{n:011}")
}

fn unique(client: usize, seq: u64) -> u64 {
    client as u64 * 100_000_000 + seq
}

fn spread(client: usize, seq: u64) -> u64 {
    // A cheap deterministic scramble over the populated keys.
    (seq.wrapping_mul(2_654_435_761)
        .wrapping_add(client as u64 * 97))
        % READ_KEYS
}

struct Flagstone(SocketAddr);
struct Etcd(SocketAddr);

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

impl Flagstone {
    fn put(&self, prefix: &'static str, value: Bytes, keyf: fn(usize, u64) -> u64) -> MakeRequest {
        let a = self.0;
        Arc::new(move |c, s| {
            request(
                "PUT",
                a,
                &format!("/v1/kv/{prefix}{}", key(keyf(c, s))),
                &value,
            )
        })
    }
    fn get(&self, linearizable: bool) -> MakeRequest {
        let a = self.0;
        let q = if linearizable {
            "?consistency=linearizable"
        } else {
            ""
        };
        Arc::new(move |c, s| request("GET", a, &format!("/v1/kv/{}{q}", key(spread(c, s))), b""))
    }
    fn ofrep(&self) -> MakeRequest {
        let a = self.0;
        Arc::new(move |c, s| {
            let body = format!(
                r#"{{"context":{{"targetingKey":"user-{}"}}}}"#,
                spread(c, s)
            );
            request(
                "POST",
                a,
                "/ofrep/v1/evaluate/flags/bench-flag",
                body.as_bytes(),
            )
        })
    }
}

impl Etcd {
    fn put(&self, keyf: fn(usize, u64) -> u64) -> MakeRequest {
        let a = self.0;
        let value = b64(&[b'v'; VALUE_LEN]);
        Arc::new(move |c, s| {
            let body = format!(
                r#"{{"key":"{}","value":"{value}"}}"#,
                b64(key(keyf(c, s)).as_bytes())
            );
            request("POST", a, "/v3/kv/put", body.as_bytes())
        })
    }
    fn get(&self, linearizable: bool) -> MakeRequest {
        let a = self.0;
        Arc::new(move |c, s| {
            let k = b64(key(spread(c, s)).as_bytes());
            let body = if linearizable {
                format!(r#"{{"key":"{k}"}}"#)
            } else {
                format!(r#"{{"key":"{k}","serializable":true}}"#)
            };
            request("POST", a, "/v3/kv/range", body.as_bytes())
        })
    }
}

struct Bench<'a> {
    warmup: Duration,
    measure: Duration,
    /// The server processes of each system (flagstone's, then etcd's if run).
    systems: Vec<Vec<&'a cluster::Proc>>,
    /// How long each scenario waited for the servers to go quiet.
    waited: std::sync::Mutex<Vec<f64>>,
    /// Print each round (`--each-round`).
    each_round: bool,
}

/// A server counts as quiet below this share of one core…
const QUIET_CPU: f64 = 0.05;
/// …measured over this window; the wait gives up after `QUIET_MAX`.
const QUIET_WINDOW: Duration = Duration::from_millis(500);
const QUIET_MAX: Duration = Duration::from_secs(30);

/// Rounds in which two compared scenarios take turns.
const ROUNDS: u32 = 7;

impl Bench<'_> {
    /// Waits (at most `QUIET_MAX`) until no server process of either system
    /// uses more than `QUIET_CPU` of a core: what a scenario leaves behind
    /// (an LSM tree's flushes and compactions after many writes, for one)
    /// must not be measured as part of the next. Records the wait.
    async fn settle(&self) {
        let started = std::time::Instant::now();
        while started.elapsed() < QUIET_MAX {
            let before: Vec<u64> = self.servers().map(|p| p.cpu_ticks()).collect();
            tokio::time::sleep(QUIET_WINDOW).await;
            let busiest = self
                .servers()
                .zip(before)
                .map(|(p, b)| p.cpu_ticks().saturating_sub(b))
                .max()
                .unwrap_or(0);
            if (busiest as f64 / 100.0) / QUIET_WINDOW.as_secs_f64() < QUIET_CPU {
                break;
            }
        }
        if let Ok(mut w) = self.waited.lock() {
            w.push(started.elapsed().as_secs_f64());
        }
    }

    /// Measures `a` and `b` (each `(addr, requests)`) taking turns: `ROUNDS`
    /// rounds of a slice of each, so drift in the machine's speed (this is a
    /// shared VM) falls on both sides of the ratio alike. `b` may be absent.
    async fn paired(
        &self,
        clients: usize,
        a: (SocketAddr, MakeRequest),
        b: Option<(SocketAddr, MakeRequest)>,
    ) -> Result<(Stats, Option<Stats>)> {
        self.settle().await;
        let slice = self.measure / ROUNDS;
        let warmup = self.warmup / ROUNDS;
        let (mut ra, mut rb) = (Vec::new(), Vec::new());
        for round in 1..=ROUNDS {
            let probes = self.probes(a.0);
            ra.push(load::run(a.0, clients, warmup, slice, a.1.clone(), &probes).await?);
            if let Some((addr, make)) = &b {
                let probes = self.probes(*addr);
                rb.push(load::run(*addr, clients, warmup, slice, make.clone(), &probes).await?);
            }
            if self.each_round {
                let line = |runs: &[load::Run]| {
                    runs.last()
                        .and_then(|r| Stats::from_runs(std::slice::from_ref(r)).ok())
                        .map(|s| {
                            format!(
                                "{:>8.0}/s cpu {:>6.1} µs/op",
                                s.ops_per_sec, s.cpu_us_per_op
                            )
                        })
                        .unwrap_or_default()
                };
                eprintln!("  round {round}/{ROUNDS}: {} | {}", line(&ra), line(&rb));
            }
        }
        let b = if b.is_some() {
            Some(Stats::from_runs(&rb)?)
        } else {
            None
        };
        Ok((Stats::from_runs(&ra)?, b))
    }

    /// What a run against `addr` can ask: its system's CPU time and context
    /// switches, and for a flagstone node its applied Raft index (`GET
    /// /v1/cluster`).
    fn probes(
        &self,
        addr: SocketAddr,
    ) -> load::Probes<impl Fn() -> cluster::Usage + '_, impl Fn() -> Option<u64> + '_> {
        let flagstone = self
            .systems
            .first()
            .is_some_and(|procs| procs.iter().any(|p| p.addr == addr));
        load::Probes {
            usage: move || self.system_usage(addr),
            log_index: move || flagstone.then(|| cluster::applied_index(addr)).flatten(),
        }
    }

    /// Every server process of both systems.
    fn servers(&self) -> impl Iterator<Item = &cluster::Proc> {
        self.systems.iter().flatten().copied()
    }

    /// CPU time so far (1/100 s) and context switches of all server
    /// processes of the system that serves `addr`: what one request costs
    /// that system as a whole.
    fn system_usage(&self, addr: SocketAddr) -> cluster::Usage {
        let procs = self
            .systems
            .iter()
            .find(|procs| procs.iter().any(|p| p.addr == addr));
        procs.map_or_else(cluster::Usage::default, |procs| cluster::Usage {
            cpu_ticks: procs.iter().map(|p| p.cpu_ticks()).sum(),
            switches: procs.iter().map(|p| p.switches()).sum(),
        })
    }

    /// [`Bench::paired`] with both sides present.
    async fn versus(
        &self,
        clients: usize,
        a: (SocketAddr, MakeRequest),
        b: (SocketAddr, MakeRequest),
    ) -> Result<(Stats, Stats)> {
        let (a, b) = self.paired(clients, a, Some(b)).await?;
        Ok((a, b.context("paired run")?))
    }
}

/// How `a` compares to `b` as the rows print it: the median of the rounds'
/// ratios (`load::paired_ratio`) followed by `unit`, then the lowest and
/// highest round in brackets, each times `scale`; empty if the rounds do not
/// pair up.
fn ratio_text(a: &Stats, b: &Stats, scale: f64, unit: &str) -> String {
    load::paired_ratio(a, b).map_or_else(String::new, |r| {
        format!(
            "{:>5.1}{unit} ({:.1}–{:.1})",
            scale * r.median,
            scale * r.low,
            scale * r.high
        )
    })
}

/// A flagstone-only baseline row, then a row measured against it.
fn rows_vs(base_name: &str, base: &Stats, name: &str, s: &Stats, unit: &str) {
    println!("| {base_name} | {} | |", fmt(base));
    let ratio = ratio_text(s, base, 100.0, &format!(" %{unit}"));
    println!("| {name} | {} | {ratio} |", fmt(s));
}

fn fmt(s: &Stats) -> String {
    let err = if s.errors > 0 {
        format!(" ({} errors)", s.errors)
    } else {
        String::new()
    };
    let batching = s
        .ops_per_entry
        .map(|n| format!(" {n:.1} writes/entry"))
        .unwrap_or_default();
    format!(
        "{:>9.0}/s  p50 {:>6} µs  p99 {:>7} µs  cpu {:>5.1} µs/op (client {:>4.1}) {:.1} switches/op{batching}{err}",
        s.ops_per_sec,
        s.p50_us,
        s.p99_us,
        s.cpu_us_per_op,
        s.client_cpu_us_per_op,
        s.switches_per_op
    )
}

fn row(name: &str, f: &Stats, e: Option<&Stats>) {
    match e {
        Some(e) => println!(
            "| {name:<38} | {} | {} | {} |",
            fmt(f),
            fmt(e),
            ratio_text(f, e, 1.0, "×")
        ),
        None => println!("| {name:<38} | {} |", fmt(f)),
    }
}

/// Plugin calls per second on one thread, made in the process on a one-node
/// cluster with the plugins loaded (the flag `bench-flag` written first).
fn in_process_calls(
    plugins: &std::path::Path,
    seconds: u64,
    mut call: impl FnMut(&PluginHost, u64) -> Result<()>,
) -> Result<f64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut config = flagstone::NodeConfig::new(1, dir.path().join("node"));
        config.plugins_dir = Some(plugins.to_owned());
        let node = flagstone::Node::start(config, listener).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.cluster_info().leader_id.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        node.set_custom_data("flags/bench-flag", FLAG_DEF).await?;
        let host = node.plugins().context("plugins")?.clone();
        // Half-second windows; the median window is reported, so a burst of
        // noise from other tenants of the machine does not decide the result.
        let mut n = 0u64;
        let mut windows = Vec::new();
        let until = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < until {
            let (start, before) = (Instant::now(), n);
            while start.elapsed() < Duration::from_millis(500) {
                for _ in 0..1000 {
                    call(&host, n)?;
                    n += 1;
                }
            }
            windows.push((n - before) as f64 / start.elapsed().as_secs_f64());
        }
        windows.sort_by(f64::total_cmp);
        let rate = windows[windows.len() / 2];
        node.shutdown().await;
        Ok(rate)
    })
}

/// Rollout evaluations of `bench-flag`, one user after another.
fn evaluate_rollout(host: &PluginHost, n: u64) -> Result<()> {
    let ctx = flagstone::plugins::types::EvalContext {
        targeting_key: Some(format!("user-{}", n % 10_000)),
        attributes: r#"{"plan":"pro","app_version":"2.3.1"}"#.into(),
    };
    host.evaluate("bench-flag", &ctx)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("{}", e.message))
}

/// `flag-schema` validating a write of `flags/bench-flag` (the same definition).
fn validate_flag(host: &PluginHost, _: u64) -> Result<()> {
    let write = flagstone::plugins::types::Write {
        key: "flags/bench-flag".into(),
        value: Some(FLAG_DEF.as_bytes().to_vec()),
        content_type: Some("application/json".into()),
        current: None,
    };
    host.validate(&write)
        .map_err(|r| anyhow::anyhow!("{}: {}", r.plugin, r.message))
}

/// A rollout flag with targeting rules and a 30 % split.
const FLAG_DEF: &str = r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off",
"targeting":[{"if":[{"attribute":"email","op":"ends_with","value":"@acme.com"}],"variant":"on"},
{"if":[{"attribute":"app_version","op":"semver_ge","value":"3.0.0"}],"variant":"on"}],
"rollout":[{"variant":"on","weight":30},{"variant":"off","weight":70}]}"#;

fn main() -> Result<()> {
    let args = Args::parse();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()?;
    let work = tempfile::tempdir()?;
    let (bin, plugins) = cluster::build(&root, work.path(), args.flagstone_bin.as_deref())?;
    if !args.no_etcd {
        cluster::ensure_etcd()?;
    }
    let n = args.clients;

    // In-process plugin calls first, while the machine is otherwise idle.
    let mut in_process = Vec::new();
    for (name, call) in [
        (
            "in-process rollout evaluation, 1 thread",
            evaluate_rollout as fn(&_, _) -> _,
        ),
        ("in-process flag-schema validation, 1 thread", validate_flag),
    ] {
        if args.only.as_ref().is_none_or(|o| name.contains(o.as_str())) {
            let rate = in_process_calls(&plugins, args.seconds, call)?;
            println!("{name}: {rate:.0}/s");
            in_process.push((name, rate));
        }
    }

    // The floor too, before any server runs.
    let mut floors = Vec::new();
    let floor_scenarios: [(&str, floor::Measure); 2] = [
        ("fdatasync of a 300-byte write, 1 writer", floor::fdatasync),
        (
            "replicated write, 1 client, no server software",
            floor::replicated_write,
        ),
    ];
    for (name, measure) in floor_scenarios {
        if args
            .only
            .as_ref()
            .is_none_or(|o| format!("floor: {name}").contains(o.as_str()))
        {
            let f = measure(
                work.path(),
                Duration::from_secs(1),
                Duration::from_secs(args.seconds),
            )?;
            floors.push((name, f));
        }
    }

    let (fs, fs_leader) = cluster::flagstone(&bin, work.path(), &plugins, args.node_threads)?;
    let etcd = if args.no_etcd {
        None
    } else {
        Some(cluster::etcd(work.path(), args.node_threads)?)
    };
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss: Vec<f64> = fs.iter().map(|p| p.rss_mib()).collect();
    let etcd_idle_rss: Vec<f64> = etcd
        .iter()
        .flat_map(|(p, _)| p.iter().map(|x| x.rss_mib()))
        .collect();

    let bench = Bench {
        warmup: Duration::from_secs(1),
        measure: Duration::from_secs(args.seconds),
        systems: std::iter::once(fs.iter().collect())
            .chain(etcd.iter().map(|(p, _)| p.iter().collect()))
            .collect(),
        waited: Default::default(),
        each_round: args.each_round,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let fl = Flagstone(fs[fs_leader].addr);
        let ff = Flagstone(fs[(fs_leader + 1) % 3].addr);
        let value = Bytes::from(vec![b'v'; VALUE_LEN]);
        load::sequential(fl.0, READ_KEYS, fl.put("", value.clone(), |_, s| s)).await?;
        cluster::http_json("PUT", &format!("http://{}/v1/kv/flags/bench-flag", fl.0), Some(FLAG_DEF))?;
        let (el, ef) = match &etcd {
            Some((p, l)) => {
                let el = Etcd(p[*l].addr);
                load::sequential(el.0, READ_KEYS, el.put(|_, s| s)).await?;
                (Some(el), Some(Etcd(p[(*l + 1) % 3].addr)))
            }
            None => (None, None),
        };
        println!();
        println!("flagstone vs etcd 3.4 — 3 nodes each on 127.0.0.1, 12-byte keys, {VALUE_LEN}-byte values, {n} clients where noted, {}s per scenario", args.seconds);
        println!();
        println!("| scenario | flagstone | etcd | ratio |");
        println!("|---|---|---|---|");
        let only = args.only.clone();
        let pids: Vec<u32> = fs.iter().map(|p| p.pid()).collect();
        if args.pause > 0 {
            println!("flagstone PIDs {pids:?} (leader index {fs_leader}); pausing {}s", args.pause);
            tokio::time::sleep(Duration::from_secs(args.pause)).await;
        }
        macro_rules! both {
            ($name:expr, $clients:expr, $f:expr, $e:expr) => {{
                let name: String = $name.to_string();
                if !only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
                    let (f, e) = bench.paired($clients, $f, $e).await?;
                    row(&name, &f, e.as_ref());
                }
            }};
        }
        let etcd_put = |e: &Option<Etcd>| e.as_ref().map(|e| (e.0, e.put(unique)));
        both!("writes, 1 client (leader)", 1, (fl.0, fl.put("", value.clone(), unique)), etcd_put(&el));
        both!(format!("writes, {n} clients (follower)"), n, (ff.0, ff.put("", value.clone(), unique)), etcd_put(&ef));
        both!(format!("writes, {n} clients (leader)"), n, (fl.0, fl.put("", value.clone(), unique)), etcd_put(&el));
        both!(
            "serializable reads, 1 client (follower)",
            1,
            (ff.0, ff.get(false)),
            ef.as_ref().map(|e| (e.0, e.get(false)))
        );
        both!(
            format!("serializable reads, {n} clients (follower)"),
            n,
            (ff.0, ff.get(false)),
            ef.as_ref().map(|e| (e.0, e.get(false)))
        );
        both!(
            format!("linearizable reads, {n} clients (follower)"),
            n,
            (ff.0, ff.get(true)),
            ef.as_ref().map(|e| (e.0, e.get(true)))
        );
        let wanted = |name: &str| only.as_ref().is_none_or(|o| name.contains(o.as_str()));

        println!();
        println!("| flagstone only | result | vs baseline |");
        println!("|---|---|---|");
        let def = format!(
            r#"{{"state":"ENABLED","variants":{{"on":true,"off":false}},"defaultVariant":"off","metadata":{{"pad":"{}"}}}}"#,
            "p".repeat(VALUE_LEN - 98)
        );
        let def = Bytes::from(def);
        if wanted("validator") {
            let (plain, validated) = bench
                .versus(
                    n,
                    (fl.0, fl.put("plain/", def.clone(), unique)),
                    (fl.0, fl.put("flags/", def.clone(), unique)),
                )
                .await?;
            rows_vs(
                &format!("writes, {n} clients, no validator         "),
                &plain,
                &format!("writes, {n} clients, flag-schema validating"),
                &validated,
                "",
            );
        }
        if wanted("OFREP") {
            // GET again, taking turns with OFREP, for a drift-free ratio.
            let (get, ofrep) = bench
                .versus(n, (ff.0, ff.get(false)), (ff.0, ff.ofrep()))
                .await?;
            rows_vs(
                &format!("local GET, {n} clients (follower)         "),
                &get,
                &format!("OFREP single-flag evaluation, {n} clients  "),
                &ofrep,
                " of GET",
            );
        }
        for (name, rate) in &in_process {
            println!("| {name:<42} | {rate:>9.0}/s | |");
        }
        if !floors.is_empty() {
            println!();
            println!("| the machine's floor (floor.rs) | result |");
            println!("|---|---|");
            for (name, f) in &floors {
                println!(
                    "| {name:<46} | {:>9.0}/s  p50 {:>6} µs  p99 {:>7} µs |",
                    f.ops_per_sec, f.p50_us, f.p99_us
                );
            }
        }
        anyhow::Ok(())
    })?;

    println!();
    let show = |v: &[f64]| {
        v.iter()
            .map(|m| format!("{m:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let waited = bench.waited.lock().map(|w| w.clone()).unwrap_or_default();
    println!(
        "waited for the servers to go quiet (each < {:.0} % of a core over {} ms, at most {} s) \
         before each scenario, in order: {}",
        QUIET_CPU * 100.0,
        QUIET_WINDOW.as_millis(),
        QUIET_MAX.as_secs(),
        waited
            .iter()
            .map(|s| format!("{s:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "cpu µs/op: CPU time (user + system) of the system's three server processes per \
         successful request, warm-up included; (client …): the load generator's own, which \
         shares the same two cores; switches/op: context switches of the servers' threads per \
         successful request (a thread waking or waiting: hand-offs between threads, fsyncs); \
         writes/entry (flagstone): successful writes per Raft log \
         entry the scenario added, i.e. how many shared one append, its fsyncs and its \
         replication round"
    );
    println!("resident memory per node (MiB), idle → after the run:");
    println!(
        "  flagstone (with flag-schema + rollout): {} → {}",
        show(&idle_rss),
        show(&fs.iter().map(|p| p.rss_mib()).collect::<Vec<_>>())
    );
    if let Some((p, _)) = &etcd {
        println!(
            "  etcd:                                   {} → {}",
            show(&etcd_idle_rss),
            show(&p.iter().map(|x| x.rss_mib()).collect::<Vec<_>>())
        );
    }
    Ok(())
}
