//! Sharded databases: choosing the shard of a transaction, and running what spans shards.
//!
//! A transaction that stays on one shard takes the ordinary path of `session.rs` (one
//! attached connection, the Expect queue, nothing buffered): the only extra work is
//! finding the shard — from the simple query's constants or the Bind values — before
//! checking out. A client's `BEGIN` is answered at once and sent with the transaction's
//! first statement, once the shard is known.
//!
//! Everything else runs here, one client request at a time (a simple query, or an
//! extended-protocol batch up to Sync): the request goes to every shard it needs,
//! concurrently; replies are read to their ReadyForQuery and combined (rows merged as the
//! plan says, command tags summed) into the one answer the client sees. A transaction
//! that has touched several shards keeps a connection on each ("parts") until it ends,
//! and commits them together: with two-phase commit when several of them wrote.
//!
//! Writes that would span shards without two-phase commit are refused before anything is
//! sent, so nothing is ever half-written by shardgate.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use shardgate_router::{
    scan, split_insert, ClientEncoding, ColumnInfo, Kind, MergeParams, Plan, Refusal, Role,
    RowMerger, SimplePlan, Target, TextReading, TxControl, Unreadable,
};

use super::{Buffers, Flow, Held, Session, Stmt};
use crate::cancel::CancelSlot;
use crate::copy_rows::{CopyLine, CopyRows};
use crate::pool::Checkout;
use crate::protocol::{self, body, sqlstate, Reader};
use crate::routing::{Routing, Shards};

/// A transaction block answered but not yet sent anywhere, or one spanning shards.
#[derive(Default)]
pub(super) struct ShardTx {
    /// The client's BEGIN while it is in a transaction block; each shard that joins the
    /// transaction starts with it.
    pub begin: Option<String>,
    /// The BEGIN asked for a read-only transaction (replicas may serve it).
    read_only: bool,
    /// Connections this transaction (or this autocommit request) holds, one per shard.
    pub parts: Vec<Part>,
    /// An error happened in the transaction block: 25P02 until it ends.
    pub failed: bool,
    /// This request is a string of statements that writes: every statement of it, reads
    /// too, runs on a primary inside the string's transaction, as on Postgres.
    string_writes: bool,
    /// Portals bound while running here.
    portals: Vec<Portal>,
}

pub(super) struct Part {
    shard: u32,
    server: Checkout,
    /// A data write ran here in this transaction.
    wrote: bool,
    /// A transaction block is open on this connection.
    in_tx: bool,
    /// The connection's state is unknown (an I/O error mid-exchange, replies unread):
    /// never run anything more on it, never give it back.
    broken: bool,
    /// The connection answered something nobody asked for before it joined this
    /// transaction (`Attached::poisoned`): it may still run the transaction's statements
    /// and its COMMIT, unlike a broken one, but it is closed at the end, not given back.
    poisoned: bool,
    /// Checked out from the shard's primary.
    primary: bool,
}

impl Part {
    /// The next whole message from the shard. A failed read leaves replies unread, so the
    /// connection is marked broken (never reused).
    async fn next_message(&mut self) -> Result<BytesMut, String> {
        match self.server.conn.read_msg().await {
            Ok(n) => Ok(self.server.conn.rbuf.split_to(n)),
            Err(e) => {
                self.broken = true;
                Err(format!("shard {}: {e}", self.shard))
            }
        }
    }
}

struct Portal {
    name: Bytes,
    stmt: Arc<Stmt>,
    /// The Bind body after the portal and statement names.
    rest: Bytes,
}

pub(super) enum Routed {
    /// Answered (or queued for the client) here.
    Done,
    /// Run it on this shard through the ordinary path; `write`: it writes data.
    Shard {
        shard: u32,
        primary: bool,
        write: bool,
    },
}

/// One shard's request, and how to read its reply.
struct Request {
    part: usize,
    bytes: BytesMut,
    /// ReadyForQuery messages that end replies shardgate swallows (a BEGIN sent first).
    hidden: usize,
}

/// What the client should see of one statement run on several shards.
struct Combined {
    out: BytesMut,
    error: Option<Bytes>,
    rows: u64,
}

impl Session {
    fn in_multi(&self) -> bool {
        self.shard_tx.as_ref().is_some_and(|t| !t.parts.is_empty())
    }

    /// The transaction status the client should see now.
    pub(super) fn multi_status(&self) -> u8 {
        match &self.shard_tx {
            Some(t) if t.failed => b'E',
            Some(t) if t.begin.is_some() => b'T',
            _ => b'I',
        }
    }

    /// Routes a simple Query of a sharded database.
    pub(super) async fn route_sharded_query(
        &mut self,
        routing: &Arc<Routing>,
        msg: &Bytes,
        io: &mut Buffers,
    ) -> Result<Routed, Flow> {
        let text = Reader::new(body(msg)).cstr().unwrap_or_default();
        let reading = self.reported.reading();
        let (sql, unreadable) = match routing.statement_text(text, reading) {
            Ok(sql) => (sql, None),
            // Not UTF-8 in a UTF-8 session: the server rejects it wherever it goes.
            Err(Unreadable::Invalid) => {
                let shard = self.attached.as_ref().map_or(0, |a| a.shard);
                return Ok(Routed::Shard {
                    shard,
                    primary: true,
                    write: true,
                });
            }
            Err(Unreadable::Refused(r)) => (Cow::Borrowed(""), Some(r)),
        };
        let sql: &str = &sql;
        let sp = match (unreadable, self.settings.get(SHARD_KEY_SETTING)) {
            (Some(r), _) => SimplePlan {
                plan: Arc::new(Plan::refused(Kind::Write, Role::Primary, r)),
                literals: Vec::new(),
            },
            (None, Some(key)) => SimplePlan {
                plan: routing.plan_hinted(sql, &key),
                literals: Vec::new(),
            },
            (None, None) => routing.plan_simple(sql),
        };
        // A slot move's cut-over: new transactions touching the moving slots wait. A
        // request outside any transaction starts one: it takes a fresh ticket (a busy
        // client may never look idle between its transactions).
        if self.ticket != 0 && self.between_transactions(io) {
            self.leave_ticket();
        }
        loop {
            if self.ticket == 0 {
                self.ticket = routing.state.enter();
            }
            if !routing.state.must_wait(self.ticket)
                || !routing.touches_moving_simple(&sp, sql, reading)
            {
                break;
            }
            // Boxed: rare, and it would otherwise grow every burst's future.
            Box::pin(routing.state.gate.wait_resumed()).await;
        }
        if self.in_multi() {
            Box::pin(self.multi_query(routing, &sp, sql, io)).await?;
            return Ok(Routed::Done);
        }
        let plan = sp.plan.clone();
        if self.attached.is_none() {
            if self.local_tx_control(&plan, sql, io) {
                return Ok(Routed::Done);
            }
            if self.shard_tx.as_ref().is_some_and(|t| t.failed) {
                in_failed_transaction(&mut io.cout);
                return Ok(Routed::Done);
            }
        }
        let shards = match routing.shards_simple(&sp, sql, reading) {
            Ok(s) => Some(s),
            Err(r) => {
                // Boxed: rare, and what it holds would otherwise grow every burst's future.
                Box::pin(self.refused_or_separated(routing, sql, r, io)).await?;
                return Ok(Routed::Done);
            }
        };
        let primary = self.plan_needs_primary(&plan);
        let attached = self.attached.as_ref().map(|a| a.shard);
        // Transaction control, and statements that name no table (SET, SHOW, SELECT 1),
        // belong to whatever shard the transaction is on.
        let single = match (shards, attached) {
            (Some(Shards::One(0)), Some(a)) if plan.tx.is_some() || plan.tables.is_empty() => {
                Some(a)
            }
            (Some(Shards::One(s)), _) => Some(s),
            (Some(Shards::Any), _) => Some(attached.unwrap_or(0)),
            _ => None,
        };
        match (single, attached) {
            (Some(s), Some(a)) if a == s => Ok(Routed::Shard {
                shard: s,
                primary,
                write: plan_writes(&plan),
            }),
            (Some(s), None) => Ok(Routed::Shard {
                shard: s,
                primary,
                write: plan_writes(&plan),
            }),
            _ => {
                if !self.pins.is_empty() || self.changed_session_here() {
                    self.refuse(&pinned_refusal(), io);
                    return Ok(Routed::Done);
                }
                Box::pin(self.enter_multi(io)).await?;
                Box::pin(self.multi_query(routing, &sp, sql, io)).await?;
                Ok(Routed::Done)
            }
        }
    }

    /// Routes a held extended-protocol batch (ending in Sync or Flush) of a sharded
    /// database.
    pub(super) async fn route_sharded_batch(
        &mut self,
        routing: &Arc<Routing>,
        io: &mut Buffers,
    ) -> Result<Routed, Flow> {
        if self.ticket != 0 && self.between_transactions(io) {
            self.leave_ticket();
        }
        loop {
            if self.ticket == 0 {
                self.ticket = routing.state.enter();
            }
            if !routing.state.must_wait(self.ticket) || !self.batch_touches_moving(routing, io) {
                break;
            }
            // Boxed: rare, and it would otherwise grow every burst's future.
            Box::pin(routing.state.gate.wait_resumed()).await;
        }
        if !self.in_multi() {
            match self.batch_target(routing, io) {
                BatchTarget::Local => {
                    self.batch_tx_control(io);
                    return Ok(Routed::Done);
                }
                BatchTarget::One {
                    shard,
                    primary,
                    write,
                } => {
                    let attached = self.attached.as_ref().map(|a| a.shard);
                    if attached.is_none_or(|a| a == shard) {
                        if attached.is_none() && self.shard_tx.as_ref().is_some_and(|t| t.failed) {
                            self.fail_batch(io, None);
                            return Ok(Routed::Done);
                        }
                        return Ok(Routed::Shard {
                            shard,
                            primary,
                            write,
                        });
                    }
                }
                BatchTarget::Many => {}
            }
            if !self.pins.is_empty() || self.changed_session_here() {
                self.fail_batch(io, Some(pinned_refusal()));
                return Ok(Routed::Done);
            }
            Box::pin(self.enter_multi(io)).await?;
        }
        Box::pin(self.multi_batch(routing, io)).await?;
        Ok(Routed::Done)
    }

    /// The attached transaction changed session settings: they live on its connection
    /// only, so the transaction cannot spread to other shards.
    fn changed_session_here(&self) -> bool {
        self.attached
            .as_ref()
            .is_some_and(|a| !a.tx_effects.is_empty())
    }

