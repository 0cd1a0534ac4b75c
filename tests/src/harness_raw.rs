//! A small frontend that speaks the Postgres wire protocol message by message, for
//! what drivers won't send (unnamed statements across round trips, garbage, TLS
//! handshakes checked against a known certificate).

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// One backend message: tag and body (without the length word).
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Bytes,
}

impl Msg {
    /// Fields of an ErrorResponse/NoticeResponse as (field type, value).
    pub fn fields(&self) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        let mut b = &self.body[..];
        while let Some((&t, rest)) = b.split_first() {
            if t == 0 {
                break;
            }
            let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
            out.push((t, String::from_utf8_lossy(&rest[..end]).into_owned()));
            b = rest.get(end + 1..).unwrap_or(&[]);
        }
        out
    }

    fn field(&self, t: u8) -> Option<String> {
        self.fields()
            .into_iter()
            .find(|(ft, _)| *ft == t)
            .map(|(_, v)| v)
    }

    /// SQLSTATE of an ErrorResponse.
    pub fn error_code(&self) -> Option<String> {
        (self.tag == b'E').then(|| self.field(b'C')).flatten()
    }

    /// Message text of an ErrorResponse/NoticeResponse.
    pub fn error_message(&self) -> Option<String> {
        matches!(self.tag, b'E' | b'N')
            .then(|| self.field(b'M'))
            .flatten()
    }

    /// Columns of a DataRow (None = NULL).
    pub fn data_row(&self) -> Vec<Option<Bytes>> {
        assert_eq!(self.tag, b'D', "not a DataRow: {self:?}");
        let mut b = self.body.clone();
        let n = b.get_i16();
        (0..n)
            .map(|_| {
                let len = b.get_i32();
                if len < 0 {
                    None
                } else {
                    Some(b.split_to(len as usize))
                }
            })
            .collect()
    }

    /// Columns of a DataRow as text (lossy).
    pub fn data_row_text(&self) -> Vec<Option<String>> {
        self.data_row()
            .into_iter()
            .map(|c| c.map(|v| String::from_utf8_lossy(&v).into_owned()))
            .collect()
    }

    /// Collects the DataRows of a response as text.
    pub fn rows(msgs: &[Msg]) -> Vec<Vec<Option<String>>> {
        msgs.iter()
            .filter(|m| m.tag == b'D')
            .map(Msg::data_row_text)
            .collect()
    }

    /// The first ErrorResponse of a response, if any.
    pub fn first_error(msgs: &[Msg]) -> Option<&Msg> {
        msgs.iter().find(|m| m.tag == b'E')
    }

    /// The transaction status byte of a ReadyForQuery.
    pub fn ready_status(&self) -> u8 {
        assert_eq!(self.tag, b'Z', "not ReadyForQuery: {self:?}");
        self.body[0]
    }
}

/// Why a login did not finish.
#[derive(Debug)]
pub enum LoginError {
    /// The server (proxy) answered with an ErrorResponse.
    Server(Msg),
    Io(io::Error),
    Protocol(String),
}

impl From<io::Error> for LoginError {
    fn from(e: io::Error) -> Self {
        LoginError::Io(e)
    }
}

impl LoginError {
    pub fn code(&self) -> Option<String> {
        match self {
            LoginError::Server(m) => m.error_code(),
            _ => None,
        }
    }
}

/// A raw frontend connection over any byte stream.
pub struct RawConn<S = TcpStream> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// BackendKeyData (process id, secret) received at login.
    pub backend_key: Option<(i32, i32)>,
    /// ParameterStatus values received so far.
    pub params: HashMap<String, String>,
}

impl RawConn<TcpStream> {
    /// Opens a TCP connection to 127.0.0.1:port (5 s limit). Nothing is sent.
    pub async fn connect(port: u16) -> io::Result<RawConn<TcpStream>> {
        let s = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        s.set_nodelay(true)?;
        Ok(RawConn::new(s))
    }

    /// Connects and logs in; panics on failure.
    pub async fn login(port: u16, user: &str, password: Option<&str>, db: &str) -> RawConn {
        let mut c = RawConn::connect(port)
            .await
            .unwrap_or_else(|e| panic!("connect to {port}: {e}"));
        if let Err(e) = c.startup(user, db, password).await {
            panic!("login as {user} to {db} on port {port} failed: {e:?}");
        }
        c
    }

