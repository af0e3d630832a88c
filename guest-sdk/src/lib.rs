//! Write [flagstone](https://example.invalid/flagstone) plugins in Rust.
//!
//! A flagstone plugin is a WebAssembly component (built for `wasm32-wasip2`) that the
//! store calls to **validate writes** before they are proposed, to **react to committed
//! changes**, and to **evaluate feature flags**. This crate is all a plugin author needs:
//! implement [`Plugin`] for a type, override the hooks you use, and export it with
//! [`export_plugin!`]. The WIT bindings (`wit/` in the flagstone repository, package
//! `flagstone:plugin@0.1.0`) are generated and hidden inside this crate.
//!
//! # A complete validator
//!
//! ```no_run
//! use flagstone_sdk::{Hook, Plugin, PluginInfo, Write};
//!
//! struct MaxSize;
//!
//! impl Plugin for MaxSize {
//!     fn info() -> PluginInfo {
//!         PluginInfo::new("max-size", "0.1.0").prefixes(["config/"]).hooks([Hook::ValidateWrite])
//!     }
//!
//!     fn validate_write(write: Write) -> Result<(), String> {
//!         match write.value {
//!             Some(v) if v.len() > 4096 => Err(format!("{}: {} bytes, max 4096", write.key, v.len())),
//!             _ => Ok(()),
//!         }
//!     }
//! }
//!
//! flagstone_sdk::export_plugin!(MaxSize);
//! ```
//!
//! `Cargo.toml` of the plugin:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! flagstone-sdk = "0.1"
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release`; the resulting
//! `target/wasm32-wasip2/release/<name>.wasm` is a component ready for `--plugins-dir`.
//!
//! # What a plugin can do
//!
//! * read the local node's copy of the store: [`store::get`], [`store::get_json`],
//!   [`store::revision`], [`store::list`];
//! * log through the host: [`info!`], [`warn!`], … or the functions in [`log`].
//!
//! Nothing else: the host grants no filesystem, network, environment or clock access.
//!
//! # Testing plugins natively
//!
//! The crate also compiles for the host target so that plugin logic can be unit-tested
//! with plain `cargo test`. There, [`store`] reads from a per-thread in-memory store that
//! tests fill with the functions in [`testing`], and log messages are captured
//! ([`testing::take_logs`]).
//!
//! # Features
//!
//! * `flags`: the `flagstone_sdk::flags` module, the rich flag definition model
//!   (`flags/<name>` values) shared by the `flag-schema` validator and the `rollout`
//!   evaluator.
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

extern crate self as flagstone_sdk;

#[doc(hidden)]
pub use wit_bindgen::rt as __rt;

/// The generated bindings of world `flagstone:plugin/plugin`. Not a stable API.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "flagstone:plugin/plugin",
        runtime_path: "flagstone_sdk::__rt",
        pub_export_macro: true,
        export_macro_name: "__export_flagstone",
        default_bindings_module: "flagstone_sdk::bindings",
        additional_derives: [PartialEq],
    });
}

#[cfg(feature = "flags")]
pub mod flags;
pub mod log;
pub mod store;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
mod types;

use bindings::exports::flagstone::plugin as exports;

/// A value as stored, with its content type and revision.
///
/// ```no_run
/// if let Some(entry) = flagstone_sdk::store::get("config/limits") {
///     println!("{} bytes at revision {}", entry.value.len(), entry.revision);
/// }
/// ```
pub use bindings::flagstone::plugin::types::Entry;

/// A hook in [`PluginInfo::hooks`].
///
/// ```no_run
/// use flagstone_sdk::{Hook, PluginInfo};
/// let info = PluginInfo::new("audit", "1.0.0").hooks([Hook::OnChange]);
/// ```
pub use bindings::flagstone::plugin::types::Hook;

/// What [`Plugin::info`] returns: name, version, key prefixes and implemented hooks.
///
/// ```no_run
/// use flagstone_sdk::{Hook, PluginInfo};
/// let info = PluginInfo::new("flag-schema", env!("CARGO_PKG_VERSION"))
///     .prefixes(["feature_flags", "flags/"])
///     .hooks([Hook::ValidateWrite]);
/// ```
pub use bindings::flagstone::plugin::types::PluginInfo;