    /// The session's extra_float_digits (float sums are printed as the session would).
    fn extra_float_digits(&self) -> i32 {
        self.settings
            .get("extra_float_digits")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1)
    }

    fn plan_needs_primary(&self, plan: &Plan) -> bool {
        let read_only_tx = self.shard_tx.as_ref().is_some_and(|t| t.read_only);
        plan.role == Role::Primary
            || (self.shard_tx.as_ref().is_some_and(|t| t.begin.is_some()) && !read_only_tx)
    }

    /// BEGIN, COMMIT and ROLLBACK while no server is held: answered here. True if handled.
    fn local_tx_control(&mut self, plan: &Plan, sql: &str, io: &mut Buffers) -> bool {
        let Some(tx) = &plan.tx else {
            return false;
        };
        if scan::several_statements(sql) {
            return false;
        }
        let out = &mut io.cout;
        match tx {
            TxControl::Begin { read_only } => {
                if self.shard_tx.as_ref().is_some_and(|t| t.begin.is_some()) {
                    notice(
                        out,
                        "WARNING",
                        "25001",
                        "there is already a transaction in progress",
                    );
                } else {
                    self.shard_tx = Some(Box::new(ShardTx {
                        begin: Some(begin_text(self.reported.reading(), sql)),
                        read_only: *read_only && plan.role == Role::Replica,
                        ..Default::default()
                    }));
                }
                protocol::command_complete(out, begin_tag(sql));
                let status = self.multi_status();
                protocol::ready_for_query(out, status);
                true
            }
            TxControl::Commit { chain: false } | TxControl::Rollback { chain: false } => {
                let commit = matches!(tx, TxControl::Commit { .. });
                let tag = match self.shard_tx.take() {
                    Some(t) if t.begin.is_some() => {
                        if commit && !t.failed {
                            "COMMIT"
                        } else {
                            "ROLLBACK"
                        }
                    }
                    _ => {
                        notice(
                            out,
                            "WARNING",
                            "25P01",
                            "there is no transaction in progress",
                        );
                        if commit {
                            "COMMIT"
                        } else {
                            "ROLLBACK"
                        }
                    }
                };
                protocol::command_complete(out, tag);
                protocol::ready_for_query(out, b'I');
                true
            }
            _ => false,
        }
    }

    /// Answers `r` instead of running the statement, as Postgres would answer an error.
    pub(super) fn refuse(&mut self, r: &Refusal, io: &mut Buffers) {
        if let Some(a) = self.attached.as_mut() {
            // Let the server raise it, so that its transaction is aborted exactly as if the
            // statement had failed there.
            let sql = raise_sql(r);
            let expect = super::Expect::Query {
                hidden: false,
                effects: None,
            };
            super::query_to_server(&mut a.server.conn, io, &sql, expect);
            return;
        }
        protocol::error_response(&mut io.cout, "ERROR", r.sqlstate, &r.message);
        if let Some(t) = self.shard_tx.as_mut() {
            if t.begin.is_some() {
                t.failed = true;
            }
        }
        let status = self.multi_status();
        protocol::ready_for_query(&mut io.cout, status);
    }

    /// Moves the attached connection (if any) into a multi-shard transaction.
    async fn enter_multi(&mut self, io: &mut Buffers) -> Result<(), Flow> {
        self.settle(io).await?;
        let tx = self.shard_tx.get_or_insert_with(Default::default);
        if let Some(a) = self.attached.take() {
            // Still the client's: a cancel goes on reaching it, now as a part.
            self.cancel
                .add_part(a.server.conn.id, a.server.conn.cancel_target());
            self.cancel.detach();
            let in_tx = a.status != b'I';
            if in_tx && tx.begin.is_none() {
                tx.begin = Some("BEGIN".into());
            }
            if a.status == b'E' {
                // The transaction already failed there: 25P02 until it ends.
                tx.failed = true;
            }
            tx.parts.push(Part {
                shard: a.shard,
                server: a.server,
                wrote: a.data_write,
                in_tx,
                broken: false,
                poisoned: a.poisoned,
                primary: a.primary,
            });
        }
        Ok(())
    }

    /// Waits until the attached server has answered everything sent to it.
    async fn settle(&mut self, io: &mut Buffers) -> Result<(), Flow> {
        loop {
            if self.flush(io).await.is_err() {
                return Err(Flow::Exit);
            }
            let Some(a) = self.attached.as_mut() else {
                return Ok(());
            };
            if io.expects.is_empty() {
                return Ok(());
            }
            a.server_waiting = false;
            match tokio::io::AsyncReadExt::read_buf(
                &mut a.server.conn.stream,
                &mut a.server.conn.rbuf,
            )
            .await
            {
                Ok(0) | Err(_) => {
                    self.server_lost(io).await;
                    return Err(Flow::Exit);
                }
                Ok(_) => {}
            }
            self.handle_server_messages(io)?;
            self.emit_replies(io);
        }
    }

    /// A connection on `shard` for the current multi-shard transaction; opens the
    /// transaction block there when `begin`.
    async fn part_for(&mut self, shard: u32, primary: bool) -> Result<usize, (String, String)> {
        let tx = self.shard_tx.get_or_insert_with(Default::default);
        if let Some(i) = tx.parts.iter().position(|p| p.shard == shard) {
            let p = &tx.parts[i];
            if p.primary || !primary || p.in_tx {
                return Ok(i);
            }
            // A replica connection (taken for a Describe, say) cannot run a write: swap it.
            let old = tx.parts.remove(i);
            release_part(old, &self.cancel);
        }
        let cancelled = || {
            let message = crate::cancel::CANCELED_BY_USER.to_string();
            (sqlstate::QUERY_CANCELED.to_string(), message)
        };
        if tx.parts.is_empty() && self.attached.is_none() {
            // A new transaction, as in `attach`: the newest configuration, and PAUSE holds it.
            self.follow_reload();
            let unpaused = self.app.process.wait_unpaused(&self.pools.database);
            if self.cancel.unless_cancelled(unpaused).await.is_none() {
                return Err(cancelled());
            }
        }
        let want = self.want(primary, shard);
        let checkout = self
            .pools
            .checkout(shard as usize, want, &self.settings, None);
        let mut server = match self.cancel.unless_cancelled(checkout).await {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                let (code, message) = e.client_error();
                return Err((code, format!("shard {shard}: {message}")));
            }
            None => return Err(cancelled()),
        };
        server.host().metrics.transactions.increment();
        // The client's from here: a cancel reaches it (also the settings below).
        self.cancel
            .add_part(server.conn.id, server.conn.cancel_target());
        let current = server.conn.settings.clone();
        let same = current
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &self.settings));
        if !same {
            for sql in self.settings.sync_sql(current.as_deref()) {
                let failed = match server.conn.run(&sql).await {
                    Ok(None) => continue,
                    Ok(Some(error)) => error,
                    Err(e) => {
                        let (c, m) = e.client_error();
                        (c.to_string(), m)
                    }
                };
                self.cancel.remove_part(server.conn.id);
                server.discard();
                return Err(failed);
            }
            server.conn.settings = Some(self.settings.clone());
        }
        let tx = self.shard_tx.get_or_insert_with(Default::default);
        tx.parts.push(Part {
            shard,
            server,
            wrote: false,
            in_tx: false,
            broken: false,
            poisoned: false,
            primary: want == crate::pool::Want::Primary,
        });
        Ok(tx.parts.len() - 1)
    }

    // ---- simple protocol -------------------------------------------------------------

    async fn multi_query(
        &mut self,
        routing: &Arc<Routing>,
        sp: &SimplePlan,
        sql: &str,
        io: &mut Buffers,
    ) -> Result<(), Flow> {
        let plan = sp.plan.clone();
        let explicit = self.shard_tx.as_ref().is_some_and(|t| t.begin.is_some());
        let failed = self.shard_tx.as_ref().is_some_and(|t| t.failed);
        match &plan.tx {
            Some(TxControl::Commit { .. }) => {
                let tag = if failed { "ROLLBACK" } else { "COMMIT" };
                return self.multi_end(!failed, tag, io).await;
            }
            Some(TxControl::Rollback { .. }) => return self.multi_end(false, "ROLLBACK", io).await,
            Some(TxControl::Begin { .. }) if explicit => {
                notice(
                    &mut io.cout,
                    "WARNING",
                    "25001",
                    "there is already a transaction in progress",
                );
                protocol::command_complete(&mut io.cout, begin_tag(sql));
                let status = self.multi_status();
                protocol::ready_for_query(&mut io.cout, status);
                return Ok(());
            }
            _ => {}
        }
        if failed {
            in_failed_transaction(&mut io.cout);
            return Ok(());
        }
        if let Some(r) = multi_unsupported(&plan, sql) {
            return self.multi_refuse(&r, io).await;
        }
        if scan::several_statements(sql) {
            let Some(statements) = self.separate(routing, sql) else {
                let r = Refusal::unsupported(
                    "several statements in one query string are not supported when they span shards; send them one at a time",
                );
                return self.multi_refuse(&r, io).await;
            };
            return self.multi_statements(routing, sql, statements, io).await;
        }
        if self.multi_statement(routing, sp, sql, io).await? {
            self.multi_unit_end(io, true).await?;
        }
        Ok(())
    }

    /// A simple query refused as a whole: its statements may still run one by one when
    /// only together they span shards; otherwise the refusal stands.
    async fn refused_or_separated(
        &mut self,
        routing: &Arc<Routing>,
        sql: &str,
        refusal: Refusal,
        io: &mut Buffers,
    ) -> Result<(), Flow> {
        let Some(statements) = self.separate(routing, sql) else {
            self.refuse(&refusal, io);
            return Ok(());
        };
        if !self.pins.is_empty() || self.changed_session_here() {
            self.refuse(&pinned_refusal(), io);
            return Ok(());
        }
        self.enter_multi(io).await?;
        self.multi_statements(routing, sql, statements, io).await
    }

    /// Runs the statements of a string one after another, as Postgres runs them: answers
    /// in order, one ReadyForQuery, nothing after the first error. A string that writes
    /// is one transaction on the primaries, reads included (when not inside a block,
    /// multi_unit_end commits it, or rolls it back after an error).
    async fn multi_statements(
        &mut self,
        routing: &Arc<Routing>,
        sql: &str,
        statements: Vec<(std::ops::Range<usize>, Plan)>,
        io: &mut Buffers,
    ) -> Result<(), Flow> {
        let writes = statements.iter().any(|(_, p)| plan_writes(p));
        self.shard_tx
            .get_or_insert_with(Default::default)
            .string_writes = writes;
        // False once a statement ended the request itself (COPY, which
        // separate_statements never lets through; kept safe should that change).
        let mut unit_open = true;
        for (range, plan) in statements {
            if self.shard_tx.as_ref().is_some_and(|t| t.failed) {
                break;
            }
            let text = &sql[range];
            if let Some(r) = multi_unsupported(&plan, text) {
                self.multi_error(&r, io);
                break;
            }
            let sp = SimplePlan {
                plan: Arc::new(plan),
                literals: Vec::new(),
            };
            unit_open = self.multi_statement(routing, &sp, text, io).await?;
            if !unit_open {
                break;
            }
        }
        if let Some(t) = self.shard_tx.as_mut() {
            t.string_writes = false;
        }
        if unit_open {
            self.multi_unit_end(io, true).await?;
        }
        Ok(())
    }

    /// The statements of a multi-statement `sql` that may run one by one when together
    /// they span shards (`separate_statements`); never under a session's shard key hint,
    /// which the separate plans would not carry.
    fn separate(
        &self,
        routing: &Routing,
        sql: &str,
    ) -> Option<Vec<(std::ops::Range<usize>, Plan)>> {
        if self.settings.get(SHARD_KEY_SETTING).is_some() {
            return None;
        }
        routing.separate(sql)
    }

    /// Runs one statement of a request on its shards and queues its answer for the client
    /// (no ReadyForQuery); a refusal or an error fails the transaction. False when it
    /// ended the request itself (COPY FROM STDIN); the caller ends it otherwise.
    async fn multi_statement(
        &mut self,
        routing: &Arc<Routing>,
        sp: &SimplePlan,
        sql: &str,
        io: &mut Buffers,
    ) -> Result<bool, Flow> {
        let plan = sp.plan.clone();
        let reading = self.reported.reading();
        let shards = match routing.shards_simple(sp, sql, reading) {
            Ok(s) => s,
            Err(r) => {
                self.multi_error(&r, io);
                return Ok(true);
            }
        };
        // A statement naming no table (SELECT txid_current(), currval(...)) runs where the
        // transaction already is, as a single statement does in route_sharded_query.
        let shards = match shards {
            Shards::One(0) if plan.tables.is_empty() && plan.tx.is_none() => Shards::Any,
            other => other,
        };
        let list = self.shard_list(&shards, routing);
        // Every COPY FROM STDIN relays the client's data here (split by row into a
        // sharded table, to every shard for a reference table, as is otherwise).
        if plan.kind == Kind::Copy && plan.copy.as_ref().is_some_and(|c| c.from) {
            self.multi_copy_in(routing, &plan, sql, &list, io).await?;
            return Ok(false);
        }
        // A multi-row INSERT spanning shards: each shard gets its own rows.
        let split = match (&plan.target, list.len() > 1) {
            (Target::SplitInsert { .. }, true) => {
                let parts = routing
                    .row_shards_simple(sp, sql, reading)
                    .and_then(|rows| split_insert(sql, &rows).ok());
                match parts {
                    Some(p) => Some(p),
                    None => {
                        let r = Refusal::unsupported(
                            "this multi-row INSERT cannot be split across shards",
                        );
                        self.multi_error(&r, io);
                        return Ok(true);
                    }
                }
            }
            _ => None,
        };
        let texts: Vec<(u32, Cow<'_, str>)> = match &split {
            Some(parts) => parts
                .iter()
                .map(|p| (p.shard, Cow::Borrowed(p.sql.as_str())))
                .collect(),
            None => {
                let text = if list.len() > 1 {
                    sp.rewritten(sql).unwrap_or(Cow::Borrowed(sql))
                } else {
                    Cow::Borrowed(sql)
                };
                if let Some(r) = unsendable(reading, sql, &text) {
                    self.multi_error(&r, io);
                    return Ok(true);
                }
                list.iter().map(|s| (*s, text.clone())).collect()
            }
        };
        let literals: Vec<&str> = sp.literals.iter().map(|l| l.text(sql)).collect();
        let merge_params =
            MergeParams::literals(&literals).with_extra_float_digits(self.extra_float_digits());
        let requests = |_: u32, text: &str, out: &mut BytesMut| {
            protocol::query_bytes(out, &reading.wire_bytes(text))
        };
        let to = PerShard {
            row_shards: split.as_deref().map(row_shards),
            texts,
        };
        self.multi_run(&plan, to, &merge_params, true, requests, io)
            .await?;
        Ok(true)
    }

    /// Shards as a list, `Any` resolved to a shard the transaction already holds.
    fn shard_list(&self, shards: &Shards, routing: &Routing) -> Vec<u32> {
        match shards {
            Shards::Any => {
                let held = self
                    .shard_tx
                    .as_ref()
                    .and_then(|t| t.parts.first())
                    .map(|p| p.shard);
                vec![held.unwrap_or(0)]
            }
            other => other.list(routing.shards()),
        }
    }

    /// Runs one statement on the shards of `texts` and queues the combined answer for the
    /// client (without ReadyForQuery). Refusals and errors mark the transaction failed.
    async fn multi_run(
        &mut self,
        plan: &Plan,
        to: PerShard<'_>,
        merge_params: &MergeParams<'_>,
        describe: bool,
        build: impl Fn(u32, &str, &mut BytesMut),
        io: &mut Buffers,
    ) -> Result<(), Flow> {
        let PerShard { texts, row_shards } = to;
        let texts = &texts[..];
        let explicit = self.shard_tx.as_ref().is_some_and(|t| t.begin.is_some());
        let data_write = plan_writes(plan);
        if data_write {
            let mut written: Vec<u32> = self
                .shard_tx
                .as_ref()
                .map(|t| {
                    t.parts
                        .iter()
                        .filter(|p| p.wrote)
                        .map(|p| p.shard)
                        .collect()
                })
                .unwrap_or_default();
            written.extend(texts.iter().map(|(s, _)| *s));
            written.sort_unstable();
            written.dedup();
            let two_phase = self
                .pools
                .routing
                .as_ref()
                .is_some_and(|r| r.two_phase_commit);
            if written.len() > 1 && !two_phase {
                let r = Refusal::unsupported(format!(
                    "this would write to shards {} in one transaction; set two_phase_commit = true for database \"{}\" to allow writes that span shards",
                    join_shards(&written),
                    self.pools.database
                ));
                self.fail_statement(&r);
                protocol::error_response(&mut io.cout, "ERROR", r.sqlstate, &r.message);
                return Ok(());
            }
        }
        // A write runs in a transaction on each shard it touches, committed together when
        // the unit ends: an extended-protocol batch is one implicit transaction up to its
        // Sync, so a write must not commit before a later message of the batch fails
        // (`INSERT …; INSERT <duplicate key>` keeps neither row on Postgres). Explicit
        // transactions open theirs on each shard that joins.
        let string_writes = self.shard_tx.as_ref().is_some_and(|t| t.string_writes);
        let needs_tx = explicit || data_write || string_writes || self.holds_tx();
        let needs_tx = needs_tx && !plan.no_tx_block;
        let primary = self.plan_needs_primary(plan) || data_write || needs_tx;
        let mut requests = Vec::with_capacity(texts.len());
        for (shard, text) in texts {
            let part = match self.part_for(*shard, primary).await {
                Ok(i) => i,
                Err((code, message)) => {
                    self.fail_statement(&Refusal {
                        sqlstate: "08006",
                        message: message.clone(),
                    });
                    protocol::error_response(&mut io.cout, "ERROR", &code, &message);
                    return Ok(());
                }
            };
            let mut bytes = BytesMut::new();
            let mut hidden = 0;
            let tx = self
                .shard_tx
                .as_mut()
                .expect("part_for made the transaction");
            let p = &mut tx.parts[part];
            if needs_tx && !p.in_tx {
                let begin = tx.begin.as_deref().unwrap_or("BEGIN");
                protocol::query(&mut bytes, begin);
                hidden = 1;
                p.in_tx = true;
            }
            if data_write {
                p.wrote = true;
            }
            build(*shard, text, &mut bytes);
            requests.push(Request {
                part,
                bytes,
                hidden,
            });
        }
        if requests.len() > 1 {
            self.app.metrics.fanout_queries.increment(1);
        }
        if let Some(tx) = self.shard_tx.as_ref() {
            for r in &requests {
                tx.parts[r.part].server.host().metrics.queries.increment();
            }
        }
        let exchanged = self.exchange(plan, requests, merge_params, describe, row_shards);
        let combined = match exchanged.await {
            Ok(c) => c,
            Err(e) => {
                // A shard connection broke mid-statement: its transaction is gone.
                self.fail_statement(&Refusal {
                    sqlstate: "08006",
                    message: e.clone(),
                });
                protocol::error_response(&mut io.cout, "ERROR", sqlstate::CONNECTION_FAILURE, &e);
                return Ok(());
            }
        };
        match combined.error {
            Some(err) => {
                if let Some(t) = self.shard_tx.as_mut() {
                    t.failed = true;
                }
                io.cout.extend_from_slice(&err);
            }
            None => io.cout.extend_from_slice(&combined.out),
        }
        let _ = combined.rows;
        Ok(())
    }

    /// `COPY table FROM STDIN` into a sharded table (each row to its key's shard) or a
    /// reference table (every row to every shard), as one transaction per shard.
    async fn multi_copy_in(
        &mut self,
        routing: &Arc<Routing>,
        plan: &Plan,
        sql: &str,
        list: &[u32],
        io: &mut Buffers,
    ) -> Result<(), Flow> {
        let Some(info) = plan.copy.clone() else {
            return self
                .multi_refuse(&Refusal::unsupported("COPY without options"), io)
                .await;
        };
        let explicit = self.shard_tx.as_ref().is_some_and(|t| t.begin.is_some());
        let written: Vec<u32> = {
            let mut w: Vec<u32> = self
                .shard_tx
                .as_ref()
                .map(|t| {
                    t.parts
                        .iter()
                        .filter(|p| p.wrote)
                        .map(|p| p.shard)
                        .collect()
                })
                .unwrap_or_default();
            w.extend_from_slice(list);
            w.sort_unstable();
            w.dedup();
            w
        };
        let table = plan
            .tables
            .first()
            .map_or("the table", |t| t.as_str())
            .to_string();
        let span_refusal = |shards: &[u32], db: &str| {
            Refusal::unsupported(format!(
                "COPY into {table} writes to shards {}; set two_phase_commit = true for database \"{db}\" to allow writes that span shards",
                join_shards(shards),
            ))
        };
        // Into a reference table every shard gets the rows; into a sharded table, whether
        // rows span shards shows in the data (checked before anything commits).
        if written.len() > 1
            && !routing.two_phase_commit
            && !matches!(plan.target, Target::SplitCopy { .. })
        {
            let r = span_refusal(&written, &self.pools.database);
            return self.multi_refuse(&r, io).await;
        }
        // A reference table gets every row on every shard: one copy's count is the answer.
        let each = plan.target == Target::Each;
        let reading = self.reported.reading();
        // Text and CSV data come in the ENCODING option's encoding when there is one;
        // binary text values in the session's (the server converts them as parameters).
        let data_reading = match &info.encoding {
            Some(e) if info.format != shardgate_router::CopyFormat::Binary => {
                TextReading::new(Some(e), None)
            }
            _ => TextReading {
                legacy_strings: false,
                ..reading
            },
        };
        let split = match &plan.target {
            Target::SplitCopy {
                key_type,
                key_index,
            } => {
                let binary = info.format == shardgate_router::CopyFormat::Binary;
                if !binary && !data_reading.encoding.keeps_ascii() {
                    // Rows are split at ASCII delimiters, quotes and escapes, which a
                    // character of these encodings may contain.
                    let r = Refusal::unsupported(format!(
                        "COPY into sharded table {table} in encoding {} is not supported: its \
                         characters may contain bytes shardgate would read as delimiters; \
                         send the data as UTF8",
                        info.encoding
                            .as_deref()
                            .or_else(|| self.reported.get("client_encoding"))
                            .unwrap_or_default()
                    ));
                    return self.multi_refuse(&r, io).await;
                }
                let key_index = match key_index {
                    Some(i) => *i,
                    None => match self.key_position(routing, plan, list[0]).await {
                        Ok(i) => i,
                        Err((code, message)) => {
                            self.fail_statement(&Refusal::unsupported(message.clone()));
                            protocol::error_response(&mut io.cout, "ERROR", &code, &message);
                            return self.multi_unit_end(io, true).await;
                        }
                    },
                };
                Some((CopyRows::new(&info, key_index), *key_type))
            }
            _ => None,
        };
        // Start the COPY on every shard, each in a transaction.
        let mut parts = Vec::with_capacity(list.len());
        for &shard in list {
            let part = match self.part_for(shard, true).await {
                Ok(i) => i,
                Err((code, message)) => {
                    self.fail_statement(&Refusal::unsupported(message.clone()));
                    protocol::error_response(&mut io.cout, "ERROR", &code, &message);
                    return self.multi_unit_end(io, true).await;
                }
            };
            let tx = self
                .shard_tx
                .as_mut()
                .expect("part_for made the transaction");
            let mut req = BytesMut::new();
            let mut hidden = 0;
            let p = &mut tx.parts[part];
            if !p.in_tx {
                protocol::query(&mut req, tx.begin.as_deref().unwrap_or("BEGIN"));
                hidden = 1;
                p.in_tx = true;
            }
            protocol::query_bytes(&mut req, &reading.wire_bytes(sql));
            if let Err(e) = p.server.conn.send(&req).await {
                p.broken = true;
                let m = format!("shard {shard}: {e}");
                self.fail_statement(&Refusal::unsupported(m.clone()));
                protocol::error_response(&mut io.cout, "ERROR", sqlstate::CONNECTION_FAILURE, &m);
                return self.multi_unit_end(io, true).await;
            }
            parts.push((part, hidden));
        }
        // Each shard answers CopyInResponse (or an error, then ReadyForQuery).
        let mut copy_in: Option<BytesMut> = None;
        let mut error: Option<Bytes> = None;
        let mut copying = vec![false; parts.len()];
        for (k, &(part, hidden)) in parts.iter().enumerate() {
            let tx = self.shard_tx.as_mut().expect("parts exist");
            let p = &mut tx.parts[part];
            let mut hidden = hidden;
            loop {
                let msg = match p.next_message().await {
                    Ok(m) => m,
                    Err(e) => {
                        error.get_or_insert_with(|| error_bytes(sqlstate::CONNECTION_FAILURE, &e));
                        break;
                    }
                };
                match msg[0] {
                    b'Z' if hidden > 0 => hidden -= 1,
                    b'Z' => break,
                    b'E' => {
                        error.get_or_insert_with(|| msg.freeze());
                    }
                    b'G' if hidden == 0 => {
                        copying[k] = true;
                        copy_in.get_or_insert(msg);
                        break;
                    }
                    b'S' => p.server.conn.record_param(body(&msg)),
                    _ => {}
                }
            }
        }
        let Some(copy_in) = copy_in.filter(|_| error.is_none()) else {
            self.copy_abort(&parts, &copying, "COPY failed on another shard")
                .await;
            self.fail_statement(&Refusal::unsupported(String::new()));
            if let Some(e) = error {
                io.cout.extend_from_slice(&e);
            }
            return self.multi_unit_end(io, true).await;
        };
        io.cout.extend_from_slice(&copy_in);
        if self.flush(io).await.is_err() {
            return Err(Flow::Exit);
        }
        // Relay the client's data, row by row to the owning shard.
        let mut outs: Vec<BytesMut> = parts.iter().map(|_| BytesMut::new()).collect();
        // Which shards got rows (a header alone writes nothing).
        let mut got_rows = vec![split.is_none(); parts.len()];
        let mut split = split;
        // Why the copy fails, and the SQLSTATE the client gets.
        let mut client_failed: Option<(String, &str)> = None;
        let max = self.app.config.general.max_client_message_size;
        'client: loop {
            let len = match protocol::frame_len(&io.cin, max) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    self.client_waiting = false;
                    match tokio::io::AsyncReadExt::read_buf(&mut self.client, &mut io.cin).await {
                        Ok(0) | Err(_) => {
                            self.copy_abort(&parts, &copying, "client went away during COPY")
                                .await;
                            return Err(Flow::Exit);
                        }
                        Ok(_) => continue,
                    }
                }
                Err(e) => {
                    client_failed = Some((format!("invalid message from client: {e}"), "57014"));
                    break;
                }
            };
            let msg = io.cin.split_to(len);
            match msg[0] {
                b'd' => {
                    let data = body(&msg);
                    match &mut split {
                        Some((rows, key_type)) => {
                            let mut unread = false;
                            let mut each = |line: CopyLine<'_>| {
                                unread |= !route_copy_line(
                                    line,
                                    routing,
                                    (*key_type, data_reading),
                                    list,
                                    &mut got_rows,
                                    &mut outs,
                                )
                            };
                            if let Err(e) = rows.feed(data, &mut each) {
                                client_failed = Some((e.to_string(), e.sqlstate()));
                                break 'client;
                            }
                            if unread {
                                client_failed = Some((unreadable_copy_key(), "0A000"));
                                break 'client;
                            }
                        }
                        None => {
                            for o in outs.iter_mut() {
                                o.extend_from_slice(data);
                            }
                        }
                    }
                    if outs.iter().any(|o| o.len() >= COPY_CHUNK) {
                        if let Err(e) = self.copy_send(&parts, &mut outs, false).await {
                            client_failed = Some((e, "57014"));
                            break 'client;
                        }
                    }
                }
                b'c' => break,
                b'f' => {
                    let m = Reader::new(body(&msg)).cstr().unwrap_or_default();
                    let text = String::from_utf8_lossy(m);
                    client_failed = Some((format!("COPY from stdin failed: {text}"), "57014"));
                    break;
                }
                b'H' | b'S' => {}
                other => {
                    client_failed = Some((
                        format!("unexpected message type 0x{other:02x} during COPY from stdin"),
                        "57014",
                    ));
                    break;
                }
            }
        }
        if let (None, Some((rows, key_type))) = (&client_failed, &mut split) {
            let mut unread = false;
            let mut each = |line: CopyLine<'_>| {
                let key = (*key_type, data_reading);
                unread |= !route_copy_line(line, routing, key, list, &mut got_rows, &mut outs)
            };
            rows.finish(&mut each);
            if unread {
                client_failed = Some((unreadable_copy_key(), "0A000"));
            }
        }
        if let Some((reason, code)) = client_failed {
            self.copy_abort(&parts, &copying, &reason).await;
            self.fail_statement(&Refusal::unsupported(reason.clone()));
            protocol::error_response(&mut io.cout, "ERROR", code, &reason);
            return self.multi_unit_end(io, true).await;
        }
        // Mark the writers; refuse a span of shards without two-phase commit (nothing has
        // committed: every shard's COPY runs in a transaction).
        if let Some(tx) = self.shard_tx.as_mut() {
            for (k, &(part, _)) in parts.iter().enumerate() {
                if got_rows[k] {
                    tx.parts[part].wrote = true;
                }
            }
        }
        let mut writers: Vec<u32> = self
            .shard_tx
            .as_ref()
            .map(|t| {
                t.parts
                    .iter()
                    .filter(|p| p.wrote)
                    .map(|p| p.shard)
                    .collect()
            })
            .unwrap_or_default();
        writers.sort_unstable();
        if writers.len() > 1 && !routing.two_phase_commit {
            let r = span_refusal(&writers, &self.pools.database);
            self.copy_abort(&parts, &copying, &r.message).await;
            self.fail_statement(&r);
            protocol::error_response(&mut io.cout, "ERROR", r.sqlstate, &r.message);
            return self.multi_unit_end(io, true).await;
        }
        if let Err(e) = self.copy_send(&parts, &mut outs, true).await {
            self.fail_statement(&Refusal::unsupported(e.clone()));
            protocol::error_response(&mut io.cout, "ERROR", sqlstate::CONNECTION_FAILURE, &e);
            return self.multi_unit_end(io, true).await;
        }
        // Every shard's CommandComplete (COPY n), summed (rows split over the shards), or
        // the first one's (rows copied to each).
        let mut total = 0u64;
        let mut error: Option<Bytes> = None;
        for (i, &(part, _)) in parts.iter().enumerate() {
            let tx = self.shard_tx.as_mut().expect("parts exist");
            let p = &mut tx.parts[part];
            loop {
                let msg = match p.next_message().await {
                    Ok(m) => m,
                    Err(e) => {
                        error.get_or_insert_with(|| error_bytes(sqlstate::CONNECTION_FAILURE, &e));
                        break;
                    }
                };
                match msg[0] {
                    b'C' if each && i > 0 => {}
                    b'C' => {
                        let tag = String::from_utf8_lossy(body(&msg));
                        total += tag
                            .trim_end_matches('\0')
                            .rsplit(' ')
                            .next()
                            .and_then(|n| n.parse::<u64>().ok())
                            .unwrap_or(0);
                    }
                    b'E' => {
                        error.get_or_insert_with(|| msg.freeze());
                    }
                    b'Z' => break,
                    _ => {}
                }
            }
        }
        match error {
            Some(e) => {
                self.fail_statement(&Refusal::unsupported(String::new()));
                io.cout.extend_from_slice(&e);
            }
            None => protocol::command_complete(&mut io.cout, &format!("COPY {total}")),
        }
        let _ = explicit;
        self.multi_unit_end(io, true).await
    }

    /// Sends what is buffered for each shard as CopyData, then CopyDone when `done`.
    async fn copy_send(
        &mut self,
        parts: &[(usize, usize)],
        outs: &mut [BytesMut],
        done: bool,
    ) -> Result<(), String> {
        let Some(tx) = self.shard_tx.as_mut() else {
            return Err("no shard connection".into());
        };
        for (k, &(part, _)) in parts.iter().enumerate() {
            let p = &mut tx.parts[part];
            let mut msg = BytesMut::with_capacity(outs[k].len() + 10);
            if !outs[k].is_empty() {
                protocol::write_msg(&mut msg, b'd', |o| o.extend_from_slice(&outs[k]));
                outs[k].clear();
            }
            if done {
                protocol::write_msg(&mut msg, b'c', |_| {});
            }
            if !msg.is_empty() {
                p.server
                    .conn
                    .send(&msg)
                    .await
                    .map_err(|e| format!("shard {}: {e}", p.shard))?;
            }
        }
        Ok(())
    }

    /// Ends a COPY on every shard that started it with CopyFail, and reads the shards to
    /// their ReadyForQuery.
    async fn copy_abort(&mut self, parts: &[(usize, usize)], copying: &[bool], reason: &str) {
        let Some(tx) = self.shard_tx.as_mut() else {
            return;
        };
        for (k, &(part, _)) in parts.iter().enumerate() {
            if !copying.get(k).copied().unwrap_or(false) {
                continue;
            }
            let p = &mut tx.parts[part];
            let mut msg = BytesMut::new();
            protocol::write_msg(&mut msg, b'f', |o| protocol::put_cstr(o, reason.as_bytes()));
            if p.server.conn.send(&msg).await.is_err() {
                continue;
            }
            while let Ok(m) = p.next_message().await {
                if m[0] == b'Z' {
                    break;
                }
            }
        }
    }

    /// The position of the shard key among the table's columns (a COPY that names no
    /// columns sends them all, in table order).
    async fn key_position(
        &mut self,
        routing: &Arc<Routing>,
        plan: &Plan,
        shard: u32,
    ) -> Result<usize, (String, String)> {
        let table = plan.tables.first().cloned().unwrap_or_default();
        let key = routing
            .catalog
            .sharded
            .iter()
            .find(|(name, _)| name.rsplit('.').next() == Some(table.as_str()) || **name == table)
            .map(|(_, t)| t.key_column.clone())
            .ok_or_else(|| {
                (
                    "0A000".to_string(),
                    format!("no shard key known for {table}"),
                )
            })?;
        let part = self.part_for(shard, true).await?;
        let tx = self
            .shard_tx
            .as_mut()
            .expect("part_for made the transaction");
        let sql = format!(
            "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = '{}'::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = ''",
            table.replace('\'', "''")
        );
        let names = query_value(&mut tx.parts[part], &sql).await?;
        names
            .split(',')
            .position(|c| c == key)
            .ok_or_else(|| ("0A000".into(), format!("table {table} has no column {key}")))
    }

    fn holds_tx(&self) -> bool {
        self.shard_tx
            .as_ref()
            .is_some_and(|t| t.parts.iter().any(|p| p.in_tx))
    }

    fn fail_statement(&mut self, _r: &Refusal) {
        if let Some(t) = self.shard_tx.as_mut() {
            t.failed = true;
        }
    }

    async fn multi_refuse(&mut self, r: &Refusal, io: &mut Buffers) -> Result<(), Flow> {
        self.multi_error(r, io);
        self.multi_unit_end(io, true).await
    }

    /// A refused statement: the error for the client, and the transaction fails.
    fn multi_error(&mut self, r: &Refusal, io: &mut Buffers) {
        self.fail_statement(r);
        protocol::error_response(&mut io.cout, "ERROR", r.sqlstate, &r.message);
    }

    /// The end of one client request: outside a transaction block, commit (or roll back,
    /// after an error) what it did and give the connections back. Then ReadyForQuery,
    /// when `ready`.
    async fn multi_unit_end(&mut self, io: &mut Buffers, ready: bool) -> Result<(), Flow> {
        let explicit = self.shard_tx.as_ref().is_some_and(|t| t.begin.is_some());
        if !explicit {
            let ok = !self.shard_tx.as_ref().is_some_and(|t| t.failed);
            if let Err((code, message)) = self.finish_parts(ok).await {
                protocol::error_response(&mut io.cout, "ERROR", &code, &message);
            }
            self.shard_tx = None;
        }
        if ready {
            let status = self.multi_status();
            protocol::ready_for_query(&mut io.cout, status);
        }
        Ok(())
    }

    /// COMMIT / ROLLBACK of a multi-shard transaction block.
    async fn multi_end(&mut self, commit: bool, tag: &str, io: &mut Buffers) -> Result<(), Flow> {
        match self.finish_parts(commit).await {
            Ok(()) => protocol::command_complete(&mut io.cout, tag),
            Err((code, message)) => {
                protocol::error_response(&mut io.cout, "ERROR", &code, &message)
            }
        }
        self.shard_tx = None;
        protocol::ready_for_query(&mut io.cout, b'I');
        Ok(())
    }

    /// Commits (two-phase when several parts wrote) or rolls back every part, then gives
    /// the connections back.
    async fn finish_parts(&mut self, commit: bool) -> Result<(), (String, String)> {
        let Some(tx) = self.shard_tx.as_mut() else {
            return Ok(());
        };
        let mut parts = std::mem::take(&mut tx.parts);
        tx.portals.clear();
        // The statement is over: a cancel from here would hit the COMMIT (or PREPARE and
        // COMMIT PREPARED) of one part and not the others. Postgres does not cancel its
        // own COMMIT either.
        self.cancel.clear_parts();
        parts.sort_by_key(|p| p.shard);
        let writers = parts.iter().filter(|p| p.in_tx && p.wrote).count();
        let node = self.app.config.general.listen.port();
        let result = if commit && writers > 1 {
            two_phase_commit(&mut parts, node).await
        } else {
            let sql = if commit { "COMMIT" } else { "ROLLBACK" };
            let mut first_error = None;
            // The writer (if any) first: a failed COMMIT there leaves nothing committed.
            parts.sort_by_key(|p| !p.wrote);
            for p in parts.iter_mut().filter(|p| p.in_tx && !p.broken) {
                match p.server.conn.run(sql).await {
                    Ok(None) => p.in_tx = false,
                    Ok(Some((code, message))) => {
                        p.in_tx = false;
                        first_error.get_or_insert((code, message));
                        if commit {
                            // The rest must not commit either.
                            return self.abandon(parts, first_error).await;
                        }
                    }
                    Err(e) => {
                        let (c, m) = e.client_error();
                        first_error.get_or_insert((c.to_string(), m));
                    }
                }
            }
            match first_error {
                Some(e) => Err(e),
                None => Ok(()),
            }
        };
        if commit && result.is_ok() && self.app.config.general.read_your_writes {
            // Every shard written (in a transaction block or by an autocommit statement):
            // its replicas serve this client once they have replayed the commit.
            // Asked of all of them at once: the client's reply waits for this round trip.
            let shards = &self.pools.shards;
            let asked = parts.iter_mut().filter(|p| {
                p.wrote && !p.broken && shards[p.shard as usize].topology.hosts.len() > 1
            });
            let positions = futures_util::future::join_all(asked.map(|p| async move {
                let lsn = query_value(p, "SELECT pg_current_wal_lsn()")
                    .await
                    .ok()
                    .and_then(|v| crate::topology::parse_lsn(&v));
                (p.shard, lsn)
            }))
            .await;
            for (shard, lsn) in positions {
                self.writes
                    .get_or_insert_with(Default::default)
                    .set(shard, lsn.unwrap_or(u64::MAX));
            }
        }
        for p in parts {
            release_part(p, &self.cancel);
        }
        result
    }

    /// Rolls back every part still in a transaction and returns `error`.
    async fn abandon(
        &mut self,
        mut parts: Vec<Part>,
        error: Option<(String, String)>,
    ) -> Result<(), (String, String)> {
        for p in parts.iter_mut().filter(|p| p.in_tx && !p.broken) {
            if p.server.conn.run("ROLLBACK").await.is_ok() {
                p.in_tx = false;
            }
        }
        for p in parts {
            release_part(p, &self.cancel);
        }
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends each request, reads every reply to its end, and combines them.
    async fn exchange(
        &mut self,
        plan: &Plan,
        requests: Vec<Request>,
        merge_params: &MergeParams<'_>,
        describe: bool,
        row_shards: Option<Vec<u32>>,
    ) -> Result<Combined, String> {
        let Some(tx) = self.shard_tx.as_mut() else {
            return Err("no shard connection".into());
        };
        // Writes go to one shard after the other, in shard order: two statements that
        // lock rows on the same shards then queue on the first one instead of each
        // holding one shard and waiting for the other (a deadlock no shard can see).
        let serial = plan.role == Role::Primary && requests.len() > 1;
        let mut requests = requests;
        if serial {
            requests.sort_by_key(|r| tx.parts[r.part].shard);
        }
        if !serial {
            for r in &requests {
                let p = &mut tx.parts[r.part];
                if let Err(e) = p.server.conn.send(&r.bytes).await {
                    let m = format!("shard {}: {e}", p.shard);
                    for r in &requests {
                        tx.parts[r.part].broken = true;
                    }
                    return Err(m);
                }
            }
        }
        let mut combine = Combiner::new(plan, requests.len(), merge_params, describe);
        if let Some(rows) = row_shards {
            let shards: Vec<u32> = requests.iter().map(|r| tx.parts[r.part].shard).collect();
            combine.row_order = RowOrder::new(&rows, &shards);
        }
        for (i, r) in requests.iter().enumerate() {
            let p = &mut tx.parts[r.part];
            if serial {
                if let Err(e) = p.server.conn.send(&r.bytes).await {
                    let m = format!("shard {}: {e}", p.shard);
                    for r in &requests {
                        tx.parts[r.part].broken = true;
                    }
                    return Err(m);
                }
            }
            let mut hidden = r.hidden;
            loop {
                let msg = match p.next_message().await {
                    Ok(m) => m.freeze(),
                    Err(m) => {
                        for r in &requests {
                            tx.parts[r.part].broken = true;
                        }
                        return Err(m);
                    }
                };
                match msg[0] {
                    b'S' => {
                        p.server.conn.record_param(body(&msg));
                        continue;
                    }
                    b'Z' => {
                        if hidden > 0 {
                            hidden -= 1;
                            continue;
                        }
                        break;
                    }
                    _ if hidden > 0 => {
                        if msg[0] == b'E' {
                            combine.error(&msg);
                        }
                        continue;
                    }
                    _ => combine.message(i, &msg),
                }
            }
            combine.shard_done(i);
        }
        Ok(combine.finish())
    }

    // ---- extended protocol -------------------------------------------------------------

    /// Where a held batch goes, without running anything.
    fn batch_target(&mut self, routing: &Arc<Routing>, io: &Buffers) -> BatchTarget {
        let mut shard: Option<u32> = self.attached.as_ref().map(|a| a.shard);
        let mut primary = false;
        // Statements parsed in this batch (no allocation for the usual unnamed one).
        let mut local_unnamed: Option<Arc<Stmt>> = None;
        let mut local: Vec<(&[u8], Arc<Stmt>)> = Vec::new();
        let mut tx_control = false;
        let mut others = false;
        let mut write = false;
        for m in io.held.iter() {
            let mut r = Reader::new(body(m));
            match m[0] {
                b'P' => {
                    let Some(name) = r.cstr() else {
                        return BatchTarget::Many;
                    };
                    let tail = &body(m)[r.position()..];
                    let recent = self
                        .prepared
                        .as_deref()
                        .and_then(|p| p.recent_unnamed(tail, self.reported.reading()));
                    // Only its plan is read here: the settings it is prepared under do not
                    // matter.
                    let stmt = recent.cloned().unwrap_or_else(|| {
                        let hasher = &self.app.process.statement_hasher;
                        Arc::new(Stmt::new(
                            Bytes::copy_from_slice(tail),
                            hasher,
                            0,
                            Some(routing),
                            self.reported.reading(),
                        ))
                    });
                    if name.is_empty() {
                        local_unnamed = Some(stmt);
                    } else {
                        local.retain(|(n, _)| **n != *name);
                        local.push((name, stmt));
                    }
                }
                b'B' => {
                    let (Some(_portal), Some(name)) = (r.cstr(), r.cstr()) else {
                        return BatchTarget::Many;
                    };
                    let stmt = if name.is_empty() {
                        local_unnamed.clone()
                    } else {
                        local
                            .iter()
                            .rev()
                            .find(|(n, _)| **n == *name)
                            .map(|(_, s)| s.clone())
                    }
                    .or_else(|| self.client_stmt(name));
                    let Some(stmt) = stmt else {
                        // The server reports the unknown statement.
                        continue;
                    };
                    if stmt.several {
                        // Refused at its Parse (register_parse), never run in part.
                        return BatchTarget::Many;
                    }
                    primary |= stmt.primary;
                    let Some(plan) = self.stmt_plan(routing, &stmt) else {
                        write = true;
                        continue;
                    };
                    let plan = &plan;
                    write |= plan_writes(plan);
                    if plan.tx.is_some() {
                        tx_control = true;
                        continue;
                    }
                    others = true;
                    let rest = &body(m)[r.position()..];
                    let Some(bind) = stmt.bind_values(rest, self.reported.reading()) else {
                        continue;
                    };
                    let s = match routing.shards_bound(plan, &bind) {
                        Ok(Shards::One(s)) => s,
                        Ok(Shards::Any) => shard.unwrap_or(0),
                        // Refusals and fan-outs run (or are answered) in multi mode.
                        _ => return BatchTarget::Many,
                    };
                    match shard {
                        None => shard = Some(s),
                        Some(prev) if prev == s => {}
                        Some(_) => return BatchTarget::Many,
                    }
                }
                _ => {}
            }
        }
        if tx_control && !others && self.attached.is_none() {
            return BatchTarget::Local;
        }
        if tx_control && others && self.attached.is_none() {
            return BatchTarget::Many;
        }
        let primary = primary || self.plan_needs_primary_default();
        BatchTarget::One {
            shard: shard.unwrap_or(0),
            primary,
            write,
        }
    }

    /// During a cut-over: whether a held batch touches the moving slots (rare path: only
    /// for transactions begun after the pause).
    fn batch_touches_moving(&self, routing: &Arc<Routing>, io: &Buffers) -> bool {
        let mut parsed: Vec<(&[u8], Arc<Stmt>)> = Vec::new();
        for m in io.held.iter() {
            let mut r = Reader::new(body(m));
            match m[0] {
                b'P' => {
                    let Some(name) = r.cstr() else {
                        return true;
                    };
                    let tail = &body(m)[r.position()..];
                    let hasher = &self.app.process.statement_hasher;
                    let stmt = Stmt::new(
                        Bytes::copy_from_slice(tail),
                        hasher,
                        0,
                        Some(routing),
                        self.reported.reading(),
                    );
                    parsed.push((name, Arc::new(stmt)));
                }
                b'B' => {
                    let (Some(_portal), Some(name)) = (r.cstr(), r.cstr()) else {
                        return true;
                    };
                    let stmt = parsed
                        .iter()
                        .rev()
                        .find(|(n, _)| *n == name)
                        .map(|(_, s)| s.clone())
                        .or_else(|| self.client_stmt(name));
                    let Some(stmt) = stmt else {
                        continue;
                    };
                    let Some(plan) = self.stmt_plan(routing, &stmt) else {
                        return true;
                    };
                    let rest = &body(m)[r.position()..];
                    match stmt.bind_values(rest, self.reported.reading()) {
                        Some(bind) if !routing.touches_moving_bound(&plan, &bind) => {}
                        _ => return true,
                    }
                }
                _ => {}
            }
        }
        false
    }

    /// A statement's plan, under the session's shard-key hint if it set one.
    fn stmt_plan(&self, routing: &Routing, stmt: &Stmt) -> Option<Arc<Plan>> {
        match self.settings.get(SHARD_KEY_SETTING) {
            Some(key) => Some(routing.plan_hinted(stmt.text(), &key)),
            None => stmt.plan.clone(),
        }
    }

    fn plan_needs_primary_default(&self) -> bool {
        self.shard_tx
            .as_ref()
            .is_some_and(|t| t.begin.is_some() && !t.read_only)
    }

    fn client_stmt(&self, name: &[u8]) -> Option<Arc<Stmt>> {
        let p = self.prepared.as_deref()?;
        if name.is_empty() {
            p.unnamed.clone()
        } else {
            p.named.get(name).cloned()
        }
    }

    /// A batch of transaction control only, while no server is held: answered here.
    fn batch_tx_control(&mut self, io: &mut Buffers) {
        let held = Held::take(io);
        let mut portal_stmt: Option<Arc<Stmt>> = None;
        for m in held.iter() {
            if self.skip_until_sync && m[0] != b'S' {
                continue;
            }
            match m[0] {
                b'P' => {
                    self.register_parse(m, io);
                }
                b'B' => {
                    let mut r = Reader::new(body(m));
                    let _ = r.cstr();
                    let name = r.cstr().unwrap_or_default();
                    portal_stmt = self.client_stmt(name);
                    protocol::empty_msg(&mut io.cout, b'2');
                }
                b'D' => describe_tx_control(Reader::new(body(m)).u8(), &mut io.cout),
                b'E' => {
                    let Some(stmt) = portal_stmt.clone() else {
                        continue;
                    };
                    let Some(plan) = stmt.plan.clone() else {
                        continue;
                    };
                    let sql = stmt.text().to_string();
                    let mut scratch = Buffers::take();
                    if self.local_tx_control(&plan, &sql, &mut scratch) {
                        // Keep the reply without its ReadyForQuery (the Sync gives one).
                        let n = scratch.cout.len().saturating_sub(6);
                        io.cout.extend_from_slice(&scratch.cout[..n]);
                    }
                    scratch.give();
                }
                b'C' => {
                    if let Some(p) = self.prepared.as_mut() {
                        p.close(m);
                    }
                    protocol::empty_msg(&mut io.cout, b'3');
                }
                b'S' => {
                    self.skip_until_sync = false;
                    let status = self.multi_status();
                    protocol::ready_for_query(&mut io.cout, status);
                }
                _ => {}
            }
        }
        held.give_back(io);
    }

    /// Registers a client's Parse as the driver expects; replies ParseComplete (or the
    /// duplicate-name error, then skips to Sync).
    fn register_parse(&mut self, m: &[u8], io: &mut Buffers) {
        let routing = self.pools.routing.clone();
        let parse_key = self.parse_key();
        let reading = self.reported.reading();
        let hasher = &self.app.process.statement_hasher;
        let p = self.prepared.get_or_insert_with(Default::default);
        let mut r = Reader::new(body(m));
        let Some(name) = r.cstr() else {
            return self.multi_fail(io, sqlstate::PROTOCOL_VIOLATION, "invalid Parse message");
        };
        let tail = &body(m)[r.position()..];
        if !name.is_empty() && p.named.contains_key(name) {
            // As on Postgres, the transaction fails here: what the batch wrote before it is
            // rolled back.
            let text = super::duplicate_statement_text(name);
            return self.multi_fail(io, sqlstate::DUPLICATE_PSTATEMENT, &text);
        }
        let stmt = if name.is_empty() {
            // Postgres drops the unnamed statement before it parses the new one.
            p.unnamed = None;
            p.unnamed_global = false;
            p.unnamed_stmt(tail, hasher, parse_key, routing.as_deref(), reading)
                .0
        } else {
            Arc::new(Stmt::new(
                Bytes::copy_from_slice(tail),
                hasher,
                parse_key,
                routing.as_deref(),
                reading,
            ))
        };
        if stmt.several {
            // Never run as its last statement alone (`… ; COMMIT` would commit without
            // the rest): refused as Postgres refuses it.
            return self.multi_fail(
                io,
                sqlstate::SYNTAX_ERROR,
                "cannot insert multiple commands into a prepared statement",
            );
        }
        if self.refused_in_failed_block(&stmt, io) {
            return;
        }
        let Some(p) = self.prepared.as_mut() else {
            return;
        };
        if name.is_empty() {
            p.unnamed = Some(stmt);
        } else {
            p.named.insert(Bytes::copy_from_slice(name), stmt);
        }
        protocol::empty_msg(&mut io.cout, b'1');
    }

    /// Answers every held message of a batch that cannot run with an error (once), as a
    /// server skipping to Sync would.
    fn fail_batch(&mut self, io: &mut Buffers, r: Option<Refusal>) {
        let held = Held::take(io);
        match r {
            Some(r) => protocol::error_response(&mut io.cout, "ERROR", r.sqlstate, &r.message),
            None => in_failed_transaction_error(&mut io.cout),
        }
        if let Some(t) = self.shard_tx.as_mut() {
            if t.begin.is_some() {
                t.failed = true;
            }
        }
        if held.ends_with_sync() {
            let status = self.multi_status();
            protocol::ready_for_query(&mut io.cout, status);
        } else {
            self.skip_until_sync = true;
        }
        held.give_back(io);
    }

    /// Runs a held batch message by message in multi-shard mode.
    async fn multi_batch(&mut self, routing: &Arc<Routing>, io: &mut Buffers) -> Result<(), Flow> {
        let held = Held::take(io);
        for m in held.iter() {
            if self.skip_until_sync {
                if m[0] == b'S' {
                    self.skip_until_sync = false;
                    self.multi_unit_end(io, true).await?;
                }
                continue;
            }
            match m[0] {
                b'P' => self.register_parse(m, io),
                b'B' => self.multi_bind(routing, m, io),
                b'D' => self.multi_describe(routing, m, io).await?,
                b'E' => self.multi_execute(routing, m, io).await?,
                b'C' => {
                    let mut r = Reader::new(body(m));
                    match r.u8() {
                        Some(b'S') => {
                            if let Some(p) = self.prepared.as_mut() {
                                p.close(m);
                            }
                        }
                        _ => {
                            let name = r.cstr().unwrap_or_default();
                            if let Some(t) = self.shard_tx.as_mut() {
                                t.portals.retain(|p| *p.name != *name);
                            }
                        }
                    }
                    protocol::empty_msg(&mut io.cout, b'3');
                }
                b'S' => self.multi_unit_end(io, true).await?,
                _ => {}
            }
        }
        held.give_back(io);
        Ok(())
    }

    /// In a failed block, anything but the COMMIT or ROLLBACK that ends it gets 25P02 and
    /// the batch is skipped to Sync, as on Postgres (psycopg 3 sends its ROLLBACK by the
    /// extended protocol, so Parse and Bind must let it through).
    fn refused_in_failed_block(&mut self, stmt: &Stmt, io: &mut Buffers) -> bool {
        if !self.shard_tx.as_ref().is_some_and(|t| t.failed) || ends_transaction(stmt) {
            return false;
        }
        in_failed_transaction_error(&mut io.cout);
        self.skip_until_sync = true;
        true
    }

    fn multi_fail(&mut self, io: &mut Buffers, code: &str, message: &str) {
        protocol::error_response(&mut io.cout, "ERROR", code, message);
        if let Some(t) = self.shard_tx.as_mut() {
            t.failed = true;
        }
        self.skip_until_sync = true;
    }

    fn multi_bind(&mut self, _routing: &Arc<Routing>, m: &[u8], io: &mut Buffers) {
        let mut r = Reader::new(body(m));
        let (Some(portal), Some(name)) = (r.cstr(), r.cstr()) else {
            return self.multi_fail(io, sqlstate::PROTOCOL_VIOLATION, "invalid Bind message");
        };
        let Some(stmt) = self.client_stmt(name) else {
            let msg = format!(
                "prepared statement \"{}\" does not exist",
                String::from_utf8_lossy(name)
            );
            return self.multi_fail(io, "26000", &msg);
        };
        if self.refused_in_failed_block(&stmt, io) {
            return;
        }
        let rest = Bytes::copy_from_slice(&m[5 + r.position()..]);
        let portal = Portal {
            name: Bytes::copy_from_slice(portal),
            stmt,
            rest,
        };
        let tx = self.shard_tx.get_or_insert_with(Default::default);
        tx.portals.retain(|p| p.name != portal.name);
        tx.portals.push(portal);
        protocol::empty_msg(&mut io.cout, b'2');
    }

    /// Describe: answered by one shard (the statement's or the portal's original text
    /// describes the columns the client will see).
    async fn multi_describe(
        &mut self,
        routing: &Arc<Routing>,
        m: &[u8],
        io: &mut Buffers,
    ) -> Result<(), Flow> {
        let mut r = Reader::new(body(m));
        let kind = r.u8();
        let name = r.cstr().unwrap_or_default();
        let (stmt, rest) = match kind {
            Some(b'S') => (self.client_stmt(name), None),
            _ => {
                let p = self
                    .shard_tx
                    .as_ref()
                    .and_then(|t| t.portals.iter().find(|p| *p.name == *name));
                (p.map(|p| p.stmt.clone()), p.map(|p| p.rest.clone()))
            }
        };
        let Some(stmt) = stmt else {
            let what = if kind == Some(b'S') {
                "prepared statement"
            } else {
                "portal"
            };
            let msg = format!(
                "{what} \"{}\" does not exist",
                String::from_utf8_lossy(name)
            );
            self.multi_fail(io, if kind == Some(b'S') { "26000" } else { "34000" }, &msg);
            return Ok(());
        };
        if ends_transaction(&stmt) {
            // Nothing a server needs to say (and a failed transaction's server would
            // refuse to).
            describe_tx_control(kind, &mut io.cout);
            return Ok(());
        }
        let shard = self
            .shard_tx
            .as_ref()
            .and_then(|t| t.parts.first())
            .map_or(0, |p| p.shard);
        let primary = stmt.primary || self.plan_needs_primary_default();
        let part = match self.part_for(shard, primary).await {
            Ok(i) => i,
            Err((code, message)) => {
                self.multi_fail(io, &code, &message);
                return Ok(());
            }
        };
        let mut req = BytesMut::new();
        super::write_parse(&mut req, b"", &stmt.tail);
        match &rest {
            None => protocol::write_msg(&mut req, b'D', |o| {
                o.put_u8(b'S');
                o.put_u8(0);
            }),
            Some(rest) => {
                protocol::write_msg(&mut req, b'B', |o| {
                    o.put_u8(0);
                    o.put_u8(0);
                    o.put_slice(rest);
                });
                protocol::write_msg(&mut req, b'D', |o| {
                    o.put_u8(b'P');
                    o.put_u8(0);
                });
            }
        }
        protocol::write_msg(&mut req, b'S', |_| {});
        let _ = routing;
        let Some(tx) = self.shard_tx.as_mut() else {
            return Ok(());
        };
        let p = &mut tx.parts[part];
        p.server.conn.unnamed = None;
        if let Err(e) = p.server.conn.send(&req).await {
            p.broken = true;
            self.multi_fail(io, sqlstate::CONNECTION_FAILURE, &e.to_string());
            return Ok(());
        }
        let mut error = None;
        loop {
            let msg = match p.next_message().await {
                Ok(m) => m,
                Err(e) => {
                    self.multi_fail(io, sqlstate::CONNECTION_FAILURE, &e);
                    return Ok(());
                }
            };
            match msg[0] {
                b't' | b'T' | b'n' => io.cout.extend_from_slice(&msg),
                b'E' => error = Some(msg.freeze()),
                b'Z' => break,
                _ => {}
            }
        }
        if let Some(e) = error {
            io.cout.extend_from_slice(&e);
            if let Some(t) = self.shard_tx.as_mut() {
                t.failed = true;
            }
            self.skip_until_sync = true;
        }
        Ok(())
    }

    async fn multi_execute(
        &mut self,
        routing: &Arc<Routing>,
        m: &[u8],
        io: &mut Buffers,
    ) -> Result<(), Flow> {
        let name = Reader::new(body(m)).cstr().unwrap_or_default();
        let portal = self
            .shard_tx
            .as_ref()
            .and_then(|t| t.portals.iter().find(|p| *p.name == *name))
            .map(|p| (p.stmt.clone(), p.rest.clone()));
        let Some((stmt, rest)) = portal else {
            let msg = format!(
                "portal \"{}\" does not exist",
                String::from_utf8_lossy(name)
            );
            self.multi_fail(io, "34000", &msg);
            return Ok(());
        };
        let Some(plan) = self.stmt_plan(routing, &stmt) else {
            self.multi_fail(io, "XX000", "statement has no plan");
            return Ok(());
        };
        let Some(bind) = stmt.bind_values(&rest, self.reported.reading()) else {
            self.multi_fail(io, sqlstate::PROTOCOL_VIOLATION, "invalid Bind message");
            return Ok(());
        };
        if let Some(tx) = &plan.tx {
            let commit = matches!(tx, TxControl::Commit { .. });
            if matches!(tx, TxControl::Commit { .. } | TxControl::Rollback { .. }) {
                let failed = self.shard_tx.as_ref().is_some_and(|t| t.failed);
                let tag = if commit && !failed {
                    "COMMIT"
                } else {
                    "ROLLBACK"
                };
                match self.finish_parts(commit && !failed).await {
                    Ok(()) => protocol::command_complete(&mut io.cout, tag),
                    Err((code, message)) => {
                        protocol::error_response(&mut io.cout, "ERROR", &code, &message)
                    }
                }
                if let Some(t) = self.shard_tx.as_mut() {
                    t.begin = None;
                    t.failed = false;
                }
                return Ok(());
            }
            if let TxControl::Begin { read_only } = tx {
                let t = self.shard_tx.get_or_insert_with(Default::default);
                if t.begin.is_none() {
                    t.begin = Some(begin_text(stmt.reading, stmt.text()));
                    t.read_only = *read_only && plan.role == Role::Replica;
                    protocol::command_complete(&mut io.cout, begin_tag(stmt.text()));
                    return Ok(());
                }
            }
        }
        if self.shard_tx.as_ref().is_some_and(|t| t.failed) {
            in_failed_transaction_error(&mut io.cout);
            self.skip_until_sync = true;
            return Ok(());
        }
        if let Some(r) = multi_unsupported(&plan, stmt.text()) {
            self.multi_fail(io, r.sqlstate, &r.message);
            return Ok(());
        }
        if plan.kind == Kind::Copy {
            let r = Refusal::unsupported(
                "COPY through the extended protocol in a transaction that spans shards is not supported; use a simple query",
            );
            self.multi_fail(io, r.sqlstate, &r.message);
            return Ok(());
        }
        let shards = match routing.shards_bound(&plan, &bind) {
            Ok(s) => s,
            Err(r) => {
                self.multi_fail(io, r.sqlstate, &r.message);
                return Ok(());
            }
        };
        let list = self.shard_list(&shards, routing);
        let sql = stmt.text();
        let split = match (&plan.target, list.len() > 1) {
            (Target::SplitInsert { .. }, true) => {
                let parts = routing
                    .row_shards_bound(&plan, &bind)
                    .and_then(|rows| split_insert(sql, &rows).ok());
                match parts {
                    Some(p) => Some(p),
                    None => {
                        self.multi_fail(
                            io,
                            "0A000",
                            "this multi-row INSERT cannot be split across shards",
                        );
                        return Ok(());
                    }
                }
            }
            _ => None,
        };
        let rewritten: Cow<'_, str> = match (&plan.rewritten, list.len() > 1) {
            (Some(r), true) => Cow::Borrowed(r.as_str()),
            _ => Cow::Borrowed(sql),
        };
        if let Some(r) = unsendable(stmt.reading, sql, &rewritten) {
            self.multi_fail(io, r.sqlstate, &r.message);
            return Ok(());
        }
        let texts: Vec<(u32, Cow<'_, str>)> = match &split {
            Some(parts) => parts
                .iter()
                .map(|p| (p.shard, Cow::Borrowed(p.sql.as_str())))
                .collect(),
            None => list.iter().map(|s| (*s, rewritten.clone())).collect(),
        };
        let (values, formats) = (bind.values(), bind.formats());
        let types = stmt.param_type_oids();
        let merge_params = MergeParams::bind(&values, &formats)
            .with_param_types(&types)
            .with_extra_float_digits(self.extra_float_digits());
        // The rewritten text's helper columns (sent to several shards only).
        let hidden = match (&plan.rewritten, &plan.merge, list.len() > 1) {
            (Some(_), Some(m), true) => m.hidden_columns,
            _ => 0,
        };
        let build = |shard: u32, text: &str, out: &mut BytesMut| {
            let text = &stmt.reading.wire_bytes(text);
            let params: Option<&Vec<usize>> = split
                .as_ref()
                .and_then(|parts| parts.iter().find(|p| p.shard == shard))
                .map(|p| &p.params);
            match params {
                Some(order) if !order.is_empty() => {
                    write_parse_text(
                        out,
                        text,
                        &order
                            .iter()
                            .map(|n| types.get(n - 1).copied().unwrap_or(0))
                            .collect::<Vec<_>>(),
                    );
                    bind.write_bind(out, Some(order), 0);
                }
                Some(_) => {
                    write_parse_text(out, text, &[]);
                    bind.write_bind(out, Some(&Vec::new()), 0);
                }
                None => {
                    write_parse_text(out, text, &types);
                    bind.write_bind(out, None, hidden);
                }
            }
            protocol::write_msg(out, b'D', |o| {
                o.put_u8(b'P');
                o.put_u8(0);
            });
            protocol::write_msg(out, b'E', |o| {
                o.put_u8(0);
                o.put_i32(0);
            });
            protocol::write_msg(out, b'S', |_| {});
        };
        if let Some(tx) = self.shard_tx.as_mut() {
            for p in tx.parts.iter_mut() {
                p.server.conn.unnamed = None;
            }
        }
        let to = PerShard {
            row_shards: split.as_deref().map(row_shards),
            texts,
        };
        self.multi_run(&plan, to, &merge_params, false, build, io)
            .await?;
        if self.shard_tx.as_ref().is_some_and(|t| t.failed) {
            self.skip_until_sync = true;
        }
        Ok(())
    }
}

