//! A partition's pending timers, `(due, customer)`, handed out in `(due, id)` order.
//!
//! This module owns the timer index's data structure (the processor owns when it is read).
//! An ordered set of every timer (a B-tree over a million 32-byte keys) costs a walk down
//! several levels, most of them cache misses, for each of the three operations an event can
//! make (remove the old instant, insert the new one, pop the due ones). Here timers are
//! grouped by *slot* (`due / SLOT_MS`): each slot is a hash set, so inserting and removing
//! are one hash and one probe, and the few thousand slot numbers sit in a small B-tree that
//! stays in cache. Order is only needed when timers fire: the earliest slot that falls due
//! moves, whole, into a small ordered set (`near`), from which timers pop in `(due, id)`
//! order, the same order as one ordered set of everything; timers added to or removed from
//! that slot (or an earlier one) meanwhile go to `near` too.
//!
//! A customer is named by its [`Slot`] in the partition's store (4 bytes, not a 24-byte id);
//! only `near` holds ids, because ties in `due` are handed out in id order, which does not
//! depend on where a process put its customers (a replay after a restore fires them in the
//! same order).
//!
//! Pure: no I/O, no clock.

use std::collections::{BTreeMap, BTreeSet};

use compact_str::CompactString;

use crate::store::Slot;

/// Width of a slot, in ms (about 17.5 minutes: 82 slots a day, about 7 400 for 90 days).
pub const SLOT_MS: i64 = 1 << 20;

/// A slot's timers. Hashed with foldhash, seeded at random per process: the standard
/// library's SipHash on these 8-byte entries took 1.6 % of the engine's instructions
/// (BENCHMARKS.md, twelfth session). The instants come from the input, so the seed keeps the
/// table's layout unpredictable from it.
type SlotSet = std::collections::HashSet<(u32, Slot), foldhash::fast::RandomState>;

/// A timer ready to be handed out: due, customer id, slot.
pub type Timer = (i64, CompactString, Slot);

/// The slot of an instant.
fn slot(due: i64) -> i64 {
    due.div_euclid(SLOT_MS)
}

/// An instant as its slot's set holds it: the milliseconds into the slot (below 2^20), 4
/// bytes beside the 4-byte customer slot, so an entry takes 8 bytes, not 16.
fn within(due: i64) -> u32 {
    due.rem_euclid(SLOT_MS) as u32
}

/// The instant of an entry of slot `s`.
fn instant(s: i64, within: u32) -> i64 {
    s * SLOT_MS + within as i64
}

/// Pending timers of one partition (see the module docs).
#[derive(Debug, Default)]
pub struct TimerIndex {
    /// Timers of slots after `near_upto`, by slot: `(due within the slot, customer)`.
    slots: BTreeMap<i64, SlotSet>,
    /// Timers of slots up to and including `near_upto`, ordered.
    near: BTreeSet<Timer>,
    /// The last slot moved into `near` (`i64::MIN`: none yet).
    near_upto: i64,
    len: usize,
}

impl TimerIndex {
    pub fn new() -> Self {
        TimerIndex {
            near_upto: i64::MIN,
            ..Default::default()
        }
    }

