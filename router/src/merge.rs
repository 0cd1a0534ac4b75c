//! The merge plan for a read that runs on several shards, and the SQL rewrite it needs.
//!
//! Supported: ORDER BY (positions, output names, expressions; keys not in the select list
//! become hidden trailing columns), LIMIT/OFFSET/FETCH FIRST (pushed down as
//! `LIMIT limit+offset`), DISTINCT, count/sum/min/max/avg (avg via hidden sum and count
//! columns; also `round(avg(..), n)`),
//! GROUP BY (groups combined; group keys not in the select list become hidden
//! columns). Grouping by a shard key keeps every group on one shard, so then nothing needs
//! combining and everything the shard computes (HAVING, DISTINCT aggregates, expressions
//! over aggregates) is final.
//!
//! HAVING on combined groups: a conjunction of `subject <op> constant`, the subject an
//! aggregate, an expression over aggregates or a group key, moved to the merge (aggregates
//! not selected become hidden columns).
//!
//! Expressions over aggregates (`sum(x) / count(*)`, `count(*)::int`, `coalesce(sum(x),
//! 0)`, `nullif`) when groups
//! are combined: `AggMerge::Expr`, computed by the merge; the shards return a typed NULL
//! for the column and the aggregates it reads as hidden columns.
//!
//! Refused (0A000): window functions, DISTINCT ON, other HAVING conditions and other
//! expressions over aggregates when groups must be combined, DISTINCT aggregates, other
//! aggregates (string_agg, ...), GROUPING SETS/ROLLUP/CUBE, FETCH ... WITH TIES, ORDER BY
//! ... USING, LIMIT expressions other than constants and parameters, set operations.

use std::ops::ControlFlow;

