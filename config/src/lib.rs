//! shardgate's configuration: the TOML schema, its defaults and its validation.
//!
//! Parsing is strict: unknown keys are errors, and every error names the file and the
//! line so an operator can fix it without guessing. This crate reads files and nothing else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub general: General,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub databases: Vec<Database>,
}

/// Process-wide settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct General {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Prometheus endpoint (`/metrics`); none when absent.
    pub metrics_listen: Option<SocketAddr>,
    pub pool_mode: PoolMode,
    /// Server connections per (database, user) pool, unless a database overrides it.
    pub pool_size: usize,
    /// How long a client waits for a server connection before it gets an error.
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// How long a client may take from TCP connect to a finished login.
    #[serde(with = "humantime_serde")]
    pub client_login_timeout: Duration,
    /// How long opening and authenticating a server connection may take.
    #[serde(with = "humantime_serde")]
    pub server_connect_timeout: Duration,
    /// Idle server connections older than this are closed.
    #[serde(with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    /// Largest message a client may send, in bytes.
    pub max_client_message_size: usize,
    /// Prepared statements kept per server connection before the oldest is closed.
    pub server_prepared_statements: usize,
    /// An unnamed statement a client parses again (same text and parameter types) is
    /// prepared on the server under its global name and reused there, so Postgres parses
    /// and plans it once per connection instead of at every execution. Off by default: the
    /// server then caches the statement's plan (after five runs it may settle on a generic
    /// plan), and a table change that alters its result columns fails its next run once
    /// per server connection with 0A000, as it does for any prepared statement (it is
    /// then prepared afresh at its next use).
    pub prepare_unnamed: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Plain reads may go to the primary even when a replica is healthy.
    pub primary_reads: bool,
    /// After a client's write commits, its reads go only to replicas that replayed it.
    pub read_your_writes: bool,
    /// Replicas further behind the primary than this (WAL bytes) get no reads.
    pub max_replica_lag_bytes: u64,
    /// Replicas whose last replayed transaction is older than this get no reads (optional:
    /// on an idle primary the replay age grows without real lag).
    #[serde(with = "humantime_serde")]
    pub max_replica_lag_time: Option<Duration>,
    pub load_balance: LoadBalance,
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub health_check_timeout: Duration,
    /// How long a host that failed stays out of rotation before it is tried again.
    #[serde(with = "humantime_serde")]
    pub ban_time: Duration,
    /// How long writes wait for a primary (during a failover) before they fail.
    #[serde(with = "humantime_serde")]
    pub failover_timeout: Duration,
    /// Promote the most caught-up replica when the primary is gone for `auto_promote_after`.
    pub auto_promote: bool,
    #[serde(with = "humantime_serde")]
    pub auto_promote_after: Duration,
    /// The user health checks log in as (default: the first user with a password).
    pub health_check_user: Option<String>,
    /// Threads serving clients. 0 (the default) means a quarter of the CPUs, at least one:
    /// the proxy usually shares the machine with Postgres or the application, and on a small
    /// box one thread spends the least CPU per transaction (fewer wake-ups across threads).
    pub workers: usize,
    /// On SIGTERM, how long transactions in flight may take to finish before the remaining
    /// clients are disconnected.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Statement logs (`SHARDGATE_LOG=shardgate::statements=debug`) show constants and
    /// Bind parameter values. Off: constants appear as `$n` and values are not logged.
    pub log_parameters: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalance {
    /// The replica with the fewest transactions in flight (ties: round robin).
    LeastOutstanding,
    RoundRobin,
}

