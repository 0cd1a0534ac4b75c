//! Property tests: parsing never panics and round-trips, maps serialise byte-stably,
//! plans apply exactly, placement moves only what it must, and the rebalance planner
//! keeps its promises.

use proptest::prelude::*;
use shardgate_shardmap::rebalance::max_mean_ratio_weighted;
use shardgate_shardmap::{
    plan_rebalance, shard_loads, KeyType, KeyValue, MovePlan, RebalanceConfig, ShardMap, ShardSpec,
};

/// A valid map: 2^0..2^10 slots, 1..6 shards, weights 0..3 (at least one positive),
/// owners drawn at random (a scattered table, many ranges).
fn arb_map() -> impl Strategy<Value = ShardMap> {
    (
        0u32..=10,
        prop::collection::vec(0u32..4, 1..6),
        any::<u64>(),
        1u64..1000,
    )
        .prop_flat_map(|(bits, mut weights, _, version)| {
            if weights.iter().all(|&w| w == 0) {
                weights[0] = 1;
            }
            let slots = 1usize << bits;
            let shards = weights.len() as u32;
            prop::collection::vec(0..shards, slots).prop_map(move |table| {
                ShardMap::from_table(version, weights.clone(), table)
                    .expect("generated maps are valid")
            })
        })
}

/// A map with runs of owners (like real maps: few ranges), built from run lengths.
fn arb_runny_map() -> impl Strategy<Value = ShardMap> {
    (4u32..=10, 1u32..6).prop_flat_map(|(bits, shards)| {
        let slots = 1usize << bits;
        prop::collection::vec((0..shards, 1usize..64), 1..40).prop_map(move |runs| {
            let mut table = Vec::with_capacity(slots);
            for (shard, len) in runs.iter().cycle() {
                if table.len() >= slots {
                    break;
                }
                table.extend(std::iter::repeat(*shard).take(*len));
            }
            table.truncate(slots);
            ShardMap::from_table(1, vec![1; shards as usize], table).expect("valid")
        })
    })
}

/// Per-slot loads for a map: mostly small, some hot slots, some idle.
fn arb_loads(slots: usize) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(
        prop_oneof![
            3 => Just(0.0),
            10 => 0.0f64..10.0,
            2 => 10.0f64..1000.0,
        ],
        slots,
    )
}

