//! What a statement does to the session it runs in.
//!
//! In transaction pooling a client's statements run on whichever server connection is free,
//! so the proxy must know which statements change session state: settings it can replay on
//! another connection (`SET`, `RESET`), and features bound to one server session (LISTEN,
//! session advisory locks, temporary tables, `WITH HOLD` cursors, SQL `PREPARE`, settings it
//! cannot track) for which it keeps the client on its connection ("pins" it) until released.

use std::borrow::Cow;

use crate::scan::{statements, Tokens};

/// Session-bound features; a client holding any stays on its server connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pins(u8);

impl Pins {
    pub const NONE: Pins = Pins(0);
    pub const LISTEN: Pins = Pins(1);
    pub const ADVISORY_LOCK: Pins = Pins(2);
    pub const TEMP_OBJECT: Pins = Pins(4);
    pub const HOLD_CURSOR: Pins = Pins(8);
    pub const SQL_PREPARE: Pins = Pins(16);
    /// Session state the proxy cannot replay (`set_config(...)`, `SET ... FROM CURRENT`,
    /// `SET SESSION CHARACTERISTICS`): only `DISCARD ALL` releases it.
    pub const UNTRACKED: Pins = Pins(32);
    pub const ALL: Pins = Pins(63);

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn contains(self, other: Pins) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn with(self, other: Pins) -> Pins {
        Pins(self.0 | other.0)
    }
    pub fn without(self, other: Pins) -> Pins {
        Pins(self.0 & !other.0)
    }
}

/// Settings `RESET ALL` leaves alone (`DISCARD ALL` resets them).
pub const NOT_RESET_BY_ALL: [&str; 2] = ["role", "session_authorization"];

/// Settings Postgres reads when it parses a statement, so that a prepared statement keeps
/// the meaning they gave it: name resolution (`search_path`, and the role through its
/// `"$user"` entry), literals of date, time, money, array and XML types folded to
/// constants, the lexer's string rules, the bytes of the text itself, and
/// `transform_null_equals`. Two clients that differ in one of these must not share a
/// prepared statement. Others (timeouts, `work_mem`, `application_name`, custom
/// `app.*` settings read by row-level security) only act when a statement runs.
pub const PARSE_TIME_SETTINGS: [&str; 15] = [
    "array_nulls",
    "backslash_quote",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "lc_monetary",
    "role",
    "search_path",
    "session_authorization",
    "session_replication_role",
    "standard_conforming_strings",
    "timezone",
    "timezone_abbreviations",
    "transform_null_equals",
    "xmloption",
];

/// Whether `name` (lower case) is one of `PARSE_TIME_SETTINGS`.
pub fn is_parse_time_setting(name: &str) -> bool {
    PARSE_TIME_SETTINGS.contains(&name)
}

/// One change to a replayable setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingChange {
    /// `SET name = value`; `value` is the SQL text after `=`/`TO`, to be replayed verbatim.
    Set {
        name: String,
        value: String,
    },
    Reset {
        name: String,
    },
    ResetAll,
}

/// Everything a statement (or a `;`-separated list of them) does to the session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionEffects {
    pub settings: Vec<SettingChange>,
    pub pin: Pins,
    pub unpin: Pins,
    /// `DISCARD ALL`: settings, pins and prepared statements are all gone.
    pub discard_all: bool,
    /// `DEALLOCATE ALL`: every prepared statement of the session is gone.
    pub deallocate_all: bool,
    /// Code shardgate cannot read ran (`DO` blocks, `CALL`): it may have changed settings
    /// (`SET` in PL/pgSQL), so the connection's settings count as unknown afterwards.
    pub opaque_code: bool,
    /// A parse-time setting changed until the transaction ends (`SET LOCAL search_path`,
    /// `set_config('TimeZone', ..., true)`): nothing to replay, but statements prepared
    /// after it in the transaction mean something else than for the session's settings.
    pub local_parse_setting: bool,
}

