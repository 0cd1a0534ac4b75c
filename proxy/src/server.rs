//! One connection to a Postgres server: connect, authenticate as the configured user, and
//! keep what the session layer needs to know about it (its parameters, which prepared
//! statements exist on it, which settings it carries).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::{self, body, frame_len, parse_error_fields, Reader};
use crate::settings::Settings;

/// Server messages can be large (a DataRow of a big bytea); the limit only guards against
/// a corrupt stream.
pub const MAX_SERVER_MESSAGE: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not connect to server {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The server refused us; its ErrorResponse body is passed on to the client.
    #[error("server {addr} refused the connection: {message}")]
    Refused {
        addr: SocketAddr,
        code: String,
        message: String,
    },
    #[error("server {addr} broke the protocol: {what}")]
    Protocol { addr: SocketAddr, what: String },
    #[error("server {addr} asks for a password and none is configured")]
    NoPassword { addr: SocketAddr },
}

impl ServerError {
    /// The SQLSTATE and message a client should see for this failure.
    pub fn client_error(&self) -> (&str, String) {
        match self {
            ServerError::Refused { code, message, .. } => (code.as_str(), message.clone()),
            other => (protocol::sqlstate::CONNECTION_FAILURE, other.to_string()),
        }
    }
}

/// Prepared statements that exist on one server connection, under proxy-global names.
#[derive(Default)]
pub struct PreparedSet {
    /// statement hash -> last use (a tick), for evicting the least recently used.
    used: HashMap<u64, u64>,
    tick: u64,
}

impl PreparedSet {
    pub fn contains(&mut self, hash: u64) -> bool {
        self.tick += 1;
        match self.used.get_mut(&hash) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }
    pub fn insert(&mut self, hash: u64) {
        self.tick += 1;
        self.used.insert(hash, self.tick);
    }
    pub fn remove(&mut self, hash: u64) {
        self.used.remove(&hash);
    }
    pub fn clear(&mut self) {
        self.used.clear();
    }
    pub fn len(&self) -> usize {
        self.used.len()
    }
    /// The least recently used statement, to close when the set is full.
    pub fn oldest(&self) -> Option<u64> {
        self.used.iter().min_by_key(|(_, t)| **t).map(|(h, _)| *h)
    }
}

pub struct ServerConn {
    pub addr: SocketAddr,
    pub stream: TcpStream,
    pub rbuf: BytesMut,
    pub backend_pid: i32,
    pub backend_secret: i32,
    /// ParameterStatus values as this server last reported them.
    pub params: Vec<(String, String)>,
    pub prepared: PreparedSet,
    /// Hash of the text + types last parsed as the unnamed statement here, if it still exists.
    pub unnamed: Option<u64>,
    /// The session settings this connection carries; `None` when unknown (then it is reset
    /// before use).
    pub settings: Option<Arc<Settings>>,
    /// When it was last returned to its pool (`clock::coarse_ms`).
    pub idle_since_ms: u64,
    /// Unique in this process (see `CancelSlot::attach`).
    pub id: u64,
}

/// Numbers server connections (`ServerConn::id`).
static NEXT_CONN_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub struct Login<'a> {
    pub user: &'a str,
    pub password: Option<&'a str>,
    pub database: &'a str,
}

impl ServerConn {
    /// Where a cancel of this connection's running query goes.
    pub fn cancel_target(&self) -> crate::cancel::CancelTarget {
        crate::cancel::CancelTarget {
            addr: self.addr,
            pid: self.backend_pid,
            secret: self.backend_secret,
        }
    }

    pub async fn connect(addr: SocketAddr, login: &Login<'_>) -> Result<ServerConn, ServerError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ServerError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let mut conn = ServerConn {
            addr,
            stream,
            rbuf: BytesMut::with_capacity(8192),
            backend_pid: 0,
            backend_secret: 0,
            params: Vec::new(),
            prepared: PreparedSet::default(),
            unnamed: None,
            settings: Some(Settings::empty()),
            idle_since_ms: crate::clock::coarse_ms(),
            id: NEXT_CONN_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        conn.startup(login).await?;
        Ok(conn)
    }

    fn io_err(&self, source: std::io::Error) -> ServerError {
        ServerError::Io {
            addr: self.addr,
            source,
        }
    }

    fn protocol_err(&self, what: impl Into<String>) -> ServerError {
        ServerError::Protocol {
            addr: self.addr,
            what: what.into(),
        }
    }

    pub async fn send(&mut self, buf: &[u8]) -> Result<(), ServerError> {
        self.stream.write_all(buf).await.map_err(|e| self.io_err(e))
    }

