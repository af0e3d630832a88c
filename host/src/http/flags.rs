//! OpenFeature Remote Evaluation Protocol (OFREP) on every node:
//!
//! - `POST /ofrep/v1/evaluate/flags/{key}` — single flag (also served at
//!   `POST /v1/flags/{key}/evaluate`);
//! - `POST /ofrep/v1/evaluate/flags` — bulk, with `ETag` / `If-None-Match` → 304;
//! - `GET /ofrep/v1/configuration` — provider configuration;
//! - `GET /ofrep/v1/events` — SSE `refetchEvaluation` events when flags change.
//!
//! Answers come from the node's applied state (a follower may trail the
//! leader by a few milliseconds); `?consistency=linearizable` first waits
//! until the node has applied every write committed before the request.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::kv::wants_linearizable;
use crate::flags::{bulk_etag, evaluate, flag_keys, is_flag_key};
use crate::node::Node;
use crate::plugins::types::{ErrorCode, EvalContext, Evaluation, FlagValue, MetadataValue, Reason};

/// Query parameters of evaluation requests.
#[derive(Debug, Deserialize, Default)]
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

fn value_json(v: &FlagValue) -> Value {
    match v {
        FlagValue::Boolean(b) => json!(b),
        FlagValue::Text(s) => json!(s),
        FlagValue::Integer(i) => json!(i),
        FlagValue::Float(f) => json!(f),
        FlagValue::Object(text) => serde_json::from_str(text).unwrap_or_else(|_| json!(text)),
    }
}

fn success_json(key: &str, e: &Evaluation) -> Value {
    let metadata: Map<String, Value> = e
        .metadata
        .iter()
        .map(|(k, v)| {
            let v = match v {
                MetadataValue::Boolean(b) => json!(b),
                MetadataValue::Text(s) => json!(s),
                MetadataValue::Number(n) => json!(n),
            };
            (k.clone(), v)
        })
        .collect();
    let mut body = json!({
        "key": key,
        "value": value_json(&e.value),
        "reason": reason_str(e.reason),
        "metadata": metadata,
    });
    if let Some(variant) = &e.variant {
        body["variant"] = json!(variant);
    }
    body
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

fn server_error(status: StatusCode, details: String) -> Response {
    let mut resp = (status, Json(json!({ "errorDetails": details }))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
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

async fn barrier(
    node: &Node,
    params: Result<Query<EvalParams>, QueryRejection>,
) -> Result<(), Response> {
    let params = params.map(|Query(p)| p).unwrap_or_default();
    match wants_linearizable(params.consistency.as_deref()) {
        Ok(false) => Ok(()),
        Ok(true) => node
            .read_barrier()
            .await
            .map_err(|e| server_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        Err(msg) => Err(failure(
            StatusCode::BAD_REQUEST,
            None,
            ErrorCode::General,
            &msg,
        )),
    }
}

/// `POST /ofrep/v1/evaluate/flags/{key}`
pub async fn evaluate_one(
    State(node): State<Arc<Node>>,
    key: Result<Path<String>, PathRejection>,
    params: Result<Query<EvalParams>, QueryRejection>,
    body: Bytes,
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
    let (_, ctx) = match parse_context(&body) {
        Ok(c) => c,
        Err((code, msg)) => return failure(StatusCode::BAD_REQUEST, Some(&key), code, &msg),
    };
    if let Err(resp) = barrier(&node, params).await {
        return resp;
    }
    match evaluate(node.reader(), node.plugins().map(|p| &**p), &key, &ctx) {
        Ok(e) => Json(success_json(&key, &e)).into_response(),
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
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

/// `POST /ofrep/v1/evaluate/flags`
pub async fn evaluate_bulk(
    State(node): State<Arc<Node>>,
    params: Result<Query<EvalParams>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (context, ctx) = match parse_context(&body) {
        Ok(c) => c,
        Err((code, msg)) => return failure(StatusCode::BAD_REQUEST, None, code, &msg),
    };
    if let Err(resp) = barrier(&node, params).await {
        return resp;
    }
    let plugins = node.plugins().map(|p| &**p);
    let reader = node.reader();
    let etag = match bulk_etag(reader, plugins, &context) {
        Ok(t) => t,
        Err(e) => return server_error(StatusCode::INTERNAL_SERVER_ERROR, e.message),
    };
    let etag_header = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\""));
    if if_none_match(&headers, &etag) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag_header)]).into_response();
    }
    let keys = match flag_keys(reader) {
        Ok(k) => k,
        Err(e) => return server_error(StatusCode::INTERNAL_SERVER_ERROR, e.message),
    };
    let flags: Vec<Value> = keys
        .iter()
        .map(|k| match evaluate(reader, plugins, k, &ctx) {
            Ok(e) => success_json(k, &e),
            Err(e) => failure_json(Some(k), e.code, &e.message),
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

/// `GET /ofrep/v1/events`: one `refetchEvaluation` event per committed change
/// of a flag key (and one after any lost events), so OFREP clients re-fetch.
pub async fn events(
    State(node): State<Arc<Node>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = node.reader().subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            let revision = match rx.recv().await {
                Ok(c) if is_flag_key(&c.key) => Some(c.revision),
                Ok(_) => continue,
                // Events were lost: the safe answer is "re-fetch".
                Err(RecvError::Lagged(_)) => None,
                Err(RecvError::Closed) => return None,
            };
            let data = json!({ "type": "refetchEvaluation", "revision": revision });
            let event = Event::default()
                .event("refetchEvaluation")
                .data(data.to_string());
            return Some((Ok(event), rx));
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
