//! Routing cost: a cached decision (normalize + lookup + key values) against a full plan.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use shardgate_router::{classify, normalize, plan, Catalog, KeyType, PlanCache};

fn catalog() -> Catalog {
    Catalog::new()
        .with_sharded("pgbench_accounts", "aid", KeyType::Int)
        .with_sharded("pgbench_tellers", "tid", KeyType::Int)
        .with_sharded("pgbench_branches", "bid", KeyType::Int)
        .with_sharded("pgbench_history", "aid", KeyType::Int)
        .with_sharded("users", "id", KeyType::Int)
        .with_sharded("posts", "user_id", KeyType::Int)
}

/// Simple-protocol texts, `{}` replaced by varying numbers (as pgbench sends them).
const SIMPLE: &[(&str, &str)] = &[
    (
        "pgbench_select",
        "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
    ),
    (
        "tpcb_update_accounts",
        "UPDATE pgbench_accounts SET abalance = abalance + -{} WHERE aid = {};",
    ),
    (
        "tpcb_update_tellers",
        "UPDATE pgbench_tellers SET tbalance = tbalance + {} WHERE tid = {};",
    ),
    (
        "tpcb_update_branches",
        "UPDATE pgbench_branches SET bbalance = bbalance + {} WHERE bid = {};",
    ),
    (
        "tpcb_insert_history",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({}, {}, {}, {}, CURRENT_TIMESTAMP);",
    ),
    (
        "posts_by_user",
        "SELECT * FROM posts WHERE user_id = {} ORDER BY created_at DESC LIMIT 10",
    ),
    ("count_users", "SELECT count(*) FROM users"),
];

/// Extended-protocol Parse texts (cached by exact text).
const EXTENDED: &[(&str, &str)] = &[
    ("users_by_id", "SELECT * FROM users WHERE id = $1"),
    (
        "pgbench_select_ext",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    ),
];

fn texts(template: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut out = String::new();
            let mut k = 0;
            for (j, part) in template.split("{}").enumerate() {
                if j > 0 {
                    out.push_str(&(i * 7919 + k * 104_729 + 1).to_string());
                    k += 1;
                }
                out.push_str(part);
            }
            out
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let catalog = catalog();
    let mut cached = c.benchmark_group("cached");
    for (name, template) in SIMPLE {
        let sqls = texts(template, 1024);
        let mut cache = PlanCache::new(10_000);
        for s in &sqls {
            cache.plan_simple(s, &catalog);
        }
        let mut i = 0;
        cached.bench_function(*name, |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                let sql = &sqls[i];
                let p = cache.plan_simple(black_box(sql), &catalog);
                black_box(p.key_values(sql));
            })
        });
    }
    for (name, sql) in EXTENDED {
        let mut cache = PlanCache::new(10_000);
        cache.plan(sql, &catalog);
        cached.bench_function(*name, |b| {
            b.iter(|| black_box(cache.plan(black_box(sql), &catalog)))
        });
    }
    cached.finish();

    let mut parts = c.benchmark_group("parts");
    let sql = texts(SIMPLE[0].1, 1).remove(0);
    parts.bench_function("normalize_pgbench_select", |b| {
        b.iter(|| black_box(normalize(black_box(&sql))))
    });
    // What every simple query pays to learn its session effects (none, here).
    for (name, template) in [SIMPLE[0], SIMPLE[5]] {
        let sql = texts(template, 1).remove(0);
        parts.bench_function(format!("classify_{name}"), |b| {
            b.iter(|| black_box(classify(black_box(&sql))))
        });
    }
    parts.finish();

    let mut uncached = c.benchmark_group("uncached");
    for (name, template) in SIMPLE {
        let sql = texts(template, 1).remove(0);
        uncached.bench_function(*name, |b| {
            b.iter(|| black_box(plan(black_box(&sql), &catalog)))
        });
    }
    for (name, sql) in EXTENDED {
        uncached.bench_function(*name, |b| {
            b.iter(|| black_box(plan(black_box(sql), &catalog)))
        });
    }
    uncached.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
