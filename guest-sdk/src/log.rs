//! Logging through the host's log, tagged with the plugin's name.
//!
//! The macros [`trace!`](crate::trace), [`debug!`](crate::debug), [`info!`](crate::info),
//! [`warn!`](crate::warn) and [`error!`](crate::error) take `format!` arguments; the
//! functions here take a ready message. On non-wasm targets messages are captured for
//! [`testing::take_logs`](crate::testing::take_logs).
//!
//! ```no_run
//! flagstone_sdk::info!("flag {} enabled", "new_ui");
//! flagstone_sdk::log::warn("feature_flags is not an object");
//! ```

/// Severity of a log message.
///
/// ```no_run
/// flagstone_sdk::log::log(flagstone_sdk::log::Level::Warn, "disk almost full");
/// ```
pub use crate::bindings::flagstone::plugin::log::Level;

/// Logs `message` at `level`.
///
/// ```no_run
/// use flagstone_sdk::log::{log, Level};
/// log(Level::Info, "hello");
/// ```
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::flagstone::plugin::log::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::with_state(|s| s.logs.push((level, message.to_owned())));
}

/// Logs `message` at [`Level::Trace`].
///
/// ```no_run
/// flagstone_sdk::log::trace("entering validate_write");
/// ```
pub fn trace(message: &str) {
    log(Level::Trace, message)
}

/// Logs `message` at [`Level::Debug`].
///
/// ```no_run
/// flagstone_sdk::log::debug("cache miss");
/// ```
pub fn debug(message: &str) {
    log(Level::Debug, message)
}

/// Logs `message` at [`Level::Info`].
///
/// ```no_run
/// flagstone_sdk::log::info("flag new_ui changed");
/// ```
pub fn info(message: &str) {
    log(Level::Info, message)
}

/// Logs `message` at [`Level::Warn`].
///
/// ```no_run
/// flagstone_sdk::log::warn("feature_flags is not a JSON object");
/// ```
pub fn warn(message: &str) {
    log(Level::Warn, message)
}

/// Logs `message` at [`Level::Error`].
///
/// ```no_run
/// flagstone_sdk::log::error("unexpected state");
/// ```
pub fn error(message: &str) {
    log(Level::Error, message)
}

/// Logs a `format!` message at trace level.
///
/// ```no_run
/// flagstone_sdk::trace!("key {} at revision {}", "flags/x", 7);
/// ```
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Trace, &::std::format!($($arg)+))
    };
}

/// Logs a `format!` message at debug level.
///
/// ```no_run
/// flagstone_sdk::debug!("cache miss for {}", "flags/x");
/// ```
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Debug, &::std::format!($($arg)+))
    };
}

/// Logs a `format!` message at info level.
///
/// ```no_run
/// flagstone_sdk::info!("{}: false → true, revision {}", "new_ui", 42);
/// ```
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Info, &::std::format!($($arg)+))
    };
}

/// Logs a `format!` message at warn level.
///
/// ```no_run
/// flagstone_sdk::warn!("{} is not valid JSON", "feature_flags");
/// ```
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Warn, &::std::format!($($arg)+))
    };
}

/// Logs a `format!` message at error level.
///
/// ```no_run
/// flagstone_sdk::error!("giving up after {} attempts", 3);
/// ```
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Error, &::std::format!($($arg)+))
    };
}
