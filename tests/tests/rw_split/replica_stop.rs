//! Acceptance 3: a replica stopped (immediate shutdown) under a read load. Reads continue on
//! the other replica; only statements in flight at the stop may fail, with an error, not
//! a hang. Restarted, the replica serves reads again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardgate_e2e::{exclusive, skip_in_direct_mode, Proxy};
use tokio_postgres::Client;

use crate::common::*;

/// One statement of the read load: when it started and ended, and what it got.
#[derive(Debug, Clone)]
struct Outcome {
    started: Instant,
    ended: Instant,
    result: Result<Answer, String>,
}

const READERS: usize = 6;

/// What happened around the stop of replica 1 under a read load of `READERS` clients.
struct StopRun {
    log: Vec<Outcome>,
    stop_began: Instant,
    stop_done: Instant,
    /// When the first read that started after the stop succeeded.
    settled: Instant,
}

impl StopRun {
    fn failed(&self) -> Vec<&Outcome> {
        self.log.iter().filter(|o| o.result.is_err()).collect()
    }

    /// Failed statements that started before the stop completed.
    fn failed_in_stop_window(&self) -> Vec<&Outcome> {
        self.failed()
            .into_iter()
            .filter(|o| o.started < self.stop_done)
            .collect()
    }

    fn print(&self) {
        for o in self.failed() {
            let (rel, side) = if o.started < self.stop_done {
                (self.stop_done - o.started, "before")
            } else {
                (o.started - self.stop_done, "after")
            };
            eprintln!(
                "failed statement: started {rel:?} {side} the stop completed, took {:?}: {}",
                o.ended - o.started,
                o.result.as_ref().unwrap_err()
            );
        }
        let before = self
            .log
            .iter()
            .filter(|o| o.ended < self.stop_began)
            .count();
        eprintln!(
            "{before} reads before the stop (which took {:?}); {} failed ({} started before it \
             completed); settled {:?} after it",
            self.stop_done - self.stop_began,
            self.failed().len(),
            self.failed_in_stop_window().len(),
            self.settled.saturating_duration_since(self.stop_done),
        );
    }
}

/// Starts `READERS` clients looping `WHO` (half simple, half extended protocol; reconnecting
/// after an error), stops replica 1 with an immediate shutdown, waits until reads succeed
/// again and then for `after` more reads.
async fn stop_under_read_load(own: &OwnCluster, proxy: &Proxy, after: usize) -> StopRun {
    let url = proxy.url();
    let log: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..READERS {
        let (url, log, stop) = (url.clone(), log.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let extended = i % 2 == 1;
            let mut client: Option<Client> = None;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = match &client {
                    Some(c) if !c.is_closed() => who(c, extended).await,
                    _ => match connect_within(&url).await {
                        Ok(c) => who(client.insert(c), extended).await,
                        Err(e) => Err(e),
                    },
                };
                if result.is_err() {
                    client = None;
                }
                log.lock().unwrap().push(Outcome {
                    started,
                    ended: Instant::now(),
                    result,
                });
            }
        }));
    }
    let count = || log.lock().unwrap().len();
    let ok = poll_until(Duration::from_secs(10), || async {
        (count() >= 300).then_some(())
    })
    .await;
    assert!(ok.is_some(), "the read load does not run");

    let stop_began = Instant::now();
    own.stop(REPLICA1, "immediate").await;
    let stop_done = Instant::now();

    // Settling: until a read started after the stop succeeds.
    let settled = poll_until(Duration::from_secs(10), || async {
        log.lock()
            .unwrap()
            .iter()
            .filter(|o| o.started > stop_done && o.result.is_ok())
            .map(|o| o.ended)
            .min()
    })
    .await;
    // Then `after` more reads.
    let n = count();
    let more = poll_until(Duration::from_secs(20), || async {
        (count() >= n + after).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let run = StopRun {
        log: std::mem::take(&mut *log.lock().unwrap()),
        stop_began,
        stop_done,
        settled: settled.unwrap_or(stop_done),
    };
    run.print();
    assert!(
        settled.is_some(),
        "no read succeeded within 10 s of the replica stop"
    );
    assert!(more.is_some(), "the read load stalled after the stop");
    run
}

/// Both replicas serve a client's sequential simple-protocol reads.
async fn assert_both_replicas_read(proxy: &Proxy, r1: u16, r2: u16, when: &str) {
    let c = connect_within(&proxy.url()).await.unwrap();
    // Simple protocol only: how replicas share a mix of protocols is another test's
    // business (see routing.rs).
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(who(&c, false).await.unwrap());
    }
    assert!(
        seen.iter().any(|a| a.port == r1) && seen.iter().any(|a| a.port == r2),
        "both replicas should serve reads {when}: {:?}",
        tally(&seen)
    );
}

