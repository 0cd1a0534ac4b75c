//! The slot mover: moves the rows of slots from one shard to another while clients keep
//! reading and writing, and the rebalancer that starts moves by itself.
//!
//! One move (a run of slots with one source and one target) goes in cut-overs of whole
//! slots holding about `move_batch_rows` rows each. A cut-over:
//!
//! 1. pauses the slots at the proxy and drains the transactions in flight
//!    ([`crate::moves::SlotGate`]): from here on nothing writes them;
//! 2. copies their rows, table by table, from the source primary into the target primary
//!    in one transaction (`COPY (SELECT ... WHERE <slot filter>) TO STDOUT` piped into
//!    `COPY ... FROM STDIN`), and verifies row counts and a checksum per table;
//! 3. commits on the target, and notes the target's WAL position: its replicas serve
//!    reads only once they have replayed it;
//! 4. deletes the rows on the source and records the move in the source's
//!    `shardgate_moves` table, in one transaction: **this commit is the move's commit
//!    point**;
//! 5. rewrites the map file (next version) and publishes the map, then resumes: waiting
//!    transactions go to the new owner.
//!
//! Copying inside the pause rather than before it keeps the design free of change
//! capture: the pause costs the copy of one batch (measured in the closing notes: tens of
//! milliseconds for 5,000 rows), and nothing written during a long bulk copy needs to be
//! caught up. A journal line (`begin`) precedes step 2 and another (`end`) follows step 5;
//! a crash in between is settled on restart, before the slots take traffic: if the marker
//! row exists on the source the move rolls forward (map rewritten), else it rolls back
//! (the target's copies deleted). Any failure in steps 2-5 is settled the same way before
//! the slots resume, so a failed move leaves the old owner with every row.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use shardgate_config::{Database, KeyColumnType};
use shardgate_shardmap::{
    plan_rebalance, quote_ident, slot_range_sql, slot_sql, HotTracker, KeyType, RebalanceConfig,
    RebalancePlan, ShardMap, SlotMove,
};
use tokio_postgres::Client;

use crate::app::App;
use crate::moves::{
    journal_append, journal_path, journal_unfinished, slot_runs, slot_spec, write_map_file,
    JobStatus, ShardState, Unfinished,
};
use crate::twophase::fault;

/// Why a move could not start: (SQLSTATE, message) for the admin console.
pub type Refused = (&'static str, String);

/// One sharded table as the mover sees it.
#[derive(Debug, Clone)]
struct MovedTable {
    /// Quoted, possibly schema-qualified.
    name: String,
    column: String,
    key_type: KeyType,
}

fn moved_tables(db: &Database) -> Vec<MovedTable> {
    db.sharded_tables
        .iter()
        .map(|t| MovedTable {
            name: t
                .name
                .split('.')
                .map(quote_ident)
                .collect::<Vec<_>>()
                .join("."),
            column: quote_ident(&t.column),
            key_type: match t.key_type {
                KeyColumnType::Smallint => KeyType::Int2,
                KeyColumnType::Integer => KeyType::Int4,
                KeyColumnType::Bigint => KeyType::Int8,
                KeyColumnType::Text => KeyType::Text,
                KeyColumnType::Varchar => KeyType::Varchar,
                KeyColumnType::Uuid => KeyType::Uuid,
            },
        })
        .collect()
}

/// Everything a job needs, captured when it starts.
#[derive(Clone)]
struct Ctx {
    app: Arc<App>,
    db: Database,
    state: Arc<ShardState>,
    tables: Vec<MovedTable>,
}

/// Starts a job moving `slots` to shard `to` (slots already there are skipped). Returns
/// the job id.
pub fn start_move(
    app: &Arc<App>,
    database: &str,
    lo: u32,
    hi: u32,
    to: u32,
) -> Result<u64, Refused> {
    let (ctx, map) = context(app, database)?;
    if lo > hi || hi >= map.slots() {
        return Err((
            "22023",
            format!(
                "slots {lo}-{hi} do not exist (the map has slots 0 to {})",
                map.slots() - 1
            ),
        ));
    }
    if to >= map.shards() {
        return Err((
            "22023",
            format!(
                "shard {to} does not exist (shards are 0 to {})",
                map.shards() - 1
            ),
        ));
    }
    let groups = moves_to(&map, lo, hi, to);
    start_job(ctx, groups, format!("{lo}-{hi}"), Some(to))
}

/// Starts a job applying a rebalance plan.
pub fn start_plan(app: &Arc<App>, database: &str, plan: &RebalancePlan) -> Result<u64, Refused> {
    let (ctx, map) = context(app, database)?;
    if plan.plan.base_version != map.version() {
        return Err((
            "40001",
            "the map changed since the plan was made: plan again".into(),
        ));
    }
    let groups = group_moves(&plan.plan.moves);
    let slots: Vec<u32> = plan.plan.moves.iter().flat_map(|m| m.slots()).collect();
    let mut slots = slots;
    slots.sort_unstable();
    start_job(ctx, groups, slot_spec(&slots), None)
}

/// The current plan for a database, from the last load sample.
pub fn plan(app: &Arc<App>, database: &str) -> Result<RebalancePlan, Refused> {
    let (ctx, map) = context(app, database)?;
    let load = ctx.state.last_load();
    if load.slots.len() != map.slots() as usize {
        return Err((
            "55000",
            format!(
                "no load measured yet for database \"{database}\": try again after rebalance_interval ({:?})",
                ctx.db.rebalance_interval
            ),
        ));
    }
    plan_rebalance(&map, &load.slots, &rebalance_config(&ctx.db))
        .map_err(|e| ("22023", e.to_string()))
}

fn rebalance_config(db: &Database) -> RebalanceConfig {
    RebalanceConfig {
        hot_ratio: db.hot_ratio,
        max_slots_per_round: db.max_slots_per_round,
        ..RebalanceConfig::default()
    }
}

fn context(app: &Arc<App>, database: &str) -> Result<(Ctx, Arc<ShardMap>), Refused> {
    let db = app
        .config
        .database(database)
        .ok_or_else(|| ("3D000", format!("database \"{database}\" does not exist")))?;
    let state = app.process.shard_state(database).ok_or_else(|| {
        (
            "0A000",
            format!("database \"{database}\" is not sharded: it has no slots to move"),
        )
    })?;
    if state.map_path.is_none() {
        return Err((
            "0A000",
            format!("moving slots of database \"{database}\" needs a shard map file: set shard_map (see `shardgate shardmap init`)"),
        ));
    }
    let map = state.map();
    Ok((
        Ctx {
            app: app.clone(),
            tables: moved_tables(db),
            db: db.clone(),
            state,
        },
        map,
    ))
}

/// Slots going from one shard to another: what one series of cut-overs moves.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MoveGroup {
    from: u32,
    to: u32,
    /// Sorted, distinct.
    slots: Vec<u32>,
}

