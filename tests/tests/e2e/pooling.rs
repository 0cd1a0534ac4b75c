//! Transaction pooling with prepared statements: named statements (tokio-postgres and
//! raw, same name with different text on different clients) and the unnamed statement
//! across round trips all survive server-connection switches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate_e2e::{
    connect, direct_mode, simple_value, unique_name, Cluster, Msg, Proxy, RawConn,
};
use tokio_postgres::types::Type;

fn seed() -> u64 {
    let seed = std::env::var("SHARDGATE_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set SHARDGATE_E2E_SEED to replay)");
    seed
}

/// One client prepares once and executes 1,000 times while 20 others churn a pool of 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prepared_statement_survives_churn_on_small_pool() {
    let proxy = Proxy::builder().pool_size(2).start().await;
    let url = proxy.url();
    let t = unique_name("e2e_churn");
    let setup = connect(&url).await.unwrap();
    setup
        .batch_execute(&format!("CREATE TABLE {t} (client int, k int)"))
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let mut churners = Vec::new();
    for c in 0..20i32 {
        let url = url.clone();
        let stop = stop.clone();
        let t = t.clone();
        churners.push(tokio::spawn(async move {
            let mut client = connect(&url).await.expect("churner connect");
            let mut inserted = 0i64;
            let mut k = 0i32;
            while !stop.load(Ordering::Relaxed) && k < 5000 {
                match k % 4 {
                    0 => {
                        let v = simple_value(&client, &format!("SELECT {k} + {c}"))
                            .await
                            .expect("simple");
                        assert_eq!(v, (k + c).to_string());
                    }
                    1 => {
                        let row = client
                            .query_one("SELECT $1::int4 + 1", &[&k])
                            .await
                            .expect("prepare+execute");
                        assert_eq!(row.get::<_, i32>(0), k + 1);
                    }
                    2 => {
                        let tx = client.transaction().await.expect("begin");
                        tx.execute(&format!("INSERT INTO {t} VALUES ($1, $2)"), &[&c, &k])
                            .await
                            .expect("insert");
                        let n: i64 = tx
                            .query_one(
                                &format!("SELECT count(*) FROM {t} WHERE client = $1"),
                                &[&c],
                            )
                            .await
                            .expect("count")
                            .get(0);
                        inserted += 1;
                        assert_eq!(
                            n, inserted,
                            "client {c} sees its own rows in its transaction"
                        );
                        tx.commit().await.expect("commit");
                    }
                    _ => {
                        let s = format!("c{c}k{k}");
                        let row = client
                            .query_typed_one("SELECT $1::text || '!'", &[(&s, Type::TEXT)])
                            .await
                            .expect("unnamed statement");
                        assert_eq!(row.get::<_, String>(0), format!("{s}!"));
                    }
                }
                k += 1;
            }
            (c, inserted, k)
        }));
    }

    let client = connect(&url).await.unwrap();
    let stmt = client
        .prepare("SELECT $1::int8 * 2, $2::text || '?'")
        .await
        .unwrap();
    for i in 0..1000i64 {
        let s = format!("v{i}");
        let row = client
            .query_one(&stmt, &[&i, &s])
            .await
            .unwrap_or_else(|e| panic!("execution {i} of the prepared statement: {e}"));
        assert_eq!(row.get::<_, i64>(0), i * 2, "execution {i}");
        assert_eq!(row.get::<_, String>(1), format!("v{i}?"), "execution {i}");
    }
    stop.store(true, Ordering::Relaxed);

    let mut total_iterations = 0;
    for h in churners {
        let (c, inserted, k) = h.await.expect("churner panicked");
        total_iterations += k;
        let n: i64 = setup
            .query_one(
                &format!("SELECT count(*) FROM {t} WHERE client = $1"),
                &[&c],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, inserted, "client {c}: committed rows");
    }
    assert!(
        total_iterations > 20,
        "churners barely ran ({total_iterations})"
    );
    setup
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// Many tokio-postgres clients, each with shared-text and own-text named statements,
/// re-preparing as they go, over a pool of 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn named_statements_survive_pool_switches() {
    let proxy = Proxy::builder().pool_size(2).start().await;
    let seed = seed();
    let mut tasks = Vec::new();
    for c in 0..12u64 {
        let url = proxy.url();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ c);
            let client = connect(&url).await.expect("connect");
            let shared = client
                .prepare("SELECT $1::int4 + 100")
                .await
                .expect("prepare shared");
            let mut own = client
                .prepare(&format!("SELECT $1::text || '-{c}'"))
                .await
                .expect("prepare own");
            let typed = client
                .prepare_typed("SELECT $1 * 3", &[Type::INT8])
                .await
                .expect("prepare typed");
            for i in 0..150i32 {
                match rng.gen_range(0..4) {
                    0 => {
                        let r: i32 = client
                            .query_one(&shared, &[&i])
                            .await
                            .expect("shared")
                            .get(0);
                        assert_eq!(r, i + 100);
                    }
                    1 => {
                        let s = format!("x{i}");
                        let r: String = client.query_one(&own, &[&s]).await.expect("own").get(0);
                        assert_eq!(r, format!("x{i}-{c}"));
                    }
                    2 => {
                        let v = i as i64;
                        let r: i64 = client.query_one(&typed, &[&v]).await.expect("typed").get(0);
                        assert_eq!(r, v * 3);
                    }
                    _ => {
                        // Drop (Close) and prepare again, with a new text this time.
                        own = client
                            .prepare(&format!("SELECT $1::text || '-{c}' || '/{i}'"))
                            .await
                            .expect("re-prepare");
                        let s = format!("y{i}");
                        let r: String =
                            client.query_one(&own, &[&s]).await.expect("new own").get(0);
                        assert_eq!(r, format!("y{i}-{c}/{i}"));
                        // Later uses of `own` expect the old suffix: re-prepare that one.
                        own = client
                            .prepare(&format!("SELECT $1::text || '-{c}'"))
                            .await
                            .expect("re-prepare");
                    }
                }
                if rng.gen_bool(0.3) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task panicked");
    }
}

