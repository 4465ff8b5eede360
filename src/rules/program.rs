//! A rule's condition compiled for evaluation: a tree of closures, each specialised at load
//! time for what its node reads and the types it compares.
//!
//! This module owns how the engine evaluates a condition. [`Expr`] stays the reference:
//! `explain` and the from-scratch evaluation walk it, and a [`Program`] gives
//! the same answer as [`Expr::eval_bool`] on every state (a property test holds them equal,
//! mistyped attribute values included). What a program saves is the tree walk's dispatch:
//! a comparison of a feature with a number (`purchases.count_30d >= 3`) is one call that reads
//! the feature and compares, with no [`Val`] built and no match on the node's kind or the
//! value's type. Nodes it has no special form for evaluate through the tree.

use crate::rules::compile::{num, ArithOp, Ctx, Expr, Feature, Func, Lit, StrLit};
use crate::rules::compile::{CmpOp, Shown, Val};
use crate::state::{AttrType, AttrVal, CustomerState, NO_TIME};
use crate::symbols::Sym;
use crate::time::{DAY_MS, HOUR_MS};

type BoolFn = Box<dyn Fn(&Ctx<'_>) -> bool + Send + Sync>;
type NumFn = Box<dyn Fn(&Ctx<'_>) -> Option<f64> + Send + Sync>;
type TimeFn = Box<dyn Fn(&Ctx<'_>) -> Option<i64> + Send + Sync>;

/// A compiled condition (see the module docs).
pub struct Program(BoolFn);

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Program")
    }
}

impl Program {
    /// Compiles a boolean expression.
    pub fn new(e: &Expr) -> Self {
        Program(bool_fn(e))
    }

    /// Whether the condition holds: [`Expr::eval_bool`] of the expression compiled.
    #[inline]
    pub fn holds(&self, cx: &Ctx<'_>) -> bool {
        (self.0)(cx)
    }
}

/// An atom's value for `because` ([`Shown::of`] the expression's value), compiled: a number
/// or an instant is read and shown without a [`Val`]; anything else goes through the tree.
pub struct ShownProgram(Box<dyn Fn(&Ctx<'_>) -> Shown + Send + Sync>);

impl std::fmt::Debug for ShownProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShownProgram")
    }
}

impl ShownProgram {
    pub fn new(e: &Expr) -> Self {
        if let Some(t) = time_fn(e) {
            return ShownProgram(Box::new(move |cx| t(cx).map_or(Shown::Null, Shown::Time)));
        }
        if let Some((x, Kind::Num)) = num_fn(e) {
            return ShownProgram(Box::new(move |cx| x(cx).map_or(Shown::Null, Shown::num)));
        }
        let e = e.clone();
        ShownProgram(Box::new(move |cx| Shown::of(e.eval(cx), cx.syms)))
    }

    /// The value shown.
    #[inline]
    pub fn shown(&self, cx: &Ctx<'_>) -> Shown {
        (self.0)(cx)
    }
}

/// What a numeric closure's values are, in the tree's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `Val::Num` or `Val::Missing` (the closure's `None`).
    Num,
    /// `Val::Time` or `Val::Missing`, as milliseconds.
    Time,
    /// A number attribute: `Val::Num` or `Val::Missing`, or, for a value stored under another
    /// type (restored under changed rules), a string or a bool, which the closure reads as
    /// `None`. Where the tree treats such a value unlike a missing one (`==` and `!=`, see
    /// `cmp_fn`; `coalesce`), the node is left to the tree.
    AttrNum,
}

/// The tree's evaluation of `e`, as a closure.
fn by_tree(e: &Expr) -> BoolFn {
    let e = e.clone();
    Box::new(move |cx| e.eval_bool(cx))
}