/// The groups taking `lo..=hi` to `to` (slots already there stay).
fn moves_to(map: &ShardMap, lo: u32, hi: u32, to: u32) -> Vec<MoveGroup> {
    let moves: Vec<SlotMove> = (lo..=hi)
        .filter(|&s| map.shard_of_slot(s) != to)
        .map(|s| SlotMove {
            lo: s,
            hi: s,
            from: map.shard_of_slot(s),
            to,
        })
        .collect();
    group_moves(&moves)
}

/// Slot moves grouped by (from, to), in that order.
fn group_moves(moves: &[SlotMove]) -> Vec<MoveGroup> {
    let mut groups: Vec<MoveGroup> = Vec::new();
    for m in moves {
        let g = match groups
            .iter_mut()
            .position(|g| g.from == m.from && g.to == m.to)
        {
            Some(i) => &mut groups[i],
            None => {
                groups.push(MoveGroup {
                    from: m.from,
                    to: m.to,
                    slots: Vec::new(),
                });
                groups.last_mut().expect("just pushed")
            }
        };
        g.slots.extend(m.slots());
    }
    groups.sort_by_key(|g| (g.from, g.to));
    for g in &mut groups {
        g.slots.sort_unstable();
        g.slots.dedup();
    }
    groups
}

/// `to`: the one target shard, when the job has one even if nothing needs moving.
fn start_job(
    ctx: Ctx,
    groups: Vec<MoveGroup>,
    slots: String,
    to: Option<u32>,
) -> Result<u64, Refused> {
    if ctx
        .state
        .busy
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err((
            "55006",
            format!(
                "a slot move is already running for database \"{}\" (SHOW MOVES)",
                ctx.db.name
            ),
        ));
    }
    let one_or_many = |mut v: Vec<u32>| {
        v.sort_unstable();
        v.dedup();
        match v.as_slice() {
            [one] => one.to_string(),
            _ => "*".to_string(),
        }
    };
    // Nothing to move (the slots are there already): from is "-".
    let from = match groups.is_empty() {
        true => "-".to_string(),
        false => one_or_many(groups.iter().map(|g| g.from).collect()),
    };
    let to = match to {
        Some(t) => t.to_string(),
        None => one_or_many(groups.iter().map(|g| g.to).collect()),
    };
    let job = ctx.state.new_job(slots, from, to);
    let id = lock(&job).id;
    metrics::counter!("shardgate_moves_started_total", "database" => ctx.db.name.clone())
        .increment(1);
    tokio::spawn(async move {
        let result = run_job(&ctx, &groups, &job).await;
        let database = ctx.db.name.clone();
        {
            let mut j = lock(&job);
            match &result {
                Ok(()) => {
                    j.state = "done";
                    j.phase = "done";
                }
                Err(e) => {
                    j.state = "failed";
                    j.error = e.clone();
                }
            }
        }
        match result {
            Ok(()) => {
                metrics::counter!("shardgate_moves_completed_total", "database" => database)
                    .increment(1);
                tracing::info!(database = %ctx.db.name, job = id, "slot move done");
            }
            Err(e) => {
                metrics::counter!("shardgate_moves_failed_total", "database" => database)
                    .increment(1);
                tracing::error!(database = %ctx.db.name, job = id, "slot move failed: {e}");
            }
        }
        ctx.state.busy.store(false, Ordering::Release);
    });
    Ok(id)
}

