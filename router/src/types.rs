//! The routing decision for one statement.

use crate::catalog::KeyType;

/// Where and how to run one statement (or one simple-query string).
///
/// How the proxy uses it:
/// 1. `refusal`: answer this error, run nothing.
/// 2. `tx`: transaction control; inside a transaction every statement goes to the
///    connection(s) the transaction already holds, whatever `role` says.
/// 3. Resolve `target` to a set of shards (hashing key values). If that set has one shard,
///    send the original text there and ignore `merge` and `rewritten`. If it has several:
///    answer `multi_shard_refusal` if set; otherwise send `rewritten` (or the original) to
///    each shard and combine the results as `merge` says (reads) or sum the command tags
///    (writes to sharded tables; one transaction per shard, committed only if all succeed).
/// 4. `role` picks primary or replica within each shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub kind: Kind,
    pub role: Role,
    pub target: Target,
    /// How to combine rows from several shards. Present for reads whose target may
    /// resolve to more than one shard (`All`, several keys, `= ANY($n)`).
    pub merge: Option<MergePlan>,
    /// SQL to send to each shard of a multi-shard read instead of the original text
    /// (hidden sort/group/average columns, `LIMIT` push-down). Never needed on one shard.
    pub rewritten: Option<String>,
    pub tx: Option<TxControl>,
    pub hint: Option<Hint>,
    /// Do not run the statement: answer this error.
    pub refusal: Option<Refusal>,
    /// Answer this error if the target resolves to more than one shard.
    pub multi_shard_refusal: Option<Refusal>,
    /// The statement cannot run inside a transaction block (VACUUM, CREATE INDEX
    /// CONCURRENTLY, ...): do not wrap per-shard execution in BEGIN/COMMIT.
    pub no_tx_block: bool,
    /// COPY details, for `Target::SplitCopy` and for multi-shard `COPY ... TO STDOUT`.
    pub copy: Option<CopyInfo>,
    /// Tables referenced (lower case, unqualified), for diagnostics.
    pub tables: Vec<String>,
}

impl Plan {
    pub(crate) fn new(kind: Kind, role: Role, target: Target) -> Self {
        Plan {
            kind,
            role,
            target,
            merge: None,
            rewritten: None,
            tx: None,
            hint: None,
            refusal: None,
            multi_shard_refusal: None,
            no_tx_block: false,
            copy: None,
            tables: Vec::new(),
        }
    }

    /// A plan that answers `refusal` instead of running.
    pub fn refused(kind: Kind, role: Role, refusal: Refusal) -> Self {
        let mut p = Plan::new(kind, role, Target::Default);
        p.refusal = Some(refusal);
        p
    }

    /// Whether a result may need rows from more than one shard.
    pub fn may_fan_out(&self) -> bool {
        self.target.may_fan_out()
    }
}

/// What kind of statement this is (for dispatch and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// SELECT, VALUES, TABLE, EXPLAIN, SHOW-like reads.
    Read,
    /// INSERT, UPDATE, DELETE, MERGE, SELECT INTO, data-modifying CTEs.
    Write,
    /// CREATE, ALTER, DROP, TRUNCATE, GRANT, COMMENT, ...
    Ddl,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT, SET TRANSACTION, ...
    Transaction,
    /// SET, RESET, DISCARD, SHOW, LISTEN, NOTIFY, PREPARE, DEALLOCATE: session state.
    Session,
    Copy,
    /// VACUUM, ANALYZE, CLUSTER, REINDEX, CHECKPOINT.
    Maintenance,
    /// CALL, DO, LOCK, cursors, and other utility statements.
    Utility,
    /// The parser could not read it.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Replica,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// No sharded table: the default shard (shard 0), where unsharded tables live.
    Default,
    /// Only reference tables (full copies on every shard): any one shard will do, e.g. one
    /// the transaction already uses.
    Any,
    /// A sharded table without a usable key: every shard; results are combined (reads:
    /// `merge`; writes: command tags summed, RETURNING rows concatenated).
    All,
    /// Every shard, all of which give the same answer: writes to reference tables and DDL.
    /// Answer with one shard's result.
    Each,
    /// The shards owning these keys (one key, an `IN` list, or `= ANY($n)`).
    Keys {
        key_type: KeyType,
        keys: Vec<KeyExpr>,
    },
    /// An explicit `/* shardgate: shard=N */` hint.
    Shard(u32),
    /// A multi-row INSERT into a sharded table: one key per VALUES row, in order. Group the
    /// rows by shard; if they all land on one shard send the original text, otherwise use
    /// [`crate::split_insert`] to build each shard's statement.
    SplitInsert {
        key_type: KeyType,
        rows: Vec<KeyExpr>,
    },
    /// `COPY table FROM STDIN` into a sharded table: route each data row by the field at
    /// `key_index` (0-based, within the COPY's column list). `None` when the COPY names no
    /// columns: the proxy must learn the table's column order from a shard first.
    SplitCopy {
        key_type: KeyType,
        key_index: Option<usize>,
    },
}

