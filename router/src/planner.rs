//! `plan()`: SQL text to [`Plan`].

use std::ops::Range;

use sqlparser::ast::{
    AssignmentTarget, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Expr, Insert,
    ObjectName, OnConflictAction, OnInsert, Query, SetExpr, Statement, TableFactor, Value, With,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::analyze::{
    dedup, hint_key, inventory, key_value, norm_ident, single_value, split_name, Analyzer,
    Inventory, Pin, PinValue,
};
use crate::catalog::{Catalog, KeyType, TableClass};
use crate::fast::{blank_lock_strength, fast_path, unparseable, view_refusal, Draft};
use crate::hint::parse_hint;
use crate::lex::{split_statements, split_statements_legacy, Lexer, TokKind};
use crate::merge::plan_merge;
use crate::types::{
    CopyFormat, CopyInfo, Hint, KeyExpr, Kind, MergePlan, Plan, Refusal, Role, Target, TxControl,
};

/// Plans one statement or a `;`-separated simple-query string (see [`Plan`]).
pub fn plan(sql: &str, catalog: &Catalog) -> Plan {
    plan_with_hint(sql, catalog, None)
}

/// Like [`plan`], with a session-level hint (`SET shardgate.shard_key = ...`) that applies
/// when the text carries no hint comment of its own.
pub fn plan_with_hint(sql: &str, catalog: &Catalog, session: Option<&Hint>) -> Plan {
    let hint = match parse_hint(sql) {
        Ok(h) => h.or_else(|| session.cloned()),
        Err(r) => return Plan::refused(Kind::Unknown, Role::Primary, r),
    };
    let ranges = match statement_ranges(sql) {
        Ok(r) => r,
        Err(r) => return Plan::refused(Kind::Unknown, Role::Primary, r),
    };
    match ranges.as_slice() {
        [] => Plan::new(Kind::Utility, Role::Replica, Target::Default),
        [one] => plan_one(&sql[one.clone()], catalog, hint.as_ref()),
        many => {
            let plans: Vec<Plan> = many
                .iter()
                .map(|r| plan_one(&sql[r.clone()], catalog, hint.as_ref()))
                .collect();
            combine(plans)
        }
    }
}

/// Plans each statement of a `;`-separated string separately, with its byte range.
pub fn plan_many(sql: &str, catalog: &Catalog) -> Vec<(Range<usize>, Plan)> {
    let hint = match parse_hint(sql) {
        Ok(h) => h,
        Err(r) => return vec![(0..sql.len(), Plan::refused(Kind::Unknown, Role::Primary, r))],
    };
    match statement_ranges(sql) {
        Ok(ranges) => ranges
            .into_iter()
            .map(|r| {
                let p = plan_one(&sql[r.clone()], catalog, hint.as_ref());
                (r, p)
            })
            .collect(),
        Err(r) => vec![(0..sql.len(), Plan::refused(Kind::Unknown, Role::Primary, r))],
    }
}

/// The statements of a `;`-separated string that may run one after another, each on its
/// own shards, when the string as a whole spans shards (psycopg2's `execute_batch` sends
/// `INSERT ...;INSERT ...` with keys on every shard): two or more plain reads and writes,
/// none refused, none a transaction control, COPY, session or DDL statement, and no hint
/// (a hint comment belongs to the whole string). `None` otherwise: the string keeps the
/// combined plan's answer. Run in order, stopping at the first error, inside one
/// transaction over the shards (the string's implicit one, or the client's block), they
/// do what Postgres does with the string.
pub fn separate_statements(sql: &str, catalog: &Catalog) -> Option<Vec<(Range<usize>, Plan)>> {
    // Most refused texts are one statement: no need to plan it again to know.
    if split_statements(sql).len() < 2 {
        return None;
    }
    let plans = plan_many(sql, catalog);
    let plain = |p: &Plan| {
        matches!(p.kind, Kind::Read | Kind::Write)
            && p.refusal.is_none()
            && p.tx.is_none()
            && p.copy.is_none()
            && p.hint.is_none()
            && !p.no_tx_block
    };
    (plans.len() > 1 && plans.iter().all(|(_, p)| plain(p))).then_some(plans)
}

fn statement_ranges(sql: &str) -> Result<Vec<Range<usize>>, Refusal> {
    let ranges = split_statements(sql);
    // A backslash in a plain string means different things with standard_conforming_strings
    // on and off; refuse text whose statement boundaries depend on it.
    if sql.contains('\\') && split_statements_legacy(sql) != ranges {
        return Err(Refusal::unsupported(
            "the statement boundaries of this query depend on standard_conforming_strings \
             (a backslash in a string literal); use E'...' strings",
        ));
    }
    Ok(ranges)
}

fn plan_one(stmt: &str, catalog: &Catalog, hint: Option<&Hint>) -> Plan {
    let draft = fast_path(stmt, catalog).unwrap_or_else(|| parse_and_plan(stmt, catalog));
    finish(draft, hint)
}

/// Deeper than this (estimated AST depth), a statement is planned on a stack of its own:
/// left-deep operator chains (`a OR b OR ...`) make deep trees, and the recursion in the
/// parser, in derived Clone/PartialEq and in the planner would overflow a 2 MiB thread stack
/// somewhere past ten thousand levels.
const DEEP: usize = 512;
/// Beyond this, the statement is not parsed at all (planned as unreadable text).
const TOO_DEEP: usize = 100_000;
/// Stack to reserve per token of estimated depth (measured: a release build needs under
/// 1 KiB, a debug build under 8 KiB; reserved address space, touched only as used).
const STACK_PER_TOKEN: usize = if cfg!(debug_assertions) { 8192 } else { 2048 };

fn parse_and_plan(stmt: &str, catalog: &Catalog) -> Draft {
    let depth = depth_bound(stmt);
    if depth > TOO_DEEP {
        return unparseable(stmt, catalog);
    }
    if depth > DEEP {
        let stack = (1 << 20) + depth.saturating_mul(STACK_PER_TOKEN);
        return stacker::grow(stack, || parse_and_plan_here(stmt, catalog));
    }
    parse_and_plan_here(stmt, catalog)
}

/// An upper bound on the depth of the statement's syntax tree: along the parenthesis
/// nesting, the tokens of each enclosing comma-separated item.
fn depth_bound(stmt: &str) -> usize {
    let mut levels: Vec<usize> = vec![0];
    let mut max = 0;
    for t in Lexer::new(stmt) {
        let c = stmt.as_bytes()[t.start];
        match t.kind {
            TokKind::Punct if c == b'(' || c == b'[' => levels.push(0),
            TokKind::Punct if (c == b')' || c == b']') && levels.len() > 1 => {
                levels.pop();
            }
            TokKind::Punct if c == b',' => {
                if let Some(l) = levels.last_mut() {
                    *l = 0;
                }
            }
            _ => {
                if let Some(l) = levels.last_mut() {
                    *l += 1;
                }
                let d = levels.iter().sum::<usize>() + levels.len();
                max = max.max(d);
            }
        }
    }
    max
}

fn parse_and_plan_here(stmt: &str, catalog: &Catalog) -> Draft {
    let (text, blanked) = blank_lock_strength(stmt);
    let parsed = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&text)
        .and_then(|mut p| p.parse_statements());
    match parsed {
        Ok(v) if v.len() == 1 => {
            let mut d = plan_statement(&v[0], stmt, catalog);
            if d.plan.target == Target::Each && d.plan.kind == Kind::Write {
                if let Some(f) = volatile_call(&v[0]) {
                    d.hard = d.hard.or(Some(Refusal::unsupported(format!(
                        "a write to a reference table with {f}() is not supported: each \
                         shard's copy would get a different value; compute the value first \
                         and send it as a constant"
                    ))));
                }
            }
            if blanked && d.plan.rewritten.is_some() {
                d.plan.rewritten = None;
                d = d.soft(Refusal::unsupported(
                    "FOR NO KEY UPDATE / FOR KEY SHARE with an ORDER BY/LIMIT/aggregate \
                     rewrite across shards is not supported",
                ));
            }
            d
        }
        _ => unparseable(stmt, catalog),
    }
}

