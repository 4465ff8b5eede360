//! Type checking and compilation of one expression: syntax tree → [`Expr`], a typed tree that
//! evaluates without any name lookup, plus the set of inputs it depends on (for incremental
//! evaluation) and its *atoms* (the feature values shown in `because` and `explain`).
//!
//! Also owns the feature catalog: every name a rule may read, its type and what changes it.
//! The README's "Rule language" section documents the same catalog for users.

use std::cell::Cell;
use std::sync::Arc;

use crate::rules::parse::{Ast, BinOp, Node, Span, UnOp};
use crate::rules::program::ShownProgram;
use crate::state::{AttrType, AttrVal, CustomerState, StateConfig, NO_TIME};
use crate::symbols::{Sym, Symbols};
use crate::time::{DAY_MS, HOUR_MS};

/// Dependency bits: what can change a value.
pub mod deps {
    pub const PURCHASE: u8 = 1;
    pub const ENGAGEMENT: u8 = 2;
    pub const PROFILE: u8 = 4;
    /// The value changes as time passes, with no event (windows, `days_since`).
    pub const TIME: u8 = 8;
    pub const ANY_EVENT: u8 = PURCHASE | ENGAGEMENT | PROFILE;
}

/// The static type of an expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Num,
    Bool,
    Str,
    Time,
    /// A set of strings (only as the right side of `in`).
    StrSet,
    NumList,
    StrList,
    /// The type of an expression that already has an error (suppresses follow-on errors).
    Err,
}

impl Ty {
    pub fn name(self) -> &'static str {
        match self {
            Ty::Num => "number",
            Ty::Bool => "bool",
            Ty::Str => "string",
            Ty::Time => "time",
            Ty::StrSet => "set of strings",
            Ty::NumList => "list of numbers",
            Ty::StrList => "list of strings",
            Ty::Err => "erroneous value",
        }
    }
}

/// A value a rule reads from the customer's state.
#[derive(Debug, Clone, PartialEq)]
pub enum Feature {
    PurchaseCount,
    PurchaseSpend,
    PurchaseAvg,
    PurchaseQuantity,
    PurchaseFirst,
    PurchaseLast,
    PurchaseCountW(u32),
    PurchaseSpendW(u32),
    Categories,
    Channels,
    TopCategory,
    TopChannel,
    Plan,
    EngagementCount,
    EngagementCountW(u32),
    EngagementLast,
    Actions,
    LastSeen,
    FirstSeen,
    Attr(usize, AttrType),
    CategoryCount(Sym),
    ChannelCount(Sym),
    ChannelShare(Sym),
    ActionCount(Sym),
    ActionCountW(Sym, u32),
}

impl Feature {
    pub fn ty(&self) -> Ty {
        use Feature::*;
        match self {
            PurchaseFirst | PurchaseLast | EngagementLast | LastSeen | FirstSeen => Ty::Time,
            Categories | Channels | Actions => Ty::StrSet,
            TopCategory | TopChannel | Plan => Ty::Str,
            Attr(_, AttrType::Number) => Ty::Num,
            Attr(_, AttrType::String) => Ty::Str,
            Attr(_, AttrType::Bool) => Ty::Bool,
            _ => Ty::Num,
        }
    }

    pub fn deps(&self) -> u8 {
        use deps::*;
        use Feature::*;
        match self {
            PurchaseCountW(_) | PurchaseSpendW(_) => PURCHASE | TIME,
            EngagementCountW(_) | ActionCountW(..) => ENGAGEMENT | TIME,
            EngagementCount | EngagementLast | Actions | ActionCount(_) => ENGAGEMENT,
            LastSeen | FirstSeen => ANY_EVENT,
            Attr(..) => PROFILE,
            _ => PURCHASE,
        }
    }
}

/// Static list of the plain (non-window, non-attribute) feature paths, for docs and errors.
pub const PLAIN_FEATURES: &[(&str, &str)] = &[
    ("purchases.count", "number of purchases, lifetime"),
    ("purchases.spend", "sum of purchase amounts, lifetime"),
    (
        "purchases.avg_order",
        "purchases.spend / purchases.count (missing before the first purchase)",
    ),
    (
        "purchases.quantity",
        "sum of purchase quantities (1 when an event has none), lifetime",
    ),
    ("purchases.first", "time of the first purchase"),
    ("purchases.last", "time of the latest purchase"),
    (
        "purchases.categories",
        "set of categories ever bought (use with `in`)",
    ),
    (
        "purchases.channels",
        "set of channels ever used (use with `in`)",
    ),
    (
        "purchases.top_category",
        "category with the most purchases (ties: first seen)",
    ),
    (
        "purchases.top_channel",
        "channel with the most purchases (ties: first seen)",
    ),
    (
        "purchases.plan",
        "plan of the latest purchase that named one",
    ),
    ("engagement.count", "number of engagement events, lifetime"),
    ("engagement.last", "time of the latest engagement"),
    (
        "engagement.actions",
        "set of engagement actions ever seen (use with `in`)",
    ),
    ("last_seen", "time of the latest event of any type"),
    ("first_seen", "time of the earliest event of any type"),
];

fn plain_feature(path: &str) -> Option<Feature> {
    use Feature::*;
    Some(match path {
        "purchases.count" => PurchaseCount,
        "purchases.spend" => PurchaseSpend,
        "purchases.avg_order" => PurchaseAvg,
        "purchases.quantity" => PurchaseQuantity,
        "purchases.first" => PurchaseFirst,
        "purchases.last" => PurchaseLast,
        "purchases.categories" => Categories,
        "purchases.channels" => Channels,
        "purchases.top_category" => TopCategory,
        "purchases.top_channel" => TopChannel,
        "purchases.plan" => Plan,
        "engagement.count" => EngagementCount,
        "engagement.last" => EngagementLast,
        "engagement.actions" => Actions,
        "last_seen" => LastSeen,
        "first_seen" => FirstSeen,
        _ => return None,
    })
}

