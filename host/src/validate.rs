//! Validator plugins on the write path: what the group commit (`batcher.rs`)
//! calls to admit a write before proposing it.
//!
//! A validator call costs a few microseconds when the plugin's instance, its
//! code and the host's call path are in the CPU's caches and TLB, and several
//! times that as the first call after a request's HTTP and Raft work (BENCHMARKS
//! item 43). So the batcher makes the calls back to back: the runner of the
//! entry in flight validates the writes queued behind it while it waits, and
//! the next runner validates only what arrived too late for that.
//!
//! A validator with a clean record runs inline on the async worker; one that
//! ever timed out or failed its last call runs on the blocking pool, so a
//! looping plugin costs a worker nothing and a batch one deadline.

use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::error::WriteError;
use crate::plugins::{PluginHost, Rejection, Validators, types as wit};
use crate::raft::{Command, KvReader};

/// How a write is admitted (validated) before it is proposed.
pub trait Admit: Sync {
    /// Whether any validator looks at `cmd` (if not, it is admitted as is).
    fn needed(&self, cmd: &Command) -> bool;
    /// Validates `cmd` here and now; `None` if its validators must run on
    /// the blocking pool ([`Admit::blocking`]).
    fn now(&self, cmd: &Command) -> Option<Result<(), WriteError>>;
    /// Validates `cmd` on the blocking pool.
    fn blocking(&self, cmd: &Command) -> JoinHandle<Result<(), WriteError>>;
}

/// The node's validator plugins (none: every write is admitted), with the
/// applied state that shows them each key's current value.
pub struct Validation<'a> {
    /// The node's plugins.
    pub host: Option<&'a Arc<PluginHost>>,
    /// The node's applied state.
    pub reader: &'a KvReader,
}

impl Admit for Validation<'_> {
    fn needed(&self, cmd: &Command) -> bool {
        self.validators(cmd) != Validators::None
    }

    fn now(&self, cmd: &Command) -> Option<Result<(), WriteError>> {
        let Some(host) = self.host else {
            return Some(Ok(()));
        };
        match self.validators(cmd) {
            Validators::None => Some(Ok(())),
            Validators::Clean => {
                Some(record(self.reader, cmd).and_then(|w| verdict(host.validate(&w))))
            }
            Validators::Suspect => None,
        }
    }

    fn blocking(&self, cmd: &Command) -> JoinHandle<Result<(), WriteError>> {
        let write = record(self.reader, cmd);
        let host = self.host.cloned();
        tokio::task::spawn_blocking(move || match (host, write) {
            (Some(host), Ok(write)) => verdict(host.validate(&write)),
            (None, _) => Ok(()),
            (_, Err(e)) => Err(e),
        })
    }
}

impl Validation<'_> {
    fn validators(&self, cmd: &Command) -> Validators {
        match (self.host, cmd.key()) {
            (Some(host), Some(key)) => host.validators_of(key),
            _ => Validators::None,
        }
    }
}

fn verdict(v: Result<(), Rejection>) -> Result<(), WriteError> {
    v.map_err(|r| WriteError::RejectedByPlugin {
        plugin: r.plugin,
        message: r.message,
    })
}

/// What a validator is shown of `cmd`: key, new value (none: a delete) and
/// the value the key holds now on this node.
fn record(reader: &KvReader, cmd: &Command) -> Result<wit::Write, WriteError> {
    let key = cmd.key().unwrap_or_default();
    let current = reader
        .get(key)
        .map_err(|e| WriteError::Unavailable(e.to_string()))?
        .map(|r| wit::Entry {
            value: r.value.clone(),
            content_type: r.content_type.clone(),
            revision: r.revision,
        });
    let (value, content_type) = match cmd {
        Command::Put {
            value,
            content_type,
            ..
        } => (Some(value.clone()), content_type.clone()),
        _ => (None, None),
    };
    Ok(wit::Write {
        key: key.to_owned(),
        value,
        content_type,
        current,
    })
}
