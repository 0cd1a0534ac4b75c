//! Expressions over combined aggregates (`AggMerge::Expr`): `sum(x) / count(*)`,
//! `max(x) - min(x)`, `sum(x)::float8 / count(*)`, computed once the partials are combined,
//! with Postgres's types, results and errors.
//!
//! Types follow Postgres's operator resolution for these five types: an operator over two
//! of them computes in the later of int2 < int4 < int8 < numeric < float8 (int2 + int4 is
//! int4, int8 * numeric is numeric, numeric / float8 is float8). The result type is
//! checked against the type the shards describe for the column, so a case resolved
//! differently is refused, never answered in another type.
//!
//! Arithmetic: integers overflow with 22003 (`integer out of range`) and divide
//! truncating; numeric adds and multiplies exactly and divides with `select_div_scale`'s
//! scale, rounded half away from zero; float8 is IEEE double arithmetic with Postgres's
//! overflow and underflow checks. Division by zero: 22012.

use std::cmp::Ordering;

use super::{
    dec_round, div_scale, float_value, int_value, mag_add, mag_cmp, mag_sub, num_value, overflow,
    Col, Dec, MergeError, Num, Ty,
};
use crate::types::{AggExpr, AggMerge, ArithOp, ArithType, ColumnRef};

/// A value of an `ArithType` (the type is the `Calc`'s).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar {
    Int(i64),
    Num(Num),
    F8(f64),
}

/// An `AggExpr` typed for the shards' columns.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Calc {
    pub ty: ArithType,
    node: Node,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// A combined aggregate: the index of its column.
    Column(usize),
    Const(Scalar),
    Neg(Box<Calc>),
    Arith(ArithOp, Box<Calc>, Box<Calc>),
    /// To the `Calc`'s type.
    Cast(Box<Calc>),
}

/// The `ArithType` of a column type.
pub(super) fn arith_type_of(ty: Ty) -> Option<ArithType> {
    Some(match ty {
        Ty::Int2 => ArithType::Int2,
        Ty::Int4 => ArithType::Int4,
        Ty::Int8 => ArithType::Int8,
        Ty::Numeric => ArithType::Numeric,
        Ty::Float8 => ArithType::Float8,
        _ => return None,
    })
}

impl Calc {
    /// Types `e` for the shards' columns. `aggregates` is the plan's per-column merge (a
    /// leaf must be a combined aggregate, not another expression). Constant parts are
    /// computed now: Postgres folds them when it plans the query, so their errors do not
    /// depend on whether any group exists.
    pub(super) fn compile(
        e: &AggExpr,
        cols: &[Col],
        aggregates: &[AggMerge],
        index: &dyn Fn(ColumnRef) -> Result<usize, MergeError>,
    ) -> Result<Calc, MergeError> {
        let calc = match e {
            AggExpr::Column(c) => {
                let i = index(*c)?;
                if matches!(aggregates.get(i), None | Some(AggMerge::Expr(_))) {
                    return Err(MergeError::protocol(
                        "the merge plan's expression reads a column that is not an aggregate",
                    ));
                }
                let ty = arith_type_of(cols[i].ty).ok_or_else(|| {
                    MergeError::unsupported(format!(
                        "an expression over an aggregate of type {} is not supported across shards; add a shard key condition or a /* shardgate: shard=N */ hint",
                        cols[i].name()
                    ))
                })?;
                return Ok(Calc {
                    ty,
                    node: Node::Column(i),
                });
            }
            AggExpr::Number(text) => return literal(text),
            AggExpr::Neg(x) => {
                let x = Calc::compile(x, cols, aggregates, index)?;
                Calc {
                    ty: x.ty,
                    node: Node::Neg(Box::new(x)),
                }
            }
            AggExpr::Arith { op, left, right } => {
                let l = Calc::compile(left, cols, aggregates, index)?;
                let r = Calc::compile(right, cols, aggregates, index)?;
                Calc {
                    ty: l.ty.max(r.ty),
                    node: Node::Arith(*op, Box::new(l), Box::new(r)),
                }
            }
            AggExpr::Cast { to, expr } => {
                let x = Calc::compile(expr, cols, aggregates, index)?;
                if x.ty == *to {
                    return Ok(x);
                }
                if x.ty == ArithType::Float8 && *to == ArithType::Numeric {
                    // float8_numeric keeps 15 significant digits: not reproduced here.
                    return Err(MergeError::unsupported(
                        "a cast of double precision to numeric over aggregates is not supported across shards; add a shard key condition or a /* shardgate: shard=N */ hint",
                    ));
                }
                Calc {
                    ty: *to,
                    node: Node::Cast(Box::new(x)),
                }
            }
        };
        // Fold a constant subexpression.
        let constant = match &calc.node {
            Node::Neg(x) | Node::Cast(x) => x.is_const(),
            Node::Arith(_, l, r) => l.is_const() && r.is_const(),
            _ => false,
        };
        if constant {
            if let Some(v) = calc.eval(&|_| Ok(None))? {
                return Ok(Calc {
                    ty: calc.ty,
                    node: Node::Const(v),
                });
            }
        }
        Ok(calc)
    }

