//! What the router knows about tables: which are sharded (and by which column), which are
//! reference tables, and which functions write.

use std::collections::{HashMap, HashSet};

/// How a shard key is typed. Decides how a literal or a bound parameter is turned into the
/// value that is hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// int2, int4, int8.
    Int,
    /// text, varchar.
    Text,
    Uuid,
}

/// A table that is split across shards by one column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardedTable {
    /// Lower case, unquoted.
    pub key_column: String,
    pub key_type: KeyType,
}

/// The tables and functions the router needs to know about, from the config.
///
/// Table names are lower case. A name may be unqualified (`users`: that table in any
/// schema) or schema-qualified (`public.users`: only that one, but an unqualified reference
/// `users` in a query also matches it, since the router does not know the search path).
/// The router matches names case-insensitively: a quoted `"Users"` counts as `users`, which
/// errs on the side of treating a table as sharded.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub sharded: HashMap<String, ShardedTable>,
    /// Reference tables: a full copy on every shard. Read from any shard, written to all.
    pub reference: HashSet<String>,
    /// Functions (lower case, optionally schema-qualified) that write or need the primary,
    /// in addition to the built-in list (see [`is_builtin_write_function`]).
    pub write_functions: HashSet<String>,
}

/// What a table name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableClass<'a> {
    Sharded(&'a ShardedTable),
    Reference,
    /// `pg_catalog`, `information_schema`, `pg_*`: present on every server.
    System,
    /// Anything else: lives on the default shard only.
    Unsharded,
}

impl Catalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a sharded table (builder style, handy for tests and the proxy's glue).
    pub fn with_sharded(mut self, table: &str, key_column: &str, key_type: KeyType) -> Self {
        self.sharded.insert(
            table.to_ascii_lowercase(),
            ShardedTable {
                key_column: key_column.to_ascii_lowercase(),
                key_type,
            },
        );
        self
    }

    pub fn with_reference(mut self, table: &str) -> Self {
        self.reference.insert(table.to_ascii_lowercase());
        self
    }

    pub fn with_write_function(mut self, name: &str) -> Self {
        self.write_functions.insert(name.to_ascii_lowercase());
        self
    }

    /// Classifies a table named by its parts (`[schema.]table`, already lower case).
    pub fn classify(&self, schema: Option<&str>, table: &str) -> TableClass<'_> {
        if let Some(info) = self.find_sharded(schema, table) {
            return TableClass::Sharded(info);
        }
        if self.is_reference(schema, table) {
            return TableClass::Reference;
        }
        if matches!(schema, Some("pg_catalog" | "information_schema"))
            || (schema.is_none() && table.starts_with("pg_"))
        {
            return TableClass::System;
        }
        TableClass::Unsharded
    }

    fn find_sharded(&self, schema: Option<&str>, table: &str) -> Option<&ShardedTable> {
        if let Some(info) = self.sharded.get(table) {
            return Some(info);
        }
        match schema {
            Some(s) => self.sharded.get(&format!("{s}.{table}")),
            None => self
                .sharded
                .iter()
                .find(|(name, _)| qualified_tail(name) == Some(table))
                .map(|(_, info)| info),
        }
    }

    fn is_reference(&self, schema: Option<&str>, table: &str) -> bool {
        if self.reference.contains(table) {
            return true;
        }
        match schema {
            Some(s) => self.reference.contains(&format!("{s}.{table}")),
            None => self
                .reference
                .iter()
                .any(|name| qualified_tail(name) == Some(table)),
        }
    }

    /// Whether a bare word (from text the parser could not read) names a sharded or a
    /// reference table.
    pub fn mentions_distributed_table(&self, word: &str) -> bool {
        let matches = |name: &String| {
            name.eq_ignore_ascii_case(word)
                || qualified_tail(name).is_some_and(|t| t.eq_ignore_ascii_case(word))
        };
        self.sharded.keys().any(matches) || self.reference.iter().any(matches)
    }

    /// Whether calling `name` (lower case, `[schema.]function`) needs the primary.
    pub fn is_write_function(&self, schema: Option<&str>, name: &str) -> bool {
        if is_builtin_write_function(name) || self.write_functions.contains(name) {
            return true;
        }
        schema.is_some_and(|s| self.write_functions.contains(&format!("{s}.{name}")))
    }
}