/// Built-in functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    DaysSince,
    HoursSince,
    Has,
    Abs,
    Min,
    Max,
    Coalesce,
}

/// A string literal, with its interned id for fast comparison against interned state values.
#[derive(Debug, Clone, PartialEq)]
pub struct StrLit {
    pub text: String,
    pub sym: Sym,
}

/// `repr(u8)` as [`Expr`]: a plain tag byte rather than a niche in the string's capacity.
#[derive(Debug, Clone, PartialEq)]
#[repr(u8)]
pub enum Lit {
    Num(f64),
    Bool(bool),
    Str(StrLit),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    /// `p op q` on numbers.
    pub fn holds(self, p: f64, q: f64) -> bool {
        match self {
            CmpOp::Eq => p == q,
            CmpOp::Ne => p != q,
            CmpOp::Lt => p < q,
            CmpOp::Le => p <= q,
            CmpOp::Gt => p > q,
            CmpOp::Ge => p >= q,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// A compiled, typed expression. `repr(u8)`: a plain tag byte, so that evaluation reads the
/// node's kind in one load instead of decoding it from a niche in a vector's capacity (fewer
/// instructions per node; BENCHMARKS.md, twelfth session).
#[derive(Debug, Clone, PartialEq)]
#[repr(u8)]
pub enum Expr {
    Lit(Lit),
    Feature(Feature),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    InList {
        item: Box<Expr>,
        list: Vec<Lit>,
        negated: bool,
    },
    InSet {
        item: Box<Expr>,
        set: Feature,
        negated: bool,
    },
    Call(Func, Vec<Expr>),
    /// A compound sub-expression that time alone cannot change, marked once when the rule is
    /// loaded ([`Expr::mark_static`]): the timer analysis, which asks at every node, stops
    /// here without walking it.
    Static(Box<Expr>),
}

/// A runtime value. Strings borrow from the state or the rule, or are interned ids.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Val<'a> {
    Missing,
    Num(f64),
    Bool(bool),
    Time(i64),
    Sym(Sym),
    Lit(&'a StrLit),
}

/// What an evaluation reads: one customer's state at one instant.
pub struct Ctx<'a> {
    pub state: &'a CustomerState,
    pub cfg: &'a StateConfig,
    pub syms: &'a Symbols,
    /// Evaluation time, epoch ms.
    pub now: i64,
    /// Purchase window sums already read in this context, by window length in buckets:
    /// rules read the same window several times (`purchases.count_30d` in four default
    /// rules, `count_90d` beside `spend_90d`), and each read searches the buckets. The timer
    /// analysis that follows an evaluation reads them again.
    windows: Memo<u32, (u32, f64)>,
    /// Engagement window counts already read, by (buckets, action): the same for
    /// `engagement.count_<w>` and `action_count(a, w)`.
    engagements: Memo<(u32, Option<Sym>), u32>,
}

/// Values a [`Ctx`] remembers, by key, in the order first read; once full, further keys are
/// computed at every read. A handful of keys, searched in line.
type Memo<K, V> = [Cell<Option<(K, V)>>; MEMO_LEN];

/// Windows of each kind a [`Ctx`] remembers (the default configuration declares three).
const MEMO_LEN: usize = 3;

/// The value remembered under `key`, if any (slots fill in order, so an empty one ends the
/// search).
fn recalled<K: Copy + Eq, V: Copy>(memo: &Memo<K, V>, key: K) -> Option<V> {
    memo.iter()
        .map_while(|slot| slot.get())
        .find_map(|(k, v)| (k == key).then_some(v))
}

/// `key`'s value from `memo`, computed by `compute` and remembered if not there yet.
fn remembered<K: Copy + Eq, V: Copy>(memo: &Memo<K, V>, key: K, compute: impl FnOnce() -> V) -> V {
    for slot in memo {
        match slot.get() {
            Some((k, v)) if k == key => return v,
            Some(_) => {}
            None => {
                let v = compute();
                slot.set(Some((key, v)));
                return v;
            }
        }
    }
    compute()
}

impl<'a> Ctx<'a> {
    pub fn new(
        state: &'a CustomerState,
        cfg: &'a StateConfig,
        syms: &'a Symbols,
        now: i64,
    ) -> Self {
        Ctx {
            state,
            cfg,
            syms,
            now,
            windows: Default::default(),
            engagements: Default::default(),
        }
    }

    /// The same customer at another instant (nothing remembered).
    pub fn at(&self, now: i64) -> Self {
        Ctx::new(self.state, self.cfg, self.syms, now)
    }

    /// Purchases (count, spend) in the window of `buckets` buckets at `now`.
    pub(crate) fn purchases_in(&self, buckets: u32) -> (u32, f64) {
        remembered(&self.windows, buckets, || {
            self.state.purchases_in(self.cfg, self.now, buckets)
        })
    }

    /// Engagements (of `action`, or all) in the window of `buckets` buckets at `now`.
    pub(crate) fn engagements_in(&self, buckets: u32, action: Option<Sym>) -> u32 {
        remembered(&self.engagements, (buckets, action), || {
            self.state
                .engagements_in(self.cfg, self.now, buckets, action)
        })
    }

    /// Whether the window holds at least `k` engagements of `action`: from the count if
    /// this context has read it, else counted back from the newest entry up to `k` only.
    pub(crate) fn engagements_at_least(&self, buckets: u32, action: Sym, k: u32) -> bool {
        match recalled(&self.engagements, (buckets, Some(action))) {
            Some(n) => n >= k,
            None => self
                .state
                .engagements_at_least(self.cfg, self.now, buckets, action, k),
        }
    }
}

pub(crate) fn time_val(t: i64) -> Val<'static> {
    if t == NO_TIME {
        Val::Missing
    } else {
        Val::Time(t)
    }
}

fn sym_val(s: Option<Sym>) -> Val<'static> {
    s.map_or(Val::Missing, Val::Sym)
}

