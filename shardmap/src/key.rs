//! Shard-key types and values, and decoding them from the wire (text and binary formats).

use std::fmt;
use std::str::FromStr;

/// The Postgres types a shard key may have.
///
/// int2/int4/int8 hash alike (Postgres's integer hash opclasses agree on every value
/// they share, verified against a Postgres 15 server), as do text and varchar (varchar uses
/// text's opclass), so a key's slot does not depend on which of those the column or the
/// bind parameter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    Int2,
    Int4,
    Int8,
    Text,
    Varchar,
    Uuid,
}

/// Type OIDs of the Postgres catalog (`pg_type.oid`), as they appear in Parse and
/// ParameterDescription.
pub mod oid {
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const INT8: u32 = 20;
    pub const TEXT: u32 = 25;
    pub const VARCHAR: u32 = 1043;
    pub const UUID: u32 = 2950;
}

impl KeyType {
    /// Every key type, for tests and listings.
    pub const ALL: [KeyType; 6] = [
        KeyType::Int2,
        KeyType::Int4,
        KeyType::Int8,
        KeyType::Text,
        KeyType::Varchar,
        KeyType::Uuid,
    ];

    /// The type's OID.
    pub fn oid(self) -> u32 {
        match self {
            KeyType::Int2 => oid::INT2,
            KeyType::Int4 => oid::INT4,
            KeyType::Int8 => oid::INT8,
            KeyType::Text => oid::TEXT,
            KeyType::Varchar => oid::VARCHAR,
            KeyType::Uuid => oid::UUID,
        }
    }

    /// The key type of a type OID, if it is one shardgate can hash.
    pub fn from_oid(type_oid: u32) -> Option<KeyType> {
        KeyType::ALL.into_iter().find(|t| t.oid() == type_oid)
    }

    /// The canonical SQL name (`bigint`, `text`, ...).
    pub fn sql_name(self) -> &'static str {
        match self {
            KeyType::Int2 => "smallint",
            KeyType::Int4 => "integer",
            KeyType::Int8 => "bigint",
            KeyType::Text => "text",
            KeyType::Varchar => "varchar",
            KeyType::Uuid => "uuid",
        }
    }

    /// The extended hash function of the type's default hash opclass: what `PARTITION BY
    /// HASH` calls for a column of this type, and what [`crate::slot_sql`] emits.
    pub fn pg_hash_function(self) -> &'static str {
        match self {
            KeyType::Int2 => "hashint2extended",
            KeyType::Int4 => "hashint4extended",
            KeyType::Int8 => "hashint8extended",
            KeyType::Text | KeyType::Varchar => "hashtextextended",
            KeyType::Uuid => "uuid_hash_extended",
        }
    }

    fn is_integer(self) -> bool {
        matches!(self, KeyType::Int2 | KeyType::Int4 | KeyType::Int8)
    }

    fn is_text(self) -> bool {
        matches!(self, KeyType::Text | KeyType::Varchar)
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.sql_name())
    }
}

impl FromStr for KeyType {
    type Err = KeyError;

    /// Accepts the SQL spellings Postgres accepts for these types (case-insensitive):
    /// `int2`/`smallint`, `int4`/`int`/`integer`, `int8`/`bigint`, `text`,
    /// `varchar`/`character varying`, `uuid`.
    fn from_str(s: &str) -> Result<KeyType, KeyError> {
        let norm = s.trim().to_ascii_lowercase();
        let norm = norm.split_whitespace().collect::<Vec<_>>().join(" ");
        Ok(match norm.as_str() {
            "int2" | "smallint" => KeyType::Int2,
            "int4" | "int" | "integer" => KeyType::Int4,
            "int8" | "bigint" => KeyType::Int8,
            "text" => KeyType::Text,
            "varchar" | "character varying" => KeyType::Varchar,
            "uuid" => KeyType::Uuid,
            _ => return Err(KeyError::UnknownType(s.to_owned())),
        })
    }
}

/// A shard-key value, normalised so that equal keys (as Postgres compares them) are equal
/// values and hash alike: all integer widths become `Int`, text and varchar become `Text`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyValue {
    Int(i64),
    /// The bytes as the server stores them (server encoding). Not `String`: a LATIN1 or
    /// other non-UTF-8 database has non-UTF-8 keys, and those must hash byte-exact.
    Text(Vec<u8>),
    Uuid([u8; 16]),
}

