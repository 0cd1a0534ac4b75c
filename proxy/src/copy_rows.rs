//! Splitting `COPY ... FROM STDIN` data into rows and finding each row's shard-key field,
//! in the text, CSV and binary formats, exactly as the server will read them. Pure: the
//! session feeds CopyData payloads (which split rows anywhere) and gets whole rows back.

use shardgate_router::{CopyFormat, CopyInfo};

pub struct CopyRows {
    csv: bool,
    /// The binary format: a header, tuples of length-prefixed fields, a trailer.
    binary: bool,
    delimiter: u8,
    quote: u8,
    escape: u8,
    null: Vec<u8>,
    /// CSV `FORCE_NOT_NULL` / `FORCE_NULL` of the key column (`CopyInfo`).
    key_force_not_null: bool,
    key_force_null: bool,
    /// Column of the shard key, 0-based.
    key_index: usize,
    /// The first line is a header (text, CSV) or the file header (binary, always):
    /// every shard gets it.
    header_pending: bool,
    /// Bytes of an incomplete row (text, CSV) or unit (binary).
    partial: Vec<u8>,
    /// Where the scan of the incomplete CSV row stands (what its bytes so far mean).
    row_state: RowState,
    /// How rows end, as Postgres decides from the first one: `\n`, `\r\n` or a bare `\r`.
    eol: Eol,
    /// The row scanned so far ends in a `\r` that may end it: the next byte tells
    /// (`Unknown` or `ReturnNewline` only).
    cr_pending: bool,
    /// The most bytes an incomplete row may hold (`MAX_ROW`; smaller in tests).
    max_row: usize,
    /// The `\.` end marker was seen: the rest is ignored (as the server does). Binary:
    /// the trailer was seen (or the data cannot be read); what follows goes to every
    /// shard, for the server to reject.
    ended: bool,
}

/// One line of COPY data.
pub enum CopyLine<'a> {
    /// For every shard (the header).
    All(&'a [u8]),
    /// A row and its key field (`None` for NULL), unescaped.
    Row(&'a [u8], Option<Vec<u8>>),
    /// A binary tuple and its key field as sent (`None` for NULL or no such field).
    Binary(&'a [u8], Option<&'a [u8]>),
}

/// The binary format's header: signature, flags, header-extension length.
const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
const BINARY_HEADER: usize = 11 + 4 + 4;
/// Postgres's largest value (MaxAllocSize): 1 GiB less one byte.
const MAX_FIELD: usize = 0x3fff_ffff + 1;
/// The longest row shardgate holds while it waits for the row's end. Postgres reads a
/// text row into one buffer of at most 1 GiB, so it would fail on a longer row too
/// (54000); a binary tuple longer than that is refused here likewise.
const MAX_ROW: usize = MAX_FIELD;

/// Data shardgate cannot split as Postgres would read it: the COPY fails.
#[derive(Debug, PartialEq, Eq)]
pub enum BadData {
    /// A row grew past `MAX_ROW` before it ended (54000).
    RowTooLong,
    /// A row ended otherwise than the first one did (22P04, Postgres's own message):
    /// each shard would take the first row it gets as the rule, and read rows apart.
    LineEnding(&'static str),
}

impl BadData {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            BadData::RowTooLong => "54000",
            BadData::LineEnding(_) => "22P04",
        }
    }
}

impl std::fmt::Display for BadData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadData::RowTooLong => write!(
                f,
                "COPY row is too long: more than {MAX_ROW} bytes without a row end"
            ),
            BadData::LineEnding(m) => f.write_str(m),
        }
    }
}

/// How rows end (Postgres's `eol_type`), decided by the first row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eol {
    Unknown,
    Newline,
    ReturnNewline,
    /// A bare carriage return (old Mac files).
    Return,
}

/// What the bytes of a row seen so far mean for the next one. Kept between CopyData
/// messages, so a long row is scanned once, not again from its start at every piece.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum RowState {
    #[default]
    Unquoted,
    /// CSV: inside quotes.
    Quoted,
    /// CSV: inside quotes, just after the escape character, whose meaning depends on the
    /// next byte (with the default escape, `"` may also be the closing quote). Text: just
    /// after a backslash, which quotes the next byte.
    AfterEscape,
}

