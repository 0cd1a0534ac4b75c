//! A light lexer over SQL text: splits statements and yields words, skipping string
//! literals, quoted identifiers, dollar quotes and comments. It never allocates.

/// Whether `sql` holds more than one statement (empty ones do not count).
pub fn several_statements(sql: &str) -> bool {
    statements(sql).nth(1).is_some()
}

/// Splits `sql` into top-level statements (separated by `;` outside quotes and comments).
/// Empty statements are skipped.
pub fn statements(sql: &str) -> impl Iterator<Item = &str> {
    let bytes = sql.as_bytes();
    let mut start = 0;
    let mut done = false;
    std::iter::from_fn(move || loop {
        if done {
            return None;
        }
        let end = next_semicolon(bytes, start);
        let stmt = &sql[start..end];
        if end >= bytes.len() {
            done = true;
        } else {
            start = end + 1;
        }
        if skip_trivia(stmt.as_bytes(), 0) < stmt.len() {
            return Some(stmt);
        }
    })
}

/// Index of the next top-level `;` at or after `from`, or `bytes.len()`.
fn next_semicolon(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() {
        match bytes[i] {
            b';' => return i,
            _ => i = skip_token(bytes, i),
        }
    }
    bytes.len()
}

/// Skips whitespace and comments from `i`; returns the index of the next token.
pub fn skip_trivia(bytes: &[u8], mut i: usize) -> usize {
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if bytes[i..].starts_with(b"--") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if bytes[i..].starts_with(b"/*") {
            // Postgres block comments nest.
            let mut depth = 0usize;
            while i < bytes.len() {
                if bytes[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if bytes[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else {
            return i;
        }
    }
}

/// Skips one token (or one byte of punctuation) starting at `i`, which is not trivia.
pub(crate) fn skip_token(bytes: &[u8], i: usize) -> usize {
    match bytes[i] {
        b'\'' => skip_quoted(bytes, i, b'\'', is_escape_string(bytes, i)),
        b'"' => skip_quoted(bytes, i, b'"', false),
        b'$' => skip_dollar(bytes, i),
        b'-' if bytes[i..].starts_with(b"--") => skip_trivia(bytes, i),
        b'/' if bytes[i..].starts_with(b"/*") => skip_trivia(bytes, i),
        c if is_word_byte(c) => {
            let mut j = i;
            while j < bytes.len() && (is_word_byte(bytes[j]) || bytes[j] == b'$') {
                j += 1;
            }
            j
        }
        _ => i + 1,
    }
}

/// `E'...'` (or `e'...'`): the only literals in which a backslash escapes the next byte.
/// In a plain `'...'` a backslash is an ordinary character (standard_conforming_strings,
/// the default since Postgres 9.1); taking it as an escape there would let `'a\'; SET ...`
/// hide a statement from the splitter.
fn is_escape_string(bytes: &[u8], quote_at: usize) -> bool {
    quote_at >= 1
        && matches!(bytes[quote_at - 1], b'E' | b'e')
        && (quote_at < 2 || !is_word_byte(bytes[quote_at - 2]))
}

pub(crate) fn skip_quoted(bytes: &[u8], i: usize, quote: u8, backslash_escapes: bool) -> usize {
    let mut j = i + 1;
    while j < bytes.len() {
        if bytes[j] == quote {
            if bytes.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        if backslash_escapes && bytes[j] == b'\\' {
            j += 2;
            continue;
        }
        j += 1;
    }
    bytes.len()
}

/// `$tag$ ... $tag$` (tag may be empty). A `$` that does not open a dollar quote (`$1`) is
/// a single byte.
pub(crate) fn skip_dollar(bytes: &[u8], i: usize) -> usize {
    let mut j = i + 1;
    while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
        if j == i + 1 && bytes[j].is_ascii_digit() {
            return j; // a parameter like $1
        }
        j += 1;
    }
    if j >= bytes.len() || bytes[j] != b'$' {
        return i + 1;
    }
    let tag = &bytes[i..=j];
    let mut k = j + 1;
    while k + tag.len() <= bytes.len() {
        if &bytes[k..k + tag.len()] == tag {
            return k + tag.len();
        }
        k += 1;
    }
    bytes.len()
}

pub(crate) fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// Tokens of one statement: words (as written), quoted identifiers, literals and
/// punctuation, each with its byte range, trivia skipped.
#[derive(Clone)]
pub struct Tokens<'a> {
    sql: &'a str,
    pos: usize,
}

impl<'a> Tokens<'a> {
    pub fn new(sql: &'a str) -> Self {
        Tokens { sql, pos: 0 }
    }

    /// The text from the current position to the end of its last token: trailing
    /// whitespace and comments dropped (a value replayed as `SET name = value;` must not
    /// end in a `--` comment, which would swallow whatever follows it).
    pub fn rest(&self) -> &'a str {
        let bytes = self.sql.as_bytes();
        let start = skip_trivia(bytes, self.pos);
        let mut end = start;
        let mut at = start;
        while at < bytes.len() {
            end = skip_token(bytes, at);
            at = skip_trivia(bytes, end);
        }
        &self.sql[start..end]
    }
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        let bytes = self.sql.as_bytes();
        let start = skip_trivia(bytes, self.pos);
        if start >= bytes.len() {
            self.pos = start;
            return None;
        }
        let end = skip_token(bytes, start);
        self.pos = end;
        Some(&self.sql[start..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(sql: &str) -> Vec<&str> {
        statements(sql).map(str::trim).collect()
    }

    #[test]
    fn splits_outside_quotes_and_comments() {
        assert_eq!(split("SELECT 1; SELECT 2"), vec!["SELECT 1", "SELECT 2"]);
        assert_eq!(
            split("SELECT ';'; SELECT 2;"),
            vec!["SELECT ';'", "SELECT 2"]
        );
        assert_eq!(split("SELECT \"a;b\" ; ;"), vec!["SELECT \"a;b\""]);
        assert_eq!(
            split("SELECT $$;$$; SELECT $x$ ; $x$"),
            vec!["SELECT $$;$$", "SELECT $x$ ; $x$"]
        );
        assert_eq!(
            split("SELECT 1 -- ; no\n; SELECT 2"),
            vec!["SELECT 1 -- ; no", "SELECT 2"]
        );
        assert_eq!(
            split("/* a /* ; */ ; */ SELECT 1"),
            vec!["/* a /* ; */ ; */ SELECT 1"]
        );
        assert_eq!(
            split("SELECT $1; SELECT 'it''s;'"),
            vec!["SELECT $1", "SELECT 'it''s;'"]
        );
        // A backslash escapes only in E'' strings.
        assert_eq!(
            split("SELECT 'a\\'; SET search_path = evil; --'"),
            vec!["SELECT 'a\\'", "SET search_path = evil"]
        );
        assert_eq!(
            split("SELECT E'a\\'; b'; SELECT 2"),
            vec!["SELECT E'a\\'; b'", "SELECT 2"]
        );
        assert_eq!(split("  ; -- only a comment"), Vec::<&str>::new());
        assert_eq!(split(""), Vec::<&str>::new());
    }

    #[test]
    fn unterminated_input_does_not_panic() {
        for sql in [
            "'abc", "\"abc", "$a$ abc", "/* abc", "-- abc", "$", "E'\\", "/*/",
        ] {
            let _ = split(sql);
            let _: Vec<_> = Tokens::new(sql).collect();
        }
    }

    #[test]
    fn tokens_skip_trivia() {
        let toks: Vec<_> = Tokens::new(" /* hi */ SET  search_path TO 'a', b -- x").collect();
        assert_eq!(toks, vec!["SET", "search_path", "TO", "'a'", ",", "b"]);
    }

    #[test]
    fn rest_ends_at_the_last_token() {
        let mut toks = Tokens::new("SET search_path = a, /* keep */ b -- tenant\n  ");
        toks.next();
        toks.next();
        toks.next();
        assert_eq!(toks.rest(), "a, /* keep */ b");
        let mut toks = Tokens::new("x 'it''s' /* c */");
        toks.next();
        assert_eq!(toks.rest(), "'it''s'");
        let mut toks = Tokens::new("x -- only a comment");
        toks.next();
        assert_eq!(toks.rest(), "");
    }
}