impl Default for General {
    fn default() -> Self {
        General {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            metrics_listen: None,
            pool_mode: PoolMode::Transaction,
            pool_size: 20,
            checkout_timeout: Duration::from_secs(30),
            client_login_timeout: Duration::from_secs(15),
            server_connect_timeout: Duration::from_secs(5),
            server_idle_timeout: Duration::from_secs(600),
            max_client_message_size: 64 << 20,
            server_prepared_statements: 1000,
            prepare_unnamed: false,
            tls_cert: None,
            tls_key: None,
            primary_reads: false,
            read_your_writes: true,
            max_replica_lag_bytes: 16 << 20,
            max_replica_lag_time: None,
            load_balance: LoadBalance::LeastOutstanding,
            health_check_interval: Duration::from_millis(500),
            health_check_timeout: Duration::from_secs(2),
            ban_time: Duration::from_secs(10),
            failover_timeout: Duration::from_secs(30),
            auto_promote: false,
            auto_promote_after: Duration::from_secs(5),
            health_check_user: None,
            workers: 0,
            shutdown_timeout: Duration::from_secs(30),
            log_parameters: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection is held from a transaction's first statement to its end.
    Transaction,
    /// A server connection is held for the client's whole session.
    Session,
}

/// How a client proves who it is.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

/// A user clients log in as. The same name and password log in to the servers unless
/// `server_user`/`server_password` say otherwise.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub password: Option<String>,
    #[serde(default = "default_auth")]
    pub auth: AuthMethod,
    pub server_user: Option<String>,
    pub server_password: Option<String>,
    /// May use the admin console (database `shardgate`).
    #[serde(default)]
    pub admin: bool,
}

fn default_auth() -> AuthMethod {
    AuthMethod::ScramSha256
}

impl User {
    pub fn server_user(&self) -> &str {
        self.server_user.as_deref().unwrap_or(&self.name)
    }
    pub fn server_password(&self) -> Option<&str> {
        self.server_password.as_deref().or(self.password.as_deref())
    }
}

/// A logical database: the name clients use and the shards behind it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub name: String,
    /// The database name on the servers (default: `name`).
    pub server_database: Option<String>,
    /// Overrides `general.pool_size` for this database.
    pub pool_size: Option<usize>,
    pub shards: Vec<Shard>,
    /// Tables split across the shards by a key column. Every other table lives on the
    /// default shard (shard 0), except reference tables.
    #[serde(default)]
    pub sharded_tables: Vec<ShardedTable>,
    /// Tables with a full copy on every shard: read from any shard, written to all.
    #[serde(default)]
    pub reference_tables: Vec<String>,
    /// Functions (besides nextval, setval, advisory locks, ...) whose calls make a
    /// statement a write that must run on the primary.
    #[serde(default)]
    pub write_functions: Vec<String>,
    /// The shard map file (slot ranges per shard; `shardgate shardmap init` writes one),
    /// relative to this config file. Without one, the slots are spread over the shards in
    /// order, evenly.
    pub shard_map: Option<PathBuf>,
    /// Number of slots when there is no shard map file (a power of two).
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Writes that touch several shards in one transaction commit with two-phase commit
    /// (the shards need `max_prepared_transactions > 0`). Off: such writes are refused
    /// before anything is written.
    #[serde(default)]
    pub two_phase_commit: bool,
    // Hot-shard detection and the slot mover (docs/REBALANCING.md).
    /// Apply a rebalance plan by itself when a shard stays hot for `hot_window`.
    #[serde(default)]
    pub auto_rebalance: bool,
    /// A shard is hot above `hot_ratio` times the mean load.
    #[serde(default = "default_hot_ratio")]
    pub hot_ratio: f64,
    /// ... for at least this long.
    #[serde(default = "default_hot_window", with = "humantime_serde")]
    pub hot_window: Duration,
    /// How often per-slot load is sampled (load = keyed statements per second over the
    /// last interval).
    #[serde(default = "default_rebalance_interval", with = "humantime_serde")]
    pub rebalance_interval: Duration,
    /// At most this many slots move in one planned round.
    #[serde(default = "default_max_slots_per_round")]
    pub max_slots_per_round: u32,
    /// One cut-over (one write pause) moves whole slots holding at most about this many
    /// rows; a bigger slot moves alone.
    #[serde(default = "default_move_batch_rows")]
    pub move_batch_rows: u64,
    /// A cut-over waits this long for the transactions in flight to finish, else the
    /// move is rolled back (nothing lost) and reported failed.
    #[serde(default = "default_move_drain_timeout", with = "humantime_serde")]
    pub move_drain_timeout: Duration,
}

fn default_slots() -> u32 {
    4096
}

fn default_hot_ratio() -> f64 {
    1.5
}
fn default_hot_window() -> Duration {
    Duration::from_secs(60)
}
fn default_rebalance_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_max_slots_per_round() -> u32 {
    64
}
fn default_move_batch_rows() -> u64 {
    5000
}
fn default_move_drain_timeout() -> Duration {
    Duration::from_secs(5)
}

/// A table split across shards by the hash of one column.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShardedTable {
    /// Table name, optionally schema-qualified (`users`, `public.users`).
    pub name: String,
    /// The shard key column.
    pub column: String,
    /// The key column's type.
    #[serde(rename = "type")]
    pub key_type: KeyColumnType,
}

/// Shard key column types (hashing follows Postgres's hash partitioning for each).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeyColumnType {
    #[serde(alias = "int2")]
    Smallint,
    #[serde(alias = "int4", alias = "int")]
    Integer,
    #[serde(alias = "int8")]
    Bigint,
    Text,
    Varchar,
    Uuid,
}

impl Database {
    pub fn server_database(&self) -> &str {
        self.server_database.as_deref().unwrap_or(&self.name)
    }
}

/// One shard: its hosts. Roles (primary, replica) are discovered, not configured.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub hosts: Vec<SocketAddr>,
}

