//! Prometheus metrics and the HTTP endpoint that serves them (`/metrics`), liveness
//! (`/health`) and readiness (`/ready`: every shard has a reachable primary).
//!
//! Handles are registered once and kept, so the data path pays an atomic increment, not a
//! registry lookup. The endpoint is a few lines of HTTP/1.0 over tokio rather than a web
//! framework: it serves three fixed paths to a scraper.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, Counter, Gauge, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::tally::Tally;
use crate::topology::ShardTopology;

/// Latency buckets in seconds (histograms, not summaries, so they aggregate across proxies).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Whether metrics are exported (`metrics_listen` set): when not, the data path skips
/// even the clock reads for latency.
static ENABLED: AtomicBool = AtomicBool::new(false);

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Installs the recorder; returns the handle that renders the exposition text.
pub fn install() -> Result<PrometheusHandle, String> {
    ENABLED.store(true, Ordering::Relaxed);
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    gauge!("shardgate_up").set(1.0);
    gauge!("shardgate_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// Serves `/metrics`, `/health` and `/ready` on `addr` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    shards: Vec<Arc<ShardTopology>>,
    process: Arc<crate::app::Process>,
) -> Result<(), String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    let shards = Arc::new(shards);
    // Histogram samples accumulate until drained: drain them on a timer, not only when a
    // scraper happens to come, or an unscraped proxy would grow without bound.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let handle = handle.clone();
            let shards = shards.clone();
            let process = process.clone();
            tokio::spawn(async move {
                let mut req = [0u8; 2048];
                let mut n = 0;
                // Read the request head (bounded in size and time); the path is all we need.
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while n < req.len() {
                        match sock.read(&mut req[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                        if req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let line = req[..n].split(|b| *b == b'\n').next().unwrap_or_default();
                let path = line.split(|b| *b == b' ').nth(1).unwrap_or_default();
                let (status, ctype, body) = match path {
                    b"/metrics" => {
                        let app = process.current();
                        if let Some(app) = &app {
                            for pools in app.pools.values() {
                                for shard in &pools.shards {
                                    for pool in &shard.hosts {
                                        pool.publish_gauges();
                                    }
                                }
                            }
                        }
                        crate::tally::publish_all();
                        let mut text = handle.render();
                        if let Some(app) = &app {
                            render_query_latency(app, &mut text);
                            render_shard_maps(app, &mut text);
                        }
                        ("200 OK", "text/plain; version=0.0.4", text)
                    }
                    b"/health" => ("200 OK", "text/plain", "ok\n".to_string()),
                    b"/ready" => {
                        let missing: Vec<usize> = shards
                            .iter()
                            .filter(|s| s.primary().is_none())
                            .map(|s| s.index)
                            .collect();
                        if missing.is_empty() {
                            ("200 OK", "text/plain", "ready\n".to_string())
                        } else {
                            (
                                "503 Service Unavailable",
                                "text/plain",
                                format!("no reachable primary for shard(s) {missing:?}\n"),
                            )
                        }
                    }
                    _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
                };
                let head = format!(
                    "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(())
}

fn describe() {
    describe_gauge!("shardgate_up", "1 while the process runs");
    describe_gauge!("shardgate_build_info", "Build information (value 1)");
    describe_gauge!(
        "shardgate_client_connections",
        "Client connections logged in"
    );
    describe_counter!("shardgate_client_logins_total", "Successful client logins");
    describe_counter!(
        "shardgate_client_login_failures_total",
        "Client logins refused (unknown user, wrong password)"
    );
    describe_counter!(
        "shardgate_client_protocol_errors_total",
        "Client connections closed for malformed protocol messages"
    );
    describe_counter!(
        "shardgate_errors_total",
        "Errors shardgate itself sent to clients, by SQLSTATE class"
    );
    describe_counter!(
        "shardgate_queries_total",
        "Statements forwarded (simple queries and Execute messages)"
    );
    describe_counter!(
        "shardgate_fanout_queries_total",
        "Statements run on more than one shard (results merged or command tags summed)"
    );
    describe_counter!(
        "shardgate_transactions_total",
        "Server connections attached to clients (one per transaction in transaction pooling)"
    );
    describe_gauge!(
        "shardgate_pool_size",
        "Configured server connections per pool"
    );
    describe_gauge!(
        "shardgate_pool_active_connections",
        "Server connections lent to clients"
    );
    describe_gauge!("shardgate_pool_idle_connections", "Idle server connections");
    describe_gauge!(
        "shardgate_pool_waiting_clients",
        "Clients waiting for a server connection"
    );
    describe_counter!(
        "shardgate_pool_checkouts_total",
        "Server connections checked out of the pool"
    );
    describe_counter!(
        "shardgate_server_connections_opened_total",
        "Server connections opened"
    );
    describe_counter!(
        "shardgate_server_connections_discarded_total",
        "Server connections closed instead of returned (dirty, broken)"
    );
    describe_histogram!(
        "shardgate_pool_checkout_wait_seconds",
        Unit::Seconds,
        "Time a client waited for a server connection"
    );
    describe_gauge!(
        "shardgate_host_up",
        "1 when the last health check reached the host"
    );
    describe_gauge!(
        "shardgate_host_primary",
        "1 for the host shardgate writes to"
    );
    describe_gauge!("shardgate_host_banned", "1 while a host is out of rotation");
    describe_gauge!(
        "shardgate_replica_lag_bytes",
        Unit::Bytes,
        "WAL bytes a replica is behind its primary"
    );
    describe_gauge!(
        "shardgate_replica_lag_seconds",
        Unit::Seconds,
        "Age of the last transaction a replica replayed"
    );
    describe_counter!(
        "shardgate_failovers_total",
        "Primary changes seen per shard"
    );
    describe_gauge!(
        "shardgate_shard_has_primary",
        "1 when the shard has a usable primary"
    );
    describe_counter!(
        "shardgate_reads_routed_total",
        "Read transactions routed, by where they went"
    );
    describe_counter!("shardgate_writes_routed_total", "Write transactions routed");
    describe_counter!(
        "shardgate_moves_started_total",
        "Slot-move jobs started (by hand or by auto_rebalance)"
    );
    describe_counter!(
        "shardgate_moves_completed_total",
        "Slot-move jobs that moved every slot"
    );
    describe_counter!(
        "shardgate_moves_failed_total",
        "Slot-move jobs that stopped on an error (the failed cut-over rolled back)"
    );
    describe_counter!(
        "shardgate_move_rows_copied_total",
        "Rows copied to a new owner by slot moves"
    );
    describe_histogram!(
        "shardgate_move_pause_seconds",
        Unit::Seconds,
        "How long a cut-over paused new transactions on its slots"
    );
    describe_gauge!(
        "shardgate_shard_load",
        "Keyed statements per second routed to the shard's slots over the last rebalance_interval"
    );
    describe_gauge!(
        "shardgate_shard_load_ratio",
        "Hottest shard's load over the mean (weighted), over the last rebalance_interval"
    );
}

/// Process-wide handles.
#[derive(Clone)]
pub struct Metrics {
    pub clients: Gauge,
    pub client_logins: Counter,
    pub client_login_failures: Counter,
    pub protocol_errors: Counter,
    /// Statements run on more than one shard.
    pub fanout_queries: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            clients: gauge!("shardgate_client_connections"),
            client_logins: counter!("shardgate_client_logins_total"),
            client_login_failures: counter!("shardgate_client_login_failures_total"),
            protocol_errors: counter!("shardgate_client_protocol_errors_total"),
            fanout_queries: counter!("shardgate_fanout_queries_total"),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Counts an error shardgate sends a client, by SQLSTATE class (the first two characters).
pub fn count_error(sqlstate: &str) {
    let class = sqlstate.get(..2).unwrap_or("XX").to_string();
    counter!("shardgate_errors_total", "class" => class).increment(1);
}

/// Per-pool handles, labelled `pool="database/user@host"`.
pub struct PoolMetrics {
    pub checkout_wait: metrics::Histogram,
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
            checkout_wait: metrics::histogram!("shardgate_pool_checkout_wait_seconds", "pool" => label.clone()),
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
    /// From forwarding a query (or an extended batch's Sync) to its ReadyForQuery.
    pub query_seconds: LatencyHistogram,
    pub up: Gauge,
    pub primary: Gauge,
    pub banned: Gauge,
    pub lag_bytes: Gauge,
    pub lag_seconds: Gauge,
    /// Statements forwarded to this host (simple queries and Executes).
    pub queries: Tally,
    /// Server connections checked out from this host for a transaction.
    pub transactions: Tally,
}

impl HostMetrics {
    pub fn new(shard: usize, host: &str) -> HostMetrics {
        let (s, h) = (shard.to_string(), host.to_string());
        HostMetrics {
            query_seconds: LatencyHistogram::default(),
            up: gauge!("shardgate_host_up", "shard" => s.clone(), "host" => h.clone()),
            primary: gauge!("shardgate_host_primary", "shard" => s.clone(), "host" => h.clone()),
            banned: gauge!("shardgate_host_banned", "shard" => s.clone(), "host" => h.clone()),
            lag_bytes: gauge!("shardgate_replica_lag_bytes", "shard" => s.clone(), "host" => h.clone()),
            lag_seconds: gauge!("shardgate_replica_lag_seconds", "shard" => s.clone(), "host" => h.clone()),
            queries: Tally::new(
                counter!("shardgate_queries_total", "shard" => s.clone(), "host" => h.clone()),
            ),
            transactions: Tally::new(
                counter!("shardgate_transactions_total", "shard" => s, "host" => h),
            ),
        }
    }
}

/// Per-shard handles.
pub struct ShardMetrics {
    pub failovers: Counter,
    pub has_primary: Gauge,
    pub reads_on_replica: Tally,
    pub reads_on_primary: Tally,
    pub writes: Tally,
}

impl ShardMetrics {
    pub fn new(shard: usize) -> ShardMetrics {
        let s = shard.to_string();
        ShardMetrics {
            failovers: counter!("shardgate_failovers_total", "shard" => s.clone()),
            has_primary: gauge!("shardgate_shard_has_primary", "shard" => s.clone()),
            reads_on_replica: Tally::new(
                counter!("shardgate_reads_routed_total", "shard" => s.clone(), "role" => "replica"),
            ),
            reads_on_primary: Tally::new(
                counter!("shardgate_reads_routed_total", "shard" => s.clone(), "role" => "primary"),
            ),
            writes: Tally::new(counter!("shardgate_writes_routed_total", "shard" => s)),
        }
    }
}

/// A latency histogram with the fixed buckets of the metrics contract: two adds per sample
/// (`tally::add`: no locked instruction with one runtime thread), rendered at scrape
/// time. (The exporter's histograms keep every sample until the next upkeep, which cost a
/// measurable share of a transaction's CPU.)
#[derive(Default)]
pub struct LatencyHistogram {
    /// Samples per bucket (not cumulative); the last one is +Inf.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.partition_point(|le| *le < secs);
        crate::tally::add(&self.counts[i], 1);
        crate::tally::add(
            &self.sum_nanos,
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        );
    }

    /// Adds this histogram's samples into `into` (per-bucket counts, then the sum).
    fn add_to(&self, into: &mut [u64; LATENCY_BUCKETS.len() + 2]) {
        for (i, c) in self.counts.iter().enumerate() {
            into[i] += c.load(Ordering::Relaxed);
        }
        into[LATENCY_BUCKETS.len() + 1] += self.sum_nanos.load(Ordering::Relaxed);
    }
}

/// `shardgate_query_duration_seconds{shard,host}`, summed over databases that share a
/// host (one series per label set).
fn render_query_latency(app: &crate::app::App, text: &mut String) {
    use std::collections::BTreeMap;
    use std::fmt::Write;
    let mut series: BTreeMap<(usize, String), [u64; LATENCY_BUCKETS.len() + 2]> = BTreeMap::new();
    for shards in app.topologies.values() {
        for t in shards {
            for h in &t.hosts {
                let entry = series
                    .entry((t.index, h.addr.to_string()))
                    .or_insert([0; LATENCY_BUCKETS.len() + 2]);
                h.metrics.query_seconds.add_to(entry);
            }
        }
    }
    const NAME: &str = "shardgate_query_duration_seconds";
    let _ = writeln!(text, "# HELP {NAME} Time from forwarding a query (or an extended-protocol batch) to its ReadyForQuery.");
    let _ = writeln!(text, "# TYPE {NAME} histogram");
    for ((shard, host), v) in series {
        let labels = format!("shard=\"{shard}\",host=\"{host}\"");
        let mut cumulative = 0u64;
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += v[i];
            let _ = writeln!(text, "{NAME}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        cumulative += v[LATENCY_BUCKETS.len()];
        let _ = writeln!(text, "{NAME}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = v[LATENCY_BUCKETS.len() + 1] as f64 / 1e9;
        let _ = writeln!(text, "{NAME}_sum{{{labels}}} {sum}");
        let _ = writeln!(text, "{NAME}_count{{{labels}}} {cumulative}");
    }
}

/// The routing of every sharded database of a configuration generation (once each).
fn routings(app: &crate::app::App) -> Vec<Arc<crate::routing::Routing>> {
    let mut out: Vec<Arc<crate::routing::Routing>> = Vec::new();
    for pools in app.pools.values() {
        if let Some(r) = &pools.routing {
            if !out.iter().any(|o| Arc::ptr_eq(o, r)) {
                out.push(r.clone());
            }
        }
    }
    out.sort_by(|a, b| a.database.cmp(&b.database));
    out
}

/// Shard-map metrics, rendered from the current maps at scrape time: the hottest slots
/// change from window to window, and a slot that cools down must disappear rather than
/// linger as a stale series.
fn render_shard_maps(app: &crate::app::App, text: &mut String) {
    use std::fmt::Write;
    let routings = routings(app);
    if routings.is_empty() {
        return;
    }
    text.push_str("# HELP shardgate_shardmap_version Version of the shard map in use.\n# TYPE shardgate_shardmap_version gauge\n");
    for r in &routings {
        let _ = writeln!(
            text,
            "shardgate_shardmap_version{{database=\"{}\"}} {}",
            r.database,
            r.map().version()
        );
    }
    text.push_str("# HELP shardgate_shard_slots Slots owned by each shard.\n# TYPE shardgate_shard_slots gauge\n");
    for r in &routings {
        for (shard, n) in r.map().slot_counts().iter().enumerate() {
            let _ = writeln!(
                text,
                "shardgate_shard_slots{{database=\"{}\",shard=\"{shard}\"}} {n}",
                r.database
            );
        }
    }
    text.push_str("# HELP shardgate_slot_load Keyed statements per second of the hottest slots (top 20, last window).\n# TYPE shardgate_slot_load gauge\n");
    for r in &routings {
        for (slot, shard, rate) in r.hot_slots() {
            let _ = writeln!(
                text,
                "shardgate_slot_load{{database=\"{}\",slot=\"{slot}\",shard=\"{shard}\"}} {rate:.3}",
                r.database
            );
        }
    }
}