use sqlparser::ast::helpers::attached_token::AttachedToken;
use sqlparser::ast::{
    BinaryOperator, CaseWhen, CastKind, DataType, Distinct, DuplicateTreatment, Expr, Function,
    FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident, LimitClause,
    ObjectNamePart, Offset, OffsetRows, OrderByKind, OrderBySort, Query, Select, SelectItem,
    SetExpr, Statement, UnaryOperator, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::analyze::{norm_ident, param_number};
use crate::types::{
    AggExpr, AggMerge, ArithOp, ArithType, CmpOp, ColumnRef, Constant, HavingCond, MergePlan,
    Refusal, RowCount, SortKey,
};

pub(crate) struct Merge {
    pub plan: MergePlan,
    pub rewritten: Option<String>,
}

fn refuse(what: &str) -> Refusal {
    Refusal::unsupported(format!(
        "{what} is not supported across shards; add a shard key condition or a /* shardgate: shard=N */ hint"
    ))
}

/// Plans the merge of `q`'s rows from several shards. `is_key` tells whether an expression
/// is the shard key of a table of the top-level query.
pub(crate) fn plan_merge(q: &Query, is_key: &dyn Fn(&Expr) -> bool) -> Result<Merge, Refusal> {
    let sel = match &*q.body {
        SetExpr::Select(s) => s,
        SetExpr::SetOperation { op, .. } => {
            return Err(refuse(&format!("{op} over sharded tables")));
        }
        SetExpr::Table(_)
            if q.order_by.is_none() && q.limit_clause.is_none() && q.fetch.is_none() =>
        {
            return Ok(Merge {
                plan: MergePlan::default(),
                rewritten: None,
            });
        }
        _ => return Err(refuse("this query form")),
    };
    check_clauses(q, sel)?;

    let mut nq = q.clone();
    let mut hidden = Helpers::default();

    let items = items(sel);
    let wildcard = items.iter().any(|i| i.expr.is_none());

    // Windows anywhere in this query level.
    let mut scan = Scan::default();
    for it in &items {
        if let Some(e) = it.expr {
            scan.expr(e);
        }
    }
    if let Some(h) = &sel.having {
        scan.expr(h);
    }
    let order: Vec<&sqlparser::ast::OrderByExpr> = match &q.order_by {
        None => Vec::new(),
        Some(ob) => match &ob.kind {
            OrderByKind::Expressions(v) => v.iter().collect(),
            OrderByKind::All(_) => return Err(refuse("ORDER BY ALL")),
        },
    };
    for o in &order {
        scan.expr(&o.expr);
    }
    if scan.window {
        return Err(refuse("a window function"));
    }

    let group_exprs: &[Expr] = match &sel.group_by {
        GroupByExpr::All(_) => return Err(refuse("GROUP BY ALL")),
        GroupByExpr::Expressions(g, modifiers) => {
            if !modifiers.is_empty() {
                return Err(refuse("GROUP BY with ROLLUP/CUBE/GROUPING SETS"));
            }
            g
        }
    };
    for g in group_exprs {
        if matches!(g, Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_)) {
            return Err(refuse("GROUPING SETS/ROLLUP/CUBE"));
        }
    }
    let mut group_items: Vec<Option<usize>> = Vec::with_capacity(group_exprs.len());
    for g in group_exprs {
        group_items.push(group_target(g, &items)?);
    }
    let groups_local = group_exprs.iter().zip(&group_items).any(|(g, k)| {
        let effective = match k {
            Some(k) => items[*k].expr,
            None => Some(g),
        };
        effective.is_some_and(is_key)
    });
    if !groups_local {
        let mut outer = OuterAgg::new(sel);
        let exprs = items
            .iter()
            .filter_map(|it| it.expr)
            .chain(sel.having.as_ref())
            .chain(order.iter().map(|o| &o.expr));
        for e in exprs {
            if let ControlFlow::Break(f) = e.visit(&mut outer) {
                return Err(refuse(&format!(
                    "the aggregate {f}() of the outer query's columns inside a subquery (it \
                     aggregates the outer query's rows)"
                )));
            }
        }
    }
    let aggregating = scan.agg || sel.having.is_some() || !group_exprs.is_empty();
    let distinct = match &sel.distinct {
        None | Some(Distinct::All) => false,
        Some(Distinct::Distinct) => true,
        Some(Distinct::On(_)) => return Err(refuse("DISTINCT ON")),
    };
    let (limit, offset) = limit_offset(q)?;

    let mut plan = MergePlan {
        distinct,
        limit,
        offset,
        ..MergePlan::default()
    };

    if aggregating && !groups_local {
        // Partial aggregates are combined per group.
        if wildcard {
            return Err(refuse("SELECT * with GROUP BY or aggregates"));
        }
        if scan.distinct_agg {
            return Err(refuse("a DISTINCT aggregate"));
        }
        if let Some(f) = &scan.unsupported_agg {
            return Err(refuse(&format!("the aggregate {f}()")));
        }
        let mut aggs: Vec<AggMerge> = Vec::with_capacity(items.len());
        for it in &items {
            let Some(e) = it.expr else {
                return Err(refuse("SELECT * with GROUP BY or aggregates"));
            };
            let m = hidden.merge_of(e)?;
            if matches!(m, AggMerge::Expr(_)) {
                if let SetExpr::Select(ns) = &mut *nq.body {
                    if let Some(item) = ns.projection.get_mut(aggs.len()) {
                        never_evaluated_item(item);
                    }
                }
            }
            aggs.push(m);
        }
        for (g, k) in group_exprs.iter().zip(&group_items) {
            let col = match *k {
                Some(k) => ColumnRef::Visible(k),
                None => hidden.column(g.clone(), AggMerge::None),
            };
            plan.group_by.push(col);
        }
        for o in &order {
            let (desc, nulls_first) = sort_options(o)?;
            let col = match order_target(&o.expr, &items)? {
                Some(OrderTarget::Visible(k)) => ColumnRef::Visible(k),
                Some(OrderTarget::CopyOf(k)) => {
                    let e = items[k]
                        .expr
                        .cloned()
                        .unwrap_or(Expr::Value(Value::Null.into()));
                    let m = hidden.merge_of(&e)?;
                    hidden.column(e, m)
                }
                None => {
                    if let Some(pos) = group_exprs.iter().position(|g| g == &o.expr) {
                        plan.group_by[pos]
                    } else {
                        let m = hidden.merge_of(&o.expr)?;
                        hidden.column(o.expr.clone(), m)
                    }
                }
            };
            if distinct && matches!(col, ColumnRef::Hidden(_)) {
                // Postgres: 42P10, ORDER BY expressions must appear in the select list.
                return Err(refuse(
                    "an ORDER BY expression that is not in the select list of a SELECT DISTINCT",
                ));
            }
            plan.order_by.push(SortKey {
                column: col,
                descending: desc,
                nulls_first,
            });
        }
        if let Some(h) = &sel.having {
            let mut conjuncts = Vec::new();
            split_and(h, &mut conjuncts);
            for c in conjuncts {
                let cond = having_cond(c, &items, group_exprs, &plan.group_by, &mut hidden)?;
                plan.having.push(cond);
            }
        }
        // The shards return every group's partials: no HAVING, ORDER BY or LIMIT there.
        if let SetExpr::Select(ns) = &mut *nq.body {
            ns.having = None;
        }
        nq.order_by = None;
        nq.limit_clause = None;
        nq.fetch = None;
        aggs.extend(hidden.columns.iter().map(|(_, m)| *m));
        plan.aggregates = aggs;
    } else {
        for o in &order {
            let (desc, nulls_first) = sort_options(o)?;
            let col = match order_target(&o.expr, &items)? {
                Some(OrderTarget::Visible(k)) => ColumnRef::Visible(k),
                Some(OrderTarget::CopyOf(k)) => {
                    let e = items[k]
                        .expr
                        .cloned()
                        .unwrap_or(Expr::Value(Value::Null.into()));
                    if distinct {
                        return Err(refuse("this ORDER BY with SELECT DISTINCT"));
                    }
                    hidden.column(e, AggMerge::None)
                }
                None => {
                    if distinct {
                        return Err(refuse(
                            "an ORDER BY expression that is not in the select list of a SELECT DISTINCT",
                        ));
                    }
                    hidden.column(o.expr.clone(), AggMerge::None)
                }
            };
            plan.order_by.push(SortKey {
                column: col,
                descending: desc,
                nulls_first,
            });
        }
        push_down_limit(&mut nq, limit, offset);
    }

    plan.hidden_columns = hidden.columns.len();
    if let SetExpr::Select(ns) = &mut *nq.body {
        for (e, _) in &hidden.columns {
            ns.projection.push(SelectItem::UnnamedExpr(e.clone()));
        }
    }
    plan.expressions = hidden.exprs;
    let rewritten = if nq != *q {
        let text = nq.to_string();
        // The rewrite must read back as exactly the query we built.
        let back = Parser::parse_sql(&PostgreSqlDialect {}, &text)
            .map_err(|_| refuse("this query's rewrite"))?;
        match back.as_slice() {
            [Statement::Query(b)] if **b == nq => Some(text),
            _ => return Err(refuse("this query's rewrite")),
        }
    } else {
        None
    };
    Ok(Merge { plan, rewritten })
}

fn split_and<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::Nested(inner) => split_and(inner, out),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            split_and(left, out);
            split_and(right, out);
        }
        other => out.push(other),
    }
}