fn command_tags(msgs: &[Msg]) -> Vec<char> {
    msgs.iter().map(|m| m.tag as char).collect()
}

/// Raw clients all use the statement name `stmt` for different texts, close it and
/// parse it again with another text; every execution sees its own client's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_statement_name_on_many_clients() {
    let proxy = Proxy::builder().pool_size(2).start().await;
    let port = proxy.port();
    let mut tasks = Vec::new();
    for c in 0..8i32 {
        tasks.push(tokio::spawn(async move {
            let mut conn = RawConn::login(port, "app", Some("app"), "app").await;
            conn.parse("stmt", &format!("SELECT {c}::int AS c, $1::text AS v"), &[]);
            conn.sync();
            let r = conn.round_trip().await.expect("parse");
            assert_eq!(command_tags(&r), ['1', 'Z'], "Parse: {r:?}");
            for i in 0..60 {
                let base = if i < 30 { c } else { c + 1000 };
                if i == 30 {
                    conn.close(b'S', "stmt");
                    conn.parse(
                        "stmt",
                        &format!("SELECT {}::int AS c, $1::text AS v", c + 1000),
                        &[],
                    );
                    conn.sync();
                    let r = conn.round_trip().await.expect("close+parse");
                    assert_eq!(command_tags(&r), ['3', '1', 'Z'], "Close+Parse: {r:?}");
                }
                let v = format!("c{c}i{i}");
                conn.bind_text("", "stmt", &[Some(&v)]);
                conn.execute("", 0);
                conn.sync();
                let r = conn.round_trip().await.expect("bind/execute");
                assert!(Msg::first_error(&r).is_none(), "client {c} step {i}: {r:?}");
                assert_eq!(
                    Msg::rows(&r),
                    vec![vec![Some(base.to_string()), Some(v.clone())]],
                    "client {c} step {i}"
                );
                if i % 3 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            conn.terminate().await;
        }));
    }
    for t in tasks {
        t.await.expect("raw client panicked");
    }
}

/// Parse/Describe/Sync of the unnamed statement, then (after the pool has moved on)
/// Bind/Execute/Sync of it on another server connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unnamed_statement_across_round_trips() {
    let proxy = Proxy::builder().pool_size(2).start().await;
    let cluster = Cluster::shared();
    let observer = connect(&cluster.primary_url(0, "app")).await.unwrap();
    let mut a = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
    let b = connect(&proxy.url()).await.unwrap();
    let c = connect(&proxy.url()).await.unwrap();

    let mut switched = 0;
    let mut parse_pid_known = 0;
    for round in 0..10i32 {
        let marker = unique_name("unnamed");
        let sql = format!("SELECT $1::int4 + 1 AS r, pg_backend_pid() AS pid /* {marker} */");
        a.parse("", &sql, &[]);
        a.describe(b'S', "");
        a.sync();
        let r = a.round_trip().await.expect("parse/describe");
        assert_eq!(
            command_tags(&r),
            ['1', 't', 'T', 'Z'],
            "Parse/Describe: {r:?}"
        );

        // Which server backend saw the Parse (if nothing ran there since)?
        let parse_pid: Option<i32> = observer
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE query = $1 AND pid <> pg_backend_pid()",
                &[&sql],
            )
            .await
            .unwrap()
            .map(|row| row.get(0));

        // Occupy both server connections, then free the one that did not see the Parse.
        b.batch_execute("BEGIN").await.unwrap();
        let b_pid: i32 = b
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        c.batch_execute("BEGIN").await.unwrap();
        let c_pid: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let release_b = match parse_pid {
            Some(p) if p == b_pid => false,
            Some(p) if p == c_pid => true,
            _ => round % 2 == 0,
        };
        let (released, held) = if release_b { (&b, &c) } else { (&c, &b) };
        let released_pid = if release_b { b_pid } else { c_pid };
        released.batch_execute("COMMIT").await.unwrap();

        a.bind_text("", "", &[Some(&round.to_string())]);
        a.execute("", 0);
        a.sync();
        let r = a.round_trip().await.expect("bind/execute");
        assert!(Msg::first_error(&r).is_none(), "round {round}: {r:?}");
        let rows = Msg::rows(&r);
        assert_eq!(rows.len(), 1, "round {round}: {r:?}");
        assert_eq!(
            rows[0][0].as_deref(),
            Some((round + 1).to_string().as_str())
        );
        let exec_pid: i32 = rows[0][1].as_deref().unwrap().parse().unwrap();
        held.batch_execute("COMMIT").await.unwrap();

        if !direct_mode() {
            assert_ne!(
                b_pid, c_pid,
                "two open transactions share a server connection"
            );
            assert_eq!(
                exec_pid, released_pid,
                "round {round}: ran on a busy connection?"
            );
            if let Some(p) = parse_pid {
                parse_pid_known += 1;
                if p != exec_pid {
                    switched += 1;
                }
            }
        }
    }
    if !direct_mode() {
        eprintln!(
            "unnamed statement: Parse's connection known in {parse_pid_known} of 10 rounds, \
             executed elsewhere in {switched}"
        );
        if parse_pid_known == 0 {
            eprintln!("note: the Parse's server connection was never identifiable");
        } else {
            assert!(
                switched > 0,
                "the unnamed statement never ran on another connection"
            );
        }
    }
    a.terminate().await;
}

