//! Client authentication against shardgate's own users: SCRAM-SHA-256 (RFC 5802/7677, as
//! Postgres does it, without channel binding), md5 and trust.
//!
//! The verifier is small and written here rather than taken from pgwire: pgwire's handlers
//! want to own the connection through its codec, while the data path owns raw sockets.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use md5::Md5;
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub const SCRAM_ITERATIONS: u32 = 4096;

/// What the proxy keeps to verify a SCRAM login: never the password itself.
#[derive(Clone)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramSecret {
    pub fn from_password(password: &str) -> ScramSecret {
        let mut salt = vec![0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::derive(password, salt, SCRAM_ITERATIONS)
    }

    fn derive(password: &str, salt: Vec<u8>, iterations: u32) -> ScramSecret {
        let mut salted = [0u8; 32];
        // SASLprep is skipped: for ASCII passwords it is the identity, and Postgres itself
        // falls back to the raw bytes when a password is not valid UTF-8 normalisable text.
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, b"Server Key");
        ScramSecret {
            iterations,
            salt,
            stored_key,
            server_key,
        }
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("password authentication failed")]
    Failed,
}

/// Server side of one SCRAM-SHA-256 exchange.
pub struct ScramServer<'a> {
    secret: &'a ScramSecret,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl<'a> ScramServer<'a> {
    /// Takes the client-first-message, returns the server state and server-first-message.
    pub fn start(secret: &'a ScramSecret, client_first: &[u8]) -> Result<Self, AuthError> {
        let text = std::str::from_utf8(client_first).map_err(|_| AuthError::Malformed)?;
        // gs2-header: "n,," (no binding) or "y,," (client supports it, thinks we don't).
        let bare = if let Some(rest) = text.strip_prefix("n,").or_else(|| text.strip_prefix("y,")) {
            let comma = rest.find(',').ok_or(AuthError::Malformed)?;
            &rest[comma + 1..]
        } else if text.starts_with("p=") {
            return Err(AuthError::ChannelBinding);
        } else {
            return Err(AuthError::Malformed);
        };
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(AuthError::Malformed)?;
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&secret.salt),
            secret.iterations
        );
        Ok(ScramServer {
            secret,
            client_first_bare: bare.to_string(),
            server_first,
            nonce,
        })
    }

    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// Verifies the client-final-message; returns the server-final-message.
    pub fn finish(&self, client_final: &[u8]) -> Result<String, AuthError> {
        let text = std::str::from_utf8(client_final).map_err(|_| AuthError::Malformed)?;
        let proof_at = text.rfind(",p=").ok_or(AuthError::Malformed)?;
        let without_proof = &text[..proof_at];
        let proof = B64
            .decode(&text[proof_at + 3..])
            .map_err(|_| AuthError::Malformed)?;
        let mut binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                binding = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        // "biws" is base64("n,,"), "eSws" is base64("y,,").
        match binding {
            Some("biws") | Some("eSws") => {}
            Some(_) => return Err(AuthError::ChannelBinding),
            None => return Err(AuthError::Malformed),
        }
        if nonce != Some(self.nonce.as_str()) || proof.len() != 32 {
            return Err(AuthError::Failed);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored, &self.secret.stored_key) {
            return Err(AuthError::Failed);
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The md5 response Postgres expects: "md5" + md5hex(md5hex(password + user) + salt).
pub fn md5_response(user: &str, password: &str, salt: [u8; 4]) -> String {
    let inner = hex(&Md5::digest(format!("{password}{user}").as_bytes()));
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

pub fn md5_matches(user: &str, password: &str, salt: [u8; 4], response: &[u8]) -> bool {
    constant_time_eq(md5_response(user, password, salt).as_bytes(), response)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs our server against the client implementation tokio-postgres uses.
    fn exchange(server_password: &str, client_password: &str) -> Result<(), AuthError> {
        let secret = ScramSecret::from_password(server_password);
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let server = ScramServer::start(&secret, client.message())?;
        client
            .update(server.server_first().as_bytes())
            .map_err(|_| AuthError::Malformed)?;
        let server_final = server.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| AuthError::Malformed)
    }

    #[test]
    fn scram_accepts_the_right_password_and_the_client_verifies_us() {
        assert_eq!(exchange("s3cret", "s3cret"), Ok(()));
    }

    #[test]
    fn scram_rejects_a_wrong_password() {
        assert_eq!(exchange("s3cret", "guess"), Err(AuthError::Failed));
    }

    #[test]
    fn scram_rejects_garbage() {
        let secret = ScramSecret::from_password("x");
        assert!(ScramServer::start(&secret, b"\xff").is_err());
        assert!(ScramServer::start(&secret, b"n,,n=,r=").is_err());
        assert_eq!(
            ScramServer::start(&secret, b"p=tls-server-end-point,,n=,r=abc").err(),
            Some(AuthError::ChannelBinding)
        );
        let s = ScramServer::start(&secret, b"n,,n=,r=abc").unwrap();
        assert!(s.finish(b"garbage").is_err());
        assert!(s.finish(b"c=biws,r=abc,p=!!!").is_err());
    }

    #[test]
    fn md5_matches_postgres_format() {
        let r = md5_response("app", "app", [1, 2, 3, 4]);
        assert!(r.starts_with("md5") && r.len() == 35);
        assert!(md5_matches("app", "app", [1, 2, 3, 4], r.as_bytes()));
        assert!(!md5_matches("app", "nope", [1, 2, 3, 4], r.as_bytes()));
    }
}
