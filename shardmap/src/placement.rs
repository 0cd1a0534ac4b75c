//! Placement with a consistent-hash ring (`hashring`): the initial map and the minimal
//! slot moves when shards are added, removed or re-weighted.
//!
//! The ring is only a planning tool. Its answer is written into the table, which stays
//! the only truth; nothing on the query path touches the ring.
//!
//! The ring is laid over the slot space itself: slot `s` sits at ring position
//! `s * 2^64 / slots`, and each shard has `weight * VNODES_PER_WEIGHT` virtual nodes at
//! pseudo-random positions. A slot belongs to the first virtual node at or after its
//! position, so each virtual node owns a contiguous run of slots and the table stays a
//! readable list of ranges (a ring over hashed slot numbers would scatter every slot).
//!
//! Positions are computed here, not by `hashring`'s default SipHash: the ring is built
//! with a hasher that returns the position a node or slot writes. The planning result
//! therefore does not depend on the Rust version (std's `Hash` encoding and SipHash keys
//! are not promised stable), and the same shard set always yields the same placement.

use std::hash::{BuildHasher, Hash, Hasher};

use hashring::HashRing;

use crate::map::{check_layout, MapError, ShardMap, ShardSpec};
use crate::plan::{group_moves, MovePlan, PlanError};

/// Virtual nodes per unit of weight. More nodes balance better but cut the table into
/// more ranges. Measured over 50 random rings with 4096 slots (max slots per shard over
/// the mean): 128 nodes give 1.05 (worst 1.19) for 2 shards and 1.10 (1.19) for 4;
/// 256 give 1.03 (1.08) and 1.06 (1.15), with ~240 and ~680 ranges.
pub const VNODES_PER_WEIGHT: u32 = 256;

/// A hasher whose output is the last `u64` written: the ring's keys are positions we
/// computed ourselves.
#[derive(Default)]
struct PositionHasher(u64);

impl Hasher for PositionHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is ever called by the types below; this fold just keeps the
        // hasher total (and deterministic) should any other input arrive.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[derive(Clone, Copy, Default)]
struct Positions;

impl BuildHasher for Positions {
    type Hasher = PositionHasher;
    fn build_hasher(&self) -> PositionHasher {
        PositionHasher(0)
    }
}

/// A virtual node: owned by `shard`, sitting at `pos` on the ring.
#[derive(Debug, Clone, Copy)]
struct VNode {
    shard: u32,
    pos: u64,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.pos);
    }
}

/// A point on the ring (a slot's position).
struct Point(u64);

impl Hash for Point {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.0);
    }
}

/// The SplitMix64 finaliser: a bijection on u64 with good avalanche, so distinct
/// (shard, index) pairs get distinct, well-spread positions (no ties on the ring).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Ring position of virtual node `index` of `shard`. It depends on nothing else, so
/// adding a shard or weight leaves every existing node where it was; that is what makes
/// the moves minimal.
fn vnode_position(shard: u32, index: u32) -> u64 {
    splitmix64((u64::from(shard) << 32) | u64::from(index))
}

/// Ring position of a slot: its left edge, with the slot space spread over the ring.
fn slot_position(slot: u32, slots: u32) -> u64 {
    ((u128::from(slot) << 64) / u128::from(slots.max(1))) as u64
}

/// The ring's owner of every slot for these weights. `None` if no weight is positive.
fn ring_owners(weights: &[u32], slots: u32) -> Option<Vec<u32>> {
    let mut nodes = Vec::new();
    for (shard, &w) in weights.iter().enumerate() {
        for index in 0..w.saturating_mul(VNODES_PER_WEIGHT) {
            nodes.push(VNode {
                shard: shard as u32,
                pos: vnode_position(shard as u32, index),
            });
        }
    }
    let mut ring: HashRing<VNode, Positions> = HashRing::with_hasher(Positions);
    // One batch: `add` re-sorts the whole ring per node.
    ring.batch_add(nodes);
    (0..slots)
        .map(|slot| {
            ring.get(&Point(slot_position(slot, slots)))
                .map(|n| n.shard)
        })
        .collect()
}