/// Commits the parts of a transaction that wrote on several shards, atomically: every
/// writer prepares (the coordinator — the lowest written shard — last), then the
/// coordinator commits, then the others. The global id names the coordinator and its
/// transaction id, so after a crash `twophase::recover` can tell from the coordinator
/// alone whether the transaction committed (`txid_status`).
async fn two_phase_commit(parts: &mut [Part], node: u16) -> Result<(), (String, String)> {
    let writers: Vec<usize> = (0..parts.len())
        .filter(|&i| parts[i].in_tx && parts[i].wrote)
        .collect();
    let (coord, others) = match writers.split_first() {
        Some((c, o)) => (*c, o.to_vec()),
        None => return Ok(()),
    };
    let xid = match query_value(&mut parts[coord], "SELECT txid_current()::text").await {
        Ok(x) => x,
        Err(e) => {
            rollback_all(parts, &[], "").await;
            return Err(e);
        }
    };
    let gid = crate::twophase::gid(node, parts[coord].shard, &xid);
    let prepare = format!("PREPARE TRANSACTION '{gid}'");
    let mut prepared: Vec<usize> = Vec::new();
    for &i in &others {
        match run_part(&mut parts[i], &prepare).await {
            Ok(()) => {
                parts[i].in_tx = false;
                prepared.push(i);
            }
            Err(e) => {
                parts[i].in_tx = false;
                rollback_all(parts, &prepared, &gid).await;
                return Err(e);
            }
        }
    }
    if let Err(e) = run_part(&mut parts[coord], &prepare).await {
        parts[coord].in_tx = false;
        rollback_all(parts, &prepared, &gid).await;
        return Err(e);
    }
    parts[coord].in_tx = false;
    crate::twophase::fault("after_prepare");
    let commit = format!("COMMIT PREPARED '{gid}'");
    match run_part(&mut parts[coord], &commit).await {
        Ok(()) => {}
        Err((code, message)) if code == "08006" => {
            // The coordinator's answer was lost: the outcome is decided there, and the
            // next start resolves the others to match.
            return Err((
                "40003".into(),
                format!("the commit outcome is unknown (coordinator shard {} unreachable: {message}); shardgate resolves it when the shard is back", parts[coord].shard),
            ));
        }
        Err(e) => {
            rollback_all(parts, &prepared, &gid).await;
            let rb = format!("ROLLBACK PREPARED '{gid}'");
            let _ = run_part(&mut parts[coord], &rb).await;
            return Err(e);
        }
    }
    crate::twophase::fault("after_first_commit");
    for &i in &prepared {
        if let Err((code, message)) = run_part(&mut parts[i], &commit).await {
            tracing::error!(gid = %gid, shard = parts[i].shard, code = %code, "COMMIT PREPARED failed: {message}; resolved at next start");
        }
    }
    // Parts that only read.
    for p in parts.iter_mut().filter(|p| p.in_tx && !p.broken) {
        if run_part(p, "COMMIT").await.is_ok() {
            p.in_tx = false;
        }
    }
    Ok(())
}

