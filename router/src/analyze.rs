//! What a parsed statement touches and how its sharded tables relate.
//!
//! Two passes over the AST:
//! - an [`Inventory`] built with sqlparser's visitor, which by construction sees every table,
//!   function call, locking clause and data-modifying query anywhere in the statement;
//! - a structural walk ([`Analyzer`]) that splits the statement into query blocks (each
//!   SELECT, each DML statement, each subquery) and records, for every occurrence of a
//!   sharded table ("instance"), the shard-key equalities that tie it to other instances
//!   (edges) and to constants or parameters (pins).
//!
//! The planner then decides with [`Analyzer::closure`]: starting from some instances, which
//! others are guaranteed to meet them only on the same shard. If the walk missed an
//! instance the inventory saw (a table inside an expression form the walk does not
//! descend), [`Analyzer::complete`] is false and the planner refuses rather than guess.

use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, JoinConstraint, JoinOperator,
    ObjectName, ObjectNamePart, Query, Select, SelectItem, SetExpr, Statement, TableFactor,
    TableWithJoins, UnaryOperator, Value, Visit, Visitor,
};

use crate::catalog::{Catalog, KeyType, TableClass};
use crate::keys::{key_from_lit, Lit};
use crate::types::{KeyExpr, KeyValue};

/// Lower-cases unquoted identifiers, as Postgres folds them.
pub(crate) fn norm_ident(id: &Ident) -> String {
    if id.quote_style.is_none() {
        id.value.to_ascii_lowercase()
    } else {
        id.value.clone()
    }
}

/// `[schema.]name` of an object name, both lower case (table names are matched without
/// regard to quoting: see [`Catalog`]).
pub(crate) fn split_name(name: &ObjectName) -> (Option<String>, String) {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(id) => id.value.to_ascii_lowercase(),
            other => other.to_string().to_ascii_lowercase(),
        })
        .collect();
    let n = parts.len();
    match n {
        0 => (None, String::new()),
        1 => (None, parts[0].clone()),
        _ => (Some(parts[n - 2].clone()), parts[n - 1].clone()),
    }
}

// ---------------------------------------------------------------------------------------
// Inventory

/// Everything in a statement that decides its role and which tables it touches.
#[derive(Debug, Default)]
pub(crate) struct Inventory {
    /// Table references (schema, table), CTE references excluded.
    pub relations: Vec<(Option<String>, String)>,
    /// Names of all CTEs defined anywhere in the statement.
    pub ctes: Vec<String>,
    pub write_function: bool,
    pub locks: bool,
    /// A data-modifying statement inside a query (CTE or body).
    pub dml: bool,
    pub select_into: bool,
}

struct InventoryVisitor<'c> {
    catalog: &'c Catalog,
    inv: Inventory,
    raw_relations: Vec<(Option<String>, String)>,
    skip_relation: bool,
}

impl InventoryVisitor<'_> {
    fn function(&mut self, name: &ObjectName) {
        let (schema, f) = split_name(name);
        if self.catalog.is_write_function(schema.as_deref(), &f) {
            self.inv.write_function = true;
        }
    }
}

impl Visitor for InventoryVisitor<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if !q.locks.is_empty() {
            self.inv.locks = true;
        }
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                self.inv
                    .ctes
                    .push(norm_ident(&cte.alias.name).to_ascii_lowercase());
            }
        }
        if matches!(
            *q.body,
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_)
        ) {
            self.inv.dml = true;
        }
        table_commands(&q.body, &mut self.raw_relations);
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, s: &Select) -> ControlFlow<()> {
        if s.into.is_some() {
            self.inv.select_into = true;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        match tf {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            } => {
                // A set-returning function call, not a table.
                self.skip_relation = true;
                self.function(name);
            }
            TableFactor::Function { name, .. } => self.function(name),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, name: &ObjectName) -> ControlFlow<()> {
        if std::mem::take(&mut self.skip_relation) {
            return ControlFlow::Continue(());
        }
        self.raw_relations.push(split_name(name));
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            self.function(&f.name);
        }
        ControlFlow::Continue(())
    }
}

/// `TABLE name` commands in a query body (the visitor reports no relation for them).
fn table_commands(body: &SetExpr, out: &mut Vec<(Option<String>, String)>) {
    match body {
        SetExpr::Table(t) => {
            if let Some(name) = &t.table_name {
                out.push((
                    t.schema_name.as_ref().map(|s| s.value.to_ascii_lowercase()),
                    name.value.to_ascii_lowercase(),
                ));
            }
        }
        SetExpr::SetOperation { left, right, .. } => {
            table_commands(left, out);
            table_commands(right, out);
        }
        _ => {}
    }
}

pub(crate) fn inventory(stmt: &Statement, catalog: &Catalog) -> Inventory {
    let mut v = InventoryVisitor {
        catalog,
        inv: Inventory::default(),
        raw_relations: Vec::new(),
        skip_relation: false,
    };
    let _ = stmt.visit(&mut v);
    let mut inv = v.inv;
    inv.relations = v
        .raw_relations
        .into_iter()
        .filter(|(schema, t)| !(schema.is_none() && inv.ctes.iter().any(|c| c == t)))
        .collect();
    inv
}

