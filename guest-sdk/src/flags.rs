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

use serde_json::{Map, Value};

use crate::{FlagValue, MetadataValue};

/// The key prefix of rich flag definitions: flag `new_ui` lives under `flags/new_ui`.
///
/// ```no_run
/// let key = format!("{}{}", flagstone_sdk::flags::PREFIX, "new_ui");
/// ```
pub const PREFIX: &str = "flags/";

/// Top-level fields of a definition.
const FIELDS: &str = "state, variants, defaultVariant, targeting, rollout, metadata";

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

fn err<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, DefinitionError> {
    Err(DefinitionError {
        path: path.into(),
        message: message.into(),
    })
}

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
        let value: Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => return err("", format!("invalid JSON: {e}")),
        };
        Self::from_json(&value)
    }

    /// Validates an already-parsed JSON document.
    ///
    /// ```no_run
    /// use flagstone_sdk::flags::FlagDefinition;
    /// let doc = serde_json::json!({"state": "DISABLED", "variants": {"a": 1}, "defaultVariant": "a"});
    /// let def = FlagDefinition::from_json(&doc).unwrap();
    /// ```
    pub fn from_json(value: &Value) -> Result<Self, DefinitionError> {
        let Value::Object(doc) = value else {
            return err(
                "",
                format!("expected a JSON object, got {}", describe_value(value)),
            );
        };
        for key in doc.keys() {
            if !FIELDS.split(", ").any(|f| f == key) {
                return err(
                    "",
                    format!(
                        "unknown field {} (expected one of {FIELDS})",
                        Value::String(key.clone())
                    ),
                );
            }
        }

        let state = match required(doc, "state")? {
            Value::String(s) if s == "ENABLED" => FlagState::Enabled,
            Value::String(s) if s == "DISABLED" => FlagState::Disabled,
            other => {
                return err(
                    "state",
                    format!(
                        r#"expected "ENABLED" or "DISABLED", got {}"#,
                        describe_value(other)
                    ),
                );
            }
        };

        let variants = parse_variants(required(doc, "variants")?)?;
        let names = || variants.keys().cloned().collect::<Vec<_>>().join(", ");
        let check_variant = |path: &str, v: &Value| -> Result<String, DefinitionError> {
            match v {
                Value::String(name) if variants.contains_key(name) => Ok(name.clone()),
                Value::String(name) => err(
                    path,
                    format!(
                        "{} is not one of the variants ({})",
                        Value::String(name.clone()),
                        names()
                    ),
                ),
                other => err(
                    path,
                    format!("expected a variant name, got {}", describe_value(other)),
                ),
            }
        };

        let default_variant = check_variant("defaultVariant", required(doc, "defaultVariant")?)?;

        let mut targeting = Vec::new();
        if let Some(rules) = doc.get("targeting") {
            let Value::Array(rules) = rules else {
                return err(
                    "targeting",
                    format!("expected a list of rules, got {}", describe_value(rules)),
                );
            };
            for (i, rule) in rules.iter().enumerate() {
                let path = format!("targeting[{i}]");
                targeting.push(parse_rule(&path, rule, &check_variant)?);
            }
        }

        let mut rollout = Vec::new();
        if let Some(splits) = doc.get("rollout") {
            let Value::Array(splits) = splits else {
                return err(
                    "rollout",
                    format!(
                        "expected a list of {{variant, weight}}, got {}",
                        describe_value(splits)
                    ),
                );
            };
            if splits.is_empty() {
                return err("rollout", "must not be empty (omit it instead)");
            }
            let mut total = 0u64;
            for (i, split) in splits.iter().enumerate() {
                let path = format!("rollout[{i}]");
                let Value::Object(fields) = split else {
                    return err(
                        path,
                        format!(
                            "expected {{variant, weight}}, got {}",
                            describe_value(split)
                        ),
                    );
                };
                only_fields(&path, fields, &["variant", "weight"])?;
                let variant = check_variant(
                    &format!("{path}.variant"),
                    required_at(&path, fields, "variant")?,
                )?;
                let weight = match required_at(&path, fields, "weight")? {
                    Value::Number(n) if n.as_u64().is_some_and(|w| w <= u32::MAX as u64) => {
                        n.as_u64().unwrap_or_default() as u32
                    }
                    other => {
                        return err(
                            format!("{path}.weight"),
                            format!(
                                "expected a non-negative integer, got {}",
                                describe_value(other)
                            ),
                        );
                    }
                };
                total += u64::from(weight);
                rollout.push(Split { variant, weight });
            }
            if total == 0 {
                return err("rollout", "weights must not all be 0");
            }
        }

        let mut metadata = Vec::new();
        if let Some(meta) = doc.get("metadata") {
            let Value::Object(meta) = meta else {
                return err(
                    "metadata",
                    format!("expected an object, got {}", describe_value(meta)),
                );
            };
            for (key, v) in meta {
                let value = match v {
                    Value::Bool(b) => MetadataValue::Boolean(*b),
                    Value::String(s) => MetadataValue::Text(s.clone()),
                    Value::Number(n) => MetadataValue::Number(n.as_f64().unwrap_or(f64::NAN)),
                    other => {
                        return err(
                            format!("metadata.{key}"),
                            format!(
                                "expected a boolean, string or number, got {}",
                                describe_value(other)
                            ),
                        );
                    }
                };
                metadata.push((key.clone(), value));
            }
        }

        Ok(FlagDefinition {
            state,
            variants,
            default_variant,
            targeting,
            rollout,
            metadata,
        })
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

fn required<'a>(doc: &'a Map<String, Value>, field: &str) -> Result<&'a Value, DefinitionError> {
    doc.get(field)
        .map_or_else(|| err(field, "required field is missing"), Ok)
}

