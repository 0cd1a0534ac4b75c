//! A client's session settings, as statements that recreate them on any server connection.
//!
//! Settings are immutable and shared (`Arc`): clients of one application usually carry the
//! same ones, and comparing a connection's settings with a client's is then a pointer or
//! hash comparison on the hot path.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use shardgate_router::{is_parse_time_setting, SettingChange, TextReading, NOT_RESET_BY_ALL};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// (lower-case name, SQL value text), sorted by name.
    entries: Vec<(String, String)>,
    hash: u64,
    /// A hash of the entries Postgres reads when it parses a statement
    /// (`PARSE_TIME_SETTINGS`); 0 when there are none. Clients share a server-side
    /// prepared statement only when this is the same.
    parse_key: u64,
}

/// The ParameterStatus values a client has seen (as its servers reported them), and how
/// they say to read its text: `client_encoding` and `standard_conforming_strings` are
/// reported on every change, however made (SET, SET LOCAL and its end, `set_config`, a
/// function, a role's default), so this is what the server reads the client's text as.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reported {
    params: Vec<(String, String)>,
    reading: TextReading,
}

impl Reported {
    pub fn new(params: Vec<(String, String)>) -> Reported {
        let mut r = Reported {
            params,
            reading: TextReading::default(),
        };
        r.reread();
        r
    }

    /// Every (name, value), in the order the server reported them.
    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    pub fn reading(&self) -> TextReading {
        self.reading
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        let (_, v) = self.params.iter().find(|(n, _)| n == name)?;
        Some(v)
    }

    /// Whether the client has seen this value.
    pub fn has(&self, name: &[u8], value: &[u8]) -> bool {
        self.params
            .iter()
            .any(|(n, v)| n.as_bytes() == name && v.as_bytes() == value)
    }

    pub fn set(&mut self, name: String, value: String) {
        let reading = matches!(
            name.as_str(),
            "client_encoding" | "standard_conforming_strings"
        );
        match self.params.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => *v = value,
            None => self.params.push((name, value)),
        }
        if reading {
            self.reread();
        }
    }

    fn reread(&mut self) {
        self.reading = TextReading::new(
            self.get("client_encoding"),
            self.get("standard_conforming_strings"),
        );
    }
}

/// A setting's SQL value text as plain text (quotes removed).
fn unquote(v: &str) -> String {
    match v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        Some(inner) => inner.replace("''", "'"),
        None => v.to_string(),
    }
}

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

impl Settings {
    pub fn empty() -> Arc<Settings> {
        static EMPTY: OnceLock<Arc<Settings>> = OnceLock::new();
        EMPTY
            .get_or_init(|| Arc::new(Settings::new(Vec::new())))
            .clone()
    }

    fn new(mut entries: Vec<(String, String)>) -> Settings {
        entries.sort();
        entries.dedup_by(|a, b| a.0 == b.0);
        let mut h = DefaultHasher::new();
        entries.hash(&mut h);
        let mut parse = DefaultHasher::new();
        let mut any = false;
        for entry in entries.iter().filter(|(n, _)| is_parse_time_setting(n)) {
            entry.hash(&mut parse);
            any = true;
        }
        Settings {
            entries,
            hash: h.finish(),
            parse_key: if any { parse.finish() | 1 } else { 0 },
        }
    }

    /// The value of a setting as plain text (quotes removed), if the session set it.
    pub fn get(&self, name: &str) -> Option<String> {
        let (_, v) = self.entries.iter().find(|(n, _)| n == name)?;
        Some(unquote(v))
    }