/// What is wrong with a configuration, with the place to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: String,
        line: usize,
        message: String,
    },
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_column(text, span.start))
                .unwrap_or((1, 1));
            // Quote the offending line: serde's message names the expected type, the line
            // names the key.
            let source = text
                .lines()
                .nth(line.saturating_sub(1))
                .unwrap_or("")
                .trim();
            ConfigError::Syntax {
                path: origin.to_string(),
                line,
                column,
                message: format!("{} (in `{source}`)", e.message()),
            }
        })?;
        config.validate(text, origin)?;
        Ok(config)
    }

    fn validate(&self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let invalid = |needle: &str, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            line: find_line(text, needle),
            message,
        };
        if self.general.pool_size == 0 {
            return Err(invalid(
                "pool_size",
                "general.pool_size must be at least 1".into(),
            ));
        }
        if self.general.max_client_message_size < 1024 {
            return Err(invalid(
                "max_client_message_size",
                "general.max_client_message_size must be at least 1024 bytes".into(),
            ));
        }
        if self.general.tls_cert.is_some() != self.general.tls_key.is_some() {
            return Err(invalid(
                "tls_",
                "general.tls_cert and general.tls_key must be set together".into(),
            ));
        }
        if let Some(name) = &self.general.health_check_user {
            if self.user(name).is_none() {
                return Err(invalid(
                    "health_check_user",
                    format!("general.health_check_user \"{name}\" is not a [[users]] entry"),
                ));
            }
        }
        if self.users.is_empty() {
            return Err(invalid(
                "[[users]]",
                "at least one [[users]] entry is required".into(),
            ));
        }
        for (i, user) in self.users.iter().enumerate() {
            if self.users[..i].iter().any(|u| u.name == user.name) {
                return Err(invalid(
                    &format!("\"{}\"", user.name),
                    format!("user \"{}\" is defined twice", user.name),
                ));
            }
            if user.auth != AuthMethod::Trust && user.password.is_none() {
                return Err(invalid(
                    &format!("\"{}\"", user.name),
                    format!(
                        "user \"{}\" needs a password for auth = {:?} (or auth = \"trust\")",
                        user.name, user.auth
                    ),
                ));
            }
        }
        if self.databases.is_empty() {
            return Err(invalid(
                "[[databases]]",
                "at least one [[databases]] entry is required".into(),
            ));
        }
        for (i, db) in self.databases.iter().enumerate() {
            if self.databases[..i].iter().any(|d| d.name == db.name) {
                return Err(invalid(
                    &format!("\"{}\"", db.name),
                    format!("database \"{}\" is defined twice", db.name),
                ));
            }
            if db.shards.is_empty() {
                return Err(invalid(
                    &format!("\"{}\"", db.name),
                    format!(
                        "database \"{}\" needs at least one [[databases.shards]]",
                        db.name
                    ),
                ));
            }
            if db.pool_size == Some(0) {
                return Err(invalid(
                    "pool_size",
                    format!("database \"{}\": pool_size must be at least 1", db.name),
                ));
            }
            if !db.slots.is_power_of_two() || db.slots > 1 << 20 {
                return Err(invalid(
                    "slots",
                    format!(
                        "database \"{}\": slots must be a power of two up to 1048576, not {}",
                        db.name, db.slots
                    ),
                ));
            }
            if !(db.hot_ratio.is_finite() && db.hot_ratio >= 1.0) {
                return Err(invalid(
                    "hot_ratio",
                    format!(
                        "database \"{}\": hot_ratio must be a number of at least 1, not {}",
                        db.name, db.hot_ratio
                    ),
                ));
            }
            for (key, zero) in [
                ("rebalance_interval", db.rebalance_interval.is_zero()),
                ("max_slots_per_round", db.max_slots_per_round == 0),
                ("move_batch_rows", db.move_batch_rows == 0),
                ("move_drain_timeout", db.move_drain_timeout.is_zero()),
            ] {
                if zero {
                    return Err(invalid(
                        key,
                        format!("database \"{}\": {key} must be more than 0", db.name),
                    ));
                }
            }
            if db.auto_rebalance && db.shard_map.is_none() {
                return Err(invalid(
                    "auto_rebalance",
                    format!(
                        "database \"{}\": auto_rebalance needs a shard_map file (moves rewrite it)",
                        db.name
                    ),
                ));
            }
            for (j, t) in db.sharded_tables.iter().enumerate() {
                let name = t.name.to_ascii_lowercase();
                if db.sharded_tables[..j]
                    .iter()
                    .any(|u| u.name.eq_ignore_ascii_case(&name))
                    || db
                        .reference_tables
                        .iter()
                        .any(|r| r.eq_ignore_ascii_case(&name))
                {
                    return Err(invalid(
                        &format!("\"{}\"", t.name),
                        format!(
                            "database \"{}\": table \"{}\" is listed twice",
                            db.name, t.name
                        ),
                    ));
                }
            }
            for shard in &db.shards {
                if shard.hosts.is_empty() {
                    return Err(invalid(
                        "hosts",
                        format!(
                            "database \"{}\": every shard needs at least one host",
                            db.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    /// The user health checks log in as.
    pub fn health_check_user(&self) -> Option<&User> {
        match &self.general.health_check_user {
            Some(name) => self.user(name),
            None => self.users.iter().find(|u| u.server_password().is_some()),
        }
    }

    pub fn database(&self, name: &str) -> Option<&Database> {
        self.databases.iter().find(|d| d.name == name)
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

/// The first line that mentions `needle`, for semantic errors that serde gives no span for.
fn find_line(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[general]
listen = "127.0.0.1:7000"
pool_size = 5
checkout_timeout = "2s"

[[users]]
name = "app"
password = "secret"

[[databases]]
name = "app"
[[databases.shards]]
hosts = ["127.0.0.1:5432", "127.0.0.1:5433"]
"#;

    #[test]
    fn parses_a_good_file_with_defaults() {
        let c = Config::parse(GOOD, "good.toml").expect("valid");
        assert_eq!(c.general.pool_size, 5);
        assert_eq!(c.general.checkout_timeout, Duration::from_secs(2));
        assert_eq!(c.general.pool_mode, PoolMode::Transaction);
        assert_eq!(c.users[0].auth, AuthMethod::ScramSha256);
        assert_eq!(c.users[0].server_password(), Some("secret"));
        assert_eq!(c.databases[0].server_database(), "app");
        assert_eq!(c.databases[0].shards[0].hosts.len(), 2);
    }

    #[test]
    fn rebalance_keys_default_and_are_checked_with_their_line() {
        let c = Config::parse(GOOD, "good.toml").expect("valid");
        let db = &c.databases[0];
        assert!(!db.auto_rebalance);
        assert_eq!(db.hot_ratio, 1.5);
        assert_eq!(db.hot_window, Duration::from_secs(60));
        assert_eq!(db.move_batch_rows, 5000);
        let with = |line: &str| {
            GOOD.replace(
                "name = \"app\"\n[[databases.shards]]",
                &format!("name = \"app\"\n{line}\n[[databases.shards]]"),
            )
        };
        for (line, named) in [
            ("hot_ratio = 0.5", "hot_ratio"),
            ("move_batch_rows = 0", "move_batch_rows"),
            ("auto_rebalance = true", "shard_map"),
        ] {
            let err = Config::parse(&with(line), "f.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("f.toml:13:") && err.contains(named),
                "{line}: {err}"
            );
        }
        let ok = with("auto_rebalance = true\nshard_map = \"m.toml\"\nhot_window = \"3s\"");
        let c = Config::parse(&ok, "f.toml").expect("valid");
        assert_eq!(c.databases[0].hot_window, Duration::from_secs(3));
    }

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let text = GOOD.replace("pool_size = 5", "pool_size = 5\npool_sise = 6");
        let err = Config::parse(&text, "f.toml").unwrap_err().to_string();
        assert!(err.starts_with("f.toml:5:"), "{err}");
        assert!(err.contains("pool_sise"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_line() {
        let text = GOOD.replace("pool_size = 5", "pool_size = \"five\"");
        let err = Config::parse(&text, "f.toml").unwrap_err().to_string();
        assert!(err.starts_with("f.toml:4:"), "{err}");
        assert!(err.contains("pool_size = \"five\""), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_line() {
        let text = GOOD.replace("pool_size = 5", "pool_size = 0");
        let err = Config::parse(&text, "f.toml").unwrap_err().to_string();
        assert_eq!(err, "f.toml:4: general.pool_size must be at least 1");

        let text = GOOD.replace("password = \"secret\"\n", "");
        let err = Config::parse(&text, "f.toml").unwrap_err().to_string();
        assert!(err.contains("needs a password"), "{err}");

        let text = GOOD.replace(
            "hosts = [\"127.0.0.1:5432\", \"127.0.0.1:5433\"]",
            "hosts = []",
        );
        let err = Config::parse(&text, "f.toml").unwrap_err().to_string();
        assert!(err.starts_with("f.toml:14:"), "{err}");
    }

    #[test]
    fn bad_duration_and_address_are_syntax_errors() {
        let text = GOOD.replace("\"2s\"", "\"soon\"");
        assert!(matches!(
            Config::parse(&text, "f").unwrap_err(),
            ConfigError::Syntax { line: 5, .. }
        ));
        let text = GOOD.replace("127.0.0.1:7000", "nowhere");
        assert!(matches!(
            Config::parse(&text, "f").unwrap_err(),
            ConfigError::Syntax { line: 3, .. }
        ));
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Config::load(Path::new("/nonexistent/sg.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/nonexistent/sg.toml:"), "{err}");
    }
}
