//! The quick way to read a valid [`FlagDefinition`]: typed and borrowing, straight from
//! the bytes, without building a `serde_json::Value` tree of the whole document first
//! (allocating every key and string, then dropping them), which was two thirds of a
//! `flag-schema` validation.
//!
//! It knows only the accepting path: on anything it does not expect (an escaped
//! name, a duplicate field, `null` where a list belongs, any invalid part) it gives up
//! with `None`, and `parse.rs` reads the document again, with its error messages. So
//! it must accept nothing `parse.rs` rejects, and give what `parse.rs` gives for what
//! it accepts; the tests compare the two on every definition they use and on
//! variations of them.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Number, Value};

use super::parse::Kind;
use super::{Condition, FlagDefinition, FlagState, Op, Rule, SemverOp, Split, parse_semver};
use crate::{FlagValue, MetadataValue};

/// `T` read from a JSON object only: a derived `Deserialize` would also fill a
/// struct from a list of its fields in order, which `parse.rs` rejects.
struct Obj<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Only<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Only<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Only(PhantomData)).map(Obj)
    }
}

/// An optional field that must hold a `T` when present (`null` too is read as
/// a `T`, and fails, where `Option` alone would take it for absence).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc<'a> {
    state: &'a str,
    #[serde(borrow)]
    variants: BTreeMap<&'a str, &'a RawValue>,
    #[serde(rename = "defaultVariant")]
    default_variant: &'a str,
    #[serde(default, borrow, deserialize_with = "present")]
    targeting: Option<Vec<Obj<RawRule<'a>>>>,
    #[serde(default, borrow, deserialize_with = "present")]
    rollout: Option<Vec<Obj<RawSplit<'a>>>>,
    #[serde(default, borrow, deserialize_with = "present")]
    metadata: Option<BTreeMap<&'a str, &'a RawValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule<'a> {
    #[serde(rename = "if", borrow)]
    conditions: Vec<Obj<RawCondition<'a>>>,
    variant: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition<'a> {
    attribute: &'a str,
    op: &'a str,
    #[serde(borrow)]
    value: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit<'a> {
    variant: &'a str,
    weight: u32,
}

/// `bytes` as a definition, or `None` (then `parse.rs` decides, and explains).
pub(super) fn from_slice(bytes: &[u8]) -> Option<FlagDefinition> {
    let Obj(doc) = serde_json::from_slice::<Obj<Doc>>(bytes).ok()?;
    let state = match doc.state {
        "ENABLED" => FlagState::Enabled,
        "DISABLED" => FlagState::Disabled,
        _ => return None,
    };
    let variants = variants(&doc.variants)?;
    let variant = |name: &str| variants.contains_key(name).then(|| name.to_owned());
    let default_variant = variant(doc.default_variant)?;

    let rules = doc.targeting.unwrap_or_default();
    let mut targeting = Vec::with_capacity(rules.len());
    for Obj(r) in rules {
        if r.conditions.is_empty() {
            return None;
        }
        let conditions = r
            .conditions
            .iter()
            .map(|Obj(c)| condition(c))
            .collect::<Option<Vec<_>>>()?;
        targeting.push(Rule {
            conditions,
            variant: variant(r.variant)?,
        });
    }

    let mut rollout = Vec::new();
    if let Some(splits) = doc.rollout {
        if splits.is_empty() || splits.iter().all(|Obj(s)| s.weight == 0) {
            return None;
        }
        rollout.reserve_exact(splits.len());
        for Obj(s) in splits {
            rollout.push(Split {
                variant: variant(s.variant)?,
                weight: s.weight,
            });
        }
    }

    let meta = doc.metadata.unwrap_or_default();
    let mut metadata = Vec::with_capacity(meta.len());
    for (key, v) in meta {
        let value = match scalar(v)? {
            Value::Bool(b) => MetadataValue::Boolean(b),
            Value::String(s) => MetadataValue::Text(s),
            Value::Number(n) => MetadataValue::Number(n.as_f64()?),
            _ => return None,
        };
        metadata.push((key.to_owned(), value));
    }

    Some(FlagDefinition {
        state,
        variants,
        default_variant,
        targeting,
        rollout,
        metadata,
    })
}

/// What kind of JSON value `raw` is, from its first character.
fn kind(raw: &RawValue) -> Option<Kind> {
    match raw.get().as_bytes().first()? {
        b't' | b'f' => Some(Kind::Bool),
        b'"' => Some(Kind::Text),
        b'-' | b'0'..=b'9' => Some(Kind::Number),
        b'{' | b'[' => Some(Kind::Object),
        _ => None,
    }
}

