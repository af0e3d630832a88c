//! Reading a [`FlagDefinition`] from JSON: every rule the `flag-schema` validator enforces,
//! each failure reported with its path (`targeting[0].if[1].op`).
//!
//! This runs on every validated write and on every cache miss of the `rollout` evaluator,
//! so the accepting path allocates only what the definition keeps: a path into the
//! document is an [`At`] chain on the stack, turned into text only for an error.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use super::{
    Condition, DefinitionError, FlagDefinition, FlagState, Op, Rule, SemverOp, Split,
    describe_value, parse_semver,
};
use crate::{FlagValue, MetadataValue};

/// Top-level fields of a definition.
const FIELDS: [&str; 6] = [
    "state",
    "variants",
    "defaultVariant",
    "targeting",
    "rollout",
    "metadata",
];

/// Condition operators, as listed in errors.
const OPS: &str = "equals, not_equals, in, starts_with, ends_with, semver_gt, semver_ge, \
                   semver_lt, semver_le, semver_eq";

/// Where a value sits in the document: `Root`, a field of a parent, or an element of a list.
#[derive(Clone, Copy)]
enum At<'a> {
    Root,
    Field(&'a At<'a>, &'a str),
    Index(&'a At<'a>, usize),
}

impl<'a> At<'a> {
    fn field(&'a self, name: &'a str) -> At<'a> {
        At::Field(self, name)
    }

    fn index(&'a self, i: usize) -> At<'a> {
        At::Index(self, i)
    }

    fn fail<T>(&self, message: impl Into<String>) -> Result<T, DefinitionError> {
        Err(DefinitionError {
            path: self.to_string(),
            message: message.into(),
        })
    }

    /// `v` (the value at `self`) as an object; else "expected {what}, got …".
    fn object<'v>(
        &self,
        v: &'v Value,
        what: &str,
    ) -> Result<&'v Map<String, Value>, DefinitionError> {
        match v {
            Value::Object(map) => Ok(map),
            other => self.fail(format!("expected {what}, got {}", describe_value(other))),
        }
    }

    /// `v` (the value at `self`) as a list; else "expected {what}, got …".
    fn array<'v>(&self, v: &'v Value, what: &str) -> Result<&'v [Value], DefinitionError> {
        match v {
            Value::Array(items) => Ok(items),
            other => self.fail(format!("expected {what}, got {}", describe_value(other))),
        }
    }

    /// The value of `field` in `fields` (the object at `self`), which must be present.
    fn required<'v>(
        &self,
        fields: &'v Map<String, Value>,
        field: &str,
    ) -> Result<&'v Value, DefinitionError> {
        match fields.get(field) {
            Some(v) => Ok(v),
            None => self.field(field).fail("required field is missing"),
        }
    }

    /// Rejects a field of `fields` (the object at `self`) that is not in `allowed`.
    fn only_fields(
        &self,
        fields: &Map<String, Value>,
        allowed: &[&str],
    ) -> Result<(), DefinitionError> {
        match fields.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(key) => self.fail(format!(
                "unknown field {} (expected {})",
                Value::String(key.clone()),
                allowed.join(", ")
            )),
            None => Ok(()),
        }
    }
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Root => Ok(()),
            At::Field(At::Root, name) => f.write_str(name),
            At::Field(parent, name) => write!(f, "{parent}.{name}"),
            At::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// [`FlagDefinition::parse`].
pub(super) fn from_slice(bytes: &[u8]) -> Result<FlagDefinition, DefinitionError> {
    match serde_json::from_slice(bytes) {
        Ok(value) => from_value(&value),
        Err(e) => At::Root.fail(format!("invalid JSON: {e}")),
    }
}

