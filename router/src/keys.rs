//! Turning SQL literals and parameter text into typed shard-key values.

use crate::catalog::KeyType;
use crate::types::KeyValue;

/// A constant as written in SQL, before typing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lit<'a> {
    /// A numeric constant, possibly with a leading `-`.
    Number(&'a str),
    /// The (unescaped) content of a plain `'...'` string.
    Str(&'a str),
}

/// Types a literal as Postgres would when comparing it with a key of type `ty`. `None`
/// when the literal would not compare as an equal key (a numeric `42.0` against an int
/// key compares as numeric; a number against a text key is an error), so the caller must
/// not route by it.
pub(crate) fn key_from_lit(lit: Lit<'_>, ty: KeyType) -> Option<KeyValue> {
    match (lit, ty) {
        (Lit::Number(n), KeyType::Int) => parse_int(n).map(KeyValue::Int),
        (Lit::Str(s), KeyType::Int) => parse_int_input(s).map(KeyValue::Int),
        (Lit::Str(s), KeyType::Text) => Some(KeyValue::Text(s.to_string())),
        (Lit::Str(s), KeyType::Uuid) => parse_uuid(s).map(KeyValue::Uuid),
        (Lit::Number(_), KeyType::Text | KeyType::Uuid) => None,
    }
}

impl KeyValue {
    /// Types a parameter sent in text format (or a hint value) for a key of type `ty`:
    /// what Postgres's input function for that type would accept (decimal integers only).
    pub fn from_text(text: &str, ty: KeyType) -> Option<KeyValue> {
        key_from_lit(Lit::Str(text), ty)
    }
}

/// A plain decimal integer constant: `-`? digits.
fn parse_int(n: &str) -> Option<i64> {
    let (neg, digits) = match n.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, n),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Parse with the sign attached so i64::MIN works.
    let mut v: i64 = 0;
    for b in digits.bytes() {
        let d = i64::from(b - b'0');
        v = v.checked_mul(10)?;
        v = if neg {
            v.checked_sub(d)?
        } else {
            v.checked_add(d)?
        };
    }
    Some(v)
}

/// What int8in accepts, restricted to decimal: surrounding whitespace, an optional sign.
fn parse_int_input(s: &str) -> Option<i64> {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace());
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.starts_with("-+") || t.starts_with("--") {
        return None;
    }
    parse_int(t)
}

/// Postgres's uuid input: 32 hex digits, optionally in braces, optionally with a hyphen
/// after any group of four digits.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let t = match s.strip_prefix('{') {
        Some(inner) => inner.strip_suffix('}')?,
        None => s,
    };
    let bytes = t.as_bytes();
    let mut out = [0u8; 16];
    let mut digits = 0usize;
    let mut i = 0usize;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'-' {
            // Only between groups of four digits, never doubled or trailing.
            if digits == 0 || digits % 4 != 0 || digits == 32 || bytes.get(i + 1) == Some(&b'-') {
                return None;
            }
            i += 1;
            continue;
        }
        let v = (c as char).to_digit(16)? as u8;
        if digits >= 32 {
            return None;
        }
        out[digits / 2] |= if digits % 2 == 0 { v << 4 } else { v };
        digits += 1;
        i += 1;
    }
    (digits == 32 && bytes.last() != Some(&b'-')).then_some(out)
}

/// The content of a `'...'` literal as written (quotes included): `''` becomes `'`.
/// `None` if it is not a plain single-quoted string.
pub(crate) fn unquote_plain(lit: &str) -> Option<std::borrow::Cow<'_, str>> {
    let inner = lit.strip_prefix('\'')?.strip_suffix('\'')?;
    if inner.contains('\'') {
        Some(std::borrow::Cow::Owned(inner.replace("''", "'")))
    } else {
        Some(std::borrow::Cow::Borrowed(inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints() {
        assert_eq!(
            key_from_lit(Lit::Number("42"), KeyType::Int),
            Some(KeyValue::Int(42))
        );
        assert_eq!(
            key_from_lit(Lit::Number("-42"), KeyType::Int),
            Some(KeyValue::Int(-42))
        );
        assert_eq!(
            key_from_lit(Lit::Number("-9223372036854775808"), KeyType::Int),
            Some(KeyValue::Int(i64::MIN))
        );
        assert_eq!(
            key_from_lit(Lit::Number("9223372036854775808"), KeyType::Int),
            None
        );
        assert_eq!(key_from_lit(Lit::Number("42.0"), KeyType::Int), None);
        assert_eq!(key_from_lit(Lit::Number("1e3"), KeyType::Int), None);
        assert_eq!(
            key_from_lit(Lit::Str(" +7 "), KeyType::Int),
            Some(KeyValue::Int(7))
        );
        assert_eq!(key_from_lit(Lit::Str("7a"), KeyType::Int), None);
        assert_eq!(key_from_lit(Lit::Str(""), KeyType::Int), None);
        assert_eq!(key_from_lit(Lit::Str("--7"), KeyType::Int), None);
    }

    #[test]
    fn text_and_numbers() {
        assert_eq!(
            key_from_lit(Lit::Str("abc"), KeyType::Text),
            Some(KeyValue::Text("abc".into()))
        );
        assert_eq!(key_from_lit(Lit::Number("42"), KeyType::Text), None);
    }

    #[test]
    fn uuids() {
        let want = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        for s in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert_eq!(parse_uuid(s), Some(want), "{s}");
        }
        for s in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111",
            "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
            "-a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11-",
            "a0eeb-c999c0b4ef8bb6d6bb9bd380a11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "g0eebc999c0b4ef8bb6d6bb9bd380a11",
        ] {
            assert_eq!(parse_uuid(s), None, "{s}");
        }
    }

    #[test]
    fn unquoting() {
        assert_eq!(unquote_plain("'it''s'").as_deref(), Some("it's"));
        assert_eq!(unquote_plain("'abc'").as_deref(), Some("abc"));
        assert_eq!(unquote_plain("abc"), None);
    }
}
