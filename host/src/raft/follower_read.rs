//! A follower's read-index request that confirms the leader by itself.
//!
//! A linearizable read needs a read index from a node that was still leader
//! after the read arrived: its commit index at a moment when no newer leader
//! can have committed anything. openraft's check (`get_read_log_id`) sends a
//! heartbeat round to the voters and waits for a quorum.
//!
//! When a *follower* asks, its request already is one such answer: it
//! carries the follower's vote, read inside the follower's Raft core after
//! the read arrived there. If that vote is the leader's own committed vote,
//! the follower had granted no vote to a later term by then; the leader,
//! checking inside its core that it still leads under that vote, had not
//! either. A newer leader needs votes from a quorum, so when {leader,
//! follower} is a quorum in every voter set (any follower of a 3-node
//! cluster), no newer leader existed before the read arrived, and the
//! leader's commit index — once it covers an entry of the leader's own term,
//! so that every earlier committed entry is below it — bounds every write
//! acknowledged before the read. The follower then waits until it has
//! applied that index. In every other case (5 voters, a follower on another
//! vote, a leader that has not committed in its term yet) the leader falls
//! back to the heartbeat round, so this only skips a round, never a check.

use std::collections::BTreeSet;

use openraft::Vote;
use serde::{Deserialize, Serialize};

use super::types::{LogId, NodeId};

/// What a follower sends with `POST /raft/read-index`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadIndexRequest {
    /// The asking follower.
    pub from: NodeId,
    /// Its vote, read in its Raft core after the reads it serves arrived.
    pub vote: Vote<NodeId>,
}

/// The leader's state the decision needs, read inside its Raft core.
#[derive(Debug, Clone)]
pub struct LeaderView<'a> {
    /// This node's id.
    pub id: NodeId,
    /// Whether the core is in the leader state.
    pub leading: bool,
    /// This node's vote.
    pub vote: &'a Vote<NodeId>,
    /// The committed log id.
    pub committed: Option<&'a LogId>,
    /// The voter sets of the effective membership (two during a joint change).
    pub voter_sets: &'a [BTreeSet<NodeId>],
}

/// The read index for `req` if the request and the leader's own state are a
/// quorum's confirmation (see the module docs); `None`: do a heartbeat round.
pub fn confirmed_read_index(leader: &LeaderView<'_>, req: &ReadIndexRequest) -> Option<u64> {
    let vote = leader.vote;
    let same_leadership = leader.leading
        && vote.is_committed()
        && vote.leader_id().voted_for() == Some(leader.id)
        && req.vote == *vote
        && req.from != leader.id;
    if !same_leadership {
        return None;
    }
    let committed = leader
        .committed
        .filter(|c| c.leader_id == *vote.leader_id())?;
    let quorum = !leader.voter_sets.is_empty()
        && leader.voter_sets.iter().all(|voters| {
            let confirmed =
                usize::from(voters.contains(&leader.id)) + usize::from(voters.contains(&req.from));
            confirmed * 2 > voters.len()
        });
    quorum.then_some(committed.index)
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn committed_vote(term: u64, leader: NodeId) -> Vote<NodeId> {
        Vote::new_committed(term, leader)
    }

    fn log_id(term: u64, leader: NodeId, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, leader), index)
    }

    fn voters(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    struct Case {
        vote: Vote<NodeId>,
        committed: Option<LogId>,
        sets: Vec<BTreeSet<NodeId>>,
        leading: bool,
    }

    impl Case {
        /// Node 1 leads term 3 of {1, 2, 3} and has committed index 7 in it.
        fn leader() -> Case {
            Case {
                vote: committed_vote(3, 1),
                committed: Some(log_id(3, 1, 7)),
                sets: vec![voters(&[1, 2, 3])],
                leading: true,
            }
        }

        fn ask(&self, from: NodeId, vote: Vote<NodeId>) -> Option<u64> {
            let view = LeaderView {
                id: 1,
                leading: self.leading,
                vote: &self.vote,
                committed: self.committed.as_ref(),
                voter_sets: &self.sets,
            };
            confirmed_read_index(&view, &ReadIndexRequest { from, vote })
        }
    }

    #[test]
    fn a_follower_on_the_leaders_vote_confirms_a_three_node_leader() {
        let case = Case::leader();
        assert_eq!(case.ask(2, committed_vote(3, 1)), Some(7));
        assert_eq!(case.ask(3, committed_vote(3, 1)), Some(7));
    }

    #[test]
    fn a_follower_on_another_vote_does_not() {
        let case = Case::leader();
        // It has moved on to a later term (it may have voted for a new leader).
        assert_eq!(case.ask(2, committed_vote(4, 3)), None);
        // It voted for a candidate of a later term.
        assert_eq!(case.ask(2, Vote::new(4, 2)), None);
        // It still follows an older leader.
        assert_eq!(case.ask(2, committed_vote(2, 3)), None);
    }

    #[test]
    fn a_leader_that_is_not_or_has_not_committed_in_its_term_does_not_answer() {
        let mut case = Case::leader();
        case.leading = false;
        assert_eq!(case.ask(2, committed_vote(3, 1)), None);

        let mut case = Case::leader();
        case.committed = Some(log_id(2, 3, 6));
        assert_eq!(case.ask(2, committed_vote(3, 1)), None);
        case.committed = None;
        assert_eq!(case.ask(2, committed_vote(3, 1)), None);
    }

    #[test]
    fn leader_and_asker_must_be_a_quorum_of_every_voter_set() {
        let mut case = Case::leader();
        case.sets = vec![voters(&[1, 2, 3, 4, 5])];
        assert_eq!(case.ask(2, committed_vote(3, 1)), None, "2 of 5");

        case.sets = vec![voters(&[1, 2])];
        assert_eq!(case.ask(2, committed_vote(3, 1)), Some(7), "2 of 2");

        // A learner is in no voter set.
        case.sets = vec![voters(&[1, 2, 3])];
        assert_eq!(case.ask(9, committed_vote(3, 1)), None, "learner");

        // Joint change {1,2,3} -> {1,4,5}: 2 is no majority of the new set.
        case.sets = vec![voters(&[1, 2, 3]), voters(&[1, 4, 5])];
        assert_eq!(case.ask(2, committed_vote(3, 1)), None, "joint");
        case.sets = vec![voters(&[1, 2, 3]), voters(&[1, 2, 5])];
        assert_eq!(case.ask(2, committed_vote(3, 1)), Some(7), "joint, both");

        case.sets = vec![];
        assert_eq!(case.ask(2, committed_vote(3, 1)), None, "no voters");
    }

    #[test]
    fn the_leader_asking_itself_is_not_a_second_confirmation() {
        let mut case = Case::leader();
        case.sets = vec![voters(&[1, 2])];
        assert_eq!(case.ask(1, committed_vote(3, 1)), None);
    }
}
