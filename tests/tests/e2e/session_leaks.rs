//! Session state that once crossed from one client to the next in transaction pooling
//! (found by review): a role kept through `RESET ALL`, settings restored wrongly, and
//! session-bound things (locks, temporary tables) taken by statements shardgate did not
//! see complete. Each test uses a one-connection pool, so the next client always gets the
//! connection the first one used, unless the first one is (rightly) pinned to it.

use shardgate_e2e::{
    connect, connect_with_messages, direct_mode, simple_value, skip_in_direct_mode, unique_name,
    Cluster, Proxy,
};
use tokio_postgres::Client;

async fn one_connection_pool() -> Proxy {
    Proxy::builder()
        .pool_size(1)
        .checkout_timeout("1s")
        .start()
        .await
}

/// Two clients of `proxy`: on a one-connection pool, each gets the connection the other
/// used last.
async fn two_clients(proxy: &Proxy) -> (Client, Client) {
    let a = connect(&proxy.url()).await.unwrap();
    let b = connect(&proxy.url()).await.unwrap();
    (a, b)
}

async fn value(c: &Client, sql: &str) -> String {
    simple_value(c, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// What a fresh session shows for a setting.
async fn default_of(name: &str) -> String {
    let direct = connect(&Cluster::shared().primary_url(0, "app"))
        .await
        .unwrap();
    value(&direct, &format!("SHOW {name}")).await
}

/// The error a query gets, as a SQLSTATE.
async fn error_code(c: &Client, sql: &str) -> String {
    let e = c
        .simple_query(sql)
        .await
        .expect_err(&format!("{sql} succeeded"));
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// `RESET ALL` does not reset a role; the next client must not run as it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_survives_reset_all_but_never_reaches_another_client() {
    let proxy = one_connection_pool().await;
    let role = unique_name("e2e_reader");
    Cluster::shared()
        .superuser_sql(
            Cluster::shared().primary_port(0),
            "app",
            &[
                &format!("CREATE ROLE {role}"),
                &format!("GRANT {role} TO app"),
            ],
        )
        .await;
    let (a, b) = two_clients(&proxy).await;
    a.batch_execute(&format!("SET ROLE {role}")).await.unwrap();
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(value(&b, "SELECT current_user").await, "app");
    // As on Postgres, A still has its role.
    assert_eq!(value(&a, "SELECT current_user").await, role);
    a.batch_execute("RESET ROLE").await.unwrap();
    assert_eq!(value(&a, "SELECT current_user").await, "app");
}

/// A trailing `--` comment in a SET once swallowed the rest of the statements that
/// restore a client's settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comment_after_a_set_value_does_not_break_the_restore() {
    let proxy = one_connection_pool().await;
    let (c, d) = two_clients(&proxy).await;
    d.batch_execute("SET work_mem = '7MB'").await.unwrap();
    c.batch_execute("SET search_path = public -- the tenant's path")
        .await
        .unwrap();
    c.batch_execute("SET work_mem = '1MB'").await.unwrap();
    assert_eq!(value(&d, "SHOW work_mem").await, "7MB");
    assert_eq!(value(&c, "SHOW work_mem").await, "1MB");
    assert_eq!(value(&c, "SHOW search_path").await, "public");
}

/// `RESET TIME ZONE` and `SET TIME ZONE LOCAL` go back to the default; `SET TIME ZONE
/// INTERVAL ...` (no `SET timezone =` form) keeps the client on its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_zone_resets_are_followed() {
    let proxy = one_connection_pool().await;
    let default = default_of("TimeZone").await;
    let (a, b) = two_clients(&proxy).await;
    for reset in [
        "RESET TIME ZONE",
        "SET TIME ZONE LOCAL",
        "SET TIME ZONE DEFAULT",
    ] {
        a.batch_execute("SET TIME ZONE 'Asia/Tokyo'").await.unwrap();
        a.batch_execute(reset).await.unwrap();
        assert_eq!(value(&b, "SELECT 1").await, "1");
        assert_eq!(value(&a, "SHOW TimeZone").await, default, "after {reset}");
    }
    a.batch_execute("SET search_path = pg_catalog")
        .await
        .unwrap();
    a.batch_execute("SET TIME ZONE INTERVAL '+02:00' HOUR TO MINUTE")
        .await
        .unwrap();
    let tz = value(&a, "SHOW TimeZone").await;
    if !direct_mode() {
        // Pinned: the other client waits for the only connection in vain.
        assert_eq!(error_code(&b, "SELECT 1").await, "53300");
    }
    assert_eq!(value(&a, "SHOW TimeZone").await, tz);
    assert_eq!(value(&a, "SHOW search_path").await, "pg_catalog");
    a.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(value(&b, "SHOW TimeZone").await, default);
}