/// The first call in `stmt` to a built-in function that gives each server (or each call)
/// its own value: run on every copy of a reference table, it would make the copies differ.
/// Column DEFAULTs and user-defined functions are not seen.
fn volatile_call(stmt: &Statement) -> Option<String> {
    use sqlparser::ast::{Visit, Visitor};
    use std::ops::ControlFlow;
    struct V;
    impl Visitor for V {
        type Break = String;
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<String> {
            if let Expr::Function(f) = e {
                let (_, name) = split_name(&f.name);
                if is_volatile_builtin(&name) {
                    return ControlFlow::Break(name);
                }
            }
            ControlFlow::Continue(())
        }
    }
    match stmt.visit(&mut V) {
        ControlFlow::Break(name) => Some(name),
        ControlFlow::Continue(()) => None,
    }
}

/// Built-ins whose value differs between servers or calls: random values, clocks and
/// transaction times (each shard's transaction starts at its own instant), sequences, and
/// ids of the server's own transaction or process.
fn is_volatile_builtin(name: &str) -> bool {
    matches!(
        name,
        "random"
            | "random_normal"
            | "gen_random_uuid"
            | "uuidv4"
            | "uuidv7"
            | "uuid_generate_v1"
            | "uuid_generate_v1mc"
            | "uuid_generate_v4"
            | "now"
            | "current_timestamp"
            | "current_time"
            | "current_date"
            | "localtime"
            | "localtimestamp"
            | "transaction_timestamp"
            | "statement_timestamp"
            | "clock_timestamp"
            | "timeofday"
            | "nextval"
            | "currval"
            | "lastval"
            | "txid_current"
            | "txid_current_if_assigned"
            | "pg_current_xact_id"
            | "pg_current_xact_id_if_assigned"
            | "pg_backend_pid"
            | "inet_server_addr"
            | "inet_server_port"
    )
}

/// Applies a hint and settles the refusal.
fn finish(d: Draft, hint: Option<&Hint>) -> Plan {
    let Draft {
        mut plan,
        mut soft,
        mut hard,
        key_types,
        own_keys,
        stores_keys,
    } = d;
    if let Some(h) = hint {
        plan.hint = Some(h.clone());
        if h.primary {
            plan.role = Role::Primary;
        }
        // Set when the statement's own keys join the hint's: they must share its shard.
        let mut check: Option<Refusal> = None;
        let routed = if let Some(n) = h.shard {
            if stores_keys {
                hard = hard.or(Some(Refusal::unsupported(format!(
                    "a shardgate shard={n} hint cannot place INSERT ... VALUES rows into a \
                     sharded table: each row belongs on the shard of its shard key; drop the \
                     hint (or use key=)"
                ))));
                None
            } else {
                Some(Target::Shard(n))
            }
        } else if let Some(k) = &h.key {
            let mut types = key_types.clone();
            types.dedup();
            match types.as_slice() {
                [] | [_] => match hint_key(k, types.first().copied()) {
                    Some((ty, v)) => {
                        let mut keys = vec![KeyExpr::Literal(v)];
                        for own in own_keys {
                            if !keys.contains(&own) {
                                keys.push(own);
                            }
                        }
                        // The proxy resolves the keys: one shard for all of them runs
                        // there; anything else answers this.
                        if keys.len() > 1 {
                            check = Some(Refusal::unsupported(format!(
                                "this statement names shard key values that are not all on \
                                 the shard of the hinted key {k} (SET shardgate.shard_key or \
                                 /* shardgate: key= */); its rows live elsewhere: RESET \
                                 shardgate.shard_key or drop the hint for this statement"
                            )));
                        }
                        Some(Target::Keys { key_type: ty, keys })
                    }
                    None => {
                        hard = hard.or(Some(Refusal {
                            sqlstate: "22P02",
                            message: format!(
                                "shardgate hint key={k} is not a valid shard key value"
                            ),
                        }));
                        None
                    }
                },
                _ => {
                    hard = hard.or(Some(Refusal::unsupported(
                        "shardgate hint key= is ambiguous: the statement uses sharded tables with different key types; use shard=N",
                    )));
                    None
                }
            }
        } else {
            None
        };
        if let Some(t) = routed {
            plan.target = t;
            plan.merge = None;
            plan.rewritten = None;
            plan.multi_shard_refusal = check;
            soft = None;
        }
    }
    plan.refusal = hard.or(soft);
    plan
}

/// Whether a statement can run wherever the others of its string run.
fn neutral(p: &Plan) -> bool {
    matches!(p.kind, Kind::Transaction | Kind::Session)
        || p.target == Target::Any
        || (p.target == Target::Default && p.tables.is_empty() && p.kind == Kind::Read)
}