/// A result far bigger than the socket buffers, to a client that does not read until the
/// server is stuck writing: shardgate's sends to the client fill up partway (the path that
/// waits for the socket), and the client still gets every row, in order, then a working
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_big_result_reaches_a_client_that_reads_late_whole() {
    let proxy = Proxy::builder().pool_size(2).start().await;
    let observer = connect(&Cluster::shared().primary_url(0, "app"))
        .await
        .unwrap();
    let mut c = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
    let marker = unique_name("late_reader");
    // 20,000 rows of 1,000 bytes: about 20 MB, several times what the sockets buffer.
    let rows = 20_000;
    let sql =
        format!("SELECT g, repeat('x', 1000) FROM generate_series(1, {rows}) g /* {marker} */");
    postgres_protocol::message::frontend::query(&sql, c.buf()).unwrap();
    c.flush().await.unwrap();
    // Everything in between is full once the server waits to write to its client.
    let pattern = format!("%{marker}%");
    shardgate_e2e::wait_for(
        "the server to wait on a full socket",
        std::time::Duration::from_secs(10),
        || async {
            observer
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE query LIKE $1 \
                     AND wait_event = 'ClientWrite' AND pid <> pg_backend_pid()",
                    &[&pattern],
                )
                .await
                .unwrap()
                .map(|_| ())
        },
    )
    .await;
    let msgs = c.read_until_ready().await.unwrap();
    let got = Msg::rows(&msgs);
    assert_eq!(got.len(), rows, "rows received");
    let filler = "x".repeat(1000);
    for (i, row) in got.iter().enumerate() {
        assert_eq!(
            row[0].as_deref(),
            Some((i + 1).to_string().as_str()),
            "row {i}"
        );
        assert_eq!(row[1].as_deref(), Some(filler.as_str()), "row {i}");
    }
    assert_eq!(msgs.last().map(|m| m.ready_status()), Some(b'I'));
    let after = c.simple_query("SELECT 42").await.unwrap();
    assert_eq!(Msg::rows(&after), vec![vec![Some("42".to_string())]]);
    c.terminate().await;
}

/// One execution of `sql` as the unnamed statement (Parse, Bind, Describe portal, Execute,
/// Sync) with text parameters; the messages up to ReadyForQuery.
async fn run_unnamed(conn: &mut RawConn, sql: &str, params: &[Option<&str>]) -> Vec<Msg> {
    conn.parse("", sql, &[]);
    conn.bind_text("", "", params);
    conn.describe(b'P', "");
    conn.execute("", 0);
    conn.sync();
    conn.round_trip().await.expect("unnamed round trip")
}

async fn proxy_preparing_unnamed(pool_size: u32, prepare: bool) -> Proxy {
    Proxy::builder()
        .pool_size(pool_size)
        .general(&format!("prepare_unnamed = {prepare}"))
        .start()
        .await
}

/// How often the server connection behind `observer` ran a statement with this text as a
/// prepared statement: `None` when it holds no such statement (an unnamed statement is
/// never listed). The observer shares a one-connection pool with the client it checks.
async fn server_statement_runs(observer: &tokio_postgres::Client, sql: &str) -> Option<i64> {
    observer
        .query_opt(
            "SELECT (generic_plans + custom_plans)::int8, name FROM pg_prepared_statements \
             WHERE statement = $1",
            &[&sql],
        )
        .await
        .expect("pg_prepared_statements")
        .map(|row| {
            let name: String = row.get(1);
            assert!(
                name.starts_with("sg"),
                "statement {name:?} is not shardgate's"
            );
            row.get(0)
        })
}

