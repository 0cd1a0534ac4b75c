//! Postgres's own hash functions, bit for bit, and the slot of a key.
//!
//! `PARTITION BY HASH` in Postgres computes, for a single-column key,
//! `hash_combine64(0, hashXextended(key, HASH_PARTITION_SEED))`, which is
//! `hashXextended(key, seed) + 0x49a0f4dd15e5a8e3 (mod 2^64)`, then takes that modulo the
//! partition modulus. shardgate uses the same value with modulus = SLOTS, so a row's slot
//! can be computed in SQL on any shard ([`slot_sql`]) and checked against a real
//! partitioned table (`satisfies_hash_partition`).
//!
//! The byte hash is Bob Jenkins' lookup3 mixing (public domain) as Postgres arranges it in
//! `hash_bytes_extended`: the state starts at `0x9e3779b9 + len + 3923095`, the 64-bit seed
//! is folded into `a` (high half) and `b` (low half) followed by one `mix`, 12-byte blocks are
//! added as three little-endian words, the 0..11 trailing bytes are added with the lowest
//! byte of `c` left free, and after `final` the result is `b << 32 | c`.
//!
//! Byte order: Postgres reads the words in the *server's* native order, so its hashes of
//! text and uuid differ between little- and big-endian servers. This module reproduces
//! little-endian servers (x86-64, aarch64), which is everything Postgres 15 runs on in
//! practice; the integer hashes do not depend on byte order.

use crate::key::{KeyType, KeyValue};

/// `HASH_PARTITION_SEED` of Postgres (`src/include/catalog/partition.h`): the seed every
/// `PARTITION BY HASH` key hash uses. In SQL (a signed bigint): 8816678312871386365.
pub const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// The constant `hash_combine64` adds. With a single key column the partition hash is
/// `hash + HASH_COMBINE_ADD` (wrapping), so the combine reduces to this addition.
pub const HASH_COMBINE_ADD: u64 = 0x49a0_f4dd_15e5_a8e3;

/// The initial value lookup3 derives every state word from (the golden ratio), plus the
/// extra constant Postgres adds to it.
const GOLDEN: u32 = 0x9e37_79b9;
const PG_INIT_ADD: u32 = 3_923_095;

/// lookup3's `mix`: reversibly mixes three words so every input bit affects the output.
#[inline(always)]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

/// lookup3's `final`: the last avalanche of the three words into `c` (and `b`).
#[inline(always)]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// The starting state for a key of `len` bytes, with the seed folded in.
#[inline(always)]
fn init_state(len: u32, seed: u64) -> (u32, u32, u32) {
    let v = GOLDEN.wrapping_add(len).wrapping_add(PG_INIT_ADD);
    let (mut a, mut b, mut c) = (v, v, v);
    // Postgres skips the seed step for seed 0, so that seed-0 extended hashes keep the
    // 32-bit hash (`hash_bytes`) in their low half.
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    (a, b, c)
}

/// Little-endian word from up to 4 bytes, starting at bit `shift` (0 or 8).
#[inline(always)]
fn le_word(bytes: &[u8], shift: u32) -> u32 {
    bytes.iter().enumerate().fold(0u32, |w, (i, &b)| {
        w | (u32::from(b) << (shift + 8 * i as u32))
    })
}