/// A proposed write or delete, passed to [`Plugin::validate_write`].
///
/// ```no_run
/// fn check(write: flagstone_sdk::Write) -> Result<(), String> {
///     if write.is_delete() {
///         return Err(format!("{} cannot be deleted", write.key));
///     }
///     Ok(())
/// }
/// ```
pub use bindings::flagstone::plugin::types::Write;

/// A committed change, passed to [`Plugin::on_change`].
///
/// ```no_run
/// fn react(change: flagstone_sdk::Change) {
///     flagstone_sdk::info!("{} changed at revision {}", change.key, change.revision);
/// }
/// ```
pub use bindings::flagstone::plugin::types::Change;

/// A resolved flag value.
///
/// ```no_run
/// use flagstone_sdk::FlagValue;
/// let on: FlagValue = true.into();
/// let color = FlagValue::from("blue");
/// assert_eq!(on, FlagValue::Boolean(true));
/// ```
pub use bindings::flagstone::plugin::types::FlagValue;

/// Why a flag resolved to its value.
///
/// ```no_run
/// use flagstone_sdk::{Evaluation, Reason};
/// let e = Evaluation::new(true, Reason::Static);
/// ```
pub use bindings::flagstone::plugin::types::Reason;

/// A flag-metadata value.
///
/// ```no_run
/// use flagstone_sdk::{Evaluation, MetadataValue, Reason};
/// let e = Evaluation::new(1_i64, Reason::Static).with_metadata("owner", MetadataValue::from("team-a"));
/// ```
pub use bindings::flagstone::plugin::types::MetadataValue;

/// A successful flag evaluation, returned by [`Plugin::evaluate`].
///
/// ```no_run
/// use flagstone_sdk::{Evaluation, Reason};
/// let e = Evaluation::new("dark", Reason::TargetingMatch).with_variant("dark-theme");
/// ```
pub use bindings::flagstone::plugin::types::Evaluation;

/// The error code of an [`EvalError`].
///
/// ```no_run
/// use flagstone_sdk::{ErrorCode, EvalError};
/// let err = EvalError::new(ErrorCode::General, "backend unavailable");
/// ```
pub use bindings::flagstone::plugin::types::ErrorCode;

/// A failed flag evaluation, returned by [`Plugin::evaluate`].
///
/// ```no_run
/// use flagstone_sdk::EvalError;
/// let err = EvalError::flag_not_found("new_ui");
/// assert_eq!(err.code.as_str(), "FLAG_NOT_FOUND");
/// assert_eq!(err.message, "flag new_ui not found");
/// ```
pub use bindings::flagstone::plugin::types::EvaluationError as EvalError;

/// The evaluation context of a flag request: targeting key and attributes (JSON text).
///
/// ```no_run
/// fn country(context: &flagstone_sdk::EvalContext) -> Option<String> {
///     let attributes = context.attribute_map().ok()?;
///     attributes.get("country")?.as_str().map(str::to_owned)
/// }
/// ```
pub use bindings::flagstone::plugin::types::EvalContext;

