//! The Prometheus endpoint reports client connections and counts queries.

use std::time::Duration;

use shardgate_e2e::{connect, http_get, simple_value, skip_in_direct_mode, wait_for, Proxy};

/// Sum of the values of every sample of `name` (any labels) in an exposition text.
pub(crate) fn sample_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: `{labels} value` or ` value`.
        let value = if let Some(after) = rest.strip_prefix('{') {
            after.rsplit_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_queries() {
    if skip_in_direct_mode("metrics_endpoint_counts_queries") {
        return;
    }
    let proxy = Proxy::builder().metrics().start().await;
    let mport = proxy.metrics_port().unwrap();
    let client = connect(&proxy.url()).await.unwrap();
    for i in 0..10 {
        assert_eq!(
            simple_value(&client, &format!("SELECT {i}")).await.unwrap(),
            i.to_string()
        );
    }

    let body = wait_for(
        "metrics to count the queries",
        Duration::from_secs(5),
        || async {
            let (status, body) = http_get(mport, "/metrics").await.ok()?;
            if status != 200 {
                return None;
            }
            let queries = sample_sum(&body, "shardgate_queries_total")?;
            (queries > 0.0 && sample_sum(&body, "shardgate_client_connections").is_some())
                .then_some(body)
        },
    )
    .await;
    let clients = sample_sum(&body, "shardgate_client_connections").unwrap();
    assert!(
        clients >= 1.0,
        "one client is connected, metrics say {clients}\n{body}"
    );
    // The per-transaction counters are counted locally and handed to the registry at
    // each scrape: every statement counted exactly once, however often it is scraped.
    // (Reads routed also counts the checkout that fetched the server's parameters for
    // the first login, so it is at least 10.)
    let counts = |body: &str| {
        [
            "shardgate_queries_total",
            "shardgate_transactions_total",
            "shardgate_reads_routed_total",
        ]
        .map(|name| sample_sum(body, name).unwrap_or(0.0))
    };
    // Counted before the answers went out, so the scrape above already has all ten.
    let [queries, transactions, reads] = counts(&body);
    assert!(
        queries == 10.0 && transactions == 10.0 && reads >= 10.0,
        "after 10 SELECTs: queries, transactions, reads routed = {:?}\n{body}",
        [queries, transactions, reads]
    );
    let (_, again) = http_get(mport, "/metrics").await.unwrap();
    assert_eq!(
        counts(&again),
        counts(&body),
        "a second scrape counted again\n{again}"
    );
    assert_eq!(
        sample_sum(&body, "shardgate_writes_routed_total").unwrap_or(0.0),
        0.0,
        "ten SELECTs routed as writes\n{body}"
    );
}

#[test]
fn sample_sum_parses_exposition() {
    let text = "# TYPE shardgate_queries_total counter\n\
                shardgate_queries_total{shard=\"0\",role=\"primary\"} 3\n\
                shardgate_queries_total{shard=\"1\",role=\"primary\"} 4\n\
                shardgate_queries_total_other 100\n\
                shardgate_client_connections 2\n";
    assert_eq!(sample_sum(text, "shardgate_queries_total"), Some(7.0));
    assert_eq!(sample_sum(text, "shardgate_client_connections"), Some(2.0));
    assert_eq!(sample_sum(text, "shardgate_missing"), None);
}
