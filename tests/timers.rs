//! Time: timers, watermarks, late and duplicate events, determinism — with a controlled clock
//! (the processor takes the wall time as an argument), no Kafka.

use std::sync::Arc;

use microseg::config::{ClockMode, TimeConfig};
use microseg::engine::{Applied, ChangeKind, Clock, Engine, Memberships};
use microseg::event::decode;
use microseg::output::{change_json, Cause};
use microseg::processor::{Emitted, Fired, Processor, Source};
use microseg::rules::RuleSet;
use microseg::time::{DAY_MS, HOUR_MS};
use proptest::prelude::*;

const RULES: &str = r#"
[features]
windows = ["7d", "30d"]
bucket = "1h"

[[segmentation]]
name = "lifecycle"
default = "prospect"
  [[segmentation.segment]]
  name = "lapsed"
  when = "purchases.count > 0 && days_since(purchases.last) > 60"
  [[segmentation.segment]]
  name = "active"
  when = "purchases.count_30d >= 1"

[[segment]]
name = "busy_week"
when = "purchases.count_7d >= 2"
"#;

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600_000;

fn rules() -> Arc<RuleSet> {
    Arc::new(RuleSet::from_toml("t.toml", RULES).unwrap())
}

fn time(clock: ClockMode, lateness_ms: i64) -> TimeConfig {
    TimeConfig {
        clock,
        allowed_lateness_ms: lateness_ms,
        idle_timeout_ms: 10_000,
        ..TimeConfig::default()
    }
}

fn processor(t: &TimeConfig) -> Processor {
    Processor::new(Engine::new(rules()).with_dedup(t.dedup_ids), t, 1)
}

fn purchase(id: &str, customer: &str, ts: i64) -> String {
    format!(
        r#"{{"event_id":"{id}","customer_id":"{customer}","type":"purchase","timestamp":{ts},"amount":10}}"#
    )
}

fn login(id: &str, customer: &str, ts: i64) -> String {
    format!(
        r#"{{"event_id":"{id}","customer_id":"{customer}","type":"engagement","action":"login","timestamp":{ts}}}"#
    )
}

/// Input read from partition 0 of the only input topic at `offset`.
fn src(offset: i64) -> Source {
    Source {
        topic: 0,
        partition: 0,
        offset,
    }
}

/// Feeds one event (partition 0) at wall time `wall`; returns what it did and its changes as
/// (customer, segment, change, at, by_timer).
/// (customer, segment, change, at, by_timer)
type Row = (String, String, ChangeKind, i64, bool);

fn feed(p: &Processor, json: &str, wall: i64) -> (Applied, Vec<Row>) {
    let ev = decode(json.as_bytes()).unwrap();
    let mut out = Vec::new();
    let applied = p
        .event(src(0), &ev, wall, &mut out, &mut Fired::default())
        .unwrap();
    (applied, summarize(out.iter()))
}

fn summarize<'a, 'r: 'a>(out: impl Iterator<Item = &'a Emitted<'r>>) -> Vec<Row> {
    out.map(|e| {
        (
            e.customer_id.to_string(),
            e.change.segment.to_string(),
            e.change.kind,
            e.change.at,
            e.change.by_timer,
        )
    })
    .collect()
}

fn tick(p: &Processor, wall: i64) -> Vec<Row> {
    let mut out = Vec::new();
    p.tick(wall, &mut out);
    summarize(out.iter().map(|(_, e)| e))
}

fn row(
    c: &str,
    seg: &str,
    kind: ChangeKind,
    at: i64,
    timer: bool,
) -> (String, String, ChangeKind, i64, bool) {
    (c.into(), seg.into(), kind, at, timer)
}

use ChangeKind::{Entered, Exited};