// ---------------------------------------------------------------------------------------
// Structural walk

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PinValue {
    Eq(KeyExpr),
    Set(Vec<KeyExpr>),
}

/// A restriction of an instance's rows (in its own block) to key values.
#[derive(Debug, Clone)]
pub(crate) struct Pin {
    pub inst: usize,
    pub value: PinValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EdgeKind {
    /// `a.key = b.key` in a conjunct of `block`'s WHERE or a JOIN ON.
    Eq,
    /// `a.key IN (SELECT b.key FROM ...)`: `a` outside, `b` in the (row-local) subquery.
    In,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Edge {
    pub a: usize,
    pub b: usize,
    pub block: usize,
    pub kind: EdgeKind,
}

/// One occurrence of a sharded table.
#[derive(Debug, Clone)]
pub(crate) struct Inst {
    pub block: usize,
    pub table: String,
    pub key_column: String,
    pub key_type: KeyType,
    /// False under an alias with a column list (`posts AS p(a, b)`): the list renames
    /// columns by position, which the router does not know, so no name may be taken for
    /// the shard key (`p.user_id` there can be any column).
    pub key_named: bool,
    /// On the NULL-filled side of an outer join in its block: its key can be NULL in a
    /// joined row on every shard, so grouping by it does not keep groups on one shard.
    pub nullable: bool,
}

impl Inst {
    /// Whether column name `col` (normalized) of this occurrence is its shard key.
    pub fn key_is(&self, col: &str) -> bool {
        self.key_named && self.key_column == col
    }
}

/// A name visible in a block's FROM list.
#[derive(Debug, Clone)]
struct Entry {
    qualifier: String,
    schema: Option<String>,
    inst: Option<usize>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Block {
    pub parent: Option<usize>,
    entries: Vec<Entry>,
    /// A JOIN ... USING / NATURAL JOIN merges same-named columns (COALESCE for FULL
    /// joins): unqualified names are not resolved in this block.
    merged_columns: bool,
}

pub(crate) struct Analyzer<'c> {
    catalog: &'c Catalog,
    pub blocks: Vec<Block>,
    pub insts: Vec<Inst>,
    pub edges: Vec<Edge>,
    pub pins: Vec<Pin>,
}

impl<'c> Analyzer<'c> {
    pub fn new(catalog: &'c Catalog) -> Self {
        Analyzer {
            catalog,
            blocks: Vec::new(),
            insts: Vec::new(),
            edges: Vec::new(),
            pins: Vec::new(),
        }
    }

    pub fn new_block(&mut self, parent: Option<usize>) -> usize {
        self.blocks.push(Block {
            parent,
            entries: Vec::new(),
            merged_columns: false,
        });
        self.blocks.len() - 1
    }

    /// Whether every sharded-table occurrence the inventory saw was found by the walk.
    pub fn complete(&self, inv: &Inventory) -> bool {
        let sharded = inv
            .relations
            .iter()
            .filter(|(s, t)| {
                matches!(
                    self.catalog.classify(s.as_deref(), t),
                    TableClass::Sharded(_)
                )
            })
            .count();
        sharded == self.insts.len()
    }

    fn is_ancestor(&self, anc: usize, mut b: usize) -> bool {
        while let Some(p) = self.blocks[b].parent {
            if p == anc {
                return true;
            }
            b = p;
        }
        false
    }

    /// The instances that are guaranteed to be combined only with rows of the same shard
    /// as `seeds` (see the module docs).
    pub fn closure(&self, seeds: &[usize]) -> Vec<bool> {
        let mut inside = vec![false; self.insts.len()];
        for &s in seeds {
            inside[s] = true;
        }
        loop {
            let mut changed = false;
            for e in &self.edges {
                match e.kind {
                    EdgeKind::Eq => {
                        for (from, to) in [(e.a, e.b), (e.b, e.a)] {
                            if inside[from] && !inside[to] && self.insts[to].block == e.block {
                                let fb = self.insts[from].block;
                                if fb == e.block || self.is_ancestor(fb, e.block) {
                                    inside[to] = true;
                                    changed = true;
                                }
                            }
                        }
                    }
                    EdgeKind::In => {
                        if inside[e.a] && !inside[e.b] {
                            inside[e.b] = true;
                            changed = true;
                        }
                    }
                }
            }
            if !changed {
                return inside;
            }
        }
    }

    /// Registers a sharded target of a DML statement (or any table) in `block`.
    /// `renamed`: the alias has a column list.
    pub fn register_table(
        &mut self,
        block: usize,
        name: &ObjectName,
        alias: Option<&Ident>,
        renamed: bool,
    ) -> Option<usize> {
        let (schema, table) = split_name(name);
        let inst = match self.catalog.classify(schema.as_deref(), &table) {
            TableClass::Sharded(info) => {
                self.insts.push(Inst {
                    block,
                    table: table.clone(),
                    key_column: info.key_column.clone(),
                    key_type: info.key_type,
                    key_named: !renamed,
                    nullable: false,
                });
                Some(self.insts.len() - 1)
            }
            _ => None,
        };
        let (qualifier, schema) = match alias {
            Some(a) => (norm_ident(a), None),
            None => (table, schema),
        };
        self.blocks[block].entries.push(Entry {
            qualifier,
            schema,
            inst,
        });
        inst
    }

    fn register_alias(&mut self, block: usize, alias: Option<&Ident>) {
        if let Some(a) = alias {
            self.blocks[block].entries.push(Entry {
                qualifier: norm_ident(a),
                schema: None,
                inst: None,
            });
        }
    }

    // --- queries -----------------------------------------------------------------------

    /// Walks a query; returns the blocks of its body's branches (one for a plain SELECT,
    /// several for UNION/INTERSECT/EXCEPT).
    pub fn query(&mut self, q: &Query, parent: Option<usize>) -> Vec<usize> {
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                self.query(&cte.query, parent);
            }
        }
        let mut branches = Vec::new();
        self.set_expr(&q.body, parent, &mut branches);
        let ctx = branches.first().copied();
        if let Some(b) = ctx {
            if let Some(ob) = &q.order_by {
                if let sqlparser::ast::OrderByKind::Expressions(items) = &ob.kind {
                    for it in items {
                        self.expr(&it.expr, b);
                    }
                }
            }
            if let Some(lc) = &q.limit_clause {
                match lc {
                    sqlparser::ast::LimitClause::LimitOffset { limit, offset, .. } => {
                        if let Some(l) = limit {
                            self.expr(l, b);
                        }
                        if let Some(o) = offset {
                            self.expr(&o.value, b);
                        }
                    }
                    sqlparser::ast::LimitClause::OffsetCommaLimit { offset, limit } => {
                        self.expr(offset, b);
                        self.expr(limit, b);
                    }
                }
            }
        }
        branches
    }

