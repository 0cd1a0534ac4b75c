//! Authentication and bad input: error codes for bad logins, md5 and trust users,
//! the login timeout, oversize and malformed lengths, and the checkout timeout.

use std::time::{Duration, Instant};

use bytes::Buf;
use shardgate_e2e::{
    connect, direct_mode, simple_value, skip_in_direct_mode, sqlstate, timing, Cluster, Proxy,
    RawConn, UserSpec,
};

async fn login_error(url: &str) -> String {
    match connect(url).await {
        Ok(_) => panic!("login succeeded: {url}"),
        Err(e) => sqlstate(&e).unwrap_or_else(|| panic!("login failed without SQLSTATE: {e}")),
    }
}

/// The first authentication request the server sends for this user.
async fn auth_request(port: u16, user: &str) -> i32 {
    let mut c = RawConn::connect(port).await.unwrap();
    postgres_protocol::message::frontend::startup_message(
        [("user", user), ("database", "app")],
        c.buf(),
    )
    .unwrap();
    c.flush().await.unwrap();
    let m = c
        .read_msg_timeout(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("closed instead of asking for authentication");
    assert_eq!(m.tag, b'R', "expected an authentication request: {m:?}");
    m.body.clone().get_i32()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_logins_and_auth_methods() {
    let cluster = Cluster::shared();
    if !direct_mode() {
        cluster.ensure_role("e2e_md5", "md5pw").await;
        cluster.ensure_role("e2e_trust", "trustpw").await;
    }
    let proxy = Proxy::builder()
        .user(UserSpec::new("e2e_md5", "md5pw", "md5"))
        .user(UserSpec::new("e2e_trust", "trustpw", "trust"))
        .start()
        .await;

    assert_eq!(
        login_error(&proxy.url_for("app", Some("wrong"), "app")).await,
        "28P01"
    );
    assert_eq!(
        login_error(&proxy.url_for("app", Some("app"), "e2e_no_such_db")).await,
        "3D000"
    );
    let unknown = login_error(&proxy.url_for("e2e_no_such_user", Some("x"), "app")).await;
    assert!(
        unknown == "28P01" || unknown == "28000",
        "unknown user: {unknown}"
    );
    let good = connect(&proxy.url()).await.expect("app/app still logs in");
    assert_eq!(
        simple_value(&good, "SELECT current_user").await.unwrap(),
        "app"
    );
    if direct_mode() {
        return;
    }

    // Each user gets the method configured for it: SCRAM (10), md5 (5), trust (0).
    assert_eq!(auth_request(proxy.port(), "app").await, 10);
    assert_eq!(auth_request(proxy.port(), "e2e_md5").await, 5);
    assert_eq!(auth_request(proxy.port(), "e2e_trust").await, 0);

    let md5 = connect(&proxy.url_for("e2e_md5", Some("md5pw"), "app"))
        .await
        .expect("md5 login");
    assert_eq!(
        simple_value(&md5, "SELECT current_user").await.unwrap(),
        "e2e_md5"
    );
    assert_eq!(
        login_error(&proxy.url_for("e2e_md5", Some("nope"), "app")).await,
        "28P01"
    );
    let trust = connect(&proxy.url_for("e2e_trust", None, "app"))
        .await
        .expect("trust login");
    assert_eq!(
        simple_value(&trust, "SELECT current_user").await.unwrap(),
        "e2e_trust"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_timeout_closes_stalled_clients() {
    if skip_in_direct_mode("login_timeout_closes_stalled_clients") {
        return;
    }
    let _timing = timing().await;
    let proxy = Proxy::builder().client_login_timeout("1s").start().await;

    // Silent after connecting; after half a length word; in the middle of SCRAM.
    let silent = RawConn::connect(proxy.port()).await.unwrap();
    let mut partial = RawConn::connect(proxy.port()).await.unwrap();
    partial.send_raw(&[0, 0]).await.unwrap();
    let mut mid_scram = RawConn::connect(proxy.port()).await.unwrap();
    postgres_protocol::message::frontend::startup_message(
        [("user", "app"), ("database", "app")],
        mid_scram.buf(),
    )
    .unwrap();
    mid_scram.flush().await.unwrap();
    let start = Instant::now();
    let mut handles = Vec::new();
    for (what, mut conn) in [
        ("silent", silent),
        ("partial", partial),
        ("mid-SCRAM", mid_scram),
    ] {
        handles.push(tokio::spawn(async move {
            let r = conn.read_until_closed(Duration::from_secs(4)).await;
            (what, r, start.elapsed())
        }));
    }
    for h in handles {
        let (what, r, took) = h.await.unwrap();
        let msgs = r.unwrap_or_else(|e| panic!("{what} client not disconnected: {e}"));
        assert!(
            took >= Duration::from_millis(500),
            "{what} client closed after {took:?}, before the 1 s login timeout ({msgs:?})"
        );
    }
    let c = connect(&proxy.url())
        .await
        .expect("new client after timeouts");
    assert_eq!(simple_value(&c, "SELECT 1").await.unwrap(), "1");
}

/// The connection either gets an ErrorResponse with SQLSTATE 08P01 or is closed,
/// within 3 s.
async fn expect_protocol_violation<S>(conn: &mut RawConn<S>, what: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.read_msg_timeout(left).await {
            Ok(Some(m)) if m.tag == b'E' => {
                assert_eq!(m.error_code().as_deref(), Some("08P01"), "{what}: {m:?}");
                return;
            }
            Ok(Some(m)) if matches!(m.tag, b'N' | b'S') => continue,
            Ok(Some(m)) => panic!("{what}: unexpected answer {m:?}"),
            Ok(None) => return,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("{what}: neither an error nor a close within 3 s")
            }
            Err(_) => return, // reset / EOF mid-message: closed
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_and_malformed_lengths() {
    let _timing = timing().await;
    // A long login timeout, so that a close within 3 s is the answer to the bad length.
    let proxy = Proxy::builder().client_login_timeout("30s").start().await;
    let port = proxy.port();

    let mut c = RawConn::connect(port).await.unwrap();
    c.send_raw(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0])
        .await
        .unwrap();
    expect_protocol_violation(&mut c, "startup packet of length 0x7fffffff").await;

    let mut c = RawConn::connect(port).await.unwrap();
    c.send_raw(&[0, 0, 0, 2]).await.unwrap();
    expect_protocol_violation(&mut c, "startup packet of length 2").await;

    let mut c = RawConn::login(port, "app", Some("app"), "app").await;
    c.send_raw(&[b'Q', 0x7f, 0xff, 0xff, 0xff, b'S', b'E'])
        .await
        .unwrap();
    expect_protocol_violation(&mut c, "Query of length 0x7fffffff").await;

    let mut c = RawConn::login(port, "app", Some("app"), "app").await;
    c.send_raw(&[b'Q', 0, 0, 0, 2]).await.unwrap();
    expect_protocol_violation(&mut c, "Query of length 2").await;

    if !direct_mode() {
        // Above max_client_message_size (64 MiB by default), below Postgres' own limit.
        let mut c = RawConn::login(port, "app", Some("app"), "app").await;
        let len: u32 = 128 << 20;
        let mut frame = vec![b'Q'];
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(b"SELECT ");
        c.send_raw(&frame).await.unwrap();
        expect_protocol_violation(&mut c, "Query of 128 MiB").await;
    }

    let good = connect(&proxy.url())
        .await
        .expect("connect after bad input");
    assert_eq!(simple_value(&good, "SELECT 'fine'").await.unwrap(), "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_timeout_reports_error() {
    if skip_in_direct_mode("checkout_timeout_reports_error") {
        return;
    }
    let _timing = timing().await;
    let proxy = Proxy::builder()
        .pool_size(1)
        .checkout_timeout("1s")
        .start()
        .await;
    let a = connect(&proxy.url()).await.unwrap();
    let b = connect(&proxy.url()).await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        simple_value(&a, "SELECT 'holding'").await.unwrap(),
        "holding"
    );

    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(3), b.simple_query("SELECT 1"))
        .await
        .expect("no answer within 3 s while the only server connection is held");
    let took = start.elapsed();
    let err = r.expect_err("B ran although the pool's only connection is in A's transaction");
    let code = sqlstate(&err).unwrap_or_else(|| panic!("checkout timeout without SQLSTATE: {err}"));
    assert!(
        code.starts_with("08") || code.starts_with("53"),
        "checkout timeout SQLSTATE {code}: {err}"
    );
    assert!(
        took >= Duration::from_millis(500),
        "failed after {took:?}, before checkout_timeout"
    );

    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        simple_value(&a, "SELECT 'a again'").await.unwrap(),
        "a again"
    );
    let c = connect(&proxy.url()).await.unwrap();
    assert_eq!(simple_value(&c, "SELECT 'c'").await.unwrap(), "c");
}
