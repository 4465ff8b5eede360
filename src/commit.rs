//! What is safe to commit, and when.
//!
//! This module owns the bookkeeping behind the at-least-once guarantee, as pure data
//! structures that the pipeline feeds with what it processed and with the producer's delivery
//! reports:
//!
//! * [`Progress`]: per input partition, the next offset to process and, for every input
//!   offset whose output (changes, dead letters) is not delivered yet, how many records are in
//!   flight. An input offset is safe to commit once everything before it is delivered.
//! * [`CommitCycle`]: the commit interval without stopping consumption. At a tick the pipeline
//!   *takes* the changelog records of the customers changed since the last interval and each
//!   partition's checkpoint (they reflect the input processed so far, up to the cycle's
//!   offsets). They are *sent* only once every output caused by input before those offsets is
//!   delivered, since a restored state must never be ahead of the output it caused; the offsets
//!   are *committed* once the changelog is delivered. Input keeps flowing meanwhile; what it
//!   changes goes into the next cycle.

use std::collections::{BTreeMap, HashMap};

/// Where an output record came from: (input topic index, partition, offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePos {
    pub topic: u16,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug)]
pub(crate) struct PartProgress {
    /// Next offset to process (last processed + 1); -1 before any.
    pub(crate) next: i64,
    /// Input offsets with undelivered output → number of outputs in flight.
    inflight: BTreeMap<i64, u32>,
    /// Last committed offset.
    committed: i64,
}

/// Processed and delivered positions per input partition.
#[derive(Debug, Default)]
pub struct Progress {
    pub(crate) parts: HashMap<(u16, i32), PartProgress>,
    /// Changelog records produced and not yet delivered.
    pub(crate) changelog_inflight: u64,
    /// Why the pipeline must stop (a delivery failed for good), once known.
    pub(crate) failed: Option<String>,
}

impl Progress {
    pub(crate) fn part(&mut self, topic: u16, partition: i32) -> &mut PartProgress {
        self.parts
            .entry((topic, partition))
            .or_insert(PartProgress {
                next: -1,
                inflight: BTreeMap::new(),
                committed: -1,
            })
    }

    /// Records that an input message was processed and produced `outputs` records.
    pub(crate) fn processed(&mut self, pos: SourcePos, outputs: u32) {
        let p = self.part(pos.topic, pos.partition);
        p.next = p.next.max(pos.offset + 1);
        if outputs > 0 {
            *p.inflight.entry(pos.offset).or_default() += outputs;
        }
    }

    /// Whether this input was already applied to the state this instance holds (a
    /// redelivery after a rebalance that kept the partition here, a failed commit, or input
    /// below a restored checkpoint).
    pub(crate) fn already_applied(&self, pos: SourcePos) -> bool {
        self.parts
            .get(&(pos.topic, pos.partition))
            .is_some_and(|p| pos.offset < p.next)
    }

    pub(crate) fn delivered(&mut self, pos: SourcePos) {
        let p = self.part(pos.topic, pos.partition);
        if let Some(n) = p.inflight.get_mut(&pos.offset) {
            *n -= 1;
            if *n == 0 {
                p.inflight.remove(&pos.offset);
            }
        }
    }

    /// Offsets safe to commit that are newer than what was committed.
    pub(crate) fn committable(&self) -> Vec<((u16, i32), i64)> {
        self.parts
            .iter()
            .filter_map(|(k, p)| {
                let off = p.inflight.keys().next().copied().unwrap_or(p.next);
                (off > p.committed && off >= 0).then_some((*k, off))
            })
            .collect()
    }

    pub(crate) fn mark_committed(&mut self, offsets: &[((u16, i32), i64)]) {
        for (k, off) in offsets {
            if let Some(p) = self.parts.get_mut(k) {
                p.committed = p.committed.max(*off);
            }
        }
    }

    /// After a commit that failed: the partition's offsets are committed again next time.
    pub(crate) fn commit_failed(&mut self, k: (u16, i32)) {
        if let Some(p) = self.parts.get_mut(&k) {
            p.committed = -1;
        }
    }

    /// Per input topic, the next offset to process on `partition` (-1: none read).
    pub(crate) fn offsets(&self, partition: i32, topics: usize) -> Vec<i64> {
        (0..topics)
            .map(|t| {
                self.parts
                    .get(&(t as u16, partition))
                    .map_or(-1, |p| p.next)
            })
            .collect()
    }

    /// The last input processed on a partition (any input topic), to which output of a
    /// timer fired by a tick is attributed.
    pub(crate) fn last_processed(&self, partition: i32) -> Option<SourcePos> {
        self.parts
            .iter()
            .filter(|((_, p), pp)| *p == partition && pp.next > 0)
            .map(|((t, p), pp)| SourcePos {
                topic: *t,
                partition: *p,
                offset: pp.next - 1,
            })
            .min_by_key(|s| (s.offset, s.topic))
    }

