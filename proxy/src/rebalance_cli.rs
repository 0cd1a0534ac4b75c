//! `shardgate rebalance ...`: the DBA's side of slot moves. Every subcommand talks to a
//! running shardgate's admin console (database `shardgate`, an `admin = true` user) over
//! the simple query protocol, the only one the console speaks:
//!
//! * `plan`   — `REBALANCE PLAN [db]`: the moves, the predicted load per shard, max/mean.
//! * `apply`  — shows the plan, asks (or `--yes`), `REBALANCE APPLY [db]`, then watches.
//! * `move`   — `MOVE SLOTS lo-hi TO n [IN db]`, then watches.
//! * `status` — `SHOW MOVES` as a table.
//!
//! Watching polls `SHOW MOVES` every 200 ms and draws a progress bar (on a terminal) or
//! prints a line per phase (otherwise) until the job is `done` (exit 0) or `failed`
//! (exit 1, with the job's error). Stopping the watch (Ctrl-C) does not stop the move.
//!
//! Where the console is: `--admin-url`, else the `--config` file (its listen address and
//! its first `admin = true` user), else `$SHARDGATE_ADMIN_URL`.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Subcommand};
use futures_util::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use shardgate_config::Config;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

/// The environment variable naming the admin console when no flag does.
const ADMIN_URL_ENV: &str = "SHARDGATE_ADMIN_URL";
/// The console's database name.
const CONSOLE_DB: &str = "shardgate";
/// How often a running job is looked at.
const POLL: Duration = Duration::from_millis(200);
/// How long a lost console connection is retried while watching a job.
const RECONNECT_FOR: Duration = Duration::from_secs(15);

#[derive(Args)]
pub struct RebalanceArgs {
    /// The admin console: a connection string or postgres:// URL (an admin user).
    ///
    /// The database defaults to `shardgate`. Without this flag: the --config file's listen
    /// address and first `admin = true` user, else $SHARDGATE_ADMIN_URL.
    #[arg(long, global = true, value_name = "URL")]
    admin_url: Option<String>,
    /// The sharded database (needed when shardgate serves several).
    #[arg(long, global = true, value_name = "NAME")]
    database: Option<String>,
    #[command(subcommand)]
    command: RebalanceCommand,
}

#[derive(Subcommand)]
pub enum RebalanceCommand {
    /// Show the moves the planner proposes and the load per shard before and after.
    Plan,
    /// Apply the current plan (asks first unless --yes) and follow the move to its end.
    Apply {
        /// Do not ask for confirmation (required when standard input is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Move slots to a shard and follow the move to its end.
    Move {
        /// One slot (`17`) or an inclusive range (`0-63`).
        #[arg(long, value_parser = parse_slots, value_name = "N|LO-HI")]
        slots: Slots,
        /// The shard that receives them.
        #[arg(long, value_name = "SHARD")]
        to: u32,
    },
    /// List the slot-move jobs of the running shardgate (SHOW MOVES).
    Status,
}

/// What went wrong, and the exit status to report it with.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
    /// A mistake in how the command was called (exit status 2, as clap uses).
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new(message)
    }
}

