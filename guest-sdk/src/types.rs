//! Convenience constructors and accessors on the generated WIT types.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::{
    Change, Entry, ErrorCode, EvalContext, EvalError, Evaluation, FlagValue, Hook, MetadataValue,
    PluginInfo, Reason, Write,
};

impl PluginInfo {
    /// A description with no key prefixes and no hooks; add them with
    /// [`prefixes`](Self::prefixes) and [`hooks`](Self::hooks). The host refuses
    /// to load a plugin whose `name` is empty, longer than 64 bytes, or contains
    /// spaces or control characters.
    ///
    /// ```no_run
    /// let info = flagstone_sdk::PluginInfo::new("my-plugin", env!("CARGO_PKG_VERSION"));
    /// ```
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        PluginInfo {
            name: name.into(),
            version: version.into(),
            key_prefixes: Vec::new(),
            hooks: Vec::new(),
        }
    }

    /// Sets the key prefixes the plugin is called for (`""` matches every key).
    ///
    /// ```no_run
    /// let info = flagstone_sdk::PluginInfo::new("p", "1").prefixes(["flags/", "feature_flags"]);
    /// ```
    pub fn prefixes<I, S>(mut self, prefixes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.key_prefixes = prefixes.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the hooks the plugin implements.
    ///
    /// ```no_run
    /// use flagstone_sdk::{Hook, PluginInfo};
    /// let info = PluginInfo::new("p", "1").hooks([Hook::ValidateWrite, Hook::OnChange]);
    /// ```
    pub fn hooks(mut self, hooks: impl IntoIterator<Item = Hook>) -> Self {
        self.hooks = hooks.into_iter().collect();
        self
    }
}

impl Hook {
    /// The hook's WIT name, e.g. `validate-write`.
    ///
    /// ```no_run
    /// assert_eq!(flagstone_sdk::Hook::OnChange.as_str(), "on-change");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::ValidateWrite => "validate-write",
            Hook::OnChange => "on-change",
            Hook::Evaluate => "evaluate",
        }
    }
}

impl Entry {
    /// Parses the value as JSON.
    ///
    /// ```no_run
    /// let entry = flagstone_sdk::store::get("feature_flags").unwrap();
    /// let flags: std::collections::BTreeMap<String, bool> = entry.json().unwrap();
    /// ```
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.value)
    }

    /// The value as UTF-8 text, if it is valid UTF-8.
    ///
    /// ```no_run
    /// let entry = flagstone_sdk::store::get("motd").unwrap();
    /// println!("{}", entry.text().unwrap_or("<binary>"));
    /// ```
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }
}

impl Write {
    /// Whether this write deletes the key.
    ///
    /// ```no_run
    /// # fn f(write: flagstone_sdk::Write) {
    /// if write.is_delete() { /* allow deletes */ }
    /// # }
    /// ```
    pub fn is_delete(&self) -> bool {
        self.value.is_none()
    }

    /// Parses the new value as JSON; `None` for a delete.
    ///
    /// ```no_run
    /// # fn f(write: flagstone_sdk::Write) -> Result<(), String> {
    /// if let Some(Err(e)) = write.json::<serde_json::Value>() {
    ///     return Err(format!("invalid JSON: {e}"));
    /// }
    /// # Ok(()) }
    /// ```
    pub fn json<T: DeserializeOwned>(&self) -> Option<Result<T, serde_json::Error>> {
        self.value.as_deref().map(serde_json::from_slice)
    }
}

impl Change {
    /// Whether the change created the key.
    ///
    /// ```no_run
    /// # fn f(change: flagstone_sdk::Change) {
    /// if change.is_create() { flagstone_sdk::info!("{} created", change.key); }
    /// # }
    /// ```
    pub fn is_create(&self) -> bool {
        self.old_value.is_none() && self.new_value.is_some()
    }

    /// Whether the change deleted the key.
    ///
    /// ```no_run
    /// # fn f(change: flagstone_sdk::Change) {
    /// if change.is_delete() { flagstone_sdk::warn!("{} deleted", change.key); }
    /// # }
    /// ```
    pub fn is_delete(&self) -> bool {
        self.new_value.is_none()
    }
}