    fn is_const(&self) -> bool {
        matches!(self.node, Node::Const(_))
    }

    /// Whether a column of this type is read or written here (floats in text need exact
    /// float output from the shards).
    pub(super) fn reads_floats(&self, cols: &[Col]) -> bool {
        match &self.node {
            Node::Column(i) => cols[*i].ty == Ty::Float8,
            Node::Const(_) => false,
            Node::Neg(x) | Node::Cast(x) => x.reads_floats(cols),
            Node::Arith(_, l, r) => l.reads_floats(cols) || r.reads_floats(cols),
        }
    }

    /// The value for one group; `column(i)` reads the group's combined value of column
    /// `i` (None: NULL). Every operator here is strict: a NULL operand gives NULL.
    pub(super) fn eval(
        &self,
        column: &dyn Fn(usize) -> Result<Option<Scalar>, MergeError>,
    ) -> Result<Option<Scalar>, MergeError> {
        Ok(match &self.node {
            Node::Column(i) => column(*i)?,
            Node::Const(v) => Some(v.clone()),
            Node::Neg(x) => match x.eval(column)? {
                Some(v) => Some(negate(v, self.ty)?),
                None => None,
            },
            Node::Cast(x) => match x.eval(column)? {
                Some(v) => Some(convert(v, x.ty, self.ty)?),
                None => None,
            },
            Node::Arith(op, l, r) => {
                let a = l.eval(column)?;
                let b = r.eval(column)?;
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let a = convert(a, l.ty, self.ty)?;
                        let b = convert(b, r.ty, self.ty)?;
                        Some(arith(*op, a, b, self.ty)?)
                    }
                    _ => None,
                }
            }
        })
    }
}

/// A column value as a `Scalar` of its type.
pub(super) fn scalar(col: &Col, raw: &[u8]) -> Result<Scalar, MergeError> {
    Ok(match col.ty {
        Ty::Int2 | Ty::Int4 | Ty::Int8 => Scalar::Int(int_value(col, raw)?),
        Ty::Numeric => Scalar::Num(num_value(col, raw)?),
        _ => Scalar::F8(float_value(col, raw)?),
    })
}

/// A number literal as Postgres types it: an integer is int4 when it fits, else int8, else
/// numeric; with a point, numeric of the written scale.
fn literal(text: &str) -> Result<Calc, MergeError> {
    let bad = || MergeError::protocol(format!("the merge plan has a bad number {text:?}"));
    if !text.contains('.') {
        if let Ok(v) = text.parse::<i64>() {
            let ty = if i32::try_from(v).is_ok() {
                ArithType::Int4
            } else {
                ArithType::Int8
            };
            return Ok(Calc {
                ty,
                node: Node::Const(Scalar::Int(v)),
            });
        }
    }
    let n = Num::parse_lenient(text).ok_or_else(bad)?;
    Ok(Calc {
        ty: ArithType::Numeric,
        node: Node::Const(Scalar::Num(n)),
    })
}

fn int_range(ty: ArithType) -> (i128, i128, &'static str) {
    match ty {
        ArithType::Int2 => (i16::MIN.into(), i16::MAX.into(), "smallint"),
        ArithType::Int4 => (i32::MIN.into(), i32::MAX.into(), "integer"),
        _ => (i64::MIN.into(), i64::MAX.into(), "bigint"),
    }
}

