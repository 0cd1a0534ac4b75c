//! Statements planned by their leading keywords, without the SQL parser: transaction
//! control, session commands, maintenance, cursors; and the fallback for text the parser
//! cannot read.

use crate::catalog::{Catalog, KeyType, TableClass};
use crate::lex::{Lexer, Tok, TokKind};
use crate::types::{KeyExpr, Kind, Plan, Refusal, Role, Target, TxControl};

/// A plan before hints are applied.
#[derive(Debug, Clone)]
pub(crate) struct Draft {
    pub plan: Plan,
    /// Refusal a routing hint overrides (the router cannot see where the data is).
    pub soft: Option<Refusal>,
    /// Refusal no hint overrides.
    pub hard: Option<Refusal>,
    /// Key types of the sharded tables touched, to type a `key=` hint.
    pub key_types: Vec<KeyType>,
    /// The shard-key values the statement pins itself (WHERE, VALUES, subqueries): a
    /// `key=` hint must agree with them, or rows would be read or stored on a shard that
    /// does not own their key.
    pub own_keys: Vec<KeyExpr>,
    /// An INSERT of VALUES rows into a sharded table: its rows' keys decide their shard,
    /// so a `shard=N` hint (which cannot be checked against keys) is refused.
    pub stores_keys: bool,
}

impl Draft {
    pub fn new(kind: Kind, role: Role, target: Target) -> Self {
        Draft {
            plan: Plan::new(kind, role, target),
            soft: None,
            hard: None,
            key_types: Vec::new(),
            own_keys: Vec::new(),
            stores_keys: false,
        }
    }

    pub fn soft(mut self, r: Refusal) -> Self {
        if self.soft.is_none() {
            self.soft = Some(r);
        }
        self
    }
}

struct Words<'a> {
    sql: &'a str,
    toks: Vec<Tok>,
}

impl<'a> Words<'a> {
    fn new(sql: &'a str) -> Self {
        Words {
            sql,
            toks: Lexer::new(sql).collect(),
        }
    }
    fn is(&self, i: usize, kw: &str) -> bool {
        self.toks.get(i).is_some_and(|t| t.is_word(self.sql, kw))
    }
    fn text(&self, i: usize) -> Option<&'a str> {
        self.toks.get(i).map(|t| t.text(self.sql))
    }
    /// Index of the first `a b` word pair at or after `from`.
    fn find_pair(&self, from: usize, a: &str, b: &str) -> Option<usize> {
        (from..self.toks.len()).find(|&i| self.is(i, a) && self.is(i + 1, b))
    }
    fn has_word(&self, kw: &str) -> bool {
        (0..self.toks.len()).any(|i| self.is(i, kw))
    }
}

