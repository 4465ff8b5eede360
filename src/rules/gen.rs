//! Generators shared by the rules' property tests: conditions of every form the language
//! has, and customers built from random events (test builds only).

use crate::rules::compile::{Atom, Compiler, Expr};
use crate::rules::parse::parse;
use crate::state::{AttrType, AttrVal, CustomerState, StateConfig, Window};
use crate::symbols::Symbols;
use crate::time::{DAY_MS, HOUR_MS};
use proptest::prelude::*;

/// 2026-01-01T00:00:00Z.
pub const T0: i64 = 1_767_225_600_000;

pub fn config() -> StateConfig {
    StateConfig {
        bucket_ms: HOUR_MS,
        windows: [("7d", 7), ("30d", 30)]
            .into_iter()
            .map(|(name, days)| Window {
                name: name.into(),
                ms: days * DAY_MS,
            })
            .collect(),
        attributes: vec![
            ("industry".into(), AttrType::String),
            ("size".into(), AttrType::Number),
            ("vip".into(), AttrType::Bool),
            ("seats".into(), AttrType::Number),
        ],
    }
}

pub fn one_of(items: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::sample::select(items).prop_map(str::to_string)
}

/// A time-valued expression.
pub fn time() -> impl Strategy<Value = String> {
    one_of(&[
        "purchases.first",
        "purchases.last",
        "engagement.last",
        "last_seen",
        "first_seen",
    ])
}

/// A numeric expression, of every form the language has.
pub fn number() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        one_of(&[
            "purchases.count",
            "purchases.spend",
            "purchases.avg_order",
            "purchases.quantity",
            "purchases.count_7d",
            "purchases.spend_30d",
            "engagement.count",
            "engagement.count_30d",
            "attr.size",
            r#"category_count("books")"#,
            r#"channel_count("web")"#,
            r#"channel_share("web")"#,
            r#"action_count("open")"#,
            r#"action_count("open", "7d")"#,
            "0",
            "1",
            "2.5",
            "500",
        ]),
        time().prop_map(|t| format!("days_since({t})")),
        time().prop_map(|t| format!("hours_since({t})")),
        (time(), time()).prop_map(|(a, b)| format!("days_since(coalesce({a}, {b}))")),
    ];
    leaf.prop_recursive(3, 12, 2, |n| {
        prop_oneof![
            (n.clone(), one_of(&["+", "-", "*", "/"]), n.clone())
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            n.clone().prop_map(|a| format!("-({a})")),
            n.clone().prop_map(|a| format!("abs({a})")),
            (one_of(&["min", "max", "coalesce"]), n.clone(), n)
                .prop_map(|(f, a, b)| format!("{f}({a}, {b})")),
        ]
    })
}

pub fn cmp_op() -> impl Strategy<Value = String> {
    one_of(&["==", "!=", "<", "<=", ">", ">="])
}