impl Target {
    /// Whether the target may cover more than one shard.
    pub fn may_fan_out(&self) -> bool {
        match self {
            Target::All | Target::Each | Target::SplitInsert { .. } | Target::SplitCopy { .. } => {
                true
            }
            Target::Keys { keys, .. } => {
                keys.len() > 1 || keys.iter().any(|k| matches!(k, KeyExpr::ParamArray(_)))
            }
            Target::Default | Target::Any | Target::Shard(_) => false,
        }
    }
}

/// Where a shard-key value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyExpr {
    Literal(KeyValue),
    /// Parameter `$n` (1-based). In the extended protocol: the n-th Bind value. For a plan
    /// taken from the cache of normalized simple queries: the n-th extracted literal.
    Param(usize),
    /// `key = ANY($n)`: the n-th parameter is an array of keys.
    ParamArray(usize),
}

/// A shard-key value, typed by the table's [`KeyType`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyValue {
    Int(i64),
    Text(String),
    Uuid([u8; 16]),
}

/// How to combine the rows of a multi-shard read, in this order:
/// 1. if `aggregates` is not empty: rows with equal `group_by` columns (all rows, when
///    `group_by` is empty) are combined column by column; then `Avg` columns are finalized;
///    then groups failing a `having` condition are dropped;
/// 2. if `distinct`: duplicate rows (comparing visible columns) are dropped;
/// 3. rows are sorted by `order_by` (when `aggregates` is empty and not `distinct`, each
///    shard's rows already arrive sorted: a k-way merge streams);
/// 4. `offset` rows are skipped, then at most `limit` rows are returned;
/// 5. the last `hidden_columns` columns are removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergePlan {
    pub order_by: Vec<SortKey>,
    pub limit: Option<RowCount>,
    pub offset: Option<RowCount>,
    /// Empty: rows pass through uncombined. Otherwise one entry per column of the shard
    /// rows (visible and hidden), in order.
    pub aggregates: Vec<AggMerge>,
    pub group_by: Vec<ColumnRef>,
    /// Conditions (all must hold) on combined groups, from HAVING.
    pub having: Vec<HavingCond>,
    pub distinct: bool,
    /// Trailing helper columns in the shard rows, removed before the client sees them.
    pub hidden_columns: usize,
    /// The expressions of `AggMerge::Expr` columns.
    pub expressions: Vec<AggExpr>,
}

impl MergePlan {
    /// Nothing to do but concatenate the shards' rows.
    pub fn is_concat(&self) -> bool {
        self.order_by.is_empty()
            && self.limit.is_none()
            && self.offset.is_none()
            && self.aggregates.is_empty()
            && self.having.is_empty()
            && !self.distinct
            && self.hidden_columns == 0
    }
}

/// `column op value` on a combined group. A NULL column value fails every condition (as in
/// SQL). Numbers compare numerically, text as the column's text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HavingCond {
    pub column: ColumnRef,
    pub op: CmpOp,
    pub value: Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    /// The operator with its operands swapped (`5 < x` is `x > 5`).
    pub fn flipped(self) -> CmpOp {
        match self {
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            other => other,
        }
    }
}

/// A constant in a merge condition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Constant {
    /// A numeric constant as written (`5`, `-2.5`).
    Number(String),
    Text(String),
    /// `$n`: the n-th parameter's value (or, for a normalized simple query, literal).
    Param(usize),
}

/// A LIMIT or OFFSET value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowCount {
    Value(u64),
    /// `$n`; a NULL value means no limit (LIMIT) or zero (OFFSET).
    Param(usize),
}

/// A column of the shard result rows. Visible columns come first; `SELECT *` makes their
/// number known only from the RowDescription, so hidden columns are counted from there:
/// `Hidden(i)` is column `total - hidden_columns + i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnRef {
    Visible(usize),
    Hidden(usize),
}

