//! Real `flagstone` processes on 127.0.0.1, real disks: acknowledged writes
//! survive `kill -9` of the leader and of the whole cluster; a killed node
//! rejoins and catches up, also when it is killed again and again while it
//! installs a snapshot; SIGTERM exits cleanly.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

async fn put(c: &reqwest::Client, base: &str, key: &str, value: &str) -> Result<u64, String> {
    let r = c
        .put(format!("{base}/v1/kv/{key}"))
        .body(value.to_owned())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!(
            "{}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    let j: Value = r.json().await.map_err(|e| e.to_string())?;
    Ok(j["revision"].as_u64().unwrap())
}

async fn get(c: &reqwest::Client, base: &str, key: &str, linearizable: bool) -> Option<String> {
    let q = if linearizable {
        "?consistency=linearizable"
    } else {
        ""
    };
    let r = c.get(format!("{base}/v1/kv/{key}{q}")).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.text().await.ok()
}

fn three(dir: &std::path::Path) -> Vec<Proc> {
    let p1 = Proc::spawn(1, &dir.join("n1"), "127.0.0.1:0", None);
    // `--join host:port` (no scheme) works like the URL.
    let p2 = Proc::spawn(2, &dir.join("n2"), "127.0.0.1:0", Some(p1.listen()));
    let p3 = Proc::spawn(3, &dir.join("n3"), "127.0.0.1:0", Some(&p1.url));
    vec![p1, p2, p3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_leader_loses_no_acknowledged_write_and_it_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = three(dir.path());
    let c = client();
    let leader = wait_proc_converged(&c, &procs.iter().collect::<Vec<_>>(), 3).await;
    let li = procs.iter().position(|p| p.id == leader).unwrap();

    // Writes through every node; record exactly what was acknowledged.
    let mut acked: Vec<(String, String)> = Vec::new();
    for i in 0..60 {
        let p = &procs[i % 3];
        let (k, v) = (format!("k/{i:03}"), format!("value-{i}"));
        put(&c, &p.url, &k, &v).await.unwrap();
        acked.push((k, v));
    }
    procs[li].kill9();
    let others: Vec<usize> = (0..3).filter(|i| *i != li).collect();

    // Keep writing through the survivors; the first writes may fail while
    // they elect a leader, but a new leader must take writes within seconds.
    let start = std::time::Instant::now();
    let mut i = 60;
    let mut failed_during_election = 0;
    while acked.len() < 100 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no leader took writes after the kill"
        );
        let p = &procs[others[i % 2]];
        let (k, v) = (format!("k/{i:03}"), format!("value-{i}"));
        match put(&c, &p.url, &k, &v).await {
            Ok(_) => acked.push((k, v)),
            Err(_) => {
                failed_during_election += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        i += 1;
    }
    println!(
        "failover: {failed_during_election} writes refused while electing, {:?} to 100 acks",
        start.elapsed()
    );
    let new_leader = cluster_json(&c, &procs[others[0]].url).await.unwrap()["leader_id"].as_u64();
    assert!(new_leader.is_some_and(|l| l != leader));

    // The killed node restarts from its data dir, rejoins and catches up.
    procs[li].restart();
    wait_proc_converged(&c, &procs.iter().collect::<Vec<_>>(), 3).await;
    for p in &procs {
        for (k, v) in &acked {
            let got = wait_for("value on every node", Duration::from_secs(10), || async {
                get(&c, &p.url, k, true).await
            })
            .await;
            assert_eq!(&got, v, "node {} key {k}", p.id);
        }
    }
    // Once caught up, plain local reads on the restarted node agree as well.
    for (k, v) in &acked {
        let got = wait_for("local catch-up", Duration::from_secs(10), || async {
            get(&c, &procs[li].url, k, false).await
        })
        .await;
        assert_eq!(&got, v);
    }
}

/// A leader that stops answering without closing its connections (paused
/// here; cut off by a network partition alike: nothing resets them) does not
/// hold a follower's writes until the forward timeout: writes sent once the
/// others elected a new leader go to it at once, and the forwards stuck on
/// the old one give up about a second after the change (before: every
/// write through that follower waited the full 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stops_answering_does_not_hold_writes_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let procs = three(dir.path());
    let c = client();
    let leader = wait_proc_converged(&c, &procs.iter().collect::<Vec<_>>(), 3).await;
    for (i, p) in procs.iter().enumerate() {
        put(&c, &p.url, &format!("before/{i}"), "x").await.unwrap();
    }
    let old = procs.iter().find(|p| p.id == leader).unwrap();
    let others: Vec<&Proc> = procs.iter().filter(|p| p.id != leader).collect();
    old.signal("STOP");
    // Forwarded to the paused leader, and stuck there.
    let stuck: Vec<_> = others
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (c, url) = (c.clone(), p.url.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let r = put(&c, &url, &format!("stuck/{i}"), "x").await;
                (r, started.elapsed())
            })
        })
        .collect();
    let next = wait_for("a new leader", Duration::from_secs(20), || async {
        let mut agreed = None;
        for p in &others {
            let l = cluster_json(&c, &p.url).await?["leader_id"].as_u64()?;
            if l == leader || agreed.is_some_and(|a| a != l) {
                return None;
            }
            agreed = Some(l);
        }
        agreed
    })
    .await;
    for (i, p) in others.iter().enumerate() {
        let started = Instant::now();
        let r = put(&c, &p.url, &format!("after/{i}"), "x").await;
        let took = started.elapsed();
        assert!(r.is_ok(), "node {} (leader {next}): {r:?}", p.id);
        assert!(
            took < Duration::from_secs(3),
            "a write through node {} took {took:?} with node {next} leading",
            p.id
        );
    }
    for handle in stuck {
        let (r, took) = handle.await.unwrap();
        // Applied or not: the forward's answer never came.
        if let Err(e) = &r {
            assert!(e.contains("may or may not have been applied"), "{e}");
        }
        assert!(took < Duration::from_secs(8), "stuck for {took:?}: {r:?}");
    }
    old.signal("CONT");
    wait_proc_converged(&c, &procs.iter().collect::<Vec<_>>(), 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_kill9_and_restart_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = three(dir.path());
    let c = client();
    wait_proc_converged(&c, &procs.iter().collect::<Vec<_>>(), 3).await;
    let mut acked = Vec::new();
    for i in 0..40 {
        let k = format!("durable/{i:02}");
        put(&c, &procs[i % 3].url, &k, &i.to_string())
            .await
            .unwrap();
        acked.push(k);
    }
    // Every node dies at once, without any chance to flush.
    for p in procs.iter_mut() {
        p.kill9();
    }
    for p in procs.iter_mut() {
        p.restart();
    }
    wait_proc_converged(&c, &procs.iter().collect::<Vec<_>>(), 3).await;
    for p in &procs {
        for (i, k) in acked.iter().enumerate() {
            assert_eq!(
                get(&c, &p.url, k, true).await.as_deref(),
                Some(i.to_string().as_str()),
                "node {} {k}",
                p.id
            );
        }
    }
    put(&c, &procs[1].url, "after/restart", "yes")
        .await
        .unwrap();
    // SIGTERM: a clean stop with exit status 0.
    for p in procs.iter_mut() {
        let status = p.terminate();
        assert!(status.success(), "node {} exited with {status}", p.id);
    }
}