#[test]
fn a_customer_who_stops_buying_leaves_active_when_the_window_empties_by_timer() {
    let p = processor(&time(ClockMode::Event, 0));
    for (i, d) in [0, 1, 2].iter().enumerate() {
        feed(&p, &purchase(&format!("b{i}"), "alice", T0 + d * DAY_MS), 0);
    }
    assert_eq!(p.timers_pending(), 1, "one timer for alice");
    // Another customer's events move the partition's watermark; alice sends nothing. By day
    // 31 her week is no longer busy: the day-1 purchase left the 7-day window at day 8.
    let (_, ch) = feed(&p, &login("x1", "bob", T0 + 31 * DAY_MS), 0);
    assert_eq!(
        ch,
        [
            row("alice", "busy_week", Exited, T0 + 8 * DAY_MS, true),
            row("bob", "prospect", Entered, T0 + 31 * DAY_MS, false),
        ]
    );
    // The last purchase (day 2, bucket starting at day 2 00:00) leaves the 30-day window at
    // day 32 00:00 exactly; the watermark passes it with bob's next event.
    let (_, ch) = feed(&p, &login("x2", "bob", T0 + 33 * DAY_MS), 0);
    let d32 = T0 + 32 * DAY_MS;
    assert_eq!(
        ch,
        [
            row("alice", "active", Exited, d32, true),
            row("alice", "prospect", Entered, d32, true),
        ]
    );
    // 60 days (and 1 ms) after the last purchase: lapsed.
    let (_, ch) = feed(&p, &login("x3", "bob", T0 + 70 * DAY_MS), 0);
    let lapse = T0 + 62 * DAY_MS + 1;
    assert!(
        ch.contains(&row("alice", "prospect", Exited, lapse, true))
            && ch.contains(&row("alice", "lapsed", Entered, lapse, true)),
        "{ch:?}"
    );
    let alice = p.customer("alice").unwrap();
    // active; busy_week in; then by timer: busy_week out, active→prospect (2),
    // prospect→lapsed (2).
    assert_eq!(alice.seq, 7);
    assert_eq!(alice.timer, microseg::state::NEVER);
}

#[test]
fn a_window_count_drops_when_its_bucket_ages_out() {
    let p = processor(&time(ClockMode::Event, 0));
    feed(&p, &purchase("b1", "c", T0), 0);
    let (_, ch) = feed(&p, &purchase("b2", "c", T0 + 3 * DAY_MS + 5 * HOUR_MS), 0);
    assert!(ch.contains(&row(
        "c",
        "busy_week",
        Entered,
        T0 + 3 * DAY_MS + 5 * HOUR_MS,
        false
    )));
    // count_7d drops to 1 when the first purchase's bucket (T0, 1h wide) leaves: T0 + 7d.
    let (_, ch) = feed(&p, &login("l", "other", T0 + 9 * DAY_MS), 0);
    assert_eq!(ch[0], row("c", "busy_week", Exited, T0 + 7 * DAY_MS, true));
}

#[test]
fn late_events_within_the_lateness_count_in_windows_and_later_ones_only_in_lifetime() {
    let p = processor(&time(ClockMode::Event, 2 * HOUR_MS));
    feed(&p, &purchase("b1", "c", T0 + 10 * DAY_MS), 0);
    // One hour out of order: within the 2 h lateness, so it lands in its own bucket and makes
    // the week busy.
    let (applied, ch) = feed(&p, &purchase("b2", "c", T0 + 10 * DAY_MS - HOUR_MS), 0);
    assert_eq!(applied, Applied::Applied);
    assert!(
        ch.contains(&row("c", "busy_week", Entered, T0 + 10 * DAY_MS, false)),
        "{ch:?}"
    );
    let rules = rules();
    let c = p.customer("c").unwrap();
    assert_eq!(
        c.state
            .purchases_in(&rules.state, T0 + 10 * DAY_MS, 7 * 24)
            .0,
        2
    );

    // Three hours late: behind the watermark (newest - 2 h). Lifetime count only.
    let (applied, _) = feed(&p, &purchase("b3", "c", T0 + 10 * DAY_MS - 3 * HOUR_MS), 0);
    assert_eq!(applied, Applied::Late);
    let c = p.customer("c").unwrap();
    assert_eq!(
        c.state.purchase_count, 3,
        "lifetime count includes the late purchase"
    );
    assert_eq!(
        c.state
            .purchases_in(&rules.state, T0 + 10 * DAY_MS, 7 * 24)
            .0,
        2,
        "windows do not"
    );
    assert_eq!(p.watermark(0), T0 + 10 * DAY_MS - 2 * HOUR_MS);
}