impl ColumnRef {
    /// The 0-based index in a shard row with `total` columns.
    pub fn index(self, total: usize, hidden_columns: usize) -> usize {
        match self {
            ColumnRef::Visible(i) => i,
            ColumnRef::Hidden(i) => total - hidden_columns + i,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SortKey {
    pub column: ColumnRef,
    pub descending: bool,
    /// Postgres defaults: NULLS LAST for ASC, NULLS FIRST for DESC.
    pub nulls_first: bool,
}

/// How one column combines across the partial rows of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AggMerge {
    /// A group key or a value determined by the group keys: take it from any row.
    None,
    /// count(...): add (int8).
    Count,
    /// sum(...): add, ignoring NULLs (all NULL: NULL). Keeps the column's type.
    Sum,
    Min,
    Max,
    /// avg(...): this column shows avg(x) per shard (right type and name for the
    /// RowDescription); its final value is sum(`sum`) / sum(`count`) over the group (NULL
    /// when the count is 0), computed in the column's type (numeric for integer and numeric
    /// input, float8 for float input, interval for interval).
    Avg {
        sum: ColumnRef,
        count: ColumnRef,
        /// `round(avg(x), places)` (`round(avg(x))`: 0): the average rounded as Postgres's
        /// `round(numeric, int)` does, half away from zero. Numeric averages only.
        round: Option<u32>,
    },
    /// An expression over combined aggregates (`sum(x) / count(*)`, `max(x) - min(x)`,
    /// `sum(x)::float8`): `MergePlan::expressions[i]`, computed by the merge once the
    /// aggregates it reads are combined. The shards return a typed NULL in this column
    /// (for the RowDescription): computed per shard, the expression could fail where the
    /// total does not (a partial sum of 0 as a divisor).
    Expr(usize),
}

/// An expression over a group's combined aggregates, as Postgres would evaluate it on one
/// server: the merge checks that its result type is the one the shards describe.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AggExpr {
    /// A combined aggregate (never another `Expr` column).
    Column(ColumnRef),
    /// A numeric literal as written, its sign folded in as Postgres folds it (`2`, `-1`,
    /// `100.0`; no exponent): an integer is int4 when it fits, else int8, else numeric.
    Number(String),
    Neg(Box<AggExpr>),
    Arith {
        op: ArithOp,
        left: Box<AggExpr>,
        right: Box<AggExpr>,
    },
    Cast {
        to: ArithType,
        expr: Box<AggExpr>,
    },
    /// `nullif(a, b)`: NULL when a equals b, else a.
    NullIf(Box<AggExpr>, Box<AggExpr>),
    /// `coalesce(a, b)`, b a number literal: a, or b when a is NULL.
    Coalesce(Box<AggExpr>, Box<AggExpr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// The types an `AggExpr` computes in, in the order Postgres promotes them (an operator
/// over two of them computes in the later one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ArithType {
    Int2,
    Int4,
    Int8,
    Numeric,
    Float8,
}

impl ArithType {
    /// Postgres's name for the type (what names an unaliased cast column).
    pub fn pg_name(self) -> &'static str {
        match self {
            ArithType::Int2 => "int2",
            ArithType::Int4 => "int4",
            ArithType::Int8 => "int8",
            ArithType::Numeric => "numeric",
            ArithType::Float8 => "float8",
        }
    }
}

/// Transaction control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxControl {
    /// BEGIN / START TRANSACTION. `read_only` as requested; the plan's role is `Replica`
    /// only for a read-only transaction that is not SERIALIZABLE (a hot standby refuses
    /// serializable transactions).
    Begin {
        read_only: bool,
    },
    Commit {
        chain: bool,
    },
    Rollback {
        chain: bool,
    },
    Savepoint(String),
    Release(String),
    RollbackTo(String),
    /// SET TRANSACTION READ ONLY / READ WRITE.
    SetTransactionReadOnly(bool),
    /// SET default_transaction_read_only / SET SESSION CHARACTERISTICS AS TRANSACTION ...:
    /// later transactions of the session default to read only (or not).
    SessionReadOnly(bool),
    PrepareTransaction(String),
    CommitPrepared(String),
    RollbackPrepared(String),
}

/// A routing hint from a leading comment, e.g. `/* shardgate: shard=2 */`,
/// `/* shardgate: key=42 */`, `/* shardgate: primary */` (combinable: `shard=1, primary`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Hint {
    pub shard: Option<u32>,
    /// Raw key text, typed by the statement's sharded table.
    pub key: Option<String>,
    pub primary: bool,
}

impl Hint {
    pub fn routes(&self) -> bool {
        self.shard.is_some() || self.key.is_some()
    }
}

/// An error the proxy answers instead of running the statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub sqlstate: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn unsupported(message: impl Into<String>) -> Self {
        Refusal {
            sqlstate: "0A000",
            message: message.into(),
        }
    }
}

/// COPY options the proxy needs to split or concatenate COPY data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInfo {
    /// true: COPY ... FROM (client sends data); false: COPY ... TO.
    pub from: bool,
    /// The column list, lower case; empty when the COPY names none.
    pub columns: Vec<String>,
    pub format: CopyFormat,
    pub delimiter: Option<char>,
    pub header: bool,
    pub quote: Option<char>,
    pub escape: Option<char>,
    pub null: Option<String>,
    /// CSV into a sharded table: `FORCE_NOT_NULL` names the shard key column (an unquoted
    /// null string is a value, not NULL).
    pub key_force_not_null: bool,
    /// CSV into a sharded table: `FORCE_NULL` names the shard key column (a quoted null
    /// string is NULL too).
    pub key_force_null: bool,
    /// The `ENCODING` option: the data's encoding when it is not the session's.
    pub encoding: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CopyFormat {
    Text,
    Csv,
    Binary,
}
