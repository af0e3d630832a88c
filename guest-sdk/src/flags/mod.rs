//! The rich flag definition stored under `flags/<name>` (feature `flags`).
//!
//! One model, two plugins: the `flag-schema` validator rejects writes that
//! [`FlagDefinition::parse`] refuses, and the `rollout` evaluator evaluates what it returns.
//! The format is flagd-like JSON:
//!
//! ```json
//! {
//!   "state": "ENABLED",
//!   "variants": { "on": true, "off": false },
//!   "defaultVariant": "off",
//!   "targeting": [
//!     { "if": [ { "attribute": "email", "op": "ends_with", "value": "@acme.com" } ], "variant": "on" }
//!   ],
//!   "rollout": [ { "variant": "on", "weight": 30 }, { "variant": "off", "weight": 70 } ],
//!   "metadata": { "owner": "team-a" }
//! }
//! ```
//!
//! * `state` (required): `"ENABLED"` or `"DISABLED"`.
//! * `variants` (required, non-empty): name → value. All values have one type: boolean,
//!   string, number (integers stay integers unless some variant is fractional, then all are
//!   floats) or object/array (structured).
//! * `defaultVariant` (required): one of the variant names.
//! * `targeting` (optional): rules, tried in order; a rule matches when all of its `if`
//!   conditions hold. Operators: `equals`, `not_equals`, `in` (list), `starts_with`,
//!   `ends_with`, `semver_gt`, `semver_ge`, `semver_lt`, `semver_le`, `semver_eq`.
//! * `rollout` (optional, non-empty): weighted split between variants; weights are
//!   non-negative integers with a positive sum.
//! * `metadata` (optional): name → boolean, string or number.
//!
//! Unknown fields are rejected, so typos such as `defaultvariant` are caught at write time.
//!
//! ```no_run
//! use flagstone_sdk::flags::FlagDefinition;
//!
//! if let Some(entry) = flagstone_sdk::store::get("flags/new_ui") {
//!     match FlagDefinition::parse(&entry.value) {
//!         Ok(def) => flagstone_sdk::info!("{} rules", def.targeting.len()),
//!         Err(e) => flagstone_sdk::warn!("flags/new_ui: {e}"),
//!     }
//! }
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::{FlagValue, MetadataValue};

mod fast;
mod parse;

/// The key prefix of rich flag definitions: flag `new_ui` lives under `flags/new_ui`.
///
/// ```no_run
/// let key = format!("{}{}", flagstone_sdk::flags::PREFIX, "new_ui");
/// ```
pub const PREFIX: &str = "flags/";

/// A parsed and validated flag definition.
///
/// ```no_run
/// use flagstone_sdk::flags::FlagDefinition;
/// let def = FlagDefinition::parse(
///     br#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off"}"#,
/// ).unwrap();
/// assert_eq!(def.default_variant, "off");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FlagDefinition {
    /// Whether the flag is enabled.
    pub state: FlagState,
    /// Variant name → value; all values have the same type.
    pub variants: BTreeMap<String, FlagValue>,
    /// The variant used when nothing else applies (always a key of `variants`).
    pub default_variant: String,
    /// Targeting rules, in order.
    pub targeting: Vec<Rule>,
    /// Weighted split; empty when the definition has no `rollout`.
    pub rollout: Vec<Split>,
    /// Flag metadata, returned with every evaluation.
    pub metadata: Vec<(String, MetadataValue)>,
}

/// `state` of a definition.
///
/// ```no_run
/// use flagstone_sdk::flags::{FlagDefinition, FlagState};
/// # let def: FlagDefinition = unimplemented!();
/// if def.state == FlagState::Disabled { /* serve the default variant */ }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagState {
    /// `"ENABLED"`: targeting and rollout apply.
    Enabled,
    /// `"DISABLED"`: the default variant is served with reason `DISABLED`.
    Disabled,
}

/// A targeting rule: when all `conditions` hold, serve `variant`.
///
/// ```no_run
/// # let def: flagstone_sdk::flags::FlagDefinition = unimplemented!();
/// for rule in &def.targeting {
///     println!("{} conditions → {}", rule.conditions.len(), rule.variant);
/// }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The conditions, ANDed (never empty).
    pub conditions: Vec<Condition>,
    /// The variant served when the rule matches (always a key of `variants`).
    pub variant: String,
}