/// One plan for a multi-statement simple query: the whole string goes to one place.
fn combine(plans: Vec<Plan>) -> Plan {
    // COMMIT/ROLLBACK/SAVEPOINT run wherever the transaction runs; BEGIN decides.
    let role = if plans.iter().any(|p| {
        p.role == Role::Primary
            && (p.kind != Kind::Transaction || matches!(p.tx, Some(TxControl::Begin { .. })))
    }) {
        Role::Primary
    } else {
        Role::Replica
    };
    let kinds: Vec<Kind> = plans
        .iter()
        .map(|p| p.kind)
        .filter(|k| !matches!(k, Kind::Transaction | Kind::Session))
        .collect();
    let kind = if kinds.contains(&Kind::Write) {
        Kind::Write
    } else {
        kinds.first().copied().unwrap_or(plans[0].kind)
    };
    let mut out = Plan::new(kind, role, Target::Default);
    out.hint = plans[0].hint.clone();
    out.no_tx_block = plans.iter().any(|p| p.no_tx_block);
    out.tx = plans.iter().rev().find_map(|p| p.tx.clone());
    for p in &plans {
        for t in &p.tables {
            if !out.tables.contains(t) {
                out.tables.push(t.clone());
            }
        }
    }
    if let Some(r) = plans.iter().find_map(|p| p.refusal.clone()) {
        out.refusal = Some(r);
        return out;
    }
    let spans = || {
        Refusal::unsupported(
            "this multi-statement query needs more than one shard; send its statements as \
             separate queries",
        )
    };
    let targets: Vec<&Plan> = plans.iter().filter(|p| !neutral(p)).collect();
    if targets.is_empty() {
        out.target = if plans.iter().any(|p| p.target == Target::Any) {
            Target::Any
        } else {
            Target::Default
        };
        return out;
    }
    if targets
        .iter()
        .any(|p| p.copy.is_some() || (p.target.may_fan_out() && p.target != Target::Each))
    {
        out.refusal = Some(spans());
        return out;
    }
    let first = &targets[0].target;
    if targets.iter().all(|p| &p.target == first) {
        out.target = first.clone();
        out.multi_shard_refusal = targets.iter().find_map(|p| p.multi_shard_refusal.clone());
        return out;
    }
    // Single keys of one type: fine if they all land on one shard.
    let mut keys: Vec<KeyExpr> = Vec::new();
    let mut key_type: Option<KeyType> = None;
    for p in &targets {
        match &p.target {
            Target::Keys {
                key_type: t,
                keys: k,
            } if key_type.is_none_or_eq(*t) => {
                key_type = Some(*t);
                for x in k {
                    if !keys.contains(x) {
                        keys.push(x.clone());
                    }
                }
            }
            _ => {
                out.refusal = Some(spans());
                return out;
            }
        }
    }
    out.target = Target::Keys {
        key_type: key_type.unwrap_or(KeyType::Int),
        keys,
    };
    out.multi_shard_refusal = Some(spans());
    out
}

trait OptionEq<T> {
    fn is_none_or_eq(&self, v: T) -> bool;
}

impl<T: PartialEq> OptionEq<T> for Option<T> {
    fn is_none_or_eq(&self, v: T) -> bool {
        match self {
            None => true,
            Some(x) => *x == v,
        }
    }
}

// ---------------------------------------------------------------------------------------

/// Which tables a statement touches, by class.
#[derive(Default)]
struct Touch {
    sharded: Vec<String>,
    reference: Vec<String>,
    unsharded: Vec<String>,
    key_types: Vec<KeyType>,
    names: Vec<String>,
}

fn touch(inv: &Inventory, catalog: &Catalog) -> Touch {
    let mut t = Touch::default();
    for (schema, name) in &inv.relations {
        if !t.names.contains(name) {
            t.names.push(name.clone());
        }
        match catalog.classify(schema.as_deref(), name) {
            TableClass::Sharded(info) => {
                if !t.key_types.contains(&info.key_type) {
                    t.key_types.push(info.key_type);
                }
                t.sharded.push(name.clone());
            }
            TableClass::Reference => t.reference.push(name.clone()),
            TableClass::System => {}
            TableClass::Unsharded => t.unsharded.push(name.clone()),
        }
    }
    t
}

/// A WITH query named like a distributed table: the router cannot tell which references
/// mean the table.
fn shadowing(inv: &Inventory, catalog: &Catalog) -> Option<Refusal> {
    inv.ctes
        .iter()
        .find(|c| {
            !matches!(
                catalog.classify(None, c),
                TableClass::Unsharded | TableClass::System
            )
        })
        .map(|c| {
            Refusal::unsupported(format!(
                "a WITH query named like sharded or reference table {c} is not supported; rename it"
            ))
        })
}

fn draft(kind: Kind, role: Role, target: Target, t: &Touch) -> Draft {
    let mut d = Draft::new(kind, role, target);
    d.plan.tables = t.names.clone();
    d.key_types = t.key_types.clone();
    d
}

fn mixed(sharded: &str, unsharded: &str) -> Refusal {
    Refusal::unsupported(format!(
        "this statement uses sharded table {sharded} together with unsharded table {unsharded}, \
         which lives only on the default shard; declare {unsharded} a reference table or add a \
         /* shardgate: shard=N */ hint"
    ))
}

fn incomplete(t: &Touch) -> Refusal {
    Refusal::unsupported(format!(
        "shardgate cannot tell how sharded table {} is used in this statement; add a shard key \
         condition or a /* shardgate: shard=N */ hint",
        t.sharded.first().map(String::as_str).unwrap_or("?")
    ))
}

fn plan_statement(stmt: &Statement, text: &str, catalog: &Catalog) -> Draft {
    match stmt {
        Statement::Query(q) => match &*q.body {
            SetExpr::Insert(Statement::Insert(i)) => plan_insert(stmt, i, q.with.as_ref(), catalog),
            SetExpr::Update(Statement::Update(_)) | SetExpr::Delete(Statement::Delete(_)) => {
                plan_update_delete(stmt, catalog)
            }
            _ => plan_query(stmt, q, catalog),
        },
        Statement::Insert(i) => plan_insert(stmt, i, None, catalog),
        Statement::Update(_) | Statement::Delete(_) => plan_update_delete(stmt, catalog),
        Statement::Merge(m) => plan_merge_stmt(stmt, &m.table, catalog),
        Statement::Explain {
            analyze,
            options,
            statement,
            ..
        } => plan_explain(*analyze, options.as_deref(), statement, text, catalog),
        Statement::Copy {
            source,
            to,
            target,
            options,
            legacy_options,
            ..
        } => plan_copy(stmt, source, *to, target, options, legacy_options, catalog),
        Statement::Declare { stmts, .. } => {
            match stmts.iter().find_map(|d| d.for_query.as_deref()) {
                Some(q) => plan_cursor(q, catalog),
                None => Draft::new(Kind::Utility, Role::Primary, Target::Default),
            }
        }
        _ => plan_utility(stmt, text, catalog),
    }
}