/// Postgres's `hash_bytes_extended` (alias `hash_any_extended`) on a little-endian server.
pub fn hash_bytes_extended(key: &[u8], seed: u64) -> u64 {
    // Postgres passes the length as a C int; keys here are far below 2 GiB, and the
    // truncation matches what the server would do with its int anyway.
    let (mut a, mut b, mut c) = init_state(key.len() as u32, seed);
    let mut blocks = key.chunks_exact(12);
    for block in &mut blocks {
        a = a.wrapping_add(le_word(&block[0..4], 0));
        b = b.wrapping_add(le_word(&block[4..8], 0));
        c = c.wrapping_add(le_word(&block[8..12], 0));
        mix(&mut a, &mut b, &mut c);
    }
    let tail = blocks.remainder();
    // Trailing bytes: 0..4 into a, 4..8 into b, 8..11 into c shifted up one byte (the
    // lowest byte of c stays free, a habit inherited from lookup2 where it held the length).
    a = a.wrapping_add(le_word(&tail[..tail.len().min(4)], 0));
    if tail.len() > 4 {
        b = b.wrapping_add(le_word(&tail[4..tail.len().min(8)], 0));
    }
    if tail.len() > 8 {
        c = c.wrapping_add(le_word(&tail[8..], 8));
    }
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// Postgres's `hash_uint32_extended`: the 4-byte special case of [`hash_bytes_extended`]
/// (same result as hashing the value's 4 little-endian bytes).
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let (mut a, mut b, mut c) = init_state(4, seed);
    a = a.wrapping_add(k);
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// `hashint8extended(bigint, seed)`. Folds the high half into the low half (inverted for
/// negative values) so that an int8 holding an int4-range value hashes like that int4:
/// this is what lets Postgres compare int2/int4/int8 keys across types.
pub fn hashint8extended(v: i64, seed: u64) -> u64 {
    let lo = v as u32;
    let hi = (v >> 32) as u32;
    let folded = if v >= 0 { lo ^ hi } else { lo ^ !hi };
    hash_uint32_extended(folded, seed)
}

/// `hashint4extended(int, seed)`: equals `hashint8extended(v as i64, seed)` for every int4.
pub fn hashint4extended(v: i32, seed: u64) -> u64 {
    hash_uint32_extended(v as u32, seed)
}

/// `hashint2extended(smallint, seed)`: the value is sign-extended to int4 first.
pub fn hashint2extended(v: i16, seed: u64) -> u64 {
    hash_uint32_extended(i32::from(v) as u32, seed)
}

/// `hashtextextended(text, seed)` for a deterministic collation: the hash of the bytes
/// (in the server encoding) without any normalisation.
pub fn hashtextextended(bytes: &[u8], seed: u64) -> u64 {
    hash_bytes_extended(bytes, seed)
}

/// `uuid_hash_extended(uuid, seed)`: the hash of the 16 bytes in their textual order.
pub fn uuid_hash_extended(uuid: &[u8; 16], seed: u64) -> u64 {
    hash_bytes_extended(uuid, seed)
}

/// The Postgres extended hash of a key, with the function Postgres's default hash opclass
/// for its type uses (`Int` through `hashint8extended`, which equals the int2/int4 ones).
pub fn key_hash(key: &KeyValue, seed: u64) -> u64 {
    match key {
        KeyValue::Int(v) => hashint8extended(*v, seed),
        KeyValue::Text(bytes) => hashtextextended(bytes, seed),
        KeyValue::Uuid(u) => uuid_hash_extended(u, seed),
    }
}

/// The partition hash Postgres computes for a one-column `PARTITION BY HASH` key: the key
/// hash with [`HASH_PARTITION_SEED`], combined into 0 by `hash_combine64`.
pub fn partition_hash(key: &KeyValue) -> u64 {
    key_hash(key, HASH_PARTITION_SEED).wrapping_add(HASH_COMBINE_ADD)
}

/// The slot of `key` among `slots` slots: the remainder Postgres's `PARTITION BY HASH (k)`
/// with `MODULUS slots` puts the row in. Right for any modulus; shard maps use powers of
/// two (a mask instead of a division, and the short SQL of [`slot_sql`]). `slots` = 0
/// is treated as 1.
#[inline]
pub fn slot_of(key: &KeyValue, slots: u32) -> u32 {
    let h = partition_hash(key);
    let m = u64::from(slots.max(1));
    // The result is below `slots`, so it fits u32.
    if m.is_power_of_two() {
        (h & (m - 1)) as u32
    } else {
        (h % m) as u32
    }
}

/// `HASH_COMBINE_ADD mod slots`: the constant of the SQL slot expression.
pub fn combine_add_mod(slots: u32) -> u64 {
    HASH_COMBINE_ADD % u64::from(slots.max(1))
}

/// An SQL expression (0..slots-1) computing the slot of `column` on a Postgres server,
/// equal to [`slot_of`] for every value.
///
/// `column` is inserted verbatim: pass a (quoted, if needed: [`quote_ident`]) column
/// reference or any expression of the key's type. For `slots` = 4096 and int8 it reads
/// `((hashint8extended(k, 8816678312871386365) % 4096) + 4096 + 2275) % 4096`.
///
/// Why this shape: SQL's `%` on bigint keeps the dividend's sign, so `h % slots` lies in
/// `(-slots, slots)`; adding `slots` makes it non-negative and adding
/// `HASH_COMBINE_ADD mod slots` applies the combine step. Since a power-of-two `slots`
/// divides 2^64, reducing the signed hash mod `slots` equals reducing its unsigned bits.
/// The sum stays below `3 * slots`, so nothing overflows. Other moduli do not divide
/// 2^64; for them the expression takes the detour through `numeric` (exact, slower).
pub fn slot_sql(column: &str, key_type: KeyType, slots: u32) -> String {
    let seed = HASH_PARTITION_SEED as i64;
    let func = key_type.pg_hash_function();
    let slots = slots.max(1);
    if slots.is_power_of_two() {
        let add = combine_add_mod(slots);
        format!("(({func}({column}, {seed}) % {slots}) + {slots} + {add}) % {slots}")
    } else {
        // ((h mod 2^64) + C) mod 2^64 mod slots, in numeric to avoid bigint overflow.
        let two64 = 1u128 << 64;
        format!(
            "(((({func}({column}, {seed})::numeric % {two64}) + {two64} + {HASH_COMBINE_ADD}) % {two64}) % {slots})::bigint"
        )
    }
}

/// An SQL predicate selecting the rows of `column` whose slot lies in `lo..=hi`
/// (what the slot mover copies).
pub fn slot_range_sql(column: &str, key_type: KeyType, slots: u32, lo: u32, hi: u32) -> String {
    let expr = slot_sql(column, key_type, slots);
    if lo == hi {
        format!("{expr} = {lo}")
    } else {
        format!("{expr} BETWEEN {lo} AND {hi}")
    }
}

/// Quotes an SQL identifier for use in [`slot_sql`]. Always quotes: that is right for
/// every name, keywords (`user`, `order`) and mixed case included, without a keyword list.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    //! Every expected value below was computed by a real server: PostgreSQL 15.18
    //! (Debian 15.18-0+deb12u1, x86_64, server_encoding UTF8), via psql, e.g.
    //! `SELECT hashtextextended('abc', 8816678312871386365)`.

    use super::*;

    const SEEDS: [u64; 4] = [0, HASH_PARTITION_SEED, 1, u64::MAX];

    /// `hashtextextended(s, seed)` on PostgreSQL 15.18 (x86-64, UTF8) for the first n
    /// letters of the alphabet, n = 0..=30 (every tail length, up to 3 blocks), with
    /// seeds 0, HASH_PARTITION_SEED, 1 and -1.
    const TEXT_VECTORS: &[(&str, [i64; 4])] = &[
        (
            "",
            [
                -6939563903564495251,
                -5700645584453517373,
                -150071773020461347,
                -5142811166230430645,
            ],
        ),
        (
            "a",
            [
                3591986179850072241,
                -6705225459120232837,
                3325245193489759299,
                8688456822845412000,
            ],
        ),
        (
            "ab",
            [
                2833316173711343549,
                596009030900183869,
                6831083245906393158,
                3639176434904646991,
            ],
        ),
        (
            "abc",
            [
                -6747756470228489321,
                3628778498291917250,
                2125675926272891485,
                1911237551546830967,
            ],
        ),
        (
            "abcd",
            [
                -1038429303365892052,
                4029384952263848046,
                -9042268383291675265,
                -8506387423880103258,
            ],
        ),
        (
            "abcde",
            [
                3076356108696143428,
                4809259092934399961,
                3336351395796527909,
                1101614911744638770,
            ],
        ),
        (
            "abcdef",
            [
                290958262752763840,
                -658605897836517514,
                -7708154518206703230,
                -8726566599983568251,
            ],
        ),
        (
            "abcdefg",
            [
                -6158032784613548338,
                -1516236981150442578,
                8893296306369806751,
                6620770052711690062,
            ],
        ),
        (
            "abcdefgh",
            [
                -8882191227074733005,
                -7754745184861941070,
                -996835456672934620,
                3589487173844465705,
            ],
        ),
        (
            "abcdefghi",
            [
                -3278210106038014113,
                -7860738947571725408,
                5773402991589158274,
                -2999851607155231060,
            ],
        ),
        (
            "abcdefghij",
            [
                -3183301415634409076,
                -8306284229451770207,
                3861069368272743232,
                -5021275161817138704,
            ],
        ),
        (
            "abcdefghijk",
            [
                3112909444737856467,
                -2046435308545367432,
                8196382510784792041,
                2833918571160852060,
            ],
        ),
        (
            "abcdefghijkl",
            [
                -7556637188122330412,
                -7876791541613377658,
                -6429754808531195817,
                -3669402583748189229,
            ],
        ),
        (
            "abcdefghijklm",
            [
                8871624171452417744,
                -6785754114725280077,
                3808842878744369845,
                6205390682044465928,
            ],
        ),
        (
            "abcdefghijklmn",
            [
                4973135103275945525,
                -5209977316171801933,
                -5803621093042304102,
                -8987595384538607212,
            ],
        ),
        (
            "abcdefghijklmno",
            [
                9043359162837317271,
                3744103518171237272,
                8832998013640486416,
                -7615068487785081078,
            ],
        ),
        (
            "abcdefghijklmnop",
            [
                878954068520307163,
                -2963246452690924729,
                703898403846518408,
                5590415279907605704,
            ],
        ),
        (
            "abcdefghijklmnopq",
            [
                981995727863167554,
                -4290088002765369671,
                5745342997094660364,
                -2953348790902433648,
            ],
        ),
        (
            "abcdefghijklmnopqr",
            [
                484589330715449564,
                -3976194482402635722,
                -8483450521730918564,
                -8506089820271521831,
            ],
        ),
        (
            "abcdefghijklmnopqrs",
            [
                -232611774418841497,
                6411573653485454739,
                -5352055475504206210,
                -1422852774862433387,
            ],
        ),
        (
            "abcdefghijklmnopqrst",
            [
                772495730612720881,
                -3730286019426601237,
                7175789958500889000,
                -558738407119253020,
            ],
        ),
        (
            "abcdefghijklmnopqrstu",
            [
                7996419909667933074,
                -9009476528635760866,
                7909351786236951067,
                -2291028065551762409,
            ],
        ),
        (
            "abcdefghijklmnopqrstuv",
            [
                5065299895581918398,
                1804191968730614896,
                -2120185363977180431,
                -2645673675841555979,
            ],
        ),
        (
            "abcdefghijklmnopqrstuvw",
            [
                -1198571854151947912,
                -7324642668702903167,
                5175166317898960337,
                8540048242465105909,
            ],
        ),
        (
            "abcdefghijklmnopqrstuvwx",
            [
                -1933194731779935345,
                -10959101940276370,
                -731882798451170301,
                -1203456767747787834,
            ],
        ),
        (
            "abcdefghijklmnopqrstuvwxy",
            [
                5649064133428767341,
                1383018584709609407,
                5694819572527276190,
                -5957734741082924352,
            ],
        ),
        (
            "abcdefghijklmnopqrstuvwxyz",
            [
                -6612928417832572997,
                -7171292135076916904,
                1507071677509843718,
                -4178256369493887523,
            ],
        ),
        (
            "abcdefghijklmnopqrstuvwxyza",
            [
                1294243230119016148,
                -1537961842694191890,
                2832792705673965013,
                3125453342657364239,
            ],
        ),
        (
            "abcdefghijklmnopqrstuvwxyzab",
            [
                2143807159975669291,
                -3032345617867618605,
                -4921892110640332474,
                1976016566698661460,
            ],
        ),
        (
            "abcdefghijklmnopqrstuvwxyzabc",
            [
                -8501952648734893664,
                3287789174882024451,
                5915824031108917345,
                8120876737082243603,
            ],
        ),
        (
            "abcdefghijklmnopqrstuvwxyzabcd",
            [
                7067495936066491918,
                1832193621279626448,
                242333749743321838,
                20465224460930655,
            ],
        ),
    ];
    /// `hashtextextended(s, HASH_PARTITION_SEED)` and `(s, 0)` for multi-byte UTF-8 text.
    const UTF8_VECTORS: &[(&str, i64, i64)] = &[
        ("é", 4377877661621198540, -763932721387459829),
        ("日本語", -8050275759738715173, 2870829529307104068),
        ("ÄÖÜäöüß€", -7487877923561173125, -7752732950605785284),
        ("𝄞 music", 3928725207725494736, -5774864677482797182),
        ("  spaced  ", -2040305563419915467, 2927239353906051867),
        ("Hello, World!", 748275751548195980, 3515830285206876873),
    ];
    /// `hashint8extended(v, seed)` with seeds 0, HASH_PARTITION_SEED, 1, -1.
    const INT8_VECTORS: &[(i64, [i64; 4])] = &[
        (
            0,
            [
                4154612158245552303,
                -4403592609991167795,
                434346878670890809,
                -4140905993450701875,
            ],
        ),
        (
            1,
            [
                -3670598878359251130,
                5968994663651403477,
                -7620678293940249823,
                1505930170527472848,
            ],
        ),
        (
            -1,
            [
                -1888257769727981238,
                -5017072347659237694,
                3987656643895367148,
                6481520839006961279,
            ],
        ),
        (
            42,
            [
                8010225493015854792,
                7363975540656877951,
                3812564155960986560,
                -6198169983862266934,
            ],
        ),
        (
            -42,
            [
                8809670066178192187,
                6660635123915733087,
                -6366388251206941686,
                8355049244265804908,
            ],
        ),
        (
            2147483647,
            [
                -9109110466470504941,
                -6050265599104649060,
                2560836655869490746,
                8384907054876656385,
            ],
        ),
        (
            -2147483648,
            [
                1977219185673256887,
                4938542303000433043,
                3044001184559810835,
                6110074166949006181,
            ],
        ),
        (
            2147483648,
            [
                1977219185673256887,
                4938542303000433043,
                3044001184559810835,
                6110074166949006181,
            ],
        ),
        (
            -2147483649,
            [
                -9109110466470504941,
                -6050265599104649060,
                2560836655869490746,
                8384907054876656385,
            ],
        ),
        (
            4294967295,
            [
                -1888257769727981238,
                -5017072347659237694,
                3987656643895367148,
                6481520839006961279,
            ],
        ),
        (
            4294967296,
            [
                -3670598878359251130,
                5968994663651403477,
                -7620678293940249823,
                1505930170527472848,
            ],
        ),
        (
            i64::MAX,
            [
                1977219185673256887,
                4938542303000433043,
                3044001184559810835,
                6110074166949006181,
            ],
        ),
        (
            i64::MIN,
            [
                -9109110466470504941,
                -6050265599104649060,
                2560836655869490746,
                8384907054876656385,
            ],
        ),
        (
            123456789012345,
            [
                6283493225420036195,
                1245190300417211467,
                -2451371406310054553,
                6274297688418980714,
            ],
        ),
        (
            -123456789012345,
            [
                7311809587481416233,
                1319997625056975514,
                3591318648248974835,
                528070267712654385,
            ],
        ),
    ];
    /// `hashint4extended(v, 0)`, `hashint4extended(v, SEED)`, `hashint2extended(v, SEED)`.
    const INT4_VECTORS: &[(i32, [i64; 3])] = &[
        (
            0,
            [
                4154612158245552303,
                -4403592609991167795,
                -4403592609991167795,
            ],
        ),
        (
            1,
            [
                -3670598878359251130,
                5968994663651403477,
                5968994663651403477,
            ],
        ),
        (
            -1,
            [
                -1888257769727981238,
                -5017072347659237694,
                -5017072347659237694,
            ],
        ),
        (
            42,
            [
                8010225493015854792,
                7363975540656877951,
                7363975540656877951,
            ],
        ),
        (
            -42,
            [
                8809670066178192187,
                6660635123915733087,
                6660635123915733087,
            ],
        ),
        (
            32767,
            [
                1790040721271588170,
                -6436696229286267413,
                -6436696229286267413,
            ],
        ),
        (
            -32768,
            [
                8455483389771436374,
                5885242512097991578,
                5885242512097991578,
            ],
        ),
    ];
    /// `hashint4extended(v, HASH_PARTITION_SEED)` outside the int2 range.
    const INT4_WIDE_VECTORS: &[(i32, i64)] = &[
        (i32::MAX, -6050265599104649060),
        (i32::MIN, 4938542303000433043),
        (65536, -6572490507615227487),
        (-65536, -4284087414046083809),
    ];
    /// `uuid_hash_extended(u, 0)` and `(u, HASH_PARTITION_SEED)`.
    const UUID_VECTORS: &[(&str, i64, i64)] = &[
        (
            "00000000-0000-0000-0000-000000000000",
            -6859010066814654381,
            -5281082146396728638,
        ),
        (
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            7543054272012930821,
            424513190990560493,
        ),
        (
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            293445543803463785,
            -148986464341306210,
        ),
        (
            "123e4567-e89b-12d3-a456-426614174000",
            -1647950126005018481,
            -1252132692482143582,
        ),
    ];

    /// Slots (modulus 4096) as computed on the server twice: with the SQL slot expression
    /// and with `satisfies_hash_partition` on a `PARTITION BY HASH` table (both agreed).
    const INT8_SLOTS: &[(i64, u32)] = &[
        (0, 2480),
        (1, 4024),
        (-1, 4005),
        (42, 2658),
        (-42, 322),
        (1_000_000, 2187),
        (i64::MAX, 2678),
        (i64::MIN, 383),
    ];
    const TEXT_SLOTS: &[(&str, u32)] = &[
        ("", 2214),
        ("abc", 2725),
        ("alice", 981),
        ("Hello, World!", 3439),
        ("日本語", 3262),
    ];
    const UUID_SLOTS: &[(&str, u32)] = &[
        ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", 1488),
        ("00000000-0000-0000-0000-000000000000", 2981),
    ];

    fn uuid(s: &str) -> [u8; 16] {
        match KeyValue::from_text(KeyType::Uuid, s.as_bytes()) {
            Ok(KeyValue::Uuid(u)) => u,
            other => panic!("bad test uuid {s}: {other:?}"),
        }
    }

    #[test]
    fn seed_constant_matches_sql_literal() {
        assert_eq!(HASH_PARTITION_SEED as i64, 8_816_678_312_871_386_365);
        assert_eq!(combine_add_mod(4096), 2275);
    }

    #[test]
    fn text_matches_postgres() {
        for (s, expected) in TEXT_VECTORS {
            for (seed, want) in SEEDS.iter().zip(expected) {
                assert_eq!(
                    hashtextextended(s.as_bytes(), *seed) as i64,
                    *want,
                    "{s:?} seed {seed:#x}"
                );
            }
        }
        for (s, with_seed, zero) in UTF8_VECTORS {
            assert_eq!(
                hashtextextended(s.as_bytes(), HASH_PARTITION_SEED) as i64,
                *with_seed,
                "{s:?}"
            );
            assert_eq!(hashtextextended(s.as_bytes(), 0) as i64, *zero, "{s:?}");
        }
    }

    #[test]
    fn int8_matches_postgres() {
        for (v, expected) in INT8_VECTORS {
            for (seed, want) in SEEDS.iter().zip(expected) {
                assert_eq!(
                    hashint8extended(*v, *seed) as i64,
                    *want,
                    "{v} seed {seed:#x}"
                );
            }
        }
    }

    #[test]
    fn int4_and_int2_match_postgres_and_int8() {
        for (v, [zero, seeded, int2]) in INT4_VECTORS {
            assert_eq!(hashint4extended(*v, 0) as i64, *zero, "{v}");
            assert_eq!(
                hashint4extended(*v, HASH_PARTITION_SEED) as i64,
                *seeded,
                "{v}"
            );
            let v2 = i16::try_from(*v).expect("test values fit int2");
            assert_eq!(
                hashint2extended(v2, HASH_PARTITION_SEED) as i64,
                *int2,
                "{v}"
            );
            // The server agrees the widths hash alike; that is why KeyValue::Int suffices.
            assert_eq!(
                hashint8extended(i64::from(*v), HASH_PARTITION_SEED) as i64,
                *seeded,
                "{v}"
            );
        }
        for (v, want) in INT4_WIDE_VECTORS {
            assert_eq!(
                hashint4extended(*v, HASH_PARTITION_SEED) as i64,
                *want,
                "{v}"
            );
            assert_eq!(
                hashint8extended(i64::from(*v), HASH_PARTITION_SEED) as i64,
                *want,
                "{v}"
            );
        }
    }

    #[test]
    fn uuid_matches_postgres() {
        for (s, zero, seeded) in UUID_VECTORS {
            let u = uuid(s);
            assert_eq!(uuid_hash_extended(&u, 0) as i64, *zero, "{s}");
            assert_eq!(
                uuid_hash_extended(&u, HASH_PARTITION_SEED) as i64,
                *seeded,
                "{s}"
            );
        }
    }

    #[test]
    fn slots_match_postgres_partitioning() {
        for (v, slot) in INT8_SLOTS {
            assert_eq!(slot_of(&KeyValue::Int(*v), 4096), *slot, "{v}");
        }
        for (s, slot) in TEXT_SLOTS {
            assert_eq!(slot_of(&KeyValue::text(s), 4096), *slot, "{s:?}");
        }
        for (s, slot) in UUID_SLOTS {
            assert_eq!(slot_of(&KeyValue::Uuid(uuid(s)), 4096), *slot, "{s}");
        }
    }

    #[test]
    fn other_moduli_match_postgres_partitioning() {
        // (key, remainder for MODULUS 1000, remainder for MODULUS 7) from
        // satisfies_hash_partition on PostgreSQL 15.18; the numeric SQL expression agreed.
        let cases: &[(i64, u32, u32)] = &[
            (0, 768, 4),
            (1, 40, 5),
            (-1, 869, 0),
            (42, 514, 0),
            (-42, 650, 4),
            (i64::MAX, 606, 3),
            (i64::MIN, 119, 0),
        ];
        for &(v, m1000, m7) in cases {
            assert_eq!(slot_of(&KeyValue::Int(v), 1000), m1000, "{v}");
            assert_eq!(slot_of(&KeyValue::Int(v), 7), m7, "{v}");
        }
        assert_eq!(
            slot_sql("k", KeyType::Int8, 1000),
            "((((hashint8extended(k, 8816678312871386365)::numeric % 18446744073709551616) \
             + 18446744073709551616 + 5305509591434766563) % 18446744073709551616) % 1000)::bigint"
        );
    }

    #[test]
    fn smaller_power_of_two_slots_nest() {
        // slot mod 2^k under 4096 slots equals the slot under 2^k slots: halving SLOTS
        // merges slot pairs, it never reshuffles keys.
        for v in -1000..1000i64 {
            let k = KeyValue::Int(v);
            let s = slot_of(&k, 4096);
            for bits in 0..12 {
                assert_eq!(slot_of(&k, 1 << bits), s % (1 << bits));
            }
        }
    }

    #[test]
    fn uint32_special_case_equals_byte_hash() {
        for k in [0u32, 1, 42, 0xdead_beef, u32::MAX] {
            for seed in SEEDS {
                assert_eq!(
                    hash_uint32_extended(k, seed),
                    hash_bytes_extended(&k.to_le_bytes(), seed)
                );
            }
        }
    }

    #[test]
    fn slot_sql_text() {
        assert_eq!(
            slot_sql("k", KeyType::Int8, 4096),
            "((hashint8extended(k, 8816678312871386365) % 4096) + 4096 + 2275) % 4096"
        );
        assert_eq!(
            slot_sql("\"userId\"", KeyType::Uuid, 64),
            format!(
                "((uuid_hash_extended(\"userId\", 8816678312871386365) % 64) + 64 + {}) % 64",
                HASH_COMBINE_ADD % 64
            )
        );
        assert_eq!(
            slot_range_sql("id", KeyType::Int4, 4096, 0, 63),
            "((hashint4extended(id, 8816678312871386365) % 4096) + 4096 + 2275) % 4096 BETWEEN 0 AND 63"
        );
        assert_eq!(quote_ident("user"), "\"user\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    /// Evaluates the SQL slot expression's arithmetic the way Postgres does (signed
    /// bigint, truncating `%`), to check it against `slot_of` for any hash value.
    fn sql_slot_arith(h: i64, slots: u32) -> u32 {
        let m = i64::from(slots);
        (((h % m) + m + combine_add_mod(slots) as i64) % m) as u32
    }

    #[test]
    fn sql_arithmetic_equals_unsigned_reduction() {
        let hashes = [
            0i64,
            1,
            -1,
            i64::MIN,
            i64::MAX,
            -4096,
            4095,
            -4097,
            123_456_789,
            -987_654_321,
        ];
        for h in hashes {
            for bits in 0..=20 {
                let slots = 1u32 << bits;
                let want = ((h as u64).wrapping_add(HASH_COMBINE_ADD) % u64::from(slots)) as u32;
                assert_eq!(sql_slot_arith(h, slots), want, "h={h} slots={slots}");
            }
        }
    }
}