impl SessionEffects {
    /// A session-bound thing is taken: it outlasts a release earlier in the same text
    /// (`UNLISTEN *; LISTEN a` still listens). A release after it stays in `unpin`, and
    /// `pin` keeps it too, for when the text fails before the release ran.
    pub fn take(&mut self, p: Pins) {
        self.pin = self.pin.with(p);
        self.unpin = self.unpin.without(p);
    }

    pub fn is_empty(&self) -> bool {
        self.settings.is_empty()
            && self.pin.is_empty()
            && self.unpin.is_empty()
            && !self.discard_all
            && !self.deallocate_all
            && !self.opaque_code
            // Nothing to replay, but the rest of the transaction reads names, literals
            // and text differently, on this connection only: a sharded transaction must
            // not spread to other shards after it.
            && !self.local_parse_setting
    }

    /// Whether the statement may change a setting that `PARSE_TIME_SETTINGS` lists, for
    /// the session or the transaction.
    pub fn changes_parsing(&self) -> bool {
        self.local_parse_setting
            || self.opaque_code
            || self.settings.iter().any(|c| match c {
                SettingChange::Set { name, .. } | SettingChange::Reset { name } => {
                    is_parse_time_setting(name)
                }
                SettingChange::ResetAll => true,
            })
    }
}

/// Classifies `sql`. Costs one pass over the text and allocates only for `SET`/`RESET`.
pub fn classify(sql: &str) -> SessionEffects {
    let mut effects = SessionEffects::default();
    for stmt in statements(sql) {
        classify_statement(stmt, &mut effects);
    }
    effects
}

fn classify_statement(stmt: &str, fx: &mut SessionEffects) {
    let mut toks = Tokens::new(stmt);
    let Some(first) = toks.next() else { return };
    let kw = |t: &str, k: &str| t.eq_ignore_ascii_case(k);
    if kw(first, "set") {
        classify_set(&mut toks, fx);
    } else if kw(first, "reset") {
        match toks.next() {
            Some(t) if kw(t, "all") => fx.settings.push(SettingChange::ResetAll),
            Some(t) if kw(t, "time") => fx.settings.push(SettingChange::Reset {
                name: "timezone".into(),
            }),
            Some(t) if kw(t, "session") => fx.settings.push(SettingChange::Reset {
                name: "session_authorization".into(),
            }),
            Some(t) => {
                if let Some(name) = setting_name(t, &mut toks) {
                    fx.settings.push(SettingChange::Reset { name });
                }
            }
            None => {}
        }
    } else if kw(first, "discard") {
        match toks.next() {
            Some(t) if kw(t, "all") => {
                fx.discard_all = true;
                fx.settings.push(SettingChange::ResetAll);
                for name in NOT_RESET_BY_ALL {
                    fx.settings.push(SettingChange::Reset { name: name.into() });
                }
                fx.unpin = fx.unpin.with(Pins::ALL);
                fx.pin = Pins::NONE;
            }
            Some(t) if kw(t, "temp") || kw(t, "temporary") => {
                fx.unpin = fx.unpin.with(Pins::TEMP_OBJECT)
            }
            _ => {}
        }
    } else if (kw(first, "select") || kw(first, "with") || first == "(") && mentions_into(stmt) {
        // SELECT ... INTO [TEMP|TEMPORARY] [TABLE] t creates a table; a temporary one pins.
        let mut prev = "";
        for t in toks.by_ref() {
            if kw(prev, "into") && (kw(t, "temp") || kw(t, "temporary") || in_temp_schema(t)) {
                fx.take(Pins::TEMP_OBJECT);
                break;
            }
            prev = t;
        }
    } else if kw(first, "listen") {
        fx.take(Pins::LISTEN);
    } else if kw(first, "unlisten") {
        if toks.next() == Some("*") {
            fx.unpin = fx.unpin.with(Pins::LISTEN);
        }
    } else if kw(first, "create") {
        // CREATE [OR REPLACE] [GLOBAL|LOCAL] {TEMP|TEMPORARY} ..., or an object created in
        // the session's temporary schema by name: CREATE TABLE pg_temp.t, CREATE VIEW
        // pg_temp_3.v (a view on a temporary table lands there too).
        for (i, t) in toks.by_ref().enumerate() {
            if (i < 4 && (kw(t, "temp") || kw(t, "temporary"))) || in_temp_schema(t) {
                fx.take(Pins::TEMP_OBJECT);
                break;
            }
            if i >= 8 {
                break;
            }
        }
    } else if kw(first, "declare") {
        let mut prev = "";
        for t in toks.by_ref() {
            if kw(prev, "with") && kw(t, "hold") {
                fx.take(Pins::HOLD_CURSOR);
                break;
            }
            if kw(t, "for") {
                break;
            }
            prev = t;
        }
    } else if kw(first, "close") {
        if toks.next().is_some_and(|t| kw(t, "all")) {
            fx.unpin = fx.unpin.with(Pins::HOLD_CURSOR);
        }
    } else if kw(first, "do") || kw(first, "call") {
        fx.opaque_code = true;
    } else if kw(first, "prepare") {
        fx.take(Pins::SQL_PREPARE);
    } else if kw(first, "deallocate") {
        let mut t = toks.next();
        if t.is_some_and(|t| kw(t, "prepare")) {
            t = toks.next();
        }
        if t.is_some_and(|t| kw(t, "all")) {
            fx.deallocate_all = true;
            fx.unpin = fx.unpin.with(Pins::SQL_PREPARE);
        }
    }
    classify_calls(stmt, fx);
}

