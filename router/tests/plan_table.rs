//! Routing table: SQL text → role, target, merge, refusal. Includes every trap listed in
//! DESIGN §3.

use shardgate_router::*;

fn catalog() -> Catalog {
    Catalog::new()
        .with_sharded("users", "id", KeyType::Int)
        .with_sharded("posts", "user_id", KeyType::Int)
        .with_sharded("comments", "post_id", KeyType::Int)
        .with_sharded("public.likes", "user_id", KeyType::Int)
        .with_sharded("tenants", "name", KeyType::Text)
        .with_sharded("devices", "id", KeyType::Uuid)
        .with_sharded("pgbench_accounts", "aid", KeyType::Int)
        .with_sharded("pgbench_history", "aid", KeyType::Int)
        .with_sharded("pgbench_tellers", "tid", KeyType::Int)
        .with_sharded("pgbench_branches", "bid", KeyType::Int)
        .with_reference("countries")
        .with_write_function("audit_write")
}

fn p(sql: &str) -> Plan {
    plan(sql, &catalog())
}

fn int(v: i64) -> KeyExpr {
    KeyExpr::Literal(KeyValue::Int(v))
}
fn text(v: &str) -> KeyExpr {
    KeyExpr::Literal(KeyValue::Text(v.into()))
}
fn param(n: usize) -> KeyExpr {
    KeyExpr::Param(n)
}

#[derive(Debug)]
enum T {
    Default,
    Any,
    All,
    Each,
    Keys(Vec<KeyExpr>),
    Shard(u32),
    Split(Vec<KeyExpr>),
}

