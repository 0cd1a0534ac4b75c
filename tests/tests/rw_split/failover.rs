//! Acceptance 5 and 6: the primary is killed under a write load. A replica is promoted (by
//! the operator, or by shardgate with `auto_promote`); writes resume through shardgate within
//! 5 s of the promotion, every acknowledged write is on the new primary, and the old
//! primary, restarted as a primary that was never demoted, gets no writes.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use shardgate_e2e::{exclusive, skip_in_direct_mode, Proxy};

use crate::common::*;

/// How a test's cluster replicates. `Async` is what `cluster.sh` sets up; `Sync` makes every
/// commit wait until both replicas have flushed it (`synchronous_standby_names`), which is
/// what it takes for "acknowledged means on the replica" to hold when the primary dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    Async,
    Sync,
}

/// The replication mode the failover tests use: `SHARDGATE_RW_SPLIT_REPLICATION=async`
/// switches back to plain streaming replication.
fn replication() -> Replication {
    match std::env::var("SHARDGATE_RW_SPLIT_REPLICATION").as_deref() {
        Ok("async") => Replication::Async,
        _ => Replication::Sync,
    }
}

async fn failover_cluster(tag: &str, slot: u16, mode: Replication) -> OwnCluster {
    let own = OwnCluster::start(tag, slot).await;
    own.su(PRIMARY, LEDGER_DDL).await;
    own.su(PRIMARY, "ALTER TABLE ledger OWNER TO app").await;
    // What auto_promote needs: the health-check user may call pg_promote() (superuser only
    // by default). Granted on the primary, it replicates.
    own.su(
        PRIMARY,
        "GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO app",
    )
    .await;
    if mode == Replication::Sync {
        own.su(
            PRIMARY,
            "ALTER SYSTEM SET synchronous_standby_names = 'ANY 2 (\"shard0-replica1\", \"shard0-replica2\")'",
        )
        .await;
        own.su(PRIMARY, "SELECT pg_reload_conf()").await;
        let synced = poll_until(Duration::from_secs(10), || async {
            let n = own
                .try_su(
                    PRIMARY,
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')",
                )
                .await
                .ok()?;
            (n == "2").then_some(())
        })
        .await;
        assert!(synced.is_some(), "replicas did not become synchronous");
    }
    for r in [REPLICA1, REPLICA2] {
        own.wait_caught_up(r, PRIMARY, Duration::from_secs(10))
            .await;
    }
    own
}

