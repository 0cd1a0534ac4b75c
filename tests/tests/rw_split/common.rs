//! Helpers for the read/write split tests: clusters of their own (for tests that stop,
//! pause or promote servers), "which server answered", timeouts, metrics, write loads.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardgate_e2e::{connect, http_get, simple_rows, Cluster, Proxy};
use tokio::process::Command;
use tokio_postgres::Client;

/// Asks the server that runs the statement who it is.
pub const WHO: &str = "SELECT inet_server_port(), pg_is_in_recovery()";

/// Every statement a test sends gets at most this long: an error, never a hang.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The server that answered a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Answer {
    pub port: u16,
    pub in_recovery: bool,
}

/// Runs `fut` with a deadline; a timeout or an error becomes a message.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", describe(&e))),
        Err(_) => Err(format!("{what}: TIMEOUT after {limit:?} (hang)")),
    }
}

/// An error with its SQLSTATE and message (tokio-postgres only says "db error").
pub use shardgate_e2e::describe_error as describe;

/// `WHO` (or `sql`, which must start with the same two columns) over the simple protocol.
pub async fn who_simple_sql(c: &Client, sql: &str) -> Result<Answer, String> {
    let rows = within(STATEMENT_TIMEOUT, sql, simple_rows(c, sql)).await?;
    let row = rows
        .first()
        .ok_or_else(|| format!("{sql}: no row returned"))?;
    let port = row[0]
        .as_deref()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("{sql}: bad port {row:?}"))?;
    Ok(Answer {
        port,
        in_recovery: row[1].as_deref() == Some("t"),
    })
}

/// `WHO` (or `sql`, same shape) over the extended protocol.
pub async fn who_extended_sql(c: &Client, sql: &str) -> Result<Answer, String> {
    let row = within(STATEMENT_TIMEOUT, sql, c.query_one(sql, &[])).await?;
    Ok(Answer {
        port: row.get::<_, i32>(0) as u16,
        in_recovery: row.get(1),
    })
}

pub async fn who(c: &Client, extended: bool) -> Result<Answer, String> {
    if extended {
        who_extended_sql(c, WHO).await
    } else {
        who_simple_sql(c, WHO).await
    }
}

/// Connects through `url` with a deadline.
pub async fn connect_within(url: &str) -> Result<Client, String> {
    within(Duration::from_secs(10), "connect", connect(url)).await
}

/// Polls `f` every 20 ms until it yields `Some` or the deadline passes.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts answers by server.
pub fn tally(answers: &[Answer]) -> BTreeMap<(u16, bool), usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry((a.port, a.in_recovery)).or_insert(0) += 1;
    }
    m
}

// ---- metrics ---------------------------------------------------------------------------

/// The value of the first sample of `name` whose labels contain every `labels` pair.
pub async fn metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let port = proxy.metrics_port()?;
    let (status, body) = http_get(port, "/metrics").await.ok()?;
    if status != 200 {
        return None;
    }
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse().ok())
            .flatten()
        })
        .next()
}

