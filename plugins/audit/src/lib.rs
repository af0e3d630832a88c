//! `audit`: a flagstone reactor that logs a readable diff of every feature-flag change.
//!
//! * `feature_flags` (the seed's plain object): one line per added, changed or removed flag,
//!   e.g. `new_ui: false → true, revision 42`.
//! * `flags/<name>` (rich definitions): `flags/x: created|updated|deleted, revision N`, with
//!   the changed top-level fields for updates.
//!
//! All the logic is in [`describe_change`], a pure function.

use flagstone_sdk::{Change, Hook, Plugin, PluginInfo};
use serde_json::{Map, Value};

/// The key holding the seed's plain flags object.
pub const FEATURE_FLAGS: &str = "feature_flags";
/// The prefix of rich flag definitions.
pub const FLAGS_PREFIX: &str = "flags/";
/// Longest rendering of a single value in a line.
const MAX_VALUE_CHARS: usize = 60;

struct Audit;

impl Plugin for Audit {
    fn info() -> PluginInfo {
        PluginInfo::new("audit", env!("CARGO_PKG_VERSION"))
            .prefixes([FEATURE_FLAGS, FLAGS_PREFIX])
            .hooks([Hook::OnChange])
    }

    fn on_change(change: Change) {
        for line in describe_change(&change) {
            flagstone_sdk::info!("{line}");
        }
    }
}

flagstone_sdk::export_plugin!(Audit);

/// The log lines for one committed change (empty if nothing visible changed).
pub fn describe_change(change: &Change) -> Vec<String> {
    let old = change.old_value.as_deref();
    let new = change.new_value.as_deref();
    if change.key == FEATURE_FLAGS {
        diff_feature_flags(old, new, change.revision)
    } else if change.key.starts_with(FLAGS_PREFIX) {
        vec![describe_definition_change(
            &change.key,
            old,
            new,
            change.revision,
        )]
    } else {
        vec![format!(
            "{}: {}, revision {}",
            change.key,
            verb(old, new),
            change.revision
        )]
    }
}

fn verb(old: Option<&[u8]>, new: Option<&[u8]>) -> &'static str {
    match (old, new) {
        (None, Some(_)) => "created",
        (Some(_), None) => "deleted",
        _ => "updated",
    }
}

/// One line per flag whose value differs between the old and new `feature_flags` objects.
pub fn diff_feature_flags(old: Option<&[u8]>, new: Option<&[u8]>, revision: u64) -> Vec<String> {
    let (old_map, old_err) = as_object(old);
    let (new_map, new_err) = as_object(new);
    let mut lines = Vec::new();
    if let Some(e) = new_err {
        lines.push(format!(
            "{FEATURE_FLAGS}: new value is {e}, revision {revision}"
        ));
        return lines;
    }
    if let Some(e) = old_err {
        lines.push(format!(
            "{FEATURE_FLAGS}: previous value was {e}, revision {revision}"
        ));
    }
    for name in sorted_union(&old_map, &new_map) {
        match (old_map.get(name), new_map.get(name)) {
            (None, Some(new_v)) => lines.push(format!(
                "{name}: added ({}), revision {revision}",
                show(new_v)
            )),
            (Some(old_v), None) => lines.push(format!(
                "{name}: removed (was {}), revision {revision}",
                show(old_v)
            )),
            (Some(old_v), Some(new_v)) if old_v != new_v => lines.push(format!(
                "{name}: {} → {}, revision {revision}",
                show(old_v),
                show(new_v)
            )),
            _ => {}
        }
    }
    lines
}

/// `flags/x: created|updated|deleted, revision N` plus changed top-level fields on update.
pub fn describe_definition_change(
    key: &str,
    old: Option<&[u8]>,
    new: Option<&[u8]>,
    revision: u64,
) -> String {
    let head = format!("{key}: {}, revision {revision}", verb(old, new));
    let (Some(old), Some(new)) = (old, new) else {
        return head;
    };
    let (old_map, old_err) = as_object(Some(old));
    let (new_map, new_err) = as_object(Some(new));
    if let Some(e) = new_err.or(old_err) {
        return format!("{head} (not comparable: {e})");
    }
    let mut changes = Vec::new();
    for field in sorted_union(&old_map, &new_map) {
        match (old_map.get(field), new_map.get(field)) {
            (None, Some(new_v)) => changes.push(format!("+{field}: {}", show(new_v))),
            (Some(_), None) => changes.push(format!("-{field}")),
            (Some(old_v), Some(new_v)) if old_v != new_v => {
                changes.push(format!("{field}: {} → {}", show(old_v), show(new_v)))
            }
            _ => {}
        }
    }
    if changes.is_empty() {
        format!("{head} (no change)")
    } else {
        format!("{head} ({})", changes.join("; "))
    }
}

