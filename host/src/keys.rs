//! Key and value limits shared by the HTTP API and the library API.

/// Largest accepted value: exactly 1 MiB is allowed, one byte more is not.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Longest accepted key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is the empty string.
    #[error("key must not be empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_BYTES`].
    #[error("key is {0} bytes long; the limit is {MAX_KEY_BYTES}")]
    TooLong(usize),
    /// The key contains a control character.
    #[error("key contains control character U+{0:04X} at byte {1}")]
    ControlCharacter(u32, usize),
}

/// Checks a key: 1–1024 bytes of UTF-8, no control characters (`/` is allowed).
pub fn validate_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLong(key.len()));
    }
    if let Some((at, c)) = key.char_indices().find(|(_, c)| c.is_control()) {
        return Err(KeyError::ControlCharacter(c as u32, at));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(validate_key("feature_flags").is_ok());
        assert!(validate_key("flags/new_ui").is_ok());
        assert!(validate_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        assert_eq!(validate_key(""), Err(KeyError::Empty));
        assert_eq!(
            validate_key(&"k".repeat(MAX_KEY_BYTES + 1)),
            Err(KeyError::TooLong(MAX_KEY_BYTES + 1))
        );
        assert_eq!(validate_key("a\nb"), Err(KeyError::ControlCharacter(10, 1)));
        assert!(validate_key("a\u{7f}").is_err());
        assert!(validate_key("a\u{85}").is_err());
    }
}
