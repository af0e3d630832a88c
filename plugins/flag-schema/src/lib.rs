//! `flag-schema`: a flagstone validator for feature-flag keys.
//!
//! * `feature_flags` must be a JSON object mapping flag names to booleans (the seed's plain
//!   shape);
//! * `flags/<name>` must be a valid rich flag definition (see `flagstone_sdk::flags`).
//!
//! Deletes are always allowed. Rejections name the offending path, e.g.
//! `feature_flags.new_ui: expected boolean, got string "yes"`.

use flagstone_sdk::flags::{self, FlagDefinition, describe_value};
use flagstone_sdk::{Hook, Plugin, PluginInfo, Write};
use serde_json::Value;

/// The key holding the seed's plain flags object.
pub const FEATURE_FLAGS: &str = "feature_flags";

/// At most this many problems are listed in one rejection.
const MAX_PROBLEMS: usize = 5;

struct FlagSchema;

impl Plugin for FlagSchema {
    fn info() -> PluginInfo {
        PluginInfo::new("flag-schema", env!("CARGO_PKG_VERSION"))
            .prefixes([FEATURE_FLAGS, flags::PREFIX])
            .hooks([Hook::ValidateWrite])
    }

    fn validate_write(write: Write) -> Result<(), String> {
        match &write.value {
            None => Ok(()),
            Some(value) => validate(&write.key, value),
        }
    }
}

flagstone_sdk::export_plugin!(FlagSchema);

/// Validates the new `value` of `key`; keys this plugin does not own are accepted.
pub fn validate(key: &str, value: &[u8]) -> Result<(), String> {
    if key == FEATURE_FLAGS {
        validate_feature_flags(value)
    } else if let Some(name) = key.strip_prefix(flags::PREFIX) {
        if name.is_empty() {
            return Err(format!(
                "{key}: the flag name after {} is empty",
                flags::PREFIX
            ));
        }
        FlagDefinition::parse(value)
            .map(drop)
            .map_err(|e| format!("{key}: {e}"))
    } else {
        // Matches a prefix (`feature_flags…`) but is not a key this plugin knows.
        Ok(())
    }
}

/// `feature_flags` must be a JSON object of flag name → boolean.
pub fn validate_feature_flags(value: &[u8]) -> Result<(), String> {
    let doc: Value =
        serde_json::from_slice(value).map_err(|e| format!("{FEATURE_FLAGS}: invalid JSON: {e}"))?;
    let Value::Object(map) = doc else {
        return Err(format!(
            "{FEATURE_FLAGS}: expected a JSON object of flag name → boolean, got {}",
            describe_value(&doc)
        ));
    };
    // Sorted by name whatever serde_json's map ordering, so messages are deterministic.
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by_key(|(name, _)| *name);
    let problems: Vec<String> = entries
        .into_iter()
        .filter_map(|(name, v)| {
            if name.is_empty() {
                Some(format!("{FEATURE_FLAGS}: flag names must not be empty"))
            } else if v.is_boolean() {
                None
            } else {
                Some(format!(
                    "{FEATURE_FLAGS}.{name}: expected boolean, got {}",
                    describe_value(v)
                ))
            }
        })
        .collect();
    match problems.len() {
        0 => Ok(()),
        n if n <= MAX_PROBLEMS => Err(problems.join("; ")),
        n => Err(format!(
            "{} (and {} more)",
            problems[..MAX_PROBLEMS].join("; "),
            n - MAX_PROBLEMS
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flagstone_sdk::bindings::exports::flagstone::plugin::validator::Guest;

    fn write(key: &str, value: Option<&str>) -> Write {
        Write {
            key: key.into(),
            value: value.map(|v| v.as_bytes().to_vec()),
            content_type: Some("application/json".into()),
            current: None,
        }
    }

    fn check(key: &str, value: &str) -> Result<(), String> {
        <FlagSchema as Plugin>::validate_write(write(key, Some(value)))
    }

    #[test]
    fn plain_flags() {
        assert_eq!(
            check("feature_flags", r#"{"new_ui": true, "beta": false}"#),
            Ok(())
        );
        assert_eq!(check("feature_flags", "{}"), Ok(()));
        assert_eq!(
            check("feature_flags", r#"{"new_ui": "yes"}"#),
            Err(r#"feature_flags.new_ui: expected boolean, got string "yes""#.into())
        );
        assert_eq!(
            check("feature_flags", r#"{"a": 1, "b": true, "c": null}"#),
            Err("feature_flags.a: expected boolean, got number 1; \
                 feature_flags.c: expected boolean, got null"
                .into())
        );
        assert_eq!(
            check("feature_flags", r#"[true]"#),
            Err("feature_flags: expected a JSON object of flag name → boolean, got array".into())
        );
        assert_eq!(
            check("feature_flags", "{not json"),
            Err("feature_flags: invalid JSON: key must be a string at line 1 column 2".into())
        );
    }

    #[test]
    fn too_many_problems_are_summarised() {
        let doc: String = format!(
            "{{{}}}",
            (0..8)
                .map(|i| format!("\"f{i}\": 0"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let err = check("feature_flags", &doc).unwrap_err();
        assert!(err.ends_with("(and 3 more)"), "{err}");
        assert_eq!(err.matches("expected boolean").count(), 5);
    }

    #[test]
    fn rich_flags() {
        let ok = r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off",
                    "targeting":[{"if":[{"attribute":"email","op":"ends_with","value":"@acme.com"}],"variant":"on"}],
                    "rollout":[{"variant":"on","weight":30},{"variant":"off","weight":70}]}"#;
        assert_eq!(check("flags/new_ui", ok), Ok(()));
        assert_eq!(
            check(
                "flags/new_ui",
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"off"}"#
            ),
            Err(r#"flags/new_ui: defaultVariant: "off" is not one of the variants (on)"#.into())
        );
        assert_eq!(
            check("flags/new_ui", "true"),
            Err("flags/new_ui: expected a JSON object, got boolean true".into())
        );
        assert_eq!(
            check("flags/", ok),
            Err("flags/: the flag name after flags/ is empty".into())
        );
    }

    #[test]
    fn deletes_and_other_keys_are_allowed() {
        assert_eq!(
            <FlagSchema as Plugin>::validate_write(write("feature_flags", None)),
            Ok(())
        );
        assert_eq!(
            <FlagSchema as Plugin>::validate_write(write("flags/x", None)),
            Ok(())
        );
        assert_eq!(check("feature_flags_backup", "not json"), Ok(()));
    }

    #[test]
    fn export_glue_reaches_the_plugin() {
        // The generated validator trait is implemented through the SDK's blanket impl.
        assert!(<FlagSchema as Guest>::validate_write(write("feature_flags", Some("1"))).is_err());
        let info = FlagSchema::info();
        assert_eq!(info.hooks, vec![Hook::ValidateWrite]);
        assert_eq!(info.key_prefixes, vec!["feature_flags", "flags/"]);
    }
}
