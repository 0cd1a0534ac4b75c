//! The Rust slot function against Postgres itself, on 100,000 keys of each key type.
//!
//! For each type the test generates keys (seeded; `SHARDGATE_SLOT_HASH_SEED` overrides the
//! seed), spells each one as text in one of the ways Postgres accepts, and computes in
//! Rust: the parsed value (`KeyValue::from_text`), its 64-bit extended hash, and its slot
//! for 4096 slots and for modulus 1000. It COPYs (key text, hash, slots) into a temporary
//! table on shard 0's primary, where the server parses the key itself and checks every
//! row three ways:
//!
//! * `hashXextended(k, seed)` equals the Rust hash (all 64 bits);
//! * the SQL slot expression (`slot_sql`) equals the Rust slot;
//! * `satisfies_hash_partition` on a real `PARTITION BY HASH` table says the row belongs
//!   in the Rust slot's partition, for MODULUS 4096 and MODULUS 1000.
//!
//! Run with `./tests/run.sh` (it starts the cluster and exports the `SHARDGATE_TEST_*`
//! variables); no shardgate process is involved.

use std::fmt::Write as _;

use bytes::Bytes;
use futures_util::SinkExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate_e2e::{connect, Cluster};
use shardgate_shardmap::{key_hash, slot_of, slot_sql, KeyType, KeyValue, HASH_PARTITION_SEED};
use tokio_postgres::Client;

const KEYS: usize = 100_000;
const SLOTS: u32 = 4096;
const ODD_MODULUS: u32 = 1000;

fn seed() -> u64 {
    std::env::var("SHARDGATE_SLOT_HASH_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0x5107_4a54)
}

/// Escapes a value for COPY's text format.
fn copy_escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
}

/// An integer spelled as Postgres accepts it: sometimes padded, signed or zero-filled.
fn spell_int(v: i64, rng: &mut StdRng) -> String {
    match rng.gen_range(0..8) {
        0 => format!("  {v} "),
        1 if v >= 0 => format!("+{v}"),
        2 if v >= 0 => format!("000{v}"),
        3 => format!("\u{b}{v}\u{c}"),
        _ => v.to_string(),
    }
}

fn int_edges(min: i64, max: i64) -> Vec<i64> {
    let mut v = vec![0, 1, -1, 42, -42, min, max, min + 1, max - 1];
    for p in [8, 15, 16, 31, 32, 33, 47, 62] {
        let x = 1i64 << p;
        v.extend([x, -x, x - 1, -x + 1, x + 1]);
    }
    v.retain(|x| (min..=max).contains(x));
    v
}

fn gen_ints(ty: KeyType, rng: &mut StdRng) -> Vec<String> {
    let (min, max) = match ty {
        KeyType::Int2 => (i64::from(i16::MIN), i64::from(i16::MAX)),
        KeyType::Int4 => (i64::from(i32::MIN), i64::from(i32::MAX)),
        _ => (i64::MIN, i64::MAX),
    };
    let mut values = int_edges(min, max);
    if ty == KeyType::Int2 {
        values.extend(min..=max); // every smallint
    }
    while values.len() < KEYS {
        let v = match rng.gen_range(0..4) {
            0 => rng.gen_range(-1000..1000),
            1 => rng.gen_range(min.max(-(1 << 40))..=max.min(1 << 40)),
            _ => rng.gen_range(min..=max),
        };
        values.push(v);
    }
    values.truncate(KEYS);
    values.into_iter().map(|v| spell_int(v, rng)).collect()
}

fn gen_texts(rng: &mut StdRng) -> Vec<String> {
    // ASCII, the characters COPY must escape, and 2-, 3- and 4-byte UTF-8.
    const ALPHABET: &[char] = &[
        'a', 'b', 'z', 'A', 'Q', '0', '9', ' ', '-', '_', '\'', '"', '\\', '\t', '\n', '\r', 'é',
        'ß', 'Ж', '日', '本', '€', '𝄞', '😀',
    ];
    let mut out = vec![
        String::new(),
        " ".into(),
        "a".into(),
        "abc".into(),
        "twelve bytes".into(),
    ];
    while out.len() < KEYS {
        let len = match rng.gen_range(0..10) {
            0 => rng.gen_range(40..300),
            _ => rng.gen_range(0..24),
        };
        let s: String = (0..len)
            .map(|_| {
                if rng.gen_bool(0.7) {
                    char::from(rng.gen_range(b' '..=b'~'))
                } else {
                    ALPHABET[rng.gen_range(0..ALPHABET.len())]
                }
            })
            .collect();
        out.push(s);
    }
    out
}

fn gen_uuids(rng: &mut StdRng) -> Vec<String> {
    let mut out = vec![
        "00000000-0000-0000-0000-000000000000".to_owned(),
        "ffffffff-ffff-ffff-ffff-ffffffffffff".to_owned(),
    ];
    while out.len() < KEYS {
        let u: [u8; 16] = rng.gen();
        let canonical = KeyValue::Uuid(u).to_string();
        // The spellings uuid_in accepts: canonical, braces, upper case, no or extra hyphens.
        let s = match rng.gen_range(0..6) {
            0 => format!("{{{canonical}}}"),
            1 => canonical.to_uppercase(),
            2 => canonical.replace('-', ""),
            3 => {
                let bare = canonical.replace('-', "");
                let groups: Vec<&str> = (0..8).map(|i| &bare[i * 4..i * 4 + 4]).collect();
                groups.join("-")
            }
            _ => canonical,
        };
        out.push(s);
    }
    out
}

