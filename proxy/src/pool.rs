//! Server connection pools.
//!
//! A `Pool` holds connections to one host for one (database, user): capped, with clients
//! queueing up to `checkout_timeout`. Its idle list is a plain `Mutex<Vec<_>>`, never held
//! across an await; a checkout prefers the most recently used idle connection that already
//! carries the client's settings (no `SET` round trip), else the most recently used one.
//!
//! `UserPools` is what a client session sees: for each shard, a pool per host, and the
//! choice of host by role (primary for writes, a replica for reads) from the topology.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::PoolMetrics;
use crate::server::{Login, ServerConn, ServerError};
use crate::settings::Settings;
use crate::topology::{Host, ReadPolicy, ShardTopology};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "no server connection available in pool \"{pool}\" within {waited:?} (pool_size {size})"
    )]
    Timeout {
        pool: String,
        waited: Duration,
        size: usize,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("timed out connecting to server {0}")]
    ConnectTimeout(SocketAddr),
    #[error("shard {shard} has no primary (waited {waited:?} for a failover)")]
    NoPrimary { shard: usize, waited: Duration },
}

impl PoolError {
    /// The SQLSTATE and message a client gets for this failure.
    pub fn client_error(&self) -> (String, String) {
        use crate::protocol::sqlstate;
        match self {
            PoolError::Server(se) => {
                let (c, m) = se.client_error();
                (c.to_string(), m)
            }
            PoolError::Timeout { .. } => (sqlstate::TOO_MANY_CONNECTIONS.into(), self.to_string()),
            PoolError::ConnectTimeout(_) | PoolError::NoPrimary { .. } => {
                (sqlstate::CONNECTION_FAILURE.into(), self.to_string())
            }
        }
    }

    /// A connection problem with the host, as opposed to a full pool or a refusal.
    /// Includes a server that is shutting down or starting up (57P01/57P03) or that drops
    /// the connection during login: all mean "try another host".
    fn host_unreachable(&self) -> bool {
        match self {
            PoolError::ConnectTimeout(_) => true,
            PoolError::Server(ServerError::Connect { .. } | ServerError::Io { .. }) => true,
            PoolError::Server(ServerError::Refused { code, .. }) => code.starts_with("57P"),
            _ => false,
        }
    }
}

