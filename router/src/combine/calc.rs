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
    cmp_float, dec_round, div_scale, float_value, int_value, mag_add, mag_cmp, mag_sub, num_value,
    overflow, Col, Dec, MergeError, Num, Ty,
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
    /// NULL when the first equals the second, else the first (in the `Calc`'s type).
    NullIf(Box<Calc>, Box<Calc>),
    /// The first, or the second (a constant of the `Calc`'s type) when it is NULL.
    Coalesce(Box<Calc>, Box<Calc>),
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
                let ty = l.ty.max(r.ty);
                Calc {
                    ty,
                    node: Node::Arith(*op, Box::new(coerced(l, ty)?), Box::new(coerced(r, ty)?)),
                }
            }
            AggExpr::NullIf(a, b) => {
                let a = Calc::compile(a, cols, aggregates, index)?;
                let b = Calc::compile(b, cols, aggregates, index)?;
                // nullif is `a = b`'s operator: integers compare across widths as they
                // are (int48eq, ...), other mixes convert the first argument too.
                let ty = if is_int(a.ty) && is_int(b.ty) {
                    a.ty
                } else {
                    a.ty.max(b.ty)
                };
                Calc {
                    ty,
                    node: Node::NullIf(Box::new(a), Box::new(b)),
                }
            }
            AggExpr::Coalesce(a, b) => {
                let a = Calc::compile(a, cols, aggregates, index)?;
                let b = Calc::compile(b, cols, aggregates, index)?;
                // select_common_type: among these types, the widest.
                let ty = a.ty.max(b.ty);
                Calc {
                    ty,
                    node: Node::Coalesce(Box::new(a), Box::new(coerced(b, ty)?)),
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
            Node::Neg(x) | Node::Cast(x) | Node::Coalesce(x, _) => x.is_const(),
            Node::Arith(_, l, r) | Node::NullIf(l, r) => l.is_const() && r.is_const(),
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
            Node::Arith(_, l, r) | Node::NullIf(l, r) | Node::Coalesce(l, r) => {
                l.reads_floats(cols) || r.reads_floats(cols)
            }
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
            Node::NullIf(l, r) => match (l.eval(column)?, r.eval(column)?) {
                (None, _) => None,
                (Some(a), None) => Some(convert(a, l.ty, self.ty)?),
                (Some(a), Some(b)) => {
                    let equal = match (&a, &b) {
                        (Scalar::Int(x), Scalar::Int(y)) => x == y,
                        _ => {
                            let common = l.ty.max(r.ty);
                            let x = convert(a.clone(), l.ty, common)?;
                            let y = convert(b, r.ty, common)?;
                            equals(&x, &y)
                        }
                    };
                    if equal {
                        None
                    } else {
                        Some(convert(a, l.ty, self.ty)?)
                    }
                }
            },
            Node::Coalesce(l, r) => match l.eval(column)? {
                Some(a) => Some(convert(a, l.ty, self.ty)?),
                None => r.eval(column)?,
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

/// `x` for an operator computing in `ty`: a constant is converted now, as Postgres folds
/// the implicit cast when planning (`sum(f) + 1<400 zeros>` fails even without rows).
fn coerced(x: Calc, ty: ArithType) -> Result<Calc, MergeError> {
    match x.node {
        Node::Const(v) if x.ty != ty => Ok(Calc {
            ty,
            node: Node::Const(convert(v, x.ty, ty)?),
        }),
        node => Ok(Calc { ty: x.ty, node }),
    }
}

fn is_int(ty: ArithType) -> bool {
    matches!(ty, ArithType::Int2 | ArithType::Int4 | ArithType::Int8)
}

/// Postgres's `=` for two values of one type: numeric by value (NaN equals NaN), float8
/// with NaN equal to NaN and -0 to 0.
fn equals(a: &Scalar, b: &Scalar) -> bool {
    match (a, b) {
        (Scalar::Int(x), Scalar::Int(y)) => x == y,
        (Scalar::Num(x), Scalar::Num(y)) => x.cmp(y) == Ordering::Equal,
        (Scalar::F8(x), Scalar::F8(y)) => cmp_float(*x, *y) == Ordering::Equal,
        _ => false,
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

    fn nullif(a: AggExpr, b: AggExpr) -> AggExpr {
        AggExpr::NullIf(Box::new(a), Box::new(b))
    }

    fn coalesce(a: AggExpr, b: AggExpr) -> AggExpr {
        AggExpr::Coalesce(Box::new(a), Box::new(b))
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
            (nullif(cast(Int4, n("1")), n("1.5")), Numeric, "1"),
            (
                nullif(cast(Int2, n("2")), cast(Float8, n("3"))),
                Float8,
                "2",
            ),
            (
                nullif(n("2147483648"), cast(Int4, n("1"))),
                Int8,
                "2147483648",
            ),
            (coalesce(cast(Int4, n("7")), n("0.5")), Numeric, "7"),
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
        // The implicit cast of a constant operand folds too: fails with no value read.
        let cols = [Col {
            ty: Ty::Float8,
            oid: 701,
            binary: false,
        }];
        let index = |_: ColumnRef| Ok(0);
        let huge = op(col(0), '+', n(&format!("1{}", "0".repeat(400))));
        let r = Calc::compile(&huge, &cols, &[AggMerge::Sum], &index);
        assert_eq!(r.map(|_| ()).map_err(|e| e.sqlstate), Err("22003"));
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
        // sum / nullif(count, 0): NULL instead of a division by zero; coalesce of that
        // with a literal takes the widest type (here int8 with int4 0).
        let safe = compile(&coalesce(op(col(0), '/', nullif(col(1), n("0"))), n("0")))
            .map_err(|e| e.message);
        let Ok(safe) = safe else { panic!("{safe:?}") };
        assert_eq!(safe.ty, Int8);
        assert_eq!(
            safe.eval(&values(Some(7), 0)).ok(),
            Some(Some(Scalar::Int(0)))
        );
        assert_eq!(
            safe.eval(&values(Some(7), 2)).ok(),
            Some(Some(Scalar::Int(3)))
        );
        // nullif(int4, int8) stays int4 (int48eq); NaN equals NaN, -0 equals 0.
        assert_eq!(
            compile(&nullif(col(2), col(1))).map(|c| c.ty).ok(),
            Some(Int4)
        );
        assert!(equals(&Scalar::F8(f64::NAN), &Scalar::F8(f64::NAN)));
        assert!(equals(&Scalar::F8(-0.0), &Scalar::F8(0.0)));
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

    /// `a|b|a/b|a*b` computed by Postgres 15 (random numerics of scales 0 to 9 and
    /// magnitudes 10^-6 to 10^17, `setseed(0.42)`).
    const DIV_MUL_REFS: &str = r"
-1107530.179221|5695242.25904168|-0.19446585919373349400|-6307652679863.44475810893128
0.00|0.00000876|0.000000000000|0.0000000000
-1828.7663|976929.992090607|-0.00187195225328939233|-1786576646.9945686281441
-10755455.4|-0.001|10755455400.00000000|10755.4554
-37851953078968.60000000|-0.00007830|483422133831016602.80970626|2963807926.0832413800000000
-0.00303578|-0.001080|2.8109074074074074|0.00000327864240
-470966.24777211|-0.766|614838.443566723238|360760.14579343626
0.000|-2.678074281|0.00000000000000000000|0.000000000000
-223.50522287|0.008|-27938.152858750000|-1.78804178296
-3.46291|85.06633|-0.04070835076580828161|-294.5770448203
-237220885143006.0000|0.0001|-2372208851430060000.0000|-23722088514.30060000
0.00000|8195.45712|0.00000000000000000000|0.0000000000
11879979.872|9030.907429586|1315.4801956091591563|107286998489.376937292992
0.038|995373.37209|0.000000038176629057507180|37824.18813942
79217626|0.81923|96697662.439119661145|64897455.74798
-639227016876|0.0001|-6392270168760000.0000|-63922701.6876
138559436736520.0000000|-5496.9|-25206832348.50915971|-761647367796976788.00000000
3731343497172350.0000000|67.407809|55354766050508.3320539|251521689770785808.8811500000000
4132.83763717|9.96423|414.7673866590795275|41180.5447694184291
405860.07627523|-0.036546|-11105458.224572593444|-14832.56234755455558
-834735624176313.00000000|0.00012|-6956130201469275000.00000000|-100168274901.1575600000000
-327523643.3518640|9778.966|-33492.666131763215|-3202842572534.0040926240
143891194347.201|-0.2683|-536307097827.80842341|-38606007443.3540283
-31052318172971000.000000|0.5863109|-52962205159363402.5906733|-18206312615080982.6839000000000
0|0.0001736|0.0000000000000000|0.0000000
-3488882945243|-0.000003|1162960981747666666.666667|10466648.835729
-710544367019.4370000|355985|-1995995.244236237482|-252943136493414280.4450000
0.0|-0.00000601|0.000000000000|0.000000000
0.00043|1.571824|0.00027356752409939026|0.00067588432
495919225032313.0000|-0.2097|-2364898545695340.9633|-103994261489276.03610000
4.4137364|-69685.3|-0.000063338127266439263374|-307572.54515492
41457694.738144|6384.8838|6493.1008984288797863|264702563518.9208676672
-31.44668|-25.4254|1.2368214462702652|799.544417672
-1101128611342.12|3545|-310614558.91174048|-3903500927207815.40
456619.8184|0.0046|99265177.913043478261|2100.45116464
-288584957832465.00000000|3.956551117|-72938513695048.767898934|-1141801137261437.29461340500000000
-0.00000269|-0.215151886|0.000012502795350815562918|0.00000057875857334
-300.5|-813475.26926|0.00036940274812946438|244449318.412630
-21660965960043000.00000|64753.69|-334513229439.78945447|-1402627474877176808670.0000000
0.1689|157.9797|0.00106912470399677933|26.68277133
268388840.95076|383826|699.2461192070365218|103014615266766.40776
-0.238026|0.9321|-0.25536530415191503058|-0.2218640346
-2671701491123420.00|0.093310184|-28632474790998375.911465355|-249296957729800.68690928000
0.003|-432.79895138|-0.000006931624927542817745|-1.29839685414
-173641.44615983|5995995.6|-0.02895956864275050502|-1041153347151.977576748
186864.920|0.7|266949.885714285714|130805.4440
248.67|6535322.51095979|0.000038050149718392374610|1625138648.8003709793
468.982247|-8.54842899|-54.8618053151775669|-4009.06143605014053
465217170092|-0.0038551|-120675772377370.2368291|-1793458712.4216692
2080377|1|2080377.000000000000|2080377
0.0|7.7758070|0.00000000000000000000|0.00000000
0.000|-2578.67590748|0.00000000000000000000|0.00000000000
-0.005|9.9452|-0.00050275509793669308|-0.0497260
0.00000441|0.010351534|0.00042602381444141516|0.00000004565026494
5513197.8380129|-0.0005|-11026395676.02580000|-2756.59891900645
795.64|-0.0000074|-107518918.91891892|-0.005887736
-276478572128.7200|1|-276478572128.72000000|-276478572128.7200
2547759747725.6500|686.129344465|3713235366.302881159|1748092725561314.0091660272500
35949874100|543|66206029.650092081031|19520781636300
0|0.0005650|0.0000000000000000|0.0000000
1508495171.4|0.00000715|210978345650349.65034965|10785.740475510
-4667370719930.89000000|0.000433947|-10755623889394073.469801612|-2025391521.80184992283000000
242896580912944.000000|2556240.9|95021005.615293926328|620902174599826792209.6000000
-231877788778177.000000|5256|-44116778686.86777017|-1218749657818098312.000000
1262536461695710.0|95.0|13289857491533.7895|119940963861092450.00
-75702119289.967800|5847.502294571|-12946060.638616929352|-442668316251974.271800704813800
0.0|0.13120|0.0000000000000000|0.000000
-457838876826832.00000000|1813327.356938230|-252485506.863958944|-830211760419967109821.43058736000000000
-49047808261.8974|-80.614806201|608421834.316696257|3953979557616.6655535457774
347100392294644.00000000|7881.332599365|44040825319.643269982|2735613637044157813.48730106000000000
0.0|0.0000046|0.000000000000|0.00000000
0.00027|-8174.57|-0.000000033029260254667830|-2.2071339
-2356446521.29876000|7117.3198|-331086.221712105728|-16771583483680.786263448000
16915493000273900.00000|-6347.75740934|-2664798275905.23294149|-107375446025127555374.4182260000000
-71014271|-0.00000800|8876783875000.00000000|568.11416800
34371105.7|8220.89817|4180.9428835195023465|282561359950.006569
0.515|618239.34012|0.000000833010723484595324|318393.26016180
27.49529|-3.9|-7.0500743589743590|-107.231631
-0.01670385|2413.8607|-0.000006919972639680491919|-40.320767053695
0|31739.030203704|0.000000000000000000000000|0.000000000
-199611233|1.23935490|-161060591.280189395306|-247389159.71359170
0.0038|762333.319201191|0.0000000049846962008453470032|2896.8666129645258
-233639013.2233|9072856.54|-25.7514281409876674|-2119773249122163.885382
0.0000037|0.00280180|0.00132057962738239703|0.000000010366660
0.0|74.230095411|0.00000000000000000000|0.0000000000
-2672010.4079|-5496968.605|0.48608798774465622039|14687957324459.5439795
0.0226417|1135|0.000019948634361233480176|25.6983295
-1683413083885.240|0.001490|-1129807438849154.362416|-2508285494.989007600
2332336378.2893|-2069814|-1126.8338016311127473|-4827502488492489.1902
47710818879988.000000|-5180.9979|-9208808766.35522280|-247189652424498180.0252000000
-27030282707.9387000|0.703962884|-38397312304.804268630|-19028315770.4158569472108000
-469368548.35|0.000005|-93873709670000.000000|-2346.84274175
9.57054|0.00749|1277.7757009345794393|0.0716833446
49956555|0.000501330|99648046197.115672312|25044.719718150
0.0|0.000051|0.000000000000|0.0000000
-0.29|0.00080|-362.5000000000000000|-0.0002320
-546845015.493498|15.89332|-34407223.631909380796|-8691182821.64312163336
-2115957540.28979000|0.0040|-528989385072.44750000|-8463830.161159160000
4566547617883|9530.320338|479159929.14476575|43520661637155807.404454
-530251.3332520|0.025|-21210053.330080000000|-13256.2833313000
-144357803482796.0000000|62.029670|-2327237973098.9379760|-8954466911962686.5573200000000
0.00000043|-1202253.5|-0.00000000000035766167451373607979|-0.516969005
-71851.490026|0.769|-93434.967524057217|-55253.795829994
911891358637848.00000000|0.489553774|1862699068147410.502855198|446419856099145.98763835200000000
4590758888536.71|470.682|9753419269.35109055|2160787575174235.73622
18776529.17|7975110.45|2.3543911131663387|149744893998396.8265
-4844314690613560|-9.98|485402273608573.1463|48346260612323328.80
-0.0000013|1.232038|-0.000001055162259605629047|-0.0000016016494
4883479192409790.0000000|7040.1157|693664621507.53999682|34380258533107483412.70300000000
-30.137141|0.000743|-40561.427994616420|-0.022391895763
36840707258.7197000|-0.000001|-36840707258719700.0000000|-36840.7072587197000
4.96009|4.625|1.07245189189189189189|22.94041625
-156967.353169|90344.24867023|-1.7374360347159926|-14181097587.80795102645887
-452203934787014.0000000|4.49577506|-100584199332031.08253374|-2033007172049323.953070840000000
2.933813|53428.94|0.000054910559707903619274|156750.51874822
-0.002763|0.00000001|-276300.000000000000|-0.00000000002763
-33711802620.266|0.000000859|-39245404680169965.075669383|-28958.438450808494
-4.774893|-1|4.7748930000000000|4.774893
179298236072671.0000000|2.1|85380112415557.6190476|376526295752609.10000000
-1720313.185970|-82|20979.429097195122|141065681.249540
0.03731810|-6.377|-0.00585198369139093618|-0.23797752370
9.87948|90300.217|0.000109407046053942483881|892119.18784716
-0.4474930|-763.87372767|0.00058582064520658683|341.828146016231310
0|672615.16184|0.000000000000000000000000|0.00000
-4.1694|-22445.862217066|0.00018575361283425900|93585.7779278349804
-4440221.68385|-0.0175999|252286756.39350224|78147.457613591615
3109685002.942|0.00870|357435057809.42528736|27054259.52559540
-586866.7|0.006756|-86866000.592066311427|-3964.8714252
344551972986.542000|-6795306.02837830|-50704.408535485684|-2341336099125086026.85598483860000
1.551|3.66|0.42377049180327868852|5.67666
-236492674573.43400000|0.0014709|-160780933152106.87334285|-347857075.030064070600000
17.3323707|0.9|19.2581896666666667|15.59913363
-1843859.922066|953|-1934.7953012235047219|-1757198505.728898
-4860874915107.2|-0.008004|607305711532633.683158|38906442820.5180288
1.22780559|-2782.970|-0.00044118534874612375|-3416.94612280230
-270844983.68700|7356921.9|-36.8149869427049375|-1992585391992033.045300
-4.465985|8543985.0|-0.000000522705154561952063|-38157308.8502250
-13690323.9732672|3.730621293|-3669716.891112806931|-51073414.1227389790984896
-321342.8|8546.390280635|-37.5998274649498115|-2746320982.6720366780
164135561710.162|0.000339|484175698260064.896755|55641955.419744918
1|-1.7|-0.58823529411764705882|-1.7
0.0000|640.98489|0.00000000000000000000|0.000000000
0.00000|0.000342311|0.0000000000000000|0.00000000000000
14.5073174|-8.78|-1.6523140546697039|-127.374246772
-20797958.9580|-0.0000009|23108843286666.6666667|18.71816306220
-394246923221907.00|-0.00084|469341575264175000.00000|331167415506.4018800
0.0|-404.68785626|0.00000000000000000000|0.000000000
0|0.000800623|0.0000000000000000|0.000000000
3101010.0|33.935190|91380.363569498211|105233363.5419000
-3203855839|-0.000176085|18194939029446.006190192|564150.955410315
0.000|-548689|0.000000000000000000000000|0.000
201.9|7.3497|27.4705090003673619|1483.90443
4405.4244|-490.227829|-8.9864837110257158|-2159661.6394356276
-927016.431974|0.00001|-92701643197.40000000|-9.27016431974
0.0257|789101.40141|0.000000032568691367266799|20279.906016237
2314150473636470|769.2525385|3008310480390.4004276|1780166126315831873.6790950
-119042161|6.552|-18168827.991452991453|-779964238.872
0|0.000295|0.0000000000000000|0.000000
-1170.191798|30.829|-37.9575009893282299|-36075.842940542
49250472461033.4|281.1534|175172957044.20931776|13846937784025907.92356
0|0.00005|0.000000000000|0.00000
0.03421803|-60794.046|-0.000000562851664783094055|-2080.25248984938
0.2112|-6394033.726733|-0.000000033030792302046802|-1350419.9230860096
0.0000|97089.29952|0.000000000000000000000000|0.000000000
-158250750153708.0|205168.5|-771320890.65186907|-32468069032911039798.00
-13.17440650|3.711144|-3.5499583147406837|-48.89211963603600
0.000004|1078.6060|0.0000000037084904033539587208|0.0043144240
-0.0000003|0.057086642|-0.000005255169852169619646|-0.0000000171259926
-0.000005|0.6331|-0.000007897646501342599905|-0.0000031655
-299672028.4|93.47|-3206077.119931528833|-28010344494.548
0.4944682|1.952|0.25331362704918032787|0.9652019264
4230095594977.960000|662.018401|6389694891.54420045|2800401121864452.709441960000
-3531510.6214173|12.00|-294292.551784775000|-42378127.457007600
5422.365|-671.9477430|-8.0696230569822749|-3643545.9234721950
0|1.893|0.00000000000000000000|0.000
-3838.070676|3362.69803573|-1.1413664370749253|-12906272.72317811325348
0.000|2468822.992|0.000000000000000000000000|0.000000
-147084210100.246000|7601.25|-19350002.973227561256|-1118023852024494.90750000
2530534893415.2100000|55684.6085|45444063.657468472639|140911844835415196.79528500000
-14020647.3|-0.78237|17920737.374899344300|10969333.828101
-0.0000275|0.001|-0.02750000000000000000|-0.0000000275
40.473|-37351.6211820|-0.00108356742543491562|-1511732.1640990860
5663646387935.9300000|0.000086|65856353348092209.3023256|487073589.3624899800000
-36458415155800300.00|0.0001|-364584151558003000000.0000|-3645841515580.030000
-495143367.885|-40239.99537|12304.7570789270694690|19924566831178.60669245
0.036901|0.2|0.18450500000000000000|0.0073802
2717649887715.11000|0.43|6320116017942.11628|1168589451717.4973000
-274531|88.827424044|-3090.6108440565958871|-24385881.550223364
-292504834.0689|-583.806661571|501030.312469853254|170766270671.1438131962419
-362221991676455.00000000|0.9433|-383994478613860.91381321|-341684004748400.001500000000
-212.7507918|159.949089|-1.3301156832471862|-34029.2953324386702
-0.00047243|9169325.368|-0.0000000000515228744798098215|-4331.86438360424
173210.19|2579|67.1617642497091896|446709080.01
391932.3132985|-123969.07|-3.1615330606134256|-48587484382.563677395
0.0|4.34960|0.00000000000000000000|0.000000
0.0|0.14512|0.0000000000000000|0.000000
0.000|0.073|0.0000000000000000|0.000000
-0.00173871|80743.380184367|-0.000000021533777704498895|-140.38932256036074657
0.0000|0.6|0.0000000000000000|0.00000
2.450150|34.692535134|0.07062470328375512945|85.001914958570100
";

    #[test]
    fn random_numeric_divisions_and_products_match_postgres() {
        let num = |s: &str| Num::parse_lenient(s).unwrap_or(Num::NaN);
        for line in DIV_MUL_REFS.lines().filter(|l| !l.is_empty()) {
            let p: Vec<&str> = line.split('|').collect();
            let (a, b) = (num(p[0]), num(p[1]));
            let quotient = num_div(&a, &b).map(|q| text(&Scalar::Num(q)));
            assert_eq!(quotient.ok().as_deref(), Some(p[2]), "{line}: a / b");
            assert_eq!(text(&Scalar::Num(num_mul(&a, &b))), p[3], "{line}: a * b");
        }
    }
}
