//! Server connection pools: one per (database, user), capped, with clients queueing for a
//! connection up to `checkout_timeout`.
//!
//! The idle list is a plain `Mutex<Vec<_>>`, never held across an await. A checkout prefers
//! the most recently used idle connection that already carries the client's settings (so no
//! `SET` round trip is needed), else the most recently used one.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::PoolMetrics;
use crate::server::{Login, ServerConn, ServerError};
use crate::settings::Settings;

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
}

pub struct PoolOptions {
    pub size: usize,
    pub checkout_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

pub struct Pool {
    /// "database/user", for errors, logs and metrics.
    pub name: String,
    pub addr: SocketAddr,
    server_user: String,
    server_password: Option<String>,
    server_database: String,
    opts: PoolOptions,
    slots: Arc<Semaphore>,
    #[allow(clippy::vec_box)] // boxes move between this list and sessions by pointer
    idle: Mutex<Vec<Box<ServerConn>>>,
    /// The latest login's settings and reported parameters: clients with equal ones share
    /// one allocation, which keeps an idle client small.
    interned: Mutex<Interned>,
    /// Hashes of statements (text + parameter types) that parsed without error on this
    /// pool's servers.
    known_statements: Mutex<std::collections::HashSet<u64>>,
    pub metrics: PoolMetrics,
}

/// Bound on `known_statements`; past it the set starts over.
const MAX_KNOWN_STATEMENTS: usize = 100_000;

#[derive(Default)]
struct Interned {
    settings: Option<Arc<Settings>>,
    reported: Option<Arc<Vec<(String, String)>>>,
}

/// A server connection lent to one client. Dropping it closes the connection; `release`
/// gives it back.
pub struct Checkout {
    /// Boxed so that a session holding one stays small and moving it is a pointer copy.
    pub conn: Box<ServerConn>,
    _permit: OwnedSemaphorePermit,
    pool: Arc<Pool>,
}

impl Pool {
    pub fn new(
        name: String,
        addr: SocketAddr,
        login: (String, Option<String>, String),
        opts: PoolOptions,
    ) -> Pool {
        let metrics = PoolMetrics::new(&name);
        metrics.size.set(opts.size as f64);
        Pool {
            slots: Arc::new(Semaphore::new(opts.size)),
            name,
            addr,
            server_user: login.0,
            server_password: login.1,
            server_database: login.2,
            opts,
            idle: Mutex::new(Vec::new()),
            interned: Mutex::new(Interned::default()),
            known_statements: Mutex::new(Default::default()),
            metrics,
        }
    }

    pub async fn checkout(self: &Arc<Self>, settings: &Settings) -> Result<Checkout, PoolError> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.metrics.waiting.increment(1.0);
                let waited = tokio::time::timeout(
                    self.opts.checkout_timeout,
                    self.slots.clone().acquire_owned(),
                )
                .await;
                self.metrics.waiting.decrement(1.0);
                match waited {
                    Ok(Ok(p)) => p,
                    _ => {
                        return Err(PoolError::Timeout {
                            pool: self.name.clone(),
                            waited: self.opts.checkout_timeout,
                            size: self.opts.size,
                        })
                    }
                }
            }
        };
        self.metrics.checkouts.increment(1);
        while let Some(conn) = self.take_idle(settings) {
            self.metrics.idle.decrement(1.0);
            if conn.idle_since.elapsed() < self.opts.idle_timeout && conn.looks_alive() {
                self.metrics.active.increment(1.0);
                return Ok(Checkout {
                    conn,
                    _permit: permit,
                    pool: self.clone(),
                });
            }
        }
        let login = Login {
            user: &self.server_user,
            password: self.server_password.as_deref(),
            database: &self.server_database,
        };
        let conn = tokio::time::timeout(
            self.opts.connect_timeout,
            ServerConn::connect(self.addr, &login),
        )
        .await
        .map_err(|_| PoolError::ConnectTimeout(self.addr))??;
        self.metrics.connects.increment(1);
        self.metrics.active.increment(1.0);
        Ok(Checkout {
            conn: Box::new(conn),
            _permit: permit,
            pool: self.clone(),
        })
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

impl Checkout {
    /// Returns a clean connection to the pool.
    pub fn release(self) {
        let Checkout {
            mut conn,
            _permit,
            pool,
        } = self;
        conn.idle_since = Instant::now();
        pool.metrics.active.decrement(1.0);
        pool.metrics.idle.increment(1.0);
        pool.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        // The permit drops here, after the connection is back, so a waiter finds it.
    }

    /// Closes the connection (it is in a state no other client may inherit).
    pub fn discard(self) {
        self.pool.metrics.active.decrement(1.0);
        self.pool.metrics.discards.increment(1);
    }
}