/// A simple query with several statements that fails after some of them ran: what they
/// left on the session must not reach the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_before_a_failure_in_one_query_do_not_leak() {
    let proxy = one_connection_pool().await;
    let default_path = default_of("search_path").await;
    let (a, b) = two_clients(&proxy).await;
    let e = a
        .batch_execute("BEGIN; SET search_path = pg_catalog; COMMIT; SELECT 1/0")
        .await
        .expect_err("division by zero");
    assert_eq!(e.code().map(|c| c.code()), Some("22012"));
    assert_eq!(value(&b, "SHOW search_path").await, default_path);
}

/// A session lock taken by a statement that then failed (or by one stopped by a row
/// limit) is held by the session: the client stays on its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_taken_before_a_failure_pins_the_client() {
    if skip_in_direct_mode("lock_taken_before_a_failure_pins_the_client") {
        return;
    }
    let key = rand::random::<u32>() as i64;
    // (what, SQL, by the extended protocol)
    for (what, sql, extended) in [
        (
            "two statements in one simple query",
            format!("SELECT pg_advisory_lock({key}); SELECT 1/0"),
            false,
        ),
        (
            "one statement, extended protocol",
            format!("SELECT pg_advisory_lock({key}), 1/(random() * 0)::int"),
            true,
        ),
    ] {
        let proxy = one_connection_pool().await;
        let (a, b) = two_clients(&proxy).await;
        let e = if extended {
            a.query(sql.as_str(), &[]).await.expect_err(what)
        } else {
            a.batch_execute(&sql).await.expect_err(what)
        };
        assert_eq!(e.code().map(|c| c.code()), Some("22012"), "{what}: {e}");
        // Without the pin B would get A's connection, and the lock with it.
        let try_lock = format!("SELECT pg_try_advisory_lock({key})");
        assert_eq!(error_code(&b, &try_lock).await, "53300", "{what}");
        // Released, A lets the connection go: B gets it, and the lock is free.
        let unlock = "SELECT pg_advisory_unlock_all()";
        a.batch_execute(unlock).await.unwrap();
        assert_eq!(value(&b, &try_lock).await, "t", "{what}");
        b.batch_execute(unlock).await.unwrap();
    }
}

/// An Execute with a row limit (a JDBC fetch size) runs the statement partly; a lock it
/// took holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_taken_by_a_suspended_portal_pins_the_client() {
    use shardgate_e2e::{Msg, RawConn};
    if skip_in_direct_mode("lock_taken_by_a_suspended_portal_pins_the_client") {
        return;
    }
    let proxy = one_connection_pool().await;
    let key = rand::random::<u32>() as i64;
    let mut a = RawConn::login(proxy.port(), "app", Some("app"), "app").await;
    let b = connect(&proxy.url()).await.unwrap();
    let r = a.simple_query("BEGIN").await.unwrap();
    assert!(Msg::first_error(&r).is_none(), "{r:?}");
    a.parse(
        "",
        &format!("SELECT pg_advisory_lock({key}) FROM generate_series(1, 3)"),
        &[],
    );
    a.bind_text("", "", &[]);
    a.execute("", 1);
    a.sync();
    let r = a.round_trip().await.unwrap();
    assert!(r.iter().any(|m| m.tag == b's'), "no PortalSuspended: {r:?}");
    let r = a.simple_query("COMMIT").await.unwrap();
    assert!(Msg::first_error(&r).is_none(), "{r:?}");
    let try_lock = format!("SELECT pg_try_advisory_lock({key})");
    assert_eq!(error_code(&b, &try_lock).await, "53300");
    a.terminate().await;
}

