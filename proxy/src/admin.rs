//! The admin console: database `shardgate`, admin users only, simple query protocol.
//! Its commands follow PgBouncer's habits (`SHOW POOLS`, `RELOAD`, `PAUSE`, ...), with
//! shardgate's own additions (`SHOW SHARDS`). Columns are documented in docs/ADMIN.md.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::app::App;
use crate::protocol::{self, body, frame_len, sqlstate, Reader};
use crate::stream::ClientStream;

pub const DATABASE: &str = "shardgate";

/// Runs an authenticated admin's session to its end.
pub async fn serve(app: Arc<App>, mut stream: ClientStream, user: String) {
    let mut out = BytesMut::with_capacity(1024);
    protocol::auth_request(&mut out, 0, &[]);
    for (k, v) in [
        ("server_version", "15.0 (shardgate admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        protocol::parameter_status(&mut out, k.as_bytes(), v.as_bytes());
    }
    protocol::backend_key_data(&mut out, 0, 0);
    protocol::ready_for_query(&mut out, b'I');
    if stream.write_all(&out).await.is_err() {
        return;
    }
    tracing::info!(%user, "admin console session");
    let mut inbuf = BytesMut::with_capacity(1024);
    loop {
        let len = match frame_len(&inbuf, 1 << 20) {
            Ok(Some(n)) => n,
            Ok(None) => match stream.read_buf(&mut inbuf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
            Err(e) => {
                let _ = stream
                    .write_all(&protocol::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        &e.to_string(),
                    ))
                    .await;
                return;
            }
        };
        let msg = inbuf.split_to(len);
        out.clear();
        match msg[0] {
            b'Q' => {
                let text = Reader::new(body(&msg)).cstr().unwrap_or_default();
                let sql = String::from_utf8_lossy(text);
                // Re-read the generation for every command: RELOAD swaps it.
                let app = app.process.current().unwrap_or_else(|| app.clone());
                run_command(&app, sql.trim().trim_end_matches(';').trim(), &mut out).await;
                protocol::ready_for_query(&mut out, b'I');
            }
            b'X' => return,
            _ => {
                out.extend_from_slice(&protocol::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the admin console speaks the simple query protocol only",
                ));
                let _ = stream.write_all(&out).await;
                return;
            }
        }
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn run_command(app: &Arc<App>, sql: &str, out: &mut BytesMut) {
    let words: Vec<String> = sql
        .split_whitespace()
        .map(|w| w.to_ascii_lowercase())
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    // Database names keep their case.
    let original: Vec<&str> = sql.split_whitespace().collect();
    match words.as_slice() {
        [] => protocol::empty_msg(out, b'I'),
        ["move", "slots", range, "to", shard, rest @ ..] => {
            let db = match rest {
                [] => None,
                ["in", _] => original.last().copied(),
                _ => return unknown(out, sql),
            };
            move_slots(app, range, shard, db, out);
        }
        ["rebalance", "plan", rest @ ..] if rest.len() <= 1 => {
            rebalance_plan(app, rest.first().and(original.last().copied()), out)
        }
        ["rebalance", "apply", rest @ ..] if rest.len() <= 1 => {
            rebalance_apply(app, rest.first().and(original.last().copied()), out)
        }
        ["show", "moves"] => show_moves(app, out),
        ["show", "load"] => show_load(app, out),
        ["show", what] => match *what {
            "pools" => show_pools(app, out),
            "clients" => show_clients(app, out),
            "servers" => show_servers(app, out),
            "shards" => show_shards(app, out),
            "slots" => show_slots(app, out),
            "stats" => show_stats(app, out),
            "config" => show_config(app, out),
            "version" => protocol::text_rows(
                out,
                &["version"],
                &[vec![format!("shardgate {}", env!("CARGO_PKG_VERSION"))]],
                "SHOW",
            ),
            _ => unknown(out, sql),
        },
        ["reload"] => match crate::reload(&app.process).await {
            Ok(()) => protocol::command_complete(out, "RELOAD"),
            Err(e) => protocol::error_response(out, "ERROR", sqlstate::CONFIG_FILE_ERROR, &e),
        },
        ["pause"] => {
            app.process.pause(None);
            protocol::command_complete(out, "PAUSE");
        }
        ["pause", db] => {
            app.process.pause(Some(db));
            protocol::command_complete(out, "PAUSE");
        }
        ["resume"] => {
            app.process.resume(None);
            protocol::command_complete(out, "RESUME");
        }
        ["resume", db] => {
            app.process.resume(Some(db));
            protocol::command_complete(out, "RESUME");
        }
        ["shutdown"] => {
            app.process.request_shutdown();
            protocol::command_complete(out, "SHUTDOWN");
        }
        _ => unknown(out, sql),
    }
}

fn unknown(out: &mut BytesMut, what: &str) {
    let msg = format!(
        "unknown admin command \"{what}\"; try SHOW POOLS|CLIENTS|SERVERS|SHARDS|SLOTS|MOVES|STATS|CONFIG|VERSION, RELOAD, PAUSE [db], RESUME [db], SHUTDOWN, MOVE SLOTS lo-hi TO shard [IN db], REBALANCE PLAN|APPLY [db]"
    );
    protocol::error_response(out, "ERROR", sqlstate::SYNTAX_ERROR, &msg);
}

/// The configured database names, sorted.
fn database_names(app: &App) -> Vec<&str> {
    let mut dbs: Vec<&str> = app
        .config
        .databases
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    dbs.sort_unstable();
    dbs.dedup();
    dbs
}

/// The sharded database a slot command means: the named one, or the only one.
fn sharded_database(app: &App, named: Option<&str>) -> Result<String, (&'static str, String)> {
    if let Some(db) = named {
        return Ok(db.to_string());
    }
    let mut dbs = database_names(app);
    dbs.retain(|d| app.process.shard_state(d).is_some());
    match dbs.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err((
            sqlstate::FEATURE_NOT_SUPPORTED,
            "no database is sharded".into(),
        )),
        _ => Err((
            "42601",
            format!(
                "several databases are sharded ({}): add IN <database>",
                dbs.join(", ")
            ),
        )),
    }
}

fn refuse(out: &mut BytesMut, (code, message): (&'static str, String)) {
    protocol::error_response(out, "ERROR", code, &message);
}

/// `MOVE SLOTS lo-hi TO shard [IN db]`: starts a move job; answers its id.
fn move_slots(app: &Arc<App>, range: &str, shard: &str, db: Option<&str>, out: &mut BytesMut) {
    let parsed = match range.split_once('-') {
        Some((a, b)) => a.parse::<u32>().ok().zip(b.parse::<u32>().ok()),
        None => range.parse::<u32>().ok().map(|s| (s, s)),
    };
    let (Some((lo, hi)), Ok(to)) = (parsed, shard.parse::<u32>()) else {
        return refuse(
            out,
            (
                "22023",
                format!("MOVE SLOTS wants a slot or a range (0-63) and a shard number, not \"{range}\" and \"{shard}\""),
            ),
        );
    };
    let result =
        sharded_database(app, db).and_then(|db| crate::mover::start_move(app, &db, lo, hi, to));
    match result {
        Ok(id) => protocol::text_rows(out, &["move"], &[vec![id.to_string()]], "MOVE"),
        Err(e) => refuse(out, e),
    }
}

/// The columns of `REBALANCE PLAN` (the rebalance CLI reads them by these names).
pub const PLAN_COLUMNS: [&str; 6] = [
    "kind",
    "slots",
    "from_shard",
    "to_shard",
    "load_before",
    "load_after",
];

/// `REBALANCE PLAN [db]`: the planner's proposal from the last load sample.
fn rebalance_plan(app: &Arc<App>, db: Option<&str>, out: &mut BytesMut) {
    let plan = sharded_database(app, db).and_then(|db| crate::mover::plan(app, &db));
    let plan = match plan {
        Ok(p) => p,
        Err(e) => return refuse(out, e),
    };
    let mut rows = Vec::new();
    for m in &plan.plan.moves {
        rows.push(vec![
            "move".into(),
            if m.lo == m.hi {
                m.lo.to_string()
            } else {
                format!("{}-{}", m.lo, m.hi)
            },
            m.from.to_string(),
            m.to.to_string(),
            String::new(),
            String::new(),
        ]);
    }
    for (shard, (b, a)) in plan.loads_before.iter().zip(&plan.loads_after).enumerate() {
        rows.push(vec![
            "shard".into(),
            String::new(),
            shard.to_string(),
            String::new(),
            format!("{b:.3}"),
            format!("{a:.3}"),
        ]);
    }
    rows.push(vec![
        "ratio".into(),
        String::new(),
        String::new(),
        String::new(),
        format!("{:.3}", plan.ratio_before),
        format!("{:.3}", plan.ratio_after),
    ]);
    protocol::text_rows(out, &PLAN_COLUMNS, &rows, "REBALANCE");
}

/// `REBALANCE APPLY [db]`: starts a job for the current plan.
fn rebalance_apply(app: &Arc<App>, db: Option<&str>, out: &mut BytesMut) {
    let result = sharded_database(app, db).and_then(|db| {
        let plan = crate::mover::plan(app, &db)?;
        if plan.plan.is_empty() {
            return Ok(0);
        }
        crate::mover::start_plan(app, &db, &plan)
    });
    match result {
        Ok(0) => {
            protocol::notice(out, "the load is balanced: nothing to move");
            protocol::text_rows(out, &["move"], &[vec!["0".into()]], "REBALANCE");
        }
        Ok(id) => protocol::text_rows(out, &["move"], &[vec![id.to_string()]], "REBALANCE"),
        Err(e) => refuse(out, e),
    }
}

/// `SHOW LOAD`: per shard of each sharded database, over the last rebalance_interval.
fn show_load(app: &App, out: &mut BytesMut) {
    let dbs = database_names(app);
    let mut rows = Vec::new();
    for db in dbs {
        let Some(state) = app.process.shard_state(db) else {
            continue;
        };
        let l = state.last_load();
        let slots = state.map().slot_counts();
        for (shard, owned) in slots.iter().enumerate() {
            let at = |v: &Vec<f64>| format!("{:.3}", v.get(shard).copied().unwrap_or(0.0));
            rows.push(vec![
                db.to_string(),
                shard.to_string(),
                owned.to_string(),
                at(&l.shards),
                at(&l.checkouts),
                at(&l.connects),
                format!("{:.3}", l.ratio),
            ]);
        }
    }
    let cols = [
        "database",
        "shard",
        "slots",
        "statements_per_second",
        "checkouts_per_second",
        "connections_per_second",
        "max_mean_ratio",
    ];
    protocol::text_rows(out, &cols, &rows, "SHOW");
}

/// The columns of `SHOW MOVES` (the rebalance CLI reads them by these names).
pub const MOVE_COLUMNS: [&str; 13] = [
    "id",
    "database",
    "slots",
    "from_shard",
    "to_shard",
    "state",
    "phase",
    "rows_copied",
    "rows_total",
    "cutovers",
    "pause_ms_last",
    "pause_ms_max",
    "error",
];

/// `SHOW MOVES`: the slot-move jobs of this process.
fn show_moves(app: &App, out: &mut BytesMut) {
    let dbs = database_names(app);
    let mut jobs: Vec<crate::moves::JobStatus> = dbs
        .iter()
        .filter_map(|d| app.process.shard_state(d))
        .flat_map(|s| s.jobs())
        .collect();
    jobs.sort_by_key(|j| (j.database.clone(), j.id));
    let rows: Vec<Vec<String>> = jobs
        .into_iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.database,
                j.slots,
                j.from,
                j.to,
                j.state.to_string(),
                j.phase.to_string(),
                j.rows_copied.to_string(),
                j.rows_total.to_string(),
                j.cutovers.to_string(),
                format!("{:.1}", j.pause_ms_last),
                format!("{:.1}", j.pause_ms_max),
                j.error,
            ]
        })
        .collect();
    protocol::text_rows(out, &MOVE_COLUMNS, &rows, "SHOW");
}

