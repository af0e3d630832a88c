//! Noticing that this node was removed from its cluster.
//!
//! A removed node is not told: the leader stops replicating to it as soon as
//! the membership without it takes effect, so its log never holds that
//! membership. It keeps its old view, still counts itself a voter, and once
//! the leader's heartbeats stop it campaigns, again and again. Every other
//! voter refuses those votes (`403 not_a_voter`, `http/raft_rpc.rs`). When
//! all the other voters of its membership refused within [`WINDOW`] and it
//! knows no leader, it reports itself removed (`/readyz` 503 `removed`, a
//! warning in its log) instead of looking like a node that merely lost its
//! leader. A member that accepts (or refuses on the merits) a vote of its
//! clears that member's refusal, so a node whose votes were refused for a
//! moment (a new voter whose membership the others had not learned yet)
//! comes back by itself.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::NodeId;

/// How recent the refusals of every other voter must be.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The other nodes' latest refusals of this node's votes.
#[derive(Debug, Default)]
pub struct VoteRefusals {
    refused: Mutex<HashMap<NodeId, Instant>>,
}

impl VoteRefusals {
    /// `peer` refused a vote request: this node is not a voter of its
    /// membership.
    pub fn refused_by(&self, peer: NodeId) {
        self.lock().insert(peer, Instant::now());
    }

    /// `peer` answered a vote request (granted or not): it counts this node
    /// as a voter.
    pub fn answered_by(&self, peer: NodeId) {
        self.lock().remove(&peer);
    }

    /// Whether every node of `voters` (at least one) refused within
    /// [`WINDOW`] before `now`.
    pub fn refused_by_all(&self, voters: impl IntoIterator<Item = NodeId>, now: Instant) -> bool {
        let refused = self.lock();
        let mut any = false;
        for voter in voters {
            let recent = refused
                .get(&voter)
                .is_some_and(|at| now.saturating_duration_since(*at) <= WINDOW);
            if !recent {
                return false;
            }
            any = true;
        }
        any
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Instant>> {
        self.refused.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_other_voter_must_have_refused_recently() {
        let r = VoteRefusals::default();
        let now = Instant::now();
        assert!(!r.refused_by_all([], now), "no voter, no verdict");
        assert!(!r.refused_by_all([2, 3], now));
        r.refused_by(2);
        assert!(!r.refused_by_all([2, 3], Instant::now()), "node 3 did not");
        r.refused_by(3);
        assert!(r.refused_by_all([2, 3], Instant::now()));
        assert!(
            !r.refused_by_all([2, 3], Instant::now() + WINDOW + Duration::from_secs(1)),
            "old refusals do not count"
        );
        r.answered_by(2);
        assert!(
            !r.refused_by_all([2, 3], Instant::now()),
            "node 2 answered since"
        );
    }
}