/// The name in `DEALLOCATE [PREPARE] name` when that is all `sql` says (one statement, not
/// `ALL`), as Postgres reads it: an unquoted name folds to lower case, a quoted one is
/// unquoted. `None` for anything else.
pub fn deallocated_name(sql: &str) -> Option<Cow<'_, str>> {
    let kw = |t: &str, k: &str| t.eq_ignore_ascii_case(k);
    // Most texts stop at their first word, before the split scans them whole.
    if !Tokens::new(sql).next().is_some_and(|t| kw(t, "deallocate")) {
        return None;
    }
    let mut stmts = statements(sql);
    let stmt = stmts.next()?;
    if stmts.next().is_some() {
        return None;
    }
    let mut toks = Tokens::new(stmt);
    toks.next();
    let mut name = toks.next()?;
    if kw(name, "prepare") {
        if let Some(next) = toks.next() {
            name = next;
        }
    }
    if toks.next().is_some() || kw(name, "all") {
        return None;
    }
    if let Some(quoted) = name.strip_prefix('"') {
        let inner = quoted.strip_suffix('"')?;
        return Some(match inner.contains("\"\"") {
            true => Cow::Owned(inner.replace("\"\"", "\"")),
            false => Cow::Borrowed(inner),
        });
    }
    if !name.bytes().all(crate::scan::is_word_byte) {
        return None;
    }
    Some(match name.bytes().any(|b| b.is_ascii_uppercase()) {
        true => Cow::Owned(name.to_ascii_lowercase()),
        false => Cow::Borrowed(name),
    })
}

