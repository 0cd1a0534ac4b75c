//! The hot-shard rebalance planner: per-slot load in, a bounded [`MovePlan`] out.
//!
//! Load is whatever rate the caller measures per slot (transactions or server-connection
//! checkouts per second, time spent...), summed over a window. A shard's load is the sum
//! over its slots. Shards are compared by load per unit of weight (a weight-2 shard is
//! expected to carry twice the load); shards with weight 0 (drained, or being removed)
//! take no part: they are neither sources nor targets, and not in the mean.
//!
//! The ratio everything here speaks of is `max_i (load_i / weight_i) / (Σ load / Σ weight)`
//! over the participating shards: with equal weights, the familiar max/mean.

use std::time::Duration;

use crate::map::ShardMap;
use crate::plan::{group_moves, MovePlan};

/// Planner settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RebalanceConfig {
    /// A shard is hot above `hot_ratio × mean`; a planned move never leaves its target
    /// above it.
    pub hot_ratio: f64,
    /// The planner stops once the hottest shard is at or below `target_ratio × mean`:
    /// slot moves copy rows, so chasing the last few percent is not worth it.
    pub target_ratio: f64,
    /// At most this many slots move in one plan.
    pub max_slots_per_round: u32,
}

impl Default for RebalanceConfig {
    fn default() -> RebalanceConfig {
        RebalanceConfig {
            hot_ratio: 1.5,
            target_ratio: 1.1,
            max_slots_per_round: 64,
        }
    }
}

/// A rebalance plan with the predicted effect.
#[derive(Debug, Clone, PartialEq)]
pub struct RebalancePlan {
    pub plan: MovePlan,
    /// Load per shard now, indexed by shard.
    pub loads_before: Vec<f64>,
    /// Load per shard once the plan is applied (if the per-slot loads stay as they are).
    pub loads_after: Vec<f64>,
    /// The weighted max/mean ratio now and after.
    pub ratio_before: f64,
    pub ratio_after: f64,
}

impl RebalancePlan {
    /// Human text for `shardgate rebalance plan`: the moves and the predicted loads.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = self.plan.to_text();
        let _ = writeln!(
            out,
            "max/mean load ratio: {:.3} -> {:.3}",
            self.ratio_before, self.ratio_after
        );
        for (shard, (b, a)) in self.loads_before.iter().zip(&self.loads_after).enumerate() {
            let _ = writeln!(out, "  shard {shard}: load {b:.1} -> {a:.1}");
        }
        out
    }
}

/// Why the planner refused its input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RebalanceError {
    #[error("per-slot load has {got} entries but the map has {slots} slots")]
    LoadLength { got: usize, slots: u32 },
    #[error("slot {slot} has load {value}: loads must be finite and not negative")]
    BadLoad { slot: u32, value: f64 },
    #[error("rebalance config: {0}")]
    BadConfig(&'static str),
}

/// Load per shard (indexed by shard): the sum of its slots' loads.
pub fn shard_loads(map: &ShardMap, slot_load: &[f64]) -> Result<Vec<f64>, RebalanceError> {
    check_loads(map, slot_load)?;
    Ok(sum_loads(map.table(), slot_load, map.shards()))
}

/// Dense per-slot loads from sparse `(slot, load)` pairs (slots out of range are an
/// error; repeated slots add up).
pub fn dense_loads(
    slots: u32,
    sparse: impl IntoIterator<Item = (u32, f64)>,
) -> Result<Vec<f64>, RebalanceError> {
    let mut out = vec![0.0; slots as usize];
    for (slot, load) in sparse {
        let cell = out
            .get_mut(slot as usize)
            .ok_or(RebalanceError::LoadLength {
                got: slot as usize + 1,
                slots,
            })?;
        *cell += load;
    }
    Ok(out)
}

/// `max / mean` of plain loads (every entry counts). 1.0 when there is no load at all:
/// an idle cluster is balanced.
pub fn max_mean_ratio(loads: &[f64]) -> f64 {
    max_mean_ratio_weighted(loads, &vec![1; loads.len()])
}