/// A new member must catch up by snapshot (the log behind it is purged) and
/// is killed with SIGKILL at several moments of that — receiving, ingesting,
/// switching, whichever each hits — and restarted: it ends with every
/// acknowledged write, large values intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_while_installing_a_snapshot_ends_with_everything() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--snapshot-every", "100"];
    let p1 = Proc::spawn_with(1, &dir.path().join("n1"), "127.0.0.1:0", None, &args);
    let p2 = Proc::spawn_with(
        2,
        &dir.path().join("n2"),
        "127.0.0.1:0",
        Some(&p1.url),
        &args,
    );
    let p3 = Proc::spawn_with(
        3,
        &dir.path().join("n3"),
        "127.0.0.1:0",
        Some(&p1.url),
        &args,
    );
    let c = client();
    let leader = wait_proc_converged(&c, &[&p1, &p2, &p3], 3).await;
    let url = [&p1, &p2, &p3]
        .into_iter()
        .find(|p| p.id == leader)
        .unwrap()
        .url
        .clone();
    // 512 KiB of one hex digit (i < 16).
    let blob = |i: usize| format!("{i:x}").repeat(512 * 1024);
    for i in 0..8 {
        put(&c, &url, &format!("blob/{i}"), &blob(i)).await.unwrap();
    }
    // Past 1,000 entries behind a snapshot, the log's start is purged.
    for i in 0..1_150 {
        put(&c, &url, &format!("small/{i:04}"), "s").await.unwrap();
    }

    let mut p4 = Proc::spawn_with(4, &dir.path().join("n4"), "127.0.0.1:0", Some(&url), &args);
    // Restarts need no `--join`: the data dir remembers the seed (killed
    // before the leader replicated anything, the node would otherwise take
    // its empty data dir for a new store and initialize a cluster of its
    // own — this test failed 2 times in 15 so).
    wait_for("node 4 to be a member", Duration::from_secs(10), || async {
        let j = cluster_json(&c, &url).await?;
        j["members"]
            .as_array()?
            .iter()
            .any(|m| m["id"] == 4)
            .then_some(())
    })
    .await;
    for delay_ms in [0, 50, 150, 300, 600] {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        p4.kill9();
        p4.restart();
    }
    let last = wait_for("node 4 to catch up", Duration::from_secs(30), || async {
        get(&c, &p4.url, "small/1149", false).await
    })
    .await;
    assert_eq!(last, "s");
    for i in 0..8 {
        let got = get(&c, &p4.url, &format!("blob/{i}"), false).await;
        assert!(got.as_deref() == Some(blob(i).as_str()), "blob {i}");
    }
    let listed: Value = c
        .get(format!("{}/v1/kv?prefix=small/", p4.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1_150);
    assert!(dir.path().join("n4/snapshot/current").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_node_serves_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let mut p = Proc::spawn(1, &dir.path().join("n1"), "127.0.0.1:0", None);
    let c = client();
    let rev = wait_for("first write", Duration::from_secs(5), || async {
        put(&c, &p.url, "hello", "world").await.ok()
    })
    .await;
    let took = started.elapsed();
    assert!(rev > 0);
    println!("first write acknowledged {took:?} after spawn");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(p.terminate().success());
}

/// Runs the binary with `args` and waits (bounded) for it to exit: its
/// status, stdout and stderr, or `None` if it still ran after 15 s (then it
/// is killed).
fn run_to_exit(args: &[&str]) -> Option<(std::process::ExitStatus, String, String)> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_flagstone"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flagstone");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    Some((status, out, err))
}

