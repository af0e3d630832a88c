//! OpenFeature Remote Evaluation Protocol (OFREP) on every node:
//!
//! - `POST /ofrep/v1/evaluate/flags/{key}` — single flag (also served at
//!   `POST /v1/flags/{key}/evaluate`);
//! - `POST /ofrep/v1/evaluate/flags` — bulk, with `ETag` / `If-None-Match` → 304;
//! - `GET /ofrep/v1/configuration` — provider configuration;
//! - `GET /ofrep/v1/events` — SSE `refetchEvaluation` messages when flags change
//!   (or may have: after lost events, or revisions a snapshot install skipped).
//!
//! Answers come from the node's applied state (a follower may trail the
//! leader by a few milliseconds); `?consistency=linearizable` first waits
//! until the node has applied every write committed before the request.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::kv::wants_linearizable;
use super::query::{QueryError, StrictQuery};
use crate::flags::{
    PlainFlags, bulk_etag, evaluate_by_plugins, flag_keys, is_flag_key, unanswered,
};
use crate::keys::MAX_KEY_BYTES;
use crate::node::Node;
use crate::plugins::types::{ErrorCode, EvalContext, Evaluation, FlagValue, MetadataValue, Reason};
use crate::raft::Change;
use crate::raft::history::{ChangeReceiver, Continuity};

/// Query parameters of evaluation requests.
#[derive(Debug, Deserialize)]
pub struct EvalParams {
    consistency: Option<String>,
}

/// OFREP spelling of a reason.
pub fn reason_str(r: Reason) -> &'static str {
    match r {
        Reason::Static => "STATIC",
        Reason::Default => "DEFAULT",
        Reason::TargetingMatch => "TARGETING_MATCH",
        Reason::Split => "SPLIT",
        Reason::Disabled => "DISABLED",
        Reason::Unknown => "UNKNOWN",
    }
}

/// OFREP spelling of an error code.
pub fn error_code_str(c: ErrorCode) -> &'static str {
    match c {
        ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
        ErrorCode::ParseError => "PARSE_ERROR",
        ErrorCode::TypeMismatch => "TYPE_MISMATCH",
        ErrorCode::TargetingKeyMissing => "TARGETING_KEY_MISSING",
        ErrorCode::InvalidContext => "INVALID_CONTEXT",
        ErrorCode::General => "GENERAL",
    }
}

/// An evaluated value in OFREP JSON (`object` values are JSON text from the
/// plugin and are embedded as JSON; text that is not JSON stays a string).
struct ValueOut<'a>(&'a FlagValue);

impl Serialize for ValueOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            FlagValue::Boolean(b) => s.serialize_bool(*b),
            FlagValue::Text(t) => s.serialize_str(t),
            FlagValue::Integer(i) => s.serialize_i64(*i),
            FlagValue::Float(f) => s.serialize_f64(*f),
            FlagValue::Object(text) => match serde_json::from_str::<&RawValue>(text) {
                Ok(raw) => raw.serialize(s),
                Err(_) => s.serialize_str(text),
            },
        }
    }
}

/// Flag metadata as a JSON object.
struct MetadataOut<'a>(&'a [(String, MetadataValue)]);

impl Serialize for MetadataOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            match v {
                MetadataValue::Boolean(b) => map.serialize_entry(k, b)?,
                MetadataValue::Text(t) => map.serialize_entry(k, t)?,
                MetadataValue::Number(n) => map.serialize_entry(k, n)?,
            }
        }
        map.end()
    }
}

/// A successful evaluation, as OFREP spells it.
#[derive(Serialize)]
struct Success<'a> {
    key: &'a str,
    value: ValueOut<'a>,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    metadata: MetadataOut<'a>,
}

fn success<'a>(key: &'a str, e: &'a Evaluation) -> Success<'a> {
    Success {
        key,
        value: ValueOut(&e.value),
        reason: reason_str(e.reason),
        variant: e.variant.as_deref(),
        metadata: MetadataOut(&e.metadata),
    }
}

/// A JSON response body written straight from a `Serialize` value.
fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => server_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn failure_json(key: Option<&str>, code: ErrorCode, details: &str) -> Value {
    let mut body = json!({ "errorCode": error_code_str(code), "errorDetails": details });
    if let Some(k) = key {
        body["key"] = json!(k);
    }
    body
}