fn variants(raw: &BTreeMap<&str, &RawValue>) -> Option<BTreeMap<String, FlagValue>> {
    let first = kind(raw.values().next()?)?;
    let mut any_float = false;
    for (name, v) in raw {
        if name.is_empty() || kind(v)? != first {
            return None;
        }
    }
    let mut numbers = Vec::new();
    if first == Kind::Number {
        for v in raw.values() {
            let n: Number = serde_json::from_str(v.get()).ok()?;
            any_float |= n.as_i64().is_none();
            numbers.push(n);
        }
    }
    let mut numbers = numbers.into_iter();
    raw.iter()
        .map(|(name, v)| {
            let value = match first {
                Kind::Bool => FlagValue::Boolean(serde_json::from_str(v.get()).ok()?),
                Kind::Text => FlagValue::Text(serde_json::from_str(v.get()).ok()?),
                Kind::Number => {
                    let n = numbers.next()?;
                    match n.as_i64() {
                        Some(i) if !any_float => FlagValue::Integer(i),
                        _ => FlagValue::Float(n.as_f64()?),
                    }
                }
                // The text `parse.rs` stores: the value, re-serialized compactly.
                Kind::Object => {
                    FlagValue::Object(serde_json::from_str::<Value>(v.get()).ok()?.to_string())
                }
            };
            Some(((*name).to_owned(), value))
        })
        .collect()
}

/// `raw` as a string, number or boolean value.
fn scalar(raw: &RawValue) -> Option<Value> {
    match kind(raw)? {
        Kind::Bool | Kind::Text | Kind::Number => serde_json::from_str(raw.get()).ok(),
        Kind::Object => None,
    }
}