#[test]
fn a_duplicate_event_id_changes_nothing() {
    let p = processor(&time(ClockMode::Event, 0));
    feed(&p, &purchase("b1", "c", T0), 0);
    let before = p.customer("c").unwrap();
    let (applied, ch) = feed(&p, &purchase("b1", "c", T0 + HOUR_MS), 0);
    assert_eq!(applied, Applied::Duplicate);
    assert!(ch.is_empty());
    let after = p.customer("c").unwrap();
    assert_eq!(after.state, before.state);
    assert_eq!(after.seq, before.seq);
    // A new id is applied; the horizon is bounded (8 ids by default): the oldest is forgotten.
    for i in 2..=9 {
        assert_eq!(
            feed(&p, &purchase(&format!("b{i}"), "c", T0 + i * HOUR_MS), 0).0,
            Applied::Applied
        );
    }
    assert_eq!(p.customer("c").unwrap().recent_ids().count(), 8);
    assert_eq!(
        feed(&p, &purchase("b1", "c", T0 + 10 * HOUR_MS), 0).0,
        Applied::Applied
    );
}

#[test]
fn an_idle_partition_advances_with_the_wall_clock_after_the_idle_timeout() {
    let p = processor(&time(ClockMode::Event, 0));
    let wall = 1_000_000;
    // The purchase's bucket leaves the 30-day window at T0; the newest event is 1 s earlier.
    feed(&p, &purchase("b1", "c", T0 - 30 * DAY_MS), wall);
    feed(&p, &login("l1", "other", T0 - 1000), wall);
    assert!(
        tick(&p, wall + 5_000).is_empty(),
        "not idle yet (10 s timeout)"
    );
    assert_eq!(p.watermark(0), T0 - 1000);
    // Idle: event time = newest event + wall time since it arrived = T0 + 10 s.
    let ch = tick(&p, wall + 11_000);
    assert_eq!(ch[0], row("c", "active", Exited, T0, true));
    assert_eq!(p.watermark(0), T0 + 10_000);
}

#[test]
fn processing_time_fires_on_the_wall_clock() {
    let p = processor(&time(ClockMode::Processing, 0));
    let wall = T0;
    let (_, ch) = feed(&p, &purchase("b1", "c", T0 - 5 * DAY_MS), wall);
    assert!(
        ch.contains(&row("c", "active", Entered, wall, false)),
        "{ch:?}"
    );
    // Bucket of T0 - 5d leaves the 30-day window at T0 + 25d (wall clock).
    assert!(tick(&p, T0 + 25 * DAY_MS - 1).is_empty());
    let ch = tick(&p, T0 + 25 * DAY_MS + 150);
    assert_eq!(ch[0], row("c", "active", Exited, T0 + 25 * DAY_MS, true));
}

/// Generated input through the processor; every change serialized as published.
fn run_once(events: &[microseg::generate::Generated], rules: &Arc<RuleSet>) -> Vec<Vec<u8>> {
    let t = time(ClockMode::Event, 5 * 60_000);
    let p = Processor::new(Engine::new(rules.clone()), &t, 1);
    let mut bytes = Vec::new();
    for (i, g) in events.iter().enumerate() {
        let Ok(ev) = decode(g.json.as_bytes()) else {
            continue;
        };
        let mut out = Vec::new();
        // Wall time differs between runs: it must not matter while input flows.
        let wall = i as i64 * 3 + (rules.version.len() as i64);
        let _ = p.event(src(i as i64), &ev, wall, &mut out, &mut Fired::default());
        for e in &out {
            let cause = if e.change.by_timer {
                Cause::Timer
            } else {
                Cause::Event {
                    event_id: ev.event_id.as_deref(),
                    topic: "events",
                    partition: 0,
                    offset: i as i64,
                }
            };
            bytes.push(change_json(rules, &e.customer_id, cause, &e.change));
        }
    }
    bytes
}

#[test]
fn a_replay_of_the_same_input_gives_a_byte_identical_change_stream() {
    let rules = Arc::new(RuleSet::embedded_default());
    // 300 customers over ~200 days: plenty of timer-driven moves.
    let mut g = microseg::generate::Generator::new(11, 300, T0, 60_000 * 30);
    let events: Vec<_> = (0..10_000).map(|_| g.next_event()).collect();
    let a = run_once(&events, &rules);
    let b = run_once(&events, &rules);
    let timer_changes = a
        .iter()
        .filter(|m| m.windows(7).any(|w| w == b"\"timer\""))
        .count();
    assert!(
        timer_changes > 100,
        "the input exercises timers ({timer_changes})"
    );
    assert_eq!(a.len(), b.len());
    assert!(a == b, "byte-identical");
}