/// `v` as an integer of type `ty`, or Postgres's out-of-range error for it.
fn fit_int(v: i128, ty: ArithType) -> Result<Scalar, MergeError> {
    let (lo, hi, name) = int_range(ty);
    if v < lo || v > hi {
        return Err(MergeError::data("22003", format!("{name} out of range")));
    }
    Ok(Scalar::Int(v as i64))
}

fn division_by_zero() -> MergeError {
    MergeError::data("22012", "division by zero")
}

fn underflow() -> MergeError {
    MergeError::data("22003", "value out of range: underflow")
}

fn negate(v: Scalar, ty: ArithType) -> Result<Scalar, MergeError> {
    Ok(match v {
        Scalar::Int(i) => fit_int(-i128::from(i), ty)?,
        Scalar::Num(n) => Scalar::Num(n.negated()),
        Scalar::F8(f) => Scalar::F8(-f),
    })
}

/// `v` of type `from` converted to `to`, as Postgres's casts (and the implicit casts of
/// operator resolution) convert.
fn convert(v: Scalar, from: ArithType, to: ArithType) -> Result<Scalar, MergeError> {
    if from == to {
        return Ok(v);
    }
    let int_target = matches!(to, ArithType::Int2 | ArithType::Int4 | ArithType::Int8);
    Ok(match v {
        Scalar::Int(i) if int_target => fit_int(i.into(), to)?,
        Scalar::Int(i) if to == ArithType::Numeric => {
            Scalar::Num(Num::Fin(Dec::from_i128(i.into())))
        }
        Scalar::Int(i) => Scalar::F8(i as f64),
        Scalar::Num(n) if int_target => {
            let (_, _, name) = int_range(to);
            match n.round(0) {
                Num::NaN => {
                    return Err(MergeError::data(
                        "0A000",
                        format!("cannot convert NaN to {name}"),
                    ))
                }
                Num::PInf | Num::NInf => {
                    return Err(MergeError::data(
                        "0A000",
                        format!("cannot convert infinity to {name}"),
                    ))
                }
                Num::Fin(d) => fit_int(dec_to_i128(&d).unwrap_or(i128::MAX), to)?,
            }
        }
        Scalar::Num(n) => Scalar::F8(num_to_f8(&n)?),
        Scalar::F8(f) if int_target => {
            // dtoi4/dtoi8: rint (half to even), then the range check.
            let r = f.round_ties_even();
            let (lo, _, name) = int_range(to);
            if r.is_nan() || r < lo as f64 || r >= -(lo as f64) {
                return Err(MergeError::data("22003", format!("{name} out of range")));
            }
            Scalar::Int(r as i64)
        }
        Scalar::F8(_) => return Err(MergeError::protocol("unexpected cast of a float")),
    })
}

/// An integral decimal (scale 0 after rounding) as an i128, if it fits.
fn dec_to_i128(d: &Dec) -> Option<i128> {
    let int_len = d.digits.len().checked_sub(d.scale as usize)?;
    if int_len > 38 {
        return None;
    }
    let m = d.digits[..int_len]
        .iter()
        .fold(0i128, |a, &x| a * 10 + i128::from(x));
    Some(if d.neg { -m } else { m })
}

/// numeric_float8: through the numeric's text, as float8in reads it.
fn num_to_f8(n: &Num) -> Result<f64, MergeError> {
    Ok(match n {
        Num::NaN => f64::NAN,
        Num::PInf => f64::INFINITY,
        Num::NInf => f64::NEG_INFINITY,
        Num::Fin(d) => {
            let mut text = Vec::new();
            n.write_text(&mut text);
            let text = String::from_utf8_lossy(&text);
            let v: f64 = text
                .parse()
                .map_err(|_| MergeError::protocol("unreadable numeric text"))?;
            if v.is_infinite() || (v == 0.0 && !d.digits.is_empty()) {
                return Err(MergeError::data(
                    "22003",
                    format!("\"{text}\" is out of range for type double precision"),
                ));
            }
            v
        }
    })
}

