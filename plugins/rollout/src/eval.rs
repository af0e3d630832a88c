//! Pure evaluation of a parsed flag definition: targeting rules, percentage split, reasons.
//! No store access here; see the crate root for how definitions are found and cached.

use std::borrow::Cow;

use flagstone_sdk::flags::{FlagDefinition, FlagState, Op, Rule, parse_semver};
use flagstone_sdk::{EvalContext, EvalError, Evaluation, Reason};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Evaluates `def` (the definition of flag `flag_key`) for `context`.
///
/// * `DISABLED` flags serve the default variant with reason `DISABLED`;
/// * the first targeting rule whose conditions all hold wins (`TARGETING_MATCH`);
/// * otherwise a `rollout` splits by [`bucket`] (`SPLIT`; needs a targeting key);
/// * otherwise the default variant: `DEFAULT`, or `STATIC` when the flag has neither
///   targeting nor rollout.
pub fn evaluate_definition(
    def: &FlagDefinition,
    flag_key: &str,
    context: &EvalContext,
) -> Result<Evaluation, EvalError> {
    if def.state == FlagState::Disabled {
        return serve(def, &def.default_variant, Reason::Disabled);
    }
    let targeting_key = context.targeting_key.as_deref().filter(|k| !k.is_empty());

    if def.targeting.is_empty() {
        check_attributes(context)?;
    } else {
        let attributes = Attributes::parse(context)?;
        if let Some(rule) = def
            .targeting
            .iter()
            .find(|r| rule_matches(r, &attributes, targeting_key))
        {
            return serve(def, &rule.variant, Reason::TargetingMatch);
        }
    }

    if !def.rollout.is_empty() {
        let key = targeting_key.ok_or_else(|| {
            EvalError::new(
                flagstone_sdk::ErrorCode::TargetingKeyMissing,
                format!("flag {flag_key} has a percentage rollout and needs a targeting key"),
            )
        })?;
        let point = bucket(flag_key, key, def.total_weight());
        let mut upper = 0u64;
        for split in &def.rollout {
            upper += u64::from(split.weight);
            if point < upper {
                return serve(def, &split.variant, Reason::Split);
            }
        }
        // Unreachable: point < total weight. Serve the default rather than panic.
        return serve(def, &def.default_variant, Reason::Default);
    }

    let reason = if def.targeting.is_empty() {
        Reason::Static
    } else {
        Reason::Default
    };
    serve(def, &def.default_variant, reason)
}

/// The rollout position of `targeting_key` for flag `flag_key`: a number in
/// `0..total_weight`, uniform and deterministic.
///
/// `h = murmur3_x86_32(flag_key ++ targeting_key, seed 0)`, position `= h × total / 2³²`.
pub fn bucket(flag_key: &str, targeting_key: &str, total_weight: u64) -> u64 {
    // One contiguous buffer: hashing a `Read::chain` costs more than the copy.
    let mut input = Vec::with_capacity(flag_key.len() + targeting_key.len());
    input.extend_from_slice(flag_key.as_bytes());
    input.extend_from_slice(targeting_key.as_bytes());
    let hash = murmur3::murmur3_32(&mut input.as_slice(), 0).unwrap_or_default();
    (u64::from(hash) * total_weight) >> 32
}

/// Builds the evaluation for variant `name` (validated to exist by the parser).
fn serve(def: &FlagDefinition, name: &str, reason: Reason) -> Result<Evaluation, EvalError> {
    let value = def.variant(name).cloned().ok_or_else(|| {
        EvalError::general(format!("variant {name} is missing from the definition"))
    })?;
    Ok(Evaluation {
        value,
        variant: Some(name.to_owned()),
        reason,
        metadata: def.metadata.clone(),
    })
}