impl ShardMap {
    /// The initial map (version 1): each slot goes to the shard the weighted ring gives
    /// it. A map that only ever changes through [`ShardMap::plan_add_shard`],
    /// [`ShardMap::plan_remove_shard`] and [`ShardMap::plan_reweight`] stays equal to the
    /// ring placement of its current weights.
    pub fn initial(shards: &[ShardSpec], slots: u32) -> Result<ShardMap, MapError> {
        let weights: Vec<u32> = shards.iter().map(|s| s.weight).collect();
        // Validate first so that a bad input yields its own error, not an empty ring.
        check_layout(slots, &weights)?;
        let owners = ring_owners(&weights, slots).ok_or(MapError::BadWeights { sum: 0 })?;
        ShardMap::from_table(1, weights, owners)
    }

    /// Plans a change of shard weights (`weights.len()` may grow to add shards, or
    /// shrink to drop trailing shards). A slot moves only if its ring owner changes, or
    /// if its current owner leaves or gets weight 0; it moves to its new ring owner.
    /// Every other slot stays where the table (the truth) has it, even where earlier
    /// rebalancing or a DBA's edit put it somewhere the ring would not.
    pub fn plan_reweight(&self, weights: &[u32]) -> Result<MovePlan, PlanError> {
        // The new weights must make a valid map (count, sum).
        check_layout(self.slots(), weights)?;
        let slots = self.slots();
        let before = ring_owners(self.weights(), slots);
        let after = ring_owners(weights, slots).ok_or(MapError::BadWeights { sum: 0 })?;
        let current = self.table();
        let target: Vec<u32> = (0..slots as usize)
            .map(|s| {
                let owner = current[s];
                let owner_leaves = weights.get(owner as usize).map_or(true, |&w| w == 0);
                let ring_changed = before.as_ref().map_or(true, |b| b[s] != after[s]);
                if owner_leaves || ring_changed {
                    after[s]
                } else {
                    owner
                }
            })
            .collect();
        Ok(MovePlan {
            base_version: self.version(),
            weights: weights.to_vec(),
            moves: group_moves(current, &target),
        })
    }

    /// Plans adding a shard (it gets index `shards()`): it takes the slots its virtual
    /// nodes win on the ring, from whichever shard owns them now; nothing else moves.
    pub fn plan_add_shard(&self, spec: ShardSpec) -> Result<MovePlan, PlanError> {
        let mut weights = self.weights().to_vec();
        weights.push(spec.weight);
        self.plan_reweight(&weights)
    }

    /// Plans removing shard `shard`: all its slots go to their ring owners among the
    /// remaining shards; nothing else moves. The last shard index disappears from the
    /// map; any other keeps its index with weight 0 and no slots (config addresses
    /// shards by position, so indices must not shift).
    pub fn plan_remove_shard(&self, shard: u32) -> Result<MovePlan, PlanError> {
        self.plan_reweight(&self.weights_without(shard)?)
    }

    /// The weights once `shard` is removed: the last shard disappears, any other gets
    /// weight 0 (keeping the indices of the shards after it).
    fn weights_without(&self, shard: u32) -> Result<Vec<u32>, PlanError> {
        let shards = self.shards();
        if shard >= shards {
            return Err(PlanError::NoSuchShard { shard, shards });
        }
        let mut weights = self.weights().to_vec();
        weights[shard as usize] = 0;
        if shard + 1 == shards {
            weights.pop();
        }
        if weights.iter().all(|&w| w == 0) {
            return Err(PlanError::LastShard(shard));
        }
        Ok(weights)
    }
}

