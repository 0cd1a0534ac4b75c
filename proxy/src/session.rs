//! A logged-in client: the protocol loop.
//!
//! Read top-down: `SessionTask` waits for the client without holding buffers; `serve` handles a
//! burst of activity: client messages are forwarded (rewritten where prepared statements
//! need it) to the server connection the client holds for the current transaction, and
//! server messages come back through `Expect`, a queue of what the server owes for each
//! message sent. The queue is what lets shardgate add messages of its own (re-preparing a
//! statement on a new connection, syncing settings) and answer some itself (a Parse of a
//! statement the connection already has), while the client sees exactly the replies it
//! asked for, in order.

use std::hash::{BuildHasher, RandomState};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use shardgate_router::{
    classify, ClientEncoding, Kind, Pins, Plan, Role, SessionEffects, TextReading, Unreadable,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::app::App;
use crate::cancel::CancelSlot;
use crate::pool::{Checkout, UserPools, Want};
use crate::protocol::{self, body, frame_len, sqlstate, Reader};
use crate::routing::Routing;
use crate::server::MAX_SERVER_MESSAGE;
use crate::settings::{Reported, Settings};
use crate::stream::ClientStream;

mod multi;

/// A statement prepared by the client, known by a proxy-global name on servers.
struct Stmt {
    /// The Parse body after the statement name: query text, parameter count and types.
    tail: Bytes,
    /// `statement_hash` of `tail` under `parse_key`.
    hash: u64,
    /// The parse-time settings it was prepared under (`Settings::parse_key`).
    parse_key: u64,
    /// `sg` + 16 hex digits of `hash`: the same text and types, prepared under the same
    /// parse-time settings, share one name everywhere.
    name: [u8; 18],
    effects: Option<Arc<SessionEffects>>,
    /// Must run on the primary (a write, or a read that locks).
    primary: bool,
    /// Where it runs, in a sharded database.
    plan: Option<Arc<Plan>>,
    /// Where in `tail` the parameter types are (found once, read at every Bind); `None`
    /// for a Parse without a terminated query text.
    types: Option<Range<u32>>,
    /// Sharded databases: the text holds more than one statement, which Postgres refuses
    /// to prepare (42601); shardgate must not run it as its last statement alone.
    several: bool,
    /// How the client's session read text when it sent this (part of `parse_key`).
    reading: TextReading,
    /// The text as planned when it is not the Parse's bytes as they are (another
    /// client_encoding, `standard_conforming_strings = off`).
    planned: Option<Box<str>>,
}

/// The key of a statement's server-side name. A prepared statement keeps what the settings
/// Postgres reads at parse time made of its text (the tables `search_path` found, a
/// `'2024-01-01'::timestamptz` folded to a constant in the time zone of the moment), so
/// clients whose parse-time settings differ must not share one: their `parse_key`s differ,
/// and so do the names. Clients that never set one (key 0) share as before. The key is
/// hashed with the text by the process's secret hasher (not combined after), so no client
/// can pick settings that give its statement another client's name.
fn statement_hash(hasher: &RandomState, tail: &[u8], parse_key: u64) -> u64 {
    if parse_key == 0 {
        hasher.hash_one(tail)
    } else {
        hasher.hash_one((parse_key, tail))
    }
}

impl Stmt {
    fn new(
        tail: Bytes,
        hasher: &RandomState,
        parse_key: u64,
        routing: Option<&Routing>,
        reading: TextReading,
    ) -> Stmt {
        let hash = statement_hash(hasher, &tail, parse_key);
        let raw = Reader::new(&tail).cstr().unwrap_or_default();
        let decoded = match routing {
            Some(r) => r.statement_text(raw, reading),
            None => reading.statement_text(raw),
        };
        let text = decoded.as_deref().ok();
        let effects = text.and_then(|t| effects_of(t, reading));
        let plan = match (routing, text, &decoded) {
            (Some(_), _, Err(Unreadable::Refused(r))) => Some(Arc::new(Plan::refused(
                Kind::Write,
                Role::Primary,
                r.clone(),
            ))),
            (Some(r), Some(t), _) => Some(r.plan(t)),
            _ => None,
        };
        let primary = match &plan {
            Some(p) => p.role == Role::Primary,
            None => text.is_none_or(crate::roles::needs_primary),
        } || effects.as_ref().is_some_and(|fx| !fx.pin.is_empty());
        let types = crate::routing::param_types_at(&tail).map(|r| r.start as u32..r.end as u32);
        let several =
            plan.is_some() && text.is_some_and(shardgate_router::scan::several_statements);
        let planned = match decoded {
            Ok(std::borrow::Cow::Owned(t)) => Some(t.into_boxed_str()),
            _ => None,
        };
        Stmt {
            tail,
            hash,
            parse_key,
            name: global_name(hash),
            effects,
            primary,
            plan,
            types,
            several,
            reading,
            planned,
        }
    }

    /// The parameter type OIDs, 4 bytes each (`None`: a malformed Parse).
    fn param_types(&self) -> Option<&[u8]> {
        let Range { start, end } = self.types.as_ref()?;
        self.tail.get(*start as usize..*end as usize)
    }

    /// The same as numbers, for writing a Parse of another text with the same parameters.
    fn param_type_oids(&self) -> Vec<u32> {
        let types = self.param_types().unwrap_or_default();
        types
            .chunks_exact(4)
            .map(|t| u32::from_be_bytes([t[0], t[1], t[2], t[3]]))
            .collect()
    }

    /// A Bind's values (`rest`: the Bind body after portal and statement names) with this
    /// statement's parameter types, text read as `reading` says (the session's when the
    /// Bind comes: Postgres converts its values then); `None` for a malformed Bind or Parse.
    fn bind_values<'a>(
        &'a self,
        rest: &'a [u8],
        reading: TextReading,
    ) -> Option<crate::routing::BindValues<'a>> {
        crate::routing::BindValues::parse(rest, self.param_types()?, reading)
    }

    /// The text as planned (empty when unreadable); send text built from it with
    /// `self.reading.wire_bytes`.
    fn text(&self) -> &str {
        if let Some(t) = &self.planned {
            return t;
        }
        let t = Reader::new(&self.tail).cstr().unwrap_or_default();
        std::str::from_utf8(t).unwrap_or_default()
    }
}

/// What a statement does to session state, `None` when nothing. A setting whose value has
/// characters of another encoding than UTF-8 would be replayed as their UTF-8 bytes (the
/// planned text's): such a client keeps its connection instead.
fn effects_of(text: &str, reading: TextReading) -> Option<Arc<SessionEffects>> {
    let mut fx = classify(text);
    if fx.is_empty() {
        return None;
    }
    if reading.encoding != ClientEncoding::Utf8 && !text.is_ascii() {
        let before = fx.settings.len();
        fx.settings.retain(|change| match change {
            shardgate_router::SettingChange::Set { value, .. } => value.is_ascii(),
            _ => true,
        });
        if fx.settings.len() != before {
            fx.take(Pins::UNTRACKED);
        }
    }
    Some(Arc::new(fx))
}

fn global_name(hash: u64) -> [u8; 18] {
    let mut name = *b"sg0000000000000000";
    let hex = b"0123456789abcdef";
    for i in 0..16 {
        name[2 + i] = hex[((hash >> (60 - 4 * i)) & 0xf) as usize];
    }
    name
}

/// A client's prepared statements and bound portals.
#[derive(Default)]
struct Prepared {
    named: std::collections::HashMap<Bytes, Arc<Stmt>>,
    unnamed: Option<Arc<Stmt>>,
    /// The unnamed statement lives on servers under its global name (`prepare_unnamed`),
    /// so its Binds and Describes name that statement rather than the server's unnamed one.
    unnamed_global: bool,
    /// Session effects of bound portals (only those that have any).
    portal_effects: Vec<(Bytes, Arc<SessionEffects>)>,
    /// Recently parsed unnamed statements: drivers re-send the same few texts as the
    /// unnamed statement (pgbench -M extended: every statement of every transaction), and
    /// a hit here skips copying and classifying the text again.
    recent: Vec<Arc<Stmt>>,
}

/// How many recent unnamed statements a client keeps.
const RECENT_UNNAMED: usize = 16;

impl Prepared {
    /// A recent unnamed statement with this text and types. Compared byte for byte, not by
    /// hash: the texts differ in length or early bytes, and a memcmp costs less than
    /// hashing the text.
    fn recent_unnamed(&self, tail: &[u8], reading: TextReading) -> Option<&Arc<Stmt>> {
        self.recent
            .iter()
            .find(|s| *s.tail == *tail && s.reading == reading)
    }

    /// The statement for an unnamed Parse: a recent one with the same text and types,
    /// parsed under the same settings, or a new one (hashed, remembered, evicting the
    /// oldest); true for a recent one.
    fn unnamed_stmt(
        &mut self,
        tail: &[u8],
        hasher: &RandomState,
        parse_key: u64,
        routing: Option<&Routing>,
        reading: TextReading,
    ) -> (Arc<Stmt>, bool) {
        let same =
            |s: &&Arc<Stmt>| s.parse_key == parse_key && *s.tail == *tail && s.reading == reading;
        if let Some(s) = self.recent.iter().find(same) {
            return (s.clone(), true);
        }
        let stmt = Arc::new(Stmt::new(
            Bytes::copy_from_slice(tail),
            hasher,
            parse_key,
            routing,
            reading,
        ));
        if self.recent.len() >= RECENT_UNNAMED {
            self.recent.remove(0);
        }
        self.recent.push(stmt.clone());
        (stmt, false)
    }

    /// Forgets a statement the client closes (`Close 'S'`); portals are the server's.
    fn close(&mut self, msg: &[u8]) {
        let mut r = Reader::new(body(msg));
        if r.u8() != Some(b'S') {
            return;
        }
        match r.cstr() {
            Some(b"") => self.unnamed = None,
            Some(name) => {
                self.named.remove(name);
            }
            None => {}
        }
    }
}

/// What the server owes for one message sent to it, or a reply shardgate makes itself.
enum Expect {
    /// `hidden`: sent by shardgate; the reply is swallowed. `prepared`: the statement hash
    /// registered on the connection when sent, forgotten if the Parse fails or is skipped;
    /// `client_name` likewise leaves the client's registry.
    Parse {
        hidden: bool,
        prepared: Option<u64>,
        client_name: Option<Bytes>,
    },
    /// `global`: the statement's hash when the message names it by its global name.
    Bind {
        global: Option<u64>,
    },
    Describe {
        global: Option<u64>,
    },
    Execute {
        effects: Option<Arc<SessionEffects>>,
    },
    Close {
        hidden: bool,
    },
    Sync,
    /// A simple Query or FunctionCall: everything up to ReadyForQuery.
    Query {
        hidden: bool,
        effects: Option<Arc<SessionEffects>>,
    },
    /// A reply shardgate produces; sent when it reaches the head of the queue.
    Reply(Bytes),
    /// ParseComplete or CloseComplete for a client's named statement, answered here (the
    /// statement lives under another name on the server), which changed the client's
    /// registry already. Sent like `Reply`; if the server skips to Sync before it (an
    /// earlier message failed), Postgres would not have run the message, so the registry
    /// gets back what `name` was before: `before`.
    Registered {
        reply: &'static [u8],
        name: Bytes,
        before: Option<Arc<Stmt>>,
    },
    /// A Parse made to fail on the server (see `refuse_on_server`): the client gets this
    /// error in place of the server's.
    Refused(Bytes),
    /// A message shardgate could not read; the server answers it with an error.
    Malformed,
    /// `SELECT pg_current_wal_lsn()` after a write committed, for read-your-writes.
    WriteLsn,
}

impl Expect {
    /// A simple query shardgate sends itself; its answer is swallowed.
    const HIDDEN_QUERY: Expect = Expect::Query {
        hidden: true,
        effects: None,
    };

    /// Whether it is answered by shardgate (sent as soon as it reaches the head).
    fn is_reply(&self) -> bool {
        matches!(self, Expect::Reply(_) | Expect::Registered { .. })
    }

    /// A statement that may change a parse-time setting (`SessionEffects::changes_parsing`).
    fn changes_parsing(&self) -> bool {
        match self {
            Expect::Execute { effects: Some(fx) }
            | Expect::Query {
                effects: Some(fx), ..
            } => fx.changes_parsing(),
            _ => false,
        }
    }

    fn hidden(&self) -> bool {
        matches!(
            self,
            Expect::Parse { hidden: true, .. }
                | Expect::Close { hidden: true }
                | Expect::Query { hidden: true, .. }
                | Expect::WriteLsn
        )
    }
}