    /// Reads one whole message; returns its length at the front of `rbuf`.
    pub async fn read_msg(&mut self) -> Result<usize, ServerError> {
        loop {
            match frame_len(&self.rbuf, MAX_SERVER_MESSAGE) {
                Ok(Some(n)) => return Ok(n),
                Ok(None) => {}
                Err(e) => return Err(self.protocol_err(e.to_string())),
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| self.io_err(e))?;
            if n == 0 {
                return Err(self.io_err(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    async fn startup(&mut self, login: &Login<'_>) -> Result<(), ServerError> {
        let mut out = BytesMut::with_capacity(128);
        frontend::startup_message(
            [("user", login.user), ("database", login.database)]
                .into_iter()
                .chain(std::iter::once(("application_name", "shardgate"))),
            &mut out,
        )
        .map_err(|e| self.protocol_err(e.to_string()))?;
        self.send(&out).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let n = self.read_msg().await?;
            let msg = self.rbuf.split_to(n);
            let b = body(&msg);
            match msg[0] {
                b'R' => {
                    let mut r = Reader::new(b);
                    let code = r.i32().ok_or_else(|| self.protocol_err("short auth"))?;
                    out.clear();
                    match code {
                        0 => continue,
                        3 => {
                            let pw = self.password(login)?;
                            frontend::password_message(pw.as_bytes(), &mut out)
                                .map_err(|e| self.protocol_err(e.to_string()))?;
                        }
                        5 => {
                            let pw = self.password(login)?;
                            let salt = r.bytes(4).ok_or_else(|| self.protocol_err("md5 salt"))?;
                            let resp = crate::auth::md5_response(
                                login.user,
                                pw,
                                [salt[0], salt[1], salt[2], salt[3]],
                            );
                            frontend::password_message(resp.as_bytes(), &mut out)
                                .map_err(|e| self.protocol_err(e.to_string()))?;
                        }
                        10 => {
                            let pw = self.password(login)?;
                            let mut mechs = Vec::new();
                            while let Some(m) = r.cstr() {
                                if m.is_empty() {
                                    break;
                                }
                                mechs.push(m);
                            }
                            if !mechs.iter().any(|m| *m == b"SCRAM-SHA-256") {
                                return Err(self.protocol_err("no supported SASL mechanism"));
                            }
                            let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                                .map_err(|e| self.protocol_err(e.to_string()))?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| self.protocol_err("unexpected SASL continue"))?;
                            s.update(r.rest()).map_err(|e| ServerError::Refused {
                                addr: self.addr,
                                code: protocol::sqlstate::INVALID_PASSWORD.into(),
                                message: format!("SCRAM with server failed: {e}"),
                            })?;
                            frontend::sasl_response(s.message(), &mut out)
                                .map_err(|e| self.protocol_err(e.to_string()))?;
                        }
                        12 => {
                            let mut s = scram
                                .take()
                                .ok_or_else(|| self.protocol_err("unexpected SASL final"))?;
                            s.finish(r.rest()).map_err(|e| ServerError::Refused {
                                addr: self.addr,
                                code: protocol::sqlstate::INVALID_PASSWORD.into(),
                                message: format!("server signature invalid: {e}"),
                            })?;
                            continue;
                        }
                        other => {
                            return Err(self.protocol_err(format!("auth method {other}")));
                        }
                    }
                    self.send(&out).await?;
                }
                b'S' => self.record_param(b),
                b'K' => {
                    let mut r = Reader::new(b);
                    self.backend_pid = r.i32().unwrap_or(0);
                    self.backend_secret = r.i32().unwrap_or(0);
                }
                b'E' => {
                    let f = parse_error_fields(b);
                    return Err(ServerError::Refused {
                        addr: self.addr,
                        code: String::from_utf8_lossy(f.code).into_owned(),
                        message: String::from_utf8_lossy(f.message).into_owned(),
                    });
                }
                b'N' => {}
                b'Z' => return Ok(()),
                other => {
                    return Err(self.protocol_err(format!("unexpected message {:?}", other as char)))
                }
            }
        }
    }

    fn password<'a>(&self, login: &Login<'a>) -> Result<&'a str, ServerError> {
        login
            .password
            .ok_or(ServerError::NoPassword { addr: self.addr })
    }

    /// Records a ParameterStatus body.
    pub fn record_param(&mut self, body: &[u8]) {
        let mut r = Reader::new(body);
        let (Some(name), Some(value)) = (r.cstr(), r.cstr()) else {
            return;
        };
        let name = String::from_utf8_lossy(name);
        let value = String::from_utf8_lossy(value).into_owned();
        match self.params.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => *v = value,
            None => self.params.push((name.into_owned(), value)),
        }
    }

    /// Runs `sql` (simple protocol) to completion, for control statements shardgate issues
    /// itself outside any client exchange. Returns the first error, if any.
    pub async fn run(&mut self, sql: &str) -> Result<Option<(String, String)>, ServerError> {
        // A simple query destroys the server's unnamed statement.
        self.unnamed = None;
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        protocol::query(&mut out, sql);
        self.send(&out).await?;
        let mut first_error = None;
        loop {
            let n = self.read_msg().await?;
            let msg = self.rbuf.split_to(n);
            match msg[0] {
                b'S' => self.record_param(body(&msg)),
                b'E' if first_error.is_none() => {
                    let f = parse_error_fields(body(&msg));
                    first_error = Some((
                        String::from_utf8_lossy(f.code).into_owned(),
                        String::from_utf8_lossy(f.message).into_owned(),
                    ));
                }
                b'Z' => return Ok(first_error),
                _ => {}
            }
        }
    }

    /// True when an idle connection shows no sign of having been closed by the server.
    pub fn looks_alive(&self) -> bool {
        let mut probe = [0u8; 1];
        match self.stream.try_read(&mut probe) {
            // Idle servers send nothing; bytes mean a FATAL notice or EOF.
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        }
    }
}

/// A tokio-postgres connection for shardgate's own work on a server (health checks, 2PC
/// recovery, the slot mover), its driver task spawned.
pub async fn connect_client(
    addr: SocketAddr,
    user: &str,
    password: Option<&str>,
    database: &str,
    application_name: &str,
    timeout: std::time::Duration,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(addr.ip().to_string())
        .port(addr.port())
        .user(user)
        .dbname(database)
        .application_name(application_name)
        .connect_timeout(timeout);
    if let Some(p) = password {
        cfg.password(p);
    }
    let (client, connection) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A server error as `message (SQLSTATE xxxxx)` with its detail and hint; other errors
/// with their cause.
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    use std::fmt::Write as _;
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            let _ = write!(s, "; {d}");
        }
        if let Some(h) = db.hint() {
            let _ = write!(s, "; hint: {h}");
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            let _ = write!(s, ": {text}");
        }
        source = cause.source();
    }
    s
}
