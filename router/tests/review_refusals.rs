//! Statements a review found answered wrong across shards: each must now be routed so the
//! answer is the one a single Postgres gives, or refused with 0A000.

use shardgate_router::*;

fn catalog() -> Catalog {
    Catalog::new()
        .with_sharded("users", "id", KeyType::Int)
        .with_sharded("posts", "user_id", KeyType::Int)
        .with_reference("countries")
}

fn p(sql: &str) -> Plan {
    plan(sql, &catalog())
}

fn int(v: i64) -> KeyExpr {
    KeyExpr::Literal(KeyValue::Int(v))
}

#[track_caller]
fn refused(sql: &str, needle: &str) {
    let plan = p(sql);
    let r = plan.refusal.unwrap_or_else(|| {
        panic!(
            "{sql}\n  should be refused ({needle}), got {:?}",
            plan.target
        )
    });
    assert_eq!(r.sqlstate, "0A000", "{sql}");
    assert!(
        r.message.contains(needle),
        "{sql}\n  refusal {:?} lacks {needle:?}",
        r.message
    );
}

#[track_caller]
fn not_refused(sql: &str) -> Plan {
    let plan = p(sql);
    assert!(
        plan.refusal.is_none(),
        "{sql}\n  unexpected refusal {:?}",
        plan.refusal
    );
    plan
}

/// A fan-out read that needs no merging beyond concatenation (or refusal).
#[track_caller]
fn fans_out(sql: &str) -> Plan {
    let plan = not_refused(sql);
    assert_eq!(plan.target, Target::All, "{sql}");
    assert!(plan.merge.is_some(), "{sql}: fan-out without merge");
    plan
}

// --- A: alias column lists ------------------------------------------------------------

#[test]
fn alias_column_lists_hide_the_shard_key() {
    // p.user_id is posts.id here: not the shard key.
    fans_out("SELECT * FROM posts AS p(user_id, id) WHERE p.user_id = 3");
    fans_out("SELECT * FROM posts AS p(user_id, id) WHERE user_id = 3");
    fans_out("SELECT * FROM posts p(a, user_id) WHERE user_id = 3");
    // The real key renamed: the router cannot tell, so it fans out (still right).
    fans_out("SELECT * FROM posts p(id, uid) WHERE p.id = 3");
    // Without a column list the alias keeps the names.
    let plan = not_refused("SELECT * FROM posts AS p WHERE p.user_id = 3");
    assert_eq!(
        plan.target,
        Target::Keys {
            key_type: KeyType::Int,
            keys: vec![int(3)]
        }
    );
    // A join through renamed columns is not a join on keys.
    refused(
        "SELECT * FROM users u JOIN posts p(user_id, id) ON p.user_id = u.id",
        "not joined on their shard keys",
    );
    // Grouping by the renamed column is not grouping by the key: groups are combined.
    let plan = fans_out("SELECT p.user_id, count(*) FROM posts p(user_id, id) GROUP BY p.user_id");
    assert!(!plan.merge.unwrap().aggregates.is_empty());
}
