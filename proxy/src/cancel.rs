//! Query cancellation. Clients get proxy-issued BackendKeyData; a CancelRequest carrying it
//! is forwarded to every server connection that client's statement runs on at that moment
//! (one, or each shard of a transaction spanning shards). A client still waiting for a
//! connection has its wait ended with 57014 instead, as Postgres cancels a query waiting
//! for a lock.
//!
//! A cancel is a signal Postgres sends the backend some time after the cancel connection
//! arrives. Had the client's query ended and its connection gone to another client in
//! between, the signal would cancel that client's query. So a connection given up while a
//! cancel of its client is on its way is closed, not pooled (`CancelSlot::in_flight`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::CANCEL_REQUEST;

/// How long a cancel may take to reach a server and be acted on. Past it the cancel is
/// given up (the server is unreachable or stuck); the client's connections are pooled
/// again as usual.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Postgres's message for a cancelled statement (57014), also given to a client whose wait
/// for a server connection a cancel ended.
pub const CANCELED_BY_USER: &str = "canceling statement due to user request";

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
    targets: Mutex<Targets>,
    /// `ServerConn::id` of `Targets::server`. Written only by the session, so a plain load
    /// and store serve.
    target_conn: AtomicU64,
    attached: AtomicBool,
    /// Cancels of this client on their way: counted from before they look at what the
    /// client holds until the server closed the cancel connection, which Postgres does
    /// once it has signalled the backend. While non-zero, a connection the client gives up
    /// is closed rather than pooled (see the module comment).
    in_flight: AtomicU32,
    poked: AtomicBool,
}

#[derive(Default)]
struct Targets {
    /// The server connection the client attached to last; it still holds it while
    /// `attached` is set. Kept when the client detaches, so that attaching to the same
    /// connection again takes no lock.
    server: Option<CancelTarget>,
    /// Only while the client spans shards or waits: most clients never do, and every idle
    /// byte counts.
    busy: Option<Box<Busy>>,
}

#[derive(Default)]
struct Busy {
    /// The connections of a transaction spanning shards, by `ServerConn::id`.
    parts: Vec<(u64, CancelTarget)>,
    wait: Wait,
}

impl Targets {
    fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(Box::default)
    }

    /// Frees `busy` once it holds nothing.
    fn tidy(&mut self) {
        if let Some(b) = &self.busy {
            if b.parts.is_empty() && matches!(b.wait, Wait::None) {
                self.busy = None;
            }
        }
    }
}

/// A client waiting for a server connection (or for a PAUSE to end), which a cancel ends.
#[derive(Default)]
enum Wait {
    #[default]
    None,
    Waiting(Waker),
    Cancelled,
}

impl CancelSlot {
    fn lock(&self) -> MutexGuard<'_, Targets> {
        self.targets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client now holds server connection `conn` (`ServerConn::id`), reached at `target`.
    pub fn attach(&self, conn: u64, target: CancelTarget) {
        if self.target_conn.load(Ordering::Relaxed) != conn {
            self.lock().server = Some(target);
            self.target_conn.store(conn, Ordering::Relaxed);
        }
        self.attached.store(true, Ordering::Release);
    }

    /// The client holds no server connection any more. True when a cancel of the client
    /// may still be on its way: then the connection must be closed, not pooled.
    ///
    /// Paired with `CancelRegistry::cancel`, which counts itself in `in_flight` before it
    /// reads `attached`: with both orders sequentially consistent, either the cancel sees
    /// the client detached (and sends nothing there) or this sees the cancel.
    pub fn detach(&self) -> bool {
        self.attached.store(false, Ordering::SeqCst);
        self.in_flight.load(Ordering::SeqCst) != 0
    }

    /// A connection of a transaction spanning shards now runs the client's statements.
    pub fn add_part(&self, conn: u64, target: CancelTarget) {
        self.lock().busy().parts.push((conn, target));
    }

    /// The client gives up part connection `conn`; true when it must be closed, as for
    /// `detach`. The lock orders this against a cancel reading the parts.
    pub fn remove_part(&self, conn: u64) -> bool {
        {
            let mut t = self.lock();
            if let Some(b) = t.busy.as_mut() {
                b.parts.retain(|(c, _)| *c != conn);
            }
            t.tidy();
        }
        self.in_flight.load(Ordering::SeqCst) != 0
    }

    /// The client's statement spanning shards is over (its transaction ends): cancels no
    /// longer reach its parts. They still count as the client's for `remove_part`.
    pub fn clear_parts(&self) {
        let mut t = self.lock();
        if let Some(b) = t.busy.as_mut() {
            b.parts.clear();
        }
        t.tidy();
    }

