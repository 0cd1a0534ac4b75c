//! Starting and stopping a `shardgate` process for one test.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::harness_cluster::Cluster;
use crate::harness_tools::ScratchDir;

/// A user shardgate authenticates (and logs in to the servers as).
#[derive(Debug, Clone)]
pub struct UserSpec {
    pub name: String,
    pub password: String,
    /// `scram-sha-256`, `md5` or `trust`.
    pub auth: String,
}

impl UserSpec {
    pub fn new(name: &str, password: &str, auth: &str) -> UserSpec {
        UserSpec {
            name: name.into(),
            password: password.into(),
            auth: auth.into(),
        }
    }
}

/// Options for one shardgate process; [`ProxyBuilder::start`] writes the config file.
#[derive(Debug, Clone)]
pub struct ProxyBuilder {
    pool_mode: String,
    pool_size: u32,
    checkout_timeout: String,
    client_login_timeout: String,
    max_client_message_size: Option<u64>,
    tls: Option<(PathBuf, PathBuf)>,
    metrics: bool,
    users: Vec<UserSpec>,
    databases: Vec<String>,
    all_shards: bool,
    replicas: bool,
    extra_general: Vec<String>,
    extra_toml: Vec<String>,
    env: Vec<(String, String)>,
}

impl Default for ProxyBuilder {
    fn default() -> Self {
        ProxyBuilder {
            pool_mode: "transaction".into(),
            pool_size: 10,
            checkout_timeout: "10s".into(),
            client_login_timeout: "10s".into(),
            max_client_message_size: None,
            tls: None,
            metrics: false,
            users: vec![UserSpec::new("app", "app", "scram-sha-256")],
            databases: vec!["app".into()],
            all_shards: false,
            replicas: false,
            extra_general: Vec::new(),
            extra_toml: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl ProxyBuilder {
    /// `transaction` (default) or `session`.
    pub fn pool_mode(mut self, mode: &str) -> Self {
        self.pool_mode = mode.into();
        self
    }
    /// Server connections per (database, user) pool; default 10.
    pub fn pool_size(mut self, n: u32) -> Self {
        self.pool_size = n;
        self
    }
    /// Duration string, e.g. `"1s"`; default `"10s"`.
    pub fn checkout_timeout(mut self, d: &str) -> Self {
        self.checkout_timeout = d.into();
        self
    }
    /// Duration string, e.g. `"1s"`; default `"10s"`.
    pub fn client_login_timeout(mut self, d: &str) -> Self {
        self.client_login_timeout = d.into();
        self
    }
    pub fn max_client_message_size(mut self, bytes: u64) -> Self {
        self.max_client_message_size = Some(bytes);
        self
    }
    /// Offer TLS with this certificate and key (PEM files).
    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }
    /// Serve Prometheus metrics on a free port ([`Proxy::metrics_port`]).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }
    /// Adds a user besides the default `app`/`app` (scram-sha-256).
    pub fn user(mut self, user: UserSpec) -> Self {
        self.users.retain(|u| u.name != user.name);
        self.users.push(user);
        self
    }
    /// Adds a database (same name on the servers) besides `app`.
    pub fn database(mut self, name: &str) -> Self {
        if !self.databases.iter().any(|d| d == name) {
            self.databases.push(name.into());
        }
        self
    }
    /// List every shard of the cluster (default: shard 0 only, which is what the
    /// pooling and protocol tests need).
    pub fn all_shards(mut self) -> Self {
        self.all_shards = true;
        self
    }
    /// List each shard's replicas after its primary (default: primaries only, so reads
    /// never see replication lag).
    pub fn replicas(mut self) -> Self {
        self.replicas = true;
        self
    }
    /// A raw `key = value` line for `[general]`.
    pub fn general(mut self, line: &str) -> Self {
        self.extra_general.push(line.into());
        self
    }
    /// Raw TOML appended at the end of the file.
    pub fn raw_toml(mut self, text: &str) -> Self {
        self.extra_toml.push(text.into());
        self
    }
    /// An environment variable for the shardgate process (e.g. `SHARDGATE_FAULT`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }

    /// The config text; `$LISTEN` and `$METRICS_LISTEN` stand for the addresses that
    /// [`Proxy::start_config`] fills in.
    pub fn to_toml(&self, cluster: &Cluster) -> String {
        let mut t = String::new();
        t.push_str("[general]\nlisten = \"$LISTEN\"\n");
        if self.metrics {
            t.push_str("metrics_listen = \"$METRICS_LISTEN\"\n");
        }
        let _ = writeln!(t, "pool_mode = {}", quote(&self.pool_mode));
        let _ = writeln!(t, "pool_size = {}", self.pool_size);
        let _ = writeln!(t, "checkout_timeout = {}", quote(&self.checkout_timeout));
        let _ = writeln!(
            t,
            "client_login_timeout = {}",
            quote(&self.client_login_timeout)
        );
        if let Some(n) = self.max_client_message_size {
            let _ = writeln!(t, "max_client_message_size = {n}");
        }
        if let Some((cert, key)) = &self.tls {
            let _ = writeln!(t, "tls_cert = {}", quote(&cert.display().to_string()));
            let _ = writeln!(t, "tls_key = {}", quote(&key.display().to_string()));
        }
        for line in &self.extra_general {
            let _ = writeln!(t, "{line}");
        }
        for u in &self.users {
            let _ = write!(
                t,
                "\n[[users]]\nname = {}\npassword = {}\nauth = {}\n",
                quote(&u.name),
                quote(&u.password),
                quote(&u.auth)
            );
        }
        let shards = if self.all_shards { cluster.shards } else { 1 };
        for db in &self.databases {
            let _ = write!(t, "\n[[databases]]\nname = {}\n", quote(db));
            for shard in 0..shards {
                let hosts: Vec<String> = cluster
                    .hosts(shard, self.replicas)
                    .iter()
                    .map(|h| quote(h))
                    .collect();
                let _ = write!(t, "[[databases.shards]]\nhosts = [{}]\n", hosts.join(", "));
            }
        }
        for extra in &self.extra_toml {
            let _ = write!(t, "\n{extra}\n");
        }
        t
    }

    /// Starts shardgate with this configuration (or, in direct mode, returns a handle
    /// pointing at shard 0's primary).
    pub async fn start(self) -> Proxy {
        let cluster = Cluster::shared();
        if crate::direct_mode() {
            return Proxy::direct(cluster);
        }
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Proxy::start_config_env(&self.to_toml(cluster), &env).await
    }
}

fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// A loopback port nobody listens on right now, for a proxy the test is about to start.
///
/// Taken from 30000-32767, below the kernel's ephemeral range (32768-60999): a port
/// from bind-to-0 is an ephemeral one, which any outgoing connection (another test's
/// client, the proxy's own server connections) could take as its source port before the
/// proxy binds it, and which two tests asking at the same moment could both be given.
/// Then one proxy failed to start while its test, seeing the other's listener, went on
/// and met "connection refused" later. Here every port is handed out once per process
/// (each process starts at its own offset), and only after a bind shows it free.
pub fn free_port() -> u16 {
    const FIRST: u32 = 30_000;
    const COUNT: u32 = 2_768;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id() % COUNT;
    for _ in 0..COUNT {
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (offset + i) % COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free loopback port left in {FIRST}-{}",
        FIRST + COUNT - 1
    )
}

/// A running shardgate (or, in direct mode, the primary it would front).
pub struct Proxy {
    child: Option<Mutex<Child>>,
    pid: Option<u32>,
    port: u16,
    metrics_port: Option<u16>,
    dir: Option<ScratchDir>,
    config: String,
}

impl Proxy {
    pub fn builder() -> ProxyBuilder {
        ProxyBuilder::default()
    }

    /// A proxy with the default options.
    pub async fn start_default() -> Proxy {
        Proxy::builder().start().await
    }

    /// Direct mode: shard 0's primary, or `SHARDGATE_E2E_DIRECT_PORT` when set (e.g. a
    /// pooler started by hand, to compare against).
    fn direct(cluster: &Cluster) -> Proxy {
        let port = match std::env::var("SHARDGATE_E2E_DIRECT_PORT") {
            Ok(p) => p
                .parse()
                .unwrap_or_else(|_| panic!("SHARDGATE_E2E_DIRECT_PORT={p:?} is not a port")),
            Err(_) => cluster.primary_port(0),
        };
        Proxy {
            child: None,
            pid: None,
            port,
            metrics_port: None,
            dir: None,
            config: String::new(),
        }
    }

    /// Starts `$SHARDGATE_BIN --config FILE` with this config text, replacing `$LISTEN`
    /// (and `$METRICS_LISTEN`) by free loopback addresses, and waits up to 10 s until
    /// the listen port (and the metrics port) accept connections.
    pub async fn start_config(config_text: &str) -> Proxy {
        Proxy::start_config_env(config_text, &[]).await
    }

    /// [`Proxy::start_config`] with extra environment variables for the process.
    pub async fn start_config_env(config_text: &str, env: &[(&str, &str)]) -> Proxy {
        if crate::direct_mode() {
            return Proxy::direct(Cluster::shared());
        }
        let port = free_port();
        let metrics_port = config_text.contains("$METRICS_LISTEN").then(|| loop {
            let p = free_port();
            if p != port {
                break p;
            }
        });
        let mut config = config_text.replace("$LISTEN", &format!("127.0.0.1:{port}"));
        if let Some(mp) = metrics_port {
            config = config.replace("$METRICS_LISTEN", &format!("127.0.0.1:{mp}"));
        }
        Proxy::spawn(config, port, metrics_port, env).await
    }

    /// Starts another shardgate with exactly this one's config (same listen and metrics
    /// addresses, a fresh scratch directory) and these environment variables: the
    /// successor of a process that died or was stopped. This one must have exited.
    pub async fn start_successor(&self, env: &[(&str, &str)]) -> Proxy {
        if self.is_direct() {
            return Proxy::direct(Cluster::shared());
        }
        assert!(
            !self.is_alive(),
            "start_successor: shardgate (pid {:?}) is still running",
            self.pid
        );
        Proxy::spawn(self.config.clone(), self.port, self.metrics_port, env).await
    }

    async fn spawn(
        config: String,
        port: u16,
        metrics_port: Option<u16>,
        env: &[(&str, &str)],
    ) -> Proxy {
        let bin = std::env::var("SHARDGATE_BIN").unwrap_or_else(|_| {
            panic!("SHARDGATE_BIN is not set: run the end-to-end tests with ./tests/run.sh")
        });
        let dir = ScratchDir::new("proxy");
        let config_path = dir.path().join("shardgate.toml");
        std::fs::write(&config_path, &config).expect("write proxy config");
        let log_path = dir.path().join("shardgate.log");
        let log = File::create(&log_path).expect("create proxy log");
        let log2 = log.try_clone().expect("clone log handle");
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            // Plain text in the log file (tracing honours NO_COLOR).
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let pid = child.id();
        let proxy = Proxy {
            child: Some(Mutex::new(child)),
            pid: Some(pid),
            port,
            metrics_port,
            dir: Some(dir),
            config,
        };
        proxy.wait_ready(Duration::from_secs(10)).await;
        proxy
    }

    async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut ports = vec![self.port];
        ports.extend(self.metrics_port);
        loop {
            if let Some(status) = self.exit_status() {
                panic!(
                    "shardgate exited during startup ({status})\nconfig:\n{}\nlog:\n{}",
                    self.config,
                    self.log()
                );
            }
            if ports
                .iter()
                .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "shardgate did not accept connections on {ports:?} within {timeout:?}\n\
                     config:\n{}\nlog:\n{}",
                    self.config,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The metrics port, when started with [`ProxyBuilder::metrics`].
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_port
    }

    /// The process id (None in direct mode).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// True in direct mode (no shardgate process).
    pub fn is_direct(&self) -> bool {
        self.child.is_none()
    }

    /// The config file text as started.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// Connection string for app/app on database app.
    pub fn url(&self) -> String {
        self.url_for("app", Some("app"), "app")
    }

    /// Connection string for a user (password optional) and database.
    pub fn url_for(&self, user: &str, password: Option<&str>, db: &str) -> String {
        let mut s = format!(
            "host=127.0.0.1 port={} user={user} dbname={db} connect_timeout=10",
            self.port
        );
        if let Some(p) = password {
            let _ = write!(s, " password={p}");
        }
        s
    }

    /// Everything shardgate wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        match &self.dir {
            Some(dir) => std::fs::read_to_string(dir.path().join("shardgate.log"))
                .unwrap_or_else(|e| format!("<cannot read log: {e}>")),
            None => "<direct mode: no shardgate log>".into(),
        }
    }