/// The weighted ratio (see the module docs): shards with weight 0 are left out.
/// 1.0 when the participating shards carry no load.
pub fn max_mean_ratio_weighted(loads: &[f64], weights: &[u32]) -> f64 {
    let (total, weight) = totals(loads, weights);
    if total <= 0.0 || weight == 0 {
        return 1.0;
    }
    let mean = total / weight as f64;
    let max = loads
        .iter()
        .zip(weights)
        .filter(|(_, &w)| w > 0)
        .map(|(&l, &w)| l / f64::from(w))
        .fold(0.0, f64::max);
    max / mean
}

/// The shards whose load per weight is above `hot_ratio ×` the mean, in index order.
pub fn hot_shards(loads: &[f64], weights: &[u32], hot_ratio: f64) -> Vec<u32> {
    let (total, weight) = totals(loads, weights);
    if total <= 0.0 || weight == 0 {
        return Vec::new();
    }
    let mean = total / weight as f64;
    loads
        .iter()
        .zip(weights)
        .enumerate()
        .filter(|(_, (&l, &w))| w > 0 && l / f64::from(w) > hot_ratio * mean)
        .map(|(i, _)| i as u32)
        .collect()
}

/// Tracks which shards *stay* hot: a shard counts once it has been above
/// `hot_ratio × mean` in every observation for at least `window`. Time comes in as an
/// argument (any monotonic clock's offset), so this stays pure and testable.
#[derive(Debug, Clone)]
pub struct HotTracker {
    hot_ratio: f64,
    window: Duration,
    /// Per shard: since when it has been hot without interruption.
    hot_since: Vec<Option<Duration>>,
}

impl HotTracker {
    pub fn new(hot_ratio: f64, window: Duration) -> HotTracker {
        HotTracker {
            hot_ratio,
            window,
            hot_since: Vec::new(),
        }
    }

    /// Records the shard loads observed at `now`; returns the shards hot for at least
    /// the window.
    pub fn observe(&mut self, now: Duration, loads: &[f64], weights: &[u32]) -> Vec<u32> {
        let hot = hot_shards(loads, weights, self.hot_ratio);
        self.hot_since.resize(loads.len(), None);
        for (shard, since) in self.hot_since.iter_mut().enumerate() {
            if hot.contains(&(shard as u32)) {
                since.get_or_insert(now);
            } else {
                *since = None;
            }
        }
        self.hot_since
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some_and(|t| now.saturating_sub(t) >= self.window))
            .map(|(i, _)| i as u32)
            .collect()
    }
}