impl Feature {
    pub fn read<'a>(&self, cx: &Ctx<'a>) -> Val<'a> {
        use Feature::*;
        let st = cx.state;
        match *self {
            PurchaseCount => Val::Num(st.purchase_count as f64),
            PurchaseSpend => Val::Num(st.spend),
            PurchaseAvg if st.purchase_count == 0 => Val::Missing,
            PurchaseAvg => Val::Num(st.spend / st.purchase_count as f64),
            PurchaseQuantity => Val::Num(st.quantity),
            PurchaseFirst | PurchaseLast | EngagementLast | LastSeen | FirstSeen => self
                .time_field()
                .map_or(Val::Missing, |get| time_val(get(st))),
            PurchaseCountW(b) => Val::Num(cx.purchases_in(b).0 as f64),
            PurchaseSpendW(b) => Val::Num(cx.purchases_in(b).1),
            TopCategory => sym_val(CustomerState::top(st.categories())),
            TopChannel => sym_val(CustomerState::top(st.channels())),
            Plan => sym_val(st.plan),
            EngagementCount => Val::Num(st.engagement_count as f64),
            EngagementCountW(b) => Val::Num(cx.engagements_in(b, None) as f64),
            Attr(i, _) => match st.attrs().get(i) {
                Some(AttrVal::Num(n)) => Val::Num(n),
                Some(AttrVal::Str(s)) => Val::Sym(s),
                Some(AttrVal::Bool(b)) => Val::Bool(b),
                None => Val::Missing,
            },
            CategoryCount(s) => Val::Num(CustomerState::count_of(st.categories(), Some(s)) as f64),
            ChannelCount(s) => Val::Num(CustomerState::count_of(st.channels(), Some(s)) as f64),
            ChannelShare(_) if st.purchase_count == 0 => Val::Missing,
            ChannelShare(s) => Val::Num(
                CustomerState::count_of(st.channels(), Some(s)) as f64 / st.purchase_count as f64,
            ),
            ActionCount(s) => Val::Num(CustomerState::count_of(st.actions(), Some(s)) as f64),
            ActionCountW(s, b) => Val::Num(cx.engagements_in(b, Some(s)) as f64),
            // Sets are only read through `in`.
            Categories | Channels | Actions => Val::Missing,
        }
    }

    /// A time feature's field in the state (`NO_TIME` before any), None for other features.
    pub fn time_field(&self) -> Option<fn(&CustomerState) -> i64> {
        use Feature::*;
        Some(match self {
            PurchaseFirst => |st| st.first_purchase,
            PurchaseLast => |st| st.last_purchase,
            EngagementLast => |st| st.last_engagement,
            LastSeen => |st| st.last_seen,
            FirstSeen => |st| st.first_seen,
            _ => return None,
        })
    }

    fn set_contains(&self, st: &CustomerState, sym: Sym) -> bool {
        let list = match self {
            Feature::Categories => st.categories(),
            Feature::Channels => st.channels(),
            Feature::Actions => st.actions(),
            _ => return false,
        };
        list.iter().any(|[s, _]| *s == sym)
    }

    /// The set's members, for display.
    pub fn set_members(&self, st: &CustomerState) -> Vec<Sym> {
        let list = match self {
            Feature::Categories => st.categories(),
            Feature::Channels => st.channels(),
            Feature::Actions => st.actions(),
            _ => return Vec::new(),
        };
        list.iter().map(|[s, _]| *s).collect()
    }
}

/// A string value's interned id (None: not a string). Every string value has one: attributes'
/// strings and literals are interned too.
fn as_sym(v: &Val<'_>) -> Option<Sym> {
    match v {
        Val::Sym(s) => Some(*s),
        Val::Lit(l) => Some(l.sym),
        _ => None,
    }
}

fn str_eq(a: &Val<'_>, b: &Val<'_>) -> bool {
    as_sym(a).is_some() && as_sym(a) == as_sym(b)
}

fn lit_val(l: &Lit) -> Val<'_> {
    match l {
        Lit::Num(n) => Val::Num(*n),
        Lit::Bool(b) => Val::Bool(*b),
        Lit::Str(s) => Val::Lit(s),
    }
}

pub(crate) fn num(v: Val<'_>) -> Option<f64> {
    match v {
        Val::Num(n) => Some(n),
        Val::Time(t) => Some(t as f64),
        _ => None,
    }
}

impl Expr {
    /// Evaluates a boolean expression. Missing values make comparisons false. A boolean node
    /// is evaluated here, returning in a register; any other goes through [`Expr::eval`].
    pub fn eval_bool(&self, cx: &Ctx<'_>) -> bool {
        match self {
            Expr::And(a, b) => a.eval_bool(cx) && b.eval_bool(cx),
            Expr::Or(a, b) => a.eval_bool(cx) || b.eval_bool(cx),
            Expr::Not(e) => !e.eval_bool(cx),
            Expr::Static(e) => e.eval_bool(cx),
            Expr::Cmp(op, a, b) => Expr::cmp_bool(*op, a, b, cx),
            _ => matches!(self.eval(cx), Val::Bool(true)),
        }
    }

    /// `a op b`.
    fn cmp_bool(op: CmpOp, a: &Expr, b: &Expr, cx: &Ctx<'_>) -> bool {
        // The common shape, a feature against a number (`purchases.count_30d >= 3`), without
        // a call per leaf: the same result as `eval_cmp` for a number or a time on the left,
        // and anything else goes through it.
        let x = match a {
            Expr::Feature(f) => f.read(cx),
            a => a.eval(cx),
        };
        if let (Expr::Lit(Lit::Num(y)), Some(x)) = (b, num(x)) {
            return op.holds(x, *y);
        }
        Expr::eval_cmp(op, x, b.eval(cx))
    }