fn failure(status: StatusCode, key: Option<&str>, code: ErrorCode, details: &str) -> Response {
    (status, Json(failure_json(key, code, details))).into_response()
}

/// Whether `path` is one of OFREP's (or this API's flag evaluation): its
/// errors use OFREP's shape, unknown paths and wrong methods included, so an
/// OFREP client can read them.
pub fn is_ofrep_path(path: &str) -> bool {
    path.starts_with("/ofrep/") || path.starts_with("/v1/flags/")
}

/// An error in OFREP's shape (`GENERAL`) for a request that matched no flag
/// evaluation: no route, a wrong method.
pub fn general_failure(status: StatusCode, details: &str) -> Response {
    failure(status, None, ErrorCode::General, details)
}

fn server_error(status: StatusCode, details: String) -> Response {
    let mut resp = (status, Json(json!({ "errorDetails": details }))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// A request body axum could not read (over the body limit: 413, …), as an
/// OFREP error with the rejection's status.
fn body_rejected(key: Option<&str>, e: BytesRejection) -> Response {
    failure(e.status(), key, ErrorCode::General, &e.body_text())
}

/// The request body, borrowed: the context stays JSON text.
#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow, default)]
    context: Option<&'a RawValue>,
}

/// The one context field flagstone reads itself.
#[derive(Deserialize)]
struct ContextKey {
    #[serde(rename = "targetingKey", default)]
    targeting_key: Option<String>,
}

/// [`parse_context`] without building the context as a tree, for single-flag
/// evaluation: the plugin gets the request's context text as it came. Falls
/// back to the full parse (and its error messages) for anything unusual.
fn parse_context_text(body: &[u8]) -> Result<EvalContext, (ErrorCode, String)> {
    let fast = serde_json::from_slice::<RawRequest>(body)
        .ok()
        .and_then(|r| r.context)
        .filter(|c| c.get().starts_with('{') && !beyond_the_full_parse(c.get()))
        .and_then(|c| {
            let key = serde_json::from_str::<ContextKey>(c.get()).ok()?;
            Some(EvalContext {
                targeting_key: key.targeting_key,
                attributes: c.get().to_owned(),
            })
        });
    match fast {
        Some(ctx) => Ok(ctx),
        None => parse_context(body).map(|(_, ctx)| ctx),
    }
}

/// Whether JSON `text` may hold what the full parse refuses but a syntax
/// check lets through: nesting deeper than serde_json's recursion limit, or
/// a number with an exponent (which may be out of `f64`'s range, `1e400`).
/// Such a context takes the full parse, so both paths answer alike. One pass
/// over the bytes; strings are skipped.
fn beyond_the_full_parse(text: &str) -> bool {
    /// serde_json's recursion limit is 128 nested arrays and objects.
    const DEPTH: usize = 100;
    let (mut depth, mut in_string, mut escaped, mut prev) = (0usize, false, false, b' ');
    for &b in text.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > DEPTH {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'e' | b'E' if prev.is_ascii_digit() || prev == b'.' => return true,
            _ => {}
        }
        prev = b;
    }
    false
}

/// Parses `{"context":{…}}` (an empty body means an empty context).
fn parse_context(body: &[u8]) -> Result<(Value, EvalContext), (ErrorCode, String)> {
    let request: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| {
            (
                ErrorCode::ParseError,
                format!("request body is not JSON: {e}"),
            )
        })?
    };
    let Value::Object(mut request) = request else {
        return Err((
            ErrorCode::ParseError,
            "request body must be a JSON object".into(),
        ));
    };
    let context = match request.remove("context") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::Object(m)) => Value::Object(m),
        Some(_) => {
            return Err((
                ErrorCode::InvalidContext,
                "context must be a JSON object".into(),
            ));
        }
    };
    let targeting_key = match context.get("targetingKey") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err((
                ErrorCode::InvalidContext,
                "targetingKey must be a string".into(),
            ));
        }
    };
    let ctx = EvalContext {
        targeting_key,
        attributes: context.to_string(),
    };
    Ok((context, ctx))
}