/// One HAVING conjunct: an aggregate or a group key compared with a constant.
fn having_cond(
    c: &Expr,
    items: &[Item<'_>],
    group_exprs: &[Expr],
    group_cols: &[ColumnRef],
    hidden: &mut Helpers,
) -> Result<HavingCond, Refusal> {
    let unsupported = || {
        refuse("this HAVING condition (supported: aggregate or group key compared with a constant, joined by AND)")
    };
    let Expr::BinaryOp { left, op, right } = c else {
        return Err(unsupported());
    };
    let op = match op {
        BinaryOperator::Eq => CmpOp::Eq,
        BinaryOperator::NotEq => CmpOp::Ne,
        BinaryOperator::Lt => CmpOp::Lt,
        BinaryOperator::LtEq => CmpOp::Le,
        BinaryOperator::Gt => CmpOp::Gt,
        BinaryOperator::GtEq => CmpOp::Ge,
        _ => return Err(unsupported()),
    };
    let (subject, value, op) = match (constant(left), constant(right)) {
        (None, Some(v)) => (&**left, v, op),
        (Some(v), None) => (&**right, v, op.flipped()),
        _ => return Err(unsupported()),
    };
    let column = if has_aggregate(subject) {
        match items.iter().position(|it| it.expr == Some(subject)) {
            Some(k) => ColumnRef::Visible(k),
            None => {
                let m = hidden.merge_of(subject)?;
                hidden.column(subject.clone(), m)
            }
        }
    } else if let Some(pos) = group_exprs.iter().position(|g| g == subject) {
        group_cols[pos]
    } else if let Some(k) = items
        .iter()
        .position(|it| it.expr == Some(subject))
        .filter(|k| group_cols.contains(&ColumnRef::Visible(*k)))
    {
        // HAVING names are input columns only (never output names): matched as expressions.
        ColumnRef::Visible(k)
    } else {
        return Err(unsupported());
    };
    Ok(HavingCond { column, op, value })
}

/// A constant a merge can compare with: a number, a string, or a parameter.
fn constant(e: &Expr) -> Option<Constant> {
    match e {
        Expr::Nested(inner) => constant(inner),
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => Some(Constant::Number(n.clone())),
            Value::SingleQuotedString(s) => Some(Constant::Text(s.clone())),
            Value::Placeholder(p) => param_number(p).map(Constant::Param),
            _ => None,
        },
        Expr::UnaryOp {
            op: sqlparser::ast::UnaryOperator::Minus,
            expr,
        } => match constant(expr)? {
            Constant::Number(n) if !n.starts_with('-') => Some(Constant::Number(format!("-{n}"))),
            _ => None,
        },
        _ => None,
    }
}

fn check_clauses(q: &Query, s: &Select) -> Result<(), Refusal> {
    if q.fetch.as_ref().is_some_and(|f| f.with_ties || f.percent) {
        return Err(refuse("FETCH ... WITH TIES / PERCENT"));
    }
    if let Some(LimitClause::LimitOffset { limit_by, .. }) = &q.limit_clause {
        if !limit_by.is_empty() {
            return Err(refuse("LIMIT BY"));
        }
    }
    if matches!(q.limit_clause, Some(LimitClause::OffsetCommaLimit { .. })) {
        return Err(refuse("LIMIT offset, count"));
    }
    if q.for_clause.is_some() || q.settings.is_some() || q.format_clause.is_some() {
        return Err(refuse("this query clause"));
    }
    if !q.pipe_operators.is_empty() {
        return Err(refuse("pipe operators"));
    }
    if s.into.is_some() {
        return Err(refuse("SELECT INTO"));
    }
    if !s.named_window.is_empty() || s.qualify.is_some() {
        return Err(refuse("a window function"));
    }
    if s.top.is_some()
        || !s.lateral_views.is_empty()
        || s.prewhere.is_some()
        || !s.connect_by.is_empty()
        || !s.cluster_by.is_empty()
        || !s.distribute_by.is_empty()
        || !s.sort_by.is_empty()
        || s.value_table_mode.is_some()
        || s.exclude.is_some()
    {
        return Err(refuse("this SELECT clause"));
    }
    Ok(())
}

/// A select-list item: its expression (`None` for `*`), its output name, and its column
/// index when known (no `*` before it).
struct Item<'a> {
    expr: Option<&'a Expr>,
    name: Option<String>,
    index: Option<usize>,
}

fn items(sel: &Select) -> Vec<Item<'_>> {
    let mut out = Vec::with_capacity(sel.projection.len());
    let mut known = true;
    for (k, it) in sel.projection.iter().enumerate() {
        let index = known.then_some(k);
        match it {
            SelectItem::UnnamedExpr(e) => out.push(Item {
                expr: Some(e),
                name: output_name(e),
                index,
            }),
            SelectItem::ExprWithAlias { expr, alias } => out.push(Item {
                expr: Some(expr),
                name: Some(norm_ident(alias)),
                index,
            }),
            SelectItem::ExprWithAliases { expr, .. } => out.push(Item {
                expr: Some(expr),
                name: None,
                index,
            }),
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                known = false;
                out.push(Item {
                    expr: None,
                    name: None,
                    index: None,
                });
            }
        }
    }
    out
}

/// The column name Postgres gives an unaliased expression, where it is a name.
fn output_name(e: &Expr) -> Option<String> {
    figure_name(e).map(|(_, name)| name)
}

