//! Routing hints in leading comments: `/* shardgate: shard=2 */`, `/* shardgate: key=42 */`,
//! `/* shardgate: primary */`, or several at once (`/* shardgate: key='abc', primary */`).
//! `-- shardgate: ...` line comments work too. Only comments before the first token count.

use crate::types::{Hint, Refusal};

/// Reads the hints in the comments that lead `sql`. `Ok(None)`: no hint comment.
pub fn parse_hint(sql: &str) -> Result<Option<Hint>, Refusal> {
    let bytes = sql.as_bytes();
    let mut i = 0;
    let mut hint: Option<Hint> = None;
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let body = if bytes[i..].starts_with(b"/*") {
            let start = i + 2;
            let mut depth = 0usize;
            let mut end = bytes.len();
            while i < bytes.len() {
                if bytes[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if bytes[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        end = i - 2;
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            &sql[start..end.max(start)]
        } else if bytes[i..].starts_with(b"--") {
            let start = i + 2;
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            &sql[start..i]
        } else {
            return Ok(hint);
        };
        let body = body.trim();
        let Some(prefix) = body.get(..10) else {
            continue;
        };
        if !prefix.eq_ignore_ascii_case("shardgate:") {
            continue;
        }
        let h = hint.get_or_insert_with(Hint::default);
        parse_items(&body[10..], h)?;
    }
}

fn parse_items(text: &str, hint: &mut Hint) -> Result<(), Refusal> {
    let bad = |what: &str| Refusal {
        sqlstate: "42601",
        message: format!("invalid shardgate hint: {what}"),
    };
    let bytes = text.as_bytes();
    let mut i = 0;
    loop {
        while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b',') {
            i += 1;
        }
        if i >= bytes.len() {
            return Ok(());
        }
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        let name = &text[start..i];
        if name.is_empty() {
            return Err(bad(text.trim()));
        }
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        if i < bytes.len() && bytes[i] == b'=' {
            i += 1;
            while i < bytes.len() && bytes[i] == b' ' {
                i += 1;
            }
            let (value, next) = read_value(text, i).ok_or_else(|| bad(text.trim()))?;
            i = next;
            if name.eq_ignore_ascii_case("shard") {
                let n = value
                    .parse::<u32>()
                    .map_err(|_| bad(&format!("shard={value}")))?;
                hint.shard = Some(n);
            } else if name.eq_ignore_ascii_case("key") {
                hint.key = Some(value);
            } else {
                return Err(bad(name));
            }
        } else if name.eq_ignore_ascii_case("primary") {
            hint.primary = true;
        } else {
            return Err(bad(name));
        }
    }
}

/// A bare value (up to whitespace or a comma) or a single-quoted one (`''` escapes `'`).
fn read_value(text: &str, mut i: usize) -> Option<(String, usize)> {
    let bytes = text.as_bytes();
    if bytes.get(i) == Some(&b'\'') {
        let mut out = String::new();
        i += 1;
        let mut start = i;
        loop {
            let q = start + text[start..].find('\'')?;
            out.push_str(&text[start..q]);
            if bytes.get(q + 1) == Some(&b'\'') {
                out.push('\'');
                start = q + 2;
            } else {
                return Some((out, q + 1));
            }
        }
    }
    let start = i;
    while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b',' {
        i += 1;
    }
    (i > start).then(|| (text[start..i].to_string(), i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(sql: &str) -> Option<Hint> {
        parse_hint(sql).unwrap()
    }

    #[test]
    fn reads_hints() {
        assert_eq!(hint("SELECT 1"), None);
        assert_eq!(hint("/* hello */ SELECT 1"), None);
        assert_eq!(
            hint("/* shardgate: shard=2 */ SELECT 1"),
            Some(Hint {
                shard: Some(2),
                ..Hint::default()
            })
        );
        assert_eq!(
            hint("/* other */ /*ShardGate:key=42*/SELECT 1"),
            Some(Hint {
                key: Some("42".into()),
                ..Hint::default()
            })
        );
        assert_eq!(
            hint("-- shardgate: primary\nSELECT 1"),
            Some(Hint {
                primary: true,
                ..Hint::default()
            })
        );
        assert_eq!(
            hint("/* shardgate: key='it''s a, key', primary */ SELECT 1"),
            Some(Hint {
                key: Some("it's a, key".into()),
                primary: true,
                ..Hint::default()
            })
        );
        // Not leading: ignored.
        assert_eq!(hint("SELECT 1 /* shardgate: shard=2 */"), None);
    }

    #[test]
    fn rejects_malformed_hints() {
        for sql in [
            "/* shardgate: shard=x */ SELECT 1",
            "/* shardgate: shrad=1 */ SELECT 1",
            "/* shardgate: key= */ SELECT 1",
            "/* shardgate: key='open */ SELECT 1",
            "/* shardgate: replica */ SELECT 1",
            "/* shardgate: shard=-1 */ SELECT 1",
        ] {
            let err = parse_hint(sql).unwrap_err();
            assert_eq!(err.sqlstate, "42601", "{sql}");
        }
    }

    #[test]
    fn unterminated_comment_does_not_panic() {
        assert!(parse_hint("/* shardgate: shard=1").is_ok());
        assert!(parse_hint("/*").is_ok());
        assert!(parse_hint("--").is_ok());
    }
}