/// Plans one rebalance round.
///
/// Repeatedly takes the shard with the highest load per weight and moves one of its
/// slots to the shard where it lands coolest, until that shard is within
/// `target_ratio × mean`, no move helps, or `max_slots_per_round` slots are planned.
/// The slot is the hottest one that does not overshoot (the target ends no hotter than
/// the source); failing that, the one that lowers the pair's maximum most. A move is
/// only taken if its target ends strictly below the source's current level and not
/// above `hot_ratio × mean`, so:
///
/// * the max/mean ratio never rises (each move lowers the source and leaves the target
///   below the old maximum; the mean does not change);
/// * no target becomes hot;
/// * each slot moves at most once, from its current owner, so the applied map still
///   owns every slot exactly once;
/// * slots with no load never move (copying them buys nothing);
/// * the output depends only on the inputs (ties go to the lower slot or shard index).
///
/// The planner improves balance whenever it is called; deciding *when* to call it is
/// [`hot_shards`] / [`HotTracker`]'s job.
pub fn plan_rebalance(
    map: &ShardMap,
    slot_load: &[f64],
    config: &RebalanceConfig,
) -> Result<RebalancePlan, RebalanceError> {
    check_loads(map, slot_load)?;
    if !(config.hot_ratio.is_finite() && config.hot_ratio >= 1.0) {
        return Err(RebalanceError::BadConfig(
            "hot_ratio must be a finite number of at least 1",
        ));
    }
    if !(config.target_ratio.is_finite() && config.target_ratio >= 1.0) {
        return Err(RebalanceError::BadConfig(
            "target_ratio must be a finite number of at least 1",
        ));
    }
    let weights = map.weights();
    let shards = map.shards() as usize;
    let loads_before = sum_loads(map.table(), slot_load, map.shards());
    let mut loads = loads_before.clone();
    let mut owner = map.table().to_vec();
    let mut moved = vec![false; owner.len()];

    let (total, weight) = totals(&loads, weights);
    let mean = if weight > 0 {
        total / weight as f64
    } else {
        0.0
    };
    // Per-weight level of a shard carrying `load`, in units of the mean.
    let level = |shard: usize, load: f64| load / (f64::from(weights[shard]) * mean);

    // Slots hottest first (ties: lower slot), skipping idle ones; scanned per step.
    let mut by_load: Vec<u32> = (0..map.slots())
        .filter(|&s| slot_load[s as usize] > 0.0)
        .collect();
    by_load.sort_by(|&a, &b| {
        slot_load[b as usize]
            .total_cmp(&slot_load[a as usize])
            .then(a.cmp(&b))
    });

    let mut budget = config.max_slots_per_round;
    while budget > 0 && mean > 0.0 {
        // The hottest participating shard (ties: lower index).
        let Some(src) = (0..shards).filter(|&i| weights[i] > 0).fold(
            None,
            |best: Option<usize>, i| match best {
                Some(b) if level(b, loads[b]) >= level(i, loads[i]) => Some(b),
                _ => Some(i),
            },
        ) else {
            break;
        };
        let src_level = level(src, loads[src]);
        if src_level <= config.target_ratio {
            break;
        }
        // The coolest landing place for a slot of load `l`, and its level after.
        let best_target = |l: f64| -> Option<(usize, f64)> {
            (0..shards)
                .filter(|&t| t != src && weights[t] > 0)
                .map(|t| (t, level(t, loads[t] + l)))
                .fold(None, |best, (t, lv)| match best {
                    Some((_, blv)) if blv <= lv => best,
                    _ => Some((t, lv)),
                })
        };
        let mut no_overshoot: Option<(u32, usize)> = None;
        let mut least_max: Option<(u32, usize, f64)> = None;
        for &slot in &by_load {
            let i = slot as usize;
            if moved[i] || owner[i] != src as u32 {
                continue;
            }
            let l = slot_load[i];
            let Some((t, t_after)) = best_target(l) else {
                break;
            };
            if !(t_after < src_level && t_after <= config.hot_ratio) {
                continue;
            }
            let s_after = level(src, loads[src] - l);
            if t_after <= s_after {
                no_overshoot = Some((slot, t));
                break;
            }
            let pair_max = t_after.max(s_after);
            // Strictly lower only: on ties the hotter slot, seen first, stays.
            if least_max.map_or(true, |(_, _, m)| m > pair_max) {
                least_max = Some((slot, t, pair_max));
            }
        }
        let Some((slot, to)) = no_overshoot.or(least_max.map(|(s, t, _)| (s, t))) else {
            break;
        };
        let i = slot as usize;
        loads[src] -= slot_load[i];
        loads[to] += slot_load[i];
        owner[i] = to as u32;
        moved[i] = true;
        budget -= 1;
    }

    // Recompute from the final table rather than trusting the running sums, so the
    // reported loads are exactly what `shard_loads` will say after `apply`.
    let loads_after = sum_loads(&owner, slot_load, map.shards());
    Ok(RebalancePlan {
        plan: MovePlan {
            base_version: map.version(),
            weights: weights.to_vec(),
            moves: group_moves(map.table(), &owner),
        },
        ratio_before: max_mean_ratio_weighted(&loads_before, weights),
        ratio_after: max_mean_ratio_weighted(&loads_after, weights),
        loads_before,
        loads_after,
    })
}

fn check_loads(map: &ShardMap, slot_load: &[f64]) -> Result<(), RebalanceError> {
    if slot_load.len() != map.slots() as usize {
        return Err(RebalanceError::LoadLength {
            got: slot_load.len(),
            slots: map.slots(),
        });
    }
    if let Some((slot, &value)) = slot_load
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
    {
        return Err(RebalanceError::BadLoad {
            slot: slot as u32,
            value,
        });
    }
    Ok(())
}

fn sum_loads(table: &[u32], slot_load: &[f64], shards: u32) -> Vec<f64> {
    let mut loads = vec![0.0; shards as usize];
    for (&shard, &l) in table.iter().zip(slot_load) {
        loads[shard as usize] += l;
    }
    loads
}

