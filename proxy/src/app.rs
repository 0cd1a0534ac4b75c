//! Everything a client session needs from the running proxy, built from the configuration,
//! and its replacement on reload.
//!
//! `Process` lives as long as the process: the client registry, the statement-name hasher,
//! PAUSE state, and the current `App`. An `App` is one generation of the configuration;
//! a reload builds the next one, reusing the pools (and their server connections) of every
//! (database, user) whose hosts and login did not change, and swaps it in. Sessions pick up
//! the new generation between transactions; no client is dropped.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use shardgate_config::{AuthMethod, Config, PoolMode};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

use crate::auth::ScramSecret;
use crate::cancel::CancelRegistry;
use crate::health::HealthOptions;
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolOptions, RouteOptions, ShardPools, UserPools};
use crate::topology::{ReadPolicy, ShardTopology};

pub struct UserEntry {
    pub name: String,
    pub auth: AuthMethod,
    pub password: Option<String>,
    pub scram: Option<ScramSecret>,
    pub admin: bool,
}

/// Process-wide state that outlives configuration generations.
pub struct Process {
    pub config_path: PathBuf,
    current: RwLock<Option<Arc<App>>>,
    generation: AtomicU64,
    pub cancels: CancelRegistry,
    /// Keys the hashes that name prepared statements on servers; random per process so a
    /// client cannot craft collisions, and the same across reloads so names stay valid.
    pub statement_hasher: RandomState,
    /// Counts Parses whose statements are not shared (`Session::parse_key`).
    pub unshared_parses: AtomicU64,
    /// PAUSE: everything, or these databases.
    paused_all: AtomicBool,
    paused: Mutex<HashSet<String>>,
    any_paused: AtomicBool,
    resumed: Notify,
    reloading: Mutex<()>,
    /// Admin SHUTDOWN: the main task drains as on SIGTERM.
    pub shutdown: Notify,
    /// Per sharded database: the live shard map, the cut-over gate and the slot moves
    /// (they outlive reloads).
    shard_states: Mutex<HashMap<String, Arc<crate::moves::ShardState>>>,
}

impl Process {
    pub fn new(config_path: PathBuf) -> Arc<Process> {
        Arc::new(Process {
            config_path,
            current: RwLock::new(None),
            generation: AtomicU64::new(0),
            cancels: CancelRegistry::default(),
            statement_hasher: RandomState::new(),
            unshared_parses: AtomicU64::new(0),
            paused_all: AtomicBool::new(false),
            paused: Mutex::new(HashSet::new()),
            any_paused: AtomicBool::new(false),
            resumed: Notify::new(),
            reloading: Mutex::new(()),
            shutdown: Notify::new(),
            shard_states: Mutex::new(HashMap::new()),
        })
    }

    /// The live state of a sharded database.
    pub fn shard_state(&self, database: &str) -> Option<Arc<crate::moves::ShardState>> {
        let states = self.shard_states.lock().unwrap_or_else(|e| e.into_inner());
        states.get(database).cloned()
    }

