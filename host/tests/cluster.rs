//! Three real nodes in one process, talking HTTP over 127.0.0.1: formation,
//! replication, forwarding, compare-and-set under contention, linearizable
//! reads, failover, snapshot install to a late joiner, membership removal.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use flagstone::Node;
use flagstone::WriteError;
use flagstone::node::{PutOptions, RaftTuning};
use flagstone::raft::Precondition;
use serde_json::{Value, json};

fn leader_of(nodes: &[Arc<Node>], id: u64) -> Arc<Node> {
    nodes.iter().find(|n| n.id() == id).unwrap().clone()
}

fn follower_of(nodes: &[Arc<Node>], leader: u64) -> Arc<Node> {
    nodes.iter().find(|n| n.id() != leader).unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_replicates_and_forwards() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster3(dir.path(), fast_tuning()).await;
    let c = client();

    // Every node reports the same leader, term and three voters over HTTP.
    let mut views = Vec::new();
    for n in &nodes {
        let j: Value = get_json(&c, url(n, "/v1/cluster")).await;
        assert_eq!(j["node_id"], n.id());
        assert_eq!(j["members"].as_array().unwrap().len(), 3);
        views.push((j["leader_id"].clone(), j["term"].clone()));
    }
    assert!(views.iter().all(|v| *v == views[0]), "{views:?}");
    let leader = views[0].0.as_u64().unwrap();

    // A write on each node (followers forward), read back from every node.
    for (i, n) in nodes.iter().enumerate() {
        let r = c
            .put(url(n, &format!("/v1/kv/from/{}", n.id())))
            .header("content-type", "text/plain")
            .body(format!("written via node {}", n.id()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "write via node {} (leader {leader})",
            n.id()
        );
        let _ = i;
    }
    for n in &nodes {
        for src in 1..=3 {
            let r = c
                .get(url(
                    n,
                    &format!("/v1/kv/from/{src}?consistency=linearizable"),
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["content-type"], "text/plain");
            assert_eq!(r.text().await.unwrap(), format!("written via node {src}"));
        }
    }
    // Local reads converge too, and the listing is identical everywhere.
    let mut listings = Vec::new();
    for n in &nodes {
        let keys = wait_for("local replication", Duration::from_secs(5), || async {
            let k = n.list_custom_data_keys("from/").await.unwrap();
            (k.len() == 3).then_some(k)
        })
        .await;
        listings.push(keys);
    }
    assert!(listings.iter().all(|l| *l == listings[0]));

    // Overwriting a key every node has just read (and so caches) is seen by
    // all: each node's state machine updates its record cache as it applies.
    let r = c
        .put(url(&leader_of(&nodes, leader), "/v1/kv/from/2"))
        .header("content-type", "text/plain")
        .body("overwritten")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for n in &nodes {
        let r = c
            .get(url(n, "/v1/kv/from/2?consistency=linearizable"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "overwritten", "node {}", n.id());
    }

    // Deleting through a follower is seen by all.
    let f = follower_of(&nodes, leader);
    let r = c.delete(url(&f, "/v1/kv/from/1")).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["deleted"], true);
    for n in &nodes {
        let r = c
            .get(url(n, "/v1/kv/from/1?consistency=linearizable"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_from_every_node_loses_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster3(dir.path(), fast_tuning()).await;
    nodes[0]
        .set_custom_data("global_counter", "0")
        .await
        .unwrap();
    const PER_NODE: u64 = 15;
    let mut tasks = Vec::new();
    for n in &nodes {
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u64;
            for _ in 0..PER_NODE {
                loop {
                    let cur = n.get("global_counter", true).await.unwrap().unwrap();
                    let v: u64 = std::str::from_utf8(&cur.value).unwrap().parse().unwrap();
                    let opts = PutOptions {
                        content_type: None,
                        precondition: Precondition::Revision(cur.revision),
                    };
                    match n
                        .put("global_counter", (v + 1).to_string().into_bytes(), opts)
                        .await
                    {
                        Ok(_) => break,
                        Err(WriteError::PreconditionFailed { .. }) => conflicts += 1,
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    for n in &nodes {
        let v = n.get("global_counter", true).await.unwrap().unwrap();
        assert_eq!(
            v.value,
            (3 * PER_NODE).to_string().into_bytes(),
            "node {}",
            n.id()
        );
    }
    println!("{conflicts} compare-and-set conflicts retried");
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster3(dir.path(), fast_tuning()).await;
    let leader_id = nodes[0].cluster_info().leader_id.unwrap();
    let leader = leader_of(&nodes, leader_id);
    let survivors: Vec<_> = nodes
        .iter()
        .filter(|n| n.id() != leader_id)
        .cloned()
        .collect();
    let mut acked = Vec::new();
    for i in 0..20 {
        let key = format!("before/{i}");
        survivors[i % 2]
            .set_custom_data(&key, format!("{i}"))
            .await
            .unwrap();
        acked.push(key);
    }
    leader.shutdown().await;
    let new_leader = wait_for("a new leader", Duration::from_secs(10), || async {
        let l = survivors[0].cluster_info().leader_id?;
        (l != leader_id && survivors[1].cluster_info().leader_id == Some(l)).then_some(l)
    })
    .await;
    assert_ne!(new_leader, leader_id);
    for i in 0..10 {
        let key = format!("after/{i}");
        survivors[i % 2]
            .set_custom_data(&key, format!("{i}"))
            .await
            .unwrap();
        acked.push(key);
    }
    for n in &survivors {
        for k in &acked {
            assert!(
                n.get(k, true).await.unwrap().is_some(),
                "node {} lost {k}",
                n.id()
            );
        }
    }
    for n in survivors {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_catches_up_through_snapshot_and_members_can_be_removed() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = RaftTuning {
        snapshot_every: 20,
        keep_behind_snapshot: 5,
        ..fast_tuning()
    };
    let nodes = cluster3(dir.path(), tuning.clone()).await;
    for i in 0..120 {
        nodes[i % 3]
            .set_custom_data(&format!("bulk/{i:03}"), vec![b'v'; 512])
            .await
            .unwrap();
    }
    let leader = leader_of(&nodes, nodes[0].cluster_info().leader_id.unwrap());
    // The log was compacted behind a snapshot: entry 1 no longer exists, so a
    // new node can only be brought up to date by installing a snapshot.
    let purged = wait_for("log purge", Duration::from_secs(10), || async {
        let m = leader.raft().metrics().borrow().clone();
        m.purged.filter(|p| p.index > 50).map(|p| p.index)
    })
    .await;
    println!("leader purged the log up to {purged}");

    let n4 = start_node(4, dir.path(), Some(nodes[1].advertise()), tuning).await;
    let mut all = nodes.clone();
    all.push(n4.clone());
    wait_converged(&all, 4).await;
    let keys = wait_for(
        "late joiner to catch up",
        Duration::from_secs(10),
        || async {
            let k = n4.list_custom_data_keys("bulk/").await.unwrap();
            (k.len() == 120).then_some(k)
        },
    )
    .await;
    assert_eq!(keys[0], "bulk/000");
    let snap = n4.raft().metrics().borrow().snapshot;
    assert!(
        snap.is_some_and(|s| s.index >= purged),
        "node 4 installed no snapshot: {snap:?}"
    );
    assert!(dir.path().join("node-4/snapshot/current").exists());
    assert_eq!(
        n4.get_custom_data("bulk/007").await.unwrap(),
        Some(vec![b'v'; 512])
    );
    n4.set_custom_data("from/4", "hello").await.unwrap();

    // Remove node 4 through a follower; the cluster goes back to 3 voters.
    let c = client();
    let r = c
        .delete(url(&nodes[2], "/v1/cluster/members/4"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    n4.shutdown().await;
    wait_converged(&nodes, 3).await;
    assert!(nodes.iter().all(|n| n.cluster_info().members.len() == 3));
    nodes[0]
        .set_custom_data("after/removal", "ok")
        .await
        .unwrap();
    for n in nodes {
        n.shutdown().await;
    }
}

/// Removing the leader: writes through the remaining members wait for the
/// election that follows and succeed, instead of failing at once with 503
/// `no_leader` while the members still name the removed node as leader
/// (about 1 s of errors on every node before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_out_the_removal_of_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster3(dir.path(), fast_tuning()).await;
    let leader_id = nodes[0].cluster_info().leader_id.unwrap();
    let rest: Vec<_> = nodes
        .iter()
        .filter(|n| n.id() != leader_id)
        .cloned()
        .collect();
    let c = client();
    let r = c
        .delete(url(&rest[0], &format!("/v1/cluster/members/{leader_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    for (i, n) in rest.iter().enumerate() {
        let r = c
            .put(url(n, &format!("/v1/kv/after/{i}")))
            .body("ok")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    wait_converged(&rest, 2).await;
    for n in &rest {
        let keys = wait_for("both writes", Duration::from_secs(10), || async {
            let k = n.list_custom_data_keys("after/").await.unwrap();
            (k.len() == 2).then_some(k)
        })
        .await;
        assert_eq!(keys, ["after/0", "after/1"]);
    }
    for n in nodes {
        n.shutdown().await;
    }
}

/// A removed node is not told, keeps its old membership and campaigns; the
/// others refuse its votes as from a non-member. Once all of them did, it
/// says so: `/readyz` 503 `removed`, instead of looking like a node that
/// merely lost its leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_reports_itself_removed() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster3(dir.path(), fast_tuning()).await;
    let leader_id = nodes[0].cluster_info().leader_id.unwrap();
    let leader = leader_of(&nodes, leader_id);
    let removed = nodes.iter().find(|n| n.id() != leader_id).unwrap().clone();
    let c = client();
    let r = c
        .delete(url(
            &leader,
            &format!("/v1/cluster/members/{}", removed.id()),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let body = wait_for(
        "the removed node to say so",
        Duration::from_secs(20),
        || async {
            let r = c.get(url(&removed, "/readyz")).send().await.ok()?;
            let body: Value = r.json().await.ok()?;
            (body["error"]["code"] == "removed").then_some(body)
        },
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stop it"),
        "{body}"
    );
    let rest: Vec<_> = nodes
        .iter()
        .filter(|n| n.id() != removed.id())
        .cloned()
        .collect();
    wait_converged(&rest, 2).await;
    for n in &rest {
        assert!(!n.removed(), "node {} is a member", n.id());
        let r = c.get(url(n, "/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    for n in nodes {
        n.shutdown().await;
    }
}

/// A new member catches up on 40 MiB of large values from the log. Each
/// AppendEntries must answer within the heartbeat interval (openraft's RPC
/// timeout): sent all at once, they timed out again and again (a member took
/// 30 s here, or never caught up); replication now reads about 1 MiB of
/// entries per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_on_large_values_goes_in_small_appends() {
    let dir = tempfile::tempdir().unwrap();
    let n1 = start_node(1, dir.path(), None, fast_tuning()).await;
    wait_converged(std::slice::from_ref(&n1), 1).await;
    let value = |i: usize| vec![i as u8; 256 * 1024];
    for i in 0..160 {
        n1.set_custom_data(&format!("blob/{i:03}"), value(i))
            .await
            .unwrap();
    }
    let n2 = start_node(2, dir.path(), Some(n1.advertise()), fast_tuning()).await;
    // About a second here; sent all at once it took 30 s or never ended.
    wait_for("node 2 to catch up", Duration::from_secs(10), || async {
        let k = n2.list_custom_data_keys("blob/").await.unwrap();
        (k.len() == 160).then_some(())
    })
    .await;
    for i in [0, 77, 159] {
        let got = n2.get_custom_data(&format!("blob/{i:03}")).await.unwrap();
        assert!(got == Some(value(i)), "blob {i}");
    }
    n2.shutdown().await;
    n1.shutdown().await;
}

/// Large values take a snapshot by bytes long before `snapshot_every`
/// entries, and the log behind it is purged down to the bytes kept: a member
/// that joins later gets the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_snapshot_and_purge_the_log_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = RaftTuning {
        snapshot_every_bytes: 2 << 20,
        keep_behind_snapshot_bytes: 1 << 20,
        ..fast_tuning()
    };
    let n1 = start_node(1, dir.path(), None, tuning.clone()).await;
    wait_converged(std::slice::from_ref(&n1), 1).await;
    let value = |i: usize| vec![i as u8; 256 * 1024];
    for i in 0..12 {
        n1.set_custom_data(&format!("blob/{i:02}"), value(i))
            .await
            .unwrap();
    }
    // 3 MiB in 12 entries (of 10,000 by count): a snapshot, then a purge
    // keeping at most 1 MiB (four of these entries) behind it.
    let (snapshot, purged) = wait_for("snapshot and purge", Duration::from_secs(10), || async {
        let m = n1.raft().metrics().borrow().clone();
        Some((m.snapshot?.index, m.purged?.index))
    })
    .await;
    assert!(snapshot >= 9, "snapshot at {snapshot}");
    assert!(snapshot - purged <= 4, "kept {} entries", snapshot - purged);

    let n2 = start_node(2, dir.path(), Some(n1.advertise()), tuning).await;
    wait_for("node 2 to catch up", Duration::from_secs(10), || async {
        let k = n2.list_custom_data_keys("blob/").await.unwrap();
        (k.len() == 12).then_some(())
    })
    .await;
    assert!(n2.get_custom_data("blob/03").await.unwrap() == Some(value(3)));
    let installed = n2.raft().metrics().borrow().snapshot;
    assert!(installed.is_some(), "node 2 caught up without the snapshot");
    n2.shutdown().await;
    n1.shutdown().await;
}

/// Adding a member finishes even when the caller gives up: the leader adds
/// a learner, waits for it to catch up, then makes it a voter. A caller that
/// disconnects in between (a joining node that crashed, a client timeout)
/// must not leave a learner nobody would promote: a restarted node with a
/// data dir does not ask to join again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_member_finishes_when_the_caller_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let n1 = start_node(1, dir.path(), None, fast_tuning()).await;
    wait_converged(std::slice::from_ref(&n1), 1).await;
    // An address with nothing behind it yet: the leader waits for it.
    let port = unused_port();
    let addr = format!("http://127.0.0.1:{port}");
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gave_up = impatient
        .post(url(&n1, "/v1/cluster/members"))
        .json(&serde_json::json!({ "id": 2, "addr": addr }))
        .send()
        .await;
    assert!(
        gave_up.is_err(),
        "the leader answered before node 2 existed"
    );

    // Node 2 comes up there, fresh; its own join attempts go nowhere.
    let n2 = start_on(port, 2, dir.path(), |c| {
        c.join = Some("http://127.0.0.1:1".into());
    })
    .await;
    wait_for(
        "node 2 to become a voter",
        Duration::from_secs(10),
        || async {
            let info = n1.cluster_info();
            info.members
                .iter()
                .any(|m| m.id == 2 && m.voter)
                .then_some(())
        },
    )
    .await;
    n2.shutdown().await;
    n1.shutdown().await;
}

/// Adding a member nobody can reach must not make it a voter: a voter that
/// cannot be reached would cost the cluster its quorum (a single node adding
/// one: no writes at all, even after a restart). The request fails once the
/// learner has not caught up in time, and the node stays a learner that can
/// be removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_does_not_catch_up_is_not_made_a_voter() {
    let dir = tempfile::tempdir().unwrap();
    let n1 = start_with(1, dir.path(), |c| {
        c.raft.learner_catch_up = Duration::from_millis(800);
    })
    .await;
    wait_converged(std::slice::from_ref(&n1), 1).await;
    let c = client();
    let port = unused_port();
    let addr = format!("http://127.0.0.1:{port}");
    let add = || {
        c.post(url(&n1, "/v1/cluster/members"))
            .json(&serde_json::json!({ "id": 2, "addr": addr }))
            .send()
    };
    let resp = add().await.unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "learner_not_caught_up", "{body}");
    let members = n1.cluster_info().members;
    assert!(
        members.iter().any(|m| m.id == 2 && !m.voter),
        "node 2 should stay a learner: {members:?}"
    );
    // The cluster still has its quorum: writes go through.
    n1.put("still", b"writable".to_vec(), PutOptions::default())
        .await
        .unwrap();
    // Once the node is up, asking again promotes the learner it already is.
    let n2 = start_on(port, 2, dir.path(), |c| {
        c.join = Some("http://127.0.0.1:1".into());
    })
    .await;
    let resp = add().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        n1.cluster_info()
            .members
            .iter()
            .any(|m| m.id == 2 && m.voter)
    );
    wait_converged(&[n1.clone(), n2.clone()], 2).await;
    n2.shutdown().await;
    n1.shutdown().await;
}

/// A write that cannot be committed (a quorum is down) answers 503 once the
/// write timeout passes, instead of holding the client forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_without_a_quorum_times_out_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let short = |c: &mut flagstone::NodeConfig| {
        c.raft.write_timeout = Duration::from_millis(1500);
    };
    let n1 = start_with(1, dir.path(), short).await;
    wait_converged(std::slice::from_ref(&n1), 1).await;
    let seed = n1.advertise().to_owned();
    let n2 = start_with(2, dir.path(), |c| {
        short(c);
        c.join = Some(seed);
    })
    .await;
    let leader = wait_converged(&[n1.clone(), n2.clone()], 2).await;
    let (leader, other) = if leader == 1 { (n1, n2) } else { (n2, n1) };
    leader
        .put("before", b"1".to_vec(), PutOptions::default())
        .await
        .unwrap();
    other.shutdown().await;
    drop(other);
    // The leader stops calling itself ready once its quorum is gone.
    let c = client();
    wait_for(
        "the leader to be not ready",
        Duration::from_secs(5),
        || async {
            let r = c.get(url(&leader, "/readyz")).send().await.ok()?;
            (r.status() == 503).then_some(())
        },
    )
    .await;

    let started = std::time::Instant::now();
    let resp = client()
        .put(url(&leader, "/v1/kv/after"))
        .body("2")
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    let code = &body["error"]["code"];
    assert!(code == "unavailable" || code == "no_leader", "{body}");
    assert!(took < Duration::from_secs(10), "answered after {took:?}");

    // A linearizable read cannot be confirmed either: bounded the same way
    // (it used to retry for 12 s and more).
    let started = std::time::Instant::now();
    let resp = client()
        .get(url(&leader, "/v1/kv/before?consistency=linearizable"))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 503);
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    leader.shutdown().await;
}

/// `/raft/*` shares the client port. A vote from a node that is not a voter,
/// or any RPC with a term near `u64::MAX` (openraft's next election would
/// overflow it and panic, at every restart), is refused before openraft sees
/// it, and the node's term does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_raft_rpcs_are_refused_and_change_nothing() {
    let (_dir, n1) = single_node(|_| {}).await;
    let c = client();
    let term = n1.cluster_info().term;
    let send = |path: &'static str, body: Vec<u8>| {
        let c = c.clone();
        let url = url(&n1, path);
        async move { c.post(url).body(body).send().await.unwrap() }
    };
    let vote = |term: u64, from: u64| {
        let req = openraft::raft::VoteRequest::new(openraft::Vote::new(term, from), None);
        rmp_serde::to_vec(&req).unwrap()
    };

    let r = send("/raft/vote", vote(term + 1000, 99)).await;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_a_voter", "{body}");

    let r = send("/raft/vote", vote(u64::MAX, 1)).await;
    assert_eq!(r.status(), 400);
    let append = openraft::raft::AppendEntriesRequest::<flagstone::raft::TypeConfig> {
        vote: openraft::Vote::new_committed(u64::MAX, 99),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    let r = send("/raft/append", rmp_serde::to_vec(&append).unwrap()).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_rpc_body", "{body}");

    assert_eq!(n1.cluster_info().term, term, "a refused RPC moved the term");
    n1.put("after", b"ok".to_vec(), PutOptions::default())
        .await
        .unwrap();

    // AppendEntries that pass the term check but that no real leader sends.
    // openraft trusts them: each would break the node (a panic at every
    // restart, no commit ever again, data the API refuses, a panic of the
    // core).
    let info = n1.cluster_info();
    let (term, last) = (info.term, info.commit_index);
    let log_id = |term: u64, index: u64| {
        openraft::LogId::new(openraft::CommittedLeaderId::new(term, 99), index)
    };
    let put = |key: String| {
        openraft::EntryPayload::Normal(flagstone::raft::Command::Put {
            key,
            value: b"x".to_vec(),
            content_type: None,
            precondition: Precondition::None,
        })
    };
    let forged = |entries: Vec<(
        u64,
        u64,
        openraft::EntryPayload<flagstone::raft::TypeConfig>,
    )>,
                  commit: Option<(u64, u64)>| {
        let req = openraft::raft::AppendEntriesRequest::<flagstone::raft::TypeConfig> {
            vote: openraft::Vote::new_committed(term + 1, 99),
            prev_log_id: Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(term, 1),
                last,
            )),
            entries: entries
                .into_iter()
                .map(|(t, i, payload)| openraft::Entry {
                    log_id: log_id(t, i),
                    payload,
                })
                .collect(),
            leader_commit: commit.map(|(t, i)| log_id(t, i)),
        };
        rmp_serde::to_vec(&req).unwrap()
    };
    let membership =
        |m: Value| openraft::EntryPayload::Membership(serde_json::from_value(m).unwrap());
    let next = last + 1;
    let cases = [
        (
            "a key too long for storage",
            forged(
                vec![(term + 1, next, put("k".repeat(70_000)))],
                Some((term + 1, next)),
            ),
        ),
        (
            "a key the API refuses",
            forged(
                vec![(term + 1, next, put("evil\nkey".into()))],
                Some((term + 1, next)),
            ),
        ),
        (
            "an entry term above the leader's",
            forged(
                vec![(u64::MAX, next, put("hiterm".into()))],
                Some((u64::MAX, next)),
            ),
        ),
        (
            "a commit term above the leader's",
            forged(vec![], Some((term + 7, last))),
        ),
        (
            "a gap between entries",
            forged(
                vec![
                    (term + 1, next, openraft::EntryPayload::Blank),
                    (term + 1, next + 4, put("gap".into())),
                ],
                Some((term + 1, next + 4)),
            ),
        ),
        (
            "a gap after prev_log_id",
            forged(vec![(term + 1, next + 1, put("gap".into()))], None),
        ),
        (
            "terms that fall",
            forged(
                vec![
                    (term + 1, next, openraft::EntryPayload::Blank),
                    (term, next + 1, put("fall".into())),
                ],
                None,
            ),
        ),
        (
            "a membership with an empty configuration",
            forged(
                vec![(
                    term + 1,
                    next,
                    membership(json!({"configs": [[]], "nodes": {}})),
                )],
                Some((term + 1, next)),
            ),
        ),
        (
            "a membership whose voter has no address",
            forged(
                vec![(
                    term + 1,
                    next,
                    membership(
                        json!({"configs": [[1, 5]], "nodes": {"1": {"addr": n1.advertise()}}}),
                    ),
                )],
                Some((term + 1, next)),
            ),
        ),
        (
            // Index 0 "follows" no prev_log_id, and its higher term made
            // openraft take the commit index for an advance: it applied a
            // range that runs backwards, and its core panicked.
            "a commit index that runs backwards",
            rmp_serde::to_vec(
                &openraft::raft::AppendEntriesRequest::<flagstone::raft::TypeConfig> {
                    vote: openraft::Vote::new_committed(term + 1, 99),
                    prev_log_id: None,
                    entries: vec![openraft::Entry {
                        log_id: log_id(term + 1, 0),
                        payload: openraft::EntryPayload::Blank,
                    }],
                    leader_commit: Some(log_id(term + 1, 0)),
                },
            )
            .unwrap(),
        ),
    ];
    for (what, body) in cases {
        let r = send("/raft/append", body).await;
        assert_eq!(r.status(), 400, "{what}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_rpc_body", "{what}: {body}");
    }
    let snapshot = |last_term: u64, voters: Value| {
        let members: BTreeMap<u64, openraft::BasicNode> = voters
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c.as_array().unwrap())
            .map(|id| {
                (
                    id.as_u64().unwrap(),
                    openraft::BasicNode::new(n1.advertise()),
                )
            })
            .collect();
        let m = json!({ "configs": voters, "nodes": members });
        let req = openraft::raft::InstallSnapshotRequest::<flagstone::raft::TypeConfig> {
            vote: openraft::Vote::new_committed(term + 1, 99),
            meta: openraft::SnapshotMeta {
                last_log_id: Some(log_id(last_term, last + 10)),
                last_membership: openraft::StoredMembership::new(
                    Some(log_id(term + 1, last + 5)),
                    serde_json::from_value(m).unwrap(),
                ),
                snapshot_id: "forged".into(),
            },
            offset: 0,
            data: b"garbage".to_vec(),
            done: true,
        };
        rmp_serde::to_vec(&flagstone::raft::network::SnapshotChunk::from(req)).unwrap()
    };
    for (what, body) in [
        (
            "a snapshot of a term above the leader's",
            snapshot(u64::MAX, json!([[1]])),
        ),
        (
            "a snapshot with an empty membership",
            snapshot(term + 1, json!([[]])),
        ),
    ] {
        let r = send("/raft/snapshot", body).await;
        assert_eq!(r.status(), 400, "{what}");
    }

    assert_eq!(n1.cluster_info().term, term, "a refused RPC moved the term");
    let keys = n1.list_custom_data_keys("").await.unwrap();
    assert_eq!(
        keys,
        vec!["after".to_owned()],
        "a refused append stored something"
    );
    n1.put("after", b"still ok".to_vec(), PutOptions::default())
        .await
        .unwrap();
    n1.shutdown().await;
}

/// A snapshot chunk that starts past the bytes received so far (a real
/// leader never sends one) gets openraft's `SnapshotMismatch`, which makes a
/// sender start over, instead of a hole or a seek past the file system's
/// limit — a storage error that stopped the Raft core until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_chunk_past_the_received_bytes_is_refused() {
    let (_dir, n1) = single_node(|_| {}).await;
    let c = client();
    let info = n1.cluster_info();
    let chunk = |offset: u64, data: &[u8]| {
        let log_id =
            |index| openraft::LogId::new(openraft::CommittedLeaderId::new(info.term, 1), index);
        let members = json!({ "configs": [[1]], "nodes": { "1": { "addr": n1.advertise() } } });
        let req = openraft::raft::InstallSnapshotRequest::<flagstone::raft::TypeConfig> {
            vote: openraft::Vote::new_committed(info.term, 1),
            meta: openraft::SnapshotMeta {
                last_log_id: Some(log_id(info.commit_index + 10)),
                last_membership: openraft::StoredMembership::new(
                    Some(log_id(1)),
                    serde_json::from_value(members).unwrap(),
                ),
                snapshot_id: "gappy".into(),
            },
            offset,
            data: data.to_vec(),
            done: false,
        };
        rmp_serde::to_vec(&flagstone::raft::network::SnapshotChunk::from(req)).unwrap()
    };
    type Reply = Result<
        openraft::raft::InstallSnapshotResponse<u64>,
        openraft::error::RaftError<u64, openraft::error::InstallSnapshotError>,
    >;
    let send = |body: Vec<u8>| {
        let c = c.clone();
        let url = url(&n1, "/raft/snapshot");
        async move {
            let r = c.post(url).body(body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            rmp_serde::from_slice::<Reply>(&r.bytes().await.unwrap()).unwrap()
        }
    };
    assert!(send(chunk(0, b"first bytes")).await.is_ok());
    for offset in [12, 1 << 62] {
        match send(chunk(offset, b"more")).await {
            Err(openraft::error::RaftError::APIError(
                openraft::error::InstallSnapshotError::SnapshotMismatch(m),
            )) => assert_eq!((m.expect.offset, m.got.offset), (11, offset)),
            other => panic!("a chunk at {offset}: {other:?}"),
        }
    }
    // A chunk within what was received (a sender's retry) is taken.
    assert!(send(chunk(11, b"more")).await.is_ok());

    let r = c.get(url(&n1, "/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    n1.put("after", b"ok".to_vec(), PutOptions::default())
        .await
        .unwrap();
    n1.shutdown().await;
}

/// One node must not be a member twice: a second id at a member's address
/// (or at an address that answers as another node) would count that node's
/// vote twice, and a write could be acknowledged with only it on disk. The
/// request gets 409 and the membership does not change; an address that is
/// not a usable `http://host:port` gets 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_be_a_member_twice() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster3(dir.path(), fast_tuning()).await;
    let c = client();
    let before = nodes[0].cluster_info().members;
    let n2 = nodes.iter().find(|n| n.id() == 2).unwrap();
    let port = n2.local_addr().port();
    for (addr, status, why) in [
        (n2.advertise().to_owned(), 409, "node 2's own address"),
        (
            format!("http://localhost:{port}"),
            409,
            "node 2 under another name",
        ),
        ("http://a b:notaport".to_owned(), 400, "not a URI"),
        (
            "http://127.0.0.1:99999".to_owned(),
            400,
            "a port over 65535",
        ),
        (format!("http://user@127.0.0.1:{port}"), 400, "user info"),
    ] {
        // Sent to every node: followers relay it to the leader.
        for n in &nodes {
            let r = c
                .post(url(n, "/v1/cluster/members"))
                .json(&serde_json::json!({ "id": 60, "addr": addr }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), status, "{why} via node {}", n.id());
            let body: Value = r.json().await.unwrap();
            let code = if status == 409 {
                "member_conflict"
            } else {
                "invalid_member"
            };
            assert_eq!(body["error"]["code"], code, "{why}: {body}");
        }
    }
    for n in &nodes {
        assert_eq!(n.cluster_info().members, before, "node {}", n.id());
    }
    for n in nodes {
        n.shutdown().await;
    }
}

/// A node the leader made a learner but never promoted (the leader, or the
/// node, failed between the two steps) has a data dir with cluster state.
/// Restarted with `--join`, it asks again and becomes a voter: the data dir
/// alone must not leave it a learner for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_restarted_with_join_asks_again_and_becomes_a_voter() {
    let dir = tempfile::tempdir().unwrap();
    let n1 = start_node(1, dir.path(), None, fast_tuning()).await;
    wait_converged(std::slice::from_ref(&n1), 1).await;
    n1.put("before", b"1".to_vec(), PutOptions::default())
        .await
        .unwrap();

    // Node 2 starts fresh; its own join attempts go nowhere, so it becomes
    // a learner only by the leader's first step, and the second never comes.
    let n2 = start_with(2, dir.path(), |c| {
        c.join = Some("http://127.0.0.1:1".into());
    })
    .await;
    let port = n2.local_addr().port();
    n1.raft()
        .add_learner(2, openraft::BasicNode::new(n2.advertise()), true)
        .await
        .unwrap();
    wait_for(
        "node 2 to hold the data as a learner",
        Duration::from_secs(10),
        || async {
            let learner = n2
                .cluster_info()
                .members
                .iter()
                .any(|m| m.id == 2 && !m.voter);
            (learner && n2.get("before", false).await.ok().flatten().is_some()).then_some(())
        },
    )
    .await;
    n2.shutdown().await;
    drop(n2);
    assert!(
        !n1.cluster_info()
            .members
            .iter()
            .any(|m| m.id == 2 && m.voter),
        "node 2 was promoted without asking"
    );

    // Restarted on the same address, now with a reachable seed.
    let seed = n1.advertise().to_owned();
    let n2 = start_on(port, 2, dir.path(), |c| c.join = Some(seed)).await;
    let nodes = vec![n1.clone(), n2.clone()];
    wait_converged(&nodes, 2).await;
    n2.put("after", b"2".to_vec(), PutOptions::default())
        .await
        .unwrap();
    n2.shutdown().await;
    n1.shutdown().await;
}

/// A node started with `--join` and stopped before the leader added it has a
/// data dir without Raft state. Restarted without `--join`, it must not take
/// that for a new store and initialize a cluster of its own (a second cluster
/// under an id the real one may already count): it keeps asking the seed it
/// was started with, and joins once the seed answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_restarted_without_join_keeps_joining() {
    let dir = tempfile::tempdir().unwrap();
    // The seed's address, with nothing behind it yet.
    let seed_port = unused_port();
    let seed = format!("http://127.0.0.1:{seed_port}");
    let n2 = start_node(2, dir.path(), Some(&seed), fast_tuning()).await;
    n2.shutdown().await;
    drop(n2);

    let n2 = start_node(2, dir.path(), None, fast_tuning()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let info = n2.cluster_info();
    assert_eq!(info.leader_id, None, "node 2 made a cluster of its own");
    assert!(info.members.is_empty(), "{:?}", info.members);

    let n1 = start_on(seed_port, 1, dir.path(), |_| {}).await;
    let nodes = vec![n1.clone(), n2.clone()];
    wait_converged(&nodes, 2).await;
    n2.put("joined", b"yes".to_vec(), PutOptions::default())
        .await
        .unwrap();
    n2.shutdown().await;
    n1.shutdown().await;
}

/// A catch-up larger than the peers' Raft RPC body limit still happens: the
/// follower refuses the big AppendEntries with 413 and the leader resends the
/// entries in smaller parts. A body over the limit gets a JSON 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_over_the_rpc_body_limit_is_sent_in_parts() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = RaftTuning {
        rpc_body_limit: 256 * 1024,
        ..fast_tuning()
    };
    let n1 = start_node(1, dir.path(), None, tuning.clone()).await;
    wait_converged(std::slice::from_ref(&n1), 1).await;
    // 40 entries of 16 KiB: 640 KiB for a new member to catch up on.
    for i in 0..40 {
        n1.set_custom_data(&format!("big/{i:02}"), vec![b'x'; 16 * 1024])
            .await
            .unwrap();
    }
    let n2 = start_node(2, dir.path(), Some(n1.advertise()), tuning).await;
    wait_converged(&[n1.clone(), n2.clone()], 2).await;
    wait_for("node 2 to catch up", Duration::from_secs(20), || async {
        let k = n2.list_custom_data_keys("big/").await.unwrap();
        (k.len() == 40).then_some(())
    })
    .await;
    assert_eq!(
        n2.get_custom_data("big/39").await.unwrap(),
        Some(vec![b'x'; 16 * 1024])
    );

    let r = client()
        .post(url(&n1, "/raft/append"))
        .header("content-type", "application/msgpack")
        .body(vec![0u8; 300 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rpc_body_too_large", "{body}");
    n2.shutdown().await;
    n1.shutdown().await;
}