/// Why a key value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("invalid input syntax for type {ty}: {value:?}")]
    InvalidSyntax { ty: KeyType, value: String },
    #[error("value {value:?} is out of range for type {ty}")]
    OutOfRange { ty: KeyType, value: String },
    #[error("binary value for type {ty} must be {expected} bytes, got {got}")]
    BadLength {
        ty: KeyType,
        expected: usize,
        got: usize,
    },
    #[error("a parameter of type OID {param_oid} cannot be compared with a {key_type} shard key")]
    TypeMismatch { key_type: KeyType, param_oid: u32 },
    #[error(
        "unknown shard-key type {0:?} (expected smallint, integer, bigint, text, varchar or uuid)"
    )]
    UnknownType(String),
}

impl KeyValue {
    /// A text key from a string (UTF-8 bytes, right for a UTF8 database).
    pub fn text(s: &str) -> KeyValue {
        KeyValue::Text(s.as_bytes().to_vec())
    }

    /// Decodes a value sent in text format (a literal's text, or a Bind parameter with
    /// format code 0) for a key of type `ty`, accepting exactly what the type's input
    /// function in Postgres 15 accepts.
    ///
    /// Text keys are hashed as given, so two things are the caller's to get right: the
    /// bytes must be in the server encoding (a client with another `client_encoding`
    /// sends bytes the server converts before hashing), and a value stored into a
    /// `varchar(n)` column loses trailing blanks beyond `n` on the way in (Postgres
    /// routes the row by the truncated value).
    pub fn from_text(ty: KeyType, bytes: &[u8]) -> Result<KeyValue, KeyError> {
        match ty {
            KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => {
                parse_int(ty, bytes).map(KeyValue::Int)
            }
            KeyType::Text | KeyType::Varchar => Ok(KeyValue::Text(bytes.to_vec())),
            KeyType::Uuid => parse_uuid(bytes).map(KeyValue::Uuid),
        }
    }

    /// Decodes a value sent in binary format (Bind format code 1) for a key of type
    /// `key_type`. `param_oid` is the parameter's type as the server knows it (from Parse
    /// or ParameterDescription); 0 means "unspecified", i.e. inferred from the key column.
    ///
    /// An int key may arrive as any integer width (`id = $1::int4` against a bigint
    /// column compares across types, and the hashes agree); text and varchar mix likewise.
    /// Other combinations are errors Postgres itself would raise (`uuid = text`), or types
    /// shardgate does not decode (e.g. bpchar, whose comparison semantics differ).
    pub fn from_binary(
        key_type: KeyType,
        param_oid: u32,
        bytes: &[u8],
    ) -> Result<KeyValue, KeyError> {
        let param_ty = if param_oid == 0 {
            key_type
        } else {
            KeyType::from_oid(param_oid).ok_or(KeyError::TypeMismatch {
                key_type,
                param_oid,
            })?
        };
        let compatible = (key_type.is_integer() && param_ty.is_integer())
            || (key_type.is_text() && param_ty.is_text())
            || (key_type == KeyType::Uuid && param_ty == KeyType::Uuid);
        if !compatible {
            return Err(KeyError::TypeMismatch {
                key_type,
                param_oid,
            });
        }
        let exact = |n: usize| -> Result<(), KeyError> {
            if bytes.len() == n {
                Ok(())
            } else {
                Err(KeyError::BadLength {
                    ty: param_ty,
                    expected: n,
                    got: bytes.len(),
                })
            }
        };
        match param_ty {
            KeyType::Int2 => {
                exact(2)?;
                Ok(KeyValue::Int(i64::from(i16::from_be_bytes([
                    bytes[0], bytes[1],
                ]))))
            }
            KeyType::Int4 => {
                exact(4)?;
                let mut b = [0u8; 4];
                b.copy_from_slice(bytes);
                Ok(KeyValue::Int(i64::from(i32::from_be_bytes(b))))
            }
            KeyType::Int8 => {
                exact(8)?;
                let mut b = [0u8; 8];
                b.copy_from_slice(bytes);
                Ok(KeyValue::Int(i64::from_be_bytes(b)))
            }
            // Binary text is the raw bytes, like the text format.
            KeyType::Text | KeyType::Varchar => Ok(KeyValue::Text(bytes.to_vec())),
            KeyType::Uuid => {
                exact(16)?;
                let mut b = [0u8; 16];
                b.copy_from_slice(bytes);
                Ok(KeyValue::Uuid(b))
            }
        }
    }

