//! Garbage on the wire: 50 raw clients send random bytes, truncated frames, random
//! tags and lengths, odd startup packets and half-finished sessions, before and after
//! logging in. Meanwhile a well-behaved client runs queries. At the end shardgate is
//! alive, the normal client saw no error and a new client connects.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BufMut;
use postgres_protocol::message::frontend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate_e2e::{connect, exclusive, simple_value, Cluster, Proxy, RawConn};

const FUZZERS: u64 = 50;
const RUN_FOR: Duration = Duration::from_secs(4);

#[derive(Default, Debug)]
struct Stats {
    connections: u64,
    connect_failures: u64,
    logins: u64,
    login_failures: u64,
    frames: u64,
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.gen_range(0..=max);
    (0..n).map(|_| rng.gen()).collect()
}

/// A frame with `tag` and `body` whose length word is right, short, long, huge or tiny.
fn frame(rng: &mut StdRng, tag: u8, body: &[u8]) -> Vec<u8> {
    let exact = body.len() as u32 + 4;
    let len = match rng.gen_range(0..10) {
        0..=4 => exact,
        5 => rng.gen_range(0..exact),
        6 => exact + rng.gen_range(1..100_000),
        7 => rng.gen_range(0x1000_0000..=u32::MAX),
        8 => rng.gen_range(0..4),
        _ => rng.gen(),
    };
    let mut f = Vec::with_capacity(body.len() + 5);
    f.push(tag);
    f.put_u32(len);
    f.extend_from_slice(body);
    f
}

/// Something to send after logging in: garbage frames, or valid messages that leave the
/// session in an awkward state (open transaction, unsynced extended query, COPY).
fn post_auth_bytes(rng: &mut StdRng) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    match rng.gen_range(0..8) {
        0 => frontend::query("BEGIN", &mut out).unwrap(),
        1 => frontend::query("SELECT pg_sleep(0.05)", &mut out).unwrap(),
        2 => frontend::query("COPY (SELECT generate_series(1, 1000)) TO STDOUT", &mut out).unwrap(),
        3 => {
            frontend::parse("", "SELECT $1::int", [], &mut out).unwrap();
            // Bind/Execute without Sync.
            out.put_slice(&[b'B', 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0]);
            frontend::execute("", 0, &mut out).unwrap();
        }
        4 => {
            frontend::query("BEGIN", &mut out).unwrap();
            frontend::query("SELECT 1/0", &mut out).unwrap();
        }
        _ => {
            let tags = b"QPBDESHCdcfFXpx?\0Z";
            let tag = if rng.gen_bool(0.8) {
                tags[rng.gen_range(0..tags.len())]
            } else {
                rng.gen()
            };
            let body = random_bytes(rng, 512);
            out.put_slice(&frame(rng, tag, &body));
        }
    }
    out.to_vec()
}

/// Something to send instead of a proper startup.
fn pre_auth_bytes(rng: &mut StdRng) -> Vec<u8> {
    match rng.gen_range(0..6) {
        0 => random_bytes(rng, 2048),
        1 => {
            // A startup-like packet: length word of any kind, then random bytes.
            let body = random_bytes(rng, 600);
            let f = frame(rng, 0, &body);
            f[1..].to_vec()
        }
        2 => {
            // SSLRequest or GSSENCRequest, then garbage.
            let code: u32 = if rng.gen_bool(0.5) {
                80877103
            } else {
                80877104
            };
            let mut f = vec![0, 0, 0, 8];
            f.put_u32(code);
            f.extend(random_bytes(rng, 300));
            f
        }
        3 => {
            // CancelRequest for a process that does not exist (maybe truncated).
            let mut f = vec![0, 0, 0, 16];
            f.put_u32(80877102);
            f.put_u32(rng.gen());
            f.put_u32(rng.gen());
            let keep = rng.gen_range(4..=f.len());
            f.truncate(keep);
            f
        }
        4 => {
            // Startup with odd parameters: unknown protocol, non-UTF-8, no terminator.
            let mut body = Vec::new();
            body.put_u32(if rng.gen_bool(0.7) { 196608 } else { rng.gen() });
            for _ in 0..rng.gen_range(0..20) {
                let k = random_bytes(rng, 20);
                let v = random_bytes(rng, 40);
                body.extend(k.iter().filter(|&&b| b != 0));
                body.push(0);
                body.extend(v.iter().filter(|&&b| b != 0));
                body.push(0);
            }
            if rng.gen_bool(0.5) {
                body.push(0);
            }
            let mut f = Vec::new();
            f.put_u32(body.len() as u32 + 4);
            f.extend(body);
            f
        }
        _ => {
            // A real user with a garbage password exchange.
            let mut out = bytes::BytesMut::new();
            frontend::startup_message([("user", "app"), ("database", "app")], &mut out).unwrap();
            let body = random_bytes(rng, 200);
            out.put_slice(&frame(rng, b'p', &body));
            out.to_vec()
        }
    }
}

async fn drain<S>(conn: &mut RawConn<S>, wait: Duration) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // Returns false once the peer closed the connection.
    loop {
        match conn.read_msg_timeout(wait).await {
            Ok(Some(_)) => continue,
            Ok(None) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return true,
            Err(_) => return false,
        }
    }
}