/// Records the key values the statement pins itself, for checking a `key=` hint.
fn note_own_keys(d: &mut Draft, an: &Analyzer<'_>) {
    for p in &an.pins {
        let values = match &p.value {
            PinValue::Eq(k) => std::slice::from_ref(k),
            PinValue::Set(v) => v.as_slice(),
        };
        for k in values {
            if !d.own_keys.contains(k) {
                d.own_keys.push(k.clone());
            }
        }
    }
}

// --- routing by colocation ---------------------------------------------------------------

enum Route {
    /// All data on the shards of these keys (one key, or one per pinned table).
    Keys {
        key_type: KeyType,
        keys: Vec<KeyExpr>,
        multi: Option<Refusal>,
    },
    /// Every shard (or those of an IN list / ANY array), results combined.
    FanOut(Option<(KeyType, Vec<KeyExpr>)>),
    Refuse(Refusal),
}

fn route(an: &Analyzer<'_>, top: &[usize]) -> Route {
    // All data pinned to key values?
    let mut seeds: Vec<usize> = Vec::new();
    let mut values: Vec<KeyExpr> = Vec::new();
    let mut types: Vec<KeyType> = Vec::new();
    for p in &an.pins {
        if let PinValue::Eq(v) = &p.value {
            if !seeds.contains(&p.inst) {
                seeds.push(p.inst);
                if !values.contains(v) {
                    values.push(v.clone());
                }
                let ty = an.insts[p.inst].key_type;
                if !types.contains(&ty) {
                    types.push(ty);
                }
            }
        }
    }
    if !seeds.is_empty() && an.closure(&seeds).iter().all(|&b| b) {
        if let [ty] = types.as_slice() {
            let multi = (values.len() > 1).then(|| {
                Refusal::unsupported(
                    "this statement combines rows of different shard keys, which live on \
                     different shards",
                )
            });
            return Route::Keys {
                key_type: *ty,
                keys: values,
                multi,
            };
        }
        return Route::Refuse(Refusal::unsupported(
            "this statement pins shard keys of different types",
        ));
    }
    // Fan out from the top-level tables.
    let top_insts: Vec<usize> = (0..an.insts.len())
        .filter(|&i| top.contains(&an.insts[i].block))
        .collect();
    if top.len() > 1 {
        return Route::Refuse(Refusal::unsupported(
            "UNION/INTERSECT/EXCEPT over sharded tables across shards is not supported; add \
             the same shard key condition to every branch or a /* shardgate: shard=N */ hint",
        ));
    }
    let Some(&seed) = top_insts.first() else {
        let t = an.insts.first().map(|i| i.table.as_str()).unwrap_or("?");
        return Route::Refuse(Refusal::unsupported(format!(
            "a subquery over sharded table {t} without a shard key condition cannot be answered \
             from several shards"
        )));
    };
    let inside = an.closure(&[seed]);
    if let Some(out) = (0..an.insts.len()).find(|&i| !inside[i]) {
        let o = &an.insts[out];
        let msg = if top.contains(&o.block) {
            format!(
                "join across shards on a non-key column: {} and {} are not joined on their shard \
                 keys ({} = {}); add a shard key condition or a /* shardgate: shard=N */ hint",
                an.insts[seed].table, o.table, an.insts[seed].key_column, o.key_column
            )
        } else {
            format!(
                "a subquery or CTE over sharded table {} is not tied to the outer query by its \
                 shard key {}, so it cannot be evaluated shard by shard; add a shard key \
                 condition or a /* shardgate: shard=N */ hint",
                o.table, o.key_column
            )
        };
        return Route::Refuse(Refusal::unsupported(msg));
    }
    let set = an.pins.iter().find_map(|p| match &p.value {
        PinValue::Set(v) if top.contains(&an.insts[p.inst].block) => {
            Some((an.insts[p.inst].key_type, v.clone()))
        }
        _ => None,
    });
    Route::FanOut(set)
}

// --- queries -----------------------------------------------------------------------------

fn plan_query(stmt: &Statement, q: &Query, catalog: &Catalog) -> Draft {
    let inv = inventory(stmt, catalog);
    let t = touch(&inv, catalog);
    let writes = inv.dml || inv.select_into;
    let role = if writes || inv.write_function || inv.locks {
        Role::Primary
    } else {
        Role::Replica
    };
    let kind = if writes { Kind::Write } else { Kind::Read };
    if let Some(r) = shadowing(&inv, catalog) {
        return draft(kind, role, Target::Default, &t).soft(r);
    }
    if inv.select_into && !t.sharded.is_empty() {
        return draft(kind, role, Target::Default, &t).soft(Refusal::unsupported(
            "SELECT ... INTO a new table from a sharded table is not supported (the new table \
             would hold a part of the data on one shard)",
        ));
    }
    let key_change = if inv.dml {
        nested_key_assignment(q, catalog)
    } else {
        None
    };
    if key_change.is_some() {
        let mut d = draft(kind, role, Target::All, &t);
        d.hard = key_change;
        return d;
    }
    let dml_targets = dml_targets(q);
    let writes_reference = dml_targets
        .iter()
        .any(|(s, n)| matches!(catalog.classify(s.as_deref(), n), TableClass::Reference));
    if t.sharded.is_empty() {
        let target = if writes_reference {
            if let Some(u) = t.unsharded.first() {
                return draft(kind, role, Target::Default, &t).soft(Refusal::unsupported(format!(
                    "a write to a reference table here reads unsharded table {u}, which exists only on the default shard"
                )));
            }
            Target::Each
        } else if !t.unsharded.is_empty() || inv.select_into {
            Target::Default
        } else if !t.reference.is_empty() && !writes {
            Target::Any
        } else {
            Target::Default
        };
        return draft(kind, role, target, &t);
    }
    let mut d = draft(kind, role, Target::All, &t);
    if let Some(u) = t.unsharded.first() {
        return d.soft(mixed(&t.sharded[0], u));
    }
    if writes_reference {
        return d.soft(Refusal::unsupported(
            "a statement that writes a reference table and reads a sharded table is not supported",
        ));
    }
    let mut an = Analyzer::new(catalog);
    let top = an.query(q, None);
    note_own_keys(&mut d, &an);
    if !an.complete(&inv) {
        return d.soft(incomplete(&t));
    }
    match route(&an, &top) {
        Route::Refuse(r) => d.soft(r),
        Route::Keys {
            key_type,
            keys,
            multi,
        } => {
            d.plan.target = Target::Keys { key_type, keys };
            d.plan.multi_shard_refusal = multi;
            d
        }
        Route::FanOut(set) => {
            let top_block = top[0];
            let is_key = |e: &Expr| an.is_key_of_block(top_block, e);
            let merged = plan_merge(q, &is_key);
            match set {
                Some((key_type, keys)) => {
                    d.plan.target = Target::Keys { key_type, keys };
                    match merged {
                        Ok(m) => {
                            d.plan.merge = Some(m.plan);
                            d.plan.rewritten = m.rewritten;
                        }
                        Err(r) => d.plan.multi_shard_refusal = Some(r),
                    }
                    d
                }
                None => match merged {
                    Ok(m) => {
                        d.plan.merge = Some(m.plan);
                        d.plan.rewritten = m.rewritten;
                        d
                    }
                    Err(r) => d.soft(r),
                },
            }
        }
    }
}