pub struct PoolOptions {
    pub size: usize,
    pub checkout_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

pub struct Pool {
    /// "database/user@host", for errors, logs and metrics.
    pub name: String,
    pub host: Arc<Host>,
    /// (server user, password, server database).
    login: (String, Option<String>, String),
    opts: PoolOptions,
    /// The configured size; a reload changes it in place.
    size: std::sync::atomic::AtomicUsize,
    pub checkouts: std::sync::atomic::AtomicU64,
    /// Server connections opened (the connection rate the rebalancer reports).
    pub connects: std::sync::atomic::AtomicU64,
    waiting: std::sync::atomic::AtomicUsize,
    /// Connections lent to clients. Not the semaphore's taken permits: a permit released
    /// to a queued client counts as taken before that client has a connection.
    lent: std::sync::atomic::AtomicUsize,
    slots: Arc<Semaphore>,
    #[allow(clippy::vec_box)] // boxes move between this list and sessions by pointer
    idle: Mutex<Vec<Box<ServerConn>>>,
    pub metrics: PoolMetrics,
}

/// A server connection lent to one client. Dropping it closes the connection; `release`
/// gives it back.
pub struct Checkout {
    /// Boxed so that a session holding one stays small and moving it is a pointer copy.
    pub conn: Box<ServerConn>,
    _permit: OwnedSemaphorePermit,
    lent: Lent,
}

/// Counts a connection as lent (in the pool's `lent` and its host's `outstanding`) until
/// it is released, discarded or dropped with its session.
struct Lent {
    pool: Arc<Pool>,
    counted: bool,
}

impl Drop for Lent {
    fn drop(&mut self) {
        if self.counted {
            self.pool.lent.fetch_sub(1, Ordering::Relaxed);
            self.pool.host.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Pool {
    pub fn new(
        name: String,
        host: Arc<Host>,
        login: (String, Option<String>, String),
        opts: PoolOptions,
    ) -> Pool {
        let metrics = PoolMetrics::new(&name);
        metrics.size.set(opts.size as f64);
        Pool {
            slots: Arc::new(Semaphore::new(opts.size)),
            size: std::sync::atomic::AtomicUsize::new(opts.size),
            checkouts: std::sync::atomic::AtomicU64::new(0),
            connects: std::sync::atomic::AtomicU64::new(0),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            lent: std::sync::atomic::AtomicUsize::new(0),
            name,
            host,
            login,
            opts,
            idle: Mutex::new(Vec::new()),
            metrics,
        }
    }

    pub async fn checkout(self: &Arc<Self>, settings: &Settings) -> Result<Checkout, PoolError> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                // Boxed, like the connect below: rare paths whose futures would otherwise
                // be copied into every session burst (see `SessionTask`).
                let waited = Box::pin(tokio::time::timeout(
                    self.opts.checkout_timeout,
                    self.slots.clone().acquire_owned(),
                ))
                .await;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                self.metrics.checkout_wait.record(started.elapsed());
                match waited {
                    Ok(Ok(p)) => p,
                    _ => {
                        return Err(PoolError::Timeout {
                            pool: self.name.clone(),
                            waited: self.opts.checkout_timeout,
                            size: self.size(),
                        })
                    }
                }
            }
        };
        self.metrics.checkouts.increment(1);
        self.checkouts.fetch_add(1, Ordering::Relaxed);
        let idle_limit = self.opts.idle_timeout.as_millis() as u64;
        while let Some(conn) = self.take_idle(settings) {
            let idle_ms = crate::clock::coarse_ms().saturating_sub(conn.idle_since_ms);
            if idle_ms < idle_limit && conn.looks_alive() {
                return Ok(self.lend(conn, permit));
            }
        }
        let login = Login {
            user: &self.login.0,
            password: self.login.1.as_deref(),
            database: &self.login.2,
        };
        let conn = Box::pin(tokio::time::timeout(
            self.opts.connect_timeout,
            ServerConn::connect(self.host.addr, &login),
        ))
        .await
        .map_err(|_| PoolError::ConnectTimeout(self.host.addr))??;
        self.metrics.connects.increment(1);
        self.connects.fetch_add(1, Ordering::Relaxed);
        Ok(self.lend(Box::new(conn), permit))
    }

    fn lend(self: &Arc<Self>, conn: Box<ServerConn>, permit: OwnedSemaphorePermit) -> Checkout {
        self.host.outstanding.fetch_add(1, Ordering::Relaxed);
        self.lent.fetch_add(1, Ordering::Relaxed);
        Checkout {
            conn,
            _permit: permit,
            lent: Lent {
                pool: self.clone(),
                counted: true,
            },
        }
    }

    fn take_idle(&self, settings: &Settings) -> Option<Box<ServerConn>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let matching = idle.iter().rposition(|c| {
            c.settings
                .as_deref()
                .is_some_and(|s| s.hash() == settings.hash() && s == settings)
        });
        match matching {
            Some(i) => Some(idle.swap_remove(i)),
            None => idle.pop(),
        }
    }

