//! Pure SQL classification and routing: no I/O, no async.
//!
//! `session` tells what a statement does to session state, which the proxy needs to keep
//! settings from leaking between clients in transaction pooling and to pin clients that use
//! session-bound features. The planner ([`plan`]) decides where a statement runs: primary
//! or replica, which shard(s), and how to merge rows from several shards.

mod analyze;
mod cache;
pub mod catalog;
mod fast;
pub mod hint;
mod keys;
mod lex;
mod merge;
pub mod normalize;
mod planner;
pub mod scan;
pub mod session;
mod split;
pub mod types;

pub use cache::{PlanCache, SimplePlan};
pub use catalog::{Catalog, KeyType, ShardedTable};
pub use keys::parse_uuid;
pub use normalize::{normalize, Literal, Normalized};
pub use planner::{plan, plan_many, plan_with_hint};
pub use session::{classify, Pins, SessionEffects, SettingChange};
pub use split::{split_insert, InsertPart, SplitError};
pub use types::*;