    /// Whether every output of the input before `offsets` is delivered.
    pub(crate) fn delivered_before(&self, offsets: &[((u16, i32), i64)]) -> bool {
        offsets.iter().all(|(k, off)| {
            self.parts
                .get(k)
                .and_then(|p| p.inflight.keys().next())
                .is_none_or(|oldest| oldest >= off)
        })
    }

    /// Outputs not yet delivered.
    pub fn in_flight(&self) -> u64 {
        self.parts
            .values()
            .flat_map(|p| p.inflight.values())
            .map(|n| *n as u64)
            .sum()
    }
}

/// An input position per (input topic index, partition).
pub type Offsets = Vec<((u16, i32), i64)>;

/// Changelog records to send, in their customers' input partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogBatch {
    pub partition: i32,
    pub records: crate::changelog::Batch,
}

/// How many records `batches` hold.
pub fn record_count(batches: &[ChangelogBatch]) -> usize {
    batches.iter().map(|b| b.records.len()).sum()
}

#[derive(Debug, Default, PartialEq, Eq)]
enum Stage {
    #[default]
    Idle,
    /// Records taken at a tick, reflecting input up to `offsets`; sent once the output of the
    /// input before `offsets` is delivered.
    Taken {
        records: Vec<ChangelogBatch>,
        offsets: Offsets,
    },
    /// Records sent; `offsets` are committed once the changelog is delivered.
    Sent { offsets: Offsets },
}

/// The non-blocking commit interval: take → send → commit (see the module docs).
#[derive(Debug, Default)]
pub struct CommitCycle {
    stage: Stage,
}

impl CommitCycle {
    /// Whether no cycle is under way (a new one may be taken).
    pub fn idle(&self) -> bool {
        self.stage == Stage::Idle
    }

    /// Starts a cycle with the changelog `records` taken now, which reflect the input up to
    /// `offsets` (per input partition, the next offset to process). Ignored, returning
    /// false, while a cycle is under way: its records must go first.
    pub fn take(&mut self, records: Vec<ChangelogBatch>, offsets: Offsets) -> bool {
        if !self.idle() {
            return false;
        }
        self.stage = Stage::Taken { records, offsets };
        true
    }

    /// The records to send now, if every output of the input they reflect is delivered.
    /// The caller sends them all and counts them in the progress's changelog records in flight.
    pub fn sendable(&mut self, p: &Progress) -> Option<Vec<ChangelogBatch>> {
        let Stage::Taken { offsets, .. } = &self.stage else {
            return None;
        };
        if !p.delivered_before(offsets) {
            return None;
        }
        let Stage::Taken { records, offsets } = std::mem::take(&mut self.stage) else {
            return None;
        };
        self.stage = Stage::Sent { offsets };
        Some(records)
    }

    /// The offsets to commit now, if the changelog is delivered; the cycle is then over.
    /// Only offsets ahead of the last commit, of partitions still held, are returned.
    pub fn committable(&mut self, p: &Progress) -> Option<Offsets> {
        if !matches!(self.stage, Stage::Sent { .. }) || p.changelog_inflight > 0 {
            return None;
        }
        let Stage::Sent { offsets } = std::mem::take(&mut self.stage) else {
            return None;
        };
        Some(
            offsets
                .into_iter()
                .filter(|(k, off)| p.parts.get(k).is_some_and(|pp| *off > pp.committed))
                .collect(),
        )
    }

    /// Ends the cycle for a blocking commit interval, which commits everything itself:
    /// returns the records taken and not sent yet, to be sent before anything newer.
    pub fn take_unsent(&mut self) -> Vec<ChangelogBatch> {
        match std::mem::take(&mut self.stage) {
            Stage::Taken { records, .. } => records,
            _ => Vec::new(),
        }
    }