/// Rolls back every part still in a transaction, and the prepared ones.
async fn rollback_all(parts: &mut [Part], prepared: &[usize], gid: &str) {
    let rb = format!("ROLLBACK PREPARED '{gid}'");
    for &i in prepared {
        if let Err((code, message)) = run_part(&mut parts[i], &rb).await {
            tracing::error!(gid = %gid, shard = parts[i].shard, code = %code, "ROLLBACK PREPARED failed: {message}; resolved at next start");
        }
    }
    for p in parts.iter_mut().filter(|p| p.in_tx && !p.broken) {
        if run_part(p, "ROLLBACK").await.is_ok() {
            p.in_tx = false;
        }
    }
}

/// Runs a control statement on a part; connection problems are 08006.
async fn run_part(p: &mut Part, sql: &str) -> Result<(), (String, String)> {
    if p.broken {
        return Err((
            sqlstate::CONNECTION_FAILURE.into(),
            format!("shard {}: connection lost", p.shard),
        ));
    }
    match p.server.conn.run(sql).await {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(e),
        Err(e) => {
            p.broken = true;
            Err((
                sqlstate::CONNECTION_FAILURE.into(),
                format!("shard {}: {e}", p.shard),
            ))
        }
    }
}

/// The first column of the first row of `sql`'s result, as text.
async fn query_value(p: &mut Part, sql: &str) -> Result<String, (String, String)> {
    let mut out = BytesMut::new();
    protocol::query(&mut out, sql);
    let fail = |p: &Part, e: crate::server::ServerError| {
        (
            sqlstate::CONNECTION_FAILURE.to_string(),
            format!("shard {}: {e}", p.shard),
        )
    };
    if let Err(e) = p.server.conn.send(&out).await {
        return Err(fail(p, e));
    }
    let mut value = None;
    let mut error = None;
    loop {
        let msg = p
            .next_message()
            .await
            .map_err(|e| (sqlstate::CONNECTION_FAILURE.to_string(), e))?;
        match msg[0] {
            b'D' if value.is_none() => {
                let mut r = Reader::new(body(&msg));
                let _ = r.i16();
                let len = r.i32().unwrap_or(-1);
                value = (len >= 0)
                    .then(|| r.bytes(len as usize))
                    .flatten()
                    .map(|b| String::from_utf8_lossy(b).into_owned());
            }
            b'E' => {
                let f = protocol::parse_error_fields(body(&msg));
                error = Some((
                    String::from_utf8_lossy(f.code).into_owned(),
                    String::from_utf8_lossy(f.message).into_owned(),
                ));
            }
            b'Z' => break,
            _ => {}
        }
    }
    match (error, value) {
        (Some(e), _) => Err(e),
        (None, Some(v)) => Ok(v),
        (None, None) => Err(("XX000".into(), format!("{sql} returned no value"))),
    }
}