fn required_at<'a>(
    path: &str,
    doc: &'a Map<String, Value>,
    field: &str,
) -> Result<&'a Value, DefinitionError> {
    doc.get(field).map_or_else(
        || err(format!("{path}.{field}"), "required field is missing"),
        Ok,
    )
}

fn only_fields(
    path: &str,
    fields: &Map<String, Value>,
    allowed: &[&str],
) -> Result<(), DefinitionError> {
    match fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => err(
            path,
            format!(
                "unknown field {} (expected {})",
                Value::String(key.clone()),
                allowed.join(", ")
            ),
        ),
        None => Ok(()),
    }
}

fn parse_variants(v: &Value) -> Result<BTreeMap<String, FlagValue>, DefinitionError> {
    let Value::Object(map) = v else {
        return err(
            "variants",
            format!(
                "expected an object of name → value, got {}",
                describe_value(v)
            ),
        );
    };
    if map.is_empty() {
        return err("variants", "must define at least one variant");
    }
    #[derive(PartialEq, Clone, Copy)]
    enum Kind {
        Bool,
        Text,
        Number,
        Object,
    }
    let kind_name = |k: Kind| match k {
        Kind::Bool => "a boolean",
        Kind::Text => "a string",
        Kind::Number => "a number",
        Kind::Object => "an object or array",
    };
    // Sorted by name whatever serde_json's map ordering, so messages are deterministic.
    let sorted: BTreeMap<&String, &Value> = map.iter().collect();
    let mut first: Option<(Kind, &str)> = None;
    let mut any_float = false;
    for (name, value) in &sorted {
        let path = format!("variants.{name}");
        if name.is_empty() {
            return err("variants", "variant names must not be empty");
        }
        let kind = match value {
            Value::Bool(_) => Kind::Bool,
            Value::String(_) => Kind::Text,
            Value::Number(n) => {
                any_float |= n.as_i64().is_none();
                Kind::Number
            }
            Value::Array(_) | Value::Object(_) => Kind::Object,
            Value::Null => {
                return err(
                    path,
                    "expected a boolean, string, number, object or array, got null",
                );
            }
        };
        match first {
            None => first = Some((kind, name)),
            Some((k, other)) if k != kind => {
                return err(
                    path,
                    format!(
                        "expected {} like variant {other}, got {}",
                        kind_name(k),
                        describe_value(value)
                    ),
                );
            }
            Some(_) => {}
        }
    }
    Ok(sorted
        .into_iter()
        .map(|(name, value)| {
            let v = match value {
                Value::Bool(b) => FlagValue::Boolean(*b),
                Value::String(s) => FlagValue::Text(s.clone()),
                Value::Number(n) => match n.as_i64() {
                    Some(i) if !any_float => FlagValue::Integer(i),
                    _ => FlagValue::Float(n.as_f64().unwrap_or(f64::NAN)),
                },
                other => FlagValue::Object(other.to_string()),
            };
            (name.clone(), v)
        })
        .collect())
}