/// Checks that the attributes are a JSON object without building it (cheap: no allocation
/// for the common `{}` and small contexts).
fn check_attributes(context: &EvalContext) -> Result<(), EvalError> {
    let text = context.attributes.trim_start();
    if text.is_empty()
        || (text.starts_with('{') && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
    {
        return Ok(());
    }
    // Slow path, only for bad input: produce the same message as a full parse.
    context.attribute_map().map(drop)
}

/// The context attributes for rule matching. Usually borrowed: each top-level name maps to
/// its JSON text, and only the values a rule looks at are parsed. Names with escapes fall
/// back to a fully parsed object.
enum Attributes<'a> {
    Borrowed(Members<'a>),
    Owned(Map<String, Value>),
}

/// The members of a JSON object as borrowed (name, value text) pairs, in document order.
/// A context has a handful of attributes: a linear search beats building a map for them.
struct Members<'a>(Vec<(&'a str, &'a RawValue)>);

impl<'a> Members<'a> {
    /// The value text of `name`; the last one if the name repeats (as a parsed map keeps).
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Members<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Members<'a>, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(member) = map.next_entry::<&'de str, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

impl<'a> Attributes<'a> {
    fn parse(context: &'a EvalContext) -> Result<Self, EvalError> {
        match serde_json::from_str::<Members>(&context.attributes) {
            Ok(members) => Ok(Attributes::Borrowed(members)),
            // Escaped names, not an object, not JSON, empty: the SDK's parse decides.
            Err(_) => context.attribute_map().map(Attributes::Owned),
        }
    }

    fn top(&self, name: &str) -> Option<Cow<'_, Value>> {
        match self {
            Attributes::Borrowed(members) => members
                .get(name)
                .and_then(|raw| serde_json::from_str(raw.get()).ok())
                .map(Cow::Owned),
            Attributes::Owned(map) => map.get(name).map(Cow::Borrowed),
        }
    }

    /// The top-level attribute `name` when it is a JSON string without escapes, borrowed
    /// from the context (the string operators need nothing else).
    fn borrowed_str(&self, name: &str) -> Option<&'a str> {
        match self {
            Attributes::Borrowed(members) => serde_json::from_str(members.get(name)?.get()).ok(),
            Attributes::Owned(_) => None,
        }
    }
}

fn rule_matches(rule: &Rule, attributes: &Attributes, targeting_key: Option<&str>) -> bool {
    rule.conditions.iter().all(|c| {
        if let Some(holds) = str_op_holds(&c.op, || attributes.borrowed_str(&c.attribute)) {
            return holds;
        }
        lookup(attributes, &c.attribute, targeting_key).is_some_and(|attr| op_holds(&c.op, &attr))
    })
}

/// A top-level attribute, else `targetingKey` (the request's targeting key), else a dotted
/// path into nested objects (`user.plan`).
fn lookup<'a>(
    attributes: &'a Attributes,
    name: &str,
    targeting_key: Option<&str>,
) -> Option<Cow<'a, Value>> {
    if let Some(v) = attributes.top(name) {
        return Some(v);
    }
    if name == "targetingKey" {
        return targeting_key.map(|k| Cow::Owned(Value::String(k.to_owned())));
    }
    let (first, rest) = name.split_once('.')?;
    let first = attributes.top(first)?;
    let mut current = first.as_ref();
    for part in rest.split('.') {
        current = current.as_object()?.get(part)?;
    }
    Some(Cow::Owned(current.clone()))
}

/// Whether a string operator holds for the string attribute that `attr` yields; `None`
/// for the operators that compare JSON values (`attr` is then not called) and when `attr`
/// yields no string.
fn str_op_holds<'s>(op: &Op, attr: impl FnOnce() -> Option<&'s str>) -> Option<bool> {
    Some(match op {
        Op::StartsWith(prefix) => attr()?.starts_with(prefix.as_str()),
        Op::EndsWith(suffix) => attr()?.ends_with(suffix.as_str()),
        Op::Semver(cmp, version) => {
            parse_semver(attr()?).is_some_and(|v| cmp.holds(v.cmp_precedence(version)))
        }
        Op::Equals(_) | Op::NotEquals(_) | Op::In(_) => return None,
    })
}

/// Whether condition operator `op` holds for a present attribute value.
pub fn op_holds(op: &Op, attr: &Value) -> bool {
    match op {
        Op::Equals(v) => json_eq(attr, v),
        Op::NotEquals(v) => !json_eq(attr, v),
        Op::In(vs) => vs.iter().any(|v| json_eq(attr, v)),
        Op::StartsWith(_) | Op::EndsWith(_) | Op::Semver(..) => {
            str_op_holds(op, || attr.as_str()).unwrap_or(false)
        }
    }
}

