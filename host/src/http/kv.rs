//! `/v1/kv`: put, get, delete and list custom data.
//!
//! Values are raw bytes; their Content-Type is stored and returned. Revisions
//! travel as `ETag: "<revision>"`; `If-Match` (that ETag exactly, the bare revision, or `*`)
//! makes a write compare-and-set, `If-None-Match: *` makes a put create-only.
//! Any other form, or either header more than once, is a 400 on a write. On a
//! GET, `If-None-Match` is a cache validator (RFC 9110 §13.1.2: a list of
//! tags compared weakly, or `*`): naming the current revision answers 304
//! with no body. Reads are local unless `?consistency=linearizable`. A
//! listing may be read in pages (`?limit=N&after=K`).

use std::sync::Arc;

use axum::Json;
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::query::{QueryError, StrictQuery};
use crate::keys::{MAX_KEY_BYTES, MAX_VALUE_BYTES, validate_key};
use crate::node::{Node, PutOptions};
use crate::raft::{Precondition, ValueRecord};

/// Query parameters of reads.
#[derive(Debug, Deserialize, Default)]
pub struct ReadParams {
    consistency: Option<String>,
}

impl ReadParams {
    fn linearizable(&self) -> Result<bool, ApiError> {
        linearizable(self.consistency.as_deref())
    }
}

/// `?consistency=` of a key read or a listing, as an API error when bad.
fn linearizable(consistency: Option<&str>) -> Result<bool, ApiError> {
    wants_linearizable(consistency).map_err(|msg| ApiError::bad_request("invalid_consistency", msg))
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

fn params<P>(q: Result<StrictQuery<P>, QueryError>) -> Result<P, ApiError> {
    q.map(|StrictQuery(p)| p)
        .map_err(|e| ApiError::bad_request("invalid_query", e.0))
}

fn key_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(key) = path.map_err(|e| ApiError::bad_request("invalid_key", e.body_text()))?;
    validate_key(&key).map_err(|e| ApiError::bad_request("invalid_key", e.to_string()))?;
    Ok(key)
}

/// The value's Content-Type: none if absent or empty; 400 unless at most
/// 256 bytes of visible ASCII and spaces (it is stored with the value and
/// sent back with every read and watch event).
fn content_type_of(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    let invalid = |msg: String| ApiError::bad_request("invalid_content_type", msg);
    if values.next().is_some() {
        // One value is stored: which of several would be a guess.
        return Err(invalid("more than one Content-Type header".into()));
    }
    let text = v
        .to_str()
        .map_err(|_| invalid("Content-Type is not ASCII".into()))?
        .trim();
    if text.is_empty() {
        return Ok(None);
    }
    crate::keys::validate_content_type(text).map_err(|e| invalid(e.to_string()))?;
    Ok(Some(text.to_owned()))
}

fn etag(revision: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{revision}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// Which write a precondition guards: only a put can be create-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteKind {
    /// `PUT /v1/kv/{key}`
    Put,
    /// `DELETE /v1/kv/{key}`
    Delete,
}

/// Why `If-Match` / `If-None-Match` cannot be acted on. A weak `If-Match`
/// tag is well-formed but never matches (412); everything else is a 400
/// `invalid_precondition`, and nothing is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum PreconditionError {
    /// The header holds bytes outside visible ASCII.
    #[error("{0} is not ASCII")]
    NotAscii(&'static str),
    /// More than one value: a comma-separated list, or the header sent more
    /// than once (RFC 9110 §5.3: repeated lines are one comma-joined list).
    #[error("{0} takes a single value, not a list (comma-separated or a repeated header)")]
    List(&'static str),
    /// Both headers on one request.
    #[error("use either If-Match or If-None-Match, not both")]
    Both,
    /// `If-Match` is neither `*` nor an entity tag as this server issues them.
    #[error(
        "If-Match must be * or an ETag as returned, a revision in double quotes such as \"42\" (or bare: 42; decimal, no sign, no leading zeros, at most {max}), not {0:?}",
        max = u64::MAX
    )]
    MalformedIfMatch(String),
    /// `If-Match` compares strongly (RFC 9110 §13.1.1): a weak tag never
    /// matches, whatever the key holds (this server only sends strong ones).
    #[error(
        "If-Match compares entity tags strongly: the weak tag {0} never matches; send the ETag as returned"
    )]
    WeakIfMatch(String),
    /// `If-None-Match` on a put is only `*` (create only).
    #[error("If-None-Match on a PUT must be * (create only), not {0:?}")]
    NoneMatchNotStar(String),
    /// `If-None-Match: *` makes a put create-only; a delete of a key that must
    /// not exist would do nothing, so a delete takes no `If-None-Match`.
    #[error(
        "If-None-Match: * makes a PUT create-only; DELETE does not take If-None-Match (use If-Match to make it conditional)"
    )]
    NoneMatchOnDelete,
}

