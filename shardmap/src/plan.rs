//! Slot moves, move plans, diffs between map versions, and applying a plan.

use std::fmt;
use std::fmt::Write as _;
use std::ops::RangeInclusive;

use crate::map::{MapError, ShardMap};

/// Moving the slots `lo..=hi` (inclusive) from shard `from` to shard `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotMove {
    pub lo: u32,
    pub hi: u32,
    pub from: u32,
    pub to: u32,
}

impl SlotMove {
    /// The moving slots.
    pub fn slots(&self) -> RangeInclusive<u32> {
        self.lo..=self.hi
    }

    /// Number of moving slots.
    pub fn len(&self) -> u32 {
        if self.hi < self.lo {
            0
        } else {
            self.hi - self.lo + 1
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for SlotMove {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slots = if self.lo == self.hi {
            format!("{}", self.lo)
        } else {
            format!("{}-{}", self.lo, self.hi)
        };
        write!(
            f,
            "slots {slots} ({}): shard {} -> shard {}",
            self.len(),
            self.from,
            self.to
        )
    }
}

/// A set of slot moves computed against one map version, plus the shard weights after
/// it (their number is the shard count after: adding a shard appends one, removing the
/// last shard drops one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovePlan {
    /// The version of the map the plan was computed from; [`ShardMap::apply`] refuses a
    /// plan for any other version, since the table may have changed underneath it.
    pub base_version: u64,
    /// Weights of the shards after the plan.
    pub weights: Vec<u32>,
    /// The moves, in slot order, each a maximal run with one (from, to).
    pub moves: Vec<SlotMove>,
}

impl MovePlan {
    /// True if the plan moves no slot.
    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// Number of slots the plan moves.
    pub fn moved_slots(&self) -> u32 {
        self.moves.iter().map(SlotMove::len).sum()
    }

    /// Human text for `shardgate rebalance plan` and friends: one line per move.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "plan against map version {}: {} slot{} in {} move{}",
            self.base_version,
            self.moved_slots(),
            if self.moved_slots() == 1 { "" } else { "s" },
            self.moves.len(),
            if self.moves.len() == 1 { "" } else { "s" }
        );
        for m in &self.moves {
            let _ = writeln!(out, "  {m}");
        }
        out
    }
}

/// Why a plan cannot be applied (or two maps not compared).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the plan was made for map version {plan}, but the map is at version {map}: plan again"
    )]
    Stale { plan: u64, map: u64 },
    #[error("{0}: slot out of range (the map has {1} slots)")]
    SlotOutOfRange(SlotMove, u32),
    #[error("{mv}: slot {slot} is owned by shard {owner}, not {from}", from = .mv.from)]
    WrongSource { mv: SlotMove, slot: u32, owner: u32 },
    #[error("{mv}: shard {to} does not exist after the plan ({shards} shards)", to = .mv.to)]
    UnknownTarget { mv: SlotMove, shards: u32 },
    #[error("{0}: from and to are the same shard")]
    SameShard(SlotMove),
    #[error("slot {0} is moved twice in one plan")]
    MovedTwice(u32),
    #[error("shard {shard} would be removed but still owns {count} slots")]
    RemovedShardOwnsSlots { shard: u32, count: u32 },
    #[error("the maps have different slot counts ({0} and {1}); a slot-count change is a resharding, not a move")]
    SlotsDiffer(u32, u32),
    #[error("shard {shard} does not exist ({shards} shards)")]
    NoSuchShard { shard: u32, shards: u32 },
    #[error("cannot remove shard {0}: it is the last shard with a weight above 0")]
    LastShard(u32),
    #[error("invalid result: {0}")]
    Map(#[from] MapError),
    #[error("the map version cannot grow beyond {0}")]
    VersionOverflow(u64),
}

/// Groups per-slot owner changes into maximal runs of consecutive slots with the same
/// (from, to). `new_owner[slot]` may equal `old[slot]` (no move).
pub(crate) fn group_moves(old: &[u32], new_owner: &[u32]) -> Vec<SlotMove> {
    let mut out: Vec<SlotMove> = Vec::new();
    for (slot, (&from, &to)) in old.iter().zip(new_owner).enumerate() {
        if from == to {
            continue;
        }
        let slot = slot as u32;
        match out.last_mut() {
            Some(m) if m.hi + 1 == slot && m.from == from && m.to == to => m.hi = slot,
            _ => out.push(SlotMove {
                lo: slot,
                hi: slot,
                from,
                to,
            }),
        }
    }
    out
}