    /// Settings a client asked for in its StartupMessage, including `-c name=value` pairs in
    /// `options`. Later values win, as on a real server.
    pub fn from_startup(params: &[(String, String)]) -> Settings {
        let mut entries: Vec<(String, String)> = Vec::new();
        let mut put = |name: &str, value: &str| {
            let name = name.to_ascii_lowercase();
            if !valid_name(&name) {
                return;
            }
            entries.retain(|(n, _)| *n != name);
            entries.push((name, quote_literal(value)));
        };
        for (name, value) in params {
            if name == "options" {
                for (n, v) in parse_options(value) {
                    put(&n, &v);
                }
            } else if !NOT_SETTINGS.contains(&name.as_str()) {
                put(name, value);
            }
        }
        Settings::new(entries)
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn parse_key(&self) -> u64 {
        self.parse_key
    }

    #[cfg(test)]
    fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    /// These settings after `changes`.
    pub fn apply(&self, changes: &[SettingChange]) -> Settings {
        let mut entries = self.entries.clone();
        for change in changes {
            match change {
                SettingChange::Set { name, value } => {
                    entries.retain(|(n, _)| n != name);
                    entries.push((name.clone(), value.clone()));
                }
                SettingChange::Reset { name } => entries.retain(|(n, _)| n != name),
                // RESET ALL leaves the role and the session authorization as they are.
                SettingChange::ResetAll => {
                    entries.retain(|(n, _)| NOT_RESET_BY_ALL.contains(&n.as_str()))
                }
            }
        }
        Settings::new(entries)
    }

    /// The SQL messages (simple Queries, in order) that take a connection carrying `from`
    /// (`None`: unknown) to `self`; none when nothing needs to change.
    ///
    /// Postgres converts a Query's text from the client_encoding the connection has when
    /// the message arrives. Values are kept as UTF-8 text (a session in another encoding
    /// that sets a non-ASCII value keeps its connection instead, see `effects_of`), so when
    /// one is not ASCII the first message ends by setting client_encoding to UTF8 and the
    /// second sets the values, then the client's own client_encoding.
    pub fn sync_sql(&self, from: Option<&Settings>) -> Vec<String> {
        const ENCODING: &str = "client_encoding";
        let (mut head, mut body) = (String::new(), String::new());
        let mut put = |name: &str, sql: String| {
            if name == ENCODING {
                head.push_str(&sql);
            } else {
                body.push_str(&sql);
            }
        };
        let mut resets = String::new();
        match from {
            Some(from) if from == self => return Vec::new(),
            Some(from) => {
                for (name, _) in &from.entries {
                    if !self.entries.iter().any(|(n, _)| n == name) {
                        put(name, format!("RESET {name};"));
                    }
                }
                for (name, value) in &self.entries {
                    if !from.entries.iter().any(|(n, v)| n == name && v == value) {
                        put(name, format!("SET {name} = {value};"));
                    }
                }
            }
            None => {
                // RESET ALL alone would leave a role another client set (SET ROLE).
                resets.push_str("RESET SESSION AUTHORIZATION;RESET ROLE;RESET ALL;");
                for (name, value) in &self.entries {
                    put(name, format!("SET {name} = {value};"));
                }
            }
        }
        if body.is_ascii() {
            let all = resets + &head + &body;
            return if all.is_empty() {
                Vec::new()
            } else {
                vec![all]
            };
        }
        let own = match self.entries.iter().find(|(n, _)| n == ENCODING) {
            Some((_, v)) => format!("SET {ENCODING} = {v};"),
            None => format!("RESET {ENCODING};"),
        };
        vec![resets + "SET client_encoding = 'UTF8';", body + &own]
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.ends_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// `-c name=value`, `-cname=value` and `--name=value` from the `options` parameter;
/// `\ ` escapes a space.
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let pair = if w == "-c" {
            it.next()
        } else {
            w.strip_prefix("--")
                .or_else(|| w.strip_prefix("-c"))
                .map(str::to_string)
        };
        if let Some((n, v)) = pair.as_deref().and_then(|p| p.split_once('=')) {
            out.push((n.replace('-', "_"), v.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(pairs: &[(&str, &str)]) -> Settings {
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        Settings::from_startup(&v)
    }

    #[test]
    fn startup_params_become_quoted_settings() {
        let s = startup(&[
            ("user", "app"),
            ("database", "app"),
            ("application_name", "it's"),
            ("DateStyle", "ISO"),
            (
                "options",
                "-c statement_timeout=5s --work-mem=1MB -cfoo.bar=x\\ y",
            ),
        ]);
        assert_eq!(
            s.entries(),
            &[
                ("application_name".into(), "'it''s'".into()),
                ("datestyle".into(), "'ISO'".into()),
                ("foo.bar".into(), "'x y'".into()),
                ("statement_timeout".into(), "'5s'".into()),
                ("work_mem".into(), "'1MB'".into()),
            ]
        );
    }

    #[test]
    fn sync_sql_goes_from_any_state_to_the_wanted_one() {
        let a = Settings::empty().apply(&[SettingChange::Set {
            name: "search_path".into(),
            value: "x".into(),
        }]);
        let b = Settings::empty().apply(&[SettingChange::Set {
            name: "statement_timeout".into(),
            value: "1".into(),
        }]);
        assert!(a.sync_sql(Some(&a)).is_empty());
        assert_eq!(
            b.sync_sql(Some(&a)),
            ["RESET search_path;SET statement_timeout = 1;"]
        );
        assert_eq!(Settings::empty().sync_sql(Some(&a)), ["RESET search_path;"]);
        assert_eq!(
            a.sync_sql(None),
            ["RESET SESSION AUTHORIZATION;RESET ROLE;RESET ALL;SET search_path = x;"]
        );
        // Values that are not ASCII (kept as UTF-8) arrive in a message of their own, read
        // as UTF8; the client's own client_encoding follows them. ASCII values share one
        // message.
        let set = |name: &str, value: &str| SettingChange::Set {
            name: name.into(),
            value: value.into(),
        };
        let latin = Settings::empty().apply(&[set("client_encoding", "'LATIN1'")]);
        let cafe = Settings::empty().apply(&[set("application_name", "'café'")]);
        assert_eq!(
            cafe.sync_sql(Some(&latin)),
            [
                "SET client_encoding = 'UTF8';",
                "SET application_name = 'café';RESET client_encoding;"
            ]
        );
        assert_eq!(
            cafe.sync_sql(None),
            [
                "RESET SESSION AUTHORIZATION;RESET ROLE;RESET ALL;SET client_encoding = 'UTF8';",
                "SET application_name = 'café';RESET client_encoding;"
            ]
        );
        let latin_cafe = latin.apply(&[set("search_path", "'café'")]);
        for from in [Some(&latin), Some(&cafe), None] {
            let sql = latin_cafe.sync_sql(from);
            assert_eq!(sql.len(), 2, "{from:?}");
            assert!(sql[0].ends_with("SET client_encoding = 'UTF8';"), "{sql:?}");
            assert!(
                sql[1].ends_with("SET search_path = 'café';SET client_encoding = 'LATIN1';"),
                "{sql:?}"
            );
        }
        assert_eq!(
            b.sync_sql(Some(&latin)),
            ["RESET client_encoding;SET statement_timeout = 1;"]
        );
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.apply(&[SettingChange::ResetAll]), *Settings::empty());
        // RESET ALL keeps a role, as the server does; RESET ROLE ends it.
        let role = SettingChange::Set {
            name: "role".into(),
            value: "reader".into(),
        };
        let r = a.apply(&[role, SettingChange::ResetAll]);
        assert_eq!(r.get("role").as_deref(), Some("reader"));
        assert_eq!(r.get("search_path"), None);
        let reset_role = SettingChange::Reset {
            name: "role".into(),
        };
        assert_eq!(r.apply(&[reset_role]), *Settings::empty());
    }

    #[test]
    fn only_parse_time_settings_make_the_parse_key() {
        let set = |name: &str, value: &str| SettingChange::Set {
            name: name.into(),
            value: value.into(),
        };
        assert_eq!(Settings::empty().parse_key(), 0);
        let run_only = Settings::empty().apply(&[
            set("statement_timeout", "1"),
            set("application_name", "'a'"),
            set("app.tenant", "'7'"),
        ]);
        assert_eq!(run_only.parse_key(), 0);
        let tokyo = Settings::empty().apply(&[set("timezone", "'Asia/Tokyo'")]);
        let york = Settings::empty().apply(&[set("timezone", "'America/New_York'")]);
        assert_ne!(tokyo.parse_key(), 0);
        assert_ne!(tokyo.parse_key(), york.parse_key());
        // Settings read only when a statement runs do not split statements apart.
        let tokyo_app = tokyo.apply(&[set("application_name", "'b'")]);
        assert_eq!(tokyo_app.parse_key(), tokyo.parse_key());
        assert_ne!(tokyo_app.hash(), tokyo.hash());
        let path = Settings::empty().apply(&[set("search_path", "tenant_a")]);
        assert_ne!(path.parse_key(), tokyo.parse_key());
        // From a StartupMessage too (JDBC sends TimeZone and DateStyle).
        let jdbc = startup(&[("TimeZone", "Asia/Tokyo"), ("extra_float_digits", "3")]);
        assert_eq!(jdbc.parse_key(), tokyo.parse_key());
    }

    #[test]
    fn reported_parameters_say_how_to_read_text() {
        use shardgate_router::ClientEncoding;
        let mut r = Reported::new(vec![
            ("client_encoding".into(), "UTF8".into()),
            ("standard_conforming_strings".into(), "on".into()),
        ]);
        assert_eq!(r.reading().encoding, ClientEncoding::Utf8);
        assert!(!r.reading().legacy_strings);
        assert!(r.has(b"client_encoding", b"UTF8"));
        r.set("client_encoding".into(), "LATIN1".into());
        assert_eq!(r.reading().encoding, ClientEncoding::Latin1);
        assert!(!r.has(b"client_encoding", b"UTF8"));
        r.set("standard_conforming_strings".into(), "off".into());
        assert!(r.reading().legacy_strings);
        r.set("application_name".into(), "x".into());
        assert_eq!(r.get("application_name"), Some("x"));
        assert_eq!(r.reading().encoding, ClientEncoding::Latin1);
    }
}
