//! The JSON error body every non-2xx answer carries:
//! `{"error":{"code":"…","message":"…"}}` (plus `plugin` for plugin rejections
//! and `revision` for failed preconditions), and the mapping of library errors
//! onto HTTP statuses.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::error::{ClusterError, ReadError, WriteError};

/// An HTTP error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Map<String, Value>,
}

impl ApiError {
    /// An error with a status, a stable machine-readable code and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }

    /// Adds a field to the error object.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// 400 with the given code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = Map::new();
        error.insert("code".into(), json!(self.code));
        error.insert("message".into(), json!(self.message));
        error.extend(self.extra);
        let mut resp = (self.status, Json(json!({ "error": error }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let msg = e.to_string();
        match e {
            WriteError::InvalidKey(_) => ApiError::bad_request("invalid_key", msg),
            WriteError::InvalidContentType(_) => ApiError::bad_request("invalid_content_type", msg),
            WriteError::ValueTooLarge(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "value_too_large", msg)
            }
            WriteError::PreconditionFailed { current } => {
                ApiError::new(StatusCode::PRECONDITION_FAILED, "precondition_failed", msg)
                    .with("revision", current)
            }
            WriteError::RejectedByPlugin { plugin, message } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "rejected_by_plugin",
                message,
            )
            .with("plugin", plugin),
            WriteError::NoLeader | WriteError::NotLeader { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", msg)
            }
            WriteError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg)
            }
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        let msg = e.to_string();
        match e {
            ReadError::InvalidKey(_) => ApiError::bad_request("invalid_key", msg),
            ReadError::NoLeader => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", msg),
            ReadError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg)
            }
            ReadError::Storage(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", msg)
            }
        }
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        let msg = e.to_string();
        match e {
            ClusterError::Invalid(_) => ApiError::bad_request("invalid_member", msg),
            ClusterError::Conflict { .. }
            | ClusterError::AddrInUse { .. }
            | ClusterError::WrongNode { .. } => {
                ApiError::new(StatusCode::CONFLICT, "member_conflict", msg)
            }
            ClusterError::Unconfirmed { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "member_unconfirmed", msg)
            }
            ClusterError::NotMember(_) => ApiError::new(StatusCode::NOT_FOUND, "not_member", msg),
            ClusterError::NoLeader => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", msg)
            }
            ClusterError::Failed(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "membership_change_failed",
                msg,
            ),
            ClusterError::NotCaughtUp { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "learner_not_caught_up",
                msg,
            ),
        }
    }
}

/// Fallback for unknown routes: 404 with the JSON body (in OFREP's shape on
/// OFREP's paths).
pub async fn not_found(uri: axum::http::Uri) -> Response {
    let msg = format!("no route for {}", uri.path());
    if super::flags::is_ofrep_path(uri.path()) {
        return super::flags::general_failure(StatusCode::NOT_FOUND, &msg);
    }
    ApiError::new(StatusCode::NOT_FOUND, "not_found", msg).into_response()
}

/// Fallback for a known route with the wrong method: 405 with the JSON body
/// (in OFREP's shape on OFREP's paths).
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let msg = format!("{method} is not allowed on {}", uri.path());
    if super::flags::is_ofrep_path(uri.path()) {
        return super::flags::general_failure(StatusCode::METHOD_NOT_ALLOWED, &msg);
    }
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", msg).into_response()
}
