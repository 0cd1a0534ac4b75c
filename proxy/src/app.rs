//! Everything a client session needs from the running proxy, built from the configuration.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::sync::Arc;

use shardgate_config::{AuthMethod, Config, PoolMode};
use tokio_rustls::TlsAcceptor;

use crate::auth::ScramSecret;
use crate::cancel::CancelRegistry;
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolOptions};

pub struct UserEntry {
    pub name: String,
    pub auth: AuthMethod,
    pub password: Option<String>,
    pub scram: Option<ScramSecret>,
}

pub struct App {
    pub config: Config,
    pub users: HashMap<String, UserEntry>,
    /// (client database, client user) -> pool of connections to shard 0's primary.
    pub pools: HashMap<(String, String), Arc<Pool>>,
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
        let mut pools = HashMap::new();
        for db in &config.databases {
            // Until sharding lands every database is served by shard 0's first host.
            let addr = db.shards[0].hosts[0];
            for user in &config.users {
                let name = format!("{}/{}", db.name, user.name);
                let opts = PoolOptions {
                    size: db.pool_size.unwrap_or(config.general.pool_size),
                    checkout_timeout: config.general.checkout_timeout,
                    connect_timeout: config.general.server_connect_timeout,
                    idle_timeout: config.general.server_idle_timeout,
                };
                let login = (
                    user.server_user().to_string(),
                    user.server_password().map(str::to_string),
                    db.server_database().to_string(),
                );
                pools.insert(
                    (db.name.clone(), user.name.clone()),
                    Arc::new(Pool::new(name, addr, login, opts)),
                );
            }
        }
        Ok(App {
            config,
            users,
            pools,
            cancels: CancelRegistry::default(),
            tls,
            metrics: Metrics::new(),
            statement_hasher: RandomState::new(),
        })
    }

    pub fn session_pooling(&self) -> bool {
        self.config.general.pool_mode == PoolMode::Session
    }
}
