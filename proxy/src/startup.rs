//! A client's first moments: SSL/GSS negotiation, cancel requests, the StartupMessage,
//! authentication, and the first ParameterStatus/BackendKeyData/ReadyForQuery.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use rand::RngCore;
use shardgate_config::AuthMethod;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::app::App;
use crate::auth::{md5_matches, ScramServer};
use crate::protocol::{self, sqlstate, Reader, StartupParams};
use crate::session::Session;
use crate::settings::{Reported, Settings};
use crate::stream::ClientStream;

/// Why a login ended without a session. Errors the client should see were already sent.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("refused: {0}")]
    Refused(String),
}

/// A finished login: a client session, or an admin on the admin console.
pub enum Accepted {
    Session(Session),
    Admin(ClientStream, String),
    /// A CancelRequest for (pid, secret); its connection stays open until it is done.
    Cancel(ClientStream, i32, i32),
}

/// A client's whole life: login within `client_login_timeout`, then the session loop in a
/// task of its own, so the login's state (and this future's copies of its arguments) is
/// freed: the session task's size is what every idle client costs.
pub async fn serve_client(app: Arc<App>, tcp: TcpStream) {
    match Box::pin(login_outcome(app.clone(), tcp)).await {
        Some(Accepted::Session(session)) => {
            tokio::spawn(session.task());
        }
        // The console runs outside the login timeout, for as long as the admin stays.
        Some(Accepted::Admin(stream, user)) => crate::admin::serve(app, stream, user).await,
        // Outside the login timeout too: cut short, the cancel would stop counting as on
        // its way while Postgres may still act on it (see `crate::cancel`).
        Some(Accepted::Cancel(stream, pid, secret)) => {
            app.process.cancels.cancel(pid, secret).await;
            drop(stream);
        }
        None => {}
    }
}

async fn login_outcome(app: Arc<App>, tcp: TcpStream) -> Option<Accepted> {
    let timeout = app.config.general.client_login_timeout;
    let peer = tcp.peer_addr().ok();
    match tokio::time::timeout(timeout, login(app, tcp)).await {
        Ok(Ok(session)) => Some(session),
        Ok(Err(e)) => {
            tracing::debug!(?peer, "login ended: {e}");
            None
        }
        Err(_) => {
            tracing::info!(?peer, "client did not finish login in {timeout:?}");
            None
        }
    }
}