fn bool_fn(e: &Expr) -> BoolFn {
    match e {
        Expr::And(a, b) => {
            let (a, b) = (bool_fn(a), bool_fn(b));
            Box::new(move |cx| a(cx) && b(cx))
        }
        Expr::Or(a, b) => {
            let (a, b) = (bool_fn(a), bool_fn(b));
            Box::new(move |cx| a(cx) || b(cx))
        }
        Expr::Not(a) => {
            let a = bool_fn(a);
            Box::new(move |cx| !a(cx))
        }
        Expr::Static(a) => bool_fn(a),
        Expr::Cmp(op, a, b) => cmp_fn(*op, a, b).unwrap_or_else(|| by_tree(e)),
        _ => by_tree(e),
    }
}

/// `a op b` for two numeric sides, or a string feature against a string literal.
///
/// A number attribute can hold a value of another type (restored under changed rules): a
/// closure reads it as missing, which decides every comparison as the tree does, except `!=`
/// (the tree compares such a value with a number as unequal) and `==` of two such values (as
/// strings or bools). Those are left to the tree.
fn cmp_fn(op: CmpOp, a: &Expr, b: &Expr) -> Option<BoolFn> {
    let loose = |k: Kind| k == Kind::AttrNum;
    match (strip(a), strip(b)) {
        (Expr::Feature(f), Expr::Lit(Lit::Str(l))) => return str_cmp_fn(op, f, l),
        (Expr::Feature(Feature::ActionCountW(s, w)), Expr::Lit(Lit::Num(k))) => {
            if let Some(x) = action_count_cmp_fn(op, *s, *w, *k) {
                return Some(x);
            }
        }
        (Expr::Feature(f), Expr::Lit(Lit::Num(k))) => {
            if let Some((x, kx)) = feature_with(f, CmpConst(op, *k)) {
                return (op != CmpOp::Ne || !loose(kx)).then_some(x);
            }
        }
        _ => {}
    }
    let (x, kx) = num_fn(a)?;
    if let Expr::Lit(Lit::Num(k)) = strip(b) {
        return (op != CmpOp::Ne || !loose(kx)).then(|| cmp_const(x, op, *k));
    }
    let (y, ky) = num_fn(b)?;
    if matches!(op, CmpOp::Eq | CmpOp::Ne) && (loose(kx) || loose(ky)) {
        return None;
    }
    Some(Box::new(move |cx| match (x(cx), y(cx)) {
        (Some(p), Some(q)) => op.holds(p, q),
        _ => false,
    }))
}

/// `action_count(a, w) op k` for an inequality: the count is a whole number, so each is
/// "at least `n`" or its negation, which a scan back from the newest entry answers once it has
/// found `n` ([`Ctx::engagements_at_least`]), where the count itself reads every entry of the
/// window.
fn action_count_cmp_fn(op: CmpOp, s: Sym, w: u32, k: f64) -> Option<BoolFn> {
    // The least count that satisfies `>= k` (`> k`), as a threshold: None when no count does.
    let least = |t: f64| -> Option<u32> {
        if t <= 0.0 {
            Some(0)
        } else if t <= u32::MAX as f64 {
            Some(t as u32)
        } else {
            None
        }
    };
    let (n, negated) = match op {
        CmpOp::Ge => (least(k.ceil()), false),
        CmpOp::Gt => (least(k.floor() + 1.0), false),
        CmpOp::Lt => (least(k.ceil()), true),
        CmpOp::Le => (least(k.floor() + 1.0), true),
        CmpOp::Eq | CmpOp::Ne => return None,
    };
    Some(match n {
        Some(n) => Box::new(move |cx| cx.engagements_at_least(w, s, n) != negated),
        None => Box::new(move |_| negated),
    })
}

/// `e` without its [`Expr::Static`] marks (they only guide the timer analysis).
fn strip(mut e: &Expr) -> &Expr {
    while let Expr::Static(inner) = e {
        e = inner;
    }
    e
}

