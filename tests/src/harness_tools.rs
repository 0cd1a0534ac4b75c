//! External tools (psql, pgbench, openssl), a tiny HTTP client and scratch dirs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

/// A temporary directory under `$SHARDGATE_TEST_HOME/e2e` (or the system temp dir),
/// removed on drop unless the test is panicking (then it is kept for inspection).
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(prefix: &str) -> ScratchDir {
        let base = match std::env::var("SHARDGATE_TEST_HOME") {
            Ok(home) => PathBuf::from(home).join("e2e"),
            Err(_) => std::env::temp_dir().join("shardgate-e2e"),
        };
        let path = base.join(crate::unique_name(prefix));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        ScratchDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Exit status and output of a finished command.
#[derive(Debug)]
pub struct CmdOutput {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// Panics with the output unless the command succeeded.
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(
            self.success,
            "{what} failed (exit {:?})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

async fn run(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration, what: &str) -> CmdOutput {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let input = input.to_vec();
        tokio::spawn(async move {
            let _ = pipe.write_all(&input).await;
            // Dropping the pipe closes it: end of input.
        });
    }
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => panic!("{what} did not finish within {timeout:?} (killed)"),
    };
    CmdOutput {
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `psql -X -v ON_ERROR_STOP=1 <args> "<conninfo>"` (60 s limit), feeding `stdin`.
pub async fn psql(conninfo: &str, args: &[&str], stdin: Option<&[u8]>) -> CmdOutput {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .arg(conninfo)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSERVICE")
        .env_remove("PSQLRC");
    run(cmd, stdin, Duration::from_secs(60), "psql").await
}

/// Runs `pgbench <args>` with `PGPASSWORD` set (120 s limit).
pub async fn pgbench(args: &[String], password: &str) -> CmdOutput {
    let mut cmd = Command::new("pgbench");
    cmd.args(args)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10");
    run(cmd, None, Duration::from_secs(120), "pgbench").await
}

/// A real client driver, checked by its program in `tests/drivers` (installed by
/// `tests/drivers/install.sh`, which `tests/run.sh` runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Asyncpg,
    Psycopg,
    Psycopg2,
    NodePostgres,
    Jdbc,
}

impl Driver {
    pub const ALL: [Driver; 5] = [
        Driver::Asyncpg,
        Driver::Psycopg,
        Driver::Psycopg2,
        Driver::NodePostgres,
        Driver::Jdbc,
    ];

    /// Runs the driver's check in `mode` (`pooled` or `sharded`, see the programs)
    /// against `url` (`postgres://user:password@host:port/db`); panics with its output
    /// unless it exits 0 having printed `ok` (3 minute limit).
    pub async fn check(self, mode: &str, url: &str) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers");
        let mut cmd = match self {
            Driver::Asyncpg | Driver::Psycopg | Driver::Psycopg2 => {
                // Debian's python3, which the packages install into (not a pyenv shim).
                let mut c = Command::new("/usr/bin/python3");
                c.arg(dir.join(format!("{}_check.py", self.name())));
                c
            }
            Driver::NodePostgres => {
                let mut c = Command::new("node");
                c.arg(dir.join("node/pg_check.js"));
                c
            }
            Driver::Jdbc => {
                let mut c = Command::new("java");
                c.args(["-cp", "/usr/share/java/postgresql.jar"])
                    .arg(dir.join("jdbc/JdbcCheck.java"));
                c
            }
        };
        cmd.args([mode, url]);
        let what = format!("{} check ({mode})", self.name());
        let out = run(cmd, None, Duration::from_secs(180), &what).await;
        assert!(
            out.success && out.stdout.lines().last() == Some("ok"),
            "{what} against {url} failed ({:?}):\n{}\n{}",
            out.code,
            out.stdout,
            out.stderr
        );
    }

    pub fn name(self) -> &'static str {
        match self {
            Driver::Asyncpg => "asyncpg",
            Driver::Psycopg => "psycopg",
            Driver::Psycopg2 => "psycopg2",
            Driver::NodePostgres => "node-postgres",
            Driver::Jdbc => "jdbc",
        }
    }
}

/// Writes a self-signed certificate for `localhost`/127.0.0.1 (valid 1 day) and its
/// key into `dir` with openssl; returns (cert.pem, key.pem).
pub async fn make_self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-newkey", "rsa:2048", "-nodes"])
        .args(["-subj", "/CN=localhost", "-days", "1"])
        // rustls clients want the name in subjectAltName and an end-entity certificate.
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert);
    run(cmd, None, Duration::from_secs(60), "openssl req")
        .await
        .assert_success("openssl req");
    (cert, key)
}

/// `GET path` over HTTP/1.0 on 127.0.0.1:port; returns (status code, body). 5 s limit.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        let req =
            format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other(format!("no HTTP header end in {text:?}")))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP GET timed out"))?
}