/// The Describe answer of a transaction control statement (`kind` b'S': a statement, else
/// a portal): no parameters, no rows.
fn describe_tx_control(kind: Option<u8>, out: &mut BytesMut) {
    if kind == Some(b'S') {
        protocol::write_msg(out, b't', |o| o.put_i16(0));
    }
    protocol::empty_msg(out, b'n');
}

/// COMMIT or ROLLBACK: what a failed transaction still accepts.
fn ends_transaction(stmt: &Stmt) -> bool {
    stmt.plan.as_deref().is_some_and(|p| {
        matches!(
            p.tx,
            Some(TxControl::Commit { .. } | TxControl::Rollback { .. })
        )
    })
}

/// What a transaction spanning shards refuses: savepoints (they would have to exist on
/// every shard, including ones that join later) and statements that change session state
/// (settings, LISTEN, temporary tables, advisory locks: they would stick to one shard's
/// pooled connection). Refused, the transaction fails, as it would in Postgres.
fn multi_unsupported(plan: &Plan, sql: &str) -> Option<Refusal> {
    if matches!(
        plan.tx,
        Some(
            TxControl::Savepoint(_)
                | TxControl::Release(_)
                | TxControl::RollbackTo(_)
                | TxControl::PrepareTransaction(_)
                | TxControl::CommitPrepared(_)
                | TxControl::RollbackPrepared(_)
        )
    ) {
        return Some(Refusal::unsupported(
            "savepoints and PREPARE TRANSACTION are not supported in a transaction that spans shards",
        ));
    }
    if !shardgate_router::classify(sql).is_empty() {
        return Some(Refusal::unsupported(
            "changing session state (SET, RESET, LISTEN, temporary tables, session advisory locks, ...) is not supported in a transaction that spans shards; do it before the transaction or in its own",
        ));
    }
    None
}

