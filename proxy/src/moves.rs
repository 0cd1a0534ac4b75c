//! The live shard map of a sharded database and the gate that pauses its moving slots.
//!
//! A `ShardState` outlives configuration reloads (the `Process` keeps one per database):
//! the map version sessions route with, the per-slot load counters, the cut-over gate,
//! and the slot-move jobs of this process. Every routing decision reads one immutable map
//! version (an `Arc` swapped atomically); a cut-over publishes the next one.
//!
//! # The cut-over gate
//!
//! A slot move must not let a write reach the old owner after its rows were copied, nor
//! let a read see a slot's rows twice (copied, not yet deleted) or not at all. So during a
//! cut-over, statements of *new* transactions that touch a moving slot (or fan out to
//! every shard) wait, while transactions already in flight finish on the old owner.
//!
//! "New" and "in flight" are told apart by epochs: a session takes a [`Ticket`] (the
//! current epoch, counted per epoch parity) before it routes the first statement of a
//! transaction and drops it when the transaction ends. A pause bumps the epoch; tickets
//! of the old epoch are in flight and are waited for (the drain); tickets of the new epoch
//! wait at the gate when they touch the moving slots. Before each pause the mover makes
//! sure no ticket older than the current epoch is left, so "older than the pause" is
//! exactly "in flight". Costs on the hot path: two atomic adds per transaction and one
//! atomic load per statement.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use shardgate_shardmap::ShardMap;
use tokio::sync::Notify;

pub struct ShardState {
    pub database: String,
    map: ArcSwap<ShardMap>,
    /// The map file moves rewrite (none: moves are refused).
    pub map_path: Option<PathBuf>,
    pub gate: SlotGate,
    /// Keyed statements routed per slot, since start (one relaxed add per statement).
    pub slot_hits: Box<[AtomicU64]>,
    /// Per shard: replicas serve reads only once they have replayed this far (the rows a
    /// move copied in must be there before a replica answers for the moved slots).
    replica_floor: Box<[AtomicU64]>,
    /// Slot-move jobs of this process, oldest first (the last [`JOBS_KEPT`]).
    jobs: Mutex<Vec<Arc<Mutex<JobStatus>>>>,
    next_job: AtomicU64,
    /// One job at a time per database.
    pub busy: AtomicBool,
    /// The last load sample: per-shard load and the max/mean ratio (metrics, admin).
    pub load: Mutex<LoadSample>,
}

/// Jobs kept for `SHOW MOVES`.
const JOBS_KEPT: usize = 100;

#[derive(Debug, Clone, Default)]
pub struct LoadSample {
    /// Keyed statements per second per slot over the last interval.
    pub slots: Vec<f64>,
    /// The same, per shard (under the map of the sample).
    pub shards: Vec<f64>,
    pub ratio: f64,
    /// Per shard: server-connection checkouts (transactions) and new server connections
    /// per second, over the same interval.
    pub checkouts: Vec<f64>,
    pub connects: Vec<f64>,
    /// When the counters were read, and their values then (slots, then per shard
    /// checkouts and connects).
    pub taken: Option<Counters>,
}

/// Counter values at one instant: per slot, then per shard (checkouts, connects).
pub type Counters = (Instant, Vec<u64>, Vec<(u64, u64)>);

impl ShardState {
    pub fn new(database: &str, map: ShardMap, map_path: Option<PathBuf>) -> ShardState {
        let slots = map.slots() as usize;
        let shards = map.shards() as usize;
        ShardState {
            database: database.to_string(),
            map: ArcSwap::from_pointee(map),
            map_path,
            gate: SlotGate::new(slots),
            slot_hits: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            replica_floor: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            jobs: Mutex::new(Vec::new()),
            next_job: AtomicU64::new(1),
            busy: AtomicBool::new(false),
            load: Mutex::new(LoadSample::default()),
        }
    }

    /// The map version to route with now.
    pub fn map(&self) -> Arc<ShardMap> {
        self.map.load_full()
    }