#[derive(Debug)]
enum R {
    Ok,
    /// Refused; the message contains this text.
    No(&'static str),
    /// Refused only when the target spans shards.
    Multi(&'static str),
}

use Role::{Primary as P, Replica as S};

#[track_caller]
fn case(sql: &str, role: Role, target: T, r: R) {
    let plan = p(sql);
    match (&r, &plan.refusal) {
        (R::No(msg), Some(got)) => {
            assert!(
                got.message.contains(msg),
                "{sql}\n  refusal {:?} lacks {msg:?}",
                got.message
            );
            assert!(!got.sqlstate.is_empty());
            return;
        }
        (R::No(msg), None) => panic!("{sql}\n  should be refused ({msg}), got {plan:?}"),
        (_, Some(got)) => panic!("{sql}\n  unexpected refusal: {}", got.message),
        _ => {}
    }
    match (&r, &plan.multi_shard_refusal) {
        (R::Multi(msg), Some(got)) => assert!(got.message.contains(msg), "{sql}: {}", got.message),
        (R::Multi(msg), None) => panic!("{sql}\n  should refuse multi-shard ({msg})"),
        (_, Some(got)) => panic!("{sql}\n  unexpected multi-shard refusal: {}", got.message),
        _ => {}
    }
    assert_eq!(plan.role, role, "{sql}\n  role");
    let ok = match (&target, &plan.target) {
        (T::Default, Target::Default) => true,
        (T::Any, Target::Any) => true,
        (T::All, Target::All) => true,
        (T::Each, Target::Each) => true,
        (T::Shard(a), Target::Shard(b)) => a == b,
        (T::Keys(a), Target::Keys { keys, .. }) => a == keys,
        (T::Split(a), Target::SplitInsert { rows, .. }) => a == rows,
        _ => false,
    };
    assert!(
        ok,
        "{sql}\n  target: want {target:?}, got {:?}",
        plan.target
    );
    // Reads that may touch several shards always carry a merge plan (or a refusal).
    if plan.kind == Kind::Read && plan.target.may_fan_out() && plan.multi_shard_refusal.is_none() {
        assert!(plan.merge.is_some(), "{sql}\n  fan-out read without merge");
    }
}

#[test]
fn roles() {
    case("SELECT * FROM orders", S, T::Default, R::Ok);
    case("SELECT 1", S, T::Default, R::Ok);
    case("VALUES (1), (2)", S, T::Default, R::Ok);
    case("INSERT INTO orders (a) VALUES (1)", P, T::Default, R::Ok);
    case("UPDATE orders SET a = 1", P, T::Default, R::Ok);
    case("DELETE FROM orders", P, T::Default, R::Ok);
    case(
        "MERGE INTO orders o USING (SELECT 1 AS a) s ON o.a = s.a WHEN MATCHED THEN DELETE",
        P,
        T::Default,
        R::Ok,
    );
    case("SELECT * FROM orders FOR UPDATE", P, T::Default, R::Ok);
    case("SELECT * FROM orders FOR SHARE", P, T::Default, R::Ok);
    case(
        "SELECT * FROM orders FOR NO KEY UPDATE",
        P,
        T::Default,
        R::Ok,
    );
    case(
        "SELECT * FROM orders FOR KEY SHARE SKIP LOCKED",
        P,
        T::Default,
        R::Ok,
    );
    case(
        "SELECT * FROM (SELECT * FROM orders FOR UPDATE) s",
        P,
        T::Default,
        R::Ok,
    );
    case("SELECT nextval('orders_id_seq')", P, T::Default, R::Ok);
    case("SELECT setval('s', 5)", P, T::Default, R::Ok);
    case("SELECT pg_catalog.nextval('s')", P, T::Default, R::Ok);
    case("SELECT pg_advisory_lock(1)", P, T::Default, R::Ok);
    case("SELECT pg_advisory_xact_lock(1)", P, T::Default, R::Ok);
    case("SELECT pg_try_advisory_lock(1)", P, T::Default, R::Ok);
    case("SELECT lo_import('/x')", P, T::Default, R::Ok);
    case("SELECT txid_current()", P, T::Default, R::Ok);
    case("SELECT pg_current_xact_id()", P, T::Default, R::Ok);
    case("SELECT set_config('a.b', 'c', false)", P, T::Default, R::Ok);
    case("SELECT audit_write(1)", P, T::Default, R::Ok);
    case(
        "SELECT * FROM orders WHERE x = (SELECT nextval('s'))",
        P,
        T::Default,
        R::Ok,
    );
    case("SELECT * FROM nextval('s')", P, T::Default, R::Ok);
    case(
        "SELECT lower(name), now() FROM orders",
        S,
        T::Default,
        R::Ok,
    );
    case(
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
        P,
        T::Default,
        R::Ok,
    );
    case(
        "WITH d AS (INSERT INTO orders (a) VALUES (1) RETURNING a) SELECT a FROM d",
        P,
        T::Default,
        R::Ok,
    );
    case("SELECT * INTO newtab FROM orders", P, T::Default, R::Ok);
    case("EXPLAIN SELECT * FROM orders", S, T::Default, R::Ok);
    case("EXPLAIN ANALYZE SELECT * FROM orders", S, T::Default, R::Ok);
    case(
        "EXPLAIN ANALYZE UPDATE orders SET a = 1",
        P,
        T::Default,
        R::Ok,
    );
    case(
        "EXPLAIN (ANALYZE, BUFFERS) DELETE FROM orders",
        P,
        T::Default,
        R::Ok,
    );
    case("EXPLAIN UPDATE orders SET a = 1", P, T::Default, R::Ok);
    case("SHOW work_mem", S, T::Default, R::Ok);
    case("SET work_mem = '4MB'", S, T::Default, R::Ok);
    case("LISTEN chan", P, T::Default, R::Ok);
    case("CREATE TABLE orders2 (a int)", P, T::Default, R::Ok);
    case("TRUNCATE orders", P, T::Default, R::Ok);
    case("GRANT SELECT ON orders TO app", P, T::Default, R::Ok);
    case("COPY orders FROM STDIN", P, T::Default, R::Ok);
    case("COPY orders TO STDOUT", S, T::Default, R::Ok);
    case("VACUUM ANALYZE orders", P, T::Default, R::Ok);
    case("CALL proc(1)", P, T::Default, R::Ok);
    case("DO $$ BEGIN PERFORM 1; END $$", P, T::Default, R::Ok);
}

#[test]
fn transactions() {
    let b = p("BEGIN");
    assert_eq!(b.role, P);
    assert_eq!(b.tx, Some(TxControl::Begin { read_only: false }));
    let b = p("BEGIN READ ONLY");
    assert_eq!(b.role, S);
    assert_eq!(b.tx, Some(TxControl::Begin { read_only: true }));
    let b = p("START TRANSACTION READ ONLY");
    assert_eq!(b.role, S);
    let b = p("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY");
    assert_eq!(b.role, P);
    let b = p("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
    assert_eq!(b.role, S);
    assert_eq!(p("COMMIT").tx, Some(TxControl::Commit { chain: false }));
    assert_eq!(p("ROLLBACK").tx, Some(TxControl::Rollback { chain: false }));
    assert_eq!(
        p("SET TRANSACTION READ ONLY").tx,
        Some(TxControl::SetTransactionReadOnly(true))
    );
    assert_eq!(
        p("SET default_transaction_read_only = on").tx,
        Some(TxControl::SessionReadOnly(true))
    );
    assert_eq!(p("SAVEPOINT a").tx, Some(TxControl::Savepoint("a".into())));
    assert_eq!(p("/* c */ begin").kind, Kind::Transaction);
}

#[test]
fn key_extraction() {
    case(
        "SELECT * FROM users WHERE id = 42",
        S,
        T::Keys(vec![int(42)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE 42 = id",
        S,
        T::Keys(vec![int(42)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = -42",
        S,
        T::Keys(vec![int(-42)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = '42'",
        S,
        T::Keys(vec![int(42)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = $1",
        S,
        T::Keys(vec![param(1)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = $1::bigint",
        S,
        T::Keys(vec![param(1)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = CAST($2 AS int8)",
        S,
        T::Keys(vec![param(2)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = '42'::int8",
        S,
        T::Keys(vec![int(42)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE (id) = (7)",
        S,
        T::Keys(vec![int(7)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE ID = 7",
        S,
        T::Keys(vec![int(7)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE x > 1 AND (id = 7 AND y < 2)",
        S,
        T::Keys(vec![int(7)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users u WHERE u.id = 7",
        S,
        T::Keys(vec![int(7)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE users.id = 7",
        S,
        T::Keys(vec![int(7)]),
        R::Ok,
    );
    case(
        "SELECT * FROM public.users WHERE public.users.id = 7",
        S,
        T::Keys(vec![int(7)]),
        R::Ok,
    );
    case(
        "SELECT * FROM likes WHERE user_id = 3",
        S,
        T::Keys(vec![int(3)]),
        R::Ok,
    );
    case(
        "SELECT * FROM public.likes WHERE user_id = 3",
        S,
        T::Keys(vec![int(3)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id IN (1, 2, $3)",
        S,
        T::Keys(vec![int(1), int(2), param(3)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = ANY($1)",
        S,
        T::Keys(vec![KeyExpr::ParamArray(1)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = ANY($1::bigint[])",
        S,
        T::Keys(vec![KeyExpr::ParamArray(1)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = ANY(ARRAY[1, 2])",
        S,
        T::Keys(vec![int(1), int(2)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = 5 AND id = $1",
        S,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    case(
        "SELECT * FROM tenants WHERE name = 'acme'",
        S,
        T::Keys(vec![text("acme")]),
        R::Ok,
    );
    case(
        "SELECT * FROM tenants WHERE name = 'it''s'::text",
        S,
        T::Keys(vec![text("it's")]),
        R::Ok,
    );
    let uuid = KeyExpr::Literal(KeyValue::Uuid(
        parse_uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap(),
    ));
    case(
        "SELECT * FROM devices WHERE id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
        S,
        T::Keys(vec![uuid.clone()]),
        R::Ok,
    );
    case(
        "SELECT * FROM devices WHERE id = uuid 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
        S,
        T::Keys(vec![uuid]),
        R::Ok,
    );
    case(
        "SELECT * FROM devices WHERE id = $1::uuid",
        S,
        T::Keys(vec![param(1)]),
        R::Ok,
    );
}

#[test]
fn not_keys_fan_out() {
    // The key inside an expression is not a key (DESIGN §3 trap).
    case("SELECT * FROM users WHERE id % 3 = $1", S, T::All, R::Ok);
    case("SELECT * FROM users WHERE id + 1 = $1", S, T::All, R::Ok);
    case("SELECT * FROM users WHERE abs(id) = 5", S, T::All, R::Ok);
    case("SELECT * FROM users WHERE id::text = '5'", S, T::All, R::Ok);
    // OR / NOT around the key.
    case(
        "SELECT * FROM users WHERE id = 1 OR name = 'x'",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = 1 OR id = 2",
        S,
        T::All,
        R::Ok,
    );
    case("SELECT * FROM users WHERE NOT (id = 1)", S, T::All, R::Ok);
    case("SELECT * FROM users WHERE id <> 1", S, T::All, R::Ok);
    case(
        "SELECT * FROM users WHERE id NOT IN (1, 2)",
        S,
        T::All,
        R::Ok,
    );
    case("SELECT * FROM users WHERE id > 5", S, T::All, R::Ok);
    case(
        "SELECT * FROM users WHERE id BETWEEN 5 AND 5",
        S,
        T::All,
        R::Ok,
    );
    case("SELECT * FROM users WHERE id = 1 IS TRUE", S, T::All, R::Ok);
    // Constants that do not compare as an equal key.
    case("SELECT * FROM users WHERE id = 42.0", S, T::All, R::Ok);
    case("SELECT * FROM users WHERE id = 1e3", S, T::All, R::Ok);
    case(
        "SELECT * FROM users WHERE id = 42::numeric",
        S,
        T::All,
        R::Ok,
    );
    case("SELECT * FROM users WHERE id = NULL", S, T::All, R::Ok);
    case("SELECT * FROM tenants WHERE name = 42", S, T::All, R::Ok);
    // An escape string's value is its decoded text; one the parser cannot decode exactly
    // (a byte above 0x7f) fails the parse instead.
    case(
        "SELECT * FROM tenants WHERE name = E'a\\nb\\\\c\\''",
        S,
        T::Keys(vec![text("a\nb\\c'")]),
        R::Ok,
    );
    case(
        "INSERT INTO tenants (name) VALUES (E'\\x41\\101\\u0041')",
        P,
        T::Keys(vec![text("AAA")]),
        R::Ok,
    );
    case(
        "SELECT * FROM tenants WHERE name = E'\\xe9'",
        P,
        T::Default,
        R::No("cannot parse"),
    );
    case(
        "SELECT * FROM tenants WHERE name = 'abcdef'::varchar(3)",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT * FROM devices WHERE id = 'not-a-uuid'",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = ANY('{1,2}')",
        S,
        T::All,
        R::Ok,
    );
    // A quoted "Id" is another column.
    case("SELECT * FROM users WHERE \"Id\" = 5", S, T::All, R::Ok);
    // A key of another table in the FROM list is not this table's key.
    case("SELECT * FROM users WHERE name = 'x'", S, T::All, R::Ok);
}

#[test]
fn joins() {
    case(
        "SELECT * FROM users u JOIN posts p ON p.user_id = u.id WHERE u.id = 7",
        S,
        T::Keys(vec![int(7)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users u JOIN posts p ON p.user_id = u.id WHERE p.user_id = $1",
        S,
        T::Keys(vec![param(1)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users u, posts p WHERE p.user_id = u.id AND u.id = 7",
        S,
        T::Keys(vec![int(7)]),
        R::Ok,
    );
    // After USING, an unqualified name is the merged column (COALESCE in a FULL JOIN).
    case(
        "SELECT * FROM users u FULL JOIN posts p USING (id) WHERE id = 1 AND p.user_id = u.id",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT * FROM users JOIN likes USING (id) WHERE id = 1",
        S,
        T::All,
        R::No("join across shards"),
    );
    case(
        "SELECT * FROM users u JOIN posts p ON p.user_id = u.id",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT * FROM users u LEFT JOIN posts p ON p.user_id = u.id",
        S,
        T::All,
        R::Ok,
    );
    // A key condition inside an outer join's ON does not restrict the preserved side.
    case(
        "SELECT * FROM users u LEFT JOIN posts p ON p.user_id = u.id AND p.user_id = 5",
        S,
        T::All,
        R::Ok,
    );
    // ... but in WHERE it does.
    case(
        "SELECT * FROM users u LEFT JOIN posts p ON p.user_id = u.id WHERE p.user_id = 5",
        S,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    // An inner join condition before a RIGHT JOIN does not restrict the result.
    case(
        "SELECT * FROM users u JOIN posts p ON p.user_id = u.id AND u.id = 5 RIGHT JOIN likes l ON l.user_id = u.id",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT * FROM users u JOIN posts p ON p.title = u.name",
        S,
        T::All,
        R::No("join across shards on a non-key column"),
    );
    case(
        "SELECT * FROM users u JOIN posts p ON p.title = u.name WHERE u.id = 5",
        S,
        T::All,
        R::No("join across shards on a non-key column"),
    );
    case(
        "SELECT * FROM users u JOIN posts p ON p.id = u.id",
        S,
        T::All,
        R::No("join across shards"),
    );
    case(
        "SELECT * FROM users u JOIN posts p ON p.user_id = u.id OR p.title = u.name",
        S,
        T::All,
        R::No("join across shards"),
    );
    case(
        "SELECT * FROM users, posts",
        S,
        T::All,
        R::No("join across shards"),
    );
    // Both pinned to the same key: one shard.
    case(
        "SELECT * FROM users u, posts p WHERE u.id = 5 AND p.user_id = 5",
        S,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    // Pinned to different keys: fine if they land on one shard.
    case(
        "SELECT * FROM users u, posts p WHERE u.id = 5 AND p.user_id = 6",
        S,
        T::Keys(vec![int(5), int(6)]),
        R::Multi("different shard keys"),
    );
    // Three-way colocated join.
    case(
        "SELECT * FROM users u JOIN posts p ON p.user_id = u.id JOIN likes l ON l.user_id = p.user_id WHERE l.user_id = 9",
        S,
        T::Keys(vec![int(9)]),
        R::Ok,
    );
    // comments are sharded by post_id: not colocated with posts by user_id.
    case(
        "SELECT * FROM posts p JOIN comments c ON c.post_id = p.id WHERE p.user_id = 1",
        S,
        T::All,
        R::No("join across shards"),
    );
    // Reference tables exist on every shard.
    case(
        "SELECT * FROM users u JOIN countries c ON c.code = u.country WHERE u.id = 3",
        S,
        T::Keys(vec![int(3)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users u JOIN countries c ON c.code = u.country",
        S,
        T::All,
        R::Ok,
    );
    case("SELECT * FROM countries", S, T::Any, R::Ok);
    case("SELECT * FROM pg_catalog.pg_class", S, T::Default, R::Ok);
    // Unsharded tables live on the default shard only.
    case(
        "SELECT * FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = 1",
        S,
        T::All,
        R::No("unsharded table orders"),
    );
    // Key types must match to colocate.
    case(
        "SELECT * FROM users u JOIN tenants t ON t.name = u.id",
        S,
        T::All,
        R::No("join across shards"),
    );
}

#[test]
fn subqueries() {
    // Correlated on the key: evaluated on the outer row's shard.
    case(
        "SELECT u.*, (SELECT count(*) FROM posts p WHERE p.user_id = u.id) FROM users u",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT * FROM users u WHERE EXISTS (SELECT 1 FROM posts p WHERE p.user_id = u.id AND p.x > 3)",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT * FROM users u WHERE NOT EXISTS (SELECT 1 FROM posts p WHERE p.user_id = u.id)",
        S,
        T::All,
        R::Ok,
    );
    // A key condition inside NOT EXISTS does not restrict the outer rows.
    case(
        "SELECT * FROM users u WHERE NOT EXISTS (SELECT 1 FROM posts p WHERE p.user_id = u.id AND p.user_id = 5)",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id IN (SELECT user_id FROM posts WHERE flagged)",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id NOT IN (SELECT user_id FROM posts)",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = 3 AND id IN (SELECT user_id FROM posts)",
        S,
        T::Keys(vec![int(3)]),
        R::Ok,
    );
    // Uncorrelated aggregates or limits over a sharded table: per-shard answers differ.
    case(
        "SELECT * FROM users WHERE score > (SELECT avg(score) FROM users)",
        S,
        T::All,
        R::No("subquery or CTE over sharded table users"),
    );
    case(
        "SELECT * FROM users WHERE id IN (SELECT user_id FROM posts ORDER BY created LIMIT 10)",
        S,
        T::All,
        R::No("subquery or CTE"),
    );
    case(
        "SELECT * FROM users WHERE id IN (SELECT user_id FROM posts GROUP BY user_id HAVING count(*) > 5)",
        S,
        T::All,
        R::No("subquery or CTE"),
    );
    case(
        "SELECT (SELECT count(*) FROM users)",
        S,
        T::All,
        R::No("subquery over sharded table users"),
    );
    case(
        "SELECT (SELECT count(*) FROM users WHERE id = 4)",
        S,
        T::Keys(vec![int(4)]),
        R::Ok,
    );
    // Pinned to the same key everywhere: one shard, anything goes.
    case(
        "SELECT * FROM posts WHERE user_id = 5 AND score > (SELECT avg(score) FROM posts WHERE user_id = 5)",
        S,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    case(
        "SELECT * FROM posts WHERE user_id = 5 AND score > (SELECT avg(score) FROM posts WHERE user_id = 6)",
        S,
        T::Keys(vec![int(5), int(6)]),
        R::Multi("different shard keys"),
    );
    // A pin inside a subquery restricts the subquery, not the outer query.
    case(
        "SELECT * FROM users u WHERE u.score > 1 OR EXISTS (SELECT 1 FROM posts p WHERE p.user_id = u.id AND p.user_id = 5)",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT * FROM users u WHERE EXISTS (SELECT 1 FROM posts p WHERE p.user_id = u.id AND p.user_id = 5) OR (SELECT count(*) FROM posts q WHERE q.user_id = 5) > 3",
        S,
        T::All,
        R::No("subquery or CTE"),
    );
    // Derived tables and CTEs over sharded tables.
    case(
        "SELECT * FROM (SELECT * FROM users ORDER BY score LIMIT 10) t",
        S,
        T::All,
        R::No("subquery over sharded table users"),
    );
    case(
        "SELECT * FROM (SELECT * FROM users WHERE id = 5) t",
        S,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    case(
        "WITH t AS (SELECT * FROM users) SELECT count(*) FROM t",
        S,
        T::All,
        R::No("subquery over sharded table users"),
    );
    case(
        "WITH t AS (SELECT * FROM users WHERE id = $1) SELECT * FROM t JOIN posts p ON p.user_id = t.id WHERE p.user_id = $1",
        S,
        T::Keys(vec![param(1)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users u, LATERAL (SELECT * FROM posts p WHERE p.user_id = u.id ORDER BY created DESC LIMIT 3) x",
        S,
        T::All,
        R::Ok,
    );
    case(
        "WITH users AS (SELECT 1 AS id) SELECT * FROM users",
        S,
        T::Default,
        R::No("WITH query named like"),
    );
    // The first CTE reads the real users table: the name cannot be trusted either way.
    case(
        "WITH a AS (SELECT * FROM users), users AS (SELECT 1) SELECT * FROM a",
        S,
        T::Default,
        R::No("WITH query named like"),
    );
    // Data-modifying CTEs.
    case(
        "WITH d AS (DELETE FROM users WHERE id = 5 RETURNING *) SELECT * FROM d",
        P,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    case(
        "WITH d AS (DELETE FROM users RETURNING *) SELECT count(*) FROM d",
        P,
        T::All,
        R::No("subquery over sharded table"),
    );
    case(
        "WITH d AS (UPDATE countries SET n = 1 RETURNING *) SELECT * FROM d",
        P,
        T::Each,
        R::Ok,
    );
}

#[test]
fn set_operations_and_windows() {
    case(
        "SELECT id FROM users UNION SELECT user_id FROM posts",
        S,
        T::All,
        R::No("UNION/INTERSECT/EXCEPT"),
    );
    case(
        "SELECT id FROM users INTERSECT SELECT user_id FROM posts",
        S,
        T::All,
        R::No("UNION/INTERSECT/EXCEPT"),
    );
    case(
        "SELECT id FROM users EXCEPT SELECT user_id FROM posts",
        S,
        T::All,
        R::No("UNION/INTERSECT/EXCEPT"),
    );
    case(
        "SELECT id FROM users WHERE id = 1 UNION ALL SELECT user_id FROM posts WHERE user_id = 1",
        S,
        T::Keys(vec![int(1)]),
        R::Ok,
    );
    case("SELECT 1 UNION SELECT 2", S, T::Default, R::Ok);
    // The parser does not read TABLE commands: unparseable rules apply.
    case("TABLE users", P, T::Default, R::No("hint"));
    case("TABLE orders", P, T::Default, R::Ok);
    case(
        "SELECT id, row_number() OVER (ORDER BY id) FROM users",
        S,
        T::All,
        R::No("window function"),
    );
    case(
        "SELECT id, sum(x) OVER () FROM users",
        S,
        T::All,
        R::No("window function"),
    );
    case(
        "SELECT id, rank() OVER w FROM users WINDOW w AS (ORDER BY id)",
        S,
        T::All,
        R::No("window function"),
    );
    // On one shard, windows are fine.
    case(
        "SELECT id, row_number() OVER () FROM posts WHERE user_id = 3",
        S,
        T::Keys(vec![int(3)]),
        R::Ok,
    );
    // A window inside a subquery tied to the outer row's key is evaluated per outer row,
    // over that row's shard only: exact.
    case(
        "SELECT u.id, (SELECT max(r) FROM (SELECT rank() OVER (ORDER BY p.x) r FROM posts p WHERE p.user_id = u.id) z) FROM users u",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT u.id, (SELECT max(r) FROM (SELECT rank() OVER (ORDER BY p.x) r FROM posts p) z) FROM users u",
        S,
        T::All,
        R::No("subquery or CTE"),
    );
}

#[test]
fn aggregates() {
    case("SELECT count(*) FROM users", S, T::All, R::Ok);
    case(
        "SELECT count(DISTINCT name) FROM users",
        S,
        T::All,
        R::No("DISTINCT aggregate"),
    );
    case(
        "SELECT avg(DISTINCT x) FROM users",
        S,
        T::All,
        R::No("DISTINCT aggregate"),
    );
    case("SELECT sum(x)/count(*) FROM users", S, T::All, R::Ok);
    case("SELECT count(*)::int AS n FROM users", S, T::All, R::Ok);
    case(
        "SELECT name, CAST(count(*) AS bigint) FROM users GROUP BY name",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT count(*)::text FROM users",
        S,
        T::All,
        R::No("expression over aggregates"),
    );
    case("SELECT sum(x)::int FROM users", S, T::All, R::Ok);
    case("SELECT count(*) + 1 FROM users", S, T::All, R::Ok);
    case("SELECT coalesce(sum(x), 0) FROM users", S, T::All, R::Ok);
    case(
        "SELECT string_agg(name, ',') FROM users",
        S,
        T::All,
        R::No("string_agg"),
    );
    case(
        "SELECT array_agg(name) FROM users",
        S,
        T::All,
        R::No("array_agg"),
    );
    case(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM users",
        S,
        T::All,
        R::No("percentile_cont"),
    );
    case(
        "SELECT city, count(*) FROM users GROUP BY city HAVING count(*) > 1 OR city = 'x'",
        S,
        T::All,
        R::No("HAVING condition"),
    );
    case(
        "SELECT city, count(*) FROM users GROUP BY city HAVING sum(x) / count(*) > 1",
        S,
        T::All,
        R::Ok,
    );
    case(
        "SELECT city FROM users GROUP BY city HAVING count(DISTINCT x) > 1",
        S,
        T::All,
        R::No("DISTINCT aggregate"),
    );
    case(
        "SELECT city, count(*) FROM users GROUP BY ROLLUP (city)",
        S,
        T::All,
        R::No("ROLLUP"),
    );
    case(
        "SELECT * FROM users GROUP BY city",
        S,
        T::All,
        R::No("SELECT * with GROUP BY"),
    );
    case(
        "SELECT DISTINCT ON (city) * FROM users",
        S,
        T::All,
        R::No("DISTINCT ON"),
    );
    // Grouped by the shard key: groups are whole on each shard.
    case(
        "SELECT user_id, count(*), sum(x)/count(*), count(DISTINCT tag) FROM posts GROUP BY user_id HAVING count(*) > 1 ORDER BY 2 DESC LIMIT 5",
        S,
        T::All,
        R::Ok,
    );
    // On one shard, anything.
    case(
        "SELECT string_agg(title, ','), sum(x)/count(*) FROM posts WHERE user_id = 3 HAVING count(*) > 1",
        S,
        T::Keys(vec![int(3)]),
        R::Ok,
    );
    // Several keys: refused only if they span shards.
    case(
        "SELECT string_agg(title, ',') FROM posts WHERE user_id IN (1, 2)",
        S,
        T::Keys(vec![int(1), int(2)]),
        R::Multi("string_agg"),
    );
}

#[test]
fn writes() {
    case(
        "UPDATE users SET name = 'x' WHERE id = 5",
        P,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    case(
        "UPDATE users SET name = $1 WHERE id = $2",
        P,
        T::Keys(vec![param(2)]),
        R::Ok,
    );
    case("UPDATE users SET name = 'x'", P, T::All, R::Ok);
    case(
        "UPDATE users SET name = 'x' WHERE id % 2 = 0",
        P,
        T::All,
        R::Ok,
    );
    case(
        "UPDATE users SET name = 'x' WHERE id IN (1, 2)",
        P,
        T::Keys(vec![int(1), int(2)]),
        R::Ok,
    );
    case(
        "DELETE FROM users WHERE id = 5",
        P,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    case("DELETE FROM users WHERE id = 5 OR id = 6", P, T::All, R::Ok);
    case("DELETE FROM users", P, T::All, R::Ok);
    case(
        "DELETE FROM users u USING posts p WHERE p.user_id = u.id AND p.flag",
        P,
        T::All,
        R::Ok,
    );
    case(
        "DELETE FROM users u USING posts p WHERE p.title = u.name",
        P,
        T::All,
        R::No("join across shards"),
    );
    case(
        "UPDATE users u SET n = (SELECT count(*) FROM posts p WHERE p.user_id = u.id)",
        P,
        T::All,
        R::Ok,
    );
    case(
        "UPDATE users SET n = (SELECT max(n) FROM users)",
        P,
        T::All,
        R::No("subquery or CTE"),
    );
    case(
        "DELETE FROM users WHERE id IN (SELECT user_id FROM posts WHERE spam)",
        P,
        T::All,
        R::Ok,
    );
    case(
        "UPDATE users SET id = 6 WHERE id = 5",
        P,
        T::All,
        R::No("changing the shard key column id"),
    );
    case(
        "UPDATE users SET (name, id) = ('a', 6) WHERE id = 5",
        P,
        T::All,
        R::No("shard key"),
    );
    // Even with a hint.
    case(
        "/* shardgate: shard=1 */ UPDATE users SET id = 6 WHERE id = 5",
        P,
        T::All,
        R::No("shard key"),
    );
    case(
        "WITH x AS (SELECT 1) UPDATE users SET a = 1 WHERE id = 3",
        P,
        T::Keys(vec![int(3)]),
        R::Ok,
    );
    case(
        "UPDATE orders SET a = 1 WHERE user_id IN (SELECT id FROM users)",
        P,
        T::Default,
        R::No("unsharded table orders"),
    );
    case("UPDATE countries SET name = 'x'", P, T::Each, R::Ok);
    case("DELETE FROM countries WHERE code = 'x'", P, T::Each, R::Ok);
    case(
        "UPDATE countries SET n = (SELECT count(*) FROM users)",
        P,
        T::Each,
        R::No("reads sharded table users"),
    );
    case(
        "MERGE INTO users u USING posts p ON u.id = p.user_id WHEN MATCHED THEN UPDATE SET n = 1",
        P,
        T::Default,
        R::No("MERGE into sharded table"),
    );
    case("TRUNCATE users", P, T::Each, R::Ok);
}

#[test]
fn inserts() {
    case(
        "INSERT INTO users (id, name) VALUES (5, 'a')",
        P,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    case(
        "INSERT INTO users (name, id) VALUES ($1, $2)",
        P,
        T::Keys(vec![param(2)]),
        R::Ok,
    );
    case(
        "INSERT INTO users (id, name) VALUES (5, 'a') RETURNING id",
        P,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    // Rows sharing one key go to that one shard (DESIGN §3 trap).
    case(
        "INSERT INTO users (id, name) VALUES (5, 'a'), (5, 'b'), ('5', 'c')",
        P,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    case(
        "INSERT INTO users (id, name) VALUES (5, 'a'), (6, 'b'), ($1, 'c')",
        P,
        T::Split(vec![int(5), int(6), param(1)]),
        R::Ok,
    );
    case(
        "INSERT INTO users (id) VALUES (1), (2) ON CONFLICT (id) DO NOTHING RETURNING id",
        P,
        T::Split(vec![int(1), int(2)]),
        R::Multi("RETURNING"),
    );
    case(
        "INSERT INTO users (id, n) VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n",
        P,
        T::Keys(vec![int(1)]),
        R::Ok,
    );
    case(
        "INSERT INTO users (id, n) VALUES (1, 2) ON CONFLICT (n) DO UPDATE SET id = EXCLUDED.id",
        P,
        T::All,
        R::No("shard key"),
    );
    case(
        "INSERT INTO users (id) VALUES (DEFAULT)",
        P,
        T::All,
        R::No("DEFAULT for the shard key"),
    );
    case(
        "INSERT INTO users (id) VALUES (NULL)",
        P,
        T::All,
        R::No("NULL shard key"),
    );
    case(
        "INSERT INTO users (id) VALUES (nextval('users_id_seq'))",
        P,
        T::All,
        R::No("constant or a parameter"),
    );
    case(
        "INSERT INTO users (id) VALUES (1), (2 + 3)",
        P,
        T::All,
        R::No("constant or a parameter"),
    );
    case(
        "INSERT INTO users (name) VALUES ('a')",
        P,
        T::All,
        R::No("must give the shard key column id"),
    );
    case(
        "INSERT INTO users VALUES (1, 'a')",
        P,
        T::All,
        R::No("without a column list"),
    );
    case(
        "INSERT INTO users DEFAULT VALUES",
        P,
        T::All,
        R::No("without VALUES"),
    );
    case(
        "INSERT INTO users (id, name) SELECT id, name FROM users_old",
        P,
        T::All,
        R::No("unsharded table users_old"),
    );
    case(
        "INSERT INTO posts (user_id, t) SELECT id, 'x' FROM users",
        P,
        T::All,
        R::No("from a SELECT"),
    );
    case(
        "/* shardgate: shard=3 */ INSERT INTO posts (user_id, t) SELECT id, 'x' FROM users WHERE id = 3",
        P,
        T::Shard(3),
        R::Ok,
    );
    case(
        "INSERT INTO posts (user_id, n) VALUES (5, (SELECT count(*) FROM posts WHERE user_id = 5))",
        P,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    case(
        "INSERT INTO posts (user_id, n) VALUES (5, (SELECT count(*) FROM posts))",
        P,
        T::All,
        R::No("subquery or CTE"),
    );
    case(
        "INSERT INTO tenants (name) VALUES ('acme')",
        P,
        T::Keys(vec![text("acme")]),
        R::Ok,
    );
    case(
        "INSERT INTO countries (code) VALUES ('nl')",
        P,
        T::Each,
        R::Ok,
    );
    case(
        "INSERT INTO countries (code) SELECT code FROM orders",
        P,
        T::Each,
        R::No("reads unsharded table orders"),
    );
    case("INSERT INTO orders (a) VALUES (1)", P, T::Default, R::Ok);
    case(
        "INSERT INTO orders (a) SELECT id FROM users",
        P,
        T::Default,
        R::No("sharded table users"),
    );
    case(
        "WITH x AS (SELECT 1) INSERT INTO users (id) VALUES (7)",
        P,
        T::Keys(vec![int(7)]),
        R::Ok,
    );
}

#[test]
fn pgbench() {
    case(
        "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
        S,
        T::Keys(vec![int(12345)]),
        R::Ok,
    );
    case(
        "UPDATE pgbench_accounts SET abalance = abalance + -4417 WHERE aid = 61017;",
        P,
        T::Keys(vec![int(61017)]),
        R::Ok,
    );
    case(
        "UPDATE pgbench_tellers SET tbalance = tbalance + -4417 WHERE tid = 7;",
        P,
        T::Keys(vec![int(7)]),
        R::Ok,
    );
    case(
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 61017, -4417, CURRENT_TIMESTAMP);",
        P,
        T::Keys(vec![int(61017)]),
        R::Ok,
    );
    case(
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
        P,
        T::Keys(vec![param(2)]),
        R::Ok,
    );
}

#[test]
fn hints() {
    case(
        "/* shardgate: shard=2 */ SELECT * FROM users",
        S,
        T::Shard(2),
        R::Ok,
    );
    case(
        "/* shardgate: key=42 */ SELECT * FROM users",
        S,
        T::Keys(vec![int(42)]),
        R::Ok,
    );
    case(
        "/* shardgate: key=acme */ SELECT * FROM tenants",
        S,
        T::Keys(vec![text("acme")]),
        R::Ok,
    );
    case(
        "/* shardgate: key=42 */ SELECT 1",
        S,
        T::Keys(vec![int(42)]),
        R::Ok,
    );
    case(
        "/* shardgate: key=abc */ SELECT 1",
        S,
        T::Keys(vec![text("abc")]),
        R::Ok,
    );
    case(
        "/* shardgate: key=abc */ SELECT * FROM users",
        S,
        T::All,
        R::No("not a valid shard key"),
    );
    case(
        "/* shardgate: primary */ SELECT * FROM users WHERE id = 1",
        P,
        T::Keys(vec![int(1)]),
        R::Ok,
    );
    case(
        "/* shardgate: shard=1, primary */ SELECT 1",
        P,
        T::Shard(1),
        R::Ok,
    );
    case(
        "/* shardgate: shard=x */ SELECT 1",
        P,
        T::Default,
        R::No("invalid shardgate hint"),
    );
    // A hint makes a refused cross-shard statement run where told.
    case(
        "/* shardgate: shard=0 */ SELECT * FROM users u JOIN posts p ON p.title = u.name",
        S,
        T::Shard(0),
        R::Ok,
    );
    case(
        "/* shardgate: key=5 */ SELECT id, row_number() OVER () FROM users",
        S,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    let h = Hint {
        key: Some("9".into()),
        ..Hint::default()
    };
    let plan = plan_with_hint("SELECT * FROM users", &catalog(), Some(&h));
    assert_eq!(
        plan.target,
        Target::Keys {
            key_type: KeyType::Int,
            keys: vec![int(9)]
        }
    );
    assert!(plan.merge.is_none());
}

#[test]
fn unparseable() {
    // The parser rejects these; they touch no sharded table.
    case(
        "SELECT * FROM orders FOR NO KEY UPDATE",
        P,
        T::Default,
        R::Ok,
    );
    case("VACUUM ANALYZE orders", P, T::Default, R::Ok);
    case("FROBNICATE orders", P, T::Default, R::Ok);
    // They touch a sharded table: refused with a hint suggestion.
    case("FROBNICATE users", P, T::Default, R::No("hint"));
    case(
        "/* shardgate: shard=1 */ FROBNICATE users",
        P,
        T::Shard(1),
        R::Ok,
    );
    case(
        "/* shardgate: key=1 */ FROBNICATE users",
        P,
        T::Keys(vec![int(1)]),
        R::Ok,
    );
    // FOR NO KEY UPDATE is readable after all.
    case(
        "SELECT * FROM users WHERE id = 1 FOR NO KEY UPDATE",
        P,
        T::Keys(vec![int(1)]),
        R::Ok,
    );
    case("SELECT * FROM users FOR KEY SHARE", P, T::All, R::Ok);
    case(
        "SELECT * FROM users ORDER BY name LIMIT 1 FOR NO KEY UPDATE",
        P,
        T::All,
        R::No("FOR NO KEY UPDATE"),
    );
    case("VACUUM users", P, T::Each, R::Ok);
}

#[test]
fn ddl() {
    case(
        "CREATE TABLE users (id bigint PRIMARY KEY)",
        P,
        T::Each,
        R::Ok,
    );
    case("CREATE TABLE orders2 (id bigint)", P, T::Default, R::Ok);
    case("CREATE INDEX ON users (name)", P, T::Each, R::Ok);
    case("CREATE INDEX ON orders (name)", P, T::Default, R::Ok);
    case("ALTER TABLE users ADD COLUMN x int", P, T::Each, R::Ok);
    case("ALTER TABLE orders ADD COLUMN x int", P, T::Default, R::Ok);
    case("DROP TABLE users", P, T::Each, R::Ok);
    case("DROP TABLE orders", P, T::Default, R::Ok);
    case("DROP TABLE orders, users", P, T::Each, R::Ok);
    case("TRUNCATE countries", P, T::Each, R::Ok);
    case("GRANT SELECT ON users TO app", P, T::Each, R::Ok);
    case("COMMENT ON TABLE users IS 'x'", P, T::Each, R::Ok);
    case(
        "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql",
        P,
        T::Each,
        R::Ok,
    );
    case("CREATE EXTENSION pgcrypto", P, T::Each, R::Ok);
    // A view over a sharded table would read one shard's part of it.
    case(
        "CREATE VIEW v AS SELECT * FROM users",
        P,
        T::Each,
        R::No("view or rule over sharded table users"),
    );
    case(
        "CREATE VIEW v AS SELECT * FROM countries",
        P,
        T::Each,
        R::Ok,
    );
    case(
        "CREATE TABLE t2 AS SELECT * FROM users",
        P,
        T::Each,
        R::No("CREATE TABLE ... AS"),
    );
    case(
        "CREATE MATERIALIZED VIEW mv AS SELECT * FROM users",
        P,
        T::Each,
        R::No("view or rule over sharded table users"),
    );
    case(
        "LOCK TABLE users IN ACCESS EXCLUSIVE MODE",
        P,
        T::Each,
        R::Ok,
    );
    let p = p("CREATE INDEX CONCURRENTLY i ON users (name)");
    assert!(p.no_tx_block);
    assert_eq!(p.kind, Kind::Ddl);
}

#[test]
fn copy() {
    let c = p("COPY users (name, id) FROM STDIN WITH (FORMAT csv, HEADER true)");
    assert_eq!(c.role, P);
    assert_eq!(
        c.target,
        Target::SplitCopy {
            key_type: KeyType::Int,
            key_index: Some(1)
        }
    );
    let info = c.copy.unwrap();
    assert_eq!(info.format, CopyFormat::Csv);
    assert!(info.header);
    assert!(info.from);
    let c = p("COPY users FROM STDIN");
    assert_eq!(
        c.target,
        Target::SplitCopy {
            key_type: KeyType::Int,
            key_index: None
        }
    );
    case(
        "COPY users (name) FROM STDIN",
        P,
        T::All,
        R::No("shard key column id"),
    );
    case("COPY users FROM '/tmp/x'", P, T::All, R::No("server file"));
    case("COPY users TO STDOUT", S, T::All, R::Ok);
    case("COPY countries FROM STDIN", P, T::Each, R::Ok);
    case("COPY countries TO STDOUT", S, T::Any, R::Ok);
    case(
        "COPY (SELECT * FROM users WHERE id = 1) TO STDOUT",
        S,
        T::Keys(vec![int(1)]),
        R::Ok,
    );
    case("COPY (SELECT * FROM users) TO STDOUT", S, T::All, R::Ok);
    case(
        "COPY (SELECT * FROM users ORDER BY id) TO STDOUT",
        S,
        T::All,
        R::No("COPY (query)"),
    );
    let c = p("COPY users TO STDOUT (FORMAT csv, HEADER)");
    assert!(c.copy.unwrap().header);
    assert_eq!(c.kind, Kind::Copy);
    // FORCE_NOT_NULL / FORCE_NULL matter only when they name the key column.
    for (sql, not_null, null) in [
        (
            "COPY users (id, name) FROM STDIN (FORMAT csv, FORCE_NOT_NULL (ID))",
            true,
            false,
        ),
        (
            "COPY users (id, name) FROM STDIN (FORMAT csv, FORCE_NULL (name, id))",
            false,
            true,
        ),
        (
            "COPY users (id, name) FROM STDIN (FORMAT csv, FORCE_NOT_NULL (name))",
            false,
            false,
        ),
        (
            "COPY users (id, name) FROM STDIN CSV FORCE NOT NULL id",
            true,
            false,
        ),
        (
            "COPY users FROM STDIN (FORMAT csv, FORCE_NOT_NULL (id), FORCE_NULL (id))",
            true,
            true,
        ),
    ] {
        let info = p(sql).copy.unwrap();
        assert_eq!(
            (info.key_force_not_null, info.key_force_null),
            (not_null, null),
            "{sql}"
        );
    }
    // The data's encoding is the proxy's to read (it knows the session's): noted, planned.
    for enc in ["'LATIN1'", "'UTF8'", "'SJIS'"] {
        let c = p(&format!(
            "COPY users (id, name) FROM STDIN (ENCODING {enc})"
        ));
        assert!(matches!(c.target, Target::SplitCopy { .. }), "{enc}");
        let info = c.copy.unwrap();
        assert_eq!(
            info.encoding.as_deref(),
            Some(enc.trim_matches('\'')),
            "{enc}"
        );
    }
    case(
        "COPY countries FROM STDIN (ENCODING 'LATIN1')",
        P,
        T::Each,
        R::Ok,
    );
}

#[test]
fn explain() {
    case(
        "EXPLAIN SELECT * FROM users WHERE id = 1",
        S,
        T::Keys(vec![int(1)]),
        R::Ok,
    );
    case(
        "EXPLAIN SELECT * FROM users ORDER BY name LIMIT 1",
        S,
        T::Default,
        R::Ok,
    );
    case(
        "EXPLAIN ANALYZE SELECT * FROM users",
        S,
        T::Default,
        R::No("EXPLAIN ANALYZE"),
    );
    case(
        "EXPLAIN ANALYZE DELETE FROM users WHERE id = 4",
        P,
        T::Keys(vec![int(4)]),
        R::Ok,
    );
    case(
        "EXPLAIN (ANALYZE false) SELECT * FROM users",
        S,
        T::Default,
        R::Ok,
    );
}

#[test]
fn multi_statement_strings() {
    case(
        "BEGIN; UPDATE users SET n = 1 WHERE id = 5; COMMIT",
        P,
        T::Keys(vec![int(5)]),
        R::Ok,
    );
    case(
        "SELECT * FROM users WHERE id = 1; SELECT * FROM users WHERE id = 2",
        S,
        T::Keys(vec![int(1), int(2)]),
        R::Multi("more than one shard"),
    );
    case(
        "SELECT 1; SELECT count(*) FROM users",
        S,
        T::Default,
        R::No("more than one shard"),
    );
    case(
        "UPDATE orders SET a = 1; UPDATE users SET n = 1 WHERE id = 5",
        P,
        T::Default,
        R::No("more than one shard"),
    );
    case(
        "INSERT INTO countries (code) VALUES ('a'); INSERT INTO countries (code) VALUES ('b')",
        P,
        T::Each,
        R::Ok,
    );
    case("SET x = 1; SELECT * FROM countries", S, T::Any, R::Ok);
    case("BEGIN READ ONLY; SELECT 1; COMMIT", S, T::Default, R::Ok);
    // A refusal in any statement refuses the string.
    case(
        "SELECT 1; SELECT * FROM users u JOIN posts p ON p.t = u.n",
        S,
        T::Default,
        R::No("join across shards"),
    );
    // Statement boundaries that depend on standard_conforming_strings.
    case(
        "SELECT 'a\\'; DELETE FROM users; --'",
        P,
        T::Default,
        R::No("standard_conforming_strings"),
    );
    let many = plan_many(
        "BEGIN; SELECT * FROM users WHERE id = 3; COMMIT",
        &catalog(),
    );
    assert_eq!(many.len(), 3);
    assert_eq!(
        many[1].1.target,
        Target::Keys {
            key_type: KeyType::Int,
            keys: vec![int(3)]
        }
    );
}

/// Which multi-statement strings may run statement by statement when they span shards.
#[test]
fn separable_statement_strings() {
    let sep = |sql: &str| separate_statements(sql, &catalog());
    let two =
        "INSERT INTO users (id, n) VALUES (1, 'a'); INSERT INTO users (id, n) VALUES (2, 'b')";
    let parts = sep(two).expect(two);
    let texts: Vec<&str> = parts.iter().map(|(r, _)| two[r.clone()].trim()).collect();
    assert_eq!(
        texts,
        [
            "INSERT INTO users (id, n) VALUES (1, 'a')",
            "INSERT INTO users (id, n) VALUES (2, 'b')"
        ]
    );
    assert_eq!(
        parts[1].1.target,
        Target::Keys {
            key_type: KeyType::Int,
            keys: vec![int(2)]
        }
    );
    assert!(sep("DELETE FROM users; DELETE FROM posts; SELECT count(*) FROM users").is_some());
    for sql in [
        // One statement: nothing to separate.
        "DELETE FROM users",
        // Transaction control, session state, DDL, COPY: they belong to the whole string.
        "INSERT INTO users (id) VALUES (1); COMMIT",
        "BEGIN; INSERT INTO users (id) VALUES (1)",
        "INSERT INTO users (id) VALUES (1); SET x = 1",
        "INSERT INTO users (id) VALUES (1); CREATE TABLE t (x int)",
        "COPY users FROM STDIN; SELECT 1",
        // A hint speaks for the whole string.
        "/* shardgate: shard=1 */ DELETE FROM users; DELETE FROM posts",
        // A refused statement refuses the string.
        "SELECT 1; SELECT * FROM users u JOIN posts p ON p.t = u.n",
    ] {
        assert!(sep(sql).is_none(), "{sql}");
    }
}

// --- merge plans ------------------------------------------------------------------------

fn merge_of(sql: &str) -> (MergePlan, Option<String>) {
    let plan = p(sql);
    assert!(plan.refusal.is_none(), "{sql}: {:?}", plan.refusal);
    (plan.merge.expect(sql), plan.rewritten)
}

fn key(column: ColumnRef, descending: bool, nulls_first: bool) -> SortKey {
    SortKey {
        column,
        descending,
        nulls_first,
    }
}

use ColumnRef::{Hidden as H, Visible as V};

#[test]
fn merge_order_by() {
    let (m, rw) = merge_of("SELECT id, name FROM users ORDER BY name");
    assert_eq!(m.order_by, vec![key(V(1), false, false)]);
    assert_eq!(rw, None);
    assert_eq!(m.hidden_columns, 0);
    let (m, _) = merge_of("SELECT id, name FROM users ORDER BY 2 DESC");
    assert_eq!(m.order_by, vec![key(V(1), true, true)]);
    let (m, _) =
        merge_of("SELECT id, name FROM users ORDER BY name DESC NULLS LAST, id NULLS FIRST");
    assert_eq!(
        m.order_by,
        vec![key(V(1), true, false), key(V(0), false, true)]
    );
    let (m, _) = merge_of("SELECT id AS n, name FROM users ORDER BY n");
    assert_eq!(m.order_by, vec![key(V(0), false, false)]);
    // An alias shadows an input column of the same name.
    let (m, _) = merge_of("SELECT a AS b, b AS a FROM users ORDER BY a");
    assert_eq!(m.order_by, vec![key(V(1), false, false)]);
    // Keys not in the select list: hidden trailing columns.
    let (m, rw) = merge_of("SELECT id FROM users ORDER BY created_at DESC");
    assert_eq!(m.order_by, vec![key(H(0), true, true)]);
    assert_eq!(m.hidden_columns, 1);
    assert_eq!(
        rw.as_deref(),
        Some("SELECT id, created_at FROM users ORDER BY created_at DESC")
    );
    let (m, rw) = merge_of("SELECT id FROM users ORDER BY lower(name), id + 1 LIMIT 3");
    assert_eq!(
        m.order_by,
        vec![key(H(0), false, false), key(H(1), false, false)]
    );
    assert_eq!(m.hidden_columns, 2);
    assert_eq!(
        rw.as_deref(),
        Some("SELECT id, lower(name), id + 1 FROM users ORDER BY lower(name), id + 1 LIMIT 3")
    );
    // Expressions equal to a select-list item use that column.
    let (m, _) = merge_of("SELECT id, lower(name) FROM users ORDER BY lower(name)");
    assert_eq!(m.order_by, vec![key(V(1), false, false)]);
    // After a *, a named item's index is unknown: copy it.
    let (m, rw) = merge_of("SELECT *, lower(name) AS ln FROM users ORDER BY ln");
    assert_eq!(m.order_by, vec![key(H(0), false, false)]);
    assert_eq!(
        rw.as_deref(),
        Some("SELECT *, lower(name) AS ln, lower(name) FROM users ORDER BY ln")
    );
    let (m, _) = merge_of("SELECT * FROM users ORDER BY 3");
    assert_eq!(m.order_by, vec![key(V(2), false, false)]);
    let (m, _) = merge_of("SELECT DISTINCT city FROM users ORDER BY city");
    assert!(m.distinct);
    assert_eq!(m.order_by, vec![key(V(0), false, false)]);
    case(
        "SELECT DISTINCT city FROM users ORDER BY name",
        S,
        T::All,
        R::No("SELECT DISTINCT"),
    );
    case(
        "SELECT id FROM users ORDER BY name USING <",
        P,
        T::All,
        R::No(""),
    );
}

#[test]
fn merge_limit_offset() {
    let (m, rw) = merge_of("SELECT id FROM users ORDER BY id LIMIT 10");
    assert_eq!(m.limit, Some(RowCount::Value(10)));
    assert_eq!(m.offset, None);
    assert_eq!(rw, None, "LIMIT alone is pushed down as is");
    let (m, rw) = merge_of("SELECT id FROM users ORDER BY id LIMIT 10 OFFSET 20");
    assert_eq!(m.limit, Some(RowCount::Value(10)));
    assert_eq!(m.offset, Some(RowCount::Value(20)));
    assert_eq!(
        rw.as_deref(),
        Some("SELECT id FROM users ORDER BY id LIMIT 30")
    );
    // OFFSET without LIMIT is global: the shards return everything.
    let (m, rw) = merge_of("SELECT id FROM users ORDER BY id OFFSET 5");
    assert_eq!(m.limit, None);
    assert_eq!(m.offset, Some(RowCount::Value(5)));
    assert_eq!(rw.as_deref(), Some("SELECT id FROM users ORDER BY id"));
    let (m, rw) = merge_of("SELECT id FROM users ORDER BY id LIMIT $1 OFFSET $2");
    assert_eq!(m.limit, Some(RowCount::Param(1)));
    assert_eq!(m.offset, Some(RowCount::Param(2)));
    assert_eq!(
        rw.as_deref(),
        Some("SELECT id FROM users ORDER BY id LIMIT $1::BIGINT + $2::BIGINT")
    );
    let (m, rw) = merge_of("SELECT id FROM users ORDER BY id OFFSET $1");
    assert_eq!(m.offset, Some(RowCount::Param(1)));
    assert_eq!(
        rw.as_deref(),
        Some("SELECT id FROM users ORDER BY id OFFSET $1::BIGINT * 0")
    );
    let (m, rw) =
        merge_of("SELECT id FROM users ORDER BY id OFFSET 2 ROWS FETCH FIRST 3 ROWS ONLY");
    assert_eq!(
        (m.limit, m.offset),
        (Some(RowCount::Value(3)), Some(RowCount::Value(2)))
    );
    assert_eq!(
        rw.as_deref(),
        Some("SELECT id FROM users ORDER BY id LIMIT 5")
    );
    let (m, _) = merge_of("SELECT id FROM users LIMIT ALL");
    assert_eq!(m.limit, None);
    let (m, _) = merge_of("SELECT id FROM users LIMIT 5 OFFSET 0");
    assert_eq!((m.limit, m.offset), (Some(RowCount::Value(5)), None));
    case(
        "SELECT id FROM users ORDER BY id FETCH FIRST 3 ROWS WITH TIES",
        S,
        T::All,
        R::No("WITH TIES"),
    );
    case(
        "SELECT id FROM users LIMIT 2 + 3",
        S,
        T::All,
        R::No("LIMIT"),
    );
    // Pushed down with DISTINCT too.
    let (m, rw) = merge_of("SELECT DISTINCT city FROM users ORDER BY city LIMIT 2 OFFSET 1");
    assert!(m.distinct);
    assert_eq!(
        rw.as_deref(),
        Some("SELECT DISTINCT city FROM users ORDER BY city LIMIT 3")
    );
}

#[test]
fn merge_aggregates() {
    let (m, rw) = merge_of("SELECT count(*), sum(x), min(x), max(x) FROM users");
    assert_eq!(
        m.aggregates,
        vec![AggMerge::Count, AggMerge::Sum, AggMerge::Min, AggMerge::Max]
    );
    assert!(m.group_by.is_empty());
    assert_eq!(rw, None);
    let (m, rw) = merge_of("SELECT avg(x) FROM users");
    assert_eq!(
        m.aggregates,
        vec![
            AggMerge::Avg {
                sum: H(0),
                count: H(1),
                round: None,
            },
            AggMerge::Sum,
            AggMerge::Count
        ]
    );
    assert_eq!(m.hidden_columns, 2);
    assert_eq!(
        rw.as_deref(),
        Some("SELECT avg(x), sum(x), count(x) FROM users")
    );
    let (m, rw) = merge_of("SELECT avg(x) FILTER (WHERE y > 0) AS a FROM users");
    assert_eq!(m.hidden_columns, 2);
    assert_eq!(
        rw.as_deref(),
        Some("SELECT avg(x) FILTER (WHERE y > 0) AS a, sum(x) FILTER (WHERE y > 0), count(x) FILTER (WHERE y > 0) FROM users")
    );
    // GROUP BY a non-key column: partials combined per group, LIMIT applied after.
    let (m, rw) =
        merge_of("SELECT city, count(*) FROM users GROUP BY city ORDER BY count(*) DESC LIMIT 3");
    assert_eq!(m.aggregates, vec![AggMerge::None, AggMerge::Count]);
    assert_eq!(m.group_by, vec![V(0)]);
    assert_eq!(m.order_by, vec![key(V(1), true, true)]);
    assert_eq!(m.limit, Some(RowCount::Value(3)));
    assert_eq!(
        rw.as_deref(),
        Some("SELECT city, count(*) FROM users GROUP BY city")
    );
    // A count cast to an integer type (node-postgres's count(*)::int): the merge casts the
    // combined count.
    let (m, _) = merge_of("SELECT city, count(*)::int AS n FROM users GROUP BY city");
    assert_eq!(
        m.aggregates,
        vec![AggMerge::None, AggMerge::Expr(0), AggMerge::Count]
    );
    assert_eq!(
        m.expressions,
        vec![AggExpr::Cast {
            to: ArithType::Int4,
            expr: Box::new(AggExpr::Column(H(0))),
        }]
    );
    // coalesce(sum(x), 0): the combined sum, or 0.
    let (m, rw) = merge_of(
        "SELECT city, coalesce(sum(age), 0) AS total, coalesce(count(x), 0) FROM users GROUP BY city \
         HAVING coalesce(sum(age), 0) > 10 ORDER BY COALESCE(SUM(x), 0) DESC",
    );
    assert_eq!(
        m.aggregates,
        vec![
            AggMerge::None,
            AggMerge::Expr(0),
            AggMerge::Expr(1),
            AggMerge::Sum,
            AggMerge::Count,
            AggMerge::Sum,
            AggMerge::Expr(2),
        ]
    );
    assert_eq!(
        m.expressions[0],
        AggExpr::Coalesce(
            Box::new(AggExpr::Column(H(0))),
            Box::new(AggExpr::Number("0".into()))
        )
    );
    assert_eq!(m.having.len(), 1);
    assert_eq!(m.having[0].column, V(1));
    assert_eq!(m.order_by, vec![key(H(3), true, true)]);
    assert_eq!(
        rw.as_deref(),
        Some(
            "SELECT city, CASE WHEN false THEN coalesce(sum(age), 0) END AS total, \
             CASE WHEN false THEN coalesce(count(x), 0) END AS \"coalesce\", sum(age), count(x), \
             SUM(x), CASE WHEN false THEN COALESCE(SUM(x), 0) END FROM users GROUP BY city"
        )
    );
    // round(avg(x), n): the combined average, rounded at the merge.
    let (m, rw) = merge_of(
        "SELECT city, round(avg(age), 2), round(avg(age)) FROM users GROUP BY city \
         HAVING round(avg(age), 1) > 3 ORDER BY round(avg(age), 2)",
    );
    let avg = |round| AggMerge::Avg {
        sum: H(0),
        count: H(1),
        round,
    };
    assert_eq!(
        m.aggregates,
        vec![
            AggMerge::None,
            avg(Some(2)),
            avg(Some(0)),
            AggMerge::Sum,
            AggMerge::Count,
            avg(Some(1)),
        ]
    );
    assert_eq!(m.having[0].column, H(2));
    assert_eq!(m.order_by, vec![key(V(1), false, false)]);
    assert_eq!(
        rw.as_deref(),
        Some("SELECT city, round(avg(age), 2), round(avg(age)), sum(age), count(age), round(avg(age), 1) FROM users GROUP BY city")
    );
    let (m, _) = merge_of("SELECT pg_catalog.round(avg(age), 2) FROM users");
    assert_eq!(m.aggregates[0], avg(Some(2)));
    // A user's own round() or coalesce() is not Postgres's.
    case(
        "SELECT myschema.round(avg(age), 2) FROM users",
        S,
        T::All,
        R::No("expression over aggregates"),
    );
    case(
        "SELECT public.coalesce(sum(age), 0) FROM users",
        S,
        T::All,
        R::No("expression over aggregates"),
    );
    // Postgres refuses (42P10) an ORDER BY of a SELECT DISTINCT that is not selected.
    case(
        "SELECT DISTINCT city FROM users GROUP BY city ORDER BY round(avg(age), 2)",
        S,
        T::All,
        R::No("SELECT DISTINCT"),
    );
    // Casts are the merge's, after HAVING: a smallint cast of a dropped group's count
    // never runs, as on Postgres.
    for sql in [
        "SELECT city, count(*)::int2 FROM users GROUP BY city HAVING count(*) < 10",
        "SELECT city, count(*)::int FROM users GROUP BY city HAVING count(*) < 10",
        "SELECT city FROM users GROUP BY city HAVING count(*)::int2 > 1",
    ] {
        case(sql, S, T::All, R::Ok);
    }
    for sql in [
        "SELECT round(avg(age), $1) FROM users",
        "SELECT round(avg(age), -1) FROM users",
        "SELECT round(avg(age), 2.0) FROM users",
        "SELECT round(avg(age), 1001) FROM users",
        "SELECT round(sum(age), 2) FROM users",
        "SELECT round(avg(age) * 2, 2) FROM users",
        "SELECT trunc(avg(age), 2) FROM users",
    ] {
        case(sql, S, T::All, R::No("expression over aggregates"));
    }
    // Any other fallback, or min/max, would not add up: an empty shard's value would count.
    // coalesce of a combined aggregate with any number: the merge's, after combining.
    for sql in [
        "SELECT coalesce(sum(age), 0.0) FROM users",
        "SELECT coalesce(sum(age), 1) FROM users",
        "SELECT coalesce(sum(age), -0) FROM users",
        "SELECT coalesce(max(age), 0) FROM users",
        "SELECT coalesce(avg(age), 0) FROM users",
    ] {
        case(sql, S, T::All, R::Ok);
    }
    for sql in [
        "SELECT coalesce(sum(age), 0, 1) FROM users",
        "SELECT coalesce(0, sum(age)) FROM users",
    ] {
        case(sql, S, T::All, R::No("expression over aggregates"));
    }
    // Arithmetic over combined aggregates: computed by the merge; the shards return a
    // NULL of the expression's type under its name, and the aggregates it reads.
    let (m, rw) = merge_of(
        "SELECT city, sum(age) / count(*), (max(age) - min(age))::float8 AS spread, \
         100.0 * count(x) / count(*), -sum(age), sum(age)::numeric FROM users GROUP BY city \
         HAVING sum(age) * 2 > 10 ORDER BY sum(age) / count(*) DESC, count(x) / -(2)",
    );
    let arith = |op, left, right| AggExpr::Arith {
        op,
        left: Box::new(left),
        right: Box::new(right),
    };
    let col = AggExpr::Column;
    let num = |n: &str| AggExpr::Number(n.to_string());
    assert_eq!(
        rw.as_deref(),
        Some(
            "SELECT city, CASE WHEN false THEN sum(age) / count(*) END AS \"?column?\", \
             CASE WHEN false THEN (max(age) - min(age))::FLOAT8 END AS spread, \
             CASE WHEN false THEN 100.0 * count(x) / count(*) END AS \"?column?\", \
             CASE WHEN false THEN -sum(age) END AS \"?column?\", \
             CASE WHEN false THEN sum(age)::NUMERIC END AS \"sum\", \
             sum(age), count(*), max(age), min(age), count(x), \
             CASE WHEN false THEN count(x) / -(2) END, \
             CASE WHEN false THEN sum(age) * 2 END FROM users GROUP BY city"
        )
    );
    assert_eq!(
        m.aggregates,
        vec![
            AggMerge::None,
            AggMerge::Expr(0),
            AggMerge::Expr(1),
            AggMerge::Expr(2),
            AggMerge::Expr(3),
            AggMerge::Expr(4),
            AggMerge::Sum,
            AggMerge::Count,
            AggMerge::Max,
            AggMerge::Min,
            AggMerge::Count,
            AggMerge::Expr(5),
            AggMerge::Expr(6),
        ]
    );
    assert_eq!(m.hidden_columns, 7);
    assert_eq!(
        m.expressions,
        vec![
            arith(ArithOp::Div, col(H(0)), col(H(1))),
            AggExpr::Cast {
                to: ArithType::Float8,
                expr: Box::new(arith(ArithOp::Sub, col(H(2)), col(H(3)))),
            },
            arith(
                ArithOp::Div,
                arith(ArithOp::Mul, num("100.0"), col(H(4))),
                col(H(1))
            ),
            AggExpr::Neg(Box::new(col(H(0)))),
            AggExpr::Cast {
                to: ArithType::Numeric,
                expr: Box::new(col(H(0))),
            },
            // The minus folds into the literal, as in Postgres's grammar.
            arith(ArithOp::Div, col(H(4)), num("-2")),
            arith(ArithOp::Mul, col(H(0)), num("2")),
        ]
    );
    assert_eq!(m.having[0].column, H(6));
    assert_eq!(
        m.order_by,
        vec![key(V(1), true, true), key(H(5), false, false)]
    );
    // ORDER BY an output name Postgres gives an expression: `?column?`, a cast's type.
    let (m, _) = merge_of(
        "SELECT city, sum(age) / count(*) FROM users GROUP BY city ORDER BY \"?column?\" DESC",
    );
    assert_eq!(m.order_by, vec![key(V(1), true, true)]);
    let (m, _) =
        merge_of("SELECT city, (max(age) - min(age))::int FROM users GROUP BY city ORDER BY int4");
    assert_eq!(m.order_by, vec![key(V(1), false, false)]);
    // Two output columns of that name: 42702 as on Postgres (the shards, which get no
    // ORDER BY, would not see it).
    for sql in [
        "SELECT city AS n, count(*) AS n FROM users GROUP BY city ORDER BY n",
        "SELECT sum(age) + 1, count(*) - 1 FROM users GROUP BY city ORDER BY \"?column?\"",
    ] {
        let refusal = p(sql).refusal;
        assert_eq!(
            refusal.as_ref().map(|r| r.sqlstate),
            Some("42702"),
            "{sql}: {refusal:?}"
        );
    }
    // A count cast inside an expression is the merge's cast of the total.
    let (m, _) = merge_of("SELECT count(*)::int2 + 1 FROM users");
    assert_eq!(
        m.expressions,
        vec![arith(
            ArithOp::Add,
            AggExpr::Cast {
                to: ArithType::Int2,
                expr: Box::new(col(H(0))),
            },
            num("1")
        )]
    );
    // nullif around a divisor, coalesce with a number literal.
    let (m, rw) =
        merge_of("SELECT coalesce(sum(age) / nullif(count(x), 0), -1) FROM users GROUP BY city");
    assert_eq!(
        m.expressions,
        vec![AggExpr::Coalesce(
            Box::new(arith(
                ArithOp::Div,
                col(H(0)),
                AggExpr::NullIf(Box::new(col(H(1))), Box::new(num("0")))
            )),
            Box::new(num("-1"))
        )]
    );
    assert_eq!(
        rw.as_deref(),
        Some(
            "SELECT CASE WHEN false THEN coalesce(sum(age) / nullif(count(x), 0), -1) END AS \
             \"coalesce\", sum(age), count(x), city FROM users GROUP BY city"
        )
    );
    for sql in [
        "SELECT coalesce(sum(age) / count(*), max(age)) FROM users",
        "SELECT coalesce(sum(age) / count(*), 0, 1) FROM users",
        "SELECT nullif(sum(age), 0, 1) FROM users",
        "SELECT myschema.nullif(sum(age), 0) FROM users",
        "SELECT sum(age) % 2 FROM users",
        "SELECT sum(age) * $1 FROM users",
        "SELECT abs(sum(age)) FROM users",
        "SELECT sum(age) + city FROM users GROUP BY city",
        "SELECT sum(age)::numeric(10, 2) FROM users",
        "SELECT sum(age) * 1e3 FROM users",
        "SELECT sum(age) || 'x' FROM users",
        "SELECT sum(age)::text FROM users",
        "SELECT count(*) + (SELECT 1) FROM users",
    ] {
        case(sql, S, T::All, R::No("expression over aggregates"));
    }
    // Group key not in the select list: hidden.
    let (m, rw) = merge_of("SELECT count(*) FROM posts GROUP BY title");
    assert_eq!(m.aggregates, vec![AggMerge::Count, AggMerge::None]);
    assert_eq!(m.group_by, vec![H(0)]);
    assert_eq!(
        rw.as_deref(),
        Some("SELECT count(*), title FROM posts GROUP BY title")
    );
    // GROUP BY c means users.c if users has one: the router cannot tell, so it refuses.
    case(
        "SELECT city AS c, count(*) FROM users GROUP BY c",
        S,
        T::All,
        R::No("GROUP BY c across shards is ambiguous"),
    );
    let (m, _) = merge_of("SELECT u.city AS city, count(*) FROM users u GROUP BY city");
    assert_eq!(m.group_by, vec![V(0)]);
    let (m, _) = merge_of("SELECT city, count(*) FROM users GROUP BY 1");
    assert_eq!(m.group_by, vec![V(0)]);
    // ORDER BY an aggregate not selected: a hidden aggregate column.
    let (m, rw) = merge_of("SELECT city FROM users GROUP BY city ORDER BY max(age)");
    assert_eq!(m.aggregates, vec![AggMerge::None, AggMerge::Max]);
    assert_eq!(m.order_by, vec![key(H(0), false, false)]);
    assert_eq!(
        rw.as_deref(),
        Some("SELECT city, max(age) FROM users GROUP BY city")
    );
    // Grouped by the shard key: rows are final, LIMIT pushed down.
    let (m, rw) = merge_of(
        "SELECT user_id, count(*) FROM posts GROUP BY user_id ORDER BY 2 DESC LIMIT 5 OFFSET 5",
    );
    assert!(m.aggregates.is_empty());
    assert!(m.group_by.is_empty());
    assert_eq!(
        rw.as_deref(),
        Some("SELECT user_id, count(*) FROM posts GROUP BY user_id ORDER BY 2 DESC LIMIT 10")
    );
    let (m, _) = merge_of("SELECT p.user_id, avg(x) FROM posts p GROUP BY p.user_id");
    assert!(m.aggregates.is_empty());
    let (m, _) = merge_of("SELECT DISTINCT city, count(*) FROM users GROUP BY city");
    assert!(m.distinct);
    // Through a join of colocated tables.
    let (m, _) = merge_of(
        "SELECT u.city, count(*) FROM users u JOIN posts p ON p.user_id = u.id GROUP BY u.city",
    );
    assert_eq!(m.aggregates, vec![AggMerge::None, AggMerge::Count]);
}

#[test]
fn merge_having() {
    let (m, rw) = merge_of(
        "SELECT city, count(*) FROM users GROUP BY city HAVING count(*) > 1 AND max(age) <= $1 AND 'b' < city ORDER BY 1",
    );
    assert_eq!(
        m.having,
        vec![
            HavingCond {
                column: V(1),
                op: CmpOp::Gt,
                value: Constant::Number("1".into())
            },
            HavingCond {
                column: H(0),
                op: CmpOp::Le,
                value: Constant::Param(1)
            },
            HavingCond {
                column: V(0),
                op: CmpOp::Gt,
                value: Constant::Text("b".into())
            },
        ]
    );
    assert_eq!(
        m.aggregates,
        vec![AggMerge::None, AggMerge::Count, AggMerge::Max]
    );
    // The shards return every group: HAVING moves to the merge.
    assert_eq!(
        rw.as_deref(),
        Some("SELECT city, count(*), max(age) FROM users GROUP BY city")
    );
    let (m, rw) = merge_of("SELECT count(*) FROM users HAVING count(*) > -1");
    assert_eq!(m.having.len(), 1);
    assert_eq!(m.having[0].value, Constant::Number("-1".into()));
    assert_eq!(rw.as_deref(), Some("SELECT count(*) FROM users"));
    let (m, _) = merge_of("SELECT city, avg(x) FROM users GROUP BY city HAVING avg(x) > 2");
    assert_eq!(m.having[0].column, V(1));
    // Grouped by the shard key, HAVING stays on the shards.
    let (m, rw) = merge_of("SELECT user_id FROM posts GROUP BY user_id HAVING count(*) > 1");
    assert!(m.having.is_empty());
    assert_eq!(rw, None);
}

#[test]
fn merge_for_key_lists() {
    let plan = p("SELECT * FROM users WHERE id IN (1, 2, 3) ORDER BY name LIMIT 2");
    assert!(matches!(&plan.target, Target::Keys { keys, .. } if keys.len() == 3));
    let m = plan.merge.unwrap();
    assert_eq!(m.limit, Some(RowCount::Value(2)));
    assert_eq!(m.order_by.len(), 1);
    // A single key needs no merge.
    let plan = p("SELECT * FROM users WHERE id = 1 ORDER BY name LIMIT 2");
    assert!(plan.merge.is_none());
    assert!(plan.rewritten.is_none());
    assert!(!plan.may_fan_out());
    let plan = p("SELECT count(*) FROM users WHERE id = ANY($1)");
    assert!(plan.may_fan_out());
    assert_eq!(plan.merge.unwrap().aggregates, vec![AggMerge::Count]);
}

#[test]
fn tables_are_listed() {
    let plan = p("SELECT * FROM users u JOIN countries c ON c.code = u.cc WHERE u.id = 1");
    assert_eq!(
        plan.tables,
        vec!["users".to_string(), "countries".to_string()]
    );
    let plan = p("WITH x AS (SELECT 1) SELECT * FROM x, orders");
    assert_eq!(plan.tables, vec!["orders".to_string()]);
}

#[test]
fn rewrites_read_back_identically() {
    // Every rewrite produced by the planner parses back to the same query (checked inside
    // the planner); spot-check that the text runs as SQL by parsing it again here.
    for sql in [
        "SELECT id FROM users ORDER BY lower(name) LIMIT 3 OFFSET 1",
        "SELECT city, avg(age) FROM users GROUP BY city ORDER BY 2",
        "SELECT count(*) FROM posts GROUP BY title ORDER BY title",
        "SELECT \"Name\", x::numeric(10,2) FROM users ORDER BY 2 DESC NULLS LAST LIMIT $1 OFFSET $2",
    ] {
        let plan = p(sql);
        let rw = plan.rewritten.expect(sql);
        let again = plan_many(&rw, &catalog());
        assert_eq!(again.len(), 1, "{rw}");
        assert_ne!(again[0].1.kind, Kind::Unknown, "{rw} does not parse");
    }
}

/// Long operator chains make deep syntax trees; planning them must not overflow a small
/// thread stack (a stack overflow would abort the whole proxy).
#[test]
fn deep_statements_do_not_overflow_the_stack() {
    for (n, op) in [
        (20_000, " OR "),
        (20_000, " + "),
        (20_000, " AND "),
        (127, " OR "),
        (250, " + "),
        (127, " AND "),
    ] {
        let sql = match op {
            " + " => format!("SELECT * FROM users WHERE id = {}", vec!["1"; n].join(op)),
            _ => format!("SELECT * FROM users WHERE {}", vec!["id = 1"; n].join(op)),
        };
        let handle = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || plan(&sql, &catalog()).kind)
            .unwrap();
        assert_eq!(handle.join().unwrap(), Kind::Read, "{op}");
    }
    // Beyond the limit: planned as unreadable text (refused: it names a sharded table).
    let sql = format!(
        "SELECT * FROM users WHERE {}",
        vec!["id = 1"; 70_000].join(" OR ")
    );
    let plan = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || plan(&sql, &catalog()))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(plan.kind, Kind::Unknown);
    assert!(plan.refusal.is_some());
}