/// Waits for `?consistency=linearizable`; a malformed query string or an
/// unknown consistency is a 400 (`GENERAL`), as on `/v1/kv`, never a silent
/// answer from local state.
async fn barrier(
    node: &Node,
    key: Option<&str>,
    params: Result<StrictQuery<EvalParams>, QueryError>,
) -> Result<(), Response> {
    let params = match params {
        Ok(StrictQuery(p)) => p,
        Err(e) => {
            return Err(failure(
                StatusCode::BAD_REQUEST,
                key,
                ErrorCode::General,
                &e.0,
            ));
        }
    };
    match wants_linearizable(params.consistency.as_deref()) {
        Ok(false) => Ok(()),
        Ok(true) => node
            .read_barrier()
            .await
            .map_err(|e| server_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        Err(msg) => Err(failure(
            StatusCode::BAD_REQUEST,
            key,
            ErrorCode::General,
            &msg,
        )),
    }
}

/// `POST /ofrep/v1/evaluate/flags/` (an empty flag key, e.g. a client that
/// built the URL from an unset variable): 400 in OFREP's error shape, where
/// the router alone would give the generic 404 that no OFREP client parses.
pub async fn empty_key() -> Response {
    failure(
        StatusCode::BAD_REQUEST,
        Some(""),
        ErrorCode::General,
        "flag key must not be empty",
    )
}

/// `POST /ofrep/v1/evaluate/flags/{key}`
pub async fn evaluate_one(
    State(node): State<Arc<Node>>,
    key: Result<Path<String>, PathRejection>,
    params: Result<StrictQuery<EvalParams>, QueryError>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let key = match key {
        Ok(Path(k)) => k,
        Err(e) => {
            return failure(
                StatusCode::BAD_REQUEST,
                None,
                ErrorCode::General,
                &e.body_text(),
            );
        }
    };
    if key.len() > MAX_KEY_BYTES {
        // No flag can have it (flags are stored under keys); not echoed.
        let e = crate::keys::KeyError::TooLong(key.len());
        return failure(
            StatusCode::BAD_REQUEST,
            None,
            ErrorCode::General,
            &format!("flag {e}"),
        );
    }
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_rejected(Some(&key), e),
    };
    let ctx = match parse_context_text(&body) {
        Ok(c) => c,
        Err((code, msg)) => return failure(StatusCode::BAD_REQUEST, Some(&key), code, &msg),
    };
    if let Err(resp) = barrier(&node, Some(&key), params).await {
        return resp;
    }
    match node.evaluate(&key, ctx).await {
        Ok(e) => json_response(StatusCode::OK, &success(&key, &e)),
        Err(e) => {
            let status = if e.code == ErrorCode::FlagNotFound {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            };
            failure(status, Some(&key), e.code, &e.message)
        }
    }
}

fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    super::kv::none_match_members(headers)
        .map(|t| t.trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

/// `POST /ofrep/v1/evaluate/flags`
pub async fn evaluate_bulk(
    State(node): State<Arc<Node>>,
    params: Result<StrictQuery<EvalParams>, QueryError>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_rejected(None, e),
    };
    let (context, ctx) = match parse_context(&body) {
        Ok(c) => c,
        Err((code, msg)) => return failure(StatusCode::BAD_REQUEST, None, code, &msg),
    };
    if let Err(resp) = barrier(&node, None, params).await {
        return resp;
    }
    // One evaluator call per flag, and as many flags as `feature_flags` holds:
    // off the async workers.
    tokio::task::spawn_blocking(move || bulk(&node, &headers, &context, &ctx))
        .await
        .unwrap_or_else(|e| server_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The bulk answer (or 304) from local state; blocking.
fn bulk(node: &Node, headers: &HeaderMap, context: &Value, ctx: &EvalContext) -> Response {
    let plugins = node.plugins().map(|p| &**p);
    let reader = node.reader();
    let etag = match bulk_etag(reader, plugins, context) {
        Ok(t) => t,
        Err(e) => return server_error(StatusCode::INTERNAL_SERVER_ERROR, e.message),
    };
    let etag_header = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\""));
    if if_none_match(headers, &etag) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag_header)]).into_response();
    }
    // `feature_flags` is parsed once for the whole request, not once per flag.
    let plain = PlainFlags::read(reader);
    let keys = match flag_keys(reader, &plain) {
        Ok(k) => k,
        Err(e) => return server_error(StatusCode::INTERNAL_SERVER_ERROR, e.message),
    };
    let flags: Vec<Value> = keys
        .iter()
        .map(|k| {
            match evaluate_by_plugins(plugins, k, ctx)
                .unwrap_or_else(|| unanswered(reader, &plain, k))
            {
                Ok(e) => serde_json::to_value(success(k, &e)).unwrap_or(Value::Null),
                Err(e) => failure_json(Some(k), e.code, &e.message),
            }
        })
        .collect();
    let body = json!({
        "flags": flags,
        "eventStreams": [{ "type": "sse", "url": format!("{}/ofrep/v1/events", node.advertise()) }],
    });
    ([(header::ETAG, etag_header)], Json(body)).into_response()
}

