//! Acceptance 4: a replica whose WAL replay is paused falls behind by more than
//! `max_replica_lag_bytes` and gets no reads until it has caught up.

use std::time::{Duration, Instant};

use shardgate_e2e::{exclusive, skip_in_direct_mode};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_replica_gets_no_reads_until_it_catches_up() {
    if skip_in_direct_mode("replica lag") {
        return;
    }
    let _load = exclusive().await;
    let own = OwnCluster::start("rw_lag", 3).await;
    let (r1, r2) = (own.port_of(REPLICA1), own.port_of(REPLICA2));
    const MAX_LAG: u64 = 65536;
    let proxy = own
        .proxy(&[&format!("max_replica_lag_bytes = {MAX_LAG}")])
        .await;
    let c = connect_within(&proxy.url()).await.unwrap();
    // Simple protocol only: how replicas share a mix of protocols is another test's
    // business (see routing.rs).
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(who(&c, false).await.unwrap());
    }
    assert!(
        answers.iter().any(|a| a.port == r1) && answers.iter().any(|a| a.port == r2),
        "both replicas should serve reads at first: {:?}",
        tally(&answers)
    );

    own.su(REPLICA1, "SELECT pg_wal_replay_pause()").await;
    // Writes on the primary, well past the limit (~1 MB of WAL).
    own.su(
        PRIMARY,
        "CREATE TABLE filler AS SELECT g AS id, repeat('x', 200) AS pad \
         FROM generate_series(1, 5000) g",
    )
    .await;
    let paused_at = Instant::now();
    let r1_host = host(r1);
    let lag = poll_until(Duration::from_secs(10), || async {
        let lag = metric(
            &proxy,
            "shardgate_replica_lag_bytes",
            &[("host", r1_host.as_str())],
        )
        .await?;
        (lag > MAX_LAG as f64).then_some(lag)
    })
    .await
    .expect("shardgate did not report the paused replica's lag within 10 s");
    eprintln!(
        "shardgate sees {REPLICA1} {lag} bytes behind after {:?}",
        paused_at.elapsed()
    );

    let mut answers = Vec::new();
    for i in 0..60 {
        answers.push(who(&c, i % 2 == 1).await.unwrap());
    }
    eprintln!("60 reads with {REPLICA1} lagging: {:?}", tally(&answers));
    assert!(
        answers.iter().all(|a| a.port == r2 && a.in_recovery),
        "reads went to the lagging replica {r1} (or the primary): {:?}",
        tally(&answers)
    );

    own.su(REPLICA1, "SELECT pg_wal_replay_resume()").await;
    let resumed = Instant::now();
    let back = poll_until(Duration::from_secs(10), || async {
        let a = who(&c, false).await.ok()?;
        (a.port == r1).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "{REPLICA1} served no read within 10 s of resuming replay"
    );
    eprintln!(
        "{REPLICA1} serves reads again {:?} after replay resumed",
        resumed.elapsed()
    );
    let mut answers = Vec::new();
    for _ in 0..40 {
        answers.push(who(&c, false).await.unwrap());
    }
    assert!(
        answers.iter().any(|a| a.port == r1) && answers.iter().any(|a| a.port == r2),
        "both replicas should share reads again: {:?}",
        tally(&answers)
    );
}
