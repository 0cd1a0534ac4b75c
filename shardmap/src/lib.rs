//! shardgate's shard map: which shard owns a key.
//!
//! * [`hash`]: Postgres's own hash functions, bit for bit, so that `slot(key)` equals the
//!   remainder Postgres's `PARTITION BY HASH` puts the key in ([`slot_of`]), and the same
//!   computation as SQL ([`slot_sql`]) for moving and checking rows on a server.
//! * [`key`]: shard-key types and values, decoded from the wire's text and binary formats.
//! * [`map`]: the versioned slot → shard table ([`ShardMap`]): O(1) lookup, validation,
//!   byte-stable TOML, display helpers.
//! * [`placement`]: the initial map and add/remove-shard plans from a weighted
//!   consistent-hash ring (`hashring`), used at planning time only; and a count-balancing
//!   alternative (`initial_contiguous`, `plan_*_balanced`) that is exact and keeps the
//!   table a handful of ranges.
//! * [`plan`]: slot moves, plans, diffs, applying a plan (next version).
//! * [`rebalance`]: the hot-shard planner: per-slot load in, a bounded [`MovePlan`] out.
//!
//! Pure: no I/O, no async, no clocks (time enters as arguments).

pub mod hash;
pub mod key;
pub mod map;
pub mod placement;
pub mod plan;
pub mod rebalance;

pub use hash::{
    hash_bytes_extended, hashint2extended, hashint4extended, hashint8extended, hashtextextended,
    key_hash, partition_hash, quote_ident, slot_of, slot_range_sql, slot_sql, uuid_hash_extended,
    HASH_COMBINE_ADD, HASH_PARTITION_SEED,
};
pub use key::{KeyError, KeyType, KeyValue};
pub use map::{
    MapError, RangeRef, ShardMap, ShardSpec, SlotRange, DEFAULT_SLOTS, MAX_SHARDS, MAX_SLOTS,
};
pub use placement::VNODES_PER_WEIGHT;
pub use plan::{MovePlan, PlanError, SlotMove};
pub use rebalance::{
    dense_loads, hot_shards, max_mean_ratio, max_mean_ratio_weighted, plan_rebalance, shard_loads,
    HotTracker, RebalanceConfig, RebalanceError, RebalancePlan,
};