impl ShardMap {
    /// The slot moves that turn `old`'s table into `new`'s, in slot order, grouped into
    /// ranges.
    pub fn diff(old: &ShardMap, new: &ShardMap) -> Result<Vec<SlotMove>, PlanError> {
        if old.slots() != new.slots() {
            return Err(PlanError::SlotsDiffer(old.slots(), new.slots()));
        }
        Ok(group_moves(old.table(), new.table()))
    }

    /// The plan that turns this map into `target` (same slots): the diff plus `target`'s
    /// weights. Useful after a DBA edited a copy of the map file by hand.
    pub fn plan_to(&self, target: &ShardMap) -> Result<MovePlan, PlanError> {
        Ok(MovePlan {
            base_version: self.version(),
            weights: target.weights().to_vec(),
            moves: ShardMap::diff(self, target)?,
        })
    }

    /// Human text for `shardgate shardmap diff OLD NEW`: the moves and the slot counts per
    /// shard before and after.
    pub fn diff_text(old: &ShardMap, new: &ShardMap) -> String {
        let moves = match ShardMap::diff(old, new) {
            Ok(m) => m,
            Err(e) => return format!("{e}\n"),
        };
        let moved: u32 = moves.iter().map(SlotMove::len).sum();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "shard map version {} -> {}: {} of {} slots move in {} range{}",
            old.version(),
            new.version(),
            moved,
            old.slots(),
            moves.len(),
            if moves.len() == 1 { "" } else { "s" }
        );
        for m in &moves {
            let _ = writeln!(out, "  {m}");
        }
        let (a, b) = (old.slot_counts(), new.slot_counts());
        let shards = a.len().max(b.len());
        out.push_str("slots per shard:\n");
        for shard in 0..shards {
            let before = a.get(shard).copied().unwrap_or(0);
            let after = b.get(shard).copied().unwrap_or(0);
            let note = match (shard < a.len(), shard < b.len()) {
                (false, true) => " (new shard)",
                (true, false) => " (removed)",
                _ => "",
            };
            let _ = writeln!(
                out,
                "  shard {shard}: {before} -> {after} ({:+}){note}",
                i64::from(after) - i64::from(before)
            );
        }
        if old.weights() != new.weights() {
            let _ = writeln!(out, "weights: {:?} -> {:?}", old.weights(), new.weights());
        }
        out
    }

    /// Applies a plan made against this version: checks that it is not stale and that
    /// every move takes slots from their current owner, each slot at most once; returns
    /// the next version (version + 1) with the plan's weights.
    pub fn apply(&self, plan: &MovePlan) -> Result<ShardMap, PlanError> {
        if plan.base_version != self.version() {
            return Err(PlanError::Stale {
                plan: plan.base_version,
                map: self.version(),
            });
        }
        self.apply_with(&plan.moves, plan.weights.clone())
    }

    /// Applies some moves (e.g. one move at a time, as the slot mover publishes them),
    /// keeping the weights; checks ownership like [`ShardMap::apply`] but not a version.
    pub fn apply_moves(&self, moves: &[SlotMove]) -> Result<ShardMap, PlanError> {
        self.apply_with(moves, self.weights().to_vec())
    }

    fn apply_with(&self, moves: &[SlotMove], weights: Vec<u32>) -> Result<ShardMap, PlanError> {
        let shards_after = weights.len() as u32;
        let mut table = self.table().to_vec();
        let mut moved = vec![false; table.len()];
        for mv in moves {
            if mv.hi < mv.lo || mv.hi >= self.slots() {
                return Err(PlanError::SlotOutOfRange(*mv, self.slots()));
            }
            if mv.from == mv.to {
                return Err(PlanError::SameShard(*mv));
            }
            if mv.to >= shards_after {
                return Err(PlanError::UnknownTarget {
                    mv: *mv,
                    shards: shards_after,
                });
            }
            for slot in mv.slots() {
                let i = slot as usize;
                if moved[i] {
                    return Err(PlanError::MovedTwice(slot));
                }
                if table[i] != mv.from {
                    return Err(PlanError::WrongSource {
                        mv: *mv,
                        slot,
                        owner: table[i],
                    });
                }
                moved[i] = true;
                table[i] = mv.to;
            }
        }
        if let Some(&owner) = table.iter().find(|&&s| s >= shards_after) {
            let count = table.iter().filter(|&&s| s == owner).count() as u32;
            return Err(PlanError::RemovedShardOwnsSlots {
                shard: owner,
                count,
            });
        }
        let version = self
            .version()
            .checked_add(1)
            .filter(|&v| v <= i64::MAX as u64)
            .ok_or(PlanError::VersionOverflow(self.version()))?;
        Ok(ShardMap::from_table(version, weights, table)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(version: u64, table: &[u32]) -> ShardMap {
        let shards = table.iter().copied().max().unwrap_or(0) as usize + 1;
        ShardMap::from_table(version, vec![1; shards], table.to_vec()).expect("valid")
    }

    #[test]
    fn diff_groups_runs_and_apply_round_trips() {
        let old = map(4, &[0, 0, 0, 0, 1, 1, 1, 1]);
        let new = map(9, &[0, 1, 1, 0, 1, 0, 0, 1]);
        let moves = ShardMap::diff(&old, &new).expect("same slots");
        assert_eq!(
            moves,
            vec![
                SlotMove {
                    lo: 1,
                    hi: 2,
                    from: 0,
                    to: 1
                },
                SlotMove {
                    lo: 5,
                    hi: 6,
                    from: 1,
                    to: 0
                },
            ]
        );
        let plan = old.plan_to(&new).expect("plan");
        let applied = old.apply(&plan).expect("applies");
        assert_eq!(applied.version(), 5);
        assert_eq!(applied.table(), new.table());
        assert_eq!(
            ShardMap::diff_text(&old, &new),
            "shard map version 4 -> 9: 4 of 8 slots move in 2 ranges\n  \
             slots 1-2 (2): shard 0 -> shard 1\n  slots 5-6 (2): shard 1 -> shard 0\n\
             slots per shard:\n  shard 0: 4 -> 4 (+0)\n  shard 1: 4 -> 4 (+0)\n"
        );
    }

    #[test]
    fn apply_refuses_bad_plans() {
        let m = map(4, &[0, 0, 1, 1]);
        let plan = |moves: Vec<SlotMove>| MovePlan {
            base_version: 4,
            weights: vec![1, 1],
            moves,
        };
        let mv = |lo, hi, from, to| SlotMove { lo, hi, from, to };
        assert_eq!(
            m.apply(&MovePlan {
                base_version: 3,
                ..plan(vec![])
            }),
            Err(PlanError::Stale { plan: 3, map: 4 })
        );
        assert_eq!(
            m.apply(&plan(vec![mv(1, 2, 0, 1)])),
            Err(PlanError::WrongSource {
                mv: mv(1, 2, 0, 1),
                slot: 2,
                owner: 1
            })
        );
        assert_eq!(
            m.apply(&plan(vec![mv(0, 0, 0, 1), mv(0, 0, 1, 0)])),
            Err(PlanError::MovedTwice(0))
        );
        assert_eq!(
            m.apply(&plan(vec![mv(3, 4, 1, 0)])),
            Err(PlanError::SlotOutOfRange(mv(3, 4, 1, 0), 4))
        );
        assert_eq!(
            m.apply(&plan(vec![mv(0, 0, 0, 0)])),
            Err(PlanError::SameShard(mv(0, 0, 0, 0)))
        );
        assert_eq!(
            m.apply(&plan(vec![mv(0, 0, 0, 2)])),
            Err(PlanError::UnknownTarget {
                mv: mv(0, 0, 0, 2),
                shards: 2
            })
        );
        // Dropping shard 1 while it still owns slots.
        assert_eq!(
            m.apply(&MovePlan {
                base_version: 4,
                weights: vec![1],
                moves: vec![mv(2, 2, 1, 0)]
            }),
            Err(PlanError::RemovedShardOwnsSlots { shard: 1, count: 1 })
        );
        assert!(m
            .apply(&plan(vec![]))
            .is_ok_and(|n| n.version() == 5 && n.table() == m.table()));
        assert_eq!(
            m.apply_moves(&[mv(0, 1, 0, 1)]).map(|n| n.table().to_vec()),
            Ok(vec![1, 1, 1, 1])
        );
    }

    #[test]
    fn diff_needs_equal_slot_counts() {
        let a = map(1, &[0, 0]);
        let b = map(1, &[0, 0, 0, 0]);
        assert_eq!(ShardMap::diff(&a, &b), Err(PlanError::SlotsDiffer(2, 4)));
    }

    #[test]
    fn plan_text() {
        let p = MovePlan {
            base_version: 7,
            weights: vec![1, 1],
            moves: vec![SlotMove {
                lo: 3,
                hi: 3,
                from: 0,
                to: 1,
            }],
        };
        assert_eq!(
            p.to_text(),
            "plan against map version 7: 1 slot in 1 move\n  slots 3 (1): shard 0 -> shard 1\n"
        );
    }
}
