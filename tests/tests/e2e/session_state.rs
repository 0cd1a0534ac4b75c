//! Session settings in transaction mode: a client never sees another client's SET, and
//! always sees its own (including after RESET, SET LOCAL, and SET rolled back).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate_e2e::{connect, simple_value, unique_name, Cluster, Proxy};
use tokio_postgres::Client;

async fn show(client: &Client, name: &str) -> String {
    simple_value(client, &format!("SHOW {name}"))
        .await
        .unwrap_or_else(|e| panic!("SHOW {name}: {e}"))
}

/// Extended protocol (a prepared statement) reading a setting.
async fn setting(client: &Client, name: &str) -> String {
    client
        .query_one("SELECT current_setting($1)", &[&name])
        .await
        .unwrap_or_else(|e| panic!("current_setting({name}): {e}"))
        .get(0)
}

/// Defaults as a fresh session sees them.
async fn defaults(names: &[&str]) -> Vec<String> {
    let direct = connect(&Cluster::shared().primary_url(0, "app"))
        .await
        .unwrap();
    let mut out = Vec::new();
    for n in names {
        out.push(show(&direct, n).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_does_not_leak_between_clients() {
    let proxy = Proxy::builder().pool_size(1).start().await;
    let d = defaults(&["statement_timeout", "search_path", "work_mem"]).await;
    let (def_timeout, def_path, def_work_mem) = (&d[0], &d[1], &d[2]);
    assert_ne!(def_timeout, "100ms");

    // A schema with a table that only A's search_path finds.
    let schema = unique_name("e2e_sp");
    let table = unique_name("only_in_schema");
    let direct = connect(&Cluster::shared().primary_url(0, "app"))
        .await
        .unwrap();
    direct
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; CREATE TABLE {schema}.{table} (v text); \
             INSERT INTO {schema}.{table} VALUES ('in-schema')"
        ))
        .await
        .unwrap();

    let a = connect(&proxy.url()).await.unwrap();
    let b = connect(&proxy.url()).await.unwrap();
    a.batch_execute("SET statement_timeout = '100ms'")
        .await
        .unwrap();
    a.batch_execute(&format!("SET search_path = {schema}, public"))
        .await
        .unwrap();
    b.batch_execute("SET work_mem = '12345kB'").await.unwrap();
    let a_path = format!("{schema}, public");

    for i in 0..150 {
        assert_eq!(show(&a, "statement_timeout").await, "100ms", "A, step {i}");
        assert_eq!(show(&a, "search_path").await, a_path, "A, step {i}");
        assert_eq!(
            &show(&a, "work_mem").await,
            def_work_mem,
            "A sees B's work_mem, step {i}"
        );
        let v: String = a
            .query_one(&format!("SELECT v FROM {table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("A: table via search_path, step {i}: {e}"))
            .get(0);
        assert_eq!(v, "in-schema");

        assert_eq!(
            &show(&b, "statement_timeout").await,
            def_timeout,
            "B sees A's timeout, step {i}"
        );
        assert_eq!(
            &show(&b, "search_path").await,
            def_path,
            "B sees A's search_path, step {i}"
        );
        assert_eq!(
            &setting(&b, "search_path").await,
            def_path,
            "B (extended), step {i}"
        );
        assert_eq!(show(&b, "work_mem").await, "12345kB", "B, step {i}");
        let hidden: bool = b
            .query_one(&format!("SELECT to_regclass('{table}') IS NULL"), &[])
            .await
            .unwrap()
            .get(0);
        assert!(hidden, "B resolves A's schema table, step {i}");
        if i % 30 == 0 {
            // Would be cancelled if A's 100ms statement_timeout leaked to B.
            b.batch_execute("SELECT pg_sleep(0.15)")
                .await
                .unwrap_or_else(|e| panic!("B's pg_sleep, step {i}: {e}"));
        }
    }

    // RESET is tracked too.
    a.batch_execute("RESET statement_timeout").await.unwrap();
    assert_eq!(&show(&a, "statement_timeout").await, def_timeout);
    assert_eq!(show(&a, "search_path").await, a_path);
    assert_eq!(show(&b, "work_mem").await, "12345kB");
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(&show(&a, "search_path").await, def_path);
    assert_eq!(&setting(&a, "search_path").await, def_path);
    assert_eq!(show(&b, "work_mem").await, "12345kB");

    direct
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// A work_mem value Postgres shows as `NkB` (not a whole number of MB).
fn work_mem(rng: &mut StdRng) -> String {
    loop {
        let kb: u32 = rng.gen_range(64..4_000_000);
        if kb % 1024 != 0 {
            return format!("{kb}kB");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_settings_stay_per_client() {
    let proxy = Proxy::builder().pool_size(3).start().await;
    let seed: u64 = std::env::var("SHARDGATE_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set SHARDGATE_E2E_SEED to replay)");

    let mut tasks = Vec::new();
    for c in 0..12u64 {
        let url = proxy.url();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(c));
            let client = connect(&url).await.expect("connect");
            let mut app = format!("e2e_c{c}_{}", rng.gen::<u32>());
            let mut mem = work_mem(&mut rng);
            client
                .batch_execute(&format!("SET application_name = '{app}'; SET work_mem = '{mem}'"))
                .await
                .unwrap();
            for step in 0..60 {
                let ctx = format!("client {c} step {step} (seed {seed})");
                match rng.gen_range(0..6) {
                    0 => {
                        assert_eq!(show(&client, "application_name").await, app, "{ctx}");
                        assert_eq!(show(&client, "work_mem").await, mem, "{ctx}");
                    }
                    1 => {
                        let row = client
                            .query_one(
                                "SELECT current_setting('application_name'), current_setting('work_mem')",
                                &[],
                            )
                            .await
                            .unwrap();
                        assert_eq!(row.get::<_, String>(0), app, "{ctx}");
                        assert_eq!(row.get::<_, String>(1), mem, "{ctx}");
                    }
                    2 => {
                        app = format!("e2e_c{c}_{}", rng.gen::<u32>());
                        mem = work_mem(&mut rng);
                        client
                            .batch_execute(&format!(
                                "SET application_name = '{app}'; SET work_mem = '{mem}'"
                            ))
                            .await
                            .unwrap();
                    }
                    3 => {
                        // SET LOCAL lasts until the end of the transaction only.
                        let local = work_mem(&mut rng);
                        client.batch_execute("BEGIN").await.unwrap();
                        client
                            .batch_execute(&format!("SET LOCAL work_mem = '{local}'"))
                            .await
                            .unwrap();
                        assert_eq!(show(&client, "work_mem").await, local, "{ctx}: SET LOCAL");
                        client.batch_execute("COMMIT").await.unwrap();
                        assert_eq!(show(&client, "work_mem").await, mem, "{ctx}: after SET LOCAL");
                    }
                    4 => {
                        // A SET inside a rolled-back transaction is undone.
                        let undone = work_mem(&mut rng);
                        client.batch_execute("BEGIN").await.unwrap();
                        client
                            .batch_execute(&format!("SET work_mem = '{undone}'"))
                            .await
                            .unwrap();
                        assert_eq!(show(&client, "work_mem").await, undone, "{ctx}: in tx");
                        client.batch_execute("ROLLBACK").await.unwrap();
                        assert_eq!(
                            show(&client, "work_mem").await,
                            mem,
                            "{ctx}: SET rolled back"
                        );
                    }
                    _ => {
                        // A SET inside a committed transaction stays.
                        mem = work_mem(&mut rng);
                        client.batch_execute("BEGIN").await.unwrap();
                        client
                            .batch_execute(&format!("SET work_mem = '{mem}'"))
                            .await
                            .unwrap();
                        client.batch_execute("COMMIT").await.unwrap();
                        assert_eq!(show(&client, "work_mem").await, mem, "{ctx}: SET committed");
                    }
                }
                if rng.gen_bool(0.5) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task panicked");
    }
}