/// Plans `stmt` by its keywords, or `None` when it needs the parser.
pub(crate) fn fast_path(stmt: &str, catalog: &Catalog) -> Option<Draft> {
    let w = Words::new(stmt);
    let first = w.toks.first().filter(|t| t.kind == TokKind::Word)?;
    let kw = first.text(stmt).to_ascii_lowercase();
    let tx = |role: Role, tx: TxControl| {
        let mut d = Draft::new(Kind::Transaction, role, Target::Default);
        d.plan.tx = Some(tx);
        Some(d)
    };
    let session = |role: Role| Some(Draft::new(Kind::Session, role, Target::Default));
    match kw.as_str() {
        "begin" | "start" => {
            if kw == "start" && !w.is(1, "transaction") {
                return None;
            }
            let read_only = w.find_pair(1, "read", "only").is_some();
            let serializable = w.has_word("serializable");
            let role = if read_only && !serializable {
                Role::Replica
            } else {
                Role::Primary
            };
            tx(role, TxControl::Begin { read_only })
        }
        "commit" | "end" => {
            if w.is(1, "prepared") {
                return tx(Role::Primary, TxControl::CommitPrepared(string_arg(&w, 2)));
            }
            tx(Role::Primary, TxControl::Commit { chain: chain(&w) })
        }
        "rollback" | "abort" => {
            if w.is(1, "prepared") {
                return tx(
                    Role::Primary,
                    TxControl::RollbackPrepared(string_arg(&w, 2)),
                );
            }
            let to = (1..4).find(|&i| w.is(i, "to"));
            match to {
                Some(i) => {
                    let name_at = if w.is(i + 1, "savepoint") {
                        i + 2
                    } else {
                        i + 1
                    };
                    tx(
                        Role::Primary,
                        TxControl::RollbackTo(w.text(name_at).unwrap_or("").to_string()),
                    )
                }
                None => tx(Role::Primary, TxControl::Rollback { chain: chain(&w) }),
            }
        }
        "savepoint" => tx(
            Role::Primary,
            TxControl::Savepoint(w.text(1).unwrap_or("").to_string()),
        ),
        "release" => {
            let at = if w.is(1, "savepoint") { 2 } else { 1 };
            tx(
                Role::Primary,
                TxControl::Release(w.text(at).unwrap_or("").to_string()),
            )
        }
        "prepare" => {
            if w.is(1, "transaction") {
                return tx(
                    Role::Primary,
                    TxControl::PrepareTransaction(string_arg(&w, 2)),
                );
            }
            // SQL-level PREPARE: EXECUTE cannot be routed by key later.
            let mut d = Draft::new(Kind::Session, Role::Primary, Target::Default);
            if let Some(t) = distributed_word(&w, catalog) {
                d = d.soft(Refusal::unsupported(format!(
                    "SQL PREPARE of a statement on distributed table {t} is not supported; use the extended protocol (driver-side prepared statements)"
                )));
            }
            Some(d)
        }
        "execute" => Some(Draft::new(Kind::Session, Role::Primary, Target::Default)),
        "set" => Some(set(&w)),
        "reset" => {
            let mut d = Draft::new(Kind::Session, Role::Replica, Target::Default);
            if w.is(1, "default_transaction_read_only") || w.is(1, "all") {
                d.plan.tx = Some(TxControl::SessionReadOnly(false));
            }
            Some(d)
        }
        "show" | "discard" | "deallocate" => session(Role::Replica),
        "listen" | "unlisten" | "notify" => session(Role::Primary),
        "fetch" | "move" | "close" => {
            Some(Draft::new(Kind::Utility, Role::Primary, Target::Default))
        }
        "checkpoint" => {
            let mut d = Draft::new(Kind::Maintenance, Role::Primary, Target::Each);
            d.plan.no_tx_block = true;
            Some(d)
        }
        "vacuum" | "analyze" | "analyse" => Some(maintenance(&w, catalog, kw == "vacuum")),
        "cluster" | "reindex" => {
            let mut d = Draft::new(Kind::Maintenance, Role::Primary, Target::Each);
            d.plan.no_tx_block = kw == "cluster"
                || w.has_word("concurrently")
                || w.is(1, "database")
                || w.is(1, "system")
                || w.is(1, "schema");
            Some(d)
        }
        "do" | "call" => Some(Draft::new(Kind::Utility, Role::Primary, Target::Default)),
        _ => None,
    }
}

fn chain(w: &Words<'_>) -> bool {
    w.find_pair(1, "and", "chain").is_some()
}

/// The unquoted value of a `'gid'` argument.
fn string_arg(w: &Words<'_>, i: usize) -> String {
    let t = w.text(i).unwrap_or("");
    crate::keys::unquote_plain(t)
        .map(|c| c.into_owned())
        .unwrap_or_else(|| t.to_string())
}

fn set(w: &Words<'_>) -> Draft {
    let mut d = Draft::new(Kind::Session, Role::Replica, Target::Default);
    if w.is(1, "transaction") {
        d.plan.kind = Kind::Transaction;
        if w.find_pair(2, "read", "only").is_some() {
            d.plan.tx = Some(TxControl::SetTransactionReadOnly(true));
        } else if w.find_pair(2, "read", "write").is_some() {
            d.plan.tx = Some(TxControl::SetTransactionReadOnly(false));
        }
        return d;
    }
    if w.is(1, "session") && w.is(2, "characteristics") {
        if w.find_pair(3, "read", "only").is_some() {
            d.plan.tx = Some(TxControl::SessionReadOnly(true));
        } else if w.find_pair(3, "read", "write").is_some() {
            d.plan.tx = Some(TxControl::SessionReadOnly(false));
        }
        return d;
    }
    let at = if w.is(1, "session") { 2 } else { 1 };
    if w.is(at, "default_transaction_read_only") {
        // SET default_transaction_read_only {=|TO} value
        let value = w.text(at + 2).unwrap_or("");
        let value = crate::keys::unquote_plain(value)
            .map(|c| c.into_owned())
            .unwrap_or_else(|| value.to_string())
            .to_ascii_lowercase();
        let flag = match value.as_str() {
            "on" | "true" | "yes" | "1" | "t" | "y" => Some(true),
            "off" | "false" | "no" | "0" | "f" | "n" => Some(false),
            "default" => Some(false),
            _ => None,
        };
        d.plan.tx = flag.map(TxControl::SessionReadOnly);
    }
    d
}

