//! Prometheus metrics: one registry per engine instance, `microseg_` prefix, no customer ids
//! as labels. Handles for the hot path (per topic, per segment) are resolved once at start.
//!
//! This module owns metric names and their meaning (README "Operations").

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::engine::{Change, ChangeKind};
use crate::rules::RuleSet;

/// Result label of `microseg_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventResult {
    Ok = 0,
    DeadLettered = 1,
    /// Older than the watermark: applied to lifetime aggregates only.
    Late = 2,
    /// Its event id was already applied for the customer: ignored.
    Duplicate = 3,
}

const RESULTS: [&str; 4] = ["ok", "dead_lettered", "late", "duplicate"];

pub struct Metrics {
    pub registry: Registry,
    events: Vec<[IntCounter; 4]>,
    changes: IntCounterVec,
    movements: IntCounterVec,
    members: IntGaugeVec,
    pub customers: IntGauge,
    pub rebalances: IntCounterVec,
    /// Timers fired (each re-evaluates one customer's time-dependent rules).
    pub timers_fired: IntCounter,
    /// Timers scheduled.
    pub timers_pending: IntGauge,
    /// Changes caused by timers (a subset of `changes`).
    pub timer_changes: IntCounter,
    /// Changelog records produced.
    pub changelog_records: IntCounter,
    /// Customers rebuilt from the changelog.
    pub restored_customers: IntCounter,
    /// Customers changed since their last changelog record.
    pub dirty_customers: IntGauge,
    /// Commit intervals completed (output, changelog and offsets committed).
    pub commits: IntCounter,
    /// Duration of the last restore from the changelog.
    pub last_restore_seconds: Gauge,
    /// Input record timestamp → its changes handed to the producer.
    pub change_latency: Histogram,
    /// Messages behind the partition's end, from librdkafka's statistics.
    consumer_lag: IntGaugeVec,
    /// Estimated bytes of customer state held (keys, state, memberships).
    pub state_bytes: IntGauge,
    pub distinct_values: IntGauge,
    segmentation_names: Vec<String>,
    /// Per segmentation, then one for the independent segments: the series a change to one
    /// of them updates, resolved once (a lookup by label values per change hashed the names
    /// and cloned the series each time).
    groups: Vec<Group>,
}

