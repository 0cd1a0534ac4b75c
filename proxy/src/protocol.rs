//! The Postgres wire format as the data path needs it: a frame splitter that looks only at
//! the 5-byte header, readers for the few message bodies shardgate inspects, and writers
//! for the messages shardgate sends itself. Everything else is forwarded as bytes.

use bytes::{BufMut, BytesMut};

/// Protocol 3.0 in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// Startup packets are small; anything larger is garbage or an attack.
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// SQLSTATE codes shardgate raises itself.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const UNKNOWN_DATABASE: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const DUPLICATE_PSTATEMENT: &str = "42P05";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const QUERY_CANCELED: &str = "57014";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const CONFIG_FILE_ERROR: &str = "F0000";
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {0}")]
    BadLength(u32),
    #[error("message of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
}

/// Length of the complete message at the front of `buf` (tag included), `None` when more
/// bytes are needed.
#[inline]
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(len));
    }
    let total = 1 + len as usize;
    if total > max {
        return Err(FrameError::TooLarge(total, max));
    }
    Ok((buf.len() >= total).then_some(total))
}

/// A reader over a message body (the bytes after tag and length).
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        Reader { buf: body, pos: 0 }
    }
    pub fn cstr(&mut self) -> Option<&'a [u8]> {
        let rest = self.buf.get(self.pos..)?;
        // Statement and portal names are mostly empty or short: a plain scan of the first
        // bytes costs less than memchr's set-up; long strings (query text) go to memchr.
        const SHORT: usize = 16;
        let end = match rest.iter().take(SHORT).position(|&b| b == 0) {
            Some(end) => end,
            None if rest.len() <= SHORT => return None,
            None => SHORT + memchr::memchr(0, &rest[SHORT..])?,
        };
        self.pos += end + 1;
        Some(&rest[..end])
    }
    pub fn i32(&mut self) -> Option<i32> {
        let b = self.buf.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn i16(&mut self) -> Option<i16> {
        let b = self.buf.get(self.pos..self.pos + 2)?;
        self.pos += 2;
        Some(i16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u8(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let b = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(b)
    }
    pub fn position(&self) -> usize {
        self.pos
    }
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
}

/// The body of a message: everything after the 5-byte header.
#[inline]
pub fn body(msg: &[u8]) -> &[u8] {
    &msg[5..]
}

/// Writes a message with `tag`, letting `f` fill the body, and patches the length.
#[inline]
pub fn write_msg(buf: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    f(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

/// Every error shardgate raises itself goes through here, so this is where it is counted.
pub fn error_response(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    crate::metrics::count_error(code);
    write_msg(buf, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_bytes());
        b.put_u8(b'V');
        put_cstr(b, severity.as_bytes());
        b.put_u8(b'C');
        put_cstr(b, code.as_bytes());
        b.put_u8(b'M');
        put_cstr(b, message.as_bytes());
        b.put_u8(0);
    });
}

/// A NoticeResponse (severity NOTICE, SQLSTATE 00000).
pub fn notice(buf: &mut BytesMut, message: &str) {
    write_msg(buf, b'N', |b| {
        for (field, value) in [(b'S', "NOTICE"), (b'V', "NOTICE"), (b'C', "00000")] {
            b.put_u8(field);
            put_cstr(b, value.as_bytes());
        }
        b.put_u8(b'M');
        put_cstr(b, message.as_bytes());
        b.put_u8(0);
    });
}

/// A standalone FATAL error, for paths that close the connection right after.
pub fn fatal(code: &str, message: &str) -> BytesMut {
    let mut b = BytesMut::with_capacity(64 + message.len());
    error_response(&mut b, "FATAL", code, message);
    b
}

pub fn parameter_status(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    write_msg(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    write_msg(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    write_msg(buf, b'Z', |b| b.put_u8(status));
}

pub fn auth_request(buf: &mut BytesMut, code: i32, data: &[u8]) {
    write_msg(buf, b'R', |b| {
        b.put_i32(code);
        b.put_slice(data);
    });
}

/// A result set of text columns, as the admin console sends it.
pub fn text_rows(buf: &mut BytesMut, columns: &[&str], rows: &[Vec<String>], tag: &str) {
    write_msg(buf, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for c in columns {
            put_cstr(b, c.as_bytes());
            b.put_i32(0); // table oid
            b.put_i16(0); // column number
            b.put_i32(25); // text
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0); // text format
        }
    });
    for row in rows {
        write_msg(buf, b'D', |b| {
            b.put_i16(row.len() as i16);
            for v in row {
                b.put_i32(v.len() as i32);
                b.put_slice(v.as_bytes());
            }
        });
    }
    command_complete(buf, tag);
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    write_msg(buf, b'C', |b| put_cstr(b, tag.as_bytes()));
}

pub fn empty_msg(buf: &mut BytesMut, tag: u8) {
    buf.put_u8(tag);
    buf.put_i32(4);
}

/// Whole ParseComplete and CloseComplete messages (what `empty_msg` writes), for replies
/// shardgate queues as `Bytes` without allocating.
pub const PARSE_COMPLETE: &[u8] = &[b'1', 0, 0, 0, 4];
pub const CLOSE_COMPLETE: &[u8] = &[b'3', 0, 0, 0, 4];

pub fn query(buf: &mut BytesMut, sql: &str) {
    query_bytes(buf, sql.as_bytes());
}

/// A Query of text in the client's encoding (not necessarily UTF-8).
pub fn query_bytes(buf: &mut BytesMut, sql: &[u8]) {
    write_msg(buf, b'Q', |b| put_cstr(b, sql));
}

/// Fields of an ErrorResponse or NoticeResponse body.
pub struct ErrorFields<'a> {
    pub severity: &'a [u8],
    pub code: &'a [u8],
    pub message: &'a [u8],
    /// The server function that raised it (`R`): untranslated, unlike the message.
    pub routine: &'a [u8],
}

pub fn parse_error_fields(body: &[u8]) -> ErrorFields<'_> {
    let mut f = ErrorFields {
        severity: b"",
        code: b"",
        message: b"",
        routine: b"",
    };
    let mut r = Reader::new(body);
    while let Some(kind) = r.u8() {
        if kind == 0 {
            break;
        }
        let Some(value) = r.cstr() else { break };
        match kind {
            b'S' => f.severity = value,
            b'C' => f.code = value,
            b'M' => f.message = value,
            b'R' => f.routine = value,
            _ => {}
        }
    }
    f
}

