//! Where a sharded database's statements go: the router's plan (cached per text) resolved
//! against the shard map with this execution's key values.
//!
//! One `Routing` per database with more than one shard or with sharded tables; a database
//! with neither never builds one and its sessions skip all of this.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use shardgate_config::{Database, KeyColumnType};
use shardgate_router::{
    Catalog, ClientEncoding, KeyExpr, KeyType as RouterKeyType, KeyValue as RouterKey, Kind, Plan,
    PlanCache, Refusal, SimplePlan, Target, TextReading, Unreadable,
};
use shardgate_shardmap::{KeyType, KeyValue, ShardMap, ShardSpec};

use crate::moves::ShardState;

use crate::protocol::Reader;

pub struct Routing {
    pub database: String,
    pub catalog: Catalog,
    /// The live map, the cut-over gate and the per-slot counters (shared across reloads).
    pub state: Arc<ShardState>,
    pub two_phase_commit: bool,
    /// A table, key column or function of the config is named with non-ASCII characters.
    non_ascii_names: bool,
    cache: Mutex<PlanCache>,
}

/// How many of the hottest slots are reported (bounded metric cardinality).
pub const HOT_SLOTS: usize = 20;

/// Plans kept per database (texts and shapes).
const PLAN_CACHE_ENTRIES: usize = 10_000;

