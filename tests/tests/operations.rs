//! Operations (issue 5): hot reload under load, graceful shutdown under a write load,
//! and the admin console (SHOW ..., PAUSE/RESUME, RELOAD errors, SHUTDOWN).
//!
//! Run with `./tests/run.sh --test operations`. Every test starts its own shardgate; the
//! reload and console tests add an admin user (`admin = true`) and talk to the console
//! (database `shardgate`) with the raw frontend of the harness, so that command tags and
//! SQLSTATEs are visible. The metrics overhead is a benchmark, not a test:
//! `tests/bench/metrics_overhead.sh`.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postgres_protocol::message::frontend;
use shardgate_e2e::{
    connect, exclusive, pgbench, simple_rows, simple_value, skip_in_direct_mode, timing,
    unique_name, wait_for, Cluster, Msg, Proxy, ProxyBuilder, RawConn,
};
use tokio_postgres::{Client, NoTls};

// ---- admin console helpers ------------------------------------------------------------

const ADMIN: &str = "sgadmin";
/// Distinctive, so that a leak (SHOW CONFIG, logs) is easy to spot.
const ADMIN_PASSWORD: &str = "adm-Secret-7q";
const CONSOLE: &str = "shardgate";

/// A proxy config with the harness defaults plus an admin user (who logs in to the
/// servers as app, should it ever need to).
fn with_admin(builder: ProxyBuilder) -> ProxyBuilder {
    builder.raw_toml(&format!(
        "[[users]]\nname = \"{ADMIN}\"\npassword = \"{ADMIN_PASSWORD}\"\n\
         auth = \"scram-sha-256\"\nadmin = true\nserver_user = \"app\"\nserver_password = \"app\""
    ))
}

/// The answer to one console command.
#[derive(Debug)]
struct Reply {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
    tag: Option<String>,
    error: Option<Msg>,
    sql: String,
}

impl Reply {
    fn from_msgs(sql: &str, msgs: &[Msg]) -> Reply {
        let columns = msgs
            .iter()
            .find(|m| m.tag == b'T')
            .map(row_description)
            .unwrap_or_default();
        let tag = msgs.iter().find(|m| m.tag == b'C').map(|m| cstr(&m.body));
        Reply {
            columns,
            rows: Msg::rows(msgs),
            tag,
            error: Msg::first_error(msgs).cloned(),
            sql: sql.to_string(),
        }
    }

    /// Panics unless the command succeeded.
    fn ok(self) -> Reply {
        if let Some(e) = &self.error {
            panic!(
                "{}: error {:?} {:?} (fields {:?})",
                self.sql,
                e.error_code(),
                e.error_message(),
                e.fields()
            );
        }
        self
    }

    /// Panics unless every documented column is there, in the documented order (more
    /// columns in between or after are fine).
    fn expect_columns(&self, documented: &[&str]) {
        let mut it = self.columns.iter();
        for want in documented {
            assert!(
                it.any(|c| c == want),
                "{}: columns {:?} lack {want:?} (documented, in order: {documented:?})",
                self.sql,
                self.columns
            );
        }
    }

    fn col(&self, name: &str) -> usize {
        self.columns
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("{}: no column {name:?} in {:?}", self.sql, self.columns))
    }

    /// Value of column `name` in `row` ("" for NULL).
    fn get<'a>(&self, row: &'a [Option<String>], name: &str) -> &'a str {
        row.get(self.col(name))
            .and_then(|v| v.as_deref())
            .unwrap_or("")
    }

    /// Rows whose columns equal the given values.
    fn rows_where(&self, conds: &[(&str, &str)]) -> Vec<&Vec<Option<String>>> {
        self.rows
            .iter()
            .filter(|r| conds.iter().all(|(c, v)| self.get(r, c) == *v))
            .collect()
    }

    fn num(&self, row: &[Option<String>], name: &str) -> i64 {
        let v = self.get(row, name);
        v.trim().parse().unwrap_or_else(|_| {
            panic!(
                "{}: column {name} = {v:?} is not an integer (row {row:?})",
                self.sql
            )
        })
    }

    /// The error's message plus detail and hint, for "does it name the file" checks.
    fn error_text(&self) -> String {
        self.error
            .as_ref()
            .map(|e| {
                e.fields()
                    .into_iter()
                    .filter(|(t, _)| matches!(t, b'M' | b'D' | b'H'))
                    .map(|(_, v)| v)
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .unwrap_or_default()
    }
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Column names of a RowDescription.
fn row_description(m: &Msg) -> Vec<String> {
    let b = &m.body[..];
    let n = i16::from_be_bytes([b[0], b[1]]).max(0) as usize;
    let mut pos = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let end = pos
            + b[pos..]
                .iter()
                .position(|&c| c == 0)
                .expect("column name ends with NUL");
        out.push(String::from_utf8_lossy(&b[pos..end]).into_owned());
        // table oid (4), column (2), type oid (4), size (2), modifier (4), format (2)
        pos = end + 1 + 18;
    }
    out
}

/// Logs in to the console as the admin; panics (with the proxy log) if refused.
async fn admin_login(proxy: &Proxy) -> RawConn {
    let mut c = RawConn::connect(proxy.port())
        .await
        .unwrap_or_else(|e| panic!("connect to shardgate: {e}"));
    if let Err(e) = c.startup(ADMIN, CONSOLE, Some(ADMIN_PASSWORD)).await {
        panic!(
            "admin login to database {CONSOLE} refused: {e:?} (code {:?})",
            e.code()
        );
    }
    c
}

/// Runs one console command (simple query protocol).
async fn admin(conn: &mut RawConn, sql: &str) -> Reply {
    let msgs = conn
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("admin console, {sql:?}: {e}"));
    Reply::from_msgs(sql, &msgs)
}