/// A string feature `==` or `!=` a literal. Interned values compare by id; an attribute's
/// string by its bytes; anything else (a missing value, a mistyped attribute) as the tree.
fn str_cmp_fn(op: CmpOp, f: &Feature, l: &StrLit) -> Option<BoolFn> {
    let eq = match op {
        CmpOp::Eq => true,
        CmpOp::Ne => false,
        _ => return None,
    };
    let sym = l.sym;
    let sym_cmp = move |s: Option<Sym>| s.is_some_and(|s| (s == sym) == eq);
    Some(match f {
        Feature::Plan => Box::new(move |cx| sym_cmp(cx.state.plan)),
        Feature::TopCategory => {
            Box::new(move |cx| sym_cmp(CustomerState::top(cx.state.categories())))
        }
        Feature::TopChannel => Box::new(move |cx| sym_cmp(CustomerState::top(cx.state.channels()))),
        Feature::Attr(i, AttrType::String) => {
            let (i, f, l) = (*i, f.clone(), l.clone());
            Box::new(move |cx| match cx.state.attrs().get(i) {
                Some(AttrVal::Str(s)) => (s == l.sym) == eq,
                _ => Expr::eval_cmp(op, f.read(cx), Val::Lit(&l)),
            })
        }
        _ => return None,
    })
}

/// A numeric expression's closure and its [`Kind`], if it has a special form.
fn num_fn(e: &Expr) -> Option<(NumFn, Kind)> {
    Some(match e {
        Expr::Lit(Lit::Num(k)) => {
            let k = *k;
            (Box::new(move |_| Some(k)), Kind::Num)
        }
        Expr::Static(a) => return num_fn(a),
        Expr::Feature(f) => feature_with(f, Boxed)?,
        Expr::Neg(a) => {
            let (a, k) = num_fn(a)?;
            if k == Kind::Time {
                return None;
            }
            (Box::new(move |cx| a(cx).map(|v| -v)), Kind::Num)
        }
        Expr::Arith(op, a, b) => {
            let ((x, _), (y, _)) = (num_fn(a)?, num_fn(b)?);
            let f: NumFn = match op {
                ArithOp::Add => Box::new(move |cx| Some(x(cx)? + y(cx)?)),
                ArithOp::Sub => Box::new(move |cx| Some(x(cx)? - y(cx)?)),
                ArithOp::Mul => Box::new(move |cx| Some(x(cx)? * y(cx)?)),
                ArithOp::Div => Box::new(move |cx| {
                    let (p, q) = (x(cx)?, y(cx)?);
                    (q != 0.0).then(|| p / q)
                }),
            };
            (f, Kind::Num)
        }
        Expr::Call(func @ (Func::DaysSince | Func::HoursSince), args) => {
            let t = time_fn(args.first()?)?;
            let unit = if *func == Func::DaysSince {
                DAY_MS
            } else {
                HOUR_MS
            } as f64;
            (
                Box::new(move |cx| t(cx).map(|t| (cx.now - t) as f64 / unit)),
                Kind::Num,
            )
        }
        Expr::Call(Func::Abs, args) => {
            let (a, k) = num_fn(args.first()?)?;
            if k == Kind::Time {
                return None;
            }
            (Box::new(move |cx| a(cx).map(f64::abs)), Kind::Num)
        }
        Expr::Call(func @ (Func::Min | Func::Max), args) => {
            let ((x, _), (y, _)) = (num_fn(args.first()?)?, num_fn(args.get(1)?)?);
            let f: NumFn = if *func == Func::Min {
                Box::new(move |cx| Some(x(cx)?.min(y(cx)?)))
            } else {
                Box::new(move |cx| Some(x(cx)?.max(y(cx)?)))
            };
            (f, Kind::Num)
        }
        Expr::Call(Func::Coalesce, args) => {
            let ((x, kx), (y, ky)) = (num_fn(args.first()?)?, num_fn(args.get(1)?)?);
            // A mistyped first value is not missing to the tree: it returns it, where this
            // would read the second. Sides of two kinds would make the result's kind depend
            // on the state.
            if kx == Kind::AttrNum || kx != ky {
                return None;
            }
            (Box::new(move |cx| x(cx).or_else(|| y(cx))), kx)
        }
        _ => return None,
    })
}

