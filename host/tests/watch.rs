//! `/v1/watch` over real nodes: ordered delivery across a leader change,
//! resume from `since` / `Last-Event-ID`, a compacted revision, a slow
//! consumer cut off with a reason, and 100 concurrent watchers.

mod common;

use std::time::Duration;

use common::*;
use flagstone::Node;
use serde_json::Value;

/// One parsed Server-Sent Event.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: Option<u64>,
    data: Value,
}

/// Reads events from a streaming response.
struct SseReader {
    resp: reqwest::Response,
    buf: String,
}

impl SseReader {
    async fn open(c: &reqwest::Client, url: String, last_event_id: Option<u64>) -> Self {
        let mut req = c.get(url);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        SseReader {
            resp,
            buf: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` when the stream ends.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = ("message".to_owned(), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = v.parse().ok();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if !data.is_empty() {
                    return Some(Sse {
                        event,
                        id,
                        data: serde_json::from_str(&data).unwrap(),
                    });
                }
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.resp.chunk())
                .await
                .expect("no event within 10 s");
            match chunk.unwrap() {
                Some(bytes) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                None => return None,
            }
        }
    }

    /// Reads up to the stream's error event: how many events came before
    /// it, and the error.
    async fn until_error(&mut self) -> (usize, Sse) {
        let mut delivered = 0;
        loop {
            let e = self
                .next()
                .await
                .expect("stream must end with an error event");
            if e.event == "error" {
                return (delivered, e);
            }
            delivered += 1;
        }
    }

    async fn take(&mut self, n: usize) -> Vec<Sse> {
        let mut out = Vec::new();
        while out.len() < n {
            out.push(self.next().await.expect("stream ended early"));
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_from_since_and_last_event_id_without_gaps_or_duplicates() {
    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let mut revs = Vec::new();
    for i in 0..10 {
        revs.push(
            node.set_custom_data(&format!("app/{i}"), format!("v{i}"))
                .await
                .unwrap(),
        );
        node.set_custom_data(&format!("other/{i}"), "x")
            .await
            .unwrap();
    }
    node.delete_custom_data("app/3").await.unwrap();
    // Resume after the 5th app write: exactly the later app changes, in order.
    let mut w = SseReader::open(
        &c,
        url(&node, &format!("/v1/watch?prefix=app/&since={}", revs[4])),
        None,
    )
    .await;
    let got = w.take(6).await;
    let keys: Vec<_> = got
        .iter()
        .map(|e| e.data["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys, ["app/5", "app/6", "app/7", "app/8", "app/9", "app/3"]);
    assert_eq!(got[0].id, Some(revs[5]));
    assert_eq!(got[0].event, "put");
    assert_eq!(got[0].data["value"], "v5");
    assert_eq!(got[5].event, "delete");
    assert!(got.windows(2).all(|p| p[0].id < p[1].id));
    // Live changes follow the backlog with no duplicate.
    let live = node
        .set_custom_data("app/live", vec![0xff, 0x00])
        .await
        .unwrap();
    let e = w.next().await.unwrap();
    assert_eq!(
        (e.id, e.data["value_base64"].as_str()),
        (Some(live), Some("/wA="))
    );

    // An EventSource reconnecting sends Last-Event-ID: same resume semantics.
    let mut w2 = SseReader::open(&c, url(&node, "/v1/watch?prefix=app/"), Some(revs[8])).await;
    let got = w2.take(3).await;
    assert_eq!(
        got.iter().map(|e| e.id.unwrap()).collect::<Vec<_>>()[0],
        revs[9]
    );
    assert_eq!(got[2].id, Some(live));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_revision_tells_the_client_to_relist() {
    let (_dir, node) = single_node(|c| c.watch_history = 5).await;
    let c = client();
    let first = node.set_custom_data("k/0", "0").await.unwrap();
    for i in 1..20 {
        node.set_custom_data(&format!("k/{i}"), "x").await.unwrap();
    }
    let mut w = SseReader::open(
        &c,
        url(&node, &format!("/v1/watch?prefix=k/&since={first}")),
        None,
    )
    .await;
    let e = w.next().await.unwrap();
    assert_eq!(e.event, "error");
    assert_eq!(e.data["code"], "compacted");
    assert!(
        e.data["message"]
            .as_str()
            .unwrap()
            .contains("GET /v1/kv?prefix="),
        "{}",
        e.data
    );
    assert!(w.next().await.is_none(), "the stream ends after the error");
    // Re-list, then watch from the listing's revision: that works.
    let list: Value = get_json(&c, url(&node, "/v1/kv?prefix=k/")).await;
    let rev = list["revision"].as_u64().unwrap();
    let mut w = SseReader::open(
        &c,
        url(&node, &format!("/v1/watch?prefix=k/&since={rev}")),
        None,
    )
    .await;
    let next = node.set_custom_data("k/new", "y").await.unwrap();
    assert_eq!(w.next().await.unwrap().id, Some(next));
    let r = c
        .get(url(&node, "/v1/watch?since=banana"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_with_a_reason() {
    let (_dir, node) = single_node(|c| c.watch_buffer = 16).await;
    let c = client();
    let start = node.reader().revision_now();
    // Connect, then do not read while many large changes are applied.
    let mut w = SseReader::open(&c, url(&node, &format!("/v1/watch?since={start}")), None).await;
    let value = vec![b'v'; 64 * 1024];
    let mut writes = Vec::new();
    for i in 0..200 {
        let n = node.clone();
        let v = value.clone();
        writes.push(tokio::spawn(async move {
            n.set_custom_data(&format!("big/{i:03}"), v).await.unwrap()
        }));
    }
    for w in writes {
        w.await.unwrap();
    }
    // Reading now: some events, then the error, then the end.
    let (delivered, error) = w.until_error().await;
    assert!(
        delivered < 200,
        "everything was delivered; the consumer was not slow"
    );
    assert_eq!(error.data["code"], "slow_consumer");
    let resume = error.data["resume_since"].as_u64().unwrap();
    assert!(w.next().await.is_none());
    // Resuming from the revision it names delivers the rest, in order.
    let mut w = SseReader::open(&c, url(&node, &format!("/v1/watch?since={resume}")), None).await;
    let rest = w.take(200 - delivered).await;
    let mut last = resume;
    for e in &rest {
        assert!(e.id.unwrap() > last);
        last = e.id.unwrap();
    }
    node.shutdown().await;
}

/// With large values the bytes of the history bound what a slow watcher may
/// leave unread, long before the channel's count does: it is cut off, and
/// since the history no longer has what it missed, resuming asks it to
/// re-list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_of_large_values_is_cut_off_by_bytes() {
    let (_dir, node) = single_node(|c| c.watch_history_bytes = 1 << 20).await;
    let c = client();
    let start = node.reader().revision_now();
    let mut w = SseReader::open(&c, url(&node, &format!("/v1/watch?since={start}")), None).await;
    let value = vec![b'v'; 64 * 1024];
    for i in 0..200 {
        node.set_custom_data(&format!("big/{i:03}"), value.clone())
            .await
            .unwrap();
    }
    let (delivered, error) = w.until_error().await;
    assert!(delivered < 200, "everything was delivered");
    assert_eq!(error.data["code"], "slow_consumer", "{}", error.data);
    let resume = error.data["resume_since"].as_u64().unwrap();
    let mut w = SseReader::open(&c, url(&node, &format!("/v1/watch?since={resume}")), None).await;
    let e = w.next().await.unwrap();
    assert_eq!(e.data["code"], "compacted", "{}", e.data);
    node.shutdown().await;
}

/// What a careful client does during a failover: a write that failed with an
/// ambiguous error (the leader went away mid-request) may or may not have
/// been applied, so check with a linearizable read before trying again.
async fn put_carefully(node: &Node, key: &str) -> u64 {
    for _ in 0..50 {
        match node.set_custom_data(key, key.as_bytes().to_vec()).await {
            Ok(rev) => return rev,
            Err(flagstone::WriteError::Unavailable(_) | flagstone::WriteError::NoLeader) => {
                if let Ok(Some(record)) = node.get(key, true).await {
                    return record.revision;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{key}: {e}"),
        }
    }
    panic!("{key}: no leader took the write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_delivery_across_a_leader_change() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster3(dir.path(), fast_tuning()).await;
    let c = client();
    let leader_id = nodes[0].cluster_info().leader_id.unwrap();
    let survivors: Vec<_> = nodes
        .iter()
        .filter(|n| n.id() != leader_id)
        .cloned()
        .collect();
    let leader = nodes.iter().find(|n| n.id() == leader_id).unwrap().clone();
    let since = survivors[0].reader().revision_now();
    let mut w = SseReader::open(
        &c,
        url(
            &survivors[0],
            &format!("/v1/watch?prefix=seq/&since={since}"),
        ),
        None,
    )
    .await;
    let mut acked = Vec::new();
    for i in 0..15 {
        let rev = survivors[i % 2]
            .set_custom_data(&format!("seq/{i:02}"), i.to_string())
            .await
            .unwrap();
        acked.push((format!("seq/{i:02}"), rev));
    }
    leader.shutdown().await;
    for i in 15..30 {
        let rev = put_carefully(&survivors[i % 2], &format!("seq/{i:02}")).await;
        acked.push((format!("seq/{i:02}"), rev));
    }
    let got = w.take(30).await;
    let got: Vec<(String, u64)> = got
        .iter()
        .map(|e| (e.data["key"].as_str().unwrap().to_owned(), e.id.unwrap()))
        .collect();
    assert_eq!(
        got, acked,
        "every acknowledged write exactly once, in commit order"
    );
    for n in survivors {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_watchers_each_see_every_change_in_order() {
    let (_dir, node) = single_node(|_| {}).await;
    let c = client();
    let since = node.reader().revision_now();
    let mut watchers = Vec::new();
    for _ in 0..100 {
        watchers.push(
            SseReader::open(
                &c,
                url(&node, &format!("/v1/watch?prefix=fan/&since={since}")),
                None,
            )
            .await,
        );
    }
    let mut revs = Vec::new();
    for i in 0..20 {
        revs.push(
            node.set_custom_data(&format!("fan/{i}"), "x")
                .await
                .unwrap(),
        );
    }
    let tasks: Vec<_> = watchers
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                w.take(20)
                    .await
                    .iter()
                    .map(|e| e.id.unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), revs);
    }
    node.shutdown().await;
}

/// An open watch (and OFREP event stream) ends when its node shuts down,
/// so a graceful shutdown does not wait on it (it waited 5 s per node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_end_when_the_node_shuts_down() {
    let (_dir, n1) = single_node(|_| {}).await;
    let c = client();
    let mut watch = SseReader::open(&c, url(&n1, "/v1/watch?prefix=k"), None).await;
    let mut events = c.get(url(&n1, "/ofrep/v1/events")).send().await.unwrap();
    assert_eq!(events.status(), 200);
    n1.put("k", b"v".to_vec(), Default::default())
        .await
        .unwrap();
    assert_eq!(watch.next().await.expect("an event").event, "put");

    let started = std::time::Instant::now();
    n1.shutdown().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    assert!(watch.next().await.is_none(), "the watch did not end");
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = events.chunk().await {}
    })
    .await;
    assert!(rest.is_ok(), "the OFREP event stream did not end");
}