    /// The slot of this key among `slots` slots (see [`crate::slot_of`]).
    pub fn slot(&self, slots: u32) -> u32 {
        crate::hash::slot_of(self, slots)
    }
}

impl From<i64> for KeyValue {
    fn from(v: i64) -> KeyValue {
        KeyValue::Int(v)
    }
}

impl From<i32> for KeyValue {
    fn from(v: i32) -> KeyValue {
        KeyValue::Int(i64::from(v))
    }
}

impl From<&str> for KeyValue {
    fn from(s: &str) -> KeyValue {
        KeyValue::text(s)
    }
}

impl fmt::Display for KeyValue {
    /// As Postgres would print it (text keys shown lossily if not UTF-8).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyValue::Int(v) => write!(f, "{v}"),
            KeyValue::Text(b) => f.write_str(&String::from_utf8_lossy(b)),
            KeyValue::Uuid(u) => {
                for (i, byte) in u.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// C `isspace` in the C locale: what Postgres's integer input skips around the digits.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Postgres 15's integer input (`pg_strtoint16/32/64`): optional surrounding whitespace,
/// an optional sign, one or more decimal digits; nothing else (no `_`, no hex: those
/// arrived in Postgres 16). Range-checked against `ty`.
fn parse_int(ty: KeyType, bytes: &[u8]) -> Result<i64, KeyError> {
    let shown = || String::from_utf8_lossy(bytes).into_owned();
    let syntax = || KeyError::InvalidSyntax { ty, value: shown() };
    let range = || KeyError::OutOfRange { ty, value: shown() };

    // One pass, in the order Postgres checks (a key is parsed on every Bind that routes):
    // leading blanks, a sign, digits (overflow is "out of range" at once, before any
    // trailing garbage is seen), trailing blanks, then nothing.
    let mut i = 0;
    while i < bytes.len() && is_c_space(bytes[i]) {
        i += 1;
    }
    let negative = match bytes.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let min = match ty {
        KeyType::Int2 => i64::from(i16::MIN),
        KeyType::Int4 => i64::from(i32::MIN),
        _ => i64::MIN,
    };
    // Accumulate negatively, as Postgres does, so that the type's minimum, whose
    // magnitude has no positive value of the type, parses. The first 18 digits cannot
    // overflow an i64, so the usual key needs no overflow check per digit.
    let first_digit = i;
    let mut acc: i64 = 0;
    while let Some(d) = bytes
        .get(i)
        .map(|b| b.wrapping_sub(b'0'))
        .filter(|d| *d <= 9)
    {
        if i - first_digit >= 18 {
            // 19 digits or more: from here on, check every step.
            acc = acc
                .checked_mul(10)
                .and_then(|v| v.checked_sub(i64::from(d)))
                .ok_or_else(range)?;
        } else {
            acc = acc * 10 - i64::from(d);
        }
        i += 1;
    }
    if i == first_digit {
        return Err(syntax());
    }
    if acc < min {
        return Err(range());
    }
    while i < bytes.len() && is_c_space(bytes[i]) {
        i += 1;
    }
    if i != bytes.len() {
        return Err(syntax());
    }
    if negative {
        Ok(acc)
    } else if acc == min {
        // One more than the type's maximum.
        Err(range())
    } else {
        Ok(-acc)
    }
}

/// Postgres's `uuid_in`: 32 hex digits (either case), optionally wrapped in `{}`, with an
/// optional `-` after any group of four digits except the last. No whitespace.
fn parse_uuid(bytes: &[u8]) -> Result<[u8; 16], KeyError> {
    let syntax = || KeyError::InvalidSyntax {
        ty: KeyType::Uuid,
        value: String::from_utf8_lossy(bytes).into_owned(),
    };
    let hex = |b: u8| -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    };
    let mut s = bytes;
    let braces = s.first() == Some(&b'{');
    if braces {
        s = &s[1..];
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        let (hi, lo) = match s {
            [h, l, ..] => (hex(*h).ok_or_else(syntax)?, hex(*l).ok_or_else(syntax)?),
            _ => return Err(syntax()),
        };
        *byte = hi << 4 | lo;
        s = &s[2..];
        if i % 2 == 1 && i < 15 && s.first() == Some(&b'-') {
            s = &s[1..];
        }
    }
    if braces {
        if s.first() != Some(&b'}') {
            return Err(syntax());
        }
        s = &s[1..];
    }
    if !s.is_empty() {
        return Err(syntax());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(ty: KeyType, s: &str) -> Result<KeyValue, KeyError> {
        KeyValue::from_text(ty, s.as_bytes())
    }

    #[test]
    fn integers_parse_like_postgres_15() {
        // Accepted by PostgreSQL 15.18 (checked with psql): ' +42 '::int8 = 42, '-0'::int2 = 0.
        assert_eq!(text(KeyType::Int8, " +42 "), Ok(KeyValue::Int(42)));
        assert_eq!(text(KeyType::Int2, "-0"), Ok(KeyValue::Int(0)));
        assert_eq!(
            text(KeyType::Int8, "\t-9223372036854775808\n"),
            Ok(KeyValue::Int(i64::MIN))
        );
        assert_eq!(
            text(KeyType::Int8, "9223372036854775807"),
            Ok(KeyValue::Int(i64::MAX))
        );
        assert_eq!(
            text(KeyType::Int4, "-2147483648"),
            Ok(KeyValue::Int(-2_147_483_648))
        );
        assert_eq!(text(KeyType::Int2, "32767"), Ok(KeyValue::Int(32767)));
        assert_eq!(text(KeyType::Int8, "007"), Ok(KeyValue::Int(7)));
        // More than 18 digits takes the checked path; leading zeros do not overflow.
        assert_eq!(
            text(KeyType::Int2, "-0000000000000000000000042"),
            Ok(KeyValue::Int(-42))
        );
        assert_eq!(
            text(KeyType::Int8, "999999999999999999"),
            Ok(KeyValue::Int(999_999_999_999_999_999))
        );
        // Rejected by the server as invalid syntax (PG 16 would take 1_000 and 0x10).
        for bad in [
            "1_000", "0x10", "", " ", "+", "-", "4 2", "42.0", "1e3", "--1", "٣",
        ] {
            for ty in [KeyType::Int2, KeyType::Int4, KeyType::Int8] {
                assert!(
                    matches!(text(ty, bad), Err(KeyError::InvalidSyntax { .. })),
                    "{ty} {bad:?}"
                );
            }
        }
        // Out of range for the type. Too many digits is "out of range" before trailing
        // garbage is seen, as in PostgreSQL 15.18 ('99999x'::int2).
        for (ty, v) in [
            (KeyType::Int2, "32768"),
            (KeyType::Int2, "-32769"),
            (KeyType::Int4, "2147483648"),
            (KeyType::Int8, "9223372036854775808"),
            (KeyType::Int8, "-9223372036854775809"),
            (KeyType::Int8, "99999999999999999999999"),
            (KeyType::Int2, "99999x"),
            (KeyType::Int4, "2147483649x"),
            (KeyType::Int8, "99999999999999999999x"),
        ] {
            assert!(
                matches!(text(ty, v), Err(KeyError::OutOfRange { .. })),
                "{ty} {v:?}"
            );
        }
        // Exactly one past the maximum reaches the minimum's magnitude without
        // overflowing, so trailing garbage is seen first: invalid syntax, as in Postgres.
        assert!(matches!(
            text(KeyType::Int4, "2147483648 x"),
            Err(KeyError::InvalidSyntax { .. })
        ));
        assert_eq!(text(KeyType::Int2, "-32768"), Ok(KeyValue::Int(-32768)));
    }

    #[test]
    fn uuids_parse_like_postgres() {
        let want = KeyValue::Uuid([
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ]);
        // All accepted by PostgreSQL 15.18 as the same value.
        for ok in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{A0EEBC99-9C0B4EF8-BB6D6BB9-BD380A11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert_eq!(text(KeyType::Uuid, ok), Ok(want.clone()), "{ok}");
        }
        // All rejected by PostgreSQL 15.18.
        for bad in [
            "a0eebc99-9c0b4ef8bb6d6bb9bd380a11-",
            "a0eebc999c0b4ef8bb6d6bb9bd380a1",
            " a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0e-ebc999c0b4ef8bb6d6bb9bd380a11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0eebc99--9c0b4ef8bb6d6bb9bd380a11",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11}",
            "g0eebc999c0b4ef8bb6d6bb9bd380a11",
            "",
        ] {
            assert!(
                matches!(
                    text(KeyType::Uuid, bad),
                    Err(KeyError::InvalidSyntax { .. })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(want.to_string(), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    }

    #[test]
    fn text_is_bytes_verbatim() {
        assert_eq!(text(KeyType::Text, "  x "), Ok(KeyValue::text("  x ")));
        assert_eq!(
            KeyValue::from_text(KeyType::Varchar, b"\xe9t\xe9"),
            Ok(KeyValue::Text(b"\xe9t\xe9".to_vec()))
        );
    }

    #[test]
    fn binary_integers_of_any_width() {
        let k = KeyType::Int8;
        assert_eq!(
            KeyValue::from_binary(k, 0, &42i64.to_be_bytes()),
            Ok(KeyValue::Int(42))
        );
        assert_eq!(
            KeyValue::from_binary(k, oid::INT8, &(-7i64).to_be_bytes()),
            Ok(KeyValue::Int(-7))
        );
        assert_eq!(
            KeyValue::from_binary(k, oid::INT4, &(-7i32).to_be_bytes()),
            Ok(KeyValue::Int(-7))
        );
        assert_eq!(
            KeyValue::from_binary(k, oid::INT2, &(-7i16).to_be_bytes()),
            Ok(KeyValue::Int(-7))
        );
        assert_eq!(
            KeyValue::from_binary(KeyType::Int4, 0, &(-7i32).to_be_bytes()),
            Ok(KeyValue::Int(-7))
        );
        assert_eq!(
            KeyValue::from_binary(k, 0, &[0, 0, 0, 42]),
            Err(KeyError::BadLength {
                ty: KeyType::Int8,
                expected: 8,
                got: 4
            })
        );
        assert_eq!(
            KeyValue::from_binary(KeyType::Int2, 0, &[1]),
            Err(KeyError::BadLength {
                ty: KeyType::Int2,
                expected: 2,
                got: 1
            })
        );
    }

    #[test]
    fn binary_text_uuid_and_mismatches() {
        assert_eq!(
            KeyValue::from_binary(KeyType::Text, 0, b"abc"),
            Ok(KeyValue::text("abc"))
        );
        assert_eq!(
            KeyValue::from_binary(KeyType::Text, oid::VARCHAR, b"abc"),
            Ok(KeyValue::text("abc"))
        );
        assert_eq!(
            KeyValue::from_binary(KeyType::Uuid, 0, &[7; 16]),
            Ok(KeyValue::Uuid([7; 16]))
        );
        assert!(matches!(
            KeyValue::from_binary(KeyType::Uuid, 0, &[7; 15]),
            Err(KeyError::BadLength {
                expected: 16,
                got: 15,
                ..
            })
        ));
        assert_eq!(
            KeyValue::from_binary(KeyType::Uuid, oid::TEXT, b"x"),
            Err(KeyError::TypeMismatch {
                key_type: KeyType::Uuid,
                param_oid: oid::TEXT
            })
        );
        assert_eq!(
            KeyValue::from_binary(KeyType::Int8, oid::TEXT, b"42"),
            Err(KeyError::TypeMismatch {
                key_type: KeyType::Int8,
                param_oid: oid::TEXT
            })
        );
        // bpchar (1042) compares with different semantics (trailing blanks): not decoded.
        assert_eq!(
            KeyValue::from_binary(KeyType::Text, 1042, b"a "),
            Err(KeyError::TypeMismatch {
                key_type: KeyType::Text,
                param_oid: 1042
            })
        );
    }

    #[test]
    fn type_names_and_oids() {
        for t in KeyType::ALL {
            assert_eq!(KeyType::from_oid(t.oid()), Some(t));
            assert_eq!(t.sql_name().parse::<KeyType>(), Ok(t));
        }
        assert_eq!("BIGINT".parse::<KeyType>(), Ok(KeyType::Int8));
        assert_eq!(
            "character  varying".parse::<KeyType>(),
            Ok(KeyType::Varchar)
        );
        assert_eq!("int".parse::<KeyType>(), Ok(KeyType::Int4));
        assert!("numeric".parse::<KeyType>().is_err());
        assert_eq!(KeyType::from_oid(1700), None);
    }
}