/// A client's StartupMessage parameters, in the order sent.
#[derive(Debug, Default, Clone)]
pub struct StartupParams(pub Vec<(String, String)>);

impl StartupParams {
    pub fn parse(body: &[u8]) -> Option<StartupParams> {
        let mut r = Reader::new(body);
        let mut params = Vec::new();
        loop {
            let key = r.cstr()?;
            if key.is_empty() {
                break;
            }
            let value = r.cstr()?;
            params.push((
                String::from_utf8_lossy(key).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ));
        }
        Some(StartupParams(params))
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The short-string scan and memchr must agree wherever the NUL is: before, at and
    /// after the 16-byte boundary, and nowhere.
    #[test]
    fn cstr_finds_the_first_nul_at_any_length() {
        for len in 0..40 {
            for nul_at in (0..len).map(Some).chain([None]) {
                let mut buf = vec![b'x'; len];
                if let Some(i) = nul_at {
                    buf[i] = 0;
                }
                buf.extend_from_slice(b"tail\0");
                // The "tail\0" after a missing NUL terminates the string there instead.
                let (want, next) = match nul_at {
                    Some(i) => (vec![b'x'; i], i + 1),
                    None => ([vec![b'x'; len], b"tail".to_vec()].concat(), buf.len()),
                };
                let mut r = Reader::new(&buf);
                assert_eq!(r.cstr(), Some(&want[..]), "len {len}, NUL at {nul_at:?}");
                assert_eq!(r.position(), next, "len {len}, NUL at {nul_at:?}");
            }
            let unterminated = vec![b'x'; len];
            assert_eq!(Reader::new(&unterminated).cstr(), None, "len {len}");
        }
        let mut r = Reader::new(b"a\0");
        assert_eq!(r.cstr(), Some(&b"a"[..]));
        assert_eq!(r.cstr(), None, "nothing left");
    }

    #[test]
    fn frames_need_header_and_body() {
        assert_eq!(frame_len(b"Q\0\0", 100), Ok(None));
        assert_eq!(frame_len(b"Q\0\0\0\x05", 100), Ok(None));
        assert_eq!(frame_len(b"Q\0\0\0\x05x", 100), Ok(Some(6)));
        assert_eq!(frame_len(b"Q\0\0\0\x05xy", 100), Ok(Some(6)));
        assert_eq!(
            frame_len(b"Q\0\0\0\x03", 100),
            Err(FrameError::BadLength(3))
        );
        assert_eq!(
            frame_len(b"Q\x7f\xff\xff\xff", 100),
            Err(FrameError::TooLarge(0x8000_0000, 100))
        );
    }

    #[test]
    fn error_response_round_trips() {
        let mut b = BytesMut::new();
        error_response(&mut b, "ERROR", "0A000", "nope");
        assert_eq!(frame_len(&b, 1000), Ok(Some(b.len())));
        let f = parse_error_fields(body(&b));
        assert_eq!(f.code, b"0A000");
        assert_eq!(f.message, b"nope");
        assert_eq!(f.severity, b"ERROR");
    }

    #[test]
    fn reader_stops_at_truncation() {
        let mut r = Reader::new(b"ab");
        assert_eq!(r.cstr(), None);
        assert_eq!(r.i32(), None);
        assert_eq!(r.bytes(usize::MAX), None);
        assert!(StartupParams::parse(b"user\0bob").is_none());
        let p = StartupParams::parse(b"user\0bob\0database\0app\0\0").unwrap();
        assert_eq!(p.get("database"), Some("app"));
    }
}