/// [`FlagDefinition::from_json`].
pub(super) fn from_value(value: &Value) -> Result<FlagDefinition, DefinitionError> {
    let root = At::Root;
    let doc = root.object(value, "a JSON object")?;
    if let Some(key) = doc.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return root.fail(format!(
            "unknown field {} (expected one of {})",
            Value::String(key.clone()),
            FIELDS.join(", ")
        ));
    }

    let state = match root.required(doc, "state")? {
        Value::String(s) if s == "ENABLED" => FlagState::Enabled,
        Value::String(s) if s == "DISABLED" => FlagState::Disabled,
        other => {
            return root.field("state").fail(format!(
                r#"expected "ENABLED" or "DISABLED", got {}"#,
                describe_value(other)
            ));
        }
    };

    let variants = variants(&root.field("variants"), root.required(doc, "variants")?)?;
    let variant_of = |at: &At, v: &Value| -> Result<String, DefinitionError> {
        match v {
            Value::String(name) if variants.contains_key(name) => Ok(name.clone()),
            Value::String(name) => {
                let names: Vec<&str> = variants.keys().map(String::as_str).collect();
                at.fail(format!(
                    "{} is not one of the variants ({})",
                    Value::String(name.clone()),
                    names.join(", ")
                ))
            }
            other => at.fail(format!(
                "expected a variant name, got {}",
                describe_value(other)
            )),
        }
    };

    let default_variant = variant_of(
        &root.field("defaultVariant"),
        root.required(doc, "defaultVariant")?,
    )?;

    let mut targeting = Vec::new();
    if let Some(rules) = doc.get("targeting") {
        let at = root.field("targeting");
        let rules = at.array(rules, "a list of rules")?;
        targeting.reserve_exact(rules.len());
        for (i, r) in rules.iter().enumerate() {
            targeting.push(rule(&at.index(i), r, &variant_of)?);
        }
    }

    let mut rollout = Vec::new();
    if let Some(splits) = doc.get("rollout") {
        let at = root.field("rollout");
        let splits = at.array(splits, "a list of {variant, weight}")?;
        if splits.is_empty() {
            return at.fail("must not be empty (omit it instead)");
        }
        rollout.reserve_exact(splits.len());
        let mut total = 0u64;
        for (i, split) in splits.iter().enumerate() {
            let at = at.index(i);
            let fields = at.object(split, "{variant, weight}")?;
            at.only_fields(fields, &["variant", "weight"])?;
            let variant = variant_of(&at.field("variant"), at.required(fields, "variant")?)?;
            let weight = match at.required(fields, "weight")? {
                Value::Number(n) if n.as_u64().is_some_and(|w| w <= u32::MAX as u64) => {
                    n.as_u64().unwrap_or_default() as u32
                }
                other => {
                    return at.field("weight").fail(format!(
                        "expected a non-negative integer, got {}",
                        describe_value(other)
                    ));
                }
            };
            total += u64::from(weight);
            rollout.push(Split { variant, weight });
        }
        if total == 0 {
            return at.fail("weights must not all be 0");
        }
    }

    let mut metadata = Vec::new();
    if let Some(meta) = doc.get("metadata") {
        let at = root.field("metadata");
        let meta = at.object(meta, "an object")?;
        metadata.reserve_exact(meta.len());
        for (key, v) in meta {
            let value = match v {
                Value::Bool(b) => MetadataValue::Boolean(*b),
                Value::String(s) => MetadataValue::Text(s.clone()),
                Value::Number(n) => MetadataValue::Number(n.as_f64().unwrap_or(f64::NAN)),
                other => {
                    return at.field(key).fail(format!(
                        "expected a boolean, string or number, got {}",
                        describe_value(other)
                    ));
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

/// `variants`: a non-empty object of name → value, all values of one kind.
/// The kinds of variant values, which must all agree (also `fast.rs`).
#[derive(PartialEq, Clone, Copy)]
pub(super) enum Kind {
    Bool,
    Text,
    Number,
    Object,
}

fn variants(at: &At, v: &Value) -> Result<BTreeMap<String, FlagValue>, DefinitionError> {
    let kind_name = |k: Kind| match k {
        Kind::Bool => "a boolean",
        Kind::Text => "a string",
        Kind::Number => "a number",
        Kind::Object => "an object or array",
    };

    let map = at.object(v, "an object of name → value")?;
    if map.is_empty() {
        return at.fail("must define at least one variant");
    }
    // Sorted by name whatever serde_json's map ordering, so messages are deterministic.
    let mut sorted: Vec<(&String, &Value)> = map.iter().collect();
    if !sorted.is_sorted_by_key(|(name, _)| *name) {
        sorted.sort_unstable_by_key(|(name, _)| *name);
    }
    let mut first: Option<(Kind, &str)> = None;
    let mut any_float = false;
    for &(name, value) in &sorted {
        if name.is_empty() {
            return at.fail("variant names must not be empty");
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
                return at
                    .field(name)
                    .fail("expected a boolean, string, number, object or array, got null");
            }
        };
        match first {
            None => first = Some((kind, name)),
            Some((k, other)) if k != kind => {
                return at.field(name).fail(format!(
                    "expected {} like variant {other}, got {}",
                    kind_name(k),
                    describe_value(value)
                ));
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

/// A targeting rule `{"if": [conditions], "variant": name}`.
fn rule(
    at: &At,
    rule: &Value,
    variant_of: &dyn Fn(&At, &Value) -> Result<String, DefinitionError>,
) -> Result<Rule, DefinitionError> {
    let fields = at.object(rule, r#"a rule {"if": [...], "variant": ...}"#)?;
    at.only_fields(fields, &["if", "variant"])?;
    let variant = variant_of(&at.field("variant"), at.required(fields, "variant")?)?;
    let if_at = at.field("if");
    let conditions = match at.required(fields, "if")? {
        Value::Array(c) if !c.is_empty() => c,
        Value::Array(_) => return if_at.fail("must have at least one condition"),
        other => {
            return if_at.fail(format!(
                "expected a list of conditions, got {}",
                describe_value(other)
            ));
        }
    };
    let conditions = conditions
        .iter()
        .enumerate()
        .map(|(i, c)| condition(&if_at.index(i), c))
        .collect::<Result<_, _>>()?;
    Ok(Rule {
        conditions,
        variant,
    })
}

/// A condition `{"attribute": name, "op": operator, "value": operand}`.
fn condition(at: &At, c: &Value) -> Result<Condition, DefinitionError> {
    let fields = at.object(c, "a condition {attribute, op, value}")?;
    at.only_fields(fields, &["attribute", "op", "value"])?;
    let attribute = match at.required(fields, "attribute")? {
        Value::String(s) if !s.is_empty() => s.clone(),
        other => {
            return at.field("attribute").fail(format!(
                "expected a non-empty attribute name, got {}",
                describe_value(other)
            ));
        }
    };
    let op_at = at.field("op");
    let op_name = match at.required(fields, "op")? {
        Value::String(s) => s.as_str(),
        other => {
            return op_at.fail(format!(
                "expected an operator name, got {}",
                describe_value(other)
            ));
        }
    };
    let value_at = at.field("value");
    let value = at.required(fields, "value")?;
    let scalar = |v: &Value, at: &At| -> Result<Value, DefinitionError> {
        match v {
            Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(v.clone()),
            other => at.fail(format!(
                "expected a string, number or boolean, got {}",
                describe_value(other)
            )),
        }
    };
    let string = || -> Result<&str, DefinitionError> {
        match value {
            Value::String(s) => Ok(s),
            other => value_at.fail(format!("expected a string, got {}", describe_value(other))),
        }
    };
    let semver = |cmp: SemverOp| -> Result<Op, DefinitionError> {
        let text = string()?;
        match parse_semver(text) {
            Some(v) => Ok(Op::Semver(cmp, v)),
            None => value_at.fail(format!(
                "{} is not a semantic version",
                Value::String(text.to_owned())
            )),
        }
    };
    let op = match op_name {
        "equals" => Op::Equals(scalar(value, &value_at)?),
        "not_equals" => Op::NotEquals(scalar(value, &value_at)?),
        "in" => match value {
            Value::Array(items) if !items.is_empty() => Op::In(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| scalar(v, &value_at.index(i)))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Array(_) => return value_at.fail("must not be empty"),
            other => {
                return value_at.fail(format!("expected a list, got {}", describe_value(other)));
            }
        },
        "starts_with" => Op::StartsWith(string()?.to_owned()),
        "ends_with" => Op::EndsWith(string()?.to_owned()),
        "semver_gt" => semver(SemverOp::Gt)?,
        "semver_ge" => semver(SemverOp::Ge)?,
        "semver_lt" => semver(SemverOp::Lt)?,
        "semver_le" => semver(SemverOp::Le)?,
        "semver_eq" => semver(SemverOp::Eq)?,
        other => {
            return op_at.fail(format!(
                "unknown operator {} (expected one of {OPS})",
                Value::String(other.to_owned())
            ));
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
    fn nested_paths() {
        let cases = [
            (
                r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"on",
                   "targeting":[{"if":[{"attribute":"a","op":"equals","value":1}],"variant":"on"},
                                {"if":[{"attribute":"a","op":"in","value":["x",null]}],"variant":"off"}]}"#,
                "targeting[1].if[0].value[1]: expected a string, number or boolean, got null",
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on",
                   "targeting":[{"if":[{"attribute":"a","op":"equals","value":1,"x":2}],"variant":"on"}]}"#,
                "targeting[0].if[0]: unknown field \"x\" (expected attribute, op, value)",
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on",
                   "targeting":[{"if":[{"op":"equals","value":1}],"variant":"on"}]}"#,
                "targeting[0].if[0].attribute: required field is missing",
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on",
                   "rollout":[{"variant":"on","weight":1},{"variant":"on"}]}"#,
                "rollout[1].weight: required field is missing",
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on",
                   "targeting":[{"if":[{"attribute":"v","op":"starts_with","value":3}],"variant":"on"}]}"#,
                "targeting[0].if[0].value: expected a string, got number 3",
            ),
            (
                r#"{"state":"ENABLED","variants":{"":true},"defaultVariant":""}"#,
                "variants: variant names must not be empty",
            ),
            (
                r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","metadata":{"a":1,"b":[]}}"#,
                "metadata.b: expected a boolean, string or number, got array",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input).unwrap_err(), expected, "input: {input}");
        }
    }
}