    pub fn login(&self) -> &(String, Option<String>, String) {
        &self.login
    }

    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    /// Server connections lent to clients right now.
    pub fn active(&self) -> usize {
        self.lent.load(Ordering::Relaxed)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn idle_backend_pids(&self) -> Vec<i32> {
        self.idle
            .lock()
            .map(|i| i.iter().map(|c| c.backend_pid).collect())
            .unwrap_or_default()
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    /// Changes the pool size in place. Growing adds permits at once; shrinking takes
    /// permits as connections come back, so no client loses its connection.
    pub fn resize(&self, new: usize) {
        let old = self.size.swap(new, Ordering::Relaxed);
        self.metrics.size.set(new as f64);
        if new > old {
            self.slots.add_permits(new - old);
        } else if new < old {
            let slots = self.slots.clone();
            let fewer = (old - new) as u32;
            tokio::spawn(async move {
                if let Ok(p) = slots.acquire_many_owned(fewer).await {
                    p.forget();
                }
            });
            // Idle connections beyond the new size are closed.
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            while idle.len() > new {
                idle.remove(0);
            }
        }
    }

    /// Closes idle connections (the host failed or was replaced).
    pub fn drain_idle(&self) {
        let drained = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        drop(drained);
    }

    /// Sets the active/idle/waiting gauges from the pool's state. Called when metrics are
    /// scraped rather than on every checkout: four gauge updates per transaction were
    /// measurable on the hot path.
    pub fn publish_gauges(&self) {
        self.metrics.active.set(self.active() as f64);
        self.metrics.idle.set(self.idle_count() as f64);
        self.metrics.waiting.set(self.waiting() as f64);
    }
}

impl Checkout {
    /// Returns a clean connection to the pool (or closes it when a reload shrank the pool
    /// and the pool already holds enough connections).
    pub fn release(self) {
        let Checkout {
            mut conn,
            _permit,
            mut lent,
        } = self;
        let pool = &lent.pool;
        let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Open connections (idle + lent, this one included) beyond the size: a reload
        // shrank the pool. Counted under the idle list's lock, so two releases never both
        // see room for one.
        if idle.len() + pool.lent.load(Ordering::Relaxed) > pool.size() {
            drop(idle);
            pool.metrics.discards.increment(1);
            return;
        }
        conn.idle_since_ms = crate::clock::coarse_ms();
        idle.push(conn);
        pool.lent.fetch_sub(1, Ordering::Relaxed);
        pool.host.outstanding.fetch_sub(1, Ordering::Relaxed);
        drop(idle);
        lent.counted = false;
        // The permit drops last, after the connection is back, so a waiter finds it.
    }

    pub fn host(&self) -> &Arc<Host> {
        &self.lent.pool.host
    }

    /// Closes the connection (it is in a state no other client may inherit).
    pub fn discard(self) {
        self.lent.pool.metrics.discards.increment(1);
    }
}

/// Which server a transaction needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Writes, and anything that must see the latest data.
    Primary,
    /// Plain reads; `min_lsn` is how far a replica must have replayed (read-your-writes).
    Replica { min_lsn: u64 },
}

/// Routing options shared by every pool of a database.
pub struct RouteOptions {
    pub read: ReadPolicy,
    pub failover_timeout: Duration,
    pub ban_time: Duration,
}

/// The pools of one shard: one per host, indexed like the topology's hosts.
pub struct ShardPools {
    pub topology: Arc<ShardTopology>,
    pub hosts: Vec<Arc<Pool>>,
}

/// Everything a session of one (database, user) checks out connections from.
pub struct UserPools {
    /// "database/user".
    pub name: String,
    /// The same, shared with each client's registry entry.
    pub label: Arc<str>,
    /// Statements forwarded for this (database, user), for SHOW STATS.
    pub queries: std::sync::atomic::AtomicU64,
    pub database: String,
    pub user: String,
    pub shards: Vec<ShardPools>,
    pub route: Arc<RouteOptions>,
    /// How statements find their shards; `None` for an unsharded single-shard database.
    pub routing: Option<Arc<crate::routing::Routing>>,
    /// The latest login's settings and reported parameters: clients with equal ones share
    /// one allocation, which keeps an idle client small.
    interned: Mutex<Interned>,
    /// Hashes of statements (text + parameter types) that parsed without error on this
    /// database's servers as this user.
    known_statements: Mutex<std::collections::HashSet<u64>>,
}

/// Bound on `known_statements`; past it the set starts over.
const MAX_KNOWN_STATEMENTS: usize = 100_000;

#[derive(Default)]
struct Interned {
    settings: Option<Arc<Settings>>,
    reported: Option<Arc<Vec<(String, String)>>>,
}

impl UserPools {
    pub fn new(
        name: String,
        database: String,
        user: String,
        shards: Vec<ShardPools>,
        route: Arc<RouteOptions>,
        routing: Option<Arc<crate::routing::Routing>>,
    ) -> UserPools {
        UserPools {
            label: Arc::from(name.as_str()),
            queries: std::sync::atomic::AtomicU64::new(0),
            name,
            database,
            user,
            shards,
            route,
            routing,
            interned: Mutex::new(Interned::default()),
            known_statements: Mutex::new(Default::default()),
        }
    }

