//! Two-phase commit bookkeeping: the global transaction ids, crash recovery on start, and
//! the fault points tests use to kill the proxy mid-commit.
//!
//! A transaction that wrote on several shards is prepared on each writer under
//! `shardgate:<node>:<incarnation>:<coordinator shard>:<coordinator xid>` and committed on the
//! coordinator first. So the coordinator's transaction is the decision: after a crash,
//! `txid_status(xid)` on the coordinator says whether it committed, and every other shard's
//! prepared transaction follows it. No journal of our own is needed, and the decision
//! survives the loss of the proxy's machine. `<node>` is the proxy's listen port, so that
//! proxies on different ports sharing the shards leave each other's transactions alone;
//! `<incarnation>` tells this process's transactions (in flight: never touched) from
//! those of an earlier process on the same port (dead: resolved).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::app::App;

/// This proxy among proxies sharing the shards: its host name and listen port (two
/// processes cannot listen on one port of one host at once).
pub fn node_name(port: u16) -> String {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let host = HOST.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into buf.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let name = if rc == 0 {
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        } else {
            String::new()
        };
        // Only characters that are safe inside a quoted gid and our ':' separator.
        let clean: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
            .take(64)
            .collect();
        if clean.is_empty() {
            "host".into()
        } else {
            clean
        }
    });
    format!("{host}-{port}")
}

pub fn gid(node: u16, coordinator_shard: u32, xid: &str) -> String {
    format!("{}{coordinator_shard}:{xid}", own_gid_prefix(node))
}

/// The start of every gid this process gives its prepared transactions.
pub fn own_gid_prefix(node: u16) -> String {
    format!("shardgate:{}:{:x}:", node_name(node), incarnation())
}

/// This process among the processes that ever served `node`: its start time in
/// nanoseconds (two processes cannot hold one listen port at once).
fn incarnation() -> u64 {
    static STARTED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    })
}

/// Parses a global id of this node left by another incarnation: (coordinator shard, xid).
fn parse_gid(gid: &str, node: u16, own: u64) -> Option<(usize, i64)> {
    let rest = gid.strip_prefix("shardgate:")?;
    let (n, rest) = rest.split_once(':')?;
    if n != node_name(node) {
        return None;
    }
    let (inc, rest) = rest.split_once(':')?;
    if u64::from_str_radix(inc, 16).ok()? == own {
        return None;
    }
    let (shard, xid) = rest.split_once(':')?;
    Some((shard.parse().ok()?, xid.parse().ok()?))
}

/// Aborts the process at a named point when `SHARDGATE_FAULT` names it (tests only: the
/// abort is as abrupt as SIGKILL).
pub fn fault(point: &str) {
    static FAULT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let f = FAULT.get_or_init(|| std::env::var("SHARDGATE_FAULT").ok());
    if f.as_deref() == Some(point) {
        tracing::error!("SHARDGATE_FAULT={point}: aborting");
        std::process::abort();
    }
}