/// Temporary tables made without `CREATE TEMP`: `SELECT ... INTO TEMP` and a table in
/// the `pg_temp` schema by name. Their rows must never reach another client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_tables_made_other_ways_pin_the_client() {
    for make in [
        "SELECT 'secret of A'::text AS s INTO TEMP {t}",
        "CREATE TABLE pg_temp.{t} AS SELECT 'secret of A'::text AS s",
    ] {
        let proxy = one_connection_pool().await;
        let t = unique_name("e2e_tmp");
        let (a, b) = two_clients(&proxy).await;
        a.batch_execute(&make.replace("{t}", &t)).await.unwrap();
        let seen = b.simple_query(&format!("SELECT s FROM {t}")).await;
        match seen {
            Ok(rows) => panic!("{make}: B read A's temporary table: {rows:?}"),
            Err(e) => {
                let code = e.code().map(|c| c.code().to_string());
                // Postgres: B has no such table; shardgate: A holds the only connection.
                assert!(
                    matches!(code.as_deref(), Some("42P01") | Some("53300")),
                    "{make}: {e}"
                );
            }
        }
        assert_eq!(
            value(&a, &format!("SELECT s FROM {t}")).await,
            "secret of A"
        );
    }
}

/// `set_config(name, value, true)` lasts only for the transaction (the usual row-level
/// security pattern): it must not keep the client on its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_local_set_config_does_not_pin() {
    let proxy = one_connection_pool().await;
    let (a, b) = two_clients(&proxy).await;
    a.batch_execute("BEGIN").await.unwrap();
    let got: Option<String> = a
        .query_one("SELECT set_config('e2e.tenant', $1, true)", &[&"42"])
        .await
        .unwrap()
        .get(0);
    assert_eq!(got.as_deref(), Some("42"));
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        value(
            &b,
            "SELECT coalesce(current_setting('e2e.tenant', true), '')"
        )
        .await,
        ""
    );
}

/// A release that is rolled back is no release: `BEGIN; UNLISTEN *; ROLLBACK` still
/// listens on Postgres, so the client keeps its connection (once it was handed to the next
/// client, which then got the notifications). Committed, the release frees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_unlisten_keeps_the_client_pinned() {
    if skip_in_direct_mode("a_rolled_back_unlisten_keeps_the_client_pinned") {
        return;
    }
    let proxy = one_connection_pool().await;
    let channel = unique_name("e2e_unlisten");
    let (a, mut notes) = connect_with_messages(&proxy.url()).await.unwrap();
    let b = connect(&proxy.url()).await.unwrap();
    a.batch_execute(&format!("LISTEN {channel}")).await.unwrap();
    for release in ["UNLISTEN *", &format!("UNLISTEN {channel}")] {
        for step in ["BEGIN", release, "ROLLBACK"] {
            a.batch_execute(step).await.unwrap();
        }
        assert_eq!(error_code(&b, "SELECT 1").await, "53300", "{release}");
    }
    let direct = connect(&Cluster::shared().primary_url(0, "app"))
        .await
        .unwrap();
    direct
        .query("SELECT pg_notify($1, 'still listening')", &[&channel])
        .await
        .unwrap();
    // Delivered with the next answer A reads.
    assert_eq!(value(&a, "SELECT 1").await, "1");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, notes.recv()).await {
            Ok(Some(tokio_postgres::AsyncMessage::Notification(n))) => {
                assert_eq!(n.payload(), "still listening");
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no notification for A: {other:?}"),
        }
    }
    for step in ["BEGIN", "UNLISTEN *", "COMMIT"] {
        a.batch_execute(step).await.unwrap();
    }
    assert_eq!(value(&b, "SELECT 1").await, "1");
    // A release before a new LISTEN in one query: listening, so pinned.
    a.batch_execute(&format!("UNLISTEN *; LISTEN {channel}"))
        .await
        .unwrap();
    assert_eq!(error_code(&b, "SELECT 1").await, "53300");
}

