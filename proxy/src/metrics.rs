//! Prometheus metrics. Handles are registered once and kept, so the data path pays an
//! atomic increment, not a registry lookup.

use std::net::SocketAddr;

use metrics::{counter, gauge, Counter, Gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Installs the exporter with its HTTP listener (`/metrics`). Must run inside the runtime.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("cannot start metrics endpoint on {addr}: {e}"))
}

/// Process-wide handles.
#[derive(Clone)]
pub struct Metrics {
    pub clients: Gauge,
    pub client_logins: Counter,
    pub client_login_failures: Counter,
    pub queries: Counter,
    pub transactions: Counter,
    pub protocol_errors: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            clients: gauge!("shardgate_client_connections"),
            client_logins: counter!("shardgate_client_logins_total"),
            client_login_failures: counter!("shardgate_client_login_failures_total"),
            queries: counter!("shardgate_queries_total"),
            transactions: counter!("shardgate_transactions_total"),
            protocol_errors: counter!("shardgate_client_protocol_errors_total"),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Per-pool handles, labelled `pool="database/user"`.
pub struct PoolMetrics {
    pub size: Gauge,
    pub active: Gauge,
    pub idle: Gauge,
    pub waiting: Gauge,
    pub checkouts: Counter,
    pub connects: Counter,
    pub discards: Counter,
}

impl PoolMetrics {
    pub fn new(pool: &str) -> PoolMetrics {
        let label = pool.to_string();
        PoolMetrics {
            size: gauge!("shardgate_pool_size", "pool" => label.clone()),
            active: gauge!("shardgate_pool_active_connections", "pool" => label.clone()),
            idle: gauge!("shardgate_pool_idle_connections", "pool" => label.clone()),
            waiting: gauge!("shardgate_pool_waiting_clients", "pool" => label.clone()),
            checkouts: counter!("shardgate_pool_checkouts_total", "pool" => label.clone()),
            connects: counter!("shardgate_server_connections_opened_total", "pool" => label.clone()),
            discards: counter!("shardgate_server_connections_discarded_total", "pool" => label),
        }
    }
}

/// Per-host handles, labelled `shard` and `host`.
pub struct HostMetrics {
    pub up: Gauge,
    pub primary: Gauge,
    pub banned: Gauge,
    pub lag_bytes: Gauge,
    pub lag_seconds: Gauge,
}

impl HostMetrics {
    pub fn new(shard: usize, host: &str) -> HostMetrics {
        let (s, h) = (shard.to_string(), host.to_string());
        HostMetrics {
            up: gauge!("shardgate_host_up", "shard" => s.clone(), "host" => h.clone()),
            primary: gauge!("shardgate_host_primary", "shard" => s.clone(), "host" => h.clone()),
            banned: gauge!("shardgate_host_banned", "shard" => s.clone(), "host" => h.clone()),
            lag_bytes: gauge!("shardgate_replica_lag_bytes", "shard" => s.clone(), "host" => h.clone()),
            lag_seconds: gauge!("shardgate_replica_lag_seconds", "shard" => s, "host" => h),
        }
    }
}

/// Per-shard handles.
pub struct ShardMetrics {
    pub failovers: Counter,
    pub has_primary: Gauge,
    pub reads_on_replica: Counter,
    pub reads_on_primary: Counter,
    pub writes: Counter,
}

impl ShardMetrics {
    pub fn new(shard: usize) -> ShardMetrics {
        let s = shard.to_string();
        ShardMetrics {
            failovers: counter!("shardgate_failovers_total", "shard" => s.clone()),
            has_primary: gauge!("shardgate_shard_has_primary", "shard" => s.clone()),
            reads_on_replica: counter!("shardgate_reads_routed_total", "shard" => s.clone(), "role" => "replica"),
            reads_on_primary: counter!("shardgate_reads_routed_total", "shard" => s.clone(), "role" => "primary"),
            writes: counter!("shardgate_writes_routed_total", "shard" => s),
        }
    }
}
