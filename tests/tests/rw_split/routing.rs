//! Acceptance 1: which server answers each kind of statement, over the simple and the
//! extended protocol (shared cluster: shard 0's primary and its two replicas).

use shardgate_e2e::{skip_in_direct_mode, timing, unique_name, Cluster, Proxy};
use tokio_postgres::Client;

use crate::common::*;

struct Servers {
    primary: u16,
    replicas: [u16; 2],
}

impl Servers {
    fn shared() -> Servers {
        let c = Cluster::shared();
        Servers {
            primary: c.primary_port(0),
            replicas: [c.replica_port(0, 1), c.replica_port(0, 2)],
        }
    }
    fn is_replica(&self, a: Answer) -> bool {
        a.in_recovery && self.replicas.contains(&a.port)
    }
    fn is_primary(&self, a: Answer) -> bool {
        !a.in_recovery && a.port == self.primary
    }
}

/// A fresh client: one that never wrote, so read-your-writes does not pin its reads.
async fn fresh(proxy: &Proxy) -> Client {
    connect_within(&proxy.url()).await.expect("connect")
}

async fn exec(c: &Client, extended: bool, sql: &str) {
    let r = if extended {
        within(STATEMENT_TIMEOUT, sql, c.execute(sql, &[]))
            .await
            .map(|_| ())
    } else {
        within(STATEMENT_TIMEOUT, sql, c.simple_query(sql))
            .await
            .map(|_| ())
    };
    r.unwrap_or_else(|e| panic!("{e}"));
}

async fn answer(c: &Client, extended: bool, sql: &str) -> Answer {
    let r = if extended {
        who_extended_sql(c, sql).await
    } else {
        who_simple_sql(c, sql).await
    };
    r.unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_go_to_the_server_their_role_needs() {
    if skip_in_direct_mode("routing") {
        return;
    }
    let _timing = timing().await;
    let s = Servers::shared();
    let proxy = Proxy::builder().replicas().start().await;
    let cluster = Cluster::shared();
    let table = unique_name("rw_route");
    let seq = format!("{table}_seq");
    let admin = connect_within(&cluster.primary_url(0, "app"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY); INSERT INTO {table} VALUES (1); \
             CREATE SEQUENCE {seq};"
        ))
        .await
        .unwrap();
    // The replicas must have the table before a read names it.
    let lsn: String = admin
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    for j in 1..=2 {
        let r = connect_within(&cluster.direct_url(cluster.replica_port(0, j), "app"))
            .await
            .unwrap();
        let caught_up = poll_until(std::time::Duration::from_secs(10), || async {
            let row = r
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )
                .await
                .ok()?;
            row.get::<_, bool>(0).then_some(())
        })
        .await;
        assert!(caught_up.is_some(), "replica {j} did not replay the setup");
    }

    for extended in [false, true] {
        let proto = if extended { "extended" } else { "simple" };

        // Autocommit reads: replicas only, and both of them over 40 reads. Extended: a
        // statement prepared once, then Bind/Execute/Sync each time, as drivers with a
        // statement cache do (one server choice per read; see also the ignored
        // replicas_share_sequential_reads_evenly).
        let c = fresh(&proxy).await;
        let mut answers = Vec::new();
        let prepared = if extended {
            Some(c.prepare(WHO).await.expect("prepare"))
        } else {
            None
        };
        for _ in 0..40 {
            let a = match &prepared {
                Some(st) => {
                    let row = within(STATEMENT_TIMEOUT, WHO, c.query_one(st, &[]))
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    Answer {
                        port: row.get::<_, i32>(0) as u16,
                        in_recovery: row.get(1),
                    }
                }
                None => answer(&c, extended, WHO).await,
            };
            answers.push(a);
        }
        // And unprepared extended-protocol reads (Parse each time) stay on replicas too.
        for _ in 0..10 {
            let a = answer(&c, extended, WHO).await;
            assert!(s.is_replica(a), "{proto}: an autocommit read ran on {a:?}");
        }
        let t = tally(&answers);
        eprintln!("{proto}: 40 autocommit reads went to {t:?}");
        assert!(
            answers.iter().all(|a| s.is_replica(*a)),
            "{proto}: an autocommit read was not served by a replica: {t:?}"
        );
        for r in s.replicas {
            assert!(
                answers.iter().any(|a| a.port == r),
                "{proto}: replica {r} served none of 40 reads: {t:?}"
            );
        }

        // BEGIN: the primary, for every statement of the transaction.
        let c = fresh(&proxy).await;
        exec(&c, extended, "BEGIN").await;
        let mut inside = Vec::new();
        for _ in 0..5 {
            inside.push(answer(&c, extended, WHO).await);
        }
        inside.push(
            answer(
                &c,
                extended,
                &format!("SELECT inet_server_port(), pg_is_in_recovery() FROM {table}"),
            )
            .await,
        );
        exec(&c, extended, "COMMIT").await;
        assert!(
            inside.iter().all(|a| s.is_primary(*a)),
            "{proto}: statements inside BEGIN..COMMIT ran on {inside:?}, not all on the primary {}",
            s.primary
        );

        // BEGIN READ ONLY: a replica, the same one for the whole transaction.
        let c = fresh(&proxy).await;
        exec(&c, extended, "BEGIN READ ONLY").await;
        let mut inside = Vec::new();
        for _ in 0..5 {
            inside.push(answer(&c, extended, WHO).await);
        }
        exec(&c, extended, "COMMIT").await;
        assert!(
            inside.iter().all(|a| s.is_replica(*a)) && inside.iter().all(|a| *a == inside[0]),
            "{proto}: BEGIN READ ONLY ran on {inside:?}, not on one replica"
        );

        // nextval: the primary.
        let c = fresh(&proxy).await;
        let a = answer(
            &c,
            extended,
            &format!("SELECT inet_server_port(), pg_is_in_recovery(), nextval('{seq}')"),
        )
        .await;
        assert!(s.is_primary(a), "{proto}: nextval ran on {a:?}");

        // SELECT ... FOR UPDATE / FOR SHARE: the primary.
        for lock in ["FOR UPDATE", "FOR SHARE"] {
            let c = fresh(&proxy).await;
            let a = answer(
                &c,
                extended,
                &format!("SELECT inet_server_port(), pg_is_in_recovery() FROM {table} {lock}"),
            )
            .await;
            assert!(s.is_primary(a), "{proto}: SELECT ... {lock} ran on {a:?}");
        }

        // DDL: the primary. The table records where its defining query ran.
        let c = fresh(&proxy).await;
        let ddl_table = format!("{table}_ddl_{proto}");
        exec(
            &c,
            extended,
            &format!(
                "CREATE TABLE {ddl_table} AS SELECT inet_server_port() AS port, \
                 pg_is_in_recovery() AS rec"
            ),
        )
        .await;
        let row = admin
            .query_one(&format!("SELECT port, rec FROM {ddl_table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{proto}: DDL result not on the primary: {e}"));
        let a = Answer {
            port: row.get::<_, i32>(0) as u16,
            in_recovery: row.get(1),
        };
        assert!(s.is_primary(a), "{proto}: CREATE TABLE AS ran on {a:?}");
        // A plain write, for good measure: INSERT ... RETURNING where it ran.
        let a = answer(
            &c,
            extended,
            &format!(
                "INSERT INTO {ddl_table} SELECT inet_server_port(), pg_is_in_recovery() \
                 RETURNING port, rec"
            ),
        )
        .await;
        assert!(s.is_primary(a), "{proto}: INSERT ran on {a:?}");
        eprintln!("{proto}: routing as expected");
    }

    admin
        .batch_execute(&format!(
            "DROP TABLE {table}; DROP SEQUENCE {seq}; DROP TABLE {table}_ddl_simple; \
             DROP TABLE {table}_ddl_extended;"
        ))
        .await
        .unwrap();
}