/// VACUUM / ANALYZE: on every shard, unless it names only unsharded tables.
fn maintenance(w: &Words<'_>, catalog: &Catalog, vacuum: bool) -> Draft {
    const OPTIONS: &[&str] = &[
        "vacuum",
        "analyze",
        "analyse",
        "full",
        "freeze",
        "verbose",
        "skip_locked",
    ];
    let mut names: Vec<String> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < w.toks.len() {
        let t = w.toks[i];
        if t.is_punct(w.sql, b'(') {
            depth += 1;
        } else if t.is_punct(w.sql, b')') {
            depth = depth.saturating_sub(1);
        } else if depth == 0 && matches!(t.kind, TokKind::Word | TokKind::QuotedIdent) {
            let text = ident_text(t.text(w.sql));
            let qualified = w.toks.get(i + 1).is_some_and(|n| n.is_punct(w.sql, b'.'));
            if qualified {
                i += 2; // the schema: take the table after the dot
                continue;
            }
            if !OPTIONS.iter().any(|o| text.eq_ignore_ascii_case(o)) {
                names.push(text.to_ascii_lowercase());
            }
        }
        i += 1;
    }
    let distributed = names.iter().any(|n| {
        !matches!(
            catalog.classify(None, n),
            TableClass::Unsharded | TableClass::System
        )
    });
    let target = if names.is_empty() || distributed {
        Target::Each
    } else {
        Target::Default
    };
    let mut d = Draft::new(Kind::Maintenance, Role::Primary, target);
    d.plan.no_tx_block = vacuum;
    d.plan.tables = names;
    d
}

fn ident_text(t: &str) -> String {
    t.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .map(|x| x.replace("\"\"", "\""))
        .unwrap_or_else(|| t.to_string())
}

/// The first word of the text that names a sharded or reference table.
fn distributed_word(w: &Words<'_>, catalog: &Catalog) -> Option<String> {
    w.toks.iter().find_map(|t| {
        if !matches!(t.kind, TokKind::Word | TokKind::QuotedIdent) {
            return None;
        }
        let text = ident_text(t.text(w.sql));
        catalog
            .mentions_distributed_table(&text)
            .then(|| text.to_ascii_lowercase())
    })
}

/// A sharded table's name among the words (see [`distributed_word`]).
fn sharded_word(w: &Words<'_>, catalog: &Catalog) -> Option<String> {
    w.toks.iter().find_map(|t| {
        if !matches!(t.kind, TokKind::Word | TokKind::QuotedIdent) {
            return None;
        }
        let text = ident_text(t.text(w.sql)).to_ascii_lowercase();
        matches!(catalog.classify(None, &text), TableClass::Sharded(_)).then_some(text)
    })
}

/// `CREATE [OR REPLACE] [TEMP] [RECURSIVE] [MATERIALIZED] VIEW` or `CREATE [OR REPLACE] RULE`.
fn creates_view_or_rule(w: &Words<'_>) -> bool {
    let mut i = 1;
    while [
        "or",
        "replace",
        "temp",
        "temporary",
        "recursive",
        "materialized",
    ]
    .iter()
    .any(|kw| w.is(i, kw))
    {
        i += 1;
    }
    w.is(i, "view") || w.is(i, "rule")
}

/// A view or rule is created on every shard with the same definition, and a query on it
/// is routed as a query on an unsharded table (the default shard), which then reads that
/// shard's part of the sharded table only. No hint makes that right.
pub(crate) fn view_refusal(table: &str) -> Refusal {
    Refusal::unsupported(format!(
        "a view or rule over sharded table {table} is not supported: it would be created on \
         every shard and a query on it would read one shard's part of {table}; query the \
         table directly"
    ))
}

/// Text the parser cannot read. DDL goes to every shard (schemas must stay identical);
/// anything else goes to the default shard's primary, unless it names a sharded or
/// reference table, which needs a hint.
pub(crate) fn unparseable(stmt: &str, catalog: &Catalog) -> Draft {
    let w = Words::new(stmt);
    let first = w.text(0).unwrap_or("").to_ascii_lowercase();
    let ddl = matches!(
        first.as_str(),
        "create" | "alter" | "drop" | "comment" | "grant" | "revoke" | "security" | "refresh"
    );
    if ddl {
        let mut d = Draft::new(Kind::Ddl, Role::Primary, Target::Each);
        d.plan.no_tx_block = w.has_word("concurrently");
        if first == "create" && creates_view_or_rule(&w) {
            if let Some(t) = sharded_word(&w, catalog) {
                d.hard = Some(view_refusal(&t));
            }
        }
        return d;
    }
    let mut d = Draft::new(Kind::Unknown, Role::Primary, Target::Default);
    if let Some(t) = distributed_word(&w, catalog) {
        if let TableClass::Sharded(info) = catalog.classify(None, &t) {
            d.key_types.push(info.key_type);
        }
        d.plan.tables.push(t.clone());
        d = d.soft(Refusal::unsupported(format!(
            "shardgate cannot parse this statement and it mentions distributed table {t}; \
             add a /* shardgate: shard=N */ or /* shardgate: key=VALUE */ hint"
        )));
    }
    d
}