    pub fn eval<'a>(&'a self, cx: &Ctx<'a>) -> Val<'a> {
        match self {
            Expr::Lit(l) => lit_val(l),
            Expr::Feature(f) => f.read(cx),
            Expr::Static(e) => e.eval(cx),
            Expr::Not(_) | Expr::And(..) | Expr::Or(..) | Expr::Cmp(..) => {
                Val::Bool(self.eval_bool(cx))
            }
            Expr::Neg(e) => match e.eval(cx) {
                Val::Num(n) => Val::Num(-n),
                _ => Val::Missing,
            },
            Expr::Arith(op, a, b) => match (num(a.eval(cx)), num(b.eval(cx))) {
                (Some(x), Some(y)) => {
                    let r = match op {
                        ArithOp::Add => x + y,
                        ArithOp::Sub => x - y,
                        ArithOp::Mul => x * y,
                        ArithOp::Div if y == 0.0 => return Val::Missing,
                        ArithOp::Div => x / y,
                    };
                    Val::Num(r)
                }
                _ => Val::Missing,
            },
            Expr::InList {
                item,
                list,
                negated,
            } => {
                let v = item.eval(cx);
                if matches!(v, Val::Missing) {
                    return Val::Bool(false);
                }
                let found = list.iter().any(|l| match (&v, l) {
                    (Val::Num(n), Lit::Num(m)) => n == m,
                    (_, Lit::Str(s)) => str_eq(&v, &Val::Lit(s)),
                    _ => false,
                });
                Val::Bool(found != *negated)
            }
            Expr::InSet { item, set, negated } => {
                let v = item.eval(cx);
                let Some(sym) = as_sym(&v) else {
                    return Val::Bool(*negated && !matches!(v, Val::Missing));
                };
                Val::Bool(set.set_contains(cx.state, sym) != *negated)
            }
            Expr::Call(f, args) => match f {
                Func::DaysSince | Func::HoursSince => match args[0].eval(cx) {
                    Val::Time(t) => {
                        let unit = if *f == Func::DaysSince {
                            DAY_MS
                        } else {
                            HOUR_MS
                        };
                        Val::Num((cx.now - t) as f64 / unit as f64)
                    }
                    _ => Val::Missing,
                },
                Func::Has => Val::Bool(!matches!(args[0].eval(cx), Val::Missing)),
                Func::Abs => match args[0].eval(cx) {
                    Val::Num(n) => Val::Num(n.abs()),
                    _ => Val::Missing,
                },
                Func::Min | Func::Max => match (num(args[0].eval(cx)), num(args[1].eval(cx))) {
                    (Some(a), Some(b)) => {
                        Val::Num(if *f == Func::Min { a.min(b) } else { a.max(b) })
                    }
                    _ => Val::Missing,
                },
                Func::Coalesce => match args[0].eval(cx) {
                    Val::Missing => args[1].eval(cx),
                    v => v,
                },
            },
        }
    }

    /// `x op y` with the language's rules: a missing side makes any comparison false.
    pub(crate) fn eval_cmp(op: CmpOp, x: Val<'_>, y: Val<'_>) -> bool {
        if matches!(x, Val::Missing) || matches!(y, Val::Missing) {
            return false;
        }
        match (x, y) {
            (Val::Bool(p), Val::Bool(q)) => match op {
                CmpOp::Eq => p == q,
                CmpOp::Ne => p != q,
                _ => false,
            },
            (Val::Num(_) | Val::Time(_), _) => {
                let (Some(p), Some(q)) = (num(x), num(y)) else {
                    return false;
                };
                op.holds(p, q)
            }
            _ => match op {
                CmpOp::Eq => str_eq(&x, &y),
                CmpOp::Ne => !str_eq(&x, &y),
                _ => false,
            },
        }
    }

    /// Whether time alone can change this expression's value, in constant time, for an
    /// expression marked by [`Expr::mark_static`]: there every compound node that is not
    /// wrapped depends on time. On an unmarked expression a compound node answers `true`,
    /// which is conservative (the timer analysis may then re-check early, never late).
    pub fn has_time(&self) -> bool {
        match self {
            Expr::Lit(_) | Expr::Static(_) => false,
            Expr::Feature(f) => f.deps() & deps::TIME != 0,
            _ => true,
        }
    }

    /// Wraps every maximal compound sub-expression that does not depend on time in
    /// [`Expr::Static`], so that under a time-dependent root every unwrapped compound node
    /// depends on time. Leaves stay as they are (they answer in constant time). Evaluation is
    /// unchanged.
    pub fn mark_static(self) -> Expr {
        let compound = !matches!(self, Expr::Lit(_) | Expr::Feature(_) | Expr::Static(_));
        if compound && self.deps() & deps::TIME == 0 {
            return Expr::Static(Box::new(self));
        }
        let m = |e: Box<Expr>| Box::new(e.mark_static());
        match self {
            Expr::Not(e) => Expr::Not(m(e)),
            Expr::Neg(e) => Expr::Neg(m(e)),
            Expr::And(a, b) => Expr::And(m(a), m(b)),
            Expr::Or(a, b) => Expr::Or(m(a), m(b)),
            Expr::Arith(op, a, b) => Expr::Arith(op, m(a), m(b)),
            Expr::Cmp(op, a, b) => Expr::Cmp(op, m(a), m(b)),
            Expr::InList {
                item,
                list,
                negated,
            } => Expr::InList {
                item: m(item),
                list,
                negated,
            },
            Expr::InSet { item, set, negated } => Expr::InSet {
                item: m(item),
                set,
                negated,
            },
            Expr::Call(f, args) => Expr::Call(f, args.into_iter().map(Expr::mark_static).collect()),
            leaf => leaf,
        }
    }

    /// What can change this expression's value.
    pub fn deps(&self) -> u8 {
        match self {
            Expr::Lit(_) => 0,
            Expr::Feature(f) => f.deps(),
            Expr::Not(e) | Expr::Neg(e) | Expr::Static(e) => e.deps(),
            Expr::And(a, b) | Expr::Or(a, b) | Expr::Arith(_, a, b) | Expr::Cmp(_, a, b) => {
                a.deps() | b.deps()
            }
            Expr::InList { item, .. } => item.deps(),
            Expr::InSet { item, set, .. } => item.deps() | set.deps(),
            Expr::Call(f, args) => {
                let d = args.iter().fold(0, |d, a| d | a.deps());
                if matches!(f, Func::DaysSince | Func::HoursSince) {
                    d | deps::TIME
                } else {
                    d
                }
            }
        }
    }
}