/// One condition of a [`Rule`]: `attribute` `op` value.
///
/// ```no_run
/// use flagstone_sdk::flags::{Condition, Op};
/// let c = Condition { attribute: "email".into(), op: Op::EndsWith("@acme.com".into()) };
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// The context attribute to test: a top-level key of the attributes object, a dotted
    /// path into nested objects (`user.plan`), or `targetingKey`.
    pub attribute: String,
    /// The operator and its operand.
    pub op: Op,
}

/// A condition operator with its (validated) operand.
///
/// ```no_run
/// use flagstone_sdk::flags::Op;
/// let op = Op::In(vec![serde_json::json!("NL"), serde_json::json!("BE")]);
/// assert_eq!(op.name(), "in");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `equals`: the attribute equals the value (a string, number or boolean).
    Equals(Value),
    /// `not_equals`: the attribute is present and differs from the value.
    NotEquals(Value),
    /// `in`: the attribute equals one of the values (a non-empty list of scalars).
    In(Vec<Value>),
    /// `starts_with`: the attribute is a string starting with the value.
    StartsWith(String),
    /// `ends_with`: the attribute is a string ending with the value.
    EndsWith(String),
    /// `semver_gt` … `semver_eq`: the attribute is a semantic version comparing as stated.
    Semver(SemverOp, semver::Version),
}

/// The comparison of an [`Op::Semver`] condition.
///
/// ```no_run
/// use flagstone_sdk::flags::SemverOp;
/// assert!(SemverOp::Ge.holds(std::cmp::Ordering::Equal));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SemverOp {
    /// `semver_gt`: attribute > value.
    Gt,
    /// `semver_ge`: attribute ≥ value.
    Ge,
    /// `semver_lt`: attribute < value.
    Lt,
    /// `semver_le`: attribute ≤ value.
    Le,
    /// `semver_eq`: attribute = value (build metadata ignored).
    Eq,
}

impl SemverOp {
    /// Whether `attribute.cmp(value)` satisfies this comparison.
    ///
    /// ```no_run
    /// use flagstone_sdk::flags::SemverOp;
    /// assert!(!SemverOp::Lt.holds(std::cmp::Ordering::Greater));
    /// ```
    pub fn holds(self, ordering: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            SemverOp::Gt => ordering == Greater,
            SemverOp::Ge => ordering != Less,
            SemverOp::Lt => ordering == Less,
            SemverOp::Le => ordering != Greater,
            SemverOp::Eq => ordering == Equal,
        }
    }
}

impl Op {
    /// The operator's name as written in definitions, e.g. `semver_ge`.
    ///
    /// ```no_run
    /// assert_eq!(flagstone_sdk::flags::Op::EndsWith("x".into()).name(), "ends_with");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            Op::Equals(_) => "equals",
            Op::NotEquals(_) => "not_equals",
            Op::In(_) => "in",
            Op::StartsWith(_) => "starts_with",
            Op::EndsWith(_) => "ends_with",
            Op::Semver(SemverOp::Gt, _) => "semver_gt",
            Op::Semver(SemverOp::Ge, _) => "semver_ge",
            Op::Semver(SemverOp::Lt, _) => "semver_lt",
            Op::Semver(SemverOp::Le, _) => "semver_le",
            Op::Semver(SemverOp::Eq, _) => "semver_eq",
        }
    }
}

/// One bucket of a weighted `rollout`.
///
/// ```no_run
/// use flagstone_sdk::flags::Split;
/// let s = Split { variant: "on".into(), weight: 30 };
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The variant served in this bucket (always a key of `variants`).
    pub variant: String,
    /// The bucket's relative weight.
    pub weight: u32,
}

/// Why a definition was rejected: a path into the JSON (`targeting[0].if[1].op`, empty for
/// the whole document) and a message.
///
/// ```no_run
/// let err = flagstone_sdk::flags::FlagDefinition::parse(b"[]").unwrap_err();
/// assert_eq!(err.to_string(), "expected a JSON object, got array");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionError {
    /// Where in the document the problem is; empty for the document itself.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for DefinitionError {}