    /// The live state for a database whose configuration (re)loaded `map` from
    /// `map_path`: the existing one when its slots and shards still match (a newer map
    /// version from the file is published into it; an older one, e.g. a file not yet
    /// rewritten, is ignored), else a new one.
    pub fn adopt_shard_state(
        &self,
        database: &str,
        map: shardgate_shardmap::ShardMap,
        map_path: Option<PathBuf>,
    ) -> Arc<crate::moves::ShardState> {
        let mut states = self.shard_states.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = states.get(database) {
            let live = s.map();
            if live.slots() == map.slots()
                && live.shards() == map.shards()
                && s.map_path == map_path
            {
                if map.version() > live.version() {
                    s.publish(map);
                }
                return s.clone();
            }
        }
        let s = Arc::new(crate::moves::ShardState::new(database, map, map_path));
        states.insert(database.to_string(), s.clone());
        s
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Option<Arc<App>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    fn install(&self, app: Arc<App>) {
        let generation = app.generation;
        if let Ok(mut c) = self.current.write() {
            *c = Some(app);
        }
        self.generation.store(generation, Ordering::Release);
    }

    /// Builds and installs the first generation.
    pub fn start(self: &Arc<Self>, config: Config) -> Result<Arc<App>, String> {
        let app = Arc::new(App::build(config, self.clone(), None, 1)?);
        self.install(app.clone());
        Ok(app)
    }

    /// Re-reads the configuration file. An invalid file changes nothing. Returns the new
    /// generation and the topologies that need health checks.
    pub fn reload(self: &Arc<Self>) -> Result<(Arc<App>, Vec<String>), String> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let config = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        let old = self.current().ok_or("no configuration loaded")?;
        if config.general.listen != old.config.general.listen
            || config.general.metrics_listen != old.config.general.metrics_listen
        {
            tracing::warn!("listen addresses changed in the file: they apply at the next restart");
        }
        let app = Arc::new(App::build(
            config,
            self.clone(),
            Some(&old),
            old.generation + 1,
        )?);
        let fresh: Vec<String> = app
            .topologies
            .iter()
            .filter(|(db, t)| {
                old.topologies
                    .get(*db)
                    .is_none_or(|o| !Arc::ptr_eq(&o[0], &t[0]))
            })
            .map(|(db, _)| db.clone())
            .collect();
        self.install(app.clone());
        tracing::info!(generation = app.generation, "configuration reloaded");
        Ok((app, fresh))
    }

    pub fn request_shutdown(&self) {
        self.shutdown.notify_one();
    }

    /// Holds new transactions on `database` (all when `None`) until `resume`.
    pub fn pause(&self, database: Option<&str>) {
        match database {
            None => self.paused_all.store(true, Ordering::Release),
            Some(db) => {
                if let Ok(mut p) = self.paused.lock() {
                    p.insert(db.to_string());
                }
            }
        }
        self.any_paused.store(true, Ordering::Release);
    }

    pub fn resume(&self, database: Option<&str>) {
        match database {
            None => {
                self.paused_all.store(false, Ordering::Release);
                if let Ok(mut p) = self.paused.lock() {
                    p.clear();
                }
            }
            Some(db) => {
                if let Ok(mut p) = self.paused.lock() {
                    p.remove(db);
                }
            }
        }
        let still = self.paused_all.load(Ordering::Acquire)
            || self.paused.lock().map(|p| !p.is_empty()).unwrap_or(false);
        self.any_paused.store(still, Ordering::Release);
        self.resumed.notify_waiters();
    }

    pub fn is_paused(&self, database: &str) -> bool {
        self.any_paused.load(Ordering::Acquire)
            && (self.paused_all.load(Ordering::Acquire)
                || self
                    .paused
                    .lock()
                    .map(|p| p.contains(database))
                    .unwrap_or(false))
    }

    /// Waits while `database` is paused. One atomic load when nothing is.
    pub async fn wait_unpaused(&self, database: &str) {
        loop {
            let resumed = self.resumed.notified();
            if !self.is_paused(database) {
                return;
            }
            resumed.await;
        }
    }
}

pub struct App {
    pub generation: u64,
    pub process: Arc<Process>,
    pub config: Config,
    pub users: HashMap<String, UserEntry>,
    /// (client database, client user) -> the pools of every shard and host.
    pub pools: HashMap<(String, String), Arc<UserPools>>,
    /// Per database: the topology of each shard, shared by all users' pools.
    pub topologies: HashMap<String, Vec<Arc<ShardTopology>>>,
    pub tls: Option<TlsAcceptor>,
    pub metrics: Metrics,
}