/// One value a rule reads, named by its source text (`purchases.count`,
/// `days_since(purchases.last)`), shown in `because` and `explain`.
#[derive(Debug, Clone)]
pub struct Atom {
    pub text: String,
    pub expr: Expr,
    /// `text` as a JSON object key with its colon (`"purchases.count":`), rendered once: the
    /// change serializer writes it for every value it shows.
    json_key: Box<[u8]>,
    /// `expr`'s value as shown, compiled ([`ShownProgram`]): what a change carries.
    shown: Arc<ShownProgram>,
}

impl PartialEq for Atom {
    /// The same text and expression (the rest is made from them).
    fn eq(&self, o: &Self) -> bool {
        self.text == o.text && self.expr == o.expr
    }
}

impl Atom {
    pub fn new(text: String, expr: Expr) -> Self {
        let mut json_key = Vec::with_capacity(text.len() + 3);
        crate::output::json_str(&mut json_key, &text);
        json_key.push(b':');
        Atom {
            text,
            shown: Arc::new(ShownProgram::new(&expr)),
            expr,
            json_key: json_key.into(),
        }
    }

    /// The value shown for this atom in a change's `because`: [`Shown::of`] the expression's
    /// value.
    pub fn shown(&self, cx: &Ctx<'_>) -> Shown {
        self.shown.shown(cx)
    }

    /// [`Self::text`] as a JSON object key, colon included.
    pub fn json_key(&self) -> &[u8] {
        &self.json_key
    }
}

/// A problem in one expression: byte offset into the expression, and the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeError {
    pub span: Span,
    pub message: String,
}

/// Compiles expressions against one state configuration and symbol table.
pub struct Compiler<'a> {
    pub cfg: &'a StateConfig,
    pub syms: &'a Symbols,
    errors: Vec<TypeError>,
    atoms: Vec<Atom>,
    src: &'a str,
}

fn window_buckets(cfg: &StateConfig, name: &str) -> Option<u32> {
    cfg.windows
        .iter()
        .find(|w| w.name == name)
        .map(|w| (w.ms / cfg.bucket_ms) as u32)
}

impl<'a> Compiler<'a> {
    pub fn new(cfg: &'a StateConfig, syms: &'a Symbols, src: &'a str) -> Self {
        Compiler {
            cfg,
            syms,
            errors: Vec::new(),
            atoms: Vec::new(),
            src,
        }
    }

    fn error(&mut self, span: Span, message: impl Into<String>) -> (Expr, Ty) {
        self.errors.push(TypeError {
            span,
            message: message.into(),
        });
        poisoned()
    }

    /// Compiles a rule condition (must be bool). Returns the expression and its atoms, or every
    /// problem found.
    pub fn compile_condition(mut self, node: &Node) -> Result<(Expr, Vec<Atom>), Vec<TypeError>> {
        let (expr, ty) = self.expr(node, true);
        if ty != Ty::Bool && ty != Ty::Err && self.errors.is_empty() {
            self.errors.push(TypeError {
                span: node.span,
                message: format!("a rule must be a condition (bool), this is a {}", ty.name()),
            });
        }
        if self.errors.is_empty() {
            Ok((expr, self.atoms))
        } else {
            Err(self.errors)
        }
    }

    fn text(&self, span: Span) -> String {
        self.src.get(span.start..span.end).unwrap_or("").to_owned()
    }

    fn add_atom(&mut self, span: Span, expr: &Expr) {
        let text = self.text(span);
        if !self.atoms.iter().any(|a| a.text == text) {
            self.atoms.push(Atom::new(text, expr.clone()));
        }
    }

