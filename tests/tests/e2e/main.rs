//! End-to-end tests: real drivers through a real shardgate against the shared cluster.
//!
//! Run with `./tests/run.sh` (it starts the cluster and exports the `SHARDGATE_TEST_*`
//! variables). All tests live in this one binary so that the crate links once; each
//! area is a module. Every test starts its own shardgate and uses its own tables, so
//! tests run in parallel; heavy ones and timing-sensitive ones never overlap
//! (`shardgate_e2e::exclusive` / `timing`).
//!
//! `SHARDGATE_E2E_DIRECT=1` runs the tests against shard 0's primary without shardgate
//! (proxy-only tests skip themselves): a check of the tests' own logic.

mod auth;
mod cancel;
mod drivers;
mod fuzz;
mod metrics;
mod pgbench;
mod pinning;
mod pooling;
mod psql;
mod server_failure;
mod session_leaks;
mod session_state;
mod tls;
