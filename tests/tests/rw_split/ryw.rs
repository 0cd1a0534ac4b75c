//! Acceptance 2: read-your-writes. Clients insert a random value and read it back at once
//! through shardgate: no misses with read-your-writes on; misses with it off against
//! replicas that lag (proving that the check can fail).

use std::time::{Duration, Instant};

use shardgate_e2e::{exclusive, skip_in_direct_mode, unique_name, Cluster, Proxy};
use tokio_postgres::Client;

use crate::common::*;

#[derive(Debug, Default, Clone)]
struct Stats {
    writes: usize,
    reads: usize,
    misses: usize,
    reads_on_primary: usize,
    reads_on_replica: usize,
    errors: Vec<String>,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.writes += o.writes;
        self.reads += o.reads;
        self.misses += o.misses;
        self.reads_on_primary += o.reads_on_primary;
        self.reads_on_replica += o.reads_on_replica;
        self.errors.extend(o.errors.iter().cloned());
    }
}

/// Reads value `v` of client `id` back; returns where it ran and whether the row was there.
async fn read_back(
    c: &Client,
    table: &str,
    id: i32,
    v: i64,
    extended: bool,
) -> Result<(Answer, bool), String> {
    if extended {
        let sql = format!(
            "SELECT inet_server_port(), pg_is_in_recovery(), \
             EXISTS (SELECT 1 FROM {table} WHERE client = $1 AND v = $2)"
        );
        let row = within(
            STATEMENT_TIMEOUT,
            "read back",
            c.query_one(&sql, &[&id, &v]),
        )
        .await?;
        Ok((
            Answer {
                port: row.get::<_, i32>(0) as u16,
                in_recovery: row.get(1),
            },
            row.get(2),
        ))
    } else {
        let sql = format!(
            "SELECT inet_server_port(), pg_is_in_recovery(), \
             EXISTS (SELECT 1 FROM {table} WHERE client = {id} AND v = {v})"
        );
        let rows = within(
            STATEMENT_TIMEOUT,
            "read back",
            shardgate_e2e::simple_rows(c, &sql),
        )
        .await?;
        let row = rows.first().ok_or("read back: no row")?;
        Ok((
            Answer {
                port: row[0].as_deref().and_then(|p| p.parse().ok()).unwrap_or(0),
                in_recovery: row[1].as_deref() == Some("t"),
            },
            row[2].as_deref() == Some("t"),
        ))
    }
}

async fn insert(c: &Client, table: &str, id: i32, v: i64, extended: bool) -> Result<(), String> {
    if extended {
        let sql = format!("INSERT INTO {table} (client, v) VALUES ($1, $2)");
        within(STATEMENT_TIMEOUT, "insert", c.execute(&sql, &[&id, &v]))
            .await
            .map(|_| ())
    } else {
        let sql = format!("INSERT INTO {table} (client, v) VALUES ({id}, {v})");
        within(STATEMENT_TIMEOUT, "insert", c.simple_query(&sql))
            .await
            .map(|_| ())
    }
}

/// `clients` clients, each inserting a random value and reading it back at once, for
/// `duration`. With `to_replica`, each client finally polls (up to 5 s) until a read of its
/// last value is served by a replica, and checks the value is there too.
async fn workload(
    url: &str,
    table: &str,
    clients: i32,
    duration: Duration,
    extended: bool,
    to_replica: bool,
) -> Stats {
    let mut tasks = Vec::new();
    for id in 0..clients {
        let (url, table) = (url.to_string(), table.to_string());
        tasks.push(tokio::spawn(async move {
            let mut st = Stats::default();
            let c = match connect_within(&url).await {
                Ok(c) => c,
                Err(e) => {
                    st.errors.push(e);
                    return st;
                }
            };
            let end = Instant::now() + duration;
            let mut last = None;
            while Instant::now() < end {
                let v: i64 = rand::random::<i64>() & i64::MAX;
                if let Err(e) = insert(&c, &table, id, v, extended).await {
                    st.errors.push(e);
                    continue;
                }
                st.writes += 1;
                last = Some(v);
                match read_back(&c, &table, id, v, extended).await {
                    Ok((a, found)) => {
                        st.reads += 1;
                        if a.in_recovery {
                            st.reads_on_replica += 1;
                        } else {
                            st.reads_on_primary += 1;
                        }
                        if !found {
                            st.misses += 1;
                        }
                    }
                    Err(e) => st.errors.push(e),
                }
            }
            if let (true, Some(v)) = (to_replica, last) {
                // Once the replicas have replayed this client's last commit (the health
                // checker sees it), its reads go to them again, and see the value.
                let got = poll_until(Duration::from_secs(5), || {
                    let c = &c;
                    let table = &table;
                    async move {
                        let (a, found) = read_back(c, table, id, v, extended).await.ok()?;
                        a.in_recovery.then_some(found)
                    }
                })
                .await;
                match got {
                    Some(true) => {}
                    Some(false) => st.errors.push(format!(
                        "client {id}: a replica served the read of its last value without it"
                    )),
                    None => st.errors.push(format!(
                        "client {id}: reads never went back to a replica within 5 s"
                    )),
                }
            }
            st
        }));
    }
    let mut total = Stats::default();
    for t in tasks {
        total.add(&t.await.expect("client task"));
    }
    total
}