    fn exit_status(&self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_ref()?;
        let mut child = child.lock().unwrap_or_else(|e| e.into_inner());
        child.try_wait().ok().flatten()
    }

    /// True while the process runs (not exited, not a zombie). Always true in direct mode.
    pub fn is_alive(&self) -> bool {
        let Some(pid) = self.pid else { return true };
        if self.exit_status().is_some() {
            return false;
        }
        // Cross-check with /proc: state is the field after the ")" closing the name.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    /// The config file shardgate was started with (None in direct mode); rewrite it and
    /// [`Proxy::signal`] `HUP` to test a reload.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path().join("shardgate.toml"))
    }

    /// Sends a signal (`"TERM"`, `"INT"`, `"HUP"`, ...) to the process by PID.
    pub fn signal(&self, name: &str) {
        let Some(pid) = self.pid else { return };
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(status.success(), "kill -{name} {pid} failed: {status}");
    }

    /// Waits up to `timeout` for the process to exit; returns its status if it did.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.child.as_ref()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the process (SIGKILL to its PID) and reaps it. Idempotent.
    pub fn kill(&self) {
        if let Some(child) = &self.child {
            let mut child = child.lock().unwrap_or_else(|e| e.into_inner());
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() && !self.is_direct() {
            let log = self.log();
            const MAX: usize = 64 * 1024;
            let shown = if log.len() > MAX {
                let mut cut = log.len() - MAX;
                while !log.is_char_boundary(cut) {
                    cut += 1;
                }
                format!("<{cut} bytes cut>\n{}", &log[cut..])
            } else {
                log
            };
            eprintln!(
                "===== shardgate on port {} (pid {:?}) config =====\n{}\n===== shardgate log =====\n{}\n===== end of shardgate log =====",
                self.port, self.pid, self.config, shown
            );
        }
    }
}