/// Sorted (database, user) keys, for stable output.
fn pool_keys(app: &App) -> Vec<&(String, String)> {
    let mut keys: Vec<_> = app.pools.keys().collect();
    keys.sort();
    keys
}

fn role(topo: &crate::topology::ShardTopology, host: usize) -> &'static str {
    let h = &topo.hosts[host];
    if topo.primary() == Some(host) {
        "primary"
    } else if h.is_fenced() {
        "fenced"
    } else if !h.is_up() {
        "down"
    } else if h.in_recovery() {
        "replica"
    } else {
        "unknown"
    }
}

fn show_pools(app: &App, out: &mut BytesMut) {
    let mut rows = Vec::new();
    for key in pool_keys(app) {
        let up = &app.pools[key];
        for (shard, sp) in up.shards.iter().enumerate() {
            for (i, pool) in sp.hosts.iter().enumerate() {
                rows.push(vec![
                    key.0.clone(),
                    key.1.clone(),
                    shard.to_string(),
                    pool.host.addr.to_string(),
                    role(&sp.topology, i).to_string(),
                    pool.size().to_string(),
                    pool.active().to_string(),
                    pool.idle_count().to_string(),
                    pool.waiting().to_string(),
                    pool.checkouts
                        .load(std::sync::atomic::Ordering::Relaxed)
                        .to_string(),
                ]);
            }
        }
    }
    let cols = [
        "database",
        "user",
        "shard",
        "host",
        "role",
        "pool_size",
        "active",
        "idle",
        "waiting",
        "checkouts",
    ];
    protocol::text_rows(out, &cols, &rows, "SHOW");
}