/// Postgres's FigureColname where the router can tell: a column's or function's name
/// (strength 2), through casts; else the name of the type a cast converts to (strength 1,
/// the types of expressions over aggregates); `?column?` for operators and constants
/// (strength 0). None for expression kinds it does not name here.
fn figure_name(e: &Expr) -> Option<(u8, String)> {
    match e {
        Expr::Identifier(id) => Some((2, norm_ident(id))),
        Expr::CompoundIdentifier(parts) => parts.last().map(|p| (2, norm_ident(p))),
        Expr::Nested(inner) => figure_name(inner),
        Expr::Function(f) => f
            .name
            .0
            .last()
            .and_then(ObjectNamePart::as_ident)
            .map(|i| (2, norm_ident(i))),
        Expr::Cast {
            expr, data_type, ..
        } => match figure_name(expr)? {
            (2, name) => Some((2, name)),
            _ => arith_type(data_type).map(|t| (1, t.pg_name().to_string())),
        },
        Expr::BinaryOp { .. } | Expr::UnaryOp { .. } => Some((0, "?column?".to_string())),
        Expr::Value(v) => match &v.value {
            Value::Number(..) | Value::SingleQuotedString(_) => Some((0, "?column?".to_string())),
            _ => None,
        },
        _ => None,
    }
}

enum OrderTarget {
    /// A visible column at a known index.
    Visible(usize),
    /// The same value as item k, whose index is not known (after a `*`): copy it.
    CopyOf(usize),
}

/// Postgres's ORDER BY rules: a constant integer is a position; a bare name is an output
/// column name first (two output columns of that name: 42702, as on Postgres); anything
/// else is matched against the select-list expressions.
fn order_target(e: &Expr, items: &[Item<'_>]) -> Result<Option<OrderTarget>, Refusal> {
    if let Some(p) = position(e) {
        // Positions count output columns, `*` expanded: the index is p-1 either way.
        return Ok(Some(OrderTarget::Visible(p - 1)));
    }
    if let Expr::Identifier(id) = e {
        let name = norm_ident(id);
        let hits: Vec<usize> = (0..items.len())
            .filter(|&k| items[k].name.as_deref() == Some(name.as_str()))
            .collect();
        if let [k] = hits.as_slice() {
            return Ok(Some(match items[*k].index {
                Some(i) => OrderTarget::Visible(i),
                None => OrderTarget::CopyOf(*k),
            }));
        }
        if hits.len() > 1 {
            return Err(Refusal {
                sqlstate: "42702",
                message: format!("ORDER BY \"{name}\" is ambiguous"),
            });
        }
    }
    let Some(k) = items.iter().position(|it| it.expr == Some(e)) else {
        return Ok(None);
    };
    Ok(Some(match items[k].index {
        Some(i) => OrderTarget::Visible(i),
        None => OrderTarget::CopyOf(k),
    }))
}

/// GROUP BY rules: a position, an expression equal to an item, or a bare name, which
/// Postgres takes for an input column first and an output name only when no input column
/// has it. Returns the item. The router cannot see input columns, so a bare name that is
/// the output name of a different expression (`SELECT name AS id ... GROUP BY id`, which
/// groups by the table's id if there is one) is refused.
fn group_target(g: &Expr, items: &[Item<'_>]) -> Result<Option<usize>, Refusal> {
    if let Some(p) = position(g) {
        return Ok(
            (p <= items.len() && items[..p].iter().all(|i| i.expr.is_some())).then(|| p - 1),
        );
    }
    if let Some(k) = items.iter().position(|it| it.expr == Some(g)) {
        return Ok(Some(k));
    }
    if let Expr::Identifier(id) = g {
        let name = norm_ident(id);
        let hits: Vec<usize> = (0..items.len())
            .filter(|&k| items[k].name.as_deref() == Some(name.as_str()))
            .collect();
        if let [k] = hits.as_slice() {
            // `u.name AS name`: the input column of that name, whichever Postgres picks.
            let same_column = matches!(
                items[*k].expr,
                Some(Expr::CompoundIdentifier(parts))
                    if parts.last().is_some_and(|p| norm_ident(p) == name)
            );
            if same_column {
                return Ok(Some(*k));
            }
            return Err(Refusal::unsupported(format!(
                "GROUP BY {name} across shards is ambiguous here: {name} is the name of an \
                 output column computed from another expression, but Postgres groups by an \
                 input column {name} if the tables have one, which shardgate cannot see; \
                 write the expression or its position (GROUP BY 1, ...) instead"
            )));
        }
    }
    Ok(None)
}

/// A positive integer constant (a position in ORDER BY / GROUP BY).
fn position(e: &Expr) -> Option<usize> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse::<usize>().ok().filter(|&p| p > 0),
            _ => None,
        },
        _ => None,
    }
}

