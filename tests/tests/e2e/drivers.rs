//! Real client drivers in transaction pooling: asyncpg (its statement cache on),
//! psycopg 3 (server-side prepared from the second run), psycopg2 (SQL PREPARE and a
//! temporary table across transactions), node-postgres (named statements) and pgjdbc
//! (server-prepared statements, portals read a batch at a time). Each check, a program
//! in `tests/drivers`, runs 20 clients at once over a pool of 2 server connections and
//! checks results, session settings and SQLSTATEs itself; see the programs for the list.
//! The sharded counterparts are in `tests/tests/sharding.rs`.

use shardgate_e2e::{Driver, Proxy};

async fn pooled(driver: Driver) {
    let proxy = Proxy::builder().pool_size(2).start().await;
    let url = format!("postgres://app:app@127.0.0.1:{}/app", proxy.port());
    driver.check("pooled", &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_with_its_statement_cache() {
    pooled(Driver::Asyncpg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_prepared_and_binary() {
    pooled(Driver::Psycopg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg2_sql_prepare_and_temp_tables() {
    pooled(Driver::Psycopg2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_statements() {
    pooled(Driver::NodePostgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_server_prepared_and_portals() {
    pooled(Driver::Jdbc).await;
}
