//! Server connection pools.
//!
//! A `Pool` holds connections to one host for one (database, user): capped, with clients
//! queueing (first come, first served) up to `checkout_timeout`. Its state (idle list,
//! count of lent connections, queue) is one `Mutex`, taken once per checkout and once per
//! release and never held across an await; a checkout prefers the most recently used idle
//! connection that already carries the client's settings (no `SET` round trip), else the
//! most recently used one. A released connection goes straight to the first waiting client.
//!
//! `UserPools` is what a client session sees: for each shard, a pool per host, and the
//! choice of host by role (primary for writes, a replica for reads) from the topology.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::metrics::PoolMetrics;
use crate::server::{Login, ServerConn, ServerError};
use crate::settings::{Reported, Settings};
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
    size: AtomicUsize,
    /// Checkouts (the rate the rebalancer reports). Written only under `state`'s lock,
    /// with a plain load and store: an atomic read-modify-write on every transaction
    /// costs more than a counter is worth.
    pub checkouts: AtomicU64,
    /// Server connections opened.
    pub connects: AtomicU64,
    /// Clients queued for a connection.
    waiting: AtomicUsize,
    /// A copy of `state.taken` for the gauges, written under the lock.
    lent: AtomicUsize,
    /// What a checkout and a release change, under one lock taken once by each: the idle
    /// list, the count of taken connections and the queue of waiting clients. Never held
    /// across an await.
    state: Mutex<PoolState>,
    pub metrics: PoolMetrics,
}

struct PoolState {
    /// Most recently used last.
    #[allow(clippy::vec_box)] // boxes move between this list and sessions by pointer
    idle: Vec<Box<ServerConn>>,
    /// Connections lent to clients, counting a client that holds the right to open one
    /// and is still connecting. At most the pool's size, but for a while after a reload
    /// shrank it.
    taken: usize,
    /// Clients waiting for a connection, first come first served. One that gave up has
    /// dropped its receiver: a send to it fails and the next one is tried.
    waiters: VecDeque<oneshot::Sender<Grant>>,
}

/// What a waiting client is handed: a connection another client gave back, or the right
/// to open one (a slot: a connection closed, or a reload grew the pool).
enum Grant {
    Conn(Box<ServerConn>),
    Slot,
}

impl Grant {
    /// The connection granted, if it was one rather than a slot.
    fn into_conn(self) -> Option<Box<ServerConn>> {
        match self {
            Grant::Conn(conn) => Some(conn),
            Grant::Slot => None,
        }
    }
}

impl PoolState {
    /// Gives `grant` to the first client still waiting, who then counts as taken; hands
    /// it back when nobody waits.
    fn hand_to_waiter(&mut self, mut grant: Grant) -> Result<(), Grant> {
        while let Some(waiter) = self.waiters.pop_front() {
            match waiter.send(grant) {
                Ok(()) => {
                    self.taken += 1;
                    return Ok(());
                }
                Err(back) => grant = back,
            }
        }
        Err(grant)
    }

    /// Serves waiting clients while there is room: idle connections first, then slots.
    fn grant_waiters(&mut self, size: usize) {
        while !self.waiters.is_empty() && self.taken < size {
            let grant = match self.idle.pop() {
                Some(conn) => Grant::Conn(conn),
                None => Grant::Slot,
            };
            if let Err(back) = self.hand_to_waiter(grant) {
                if let Grant::Conn(conn) = back {
                    self.idle.push(conn);
                }
                return;
            }
        }
    }
}

/// A server connection lent to one client. Dropping it closes the connection; `release`
/// gives it back.
pub struct Checkout {
    /// Boxed so that a session holding one stays small and moving it is a pointer copy.
    pub conn: Box<ServerConn>,
    lent: Lent,
}

/// A taken place in the pool (and an outstanding request on its host) until it is
/// released, discarded or dropped with its session.
struct Lent {
    pool: Arc<Pool>,
    counted: bool,
}

impl Drop for Lent {
    fn drop(&mut self) {
        if self.counted {
            crate::tally::dec(&self.pool.host.outstanding);
            self.pool.give_back(None);
        }
    }
}

/// A client in the queue. Dropped (it timed out, or the client went away) with a grant
/// already on its way, it passes the grant on rather than lose a connection or a place.
struct Waiting<'a> {
    pool: &'a Pool,
    rx: oneshot::Receiver<Grant>,
    /// The grant was received: nothing to pass on.
    served: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.pool.waiting.fetch_sub(1, Ordering::Relaxed);
        if self.served {
            return;
        }
        let grant = {
            // Grants are sent under this lock: once it is held, none can arrive between
            // this look and the receiver's drop, which closes it to later sends.
            let _state = self.pool.lock();
            let grant = self.rx.try_recv().ok();
            self.rx.close();
            grant
        };
        if let Some(grant) = grant {
            self.pool.give_back(grant.into_conn());
        }
    }
}