/// Whether a statement writes data (for two-phase commit and its refusal): writes, COPY,
/// and reads that need the primary (write functions, row locks). DDL does not count: it
/// runs shard by shard without two-phase commit.
pub(super) fn plan_writes(plan: &Plan) -> bool {
    matches!(plan.kind, Kind::Write | Kind::Copy)
        || (plan.role == Role::Primary && plan.kind == Kind::Read)
}

enum BatchTarget {
    /// Transaction control only: answered here.
    Local,
    One {
        shard: u32,
        primary: bool,
        write: bool,
    },
    Many,
}

/// `SET shardgate.shard_key = V`: later statements without a key of their own go to V's
/// shard. (A dotted name is a custom setting to Postgres, so servers accept it too.)
const SHARD_KEY_SETTING: &str = "shardgate.shard_key";

/// Appends one line of COPY data to the buffer of the shard that owns its key (a header
/// to every shard). A key that does not read as the key type goes to the first shard,
/// whose server then rejects the row as the COPY would.
/// Sends a row of COPY data to its key's shard (the header and trailer to every shard);
/// false for a text key the data's encoding does not let shardgate read (not sent).
fn route_copy_line(
    line: CopyLine<'_>,
    routing: &Routing,
    (key_type, reading): (shardgate_router::KeyType, TextReading),
    list: &[u32],
    got_rows: &mut [bool],
    outs: &mut [BytesMut],
) -> bool {
    // A row whose key is NULL or does not parse as the key's type goes to the first shard,
    // whose server rejects it (a shard key is NOT NULL in practice) or keeps it as Postgres
    // would.
    let mut to_shard = |row: &[u8], shard: Option<u32>| {
        let shard = shard.unwrap_or(list[0]);
        let k = list.iter().position(|s| *s == shard).unwrap_or(0);
        got_rows[k] = true;
        outs[k].extend_from_slice(row);
    };
    let text = key_type == shardgate_router::KeyType::Text;
    match line {
        CopyLine::All(l) => {
            for o in outs.iter_mut() {
                o.extend_from_slice(l);
            }
        }
        CopyLine::Row(l, key) => {
            let shard = match key {
                // Postgres converts a text row before it undoes its backslash escapes; the
                // key here is already unescaped, so a non-ASCII key in a row with escapes
                // may not be the bytes Postgres converts.
                Some(k)
                    if text
                        && reading.encoding != ClientEncoding::Utf8
                        && !k.is_ascii()
                        && l.contains(&b'\\') =>
                {
                    return false
                }
                Some(k) if text => match reading.text_value(&k) {
                    Some(v) => routing.shard_of_text(key_type, &v),
                    None => return false,
                },
                Some(k) => routing.shard_of_text(key_type, &k),
                None => None,
            };
            to_shard(l, shard);
        }
        CopyLine::Binary(t, key) => {
            let shard = match key {
                Some(k) if text => match reading.text_value(k) {
                    Some(v) => routing.shard_of_binary(key_type, &v),
                    None => return false,
                },
                Some(k) => routing.shard_of_binary(key_type, k),
                None => None,
            };
            to_shard(t, shard);
        }
    }
    true
}