/// What the attached server owes, oldest first: a `Vec` read from a moving head and
/// emptied whenever it drains, which every transaction does. Cheaper than `VecDeque`'s
/// ring arithmetic, which showed up on every server message.
#[derive(Default)]
struct Expects {
    items: Vec<Expect>,
    head: usize,
    /// How many were ever pushed: the sequence number of the next one.
    pushed: u64,
}

impl Expects {
    fn push_back(&mut self, e: Expect) {
        self.items.push(e);
        self.pushed += 1;
    }

    /// The sequence number the next pushed expectation gets: those pushed before have
    /// smaller ones, whatever was answered or removed meanwhile.
    fn next_seq(&self) -> u64 {
        self.pushed
    }

    /// Forgets the Syncs queued behind the head before sequence number `before` (all of
    /// them if `None`): the server ignores a Sync that reaches it in copy-in mode.
    fn drop_syncs_behind_head(&mut self, before: Option<u64>) -> bool {
        let mut dropped = false;
        let mut i = self.head + 1;
        while i < self.items.len() {
            let seq = self.pushed - (self.items.len() - i) as u64;
            if before.is_some_and(|b| seq >= b) {
                break;
            }
            if matches!(self.items[i], Expect::Sync) {
                self.items.remove(i);
                dropped = true;
            } else {
                i += 1;
            }
        }
        dropped
    }

    fn front(&self) -> Option<&Expect> {
        self.items.get(self.head)
    }

    /// Puts `e` at the head; sequence numbers of the rest stay as they were.
    fn push_front(&mut self, e: Expect) {
        if self.head > 0 {
            self.head -= 1;
            self.items[self.head] = e;
        } else {
            self.items.insert(0, e);
        }
    }

    fn pop_front(&mut self) -> Option<Expect> {
        let slot = self.items.get_mut(self.head)?;
        // `Sync` holds nothing: a free placeholder.
        let e = std::mem::replace(slot, Expect::Sync);
        self.advance();
        Some(e)
    }

    /// Drops the head when what it holds is not needed: it stays in place until the queue
    /// is emptied, which saves moving it out and dropping it one at a time.
    fn skip_front(&mut self) {
        if self.head < self.items.len() {
            self.advance();
        }
    }

    fn advance(&mut self) {
        self.head += 1;
        if self.head == self.items.len() {
            self.clear();
        } else if self.head >= 64 && self.head * 2 >= self.items.len() {
            // A pipelining client may never let the queue drain: drop the answered part
            // now and then, so it does not grow without bound.
            self.items.drain(..self.head);
            self.head = 0;
        }
    }

    fn is_empty(&self) -> bool {
        self.head == self.items.len()
    }

    fn len(&self) -> usize {
        self.items.len() - self.head
    }

    fn iter(&self) -> std::slice::Iter<'_, Expect> {
        self.items[self.head..].iter()
    }

    fn clear(&mut self) {
        self.items.clear();
        self.head = 0;
    }
}

/// The server connection a client holds, and the exchange in progress on it.
struct Attached {
    server: Checkout,
    shard: u32,
    /// Extended-protocol messages sent since the last Sync: the server is mid-exchange.
    unsynced: bool,
    /// Transaction status from the last ReadyForQuery.
    status: u8,
    /// An error or a rollback happened in the current transaction: its settings changes
    /// did not stick.
    tx_failed: bool,
    /// An error happened inside the simple Query at the head of the queue.
    query_failed: bool,
    /// Session effects of statements completed in the current transaction.
    tx_effects: Vec<Arc<SessionEffects>>,
    /// What statements of the current transaction released (UNLISTEN, DISCARD TEMP …):
    /// released for the pool only when it commits, as a rollback undoes most of them.
    tx_unpins: Pins,
    /// Attached for writes: when the transaction ends, learn the WAL position it reached.
    wrote: bool,
    /// Data was written in this transaction (for two-phase commit if it spreads).
    data_write: bool,
    /// Checked out from the primary.
    primary: bool,
    /// The server answered something shardgate did not expect: close it, never reuse it.
    poisoned: bool,
    /// When the oldest unanswered query or Sync was forwarded, for the latency histogram.
    sent_at: Option<std::time::Instant>,
    /// This task's waker is registered for the server's readability (see
    /// `stream::poll_read_ready_again`). Whatever else reads the server clears it.
    server_waiting: bool,
    /// Unnamed Parses sent and not yet answered (ParseComplete, or skipped by an error).
    unnamed_in_flight: u32,
    /// A statement sent in this transaction may change a parse-time setting (`SET LOCAL
    /// search_path`, a `SET` not yet committed, a DO block): until the transaction ends
    /// and no such statement is queued, the client's `settings` do not say what a Parse
    /// will see, so its statements get names of their own (`Session::parse_key`).
    parse_unsure: bool,
    /// The parse key while `server.conn.settings` is unknown (0: none drawn yet).
    unknown_key: u64,
    /// A Sync went out after an unnamed Parse still in flight: if the server skips that
    /// Parse (an earlier message failed), its unnamed statement is still whatever it was,
    /// maybe another client's, so `conn.unnamed` is not to be trusted until it is answered.
    unnamed_unsure: bool,
    /// The server is in copy-in mode (it sent CopyInResponse) and the client has not
    /// ended the copy yet: a Sync sent now is ignored by the server, so none is expected.
    copy_in: bool,
    /// A CopyDone or CopyFail went out before the server's CopyInResponse came back: the
    /// sequence number of the expectations queued after it (see `Expects::next_seq`).
    copy_end_seq: Option<u64>,
    /// Syncs were taken as ignored by a server copying in. True only if the copy ends
    /// with CopyDone: after an error the server may have left copy mode before some of
    /// them and answered them. So an error meanwhile poisons the connection (closed, not
    /// reused), lest a late ReadyForQuery reach the next client.
    copy_syncs_dropped: bool,
}

/// Allocations of `Attached` values given up on this thread, for reuse: a client attaches
/// and detaches once per transaction, and a reused box saves a malloc and a free each
/// time. Bounded: as many as this thread's clients hold at once, up to `SPARES_KEPT`.
const SPARES_KEPT: usize = 64;

/// Boxes in a Vec on purpose: the allocations themselves are what is kept for reuse.
#[allow(clippy::vec_box)]
type SpareAttached = Vec<Box<std::mem::MaybeUninit<Attached>>>;

thread_local! {
    static SPARE_ATTACHED: std::cell::RefCell<SpareAttached> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Attached {
    fn boxed(self) -> Box<Attached> {
        let spare = SPARE_ATTACHED.with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.pop()));
        match spare {
            Some(spare) => Box::write(spare, self),
            None => Box::new(self),
        }
    }

    /// Moves the value out and keeps the allocation for a later `boxed`.
    fn unboxed(b: Box<Attached>) -> Attached {
        let raw = Box::into_raw(b);
        // SAFETY: `raw` comes from a live Box, so it is valid and aligned for `Attached`;
        // the value is read out exactly once, and from then on the allocation is treated
        // as uninitialised memory, which `MaybeUninit` never drops.
        let (value, spare) = unsafe {
            (
                raw.read(),
                Box::from_raw(raw.cast::<std::mem::MaybeUninit<Attached>>()),
            )
        };
        SPARE_ATTACHED.with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                if s.len() < SPARES_KEPT {
                    s.push(spare);
                }
            }
        });
        value
    }
}

/// Extended-protocol messages held until Sync or Flush decides where they go: whole frames
/// back to back in one buffer. Copying a message in costs less than splitting it off the
/// read buffer as `Bytes` (two atomic reference-count updates per message, five messages
/// per pgbench transaction), and the buffer keeps its allocation from batch to batch.
#[derive(Default)]
pub(super) struct Held {
    frames: BytesMut,
    last_tag: u8,
}

impl Held {
    /// `msg` is one whole frame (checked by `frame_len`).
    fn push(&mut self, msg: &[u8]) {
        self.frames.extend_from_slice(msg);
        self.last_tag = msg.first().copied().unwrap_or(0);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn clear(&mut self) {
        self.frames.clear();
        self.last_tag = 0;
    }

    pub(super) fn ends_with_sync(&self) -> bool {
        self.last_tag == b'S'
    }

    pub(super) fn iter(&self) -> Frames<'_> {
        Frames(&self.frames)
    }

    /// Empties `io.held` for a pass over its messages; `give_back` returns the allocation.
    pub(super) fn take(io: &mut Buffers) -> Held {
        std::mem::take(&mut io.held)
    }

    pub(super) fn give_back(mut self, io: &mut Buffers) {
        if io.held.is_empty() {
            self.clear();
            io.held = self;
        }
    }
}

/// The frames of a `Held`, in order.
pub(super) struct Frames<'a>(&'a [u8]);

impl<'a> Iterator for Frames<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let len = self.0.get(1..5)?;
        let len = 1 + u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let frame = self.0.get(..len)?;
        self.0 = &self.0[len..];
        Some(frame)
    }
}

/// Buffers lent to a session only while it has work, so idle clients cost no buffer memory.
pub struct Buffers {
    /// Bytes read from the client, not yet handled.
    cin: BytesMut,
    /// Bytes for the client, written at the end of each burst.
    cout: BytesMut,
    /// Bytes for the server.
    sout: BytesMut,
    /// Extended-protocol messages held until Sync/Flush decides where they go.
    held: Held,
    /// What the attached server owes. Empty whenever the session goes idle, so it lives
    /// here rather than in the session.
    expects: Expects,
}

impl Buffers {
    /// Boxed, so that lending them out and taking them back moves a pointer, not ~170
    /// bytes, twice per burst.
    fn take() -> Box<Buffers> {
        BUFFERS.with(|b| b.borrow_mut().pop()).unwrap_or_else(|| {
            Box::new(Buffers {
                cin: BytesMut::with_capacity(8192),
                cout: BytesMut::with_capacity(8192),
                sout: BytesMut::with_capacity(8192),
                held: Held::default(),
                expects: Expects::default(),
            })
        })
    }

    fn give(mut self: Box<Self>) {
        // Keep only ordinary-sized buffers; a big COPY's buffer goes back to the allocator.
        if self.cin.capacity() > 65536
            || self.cout.capacity() > 65536
            || self.sout.capacity() > 65536
            || self.held.frames.capacity() > 65536
        {
            return;
        }
        self.cin.clear();
        self.cout.clear();
        self.sout.clear();
        self.held.clear();
        self.expects.clear();
        BUFFERS.with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < 64 {
                b.push(self);
            }
        });
    }
}

thread_local! {
    #[allow(clippy::vec_box)] // boxed on purpose, see `Buffers::take`
    static BUFFERS: std::cell::RefCell<Vec<Box<Buffers>>> = const { std::cell::RefCell::new(Vec::new()) };
}

enum Flow {
    /// Nothing in flight that needs buffers; wait for the client (and server) again.
    Idle,
    /// The session is over.
    Exit,
}

pub struct Session {
    app: Arc<App>,
    client: ClientStream,
    pools: Arc<UserPools>,
    pid: i32,
    cancel: Arc<CancelSlot>,
    settings: Arc<Settings>,
    /// ParameterStatus values the client has seen.
    reported: Arc<Reported>,
    /// Allocated on the first Parse: most idle clients never need it.
    prepared: Option<Box<Prepared>>,
    pins: Pins,
    /// After an error shardgate raised mid-batch, drop messages until Sync, as a server does.
    skip_until_sync: bool,
    /// Idle with its wakers registered: the next poll of its task is a wake-up.
    armed: bool,
    /// This task's waker is registered for the client's readability (plain TCP only; see
    /// `stream::poll_read_ready_again`). Whatever else reads the client clears it.
    client_waiting: bool,
    /// Boxed: an idle client holds no connection, and every idle byte counts.
    attached: Option<Box<Attached>>,
    /// Read-your-writes: per shard, the WAL position of this client's last committed
    /// write there (boxed: allocated at the client's first write).
    writes: Option<Box<WriteLsns>>,
    /// Sharded databases: a transaction block not yet sent anywhere, or one spanning
    /// several shards.
    shard_tx: Option<Box<multi::ShardTx>>,
    /// Sharded databases: this transaction's place relative to slot-move cut-overs
    /// (crate::moves), from its first routed statement to its end.
    ticket: crate::moves::Ticket,
}

/// The task a client session runs in, written out rather than as an `async fn` because
/// its size is what every idle client costs. While idle it is the bare `Session`; a burst
/// of activity moves the session into a boxed future and gets it back when the burst ends.
///
/// Size matters in steps: tokio allocates a task as one 128-byte-aligned cell of about
/// 104 bytes of its own plus this future, so a future of at most 152 bytes makes a 256-byte
/// cell and anything bigger a 384-byte one. An `async fn` holding the session came to 176.
pub struct SessionTask(Phase);