    /// Sends SSLRequest; on `S`, completes a TLS handshake for server name `localhost`
    /// trusting only the certificate in `ca_pem` (ring provider). Errors if TLS is
    /// refused (`N`) or the handshake fails.
    pub async fn connect_tls(
        port: u16,
        ca_pem: &Path,
    ) -> io::Result<RawConn<tokio_rustls::client::TlsStream<TcpStream>>> {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut req = BytesMut::new();
        frontend::ssl_request(&mut req);
        tcp.write_all(&req).await?;
        let mut answer = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut answer))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer to SSLRequest"))??;
        if answer[0] != b'S' {
            return Err(io::Error::other(format!(
                "SSLRequest answered {:?}, not 'S'",
                answer[0] as char
            )));
        }
        let pem = std::fs::read(ca_pem)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            roots
                .add(cert?)
                .map_err(|e| io::Error::other(format!("bad CA cert: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name =
            rustls::pki_types::ServerName::try_from("localhost").map_err(io::Error::other)?;
        let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(RawConn::new(tls))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawConn<S> {
    pub fn new(stream: S) -> RawConn<S> {
        RawConn {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            wbuf: BytesMut::with_capacity(8192),
            backend_key: None,
            params: HashMap::new(),
        }
    }

    /// The write buffer, for `postgres_protocol::message::frontend` encoders.
    pub fn buf(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Writes out everything buffered.
    pub async fn flush(&mut self) -> io::Result<()> {
        let data = self.wbuf.split();
        self.stream.write_all(&data).await?;
        self.stream.flush().await
    }

    /// Writes raw bytes (after anything buffered).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.wbuf.extend_from_slice(bytes);
        self.flush().await
    }

    /// Reads one message; `Ok(None)` on a clean EOF at a message boundary.
    pub async fn read_msg(&mut self) -> io::Result<Option<Msg>> {
        loop {
            if self.rbuf.len() >= 5 {
                let len = u32::from_be_bytes(self.rbuf[1..5].try_into().unwrap()) as usize;
                if len < 4 {
                    return Err(io::Error::other(format!(
                        "backend message {:?} with length {len}",
                        self.rbuf[0] as char
                    )));
                }
                if self.rbuf.len() > len {
                    let tag = self.rbuf[0];
                    self.rbuf.advance(5);
                    let body = self.rbuf.split_to(len - 4).freeze();
                    return Ok(Some(Msg { tag, body }));
                }
                self.rbuf.reserve(len + 1 - self.rbuf.len());
            }
            let n = self.stream.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                if self.rbuf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF inside a backend message ({} bytes)", self.rbuf.len()),
                ));
            }
        }
    }

    /// [`RawConn::read_msg`] with a time limit (`Err(TimedOut)` when it passes).
    pub async fn read_msg_timeout(&mut self, limit: Duration) -> io::Result<Option<Msg>> {
        tokio::time::timeout(limit, self.read_msg())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no backend message in time"))?
    }

    /// Reads messages up to and including ReadyForQuery (10 s limit per message).
    /// ParameterStatus and notices are kept in the returned list too.
    pub async fn read_until_ready(&mut self) -> io::Result<Vec<Msg>> {
        let mut out = Vec::new();
        loop {
            match self.read_msg_timeout(Duration::from_secs(10)).await? {
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("connection closed before ReadyForQuery; got {out:?}"),
                    ))
                }
                Some(m) => {
                    self.note(&m);
                    let done = m.tag == b'Z';
                    out.push(m);
                    if done {
                        return Ok(out);
                    }
                }
            }
        }
    }

    fn note(&mut self, m: &Msg) {
        if m.tag == b'S' {
            let mut parts = m.body.split(|&c| c == 0);
            if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                self.params.insert(
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                );
            }
        }
    }

    /// Sends a StartupMessage and authenticates (trust, cleartext, md5 or
    /// SCRAM-SHA-256), then reads up to ReadyForQuery.
    pub async fn startup(
        &mut self,
        user: &str,
        db: &str,
        password: Option<&str>,
    ) -> Result<(), LoginError> {
        self.startup_with(&[("user", user), ("database", db)], password)
            .await
    }

    /// Like [`RawConn::startup`] with arbitrary startup parameters.
    pub async fn startup_with(
        &mut self,
        params: &[(&str, &str)],
        password: Option<&str>,
    ) -> Result<(), LoginError> {
        let user = params
            .iter()
            .find(|(k, _)| *k == "user")
            .map(|(_, v)| *v)
            .unwrap_or("");
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)?;
        self.flush().await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = match self.read_msg_timeout(Duration::from_secs(10)).await? {
                Some(m) => m,
                None => return Err(LoginError::Protocol("closed during login".into())),
            };
            match m.tag {
                b'R' => {
                    let mut b = m.body.clone();
                    let code = b.get_i32();
                    let pw = || {
                        password.ok_or_else(|| {
                            LoginError::Protocol(format!("password requested (auth {code})"))
                        })
                    };
                    match code {
                        0 => {}
                        3 => {
                            frontend::password_message(pw()?.as_bytes(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        5 => {
                            let salt: [u8; 4] = b[..4].try_into().unwrap();
                            let hash = md5_hash(user.as_bytes(), pw()?.as_bytes(), salt);
                            frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        10 => {
                            let mechs: Vec<&[u8]> =
                                b.split(|&c| c == 0).filter(|s| !s.is_empty()).collect();
                            if !mechs.iter().any(|m| *m == b"SCRAM-SHA-256") {
                                return Err(LoginError::Protocol(format!(
                                    "no SCRAM-SHA-256 among {mechs:?}"
                                )));
                            }
                            let s =
                                ScramSha256::new(pw()?.as_bytes(), ChannelBinding::unsupported());
                            frontend::sasl_initial_response(
                                "SCRAM-SHA-256",
                                s.message(),
                                &mut self.wbuf,
                            )?;
                            self.flush().await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                LoginError::Protocol("SASLContinue before SASL".into())
                            })?;
                            s.update(&b)?;
                            frontend::sasl_response(s.message(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                LoginError::Protocol("SASLFinal before SASL".into())
                            })?;
                            s.finish(&b)?;
                        }
                        other => {
                            return Err(LoginError::Protocol(format!(
                                "unsupported auth request {other}"
                            )))
                        }
                    }
                }
                b'E' => return Err(LoginError::Server(m)),
                b'K' => {
                    let mut b = m.body.clone();
                    self.backend_key = Some((b.get_i32(), b.get_i32()));
                }
                b'S' => self.note(&m),
                b'N' => {}
                b'Z' => return Ok(()),
                t => {
                    return Err(LoginError::Protocol(format!(
                        "unexpected message {:?} during login",
                        t as char
                    )))
                }
            }
        }
    }

    /// Sends a simple Query and reads up to ReadyForQuery.
    pub async fn simple_query(&mut self, sql: &str) -> io::Result<Vec<Msg>> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        self.read_until_ready().await
    }

    /// Buffers Parse.
    pub fn parse(&mut self, name: &str, sql: &str, param_types: &[u32]) {
        frontend::parse(name, sql, param_types.iter().copied(), &mut self.wbuf)
            .expect("encode Parse");
    }

    /// Buffers Bind with text-format parameters and text results.
    pub fn bind_text(&mut self, portal: &str, statement: &str, params: &[Option<&str>]) {
        let r = frontend::bind(
            portal,
            statement,
            [0i16],
            params.iter().copied(),
            |p, buf| match p {
                Some(v) => {
                    buf.extend_from_slice(v.as_bytes());
                    Ok(IsNull::No)
                }
                None => Ok(IsNull::Yes),
            },
            [0i16],
            &mut self.wbuf,
        );
        if r.is_err() {
            panic!("encode Bind failed");
        }
    }

    /// Buffers Describe of a statement (`S`) or portal (`P`).
    pub fn describe(&mut self, variant: u8, name: &str) {
        frontend::describe(variant, name, &mut self.wbuf).expect("encode Describe");
    }

    /// Buffers Execute.
    pub fn execute(&mut self, portal: &str, max_rows: i32) {
        frontend::execute(portal, max_rows, &mut self.wbuf).expect("encode Execute");
    }

    /// Buffers Close of a statement (`S`) or portal (`P`).
    pub fn close(&mut self, variant: u8, name: &str) {
        frontend::close(variant, name, &mut self.wbuf).expect("encode Close");
    }

    /// Buffers Sync.
    pub fn sync(&mut self) {
        frontend::sync(&mut self.wbuf);
    }

    /// Sends what is buffered (normally ending in Sync) and reads up to ReadyForQuery.
    pub async fn round_trip(&mut self) -> io::Result<Vec<Msg>> {
        self.flush().await?;
        self.read_until_ready().await
    }

    /// Sends Terminate and closes.
    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }

    /// Reads until the peer closes the connection or `limit` passes, and returns the
    /// messages received meanwhile. `Err(TimedOut)` if still open at the deadline;
    /// a reset counts as closed.
    pub async fn read_until_closed(&mut self, limit: Duration) -> io::Result<Vec<Msg>> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.read_msg()).await {
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connection still open after {limit:?}; got {out:?}"),
                    ))
                }
                Ok(Ok(Some(m))) => out.push(m),
                Ok(Ok(None)) => return Ok(out),
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Ok(out)
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }
}