/// The keys of both objects, sorted (independent of serde_json's map ordering).
fn sorted_union<'a>(a: &'a Map<String, Value>, b: &'a Map<String, Value>) -> Vec<&'a str> {
    let mut keys: Vec<&str> = a.keys().chain(b.keys()).map(String::as_str).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Parses an optional document as a JSON object; a missing document is an empty object.
/// Returns a description of the problem for anything else.
fn as_object(bytes: Option<&[u8]>) -> (Map<String, Value>, Option<String>) {
    let Some(bytes) = bytes else {
        return (Map::new(), None);
    };
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => (map, None),
        Ok(_) => (Map::new(), Some("not a JSON object".to_owned())),
        Err(_) => (Map::new(), Some("not valid JSON".to_owned())),
    }
}

/// Compact JSON, shortened to [`MAX_VALUE_CHARS`].
fn show(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() <= MAX_VALUE_CHARS {
        return text;
    }
    let mut short: String = text.chars().take(MAX_VALUE_CHARS - 1).collect();
    short.push('…');
    short
}

#[cfg(test)]
mod tests {
    use super::*;
    use flagstone_sdk::log::Level;
    use flagstone_sdk::testing;

    fn change(key: &str, old: Option<&str>, new: Option<&str>, revision: u64) -> Change {
        Change {
            key: key.into(),
            old_value: old.map(|s| s.as_bytes().to_vec()),
            new_value: new.map(|s| s.as_bytes().to_vec()),
            revision,
        }
    }

    #[test]
    fn feature_flags_diff() {
        let c = change(
            "feature_flags",
            Some(r#"{"new_ui": false, "beta": true, "gone": true}"#),
            Some(r#"{"new_ui": true, "beta": true, "fresh": false}"#),
            42,
        );
        assert_eq!(
            describe_change(&c),
            vec![
                "fresh: added (false), revision 42",
                "gone: removed (was true), revision 42",
                "new_ui: false → true, revision 42",
            ]
        );
    }

    #[test]
    fn feature_flags_created_deleted_and_broken() {
        assert_eq!(
            describe_change(&change("feature_flags", None, Some(r#"{"a": true}"#), 1)),
            vec!["a: added (true), revision 1"]
        );
        assert_eq!(
            describe_change(&change("feature_flags", Some(r#"{"a": true}"#), None, 2)),
            vec!["a: removed (was true), revision 2"]
        );
        assert_eq!(
            describe_change(&change("feature_flags", Some("{}"), Some("[1]"), 3)),
            vec!["feature_flags: new value is not a JSON object, revision 3"]
        );
        assert_eq!(
            describe_change(&change(
                "feature_flags",
                Some("{oops"),
                Some(r#"{"a": "x"}"#),
                4
            )),
            vec![
                "feature_flags: previous value was not valid JSON, revision 4",
                r#"a: added ("x"), revision 4"#,
            ]
        );
        assert!(describe_change(&change("feature_flags", Some("{}"), Some("{}"), 5)).is_empty());
    }

    #[test]
    fn definition_changes() {
        let v1 = r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off"}"#;
        let v2 = r#"{"state":"DISABLED","variants":{"on":true,"off":false},"defaultVariant":"on","metadata":{"owner":"me"}}"#;
        assert_eq!(
            describe_change(&change("flags/new_ui", None, Some(v1), 7)),
            vec!["flags/new_ui: created, revision 7"]
        );
        assert_eq!(
            describe_change(&change("flags/new_ui", Some(v1), Some(v2), 8)),
            vec![
                r#"flags/new_ui: updated, revision 8 (defaultVariant: "off" → "on"; +metadata: {"owner":"me"}; state: "ENABLED" → "DISABLED")"#
            ]
        );
        assert_eq!(
            describe_change(&change("flags/new_ui", Some(v2), Some(v1), 9)),
            vec![
                r#"flags/new_ui: updated, revision 9 (defaultVariant: "on" → "off"; -metadata; state: "DISABLED" → "ENABLED")"#
            ]
        );
        assert_eq!(
            describe_change(&change("flags/new_ui", Some(v1), None, 10)),
            vec!["flags/new_ui: deleted, revision 10"]
        );
        assert_eq!(
            describe_change(&change("flags/new_ui", Some(v1), Some(v1), 11)),
            vec!["flags/new_ui: updated, revision 11 (no change)"]
        );
        assert_eq!(
            describe_change(&change("flags/new_ui", Some(v1), Some("x"), 12)),
            vec!["flags/new_ui: updated, revision 12 (not comparable: not valid JSON)"]
        );
    }

    #[test]
    fn long_values_are_shortened() {
        let long = format!(r#"{{"state":"{}"}}"#, "x".repeat(200));
        let line = describe_definition_change("flags/a", Some(b"{}"), Some(long.as_bytes()), 1);
        assert!(line.chars().count() < 120, "{line}");
        assert!(line.contains('…'));
    }

    #[test]
    fn on_change_logs_each_line_at_info() {
        <Audit as Plugin>::on_change(change(
            "feature_flags",
            Some(r#"{"a": false}"#),
            Some(r#"{"a": true, "b": true}"#),
            3,
        ));
        assert_eq!(
            testing::take_logs(),
            vec![
                (Level::Info, "a: false → true, revision 3".to_owned()),
                (Level::Info, "b: added (true), revision 3".to_owned()),
            ]
        );
    }
}