/// The default lifecycle has no gap between `active` (a purchase in the 30-day window) and
/// `at_risk`: a customer who has bought never falls back to the default, `prospect` (never
/// bought), not even for the hour a window's bucket leaves before 30 full days have passed.
#[test]
fn a_buyer_never_falls_back_to_prospect_with_the_default_rules() {
    let rules = Arc::new(RuleSet::embedded_default());
    let t = time(ClockMode::Event, 5 * 60_000);
    let p = Processor::new(Engine::new(rules.clone()), &t, 1);
    // 300 customers over ~200 days, as in the replay test: customers stop and start buying.
    let mut g = microseg::generate::Generator::new(11, 300, T0, 60_000 * 30);
    let (mut back_to_prospect, mut to_at_risk) = (Vec::new(), 0);
    for i in 0..10_000 {
        let e = g.next_event();
        let Ok(ev) = decode(e.json.as_bytes()) else {
            continue;
        };
        let mut out = Vec::new();
        let _ = p.event(src(i), &ev, i * 3, &mut out, &mut Fired::default());
        for e in out.iter().filter(|e| e.change.segmentation == Some(0)) {
            let c = &e.change;
            if c.kind != ChangeKind::Entered {
                continue;
            }
            // Every lifecycle segment but the default needs a purchase, and purchases never
            // go away: entering the default from another segment means a buyer fell back.
            if c.segment == "prospect" && c.previous.is_some() {
                back_to_prospect.push(format!(
                    "{} at {} from {:?}",
                    e.customer_id, c.at, c.previous
                ));
            }
            to_at_risk += (c.segment == "at_risk" && c.previous.is_some()) as usize;
        }
    }
    assert!(
        to_at_risk > 10,
        "the input has buyers who stop ({to_at_risk})"
    );
    assert!(back_to_prospect.is_empty(), "{back_to_prospect:?}");
}

// ---------------------------------------------------------------------------------------
// Property: timers never miss a flip, and fire at the first instant it holds.

const TIME_RULES: &str = r#"
[features]
windows = ["1d", "7d"]
bucket = "1h"

[[segmentation]]
name = "life"
default = "none"
  [[segmentation.segment]]
  name = "lapsed"
  when = "purchases.count > 0 && days_since(purchases.last) > 3"
  [[segmentation.segment]]
  name = "active"
  when = "purchases.count_7d >= 2"
  [[segmentation.segment]]
  name = "warm"
  when = "engagement.count_1d >= 1 || hours_since(engagement.last) < 30"

[[segment]]
name = "around_day_five"
when = "abs(days_since(purchases.first) - 5) < 1.5"

[[segment]]
name = "both_quiet"
when = "min(days_since(purchases.last), hours_since(engagement.last) / 24) >= 2"

[[segment]]
name = "engaged_after_buying"
when = "coalesce(days_since(engagement.last), 100) - days_since(purchases.first) > 0.5"

[[segment]]
name = "spender"
when = "purchases.spend_7d / 2 > 15 && not (days_since(purchases.first) <= 4)"

[[segment]]
name = "clicker"
when = 'action_count("click", "1d") >= 2 && max(hours_since(last_seen), 1) < 12'

[[segment]]
name = "big_week_or_two_today"
when = "40 <= purchases.spend_7d || engagement.count_1d == 2"

[[segment]]
name = "not_one_this_week"
when = 'purchases.count_7d != 1 && action_count("open", "1d") < 2'

# A window's count equal to zero (the default rules' at_risk): found by a search.
[[segment]]
name = "none_this_week"
when = "purchases.count > 0 && purchases.count_7d == 0"

# Inequalities on a whole window's count, either side (found by a search, not a walk).
[[segment]]
name = "two_this_week"
when = "purchases.count_7d >= 2"

[[segment]]
name = "quiet_today"
when = "3 > engagement.count_1d"

# A side that time cannot change: on the left of `||`, on the right of `&&`.
[[segment]]
name = "never_bought_or_recent"
when = "purchases.count == 0 || days_since(purchases.last) < 2"

[[segment]]
name = "old_repeat_buyer"
when = "days_since(purchases.first) > 4 && purchases.count >= 2"

# Time since an instant against a number, either way round (solved in closed form).
[[segment]]
name = "quiet_two_days"
when = "2 <= days_since(purchases.last)"