/// `GET /ofrep/v1/configuration`
pub async fn configuration() -> Response {
    Json(json!({
        "name": "flagstone",
        "capabilities": {
            "cacheInvalidation": { "polling": { "enabled": true, "minPollingIntervalMs": 1000 } },
            "flagEvaluation": { "supportedTypes": ["boolean", "string", "int", "float", "object"] }
        }
    }))
    .into_response()
}

/// `GET /ofrep/v1/events`: one `refetchEvaluation` message per committed
/// change of a flag key, one after any lost events, and one when revisions
/// were skipped (a snapshot install replaced them, flag keys possibly among
/// them), so OFREP clients re-fetch. As OFREP ADR-0008 specifies, the SSE
/// `event:` field is always `message` (providers, and a browser
/// `EventSource`'s `onmessage`, dispatch on the JSON `data.type`), and `id:`
/// is the change's revision.
pub async fn events(
    State(node): State<Arc<Node>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let reader = node.reader();
    // Read before subscribing: a change committed in between shows up as a
    // gap (one extra refetch), never as nothing.
    let seen = Continuity::after(reader.revision_now());
    let refetch = Refetch {
        rx: reader.subscribe(),
        seen,
    };
    let stream = futures::stream::unfold(refetch, Refetch::next).take_until(node.stopping());
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// A `refetchEvaluation` message; `revision` is `None` after lost events.
fn refetch_event(revision: Option<u64>) -> Event {
    let data = json!({ "type": "refetchEvaluation", "revision": revision });
    let event = Event::default().event("message").data(data.to_string());
    match revision {
        Some(rev) => event.id(rev.to_string()),
        None => event,
    }
}

/// One `GET /ofrep/v1/events` stream: the node's changes, and where in their
/// revisions it is (contiguous, except across a snapshot install).
struct Refetch {
    rx: ChangeReceiver,
    seen: Continuity,
}

impl Refetch {
    /// Whether `c` calls for a refetch: it changed a flag key, or the
    /// revisions before it were skipped (a snapshot install replaced them,
    /// and flag keys may have changed with them).
    fn take(&mut self, c: &Change) -> bool {
        let skipped = self.seen.skipped_before(c.revision).is_some();
        skipped || is_flag_key(&c.key)
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            let revision = match self.rx.recv().await {
                Ok(c) if self.take(&c) => Some(c.revision),
                Ok(_) => continue,
                // Events were lost: the safe answer is "re-fetch", which
                // covers whatever they skipped too.
                Err(RecvError::Lagged(_)) => {
                    self.seen.lost();
                    None
                }
                Err(RecvError::Closed) => return None,
            };
            return Some((Ok(refetch_event(revision)), self));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::test_support::{change, sse_texts};

    fn eval(value: FlagValue) -> Evaluation {
        Evaluation {
            value,
            variant: Some("v".into()),
            reason: Reason::TargetingMatch,
            metadata: vec![
                ("team".into(), MetadataValue::Text("web".into())),
                ("n".into(), MetadataValue::Number(2.5)),
            ],
        }
    }

    #[test]
    fn answers_serialize_the_same_as_bytes_and_as_a_tree() {
        let cases = [
            (
                FlagValue::Object(r#"{"color":"blue"}"#.into()),
                json!({"color": "blue"}),
            ),
            (FlagValue::Object("not json".into()), json!("not json")),
            (FlagValue::Integer(-3), json!(-3)),
            (FlagValue::Boolean(true), json!(true)),
        ];
        for (value, expected) in cases {
            let e = eval(value);
            let want = json!({
                "key": "k", "value": expected, "reason": "TARGETING_MATCH", "variant": "v",
                "metadata": {"team": "web", "n": 2.5},
            });
            let bytes: Value =
                serde_json::from_slice(&serde_json::to_vec(&success("k", &e)).unwrap()).unwrap();
            assert_eq!(bytes, want);
            assert_eq!(serde_json::to_value(success("k", &e)).unwrap(), want);
        }
        let mut e = eval(FlagValue::Text("x".into()));
        e.variant = None;
        let v = serde_json::to_value(success("k", &e)).unwrap();
        assert!(v.get("variant").is_none(), "{v}");
    }

    /// The messages of an events stream that starts after revision `last`
    /// and is fed `changes` through a channel holding at most `capacity`.
    async fn refetches(last: u64, capacity: usize, changes: &[(u64, &str)]) -> Vec<String> {
        let (tx, rx) = ChangeReceiver::test_channel(capacity);
        let kept: Vec<_> = changes.iter().map(|(rev, key)| change(*rev, key)).collect();
        for c in &kept {
            tx.send(Arc::downgrade(c)).unwrap();
        }
        drop(tx);
        let refetch = Refetch {
            rx,
            seen: Continuity::after(last),
        };
        sse_texts(futures::stream::unfold(refetch, Refetch::next)).await
    }

    #[tokio::test]
    async fn skipped_revisions_ask_for_a_refetch() {
        let got = refetches(0, 16, &[(1, "flags/a"), (2, "other"), (5, "other")]).await;
        // 1 is a flag, 2 is not, 5 skips 3 and 4 (a snapshot install): they may have been flags.
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(got[0].contains(r"id: 1\n"), "{}", got[0]);
        assert!(got[1].contains(r"id: 5\n"), "{}", got[1]);
        for e in &got {
            assert!(e.contains("event: message"), "{e}");
            assert!(e.contains(r#"\"type\":\"refetchEvaluation\""#), "{e}");
        }
        assert!(got[1].contains(r#"\"revision\":5"#), "{}", got[1]);
    }

    #[tokio::test]
    async fn contiguous_non_flag_changes_ask_for_nothing() {
        let got = refetches(
            3,
            16,
            &[(4, "other"), (5, "feature_flags"), (6, "other"), (7, "x")],
        )
        .await;
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(got[0].contains(r"id: 5\n"), "{}", got[0]);
    }

    #[tokio::test]
    async fn lost_events_ask_for_one_refetch_without_a_revision() {
        // The channel keeps 2: 1 and 2 are lost, 3 follows the loss (not a
        // gap of its own), 7 skips 4..=6.
        let got = refetches(
            0,
            2,
            &[(1, "flags/a"), (2, "other"), (3, "other"), (7, "other")],
        )
        .await;
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(!got[0].contains("id:"), "{}", got[0]);
        assert!(got[0].contains(r#"\"revision\":null"#), "{}", got[0]);
        assert!(got[1].contains(r"id: 7\n"), "{}", got[1]);
    }

    #[test]
    fn context_text_fast_path_agrees_with_the_full_parse() {
        let deep = format!(
            r#"{{"context":{{"x":{}1{}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        for body in [
            r#"{"context":{"targetingKey":"u1","n":1.5e3,"s":"1e400 in a string","t":true}}"#,
            r#"{"context":{"targetingKey":"u1","plan":"pro"}}"#,
            r#"{"context":{"plan":"pro"}}"#,
            r#"{"context":{"targetingKey":null}}"#,
            r#"{"context":null}"#,
            r#"{}"#,
            "",
        ] {
            let fast = parse_context_text(body.as_bytes()).unwrap();
            let (tree, full) = parse_context(body.as_bytes()).unwrap();
            assert_eq!(fast.targeting_key, full.targeting_key, "{body}");
            let attrs: Value = serde_json::from_str(&fast.attributes).unwrap();
            assert_eq!(attrs, tree, "{body}");
        }
        for (body, code) in [
            (
                r#"{"context":{"targetingKey":5}}"#,
                ErrorCode::InvalidContext,
            ),
            (r#"{"context":[1]}"#, ErrorCode::InvalidContext),
            (r#"{"context":{}} x"#, ErrorCode::ParseError),
            ("[1]", ErrorCode::ParseError),
            (
                r#"{"context":{"targetingKey":"u1","x":1e400}}"#,
                ErrorCode::ParseError,
            ),
            (deep.as_str(), ErrorCode::ParseError),
        ] {
            let (c, _) = parse_context_text(body.as_bytes()).unwrap_err();
            assert_eq!(c, code, "{body}");
        }
    }
}
