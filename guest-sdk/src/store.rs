//! Read-only access to the local node's copy of the store.
//!
//! Reads are local: on a follower they may lag the leader by a few milliseconds. Inside a
//! [`validate_write`](crate::Plugin::validate_write) call the proposed write is not yet
//! visible (it is in [`Write::value`](crate::Write)); [`Write::current`](crate::Write) is
//! the value it would replace.
//!
//! On non-wasm targets these functions read the per-thread test store filled with
//! [`testing`](crate::testing).
//!
//! ```no_run
//! use flagstone_sdk::store;
//!
//! let limits: Option<serde_json::Value> = store::get_json("config/limits").and_then(Result::ok);
//! let flag_keys = store::list("flags/");
//! ```

use serde::de::DeserializeOwned;

use crate::Entry;

/// The value stored under `key`, or `None` if the key does not exist.
///
/// ```no_run
/// if let Some(entry) = flagstone_sdk::store::get("config/limits") {
///     flagstone_sdk::info!("limits at revision {}", entry.revision);
/// }
/// ```
pub fn get(key: &str) -> Option<Entry> {
    imp::get(key)
}

/// The value stored under `key`, parsed as JSON: `None` if the key does not exist,
/// `Some(Err(_))` if it is not valid JSON of type `T`.
///
/// ```no_run
/// use std::collections::BTreeMap;
/// let flags: Option<Result<BTreeMap<String, bool>, _>> =
///     flagstone_sdk::store::get_json("feature_flags");
/// ```
pub fn get_json<T: DeserializeOwned>(key: &str) -> Option<Result<T, serde_json::Error>> {
    get(key).map(|entry| entry.json())
}

/// The revision of `key` without copying its value, or `None` if it does not exist.
///
/// Cheap: use it to cache parsed values and re-parse only when the revision changes.
///
/// ```no_run
/// let rev = flagstone_sdk::store::revision("flags/new_ui");
/// ```
pub fn revision(key: &str) -> Option<u64> {
    imp::revision(key)
}

/// The keys that start with `prefix`, sorted.
///
/// ```no_run
/// for key in flagstone_sdk::store::list("flags/") {
///     flagstone_sdk::debug!("flag definition {key}");
/// }
/// ```
pub fn list(prefix: &str) -> Vec<String> {
    imp::list(prefix)
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use crate::bindings::flagstone::plugin::store;
    pub use store::{get, list, revision};
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use crate::Entry;
    use crate::testing::with_state;

    pub fn get(key: &str) -> Option<Entry> {
        with_state(|s| s.entries.get(key).cloned())
    }

    pub fn revision(key: &str) -> Option<u64> {
        with_state(|s| s.entries.get(key).map(|e| e.revision))
    }

    pub fn list(prefix: &str) -> Vec<String> {
        with_state(|s| {
            s.entries
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, _)| k.clone())
                .collect()
        })
    }
}