fn lock(job: &Mutex<JobStatus>) -> std::sync::MutexGuard<'_, JobStatus> {
    job.lock().unwrap_or_else(|e| e.into_inner())
}

async fn run_job(ctx: &Ctx, groups: &[MoveGroup], job: &Mutex<JobStatus>) -> Result<(), String> {
    // Count first, so the progress shows a total.
    lock(job).phase = "counting";
    let mut counted = Vec::with_capacity(groups.len());
    for g in groups {
        let mut src = connect_primary(ctx, g.from).await?;
        refuse_orphaned_prepared(ctx, &src, g.from).await?;
        refuse_orphaned_prepared(ctx, &connect_primary(ctx, g.to).await?, g.to).await?;
        // The slot index first: without it, counting scans the whole table.
        lock(job).phase = "indexing";
        ensure_slot_indexes(ctx, &src).await?;
        lock(job).phase = "counting";
        let counts = slot_counts(ctx, &mut src, &g.slots).await?;
        lock(job).rows_total += counts.values().sum::<u64>();
        counted.push(counts);
    }
    for (g, counts) in groups.iter().zip(counted) {
        let mut src = connect_primary(ctx, g.from).await?;
        let mut dst = connect_primary(ctx, g.to).await?;
        ensure_marker_table(&src).await?;
        lock(job).phase = "indexing";
        ensure_slot_indexes(ctx, &src).await?;
        ensure_slot_indexes(ctx, &dst).await?;
        let columns = column_lists(ctx, &src).await?;
        for (slots, rows) in batches(&g.slots, &counts, ctx.db.move_batch_rows) {
            let started = Instant::now();
            let spec = slot_spec(&slots);
            cutover(ctx, &mut src, &mut dst, &columns, g, slots, rows, job).await?;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let mut j = lock(job);
            j.cutovers += 1;
            j.pause_ms_last = ms;
            j.pause_ms_max = j.pause_ms_max.max(ms);
            tracing::info!(database = %ctx.db.name, slots = %spec, from = g.from, to = g.to, rows, pause_ms = ms, "slots moved");
        }
    }
    Ok(())
}

/// Batches of whole slots (in order) holding at most about `limit` rows each; a bigger
/// slot goes alone, empty slots ride along: (slots, rows).
fn batches(slots: &[u32], counts: &HashMap<u32, u64>, limit: u64) -> Vec<(Vec<u32>, u64)> {
    let mut out: Vec<(Vec<u32>, u64)> = Vec::new();
    for &slot in slots {
        let n = counts.get(&slot).copied().unwrap_or(0);
        match out.last_mut() {
            Some(b) if n == 0 || b.1 == 0 || b.1 + n <= limit => {
                b.0.push(slot);
                b.1 += n;
            }
            _ => out.push((vec![slot], n)),
        }
    }
    out
}