/// `prepare_unnamed = true`: the second Parse of the same unnamed text prepares it on the
/// server under its global name, and later executions reuse that statement (the server
/// counts their runs) with the same answers; a Describe of the unnamed statement still
/// describes it. Without the setting the server never holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_unnamed_statement_is_prepared_on_the_server() {
    if shardgate_e2e::skip_in_direct_mode("repeated_unnamed_statement_is_prepared_on_the_server") {
        return;
    }
    for prepare in [true, false] {
        let proxy = proxy_preparing_unnamed(1, prepare).await;
        let observer = connect(&proxy.url()).await.unwrap();
        let mut client = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
        let marker = unique_name("prep_unnamed");
        let sql = format!("SELECT $1::int4 * 2 AS r /* {marker} */");

        for round in 1..=5i64 {
            let v = (round * 10).to_string();
            let r = run_unnamed(&mut client, &sql, &[Some(&v)]).await;
            assert_eq!(
                command_tags(&r),
                ['1', '2', 'T', 'D', 'C', 'Z'],
                "prepare_unnamed = {prepare}, round {round}: {r:?}"
            );
            assert_eq!(Msg::rows(&r), [[Some((round * 20).to_string())]]);
            let runs = server_statement_runs(&observer, &sql).await;
            // Round 1 goes as sent; from round 2 on, one prepared statement serves them.
            let want = (prepare && round >= 2).then_some(round - 1);
            assert_eq!(runs, want, "prepare_unnamed = {prepare}, round {round}");
        }

        client.parse("", &sql, &[]);
        client.describe(b'S', "");
        client.sync();
        let r = client.round_trip().await.expect("describe");
        assert_eq!(command_tags(&r), ['1', 't', 'T', 'Z'], "{r:?}");
        client.terminate().await;
    }
}

/// A table change that alters the result columns of a statement prepared on the server
/// fails its next run with 0A000 (as Postgres does for any prepared statement); shardgate
/// then prepares it afresh at its next use on that connection (with or without a Parse
/// from the client), which sees the new column. Also for a client pinned to its connection
/// (LISTEN), which keeps the same one throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_prepared_statement_fails_once_then_recovers() {
    if shardgate_e2e::skip_in_direct_mode("stale_prepared_statement_fails_once_then_recovers") {
        return;
    }
    for pinned in [false, true] {
        // Unpinned, one connection makes sure every run meets the stale statement; pinned,
        // the client holds its own and the table changes on the other.
        let proxy = proxy_preparing_unnamed(if pinned { 2 } else { 1 }, true).await;
        let t = unique_name("e2e_stale");
        let admin = connect(&proxy.url()).await.unwrap();
        admin
            .batch_execute(&format!(
                "CREATE TABLE {t} (a int); INSERT INTO {t} VALUES (1)"
            ))
            .await
            .unwrap();
        let mut client = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
        if pinned {
            let r = client.simple_query(&format!("LISTEN {t}")).await.unwrap();
            assert!(Msg::first_error(&r).is_none(), "{r:?}");
        }
        let sql = format!("SELECT * FROM {t}");
        for _ in 0..2 {
            let r = run_unnamed(&mut client, &sql, &[]).await;
            assert_eq!(Msg::rows(&r), [[Some("1".to_string())]], "{r:?}");
        }
        admin
            .batch_execute(&format!("ALTER TABLE {t} ADD COLUMN b int DEFAULT 7"))
            .await
            .unwrap();

        let r = run_unnamed(&mut client, &sql, &[]).await;
        let err = Msg::first_error(&r).unwrap_or_else(|| panic!("stale plan answered: {r:?}"));
        assert_eq!(
            err.error_code().as_deref(),
            Some("0A000"),
            "pinned {pinned}: {r:?}"
        );
        // Bound again without a Parse, the statement is prepared afresh on the connection
        // (unlike on Postgres, where it keeps failing until the client prepares it again).
        client.bind_text("", "", &[]);
        client.describe(b'P', "");
        client.execute("", 0);
        client.sync();
        let r = client.round_trip().await.expect("bind only");
        assert_eq!(
            Msg::rows(&r),
            [[Some("1".to_string()), Some("7".to_string())]],
            "pinned {pinned}, bind only: {r:?}"
        );
        for _ in 0..2 {
            let r = run_unnamed(&mut client, &sql, &[]).await;
            assert_eq!(
                Msg::rows(&r),
                [[Some("1".to_string()), Some("7".to_string())]],
                "pinned {pinned}, after the failed run: {r:?}"
            );
        }
        client.terminate().await;
    }
}

/// Two clients on a one-connection pool; the first has run `SELECT 'a secret'` as its
/// unnamed statement, which the server connection still holds.
async fn after_a_secret() -> (Proxy, RawConn, RawConn) {
    let proxy = Proxy::builder().pool_size(1).start().await;
    let mut a = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
    let b = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
    let r = run_unnamed(&mut a, "SELECT 'a secret'::text", &[]).await;
    assert_eq!(Msg::rows(&r), [[Some("a secret".to_string())]], "{r:?}");
    (proxy, a, b)
}