impl From<bool> for FlagValue {
    fn from(v: bool) -> Self {
        FlagValue::Boolean(v)
    }
}

impl From<&str> for FlagValue {
    fn from(v: &str) -> Self {
        FlagValue::Text(v.to_owned())
    }
}

impl From<String> for FlagValue {
    fn from(v: String) -> Self {
        FlagValue::Text(v)
    }
}

impl From<i64> for FlagValue {
    fn from(v: i64) -> Self {
        FlagValue::Integer(v)
    }
}

impl From<f64> for FlagValue {
    fn from(v: f64) -> Self {
        FlagValue::Float(v)
    }
}

impl FlagValue {
    /// An object value from JSON (stored as JSON text).
    ///
    /// ```no_run
    /// let v = flagstone_sdk::FlagValue::object(&serde_json::json!({"color": "blue"}));
    /// ```
    pub fn object(value: &Value) -> Self {
        FlagValue::Object(value.to_string())
    }

    /// The OpenFeature type name: `boolean`, `string`, `integer`, `float` or `object`.
    ///
    /// ```no_run
    /// assert_eq!(flagstone_sdk::FlagValue::from(1.5).type_name(), "float");
    /// ```
    pub fn type_name(&self) -> &'static str {
        match self {
            FlagValue::Boolean(_) => "boolean",
            FlagValue::Text(_) => "string",
            FlagValue::Integer(_) => "integer",
            FlagValue::Float(_) => "float",
            FlagValue::Object(_) => "object",
        }
    }
}

impl From<bool> for MetadataValue {
    fn from(v: bool) -> Self {
        MetadataValue::Boolean(v)
    }
}

impl From<&str> for MetadataValue {
    fn from(v: &str) -> Self {
        MetadataValue::Text(v.to_owned())
    }
}

impl From<String> for MetadataValue {
    fn from(v: String) -> Self {
        MetadataValue::Text(v)
    }
}

impl From<f64> for MetadataValue {
    fn from(v: f64) -> Self {
        MetadataValue::Number(v)
    }
}

impl Reason {
    /// The OpenFeature / OFREP spelling, e.g. `TARGETING_MATCH`.
    ///
    /// ```no_run
    /// assert_eq!(flagstone_sdk::Reason::Split.as_str(), "SPLIT");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Static => "STATIC",
            Reason::Default => "DEFAULT",
            Reason::TargetingMatch => "TARGETING_MATCH",
            Reason::Split => "SPLIT",
            Reason::Disabled => "DISABLED",
            Reason::Unknown => "UNKNOWN",
        }
    }
}

impl Evaluation {
    /// An evaluation with no variant name and no metadata.
    ///
    /// ```no_run
    /// use flagstone_sdk::{Evaluation, Reason};
    /// let e = Evaluation::new(42_i64, Reason::Default);
    /// ```
    pub fn new(value: impl Into<FlagValue>, reason: Reason) -> Self {
        Evaluation {
            value: value.into(),
            variant: None,
            reason,
            metadata: Vec::new(),
        }
    }

    /// Sets the variant name.
    ///
    /// ```no_run
    /// use flagstone_sdk::{Evaluation, Reason};
    /// let e = Evaluation::new(true, Reason::Split).with_variant("on");
    /// ```
    pub fn with_variant(mut self, variant: impl Into<String>) -> Self {
        self.variant = Some(variant.into());
        self
    }

    /// Adds a metadata entry.
    ///
    /// ```no_run
    /// use flagstone_sdk::{Evaluation, Reason};
    /// let e = Evaluation::new(true, Reason::Static).with_metadata("owner", "team-a");
    /// ```
    pub fn with_metadata(
        mut self,
        key: impl Into<String>,
        value: impl Into<MetadataValue>,
    ) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }
}

impl ErrorCode {
    /// The OpenFeature / OFREP spelling, e.g. `FLAG_NOT_FOUND`.
    ///
    /// ```no_run
    /// assert_eq!(flagstone_sdk::ErrorCode::ParseError.as_str(), "PARSE_ERROR");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
            ErrorCode::ParseError => "PARSE_ERROR",
            ErrorCode::TypeMismatch => "TYPE_MISMATCH",
            ErrorCode::TargetingKeyMissing => "TARGETING_KEY_MISSING",
            ErrorCode::InvalidContext => "INVALID_CONTEXT",
            ErrorCode::General => "GENERAL",
        }
    }
}