fn show_clients(app: &App, out: &mut BytesMut) {
    let rows: Vec<Vec<String>> = app
        .process
        .cancels
        .snapshot()
        .into_iter()
        .map(|c| {
            let (db, user) = c.label.split_once('/').unwrap_or((&c.label, ""));
            vec![
                c.pid.to_string(),
                db.to_string(),
                user.to_string(),
                if c.server.is_some() { "active" } else { "idle" }.to_string(),
                c.server.map(|s| s.to_string()).unwrap_or_default(),
            ]
        })
        .collect();
    protocol::text_rows(
        out,
        &["pid", "database", "user", "state", "server"],
        &rows,
        "SHOW",
    );
}

fn show_servers(app: &App, out: &mut BytesMut) {
    let mut rows = Vec::new();
    for c in app.process.cancels.snapshot() {
        if let (Some(server), Some(pid)) = (c.server, c.backend_pid) {
            let (db, user) = c.label.split_once('/').unwrap_or((&c.label, ""));
            rows.push(vec![
                db.to_string(),
                user.to_string(),
                server.to_string(),
                "active".to_string(),
                pid.to_string(),
            ]);
        }
    }
    for key in pool_keys(app) {
        for sp in &app.pools[key].shards {
            for pool in &sp.hosts {
                for pid in pool.idle_backend_pids() {
                    rows.push(vec![
                        key.0.clone(),
                        key.1.clone(),
                        pool.host.addr.to_string(),
                        "idle".to_string(),
                        pid.to_string(),
                    ]);
                }
            }
        }
    }
    protocol::text_rows(
        out,
        &["database", "user", "host", "state", "backend_pid"],
        &rows,
        "SHOW",
    );
}