/// A setting changed where shardgate cannot read it (PL/pgSQL in a DO block) never
/// reaches the next client of the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_changed_in_a_do_block_do_not_leak() {
    if skip_in_direct_mode("settings_changed_in_a_do_block_do_not_leak") {
        return;
    }
    let proxy = one_connection_pool().await;
    let default = default_of("work_mem").await;
    let (a, b) = two_clients(&proxy).await;
    for block in [
        "DO $$BEGIN PERFORM set_config('work_mem', '7MB', false); END$$",
        "DO $$BEGIN SET work_mem = '7MB'; END$$",
    ] {
        a.batch_execute(block).await.unwrap();
        assert_eq!(value(&b, "SHOW work_mem").await, default, "{block}");
    }
    // The client's own tracked settings still follow it.
    a.batch_execute("SET work_mem = '3MB'").await.unwrap();
    a.batch_execute("DO $$BEGIN SET statement_timeout = '9s'; END$$")
        .await
        .unwrap();
    assert_eq!(value(&b, "SHOW statement_timeout").await, "0");
    assert_eq!(value(&a, "SHOW work_mem").await, "3MB");
}

/// A timestamptz literal Postgres folds to a constant when it parses the statement, in
/// the time zone of that moment; and its value in Tokyo and in New York.
const EPOCH: &str = "SELECT extract(epoch FROM '2024-01-01 00:00'::timestamptz)::bigint";
const TOKYO_EPOCH: i64 = 1_704_034_800;
const NEW_YORK_EPOCH: i64 = 1_704_085_200;

/// `EPOCH` prepared by `c` (a named statement) and run.
async fn prepared_epoch(c: &Client) -> i64 {
    let s = c.prepare(EPOCH).await.unwrap();
    c.query_one(&s, &[]).await.unwrap().get(0)
}

/// A prepared statement keeps what the settings of its Parse made of its text: a time
/// literal is folded in the time zone of the moment, a table is found on the search path.
/// Clients whose such settings differ must not share one server-side statement, also when
/// the setting changed only for the transaction (`SET LOCAL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_keep_the_settings_they_were_parsed_under() {
    let proxy = one_connection_pool().await;
    let direct = connect(&Cluster::shared().primary_url(0, "app"))
        .await
        .unwrap();
    let default: i64 = direct.query_one(EPOCH, &[]).await.unwrap().get(0);
    let a = connect(&proxy.url()).await.unwrap();
    a.batch_execute("SET TIME ZONE 'Asia/Tokyo'").await.unwrap();
    assert_eq!(prepared_epoch(&a).await, TOKYO_EPOCH);
    let b = connect(&proxy.url()).await.unwrap();
    b.batch_execute("SET TIME ZONE 'America/New_York'")
        .await
        .unwrap();
    assert_eq!(prepared_epoch(&b).await, NEW_YORK_EPOCH);
    let c = connect(&proxy.url()).await.unwrap();
    c.batch_execute("BEGIN; SET LOCAL TIME ZONE 'Asia/Tokyo'")
        .await
        .unwrap();
    assert_eq!(prepared_epoch(&c).await, TOKYO_EPOCH);
    c.batch_execute("COMMIT").await.unwrap();
    let d = connect(&proxy.url()).await.unwrap();
    assert_eq!(prepared_epoch(&d).await, default);
    assert_eq!(prepared_epoch(&c).await, default);
    assert_eq!(prepared_epoch(&a).await, TOKYO_EPOCH);

    // Schema per tenant: the same text finds another table, with another column type.
    let (x, y) = (unique_name("e2e_tenant"), unique_name("e2e_tenant"));
    direct
        .batch_execute(&format!(
            "CREATE SCHEMA {x}; CREATE TABLE {x}.item (v int); INSERT INTO {x}.item VALUES (7);
             CREATE SCHEMA {y}; CREATE TABLE {y}.item (v text); INSERT INTO {y}.item VALUES ('seven')"
        ))
        .await
        .unwrap();
    a.batch_execute(&format!("SET search_path = {x}"))
        .await
        .unwrap();
    b.batch_execute(&format!("SET search_path = {y}"))
        .await
        .unwrap();
    let sa = a.prepare("SELECT v FROM item").await.unwrap();
    let sb = b.prepare("SELECT v FROM item").await.unwrap();
    let va: i32 = a.query_one(&sa, &[]).await.unwrap().get(0);
    let vb: String = b.query_one(&sb, &[]).await.unwrap().get(0);
    assert_eq!((va, vb.as_str()), (7, "seven"));
    direct
        .batch_execute(&format!("DROP SCHEMA {x} CASCADE; DROP SCHEMA {y} CASCADE"))
        .await
        .unwrap();
}

