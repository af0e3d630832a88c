//! WebAssembly plugins (wasmtime, component model, world
//! `flagstone:plugin@0.1.0` in `wit/`).
//!
//! | file | owns |
//! |---|---|
//! | `bindings.rs` | the generated bindings (the only `bindgen!`) |
//! | `host_api.rs` | what a plugin may call: `store`, `log`, a closed WASI subset |
//! | `sync_io.rs` | `wasi:io` streams that never block, so calls are safe on async workers |
//! | `limits.rs` | deadlines, memory cap, the epoch ticker |
//! | `runtime.rs` | engine, compilation cache, instance pool, guarded calls |
//! | `registry.rs` | loading and hot reload, validators, reactors, evaluators, status |

pub mod bindings;
pub mod host_api;
pub mod limits;
pub mod registry;
pub mod runtime;
pub mod sync_io;

pub use bindings::types;
pub use limits::Limits;
pub use registry::{PluginHost, PluginStatus, Rejection, Validators};
pub use runtime::{CallError, LoadError};