/// Sends a console command without waiting for the answer (read it with
/// [`RawConn::read_until_ready`]).
async fn admin_send(conn: &mut RawConn, sql: &str) {
    frontend::query(sql, conn.buf()).expect("encode Query");
    conn.flush()
        .await
        .unwrap_or_else(|e| panic!("admin console, send {sql:?}: {e}"));
}

/// The `pool_size` of every SHOW POOLS row of (database, user); panics if there is none.
async fn pool_sizes(conn: &mut RawConn, db: &str, user: &str) -> Vec<i64> {
    let r = admin(conn, "SHOW POOLS").await.ok();
    let rows = r.rows_where(&[("database", db), ("user", user)]);
    assert!(
        !rows.is_empty(),
        "SHOW POOLS has no row for database {db}, user {user}: {:?} {:?}",
        r.columns,
        r.rows
    );
    rows.iter().map(|row| r.num(row, "pool_size")).collect()
}

fn truthy(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "1" | "t" | "true" | "yes")
}

fn falsy(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "0" | "f" | "false" | "no")
}

// ---- config file helpers ---------------------------------------------------------------

/// Replaces the `pool_size = ...` line of `[general]` (the first one) by `line`.
fn with_pool_size_line(config: &str, line: &str) -> String {
    let mut done = false;
    let out: Vec<String> = config
        .lines()
        .map(|l| {
            if !done && l.trim_start().starts_with("pool_size") {
                done = true;
                line.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(done, "no pool_size line in the config:\n{config}");
    out.join("\n") + "\n"
}

/// Writes the config file in one step (temp file + rename), as an editor or a config
/// management tool would.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// 1-based number of the first line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in\n{text}"))
}

/// True if `msg` names `path` and line `line` (`path:line` or `line N`).
fn names_file_and_line(msg: &str, path: &str, line: usize) -> bool {
    let with_colon = format!("{path}:{line}");
    let at = |s: &str| {
        msg.match_indices(s).any(|(i, _)| {
            !msg[i + s.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
    };
    msg.contains(path) && (at(&with_colon) || at(&format!("line {line}")))
}

/// Occurrences of `needle` in the proxy's log so far.
fn log_count(proxy: &Proxy, needle: &str) -> usize {
    proxy.log().matches(needle).count()
}

// ---- pgbench helpers ---------------------------------------------------------------------

/// The number after `label` on the line that starts with it (the part before `/`).
fn number_after(output: &str, label: &str) -> Option<u64> {
    output.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(label)?;
        let word = rest.split_whitespace().next()?;
        word.split('/').next()?.parse().ok()
    })
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

// ---- 1. hot reload under pgbench ----------------------------------------------------------

const BENCH_DB: &str = "bench_ops";

/// Waits (10 s at most) until pgbench's tpcb-like script adds rows to pgbench_history;
/// panics with pgbench's output if it ended meanwhile.
async fn bench_progress(
    direct: &Client,
    bench: &mut tokio::task::JoinHandle<shardgate_e2e::CmdOutput>,
    when: &str,
) {
    let before = history_count(direct).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = history_count(direct).await;
        if now > before {
            return;
        }
        if bench.is_finished() {
            let out = bench.await.expect("pgbench task");
            panic!(
                "pgbench ended {when} (exit {:?})\nstdout:\n{}\nstderr:\n{}",
                out.code, out.stdout, out.stderr
            );
        }
        assert!(
            Instant::now() < deadline,
            "pgbench made no progress within 10 s {when} ({now} history rows)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows pgbench's tpcb-like script has added so far (read on the primary).
async fn history_count(direct: &Client) -> u64 {
    simple_value(direct, "SELECT count(*) FROM pgbench_history")
        .await
        .expect("count pgbench_history")
        .parse()
        .expect("a count")
}

/// pgbench (8 clients, 10 s) through three reloads: pool_size 10 -> 4 by SIGHUP, a
/// broken file by SIGHUP (and by RELOAD: F0000 naming file and line), a valid file with
/// pool_size 6 by RELOAD. No failed transaction; SHOW POOLS follows every valid change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_three_reloads() {
    if skip_in_direct_mode("pgbench_through_three_reloads") {
        return;
    }
    let _load = exclusive().await;
    let cluster = Cluster::shared();
    let primary = cluster.primary_port(0);

    cluster.recreate_database(BENCH_DB, "app").await;
    let init = strings(&[
        "-i",
        "-s",
        "1",
        "-q",
        "-h",
        "127.0.0.1",
        "-p",
        &primary.to_string(),
        "-U",
        "app",
        BENCH_DB,
    ]);
    pgbench(&init, "app").await.assert_success("pgbench -i");

    let proxy = with_admin(Proxy::builder().pool_size(10).database(BENCH_DB))
        .start()
        .await;
    let path = proxy.config_path().expect("config path");
    let path_str = path.display().to_string();
    let original = proxy.config().to_string();
    let mut console = admin_login(&proxy).await;

    // The primary, directly: is pgbench making progress, how many server connections
    // does the proxy hold there.
    let direct = connect(&cluster.primary_url(0, BENCH_DB))
        .await
        .expect("connect to the primary");
    let direct = &direct;

    let run = strings(&[
        "-n",
        "-h",
        "127.0.0.1",
        "-p",
        &proxy.port().to_string(),
        "-U",
        "app",
        "-M",
        "extended",
        "-c",
        "8",
        "-j",
        "2",
        "-T",
        "10",
        BENCH_DB,
    ]);
    let mut bench = tokio::spawn(async move { pgbench(&run, "app").await });

    // Under way: transactions land in pgbench_history.
    bench_progress(direct, &mut bench, "at the start").await;
    assert_eq!(
        pool_sizes(&mut console, BENCH_DB, "app").await,
        vec![10],
        "SHOW POOLS before any reload"
    );

    // (a) pool_size 10 -> 4, SIGHUP.
    let four = with_pool_size_line(&original, "pool_size = 4");
    write_config(&path, &four);
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            proxy.is_alive(),
            "shardgate exited after SIGHUP (reload (a))"
        );
        let sizes = pool_sizes(&mut console, BENCH_DB, "app").await;
        if sizes.iter().all(|&s| s == 4) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SHOW POOLS still shows pool_size {sizes:?} 10 s after pool_size = 4 + SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The new size applies to the servers too: surplus connections are closed (checked
    // for 3 s; a failure is reported at the end, after the other reloads).
    let count_sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{BENCH_DB}' \
         AND usename = 'app' AND backend_type = 'client backend' \
         AND pid <> pg_backend_pid() \
         AND application_name IS DISTINCT FROM 'shardgate health check'"
    );
    let mut late = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let n: u64 = simple_value(direct, &count_sql)
            .await
            .expect("count servers")
            .parse()
            .expect("a count");
        if n <= 4 {
            eprintln!("(a) pool_size 4 applied; {n} server connections to {BENCH_DB}");
            break;
        }
        if Instant::now() >= deadline {
            late.push(format!(
                "shardgate still held {n} server connections to {BENCH_DB} 3 s after \
                 pool_size 10 -> 4 (SIGHUP), under load"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bench_progress(direct, &mut bench, "after reload (a)").await;

    // (b) a broken file, SIGHUP: logged, nothing changes; RELOAD answers F0000.
    let broken = with_pool_size_line(&original, "pool_size = \"x\"");
    let broken_line = line_of(&broken, "pool_size = \"x\"");
    let mentions = log_count(&proxy, &path_str);
    write_config(&path, &broken);
    proxy.signal("HUP");
    wait_for(
        "the broken config file named in shardgate's log after SIGHUP",
        Duration::from_secs(10),
        || {
            assert!(
                proxy.is_alive(),
                "shardgate exited after SIGHUP with a broken file"
            );
            let n = log_count(&proxy, &path_str);
            async move { (n > mentions).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        pool_sizes(&mut console, BENCH_DB, "app").await,
        vec![4],
        "a broken file (SIGHUP) must change nothing"
    );
    let r = admin(&mut console, "RELOAD").await;
    let code = r.error.as_ref().and_then(Msg::error_code);
    assert_eq!(
        code.as_deref(),
        Some("F0000"),
        "RELOAD of a broken file: want SQLSTATE F0000, got {r:?}"
    );
    let text = r.error_text();
    assert!(
        names_file_and_line(&text, &path_str, broken_line),
        "RELOAD error should name {path_str} and line {broken_line}: {text:?}"
    );
    assert_eq!(
        pool_sizes(&mut console, BENCH_DB, "app").await,
        vec![4],
        "a broken file (RELOAD) must change nothing"
    );
    bench_progress(direct, &mut bench, "after reload (b)").await;

    // (c) a valid file again, pool_size 6, admin RELOAD.
    write_config(&path, &with_pool_size_line(&original, "pool_size = 6"));
    let r = admin(&mut console, "RELOAD").await.ok();
    assert_eq!(r.tag.as_deref(), Some("RELOAD"), "RELOAD: {r:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sizes = pool_sizes(&mut console, BENCH_DB, "app").await;
        if sizes.iter().all(|&s| s == 6) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SHOW POOLS shows pool_size {sizes:?} 10 s after pool_size = 6 + RELOAD"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reloads_during_run = !bench.is_finished();

    let out = bench.await.expect("pgbench task");
    let failed = number_after(&out.stdout, "number of failed transactions:");
    let processed = number_after(&out.stdout, "number of transactions actually processed:");
    eprintln!(
        "pgbench through 3 reloads: processed {processed:?}, failed {failed:?}\n{}",
        out.stdout
    );
    out.assert_success("pgbench through 3 reloads");
    assert_eq!(
        failed,
        Some(0),
        "failed transactions:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        processed.unwrap_or(0) > 0,
        "no transactions:\n{}",
        out.stdout
    );
    assert!(
        !out.stderr.contains("aborted") && !out.stderr.contains("error"),
        "pgbench reported errors:\n{}",
        out.stderr
    );
    assert!(
        reloads_during_run,
        "pgbench ended before the third reload: the reloads did not happen under load"
    );
    // The console session opened at the start must have survived it all.
    let mut problems = late;
    let sizes = match console.simple_query("SHOW POOLS").await {
        Ok(_) => pool_sizes(&mut console, BENCH_DB, "app").await,
        Err(e) => {
            problems.push(format!(
                "the admin console session opened before the reloads was closed: {e}"
            ));
            pool_sizes(&mut admin_login(&proxy).await, BENCH_DB, "app").await
        }
    };
    if sizes != vec![6] {
        problems.push(format!(
            "SHOW POOLS at the end: pool_size {sizes:?}, want [6]"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    drop(proxy);
    cluster.drop_database(BENCH_DB).await;
}

// ---- 2. SIGTERM under a write load --------------------------------------------------------

/// A tokio-postgres client whose connection task keeps the error it ended with: an
/// unsolicited FATAL (57P01 between transactions) ends the connection task, and the
/// client's next call only sees "connection closed".
async fn connect_watched(url: &str) -> (Client, Arc<Mutex<Option<tokio_postgres::Error>>>) {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    let slot = Arc::new(Mutex::new(None));
    let slot2 = slot.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            *slot2.lock().unwrap() = Some(e);
        }
    });
    (client, slot)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between transactions (sending BEGIN).
    Begin,
    Insert,
    Commit,
}

#[derive(Debug)]
struct WriterEnd {
    client: usize,
    acked: Vec<i64>,
    /// Transactions begun before the signal whose COMMIT was acknowledged after it.
    finished_across_signal: usize,
    phase: Phase,
    /// SQLSTATE seen (on the call, or on the connection that closed under it).
    code: Option<String>,
    error: String,
}

async fn writer(
    url: String,
    table: String,
    client_no: usize,
    signalled: Arc<AtomicBool>,
    commits: Arc<AtomicUsize>,
) -> WriterEnd {
    let (client, conn_error) = connect_watched(&url).await;
    let insert = format!("INSERT INTO {table} (id, client) VALUES ($1, $2)");
    let base = (client_no as i64) * 100_000_000;
    let mut acked = Vec::new();
    let mut finished_across_signal = 0;
    let mut seq: i64 = 0;
    let tag = client_no as i32;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "client {client_no}: shardgate did not end the session within 60 s"
        );
        seq += 1;
        let ids = [base + 2 * seq, base + 2 * seq + 1];
        let began_before_signal = !signalled.load(Ordering::SeqCst);
        let step = async {
            client
                .batch_execute("BEGIN")
                .await
                .map_err(|e| (Phase::Begin, e))?;
            client
                .execute(insert.as_str(), &[&ids[0], &tag])
                .await
                .map_err(|e| (Phase::Insert, e))?;
            // Keep the transaction open a little: SIGTERM must find some in flight.
            client
                .batch_execute("SELECT pg_sleep(0.02)")
                .await
                .map_err(|e| (Phase::Insert, e))?;
            client
                .execute(insert.as_str(), &[&ids[1], &tag])
                .await
                .map_err(|e| (Phase::Insert, e))?;
            client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| (Phase::Commit, e))?;
            Ok::<(), (Phase, tokio_postgres::Error)>(())
        };
        match step.await {
            Ok(()) => {
                acked.extend(ids);
                commits.fetch_add(1, Ordering::SeqCst);
                if began_before_signal && signalled.load(Ordering::SeqCst) {
                    finished_across_signal += 1;
                }
            }
            Err((phase, e)) => {
                let mut code = e.code().map(|c| c.code().to_string());
                if code.is_none() && e.is_closed() {
                    // The connection task may store its error just after the client
                    // saw the channel close.
                    let until = Instant::now() + Duration::from_secs(2);
                    while code.is_none() && Instant::now() < until {
                        code = conn_error
                            .lock()
                            .unwrap()
                            .as_ref()
                            .and_then(|ce| ce.code().map(|c| c.code().to_string()));
                        if code.is_none() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                let conn_err = conn_error.lock().unwrap().as_ref().map(|e| e.to_string());
                return WriterEnd {
                    client: client_no,
                    acked,
                    finished_across_signal,
                    phase,
                    code,
                    error: format!("{e} (connection ended with: {conn_err:?})"),
                };
            }
        }
    }
}

/// 8 writers in explicit transactions; SIGTERM after ~1 s. Every client ends with
/// 57P01 between transactions (never a reset inside one), every acknowledged COMMIT is
/// on the primary, and the process exits within shutdown_timeout (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_write_load_loses_no_commit() {
    if skip_in_direct_mode("sigterm_under_write_load_loses_no_commit") {
        return;
    }
    let _load = exclusive().await;
    const CLIENTS: usize = 8;
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
    let cluster = Cluster::shared();
    let table = unique_name("ops_term");
    let direct = connect(&cluster.primary_url(0, "app"))
        .await
        .expect("connect to the primary");
    direct
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, client int NOT NULL)"
        ))
        .await
        .expect("create table");

    let proxy = Proxy::builder()
        .pool_size(10)
        .general("shutdown_timeout = \"5s\"")
        .start()
        .await;
    let signalled = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(writer(
                proxy.url(),
                table.clone(),
                i + 1,
                signalled.clone(),
                commits.clone(),
            ))
        })
        .collect();

    // Load for about a second, with every client under way.
    let started = Instant::now();
    wait_for("commits from the writers", Duration::from_secs(30), || {
        let n = commits.load(Ordering::SeqCst);
        async move { (n >= CLIENTS * 3).then_some(()) }
    })
    .await;
    if let Some(rest) = Duration::from_secs(1).checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await; // load duration, not synchronisation
    }
    let before_signal = commits.load(Ordering::SeqCst);
    signalled.store(true, Ordering::SeqCst);
    let signal_at = Instant::now();
    proxy.signal("TERM");

    let (ends, exit) = tokio::join!(
        futures_util::future::join_all(writers),
        proxy.wait_exit(SHUTDOWN_TIMEOUT + Duration::from_secs(1))
    );
    let exited_after = signal_at.elapsed();
    let ends: Vec<WriterEnd> = ends
        .into_iter()
        .map(|r| r.expect("writer task panicked"))
        .collect();

    let mut problems = Vec::new();
    for e in &ends {
        if e.code.as_deref() != Some("57P01") {
            problems.push(format!(
                "client {}: ended in {:?} without 57P01 (code {:?}): {}",
                e.client, e.phase, e.code, e.error
            ));
        } else if e.phase != Phase::Begin {
            problems.push(format!(
                "client {}: 57P01 inside a transaction ({:?}): the transaction in flight \
                 was not allowed to finish: {}",
                e.client, e.phase, e.error
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "clients were not ended cleanly:\n{}",
        problems.join("\n")
    );
    let across: usize = ends.iter().map(|e| e.finished_across_signal).sum();
    assert!(
        across > 0,
        "no transaction begun before SIGTERM got its COMMIT acknowledged after it \
         ({before_signal} commits before the signal)"
    );

    // Every acknowledged id is on the primary.
    let rows = simple_rows(&direct, &format!("SELECT id FROM {table}"))
        .await
        .expect("read back");
    let stored: HashSet<i64> = rows
        .iter()
        .map(|r| r[0].as_deref().unwrap_or("").parse().expect("id"))
        .collect();
    let acked: Vec<i64> = ends.iter().flat_map(|e| e.acked.iter().copied()).collect();
    let missing: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !stored.contains(id))
        .collect();
    eprintln!(
        "SIGTERM: {} ids acknowledged, {} stored, {across} transactions finished across \
         the signal, proxy exit after {exited_after:?}",
        acked.len(),
        stored.len()
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged ids are missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );

    let status = exit.unwrap_or_else(|| {
        panic!("shardgate still runs {exited_after:?} after SIGTERM (shutdown_timeout 5 s)")
    });
    assert!(
        status.success(),
        "shardgate exited with {status} after SIGTERM"
    );
    let _ = direct
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await;
}

// ---- 3. admin console ------------------------------------------------------------------------

/// Every SHOW command answers with its documented columns and sensible rows; an
/// application user is refused; unknown commands get 42601/0A000; PAUSE holds new
/// transactions (an open one still commits) until RESUME, for all and for one database;
/// SHUTDOWN stops the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_show_pause_resume() {
    if skip_in_direct_mode("admin_console_show_pause_resume") {
        return;
    }
    let _timing = timing().await;
    let cluster = Cluster::shared();
    let primary = cluster.primary_port(0);
    // A short login timeout: sessions, the console's too, must outlive it (the console
    // is still used at the end, > 2 s after its login).
    let proxy = with_admin(
        Proxy::builder()
            .pool_size(3)
            .client_login_timeout("2s")
            .general("shutdown_timeout = \"5s\""),
    )
    .start()
    .await;

    // An application user may not use the console.
    let mut c = RawConn::connect(proxy.port()).await.expect("connect");
    match c.startup("app", CONSOLE, Some("app")).await {
        Ok(()) => panic!("user app (not an admin) logged in to the admin console"),
        Err(e) => {
            let code = e.code();
            assert!(
                matches!(code.as_deref(), Some("42501") | Some("28000")),
                "app on database {CONSOLE}: want 42501 (or 28000), got {e:?}"
            );
            if let shardgate_e2e::LoginError::Server(m) = &e {
                let severity = m
                    .fields()
                    .into_iter()
                    .find(|(t, _)| *t == b'S')
                    .map(|(_, v)| v);
                assert_eq!(severity.as_deref(), Some("FATAL"), "refusal: {e:?}");
            }
        }
    }

    // Two application clients: A holds a transaction open, B runs a few transactions.
    let a = connect(&proxy.url()).await.expect("client A");
    let b = connect(&proxy.url()).await.expect("client B");
    for _ in 0..3 {
        assert_eq!(simple_value(&b, "SELECT 1").await.expect("B"), "1");
    }
    a.batch_execute("BEGIN").await.expect("A: BEGIN");
    let a_backend: i64 = simple_value(&a, "SELECT pg_backend_pid()")
        .await
        .expect("A: pg_backend_pid")
        .parse()
        .expect("a pid");

    let mut console = admin_login(&proxy).await;

    // SHOW POOLS
    let r = admin(&mut console, "SHOW POOLS").await.ok();
    r.expect_columns(&[
        "database",
        "user",
        "shard",
        "host",
        "role",
        "pool_size",
        "active",
        "idle",
        "waiting",
        "checkouts",
    ]);
    let rows = r.rows_where(&[("database", "app"), ("user", "app")]);
    assert!(!rows.is_empty(), "SHOW POOLS: no row for app/app: {r:?}");
    for row in &rows {
        assert_eq!(r.num(row, "pool_size"), 3, "SHOW POOLS pool_size: {row:?}");
    }
    let primary_row = rows
        .iter()
        .find(|row| r.get(row, "role") == "primary")
        .unwrap_or_else(|| panic!("SHOW POOLS: no primary row for app/app: {r:?}"));
    assert!(
        r.get(primary_row, "host").contains(&primary.to_string()),
        "SHOW POOLS host of the primary: {primary_row:?}"
    );
    assert_eq!(r.get(primary_row, "shard"), "0", "{primary_row:?}");
    let active: i64 = rows.iter().map(|row| r.num(row, "active")).sum();
    assert!(
        active >= 1,
        "SHOW POOLS: client A holds a server in a transaction, yet active = {active}: {r:?}"
    );
    let checkouts: i64 = rows.iter().map(|row| r.num(row, "checkouts")).sum();
    assert!(
        checkouts >= 4,
        "SHOW POOLS: checkouts {checkouts} after 4 transactions: {r:?}"
    );

    // SHOW CLIENTS
    let r = admin(&mut console, "SHOW CLIENTS").await.ok();
    r.expect_columns(&["pid", "database", "user", "state", "server"]);
    let rows = r.rows_where(&[("database", "app"), ("user", "app")]);
    assert!(
        rows.len() >= 2,
        "SHOW CLIENTS: clients A and B are connected, rows for app/app: {r:?}"
    );
    assert!(
        rows.iter().any(|row| !r.get(row, "server").is_empty()),
        "SHOW CLIENTS: client A is in a transaction, but no app client has a server: {r:?}"
    );

    // SHOW SERVERS: A's server is listed with its backend pid.
    let r = admin(&mut console, "SHOW SERVERS").await.ok();
    r.expect_columns(&["database", "user", "host", "state", "backend_pid"]);
    let row = r
        .rows
        .iter()
        .find(|row| r.get(row, "backend_pid") == a_backend.to_string())
        .unwrap_or_else(|| {
            panic!("SHOW SERVERS: no row with backend_pid {a_backend} (client A's): {r:?}")
        });
    assert_eq!(r.get(row, "database"), "app", "{row:?}");
    assert!(
        r.get(row, "host").contains(&primary.to_string()),
        "SHOW SERVERS host: {row:?}"
    );

    // SHOW SHARDS: the primary, up, not banned.
    let r = admin(&mut console, "SHOW SHARDS").await.ok();
    r.expect_columns(&[
        "database",
        "shard",
        "host",
        "role",
        "up",
        "banned",
        "lag_bytes",
        "lag_seconds",
    ]);
    let row = r
        .rows_where(&[("database", "app"), ("shard", "0")])
        .into_iter()
        .find(|row| r.get(row, "host").contains(&primary.to_string()))
        .unwrap_or_else(|| panic!("SHOW SHARDS: no row for app shard 0 host {primary}: {r:?}"));
    assert_eq!(r.get(row, "role"), "primary", "{row:?}");
    assert!(
        truthy(r.get(row, "up")),
        "SHOW SHARDS: primary not up: {row:?}"
    );
    assert!(
        falsy(r.get(row, "banned")),
        "SHOW SHARDS: primary banned: {row:?}"
    );

    // SHOW STATS: B's transactions are counted (stats may be aggregated periodically).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = admin(&mut console, "SHOW STATS").await.ok();
        r.expect_columns(&["database", "user", "transactions", "queries"]);
        let rows = r.rows_where(&[("database", "app"), ("user", "app")]);
        let tx: i64 = rows.iter().map(|row| r.num(row, "transactions")).sum();
        let q: i64 = rows.iter().map(|row| r.num(row, "queries")).sum();
        if tx >= 3 && q >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SHOW STATS: app/app transactions {tx}, queries {q} after 3 transactions: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SHOW CONFIG: the pool size, and no password.
    let r = admin(&mut console, "SHOW CONFIG").await.ok();
    r.expect_columns(&["key", "value"]);
    let pool = r
        .rows
        .iter()
        .find(|row| {
            let k = r.get(row, "key");
            k == "pool_size" || k.ends_with(".pool_size")
        })
        .unwrap_or_else(|| panic!("SHOW CONFIG: no pool_size key: {r:?}"));
    assert_eq!(r.get(pool, "value"), "3", "{pool:?}");
    assert!(
        !r.rows
            .iter()
            .flatten()
            .flatten()
            .any(|v| v.contains(ADMIN_PASSWORD)),
        "SHOW CONFIG shows a password: {r:?}"
    );

    // SHOW VERSION, lower case with a semicolon.
    let r = admin(&mut console, "show version;").await.ok();
    r.expect_columns(&["version"]);
    assert_eq!(r.rows.len(), 1, "SHOW VERSION: {r:?}");
    let version = r.get(&r.rows[0], "version").to_string();
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")),
        "SHOW VERSION {version:?} lacks the version {}",
        env!("CARGO_PKG_VERSION")
    );

    // Unknown commands: a clear error, and the session goes on.
    for bad in ["SHOW NONSENSE", "SELECT 1", "DROP TABLE users"] {
        let r = admin(&mut console, bad).await;
        let code = r.error.as_ref().and_then(Msg::error_code);
        assert!(
            matches!(code.as_deref(), Some("42601") | Some("0A000")),
            "{bad:?}: want 42601 or 0A000, got {r:?}"
        );
        assert!(
            !r.error_text().trim().is_empty(),
            "{bad:?}: error without a message"
        );
    }
    admin(&mut console, "SHOW VERSION").await.ok();

    // PAUSE with a transaction in flight (A's): it may wait for A, or answer at once.
    admin_send(&mut console, "PAUSE").await;
    let mut pause = tokio::spawn(async move {
        let r = console.read_until_ready().await;
        (console, r)
    });
    let early = tokio::time::timeout(Duration::from_secs(1), &mut pause)
        .await
        .ok();
    let answered_early = early.is_some();
    // The open transaction can still finish.
    let inserted = tokio::time::timeout(Duration::from_secs(5), async {
        simple_value(&a, "SELECT 7").await?;
        a.batch_execute("COMMIT").await
    })
    .await;
    match inserted {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("A's open transaction failed after PAUSE: {e}"),
        Err(_) => panic!("A's open transaction could not COMMIT within 5 s of PAUSE"),
    }
    let (mut console, msgs) = match early {
        Some(done) => done,
        None => tokio::time::timeout(Duration::from_secs(10), pause)
            .await
            .expect("PAUSE did not answer within 10 s of the last transaction ending"),
    }
    .expect("PAUSE task");
    let r = Reply::from_msgs("PAUSE", &msgs.expect("PAUSE answer")).ok();
    assert_eq!(r.tag.as_deref(), Some("PAUSE"), "{r:?}");
    eprintln!(
        "PAUSE answered {} A's COMMIT",
        if answered_early { "before" } else { "after" }
    );

    // Paused: B's next transaction waits (while the console still answers) ...
    let mut held = tokio::spawn(async move {
        let r = simple_value(&b, "SELECT 42").await;
        (b, r)
    });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut held)
            .await
            .is_err(),
        "a new transaction completed while shardgate was paused"
    );
    admin(&mut console, "SHOW POOLS").await.ok();
    // ... until RESUME.
    let r = admin(&mut console, "RESUME").await.ok();
    assert_eq!(r.tag.as_deref(), Some("RESUME"), "{r:?}");
    let (b, v) = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held transaction did not complete within 5 s of RESUME")
        .expect("B task");
    assert_eq!(v.expect("B after RESUME"), "42");

    // The same for one database.
    let r = admin(&mut console, "pause app").await.ok();
    assert_eq!(r.tag.as_deref(), Some("PAUSE"), "{r:?}");
    let mut held = tokio::spawn(async move {
        let r = simple_value(&b, "SELECT 43").await;
        (b, r)
    });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut held)
            .await
            .is_err(),
        "a new transaction on app completed while app was paused"
    );
    let r = admin(&mut console, "RESUME app;").await.ok();
    assert_eq!(r.tag.as_deref(), Some("RESUME"), "{r:?}");
    let (_b, v) = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held transaction did not complete within 5 s of RESUME app")
        .expect("B task");
    assert_eq!(v.expect("B after RESUME app"), "43");

    // SHUTDOWN: like SIGTERM (idle clients are ended, the process exits).
    admin_send(&mut console, "SHUTDOWN").await;
    let msgs = console.read_until_closed(Duration::from_secs(10)).await;
    if let Ok(msgs) = &msgs {
        if let Some(e) = Msg::first_error(msgs) {
            assert_eq!(
                e.error_code().as_deref(),
                Some("57P01"),
                "SHUTDOWN answered with an error: {:?}",
                e.fields()
            );
        }
    }
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("shardgate still runs 10 s after SHUTDOWN (answer: {msgs:?})"));
    assert!(
        status.success(),
        "shardgate exited with {status} after SHUTDOWN"
    );
}