    /// How many shards the map has: fixed for the life of this state (a new map version
    /// moves slots, never adds or removes a shard), so it is read without loading the map.
    pub fn shard_count(&self) -> u32 {
        self.replica_floor.len() as u32
    }

    /// Cheap access for one routing decision.
    pub fn map_ref(&self) -> arc_swap::Guard<Arc<ShardMap>> {
        self.map.load()
    }

    /// Publishes a new map version (same slots and shards).
    pub fn publish(&self, map: ShardMap) {
        debug_assert_eq!(
            map.shards(),
            self.shard_count(),
            "a map version changes no shard"
        );
        self.map.store(Arc::new(map));
    }

    pub fn replica_floor(&self, shard: u32) -> u64 {
        self.replica_floor
            .get(shard as usize)
            .map_or(0, |f| f.load(Ordering::Acquire))
    }

    pub fn raise_replica_floor(&self, shard: u32, lsn: u64) {
        if let Some(f) = self.replica_floor.get(shard as usize) {
            f.fetch_max(lsn, Ordering::AcqRel);
        }
    }

    /// Registers a job for `SHOW MOVES`.
    pub fn new_job(&self, slots: String, from: String, to: String) -> Arc<Mutex<JobStatus>> {
        let job = Arc::new(Mutex::new(JobStatus {
            id: self.next_job.fetch_add(1, Ordering::Relaxed),
            database: self.database.clone(),
            slots,
            from,
            to,
            state: "running",
            phase: "queued",
            ..Default::default()
        }));
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.len() >= JOBS_KEPT {
            jobs.remove(0);
        }
        jobs.push(job.clone());
        job
    }

