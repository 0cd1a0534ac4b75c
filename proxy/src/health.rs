//! The health checker: one task per shard asks every host whether it is in recovery and how
//! far its WAL has come, feeds the answers to the shard's topology, and promotes a replica
//! when `auto_promote` is on and the primary stays gone. Control plane only: it uses
//! tokio-postgres on connections of its own, never the data path's.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
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
            Ok(Ok(o)) => {
                h.check_timeouts.store(0, Ordering::Relaxed);
                Some(o)
            }
            Ok(Err(e)) => {
                if h.is_up() {
                    tracing::warn!(shard = shard.index, host = %h.addr, "health check failed: {e}");
                }
                *client = None;
                None
            }
            Err(_) => {
                *client = None;
                // One slow answer from a host that is up (a busy server, a stalled VM) is
                // no evidence it is gone: it counts as down after two timeouts in a row.
                // A refused or broken connection counts at once, and sessions ban a host
                // they cannot reach without waiting for a check.
                let first = h.check_timeouts.fetch_add(1, Ordering::Relaxed) == 0;
                if first && h.is_up() && h.checked() && !shard.is_banned(h.index) {
                    tracing::info!(shard = shard.index, host = %h.addr, "health check timed out; checking again before taking the host out");
                    Some(h.last_observation())
                } else {
                    if h.is_up() {
                        tracing::warn!(shard = shard.index, host = %h.addr, "health check timed out");
                    }
                    None
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that accepts connections and never says a word: every check times out.
    #[test]
    fn one_timed_out_check_keeps_a_host_two_take_it_out() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = silent.local_addr().expect("addr");
            let held = tokio::spawn(async move {
                let mut conns = Vec::new();
                while let Ok((c, _)) = silent.accept().await {
                    conns.push(c);
                }
            });
            let shard = ShardTopology::new(0, &[addr]);
            let answered = Observation {
                in_recovery: false,
                lsn: 42,
                timeline: 1,
                replay_age: Duration::ZERO,
            };
            shard.observe(&[Some(answered)]);
            assert_eq!(shard.primary(), Some(0));
            let opts = HealthOptions {
                user: "u".into(),
                password: None,
                database: "d".into(),
                interval: Duration::from_millis(100),
                timeout: Duration::from_millis(100),
                auto_promote: false,
                auto_promote_after: Duration::from_secs(30),
            };
            let mut clients = vec![None];
            check_once(&shard, &mut clients, &opts).await;
            assert_eq!(shard.primary(), Some(0), "one timeout took the primary out");
            assert_eq!(shard.hosts[0].lsn(), 42, "the last answer stands");
            check_once(&shard, &mut clients, &opts).await;
            assert_eq!(
                shard.primary(),
                None,
                "two timeouts in a row kept the primary"
            );
            held.abort();
        });
    }
}
