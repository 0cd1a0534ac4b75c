//! The health checker: one task per shard asks every host whether it is in recovery and how
//! far its WAL has come, feeds the answers to the shard's topology, and promotes a replica
//! when `auto_promote` is on and the primary stays gone. Control plane only: it uses
//! tokio-postgres on connections of its own, never the data path's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::topology::{parse_lsn, Observation, ShardTopology};

pub struct HealthOptions {
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub auto_promote: bool,
    pub auto_promote_after: Duration,
}

/// Role, WAL position, replay age, and a primary's timeline (the first 8 hex digits of its
/// current WAL file name).
const CHECK_SQL: &str = "SELECT pg_is_in_recovery(), \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text, \
     COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0)::float8, \
     CASE WHEN pg_is_in_recovery() THEN '' ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END";

/// Checks every host once and applies the result; used at startup and by the loop.
pub async fn check_once(
    shard: &ShardTopology,
    clients: &mut [Option<Client>],
    opts: &HealthOptions,
) {
    let mut results = Vec::with_capacity(shard.hosts.len());
    for (h, client) in shard.hosts.iter().zip(clients.iter_mut()) {
        let r = tokio::time::timeout(opts.timeout, check_host(h.addr, client, opts)).await;
        let obs = match r {
            Ok(Ok(o)) => Some(o),
            Ok(Err(e)) => {
                if h.is_up() {
                    tracing::warn!(shard = shard.index, host = %h.addr, "health check failed: {e}");
                }
                *client = None;
                None
            }
            Err(_) => {
                if h.is_up() {
                    tracing::warn!(shard = shard.index, host = %h.addr, "health check timed out");
                }
                *client = None;
                None
            }
        };
        results.push(obs);
    }
    shard.observe(&results);
}

/// Checks `shard` every interval for as long as a configuration generation uses it (the
/// task holds it weakly and ends once a reload replaced it).
pub fn spawn(
    shard: std::sync::Weak<ShardTopology>,
    opts: Arc<HealthOptions>,
    mut clients: Vec<Option<Client>>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(opts.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(shard) = shard.upgrade() else {
                return;
            };
            check_once(&shard, &mut clients, &opts).await;
            if opts.auto_promote {
                maybe_promote(&shard, &mut clients, &opts).await;
            }
        }
    });
}

async fn check_host(
    addr: SocketAddr,
    client: &mut Option<Client>,
    opts: &HealthOptions,
) -> Result<Observation, tokio_postgres::Error> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = Some(connect(addr, opts).await?);
    }
    let Some(c) = client.as_ref() else {
        unreachable!("connected above")
    };
    let row = c.query_one(CHECK_SQL, &[]).await?;
    let lsn: Option<String> = row.get(1);
    let timeline: Option<String> = row.get(3);
    Ok(Observation {
        in_recovery: row.get(0),
        lsn: lsn.as_deref().and_then(parse_lsn).unwrap_or(0),
        timeline: timeline
            .and_then(|t| u32::from_str_radix(&t, 16).ok())
            .unwrap_or(0),
        replay_age: Duration::from_secs_f64(row.get::<_, f64>(2).max(0.0)),
    })
}

async fn connect(addr: SocketAddr, opts: &HealthOptions) -> Result<Client, tokio_postgres::Error> {
    crate::server::connect_client(
        addr,
        &opts.user,
        opts.password.as_deref(),
        &opts.database,
        "shardgate health check",
        opts.timeout,
    )
    .await
}

/// Promotes the most caught-up replica once the primary has been gone long enough.
async fn maybe_promote(
    shard: &ShardTopology,
    clients: &mut [Option<Client>],
    opts: &HealthOptions,
) {
    let Some(down) = shard.primary_down_for() else {
        return;
    };
    if down < opts.auto_promote_after || shard.primary().is_some() {
        return;
    }
    let Some(candidate) = shard.promotion_candidate() else {
        return;
    };
    let host = &shard.hosts[candidate];
    let Some(client) = clients[candidate].as_ref() else {
        return;
    };
    tracing::warn!(shard = shard.index, host = %host.addr, "primary gone for {down:?}: promoting the most caught-up replica");
    match client.query_one("SELECT pg_promote(true, 60)", &[]).await {
        Ok(row) if row.get::<_, bool>(0) => {
            tracing::warn!(shard = shard.index, host = %host.addr, "promoted");
            check_once(shard, clients, opts).await;
        }
        Ok(_) => {
            tracing::error!(shard = shard.index, host = %host.addr, "pg_promote returned false")
        }
        Err(e) => tracing::error!(shard = shard.index, host = %host.addr, "promotion failed: {e}"),
    }
}