/// A flagstone plugin. Implement it for a unit struct and export it with [`export_plugin!`].
///
/// Only [`info`](Plugin::info) is required; the hooks have harmless defaults (accept every
/// write, ignore changes, know no flags). List the hooks you implement in
/// [`PluginInfo::hooks`]: the host calls only those, and only for keys under
/// [`PluginInfo::key_prefixes`].
///
/// Hooks must be deterministic and quick: the host enforces a deadline and a memory cap per
/// call, and a trap or timeout in [`validate_write`](Plugin::validate_write) rejects the write.
///
/// ```no_run
/// use flagstone_sdk::{EvalContext, EvalError, Evaluation, Hook, Plugin, PluginInfo, Reason};
///
/// struct AlwaysOn;
///
/// impl Plugin for AlwaysOn {
///     fn info() -> PluginInfo {
///         PluginInfo::new("always-on", "0.1.0").hooks([Hook::Evaluate])
///     }
///
///     fn evaluate(_flag_key: String, _context: EvalContext) -> Result<Evaluation, EvalError> {
///         Ok(Evaluation::new(true, Reason::Static))
///     }
/// }
///
/// flagstone_sdk::export_plugin!(AlwaysOn);
/// ```
pub trait Plugin: 'static {
    /// Describes the plugin; called once when the host loads it.
    ///
    /// ```no_run
    /// # use flagstone_sdk::{Hook, Plugin, PluginInfo};
    /// # struct Audit;
    /// impl Plugin for Audit {
    ///     fn info() -> PluginInfo {
    ///         PluginInfo::new("audit", "1.0.0").prefixes(["flags/"]).hooks([Hook::OnChange])
    ///     }
    /// }
    /// ```
    fn info() -> PluginInfo;

    /// Accepts (`Ok`) or rejects (`Err(reason)`) a proposed write or delete. Default: accept.
    ///
    /// ```no_run
    /// # use flagstone_sdk::{Hook, Plugin, PluginInfo, Write};
    /// # struct JsonOnly;
    /// impl Plugin for JsonOnly {
    ///     # fn info() -> PluginInfo { PluginInfo::new("json-only", "1") }
    ///     fn validate_write(write: Write) -> Result<(), String> {
    ///         match write.json::<serde_json::Value>() {
    ///             Some(Err(e)) => Err(format!("{}: invalid JSON: {e}", write.key)),
    ///             _ => Ok(()),
    ///         }
    ///     }
    /// }
    /// ```
    fn validate_write(write: Write) -> Result<(), String> {
        let _ = write;
        Ok(())
    }

    /// Observes a committed change (on every node, in commit order). Default: nothing.
    ///
    /// ```no_run
    /// # use flagstone_sdk::{Change, Plugin, PluginInfo};
    /// # struct Audit;
    /// impl Plugin for Audit {
    ///     # fn info() -> PluginInfo { PluginInfo::new("audit", "1") }
    ///     fn on_change(change: Change) {
    ///         flagstone_sdk::info!("{}: revision {}", change.key, change.revision);
    ///     }
    /// }
    /// ```
    fn on_change(change: Change) {
        let _ = change;
    }

    /// Evaluates flag `flag_key` for `context`. Default: [`ErrorCode::FlagNotFound`].
    ///
    /// ```no_run
    /// # use flagstone_sdk::{EvalContext, EvalError, Evaluation, Plugin, PluginInfo, Reason};
    /// # struct Beta;
    /// impl Plugin for Beta {
    ///     # fn info() -> PluginInfo { PluginInfo::new("beta", "1") }
    ///     fn evaluate(flag_key: String, context: EvalContext) -> Result<Evaluation, EvalError> {
    ///         if flag_key != "beta" {
    ///             return Err(EvalError::flag_not_found(&flag_key));
    ///         }
    ///         let user = context.targeting_key.ok_or_else(EvalError::targeting_key_missing)?;
    ///         Ok(Evaluation::new(user.ends_with("@acme.com"), Reason::TargetingMatch))
    ///     }
    /// }
    /// ```
    fn evaluate(flag_key: String, context: EvalContext) -> Result<Evaluation, EvalError> {
        let _ = context;
        Err(EvalError::flag_not_found(&flag_key))
    }
}

impl<T: Plugin> exports::manifest::Guest for T {
    fn describe() -> PluginInfo {
        T::info()
    }
}

impl<T: Plugin> exports::validator::Guest for T {
    fn validate_write(write: Write) -> Result<(), String> {
        <T as Plugin>::validate_write(write)
    }
}

impl<T: Plugin> exports::reactor::Guest for T {
    fn on_change(change: Change) {
        <T as Plugin>::on_change(change)
    }
}

impl<T: Plugin> exports::evaluator::Guest for T {
    fn evaluate(flag_key: String, context: EvalContext) -> Result<Evaluation, EvalError> {
        <T as Plugin>::evaluate(flag_key, context)
    }
}

