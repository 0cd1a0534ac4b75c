//! Which host of a shard is the primary, which replicas may serve reads, and how far behind
//! each replica is. The health checker (`health.rs`) writes these facts; the data path only
//! reads atomics, never waits on a lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardgate_config::LoadBalance;
use tokio::sync::Notify;

use crate::metrics::{HostMetrics, ShardMetrics};

const NONE: usize = usize::MAX;

/// One configured server of a shard.
pub struct Host {
    pub addr: SocketAddr,
    pub index: usize,
    /// The last health check reached it.
    up: AtomicBool,
    /// Out of rotation until this many ms after the topology's epoch (0: not banned).
    banned_until_ms: AtomicU64,
    in_recovery: AtomicBool,
    /// Primary: its current WAL position; replica: its replay position.
    lsn: AtomicU64,
    /// A primary's WAL timeline: a promoted replica's is higher than the primary it
    /// replaced, which tells the two apart when both claim to be primary.
    timeline: AtomicU32,
    lag_bytes: AtomicU64,
    lag_ms: AtomicU64,
    /// Transactions in flight on this host through shardgate.
    pub outstanding: AtomicUsize,
    /// A former primary that was replaced: never used until it reports being a replica.
    fenced: AtomicBool,
    /// Whether any health check has answered yet.
    checked: AtomicBool,
    /// Health checks in a row that timed out (see `health::check_once`).
    pub check_timeouts: AtomicU32,
    pub metrics: HostMetrics,
}

impl Host {
    fn new(shard: usize, addr: SocketAddr, index: usize) -> Host {
        Host {
            metrics: HostMetrics::new(shard, &addr.to_string()),
            addr,
            index,
            up: AtomicBool::new(true),
            banned_until_ms: AtomicU64::new(0),
            in_recovery: AtomicBool::new(index != 0),
            lsn: AtomicU64::new(0),
            timeline: AtomicU32::new(0),
            lag_bytes: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            outstanding: AtomicUsize::new(0),
            fenced: AtomicBool::new(false),
            checked: AtomicBool::new(false),
            check_timeouts: AtomicU32::new(0),
        }
    }

    /// A health check has answered at least once.
    pub fn checked(&self) -> bool {
        self.checked.load(Ordering::Relaxed)
    }

