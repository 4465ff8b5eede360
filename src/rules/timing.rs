//! When does a rule change value as time passes, with no new event?
//!
//! This module owns the *next-change* analysis behind timers. Given a customer's state at
//! instant `now`, [`Expr::next_change`] returns the earliest instant after `now` at which the
//! expression's value may differ from its value at `now` if no event arrives ([`NEVER`] if it
//! cannot). The answer may be early (the engine then re-evaluates, finds nothing changed and
//! asks again) but never late, so a timer set to it never misses a flip.
//!
//! How: every numeric sub-expression is, until its next *breakpoint*, a linear function of
//! time: `value + slope * (t - now)`. `days_since`/`hours_since` have a constant slope;
//! windowed counts are constant until their oldest bucket leaves the window; `abs`, `min`,
//! `max` break where their arguments cross; sums, differences and products or quotients by a
//! time-independent value stay linear. A comparison of two linear pieces changes where their
//! difference crosses zero, which is solved directly (then checked by evaluating around the
//! solution, so float rounding cannot make the timer late). A windowed feature compared with a
//! time-independent value is solved by walking its buckets forward (exact, no step limit; a
//! count compared with a value is a search instead, since the count only falls as buckets
//! leave);
//! `days_since(x)` or `hours_since(x)` of a fixed instant against a time-independent value is
//! solved in closed form (the value only grows, so an inequality flips once, near
//! `x + k * unit`); otherwise the analysis steps from breakpoint to breakpoint (at most
//! [`MAX_STEPS`] per call). The engine passes each rule's value at `now`, which the
//! evaluation has just brought up to date ([`Expr::next_change_given`]), so that a side of
//! `&&` or `||` whose value follows from it is not evaluated again. The product or quotient
//! of two time-dependent values is not linear: comparisons over it are re-checked every
//! [`RECHECK_MS`] (documented in the README as the one approximate case).
//!
//! The engine runs the analysis compiled when the rules load ([`Timing`]): the same
//! answers, with the shape of each comparison recognised once and the sides of `&&`/`||`
//! evaluated by their [`Program`]s. The tree's analysis here stays the reference.

use super::compile::{time_val, ArithOp, CmpOp, Ctx, Expr, Feature, Func, Lit, Val};
use super::program::Program;
pub use crate::state::NEVER;
use crate::time::{DAY_MS, HOUR_MS};
use crate::windows::Walk;

/// Re-check period for comparisons over non-linear functions of time.
pub const RECHECK_MS: i64 = 60_000;
/// Breakpoints visited per call before answering with an early (but safe) instant.
pub const MAX_STEPS: usize = 16;

/// A numeric value over `[now, until)`: `value + slope * (t - now)` (ms), or missing
/// (`value = None`) for the whole piece.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Piece {
    value: Option<f64>,
    slope: f64,
    until: i64,
}

impl Piece {
    fn constant(value: Option<f64>, until: i64) -> Piece {
        Piece {
            value,
            slope: 0.0,
            until,
        }
    }
}

/// The first instant after `now` at which `v1 + s1 * dt` reaches `v2 + s2 * dt`, rounded
/// down (never later than the true crossing), if it comes before `until`.
fn crossing(now: i64, v1: f64, s1: f64, v2: f64, s2: f64, until: i64) -> Option<i64> {
    if s1 == s2 {
        return None;
    }
    let dt = (v2 - v1) / (s1 - s2);
    if !dt.is_finite() || dt <= 0.0 {
        return None;
    }
    let t = now.saturating_add((dt.floor() as i64).max(1));
    (t < until).then_some(t)
}

fn num(v: Val<'_>) -> Option<f64> {
    match v {
        Val::Num(n) => Some(n),
        Val::Time(t) => Some(t as f64),
        _ => None,
    }
}

/// One side of `&&` or `||` for [`junction`]: whether time can change it, how to evaluate
/// it, and how to analyse it told its value.
struct Side<H, N> {
    time: bool,
    holds: H,
    next: N,
}