/// Runs one `shardgate rebalance` subcommand; `config` is the global `--config`.
pub fn run(args: RebalanceArgs, config: Option<&Path>) -> ExitCode {
    match run_inner(args, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("shardgate rebalance: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn run_inner(args: RebalanceArgs, config: Option<&Path>) -> Result<(), Failure> {
    if let Some(db) = &args.database {
        check_database_name(db).map_err(Failure::usage)?;
    }
    // Refuse before connecting: nobody can answer the question.
    if let RebalanceCommand::Apply { yes: false } = args.command {
        if !std::io::stdin().is_terminal() {
            return Err(Failure::usage(
                "refusing to apply without confirmation: standard input is not a terminal. \
                 Review the moves with `shardgate rebalance plan`, then run \
                 `shardgate rebalance apply --yes`",
            ));
        }
    }
    let env_url = std::env::var(ADMIN_URL_ENV).ok();
    let target = admin_target(args.admin_url.as_deref(), config, env_url.as_deref())
        .map_err(Failure::usage)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    runtime.block_on(async move {
        let mut console = Console::connect(target).await?;
        let db = args.database.as_deref();
        match args.command {
            RebalanceCommand::Plan => {
                let plan = console.plan(db).await?;
                print!("{}", render_plan(&plan));
                Ok(())
            }
            RebalanceCommand::Apply { yes } => apply(&mut console, db, yes).await,
            RebalanceCommand::Move { slots, to } => {
                let sql = move_command(slots, to, db);
                let table = console.query(&sql).await?;
                let id = job_id(&table, &sql)?;
                eprintln!("started move {id}: slots {slots} to shard {to}");
                watch(&mut console, id, db).await
            }
            RebalanceCommand::Status => {
                let moves = console.moves().await?;
                let moves: Vec<MoveRow> = moves
                    .into_iter()
                    .filter(|m| db.is_none_or(|d| m.database == d))
                    .collect();
                if moves.is_empty() {
                    println!("no slot moves since shardgate started");
                } else {
                    print!("{}", render_moves_table(&moves));
                }
                Ok(())
            }
        }
    })
}

async fn apply(console: &mut Console, db: Option<&str>, yes: bool) -> Result<(), Failure> {
    let plan = console.plan(db).await?;
    print!("{}", render_plan(&plan));
    if plan.moves.is_empty() {
        return Ok(());
    }
    if !yes && !confirm("Apply this plan?")? {
        return Err(Failure::new("not applied"));
    }
    let sql = match db {
        Some(db) => format!("REBALANCE APPLY {db}"),
        None => "REBALANCE APPLY".to_string(),
    };
    let table = console.query(&sql).await?;
    let id = job_id(&table, &sql)?;
    if id == 0 {
        // The planner looked again and found nothing to do (load changed meanwhile).
        println!("nothing applied: the plan is empty now");
        return Ok(());
    }
    eprintln!("started move {id}");
    watch(console, id, db).await
}

/// Asks a yes/no question on the terminal; anything but y/yes is no.
fn confirm(question: &str) -> Result<bool, Failure> {
    let mut err = std::io::stderr();
    let _ = write!(err, "{question} [y/N] ");
    let _ = err.flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    Ok(matches!(
        line.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

// ---- slots and names ----------------------------------------------------------------------

/// An inclusive range of slots, as `--slots` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    pub lo: u32,
    pub hi: u32,
}

impl fmt::Display for Slots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// `N` or `LO-HI` (inclusive, LO <= HI).
fn parse_slots(text: &str) -> Result<Slots, String> {
    let text = text.trim();
    let number = |part: &str, what: &str| -> Result<u32, String> {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!(
                "{text:?}: the {what} is missing (write N or LO-HI, e.g. 17 or 0-63)"
            ));
        }
        part.parse::<u32>().map_err(|_| {
            format!("{text:?}: {part:?} is not a slot number (slots are 0, 1, 2, ...)")
        })
    };
    match text.split_once('-') {
        None => {
            let n = number(text, "slot")?;
            Ok(Slots { lo: n, hi: n })
        }
        Some((lo, hi)) => {
            let (lo, hi) = (number(lo, "first slot")?, number(hi, "last slot")?);
            if lo > hi {
                return Err(format!(
                    "{text:?}: the range is backwards (first slot {lo} > last slot {hi})"
                ));
            }
            Ok(Slots { lo, hi })
        }
    }
}

/// Database names go into console commands unquoted: allow only what needs no quoting.
fn check_database_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--database {name:?}: only letters, digits and _ - . $ are supported"
        ))
    }
}

fn move_command(slots: Slots, to: u32, db: Option<&str>) -> String {
    let mut sql = format!("MOVE SLOTS {slots} TO {to}");
    if let Some(db) = db {
        let _ = write!(sql, " IN {db}");
    }
    sql
}

// ---- where the console is -----------------------------------------------------------------

/// The console's connection settings (the password stays inside; `describe` omits it).
struct AdminTarget {
    config: tokio_postgres::Config,
}

impl AdminTarget {
    fn from_conninfo(url: &str) -> Result<AdminTarget, String> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| format!("--admin-url / ${ADMIN_URL_ENV}: {e}"))?;
        if config.get_dbname().is_none() {
            config.dbname(CONSOLE_DB);
        }
        Ok(AdminTarget::finish(config))
    }

    fn finish(mut config: tokio_postgres::Config) -> AdminTarget {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("shardgate rebalance");
        }
        AdminTarget { config }
    }

    /// `host:port as user, database shardgate` (no password), for messages.
    fn describe(&self) -> String {
        let c = &self.config;
        let host = match c.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = c.get_ports().first().copied().unwrap_or(5432);
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        format!(
            "{host}:{port} as {}, database {}",
            c.get_user().unwrap_or("?"),
            c.get_dbname().unwrap_or(CONSOLE_DB)
        )
    }
}

/// `--admin-url` wins, then `--config`, then `$SHARDGATE_ADMIN_URL`.
fn admin_target(
    url: Option<&str>,
    config: Option<&Path>,
    env_url: Option<&str>,
) -> Result<AdminTarget, String> {
    if let Some(url) = url {
        return AdminTarget::from_conninfo(url);
    }
    if let Some(path) = config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--config {}: {e}", path.display()))?;
        return target_from_config(&text, &path.display().to_string());
    }
    if let Some(url) = env_url.filter(|u| !u.trim().is_empty()) {
        return AdminTarget::from_conninfo(url);
    }
    Err(format!(
        "where is shardgate? Give --admin-url URL, --config FILE (its listen address and \
         admin user are used) or ${ADMIN_URL_ENV}"
    ))
}

/// The console of the shardgate that runs with this config text: its listen address (a
/// wildcard address means this machine) and its first `admin = true` user.
fn target_from_config(text: &str, origin: &str) -> Result<AdminTarget, String> {
    let config = Config::parse(text, origin).map_err(|e| e.to_string())?;
    let admin = config.users.iter().find(|u| u.admin).ok_or_else(|| {
        format!(
            "{origin}: no [[users]] entry has admin = true; add one (and reload shardgate) \
             or pass --admin-url"
        )
    })?;
    let listen = config.general.listen;
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let mut pg = tokio_postgres::Config::new();
    pg.host(ip.to_string())
        .port(listen.port())
        .user(&admin.name)
        .dbname(CONSOLE_DB);
    if let Some(password) = &admin.password {
        pg.password(password);
    }
    Ok(AdminTarget::finish(pg))
}

