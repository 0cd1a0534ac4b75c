//! Query cancellation. Clients get proxy-issued BackendKeyData; a CancelRequest carrying it
//! is forwarded to the server connection that client is using at that moment, if any.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::protocol::CANCEL_REQUEST;

/// Where a client's running query can be cancelled: the server and its backend key.
#[derive(Clone, Copy, Debug)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

pub struct CancelSlot {
    secret: i32,
    /// "database/user", for SHOW CLIENTS (shared with the pools, not copied).
    label: Arc<str>,
    /// The client's socket, so a draining proxy can end idle sessions (see `poke_idle`).
    fd: std::os::fd::RawFd,
    /// The server connection the client attached to last; it still holds it while
    /// `attached` is set. Kept when the client detaches, so that attaching to the same
    /// connection again takes no lock.
    target: Mutex<Option<CancelTarget>>,
    /// `ServerConn::id` of `target`. Written only by the session, so a plain load and
    /// store serve.
    target_conn: AtomicU64,
    attached: AtomicBool,
    poked: AtomicBool,
}

impl CancelSlot {
    /// The client now holds server connection `conn` (`ServerConn::id`), reached at `target`.
    pub fn attach(&self, conn: u64, target: CancelTarget) {
        if self.target_conn.load(Ordering::Relaxed) != conn {
            *self.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(target);
            self.target_conn.store(conn, Ordering::Relaxed);
        }
        self.attached.store(true, Ordering::Release);
    }

    /// The client holds no server connection any more.
    pub fn detach(&self) {
        self.attached.store(false, Ordering::Release);
    }

    /// Where the client's running query can be cancelled, if it holds a server connection.
    fn current(&self) -> Option<CancelTarget> {
        if !self.attached.load(Ordering::Acquire) {
            return None;
        }
        *self.target.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every logged-in client, by the pid shardgate gave it.
pub struct ClientInfo {
    pub pid: i32,
    pub label: String,
    pub server: Option<SocketAddr>,
    pub backend_pid: Option<i32>,
}

#[derive(Default)]
pub struct CancelRegistry {
    next_pid: AtomicI32,
    slots: Mutex<HashMap<i32, Arc<CancelSlot>>>,
    /// Set on SIGTERM: sessions end at their next idle moment with 57P01.
    draining: std::sync::atomic::AtomicBool,
}

impl CancelRegistry {
    /// A fresh (pid, secret) for a client and its slot.
    pub fn register(&self, fd: std::os::fd::RawFd, label: Arc<str>) -> (i32, i32, Arc<CancelSlot>) {
        let secret = rand::thread_rng().gen();
        let slot = Arc::new(CancelSlot {
            secret,
            label,
            fd,
            target: Mutex::new(None),
            target_conn: AtomicU64::new(0),
            attached: AtomicBool::new(false),
            poked: Default::default(),
        });
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // Positive, non-zero, and not in use by a live client.
            let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
            if pid != 0 && !slots.contains_key(&pid) {
                slots.insert(pid, slot.clone());
                return (pid, secret, slot);
            }
        }
    }

    pub fn unregister(&self, pid: i32) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }

    /// Every client now, for the admin console.
    pub fn snapshot(&self) -> Vec<ClientInfo> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ClientInfo> = slots
            .iter()
            .map(|(pid, slot)| {
                let target = slot.current();
                ClientInfo {
                    pid: *pid,
                    label: slot.label.to_string(),
                    server: target.map(|t| t.addr),
                    backend_pid: target.map(|t| t.pid),
                }
            })
            .collect();
        out.sort_by_key(|c| c.pid);
        out
    }

    pub fn live(&self) -> usize {
        self.slots.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Wakes every session that holds no server connection by shutting down the read side
    /// of its socket: the session sees EOF, and being draining, answers 57P01 and ends.
    /// Sessions in a transaction are left to finish it. Holding the map lock keeps each fd
    /// valid: a session unregisters before its socket closes.
    pub fn poke_idle(&self) {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for slot in slots.values() {
            let idle = !slot.attached.load(Ordering::Acquire);
            if idle && !slot.poked.swap(true, Ordering::Relaxed) {
                // SAFETY: the fd belongs to a live session (see above); SHUT_RD only stops
                // further reads on it.
                unsafe {
                    libc::shutdown(slot.fd, libc::SHUT_RD);
                }
            }
        }
    }

    /// Forwards a cancel if (pid, secret) belongs to a client with a query on a server.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let target = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.get(&pid) {
                Some(slot) if slot.secret == secret => slot.current(),
                _ => None,
            }
        };
        let Some(t) = target else {
            tracing::debug!(pid, "cancel request for no running query");
            return;
        };
        let mut msg = [0u8; 16];
        msg[0..4].copy_from_slice(&16i32.to_be_bytes());
        msg[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
        msg[8..12].copy_from_slice(&t.pid.to_be_bytes());
        msg[12..16].copy_from_slice(&t.secret.to_be_bytes());
        match TcpStream::connect(t.addr).await {
            Ok(mut s) => {
                if let Err(e) = s.write_all(&msg).await {
                    tracing::warn!(server = %t.addr, "forwarding cancel failed: {e}");
                }
            }
            Err(e) => tracing::warn!(server = %t.addr, "forwarding cancel failed: {e}"),
        }
    }
}
