//! A server backend that dies mid-query: the client gets an error (no hang) and
//! shardgate serves new queries on a fresh server connection.

use std::time::{Duration, Instant};

use shardgate_e2e::{connect, simple_value, timing, unique_name, Cluster, Proxy};

use crate::cancel::wait_running;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_killed_mid_query() {
    let _timing = timing().await;
    // One server connection: the next query cannot reuse anything but a new one.
    let proxy = Proxy::builder().pool_size(1).start().await;
    let cluster = Cluster::shared();
    let observer = connect(&cluster.primary_url(0, "app")).await.unwrap();
    let client = connect(&proxy.url()).await.unwrap();
    assert_eq!(simple_value(&client, "SELECT 1").await.unwrap(), "1");

    let marker = unique_name("killme");
    let query = format!("SELECT pg_sleep(5) /* {marker} */");
    let run = tokio::spawn(async move {
        let r = client.simple_query(&query).await;
        (client, r, Instant::now())
    });
    let pid = wait_running(&observer, &marker).await;
    let killed_at = Instant::now();
    cluster
        .superuser_sql(
            cluster.primary_port(0),
            "app",
            &[&format!("SELECT pg_terminate_backend({pid})")],
        )
        .await;

    let (client, result, ended) = tokio::time::timeout(Duration::from_secs(3), run)
        .await
        .expect("client still waiting 3 s after its server backend was terminated")
        .unwrap();
    let err = result.expect_err("query on a terminated backend succeeded");
    eprintln!(
        "client saw after {:?}: {err} (SQLSTATE {:?})",
        ended.duration_since(killed_at),
        err.code()
    );

    // The old client answers (an error or a result), never hangs.
    let again = tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1")).await;
    assert!(again.is_ok(), "old client hangs after its server died");

    // New clients work, on a fresh server connection.
    for i in 0..5 {
        let c = connect(&proxy.url())
            .await
            .unwrap_or_else(|e| panic!("connect after backend death ({i}): {e}"));
        assert_eq!(
            simple_value(&c, &format!("SELECT {i}")).await.unwrap(),
            i.to_string()
        );
        let backend: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_ne!(backend, pid, "the terminated backend is still in use");
    }
}
