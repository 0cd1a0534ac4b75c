//! Properties of normalization and of the shape cache.

use proptest::prelude::*;
use shardgate_router::*;

/// Tokens a query may be built from, including every lexical trap the normalizer knows.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("SELECT".to_string()),
        Just("FROM".into()),
        Just("WHERE".into()),
        Just("AND".into()),
        Just("OR".into()),
        Just("ORDER BY".into()),
        Just("GROUP BY".into()),
        Just("LIMIT".into()),
        Just("OFFSET".into()),
        Just("IN".into()),
        Just("VALUES".into()),
        Just("DISTINCT ON".into()),
        Just("interval".into()),
        Just("t1".into()),
        Just("c_2".into()),
        Just("x".into()),
        Just("a$b".into()),
        Just("\"Quoted \"\" id\"".into()),
        Just("=".into()),
        Just("-".into()),
        Just("+".into()),
        Just("*".into()),
        Just("<>".into()),
        Just(">=".into()),
        Just("@".into()),
        Just("::".into()),
        Just("(".into()),
        Just(")".into()),
        Just("[".into()),
        Just("]".into()),
        Just(",".into()),
        Just(";".into()),
        Just(".".into()),
        Just("$1".into()),
        Just("$$ dollar 'x' 1 $$".into()),
        Just("$q$ a;b $q$".into()),
        Just("E'esc\\'aped 2'".into()),
        Just("U&'d\\0061t'".into()),
        Just("B'101'".into()),
        Just("'C:\\'".into()),
        Just("-- comment 3\n".into()),
        Just("/* c /* nested 4 */ */".into()),
        (0u32..100_000).prop_map(|n| n.to_string()),
        (0u32..1000, 0u32..1000).prop_map(|(a, b)| format!("{a}.{b}")),
        Just("1e5".into()),
        Just("0x1F".into()),
        Just(".5".into()),
        "[a-z' ]{0,6}".prop_map(|s| format!("'{}'", s.replace('\'', "''"))),
    ]
}

fn glue() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(" "), Just(""), Just("\n"), Just("  ")]
}

fn query() -> impl Strategy<Value = String> {
    prop::collection::vec((token(), glue()), 0..24).prop_map(|parts| {
        let mut s = String::new();
        for (t, g) in parts {
            s.push_str(&t);
            s.push_str(g);
        }
        s
    })
}

proptest! {
    // 2000 cases by default; PROPTEST_CASES overrides.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
    ))]

    /// Putting the literals back gives the original text, and every extracted literal is a
    /// plain number or a plain string.
    #[test]
    fn normalize_round_trips(sql in query()) {
        if let Some(n) = normalize(&sql) {
            prop_assert_eq!(n.restore(&sql), sql.clone());
            let mut prev_end = 0;
            for l in &n.literals {
                prop_assert!(l.start >= prev_end);
                prev_end = l.end;
                let t = l.text(&sql);
                let number = t.trim_start_matches('-');
                let is_number = !number.is_empty()
                    && number.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                    && number.as_bytes()[0].is_ascii_digit();
                let is_string = t.len() >= 2 && t.starts_with('\'') && t.ends_with('\'');
                prop_assert!(is_number || is_string, "literal {:?} in {:?}", t, sql);
            }
        } else {
            prop_assert!(sql.contains("$1") || sql.contains('\\'), "declined without reason: {:?}", sql);
        }
    }

    /// Planning through the shape cache gives the same routing as planning the text.
    #[test]
    fn cached_shapes_route_like_the_text(
        cases in prop::collection::vec(keyed_query(), 1..12)
    ) {
        let catalog = Catalog::new()
            .with_sharded("users", "id", KeyType::Int)
            .with_sharded("posts", "user_id", KeyType::Int)
            .with_sharded("tenants", "name", KeyType::Text);
        let mut cache = PlanCache::new(64);
        for sql in cases {
            let direct = plan(&sql, &catalog);
            let simple = cache.plan_simple(&sql, &catalog);
            let sp = &simple.plan;
            prop_assert_eq!(sp.role, direct.role, "{}", sql);
            prop_assert_eq!(sp.kind, direct.kind, "{}", sql);
            // Refused alike (the message may name another row's problem).
            let state = |r: &Option<Refusal>| r.as_ref().map(|r| r.sqlstate);
            prop_assert_eq!(state(&sp.refusal), state(&direct.refusal), "{}", sql);
            prop_assert_eq!(
                state(&sp.multi_shard_refusal),
                state(&direct.multi_shard_refusal),
                "{}", sql
            );
            if sp.refusal.is_some() {
                continue;
            }
            prop_assert_eq!(&sp.merge, &direct.merge, "{}", sql);
            prop_assert_eq!(
                simple.rewritten(&sql).map(|c| c.into_owned()),
                direct.rewritten.clone(),
                "{}", sql
            );
            let via_shape = match &sp.target {
                Target::Keys { key_type, .. } | Target::SplitInsert { key_type, .. } => {
                    let values = simple.key_values(&sql);
                    prop_assert!(values.is_some(), "{}", sql);
                    canon(&sp.target, *key_type, values.unwrap_or_default())
                }
                other => Canon::Other(other.clone()),
            };
            let own = match &direct.target {
                Target::Keys { key_type, keys } | Target::SplitInsert { key_type, rows: keys } => {
                    let values = keys
                        .iter()
                        .map(|k| match k {
                            KeyExpr::Literal(v) => v.clone(),
                            other => panic!("unexpected {other:?}"),
                        })
                        .collect();
                    canon(&direct.target, *key_type, values)
                }
                other => Canon::Other(other.clone()),
            };
            prop_assert_eq!(via_shape, own, "{}", sql);
        }
    }
}