/// Tables written by data-modifying statements inside a query.
fn dml_targets(q: &Query) -> Vec<(Option<String>, String)> {
    use sqlparser::ast::{Visit, Visitor};
    use std::ops::ControlFlow;
    struct V(Vec<(Option<String>, String)>);
    impl Visitor for V {
        type Break = ();
        fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
            if let Some(name) = dml_table(s) {
                self.0.push(split_name(name));
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            match &*q.body {
                SetExpr::Insert(s)
                | SetExpr::Update(s)
                | SetExpr::Delete(s)
                | SetExpr::Merge(s) => {
                    if let Some(name) = dml_table(s) {
                        self.0.push(split_name(name));
                    }
                }
                _ => {}
            }
            ControlFlow::Continue(())
        }
    }
    let mut v = V(Vec::new());
    let _ = q.visit(&mut v);
    v.0
}

fn dml_table(s: &Statement) -> Option<&ObjectName> {
    match s {
        Statement::Insert(i) => match &i.table {
            sqlparser::ast::TableObject::TableName(n) => Some(n),
            _ => None,
        },
        Statement::Update(u) => factor_name(&u.table.relation),
        Statement::Delete(d) => match &d.from {
            sqlparser::ast::FromTable::WithFromKeyword(f)
            | sqlparser::ast::FromTable::WithoutKeyword(f) => {
                f.first().and_then(|t| factor_name(&t.relation))
            }
        },
        Statement::Merge(m) => factor_name(&m.table),
        _ => None,
    }
}

fn factor_name(tf: &TableFactor) -> Option<&ObjectName> {
    match tf {
        TableFactor::Table { name, .. } => Some(name),
        _ => None,
    }
}

// --- writes ------------------------------------------------------------------------------

fn walk_with(an: &mut Analyzer<'_>, with: Option<&With>) {
    if let Some(w) = with {
        for cte in &w.cte_tables {
            an.query(&cte.query, None);
        }
    }
}

fn plan_update_delete(stmt: &Statement, catalog: &Catalog) -> Draft {
    let inv = inventory(stmt, catalog);
    let t = touch(&inv, catalog);
    let (with, inner) = match stmt {
        Statement::Query(q) => match &*q.body {
            SetExpr::Update(s) | SetExpr::Delete(s) => (q.with.as_ref(), s),
            _ => (None, stmt),
        },
        _ => (None, stmt),
    };
    if let Some(r) = shadowing(&inv, catalog) {
        return draft(Kind::Write, Role::Primary, Target::Default, &t).soft(r);
    }
    let mut an = Analyzer::new(catalog);
    walk_with(&mut an, with);
    let (block, target_name, key_update) = match inner {
        Statement::Update(u) => {
            let (b, _) = an.update(u, None);
            let key_update =
                key_assignment(&u.assignments, factor_name(&u.table.relation), catalog);
            (b, factor_name(&u.table.relation), key_update)
        }
        Statement::Delete(d) => {
            let (b, _) = an.delete(d, None);
            (b, dml_table(inner), None)
        }
        _ => return draft(Kind::Write, Role::Primary, Target::Default, &t),
    };
    let mut d = draft(Kind::Write, Role::Primary, Target::All, &t);
    d.hard = key_update.or_else(|| cte_key_assignment(with, catalog));
    note_own_keys(&mut d, &an);
    write_target(d, target_name, &t, &inv, &an, block, catalog)
}

/// The refusal for an assignment to a table's shard key.
fn key_assignment(
    assignments: &[sqlparser::ast::Assignment],
    table: Option<&ObjectName>,
    catalog: &Catalog,
) -> Option<Refusal> {
    let (schema, name) = split_name(table?);
    let TableClass::Sharded(info) = catalog.classify(schema.as_deref(), &name) else {
        return None;
    };
    let hits = |n: &ObjectName| {
        n.0.last()
            .and_then(|p| p.as_ident())
            .is_some_and(|id| norm_ident(id) == info.key_column)
    };
    let changes_key = assignments.iter().any(|a| match &a.target {
        AssignmentTarget::ColumnName(n) => hits(n),
        AssignmentTarget::Tuple(ns) => ns.iter().any(hits),
    });
    changes_key.then(|| {
        Refusal::unsupported(format!(
            "changing the shard key column {} of sharded table {name} is not supported (the row \
             would have to move to another shard); delete and re-insert it",
            info.key_column
        ))
    })
}

/// The refusal for an assignment to a shard key anywhere in `q` (data-modifying CTEs and
/// nested INSERT ... ON CONFLICT DO UPDATE): the row would stay on its old shard, as with a
/// top-level UPDATE.
fn nested_key_assignment(q: &Query, catalog: &Catalog) -> Option<Refusal> {
    use sqlparser::ast::{Visit, Visitor};
    use std::ops::ControlFlow;
    struct V<'c>(&'c Catalog);
    impl V<'_> {
        fn check(&self, s: &Statement) -> ControlFlow<Refusal> {
            let found = match s {
                Statement::Update(u) => {
                    key_assignment(&u.assignments, factor_name(&u.table.relation), self.0)
                }
                Statement::Insert(i) => match (&i.on, &i.table) {
                    (Some(OnInsert::OnConflict(oc)), sqlparser::ast::TableObject::TableName(n)) => {
                        match &oc.action {
                            OnConflictAction::DoUpdate(du) => {
                                key_assignment(&du.assignments, Some(n), self.0)
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                },
                _ => None,
            };
            match found {
                Some(r) => ControlFlow::Break(r),
                None => ControlFlow::Continue(()),
            }
        }
    }
    impl Visitor for V<'_> {
        type Break = Refusal;
        fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<Refusal> {
            self.check(s)
        }
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<Refusal> {
            match &*q.body {
                SetExpr::Insert(s) | SetExpr::Update(s) => self.check(s),
                _ => ControlFlow::Continue(()),
            }
        }
    }
    match q.visit(&mut V(catalog)) {
        ControlFlow::Break(r) => Some(r),
        ControlFlow::Continue(()) => None,
    }
}