/// Checks every acknowledged id is on the server `name`; panics with the missing ones.
async fn assert_ledger_complete(
    own: &OwnCluster,
    name: &str,
    acked: &[Ack],
    kill_done: Instant,
    mode: Replication,
) {
    let present = ledger_ids(&own.direct_url(name)).await;
    let old = own.port_of(PRIMARY);
    let missing: Vec<String> = acked
        .iter()
        .filter(|a| !present.contains(&a.id))
        .map(|a| {
            format!(
                "id {} acknowledged by port {} {:?} before the kill completed",
                a.id,
                a.port,
                kill_done.saturating_duration_since(a.at)
            )
        })
        .collect();
    let by_old = acked.iter().filter(|a| a.port == old).count();
    eprintln!(
        "ledger ({mode:?} replication): {} writes acknowledged ({by_old} by the old primary), \
         {} rows on {name}, {} acknowledged ids missing",
        acked.len(),
        present.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged writes are missing on the new primary {name} ({mode:?} replication): \
         {:#?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
}

fn describe_failures(failures: &[(Instant, String)], kill_began: Instant) {
    for (at, e) in failures.iter().take(20) {
        let when = if *at >= kill_began {
            format!("+{:?}", *at - kill_began)
        } else {
            format!("-{:?}", kill_began - *at)
        };
        eprintln!("write failed at kill {when}: {e}");
    }
    if failures.len() > 20 {
        eprintln!("... {} write failures in all", failures.len());
    }
}

async fn has_primary(proxy: &Proxy) -> Option<f64> {
    metric(proxy, "shardgate_shard_has_primary", &[("shard", "0")]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_failover_keeps_acknowledged_writes_and_fences_the_old_primary() {
    if skip_in_direct_mode("failover") {
        return;
    }
    let _load = exclusive().await;
    let mode = replication();
    let own = failover_cluster("rw_failover", 4, mode).await;
    let (old, new) = (own.port_of(PRIMARY), own.port_of(REPLICA1));
    let proxy = own.proxy(&["failover_timeout = \"20s\""]).await;
    let load = WriteLoad::start(proxy.url(), 4, Duration::from_secs(30));
    assert!(
        load.wait_more_acks(300, Duration::from_secs(15)).await,
        "the write load does not run"
    );

    let kill_began = Instant::now();
    own.stop(PRIMARY, "immediate").await;
    let kill_done = Instant::now();
    eprintln!(
        "killed {PRIMARY} (port {old}) in {:?}",
        kill_done - kill_began
    );
    // The operator notices (shardgate reports the shard without a primary), then promotes.
    let noticed = poll_until(Duration::from_secs(10), || async {
        (has_primary(&proxy).await? == 0.0).then_some(())
    })
    .await;
    assert!(
        noticed.is_some(),
        "shardgate still reports a primary 10 s after the kill"
    );
    eprintln!(
        "shardgate saw no primary {:?} after the kill",
        kill_done.elapsed()
    );
    own.promote(REPLICA1).await;
    let promoted = Instant::now();
    eprintln!(
        "promoted {REPLICA1} (port {new}) {:?} after the kill",
        promoted - kill_done
    );

    let resumed = poll_until(Duration::from_secs(10), || async { load.first_ack_on(new) }).await;
    let Some(resumed) = resumed else {
        panic!("no write acknowledged by the new primary within 10 s of the promotion");
    };
    let resumed_after = resumed.saturating_duration_since(promoted);
    eprintln!("writes resumed {resumed_after:?} after the promotion");
    assert!(
        resumed_after <= Duration::from_secs(5),
        "writes resumed {resumed_after:?} after the promotion (limit 5 s)"
    );
    assert!(
        load.wait_more_acks(200, Duration::from_secs(10)).await,
        "the write load stalls after the failover"
    );
    let (acked, failures) = load.finish().await;
    describe_failures(&failures, kill_began);
    let stray: Vec<&Ack> = acked
        .iter()
        .filter(|a| a.port != old && a.port != new)
        .collect();
    assert!(
        stray.is_empty(),
        "writes acknowledged by a replica: {stray:?}"
    );
    assert_ledger_complete(&own, REPLICA1, &acked, kill_done, mode).await;
    let failovers = metric(&proxy, "shardgate_failovers_total", &[("shard", "0")]).await;
    assert_eq!(failovers, Some(1.0), "shardgate_failovers_total");

    // 6. The old primary comes back as a primary that was never demoted: split brain
    // material. shardgate must not write to it (nor read from it).
    own.start_server(PRIMARY).await;
    let restarted = Instant::now();
    assert_eq!(
        own.su(PRIMARY, "SELECT pg_is_in_recovery()").await,
        "f",
        "the old primary should come back as a primary"
    );
    let base = own.su(PRIMARY, "SELECT count(*) FROM ledger").await;
    let old_host = host(old);
    let seen_up = poll_until(Duration::from_secs(10), || async {
        let up = metric(&proxy, "shardgate_host_up", &[("host", old_host.as_str())]).await?;
        (up == 1.0).then_some(())
    })
    .await;
    assert!(
        seen_up.is_some(),
        "shardgate's health check did not see the restarted old primary within 10 s"
    );
    eprintln!(
        "shardgate sees the old primary up {:?} after its restart",
        restarted.elapsed()
    );
    let load = WriteLoad::start(proxy.url(), 4, Duration::from_secs(10));
    let more = load.wait_more_acks(300, Duration::from_secs(15)).await;
    let c = connect_within(&proxy.url()).await.unwrap();
    let mut answers = Vec::new();
    for i in 0..40 {
        answers.push(who(&c, i % 2 == 1).await.unwrap());
    }
    let (acked2, failures2) = load.finish().await;
    describe_failures(&failures2, kill_began);
    assert!(more, "writes stall once the old primary is back");
    assert!(
        failures2.is_empty(),
        "writes failed with the old primary back: {failures2:?}"
    );
    let after = own.su(PRIMARY, "SELECT count(*) FROM ledger").await;
    eprintln!(
        "old primary: {base} ledger rows at its restart, {after} after {} more writes through \
         shardgate; reads: {:?}",
        acked2.len(),
        tally(&answers)
    );
    assert_eq!(
        base, after,
        "shardgate wrote to the old primary after it came back (split brain)"
    );
    assert!(
        acked2.iter().all(|a| a.port == new),
        "writes acknowledged by a server other than the new primary {new}"
    );
    assert!(
        answers.iter().all(|a| a.port != old),
        "reads went to the fenced old primary {old}: {:?}",
        tally(&answers)
    );
    let present: HashSet<i64> = ledger_ids(&own.direct_url(REPLICA1)).await;
    let missing = acked2.iter().filter(|a| !present.contains(&a.id)).count();
    assert_eq!(
        missing, 0,
        "writes acknowledged after the old primary's return are not on {REPLICA1}"
    );
}

/// Polls both replicas directly until one reports it is no longer in recovery.
async fn watch_promotion(own: &OwnCluster) -> tokio::task::JoinHandle<Option<(Instant, u16)>> {
    let mut clients = Vec::new();
    for r in [REPLICA1, REPLICA2] {
        let c = connect_within(&own.direct_url(r)).await.unwrap();
        clients.push((c, own.port_of(r)));
    }
    tokio::spawn(async move {
        poll_until(Duration::from_secs(30), || async {
            for (c, port) in &clients {
                if let Ok(Ok(row)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    c.query_one("SELECT pg_is_in_recovery()", &[]),
                )
                .await
                {
                    if !row.get::<_, bool>(0) {
                        return Some((Instant::now(), *port));
                    }
                }
            }
            None
        })
        .await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_promote_fails_over_without_an_operator() {
    if skip_in_direct_mode("auto promote") {
        return;
    }
    let _load = exclusive().await;
    let mode = replication();
    let own = failover_cluster("rw_autopromote", 5, mode).await;
    let proxy = own
        .proxy(&[
            "failover_timeout = \"20s\"",
            "auto_promote = true",
            "auto_promote_after = \"2s\"",
        ])
        .await;
    let load = WriteLoad::start(proxy.url(), 4, Duration::from_secs(30));
    assert!(
        load.wait_more_acks(300, Duration::from_secs(15)).await,
        "the write load does not run"
    );
    let watcher = watch_promotion(&own).await;
    let kill_began = Instant::now();
    own.stop(PRIMARY, "immediate").await;
    let kill_done = Instant::now();
    eprintln!("killed {PRIMARY} in {:?}", kill_done - kill_began);

    let Some((promoted, new)) = watcher.await.unwrap() else {
        panic!("no replica was promoted within 30 s of the kill (auto_promote_after = 2s)");
    };
    let name = if new == own.port_of(REPLICA1) {
        REPLICA1
    } else {
        REPLICA2
    };
    eprintln!(
        "shardgate promoted {name} (port {new}) {:?} after the kill",
        promoted - kill_done
    );
    let resumed = poll_until(Duration::from_secs(10), || async { load.first_ack_on(new) }).await;
    let Some(resumed) = resumed else {
        panic!("no write acknowledged by the new primary within 10 s of its promotion");
    };
    let resumed_after = resumed.saturating_duration_since(promoted);
    eprintln!(
        "writes resumed {resumed_after:?} after the promotion, {:?} after the kill",
        resumed - kill_done
    );
    assert!(
        load.wait_more_acks(200, Duration::from_secs(10)).await,
        "the write load stalls after the failover"
    );
    let (acked, failures) = load.finish().await;
    describe_failures(&failures, kill_began);

    let mut promoted_hosts = Vec::new();
    for r in [REPLICA1, REPLICA2] {
        if own.su(r, "SELECT pg_is_in_recovery()").await == "f" {
            promoted_hosts.push(r);
        }
    }
    assert_eq!(
        promoted_hosts,
        vec![name],
        "exactly one replica should be promoted"
    );
    assert!(
        promoted - kill_done >= Duration::from_millis(1500),
        "promoted {:?} after the kill, before auto_promote_after (2 s)",
        promoted - kill_done
    );
    assert!(
        resumed_after <= Duration::from_secs(5),
        "writes resumed {resumed_after:?} after the promotion (limit 5 s)"
    );
    assert_ledger_complete(&own, name, &acked, kill_done, mode).await;
}

/// What shardgate learns in a failover lives in its memory. A shardgate started after the
/// failover (a restart, or a second instance) finds two hosts that say they are primaries:
/// the promoted replica and the old primary that came back without being demoted. Writes
/// must go to the promoted one (a later timeline), never to the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_started_after_failover_writes_to_the_promoted_primary() {
    if skip_in_direct_mode("fresh proxy after failover") {
        return;
    }
    let _load = exclusive().await;
    let own = failover_cluster("rw_fresh_proxy", 7, Replication::Async).await;
    let (old, new) = (own.port_of(PRIMARY), own.port_of(REPLICA1));
    own.stop(PRIMARY, "immediate").await;
    own.promote(REPLICA1).await;
    own.start_server(PRIMARY).await;
    for name in [PRIMARY, REPLICA1] {
        let tli = own
            .su(
                name,
                "SELECT pg_is_in_recovery()::text || ', WAL timeline ' || \
                 substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
            )
            .await;
        eprintln!("{name}: in recovery {tli}");
    }
    let base = own.su(PRIMARY, "SELECT count(*) FROM ledger").await;
    let proxy = own.proxy(&["failover_timeout = \"5s\""]).await;
    let load = WriteLoad::start(proxy.url(), 2, Duration::from_secs(10));
    let ran = load.wait_more_acks(50, Duration::from_secs(10)).await;
    let (acked, failures) = load.finish().await;
    let ports: std::collections::BTreeSet<u16> = acked.iter().map(|a| a.port).collect();
    let after = own.su(PRIMARY, "SELECT count(*) FROM ledger").await;
    eprintln!(
        "{} writes through a shardgate started after the failover went to ports {ports:?} \
         (old primary {old}: {base} -> {after} rows; failures: {})",
        acked.len(),
        failures.len()
    );
    assert!(ran, "writes do not run: {failures:?}");
    assert!(
        acked.iter().all(|a| a.port == new),
        "writes went to the old primary {old} rather than the promoted {new}: split brain \
         ({base} -> {after} ledger rows on the old primary)"
    );
}

/// With no primary and nobody promoting one, a write waits `failover_timeout` and then gets
/// a clear connection-class error (no hang), while reads carry on on the replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_fail_cleanly_after_failover_timeout_and_reads_continue() {
    if skip_in_direct_mode("failover timeout") {
        return;
    }
    let _load = exclusive().await;
    let own = failover_cluster("rw_failover_timeout", 8, Replication::Async).await;
    let proxy = own.proxy(&["failover_timeout = \"2s\""]).await;
    let writer = connect_within(&proxy.url()).await.unwrap();
    let port: i32 = writer
        .query_one(
            "INSERT INTO ledger (id, writer) VALUES (1, 0) RETURNING port",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, own.port_of(PRIMARY));
    own.stop(PRIMARY, "immediate").await;

    let mut outcomes = Vec::new();
    for (i, extended) in [(2, false), (3, true)] {
        // A fresh client: the first one's server connection died with the primary.
        let c = connect_within(&proxy.url()).await.unwrap();
        let began = Instant::now();
        let r = if extended {
            within(
                Duration::from_secs(10),
                "insert",
                c.execute(
                    "INSERT INTO ledger (id, writer) VALUES ($1, 0)",
                    &[&(i as i64)],
                ),
            )
            .await
            .map(|_| ())
        } else {
            within(
                Duration::from_secs(10),
                "insert",
                c.simple_query(&format!("INSERT INTO ledger (id, writer) VALUES ({i}, 0)")),
            )
            .await
            .map(|_| ())
        };
        let took = began.elapsed();
        eprintln!("write without a primary (extended={extended}): {r:?} after {took:?}");
        outcomes.push((extended, r, took));
        // Reads still work, on a replica.
        let a = who(&c, extended).await;
        eprintln!("read without a primary: {a:?}");
        let a = a.unwrap_or_else(|e| panic!("a read failed while the primary is down: {e}"));
        assert!(a.in_recovery, "read served by {a:?}");
    }
    for (extended, r, took) in outcomes {
        let e = r.expect_err("a write succeeded with no primary");
        assert!(
            !e.contains("TIMEOUT"),
            "extended={extended}: the write hung: {e}"
        );
        assert!(
            e.contains(" 08") || e.contains(" 57P"),
            "extended={extended}: expected a connection-class error (08xxx/57Pxx), got {e}"
        );
        assert!(
            took >= Duration::from_millis(1500) && took <= Duration::from_secs(5),
            "extended={extended}: the write failed after {took:?}, failover_timeout is 2 s"
        );
    }
}

/// The strict form for writes: when the primary dies, only the writes in flight on it fail
/// (at most one per client); later writes queue until the new primary is found. A dying
/// server first refuses new connections (57P03) or resets them for a while; writes that
/// shardgate sends there in that window never ran and should have waited for the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_kill_fails_only_writes_in_flight() {
    if skip_in_direct_mode("primary kill, strict") {
        return;
    }
    let _load = exclusive().await;
    let own = failover_cluster("rw_failover_strict", 9, replication()).await;
    let new = own.port_of(REPLICA1);
    let proxy = own.proxy(&["failover_timeout = \"20s\""]).await;
    const WRITERS: usize = 4;
    let load = WriteLoad::start(proxy.url(), WRITERS, Duration::from_secs(30));
    assert!(
        load.wait_more_acks(300, Duration::from_secs(15)).await,
        "the write load does not run"
    );
    let kill_began = Instant::now();
    own.stop(PRIMARY, "immediate").await;
    own.promote(REPLICA1).await;
    let resumed = poll_until(Duration::from_secs(10), || async { load.first_ack_on(new) }).await;
    assert!(resumed.is_some(), "writes did not resume");
    let (_, failures) = load.finish().await;
    describe_failures(&failures, kill_began);
    let refused: Vec<&String> = failures
        .iter()
        .map(|(_, e)| e)
        .filter(|e| e.contains("57P03") || e.contains("reset by peer"))
        .collect();
    assert!(
        refused.is_empty(),
        "{} writes failed on new connections to the dying primary instead of waiting for the \
         failover: {refused:#?}",
        refused.len()
    );
    assert!(
        failures.len() <= WRITERS,
        "{} writes failed, but only {WRITERS} can have been in flight at the kill",
        failures.len()
    );
}