/// Runs the whole login; on success the client has its ReadyForQuery.
pub async fn login(app: Arc<App>, tcp: TcpStream) -> Result<Accepted, LoginError> {
    let mut stream = ClientStream::Plain(tcp);
    let mut negotiated_tls = false;
    let params = loop {
        let packet = read_startup_packet(&mut stream).await?;
        let mut r = Reader::new(&packet);
        let code = r.i32().unwrap_or(0);
        match code {
            protocol::SSL_REQUEST if !negotiated_tls => {
                negotiated_tls = true;
                match (&app.tls, stream) {
                    (Some(acceptor), ClientStream::Plain(mut tcp)) => {
                        tcp.write_all(b"S").await?;
                        let tls = acceptor.accept(tcp).await?;
                        stream = ClientStream::Tls(Box::new(tls));
                    }
                    (_, mut s) => {
                        s.write_all(b"N").await?;
                        stream = s;
                    }
                }
            }
            protocol::GSSENC_REQUEST if !negotiated_tls => {
                stream.write_all(b"N").await?;
            }
            protocol::CANCEL_REQUEST => {
                let (pid, secret) = (r.i32().unwrap_or(0), r.i32().unwrap_or(0));
                return Ok(Accepted::Cancel(stream, pid, secret));
            }
            code if code >> 16 == 3 => {
                let params = StartupParams::parse(r.rest());
                let Some(params) = params else {
                    return refuse(
                        &mut stream,
                        sqlstate::PROTOCOL_VIOLATION,
                        "invalid startup packet layout",
                    )
                    .await;
                };
                if code & 0xffff != 0 {
                    negotiate_protocol(&mut stream, &params).await?;
                }
                break params;
            }
            code => {
                let msg = format!(
                    "unsupported frontend protocol {}.{}: server supports 3.0",
                    code >> 16,
                    code & 0xffff
                );
                return refuse(&mut stream, sqlstate::PROTOCOL_VIOLATION, &msg).await;
            }
        }
    };
    let Some(user_name) = params.get("user").map(str::to_string) else {
        return refuse(
            &mut stream,
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
    };
    let database = params.get("database").unwrap_or(&user_name).to_string();
    let Some(user) = app.users.get(&user_name) else {
        app.metrics.client_login_failures.increment(1);
        let msg = format!("password authentication failed for user \"{user_name}\"");
        return refuse(&mut stream, sqlstate::INVALID_PASSWORD, &msg).await;
    };
    if !authenticate(&mut stream, user).await? {
        app.metrics.client_login_failures.increment(1);
        let msg = format!("password authentication failed for user \"{user_name}\"");
        return refuse(&mut stream, sqlstate::INVALID_PASSWORD, &msg).await;
    }
    if database == crate::admin::DATABASE {
        if !user.admin {
            let msg = format!("permission denied: user \"{user_name}\" is not a shardgate admin");
            return refuse(&mut stream, sqlstate::INSUFFICIENT_PRIVILEGE, &msg).await;
        }
        return Ok(Accepted::Admin(stream, user_name));
    }
    let Some(pool) = app
        .pools
        .get(&(database.clone(), user_name.clone()))
        .cloned()
    else {
        let msg = format!("database \"{database}\" does not exist");
        return refuse(&mut stream, sqlstate::UNKNOWN_DATABASE, &msg).await;
    };

    let mut out = BytesMut::with_capacity(512);
    protocol::auth_request(&mut out, 0, &[]);

    let startup = Settings::from_startup(&params.0);
    let replica = crate::pool::Want::Replica { min_lsn: 0 };
    let login = match pool.known_login(&startup) {
        Some(k) if k.fresh => Ok((k.settings, k.reported)),
        // Asked a while ago: again if a connection is at hand, else what was reported then.
        Some(k) => match pool.checkout_now(0, replica, &k.settings) {
            Ok(server) => server_login(&pool, k.settings, server).await,
            Err(_) => Ok((k.settings, k.reported)),
        },
        None => {
            let settings = pool.intern_settings(startup);
            match pool.checkout(0, replica, &settings, None).await {
                Ok(server) => server_login(&pool, settings, server).await,
                Err(e) => Err(e.client_error()),
            }
        }
    };
    let (settings, reported) = match login {
        Ok(login) => login,
        Err((code, msg)) => return refuse(&mut stream, &code, &msg).await,
    };
    for (name, value) in reported.params() {
        protocol::parameter_status(&mut out, name.as_bytes(), value.as_bytes());
    }

    let fd = match &stream {
        ClientStream::Plain(s) => std::os::fd::AsRawFd::as_raw_fd(s),
        ClientStream::Tls(s) => std::os::fd::AsRawFd::as_raw_fd(s.get_ref().0),
    };
    let (pid, secret, cancel) = app.process.cancels.register(fd, pool.label.clone());
    protocol::backend_key_data(&mut out, pid, secret);
    protocol::ready_for_query(&mut out, b'I');
    stream.write_all(&out).await?;
    stream.flush().await?;
    app.metrics.client_logins.increment(1);
    Ok(Accepted::Session(Session::new(
        app.clone(),
        stream,
        pool,
        pid,
        cancel,
        settings,
        reported,
    )))
}

/// Applies a client's startup settings on `server` and takes what it reports, so values
/// arrive normalised exactly as Postgres would send them (and settings Postgres refuses
/// refuse the login). Remembered for later logins with the same settings.
async fn server_login(
    pool: &crate::pool::UserPools,
    settings: Arc<Settings>,
    mut server: crate::pool::Checkout,
) -> Result<(Arc<Settings>, Arc<Reported>), (String, String)> {
    for sql in settings.sync_sql(server.conn.settings.as_deref()) {
        match server.conn.run(&sql).await {
            Ok(None) => server.conn.settings = Some(settings.clone()),
            Ok(Some((code, msg))) => {
                server.conn.settings = None;
                server.release();
                return Err((code, msg));
            }
            Err(e) => {
                server.discard();
                let (code, msg) = e.client_error();
                return Err((code.to_string(), msg));
            }
        }
    }
    let reported = pool.intern_reported(server.conn.params.clone());
    server.release();
    pool.remember_login(&settings, &reported);
    Ok((settings, reported))
}

async fn read_startup_packet(stream: &mut ClientStream) -> Result<Vec<u8>, LoginError> {
    let len = stream.read_i32().await?;
    if !(8..=protocol::MAX_STARTUP_PACKET as i32).contains(&len) {
        let msg = format!("invalid length of startup packet: {len}");
        return refuse(stream, sqlstate::PROTOCOL_VIOLATION, &msg).await;
    }
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

/// A client asked for protocol 3.x with x > 0 or for `_pq_` options: tell it we speak 3.0.
async fn negotiate_protocol(
    stream: &mut ClientStream,
    params: &StartupParams,
) -> Result<(), LoginError> {
    let mut out = BytesMut::new();
    protocol::write_msg(&mut out, b'v', |b| {
        let options: Vec<&str> = params
            .0
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.as_str())
            .collect();
        b.put_i32(protocol::PROTOCOL_3_0);
        b.put_i32(options.len() as i32);
        for o in options {
            protocol::put_cstr(b, o.as_bytes());
        }
    });
    stream.write_all(&out).await?;
    Ok(())
}

/// Runs the configured method; false means the credentials were wrong.
async fn authenticate(
    stream: &mut ClientStream,
    user: &crate::app::UserEntry,
) -> Result<bool, LoginError> {
    let mut out = BytesMut::with_capacity(128);
    match user.auth {
        AuthMethod::Trust => Ok(true),
        AuthMethod::Md5 => {
            let mut salt = [0u8; 4];
            rand::thread_rng().fill_bytes(&mut salt);
            protocol::auth_request(&mut out, 5, &salt);
            stream.write_all(&out).await?;
            let msg = read_password_message(stream).await?;
            let response = Reader::new(&msg).cstr().unwrap_or_default();
            let password = user.password.as_deref().unwrap_or_default();
            Ok(md5_matches(&user.name, password, salt, response))
        }
        AuthMethod::ScramSha256 => {
            let Some(secret) = &user.scram else {
                return Ok(false);
            };
            protocol::auth_request(&mut out, 10, b"SCRAM-SHA-256\0\0");
            stream.write_all(&out).await?;
            let msg = read_password_message(stream).await?;
            let mut r = Reader::new(&msg);
            let mechanism = r.cstr().unwrap_or_default();
            let len = r.i32().unwrap_or(-1);
            let data = if len >= 0 {
                r.bytes(len as usize)
            } else {
                None
            };
            let (b"SCRAM-SHA-256", Some(data)) = (mechanism, data) else {
                return refuse(
                    stream,
                    sqlstate::PROTOCOL_VIOLATION,
                    "malformed SASL initial response",
                )
                .await;
            };
            let server = match ScramServer::start(secret, data) {
                Ok(s) => s,
                Err(e) => {
                    return refuse(stream, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await
                }
            };
            out.clear();
            protocol::auth_request(&mut out, 11, server.server_first().as_bytes());
            stream.write_all(&out).await?;
            let msg = read_password_message(stream).await?;
            match server.finish(&msg) {
                Ok(server_final) => {
                    out.clear();
                    protocol::auth_request(&mut out, 12, server_final.as_bytes());
                    stream.write_all(&out).await?;
                    Ok(true)
                }
                Err(crate::auth::AuthError::Failed) => Ok(false),
                Err(e) => refuse(stream, sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await,
            }
        }
    }
}

/// Reads a 'p' message (password, SASL) during authentication; returns its body.
async fn read_password_message(stream: &mut ClientStream) -> Result<Vec<u8>, LoginError> {
    let tag = stream.read_u8().await?;
    let len = stream.read_i32().await?;
    if tag != b'p' || !(4..=protocol::MAX_STARTUP_PACKET as i32).contains(&len) {
        return refuse(
            stream,
            sqlstate::PROTOCOL_VIOLATION,
            "expected a password message",
        )
        .await;
    }
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

/// Sends a FATAL error and ends the login.
async fn refuse<T>(stream: &mut ClientStream, code: &str, message: &str) -> Result<T, LoginError> {
    let _ = stream.write_all(&protocol::fatal(code, message)).await;
    let _ = stream.flush().await;
    Err(LoginError::Refused(format!("{code}: {message}")))
}