/// `FOR NO KEY UPDATE` and `FOR KEY SHARE` (which the parser rejects) read as `FOR UPDATE`
/// and `FOR SHARE`, byte offsets kept. Returns the text to parse and whether it changed.
pub(crate) fn blank_lock_strength(stmt: &str) -> (std::borrow::Cow<'_, str>, bool) {
    let w = Words::new(stmt);
    let mut blanks: Vec<(usize, usize)> = Vec::new();
    for i in 0..w.toks.len() {
        if !w.is(i, "for") {
            continue;
        }
        if w.is(i + 1, "no") && w.is(i + 2, "key") && w.is(i + 3, "update") {
            blanks.push((w.toks[i + 1].start, w.toks[i + 2].end));
        } else if w.is(i + 1, "key") && w.is(i + 2, "share") {
            blanks.push((w.toks[i + 1].start, w.toks[i + 1].end));
        }
    }
    if blanks.is_empty() {
        return (std::borrow::Cow::Borrowed(stmt), false);
    }
    let mut out = stmt.as_bytes().to_vec();
    for (a, b) in blanks {
        for byte in &mut out[a..b] {
            *byte = b' ';
        }
    }
    // Only ASCII words were blanked, so the text stays valid UTF-8.
    match String::from_utf8(out) {
        Ok(s) => (std::borrow::Cow::Owned(s), true),
        Err(_) => (std::borrow::Cow::Borrowed(stmt), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat() -> Catalog {
        Catalog::new()
            .with_sharded("users", "id", KeyType::Int)
            .with_reference("countries")
    }

    fn fast(sql: &str) -> Plan {
        fast_path(sql, &cat()).expect(sql).plan
    }

    #[test]
    fn transaction_control() {
        let p = fast("BEGIN");
        assert_eq!(p.tx, Some(TxControl::Begin { read_only: false }));
        assert_eq!(p.role, Role::Primary);
        let p = fast("begin transaction read only");
        assert_eq!(p.tx, Some(TxControl::Begin { read_only: true }));
        assert_eq!(p.role, Role::Replica);
        let p = fast("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE");
        assert_eq!(p.tx, Some(TxControl::Begin { read_only: true }));
        assert_eq!(p.role, Role::Primary, "hot standbys refuse serializable");
        let p = fast("START TRANSACTION READ WRITE");
        assert_eq!(p.tx, Some(TxControl::Begin { read_only: false }));
        assert_eq!(fast("COMMIT").tx, Some(TxControl::Commit { chain: false }));
        assert_eq!(
            fast("end work").tx,
            Some(TxControl::Commit { chain: false })
        );
        assert_eq!(
            fast("COMMIT AND CHAIN").tx,
            Some(TxControl::Commit { chain: true })
        );
        assert_eq!(
            fast("COMMIT AND NO CHAIN").tx,
            Some(TxControl::Commit { chain: false })
        );
        assert_eq!(
            fast("ROLLBACK").tx,
            Some(TxControl::Rollback { chain: false })
        );
        assert_eq!(fast("abort").tx, Some(TxControl::Rollback { chain: false }));
        assert_eq!(
            fast("ROLLBACK TO SAVEPOINT s1").tx,
            Some(TxControl::RollbackTo("s1".into()))
        );
        assert_eq!(
            fast("ROLLBACK WORK TO s1").tx,
            Some(TxControl::RollbackTo("s1".into()))
        );
        assert_eq!(
            fast("SAVEPOINT s1").tx,
            Some(TxControl::Savepoint("s1".into()))
        );
        assert_eq!(
            fast("RELEASE SAVEPOINT s1").tx,
            Some(TxControl::Release("s1".into()))
        );
        assert_eq!(fast("RELEASE s1").tx, Some(TxControl::Release("s1".into())));
        assert_eq!(
            fast("PREPARE TRANSACTION 'g1'").tx,
            Some(TxControl::PrepareTransaction("g1".into()))
        );
        assert_eq!(
            fast("COMMIT PREPARED 'g1'").tx,
            Some(TxControl::CommitPrepared("g1".into()))
        );
        assert_eq!(
            fast("ROLLBACK PREPARED 'g1'").tx,
            Some(TxControl::RollbackPrepared("g1".into()))
        );
        assert_eq!(
            fast("SET TRANSACTION READ ONLY").tx,
            Some(TxControl::SetTransactionReadOnly(true))
        );
        assert_eq!(
            fast("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ WRITE").tx,
            Some(TxControl::SetTransactionReadOnly(false))
        );
        assert_eq!(
            fast("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").tx,
            None
        );
    }

    #[test]
    fn session_commands() {
        for sql in [
            "SET work_mem = '1MB'",
            "SHOW work_mem",
            "RESET work_mem",
            "DISCARD ALL",
        ] {
            let p = fast(sql);
            assert_eq!(p.kind, Kind::Session, "{sql}");
            assert_eq!(p.role, Role::Replica, "{sql}");
            assert_eq!(p.target, Target::Default, "{sql}");
        }
        assert_eq!(fast("LISTEN chan").role, Role::Primary);
        assert_eq!(fast("NOTIFY chan").role, Role::Primary);
        assert_eq!(
            fast("SET default_transaction_read_only = on").tx,
            Some(TxControl::SessionReadOnly(true))
        );
        assert_eq!(
            fast("set session default_transaction_read_only to 'off'").tx,
            Some(TxControl::SessionReadOnly(false))
        );
        assert_eq!(
            fast("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").tx,
            Some(TxControl::SessionReadOnly(true))
        );
        assert_eq!(
            fast("RESET default_transaction_read_only").tx,
            Some(TxControl::SessionReadOnly(false))
        );
        assert_eq!(fast("SET search_path = x").tx, None);
    }

    #[test]
    fn maintenance_targets() {
        let p = fast("VACUUM ANALYZE users");
        assert_eq!(p.target, Target::Each);
        assert!(p.no_tx_block);
        let p = fast("VACUUM (VERBOSE, ANALYZE) orders");
        assert_eq!(p.target, Target::Default);
        assert_eq!(p.tables, vec!["orders".to_string()]);
        assert_eq!(fast("VACUUM").target, Target::Each);
        let p = fast("ANALYZE public.users (id)");
        assert_eq!(p.target, Target::Each);
        assert!(!p.no_tx_block);
        assert_eq!(fast("ANALYZE orders").target, Target::Default);
        assert!(fast("REINDEX INDEX CONCURRENTLY users_pkey").no_tx_block);
        assert!(fast("CHECKPOINT").no_tx_block);
    }

    #[test]
    fn needs_the_parser() {
        for sql in ["SELECT 1", "START", "UPDATE users SET a = 1", "-- x\n"] {
            assert!(fast_path(sql, &cat()).is_none(), "{sql}");
        }
    }

    #[test]
    fn unparseable_text() {
        let d = unparseable("SELECT * FROM orders FOR NO KEY UPDATE OF x FETCH", &cat());
        assert_eq!(d.plan.target, Target::Default);
        assert_eq!(d.plan.role, Role::Primary);
        assert!(d.soft.is_none());
        let d = unparseable("FROBNICATE users", &cat());
        assert!(d.soft.unwrap().message.contains("users"));
        let d = unparseable("FROBNICATE \"Countries\"", &cat());
        assert!(d.soft.is_some());
        let d = unparseable("DROP INDEX CONCURRENTLY users_idx", &cat());
        assert_eq!(d.plan.target, Target::Each);
        assert!(d.plan.no_tx_block);
        // A table name inside a string literal is not a mention.
        let d = unparseable("FROBNICATE 'users'", &cat());
        assert!(d.soft.is_none());
        // A view or rule the parser cannot read is still seen over a sharded table.
        let d = unparseable(
            "CREATE OR REPLACE TEMP VIEW v AS SELECT * FROM users",
            &cat(),
        );
        assert!(d.hard.unwrap().message.contains("sharded table users"));
        let d = unparseable("CREATE RULE r AS ON INSERT TO users DO NOTHING", &cat());
        assert!(d.hard.is_some());
        let d = unparseable("CREATE VIEW v AS SELECT * FROM countries", &cat());
        assert!(d.hard.is_none());
    }

    #[test]
    fn lock_strength_is_blanked_in_place() {
        let sql = "SELECT * FROM t FOR NO KEY UPDATE; SELECT 1 FOR KEY SHARE";
        let (fixed, changed) = blank_lock_strength(sql);
        assert!(changed);
        assert_eq!(fixed.len(), sql.len());
        assert_eq!(
            fixed,
            "SELECT * FROM t FOR        UPDATE; SELECT 1 FOR     SHARE"
        );
        assert!(!blank_lock_strength("SELECT 'for no key update'").1);
    }
}