fn arb_config() -> impl Strategy<Value = RebalanceConfig> {
    (1.0f64..3.0, 1.0f64..1.5, 0u32..200).prop_map(
        |(hot_ratio, target_ratio, max_slots_per_round)| RebalanceConfig {
            hot_ratio,
            target_ratio,
            max_slots_per_round,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn key_parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..40), oid in prop_oneof![Just(0u32), Just(20), Just(21), Just(23), Just(25), Just(1043), Just(2950), any::<u32>()]) {
        for ty in KeyType::ALL {
            let _ = KeyValue::from_text(ty, &bytes);
            let _ = KeyValue::from_binary(ty, oid, &bytes);
        }
    }

    /// Integer text of any length around the 18 digits parsed without overflow checks
    /// (leading zeros included), against a reference in i128: the value, or "out of
    /// range" for the type, as Postgres says.
    #[test]
    fn integer_text_of_any_length_parses_exactly(
        lead in "[ \t]{0,2}",
        sign in prop_oneof![Just(""), Just("+"), Just("-")],
        digits in "[0-9]{1,30}",
        trail in "[ \t]{0,2}",
    ) {
        let text = format!("{lead}{sign}{digits}{trail}");
        // At most 30 digits: always fits an i128.
        let magnitude: i128 = digits.parse().expect("30 digits fit an i128");
        let value = if sign == "-" { -magnitude } else { magnitude };
        for (ty, min, max) in [
            (KeyType::Int2, i128::from(i16::MIN), i128::from(i16::MAX)),
            (KeyType::Int4, i128::from(i32::MIN), i128::from(i32::MAX)),
            (KeyType::Int8, i128::from(i64::MIN), i128::from(i64::MAX)),
        ] {
            let got = KeyValue::from_text(ty, text.as_bytes());
            match value {
                v if (min..=max).contains(&v) => prop_assert_eq!(got, Ok(KeyValue::Int(v as i64)), "{} {:?}", ty, text),
                _ => prop_assert!(matches!(got, Err(shardgate_shardmap::KeyError::OutOfRange { .. })), "{} {:?}: {:?}", ty, text, got),
            }
        }
    }

    #[test]
    fn integer_text_and_binary_round_trip(v in any::<i64>()) {
        prop_assert_eq!(KeyValue::from_text(KeyType::Int8, v.to_string().as_bytes()), Ok(KeyValue::Int(v)));
        prop_assert_eq!(KeyValue::from_binary(KeyType::Int8, 0, &v.to_be_bytes()), Ok(KeyValue::Int(v)));
        let v4 = v as i32;
        prop_assert_eq!(KeyValue::from_text(KeyType::Int4, v4.to_string().as_bytes()), Ok(KeyValue::Int(i64::from(v4))));
        prop_assert_eq!(KeyValue::from_binary(KeyType::Int8, 23, &v4.to_be_bytes()), Ok(KeyValue::Int(i64::from(v4))));
        // Parsing int4 text of an out-of-range value fails rather than wrapping.
        if i32::try_from(v).is_err() {
            prop_assert!(KeyValue::from_text(KeyType::Int4, v.to_string().as_bytes()).is_err());
        }
    }

    #[test]
    fn uuid_display_round_trips(u in any::<[u8; 16]>()) {
        let k = KeyValue::Uuid(u);
        let shown = k.to_string();
        prop_assert_eq!(KeyValue::from_text(KeyType::Uuid, shown.as_bytes()), Ok(k.clone()));
        prop_assert_eq!(KeyValue::from_text(KeyType::Uuid, shown.replace('-', "").to_uppercase().as_bytes()), Ok(k));
    }

    #[test]
    fn map_toml_round_trips_byte_stably(map in arb_map()) {
        let text = map.to_toml();
        let parsed = ShardMap::from_toml(&text);
        prop_assert_eq!(parsed.as_ref(), Ok(&map));
        prop_assert_eq!(parsed.map(|m| m.to_toml()), Ok(text));
        // The ranges tile the slots and rebuild the same map.
        let ranges = map.ranges();
        prop_assert_eq!(ranges.iter().map(|r| r.len()).sum::<u32>(), map.slots());
        prop_assert!(ranges.windows(2).all(|w| w[0].hi + 1 == w[1].lo && w[0].shard != w[1].shard));
        prop_assert_eq!(ShardMap::from_ranges(map.version(), map.slots(), map.weights().to_vec(), &ranges), Ok(map.clone()));
        prop_assert_eq!(map.slot_counts().iter().sum::<u32>(), map.slots());
    }

    #[test]
    fn damaged_ranges_are_rejected(map in arb_runny_map(), pick in any::<prop::sample::Index>(), how in 0u8..4) {
        let mut ranges = map.ranges();
        let i = pick.index(ranges.len());
        match how {
            0 => { ranges.remove(i); }                               // gap (or an empty list)
            1 => { let r = ranges[i]; ranges.push(r); }              // overlap
            2 => { ranges[i].shard = map.shards(); }                 // unknown shard
            _ => { ranges[i].hi = map.slots(); }                     // out of bounds (or overlap)
        }
        let result = ShardMap::from_ranges(1, map.slots(), map.weights().to_vec(), &ranges);
        prop_assert!(result.is_err(), "{:?} accepted", ranges);
    }

    #[test]
    fn arbitrary_text_never_panics(text in "(version|slots|shards|weights|ranges|lo|hi|shard|[=\\[\\]{}, \n0-9-]){0,60}") {
        let _ = ShardMap::from_toml(&text);
    }

    #[test]
    fn plans_between_maps_apply_exactly(a in arb_map(), seed in any::<u64>()) {
        // Another table over the same shards.
        let shards = a.shards();
        let table: Vec<u32> = (0..a.slots())
            .map(|s| ((u64::from(s).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed) % u64::from(shards)) as u32)
            .collect();
        let b = ShardMap::from_table(a.version() + 7, a.weights().to_vec(), table).expect("valid");
        let plan = a.plan_to(&b).expect("same slots");
        let moved: u32 = plan.moved_slots();
        let differing = a.table().iter().zip(b.table()).filter(|(x, y)| x != y).count() as u32;
        prop_assert_eq!(moved, differing, "moves exactly the differing slots");
        let applied = a.apply(&plan).expect("applies");
        prop_assert_eq!(applied.table(), b.table());
        prop_assert_eq!(applied.version(), a.version() + 1);
        // A second application is stale.
        prop_assert!(applied.apply(&plan).is_err());
    }

    #[test]
    fn ring_add_and_remove_move_only_what_they_must(weights in prop::collection::vec(1u32..4, 1..5), new_weight in 1u32..4, bits in 4u32..=12, victim in any::<prop::sample::Index>()) {
        let specs: Vec<ShardSpec> = weights.iter().map(|&weight| ShardSpec { weight }).collect();
        let map = ShardMap::initial(&specs, 1 << bits).expect("valid");
        let n = map.shards();

        let add = map.plan_add_shard(ShardSpec { weight: new_weight }).expect("plan");
        prop_assert!(add.moves.iter().all(|m| m.to == n));
        let added = map.apply(&add).expect("applies");
        // The result is the ring placement of the new weights: nothing else moved.
        let mut specs_after = specs.clone();
        specs_after.push(ShardSpec { weight: new_weight });
        let ring = ShardMap::initial(&specs_after, 1 << bits).expect("valid");
        prop_assert_eq!(added.table(), ring.table());

        if n > 1 {
            let victim = victim.index(n as usize) as u32;
            let remove = map.plan_remove_shard(victim).expect("plan");
            prop_assert!(remove.moves.iter().all(|m| m.from == victim && m.to != victim));
            prop_assert_eq!(remove.moved_slots(), map.slot_counts()[victim as usize]);
            let removed = map.apply(&remove).expect("applies");
            prop_assert_eq!(removed.slot_counts().get(victim as usize).copied().unwrap_or(0), 0);
        }
    }

    #[test]
    fn balanced_reweight_is_exact_and_minimal(map in arb_runny_map(), weights in prop::collection::vec(0u32..4, 1..7)) {
        prop_assume!(weights.iter().any(|&w| w > 0));
        let plan = map.plan_reweight_balanced(&weights).expect("plan");
        let after = map.apply(&plan).expect("applies");
        let counts = after.slot_counts();
        let total: u32 = weights.iter().sum();
        for (shard, &w) in weights.iter().enumerate() {
            let exact = f64::from(w) * f64::from(map.slots()) / f64::from(total);
            prop_assert!((f64::from(counts[shard]) - exact).abs() < 1.0, "{:?} for {:?}", counts, weights);
        }
        // Minimal: only the surplus of each shard moves.
        let before = map.slot_counts();
        let surplus: u32 = (0..before.len()).map(|s| before[s].saturating_sub(counts.get(s).copied().unwrap_or(0))).sum();
        prop_assert_eq!(plan.moved_slots(), surplus);
    }

    #[test]
    fn rebalance_keeps_its_promises(map in arb_runny_map().prop_flat_map(|m| { let n = m.slots() as usize; (Just(m), arb_loads(n)) }), cfg in arb_config()) {
        let (map, load) = map;
        let p = plan_rebalance(&map, &load, &cfg).expect("valid input");
        prop_assert!(p.plan.moved_slots() <= cfg.max_slots_per_round);
        // Applies to the map it was made from: every slot still owned exactly once.
        let after = map.apply(&p.plan).expect("applies");
        prop_assert_eq!(after.slot_counts().iter().sum::<u32>(), map.slots());
        let loads_before = shard_loads(&map, &load).expect("ok");
        let loads_after = shard_loads(&after, &load).expect("ok");
        prop_assert_eq!(&loads_after, &p.loads_after);
        let before = max_mean_ratio_weighted(&loads_before, map.weights());
        let ratio_after = max_mean_ratio_weighted(&loads_after, after.weights());
        prop_assert!(ratio_after <= before * (1.0 + 1e-9), "ratio rose: {} -> {}", before, ratio_after);
        // No target ends hot.
        let total: f64 = loads_after.iter().sum();
        let mean = total / map.weights().iter().map(|&w| f64::from(w)).sum::<f64>();
        for m in &p.plan.moves {
            let level = loads_after[m.to as usize] / (f64::from(map.weights()[m.to as usize]) * mean);
            prop_assert!(level <= cfg.hot_ratio * (1.0 + 1e-9), "target {} ends at {}", m.to, level);
            prop_assert!(m.slots().all(|s| load[s as usize] > 0.0), "idle slot moved");
        }
        // Deterministic.
        prop_assert_eq!(plan_rebalance(&map, &load, &cfg).expect("valid"), p);
    }
}

#[test]
fn plan_of_an_identical_map_is_empty() {
    let m = ShardMap::initial(&[ShardSpec::default(); 2], 4096).expect("valid");
    let plan: MovePlan = m.plan_to(&m).expect("same slots");
    assert!(plan.is_empty());
}