/// Total load and total weight of the participating (weight > 0) shards.
fn totals(loads: &[f64], weights: &[u32]) -> (f64, u64) {
    loads
        .iter()
        .zip(weights)
        .filter(|(_, &w)| w > 0)
        .fold((0.0, 0u64), |(l, w), (&li, &wi)| {
            (l + li, w + u64::from(wi))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::ShardSpec;

    fn even(shards: usize, slots: u32) -> ShardMap {
        ShardMap::initial_contiguous(&vec![ShardSpec::default(); shards], slots).expect("valid")
    }

    #[test]
    fn ratios_and_hot_shards() {
        assert_eq!(max_mean_ratio(&[3.0, 1.0]), 1.5);
        assert_eq!(max_mean_ratio(&[0.0, 0.0]), 1.0);
        assert_eq!(max_mean_ratio(&[]), 1.0);
        assert_eq!(max_mean_ratio_weighted(&[4.0, 2.0, 9.0], &[2, 1, 0]), 1.0);
        assert_eq!(hot_shards(&[8.0, 1.0, 1.0], &[1, 1, 1], 1.5), vec![0]);
        assert_eq!(
            hot_shards(&[8.0, 1.0, 1.0], &[4, 1, 1], 1.5),
            Vec::<u32>::new()
        );
        assert_eq!(hot_shards(&[0.0, 0.0], &[1, 1], 1.5), Vec::<u32>::new());
    }

    #[test]
    fn moves_hottest_slots_to_the_coolest_shard() {
        let map = even(3, 64);
        // Shard 0 (slots 0..22) carries 3 per slot, the others 1, with a few hot slots.
        let mut load: Vec<f64> = (0..64)
            .map(|s| if map.shard_of_slot(s) == 0 { 3.0 } else { 1.0 })
            .collect();
        load[5] = 10.0;
        load[40] = 2.0; // makes shard 1 warmer than shard 2
        let cfg = RebalanceConfig {
            max_slots_per_round: 8,
            ..RebalanceConfig::default()
        };
        let p = plan_rebalance(&map, &load, &cfg).expect("plan");
        assert!(p.ratio_before > 1.5, "{p:?}");
        assert!(p.ratio_after < p.ratio_before);
        assert!(p.plan.moved_slots() <= 8);
        assert!(p.plan.moves.iter().all(|m| m.from == 0), "{p:?}");
        let applied = map.apply(&p.plan).expect("applies");
        // The hottest slot went to the coolest shard.
        assert_eq!(applied.shard_of_slot(5), 2, "{p:?}");
        assert_eq!(shard_loads(&applied, &load).expect("ok"), p.loads_after);
        assert_eq!(plan_rebalance(&map, &load, &cfg), Ok(p), "deterministic");
    }

    #[test]
    fn stops_at_the_target_ratio_and_on_budget() {
        let map = even(2, 16);
        let load: Vec<f64> = (0..16).map(|s| if s < 8 { 2.0 } else { 1.0 }).collect();
        let p = plan_rebalance(&map, &load, &RebalanceConfig::default()).expect("plan");
        // 16 vs 8: moving 2 slots gives 12 vs 12... the planner stops once within 1.1.
        assert!(p.ratio_after <= 1.1, "{p:?}");
        assert_eq!(p.plan.moved_slots(), 2);
        let cfg = RebalanceConfig {
            max_slots_per_round: 1,
            ..RebalanceConfig::default()
        };
        assert_eq!(
            plan_rebalance(&map, &load, &cfg)
                .expect("plan")
                .plan
                .moved_slots(),
            1
        );
        let cfg = RebalanceConfig {
            max_slots_per_round: 0,
            ..RebalanceConfig::default()
        };
        assert!(plan_rebalance(&map, &load, &cfg)
            .expect("plan")
            .plan
            .is_empty());
    }

    #[test]
    fn never_swaps_the_hot_spot() {
        // One slot carries almost everything: moving it only makes another shard hot.
        let map = even(2, 8);
        let mut load = vec![0.0; 8];
        load[0] = 100.0;
        load[1] = 1.0;
        let p = plan_rebalance(&map, &load, &RebalanceConfig::default()).expect("plan");
        assert!(p.plan.moves.iter().all(|m| m.lo != 0), "{p:?}");
        assert!(p.ratio_after <= p.ratio_before);
    }

    #[test]
    fn idle_slots_and_drained_shards_stay_out() {
        let map =
            ShardMap::from_table(1, vec![1, 0, 1], vec![0, 0, 0, 0, 1, 1, 2, 2]).expect("valid");
        let load = vec![5.0, 5.0, 0.0, 0.0, 9.0, 9.0, 0.0, 0.0];
        let p = plan_rebalance(&map, &load, &RebalanceConfig::default()).expect("plan");
        assert!(!p.plan.is_empty());
        for m in &p.plan.moves {
            assert_ne!(m.from, 1);
            assert_ne!(m.to, 1);
            assert!(m.slots().all(|s| load[s as usize] > 0.0));
        }
        let idle = plan_rebalance(&map, &[0.0; 8], &RebalanceConfig::default()).expect("plan");
        assert!(idle.plan.is_empty());
        assert_eq!(idle.ratio_before, 1.0);
    }

    #[test]
    fn rejects_bad_input() {
        let map = even(2, 8);
        let cfg = RebalanceConfig::default();
        assert_eq!(
            plan_rebalance(&map, &[1.0; 7], &cfg),
            Err(RebalanceError::LoadLength { got: 7, slots: 8 })
        );
        let mut load = vec![1.0; 8];
        load[3] = -1.0;
        assert_eq!(
            plan_rebalance(&map, &load, &cfg),
            Err(RebalanceError::BadLoad {
                slot: 3,
                value: -1.0
            })
        );
        load[3] = f64::NAN;
        assert!(matches!(
            plan_rebalance(&map, &load, &cfg),
            Err(RebalanceError::BadLoad { slot: 3, .. })
        ));
        let bad = RebalanceConfig {
            hot_ratio: 0.5,
            ..cfg
        };
        assert!(matches!(
            plan_rebalance(&map, &[1.0; 8], &bad),
            Err(RebalanceError::BadConfig(_))
        ));
        assert_eq!(
            dense_loads(4, [(1, 2.0), (1, 1.0)]),
            Ok(vec![0.0, 3.0, 0.0, 0.0])
        );
        assert!(dense_loads(4, [(4, 1.0)]).is_err());
    }

    #[test]
    fn skewed_community_site_converges_in_rounds() {
        // Issue 6's scenario: 3 shards; the hot tenth of the users all live on shard 0 and
        // make 70% of the load. Rounds of 64 slots bring max/mean under 1.25.
        let mut map = ShardMap::initial(&[ShardSpec::default(); 3], 4096).expect("valid");
        let shard0: Vec<u32> = (0..4096).filter(|&s| map.shard_of_slot(s) == 0).collect();
        let hot_per_slot = 0.7 / shard0.len() as f64;
        let load: Vec<f64> = (0..4096u32)
            .map(|s| {
                0.3 / 4096.0
                    + if map.shard_of_slot(s) == 0 {
                        hot_per_slot
                    } else {
                        0.0
                    }
            })
            .collect();
        let before = max_mean_ratio(&shard_loads(&map, &load).expect("ok"));
        assert!(before > 2.0, "{before}");
        let cfg = RebalanceConfig {
            hot_ratio: 1.5,
            target_ratio: 1.1,
            max_slots_per_round: 64,
        };
        let mut rounds = 0;
        loop {
            let p = plan_rebalance(&map, &load, &cfg).expect("plan");
            if p.plan.is_empty() {
                break;
            }
            assert!(p.ratio_after <= p.ratio_before + 1e-12);
            map = map.apply(&p.plan).expect("applies");
            rounds += 1;
            assert!(rounds < 40, "does not converge");
        }
        let after = max_mean_ratio(&shard_loads(&map, &load).expect("ok"));
        assert!(after <= 1.1 + 1e-9, "{after} after {rounds} rounds");
        assert!(after < 1.25);
    }

    #[test]
    fn hot_tracker_needs_the_whole_window() {
        let mut t = HotTracker::new(1.5, Duration::from_secs(60));
        let w = [1, 1, 1];
        let hot = [8.0, 1.0, 1.0];
        let calm = [1.0, 1.0, 1.0];
        assert!(t.observe(Duration::from_secs(0), &hot, &w).is_empty());
        assert!(t.observe(Duration::from_secs(59), &hot, &w).is_empty());
        assert_eq!(t.observe(Duration::from_secs(60), &hot, &w), vec![0]);
        assert!(t.observe(Duration::from_secs(61), &calm, &w).is_empty());
        assert!(
            t.observe(Duration::from_secs(62), &hot, &w).is_empty(),
            "the window restarts"
        );
        assert_eq!(t.observe(Duration::from_secs(122), &hot, &w), vec![0]);
    }
}
