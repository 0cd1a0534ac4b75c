//! Compares the two placements for 1..=8 equal shards: slot balance, table ranges, and
//! what adding one more shard moves.
//! `cargo run -p shardgate-shardmap --example placement_stats`
use shardgate_shardmap::{ShardMap, ShardSpec, DEFAULT_SLOTS};

fn stats(m: &ShardMap) -> String {
    let counts = m.slot_counts();
    let mean = f64::from(DEFAULT_SLOTS) / counts.len() as f64;
    let max = counts.iter().copied().max().unwrap_or(0);
    format!(
        "max/mean {:.3}, {:4} ranges",
        f64::from(max) / mean,
        m.ranges().len()
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "ring (hashring, {} vnodes per weight) vs balanced (contiguous, count-balancing)",
        shardgate_shardmap::VNODES_PER_WEIGHT
    );
    for n in 1..=8usize {
        let specs = vec![ShardSpec::default(); n];
        let ring = ShardMap::initial(&specs, DEFAULT_SLOTS)?;
        let ring_add = ring.plan_add_shard(ShardSpec::default())?;
        let ring_after = ring.apply(&ring_add)?;
        let even = ShardMap::initial_contiguous(&specs, DEFAULT_SLOTS)?;
        let even_add = even.plan_add_shard_balanced(ShardSpec::default())?;
        let even_after = even.apply(&even_add)?;
        println!(
            "{n} shards: ring {} | +1 shard moves {:4}, then {} || balanced {} | +1 shard moves {:4}, then {}",
            stats(&ring),
            ring_add.moved_slots(),
            stats(&ring_after),
            stats(&even),
            even_add.moved_slots(),
            stats(&even_after),
        );
    }
    Ok(())
}
