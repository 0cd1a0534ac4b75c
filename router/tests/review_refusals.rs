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

// --- B: the shard_key hint against the statement's own keys ----------------------------

fn hinted(sql: &str, key: &str) -> Plan {
    let h = Hint {
        key: Some(key.into()),
        ..Hint::default()
    };
    plan_with_hint(sql, &catalog(), Some(&h))
}

#[test]
fn hint_key_must_agree_with_the_statements_own_keys() {
    // The statement's own key joins the hint's: one shard for both, or a refusal.
    for (sql, own) in [
        (
            "INSERT INTO posts (user_id, id, body) VALUES (7, 1, 'x')",
            vec![int(7)],
        ),
        ("SELECT * FROM posts WHERE user_id = 7", vec![int(7)]),
        (
            "UPDATE posts SET body = 'y' WHERE user_id = 7",
            vec![int(7)],
        ),
        (
            "DELETE FROM posts WHERE user_id IN (7, 8)",
            vec![int(7), int(8)],
        ),
        (
            "SELECT * FROM posts WHERE user_id = $1",
            vec![KeyExpr::Param(1)],
        ),
        (
            "SELECT * FROM posts WHERE user_id = ANY($1)",
            vec![KeyExpr::ParamArray(1)],
        ),
        (
            "INSERT INTO posts (user_id, id) VALUES (7, 1), (8, 2)",
            vec![int(7), int(8)],
        ),
        // Pinned inside a subquery: its rows are needed too.
        (
            "SELECT *, (SELECT count(*) FROM posts WHERE user_id = 7) FROM users",
            vec![int(7)],
        ),
    ] {
        let plan = hinted(sql, "5");
        assert!(plan.refusal.is_none(), "{sql}: {:?}", plan.refusal);
        let mut want = vec![int(5)];
        want.extend(own);
        assert_eq!(
            plan.target,
            Target::Keys {
                key_type: KeyType::Int,
                keys: want
            },
            "{sql}"
        );
        let r = plan
            .multi_shard_refusal
            .unwrap_or_else(|| panic!("{sql}: no check of the hint against its keys"));
        assert!(r.message.contains("shardgate.shard_key"), "{}", r.message);
        assert!(plan.merge.is_none() && plan.rewritten.is_none(), "{sql}");
    }
    // Nothing of its own (the hint alone), or the same key as the hint: nothing to check.
    for sql in [
        "SELECT * FROM posts",
        "SELECT * FROM posts WHERE user_id = 5",
    ] {
        let plan = hinted(sql, "5");
        assert_eq!(
            plan.target,
            Target::Keys {
                key_type: KeyType::Int,
                keys: vec![int(5)]
            },
            "{sql}"
        );
        assert!(plan.multi_shard_refusal.is_none(), "{sql}");
    }
    // A comment hint works the same way.
    let plan = p("/* shardgate: key=5 */ SELECT * FROM posts WHERE user_id = 7");
    assert_eq!(
        plan.target,
        Target::Keys {
            key_type: KeyType::Int,
            keys: vec![int(5), int(7)]
        }
    );
    assert!(plan.multi_shard_refusal.is_some());
}

#[test]
fn shard_hint_does_not_place_rows_against_their_key() {
    // shard=N cannot be checked against a key here: rows named by key are refused.
    refused(
        "/* shardgate: shard=1 */ INSERT INTO posts (user_id, id) VALUES (7, 1)",
        "shard=",
    );
    refused(
        "/* shardgate: shard=1 */ INSERT INTO posts (user_id, id) VALUES ($1, 1)",
        "shard=",
    );
    // Reads through shard=N look at that one shard, as documented.
    let plan = not_refused("/* shardgate: shard=1 */ SELECT * FROM posts WHERE user_id = 7");
    assert_eq!(plan.target, Target::Shard(1));
}

// --- C: writable CTEs changing the shard key ---------------------------------------------