[[segment]]
name = "first_within_50h"
when = "50 > hours_since(purchases.first)"

[[segment]]
name = "first_over_3_days_ago"
when = "3 < days_since(purchases.first)"

[[segment]]
name = "no_engagement_for_20h"
when = "hours_since(engagement.last) >= 20"
"#;

#[derive(Debug, Clone)]
enum Step {
    /// At an offset, an amount (negative: a refund).
    Purchase(i64, i32),
    Engage(i64, bool),
    /// Let time pass by this many ms and fire due timers.
    Wait(i64),
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let dt = prop_oneof![4 => 0i64..3 * HOUR_MS, 2 => 0i64..2 * DAY_MS, 1 => -2 * HOUR_MS..0];
    prop_oneof![
        3 => (dt.clone(), prop_oneof![4 => 1i32..40, 1 => -40i32..0]).prop_map(|(d, a)| Step::Purchase(d, a)),
        2 => (dt, any::<bool>()).prop_map(|(d, c)| Step::Engage(d, c)),
        3 => (1i64..4 * DAY_MS).prop_map(Step::Wait),
    ]
}

/// Applies changes to a membership snapshot.
fn apply_changes(rules: &RuleSet, m: &mut Memberships, changes: &[microseg::engine::Change<'_>]) {
    for ch in changes {
        match ch.segmentation {
            Some(si) if ch.kind == Entered => {
                m.segment[si] = rules.segmentations[si].index_of(ch.segment).unwrap() as u16
            }
            Some(_) => {}
            None => {
                let i = rules
                    .segments
                    .iter()
                    .position(|r| r.name == ch.segment)
                    .unwrap();
                m.member[i] = ch.kind == Entered;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn timers_fire_exactly_when_a_rule_flips(steps in prop::collection::vec(step_strategy(), 1..60)) {
        let rules = Arc::new(RuleSet::from_toml("time.toml", TIME_RULES).unwrap());
        let engine = Engine::new(rules.clone());
        let mut c = engine.new_customer();
        // `clock`: the latest instant evaluated (the watermark a pipeline would pass).
        let mut clock = T0;
        let mut ts = T0;
        for (i, step) in steps.iter().enumerate() {
            match step {
                Step::Purchase(d, _) | Step::Engage(d, _) => {
                    ts += d;
                    let json = match step {
                        Step::Purchase(_, amount) => format!(r#"{{"event_id":"e{i}","customer_id":"c","type":"purchase","timestamp":{ts},"amount":{amount}}}"#),
                        _ => format!(r#"{{"event_id":"e{i}","customer_id":"c","type":"engagement","timestamp":{ts},"action":"{}"}}"#, if matches!(step, Step::Engage(_, true)) { "click" } else { "open" }),
                    };
                    let ev = decode(json.as_bytes()).unwrap();
                    let mut out = Vec::new();
                    engine.apply_at(&mut c, &ev, Clock::Event { watermark: clock }, &mut out).unwrap();
                    clock = clock.max(c.state.last_seen);
                    prop_assert_eq!(engine.memberships(&c), engine.evaluate_all(&c.state, clock), "after {}", json);
                }
                Step::Wait(_) if c.state.last_seen == microseg::state::NO_TIME => {}
                Step::Wait(d) => {
                    let target = clock + d;
                    let mut out = Vec::new();
                    let mut m = engine.memberships(&c);
                    engine.advance(&mut c, target, &mut out);
                    // Group by instant: just before each, the old memberships held; at it, the new.
                    let mut i = 0;
                    while i < out.len() {
                        let at = out[i].at;
                        let j = out[i..].iter().position(|x| x.at != at).map_or(out.len(), |k| i + k);
                        prop_assert!(out[i..j].iter().all(|x| x.by_timer));
                        prop_assert_eq!(&engine.evaluate_all(&c.state, at - 1), &m, "before the flip at {}", at);
                        apply_changes(&rules, &mut m, &out[i..j]);
                        prop_assert_eq!(&engine.evaluate_all(&c.state, at), &m, "at the flip {}", at);
                        i = j;
                    }
                    clock = target;
                    prop_assert_eq!(engine.memberships(&c), engine.evaluate_all(&c.state, clock), "no flip missed up to {}", clock);
                    prop_assert!(c.timer > clock);
                }
            }
        }
    }
}