/// `a op b`, both already of type `ty`.
fn arith(op: ArithOp, a: Scalar, b: Scalar, ty: ArithType) -> Result<Scalar, MergeError> {
    Ok(match (a, b) {
        (Scalar::Int(a), Scalar::Int(b)) => {
            let (a, b) = (i128::from(a), i128::from(b));
            let v = match op {
                ArithOp::Add => a + b,
                ArithOp::Sub => a - b,
                ArithOp::Mul => a * b,
                ArithOp::Div => {
                    if b == 0 {
                        return Err(division_by_zero());
                    }
                    a / b
                }
            };
            fit_int(v, ty)?
        }
        (Scalar::Num(a), Scalar::Num(b)) => Scalar::Num(match op {
            ArithOp::Add => a.add(&b),
            ArithOp::Sub => a.add(&b.negated()),
            ArithOp::Mul => num_mul(&a, &b),
            ArithOp::Div => num_div(&a, &b)?,
        }),
        (Scalar::F8(a), Scalar::F8(b)) => Scalar::F8(f8_arith(op, a, b)?),
        _ => return Err(MergeError::protocol("mixed operand types")),
    })
}

/// float8pl/mi/mul/div with their overflow, underflow and zero-divisor checks.
fn f8_arith(op: ArithOp, a: f64, b: f64) -> Result<f64, MergeError> {
    let inf_in = a.is_infinite() || b.is_infinite();
    match op {
        ArithOp::Add | ArithOp::Sub => {
            let r = if op == ArithOp::Add { a + b } else { a - b };
            if r.is_infinite() && !inf_in {
                return Err(overflow());
            }
            Ok(r)
        }
        ArithOp::Mul => {
            let r = a * b;
            if r.is_infinite() && !inf_in {
                return Err(overflow());
            }
            if r == 0.0 && a != 0.0 && b != 0.0 {
                return Err(underflow());
            }
            Ok(r)
        }
        ArithOp::Div => {
            if b == 0.0 && !a.is_nan() {
                return Err(division_by_zero());
            }
            let r = a / b;
            if r.is_infinite() && !a.is_infinite() {
                return Err(overflow());
            }
            if r == 0.0 && a != 0.0 && !b.is_infinite() {
                return Err(underflow());
            }
            Ok(r)
        }
    }
}

/// numeric_mul: the exact product, display scale the sum of the operands' (rounded to
/// Postgres's largest display scale, 16383, beyond it).
fn num_mul(a: &Num, b: &Num) -> Num {
    let sign = |n: &Num| match n {
        Num::Fin(d) if d.digits.is_empty() => 0,
        Num::Fin(d) if d.neg => -1,
        Num::NInf => -1,
        _ => 1,
    };
    match (a, b) {
        (Num::NaN, _) | (_, Num::NaN) => Num::NaN,
        (Num::Fin(x), Num::Fin(y)) => {
            let mut acc = vec![0u32; x.digits.len() + y.digits.len()];
            for (i, &dx) in x.digits.iter().enumerate().rev() {
                for (j, &dy) in y.digits.iter().enumerate().rev() {
                    acc[i + j + 1] += u32::from(dx) * u32::from(dy);
                }
                // Carry now and then so that the u32 cells never overflow.
                if i % 8 == 0 {
                    carry(&mut acc);
                }
            }
            carry(&mut acc);
            let d = Dec {
                neg: x.neg != y.neg,
                digits: acc.into_iter().map(|c| c as u8).collect(),
                scale: x.scale + y.scale,
            }
            .normalized();
            if d.scale > 16_383 {
                Num::Fin(dec_round(&d, 16_383))
            } else {
                Num::Fin(d)
            }
        }
        // An infinity: NaN times zero, else the sign of the product.
        _ => match sign(a) * sign(b) {
            0 => Num::NaN,
            1 => Num::PInf,
            _ => Num::NInf,
        },
    }
}

/// Propagates carries in base-10 cells (most significant first).
fn carry(cells: &mut [u32]) {
    let mut c = 0u32;
    for cell in cells.iter_mut().rev() {
        let v = *cell + c;
        *cell = v % 10;
        c = v / 10;
    }
}