impl App {
    fn build(
        config: Config,
        process: Arc<Process>,
        previous: Option<&App>,
        generation: u64,
    ) -> Result<App, String> {
        let tls = match (&config.general.tls_cert, &config.general.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            _ => None,
        };
        let users = config
            .users
            .iter()
            .map(|u| {
                // Keep the SCRAM secret (and its salt) when the password did not change.
                let kept = previous
                    .and_then(|p| p.users.get(&u.name))
                    .filter(|e| e.password == u.password && e.auth == u.auth)
                    .and_then(|e| e.scram.clone());
                let scram = match (u.auth, &u.password) {
                    (AuthMethod::ScramSha256, Some(p)) => {
                        Some(kept.unwrap_or_else(|| ScramSecret::from_password(p)))
                    }
                    _ => None,
                };
                let entry = UserEntry {
                    name: u.name.clone(),
                    auth: u.auth,
                    password: u.password.clone(),
                    scram,
                    admin: u.admin,
                };
                (u.name.clone(), entry)
            })
            .collect();
        let g = &config.general;
        let route = Arc::new(RouteOptions {
            read: ReadPolicy {
                primary_reads: g.primary_reads,
                max_lag_bytes: g.max_replica_lag_bytes,
                max_lag_time: g.max_replica_lag_time,
                balance: g.load_balance,
            },
            failover_timeout: g.failover_timeout,
            ban_time: g.ban_time,
        });
        let mut pools = HashMap::new();
        let mut topologies = HashMap::new();
        for db in &config.databases {
            let same_hosts = previous.and_then(|p| {
                let old = p.config.database(&db.name)?;
                (old.shards == db.shards).then(|| p.topologies.get(&db.name).cloned())?
            });
            let topo: Vec<Arc<ShardTopology>> = same_hosts.unwrap_or_else(|| {
                db.shards
                    .iter()
                    .enumerate()
                    .map(|(i, s)| Arc::new(ShardTopology::new(i, &s.hosts)))
                    .collect()
            });
            let size = db.pool_size.unwrap_or(g.pool_size);
            let config_dir = process
                .config_path
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default();
            let routing = crate::routing::Routing::build(db, &config_dir, &process)?.map(Arc::new);
            for user in &config.users {
                let name = format!("{}/{}", db.name, user.name);
                let login = (
                    user.server_user().to_string(),
                    user.server_password().map(str::to_string),
                    db.server_database().to_string(),
                );
                let key = (db.name.clone(), user.name.clone());
                let reusable = previous.and_then(|p| p.pools.get(&key)).filter(|up| {
                    up.shards
                        .iter()
                        .zip(&topo)
                        .all(|(sp, t)| Arc::ptr_eq(&sp.topology, t))
                        && up.shards.len() == topo.len()
                        && up.shards[0].hosts[0].login() == &login
                });
                let shards = match reusable {
                    Some(up) => up
                        .shards
                        .iter()
                        .map(|sp| {
                            for pool in &sp.hosts {
                                pool.resize(size);
                            }
                            ShardPools {
                                topology: sp.topology.clone(),
                                hosts: sp.hosts.clone(),
                            }
                        })
                        .collect(),
                    None => topo
                        .iter()
                        .map(|t| ShardPools {
                            topology: t.clone(),
                            hosts: t
                                .hosts
                                .iter()
                                .map(|h| {
                                    let opts = PoolOptions {
                                        size,
                                        checkout_timeout: g.checkout_timeout,
                                        connect_timeout: g.server_connect_timeout,
                                        idle_timeout: g.server_idle_timeout,
                                    };
                                    let pool_name = format!("{name}@{}", h.addr);
                                    Arc::new(Pool::new(pool_name, h.clone(), login.clone(), opts))
                                })
                                .collect(),
                        })
                        .collect(),
                };
                let up = UserPools::new(
                    name,
                    db.name.clone(),
                    user.name.clone(),
                    shards,
                    route.clone(),
                    routing.clone(),
                );
                pools.insert(key, Arc::new(up));
            }
            topologies.insert(db.name.clone(), topo);
        }
        Ok(App {
            generation,
            process,
            config,
            users,
            pools,
            topologies,
            tls,
            metrics: Metrics::new(),
        })
    }

    /// How the health checker of `database` logs in.
    pub fn health_options(&self, database: &str) -> Option<HealthOptions> {
        let db = self.config.database(database)?;
        let user = self.config.health_check_user()?;
        let g = &self.config.general;
        Some(HealthOptions {
            user: user.server_user().to_string(),
            password: user.server_password().map(str::to_string),
            database: db.server_database().to_string(),
            interval: g.health_check_interval,
            timeout: g.health_check_timeout,
            auto_promote: g.auto_promote,
            auto_promote_after: g.auto_promote_after,
        })
    }

    pub fn session_pooling(&self) -> bool {
        self.config.general.pool_mode == PoolMode::Session
    }
}
