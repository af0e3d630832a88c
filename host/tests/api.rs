//! The HTTP API on a single real node: every route, every limit, every bad
//! input (4xx with the JSON error body, nothing changed).

mod common;

use std::time::Duration;

use common::*;
use flagstone::keys::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn error_code(resp: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(resp.status(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    body["error"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete_list_round_trip() {
    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let base = node.advertise();
    let r = c
        .put(format!("{base}/v1/kv/flags/new_ui"))
        .header("content-type", "application/json")
        .body(r#"{"on":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["key"], "flags/new_ui");
    let rev = j["revision"].as_u64().unwrap();
    assert_eq!(etag, format!("\"{rev}\""));

    let r = c
        .get(format!("{base}/v1/kv/flags/new_ui"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(r.text().await.unwrap(), r#"{"on":true}"#);

    // No Content-Type given: served as octet-stream; binary kept exactly.
    let bin: Vec<u8> = (0..=255).collect();
    c.put(format!("{base}/v1/kv/blob"))
        .body(bin.clone())
        .send()
        .await
        .unwrap();
    let r = c
        .get(format!("{base}/v1/kv/blob?consistency=linearizable"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.bytes().await.unwrap().to_vec(), bin);

    for k in ["b", "a", "flags/zeta", "c/d"] {
        c.put(format!("{base}/v1/kv/{k}"))
            .body("x")
            .send()
            .await
            .unwrap();
    }
    let j: Value = get_json(&c, format!("{base}/v1/kv?prefix=")).await;
    assert_eq!(
        j["keys"],
        serde_json::json!(["a", "b", "blob", "c/d", "flags/new_ui", "flags/zeta"])
    );
    let j: Value = get_json(&c, format!("{base}/v1/kv?prefix=flags/")).await;
    assert_eq!(j["keys"], serde_json::json!(["flags/new_ui", "flags/zeta"]));
    assert!(j["revision"].as_u64().unwrap() > rev);

    let r = c
        .delete(format!("{base}/v1/kv/flags/new_ui"))
        .send()
        .await
        .unwrap();
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["deleted"], true);
    let r = c
        .delete(format!("{base}/v1/kv/flags/new_ui"))
        .send()
        .await
        .unwrap();
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["deleted"], false);
    let r = c
        .get(format!("{base}/v1/kv/flags/new_ui"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r, StatusCode::NOT_FOUND).await["code"],
        "key_not_found"
    );
    node.shutdown().await;
}

/// A GET whose `If-None-Match` names the current revision (weakly, in a
/// list, or `*`) is 304 with the ETag and no body; a stale or foreign tag
/// gets the value; a changed key no longer matches its old tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_naming_the_current_etag_is_not_modified() {
    use reqwest::Method;
    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let base = node.advertise();
    let k = format!("{base}/v1/kv/cfg");
    let r = c.put(&k).body("one").send().await.unwrap();
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let rev = etag.trim_matches('"').to_owned();
    let weak = format!("W/{etag}");
    let listed = format!("\"999\", {etag}");
    let matching: Vec<Vec<(&str, &str)>> = vec![
        vec![("if-none-match", etag.as_str())],
        vec![("if-none-match", weak.as_str())],
        vec![("if-none-match", listed.as_str())],
        vec![
            ("if-none-match", "\"999\""),
            ("if-none-match", etag.as_str()),
        ],
        vec![("if-none-match", "*")],
    ];
    for headers in &matching {
        for url in [k.clone(), format!("{k}?consistency=linearizable")] {
            let r = send_with(&c, Method::GET, &url, headers).await;
            assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "{url} {headers:?}");
            assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
            assert!(r.bytes().await.unwrap().is_empty());
        }
    }
    // Not this revision: the full answer. A bare revision is not an entity
    // tag, and an unparsable one is a foreign tag, not an error.
    for value in ["\"999\"", rev.as_str(), "\"abc\"", "garbage"] {
        let r = send_with(&c, Method::GET, &k, &[("if-none-match", value)]).await;
        assert_eq!(r.status(), 200, "{value}");
        assert_eq!(r.text().await.unwrap(), "one");
    }
    // After a write the old tag is stale.
    c.put(&k).body("two").send().await.unwrap();
    let r = send_with(&c, Method::GET, &k, &[("if-none-match", etag.as_str())]).await;
    assert_eq!(r.status(), 200);
    assert_ne!(r.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(r.text().await.unwrap(), "two");
    // An absent key is 404 even for `*`.
    let r = send_with(
        &c,
        Method::GET,
        &format!("{base}/v1/kv/none"),
        &[("if-none-match", "*")],
    )
    .await;
    error_code(r, StatusCode::NOT_FOUND).await;
    node.shutdown().await;
}

/// `?limit=N` pages through a listing in key order, `more` says whether a
/// next page exists and `after` (the last key of a page) asks for it; a
/// limit outside 1–10000 or a cursor longer than a key is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_pages_through_its_keys() {
    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let base = node.advertise();
    for k in [
        "a", "flags/1", "flags/2", "flags/3", "flags/4", "flags/5", "z",
    ] {
        let r = c
            .put(format!("{base}/v1/kv/{k}"))
            .body("v")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let page = |query: &str| {
        let url = format!("{base}/v1/kv?{query}");
        let c = c.clone();
        async move {
            let j = get_json(&c, url).await;
            let keys: Vec<String> = serde_json::from_value(j["keys"].clone()).unwrap();
            (keys, j["more"].as_bool().unwrap())
        }
    };
    let v = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();
    let all = v(&["flags/1", "flags/2", "flags/3", "flags/4", "flags/5"]);
    assert_eq!(page("prefix=flags/").await, (all.clone(), false));
    assert_eq!(page("prefix=flags/&limit=5").await, (all.clone(), false));
    assert_eq!(
        page("prefix=flags/&limit=2").await,
        (v(&["flags/1", "flags/2"]), true)
    );
    assert_eq!(
        page("prefix=flags/&limit=2&after=flags/2").await,
        (v(&["flags/3", "flags/4"]), true)
    );
    assert_eq!(
        page("prefix=flags/&limit=2&after=flags/4").await,
        (v(&["flags/5"]), false)
    );
    assert_eq!(page("prefix=flags/&after=flags/5").await, (vec![], false));
    // A cursor that is not a key: before the prefix, inside it, past it.
    assert_eq!(
        page("prefix=flags/&limit=3&after=a").await,
        (all[..3].to_vec(), true)
    );
    assert_eq!(
        page("prefix=flags/&after=flags/2x").await,
        (all[2..].to_vec(), false)
    );
    assert_eq!(page("prefix=flags/&after=g").await, (vec![], false));
    assert_eq!(page("limit=2&after=flags/5").await, (v(&["z"]), false));
    assert_eq!(
        page("prefix=flags/&limit=2&after=flags/1&consistency=linearizable").await,
        (v(&["flags/2", "flags/3"]), true)
    );
    // Page by page, one key at a time, the whole listing comes out once.
    let (mut seen, mut after) = (Vec::new(), String::new());
    for _ in 0..20 {
        let (keys, more) = page(&format!("limit=1&after={after}")).await;
        seen.extend(keys.iter().cloned());
        if !more {
            break;
        }
        after = keys.last().unwrap().clone();
    }
    assert_eq!(seen, page("").await.0);
    assert_eq!(seen.len(), 7);

    let long = "k".repeat(MAX_KEY_BYTES + 1);
    for (query, code) in [
        ("limit=0", "invalid_limit"),
        ("limit=10001", "invalid_limit"),
        ("limit=-1", "invalid_limit"),
        ("limit=01", "invalid_limit"),
        ("limit=", "invalid_limit"),
        ("limit=ten", "invalid_limit"),
        ("limit=99999999999999999999", "invalid_limit"),
        (&format!("after={long}")[..], "invalid_after"),
    ] {
        let r = c.get(format!("{base}/v1/kv?{query}")).send().await.unwrap();
        assert_eq!(
            error_code(r, StatusCode::BAD_REQUEST).await["code"],
            code,
            "{query}"
        );
    }
    let r = c
        .get(format!("{base}/v1/kv?limit=10000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    node.shutdown().await;
}

/// Sends `method url` with `headers`, each pair its own header line (a name
/// may repeat), and for a PUT the body `new`.
async fn send_with(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = c.request(method.clone(), url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if method == reqwest::Method::PUT {
        req = req.body("new");
    }
    req.send().await.unwrap()
}

/// `If-Match` takes `*` or one strong ETag as served (`"12"`, or the bare
/// revision `12`), canonical: no sign, no leading zero, balanced quotes;
/// `If-None-Match` only `*`, and only on a PUT. Anything else, a header
/// repeated on several lines included, is 400 `invalid_precondition` and
/// writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_preconditions_are_refused_and_change_nothing() {
    use reqwest::Method;
    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let base = node.advertise();
    let k = format!("{base}/v1/kv/k");
    let fresh = format!("{base}/v1/kv/fresh");
    let mut rev = 0;
    for _ in 0..12 {
        let r = c.put(&k).body("v").send().await.unwrap();
        assert_eq!(r.status(), 200);
        rev = r.json::<Value>().await.unwrap()["revision"]
            .as_u64()
            .unwrap();
    }
    let exact = format!("\"{rev}\"");
    let padded = format!("\"0{rev}\"");
    let signed = format!("+{rev}");
    let open_quote = format!("\"{rev}");
    let close_quote = format!("{rev}\"");
    let listed = format!("{exact}, \"1\"");
    let bad_if_match: Vec<Vec<(&str, &str)>> = vec![
        vec![("if-match", open_quote.as_str())],
        vec![("if-match", close_quote.as_str())],
        vec![("if-match", signed.as_str())],
        vec![("if-match", padded.as_str())],
        vec![("if-match", "w/\"1\"")],
        vec![("if-match", "W/\"1")],
        vec![("if-match", "")],
        vec![("if-match", "\"99999999999999999999999\"")],
        vec![("if-match", listed.as_str())],
        vec![("if-match", exact.as_str()), ("if-match", "\"999\"")],
        vec![("if-match", "\"999\""), ("if-match", exact.as_str())],
    ];
    for headers in &bad_if_match {
        for method in [Method::PUT, Method::DELETE] {
            let r = send_with(&c, method.clone(), &k, headers).await;
            let e = error_code(r, StatusCode::BAD_REQUEST).await;
            assert_eq!(e["code"], "invalid_precondition", "{method} {headers:?}");
        }
    }
    for headers in [
        &[("if-none-match", "*"), ("if-none-match", "*")][..],
        &[("if-none-match", "\"1\"")][..],
    ] {
        let r = send_with(&c, Method::PUT, &fresh, headers).await;
        let e = error_code(r, StatusCode::BAD_REQUEST).await;
        assert_eq!(e["code"], "invalid_precondition", "{headers:?}");
    }
    let r = send_with(&c, Method::DELETE, &k, &[("if-none-match", "*")]).await;
    let e = error_code(r, StatusCode::BAD_REQUEST).await;
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("DELETE does not take If-None-Match"),
        "{message}"
    );

    // Nothing was written.
    let r = c.get(&k).send().await.unwrap();
    assert_eq!(r.headers()["etag"].to_str().unwrap(), exact);
    assert_eq!(r.text().await.unwrap(), "v");
    assert_eq!(c.get(&fresh).send().await.unwrap().status(), 404);

    // The well-formed forms still work.
    let r = send_with(&c, Method::PUT, &k, &[("if-match", "\"1\"")]).await;
    error_code(r, StatusCode::PRECONDITION_FAILED).await;
    let r = send_with(&c, Method::PUT, &k, &[("if-match", "W/\"1\"")]).await;
    error_code(r, StatusCode::PRECONDITION_FAILED).await;
    let r = send_with(&c, Method::PUT, &k, &[("if-match", exact.as_str())]).await;
    assert_eq!(r.status(), 200);
    let rev = r.json::<Value>().await.unwrap()["revision"]
        .as_u64()
        .unwrap();
    let bare = rev.to_string();
    let r = send_with(&c, Method::DELETE, &k, &[("if-match", bare.as_str())]).await;
    assert_eq!(r.status(), 200);
    let r = send_with(&c, Method::PUT, &fresh, &[("if-none-match", "*")]).await;
    assert_eq!(r.status(), 200);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_and_create_only() {
    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let base = node.advertise();
    let k = format!("{base}/v1/kv/counter");
    let r = c
        .put(&k)
        .header("if-none-match", "*")
        .body("0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rev0 = r.json::<Value>().await.unwrap()["revision"]
        .as_u64()
        .unwrap();
    let r = c
        .put(&k)
        .header("if-none-match", "*")
        .body("9")
        .send()
        .await
        .unwrap();
    let e = error_code(r, StatusCode::PRECONDITION_FAILED).await;
    assert_eq!(e["code"], "precondition_failed");
    assert_eq!(e["revision"], rev0);

    let r = c
        .put(&k)
        .header("if-match", format!("\"{}\"", rev0 + 100))
        .body("9")
        .send()
        .await
        .unwrap();
    error_code(r, StatusCode::PRECONDITION_FAILED).await;
    assert_eq!(c.get(&k).send().await.unwrap().text().await.unwrap(), "0");

    let r = c
        .put(&k)
        .header("if-match", format!("\"{rev0}\""))
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rev1 = r.json::<Value>().await.unwrap()["revision"]
        .as_u64()
        .unwrap();
    // An unquoted revision works too; the old one no longer does.
    let r = c
        .put(&k)
        .header("if-match", rev0.to_string())
        .body("2")
        .send()
        .await
        .unwrap();
    error_code(r, StatusCode::PRECONDITION_FAILED).await;
    let r = c
        .delete(&k)
        .header("if-match", rev0.to_string())
        .send()
        .await
        .unwrap();
    error_code(r, StatusCode::PRECONDITION_FAILED).await;
    let r = c
        .delete(&k)
        .header("if-match", rev1.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // If-Match: * — only if the key exists; a weak tag never matches.
    let r = c
        .put(&k)
        .header("if-match", "*")
        .body("3")
        .send()
        .await
        .unwrap();
    let e = error_code(r, StatusCode::PRECONDITION_FAILED).await;
    assert_eq!(e["revision"], Value::Null, "absent: {e}");
    let r = c.delete(&k).header("if-match", "*").send().await.unwrap();
    error_code(r, StatusCode::PRECONDITION_FAILED).await;
    assert_eq!(c.get(&k).send().await.unwrap().status(), 404);
    let r = c.put(&k).body("4").send().await.unwrap();
    let rev4 = r.json::<Value>().await.unwrap()["revision"]
        .as_u64()
        .unwrap();
    let r = c
        .put(&k)
        .header("if-match", format!("W/\"{rev4}\""))
        .body("5")
        .send()
        .await
        .unwrap();
    error_code(r, StatusCode::PRECONDITION_FAILED).await;
    let r = c
        .put(&k)
        .header("if-match", "*")
        .body("6")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(c.get(&k).send().await.unwrap().text().await.unwrap(), "6");
    let r = c.delete(&k).header("if-match", "*").send().await.unwrap();
    assert_eq!(r.status(), 200);

    // Library API: the seed's four operations.
    let rev = node.set_custom_data("lib", b"v".to_vec()).await.unwrap();
    assert!(rev > rev1);
    assert_eq!(
        node.get_custom_data("lib").await.unwrap(),
        Some(b"v".to_vec())
    );
    assert_eq!(
        node.list_custom_data_keys("li").await.unwrap(),
        vec!["lib".to_string()]
    );
    assert!(node.delete_custom_data("lib").await.unwrap());
    assert_eq!(node.get_custom_data("lib").await.unwrap(), None);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_size_limit() {
    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let base = node.advertise();
    let exact = vec![b'x'; MAX_VALUE_BYTES];
    let r = c
        .put(format!("{base}/v1/kv/big"))
        .body(exact.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = c
        .get(format!("{base}/v1/kv/big"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.len(), MAX_VALUE_BYTES);

    let before = list_revision(&c, base).await;
    let r = c
        .put(format!("{base}/v1/kv/big"))
        .body(vec![b'y'; MAX_VALUE_BYTES + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r, StatusCode::PAYLOAD_TOO_LARGE).await["code"],
        "value_too_large"
    );
    assert_eq!(list_revision(&c, base).await, before);
    let got = c
        .get(format!("{base}/v1/kv/big"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got.iter().all(|b| *b == b'x'));

    // Refused before the body is buffered: announce 2 MiB, send 10 bytes,
    // and the answer comes without the rest ever being sent.
    let mut s = tokio::net::TcpStream::connect(node.local_addr())
        .await
        .unwrap();
    let head = format!(
        "PUT /v1/kv/big HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n0123456789",
        2 * MAX_VALUE_BYTES
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("value_too_large"), "{text}");

    // Chunked (no Content-Length): refused once it crosses the limit.
    let mut s = tokio::net::TcpStream::connect(node.local_addr())
        .await
        .unwrap();
    s.write_all(b"PUT /v1/kv/big HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = vec![b'z'; 64 * 1024];
    for _ in 0..(MAX_VALUE_BYTES / chunk.len() + 1) {
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        if s.write_all(&frame).await.is_err() {
            break;
        }
    }
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert_eq!(list_revision(&c, base).await, before);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let base = node.advertise();
    c.put(format!("{base}/v1/kv/k"))
        .body("v")
        .send()
        .await
        .unwrap();
    let before = list_revision(&c, base).await;

    let long = "k".repeat(MAX_KEY_BYTES + 1);
    for path in [
        "/v1/kv/",
        "/v1/kv/a%01b",
        "/v1/kv/line%0Abreak",
        "/v1/kv/bad%FFutf8",
        &format!("/v1/kv/{long}"),
    ] {
        for method in [
            reqwest::Method::PUT,
            reqwest::Method::GET,
            reqwest::Method::DELETE,
        ] {
            let r = c
                .request(method.clone(), format!("{base}{path}"))
                .body("v")
                .send()
                .await
                .unwrap();
            let e = error_code(r, StatusCode::BAD_REQUEST).await;
            assert_eq!(e["code"], "invalid_key", "{method} {path}: {e}");
        }
    }
    let ok = "k".repeat(MAX_KEY_BYTES);
    let r = c
        .put(format!("{base}/v1/kv/{ok}"))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let before = before.max(list_revision(&c, base).await);

    let r = c
        .put(format!("{base}/v1/kv/k"))
        .header("if-match", "banana")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r, StatusCode::BAD_REQUEST).await["code"],
        "invalid_precondition"
    );
    let r = c
        .put(format!("{base}/v1/kv/k"))
        .header("if-none-match", "\"3\"")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r, StatusCode::BAD_REQUEST).await["code"],
        "invalid_precondition"
    );
    let r = c
        .put(format!("{base}/v1/kv/k"))
        .header("if-match", "1")
        .header("if-none-match", "*")
        .body("x")
        .send()
        .await
        .unwrap();
    error_code(r, StatusCode::BAD_REQUEST).await;
    let r = c
        .get(format!("{base}/v1/kv/k?consistency=eventual-ish"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r, StatusCode::BAD_REQUEST).await["code"],
        "invalid_consistency"
    );

    let r = c.get(format!("{base}/v2/nothing")).send().await.unwrap();
    assert_eq!(
        error_code(r, StatusCode::NOT_FOUND).await["code"],
        "not_found"
    );
    let r = c
        .post(format!("{base}/v1/kv/k"))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r, StatusCode::METHOD_NOT_ALLOWED).await["code"],
        "method_not_allowed"
    );
    let r = c.delete(format!("{base}/v1/kv")).send().await.unwrap();
    error_code(r, StatusCode::METHOD_NOT_ALLOWED).await;

    // Malformed bodies on the node-to-node endpoints: 400, never a panic.
    for rpc in [
        "append",
        "vote",
        "snapshot",
        "forward",
        "forward-batch",
        "read-index",
    ] {
        for body in [
            &b""[..],
            b"\xc1garbage",
            b"{\"json\":true}",
            &[0x92, 0x01][..],
        ] {
            let r = c
                .post(format!("{base}/raft/{rpc}"))
                .body(body.to_vec())
                .send()
                .await
                .unwrap();
            let e = error_code(r, StatusCode::BAD_REQUEST).await;
            assert_eq!(e["code"], "invalid_rpc_body", "{rpc}");
        }
    }
    let r = c
        .post(format!("{base}/v1/cluster/members"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    error_code(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let r = c
        .post(format!("{base}/v1/cluster/members"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    error_code(r, StatusCode::BAD_REQUEST).await;
    let r = c
        .post(format!("{base}/v1/cluster/members"))
        .json(&serde_json::json!({"id": 9, "addr": "ftp://x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r, StatusCode::BAD_REQUEST).await["code"],
        "invalid_member"
    );
    let r = c
        .delete(format!("{base}/v1/cluster/members/notanumber"))
        .send()
        .await
        .unwrap();
    error_code(r, StatusCode::BAD_REQUEST).await;
    let r = c
        .delete(format!("{base}/v1/cluster/members/77"))
        .send()
        .await
        .unwrap();
    error_code(r, StatusCode::NOT_FOUND).await;

    assert_eq!(
        list_revision(&c, base).await,
        before,
        "bad input must change nothing"
    );
    assert_eq!(
        c.get(format!("{base}/v1/kv/k"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "v"
    );
    assert_eq!(
        c.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    node.shutdown().await;
}

/// A node whose Raft core stopped (a fatal storage error, say) serves reads
/// but can neither write nor follow until it restarts: `/healthz` and
/// `/readyz` say so, so an orchestrator restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_fail_once_the_raft_core_stopped() {
    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let base = node.advertise().to_owned();
    for probe in ["/healthz", "/readyz"] {
        let r = c.get(format!("{base}{probe}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{probe} before");
    }
    node.raft().shutdown().await.unwrap();
    let e = error_code(
        c.get(format!("{base}/healthz")).send().await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(e["code"], "raft_stopped", "{e}");
    let e = error_code(
        c.get(format!("{base}/readyz")).send().await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(e["code"], "not_ready", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("Raft core stopped"),
        "{e}"
    );
    node.shutdown().await;
}

/// Followers forward writes to the leader over `/raft/forward-batch`; nodes of
/// the version before it send one MessagePack command per `/raft/forward`
/// request. Both shapes are served, so a rolling upgrade keeps writes going.
/// A value's Content-Type is stored and sent back with every read and watch
/// event: at most 256 bytes of visible ASCII, from a client or forwarded by
/// a follower; an empty one means none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_types_are_bounded_on_every_path() {
    use flagstone::WriteError;
    use flagstone::raft::{Command, CommandResult, Precondition};

    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let k = format!("{}/v1/kv/typed", node.advertise());
    let put = |ct: String| c.put(&k).header("content-type", ct).body("v").send();

    let longest = format!("text/{}", "x".repeat(256 - 5));
    assert_eq!(put(longest.clone()).await.unwrap().status(), 200);
    let r = c.get(&k).send().await.unwrap();
    assert_eq!(r.headers()["content-type"].to_str().unwrap(), longest);
    let etag = r.headers()["etag"].clone();

    let r = put(format!("{longest}x")).await.unwrap();
    let e = error_code(r, StatusCode::BAD_REQUEST).await;
    assert_eq!(e["code"], "invalid_content_type");
    let r = c.get(&k).send().await.unwrap();
    assert_eq!(r.headers()["etag"], etag, "a refused write changed the key");
    // One value is stored: two Content-Types are refused, not one dropped.
    let mut two = reqwest::header::HeaderMap::new();
    two.append("content-type", "text/a".parse().unwrap());
    two.append("content-type", "text/b".parse().unwrap());
    let r = c.put(&k).headers(two).body("v").send().await.unwrap();
    let e = error_code(r, StatusCode::BAD_REQUEST).await;
    assert_eq!(e["code"], "invalid_content_type");
    let r = c.get(&k).send().await.unwrap();
    assert_eq!(r.headers()["etag"], etag, "a refused write changed the key");

    assert_eq!(put(String::new()).await.unwrap().status(), 200);
    let r = c.get(&k).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "application/octet-stream");

    // A follower forwards `content_type` as it got it.
    let forward = |content_type: &str| {
        let cmd = Command::Put {
            key: "forwarded".into(),
            value: b"v".to_vec(),
            content_type: Some(content_type.into()),
            precondition: Precondition::None,
        };
        c.post(format!("{}/raft/forward", node.advertise()))
            .header("content-type", "application/msgpack")
            .body(rmp_serde::to_vec(&cmd).unwrap())
            .send()
    };
    let r = forward("text/plain\r\nX-Injected: 1").await.unwrap();
    assert_eq!(r.status(), 200);
    let answer: Result<CommandResult, WriteError> =
        rmp_serde::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert!(
        matches!(answer, Err(WriteError::InvalidContentType(_))),
        "{answer:?}"
    );
    let r = c
        .get(format!("{}/v1/kv/forwarded", node.advertise()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // A forwarded empty content type (older followers send one) means none.
    let r = forward("").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{}/v1/kv/forwarded", node.advertise()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_writes_in_both_wire_shapes() {
    use flagstone::WriteError;
    use flagstone::raft::{Command, CommandResult, Precondition};

    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let base = node.advertise();
    let put = |key: &str, value: &str| Command::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        content_type: Some("text/plain".into()),
        precondition: Precondition::None,
    };
    let post = |path: &str, body: Vec<u8>| {
        c.post(format!("{base}/raft/{path}"))
            .header("content-type", "application/msgpack")
            .body(body)
            .send()
    };

    let r = post("forward", rmp_serde::to_vec(&put("old/a", "one")).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Result<CommandResult, WriteError> =
        rmp_serde::from_slice(&r.bytes().await.unwrap()).unwrap();
    let Ok(CommandResult::Put { revision }) = answer else {
        panic!("{answer:?}");
    };

    let cmds = vec![
        put("new/a", "two"),
        put("", "empty key"),
        put("new/b", "three"),
    ];
    let applied_before = node.cluster_info().applied_index;
    let r = post("forward-batch", rmp_serde::to_vec(&cmds).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The batch's admitted writes share one log entry: the idle leader does
    // not propose the first alone and the rest after it.
    assert_eq!(
        node.cluster_info().applied_index,
        applied_before + 1,
        "entries appended for one forwarded batch"
    );
    let answers: Vec<Result<CommandResult, WriteError>> =
        rmp_serde::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(answers.len(), 3);
    assert!(
        matches!(answers[0], Ok(CommandResult::Put { revision: r }) if r > revision),
        "{answers:?}"
    );
    assert!(
        matches!(answers[1], Err(WriteError::InvalidKey(_))),
        "{answers:?}"
    );
    assert!(
        matches!(answers[2], Ok(CommandResult::Put { .. })),
        "{answers:?}"
    );

    for (key, value) in [("old/a", "one"), ("new/a", "two"), ("new/b", "three")] {
        let r = c.get(format!("{base}/v1/kv/{key}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{key}");
        assert_eq!(r.text().await.unwrap(), value);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_restarts_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(1, dir.path(), None, fast_tuning()).await;
    wait_converged(std::slice::from_ref(&node), 1).await;
    for i in 0..20 {
        node.set_custom_data(&format!("k{i:02}"), format!("v{i}"))
            .await
            .unwrap();
    }
    node.shutdown().await;
    drop(node);
    let node = start_node(1, dir.path(), None, fast_tuning()).await;
    wait_converged(std::slice::from_ref(&node), 1).await;
    assert_eq!(node.list_custom_data_keys("k").await.unwrap().len(), 20);
    assert_eq!(
        node.get_custom_data("k07").await.unwrap(),
        Some(b"v7".to_vec())
    );
    node.set_custom_data("after", "restart").await.unwrap();
    node.shutdown().await;
}

/// A client that sends its request headers, or its body, too slowly is cut
/// off after the read timeout instead of holding a connection for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_after_the_read_timeout() {
    let (_dir, node) = single_node(|c| c.http_read_timeout = Duration::from_millis(500)).await;
    let addr = node.local_addr();

    // An idle keep-alive connection after a request: closed too.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    let answer = String::from_utf8_lossy(&buf);
    assert!(read.is_ok(), "an idle connection stayed open: {answer}");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Headers that never end: the connection is closed.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "a connection with unfinished headers stayed open"
    );

    // A body shorter than its Content-Length: 400, and nothing written.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PUT /v1/kv/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a request with a stalled body stayed open");
    let answer = String::from_utf8_lossy(&buf);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_body"), "{answer}");
    let r = client()
        .get(format!("{}/v1/kv/slow", node.advertise()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // A slow but steady body still goes through.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"PUT /v1/kv/steady HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    for byte in b"abcd" {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tcp.write_all(&[*byte]).await.unwrap();
    }
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    node.shutdown().await;
}

/// A query string that does not percent-decode to UTF-8 is refused, not
/// decoded lossily (`?prefix=%FF` listed the keys starting with U+FFFD).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_that_is_not_utf8_is_refused() {
    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let base = node.advertise();
    let r = c
        .put(format!("{base}/v1/kv/%C3%A9t%C3%A9"))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{base}/v1/kv?prefix=%C3%A9"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["keys"], serde_json::json!(["été"]));
    for path in [
        "/v1/kv?prefix=%FF",
        "/v1/kv?prefix=a&x=%C3",
        "/v1/watch?prefix=%FF",
        // Every route that reads a query, whatever the part.
        "/v1/kv/%C3%A9t%C3%A9?consistency=%FF",
        "/v1/kv/%C3%A9t%C3%A9?x=%FF",
        "/v1/kv?%FF=1",
    ] {
        let r = c.get(format!("{base}{path}")).send().await.unwrap();
        let e = error_code(r, StatusCode::BAD_REQUEST).await;
        assert_eq!(e["code"], "invalid_query", "{path}");
    }
    node.shutdown().await;
}