/// Count-balancing placement: the table-driven alternative to the ring.
///
/// With an explicit table there is a better answer than consistent hashing: give each
/// shard exactly its weight's share of the slots, moving only the surplus. The moved
/// count is the least any plan reaching those counts can move, balance is exact, and
/// since givers hand over their highest slots, contiguous maps stay a few ranges long.
impl ShardMap {
    /// Plans new weights (like [`ShardMap::plan_reweight`]) so that every shard ends with
    /// exactly its weight's share of the slots (largest-remainder rounding). A shard above
    /// its share gives its highest-numbered slots; shards below it receive them, lowest
    /// shard index first. Shards leaving the map (or getting weight 0) give everything.
    pub fn plan_reweight_balanced(&self, weights: &[u32]) -> Result<MovePlan, PlanError> {
        check_layout(self.slots(), weights)?;
        let target_counts = crate::map::proportional_counts(weights, self.slots());
        let current = self.table();
        let shards_now = self.shards() as usize;
        let mut counts = vec![0u32; shards_now.max(weights.len())];
        for &s in current {
            counts[s as usize] += 1;
        }
        let target = |shard: usize| target_counts.get(shard).copied().unwrap_or(0);
        // Receivers in index order with what each still lacks.
        let mut receivers: Vec<(u32, u32)> = (0..weights.len())
            .filter(|&j| counts[j] < target(j))
            .map(|j| (j as u32, target(j) - counts[j]))
            .collect();
        let mut next_receiver = 0usize;
        let mut owner = current.to_vec();
        for (giver, &count) in counts.iter().enumerate() {
            let mut surplus = count.saturating_sub(target(giver));
            // Highest slots first: the giver keeps its low ranges intact.
            for slot in (0..current.len()).rev() {
                if surplus == 0 {
                    break;
                }
                if current[slot] as usize != giver {
                    continue;
                }
                let Some((to, lacking)) = receivers.get_mut(next_receiver) else {
                    break; // cannot happen: surpluses and deficits both sum to the same
                };
                owner[slot] = *to;
                *lacking -= 1;
                surplus -= 1;
                if *lacking == 0 {
                    next_receiver += 1;
                }
            }
        }
        Ok(MovePlan {
            base_version: self.version(),
            weights: weights.to_vec(),
            moves: group_moves(current, &owner),
        })
    }

    /// [`ShardMap::plan_add_shard`] with count balancing: the new shard gets exactly its
    /// share, taken from the highest slots of the shards above their new share.
    pub fn plan_add_shard_balanced(&self, spec: ShardSpec) -> Result<MovePlan, PlanError> {
        let mut weights = self.weights().to_vec();
        weights.push(spec.weight);
        self.plan_reweight_balanced(&weights)
    }