/// A client that binds or describes the unnamed statement without having parsed one gets
/// Postgres's error (26000), never the unnamed statement another client left on the
/// shared server connection; that client can still run its own afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unnamed_statement_of_another_client_is_never_used() {
    let (_proxy, mut a, mut b) = after_a_secret().await;

    b.bind_text("", "", &[]);
    b.execute("", 0);
    b.sync();
    let r = b.round_trip().await.expect("bind without parse");
    assert!(
        Msg::rows(&r).is_empty(),
        "another client's statement ran: {r:?}"
    );
    let err = Msg::first_error(&r).unwrap_or_else(|| panic!("no error: {r:?}"));
    assert_eq!(err.error_code().as_deref(), Some("26000"), "{r:?}");

    b.describe(b'S', "");
    b.sync();
    let r = b.round_trip().await.expect("describe without parse");
    assert!(
        !r.iter().any(|m| m.tag == b'T'),
        "another client's statement: {r:?}"
    );
    let err = Msg::first_error(&r).unwrap_or_else(|| panic!("no error: {r:?}"));
    assert_eq!(err.error_code().as_deref(), Some("26000"), "{r:?}");

    a.bind_text("", "", &[]);
    a.execute("", 0);
    a.sync();
    let r = a
        .round_trip()
        .await
        .expect("a binds its own statement again");
    assert_eq!(Msg::rows(&r), [[Some("a secret".to_string())]], "{r:?}");
    a.terminate().await;
    b.terminate().await;
}

/// A Bind of the unnamed statement whose Parse the server skipped: Postgres answers 26000
/// (the client has none); shardgate may also run the client's own text again. Never
/// anything else.
fn own_statement_or_none(r: &[Msg], own: &str) {
    match Msg::first_error(r) {
        Some(err) => assert_eq!(err.error_code().as_deref(), Some("26000"), "{r:?}"),
        None => assert_eq!(Msg::rows(r), [[Some(own.to_string())]], "{r:?}"),
    }
}

/// An unnamed Parse the server skipped (an earlier message of the batch failed) leaves the
/// connection's unnamed statement as it was, another client's: a later Bind of the client's
/// own unnamed statement must prepare that again, never bind the one left there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skipped_unnamed_parse_never_binds_another_clients_statement() {
    let (_proxy, mut a, mut b) = after_a_secret().await;

    // The Execute of a portal that does not exist fails; the server skips the Parse.
    b.execute("no_such_portal", 0);
    b.parse("", "SELECT 'b'::text", &[]);
    b.sync();
    let r = b.round_trip().await.expect("failing batch");
    let err = Msg::first_error(&r).unwrap_or_else(|| panic!("no error: {r:?}"));
    assert_eq!(err.error_code().as_deref(), Some("34000"), "{r:?}");

    b.bind_text("", "", &[]);
    b.execute("", 0);
    b.sync();
    let r = b.round_trip().await.expect("bind after the skipped parse");
    own_statement_or_none(&r, "b");

    // The same, pipelined: the Bind goes out before the error of the batch before it is
    // back, so shardgate cannot yet know the Parse was skipped.
    let r = run_unnamed(&mut a, "SELECT 'a secret'::text", &[]).await;
    assert_eq!(Msg::rows(&r), [[Some("a secret".to_string())]], "{r:?}");
    b.execute("no_such_portal", 0);
    b.parse("", "SELECT 'c'::text", &[]);
    b.sync();
    b.bind_text("", "", &[]);
    b.execute("", 0);
    b.sync();
    let first = b.round_trip().await.expect("pipelined failing batch");
    let err = Msg::first_error(&first).unwrap_or_else(|| panic!("no error: {first:?}"));
    assert_eq!(err.error_code().as_deref(), Some("34000"), "{first:?}");
    let second = b.read_until_ready().await.expect("pipelined bind");
    own_statement_or_none(&second, "c");
    a.terminate().await;
    b.terminate().await;
}

/// shardgate's own simple queries on a connection (here the settings it restores for a
/// client with its own `SET`) destroy the server's unnamed statement as any simple query
/// does: a client's Bind of its unnamed statement there still finds it (parsed again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unnamed_statement_survives_settings_sync() {
    let proxy = Proxy::builder().pool_size(1).start().await;
    let mut a = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
    let mut b = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
    let r = b
        .simple_query("SET statement_timeout = 5000")
        .await
        .unwrap();
    assert!(Msg::first_error(&r).is_none(), "{r:?}");
    b.parse("", "SELECT 'b'::text", &[]);
    b.describe(b'S', "");
    b.sync();
    let r = b.round_trip().await.expect("parse/describe");
    assert!(Msg::first_error(&r).is_none(), "{r:?}");

    // A has the default settings: the connection is reset for it, then set for B again.
    // (A named statement: a Query or an unnamed Parse of A's would replace B's anyway.)
    a.parse("one", "SELECT 1", &[]);
    a.bind_text("", "one", &[]);
    a.execute("", 0);
    a.sync();
    let r = a.round_trip().await.expect("a's statement");
    assert_eq!(Msg::rows(&r), [[Some("1".to_string())]], "{r:?}");

    b.bind_text("", "", &[]);
    b.execute("", 0);
    b.sync();
    let r = b.round_trip().await.expect("bind");
    assert_eq!(Msg::rows(&r), [[Some("b".to_string())]], "{r:?}");
    a.terminate().await;
    b.terminate().await;
}