fn create_table_sql(table: &str) -> String {
    format!("CREATE TABLE {table} (client int NOT NULL, v bigint NOT NULL)")
}

/// Read-your-writes on (the default) against real streaming replicas: 8 clients, simple
/// then extended protocol: 0 misses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_under_load() {
    if skip_in_direct_mode("read your writes") {
        return;
    }
    let _load = exclusive().await;
    let cluster = Cluster::shared();
    let table = unique_name("rw_ryw");
    let admin = connect_within(&cluster.primary_url(0, "app"))
        .await
        .unwrap();
    admin
        .batch_execute(&create_table_sql(&table))
        .await
        .unwrap();
    // Fresh replica positions every 50 ms, so that reads do go back to replicas between
    // writes (the interesting case) instead of always waiting out a 500 ms check.
    let proxy = Proxy::builder()
        .replicas()
        .general("health_check_interval = \"50ms\"")
        .start()
        .await;
    for extended in [false, true] {
        let proto = if extended { "extended" } else { "simple" };
        let started = Instant::now();
        let st = workload(
            &proxy.url(),
            &table,
            8,
            Duration::from_millis(1500),
            extended,
            true,
        )
        .await;
        eprintln!(
            "read-your-writes on, {proto}: {} writes, {} reads ({} on the primary, {} on \
             replicas), {} misses, {} errors in {:?}",
            st.writes,
            st.reads,
            st.reads_on_primary,
            st.reads_on_replica,
            st.misses,
            st.errors.len(),
            started.elapsed()
        );
        assert!(st.errors.is_empty(), "{proto}: errors: {:?}", st.errors);
        assert!(st.writes >= 80, "{proto}: only {} writes", st.writes);
        assert_eq!(
            st.misses, 0,
            "{proto}: {} of {} reads did not see the client's own committed write",
            st.misses, st.reads
        );
    }
    admin
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

/// Replicas whose replay is paused: read-your-writes on still sees every write (its reads
/// go to the primary); off, reads go to the stale replicas and miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_off_misses_on_lagging_replicas() {
    if skip_in_direct_mode("read your writes off") {
        return;
    }
    let _load = exclusive().await;
    let own = OwnCluster::start("rw_ryw_off", 1).await;
    let table = "ryw";
    own.su(PRIMARY, &create_table_sql(table)).await;
    own.su(PRIMARY, &format!("ALTER TABLE {table} OWNER TO app"))
        .await;
    for r in [REPLICA1, REPLICA2] {
        own.wait_caught_up(r, PRIMARY, Duration::from_secs(10))
            .await;
        own.su(r, "SELECT pg_wal_replay_pause()").await;
    }

    let on = own.proxy(&[]).await;
    let off = own.proxy(&["read_your_writes = false"]).await;
    let mut results = Vec::new();
    for extended in [false, true] {
        let proto = if extended { "extended" } else { "simple" };
        let st_on = workload(
            &on.url(),
            table,
            8,
            Duration::from_millis(800),
            extended,
            false,
        )
        .await;
        let st_off = workload(
            &off.url(),
            table,
            8,
            Duration::from_millis(800),
            extended,
            false,
        )
        .await;
        for (mode, st) in [("on", &st_on), ("off", &st_off)] {
            eprintln!(
                "paused replicas, read-your-writes {mode}, {proto}: {} writes, {} reads ({} on \
                 the primary, {} on replicas), {} misses, {} errors",
                st.writes,
                st.reads,
                st.reads_on_primary,
                st.reads_on_replica,
                st.misses,
                st.errors.len()
            );
            assert!(st.errors.is_empty(), "{mode} {proto}: {:?}", st.errors);
            assert!(st.writes >= 20, "{mode} {proto}: only {} writes", st.writes);
        }
        results.push((proto, st_on, st_off));
    }
    for r in [REPLICA1, REPLICA2] {
        own.su(r, "SELECT pg_wal_replay_resume()").await;
    }
    for (proto, st_on, st_off) in results {
        assert_eq!(
            st_on.misses, 0,
            "{proto}: read-your-writes on missed {} of {} reads",
            st_on.misses, st_on.reads
        );
        assert!(
            st_off.misses > 0,
            "{proto}: read-your-writes off saw no misses on paused replicas ({} reads, {} on \
             replicas): the test cannot tell",
            st_off.reads,
            st_off.reads_on_replica
        );
    }
}
