//! The load generator: `clients` closed-loop clients, each on its own
//! keep-alive HTTP/1.1 connection ([`crate::http1`]), for a fixed time;
//! latencies in an HDR histogram (microseconds).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;

use crate::http1::Connection;

/// Builds the bytes of request `seq` of client `client` ([`crate::http1::request`]).
pub type MakeRequest = Arc<dyn Fn(usize, u64) -> Bytes + Send + Sync>;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Successful requests per second.
    pub ops_per_sec: f64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// Requests that failed (non-2xx or transport error).
    pub errors: u64,
    /// CPU time (user + system) the system's server processes spent per
    /// successful request, µs, warm-up included on both sides of the division.
    pub cpu_us_per_op: f64,
    /// The same for this process, the load generator (its clients' share of
    /// the machine, which the servers do not get).
    pub client_cpu_us_per_op: f64,
    /// Context switches of the system's server threads per successful
    /// request, warm-up included: how often a request's work moved between
    /// threads or waited (stable where the VM's speed is not).
    pub switches_per_op: f64,
    /// Successful requests per Raft log entry the run added (group commit:
    /// how many writes shared an entry, its fsyncs and its replication
    /// round), warm-up included; `None` when the system's log position is
    /// unknown to the tool or the run added no entry (reads).
    pub ops_per_entry: Option<f64>,
    /// Successful requests per second of each run, in order (one per round
    /// of a paired scenario).
    pub round_rates: Vec<f64>,
}

/// An empty latency histogram in microseconds: 1 µs to 60 s, 3 significant
/// digits (every latency the tool records).
pub fn latency_histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

async fn client_loop(
    addr: SocketAddr,
    client: usize,
    make: MakeRequest,
    warmup_until: Instant,
    until: Instant,
) -> Result<(Histogram<u64>, u64, u64, u64)> {
    let mut conn = Connection::open(addr).await?;
    let mut hist = latency_histogram()?;
    let (mut ok, mut errors, mut warm) = (0u64, 0u64, 0u64);
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        let req = make(client, seq);
        seq += 1;
        let started = Instant::now();
        // A transport error ends the client (the connection is gone); an
        // error status is counted.
        let good = conn.send(&req).await?.is_success();
        if started < warmup_until {
            warm += u64::from(good);
            continue;
        }
        if good {
            ok += 1;
            hist.record(started.elapsed().as_micros().max(1) as u64)?;
        } else {
            errors += 1;
        }
    }
    Ok((hist, ok, errors, warm))
}

/// The raw outcome of one run, mergeable with others.
pub struct Run {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    measured: Duration,
    /// Successful requests, warm-up included.
    all_ok: u64,
    /// Server CPU ticks (1/100 s) over the whole run, warm-up included.
    cpu_ticks: u64,
    /// This process's CPU ticks over the same time.
    client_cpu_ticks: u64,
    /// Server context switches over the whole run, warm-up included.
    switches: u64,
    /// Log entries the run added, if the system tells its log position.
    entries: Option<u64>,
}

impl Stats {
    /// Throughput and percentiles over all `runs` together.
    pub fn from_runs(runs: &[Run]) -> Result<Stats> {
        let mut total = latency_histogram()?;
        let (mut ok, mut errors, mut measured) = (0, 0, Duration::ZERO);
        let (mut all_ok, mut cpu_ticks, mut client_cpu_ticks, mut switches) = (0, 0, 0, 0);
        let mut entries = Some(0);
        for r in runs {
            total.add(&r.hist)?;
            ok += r.ok;
            errors += r.errors;
            measured += r.measured;
            all_ok += r.all_ok;
            cpu_ticks += r.cpu_ticks;
            client_cpu_ticks += r.client_cpu_ticks;
            switches += r.switches;
            entries = entries.zip(r.entries).map(|(a, b)| a + b);
        }
        let per_op = |ticks: u64| ticks as f64 * 10_000.0 / all_ok.max(1) as f64;
        Ok(Stats {
            ops_per_sec: ok as f64 / measured.as_secs_f64().max(1e-9),
            p50_us: total.value_at_quantile(0.50),
            p99_us: total.value_at_quantile(0.99),
            errors,
            cpu_us_per_op: per_op(cpu_ticks),
            client_cpu_us_per_op: per_op(client_cpu_ticks),
            switches_per_op: switches as f64 / all_ok.max(1) as f64,
            ops_per_entry: entries.filter(|&n| n > 0).map(|n| all_ok as f64 / n as f64),
            round_rates: runs
                .iter()
                .map(|r| r.ok as f64 / r.measured.as_secs_f64().max(1e-9))
                .collect(),
        })
    }
}