/// An error answered before the client's Sync has gone out (the batch ended by Flush):
/// the server skips everything up to that Sync, and shardgate must expect no answers
/// for the messages in between, or the connection stays tied to the client once its
/// transaction is over and the next client of a one-connection pool waits in vain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn error_before_sync_leaves_the_connection_reusable() {
    if shardgate_e2e::skip_in_direct_mode("error_before_sync_leaves_the_connection_reusable") {
        return;
    }
    let proxy = Proxy::builder()
        .pool_size(1)
        .checkout_timeout("3s")
        .start()
        .await;
    let mut a = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
    let r = a.simple_query("BEGIN").await.unwrap();
    assert!(Msg::first_error(&r).is_none(), "{r:?}");

    a.execute("no_such_portal", 0);
    a.buf().extend_from_slice(b"H\0\0\0\x04"); // Flush
    a.flush().await.unwrap();
    let err = a
        .read_msg()
        .await
        .unwrap()
        .expect("an answer to the failed Execute");
    assert_eq!(err.error_code().as_deref(), Some("34000"), "{err:?}");

    // Skipped by the server up to the Sync, which it answers alone.
    a.parse("", "SELECT 1", &[]);
    a.bind_text("", "", &[]);
    a.execute("", 0);
    a.sync();
    let r = a.round_trip().await.expect("the rest of the batch");
    assert_eq!(command_tags(&r), ['Z'], "{r:?}");
    assert_eq!(r[0].ready_status(), b'E', "{r:?}");
    let r = a.simple_query("ROLLBACK").await.unwrap();
    assert!(Msg::first_error(&r).is_none(), "{r:?}");

    let mut b = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
    let r = b.simple_query("SELECT 2").await.unwrap();
    assert_eq!(Msg::rows(&r), [[Some("2".to_string())]], "{r:?}");
    a.terminate().await;
    b.terminate().await;
}

/// tokio-postgres's `copy_in` sends Bind, Execute and Sync, then the data, CopyDone and
/// another Sync. The server ignores a Sync that reaches it in copy-in mode and answers
/// only the last one. shardgate once waited for both: every later answer was matched one
/// message late, and the connection stayed tied to the client (the next client of a
/// one-connection pool got 53300). Also a COPY the server rejects midway.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_in_by_the_extended_protocol_leaves_the_connection_reusable() {
    use bytes::Bytes;
    use futures_util::SinkExt;
    let proxy = Proxy::builder()
        .pool_size(1)
        .checkout_timeout("3s")
        .start()
        .await;
    let t = unique_name("e2e_copy_ext");
    let a = connect(&proxy.url()).await.unwrap();
    a.batch_execute(&format!("CREATE TABLE {t} (k int, v text)"))
        .await
        .unwrap();
    for round in 1..=3 {
        let sink = a
            .copy_in(&format!("COPY {t} FROM STDIN"))
            .await
            .expect("COPY through the extended protocol");
        futures_util::pin_mut!(sink);
        sink.send(Bytes::from(format!("{round}\trow {round}\n")))
            .await
            .expect("send COPY data");
        assert_eq!(sink.finish().await.expect("finish COPY"), 1);
        // The copying client's next answer is its own, in step.
        let count = format!("SELECT count(*) FROM {t}");
        assert_eq!(simple_value(&a, &count).await.unwrap(), round.to_string());
        // Another client gets the one server connection.
        let b = connect(&proxy.url())
            .await
            .unwrap_or_else(|e| panic!("second client after COPY round {round}: {e}"));
        assert_eq!(simple_value(&b, &count).await.unwrap(), round.to_string());
    }

    // Data the server rejects: an error, and the connection is fine afterwards.
    let sink = a
        .copy_in(&format!("COPY {t} FROM STDIN"))
        .await
        .expect("COPY through the extended protocol");
    futures_util::pin_mut!(sink);
    let sent = sink.send(Bytes::from_static(b"not a number\tx\n")).await;
    let err = match sent {
        Err(e) => e,
        Ok(()) => sink.finish().await.expect_err("bad COPY data accepted"),
    };
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("22P02"),
        "bad COPY data: {err:?}"
    );
    assert_eq!(
        simple_value(&a, &format!("SELECT count(*) FROM {t}"))
            .await
            .unwrap(),
        "3"
    );
    let b = connect(&proxy.url())
        .await
        .expect("client after a failed COPY");
    assert_eq!(simple_value(&b, "SELECT 7").await.unwrap(), "7");
    a.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

/// The tags of a response, as text: `"12CEZ"`.
fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