impl Routing {
    /// `None` for a database that needs no routing (one shard, nothing sharded).
    pub fn build(
        db: &Database,
        config_dir: &std::path::Path,
        process: &crate::app::Process,
    ) -> Result<Option<Routing>, String> {
        if db.shards.len() < 2 && db.sharded_tables.is_empty() {
            return Ok(None);
        }
        let mut catalog = Catalog::new();
        for t in &db.sharded_tables {
            let ty = match t.key_type {
                KeyColumnType::Smallint | KeyColumnType::Integer | KeyColumnType::Bigint => {
                    RouterKeyType::Int
                }
                KeyColumnType::Text | KeyColumnType::Varchar => RouterKeyType::Text,
                KeyColumnType::Uuid => RouterKeyType::Uuid,
            };
            catalog = catalog.with_sharded(&t.name, &t.column, ty);
        }
        for t in &db.reference_tables {
            catalog = catalog.with_reference(t);
        }
        for f in &db.write_functions {
            catalog = catalog.with_write_function(f);
        }
        let map_path = db.shard_map.as_ref().map(|p| config_dir.join(p));
        let map = match &map_path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                ShardMap::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => {
                let specs = vec![ShardSpec::default(); db.shards.len()];
                ShardMap::initial_contiguous(&specs, db.slots)
                    .map_err(|e| format!("database \"{}\": {e}", db.name))?
            }
        };
        if map.shards() as usize != db.shards.len() {
            return Err(format!(
                "database \"{}\": the shard map has {} shards but the config lists {}",
                db.name,
                map.shards(),
                db.shards.len()
            ));
        }
        let state = process.adopt_shard_state(&db.name, map, map_path);
        let non_ascii_names = db
            .sharded_tables
            .iter()
            .flat_map(|t| [&t.name, &t.column])
            .chain(&db.reference_tables)
            .chain(&db.write_functions)
            .any(|n| !n.is_ascii());
        Ok(Some(Routing {
            database: db.name.clone(),
            catalog,
            state,
            two_phase_commit: db.two_phase_commit,
            non_ascii_names,
            cache: Mutex::new(PlanCache::new(PLAN_CACHE_ENTRIES)),
        }))
    }

    pub fn shards(&self) -> usize {
        self.state.shard_count() as usize
    }

    /// The text to plan for a statement's bytes (see [`TextReading::statement_text`]). In
    /// an encoding read through placeholders, a non-ASCII name cannot be matched against
    /// the config's: refused when the config has such names.
    pub fn statement_text<'a>(
        &self,
        bytes: &'a [u8],
        reading: TextReading,
    ) -> Result<Cow<'a, str>, Unreadable> {
        let text = reading.statement_text(bytes)?;
        if self.non_ascii_names && reading.stands_in(&text) {
            return Err(Unreadable::Refused(Refusal::unsupported(
                "this database has tables or columns named with non-ASCII characters, which \
                 shardgate matches only in UTF8 and LATIN1 sessions; set client_encoding to \
                 UTF8",
            )));
        }
        Ok(text)
    }

    /// The map version to route with now.
    pub fn map(&self) -> Arc<ShardMap> {
        self.state.map()
    }

    /// The plan of an exact text (extended protocol).
    pub fn plan(&self, sql: &str) -> Arc<Plan> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.plan(sql, &self.catalog)
    }

    /// The plan of a simple-protocol text, with its constants.
    pub fn plan_simple(&self, sql: &str) -> SimplePlan {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.plan_simple(sql, &self.catalog)
    }

    /// The plan of a text under the session's `SET shardgate.shard_key` (not cached: the
    /// hint is rare and per session).
    pub fn plan_hinted(&self, sql: &str, key: &str) -> Arc<Plan> {
        let hint = shardgate_router::Hint {
            key: Some(key.to_string()),
            ..Default::default()
        };
        Arc::new(shardgate_router::plan_with_hint(
            sql,
            &self.catalog,
            Some(&hint),
        ))
    }

    /// The statements of a multi-statement text that may run one by one (not cached:
    /// asked only when the text as a whole would be refused for spanning shards).
    pub fn separate(&self, sql: &str) -> Option<Vec<(std::ops::Range<usize>, Plan)>> {
        shardgate_router::separate_statements(sql, &self.catalog)
    }

    fn shard_of(&self, key: &RouterKey) -> u32 {
        let k = match key {
            RouterKey::Int(i) => KeyValue::Int(*i),
            RouterKey::Text(s) => KeyValue::Text(s.as_bytes().to_vec()),
            RouterKey::Uuid(u) => KeyValue::Uuid(*u),
        };
        self.shard_of_key(&k)
    }

    fn slot_of(&self, key: &RouterKey) -> u32 {
        let slots = self.state.map_ref().slots();
        match key {
            RouterKey::Int(i) => KeyValue::Int(*i).slot(slots),
            RouterKey::Text(s) => KeyValue::Text(s.as_bytes().to_vec()).slot(slots),
            RouterKey::Uuid(u) => KeyValue::Uuid(*u).slot(slots),
        }
    }

    /// During a cut-over: whether a simple-protocol statement touches the moving slots
    /// (by key, or by fanning out to every shard).
    pub fn touches_moving_simple(&self, sp: &SimplePlan, sql: &str, reading: TextReading) -> bool {
        self.touches_moving(&sp.plan, |k, ty| {
            sp.key_value(sql, k, ty)
                .filter(|v| readable(reading, v))
                .map(|v| vec![self.slot_of(&v)])
        })
    }

    /// The same for an extended-protocol execution, given its Bind.
    pub fn touches_moving_bound(&self, plan: &Plan, bind: &BindValues<'_>) -> bool {
        let slots = self.state.map_ref().slots();
        self.touches_moving(plan, |k, ty| match k {
            KeyExpr::Literal(v) if readable(bind.reading, v) => Some(vec![self.slot_of(v)]),
            KeyExpr::Literal(_) => None,
            KeyExpr::Param(n) => match bind.key(*n, ty) {
                Some(v) => Some(vec![v.slot(slots)]),
                None if bind.is_null(*n) => Some(Vec::new()),
                None => None,
            },
            KeyExpr::ParamArray(n) => bind
                .key_array(*n, ty)
                .map(|keys| keys.iter().map(|v| v.slot(slots)).collect()),
        })
    }

    fn touches_moving(
        &self,
        plan: &Plan,
        mut key_slots: impl FnMut(&KeyExpr, RouterKeyType) -> Option<Vec<u32>>,
    ) -> bool {
        let gate = &self.state.gate;
        if !gate.paused() {
            return false;
        }
        if plan.refusal.is_some() {
            // A string refused as a whole may still run statement by statement
            // (`separate`), on any slot: it waits too, which costs a refusal only time.
            return true;
        }
        match &plan.target {
            // Unsharded tables and reads of reference tables: not in any slot.
            Target::Default | Target::Any => false,
            // A shard named by a hint, a fan-out, a COPY split row by row: could be any.
            Target::Shard(_) | Target::All | Target::Each | Target::SplitCopy { .. } => true,
            Target::Keys { key_type, keys }
            | Target::SplitInsert {
                key_type,
                rows: keys,
            } => keys.iter().any(|k| match key_slots(k, *key_type) {
                Some(slots) => slots.iter().any(|&s| gate.is_moving(s)),
                None => true,
            }),
        }
    }

    /// The shard of a key, counting the statement against its slot.
    fn shard_of_key(&self, key: &KeyValue) -> u32 {
        let map = self.state.map_ref();
        let slot = map.slot_of_key(key);
        if let Some(h) = self.state.slot_hits.get(slot as usize) {
            h.fetch_add(1, Ordering::Relaxed);
        }
        map.shard_of_slot(slot)
    }

    /// (slot, shard, statements per second) of the hottest slots over the last load
    /// sample (the rebalancer's, every `rebalance_interval`), hottest first.
    pub fn hot_slots(&self) -> Vec<(u32, u32, f64)> {
        let load = self.state.last_load();
        let map = self.state.map();
        let mut top: Vec<(u32, u32, f64)> = load
            .slots
            .iter()
            .enumerate()
            .filter(|(_, rate)| **rate > 0.0)
            .map(|(slot, rate)| (slot as u32, map.shard_of_slot(slot as u32), *rate))
            .collect();
        top.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        top.truncate(HOT_SLOTS);
        top
    }

    /// The shards a simple-protocol statement runs on (sorted, distinct).
    pub fn shards_simple(
        &self,
        sp: &SimplePlan,
        sql: &str,
        reading: TextReading,
    ) -> Result<Shards, Refusal> {
        let mut unread: Option<Unread> = None;
        let shards = self.resolve(&sp.plan, |k, ty, found| match sp.key_value(sql, k, ty) {
            Some(v) if readable(reading, &v) => {
                found.add(self.shard_of(&v));
                true
            }
            Some(_) => {
                unread.get_or_insert(Unread::Encoding);
                false
            }
            // A constant that is not a value of the key's type: every shard.
            None => false,
        })?;
        settle_unread(&sp.plan, unread, shards)
    }

    /// The shards an extended-protocol execution runs on, given its Bind.
    pub fn shards_bound(&self, plan: &Plan, bind: &BindValues<'_>) -> Result<Shards, Refusal> {
        let mut unread: Option<Unread> = None;
        let shards = self.resolve(plan, |k, ty, found| match k {
            KeyExpr::Literal(v) if readable(bind.reading, v) => {
                found.add(self.shard_of(v));
                true
            }
            KeyExpr::Literal(_) => {
                unread.get_or_insert(Unread::Encoding);
                false
            }
            KeyExpr::Param(n) => match bind.key(*n, ty) {
                Some(v) => {
                    found.add(self.shard_of_key(&v));
                    true
                }
                // NULL matches no row: any one shard answers right.
                None if bind.is_null(*n) => {
                    found.add(0);
                    true
                }
                // A value shardgate cannot read as the key type (say a numeric 42.0 for an
                // integer key, which Postgres compares equal to 42): every shard, for a read.
                None => {
                    unread.get_or_insert(bind.why_unreadable(*n, ty));
                    false
                }
            },
            KeyExpr::ParamArray(n) => match bind.key_array(*n, ty) {
                Some(keys) => {
                    for v in &keys {
                        found.add(self.shard_of_key(v));
                    }
                    true
                }
                None => {
                    unread.get_or_insert(bind.why_unreadable(*n, ty));
                    false
                }
            },
        })?;
        settle_unread(plan, unread, shards)
    }

    /// The shards of a plan; `key_shards` adds each key's shards to `found`, or says false
    /// when it cannot read the key (then every shard).
    fn resolve(
        &self,
        plan: &Plan,
        mut key_shards: impl FnMut(&KeyExpr, RouterKeyType, &mut Found) -> bool,
    ) -> Result<Shards, Refusal> {
        if let Some(r) = &plan.refusal {
            return Err(r.clone());
        }
        let n = self.shards() as u32;
        let shards = match &plan.target {
            Target::Default => Shards::One(0),
            Target::Any => Shards::Any,
            Target::Shard(s) if *s < n => Shards::One(*s),
            Target::Shard(s) => {
                return Err(Refusal {
                    sqlstate: "22023",
                    message: format!("shard {s} does not exist (shards are 0 to {})", n - 1),
                })
            }
            Target::All | Target::Each | Target::SplitCopy { .. } => Shards::All,
            Target::Keys { key_type, keys }
            | Target::SplitInsert {
                key_type,
                rows: keys,
            } => {
                let mut found = Found::Nothing;
                for k in keys {
                    if !key_shards(k, *key_type, &mut found) {
                        found = Found::Many((0..n).collect());
                        break;
                    }
                }
                match found {
                    Found::Nothing => Shards::One(0),
                    Found::One(s) => Shards::One(s),
                    Found::Many(mut set) => {
                        set.sort_unstable();
                        set.dedup();
                        match set.as_slice() {
                            [one] => Shards::One(*one),
                            _ if set.len() == n as usize => Shards::All,
                            _ => Shards::Some(set),
                        }
                    }
                }
            }
        };
        if let (Some(r), false) = (&plan.multi_shard_refusal, shards.is_single()) {
            return Err(r.clone());
        }
        Ok(shards)
    }

    /// The shard of each VALUES row of a split INSERT, in order.
    pub fn row_shards_simple(
        &self,
        sp: &SimplePlan,
        sql: &str,
        reading: TextReading,
    ) -> Option<Vec<u32>> {
        let vals = sp.key_values(sql)?;
        vals.iter()
            .map(|v| readable(reading, v).then(|| self.shard_of(v)))
            .collect()
    }

    pub fn row_shards_bound(&self, plan: &Plan, bind: &BindValues<'_>) -> Option<Vec<u32>> {
        let Target::SplitInsert { key_type, rows } = &plan.target else {
            return None;
        };
        rows.iter()
            .map(|k| match k {
                KeyExpr::Literal(v) => readable(bind.reading, v).then(|| self.shard_of(v)),
                KeyExpr::Param(n) => bind.key(*n, *key_type).map(|v| self.shard_of_key(&v)),
                KeyExpr::ParamArray(_) => None,
            })
            .collect()
    }

    /// The shard of one COPY data field.
    pub fn shard_of_text(&self, ty: RouterKeyType, field: &[u8]) -> Option<u32> {
        let ty = match ty {
            RouterKeyType::Int => KeyType::Int8,
            RouterKeyType::Text => KeyType::Text,
            RouterKeyType::Uuid => KeyType::Uuid,
        };
        KeyValue::from_text(ty, field)
            .ok()
            .map(|v| self.state.map_ref().shard_of_key(&v))
    }
}

