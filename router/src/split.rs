//! Building per-shard statements for a multi-row INSERT whose rows belong to several shards
//! (`Target::SplitInsert`).

use crate::lex::{Lexer, Tok, TokKind};

/// One shard's part of a split INSERT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertPart {
    pub shard: u32,
    /// The INSERT with only this shard's VALUES rows (prefix and suffix such as
    /// `ON CONFLICT ...` and `RETURNING ...` kept).
    pub sql: String,
    /// Indexes (0-based, into the original VALUES list) of the rows in this part, in order.
    /// RETURNING rows come back in this order: use it to restore the original order.
    pub rows: Vec<usize>,
    /// For text with `$n` parameters: the original parameter numbers in the order of the
    /// new statement's `$1`, `$2`, ... (empty when the text has none). Bind this part with
    /// those values (and those parameter types).
    pub params: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitError {
    /// The text has no top-level `VALUES (...)` list.
    NoValues,
    /// The VALUES list has a different number of rows than shards were given.
    RowCount { rows: usize, shards: usize },
}

impl std::fmt::Display for SplitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SplitError::NoValues => write!(f, "INSERT has no VALUES list to split"),
            SplitError::RowCount { rows, shards } => {
                write!(
                    f,
                    "INSERT has {rows} VALUES rows but {shards} shards were given"
                )
            }
        }
    }
}

impl std::error::Error for SplitError {}

/// Splits a multi-row `INSERT ... VALUES (...), (...) ...` into one statement per shard,
/// given the shard of each row (in VALUES order). Parts come in order of their first row.
pub fn split_insert(sql: &str, row_shards: &[u32]) -> Result<Vec<InsertPart>, SplitError> {
    let toks: Vec<Tok> = Lexer::new(sql).collect();
    let mut depth = 0usize;
    let mut values_at = None;
    for (i, t) in toks.iter().enumerate() {
        if t.is_punct(sql, b'(') {
            depth += 1;
        } else if t.is_punct(sql, b')') {
            depth = depth.saturating_sub(1);
        } else if depth == 0 && t.is_word(sql, "values") {
            values_at = Some(i);
            break;
        }
    }
    let values_at = values_at.ok_or(SplitError::NoValues)?;
    // Rows: `( ... )` groups separated by commas.
    let mut rows: Vec<(usize, usize)> = Vec::new();
    let mut i = values_at + 1;
    while let Some(open) = toks.get(i).filter(|t| t.is_punct(sql, b'(')) {
        let mut d = 0usize;
        let mut close = None;
        for (j, t) in toks.iter().enumerate().skip(i) {
            if t.is_punct(sql, b'(') {
                d += 1;
            } else if t.is_punct(sql, b')') {
                d -= 1;
                if d == 0 {
                    close = Some(j);
                    break;
                }
            }
        }
        let close = close.ok_or(SplitError::NoValues)?;
        rows.push((open.start, toks[close].end));
        i = close + 1;
        if toks.get(i).is_some_and(|t| t.is_punct(sql, b',')) {
            i += 1;
        } else {
            break;
        }
    }
    if rows.is_empty() {
        return Err(SplitError::NoValues);
    }
    if rows.len() != row_shards.len() {
        return Err(SplitError::RowCount {
            rows: rows.len(),
            shards: row_shards.len(),
        });
    }
    let prefix = &sql[..rows[0].0];
    let suffix = &sql[rows[rows.len() - 1].1..];
    let has_params = toks.iter().any(|t| t.kind == TokKind::Param);
    let mut order: Vec<u32> = Vec::new();
    for &s in row_shards {
        if !order.contains(&s) {
            order.push(s);
        }
    }
    let mut parts = Vec::with_capacity(order.len());
    for shard in order {
        let idx: Vec<usize> = (0..rows.len())
            .filter(|&r| row_shards[r] == shard)
            .collect();
        let mut text = String::with_capacity(sql.len());
        text.push_str(prefix);
        for (n, &r) in idx.iter().enumerate() {
            if n > 0 {
                text.push_str(", ");
            }
            text.push_str(&sql[rows[r].0..rows[r].1]);
        }
        text.push_str(suffix);
        let (text, params) = if has_params {
            renumber(&text)
        } else {
            (text, Vec::new())
        };
        parts.push(InsertPart {
            shard,
            sql: text,
            rows: idx,
            params,
        });
    }
    Ok(parts)
}

/// Renumbers `$n` parameters to `$1..` in order of first use; returns the original numbers.
fn renumber(text: &str) -> (String, Vec<usize>) {
    let mut out = String::with_capacity(text.len());
    let mut params: Vec<usize> = Vec::new();
    let mut at = 0;
    for t in Lexer::new(text) {
        if t.kind != TokKind::Param {
            continue;
        }
        let Ok(n) = text[t.start + 1..t.end].parse::<usize>() else {
            continue;
        };
        let new = match params.iter().position(|&p| p == n) {
            Some(i) => i + 1,
            None => {
                params.push(n);
                params.len()
            }
        };
        out.push_str(&text[at..t.start]);
        out.push('$');
        out.push_str(&new.to_string());
        at = t.end;
    }
    out.push_str(&text[at..]);
    (out, params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_rows_by_shard() {
        let sql =
            "INSERT INTO users (id, name) VALUES (1, 'a'), (2, 'b (x)'), (3, 'c') RETURNING id";
        let parts = split_insert(sql, &[0, 1, 0]).unwrap();
        assert_eq!(
            parts,
            vec![
                InsertPart {
                    shard: 0,
                    sql: "INSERT INTO users (id, name) VALUES (1, 'a'), (3, 'c') RETURNING id"
                        .into(),
                    rows: vec![0, 2],
                    params: vec![],
                },
                InsertPart {
                    shard: 1,
                    sql: "INSERT INTO users (id, name) VALUES (2, 'b (x)') RETURNING id".into(),
                    rows: vec![1],
                    params: vec![],
                },
            ]
        );
    }

    #[test]
    fn renumbers_parameters() {
        let sql = "WITH x AS (SELECT 1) INSERT INTO t (id, v) VALUES ($1, $2), ($3, $4) \
                   ON CONFLICT (id) DO UPDATE SET v = $5";
        let parts = split_insert(sql, &[7, 3]).unwrap();
        assert_eq!(parts[0].shard, 7);
        assert_eq!(
            parts[0].sql,
            "WITH x AS (SELECT 1) INSERT INTO t (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = $3"
        );
        assert_eq!(parts[0].params, vec![1, 2, 5]);
        assert_eq!(
            parts[1].sql,
            "WITH x AS (SELECT 1) INSERT INTO t (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = $3"
        );
        assert_eq!(parts[1].params, vec![3, 4, 5]);
    }

    #[test]
    fn rejects_mismatches() {
        assert_eq!(
            split_insert("INSERT INTO t SELECT 1", &[0]),
            Err(SplitError::NoValues)
        );
        assert_eq!(
            split_insert("INSERT INTO t (a) VALUES (1), (2)", &[0]),
            Err(SplitError::RowCount { rows: 2, shards: 1 })
        );
        assert_eq!(
            split_insert("INSERT INTO t (a) VALUES (1", &[0]),
            Err(SplitError::NoValues)
        );
    }
}