enum Phase {
    /// Waiting for the client (or the attached server) to be readable.
    Idle(Session),
    Busy(std::pin::Pin<Box<dyn std::future::Future<Output = (Session, Flow)> + Send>>),
    Ending(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
    Done,
}

impl std::future::Future for SessionTask {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let phase = &mut self.0;
        loop {
            // The common wake-ups (readable while idle, a busy burst not done) are handled
            // in place; only a change of phase moves the session.
            match phase {
                // Woken while armed: what it waited on is ready (or the drain's shutdown
                // made it so); the burst reads whatever there is, or finds nothing and goes
                // idle. Asking the readiness first would only say so once more.
                Phase::Idle(s) if s.armed => {
                    s.armed = false;
                    if let Phase::Idle(s) = std::mem::replace(phase, Phase::Done) {
                        *phase = Phase::Busy(Box::pin(s.into_burst()));
                    }
                }
                Phase::Idle(s) => match s.poll_readable(cx) {
                    Poll::Pending => {
                        s.armed = true;
                        return Poll::Pending;
                    }
                    Poll::Ready(readable) => {
                        if let Phase::Idle(s) = std::mem::replace(phase, Phase::Done) {
                            *phase = match readable {
                                Ok(()) => Phase::Busy(Box::pin(s.into_burst())),
                                Err(_) => Phase::Ending(Box::pin(s.into_end(false))),
                            };
                        }
                    }
                },
                Phase::Busy(burst) => match burst.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready((s, flow)) => {
                        *phase = if s.app.process.cancels.draining() && s.attached.is_none() {
                            // Shutting down and between transactions: end the session cleanly.
                            Phase::Ending(Box::pin(s.into_end(true)))
                        } else {
                            match flow {
                                Flow::Idle => Phase::Idle(s),
                                Flow::Exit => Phase::Ending(Box::pin(s.into_end(false))),
                            }
                        };
                    }
                },
                Phase::Ending(end) => match end.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => *phase = Phase::Done,
                },
                Phase::Done => return Poll::Ready(()),
            }
        }
    }
}

impl Session {
    pub fn new(
        app: Arc<App>,
        client: ClientStream,
        pools: Arc<UserPools>,
        pid: i32,
        cancel: Arc<CancelSlot>,
        settings: Arc<Settings>,
        reported: Arc<Reported>,
    ) -> Session {
        app.metrics.clients.increment(1.0);
        Session {
            app,
            client,
            pools,
            pid,
            cancel,
            settings,
            reported,
            prepared: None,
            pins: Pins::NONE,
            skip_until_sync: false,
            armed: false,
            client_waiting: false,
            attached: None,
            writes: None,
            shard_tx: None,
            ticket: 0,
        }
    }

    /// The task this session runs in, for `tokio::spawn`.
    pub fn task(self) -> SessionTask {
        SessionTask(Phase::Idle(self))
    }

    /// Ready when the client has something to say or, idle in a transaction or pinned, the
    /// server does (NOTIFY, FATAL).
    fn poll_readable(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        use crate::stream::poll_read_ready_again;
        if let Some(a) = self.attached.as_deref_mut() {
            let server = poll_read_ready_again(&a.server.conn.stream, &mut a.server_waiting, cx);
            if server.is_ready() {
                return server;
            }
        }
        self.client.poll_read_ready(&mut self.client_waiting, cx)
    }

    /// One burst, in a future that owns the session and hands it back.
    fn into_burst(self) -> impl std::future::Future<Output = (Session, Flow)> + Send {
        let mut s = self;
        async move {
            let flow = s.burst().await;
            (s, flow)
        }
    }

    /// The session's end: the 57P01 goodbye of a draining proxy, then `finish`.
    fn into_end(self, goodbye: bool) -> impl std::future::Future<Output = ()> + Send {
        let mut s = self;
        async move {
            if goodbye {
                s.goodbye().await;
            }
            s.finish().await;
        }
    }

    async fn goodbye(&mut self) {
        let bye = protocol::fatal(
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection due to administrator command",
        );
        let _ = self.client.write_all(&bye).await;
        let _ = self.client.flush().await;
    }

    async fn burst(&mut self) -> Flow {
        let mut io = Buffers::take();
        let flow = self.serve(&mut io).await;
        if self.ticket != 0 && self.between_transactions(&io) {
            self.leave_ticket();
        }
        if !io.expects.is_empty() {
            // Left mid-exchange (the client went away): the connection is not reusable.
            if let Some(a) = self.attached.as_mut() {
                a.unsynced = true;
            }
        }
        io.give();
        flow
    }

    /// One burst of activity: until nothing is in flight and no bytes are pending.
    async fn serve(&mut self, io: &mut Buffers) -> Flow {
        loop {
            // Nothing in flight: a wake-up may find nothing to read; then go idle and give
            // the buffers back rather than wait holding them.
            let quiet = io.cin.is_empty()
                && io.held.is_empty()
                && io.expects.is_empty()
                && self.attached.as_ref().is_none_or(|a| !a.unsynced);
            let got = match &self.client {
                ClientStream::Plain(tcp) => {
                    let server = self
                        .attached
                        .as_deref_mut()
                        .map(|a| (&mut a.server.conn, &mut a.server_waiting));
                    let waiting = &mut self.client_waiting;
                    match read_plain(tcp, &mut io.cin, waiting, server, !quiet).await {
                        Some(side) => side,
                        None => return Flow::Idle,
                    }
                }
                ClientStream::Tls(_) => match self.attached.as_mut() {
                    Some(a) => {
                        a.server_waiting = false;
                        tokio::select! {
                            r = self.client.read_buf(&mut io.cin) => Side::Client(r),
                            r = a.server.conn.stream.read_buf(&mut a.server.conn.rbuf) => Side::Server(r),
                        }
                    }
                    None => Side::Client(self.client.read_buf(&mut io.cin).await),
                },
            };
            match got {
                Side::Client(Ok(n)) | Side::Server(Ok(n)) if n > 0 => {}
                Side::Client(_) => return Flow::Exit,
                Side::Server(_) => {
                    self.server_lost(io).await;
                    return Flow::Exit;
                }
            }
            if let Some(flow) = self.process(io).await {
                return flow;
            }
        }
    }

    /// Handles what was read, writes what is due, gives the server back when the exchange
    /// is over; `Some` ends the burst.
    async fn process(&mut self, io: &mut Buffers) -> Option<Flow> {
        if let Err(flow) = self.handle_server_messages(io) {
            let _ = self.flush(io).await;
            return Some(flow);
        }
        // The usual steps finish without waiting; their futures are made only when there
        // is something to wait for (a server's answer wakes a burst with no client bytes).
        if !io.cin.is_empty() {
            if let Err(flow) = self.handle_client_messages(io).await {
                let _ = self.flush(io).await;
                return Some(flow);
            }
        }
        if !self.flush_now(io) && self.flush_rest(io).await.is_err() {
            return Some(Flow::Exit);
        }
        if self.releasable(io) {
            // A poisoned connection leaves the client at the same point, to be closed: the
            // client's next transaction gets a fresh one.
            let clean = self.attached.as_ref().is_some_and(|a| !a.poisoned);
            self.detach(clean);
            if self.app.process.cancels.draining() {
                return Some(Flow::Idle);
            }
        }
        if self.ticket != 0 && self.between_transactions(io) {
            // A slot move's drain waits for this transaction no longer.
            self.leave_ticket();
        }
        let nothing_pending = io.cin.is_empty() && io.held.is_empty() && !self.client.is_tls();
        match &self.attached {
            None if nothing_pending => Some(Flow::Idle),
            // Idle in a transaction, pinned, or session pooling: wait without buffers.
            Some(a) if nothing_pending && io.expects.is_empty() && !a.unsynced => Some(Flow::Idle),
            _ => None,
        }
    }

    pub(super) fn leave_ticket(&mut self) {
        if let Some(r) = &self.pools.routing {
            r.state.leave(std::mem::take(&mut self.ticket));
        }
    }

    /// Nothing of a transaction is open or in flight: no server in a transaction or in an
    /// unsynced batch, no transaction block spanning shards, no client reply pending
    /// (shardgate's own bookkeeping queries, like the read-your-writes LSN, aside).
    pub(super) fn between_transactions(&self, io: &Buffers) -> bool {
        io.expects.iter().all(Expect::hidden)
            && !self.skip_until_sync
            && self
                .attached
                .as_ref()
                .is_none_or(|a| a.status == b'I' && !a.unsynced)
            && self.shard_tx.as_ref().is_none_or(|t| t.parts.is_empty())
    }

