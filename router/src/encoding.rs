//! Statement text and key values as a session sends them, read the way Postgres reads them.
//!
//! A shard key hashes the bytes the (UTF-8) server stores. A session whose
//! `client_encoding` is not UTF-8 sends other bytes for the same text, which Postgres
//! converts before it lexes the statement or stores the value; with
//! `standard_conforming_strings = off` a backslash in a plain `'...'` string is an escape.
//! Routing that read the bytes as UTF-8 with standard strings would hash such a key to
//! another shard than the server's row. [`TextReading`] reads them right, or says it cannot:
//!
//! - `UTF8` and `SQL_ASCII` (whose bytes the server takes as they are): read as they are.
//! - `LATIN1`: every byte is the code point of the same number, so the text decodes exactly
//!   and its keys route as a UTF-8 session's do.
//! - Any other encoding: ASCII is ASCII in all of them, so integer and uuid keys, ASCII text
//!   keys and the statement's structure read right. Each other byte is planned as a
//!   placeholder letter (never equal to the character it stands for) that [`wire_bytes`]
//!   turns back into the same byte when shardgate sends text it rewrote. A text key holding
//!   such a character is not readable ([`TextReading::stands_in`]).
//! - SJIS, BIG5, GBK, UHC, GB18030 and JOHAB have multibyte characters whose later bytes may
//!   be ASCII (`\`, `;`, letters): characters are measured with Postgres's own length rules
//!   first, and such a byte becomes a placeholder too, so it is never read as SQL.
//! - `standard_conforming_strings = off`: a plain string holding a backslash is planned as
//!   the `E'...'` string Postgres reads it as (the same text when sent back).
//!
//! [`wire_bytes`]: TextReading::wire_bytes

use std::borrow::Cow;

use crate::lex::{Lexer, TokKind};
use crate::types::Refusal;

/// How a session's statement text and values are encoded (`client_encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientEncoding {
    /// UTF8, or SQL_ASCII (no conversion: the server stores the bytes as sent).
    #[default]
    Utf8,
    Latin1,
    /// Every byte of a non-ASCII character is 0x80 or above (the other Latin and Windows
    /// code pages, KOI8, the EUC family, MULE_INTERNAL).
    AsciiSafe,
    /// Multibyte characters may contain ASCII bytes after their first.
    EmbedsAscii(Multibyte),
    /// A name shardgate does not know: nothing but ASCII is read.
    Unknown,
}

/// The character-length rules of the encodings that embed ASCII bytes (Postgres's
/// `pg_*_mblen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Multibyte {
    /// SJIS and SHIFT_JIS_2004: 0xA1-0xDF is one byte (half-width kana), other high bytes
    /// start two.
    Sjis,
    /// BIG5, GBK, UHC: a high byte starts two.
    TwoByte,
    /// A high byte starts four when a digit follows, else two.
    Gb18030,
    /// JOHAB (EUC rules): 0x8F starts three, other high bytes two.
    Johab,
}

impl ClientEncoding {
    /// Whether every ASCII byte of text in this encoding is an ASCII character.
    pub fn keeps_ascii(self) -> bool {
        matches!(
            self,
            ClientEncoding::Utf8 | ClientEncoding::Latin1 | ClientEncoding::AsciiSafe
        )
    }

    /// The encoding an (alias) name means, matched as Postgres matches it: case and
    /// punctuation ignored (`Shift_JIS` is `shiftjis`).
    pub fn from_name(name: &str) -> ClientEncoding {
        let n: String = name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect();
        match n.as_str() {
            "utf8" | "unicode" | "sqlascii" => ClientEncoding::Utf8,
            "latin1" | "iso88591" => ClientEncoding::Latin1,
            "sjis" | "mskanji" | "shiftjis" | "win932" | "windows932" | "shiftjis2004" => {
                ClientEncoding::EmbedsAscii(Multibyte::Sjis)
            }
            "big5" | "win950" | "windows950" | "gbk" | "win936" | "windows936" | "uhc"
            | "win949" | "windows949" => ClientEncoding::EmbedsAscii(Multibyte::TwoByte),
            "gb18030" => ClientEncoding::EmbedsAscii(Multibyte::Gb18030),
            "johab" => ClientEncoding::EmbedsAscii(Multibyte::Johab),
            "abc" | "alt" | "euccn" | "eucjis2004" | "eucjp" | "euckr" | "euctw" | "koi8"
            | "koi8r" | "koi8u" | "muleinternal" | "tcvn" | "tcvn5712" | "vscii" | "win"
            | "win866" | "win874" | "windows866" | "windows874" => ClientEncoding::AsciiSafe,
            _ if is_numbered_code_page(&n) => ClientEncoding::AsciiSafe,
            _ => ClientEncoding::Unknown,
        }
    }
}