    /// Builds from `(due, customer)` pairs (duplicates count once). Sorted input (a
    /// restore's) fills each slot's set at its final size, without growing it.
    pub fn from_timers(timers: Vec<(i64, Slot)>) -> Self {
        let mut t = TimerIndex::new();
        let sizes: Vec<(i64, usize)> = timers
            .chunk_by(|a, b| slot(a.0) == slot(b.0))
            .map(|run| (slot(run[0].0), run.len()))
            .collect();
        let mut timers = timers.into_iter();
        for (s, n) in sizes {
            let set = t.slots.entry(s).or_default();
            set.reserve(n);
            for (due, at) in timers.by_ref().take(n) {
                t.len += set.insert((within(due), at)) as usize;
            }
        }
        t
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a timer of the customer at `at` whose id is `id`; false if it was already there.
    pub fn insert(&mut self, due: i64, at: Slot, id: &CompactString) -> bool {
        let s = slot(due);
        let added = if s <= self.near_upto {
            self.near.insert((due, id.clone(), at))
        } else {
            self.slots.entry(s).or_default().insert((within(due), at))
        };
        self.len += added as usize;
        added
    }

    /// Removes a timer (as [`TimerIndex::insert`]); false if it was not there.
    pub fn remove(&mut self, due: i64, at: Slot, id: &CompactString) -> bool {
        let s = slot(due);
        let removed = if s <= self.near_upto {
            // The key must be owned to look it up; cloning an id of up to 24 bytes copies it
            // inline.
            self.near.remove(&(due, id.clone(), at))
        } else {
            match self.slots.get_mut(&s) {
                Some(set) => {
                    let removed = set.remove(&(within(due), at));
                    if set.is_empty() {
                        self.slots.remove(&s);
                    }
                    removed
                }
                None => false,
            }
        };
        self.len -= removed as usize;
        removed
    }

    /// The earliest timer if it is due at or before `upto`, removed. `id_of` names the
    /// customer at a slot (for the order of ties).
    pub fn pop_due(&mut self, upto: i64, id_of: impl Fn(Slot) -> CompactString) -> Option<Timer> {
        loop {
            if let Some((due, _, _)) = self.near.first() {
                // Every timer left in `slots` is in a later slot, so later than this one.
                if *due > upto {
                    return None;
                }
                self.len -= 1;
                return self.near.pop_first();
            }
            // `near` is empty: bring the next slot if any of it can be due.
            let (&s, _) = self.slots.first_key_value()?;
            if s > slot(upto) {
                return None;
            }
            let (s, set) = self.slots.pop_first()?;
            self.near_upto = s;
            self.near.extend(
                set.into_iter()
                    .map(|(w, at)| (instant(s, w), id_of(at), at)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(i64, u8),
        Remove(i64, u8),
        Pop(i64),
    }

    fn instant() -> impl Strategy<Value = i64> {
        // A few slots wide, with ties, slot edges and negative instants.
        prop_oneof![
            -3 * SLOT_MS..5 * SLOT_MS,
            (-3i64..5).prop_map(|s| s * SLOT_MS),
            (-3i64..5).prop_map(|s| s * SLOT_MS - 1),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (instant(), 0u8..6).prop_map(|(d, c)| Op::Insert(d, c)),
            2 => (instant(), 0u8..6).prop_map(|(d, c)| Op::Remove(d, c)),
            2 => instant().prop_map(Op::Pop),
        ]
    }

    proptest! {
        /// Against one ordered set of everything: the same answers, the same pops in the same
        /// order, the same length.
        #[test]
        fn behaves_as_one_ordered_set(
            start in proptest::collection::vec((instant(), 0u8..6), 0..20),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            // Slot numbers in the reverse order of the ids, so that an order by slot shows.
            let id = |c: u8| CompactString::from(format!("c{c}"));
            let at = |c: u8| 10 - c as Slot;
            let id_of = |s: Slot| id(10 - s as u8);
            let mut model: BTreeSet<Timer> = start.iter().map(|&(d, c)| (d, id(c), at(c))).collect();
            let mut sorted: Vec<(i64, Slot)> = start.iter().map(|&(d, c)| (d, at(c))).collect();
            sorted.sort_unstable();
            let mut t = TimerIndex::from_timers(sorted);
            for o in &ops {
                match *o {
                    Op::Insert(d, c) => prop_assert_eq!(t.insert(d, at(c), &id(c)), model.insert((d, id(c), at(c)))),
                    Op::Remove(d, c) => prop_assert_eq!(t.remove(d, at(c), &id(c)), model.remove(&(d, id(c), at(c)))),
                    Op::Pop(upto) => loop {
                        let want = match model.first() {
                            Some((d, _, _)) if *d <= upto => model.pop_first(),
                            _ => None,
                        };
                        let got = t.pop_due(upto, id_of);
                        prop_assert_eq!(&got, &want);
                        if got.is_none() {
                            break;
                        }
                    },
                }
                prop_assert_eq!(t.len(), model.len());
            }
            let rest: Vec<Timer> = std::iter::from_fn(|| t.pop_due(i64::MAX, id_of)).collect();
            prop_assert_eq!(rest, model.into_iter().collect::<Vec<_>>());
            prop_assert!(t.is_empty());
        }
    }
}