/// numeric_div: NaN and infinity as Postgres 15 handles them; else the quotient at
/// `select_div_scale`'s scale, rounded half away from zero.
fn num_div(a: &Num, b: &Num) -> Result<Num, MergeError> {
    let is_zero = |n: &Num| matches!(n, Num::Fin(d) if d.digits.is_empty());
    Ok(match (a, b) {
        (Num::NaN, _) | (_, Num::NaN) => Num::NaN,
        (Num::PInf | Num::NInf, Num::PInf | Num::NInf) => Num::NaN,
        (Num::PInf | Num::NInf, Num::Fin(d)) => {
            if d.digits.is_empty() {
                return Err(division_by_zero());
            }
            if (*a == Num::PInf) != d.neg {
                Num::PInf
            } else {
                Num::NInf
            }
        }
        // A finite value over an infinity.
        (Num::Fin(_), Num::PInf | Num::NInf) => Num::Fin(Dec::default()),
        (Num::Fin(_), _) if is_zero(b) => return Err(division_by_zero()),
        (Num::Fin(x), Num::Fin(y)) => Num::Fin(dec_div(x, y)),
    })
}

/// `x / y` (y not zero) at Postgres's division scale, rounded half away from zero.
fn dec_div(x: &Dec, y: &Dec) -> Dec {
    let rscale = div_scale(x, y);
    // x / y * 10^rscale = X * 10^(y.scale + rscale - x.scale) / Y for the digit strings X, Y.
    let shift = i64::from(y.scale) + i64::from(rscale) - i64::from(x.scale);
    let mut dividend = x.digits.clone();
    let mut divisor = y.digits.clone();
    if shift >= 0 {
        dividend.resize(dividend.len() + shift as usize, 0);
    } else {
        divisor.resize(divisor.len() + (-shift) as usize, 0);
    }
    let mut quotient = Vec::with_capacity(dividend.len());
    let mut rem: Vec<u8> = Vec::new();
    for &d in &dividend {
        if !(rem.is_empty() && d == 0) {
            rem.push(d);
        }
        let mut q = 0u8;
        while mag_cmp(&rem, &divisor) != Ordering::Less {
            rem = strip(mag_sub(&rem, &divisor));
            q += 1;
        }
        quotient.push(q);
    }
    let twice = strip(mag_add(&rem, &rem));
    if mag_cmp(&twice, &divisor) != Ordering::Less {
        quotient = mag_add(&strip(quotient), &[1]);
    }
    Dec {
        neg: x.neg != y.neg,
        digits: quotient,
        scale: rscale,
    }
    .normalized()
}

