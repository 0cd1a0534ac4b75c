//! A small SQL lexer that follows Postgres's own rules closely enough to find statement
//! boundaries, words, parameters and literals: `standard_conforming_strings = on` (a
//! backslash escapes only inside `E'...'`), nested block comments, dollar quotes, `$n`
//! parameters, numbers with a fraction.

use crate::scan::is_word_byte;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokKind {
    /// An unquoted word (keyword or identifier), possibly containing `$`.
    Word,
    /// `"..."`.
    QuotedIdent,
    /// `'...'` with no prefix glued to it.
    Str,
    /// `E'...'`, `B'...'`, `X'...'`, `N'...'`, `U&'...'` and `type'...'`: a string glued to
    /// the word before it.
    PrefixedStr,
    /// `$tag$...$tag$`.
    Dollar,
    /// Starts with a digit (or `.digit`): `1`, `1.5`, `1e5`, `0x1F`, `1_000`.
    Number,
    /// `$1`.
    Param,
    /// Any other single byte.
    Punct,
    Semicolon,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tok {
    pub kind: TokKind,
    pub start: usize,
    pub end: usize,
}

impl Tok {
    pub fn text<'a>(&self, sql: &'a str) -> &'a str {
        sql.get(self.start..self.end).unwrap_or("")
    }
    pub fn is_punct(&self, sql: &str, c: u8) -> bool {
        self.kind == TokKind::Punct && sql.as_bytes().get(self.start) == Some(&c)
    }
    pub fn is_word(&self, sql: &str, kw: &str) -> bool {
        self.kind == TokKind::Word && self.text(sql).eq_ignore_ascii_case(kw)
    }
}

pub(crate) struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    /// Lex backslashes in plain `'...'` strings as escapes (`standard_conforming_strings =
    /// off`), to detect text whose meaning depends on that setting.
    backslash_quotes: bool,
    /// A plain string contained a backslash.
    pub saw_plain_backslash: bool,
    prev_end: usize,
    prev_kind: Option<TokKind>,
    prev_start: usize,
}

impl<'a> Lexer<'a> {
    pub fn new(sql: &'a str) -> Self {
        Lexer {
            src: sql.as_bytes(),
            pos: 0,
            backslash_quotes: false,
            saw_plain_backslash: false,
            prev_end: usize::MAX,
            prev_kind: None,
            prev_start: 0,
        }
    }

    /// Lexes as if `standard_conforming_strings` were off.
    pub fn legacy_strings(mut self) -> Self {
        self.backslash_quotes = true;
        self
    }

    /// Whitespace and (nested) comments: the same rule as the statement scanner's.
    fn skip_trivia(&mut self) {
        self.pos = crate::scan::skip_trivia(self.src, self.pos).min(self.src.len());
    }

    /// End of a quoted run starting at `i` (the opening quote).
    fn quoted_end(&mut self, i: usize, quote: u8, backslash: bool, plain: bool) -> usize {
        let b = self.src;
        let mut j = i + 1;
        while j < b.len() {
            let c = b[j];
            if c == quote {
                if b.get(j + 1) == Some(&quote) {
                    j += 2;
                    continue;
                }
                return j + 1;
            }
            if c == b'\\' && quote == b'\'' {
                if plain {
                    self.saw_plain_backslash = true;
                }
                if backslash {
                    j += 2;
                    continue;
                }
            }
            j += 1;
        }
        b.len()
    }

    fn dollar_end(&self, i: usize) -> Option<usize> {
        let b = self.src;
        let mut j = i + 1;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
            j += 1;
        }
        if j >= b.len() || b[j] != b'$' {
            return None;
        }
        let tag = &b[i..=j];
        let mut k = j + 1;
        while k + tag.len() <= b.len() {
            if &b[k..k + tag.len()] == tag {
                return Some(k + tag.len());
            }
            k += 1;
        }
        Some(b.len())
    }
}

impl Iterator for Lexer<'_> {
    type Item = Tok;

    fn next(&mut self) -> Option<Tok> {
        self.skip_trivia();
        let b = self.src;
        let i = self.pos;
        if i >= b.len() {
            return None;
        }
        let glued_word = self.prev_kind == Some(TokKind::Word) && self.prev_end == i;
        let (kind, end) = match b[i] {
            b'\'' => {
                // The word glued before the quote decides the kind of string.
                let prefix = if glued_word {
                    &b[self.prev_start..self.prev_end]
                } else {
                    &b""[..]
                };
                let escape = prefix.eq_ignore_ascii_case(b"e");
                // `N'...'` and `type '...'` strings follow standard_conforming_strings as
                // plain ones do; bit strings and `U&'...'` never take backslash escapes.
                let bits = prefix.eq_ignore_ascii_case(b"b") || prefix.eq_ignore_ascii_case(b"x");
                let unicode = self.prev_kind == Some(TokKind::Punct)
                    && self.prev_end == i
                    && i >= 2
                    && b[i - 1] == b'&'
                    && (b[i - 2] == b'u' || b[i - 2] == b'U');
                let plain = !glued_word && !unicode;
                let backslash = escape || (self.backslash_quotes && !unicode && !bits);
                let end = self.quoted_end(i, b'\'', backslash, plain);
                let kind = if plain {
                    TokKind::Str
                } else {
                    TokKind::PrefixedStr
                };
                (kind, end)
            }
            b'"' => (TokKind::QuotedIdent, self.quoted_end(i, b'"', false, false)),
            b'$' => {
                if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    let mut j = i + 1;
                    while j < b.len() && b[j].is_ascii_digit() {
                        j += 1;
                    }
                    (TokKind::Param, j)
                } else if glued_word {
                    // `a$b` is one identifier; the word lexer already took its `$`s.
                    (TokKind::Punct, i + 1)
                } else {
                    match self.dollar_end(i) {
                        Some(end) => (TokKind::Dollar, end),
                        None => (TokKind::Punct, i + 1),
                    }
                }
            }
            b';' => (TokKind::Semicolon, i + 1),
            c if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) =>
            {
                let mut j = i + 1;
                while j < b.len() && (is_word_byte(b[j]) || b[j] == b'.') {
                    // `1..5` (a range in array slices) is two numbers.
                    if b[j] == b'.' && b.get(j + 1) == Some(&b'.') {
                        break;
                    }
                    j += 1;
                }
                (TokKind::Number, j)
            }
            c if is_word_byte(c) => {
                let mut j = i + 1;
                while j < b.len() && (is_word_byte(b[j]) || b[j] == b'$') {
                    j += 1;
                }
                (TokKind::Word, j)
            }
            _ => (TokKind::Punct, i + 1),
        };
        // Never split a UTF-8 sequence: punctuation is ASCII, other runs end at ASCII.
        let end = end.min(b.len());
        self.pos = end;
        self.prev_end = end;
        self.prev_start = i;
        self.prev_kind = Some(kind);
        Some(Tok {
            kind,
            start: i,
            end,
        })
    }
}