impl Routing {
    /// The shard of a key field of binary COPY data, as the column's type sends it (an
    /// integer key's width tells which integer).
    pub fn shard_of_binary(&self, ty: RouterKeyType, field: &[u8]) -> Option<u32> {
        KeyValue::from_binary(key_type_for(ty, field.len()), 0, field)
            .ok()
            .map(|v| self.state.map_ref().shard_of_key(&v))
    }
}

/// A key value from a statement's text is the server's unless it is a text key with
/// characters the session's encoding does not let shardgate read.
fn readable(reading: TextReading, v: &RouterKey) -> bool {
    match v {
        RouterKey::Text(s) => !reading.stands_in(s),
        _ => true,
    }
}

/// Why a key could not be read.
#[derive(Debug, Clone, Copy)]
enum Unread {
    /// Bind parameter `$n` does not decode as the key's type.
    Param(usize),
    /// A text key in characters of an encoding shardgate reads only as ASCII.
    Encoding,
}

/// A statement with an unreadable key runs on every shard when it is a read whose answers
/// merge; otherwise it is refused.
fn settle_unread(plan: &Plan, unread: Option<Unread>, shards: Shards) -> Result<Shards, Refusal> {
    let Some(unread) = unread else {
        return Ok(shards);
    };
    let writes = matches!(plan.kind, Kind::Write | Kind::Copy);
    if !writes && plan.merge.is_some() {
        return Ok(shards);
    }
    let what = if writes { "write" } else { "statement" };
    // A statement planned for one shard has no way to combine the answers of all (one
    // count(*) row per shard): refused rather than answered wrongly.
    let all = if writes {
        ""
    } else {
        ", and the statement cannot be answered from every shard"
    };
    Err(Refusal::unsupported(match unread {
        Unread::Param(n) => format!(
            "cannot route this {what}: parameter ${n} is not a shard key value shardgate can read{all} (send the key as an integer, text or uuid of the key column's type)"
        ),
        Unread::Encoding => format!(
            "cannot route this {what}: {}{all}",
            TextReading::UNREADABLE_KEY
        ),
    }))
}