/// JSON equality where numbers compare by value (`1` equals `1.0`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flagstone_sdk::flags::SemverOp;
    use flagstone_sdk::{ErrorCode, FlagValue};
    use serde_json::json;

    fn def(doc: Value) -> FlagDefinition {
        FlagDefinition::from_json(&doc).unwrap()
    }

    fn ctx(key: Option<&str>, attributes: Value) -> EvalContext {
        EvalContext::new(key, attributes)
    }

    fn rollout_def(on: u32, off: u32) -> FlagDefinition {
        def(json!({
            "state": "ENABLED",
            "variants": {"on": true, "off": false},
            "defaultVariant": "off",
            "rollout": [{"variant": "on", "weight": on}, {"variant": "off", "weight": off}],
        }))
    }

    #[test]
    fn murmur3_is_the_x86_32_variant_with_seed_0() {
        // Reference values of MurmurHash3_x86_32 with seed 0.
        let hash = |s: &str| murmur3::murmur3_32(&mut s.as_bytes(), 0).unwrap();
        assert_eq!(hash(""), 0);
        assert_eq!(hash("hello"), 0x248b_fa47);
        assert_eq!(
            hash("The quick brown fox jumps over the lazy dog"),
            0x2e4f_f723
        );
        // Hashing the two parts equals hashing the concatenation.
        assert_eq!(
            bucket("new_ui", "user-1", 1 << 32),
            u64::from(hash("new_uiuser-1"))
        );
    }

    #[test]
    fn thirty_percent_rollout_lands_within_two_percent() {
        let def = rollout_def(30, 70);
        let on = (0..10_000)
            .filter(|i| {
                let e = evaluate_definition(
                    &def,
                    "new_ui",
                    &ctx(Some(&format!("user-{i}")), json!({})),
                )
                .unwrap();
                assert_eq!(e.reason, Reason::Split);
                e.value == FlagValue::Boolean(true)
            })
            .count();
        assert!(
            (2_800..=3_200).contains(&on),
            "{on} of 10000 got the 30% variant"
        );
    }

    #[test]
    fn same_key_same_variant_and_flags_are_independent() {
        let def = rollout_def(50, 50);
        for i in 0..200 {
            let c = ctx(Some(&format!("user-{i}")), json!({}));
            let first = evaluate_definition(&def, "a", &c).unwrap();
            for _ in 0..3 {
                assert_eq!(evaluate_definition(&def, "a", &c).unwrap(), first);
            }
        }
        // The flag key is part of the hash: two flags do not split users identically.
        let differ = (0..200)
            .filter(|i| {
                let c = ctx(Some(&format!("user-{i}")), json!({}));
                evaluate_definition(&def, "a", &c).unwrap().variant
                    != evaluate_definition(&def, "b", &c).unwrap().variant
            })
            .count();
        assert!(differ > 50, "{differ}");
    }

    #[test]
    fn zero_and_full_weights() {
        for i in 0..100 {
            let c = ctx(Some(&format!("u{i}")), json!({}));
            let all_on = evaluate_definition(&rollout_def(100, 0), "f", &c).unwrap();
            assert_eq!(all_on.variant.as_deref(), Some("on"));
            let all_off = evaluate_definition(&rollout_def(0, 1), "f", &c).unwrap();
            assert_eq!(all_off.variant.as_deref(), Some("off"));
        }
    }

    #[test]
    fn reasons() {
        let static_def = def(
            json!({"state": "ENABLED", "variants": {"a": "x", "b": "y"}, "defaultVariant": "b"}),
        );
        let e = evaluate_definition(&static_def, "f", &ctx(None, json!({}))).unwrap();
        assert_eq!(
            (e.reason, e.value, e.variant),
            (
                Reason::Static,
                FlagValue::Text("y".into()),
                Some("b".into())
            )
        );

        let targeted = def(json!({
            "state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
            "targeting": [{"if": [{"attribute": "email", "op": "ends_with", "value": "@acme.com"}], "variant": "on"}],
            "metadata": {"owner": "team-a"},
        }));
        let hit = evaluate_definition(&targeted, "f", &ctx(None, json!({"email": "a@acme.com"})))
            .unwrap();
        assert_eq!(hit.reason, Reason::TargetingMatch);
        assert_eq!(hit.value, FlagValue::Boolean(true));
        assert_eq!(hit.metadata, vec![("owner".to_owned(), "team-a".into())]);
        let miss = evaluate_definition(
            &targeted,
            "f",
            &ctx(None, json!({"email": "a@example.com"})),
        )
        .unwrap();
        assert_eq!(
            (miss.reason, miss.value),
            (Reason::Default, FlagValue::Boolean(false))
        );
        let absent = evaluate_definition(&targeted, "f", &ctx(None, json!({}))).unwrap();
        assert_eq!(absent.reason, Reason::Default);

        let split =
            evaluate_definition(&rollout_def(1, 1), "f", &ctx(Some("u"), json!({}))).unwrap();
        assert_eq!(split.reason, Reason::Split);

        let mut disabled = targeted.clone();
        disabled.state = FlagState::Disabled;
        let e = evaluate_definition(&disabled, "f", &ctx(None, json!({"email": "a@acme.com"})))
            .unwrap();
        assert_eq!(
            (e.reason, e.variant.as_deref()),
            (Reason::Disabled, Some("off"))
        );
        // A disabled flag does not need a targeting key even with a rollout.
        let mut disabled = rollout_def(1, 1);
        disabled.state = FlagState::Disabled;
        assert_eq!(
            evaluate_definition(&disabled, "f", &ctx(None, json!({})))
                .unwrap()
                .reason,
            Reason::Disabled
        );
    }

    #[test]
    fn rules_in_order_conditions_anded_then_rollout() {
        let d = def(json!({
            "state": "ENABLED", "variants": {"a": 1, "b": 2, "c": 3}, "defaultVariant": "c",
            "targeting": [
                {"if": [{"attribute": "country", "op": "in", "value": ["NL", "BE"]},
                        {"attribute": "plan", "op": "equals", "value": "pro"}], "variant": "a"},
                {"if": [{"attribute": "country", "op": "equals", "value": "NL"}], "variant": "b"},
                {"if": [{"attribute": "targetingKey", "op": "starts_with", "value": "admin-"}], "variant": "a"},
            ],
            "rollout": [{"variant": "c", "weight": 1}],
        }));
        let v = |key: Option<&str>, attrs: Value| {
            let e = evaluate_definition(&d, "f", &ctx(key, attrs)).unwrap();
            (e.variant.unwrap(), e.reason)
        };
        assert_eq!(
            v(None, json!({"country": "NL", "plan": "pro"})),
            ("a".into(), Reason::TargetingMatch)
        );
        assert_eq!(
            v(None, json!({"country": "NL", "plan": "free"})),
            ("b".into(), Reason::TargetingMatch)
        );
        assert_eq!(
            v(Some("admin-1"), json!({"country": "DE"})),
            ("a".into(), Reason::TargetingMatch)
        );
        assert_eq!(
            v(Some("user-1"), json!({"country": "DE"})),
            ("c".into(), Reason::Split)
        );
        assert_eq!(
            evaluate_definition(&d, "f", &ctx(Some("x"), json!({})))
                .unwrap()
                .value,
            FlagValue::Integer(3)
        );
    }

    #[test]
    fn attributes_escaped_nested_and_invalid() {
        let d = def(json!({
            "state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "b",
            "targeting": [
                {"if": [{"attribute": "user.plan", "op": "equals", "value": "pro"}], "variant": "a"},
                {"if": [{"attribute": "tier", "op": "equals", "value": 3}], "variant": "a"},
            ],
        }));
        let variant = |attributes: &str| {
            let c = EvalContext {
                targeting_key: None,
                attributes: attributes.into(),
            };
            evaluate_definition(&d, "f", &c).map(|e| e.variant.unwrap())
        };
        assert_eq!(variant(r#"{"user":{"plan":"pro"}}"#).unwrap(), "a");
        assert_eq!(variant(r#"{"user":{"plan":"free"}}"#).unwrap(), "b");
        // An escaped name is the same name.
        assert_eq!(variant(r#"{"ti\u0065r":3.0}"#).unwrap(), "a");
        assert_eq!(variant(r#"{"tier":"3"}"#).unwrap(), "b");
        for bad in ["[1]", "{", "{} x", "nope"] {
            let e = variant(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidContext, "{bad}");
        }
    }

    #[test]
    fn string_operators_on_top_level_attributes() {
        let d = def(json!({
            "state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "b",
            "targeting": [{"if": [
                {"attribute": "email", "op": "ends_with", "value": "@acme.com"},
                {"attribute": "app", "op": "semver_ge", "value": "2.0.0"},
            ], "variant": "a"}],
        }));
        let variant = |attributes: &str| {
            let c = EvalContext {
                targeting_key: None,
                attributes: attributes.into(),
            };
            evaluate_definition(&d, "f", &c).unwrap().variant.unwrap()
        };
        assert_eq!(variant(r#"{"email":"x@acme.com","app":"2.1.0"}"#), "a");
        assert_eq!(variant(r#"{"email":"x@acme.com","app":"1.9.9"}"#), "b");
        // An escaped value is the same string.
        assert_eq!(variant(r#"{"email":"x\u0040acme.com","app":"2.1.0"}"#), "a");
        // A repeated name: the last one counts, as in a parsed object.
        assert_eq!(
            variant(r#"{"email":"x@other.com","email":"x@acme.com","app":"2.1.0"}"#),
            "a"
        );
        assert_eq!(
            variant(r#"{"email":"x@acme.com","app":"2.1.0","app":"1.9.9"}"#),
            "b"
        );
        // Not a string, or absent: the operator does not hold.
        assert_eq!(variant(r#"{"email":7,"app":"2.1.0"}"#), "b");
        assert_eq!(variant(r#"{"app":"2.1.0"}"#), "b");
    }

    #[test]
    fn operators() {
        let holds = |op: Op, attr: Value| op_holds(&op, &attr);
        assert!(holds(Op::Equals(json!(1)), json!(1.0)));
        assert!(holds(Op::Equals(json!(true)), json!(true)));
        assert!(!holds(Op::Equals(json!("1")), json!(1)));
        assert!(holds(Op::NotEquals(json!("NL")), json!("DE")));
        assert!(!holds(Op::NotEquals(json!("NL")), json!("NL")));
        assert!(holds(Op::In(vec![json!("a"), json!(2)]), json!(2)));
        assert!(!holds(Op::In(vec![json!("a")]), json!("b")));
        assert!(holds(Op::StartsWith("ad".into()), json!("admin")));
        assert!(!holds(Op::StartsWith("ad".into()), json!(1)));
        assert!(holds(Op::EndsWith("@acme.com".into()), json!("x@acme.com")));
        assert!(!holds(Op::EndsWith("@acme.com".into()), json!("x@acme.co")));
    }

    #[test]
    fn semver_operators() {
        let v = |s: &str| parse_semver(s).unwrap();
        let holds = |cmp: SemverOp, bound: &str, attr: &str| {
            op_holds(&Op::Semver(cmp, v(bound)), &json!(attr))
        };
        assert!(holds(SemverOp::Gt, "2.0.0", "2.0.1"));
        assert!(!holds(SemverOp::Gt, "2.0.0", "2.0.0"));
        assert!(holds(SemverOp::Ge, "2.0.0", "2.0.0"));
        assert!(holds(SemverOp::Ge, "2.0", "v10.0.0")); // numeric, not lexicographic
        assert!(holds(SemverOp::Lt, "2.0.0", "2.0.0-rc.1")); // pre-release sorts first
        assert!(!holds(SemverOp::Lt, "2.0.0", "2.0.0"));
        assert!(holds(SemverOp::Le, "1.4.2", "1.4.2"));
        assert!(!holds(SemverOp::Le, "1.4.2", "1.10.0"));
        assert!(holds(SemverOp::Eq, "1.2.3", "v1.2.3+build.7")); // build metadata ignored
        assert!(!holds(SemverOp::Eq, "1.2.3", "1.2.4"));
        assert!(!holds(SemverOp::Gt, "1.0.0", "not-a-version"));
        assert!(!op_holds(&Op::Semver(SemverOp::Gt, v("1.0.0")), &json!(2)));

        let d = def(json!({
            "state": "ENABLED", "variants": {"new": true, "old": false}, "defaultVariant": "old",
            "targeting": [{"if": [{"attribute": "app.version", "op": "semver_ge", "value": "3.2.0"}], "variant": "new"}],
        }));
        let e = evaluate_definition(&d, "f", &ctx(None, json!({"app": {"version": "3.10.1"}})))
            .unwrap();
        assert_eq!(e.variant.as_deref(), Some("new"));
    }

    #[test]
    fn context_errors() {
        let d = rollout_def(30, 70);
        let e = evaluate_definition(&d, "f", &ctx(None, json!({}))).unwrap_err();
        assert_eq!(e.code, ErrorCode::TargetingKeyMissing);
        let e = evaluate_definition(&d, "f", &ctx(Some(""), json!({}))).unwrap_err();
        assert_eq!(e.code, ErrorCode::TargetingKeyMissing);

        for bad in ["[1]", "\"x\"", "{", "nope", "{} x"] {
            let c = EvalContext {
                targeting_key: Some("u".into()),
                attributes: bad.into(),
            };
            let e = evaluate_definition(&d, "f", &c).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidContext, "{bad}");
        }
        // Blank attributes count as an empty object.
        let c = EvalContext {
            targeting_key: Some("u".into()),
            attributes: " ".into(),
        };
        assert!(evaluate_definition(&d, "f", &c).is_ok());
    }

    #[test]
    fn value_types() {
        let d = def(
            json!({"state": "ENABLED", "variants": {"a": {"color": "blue"}}, "defaultVariant": "a"}),
        );
        let e = evaluate_definition(&d, "f", &ctx(None, json!({}))).unwrap();
        assert_eq!(e.value, FlagValue::Object(r#"{"color":"blue"}"#.into()));
        let d = def(
            json!({"state": "ENABLED", "variants": {"a": 0.25, "b": 1}, "defaultVariant": "a"}),
        );
        assert_eq!(
            evaluate_definition(&d, "f", &ctx(None, json!({})))
                .unwrap()
                .value,
            FlagValue::Float(0.25)
        );
    }
}