// ---- statement logs and log_parameters ------------------------------------------------------

/// With statement logging on, constants and Bind values reach the log only when
/// `log_parameters = true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_logs_hide_parameters_unless_asked() {
    if skip_in_direct_mode("statement_logs_hide_parameters_unless_asked") {
        return;
    }
    const SECRET_LITERAL: &str = "lit-Zq81";
    const SECRET_PARAM: &str = "par-Xv27";
    for log_parameters in [false, true] {
        let proxy = Proxy::builder()
            .general(&format!("log_parameters = {log_parameters}"))
            .env("SHARDGATE_LOG", "info,shardgate::statements=debug")
            .start()
            .await;
        let client = connect(&proxy.url()).await.expect("connect");
        let v = simple_value(&client, &format!("SELECT '{SECRET_LITERAL}'"))
            .await
            .expect("simple query");
        assert_eq!(v, SECRET_LITERAL);
        let row = client
            .query_one("SELECT $1::text", &[&SECRET_PARAM])
            .await
            .expect("extended query");
        assert_eq!(row.get::<_, String>(0), SECRET_PARAM);
        // The log is written as the statements run; poll until both lines are there.
        let deadline = Instant::now() + Duration::from_secs(10);
        let log = loop {
            let log = proxy.log();
            if log.matches("shardgate::statements").count() >= 2 || Instant::now() > deadline {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            log.contains("SELECT $1::text"),
            "the extended statement is logged:\n{log}"
        );
        assert_eq!(
            log.contains(SECRET_LITERAL),
            log_parameters,
            "log_parameters = {log_parameters}: literal in log?\n{log}"
        );
        assert_eq!(
            log.contains(SECRET_PARAM),
            log_parameters,
            "log_parameters = {log_parameters}: parameter in log?\n{log}"
        );
        assert!(
            !log.contains("password = \"app\""),
            "no password in the log"
        );
    }
}
