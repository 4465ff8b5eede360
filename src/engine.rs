//! The engine: one event → updated customer → re-evaluated rules → segment changes.
//! Pure: no I/O, no clocks, no Kafka. Runs identically in the Kafka pipeline, the benchmark
//! and the tests.
//!
//! This module owns a customer's memberships and change sequence (`seq`), incremental
//! evaluation and the diff. Incremental evaluation: every rule unit (a segmentation, or an
//! independent segment) has a dependency mask (purchase / engagement / profile / time); an
//! event re-evaluates only the units whose mask contains the event's kind or `time` (the
//! customer's clock moved). A customer's first event evaluates everything.

use serde::Serialize;

use crate::event::{Event, EventKind};
use crate::rules::compile::{deps, val_to_json, Atom, Ctx};
use crate::rules::RuleSet;
use crate::state::{CustomerState, Rejected, NO_TIME};
use std::sync::Arc;

/// "Not in any segment of this segmentation yet."
pub const NO_SEGMENT: u16 = u16::MAX;

/// A customer: state, current memberships and the last change sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct Customer {
    pub state: CustomerState,
    /// The input partition that owns this customer.
    pub partition: i32,
    /// Current segment index per segmentation (`NO_SEGMENT` before the first event).
    pub segment: Box<[u16]>,
    /// Membership bits of the independent segments.
    pub member: Box<[u64]>,
    /// Sequence number of the last change emitted for this customer (0: none yet).
    pub seq: u64,
}

impl Customer {
    pub fn is_member(&self, i: usize) -> bool {
        self.member[i / 64] & (1 << (i % 64)) != 0
    }
    fn set_member(&mut self, i: usize, on: bool) {
        if on {
            self.member[i / 64] |= 1 << (i % 64);
        } else {
            self.member[i / 64] &= !(1 << (i % 64));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Entered,
    Exited,
}

/// One segment change, before it is addressed to a customer and a cause.
#[derive(Debug, Clone, PartialEq)]
pub struct Change<'r> {
    /// Index into `RuleSet::segmentations`, or None for an independent segment.
    pub segmentation: Option<usize>,
    pub segment: &'r str,
    pub kind: ChangeKind,
    /// For a segmentation's `entered`: the segment left (None on first assignment).
    pub previous: Option<&'r str>,
    /// For a segmentation's `exited`: the segment entered instead.
    pub next: Option<&'r str>,
    /// When the change happened (the customer's clock, epoch ms).
    pub at: i64,
    pub seq: u64,
    /// The feature values behind the decision, in rule order.
    pub because: Vec<(&'r str, serde_json::Value)>,
}

/// Every membership of a customer, evaluated from scratch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Memberships {
    pub segment: Vec<u16>,
    pub member: Vec<bool>,
}

/// The engine: compiled rules plus the logic that applies them.
#[derive(Debug, Clone)]
pub struct Engine {
    pub rules: Arc<RuleSet>,
}

fn kind_bit(k: EventKind) -> u8 {
    match k {
        EventKind::Purchase => deps::PURCHASE,
        EventKind::Engagement => deps::ENGAGEMENT,
        EventKind::Profile => deps::PROFILE,
    }
}

impl Engine {
    pub fn new(rules: Arc<RuleSet>) -> Self {
        Engine { rules }
    }

    pub fn new_customer(&self, partition: i32) -> Customer {
        Customer {
            state: CustomerState::new(&self.rules.state),
            partition,
            segment: vec![NO_SEGMENT; self.rules.segmentations.len()].into_boxed_slice(),
            member: vec![0u64; self.rules.segments.len().div_ceil(64)].into_boxed_slice(),
            seq: 0,
        }
    }

    fn ctx<'a>(&'a self, st: &'a CustomerState, now: i64) -> Ctx<'a> {
        Ctx {
            state: st,
            cfg: &self.rules.state,
            syms: &self.rules.symbols,
            now,
        }
    }

    /// Applies one event to a customer and appends the resulting changes to `out`.
    /// A refused event (e.g. an attribute of the wrong type) changes nothing.
    pub fn apply<'r>(
        &'r self,
        c: &mut Customer,
        ev: &Event<'_>,
        out: &mut Vec<Change<'r>>,
    ) -> Result<(), Rejected> {
        CustomerState::validate(&self.rules.state, ev)?;
        let first = c.state.last_seen == NO_TIME;
        c.state.apply(&self.rules.state, &self.rules.symbols, ev);
        let mask = if first {
            u8::MAX
        } else {
            kind_bit(ev.kind()) | deps::TIME
        };
        let now = c.state.last_seen;
        self.evaluate(c, mask, now, out);
        Ok(())
    }