/// Resolves the prepared transactions this node left behind, for every database that uses
/// two-phase commit. Retries in the background until every shard answered.
pub fn spawn_recovery(app: Arc<App>) {
    for db in app
        .config
        .databases
        .iter()
        .filter(|d| d.two_phase_commit && d.shards.len() > 1)
    {
        let app = app.clone();
        let name = db.name.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(200);
            for _ in 0..200 {
                match recover(&app, &name).await {
                    Ok(n) => {
                        if n > 0 {
                            tracing::info!(database = %name, resolved = n, "prepared transactions resolved");
                        }
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(database = %name, "resolving prepared transactions: {e}; retrying");
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        });
    }
}

async fn recover(app: &App, database: &str) -> Result<usize, String> {
    let db = app.config.database(database).ok_or("database gone")?;
    let topo = app.topologies.get(database).ok_or("database gone")?;
    let node = app.config.general.listen.port();
    // One connection per (shard, owner), opened as needed.
    let mut clients: Vec<Vec<(String, Client)>> = topo.iter().map(|_| Vec::new()).collect();
    let mut primaries = Vec::with_capacity(topo.len());
    for (i, t) in topo.iter().enumerate() {
        let p = t
            .primary()
            .ok_or_else(|| format!("shard {i} has no primary yet"))?;
        primaries.push(t.hosts[p].addr);
    }
    // Every leftover, per shard: (gid, owner).
    let mut found: Vec<Vec<(String, String)>> = Vec::with_capacity(topo.len());
    let any_user = app
        .config
        .health_check_user()
        .ok_or("no user with a password")?;
    for (i, addr) in primaries.iter().enumerate() {
        let c = client_for(
            app,
            db.server_database(),
            *addr,
            any_user.server_user(),
            &mut clients[i],
        )
        .await?;
        let rows = c
            .query(
                "SELECT gid, owner::text FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE $1",
                &[&format!("shardgate:{}:%", node_name(node))],
            )
            .await
            .map_err(|e| format!("shard {i}: {e}"))?;
        found.push(rows.iter().map(|r| (r.get(0), r.get(1))).collect());
    }
    let mut resolved = 0;
    for (i, leftovers) in found.iter().enumerate() {
        for (gid, owner) in leftovers {
            let Some((coord, xid)) = parse_gid(gid, node, incarnation()) else {
                continue;
            };
            if coord >= primaries.len() {
                continue;
            }
            let status: Option<String> = {
                let c = client_for(
                    app,
                    db.server_database(),
                    primaries[coord],
                    owner,
                    &mut clients[coord],
                )
                .await?;
                c.query_one("SELECT txid_status($1)::text", &[&xid])
                    .await
                    .map_err(|e| format!("shard {coord}: {e}"))?
                    .get(0)
            };
            let committed = status.as_deref() == Some("committed");
            let sql = if committed {
                format!("COMMIT PREPARED '{gid}'")
            } else {
                format!("ROLLBACK PREPARED '{gid}'")
            };
            let c = client_for(
                app,
                db.server_database(),
                primaries[i],
                owner,
                &mut clients[i],
            )
            .await?;
            c.batch_execute(&sql)
                .await
                .map_err(|e| format!("shard {i}: {sql}: {e}"))?;
            tracing::warn!(shard = i, gid = %gid, committed, "resolved a prepared transaction left by a crash");
            resolved += 1;
        }
    }
    Ok(resolved)
}

/// A connection to `addr` as the server user `owner` (a prepared transaction can only be
/// finished by its owner or a superuser).
async fn client_for<'a>(
    app: &App,
    database: &str,
    addr: SocketAddr,
    owner: &str,
    cache: &'a mut Vec<(String, Client)>,
) -> Result<&'a Client, String> {
    if let Some(i) = cache.iter().position(|(o, _)| o == owner) {
        return Ok(&cache[i].1);
    }
    let user = app
        .config
        .users
        .iter()
        .find(|u| u.server_user() == owner && u.server_password().is_some())
        .ok_or_else(|| format!("no configured user logs in to the servers as \"{owner}\""))?;
    let client = crate::server::connect_client(
        addr,
        owner,
        user.server_password(),
        database,
        "shardgate 2pc recovery",
        app.config.general.server_connect_timeout,
    )
    .await
    .map_err(|e| format!("{addr}: {e}"))?;
    cache.push((owner.to_string(), client));
    Ok(&cache[cache.len() - 1].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_round_trip_and_other_nodes_are_ignored() {
        let g = gid(6432, 1, "7781");
        // This process's own transactions are in flight: never resolved.
        assert_eq!(parse_gid(&g, 6432, incarnation()), None);
        assert_eq!(parse_gid(&g, 6432, incarnation() + 1), Some((1, 7781)));
        assert_eq!(parse_gid(&g, 6433, incarnation() + 1), None);
        assert_eq!(parse_gid("other:6432:5:1:2", 6432, 0), None);
        // Another host's proxy on the same port is not us.
        assert_eq!(parse_gid("shardgate:elsewhere-6432:5:1:2", 6432, 0), None);
    }
}