/// A condition: comparisons of every kind, string tests, sets and lists, combined.
pub fn condition() -> impl Strategy<Value = String> {
    // A feature against a number it often equals (counts are small, sizes are 12 or 500):
    // the form rules have most, and where a wrong comparison shows.
    let simple = (
        one_of(&[
            "purchases.count",
            "purchases.count_7d",
            "purchases.count_30d",
            "engagement.count",
            "engagement.count_30d",
            r#"action_count("open", "30d")"#,
            r#"category_count("books")"#,
            "attr.size",
            "attr.size",
            "coalesce(attr.size, 0)",
            "coalesce(attr.size, attr.size)",
            "coalesce(attr.size, attr.seats)",
            "coalesce(attr.seats, attr.size)",
            "attr.seats",
            "coalesce(purchases.avg_order, 1)",
            "days_since(purchases.last)",
        ]),
        cmp_op(),
        one_of(&["0", "1", "2", "2.5", "12", "500"]),
    )
        .prop_map(|(a, op, b)| format!("{a} {op} {b}"));
    let leaf = prop_oneof![
        4 => simple,
        3 => (number(), cmp_op(), number()).prop_map(|(a, op, b)| format!("{a} {op} {b}")),
        // A number attribute against another feature: where a mistyped value differs
        // from a missing one.
        2 => (
            one_of(&["attr.size", "coalesce(attr.size, attr.size)"]),
            cmp_op(),
            one_of(&["purchases.count", "attr.size", "attr.size", "engagement.count"]),
        )
            .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
        1 => (time(), cmp_op(), time()).prop_map(|(a, op, b)| format!("{a} {op} {b}")),
        1 => (
            one_of(&["attr.industry", "purchases.plan", "purchases.top_category", "purchases.top_channel"]),
            one_of(&["==", "!="]),
            one_of(&[r#""finance""#, r#""annual""#, r#""books""#, r#""web""#, r#""nowhere""#]),
        )
            .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
        1 => one_of(&[
            r#""books" in purchases.categories"#,
            r#"attr.industry in ["finance", "retail"]"#,
            r#"attr.industry not in ["finance"]"#,
            "attr.size in [500, 12]",
            "has(attr.size)",
            "has(attr.industry)",
            "attr.vip == true",
            "attr.vip != false",
            "attr.vip",
            r#""finance" == attr.industry"#,
        ]),
    ];
    leaf.prop_recursive(3, 16, 2, |b| {
        prop_oneof![
            (b.clone(), b.clone()).prop_map(|(x, y)| format!("({x} && {y})")),
            (b.clone(), b.clone()).prop_map(|(x, y)| format!("({x} || {y})")),
            b.prop_map(|x| format!("!({x})")),
        ]
    })
}

#[derive(Debug, Clone)]
pub enum Ev {
    Purchase {
        day: i64,
        amount: f64,
        category: &'static str,
        channel: &'static str,
        plan: Option<&'static str>,
    },
    Engagement {
        day: i64,
        action: &'static str,
    },
    Profile {
        day: i64,
        industry: Option<&'static str>,
        size: Option<f64>,
        vip: Option<bool>,
        seats: Option<f64>,
    },
}

pub fn event() -> impl Strategy<Value = Ev> {
    let day = 0i64..60;
    prop_oneof![
        (
            day.clone(),
            proptest::sample::select(&[-20.0, 10.0, 600.0, 1200.0][..]),
            proptest::sample::select(&["books", "games"][..]),
            proptest::sample::select(&["web", "store"][..]),
            proptest::option::of(proptest::sample::select(&["annual", "monthly"][..])),
        )
            .prop_map(|(day, amount, category, channel, plan)| Ev::Purchase {
                day,
                amount,
                category,
                channel,
                plan
            }),
        (
            day.clone(),
            proptest::sample::select(&["open", "click"][..])
        )
            .prop_map(|(day, action)| Ev::Engagement { day, action }),
        (
            day,
            proptest::option::of(proptest::sample::select(&["finance", "retail"][..])),
            proptest::option::of(proptest::sample::select(&[12.0, 500.0, 800.0][..])),
            proptest::option::of(any::<bool>()),
            proptest::option::of(proptest::sample::select(&[12.0, 40.0][..])),
        )
            .prop_map(|(day, industry, size, vip, seats)| Ev::Profile {
                day,
                industry,
                size,
                vip,
                seats,
            }),
    ]
}

pub fn json(ev: &Ev, minute: i64) -> String {
    let ts = |day: i64| T0 + day * DAY_MS + minute * 60_000;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "null".into());
    match ev {
        Ev::Purchase {
            day,
            amount,
            category,
            channel,
            plan,
        } => format!(
            r#"{{"customer_id":"c","type":"purchase","timestamp":{},"amount":{amount},"category":"{category}","channel":"{channel}"{}}}"#,
            ts(*day),
            plan.map_or(String::new(), |p| format!(r#","plan":"{p}""#))
        ),
        Ev::Engagement { day, action } => format!(
            r#"{{"customer_id":"c","type":"engagement","timestamp":{},"action":"{action}"}}"#,
            ts(*day)
        ),
        Ev::Profile {
            day,
            industry,
            size,
            vip,
            seats,
        } => format!(
            r#"{{"customer_id":"c","type":"profile","timestamp":{},"attributes":{{"industry":{},"size":{},"vip":{},"seats":{}}}}}"#,
            ts(*day),
            opt(industry.map(|i| format!("\"{i}\""))),
            opt(size.map(|s| s.to_string())),
            opt(vip.map(|v| v.to_string())),
            opt(seats.map(|s| s.to_string())),
        ),
    }
}

/// `cond` parsed and compiled under `cfg` (rejected if it does not type-check).
pub fn compiled(
    cond: &str,
    cfg: &StateConfig,
    syms: &Symbols,
) -> Result<(Expr, Vec<Atom>), TestCaseError> {
    let node = parse(cond).map_err(|e| TestCaseError::fail(format!("{cond}: {}", e.message)))?;
    Compiler::new(cfg, syms, cond)
        .compile_condition(&node)
        .map_err(|_| TestCaseError::reject("does not type-check"))
}

/// A customer that saw `events` (one a minute after the other, on their days), with
/// `mistyped`, if any, an attribute value of another type than declared (as a restore under
/// changed rules leaves).
pub fn customer(
    cfg: &StateConfig,
    syms: &Symbols,
    events: &[Ev],
    mistyped: Option<usize>,
) -> CustomerState {
    let mut st = CustomerState::default();
    for (i, ev) in events.iter().enumerate() {
        let json = json(ev, i as i64);
        let ev = crate::event::decode(json.as_bytes()).expect("generated events decode");
        st.apply(cfg, syms, &ev);
    }
    let wrong = [
        (0, AttrVal::Num(3.0)),
        (0, AttrVal::Bool(true)),
        (1, AttrVal::Str(syms.intern("12"))),
        (1, AttrVal::Bool(false)),
        (3, AttrVal::Str(syms.intern("40"))),
        (2, AttrVal::Num(1.0)),
        (2, AttrVal::Str(syms.intern("true"))),
    ];
    if let Some(m) = mistyped {
        let (slot, v) = wrong[m % wrong.len()];
        st.set_attr(slot, cfg.attributes.len(), Some(v));
    }
    st
}
