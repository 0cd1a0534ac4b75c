//! End-to-end test harness for shardgate.
//!
//! The tests in `tests/tests/` run real drivers (tokio-postgres, psql, pgbench and a
//! small raw frontend) through a real `shardgate` process against the real Postgres
//! cluster that `tests/run.sh` starts with `deploy/local/cluster.sh`.
//!
//! * [`Cluster::shared`] describes that cluster (from the `SHARDGATE_TEST_*` variables).
//! * [`Proxy::builder`] writes a config file, starts `$SHARDGATE_BIN`, waits until it
//!   accepts connections and kills it on drop (printing its log if the test panicked).
//! * [`RawConn`] speaks the wire protocol byte by byte, for what drivers won't send.
//! * [`psql`], [`pgbench`], [`http_get`], [`make_self_signed_cert`] wrap the tools.
//!
//! `SHARDGATE_E2E_DIRECT=1` makes every [`Proxy`] point at shard 0's primary instead of
//! starting shardgate: a way to check a test's own logic against plain Postgres. Tests
//! that only make sense with the proxy (its TLS, timeouts, metrics, its own users) skip
//! themselves in that mode. With `SHARDGATE_E2E_DIRECT_PORT=N` as well, the tests go
//! to 127.0.0.1:N instead (say, another pooler in front of shard 0, to compare).

mod harness_cluster;
mod harness_proxy;
mod harness_raw;
mod harness_tools;

pub use harness_cluster::Cluster;
pub use harness_proxy::free_port;
pub use harness_proxy::{Proxy, ProxyBuilder, UserSpec};
pub use harness_raw::{LoginError, Msg, RawConn};
pub use harness_tools::{
    http_get, make_self_signed_cert, pgbench, psql, CmdOutput, Driver, ScratchDir,
};

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

/// True when `SHARDGATE_E2E_DIRECT` asks tests to talk to Postgres directly.
pub fn direct_mode() -> bool {
    matches!(
        std::env::var("SHARDGATE_E2E_DIRECT").as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

/// Prints why a proxy-only test does nothing in direct mode; returns true if it should skip.
pub fn skip_in_direct_mode(test: &str) -> bool {
    if direct_mode() {
        eprintln!("{test}: skipped (SHARDGATE_E2E_DIRECT=1: this test checks shardgate itself)");
        return true;
    }
    false
}

/// A lowercase identifier unique to this process and call, usable as a table/schema name.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u32 = rand::random();
    format!("{prefix}_{}_{n}_{r:08x}", std::process::id())
}

/// Turns a statement failure into a readable message (tokio-postgres says only "db error").
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}

/// The SQLSTATE of a tokio-postgres error, if the server (or proxy) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_string())
}

/// Connects with tokio-postgres (no TLS) and drives the connection on a spawned task.
pub async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(async move {
        // An error here also surfaces on the client's next call; nothing else to do.
        let _ = connection.await;
    });
    Ok(client)
}

/// Like [`connect`], and also hands back the asynchronous messages (notifications,
/// notices) the connection receives.
pub async fn connect_with_messages(
    conninfo: &str,
) -> Result<(Client, mpsc::UnboundedReceiver<AsyncMessage>), tokio_postgres::Error> {
    let (client, mut connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(m)) = messages.next().await {
            // A dropped receiver is fine: keep driving the connection anyway.
            let _ = tx.send(m);
        }
    });
    Ok((client, rx))
}

/// Runs a simple-protocol query and returns the text values of every row of every
/// statement, in order.
pub async fn simple_rows(
    client: &Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let mut rows = Vec::new();
    for m in client.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(r) = m {
            rows.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect());
        }
    }
    Ok(rows)
}

/// Runs a simple-protocol query expected to return exactly one value.
pub async fn simple_value(client: &Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    let rows = simple_rows(client, sql).await?;
    assert_eq!(rows.len(), 1, "{sql}: expected one row, got {rows:?}");
    assert_eq!(rows[0].len(), 1, "{sql}: expected one column, got {rows:?}");
    Ok(rows[0][0].clone().unwrap_or_default())
}

/// Polls `f` every 20 ms until it yields `Some`, panicking with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Tests in one binary run in parallel. A heavy test (pgbench, fuzz) takes
/// [`exclusive`]; a test that asserts tight timings takes [`timing`], so that the two
/// kinds never overlap on a 2-core machine. Light tests take neither.
static LOAD: RwLock<()> = RwLock::const_new(());

/// Held by tests that load the machine.
pub async fn exclusive() -> RwLockWriteGuard<'static, ()> {
    LOAD.write().await
}

/// Held by tests whose assertions depend on timing.
pub async fn timing() -> RwLockReadGuard<'static, ()> {
    LOAD.read().await
}