/// The same for the WITH queries of a top-level write.
fn cte_key_assignment(with: Option<&With>, catalog: &Catalog) -> Option<Refusal> {
    with?
        .cte_tables
        .iter()
        .find_map(|c| nested_key_assignment(&c.query, catalog))
}

/// Target of a write to `target_name` whose statement block is `block`.
fn write_target(
    mut d: Draft,
    target_name: Option<&ObjectName>,
    t: &Touch,
    inv: &Inventory,
    an: &Analyzer<'_>,
    block: usize,
    catalog: &Catalog,
) -> Draft {
    let class = match target_name {
        Some(n) => {
            let (s, name) = split_name(n);
            catalog.classify(s.as_deref(), &name)
        }
        None => TableClass::Unsharded,
    };
    match class {
        TableClass::Sharded(_) => {
            if let Some(u) = t.unsharded.first() {
                return d.soft(mixed(&t.sharded[0], u));
            }
            if !an.complete(inv) {
                return d.soft(incomplete(t));
            }
            match route(an, &[block]) {
                Route::Refuse(r) => d.soft(r),
                Route::Keys {
                    key_type,
                    keys,
                    multi,
                } => {
                    d.plan.target = Target::Keys { key_type, keys };
                    d.plan.multi_shard_refusal = multi;
                    d
                }
                Route::FanOut(Some((key_type, keys))) => {
                    d.plan.target = Target::Keys { key_type, keys };
                    d
                }
                Route::FanOut(None) => {
                    d.plan.target = Target::All;
                    d
                }
            }
        }
        TableClass::Reference => {
            d.plan.target = Target::Each;
            if let Some(s) = t.sharded.first() {
                return d.soft(Refusal::unsupported(format!(
                    "a write to a reference table that reads sharded table {s} is not supported (each shard would write different data)"
                )));
            }
            if let Some(u) = t.unsharded.first() {
                return d.soft(Refusal::unsupported(format!(
                    "a write to a reference table that reads unsharded table {u} is not supported ({u} exists only on the default shard)"
                )));
            }
            d
        }
        TableClass::Unsharded | TableClass::System => {
            d.plan.target = Target::Default;
            if let (Some(s), Some(n)) = (t.sharded.first(), target_name) {
                return d.soft(mixed(s, &split_name(n).1));
            }
            d
        }
    }
}

fn plan_insert(stmt: &Statement, ins: &Insert, with: Option<&With>, catalog: &Catalog) -> Draft {
    let inv = inventory(stmt, catalog);
    let t = touch(&inv, catalog);
    let mut d = draft(Kind::Write, Role::Primary, Target::Default, &t);
    if let Some(r) = shadowing(&inv, catalog) {
        return d.soft(r);
    }
    let table = match &ins.table {
        sqlparser::ast::TableObject::TableName(n) => Some(n),
        _ => None,
    };
    let mut an = Analyzer::new(catalog);
    walk_with(&mut an, with);
    let (block, inst) = an.insert(ins, None);
    note_own_keys(&mut d, &an);
    let info = table.and_then(|n| {
        let (s, name) = split_name(n);
        match catalog.classify(s.as_deref(), &name) {
            TableClass::Sharded(info) => Some((name, info.clone())),
            _ => None,
        }
    });
    let (Some((name, info)), Some(inst)) = (info, inst) else {
        return write_target(d, table, &t, &inv, &an, block, catalog);
    };
    let key = info.key_column.as_str();
    if let Some(OnInsert::OnConflict(oc)) = &ins.on {
        if let OnConflictAction::DoUpdate(du) = &oc.action {
            d.hard = key_assignment(&du.assignments, table, catalog);
        }
    }
    if d.hard.is_none() {
        d.hard = cte_key_assignment(with, catalog);
    }
    d.plan.target = Target::All;
    if let Some(u) = t.unsharded.first() {
        return d.soft(mixed(&name, u));
    }
    if !an.complete(&inv) {
        return d.soft(incomplete(&t));
    }
    let need_key = |what: &str| {
        Refusal::unsupported(format!(
            "INSERT into sharded table {name} {what}; shardgate routes each row by its shard key {key}"
        ))
    };
    let Some(src) = &ins.source else {
        return d.soft(need_key("without VALUES"));
    };
    let rows = match &*src.body {
        SetExpr::Values(v)
            if src.with.is_none()
                && src.order_by.is_none()
                && src.limit_clause.is_none()
                && src.fetch.is_none() =>
        {
            &v.rows
        }
        _ => {
            return d.soft(need_key(
                "from a SELECT is not supported; insert VALUES rows or add a hint",
            ))
        }
    };
    d.stores_keys = true;
    if ins.columns.is_empty() {
        return d.soft(need_key("without a column list is not supported"));
    }
    let Some(idx) = ins.columns.iter().position(|c| {
        c.0.last()
            .and_then(|p| p.as_ident())
            .is_some_and(|id| norm_ident(id) == key)
    }) else {
        return d.soft(need_key(&format!("must give the shard key column {key}")));
    };
    let mut keys: Vec<KeyExpr> = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(e) = row.get(idx) else {
            return d.soft(need_key("has a row without the shard key"));
        };
        match key_value(e, info.key_type) {
            Some(k) => keys.push(k),
            None => {
                let what = match e {
                    Expr::Value(v) if matches!(v.value, Value::Null) => {
                        "with a NULL shard key is not supported".to_string()
                    }
                    Expr::Identifier(id)
                        if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("default") =>
                    {
                        format!("with DEFAULT for the shard key {key} is not supported")
                    }
                    _ => format!(
                        "needs a constant or a parameter of type {:?} for the shard key {key} in every row",
                        info.key_type
                    ),
                };
                return d.soft(need_key(&what));
            }
        }
    }
    let pin = match single_value(&keys) {
        Some(k) => PinValue::Eq(k.clone()),
        None => PinValue::Set(dedup(keys.clone())),
    };
    an.pins.push(Pin { inst, value: pin });
    note_own_keys(&mut d, &an);
    match route(&an, &[block]) {
        Route::Refuse(r) => d.soft(r),
        Route::Keys {
            key_type,
            keys: k,
            multi,
        } => {
            d.plan.target = Target::Keys { key_type, keys: k };
            d.plan.multi_shard_refusal = multi;
            d
        }
        Route::FanOut(_) => {
            d.plan.target = Target::SplitInsert {
                key_type: info.key_type,
                rows: keys,
            };
            if ins.on.is_some() && ins.returning.is_some() {
                d.plan.multi_shard_refusal = Some(Refusal::unsupported(
                    "INSERT ... ON CONFLICT ... RETURNING with rows for several shards is not \
                     supported (the order of the returned rows cannot be kept)",
                ));
            }
            d
        }
    }
}

