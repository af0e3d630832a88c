//! Test plugin `looper`: `validate-write` and `evaluate` never return (an infinite loop the
//! optimizer cannot remove). The host's epoch deadline must interrupt them. Its keys are
//! `loop/…` and the flags named `loop…` (`flags/loop…`).

use flagstone_sdk::{EvalContext, EvalError, Evaluation, Hook, Plugin, PluginInfo, Write};

struct Looper;

impl Plugin for Looper {
    fn info() -> PluginInfo {
        PluginInfo::new("looper", env!("CARGO_PKG_VERSION"))
            .prefixes(["loop/", "flags/loop"])
            .hooks([Hook::ValidateWrite, Hook::Evaluate])
    }

    fn validate_write(_write: Write) -> Result<(), String> {
        spin()
    }

    fn evaluate(_flag_key: String, _context: EvalContext) -> Result<Evaluation, EvalError> {
        spin()
    }
}

/// Spins forever; `black_box` keeps the counter (and so the loop) observable.
fn spin() -> ! {
    let mut counter = 0u64;
    loop {
        counter = std::hint::black_box(counter).wrapping_add(1);
    }
}

flagstone_sdk::export_plugin!(Looper);