/// Adds one to a counter only ever written under the pool's lock.
fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
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
            size: AtomicUsize::new(opts.size),
            checkouts: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            lent: AtomicUsize::new(0),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                taken: 0,
                waiters: VecDeque::new(),
            }),
            name,
            host,
            login,
            opts,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn checkout(self: &Arc<Self>, settings: &Settings) -> Result<Checkout, PoolError> {
        let mut candidate = match self.try_take(settings) {
            Ok(conn) => conn,
            // Boxed, like the connect below: rare paths whose futures would otherwise be
            // copied into every session burst (see `SessionTask`).
            Err(rx) => Box::pin(self.wait_turn(rx)).await?,
        };
        // The place is ours from here.
        let lent = self.lend();
        while let Some(conn) = candidate.take().or_else(|| self.take_idle(settings)) {
            if self.usable(&conn) {
                return Ok(Checkout { conn, lent });
            }
            // Stale or closed by the server: it closes here, and the place stays ours.
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
        Ok(Checkout {
            conn: Box::new(conn),
            lent,
        })
    }

    /// A checkout that needs no waiting: a free place and an idle connection that looks
    /// alive. `None` sends the caller to `checkout`, which can wait and connect.
    pub fn checkout_now(self: &Arc<Self>, settings: &Settings) -> Option<Checkout> {
        let conn = {
            let mut st = self.lock();
            if st.taken >= self.size() {
                return None;
            }
            let conn = take_matching(&mut st.idle, settings)?;
            self.take_place(&mut st);
            conn
        };
        let lent = self.lend();
        if self.usable(&conn) {
            Some(Checkout { conn, lent })
        } else {
            // Stale: it closes, and `lent` gives the place back.
            None
        }
    }

    /// Takes a place in the pool, with an idle connection when there is one (preferring
    /// one that carries `settings`), or joins the queue.
    fn try_take(
        &self,
        settings: &Settings,
    ) -> Result<Option<Box<ServerConn>>, oneshot::Receiver<Grant>> {
        let mut st = self.lock();
        if st.taken >= self.size() {
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(tx);
            return Err(rx);
        }
        self.take_place(&mut st);
        Ok(take_matching(&mut st.idle, settings))
    }

    /// Counts a place taken, under the lock.
    fn take_place(&self, st: &mut PoolState) {
        st.taken += 1;
        self.lent.store(st.taken, Ordering::Relaxed);
        bump(&self.checkouts);
    }

    /// The guard of a place just taken: it gives the place back on every way out.
    fn lend(self: &Arc<Self>) -> Lent {
        crate::tally::inc(&self.host.outstanding);
        Lent {
            pool: self.clone(),
            counted: true,
        }
    }

    /// An idle connection fit to lend: not idle too long, and not closed by the server.
    fn usable(&self, conn: &ServerConn) -> bool {
        let idle_ms = crate::clock::coarse_ms().saturating_sub(conn.idle_since_ms);
        idle_ms < self.opts.idle_timeout.as_millis() as u64 && conn.looks_alive()
    }

    /// Waits in the queue up to `checkout_timeout` for a connection or a place.
    async fn wait_turn(
        &self,
        rx: oneshot::Receiver<Grant>,
    ) -> Result<Option<Box<ServerConn>>, PoolError> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let mut waiting = Waiting {
            pool: self,
            rx,
            served: false,
        };
        let started = Instant::now();
        let got = tokio::time::timeout(self.opts.checkout_timeout, &mut waiting.rx).await;
        self.metrics.checkout_wait.record(started.elapsed());
        match got {
            Ok(Ok(grant)) => {
                waiting.served = true;
                {
                    let _state = self.lock();
                    bump(&self.checkouts);
                }
                Ok(grant.into_conn())
            }
            // Timed out. A grant that raced the timeout is passed on by `Waiting`'s drop.
            _ => Err(PoolError::Timeout {
                pool: self.name.clone(),
                waited: self.opts.checkout_timeout,
                size: self.size(),
            }),
        }
    }

    /// A place in the pool comes back, with its connection when that can serve another
    /// client: to the first waiting client, else to the idle list. Without one (the
    /// connection closed) the place may go to a waiting client, who opens a new one.
    fn give_back(&self, conn: Option<Box<ServerConn>>) {
        let mut st = self.lock();
        // Read under the lock, which `resize` holds to change it.
        let size = self.size();
        st.taken -= 1;
        let mut closing = None;
        match conn {
            // Open connections (idle + taken, this one included) beyond the size: a
            // reload shrank the pool, and this one closes.
            Some(conn) if st.idle.len() + st.taken >= size => {
                closing = Some(conn);
                self.metrics.discards.increment(1);
                st.grant_waiters(size);
            }
            Some(mut conn) => {
                conn.idle_since_ms = crate::clock::coarse_ms();
                if let Err(Grant::Conn(conn)) = st.hand_to_waiter(Grant::Conn(conn)) {
                    st.idle.push(conn);
                }
            }
            None => st.grant_waiters(size),
        }
        self.lent.store(st.taken, Ordering::Relaxed);
        drop(st);
        // Closed outside the lock.
        drop(closing);
    }

    fn take_idle(&self, settings: &Settings) -> Option<Box<ServerConn>> {
        take_matching(&mut self.lock().idle, settings)
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
        self.lock().idle.iter().map(|c| c.backend_pid).collect()
    }

    pub fn idle_count(&self) -> usize {
        self.lock().idle.len()
    }

    /// Changes the pool size in place. Growing serves waiting clients at once; shrinking
    /// closes idle connections beyond the new size now and lent ones as they come back,
    /// so no client loses its connection.
    pub fn resize(&self, new: usize) {
        self.metrics.size.set(new as f64);
        let mut st = self.lock();
        self.size.store(new, Ordering::Relaxed);
        let mut closing = Vec::new();
        while !st.idle.is_empty() && st.idle.len() + st.taken > new {
            closing.push(st.idle.remove(0));
        }
        st.grant_waiters(new);
        self.lent.store(st.taken, Ordering::Relaxed);
        drop(st);
        drop(closing);
    }

    /// Closes idle connections (the host failed or was replaced).
    pub fn drain_idle(&self) {
        let drained = std::mem::take(&mut self.lock().idle);
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

/// The most recently used idle connection that already carries `settings` (no `SET`
/// round trip), else the most recently used one.
#[allow(clippy::vec_box)]
fn take_matching(idle: &mut Vec<Box<ServerConn>>, settings: &Settings) -> Option<Box<ServerConn>> {
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

impl Checkout {
    /// Returns a clean connection to the pool (or closes it when a reload shrank the pool
    /// and the pool already holds enough connections).
    pub fn release(self) {
        let Checkout { conn, mut lent } = self;
        lent.counted = false;
        crate::tally::dec(&lent.pool.host.outstanding);
        lent.pool.give_back(Some(conn));
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
    /// Logins' settings and reported parameters: clients with equal ones share one
    /// allocation, which keeps an idle client small, and a login that matches an earlier
    /// one needs no server connection (`known_login`).
    interned: Mutex<Interned>,
    /// Hashes of statements (text + parameter types) that parsed without error on this
    /// database's servers as this user.
    known_statements: Mutex<std::collections::HashSet<u64>>,
}

/// Counts where a checkout went: a write, a read on the primary or one on a replica.
fn count_route(topo: &ShardTopology, want: Want, host: usize) {
    match want {
        Want::Primary => topo.metrics.writes.increment(),
        _ if topo.primary() == Some(host) => topo.metrics.reads_on_primary.increment(),
        _ => topo.metrics.reads_on_replica.increment(),
    }
}

/// Bound on `known_statements`; past it the set starts over.
const MAX_KNOWN_STATEMENTS: usize = 100_000;

#[derive(Default)]
struct Interned {
    settings: Option<Arc<Settings>>,
    reported: Option<Arc<Reported>>,
    /// Startup settings that logged in here, what a server reported for them and when
    /// (`clock::coarse_ms`), newest last (at most `LOGINS_KEPT`).
    logins: Vec<(Arc<Settings>, Arc<Reported>, u64)>,
}

/// A login answered from an earlier one (`UserPools::known_login`).
pub struct KnownLogin {
    pub settings: Arc<Settings>,
    pub reported: Arc<Reported>,
    /// Asked of a server less than `LOGIN_FRESH_MS` ago.
    pub fresh: bool,
}

/// After this long a login's reported parameters are asked of a server again when a
/// connection is at hand (a restarted or failed-over server may report others).
const LOGIN_FRESH_MS: u64 = 60_000;

/// How many distinct startup settings (drivers, application names) `Interned::logins`
/// remembers.
const LOGINS_KEPT: usize = 16;

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
        picked: Option<usize>,
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
        // A host `checkout_now` picked is the first one tried.
        let mut picked = picked;
        loop {
            let replica = match (picked.take(), want) {
                (Some(h), _) => Some(h),
                (None, Want::Replica { min_lsn }) => {
                    topo.pick_replica(&self.route.read, min_lsn, excluded)
                }
                (None, Want::Primary) => None,
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
                    count_route(topo, want, host);
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

    /// `checkout` when it needs no waiting: the host is known at once (a replica that
    /// qualifies, else a primary that is up) and its pool has an idle connection.
    /// Otherwise the host it picked, if any, for `checkout` to start from: picking again
    /// would move the load balancer on a second time and skew its spread.
    pub fn checkout_now(
        &self,
        shard: usize,
        want: Want,
        settings: &Settings,
    ) -> Result<Checkout, Option<usize>> {
        let sp = &self.shards[shard];
        let topo = &sp.topology;
        let replica = match want {
            Want::Replica { min_lsn } => topo.pick_replica(&self.route.read, min_lsn, 0),
            Want::Primary => None,
        };
        let host = match replica {
            Some(h) => h,
            None => topo.primary().ok_or(None)?,
        };
        let c = sp.hosts[host].checkout_now(settings).ok_or(Some(host))?;
        count_route(topo, want, host);
        Ok(c)
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

    /// The settings and reported parameters of an earlier login with settings equal to
    /// `settings`. Such a login is answered without a server connection, as PgBouncer
    /// answers from its first one: a client can log in while every connection is busy,
    /// and a login costs no server round trip. Once not `fresh`, the caller asks a server
    /// again if it has a connection at hand (a restart or a failover may have changed
    /// `server_version` or `in_hot_standby`); a value that changes within a session
    /// reaches the client as usual.
    pub fn known_login(&self, settings: &Settings) -> Option<KnownLogin> {
        let i = self.interned.lock().unwrap_or_else(|e| e.into_inner());
        let (s, r, at) = i.logins.iter().rev().find(|(s, _, _)| **s == *settings)?;
        Some(KnownLogin {
            settings: s.clone(),
            reported: r.clone(),
            fresh: crate::clock::coarse_ms().saturating_sub(*at) < LOGIN_FRESH_MS,
        })
    }

    /// Remembers a login a server accepted, for `known_login`.
    pub fn remember_login(&self, settings: &Arc<Settings>, reported: &Arc<Reported>) {
        let mut i = self.interned.lock().unwrap_or_else(|e| e.into_inner());
        i.logins.retain(|(s, _, _)| **s != **settings);
        if i.logins.len() >= LOGINS_KEPT {
            i.logins.remove(0);
        }
        let now = crate::clock::coarse_ms();
        i.logins.push((settings.clone(), reported.clone(), now));
    }

    pub fn intern_reported(&self, reported: Vec<(String, String)>) -> Arc<Reported> {
        let reported = Reported::new(reported);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state(taken: usize) -> PoolState {
        PoolState {
            idle: Vec::new(),
            taken,
            waiters: VecDeque::new(),
        }
    }

    fn slot(r: &mut oneshot::Receiver<Grant>) -> bool {
        matches!(r.try_recv(), Ok(Grant::Slot))
    }

    #[test]
    fn places_go_to_waiters_in_order_and_only_while_there_is_room() {
        let mut st = state(2);
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        st.waiters.extend([tx1, tx2]);
        // Full: nobody is served.
        st.grant_waiters(2);
        assert!(rx1.try_recv().is_err() && rx2.try_recv().is_err());
        // One place frees: the first waiter gets it, the second keeps waiting.
        st.taken -= 1;
        st.grant_waiters(2);
        assert!(slot(&mut rx1));
        assert!(rx2.try_recv().is_err());
        assert_eq!(st.taken, 2);
        // A reload grows the pool: the second is served too.
        st.grant_waiters(3);
        assert!(slot(&mut rx2));
        assert_eq!(st.taken, 3);
        assert!(st.waiters.is_empty());
    }

    #[test]
    fn a_waiter_that_gave_up_is_skipped_and_costs_no_place() {
        let mut st = state(1);
        let (gone, rx_gone) = oneshot::channel();
        let (tx, mut rx) = oneshot::channel();
        st.waiters.extend([gone, tx]);
        drop(rx_gone);
        st.taken -= 1;
        st.grant_waiters(1);
        assert!(slot(&mut rx));
        assert_eq!(st.taken, 1);
        // Nobody left: a grant comes back to the caller and no place is counted.
        assert!(matches!(st.hand_to_waiter(Grant::Slot), Err(Grant::Slot)));
        assert_eq!(st.taken, 1);
    }
}