#[test]
fn cte_updates_of_the_shard_key_are_refused() {
    refused(
        "UPDATE posts SET user_id = 9 WHERE user_id = 3",
        "shard key",
    );
    refused(
        "WITH u AS (UPDATE posts SET user_id = 9 WHERE user_id = 3 RETURNING *) SELECT * FROM u",
        "shard key",
    );
    refused(
        "WITH u AS (UPDATE posts SET (body, user_id) = ('a', 9) WHERE user_id = 3 RETURNING *) \
         SELECT * FROM u",
        "shard key",
    );
    refused(
        "WITH u AS (UPDATE posts SET user_id = 9 WHERE user_id = 3 RETURNING *) \
         DELETE FROM posts WHERE user_id = 3",
        "shard key",
    );
    refused(
        "WITH u AS (UPDATE users SET id = 9 WHERE id = 3 RETURNING *) \
         INSERT INTO posts (user_id, id) VALUES (3, 1)",
        "shard key",
    );
    // Even with a hint (the row would stay on the wrong shard).
    refused(
        "/* shardgate: key=3 */ WITH u AS (UPDATE posts SET user_id = 9 WHERE user_id = 3 \
         RETURNING *) SELECT * FROM u",
        "shard key",
    );
    // Other columns are fine.
    not_refused(
        "WITH u AS (UPDATE posts SET body = 'x' WHERE user_id = 3 RETURNING *) SELECT * FROM u",
    );
}

// --- H: views over sharded tables --------------------------------------------------------

#[test]
fn views_over_sharded_tables_are_refused() {
    for sql in [
        "CREATE VIEW v AS SELECT * FROM posts",
        "CREATE OR REPLACE VIEW v AS SELECT id FROM users WHERE id = 5",
        "CREATE VIEW v AS SELECT c.* FROM countries c JOIN users u ON u.id = c.id",
        "CREATE MATERIALIZED VIEW v AS SELECT * FROM posts",
        "CREATE TEMP VIEW v AS SELECT * FROM posts",
        "CREATE RECURSIVE VIEW v (n) AS SELECT user_id FROM posts",
        "CREATE VIEW v WITH (security_barrier) AS SELECT * FROM posts",
        "CREATE RULE r AS ON INSERT TO foo DO INSTEAD INSERT INTO posts (user_id, id) VALUES (1, 1)",
        "CREATE OR REPLACE RULE r AS ON UPDATE TO foo DO ALSO SELECT * FROM users",
    ] {
        refused(sql, "view");
        // No hint makes it right: queries on the view are not routed by its definition.
        let plan = p(&format!("/* shardgate: shard=0 */ {sql}"));
        assert!(plan.refusal.is_some(), "{sql}");
    }
    // Views over reference and unsharded tables are fine.
    not_refused("CREATE VIEW v AS SELECT * FROM countries");
    not_refused("CREATE VIEW v AS SELECT * FROM orders");
    not_refused("CREATE RULE r AS ON INSERT TO foo DO INSTEAD NOTHING");
}

// --- I: volatile expressions in writes to reference tables ----------------------------

