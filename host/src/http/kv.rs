//! `/v1/kv`: put, get, delete and list custom data.
//!
//! Values are raw bytes; their Content-Type is stored and returned. Revisions
//! travel as `ETag: "<revision>"`; `If-Match` makes a write compare-and-set,
//! `If-None-Match: *` makes a put create-only. Reads are local unless
//! `?consistency=linearizable`.

use std::sync::Arc;

use axum::Json;
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use crate::keys::{MAX_VALUE_BYTES, validate_key};
use crate::node::{Node, PutOptions};
use crate::raft::{Precondition, ValueRecord};

/// Query parameters of reads.
#[derive(Debug, Deserialize, Default)]
pub struct ReadParams {
    consistency: Option<String>,
    #[serde(default)]
    prefix: String,
}

impl ReadParams {
    fn linearizable(&self) -> Result<bool, ApiError> {
        wants_linearizable(self.consistency.as_deref())
            .map_err(|msg| ApiError::bad_request("invalid_consistency", msg))
    }
}

/// Reads `?consistency=`: `linearizable` (true), `serializable` / `local` /
/// absent (false), anything else is an error message for the caller to wrap.
pub fn wants_linearizable(consistency: Option<&str>) -> Result<bool, String> {
    match consistency {
        None | Some("local") | Some("serializable") => Ok(false),
        Some("linearizable") => Ok(true),
        Some(other) => Err(format!(
            "consistency must be linearizable, serializable or local, not {other:?}"
        )),
    }
}

fn params(q: Result<Query<ReadParams>, QueryRejection>) -> Result<ReadParams, ApiError> {
    q.map(|Query(p)| p)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

fn key_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(key) = path.map_err(|e| ApiError::bad_request("invalid_key", e.body_text()))?;
    validate_key(&key).map_err(|e| ApiError::bad_request("invalid_key", e.to_string()))?;
    Ok(key)
}

fn etag(revision: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{revision}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// Parses `If-Match` / `If-None-Match` into a precondition.
fn precondition(headers: &HeaderMap, allow_create_only: bool) -> Result<Precondition, ApiError> {
    let text = |name: header::HeaderName| -> Result<Option<String>, ApiError> {
        headers
            .get(&name)
            .map(|v| {
                v.to_str().map(|s| s.trim().to_owned()).map_err(|_| {
                    ApiError::bad_request("invalid_precondition", format!("{name} is not ASCII"))
                })
            })
            .transpose()
    };
    match (text(header::IF_MATCH)?, text(header::IF_NONE_MATCH)?) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "invalid_precondition",
            "use either If-Match or If-None-Match, not both",
        )),
        (Some(m), None) if m == "*" => Ok(Precondition::Present),
        // If-Match compares strongly (RFC 9110 §13.1.1): a weak tag never
        // matches, whatever the key holds (this server only sends strong ones).
        (Some(m), None) if m.starts_with("W/") => Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            format!(
                "If-Match compares entity tags strongly: the weak tag {m} never matches; send the ETag as returned"
            ),
        )),
        (Some(m), None) => {
            let bare = m.trim_matches('"');
            bare.parse::<u64>()
                .map(Precondition::Revision)
                .map_err(|_| {
                    ApiError::bad_request(
                        "invalid_precondition",
                        format!("If-Match must be a revision such as \"42\", not {m:?}"),
                    )
                })
        }
        (None, Some(n)) if n == "*" && allow_create_only => Ok(Precondition::Absent),
        (None, Some(n)) => Err(ApiError::bad_request(
            "invalid_precondition",
            format!("only If-None-Match: * is supported on writes, not {n:?}"),
        )),
        (None, None) => Ok(Precondition::None),
    }
}

/// After deciding on 413, the rest of the body is read and thrown away (never
/// kept) for at most this long and this many bytes, so a client that is still
/// sending sees the answer instead of a broken pipe; then the answer goes out
/// regardless.
const DRAIN_FOR: Duration = Duration::from_millis(500);
const DRAIN_BYTES: usize = 8 * MAX_VALUE_BYTES;

async fn drain(mut stream: BodyDataStream) {
    let mut seen = 0usize;
    let _ = tokio::time::timeout(DRAIN_FOR, async {
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len();
            if seen > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

/// Most bytes reserved for a body before any of it has arrived.
const INITIAL_BODY_BUFFER: usize = 64 * 1024;

/// Reads the body, refusing (413) anything over the limit: a too-large
/// Content-Length is refused before any of the body is read, a chunked body
/// as soon as it crosses the limit. Nothing beyond the limit is kept.
async fn read_value(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let too_large = |n: String| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "value_too_large",
            format!("value is {n} bytes; the limit is {MAX_VALUE_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    if let Some(len) = declared
        && len > MAX_VALUE_BYTES as u64
    {
        drain(stream).await;
        return Err(too_large(len.to_string()));
    }
    // Room for what arrives, not for what was announced: a client that
    // declares 1 MiB and sends nothing must not pin 1 MiB per connection.
    let mut buf = Vec::with_capacity(declared.map_or(0, |l| l as usize).min(INITIAL_BODY_BUFFER));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
        if buf.len() + chunk.len() > MAX_VALUE_BYTES {
            drop(buf);
            drain(stream).await;
            return Err(too_large(format!("more than {MAX_VALUE_BYTES}")));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// `PUT /v1/kv/{key}`
pub async fn put(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = key_of(path)?;
    let precondition = precondition(&headers, true)?;
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::bad_request("invalid_content_type", "Content-Type is not ASCII")
                })?
                .to_owned(),
        ),
    };
    let value = read_value(&headers, body).await?;
    let revision = node
        .put(
            &key,
            value,
            PutOptions {
                content_type,
                precondition,
            },
        )
        .await?;
    let mut resp = Json(json!({ "key": key, "revision": revision })).into_response();
    resp.headers_mut().insert(header::ETAG, etag(revision));
    Ok(resp)
}

/// `GET /v1/kv/{key}`
pub async fn get(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let key = key_of(path)?;
    let params = params(query)?;
    let record = node
        .get(&key, params.linearizable()?)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "key_not_found",
                format!("no value for key {key:?}"),
            )
        })?;
    let content_type = record
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let revision = record.revision;
    // The body borrows the (possibly cached) record's bytes: no copy.
    let mut resp = Body::from(Bytes::from_owner(RecordValue(record))).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type);
    h.insert(header::ETAG, etag(revision));
    Ok(resp)
}

/// A record's value as a response body.
struct RecordValue(Arc<ValueRecord>);

impl AsRef<[u8]> for RecordValue {
    fn as_ref(&self) -> &[u8] {
        &self.0.value
    }
}

/// `DELETE /v1/kv/{key}`
pub async fn delete(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = key_of(path)?;
    let precondition = precondition(&headers, false)?;
    let (deleted, revision) = node.delete(&key, precondition).await?;
    Ok(Json(json!({ "deleted": deleted, "revision": revision })).into_response())
}

/// `GET /v1/kv?prefix=P`
pub async fn list(
    State(node): State<Arc<Node>>,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = params(query)?;
    let (keys, revision) = node.list(&params.prefix, params.linearizable()?).await?;
    Ok(Json(json!({ "keys": keys, "revision": revision })).into_response())
}

/// Any method on `/v1/kv/` (an empty key).
pub async fn empty_key() -> ApiError {
    ApiError::bad_request("invalid_key", "key must not be empty")
}