fn sort_options(o: &sqlparser::ast::OrderByExpr) -> Result<(bool, bool), Refusal> {
    if o.with_fill.is_some() {
        return Err(refuse("ORDER BY ... WITH FILL"));
    }
    let desc = match &o.options.sort {
        None | Some(OrderBySort::Asc) => false,
        Some(OrderBySort::Desc) => true,
        Some(OrderBySort::Using(_)) => return Err(refuse("ORDER BY ... USING")),
    };
    Ok((desc, o.options.nulls_first.unwrap_or(desc)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AggKind {
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

/// A supported aggregate call standing alone.
fn bare_aggregate(e: &Expr) -> Option<(AggKind, &Function)> {
    let Expr::Function(f) = e else { return None };
    if f.over.is_some()
        || !f.within_group.is_empty()
        || f.null_treatment.is_some()
        || f.uses_odbc_syntax
        || !matches!(f.parameters, FunctionArguments::None)
    {
        return None;
    }
    let name = function_name(f)?;
    let kind = match name.as_str() {
        "count" => AggKind::Count,
        "sum" => AggKind::Sum,
        "min" => AggKind::Min,
        "max" => AggKind::Max,
        "avg" => AggKind::Avg,
        _ => return None,
    };
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    if matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct))
        || list.args.len() != 1
    {
        return None;
    }
    // No aggregate inside the arguments (invalid SQL anyway).
    let mut s = Scan::default();
    for a in &list.args {
        if let sqlparser::ast::FunctionArg::Unnamed(sqlparser::ast::FunctionArgExpr::Expr(x)) = a {
            s.expr(x);
        }
    }
    (!s.agg && !s.window).then_some((kind, f))
}

fn function_name(f: &Function) -> Option<String> {
    f.name
        .0
        .last()
        .and_then(ObjectNamePart::as_ident)
        .map(|i| i.value.to_ascii_lowercase())
}

/// An aggregate the merge can finish: standing alone, or inside a wrapper whose result
/// the merge computes itself from the combined value. (Casts, `coalesce(sum(x), 0)` and
/// arithmetic around aggregates are expressions: `Helpers::expression`.)
#[derive(Debug, Clone, Copy)]
enum Merged<'a> {
    Bare(AggKind, &'a Function),
    /// `round(avg(x))` or `round(avg(x), n)` with a literal `n` from 0 to 1000: the
    /// shards' sums and counts give the average, which is then rounded as Postgres rounds
    /// it. The avg() call, and the places.
    RoundedAvg(&'a Function, u32),
}

fn merged(e: &Expr) -> Option<Merged<'_>> {
    if let Some(m) = bare_aggregate(e) {
        return Some(Merged::Bare(m.0, m.1));
    }
    let (agg, places) = match plain_call(e, "round").as_deref()? {
        [agg] => (*agg, 0),
        [agg, places] => (*agg, integer_literal(places).filter(|&p| p <= 1000)?),
        _ => return None,
    };
    match bare_aggregate(agg)? {
        (AggKind::Avg, f) => Some(Merged::RoundedAvg(f, places)),
        _ => None,
    }
}

/// What the rewrite adds for the merge of a grouped query: hidden columns, and the
/// expressions of `AggMerge::Expr` columns.
#[derive(Default)]
struct Helpers {
    columns: Vec<(Expr, AggMerge)>,
    exprs: Vec<AggExpr>,
}

impl Helpers {
    /// A hidden column computing `e` on the shards, combined by `m` (reused when present).
    /// An expression column is a typed NULL on the shards (see `AggMerge::Expr`).
    fn column(&mut self, e: Expr, m: AggMerge) -> ColumnRef {
        let e = if matches!(m, AggMerge::Expr(_)) {
            never_evaluated(e)
        } else {
            e
        };
        if let Some(i) = self.columns.iter().position(|(h, hm)| *h == e && *hm == m) {
            return ColumnRef::Hidden(i);
        }
        self.columns.push((e, m));
        ColumnRef::Hidden(self.columns.len() - 1)
    }

    /// How column `e` of a grouped query combines; adds the hidden columns it reads.
    fn merge_of(&mut self, e: &Expr) -> Result<AggMerge, Refusal> {
        Ok(match merged(e) {
            Some(Merged::Bare(AggKind::Count, _)) => AggMerge::Count,
            Some(Merged::Bare(AggKind::Sum, _)) => AggMerge::Sum,
            Some(Merged::Bare(AggKind::Min, _)) => AggMerge::Min,
            Some(Merged::Bare(AggKind::Max, _)) => AggMerge::Max,
            Some(Merged::Bare(AggKind::Avg, f)) => self.avg(f, None),
            Some(Merged::RoundedAvg(f, places)) => self.avg(f, Some(places)),
            None if has_aggregate(e) => {
                let x = self.expression(e)?;
                self.exprs.push(x);
                AggMerge::Expr(self.exprs.len() - 1)
            }
            None => AggMerge::None,
        })
    }

    /// avg(x) as hidden sum(x) and count(x), optionally rounded.
    fn avg(&mut self, f: &Function, round: Option<u32>) -> AggMerge {
        let mut sum = f.clone();
        rename(&mut sum, "sum");
        let mut count = f.clone();
        rename(&mut count, "count");
        let sum = self.column(Expr::Function(sum), AggMerge::Sum);
        let count = self.column(Expr::Function(count), AggMerge::Count);
        AggMerge::Avg { sum, count, round }
    }

    /// `e` as arithmetic over combined aggregates and number literals; its aggregates
    /// become hidden columns.
    fn expression(&mut self, e: &Expr) -> Result<AggExpr, Refusal> {
        if let Some(n) = number_literal(e) {
            return Ok(AggExpr::Number(n));
        }
        Ok(match e {
            Expr::Nested(inner) => self.expression(inner)?,
            // Before the aggregates: a count cast inside an expression is the merge's cast
            // of the total, not a sum of the shards' casts.
            Expr::Cast {
                kind: CastKind::DoubleColon | CastKind::Cast,
                expr,
                data_type,
                format: None,
            } => match arith_type(data_type) {
                Some(to) => AggExpr::Cast {
                    to,
                    expr: Box::new(self.expression(expr)?),
                },
                None => return Err(unsupported_expression()),
            },
            Expr::UnaryOp {
                op: UnaryOperator::Minus,
                expr,
            } => AggExpr::Neg(Box::new(self.expression(expr)?)),
            Expr::BinaryOp { left, op, right } => {
                let op = match op {
                    BinaryOperator::Plus => ArithOp::Add,
                    BinaryOperator::Minus => ArithOp::Sub,
                    BinaryOperator::Multiply => ArithOp::Mul,
                    BinaryOperator::Divide => ArithOp::Div,
                    _ => return Err(unsupported_expression()),
                };
                AggExpr::Arith {
                    op,
                    left: Box::new(self.expression(left)?),
                    right: Box::new(self.expression(right)?),
                }
            }
            _ if merged(e).is_some() => {
                let m = self.merge_of(e)?;
                AggExpr::Column(self.column(e.clone(), m))
            }
            _ => {
                if let Some([a, b]) = plain_call(e, "nullif").as_deref() {
                    AggExpr::NullIf(Box::new(self.expression(a)?), Box::new(self.expression(b)?))
                } else if let Some([a, b]) = plain_call(e, "coalesce").as_deref() {
                    // Only a literal fallback: coalesce does not evaluate the arguments
                    // after the first non-NULL one, which a fold here would.
                    let Some(fallback) = number_literal(b) else {
                        return Err(unsupported_expression());
                    };
                    AggExpr::Coalesce(
                        Box::new(self.expression(a)?),
                        Box::new(AggExpr::Number(fallback)),
                    )
                } else {
                    return Err(unsupported_expression());
                }
            }
        })
    }
}

fn unsupported_expression() -> Refusal {
    refuse(
        "this expression over aggregates when groups span shards (supported: + - * / over \
         aggregates and numbers, nullif, coalesce with a number, casts to integer, numeric \
         and double precision)",
    )
}

/// A select-list expression over aggregates as the shards run it: a typed NULL, under the
/// name Postgres gives the expression.
fn never_evaluated_item(item: &mut SelectItem) {
    match item {
        SelectItem::UnnamedExpr(e) => {
            let alias = Ident::with_quote('"', figured_name(e));
            let expr = never_evaluated(e.clone());
            *item = SelectItem::ExprWithAlias { expr, alias };
        }
        SelectItem::ExprWithAlias { expr, .. } | SelectItem::ExprWithAliases { expr, .. } => {
            *expr = never_evaluated(expr.clone());
        }
        SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {}
    }
}

fn has_aggregate(e: &Expr) -> bool {
    let mut s = Scan::default();
    s.expr(e);
    s.agg
}

/// `CASE WHEN false THEN e END`: a NULL of `e`'s type that Postgres never computes (the
/// planner drops the branch without simplifying it, so not even its constants fold).
fn never_evaluated(e: Expr) -> Expr {
    Expr::Case {
        case_token: AttachedToken::empty(),
        end_token: AttachedToken::empty(),
        operand: None,
        conditions: vec![CaseWhen {
            condition: Expr::Value(Value::Boolean(false).into()),
            result: e,
        }],
        else_result: None,
    }
}

/// A number literal with its sign folded in, as Postgres's grammar folds a minus into a
/// constant (`-5`, `-(5)`, `- -5`): digits with at most one point, no exponent.
fn number_literal(e: &Expr) -> Option<String> {
    match e {
        Expr::Nested(inner) => number_literal(inner),
        Expr::Value(v) => match &v.value {
            Value::Number(n, false)
                if n.bytes().any(|b| b.is_ascii_digit())
                    && n.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                    && n.bytes().filter(|&b| b == b'.').count() <= 1 =>
            {
                Some(n.clone())
            }
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => {
            let n = number_literal(expr)?;
            Some(match n.strip_prefix('-') {
                Some(positive) => positive.to_string(),
                None => format!("-{n}"),
            })
        }
        _ => None,
    }
}

/// The type a cast in an expression over aggregates converts to (no type modifiers).
fn arith_type(t: &DataType) -> Option<ArithType> {
    use sqlparser::ast::ExactNumberInfo;
    Some(match t {
        DataType::SmallInt(None) | DataType::Int2(None) => ArithType::Int2,
        DataType::Int(None) | DataType::Integer(None) | DataType::Int4(None) => ArithType::Int4,
        DataType::BigInt(None) | DataType::Int8(None) => ArithType::Int8,
        DataType::Numeric(ExactNumberInfo::None)
        | DataType::Decimal(ExactNumberInfo::None)
        | DataType::Dec(ExactNumberInfo::None) => ArithType::Numeric,
        DataType::DoublePrecision | DataType::Float8 | DataType::Float(ExactNumberInfo::None) => {
            ArithType::Float8
        }
        _ => return None,
    })
}

/// The name Postgres gives an unaliased select-list expression over aggregates.
fn figured_name(e: &Expr) -> String {
    output_name(e).unwrap_or_else(|| "?column?".to_string())
}

/// The arguments of Postgres's own `name(args)` (unqualified or `pg_catalog.`), called
/// plainly (no FILTER, OVER, DISTINCT or ORDER BY in the call), each an expression.
fn plain_call<'a>(e: &'a Expr, name: &str) -> Option<Vec<&'a Expr>> {
    let Expr::Function(f) = e else { return None };
    let builtin = match &f.name.0[..] {
        [_] => true,
        [schema, _] => schema
            .as_ident()
            .is_some_and(|i| i.value.eq_ignore_ascii_case("pg_catalog")),
        _ => false,
    };
    if !builtin
        || function_name(f)? != name
        || f.over.is_some()
        || f.filter.is_some()
        || !f.within_group.is_empty()
        || f.null_treatment.is_some()
        || f.uses_odbc_syntax
        || !matches!(f.parameters, FunctionArguments::None)
    {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
        return None;
    }
    list.args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => Some(x),
            _ => None,
        })
        .collect()
}