#[test]
fn volatile_writes_to_reference_tables_are_refused() {
    for sql in [
        "INSERT INTO countries VALUES (random())",
        "INSERT INTO countries (id, at) VALUES (1, now())",
        "INSERT INTO countries (id, at) VALUES (1, CURRENT_TIMESTAMP)",
        "INSERT INTO countries (id, at) VALUES (1, current_timestamp(3))",
        "INSERT INTO countries (id, at) VALUES (1, localtimestamp)",
        "UPDATE countries SET at = clock_timestamp()",
        "UPDATE countries SET id = nextval('s')",
        "INSERT INTO countries (id) VALUES (gen_random_uuid())",
        "INSERT INTO countries (id) VALUES (public.uuid_generate_v4())",
        "INSERT INTO countries (id) VALUES (txid_current())",
        "INSERT INTO countries (id) SELECT random() FROM generate_series(1, 3)",
        "DELETE FROM countries WHERE random() < 0.5",
        "UPDATE countries SET n = n + 1 WHERE id = (SELECT floor(random() * 10))",
        "WITH x AS (INSERT INTO countries (id) VALUES (random()) RETURNING id) SELECT * FROM x",
        "INSERT INTO countries (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET at = now()",
    ] {
        refused(sql, "reference table");
    }
    not_refused("INSERT INTO countries (id, name) VALUES (1, 'x')");
    not_refused("UPDATE countries SET n = n + 1 WHERE id = 3");
    // Reads may use them: one copy answers.
    not_refused("SELECT random(), now() FROM countries");
    // Unsharded and sharded tables have one copy of each row.
    not_refused("INSERT INTO orders (id, at) VALUES (1, now())");
    not_refused("INSERT INTO users (id, at) VALUES (1, now())");
}

// --- D: ordered-set and hypothetical-set aggregates ---------------------------------------

#[test]
fn ordered_set_aggregates_across_shards_are_refused() {
    for sql in [
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY id) FROM posts",
        "SELECT mode() WITHIN GROUP (ORDER BY id) FROM posts",
        "SELECT rank(3) WITHIN GROUP (ORDER BY id) FROM posts",
        "SELECT dense_rank(3) WITHIN GROUP (ORDER BY id) FROM posts",
        "SELECT percent_rank(3) WITHIN GROUP (ORDER BY id) FROM posts",
        "SELECT cume_dist(3) WITHIN GROUP (ORDER BY id) FROM posts",
        "SELECT body, rank(3) WITHIN GROUP (ORDER BY id) FROM posts GROUP BY body",
        "SELECT body FROM posts GROUP BY body HAVING rank(3) WITHIN GROUP (ORDER BY id) > 1",
        "SELECT body FROM posts GROUP BY body ORDER BY percentile_disc(0.5) WITHIN GROUP (ORDER BY id)",
        "SELECT my_agg(1) WITHIN GROUP (ORDER BY id) FROM posts",
    ] {
        refused(sql, "across shards");
    }
    // Grouped by the shard key, every group is whole on one shard.
    not_refused("SELECT user_id, rank(3) WITHIN GROUP (ORDER BY id) FROM posts GROUP BY user_id");
    // rank() as a window function is refused as a window function.
    refused("SELECT rank() OVER (ORDER BY id) FROM posts", "window");
}

// --- E: aggregates of the outer query inside subqueries ----------------------------------

#[test]
fn outer_aggregates_inside_subqueries_are_refused() {
    // Subqueries over sharded tables evaluated per shard: already refused.
    refused(
        "SELECT (SELECT count(*) FROM users), id FROM posts",
        "not tied to the outer query",
    );
    refused(
        "SELECT id FROM posts WHERE id > (SELECT avg(id) FROM posts)",
        "not tied to the outer query",
    );
    // An aggregate over only outer columns belongs to the outer query: one row overall,
    // which the per-shard rows would not give.
    for sql in [
        "SELECT (SELECT max(p.id)) FROM posts p",
        "SELECT (SELECT sum(p.id) FROM countries c LIMIT 1) FROM posts p",
        "SELECT (SELECT count(p.*)) FROM posts p",
        "SELECT p.body FROM posts p GROUP BY p.body HAVING (SELECT max(p.id)) > 3",
        "SELECT p.body FROM posts p ORDER BY (SELECT max(p.id))",
        "SELECT EXISTS (SELECT 1 FROM countries c HAVING max(p.id) > 1) FROM posts p",
    ] {
        refused(sql, "outer query");
    }
    // Aggregates of the subquery's own rows are fine.
    fans_out("SELECT (SELECT max(c.id) FROM countries c WHERE c.id = p.id) FROM posts p");
    fans_out(
        "SELECT id FROM posts p WHERE id > (SELECT avg(id) FROM posts q WHERE q.user_id = p.user_id)",
    );
}

