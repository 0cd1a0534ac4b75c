//! Rebalancing acceptance tests (issue #6): shardgate moves slots between shards while
//! clients keep reading and writing, losing nothing; `auto_rebalance` cools a hot shard by
//! itself; a shardgate killed in the middle of a move recovers on restart.
//!
//! Run with `./tests/run.sh --test rebalance`. The file starts one cluster of its own for
//! all its tests (3 shards of a primary and one streaming replica, ports from 27600 or
//! `SHARDGATE_REBALANCE_PG_PORT`) under `$SHARDGATE_TEST_SCRATCH`, where run.sh stops and
//! deletes it at the end. Each test has databases of its own (created on every primary),
//! with `users(id)` sharded by id and `posts(user_id, id)` sharded by user_id, a shard map
//! file of its own (the contiguous 3-shard map, version 1) and shardgate in front of
//! primaries and replicas (reads go to replicas, read-your-writes on).
//!
//! * `moves_slots_under_load_losing_nothing`: 102,000 rows preloaded into slots 0-63
//!   (shard 0). 16 clients, each the only writer of 16 users of its own (half of them in
//!   slots 0-63), insert, update and delete posts and users (autocommit and explicit
//!   transactions) and keep a ledger of what was acknowledged. After every write a client
//!   reads the user back by key and compares with its ledger exactly; every 4th round it
//!   also reads its whole key range with a keyless (fan-out) query; every 8th round it
//!   counts the preloaded rows (fan-out and keyed), which must be exactly all of them, never
//!   one twice. Meanwhile the admin console runs `MOVE SLOTS 0-63 TO 1` (move_batch_rows =
//!   5000) and SHOW MOVES is polled until the job is done; load goes on throughout and a
//!   while after. Then: no client saw an error or a wrong read; on the primaries every
//!   acknowledged row is present exactly once, on the shard the rewritten map file says (a
//!   higher version, slots 0-63 on shard 1, nothing else changed); no deleted row came back.
//!   Prints the pause data (SHOW MOVES, the `shardgate_move_pause_seconds` histogram) and
//!   the write latency the clients saw on the moving users before, during and after.
//! * `auto_rebalance_fixes_skew`: auto_rebalance with hot_window 3s, interval 1s, hot_ratio
//!   1.5. 10% of 400 users (all on shard 0, in distinct slots) get 70% of the transactions.
//!   The test measures load per shard itself (its own statements per key, mapped through the
//!   map file it re-reads, over a 3 s window): at first max/mean >= 1.6; then, without any
//!   operator action, within 120 s max/mean < 1.25 over a window that began after the map's
//!   last change. SHOW MOVES lists done jobs and no failed one, no client saw an error, every
//!   row sits once on its shard with the last acknowledged value.
//! * `kill_mid_move_after_*` (one per fault point of the contract: drain, copy,
//!   target_commit, source_commit, map_write): shardgate started with `SHARDGATE_FAULT`
//!   aborts during `MOVE SLOTS 128-143 TO 2` (3,250 rows in those slots, 750 elsewhere);
//!   the map file parses even then; a successor on the same config (no fault) must have
//!   recovered before it accepts clients: the map owns every slot once (only slots 128-143
//!   may have changed, to shard 2), every row is present once on the shard the map says and
//!   reads through the successor agree. Then the MOVE is retried through the successor and
//!   completes, with slots 128-143 on shard 2 and the same checks.
//!
//! Knobs: `SHARDGATE_REBALANCE_PG_PORT` (first port, default 27600),
//! `SHARDGATE_REBALANCE_SEED` (the load's random seed; printed).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate_e2e::{
    connect, exclusive, http_get, simple_value, skip_in_direct_mode, timing, wait_for, Cluster,
    Proxy, ScratchDir,
};
use shardgate_shardmap::{KeyValue, ShardMap, ShardSpec};
use tokio::process::Command;
use tokio::sync::OnceCell;
use tokio_postgres::{Client, SimpleQueryMessage, Statement};

const SLOTS: u32 = 4096;
const SHARDS: u16 = 3;
const REPLICAS: u16 = 1;
const ADMIN: &str = "sgadmin";
const ADMIN_PASSWORD: &str = "rebalance-adm-4f";
const CONSOLE: &str = "shardgate";

const DDL: &str = "CREATE TABLE users (id bigint PRIMARY KEY, name text);\n\
                   CREATE TABLE posts (id bigint, user_id bigint, body text, \
                   PRIMARY KEY (user_id, id));";

fn slot(k: i64) -> u32 {
    KeyValue::Int(k).slot(SLOTS)
}

fn shard_of(map: &ShardMap, k: i64) -> u32 {
    map.shard_of_key(&KeyValue::Int(k))
}

/// `n` integers from `from` upwards for which `keep` holds.
fn keys_where(from: i64, n: usize, mut keep: impl FnMut(i64) -> bool) -> Vec<i64> {
    let mut out = Vec::with_capacity(n);
    let mut k = from;
    while out.len() < n {
        if keep(k) {
            out.push(k);
        }
        k += 1;
        assert!(
            k < from + 50_000_000,
            "keys_where: not enough keys from {from}"
        );
    }
    out
}

use shardgate_e2e::describe_error as describe;

/// A statement with a time limit: a hang is a failure, reported as such.
async fn within<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_secs(60), fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", describe(&e))),
        Err(_) => Err(format!("{what}: no answer within 60 s")),
    }
}

/// Panics listing (the first 25 of) `problems` unless there are none.
fn assert_none(what: &str, problems: &[String]) {
    if problems.is_empty() {
        return;
    }
    let mut msg = format!("{what}: {} problem(s):\n", problems.len());
    for p in problems.iter().take(25) {
        let _ = writeln!(msg, "  {p}");
    }
    if problems.len() > 25 {
        let _ = writeln!(msg, "  ... and {} more", problems.len() - 25);
    }
    panic!("{msg}");
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn latency_summary(mut ms: Vec<f64>) -> String {
    if ms.is_empty() {
        return "no samples".into();
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    format!(
        "n={} p50={:.1}ms p99={:.1}ms max={:.1}ms",
        ms.len(),
        percentile(&ms, 0.50),
        percentile(&ms, 0.99),
        ms[ms.len() - 1]
    )
}

fn seed() -> u64 {
    let seed = std::env::var("SHARDGATE_REBALANCE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("SHARDGATE_REBALANCE_SEED={seed}");
    seed
}

// ---- the file's own cluster ------------------------------------------------------------------

/// 3 shards x (primary + 1 replica), started once for all tests of this file. It lives
/// under `$SHARDGATE_TEST_SCRATCH`, which run.sh stops and purges when the tests end.
async fn own_cluster() -> &'static Cluster {
    static OWN: OnceCell<Cluster> = OnceCell::const_new();
    OWN.get_or_init(start_own_cluster).await
}

async fn start_own_cluster() -> Cluster {
    let pg_port: u16 = std::env::var("SHARDGATE_REBALANCE_PG_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(27600);
    let script = match std::env::var("SHARDGATE_CLUSTER_SH") {
        Ok(s) => PathBuf::from(s),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/cluster.sh"),
    };
    let parent = match std::env::var("SHARDGATE_TEST_SCRATCH") {
        Ok(s) => PathBuf::from(s),
        Err(_) => {
            let dir = std::env::temp_dir().join("shardgate-e2e-rebalance");
            eprintln!(
                "warning: SHARDGATE_TEST_SCRATCH is not set: the rebalance cluster under {} \
                 stays up (stop it with cluster.sh down --purge)",
                dir.display()
            );
            dir
        }
    };
    std::fs::create_dir_all(&parent).expect("create the scratch directory");
    {
        use std::os::unix::fs::PermissionsExt;
        // The OS user postgres (when we are root) must reach the data directories.
        let _ = std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755));
    }
    let home = parent.join(shardgate_e2e::unique_name("rebalance"));
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg("up")
        .env("SHARDGATE_HOME", &home)
        .env("SHARDGATE_PG_PORT", pg_port.to_string())
        .env("SHARDGATE_SHARDS", SHARDS.to_string())
        .env("SHARDGATE_REPLICAS", REPLICAS.to_string())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("cluster.sh up (rebalance) took over 300 s"))
        .unwrap_or_else(|e| panic!("cannot run cluster.sh: {e}"));
    assert!(
        out.status.success(),
        "cluster.sh up (rebalance, ports from {pg_port}) failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "rebalance: own cluster ({SHARDS} shards x {REPLICAS} replica, ports from {pg_port}) \
         up in {:?}",
        started.elapsed()
    );
    Cluster::new(pg_port, SHARDS, REPLICAS, home)
}

// ---- a database of one test ------------------------------------------------------------------

/// Rows to load: users (id, name) and posts (user_id, id, body).
#[derive(Default)]
struct Rows {
    users: Vec<(i64, String)>,
    posts: Vec<(i64, i64, String)>,
}

/// A database of the test's own on every primary, with the demo tables and a shard map
/// file (the contiguous map) in a scratch directory of its own.
struct TestDb {
    cluster: &'static Cluster,
    name: String,
    map_path: PathBuf,
    _dir: ScratchDir,
}

impl TestDb {
    async fn create(cluster: &'static Cluster, name: &str) -> TestDb {
        cluster.recreate_database(name, "app").await;
        let dir = ScratchDir::new(name);
        let map_path = dir.path().join("shardmap.toml");
        let map = ShardMap::initial_contiguous(&vec![ShardSpec::default(); SHARDS.into()], SLOTS)
            .expect("initial map");
        std::fs::write(&map_path, map.to_toml()).expect("write the shard map file");
        let db = TestDb {
            cluster,
            name: name.to_string(),
            map_path,
            _dir: dir,
        };
        for shard in 0..SHARDS {
            let c = db.primary(shard).await;
            c.batch_execute(DDL)
                .await
                .unwrap_or_else(|e| panic!("schema of {name} on shard {shard}: {}", describe(&e)));
        }
        db
    }

    async fn primary(&self, shard: u16) -> Client {
        let url = self.cluster.primary_url(shard, &self.name);
        connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {}", describe(&e)))
    }