/// Bind, Execute and Sync of the statement `name` (after what `c` has buffered); the
/// messages up to ReadyForQuery.
async fn run_named(c: &mut RawConn, name: &str) -> Vec<Msg> {
    c.bind_text("", name, &[]);
    c.execute("", 0);
    c.sync();
    c.round_trip()
        .await
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

/// A statement name the client already uses fails the transaction where Postgres fails
/// it: an INSERT earlier in the same batch is rolled back, and an open block is aborted.
/// (shardgate once refused the Parse itself while the server, which never saw it,
/// committed the INSERT the client was told had failed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_statement_name_fails_the_transaction_as_on_postgres() {
    let proxy = Proxy::builder().pool_size(1).start().await;
    let t = unique_name("e2e_dup_stmt");
    let mut c = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
    let r = c.simple_query(&format!("CREATE TABLE {t} (k int)")).await;
    assert!(Msg::first_error(&r.expect("create")).is_none());
    c.parse("s1", "SELECT 1", &[]);
    c.sync();
    let r = c.round_trip().await.expect("first Parse");
    assert_eq!(tags(&r), "1Z", "{r:?}");
    let insert_then_duplicate = |c: &mut RawConn, k: &str| {
        c.parse("", &format!("INSERT INTO {t} VALUES ({k})"), &[]);
        c.bind_text("", "", &[]);
        c.execute("", 0);
        c.parse("s1", "SELECT 2", &[]);
        c.bind_text("", "s1", &[]);
        c.execute("", 0);
        c.sync();
    };
    let count = format!("SELECT count(*) FROM {t}");

    // In an implicit transaction: the INSERT is rolled back.
    insert_then_duplicate(&mut c, "1");
    let r = c.round_trip().await.expect("implicit transaction");
    assert_eq!(tags(&r), "12CEZ", "{r:?}");
    assert_eq!(r[3].error_code().as_deref(), Some("42P05"), "{r:?}");
    assert_eq!(r[4].ready_status(), b'I');
    let r = c.simple_query(&count).await.expect("count");
    assert_eq!(Msg::rows(&r), [[Some("0".to_string())]], "{r:?}");

    // In a transaction block: the block is aborted, and its COMMIT rolls back.
    let r = c.simple_query("BEGIN").await.expect("BEGIN");
    assert!(Msg::first_error(&r).is_none(), "{r:?}");
    insert_then_duplicate(&mut c, "2");
    let r = c.round_trip().await.expect("transaction block");
    assert_eq!(tags(&r), "12CEZ", "{r:?}");
    assert_eq!(r[3].error_code().as_deref(), Some("42P05"), "{r:?}");
    assert_eq!(r[4].ready_status(), b'E');
    let r = c.simple_query("SELECT 1").await.expect("in failed block");
    let code = Msg::first_error(&r).and_then(Msg::error_code);
    assert_eq!(code.as_deref(), Some("25P02"), "{r:?}");
    let r = c.simple_query("COMMIT").await.expect("COMMIT");
    assert!(
        r.iter()
            .any(|m| m.tag == b'C' && m.body.starts_with(b"ROLLBACK")),
        "{r:?}"
    );
    let r = c.simple_query(&count).await.expect("count");
    assert_eq!(Msg::rows(&r), [[Some("0".to_string())]], "{r:?}");

    // The statement the name belongs to is still the first one.
    let r = run_named(&mut c, "s1").await;
    assert_eq!(Msg::rows(&r), [[Some("1".to_string())]], "{r:?}");
    c.terminate().await;
}

/// Parse and Close of named statements that shardgate answers itself (the statement is
/// prepared on the server under its own name) are undone when an earlier message of the
/// batch fails, as Postgres never runs them: the closed statement still works, and the
/// name parsed in the failed batch is free to parse again (not 42P05).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_parsed_or_closed_after_a_failure_are_as_on_postgres() {
    let proxy = Proxy::builder().pool_size(1).start().await;
    let mut c = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
    c.parse("a", "SELECT 1", &[]);
    c.sync();
    let r = c.round_trip().await.expect("Parse a");
    assert_eq!(tags(&r), "1Z", "{r:?}");
    c.parse("", "SELECT 1/0", &[]);
    c.bind_text("", "", &[]);
    c.execute("", 0);
    // The same text as "a": already prepared on the connection.
    c.parse("b", "SELECT 1", &[]);
    c.close(b'S', "a");
    c.sync();
    let r = c.round_trip().await.expect("failing batch");
    // (Postgres folds 1/0 when it plans the statement, at Bind.)
    assert_eq!(tags(&r), "1EZ", "{r:?}");
    assert_eq!(r[1].error_code().as_deref(), Some("22012"), "{r:?}");
    // "a" was not closed.
    let r = run_named(&mut c, "a").await;
    assert_eq!(Msg::rows(&r), [[Some("1".to_string())]], "{r:?}");
    // "b" was never made: binding it fails, and it parses now.
    let r = run_named(&mut c, "b").await;
    let code = Msg::first_error(&r).and_then(Msg::error_code);
    assert_eq!(code.as_deref(), Some("26000"), "{r:?}");
    c.parse("b", "SELECT 2", &[]);
    let r = run_named(&mut c, "b").await;
    assert_eq!(Msg::rows(&r), [[Some("2".to_string())]], "{r:?}");
    // A Parse that fails, then a Close of its name: the name stays free.
    c.parse("c", "SELECT * FROM e2e_no_such_table", &[]);
    c.close(b'S', "c");
    c.sync();
    let r = c.round_trip().await.expect("failing Parse");
    let code = Msg::first_error(&r).and_then(Msg::error_code);
    assert_eq!(code.as_deref(), Some("42P01"), "{r:?}");
    c.parse("c", "SELECT 3", &[]);
    let r = run_named(&mut c, "c").await;
    assert_eq!(Msg::rows(&r), [[Some("3".to_string())]], "{r:?}");
    c.terminate().await;
}

