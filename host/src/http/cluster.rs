//! `/v1/cluster` (membership view and changes) and the `/healthz`, `/readyz`
//! probes. Membership changes run on the leader; other nodes relay them.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use crate::error::ClusterError;
use crate::node::Node;
use crate::raft::NodeId;
use crate::raft::network::check_peer_addr;

/// `GET /v1/cluster`
pub async fn info(State(node): State<Arc<Node>>) -> Response {
    Json(node.cluster_info()).into_response()
}

/// Body of `POST /v1/cluster/members`.
#[derive(Debug, Deserialize)]
pub struct JoinRequest {
    id: NodeId,
    addr: String,
}

/// Sends the request on to the leader when this node is not it.
async fn relay(
    node: &Node,
    method: reqwest::Method,
    path: String,
    body: Option<serde_json::Value>,
) -> Result<Option<Response>, ApiError> {
    let Some((leader, addr)) = node.leader() else {
        return Err(ClusterError::NoLeader.into());
    };
    if leader == node.id() {
        return Ok(None);
    }
    let (status, bytes) = node
        .peers()
        .relay_json(method, format!("{addr}{path}"), body)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        })?;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(bytes),
    )
        .into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // As every 503 of this API (`error.rs`): the leader's own header is
        // not relayed, only its status and body.
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    Ok(Some(resp))
}

/// `POST /v1/cluster/members` `{"id":N,"addr":"http://host:port"}`
pub async fn add_member(
    State(node): State<Arc<Node>>,
    body: Result<Json<JoinRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    // 415 without a JSON content type, 400 for a body that is not the
    // expected JSON (axum's rejection carries the right status).
    let Json(req) = body.map_err(|e| ApiError::new(e.status(), "invalid_body", e.body_text()))?;
    let addr = req.addr.trim_end_matches('/').to_owned();
    if let Err(why) = check_peer_addr(&addr) {
        return Err(ClusterError::Invalid(format!(
            "addr must look like http://host:port, not {:?} ({why})",
            req.addr
        ))
        .into());
    }
    let body = json!({ "id": req.id, "addr": addr });
    if let Some(resp) = relay(
        &node,
        reqwest::Method::POST,
        "/v1/cluster/members".into(),
        Some(body),
    )
    .await?
    {
        return Ok(resp);
    }
    // On a task of its own: a caller that gives up (a joining node that
    // crashed, a client timeout) must not stop the leader between adding
    // the learner and promoting it once it caught up.
    let adding = tokio::spawn(async move { node.add_member(req.id, &addr).await });
    let info = adding
        .await
        .map_err(|e| ClusterError::Failed(e.to_string()))??;
    Ok(Json(info).into_response())
}

/// `DELETE /v1/cluster/members/{id}`
pub async fn remove_member(
    State(node): State<Arc<Node>>,
    id: Result<Path<NodeId>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad_request("invalid_member", e.body_text()))?;
    if let Some(resp) = relay(
        &node,
        reqwest::Method::DELETE,
        format!("/v1/cluster/members/{id}"),
        None,
    )
    .await?
    {
        return Ok(resp);
    }
    Ok(Json(node.remove_member(id).await?).into_response())
}

/// `GET /healthz`: the process is up and serving, and its Raft core runs
/// (503 `raft_stopped` once it stopped on a fatal error: only a restart
/// brings the node back).
pub async fn healthz(State(node): State<Arc<Node>>) -> Response {
    if let Some(why) = node.raft_failure() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "raft_stopped",
            format!("the Raft core stopped: {why}"),
        )
        .into_response();
    }
    Json(json!({ "status": "ok" })).into_response()
}

/// `GET /readyz`: a member of a cluster with a known leader, caught up.
pub async fn readyz(State(node): State<Arc<Node>>) -> Result<Response, ApiError> {
    if node.is_ready() {
        Ok(Json(json!({ "status": "ready" })).into_response())
    } else if node.removed() {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "removed",
            "every other voter refuses this node's votes as from a non-member: it was removed \
             from the cluster; stop it (to add it again, start it on an empty data dir with \
             --join)",
        ))
    } else {
        let info = node.cluster_info();
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!(
                "{}leader {:?}, member {}, applied {} of {} committed{}",
                node.raft_failure()
                    .map(|why| format!("the Raft core stopped ({why}); "))
                    .unwrap_or_default(),
                info.leader_id,
                info.members.iter().any(|m| m.id == info.node_id),
                info.applied_index,
                info.commit_index,
                if info.leader_id == Some(info.node_id) {
                    match node.millis_since_quorum_ack() {
                        Some(ms) => format!(", a quorum last answered {ms} ms ago"),
                        None => ", no quorum has answered".into(),
                    }
                } else {
                    String::new()
                }
            ),
        ))
    }
}