/// `SET [SESSION] name {TO|=} value`, `SET TIME ZONE value`; `SET LOCAL`, `SET TRANSACTION`
/// and `SET CONSTRAINTS` end with the transaction and change nothing here.
fn classify_set(toks: &mut Tokens<'_>, fx: &mut SessionEffects) {
    let kw = |t: &str, k: &str| t.eq_ignore_ascii_case(k);
    let mut t = toks.next();
    if t.is_some_and(|t| kw(t, "session")) {
        t = toks.next();
        if t.is_some_and(|t| kw(t, "characteristics") || kw(t, "authorization")) {
            if t.is_some_and(|t| kw(t, "authorization")) {
                let value = toks.rest().to_string();
                fx.settings.push(SettingChange::Set {
                    name: "session_authorization".into(),
                    value,
                });
            } else {
                fx.take(Pins::UNTRACKED);
            }
            return;
        }
    }
    let Some(t) = t else { return };
    if kw(t, "local") {
        fx.local_parse_setting |= match toks.next() {
            // TIME ZONE, ROLE, SESSION AUTHORIZATION, SCHEMA (search_path), NAMES
            // (client_encoding), XML OPTION.
            Some(t)
                if ["time", "role", "session", "schema", "names", "xml"]
                    .iter()
                    .any(|k| kw(t, k)) =>
            {
                true
            }
            Some(t) => setting_name(t, toks).is_some_and(|n| is_parse_time_setting(&n)),
            None => false,
        };
        return;
    }
    if kw(t, "transaction") || kw(t, "constraints") {
        return;
    }
    if kw(t, "time") {
        if toks.next().is_some_and(|z| kw(z, "zone")) {
            let value = toks.rest();
            let first = value.split_ascii_whitespace().next().unwrap_or("");
            if kw(value, "local") || kw(value, "default") {
                fx.settings.push(SettingChange::Reset {
                    name: "timezone".into(),
                });
            } else if kw(first, "interval") {
                // `SET TIME ZONE INTERVAL '+02:00' HOUR TO MINUTE` has no `SET timezone =`
                // form to replay it with: keep the client on its connection.
                fx.take(Pins::UNTRACKED);
            } else {
                fx.settings.push(SettingChange::Set {
                    name: "timezone".into(),
                    value: value.to_string(),
                });
            }
        }
        return;
    }
    // `SET NAMES 'LATIN1'` is `SET client_encoding`, which routing reads text with.
    if kw(t, "names") {
        let value = toks.rest();
        fx.settings
            .push(if value.is_empty() || kw(value, "default") {
                SettingChange::Reset {
                    name: "client_encoding".into(),
                }
            } else {
                SettingChange::Set {
                    name: "client_encoding".into(),
                    value: value.to_string(),
                }
            });
        return;
    }
    if kw(t, "role") {
        let value = toks.rest().to_string();
        fx.settings.push(SettingChange::Set {
            name: "role".into(),
            value,
        });
        return;
    }
    let Some(name) = setting_name(t, toks) else {
        fx.take(Pins::UNTRACKED);
        return;
    };
    match toks.next() {
        Some(op) if op == "=" || kw(op, "to") => {
            let value = toks.rest().to_string();
            if value.is_empty() {
                return; // a syntax error; the server will say so
            }
            fx.settings.push(SettingChange::Set { name, value });
        }
        // SET name FROM CURRENT, or something we do not understand: keep the client on
        // its connection rather than guess.
        _ => fx.take(Pins::UNTRACKED),
    }
}

/// A setting name: `ident` or `ident.ident`, folded to lower case as Postgres does for
/// unquoted names. Quoted names are kept only when they are plain identifiers.
fn setting_name(first: &str, toks: &mut Tokens<'_>) -> Option<String> {
    let mut name = ident(first)?;
    let rest = toks.rest();
    if rest.starts_with('.') {
        toks.next();
        let part = ident(toks.next()?)?;
        name.push('.');
        name.push_str(&part);
    }
    Some(name)
}

/// Setting names are case-insensitive in Postgres, quoted or not.
fn ident(tok: &str) -> Option<String> {
    let text = tok
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(tok);
    let plain = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !text.as_bytes()[0].is_ascii_digit();
    if !plain {
        return None;
    }
    Some(text.to_ascii_lowercase())
}

