//! Property tests: incremental evaluation equals a from-scratch evaluation, and window
//! features equal a naive model computed from the raw events with the documented formula.

use std::sync::Arc;

use microseg::engine::Engine;
use microseg::event::decode;
use microseg::rules::RuleSet;
use microseg::state::CustomerState;
use microseg::time::{DAY_MS, HOUR_MS};
use proptest::prelude::*;

const RULES: &str = r#"
[features]
windows = ["1d", "7d", "30d"]
bucket = "1h"

[attributes]
industry = "string"
size = "number"
vip = "bool"

[[segmentation]]
name = "lifecycle"
default = "prospect"
  [[segmentation.segment]]
  name = "lapsed"
  when = "purchases.count > 0 && days_since(purchases.last) > 20"
  [[segmentation.segment]]
  name = "hot"
  when = "purchases.count_7d >= 3 || purchases.spend_1d > 150"
  [[segmentation.segment]]
  name = "active"
  when = "purchases.count_30d >= 1"

[[segmentation]]
name = "tier"
default = "low"
  [[segmentation.segment]]
  name = "high"
  when = "purchases.spend >= 300"

[[segment]]
name = "busy_week"
when = "purchases.count_7d >= 2"

[[segment]]
name = "fin"
when = 'attr.industry == "finance" && attr.size > 100'

[[segment]]
name = "vip_or_books"
when = 'attr.vip == true || "books" in purchases.categories'

[[segment]]
name = "engaged"
when = 'action_count("open", "7d") >= 2 || engagement.count_1d >= 3'

[[segment]]
name = "online"
when = 'channel_share("online") >= 0.5 && purchases.top_channel == "online"'

[[segment]]
name = "recent_any"
when = "hours_since(last_seen) < 1 && has(attr.industry)"

[[segment]]
name = "plan"
when = 'purchases.plan in ["annual", "biennial"] && coalesce(purchases.avg_order, 0) > 20'
"#;

#[derive(Debug, Clone)]
enum Ev {
    Purchase {
        amount: u32,
        cat: u8,
        channel: u8,
        plan: u8,
    },
    Engage {
        action: u8,
    },
    Profile {
        industry: u8,
        size: u16,
        vip: bool,
    },
}

fn json(customer: u8, ts: i64, ev: &Ev) -> String {
    let cats = ["books", "toys", "food"];
    let chans = ["online", "store"];
    let plans = ["annual", "monthly", "biennial"];
    match ev {
        Ev::Purchase {
            amount,
            cat,
            channel,
            plan,
        } => format!(
            r#"{{"customer_id":"c{customer}","type":"purchase","timestamp":{ts},"amount":{amount},"category":"{}","channel":"{}","plan":"{}"}}"#,
            cats[*cat as usize % 3],
            chans[*channel as usize % 2],
            plans[*plan as usize % 3]
        ),
        Ev::Engage { action } => format!(
            r#"{{"customer_id":"c{customer}","type":"engagement","timestamp":{ts},"action":"{}"}}"#,
            ["open", "click"][*action as usize % 2]
        ),
        Ev::Profile {
            industry,
            size,
            vip,
        } => format!(
            r#"{{"customer_id":"c{customer}","type":"profile","timestamp":{ts},"attributes":{{"industry":"{}","size":{size},"vip":{vip}}}}}"#,
            ["finance", "retail"][*industry as usize % 2]
        ),
    }
}

fn ev_strategy() -> impl Strategy<Value = Ev> {
    prop_oneof![
        3 => (1u32..200, any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(amount, cat, channel, plan)| Ev::Purchase { amount, cat, channel, plan }),
        2 => any::<u8>().prop_map(|action| Ev::Engage { action }),
        1 => (any::<u8>(), 0u16..300, any::<bool>()).prop_map(|(industry, size, vip)| Ev::Profile { industry, size, vip }),
    ]
}

/// (customer, time step in minutes — sometimes negative for out-of-order, event)
fn seq_strategy() -> impl Strategy<Value = Vec<(u8, i64, Ev)>> {
    prop::collection::vec(
        (
            0u8..3,
            prop_oneof![8 => 0i64..3000, 1 => 20_000i64..50_000, 1 => -3000i64..0],
            ev_strategy(),
        ),
        1..80,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_from_scratch(seq in seq_strategy()) {
        let engine = Engine::new(Arc::new(RuleSet::from_toml("prop.toml", RULES).unwrap()));
        let mut customers: Vec<_> = (0..3).map(|_| engine.new_customer()).collect();
        let mut t = 1_700_000_000_000i64;
        for (c, step_min, ev) in &seq {
            t += step_min * 60_000;
            let text = json(*c, t, ev);
            let decoded = decode(text.as_bytes()).unwrap();
            let cust = &mut customers[*c as usize];
            let mut out = Vec::new();
            engine.apply(cust, &decoded, &mut out).unwrap();
            let scratch = engine.evaluate_all(&cust.state, cust.state.last_seen);
            prop_assert_eq!(engine.memberships(cust), scratch, "after {}", text);
            // seq increases by exactly one per change.
            for w in out.windows(2) {
                prop_assert_eq!(w[1].seq, w[0].seq + 1);
            }
            if let Some(last) = out.last() {
                prop_assert_eq!(last.seq, cust.seq);
            }
        }
    }

    #[test]
    fn windows_match_a_naive_model(seq in seq_strategy()) {
        let rules = RuleSet::from_toml("prop.toml", RULES).unwrap();
        let cfg = &rules.state;
        let mut st = CustomerState::new();
        let mut purchases: Vec<(i64, f64)> = Vec::new();
        let mut t = 1_700_000_000_000i64;
        for (_, step_min, ev) in &seq {
            t += step_min * 60_000;
            let text = json(0, t, ev);
            let decoded = decode(text.as_bytes()).unwrap();
            st.apply(cfg, &rules.symbols, &decoded);
            if let Ev::Purchase { amount, .. } = ev {
                purchases.push((t, *amount as f64));
            }
            let now = st.last_seen;
            for (w, days) in [(24u32, 1i64), (7 * 24, 7), (30 * 24, 30)] {
                // README: a window of length w at `now` holds events with
                // ts >= floor(now / bucket) * bucket + bucket - w.
                let from = now.div_euclid(HOUR_MS) * HOUR_MS + HOUR_MS - days * DAY_MS;
                let (n, s) = purchases.iter().filter(|(ts, _)| *ts >= from && *ts <= now).fold((0u32, 0.0), |(n, s), (_, a)| (n + 1, s + a));
                let got = st.purchases_in(cfg, now, w);
                prop_assert_eq!(got.0, n, "count over {}d", days);
                prop_assert!((got.1 - s).abs() < 1e-6, "spend over {}d: {} vs {}", days, got.1, s);
            }
        }
    }
}
