//! Everything a client session needs from the running proxy, built from the configuration.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::sync::Arc;

use shardgate_config::{AuthMethod, Config, PoolMode};
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
}

pub struct App {
    pub config: Config,
    pub users: HashMap<String, UserEntry>,
    /// (client database, client user) -> the pools of every shard and host.
    pub pools: HashMap<(String, String), Arc<UserPools>>,
    /// Per database: the topology of each shard, shared by all users' pools.
    pub topologies: HashMap<String, Vec<Arc<ShardTopology>>>,
    pub cancels: CancelRegistry,
    pub tls: Option<TlsAcceptor>,
    pub metrics: Metrics,
    /// Keys the hashes that name prepared statements on servers; random per process so a
    /// client cannot craft collisions.
    pub statement_hasher: RandomState,
}

impl App {
    pub fn new(config: Config) -> Result<App, String> {
        let tls = match (&config.general.tls_cert, &config.general.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            _ => None,
        };
        let users = config
            .users
            .iter()
            .map(|u| {
                let scram = match (u.auth, &u.password) {
                    (AuthMethod::ScramSha256, Some(p)) => Some(ScramSecret::from_password(p)),
                    _ => None,
                };
                let entry = UserEntry {
                    name: u.name.clone(),
                    auth: u.auth,
                    password: u.password.clone(),
                    scram,
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
            let topo: Vec<Arc<ShardTopology>> = db
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| Arc::new(ShardTopology::new(i, &s.hosts)))
                .collect();
            for user in &config.users {
                let name = format!("{}/{}", db.name, user.name);
                let shards = topo
                    .iter()
                    .map(|t| ShardPools {
                        topology: t.clone(),
                        hosts: t
                            .hosts
                            .iter()
                            .map(|h| {
                                let opts = PoolOptions {
                                    size: db.pool_size.unwrap_or(g.pool_size),
                                    checkout_timeout: g.checkout_timeout,
                                    connect_timeout: g.server_connect_timeout,
                                    idle_timeout: g.server_idle_timeout,
                                };
                                let login = (
                                    user.server_user().to_string(),
                                    user.server_password().map(str::to_string),
                                    db.server_database().to_string(),
                                );
                                let pool_name = format!("{name}@{}", h.addr);
                                Arc::new(Pool::new(pool_name, h.clone(), login, opts))
                            })
                            .collect(),
                    })
                    .collect();
                pools.insert(
                    (db.name.clone(), user.name.clone()),
                    Arc::new(UserPools::new(name, shards, route.clone())),
                );
            }
            topologies.insert(db.name.clone(), topo);
        }
        Ok(App {
            config,
            users,
            pools,
            topologies,
            cancels: CancelRegistry::default(),
            tls,
            metrics: Metrics::new(),
            statement_hasher: RandomState::new(),
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