/// Exports a [`Plugin`] implementation as the component's hooks. Use it once per plugin
/// crate, at the crate root, with the name of a type in scope (not a path).
///
/// ```no_run
/// use flagstone_sdk::{Plugin, PluginInfo};
///
/// struct Noop;
///
/// impl Plugin for Noop {
///     fn info() -> PluginInfo {
///         PluginInfo::new("noop", "0.1.0")
///     }
/// }
///
/// flagstone_sdk::export_plugin!(Noop);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($ty:ident) => {
        const _: fn() = || {
            fn assert_plugin<T: $crate::Plugin>() {}
            assert_plugin::<$ty>();
        };
        $crate::bindings::__export_flagstone!($ty with_types_in $crate::bindings);
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Defaults;

    impl Plugin for Defaults {
        fn info() -> PluginInfo {
            PluginInfo::new("defaults", "1.0.0")
                .prefixes(["a/", "b"])
                .hooks([Hook::OnChange])
        }
    }

    #[test]
    fn default_hooks_through_the_generated_traits() {
        use exports::{evaluator, manifest, reactor, validator};
        let info = <Defaults as manifest::Guest>::describe();
        assert_eq!(info.key_prefixes, vec!["a/", "b"]);
        assert_eq!(info.hooks, vec![Hook::OnChange]);
        let write = Write {
            key: "a/x".into(),
            value: Some(b"1".to_vec()),
            content_type: None,
            current: None,
        };
        assert_eq!(
            <Defaults as validator::Guest>::validate_write(write),
            Ok(())
        );
        <Defaults as reactor::Guest>::on_change(Change {
            key: "a/x".into(),
            old_value: None,
            new_value: None,
            revision: 1,
        });
        let err =
            <Defaults as evaluator::Guest>::evaluate("f".into(), EvalContext::new(None, json!({})))
                .unwrap_err();
        assert_eq!(err.code, ErrorCode::FlagNotFound);
    }

    #[test]
    fn test_store_and_logs() {
        testing::put("b/2", "two");
        let rev = testing::put_with_content_type("a/1", r#"{"n": 1}"#, "application/json");
        testing::put("b/1", "one");
        assert_eq!(store::list("b/"), vec!["b/1", "b/2"]);
        assert_eq!(store::list(""), vec!["a/1", "b/1", "b/2"]);
        assert_eq!(store::revision("a/1"), Some(rev));
        let entry = store::get("a/1").unwrap();
        assert_eq!(entry.content_type.as_deref(), Some("application/json"));
        let v: serde_json::Value = store::get_json("a/1").unwrap().unwrap();
        assert_eq!(v, json!({"n": 1}));
        assert!(
            store::get_json::<serde_json::Value>("b/1")
                .unwrap()
                .is_err()
        );
        assert!(store::get("missing").is_none());
        assert!(testing::delete("a/1"));
        assert_eq!(store::revision("a/1"), None);

        info!("x = {}", 1);
        log::error("boom");
        assert_eq!(
            testing::take_logs(),
            vec![
                (log::Level::Info, "x = 1".to_owned()),
                (log::Level::Error, "boom".to_owned())
            ]
        );
        testing::reset();
        assert!(store::list("").is_empty());
    }

    #[test]
    fn context_attributes() {
        let ctx = |a: &str| EvalContext {
            targeting_key: None,
            attributes: a.into(),
        };
        assert!(ctx("").attribute_map().unwrap().is_empty());
        assert_eq!(ctx(r#"{"a": 1}"#).attribute_map().unwrap()["a"], json!(1));
        let err = ctx("[1]").attribute_map().unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidContext);
        assert_eq!(
            err.message,
            "context attributes must be a JSON object, got array"
        );
        assert_eq!(
            ctx("{").attribute_map().unwrap_err().code,
            ErrorCode::InvalidContext
        );
        assert_eq!(
            ctx("null").attributes_json().unwrap(),
            serde_json::Value::Null
        );
    }

    #[test]
    fn evaluation_builders() {
        let e = Evaluation::new("blue", Reason::TargetingMatch)
            .with_variant("b")
            .with_metadata("n", 2.0);
        assert_eq!(e.value, FlagValue::Text("blue".into()));
        assert_eq!(e.variant.as_deref(), Some("b"));
        assert_eq!(
            e.metadata,
            vec![("n".to_owned(), MetadataValue::Number(2.0))]
        );
        assert_eq!(Reason::TargetingMatch.as_str(), "TARGETING_MATCH");
        assert_eq!(
            FlagValue::object(&json!([1])),
            FlagValue::Object("[1]".into())
        );
        assert_eq!(
            EvalError::targeting_key_missing().code.as_str(),
            "TARGETING_KEY_MISSING"
        );
    }
}