    /// What the last answered health check said, as if it had just said it again.
    pub fn last_observation(&self) -> Observation {
        Observation {
            in_recovery: self.in_recovery(),
            lsn: self.lsn(),
            timeline: self.timeline.load(Ordering::Relaxed),
            replay_age: self.lag(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
    pub fn in_recovery(&self) -> bool {
        self.in_recovery.load(Ordering::Relaxed)
    }
    pub fn lsn(&self) -> u64 {
        self.lsn.load(Ordering::Relaxed)
    }
    pub fn lag_bytes(&self) -> u64 {
        self.lag_bytes.load(Ordering::Relaxed)
    }
    pub fn lag(&self) -> Duration {
        Duration::from_millis(self.lag_ms.load(Ordering::Relaxed))
    }
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }
}

/// What a health check learned about a host.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    pub in_recovery: bool,
    pub lsn: u64,
    /// The WAL timeline of a primary (0 for a replica).
    pub timeline: u32,
    pub replay_age: Duration,
}

pub struct ShardTopology {
    pub index: usize,
    pub hosts: Vec<Arc<Host>>,
    primary: AtomicUsize,
    /// Woken whenever the primary changes, for writes queued during a failover.
    changed: Notify,
    rr: AtomicUsize,
    epoch: Instant,
    pub failovers: AtomicU64,
    /// When the primary was first seen down (ms after epoch; 0: it is up).
    primary_down_since_ms: AtomicU64,
    pub metrics: ShardMetrics,
}

/// How reads pick a replica.
#[derive(Debug, Clone, Copy)]
pub struct ReadPolicy {
    pub primary_reads: bool,
    pub max_lag_bytes: u64,
    pub max_lag_time: Option<Duration>,
    pub balance: LoadBalance,
}

impl ShardTopology {
    pub fn new(index: usize, addrs: &[SocketAddr]) -> ShardTopology {
        ShardTopology {
            index,
            hosts: addrs
                .iter()
                .enumerate()
                .map(|(i, a)| Arc::new(Host::new(index, *a, i)))
                .collect(),
            // Until the first check answers, the first host is taken as the primary.
            primary: AtomicUsize::new(0),
            changed: Notify::new(),
            rr: AtomicUsize::new(0),
            epoch: Instant::now(),
            failovers: AtomicU64::new(0),
            primary_down_since_ms: AtomicU64::new(0),
            metrics: ShardMetrics::new(index),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    pub fn primary(&self) -> Option<usize> {
        let p = self.primary.load(Ordering::Acquire);
        (p != NONE && self.usable(&self.hosts[p])).then_some(p)
    }

    fn usable(&self, h: &Host) -> bool {
        h.is_up() && !h.is_fenced() && !self.banned(h)
    }

    /// Banned and the ban not over yet. Reads the clock only for a host that was banned:
    /// this runs for every host on every checkout, and a clock read costs more than all
    /// the rest of a replica pick.
    fn banned(&self, h: &Host) -> bool {
        let until = h.banned_until_ms.load(Ordering::Relaxed);
        until != 0 && until >= self.now_ms()
    }

    /// The primary, waiting up to `timeout` for one to appear (a failover in progress).
    pub async fn wait_primary(&self, timeout: Duration) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if let Some(p) = self.primary() {
                return Some(p);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.primary();
            }
        }
    }

    /// A replica for a read, or `None` when no replica qualifies (the caller then uses the
    /// primary). `min_lsn`: the replica must have replayed this far (read-your-writes).
    pub fn pick_replica(&self, policy: &ReadPolicy, min_lsn: u64, exclude: u64) -> Option<usize> {
        let primary = self.primary.load(Ordering::Acquire);
        // Least outstanding; ties (and round_robin) rotate over the tied candidates only,
        // so the primary's place in the host list does not skew the choice.
        let mut best_load = usize::MAX;
        // u16: a quarter of the bytes to zero on every read than usize (hosts per shard
        // are few; any beyond 65,535 would never be picked, not be picked wrongly).
        let mut tied = [0u16; 64];
        let mut ntied = 0;
        for (i, h) in self.hosts.iter().enumerate() {
            if exclude & (1 << (i % 64)) != 0 || !self.usable(h) {
                continue;
            }
            let is_primary = i == primary;
            if is_primary {
                if !policy.primary_reads {
                    continue;
                }
            } else {
                if !h.in_recovery() || !h.checked.load(Ordering::Relaxed) {
                    continue;
                }
                if h.lag_bytes() > policy.max_lag_bytes
                    || policy.max_lag_time.is_some_and(|max| h.lag() > max)
                    || h.lsn() < min_lsn
                {
                    continue;
                }
            }
            let load = match policy.balance {
                LoadBalance::RoundRobin => 0,
                LoadBalance::LeastOutstanding => h.outstanding.load(Ordering::Relaxed),
            };
            if load < best_load {
                best_load = load;
                ntied = 0;
            }
            if load == best_load && ntied < tied.len() {
                if let Ok(i) = u16::try_from(i) {
                    tied[ntied] = i;
                    ntied += 1;
                }
            }
        }
        (ntied > 0).then(|| usize::from(tied[self.rr.fetch_add(1, Ordering::Relaxed) % ntied]))
    }

    pub fn is_banned(&self, host: usize) -> bool {
        self.banned(&self.hosts[host])
    }

