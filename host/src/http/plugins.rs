//! `GET /v1/plugins` (what is loaded, its health and counters) and
//! `GET /v1/plugins/logs` (what plugins logged recently).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::node::Node;

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
