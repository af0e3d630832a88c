//! Flag evaluation on a node, from local state: which flags exist, asking the
//! evaluator plugins, the built-in answer for the seed's plain
//! `feature_flags` booleans, and the bulk ETag.
//!
//! Flags are the keys under `flags/` (rich definitions, answered by
//! evaluator plugins such as `rollout`) and the members of the
//! `feature_flags` JSON object (plain booleans; an evaluator may answer
//! them, otherwise flagstone does, with reason STATIC).

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};

use serde_json::Value;

use crate::plugins::PluginHost;
use crate::plugins::types::{
    ErrorCode, EvalContext, Evaluation, EvaluationError, FlagValue, Reason,
};
use crate::raft::KvReader;

/// Prefix of rich flag definitions.
pub const FLAGS_PREFIX: &str = "flags/";
/// Key of the plain boolean flags object.
pub const FEATURE_FLAGS: &str = "feature_flags";

/// Whether a change to `key` can change flag evaluations.
pub fn is_flag_key(key: &str) -> bool {
    key == FEATURE_FLAGS || key.starts_with(FLAGS_PREFIX)
}

fn error(code: ErrorCode, message: impl Into<String>) -> EvaluationError {
    EvaluationError {
        code,
        message: message.into(),
    }
}

/// Evaluates one flag: evaluator plugins first, then the built-in answer for
/// a plain `feature_flags` boolean.
pub fn evaluate(
    reader: &KvReader,
    plugins: Option<&PluginHost>,
    key: &str,
    ctx: &EvalContext,
) -> Result<Evaluation, EvaluationError> {
    if let Some(host) = plugins {
        match host.evaluate(key, ctx) {
            Ok((_, e)) => return Ok(e),
            Err(e) if e.code != ErrorCode::FlagNotFound => return Err(e),
            Err(_) => {}
        }
    }
    builtin(reader, key)
}

/// The seed's shape: `feature_flags` = `{"name": bool, …}`.
fn builtin(reader: &KvReader, key: &str) -> Result<Evaluation, EvaluationError> {
    let not_found = || error(ErrorCode::FlagNotFound, format!("flag {key:?} not found"));
    let record = reader
        .get(FEATURE_FLAGS)
        .map_err(|e| error(ErrorCode::General, e.to_string()))?
        .ok_or_else(not_found)?;
    let flags: Value = serde_json::from_slice(&record.value).map_err(|e| {
        error(
            ErrorCode::ParseError,
            format!("feature_flags is not JSON: {e}"),
        )
    })?;
    let Value::Object(map) = flags else {
        return Err(error(
            ErrorCode::ParseError,
            "feature_flags is not a JSON object",
        ));
    };
    match map.get(key) {
        None => Err(not_found()),
        Some(Value::Bool(b)) => Ok(Evaluation {
            value: FlagValue::Boolean(*b),
            variant: Some(b.to_string()),
            reason: Reason::Static,
            metadata: vec![],
        }),
        // Plain flags are booleans by definition: anything else is a type mismatch.
        Some(other) => Err(error(
            ErrorCode::TypeMismatch,
            format!("feature_flags.{key}: expected boolean, got {other}"),
        )),
    }
}

/// Every flag key known from local state, sorted.
pub fn flag_keys(reader: &KvReader) -> Result<Vec<String>, EvaluationError> {
    let mut keys = BTreeSet::new();
    for k in reader
        .list(FLAGS_PREFIX)
        .map_err(|e| error(ErrorCode::General, e.to_string()))?
    {
        keys.insert(k[FLAGS_PREFIX.len()..].to_owned());
    }
    if let Some(record) = reader
        .get(FEATURE_FLAGS)
        .map_err(|e| error(ErrorCode::General, e.to_string()))?
        && let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&record.value)
    {
        keys.extend(map.keys().cloned());
    }
    keys.remove("");
    Ok(keys.into_iter().collect())
}

/// The bulk-evaluation ETag: a hash of the revision of every flag key, the
/// loaded plugins and the context. Equal state and context give equal tags
/// on every node; any flag change, plugin change or other context changes it.
pub fn bulk_etag(
    reader: &KvReader,
    plugins: Option<&PluginHost>,
    context: &Value,
) -> Result<String, EvaluationError> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let general =
        |e: crate::raft::state_machine::ReadError| error(ErrorCode::General, e.to_string());
    reader
        .revision(FEATURE_FLAGS)
        .map_err(general)?
        .hash(&mut h);
    for k in reader.list(FLAGS_PREFIX).map_err(general)? {
        k.hash(&mut h);
        reader.revision(&k).map_err(general)?.hash(&mut h);
    }
    if let Some(host) = plugins {
        for p in host.plugins() {
            p.name().hash(&mut h);
            p.info.version.hash(&mut h);
            p.code_hash().hash(&mut h);
        }
    }
    context.to_string().hash(&mut h);
    Ok(format!("\"{:016x}\"", h.finish()))
}
