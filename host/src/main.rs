//! The `flagstone` binary: argument parsing and logging; everything else is in
//! the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flagstone::NodeConfig;

/// jemalloc instead of glibc's malloc. Under 64 concurrent writers, a third
/// of the leader's malloc time was glibc's slow paths (`malloc_consolidate`,
/// `unlink_chunk`), the largest caller hyper reserving its 8 KiB read buffer
/// per request: a request that large makes glibc coalesce its fastbins. With
/// jemalloc the three nodes spend 66 instead of 80-99 µs of CPU per write
/// (BENCHMARKS.md, item 24); idle RSS goes from 41 to 46 MiB per node.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "flagstone",
    version,
    about = "Replicated custom-data store with WebAssembly plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node. With no flags: a single-node cluster on 127.0.0.1:8080, data in ./data/node-1.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// This node's id, unique in the cluster.
    #[arg(long, default_value_t = 1, env = "FLAGSTONE_ID")]
    id: u64,
    /// Address to serve the HTTP API and Raft RPCs on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "FLAGSTONE_LISTEN")]
    listen: SocketAddr,
    /// URL other nodes reach this node at (default: http://<listen>).
    #[arg(long, env = "FLAGSTONE_ADVERTISE")]
    advertise: Option<String>,
    /// Data directory (default: ./data/node-<id>).
    #[arg(long, env = "FLAGSTONE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// URL of a cluster member to join (when the data dir is empty, or its
    /// membership does not make this node a voter); the data dir remembers it.
    #[arg(long, env = "FLAGSTONE_JOIN")]
    join: Option<String>,
    /// Build a snapshot and compact the log every N entries.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_every: u64,
    /// Also build one once the log took this many MiB since the last (0: off).
    #[arg(long, default_value_t = 256)]
    snapshot_every_mib: u64,
    /// Directory of WebAssembly plugins (`*.wasm`), reloaded when files change.
    #[arg(long, env = "FLAGSTONE_PLUGINS_DIR")]
    plugins_dir: Option<PathBuf>,
    /// Deadline of a plugin's validate-write call, in milliseconds.
    #[arg(long, default_value_t = 50)]
    validate_timeout_ms: u64,
    /// Deadline of a plugin's evaluate call, in milliseconds.
    #[arg(long, default_value_t = 10)]
    evaluate_timeout_ms: u64,
    /// Deadline of a plugin's on-change call, in milliseconds.
    #[arg(long, default_value_t = 100)]
    on_change_timeout_ms: u64,
    /// Linear memory cap per plugin instance, in MiB.
    #[arg(long, default_value_t = 32)]
    plugin_memory_mib: usize,
    /// Memory for decoded values of recently read or written keys, in MiB
    /// (0: off). Point reads of cached keys skip the storage engine.
    #[arg(long, default_value_t = 32)]
    read_cache_mib: u64,
    /// Async worker threads (default: one per CPU). Fewer is faster when
    /// several nodes share a small machine.
    #[arg(long, env = "FLAGSTONE_THREADS", value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Option<u64>,
}

/// Listens for SIGINT and SIGTERM from now on and returns what ends at the
/// first of them. Listening starts here, not at the first poll: a signal
/// that arrives while the node is still starting stops it as soon as it has
/// started, instead of killing it.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind, name: &'static str| {
        let stream = signal(kind)
            .inspect_err(|e| tracing::error!(error = %e, "cannot listen for {name}"))
            .ok();
        async move {
            match stream {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
    };
    let int = listen(SignalKind::interrupt(), "SIGINT");
    let term = listen(SignalKind::terminate(), "SIGTERM");
    async move {
        tokio::select! {
            _ = int => {},
            _ = term => {},
        }
    }
}

#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}

fn main() -> anyhow::Result<()> {
    let Cli {
        command: Command::Serve(args),
    } = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        runtime.worker_threads(n as usize);
    }
    runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,fjall=warn,lsm_tree=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = NodeConfig::new(
        args.id,
        args.data_dir
            .unwrap_or_else(|| PathBuf::from(format!("data/node-{}", args.id))),
    );
    config.advertise = args.advertise;
    config.join = args.join;
    config.raft.snapshot_every = args.snapshot_every;
    config.raft.snapshot_every_bytes = args.snapshot_every_mib.saturating_mul(1024 * 1024);
    config.plugins_dir = args.plugins_dir;
    config.plugin_limits.validate = Duration::from_millis(args.validate_timeout_ms);
    config.plugin_limits.evaluate = Duration::from_millis(args.evaluate_timeout_ms);
    config.plugin_limits.on_change = Duration::from_millis(args.on_change_timeout_ms);
    config.plugin_limits.memory_bytes = args.plugin_memory_mib * 1024 * 1024;
    config.read_cache_bytes = args.read_cache_mib.saturating_mul(1024 * 1024);
    let shutdown = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Settings that cannot work stop here, before the line scripts wait for.
    flagstone::node::check_config(&config, addr).context("checking the settings")?;
    // One machine-readable line on stdout so scripts and tests can find the port.
    println!("flagstone: node {} listening on http://{addr}", args.id);
    flagstone::run(config, listener, shutdown)
        .await
        .context("running the node")?;
    Ok(())
}