fn plan_merge_stmt(stmt: &Statement, table: &TableFactor, catalog: &Catalog) -> Draft {
    let inv = inventory(stmt, catalog);
    let t = touch(&inv, catalog);
    let name = factor_name(table);
    let d = draft(Kind::Write, Role::Primary, Target::Default, &t);
    let (s, n) = name.map(split_name).unwrap_or_default();
    match catalog.classify(s.as_deref(), &n) {
        TableClass::Sharded(_) => d.soft(Refusal::unsupported(format!(
            "MERGE into sharded table {n} is not supported; use INSERT ... ON CONFLICT or a hint"
        ))),
        _ => {
            let an = Analyzer::new(catalog);
            let mut d = d;
            d.plan.target = Target::Default;
            if matches!(catalog.classify(s.as_deref(), &n), TableClass::Reference)
                || t.sharded.is_empty()
            {
                return write_target(d, name, &t, &inv, &an, 0, catalog);
            }
            d.soft(mixed(&t.sharded[0], &n))
        }
    }
}

// --- others ------------------------------------------------------------------------------

/// DECLARE ... CURSOR FOR query: the cursor lives on one server connection, so its query
/// must run on one shard (FETCH goes with the transaction).
fn plan_cursor(q: &Query, catalog: &Catalog) -> Draft {
    let mut d = plan_query(&Statement::Query(Box::new(q.clone())), q, catalog);
    d.plan.kind = Kind::Utility;
    d.plan.merge = None;
    d.plan.rewritten = None;
    if d.plan.target.may_fan_out() || d.soft.is_some() {
        d.soft = Some(Refusal::unsupported(
            "DECLARE CURSOR over a query that needs several shards is not supported; add a \
             shard key condition or a /* shardgate: shard=N */ hint",
        ));
        d.plan.multi_shard_refusal = None;
    }
    d
}

fn plan_explain(
    analyze: bool,
    options: Option<&[sqlparser::ast::UtilityOption]>,
    inner: &Statement,
    text: &str,
    catalog: &Catalog,
) -> Draft {
    let analyze = analyze
        || options.unwrap_or(&[]).iter().any(|o| {
            o.name.value.eq_ignore_ascii_case("analyze")
                && !o.arg.as_ref().is_some_and(|a| {
                    let s = a.to_string().to_ascii_lowercase();
                    matches!(s.as_str(), "false" | "off" | "0" | "'false'" | "'off'")
                })
        });
    let mut d = plan_statement(inner, text, catalog);
    d.plan.kind = Kind::Read;
    d.plan.merge = None;
    d.plan.rewritten = None;
    d.plan.copy = None;
    if d.plan.target.may_fan_out() || d.soft.is_some() {
        if analyze {
            return d.soft(Refusal::unsupported(
                "EXPLAIN ANALYZE of a statement that runs on several shards is not supported; \
                 add a shard key condition or a /* shardgate: shard=N */ hint",
            ));
        }
        // The plan on the default shard is representative.
        d.plan.target = Target::Default;
        d.plan.multi_shard_refusal = None;
        d.soft = None;
    }
    d
}

#[allow(clippy::too_many_arguments)]
fn plan_copy(
    stmt: &Statement,
    source: &CopySource,
    to: bool,
    target: &CopyTarget,
    options: &[CopyOption],
    legacy: &[CopyLegacyOption],
    catalog: &Catalog,
) -> Draft {
    let inv = inventory(stmt, catalog);
    let t = touch(&inv, catalog);
    let mut info = CopyInfo {
        from: !to,
        columns: Vec::new(),
        format: CopyFormat::Text,
        delimiter: None,
        header: false,
        quote: None,
        escape: None,
        null: None,
        key_force_not_null: false,
        key_force_null: false,
        encoding: None,
    };
    let extras = copy_options(&mut info, options, legacy);
    let stdio = matches!(target, CopyTarget::Stdin | CopyTarget::Stdout);
    match source {
        CopySource::Query(q) => {
            let inner = Statement::Query(q.clone());
            let mut d = plan_query(&inner, q, catalog);
            d.plan.kind = Kind::Copy;
            d.plan.copy = Some(info);
            if !stdio {
                d.plan.role = Role::Primary;
                if !t.sharded.is_empty() {
                    return d.soft(Refusal::unsupported(
                        "COPY ... TO a server file over a sharded table is not supported",
                    ));
                }
            }
            let concat = concat_only(d.plan.merge.as_ref()) && d.plan.rewritten.is_none();
            if d.plan.target.may_fan_out() && !concat {
                let r = Refusal::unsupported(
                    "COPY (query) TO STDOUT that needs ORDER BY/LIMIT/aggregate merging across \
                     shards is not supported",
                );
                d.plan.merge = None;
                d.plan.rewritten = None;
                if d.plan.target == Target::All {
                    return d.soft(r);
                }
                d.plan.multi_shard_refusal = Some(r);
            }
            d
        }
        CopySource::Table {
            table_name,
            columns,
        } => {
            info.columns = columns.iter().map(norm_ident).collect();
            let (s, name) = split_name(table_name);
            let class = catalog.classify(s.as_deref(), &name);
            let role = if to && stdio {
                Role::Replica
            } else {
                Role::Primary
            };
            let mut d = draft(Kind::Copy, role, Target::Default, &t);
            d.plan.copy = Some(info.clone());
            if d.plan.tables.is_empty() {
                d.plan.tables.push(name.clone());
            }
            match class {
                TableClass::Sharded(sh) => {
                    if !stdio {
                        return d.soft(Refusal::unsupported(format!(
                            "COPY between sharded table {name} and a server file is not supported; use STDIN/STDOUT"
                        )));
                    }
                    if to {
                        d.plan.target = Target::All;
                        d.plan.merge = Some(MergePlan::default());
                        return d;
                    }
                    if let Some(c) = d.plan.copy.as_mut() {
                        c.key_force_not_null = extras.force_not_null.contains(&sh.key_column);
                        c.key_force_null = extras.force_null.contains(&sh.key_column);
                    }
                    let key_index = if info.columns.is_empty() {
                        None
                    } else {
                        match info.columns.iter().position(|c| *c == sh.key_column) {
                            Some(i) => Some(i),
                            None => {
                                return d.soft(Refusal::unsupported(format!(
                                    "COPY into sharded table {name} must include its shard key column {}",
                                    sh.key_column
                                )))
                            }
                        }
                    };
                    d.plan.target = Target::SplitCopy {
                        key_type: sh.key_type,
                        key_index,
                    };
                    d
                }
                TableClass::Reference => {
                    if to {
                        d.plan.target = Target::Any;
                        return d;
                    }
                    if !stdio {
                        return d.soft(Refusal::unsupported(format!(
                            "COPY from a server file into reference table {name} is not supported; use STDIN"
                        )));
                    }
                    d.plan.target = Target::Each;
                    d
                }
                TableClass::Unsharded | TableClass::System => d,
            }
        }
    }
}