    /// A connection on `shard` for `want`: the primary (waiting out a failover), or a
    /// replica that qualifies, else the primary. A host that cannot be reached is banned
    /// and the next candidate tried.
    pub async fn checkout(
        &self,
        shard: usize,
        want: Want,
        settings: &Settings,
    ) -> Result<Checkout, PoolError> {
        let sp = &self.shards[shard];
        let topo = &sp.topology;
        let mut excluded = 0u64;
        // Read the clock only when there is something to wait for (a failover, a retry).
        let mut deadline = None;
        let mut deadline = || {
            *deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + self.route.failover_timeout)
        };
        loop {
            let replica = match want {
                Want::Replica { min_lsn } => topo.pick_replica(&self.route.read, min_lsn, excluded),
                Want::Primary => None,
            };
            let host = match replica {
                Some(h) => h,
                None => {
                    let waited = match topo.primary() {
                        Some(p) => Some(p),
                        None => {
                            let left =
                                deadline().saturating_duration_since(tokio::time::Instant::now());
                            Box::pin(topo.wait_primary(left)).await
                        }
                    };
                    match waited {
                        Some(p) => p,
                        None => {
                            return Err(PoolError::NoPrimary {
                                shard,
                                waited: self.route.failover_timeout,
                            })
                        }
                    }
                }
            };
            match sp.hosts[host].checkout(settings).await {
                Ok(c) => {
                    match want {
                        Want::Primary => topo.metrics.writes.increment(1),
                        _ if topo.primary() == Some(host) => {
                            topo.metrics.reads_on_primary.increment(1)
                        }
                        _ => topo.metrics.reads_on_replica.increment(1),
                    }
                    return Ok(c);
                }
                Err(e) if e.host_unreachable() => {
                    tracing::warn!(pool = %self.name, "{e}");
                    topo.ban(host, self.route.ban_time);
                    sp.hosts[host].drain_idle();
                    excluded |= 1 << (host % 64);
                    if tokio::time::Instant::now() >= deadline() {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Shares `settings` with earlier logins that had the same ones.
    pub fn intern_settings(&self, settings: Settings) -> Arc<Settings> {
        if settings.is_empty() {
            return Settings::empty();
        }
        let mut i = self.interned.lock().unwrap_or_else(|e| e.into_inner());
        match &i.settings {
            Some(s) if **s == settings => s.clone(),
            _ => {
                let s = Arc::new(settings);
                i.settings = Some(s.clone());
                s
            }
        }
    }

    pub fn intern_reported(&self, reported: Vec<(String, String)>) -> Arc<Vec<(String, String)>> {
        let mut i = self.interned.lock().unwrap_or_else(|e| e.into_inner());
        match &i.reported {
            Some(r) if **r == reported => r.clone(),
            _ => {
                let r = Arc::new(reported);
                i.reported = Some(r.clone());
                r
            }
        }
    }

    pub fn is_known_statement(&self, hash: u64) -> bool {
        self.known_statements
            .lock()
            .map(|k| k.contains(&hash))
            .unwrap_or(false)
    }

    pub fn mark_known_statement(&self, hash: u64) {
        let mut known = self
            .known_statements
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if known.len() >= MAX_KNOWN_STATEMENTS {
            known.clear();
        }
        known.insert(hash);
    }
}
