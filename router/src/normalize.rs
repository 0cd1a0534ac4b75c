//! Normalization of simple-protocol query text: constants in value positions are replaced
//! by `$1`, `$2`, ... so that `... WHERE aid = 123` and `... WHERE aid = 456` share one
//! cached plan, whose `KeyExpr::Param(k)` then means "the k-th extracted literal".
//!
//! The scanner only replaces a constant where a bound parameter could stand with the same
//! meaning: plain `'...'` strings and decimal numbers (`42`, `-42`, `4.2`) after an operator,
//! `(`, `,` or a keyword such as `AND`/`WHERE`/`SELECT`/`THEN`. It leaves alone everything
//! where a constant is syntax rather than a value: `ORDER BY 1`, `GROUP BY 2`,
//! `DISTINCT ON (1)`, `LIMIT 10`, `OFFSET 5`, type modifiers (`numeric(10,2)`), typed
//! literals (`date '...'`, `interval '1 day'`), prefixed strings (`E'..'`, `B'..'`,
//! `U&'..'`), dollar quotes, adjacent string continuations, function arguments, and numbers
//! that are parts of names (`t1`). Text with `$n` parameters, or with a backslash inside a
//! plain string (whose meaning depends on `standard_conforming_strings`), is not normalized.

use crate::lex::{Lexer, Tok, TokKind};

/// One constant taken out of the text: its byte range in the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Literal {
    pub start: usize,
    pub end: usize,
}

impl Literal {
    /// The constant as written (`42`, `-7`, `'it''s'`).
    pub fn text<'a>(&self, sql: &'a str) -> &'a str {
        sql.get(self.start..self.end).unwrap_or("")
    }
}

/// The normalized text and the constants taken out of it, in order (`$1` is `literals[0]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    pub shape: String,
    pub literals: Vec<Literal>,
}

impl Normalized {
    /// Puts the literals back: gives the original text.
    pub fn restore(&self, sql: &str) -> String {
        substitute_params(&self.shape, |k| {
            self.literals.get(k.wrapping_sub(1)).map(|l| l.text(sql))
        })
    }
}

/// Normalizes `sql`; `None` when it must not be (it has `$n` parameters, or a backslash in
/// a plain string literal).
pub fn normalize(sql: &str) -> Option<Normalized> {
    let mut scratch = Scratch::default();
    if !normalize_into(sql, &mut scratch) {
        return None;
    }
    Some(Normalized {
        shape: scratch.shape,
        literals: scratch.literals,
    })
}

/// Reusable buffers for [`normalize_into`].
#[derive(Default)]
pub(crate) struct Scratch {
    toks: Vec<Tok>,
    frames: Vec<Frame>,
    pub shape: String,
    pub literals: Vec<Literal>,
}

/// [`normalize`] into reused buffers: fills `scratch.shape` and `scratch.literals`; false
/// when the text must not be normalized.
pub(crate) fn normalize_into(sql: &str, scratch: &mut Scratch) -> bool {
    let Scratch {
        toks,
        frames,
        shape,
        literals,
    } = scratch;
    toks.clear();
    frames.clear();
    shape.clear();
    literals.clear();
    let mut lexer = Lexer::new(sql);
    for t in lexer.by_ref() {
        if t.kind == TokKind::Param {
            return false;
        }
        toks.push(t);
    }
    if lexer.saw_plain_backslash {
        return false;
    }
    let bytes = sql.as_bytes();
    frames.push(Frame::ROOT);
    for (idx, t) in toks.iter().enumerate() {
        let prev = idx.checked_sub(1).map(|i| toks[i]);
        match t.kind {
            TokKind::Semicolon => {
                frames.clear();
                frames.push(Frame::ROOT);
            }
            TokKind::Punct if matches!(bytes[t.start], b'(' | b'[') => {
                let parent = frames.last().copied().unwrap_or(Frame::ROOT);
                frames.push(Frame {
                    ok: parent.ok && opens_values(sql, prev),
                    by_list: parent.by_list,
                    select_list: parent.select_list,
                });
            }
            TokKind::Punct if matches!(bytes[t.start], b')' | b']') && frames.len() > 1 => {
                frames.pop();
            }
            TokKind::Word
                if t.is_word(sql, "by")
                    && prev.is_some_and(|p| {
                        p.is_word(sql, "order")
                            || p.is_word(sql, "group")
                            || p.is_word(sql, "partition")
                    }) =>
            {
                if let Some(f) = frames.last_mut() {
                    f.by_list = true;
                }
            }
            TokKind::Word => {
                let w = t.text(sql);
                if let Some(f) = frames.last_mut() {
                    if w.eq_ignore_ascii_case("select") {
                        f.select_list = true;
                    } else if SELECT_LIST_END.iter().any(|k| w.eq_ignore_ascii_case(k)) {
                        f.select_list = false;
                    }
                }
            }
            TokKind::Str | TokKind::Number => {
                let frame = frames.last().copied().unwrap_or(Frame::ROOT);
                if !frame.ok || frame.by_list || frame.select_list {
                    continue;
                }
                if let Some(lit) = literal_at(sql, toks, idx) {
                    literals.push(lit);
                }
            }
            _ => {}
        }
    }
    shape.reserve(sql.len() + 2 * literals.len());
    let mut at = 0;
    for (k, lit) in literals.iter().enumerate() {
        shape.push_str(&sql[at..lit.start]);
        shape.push('$');
        push_usize(shape, k + 1);
        at = lit.end;
    }
    shape.push_str(&sql[at..]);
    true
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    /// Constants directly inside may be replaced.
    ok: bool,
    /// Inside an ORDER BY / GROUP BY / PARTITION BY list: constants may be positions.
    by_list: bool,
    /// Inside a select list: its expressions are matched against ORDER BY / GROUP BY
    /// expressions (which keep their constants), so they keep theirs too.
    select_list: bool,
}

