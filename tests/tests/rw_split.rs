//! Read/write split acceptance tests (issue 3): routing by role, read-your-writes, replica
//! failure and lag, failover and fencing, through a real shardgate.
//!
//! Run with `./tests/run.sh --test rw_split` (or `-p shardgate-e2e --test rw_split`). The
//! routing and read-your-writes-under-load tests use the shared cluster of `tests/run.sh`
//! (shard 0: a primary and two replicas); tests that stop, pause or promote servers start
//! a cluster of their own (one shard, two replicas) with `deploy/local/cluster.sh` under
//! `$SHARDGATE_TEST_SCRATCH`, on ports from 23000 (`SHARDGATE_RW_SPLIT_PG_PORT`), and purge
//! it when done. Failover tests use synchronous replication unless
//! `SHARDGATE_RW_SPLIT_REPLICATION=async` (see `failover.rs`).

#[path = "rw_split/common.rs"]
mod common;
#[path = "rw_split/failover.rs"]
mod failover;
#[path = "rw_split/lag.rs"]
mod lag;
#[path = "rw_split/replica_stop.rs"]
mod replica_stop;
#[path = "rw_split/routing.rs"]
mod routing;
#[path = "rw_split/ryw.rs"]
mod ryw;
