//! The HTTP surface of a node: `fn router(node) -> Router`.
//!
//! | file | routes |
//! |---|---|
//! | `kv.rs` | `/v1/kv`, `/v1/kv/{key}` |
//! | `cluster.rs` | `/v1/cluster`, `/v1/cluster/members`, `/healthz`, `/readyz` |
//! | `plugins.rs` | `/v1/plugins`, `/v1/plugins/logs` |
//! | `flags.rs` | `/ofrep/v1/*` (OpenFeature remote evaluation), `/v1/flags/{key}/evaluate` |
//! | `watch.rs` | `/v1/watch` (Server-Sent Events) |
//! | `raft_rpc.rs` | `/raft/*` (node to node) |
//! | `error.rs` | the JSON error body; 404 and 405 fallbacks |
//! | `query.rs` | the query-string extractor every route above uses |
//!
//! `server.rs` serves the router (`serve(listener, app, shutdown)`), with
//! read timeouts against clients that send slowly.

pub mod cluster;
pub mod error;
pub mod flags;
pub mod kv;
pub mod plugins;
pub mod query;
pub mod raft_rpc;
pub mod server;
pub mod watch;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, delete, get, post};

use crate::node::Node;

/// All routes of a node, sharing `node` as state.
pub fn router(node: Arc<Node>) -> Router {
    let raft = Router::new()
        .route("/append", post(raft_rpc::append))
        .route("/vote", post(raft_rpc::vote))
        .route("/snapshot", post(raft_rpc::snapshot))
        .route("/forward", post(raft_rpc::forward))
        .route("/forward-batch", post(raft_rpc::forward_batch))
        .route("/read-index", post(raft_rpc::read_index))
        .layer(DefaultBodyLimit::max(node.rpc_body_limit()));
    Router::new()
        .route("/v1/kv", get(kv::list))
        .route("/v1/kv/", any(kv::empty_key))
        .route(
            "/v1/kv/{*key}",
            get(kv::get).put(kv::put).delete(kv::delete),
        )
        .route("/v1/cluster", get(cluster::info))
        .route("/v1/cluster/members", post(cluster::add_member))
        .route("/v1/cluster/members/{id}", delete(cluster::remove_member))
        .route("/v1/plugins", get(plugins::list))
        .route("/v1/plugins/logs", get(plugins::logs))
        .route("/v1/flags/{key}/evaluate", post(flags::evaluate_one))
        .route("/ofrep/v1/evaluate/flags/{key}", post(flags::evaluate_one))
        .route("/ofrep/v1/evaluate/flags/", post(flags::empty_key))
        .route("/v1/flags//evaluate", post(flags::empty_key))
        .route("/ofrep/v1/evaluate/flags", post(flags::evaluate_bulk))
        .route("/ofrep/v1/configuration", get(flags::configuration))
        .route("/ofrep/v1/events", get(flags::events))
        .route("/v1/watch", get(watch::watch))
        .route("/healthz", get(cluster::healthz))
        .route("/readyz", get(cluster::readyz))
        .nest("/raft", raft)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(node)
}

/// Helpers shared by the unit tests of the SSE streams (`watch.rs`, `flags.rs`).
#[cfg(test)]
pub(crate) mod test_support {
    use std::convert::Infallible;
    use std::sync::Arc;

    use axum::response::sse::Event;
    use futures::{Stream, StreamExt};

    use crate::raft::Change;

    /// A committed change of `key` at `revision` (values left out).
    pub fn change(revision: u64, key: &str) -> Arc<Change> {
        Arc::new(Change {
            revision,
            key: key.into(),
            old: None,
            new: None,
            replayed: false,
        })
    }

    /// Every event of `stream`, in its debug form (the SSE text is in it).
    pub async fn sse_texts(stream: impl Stream<Item = Result<Event, Infallible>>) -> Vec<String> {
        let events: Vec<_> = stream.collect().await;
        events
            .into_iter()
            .map(|e| format!("{:?}", e.unwrap()))
            .collect()
    }
}