impl Frame {
    const ROOT: Frame = Frame {
        ok: true,
        by_list: false,
        select_list: false,
    };
}

/// Keywords that end a select list.
const SELECT_LIST_END: &[&str] = &[
    "from",
    "into",
    "where",
    "group",
    "having",
    "window",
    "order",
    "limit",
    "offset",
    "fetch",
    "for",
    "union",
    "intersect",
    "except",
];

/// Keywords after which a constant is a value.
const VALUE_KEYWORDS: &[&str] = &[
    "and", "or", "not", "when", "then", "else", "like", "ilike", "between", "select", "where",
    "on", "values",
];

/// Keywords after which a parenthesis holds values or a subquery (not a type modifier, a
/// function's arguments or a column list).
const OPEN_KEYWORDS: &[&str] = &[
    "in",
    "values",
    "and",
    "or",
    "not",
    "where",
    "select",
    "when",
    "then",
    "else",
    "exists",
    "from",
    "join",
    "as",
    "any",
    "all",
    "some",
    "set",
    "returning",
    "union",
    "intersect",
    "except",
    "lateral",
];

/// Operators after which a constant is a value.
fn is_value_operator(c: u8) -> bool {
    matches!(
        c,
        b'=' | b'<' | b'>' | b'(' | b',' | b'+' | b'-' | b'*' | b'/' | b'%' | b'|' | b'['
    )
}

fn opens_values(sql: &str, prev: Option<Tok>) -> bool {
    match prev {
        None => true,
        Some(p) => match p.kind {
            TokKind::Punct => is_value_operator(sql.as_bytes()[p.start]),
            TokKind::Word => {
                let w = p.text(sql);
                OPEN_KEYWORDS.iter().any(|k| w.eq_ignore_ascii_case(k))
            }
            _ => false,
        },
    }
}

fn value_context(sql: &str, prev: Option<Tok>) -> bool {
    match prev {
        None => false,
        Some(p) => match p.kind {
            TokKind::Punct => is_value_operator(sql.as_bytes()[p.start]),
            TokKind::Word => {
                let w = p.text(sql);
                VALUE_KEYWORDS.iter().any(|k| w.eq_ignore_ascii_case(k))
            }
            _ => false,
        },
    }
}

/// The literal at `toks[idx]` (a `Str` or `Number`) if it may be replaced, with a unary
/// minus glued to a number included.
fn literal_at(sql: &str, toks: &[Tok], idx: usize) -> Option<Literal> {
    literal_candidate(sql, toks, idx).filter(|l| {
        // `$k` glued after a word would join it (`WHERE-0` must not become `WHERE$1`).
        l.start == 0 || {
            let before = sql.as_bytes()[l.start - 1];
            !(crate::scan::is_word_byte(before) || before == b'$')
        }
    })
}

fn literal_candidate(sql: &str, toks: &[Tok], idx: usize) -> Option<Literal> {
    let t = toks[idx];
    let bytes = sql.as_bytes();
    let prev = idx.checked_sub(1).map(|i| toks[i]);
    let next = toks.get(idx + 1).copied();
    // Nothing glued after it (`1abc`, `'a''b'` is one token already).
    if let Some(n) = next {
        if n.start == t.end && !matches!(n.kind, TokKind::Punct | TokKind::Semicolon) {
            return None;
        }
        if matches!(n.kind, TokKind::Str | TokKind::PrefixedStr) {
            return None; // 'a' 'b' continuation
        }
    }
    match t.kind {
        TokKind::Str => {
            if prev.is_some_and(|p| matches!(p.kind, TokKind::Str | TokKind::PrefixedStr)) {
                return None;
            }
            value_context(sql, prev).then_some(Literal {
                start: t.start,
                end: t.end,
            })
        }
        TokKind::Number => {
            if !is_simple_number(t.text(sql)) {
                return None;
            }
            if t.start > 0 && bytes[t.start - 1] == b'.' {
                return None;
            }
            // A unary minus: glued to the number (`= -5`, `(-5`, `+ -5`) it is part of the
            // constant; apart from it (`= - 5`) the number stays, so that `- $1` never stands
            // where the text had the constant -5.
            if let Some(minus) = prev.filter(|p| p.is_punct(sql, b'-')) {
                let before = idx.checked_sub(2).map(|i| toks[i]);
                if unary_minus(sql, toks, idx - 1) && value_context(sql, before) {
                    if minus.end != t.start {
                        return None;
                    }
                    return Some(Literal {
                        start: minus.start,
                        end: t.end,
                    });
                }
            }
            value_context(sql, prev).then_some(Literal {
                start: t.start,
                end: t.end,
            })
        }
        _ => None,
    }
}