// ---- the console connection ---------------------------------------------------------------

/// The answer to one console command: column names and text values.
#[derive(Debug, Clone, Default, PartialEq)]
struct Table {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

impl Table {
    /// Each row as column name -> value (empty for NULL).
    fn records(&self) -> Vec<BTreeMap<&str, &str>> {
        self.rows
            .iter()
            .map(|row| {
                self.columns
                    .iter()
                    .zip(row)
                    .map(|(c, v)| (c.as_str(), v.as_deref().unwrap_or("")))
                    .collect()
            })
            .collect()
    }

    fn require(&self, columns: &[&str], what: &str) -> Result<(), String> {
        let missing: Vec<&&str> = columns
            .iter()
            .filter(|c| !self.columns.iter().any(|have| have == *c))
            .collect();
        if missing.is_empty() || self.rows.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{what}: the answer has no column {missing:?} (columns: {:?}); is this \
                 shardgate older than this tool?",
                self.columns
            ))
        }
    }
}

struct Console {
    target: AdminTarget,
    client: Client,
    notices: mpsc::UnboundedReceiver<String>,
}

impl Console {
    async fn connect(target: AdminTarget) -> Result<Console, Failure> {
        let (client, notices) = open(&target).await.map_err(|e| {
            Failure::new(format!(
                "cannot log in to the admin console at {}: {e} (is shardgate running there, \
                 and is the user an admin = true user?)",
                target.describe()
            ))
        })?;
        Ok(Console {
            target,
            client,
            notices,
        })
    }

    async fn reconnect(&mut self) -> Result<(), String> {
        let (client, notices) = open(&self.target).await?;
        self.client = client;
        self.notices = notices;
        Ok(())
    }

    async fn query(&mut self, sql: &str) -> Result<Table, String> {
        let result = self.client.simple_query(sql).await;
        // Notices (e.g. "the plan is empty") come before the answer: show them first.
        while let Ok(n) = self.notices.try_recv() {
            eprintln!("shardgate: {n}");
        }
        let messages =
            result.map_err(|e| format!("{sql}: {}", crate::server::describe_error(&e)))?;
        let mut table = Table::default();
        for m in messages {
            match m {
                SimpleQueryMessage::RowDescription(cols) => {
                    table.columns = cols.iter().map(|c| c.name().to_string()).collect();
                }
                SimpleQueryMessage::Row(row) => {
                    if table.columns.is_empty() {
                        table.columns =
                            row.columns().iter().map(|c| c.name().to_string()).collect();
                    }
                    let mut values = Vec::with_capacity(row.len());
                    for i in 0..row.len() {
                        let v = row
                            .try_get(i)
                            .map_err(|e| format!("{sql}: bad value: {e}"))?;
                        values.push(v.map(str::to_owned));
                    }
                    table.rows.push(values);
                }
                _ => {}
            }
        }
        Ok(table)
    }

    async fn plan(&mut self, db: Option<&str>) -> Result<Plan, String> {
        let sql = match db {
            Some(db) => format!("REBALANCE PLAN {db}"),
            None => "REBALANCE PLAN".to_string(),
        };
        let table = self.query(&sql).await?;
        parse_plan(&table).map_err(|e| format!("{sql}: {e}"))
    }

    async fn moves(&mut self) -> Result<Vec<MoveRow>, String> {
        let table = self.query("SHOW MOVES").await?;
        parse_moves(&table).map_err(|e| format!("SHOW MOVES: {e}"))
    }
}

async fn open(target: &AdminTarget) -> Result<(Client, mpsc::UnboundedReceiver<String>), String> {
    let (client, mut connection) = target
        .config
        .connect(NoTls)
        .await
        .map_err(|e| crate::server::describe_error(&e))?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notice(n) = m {
                // The receiver may be gone (a replaced connection): nothing to do then.
                let _ = tx.send(n.message().to_string());
            }
        }
    });
    Ok((client, rx))
}

/// The job id a `MOVE SLOTS` / `REBALANCE APPLY` answer carries in its `move` column.
fn job_id(table: &Table, sql: &str) -> Result<u64, String> {
    let value = table
        .records()
        .first()
        .and_then(|r| r.get("move").map(|v| v.to_string()));
    let Some(value) = value else {
        return Err(format!(
            "{sql}: no job id in the answer (expected a column `move`, got {:?})",
            table.columns
        ));
    };
    value
        .trim()
        .parse()
        .map_err(|_| format!("{sql}: job id {value:?} is not a number"))
}

// ---- the plan -----------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct PlannedMove {
    slots: String,
    from: String,
    to: String,
}