/// An unsigned integer literal as written (`0`, `2`; not `0.0`, `-1` or `'2'`).
fn integer_literal(e: &Expr) -> Option<u32> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, false) if n.bytes().all(|b| b.is_ascii_digit()) => n.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

fn rename(f: &mut Function, name: &str) {
    f.name = sqlparser::ast::ObjectName(vec![ObjectNamePart::Identifier(
        sqlparser::ast::Ident::new(name),
    )]);
}

fn count_of(e: &Expr) -> Result<Option<RowCount>, Refusal> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n
                .parse::<u64>()
                .map(|v| Some(RowCount::Value(v)))
                .map_err(|_| refuse("this LIMIT/OFFSET value")),
            Value::Null => Ok(None),
            Value::Placeholder(p) => param_number(p)
                .map(|n| Some(RowCount::Param(n)))
                .ok_or_else(|| refuse("this LIMIT/OFFSET parameter")),
            _ => Err(refuse("this LIMIT/OFFSET value")),
        },
        Expr::Nested(inner) => count_of(inner),
        Expr::Cast {
            expr, data_type, ..
        } if matches!(&**expr, Expr::Value(v) if matches!(v.value, Value::Placeholder(_)))
            && matches!(
                data_type,
                DataType::BigInt(_) | DataType::Int(_) | DataType::Integer(_) | DataType::Int8(_)
            ) =>
        {
            count_of(expr)
        }
        _ => Err(refuse("a LIMIT/OFFSET expression")),
    }
}