fn parse_rule(
    path: &str,
    rule: &Value,
    check_variant: &dyn Fn(&str, &Value) -> Result<String, DefinitionError>,
) -> Result<Rule, DefinitionError> {
    let Value::Object(fields) = rule else {
        return err(
            path,
            format!(
                "expected a rule {{\"if\": [...], \"variant\": ...}}, got {}",
                describe_value(rule)
            ),
        );
    };
    only_fields(path, fields, &["if", "variant"])?;
    let variant = check_variant(
        &format!("{path}.variant"),
        required_at(path, fields, "variant")?,
    )?;
    let cond_path = format!("{path}.if");
    let conditions = match required_at(path, fields, "if")? {
        Value::Array(c) if !c.is_empty() => c,
        Value::Array(_) => return err(cond_path, "must have at least one condition"),
        other => {
            return err(
                cond_path,
                format!(
                    "expected a list of conditions, got {}",
                    describe_value(other)
                ),
            );
        }
    };
    let conditions = conditions
        .iter()
        .enumerate()
        .map(|(i, c)| parse_condition(&format!("{cond_path}[{i}]"), c))
        .collect::<Result<_, _>>()?;
    Ok(Rule {
        conditions,
        variant,
    })
}

const OPS: &str = "equals, not_equals, in, starts_with, ends_with, semver_gt, semver_ge, \
                   semver_lt, semver_le, semver_eq";