/// Routing as the proxy sees it: a set of keys (duplicates and a split whose rows all share
/// one key change nothing), the per-row keys of a split, or another target.
#[derive(Debug, PartialEq)]
enum Canon {
    Keys(KeyType, std::collections::BTreeSet<KeyValue>),
    Split(KeyType, Vec<KeyValue>),
    Other(Target),
}

fn canon(t: &Target, ty: KeyType, values: Vec<KeyValue>) -> Canon {
    let set: std::collections::BTreeSet<KeyValue> = values.iter().cloned().collect();
    match t {
        Target::SplitInsert { .. } if set.len() > 1 => Canon::Split(ty, values),
        _ => Canon::Keys(ty, set),
    }
}

/// A constant as a query might write it, for an int or text key.
fn constant() -> impl Strategy<Value = String> {
    prop_oneof![
        (-5i64..5).prop_map(|n| n.to_string()),
        (0i64..1_000_000).prop_map(|n| n.to_string()),
        Just("-0".to_string()),
        Just("9223372036854775807".to_string()),
        Just("9223372036854775808".to_string()),
        (0i64..10).prop_map(|n| format!("'{n}'")),
        (0i64..10).prop_map(|n| format!("{n}.0")),
        (0i64..10).prop_map(|n| format!("'{n}'::int8")),
        (0i64..10).prop_map(|n| format!("- {n}")),
        Just("'abc'".to_string()),
        Just("'it''s'".to_string()),
        Just("'  7 '".to_string()),
        Just("NULL".to_string()),
    ]
}

fn keyed_query() -> impl Strategy<Value = String> {
    (constant(), constant(), constant(), 0usize..10).prop_map(|(a, b, c, t)| match t {
        0 => format!("SELECT * FROM users WHERE id = {a}"),
        1 => format!("SELECT name FROM users WHERE id = {a} AND score > {b} ORDER BY 1 LIMIT 5"),
        2 => format!("SELECT * FROM users WHERE id IN ({a}, {b})"),
        3 => format!("UPDATE users SET score = score + {b} WHERE id = {a}"),
        4 => format!("INSERT INTO users (id, name) VALUES ({a}, 'x'), ({b}, {c})"),
        5 => format!("SELECT * FROM tenants WHERE name = {a}"),
        6 => format!(
            "SELECT * FROM users u JOIN posts p ON p.user_id = u.id WHERE u.id = {a} AND p.x = {b}"
        ),
        7 => format!(
            "SELECT id, score + {b} FROM users WHERE score > {a} ORDER BY score + {c} LIMIT 3"
        ),
        8 => format!("DELETE FROM posts WHERE user_id = {a} OR user_id = {b}"),
        _ => format!("SELECT count(*) FROM posts WHERE user_id = {a} AND title <> {b}"),
    })
}
