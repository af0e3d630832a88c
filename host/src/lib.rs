//! # flagstone
//!
//! A replicated store for application custom data — feature flags, shared
//! configuration, counters, blobs up to 1 MiB — kept in a Raft cluster
//! (openraft over fjall) and served over HTTP from every node.
//!
//! # Layout
//!
//! - [`raft`]: type configuration, log store, state machine, snapshot files,
//!   Raft RPC client.
//! - [`http`]: the axum router: key/value API, cluster API, Raft RPC server.
//! - [`node`]: wires storage, Raft and HTTP together; the library API
//!   ([`Node::set_custom_data`] and friends) and `run(listener, shutdown)`.
//! - [`batcher`], [`validate`]: group commit of concurrent writes, and the
//!   validator plugins that admit them, called back to back.
//! - [`keys`]: key and value limits; [`join_intent`]: the data dir's record
//!   of the cluster its node was started to join.
//! - [`flags`]: flag evaluation from local state (plugins + plain booleans);
//!   [`evaluations`]: single-flag evaluations that arrive together, run back
//!   to back.
//! - [`plugins`]: the WebAssembly plugin runtime.
//! - `main.rs`: the `flagstone` binary (argument parsing and logging only).

pub mod batcher;
pub mod coalesce;
pub mod error;
pub mod evaluations;
pub mod flags;
pub mod forward;
pub mod http;
pub mod join_intent;
pub mod keys;
pub mod node;
pub mod peer;
pub mod plugins;
pub mod raft;
pub mod read_index;
pub mod validate;

pub use node::{Node, NodeConfig, NodeError, WriteError, run};