#[derive(Debug, Clone, PartialEq)]
struct ShardLoad {
    shard: String,
    before: Option<f64>,
    after: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Plan {
    moves: Vec<PlannedMove>,
    shards: Vec<ShardLoad>,
    /// max/mean before and after.
    ratio: Option<(Option<f64>, Option<f64>)>,
}

/// `REBALANCE PLAN` rows: `kind` = move | shard | ratio, with `slots, from_shard,
/// to_shard, load_before, load_after`.
fn parse_plan(table: &Table) -> Result<Plan, String> {
    table.require(&["kind", "load_before", "load_after"], "REBALANCE PLAN")?;
    let number = |v: &str| v.trim().parse::<f64>().ok();
    let mut plan = Plan::default();
    for r in table.records() {
        let get = |c: &str| r.get(c).copied().unwrap_or("");
        match get("kind") {
            "move" => plan.moves.push(PlannedMove {
                slots: get("slots").to_string(),
                from: get("from_shard").to_string(),
                to: get("to_shard").to_string(),
            }),
            "shard" => {
                // The shard's number: a `shard` column if there is one, else whichever of
                // from/to carries it, else the row's place among the shard rows.
                let shard = ["shard", "from_shard", "to_shard"]
                    .iter()
                    .map(|c| get(c))
                    .find(|v| !v.is_empty())
                    .map(str::to_string)
                    .unwrap_or_else(|| plan.shards.len().to_string());
                plan.shards.push(ShardLoad {
                    shard,
                    before: number(get("load_before")),
                    after: number(get("load_after")),
                });
            }
            "ratio" => plan.ratio = Some((number(get("load_before")), number(get("load_after")))),
            other => return Err(format!("unknown row kind {other:?}")),
        }
    }
    Ok(plan)
}

/// Slots in `N`, `LO-HI` or a comma list of those (0 when unreadable).
fn slot_count(ranges: &str) -> u64 {
    ranges
        .split(',')
        .map(|r| match parse_slots(r) {
            Ok(s) => u64::from(s.hi - s.lo) + 1,
            Err(_) => 0,
        })
        .sum()
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".into(),
    }
}

fn render_plan(plan: &Plan) -> String {
    let mut s = String::new();
    if plan.moves.is_empty() {
        s.push_str("No moves planned: no shard is hot enough to move slots off it.\n");
    } else {
        // One paragraph per (from, to) pair, the slot ranges wrapped.
        let mut pairs: Vec<(&str, &str, Vec<&str>)> = Vec::new();
        for m in &plan.moves {
            match pairs
                .iter_mut()
                .find(|(f, t, _)| *f == m.from && *t == m.to)
            {
                Some((_, _, ranges)) => ranges.push(&m.slots),
                None => pairs.push((&m.from, &m.to, vec![&m.slots])),
            }
        }
        let total: u64 = plan.moves.iter().map(|m| slot_count(&m.slots)).sum();
        let _ = writeln!(s, "Planned moves: {}", plural(total, "slot", "slots"));
        for (from, to, ranges) in pairs {
            let n: u64 = ranges.iter().map(|r| slot_count(r)).sum();
            let _ = writeln!(
                s,
                "  shard {from} -> shard {to}: {}",
                plural(n, "slot", "slots")
            );
            let mut line = String::from("   ");
            for r in ranges {
                if line.len() + r.len() + 1 > 88 {
                    let _ = writeln!(s, "{line}");
                    line = String::from("   ");
                }
                line.push(' ');
                line.push_str(r);
            }
            let _ = writeln!(s, "{line}");
        }
    }
    if !plan.shards.is_empty() {
        s.push_str("\nPredicted load per shard (keyed statements/s):\n");
        let rows: Vec<Vec<String>> = plan
            .shards
            .iter()
            .map(|l| vec![l.shard.clone(), fmt_opt(l.before, 1), fmt_opt(l.after, 1)])
            .collect();
        s.push_str(&indent(
            &text_table(&["shard", "before", "after"], &rows),
            "  ",
        ));
    }
    if let Some((before, after)) = plan.ratio {
        let _ = writeln!(
            s,
            "\nmax/mean load: {} -> {}",
            fmt_opt(before, 2),
            fmt_opt(after, 2)
        );
    }
    s
}

// ---- SHOW MOVES ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobState {
    Running,
    Done,
    Failed,
}

/// One row of `SHOW MOVES`.
#[derive(Debug, Clone, PartialEq)]
struct MoveRow {
    id: u64,
    database: String,
    slots: String,
    from: String,
    to: String,
    /// `None` for a state this tool does not know (treated as still running).
    state: Option<JobState>,
    state_text: String,
    phase: String,
    rows_copied: u64,
    rows_total: u64,
    cutovers: u64,
    pause_ms_last: Option<f64>,
    pause_ms_max: Option<f64>,
    error: String,
}

use crate::admin::MOVE_COLUMNS;

fn parse_moves(table: &Table) -> Result<Vec<MoveRow>, String> {
    table.require(&MOVE_COLUMNS, "SHOW MOVES")?;
    table
        .records()
        .iter()
        .map(|r| {
            let get = |c: &str| r.get(c).copied().unwrap_or("").trim();
            let count = |c: &str| -> Result<u64, String> {
                let v = get(c);
                if v.is_empty() {
                    return Ok(0);
                }
                v.parse().map_err(|_| format!("{c} = {v:?} is not a count"))
            };
            let state_text = get("state").to_string();
            let state = match state_text.as_str() {
                "running" => Some(JobState::Running),
                "done" => Some(JobState::Done),
                "failed" => Some(JobState::Failed),
                _ => None,
            };
            Ok(MoveRow {
                id: get("id")
                    .parse()
                    .map_err(|_| format!("id = {:?} is not a number", get("id")))?,
                database: get("database").to_string(),
                slots: get("slots").to_string(),
                from: get("from_shard").to_string(),
                to: get("to_shard").to_string(),
                state,
                state_text,
                phase: get("phase").to_string(),
                rows_copied: count("rows_copied")?,
                rows_total: count("rows_total")?,
                cutovers: count("cutovers")?,
                pause_ms_last: get("pause_ms_last").parse().ok(),
                pause_ms_max: get("pause_ms_max").parse().ok(),
                error: get("error").to_string(),
            })
        })
        .collect()
}

