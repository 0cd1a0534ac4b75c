//! A bounded cache of plans by query text, pure and single-threaded (the proxy wraps it,
//! e.g. one per worker or behind a lock).
//!
//! - Extended protocol: [`PlanCache::plan`] caches per exact Parse text; `$n` in the plan
//!   are Bind parameters.
//! - Simple protocol: [`PlanCache::plan_simple`] normalizes the text first (constants become
//!   `$1`, `$2`, ... see [`crate::normalize`]) and caches per normalized shape, so a
//!   repeated query shape costs a scan and a hash lookup, not a parse. The returned
//!   [`SimplePlan`] pairs the shared plan with the constants of this text; `$k` in the plan
//!   then means the k-th constant.
//!
//! A shape is cached only after checking, on the first text of that shape, that the plan
//! of the shape with the constants put back equals the plan of the text itself; shapes that
//! fail the check are remembered and their texts planned one by one. On a hit, a constant
//! that cannot be typed as its shard key (say `42.0` for an int key, which Postgres compares
//! as numeric) makes the text be planned on its own, uncached.
//!
//! Eviction: two generations; when the current one is full it becomes the previous one and
//! the old previous one is dropped; a hit in the previous generation moves the entry back.
//! Plans depend on the [`Catalog`]: make a new cache when the catalog changes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use crate::catalog::{Catalog, KeyType};
use crate::keys::{key_from_lit, unquote_plain, Lit};
use crate::lex::{Lexer, TokKind};
use crate::normalize::{normalize_into, substitute_params, Literal, Scratch};
use crate::planner::plan;
use crate::types::{KeyExpr, KeyValue, Plan, RowCount, Target};

/// A plan for one simple-protocol text.
#[derive(Debug, Clone)]
pub struct SimplePlan {
    pub plan: Arc<Plan>,
    /// The constants of the text that `$k` in `plan` refer to; empty when the plan was made
    /// from the text itself.
    pub literals: Vec<Literal>,
}

impl SimplePlan {
    /// The value of a key expression of this plan (`sql`: the text it was planned for).
    /// `None` only for `ParamArray`, which a simple-protocol plan never has.
    pub fn key_value(&self, sql: &str, k: &KeyExpr, ty: KeyType) -> Option<KeyValue> {
        match k {
            KeyExpr::Literal(v) => Some(v.clone()),
            KeyExpr::Param(n) => literal_key(self.literals.get(n.wrapping_sub(1))?.text(sql), ty),
            KeyExpr::ParamArray(_) => None,
        }
    }

    /// The values of a `Keys` target (or the rows of a `SplitInsert`), in order.
    pub fn key_values(&self, sql: &str) -> Option<Vec<KeyValue>> {
        let (ty, keys) = match &self.plan.target {
            Target::Keys { key_type, keys } => (*key_type, keys),
            Target::SplitInsert { key_type, rows } => (*key_type, rows),
            _ => return None,
        };
        keys.iter().map(|k| self.key_value(sql, k, ty)).collect()
    }

    /// The text to send to each shard of a multi-shard read, constants put back.
    pub fn rewritten<'a>(&'a self, sql: &str) -> Option<Cow<'a, str>> {
        let text = self.plan.rewritten.as_deref()?;
        if self.literals.is_empty() {
            return Some(Cow::Borrowed(text));
        }
        Some(Cow::Owned(substitute_params(text, |k| {
            self.literals.get(k.wrapping_sub(1)).map(|l| l.text(sql))
        })))
    }
}

/// Types the text of a normalized constant as a shard key.
fn literal_key(text: &str, ty: KeyType) -> Option<KeyValue> {
    if text.starts_with('\'') {
        key_from_lit(Lit::Str(&unquote_plain(text)?), ty)
    } else {
        key_from_lit(Lit::Number(text), ty)
    }
}

#[derive(Debug, Clone)]
enum Shape {
    Plan(Arc<Plan>),
    /// The shape's plan differs from its texts' plans: plan each text.
    Unnormalizable,
}

struct Generations<V> {
    current: HashMap<Box<str>, V>,
    previous: HashMap<Box<str>, V>,
    per_generation: usize,
    /// Key bytes held by `current`, and the most a generation may hold.
    bytes: usize,
    bytes_per_generation: usize,
}