impl EvalError {
    /// An error with the given code and message.
    ///
    /// ```no_run
    /// use flagstone_sdk::{ErrorCode, EvalError};
    /// let e = EvalError::new(ErrorCode::TypeMismatch, "expected a boolean");
    /// ```
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        EvalError {
            code,
            message: message.into(),
        }
    }

    /// `FLAG_NOT_FOUND` for `flag_key`.
    ///
    /// ```no_run
    /// let e = flagstone_sdk::EvalError::flag_not_found("new_ui");
    /// ```
    pub fn flag_not_found(flag_key: &str) -> Self {
        Self::new(
            ErrorCode::FlagNotFound,
            format!("flag {flag_key} not found"),
        )
    }

    /// `PARSE_ERROR` with a message.
    ///
    /// ```no_run
    /// let e = flagstone_sdk::EvalError::parse_error("flags/new_ui: invalid JSON");
    /// ```
    pub fn parse_error(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ParseError, message)
    }

    /// `TYPE_MISMATCH` with a message.
    ///
    /// ```no_run
    /// let e = flagstone_sdk::EvalError::type_mismatch("expected a boolean, got a string");
    /// ```
    pub fn type_mismatch(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TypeMismatch, message)
    }

    /// `TARGETING_KEY_MISSING`.
    ///
    /// ```no_run
    /// let e = flagstone_sdk::EvalError::targeting_key_missing();
    /// ```
    pub fn targeting_key_missing() -> Self {
        Self::new(
            ErrorCode::TargetingKeyMissing,
            "this flag needs a targeting key",
        )
    }

    /// `INVALID_CONTEXT` with a message.
    ///
    /// ```no_run
    /// let e = flagstone_sdk::EvalError::invalid_context("attributes must be a JSON object");
    /// ```
    pub fn invalid_context(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidContext, message)
    }

    /// `GENERAL` with a message.
    ///
    /// ```no_run
    /// let e = flagstone_sdk::EvalError::general("something went wrong");
    /// ```
    pub fn general(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::General, message)
    }
}

impl EvalContext {
    /// A context from a targeting key and a JSON attributes value (for tests and tools).
    ///
    /// ```no_run
    /// let ctx = flagstone_sdk::EvalContext::new(Some("user-1"), serde_json::json!({"country": "NL"}));
    /// ```
    pub fn new(targeting_key: Option<&str>, attributes: Value) -> Self {
        EvalContext {
            targeting_key: targeting_key.map(str::to_owned),
            attributes: attributes.to_string(),
        }
    }

    /// Parses the attributes text as any JSON value (blank text counts as `{}`).
    ///
    /// ```no_run
    /// # fn f(ctx: flagstone_sdk::EvalContext) -> Result<(), serde_json::Error> {
    /// let attributes: serde_json::Value = ctx.attributes_json()?;
    /// # Ok(()) }
    /// ```
    pub fn attributes_json(&self) -> Result<Value, serde_json::Error> {
        if self.attributes.trim().is_empty() {
            return Ok(Value::Object(Map::new()));
        }
        serde_json::from_str(&self.attributes)
    }

    /// Parses the attributes as a JSON object; anything else is `INVALID_CONTEXT`.
    ///
    /// ```no_run
    /// # fn f(ctx: flagstone_sdk::EvalContext) -> Result<(), flagstone_sdk::EvalError> {
    /// let attributes = ctx.attribute_map()?;
    /// let plan = attributes.get("plan").and_then(|v| v.as_str());
    /// # Ok(()) }
    /// ```
    pub fn attribute_map(&self) -> Result<Map<String, Value>, EvalError> {
        match self.attributes_json() {
            Ok(Value::Object(map)) => Ok(map),
            Ok(other) => Err(EvalError::invalid_context(format!(
                "context attributes must be a JSON object, got {}",
                json_kind(&other)
            ))),
            Err(e) => Err(EvalError::invalid_context(format!(
                "context attributes are not valid JSON: {e}"
            ))),
        }
    }
}

/// `null`, `boolean`, `number`, `string`, `array` or `object`.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