/// Function calls that bind state to the session. Only statements with a `(` can call one,
/// which keeps the common case to one `memchr`-like scan.
fn classify_calls(stmt: &str, fx: &mut SessionEffects) {
    if !stmt.as_bytes().contains(&b'(') {
        return;
    }
    let mut toks = Tokens::new(stmt);
    while let Some(t) = toks.next() {
        if !t.starts_with(|c: char| c.is_ascii_alphabetic() || c == '"') {
            continue;
        }
        let lower = |k: &str| t.eq_ignore_ascii_case(k);
        if lower("pg_advisory_lock")
            || lower("pg_advisory_lock_shared")
            || lower("pg_try_advisory_lock")
            || lower("pg_try_advisory_lock_shared")
        {
            fx.take(Pins::ADVISORY_LOCK);
        } else if lower("pg_advisory_unlock_all") {
            fx.unpin = fx.unpin.with(Pins::ADVISORY_LOCK);
        } else if lower("set_config") || lower("\"set_config\"") {
            if !is_local_set_config(toks.clone()) {
                fx.take(Pins::UNTRACKED);
            } else {
                // A name that is not a literal may be any setting.
                let name = set_config_name(toks.clone());
                fx.local_parse_setting |= name.map_or(true, |n| is_parse_time_setting(&n));
            }
        }
    }
}

/// After `set_config`: whether its third argument is the literal `true` (the setting ends
/// with the transaction, as the common row-level-security `set_config('app.tenant', $1,
/// true)` does), so nothing is left on the session. Anything else may be.
fn is_local_set_config(mut toks: Tokens<'_>) -> bool {
    if toks.next() != Some("(") {
        return false;
    }
    let mut depth = 0u32;
    let mut commas = 0u32;
    // Tokens of the third argument so far, and whether the one seen was `true`.
    let (mut third, mut third_true) = (0u32, false);
    for t in toks {
        match t {
            ")" if depth == 0 => return commas == 2 && third == 1 && third_true,
            "," if depth == 0 => {
                commas += 1;
                continue;
            }
            "(" => depth += 1,
            ")" => depth -= 1,
            _ => {}
        }
        if commas == 2 {
            third += 1;
            third_true = t.eq_ignore_ascii_case("true");
        }
    }
    false
}

/// After `set_config`: the setting its first argument names when that is a string
/// literal, in lower case; `None` for anything else (a parameter, an expression).
fn set_config_name(mut toks: Tokens<'_>) -> Option<String> {
    if toks.next() != Some("(") {
        return None;
    }
    let lit = toks.next()?.strip_prefix('\'')?.strip_suffix('\'')?;
    (matches!(toks.next(), Some(",")) && !lit.contains('\'')).then(|| lit.to_ascii_lowercase())
}

/// Whether `sql` has `into` in it, in any case: a SIMD search for the letter, then a
/// look at what follows. Every simple-protocol SELECT pays it: 9-15 ns on a 93-130 ns
/// classification, where a scan of 4-byte windows cost 32-40 ns (criterion,
/// `parts/classify_*`).
fn mentions_into(sql: &str) -> bool {
    let b = sql.as_bytes();
    memchr::memchr2_iter(b'i', b'I', b).any(|i| {
        b.get(i + 1..i + 4)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"nto"))
    })
}