    /// Takes a host out of rotation (a connection to it failed).
    pub fn ban(&self, host: usize, for_: Duration) {
        let h = &self.hosts[host];
        h.banned_until_ms
            .store(self.now_ms() + for_.as_millis() as u64, Ordering::Relaxed);
        h.up.store(false, Ordering::Relaxed);
        if self.primary.load(Ordering::Acquire) == host {
            self.mark_primary_down();
        }
        tracing::warn!(shard = self.index, host = %h.addr, "host banned for {for_:?}");
    }

    fn mark_primary_down(&self) {
        let _ = self.primary_down_since_ms.compare_exchange(
            0,
            self.now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// How long the shard has had no usable primary.
    pub fn primary_down_for(&self) -> Option<Duration> {
        match self.primary_down_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(self.now_ms().saturating_sub(since))),
        }
    }

    /// Applies one round of health checks (`None`: the host did not answer) and decides the
    /// primary. Returns true when the primary changed.
    pub fn observe(&self, results: &[Option<Observation>]) -> bool {
        let now = self.now_ms();
        for (h, r) in self.hosts.iter().zip(results) {
            match r {
                Some(o) => {
                    h.in_recovery.store(o.in_recovery, Ordering::Relaxed);
                    h.lsn.store(o.lsn, Ordering::Relaxed);
                    h.timeline.store(o.timeline, Ordering::Relaxed);
                    h.lag_ms
                        .store(o.replay_age.as_millis() as u64, Ordering::Relaxed);
                    h.checked.store(true, Ordering::Relaxed);
                    h.up.store(true, Ordering::Relaxed);
                    if h.banned_until_ms.load(Ordering::Relaxed) != 0 {
                        h.banned_until_ms.store(0, Ordering::Relaxed);
                        tracing::info!(shard = self.index, host = %h.addr, "host is back");
                    }
                    if o.in_recovery && h.fenced.swap(false, Ordering::Relaxed) {
                        tracing::info!(shard = self.index, host = %h.addr, "former primary rejoined as a replica");
                    }
                }
                None => h.up.store(false, Ordering::Relaxed),
            }
        }
        let current = self.primary.load(Ordering::Acquire);
        let claimant = |h: &&Arc<Host>| h.is_up() && !h.in_recovery() && !h.is_fenced();
        // Two hosts claiming to be primary: the one on the newer timeline was promoted over
        // the other, which came back without being demoted.
        let newest = self
            .hosts
            .iter()
            .filter(claimant)
            .map(|h| h.timeline.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let current_ok = current != NONE && {
            let h = &self.hosts[current];
            h.is_up()
                && !h.in_recovery()
                && h.banned_until_ms.load(Ordering::Relaxed) < now
                && h.timeline.load(Ordering::Relaxed) >= newest
        };
        let mut changed = false;
        if !current_ok {
            // A new primary: a reachable host that is not in recovery and was never replaced.
            let candidate = self
                .hosts
                .iter()
                .filter(|h| h.index != current)
                .filter(claimant)
                .max_by_key(|h| (h.timeline.load(Ordering::Relaxed), h.lsn()));
            match candidate {
                Some(c) => {
                    if current != NONE {
                        // The old primary may come back without being demoted: never write
                        // to it again while another host is primary.
                        self.hosts[current].fenced.store(true, Ordering::Relaxed);
                        self.failovers.fetch_add(1, Ordering::Relaxed);
                        self.metrics.failovers.increment(1);
                        tracing::warn!(shard = self.index, old = %self.hosts[current].addr, new = %c.addr, "failover: new primary");
                    }
                    self.primary.store(c.index, Ordering::Release);
                    self.primary_down_since_ms.store(0, Ordering::Relaxed);
                    changed = true;
                }
                None => self.mark_primary_down(),
            }
        } else {
            self.primary_down_since_ms.store(0, Ordering::Relaxed);
        }
        // Lag in bytes against the primary's position.
        if let Some(p) = self.primary() {
            let head = self.hosts[p].lsn();
            for h in &self.hosts {
                let lag = if h.index == p {
                    0
                } else {
                    head.saturating_sub(h.lsn())
                };
                h.lag_bytes.store(lag, Ordering::Relaxed);
            }
        }
        // Wake transactions waiting for a primary whenever there is one, not only when it
        // changed: a primary that missed checks and answers again is the same primary,
        // and its waiters would otherwise sleep out `failover_timeout` (30 s by default).
        if changed || self.primary().is_some() {
            self.changed.notify_waiters();
        }
        self.publish_metrics();
        changed
    }

    fn publish_metrics(&self) {
        let primary = self.primary();
        let now = self.now_ms();
        self.metrics
            .has_primary
            .set(if primary.is_some() { 1.0 } else { 0.0 });
        for h in &self.hosts {
            let flag = |b: bool| if b { 1.0 } else { 0.0 };
            h.metrics.up.set(flag(h.is_up()));
            h.metrics.primary.set(flag(primary == Some(h.index)));
            h.metrics
                .banned
                .set(flag(h.banned_until_ms.load(Ordering::Relaxed) >= now));
            h.metrics.lag_bytes.set(h.lag_bytes() as f64);
            h.metrics.lag_seconds.set(h.lag().as_secs_f64());
        }
    }

    /// The replica to promote when the primary is gone: reachable, most WAL replayed.
    pub fn promotion_candidate(&self) -> Option<usize> {
        self.hosts
            .iter()
            .filter(|h| h.is_up() && h.in_recovery() && !h.is_fenced())
            .max_by_key(|h| h.lsn())
            .map(|h| h.index)
    }
}

/// "16/B374D848" -> 0x16_B374D848.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(n: usize) -> ShardTopology {
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 5000 + i as u16)))
            .collect();
        ShardTopology::new(0, &addrs)
    }

    fn obs(in_recovery: bool, lsn: u64) -> Option<Observation> {
        obs_tl(in_recovery, lsn, u32::from(!in_recovery))
    }

    fn obs_tl(in_recovery: bool, lsn: u64, timeline: u32) -> Option<Observation> {
        Some(Observation {
            in_recovery,
            lsn,
            timeline,
            replay_age: Duration::ZERO,
        })
    }

    const POLICY: ReadPolicy = ReadPolicy {
        primary_reads: false,
        max_lag_bytes: 1000,
        max_lag_time: None,
        balance: LoadBalance::LeastOutstanding,
    };

    #[test]
    fn waiters_wake_when_the_same_primary_answers_again() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let s = std::sync::Arc::new(shard(2));
            s.observe(&[obs(false, 10), obs(true, 10)]);
            assert_eq!(s.primary(), Some(0));
            // One missed check: the primary counts as down, a transaction waits for it.
            s.observe(&[None, obs(true, 10)]);
            assert_eq!(s.primary(), None);
            let waiter = {
                let s = s.clone();
                tokio::spawn(async move { s.wait_primary(Duration::from_secs(30)).await })
            };
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            // It answers the next check: the waiter goes on at once, not after 30 s.
            s.observe(&[obs(false, 20), obs(true, 20)]);
            let woke = tokio::time::timeout(Duration::from_secs(5), waiter).await;
            assert!(
                matches!(woke, Ok(Ok(Some(0)))),
                "waiter after the primary came back: {woke:?}"
            );
        });
    }

    #[test]
    fn lsn_parses_like_postgres_prints_it() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("nope"), None);
    }

    #[test]
    fn reads_skip_lagging_and_unreplayed_replicas() {
        let s = shard(3);
        s.observe(&[obs(false, 10_000), obs(true, 9_500), obs(true, 5_000)]);
        assert_eq!(s.primary(), Some(0));
        // Host 2 lags 5000 bytes > 1000.
        for _ in 0..10 {
            assert_eq!(s.pick_replica(&POLICY, 0, 0), Some(1));
        }
        // Read-your-writes: host 1 has not replayed 9_600 yet.
        assert_eq!(s.pick_replica(&POLICY, 9_600, 0), None);
        // Excluded after a failed connect.
        assert_eq!(s.pick_replica(&POLICY, 0, 1 << 1), None);
        let with_primary = ReadPolicy {
            primary_reads: true,
            ..POLICY
        };
        assert_eq!(s.pick_replica(&with_primary, 9_600, 0), Some(0));
    }

    #[test]
    fn least_outstanding_spreads_reads() {
        let s = shard(3);
        s.observe(&[obs(false, 100), obs(true, 100), obs(true, 100)]);
        s.hosts[1].outstanding.store(3, Ordering::Relaxed);
        assert_eq!(s.pick_replica(&POLICY, 0, 0), Some(2));
        s.hosts[2].outstanding.store(5, Ordering::Relaxed);
        assert_eq!(s.pick_replica(&POLICY, 0, 0), Some(1));
    }

    #[test]
    fn failover_picks_the_promoted_host_and_fences_the_old_primary() {
        let s = shard(3);
        s.observe(&[obs(false, 100), obs(true, 100), obs(true, 90)]);
        assert_eq!(s.primary(), Some(0));
        // Primary dies: no primary until a replica is promoted.
        assert!(!s.observe(&[None, obs(true, 100), obs(true, 90)]));
        assert_eq!(s.primary(), None);
        assert!(s.primary_down_for().is_some());
        assert_eq!(s.promotion_candidate(), Some(1));
        assert!(s.observe(&[None, obs(false, 120), obs(true, 100)]));
        assert_eq!(s.primary(), Some(1));
        assert_eq!(s.failovers.load(Ordering::Relaxed), 1);
        // The old primary returns without being demoted: it is never used.
        assert!(!s.observe(&[obs(false, 110), obs(false, 130), obs(true, 120)]));
        assert_eq!(s.primary(), Some(1));
        assert!(s.hosts[0].is_fenced());
        assert_eq!(s.pick_replica(&POLICY, 0, 0), Some(2));
        // Rebuilt as a replica, it serves reads again.
        s.observe(&[obs(true, 130), obs(false, 130), obs(true, 130)]);
        assert!(!s.hosts[0].is_fenced());
    }

    #[test]
    fn a_restarted_primary_that_was_never_replaced_is_taken_back() {
        let s = shard(2);
        s.observe(&[obs(false, 100), obs(true, 100)]);
        s.observe(&[None, obs(true, 100)]);
        assert_eq!(s.primary(), None);
        s.observe(&[obs(false, 100), obs(true, 100)]);
        assert_eq!(s.primary(), Some(0));
        assert!(!s.hosts[0].is_fenced());
    }

    #[test]
    fn a_fresh_proxy_prefers_the_promoted_primary_over_an_undemoted_old_one() {
        // Config order puts the old primary first; both claim to be primary.
        let s = shard(3);
        s.observe(&[obs_tl(false, 500, 1), obs_tl(false, 300, 2), obs(true, 300)]);
        assert_eq!(s.primary(), Some(1));
        assert!(s.hosts[0].is_fenced());
    }

    #[test]
    fn ties_rotate_over_replicas_only() {
        let s = shard(3);
        s.observe(&[obs(false, 100), obs(true, 100), obs(true, 100)]);
        let mut counts = [0; 3];
        for _ in 0..60 {
            counts[s.pick_replica(&POLICY, 0, 0).unwrap_or(0)] += 1;
        }
        assert_eq!(counts, [0, 30, 30]);
    }

    #[tokio::test]
    async fn writes_wait_for_a_new_primary() {
        let s = Arc::new(shard(2));
        s.observe(&[None, obs(true, 100)]);
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.wait_primary(Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        s.observe(&[None, obs(false, 100)]);
        assert_eq!(waiter.await.ok().flatten(), Some(1));
        assert_eq!(s.wait_primary(Duration::from_millis(1)).await, Some(1));
    }
}