/// `latin2`..`latin10`, `iso88592`..`iso885916`, `win1250`..`win1258`, `windows1250`...
fn is_numbered_code_page(n: &str) -> bool {
    let number = |prefix: &str, range: std::ops::RangeInclusive<u32>| {
        n.strip_prefix(prefix)
            .filter(|d| !d.starts_with('0'))
            .and_then(|d| d.parse::<u32>().ok())
            .is_some_and(|d| range.contains(&d))
    };
    number("latin", 2..=10)
        || (number("iso8859", 2..=16) && n != "iso885911" && n != "iso885912")
        || number("win", 1250..=1258)
        || number("windows", 1250..=1258)
}

/// How to read one session's text: its encoding and string rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TextReading {
    pub encoding: ClientEncoding,
    /// `standard_conforming_strings = off`.
    pub legacy_strings: bool,
}

/// Why statement text could not be read for planning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreadable {
    /// Not valid UTF-8 in a UTF-8 session: the server rejects it, wherever it goes.
    Invalid,
    Refused(Refusal),
}

/// Placeholders: a non-ASCII byte of a non-LATIN1 encoding plans as
/// `HIGH + (byte - 0x80)`, an ASCII byte inside a multibyte character as `EMBEDDED + byte`.
/// Both ranges are letters (identifier characters), and neither can come from LATIN1
/// decoding or from text shardgate writes, so [`TextReading::wire_bytes`] maps them back.
const HIGH: u32 = 0x100;
const EMBEDDED: u32 = 0x180;

impl TextReading {
    /// The reading of a session with these settings (`None`: not set, the defaults).
    pub fn new(client_encoding: Option<&str>, standard_conforming_strings: Option<&str>) -> Self {
        TextReading {
            encoding: client_encoding.map_or(ClientEncoding::Utf8, ClientEncoding::from_name),
            legacy_strings: standard_conforming_strings.is_some_and(is_off),
        }
    }

    /// The text to plan for a statement's bytes. Positions differ from the bytes' when it
    /// is owned; send text built from it with [`TextReading::wire_bytes`].
    pub fn statement_text<'a>(&self, bytes: &'a [u8]) -> Result<Cow<'a, str>, Unreadable> {
        let text = self.decode(bytes)?;
        if !self.legacy_strings || !text.contains('\\') {
            return Ok(text);
        }
        match conforming_strings(&text)? {
            Cow::Borrowed(_) => Ok(text),
            Cow::Owned(s) => Ok(Cow::Owned(s)),
        }
    }

    fn decode<'a>(&self, bytes: &'a [u8]) -> Result<Cow<'a, str>, Unreadable> {
        if self.encoding != ClientEncoding::Utf8 && bytes.is_ascii() {
            // ASCII is itself in every encoding (and valid UTF-8).
            return std::str::from_utf8(bytes)
                .map(Cow::Borrowed)
                .map_err(|_| Unreadable::Invalid);
        }
        match self.encoding {
            ClientEncoding::Utf8 => std::str::from_utf8(bytes)
                .map(Cow::Borrowed)
                .map_err(|_| Unreadable::Invalid),
            ClientEncoding::Latin1 => Ok(Cow::Owned(bytes.iter().map(|&b| b as char).collect())),
            ClientEncoding::AsciiSafe => Ok(Cow::Owned(
                bytes.iter().map(|&b| placeholder(b, false)).collect(),
            )),
            ClientEncoding::EmbedsAscii(mb) => {
                let mut out = String::with_capacity(bytes.len() * 2);
                let mut i = 0;
                while i < bytes.len() {
                    let n = char_len(mb, &bytes[i..]).min(bytes.len() - i);
                    out.push(placeholder(bytes[i], false));
                    for &b in &bytes[i + 1..i + n] {
                        out.push(placeholder(b, true));
                    }
                    i += n;
                }
                Ok(Cow::Owned(out))
            }
            ClientEncoding::Unknown => Err(Unreadable::Refused(Refusal::unsupported(
                "shardgate cannot read non-ASCII statement text in this session's \
                 client_encoding; use UTF8 with a sharded database",
            ))),
        }
    }

    /// The bytes to send for `text`, which was planned from this session's statement text
    /// (possibly rewritten by shardgate, which only ever adds ASCII).
    pub fn wire_bytes<'a>(&self, text: &'a str) -> Cow<'a, [u8]> {
        if self.encoding == ClientEncoding::Utf8 || text.is_ascii() {
            return Cow::Borrowed(text.as_bytes());
        }
        Cow::Owned(
            text.chars()
                .map(|c| match c as u32 {
                    c @ 0..=0xff => c as u8,
                    c @ HIGH..=0x17f => (c - HIGH + 0x80) as u8,
                    c @ EMBEDDED..=0x1ff => (c - EMBEDDED) as u8,
                    // Not from the client's text; cannot happen.
                    _ => b'?',
                })
                .collect(),
        )
    }

    /// Whether planned `text` (a statement, or a text key read from one) holds placeholders
    /// (characters that stand in for others), so is not what the server reads.
    pub fn stands_in(&self, text: &str) -> bool {
        !matches!(self.encoding, ClientEncoding::Utf8 | ClientEncoding::Latin1) && !text.is_ascii()
    }

    /// A text value as the session sends it (a Bind parameter, a COPY field) in the
    /// server's UTF-8; `None` when it cannot be read.
    pub fn text_value<'a>(&self, bytes: &'a [u8]) -> Option<Cow<'a, [u8]>> {
        match self.encoding {
            ClientEncoding::Utf8 => Some(Cow::Borrowed(bytes)),
            _ if bytes.is_ascii() => Some(Cow::Borrowed(bytes)),
            ClientEncoding::Latin1 => Some(Cow::Owned(
                bytes
                    .iter()
                    .map(|&b| b as char)
                    .collect::<String>()
                    .into_bytes(),
            )),
            _ => None,
        }
    }

    /// Why a text key holding placeholders ([`TextReading::stands_in`]) cannot be routed.
    pub const UNREADABLE_KEY: &'static str = "shardgate reads a text shard key with non-ASCII \
        characters only from a UTF8 or LATIN1 session (set client_encoding to UTF8)";
}

