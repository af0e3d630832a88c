//! The only place bindings for the `flagstone:plugin` world are generated
//! (from `wit/`). Everything else uses the types re-exported here.

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
    additional_derives: [PartialEq],
});

pub use self::exports::flagstone::plugin::{evaluator, manifest, reactor, validator};
pub use self::flagstone::plugin::{log, store, types};
