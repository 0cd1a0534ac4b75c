//! Session-bound features in transaction mode (the client must stay on one server
//! connection): LISTEN/NOTIFY, session advisory locks, TEMP tables, WITH HOLD cursors.
//! Each runs on a pool of 2 while other clients churn it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardgate_e2e::{connect, connect_with_messages, simple_value, unique_name, Cluster, Proxy};
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

/// Clients running short transactions until stopped, so a client that is not pinned
/// would be handed different server connections.
struct Churn {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<u64>>,
}

impl Churn {
    async fn start(proxy: &Proxy, clients: usize) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..clients {
            let client = connect(&proxy.url()).await.expect("churn connect");
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < 100_000 {
                    let v = simple_value(&client, &format!("SELECT {c} * 1000 + {}", n % 1000))
                        .await
                        .expect("churn query");
                    assert_eq!(v, (c as u64 * 1000 + n % 1000).to_string());
                    n += 1;
                }
                n
            }));
        }
        Churn { stop, tasks }
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("churn client failed");
        }
    }
}

async fn next_notification(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>,
    what: &str,
) -> (String, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => panic!("no notification within 5 s: {what}"),
            Ok(None) => panic!("listener connection ended while waiting for {what}"),
            Ok(Some(AsyncMessage::Notification(n))) => {
                return (n.channel().to_string(), n.payload().to_string())
            }
            Ok(Some(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listen_notify_through_pool() {
    let proxy = Proxy::builder().pool_size(2).start().await;
    let channel = unique_name("e2e_ch");
    let (listener, mut rx) = connect_with_messages(&proxy.url()).await.unwrap();
    listener
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .unwrap();
    let churn = Churn::start(&proxy, 4).await;
    let notifier = connect(&proxy.url()).await.unwrap();

    // Delivered while the listener sits idle.
    notifier
        .batch_execute(&format!("NOTIFY {channel}, 'p1'"))
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut rx, "p1").await,
        (channel.clone(), "p1".into())
    );

    // Delivered at commit.
    notifier
        .batch_execute(&format!("BEGIN; NOTIFY {channel}, 'p2'; COMMIT"))
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut rx, "p2").await,
        (channel.clone(), "p2".into())
    );

    // The listener keeps working between notifications and still receives them.
    for i in 0..20 {
        assert_eq!(
            simple_value(&listener, &format!("SELECT {i}"))
                .await
                .unwrap(),
            i.to_string()
        );
    }
    let direct = connect(&Cluster::shared().primary_url(0, "app"))
        .await
        .unwrap();
    direct
        .query("SELECT pg_notify($1, 'p3')", &[&channel])
        .await
        .unwrap();
    assert_eq!(
        next_notification(&mut rx, "p3").await,
        (channel.clone(), "p3".into())
    );
    churn.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_advisory_lock_is_held() {
    // A and B may both end up pinned (B calls a lock function too): leave one for churn.
    let proxy = Proxy::builder().pool_size(3).start().await;
    let key: i64 = rand::random::<u32>() as i64 + 1_000_000;
    let a = connect(&proxy.url()).await.unwrap();
    let b = connect(&proxy.url()).await.unwrap();
    let churn = Churn::start(&proxy, 4).await;

    a.query("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .unwrap();
    for i in 0..20 {
        let got: bool = b
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .unwrap()
            .get(0);
        assert!(!got, "B got the lock A holds (attempt {i})");
        // A keeps running statements; it must stay the holder.
        assert_eq!(
            simple_value(&a, &format!("SELECT {i}")).await.unwrap(),
            i.to_string()
        );
    }
    let released: bool = a
        .query_one("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(released, "A's unlock ran where A does not hold the lock");
    let got: bool = b
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(got, "B cannot take the lock after A released it");
    let released: bool = b
        .query_one("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .unwrap()
        .get(0);
    assert!(released);
    churn.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn temp_table_stays_visible() {
    let proxy = Proxy::builder().pool_size(2).start().await;
    let t = unique_name("e2e_tmp");
    let a = connect(&proxy.url()).await.unwrap();
    a.batch_execute(&format!(
        "CREATE TEMP TABLE {t} (x int); INSERT INTO {t} VALUES (1), (2), (3)"
    ))
    .await
    .unwrap();
    let churn = Churn::start(&proxy, 4).await;
    for i in 0..30i64 {
        let n: i64 = a
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await
            .unwrap_or_else(|e| panic!("temp table lost at step {i}: {e}"))
            .get(0);
        assert_eq!(n, 3 + i, "step {i}");
        a.batch_execute(&format!("BEGIN; INSERT INTO {t} VALUES ({i}); COMMIT"))
            .await
            .unwrap();
    }
    churn.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_hold_cursor_fetches_across_transactions() {
    let proxy = Proxy::builder().pool_size(2).start().await;
    let a = connect(&proxy.url()).await.unwrap();
    a.batch_execute(
        "BEGIN; DECLARE e2e_cur CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 100) g; COMMIT",
    )
    .await
    .unwrap();
    let churn = Churn::start(&proxy, 4).await;
    for chunk in 0..10 {
        let rows = shardgate_e2e::simple_rows(&a, "FETCH 10 FROM e2e_cur")
            .await
            .unwrap_or_else(|e| panic!("FETCH {chunk}: {e}"));
        let got: Vec<String> = rows.into_iter().map(|r| r[0].clone().unwrap()).collect();
        let want: Vec<String> = (chunk * 10 + 1..=chunk * 10 + 10)
            .map(|v| v.to_string())
            .collect();
        assert_eq!(got, want, "chunk {chunk}");
        // Another transaction by the same client in between.
        a.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
    }
    let rest = shardgate_e2e::simple_rows(&a, "FETCH 10 FROM e2e_cur")
        .await
        .unwrap();
    assert!(rest.is_empty(), "cursor should be exhausted: {rest:?}");
    a.batch_execute("CLOSE e2e_cur").await.unwrap();
    churn.finish().await;
}