/// Milliseconds without noise: `12 ms`, `0.4 ms`.
fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 10.0 || v == v.trunc() => format!("{v:.0} ms"),
        Some(v) => format!("{v:.1} ms"),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// What a move is: `move 3 (app): slots 0-63, shard 0 -> 1`.
fn move_title(m: &MoveRow) -> String {
    let db = if m.database.is_empty() {
        String::new()
    } else {
        format!(" ({})", m.database)
    };
    format!(
        "move {}{db}: slots {}, shard {} -> {}",
        m.id,
        short_slots(&m.slots),
        m.from,
        m.to
    )
}

/// A plan's slot list can be long (`3,17,40-41,...`): the first ranges and the count.
fn short_slots(slots: &str) -> String {
    const MAX: usize = 32;
    if slots.len() <= MAX {
        return slots.to_string();
    }
    let mut shown = String::new();
    for r in slots.split(',').filter(|r| !r.trim().is_empty()) {
        if shown.len() + r.len() + 1 > MAX - 8 {
            break;
        }
        shown.push_str(r.trim());
        shown.push(',');
    }
    format!("{shown}... ({} slots)", slot_count(slots))
}

/// Where a move stands, in one line: phase, rows, cut-overs, pauses, error.
fn move_progress(m: &MoveRow) -> String {
    let mut s = if m.phase.is_empty() {
        m.state_text.clone()
    } else {
        m.phase.clone()
    };
    if m.rows_total > 0 || m.rows_copied > 0 {
        let _ = write!(s, ", {}/{} rows", m.rows_copied, m.rows_total);
    }
    if m.cutovers > 0 {
        let _ = write!(s, ", {}", plural(m.cutovers, "cut-over", "cut-overs"));
    }
    if m.pause_ms_last.is_some() && m.cutovers > 0 {
        let _ = write!(
            s,
            ", pause {} (max {})",
            fmt_ms(m.pause_ms_last),
            fmt_ms(m.pause_ms_max)
        );
    }
    if !m.error.is_empty() {
        let _ = write!(s, ": {}", m.error);
    }
    s
}

/// One SHOW MOVES row for a person: `move 3 (app): slots 0-63, shard 0 -> 1: copying, ...`.
fn render_move(m: &MoveRow) -> String {
    format!("{}: {}", move_title(m), move_progress(m))
}

fn render_moves_table(moves: &[MoveRow]) -> String {
    let rows: Vec<Vec<String>> = moves
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.database.clone(),
                short_slots(&m.slots),
                m.from.clone(),
                m.to.clone(),
                m.state_text.clone(),
                m.phase.clone(),
                format!("{}/{}", m.rows_copied, m.rows_total),
                m.cutovers.to_string(),
                fmt_ms(m.pause_ms_last),
                fmt_ms(m.pause_ms_max),
                m.error.clone(),
            ]
        })
        .collect();
    text_table(
        &[
            "id",
            "database",
            "slots",
            "from",
            "to",
            "state",
            "phase",
            "rows",
            "cutovers",
            "pause",
            "max pause",
            "error",
        ],
        &rows,
    )
}

/// Left-aligned columns separated by two spaces (trailing blanks trimmed).
fn text_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, v) in widths.iter_mut().zip(row) {
            *w = (*w).max(v.chars().count());
        }
    }
    let mut s = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (cell, w) in cells.iter().zip(&widths) {
            let _ = write!(l, "{cell:<w$}  ");
        }
        s.push_str(l.trim_end());
        s.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    s
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines().map(|l| format!("{prefix}{l}\n")).collect()
}

// ---- watching a job -----------------------------------------------------------------------

/// Shows a job's progress until it ends: Ok when `done`, an error when `failed`. Job ids
/// count per database: without `db` the console acted on its only sharded database.
async fn watch(console: &mut Console, id: u64, db: Option<&str>) -> Result<(), Failure> {
    let mut view = Progress::new(std::io::stderr().is_terminal());
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let moves = match console.moves().await {
            Ok(m) => m,
            Err(e) => {
                view.note(&format!("lost the admin console ({e}); reconnecting"));
                reconnect(console).await.map_err(|e| {
                    view.abandon();
                    Failure::new(format!(
                        "cannot reach the admin console again: {e}. The move may still be \
                         running (or shardgate restarted and recovered it): see `shardgate \
                         rebalance status` and `shardgate shardmap show`"
                    ))
                })?;
                continue;
            }
        };
        let Some(m) = moves
            .into_iter()
            .find(|m| m.id == id && db.is_none_or(|d| m.database == d))
        else {
            view.abandon();
            return Err(Failure::new(format!(
                "move {id} is not in SHOW MOVES: shardgate restarted since it began (a \
                 restart finishes or rolls back an interrupted cut-over). See `shardgate \
                 rebalance status` and `shardgate shardmap show`"
            )));
        };
        view.update(&m);
        match m.state {
            Some(JobState::Done) => {
                view.finish(&m);
                println!("{}", render_move(&m));
                return Ok(());
            }
            Some(JobState::Failed) => {
                view.abandon();
                println!("{}", render_move(&m));
                let error = if m.error.is_empty() {
                    "no error given".to_string()
                } else {
                    m.error.clone()
                };
                return Err(Failure::new(format!("move {id} failed: {error}")));
            }
            Some(JobState::Running) | None => {}
        }
    }
}