/// SQL `DEALLOCATE name` of a statement prepared by protocol (psycopg 3 with libpq before
/// 17 evicts its statements this way) works as on Postgres, inside a transaction block too,
/// though shardgate keeps the statement under another name on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_deallocate_of_a_protocol_statement() {
    let proxy = Proxy::builder().pool_size(1).start().await;
    let mut c = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
    let parse = |c: &mut RawConn| {
        c.parse("_pg3_0", "SELECT 1", &[]);
        c.sync();
    };
    for (begin, status) in [(false, b'I'), (true, b'T')] {
        parse(&mut c);
        let r = c.round_trip().await.expect("Parse");
        assert_eq!(tags(&r), "1Z", "{r:?}");
        if begin {
            c.simple_query("BEGIN").await.expect("BEGIN");
        }
        let r = c
            .simple_query("DEALLOCATE \"_pg3_0\"")
            .await
            .expect("DEALLOCATE");
        assert_eq!(tags(&r), "CZ", "{r:?}");
        assert_eq!(&r[0].body[..], b"DEALLOCATE\0", "{r:?}");
        assert_eq!(r[1].ready_status(), status);
        let r = run_named(&mut c, "_pg3_0").await;
        let code = Msg::first_error(&r).and_then(Msg::error_code);
        assert_eq!(code.as_deref(), Some("26000"), "{r:?}");
        if begin {
            c.simple_query("ROLLBACK").await.expect("ROLLBACK");
        }
    }
    // An unknown name is the server's error, as before.
    let r = c.simple_query("DEALLOCATE _pg3_0").await.expect("again");
    let code = Msg::first_error(&r).and_then(Msg::error_code);
    assert_eq!(code.as_deref(), Some("26000"), "{r:?}");
    c.terminate().await;
}

/// A login needs no server connection once a login with the same startup settings was
/// seen, as with PgBouncer: with the only connection held in a transaction, a client logs
/// in at once and gets the same server parameters, and its query runs when the connection
/// comes free. (Before, every login took a server connection, so it waited behind the
/// transaction and failed at the login timeout.) Startup settings not seen before are
/// still applied on a server first, so a value Postgres refuses refuses the login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_log_in_while_every_connection_is_busy() {
    if direct_mode() {
        return;
    }
    let proxy = Proxy::builder()
        .pool_size(1)
        .checkout_timeout("30s")
        .client_login_timeout("5s")
        .start()
        .await;
    let login = || async {
        let mut c = RawConn::connect(proxy.port()).await.expect("connect");
        let r = c.startup("app", "app", Some("app")).await;
        (c, r)
    };
    let (first, r) = login().await;
    r.expect("first login");
    assert!(
        first.params.contains_key("server_version"),
        "{:?}",
        first.params
    );

    let holder = connect(&proxy.url()).await.unwrap();
    holder.simple_query("BEGIN").await.unwrap();
    assert_eq!(
        simple_value(&holder, "SELECT 'held'").await.unwrap(),
        "held"
    );

    let (mut second, r) = tokio::time::timeout(std::time::Duration::from_secs(3), login())
        .await
        .expect("a login waited for the busy connection");
    r.unwrap_or_else(|e| panic!("login while the connection is busy: {e:?}"));
    assert_eq!(
        second.params, first.params,
        "parameters of the second login"
    );
    let query = tokio::spawn(async move {
        let msgs = second.simple_query("SELECT 'second'").await.expect("query");
        Msg::rows(&msgs)
    });
    holder.simple_query("COMMIT").await.unwrap();
    let rows = tokio::time::timeout(std::time::Duration::from_secs(10), query)
        .await
        .expect("the second client's query never ran")
        .unwrap();
    assert_eq!(rows, vec![vec![Some("second".to_string())]]);

    let mut third = RawConn::connect(proxy.port()).await.expect("connect");
    let refused = third
        .startup_with(
            &[
                ("user", "app"),
                ("database", "app"),
                ("DateStyle", "nonsense"),
            ],
            Some("app"),
        )
        .await
        .expect_err("a DateStyle Postgres refuses was accepted");
    assert_eq!(refused.code().as_deref(), Some("22023"), "{refused:?}");
}