/// The shards a statement runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shards {
    One(u32),
    /// Any one shard (reference tables only).
    Any,
    /// These shards (sorted, distinct, more than one, not all).
    Some(Vec<u32>),
    All,
}

impl Shards {
    pub fn is_single(&self) -> bool {
        matches!(self, Shards::One(_) | Shards::Any)
    }

    pub fn list(&self, n: usize) -> Vec<u32> {
        match self {
            Shards::One(s) => vec![*s],
            Shards::Any => vec![0],
            Shards::Some(v) => v.clone(),
            Shards::All => (0..n as u32).collect(),
        }
    }
}

/// Where the parameter type OIDs (4 bytes each) are in the tail of a Parse message (after
/// the statement name: query text, parameter count, types): as many whole ones as the
/// message holds, up to the count it declares; `None` when the query text is not
/// terminated.
pub fn param_types_at(parse_tail: &[u8]) -> Option<std::ops::Range<usize>> {
    let mut t = Reader::new(parse_tail);
    t.cstr()?;
    let declared = usize::try_from(t.i16().unwrap_or(0)).unwrap_or(0);
    let start = t.position();
    let whole = declared.min(parse_tail.len().saturating_sub(start) / 4);
    Some(start..start + whole * 4)
}

/// The shards a statement's keys fall on, as they are found: no allocation for the usual
/// case of one key (or keys all on one shard).
enum Found {
    Nothing,
    One(u32),
    Many(Vec<u32>),
}