/// The SQL predicate selecting the rows of `slots` (sorted) of a table: a range when the
/// slots are consecutive, else a list; either way an index scan on the slot index.
fn slot_filter(t: &MovedTable, map_slots: u32, slots: &[u32]) -> String {
    match slot_runs(slots).as_slice() {
        [(lo, hi)] => slot_range_sql(&t.column, t.key_type, map_slots, *lo, *hi),
        _ => format!(
            "{} = ANY('{{{}}}'::bigint[])",
            slot_sql(&t.column, t.key_type, map_slots),
            slots
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

async fn connect_primary(ctx: &Ctx, shard: u32) -> Result<Client, String> {
    let topo = ctx
        .app
        .topologies
        .get(&ctx.db.name)
        .and_then(|t| t.get(shard as usize))
        .ok_or_else(|| format!("shard {shard} is not configured"))?;
    let deadline = Instant::now() + ctx.app.config.general.failover_timeout;
    let addr = loop {
        if let Some(p) = topo.primary() {
            break topo.hosts[p].addr;
        }
        if Instant::now() >= deadline {
            return Err(format!("shard {shard} has no primary"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let user = ctx
        .app
        .config
        .health_check_user()
        .ok_or("no configured user logs in to the servers with a password")?;
    let client = crate::server::connect_client(
        addr,
        user.server_user(),
        user.server_password(),
        ctx.db.server_database(),
        "shardgate slot mover",
        ctx.app.config.general.server_connect_timeout,
    )
    .await
    .map_err(|e| format!("shard {shard} ({addr}): {e}"))?;
    // Row text must read the same on both sides for the checksums.
    client
        .batch_execute(
            "SET datestyle = 'ISO, MDY'; SET intervalstyle = 'postgres'; SET timezone = 'UTC'; \
             SET extra_float_digits = 3; SET bytea_output = 'hex'; SET statement_timeout = 0",
        )
        .await
        .map_err(|e| format!("shard {shard}: {e}"))?;
    Ok(client)
}

async fn ensure_marker_table(c: &Client) -> Result<(), String> {
    let exists: bool = c
        .query_one("SELECT to_regclass('shardgate_moves') IS NOT NULL", &[])
        .await
        .map_err(|e| format!("looking for shardgate_moves: {e}"))?
        .get(0);
    if exists {
        return Ok(());
    }
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS shardgate_moves (move_id bigint PRIMARY KEY, \
         map_version bigint NOT NULL, slots text NOT NULL, from_shard int NOT NULL, \
         to_shard int NOT NULL, moved_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(|e| format!("creating shardgate_moves: {e}"))
}

/// The name of the slot index of a table (in the table's schema).
fn slot_index_name(table: &MovedTable) -> String {
    let plain: String = table
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("shardgate_slot{}", plain.replace("__", "_"));
    name.truncate(63);
    name
}

/// Makes sure every sharded table has an index on its slot expression, so that the
/// mover's slot queries are index range scans: a cut-over then costs what its rows cost,
/// not what the table costs. Built with CREATE INDEX CONCURRENTLY, before any pause (a
/// one-off on a big table; writes go on meanwhile). An invalid leftover of an
/// interrupted build is dropped and rebuilt.
async fn ensure_slot_indexes(ctx: &Ctx, c: &Client) -> Result<(), String> {
    let slots = ctx.state.map().slots();
    for t in &ctx.tables {
        let name = slot_index_name(t);
        let found = c
            .query_opt(
                "SELECT i.indisvalid, i.indexrelid::regclass::text FROM pg_index i \
                 JOIN pg_class k ON k.oid = i.indexrelid \
                 WHERE i.indrelid = $1::text::regclass AND k.relname = $2",
                &[&t.name, &name],
            )
            .await
            .map_err(|e| format!("{}: {e}", t.name))?;
        match found {
            Some(row) if row.get::<_, bool>(0) => continue,
            Some(row) => {
                let qualified: String = row.get(1);
                c.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {qualified}"))
                    .await
                    .map_err(|e| format!("{}: dropping an invalid {name}: {e}", t.name))?;
            }
            None => {}
        }
        let started = Instant::now();
        // The build waits for the transactions open on the shard; not forever.
        // (Statements one by one: CREATE INDEX CONCURRENTLY refuses a transaction block,
        // and a multi-statement query is one.)
        let wait = ctx.db.move_drain_timeout;
        c.batch_execute(&format!("SET lock_timeout = {}", wait.as_millis().max(1)))
            .await
            .map_err(|e| format!("{}: {}", t.name, crate::server::describe_error(&e)))?;
        let built = c
            .batch_execute(&format!(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} (({}))",
                quote_ident(&name),
                t.name,
                slot_sql(&t.column, t.key_type, slots)
            ))
            .await;
        let _ = c.batch_execute("RESET lock_timeout").await;
        built.map_err(|e| {
            let lock_wait = e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
            if lock_wait {
                format!(
                    "{}: building the slot index {name} waited move_drain_timeout ({wait:?}) for transactions open on the shard; nothing was moved, retry when they are done",
                    t.name
                )
            } else {
                format!("{}: creating the slot index {name}: {}", t.name, crate::server::describe_error(&e))
            }
        })?;
        tracing::info!(database = %ctx.db.name, table = %t.name, index = %name, elapsed = ?started.elapsed(), "slot index built");
    }
    Ok(())
}

/// Rows per slot of `slots` on the source, all sharded tables together.
async fn slot_counts(
    ctx: &Ctx,
    src: &mut Client,
    slots_moving: &[u32],
) -> Result<HashMap<u32, u64>, String> {
    let slots = ctx.state.map().slots();
    let mut counts = HashMap::new();
    for t in &ctx.tables {
        let sql = format!(
            "SELECT ({})::int, count(*) FROM {} WHERE {} GROUP BY 1",
            slot_sql(&t.column, t.key_type, slots),
            t.name,
            slot_filter(t, slots, slots_moving)
        );
        for row in src
            .query(&sql, &[])
            .await
            .map_err(|e| format!("{}: {e}", t.name))?
        {
            let slot: i32 = row.get(0);
            let n: i64 = row.get(1);
            *counts.entry(slot as u32).or_insert(0) += n as u64;
        }
    }
    Ok(counts)
}

/// Per table, its column list (quoted, comma-separated, generated columns left out).
async fn column_lists(ctx: &Ctx, src: &Client) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(ctx.tables.len());
    for t in &ctx.tables {
        let row = src
            .query_one(
                "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute \
                 WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = ''",
                &[&t.name],
            )
            .await
            .map_err(|e| format!("{}: {e}", t.name))?;
        let cols: Option<String> = row.get(0);
        out.push(cols.ok_or_else(|| format!("{}: no columns", t.name))?);
    }
    Ok(out)
}

/// One cut-over of `slots` of group `g` (see the module docs).
#[allow(clippy::too_many_arguments)]
async fn cutover(
    ctx: &Ctx,
    src: &mut Client,
    dst: &mut Client,
    columns: &[String],
    g: &MoveGroup,
    slots: Vec<u32>,
    expected_rows: u64,
    job: &Mutex<JobStatus>,
) -> Result<(), String> {
    let state = &ctx.state;
    let map_path = state.map_path.clone().ok_or("no shard map file")?;
    let drain = ctx.db.move_drain_timeout;
    if !state.gate.settle(drain).await {
        return Err(format!(
            "transactions begun before an earlier cut-over are still open after {drain:?}"
        ));
    }
    let version = state.map().version() + 1;
    let u = Unfinished {
        version,
        from: g.from,
        to: g.to,
        id: rand::random::<u64>() >> 1,
        slots,
    };
    journal_append(&map_path, &u.begin_line()).map_err(|e| format!("journal: {e}"))?;
    let paused_at = Instant::now();
    lock(job).phase = "paused";
    if !state.gate.pause(&u.slots, drain).await {
        let open = state.gate.open_before_pause();
        state.gate.resume();
        let _ = journal_append(&map_path, &format!("end {} rolled-back", u.id));
        return Err(format!(
            "{open} transaction(s) begun before the pause were still open after move_drain_timeout ({drain:?}); nothing was moved"
        ));
    }
    fault("move_after_drain");
    let copied = match refuse_orphaned_prepared(ctx, src, u.from).await {
        Ok(()) => copy_and_commit(ctx, src, dst, columns, &u, expected_rows, job).await,
        Err(e) => Err(e),
    };
    let result = match copied {
        Ok(()) => {
            fault("move_after_source_commit");
            lock(job).phase = "publishing";
            publish(ctx, &u).map(|_| ())
        }
        Err(e) => {
            // Settle before the slots take traffic again: the source keeps everything.
            lock(job).phase = "rolled back";
            settle_retrying(ctx, &u, &format!("cut-over failed ({e})")).await;
            Err(e)
        }
    };
    state.gate.resume();
    let pause = paused_at.elapsed();
    metrics::histogram!("shardgate_move_pause_seconds", "database" => ctx.db.name.clone())
        .record(pause.as_secs_f64());
    result
}

/// Refuses while `shard` holds prepared transactions that are not this process's own:
/// on the source they hold writes that may land on the moving slots when they commit,
/// after the copy; on either side they would hold the slot index's concurrent build
/// forever. (This process's own are drained like any transaction: their sessions hold
/// tickets.)
async fn refuse_orphaned_prepared(ctx: &Ctx, c: &Client, shard: u32) -> Result<(), String> {
    match orphaned_prepared(ctx, c).await? {
        0 => Ok(()),
        n => Err(format!(
            "shard {shard} holds {n} prepared transaction(s) no running shardgate owns (a crashed proxy's, still being resolved, or another client's; see pg_prepared_xacts): their writes could land after the copy; nothing was moved, retry once they are resolved"
        )),
    }
}

async fn orphaned_prepared(ctx: &Ctx, c: &Client) -> Result<i64, String> {
    let own = format!(
        "{}%",
        crate::twophase::own_gid_prefix(ctx.app.config.general.listen.port())
    );
    c.query_one(
        "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database() AND gid NOT LIKE $1",
        &[&own],
    )
    .await
    .map(|r| r.get(0))
    .map_err(|e| format!("looking for prepared transactions: {e}"))
}

/// Steps 2-4: copy, verify, commit on the target, delete and mark on the source.
async fn copy_and_commit(
    ctx: &Ctx,
    src: &mut Client,
    dst: &mut Client,
    columns: &[String],
    u: &Unfinished,
    expected_rows: u64,
    job: &Mutex<JobStatus>,
) -> Result<(), String> {
    let slots = ctx.state.map().slots();
    let filters: Vec<String> = ctx
        .tables
        .iter()
        .map(|t| slot_filter(t, slots, &u.slots))
        .collect();
    lock(job).phase = "copying";
    let tx = dst
        .transaction()
        .await
        .map_err(|e| format!("shard {}: {e}", u.to))?;
    let mut copied = Vec::with_capacity(ctx.tables.len());
    let mut sums: Vec<RowSum> = Vec::with_capacity(ctx.tables.len());
    for ((t, cols), filter) in ctx.tables.iter().zip(columns).zip(&filters) {
        // Rows a failed earlier attempt may have left (the target does not own them).
        tx.execute(&format!("DELETE FROM {} WHERE {filter}", t.name), &[])
            .await
            .map_err(|e| format!("shard {}: {}: {e}", u.to, t.name))?;
        let out = src
            .copy_out(&format!(
                "COPY (SELECT {cols} FROM {} WHERE {filter}) TO STDOUT",
                t.name
            ))
            .await
            .map_err(|e| format!("shard {}: {}: {e}", u.from, t.name))?;
        let sink = tx
            .copy_in(&format!("COPY {} ({cols}) FROM STDIN", t.name))
            .await
            .map_err(|e| format!("shard {}: {}: {e}", u.to, t.name))?;
        futures_util::pin_mut!(out);
        futures_util::pin_mut!(sink);
        let mut sent = RowSum::default();
        while let Some(chunk) = out.next().await {
            let chunk = chunk.map_err(|e| format!("shard {}: {}: {e}", u.from, t.name))?;
            sent.add(&chunk);
            sink.send(chunk)
                .await
                .map_err(|e| format!("shard {}: {}: {e}", u.to, t.name))?;
        }
        let n = sink
            .finish()
            .await
            .map_err(|e| format!("shard {}: {}: {e}", u.to, t.name))?;
        if n != sent.rows {
            return Err(format!(
                "{}: the source sent {} rows, the target took {n}",
                t.name, sent.rows
            ));
        }
        copied.push(n);
        sums.push(sent);
        lock(job).rows_copied += n;
        metrics::counter!("shardgate_move_rows_copied_total", "database" => ctx.db.name.clone())
            .increment(n);
    }
    // Read the copy back inside the target's transaction and compare it with what the
    // source sent, row by row as text (an order-free sum of row hashes, and the count).
    lock(job).phase = "verifying";
    for (((t, cols), filter), sent) in ctx.tables.iter().zip(columns).zip(&filters).zip(&sums) {
        let back = tx
            .copy_out(&format!(
                "COPY (SELECT {cols} FROM {} WHERE {filter}) TO STDOUT",
                t.name
            ))
            .await
            .map_err(|e| format!("shard {}: {}: {e}", u.to, t.name))?;
        futures_util::pin_mut!(back);
        let mut got = RowSum::default();
        while let Some(row) = back.next().await {
            got.add(&row.map_err(|e| format!("shard {}: {}: {e}", u.to, t.name))?);
        }
        if got != *sent {
            return Err(format!(
                "verification failed for {}: the source sent {} rows (checksum {:016x}), the target holds {} (checksum {:016x})",
                t.name, sent.rows, sent.sum, got.rows, got.sum
            ));
        }
    }
    let total: u64 = copied.iter().sum();
    if total != expected_rows {
        tracing::info!(database = %ctx.db.name, expected_rows, total, "rows changed between counting and the cut-over");
    }
    fault("move_after_copy");
    tx.commit()
        .await
        .map_err(|e| format!("shard {}: commit: {e}", u.to))?;
    // Reads of the moved slots wait for the target's replicas to have these rows.
    raise_floor(ctx, dst, u.to).await;
    fault("move_after_target_commit");
    lock(job).phase = "deleting";
    let stx = src
        .transaction()
        .await
        .map_err(|e| format!("shard {}: {e}", u.from))?;
    for ((t, filter), n) in ctx.tables.iter().zip(&filters).zip(&copied) {
        let deleted = stx
            .execute(&format!("DELETE FROM {} WHERE {filter}", t.name), &[])
            .await
            .map_err(|e| format!("shard {}: {}: {e}", u.from, t.name))?;
        if deleted != *n {
            return Err(format!(
                "{} changed on shard {} during the pause ({deleted} rows now, {n} copied): was it written directly?",
                t.name, u.from
            ));
        }
    }
    stx.execute(
        "INSERT INTO shardgate_moves (move_id, map_version, slots, from_shard, to_shard) \
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &(u.id as i64),
            &(u.version as i64),
            &slot_spec(&u.slots),
            &(u.from as i32),
            &(u.to as i32),
        ],
    )
    .await
    .map_err(|e| format!("shard {}: shardgate_moves: {e}", u.from))?;
    stx.commit()
        .await
        .map_err(|e| format!("shard {}: commit: {e}", u.from))?;
    // And the source's replicas serve reads (fan-outs) only once they have replayed the
    // delete: until then they still hold the rows the target now owns.
    raise_floor(ctx, src, u.from).await;
    Ok(())
}

/// Replicas of `shard` serve reads only once they have replayed what `c` (its primary)
/// committed so far.
async fn raise_floor(ctx: &Ctx, c: &Client, shard: u32) {
    let lsn = match c.query_one("SELECT pg_current_wal_lsn()::text", &[]).await {
        Ok(row) => crate::topology::parse_lsn(&row.get::<_, String>(0)),
        Err(e) => {
            tracing::warn!(database = %ctx.db.name, shard, "cannot read the WAL position after a slot move ({e}): the shard's reads go to its primary until restart");
            None
        }
    };
    ctx.state
        .raise_replica_floor(shard, lsn.unwrap_or(u64::MAX));
}

/// Row count and an order-free checksum of COPY text rows (one CopyData per row, as
/// Postgres sends them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct RowSum {
    rows: u64,
    sum: u64,
}

impl RowSum {
    fn add(&mut self, row: &[u8]) {
        use std::hash::{Hash, Hasher};
        // Fixed keys: the same row hashes the same on both sides.
        let mut h = std::hash::DefaultHasher::new();
        row.hash(&mut h);
        self.rows += 1;
        self.sum = self.sum.wrapping_add(h.finish());
    }
}

/// Step 5: the next map version, on disk then in memory. The rows are on the target
/// already, so the in-memory map follows even if the file cannot be written (the journal
/// then stays open and a restart rolls the file forward from the marker).
fn publish(ctx: &Ctx, u: &Unfinished) -> Result<(), String> {
    let map = ctx.state.map();
    let next = map
        .apply_moves(&u.slot_moves())
        .and_then(|m| m.with_version(u.version).map_err(Into::into))
        .map_err(|e| format!("publishing the map: {e}"))?;
    let path = ctx.state.map_path.clone().ok_or("no shard map file")?;
    let written = write_map_file(&path, &next);
    fault("move_after_map_write");
    ctx.state.publish(next);
    match written {
        Ok(()) => {
            let _ = journal_append(&path, &format!("end {} done", u.id));
            Ok(())
        }
        Err(e) => Err(format!(
            "{}: {e} (the move took effect; the file is rewritten at the next start)",
            path.display()
        )),
    }
}

/// Settles an interrupted cut-over: forward when the source committed its delete (the
/// marker row exists), else back (the target's copies deleted). Idempotent.
async fn settle(ctx: &Ctx, u: &Unfinished) -> Result<&'static str, String> {
    let path = ctx.state.map_path.clone().ok_or("no shard map file")?;
    let map = ctx.state.map();
    let owners: Vec<u32> = u.slots.iter().map(|&s| map.shard_of_slot(s)).collect();
    if map.version() >= u.version && owners.iter().all(|&o| o == u.to) {
        // The map was written: the move is complete.
        let _ = journal_append(&path, &format!("end {} done", u.id));
        return Ok("it had completed");
    }
    let src = connect_primary(ctx, u.from).await?;
    let table: bool = src
        .query_one("SELECT to_regclass('shardgate_moves') IS NOT NULL", &[])
        .await
        .map_err(|e| format!("shard {}: {e}", u.from))?
        .get(0);
    let marked = table
        && src
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM shardgate_moves WHERE move_id = $1)",
                &[&(u.id as i64)],
            )
            .await
            .map_err(|e| format!("shard {}: {e}", u.from))?
            .get::<_, bool>(0);
    if marked {
        // The source's replicas must have the delete before they answer again.
        raise_floor(ctx, &src, u.from).await;
        publish(ctx, u)?;
        return Ok("rolled forward (the source had committed)");
    }
    let dst = connect_primary(ctx, u.to).await?;
    let slots = map.slots();
    for t in &ctx.tables {
        let filter = slot_filter(t, slots, &u.slots);
        dst.execute(&format!("DELETE FROM {} WHERE {filter}", t.name), &[])
            .await
            .map_err(|e| format!("shard {}: {}: {e}", u.to, t.name))?;
    }
    // The target's replicas may have replayed the copies: they must have the delete too.
    raise_floor(ctx, &dst, u.to).await;
    let _ = journal_append(&path, &format!("end {} rolled-back", u.id));
    Ok("rolled back (the source keeps every row)")
}

/// At start, before the listener opens: settles a cut-over a crash interrupted. Its
/// slots stay paused until it is settled; when a shard cannot be reached within
/// `failover_timeout`, settling goes on in the background (other slots are served
/// meanwhile, the interrupted ones wait).
pub async fn recover(app: &Arc<App>) {
    for db in &app.config.databases {
        let Ok((ctx, _)) = context(app, &db.name) else {
            continue;
        };
        let Some(path) = ctx.state.map_path.clone() else {
            continue;
        };
        let text = std::fs::read_to_string(journal_path(&path)).unwrap_or_default();
        let Some(u) = journal_unfinished(&text) else {
            continue;
        };
        tracing::warn!(database = %db.name, slots = %slot_spec(&u.slots), from = u.from, to = u.to, "a slot move was interrupted: settling it");
        // Nothing is in flight yet, so the pause is immediate.
        ctx.state.gate.pause_now(&u.slots);
        let settled = tokio::time::timeout(
            app.config.general.failover_timeout,
            settle_retrying(&ctx, &u, "interrupted slot move"),
        )
        .await;
        if settled.is_ok() {
            ctx.state.gate.resume();
            continue;
        }
        tokio::spawn(async move {
            settle_retrying(&ctx, &u, "interrupted slot move").await;
            ctx.state.gate.resume();
        });
    }
}

/// Settles `u` (see `settle`), retrying with backoff until it is settled: its slots take
/// no traffic before. `why` says in the log what left it unfinished.
async fn settle_retrying(ctx: &Ctx, u: &Unfinished, why: &str) {
    let mut wait = Duration::from_millis(100);
    loop {
        match settle(ctx, u).await {
            Ok(outcome) => {
                tracing::warn!(database = %ctx.db.name, "{why}; {outcome}");
                return;
            }
            Err(e) => {
                tracing::error!(database = %ctx.db.name, "{why}; settling it failed: {e}; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Samples per-slot load every `rebalance_interval` for every sharded database, exports
/// it, and with `auto_rebalance` applies a plan once a shard stays hot for `hot_window`.
pub fn spawn_rebalancer(process: Arc<crate::app::Process>) {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut trackers: HashMap<String, (HotTracker, Instant)> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let Some(app) = process.current() else {
                continue;
            };
            for db in &app.config.databases {
                let Some(state) = process.shard_state(&db.name) else {
                    continue;
                };
                let entry = trackers.entry(db.name.clone()).or_insert_with(|| {
                    (
                        HotTracker::new(db.hot_ratio, db.hot_window),
                        Instant::now() - db.rebalance_interval,
                    )
                });
                if entry.1.elapsed() < db.rebalance_interval {
                    continue;
                }
                entry.1 = Instant::now();
                let mut pool_counts = vec![(0u64, 0u64); state.map_ref().shards() as usize];
                for up in app.pools.values().filter(|p| p.database == db.name) {
                    for (shard, sp) in up.shards.iter().enumerate() {
                        if let Some(c) = pool_counts.get_mut(shard) {
                            for pool in &sp.hosts {
                                c.0 += pool.checkouts.load(Ordering::Relaxed);
                                c.1 += pool.connects.load(Ordering::Relaxed);
                            }
                        }
                    }
                }
                let sample = state.sample_load(pool_counts);
                for (shard, load) in sample.shards.iter().enumerate() {
                    metrics::gauge!("shardgate_shard_load", "database" => db.name.clone(), "shard" => shard.to_string())
                        .set(*load);
                }
                metrics::gauge!("shardgate_shard_load_ratio", "database" => db.name.clone())
                    .set(sample.ratio);
                if !db.auto_rebalance || sample.shards.is_empty() {
                    continue;
                }
                let map = state.map();
                let hot = entry
                    .0
                    .observe(started.elapsed(), &sample.shards, map.weights());
                if hot.is_empty() || state.busy.load(Ordering::Acquire) {
                    continue;
                }
                match plan_rebalance(&map, &sample.slots, &rebalance_config(db)) {
                    Ok(plan) if !plan.plan.is_empty() => {
                        tracing::info!(database = %db.name, ratio_before = plan.ratio_before, ratio_after = plan.ratio_after, slots = plan.plan.moved_slots(), "auto_rebalance: applying a plan");
                        match start_plan(&app, &db.name, &plan) {
                            Ok(_) => {
                                // Judge the new placement afresh.
                                entry.0 = HotTracker::new(db.hot_ratio, db.hot_window);
                            }
                            Err((_, e)) => {
                                tracing::warn!(database = %db.name, "auto_rebalance: {e}")
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(database = %db.name, "auto_rebalance: {e}"),
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardgate_shardmap::ShardSpec;

    #[test]
    fn moves_to_skips_slots_already_there_and_groups_by_owner() {
        let map = ShardMap::initial_contiguous(&[ShardSpec::default(); 4], 16).expect("map");
        // Shards own 0-3, 4-7, 8-11, 12-15.
        let groups = moves_to(&map, 2, 9, 1);
        assert_eq!(
            groups,
            vec![
                MoveGroup {
                    from: 0,
                    to: 1,
                    slots: vec![2, 3]
                },
                MoveGroup {
                    from: 2,
                    to: 1,
                    slots: vec![8, 9]
                },
            ]
        );
        assert!(moves_to(&map, 4, 7, 1).is_empty());
        // A plan's scattered single-slot moves: one group per (from, to).
        let plan = [(13, 0), (2, 3), (12, 0), (1, 3)].map(|(slot, to)| SlotMove {
            lo: slot,
            hi: slot,
            from: map.shard_of_slot(slot),
            to,
        });
        let groups = group_moves(&plan);
        assert_eq!(groups.len(), 2);
        assert_eq!(
            (groups[0].from, groups[0].to, groups[0].slots.clone()),
            (0, 3, vec![1, 2])
        );
        assert_eq!(
            (groups[1].from, groups[1].to, groups[1].slots.clone()),
            (3, 0, vec![12, 13])
        );
    }

    #[test]
    fn batches_pack_whole_slots_up_to_the_limit() {
        let counts: HashMap<u32, u64> = [(0, 3000), (1, 1500), (2, 1000), (3, 9000), (5, 10)]
            .into_iter()
            .collect();
        let slots: Vec<u32> = (0..=6).collect();
        assert_eq!(
            batches(&slots, &counts, 5000),
            vec![
                (vec![0, 1], 4500),
                (vec![2], 1000),
                (vec![3, 4], 9000),
                (vec![5, 6], 10)
            ]
        );
        // Empty slots join whatever batch is open; scattered slots share a batch.
        assert_eq!(
            batches(&[7, 9, 40], &counts, 5000),
            vec![(vec![7, 9, 40], 0)]
        );
    }

    #[test]
    fn slot_filters_are_ranges_or_lists() {
        let t = MovedTable {
            name: "\"users\"".into(),
            column: "\"id\"".into(),
            key_type: KeyType::Int8,
        };
        assert!(slot_filter(&t, 4096, &[5, 6, 7]).ends_with("BETWEEN 5 AND 7"));
        assert!(slot_filter(&t, 4096, &[9]).ends_with("= 9"));
        assert!(slot_filter(&t, 4096, &[5, 9]).ends_with("= ANY('{5,9}'::bigint[])"));
    }
}