/// SIGTERM right after the "listening on" line (printed before the node has
/// started) stops the node cleanly once it has started, instead of killing
/// it half-way; it starts again on the same data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_while_starting_stops_the_node_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let n1 = dir.path().join("n1");
    for _ in 0..3 {
        let mut p = Proc::spawn(1, &n1, "127.0.0.1:0", None);
        let status = p.terminate();
        assert!(status.success(), "{status}");
    }
    let p = Proc::spawn(1, &n1, "127.0.0.1:0", None);
    let c = client();
    wait_for("a write", Duration::from_secs(10), || async {
        put(&c, &p.url, "k", "v").await.ok()
    })
    .await;
}

/// Settings that cannot work stop the binary at once with a message (and
/// without the "listening on" line scripts wait for): a data dir of another
/// node id (its log, vote and membership are that node's), an advertised or
/// seed address peers could not use, snapshots every 0 entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_work_stop_the_binary_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let n1 = dir.path().join("n1");
    let mut p = Proc::spawn(1, &n1, "127.0.0.1:0", None);
    let c = client();
    wait_for("first write", Duration::from_secs(10), || async {
        put(&c, &p.url, "mine", "node 1").await.ok()
    })
    .await;
    assert!(p.terminate().success());

    let n1 = n1.to_str().unwrap();
    let fresh = dir.path().join("fresh");
    let fresh = fresh.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--id", "5", "--data-dir", n1], "belongs to node 1"),
        (
            &["--data-dir", fresh, "--advertise", "http://a b"],
            "advertised address",
        ),
        (
            &["--data-dir", fresh, "--join", "not a url"],
            "seed to join",
        ),
        (
            &["--data-dir", fresh, "--snapshot-every", "0"],
            "snapshot-every",
        ),
    ];
    for (args, message) in cases {
        let mut all = vec!["serve", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let (status, out, err) =
            run_to_exit(&all).unwrap_or_else(|| panic!("{args:?}: still running"));
        assert!(!status.success(), "{args:?}");
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(!out.contains("listening on"), "{args:?}: {out}");
    }
    // Node 1 still starts on its own data dir, with its data.
    let mut p = Proc::spawn(1, &dir.path().join("n1"), "127.0.0.1:0", None);
    let got = wait_for("node 1 again", Duration::from_secs(10), || async {
        get(&c, &p.url, "mine", false).await
    })
    .await;
    assert_eq!(got, "node 1");
    assert!(p.terminate().success());
}