impl CopyRows {
    pub fn new(info: &CopyInfo, key_index: usize) -> CopyRows {
        let csv = info.format == CopyFormat::Csv;
        let binary = info.format == CopyFormat::Binary;
        let delimiter = info
            .delimiter
            .map_or(if csv { b',' } else { b'\t' }, |c| c as u8);
        let quote = info.quote.map_or(b'"', |c| c as u8);
        let escape = info.escape.map_or(quote, |c| c as u8);
        let null = info
            .null
            .clone()
            .map(String::into_bytes)
            .unwrap_or_else(|| if csv { Vec::new() } else { b"\\N".to_vec() });
        CopyRows {
            csv,
            binary,
            delimiter,
            quote,
            escape,
            null,
            key_force_not_null: info.key_force_not_null,
            key_force_null: info.key_force_null,
            key_index,
            header_pending: info.header || binary,
            partial: Vec::new(),
            row_state: RowState::Unquoted,
            eol: Eol::Unknown,
            cr_pending: false,
            max_row: MAX_ROW,
            ended: false,
        }
    }

    /// Feeds CopyData bytes; `each` gets every completed line (with its line ending).
    /// Every byte is scanned once: an incomplete row waits in `partial` with the state
    /// of its scan, and only the new bytes are looked at.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        each: &mut dyn FnMut(CopyLine<'_>),
    ) -> Result<(), BadData> {
        if self.binary {
            return self.feed_binary(data, each);
        }
        if self.cr_pending && !data.is_empty() && !self.ended {
            // The row in `partial` ends in a `\r`: a `\n` next ends it there, anything else
            // ended it at the `\r` (bare `\r` rows), or is an error (`\r\n` rows).
            self.cr_pending = false;
            self.row_state = RowState::Unquoted;
            let mut line = std::mem::take(&mut self.partial);
            if data[0] == b'\n' {
                self.eol = Eol::ReturnNewline;
                line.push(b'\n');
                data = &data[1..];
            } else if self.eol == Eol::Unknown {
                self.eol = Eol::Return;
            } else {
                return Err(literal_return(self.csv));
            }
            self.line(&line, each);
        }
        while !data.is_empty() && !self.ended {
            let mut state = self.row_state;
            let end = self.row_end(data, &mut state)?;
            self.row_state = state;
            let Some(e) = end else {
                if self.partial.len() + data.len() > self.max_row {
                    return Err(BadData::RowTooLong);
                }
                self.partial.extend_from_slice(data);
                break;
            };
            let (head, rest) = data.split_at(e + 1);
            self.row_state = RowState::Unquoted;
            data = rest;
            if self.partial.is_empty() {
                // A row complete within `data`: handled without copying it.
                self.line(head, each);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.line(&line, each);
            }
        }
        Ok(())
    }

    /// Binary data: whole units (the header, each tuple, the trailer) as they complete.
    /// Bytes that cannot be read as the format go to every shard, whose server then fails
    /// the COPY as Postgres would.
    fn feed_binary(
        &mut self,
        data: &[u8],
        each: &mut dyn FnMut(CopyLine<'_>),
    ) -> Result<(), BadData> {
        if self.ended {
            each(CopyLine::All(data));
            return Ok(());
        }
        self.partial.extend_from_slice(data);
        let buf = std::mem::take(&mut self.partial);
        let mut at = 0;
        while at < buf.len() {
            let rest = &buf[at..];
            let unit = if self.header_pending {
                binary_header_len(rest)
            } else {
                binary_tuple(rest, self.key_index)
            };
            match unit {
                Binary::Incomplete => break,
                Binary::Header(n) => {
                    self.header_pending = false;
                    each(CopyLine::All(&rest[..n]));
                    at += n;
                }
                Binary::Tuple(n, key) => {
                    each(CopyLine::Binary(
                        &rest[..n],
                        key.map(|(from, to)| &rest[from..to]),
                    ));
                    at += n;
                }
                Binary::Trailer | Binary::Unreadable => {
                    self.ended = true;
                    each(CopyLine::All(rest));
                    at = buf.len();
                }
            }
        }
        self.partial = buf;
        self.partial.drain(..at);
        if self.partial.len() > self.max_row {
            // Still no whole tuple: every field is under 1 GiB (or the data would have
            // gone on as unreadable), but together they are more than a row may be.
            return Err(BadData::RowTooLong);
        }
        Ok(())
    }

    /// The data ended (CopyDone): a last line without a newline still counts (an
    /// incomplete binary unit goes to every shard, which reject it).
    pub fn finish(&mut self, each: &mut dyn FnMut(CopyLine<'_>)) {
        if self.binary {
            if !self.partial.is_empty() {
                each(CopyLine::All(&std::mem::take(&mut self.partial)));
            }
            return;
        }
        if !self.partial.is_empty() && !self.ended {
            if self.cr_pending && self.eol == Eol::Unknown {
                // The data's only row ended in a bare `\r`.
                self.eol = Eol::Return;
            }
            let line = std::mem::take(&mut self.partial);
            if line == b"\\." {
                // `\.` with no line ending after it, at the very end: CSV reads it as a
                // value; text fails ("end-of-copy marker corrupt"), here on every shard.
                if self.csv {
                    let key = self.csv_field(&line);
                    each(CopyLine::Row(&line, key));
                } else {
                    each(CopyLine::All(&line));
                }
                return;
            }
            self.line(&line, each);
        }
    }

    /// Index of the last byte of the line ending that ends the current row, whose bytes
    /// before `buf` left the scan in `state`; without one, `state` is left as at the end
    /// of `buf`.
    fn row_end(&mut self, buf: &[u8], state: &mut RowState) -> Result<Option<usize>, BadData> {
        if !self.csv {
            return text_row_end(buf, state, &mut self.eol, &mut self.cr_pending);
        }
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match *state {
                RowState::Unquoted if b == self.quote => *state = RowState::Quoted,
                RowState::Unquoted if b == b'\n' || b == b'\r' => {
                    return line_end_at(buf, i, &mut self.eol, &mut self.cr_pending, true);
                }
                RowState::Unquoted => {}
                RowState::Quoted if b == self.escape => *state = RowState::AfterEscape,
                RowState::Quoted if b == self.quote => *state = RowState::Unquoted,
                RowState::Quoted => {}
                RowState::AfterEscape => {
                    if self.escapes(self.escape, Some(b)) {
                        *state = RowState::Quoted;
                    } else {
                        // Not an escape: with the default escape it was the closing quote,
                        // otherwise a plain character; `b` is read in that state.
                        *state = if self.escape == self.quote {
                            RowState::Unquoted
                        } else {
                            RowState::Quoted
                        };
                        continue;
                    }
                }
            }
            i += 1;
        }
        Ok(None)
    }

    /// Inside quotes, `b` followed by `next` is an escaped character (`""` when the
    /// escape is the quote; `\"` or `\\` with another escape character).
    fn escapes(&self, b: u8, next: Option<u8>) -> bool {
        b == self.escape
            && (next == Some(self.quote)
                || (self.escape != self.quote && next == Some(self.escape)))
    }

    fn line(&mut self, line: &[u8], each: &mut dyn FnMut(CopyLine<'_>)) {
        let ending: &[u8] = match self.eol {
            Eol::Newline => b"\n",
            Eol::ReturnNewline => b"\r\n",
            Eol::Return => b"\r",
            Eol::Unknown => b"",
        };
        let mut content = line.strip_suffix(ending).unwrap_or(line);
        if content == b"\\." {
            self.ended = true;
            return;
        }
        // Text format: `\.` ends the data anywhere in a line, what is before it being
        // the last row (Postgres 15). That row goes to its key's shard whole, whose server
        // stops there too; nothing after it goes anywhere.
        if !self.csv {
            if let Some(at) = text_end_marker(content) {
                self.ended = true;
                content = &content[..at];
            }
        }
        if self.header_pending {
            self.header_pending = false;
            each(CopyLine::All(line));
            return;
        }
        let key = if self.csv {
            self.csv_field(content)
        } else {
            self.text_field(content)
        };
        each(CopyLine::Row(line, key));
    }

    fn text_field(&self, row: &[u8]) -> Option<Vec<u8>> {
        let mut field = 0;
        let mut start = 0;
        let mut i = 0;
        let mut end = row.len();
        while i < row.len() {
            if row[i] == b'\\' {
                i += 2;
                continue;
            }
            if row[i] == self.delimiter {
                if field == self.key_index {
                    end = i;
                    break;
                }
                field += 1;
                start = i + 1;
            }
            i += 1;
        }
        if field != self.key_index {
            return None;
        }
        let raw = &row[start..end.min(row.len())];
        if raw == self.null.as_slice() {
            return None;
        }
        Some(unescape_text(raw))
    }

    fn csv_field(&self, row: &[u8]) -> Option<Vec<u8>> {
        let mut field = 0;
        let mut i = 0;
        loop {
            // At the start of field `field`.
            let mut value = Vec::new();
            let mut quoted = false;
            let start = i;
            while i < row.len() && row[i] != self.delimiter {
                if row[i] == self.quote {
                    quoted = true;
                    i += 1;
                    while i < row.len() {
                        let b = row[i];
                        let next = row.get(i + 1).copied();
                        if self.escapes(b, next) {
                            value.push(next.unwrap_or(b));
                            i += 2;
                            continue;
                        }
                        if b == self.quote {
                            i += 1;
                            break;
                        }
                        value.push(b);
                        i += 1;
                    }
                } else {
                    value.push(row[i]);
                    i += 1;
                }
            }
            if field == self.key_index {
                // As Postgres reads it: an unquoted null string is NULL unless
                // FORCE_NOT_NULL; a quoted one is a value unless FORCE_NULL.
                let is_null = if quoted {
                    self.key_force_null && value == self.null
                } else {
                    !self.key_force_not_null && row[start..i] == *self.null
                };
                return (!is_null).then_some(value);
            }
            if i >= row.len() {
                return None;
            }
            i += 1;
            field += 1;
        }
    }
}

/// Text format: the newline that ends the row. A backslash quotes the byte after it, a
/// raw newline too: Postgres reads `\` + newline as a newline inside the value, so that
/// newline does not end the row (`AfterEscape`: the piece ended on a backslash).
fn text_row_end(
    buf: &[u8],
    state: &mut RowState,
    eol: &mut Eol,
    cr_pending: &mut bool,
) -> Result<Option<usize>, BadData> {
    let mut i = 0;
    if *state == RowState::AfterEscape {
        if buf.is_empty() {
            return Ok(None);
        }
        *state = RowState::Unquoted;
        i = 1;
    }
    while let Some(j) = memchr::memchr3(b'\n', b'\r', b'\\', &buf[i..]) {
        let k = i + j;
        if buf[k] != b'\\' {
            return line_end_at(buf, k, eol, cr_pending, false);
        }
        if k + 1 == buf.len() {
            *state = RowState::AfterEscape;
            return Ok(None);
        }
        i = k + 2;
    }
    Ok(None)
}

/// At a `\n` or `\r` outside quotes and escapes (`buf[k]`): the index of the last byte of
/// the line ending it starts, as the data's line ending says (the first one seen decides,
/// as in Postgres); `None` when a `\r` ends `buf` and the next byte will tell; an error
/// for a line ending of another kind, which Postgres rejects too.
fn line_end_at(
    buf: &[u8],
    k: usize,
    eol: &mut Eol,
    cr_pending: &mut bool,
    csv: bool,
) -> Result<Option<usize>, BadData> {
    if buf[k] == b'\n' {
        return match *eol {
            Eol::Unknown | Eol::Newline => {
                *eol = Eol::Newline;
                Ok(Some(k))
            }
            Eol::ReturnNewline | Eol::Return => Err(literal_newline(csv)),
        };
    }
    match (*eol, buf.get(k + 1)) {
        (Eol::Newline, _) => Err(literal_return(csv)),
        (Eol::Return, _) => Ok(Some(k)),
        (_, Some(b'\n')) => {
            *eol = Eol::ReturnNewline;
            Ok(Some(k + 1))
        }
        (Eol::Unknown, Some(_)) => {
            *eol = Eol::Return;
            Ok(Some(k))
        }
        (Eol::ReturnNewline, Some(_)) => Err(literal_return(csv)),
        (_, None) => {
            *cr_pending = true;
            Ok(None)
        }
    }
}

fn literal_newline(csv: bool) -> BadData {
    BadData::LineEnding(if csv {
        "unquoted newline found in data"
    } else {
        "literal newline found in data"
    })
}

fn literal_return(csv: bool) -> BadData {
    BadData::LineEnding(if csv {
        "unquoted carriage return found in data"
    } else {
        "literal carriage return found in data"
    })
}

/// One unit at the start of binary COPY data.
enum Binary {
    /// More bytes are needed.
    Incomplete,
    /// The file header, this long.
    Header(usize),
    /// A tuple this long, and where its key field's value lies in it.
    Tuple(usize, Option<(usize, usize)>),
    /// The trailer (a field count of -1).
    Trailer,
    /// Not the format (a bad signature or length).
    Unreadable,
}

fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn binary_header_len(buf: &[u8]) -> Binary {
    if buf.len() < BINARY_HEADER {
        return Binary::Incomplete;
    }
    if &buf[..11] != BINARY_SIGNATURE {
        return Binary::Unreadable;
    }
    let Ok(extension) = usize::try_from(be_i32(&buf[15..19])) else {
        return Binary::Unreadable;
    };
    match BINARY_HEADER.checked_add(extension) {
        Some(n) if buf.len() >= n => Binary::Header(n),
        Some(_) => Binary::Incomplete,
        None => Binary::Unreadable,
    }
}

fn binary_tuple(buf: &[u8], key_index: usize) -> Binary {
    if buf.len() < 2 {
        return Binary::Incomplete;
    }
    let fields = match i16::from_be_bytes([buf[0], buf[1]]) {
        -1 => return Binary::Trailer,
        n if n < 0 => return Binary::Unreadable,
        n => n as usize,
    };
    let mut pos = 2;
    let mut key = None;
    for field in 0..fields {
        let Some(len) = buf.get(pos..pos + 4).map(be_i32) else {
            return Binary::Incomplete;
        };
        pos += 4;
        if len == -1 {
            continue; // NULL
        }
        // Postgres reads no field of 1 GiB or more (and fails the COPY); waiting for one
        // would only hold the bytes here.
        let Ok(len) = usize::try_from(len) else {
            return Binary::Unreadable;
        };
        if len >= MAX_FIELD {
            return Binary::Unreadable;
        }
        if buf.len() - pos < len {
            return Binary::Incomplete;
        }
        if field == key_index {
            key = Some((pos, pos + len));
        }
        pos += len;
    }
    Binary::Tuple(pos, key)
}

/// Where an (unescaped) `\.` starts in a text-format row.
fn text_end_marker(row: &[u8]) -> Option<usize> {
    let mut i = memchr::memchr(b'\\', row)?;
    while i + 1 < row.len() {
        if row[i] == b'\\' {
            if row[i + 1] == b'.' {
                return Some(i);
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    None
}

/// Text-format escapes: `\b \f \n \r \t \v`, octal `\ooo`, hex `\xhh`, else the character.
fn unescape_text(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' || i + 1 >= raw.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let c = raw[i + 1];
        i += 2;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                let mut n = 1;
                while n < 3 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                    v = v * 8 + u32::from(raw[i] - b'0');
                    i += 1;
                    n += 1;
                }
                out.push((v & 0xff) as u8);
            }
            b'x' if i < raw.len() && raw[i].is_ascii_hexdigit() => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                    v = v * 16 + (raw[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(format: CopyFormat, header: bool) -> CopyInfo {
        CopyInfo {
            from: true,
            columns: Vec::new(),
            format,
            delimiter: None,
            header,
            quote: None,
            escape: None,
            null: None,
            key_force_not_null: false,
            key_force_null: false,
            encoding: None,
        }
    }

    fn split(rows: &mut CopyRows, chunks: &[&[u8]]) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        let mut each = |l: CopyLine<'_>| match l {
            CopyLine::All(h) => {
                out.push((String::from_utf8_lossy(h).into_owned(), Some("*".into())))
            }
            CopyLine::Row(r, k) => out.push((
                String::from_utf8_lossy(r).into_owned(),
                k.map(|k| String::from_utf8_lossy(&k).into_owned()),
            )),
            CopyLine::Binary(t, k) => out.push((
                format!("{t:?}"),
                k.map(|k| String::from_utf8_lossy(k).into_owned()),
            )),
        };
        for c in chunks {
            rows.feed(c, &mut each).expect("row within the limit");
        }
        rows.finish(&mut each);
        out
    }

    /// CSV with quotes, doubled quotes, newlines in values and (with `escape`) escaped
    /// quotes: split into rows the same wherever the CopyData boundaries fall, also
    /// between an escape character and what it escapes.
    #[test]
    fn csv_rows_are_the_same_for_every_split() {
        let with_escape = |escape: Option<char>| CopyInfo {
            escape,
            ..info(CopyFormat::Csv, false)
        };
        let cases: [(Option<char>, &[u8], &[&str]); 3] = [
            (
                None,
                b"1,\"a\"\"b\"\n2,\"x\ny\"\"\"\n\"3\",\"\"\n4,\"\"\"\"\n",
                &["1", "2", "3", "4"],
            ),
            (
                Some('\\'),
                b"1,\"a\\\"b\"\n2,\"c\\\\\"\n3,\"d\\x\"\n\"4\",\"\\\"\n\"\n",
                &["1", "2", "3", "4"],
            ),
            (None, b"5,\"\"\n\"6\"\"\",z\n7", &["5", "6\"", "7"]),
        ];
        for (escape, data, keys) in cases {
            let whole = split(&mut CopyRows::new(&with_escape(escape), 0), &[data]);
            let got: Vec<_> = whole
                .iter()
                .map(|(_, k)| k.as_deref().unwrap_or(""))
                .collect();
            assert_eq!(got, keys, "{whole:?}");
            for at in 0..=data.len() {
                let (a, b) = data.split_at(at);
                let got = split(&mut CopyRows::new(&with_escape(escape), 0), &[a, b]);
                assert_eq!(got, whole, "split at {at}");
            }
            let bytes: Vec<&[u8]> = data.chunks(1).collect();
            let got = split(&mut CopyRows::new(&with_escape(escape), 0), &bytes);
            assert_eq!(got, whole, "byte by byte");
        }
    }

    /// Text format: a backslash quotes the byte after it, a raw newline too (one row, as
    /// Postgres reads it), wherever the CopyData boundaries fall.
    #[test]
    fn text_backslash_newline_stays_in_its_row() {
        let data: &[u8] = b"1\tab\\\ncd\n2\tx\\\\\n3\t\\\\\\\ny\n";
        let whole = split(
            &mut CopyRows::new(&info(CopyFormat::Text, false), 0),
            &[data],
        );
        let keys: Vec<_> = whole.iter().map(|(_, k)| k.clone()).collect();
        let s = |v: &str| Some(v.to_string());
        assert_eq!(keys, [s("1"), s("2"), s("3")], "{whole:?}");
        assert_eq!(whole[0].0, "1\tab\\\ncd\n");
        for at in 0..=data.len() {
            let (a, b) = data.split_at(at);
            let got = split(
                &mut CopyRows::new(&info(CopyFormat::Text, false), 0),
                &[a, b],
            );
            assert_eq!(got, whole, "split at {at}");
        }
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        let got = split(
            &mut CopyRows::new(&info(CopyFormat::Text, false), 0),
            &bytes,
        );
        assert_eq!(got, whole, "byte by byte");
    }

    /// Rows split the same for every pair of pieces and byte by byte, as `whole` says.
    fn same_for_every_split(
        format: CopyFormat,
        key: usize,
        data: &[u8],
    ) -> Vec<(String, Option<String>)> {
        let new = || CopyRows::new(&info(format, false), key);
        let whole = split(&mut new(), &[data]);
        for at in 0..=data.len() {
            let (a, b) = data.split_at(at);
            assert_eq!(split(&mut new(), &[a, b]), whole, "split at {at}");
        }
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(split(&mut new(), &bytes), whole, "byte by byte");
        whole
    }

    /// The first row's end says how rows end, as in Postgres: a bare `\r` (old Mac
    /// files) ends every row then; `\r\n` splits at the `\n`. Escaped or quoted, a `\r`
    /// is data.
    #[test]
    fn rows_ending_in_carriage_returns_split_as_postgres_splits_them() {
        let s = |v: &str| Some(v.to_string());
        let keys = |rows: &[(String, Option<String>)]| -> Vec<Option<String>> {
            rows.iter().map(|(_, k)| k.clone()).collect()
        };
        let got = same_for_every_split(CopyFormat::Text, 0, b"1\ta\r2\tb\\\rc\r3\tc\r");
        assert_eq!(keys(&got), [s("1"), s("2"), s("3")], "{got:?}");
        assert_eq!(got[1].0, "2\tb\\\rc\r");
        let got = same_for_every_split(CopyFormat::Text, 1, b"1\ta\r\n2\tb\r\n");
        assert_eq!(keys(&got), [s("a"), s("b")], "{got:?}");
        assert_eq!(got[0].0, "1\ta\r\n");
        let got = same_for_every_split(CopyFormat::Csv, 1, b"1,a\r2,\"b\rc\"\r3,c");
        assert_eq!(keys(&got), [s("a"), s("b\rc"), s("c")], "{got:?}");
        // An escaped `\r` right before the newline is data, not part of the line ending.
        let got = same_for_every_split(CopyFormat::Text, 1, b"1\tabc\\\r\n2\tx\n");
        assert_eq!(keys(&got), [s("abc\r"), s("x")], "{got:?}");
        // The first `\r` ends the data's only row.
        let got = same_for_every_split(CopyFormat::Text, 1, b"1\tabc\r");
        assert_eq!(keys(&got), [s("abc")], "{got:?}");
    }

    /// `\.` as the last bytes, with no line ending: a value in CSV; in text, every shard
    /// gets it and fails the COPY as Postgres does. With a line ending it ends the data.
    #[test]
    fn an_end_marker_without_a_line_ending_is_left_to_postgres() {
        let s = |v: &str| Some(v.to_string());
        let got = same_for_every_split(CopyFormat::Csv, 0, b"a\n\\.");
        assert_eq!(got, [("a\n".into(), s("a")), ("\\.".into(), s("\\."))]);
        let got = same_for_every_split(CopyFormat::Text, 0, b"a\n\\.");
        assert_eq!(got, [("a\n".into(), s("a")), ("\\.".into(), s("*"))]);
        let got = same_for_every_split(CopyFormat::Csv, 0, b"a\n\\.\nb\n");
        assert_eq!(got, [("a\n".into(), s("a"))]);
    }

    /// A row ending otherwise than the first fails the COPY, with Postgres's message:
    /// each shard would take the first row it gets as the rule and read the rows apart.
    #[test]
    fn a_row_ending_unlike_the_first_fails_the_copy() {
        let fails = |format: CopyFormat, data: &[u8]| -> BadData {
            let outcome = |chunks: &[&[u8]]| {
                let mut r = CopyRows::new(&info(format, false), 0);
                let mut each = |_: CopyLine<'_>| {};
                chunks
                    .iter()
                    .map(|c| r.feed(c, &mut each))
                    .find(Result::is_err)
                    .and_then(Result::err)
            };
            let whole = outcome(&[data]).expect("fails");
            for at in 0..=data.len() {
                let (a, b) = data.split_at(at);
                assert_eq!(outcome(&[a, b]).as_ref(), Some(&whole), "split at {at}");
            }
            whole
        };
        let text = |d: &[u8]| fails(CopyFormat::Text, d).to_string();
        let newline = "literal newline found in data";
        let ret = "literal carriage return found in data";
        assert_eq!(text(b"1\ta\r2\tb\n3\tc\n"), newline);
        assert_eq!(text(b"1\ta\n2\tb\r3\tc\n"), ret);
        assert_eq!(text(b"1\ta\r\n2\tb\n3\tc\n"), newline);
        assert_eq!(text(b"1\ta\r\n2\tb\r3\tc\r\n"), ret);
        let csv = fails(CopyFormat::Csv, b"1,a\r2,b\n3,c\n");
        assert_eq!(csv.to_string(), "unquoted newline found in data");
        assert_eq!(csv.sqlstate(), "22P04");
    }

    /// Text format: `\.` ends the data in mid-line too; what is before it on that line is
    /// the last row, read for its key without the marker.
    #[test]
    fn text_end_marker_in_mid_line_ends_the_data() {
        let s = |v: &str| Some(v.to_string());
        let got = same_for_every_split(CopyFormat::Text, 1, b"1\ta\n2\tb\\.\n3\tc\n");
        assert_eq!(
            got,
            [("1\ta\n".into(), s("a")), ("2\tb\\.\n".into(), s("b"))]
        );
        // An escaped backslash before a dot is data.
        let got = same_for_every_split(CopyFormat::Text, 1, b"1\ta\\\\.\n2\tb\n");
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].1, s("a\\."));
        // CSV: only a line of its own.
        let got = same_for_every_split(CopyFormat::Csv, 1, b"1,a\\.\n2,b\n");
        assert_eq!(got.len(), 2, "{got:?}");
    }

    /// A row that does not end within `max_row` bytes fails the COPY rather than being
    /// held without bound; rows of any length that end within one piece are never held.
    #[test]
    fn rows_waiting_for_their_end_are_capped() {
        for format in [CopyFormat::Text, CopyFormat::Csv] {
            let mut r = CopyRows::new(&info(format, false), 0);
            r.max_row = 16;
            let mut rows = 0;
            let mut each = |_: CopyLine<'_>| rows += 1;
            let long = [b'7'; 40];
            let mut whole = long.to_vec();
            whole.push(b'\n');
            assert_eq!(r.feed(&whole, &mut each), Ok(()));
            assert_eq!(r.feed(b"1234567890", &mut each), Ok(()));
            assert_eq!(r.feed(b"123456\n", &mut each), Ok(()));
            assert_eq!(r.feed(b"12345678", &mut each), Ok(()));
            assert_eq!(r.feed(b"123456789", &mut each), Err(BadData::RowTooLong));
            assert_eq!(rows, 2, "{format:?}");
        }
        let mut r = CopyRows::new(&info(CopyFormat::Binary, false), 0);
        r.max_row = 80;
        let mut each = |_: CopyLine<'_>| {};
        let mut data = BINARY_SIGNATURE.to_vec();
        data.extend_from_slice(&[0; 8]);
        data.extend_from_slice(&1i16.to_be_bytes());
        data.extend_from_slice(&100i32.to_be_bytes());
        data.extend_from_slice(&[b'x'; 60]);
        assert_eq!(r.feed(&data, &mut each), Ok(()));
        assert_eq!(r.feed(&[b'x'; 10], &mut each), Ok(()));
        assert_eq!(r.feed(&[b'x'; 10], &mut each), Err(BadData::RowTooLong));
    }

    #[test]
    fn text_rows_split_anywhere_with_escapes_and_nulls() {
        let mut r = CopyRows::new(&info(CopyFormat::Text, false), 1);
        let got = split(
            &mut r,
            &[
                b"1\ta\\tb\tx\n2\t",
                b"\\N\ty\n3\t\\101\\x42\tz",
                b"\n\\.\n9\tq\n",
            ],
        );
        assert_eq!(
            got,
            vec![
                ("1\ta\\tb\tx\n".into(), Some("a\tb".into())),
                ("2\t\\N\ty\n".into(), None),
                ("3\t\\101\\x42\tz\n".into(), Some("AB".into())),
            ]
        );
    }

    #[test]
    fn csv_rows_keep_quoted_newlines_and_header() {
        let mut r = CopyRows::new(&info(CopyFormat::Csv, true), 0);
        let got = split(
            &mut r,
            &[
                b"id,body\n\"4\",\"multi\nline, \"\"q\"\"\"\n",
                b"5,plain\n,empty\n\"\",x",
            ],
        );
        assert_eq!(
            got,
            vec![
                ("id,body\n".into(), Some("*".into())),
                (
                    "\"4\",\"multi\nline, \"\"q\"\"\"\n".into(),
                    Some("4".into())
                ),
                ("5,plain\n".into(), Some("5".into())),
                (",empty\n".into(), None),
                ("\"\",x".into(), Some("".into())),
            ]
        );
    }

    /// `FORCE_NOT_NULL`/`FORCE_NULL` of the key column change which fields are NULL, as
    /// on Postgres; other columns' options do not matter here.
    #[test]
    fn csv_force_options_on_the_key_column() {
        let data: &[&[u8]] = &[b",a\n\"\",b\nNA,c\n\"NA\",d\n"];
        let keys = |fnn: bool, fnull: bool, null: Option<&str>| -> Vec<Option<String>> {
            let info = CopyInfo {
                null: null.map(str::to_string),
                key_force_not_null: fnn,
                key_force_null: fnull,
                ..info(CopyFormat::Csv, false)
            };
            split(&mut CopyRows::new(&info, 0), data)
                .into_iter()
                .map(|(_, k)| k)
                .collect()
        };
        let s = |v: &str| Some(v.to_string());
        assert_eq!(keys(false, false, None), [None, s(""), s("NA"), s("NA")]);
        assert_eq!(keys(true, false, None), [s(""), s(""), s("NA"), s("NA")]);
        assert_eq!(keys(false, true, None), [None, None, s("NA"), s("NA")]);
        assert_eq!(keys(true, true, None), [s(""), None, s("NA"), s("NA")]);
        assert_eq!(
            keys(false, false, Some("NA")),
            [s(""), s(""), None, s("NA")]
        );
        assert_eq!(keys(true, true, Some("NA")), [s(""), s(""), s("NA"), None]);
    }

    /// Binary COPY (asyncpg's copy_records_to_table): the header and trailer go to every
    /// shard, each tuple with its key field as sent, whatever the CopyData boundaries.
    #[test]
    fn binary_tuples_split_anywhere() {
        let mut data = Vec::new();
        data.extend_from_slice(BINARY_SIGNATURE);
        data.extend_from_slice(&0i32.to_be_bytes()); // flags
        data.extend_from_slice(&2i32.to_be_bytes()); // header extension: 2 bytes
        data.extend_from_slice(b"xy");
        let header_len = data.len();
        let tuple = |key: Option<&[u8]>, body: &[u8]| {
            let mut t = 2i16.to_be_bytes().to_vec();
            for f in [key, Some(body)] {
                match f {
                    Some(v) => {
                        t.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        t.extend_from_slice(v);
                    }
                    None => t.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
            t
        };
        let t1 = tuple(Some(b"k1"), b"first");
        let t2 = tuple(None, b"");
        data.extend_from_slice(&t1);
        data.extend_from_slice(&t2);
        data.extend_from_slice(&(-1i16).to_be_bytes());
        let whole = |r: &mut CopyRows, chunks: &[&[u8]]| split(r, chunks);
        let expected = vec![
            (
                String::from_utf8_lossy(&data[..header_len]).into_owned(),
                Some("*".into()),
            ),
            (format!("{t1:?}"), Some("k1".into())),
            (format!("{t2:?}"), None),
            ("\u{fffd}\u{fffd}".to_string(), Some("*".into())),
        ];
        // In one piece, and one byte at a time.
        let mut r = CopyRows::new(&info(CopyFormat::Binary, false), 0);
        assert_eq!(whole(&mut r, &[&data]), expected);
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        let mut r = CopyRows::new(&info(CopyFormat::Binary, false), 0);
        assert_eq!(whole(&mut r, &bytes), expected);
        // A bad signature: everything to every shard, for the servers to reject.
        let mut r = CopyRows::new(&info(CopyFormat::Binary, false), 0);
        let bad = [b"PGCOPY\n\xff\r\n\x01".as_slice(), &[0u8; 8]].concat();
        let got = whole(&mut r, &[&bad]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.as_deref(), Some("*"));
        // A field declared 2 GiB long: not waited for, sent on for the servers to reject.
        let mut r = CopyRows::new(&info(CopyFormat::Binary, false), 0);
        let mut huge = data[..header_len].to_vec();
        huge.extend_from_slice(&1i16.to_be_bytes());
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        huge.extend_from_slice(b"a few bytes");
        let got = whole(&mut r, &[&huge]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].1.as_deref(), Some("*"));
        // Cut off mid-tuple: the piece still goes to every shard.
        let mut r = CopyRows::new(&info(CopyFormat::Binary, false), 0);
        let got = whole(&mut r, &[&data[..header_len + 5]]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].1.as_deref(), Some("*"));
    }
}