/// A client that changed its time zone after preparing a statement, and runs it on a
/// connection that no longer has it (evicted here), gets it prepared again there under
/// its new settings: that copy is its own, never found by another client of the old zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_again_under_new_settings_is_not_shared() {
    if skip_in_direct_mode("a_statement_prepared_again_under_new_settings_is_not_shared") {
        return;
    }
    let proxy = Proxy::builder()
        .pool_size(1)
        .checkout_timeout("1s")
        .general("server_prepared_statements = 1")
        .start()
        .await;
    let a = connect(&proxy.url()).await.unwrap();
    a.batch_execute("SET TIME ZONE 'Asia/Tokyo'").await.unwrap();
    let s = a.prepare(EPOCH).await.unwrap();
    let v: i64 = a.query_one(&s, &[]).await.unwrap().get(0);
    assert_eq!(v, TOKYO_EPOCH);
    // A second statement evicts the first from the one connection.
    let other = a.prepare("SELECT 2::bigint").await.unwrap();
    a.query_one(&other, &[]).await.unwrap();
    a.batch_execute("SET TIME ZONE 'America/New_York'")
        .await
        .unwrap();
    a.query_one(&s, &[]).await.unwrap();
    let b = connect(&proxy.url()).await.unwrap();
    b.batch_execute("SET TIME ZONE 'Asia/Tokyo'").await.unwrap();
    assert_eq!(prepared_epoch(&b).await, TOKYO_EPOCH);
}

/// A client that keeps its connection (a session advisory lock) through a DO block and
/// then commits a SET of its own: the connection's settings stay unknown, so the next
/// client still gets them reset. The SET used to make them count as known again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_left_by_a_do_block_stay_unknown_after_a_later_set() {
    if skip_in_direct_mode("settings_left_by_a_do_block_stay_unknown_after_a_later_set") {
        return;
    }
    let proxy = one_connection_pool().await;
    let default = default_of("work_mem").await;
    let (a, b) = two_clients(&proxy).await;
    a.batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    a.batch_execute("DO $$BEGIN SET work_mem = '7MB'; END$$")
        .await
        .unwrap();
    a.batch_execute("SET search_path = public").await.unwrap();
    assert_eq!(value(&a, "SHOW work_mem").await, "7MB");
    a.batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    assert_eq!(value(&b, "SHOW work_mem").await, default);
    assert_eq!(value(&a, "SHOW search_path").await, "public");
}

/// A client's non-ASCII setting is restored right on a connection another client left in
/// another client_encoding: Postgres reads a Query's text in the encoding the connection
/// has when the message arrives, so the encoding change goes first, in a message of its
/// own. Before, both went in one message and the value was read as LATIN1 (`"cafÃ©"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_are_restored_in_the_clients_encoding() {
    let proxy = one_connection_pool().await;
    let (c, d) = two_clients(&proxy).await;
    c.batch_execute("SET search_path = \"café\", public")
        .await
        .unwrap();
    d.batch_execute("SET client_encoding = 'LATIN1'")
        .await
        .unwrap();
    assert_eq!(value(&d, "SHOW client_encoding").await, "LATIN1");
    assert_eq!(value(&c, "SHOW search_path").await, "\"café\", public");
    assert_eq!(value(&c, "SHOW client_encoding").await, "UTF8");
    assert_eq!(value(&d, "SHOW client_encoding").await, "LATIN1");
    // Kept as UTF-8, the value is read as UTF8 even for a client now in LATIN1 (whose
    // client_encoding is then put back).
    c.batch_execute("SET client_encoding = 'LATIN1'")
        .await
        .unwrap();
    d.batch_execute("RESET client_encoding").await.unwrap();
    let same = "SELECT current_setting('search_path') = U&'\"caf\\00e9\", public'";
    assert_eq!(value(&c, same).await, "t");
    assert_eq!(value(&c, "SHOW client_encoding").await, "LATIN1");
}