/// A segmentation's (or the independent segments') series.
struct Group {
    /// Changes, entered and exited.
    changes: [IntCounter; 2],
    /// Per segment index (see [`crate::engine::Change::index`]), its size.
    members: Vec<IntGauge>,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are static; a failure here is a programming error caught by tests.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    pub fn new(rules: &RuleSet, topics: &[String]) -> Metrics {
        let registry = Registry::new();
        let events_vec = must(IntCounterVec::new(
            Opts::new(
                "microseg_events_total",
                "Input messages processed, by topic and result (ok, dead_lettered, late, duplicate)",
            ),
            &["topic", "result"],
        ));
        let changes = must(IntCounterVec::new(Opts::new("microseg_changes_total", "Segment changes published, by segmentation (\"\" for independent segments) and change (entered, exited)"), &["segmentation", "change"]));
        let movements = must(IntCounterVec::new(
            Opts::new("microseg_movements_total", "Customers moving between the segments of a segmentation (from is \"\" on first assignment)"),
            &["segmentation", "from", "to"],
        ));
        let members = must(IntGaugeVec::new(
            Opts::new(
                "microseg_segment_members",
                "Customers currently in each segment on this instance",
            ),
            &["segmentation", "segment"],
        ));
        let customers = must(IntGauge::new(
            "microseg_customers",
            "Customers held in memory on this instance",
        ));
        let rebalances = must(IntCounterVec::new(
            Opts::new(
                "microseg_rebalances_total",
                "Consumer group rebalances seen, by kind (assign, revoke)",
            ),
            &["kind"],
        ));
        let timers_fired = must(IntCounter::new(
            "microseg_timers_fired_total",
            "Customer timers fired (time-dependent rules re-evaluated with no event)",
        ));
        let timers_pending = must(IntGauge::new(
            "microseg_timers_pending",
            "Customer timers scheduled on this instance",
        ));
        let timer_changes = must(IntCounter::new(
            "microseg_timer_changes_total",
            "Segment changes caused by time passing (a subset of microseg_changes_total)",
        ));
        let changelog_records = must(IntCounter::new(
            "microseg_changelog_records_total",
            "Changelog records produced (latest state of changed customers, and partition checkpoints)",
        ));
        let restored_customers = must(IntCounter::new(
            "microseg_restored_customers_total",
            "Customers rebuilt from the changelog when partitions were assigned",
        ));
        let dirty_customers = must(IntGauge::new(
            "microseg_changelog_dirty_customers",
            "Customers changed since their last changelog record",
        ));
        let commits = must(IntCounter::new(
            "microseg_commit_intervals_total",
            "Commit intervals completed: output delivered, changelog written, input offsets committed",
        ));
        let last_restore_seconds = must(Gauge::new(
            "microseg_last_restore_seconds",
            "How long the last restore of assigned partitions from the changelog took",
        ));
        let change_latency = must(Histogram::with_opts(
            HistogramOpts::new(
                "microseg_change_latency_seconds",
                "From an input record's timestamp to its segment changes handed to the producer",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
        ));
        let consumer_lag = must(IntGaugeVec::new(
            Opts::new(
                "microseg_consumer_lag_messages",
                "Input messages not yet consumed, per assigned partition (librdkafka statistics)",
            ),
            &["topic", "partition"],
        ));
        let state_bytes = must(IntGauge::new(
            "microseg_state_bytes",
            "Estimated bytes of customer state held on this instance (updated every 5 s, measuring part of the customers each time)",
        ));
        let distinct_values = must(IntGauge::new(
            "microseg_distinct_values",
            "Distinct category, channel, action, plan and string attribute values in the process-wide table (updated every 5 s; it never shrinks until a restart)",
        ));
        for c in [
            Box::new(timers_fired.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(change_latency.clone()),
            Box::new(consumer_lag.clone()),
            Box::new(state_bytes.clone()),
            Box::new(distinct_values.clone()),
            Box::new(commits.clone()),
            Box::new(last_restore_seconds.clone()),
            Box::new(changelog_records.clone()),
            Box::new(restored_customers.clone()),
            Box::new(dirty_customers.clone()),
            Box::new(timer_changes.clone()),
            Box::new(timers_pending.clone()),
            Box::new(events_vec.clone()),
            Box::new(changes.clone()),
            Box::new(movements.clone()),
            Box::new(members.clone()),
            Box::new(customers.clone()),
            Box::new(rebalances.clone()),
        ] {
            must(registry.register(c));
        }
        let events = topics
            .iter()
            .map(|t| RESULTS.map(|r| events_vec.with_label_values(&[t, r])))
            .collect();
        let group = |name: &str, segments: Vec<&str>| Group {
            changes: ["entered", "exited"].map(|k| changes.with_label_values(&[name, k])),
            members: (segments.into_iter())
                .map(|segment| members.with_label_values(&[name, segment]))
                .collect(),
        };
        let groups: Vec<Group> = (rules.segmentations.iter())
            .map(|s| {
                let names = (0..=s.default_index()).map(|i| s.segment_name(i));
                group(&s.name, names.collect())
            })
            .chain(std::iter::once(group(
                "",
                rules.segments.iter().map(|r| r.name.as_str()).collect(),
            )))
            .collect();
        for g in groups.iter().flat_map(|g| &g.members) {
            g.set(0);
        }
        Metrics {
            registry,
            events,
            changes,
            movements,
            members,
            customers,
            rebalances,
            timers_fired,
            timers_pending,
            timer_changes,
            changelog_records,
            restored_customers,
            dirty_customers,
            commits,
            last_restore_seconds,
            change_latency,
            consumer_lag,
            state_bytes,
            distinct_values,
            segmentation_names: rules.segmentations.iter().map(|s| s.name.clone()).collect(),
            groups,
        }
    }

    pub fn event(&self, topic_idx: usize, result: EventResult) {
        if let Some(c) = self.events.get(topic_idx) {
            c[result as usize].inc();
        }
    }

    /// Records one published change: counters, movement matrix and segment sizes.
    pub fn change(&self, ch: &Change<'_>) {
        let seg = ch
            .segmentation
            .map_or("", |i| self.segmentation_names[i].as_str());
        if ch.by_timer {
            self.timer_changes.inc();
        }
        let size = |g: &IntGauge| match ch.kind {
            ChangeKind::Entered => {
                g.inc();
                if ch.segmentation.is_some() {
                    self.movements
                        .with_label_values(&[seg, ch.previous.unwrap_or(""), ch.segment])
                        .inc();
                }
            }
            ChangeKind::Exited => g.dec(),
        };
        let group = self
            .groups
            .get(ch.segmentation.unwrap_or(self.groups.len() - 1));
        match group.and_then(|g| Some((g, g.members.get(ch.index.segment as usize)?))) {
            Some((group, members)) => {
                group.changes[ch.kind as usize].inc();
                size(members);
            }
            // A change whose indexes are not the rule set's (as tests may build): by names.
            None => {
                let kind = match ch.kind {
                    ChangeKind::Entered => "entered",
                    ChangeKind::Exited => "exited",
                };
                self.changes.with_label_values(&[seg, kind]).inc();
                size(&self.members.with_label_values(&[seg, ch.segment]));
            }
        }
    }

    /// Sets every segment's size from the customers held (after a restore or a rebalance,
    /// when customers arrive or leave without changes).
    pub fn recount_members(&self, rules: &RuleSet, processor: &crate::processor::Processor) {
        let mut seg: Vec<Vec<i64>> = rules
            .segmentations
            .iter()
            .map(|s| vec![0; s.segments.len() + 1])
            .collect();
        let mut ind = vec![0i64; rules.segments.len()];
        let counts = crate::engine::RuleCounts::of(rules);
        processor.for_each_customer(|_, c| {
            for (si, i) in c.segments(counts).enumerate() {
                if let Some(n) = seg.get_mut(si).and_then(|v| v.get_mut(i as usize)) {
                    *n += 1;
                }
            }
            for (i, n) in ind.iter_mut().enumerate() {
                if c.is_member(counts, i) {
                    *n += 1;
                }
            }
        });
        for (s, counts) in rules.segmentations.iter().zip(&seg) {
            for (i, n) in counts.iter().enumerate() {
                self.members
                    .with_label_values(&[&s.name, s.segment_name(i)])
                    .set(*n);
            }
        }
        for (r, n) in rules.segments.iter().zip(&ind) {
            self.members.with_label_values(&["", &r.name]).set(*n);
        }
    }

    /// Replaces the consumer lag gauges: `(topic, partition, lag)` of the assigned partitions.
    pub fn set_consumer_lag(&self, lags: &[(String, i32, i64)]) {
        self.consumer_lag.reset();
        for (t, p, lag) in lags {
            self.consumer_lag
                .with_label_values(&[t.as_str(), &p.to_string()])
                .set(*lag);
        }
    }

    /// Current size of a segment (for the demo's display).
    pub fn members(&self, segmentation: &str, segment: &str) -> i64 {
        self.members
            .with_label_values(&[segmentation, segment])
            .get()
    }

    /// Input messages processed, whatever the result.
    pub fn events_processed(&self) -> u64 {
        self.events
            .iter()
            .flat_map(|c| c.iter())
            .map(|c| c.get())
            .sum()
    }

    pub fn events_total(&self, result: EventResult) -> u64 {
        self.events.iter().map(|c| c[result as usize].get()).sum()
    }

    pub fn changes_total(&self, kind: &str) -> u64 {
        let mut n = 0;
        for s in self
            .segmentation_names
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(""))
        {
            n += self.changes.with_label_values(&[s, kind]).get();
        }
        n
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use std::collections::HashMap;
    use std::sync::Arc;

    #[test]
    fn each_change_moves_its_own_segment_series() {
        let rules = Arc::new(RuleSet::embedded_default());
        let e = Engine::new(rules.clone());
        let m = Metrics::new(&rules, &["t".to_string()]);
        let mut g = crate::generate::Generator::new(3, 40, 1_767_225_600_000, 3_600_000);
        // What the series should read, by label values.
        let mut sizes: HashMap<(String, String), i64> = HashMap::new();
        let mut changes: HashMap<(String, &str), u64> = HashMap::new();
        e.replay(&mut g, 2_000, |out| {
            for ch in out {
                m.change(ch);
                let seg = ch.segmentation.map_or("", |i| &rules.segmentations[i].name);
                let (step, kind) = match ch.kind {
                    ChangeKind::Entered => (1, "entered"),
                    ChangeKind::Exited => (-1, "exited"),
                };
                *sizes
                    .entry((seg.to_string(), ch.segment.to_string()))
                    .or_default() += step;
                *changes.entry((seg.to_string(), kind)).or_default() += 1;
            }
        });
        assert!(sizes.len() > 5, "too few segments moved: {sizes:?}");
        for ((seg, segment), n) in &sizes {
            assert_eq!(m.members(seg, segment), *n, "size of {seg}/{segment}");
        }
        for ((seg, kind), n) in &changes {
            let counted = m.changes.with_label_values(&[seg.as_str(), kind]).get();
            assert_eq!(counted, *n, "{kind} changes of {seg:?}");
        }
    }
}