/// No merge, or one that only concatenates.
fn concat_only(m: Option<&MergePlan>) -> bool {
    match m {
        None => true,
        Some(m) => m.is_concat(),
    }
}

/// COPY options that matter only while planning.
#[derive(Default)]
struct CopyExtras {
    /// Column names (lower case) in `FORCE_NOT_NULL` / `FORCE_NULL`.
    force_not_null: Vec<String>,
    force_null: Vec<String>,
}

fn copy_options(
    info: &mut CopyInfo,
    options: &[CopyOption],
    legacy: &[CopyLegacyOption],
) -> CopyExtras {
    let mut extras = CopyExtras::default();
    let names =
        |cols: &[sqlparser::ast::Ident]| -> Vec<String> { cols.iter().map(norm_ident).collect() };
    for o in options {
        match o {
            CopyOption::Format(f) => {
                info.format = match f.value.to_ascii_lowercase().as_str() {
                    "csv" => CopyFormat::Csv,
                    "binary" => CopyFormat::Binary,
                    _ => CopyFormat::Text,
                }
            }
            CopyOption::Delimiter(c) => info.delimiter = Some(*c),
            CopyOption::Header(h) => info.header = *h,
            CopyOption::Quote(c) => info.quote = Some(*c),
            CopyOption::Escape(c) => info.escape = Some(*c),
            CopyOption::Null(s) => info.null = Some(s.clone()),
            CopyOption::ForceNotNull(cols) => extras.force_not_null.extend(names(cols)),
            CopyOption::ForceNull(cols) => extras.force_null.extend(names(cols)),
            CopyOption::Encoding(e) => info.encoding = Some(e.clone()),
            _ => {}
        }
    }
    for o in legacy {
        match o {
            CopyLegacyOption::Binary => info.format = CopyFormat::Binary,
            CopyLegacyOption::Csv(csv) => {
                info.format = CopyFormat::Csv;
                for c in csv {
                    match c {
                        sqlparser::ast::CopyLegacyCsvOption::Header => info.header = true,
                        sqlparser::ast::CopyLegacyCsvOption::Quote(q) => info.quote = Some(*q),
                        sqlparser::ast::CopyLegacyCsvOption::Escape(e) => info.escape = Some(*e),
                        sqlparser::ast::CopyLegacyCsvOption::ForceNotNull(cols) => {
                            extras.force_not_null.extend(names(cols))
                        }
                        _ => {}
                    }
                }
            }
            CopyLegacyOption::Delimiter(c) => info.delimiter = Some(*c),
            CopyLegacyOption::Null(s) => info.null = Some(s.clone()),
            CopyLegacyOption::Header => info.header = true,
            _ => {}
        }
    }
    extras
}

/// Tables named by utility statements whose names the visitor does not report.
fn table_names(stmt: &Statement) -> Vec<&ObjectName> {
    use sqlparser::ast::{CommentObject, GrantObjects, ObjectType};
    fn objects(o: &Option<GrantObjects>) -> Vec<&ObjectName> {
        match o {
            Some(GrantObjects::Tables(v) | GrantObjects::Views(v)) => v.iter().collect(),
            _ => Vec::new(),
        }
    }
    match stmt {
        Statement::Drop {
            object_type: ObjectType::Table | ObjectType::View | ObjectType::MaterializedView,
            names,
            ..
        } => names.iter().collect(),
        Statement::Grant(g) => objects(&g.objects),
        Statement::Revoke(r) => objects(&r.objects),
        Statement::Comment {
            object_type:
                CommentObject::Table | CommentObject::View | CommentObject::MaterializedView,
            object_name,
            ..
        } => vec![object_name],
        Statement::Comment {
            object_type: CommentObject::Column,
            object_name,
            ..
        } if object_name.0.len() >= 2 => {
            // table.column: the table part is checked by the word scan below.
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// DDL and other utility statements: every shard when they name a sharded or reference
/// table or no table at all (functions, types, roles, ...: schemas must match); the default
/// shard when they name only unsharded tables.
fn plan_utility(stmt: &Statement, text: &str, catalog: &Catalog) -> Draft {
    let inv = inventory(stmt, catalog);
    let mut t = touch(&inv, catalog);
    let first = Lexer::new(text)
        .find(|tok| tok.kind == TokKind::Word)
        .map(|tok| tok.text(text).to_ascii_lowercase())
        .unwrap_or_default();
    let kind = match first.as_str() {
        "create" | "alter" | "drop" | "truncate" | "grant" | "revoke" | "comment" | "security"
        | "refresh" => Kind::Ddl,
        _ => Kind::Utility,
    };
    // Names the AST does not report as relations (DROP TABLE x, GRANT ... ON x, ...).
    let mut named_tables = !inv.relations.is_empty();
    let mut distributed = !t.sharded.is_empty() || !t.reference.is_empty();
    for n in table_names(stmt) {
        named_tables = true;
        let (s, name) = split_name(n);
        if !t.names.contains(&name) {
            t.names.push(name.clone());
        }
        if !matches!(
            catalog.classify(s.as_deref(), &name),
            TableClass::Unsharded | TableClass::System
        ) {
            distributed = true;
        }
    }
    if !distributed {
        distributed = Lexer::new(text).any(|tok| {
            matches!(tok.kind, TokKind::Word | TokKind::QuotedIdent) && {
                let s = tok.text(text);
                let s = s.trim_matches('"');
                catalog.mentions_distributed_table(s)
            }
        });
    }
    let target = if distributed || !named_tables {
        Target::Each
    } else {
        Target::Default
    };
    let mut d = draft(kind, Role::Primary, target, &t);
    match stmt {
        Statement::CreateIndex(ci) => d.plan.no_tx_block = ci.concurrently,
        Statement::CreateDatabase { .. } => d.plan.no_tx_block = true,
        Statement::CreateTable(ct) if ct.query.is_some() && !t.sharded.is_empty() => {
            return d.soft(Refusal::unsupported(
                "CREATE TABLE ... AS over a sharded table is not supported (each shard would \
                 hold a different part)",
            ));
        }
        Statement::CreateView(_) | Statement::CreateRule(_) if !t.sharded.is_empty() => {
            d.hard = Some(view_refusal(&t.sharded[0]));
            return d;
        }
        _ => {}
    }
    if kind == Kind::Utility && !distributed && !named_tables {
        // CALL, LOCK of nothing known, ...: the default shard.
        d.plan.target = Target::Default;
    }
    d
}
