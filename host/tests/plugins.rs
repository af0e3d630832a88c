//! Real wasmtime running real components built from `plugins/` and
//! `host/tests/plugins/`: limits obeyed and violated, capabilities absent by
//! construction, hot reload, and on a 3-node cluster validation on every
//! entry node, on-change on every node in commit order, and evaluation that
//! agrees everywhere with the expected rollout distribution.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flagstone::Node;
use flagstone::plugins::Limits;
use flagstone::plugins::types::{EvalContext, FlagValue, Reason};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn single_with(names: &[&str]) -> (tempfile::TempDir, Arc<Node>) {
    single_with_limits(names, Limits::default()).await
}

async fn single_with_limits(names: &[&str], limits: Limits) -> (tempfile::TempDir, Arc<Node>) {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), names);
    let node = start_plugin_node(1, dir.path(), None, &plugins, limits).await;
    wait_converged(std::slice::from_ref(&node), 1).await;
    (dir, node)
}

async fn status_of(c: &reqwest::Client, node: &Node, name: &str) -> Value {
    let j: Value = get_json(c, url(node, "/v1/plugins")).await;
    j["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_plugins_are_stopped_and_the_node_keeps_serving() {
    // A 1 s validate deadline rather than 50 ms: the memory bomb below must be
    // stopped by its memory cap, which on a loaded machine can take longer
    // than 50 ms to reach (it then counted as a timeout, not a trap).
    let limits = Limits {
        validate: Duration::from_secs(1),
        ..Limits::default()
    };
    let names = ["looper", "membomb", "trapper", "flag_schema"];
    let (_dir, node) = single_with_limits(&names, limits).await;
    let c = client();
    let before = list_revision(&c, node.advertise()).await;

    // Infinite loop: interrupted at the deadline, the write is rejected.
    let t = Instant::now();
    let r = c
        .put(url(&node, "/v1/kv/loop/a"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rejected_by_plugin");
    assert_eq!(e["error"]["plugin"], "looper");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{e}"
    );
    println!("looping validator rejected after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5));

    // Memory bomb: capped at 32 MiB, the allocation fails inside the plugin.
    let r = c
        .put(url(&node, "/v1/kv/bomb/a"))
        .body("x")
        .send()
        .await
        .unwrap();
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["plugin"], "membomb", "{e}");

    // Trap (panic): rejected, fail closed. Deletes are validated too.
    let r = c
        .put(url(&node, "/v1/kv/trap/a"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = c.delete(url(&node, "/v1/kv/trap/a")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // Nothing was proposed.
    assert_eq!(list_revision(&c, node.advertise()).await, before);
    // Keys no plugin cares about, and a valid flag write, still work.
    let r = c
        .put(url(&node, "/v1/kv/plain"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .put(url(&node, "/v1/kv/feature_flags"))
        .body(r#"{"a":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let looper = status_of(&c, &node, "looper").await;
    assert_eq!(looper["counters"]["timeouts"], 1, "{looper}");
    assert_eq!(looper["counters"]["rejections"], 1);
    let bomb = status_of(&c, &node, "membomb").await;
    assert_eq!(bomb["counters"]["traps"], 1, "{bomb}");
    let trapper = status_of(&c, &node, "trapper").await;
    assert_eq!(trapper["counters"]["traps"], 2, "{trapper}");
    // Repeated failures mark a plugin unhealthy, never take the node down.
    for _ in 0..2 {
        c.put(url(&node, "/v1/kv/trap/b"))
            .body("x")
            .send()
            .await
            .unwrap();
    }
    assert_eq!(status_of(&c, &node, "trapper").await["state"], "unhealthy");
    assert_eq!(status_of(&c, &node, "flag-schema").await["state"], "ok");

    // A trapping evaluator (its panic message goes to stderr first) is an
    // OFREP error answer, twice in a row; the request never dies with it.
    for _ in 0..2 {
        let r = c
            .post(url(&node, "/ofrep/v1/evaluate/flags/trap-x"))
            .json(&json!({"context": {"targetingKey": "u"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["errorCode"], "GENERAL", "{e}");
        assert!(
            e["errorDetails"].as_str().unwrap().contains("trapper"),
            "{e}"
        );
    }
    node.shutdown().await;
}

/// Writes that arrive together share Raft entries (group commit), and each
/// still gets its own verdict: only the accepted ones are proposed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_entries_and_keep_their_own_verdicts() {
    let (_dir, node) = single_with(&["flag_schema"]).await;
    let c = client();
    let good = r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off"}"#;
    let bad = r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"gone"}"#;
    let rejected = |i: usize| i.is_multiple_of(3);
    let before = node.cluster_info().applied_index;
    let writes = (0..45).map(|i| {
        let (c, url) = (c.clone(), url(&node, &format!("/v1/kv/flags/f{i}")));
        let body = if rejected(i) { bad } else { good };
        async move {
            let r = c.put(url).body(body).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    });
    let answers = futures::future::join_all(writes).await;
    let entries = node.cluster_info().applied_index - before;
    println!("45 writes, 30 accepted, in {entries} entries");
    for (i, (status, body)) in answers.iter().enumerate() {
        if rejected(i) {
            assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY, "f{i}: {body}");
            assert_eq!(body["error"]["plugin"], "flag-schema", "f{i}: {body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(&format!("flags/f{i}")), "f{i}: {body}");
        } else {
            assert_eq!(*status, StatusCode::OK, "f{i}: {body}");
        }
    }
    for i in 0..45 {
        let r = c
            .get(url(&node, &format!("/v1/kv/flags/f{i}")))
            .send()
            .await
            .unwrap();
        if rejected(i) {
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "f{i} was stored");
        } else {
            assert_eq!(r.text().await.unwrap(), good, "f{i}");
        }
    }
    // 30 accepted writes, sent at once: they shared entries.
    assert!(entries < 30, "{entries} entries for 30 accepted writes");
    node.shutdown().await;
}

/// A validator that once timed out runs on the blocking pool: concurrent
/// writes it validates wait for it side by side, not one after another, and
/// writes it does not validate are not held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspect_validator_costs_a_batch_one_deadline() {
    let deadline = Duration::from_millis(300);
    let limits = Limits {
        validate: deadline,
        ..Limits::default()
    };
    let (_dir, node) = single_with_limits(&["looper", "flag_schema"], limits).await;
    let c = client();
    let put = |key: String, body: &'static str| {
        let (c, url) = (c.clone(), url(&node, &format!("/v1/kv/{key}")));
        async move { c.put(url).body(body).send().await.unwrap().status() }
    };
    // The first timeout makes the looper suspect.
    assert_eq!(
        put("loop/first".into(), "x").await,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    let t = Instant::now();
    let writes = (0..20usize).map(|i| {
        if i.is_multiple_of(2) {
            put(format!("loop/{i}"), "x")
        } else {
            put(format!("plain/{i}"), "x")
        }
    });
    let statuses = futures::future::join_all(writes).await;
    let took = t.elapsed();
    println!("20 writes took {took:?}");
    for (i, s) in statuses.iter().enumerate() {
        let want = if i.is_multiple_of(2) {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::OK
        };
        assert_eq!(*s, want, "write {i}");
    }
    // One after another, ten timed-out calls would take 3 s.
    assert!(took < deadline * 8, "20 writes took {took:?}");
    let looper = status_of(&c, &node, "looper").await;
    assert_eq!(looper["counters"]["timeouts"], 11, "{looper}");
    node.shutdown().await;
}

/// Single-flag evaluations run in batches (`evaluations.rs`). With an
/// evaluator that runs to its deadline every time, a batch must still let
/// the worker's other tasks run between its calls, as inline calls did, not
/// hold them up for the whole batch. One worker thread, so that the batch
/// and the other tasks cannot go to different threads.
#[tokio::test(flavor = "current_thread")]
async fn a_batch_of_looping_evaluations_lets_other_tasks_run() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let deadline = Duration::from_millis(100);
    let limits = Limits {
        evaluate: deadline,
        ..Limits::default()
    };
    let (_dir, node) = single_with_limits(&["looper"], limits).await;
    // A task that sleeps 10 ms at a time records how late it wakes.
    let latest = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (latest, stop) = (latest.clone(), stop.clone());
        tokio::spawn(async move {
            let tick = Duration::from_millis(10);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                tokio::time::sleep(tick).await;
                let late = t.elapsed().saturating_sub(tick).as_micros() as u64;
                latest.fetch_max(late, Ordering::Relaxed);
            }
        })
    };
    let c = client();
    let evaluations = (0..16).map(|i| {
        let req = c
            .post(url(&node, &format!("/ofrep/v1/evaluate/flags/loop-{i}")))
            .body("{}");
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    });
    let t = Instant::now();
    let answers = futures::future::join_all(evaluations).await;
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    ticker.await.unwrap();
    for body in &answers {
        assert_eq!(body["errorCode"], "GENERAL", "{body}");
        let details = body["errorDetails"].as_str().unwrap();
        assert!(details.contains("looper"), "{body}");
    }
    let late = Duration::from_micros(latest.load(Ordering::Relaxed));
    println!("16 evaluations took {took:?}; the ticker woke at most {late:?} late");
    // Each call runs to its deadline: 1.6 s in all, on the one thread.
    assert!(took >= deadline * 16, "16 evaluations took {took:?}");
    // Between two calls the ticker gets its turn: it waits for one or two
    // calls, not for the batch (a batch of 16 held it up 1.6 s).
    assert!(late < deadline * 4, "the ticker woke {late:?} late");
    let looper = status_of(&c, &node, "looper").await;
    assert_eq!(looper["counters"]["timeouts"], 16, "{looper}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cap_is_obeyed_and_violated_as_configured() {
    // With a 2 GiB cap the memory bomb's 1 GiB fits and its write passes.
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["membomb"]);
    let limits = Limits {
        memory_bytes: 2048 * 1024 * 1024,
        validate: Duration::from_secs(20),
        ..Limits::default()
    };
    let node = start_plugin_node(1, dir.path(), None, &plugins, limits).await;
    wait_converged(std::slice::from_ref(&node), 1).await;
    let c = client();
    let r = c
        .put(url(&node, "/v1/kv/bomb/fits"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_sockets_clocks_are_absent_by_construction() {
    let (_dir, node) = single_with(&["escaper", "flag_schema"]).await;
    let c = client();
    let s = status_of(&c, &node, "escaper").await;
    assert_eq!(s["state"], "broken", "{s}");
    let err = s["error"].as_str().unwrap();
    // The component needs WASI interfaces the host never links.
    assert!(
        err.contains("imports something flagstone does not grant"),
        "{err}"
    );
    assert!(err.contains("wasi:"), "{err}");
    // The broken file is reported, not fatal: the other plugin works.
    let r = c
        .put(url(&node, "/v1/kv/escape/x"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(status_of(&c, &node, "flag-schema").await["state"], "ok");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_are_hot_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &[]);
    let node = start_plugin_node(1, dir.path(), None, &plugins, generous_limits()).await;
    wait_converged(std::slice::from_ref(&node), 1).await;
    let c = client();
    let bad = r#"{"new_ui":"yes"}"#;
    let r = c
        .put(url(&node, "/v1/kv/feature_flags"))
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "no validator yet");

    std::fs::copy(
        plugin_wasm_dir().join("flag_schema.wasm"),
        plugins.join("flag_schema.wasm"),
    )
    .unwrap();
    std::fs::write(plugins.join("garbage.wasm"), b"not a component").unwrap();
    wait_for("flag-schema to load", Duration::from_secs(20), || async {
        (status_of(&c, &node, "flag-schema").await["state"] == "ok").then_some(())
    })
    .await;
    assert_eq!(status_of(&c, &node, "garbage").await["state"], "broken");
    let r = c
        .put(url(&node, "/v1/kv/feature_flags"))
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        e["error"]["message"],
        "feature_flags.new_ui: expected boolean, got string \"yes\""
    );

    // A replacement caught half-copied (or a build that does not load)
    // leaves the running version validating: no window of unvalidated
    // writes. The complete file then replaces it.
    let wasm = std::fs::read(plugin_wasm_dir().join("flag_schema.wasm")).unwrap();
    std::fs::write(plugins.join("flag_schema.wasm"), &wasm[..wasm.len() / 2]).unwrap();
    wait_for(
        "flag-schema to be stale",
        Duration::from_secs(20),
        || async { (status_of(&c, &node, "flag-schema").await["state"] == "stale").then_some(()) },
    )
    .await;
    let status = status_of(&c, &node, "flag-schema").await;
    let error = status["error"].as_str().unwrap_or_default();
    assert!(error.contains("keeps running"), "{status}");
    let r = c
        .put(url(&node, "/v1/kv/feature_flags"))
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "still validated"
    );
    std::fs::write(plugins.join("flag_schema.wasm"), &wasm).unwrap();
    wait_for("flag-schema to reload", Duration::from_secs(20), || async {
        let s = status_of(&c, &node, "flag-schema").await;
        (s["state"] == "ok" && s["error"].is_null()).then_some(())
    })
    .await;
    let r = c
        .put(url(&node, "/v1/kv/feature_flags"))
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);

    std::fs::remove_file(plugins.join("flag_schema.wasm")).unwrap();
    wait_for("flag-schema to unload", Duration::from_secs(20), || async {
        status_of(&c, &node, "flag-schema")
            .await
            .is_null()
            .then_some(())
    })
    .await;
    let r = c
        .put(url(&node, "/v1/kv/feature_flags"))
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    node.shutdown().await;
}

async fn plugin_cluster(dir: &std::path::Path) -> Vec<Arc<Node>> {
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let plugins = plugins_dir(
            &dir.join(format!("p{id}")),
            &["flag_schema", "rollout", "audit"],
        );
        let join = nodes.first().map(|n: &Arc<Node>| n.advertise().to_owned());
        nodes.push(start_plugin_node(id, dir, join.as_deref(), &plugins, generous_limits()).await);
    }
    wait_converged(&nodes, 3).await;
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_validates_on_every_entry_node_and_reacts_everywhere_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = plugin_cluster(dir.path()).await;
    let c = client();
    let before = list_revision(&c, nodes[0].advertise()).await;
    for n in &nodes {
        let r = c
            .put(url(n, "/v1/kv/feature_flags"))
            .body(r#"{"new_ui":1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "via node {}",
            n.id()
        );
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "rejected_by_plugin");
        assert_eq!(e["error"]["plugin"], "flag-schema");
        assert_eq!(
            e["error"]["message"],
            "feature_flags.new_ui: expected boolean, got number 1"
        );
        let r = c
            .put(url(n, "/v1/kv/flags/bad"))
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
    for n in &nodes {
        assert_eq!(
            list_revision(&c, n.advertise()).await,
            before,
            "a rejected write was committed"
        );
    }

    // Valid writes from every node; the audit reactor sees them on all three
    // nodes, in commit order.
    let mut revs = Vec::new();
    for (i, v) in [false, true, false, true].iter().enumerate() {
        let n = &nodes[i % 3];
        let body = format!(r#"{{"new_ui":{v},"dark_mode":true}}"#);
        let r = c
            .put(url(n, "/v1/kv/feature_flags"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        revs.push(
            r.json::<Value>().await.unwrap()["revision"]
                .as_u64()
                .unwrap(),
        );
    }
    for n in &nodes {
        let lines = wait_for("audit lines", Duration::from_secs(10), || async {
            let logs: Vec<String> = n
                .plugins()
                .unwrap()
                .recent_logs()
                .into_iter()
                .filter(|l| l.plugin == "audit" && l.message.starts_with("new_ui"))
                .map(|l| l.message)
                .collect();
            (logs.len() >= 4).then_some(logs)
        })
        .await;
        let expected: Vec<String> = vec![
            format!("new_ui: added (false), revision {}", revs[0]),
            format!("new_ui: false → true, revision {}", revs[1]),
            format!("new_ui: true → false, revision {}", revs[2]),
            format!("new_ui: false → true, revision {}", revs[3]),
        ];
        assert_eq!(lines, expected, "node {}", n.id());
    }
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_agrees_on_every_node_with_the_expected_split() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = plugin_cluster(dir.path()).await;
    let def = r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off",
        "targeting":[{"if":[{"attribute":"email","op":"ends_with","value":"@acme.com"}],"variant":"on"}],
        "rollout":[{"variant":"on","weight":30},{"variant":"off","weight":70}]}"#;
    nodes[1]
        .set_custom_data("flags/checkout", def)
        .await
        .unwrap();
    for n in &nodes {
        n.get("flags/checkout", true).await.unwrap().unwrap();
    }
    let ctx = |key: String| EvalContext {
        targeting_key: Some(key),
        attributes: "{}".into(),
    };
    let mut on = 0;
    const USERS: usize = 10_000;
    for i in 0..USERS {
        let (_, e) = nodes[0]
            .plugins()
            .unwrap()
            .evaluate("checkout", &ctx(format!("user-{i}")))
            .unwrap();
        assert_eq!(e.reason, Reason::Split);
        if e.value == FlagValue::Boolean(true) {
            on += 1;
        }
        if i % 10 == 0 {
            for n in &nodes[1..] {
                let (_, other) = n
                    .plugins()
                    .unwrap()
                    .evaluate("checkout", &ctx(format!("user-{i}")))
                    .unwrap();
                assert_eq!(other, e, "node {} disagrees for user-{i}", n.id());
            }
        }
    }
    let share = on as f64 / USERS as f64;
    println!(
        "30% rollout: {on} of {USERS} users on ({:.2}%)",
        share * 100.0
    );
    assert!((0.28..=0.32).contains(&share), "{share}");

    // Targeting beats the split; HTTP gives the same answer on every node.
    for n in &nodes {
        let r = c_eval(
            n,
            "checkout",
            r#"{"context":{"targetingKey":"user-1","email":"a@acme.com"}}"#,
        )
        .await;
        assert_eq!(r["value"], true);
        assert_eq!(r["reason"], "TARGETING_MATCH");
        let r = c_eval(n, "checkout", r#"{"context":{}}"#).await;
        assert_eq!(r["errorCode"], "TARGETING_KEY_MISSING");
        let r = c_eval(n, "missing", r#"{"context":{"targetingKey":"u"}}"#).await;
        assert_eq!(r["errorCode"], "FLAG_NOT_FOUND");
    }
    for n in nodes {
        n.shutdown().await;
    }
}

async fn c_eval(n: &Node, flag: &str, body: &str) -> Value {
    client()
        .post(url(n, &format!("/v1/flags/{flag}/evaluate")))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_does_not_redeliver_old_changes() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugins_dir(dir.path(), &["audit"]);
    let node = start_plugin_node(1, dir.path(), None, &plugins, generous_limits()).await;
    wait_converged(std::slice::from_ref(&node), 1).await;
    for v in [true, false, true] {
        node.set_custom_data("feature_flags", format!(r#"{{"new_ui":{v}}}"#))
            .await
            .unwrap();
    }
    let audit_lines = |n: &Node| {
        n.plugins()
            .unwrap()
            .recent_logs()
            .into_iter()
            .filter(|l| l.plugin == "audit")
            .count()
    };
    wait_for("3 audit lines", Duration::from_secs(10), || async {
        (audit_lines(&node) == 3).then_some(())
    })
    .await;
    node.shutdown().await;
    drop(node);

    let node = start_plugin_node(1, dir.path(), None, &plugins, generous_limits()).await;
    wait_converged(std::slice::from_ref(&node), 1).await;
    let rev = node
        .set_custom_data("feature_flags", r#"{"new_ui":false}"#)
        .await
        .unwrap();
    let logs = wait_for("the new change", Duration::from_secs(10), || async {
        let l: Vec<_> = node
            .plugins()
            .unwrap()
            .recent_logs()
            .into_iter()
            .filter(|l| l.plugin == "audit")
            .collect();
        (!l.is_empty()).then_some(l)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs_after: Vec<_> = node
        .plugins()
        .unwrap()
        .recent_logs()
        .into_iter()
        .filter(|l| l.plugin == "audit")
        .collect();
    assert_eq!(
        logs_after.len(),
        1,
        "old changes were delivered again: {logs_after:?}"
    );
    assert_eq!(
        logs[0].message,
        format!("new_ui: true → false, revision {rev}")
    );
    node.shutdown().await;
}