fn condition(c: &RawCondition) -> Option<Condition> {
    if c.attribute.is_empty() {
        return None;
    }
    let string = || serde_json::from_str::<String>(c.value.get()).ok();
    let semver = |cmp: SemverOp| Some(Op::Semver(cmp, parse_semver(&string()?)?));
    let op = match c.op {
        "equals" => Op::Equals(scalar(c.value)?),
        "not_equals" => Op::NotEquals(scalar(c.value)?),
        "in" => {
            let items: Vec<&RawValue> = serde_json::from_str(c.value.get()).ok()?;
            if items.is_empty() {
                return None;
            }
            Op::In(items.into_iter().map(scalar).collect::<Option<_>>()?)
        }
        "starts_with" => Op::StartsWith(string()?),
        "ends_with" => Op::EndsWith(string()?),
        "semver_gt" => semver(SemverOp::Gt)?,
        "semver_ge" => semver(SemverOp::Ge)?,
        "semver_lt" => semver(SemverOp::Lt)?,
        "semver_le" => semver(SemverOp::Le)?,
        "semver_eq" => semver(SemverOp::Eq)?,
        _ => return None,
    };
    Some(Condition {
        attribute: c.attribute.to_owned(),
        op,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Definitions the quick read must accept, each the same as `parse.rs` reads it.
    const VALID: &[&str] = &[
        r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off"}"#,
        r#"{"state":"DISABLED","variants":{"a":1},"defaultVariant":"a"}"#,
        r#"{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"off",
            "targeting":[{"if":[{"attribute":"email","op":"ends_with","value":"@acme.com"},
                                {"attribute":"app","op":"semver_ge","value":"v2.1"}],"variant":"on"},
                         {"if":[{"attribute":"plan","op":"in","value":["pro",2,true]}],"variant":"off"},
                         {"if":[{"attribute":"n","op":"equals","value":1.5},
                                {"attribute":"s","op":"not_equals","value":"x"},
                                {"attribute":"u.name","op":"starts_with","value":"a\"b"},
                                {"attribute":"v","op":"semver_lt","value":"3.0.0-rc.1"},
                                {"attribute":"v","op":"semver_le","value":"3"},
                                {"attribute":"v","op":"semver_gt","value":"1.2.3+b"},
                                {"attribute":"v","op":"semver_eq","value":"1.2.3"}],"variant":"on"}],
            "rollout":[{"variant":"on","weight":30},{"variant":"off","weight":70}],
            "metadata":{"owner":"team-a","ticket":12,"beta":true,"ratio":0.5}}"#,
        r#"{"state":"ENABLED","variants":{"a":1,"b":1.5},"defaultVariant":"a"}"#,
        r#"{"state":"ENABLED","variants":{"a":1,"b":18446744073709551615},"defaultVariant":"b"}"#,
        r#"{"state":"ENABLED","variants":{"a":-1,"b":2},"defaultVariant":"a"}"#,
        r#"{"state":"ENABLED","variants":{"x":"é\u00e9\n","y":""},"defaultVariant":"y"}"#,
        r#"{"state":"ENABLED","variants":{"o":{"b":[1,{"z":1,"a":2}],"a":null},"p":[]},"defaultVariant":"o"}"#,
        r#" { "state" : "ENABLED" , "variants" : { "on" : true } , "defaultVariant" : "on" ,
              "rollout" : [ { "weight" : 0 , "variant" : "on" } , { "variant" : "on", "weight": 4294967295 } ] } "#,
        r#"{"state":"ENABLED","variants":{"on":true,"on":false},"defaultVariant":"on","metadata":{"k":1,"k":"two"}}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":[],"metadata":{}}"#,
    ];

    /// Documents the quick read must leave to `parse.rs` (which rejects most of
    /// them, and accepts a few the quick read does not handle).
    const OTHERS: &[&str] = &[
        r#"["ENABLED",{"on":true},"on"]"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","rollout":[["on",1]]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":[["on"]]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":[{"if":[["a","equals",1]],"variant":"on"}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":null}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","rollout":null}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","metadata":null}"#,
        r#"{"state":"ENABLED","state":"ENABLED","variants":{"on":true},"defaultVariant":"on"}"#,
        r#"{"state":"ENABL\u0045D","variants":{"on":true},"defaultVariant":"on"}"#,
        r#"{"state":"ENABLED","variants":{"o\u006e":true},"defaultVariant":"on"}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","rollout":[{"variant":"on","weight":-0}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","rollout":[{"variant":"on","weight":1.0}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","rollout":[{"variant":"on","weight":1e2}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","rollout":[{"variant":"on","weight":4294967296}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","rollout":[{"variant":"on","weight":0}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","rollout":[]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"off"}"#,
        r#"{"state":"ENABLED","variants":{"on":true,"n":1},"defaultVariant":"on"}"#,
        r#"{"state":"ENABLED","variants":{"on":null},"defaultVariant":"on"}"#,
        r#"{"state":"ENABLED","variants":{"":true},"defaultVariant":""}"#,
        r#"{"state":"ENABLED","variants":{},"defaultVariant":"on"}"#,
        r#"{"state":"enabled","variants":{"on":true},"defaultVariant":"on"}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","extra":1}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":[{"if":[],"variant":"on"}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":[{"if":[{"attribute":"","op":"equals","value":1}],"variant":"on"}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":[{"if":[{"attribute":"a","op":"equals","value":[1]}],"variant":"on"}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":[{"if":[{"attribute":"a","op":"in","value":[]}],"variant":"on"}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":[{"if":[{"attribute":"a","op":"in","value":[null]}],"variant":"on"}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":[{"if":[{"attribute":"a","op":"semver_ge","value":"one"}],"variant":"on"}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":[{"if":[{"attribute":"a","op":"starts_with","value":1}],"variant":"on"}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":[{"if":[{"attribute":"a","op":"matches","value":"x"}],"variant":"on"}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","targeting":[{"if":[{"attribute":"a","op":"equals","value":1}],"variant":"off"}]}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","metadata":{"a":[1]}}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on","metadata":{"a":null}}"#,
        r#"{"state":"ENABLED","variants":{"on":true},"defaultVariant":"on"} x"#,
        "{oops",
        "",
    ];

    /// The quick read never disagrees with `parse.rs`: it accepts only what
    /// `parse.rs` accepts, and reads it the same.
    fn agree(doc: &str) -> bool {
        let slow = super::super::parse::from_slice(doc.as_bytes());
        match from_slice(doc.as_bytes()) {
            Some(quick) => {
                assert_eq!(slow.as_ref().ok(), Some(&quick), "{doc}");
                true
            }
            None => false,
        }
    }

    #[test]
    fn valid_definitions_are_read_quickly_and_the_same() {
        for doc in VALID {
            assert!(agree(doc), "the quick read gave up on {doc}");
        }
    }

    #[test]
    fn everything_else_is_left_to_the_full_parse() {
        for doc in OTHERS {
            assert!(!agree(doc), "the quick read accepted {doc}");
        }
    }

    /// Every cut of every definition, and every definition with one byte
    /// replaced by a structural character: whatever the quick read accepts,
    /// `parse.rs` accepts and reads the same.
    #[test]
    fn variations_never_disagree() {
        for doc in VALID.iter().chain(OTHERS) {
            let bytes = doc.as_bytes();
            for cut in 0..bytes.len() {
                if let Ok(text) = std::str::from_utf8(&bytes[..cut]) {
                    agree(text);
                }
            }
            for i in 0..bytes.len() {
                for b in [b'{', b'}', b'[', b']', b'"', b',', b':', b'0', b'n', b' '] {
                    let mut changed = bytes.to_vec();
                    changed[i] = b;
                    if let Ok(text) = std::str::from_utf8(&changed) {
                        agree(text);
                    }
                }
            }
        }
    }
}