async fn fuzz_client(port: u16, seed: u64, id: u64, until: Instant) -> Stats {
    let mut rng = StdRng::seed_from_u64(seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut stats = Stats::default();
    for _ in 0..40 {
        if Instant::now() >= until {
            break;
        }
        let mut conn = match RawConn::connect(port).await {
            Ok(c) => c,
            Err(_) => {
                stats.connect_failures += 1;
                continue;
            }
        };
        stats.connections += 1;
        if rng.gen_bool(0.5) {
            let bytes = pre_auth_bytes(&mut rng);
            stats.frames += 1;
            if conn.send_raw(&bytes).await.is_ok() {
                drain(&mut conn, Duration::from_millis(rng.gen_range(10..200))).await;
            }
        } else {
            stats.logins += 1;
            if conn.startup("app", "app", Some("app")).await.is_err() {
                stats.login_failures += 1;
                continue;
            }
            for _ in 0..rng.gen_range(1..20) {
                let bytes = post_auth_bytes(&mut rng);
                // Sometimes cut the last frame short.
                let cut = if rng.gen_bool(0.2) {
                    rng.gen_range(0..=bytes.len())
                } else {
                    bytes.len()
                };
                stats.frames += 1;
                if conn.send_raw(&bytes[..cut]).await.is_err() {
                    break;
                }
                if !drain(&mut conn, Duration::from_millis(rng.gen_range(1..50))).await {
                    break;
                }
            }
        }
        // Then vanish: no Terminate.
        drop(conn);
    }
    stats
}

/// pg_stat_activity of shard 0's primary, one line per app backend.
async fn server_activity() -> String {
    let direct = match connect(&Cluster::shared().primary_url(0, "app")).await {
        Ok(c) => c,
        Err(e) => return format!("<cannot connect: {e}>"),
    };
    let rows = direct
        .query(
            "SELECT pid, state, coalesce(wait_event_type || ':' || wait_event, ''), \
                    coalesce((now() - xact_start)::text, ''), left(query, 80) \
             FROM pg_stat_activity WHERE usename = 'app' AND pid <> pg_backend_pid()",
            &[],
        )
        .await;
    match rows {
        Ok(rows) => rows
            .iter()
            .map(|r| {
                format!(
                    "pid {} {:?} wait {} xact {} query {:?}\n",
                    r.get::<_, i32>(0),
                    r.get::<_, Option<String>>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3),
                    r.get::<_, String>(4)
                )
            })
            .collect(),
        Err(e) => format!("<query failed: {e}>"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_clients_do_not_hurt_others() {
    let _load = exclusive().await;
    let seed: u64 = std::env::var("SHARDGATE_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzz seed {seed} (set SHARDGATE_E2E_SEED to replay)");
    let proxy = Proxy::builder()
        .pool_size(10)
        .client_login_timeout("2s")
        .start()
        .await;
    let port = proxy.port();

    let stop = Arc::new(AtomicBool::new(false));
    let normal = {
        let stop = stop.clone();
        let url = proxy.url();
        tokio::spawn(async move {
            let client = connect(&url).await.expect("normal client connect");
            let (mut n, mut errors) = (0i32, Vec::new());
            let limit = Duration::from_secs(10);
            while !stop.load(Ordering::Relaxed) {
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&n];
                let extended =
                    tokio::time::timeout(limit, client.query_one("SELECT $1::int4 + 1", &params));
                match extended.await {
                    Ok(Ok(row)) if row.get::<_, i32>(0) == n + 1 => {}
                    Ok(Ok(row)) => {
                        errors.push(format!("wrong result {:?} for {n}", row.get::<_, i32>(0)))
                    }
                    Ok(Err(e)) => errors.push(format!("extended query {n}: {e}")),
                    Err(_) => {
                        errors.push(format!("extended query {n}: no answer in {limit:?}"));
                        break;
                    }
                }
                let sql = format!("SELECT 'ok {n}'");
                let simple = tokio::time::timeout(limit, simple_value(&client, &sql));
                match simple.await {
                    Ok(Ok(v)) if v == format!("ok {n}") => {}
                    Ok(Ok(v)) => errors.push(format!("wrong result {v:?}")),
                    Ok(Err(e)) => errors.push(format!("simple query {n}: {e}")),
                    Err(_) => {
                        errors.push(format!("simple query {n}: no answer in {limit:?}"));
                        break;
                    }
                }
                n += 1;
            }
            (n, errors)
        })
    };

    let until = Instant::now() + RUN_FOR;
    let fuzzers: Vec<_> = (0..FUZZERS)
        .map(|id| tokio::spawn(fuzz_client(port, seed, id, until)))
        .collect();
    let mut total = Stats::default();
    for f in fuzzers {
        let s = tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("a fuzz client hangs")
            .expect("fuzz client panicked");
        total.connections += s.connections;
        total.connect_failures += s.connect_failures;
        total.logins += s.logins;
        total.login_failures += s.login_failures;
        total.frames += s.frames;
    }
    stop.store(true, Ordering::Relaxed);
    let (queries, errors) = tokio::time::timeout(Duration::from_secs(30), normal)
        .await
        .expect("normal client hangs")
        .expect("normal client panicked");
    eprintln!("fuzz: {total:?}; normal client ran {queries} rounds");

    assert!(proxy.is_alive(), "shardgate died (seed {seed})");
    if let Some(pid) = proxy.pid() {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "no /proc/{pid}"
        );
    }
    if !errors.is_empty() {
        // What the servers are doing helps tell a stuck proxy from a stuck server.
        let activity = server_activity().await;
        panic!("normal client errors (seed {seed}): {errors:#?}\nserver activity:\n{activity}");
    }
    assert!(queries > 0, "the normal client never got a query through");
    assert_eq!(
        total.connect_failures, 0,
        "connections refused (seed {seed})"
    );
    assert!(
        total.login_failures * 10 <= total.logins,
        "too many failed logins of a correct user: {total:?} (seed {seed})"
    );
    let fresh = connect(&proxy.url())
        .await
        .expect("new client after the fuzzing");
    assert_eq!(
        simple_value(&fresh, "SELECT 'still here'").await.unwrap(),
        "still here"
    );
}