fn limit_offset(q: &Query) -> Result<(Option<RowCount>, Option<RowCount>), Refusal> {
    let (mut limit, mut offset) = (None, None);
    if let Some(LimitClause::LimitOffset {
        limit: l,
        offset: o,
        ..
    }) = &q.limit_clause
    {
        if let Some(l) = l {
            limit = count_of(l)?;
        }
        if let Some(o) = o {
            offset = count_of(&o.value)?;
        }
    }
    if let Some(f) = &q.fetch {
        if limit.is_some() {
            return Err(refuse("LIMIT together with FETCH"));
        }
        limit = match &f.quantity {
            Some(e) => count_of(e)?,
            None => Some(RowCount::Value(1)),
        };
    }
    if offset == Some(RowCount::Value(0)) {
        offset = None;
    }
    Ok((limit, offset))
}

fn number(n: u64) -> Expr {
    Expr::Value(Value::Number(n.to_string(), false).into())
}

fn as_bigint(n: usize) -> Expr {
    Expr::Cast {
        kind: CastKind::DoubleColon,
        expr: Box::new(Expr::Value(Value::Placeholder(format!("${n}")).into())),
        data_type: DataType::BigInt(None),
        format: None,
    }
}

fn count_expr(c: RowCount) -> Expr {
    match c {
        RowCount::Value(v) => number(v),
        RowCount::Param(n) => as_bigint(n),
    }
}

/// Shards get `LIMIT limit+offset` and no OFFSET (the merge applies both). Parameters stay
/// referenced so the statement keeps its parameter list.
fn push_down_limit(nq: &mut Query, limit: Option<RowCount>, offset: Option<RowCount>) {
    if limit.is_none() && offset.is_none() {
        return;
    }
    let new_limit = match (limit, offset) {
        (Some(RowCount::Value(l)), None) => Some(number(l)),
        (Some(RowCount::Value(l)), Some(RowCount::Value(o))) => l.checked_add(o).map(number),
        (Some(l), None) => Some(count_expr(l)),
        (Some(l), Some(o)) => Some(Expr::BinaryOp {
            left: Box::new(count_expr(l)),
            op: sqlparser::ast::BinaryOperator::Plus,
            right: Box::new(count_expr(o)),
        }),
        (None, _) => None,
    };
    // OFFSET $n without LIMIT: keep $n referenced, as a zero offset.
    let new_offset = match (limit, offset) {
        (None, Some(RowCount::Param(n))) => Some(Offset {
            value: Expr::BinaryOp {
                left: Box::new(as_bigint(n)),
                op: sqlparser::ast::BinaryOperator::Multiply,
                right: Box::new(number(0)),
            },
            rows: OffsetRows::None,
        }),
        _ => None,
    };
    nq.fetch = None;
    nq.limit_clause = if new_limit.is_none() && new_offset.is_none() {
        None
    } else {
        Some(LimitClause::LimitOffset {
            limit: new_limit,
            offset: new_offset,
            limit_by: vec![],
        })
    };
}

/// Aggregate and window calls in an expression, not counting subqueries.
#[derive(Default)]
struct Scan {
    depth: usize,
    agg: bool,
    window: bool,
    distinct_agg: bool,
    unsupported_agg: Option<String>,
}

impl Scan {
    fn expr(&mut self, e: &Expr) {
        let _ = e.visit(self);
    }
}

impl Visitor for Scan {
    type Break = ();

