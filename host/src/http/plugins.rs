//! `GET /v1/plugins` (what is loaded, its health and counters) and
//! `POST /v1/flags/{key}/evaluate` (evaluate a flag through the evaluator
//! plugins, from this node's local state).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::error::ApiError;
use crate::node::Node;
use crate::plugins::types::{ErrorCode, EvalContext, Evaluation, FlagValue, MetadataValue, Reason};

/// `GET /v1/plugins`
pub async fn list(State(node): State<Arc<Node>>) -> Response {
    let plugins = node.plugins().map(|h| h.status()).unwrap_or_default();
    Json(json!({ "plugins": plugins })).into_response()
}

/// `GET /v1/plugins/logs`: the most recent lines plugins logged.
pub async fn logs(State(node): State<Arc<Node>>) -> Response {
    let lines = node.plugins().map(|h| h.recent_logs()).unwrap_or_default();
    Json(json!({ "logs": lines })).into_response()
}

/// Body of an evaluation request: `{"context":{"targetingKey":…, …}}`.
#[derive(Debug, Deserialize, Default)]
pub struct EvalRequest {
    #[serde(default)]
    context: Option<Value>,
}

/// Builds the plugin-side context from a JSON context object.
pub fn context_of(context: Option<Value>) -> Result<EvalContext, (ErrorCode, String)> {
    let context = context.unwrap_or(Value::Object(Map::new()));
    let Value::Object(map) = context else {
        return Err((
            ErrorCode::InvalidContext,
            "context must be a JSON object".into(),
        ));
    };
    let targeting_key = match map.get("targetingKey") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err((
                ErrorCode::InvalidContext,
                "targetingKey must be a string".into(),
            ));
        }
    };
    Ok(EvalContext {
        targeting_key,
        attributes: Value::Object(map).to_string(),
    })
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

/// A flag value as JSON (objects are JSON text in the WIT type).
pub fn value_json(v: &FlagValue) -> Value {
    match v {
        FlagValue::Boolean(b) => json!(b),
        FlagValue::Text(s) => json!(s),
        FlagValue::Integer(i) => json!(i),
        FlagValue::Float(f) => json!(f),
        FlagValue::Object(text) => serde_json::from_str(text).unwrap_or_else(|_| json!(text)),
    }
}

/// An evaluation as OFREP's success body.
pub fn evaluation_json(key: &str, e: &Evaluation) -> Value {
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

/// `POST /v1/flags/{key}/evaluate`
pub async fn evaluate(
    State(node): State<Arc<Node>>,
    key: Result<Path<String>, PathRejection>,
    body: Result<Json<EvalRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Path(key) = key.map_err(|e| ApiError::bad_request("invalid_key", e.body_text()))?;
    let host = node.plugins().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_plugins",
            "this node runs without --plugins-dir",
        )
    })?;
    let error = |status: StatusCode, code: ErrorCode, details: String| {
        (
            status,
            Json(json!({ "key": key, "errorCode": error_code_str(code), "errorDetails": details })),
        )
            .into_response()
    };
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                ErrorCode::ParseError,
                e.body_text(),
            ));
        }
    };
    let ctx = match context_of(req.context) {
        Ok(c) => c,
        Err((code, msg)) => return Ok(error(StatusCode::BAD_REQUEST, code, msg)),
    };
    let host = host.clone();
    let flag = key.clone();
    let result = tokio::task::spawn_blocking(move || host.evaluate(&flag, &ctx))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "evaluation_failed",
                e.to_string(),
            )
        })?;
    Ok(match result {
        Ok((_plugin, e)) => Json(evaluation_json(&key, &e)).into_response(),
        Err(e) => {
            let status = match e.code {
                ErrorCode::FlagNotFound => StatusCode::NOT_FOUND,
                ErrorCode::General => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            error(status, e.code, e.message)
        }
    })
}
