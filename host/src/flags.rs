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

use serde_json::{Map, Value};

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
/// a plain `feature_flags` boolean (`feature_flags` is read and parsed only
/// when no evaluator answers).
pub fn evaluate(
    reader: &KvReader,
    plugins: Option<&PluginHost>,
    key: &str,
    ctx: &EvalContext,
) -> Result<Evaluation, EvaluationError> {
    evaluate_by_plugins(plugins, key, ctx)
        .unwrap_or_else(|| unanswered(reader, &PlainFlags::read(reader), key))
}

/// The answer for `key` when no evaluator plugin knows it: the plain flag's
/// ([`PlainFlags::evaluate`]), except for a flag defined under `flags/`,
/// which only an evaluator can answer: GENERAL, not FLAG_NOT_FOUND — the
/// flag exists, and FLAG_NOT_FOUND makes OpenFeature SDKs quietly serve
/// their default (a node without the evaluator plugin, or while it does not
/// load).
pub fn unanswered(
    reader: &KvReader,
    plain: &PlainFlags,
    key: &str,
) -> Result<Evaluation, EvaluationError> {
    let answer = plain.evaluate(key);
    if answer
        .as_ref()
        .is_err_and(|e| e.code == ErrorCode::FlagNotFound)
    {
        let definition = format!("{FLAGS_PREFIX}{key}");
        if let Ok(Some(_)) = reader.get(&definition) {
            return Err(error(
                ErrorCode::General,
                format!(
                    "flag {key:?} is defined ({definition}), but no evaluator plugin on this node \
                     evaluates it"
                ),
            ));
        }
    }
    answer
}

/// The evaluator plugins' answer, or `None` when none of them knows `key`
/// (then [`PlainFlags::evaluate`] answers; a bulk request parses
/// `feature_flags` once for all its flags).
pub fn evaluate_by_plugins(
    plugins: Option<&PluginHost>,
    key: &str,
    ctx: &EvalContext,
) -> Option<Result<Evaluation, EvaluationError>> {
    match plugins?.evaluate(key, ctx) {
        Ok((_, e)) => Some(Ok(e)),
        Err(e) if e.code != ErrorCode::FlagNotFound => Some(Err(e)),
        Err(_) => None,
    }
}

/// The seed's shape: `feature_flags` = `{"name": bool, …}`, read and parsed
/// once. `Ok(None)`: there is no `feature_flags` key; `Err`: reading or
/// parsing it failed (every plain flag lookup answers that error).
pub struct PlainFlags(Result<Option<Map<String, Value>>, EvaluationError>);

impl PlainFlags {
    /// Reads and parses `feature_flags` from local state.
    pub fn read(reader: &KvReader) -> Self {
        Self(Self::load(reader))
    }

    fn load(reader: &KvReader) -> Result<Option<Map<String, Value>>, EvaluationError> {
        let Some(record) = reader
            .get(FEATURE_FLAGS)
            .map_err(|e| error(ErrorCode::General, e.to_string()))?
        else {
            return Ok(None);
        };
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
        Ok(Some(map))
    }

    /// The names of the plain flags (none when `feature_flags` is missing or
    /// unreadable).
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().flatten().flat_map(|m| m.keys())
    }

    /// The built-in answer for the plain flag `key`.
    pub fn evaluate(&self, key: &str) -> Result<Evaluation, EvaluationError> {
        let not_found = || error(ErrorCode::FlagNotFound, format!("flag {key:?} not found"));
        let map = match &self.0 {
            Ok(Some(map)) => map,
            Ok(None) => return Err(not_found()),
            Err(e) => return Err(e.clone()),
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
}

/// Every flag key known from local state, sorted (`plain`: `feature_flags`
/// as read by [`PlainFlags::read`]).
pub fn flag_keys(reader: &KvReader, plain: &PlainFlags) -> Result<Vec<String>, EvaluationError> {
    let mut keys = BTreeSet::new();
    for k in reader
        .list(FLAGS_PREFIX)
        .map_err(|e| error(ErrorCode::General, e.to_string()))?
    {
        keys.insert(k[FLAGS_PREFIX.len()..].to_owned());
    }
    // A failed read fails the listing; a malformed `feature_flags` only
    // contributes no keys (each plain flag is then missing, not an error).
    if let Err(e) = &plain.0
        && e.code == ErrorCode::General
    {
        return Err(e.clone());
    }
    keys.extend(plain.keys().cloned());
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