    fn pre_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.depth > 0 {
            return ControlFlow::Continue(());
        }
        if let Expr::Function(f) = e {
            if f.over.is_some() {
                self.window = true;
                return ControlFlow::Continue(());
            }
            let Some(name) = function_name(f) else {
                return ControlFlow::Continue(());
            };
            // WITHIN GROUP makes any function an ordered-set or hypothetical-set aggregate
            // (percentile_cont, mode, rank(3), user-defined ones): none combines from
            // per-shard results.
            let ordered_set = !f.within_group.is_empty();
            if ordered_set || is_aggregate(&name) {
                self.agg = true;
                if let FunctionArguments::List(l) = &f.args {
                    if matches!(l.duplicate_treatment, Some(DuplicateTreatment::Distinct)) {
                        self.distinct_agg = true;
                    }
                }
                let supported = matches!(name.as_str(), "count" | "sum" | "min" | "max" | "avg")
                    && !ordered_set;
                if !supported && self.unsupported_agg.is_none() {
                    self.unsupported_agg = Some(name);
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// Finds, inside subqueries, an aggregate whose arguments use the top-level query's columns.
/// Postgres evaluates such an aggregate (`SELECT (SELECT max(p.id)) FROM posts p`) at the
/// outer level, over all the outer rows: one value per group of the whole query, which
/// per-shard rows do not give. Conservative: any outer column in the arguments counts,
/// even next to the subquery's own columns.
struct OuterAgg {
    /// Names the top-level FROM list defines (aliases or table names).
    top: Vec<String>,
    /// For each enclosing subquery level: the names its FROM list defines.
    levels: Vec<Vec<String>>,
}

impl OuterAgg {
    fn new(sel: &Select) -> Self {
        OuterAgg {
            top: from_names(&sel.from),
            levels: Vec::new(),
        }
    }

    /// Whether `e`, inside the current subquery, reads a column of the top-level query.
    fn reads_outer(&self, e: &Expr) -> bool {
        match e {
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                let q = parts[parts.len() - 2].value.to_ascii_lowercase();
                self.outer_name(&q)
            }
            // An unqualified name is the subquery's own column unless no level in between
            // has a FROM list.
            Expr::Identifier(_) => self.levels.iter().all(|l| l.is_empty()),
            _ => false,
        }
    }

    fn outer_name(&self, q: &str) -> bool {
        self.top.iter().any(|t| t == q) && !self.levels.iter().flatten().any(|n| n == q)
    }
}

impl Visitor for OuterAgg {
    type Break = String;

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<String> {
        let names = match &*q.body {
            SetExpr::Select(s) => from_names(&s.from),
            _ => Vec::new(),
        };
        self.levels.push(names);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<String> {
        self.levels.pop();
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<String> {
        let Expr::Function(f) = e else {
            return ControlFlow::Continue(());
        };
        if self.levels.is_empty() || f.over.is_some() {
            return ControlFlow::Continue(());
        }
        let Some(name) = function_name(f) else {
            return ControlFlow::Continue(());
        };
        if !is_aggregate(&name) && f.within_group.is_empty() {
            return ControlFlow::Continue(());
        }
        let FunctionArguments::List(list) = &f.args else {
            return ControlFlow::Continue(());
        };
        let mut outer = false;
        for a in &list.args {
            let arg = match a {
                sqlparser::ast::FunctionArg::Named { arg, .. }
                | sqlparser::ast::FunctionArg::ExprNamed { arg, .. }
                | sqlparser::ast::FunctionArg::Unnamed(arg) => arg,
            };
            match arg {
                sqlparser::ast::FunctionArgExpr::Expr(x) => {
                    let _ = x.visit(&mut ExprRefs(&mut |r: &Expr| {
                        outer |= self.reads_outer(r);
                    }));
                }
                sqlparser::ast::FunctionArgExpr::QualifiedWildcard(n) => {
                    if let Some(q) = n.0.last().and_then(ObjectNamePart::as_ident) {
                        outer |= self.outer_name(&q.value.to_ascii_lowercase());
                    }
                }
                sqlparser::ast::FunctionArgExpr::Wildcard
                | sqlparser::ast::FunctionArgExpr::WildcardWithOptions(_) => {}
            }
        }
        if outer {
            ControlFlow::Break(name)
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// Calls a closure on every expression (column references included).
struct ExprRefs<'a>(&'a mut dyn FnMut(&Expr));

impl Visitor for ExprRefs<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        (self.0)(e);
        ControlFlow::Continue(())
    }
}

/// The names a FROM list defines: aliases, else table names (lower case).
fn from_names(from: &[sqlparser::ast::TableWithJoins]) -> Vec<String> {
    fn factor(tf: &sqlparser::ast::TableFactor, out: &mut Vec<String>) {
        use sqlparser::ast::TableFactor as T;
        match tf {
            T::NestedJoin {
                table_with_joins,
                alias,
            } => {
                factor(&table_with_joins.relation, out);
                for j in &table_with_joins.joins {
                    factor(&j.relation, out);
                }
                if let Some(a) = alias {
                    out.push(a.name.value.to_ascii_lowercase());
                }
            }
            T::Table { name, alias, .. } => match alias {
                Some(a) => out.push(a.name.value.to_ascii_lowercase()),
                None => {
                    if let Some(id) = name.0.last().and_then(ObjectNamePart::as_ident) {
                        out.push(id.value.to_ascii_lowercase());
                    }
                }
            },
            T::Derived { alias, .. }
            | T::TableFunction { alias, .. }
            | T::Function { alias, .. }
            | T::UNNEST { alias, .. }
            | T::JsonTable { alias, .. } => {
                if let Some(a) = alias {
                    out.push(a.name.value.to_ascii_lowercase());
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for twj in from {
        factor(&twj.relation, &mut out);
        for j in &twj.joins {
            factor(&j.relation, &mut out);
        }
    }
    out
}

/// Postgres's built-in aggregate functions.
fn is_aggregate(name: &str) -> bool {
    matches!(
        name,
        "count"
            | "sum"
            | "min"
            | "max"
            | "avg"
            | "array_agg"
            | "string_agg"
            | "bool_and"
            | "bool_or"
            | "every"
            | "bit_and"
            | "bit_or"
            | "bit_xor"
            | "json_agg"
            | "jsonb_agg"
            | "json_agg_strict"
            | "jsonb_agg_strict"
            | "json_object_agg"
            | "jsonb_object_agg"
            | "json_object_agg_strict"
            | "jsonb_object_agg_strict"
            | "json_object_agg_unique"
            | "jsonb_object_agg_unique"
            | "json_objectagg"
            | "json_arrayagg"
            | "xmlagg"
            | "stddev"
            | "stddev_pop"
            | "stddev_samp"
            | "variance"
            | "var_pop"
            | "var_samp"
            | "corr"
            | "covar_pop"
            | "covar_samp"
            | "regr_avgx"
            | "regr_avgy"
            | "regr_count"
            | "regr_intercept"
            | "regr_r2"
            | "regr_slope"
            | "regr_sxx"
            | "regr_sxy"
            | "regr_syy"
            | "mode"
            | "percentile_cont"
            | "percentile_disc"
            | "any_value"
            | "range_agg"
            | "range_intersect_agg"
            | "grouping"
    )
}