fn strip(mut v: Vec<u8>) -> Vec<u8> {
    let lead = v.iter().take_while(|&&d| d == 0).count();
    v.drain(..lead);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::combine::write_float8;
    use ArithType::{Float8, Int2, Int4, Int8, Numeric};

    fn n(text: &str) -> AggExpr {
        AggExpr::Number(text.to_string())
    }

    fn cast(to: ArithType, e: AggExpr) -> AggExpr {
        AggExpr::Cast {
            to,
            expr: Box::new(e),
        }
    }

    fn op(left: AggExpr, op: char, right: AggExpr) -> AggExpr {
        let op = match op {
            '+' => ArithOp::Add,
            '-' => ArithOp::Sub,
            '*' => ArithOp::Mul,
            _ => ArithOp::Div,
        };
        AggExpr::Arith {
            op,
            left: Box::new(left),
            right: Box::new(right),
        }
    }

    fn col(i: usize) -> AggExpr {
        AggExpr::Column(ColumnRef::Visible(i))
    }

    fn text(v: &Scalar) -> String {
        let mut out = Vec::new();
        match v {
            Scalar::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
            Scalar::Num(n) => n.write_text(&mut out),
            Scalar::F8(f) => write_float8(*f, &mut out),
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// A constant expression: folded when compiled, as Postgres folds it.
    fn constant(e: &AggExpr) -> Result<(ArithType, String), MergeError> {
        let index = |c: ColumnRef| -> Result<usize, MergeError> {
            Err(MergeError::protocol(format!("no column {c:?}")))
        };
        let calc = Calc::compile(e, &[], &[], &index)?;
        match &calc.node {
            Node::Const(v) => Ok((calc.ty, text(v))),
            other => panic!("not folded: {other:?}"),
        }
    }

    fn sqlstate(r: Result<(ArithType, String), MergeError>) -> String {
        match r {
            Err(e) => format!("{} {}", e.sqlstate, e.message),
            Ok(v) => format!("answered {v:?}"),
        }
    }

    /// Each case checked with psql on Postgres 15.
    #[test]
    fn constants_compute_as_on_postgres() {
        let cases: Vec<(AggExpr, ArithType, &str)> = vec![
            (op(cast(Int8, n("7")), '/', n("-2")), Int8, "-3"),
            (op(n("-7"), '/', n("2")), Int4, "-3"),
            (
                op(cast(Numeric, n("-7")), '/', n("2")),
                Numeric,
                "-3.5000000000000000",
            ),
            (
                op(cast(Numeric, n("1")), '/', n("3")),
                Numeric,
                "0.33333333333333333333",
            ),
            (op(n("10.00"), '/', n("4")), Numeric, "2.5000000000000000"),
            (op(n("2.5"), '*', n("1.25")), Numeric, "3.125"),
            (op(n("0.000"), '*', n("1.5")), Numeric, "0.0000"),
            (
                op(cast(Numeric, n("1")), '/', n("0.000003")),
                Numeric,
                "333333.333333333333",
            ),
            (
                op(cast(Numeric, n("123456789")), '/', n("7")),
                Numeric,
                "17636684.142857142857",
            ),
            (AggExpr::Neg(Box::new(n("0.00"))), Numeric, "0.00"),
            (
                op(cast(Float8, n("1")), '/', n("3")),
                Float8,
                "0.3333333333333333",
            ),
            (op(cast(Float8, n("2")), '*', n("0.1")), Float8, "0.2"),
            (cast(Int4, n("2.5")), Int4, "3"),
            (AggExpr::Neg(Box::new(cast(Int4, n("2.5")))), Int4, "-3"),
            (cast(Int4, cast(Float8, n("2.5"))), Int4, "2"),
            (cast(Int4, cast(Float8, n("3.5"))), Int4, "4"),
            (
                op(n("1"), '/', cast(Numeric, n("7"))),
                Numeric,
                "0.14285714285714285714",
            ),
            (
                op(n("12345678901234567890.12345"), '/', n("0.001")),
                Numeric,
                "12345678901234567890123.45000",
            ),
            (
                op(cast(Numeric, n("-2")), '/', n("3")),
                Numeric,
                "-0.66666666666666666667",
            ),
            (
                op(n("999999999999.99"), '/', n("0.07")),
                Numeric,
                "14285714285714.1429",
            ),
            (op(cast(Float8, n("1.5")), '+', n("1")), Float8, "2.5"),
            (
                op(cast(Float8, n("0.1")), '+', n("0.2")),
                Float8,
                "0.30000000000000004",
            ),
            (
                op(op(n("100.0"), '*', n("7")), '/', n("3")),
                Numeric,
                "233.3333333333333333",
            ),
            (op(cast(Int2, n("7")), '+', cast(Int2, n("1"))), Int2, "8"),
            (op(n("2147483648"), '-', n("1")), Int8, "2147483647"),
        ];
        for (e, ty, want) in &cases {
            assert_eq!(constant(e).ok(), Some((*ty, want.to_string())), "{e:?}");
        }
        let errors: Vec<(AggExpr, &str)> = vec![
            (
                op(cast(Int2, n("-32768")), '/', cast(Int2, n("-1"))),
                "22003 smallint out of range",
            ),
            (
                op(cast(Int2, n("32767")), '+', cast(Int2, n("1"))),
                "22003 smallint out of range",
            ),
            (
                op(n("-2147483648"), '/', n("-1")),
                "22003 integer out of range",
            ),
            (
                op(n("9223372036854775807"), '+', n("1")),
                "22003 bigint out of range",
            ),
            (op(n("1"), '/', n("0")), "22012 division by zero"),
            (op(n("1.0"), '/', n("0")), "22012 division by zero"),
            (
                op(cast(Float8, n("1")), '/', n("0")),
                "22012 division by zero",
            ),
            (
                cast(Int4, cast(Float8, n("10000000000"))),
                "22003 integer out of range",
            ),
            (
                op(
                    cast(Float8, n(&format!("1{}", "0".repeat(308)))),
                    '*',
                    n("10"),
                ),
                "22003 value out of range: overflow",
            ),
        ];
        for (e, want) in errors {
            assert_eq!(sqlstate(constant(&e)), want, "{e:?}");
        }
        // A double precision value cast to numeric keeps 15 digits on Postgres: refused.
        assert_eq!(
            constant(&cast(Numeric, cast(Float8, n("1")))).map_err(|e| e.sqlstate),
            Err("0A000")
        );
    }

    #[test]
    fn special_numerics_follow_postgres() {
        let num = |s: &str| Num::parse_lenient(s).unwrap_or(Num::NaN);
        let show = |r: Result<Num, MergeError>| match r {
            Ok(v) => text(&Scalar::Num(v)),
            Err(e) => e.sqlstate.to_string(),
        };
        assert_eq!(show(num_div(&num("5"), &num("Infinity"))), "0");
        assert_eq!(show(num_div(&num("Infinity"), &num("-2"))), "-Infinity");
        assert_eq!(show(num_div(&num("Infinity"), &num("0"))), "22012");
        assert_eq!(show(num_div(&num("NaN"), &num("0"))), "NaN");
        assert_eq!(show(num_div(&num("Infinity"), &num("Infinity"))), "NaN");
        assert_eq!(show(Ok(num_mul(&num("0"), &num("Infinity")))), "NaN");
        assert_eq!(show(Ok(num_mul(&num("Infinity"), &num("-2")))), "-Infinity");
        assert_eq!(
            show(Ok(num_mul(&num("-Infinity"), &num("-Infinity")))),
            "Infinity"
        );
        let to_int = |s: &str| match convert(Scalar::Num(num(s)), Numeric, Int8) {
            Ok(v) => text(&v),
            Err(e) => format!("{} {}", e.sqlstate, e.message),
        };
        assert_eq!(to_int("NaN"), "0A000 cannot convert NaN to bigint");
        assert_eq!(
            to_int("Infinity"),
            "0A000 cannot convert infinity to bigint"
        );
        assert_eq!(to_int("-2.5"), "-3");
        assert_eq!(to_int("9223372036854775807.5"), "22003 bigint out of range");
    }

    /// Leaves read the combined columns; a NULL leaf gives NULL without an error (the
    /// operators are strict), and the column types decide the result type.
    #[test]
    fn columns_type_and_nulls() {
        let cols = [
            Col {
                ty: Ty::Int8,
                oid: 20,
                binary: false,
            },
            Col {
                ty: Ty::Int8,
                oid: 20,
                binary: false,
            },
            Col {
                ty: Ty::Int4,
                oid: 23,
                binary: false,
            },
            Col {
                ty: Ty::Text,
                oid: 25,
                binary: false,
            },
        ];
        let aggs = [AggMerge::Sum, AggMerge::Count, AggMerge::Max, AggMerge::Min];
        let index = |c: ColumnRef| match c {
            ColumnRef::Visible(i) if i < 4 => Ok(i),
            _ => Err(MergeError::protocol("no such column")),
        };
        let compile = |e: &AggExpr| Calc::compile(e, &cols, &aggs, &index);
        let ratio = compile(&op(col(0), '/', col(1))).map_err(|e| e.message);
        let Ok(ratio) = ratio else {
            panic!("{ratio:?}")
        };
        assert_eq!(ratio.ty, Int8);
        let values = |sum: Option<i64>, count: i64| {
            move |i: usize| -> Result<Option<Scalar>, MergeError> {
                Ok(match i {
                    0 => sum.map(Scalar::Int),
                    _ => Some(Scalar::Int(count)),
                })
            }
        };
        assert_eq!(
            ratio.eval(&values(Some(7), 2)).ok(),
            Some(Some(Scalar::Int(3)))
        );
        // sum NULL over count 0: NULL, no division by zero.
        assert_eq!(ratio.eval(&values(None, 0)).ok(), Some(None));
        assert_eq!(
            ratio.eval(&values(Some(7), 0)).map_err(|e| e.sqlstate),
            Err("22012")
        );
        // max(int4) * 1.0 is numeric; a text aggregate is refused.
        assert_eq!(
            compile(&op(col(2), '*', n("1.0"))).map(|c| c.ty).ok(),
            Some(Numeric)
        );
        assert_eq!(
            compile(&op(col(3), '+', n("1")))
                .map_err(|e| e.sqlstate)
                .err(),
            Some("0A000")
        );
        // A leaf must be a combined aggregate.
        let aggs = [
            AggMerge::Expr(0),
            AggMerge::Count,
            AggMerge::Max,
            AggMerge::Min,
        ];
        assert!(Calc::compile(&col(0), &cols, &aggs, &index).is_err());
    }
}