    /// The map file as it is now; panics if it does not parse (or fails validation).
    fn map(&self) -> ShardMap {
        self.try_map().unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_map(&self) -> Result<ShardMap, String> {
        let text = std::fs::read_to_string(&self.map_path)
            .map_err(|e| format!("read {}: {e}", self.map_path.display()))?;
        ShardMap::from_toml(&text).map_err(|e| {
            format!(
                "the shard map file {} does not parse: {e}\n{text}",
                self.map_path.display()
            )
        })
    }

    /// Loads `rows` into the primaries of the shards that `map` says own them (COPY).
    async fn load(&self, map: &ShardMap, rows: &Rows) {
        for shard in 0..SHARDS {
            let mut users = String::new();
            let mut n_users = 0u64;
            for (id, name) in rows
                .users
                .iter()
                .filter(|(id, _)| shard_of(map, *id) == shard.into())
            {
                let _ = writeln!(users, "{id}\t{name}");
                n_users += 1;
            }
            let mut posts = String::new();
            let mut n_posts = 0u64;
            for (uid, id, body) in rows
                .posts
                .iter()
                .filter(|(uid, _, _)| shard_of(map, *uid) == shard.into())
            {
                let _ = writeln!(posts, "{id}\t{uid}\t{body}");
                n_posts += 1;
            }
            let c = self.primary(shard).await;
            for (sql, data, n) in [
                ("COPY users (id, name) FROM STDIN", users, n_users),
                ("COPY posts (id, user_id, body) FROM STDIN", posts, n_posts),
            ] {
                if n == 0 {
                    continue;
                }
                let sink = c
                    .copy_in(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql} on shard {shard}: {}", describe(&e)));
                futures_util::pin_mut!(sink);
                sink.send(Bytes::from(data)).await.expect("send COPY data");
                let copied = sink.finish().await.expect("finish COPY");
                assert_eq!(copied, n, "{sql} on shard {shard}");
            }
        }
    }

    /// Waits until every replica has replayed what its primary has written so far.
    async fn wait_replicas(&self) {
        for shard in 0..SHARDS {
            let p = self.primary(shard).await;
            let lsn = simple_value(&p, "SELECT pg_current_wal_lsn()::text")
                .await
                .expect("pg_current_wal_lsn");
            for j in 1..=REPLICAS {
                let url = self
                    .cluster
                    .direct_url(self.cluster.replica_port(shard, j), &self.name);
                let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
                wait_for(
                    &format!("replica {j} of shard {shard} to replay {lsn}"),
                    Duration::from_secs(60),
                    || async {
                        let c = connect(&url).await.ok()?;
                        let v = simple_value(&c, &sql).await.ok()?;
                        (v == "t").then_some(())
                    },
                )
                .await;
            }
        }
    }

    /// The shardgate config: users app and the admin, this database with `extra` lines
    /// (rebalancing knobs), both tables sharded, every shard's primary and replica.
    fn config(&self, extra: &[&str], metrics: bool) -> String {
        let mut t = String::from("[general]\nlisten = \"$LISTEN\"\n");
        if metrics {
            t.push_str("metrics_listen = \"$METRICS_LISTEN\"\n");
        }
        t.push_str(
            "pool_mode = \"transaction\"\npool_size = 24\ncheckout_timeout = \"30s\"\n\
             client_login_timeout = \"10s\"\n\n\
             [[users]]\nname = \"app\"\npassword = \"app\"\nauth = \"scram-sha-256\"\n\n",
        );
        let _ = write!(
            t,
            "[[users]]\nname = \"{ADMIN}\"\npassword = \"{ADMIN_PASSWORD}\"\n\
             auth = \"scram-sha-256\"\nadmin = true\nserver_user = \"app\"\n\
             server_password = \"app\"\n\n"
        );
        let _ = write!(
            t,
            "[[databases]]\nname = \"{}\"\nshard_map = \"{}\"\n",
            self.name,
            self.map_path.display()
        );
        for line in extra {
            let _ = writeln!(t, "{line}");
        }
        for (table, column) in [("users", "id"), ("posts", "user_id")] {
            let _ = write!(
                t,
                "\n[[databases.sharded_tables]]\nname = \"{table}\"\ncolumn = \"{column}\"\n\
                 type = \"bigint\"\n"
            );
        }
        for shard in 0..SHARDS {
            let hosts: Vec<String> = self
                .cluster
                .hosts(shard, true)
                .iter()
                .map(|h| format!("\"{h}\""))
                .collect();
            let _ = write!(
                t,
                "\n[[databases.shards]]\nhosts = [{}]\n",
                hosts.join(", ")
            );
        }
        t
    }

    /// Every row of users and posts on every primary, with the shard it was found on.
    async fn placement(&self) -> Placement {
        let mut p = Placement::default();
        for shard in 0..SHARDS {
            let c = self.primary(shard).await;
            let rows = c
                .query("SELECT id, name FROM users", &[])
                .await
                .unwrap_or_else(|e| panic!("users on shard {shard}: {}", describe(&e)));
            for r in rows {
                p.users
                    .entry(r.get(0))
                    .or_default()
                    .push((u32::from(shard), r.get(1)));
            }
            let rows = c
                .query("SELECT user_id, id, body FROM posts", &[])
                .await
                .unwrap_or_else(|e| panic!("posts on shard {shard}: {}", describe(&e)));
            for r in rows {
                p.posts
                    .entry((r.get(0), r.get(1)))
                    .or_default()
                    .push((u32::from(shard), r.get(2)));
            }
        }
        p
    }

    async fn drop_db(&self) {
        self.cluster.drop_database(&self.name).await;
    }
}

/// Every (shard, value) a row was found on.
type Found = Vec<(u32, Option<String>)>;

/// Where the rows are: key -> where it was found.
#[derive(Default)]
struct Placement {
    users: BTreeMap<i64, Found>,
    posts: BTreeMap<(i64, i64), Found>,
}

impl Placement {
    /// Rows on several shards, or on a shard that `map` does not give their key.
    fn misplaced(&self, map: &ShardMap) -> Vec<String> {
        let mut out = Vec::new();
        for (id, locs) in &self.users {
            check_locs(
                &mut out,
                &format!("users id={id}"),
                locs,
                shard_of(map, *id),
            );
        }
        for ((uid, id), locs) in &self.posts {
            let what = format!("posts user_id={uid} id={id}");
            check_locs(&mut out, &what, locs, shard_of(map, *uid));
        }
        out
    }

    /// Differences from the expected contents (users and posts of users in `skip` are
    /// not compared: their last write was in doubt).
    fn differences(&self, want: &Expected, skip: &HashSet<i64>) -> Vec<String> {
        let mut out = Vec::new();
        for (id, name) in &want.users {
            if skip.contains(id) {
                continue;
            }
            match self.users.get(id) {
                None => out.push(format!("users id={id}: acknowledged row missing")),
                Some(locs) if locs[0].1.as_deref() != Some(name.as_str()) => out.push(format!(
                    "users id={id}: name {:?}, acknowledged {name:?}",
                    locs[0].1
                )),
                Some(_) => {}
            }
        }
        for id in self.users.keys() {
            if !want.users.contains_key(id) && !skip.contains(id) {
                out.push(format!("users id={id}: a row nobody wrote"));
            }
        }
        for ((uid, id), body) in &want.posts {
            if skip.contains(uid) {
                continue;
            }
            match self.posts.get(&(*uid, *id)) {
                None => out.push(format!(
                    "posts user_id={uid} id={id}: acknowledged row missing"
                )),
                Some(locs) if locs[0].1.as_deref() != Some(body.as_str()) => out.push(format!(
                    "posts user_id={uid} id={id}: body {:?}, acknowledged {body:?}",
                    locs[0].1
                )),
                Some(_) => {}
            }
        }
        for key in self.posts.keys() {
            if want.posts.contains_key(key) || skip.contains(&key.0) {
                continue;
            }
            if want.deleted.contains(key) {
                out.push(format!(
                    "posts user_id={} id={}: deleted (acknowledged) but back",
                    key.0, key.1
                ));
            } else {
                out.push(format!(
                    "posts user_id={} id={}: a row nobody wrote",
                    key.0, key.1
                ));
            }
        }
        out
    }
}

fn check_locs(out: &mut Vec<String>, what: &str, locs: &[(u32, Option<String>)], owner: u32) {
    if locs.len() != 1 {
        let shards: Vec<u32> = locs.iter().map(|l| l.0).collect();
        out.push(format!(
            "{what}: present {} times (shards {shards:?})",
            locs.len()
        ));
    } else if locs[0].0 != owner {
        out.push(format!(
            "{what}: on shard {}, but the map gives its slot to shard {owner}",
            locs[0].0
        ));
    }
}

/// What must be in the database.
#[derive(Default)]
struct Expected {
    users: BTreeMap<i64, String>,
    posts: BTreeMap<(i64, i64), String>,
    deleted: HashSet<(i64, i64)>,
}

impl Expected {
    fn from_rows(rows: &Rows) -> Expected {
        Expected {
            users: rows.users.iter().cloned().collect(),
            posts: rows
                .posts
                .iter()
                .map(|(uid, id, body)| ((*uid, *id), body.clone()))
                .collect(),
            deleted: HashSet::new(),
        }
    }
}

/// Checks that `now` owns every slot once (it parsed), that only `moved` slots differ from
/// `before`, and that those are on `from` or `to`. Returns the shards of the moved slots.
fn check_map_change(
    what: &str,
    before: &ShardMap,
    now: &ShardMap,
    moved: std::ops::RangeInclusive<u32>,
    allowed: &[u32],
) -> BTreeSet<u32> {
    assert_eq!(
        now.slots(),
        SLOTS,
        "{what}: the map has {} slots",
        now.slots()
    );
    assert_eq!(
        now.shards(),
        u32::from(SHARDS),
        "{what}: the map has {} shards",
        now.shards()
    );
    assert_eq!(
        now.table().len(),
        SLOTS as usize,
        "{what}: slot table length"
    );
    let mut owners = BTreeSet::new();
    for s in 0..SLOTS {
        let (was, is) = (before.shard_of_slot(s), now.shard_of_slot(s));
        if moved.contains(&s) {
            assert!(
                allowed.contains(&is),
                "{what}: slot {s} is on shard {is}, expected one of {allowed:?}"
            );
            owners.insert(is);
        } else {
            assert_eq!(
                is, was,
                "{what}: slot {s} (not moved) changed owner from {was} to {is}"
            );
        }
    }
    owners
}

// ---- the admin console -----------------------------------------------------------------------

struct Console {
    client: Client,
}

/// One row of SHOW MOVES (contract: REBALANCE.md).
#[derive(Debug, Clone)]
struct MoveJob {
    id: i64,
    database: String,
    slots: String,
    from_shard: String,
    to_shard: String,
    state: String,
    phase: String,
    rows_copied: u64,
    rows_total: u64,
    cutovers: u64,
    pause_ms_last: f64,
    pause_ms_max: f64,
    error: String,
}

impl MoveJob {
    fn from_row(row: &BTreeMap<String, String>) -> MoveJob {
        let get = |c: &str| -> String {
            row.get(c)
                .unwrap_or_else(|| panic!("SHOW MOVES has no column {c:?}: {row:?}"))
                .clone()
        };
        fn num<T: std::str::FromStr + Default>(c: &str, v: String) -> T {
            if v.is_empty() {
                return T::default();
            }
            v.parse()
                .unwrap_or_else(|_| panic!("SHOW MOVES column {c} = {v:?} is not a number"))
        }
        MoveJob {
            id: num("id", get("id")),
            database: get("database"),
            slots: get("slots"),
            from_shard: get("from_shard"),
            to_shard: get("to_shard"),
            state: get("state"),
            phase: get("phase"),
            rows_copied: num("rows_copied", get("rows_copied")),
            rows_total: num("rows_total", get("rows_total")),
            cutovers: num("cutovers", get("cutovers")),
            pause_ms_last: num("pause_ms_last", get("pause_ms_last")),
            pause_ms_max: num("pause_ms_max", get("pause_ms_max")),
            error: get("error"),
        }
    }

