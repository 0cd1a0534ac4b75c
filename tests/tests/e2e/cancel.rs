//! Query cancel through shardgate: the cancelled query fails with 57014 within a
//! second, the client goes on working, and another client's query is not touched.

use std::time::{Duration, Instant};

use shardgate_e2e::{
    connect, simple_value, sqlstate, timing, unique_name, wait_for, Cluster, Proxy,
};
use tokio_postgres::{Client, NoTls};

/// Waits until a backend runs a query containing `marker`.
pub async fn wait_running(observer: &Client, marker: &str) -> i32 {
    let pattern = format!("%{marker}%");
    wait_for(
        &format!("query {marker} to run"),
        Duration::from_secs(5),
        || async {
            observer
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 AND state = 'active' \
                 AND pid <> pg_backend_pid()",
                    &[&pattern],
                )
                .await
                .unwrap()
                .map(|r| r.get::<_, i32>(0))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_stops_the_running_query() {
    let _timing = timing().await;
    let proxy = Proxy::builder().pool_size(2).start().await;
    let observer = connect(&Cluster::shared().primary_url(0, "app"))
        .await
        .unwrap();
    let client = connect(&proxy.url()).await.unwrap();
    let bystander = connect(&proxy.url()).await.unwrap();

    let other = unique_name("bystander");
    let other_query = format!("SELECT pg_sleep(1.5) /* {other} */");
    let bystander_run = tokio::spawn(async move {
        let r = bystander.simple_query(&other_query).await;
        (bystander, r)
    });
    wait_running(&observer, &other).await;

    let marker = unique_name("cancelme");
    let token = client.cancel_token();
    let query = format!("SELECT pg_sleep(10) /* {marker} */");
    let run = tokio::spawn(async move {
        let r = client.simple_query(&query).await;
        (client, r, Instant::now())
    });
    wait_running(&observer, &marker).await;

    let sent = Instant::now();
    token.cancel_query(NoTls).await.expect("send cancel");
    let (client, result, ended) = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("cancelled query still running after 5 s")
        .unwrap();
    let err = result.expect_err("pg_sleep(10) was not cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    let took = ended.duration_since(sent);
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");

    // The client goes on; the other client's query was not cancelled.
    assert_eq!(
        simple_value(&client, "SELECT 'after cancel'")
            .await
            .unwrap(),
        "after cancel"
    );
    let (bystander, r) = tokio::time::timeout(Duration::from_secs(5), bystander_run)
        .await
        .expect("bystander query hangs")
        .unwrap();
    r.expect("the bystander's query was hit by the cancel");
    assert_eq!(simple_value(&bystander, "SELECT 1").await.unwrap(), "1");
}