impl From<PreconditionError> for ApiError {
    fn from(e: PreconditionError) -> Self {
        match e {
            PreconditionError::WeakIfMatch(_) => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                e.to_string(),
            ),
            _ => ApiError::bad_request("invalid_precondition", e.to_string()),
        }
    }
}

/// One entity tag (RFC 9110 §8.8.3) in the only form this server issues:
/// the revision in canonical decimal within double quotes, maybe weak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntityTag {
    /// `"52"`
    Strong(u64),
    /// `W/"52"`
    Weak(u64),
}

/// Parses `"<revision>"` or `W/"<revision>"`; `None` for anything else
/// (unquoted, unbalanced quotes, lowercase `w/`, spaces inside, ...).
fn entity_tag(text: &str) -> Option<EntityTag> {
    let (weak, tag) = match text.strip_prefix("W/") {
        Some(tag) => (true, tag),
        None => (false, text),
    };
    let revision = canonical_number(tag.strip_prefix('"')?.strip_suffix('"')?)?;
    Some(if weak {
        EntityTag::Weak(revision)
    } else {
        EntityTag::Strong(revision)
    })
}

/// A number written as this server writes it (revisions, a listing's
/// limit): ASCII digits, no sign, no leading zero (but `0` itself), within a
/// u64. Entity tags compare as strings, so `"052"` must not stand for
/// revision 52.
fn canonical_number(digits: &str) -> Option<u64> {
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if !canonical {
        return None;
    }
    digits.parse().ok()
}

/// The one value of header `name`, trimmed; `None` if absent. Several values,
/// on one line or on several, are refused rather than all but one ignored.
fn single_value(
    headers: &HeaderMap,
    name: &'static str,
) -> Result<Option<String>, PreconditionError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(PreconditionError::List(name));
    }
    let text = value
        .to_str()
        .map_err(|_| PreconditionError::NotAscii(name))?
        .trim();
    if text.contains(',') {
        return Err(PreconditionError::List(name));
    }
    Ok(Some(text.to_owned()))
}

/// `If-Match`: `*` (the key must exist) or the key's exact strong ETag.
fn if_match(text: String) -> Result<Precondition, PreconditionError> {
    if text == "*" {
        return Ok(Precondition::Present);
    }
    // The bare revision (`If-Match: 52`) is documented and kept; it too
    // must be canonical.
    let tag = entity_tag(&text).or_else(|| canonical_number(&text).map(EntityTag::Strong));
    match tag {
        Some(EntityTag::Strong(revision)) => Ok(Precondition::Revision(revision)),
        Some(EntityTag::Weak(_)) => Err(PreconditionError::WeakIfMatch(text)),
        None => Err(PreconditionError::MalformedIfMatch(text)),
    }
}

/// `If-None-Match`: only `*` on a put (create only).
fn if_none_match(text: String, write: WriteKind) -> Result<Precondition, PreconditionError> {
    match write {
        WriteKind::Delete => Err(PreconditionError::NoneMatchOnDelete),
        WriteKind::Put if text == "*" => Ok(Precondition::Absent),
        WriteKind::Put => Err(PreconditionError::NoneMatchNotStar(text)),
    }
}