    /// Runs `wait` (a wait for a server connection, or for a PAUSE to end) unless a cancel
    /// of the client ends it first: then `None`, and `wait` is dropped. A wait that is over
    /// at its first poll (a connection at hand) costs no lock.
    pub async fn unless_cancelled<F>(&self, wait: F) -> Option<F::Output>
    where
        F: std::future::Future,
    {
        /// Set once the wait registered with the slot; its drop takes it off again.
        struct Waiting<'a>(&'a CancelSlot, bool);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if self.1 {
                    let mut t = self.0.lock();
                    if let Some(b) = t.busy.as_mut() {
                        b.wait = Wait::None;
                    }
                    t.tidy();
                }
            }
        }
        let mut waiting = Waiting(self, false);
        let mut wait = std::pin::pin!(wait);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = wait.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            waiting.1 = true;
            let mut t = self.lock();
            match &mut t.busy().wait {
                Wait::Cancelled => Poll::Ready(None),
                Wait::Waiting(w) if w.will_wake(cx.waker()) => Poll::Pending,
                w => {
                    *w = Wait::Waiting(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// What a cancel arriving now stops: the connections the client's statement runs on,
    /// or its wait for one (woken here).
    fn stop_now(&self) -> Vec<CancelTarget> {
        let mut t = self.lock();
        let mut out = Vec::new();
        if self.attached.load(Ordering::SeqCst) {
            out.extend(t.server);
        }
        if let Some(b) = t.busy.as_mut() {
            out.extend(b.parts.iter().map(|(_, p)| *p));
            if matches!(b.wait, Wait::Waiting(_)) {
                if let Wait::Waiting(w) = std::mem::replace(&mut b.wait, Wait::Cancelled) {
                    w.wake();
                }
            }
        }
        out
    }

    /// Where the client's running query can be cancelled, if it holds a server connection.
    fn current(&self) -> Option<CancelTarget> {
        if !self.attached.load(Ordering::Acquire) {
            return None;
        }
        self.lock().server
    }
}

/// A cancel on its way, counted in `CancelSlot::in_flight` until dropped.
struct InFlight(Arc<CancelSlot>);

impl InFlight {
    fn enter(slot: Arc<CancelSlot>) -> InFlight {
        slot.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(slot)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
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
            targets: Mutex::new(Targets::default()),
            target_conn: AtomicU64::new(0),
            attached: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
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

    /// Cancels what the client with (pid, secret) is running or waiting for, if anything.
    /// Returns once every server it went to has acted on it (or `CANCEL_TIMEOUT` passed).
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let slot = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.get(&pid) {
                Some(slot) if slot.secret == secret => slot.clone(),
                _ => {
                    tracing::debug!(pid, "cancel request with an unknown key");
                    return;
                }
            }
        };
        let _in_flight = InFlight::enter(slot.clone());
        let targets = slot.stop_now();
        if targets.is_empty() {
            tracing::debug!(pid, "cancel request for no running query");
            return;
        }
        futures_util::future::join_all(targets.iter().map(forward)).await;
    }
}

/// Sends a CancelRequest for `t` and waits until the server closes the connection: Postgres
/// closes it after it has signalled the backend (or found no such backend).
async fn forward(t: &CancelTarget) {
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16i32.to_be_bytes());
    msg[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
    msg[8..12].copy_from_slice(&t.pid.to_be_bytes());
    msg[12..16].copy_from_slice(&t.secret.to_be_bytes());
    let sent = tokio::time::timeout(CANCEL_TIMEOUT, async {
        let mut s = TcpStream::connect(t.addr).await?;
        s.write_all(&msg).await?;
        let mut rest = [0u8; 64];
        while s.read(&mut rest).await? != 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(server = %t.addr, "forwarding cancel failed: {e}"),
        Err(_) => {
            tracing::warn!(server = %t.addr, "forwarding cancel: no answer in {CANCEL_TIMEOUT:?}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every client holds a slot for its whole life: it must stay small (the ≤ 1 KiB idle
    /// client budget). Spanning shards or waiting allocates apart.
    #[test]
    fn a_slot_stays_small() {
        let size = std::mem::size_of::<CancelSlot>();
        assert!(size <= 96, "CancelSlot is {size} bytes");
    }

    /// A cancel of a waiting client ends the wait; a second cancel leaves it ended; the
    /// slot frees its wait state afterwards.
    #[tokio::test]
    async fn a_cancel_ends_a_wait() {
        let registry = CancelRegistry::default();
        let (pid, secret, slot) = registry.register(-1, Arc::from("db/user"));
        let waiting = {
            let slot = slot.clone();
            tokio::spawn(async move { slot.unless_cancelled(std::future::pending::<()>()).await })
        };
        // The wait registers on its first poll.
        while !matches!(
            slot.lock().busy.as_deref().map(|b| &b.wait),
            Some(Wait::Waiting(_))
        ) {
            tokio::task::yield_now().await;
        }
        registry.cancel(pid, secret).await;
        registry.cancel(pid, secret).await;
        assert_eq!(waiting.await.ok(), Some(None));
        assert!(slot.lock().busy.is_none());
        // A wrong secret cancels nothing.
        let done = slot.unless_cancelled(async { 7 });
        registry.cancel(pid, secret ^ 1).await;
        assert_eq!(done.await, Some(7));
    }
}