/// Reads carry on on the other replica with no failure once the stop is over (no statement
/// hangs), and the replica serves reads again once restarted and caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_replica_is_skipped_and_used_again_after_restart() {
    if skip_in_direct_mode("replica stop") {
        return;
    }
    let _load = exclusive().await;
    let own = OwnCluster::start("rw_replica_stop", 2).await;
    let (primary, r1, r2) = (
        own.port_of(PRIMARY),
        own.port_of(REPLICA1),
        own.port_of(REPLICA2),
    );
    // A long ban: the replica can only come back because the health checker unbans it.
    let proxy = own.proxy(&["ban_time = \"60s\""]).await;
    assert_both_replicas_read(&proxy, r1, r2, "before the stop").await;

    let run = stop_under_read_load(&own, &proxy, 600).await;
    let failed = run.failed();
    let hangs: Vec<_> = failed
        .iter()
        .filter(|o| o.result.as_ref().unwrap_err().contains("TIMEOUT"))
        .collect();
    assert!(hangs.is_empty(), "statements hung: {hangs:?}");
    let later: Vec<_> = failed
        .iter()
        .filter(|o| o.started >= run.stop_done)
        .collect();
    assert!(
        later.is_empty(),
        "statements started after the stop completed failed: {later:?}"
    );
    let after: Vec<&Outcome> = run.log.iter().filter(|o| o.started > run.settled).collect();
    let answers: Vec<Answer> = after.iter().filter_map(|o| o.result.clone().ok()).collect();
    eprintln!(
        "{} reads after settling: {:?}",
        after.len(),
        tally(&answers)
    );
    assert!(
        after.len() >= 500,
        "only {} reads after settling",
        after.len()
    );
    assert_eq!(answers.len(), after.len(), "reads failed after settling");
    assert!(
        answers.iter().all(|a| a.port == r2 && a.in_recovery),
        "after the stop, reads must all go to the other replica {r2} (primary {primary}): {:?}",
        tally(&answers)
    );

    // Restart it: once caught up it serves reads again (ban_time is 60 s: the checker
    // must be what brings it back).
    let restart = Instant::now();
    own.start_server(REPLICA1).await;
    own.wait_caught_up(REPLICA1, PRIMARY, Duration::from_secs(20))
        .await;
    let caught_up = restart.elapsed();
    let c = connect_within(&proxy.url()).await.unwrap();
    let back = poll_until(Duration::from_secs(10), || async {
        let a = who(&c, false).await.ok()?;
        (a.port == r1).then_some(a)
    })
    .await;
    assert!(
        back.is_some(),
        "the restarted replica {r1} served no read within 10 s of catching up"
    );
    eprintln!(
        "{REPLICA1} restarted, caught up after {caught_up:?}, serving reads again after {:?}",
        restart.elapsed()
    );
    assert_both_replicas_read(&proxy, r1, r2, "after the restart").await;
}

/// The strict form of the acceptance: the only statements that fail are those in flight on
/// the stopped server (at most one per client). A shutting-down server refuses new
/// connections (57P03) or resets them for a while before it stops listening; a statement
/// that shardgate sends there in that window never ran anywhere and should have gone to
/// the other replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_stop_fails_only_statements_in_flight() {
    if skip_in_direct_mode("replica stop, strict") {
        return;
    }
    let _load = exclusive().await;
    let own = OwnCluster::start("rw_replica_stop_strict", 6).await;
    let proxy = own.proxy(&[]).await;
    let run = stop_under_read_load(&own, &proxy, 200).await;
    let refused: Vec<&Outcome> = run
        .failed()
        .into_iter()
        .filter(|o| {
            let e = o.result.as_ref().unwrap_err();
            e.contains("57P03") || e.contains("reset by peer") || e.starts_with("connect:")
        })
        .collect();
    assert!(
        refused.is_empty(),
        "{} statements failed on new connections to the stopping replica (never in flight \
         there): {:#?}",
        refused.len(),
        refused
            .iter()
            .map(|o| o.result.as_ref().unwrap_err())
            .collect::<Vec<_>>()
    );
    let n = run.failed().len();
    assert!(
        n <= READERS,
        "{n} statements failed, but only {READERS} clients can have one in flight at the stop"
    );
}