fn parse_condition(path: &str, c: &Value) -> Result<Condition, DefinitionError> {
    let Value::Object(fields) = c else {
        return err(
            path,
            format!(
                "expected a condition {{attribute, op, value}}, got {}",
                describe_value(c)
            ),
        );
    };
    only_fields(path, fields, &["attribute", "op", "value"])?;
    let attribute = match required_at(path, fields, "attribute")? {
        Value::String(s) if !s.is_empty() => s.clone(),
        other => {
            return err(
                format!("{path}.attribute"),
                format!(
                    "expected a non-empty attribute name, got {}",
                    describe_value(other)
                ),
            );
        }
    };
    let op_path = format!("{path}.op");
    let op_name = match required_at(path, fields, "op")? {
        Value::String(s) => s.as_str(),
        other => {
            return err(
                op_path,
                format!("expected an operator name, got {}", describe_value(other)),
            );
        }
    };
    let value_path = format!("{path}.value");
    let value = required_at(path, fields, "value")?;
    let scalar = |v: &Value, path: &str| -> Result<Value, DefinitionError> {
        match v {
            Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(v.clone()),
            other => err(
                path,
                format!(
                    "expected a string, number or boolean, got {}",
                    describe_value(other)
                ),
            ),
        }
    };
    let string = |v: &Value| -> Result<String, DefinitionError> {
        match v {
            Value::String(s) => Ok(s.clone()),
            other => err(
                &value_path,
                format!("expected a string, got {}", describe_value(other)),
            ),
        }
    };
    let semver = |cmp: SemverOp| -> Result<Op, DefinitionError> {
        let text = string(value)?;
        match parse_semver(&text) {
            Some(v) => Ok(Op::Semver(cmp, v)),
            None => err(
                &value_path,
                format!("{} is not a semantic version", Value::String(text.clone())),
            ),
        }
    };
    let op = match op_name {
        "equals" => Op::Equals(scalar(value, &value_path)?),
        "not_equals" => Op::NotEquals(scalar(value, &value_path)?),
        "in" => match value {
            Value::Array(items) if !items.is_empty() => Op::In(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| scalar(v, &format!("{value_path}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Array(_) => return err(value_path, "must not be empty"),
            other => {
                return err(
                    value_path,
                    format!("expected a list, got {}", describe_value(other)),
                );
            }
        },
        "starts_with" => Op::StartsWith(string(value)?),
        "ends_with" => Op::EndsWith(string(value)?),
        "semver_gt" => semver(SemverOp::Gt)?,
        "semver_ge" => semver(SemverOp::Ge)?,
        "semver_lt" => semver(SemverOp::Lt)?,
        "semver_le" => semver(SemverOp::Le)?,
        "semver_eq" => semver(SemverOp::Eq)?,
        other => {
            return err(
                op_path,
                format!(
                    "unknown operator {} (expected one of {OPS})",
                    Value::String(other.to_owned())
                ),
            );
        }
    };
    Ok(Condition { attribute, op })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<FlagDefinition, String> {
        FlagDefinition::parse(s.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn full_definition() {
        let def = parse(
            r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off",
                "targeting":[{"if":[{"attribute":"email","op":"ends_with","value":"@acme.com"},
                                    {"attribute":"app","op":"semver_ge","value":"v2.1"}],"variant":"on"}],
                "rollout":[{"variant":"on","weight":30},{"variant":"off","weight":70}],
                "metadata":{"owner":"team-a","ticket":12,"beta":true}}"#,
        )
        .unwrap();
        assert_eq!(def.state, FlagState::Enabled);
        assert_eq!(def.variant("on"), Some(&FlagValue::Boolean(true)));
        assert_eq!(def.targeting[0].conditions.len(), 2);
        assert_eq!(
            def.targeting[0].conditions[1].op,
            Op::Semver(SemverOp::Ge, semver::Version::new(2, 1, 0))
        );
        assert_eq!(def.total_weight(), 100);
        assert_eq!(def.metadata.len(), 3);
        assert_eq!(def.value_type(), "boolean");
    }

    #[test]
    fn numbers_promote_to_float() {
        let def = parse(r#"{"state":"ENABLED","variants":{"a":1,"b":1.5},"defaultVariant":"a"}"#)
            .unwrap();
        assert_eq!(def.variant("a"), Some(&FlagValue::Float(1.0)));
        let def =
            parse(r#"{"state":"ENABLED","variants":{"a":1,"b":2},"defaultVariant":"a"}"#).unwrap();
        assert_eq!(def.variant("b"), Some(&FlagValue::Integer(2)));
        let def =
            parse(r#"{"state":"ENABLED","variants":{"a":{"x":1},"b":[1]},"defaultVariant":"a"}"#)
                .unwrap();
        assert_eq!(
            def.variant("a"),
            Some(&FlagValue::Object(r#"{"x":1}"#.into()))
        );
    }

    #[test]
    fn precise_errors() {
        let cases = [
            ("[]", "expected a JSON object, got array"),
            (
                "{",
                "invalid JSON: EOF while parsing an object at line 1 column 1",
            ),
            (
                r#"{"state":"ENABLED"}"#,
                "variants: required field is missing",
            ),
            (
                r#"{"state":"on","variants":{"a":1},"defaultVariant":"a"}"#,
                r#"state: expected "ENABLED" or "DISABLED", got string "on""#,
            ),
            (
                r#"{"state":"ENABLED","variants":{"a":1},"defaultvariant":"a"}"#,
                r#"unknown field "defaultvariant" (expected one of state, variants, defaultVariant, targeting, rollout, metadata)"#,
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true,"off":"no"},"defaultVariant":"on"}"#,
                r#"variants.on: expected a string like variant off, got boolean true"#,
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"maybe"}"#,
                r#"defaultVariant: "maybe" is not one of the variants (off, on)"#,
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on",
                   "targeting":[{"if":[{"attribute":"a","op":"contains","value":"x"}],"variant":"on"}]}"#,
                r#"targeting[0].if[0].op: unknown operator "contains" (expected one of equals, not_equals, in, starts_with, ends_with, semver_gt, semver_ge, semver_lt, semver_le, semver_eq)"#,
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on",
                   "targeting":[{"if":[{"attribute":"v","op":"semver_gt","value":"abc"}],"variant":"on"}]}"#,
                r#"targeting[0].if[0].value: "abc" is not a semantic version"#,
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on",
                   "targeting":[{"if":[],"variant":"on"}]}"#,
                "targeting[0].if: must have at least one condition",
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on",
                   "rollout":[{"variant":"on","weight":-1}]}"#,
                "rollout[0].weight: expected a non-negative integer, got number -1",
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on",
                   "rollout":[{"variant":"on","weight":0}]}"#,
                "rollout: weights must not all be 0",
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on",
                   "rollout":[{"variant":"off","weight":1}]}"#,
                r#"rollout[0].variant: "off" is not one of the variants (on)"#,
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","metadata":{"x":null}}"#,
                "metadata.x: expected a boolean, string or number, got null",
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":null},"defaultVariant":"on"}"#,
                "variants.on: expected a boolean, string, number, object or array, got null",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input).unwrap_err(), expected, "input: {input}");
        }
    }

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