impl Found {
    fn add(&mut self, shard: u32) {
        match self {
            Found::Nothing => *self = Found::One(shard),
            Found::One(s) if *s == shard => {}
            Found::One(s) => *self = Found::Many(vec![*s, shard]),
            Found::Many(set) => set.push(shard),
        }
    }
}

/// The parameter values of a Bind, with the statement's declared parameter types. Reads
/// the message in place: routing a keyed execution allocates nothing.
pub struct BindValues<'a> {
    /// Format codes, 2 bytes each.
    formats: &'a [u8],
    /// The values: (i32 length, bytes) each; -1 is NULL.
    params: &'a [u8],
    nparams: usize,
    /// Parameter type OIDs from the Parse, 4 bytes each.
    types: &'a [u8],
    /// The result-format section of the Bind, as sent.
    result_formats: &'a [u8],
    /// How the client's session encodes text values.
    reading: TextReading,
}

impl<'a> BindValues<'a> {
    /// From a Bind body after the portal and statement names (`rest`), and the statement's
    /// parameter types (see `param_types_at`).
    pub fn parse(rest: &'a [u8], types: &'a [u8], reading: TextReading) -> Option<BindValues<'a>> {
        let mut r = Reader::new(rest);
        let nf = usize::try_from(r.i16()?).ok()?;
        let formats = r.bytes(nf * 2)?;
        let np = usize::try_from(r.i16()?).ok()?;
        let params_at = r.position();
        for _ in 0..np {
            let len = r.i32()?;
            if len > 0 {
                r.bytes(len as usize)?;
            }
        }
        let params = &rest[params_at..r.position()];
        let result_formats = r.rest();
        Some(BindValues {
            formats,
            params,
            nparams: np,
            types,
            result_formats,
            reading,
        })
    }

    fn format(&self, i: usize) -> i16 {
        let code = |k: usize| {
            self.formats
                .get(2 * k..2 * k + 2)
                .map_or(0, |b| i16::from_be_bytes([b[0], b[1]]))
        };
        match self.formats.len() / 2 {
            0 => 0,
            1 => code(0),
            _ => code(i),
        }
    }

    fn type_oid(&self, i: usize) -> u32 {
        self.types
            .get(4 * i..4 * i + 4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The i-th (0-based) value: `Some(None)` for NULL, `None` past the end.
    fn value(&self, i: usize) -> Option<Option<&'a [u8]>> {
        if i >= self.nparams {
            return None;
        }
        let mut r = Reader::new(self.params);
        for _ in 0..i {
            let len = r.i32()?;
            if len > 0 {
                r.bytes(len as usize)?;
            }
        }
        let len = r.i32()?;
        if len < 0 {
            Some(None)
        } else {
            Some(Some(r.bytes(len as usize)?))
        }
    }

    /// The values (`None` = NULL), for merge parameters (the multi-shard path).
    pub fn values(&self) -> Vec<Option<&'a [u8]>> {
        (0..self.nparams).map(|i| self.value(i).flatten()).collect()
    }

    /// The format codes as sent.
    pub fn formats(&self) -> Vec<i16> {
        self.formats
            .chunks_exact(2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .collect()
    }

    /// Number of parameter values.
    pub fn len(&self) -> usize {
        self.nparams
    }

    pub fn is_empty(&self) -> bool {
        self.nparams == 0
    }

    /// Writes a Bind of the unnamed portal to the unnamed statement with these values, or
    /// with the values numbered in `order` (1-based), in that order.
    /// `hidden`: trailing helper columns the sent text has beyond the client's (a merge's
    /// sort or group columns): with per-column result formats they get text format.
    pub fn write_bind(&self, out: &mut bytes::BytesMut, order: Option<&[usize]>, hidden: usize) {
        use bytes::BufMut;
        crate::protocol::write_msg(out, b'B', |o| {
            o.put_u8(0);
            o.put_u8(0);
            let picked: Vec<usize> = match order {
                Some(order) => order.iter().map(|n| n.saturating_sub(1)).collect(),
                None => (0..self.nparams).collect(),
            };
            if self.formats.len() <= 2 {
                o.put_i16((self.formats.len() / 2) as i16);
                o.put_slice(self.formats);
            } else {
                o.put_i16(picked.len() as i16);
                for i in &picked {
                    o.put_i16(self.format(*i));
                }
            }
            o.put_i16(picked.len() as i16);
            for i in &picked {
                match self.value(*i).flatten() {
                    Some(v) => {
                        o.put_i32(v.len() as i32);
                        o.put_slice(v);
                    }
                    None => o.put_i32(-1),
                }
            }
            let per_column = self
                .result_formats
                .get(..2)
                .map_or(0, |b| i16::from_be_bytes([b[0], b[1]]));
            if per_column > 1 && hidden > 0 {
                o.put_i16(per_column + hidden as i16);
                o.put_slice(&self.result_formats[2..]);
                for _ in 0..hidden {
                    o.put_i16(0);
                }
            } else {
                o.put_slice(self.result_formats);
            }
        });
    }

    /// Whether the n-th (1-based) value is NULL.
    pub fn is_null(&self, n: usize) -> bool {
        n.checked_sub(1)
            .and_then(|i| self.value(i))
            .is_some_and(|v| v.is_none())
    }

    fn raw(&self, n: usize) -> Option<(i16, u32, &'a [u8])> {
        let i = n.checked_sub(1)?;
        let value = self.value(i)??;
        Some((self.format(i), self.type_oid(i), value))
    }

    /// The n-th (1-based) value as a key of type `ty`; `None` for NULL or a value that does
    /// not decode (the server then fails or matches nothing).
    pub fn key(&self, n: usize, ty: RouterKeyType) -> Option<KeyValue> {
        let (format, oid, value) = self.raw(n)?;
        let value = self.text_key(ty, value)?;
        decode_key(format, oid, &value, ty)
    }

    /// The n-th value as an array of keys (`key = ANY($n)`); `None` when it does not decode.
    pub fn key_array(&self, n: usize, ty: RouterKeyType) -> Option<Vec<KeyValue>> {
        let (format, _oid, value) = self.raw(n)?;
        if format == 0 {
            // Element boundaries are ASCII, read right in any encoding whose characters
            // never contain ASCII bytes: find them, then read each element.
            parse_text_array(&self.text_key(ty, value)?, ty)
        } else {
            let mut elems = parse_binary_array(value, ty)?;
            if ty == RouterKeyType::Text && self.reading.encoding != ClientEncoding::Utf8 {
                for k in elems.iter_mut() {
                    if let KeyValue::Text(t) = k {
                        let converted = match self.reading.text_value(t)? {
                            Cow::Owned(utf8) => Some(utf8),
                            Cow::Borrowed(_) => None,
                        };
                        if let Some(utf8) = converted {
                            *t = utf8;
                        }
                    }
                }
            }
            Some(elems)
        }
    }

    /// A text key's bytes in the server's encoding (Postgres converts text parameters, in
    /// either format, from the client's); other keys' bytes as they are.
    fn text_key<'v>(&self, ty: RouterKeyType, value: &'v [u8]) -> Option<Cow<'v, [u8]>> {
        match ty {
            RouterKeyType::Text => self.reading.text_value(value),
            _ => Some(Cow::Borrowed(value)),
        }
    }

    /// Why `$n` did not decode as a key of type `ty`.
    fn why_unreadable(&self, n: usize, ty: RouterKeyType) -> Unread {
        let in_encoding = ty == RouterKeyType::Text
            && self
                .raw(n)
                .is_some_and(|(_, _, v)| self.reading.text_value(v).is_none());
        if in_encoding {
            Unread::Encoding
        } else {
            Unread::Param(n)
        }
    }
}

