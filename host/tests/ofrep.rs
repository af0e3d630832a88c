//! OFREP contract tests against a real node with the rollout evaluator:
//! every status and error code, single and bulk, ETag/304, typed values the
//! way an OpenFeature OFREP provider reads them, and the built-in answer for
//! plain `feature_flags` on a node without plugins.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use flagstone::Node;
use reqwest::StatusCode;
use serde_json::{Value, json};

const FLAGS: &[(&str, &str)] = &[
    (
        "flags/bool-flag",
        r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"on","metadata":{"team":"web","ticket":42}}"#,
    ),
    (
        "flags/str-flag",
        r#"{"state":"ENABLED","variants":{"a":"red","b":"blue"},"defaultVariant":"a"}"#,
    ),
    (
        "flags/int-flag",
        r#"{"state":"ENABLED","variants":{"one":1,"two":2},"defaultVariant":"two"}"#,
    ),
    (
        "flags/float-flag",
        r#"{"state":"ENABLED","variants":{"low":1.25,"high":2.5},"defaultVariant":"low"}"#,
    ),
    (
        "flags/obj-flag",
        r#"{"state":"ENABLED","variants":{"cfg":{"color":"red","size":3}},"defaultVariant":"cfg"}"#,
    ),
    (
        "flags/split-flag",
        r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off","rollout":[{"variant":"on","weight":50},{"variant":"off","weight":50}]}"#,
    ),
    (
        "flags/off-flag",
        r#"{"state":"DISABLED","variants":{"on":true,"off":false},"defaultVariant":"off"}"#,
    ),
    ("flags/broken-flag", r#"{"state":"ENABLED","variants":{}}"#),
    (
        "feature_flags",
        r#"{"new_ui":true,"beta":false,"odd":"yes"}"#,
    ),
];

async fn node_with_flags(plugins: bool) -> (tempfile::TempDir, Arc<Node>) {
    let dir = tempfile::tempdir().unwrap();
    let node = if plugins {
        let p = plugins_dir(dir.path(), &["rollout"]);
        start_plugin_node(1, dir.path(), None, &p, generous_limits()).await
    } else {
        start_node(1, dir.path(), None, fast_tuning()).await
    };
    wait_converged(std::slice::from_ref(&node), 1).await;
    for (k, v) in FLAGS {
        node.set_custom_data(k, *v).await.unwrap();
    }
    (dir, node)
}