    /// Sends what is due without waiting; true when all of it went. Otherwise what went
    /// is taken off the buffers, for `flush_rest`. The usual send, whole at once, then
    /// costs no future.
    fn flush_now(&mut self, io: &mut Buffers) -> bool {
        use crate::stream::try_send;
        if !io.sout.is_empty() {
            let Some(a) = self.attached.as_mut() else {
                return false;
            };
            match try_send(&a.server.conn.stream, &io.sout) {
                Ok(n) if n == io.sout.len() => io.sout.clear(),
                Ok(n) => {
                    io.sout.advance(n);
                    return false;
                }
                Err(_) => return false,
            }
        }
        if !io.cout.is_empty() {
            let ClientStream::Plain(tcp) = &self.client else {
                return false;
            };
            match try_send(tcp, &io.cout) {
                Ok(n) if n == io.cout.len() => io.cout.clear(),
                Ok(n) => {
                    io.cout.advance(n);
                    return false;
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Sends everything due, waiting when a socket is full.
    async fn flush(&mut self, io: &mut Buffers) -> std::io::Result<()> {
        if self.flush_now(io) {
            return Ok(());
        }
        self.flush_rest(io).await
    }

    /// Sends what `flush_now` left (after a partial send or an error, which it meets
    /// again here), waiting for the sockets. A server that cannot be written to is lost.
    async fn flush_rest(&mut self, io: &mut Buffers) -> std::io::Result<()> {
        if !io.sout.is_empty() {
            if let Some(a) = self.attached.as_mut() {
                if let Err(e) = crate::stream::send_rest(&mut a.server.conn.stream, &io.sout).await
                {
                    io.sout.clear();
                    self.server_lost(io).await;
                    return Err(e);
                }
            }
            io.sout.clear();
        }
        if !io.cout.is_empty() {
            match &mut self.client {
                ClientStream::Plain(tcp) => crate::stream::send_rest(tcp, &io.cout).await?,
                ClientStream::Tls(_) => {
                    self.client.write_all(&io.cout).await?;
                    self.client.flush().await?;
                }
            }
            io.cout.clear();
        }
        Ok(())
    }

    // ---- client → server -------------------------------------------------------------

    async fn handle_client_messages(&mut self, io: &mut Buffers) -> Result<(), Flow> {
        let max = self.app.config.general.max_client_message_size;
        loop {
            let len = match frame_len(&io.cin, max) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.app.metrics.protocol_errors.increment(1);
                    let msg = format!("invalid message from client: {e}");
                    io.cout
                        .extend_from_slice(&protocol::fatal(sqlstate::PROTOCOL_VIOLATION, &msg));
                    return Err(Flow::Exit);
                }
            };
            if matches!(io.cin[0], b'S' | b'H' | b'c' | b'X') && len != 5 {
                // These carry no body; one with a body is garbage the server would reject
                // out of step with what shardgate expects.
                self.app.metrics.protocol_errors.increment(1);
                io.cout.extend_from_slice(&protocol::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "invalid message format",
                ));
                return Err(Flow::Exit);
            }
            if matches!(io.cin[0], b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'H') {
                if self.hold_message(len, io) {
                    self.route_held(io).await?;
                    self.emit_replies(io);
                }
            } else {
                let msg = io.cin.split_to(len).freeze();
                self.client_message(msg, io).await?;
            }
        }
    }

    /// Answers `DEALLOCATE name` of a statement the client prepared by protocol (Parse):
    /// the server holds it under shardgate's name for it, and would answer 26000. psycopg
    /// 3 with libpq before 17 evicts its statements this way. DEALLOCATE is not
    /// transactional, so it is answered at once, when nothing else is in flight and the
    /// transaction has not failed (then Postgres refuses it, and so does the server).
    fn deallocate_locally(&mut self, msg: &[u8], io: &mut Buffers) -> bool {
        if self.prepared.as_ref().is_none_or(|p| p.named.is_empty()) {
            return false;
        }
        let text = Reader::new(body(msg)).cstr().unwrap_or_default();
        let Some(name) = std::str::from_utf8(text)
            .ok()
            .and_then(shardgate_router::deallocated_name)
        else {
            return false;
        };
        let status = match self.attached.as_ref() {
            // Not mid-batch either (messages sent since the last Sync): Postgres would end
            // that implicit transaction first; the server does, when it gets the query.
            Some(a) if io.expects.is_empty() && !a.unsynced => a.status,
            Some(_) => return false,
            None => self.multi_status(),
        };
        let Some(p) = self.prepared.as_mut() else {
            return false;
        };
        if status == b'E' || p.named.remove(name.as_bytes()).is_none() {
            return false;
        }
        protocol::command_complete(&mut io.cout, "DEALLOCATE");
        protocol::ready_for_query(&mut io.cout, status);
        true
    }

    /// Holds the extended-protocol message at the head of `io.cin`, `len` bytes long;
    /// true when it ends the batch (Sync, Flush), which the caller then routes.
    ///
    /// Not async: only routing waits, so a batch's other messages cost no future each.
    fn hold_message(&mut self, len: usize, io: &mut Buffers) -> bool {
        let tag = io.cin[0];
        tracing::trace!(client = self.pid, tag = %(tag as char), attached = self.attached.is_some(), "from client");
        // Sharded databases hold the batch until Sync: its Bind values may send it to
        // another shard. Otherwise, attached, it goes to the server at once.
        let at_once = self.attached.is_some() && io.held.is_empty() && self.pools.routing.is_none();
        io.held.push(&io.cin[..len]);
        io.cin.advance(len);
        if matches!(tag, b'S' | b'H') {
            return true;
        }
        if at_once {
            self.send_held(io);
        }
        self.emit_replies(io);
        false
    }

    async fn client_message(&mut self, msg: Bytes, io: &mut Buffers) -> Result<(), Flow> {
        tracing::trace!(client = self.pid, tag = %(msg[0] as char), attached = self.attached.is_some(), "from client");
        match msg[0] {
            b'Q' | b'F' => {
                if self.skip_until_sync {
                    // A server skipping to Sync ignores a simple query too.
                    return Ok(());
                }
                if !io.held.is_empty() {
                    self.route_held(io).await?;
                }
                if msg[0] == b'Q' {
                    self.log_query(&msg);
                    if self.deallocate_locally(&msg, io) {
                        return Ok(());
                    }
                }
                let mut shard = 0;
                // Sharded databases: the router's plan says primary or not.
                let mut routed: Option<(bool, bool)> = None;
                if let Some(routing) = self.pools.routing.clone() {
                    if msg[0] == b'F' && self.shard_tx.as_ref().is_some_and(|t| !t.parts.is_empty())
                    {
                        let r = shardgate_router::Refusal::unsupported(
                            "function calls (FunctionCall messages) in a transaction that spans shards are not supported",
                        );
                        self.refuse(&r, io);
                        return Ok(());
                    }
                    if msg[0] == b'Q' {
                        match self.route_sharded_query(&routing, &msg, io).await? {
                            multi::Routed::Done => {
                                self.emit_replies(io);
                                return Ok(());
                            }
                            multi::Routed::Shard {
                                shard: s,
                                primary,
                                write,
                            } => {
                                shard = s;
                                routed = Some((primary, write));
                            }
                        }
                    }
                }
                let (effects, primary) = if msg[0] == b'Q' {
                    let text = Reader::new(body(&msg)).cstr().unwrap_or_default();
                    let reading = self.reported.reading();
                    match reading.statement_text(text) {
                        Ok(sql) => {
                            let fx = effects_of(&sql, reading);
                            let primary = fx.as_ref().is_some_and(|fx| !fx.pin.is_empty())
                                || match routed {
                                    Some((p, _)) => p,
                                    None => crate::roles::needs_primary(&sql),
                                };
                            (fx, primary)
                        }
                        Err(_) => (None, true),
                    }
                } else {
                    (None, true)
                };
                let data_write = routed.is_none_or(|(_, w)| w);
                if self.attached.is_none() && !self.attach(io, primary, shard).await {
                    let status = self.attach_failed();
                    protocol::ready_for_query(&mut io.cout, status);
                    return Ok(());
                }
                crate::tally::add(&self.pools.queries, 1);
                let Some(a) = self.attached.as_mut() else {
                    return Ok(());
                };
                a.server.host().metrics.queries.increment();
                a.wrote |= primary;
                a.data_write |= data_write;
                // A simple query destroys the unnamed statement on the server.
                a.server.conn.unnamed = None;
                a.parse_unsure |= effects.as_ref().is_some_and(|fx| fx.changes_parsing());
                if crate::metrics::enabled() {
                    a.sent_at.get_or_insert_with(std::time::Instant::now);
                }
                io.sout.extend_from_slice(&msg);
                io.expects.push_back(Expect::Query {
                    hidden: false,
                    effects,
                });
            }
            b'd' | b'c' | b'f' => {
                // Copy traffic; a server outside COPY ignores it, and so do we when detached.
                if let Some(a) = self.attached.as_mut() {
                    io.sout.extend_from_slice(&msg);
                    if msg[0] != b'd' {
                        // The end of a copy: Syncs from now on count again.
                        if a.copy_in {
                            a.copy_in = false;
                        } else if !io.expects.is_empty() && a.copy_end_seq.is_none() {
                            a.copy_end_seq = Some(io.expects.next_seq());
                        }
                    }
                }
            }
            b'X' => return Err(Flow::Exit),
            other => {
                self.app.metrics.protocol_errors.increment(1);
                let m = format!("invalid frontend message type {}", other as char);
                io.cout
                    .extend_from_slice(&protocol::fatal(sqlstate::PROTOCOL_VIOLATION, &m));
                return Err(Flow::Exit);
            }
        }
        self.emit_replies(io);
        Ok(())
    }

    /// Sends the held extended-protocol messages (ending in Sync or Flush) to a server, or
    /// answers them here when no server is needed.
    async fn route_held(&mut self, io: &mut Buffers) -> Result<(), Flow> {
        let routing = self.pools.routing.clone();
        if self.attached.is_none() {
            let local = self.skip_until_sync || io.held.iter().all(|m| self.answerable_locally(m));
            if local && self.shard_tx.as_ref().is_none_or(|t| t.parts.is_empty()) {
                let held = Held::take(io);
                for m in held.iter() {
                    self.extended_local(m, io);
                }
                held.give_back(io);
                return Ok(());
            }
        }
        let (primary, shard) = match &routing {
            Some(routing) => match self.route_sharded_batch(routing, io).await? {
                multi::Routed::Done => return Ok(()),
                multi::Routed::Shard { shard, primary, .. } => (primary, shard),
            },
            None => (false, 0),
        };
        if self.attached.is_none() {
            let primary = if routing.is_some() {
                primary
            } else {
                self.held_needs_primary(io)
            };
            if !self.attach(io, primary, shard).await {
                let ends_with_sync = io.held.ends_with_sync();
                io.held.clear();
                let status = self.attach_failed();
                if ends_with_sync {
                    protocol::ready_for_query(&mut io.cout, status);
                } else {
                    self.skip_until_sync = true;
                }
                return Ok(());
            }
        }
        self.send_held(io);
        Ok(())
    }

    /// The held messages, to the attached server.
    fn send_held(&mut self, io: &mut Buffers) {
        let held = Held::take(io);
        for m in held.iter() {
            self.extended(m, io);
        }
        held.give_back(io);
    }

    /// Primary for writes (and everything in session pooling), else a replica that has
    /// replayed this client's last write.
    fn want(&self, primary: bool, shard: u32) -> Want {
        if primary || self.app.session_pooling() {
            Want::Primary
        } else {
            // Rows a slot move copied in: a replica must have them before it answers.
            let floor = self
                .pools
                .routing
                .as_ref()
                .map_or(0, |r| r.state.replica_floor(shard));
            let own = match &self.writes {
                Some(w) if self.app.config.general.read_your_writes => w.get(shard),
                _ => 0,
            };
            Want::Replica {
                min_lsn: own.max(floor),
            }
        }
    }

    /// Whether any statement in the held batch needs the primary.
    fn held_needs_primary(&self, io: &Buffers) -> bool {
        io.held.iter().any(|m| {
            let mut r = Reader::new(body(m));
            match m[0] {
                b'P' => {
                    let name = r.cstr().unwrap_or_default();
                    let tail = &body(m)[r.position()..];
                    // The same unnamed text as last time (drivers re-send it every
                    // execution): its classification is already known.
                    if let (true, Some(p)) = (name.is_empty(), self.prepared.as_deref()) {
                        if let Some(s) = p.recent_unnamed(tail, self.reported.reading()) {
                            return s.primary;
                        }
                    }
                    let text = r.cstr().unwrap_or_default();
                    match self.reported.reading().statement_text(text) {
                        Ok(sql) => {
                            crate::roles::needs_primary(&sql) || !classify(&sql).pin.is_empty()
                        }
                        Err(_) => true,
                    }
                }
                b'B' => {
                    let _portal = r.cstr();
                    let name = r.cstr().unwrap_or_default();
                    let p = self.prepared.as_deref();
                    let stmt = if name.is_empty() {
                        p.and_then(|p| p.unnamed.as_ref())
                    } else {
                        p.and_then(|p| p.named.get(name))
                    };
                    stmt.is_none_or(|s| s.primary)
                }
                _ => false,
            }
        })
    }

    /// Whether a detached client's message can be answered without a server: Sync, Flush,
    /// closing a statement, and preparing a statement that already parsed on this pool's
    /// servers (so a driver that prepares synchronously never waits for a connection only
    /// to be told "ParseComplete"; pgbench -M prepared would otherwise deadlock a full pool).
    fn answerable_locally(&self, msg: &[u8]) -> bool {
        match msg[0] {
            b'S' | b'H' => true,
            b'C' => body(msg).first() == Some(&b'S'),
            b'P' => {
                let mut r = Reader::new(body(msg));
                match r.cstr() {
                    Some(name) if !name.is_empty() => {
                        let tail = &body(msg)[r.position()..];
                        // Detached: the client's own settings are what a Parse will see.
                        let hasher = &self.app.process.statement_hasher;
                        let key = self.settings.parse_key();
                        self.pools
                            .is_known_statement(statement_hash(hasher, tail, key))
                    }
                    _ => false,
                }
            }
            _ => false,
        }
    }

    /// Answers a message `answerable_locally` accepted, as Postgres would.
    fn extended_local(&mut self, msg: &[u8], io: &mut Buffers) {
        match msg[0] {
            b'S' => {
                self.skip_until_sync = false;
                let status = self.multi_status();
                protocol::ready_for_query(&mut io.cout, status);
            }
            _ if self.skip_until_sync => {}
            b'C' => {
                if let Some(p) = self.prepared.as_mut() {
                    p.close(msg);
                }
                protocol::empty_msg(&mut io.cout, b'3');
            }
            b'P' => {
                let parse_key = self.parse_key();
                let p = self.prepared.get_or_insert_with(Default::default);
                let mut r = Reader::new(body(msg));
                let name = r.cstr().unwrap_or_default();
                if p.named.contains_key(name) {
                    duplicate_statement(&mut io.cout, name);
                    self.skip_until_sync = true;
                    // A block begun here (sharded: BEGIN waits for its first statement)
                    // fails as on Postgres.
                    if let Some(t) = self.shard_tx.as_mut().filter(|t| t.begin.is_some()) {
                        t.failed = true;
                    }
                    return;
                }
                let tail = &body(msg)[r.position()..];
                let stmt = Arc::new(Stmt::new(
                    Bytes::copy_from_slice(tail),
                    &self.app.process.statement_hasher,
                    parse_key,
                    self.pools.routing.as_deref(),
                    self.reported.reading(),
                ));
                p.named.insert(Bytes::copy_from_slice(name), stmt);
                protocol::empty_msg(&mut io.cout, b'1');
            }
            _ => {}
        }
    }

    /// One extended-protocol message for the attached server.
    fn extended(&mut self, msg: &[u8], io: &mut Buffers) {
        let tag = msg[0];
        if self.skip_until_sync {
            if tag != b'S' {
                return;
            }
            self.skip_until_sync = false;
        }
        let cap = self.app.config.general.server_prepared_statements;
        // A Parse: the key it is prepared under. A Bind or Describe: whether a statement
        // prepared for it now may be shared (the settings are known and its own).
        let current = match tag {
            b'P' | b'B' | b'D' => self.current_parse_key(),
            _ => None,
        };
        let parse_key = match current {
            Some(key) => key,
            None if tag == b'P' => unshared_parse_key(&self.app.process),
            None => 0,
        };
        let share = |s: &Stmt| current == Some(s.parse_key);
        let Some(a) = self.attached.as_mut() else {
            return;
        };
        let p = self.prepared.get_or_insert_with(Default::default);
        if tag != b'S' && tag != b'H' {
            a.unsynced = true;
        }
        match tag {
            b'P' => {
                let b = body(msg);
                let mut r = Reader::new(b);
                let Some(name) = r.cstr() else {
                    return forward_malformed(msg, io);
                };
                let tail_at = 5 + r.position();
                if name.is_empty() {
                    let tail = &msg[tail_at..];
                    let again = match &p.unnamed {
                        Some(s)
                            if s.parse_key == parse_key
                                && *s.tail == *tail
                                && s.reading == self.reported.reading() =>
                        {
                            true
                        }
                        _ => {
                            let (s, again) = p.unnamed_stmt(
                                tail,
                                &self.app.process.statement_hasher,
                                parse_key,
                                self.pools.routing.as_deref(),
                                self.reported.reading(),
                            );
                            p.unnamed = Some(s);
                            again
                        }
                    };
                    let Some(s) = p.unnamed.as_ref() else {
                        return;
                    };
                    // Parsed before by this client: worth keeping on the server. Statements
                    // with session effects stay unnamed, as sent.
                    p.unnamed_global =
                        again && self.app.config.general.prepare_unnamed && s.effects.is_none();
                    if p.unnamed_global {
                        if !prepare_global(a, s, cap, io, false, None) {
                            io.expects.push_back(Expect::Reply(Bytes::from_static(
                                protocol::PARSE_COMPLETE,
                            )));
                        }
                        return;
                    }
                    note_unnamed_parse(a, s.hash);
                    io.sout.extend_from_slice(msg);
                    io.expects.push_back(Expect::Parse {
                        hidden: false,
                        prepared: None,
                        client_name: None,
                    });
                    return;
                }
                if p.named.contains_key(name) {
                    let mut e = BytesMut::new();
                    duplicate_statement(&mut e, name);
                    return refuse_on_server(io, e.freeze());
                }
                let tail = &msg[tail_at..];
                let stmt = Arc::new(Stmt::new(
                    Bytes::copy_from_slice(tail),
                    &self.app.process.statement_hasher,
                    parse_key,
                    self.pools.routing.as_deref(),
                    self.reported.reading(),
                ));
                let client_name = Bytes::copy_from_slice(name);
                p.named.insert(client_name.clone(), stmt.clone());
                if !prepare_global(a, &stmt, cap, io, false, Some(client_name.clone())) {
                    io.expects.push_back(Expect::Registered {
                        reply: protocol::PARSE_COMPLETE,
                        name: client_name,
                        before: None,
                    });
                }
            }
            b'B' => {
                let b = body(msg);
                let mut r = Reader::new(b);
                let (Some(portal), Some(stmt_name)) = (r.cstr(), r.cstr()) else {
                    return forward_malformed(msg, io);
                };
                let rest_at = 5 + r.position();
                let stmt = if stmt_name.is_empty() {
                    p.unnamed.as_ref()
                } else {
                    p.named.get(stmt_name)
                };
                if stmt.is_none() && stmt_name.is_empty() {
                    close_server_unnamed(a, io);
                }
                let global = match stmt {
                    Some(s) if stmt_name.is_empty() && !p.unnamed_global => {
                        ensure_unnamed(a, s, io, share(s));
                        io.sout.extend_from_slice(msg);
                        None
                    }
                    Some(s) => {
                        ensure_prepared(a, s, cap, io, share(s));
                        protocol::write_msg(&mut io.sout, b'B', |o| {
                            protocol::put_cstr(o, portal);
                            protocol::put_cstr(o, &s.name);
                            o.put_slice(&msg[rest_at..]);
                        });
                        Some(s.hash)
                    }
                    // Unknown statement: the server gives the proper error.
                    None => {
                        io.sout.extend_from_slice(msg);
                        None
                    }
                };
                if let Some(s) = stmt {
                    log_bind(self.pid, &self.app, s, &msg[rest_at..]);
                }
                a.wrote |= stmt.is_none_or(|s| s.primary);
                a.data_write |=
                    stmt.is_none_or(|s| s.plan.as_deref().is_none_or(multi::plan_writes));
                let effects = stmt.and_then(|s| s.effects.clone());
                if !p.portal_effects.is_empty() {
                    p.portal_effects.retain(|(name, _)| **name != *portal);
                }
                if let Some(fx) = effects {
                    p.portal_effects.push((Bytes::copy_from_slice(portal), fx));
                }
                io.expects.push_back(Expect::Bind { global });
            }
            b'D' => {
                let mut r = Reader::new(body(msg));
                let (Some(kind), Some(name)) = (r.u8(), r.cstr()) else {
                    return forward_malformed(msg, io);
                };
                let stmt = match (kind, name) {
                    (b'S', b"") => p.unnamed.as_ref(),
                    (b'S', n) => p.named.get(n),
                    _ => None,
                };
                if stmt.is_none() && (kind, name) == (b'S', b"".as_slice()) {
                    close_server_unnamed(a, io);
                }
                let global = match stmt {
                    Some(s) if name.is_empty() && !p.unnamed_global => {
                        ensure_unnamed(a, s, io, share(s));
                        io.sout.extend_from_slice(msg);
                        None
                    }
                    Some(s) => {
                        ensure_prepared(a, s, cap, io, share(s));
                        protocol::write_msg(&mut io.sout, b'D', |o| {
                            o.put_u8(b'S');
                            protocol::put_cstr(o, &s.name);
                        });
                        Some(s.hash)
                    }
                    None => {
                        io.sout.extend_from_slice(msg);
                        None
                    }
                };
                io.expects.push_back(Expect::Describe { global });
            }
            b'E' => {
                let portal = Reader::new(body(msg)).cstr().unwrap_or_default();
                let effects = p
                    .portal_effects
                    .iter()
                    .find(|(name, _)| **name == *portal)
                    .map(|(_, fx)| fx.clone());
                a.server.host().metrics.queries.increment();
                crate::tally::add(&self.pools.queries, 1);
                a.parse_unsure |= effects.as_ref().is_some_and(|fx| fx.changes_parsing());
                io.sout.extend_from_slice(msg);
                io.expects.push_back(Expect::Execute { effects });
            }
            b'C' => {
                let mut r = Reader::new(body(msg));
                if r.u8() == Some(b'S') {
                    let expect = match r.cstr() {
                        Some(name) if !name.is_empty() => Expect::Registered {
                            reply: protocol::CLOSE_COMPLETE,
                            before: p.named.remove(name),
                            name: Bytes::copy_from_slice(name),
                        },
                        _ => {
                            p.close(msg);
                            Expect::Reply(Bytes::from_static(protocol::CLOSE_COMPLETE))
                        }
                    };
                    io.expects.push_back(expect);
                } else {
                    io.sout.extend_from_slice(msg);
                    io.expects.push_back(Expect::Close { hidden: false });
                }
            }
            b'S' if a.copy_in => {
                // The server is copying in and ignores it.
                io.sout.extend_from_slice(msg);
                a.copy_syncs_dropped = true;
            }
            b'S' => {
                io.sout.extend_from_slice(msg);
                io.expects.push_back(Expect::Sync);
                if a.unnamed_in_flight > 0 {
                    a.unnamed_unsure = true;
                }
                if crate::metrics::enabled() {
                    a.sent_at.get_or_insert_with(std::time::Instant::now);
                }
                a.unsynced = false;
            }
            b'H' => io.sout.extend_from_slice(msg),
            _ => io.sout.extend_from_slice(msg),
        }
    }

    /// Sends replies shardgate makes itself once everything before them is answered.
    #[inline]
    fn emit_replies(&mut self, io: &mut Buffers) {
        while io.expects.front().is_some_and(Expect::is_reply) {
            match io.expects.pop_front() {
                Some(Expect::Reply(bytes)) => io.cout.extend_from_slice(&bytes),
                Some(Expect::Registered { reply, .. }) => io.cout.extend_from_slice(reply),
                _ => {}
            }
        }
    }

    // ---- server → client -------------------------------------------------------------

    fn handle_server_messages(&mut self, io: &mut Buffers) -> Result<(), Flow> {
        let Some(a) = self.attached.as_mut() else {
            return Ok(());
        };
        // Messages are handled as slices of the read buffer, which is lent out meanwhile
        // (`server_message` needs the session): splitting each one off would cost two
        // atomic reference-count updates per message.
        let mut rbuf = std::mem::take(&mut a.server.conn.rbuf);
        let mut at = 0;
        // rbuf[run..at]: messages that go to the client as they are, not yet copied to its
        // buffer; copied as one run rather than one message at a time.
        let mut run = 0;
        let done = loop {
            let len = match frame_len(&rbuf[at..], MAX_SERVER_MESSAGE) {
                Ok(Some(n)) => n,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            // A data row answering the client's own statement goes through untouched and
            // changes no state: the bulk of a result skips the bookkeeping below.
            if rbuf[at] == b'D'
                && matches!(
                    io.expects.front(),
                    Some(Expect::Execute { .. } | Expect::Query { hidden: false, .. })
                )
            {
                at += len;
                continue;
            }
            let forward = self.server_message(&rbuf[at..at + len], io);
            if !forward {
                io.cout.extend_from_slice(&rbuf[run..at]);
                run = at + len;
            }
            at += len;
            if io.expects.front().is_some_and(Expect::is_reply) {
                io.cout.extend_from_slice(&rbuf[run..at]);
                run = at;
                self.emit_replies(io);
            }
        };
        io.cout.extend_from_slice(&rbuf[run..at]);
        // `server_message` never detaches the server, so it is still the one attached.
        let Some(a) = self.attached.as_mut() else {
            return Ok(());
        };
        rbuf.advance(at);
        a.server.conn.rbuf = rbuf;
        if let Err(e) = done {
            tracing::error!(server = %a.server.conn.addr, "server sent garbage: {e}");
            let m = format!("server sent an invalid message: {e}");
            io.cout
                .extend_from_slice(&protocol::fatal(sqlstate::CONNECTION_FAILURE, &m));
            if let Some(a) = self.attached.take() {
                a.server.discard();
            }
            return Err(Flow::Exit);
        }
        Ok(())
    }

    /// Handles one server message; true when it goes to the client as it is, which the
    /// caller does (see `handle_server_messages`). It writes nothing to `io.cout` itself:
    /// what shardgate says on its own goes through `Expect::Reply`.
    fn server_message(&mut self, msg: &[u8], io: &mut Buffers) -> bool {
        let Some(a) = self.attached.as_mut() else {
            return false;
        };
        let tag = msg[0];
        let hidden = io.expects.front().is_some_and(Expect::hidden);
        tracing::trace!(client = self.pid, tag = %(tag as char), hidden, expects = io.expects.len(), "from server");
        if tag == b'E' && a.copy_syncs_dropped {
            // See `Attached::copy_syncs_dropped`.
            a.poisoned = true;
        }
        match tag {
            b'S' => {
                a.server.conn.record_param(body(msg));
                return self.report_param(msg);
            }
            b'N' | b'A' => return !hidden,
            _ => {}
        }
        match (tag, io.expects.front()) {
            (b'E', None) => {
                // An error nothing asked for: the connection's state is unknown.
                a.poisoned = true;
                a.tx_failed = true;
                true
            }
            (b'E', Some(Expect::Query { .. } | Expect::Sync | Expect::WriteLsn)) => {
                if !hidden {
                    a.query_failed = true;
                    a.tx_failed = true;
                } else {
                    let f = protocol::parse_error_fields(body(msg));
                    tracing::warn!(
                        code = %String::from_utf8_lossy(f.code),
                        "a statement shardgate issued failed: {}",
                        String::from_utf8_lossy(f.message)
                    );
                    a.server.conn.settings = None;
                }
                !hidden
            }
            (b'E', Some(_)) => {
                // The message at the head failed; the server now skips everything up to Sync.
                a.tx_failed = true;
                let mut stale = None;
                let mut refusal = None;
                // The client's registry as it was before the failed message and those the
                // server skips after it: restored last to first, so that a Close of a name
                // parsed in the same batch ends with the name gone, as on Postgres.
                let mut undo = Vec::new();
                match io.expects.pop_front() {
                    Some(Expect::Refused(error)) => refusal = Some(error),
                    Some(mut failed) => {
                        take_registered(&mut failed, &mut undo);
                        if let Expect::Bind { global: Some(hash) }
                        | Expect::Describe { global: Some(hash) } = failed
                        {
                            stale = Some(hash).filter(|_| stale_plan(msg));
                        }
                        self.forget_failed(failed);
                    }
                    None => {}
                }
                loop {
                    if io.expects.front().is_none_or(|e| matches!(e, Expect::Sync)) {
                        break;
                    }
                    match io.expects.pop_front() {
                        Some(Expect::Registered { name, before, .. }) => undo.push((name, before)),
                        Some(mut skipped) => {
                            take_registered(&mut skipped, &mut undo);
                            self.forget_failed(skipped);
                        }
                        None => {}
                    }
                }
                if let Some(p) = self.prepared.as_mut() {
                    for (name, before) in undo.into_iter().rev() {
                        match before {
                            Some(stmt) => p.named.insert(name, stmt),
                            None => p.named.remove(&name),
                        };
                    }
                }
                if io.expects.is_empty() && self.attached.as_ref().is_some_and(|a| a.unsynced) {
                    // The client's Sync has not gone out yet (a batch ended by Flush, or
                    // sent on as it came): the server skips to it, and so does shardgate,
                    // or the messages in between would wait for answers that never come.
                    self.skip_until_sync = true;
                }
                if let (Some(hash), Some(a)) = (stale, self.attached.as_mut()) {
                    // A table change altered the statement's result columns: the server
                    // would fail it at every run from now on, for every client sharing
                    // it. Counted gone, it is prepared afresh (after a Close of the old
                    // one) wherever it is next used on this connection.
                    a.server.conn.prepared.remove(hash);
                }
                match refusal {
                    Some(error) => {
                        io.expects.push_front(Expect::Reply(error));
                        false
                    }
                    None => true,
                }
            }
            (b'G', Some(Expect::Execute { .. } | Expect::Query { hidden: false, .. })) => {
                // Copy-in mode: the server ignores every Sync until the client's CopyDone
                // or CopyFail. Those already sent expect nothing; later ones neither.
                let before = a.copy_end_seq.take();
                a.copy_syncs_dropped |= io.expects.drop_syncs_behind_head(before);
                a.copy_in = before.is_none();
                true
            }
            (b'Z', _) => {
                a.copy_in = false;
                let status = msg.get(5).copied().unwrap_or(b'I');
                let done = io.expects.pop_front();
                if io.expects.is_empty() {
                    // A stray CopyDone outside any COPY must not leave a mark behind; a
                    // copy that got here without an error ignored the Syncs as expected.
                    a.copy_end_seq = None;
                    a.copy_syncs_dropped = false;
                }
                if !matches!(
                    done,
                    Some(Expect::Sync | Expect::Query { .. } | Expect::WriteLsn)
                ) {
                    // A ReadyForQuery that answers nothing sent: never reuse this connection.
                    a.poisoned = true;
                }
                if let Some(Expect::Query {
                    hidden: false,
                    effects: Some(fx),
                }) = &done
                {
                    if !a.query_failed {
                        self.apply_now(fx);
                    } else {
                        // Statements before the failing one may have run and even committed
                        // (`LISTEN x; SELECT 1/0`, `BEGIN; SET ..; COMMIT; SELECT 1/0`):
                        // keep whatever they may have bound to the session, and count the
                        // settings unknown (`tx_failed` is set) so the next client of the
                        // connection gets them reset.
                        self.pins = self.pins.with(fx.pin);
                    }
                    let Some(a) = self.attached.as_mut() else {
                        return false;
                    };
                    a.tx_effects.push(fx.clone());
                }
                let Some(a) = self.attached.as_mut() else {
                    return false;
                };
                a.query_failed = false;
                if hidden {
                    return false;
                }
                a.status = status;
                if let Some(sent) = a.sent_at.take() {
                    a.server.host().metrics.query_seconds.record(sent.elapsed());
                }
                if status == b'I' {
                    a.data_write = false;
                    if a.wrote
                        && self.app.config.general.read_your_writes
                        && self.pools.shards[a.shard as usize].topology.hosts.len() > 1
                    {
                        // The commit is acknowledged (the ReadyForQuery goes out with this
                        // burst); learning its WAL position costs the client no wait.
                        a.wrote = false;
                        let sql = "SELECT pg_current_wal_lsn()";
                        query_to_server(&mut a.server.conn, io, sql, Expect::WriteLsn);
                    }
                    // A transaction block that started here is over.
                    self.shard_tx = None;
                    self.end_transaction();
                    // The settings are the client's again, unless a statement queued
                    // behind this transaction (pipelined) may change them.
                    if let Some(a) = self.attached.as_mut() {
                        a.parse_unsure = io.expects.iter().any(Expect::changes_parsing);
                    }
                }
                true
            }
            (b'D', Some(Expect::WriteLsn)) => {
                let mut r = Reader::new(body(msg));
                let lsn = match (r.u8(), r.u8(), r.i32()) {
                    (Some(0), Some(1), Some(len)) if len > 0 => r
                        .bytes(len as usize)
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .and_then(crate::topology::parse_lsn),
                    _ => None,
                };
                let shard = a.shard;
                self.writes
                    .get_or_insert_with(Default::default)
                    .set(shard, lsn.unwrap_or(u64::MAX));
                false
            }
            (b'1', Some(Expect::Parse { prepared, .. })) => {
                match prepared {
                    Some(hash) => self.pools.mark_known_statement(*hash),
                    None => unnamed_parse_done(a),
                }
                io.expects.skip_front();
                !hidden
            }
            (b's', Some(Expect::Execute { effects: Some(_) })) => {
                // A row limit suspended the portal: what it ran so far holds.
                self.execute_done(io);
                !hidden
            }
            (b'2', Some(Expect::Bind { .. }))
            | (b'3', Some(Expect::Close { .. }))
            | (b'n' | b'T', Some(Expect::Describe { .. }))
            | (b'I' | b's', Some(Expect::Execute { .. })) => {
                io.expects.skip_front();
                !hidden
            }
            (b'C', head) => {
                if body(msg).starts_with(b"ROLLBACK") {
                    a.tx_failed = true;
                }
                if let Some(Expect::Execute { .. }) = head {
                    self.execute_done(io);
                }
                !hidden
            }
            _ => !hidden,
        }
    }

    /// The Execute at the head of the queue ran (to completion, or suspended by a row
    /// limit): its session effects hold.
    fn execute_done(&mut self, io: &mut Buffers) {
        if let Some(Expect::Execute { effects: Some(fx) }) = io.expects.pop_front() {
            self.apply_now(&fx);
            if let Some(a) = self.attached.as_mut() {
                a.tx_effects.push(fx);
            }
        }
    }

    /// A sent message failed or was skipped: undo what sending it registered.
    fn forget_failed(&mut self, e: Expect) {
        if let Expect::Execute { effects: Some(fx) } = &e {
            // It may have run partly (`SELECT pg_advisory_lock(1), 1/0`): keep the client
            // on the connection rather than hand another client a lock it holds.
            self.pins = self.pins.with(fx.pin);
            if fx.opaque_code {
                // A procedure may have committed a SET before it failed.
                if let Some(a) = self.attached.as_mut() {
                    a.server.conn.settings = None;
                }
            }
            return;
        }
        if let Expect::Parse {
            prepared,
            client_name,
            ..
        } = e
        {
            if let Some(a) = self.attached.as_mut() {
                match prepared {
                    Some(hash) => a.server.conn.prepared.remove(hash),
                    // An unnamed Parse (named ones always carry their hash): whatever the
                    // server's unnamed statement is now, it is not that one.
                    None => {
                        a.server.conn.unnamed = None;
                        unnamed_parse_done(a);
                    }
                }
            }
            if let (Some(name), Some(p)) = (client_name, self.prepared.as_mut()) {
                p.named.remove(&name);
            }
        }
    }

    /// Effects that hold as soon as the statement completes: pins and deallocation.
    fn apply_now(&mut self, fx: &SessionEffects) {
        self.pins = self.pins.with(fx.pin);
        match self.attached.as_mut() {
            Some(a) => a.tx_unpins = a.tx_unpins.without(fx.pin).with(fx.unpin),
            None => self.pins = self.pins.without(fx.unpin),
        }
        if fx.discard_all || fx.deallocate_all {
            self.prepared = None;
            if let Some(a) = self.attached.as_mut() {
                a.server.conn.prepared.clear();
                a.server.conn.unnamed = None;
            }
        }
    }

    /// The transaction ended (ReadyForQuery 'I'): its settings changes stick unless it failed.
    fn end_transaction(&mut self) {
        let Some(a) = self.attached.as_mut() else {
            return;
        };
        let effects = std::mem::take(&mut a.tx_effects);
        let failed = std::mem::replace(&mut a.tx_failed, false);
        let unpins = std::mem::replace(&mut a.tx_unpins, Pins::NONE);
        if !failed {
            // A failed transaction may have rolled the release back (`BEGIN; UNLISTEN *;
            // ROLLBACK` still listens): the client stays pinned, which is always safe.
            self.pins = self.pins.without(unpins);
        }
        let changes: Vec<_> = effects
            .iter()
            .flat_map(|fx| fx.settings.iter().cloned())
            .collect();
        // A DO block or procedure may have set anything (SET in PL/pgSQL): the next user
        // of the connection, this client included, gets it reset to its own settings.
        let opaque = effects.iter().any(|fx| fx.opaque_code);
        if changes.is_empty() {
            if opaque {
                a.server.conn.settings = None;
            }
            return;
        }
        if failed {
            // Whether the server kept them (savepoints) is unknown: reset it before reuse.
            a.server.conn.settings = None;
            return;
        }
        let settings = self.pools.intern_settings(self.settings.apply(&changes));
        // Settings that were unknown (a DO block earlier, to a client that kept the
        // connection) stay unknown: the client's own changes do not say what else is set.
        let known = a.server.conn.settings.is_some();
        a.server.conn.settings = (!opaque && known).then(|| settings.clone());
        self.settings = settings;
    }

    /// The parse-time settings a statement sent now meets, as a key
    /// (`Settings::parse_key`); `None` while a statement of the current transaction (or
    /// one still queued) may be changing them. While the connection's settings are
    /// unknown (after a DO block, to a pinned client), a key of that attachment alone.
    /// Statements under either are never shared with another client.
    fn current_parse_key(&mut self) -> Option<u64> {
        match self.attached.as_deref_mut() {
            Some(a) if a.parse_unsure => None,
            // Unknown for the rest of this attachment (a client that keeps its connection):
            // one key for all of it, so its statements are still found again.
            Some(a) if a.server.conn.settings.is_none() => {
                if a.unknown_key == 0 {
                    a.unknown_key = unshared_parse_key(&self.app.process);
                }
                Some(a.unknown_key)
            }
            _ => Some(self.settings.parse_key()),
        }
    }

    /// The key a Parse sent now is prepared under: `current_parse_key`, or one used once.
    fn parse_key(&mut self) -> u64 {
        match self.current_parse_key() {
            Some(key) => key,
            None => unshared_parse_key(&self.app.process),
        }
    }

    /// Forwards a ParameterStatus only if the client has not seen that value.
    /// A ParameterStatus from the server: true when the client has not seen this value
    /// yet (it is then remembered, and the message goes on to the client).
    fn report_param(&mut self, msg: &[u8]) -> bool {
        let mut r = Reader::new(body(msg));
        let (Some(name), Some(value)) = (r.cstr(), r.cstr()) else {
            return false;
        };
        if self.reported.has(name, value) {
            return false;
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let value = String::from_utf8_lossy(value).into_owned();
        Arc::make_mut(&mut self.reported).set(name, value);
        true
    }

    // ---- holding and giving back a server connection -----------------------------------

    /// Takes a server connection for the client; on failure the client has an ErrorResponse.
    async fn attach(&mut self, io: &mut Buffers, primary: bool, shard: u32) -> bool {
        self.follow_reload();
        // The usual case, nothing paused and an idle connection at hand, costs no future
        // (see `UserPools::checkout_now`). The rare waits are boxed: inline, their futures
        // would make every burst's future (set up once per transaction) hundreds of bytes
        // bigger.
        // A cancel ends either wait (57014), as Postgres cancels a query waiting for a lock.
        if self.app.process.is_paused(&self.pools.database) {
            let unpaused = self.app.process.wait_unpaused(&self.pools.database);
            if Box::pin(self.cancel.unless_cancelled(unpaused))
                .await
                .is_none()
            {
                cancelled_while_waiting(&mut io.cout);
                return false;
            }
        }
        let want = self.want(primary, shard);
        let ready = self
            .pools
            .checkout_now(shard as usize, want, &self.settings);
        let mut server = match ready {
            Ok(s) => s,
            Err(picked) => {
                let checkout = self
                    .pools
                    .checkout(shard as usize, want, &self.settings, picked);
                match Box::pin(self.cancel.unless_cancelled(checkout)).await {
                    Some(Ok(s)) => s,
                    Some(Err(e)) => {
                        let (code, message) = e.client_error();
                        tracing::warn!(pool = %self.pools.name, "{message}");
                        protocol::error_response(&mut io.cout, "ERROR", &code, &message);
                        return false;
                    }
                    None => {
                        cancelled_while_waiting(&mut io.cout);
                        return false;
                    }
                }
            }
        };
        server.host().metrics.transactions.increment();
        self.cancel
            .attach(server.conn.id, server.conn.cancel_target());
        debug_assert!(io.expects.is_empty());
        let current = server.conn.settings.as_ref();
        let same = current.is_some_and(|c| Arc::ptr_eq(c, &self.settings));
        if !same {
            for sql in self.settings.sync_sql(current.map(|c| &**c)) {
                query_to_server(&mut server.conn, io, &sql, Expect::HIDDEN_QUERY);
            }
            server.conn.settings = Some(self.settings.clone());
        }
        if let Some(begin) = self.shard_tx.as_ref().and_then(|t| t.begin.as_deref()) {
            // The client's BEGIN, answered when it came, starts the transaction here.
            query_to_server(&mut server.conn, io, begin, Expect::HIDDEN_QUERY);
        }
        self.attached = Some(
            Attached {
                server,
                shard,
                unsynced: false,
                status: b'I',
                tx_failed: false,
                query_failed: false,
                tx_effects: Vec::new(),
                tx_unpins: Pins::NONE,
                wrote: false,
                data_write: false,
                primary: want == Want::Primary,
                poisoned: false,
                sent_at: None,
                server_waiting: false,
                unnamed_in_flight: 0,
                parse_unsure: false,
                unknown_key: 0,
                unnamed_unsure: false,
                copy_in: false,
                copy_end_seq: None,
                copy_syncs_dropped: false,
            }
            .boxed(),
        );
        true
    }

    /// After `attach` failed (its error is written): the transaction status to report. A
    /// transaction block not yet sent anywhere (sharded databases) has failed, as on
    /// Postgres, and takes only ROLLBACK from here.
    fn attach_failed(&mut self) -> u8 {
        match self.shard_tx.as_mut() {
            Some(t) if t.begin.is_some() => {
                t.failed = true;
                b'E'
            }
            _ => b'I',
        }
    }

    /// Between transactions, moves the session to the newest configuration generation.
    fn follow_reload(&mut self) {
        let process = &self.app.process;
        if process.generation() == self.app.generation {
            return;
        }
        let Some(app) = process.current() else {
            return;
        };
        let key = (self.pools.database.clone(), self.pools.user.clone());
        if let Some(pools) = app.pools.get(&key) {
            let same_state = match (&self.pools.routing, &pools.routing) {
                (Some(a), Some(b)) => Arc::ptr_eq(&a.state, &b.state),
                (None, None) => true,
                _ => false,
            };
            let held = self.ticket != 0;
            if !same_state {
                self.leave_ticket();
            }
            self.pools = pools.clone();
            if !same_state && held {
                if let Some(r) = &self.pools.routing {
                    self.ticket = r.state.enter();
                }
            }
        }
        self.app = app;
    }

    /// True when the connection can leave the client: back to the pool for another
    /// client, or closed if it is poisoned.
    fn releasable(&self, io: &Buffers) -> bool {
        match &self.attached {
            Some(a) => {
                io.expects.is_empty()
                    && !a.unsynced
                    && a.status == b'I'
                    && self.pins.is_empty()
                    && !self.skip_until_sync
                    && !self.app.session_pooling()
            }
            None => false,
        }
    }

    /// Gives the server connection back (`clean`) or closes it.
    fn detach(&mut self, clean: bool) {
        if let Some(a) = self.attached.take() {
            let a = Attached::unboxed(a);
            // A cancel on its way could land on another client's query there.
            let cancelling = self.cancel.detach();
            if let Some(p) = self.prepared.as_mut() {
                p.portal_effects.clear();
            }
            if clean && !cancelling {
                a.server.release();
            } else {
                a.server.discard();
            }
        }
    }

    async fn server_lost(&mut self, io: &mut Buffers) {
        if let Some(a) = self.attached.take() {
            tracing::warn!(server = %a.server.conn.addr, client = self.pid, "server connection lost");
            a.server.discard();
        }
        self.cancel.detach();
        io.cout.extend_from_slice(&protocol::fatal(
            sqlstate::CONNECTION_FAILURE,
            "server closed the connection unexpectedly",
        ));
        let _ = self.client.write_all(&io.cout).await;
        let _ = self.client.flush().await;
        io.cout.clear();
    }

    /// The client is gone: return its server connection if it is clean, reset it if only
    /// session state holds it, close it otherwise.
    async fn finish(&mut self) {
        self.leave_ticket();
        self.app.metrics.clients.decrement(1.0);
        self.app.process.cancels.unregister(self.pid);
        if let Some(tx) = self.shard_tx.take() {
            // A multi-shard transaction the client abandoned: its connections close (the
            // servers roll back).
            multi::discard_parts(*tx);
        }
        let Some(a) = self.attached.as_mut() else {
            return;
        };
        let idle = !a.unsynced && !a.poisoned && a.status == b'I';
        if idle && self.pins.is_empty() {
            self.detach(true);
            return;
        }
        if idle {
            a.server_waiting = false;
            let reset = tokio::time::timeout(
                self.app.config.general.server_connect_timeout,
                a.server.conn.run("DISCARD ALL"),
            )
            .await;
            if let Ok(Ok(None)) = reset {
                a.server.conn.prepared.clear();
                a.server.conn.unnamed = None;
                a.server.conn.settings = Some(Settings::empty());
                self.detach(true);
                return;
            }
        }
        self.detach(false);
    }
}

/// Read-your-writes positions: (shard, WAL position of the client's last committed write
/// there). `u64::MAX`: a write whose position is unknown; reads of that shard go to its
/// primary until the client's next write there tells the position.
#[derive(Default)]
pub(crate) struct WriteLsns(Vec<(u32, u64)>);

impl WriteLsns {
    pub(crate) fn get(&self, shard: u32) -> u64 {
        self.0
            .iter()
            .find(|(s, _)| *s == shard)
            .map_or(0, |(_, lsn)| *lsn)
    }

    /// A later commit on the same shard: its position replaces the last one (WAL
    /// positions of one server only grow; a failover's new primary continues them).
    pub(crate) fn set(&mut self, shard: u32, lsn: u64) {
        match self.0.iter_mut().find(|(s, _)| *s == shard) {
            Some(e) => e.1 = lsn,
            None => self.0.push((shard, lsn)),
        }
    }
}

/// Where statement logs go (debug level).
const STATEMENT_LOG: &str = "shardgate::statements";

impl Session {
    /// Logs a simple query at debug level: with its constants only when `log_parameters`.
    fn log_query(&self, msg: &[u8]) {
        if !tracing::enabled!(target: STATEMENT_LOG, tracing::Level::DEBUG) {
            return;
        }
        let text = Reader::new(body(msg)).cstr().unwrap_or_default();
        let sql = String::from_utf8_lossy(text);
        if self.app.config.general.log_parameters {
            tracing::debug!(target: STATEMENT_LOG, client = self.pid, sql = %sql, "query");
        } else {
            let shape = redact_constants(&sql);
            tracing::debug!(target: STATEMENT_LOG, client = self.pid, sql = %shape, "query");
        }
    }
}

/// A statement's text with every constant (strings, numbers, dollar-quoted text) shown as
/// `$?`, for logs without parameters.
fn redact_constants(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut tokens = shardgate_router::scan::Tokens::new(sql).peekable();
    while let Some(tok) = tokens.next() {
        let b = tok.as_bytes();
        if tok == "$" {
            // A parameter placeholder `$n`: not a constant.
            if let Some(n) = tokens.next_if(|t| t.bytes().all(|c| c.is_ascii_digit())) {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push('$');
                out.push_str(n);
                continue;
            }
        }
        let constant = b[0].is_ascii_digit()
            || b[0] == b'\''
            || (b[0] == b'$' && b.get(1).is_some_and(|c| !c.is_ascii_digit()))
            || (b.len() > 1 && b[1] == b'\'' && b"eEbBxXnN".contains(&b[0]))
            || tok.starts_with("U&'")
            || tok.starts_with("u&'");
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(if constant { "$?" } else { tok });
    }
    out
}

/// Logs an extended-protocol execution at debug level; parameter values only when
/// `log_parameters`.
fn log_bind(pid: i32, app: &App, stmt: &Stmt, rest: &[u8]) {
    if !tracing::enabled!(target: STATEMENT_LOG, tracing::Level::DEBUG) {
        return;
    }
    let params = stmt.bind_values(rest, stmt.reading);
    let count = params.as_ref().map_or(0, |b| b.len());
    if app.config.general.log_parameters {
        let values: Vec<String> = params
            .map(|b| {
                b.values()
                    .iter()
                    .map(|v| match v {
                        Some(v) => String::from_utf8_lossy(v).into_owned(),
                        None => "NULL".into(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        tracing::debug!(target: STATEMENT_LOG, client = pid, sql = %stmt.text(), parameters = ?values, "execute");
    } else {
        tracing::debug!(target: STATEMENT_LOG, client = pid, sql = %stmt.text(), parameters = count, "execute");
    }
}

/// Reads what the client or the attached server has sent; with `wait`, waits until one
/// of them has something (or is gone), else `None` when neither has anything now.
///
/// Readiness is asked first and only a ready socket is read: a read of a socket tokio
/// knows to be drained is wasted work, and a burst would otherwise try each socket again
/// after every exchange (three such reads per pgbench transaction). The server is asked
/// first: while attached, its answer is what the session usually waits for.
async fn read_plain(
    client: &tokio::net::TcpStream,
    cin: &mut BytesMut,
    client_waiting: &mut bool,
    mut server: Option<(&mut Box<crate::server::ServerConn>, &mut bool)>,
    wait: bool,
) -> Option<Side> {
    use crate::stream::{poll_read_ready_again, read_drained, Read};
    std::future::poll_fn(|cx| loop {
        // A socket that was ready but had nothing (its readiness is cleared by the read)
        // must be asked again, so that its waker is registered before going to sleep.
        let mut stale = false;
        if let Some((s, waiting)) = server.as_mut() {
            match poll_read_ready_again(&s.stream, waiting, cx) {
                Poll::Ready(Ok(())) => match read_drained(&s.stream, &mut s.rbuf) {
                    Ok(Read::Got(n)) => return Poll::Ready(Some(Side::Server(Ok(n)))),
                    Ok(Read::Nothing) => stale = true,
                    Err(e) => return Poll::Ready(Some(Side::Server(Err(e)))),
                },
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Side::Server(Err(e)))),
                Poll::Pending => {}
            }
        }
        match poll_read_ready_again(client, client_waiting, cx) {
            Poll::Ready(Ok(())) => match read_drained(client, cin) {
                Ok(Read::Got(n)) => return Poll::Ready(Some(Side::Client(Ok(n)))),
                Ok(Read::Nothing) => stale = true,
                Err(e) => return Poll::Ready(Some(Side::Client(Err(e)))),
            },
            Poll::Ready(Err(e)) => return Poll::Ready(Some(Side::Client(Err(e)))),
            Poll::Pending => {}
        }
        if !wait {
            return Poll::Ready(None);
        }
        if !stale {
            return Poll::Pending;
        }
    })
    .await
}

enum Side {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
}

/// The answer to a statement cancelled while it waited for a server connection.
fn cancelled_while_waiting(out: &mut BytesMut) {
    protocol::error_response(
        out,
        "ERROR",
        sqlstate::QUERY_CANCELED,
        crate::cancel::CANCELED_BY_USER,
    );
}

fn duplicate_statement(out: &mut BytesMut, name: &[u8]) {
    let text = duplicate_statement_text(name);
    protocol::error_response(out, "ERROR", sqlstate::DUPLICATE_PSTATEMENT, &text);
}

fn duplicate_statement_text(name: &[u8]) -> String {
    format!(
        "prepared statement \"{}\" already exists",
        String::from_utf8_lossy(name)
    )
}

/// A Parse of a client-named statement registered the name when it went out: the name
/// joins the undo list (it did not exist before: a duplicate is refused).
fn take_registered(e: &mut Expect, undo: &mut Vec<(Bytes, Option<Arc<Stmt>>)>) {
    if let Expect::Parse { client_name, .. } = e {
        if let Some(name) = client_name.take() {
            undo.push((name, None));
        }
    }
}

/// Fails the server's transaction where shardgate refuses a message Postgres would have
/// refused (a duplicate statement name, which only shardgate sees: its statements have
/// other names on the server). Postgres aborts the transaction at the failed message,
/// rolling back what the batch ran before it; the server must as well, or the Sync would
/// commit writes the client is told failed. So it gets a Parse that cannot parse, and the
/// client `error` in place of the server's. The statement is named, so the server's
/// unnamed one stays as it is.
fn refuse_on_server(io: &mut Buffers, error: Bytes) {
    protocol::write_msg(&mut io.sout, b'P', |o| {
        o.put_slice(b"shardgate_refused\0shardgate refused this message\0");
        o.put_i16(0);
    });
    io.expects.push_back(Expect::Refused(error));
}

/// A simple query shardgate writes to a server itself (answered by `expect`). Like any
/// simple query it destroys the server's unnamed statement, so the connection forgets it.
fn query_to_server(
    conn: &mut crate::server::ServerConn,
    io: &mut Buffers,
    sql: &str,
    expect: Expect,
) {
    conn.unnamed = None;
    protocol::query(&mut io.sout, sql);
    io.expects.push_back(expect);
}

/// The client names the unnamed statement but has none (never parsed one, or closed it):
/// the server's may be another client's, so it is closed first, and the server answers
/// the client's message with its own error (its transaction then fails, as it should).
fn close_server_unnamed(a: &mut Attached, io: &mut Buffers) {
    write_close(&mut io.sout, b"");
    a.server.conn.unnamed = None;
    io.expects.push_back(Expect::Close { hidden: true });
}

fn forward_malformed(msg: &[u8], io: &mut Buffers) {
    // The server rejects it with the proper protocol error, then skips to Sync.
    io.sout.extend_from_slice(msg);
    io.expects.push_back(Expect::Malformed);
}

fn write_parse(out: &mut BytesMut, name: &[u8], tail: &[u8]) {
    protocol::write_msg(out, b'P', |o| {
        protocol::put_cstr(o, name);
        o.put_slice(tail);
    });
}

/// Whether a server error says a prepared statement's cached plan no longer fits its
/// result columns ("cached plan must not change result type", after an ALTER TABLE). The
/// routine is checked as well as the message, which a non-English server translates.
fn stale_plan(msg: &[u8]) -> bool {
    let f = protocol::parse_error_fields(body(msg));
    f.code == sqlstate::FEATURE_NOT_SUPPORTED.as_bytes()
        && (f.routine == b"RevalidateCachedQuery" || f.message.starts_with(b"cached plan"))
}

/// A parse key no other statement has: for statements prepared while the settings are
/// changing or unknown.
fn unshared_parse_key(process: &crate::app::Process) -> u64 {
    let n = process.unshared_parses.fetch_add(1, Ordering::Relaxed);
    process.statement_hasher.hash_one(n) | 1
}

/// Makes the client's unnamed statement the connection's unnamed statement. `share`: the
/// connection's parse-time settings are those the statement was parsed under; otherwise
/// the Parse made here is the client's alone, and no later Bind of another client's same
/// statement may take it for its own.
fn ensure_unnamed(a: &mut Attached, s: &Stmt, io: &mut Buffers, share: bool) {
    if a.server.conn.unnamed != Some(s.hash) || a.unnamed_unsure {
        write_parse(&mut io.sout, b"", &s.tail);
        note_unnamed_parse(a, s.hash);
        if !share {
            a.server.conn.unnamed = None;
        }
        io.expects.push_back(Expect::Parse {
            hidden: true,
            prepared: None,
            client_name: None,
        });
    }
}

/// An unnamed Parse of `hash` goes out: a Bind after it in the same batch binds it (or is
/// skipped with it).
fn note_unnamed_parse(a: &mut Attached, hash: u64) {
    a.server.conn.unnamed = Some(hash);
    a.unnamed_in_flight += 1;
    a.unnamed_unsure = false;
}

/// An unnamed Parse was answered or skipped.
fn unnamed_parse_done(a: &mut Attached) {
    a.unnamed_in_flight = a.unnamed_in_flight.saturating_sub(1);
    if a.unnamed_in_flight == 0 {
        a.unnamed_unsure = false;
    }
}

/// Prepares the statement on the connection under its global name if it is not there yet.
/// `share`: as for `ensure_unnamed`; a statement prepared under other settings than its
/// own is not recorded on the connection, so the next use of the name prepares it again.
fn ensure_prepared(a: &mut Attached, s: &Stmt, cap: usize, io: &mut Buffers, share: bool) {
    if prepare_global(a, s, cap, io, true, None) && !share {
        a.server.conn.prepared.remove(s.hash);
    }
}

/// Sends a Parse of the statement under its global name unless the connection has it
/// (then false, and nothing is sent). `hidden`: shardgate's own (for a Bind or Describe),
/// its reply swallowed. `client_name`: a client's named statement, forgotten if the
/// Parse fails.
///
/// A hidden Close of the name goes first: the server may still hold a statement shardgate
/// counts gone (a stale one it forgot, or an eviction Close the server skipped after an
/// error), and the Parse must not then fail with "already exists".
fn prepare_global(
    a: &mut Attached,
    s: &Stmt,
    cap: usize,
    io: &mut Buffers,
    hidden: bool,
    client_name: Option<Bytes>,
) -> bool {
    if a.server.conn.prepared.contains(s.hash) {
        return false;
    }
    evict_if_full(a, cap, io);
    write_close(&mut io.sout, &s.name);
    io.expects.push_back(Expect::Close { hidden: true });
    write_parse(&mut io.sout, &s.name, &s.tail);
    a.server.conn.prepared.insert(s.hash);
    io.expects.push_back(Expect::Parse {
        hidden,
        prepared: Some(s.hash),
        client_name,
    });
    true
}

/// Keeps the number of statements on a connection bounded by closing the least used.
fn evict_if_full(a: &mut Attached, cap: usize, io: &mut Buffers) {
    while a.server.conn.prepared.len() >= cap.max(1) {
        let Some(oldest) = a.server.conn.prepared.oldest() else {
            return;
        };
        close_global(a, oldest, io);
    }
}

/// Closes a statement on the connection (hidden from the client) and forgets it there.
fn close_global(a: &mut Attached, hash: u64, io: &mut Buffers) {
    a.server.conn.prepared.remove(hash);
    write_close(&mut io.sout, &global_name(hash));
    io.expects.push_back(Expect::Close { hidden: true });
}

fn write_close(out: &mut BytesMut, statement: &[u8]) {
    protocol::write_msg(out, b'C', |o| {
        o.put_u8(b'S');
        protocol::put_cstr(o, statement);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_see_no_constants() {
        assert_eq!(
            redact_constants("SELECT 'secret', 42, $$x$$, E'y', id FROM t WHERE a = $1 -- c"),
            "SELECT $? , $? , $? , E $? , id FROM t WHERE a = $1"
        );
    }

    #[test]
    fn held_frames_come_back_whole_and_in_order() {
        let frames: [&[u8]; 4] = [
            b"P\0\0\0\x10\0SELECT 1\0\0\0",
            b"B\0\0\0\x0c\0\0\0\0\0\0\0\0",
            b"E\0\0\0\x09\0\0\0\0\0",
            b"S\0\0\0\x04",
        ];
        let mut io = Buffers::take();
        assert!(io.held.is_empty() && !io.held.ends_with_sync());
        for f in frames {
            assert_eq!(frame_len(f, 1 << 20), Ok(Some(f.len())), "test frame {f:?}");
            io.held.push(f);
        }
        assert!(io.held.ends_with_sync());
        let held = Held::take(&mut io);
        assert!(io.held.is_empty());
        assert_eq!(held.iter().collect::<Vec<_>>(), frames);
        let capacity = held.frames.capacity();
        held.give_back(&mut io);
        // Back empty, keeping its allocation for the next batch.
        assert!(io.held.is_empty() && !io.held.ends_with_sync());
        assert_eq!(io.held.frames.capacity(), capacity);
        assert_eq!(io.held.iter().count(), 0);
    }

    #[test]
    fn expects_come_out_in_order_and_a_queue_that_never_drains_stays_bounded() {
        let mut q = Expects::default();
        assert!(q.is_empty() && q.front().is_none() && q.pop_front().is_none());
        q.push_back(Expect::Sync);
        q.push_back(Expect::Describe { global: None });
        assert_eq!(q.len(), 2);
        assert!(matches!(q.pop_front(), Some(Expect::Sync)));
        assert!(matches!(q.front(), Some(Expect::Describe { .. })));
        assert!(matches!(q.iter().next(), Some(Expect::Describe { .. })) && q.iter().count() == 1);
        assert!(matches!(q.pop_front(), Some(Expect::Describe { .. })));
        // Drained: empty again, and its storage starts over.
        assert!(q.is_empty() && q.items.is_empty() && q.head == 0);
        // Skipping the head works the same, and does nothing on an empty queue.
        q.push_back(Expect::Execute { effects: None });
        q.push_back(Expect::Sync);
        q.skip_front();
        assert!(matches!(q.front(), Some(Expect::Sync)) && q.len() == 1);
        q.skip_front();
        assert!(q.is_empty() && q.items.is_empty() && q.head == 0);
        q.skip_front();
        assert!(q.is_empty() && q.head == 0);
        // A pipelining client: always one more owed than answered.
        q.push_back(Expect::Execute { effects: None });
        for i in 0..10_000u32 {
            q.push_back(if i % 2 == 0 {
                Expect::Sync
            } else {
                Expect::Bind { global: None }
            });
            let popped = q.pop_front();
            let want_sync = i % 2 == 1;
            assert!(match popped {
                Some(Expect::Sync) => want_sync,
                Some(Expect::Bind { .. }) => !want_sync,
                Some(Expect::Execute { .. }) => i == 0,
                _ => false,
            });
            assert_eq!(q.len(), 1);
            assert!(q.items.len() <= 130, "grew to {}", q.items.len());
        }
    }

    #[test]
    fn global_names_are_fixed_width_hex() {
        assert_eq!(&global_name(0), b"sg0000000000000000");
        assert_eq!(&global_name(0xdead_beef_0123_4567), b"sgdeadbeef01234567");
    }
}

#[cfg(test)]
mod footprint {
    use super::*;

    /// An idle client is the `run` future (holding the `Session`) plus its socket and task:
    /// keep it well under the 1 KiB per idle client the proxy promises.
    #[test]
    fn idle_session_is_small() {
        let session = std::mem::size_of::<Session>();
        // 112 until slot moves added the cut-over ticket (4 bytes, 8 with alignment).
        assert!(session <= 120, "Session is {session} bytes");
        fn future_size<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        // The run future of a session that is never polled (no socket needed).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            async fn tcp_for_task(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
                tokio::net::TcpStream::connect(addr).await.expect("connect")
            }
            let config = shardgate_config::Config::parse(
                "[[users]]\nname = \"u\"\nauth = \"trust\"\n[[databases]]\nname = \"d\"\n[[databases.shards]]\nhosts = [\"127.0.0.1:1\"]\n",
                "test",
            )
            .expect("config");
            let process = crate::app::Process::new("test".into());
            let app = process.start(config).expect("app");
            let pool = app.pools.values().next().expect("pool").clone();
            let (pid, _, cancel) = app.process.cancels.register(-1, pool.label.clone());
            let s = Session::new(
                app.clone(),
                ClientStream::Plain(tcp),
                pool,
                pid,
                cancel,
                Settings::empty(),
                Arc::new(Reported::default()),
            );
            // A burst's future, which owns the session while it runs, is set up once per
            // transaction (see `SessionTask`): kept small by boxing the rare paths (fan-out,
            // connect, queueing, a paused pool, a slot move's gate). 624 bytes when the
            // waits for a pool and a gate were boxed; 856 before.
            fn output_size<R>(_: fn(Session) -> R) -> usize {
                std::mem::size_of::<R>()
            }
            let burst_size = output_size(Session::into_burst);
            // Unoptimised builds lay futures out less tightly.
            let limit = if cfg!(debug_assertions) { 1024 } else { 640 };
            assert!(burst_size <= limit, "burst future is {burst_size} bytes");
            // The task an idle client runs in (see `SessionTask` for why 152).
            let task = s.task();
            let task_size = future_size(&task);
            let login = crate::startup::login(app.clone(), tcp_for_task(addr).await);
            eprintln!("login future {} B", future_size(&login));
            eprintln!("session {session} B, client task {task_size} B, burst {burst_size} B");
            assert!(task_size <= 152, "client task is {task_size} bytes");
        });
    }
}