fn key_type_for(ty: RouterKeyType, width: usize) -> KeyType {
    match ty {
        RouterKeyType::Int => match width {
            2 => KeyType::Int2,
            4 => KeyType::Int4,
            _ => KeyType::Int8,
        },
        RouterKeyType::Text => KeyType::Text,
        RouterKeyType::Uuid => KeyType::Uuid,
    }
}

fn decode_key(format: i16, oid: u32, value: &[u8], ty: RouterKeyType) -> Option<KeyValue> {
    /// `character(n)`: its trailing spaces do not count, and compared with a text key it
    /// is cast to text without them (`'abc  '::bpchar = 'abc'::text` holds).
    const BPCHAR: u32 = 1042;
    if format == 0 {
        let value = match oid {
            // Spaces only: a tab or newline is part of the value.
            BPCHAR => {
                let kept = value.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
                &value[..kept]
            }
            _ => value,
        };
        KeyValue::from_text(key_type_for(ty, 8), value).ok()
    } else {
        // An unspecified parameter type takes the key column's; its width tells which int.
        let kt = key_type_for(ty, value.len());
        KeyValue::from_binary(kt, oid, value).ok()
    }
}

/// `{1,2,3}` or `{"a","b"}` (no nesting); NULL elements are skipped.
fn parse_text_array(value: &[u8], ty: RouterKeyType) -> Option<Vec<KeyValue>> {
    let s = value.strip_prefix(b"{")?.strip_suffix(b"}")?;
    let mut out = Vec::new();
    let skip_spaces = |mut i: usize| {
        while s.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    // Postgres allows whitespace around every element, quoted or not: `{ "a" , "b" }`.
    let mut i = skip_spaces(0);
    while i < s.len() {
        let (elem, quoted): (Vec<u8>, bool) = if s[i] == b'"' {
            let mut e = Vec::new();
            i += 1;
            loop {
                match s.get(i)? {
                    b'\\' => {
                        e.push(*s.get(i + 1)?);
                        i += 2;
                    }
                    b'"' => {
                        i = skip_spaces(i + 1);
                        break;
                    }
                    c => {
                        e.push(*c);
                        i += 1;
                    }
                }
            }
            (e, true)
        } else {
            let start = i;
            while i < s.len() && s[i] != b',' {
                i += 1;
            }
            (s[start..i].trim_ascii().to_vec(), false)
        };
        match s.get(i) {
            Some(b',') => i = skip_spaces(i + 1),
            // Only a comma may follow an element.
            Some(_) => return None,
            None => {}
        }
        if !quoted && elem.eq_ignore_ascii_case(b"null") {
            continue;
        }
        out.push(KeyValue::from_text(key_type_for(ty, 8), &elem).ok()?);
    }
    Some(out)
}

/// A one-dimensional binary array.
fn parse_binary_array(value: &[u8], ty: RouterKeyType) -> Option<Vec<KeyValue>> {
    let mut r = Reader::new(value);
    let ndim = r.i32()?;
    let _has_nulls = r.i32()?;
    let elem_oid = r.i32()? as u32;
    if ndim == 0 {
        return Some(Vec::new());
    }
    if ndim != 1 {
        return None;
    }
    let n = r.i32()?;
    let _lower = r.i32()?;
    // The count comes from the client: never reserve more than the bytes could hold.
    let mut out = Vec::with_capacity((n.max(0) as usize).min(value.len() / 4));
    for _ in 0..n {
        let len = r.i32()?;
        if len < 0 {
            continue;
        }
        let b = r.bytes(len as usize)?;
        out.push(KeyValue::from_binary(key_type_for(ty, b.len()), elem_oid, b).ok()?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_types_are_the_whole_oids_a_parse_holds() {
        let tail = |text: &[u8], declared: i16, oids: &[u8]| {
            [text, &declared.to_be_bytes(), oids].concat()
        };
        // "q\0" is 2 bytes, the count 2 more: the types start at 4.
        assert_eq!(param_types_at(&tail(b"q\0", 0, b"")), Some(4..4));
        assert_eq!(param_types_at(&tail(b"q\0", 2, &[0; 8])), Some(4..12));
        // Cut short: the whole OIDs that are there (the server rejects the Parse itself).
        assert_eq!(param_types_at(&tail(b"q\0", 3, &[0; 6])), Some(4..8));
        assert_eq!(param_types_at(&tail(b"q\0", -1, b"")), Some(4..4));
        assert_eq!(param_types_at(b"q\0"), Some(2..2), "no count at all");
        assert_eq!(param_types_at(b"unterminated"), None);
    }

    #[test]
    fn text_arrays() {
        let v = parse_text_array(b"{1, 2,NULL,3}", RouterKeyType::Int).expect("parses");
        assert_eq!(
            v,
            vec![KeyValue::Int(1), KeyValue::Int(2), KeyValue::Int(3)]
        );
        let v = parse_text_array(br#"{"a,b",c,"NULL"}"#, RouterKeyType::Text).expect("parses");
        assert_eq!(
            v,
            vec![
                KeyValue::text("a,b"),
                KeyValue::text("c"),
                KeyValue::text("NULL")
            ]
        );
        // Whitespace around quoted and unquoted elements, as Postgres allows.
        let v = parse_text_array(br#"{ "a" , b ,"c"}"#, RouterKeyType::Text).expect("parses");
        assert_eq!(
            v,
            vec![
                KeyValue::text("a"),
                KeyValue::text("b"),
                KeyValue::text("c")
            ]
        );
        assert!(parse_text_array(br#"{"a" x}"#, RouterKeyType::Text).is_none());
        assert!(parse_text_array(b"{1,x}", RouterKeyType::Int).is_none());
        assert_eq!(parse_text_array(b"{}", RouterKeyType::Int), Some(vec![]));
    }

    #[test]
    fn text_bpchar_keys_lose_their_trailing_spaces() {
        let key = |oid| decode_key(0, oid, b"abc  ", RouterKeyType::Text);
        assert_eq!(key(1042), Some(KeyValue::text("abc")));
        let tab = decode_key(0, 1042, b"abc\t ", RouterKeyType::Text);
        assert_eq!(tab, Some(KeyValue::text("abc\t")));
        // As text or varchar the spaces are part of the value.
        assert_eq!(key(25), Some(KeyValue::text("abc  ")));
        assert_eq!(key(0), Some(KeyValue::text("abc  ")));
    }

    #[test]
    fn bind_values_decode_text_and_binary() {
        // formats: 1 code (binary); 2 params: int8 7, NULL; types from Parse: int8, int8.
        let mut rest = Vec::new();
        rest.extend_from_slice(&1i16.to_be_bytes());
        rest.extend_from_slice(&1i16.to_be_bytes());
        rest.extend_from_slice(&2i16.to_be_bytes());
        rest.extend_from_slice(&8i32.to_be_bytes());
        rest.extend_from_slice(&7i64.to_be_bytes());
        rest.extend_from_slice(&(-1i32).to_be_bytes());
        rest.extend_from_slice(&0i16.to_be_bytes());
        let mut tail = b"select $1, $2\0".to_vec();
        tail.extend_from_slice(&2i16.to_be_bytes());
        tail.extend_from_slice(&20i32.to_be_bytes());
        tail.extend_from_slice(&20i32.to_be_bytes());
        let types = &tail[param_types_at(&tail).expect("terminated text")];
        let b = BindValues::parse(&rest, types, TextReading::default()).expect("parses");
        assert_eq!(b.key(1, RouterKeyType::Int), Some(KeyValue::Int(7)));
        assert_eq!(b.key(2, RouterKeyType::Int), None);
        assert_eq!(b.values(), vec![Some(&7i64.to_be_bytes()[..]), None]);
        assert_eq!(b.formats(), vec![1]);
        assert_eq!(b.key(3, RouterKeyType::Int), None);
    }

    /// A Bind of text-format values (no declared types).
    fn text_bind(values: &[&[u8]]) -> Vec<u8> {
        let mut rest = Vec::new();
        rest.extend_from_slice(&0i16.to_be_bytes());
        rest.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            rest.extend_from_slice(&(v.len() as i32).to_be_bytes());
            rest.extend_from_slice(v);
        }
        rest.extend_from_slice(&0i16.to_be_bytes());
        rest
    }

    #[test]
    fn text_keys_are_read_in_the_sessions_encoding() {
        let rest = text_bind(&[b"Jos\xe9", b"{\"Jos\xe9\",ana}", b"ana", b"{ana,bo}", b"7"]);
        let text = |s: &str| KeyValue::Text(s.as_bytes().to_vec());
        let ty = RouterKeyType::Text;

        let latin1 = TextReading::new(Some("LATIN1"), None);
        let b = BindValues::parse(&rest, &[], latin1).expect("parses");
        assert_eq!(b.key(1, ty), Some(text("José")));
        assert_eq!(b.key_array(2, ty), Some(vec![text("José"), text("ana")]));

        let cyrillic = TextReading::new(Some("WIN1251"), None);
        let b = BindValues::parse(&rest, &[], cyrillic).expect("parses");
        assert_eq!(b.key(1, ty), None);
        assert!(matches!(b.why_unreadable(1, ty), Unread::Encoding));
        assert_eq!(b.key_array(2, ty), None);
        assert!(matches!(b.why_unreadable(2, ty), Unread::Encoding));
        // ASCII is itself; integer keys are not text.
        assert_eq!(b.key(3, ty), Some(text("ana")));
        assert_eq!(b.key_array(4, ty), Some(vec![text("ana"), text("bo")]));
        assert_eq!(b.key(5, RouterKeyType::Int), Some(KeyValue::Int(7)));
        assert!(matches!(
            b.why_unreadable(5, RouterKeyType::Uuid),
            Unread::Param(5)
        ));

        // A UTF-8 session's bytes are taken as they are.
        let b = BindValues::parse(&rest, &[], TextReading::default()).expect("parses");
        assert_eq!(b.key(1, ty), Some(KeyValue::Text(b"Jos\xe9".to_vec())));
    }
}