fn show_shards(app: &App, out: &mut BytesMut) {
    let mut dbs: Vec<_> = app.topologies.iter().collect();
    dbs.sort_by(|a, b| a.0.cmp(b.0));
    let mut rows = Vec::new();
    for (db, shards) in dbs {
        let routing = app
            .pools
            .iter()
            .find(|((d, _), _)| d == db)
            .and_then(|(_, p)| p.routing.clone());
        let counts = routing.as_ref().map(|r| r.map().slot_counts());
        for t in shards {
            let slots = match &counts {
                Some(c) => c.get(t.index).copied().unwrap_or(0).to_string(),
                None => "all".to_string(),
            };
            for (i, h) in t.hosts.iter().enumerate() {
                rows.push(vec![
                    db.clone(),
                    t.index.to_string(),
                    h.addr.to_string(),
                    role(t, i).to_string(),
                    (h.is_up() as u8).to_string(),
                    (t.is_banned(i) as u8).to_string(),
                    h.lag_bytes().to_string(),
                    format!("{:.3}", h.lag().as_secs_f64()),
                    slots.clone(),
                ]);
            }
        }
    }
    let cols = [
        "database",
        "shard",
        "host",
        "role",
        "up",
        "banned",
        "lag_bytes",
        "lag_seconds",
        "slots",
    ];
    protocol::text_rows(out, &cols, &rows, "SHOW");
}