    /// Forgets what belongs to partitions that moved away (their next owner restores from
    /// what was delivered, and offsets of a partition not held cannot be committed).
    pub fn retain(&mut self, keep: impl Fn(i32) -> bool) {
        match &mut self.stage {
            Stage::Idle => {}
            Stage::Taken { records, offsets } => {
                records.retain(|r| keep(r.partition));
                offsets.retain(|((_, p), _)| keep(*p));
            }
            Stage::Sent { offsets } => offsets.retain(|((_, p), _)| keep(*p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(p: i32, o: i64) -> SourcePos {
        SourcePos {
            topic: 0,
            partition: p,
            offset: o,
        }
    }

    #[test]
    fn commits_stop_at_the_oldest_undelivered_output() {
        let mut pr = Progress::default();
        pr.processed(pos(0, 0), 0);
        pr.processed(pos(0, 1), 2);
        pr.processed(pos(0, 2), 0);
        pr.processed(pos(0, 3), 1);
        assert_eq!(pr.committable(), vec![((0, 0), 1)]);
        pr.delivered(pos(0, 1));
        assert_eq!(
            pr.committable(),
            vec![((0, 0), 1)],
            "one of two outputs still in flight"
        );
        pr.delivered(pos(0, 1));
        assert_eq!(pr.committable(), vec![((0, 0), 3)]);
        pr.delivered(pos(0, 3));
        assert_eq!(pr.committable(), vec![((0, 0), 4)]);
        assert_eq!(pr.offsets(0, 2), vec![4, -1]);
        assert!(
            pr.already_applied(pos(0, 3))
                && !pr.already_applied(pos(0, 4))
                && !pr.already_applied(pos(1, 0))
        );
        pr.mark_committed(&[((0, 0), 4)]);
        assert!(pr.committable().is_empty(), "nothing new to commit");
        assert_eq!(pr.in_flight(), 0);
    }

    fn rec(partition: i32, key: &str) -> ChangelogBatch {
        let mut records = crate::changelog::Batch::default();
        records.push(key.as_bytes(), &[1]);
        ChangelogBatch { partition, records }
    }

    #[test]
    fn a_cycle_sends_after_the_output_it_reflects_and_commits_after_the_changelog() {
        let mut pr = Progress::default();
        pr.processed(pos(0, 0), 1);
        pr.processed(pos(0, 1), 0);
        pr.processed(pos(1, 0), 0);
        let mut c = CommitCycle::default();
        let offsets = vec![((0, 0), 2), ((0, 1), 1)];
        assert!(c.take(vec![rec(0, "a"), rec(1, "b")], offsets.clone()));
        assert!(!c.idle());
        assert!(!c.take(vec![rec(0, "late")], vec![]), "one cycle at a time");
        // Input after the cycle's offsets, with output in flight, does not hold it up.
        pr.processed(pos(0, 2), 1);
        assert_eq!(c.sendable(&pr), None, "offset 0's change is not delivered");
        assert_eq!(c.committable(&pr), None);
        pr.delivered(pos(0, 0));
        assert_eq!(c.sendable(&pr), Some(vec![rec(0, "a"), rec(1, "b")]));
        assert_eq!(c.sendable(&pr), None, "sent once");
        pr.changelog_inflight = 2;
        assert_eq!(c.committable(&pr), None, "changelog in flight");
        pr.changelog_inflight = 0;
        assert_eq!(c.committable(&pr), Some(offsets.clone()));
        assert!(c.idle());
        // A cycle whose offsets were committed already commits nothing again.
        pr.mark_committed(&offsets);
        pr.processed(pos(0, 3), 0);
        assert!(c.take(vec![], vec![((0, 0), 4), ((0, 1), 1)]));
        assert_eq!(c.sendable(&pr), None, "offset 2's change still in flight");
        pr.delivered(pos(0, 2));
        assert_eq!(c.sendable(&pr), Some(vec![]));
        assert_eq!(c.committable(&pr), Some(vec![((0, 0), 4)]));
    }

    #[test]
    fn a_blocking_interval_takes_over_unsent_records_and_moved_partitions_are_forgotten() {
        let mut pr = Progress::default();
        pr.processed(pos(0, 0), 1);
        pr.processed(pos(1, 0), 0);
        let both = vec![((0, 0), 1), ((0, 1), 1)];
        let mut c = CommitCycle::default();
        c.take(vec![rec(0, "a"), rec(1, "b")], both.clone());
        assert_eq!(c.take_unsent(), vec![rec(0, "a"), rec(1, "b")]);
        assert!(c.idle(), "the blocking interval ends the cycle");
        assert_eq!(c.take_unsent(), vec![]);

        // Partition 0 moves away: its records are not sent, its undelivered output no longer
        // holds the cycle up, and its offsets are not committed.
        c.take(vec![rec(0, "a"), rec(1, "b")], both.clone());
        c.retain(|p| p == 1);
        assert_eq!(c.sendable(&pr), Some(vec![rec(1, "b")]));
        assert_eq!(c.take_unsent(), vec![], "sent records are not sent again");
        c.take(vec![], both);
        assert_eq!(c.sendable(&pr), None);
        c.retain(|p| p == 1);
        assert_eq!(c.sendable(&pr), Some(vec![]));
        assert_eq!(c.committable(&pr), Some(vec![((0, 1), 1)]));
    }
}
