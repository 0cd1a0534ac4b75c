//! Pure SQL classification and routing: no I/O, no async.
//!
//! - [`session`] tells what a statement does to session state (settings to replay, pins).
//! - [`plan`] decides where a statement runs: [`Role`] (primary or replica), [`Target`]
//!   (which shards), and for reads spanning shards a [`MergePlan`] (and a rewritten SQL text
//!   when the merge needs helper columns or a pushed-down LIMIT). Statements shardgate
//!   cannot run correctly get a [`Refusal`] (SQLSTATE 0A000 mostly) instead of a wrong
//!   answer.
//! - [`PlanCache`] caches plans per query text; for the simple protocol it caches per
//!   normalized shape ([`normalize`]), so `... WHERE aid = 1` and `... WHERE aid = 2` share a
//!   plan.
//! - [`split_insert`] builds the per-shard statements of a multi-row INSERT.
//!
//! # How routing is decided
//!
//! Key extraction follows the AND-chain of WHERE clauses and inner JOIN conditions:
//! `key = constant`, `key = $n`, `key IN (...)`, `key = ANY($n)`, qualified or not. A key
//! under OR/NOT or inside an expression (`id % 3 = $1`) is not a key. Beyond single tables,
//! the planner tracks every occurrence of a sharded table and the shard-key equalities that
//! tie occurrences together (joins on keys, correlated subqueries on keys,
//! `key IN (SELECT key ...)`). A statement runs on the shard(s) of its keys when every
//! sharded table in it is tied to a key constant; otherwise on every shard when every
//! sharded table is tied to the top-level query's tables (so each shard can answer its part
//! alone) and the top-level query's result can be merged; otherwise it is refused.
//!
//! # For the proxy
//!
//! - A plan is valid for the [`Catalog`] it was made with: drop caches when it changes.
//! - `KeyExpr::Param(n)`: in the extended protocol the n-th Bind value (decode text or
//!   binary for the target's [`KeyType`]; a value that does not decode as the key type
//!   makes Postgres fail or match nothing, so any one shard may run it). In a
//!   [`SimplePlan`]: the n-th literal, resolved with [`SimplePlan::key_value`] (always
//!   resolvable: texts whose literals do not type are planned on their own).
//! - One shard resolved: send the original text, ignore `merge`/`rewritten`. Several:
//!   `multi_shard_refusal` if set, else send `rewritten` (or the original) everywhere and
//!   merge as [`MergePlan`] says (see its docs for the order of steps).
//! - `Target::Each`: run on every shard, answer with one shard's result (reference-table
//!   writes, DDL). `Target::All` writes: one transaction per shard, command tags summed.
//! - Inside a transaction, statements follow the transaction's connection(s); `tx` tells
//!   transaction control. `BEGIN`'s role is `Replica` only for READ ONLY non-SERIALIZABLE.
//! - `no_tx_block`: do not wrap per-shard execution in BEGIN/COMMIT.
//! - Ordering text columns in a merge must follow the database collation the shards sort
//!   with (byte order is right only for `C` collation).

mod analyze;
mod cache;
pub mod catalog;
mod combine;
pub mod encoding;
mod fast;
pub mod hint;
mod keys;
mod lex;
mod merge;
mod normalize;
mod planner;
pub mod scan;
pub mod session;
mod split;
pub mod types;

pub use cache::{PlanCache, SimplePlan, MAX_CACHED_TEXT};
pub use catalog::{Catalog, KeyType, ShardedTable};
pub use combine::{ColumnInfo, MergeError, MergeParams, RowMerger};
pub use encoding::{ClientEncoding, TextReading, Unreadable};
pub use keys::parse_uuid;
pub use normalize::{normalize, Literal, Normalized};
pub use planner::{plan, plan_many, plan_with_hint, separate_statements};
pub use session::{
    classify, deallocated_name, is_parse_time_setting, Pins, SessionEffects, SettingChange,
    NOT_RESET_BY_ALL, PARSE_TIME_SETTINGS,
};
pub use split::{split_insert, InsertPart, SplitError};
pub use types::*;