/// The session's temporary schema, as a name's qualifier: `pg_temp.x`, `pg_temp_3.x`.
fn in_temp_schema(tok: &str) -> bool {
    let t = tok.trim_matches('"').as_bytes();
    if t.len() < 7 || !t[..7].eq_ignore_ascii_case(b"pg_temp") {
        return false;
    }
    match &t[7..] {
        [] => true,
        [b'_', n @ ..] => !n.is_empty() && n.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every statement of `sqls` leaves exactly `pins`.
    fn assert_pins(sqls: &[&str], pins: Pins) {
        for sql in sqls {
            assert_eq!(classify(sql).pin, pins, "{sql}");
        }
    }

    fn set(name: &str, value: &str) -> SettingChange {
        SettingChange::Set {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn plain_statements_have_no_effects() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
            "INSERT INTO t VALUES ('SET x = 1')",
            "BEGIN",
            "SET LOCAL statement_timeout = 5",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "select pg_advisory_xact_lock(1)",
            "select 'pg_advisory_lock(1)'",
            "",
        ] {
            assert!(classify(sql).is_empty(), "{sql}: {:?}", classify(sql));
        }
    }

    #[test]
    fn set_and_reset_are_tracked() {
        let fx = classify("SET statement_timeout = 1");
        assert_eq!(fx.settings, vec![set("statement_timeout", "1")]);
        let fx = classify("set SESSION Search_Path TO x, 'y' ;");
        assert_eq!(fx.settings, vec![set("search_path", "x, 'y'")]);
        let fx = classify("SET TIME ZONE 'UTC'; RESET work_mem; reset all");
        assert_eq!(
            fx.settings,
            vec![
                set("timezone", "'UTC'"),
                SettingChange::Reset {
                    name: "work_mem".into()
                },
                SettingChange::ResetAll
            ]
        );
        let fx = classify("SET shardgate.shard_key = 42");
        assert_eq!(fx.settings, vec![set("shardgate.shard_key", "42")]);
        let fx = classify("/* c */ SET \"work_mem\" = '64MB'");
        assert_eq!(fx.settings, vec![set("work_mem", "'64MB'")]);
        let fx = classify("SET ROLE app");
        assert_eq!(fx.settings, vec![set("role", "app")]);
        let fx = classify("SET NAMES 'LATIN1'");
        assert_eq!(fx.settings, vec![set("client_encoding", "'LATIN1'")]);
        let reset = |n: &str| SettingChange::Reset { name: n.into() };
        for sql in ["SET NAMES DEFAULT", "set names"] {
            assert_eq!(
                classify(sql).settings,
                vec![reset("client_encoding")],
                "{sql}"
            );
        }
    }

    #[test]
    fn untrackable_state_pins() {
        assert_eq!(
            classify("SET search_path FROM CURRENT").pin,
            Pins::UNTRACKED
        );
        assert_eq!(
            classify("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").pin,
            Pins::UNTRACKED
        );
        assert_eq!(
            classify("SELECT set_config('work_mem', '1MB', false)").pin,
            Pins::UNTRACKED
        );
    }

    #[test]
    fn code_shardgate_cannot_read_makes_settings_unknown() {
        for sql in [
            "DO $$BEGIN PERFORM set_config('work_mem', '7MB', false); END$$",
            "do language plpgsql $x$ BEGIN SET work_mem = '7MB'; END $x$",
            "CALL refresh_tenant()",
        ] {
            let fx = classify(sql);
            assert!(fx.opaque_code, "{sql}");
            assert!(!fx.is_empty(), "{sql}");
        }
        assert!(!classify("SELECT 'DO $$ $$'").opaque_code);
        assert!(!classify("UPDATE t SET done = true").opaque_code);
    }

    #[test]
    fn a_later_take_outlasts_an_earlier_release() {
        let fx = classify("UNLISTEN *; LISTEN a");
        assert_eq!((fx.pin, fx.unpin), (Pins::LISTEN, Pins::NONE));
        let fx = classify("SELECT pg_advisory_unlock_all(), pg_advisory_lock(1)");
        assert_eq!((fx.pin, fx.unpin), (Pins::ADVISORY_LOCK, Pins::NONE));
        // A release after the take: released on success, still pinned if the text fails.
        let fx = classify("LISTEN a; UNLISTEN *");
        assert_eq!((fx.pin, fx.unpin), (Pins::LISTEN, Pins::LISTEN));
    }

    #[test]
    fn deallocated_names_read_as_postgres_reads_them() {
        let cases: [(&str, Option<&str>); 11] = [
            ("DEALLOCATE _pg3_0", Some("_pg3_0")),
            ("deallocate prepare S1;", Some("s1")),
            ("DEALLOCATE \"Mixed\"\"Case\"", Some("Mixed\"Case")),
            ("  DEALLOCATE /* why */ stmt -- trailing", Some("stmt")),
            // A statement named "prepare".
            ("DEALLOCATE prepare", Some("prepare")),
            ("DEALLOCATE ALL", None),
            ("DEALLOCATE PREPARE ALL", None),
            ("DEALLOCATE s1; SELECT 1", None),
            ("DEALLOCATE", None),
            ("DEALLOCATE a b", None),
            ("SELECT 'DEALLOCATE s1'", None),
        ];
        for (sql, want) in cases {
            assert_eq!(deallocated_name(sql).as_deref(), want, "{sql}");
        }
    }

    #[test]
    fn session_bound_features_pin_and_release() {
        assert_eq!(classify("LISTEN chan").pin, Pins::LISTEN);
        assert_eq!(classify("UNLISTEN *").unpin, Pins::LISTEN);
        assert!(classify("UNLISTEN chan").unpin.is_empty());
        assert_eq!(
            classify("SELECT pg_advisory_lock(1)").pin,
            Pins::ADVISORY_LOCK
        );
        assert_eq!(
            classify("select PG_TRY_ADVISORY_LOCK ( 7 )").pin,
            Pins::ADVISORY_LOCK
        );
        assert_eq!(
            classify("SELECT pg_advisory_unlock_all()").unpin,
            Pins::ADVISORY_LOCK
        );
        assert_eq!(
            classify("CREATE TEMP TABLE t (a int)").pin,
            Pins::TEMP_OBJECT
        );
        assert_eq!(
            classify("create global temporary table t (a int)").pin,
            Pins::TEMP_OBJECT
        );
        assert!(classify("CREATE TABLE t (a int)").pin.is_empty());
        assert_eq!(classify("DISCARD TEMP").unpin, Pins::TEMP_OBJECT);
        assert_eq!(
            classify("DECLARE c CURSOR WITH HOLD FOR SELECT 1").pin,
            Pins::HOLD_CURSOR
        );
        assert!(classify("DECLARE c CURSOR FOR SELECT 'with hold'")
            .pin
            .is_empty());
        assert_eq!(classify("CLOSE ALL").unpin, Pins::HOLD_CURSOR);
        assert_eq!(classify("PREPARE p AS SELECT 1").pin, Pins::SQL_PREPARE);
        let fx = classify("DEALLOCATE ALL");
        assert!(fx.deallocate_all);
        assert_eq!(fx.unpin, Pins::SQL_PREPARE);
        let fx = classify("DISCARD ALL");
        assert!(fx.discard_all);
        assert_eq!(fx.unpin, Pins::ALL);
        let reset = |n: &str| SettingChange::Reset { name: n.into() };
        assert_eq!(
            fx.settings,
            vec![
                SettingChange::ResetAll,
                reset("role"),
                reset("session_authorization")
            ]
        );
    }

    #[test]
    fn time_zone_and_authorization_resets() {
        let reset = |n: &str| SettingChange::Reset { name: n.into() };
        for sql in [
            "RESET TIME ZONE",
            "reset time zone",
            "SET TIME ZONE LOCAL",
            "SET TIME ZONE DEFAULT",
        ] {
            assert_eq!(classify(sql).settings, vec![reset("timezone")], "{sql}");
        }
        assert_eq!(
            classify("RESET SESSION AUTHORIZATION").settings,
            vec![reset("session_authorization")]
        );
        let fx = classify("SET TIME ZONE INTERVAL '+02:00' HOUR TO MINUTE");
        assert!(fx.settings.is_empty());
        assert_eq!(fx.pin, Pins::UNTRACKED);
        assert_eq!(
            classify("SET TIME ZONE 'UTC' -- why").settings,
            vec![set("timezone", "'UTC'")]
        );
        assert_eq!(
            classify("SET search_path = a, b -- tenant").settings,
            vec![set("search_path", "a, b")]
        );
    }

    #[test]
    fn temporary_tables_made_without_create_temp_pin() {
        let made = [
            "SELECT 1 AS x INTO TEMP t",
            "select * into temporary table t from u",
            "WITH w AS (SELECT 1) SELECT * INTO TEMP t FROM w",
            "SELECT 1 INTO pg_temp.t",
            "CREATE TABLE pg_temp.t (x int)",
            "CREATE TABLE \"pg_temp\".t AS SELECT 1",
            "CREATE VIEW pg_temp_3.v AS SELECT 1",
            "CREATE UNLOGGED TABLE pg_temp.t (x int)",
        ];
        assert_pins(&made, Pins::TEMP_OBJECT);
        let not_made = [
            "SELECT 1 INTO t",
            "SELECT x FROM pg_temperature",
            "CREATE TABLE pg_temperature (x int)",
            "CREATE TABLE pg_temp_x.t (x int)",
            "CREATE TABLE pg_temp_.t (x int)",
            "INSERT INTO t VALUES (1)",
            "SELECT 'into temp'",
        ];
        assert_pins(&not_made, Pins::NONE);
    }

    #[test]
    fn transaction_local_set_config_does_not_pin() {
        let local = [
            "SELECT set_config('app.tenant', '42', true)",
            "SELECT set_config('app.tenant', $1, TRUE)",
            "select set_config('a.b', current_setting('x.y'), true), 1",
            "SELECT \"set_config\"('a.b', '1', true)",
        ];
        assert_pins(&local, Pins::NONE);
        let session = [
            "SELECT set_config('app.tenant', '42', false)",
            "SELECT set_config('app.tenant', '42', $3)",
            "SELECT set_config('a', '1', true), set_config('b', '2', false)",
            "SELECT \"set_config\"('a.b', '1', false)",
            "SELECT set_config('a.b', f(1, true), false)",
            "SELECT set_config('a.b', '1', true OR false)",
            "SELECT set_config('a.b', '1', (true))",
            "SELECT set_config('a.b', '1')",
            "SELECT set_config('a.b', '1', true, 4)",
        ];
        assert_pins(&session, Pins::UNTRACKED);
    }

    #[test]
    fn changes_to_parse_time_settings_are_told_apart() {
        let parsing = [
            "SET search_path = tenant_a",
            "set TIME ZONE 'Asia/Tokyo'",
            "SET DateStyle TO 'SQL, DMY'",
            "SET ROLE reader",
            "RESET search_path",
            "RESET ALL",
            "DISCARD ALL",
            "SET LOCAL search_path = x",
            "SET LOCAL TIME ZONE 'UTC'",
            "SET LOCAL \"TimeZone\" = 'UTC'",
            "SET LOCAL ROLE reader",
            "SET LOCAL SCHEMA 'x'",
            "SET LOCAL NAMES 'LATIN1'",
            "SET LOCAL XML OPTION DOCUMENT",
            "SELECT set_config('search_path', 'x', true)",
            "SELECT set_config('TimeZone', 'UTC', TRUE)",
            "SELECT set_config($1, 'UTC', true)",
            "DO $$BEGIN NULL; END$$",
        ];
        for sql in parsing {
            assert!(classify(sql).changes_parsing(), "{sql}");
        }
        let running = [
            "SET statement_timeout = 5",
            "SET application_name = 'x'",
            "RESET work_mem",
            "SET LOCAL statement_timeout = 5",
            "SET LOCAL app.tenant = '7'",
            "SELECT set_config('app.tenant', '42', true)",
            "SELECT set_config('request.jwt.claims', $1, true)",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SELECT 1",
        ];
        for sql in running {
            assert!(!classify(sql).changes_parsing(), "{sql}");
        }
        // A local change leaves nothing to replay, but is an effect all the same.
        let local = classify("SET LOCAL search_path = x");
        assert!(local.settings.is_empty() && local.pin.is_empty() && !local.is_empty());
        assert!(classify("SET LOCAL work_mem = '1MB'").is_empty());
        assert!(PARSE_TIME_SETTINGS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_backslash_in_a_plain_string_does_not_hide_a_set() {
        let fx = classify("SELECT 'a\\'; SET search_path = evil; --'");
        assert_eq!(fx.settings, vec![set("search_path", "evil")]);
    }

    #[test]
    fn effects_accumulate_over_statements() {
        let fx = classify("LISTEN a; SET work_mem = '1MB'; SELECT pg_advisory_lock(2)");
        assert_eq!(fx.pin, Pins::LISTEN.with(Pins::ADVISORY_LOCK));
        assert_eq!(fx.settings, vec![set("work_mem", "'1MB'")]);
    }
}