// --- F: GROUP BY names: input columns before output names ------------------------------

#[test]
fn group_by_names_resolve_like_postgres() {
    // GROUP BY id groups by users.id (an input column), not by the output column `id`.
    for sql in [
        "SELECT name AS id, count(*) FROM users GROUP BY id",
        "SELECT user_id AS id, count(*) FROM posts GROUP BY id",
        "SELECT created_at::date, count(*) FROM users GROUP BY created_at",
        "SELECT lower(name) AS name, count(*) FROM users GROUP BY name",
    ] {
        refused(sql, "GROUP BY");
    }
    // The same name and expression: no doubt.
    let plan = fans_out("SELECT name, count(*) FROM users GROUP BY name");
    assert_eq!(plan.merge.unwrap().group_by, vec![ColumnRef::Visible(0)]);
    fans_out("SELECT u.name AS name, count(*) FROM users u GROUP BY name");
    fans_out("SELECT lower(name) AS n, count(*) FROM users GROUP BY 1");
    fans_out("SELECT lower(name) AS n, count(*) FROM users GROUP BY lower(name)");
    // ORDER BY names are output names first, as the merge reads them.
    let plan = fans_out("SELECT name AS id FROM users ORDER BY id");
    assert_eq!(
        plan.merge.unwrap().order_by[0].column,
        ColumnRef::Visible(0)
    );
}

// --- G: outer joins, NOT IN with NULL ------------------------------------------------------

#[test]
fn grouping_by_the_nullable_side_of_an_outer_join_combines_groups() {
    // Users without posts make a NULL group on every shard: combine them.
    for sql in [
        "SELECT p.user_id, count(*) FROM users u LEFT JOIN posts p ON p.user_id = u.id GROUP BY p.user_id",
        "SELECT p.user_id, count(*) FROM posts p RIGHT JOIN users u ON p.user_id = u.id GROUP BY p.user_id",
        "SELECT u.id, count(*) FROM users u FULL JOIN posts p ON p.user_id = u.id GROUP BY u.id",
    ] {
        let plan = fans_out(sql);
        let m = plan.merge.unwrap();
        assert_eq!(m.group_by, vec![ColumnRef::Visible(0)], "{sql}");
        assert_eq!(m.aggregates, vec![AggMerge::None, AggMerge::Count], "{sql}");
    }
    // The preserved side's key is never NULL from the join: groups stay on one shard.
    let plan = fans_out(
        "SELECT u.id, count(p.id) FROM users u LEFT JOIN posts p ON p.user_id = u.id GROUP BY u.id",
    );
    assert!(plan.merge.unwrap().aggregates.is_empty());
}

#[test]
fn not_in_with_null_on_the_key() {
    // NOT IN (.., NULL) is never true: every shard returns nothing, as Postgres does.
    let plan = fans_out("SELECT * FROM posts WHERE user_id NOT IN (1, NULL)");
    assert!(plan.merge.unwrap().is_concat());
    let plan = fans_out("SELECT count(*) FROM posts WHERE user_id NOT IN (1, NULL)");
    assert_eq!(plan.merge.unwrap().aggregates, vec![AggMerge::Count]);
    // IN (1, NULL) is the key 1 or nothing: not routed by a NULL key.
    let plan = not_refused("SELECT * FROM posts WHERE user_id IN (1, NULL)");
    assert!(plan.target == Target::All);
    // The normalized simple-protocol shape routes like the text.
    let mut cache = PlanCache::new(64);
    for sql in [
        "SELECT * FROM posts WHERE user_id NOT IN (1, NULL)",
        "SELECT * FROM posts WHERE user_id IN (1, NULL)",
    ] {
        let sp = cache.plan_simple(sql, &catalog());
        assert_eq!(sp.plan.target, Target::All, "{sql}");
    }
}