impl<V: Clone> Generations<V> {
    fn new(capacity: usize, max_bytes: usize) -> Self {
        Generations {
            current: HashMap::new(),
            previous: HashMap::new(),
            per_generation: (capacity / 2).max(1),
            bytes: 0,
            bytes_per_generation: (max_bytes / 2).max(1),
        }
    }

    fn get(&mut self, key: &str) -> Option<V> {
        if let Some(v) = self.current.get(key) {
            return Some(v.clone());
        }
        let (k, v) = self.previous.remove_entry(key)?;
        self.insert_owned(k, v.clone());
        Some(v)
    }

    fn insert(&mut self, key: &str, v: V) {
        self.insert_owned(key.into(), v);
    }

    fn insert_owned(&mut self, key: Box<str>, v: V) {
        if self.current.len() >= self.per_generation
            || self.bytes + key.len() > self.bytes_per_generation
        {
            self.previous = std::mem::take(&mut self.current);
            self.bytes = 0;
        }
        self.bytes += key.len();
        self.current.insert(key, v);
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// Plans by query text; see the module docs.
pub struct PlanCache {
    exact: Generations<Arc<Plan>>,
    shapes: Generations<Shape>,
    scratch: Scratch,
}

/// Texts longer than this are planned every time, never cached (bulk INSERTs).
pub const MAX_CACHED_TEXT: usize = 16 * 1024;

impl PlanCache {
    /// A cache holding up to about `capacity` texts and as many shapes, and at most about
    /// 32 MiB of query text for each.
    pub fn new(capacity: usize) -> Self {
        Self::with_limits(capacity, 32 << 20)
    }

    /// A cache holding up to about `capacity` texts and as many shapes, and at most about
    /// `max_bytes` of query text for each.
    pub fn with_limits(capacity: usize, max_bytes: usize) -> Self {
        PlanCache {
            exact: Generations::new(capacity, max_bytes),
            shapes: Generations::new(capacity, max_bytes),
            scratch: Scratch::default(),
        }
    }

    /// Entries held (texts and shapes).
    pub fn len(&self) -> usize {
        self.exact.len() + self.shapes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The plan for an exact text (extended protocol Parse, or anything not normalized).
    pub fn plan(&mut self, sql: &str, catalog: &Catalog) -> Arc<Plan> {
        if sql.len() > MAX_CACHED_TEXT {
            return Arc::new(plan(sql, catalog));
        }
        if let Some(p) = self.exact.get(sql) {
            return p;
        }
        let p = Arc::new(plan(sql, catalog));
        self.exact.insert(sql, p.clone());
        p
    }

    /// The plan for a simple-protocol query text.
    pub fn plan_simple(&mut self, sql: &str, catalog: &Catalog) -> SimplePlan {
        let exact = |cache: &mut Self| SimplePlan {
            plan: cache.plan(sql, catalog),
            literals: Vec::new(),
        };
        if starts_with_session_keyword(sql) || sql.len() > MAX_CACHED_TEXT {
            return exact(self);
        }
        if !normalize_into(sql, &mut self.scratch) || self.scratch.literals.is_empty() {
            return exact(self);
        }
        match self.shapes.get(&self.scratch.shape) {
            Some(Shape::Plan(p)) => {
                let sp = SimplePlan {
                    plan: p,
                    literals: self.scratch.literals.clone(),
                };
                if keys_resolve(&sp, sql) {
                    return sp;
                }
                // A constant this shape cannot type: plan the text itself, uncached.
                SimplePlan {
                    plan: Arc::new(plan(sql, catalog)),
                    literals: Vec::new(),
                }
            }
            Some(Shape::Unnormalizable) => exact(self),
            None => {
                let n = crate::normalize::Normalized {
                    shape: self.scratch.shape.clone(),
                    literals: self.scratch.literals.clone(),
                };
                let shaped = plan(&n.shape, catalog);
                let own = plan(sql, catalog);
                if instantiate(&shaped, sql, &n.literals).as_ref() == Some(&own) {
                    let shaped = Arc::new(shaped);
                    self.shapes.insert(&n.shape, Shape::Plan(shaped.clone()));
                    SimplePlan {
                        plan: shaped,
                        literals: n.literals,
                    }
                } else {
                    self.shapes.insert(&n.shape, Shape::Unnormalizable);
                    let own = Arc::new(own);
                    self.exact.insert(sql, own.clone());
                    SimplePlan {
                        plan: own,
                        literals: Vec::new(),
                    }
                }
            }
        }
    }
}

/// Statements planned by keyword whose constants are not values worth normalizing (SET's
/// value decides `default_transaction_read_only`, ...).
fn starts_with_session_keyword(sql: &str) -> bool {
    let Some(t) = Lexer::new(sql).next() else {
        return true;
    };
    if t.kind != TokKind::Word {
        return false;
    }
    let w = t.text(sql);
    [
        "set",
        "reset",
        "show",
        "begin",
        "start",
        "commit",
        "end",
        "rollback",
        "abort",
        "savepoint",
        "release",
        "prepare",
        "discard",
        "listen",
        "notify",
        "unlisten",
    ]
    .iter()
    .any(|k| w.eq_ignore_ascii_case(k))
}

fn keys_resolve(sp: &SimplePlan, sql: &str) -> bool {
    match &sp.plan.target {
        Target::Keys { key_type, keys }
        | Target::SplitInsert {
            key_type,
            rows: keys,
        } => keys
            .iter()
            .all(|k| sp.key_value(sql, k, *key_type).is_some()),
        _ => true,
    }
}

/// The plan of a shape with its constants put back, as `plan(original)` would say it;
/// `None` if a constant does not fit where the shape has its parameter.
pub(crate) fn instantiate(p: &Plan, sql: &str, lits: &[Literal]) -> Option<Plan> {
    let mut out = p.clone();
    let text = |k: usize| lits.get(k.wrapping_sub(1)).map(|l| l.text(sql));
    let key = |k: &KeyExpr, ty: KeyType| -> Option<KeyExpr> {
        match k {
            KeyExpr::Literal(_) => Some(k.clone()),
            KeyExpr::Param(n) => literal_key(text(*n)?, ty).map(KeyExpr::Literal),
            KeyExpr::ParamArray(_) => None,
        }
    };
    match &mut out.target {
        Target::Keys { key_type, keys }
        | Target::SplitInsert {
            key_type,
            rows: keys,
        } => {
            let ty = *key_type;
            let mut resolved = Vec::with_capacity(keys.len());
            for k in keys.iter() {
                resolved.push(key(k, ty)?);
            }
            *keys = resolved;
        }
        _ => {}
    }
    if let Some(m) = &mut out.merge {
        for c in [&mut m.limit, &mut m.offset] {
            if let Some(RowCount::Param(n)) = c {
                *c = Some(RowCount::Value(text(*n)?.parse().ok()?));
            }
        }
    }
    if let Some(r) = &out.rewritten {
        out.rewritten = Some(substitute_params(r, text));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::new()
            .with_sharded("users", "id", KeyType::Int)
            .with_sharded("posts", "user_id", KeyType::Int)
            .with_sharded("tenants", "name", KeyType::Text)
    }

    #[test]
    fn one_plan_per_shape() {
        let c = catalog();
        let mut cache = PlanCache::new(100);
        let a = "SELECT * FROM users WHERE id = 123";
        let b = "SELECT * FROM users WHERE id = 456";
        let pa = cache.plan_simple(a, &c);
        let pb = cache.plan_simple(b, &c);
        assert!(Arc::ptr_eq(&pa.plan, &pb.plan));
        assert_eq!(pa.key_values(a), Some(vec![KeyValue::Int(123)]));
        assert_eq!(pb.key_values(b), Some(vec![KeyValue::Int(456)]));
        assert_eq!(cache.shapes.len(), 1);
    }

    #[test]
    fn untypable_constant_is_planned_alone() {
        let c = catalog();
        let mut cache = PlanCache::new(100);
        let a = "SELECT * FROM users WHERE id = 1 ORDER BY name LIMIT 3";
        cache.plan_simple(a, &c);
        // Same shape; 42.0 compares as numeric, so it is not a key: every shard, merged.
        let b = "SELECT * FROM users WHERE id = 42.0 ORDER BY name LIMIT 3";
        let pb = cache.plan_simple(b, &c);
        assert!(pb.literals.is_empty());
        assert_eq!(pb.plan.target, Target::All);
        assert!(pb.plan.merge.is_some());
        // A number is no text key.
        let t = "SELECT * FROM tenants WHERE name = 'acme'";
        assert!(matches!(
            cache.plan_simple(t, &c).plan.target,
            Target::Keys { .. }
        ));
        let n = "SELECT * FROM tenants WHERE name = 42";
        assert_eq!(cache.plan_simple(n, &c).plan.target, Target::All);
    }

    #[test]
    fn rewrites_get_their_constants_back() {
        let c = catalog();
        let mut cache = PlanCache::new(100);
        let a = "SELECT name FROM users WHERE score > 10 AND tag = 'x' ORDER BY lower(name) LIMIT 5 OFFSET 1";
        let p = cache.plan_simple(a, &c);
        assert_eq!(p.literals.len(), 2, "{:?}", p.literals);
        assert_eq!(
            p.rewritten(a).as_deref(),
            Some("SELECT name, lower(name) FROM users WHERE score > 10 AND tag = 'x' ORDER BY lower(name) LIMIT 6")
        );
        let b = "SELECT name FROM users WHERE score > 99 AND tag = 'it''s' ORDER BY lower(name) LIMIT 5 OFFSET 1";
        let p = cache.plan_simple(b, &c);
        assert_eq!(p.literals.len(), 2);
        assert_eq!(
            p.rewritten(b).as_deref(),
            Some("SELECT name, lower(name) FROM users WHERE score > 99 AND tag = 'it''s' ORDER BY lower(name) LIMIT 6")
        );
    }

    #[test]
    fn shapes_that_plan_differently_are_remembered() {
        let c = catalog();
        let mut cache = PlanCache::new(100);
        // A multi-row insert whose rows share a key plans as one key; its shape (two
        // parameters) plans as a split: not the same plan, so not cached as a shape.
        let a = "INSERT INTO users (id, n) VALUES (1, 'a'), (1, 'b')";
        let p = cache.plan_simple(a, &c);
        assert!(p.literals.is_empty());
        assert!(matches!(&p.plan.target, Target::Keys { keys, .. } if keys.len() == 1));
        let b = "INSERT INTO users (id, n) VALUES (1, 'a'), (2, 'b')";
        let p = cache.plan_simple(b, &c);
        assert!(p.literals.is_empty());
        assert!(matches!(&p.plan.target, Target::SplitInsert { rows, .. } if rows.len() == 2));
    }

    #[test]
    fn evicts_by_generation() {
        let c = catalog();
        let mut cache = PlanCache::new(4);
        for i in 0..20 {
            cache.plan(&format!("SELECT {i}"), &c);
        }
        assert!(cache.exact.len() <= 4);
        cache.plan("SELECT 18", &c);
        assert!(
            cache.exact.current.contains_key("SELECT 18")
                || cache.exact.previous.contains_key("SELECT 18")
        );
    }

    #[test]
    fn bounded_by_bytes_and_skips_huge_texts() {
        let c = catalog();
        let mut cache = PlanCache::with_limits(1000, 100);
        for i in 0..10 {
            cache.plan(&format!("SELECT {i} FROM users WHERE id = 1"), &c);
        }
        assert!(cache.exact.current.keys().map(|k| k.len()).sum::<usize>() <= 50);
        let big = format!(
            "INSERT INTO users (id) VALUES {}",
            vec!["(1)"; 10_000].join(", ")
        );
        let before = cache.len();
        let p = cache.plan_simple(&big, &c);
        assert!(matches!(p.plan.target, Target::Keys { .. }));
        assert_eq!(cache.len(), before);
    }

    #[test]
    fn session_statements_are_cached_by_text() {
        let c = catalog();
        let mut cache = PlanCache::new(10);
        let p = cache.plan_simple("SET default_transaction_read_only = 'on'", &c);
        assert!(p.literals.is_empty());
        assert_eq!(
            p.plan.tx,
            Some(crate::types::TxControl::SessionReadOnly(true))
        );
    }
}
