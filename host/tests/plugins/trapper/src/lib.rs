//! Test plugin `trapper`: every hook panics, which traps the instance. The host must turn a
//! trapping validator into a rejection, a trapping evaluator into an error answer, count the
//! traps, and stay up.

use flagstone_sdk::{Change, EvalContext, EvalError, Evaluation, Hook, Plugin, PluginInfo, Write};

struct Trapper;

impl Plugin for Trapper {
    fn info() -> PluginInfo {
        PluginInfo::new("trapper", env!("CARGO_PKG_VERSION"))
            .prefixes(["trap/", "flags/trap"])
            .hooks([Hook::ValidateWrite, Hook::OnChange, Hook::Evaluate])
    }

    fn validate_write(write: Write) -> Result<(), String> {
        panic!("trapper: validate-write on {}", write.key)
    }

    fn on_change(change: Change) {
        panic!("trapper: on-change on {}", change.key)
    }

    fn evaluate(flag_key: String, _context: EvalContext) -> Result<Evaluation, EvalError> {
        panic!("trapper: evaluate {flag_key}")
    }
}

flagstone_sdk::export_plugin!(Trapper);