/// Whether the `-` at `toks[minus]` is a prefix operator by Postgres's lexer rules: the
/// operator characters glued before it contain none of ``~ ! @ # ^ & | ` ? %`` (else the
/// `-` is part of a longer operator).
fn unary_minus(sql: &str, toks: &[Tok], minus: usize) -> bool {
    let bytes = sql.as_bytes();
    let mut i = minus;
    let mut start = toks[minus].start;
    while i > 0 {
        let p = toks[i - 1];
        if p.kind != TokKind::Punct || p.end != start || !is_op_char(bytes[p.start]) {
            break;
        }
        if matches!(
            bytes[p.start],
            b'~' | b'!' | b'@' | b'#' | b'^' | b'&' | b'|' | b'`' | b'?' | b'%'
        ) {
            return false;
        }
        start = p.start;
        i -= 1;
    }
    true
}

fn is_op_char(c: u8) -> bool {
    matches!(
        c,
        b'+' | b'-'
            | b'*'
            | b'/'
            | b'<'
            | b'>'
            | b'='
            | b'~'
            | b'!'
            | b'@'
            | b'#'
            | b'%'
            | b'^'
            | b'&'
            | b'|'
            | b'`'
            | b'?'
    )
}

/// `digits` or `digits.digits`.
fn is_simple_number(s: &str) -> bool {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && match frac {
            None => true,
            Some(f) => !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()),
        }
}

fn push_usize(out: &mut String, n: usize) {
    use std::fmt::Write;
    let _ = write!(out, "{n}");
}