/// How `a` compares to `b`, measured in rounds that took turns: the median
/// of the rounds' rate ratios, with the lowest and highest of them.
///
/// A disturbance that hits one round (another tenant of the VM, a burst of
/// background work) moves that round's ratio only; in the merged rates it
/// moves the whole result, by however much of the run it took.
/// `None` if the runs do not pair up.
pub fn paired_ratio(a: &Stats, b: &Stats) -> Option<Ratio> {
    if a.round_rates.is_empty() || a.round_rates.len() != b.round_rates.len() {
        return None;
    }
    let mut ratios: Vec<f64> = a
        .round_rates
        .iter()
        .zip(&b.round_rates)
        .map(|(x, y)| x / y.max(1e-9))
        .collect();
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = if n % 2 == 1 {
        ratios[n / 2]
    } else {
        (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0
    };
    Some(Ratio {
        median,
        low: ratios[0],
        high: ratios[n - 1],
    })
}

/// See [`paired_ratio`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratio {
    pub median: f64,
    pub low: f64,
    pub high: f64,
}

/// What the tool can ask the system under test while it runs.
pub struct Probes<C, L> {
    /// The servers' CPU time (1/100 s) and context switches so far.
    pub usage: C,
    /// The system's Raft log position, if it tells one.
    pub log_index: L,
}

/// Runs `clients` clients against `addr` for `warmup` + `measure`.
pub async fn run<C, L>(
    addr: SocketAddr,
    clients: usize,
    warmup: Duration,
    measure: Duration,
    make: MakeRequest,
    probes: &Probes<C, L>,
) -> Result<Run>
where
    C: Fn() -> crate::cluster::Usage,
    L: Fn() -> Option<u64>,
{
    let index_before = (probes.log_index)();
    let before = (probes.usage)();
    let client_before = crate::cluster::cpu_ticks_of(std::process::id());
    let start = Instant::now();
    let warmup_until = start + warmup;
    let until = warmup_until + measure;
    let mut tasks = Vec::new();
    for c in 0..clients {
        tasks.push(tokio::spawn(client_loop(
            addr,
            c,
            make.clone(),
            warmup_until,
            until,
        )));
    }
    let mut hist = latency_histogram()?;
    let (mut ok, mut errors, mut warm) = (0, 0, 0);
    for t in tasks {
        let (h, o, e, w) = t.await??;
        hist.add(&h)?;
        ok += o;
        errors += e;
        warm += w;
    }
    let after = (probes.usage)();
    Ok(Run {
        hist,
        ok,
        errors,
        measured: measure,
        all_ok: ok + warm,
        cpu_ticks: after.cpu_ticks.saturating_sub(before.cpu_ticks),
        switches: after.switches.saturating_sub(before.switches),
        client_cpu_ticks: crate::cluster::cpu_ticks_of(std::process::id())
            .saturating_sub(client_before),
        entries: index_before
            .zip((probes.log_index)())
            .map(|(before, after)| after.saturating_sub(before)),
    })
}

/// Sends requests `0..n` one after another on one connection (set-up).
pub async fn sequential(addr: SocketAddr, n: u64, make: MakeRequest) -> Result<()> {
    let mut conn = Connection::open(addr).await?;
    for seq in 0..n {
        let answer = conn.send(&make(0, seq)).await?;
        if !answer.is_success() {
            bail!(
                "set-up request {seq} failed: {} {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(all_ok: u64, entries: Option<u64>) -> Run {
        Run {
            hist: latency_histogram().unwrap(),
            ok: all_ok,
            errors: 0,
            measured: Duration::from_secs(1),
            all_ok,
            cpu_ticks: 0,
            client_cpu_ticks: 0,
            switches: 0,
            entries,
        }
    }

    #[test]
    fn writes_per_entry_over_all_rounds() {
        let s = Stats::from_runs(&[run(300, Some(10)), run(340, Some(10))]).unwrap();
        assert_eq!(s.ops_per_entry, Some(32.0));
        assert_eq!(s.ops_per_sec, 320.0);
        // A round whose log position is unknown makes the whole figure unknown…
        let s = Stats::from_runs(&[run(300, Some(10)), run(340, None)]).unwrap();
        assert_eq!(s.ops_per_entry, None);
        // …and reads, which add no entry, have none.
        let s = Stats::from_runs(&[run(5000, Some(0))]).unwrap();
        assert_eq!(s.ops_per_entry, None);
    }

    #[test]
    fn one_disturbed_round_moves_the_merged_rates_but_not_the_paired_ratio() {
        let rounds = |rates: &[u64]| {
            Stats::from_runs(&rates.iter().map(|&r| run(r, None)).collect::<Vec<_>>()).unwrap()
        };
        // `b` runs at 95 % of `a` in every round but one, which lost half.
        let a = rounds(&[1000, 1000, 1000, 1000, 1000]);
        let b = rounds(&[950, 950, 475, 950, 950]);
        assert!((b.ops_per_sec / a.ops_per_sec - 0.855).abs() < 1e-9);
        let r = paired_ratio(&b, &a).unwrap();
        assert!((r.median - 0.95).abs() < 1e-9, "{r:?}");
        assert!((r.low - 0.475).abs() < 1e-9 && (r.high - 0.95).abs() < 1e-9);
        // An even number of rounds takes the middle two.
        let r = paired_ratio(&rounds(&[2, 4, 6, 8]), &rounds(&[1, 1, 1, 1])).unwrap();
        assert_eq!(r.median, 5.0);
        // Runs that do not pair up give no ratio.
        assert_eq!(paired_ratio(&a, &rounds(&[1000])), None);
    }
}
