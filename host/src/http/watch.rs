//! `GET /v1/watch?prefix=P&since=REV`: Server-Sent Events, one per committed
//! change under `P`, in commit order, from any node.
//!
//! Each event: `id: <revision>`, `event: put|delete`, `data:` JSON
//! `{"key","revision","op","content_type","size","value"}` where `value` is
//! the new value as a string when it is UTF-8, otherwise `value_base64`
//! carries it (deletes have neither). `since` (or the `Last-Event-ID` header
//! an EventSource sends when it reconnects) resumes after that revision with
//! no gap and no duplicate. If changes after it are no longer kept, a single
//! `event: error` with code `compacted` tells the client to re-list
//! (`GET /v1/kv?prefix=P` gives keys and the revision to watch from). A client
//! too slow to keep up gets `event: error` with code `slow_consumer` and the
//! revision to resume from, then the stream ends: memory never grows with a
//! slow reader. A `: keep-alive` comment is sent every 15 s. Revisions are
//! contiguous, so a watcher notices when changes it was following were
//! replaced wholesale (a follower that fell far behind installs a snapshot):
//! it gets `event: error` with code `compacted` and the stream ends.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::error::ApiError;
use super::query::{QueryError, StrictQuery};
use crate::node::Node;
use crate::raft::Change;
use crate::raft::history::ChangeReceiver;

/// Keep-alive comment interval.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Query of a watch.
#[derive(Debug, Deserialize)]
pub struct WatchParams {
    #[serde(default)]
    prefix: String,
    since: Option<u64>,
}

/// One change as an SSE event.
pub fn change_event(c: &Change) -> Event {
    let mut data = json!({ "key": c.key, "revision": c.revision });
    let op = match &c.new {
        Some(record) => {
            data["op"] = json!("put");
            data["size"] = json!(record.value.len());
            data["content_type"] = json!(record.content_type);
            match std::str::from_utf8(&record.value) {
                Ok(text) => data["value"] = json!(text),
                Err(_) => {
                    data["value_base64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(&record.value))
                }
            }
            "put"
        }
        None => {
            data["op"] = json!("delete");
            "delete"
        }
    };
    Event::default()
        .id(c.revision.to_string())
        .event(op)
        .data(data.to_string())
}

fn error_event(code: &str, message: String, resume: Option<u64>) -> Event {
    let mut data = json!({ "code": code, "message": message });
    if let Some(r) = resume {
        data["resume_since"] = json!(r);
    }
    Event::default().event("error").data(data.to_string())
}

struct Watch {
    backlog: VecDeque<Arc<Change>>,
    rx: Option<ChangeReceiver>,
    last: u64,
    prefix: String,
}

impl Watch {
    /// What `c` means for this watcher: nothing (already seen, or not under
    /// the prefix), an event, or — when revisions were skipped, which only a
    /// snapshot install does — the end of the stream with `compacted`.
    fn take(&mut self, c: &Change) -> Option<Event> {
        if c.revision <= self.last {
            return None;
        }
        if c.revision > self.last + 1 {
            let msg = format!(
                "changes {}..={} were replaced by a snapshot on this node; list the keys \
                 again (GET /v1/kv?prefix=...) and watch since the revision it returns",
                self.last + 1,
                c.revision - 1
            );
            self.backlog.clear();
            self.rx = None;
            return Some(error_event("compacted", msg, None));
        }
        self.last = c.revision;
        c.key.starts_with(&self.prefix).then(|| change_event(c))
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        while let Some(c) = self.backlog.pop_front() {
            if let Some(event) = self.take(&c) {
                return Some((Ok(event), self));
            }
        }
        loop {
            let rx = self.rx.as_mut()?;
            match rx.recv().await {
                Ok(c) => {
                    if let Some(event) = self.take(&c) {
                        return Some((Ok(event), self));
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    self.rx = None;
                    let msg = format!(
                        "consumer too slow: it fell {n} changes behind, and the stream ends here \
                         (later changes are not sent either); reconnect with since={}",
                        self.last
                    );
                    let resume = Some(self.last);
                    return Some((Ok(error_event("slow_consumer", msg, resume)), self));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

/// `GET /v1/watch`
pub async fn watch(
    State(node): State<Arc<Node>>,
    query: Result<StrictQuery<WatchParams>, QueryError>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let StrictQuery(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.0))?;
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_query", "Last-Event-ID must be a revision")
                })?,
        ),
    };
    let since = params.since.or(last_event_id);
    let reader = node.reader();
    let start = since.unwrap_or_else(|| reader.revision_now());
    let state = match reader.watch_from(start) {
        Ok((backlog, rx)) => Watch {
            backlog: backlog.into(),
            rx: Some(rx),
            last: start,
            prefix: params.prefix,
        },
        Err(compacted) => {
            let msg = format!(
                "{compacted}; list the keys again (GET /v1/kv?prefix=...) and watch since the revision it returns"
            );
            let event = error_event("compacted", msg, None);
            let stream = futures::stream::iter([Ok::<_, Infallible>(event)]);
            return Ok(Sse::new(stream).into_response());
        }
    };
    let stream = futures::stream::unfold(state, Watch::next).take_until(node.stopping());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::test_support::{change, sse_texts};

    async fn events(backlog: Vec<Arc<Change>>, last: u64, prefix: &str) -> Vec<String> {
        let watch = Watch {
            backlog: backlog.into(),
            rx: None,
            last,
            prefix: prefix.into(),
        };
        sse_texts(futures::stream::unfold(watch, Watch::next)).await
    }

    #[tokio::test]
    async fn skipped_revisions_end_the_stream_with_compacted() {
        let got = events(
            vec![
                change(4, "a"),
                change(5, "b/x"),
                change(6, "a"),
                change(9, "a"),
                change(10, "a"),
            ],
            4,
            "a",
        )
        .await;
        // 4 was seen already, 5 is outside the prefix, 6 is delivered, 9 skips 7 and 8.
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(got[0].contains(r"id: 6\nevent: delete"), "{}", got[0]);
        assert!(
            got[1].contains(r"event: error") && got[1].contains("compacted"),
            "{}",
            got[1]
        );
        assert!(got[1].contains("changes 7..=8 were replaced"), "{}", got[1]);
    }

    #[tokio::test]
    async fn contiguous_revisions_all_arrive() {
        let got = events(vec![change(1, "a"), change(2, "a"), change(3, "a")], 0, "").await;
        assert_eq!(got.len(), 3, "{got:#?}");
        assert!(got.iter().all(|e| !e.contains("compacted")));
    }
}
