//! Stand-in for the router's plan until it lands: does a statement need the primary?
//! Conservative: anything not recognised as a plain read goes to the primary.

use shardgate_router::scan::{statements, Tokens};

/// Functions that write or take locks, so a SELECT calling them is a write.
const WRITE_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "txid_current",
    "pg_current_xact_id",
    "lo_create",
    "lo_import",
    "lo_unlink",
    "set_config",
];

const READ_KEYWORDS: &[&str] = &[
    "select",
    "values",
    "table",
    "show",
    "fetch",
    "move",
    "close",
    "set",
    "reset",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
];

pub fn needs_primary(sql: &str) -> bool {
    has_primary_hint(sql) || statements(sql).any(statement_needs_primary)
}

/// A leading `/* shardgate: primary */` comment.
fn has_primary_hint(sql: &str) -> bool {
    let Some(rest) = sql.trim_start().strip_prefix("/*") else {
        return false;
    };
    let Some(end) = rest.find("*/") else {
        return false;
    };
    let comment = rest[..end].trim();
    comment.strip_prefix("shardgate:").is_some_and(|h| {
        h.split([',', ' '])
            .any(|w| w.trim().eq_ignore_ascii_case("primary"))
    })
}

fn statement_needs_primary(stmt: &str) -> bool {
    let mut toks = Tokens::new(stmt);
    let Some(first) = toks.next() else {
        return false;
    };
    let is = |t: &str, k: &str| t.eq_ignore_ascii_case(k);
    if is(first, "begin") || is(first, "start") {
        // BEGIN [TRANSACTION] ... READ ONLY
        let mut prev = "";
        for t in toks {
            if is(prev, "read") && is(t, "only") {
                return false;
            }
            prev = t;
        }
        return true;
    }
    let read_like = READ_KEYWORDS.iter().any(|k| is(first, k))
        || is(first, "with")
        || (is(first, "explain") && !stmt.to_ascii_lowercase().contains("analyze"));
    if !read_like {
        return true;
    }
    let mut prev = "";
    for t in Tokens::new(stmt) {
        if is(first, "with")
            && (is(t, "insert") || is(t, "update") || is(t, "delete") || is(t, "merge"))
        {
            return true;
        }
        if is(prev, "for") && (is(t, "update") || is(t, "share") || is(t, "no") || is(t, "key")) {
            return true;
        }
        if t.starts_with(|c: char| c.is_ascii_alphabetic())
            && WRITE_FUNCTIONS.iter().any(|f| is(t, f))
        {
            return true;
        }
        prev = t;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes() {
        for sql in [
            "SELECT 1",
            "select * from t where a = $1",
            "SHOW search_path",
            "BEGIN READ ONLY",
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "SET work_mem = '1MB'",
            "COMMIT",
            "/* just a comment: primary */ SELECT 1",
        ] {
            assert!(!needs_primary(sql), "{sql}");
        }
        for sql in [
            "INSERT INTO t VALUES (1)",
            "update t set a = 1",
            "BEGIN",
            "select nextval('s')",
            "SELECT * FROM t FOR UPDATE",
            "select * from t for no key update",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "CREATE TABLE t (a int)",
            "SELECT pg_advisory_lock(1)",
            "LISTEN c",
            "EXPLAIN ANALYZE DELETE FROM t",
            "/* shardgate: primary */ SELECT 1",
            "SELECT 1; DELETE FROM t",
        ] {
            assert!(needs_primary(sql), "{sql}");
        }
    }
}