/// Parses `If-Match` / `If-None-Match` into a precondition.
fn precondition(headers: &HeaderMap, write: WriteKind) -> Result<Precondition, PreconditionError> {
    match (
        single_value(headers, "If-Match")?,
        single_value(headers, "If-None-Match")?,
    ) {
        (Some(_), Some(_)) => Err(PreconditionError::Both),
        (Some(m), None) => if_match(m),
        (None, Some(n)) => if_none_match(n, write),
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
    let precondition = precondition(&headers, WriteKind::Put)?;
    let content_type = content_type_of(&headers)?;
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

/// The members of a request's `If-None-Match` (every line, comma-separated,
/// trimmed), for a GET's or an OFREP bulk evaluation's cache validation.
pub(super) fn none_match_members(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Whether a GET's `If-None-Match` names the current revision (RFC 9110
/// §13.1.2: a list of entity tags compared weakly, or `*` for any current
/// value), so the answer is 304 with no body. A member that is not a tag
/// this server issues (another server's tag, garbage) just does not match:
/// a cache validator is advice, and a GET answers in full rather than fail.
fn not_modified(headers: &HeaderMap, revision: u64) -> bool {
    none_match_members(headers).any(|member| {
        member == "*"
            || matches!(
                entity_tag(member),
                Some(EntityTag::Strong(r) | EntityTag::Weak(r)) if r == revision
            )
    })
}

/// `GET /v1/kv/{key}`: the value, or 304 when `If-None-Match` names its
/// revision.
pub async fn get(
    State(node): State<Arc<Node>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<StrictQuery<ReadParams>, QueryError>,
    headers: HeaderMap,
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
    if not_modified(&headers, revision) {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        resp.headers_mut().insert(header::ETAG, etag(revision));
        return Ok(resp);
    }
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
    let precondition = precondition(&headers, WriteKind::Delete)?;
    let (deleted, revision) = node.delete(&key, precondition).await?;
    Ok(Json(json!({ "deleted": deleted, "revision": revision })).into_response())
}

/// Most keys one listing page may ask for (`?limit=`).
pub const MAX_LIST_LIMIT: usize = 10_000;

/// Query parameters of a listing.
#[derive(Debug, Deserialize, Default)]
pub struct ListParams {
    consistency: Option<String>,
    #[serde(default)]
    prefix: String,
    /// Kept as text, so that a bad value gets its own message.
    limit: Option<String>,
    #[serde(default)]
    after: String,
}

impl ListParams {
    /// `?limit=`: 1 to [`MAX_LIST_LIMIT`], canonical decimal; absent: all keys.
    fn limit(&self) -> Result<usize, ApiError> {
        let Some(text) = self.limit.as_deref() else {
            return Ok(usize::MAX);
        };
        match canonical_number(text) {
            Some(n) if (1..=MAX_LIST_LIMIT as u64).contains(&n) => Ok(n as usize),
            _ => Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be a whole number from 1 to {MAX_LIST_LIMIT}, not {text:?}"),
            )),
        }
    }

    /// `?after=`: a key (the last one of the previous page); `""`: the start.
    fn after(&self) -> Result<&str, ApiError> {
        if self.after.len() > MAX_KEY_BYTES {
            return Err(ApiError::bad_request(
                "invalid_after",
                format!(
                    "after is {} bytes long; keys are at most {MAX_KEY_BYTES}",
                    self.after.len()
                ),
            ));
        }
        Ok(&self.after)
    }
}

/// `GET /v1/kv?prefix=P[&limit=N&after=K]`: the keys under `P`, sorted; with
/// `limit`, a page of them and whether more follow (ask for the next page
/// with `after` = the last key of this one).
pub async fn list(
    State(node): State<Arc<Node>>,
    query: Result<StrictQuery<ListParams>, QueryError>,
) -> Result<Response, ApiError> {
    let params = params(query)?;
    let consistent = linearizable(params.consistency.as_deref())?;
    let (limit, after) = (params.limit()?, params.after()?);
    let page = node
        .list_page(&params.prefix, after, limit, consistent)
        .await?;
    Ok(
        Json(json!({ "keys": page.keys, "more": page.more, "revision": page.revision }))
            .into_response(),
    )
}

/// Any method on `/v1/kv/` (an empty key).
pub async fn empty_key() -> ApiError {
    ApiError::bad_request("invalid_key", "key must not be empty")
}