    fn feature(&mut self, path: &str, span: Span) -> (Expr, Ty) {
        let f = if let Some(f) = plain_feature(path) {
            Some(f)
        } else if let Some(name) = path.strip_prefix("attr.") {
            self.cfg
                .attribute_index(name)
                .map(|i| Feature::Attr(i, self.cfg.attributes[i].1))
        } else if let Some(w) = path.strip_prefix("purchases.count_") {
            window_buckets(self.cfg, w).map(Feature::PurchaseCountW)
        } else if let Some(w) = path.strip_prefix("purchases.spend_") {
            window_buckets(self.cfg, w).map(Feature::PurchaseSpendW)
        } else if let Some(w) = path.strip_prefix("engagement.count_") {
            window_buckets(self.cfg, w).map(Feature::EngagementCountW)
        } else {
            None
        };
        match f {
            Some(f) => {
                let ty = f.ty();
                (Expr::Feature(f), ty)
            }
            None => {
                let hint = if path.starts_with("attr.") {
                    format!(
                        "; declare it under [attributes] (declared: {})",
                        self.cfg
                            .attributes
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else if path.contains("count_") || path.contains("spend_") {
                    format!(
                        "; windows configured: {}",
                        self.cfg
                            .windows
                            .iter()
                            .map(|w| w.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    String::new()
                };
                self.error(span, format!("unknown feature `{path}`{hint}"))
            }
        }
    }

    fn str_arg(&mut self, node: &Node, fname: &str) -> Option<String> {
        match &node.ast {
            Ast::Str(s) => Some(s.clone()),
            _ => {
                self.error(node.span, format!("{fname}() takes a string literal here"));
                None
            }
        }
    }

    fn call(&mut self, name: &str, args: &[Node], span: Span) -> (Expr, Ty) {
        let arity = |n: usize| args.len() == n;
        // Functions that are features with a literal key.
        match name {
            "category_count" | "channel_count" | "channel_share" | "action_count" => {
                if !(arity(1) || (name == "action_count" && arity(2))) {
                    let want = if name == "action_count" {
                        "1 or 2 arguments"
                    } else {
                        "1 argument"
                    };
                    return self.error(span, format!("{name}() takes {want}, got {}", args.len()));
                }
                let Some(key) = self.str_arg(&args[0], name) else {
                    return poisoned();
                };
                let sym = self.syms.intern(&key);
                let f = match name {
                    "category_count" => Feature::CategoryCount(sym),
                    "channel_count" => Feature::ChannelCount(sym),
                    "channel_share" => Feature::ChannelShare(sym),
                    _ if args.len() == 2 => {
                        let Some(w) = self.str_arg(&args[1], name) else {
                            return poisoned();
                        };
                        match window_buckets(self.cfg, &w) {
                            Some(b) => Feature::ActionCountW(sym, b),
                            None => {
                                let names = self
                                    .cfg
                                    .windows
                                    .iter()
                                    .map(|w| w.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ");
                                return self.error(
                                    args[1].span,
                                    format!("unknown window {w:?}; windows configured: {names}"),
                                );
                            }
                        }
                    }
                    _ => Feature::ActionCount(sym),
                };
                let e = Expr::Feature(f);
                self.add_atom(span, &e);
                return (e, Ty::Num);
            }
            _ => {}
        }
        let func = match name {
            "days_since" => Func::DaysSince,
            "hours_since" => Func::HoursSince,
            "has" => Func::Has,
            "abs" => Func::Abs,
            "min" => Func::Min,
            "max" => Func::Max,
            "coalesce" => Func::Coalesce,
            _ => return self.error(span, format!("unknown function `{name}`")),
        };
        let want = match func {
            Func::Min | Func::Max | Func::Coalesce => 2,
            _ => 1,
        };
        if args.len() != want {
            return self.error(
                span,
                format!(
                    "{name}() takes {want} argument{}, got {}",
                    if want == 1 { "" } else { "s" },
                    args.len()
                ),
            );
        }
        let compiled: Vec<(Expr, Ty)> = args.iter().map(|a| self.expr(a, false)).collect();
        let tys: Vec<Ty> = compiled.iter().map(|(_, t)| *t).collect();
        if tys.contains(&Ty::Err) {
            return poisoned();
        }
        let out_ty = match func {
            Func::DaysSince | Func::HoursSince => {
                if tys[0] != Ty::Time {
                    return self.error(
                        args[0].span,
                        format!("{name}() takes a time, got a {}", tys[0].name()),
                    );
                }
                Ty::Num
            }
            Func::Has => Ty::Bool,
            Func::Abs | Func::Min | Func::Max => {
                if let Some((i, t)) = tys.iter().enumerate().find(|(_, t)| **t != Ty::Num) {
                    return self.error(
                        args[i].span,
                        format!("{name}() takes numbers, got a {}", t.name()),
                    );
                }
                Ty::Num
            }
            Func::Coalesce => {
                if tys[0] != tys[1] {
                    return self.error(
                        span,
                        format!(
                            "coalesce() needs two values of the same type, got {} and {}",
                            tys[0].name(),
                            tys[1].name()
                        ),
                    );
                }
                tys[0]
            }
        };
        let e = Expr::Call(func, compiled.into_iter().map(|(e, _)| e).collect());
        if func != Func::Has {
            self.add_atom(span, &e);
        }
        (e, out_ty)
    }

    fn lit_list(&mut self, items: &[Node]) -> (Vec<Lit>, Option<Ty>) {
        let mut out = Vec::new();
        let mut ty = None;
        for it in items {
            let (lit, t) = match &it.ast {
                Ast::Num(n) => (Lit::Num(*n), Ty::Num),
                Ast::Str(s) => (
                    Lit::Str(StrLit {
                        text: s.clone(),
                        sym: self.syms.intern(s),
                    }),
                    Ty::Str,
                ),
                Ast::Unary(UnOp::Neg, inner) if matches!(inner.ast, Ast::Num(_)) => {
                    let Ast::Num(n) = inner.ast else {
                        unreachable!()
                    };
                    (Lit::Num(-n), Ty::Num)
                }
                _ => {
                    self.error(it.span, "list items must be number or string literals");
                    continue;
                }
            };
            if ty.is_some_and(|t| t != ty_of(&lit)) {
                self.error(it.span, "a list mixes numbers and strings");
            }
            ty = Some(t);
            out.push(lit);
        }
        (out, ty)
    }

    /// `atom_root`: whether a feature read here should be recorded as an atom (false inside a
    /// function call, whose whole text is the atom).
    fn expr(&mut self, node: &Node, atom_root: bool) -> (Expr, Ty) {
        let span = node.span;
        match &node.ast {
            Ast::Num(n) => (Expr::Lit(Lit::Num(*n)), Ty::Num),
            Ast::Bool(b) => (Expr::Lit(Lit::Bool(*b)), Ty::Bool),
            Ast::Str(s) => (
                Expr::Lit(Lit::Str(StrLit {
                    text: s.clone(),
                    sym: self.syms.intern(s),
                })),
                Ty::Str,
            ),
            Ast::Path(p) => {
                let (e, ty) = self.feature(p, span);
                if atom_root && matches!(e, Expr::Feature(_)) && ty != Ty::StrSet {
                    self.add_atom(span, &e);
                }
                (e, ty)
            }
            Ast::Call(name, args) => self.call(name, args, span),
            Ast::List(_) => self.error(span, "a list can only appear on the right of `in`"),
            Ast::Unary(UnOp::Not, inner) => {
                let (e, t) = self.expr(inner, atom_root);
                if t == Ty::Err {
                    return poisoned();
                }
                if t != Ty::Bool {
                    return self.error(inner.span, format!("`!` needs a bool, got a {}", t.name()));
                }
                (Expr::Not(Box::new(e)), Ty::Bool)
            }
            Ast::Unary(UnOp::Neg, inner) => {
                let (e, t) = self.expr(inner, atom_root);
                if t == Ty::Err {
                    return poisoned();
                }
                if t != Ty::Num {
                    return self.error(
                        inner.span,
                        format!("`-` needs a number, got a {}", t.name()),
                    );
                }
                (Expr::Neg(Box::new(e)), Ty::Num)
            }
            Ast::Binary(op @ (BinOp::In | BinOp::NotIn), lhs, rhs) => {
                let negated = *op == BinOp::NotIn;
                let (item, it) = self.expr(lhs, atom_root);
                if it == Ty::Err {
                    return poisoned();
                }
                match &rhs.ast {
                    Ast::List(items) => {
                        let (list, lt) = self.lit_list(items);
                        if let Some(lt) = lt {
                            if lt != it {
                                return self.error(
                                    span,
                                    format!(
                                        "`in` compares a {} with a list of {}s",
                                        it.name(),
                                        lt.name()
                                    ),
                                );
                            }
                        }
                        (
                            Expr::InList {
                                item: Box::new(item),
                                list,
                                negated,
                            },
                            Ty::Bool,
                        )
                    }
                    _ => {
                        let (set, st) = self.expr(rhs, false);
                        if st == Ty::Err {
                            return poisoned();
                        }
                        let Expr::Feature(set) = set else {
                            return self.error(
                                rhs.span,
                                format!(
                                    "the right of `in` must be a list or a set feature, got a {}",
                                    st.name()
                                ),
                            );
                        };
                        if st != Ty::StrSet {
                            return self.error(
                                rhs.span,
                                format!(
                                    "the right of `in` must be a list or a set feature, got a {}",
                                    st.name()
                                ),
                            );
                        }
                        if it != Ty::Str {
                            return self.error(
                                lhs.span,
                                format!(
                                    "`in` a set of strings needs a string on the left, got a {}",
                                    it.name()
                                ),
                            );
                        }
                        (
                            Expr::InSet {
                                item: Box::new(item),
                                set,
                                negated,
                            },
                            Ty::Bool,
                        )
                    }
                }
            }
            Ast::Binary(op, lhs, rhs) => {
                let (a, at) = self.expr(lhs, atom_root);
                let (b, bt) = self.expr(rhs, atom_root);
                if at == Ty::Err || bt == Ty::Err {
                    return poisoned();
                }
                match op {
                    BinOp::And | BinOp::Or => {
                        for (t, n) in [(at, lhs), (bt, rhs)] {
                            if t != Ty::Bool {
                                return self.error(
                                    n.span,
                                    format!(
                                        "`{}` needs bools on both sides, got a {}",
                                        op.symbol(),
                                        t.name()
                                    ),
                                );
                            }
                        }
                        let e = if *op == BinOp::And {
                            Expr::And(Box::new(a), Box::new(b))
                        } else {
                            Expr::Or(Box::new(a), Box::new(b))
                        };
                        (e, Ty::Bool)
                    }
                    BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div => {
                        for (t, n) in [(at, lhs), (bt, rhs)] {
                            if t != Ty::Num {
                                let hint = if t == Ty::Time {
                                    " (use days_since() or hours_since() on times)"
                                } else {
                                    ""
                                };
                                return self.error(
                                    n.span,
                                    format!(
                                        "`{}` needs numbers, got a {}{hint}",
                                        op.symbol(),
                                        t.name()
                                    ),
                                );
                            }
                        }
                        let aop = match op {
                            BinOp::Add => ArithOp::Add,
                            BinOp::Sub => ArithOp::Sub,
                            BinOp::Mul => ArithOp::Mul,
                            _ => ArithOp::Div,
                        };
                        (Expr::Arith(aop, Box::new(a), Box::new(b)), Ty::Num)
                    }
                    _ => {
                        let cop = match op {
                            BinOp::Eq => CmpOp::Eq,
                            BinOp::Ne => CmpOp::Ne,
                            BinOp::Lt => CmpOp::Lt,
                            BinOp::Le => CmpOp::Le,
                            BinOp::Gt => CmpOp::Gt,
                            _ => CmpOp::Ge,
                        };
                        if at != bt {
                            let hint = if at == Ty::Time || bt == Ty::Time {
                                " (compare days_since(...) with a number instead)"
                            } else {
                                ""
                            };
                            return self.error(
                                span,
                                format!(
                                    "cannot compare a {} with a {}{hint}",
                                    at.name(),
                                    bt.name()
                                ),
                            );
                        }
                        if matches!(at, Ty::StrSet | Ty::NumList | Ty::StrList) {
                            return self
                                .error(span, format!("cannot compare a {}; use `in`", at.name()));
                        }
                        if matches!(at, Ty::Str | Ty::Bool) && !matches!(cop, CmpOp::Eq | CmpOp::Ne)
                        {
                            return self.error(
                                span,
                                format!("a {} can only be compared with == or !=", at.name()),
                            );
                        }
                        (Expr::Cmp(cop, Box::new(a), Box::new(b)), Ty::Bool)
                    }
                }
            }
        }
    }
}

/// The result of an expression with an error already reported.
fn poisoned() -> (Expr, Ty) {
    (Expr::Lit(Lit::Bool(false)), Ty::Err)
}

fn ty_of(l: &Lit) -> Ty {
    match l {
        Lit::Num(_) => Ty::Num,
        Lit::Bool(_) => Ty::Bool,
        Lit::Str(_) => Ty::Str,
    }
}

/// A value as shown in `because` and `explain`: what [`val_to_json`] renders, without
/// building a `serde_json::Value` (every change carries several, so this is on the hot path:
/// numbers stay numbers, instants stay integers until written, short strings stay inline).
#[derive(Debug, Clone, PartialEq)]
pub enum Shown {
    Null,
    Bool(bool),
    /// A whole number (shown without a fraction).
    Int(i64),
    /// Any other number, rounded to 6 decimals (always finite).
    Num(f64),
    /// An instant (epoch ms), shown as RFC 3339.
    Time(i64),
    Str(compact_str::CompactString),
}

impl Shown {
    /// A number as shown: whole numbers without a fraction, others rounded.
    pub fn num(n: f64) -> Shown {
        if n.fract() == 0.0 && n.abs() < 9.0e15 {
            Shown::Int(n as i64)
        } else {
            // Round to 6 decimals so explanations stay readable (days_since etc.).
            let r = (n * 1e6).round() / 1e6;
            if r.is_finite() {
                Shown::Num(r)
            } else {
                Shown::Null
            }
        }
    }

    pub fn of(v: Val<'_>, syms: &Symbols) -> Shown {
        match v {
            Val::Missing => Shown::Null,
            Val::Bool(b) => Shown::Bool(b),
            Val::Num(n) => Shown::num(n),
            Val::Time(t) => Shown::Time(t),
            Val::Sym(s) => Shown::Str(syms.name(s).as_ref().into()),
            Val::Lit(l) => Shown::Str(l.text.as_str().into()),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Shown::Null => J::Null,
            Shown::Bool(b) => J::Bool(*b),
            Shown::Int(n) => J::from(*n),
            Shown::Num(n) => serde_json::Number::from_f64(*n).map_or(J::Null, J::Number),
            Shown::Time(t) => J::String(crate::time::format_rfc3339(*t)),
            Shown::Str(s) => J::String(s.to_string()),
        }
    }

    /// Appends the JSON text of [`Self::to_json`] (the same bytes serde_json writes for it).
    pub fn write_json(&self, o: &mut Vec<u8>) {
        match self {
            Shown::Null => o.extend_from_slice(b"null"),
            Shown::Bool(true) => o.extend_from_slice(b"true"),
            Shown::Bool(false) => o.extend_from_slice(b"false"),
            Shown::Int(n) => o.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
            // serde_json's own float formatting (writing into a Vec cannot fail).
            Shown::Num(n) => {
                let _ = serde_json::to_writer(o, n);
            }
            Shown::Time(t) => {
                o.push(b'"');
                crate::time::write_rfc3339(o, *t);
                o.push(b'"');
            }
            Shown::Str(s) => crate::output::json_str(o, s),
        }
    }
}

/// Renders a value for `because` / `explain` as JSON.
pub fn val_to_json(v: Val<'_>, syms: &Symbols) -> serde_json::Value {
    Shown::of(v, syms).to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_two_words() {
        // Every node of an evaluation returns one; 24 bytes (a `&str` inside) cost 1 % more
        // instructions per event (BENCHMARKS.md, twelfth session).
        assert_eq!(std::mem::size_of::<Val<'_>>(), 16);
    }

    const DAY: i64 = 86_400_000;

    /// A state configuration with windows of these many days, in hourly buckets.
    fn hourly_windows(days: &[i64]) -> StateConfig {
        StateConfig {
            bucket_ms: 3_600_000,
            windows: days
                .iter()
                .map(|d| crate::state::Window {
                    name: format!("{d}d"),
                    ms: d * DAY,
                })
                .collect(),
            attributes: Vec::new(),
        }
    }

    #[test]
    fn a_context_remembers_each_window_apart_and_reads_more_windows_than_it_keeps() {
        let cfg = hourly_windows(&[1, 7, 30, 90]);
        let syms = Symbols::new();
        let mut st = CustomerState::default();
        for (day, amount) in [(1, 5.0), (40, 7.0), (65, 11.0), (85, 13.0), (89, 17.0)] {
            let json = format!(
                r#"{{"customer_id":"c","type":"purchase","timestamp":{},"amount":{amount}}}"#,
                day * DAY + 1
            );
            let ev = crate::event::decode(json.as_bytes()).unwrap();
            st.apply(&cfg, &syms, &ev);
        }
        let now = 90 * DAY;
        let cx = Ctx::new(&st, &cfg, &syms, now);
        let buckets = cfg.windows.iter().map(|w| (w.ms / cfg.bucket_ms) as u32);
        // More windows than the context keeps, read in turn, twice: every read must be the
        // window's own sums, remembered or not.
        for b in buckets.clone().chain(buckets.rev()) {
            let (count, spend) = st.purchases_in(&cfg, now, b);
            assert_eq!(Feature::PurchaseCountW(b).read(&cx), Val::Num(count as f64));
            assert_eq!(Feature::PurchaseSpendW(b).read(&cx), Val::Num(spend));
        }
        assert_eq!(
            Feature::PurchaseSpendW(30 * 24).read(&cx),
            Val::Num(11.0 + 13.0 + 17.0)
        );
    }

    #[test]
    fn a_context_remembers_each_engagement_window_and_action_apart() {
        let cfg = hourly_windows(&[1, 7, 30]);
        let syms = Symbols::new();
        let mut st = CustomerState::default();
        let seen = [
            (2, "open"),
            (20, "click"),
            (25, "open"),
            (28, "click"),
            (29, "open"),
        ];
        for (day, action) in seen {
            let json = format!(
                r#"{{"customer_id":"c","type":"engagement","timestamp":{},"action":"{action}"}}"#,
                day * DAY + 1
            );
            let ev = crate::event::decode(json.as_bytes()).unwrap();
            st.apply(&cfg, &syms, &ev);
        }
        let sym = |a: &str| syms.read().get_bytes(a.as_bytes());
        let (open, click) = (sym("open").unwrap(), sym("click").unwrap());
        let now = 30 * DAY;
        let cx = Ctx::new(&st, &cfg, &syms, now);
        // Nine keys (three windows, all actions or one of two) for three places, read in
        // turn, twice: every read must be its own window's and action's count.
        let buckets: Vec<u32> = cfg
            .windows
            .iter()
            .map(|w| (w.ms / cfg.bucket_ms) as u32)
            .collect();
        for _ in 0..2 {
            for &b in &buckets {
                let all = st.engagements_in(&cfg, now, b, None);
                assert_eq!(Feature::EngagementCountW(b).read(&cx), Val::Num(all as f64));
                for a in [open, click] {
                    let n = st.engagements_in(&cfg, now, b, Some(a));
                    assert_eq!(Feature::ActionCountW(a, b).read(&cx), Val::Num(n as f64));
                }
            }
        }
        assert_eq!(Feature::ActionCountW(open, 7 * 24).read(&cx), Val::Num(2.0));
        assert_eq!(Feature::EngagementCountW(7 * 24).read(&cx), Val::Num(3.0));
    }
}