/// A text shardgate rebuilt from the parse tree (a multi-shard rewrite) may hold characters
/// the client never sent (an escape's: `E'\\u00e9'`), which the client's encoding cannot
/// carry back; refused in sessions not in UTF-8 rather than sent changed.
fn unsendable(reading: TextReading, planned: &str, text: &str) -> Option<Refusal> {
    if reading.encoding == ClientEncoding::Utf8 || std::ptr::eq(planned, text) || text.is_ascii() {
        return None;
    }
    let foreign = text.chars().any(|c| !c.is_ascii() && !planned.contains(c));
    foreign.then(|| {
        Refusal::unsupported(
            "this statement cannot be sent across shards in the session's client_encoding \
             (shardgate rewrote it with characters of an escape); use UTF8",
        )
    })
}

fn unreadable_copy_key() -> String {
    format!(
        "cannot route a row of this COPY: {}",
        TextReading::UNREADABLE_KEY
    )
}

/// CopyData is sent to a shard once this much is buffered for it.
const COPY_CHUNK: usize = 64 * 1024;

fn error_bytes(code: &str, message: &str) -> Bytes {
    let mut b = BytesMut::new();
    protocol::error_response(&mut b, "ERROR", code, message);
    b.freeze()
}

/// Closes (or gives back, if clean) every connection of an abandoned transaction.
pub(super) fn discard_parts(tx: ShardTx) {
    for p in tx.parts {
        p.server.discard();
    }
}

/// Gives a part's connection back, or closes it when it is not clean or a cancel of the
/// client may still land there (`CancelSlot::remove_part`).
fn release_part(p: Part, cancel: &CancelSlot) {
    let cancelling = cancel.remove_part(p.server.conn.id);
    if p.in_tx || p.broken || p.poisoned || cancelling {
        p.server.discard();
    } else {
        p.server.release();
    }
}

/// Combines the replies of one statement run on one or several shards.
struct Combiner<'p> {
    out: BytesMut,
    error: Option<Bytes>,
    shards: usize,
    /// Forward a RowDescription (simple protocol; in the extended protocol the client
    /// asks with Describe).
    describe: bool,
    described: bool,
    verb: Option<String>,
    count: u64,
    counted: bool,
    rows: u64,
    merger: Option<RowMerger>,
    merge_error: Option<(&'static str, String)>,
    plan_merge: Option<&'p shardgate_router::MergePlan>,
    params: &'p MergeParams<'p>,
    copy_out: bool,
    /// `Target::Each` (a write to a reference table, kept whole on every shard): every
    /// shard runs it, the client sees one copy's answer, the first shard's (rows, count
    /// and COPY data), not their sum.
    each: bool,
    copy_to: Option<CopyTo>,
    row_order: Option<RowOrder>,
}

/// What one statement sends where: its text for each shard and, for a multi-row INSERT
/// split across shards, the shard of each VALUES row (RETURNING rows go back in order).
struct PerShard<'a> {
    texts: Vec<(u32, Cow<'a, str>)>,
    row_shards: Option<Vec<u32>>,
}

/// The shard of each VALUES row of a split multi-row INSERT, in VALUES order.
fn row_shards(parts: &[shardgate_router::InsertPart]) -> Vec<u32> {
    let mut shards = vec![0; parts.iter().map(|p| p.rows.len()).sum()];
    for p in parts {
        for &r in &p.rows {
            if let Some(s) = shards.get_mut(r) {
                *s = p.shard;
            }
        }
    }
    shards
}