/// Byte ranges of the top-level statements of `sql` (split at `;`), skipping empty ones.
/// Each range excludes the `;`.
pub(crate) fn split_statements(sql: &str) -> Vec<std::ops::Range<usize>> {
    split_with(Lexer::new(sql), sql.len())
}

/// The same split lexing backslashes in plain strings as escapes; differs from
/// [`split_statements`] only for text whose meaning depends on `standard_conforming_strings`.
pub(crate) fn split_statements_legacy(sql: &str) -> Vec<std::ops::Range<usize>> {
    split_with(Lexer::new(sql).legacy_strings(), sql.len())
}

fn split_with(lexer: Lexer<'_>, len: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut has_token = false;
    for tok in lexer {
        if tok.kind == TokKind::Semicolon {
            if has_token {
                out.push(start..tok.start);
            }
            start = tok.end;
            has_token = false;
        } else {
            has_token = true;
        }
    }
    if has_token {
        out.push(start..len);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Vec<(TokKind, &str)> {
        Lexer::new(sql).map(|t| (t.kind, t.text(sql))).collect()
    }

    #[test]
    fn lexes_postgres_tokens() {
        use TokKind::*;
        assert_eq!(
            kinds("SELECT a$1, $1, $$x$$, $t$ y $t$, 'it''s', E'a\\'b', x'1F', U&'d', 1.5, .5, 1e5 -- c\n;"),
            vec![
                (Word, "SELECT"),
                (Word, "a$1"),
                (Punct, ","),
                (Param, "$1"),
                (Punct, ","),
                (Dollar, "$$x$$"),
                (Punct, ","),
                (Dollar, "$t$ y $t$"),
                (Punct, ","),
                (Str, "'it''s'"),
                (Punct, ","),
                (Word, "E"),
                (PrefixedStr, "'a\\'b'"),
                (Punct, ","),
                (Word, "x"),
                (PrefixedStr, "'1F'"),
                (Punct, ","),
                (Word, "U"),
                (Punct, "&"),
                (PrefixedStr, "'d'"),
                (Punct, ","),
                (Number, "1.5"),
                (Punct, ","),
                (Number, ".5"),
                (Punct, ","),
                (Number, "1e5"),
                (Semicolon, ";"),
            ]
        );
        assert_eq!(
            kinds("a[1..2] /* x /* y */ z */ \"q\"\"x\""),
            vec![
                (Word, "a"),
                (Punct, "["),
                (Number, "1"),
                (Punct, "."),
                (Number, ".2"),
                (Punct, "]"),
                (QuotedIdent, "\"q\"\"x\""),
            ]
        );
    }

    #[test]
    fn backslash_in_plain_strings_is_not_an_escape() {
        let sql = "SELECT 'a\\'; DELETE FROM users; --'";
        let parts: Vec<_> = split_statements(sql).into_iter().map(|r| &sql[r]).collect();
        assert_eq!(parts, vec!["SELECT 'a\\'", " DELETE FROM users"]);
        let legacy: Vec<_> = split_statements_legacy(sql)
            .into_iter()
            .map(|r| &sql[r])
            .collect();
        assert_eq!(legacy, vec![sql]);
        let sql = "SELECT E'a\\'; DELETE FROM users; --'";
        assert_eq!(split_statements(sql).len(), 1);
    }

    #[test]
    fn splits_statements() {
        let sql = "BEGIN; ; SELECT ';' ; -- only\n";
        let parts: Vec<_> = split_statements(sql).into_iter().map(|r| &sql[r]).collect();
        assert_eq!(parts, vec!["BEGIN", " SELECT ';' "]);
        assert!(split_statements("").is_empty());
        assert!(split_statements(" -- x").is_empty());
    }

    #[test]
    fn never_panics_on_odd_input() {
        for sql in [
            "'", "\"", "$", "$a", "$a$", "/*", "/* /*", "--", "E'\\", "U&'", "é'x'", "1.", ".",
            "$1a", "x$", "'\u{e9}",
        ] {
            let _: Vec<_> = Lexer::new(sql).collect();
            let _ = split_statements(sql);
        }
    }
}