    fn short(&self) -> String {
        format!(
            "job {} [{} {} -> {}] {} / {}: rows {}/{}, cutovers {}, pause last {} ms max {} ms{}",
            self.id,
            self.slots,
            self.from_shard,
            self.to_shard,
            self.state,
            self.phase,
            self.rows_copied,
            self.rows_total,
            self.cutovers,
            self.pause_ms_last,
            self.pause_ms_max,
            if self.error.is_empty() {
                String::new()
            } else {
                format!(", error: {}", self.error)
            }
        )
    }
}

impl Console {
    async fn open(proxy: &Proxy) -> Console {
        let url = proxy.url_for(ADMIN, Some(ADMIN_PASSWORD), CONSOLE);
        match connect(&url).await {
            Ok(client) => Console { client },
            Err(e) => panic!("admin console login refused: {}", describe(&e)),
        }
    }

    /// The rows of one command, each as column -> text (NULL as "").
    async fn query(&self, sql: &str) -> Result<Vec<BTreeMap<String, String>>, String> {
        let msgs = within(sql, self.client.simple_query(sql)).await?;
        let mut rows = Vec::new();
        for m in msgs {
            if let SimpleQueryMessage::Row(r) = m {
                let mut row = BTreeMap::new();
                for (i, c) in r.columns().iter().enumerate() {
                    row.insert(c.name().to_string(), r.get(i).unwrap_or("").to_string());
                }
                rows.push(row);
            }
        }
        Ok(rows)
    }

    /// `MOVE SLOTS <args>`: the job id.
    async fn move_slots(&self, args: &str) -> Result<i64, String> {
        let sql = format!("MOVE SLOTS {args}");
        let rows = self.query(&sql).await?;
        if rows.len() != 1 {
            return Err(format!("{sql}: expected one row, got {rows:?}"));
        }
        let id = rows[0]
            .get("move")
            .ok_or_else(|| format!("{sql}: no column \"move\" in {rows:?}"))?;
        id.parse()
            .map_err(|_| format!("{sql}: job id {id:?} is not a number"))
    }

    async fn moves(&self) -> Vec<MoveJob> {
        let rows = self
            .query("SHOW MOVES")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        rows.iter().map(MoveJob::from_row).collect()
    }

