//! `rollout`: a flagstone flag evaluator.
//!
//! Evaluating flag `K` reads `flags/K`, a flagd-like rich definition (targeting rules,
//! percentage rollout; see README.md and `flagstone_sdk::flags`). Without one it falls back
//! to the seed's plain shape: the boolean `K` in the `feature_flags` object, served with
//! reason `STATIC` and variant `"true"` / `"false"`.
//!
//! Parsed documents are cached per key and store revision, so repeated evaluations cost one
//! `store::revision` call plus the evaluation itself; nothing is re-parsed until the key
//! changes.

pub mod eval;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use flagstone_sdk::flags::{self, FlagDefinition, describe_value};
use flagstone_sdk::{EvalContext, EvalError, Evaluation, Hook, Plugin, PluginInfo, Reason, store};
use serde_json::{Map, Value};

pub use eval::{bucket, evaluate_definition};

/// The key holding the seed's plain flags object.
pub const FEATURE_FLAGS: &str = "feature_flags";

/// The cache is cleared when it grows past this many keys (a backstop; normally it holds
/// one entry per flag).
const CACHE_LIMIT: usize = 10_000;

struct Rollout;

impl Plugin for Rollout {
    fn info() -> PluginInfo {
        PluginInfo::new("rollout", env!("CARGO_PKG_VERSION"))
            .prefixes([flags::PREFIX, FEATURE_FLAGS])
            .hooks([Hook::Evaluate])
    }

    fn evaluate(flag_key: String, context: EvalContext) -> Result<Evaluation, EvalError> {
        evaluate(&flag_key, &context)
    }
}

flagstone_sdk::export_plugin!(Rollout);

/// A parsed stored document; parse failures are cached too, so a malformed definition is
/// not re-parsed on every evaluation.
enum Parsed {
    Rich(Result<FlagDefinition, String>),
    Plain(Result<Map<String, Value>, String>),
}

/// key → (revision, parsed document). FxHash, a fixed-key hasher: `RandomState` would
/// make the component import `wasi:random` for nothing, and SipHash (std's fixed-key
/// `DefaultHasher`) cost more than the rest of a cache lookup.
type Cache = HashMap<String, (u64, Rc<Parsed>), rustc_hash::FxBuildHasher>;

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
    /// How many documents were parsed (observed by tests).
    static PARSES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Evaluates flag `flag_key` for `context` against the store.
pub fn evaluate(flag_key: &str, context: &EvalContext) -> Result<Evaluation, EvalError> {
    let rich_key = [flags::PREFIX, flag_key].concat();
    if let Some(parsed) = cached(&rich_key, parse_rich)
        && let Parsed::Rich(def) = &*parsed
    {
        return match def {
            Ok(def) => evaluate_definition(def, flag_key, context),
            Err(e) => Err(EvalError::parse_error(e.clone())),
        };
    }
    let Some(parsed) = cached(FEATURE_FLAGS, parse_plain) else {
        return Err(EvalError::flag_not_found(flag_key));
    };
    let Parsed::Plain(plain) = &*parsed else {
        return Err(EvalError::general("cache holds the wrong document kind"));
    };
    let map = plain
        .as_ref()
        .map_err(|e| EvalError::parse_error(e.clone()))?;
    evaluate_plain(map, flag_key)
}

/// Evaluates `flag_key` in the seed's plain `feature_flags` object.
pub fn evaluate_plain(flags: &Map<String, Value>, flag_key: &str) -> Result<Evaluation, EvalError> {
    match flags.get(flag_key) {
        None => Err(EvalError::flag_not_found(flag_key)),
        Some(Value::Bool(b)) => {
            Ok(Evaluation::new(*b, Reason::Static).with_variant(if *b { "true" } else { "false" }))
        }
        // Plain flags are booleans by definition: anything else is a type mismatch.
        Some(other) => Err(EvalError::type_mismatch(format!(
            "{FEATURE_FLAGS}.{flag_key}: expected boolean, got {}",
            describe_value(other)
        ))),
    }
}

/// The parsed document under `key` at its current revision, parsing it only if the cached
/// copy is missing or stale. `None` if the key does not exist.
fn cached(key: &str, parse: fn(&[u8]) -> Parsed) -> Option<Rc<Parsed>> {
    let Some(revision) = store::revision(key) else {
        CACHE.with(|c| c.borrow_mut().remove(key));
        return None;
    };
    let hit = CACHE.with(|c| {
        c.borrow()
            .get(key)
            .filter(|(rev, _)| *rev == revision)
            .map(|(_, parsed)| Rc::clone(parsed))
    });
    if hit.is_some() {
        return hit;
    }
    // Deleted between the two calls: treat as absent.
    let entry = store::get(key)?;
    PARSES.with(|p| p.set(p.get() + 1));
    let parsed = Rc::new(parse(&entry.value));
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= CACHE_LIMIT {
            c.clear();
        }
        c.insert(key.to_owned(), (entry.revision, Rc::clone(&parsed)));
    });
    Some(parsed)
}

fn parse_rich(bytes: &[u8]) -> Parsed {
    Parsed::Rich(FlagDefinition::parse(bytes).map_err(|e| format!("invalid flag definition: {e}")))
}