/// The next change of `a && b` (`blocking` false) or `a || b` (`blocking` true), `value` its
/// value at `cx.now` if known. The tree and the compiled analysis ([`Timing`]) both run it,
/// each with its own evaluation of the sides.
fn junction<H1, N1, H2, N2>(
    cx: &Ctx<'_>,
    value: Option<bool>,
    blocking: bool,
    a: Side<H1, N1>,
    b: Side<H2, N2>,
) -> i64
where
    H1: Fn(&Ctx<'_>) -> bool,
    N1: Fn(&Ctx<'_>, Option<bool>) -> i64,
    H2: Fn(&Ctx<'_>) -> bool,
    N2: Fn(&Ctx<'_>, Option<bool>) -> i64,
{
    // A conjunction changes only when a false side can turn true (or, when both are true,
    // when either can change); dually for a disjunction (`blocking`: the value of a side
    // that decides the node alone). Only the sides that matter are analysed (each analysis
    // may walk buckets). A blocking side that time cannot change blocks for good: the other
    // side is not even evaluated. A node that is not blocking has no blocking side; one that
    // is, whose first side is not, has a blocking second side.
    let va = match value {
        Some(v) if v != blocking => v,
        _ => (a.holds)(cx),
    };
    if va == blocking && !a.time {
        return NEVER;
    }
    let vb = match value {
        Some(v) if v != blocking || va != blocking => v,
        _ => (b.holds)(cx),
    };
    if vb == blocking && !b.time {
        return NEVER;
    }
    let (ta, tb) = (|cx| (a.next)(cx, Some(va)), |cx| (b.next)(cx, Some(vb)));
    match (va == blocking, vb == blocking) {
        (true, true) => match ta(cx) {
            NEVER => NEVER,
            ta => ta.max(tb(cx)),
        },
        (true, false) => ta(cx),
        (false, true) => tb(cx),
        (false, false) => ta(cx).min(tb(cx)),
    }
}

impl Feature {
    /// Whether this is a windowed count (which only falls as time passes without events).
    fn is_count(&self) -> bool {
        matches!(
            self,
            Feature::PurchaseCountW(_) | Feature::EngagementCountW(_) | Feature::ActionCountW(..)
        )
    }

    /// The next instant after `cx.now` at which this feature may change with no event.
    fn next_change(&self, cx: &Ctx<'_>) -> i64 {
        let (st, cfg, now) = (cx.state, cx.cfg, cx.now);
        match *self {
            Feature::PurchaseCountW(b) | Feature::PurchaseSpendW(b) => {
                st.purchases_window_next(cfg, now, b)
            }
            Feature::EngagementCountW(b) => st.engagements_window_next(cfg, now, b, None),
            Feature::ActionCountW(a, b) => st.engagements_window_next(cfg, now, b, Some(a)),
            _ => NEVER,
        }
    }

    /// For a windowed feature (a number): the first instant after `cx.now` at which, with no
    /// new event, `differs` holds for its value (`NEVER`: never). None for any other feature.
    /// `walk`: [`Walk::Monotone`] when `differs` turns true at most once as a count falls
    /// (the windows then search instead of walking).
    fn first_where(
        &self,
        cx: &Ctx<'_>,
        walk: Walk,
        mut differs: impl FnMut(f64) -> bool,
    ) -> Option<i64> {
        let (st, cfg, now) = (cx.state, cx.cfg, cx.now);
        Some(match *self {
            Feature::PurchaseCountW(b) => {
                st.purchases_first_change(cfg, now, b, walk, |n, _| differs(n as f64))
            }
            // Spend falls as buckets leave unless a bucket holds a refund (a negative amount).
            Feature::PurchaseSpendW(b) => {
                let walk = if st.activity.may_have_refunds() {
                    Walk::Linear
                } else {
                    walk
                };
                st.purchases_first_change(cfg, now, b, walk, |_, spend| differs(spend))
            }
            Feature::EngagementCountW(b) => {
                st.engagements_first_change(cfg, now, b, None, walk, |n| differs(n as f64))
            }
            Feature::ActionCountW(a, b) => {
                st.engagements_first_change(cfg, now, b, Some(a), walk, |n| differs(n as f64))
            }
            _ => return None,
        })
    }
}

impl Expr {
    /// The earliest instant after `cx.now` at which this expression may change value if no
    /// event arrives; never later than the true change. See the module docs.
    pub fn next_change(&self, cx: &Ctx<'_>) -> i64 {
        self.next_change_given(cx, None)
    }

    /// [`Expr::next_change`] of a boolean expression told its value at `cx.now`, if known
    /// (`value`: a rule's membership, which the evaluation has just brought up to date): its
    /// sides are then evaluated only where the value does not tell theirs. A wrong `value`
    /// makes the answer wrong.
    pub fn next_change_given(&self, cx: &Ctx<'_>, value: Option<bool>) -> i64 {
        if !self.has_time() {
            return NEVER;
        }
        match self {
            Expr::Lit(_) => NEVER,
            Expr::Feature(f) => f.next_change(cx),
            Expr::Not(e) => e.next_change_given(cx, value.map(|v| !v)),
            Expr::And(a, b) | Expr::Or(a, b) => junction(
                cx,
                value,
                matches!(self, Expr::Or(..)),
                Side {
                    time: a.has_time(),
                    holds: |cx: &Ctx<'_>| a.eval_bool(cx),
                    next: |cx: &Ctx<'_>, v| a.next_change_given(cx, v),
                },
                Side {
                    time: b.has_time(),
                    holds: |cx: &Ctx<'_>| b.eval_bool(cx),
                    next: |cx: &Ctx<'_>, v| b.next_change_given(cx, v),
                },
            ),
            Expr::Cmp(op, a, b) => cmp_next_change(*op, a, b, cx, value),
            Expr::InList { item, .. } => match item.piece(cx) {
                Some(p) if p.slope == 0.0 || p.value.is_none() => p.until,
                _ => cx.now.saturating_add(RECHECK_MS),
            },
            Expr::Call(Func::Has, args) => match args[0].piece(cx) {
                Some(p) => p.until,
                None => args[0].next_change(cx),
            },
            // Numeric expressions: until the end of the current linear piece, or right away
            // when the value moves continuously.
            _ => match self.piece(cx) {
                Some(p) if p.slope == 0.0 || p.value.is_none() => p.until,
                Some(_) => cx.now.saturating_add(1),
                None => cx.now.saturating_add(RECHECK_MS),
            },
        }
    }

    /// This numeric expression as a linear piece starting at `cx.now`, or None when it is not
    /// linear in time there (or not numeric).
    fn piece(&self, cx: &Ctx<'_>) -> Option<Piece> {
        if !self.has_time() {
            return match self.eval(cx) {
                v @ (Val::Num(_) | Val::Time(_) | Val::Missing) => {
                    Some(Piece::constant(num(v), NEVER))
                }
                _ => None,
            };
        }
        match self {
            Expr::Feature(f) => Some(Piece::constant(num(f.read(cx)), f.next_change(cx))),
            Expr::Neg(e) => e.piece(cx).map(|p| Piece {
                value: p.value.map(|v| -v),
                slope: -p.slope,
                until: p.until,
            }),
            Expr::Arith(op, a, b) => {
                let (pa, pb) = (a.piece(cx)?, b.piece(cx)?);
                let until = pa.until.min(pb.until);
                let (Some(x), Some(y)) = (pa.value, pb.value) else {
                    return Some(Piece::constant(None, until));
                };
                let (value, slope) = match op {
                    ArithOp::Add => (x + y, pa.slope + pb.slope),
                    ArithOp::Sub => (x - y, pa.slope - pb.slope),
                    ArithOp::Mul if pb.slope == 0.0 => (x * y, pa.slope * y),
                    ArithOp::Mul if pa.slope == 0.0 => (x * y, pb.slope * x),
                    ArithOp::Div if pb.slope == 0.0 => {
                        if y == 0.0 {
                            return Some(Piece::constant(None, until));
                        }
                        (x / y, pa.slope / y)
                    }
                    _ => return None,
                };
                Some(Piece {
                    value: Some(value),
                    slope,
                    until,
                })
            }
            Expr::Call(f, args) => match f {
                Func::DaysSince | Func::HoursSince => {
                    let p = args[0].piece(cx)?;
                    let unit = if *f == Func::DaysSince {
                        DAY_MS
                    } else {
                        HOUR_MS
                    } as f64;
                    Some(match p.value {
                        Some(t) => Piece {
                            value: Some((cx.now as f64 - t) / unit),
                            slope: 1.0 / unit,
                            until: p.until,
                        },
                        None => Piece::constant(None, p.until),
                    })
                }
                Func::Abs => {
                    let p = args[0].piece(cx)?;
                    let Some(v) = p.value else { return Some(p) };
                    let flip = v < 0.0 || (v == 0.0 && p.slope < 0.0);
                    let until = crossing(cx.now, v, p.slope, 0.0, 0.0, p.until).unwrap_or(p.until);
                    Some(Piece {
                        value: Some(v.abs()),
                        slope: if flip { -p.slope } else { p.slope },
                        until,
                    })
                }
                Func::Min | Func::Max => {
                    let (pa, pb) = (args[0].piece(cx)?, args[1].piece(cx)?);
                    let until = pa.until.min(pb.until);
                    let (Some(x), Some(y)) = (pa.value, pb.value) else {
                        return Some(Piece::constant(None, until));
                    };
                    let until = crossing(cx.now, x, pa.slope, y, pb.slope, until).unwrap_or(until);
                    // The side that is smaller now (or, if equal, from now on) is the minimum.
                    let a_smaller = x < y || (x == y && pa.slope <= pb.slope);
                    let take_a = a_smaller == (*f == Func::Min);
                    let p = if take_a { pa } else { pb };
                    Some(Piece { until, ..p })
                }
                Func::Coalesce => {
                    let pa = args[0].piece(cx)?;
                    if pa.value.is_some() {
                        return Some(pa);
                    }
                    let pb = args[1].piece(cx)?;
                    Some(Piece {
                        until: pa.until.min(pb.until),
                        ..pb
                    })
                }
                Func::Has => None,
            },
            _ => None,
        }
    }
}

/// Next change of `a op b`: the closed forms where the comparison has their shape
/// ([`WindowCmp`], [`SinceCmp`]), else a walk over the linear pieces of both sides.
/// `value`: the comparison's value at `cx.now`, if known.
fn cmp_next_change(op: CmpOp, a: &Expr, b: &Expr, cx: &Ctx<'_>, value: Option<bool>) -> i64 {
    let closed = if let Some((w, other)) = WindowCmp::of(op, a, b) {
        w.next(cx, num(other.eval(cx)), value)
    } else if let Some((s, arg, other)) = SinceCmp::of(op, a, b) {
        s.next(cx, arg.eval(cx), num(other.eval(cx)), value)
    } else {
        None
    };
    closed.unwrap_or_else(|| cmp_walk(op, a, b, cx, value))
}

/// The general analysis of `a op b`: walk the linear pieces of both sides, solving for the
/// zero of their difference inside each piece.
fn cmp_walk(op: CmpOp, a: &Expr, b: &Expr, cx: &Ctx<'_>, value: Option<bool>) -> i64 {
    let cmp = |t: i64| Expr::cmp_at(op, a, b, &cx.at(t));
    let initial = value.unwrap_or_else(|| cmp(cx.now));
    let mut t = cx.now;
    for _ in 0..MAX_STEPS {
        let c = cx.at(t);
        let (Some(pa), Some(pb)) = (a.piece(&c), b.piece(&c)) else {
            return t.saturating_add(RECHECK_MS);
        };
        let until = pa.until.min(pb.until);
        if let (Some(x), Some(y)) = (pa.value, pb.value) {
            if let Some(z) = crossing(t, x, pa.slope, y, pb.slope, until) {
                // The outcome flips within a few ms of the crossing: find the first instant
                // that differs; if rounding hides it, wake at the crossing anyway.
                let from = (z - 2).max(t + 1);
                return (from..=z + 2).find(|&s| cmp(s) != initial).unwrap_or(from);
            }
            // Equal values moving apart: `==`/`<=`/`>=` change at the next millisecond.
            if x == y && pa.slope != pb.slope && cmp(t + 1) != initial {
                return t + 1;
            }
        }
        if until == NEVER {
            return NEVER;
        }
        if cmp(until) != initial {
            return until;
        }
        t = until;
    }
    t
}

/// A windowed feature compared with a time-independent value (`count_30d >= 3`, the common
/// case), either way round: solved exactly from the window's buckets, with no step limit (a
/// count by binary searches, since it only falls as time passes; a spend too unless a bucket
/// holds a refund, and then by a walk forward with constant work per bucket).
#[derive(Clone, Copy)]
struct WindowCmp<'e> {
    op: CmpOp,
    feature: &'e Feature,
    feature_left: bool,
}

impl<'e> WindowCmp<'e> {
    /// `a op b` if it has this shape, and its other side.
    fn of(op: CmpOp, a: &'e Expr, b: &'e Expr) -> Option<(Self, &'e Expr)> {
        let (feature, other, feature_left) = match (a, b) {
            (Expr::Feature(f), o) if !o.has_time() => (f, o, true),
            (o, Expr::Feature(f)) if !o.has_time() => (f, o, false),
            _ => return None,
        };
        let w = WindowCmp {
            op,
            feature,
            feature_left,
        };
        Some((w, other))
    }

    /// The next change, `y` being the other side's value as a number (None for a value of
    /// another type, which makes the comparison constant). None when the feature is not
    /// windowed.
    fn next(self, cx: &Ctx<'_>, y: Option<f64>, value: Option<bool>) -> Option<i64> {
        // A windowed feature is always a number; against another number the comparison is
        // plain arithmetic (it runs once per bucket walked), otherwise it is constant.
        let Some(y) = y else {
            return Some(NEVER);
        };
        let (op, f) = (self.op, self.feature);
        let holds = |v: f64| holds_oriented(op, self.feature_left, v, y);
        let initial = match value {
            Some(v) => v,
            None => holds(num(f.read(cx))?),
        };
        let walk = match op {
            CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge => Walk::Monotone,
            CmpOp::Eq | CmpOp::Ne if f.is_count() => {
                // A count only falls as time passes. At or below `y` now, `== y` can only
                // turn false (or never true): that is monotone. Above it, nothing changes
                // before the count first reaches `y` or below: that instant, found by a
                // search, is the change if the count is `y` there, else early (a bucket
                // took it past `y`), which is allowed: the analysis runs again then.
                if num(f.read(cx))? > y {
                    return f.first_where(cx, Walk::Monotone, |v| v <= y);
                }
                Walk::Monotone
            }
            CmpOp::Eq | CmpOp::Ne => Walk::Linear,
        };
        f.first_where(cx, walk, |v| holds(v) != initial)
    }
}

/// `days_since(x) op k` or `hours_since(x) op k` (either way round) with `x` and `k`
/// time-independent and `op` an inequality (`days_since(purchases.last) > 60`, the common
/// case), solved in closed form: the value `(t - x) / unit` only grows with `t`, so the
/// comparison changes at most once, near `x + k * unit`.
#[derive(Clone, Copy)]
struct SinceCmp {
    op: CmpOp,
    /// The unit of the function, ms.
    unit: i64,
    since_left: bool,
}

impl SinceCmp {
    /// `a op b` if it has this shape, and the function's argument and the other side.
    fn of<'e>(op: CmpOp, a: &'e Expr, b: &'e Expr) -> Option<(Self, &'e Expr, &'e Expr)> {
        let (f, arg, other, since_left) = match (a, b) {
            (Expr::Call(f, args), o) if !o.has_time() => (f, &args[0], o, true),
            (o, Expr::Call(f, args)) if !o.has_time() => (f, &args[0], o, false),
            _ => return None,
        };
        let unit = match f {
            Func::DaysSince => DAY_MS,
            Func::HoursSince => HOUR_MS,
            _ => return None,
        };
        if arg.has_time() || matches!(op, CmpOp::Eq | CmpOp::Ne) {
            return None;
        }
        Some((
            SinceCmp {
                op,
                unit,
                since_left,
            },
            arg,
            other,
        ))
    }

    /// The next change, `x` being the argument's value and `k` the other side's as a number.
    /// The instant is checked with the evaluation's own arithmetic at most three times (never
    /// late); when rounding puts it away from where it was predicted, None, and the general
    /// walk answers.
    fn next(self, cx: &Ctx<'_>, x: Val<'_>, k: Option<f64>, value: Option<bool>) -> Option<i64> {
        let (op, unit, since_left) = (self.op, self.unit, self.since_left);
        // A missing or non-numeric side makes the comparison false until an event comes.
        let (Val::Time(x), Some(k)) = (x, k) else {
            return Some(NEVER);
        };
        // Exactly as `Expr::eval` computes the value and `eval_cmp` compares it.
        let holds = |t: i64| {
            let v = t.checked_sub(x).map(|d| d as f64 / unit as f64);
            v.map(|v| holds_oriented(op, since_left, v, k))
        };
        let initial = match value {
            Some(v) => v,
            None => holds(cx.now)?,
        };
        // As `t` grows without bound: whether the comparison ends up true.
        let grows_true = matches!(
            (op, since_left),
            (CmpOp::Gt | CmpOp::Ge, true) | (CmpOp::Lt | CmpOp::Le, false)
        );
        if initial == grows_true {
            return Some(NEVER);
        }
        let c = x
            .saturating_add((k * unit as f64).floor() as i64)
            .max(cx.now.saturating_add(1));
        if c >= NEVER - 1 {
            return None;
        }
        // The first instant that differs: `c` if the one before it does not, else `c + 1`.
        if holds(c)? != initial {
            return (c - 1 == cx.now || holds(c - 1)? == initial).then_some(c);
        }
        (holds(c + 1)? != initial).then_some(c + 1)
    }
}

type NextFn = Box<dyn Fn(&Ctx<'_>, Option<bool>) -> i64 + Send + Sync>;

/// A rule's timer analysis compiled when the rules load: [`Expr::next_change_given`] of the
/// marked expression ([`Expr::mark_static`]), as closures. The sides of `&&` and `||` are
/// evaluated by their [`Program`]s instead of the tree, and a comparison of one of the
/// closed-form shapes (a windowed feature, or `days_since`/`hours_since` of an instant,
/// against a time-independent value) is recognised once, a literal side read once; what has no special form runs the tree's analysis. Same
/// answers as the tree (a property test holds them equal).
pub struct Timing(NextFn);

impl std::fmt::Debug for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Timing")
    }
}

impl Timing {
    /// Compiles the analysis of a boolean expression marked by [`Expr::mark_static`].
    pub fn new(e: &Expr) -> Self {
        Timing(next_fn(e))
    }

    /// [`Expr::next_change_given`] of the expression compiled.
    #[inline]
    pub fn next_change_given(&self, cx: &Ctx<'_>, value: Option<bool>) -> i64 {
        (self.0)(cx, value)
    }
}

fn next_fn(e: &Expr) -> NextFn {
    if !e.has_time() {
        return Box::new(|_, _| NEVER);
    }
    match e {
        Expr::Not(a) => {
            let a = next_fn(a);
            Box::new(move |cx, value| a(cx, value.map(|v| !v)))
        }
        Expr::And(a, b) | Expr::Or(a, b) => {
            let blocking = matches!(e, Expr::Or(..));
            let (ha, hb) = (a.has_time(), b.has_time());
            let (pa, pb) = (Program::new(a), Program::new(b));
            let (na, nb) = (next_fn(a), next_fn(b));
            Box::new(move |cx, value| {
                junction(
                    cx,
                    value,
                    blocking,
                    Side {
                        time: ha,
                        holds: |cx: &Ctx<'_>| pa.holds(cx),
                        next: &na,
                    },
                    Side {
                        time: hb,
                        holds: |cx: &Ctx<'_>| pb.holds(cx),
                        next: &nb,
                    },
                )
            })
        }
        Expr::Cmp(op, a, b) => cmp_next_fn(*op, a, b),
        _ => {
            let e = e.clone();
            Box::new(move |cx, value| e.next_change_given(cx, value))
        }
    }
}

/// A time-independent side, as a number: a numeric literal is read once.
enum Operand {
    Const(f64),
    Eval(Expr),
}

impl Operand {
    fn new(e: &Expr) -> Self {
        match e {
            Expr::Lit(Lit::Num(k)) => Operand::Const(*k),
            e => Operand::Eval(e.clone()),
        }
    }

    #[inline]
    fn num(&self, cx: &Ctx<'_>) -> Option<f64> {
        match self {
            Operand::Const(k) => Some(*k),
            Operand::Eval(e) => num(e.eval(cx)),
        }
    }
}

/// [`cmp_next_change`] compiled: the shape is recognised here, once.
fn cmp_next_fn(op: CmpOp, a: &Expr, b: &Expr) -> NextFn {
    let (a, b) = (a.clone(), b.clone());
    if let Some((w, other)) = WindowCmp::of(op, &a, &b) {
        let (feature, feature_left) = (w.feature.clone(), w.feature_left);
        let other = Operand::new(other);
        return Box::new(move |cx, value| {
            let w = WindowCmp {
                op,
                feature: &feature,
                feature_left,
            };
            w.next(cx, other.num(cx), value)
                .unwrap_or_else(|| cmp_walk(op, &a, &b, cx, value))
        });
    }
    if let Some((s, arg, other)) = SinceCmp::of(op, &a, &b) {
        let other = Operand::new(other);
        let time = match arg {
            Expr::Feature(f) => f.time_field(),
            _ => None,
        };
        let arg = arg.clone();
        return Box::new(move |cx, value| {
            let x = match time {
                Some(get) => time_val(get(cx.state)),
                None => arg.eval(cx),
            };
            s.next(cx, x, other.num(cx), value)
                .unwrap_or_else(|| cmp_walk(op, &a, &b, cx, value))
        });
    }
    Box::new(move |cx, value| cmp_walk(op, &a, &b, cx, value))
}

/// `v op k` if `v_left`, else `k op v`.
fn holds_oriented(op: CmpOp, v_left: bool, v: f64, k: f64) -> bool {
    if v_left {
        op.holds(v, k)
    } else {
        op.holds(k, v)
    }
}

impl Expr {
    fn cmp_at(op: CmpOp, a: &Expr, b: &Expr, cx: &Ctx<'_>) -> bool {
        // Rebuilding the node would allocate; evaluate through a borrowed view instead.
        Expr::eval_cmp(op, a.eval(cx), b.eval(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::gen::{compiled, condition, config, customer, event, T0};
    use crate::symbols::Symbols;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// The compiled analysis answers as the tree's, told the condition's value or not,
        /// for conditions of every form on customers built from events (mistyped attribute
        /// values included), at instants before, during and after the events.
        #[test]
        fn the_compiled_analysis_agrees_with_the_tree(
            cond in condition(),
            events in prop::collection::vec(event(), 0..12),
            mistyped in proptest::option::of(0usize..7),
            at_day in -1i64..120,
            at_minute in 0i64..1440,
        ) {
            let cfg = config();
            let syms = Symbols::new();
            let (expr, _) = compiled(&cond, &cfg, &syms)?;
            let st = customer(&cfg, &syms, &events, mistyped);
            let marked = expr.mark_static();
            let timing = Timing::new(&marked);
            let cx = Ctx::new(&st, &cfg, &syms, T0 + at_day * DAY_MS + at_minute * 60_000);
            let value = marked.eval_bool(&cx);
            for given in [Some(value), None] {
                prop_assert_eq!(
                    timing.next_change_given(&cx, given),
                    marked.next_change_given(&cx, given),
                    "{} given {:?}", cond, given
                );
            }
        }
    }
}
