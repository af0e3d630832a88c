//! Key and value limits shared by the HTTP API and the library API.

/// Largest accepted value: exactly 1 MiB is allowed, one byte more is not.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Longest accepted key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest accepted `Content-Type` of a value, in bytes (it is stored with
/// the value and sent back with every read and watch event).
pub const MAX_CONTENT_TYPE_BYTES: usize = 256;

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

/// Why a value's `Content-Type` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentTypeError {
    /// Longer than [`MAX_CONTENT_TYPE_BYTES`].
    #[error("Content-Type is {0} bytes long; the limit is {MAX_CONTENT_TYPE_BYTES}")]
    TooLong(usize),
    /// A byte other than visible ASCII or a space (a header value could not
    /// carry it back).
    #[error("Content-Type may hold only visible ASCII and spaces (byte {0:#04x} at {1})")]
    Invalid(u8, usize),
}

/// Checks a value's content type: at most 256 bytes of visible ASCII and
/// spaces.
pub fn validate_content_type(ct: &str) -> Result<(), ContentTypeError> {
    if ct.len() > MAX_CONTENT_TYPE_BYTES {
        return Err(ContentTypeError::TooLong(ct.len()));
    }
    match ct
        .bytes()
        .enumerate()
        .find(|(_, b)| !matches!(b, b' '..=b'~'))
    {
        Some((at, b)) => Err(ContentTypeError::Invalid(b, at)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert!(validate_content_type("application/json; charset=utf-8").is_ok());
        assert!(validate_content_type(&"a".repeat(MAX_CONTENT_TYPE_BYTES)).is_ok());
        assert_eq!(
            validate_content_type(&"a".repeat(MAX_CONTENT_TYPE_BYTES + 1)),
            Err(ContentTypeError::TooLong(MAX_CONTENT_TYPE_BYTES + 1))
        );
        assert_eq!(
            validate_content_type("text/plain\r\nX: y"),
            Err(ContentTypeError::Invalid(b'\r', 10))
        );
        assert!(validate_content_type("t\u{e9}xt").is_err());
    }

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