/// Checks `keys` (text spellings of values of type `ty`) against the server.
async fn check(client: &Client, ty: KeyType, keys: &[String]) {
    let t = format!("slot_keys_{}", ty.sql_name().replace(' ', "_"));
    let p = format!("slot_part_{}", ty.sql_name().replace(' ', "_"));
    let sql_type = ty.sql_name();
    client
        .batch_execute(&format!(
            "CREATE TEMP TABLE {t} (i int, k {sql_type}, h bigint, s int, s_odd int);
             CREATE TEMP TABLE {p} (k {sql_type}) PARTITION BY HASH (k);"
        ))
        .await
        .expect("create temp tables");

    let mut buf = String::with_capacity(keys.len() * 64);
    for (i, text) in keys.iter().enumerate() {
        let key = KeyValue::from_text(ty, text.as_bytes())
            .unwrap_or_else(|e| panic!("{ty} key #{i} {text:?} does not parse in Rust: {e}"));
        let h = key_hash(&key, HASH_PARTITION_SEED) as i64;
        let _ = write!(buf, "{i}\t");
        copy_escape(text, &mut buf);
        let _ = writeln!(
            buf,
            "\t{h}\t{}\t{}",
            slot_of(&key, SLOTS),
            slot_of(&key, ODD_MODULUS)
        );
    }
    let sink = client
        .copy_in(&format!("COPY {t} (i, k, h, s, s_odd) FROM STDIN"))
        .await
        .expect("COPY FROM STDIN");
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from(buf)).await.expect("send COPY data");
    let copied = sink.finish().await.expect("finish COPY");
    assert_eq!(copied, keys.len() as u64);

    let func = ty.pg_hash_function();
    let seed = HASH_PARTITION_SEED as i64;
    let slot_expr = slot_sql("k", ty, SLOTS);
    let odd_expr = slot_sql("k", ty, ODD_MODULUS);
    let bad = format!(
        "{func}(k, {seed}) <> h OR ({slot_expr}) <> s OR ({odd_expr}) <> s_odd \
         OR NOT satisfies_hash_partition('{p}'::regclass, {SLOTS}, s, k) \
         OR NOT satisfies_hash_partition('{p}'::regclass, {ODD_MODULUS}, s_odd, k)"
    );
    let row = client
        .query_one(
            &format!("SELECT count(*), count(*) FILTER (WHERE {bad}) FROM {t}"),
            &[],
        )
        .await
        .expect("check query");
    let (total, mismatches): (i64, i64) = (row.get(0), row.get(1));
    if mismatches > 0 {
        let rows = client
            .query(
                &format!(
                    "SELECT i, k::text, h, {func}(k, {seed}), s, ({slot_expr})::int, s_odd, ({odd_expr})::int \
                     FROM {t} WHERE {bad} ORDER BY i LIMIT 5"
                ),
                &[],
            )
            .await
            .expect("mismatch query");
        let shown: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "#{} {:?}: hash rust {} pg {}, slot rust {} pg {}, mod {ODD_MODULUS} rust {} pg {}",
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, i64>(2),
                    r.get::<_, i64>(3),
                    r.get::<_, i32>(4),
                    r.get::<_, i32>(5),
                    r.get::<_, i32>(6),
                    r.get::<_, i32>(7),
                )
            })
            .collect();
        panic!(
            "{ty}: {mismatches} of {total} keys disagree with Postgres, e.g.\n{}",
            shown.join("\n")
        );
    }
    assert_eq!(total, keys.len() as i64);
    // Every slot should have been hit: a sanity check that the keys are varied.
    let distinct: i64 = client
        .query_one(&format!("SELECT count(DISTINCT s) FROM {t}"), &[])
        .await
        .expect("distinct slots")
        .get(0);
    assert!(
        distinct > i64::from(SLOTS) * 9 / 10,
        "{ty}: only {distinct} distinct slots"
    );
    client
        .batch_execute(&format!("DROP TABLE {t}; DROP TABLE {p};"))
        .await
        .expect("drop temp tables");
}

async fn run(ty: KeyType) {
    let cluster = Cluster::shared();
    let client = connect(&cluster.primary_url(0, "app"))
        .await
        .expect("connect to shard 0");
    // Each type gets its own stream of keys, independent of test order.
    let mut rng = StdRng::seed_from_u64(seed() ^ u64::from(ty.oid()));
    let keys = match ty {
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => gen_ints(ty, &mut rng),
        KeyType::Text | KeyType::Varchar => gen_texts(&mut rng),
        KeyType::Uuid => gen_uuids(&mut rng),
    };
    check(&client, ty, &keys).await;
}

#[tokio::test]
async fn int8_slots_match_postgres() {
    run(KeyType::Int8).await;
}

#[tokio::test]
async fn int4_slots_match_postgres() {
    run(KeyType::Int4).await;
}

#[tokio::test]
async fn int2_slots_match_postgres() {
    run(KeyType::Int2).await;
}

#[tokio::test]
async fn text_slots_match_postgres() {
    run(KeyType::Text).await;
}

#[tokio::test]
async fn varchar_slots_match_postgres() {
    run(KeyType::Varchar).await;
}

#[tokio::test]
async fn uuid_slots_match_postgres() {
    run(KeyType::Uuid).await;
}
