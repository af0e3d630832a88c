//! A per-thread in-memory store and log capture for native unit tests (non-wasm targets
//! only).
//!
//! On the host target, [`store`](crate::store) reads what these functions put and the
//! [`log`](crate::log) functions append to a buffer that [`take_logs`] drains. Every test
//! thread starts empty.
//!
//! ```no_run
//! use flagstone_sdk::{store, testing};
//!
//! let rev = testing::put("feature_flags", r#"{"new_ui": true}"#);
//! assert_eq!(store::revision("feature_flags"), Some(rev));
//! flagstone_sdk::info!("hello");
//! assert_eq!(testing::take_logs().len(), 1);
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::Entry;
use crate::log::Level;

#[derive(Default)]
pub(crate) struct State {
    pub(crate) entries: BTreeMap<String, Entry>,
    pub(crate) logs: Vec<(Level, String)>,
    pub(crate) revision: u64,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

pub(crate) fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    STATE.with(|s| f(&mut s.borrow_mut()))
}

/// Stores `value` under `key` (no content type) and returns its new revision.
///
/// Revisions increase by one per [`put`], [`put_with_content_type`] or successful
/// [`delete`], like the real store's.
///
/// ```no_run
/// let rev = flagstone_sdk::testing::put("flags/new_ui", br#"{"state":"ENABLED"}"#.to_vec());
/// ```
pub fn put(key: &str, value: impl Into<Vec<u8>>) -> u64 {
    put_entry(key, value.into(), None)
}

/// Stores `value` under `key` with a content type and returns its new revision.
///
/// ```no_run
/// flagstone_sdk::testing::put_with_content_type("config/a", "{}", "application/json");
/// ```
pub fn put_with_content_type(key: &str, value: impl Into<Vec<u8>>, content_type: &str) -> u64 {
    put_entry(key, value.into(), Some(content_type.to_owned()))
}

fn put_entry(key: &str, value: Vec<u8>, content_type: Option<String>) -> u64 {
    with_state(|s| {
        s.revision += 1;
        let entry = Entry {
            value,
            content_type,
            revision: s.revision,
        };
        s.entries.insert(key.to_owned(), entry);
        s.revision
    })
}

/// Deletes `key`; returns whether it existed.
///
/// ```no_run
/// assert!(!flagstone_sdk::testing::delete("missing"));
/// ```
pub fn delete(key: &str) -> bool {
    with_state(|s| {
        let existed = s.entries.remove(key).is_some();
        if existed {
            s.revision += 1;
        }
        existed
    })
}

/// Empties this thread's test store and log buffer.
///
/// ```no_run
/// flagstone_sdk::testing::reset();
/// ```
pub fn reset() {
    with_state(|s| *s = State::default());
}

/// Returns and clears the messages logged on this thread.
///
/// ```no_run
/// use flagstone_sdk::log::Level;
/// flagstone_sdk::warn!("careful");
/// assert_eq!(flagstone_sdk::testing::take_logs(), vec![(Level::Warn, "careful".to_owned())]);
/// ```
pub fn take_logs() -> Vec<(Level, String)> {
    with_state(|s| std::mem::take(&mut s.logs))
}
