//! The Postgres cluster the tests run against (started by `tests/run.sh`).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::process::Command;

/// Layout of a cluster started by `deploy/local/cluster.sh`.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// First port: shard 0's primary.
    pub pg_port: u16,
    /// Number of shards (each a primary plus `replicas` streaming replicas).
    pub shards: u16,
    /// Replicas per shard.
    pub replicas: u16,
    /// State directory of the cluster (`SHARDGATE_HOME` of cluster.sh).
    pub home: PathBuf,
    socket_dir: OnceLock<Option<PathBuf>>,
}

const HOW: &str = "run the end-to-end tests with ./tests/run.sh, which starts the cluster \
                   and exports SHARDGATE_TEST_PG_PORT, SHARDGATE_TEST_SHARDS, \
                   SHARDGATE_TEST_REPLICAS, SHARDGATE_TEST_HOME and SHARDGATE_BIN";

fn env_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: {HOW}"))
}

fn env_num<T: std::str::FromStr>(name: &str) -> T {
    let v = env_var(name);
    v.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name}={v:?} is not a number: {HOW}"))
}

impl Cluster {
    /// The cluster shared by all tests of this process, read from the environment.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            Cluster::new(
                env_num("SHARDGATE_TEST_PG_PORT"),
                env_num("SHARDGATE_TEST_SHARDS"),
                env_num("SHARDGATE_TEST_REPLICAS"),
                PathBuf::from(env_var("SHARDGATE_TEST_HOME")),
            )
        })
    }

    /// Describes a cluster started elsewhere (e.g. a test's own, under its own home).
    pub fn new(pg_port: u16, shards: u16, replicas: u16, home: PathBuf) -> Cluster {
        Cluster {
            pg_port,
            shards,
            replicas,
            home,
            socket_dir: OnceLock::new(),
        }
    }

    /// Port of shard `shard`'s primary.
    pub fn primary_port(&self, shard: u16) -> u16 {
        assert!(
            shard < self.shards,
            "shard {shard} out of range ({} shards)",
            self.shards
        );
        self.pg_port + shard * (self.replicas + 1)
    }

    /// Port of replica `j` (1-based) of shard `shard`.
    pub fn replica_port(&self, shard: u16, j: u16) -> u16 {
        assert!(
            (1..=self.replicas).contains(&j),
            "replica {j} out of range ({} replicas)",
            self.replicas
        );
        self.primary_port(shard) + j
    }

    /// `host:port` of a shard's servers, primary first.
    pub fn hosts(&self, shard: u16, with_replicas: bool) -> Vec<String> {
        let mut hosts = vec![format!("127.0.0.1:{}", self.primary_port(shard))];
        if with_replicas {
            for j in 1..=self.replicas {
                hosts.push(format!("127.0.0.1:{}", self.replica_port(shard, j)));
            }
        }
        hosts
    }

    /// Connection string (libpq key=value form) for user app straight to `port`.
    pub fn direct_url(&self, port: u16, db: &str) -> String {
        format!("host=127.0.0.1 port={port} user=app password=app dbname={db} connect_timeout=10")
    }

    /// Connection string for user app straight to shard `shard`'s primary.
    pub fn primary_url(&self, shard: u16, db: &str) -> String {
        self.direct_url(self.primary_port(shard), db)
    }

    /// The directory holding the unix socket of the server on `port`.
    ///
    /// `SHARDGATE_TEST_SOCKET_DIR` wins; then what `$SHARDGATE_CLUSTER_SH socket-dir`
    /// prints for this cluster; otherwise the socket file `.s.PGSQL.<port>` is looked
    /// up under the cluster home, then in the usual system places.
    pub fn socket_dir(&self, port: u16) -> PathBuf {
        if let Ok(dir) = std::env::var("SHARDGATE_TEST_SOCKET_DIR") {
            return PathBuf::from(dir);
        }
        let file = format!(".s.PGSQL.{port}");
        if let Some(dir) = self.cluster_sh_socket_dir() {
            if dir.join(&file).exists() {
                return dir;
            }
        }
        let roots = [
            (self.home.clone(), 5),
            (PathBuf::from("/tmp"), 1),
            (PathBuf::from("/var/run/postgresql"), 0),
        ];
        for (root, depth) in &roots {
            if let Some(dir) = find_socket(root, &file, *depth) {
                return dir;
            }
        }
        panic!(
            "no unix socket {file} under {} (or /tmp, /var/run/postgresql); \
             set SHARDGATE_TEST_SOCKET_DIR",
            self.home.display()
        )
    }

    fn cluster_sh_socket_dir(&self) -> Option<PathBuf> {
        self.socket_dir
            .get_or_init(|| {
                let script = std::env::var("SHARDGATE_CLUSTER_SH").ok()?;
                let out = std::process::Command::new(script)
                    .arg("socket-dir")
                    .env("SHARDGATE_HOME", &self.home)
                    .stderr(std::process::Stdio::null())
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout);
                let line = text.lines().next()?.trim();
                (out.status.success() && !line.is_empty()).then(|| PathBuf::from(line))
            })
            .clone()
    }

    /// Runs statements (one `psql -c` each, so `CREATE DATABASE` works) as superuser
    /// `postgres` over the unix socket of the server on `port`. Returns psql's output.
    pub async fn try_superuser_sql(
        &self,
        port: u16,
        db: &str,
        statements: &[&str],
    ) -> Result<String, String> {
        let dir = self.socket_dir(port);
        let mut args: Vec<String> = vec![
            "-X".into(),
            "-q".into(),
            "-At".into(),
            "-v".into(),
            "ON_ERROR_STOP=1".into(),
            "-h".into(),
            dir.display().to_string(),
            "-p".into(),
            port.to_string(),
            "-U".into(),
            "postgres".into(),
            "-d".into(),
            db.into(),
        ];
        for s in statements {
            args.push("-c".into());
            args.push((*s).into());
        }
        // Peer authentication maps the OS user to the database user: as root, become
        // postgres. (With trust authentication this works as well.)
        let mut cmd = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "psql"]);
            c
        } else {
            Command::new("psql")
        };
        cmd.args(&args).kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .map_err(|_| format!("superuser psql timed out: {statements:?}"))?
            .map_err(|e| format!("cannot run psql: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "superuser psql on port {port} failed ({}): {statements:?}\nstdout: {stdout}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// [`Cluster::try_superuser_sql`], panicking on failure.
    pub async fn superuser_sql(&self, port: u16, db: &str, statements: &[&str]) -> String {
        match self.try_superuser_sql(port, db, statements).await {
            Ok(out) => out,
            Err(e) => panic!("{e}"),
        }
    }

    /// Creates (or resets the password of) a login role on every shard primary.
    pub async fn ensure_role(&self, name: &str, password: &str) {
        let sql = format!(
            "DO $$BEGIN \
               IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN \
                 ALTER ROLE \"{name}\" LOGIN PASSWORD '{password}'; \
               ELSE \
                 CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'; \
               END IF; \
             END$$"
        );
        for shard in 0..self.shards {
            let port = self.primary_port(shard);
            // Two tests may race to create the same role: retry once on a duplicate.
            if let Err(e) = self.try_superuser_sql(port, "postgres", &[&sql]).await {
                if e.contains("already exists") {
                    self.superuser_sql(port, "postgres", &[&sql]).await;
                } else {
                    panic!("{e}");
                }
            }
        }
    }

    /// Drops (forcibly) and creates database `db` owned by `owner` on every shard primary.
    pub async fn recreate_database(&self, db: &str, owner: &str) {
        let drop = format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)");
        let create = format!("CREATE DATABASE \"{db}\" OWNER \"{owner}\"");
        for shard in 0..self.shards {
            let port = self.primary_port(shard);
            self.superuser_sql(port, "postgres", &[&drop, &create])
                .await;
        }
    }

    /// Drops database `db` on every shard primary, ignoring failures.
    pub async fn drop_database(&self, db: &str) {
        let drop = format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)");
        for shard in 0..self.shards {
            let port = self.primary_port(shard);
            if let Err(e) = self.try_superuser_sql(port, "postgres", &[&drop]).await {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn find_socket(dir: &Path, file: &str, depth: u32) -> Option<PathBuf> {
    let candidate = dir.join(file);
    if let Ok(m) = std::fs::symlink_metadata(&candidate) {
        if m.file_type().is_socket() {
            return Some(dir.to_path_buf());
        }
    }
    if depth == 0 {
        return None;
    }
    let entries = std::fs::read_dir(dir).ok()?;
    for entry in entries.flatten() {
        // Follows symlinks: the cluster's pg/ may link to a directory elsewhere.
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if meta.is_dir() {
            if let Some(found) = find_socket(&entry.path(), file, depth - 1) {
                return Some(found);
            }
        }
    }
    None
}