pub fn host(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

// ---- a cluster of the test's own ----------------------------------------------------

/// One shard (a primary and two streaming replicas) started with `deploy/local/cluster.sh`
/// in a directory of its own; `cluster.sh down --purge` on drop.
pub struct OwnCluster {
    pub cluster: Cluster,
    home: PathBuf,
    script: PathBuf,
    /// The parent directory, when it is a temporary one of ours.
    temp_root: Option<PathBuf>,
}

pub const PRIMARY: &str = "shard0-primary";
pub const REPLICA1: &str = "shard0-replica1";
pub const REPLICA2: &str = "shard0-replica2";

fn cluster_script() -> PathBuf {
    match std::env::var("SHARDGATE_CLUSTER_SH") {
        Ok(s) => PathBuf::from(s),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/cluster.sh"),
    }
}

/// First port of the clusters these tests start (below the ephemeral range used for
/// proxies; away from the shared cluster at 25432+). `SHARDGATE_RW_SPLIT_PG_PORT` moves it.
pub fn port_base() -> u16 {
    std::env::var("SHARDGATE_RW_SPLIT_PG_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(23000)
}

impl OwnCluster {
    /// Starts a fresh cluster on ports `port_base() + slot * 10` .. `+ 2`.
    pub async fn start(tag: &str, slot: u16) -> OwnCluster {
        let pg_port = port_base() + slot * 10;
        let (parent, temp_root) = match std::env::var("SHARDGATE_TEST_SCRATCH") {
            Ok(s) => (PathBuf::from(s), None),
            Err(_) => {
                let t = std::env::temp_dir().join(shardgate_e2e::unique_name("sg_rwsplit"));
                (t.clone(), Some(t))
            }
        };
        std::fs::create_dir_all(&parent).expect("create cluster parent dir");
        // The OS user postgres (when we are root) must reach the data directories.
        set_mode_755(&parent);
        let home = parent.join(shardgate_e2e::unique_name(tag));
        let own = OwnCluster {
            cluster: Cluster::new(pg_port, 1, 2, home.clone()),
            home,
            script: cluster_script(),
            temp_root,
        };
        let started = Instant::now();
        let out = own.sh(&["up"], Duration::from_secs(120)).await;
        if let Err(e) = out {
            panic!("cluster.sh up ({tag}, port {pg_port}) failed: {e}");
        }
        eprintln!(
            "{tag}: own cluster on ports {pg_port}-{} up in {:?}",
            pg_port + 2,
            started.elapsed()
        );
        own
    }

    pub fn port_of(&self, name: &str) -> u16 {
        match name {
            PRIMARY => self.cluster.primary_port(0),
            REPLICA1 => self.cluster.replica_port(0, 1),
            REPLICA2 => self.cluster.replica_port(0, 2),
            other => panic!("unknown server {other}"),
        }
    }

    /// Runs `cluster.sh ARGS` for this cluster; stdout on success.
    pub async fn sh(&self, args: &[&str], limit: Duration) -> Result<String, String> {
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script)
            .args(args)
            .env("SHARDGATE_HOME", &self.home)
            .env("SHARDGATE_PG_PORT", self.cluster.pg_port.to_string())
            .env("SHARDGATE_SHARDS", "1")
            .env("SHARDGATE_REPLICAS", "2")
            .kill_on_drop(true);
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .map_err(|_| format!("cluster.sh {args:?} timed out after {limit:?}"))?
            .map_err(|e| format!("cannot run cluster.sh: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "cluster.sh {args:?} failed ({}): {stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    async fn sh_ok(&self, args: &[&str]) {
        if let Err(e) = self.sh(args, Duration::from_secs(90)).await {
            panic!("{e}");
        }
    }

    pub async fn stop(&self, name: &str, mode: &str) {
        self.sh_ok(&["stop", name, mode]).await
    }
    pub async fn start_server(&self, name: &str) {
        self.sh_ok(&["start", name]).await
    }
    pub async fn promote(&self, name: &str) {
        self.sh_ok(&["promote", name]).await
    }

    /// One SQL statement as superuser over the unix socket (`cluster.sh psql`), database
    /// `app`; unaligned tuples-only output, trimmed.
    pub async fn try_su(&self, name: &str, sql: &str) -> Result<String, String> {
        self.sh(
            &["psql", name, "-d", "app", "-At", "-c", sql],
            Duration::from_secs(30),
        )
        .await
        .map(|s| s.trim().to_string())
    }

    pub async fn su(&self, name: &str, sql: &str) -> String {
        match self.try_su(name, sql).await {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    /// Connection string for app/app straight to a server.
    pub fn direct_url(&self, name: &str) -> String {
        self.cluster.direct_url(self.port_of(name), "app")
    }

    /// Waits until replica `name` has replayed everything the primary `primary` has written
    /// so far.
    pub async fn wait_caught_up(&self, name: &str, primary: &str, timeout: Duration) {
        let target = self.su(primary, "SELECT pg_current_wal_lsn()").await;
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn");
        let ok = poll_until(timeout, || async {
            (self.try_su(name, &sql).await.ok().as_deref() == Some("t")).then_some(())
        })
        .await;
        assert!(
            ok.is_some(),
            "{name} did not replay up to {target} within {timeout:?}"
        );
    }

    /// A shardgate in front of this cluster's shard (primary first, then the replicas),
    /// with metrics and these extra `[general]` lines.
    pub async fn proxy(&self, general: &[&str]) -> Proxy {
        let mut b = Proxy::builder().replicas().metrics();
        for g in general {
            b = b.general(g);
        }
        Proxy::start_config(&b.to_toml(&self.cluster)).await
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let status = std::process::Command::new("bash")
            .arg(&self.script)
            .args(["down", "--purge"])
            .env("SHARDGATE_HOME", &self.home)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "warning: cluster.sh down --purge for {} failed: {status:?}",
                self.home.display()
            );
        }
        if let Some(t) = &self.temp_root {
            let _ = std::fs::remove_dir_all(t);
        }
    }
}

fn set_mode_755(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
}

// ---- a write load with a ledger -----------------------------------------------------------

/// `ledger` rows remember which server wrote them.
pub const LEDGER_DDL: &str = "CREATE TABLE ledger (id bigint PRIMARY KEY, writer int NOT NULL, \
     port int NOT NULL DEFAULT inet_server_port(), at timestamptz NOT NULL DEFAULT clock_timestamp())";

/// One acknowledged write: its id, when the acknowledgement arrived, and the port of the
/// server that wrote it (`RETURNING port`).
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub id: i64,
    pub at: Instant,
    pub port: u16,
}

/// Writers inserting unique ids into `ledger` through a proxy, remembering each id whose
/// commit was acknowledged and each failure.
pub struct WriteLoad {
    pub acked: Arc<Mutex<Vec<Ack>>>,
    pub failures: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

static NEXT_WRITER: AtomicU64 = AtomicU64::new(1);

/// One autocommit insert; the port of the server that wrote it.
async fn insert_ledger(
    c: &Client,
    id: i64,
    writer: i32,
    extended: bool,
    limit: Duration,
) -> Result<u16, String> {
    if extended {
        let row = within(
            limit,
            "insert",
            c.query_one(
                "INSERT INTO ledger (id, writer) VALUES ($1, $2) RETURNING port",
                &[&id, &writer],
            ),
        )
        .await?;
        Ok(row.get::<_, i32>(0) as u16)
    } else {
        let sql = format!("INSERT INTO ledger (id, writer) VALUES ({id}, {writer}) RETURNING port");
        let rows = within(limit, "insert", simple_rows(c, &sql)).await?;
        rows.first()
            .and_then(|r| r[0].as_deref())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("insert: no port returned: {rows:?}"))
    }
}

impl WriteLoad {
    /// `writers` clients (half simple, half extended protocol); each statement waits at most
    /// `statement_timeout` (long enough to sit out a failover in shardgate's queue).
    pub fn start(url: String, writers: usize, statement_timeout: Duration) -> WriteLoad {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..writers)
            .map(|i| {
                let writer = NEXT_WRITER.fetch_add(1, Ordering::Relaxed) as i32;
                let (url, acked, failures, stop) =
                    (url.clone(), acked.clone(), failures.clone(), stop.clone());
                tokio::spawn(async move {
                    let extended = i % 2 == 1;
                    let mut client: Option<Client> = None;
                    let mut seq = 0i64;
                    while !stop.load(Ordering::Relaxed) {
                        let c = match &client {
                            Some(c) if !c.is_closed() => c,
                            _ => match connect_within(&url).await {
                                Ok(c) => client.insert(c),
                                Err(e) => {
                                    failures.lock().unwrap().push((Instant::now(), e));
                                    // Not synchronisation: only paces reconnect attempts.
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    continue;
                                }
                            },
                        };
                        seq += 1;
                        let id = writer as i64 * 1_000_000_000 + seq;
                        match insert_ledger(c, id, writer, extended, statement_timeout).await {
                            Ok(port) => acked.lock().unwrap().push(Ack {
                                id,
                                at: Instant::now(),
                                port,
                            }),
                            Err(e) => {
                                failures.lock().unwrap().push((Instant::now(), e));
                                // Whatever state it is in, start over on a new connection.
                                client = None;
                            }
                        }
                    }
                })
            })
            .collect();
        WriteLoad {
            acked,
            failures,
            stop,
            tasks,
        }
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// The first acknowledgement by the server on `port`, if any yet.
    pub fn first_ack_on(&self, port: u16) -> Option<Instant> {
        self.acked
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.port == port)
            .map(|a| a.at)
            .min()
    }

    /// Waits until `n` more writes than now have been acknowledged.
    pub async fn wait_more_acks(&self, n: usize, timeout: Duration) -> bool {
        let target = self.acked_count() + n;
        poll_until(timeout, || async {
            (self.acked_count() >= target).then_some(())
        })
        .await
        .is_some()
    }

    /// Stops the writers and returns (acknowledged writes, failures).
    pub async fn finish(mut self) -> (Vec<Ack>, Vec<(Instant, String)>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (acked, failures)
    }
}

impl Drop for WriteLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The ledger ids present on a server (direct connection as app).
pub async fn ledger_ids(url: &str) -> std::collections::HashSet<i64> {
    let c = connect_within(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let rows = within(
        Duration::from_secs(30),
        "select ledger",
        c.query("SELECT id FROM ledger", &[]),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    rows.iter().map(|r| r.get::<_, i64>(0)).collect()
}