    /// Re-evaluates the rule units whose dependencies intersect `mask` at time `now`, and
    /// records and appends every change.
    pub fn evaluate<'r>(&'r self, c: &mut Customer, mask: u8, now: i64, out: &mut Vec<Change<'r>>) {
        let rules = &*self.rules;
        for (si, seg) in rules.segmentations.iter().enumerate() {
            let current = c.segment[si];
            if current != NO_SEGMENT && seg.deps & mask == 0 {
                continue;
            }
            let cx = self.ctx(&c.state, now);
            let winner = seg
                .segments
                .iter()
                .position(|r| r.expr.eval_bool(&cx))
                .unwrap_or(seg.default_index()) as u16;
            if winner == current {
                continue;
            }
            let evaluated = &seg.segments[..(winner as usize + 1).min(seg.segments.len())];
            let because =
                self.because(evaluated.iter().flat_map(|r| r.atoms.iter()), &c.state, now);
            let new_name = seg.segment_name(winner as usize);
            if current != NO_SEGMENT {
                c.seq += 1;
                out.push(Change {
                    segmentation: Some(si),
                    segment: seg.segment_name(current as usize),
                    kind: ChangeKind::Exited,
                    previous: None,
                    next: Some(new_name),
                    at: now,
                    seq: c.seq,
                    because: because.clone(),
                });
            }
            c.seq += 1;
            out.push(Change {
                segmentation: Some(si),
                segment: new_name,
                kind: ChangeKind::Entered,
                previous: (current != NO_SEGMENT).then(|| seg.segment_name(current as usize)),
                next: None,
                at: now,
                seq: c.seq,
                because,
            });
            c.segment[si] = winner;
        }
        for (i, rule) in rules.segments.iter().enumerate() {
            if rule.deps & mask == 0 {
                continue;
            }
            let holds = rule.expr.eval_bool(&self.ctx(&c.state, now));
            if holds == c.is_member(i) {
                continue;
            }
            c.set_member(i, holds);
            c.seq += 1;
            out.push(Change {
                segmentation: None,
                segment: &rule.name,
                kind: if holds {
                    ChangeKind::Entered
                } else {
                    ChangeKind::Exited
                },
                previous: None,
                next: None,
                at: now,
                seq: c.seq,
                because: self.because(rule.atoms.iter(), &c.state, now),
            });
        }
    }

    /// The values of the given atoms, deduplicated by text, in order.
    pub fn because<'r>(
        &'r self,
        atoms: impl Iterator<Item = &'r Atom>,
        st: &CustomerState,
        now: i64,
    ) -> Vec<(&'r str, serde_json::Value)> {
        let cx = self.ctx(st, now);
        let mut out: Vec<(&'r str, serde_json::Value)> = Vec::new();
        for a in atoms {
            if !out.iter().any(|(t, _)| *t == a.text) {
                out.push((
                    a.text.as_str(),
                    val_to_json(a.expr.eval(&cx), &self.rules.symbols),
                ));
            }
        }
        out
    }

    /// Every membership evaluated from scratch at `now` (for queries and as the reference the
    /// incremental path is tested against).
    pub fn evaluate_all(&self, st: &CustomerState, now: i64) -> Memberships {
        let cx = self.ctx(st, now);
        Memberships {
            segment: self
                .rules
                .segmentations
                .iter()
                .map(|s| {
                    s.segments
                        .iter()
                        .position(|r| r.expr.eval_bool(&cx))
                        .unwrap_or(s.default_index()) as u16
                })
                .collect(),
            member: self
                .rules
                .segments
                .iter()
                .map(|r| r.expr.eval_bool(&cx))
                .collect(),
        }
    }

    /// The customer's current memberships as recorded by incremental evaluation.
    pub fn memberships(&self, c: &Customer) -> Memberships {
        Memberships {
            segment: c.segment.to_vec(),
            member: (0..self.rules.segments.len())
                .map(|i| c.is_member(i))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;

    const RULES: &str = r#"
[attributes]
industry = "string"
company_size = "number"

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
name = "enterprise_finance"
when = 'attr.industry == "finance" && attr.company_size > 500'

[[segment]]
name = "frequent"
when = "purchases.count_30d >= 3"
"#;

    fn engine() -> Engine {
        Engine::new(Arc::new(RuleSet::from_toml("t.toml", RULES).unwrap()))
    }

    fn run<'r>(e: &'r Engine, c: &mut Customer, json: &str) -> Vec<Change<'r>> {
        let mut out = Vec::new();
        e.apply(c, &decode(json.as_bytes()).unwrap(), &mut out)
            .unwrap();
        out
    }

    fn purchase(day: i64) -> String {
        format!(
            r#"{{"customer_id":"c","type":"purchase","timestamp":{},"amount":10}}"#,
            day * crate::time::DAY_MS
        )
    }

    #[test]
    fn first_event_assigns_default_and_purchases_move_segments() {
        let e = engine();
        let mut c = e.new_customer(0);
        let ch = run(
            &e,
            &mut c,
            r#"{"customer_id":"c","type":"engagement","timestamp":0,"action":"login"}"#,
        );
        assert_eq!(ch.len(), 1);
        assert_eq!(
            (ch[0].segment, ch[0].kind, ch[0].previous, ch[0].seq),
            ("prospect", ChangeKind::Entered, None, 1)
        );

        let ch = run(&e, &mut c, &purchase(1));
        assert_eq!(ch.len(), 2, "{ch:?}");
        assert_eq!(
            (ch[0].segment, ch[0].kind, ch[0].next),
            ("prospect", ChangeKind::Exited, Some("active"))
        );
        assert_eq!(
            (ch[1].segment, ch[1].kind, ch[1].previous, ch[1].seq),
            ("active", ChangeKind::Entered, Some("prospect"), 3)
        );
        assert_eq!(
            ch[1].because,
            vec![
                ("purchases.count", serde_json::json!(1)),
                ("days_since(purchases.last)", serde_json::json!(0)),
                ("purchases.count_30d", serde_json::json!(1))
            ]
        );

        run(&e, &mut c, &purchase(2));
        let ch = run(&e, &mut c, &purchase(3));
        assert_eq!(ch.len(), 1);
        assert_eq!(
            (ch[0].segmentation, ch[0].segment, ch[0].kind),
            (None, "frequent", ChangeKind::Entered)
        );
        assert_eq!(c.seq, 4);
    }

    #[test]
    fn time_dependent_rules_are_correct_at_each_event() {
        let e = engine();
        let mut c = e.new_customer(0);
        run(&e, &mut c, &purchase(0));
        // 70 days later an engagement arrives: the lapse is seen then, and the window count
        // (a purchase-and-time feature) is re-evaluated too.
        let ch = run(
            &e,
            &mut c,
            r#"{"customer_id":"c","type":"engagement","timestamp":6048000000,"action":"login"}"#,
        );
        let names: Vec<_> = ch.iter().map(|c| (c.segment, c.kind)).collect();
        assert_eq!(
            names,
            vec![
                ("active", ChangeKind::Exited),
                ("lapsed", ChangeKind::Entered)
            ]
        );
        assert_eq!(
            ch[1].because[1],
            ("days_since(purchases.last)", serde_json::json!(70))
        );
    }

    #[test]
    fn profile_only_touches_profile_rules() {
        let e = engine();
        let mut c = e.new_customer(0);
        run(&e, &mut c, &purchase(0));
        let ch = run(
            &e,
            &mut c,
            r#"{"customer_id":"c","type":"profile","timestamp":0,"attributes":{"industry":"finance","company_size":900}}"#,
        );
        assert_eq!(ch.len(), 1);
        assert_eq!(
            (ch[0].segment, ch[0].kind),
            ("enterprise_finance", ChangeKind::Entered)
        );
        let ch = run(
            &e,
            &mut c,
            r#"{"customer_id":"c","type":"profile","timestamp":0,"attributes":{"company_size":100}}"#,
        );
        assert_eq!(
            (ch[0].segment, ch[0].kind),
            ("enterprise_finance", ChangeKind::Exited)
        );
        assert_eq!(
            ch[0].because,
            vec![
                ("attr.industry", serde_json::json!("finance")),
                ("attr.company_size", serde_json::json!(100))
            ]
        );
    }

    #[test]
    fn rejected_event_changes_nothing() {
        let e = engine();
        let mut c = e.new_customer(0);
        run(&e, &mut c, &purchase(0));
        let before = c.clone();
        let mut out = Vec::new();
        let ev = decode(br#"{"customer_id":"c","type":"profile","timestamp":5,"attributes":{"company_size":"huge"}}"#).unwrap();
        assert!(e.apply(&mut c, &ev, &mut out).is_err());
        assert!(out.is_empty());
        assert_eq!(c, before);
    }
}