    /// [`ShardMap::plan_remove_shard`] with count balancing: the shard's slots fill the
    /// remaining shards up to their new shares.
    pub fn plan_remove_shard_balanced(&self, shard: u32) -> Result<MovePlan, PlanError> {
        self.plan_reweight_balanced(&self.weights_without(shard)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::DEFAULT_SLOTS;

    fn equal(n: usize) -> Vec<ShardSpec> {
        vec![ShardSpec::default(); n]
    }

    fn initial(weights: &[u32]) -> ShardMap {
        let specs: Vec<ShardSpec> = weights.iter().map(|&weight| ShardSpec { weight }).collect();
        ShardMap::initial(&specs, DEFAULT_SLOTS).expect("valid")
    }

    #[test]
    fn ring_placement_is_pinned() {
        // The placement must never change under a new Rust or hashring version: these
        // numbers come from our own position hash and are part of the format.
        let m = initial(&[1, 1]);
        assert_eq!(m.slot_counts(), vec![1994, 2102]);
        assert_eq!(m.ranges().len(), 237);
        assert_eq!(m, initial(&[1, 1]), "deterministic");
        let three = initial(&[1, 1, 1]);
        assert_eq!(three.slot_counts(), vec![1311, 1323, 1462]);
    }

    #[test]
    fn weights_are_respected() {
        let m = initial(&[1, 3]);
        let c = m.slot_counts();
        let share = f64::from(c[1]) / f64::from(DEFAULT_SLOTS);
        assert!((0.70..0.80).contains(&share), "{c:?}");
        let m = initial(&[2, 0, 2]);
        assert_eq!(m.slot_counts()[1], 0, "weight 0 gets nothing");
    }

    #[test]
    fn adding_a_shard_moves_only_to_it_and_lands_on_the_ring_placement() {
        for n in 1..6usize {
            let before = ShardMap::initial(&equal(n), DEFAULT_SLOTS).expect("valid");
            let plan = before.plan_add_shard(ShardSpec::default()).expect("plan");
            assert!(plan.moves.iter().all(|m| m.to == n as u32), "{plan:?}");
            let after = before.apply(&plan).expect("applies");
            assert_eq!(after.version(), 2);
            assert_eq!(
                after.table(),
                ShardMap::initial(&equal(n + 1), DEFAULT_SLOTS)
                    .expect("valid")
                    .table()
            );
            // Roughly a fair share, never more than twice it.
            let fair = DEFAULT_SLOTS / (n as u32 + 1);
            assert!(
                plan.moved_slots() > fair / 2 && plan.moved_slots() < fair * 2,
                "{n}: {}",
                plan.moved_slots()
            );
        }
    }

    #[test]
    fn removing_shards() {
        let m = initial(&[1, 1, 1]);
        // The last shard: its index disappears and the map equals the 2-shard ring.
        let plan = m.plan_remove_shard(2).expect("plan");
        assert!(plan.moves.iter().all(|mv| mv.from == 2));
        assert_eq!(plan.moved_slots(), m.slot_counts()[2]);
        let after = m.apply(&plan).expect("applies");
        assert_eq!(after.shards(), 2);
        assert_eq!(after.table(), initial(&[1, 1]).table());
        // A middle shard keeps its index with weight 0 and no slots.
        let plan = m.plan_remove_shard(1).expect("plan");
        assert!(plan.moves.iter().all(|mv| mv.from == 1));
        let after = m.apply(&plan).expect("applies");
        assert_eq!(after.weights(), &[1, 0, 1]);
        assert_eq!(after.slot_counts()[1], 0);
        assert_eq!(after.table(), initial(&[1, 0, 1]).table());
        assert_eq!(
            m.plan_remove_shard(3),
            Err(PlanError::NoSuchShard {
                shard: 3,
                shards: 3
            })
        );
        assert_eq!(
            initial(&[1]).plan_remove_shard(0),
            Err(PlanError::LastShard(0))
        );
    }

    #[test]
    fn slots_placed_off_ring_stay_unless_their_ring_owner_changes() {
        // Move some slots by hand (as rebalancing would), then add a shard: those slots
        // stay where the table says unless the new shard wins them.
        let m = initial(&[1, 1]);
        let off_ring: Vec<u32> = (0..DEFAULT_SLOTS)
            .filter(|&s| m.shard_of_slot(s) == 0)
            .take(100)
            .collect();
        let mut table = m.table().to_vec();
        for &s in &off_ring {
            table[s as usize] = 1;
        }
        let edited = ShardMap::from_table(2, vec![1, 1], table).expect("valid");
        let plan = edited.plan_add_shard(ShardSpec::default()).expect("plan");
        let after = edited.apply(&plan).expect("applies");
        let ring3 = initial(&[1, 1, 1]);
        for s in off_ring {
            let want = if ring3.shard_of_slot(s) == 2 { 2 } else { 1 };
            assert_eq!(after.shard_of_slot(s), want, "slot {s}");
        }
    }

    #[test]
    fn balanced_add_and_remove_are_exact_and_minimal() {
        let m = ShardMap::initial_contiguous(&equal(3), DEFAULT_SLOTS).expect("valid");
        let plan = m
            .plan_add_shard_balanced(ShardSpec::default())
            .expect("plan");
        assert_eq!(plan.moved_slots(), 1024, "exactly the new shard's share");
        assert_eq!(
            plan.moves.len(),
            3,
            "one tail range from each shard: {plan:?}"
        );
        let after = m.apply(&plan).expect("applies");
        assert_eq!(after.slot_counts(), vec![1024; 4]);
        let plan = after.plan_remove_shard_balanced(1).expect("plan");
        assert_eq!(plan.moved_slots(), 1024);
        assert!(plan.moves.iter().all(|mv| mv.from == 1));
        let after = after.apply(&plan).expect("applies");
        assert_eq!(after.slot_counts(), vec![1366, 0, 1365, 1365]);
        // Already balanced: nothing to do.
        assert!(after
            .plan_reweight_balanced(after.weights())
            .expect("plan")
            .is_empty());
    }
}