    fn set_expr(&mut self, s: &SetExpr, parent: Option<usize>, out: &mut Vec<usize>) {
        match s {
            SetExpr::Select(sel) => out.push(self.select(sel, parent)),
            SetExpr::Query(q) => out.extend(self.query(q, parent)),
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left, parent, out);
                self.set_expr(right, parent, out);
            }
            SetExpr::Values(v) => {
                let b = self.new_block(parent);
                for row in &v.rows {
                    for e in row.iter() {
                        self.expr(e, b);
                    }
                }
                out.push(b);
            }
            SetExpr::Insert(stmt)
            | SetExpr::Update(stmt)
            | SetExpr::Delete(stmt)
            | SetExpr::Merge(stmt) => out.push(self.statement(stmt, parent)),
            SetExpr::Table(t) => {
                let b = self.new_block(parent);
                if let Some(name) = &t.table_name {
                    let mut parts = Vec::new();
                    if let Some(s) = &t.schema_name {
                        parts.push(ObjectNamePart::Identifier(s.clone()));
                    }
                    parts.push(ObjectNamePart::Identifier(name.clone()));
                    self.register_table(b, &ObjectName(parts), None, false);
                }
                out.push(b);
            }
        }
    }

    /// Walks a DML statement nested in a query (data-modifying CTE) or at top level;
    /// returns its block.
    pub fn statement(&mut self, stmt: &Statement, parent: Option<usize>) -> usize {
        match stmt {
            Statement::Update(u) => self.update(u, parent).0,
            Statement::Delete(d) => self.delete(d, parent).0,
            Statement::Insert(i) => self.insert(i, parent).0,
            // MERGE and others: the planner handles them at top level; anything sharded
            // inside is caught by the completeness check.
            _ => self.new_block(parent),
        }
    }

    /// UPDATE: returns (block, target instance).
    pub fn update(
        &mut self,
        u: &sqlparser::ast::Update,
        parent: Option<usize>,
    ) -> (usize, Option<usize>) {
        let b = self.new_block(parent);
        let target = self.register_target(b, &u.table);
        let from: &[TableWithJoins] = match &u.from {
            Some(sqlparser::ast::UpdateTableFromKind::BeforeSet(f))
            | Some(sqlparser::ast::UpdateTableFromKind::AfterSet(f)) => f,
            None => &[],
        };
        self.table_with_joins_register(b, from);
        self.table_with_joins_walk(b, std::slice::from_ref(&u.table));
        self.table_with_joins_walk(b, from);
        for a in &u.assignments {
            self.expr(&a.value, b);
        }
        if let Some(w) = &u.selection {
            self.conjuncts(b, w, true);
            self.expr(w, b);
        }
        self.returning(b, u.returning.as_deref());
        (b, target)
    }

    /// DELETE: returns (block, target instance).
    pub fn delete(
        &mut self,
        d: &sqlparser::ast::Delete,
        parent: Option<usize>,
    ) -> (usize, Option<usize>) {
        let b = self.new_block(parent);
        let from = match &d.from {
            sqlparser::ast::FromTable::WithFromKeyword(f)
            | sqlparser::ast::FromTable::WithoutKeyword(f) => f,
        };
        let mut target = None;
        for (i, twj) in from.iter().enumerate() {
            if i == 0 {
                target = self.register_target(b, twj);
            } else {
                self.table_with_joins_register(b, std::slice::from_ref(twj));
            }
        }
        let using: &[TableWithJoins] = d.using.as_deref().unwrap_or(&[]);
        self.table_with_joins_register(b, using);
        self.table_with_joins_walk(b, from);
        self.table_with_joins_walk(b, using);
        if let Some(w) = &d.selection {
            self.conjuncts(b, w, true);
            self.expr(w, b);
        }
        self.returning(b, d.returning.as_deref());
        (b, target)
    }

    /// INSERT: registers the target and walks everything but the source rows' keys;
    /// returns (block, target instance). The VALUES rows (or the source query) are walked
    /// as part of the block.
    pub fn insert(
        &mut self,
        ins: &sqlparser::ast::Insert,
        parent: Option<usize>,
    ) -> (usize, Option<usize>) {
        let b = self.new_block(parent);
        let target = match &ins.table {
            sqlparser::ast::TableObject::TableName(name) => {
                // `INSERT INTO t AS a` takes no column list.
                let alias = ins.table_alias.as_ref().map(|a| &a.alias);
                self.register_table(b, name, alias, false)
            }
            _ => None,
        };
        if let Some(src) = &ins.source {
            match &*src.body {
                SetExpr::Values(v) if src.with.is_none() => {
                    for row in &v.rows {
                        for e in row.iter() {
                            self.expr(e, b);
                        }
                    }
                }
                _ => {
                    self.query(src, Some(b));
                }
            }
        }
        if let Some(sqlparser::ast::OnInsert::OnConflict(oc)) = &ins.on {
            if let sqlparser::ast::OnConflictAction::DoUpdate(du) = &oc.action {
                for a in &du.assignments {
                    self.expr(&a.value, b);
                }
                if let Some(w) = &du.selection {
                    self.expr(w, b);
                }
            }
        }
        self.returning(b, ins.returning.as_deref());
        (b, target)
    }

    /// Registers the FROM item a DML statement writes to; returns its instance.
    fn register_target(&mut self, b: usize, twj: &TableWithJoins) -> Option<usize> {
        let target = match &twj.relation {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } => self.register_table(
                b,
                name,
                alias.as_ref().map(|a| &a.name),
                alias.as_ref().is_some_and(|a| !a.columns.is_empty()),
            ),
            other => {
                self.table_factor_register(b, other);
                None
            }
        };
        for j in &twj.joins {
            self.table_factor_register(b, &j.relation);
        }
        target
    }

    fn returning(&mut self, b: usize, items: Option<&[SelectItem]>) {
        for it in items.unwrap_or(&[]) {
            if let SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } = it {
                self.expr(e, b);
            }
        }
    }

    fn select(&mut self, s: &Select, parent: Option<usize>) -> usize {
        let b = self.new_block(parent);
        self.table_with_joins_register(b, &s.from);
        self.table_with_joins_walk(b, &s.from);
        if let Some(w) = &s.selection {
            self.conjuncts(b, w, true);
            self.expr(w, b);
        }
        for it in &s.projection {
            match it {
                SelectItem::UnnamedExpr(e)
                | SelectItem::ExprWithAlias { expr: e, .. }
                | SelectItem::ExprWithAliases { expr: e, .. } => self.expr(e, b),
                _ => {}
            }
        }
        if let sqlparser::ast::GroupByExpr::Expressions(exprs, _) = &s.group_by {
            for e in exprs {
                self.expr(e, b);
            }
        }
        if let Some(h) = &s.having {
            self.expr(h, b);
        }
        if let Some(q) = &s.qualify {
            self.expr(q, b);
        }
        b
    }

    fn table_with_joins_register(&mut self, b: usize, from: &[TableWithJoins]) {
        for twj in from {
            self.table_factor_register(b, &twj.relation);
            for j in &twj.joins {
                self.table_factor_register(b, &j.relation);
            }
        }
    }

    fn table_factor_register(&mut self, b: usize, tf: &TableFactor) {
        match tf {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } => {
                self.register_table(
                    b,
                    name,
                    alias.as_ref().map(|a| &a.name),
                    alias.as_ref().is_some_and(|a| !a.columns.is_empty()),
                );
            }
            TableFactor::Table {
                name,
                alias,
                args: Some(_),
                ..
            } => {
                let q = alias
                    .as_ref()
                    .map(|a| a.name.clone())
                    .or_else(|| name.0.last().and_then(|p| p.as_ident().cloned()));
                self.register_alias(b, q.as_ref());
            }
            TableFactor::NestedJoin {
                table_with_joins,
                alias,
            } => {
                self.table_with_joins_register(b, std::slice::from_ref(table_with_joins));
                self.register_alias(b, alias.as_ref().map(|a| &a.name));
            }
            TableFactor::Derived { alias, .. }
            | TableFactor::TableFunction { alias, .. }
            | TableFactor::Function { alias, .. }
            | TableFactor::UNNEST { alias, .. }
            | TableFactor::JsonTable { alias, .. } => {
                self.register_alias(b, alias.as_ref().map(|a| &a.name));
            }
            _ => {}
        }
    }

    fn table_with_joins_walk(&mut self, b: usize, from: &[TableWithJoins]) {
        for twj in from {
            self.join_chain_walk(b, twj, true);
        }
    }

    /// Walks a FROM item's joins. `top`: this chain is directly in the block's FROM (not
    /// inside a parenthesized join), so inner-join conditions restrict the block's rows.
    fn join_chain_walk(&mut self, b: usize, twj: &TableWithJoins, top: bool) {
        self.table_factor_walk_nested(b, &twj.relation);
        let n = twj.joins.len();
        let first_inst = self.insts_of_factor(b, &twj.relation);
        let mut left_insts = first_inst;
        for (i, j) in twj.joins.iter().enumerate() {
            self.table_factor_walk_nested(b, &j.relation);
            let right_insts = self.insts_of_factor(b, &j.relation);
            let nullable_later = twj.joins[i + 1..n].iter().any(|later| {
                matches!(
                    later.join_operator,
                    JoinOperator::Right(_)
                        | JoinOperator::RightOuter(_)
                        | JoinOperator::FullOuter(_)
                )
            });
            let (constraint, inner) = match &j.join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::CrossJoin(c)
                | JoinOperator::StraightJoin(c) => (Some(c), true),
                JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c)
                | JoinOperator::Semi(c)
                | JoinOperator::LeftSemi(c)
                | JoinOperator::RightSemi(c)
                | JoinOperator::Anti(c)
                | JoinOperator::LeftAnti(c)
                | JoinOperator::RightAnti(c) => (Some(c), false),
                JoinOperator::AsOf { constraint, .. } => (Some(constraint), false),
                _ => (None, false),
            };
            let (left_null, right_null) = match &j.join_operator {
                JoinOperator::Left(_) | JoinOperator::LeftOuter(_) => (false, true),
                JoinOperator::Right(_) | JoinOperator::RightOuter(_) => (true, false),
                JoinOperator::FullOuter(_) => (true, true),
                _ => (false, false),
            };
            for (insts, null) in [(&left_insts, left_null), (&right_insts, right_null)] {
                if null {
                    for &i in insts.iter() {
                        self.insts[i].nullable = true;
                    }
                }
            }
            let restricting = top && inner && !nullable_later;
            match constraint {
                Some(JoinConstraint::On(e)) => {
                    self.conjuncts(b, e, restricting);
                    self.expr(e, b);
                }
                Some(JoinConstraint::Natural) => self.blocks[b].merged_columns = true,
                Some(JoinConstraint::Using(cols)) => {
                    self.blocks[b].merged_columns = true;
                    for c in cols {
                        let Some(col) = c.0.last().and_then(|p| p.as_ident()).map(norm_ident)
                        else {
                            continue;
                        };
                        let l: Vec<usize> = left_insts
                            .iter()
                            .copied()
                            .filter(|&i| self.insts[i].key_is(&col))
                            .collect();
                        let r: Vec<usize> = right_insts
                            .iter()
                            .copied()
                            .filter(|&i| self.insts[i].key_is(&col))
                            .collect();
                        if let ([x], [y]) = (l.as_slice(), r.as_slice()) {
                            if self.insts[*x].key_type == self.insts[*y].key_type {
                                self.edges.push(Edge {
                                    a: *x,
                                    b: *y,
                                    block: b,
                                    kind: EdgeKind::Eq,
                                });
                            }
                        }
                    }
                }
                _ => {}
            }
            left_insts.extend(right_insts);
        }
    }

    /// Instances registered in block `b` for the tables inside a FROM item.
    fn insts_of_factor(&self, b: usize, tf: &TableFactor) -> Vec<usize> {
        let mut names = Vec::new();
        collect_factor_qualifiers(tf, &mut names);
        self.blocks[b]
            .entries
            .iter()
            .filter(|e| names.contains(&e.qualifier))
            .filter_map(|e| e.inst)
            .collect()
    }

    fn table_factor_walk_nested(&mut self, b: usize, tf: &TableFactor) {
        if let TableFactor::NestedJoin {
            table_with_joins, ..
        } = tf
        {
            self.join_chain_walk(b, table_with_joins, false);
        } else {
            self.table_factor_walk(b, tf);
        }
    }

    fn table_factor_walk(&mut self, b: usize, tf: &TableFactor) {
        match tf {
            TableFactor::Derived { subquery, .. } => {
                self.query(subquery, Some(b));
            }
            TableFactor::Table {
                args: Some(args), ..
            } => {
                for a in &args.args {
                    self.function_arg(a, b);
                }
            }
            TableFactor::Function { args, .. } => {
                for a in args {
                    self.function_arg(a, b);
                }
            }
            TableFactor::TableFunction { expr, .. } => self.expr(expr, b),
            TableFactor::UNNEST { array_exprs, .. } => {
                for e in array_exprs {
                    self.expr(e, b);
                }
            }
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => self.join_chain_walk(b, table_with_joins, false),
            _ => {}
        }
    }

    fn function_arg(&mut self, a: &FunctionArg, b: usize) {
        let arg = match a {
            FunctionArg::Named { arg, .. }
            | FunctionArg::ExprNamed { arg, .. }
            | FunctionArg::Unnamed(arg) => arg,
        };
        if let FunctionArgExpr::Expr(e) = arg {
            self.expr(e, b);
        }
    }

    // --- expressions ---------------------------------------------------------------------

    /// Walks an expression for subqueries (each becomes a child block of `b`).
    pub fn expr(&mut self, e: &Expr, b: usize) {
        match e {
            Expr::Subquery(q) => {
                self.query(q, Some(b));
            }
            Expr::Exists { subquery, .. } => {
                self.query(subquery, Some(b));
            }
            Expr::In { expr, target, .. } => {
                self.expr(expr, b);
                match target {
                    sqlparser::ast::InTarget::List(list) => {
                        for x in list {
                            self.expr(x, b);
                        }
                    }
                    sqlparser::ast::InTarget::Subquery(q) => self.in_subquery(expr, q, b),
                    sqlparser::ast::InTarget::Unnest(x) => self.expr(x, b),
                    _ => {}
                }
            }
            Expr::AnyOp {
                left,
                right,
                compare_op,
                ..
            } => {
                self.expr(left, b);
                match &**right {
                    Expr::Subquery(q) if *compare_op == sqlparser::ast::BinaryOperator::Eq => {
                        self.in_subquery(left, q, b)
                    }
                    r => self.expr(r, b),
                }
            }
            Expr::AllOp { left, right, .. } => {
                self.expr(left, b);
                self.expr(right, b);
            }
            Expr::BinaryOp { left, right, .. } => {
                self.expr(left, b);
                self.expr(right, b);
            }
            Expr::UnaryOp { expr, .. }
            | Expr::Nested(expr)
            | Expr::Cast { expr, .. }
            | Expr::IsNull(expr)
            | Expr::IsNotNull(expr)
            | Expr::IsTrue(expr)
            | Expr::IsNotTrue(expr)
            | Expr::IsFalse(expr)
            | Expr::IsNotFalse(expr)
            | Expr::IsUnknown(expr)
            | Expr::IsNotUnknown(expr)
            | Expr::Collate { expr, .. }
            | Expr::Extract { expr, .. }
            | Expr::Ceil { expr, .. }
            | Expr::Floor { expr, .. } => self.expr(expr, b),
            Expr::IsDistinctFrom(x, y) | Expr::IsNotDistinctFrom(x, y) => {
                self.expr(x, b);
                self.expr(y, b);
            }
            Expr::Between {
                expr, low, high, ..
            } => {
                self.expr(expr, b);
                self.expr(low, b);
                self.expr(high, b);
            }
            Expr::Like { expr, pattern, .. }
            | Expr::ILike { expr, pattern, .. }
            | Expr::SimilarTo { expr, pattern, .. } => {
                self.expr(expr, b);
                self.expr(pattern, b);
            }
            Expr::AtTimeZone {
                timestamp,
                time_zone,
            } => {
                self.expr(timestamp, b);
                self.expr(time_zone, b);
            }
            Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                if let Some(o) = operand {
                    self.expr(o, b);
                }
                for c in conditions {
                    self.expr(&c.condition, b);
                    self.expr(&c.result, b);
                }
                if let Some(x) = else_result {
                    self.expr(x, b);
                }
            }
            Expr::Function(f) => {
                match &f.args {
                    FunctionArguments::List(list) => {
                        for a in &list.args {
                            self.function_arg(a, b);
                        }
                    }
                    FunctionArguments::Subquery(q) => {
                        self.query(q, Some(b));
                    }
                    FunctionArguments::None => {}
                }
                if let Some(filter) = &f.filter {
                    self.expr(filter, b);
                }
            }
            Expr::Tuple(items) => {
                for x in items {
                    self.expr(x, b);
                }
            }
            Expr::Array(a) => {
                for x in &a.elem {
                    self.expr(x, b);
                }
            }
            Expr::Substring {
                expr,
                substring_from,
                substring_for,
                ..
            } => {
                self.expr(expr, b);
                if let Some(x) = substring_from {
                    self.expr(x, b);
                }
                if let Some(x) = substring_for {
                    self.expr(x, b);
                }
            }
            Expr::Position { expr, r#in } => {
                self.expr(expr, b);
                self.expr(r#in, b);
            }
            Expr::CompoundFieldAccess { root, .. } => self.expr(root, b),
            // Other forms: any table inside is caught by the completeness check.
            _ => {}
        }
    }

    fn in_subquery(&mut self, left: &Expr, q: &Query, b: usize) {
        let branches = self.query(q, Some(b));
        let Some(x) = self.key_ref(b, left) else {
            return;
        };
        let ([child], SetExpr::Select(s)) = (branches.as_slice(), &*q.body) else {
            return;
        };
        if !row_local(q, s) {
            return;
        }
        let [item] = s.projection.as_slice() else {
            return;
        };
        let (SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. }) = item else {
            return;
        };
        if let Some(y) = self.key_ref(*child, e) {
            if self.insts[x].key_type == self.insts[y].key_type {
                self.edges.push(Edge {
                    a: x,
                    b: y,
                    block: *child,
                    kind: EdgeKind::In,
                });
            }
        }
    }

    /// Records the edges and pins of the top-level AND-chain of `e`, a condition of block
    /// `b`. `restricting`: the condition filters the block's rows (WHERE, inner JOIN ON).
    pub fn conjuncts(&mut self, b: usize, e: &Expr, restricting: bool) {
        let mut stack = vec![e];
        while let Some(c) = stack.pop() {
            match c {
                Expr::Nested(inner) => stack.push(inner),
                Expr::BinaryOp {
                    left,
                    op: sqlparser::ast::BinaryOperator::And,
                    right,
                } => {
                    stack.push(right);
                    stack.push(left);
                }
                Expr::BinaryOp {
                    left,
                    op: sqlparser::ast::BinaryOperator::Eq,
                    right,
                }
                | Expr::IsNotDistinctFrom(left, right) => {
                    self.equality(b, left, right, restricting)
                }
                Expr::In {
                    expr,
                    target: sqlparser::ast::InTarget::List(list),
                    negated: false,
                    ..
                } => {
                    if let Some(x) = self.key_ref(b, expr) {
                        let ty = self.insts[x].key_type;
                        let values: Option<Vec<KeyExpr>> =
                            list.iter().map(|v| key_value(v, ty)).collect();
                        if let Some(values) = values {
                            self.pin(b, x, PinValue::Set(dedup(values)), restricting);
                        }
                    }
                }
                Expr::AnyOp {
                    left,
                    compare_op: sqlparser::ast::BinaryOperator::Eq,
                    right,
                    ..
                } => {
                    if let Some(x) = self.key_ref(b, left) {
                        let ty = self.insts[x].key_type;
                        if let Some(values) = any_values(right, ty) {
                            self.pin(b, x, PinValue::Set(values), restricting);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn equality(&mut self, b: usize, left: &Expr, right: &Expr, restricting: bool) {
        let l = self.key_ref(b, left);
        let r = self.key_ref(b, right);
        match (l, r) {
            (Some(x), Some(y)) => {
                if x != y && self.insts[x].key_type == self.insts[y].key_type {
                    self.edges.push(Edge {
                        a: x,
                        b: y,
                        block: b,
                        kind: EdgeKind::Eq,
                    });
                }
            }
            (Some(x), None) | (None, Some(x)) => {
                let other = if l.is_some() { right } else { left };
                if let Some(v) = key_value(other, self.insts[x].key_type) {
                    self.pin(b, x, PinValue::Eq(v), restricting);
                }
            }
            (None, None) => {}
        }
    }

    fn pin(&mut self, b: usize, x: usize, value: PinValue, restricting: bool) {
        if restricting && self.insts[x].block == b {
            self.pins.push(Pin { inst: x, value });
        }
    }

    /// The instance whose shard-key column `e` is, resolved from block `b` (Postgres's
    /// scoping: innermost FROM list first; unqualified names only in `b` itself).
    pub fn key_ref(&self, b: usize, e: &Expr) -> Option<usize> {
        match e {
            Expr::Nested(inner) => self.key_ref(b, inner),
            Expr::Identifier(id) => {
                if self.blocks[b].merged_columns {
                    return None;
                }
                let col = norm_ident(id);
                let mut found = self.blocks[b]
                    .entries
                    .iter()
                    .filter_map(|en| en.inst)
                    .filter(|&i| self.insts[i].key_is(&col));
                let first = found.next()?;
                found.next().is_none().then_some(first)
            }
            Expr::CompoundIdentifier(parts) => {
                let (schema, qual, col) = match parts.as_slice() {
                    [q, c] => (None, q, c),
                    [s, q, c] => (Some(s.value.to_ascii_lowercase()), q, c),
                    _ => return None,
                };
                let qual = qual.value.to_ascii_lowercase();
                let col = norm_ident(col);
                let mut block = Some(b);
                while let Some(cur) = block {
                    let hit = self.blocks[cur].entries.iter().find(|en| {
                        en.qualifier.eq_ignore_ascii_case(&qual)
                            && (schema.is_none() || en.schema.is_none() || en.schema == schema)
                    });
                    if let Some(en) = hit {
                        return en.inst.filter(|&i| self.insts[i].key_is(&col));
                    }
                    block = self.blocks[cur].parent;
                }
                None
            }
            _ => None,
        }
    }

    /// Whether `e` is the shard key of an instance registered directly in block `b`, and
    /// never NULL-filled by an outer join (rows with equal values of it are on one shard).
    pub fn is_key_of_block(&self, b: usize, e: &Expr) -> bool {
        self.key_ref(b, e)
            .is_some_and(|i| self.insts[i].block == b && !self.insts[i].nullable)
    }
}

fn collect_factor_qualifiers(tf: &TableFactor, out: &mut Vec<String>) {
    match tf {
        TableFactor::Table { name, alias, .. } => match alias {
            Some(a) => out.push(norm_ident(&a.name)),
            None => out.push(split_name(name).1),
        },
        TableFactor::NestedJoin {
            table_with_joins, ..
        } => {
            collect_factor_qualifiers(&table_with_joins.relation, out);
            for j in &table_with_joins.joins {
                collect_factor_qualifiers(&j.relation, out);
            }
        }
        _ => {}
    }
}

/// An IN/ANY subquery whose rows do not depend on other rows: no LIMIT, grouping,
/// aggregation or DISTINCT ON. Evaluated on each shard, it yields exactly that shard's
/// part of the global answer.
fn row_local(q: &Query, s: &Select) -> bool {
    q.limit_clause.is_none()
        && q.fetch.is_none()
        && matches!(&s.group_by, sqlparser::ast::GroupByExpr::Expressions(g, m) if g.is_empty() && m.is_empty())
        && s.having.is_none()
        && !matches!(s.distinct, Some(sqlparser::ast::Distinct::On(_)))
}

/// Drops repeated keys, keeping the first of each (linear: lists can be long).
pub(crate) fn dedup(v: Vec<KeyExpr>) -> Vec<KeyExpr> {
    let mut seen: std::collections::HashSet<KeyExpr> =
        std::collections::HashSet::with_capacity(v.len());
    v.into_iter().filter(|x| seen.insert(x.clone())).collect()
}

/// Whether a cast to `ty` keeps a key's value unchanged for a key of type `key`.
pub(crate) fn cast_keeps_key(ty: &sqlparser::ast::DataType, key: KeyType) -> bool {
    let name = ty.to_string().to_ascii_lowercase();
    let name = name.strip_prefix("pg_catalog.").unwrap_or(&name);
    match key {
        KeyType::Int => matches!(
            name,
            "int" | "integer" | "bigint" | "smallint" | "int2" | "int4" | "int8"
        ),
        KeyType::Text => matches!(name, "text" | "varchar" | "character varying"),
        KeyType::Uuid => name == "uuid",
    }
}

/// A constant or parameter compared with a key of type `ty`, typed.
pub(crate) fn key_value(e: &Expr, ty: KeyType) -> Option<KeyExpr> {
    match e {
        Expr::Nested(inner) => key_value(inner, ty),
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => key_from_lit(Lit::Number(n), ty).map(KeyExpr::Literal),
            // `E'...'`: the parser decodes its escapes as Postgres does (and fails the text
            // on those it does not, such as bytes that are not ASCII).
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => {
                key_from_lit(Lit::Str(s), ty).map(KeyExpr::Literal)
            }
            Value::Placeholder(p) => param_number(p).map(KeyExpr::Param),
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match &**expr {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) if !n.starts_with('-') => {
                    key_from_lit(Lit::Number(&format!("-{n}")), ty).map(KeyExpr::Literal)
                }
                _ => None,
            },
            _ => None,
        },
        Expr::Cast {
            kind: sqlparser::ast::CastKind::Cast | sqlparser::ast::CastKind::DoubleColon,
            expr,
            data_type,
            format: None,
            ..
        } if cast_keeps_key(data_type, ty) => match &**expr {
            Expr::Value(_) | Expr::Nested(_) => key_value(expr, ty),
            Expr::UnaryOp { .. } if ty == KeyType::Int => key_value(expr, ty),
            _ => None,
        },
        Expr::TypedString(ts) if cast_keeps_key(&ts.data_type, ty) => match &ts.value.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => {
                key_from_lit(Lit::Str(s), ty).map(KeyExpr::Literal)
            }
            _ => None,
        },
        _ => None,
    }
}

/// `$n` → n.
pub(crate) fn param_number(p: &str) -> Option<usize> {
    p.strip_prefix('$')?
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
}

/// The right side of `key = ANY(...)`: `$n` (optionally cast to an array of a compatible
/// type) or `ARRAY[...]` of constants.
fn any_values(e: &Expr, ty: KeyType) -> Option<Vec<KeyExpr>> {
    match e {
        Expr::Nested(inner) => any_values(inner, ty),
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => param_number(p).map(|n| vec![KeyExpr::ParamArray(n)]),
            _ => None,
        },
        Expr::Cast {
            kind: sqlparser::ast::CastKind::Cast | sqlparser::ast::CastKind::DoubleColon,
            expr,
            data_type,
            format: None,
            ..
        } => {
            use sqlparser::ast::{ArrayElemTypeDef as A, DataType as D};
            let elem_ok = match data_type {
                D::Array(
                    A::SquareBracket(inner, _) | A::AngleBracket(inner) | A::Parenthesis(inner),
                ) => cast_keeps_key(inner, ty),
                _ => false,
            };
            if !elem_ok {
                return None;
            }
            match &**expr {
                Expr::Value(v) => match &v.value {
                    Value::Placeholder(p) => param_number(p).map(|n| vec![KeyExpr::ParamArray(n)]),
                    _ => None,
                },
                _ => None,
            }
        }
        Expr::Array(a) => {
            let values: Option<Vec<KeyExpr>> = a.elem.iter().map(|x| key_value(x, ty)).collect();
            values.filter(|v| !v.is_empty()).map(dedup)
        }
        _ => None,
    }
}

/// Whether the literal values in a key expression list are all the same single value.
pub(crate) fn single_value(keys: &[KeyExpr]) -> Option<&KeyExpr> {
    let first = keys.first()?;
    keys.iter().all(|k| k == first).then_some(first)
}

/// A key value for a hint: typed by `ty`, or, without a table, an int if it parses.
pub(crate) fn hint_key(text: &str, ty: Option<KeyType>) -> Option<(KeyType, KeyValue)> {
    match ty {
        Some(t) => KeyValue::from_text(text, t).map(|v| (t, v)),
        None => match KeyValue::from_text(text, KeyType::Int) {
            Some(v) => Some((KeyType::Int, v)),
            None => Some((KeyType::Text, KeyValue::Text(text.to_string()))),
        },
    }
}