/// Replaces each `$k` parameter token in `text` by `value(k)` (left as is when `None`).
pub(crate) fn substitute_params<'a>(
    text: &str,
    value: impl Fn(usize) -> Option<&'a str>,
) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut at = 0;
    for t in Lexer::new(text) {
        if t.kind != TokKind::Param {
            continue;
        }
        let Ok(k) = text[t.start + 1..t.end].parse::<usize>() else {
            continue;
        };
        if let Some(v) = value(k) {
            out.push_str(&text[at..t.start]);
            out.push_str(v);
            at = t.end;
        }
    }
    out.push_str(&text[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(sql: &str) -> Option<(String, Vec<String>)> {
        normalize(sql).map(|n| {
            let lits = n.literals.iter().map(|l| l.text(sql).to_string()).collect();
            (n.shape, lits)
        })
    }

    fn same(sql: &str) {
        let (s, lits) = shape(sql).unwrap();
        assert_eq!(s, sql, "should be left alone");
        assert!(lits.is_empty());
    }

    #[test]
    fn replaces_values() {
        assert_eq!(
            shape("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;").unwrap(),
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1;".into(),
                vec!["12345".into()]
            )
        );
        assert_eq!(
            shape("UPDATE pgbench_accounts SET abalance = abalance + -5007 WHERE aid = 3;")
                .unwrap()
                .0,
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;"
        );
        assert_eq!(
            shape("INSERT INTO h (tid, bid, aid, delta, mtime) VALUES (3, 1, 69471, -2445, CURRENT_TIMESTAMP)")
                .unwrap()
                .0,
            "INSERT INTO h (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)"
        );
        let (s, lits) =
            shape("select * from t where name = 'it''s' and x in (1, 2.5,-3) and y=-4").unwrap();
        // Select lists keep their constants (they are matched against ORDER BY).
        assert_eq!(
            s,
            "select * from t where name = $1 and x in ($2, $3,$4) and y=$5"
        );
        assert_eq!(lits, vec!["'it''s'", "1", "2.5", "-3", "-4"]);
        assert_eq!(
            shape("SELECT * FROM t WHERE a = 1 ORDER BY 1 LIMIT 10 OFFSET 5")
                .unwrap()
                .0,
            "SELECT * FROM t WHERE a = $1 ORDER BY 1 LIMIT 10 OFFSET 5"
        );
        assert_eq!(
            shape("SELECT x FROM t WHERE id IN (SELECT y FROM u WHERE z = 3 GROUP BY 1) AND w = 4")
                .unwrap()
                .0,
            "SELECT x FROM t WHERE id IN (SELECT y FROM u WHERE z = $1 GROUP BY 1) AND w = $2"
        );
        // Select lists keep their constants (they are matched against ORDER BY).
        assert_eq!(
            shape("SELECT 1, a + 2 FROM t WHERE b = 3; SELECT a FROM t GROUP BY 1 HAVING a > 4; SELECT 5")
                .unwrap()
                .0,
            "SELECT 1, a + 2 FROM t WHERE b = $1; SELECT a FROM t GROUP BY 1 HAVING a > 4; SELECT 5"
        );
        assert_eq!(
            shape("SELECT * FROM t WHERE x = '5'::int8").unwrap().0,
            "SELECT * FROM t WHERE x = $1::int8"
        );
    }

    #[test]
    fn leaves_syntax_alone() {
        for sql in [
            "SELECT * FROM t ORDER BY 2 DESC",
            "SELECT a, count(*) FROM t GROUP BY 1, 2",
            "SELECT DISTINCT ON (1) a FROM t",
            "SELECT * FROM t LIMIT 5 OFFSET 10",
            "SELECT * FROM t FETCH FIRST 5 ROWS ONLY",
            "SELECT x::numeric(10,2) FROM t",
            "SELECT CAST(x AS varchar(20)) FROM t",
            "SELECT * FROM t WHERE d = date '2020-01-01'",
            "SELECT * FROM t WHERE d > now() - interval '1 day'",
            "SELECT * FROM t WHERE s = E'a\\nb'",
            "SELECT * FROM t WHERE s = U&'d\\0061t'",
            "SELECT * FROM t WHERE s = B'101'",
            "SELECT * FROM t WHERE s = $$x$$",
            "SELECT * FROM t1 WHERE c_2 = t3.c4",
            "SELECT * FROM t WHERE a = 1e5 OR b = 0x1F OR c = 1_000 OR d = .5",
            "SELECT coalesce(x, 0), round(y, 2), substr(s, 1, 3) FROM t",
            "SELECT 'a'\n'b'",
            "SELECT * FROM t WHERE a[1] = b",
            "SELECT sum(x) OVER (PARTITION BY 1 ORDER BY 2 ROWS 3 PRECEDING) FROM t",
            "SELECT * FROM t WHERE a IS DISTINCT FROM 5",
            "SELECT * FROM t ORDER BY (1)",
            "SELECT * FROM t ORDER BY x IN (1, 2)",
        ] {
            same(sql);
        }
    }

    #[test]
    fn declines_parameters_and_backslashes() {
        assert_eq!(shape("SELECT * FROM t WHERE a = $1 AND b = 2"), None);
        assert_eq!(shape("SELECT 'C:\\' FROM t WHERE a = 2"), None);
        // Dollar quotes are not parameters.
        assert!(shape("SELECT $$a$$, 1").is_some());
    }

    #[test]
    fn minus_is_glued_only_when_unary() {
        let w = |cond: &str| shape(&format!("SELECT * FROM t WHERE {cond}")).unwrap();
        assert_eq!(w("a -5 = b").0, "SELECT * FROM t WHERE a -$1 = b");
        assert_eq!(w("a - 5 = b").0, "SELECT * FROM t WHERE a - $1 = b");
        assert_eq!(w("x*-5 = 1").1, vec!["-5", "1"]);
        assert_eq!(w("x>=-5").1, vec!["-5"]);
        assert_eq!(w("-5 = x").1, vec!["-5"]);
        assert_eq!(w("x = - 5").0, "SELECT * FROM t WHERE x = - 5");
        // A placeholder must not glue onto a word.
        assert_eq!(
            shape("SELECT * FROM t WHERE-0 = x").unwrap().0,
            "SELECT * FROM t WHERE-0 = x"
        );
        assert_eq!(
            shape("SELECT * FROM t WHERE'a' = x").unwrap().0,
            "SELECT * FROM t WHERE'a' = x"
        );
        // `@-`, `!=-`, `%-` are single operators: the minus stays with them.
        assert_eq!(
            w("x @-5 AND x !=-5 AND x %-5").0,
            "SELECT * FROM t WHERE x @-$1 AND x !=-$2 AND x %-$3"
        );
    }

    #[test]
    fn restore_gives_back_the_original() {
        for sql in [
            "SELECT * FROM t WHERE a = 1 AND b = 'x' AND c IN (-1, 2.5)",
            "INSERT INTO t (a, b) VALUES (1, 'a'), (2, 'b') RETURNING a",
        ] {
            let n = normalize(sql).unwrap();
            assert_eq!(n.restore(sql), sql);
        }
    }
}