fn parse_plain(bytes: &[u8]) -> Parsed {
    Parsed::Plain(match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!(
            "{FEATURE_FLAGS}: expected a JSON object, got {}",
            describe_value(&other)
        )),
        Err(e) => Err(format!("{FEATURE_FLAGS}: invalid JSON: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flagstone_sdk::{ErrorCode, FlagValue, testing};
    use serde_json::json;

    fn ctx(key: Option<&str>) -> EvalContext {
        EvalContext::new(key, json!({}))
    }

    fn parses() -> u64 {
        PARSES.with(|p| p.get())
    }

    const RICH: &str = r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off",
        "targeting":[{"if":[{"attribute":"email","op":"ends_with","value":"@acme.com"}],"variant":"on"}]}"#;

    #[test]
    fn plain_fallback() {
        testing::put(
            "feature_flags",
            r#"{"new_ui": true, "beta": false, "odd": "yes"}"#,
        );
        let e = evaluate("new_ui", &ctx(None)).unwrap();
        assert_eq!(e.value, FlagValue::Boolean(true));
        assert_eq!(e.variant.as_deref(), Some("true"));
        assert_eq!(e.reason, Reason::Static);
        assert_eq!(
            evaluate("beta", &ctx(None)).unwrap().variant.as_deref(),
            Some("false")
        );

        let e = evaluate("missing", &ctx(None)).unwrap_err();
        assert_eq!(e.code, ErrorCode::FlagNotFound);
        let e = evaluate("odd", &ctx(None)).unwrap_err();
        assert_eq!(e.code, ErrorCode::TypeMismatch);
        assert_eq!(
            e.message,
            r#"feature_flags.odd: expected boolean, got string "yes""#
        );
    }

    #[test]
    fn rich_definition_wins_over_plain() {
        testing::put("feature_flags", r#"{"new_ui": true}"#);
        testing::put("flags/new_ui", RICH);
        let e = evaluate(
            "new_ui",
            &EvalContext::new(None, json!({"email": "x@acme.com"})),
        )
        .unwrap();
        assert_eq!(
            (e.value, e.reason),
            (FlagValue::Boolean(true), Reason::TargetingMatch)
        );
        let e = evaluate("new_ui", &ctx(None)).unwrap();
        assert_eq!(
            (e.value, e.reason),
            (FlagValue::Boolean(false), Reason::Default)
        );
        // Deleting the definition falls back to the plain object.
        testing::delete("flags/new_ui");
        assert_eq!(
            evaluate("new_ui", &ctx(None)).unwrap().reason,
            Reason::Static
        );
    }

    #[test]
    fn every_error_code_the_plugin_produces() {
        assert_eq!(
            evaluate("nothing", &ctx(None)).unwrap_err().code,
            ErrorCode::FlagNotFound
        );

        testing::put("flags/broken", r#"{"state":"ENABLED","variants":{}}"#);
        let e = evaluate("broken", &ctx(None)).unwrap_err();
        assert_eq!(e.code, ErrorCode::ParseError);
        assert_eq!(
            e.message,
            "invalid flag definition: variants: must define at least one variant"
        );
        testing::put("flags/not_json", "{oops");
        assert_eq!(
            evaluate("not_json", &ctx(None)).unwrap_err().code,
            ErrorCode::ParseError
        );
        testing::put("feature_flags", "[]");
        assert_eq!(
            evaluate("x", &ctx(None)).unwrap_err().code,
            ErrorCode::ParseError
        );
        testing::put("feature_flags", r#"{"x":"yes"}"#);
        assert_eq!(
            evaluate("x", &ctx(None)).unwrap_err().code,
            ErrorCode::TypeMismatch
        );

        testing::put(
            "flags/split",
            r#"{"state":"ENABLED","variants":{"a":"A","b":"B"},"defaultVariant":"a",
                "rollout":[{"variant":"a","weight":1},{"variant":"b","weight":1}]}"#,
        );
        assert_eq!(
            evaluate("split", &ctx(None)).unwrap_err().code,
            ErrorCode::TargetingKeyMissing
        );
        assert_eq!(
            evaluate("split", &ctx(Some("u1"))).unwrap().reason,
            Reason::Split
        );

        let bad = EvalContext {
            targeting_key: Some("u1".into()),
            attributes: "[1, 2]".into(),
        };
        let e = evaluate("split", &bad).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidContext);
        assert_eq!(
            e.message,
            "context attributes must be a JSON object, got array"
        );
    }

    #[test]
    fn definitions_are_parsed_once_per_revision() {
        testing::put("flags/f", RICH);
        let before = parses();
        for _ in 0..100 {
            evaluate("f", &ctx(None)).unwrap();
        }
        assert_eq!(parses() - before, 1);

        // A new revision is picked up immediately.
        testing::put(
            "flags/f",
            RICH.replace(r#""defaultVariant":"off""#, r#""defaultVariant":"on""#),
        );
        assert_eq!(
            evaluate("f", &ctx(None)).unwrap().value,
            FlagValue::Boolean(true)
        );
        assert_eq!(parses() - before, 2);

        // Broken documents are cached too.
        testing::put("flags/g", "nope");
        for _ in 0..10 {
            assert!(evaluate("g", &ctx(None)).is_err());
        }
        assert_eq!(parses() - before, 3);
    }

    #[test]
    fn describes_itself() {
        let info = Rollout::info();
        assert_eq!(info.name, "rollout");
        assert_eq!(info.hooks, vec![Hook::Evaluate]);
        assert_eq!(info.key_prefixes, vec!["flags/", "feature_flags"]);
    }
}