/// The hottest slots of each sharded database over the last load window.
fn show_slots(app: &App, out: &mut BytesMut) {
    let mut seen: Vec<&Arc<crate::routing::Routing>> = Vec::new();
    for p in app.pools.values() {
        if let Some(r) = &p.routing {
            if !seen.iter().any(|s| Arc::ptr_eq(s, r)) {
                seen.push(r);
            }
        }
    }
    seen.sort_by(|a, b| a.database.cmp(&b.database));
    let mut rows = Vec::new();
    for r in seen {
        for (slot, shard, rate) in r.hot_slots() {
            rows.push(vec![
                r.database.clone(),
                slot.to_string(),
                shard.to_string(),
                format!("{rate:.3}"),
            ]);
        }
    }
    let cols = ["database", "slot", "shard", "statements_per_second"];
    protocol::text_rows(out, &cols, &rows, "SHOW");
}

fn show_stats(app: &App, out: &mut BytesMut) {
    let rows: Vec<Vec<String>> = pool_keys(app)
        .into_iter()
        .map(|key| {
            let up = &app.pools[key];
            let transactions: u64 = up
                .shards
                .iter()
                .flat_map(|s| &s.hosts)
                .map(|p| p.checkouts.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            vec![
                key.0.clone(),
                key.1.clone(),
                transactions.to_string(),
                up.queries
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .to_string(),
            ]
        })
        .collect();
    protocol::text_rows(
        out,
        &["database", "user", "transactions", "queries"],
        &rows,
        "SHOW",
    );
}

fn show_config(app: &App, out: &mut BytesMut) {
    let g = &app.config.general;
    let mut rows: Vec<Vec<String>> = vec![
        ("config_file", app.process.config_path.display().to_string()),
        ("generation", app.generation.to_string()),
        ("listen", g.listen.to_string()),
        ("metrics_listen", format!("{:?}", g.metrics_listen)),
        ("pool_mode", format!("{:?}", g.pool_mode).to_lowercase()),
        ("pool_size", g.pool_size.to_string()),
        ("checkout_timeout", format!("{:?}", g.checkout_timeout)),
        (
            "client_login_timeout",
            format!("{:?}", g.client_login_timeout),
        ),
        (
            "server_connect_timeout",
            format!("{:?}", g.server_connect_timeout),
        ),
        (
            "server_idle_timeout",
            format!("{:?}", g.server_idle_timeout),
        ),
        (
            "max_client_message_size",
            g.max_client_message_size.to_string(),
        ),
        (
            "server_prepared_statements",
            g.server_prepared_statements.to_string(),
        ),
        ("prepare_unnamed", g.prepare_unnamed.to_string()),
        ("tls", (g.tls_cert.is_some()).to_string()),
        ("primary_reads", g.primary_reads.to_string()),
        ("read_your_writes", g.read_your_writes.to_string()),
        ("max_replica_lag_bytes", g.max_replica_lag_bytes.to_string()),
        (
            "max_replica_lag_time",
            format!("{:?}", g.max_replica_lag_time),
        ),
        ("load_balance", format!("{:?}", g.load_balance)),
        (
            "health_check_interval",
            format!("{:?}", g.health_check_interval),
        ),
        ("ban_time", format!("{:?}", g.ban_time)),
        ("failover_timeout", format!("{:?}", g.failover_timeout)),
        ("auto_promote", g.auto_promote.to_string()),
        ("auto_promote_after", format!("{:?}", g.auto_promote_after)),
        ("workers", g.workers.to_string()),
        ("shutdown_timeout", format!("{:?}", g.shutdown_timeout)),
    ]
    .into_iter()
    .map(|(k, v)| vec![k.to_string(), v])
    .collect();
    for db in &app.config.databases {
        rows.push(vec![
            format!("database.{}.shards", db.name),
            db.shards.len().to_string(),
        ]);
    }
    protocol::text_rows(out, &["key", "value"], &rows, "SHOW");
}