    pub fn jobs(&self) -> Vec<JobStatus> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.iter()
            .map(|j| j.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// Closes a load interval: per-slot keyed statements per second since the last call,
    /// summed per shard under the current map; `pool_counts` are the shards' checkout and
    /// new-connection counters now.
    pub fn sample_load(&self, pool_counts: Vec<(u64, u64)>) -> LoadSample {
        let now = Instant::now();
        let counts: Vec<u64> = self
            .slot_hits
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .collect();
        let map = self.map();
        let mut load = self.load.lock().unwrap_or_else(|e| e.into_inner());
        let taken = load.taken.take();
        if let Some((then, before, pools_before)) = &taken {
            let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
            load.checkouts = pool_counts
                .iter()
                .zip(pools_before)
                .map(|(a, b)| rate(a.0, b.0))
                .collect();
            load.connects = pool_counts
                .iter()
                .zip(pools_before)
                .map(|(a, b)| rate(a.1, b.1))
                .collect();
            load.slots = counts
                .iter()
                .zip(before)
                .map(|(c, b)| c.saturating_sub(*b) as f64 / secs)
                .collect();
            load.shards = shardgate_shardmap::shard_loads(&map, &load.slots)
                .unwrap_or_else(|_| vec![0.0; map.shards() as usize]);
            load.ratio = shardgate_shardmap::max_mean_ratio_weighted(&load.shards, map.weights());
        }
        load.taken = Some((now, counts, pool_counts));
        load.clone()
    }

    pub fn last_load(&self) -> LoadSample {
        self.load.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// What `SHOW MOVES` shows of one job.
#[derive(Debug, Clone, Default)]
pub struct JobStatus {
    pub id: u64,
    pub database: String,
    pub slots: String,
    /// A shard number, or `*` when the slots come from several shards.
    pub from: String,
    /// Likewise.
    pub to: String,
    /// running | done | failed
    pub state: &'static str,
    /// queued | counting | copying | paused | verifying | publishing | deleting | done |
    /// rolled back
    pub phase: &'static str,
    pub rows_copied: u64,
    pub rows_total: u64,
    pub cutovers: u32,
    pub pause_ms_last: f64,
    pub pause_ms_max: f64,
    pub error: String,
}

/// The cut-over gate (see the module docs).
pub struct SlotGate {
    epoch: AtomicU32,
    /// Tickets held, per epoch parity.
    active: [AtomicU64; 2],
    paused: AtomicBool,
    /// The moving slots, one bit each (read only while `paused`).
    moving: Box<[AtomicU64]>,
    resumed: Notify,
    released: Notify,
}

/// A transaction's place relative to cut-overs, held from its first routed statement to
/// its end: the epoch it began in, plus one (0: none). A plain number rather than a guard
/// object, because every idle session carries the field; the session gives it back with
/// [`ShardState::leave`] (also when it ends).
pub type Ticket = u32;

impl ShardState {
    /// Takes a ticket in the current epoch.
    pub fn enter(&self) -> Ticket {
        let gate = &self.gate;
        loop {
            let epoch = gate.epoch.load(Ordering::SeqCst);
            gate.active[(epoch & 1) as usize].fetch_add(1, Ordering::SeqCst);
            if gate.epoch.load(Ordering::SeqCst) == epoch {
                tracing::trace!(epoch, "ticket taken");
                return epoch.wrapping_add(1).max(1);
            }
            // A pause began in between: count in the new epoch instead.
            gate.active[(epoch & 1) as usize].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Gives a ticket back.
    pub fn leave(&self, ticket: Ticket) {
        if ticket == 0 {
            return;
        }
        let gate = &self.gate;
        let epoch = ticket - 1;
        tracing::trace!(epoch, "ticket given back");
        // Only a drain waits for this, and only for tickets of an epoch that is over: in the
        // steady state (no slot moves) the last transaction out does not touch the Notify.
        // A drain bumps the epoch before it looks at the count, so a release that saw the
        // old epoch here has already made the count it will see.
        if gate.active[(epoch & 1) as usize].fetch_sub(1, Ordering::SeqCst) == 1
            && gate.epoch.load(Ordering::SeqCst) != epoch
        {
            gate.released.notify_one();
        }
    }

    /// Whether the transaction holding `ticket` must wait before touching the moving
    /// slots: a cut-over is on and the transaction is not one of those it drains.
    pub fn must_wait(&self, ticket: Ticket) -> bool {
        let gate = &self.gate;
        gate.paused.load(Ordering::SeqCst)
            && ticket.wrapping_sub(1) >= gate.epoch.load(Ordering::SeqCst)
    }
}

impl SlotGate {
    fn new(slots: usize) -> SlotGate {
        SlotGate {
            epoch: AtomicU32::new(0),
            active: [AtomicU64::new(0), AtomicU64::new(0)],
            paused: AtomicBool::new(false),
            moving: (0..slots.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            resumed: Notify::new(),
            released: Notify::new(),
        }
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Whether `slot` is moving now (false when no cut-over is on).
    pub fn is_moving(&self, slot: u32) -> bool {
        self.paused()
            && self
                .moving
                .get(slot as usize / 64)
                .is_some_and(|w| w.load(Ordering::SeqCst) & (1 << (slot % 64)) != 0)
    }

    fn mark(&self, slots: &[u32]) {
        for &s in slots {
            if let Some(w) = self.moving.get(s as usize / 64) {
                w.fetch_or(1 << (s % 64), Ordering::SeqCst);
            }
        }
    }

    /// Waits until no ticket of `epoch` is held, or the deadline passes (false).
    async fn drained(&self, epoch: u32, deadline: Instant) -> bool {
        let counter = &self.active[(epoch & 1) as usize];
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if counter.load(Ordering::SeqCst) == 0 {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Another epoch's release may take the wake-up: look again now and then.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(5)), released).await;
        }
    }

    /// Makes sure no transaction older than the current epoch is open (so that the next
    /// pause drains every transaction in flight). Nothing waits meanwhile.
    pub async fn settle(&self, timeout: Duration) -> bool {
        let epoch = self.epoch.load(Ordering::SeqCst);
        if epoch == 0 {
            return true;
        }
        self.drained(epoch - 1, Instant::now() + timeout).await
    }

    /// Pauses the slots `lo..=hi` (new transactions touching them wait) and waits for the
    /// transactions in flight to end. False when they do not end in time (still paused:
    /// the caller resumes).
    pub async fn pause(&self, slots: &[u32], timeout: Duration) -> bool {
        self.mark(slots);
        self.paused.store(true, Ordering::SeqCst);
        let old = self.epoch.fetch_add(1, Ordering::SeqCst);
        self.drained(old, Instant::now() + timeout).await
    }

    /// Pauses without draining: only when nothing can be in flight (at start).
    pub fn pause_now(&self, slots: &[u32]) {
        self.mark(slots);
        self.paused.store(true, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Transactions in flight that began before the current epoch (what a drain waits
    /// for), for error messages.
    pub fn open_before_pause(&self) -> u64 {
        let epoch = self.epoch.load(Ordering::SeqCst);
        self.active[(epoch.wrapping_sub(1) & 1) as usize].load(Ordering::SeqCst)
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        for w in self.moving.iter() {
            w.store(0, Ordering::SeqCst);
        }
        self.resumed.notify_waiters();
    }

    /// Waits until the current pause ends (at once if none is on). The caller looks again
    /// with [`ShardState::must_wait`]: by then another pause may have begun, one that
    /// drains this transaction rather than holding it.
    pub async fn wait_resumed(&self) {
        let resumed = self.resumed.notified();
        tokio::pin!(resumed);
        resumed.as_mut().enable();
        if self.paused() {
            resumed.await;
        }
    }
}

/// Writes a map file atomically: a temporary file beside it, synced, renamed over it, and
/// the directory synced, so a crash leaves the old or the new version, never a mix.
pub fn write_map_file(path: &Path, map: &ShardMap) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("toml.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(map.to_toml().as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The move journal beside the map file: `begin VERSION LO HI FROM TO ID` before a
/// cut-over writes anything, `end ID OUTCOME` after it finished or was undone. A `begin`
/// without its `end` is a cut-over a crash interrupted; recovery settles it.
pub fn journal_path(map_path: &Path) -> PathBuf {
    let mut p = map_path.as_os_str().to_owned();
    p.push(".moves");
    PathBuf::from(p)
}

/// One cut-over as journaled: the map version it publishes, its slots (one source, one
/// target), and a random id (also the key of its marker row on the source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfinished {
    pub version: u64,
    pub from: u32,
    pub to: u32,
    pub id: u64,
    /// Sorted, distinct.
    pub slots: Vec<u32>,
}

impl Unfinished {
    pub fn begin_line(&self) -> String {
        format!(
            "begin {} {} {} {} {}",
            self.version,
            self.from,
            self.to,
            self.id,
            slot_spec(&self.slots)
        )
    }

    /// The slots as runs, for [`ShardMap::apply_moves`].
    pub fn slot_moves(&self) -> Vec<shardgate_shardmap::SlotMove> {
        slot_runs(&self.slots)
            .into_iter()
            .map(|(lo, hi)| shardgate_shardmap::SlotMove {
                lo,
                hi,
                from: self.from,
                to: self.to,
            })
            .collect()
    }
}

/// Runs of consecutive slots in a sorted list: (lo, hi) inclusive.
pub fn slot_runs(slots: &[u32]) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &s in slots {
        match runs.last_mut() {
            Some(r) if r.1.checked_add(1) == Some(s) => r.1 = s,
            _ => runs.push((s, s)),
        }
    }
    runs
}

/// `0-63,70,72-75`: a sorted slot list as text (journal, SHOW MOVES, marker rows).
pub fn slot_spec(slots: &[u32]) -> String {
    slot_runs(slots)
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_slot_spec(text: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let (lo, hi): (u32, u32) = match part.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let s = part.parse().ok()?;
                (s, s)
            }
        };
        if hi < lo || hi - lo > 1 << 20 {
            return None;
        }
        out.extend(lo..=hi);
    }
    Some(out)
}

pub fn journal_append(map_path: &Path, line: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(journal_path(map_path))?;
    f.write_all(line.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_data()
}

/// The cut-over a crash interrupted, if any (cut-overs run one at a time).
pub fn journal_unfinished(text: &str) -> Option<Unfinished> {
    let mut open: Option<Unfinished> = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["begin", v, from, to, id, spec] => {
                open = (|| {
                    Some(Unfinished {
                        version: v.parse().ok()?,
                        from: from.parse().ok()?,
                        to: to.parse().ok()?,
                        id: id.parse().ok()?,
                        slots: parse_slot_spec(spec)?,
                    })
                })();
            }
            ["end", id, ..] if open.as_ref().is_some_and(|o| id.parse() == Ok(o.id)) => open = None,
            _ => {}
        }
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardgate_shardmap::ShardSpec;

    fn state() -> Arc<ShardState> {
        let map = ShardMap::initial_contiguous(&[ShardSpec::default(), ShardSpec::default()], 16)
            .expect("map");
        Arc::new(ShardState::new("db", map, None))
    }

    #[test]
    fn journal_finds_the_begin_without_end() {
        assert_eq!(journal_unfinished(""), None);
        let t = "begin 2 0 1 77 0-3\nend 77 done\nbegin 3 0 1 78 4-7,9\n";
        assert_eq!(
            journal_unfinished(t),
            Some(Unfinished {
                version: 3,
                from: 0,
                to: 1,
                id: 78,
                slots: vec![4, 5, 6, 7, 9],
            })
        );
        assert_eq!(
            journal_unfinished("begin 3 0 1 9 4-7\nend 9 rolled-back\n"),
            None
        );
        // A torn last line is no begin; an end of another move closes nothing.
        assert_eq!(
            journal_unfinished("begin 2 0 1 5 0-3\nend 5 done\nbegin 3 0"),
            None
        );
        assert!(journal_unfinished("begin 2 0 1 5 0-3\nend 6 done\n").is_some());
        let u = Unfinished {
            version: 4,
            from: 1,
            to: 0,
            id: 5,
            slots: vec![1, 2, 3, 10, 12, 13],
        };
        assert_eq!(u.begin_line(), "begin 4 1 0 5 1-3,10,12-13");
        assert_eq!(journal_unfinished(&u.begin_line()), Some(u.clone()));
        assert_eq!(u.slot_moves().len(), 3);
    }

    #[tokio::test]
    async fn pause_drains_old_tickets_and_holds_new_ones() {
        let s = state();
        let old = s.enter();
        assert!(!s.must_wait(old));
        let gate_state = s.clone();
        let pause = tokio::spawn(async move {
            gate_state
                .gate
                .pause(&[0, 1, 2, 3], Duration::from_secs(5))
                .await
        });
        // The pause cannot finish while the old ticket is held.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !s.gate.paused() {
            assert!(Instant::now() < deadline);
            tokio::task::yield_now().await;
        }
        let new = s.enter();
        assert!(
            s.must_wait(new),
            "a transaction begun after the pause waits"
        );
        assert!(!s.must_wait(old), "a transaction in flight finishes");
        assert!(!pause.is_finished());
        s.leave(old);
        assert!(pause.await.expect("pause task"), "drained");
        assert!(s.gate.is_moving(2) && !s.gate.is_moving(4));
        s.gate.resume();
        assert!(!s.gate.is_moving(2));
        assert!(!s.must_wait(new));
        s.gate.wait_resumed().await;
        s.leave(new);
        // Both epochs are empty again: the next pause is immediate.
        assert!(s.gate.settle(Duration::from_millis(1)).await);
        assert!(s.gate.pause(&[5], Duration::from_millis(1)).await);
        s.gate.resume();
    }

    #[tokio::test]
    async fn pause_gives_up_when_a_transaction_stays_open() {
        let s = state();
        let stuck = s.enter();
        assert!(!s.gate.pause(&[0, 3], Duration::from_millis(30)).await);
        assert_eq!(s.gate.open_before_pause(), 1);
        s.gate.resume();
        // The stuck ticket is older than the epoch now: the next move waits for it first.
        assert!(!s.gate.settle(Duration::from_millis(30)).await);
        s.leave(stuck);
        assert!(s.gate.settle(Duration::from_millis(30)).await);
    }
}