/// The issue's `/* shardgate: primary */` hint sends a plain read to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_hint_sends_a_read_to_the_primary() {
    if skip_in_direct_mode("routing hint") {
        return;
    }
    let _timing = timing().await;
    let s = Servers::shared();
    let proxy = Proxy::builder().replicas().start().await;
    for extended in [false, true] {
        let c = fresh(&proxy).await;
        for _ in 0..4 {
            let a = answer(
                &c,
                extended,
                "/* shardgate: primary */ SELECT inet_server_port(), pg_is_in_recovery()",
            )
            .await;
            assert!(
                s.is_primary(a),
                "extended={extended}: a read with the primary hint ran on {a:?}"
            );
        }
    }
}

/// Sequential reads of one client (nothing outstanding anywhere, so every choice is a tie)
/// are shared evenly by the two replicas, with either balancing mode; and a client that
/// mixes the simple and the extended protocol reaches both replicas as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_sequential_reads_evenly() {
    if skip_in_direct_mode("balance") {
        return;
    }
    let _timing = timing().await;
    let s = Servers::shared();
    for mode in ["least_outstanding", "round_robin"] {
        let proxy = Proxy::builder()
            .replicas()
            .general(&format!("load_balance = \"{mode}\""))
            .start()
            .await;
        let c = fresh(&proxy).await;
        let mut answers = Vec::new();
        for _ in 0..60 {
            answers.push(answer(&c, false, WHO).await);
        }
        let t = tally(&answers);
        eprintln!("{mode}: 60 sequential simple reads: {t:?}");
        for r in s.replicas {
            let n = answers.iter().filter(|a| a.port == r).count();
            assert!(
                (24..=36).contains(&n),
                "{mode}: replica {r} served {n} of 60 sequential reads: {t:?}"
            );
        }
        let c = fresh(&proxy).await;
        let mut answers = Vec::new();
        for i in 0..40 {
            answers.push(answer(&c, i % 2 == 1, WHO).await);
        }
        let t = tally(&answers);
        eprintln!("{mode}: 40 reads alternating simple/extended: {t:?}");
        for r in s.replicas {
            assert!(
                answers.iter().any(|a| a.port == r),
                "{mode}: replica {r} served none of 40 reads alternating protocols: {t:?}"
            );
        }
    }
}