async fn post(node: &Node, path: &str, body: &str) -> (StatusCode, Value) {
    let r = client()
        .post(url(node, path))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn single(node: &Node, key: &str, body: &str) -> (StatusCode, Value) {
    post(node, &format!("/ofrep/v1/evaluate/flags/{key}"), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_flag_statuses_and_error_codes() {
    let (_dir, node) = node_with_flags(true).await;
    let ctx = r#"{"context":{"targetingKey":"user-1"}}"#;

    let (s, b) = single(&node, "bool-flag", ctx).await;
    assert_eq!(s, 200);
    assert_eq!(
        b,
        json!({"key":"bool-flag","value":true,"variant":"on","reason":"STATIC","metadata":{"team":"web","ticket":42.0}})
    );
    let (s, b) = single(&node, "off-flag", ctx).await;
    assert_eq!(
        (s, &b["reason"], &b["value"]),
        (StatusCode::OK, &json!("DISABLED"), &json!(false))
    );
    let (s, b) = single(&node, "split-flag", ctx).await;
    assert_eq!((s, &b["reason"]), (StatusCode::OK, &json!("SPLIT")));
    let (s, b) = single(&node, "new_ui", r#"{}"#).await;
    assert_eq!(
        (s, &b["value"], &b["reason"]),
        (StatusCode::OK, &json!(true), &json!("STATIC"))
    );
    // No body at all is an empty context.
    let (s, _) = single(&node, "bool-flag", "").await;
    assert_eq!(s, 200);

    let cases: &[(&str, &str, u16, &str)] = &[
        ("no-such-flag", ctx, 404, "FLAG_NOT_FOUND"),
        ("", ctx, 400, "GENERAL"),
        ("broken-flag", ctx, 400, "PARSE_ERROR"),
        ("bool-flag", "{not json", 400, "PARSE_ERROR"),
        ("bool-flag", "[1,2]", 400, "PARSE_ERROR"),
        (
            "split-flag",
            r#"{"context":{}}"#,
            400,
            "TARGETING_KEY_MISSING",
        ),
        ("bool-flag", r#"{"context":"me"}"#, 400, "INVALID_CONTEXT"),
        (
            "bool-flag",
            r#"{"context":{"targetingKey":7}}"#,
            400,
            "INVALID_CONTEXT",
        ),
        ("odd", ctx, 400, "TYPE_MISMATCH"),
    ];
    for (key, body, status, code) in cases {
        let (s, b) = single(&node, key, body).await;
        assert_eq!(s.as_u16(), *status, "{key} {body}: {b}");
        assert_eq!(b["errorCode"], *code, "{key} {body}: {b}");
        assert_eq!(b["key"], *key);
        assert!(
            b["errorDetails"].as_str().is_some_and(|d| !d.is_empty()),
            "{b}"
        );
    }
    // A key no flag can have (longer than any stored key) is not echoed.
    let (s, b) = single(&node, &"k".repeat(60_000), ctx).await;
    assert_eq!(
        (s, &b["errorCode"]),
        (StatusCode::BAD_REQUEST, &json!("GENERAL"))
    );
    assert_eq!(b["key"], Value::Null, "{b}");
    assert_eq!(
        b["errorDetails"],
        "flag key is 60000 bytes long; the limit is 1024"
    );
    // The legacy path is the same endpoint.
    let (s, b) = post(&node, "/v1/flags/str-flag/evaluate", ctx).await;
    assert_eq!((s, &b["value"]), (StatusCode::OK, &json!("red")));
    // Linearizable evaluation is accepted; a bad consistency value is not.
    let (s, _) = single(&node, "bool-flag?consistency=linearizable", ctx).await;
    assert_eq!(s, 200);
    let (s, b) = single(&node, "bool-flag?consistency=sometimes", ctx).await;
    assert_eq!(
        (s, &b["errorCode"], &b["key"]),
        (
            StatusCode::BAD_REQUEST,
            &json!("GENERAL"),
            &json!("bool-flag")
        )
    );
    // A query string that does not parse is a 400 too (as on /v1/kv), not an
    // answer from local state that ignores the asked-for consistency.
    let dup = "consistency=linearizable&consistency=linearizable";
    let (s, b) = single(&node, &format!("bool-flag?{dup}"), ctx).await;
    assert_eq!(
        (s, &b["errorCode"], &b["key"]),
        (
            StatusCode::BAD_REQUEST,
            &json!("GENERAL"),
            &json!("bool-flag")
        ),
        "{b}"
    );
    assert!(
        b["errorDetails"].as_str().is_some_and(|d| !d.is_empty()),
        "{b}"
    );
    let (s, b) = post(&node, &format!("/ofrep/v1/evaluate/flags?{dup}"), ctx).await;
    assert_eq!(
        (s, &b["errorCode"]),
        (StatusCode::BAD_REQUEST, &json!("GENERAL")),
        "{b}"
    );
    // So is one that does not decode to UTF-8 (not read as U+FFFD).
    let (s, b) = single(&node, "bool-flag?consistency=%FF", ctx).await;
    assert_eq!(
        (s, &b["errorCode"]),
        (StatusCode::BAD_REQUEST, &json!("GENERAL")),
        "{b}"
    );
    assert!(!b.to_string().contains('\u{FFFD}'), "{b}");
    // Under OFREP's paths, no route and a wrong method answer in OFREP's
    // shape too.
    let (s, b) = post(&node, "/ofrep/v1/evaluate/flags/a/b", ctx).await;
    assert_eq!(
        (s, &b["errorCode"]),
        (StatusCode::NOT_FOUND, &json!("GENERAL")),
        "{b}"
    );
    let r = client()
        .get(url(&node, "/ofrep/v1/evaluate/flags/bool-flag"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.headers().contains_key("allow"));
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["errorCode"], "GENERAL", "{b}");
    let r = client()
        .get(url(&node, &format!("/v1/kv/feature_flags?{dup}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "same as /v1/kv");
    // A body over the limit is an OFREP error (JSON) with the limit's status.
    let big = format!(r#"{{"context":{{"pad":"{}"}}}}"#, "x".repeat(3 << 20));
    let (s, b) = single(&node, "bool-flag", &big).await;
    assert_eq!(
        (s, &b["errorCode"], &b["key"]),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!("GENERAL"),
            &json!("bool-flag")
        ),
        "{b}"
    );
    let (s, b) = post(&node, "/ofrep/v1/evaluate/flags", &big).await;
    assert_eq!(
        (s, &b["errorCode"]),
        (StatusCode::PAYLOAD_TOO_LARGE, &json!("GENERAL")),
        "{b}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_flow_bulk_with_etag_then_typed_single_evaluations() {
    let (_dir, node) = node_with_flags(true).await;
    let c = client();
    let bulk = url(&node, "/ofrep/v1/evaluate/flags");
    let ctx = r#"{"context":{"targetingKey":"user-7","plan":"pro"}}"#;

    // 1. Configuration, then the initial bulk fetch.
    let conf: Value = get_json(&c, url(&node, "/ofrep/v1/configuration")).await;
    assert_eq!(conf["name"], "flagstone");
    let r = c.post(&bulk).body(ctx).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let b: Value = r.json().await.unwrap();
    let flags = b["flags"].as_array().unwrap();
    let by_key = |k: &str| flags.iter().find(|f| f["key"] == k).cloned().unwrap();
    let keys: Vec<&str> = flags.iter().map(|f| f["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "beta",
            "bool-flag",
            "broken-flag",
            "float-flag",
            "int-flag",
            "new_ui",
            "obj-flag",
            "odd",
            "off-flag",
            "split-flag",
            "str-flag"
        ]
    );
    assert!(by_key("bool-flag")["value"].is_boolean());
    assert_eq!(by_key("broken-flag")["errorCode"], "PARSE_ERROR");
    assert_eq!(by_key("odd")["errorCode"], "TYPE_MISMATCH");
    assert!(
        b["eventStreams"][0]["url"]
            .as_str()
            .unwrap()
            .ends_with("/ofrep/v1/events")
    );

    // 2. Polling with If-None-Match: 304 while nothing changed.
    let r = c
        .post(&bulk)
        .header("if-none-match", &etag)
        .body(ctx)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
    // An unrelated key does not invalidate the flags; another context does.
    node.set_custom_data("app_config", "{}").await.unwrap();
    let r = c
        .post(&bulk)
        .header("if-none-match", &etag)
        .body(ctx)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = c
        .post(&bulk)
        .header("if-none-match", &etag)
        .body(r#"{"context":{"targetingKey":"other"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A flag change does.
    node.set_custom_data(
        "flags/str-flag",
        r#"{"state":"ENABLED","variants":{"a":"red","b":"blue"},"defaultVariant":"b"}"#,
    )
    .await
    .unwrap();
    let r = c
        .post(&bulk)
        .header("if-none-match", &etag)
        .body(ctx)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_ne!(r.headers()["etag"].to_str().unwrap(), etag);
    // Bad request bodies fail the whole bulk request.
    let r = c
        .post(&bulk)
        .body(r#"{"context":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["errorCode"],
        "INVALID_CONTEXT"
    );
    let r = c.post(&bulk).body("nope").send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["errorCode"], "PARSE_ERROR");

    // 3. Single evaluations, typed as an SDK reads them.
    let (_, b) = single(&node, "bool-flag", ctx).await;
    assert_eq!(b["value"].as_bool(), Some(true));
    let (_, b) = single(&node, "str-flag", ctx).await;
    assert_eq!(b["value"].as_str(), Some("blue"));
    let (_, b) = single(&node, "int-flag", ctx).await;
    assert_eq!(b["value"].as_i64(), Some(2));
    assert!(
        b["value"].is_i64(),
        "integers must not be sent as floats: {b}"
    );
    let (_, b) = single(&node, "float-flag", ctx).await;
    assert_eq!(b["value"].as_f64(), Some(1.25));
    let (_, b) = single(&node, "obj-flag", ctx).await;
    assert_eq!(b["value"], json!({"color":"red","size":3}));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_feature_flags_evaluate_without_plugins_and_changes_are_announced() {
    let (_dir, node) = node_with_flags(false).await;
    let (s, b) = single(&node, "new_ui", "{}").await;
    assert_eq!(s, 200);
    assert_eq!(
        b,
        json!({"key":"new_ui","value":true,"variant":"true","reason":"STATIC","metadata":{}})
    );
    // A rich flag exists but needs an evaluator: not FLAG_NOT_FOUND, which
    // makes OpenFeature SDKs quietly serve their default.
    let (s, b) = single(&node, "bool-flag", "{}").await;
    assert_eq!(
        (s.as_u16(), &b["errorCode"]),
        (400, &json!("GENERAL")),
        "rich flags need an evaluator: {b}"
    );
    assert_eq!(
        b["errorDetails"],
        "flag \"bool-flag\" is defined (flags/bool-flag), but no evaluator plugin on this node evaluates it"
    );
    let (s, b) = single(&node, "no-such-flag", "{}").await;
    assert_eq!(
        (s.as_u16(), &b["errorCode"]),
        (404, &json!("FLAG_NOT_FOUND"))
    );
    let (s, b) = post(&node, "/ofrep/v1/evaluate/flags", "{}").await;
    assert_eq!(s, 200);
    let bool_flag = b["flags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"] == "bool-flag")
        .cloned();
    assert_eq!(bool_flag.unwrap()["errorCode"], "GENERAL", "{b}");
    let (s, b) = single(&node, "odd", "{}").await;
    assert_eq!(
        (s.as_u16(), &b["errorCode"]),
        (400, &json!("TYPE_MISMATCH"))
    );

    // The OFREP event stream says "refetch" when a flag changes, not for other keys.
    let mut events = client()
        .get(url(&node, "/ofrep/v1/events"))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    node.set_custom_data("app_config", "{}").await.unwrap();
    let rev = node
        .set_custom_data("feature_flags", r#"{"new_ui":false}"#)
        .await
        .unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(5), events.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&chunk);
    // OFREP ADR-0008: the SSE event is always `message`, providers dispatch on
    // `data.type`; `id` is the revision.
    assert!(text.contains("event: message\n"), "{text}");
    assert!(!text.contains("event: refetchEvaluation"), "{text}");
    assert!(text.contains(&format!("id: {rev}\n")), "{text}");
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a data line");
    let data: Value = serde_json::from_str(data).unwrap();
    assert_eq!(data, json!({"type": "refetchEvaluation", "revision": rev}));
    let (_, b) = single(&node, "new_ui", "{}").await;
    assert_eq!(b["value"], false);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_evaluation_answers_every_one_of_many_plain_flags() {
    const N: usize = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(1, dir.path(), None, fast_tuning()).await;
    wait_converged(std::slice::from_ref(&node), 1).await;
    let name = |i: usize| format!("flag-{i:05}");
    let value = |i: usize| i.is_multiple_of(3);
    let mut plain: serde_json::Map<String, Value> =
        (0..N).map(|i| (name(i), json!(value(i)))).collect();
    plain.insert("not-bool".into(), json!(7));
    node.set_custom_data("feature_flags", Value::Object(plain).to_string())
        .await
        .unwrap();

    let (s, b) = post(&node, "/ofrep/v1/evaluate/flags", "{}").await;
    assert_eq!(s, 200);
    let flags = b["flags"].as_array().unwrap();
    assert_eq!(flags.len(), N + 1);
    for (i, f) in flags[..N].iter().enumerate() {
        assert_eq!(
            f,
            &json!({
                "key": name(i), "value": value(i), "variant": value(i).to_string(),
                "reason": "STATIC", "metadata": {},
            })
        );
    }
    assert_eq!(flags[N]["key"], "not-bool");
    assert_eq!(flags[N]["errorCode"], "TYPE_MISMATCH");
    // The single-flag path agrees.
    let (s, b) = single(&node, &name(3), "{}").await;
    assert_eq!((s, &b["value"]), (StatusCode::OK, &json!(true)));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_evaluations_each_get_their_own_answer() {
    // Concurrent single-flag requests share evaluation batches; each must
    // still get the answer for its own flag and context, as it gets alone.
    let (_dir, node) = node_with_flags(true).await;
    let flags = [
        "split-flag",
        "bool-flag",
        "str-flag",
        "broken-flag",
        "no-such-flag",
        "new_ui",
    ];
    let requests: Vec<(&str, String)> = (0..96)
        .map(|i| {
            let body = format!(r#"{{"context":{{"targetingKey":"user-{i}"}}}}"#);
            (flags[i % flags.len()], body)
        })
        .collect();
    let mut alone = Vec::new();
    for (flag, body) in &requests {
        alone.push(single(&node, flag, body).await);
    }
    let variants: std::collections::BTreeSet<_> = requests
        .iter()
        .zip(&alone)
        .filter(|((flag, _), _)| *flag == "split-flag")
        .map(|(_, (_, b))| b["variant"].to_string())
        .collect();
    assert_eq!(
        variants.len(),
        2,
        "the split gave one variant: {variants:?}"
    );
    let statuses: std::collections::BTreeSet<_> = alone.iter().map(|(s, _)| s.as_u16()).collect();
    assert_eq!(statuses, [200, 400, 404].into());

    for round in 0..3 {
        let together = futures::future::join_all(
            requests
                .iter()
                .map(|(flag, body)| single(&node, flag, body)),
        )
        .await;
        for (i, (got, want)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(got, want, "round {round}, request {i} ({})", requests[i].0);
        }
    }
    node.shutdown().await;
}