/// A time-valued expression (`days_since`'s argument): a time feature.
fn time_fn(e: &Expr) -> Option<TimeFn> {
    let Expr::Feature(f) = strip(e) else {
        return None;
    };
    let get = f.time_field()?;
    Some(Box::new(move |cx| {
        let t = get(cx.state);
        (t != NO_TIME).then_some(t)
    }))
}

/// What to make of a feature's reader: [`feature_with`] passes each feature's own closure
/// type, so that what is built around it (a comparison with a number, say) is compiled
/// together with the read, one call in all.
trait Build {
    type Out;
    fn build<R>(self, read: R, kind: Kind) -> Self::Out
    where
        R: Fn(&Ctx<'_>) -> Option<f64> + Send + Sync + 'static;
}

/// The reader itself, boxed.
struct Boxed;

impl Build for Boxed {
    type Out = (NumFn, Kind);
    fn build<R>(self, read: R, kind: Kind) -> Self::Out
    where
        R: Fn(&Ctx<'_>) -> Option<f64> + Send + Sync + 'static,
    {
        (Box::new(read), kind)
    }
}

/// The reader compared with a number.
struct CmpConst(CmpOp, f64);

impl Build for CmpConst {
    type Out = (BoolFn, Kind);
    fn build<R>(self, x: R, kind: Kind) -> Self::Out
    where
        R: Fn(&Ctx<'_>) -> Option<f64> + Send + Sync + 'static,
    {
        (cmp_const(x, self.0, self.1), kind)
    }
}

/// `x op k`: false when `x` reads `None`.
fn cmp_const<R>(x: R, op: CmpOp, k: f64) -> BoolFn
where
    R: Fn(&Ctx<'_>) -> Option<f64> + Send + Sync + 'static,
{
    match op {
        CmpOp::Eq => Box::new(move |cx| x(cx).is_some_and(|v| v == k)),
        CmpOp::Ne => Box::new(move |cx| x(cx).is_some_and(|v| v != k)),
        CmpOp::Lt => Box::new(move |cx| x(cx).is_some_and(|v| v < k)),
        CmpOp::Le => Box::new(move |cx| x(cx).is_some_and(|v| v <= k)),
        CmpOp::Gt => Box::new(move |cx| x(cx).is_some_and(|v| v > k)),
        CmpOp::Ge => Box::new(move |cx| x(cx).is_some_and(|v| v >= k)),
    }
}

/// A numeric or time feature's reader, handed to `b` (`None`: a feature of another type).
fn feature_with<B: Build>(f: &Feature, b: B) -> Option<B::Out> {
    use Feature::*;
    Some(match *f {
        PurchaseCount => b.build(|cx| Some(cx.state.purchase_count as f64), Kind::Num),
        PurchaseSpend => b.build(|cx| Some(cx.state.spend), Kind::Num),
        PurchaseAvg => b.build(
            |cx| {
                let st = cx.state;
                (st.purchase_count != 0).then(|| st.spend / st.purchase_count as f64)
            },
            Kind::Num,
        ),
        PurchaseQuantity => b.build(|cx| Some(cx.state.quantity), Kind::Num),
        PurchaseCountW(w) => b.build(move |cx| Some(cx.purchases_in(w).0 as f64), Kind::Num),
        PurchaseSpendW(w) => b.build(move |cx| Some(cx.purchases_in(w).1), Kind::Num),
        EngagementCount => b.build(|cx| Some(cx.state.engagement_count as f64), Kind::Num),
        EngagementCountW(w) => {
            b.build(move |cx| Some(cx.engagements_in(w, None) as f64), Kind::Num)
        }
        ActionCountW(s, w) => b.build(
            move |cx| Some(cx.engagements_in(w, Some(s)) as f64),
            Kind::Num,
        ),
        CategoryCount(_) | ChannelCount(_) | ChannelShare(_) | ActionCount(_) => {
            let f = f.clone();
            b.build(move |cx| num(f.read(cx)), Kind::Num)
        }
        PurchaseFirst | PurchaseLast | EngagementLast | LastSeen | FirstSeen => {
            let get = f.time_field()?;
            b.build(
                move |cx| {
                    let t = get(cx.state);
                    (t != NO_TIME).then_some(t as f64)
                },
                Kind::Time,
            )
        }
        Attr(i, AttrType::Number) => b.build(
            move |cx| match cx.state.attrs().get(i) {
                Some(AttrVal::Num(v)) => Some(v),
                _ => None,
            },
            Kind::AttrNum,
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::gen::{compiled, condition, config, customer, event, Ev, T0};
    use crate::symbols::Symbols;
    use proptest::prelude::*;

    /// `action_count(a, w) op k` against the tree for every inequality, counts from 0 to 4
    /// (opens among clicks, some outside the window) and thresholds between, at and beyond
    /// whole numbers and past the largest count: where the scan back to `n` and its threshold
    /// could be off by one.
    #[test]
    fn an_action_count_inequality_agrees_with_the_tree_at_every_threshold() {
        let (cfg, syms) = (config(), Symbols::new());
        let ks = [
            "-1",
            "0",
            "0.5",
            "1",
            "2",
            "2.5",
            "3",
            "4",
            "4.5",
            "10000000000",
        ];
        for opens in 0..=4 {
            let mut events = vec![Ev::Engagement {
                day: 1,
                action: "open",
            }];
            events.extend((0..opens).map(|_| Ev::Engagement {
                day: 40,
                action: "open",
            }));
            events.push(Ev::Engagement {
                day: 41,
                action: "click",
            });
            let st = customer(&cfg, &syms, &events, None);
            for op in ["<", "<=", ">", ">="] {
                for k in ks {
                    let cond = format!(r#"action_count("open", "30d") {op} {k}"#);
                    let (expr, _) = compiled(&cond, &cfg, &syms).expect("compiles");
                    let at = T0 + 42 * DAY_MS;
                    let got = Program::new(&expr).holds(&Ctx::new(&st, &cfg, &syms, at));
                    let want = expr.eval_bool(&Ctx::new(&st, &cfg, &syms, at));
                    assert_eq!(got, want, "{cond} with {opens} opens");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// A program holds exactly when the tree's evaluation does, for conditions of every
        /// form, on customers built from events, with attribute values of the wrong type (a
        /// restore under changed rules), at instants before, during and after the events; and
        /// the condition's atoms show the tree's values.
        #[test]
        fn a_program_and_its_atoms_agree_with_the_tree(
            cond in condition(),
            events in prop::collection::vec(event(), 0..12),
            mistyped in proptest::option::of(0usize..7),
            at_day in -1i64..120,
        ) {
            let cfg = config();
            let syms = Symbols::new();
            let (expr, atoms) = compiled(&cond, &cfg, &syms)?;
            let st = customer(&cfg, &syms, &events, mistyped);
            let program = Program::new(&expr);
            let marked = expr.mark_static();
            let at = T0 + at_day * DAY_MS + 30 * 60_000;
            // Each in a context of its own: a context remembers the windows it has read, and
            // a program reads some differently when they are not remembered yet.
            let got = program.holds(&Ctx::new(&st, &cfg, &syms, at));
            let cx = Ctx::new(&st, &cfg, &syms, at);
            let want = marked.eval_bool(&cx);
            prop_assert_eq!(got, want, "{}", cond);
            // Also after the tree has read the windows.
            prop_assert_eq!(program.holds(&cx), want, "{} (remembered)", cond);
            prop_assert_eq!(Program::new(&marked).holds(&cx), want, "{} (marked)", cond);
            // And every value it shows in `because`.
            for a in &atoms {
                prop_assert_eq!(a.shown(&cx), Shown::of(a.expr.eval(&cx), &syms), "{}", a.text);
            }
        }
    }
}