async fn reconnect(console: &mut Console) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + RECONNECT_FOR;
    loop {
        match console.reconnect().await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// A progress bar on a terminal; otherwise a line whenever the phase or cut-over count
/// changes (so logs stay short).
struct Progress {
    bar: Option<ProgressBar>,
    tty: bool,
    last: Option<(String, String, u64)>,
}

impl Progress {
    fn new(tty: bool) -> Progress {
        Progress {
            bar: None,
            tty,
            last: None,
        }
    }

    fn update(&mut self, m: &MoveRow) {
        if !self.tty {
            let key = (m.state_text.clone(), m.phase.clone(), m.cutovers);
            if self.last.as_ref() != Some(&key) {
                eprintln!("{}", render_move(m));
                self.last = Some(key);
            }
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new(m.rows_total.max(1));
            let style = ProgressStyle::with_template(
                "{prefix}\n[{elapsed_precise}] {bar:40.cyan/blue} {pos}/{len} rows  {msg}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(move_title(m));
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        if m.rows_total > 0 {
            bar.set_length(m.rows_total);
        }
        bar.set_position(m.rows_copied);
        bar.set_message(phase_line(m));
    }

    fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn finish(&mut self, m: &MoveRow) {
        if let Some(bar) = self.bar.take() {
            bar.set_position(m.rows_total.max(m.rows_copied));
            bar.finish_with_message(phase_line(m));
        }
    }

    fn abandon(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}

/// The bar's message: phase, cut-overs and pauses (rows are on the bar itself).
fn phase_line(m: &MoveRow) -> String {
    let mut s = m.phase.clone();
    if m.cutovers > 0 {
        let _ = write!(
            s,
            "  {}, pause {} (max {})",
            plural(m.cutovers, "cut-over", "cut-overs"),
            fmt_ms(m.pause_ms_last),
            fmt_ms(m.pause_ms_max)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_parse_single_and_ranges() {
        assert_eq!(parse_slots("17"), Ok(Slots { lo: 17, hi: 17 }));
        assert_eq!(parse_slots("0-63"), Ok(Slots { lo: 0, hi: 63 }));
        assert_eq!(parse_slots(" 5 - 9 "), Ok(Slots { lo: 5, hi: 9 }));
        assert_eq!(parse_slots("7-7"), Ok(Slots { lo: 7, hi: 7 }));
        assert_eq!(Slots { lo: 0, hi: 63 }.to_string(), "0-63");
        assert_eq!(Slots { lo: 17, hi: 17 }.to_string(), "17");
    }

    #[test]
    fn slots_errors_say_what_is_wrong() {
        let err = |s: &str| parse_slots(s).expect_err(s);
        assert!(err("63-0").contains("backwards"), "{}", err("63-0"));
        assert!(err("").contains("missing"), "{}", err(""));
        assert!(err("-5").contains("first slot is missing"), "{}", err("-5"));
        assert!(err("5-").contains("last slot is missing"), "{}", err("5-"));
        assert!(err("a-b").contains("not a slot number"), "{}", err("a-b"));
        assert!(
            err("1-2-3").contains("not a slot number"),
            "{}",
            err("1-2-3")
        );
        assert!(err("4294967296").contains("not a slot number"));
        assert!(err("1.5").contains("not a slot number"));
    }

    #[test]
    fn move_command_text() {
        let s = Slots { lo: 0, hi: 63 };
        assert_eq!(move_command(s, 1, None), "MOVE SLOTS 0-63 TO 1");
        assert_eq!(
            move_command(Slots { lo: 17, hi: 17 }, 2, Some("app")),
            "MOVE SLOTS 17 TO 2 IN app"
        );
    }

    #[test]
    fn database_names_that_need_no_quoting() {
        assert!(check_database_name("app_2-x.y").is_ok());
        assert!(check_database_name("").is_err());
        assert!(check_database_name("app; SHUTDOWN").is_err());
        assert!(check_database_name("a\"b").is_err());
    }

    const CONFIG: &str = r#"
[general]
listen = "0.0.0.0:6432"

[[users]]
name = "app"
password = "app"

[[users]]
name = "ops"
password = "s3cr3t 'quoted'"
admin = true

[[users]]
name = "ops2"
password = "other"
admin = true

[[databases]]
name = "app"
[[databases.shards]]
hosts = ["127.0.0.1:15432"]
"#;

    #[test]
    fn target_from_config_uses_listen_and_first_admin() {
        let t = target_from_config(CONFIG, "test.toml").expect("target");
        let c = &t.config;
        assert_eq!(
            c.get_hosts(),
            &[tokio_postgres::config::Host::Tcp("127.0.0.1".into())]
        );
        assert_eq!(c.get_ports(), &[6432]);
        assert_eq!(c.get_user(), Some("ops"));
        assert_eq!(c.get_password(), Some(&b"s3cr3t 'quoted'"[..]));
        assert_eq!(c.get_dbname(), Some("shardgate"));
        assert_eq!(t.describe(), "127.0.0.1:6432 as ops, database shardgate");
        assert!(!t.describe().contains("s3cr3t"));
    }

    #[test]
    fn target_from_config_keeps_a_specific_address_and_maps_ipv6_wildcard() {
        let text = CONFIG.replace("0.0.0.0:6432", "127.0.0.2:7000");
        let t = target_from_config(&text, "t").expect("target");
        assert_eq!(t.describe(), "127.0.0.2:7000 as ops, database shardgate");
        let text = CONFIG.replace("0.0.0.0:6432", "[::]:7001");
        let t = target_from_config(&text, "t").expect("target");
        assert_eq!(t.describe(), "[::1]:7001 as ops, database shardgate");
    }

    #[test]
    fn target_from_config_without_admin_or_broken() {
        let text = CONFIG.replace("admin = true", "admin = false");
        let e = target_from_config(&text, "t.toml").err().expect("no admin");
        assert!(e.contains("admin = true"), "{e}");
        let e = target_from_config("[general]\nlisten = 5\n", "bad.toml")
            .err()
            .expect("broken");
        assert!(e.contains("bad.toml"), "{e}");
    }

    #[test]
    fn admin_url_wins_then_config_then_env() {
        let url = "host=10.1.2.3 port=6000 user=a password=b";
        let t = admin_target(Some(url), None, Some("host=x")).expect("url");
        // The console database is filled in when the URL names none.
        assert_eq!(t.describe(), "10.1.2.3:6000 as a, database shardgate");
        let t =
            admin_target(None, None, Some("postgres://u:p@127.0.0.1:6001/shardgate")).expect("env");
        assert_eq!(t.describe(), "127.0.0.1:6001 as u, database shardgate");
        assert!(admin_target(None, None, None).is_err());
        assert!(admin_target(None, None, Some("  ")).is_err());
        let e = admin_target(Some("host=x port=notaport"), None, None)
            .err()
            .expect("bad url");
        assert!(e.contains("--admin-url"), "{e}");
        let e = admin_target(None, Some(Path::new("/nonexistent/sg.toml")), None)
            .err()
            .expect("missing file");
        assert!(e.contains("/nonexistent/sg.toml"), "{e}");
    }

    fn table(columns: &[&str], rows: &[&[&str]]) -> Table {
        Table {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: rows
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|v| (!v.is_empty()).then(|| v.to_string()))
                        .collect()
                })
                .collect(),
        }
    }

    fn show_moves(rows: &[&[&str]]) -> Table {
        table(&MOVE_COLUMNS, rows)
    }

    #[test]
    fn show_moves_row_renders() {
        let t = show_moves(&[
            &[
                "3", "app", "0-63", "0", "1", "running", "copying", "1200", "5000", "0", "", "", "",
            ],
            &[
                "4", "app", "64-127", "*", "2", "done", "done", "5000", "5000", "2", "8.5", "40",
                "",
            ],
            &[
                "5",
                "app",
                "17",
                "0",
                "1",
                "failed",
                "rolled back",
                "10",
                "10",
                "1",
                "0.4",
                "0.4",
                "drain timed out after 5s",
            ],
        ]);
        let moves = parse_moves(&t).expect("parse");
        assert_eq!(moves.len(), 3);
        assert_eq!(moves[0].state, Some(JobState::Running));
        assert_eq!(
            render_move(&moves[0]),
            "move 3 (app): slots 0-63, shard 0 -> 1: copying, 1200/5000 rows"
        );
        assert_eq!(
            render_move(&moves[1]),
            "move 4 (app): slots 64-127, shard * -> 2: done, 5000/5000 rows, 2 cut-overs, \
             pause 8.5 ms (max 40 ms)"
        );
        assert_eq!(moves[2].state, Some(JobState::Failed));
        assert_eq!(
            render_move(&moves[2]),
            "move 5 (app): slots 17, shard 0 -> 1: rolled back, 10/10 rows, 1 cut-over, \
             pause 0.4 ms (max 0.4 ms): drain timed out after 5s"
        );
        let table = render_moves_table(&moves);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("id  database  slots"), "{table}");
        assert!(
            lines[2].contains("5000/5000") && lines[2].contains("8.5 ms"),
            "{table}"
        );
        assert!(lines[3].ends_with("drain timed out after 5s"), "{table}");
    }

    #[test]
    fn show_moves_columns_found_by_name_and_checked() {
        // Another column order, and an extra column, still parse.
        let mut cols: Vec<&str> = MOVE_COLUMNS.iter().rev().copied().collect();
        cols.push("extra");
        let t = table(
            &cols,
            &[&[
                "", "7", "9", "2", "10", "10", "done", "done", "1", "0", "0-1", "db", "8", "x",
            ]],
        );
        let m = &parse_moves(&t).expect("parse")[0];
        assert_eq!((m.id, m.rows_copied, m.cutovers), (8, 10, 2));
        assert_eq!(m.pause_ms_max, Some(7.0));
        // A missing column or a bad number is an error, not a panic.
        let t = table(&["id", "state"], &[&["1", "done"]]);
        assert!(parse_moves(&t).unwrap_err().contains("no column"));
        let t = show_moves(&[&[
            "x", "app", "0", "0", "1", "done", "done", "0", "0", "0", "", "", "",
        ]]);
        assert!(parse_moves(&t).unwrap_err().contains("id"));
        let t = show_moves(&[&[
            "1", "app", "0", "0", "1", "done", "done", "-3", "0", "0", "", "", "",
        ]]);
        assert!(parse_moves(&t).unwrap_err().contains("rows_copied"));
        // No rows at all: fine, whatever the columns.
        assert_eq!(parse_moves(&table(&[], &[])), Ok(vec![]));
    }

    #[test]
    fn plan_parses_and_renders() {
        let cols = crate::admin::PLAN_COLUMNS;
        let t = table(
            &cols,
            &[
                &["move", "0-63", "0", "1", "", ""],
                &["move", "100-101", "0", "2", "", ""],
                &["shard", "", "", "", "300", "200"],
                &["shard", "", "", "", "100", "150"],
                &["shard", "", "", "", "50", "100"],
                &["ratio", "", "", "", "2", "1.3333"],
            ],
        );
        let plan = parse_plan(&t).expect("plan");
        assert_eq!(plan.moves.len(), 2);
        assert_eq!(plan.shards[2].shard, "2");
        assert_eq!(plan.ratio, Some((Some(2.0), Some(1.3333))));
        let text = render_plan(&plan);
        assert!(text.contains("Planned moves: 66 slots\n"), "{text}");
        assert!(
            text.contains("  shard 0 -> shard 1: 64 slots\n    0-63\n"),
            "{text}"
        );
        assert!(
            text.contains("  shard 0 -> shard 2: 2 slots\n    100-101\n"),
            "{text}"
        );
        assert!(text.contains("\n  0      300.0   200.0\n"), "{text}");
        assert!(text.contains("max/mean load: 2.00 -> 1.33"), "{text}");

        let empty =
            parse_plan(&table(&cols, &[&["ratio", "", "", "", "1.1", "1.1"]])).expect("empty plan");
        assert!(render_plan(&empty).starts_with("No moves planned"));
        assert!(parse_plan(&table(&cols, &[&["what", "", "", "", "", ""]])).is_err());
    }

    #[test]
    fn plan_groups_ranges_per_pair_and_wraps() {
        let moves: Vec<PlannedMove> = (0..40)
            .map(|i| PlannedMove {
                slots: format!("{}", 1000 + i * 3),
                from: "1".into(),
                to: "0".into(),
            })
            .chain([PlannedMove {
                slots: "7-9".into(),
                from: "1".into(),
                to: "2".into(),
            }])
            .collect();
        let plan = Plan {
            moves,
            ..Plan::default()
        };
        let text = render_plan(&plan);
        assert!(
            text.starts_with("Planned moves: 43 slots\n  shard 1 -> shard 0: 40 slots\n"),
            "{text}"
        );
        assert!(
            text.contains("  shard 1 -> shard 2: 3 slots\n    7-9\n"),
            "{text}"
        );
        assert!(text.lines().all(|l| l.len() <= 88), "{text}");
        assert!(
            text.lines().filter(|l| l.starts_with("    1")).count() >= 2,
            "{text}"
        );
        assert_eq!(slot_count("0-63,100,7-8"), 67);
        assert_eq!(slot_count("x"), 0);
    }

    #[test]
    fn long_slot_lists_are_shortened() {
        assert_eq!(short_slots("0-63"), "0-63");
        let long: Vec<String> = (0..64).map(|i| (i * 7).to_string()).collect();
        let long = long.join(",") + ",";
        let short = short_slots(&long);
        assert!(short.starts_with("0,7,14,21,"), "{short}");
        assert!(short.ends_with("... (64 slots)"), "{short}");
        assert!(short.len() <= 40, "{short}");
    }

    #[test]
    fn job_id_from_answer() {
        assert_eq!(job_id(&table(&["move"], &[&["12"]]), "MOVE"), Ok(12));
        assert_eq!(
            job_id(&table(&["move"], &[&["0"]]), "REBALANCE APPLY"),
            Ok(0)
        );
        assert!(job_id(&table(&["x"], &[&["1"]]), "MOVE").is_err());
        assert!(job_id(&table(&["move"], &[]), "MOVE").is_err());
        assert!(job_id(&table(&["move"], &[&["abc"]]), "MOVE").is_err());
    }

    #[test]
    fn milliseconds_render_short() {
        assert_eq!(fmt_ms(None), "-");
        assert_eq!(fmt_ms(Some(12.0)), "12 ms");
        assert_eq!(fmt_ms(Some(12.46)), "12 ms");
        assert_eq!(fmt_ms(Some(3.24)), "3.2 ms");
        assert_eq!(fmt_ms(Some(0.0)), "0 ms");
    }
}