    /// Polls SHOW MOVES until job `id` is done (panics if it fails or takes too long),
    /// printing its state and phase changes. Returns the final row and the phases seen.
    async fn wait_done(&self, id: i64, timeout: Duration, what: &str) -> (MoveJob, Vec<String>) {
        self.try_wait_done(id, timeout, what)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Console::wait_done`], returning why the job did not get done.
    async fn try_wait_done(
        &self,
        id: i64,
        timeout: Duration,
        what: &str,
    ) -> Result<(MoveJob, Vec<String>), String> {
        let started = Instant::now();
        let mut seen: Vec<String> = Vec::new();
        let mut last_print = Instant::now();
        loop {
            let jobs = self.moves().await;
            let Some(job) = jobs.iter().find(|j| j.id == id) else {
                panic!("{what}: job {id} is not in SHOW MOVES: {jobs:?}");
            };
            let phase = format!("{}/{}", job.state, job.phase);
            if seen.last() != Some(&phase) || last_print.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "{what}: +{:.1}s {}",
                    started.elapsed().as_secs_f64(),
                    job.short()
                );
                last_print = Instant::now();
                if seen.last() != Some(&phase) {
                    seen.push(phase);
                }
            }
            match job.state.as_str() {
                "done" => return Ok((job.clone(), seen)),
                "failed" => return Err(format!("{what}: the move failed: {}", job.short())),
                "running" => {}
                other => {
                    return Err(format!(
                        "{what}: SHOW MOVES state {other:?} is not running|done|failed"
                    ))
                }
            }
            if started.elapsed() >= timeout {
                return Err(format!(
                    "{what}: job {id} not done after {timeout:?}: {}",
                    job.short()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The value of a metric line `name{...database="db"...} value`, if present.
fn metric_value(text: &str, name: &str, db: &str) -> Option<f64> {
    let label = format!("database=\"{db}\"");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(&label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The cumulative buckets (le, count) of histogram `name` for database `db`.
fn histogram(text: &str, name: &str, db: &str) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket{{");
    let label = format!("database=\"{db}\"");
    let mut out: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&bucket) && l.contains(&label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The upper bound of the bucket holding quantile `q` of a cumulative histogram.
fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets.iter().find(|(_, c)| *c >= q * total).map(|b| b.0)
}

// ---- 1. moving slots under load --------------------------------------------------------------

const LOAD_DB: &str = "rb_load";
const LOAD_CLIENTS: usize = 16;
/// Users per client in the moving slots, and elsewhere.
const USERS_MOVING: usize = 8;
const USERS_OTHER: usize = 8;
const STATIC_USERS: usize = 2000;
const STATIC_POSTS_PER_USER: i64 = 50;
/// Client `c` owns user ids in [CLIENT_BASE + c * CLIENT_SPAN, + CLIENT_SPAN).
const CLIENT_BASE: i64 = 10_000_000;
const CLIENT_SPAN: i64 = 1_000_000;
const MAX_POSTS_PER_USER: usize = 30;

/// The preloaded rows in slots 0-63, never written during the test.
struct StaticSet {
    lo: i64,
    hi: i64,
    users: Vec<i64>,
    posts: i64,
}

/// What the main task and the clients share.
struct LoadShared {
    stop: AtomicBool,
    /// 0 before the MOVE, 1 while it runs, 2 after it is done.
    phase: AtomicU8,
    rounds: Vec<AtomicU64>,
    finished: Vec<AtomicBool>,
    moving_rounds: AtomicU64,
}

struct LoadSpec {
    idx: usize,
    url: String,
    moving: Vec<i64>,
    other: Vec<i64>,
    range: (i64, i64),
    seed: u64,
    stat: Arc<StaticSet>,
}

/// What a client knows for sure about its own users: their rows as its acknowledged
/// commits left them.
#[derive(Default)]
struct Ledger {
    users: BTreeMap<i64, String>,
    posts: BTreeMap<(i64, i64), String>,
    deleted: HashSet<(i64, i64)>,
    /// Every post whose insert was acknowledged.
    inserted: HashSet<(i64, i64)>,
}

impl Ledger {
    fn posts_of(&self, u: i64) -> Vec<(i64, String)> {
        self.posts
            .range((u, i64::MIN)..=(u, i64::MAX))
            .map(|((_, id), b)| (*id, b.clone()))
            .collect()
    }
}

#[derive(Default)]
struct ClientOutcome {
    ledger: Ledger,
    /// Errors and wrong reads, in order; the client stops at the first one.
    problems: Vec<String>,
    /// Users whose last write failed: its outcome is unknown.
    in_doubt: HashSet<i64>,
    /// Write latencies in ms, by phase (before/during/after the move) and by whether the
    /// user is in the moving slots.
    latency: [[Vec<f64>; 2]; 3],
    rounds: u64,
    fanouts: u64,
    static_checks: u64,
}

struct Stmts {
    ins_user: Statement,
    upd_user: Statement,
    ins_post: Statement,
    upd_post: Statement,
    del_post: Statement,
    sel_user: Statement,
    sel_posts: Statement,
    fan_own: Statement,
    fan_static_posts: Statement,
    fan_static_users: Statement,
    key_static: Statement,
}

impl Stmts {
    async fn prepare(c: &Client) -> Result<Stmts, String> {
        let p = |sql: &'static str| async move { within(sql, c.prepare(sql)).await };
        Ok(Stmts {
            ins_user: p("INSERT INTO users (id, name) VALUES ($1, $2)").await?,
            upd_user: p("UPDATE users SET name = $2 WHERE id = $1").await?,
            ins_post: p("INSERT INTO posts (id, user_id, body) VALUES ($2, $1, $3)").await?,
            upd_post: p("UPDATE posts SET body = $3 WHERE user_id = $1 AND id = $2").await?,
            del_post: p("DELETE FROM posts WHERE user_id = $1 AND id = $2").await?,
            sel_user: p("SELECT name FROM users WHERE id = $1").await?,
            sel_posts: p("SELECT id, body FROM posts WHERE user_id = $1").await?,
            fan_own: p("SELECT user_id, id, body FROM posts WHERE user_id BETWEEN $1 AND $2")
                .await?,
            fan_static_posts: p("SELECT count(*) FROM posts WHERE user_id BETWEEN $1 AND $2")
                .await?,
            fan_static_users: p("SELECT count(*) FROM users WHERE id BETWEEN $1 AND $2").await?,
            key_static: p("SELECT count(*), min(id), max(id) FROM posts WHERE user_id = $1")
                .await?,
        })
    }
}

fn expect_one(what: &str, n: u64) -> Result<(), String> {
    if n == 1 {
        Ok(())
    } else {
        Err(format!(
            "wrong result: {what} affected {n} rows, expected 1"
        ))
    }
}

/// One write on user `u` (creating it first), applied to the ledger once acknowledged.
async fn write_round(
    c: &mut Client,
    st: &Stmts,
    ledger: &mut Ledger,
    u: i64,
    round: u64,
    rng: &mut StdRng,
    next_post: &mut i64,
) -> Result<(), String> {
    if let std::collections::btree_map::Entry::Vacant(e) = ledger.users.entry(u) {
        let name = format!("u{u}-r{round}");
        let n = within("insert user", c.execute(&st.ins_user, &[&u, &name])).await?;
        expect_one("INSERT INTO users", n)?;
        e.insert(name);
        return Ok(());
    }
    let posts = ledger.posts_of(u);
    let r: f64 = rng.gen();
    if posts.is_empty() || (r < 0.35 && posts.len() < MAX_POSTS_PER_USER) {
        *next_post += 1;
        let id = *next_post;
        let body = format!("b{u}-{id}-r{round}");
        let n = within("insert post", c.execute(&st.ins_post, &[&u, &id, &body])).await?;
        expect_one("INSERT INTO posts", n)?;
        ledger.posts.insert((u, id), body);
        ledger.inserted.insert((u, id));
    } else if r < 0.55 {
        let id = posts[rng.gen_range(0..posts.len())].0;
        let body = format!("b{u}-{id}-upd-r{round}");
        let n = within("update post", c.execute(&st.upd_post, &[&u, &id, &body])).await?;
        expect_one("UPDATE posts", n)?;
        ledger.posts.insert((u, id), body);
    } else if r < 0.72 || posts.len() >= MAX_POSTS_PER_USER {
        let id = posts[rng.gen_range(0..posts.len())].0;
        let n = within("delete post", c.execute(&st.del_post, &[&u, &id])).await?;
        expect_one("DELETE FROM posts", n)?;
        ledger.posts.remove(&(u, id));
        ledger.deleted.insert((u, id));
    } else if r < 0.88 {
        // An explicit transaction: a new post and a new name for the user.
        *next_post += 1;
        let id = *next_post;
        let body = format!("b{u}-{id}-tx-r{round}");
        let name = format!("u{u}-tx-r{round}");
        let tx = within("BEGIN", c.transaction()).await?;
        let n = within(
            "insert post in tx",
            tx.execute(&st.ins_post, &[&u, &id, &body]),
        )
        .await?;
        expect_one("INSERT INTO posts (in a transaction)", n)?;
        let n = within("update user in tx", tx.execute(&st.upd_user, &[&u, &name])).await?;
        expect_one("UPDATE users (in a transaction)", n)?;
        within("COMMIT", tx.commit()).await?;
        ledger.posts.insert((u, id), body);
        ledger.inserted.insert((u, id));
        ledger.users.insert(u, name);
    } else {
        let name = format!("u{u}-r{round}");
        let n = within("update user", c.execute(&st.upd_user, &[&u, &name])).await?;
        expect_one("UPDATE users", n)?;
        ledger.users.insert(u, name);
    }
    Ok(())
}

/// Compares rows read for user `u` with the ledger: no row twice, none missing, none extra,
/// every value the acknowledged one.
fn compare_user_posts(
    what: &str,
    u: i64,
    got: &[(i64, String)],
    ledger: &Ledger,
) -> Result<(), String> {
    let mut seen = HashMap::new();
    for (id, body) in got {
        if seen.insert(*id, body.clone()).is_some() {
            return Err(format!(
                "wrong read: {what}: post ({u}, {id}) returned twice"
            ));
        }
    }
    let want: HashMap<i64, String> = ledger.posts_of(u).into_iter().collect();
    for (id, body) in &want {
        match seen.get(id) {
            None => {
                return Err(format!(
                    "wrong read: {what}: committed post ({u}, {id}) missing (got {} rows, want {})",
                    got.len(),
                    want.len()
                ))
            }
            Some(b) if b != body => {
                return Err(format!(
                    "wrong read: {what}: post ({u}, {id}) body {b:?}, committed {body:?}"
                ))
            }
            Some(_) => {}
        }
    }
    for id in seen.keys() {
        if !want.contains_key(id) {
            let why = if ledger.deleted.contains(&(u, *id)) {
                "deleted (acknowledged) post"
            } else {
                "post never written"
            };
            return Err(format!("wrong read: {what}: {why} ({u}, {id}) returned"));
        }
    }
    Ok(())
}

/// Reads user `u` back right after writing it (read-your-writes makes that exact), and now
/// and then the client's whole key range and the preloaded rows (keyless fan-outs).
async fn check_round(
    c: &Client,
    st: &Stmts,
    out: &mut ClientOutcome,
    u: i64,
    round: u64,
    spec: &LoadSpec,
    rng: &mut StdRng,
) -> Result<(), String> {
    let stat = &spec.stat;
    let ledger = &out.ledger;
    let rows = within("select user", c.query(&st.sel_user, &[&u])).await?;
    let names: Vec<Option<String>> = rows.iter().map(|r| r.get(0)).collect();
    let want = ledger.users.get(&u).cloned();
    if names.len() != 1 || names[0] != want {
        return Err(format!(
            "wrong read: SELECT name FROM users WHERE id = {u}: got {names:?}, committed {want:?}"
        ));
    }
    let rows = within("select posts", c.query(&st.sel_posts, &[&u])).await?;
    let got: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    compare_user_posts("keyed SELECT of posts", u, &got, ledger)?;

    if round % 4 == 0 {
        let (lo, hi) = spec.range;
        let rows = within("fan-out over own range", c.query(&st.fan_own, &[&lo, &hi])).await?;
        let mut all = HashSet::new();
        let mut of_u = Vec::new();
        for r in &rows {
            let (uid, id, body): (i64, i64, String) = (r.get(0), r.get(1), r.get(2));
            if !all.insert((uid, id)) {
                return Err(format!(
                    "wrong read: keyless SELECT over [{lo}, {hi}]: post ({uid}, {id}) returned twice"
                ));
            }
            if !ledger.inserted.contains(&(uid, id)) {
                return Err(format!(
                    "wrong read: keyless SELECT over [{lo}, {hi}]: post ({uid}, {id}) never written"
                ));
            }
            if uid == u {
                of_u.push((id, body));
            }
        }
        compare_user_posts("keyless SELECT over the client's range", u, &of_u, ledger)?;
        out.fanouts += 1;
    }

    if (round + spec.idx as u64) % 8 == 0 {
        let (lo, hi) = (stat.lo, stat.hi);
        let row = within(
            "count static posts",
            c.query_one(&st.fan_static_posts, &[&lo, &hi]),
        )
        .await?;
        let n: i64 = row.get(0);
        if n != stat.posts {
            return Err(format!(
                "wrong read: keyless count of the preloaded posts = {n}, want {}",
                stat.posts
            ));
        }
        let row = within(
            "count static users",
            c.query_one(&st.fan_static_users, &[&lo, &hi]),
        )
        .await?;
        let n: i64 = row.get(0);
        if n != stat.users.len() as i64 {
            return Err(format!(
                "wrong read: keyless count of the preloaded users = {n}, want {}",
                stat.users.len()
            ));
        }
        let s = stat.users[rng.gen_range(0..stat.users.len())];
        let row = within("keyed static read", c.query_one(&st.key_static, &[&s])).await?;
        let got: (i64, Option<i64>, Option<i64>) = (row.get(0), row.get(1), row.get(2));
        let want = (STATIC_POSTS_PER_USER, Some(1), Some(STATIC_POSTS_PER_USER));
        if got != want {
            return Err(format!(
                "wrong read: count/min/max of the preloaded posts of user {s} = {got:?}, want {want:?}"
            ));
        }
        out.static_checks += 1;
    }
    Ok(())
}

async fn load_client(spec: LoadSpec, shared: Arc<LoadShared>) -> ClientOutcome {
    let mut out = ClientOutcome::default();
    let who = format!("client {}", spec.idx);
    let mut c = match connect(&spec.url).await {
        Ok(c) => c,
        Err(e) => {
            out.problems
                .push(format!("{who}: connect: {}", describe(&e)));
            shared.finished[spec.idx].store(true, Ordering::SeqCst);
            return out;
        }
    };
    let st = match Stmts::prepare(&c).await {
        Ok(st) => st,
        Err(e) => {
            out.problems.push(format!("{who}: prepare: {e}"));
            shared.finished[spec.idx].store(true, Ordering::SeqCst);
            return out;
        }
    };
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut next_post = 0i64;
    let mut round = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        round += 1;
        let moving = rng.gen_bool(0.5);
        let pool = if moving { &spec.moving } else { &spec.other };
        let u = pool[rng.gen_range(0..pool.len())];
        let phase = usize::from(shared.phase.load(Ordering::SeqCst).min(2));
        let t0 = Instant::now();
        let res = write_round(
            &mut c,
            &st,
            &mut out.ledger,
            u,
            round,
            &mut rng,
            &mut next_post,
        )
        .await;
        if let Err(e) = res {
            out.problems
                .push(format!("{who}, round {round}, write of user {u}: {e}"));
            out.in_doubt.insert(u);
            break;
        }
        out.latency[phase][usize::from(moving)].push(t0.elapsed().as_secs_f64() * 1000.0);
        if let Err(e) = check_round(&c, &st, &mut out, u, round, &spec, &mut rng).await {
            out.problems
                .push(format!("{who}, round {round}, read of user {u}: {e}"));
            break;
        }
        out.rounds = round;
        shared.rounds[spec.idx].fetch_add(1, Ordering::SeqCst);
        if moving {
            shared.moving_rounds.fetch_add(1, Ordering::SeqCst);
        }
    }
    shared.finished[spec.idx].store(true, Ordering::SeqCst);
    out
}

/// Waits until every client still running has done `more` rounds beyond `from`.
async fn wait_rounds(shared: &LoadShared, from: &[u64], more: u64, what: &str) {
    wait_for(what, Duration::from_secs(90), || async {
        (0..LOAD_CLIENTS)
            .all(|i| {
                shared.finished[i].load(Ordering::SeqCst)
                    || shared.rounds[i].load(Ordering::SeqCst) >= from[i] + more
            })
            .then_some(())
    })
    .await;
}

fn rounds_now(shared: &LoadShared) -> Vec<u64> {
    shared
        .rounds
        .iter()
        .map(|r| r.load(Ordering::SeqCst))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_slots_under_load_losing_nothing() {
    const TEST: &str = "moves_slots_under_load_losing_nothing";
    if skip_in_direct_mode(TEST) {
        return;
    }
    let cluster = own_cluster().await;
    let _heavy = exclusive().await;
    let started = Instant::now();
    let seed = seed();
    let db = TestDb::create(cluster, LOAD_DB).await;
    let initial = db.map();
    for s in 0..=63 {
        assert_eq!(
            initial.shard_of_slot(s),
            0,
            "the initial map gives slot {s} to shard 0"
        );
    }

    // 2,000 users (and 50 posts each) in slots 0-63, loaded straight into shard 0.
    let static_users = keys_where(1, STATIC_USERS, |k| slot(k) <= 63);
    let mut rows = Rows::default();
    for &u in &static_users {
        rows.users.push((u, format!("static-{u}")));
        for id in 1..=STATIC_POSTS_PER_USER {
            rows.posts.push((u, id, format!("s{u}-{id}")));
        }
    }
    let stat = Arc::new(StaticSet {
        lo: static_users[0],
        hi: *static_users.last().expect("static users"),
        posts: rows.posts.len() as i64,
        users: static_users.clone(),
    });
    assert!(
        stat.hi < CLIENT_BASE,
        "the preloaded keys overlap the clients' ranges"
    );
    let mut per_slot: BTreeMap<u32, u64> = BTreeMap::new();
    for (u, _) in &rows.users {
        *per_slot.entry(slot(*u)).or_default() += 1;
    }
    for (u, _, _) in &rows.posts {
        *per_slot.entry(slot(*u)).or_default() += 1;
    }
    let counts: Vec<u64> = per_slot.values().copied().collect();
    let total_rows = rows.users.len() + rows.posts.len();
    assert_eq!(counts.len(), 64, "the preload covers slots 0-63");
    assert!(
        total_rows >= 100_000,
        "at least 100,000 rows in the moving slots"
    );
    eprintln!(
        "{TEST}: preloaded {total_rows} rows ({} users, {} posts) into slots 0-63: per slot \
         min {} / mean {} / max {}",
        rows.users.len(),
        rows.posts.len(),
        counts.iter().min().expect("slots"),
        total_rows as u64 / 64,
        counts.iter().max().expect("slots")
    );
    let t = Instant::now();
    db.load(&initial, &rows).await;
    db.wait_replicas().await;
    eprintln!("{TEST}: loaded and replicated in {:?}", t.elapsed());
    let mut expected = Expected::from_rows(&rows);
    drop(rows);

    let proxy = Proxy::start_config_env(&db.config(&["move_batch_rows = 5000"], true), &[]).await;
    let console = Console::open(&proxy).await;
    assert!(
        console.moves().await.is_empty(),
        "SHOW MOVES lists jobs before any MOVE"
    );

    // 16 clients, each owning 8 users in slots 0-63 and 8 elsewhere, in a key range of its own.
    let shared = Arc::new(LoadShared {
        stop: AtomicBool::new(false),
        phase: AtomicU8::new(0),
        rounds: (0..LOAD_CLIENTS).map(|_| AtomicU64::new(0)).collect(),
        finished: (0..LOAD_CLIENTS).map(|_| AtomicBool::new(false)).collect(),
        moving_rounds: AtomicU64::new(0),
    });
    let mut tasks = Vec::new();
    for idx in 0..LOAD_CLIENTS {
        let lo = CLIENT_BASE + idx as i64 * CLIENT_SPAN;
        let hi = lo + CLIENT_SPAN - 1;
        let spec = LoadSpec {
            idx,
            url: proxy.url_for("app", Some("app"), LOAD_DB),
            moving: keys_where(lo, USERS_MOVING, |k| slot(k) <= 63),
            other: keys_where(lo, USERS_OTHER, |k| slot(k) > 63),
            range: (lo, hi),
            seed: seed.wrapping_add(idx as u64),
            stat: stat.clone(),
        };
        assert!(spec.moving.iter().chain(&spec.other).all(|k| *k <= hi));
        tasks.push(tokio::spawn(load_client(spec, shared.clone())));
    }
    wait_rounds(
        &shared,
        &[0; LOAD_CLIENTS],
        30,
        "every client to run 30 rounds",
    )
    .await;
    let before = rounds_now(&shared);
    let moving_before = shared.moving_rounds.load(Ordering::SeqCst);

    // The move, under load.
    shared.phase.store(1, Ordering::SeqCst);
    let move_started = Instant::now();
    let job = console
        .move_slots("0-63 TO 1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (done, phases) = match console
        .try_wait_done(job, Duration::from_secs(300), TEST)
        .await
    {
        Ok(d) => d,
        Err(e) => {
            // Say what the clients saw meanwhile, then fail.
            shared.stop.store(true, Ordering::SeqCst);
            let mut seen = Vec::new();
            let mut slowest = Vec::new();
            for t in tasks {
                let o = t.await.expect("client task panicked");
                seen.extend(o.problems);
                slowest.extend(o.latency[1][1].iter().copied());
            }
            panic!(
                "{e}\nwrite latency on the moving users during the move: {}\nclients' \
                 problems: {seen:#?}",
                latency_summary(slowest)
            );
        }
    };
    let move_time = move_started.elapsed();
    shared.phase.store(2, Ordering::SeqCst);
    let moving_during = shared.moving_rounds.load(Ordering::SeqCst) - moving_before;
    let during: u64 = rounds_now(&shared)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .sum();
    eprintln!(
        "{TEST}: move done in {move_time:?}; phases seen {phases:?}; {during} client rounds \
         during the move ({moving_during} on users in the moving slots)"
    );

    // Load goes on a while after the move, then stops.
    let after = rounds_now(&shared);
    wait_rounds(
        &shared,
        &after,
        30,
        "every client to run 30 rounds after the move",
    )
    .await;
    shared.stop.store(true, Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("client task panicked"));
    }

    // What the clients saw.
    let mut problems = Vec::new();
    let mut skip = HashSet::new();
    let mut latency: [[Vec<f64>; 2]; 3] = Default::default();
    let (mut rounds, mut fanouts, mut static_checks) = (0, 0, 0);
    for o in outcomes {
        problems.extend(o.problems);
        skip.extend(o.in_doubt);
        expected.users.extend(o.ledger.users);
        expected.posts.extend(o.ledger.posts);
        expected.deleted.extend(o.ledger.deleted);
        for (p, by_moving) in o.latency.into_iter().enumerate() {
            for (m, v) in by_moving.into_iter().enumerate() {
                latency[p][m].extend(v);
            }
        }
        rounds += o.rounds;
        fanouts += o.fanouts;
        static_checks += o.static_checks;
    }
    eprintln!(
        "{TEST}: {rounds} client rounds, {fanouts} keyless reads of own ranges, \
         {static_checks} checks of the preloaded rows"
    );
    for (p, name) in ["before", "during", "after"].iter().enumerate() {
        eprintln!(
            "{TEST}: write latency {name} the move: moving users {}; other users {}",
            latency_summary(latency[p][1].clone()),
            latency_summary(latency[p][0].clone())
        );
    }

    // SHOW MOVES and the metrics.
    eprintln!("{TEST}: SHOW MOVES: {}", done.short());
    if let Some(port) = proxy.metrics_port() {
        match http_get(port, "/metrics").await {
            Ok((200, text)) => {
                let buckets = histogram(&text, "shardgate_move_pause_seconds", LOAD_DB);
                let count = metric_value(&text, "shardgate_move_pause_seconds_count", LOAD_DB);
                let sum = metric_value(&text, "shardgate_move_pause_seconds_sum", LOAD_DB);
                eprintln!(
                    "{TEST}: shardgate_move_pause_seconds: count {count:?}, sum {sum:?} s, \
                     p50 <= {:?} s, p99 <= {:?} s, buckets {buckets:?}",
                    histogram_quantile(&buckets, 0.5),
                    histogram_quantile(&buckets, 0.99)
                );
                let completed = metric_value(&text, "shardgate_moves_completed_total", LOAD_DB);
                assert!(
                    completed.is_some_and(|v| v >= 1.0),
                    "shardgate_moves_completed_total{{database=\"{LOAD_DB}\"}} = {completed:?} \
                     after a completed move"
                );
            }
            other => panic!("GET /metrics: {other:?}"),
        }
    }

    assert_none("errors or wrong reads seen by the clients", &problems);
    assert!(
        moving_during >= 50,
        "only {moving_during} client rounds on the moving users completed during the move: \
         the load did not run across it"
    );
    assert_eq!(done.slots, "0-63", "SHOW MOVES slots: {}", done.short());
    assert_eq!(
        done.from_shard,
        "0",
        "SHOW MOVES from_shard: {}",
        done.short()
    );
    assert_eq!(done.to_shard, "1", "SHOW MOVES to_shard: {}", done.short());
    assert_eq!(done.phase, "done", "SHOW MOVES phase: {}", done.short());
    assert_eq!(
        done.database,
        LOAD_DB,
        "SHOW MOVES database: {}",
        done.short()
    );
    assert!(
        done.rows_copied >= stat.posts as u64 + stat.users.len() as u64,
        "SHOW MOVES rows_copied {} < the {} preloaded rows: {}",
        done.rows_copied,
        stat.posts as u64 + stat.users.len() as u64,
        done.short()
    );
    assert!(
        done.cutovers >= 2 && done.rows_copied / done.cutovers <= 2 * 5000,
        "move_batch_rows = 5000 must split {} rows into cut-overs of about 5000 rows at most, \
         got {} cut-overs: {}",
        done.rows_copied,
        done.cutovers,
        done.short()
    );

    // The map file: a new version, slots 0-63 on shard 1, nothing else changed.
    let map = db.map();
    assert!(
        map.version() > initial.version(),
        "the map file's version is {} after the move (was {})",
        map.version(),
        initial.version()
    );
    let owners = check_map_change(TEST, &initial, &map, 0..=63, &[1]);
    assert_eq!(
        owners,
        BTreeSet::from([1]),
        "slots 0-63 owners after the move"
    );

    // Every acknowledged row once, where the map says; nothing deleted came back.
    let placement = db.placement().await;
    assert_none("rows misplaced after the move", &placement.misplaced(&map));
    assert_none(
        "contents after the move (vs the preload and the clients' ledgers)",
        &placement.differences(&expected, &skip),
    );
    eprintln!(
        "{TEST}: {} users and {} posts checked on the primaries, map version {} -> {}; \
         passed in {:?}",
        placement.users.len(),
        placement.posts.len(),
        initial.version(),
        map.version(),
        started.elapsed()
    );
    drop(console);
    drop(proxy);
    db.drop_db().await;
}

// ---- 2. auto_rebalance ---------------------------------------------------------------------

const SKEW_DB: &str = "rb_skew";
const SKEW_CLIENTS: usize = 8;
const SKEW_USERS: usize = 400;
const SKEW_HOT: usize = 40;
const SKEW_POSTS: i64 = 5;
const WINDOW: Duration = Duration::from_secs(3);

/// Statements per shard in [from, to) of `events` (the key of each), placed by `map`.
fn window_loads(
    events: &VecDeque<(Instant, i64)>,
    from: Instant,
    to: Instant,
    map: &ShardMap,
) -> Vec<u64> {
    let mut loads = vec![0u64; SHARDS.into()];
    for (t, k) in events {
        if *t >= from && *t < to {
            loads[shard_of(map, *k) as usize] += 1;
        }
    }
    loads
}

fn max_mean(loads: &[u64]) -> f64 {
    let total: u64 = loads.iter().sum();
    if total == 0 {
        return f64::NAN;
    }
    let mean = total as f64 / loads.len() as f64;
    *loads.iter().max().expect("shards") as f64 / mean
}

struct SkewSpec {
    idx: usize,
    url: String,
    hot: Vec<i64>,
    cold: Vec<i64>,
    seed: u64,
}

#[derive(Default)]
struct SkewOutcome {
    names: BTreeMap<i64, String>,
    problems: Vec<String>,
    in_doubt: HashSet<i64>,
    rounds: u64,
}

async fn skew_client(
    spec: SkewSpec,
    events: Arc<Mutex<VecDeque<(Instant, i64)>>>,
    stop: Arc<AtomicBool>,
) -> SkewOutcome {
    let mut out = SkewOutcome::default();
    let who = format!("client {}", spec.idx);
    let c = match connect(&spec.url).await {
        Ok(c) => c,
        Err(e) => {
            out.problems
                .push(format!("{who}: connect: {}", describe(&e)));
            return out;
        }
    };
    let prep = async {
        Ok::<_, String>((
            within(
                "prepare",
                c.prepare("UPDATE users SET name = $2 WHERE id = $1"),
            )
            .await?,
            within("prepare", c.prepare("SELECT name FROM users WHERE id = $1")).await?,
        ))
    };
    let (upd, sel) = match prep.await {
        Ok(s) => s,
        Err(e) => {
            out.problems.push(format!("{who}: {e}"));
            return out;
        }
    };
    let mut rng = StdRng::seed_from_u64(spec.seed);
    while !stop.load(Ordering::SeqCst) {
        out.rounds += 1;
        let pool = if rng.gen_bool(0.7) {
            &spec.hot
        } else {
            &spec.cold
        };
        let u = pool[rng.gen_range(0..pool.len())];
        let name = format!("n{u}-{}-{}", spec.idx, out.rounds);
        match within("update", c.execute(&upd, &[&u, &name])).await {
            Ok(1) => {
                out.names.insert(u, name.clone());
            }
            Ok(n) => {
                out.problems
                    .push(format!("{who}: UPDATE users id={u} affected {n} rows"));
                break;
            }
            Err(e) => {
                out.problems
                    .push(format!("{who}: UPDATE users id={u}: {e}"));
                out.in_doubt.insert(u);
                break;
            }
        }
        events
            .lock()
            .expect("events")
            .push_back((Instant::now(), u));
        if rng.gen_bool(0.5) {
            match within("select", c.query(&sel, &[&u])).await {
                Ok(rows) => {
                    let got: Vec<Option<String>> = rows.iter().map(|r| r.get(0)).collect();
                    if got != [Some(name)] {
                        out.problems.push(format!(
                            "{who}: wrong read: SELECT name FROM users WHERE id = {u} right after \
                             its update: {got:?}"
                        ));
                        break;
                    }
                }
                Err(e) => {
                    out.problems
                        .push(format!("{who}: SELECT users id={u}: {e}"));
                    break;
                }
            }
            events
                .lock()
                .expect("events")
                .push_back((Instant::now(), u));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_rebalance_fixes_skew() {
    const TEST: &str = "auto_rebalance_fixes_skew";
    if skip_in_direct_mode(TEST) {
        return;
    }
    let cluster = own_cluster().await;
    let _heavy = exclusive().await;
    let started = Instant::now();
    let seed = seed();
    let db = TestDb::create(cluster, SKEW_DB).await;
    let initial = db.map();

    // 40 hot users on shard 0, each in a slot of its own; 360 cold users spread evenly.
    let mut hot_slots = HashSet::new();
    let hot = keys_where(1_000_000, SKEW_HOT, |k| {
        shard_of(&initial, k) == 0 && hot_slots.insert(slot(k))
    });
    let cold = keys_where(2_000_000, SKEW_USERS - SKEW_HOT, |_| true);
    let mut rows = Rows::default();
    for &u in hot.iter().chain(&cold) {
        rows.users.push((u, format!("n0-{u}")));
        for id in 1..=SKEW_POSTS {
            rows.posts.push((u, id, format!("p{u}-{id}")));
        }
    }
    db.load(&initial, &rows).await;
    db.wait_replicas().await;
    let mut expected = Expected::from_rows(&rows);

    let config = db.config(
        &[
            "auto_rebalance = true",
            "hot_window = \"3s\"",
            "rebalance_interval = \"1s\"",
            "hot_ratio = 1.5",
        ],
        false,
    );
    let proxy = Proxy::start_config_env(&config, &[]).await;
    let console = Console::open(&proxy).await;

    let events: Arc<Mutex<VecDeque<(Instant, i64)>>> = Arc::new(Mutex::new(VecDeque::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for idx in 0..SKEW_CLIENTS {
        let pick = |v: &[i64]| -> Vec<i64> {
            v.iter()
                .enumerate()
                .filter(|(i, _)| i % SKEW_CLIENTS == idx)
                .map(|(_, k)| *k)
                .collect()
        };
        let spec = SkewSpec {
            idx,
            url: proxy.url_for("app", Some("app"), SKEW_DB),
            hot: pick(&hot),
            cold: pick(&cold),
            seed: seed.wrapping_add(idx as u64),
        };
        tasks.push(tokio::spawn(skew_client(
            spec,
            events.clone(),
            stop.clone(),
        )));
    }
    wait_for("the load to start", Duration::from_secs(30), || async {
        (events.lock().expect("events").len() >= 200).then_some(())
    })
    .await;
    let load_start = Instant::now();

    // The first window, placed by the map of that time (the initial one): shard 0 is hot.
    let first_end = load_start + WINDOW;
    tokio::time::sleep_until(first_end.into()).await;
    let first = window_loads(
        &events.lock().expect("events"),
        load_start,
        first_end,
        &initial,
    );
    let first_ratio = max_mean(&first);
    eprintln!("{TEST}: first {WINDOW:?} window, per shard {first:?}, max/mean {first_ratio:.2}");

    // Then, with no operator action, until max/mean < 1.25 over a whole window that began
    // after the map's last change.
    let deadline = load_start + Duration::from_secs(120);
    let mut version = initial.version();
    let mut version_since = load_start;
    let mut last_print = Instant::now();
    let mut timeline = Vec::new();
    let outcome = loop {
        let now = Instant::now();
        let map = db.map();
        if map.version() != version {
            eprintln!(
                "{TEST}: +{:.1}s map version {} -> {} (shard slots {:?})",
                (now - load_start).as_secs_f64(),
                version,
                map.version(),
                map.slot_counts()
            );
            version = map.version();
            version_since = now;
        }
        let loads = {
            let mut ev = events.lock().expect("events");
            while ev
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW * 4)
            {
                ev.pop_front();
            }
            window_loads(&ev, now - WINDOW, now, &map)
        };
        let ratio = max_mean(&loads);
        if last_print.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "{TEST}: +{:.1}s map v{version}, last {WINDOW:?}: per shard {loads:?}, max/mean {ratio:.2}",
                (now - load_start).as_secs_f64()
            );
            timeline.push(format!(
                "{:.0}s:{ratio:.2}",
                (now - load_start).as_secs_f64()
            ));
            last_print = Instant::now();
        }
        if now >= version_since + WINDOW && version != initial.version() && ratio < 1.25 {
            break Some((loads, ratio, now - load_start));
        }
        // Every client stopped (an error or a wrong read): no load left to balance.
        if now >= deadline || tasks.iter().all(|t| t.is_finished()) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    stop.store(true, Ordering::SeqCst);
    let mut problems = Vec::new();
    let mut skip = HashSet::new();
    let mut rounds = 0;
    for t in tasks {
        let o = t.await.expect("client task panicked");
        problems.extend(o.problems);
        skip.extend(o.in_doubt);
        expected.users.extend(o.names);
        rounds += o.rounds;
    }
    let jobs = console.moves().await;
    for j in &jobs {
        eprintln!("{TEST}: SHOW MOVES: {}", j.short());
    }

    assert_none("errors or wrong reads seen by the clients", &problems);
    assert!(
        first_ratio >= 1.6,
        "the skewed load must make shard 0 hot at first: max/mean {first_ratio:.2} (< 1.6), \
         per shard {first:?}"
    );
    let Some((loads, ratio, after)) = outcome else {
        panic!(
            "auto_rebalance did not bring max/mean below 1.25 within 120 s (map version \
             {version}; ratio timeline {timeline:?}; jobs {:?})",
            jobs.iter().map(MoveJob::short).collect::<Vec<_>>()
        );
    };
    eprintln!(
        "{TEST}: balanced after {after:?}: per shard {loads:?}, max/mean {ratio:.2} \
         ({rounds} client rounds)"
    );

    // The jobs: at least one done, none failed; wait for any still running to finish.
    assert!(
        jobs.iter().any(|j| j.state == "done"),
        "SHOW MOVES shows no completed job: {jobs:?}"
    );
    let jobs = wait_for(
        "the auto-rebalance jobs to finish",
        Duration::from_secs(60),
        || async {
            let jobs = console.moves().await;
            jobs.iter().all(|j| j.state != "running").then_some(jobs)
        },
    )
    .await;
    let failed: Vec<String> = jobs
        .iter()
        .filter(|j| j.state == "failed")
        .map(MoveJob::short)
        .collect();
    assert_none("failed auto-rebalance jobs", &failed);

    let map = db.map();
    assert!(
        map.version() > initial.version(),
        "the map file was not rewritten"
    );
    let placement = db.placement().await;
    assert_none(
        "rows misplaced after auto-rebalancing",
        &placement.misplaced(&map),
    );
    assert_none(
        "contents after auto-rebalancing",
        &placement.differences(&expected, &skip),
    );
    eprintln!(
        "{TEST}: map version {} with slots per shard {:?}; passed in {:?}",
        map.version(),
        map.slot_counts(),
        started.elapsed()
    );
    drop(console);
    drop(proxy);
    db.drop_db().await;
}

// ---- 3. killed in the middle of a move -------------------------------------------------------

const KILL_LO: u32 = 128;
const KILL_HI: u32 = 143;

/// Checks through a running shardgate that every expected row reads back once: keyless
/// counts and keyed reads of a sample of the users (moving ones included).
async fn check_through_proxy(
    what: &str,
    proxy: &Proxy,
    db: &TestDb,
    want: &Expected,
    sample: &[i64],
) {
    let url = proxy.url_for("app", Some("app"), &db.name);
    let c = connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{what}: connect through shardgate: {}", describe(&e)));
    let n: i64 = within(
        "count posts",
        c.query_one("SELECT count(*) FROM posts", &[]),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"))
    .get(0);
    assert_eq!(
        n,
        want.posts.len() as i64,
        "{what}: keyless count(*) of posts through shardgate"
    );
    let n: i64 = within(
        "count users",
        c.query_one("SELECT count(*) FROM users", &[]),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"))
    .get(0);
    assert_eq!(
        n,
        want.users.len() as i64,
        "{what}: keyless count(*) of users through shardgate"
    );
    for &u in sample {
        let rows = within(
            "keyed posts",
            c.query("SELECT id, body FROM posts WHERE user_id = $1", &[&u]),
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut got: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        got.sort();
        let wanted: Vec<(i64, String)> = want
            .posts
            .range((u, i64::MIN)..=(u, i64::MAX))
            .map(|((_, id), b)| (*id, b.clone()))
            .collect();
        assert_eq!(got, wanted, "{what}: posts of user {u} through shardgate");
    }
}

async fn kill_mid_move(fault: &str) {
    let test = format!("kill_mid_{fault}");
    if skip_in_direct_mode(&test) {
        return;
    }
    let cluster = own_cluster().await;
    let _light = timing().await;
    let started = Instant::now();
    let name = format!("rb_kill_{}", fault.trim_start_matches("move_after_"));
    let db = TestDb::create(cluster, &name).await;
    let initial = db.map();
    for s in KILL_LO..=KILL_HI {
        assert_eq!(
            initial.shard_of_slot(s),
            0,
            "the initial map gives slot {s} to shard 0"
        );
    }

    // 250 users x 12 posts in the slots that move; 150 users x 4 posts elsewhere.
    let moving = keys_where(1, 250, |k| (KILL_LO..=KILL_HI).contains(&slot(k)));
    let other = keys_where(5_000_000, 150, |k| !(KILL_LO..=KILL_HI).contains(&slot(k)));
    let mut rows = Rows::default();
    for (&u, n) in moving
        .iter()
        .map(|u| (u, 12))
        .chain(other.iter().map(|u| (u, 4)))
    {
        rows.users.push((u, format!("k{u}")));
        for id in 1..=n {
            rows.posts.push((u, id, format!("k{u}-{id}")));
        }
    }
    db.load(&initial, &rows).await;
    db.wait_replicas().await;
    let want = Expected::from_rows(&rows);
    let sample: Vec<i64> = moving
        .iter()
        .step_by(50)
        .chain(other.iter().step_by(50))
        .copied()
        .collect();

    let config = db.config(&[], false);
    let proxy = Proxy::start_config_env(&config, &[("SHARDGATE_FAULT", fault)]).await;
    let console = Console::open(&proxy).await;
    let args = format!("{KILL_LO}-{KILL_HI} TO 2");
    match console.move_slots(&args).await {
        Ok(id) => eprintln!("{test}: MOVE SLOTS {args}: job {id}"),
        // The job may reach the fault before the answer is written.
        Err(e) => eprintln!("{test}: MOVE SLOTS {args}: no answer ({e})"),
    }
    let Some(status) = proxy.wait_exit(Duration::from_secs(60)).await else {
        let jobs = console.moves().await;
        panic!(
            "{test}: shardgate did not abort at {fault} within 60 s; SHOW MOVES: {:?}",
            jobs.iter().map(MoveJob::short).collect::<Vec<_>>()
        );
    };
    drop(console);
    assert!(
        !status.success(),
        "{test}: shardgate exited normally ({status}), expected an abort"
    );
    // The map file is never half-written, even at the crash.
    let crashed = db
        .try_map()
        .unwrap_or_else(|e| panic!("{test}: at the crash: {e}"));
    let p = db.placement().await;
    let on: Vec<usize> = (0..u32::from(SHARDS))
        .map(|s| {
            p.posts
                .iter()
                .filter(|((u, _), locs)| moving.contains(u) && locs.iter().any(|l| l.0 == s))
                .count()
        })
        .collect();
    eprintln!(
        "{test}: aborted ({status}); map file version {}, slot {KILL_LO} on shard {}; moving \
         posts found on shards 0/1/2: {on:?}",
        crashed.version(),
        crashed.shard_of_slot(KILL_LO)
    );

    // The successor recovers before it accepts clients.
    let successor = proxy.start_successor(&[]).await;
    let recovered = db.map();
    let recovered_owners =
        check_map_change(&test, &initial, &recovered, KILL_LO..=KILL_HI, &[0, 2]);
    eprintln!(
        "{test}: after recovery: map version {}, slots {KILL_LO}-{KILL_HI} on shard(s) \
         {recovered_owners:?}",
        recovered.version()
    );
    let p = db.placement().await;
    assert_none(
        &format!("{test}: rows misplaced after recovery"),
        &p.misplaced(&recovered),
    );
    assert_none(
        &format!("{test}: contents after recovery"),
        &p.differences(&want, &HashSet::new()),
    );
    check_through_proxy(
        &format!("{test}: after recovery"),
        &successor,
        &db,
        &want,
        &sample,
    )
    .await;

    // A retried MOVE completes.
    let console = Console::open(&successor).await;
    let job = console
        .move_slots(&args)
        .await
        .unwrap_or_else(|e| panic!("{test}: retry: {e}"));
    let (done, _) = console
        .wait_done(job, Duration::from_secs(120), &format!("{test} (retry)"))
        .await;
    let map = db.map();
    let owners = check_map_change(&test, &initial, &map, KILL_LO..=KILL_HI, &[2]);
    assert_eq!(
        owners,
        BTreeSet::from([2]),
        "{test}: owners after the retried move"
    );
    assert!(
        map.version() >= recovered.version(),
        "{test}: map version went back from {} to {}",
        recovered.version(),
        map.version()
    );
    if recovered_owners != BTreeSet::from([2]) {
        assert!(
            map.version() > recovered.version(),
            "{test}: the retry moved slots but the map version stayed {}",
            map.version()
        );
    }
    let p = db.placement().await;
    assert_none(
        &format!("{test}: rows misplaced after the retry"),
        &p.misplaced(&map),
    );
    assert_none(
        &format!("{test}: contents after the retry"),
        &p.differences(&want, &HashSet::new()),
    );
    check_through_proxy(
        &format!("{test}: after the retry"),
        &successor,
        &db,
        &want,
        &sample,
    )
    .await;
    assert_eq!(
        (done.slots.as_str(), done.to_shard.as_str()),
        (format!("{KILL_LO}-{KILL_HI}").as_str(), "2"),
        "{test}: SHOW MOVES row of the retried MOVE SLOTS {args}: {}",
        done.short()
    );
    eprintln!(
        "{test}: retried move: {}; map version {}; passed in {:?}",
        done.short(),
        map.version(),
        started.elapsed()
    );
    drop(console);
    drop(successor);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_move_after_drain() {
    kill_mid_move("move_after_drain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_move_after_copy() {
    kill_mid_move("move_after_copy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_move_after_target_commit() {
    kill_mid_move("move_after_target_commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_move_after_source_commit() {
    kill_mid_move("move_after_source_commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_move_after_map_write() {
    kill_mid_move("move_after_map_write").await;
}

/// Every row of `rows`, and nothing else, lies on the shard `map` gives it.
async fn check_rows(what: &str, db: &TestDb, map: &ShardMap, rows: &Rows) {
    let p = db.placement().await;
    assert_none(&format!("{what}: misplaced"), &p.misplaced(map));
    assert_none(
        &format!("{what}: contents"),
        &p.differences(&Expected::from_rows(rows), &HashSet::new()),
    );
}

/// A prepared transaction on the source that no running shardgate owns (here: another
/// client's) may write a moving slot when it commits, after the copy. The move must refuse
/// to cut over (nothing moves, nothing is lost) and succeed once it is resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_prepared_transaction_holds_a_move_back() {
    const TEST: &str = "foreign_prepared_transaction_holds_a_move_back";
    if skip_in_direct_mode(TEST) {
        return;
    }
    let cluster = own_cluster().await;
    let _light = timing().await;
    let db = TestDb::create(cluster, "rb_prepared").await;
    let initial = db.map();
    let moving = keys_where(1, 40, |k| (KILL_LO..=KILL_HI).contains(&slot(k)));
    let mut rows = Rows::default();
    for &u in &moving[..39] {
        rows.users.push((u, format!("p{u}")));
        rows.posts.push((u, 1, format!("p{u}-1")));
    }
    db.load(&initial, &rows).await;
    // Another client's transaction, prepared on the source, writing a moving slot.
    let late = moving[39];
    let gid = "not-shardgate-1";
    let src = db.primary(0).await;
    src.batch_execute(&format!(
        "BEGIN; INSERT INTO users (id, name) VALUES ({late}, 'late'); PREPARE TRANSACTION '{gid}'"
    ))
    .await
    .unwrap_or_else(|e| panic!("{TEST}: prepare: {}", describe(&e)));

    let proxy = Proxy::start_config_env(&db.config(&[], false), &[]).await;
    let console = Console::open(&proxy).await;
    let args = format!("{KILL_LO}-{KILL_HI} TO 2");
    let job = console
        .move_slots(&args)
        .await
        .unwrap_or_else(|e| panic!("{TEST}: {e}"));
    let failed = console
        .try_wait_done(job, Duration::from_secs(60), TEST)
        .await;
    let err = match failed {
        Ok((done, _)) => panic!(
            "{TEST}: the move completed over a foreign prepared transaction: {}",
            done.short()
        ),
        Err(e) => e,
    };
    assert!(
        err.contains("prepared transaction"),
        "{TEST}: the failure should name the prepared transaction: {err}"
    );
    assert_eq!(
        db.map().version(),
        initial.version(),
        "{TEST}: the refused move changed the map"
    );
    check_rows(&format!("{TEST}: after the refusal"), &db, &initial, &rows).await;

    // Resolved: the row lands on the source, and the retried move takes it along.
    src.batch_execute(&format!("COMMIT PREPARED '{gid}'"))
        .await
        .unwrap_or_else(|e| panic!("{TEST}: commit prepared: {}", describe(&e)));
    rows.users.push((late, "late".to_string()));
    let job = console
        .move_slots(&args)
        .await
        .unwrap_or_else(|e| panic!("{TEST}: retry: {e}"));
    let (done, _) = console
        .wait_done(job, Duration::from_secs(60), &format!("{TEST} (retry)"))
        .await;
    let map = db.map();
    for s in KILL_LO..=KILL_HI {
        assert_eq!(map.shard_of_slot(s), 2, "{TEST}: slot {s} after the retry");
    }
    check_rows(&format!("{TEST}: after the retry"), &db, &map, &rows).await;
    eprintln!("{TEST}: refused with \"{err}\"; retried: {}", done.short());
    drop(console);
    drop(proxy);
    db.drop_db().await;
}

/// A transaction in flight on a moving slot finishes on the old owner; if it stays open
/// past `move_drain_timeout` the cut-over gives up, nothing moves, and the client's
/// transaction still commits there. The retried move then takes its row along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_transaction_fails_the_drain_and_loses_nothing() {
    const TEST: &str = "open_transaction_fails_the_drain_and_loses_nothing";
    if skip_in_direct_mode(TEST) {
        return;
    }
    let cluster = own_cluster().await;
    let _light = timing().await;
    let db = TestDb::create(cluster, "rb_drain").await;
    let initial = db.map();
    let moving = keys_where(1, 30, |k| (KILL_LO..=KILL_HI).contains(&slot(k)));
    let mut rows = Rows::default();
    for &u in &moving {
        rows.users.push((u, format!("d{u}")));
    }
    db.load(&initial, &rows).await;

    let config = db.config(&["move_drain_timeout = \"1s\""], false);
    let proxy = Proxy::start_config_env(&config, &[]).await;
    let console = Console::open(&proxy).await;
    // A first move (of an empty slot) builds the slot indexes: their concurrent build
    // would wait for the open transaction below, and this test is about the cut-over.
    let warm = console
        .move_slots("300 TO 1")
        .await
        .unwrap_or_else(|e| panic!("{TEST}: {e}"));
    console
        .wait_done(warm, Duration::from_secs(60), &format!("{TEST} (indexes)"))
        .await;
    let initial = db.map();
    let client = connect(&proxy.url_for("app", Some("app"), &db.name))
        .await
        .unwrap_or_else(|e| panic!("{TEST}: connect: {}", describe(&e)));
    let held = moving[0];
    client
        .batch_execute(&format!(
            "BEGIN; UPDATE users SET name = 'held' WHERE id = {held}"
        ))
        .await
        .unwrap_or_else(|e| panic!("{TEST}: begin: {}", describe(&e)));

    let args = format!("{KILL_LO}-{KILL_HI} TO 1");
    let job = console
        .move_slots(&args)
        .await
        .unwrap_or_else(|e| panic!("{TEST}: {e}"));
    let err = match console
        .try_wait_done(job, Duration::from_secs(60), TEST)
        .await
    {
        Ok((done, _)) => panic!(
            "{TEST}: the move completed under an open transaction: {}",
            done.short()
        ),
        Err(e) => e,
    };
    assert!(
        err.contains("still open after move_drain_timeout"),
        "{TEST}: the failure should say the drain timed out: {err}"
    );
    assert_eq!(db.map().version(), initial.version(), "{TEST}: map changed");
    // The transaction in flight was never disturbed: it commits on the old owner.
    client
        .batch_execute("COMMIT")
        .await
        .unwrap_or_else(|e| panic!("{TEST}: commit: {}", describe(&e)));
    if let Some(r) = rows.users.iter_mut().find(|(u, _)| *u == held) {
        r.1 = "held".to_string();
    }
    check_rows(&format!("{TEST}: after the refusal"), &db, &initial, &rows).await;

    let job = console
        .move_slots(&args)
        .await
        .unwrap_or_else(|e| panic!("{TEST}: retry: {e}"));
    let (done, _) = console
        .wait_done(job, Duration::from_secs(60), &format!("{TEST} (retry)"))
        .await;
    let map = db.map();
    for s in KILL_LO..=KILL_HI {
        assert_eq!(map.shard_of_slot(s), 1, "{TEST}: slot {s} after the retry");
    }
    check_rows(&format!("{TEST}: after the retry"), &db, &map, &rows).await;
    // And through the proxy, on the new owner.
    let got: String = client
        .query_one(&format!("SELECT name FROM users WHERE id = {held}"), &[])
        .await
        .unwrap_or_else(|e| panic!("{TEST}: read: {}", describe(&e)))
        .get(0);
    assert_eq!(
        got, "held",
        "{TEST}: the held transaction's write after the move"
    );
    eprintln!("{TEST}: refused with \"{err}\"; retried: {}", done.short());
    drop(console);
    drop(client);
    drop(proxy);
    db.drop_db().await;
}

/// Bad `MOVE SLOTS` commands get a clear error with a proper SQLSTATE and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_slots_refusals_name_the_problem() {
    const TEST: &str = "move_slots_refusals_name_the_problem";
    if skip_in_direct_mode(TEST) {
        return;
    }
    let cluster = own_cluster().await;
    let _light = timing().await;
    let db = TestDb::create(cluster, "rb_refuse").await;
    let initial = db.map();
    let moving = keys_where(1, 20, |k| (KILL_LO..=KILL_HI).contains(&slot(k)));
    let mut rows = Rows::default();
    for &u in &moving {
        rows.users.push((u, format!("r{u}")));
    }
    db.load(&initial, &rows).await;

    let config = db.config(&["move_drain_timeout = \"3s\""], false);
    let proxy = Proxy::start_config_env(&config, &[]).await;
    let console = Console::open(&proxy).await;
    let refused = |args: &'static str, code: &'static str, words: &'static str| {
        let console = &console;
        async move {
            match console.move_slots(args).await {
                Ok(id) => panic!("{TEST}: MOVE SLOTS {args} started job {id}"),
                Err(e) => assert!(
                    e.contains(code) && e.contains(words),
                    "{TEST}: MOVE SLOTS {args}: want {code} mentioning {words:?}, got {e}"
                ),
            }
        }
    };
    refused("0-5000 TO 1", "22023", "do not exist").await;
    refused("0-10 TO 7", "22023", "shard 7 does not exist").await;
    refused("ten TO 1", "22023", "MOVE SLOTS wants").await;
    refused("0-10 TO 1 IN nosuchdb", "3D000", "nosuchdb").await;

    // One job at a time: a second MOVE while the first waits for an open transaction.
    let client = connect(&proxy.url_for("app", Some("app"), &db.name))
        .await
        .unwrap_or_else(|e| panic!("{TEST}: connect: {}", describe(&e)));
    client
        .batch_execute(&format!(
            "BEGIN; UPDATE users SET name = 'busy' WHERE id = {}",
            moving[0]
        ))
        .await
        .unwrap_or_else(|e| panic!("{TEST}: begin: {}", describe(&e)));
    let first = console
        .move_slots(&format!("{KILL_LO}-{KILL_HI} TO 1"))
        .await
        .unwrap_or_else(|e| panic!("{TEST}: first move: {e}"));
    refused("0-10 TO 2", "55006", "already running").await;
    assert!(
        console
            .try_wait_done(first, Duration::from_secs(60), TEST)
            .await
            .is_err(),
        "{TEST}: the first move completed under an open transaction"
    );
    client
        .batch_execute("ROLLBACK")
        .await
        .unwrap_or_else(|e| panic!("{TEST}: rollback: {}", describe(&e)));
    drop(console);
    drop(proxy);

    // Without a shard map file there is nothing a move could rewrite.
    let no_map = config.replace(&format!("shard_map = \"{}\"\n", db.map_path.display()), "");
    assert_ne!(no_map, config, "{TEST}: the config names the map file");
    let proxy = Proxy::start_config_env(&no_map, &[]).await;
    let console = Console::open(&proxy).await;
    match console.move_slots("0-10 TO 1").await {
        Ok(id) => panic!("{TEST}: a move started without a map file: job {id}"),
        Err(e) => assert!(
            e.contains("0A000") && e.contains("shard_map"),
            "{TEST}: want 0A000 naming shard_map, got {e}"
        ),
    }
    assert_eq!(db.map().version(), initial.version(), "{TEST}: map changed");
    check_rows(&format!("{TEST}: after the refusals"), &db, &initial, &rows).await;
    drop(console);
    drop(proxy);
    db.drop_db().await;
}