/// Describes a JSON value for error messages: `string "yes"`, `number 1`, `null`, `array`…
///
/// ```no_run
/// use flagstone_sdk::flags::describe_value;
/// assert_eq!(describe_value(&serde_json::json!("yes")), r#"string "yes""#);
/// ```
pub fn describe_value(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => {
            let mut shown: String = s.chars().take(40).collect();
            if shown.len() < s.len() {
                shown.push('…');
            }
            format!("string {}", Value::String(shown))
        }
        Value::Array(_) => "array".to_owned(),
        Value::Object(_) => "object".to_owned(),
    }
}

/// Parses a semantic version leniently: an optional leading `v`, and missing minor/patch
/// numbers count as 0 (`v1.2` = `1.2.0`).
///
/// ```no_run
/// let v = flagstone_sdk::flags::parse_semver("v2.1").unwrap();
/// assert_eq!(v, semver::Version::new(2, 1, 0));
/// ```
pub fn parse_semver(s: &str) -> Option<semver::Version> {
    let s = s.trim();
    let s = s.strip_prefix(['v', 'V']).unwrap_or(s);
    if let Ok(v) = semver::Version::parse(s) {
        return Some(v);
    }
    // Pad `1` / `1.2` (optionally followed by `-pre` / `+build`) to three components.
    let split = s.find(['-', '+']).unwrap_or(s.len());
    let (core, rest) = s.split_at(split);
    let dots = core.matches('.').count();
    if dots >= 2 || core.is_empty() {
        return None;
    }
    let padded = format!("{core}{}{rest}", ".0".repeat(2 - dots));
    semver::Version::parse(&padded).ok()
}

impl FlagDefinition {
    /// Parses and validates a definition from the raw stored bytes.
    ///
    /// ```no_run
    /// use flagstone_sdk::flags::FlagDefinition;
    /// match FlagDefinition::parse(br#"{"state":"ENABLED"}"#) {
    ///     Ok(def) => println!("{} variants", def.variants.len()),
    ///     Err(e) => println!("rejected: {e}"), // variants: required field is missing
    /// }
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<Self, DefinitionError> {
        // A typed read for valid definitions; anything else is read again as a
        // JSON tree, which names what is wrong and where.
        match fast::from_slice(bytes) {
            Some(def) => Ok(def),
            None => parse::from_slice(bytes),
        }
    }

    /// Validates an already-parsed JSON document.
    ///
    /// ```no_run
    /// use flagstone_sdk::flags::FlagDefinition;
    /// let doc = serde_json::json!({"state": "DISABLED", "variants": {"a": 1}, "defaultVariant": "a"});
    /// let def = FlagDefinition::from_json(&doc).unwrap();
    /// ```
    pub fn from_json(value: &Value) -> Result<Self, DefinitionError> {
        parse::from_value(value)
    }

    /// The value of variant `name`.
    ///
    /// ```no_run
    /// # let def: flagstone_sdk::flags::FlagDefinition = unimplemented!();
    /// let default = def.variant(&def.default_variant).unwrap();
    /// ```
    pub fn variant(&self, name: &str) -> Option<&FlagValue> {
        self.variants.get(name)
    }

    /// The OpenFeature type of the flag's values: `boolean`, `string`, `integer`, `float`
    /// or `object`.
    ///
    /// ```no_run
    /// # let def: flagstone_sdk::flags::FlagDefinition = unimplemented!();
    /// println!("a {} flag", def.value_type());
    /// ```
    pub fn value_type(&self) -> &'static str {
        self.variants
            .values()
            .next()
            .map_or("boolean", FlagValue::type_name)
    }

    /// The sum of the rollout weights (0 without a rollout).
    ///
    /// ```no_run
    /// # let def: flagstone_sdk::flags::FlagDefinition = unimplemented!();
    /// let total = def.total_weight();
    /// ```
    pub fn total_weight(&self) -> u64 {
        self.rollout.iter().map(|s| u64::from(s.weight)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_semver() {
        assert_eq!(parse_semver("1"), Some(semver::Version::new(1, 0, 0)));
        assert_eq!(parse_semver("v1.2"), Some(semver::Version::new(1, 2, 0)));
        assert_eq!(
            parse_semver("1.2-beta.1"),
            semver::Version::parse("1.2.0-beta.1").ok()
        );
        assert_eq!(parse_semver("1.2.3.4"), None);
        assert_eq!(parse_semver(""), None);
        assert_eq!(parse_semver("x.y"), None);
    }
}