fn qualified_tail(name: &str) -> Option<&str> {
    name.rsplit_once('.').map(|(_, t)| t)
}

/// Built-in functions that write, take locks or read session state that only the primary
/// connection has: sequences, advisory locks, large objects, transaction ids, WAL control,
/// `set_config` (session state), `pg_notify`.
pub fn is_builtin_write_function(name: &str) -> bool {
    matches!(
        name,
        "nextval"
            | "setval"
            | "currval"
            | "lastval"
            | "txid_current"
            | "pg_current_xact_id"
            | "set_config"
            | "pg_notify"
            | "pg_current_wal_lsn"
            | "pg_current_wal_insert_lsn"
            | "pg_current_wal_flush_lsn"
            | "pg_switch_wal"
            | "pg_create_restore_point"
            | "pg_export_snapshot"
            | "pg_promote"
            | "pg_create_physical_replication_slot"
            | "pg_create_logical_replication_slot"
            | "pg_drop_replication_slot"
            | "pg_replication_origin_create"
            | "pg_terminate_backend"
            | "pg_cancel_backend"
            | "pg_reload_conf"
            | "dblink_exec"
    ) || name.starts_with("pg_advisory_")
        || name.starts_with("pg_try_advisory_")
        || name.starts_with("lo_")
        || name.starts_with("pg_stat_reset")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::new()
            .with_sharded("users", "id", KeyType::Int)
            .with_sharded("app.events", "tenant", KeyType::Text)
            .with_reference("countries")
            .with_write_function("audit.log_write")
    }

    #[test]
    fn classifies_names() {
        let c = catalog();
        assert!(matches!(
            c.classify(None, "users"),
            TableClass::Sharded(ShardedTable { key_column, .. }) if key_column == "id"
        ));
        assert!(matches!(
            c.classify(Some("public"), "users"),
            TableClass::Sharded(_)
        ));
        assert!(matches!(
            c.classify(Some("app"), "events"),
            TableClass::Sharded(_)
        ));
        // Unqualified: could be app.events through the search path.
        assert!(matches!(c.classify(None, "events"), TableClass::Sharded(_)));
        assert!(matches!(
            c.classify(Some("other"), "events"),
            TableClass::Unsharded
        ));
        assert_eq!(c.classify(None, "countries"), TableClass::Reference);
        assert_eq!(
            c.classify(Some("pg_catalog"), "pg_class"),
            TableClass::System
        );
        assert_eq!(c.classify(None, "pg_class"), TableClass::System);
        assert_eq!(c.classify(None, "orders"), TableClass::Unsharded);
    }

    #[test]
    fn write_functions() {
        let c = catalog();
        for f in [
            "nextval",
            "pg_advisory_lock",
            "pg_advisory_xact_lock_shared",
            "pg_try_advisory_lock",
            "lo_import",
            "txid_current",
            "set_config",
        ] {
            assert!(c.is_write_function(None, f), "{f}");
        }
        assert!(c.is_write_function(Some("audit"), "log_write"));
        assert!(!c.is_write_function(None, "log_write"));
        assert!(!c.is_write_function(None, "now"));
        assert!(!c.is_write_function(None, "lower"));
    }

    #[test]
    fn words_in_unparsed_text() {
        let c = catalog();
        assert!(c.mentions_distributed_table("USERS"));
        assert!(c.mentions_distributed_table("events"));
        assert!(c.mentions_distributed_table("countries"));
        assert!(!c.mentions_distributed_table("orders"));
    }
}