/// RETURNING rows of a multi-row INSERT split across shards, put back in VALUES order (as
/// Postgres returns them, and ORMs rely on: Django's bulk_create matches the returned ids
/// to its objects by position). Each shard returns its part's rows in order, so row `r`
/// is the next unsent row of the shard that got it. Rows a shard did not return (ON
/// CONFLICT DO NOTHING) leave the order unknown: the rest then follows in shard order.
struct RowOrder {
    /// Per VALUES row, the index of the reply (shard) that holds it.
    reply_of: Vec<usize>,
    next: usize,
    held: Vec<std::collections::VecDeque<Bytes>>,
}

impl RowOrder {
    /// `rows`: the shard of each VALUES row; `replies`: the shard of each reply, in the
    /// order the combiner reads them.
    fn new(rows: &[u32], replies: &[u32]) -> Option<RowOrder> {
        let reply_of = rows
            .iter()
            .map(|s| replies.iter().position(|r| r == s))
            .collect::<Option<Vec<usize>>>()?;
        Some(RowOrder {
            reply_of,
            next: 0,
            held: vec![Default::default(); replies.len()],
        })
    }

    /// A DataRow from reply `i`; sends on every row whose turn has come.
    fn row(&mut self, i: usize, msg: &Bytes, out: &mut BytesMut) -> u64 {
        if let Some(q) = self.held.get_mut(i) {
            q.push_back(msg.clone());
        }
        let mut sent = 0;
        while let Some(&i) = self.reply_of.get(self.next) {
            let Some(row) = self.held[i].pop_front() else {
                break;
            };
            out.extend_from_slice(&row);
            self.next += 1;
            sent += 1;
        }
        sent
    }

    /// Whatever is left (rows a shard did not return broke the order), in shard order.
    fn finish(&mut self, out: &mut BytesMut) -> u64 {
        let mut sent = 0;
        for q in &mut self.held {
            for row in q.drain(..) {
                out.extend_from_slice(&row);
                sent += 1;
            }
        }
        sent
    }
}

/// `COPY ... TO STDOUT` from several shards: each sends its own header (the HEADER line,
/// or the binary format's signature) and, in binary, its own trailer. The client gets
/// one header, first, and one trailer, last, around every shard's rows.
struct CopyTo {
    /// Each shard's first CopyData is its HEADER line (text or CSV).
    header_line: bool,
    binary: bool,
    /// Per shard: its first CopyData (the one that starts with its header) has come.
    started: Vec<bool>,
    header_sent: bool,
}

/// The binary COPY signature, flags and header-extension length Postgres sends first.
const BINARY_COPY_HEADER: usize = 11 + 4 + 4;
/// The binary COPY trailer: a tuple field count of -1.
const BINARY_COPY_TRAILER: &[u8] = &[0xff, 0xff];

impl CopyTo {
    fn for_plan(plan: &Plan, shards: usize) -> Option<CopyTo> {
        let c = plan.copy.as_ref().filter(|c| !c.from && shards > 1)?;
        let binary = c.format == shardgate_router::CopyFormat::Binary;
        Some(CopyTo {
            header_line: c.header && !binary,
            binary,
            started: vec![false; shards],
            header_sent: false,
        })
    }

    /// One CopyData message from `shard`.
    fn data(&mut self, shard: usize, msg: &[u8], out: &mut BytesMut) {
        let first = self
            .started
            .get_mut(shard)
            .is_some_and(|s| !std::mem::replace(s, true));
        if first && self.header_line {
            if !std::mem::replace(&mut self.header_sent, true) {
                out.extend_from_slice(msg);
            }
            return;
        }
        if !self.binary {
            out.extend_from_slice(msg);
            return;
        }
        let mut data = body(msg);
        if first {
            let Some((header, rest)) = data.split_at_checked(BINARY_COPY_HEADER) else {
                // Not what Postgres sends: passed on for the client to judge.
                out.extend_from_slice(msg);
                return;
            };
            if !std::mem::replace(&mut self.header_sent, true) {
                protocol::write_msg(out, b'd', |o| o.put_slice(header));
            }
            data = rest;
        }
        // A row starts with its field count, never -1: this is a shard's trailer.
        if data.is_empty() || data == BINARY_COPY_TRAILER {
            return;
        }
        protocol::write_msg(out, b'd', |o| o.put_slice(data));
    }

    fn finish(&self, out: &mut BytesMut) {
        if self.binary && self.header_sent {
            protocol::write_msg(out, b'd', |o| o.put_slice(BINARY_COPY_TRAILER));
        }
    }
}

impl<'p> Combiner<'p> {
    fn new(
        plan: &'p Plan,
        shards: usize,
        params: &'p MergeParams<'p>,
        describe: bool,
    ) -> Combiner<'p> {
        let each = plan.target == Target::Each;
        // One copy's answer needs no merging.
        let plan_merge = plan
            .merge
            .as_ref()
            .filter(|m| shards > 1 && !each && !m.is_concat());
        Combiner {
            out: BytesMut::new(),
            error: None,
            shards,
            describe,
            described: false,
            verb: None,
            count: 0,
            counted: false,
            rows: 0,
            merger: None,
            merge_error: None,
            plan_merge,
            params,
            copy_out: false,
            copy_to: CopyTo::for_plan(plan, shards).filter(|_| !each),
            row_order: None,
            each,
        }
    }

    fn error(&mut self, msg: &Bytes) {
        if self.error.is_none() {
            self.error = Some(msg.clone());
        }
    }

    fn merge_failed(&mut self, e: shardgate_router::MergeError) {
        self.merge_error.get_or_insert((e.sqlstate, e.message));
    }

    fn message(&mut self, shard: usize, msg: &Bytes) {
        if self.each && shard > 0 && matches!(msg[0], b'D' | b'C' | b'd') {
            // Another copy's rows, count or data: the first shard's stand for all.
            return;
        }
        match msg[0] {
            b'E' => self.error(msg),
            b'T' => {
                if let Some(plan) = self.plan_merge {
                    if self.merger.is_none() && self.merge_error.is_none() {
                        let made = ColumnInfo::from_row_description(body(msg))
                            .and_then(|cols| RowMerger::new(plan, &cols, self.shards, self.params));
                        match made {
                            Ok(m) => self.merger = Some(m),
                            Err(e) => self.merge_failed(e),
                        }
                    }
                }
                if self.describe && !self.described {
                    self.described = true;
                    match &self.merger {
                        Some(m) => {
                            if let Err(e) = m.row_description(body(msg), &mut self.out) {
                                self.merge_failed(e);
                            }
                        }
                        None => self.out.extend_from_slice(msg),
                    }
                }
            }
            b'D' => match &mut self.merger {
                Some(m) => {
                    let r = m
                        .push(shard, body(msg))
                        .and_then(|()| m.drain_into(&mut self.out));
                    match r {
                        Ok(n) => self.rows += n as u64,
                        Err(e) => self.merge_failed(e),
                    }
                }
                // The merge could not start: the error is reported at the end.
                None if self.plan_merge.is_some() => {}
                None if self.row_order.is_some() => {
                    if let Some(o) = &mut self.row_order {
                        self.rows += o.row(shard, msg, &mut self.out);
                    }
                }
                None => {
                    self.rows += 1;
                    self.out.extend_from_slice(msg);
                }
            },
            b'C' => {
                if let Some(m) = &mut self.merger {
                    m.finish_shard(shard);
                    match m.drain_into(&mut self.out) {
                        Ok(n) => self.rows += n as u64,
                        Err(e) => self.merge_failed(e),
                    }
                }
                self.tag(body(msg))
            }
            // Once, not once per shard.
            b'I' | b'N' | b'A' if shard == 0 => self.out.extend_from_slice(msg),
            b'H' if !self.copy_out => {
                self.copy_out = true;
                self.out.extend_from_slice(msg);
            }
            b'd' => match &mut self.copy_to {
                Some(c) => c.data(shard, msg, &mut self.out),
                None => self.out.extend_from_slice(msg),
            },
            _ => {}
        }
    }

    fn tag(&mut self, tag: &[u8]) {
        let tag = tag.strip_suffix(&[0]).unwrap_or(tag);
        let text = String::from_utf8_lossy(tag);
        let (verb, n) = match text.rsplit_once(' ') {
            Some((v, n)) => match n.parse::<u64>() {
                Ok(n) => (v.to_string(), Some(n)),
                Err(_) => (text.to_string(), None),
            },
            None => (text.to_string(), None),
        };
        if let Some(n) = n {
            self.count += n;
            self.counted = true;
        }
        if self.verb.is_none() {
            self.verb = Some(verb);
        }
    }

    fn shard_done(&mut self, shard: usize) {
        if let Some(m) = &mut self.merger {
            m.finish_shard(shard);
        }
    }

    fn finish(mut self) -> Combined {
        if let Some(o) = &mut self.row_order {
            self.rows += o.finish(&mut self.out);
        }
        if let Some(m) = &mut self.merger {
            match m.drain_into(&mut self.out) {
                Ok(n) => self.rows += n as u64,
                Err(e) => self.merge_failed(e),
            }
        }
        if self.error.is_none() {
            if let Some((code, msg)) = self.merge_error.take() {
                let mut b = BytesMut::new();
                protocol::error_response(&mut b, "ERROR", code, &msg);
                self.error = Some(b.freeze());
            }
        }
        if self.copy_out {
            if let Some(c) = &self.copy_to {
                c.finish(&mut self.out);
            }
            protocol::write_msg(&mut self.out, b'c', |_| {});
        }
        if let Some(verb) = &self.verb {
            let tag = if self.merger.is_some() && verb == "SELECT" {
                format!("SELECT {}", self.rows)
            } else if self.counted {
                format!("{verb} {}", self.count)
            } else {
                verb.clone()
            };
            protocol::command_complete(&mut self.out, &tag);
        }
        Combined {
            out: self.out,
            error: self.error,
            rows: self.rows,
        }
    }
}

/// An unnamed Parse of `text` (in the client's encoding).
fn write_parse_text(out: &mut BytesMut, text: &[u8], types: &[u32]) {
    protocol::write_msg(out, b'P', |o| {
        o.put_u8(0);
        protocol::put_cstr(o, text);
        o.put_i16(types.len() as i16);
        for t in types {
            o.put_u32(*t);
        }
    });
}

/// A BEGIN's text, kept to begin the transaction on each shard it reaches. Sent as UTF-8
/// text, so in a session in another encoding its non-ASCII characters (in a comment: there
/// is nowhere else for them) become spaces.
fn begin_text(reading: TextReading, planned: &str) -> String {
    if reading.encoding == ClientEncoding::Utf8 || planned.is_ascii() {
        return planned.to_string();
    }
    planned
        .chars()
        .map(|c| if c.is_ascii() { c } else { ' ' })
        .collect()
}

/// `BEGIN` or `START TRANSACTION`, as Postgres tags it.
fn begin_tag(sql: &str) -> &'static str {
    let first = scan::statements(sql)
        .next()
        .unwrap_or(sql)
        .trim_start()
        .get(..5)
        .unwrap_or("");
    if first.eq_ignore_ascii_case("start") {
        "START TRANSACTION"
    } else {
        "BEGIN"
    }
}

fn notice(out: &mut BytesMut, severity: &str, code: &str, message: &str) {
    protocol::write_msg(out, b'N', |b| {
        b.put_u8(b'S');
        protocol::put_cstr(b, severity.as_bytes());
        b.put_u8(b'V');
        protocol::put_cstr(b, severity.as_bytes());
        b.put_u8(b'C');
        protocol::put_cstr(b, code.as_bytes());
        b.put_u8(b'M');
        protocol::put_cstr(b, message.as_bytes());
        b.put_u8(0);
    });
}

fn in_failed_transaction_error(out: &mut BytesMut) {
    protocol::error_response(
        out,
        "ERROR",
        "25P02",
        "current transaction is aborted, commands ignored until end of transaction block",
    );
}

fn in_failed_transaction(out: &mut BytesMut) {
    in_failed_transaction_error(out);
    protocol::ready_for_query(out, b'E');
}

fn pinned_refusal() -> Refusal {
    Refusal::unsupported(
        "this session holds state on one shard (SET in the current transaction, LISTEN, a temporary table, a session advisory lock or a WITH HOLD cursor); statements for other shards must wait until it is released",
    )
}

/// A statement that makes the server raise `r` (aborting its transaction, as a failed
/// statement would).
fn raise_sql(r: &Refusal) -> String {
    let msg = r.message.replace('\'', "''");
    let code = r.sqlstate.replace('\'', "");
    format!(
        "DO $shardgate$ BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{msg}'; END $shardgate$"
    )
}

fn join_shards(shards: &[u32]) -> String {
    let v: Vec<String> = shards.iter().map(u32::to_string).collect();
    v.join(", ")
}
