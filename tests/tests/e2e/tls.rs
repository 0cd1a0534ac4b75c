//! TLS at the proxy: psql with sslmode=require and =disable, a rustls handshake that
//! checks the configured certificate, and `N` to SSLRequest when TLS is not configured.

use shardgate_e2e::{
    make_self_signed_cert, psql, skip_in_direct_mode, Msg, Proxy, RawConn, ScratchDir,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_offered_when_configured() {
    if skip_in_direct_mode("tls_offered_when_configured") {
        return;
    }
    let scratch = ScratchDir::new("tls");
    let (cert, key) = make_self_signed_cert(scratch.path()).await;
    let proxy = Proxy::builder().tls(&cert, &key).start().await;

    for mode in ["require", "disable", "prefer"] {
        let url = format!("{} sslmode={mode}", proxy.url());
        let out = psql(&url, &["-At", "-c", "SELECT 40 + 2"], None).await;
        out.assert_success(&format!("psql sslmode={mode}"));
        assert_eq!(out.stdout.trim(), "42", "sslmode={mode}");
    }

    // The handshake completes against exactly this certificate, and the protocol runs
    // inside the TLS session (login with SCRAM, a query).
    let mut conn = RawConn::connect_tls(proxy.port(), &cert)
        .await
        .expect("TLS handshake with the configured certificate");
    conn.startup("app", "app", Some("app"))
        .await
        .expect("login over TLS");
    let r = conn.simple_query("SELECT 'over tls'").await.unwrap();
    assert_eq!(Msg::rows(&r), vec![vec![Some("over tls".to_string())]]);
    conn.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tls_when_not_configured() {
    if skip_in_direct_mode("no_tls_when_not_configured") {
        return;
    }
    let proxy = Proxy::start_default().await;
    let url = format!("{} sslmode=require", proxy.url());
    let out = psql(&url, &["-At", "-c", "SELECT 1"], None).await;
    assert!(
        !out.success,
        "sslmode=require worked without TLS configured"
    );
    // After `N` the client goes on in plain text on the same connection.
    let url = format!("{} sslmode=prefer", proxy.url());
    let out = psql(&url, &["-At", "-c", "SELECT 1"], None).await;
    out.assert_success("psql sslmode=prefer without TLS");
    assert_eq!(out.stdout.trim(), "1");
}