/// A boolean setting's false, as Postgres parses it (a prefix of `false`/`no`, `of[f]`, `0`).
fn is_off(v: &str) -> bool {
    let v = v.trim().trim_matches('\'').to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || v == "0"
}

/// The planning character of byte `b` in a non-LATIN1 encoding.
fn placeholder(b: u8, inside_char: bool) -> char {
    let code = match b {
        0..=0x7f if inside_char => EMBEDDED + b as u32,
        0..=0x7f => b as u32,
        _ => HIGH + (b - 0x80) as u32,
    };
    char::from_u32(code).unwrap_or('?')
}

/// The length of the character starting `s` (not empty), by Postgres's rules.
fn char_len(mb: Multibyte, s: &[u8]) -> usize {
    let c = s[0];
    if c < 0x80 {
        return 1;
    }
    match mb {
        Multibyte::Sjis if (0xa1..=0xdf).contains(&c) => 1,
        Multibyte::Sjis | Multibyte::TwoByte => 2,
        Multibyte::Gb18030 if s.get(1).is_some_and(u8::is_ascii_digit) => 4,
        Multibyte::Gb18030 => 2,
        Multibyte::Johab if c == 0x8f => 3,
        Multibyte::Johab => 2,
    }
}

/// `text` with `E` before every plain string holding a backslash, which
/// `standard_conforming_strings = off` reads as escapes: planned with standard strings it
/// then means what Postgres reads, and sent back it still does (an `E` string reads the same
/// under either setting).
fn conforming_strings(text: &str) -> Result<Cow<'_, str>, Unreadable> {
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut prev: Option<TokKind> = None;
    let mut prev_word = "";
    for tok in Lexer::new(text).legacy_strings() {
        let backslash = text[tok.start..tok.end].contains('\\');
        if tok.kind == TokKind::PrefixedStr
            && backslash
            && tok.start > 0
            && !prev_word.eq_ignore_ascii_case("e")
            && text.as_bytes()[tok.start - 1] != b'&'
        {
            // `N'a\'b'` or `text'a\'b'`: escapes here too, but no E can be put before it.
            return Err(Unreadable::Refused(Refusal::unsupported(
                "a N'...' or typed string literal with a backslash is not supported with \
                 standard_conforming_strings = off; use an E'...' string",
            )));
        }
        prev_word = if tok.kind == TokKind::Word {
            &text[tok.start..tok.end]
        } else {
            ""
        };
        let escapes = tok.kind == TokKind::Str && backslash;
        if escapes {
            if matches!(prev, Some(TokKind::Str | TokKind::PrefixedStr)) {
                // `'a'\n'b\n'` continues the first string, in its kind: an E before the
                // second would end it. Rare enough to refuse.
                return Err(Unreadable::Refused(Refusal::unsupported(
                    "a string continued over lines with a backslash in it is not supported \
                     with standard_conforming_strings = off; use one E'...' string",
                )));
            }
            let o = out.get_or_insert_with(|| String::with_capacity(text.len() + 8));
            o.push_str(&text[copied..tok.start]);
            // A space: a number or word may end right before the quote (`1'a'`).
            o.push_str(" E");
            copied = tok.start;
        }
        prev = Some(tok.kind);
    }
    Ok(match out {
        Some(mut o) => {
            o.push_str(&text[copied..]);
            Cow::Owned(o)
        }
        None => Cow::Borrowed(text),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(enc: &str) -> TextReading {
        TextReading::new(Some(enc), None)
    }

    fn planned(r: TextReading, bytes: &[u8]) -> String {
        r.statement_text(bytes).expect("readable").into_owned()
    }

    #[test]
    fn encoding_names_are_matched_as_postgres_matches_them() {
        use ClientEncoding::*;
        for (name, want) in [
            ("UTF8", Utf8),
            ("utf-8", Utf8),
            ("Unicode", Utf8),
            ("SQL_ASCII", Utf8),
            ("LATIN1", Latin1),
            ("ISO-8859-1", Latin1),
            ("latin2", AsciiSafe),
            ("LATIN10", AsciiSafe),
            ("ISO_8859_15", AsciiSafe),
            ("WIN1252", AsciiSafe),
            ("windows-1251", AsciiSafe),
            ("KOI8-R", AsciiSafe),
            ("EUC_JP", AsciiSafe),
            ("EUC_JIS_2004", AsciiSafe),
            ("MULE_INTERNAL", AsciiSafe),
            ("WIN866", AsciiSafe),
            ("SJIS", EmbedsAscii(Multibyte::Sjis)),
            ("Shift_JIS", EmbedsAscii(Multibyte::Sjis)),
            ("SHIFT_JIS_2004", EmbedsAscii(Multibyte::Sjis)),
            ("WIN932", EmbedsAscii(Multibyte::Sjis)),
            ("mskanji", EmbedsAscii(Multibyte::Sjis)),
            ("BIG5", EmbedsAscii(Multibyte::TwoByte)),
            ("WIN936", EmbedsAscii(Multibyte::TwoByte)),
            ("GBK", EmbedsAscii(Multibyte::TwoByte)),
            ("UHC", EmbedsAscii(Multibyte::TwoByte)),
            ("windows949", EmbedsAscii(Multibyte::TwoByte)),
            ("GB18030", EmbedsAscii(Multibyte::Gb18030)),
            ("JOHAB", EmbedsAscii(Multibyte::Johab)),
            ("latin11", Unknown),
            ("iso885911", Unknown),
            ("win1259", Unknown),
            ("klingon", Unknown),
        ] {
            assert_eq!(ClientEncoding::from_name(name), want, "{name}");
        }
    }

    #[test]
    fn utf8_sessions_plan_their_text_as_it_is() {
        let r = TextReading::default();
        assert_eq!(r.encoding, ClientEncoding::Utf8);
        assert!(!r.legacy_strings);
        let sql = "SELECT * FROM users WHERE name = 'é'";
        assert!(matches!(
            r.statement_text(sql.as_bytes()),
            Ok(Cow::Borrowed(s)) if s == sql
        ));
        assert_eq!(r.statement_text(b"SELECT '\xe9'"), Err(Unreadable::Invalid));
        assert!(matches!(r.wire_bytes("é"), Cow::Borrowed(b) if b == "é".as_bytes()));
    }

    #[test]
    fn latin1_decodes_exactly_and_encodes_back() {
        let r = reading("LATIN1");
        let bytes = b"INSERT INTO users (id, name) VALUES (1, 'Jos\xe9 \x80\xff')";
        let text = planned(r, bytes);
        assert!(text.ends_with("'José \u{80}ÿ')"));
        assert!(!r.stands_in("José"));
        assert_eq!(&*r.wire_bytes(&text), &bytes[..]);
        assert_eq!(r.text_value(b"Jos\xe9").as_deref(), Some("José".as_bytes()));
    }

    #[test]
    fn other_encodings_keep_ascii_and_stand_in_for_the_rest() {
        let r = reading("WIN1251");
        let bytes = b"SELECT * FROM users WHERE id = 7 AND name = '\xc8\xe2\xe0\xed'";
        let text = planned(r, bytes);
        assert!(text.starts_with("SELECT * FROM users WHERE id = 7 AND name = '"));
        let value = &text[text.find('\'').unwrap() + 1..text.len() - 1];
        assert_eq!(value.chars().count(), 4);
        assert!(r.stands_in(value));
        assert!(!r.stands_in("ivan"));
        assert_eq!(&*r.wire_bytes(&text), &bytes[..]);
        assert_eq!(r.text_value(b"ivan").as_deref(), Some(&b"ivan"[..]));
        assert_eq!(r.text_value(b"\xc8"), None);
    }

    #[test]
    fn placeholders_are_letters_that_no_latin1_text_contains() {
        for b in 0u8..=0xff {
            for inside in [false, true] {
                let c = placeholder(b, inside);
                if b < 0x80 && !inside {
                    assert_eq!(c, b as char);
                } else {
                    assert!(c.is_alphabetic(), "{b:#x} {inside} -> {c:?}");
                    assert!(c as u32 > 0xff, "{b:#x}");
                }
            }
        }
    }

    #[test]
    fn ascii_bytes_inside_multibyte_characters_are_not_sql() {
        // SJIS 0x95 0x5C (a kanji ending in a backslash byte) inside an E string, and
        // JOHAB 0x88 0x3B (ending in ';') in a quoted identifier.
        let r = reading("SJIS");
        let bytes = b"SELECT * FROM users WHERE id = 3 AND name = E'\x95\\' ; SELECT 1";
        let text = planned(r, bytes);
        assert_eq!(crate::lex::split_statements(&text).len(), 2);
        let first = &text[..text.find(';').unwrap()];
        assert!(first.ends_with("' "), "{first}");
        assert_eq!(&*r.wire_bytes(&text), &bytes[..]);
        // Half-width kana (0xB1) is one byte: the quote after it closes the string.
        assert_eq!(
            planned(r, b"SELECT '\xb1'; SELECT 2").matches(';').count(),
            1
        );

        let r = reading("JOHAB");
        let bytes = b"SELECT \"\x88;\" FROM t";
        assert_eq!(crate::lex::split_statements(&planned(r, bytes)).len(), 1);
        let r = reading("GB18030");
        let bytes = b"SELECT '\x81\x30\x81\x30', '\x81\x5c'";
        let text = planned(r, bytes);
        assert_eq!(text.matches('\'').count(), 4);
        assert_eq!(&*r.wire_bytes(&text), &bytes[..]);
    }

    #[test]
    fn unknown_encodings_read_only_ascii() {
        let r = reading("klingon");
        assert!(r.statement_text(b"SELECT 1").is_ok());
        assert!(matches!(
            r.statement_text(b"SELECT '\xe9'"),
            Err(Unreadable::Refused(x)) if x.sqlstate == "0A000"
        ));
        assert!(r.stands_in("é"));
    }

    #[test]
    fn legacy_strings_plan_as_escape_strings() {
        let r = TextReading::new(None, Some("off"));
        assert!(r.legacy_strings);
        let sql = r"SELECT * FROM users WHERE name = 'a\'b' OR id = 1";
        let text = planned(r, sql.as_bytes());
        assert_eq!(text, r"SELECT * FROM users WHERE name =  E'a\'b' OR id = 1");
        // Untouched: no backslash, an E string already, a dollar quote.
        for sql in [
            "SELECT 'a''b'",
            r"SELECT E'a\nb'",
            r"SELECT $$a\$$",
            "SELECT 1",
        ] {
            assert!(
                matches!(r.statement_text(sql.as_bytes()), Ok(Cow::Borrowed(_))),
                "{sql}"
            );
        }
        // After a number, and twice.
        assert_eq!(
            planned(r, br"SELECT 1'\\', '\t'"),
            r"SELECT 1 E'\\',  E'\t'"
        );
        assert!(matches!(
            r.statement_text(b"SELECT 'a'\n'b\\n'"),
            Err(Unreadable::Refused(_))
        ));
        // N'...' and typed strings escape too but take no E: refused when they hold a
        // backslash. U&'...' strings never escape.
        for sql in [
            r"SELECT N'\''; DELETE FROM users; --'",
            r"SELECT varchar'a\b'",
        ] {
            assert!(
                matches!(
                    r.statement_text(sql.as_bytes()),
                    Err(Unreadable::Refused(_))
                ),
                "{sql}"
            );
        }
        assert!(matches!(
            r.statement_text(br"SELECT U&'\0041', N'x'"),
            Ok(Cow::Borrowed(_))
        ));
        for v in ["off", "OFF", "'off'", "false", "0"] {
            assert!(TextReading::new(None, Some(v)).legacy_strings, "{v}");
        }
        for v in ["on", "true", "1"] {
            assert!(!TextReading::new(None, Some(v)).legacy_strings, "{v}");
        }
    }
}
