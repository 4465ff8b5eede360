//! The customers of one input partition, each at a fixed *slot*.
//!
//! This module owns where customers live in memory. Customers sit side by side with their
//! ids in chunks that never move ([`CHUNK`] entries each), and a hash table of slots (with
//! 32 bits of the id's hash: 8 bytes an entry) finds a customer by id: a probe compares the
//! id stored with the customer, on the cache lines the event then reads anyway. Everything
//! else that names a customer many times (the partition's timer index, the changelog's list
//! of changed customers) holds the slot, so firing a timer reaches its customer without
//! hashing the id.
//!
//! Against one map of boxed customers keyed by id (BENCHMARKS.md, tenth session), a
//! customer costs its entry (216 bytes then, 160 now; chunks are sized to an allocator class,
//! so no rounding) and about 14 bytes of table, instead of 192 bytes of box, a 32-byte map
//! entry at half load and 32-byte timer entries.
//!
//! Ids are hashed with the standard library's keyed SipHash: ids come from the input, so a
//! table whose hash an input can predict could be made to degrade.
//!
//! Customers are only removed by a changelog tombstone during a restore; a removed customer's
//! slot is reused by the next one added. Pure: no I/O.

use std::hash::{BuildHasher, RandomState};

use compact_str::CompactString;
use hashbrown::HashTable;

use crate::activity::ActivityBytes;
use crate::engine::Customer;

/// A customer's place in its partition's [`Customers`]: stable while the customer is held.
pub type Slot = u32;

/// Bytes per chunk: a power of two, so a size class of the allocator (mimalloc's classes
/// are four per doubling), which a chunk fills up to one entry's size.
const CHUNK_BYTES: usize = 1 << 18;
/// Entries per chunk (1 638 of 160 bytes). Not a power of two: 1 024 entries of 176 bytes
/// took the next size class up, 192 KiB for 176, and resident memory did not fall when the
/// entry shrank from 192 bytes (BENCHMARKS.md, nineteenth session). A slot's chunk is then a
/// division by this constant, which compiles to a multiplication.
pub const CHUNK: usize = CHUNK_BYTES / std::mem::size_of::<Entry>();

/// A held customer, or a free slot.
type Entry = Option<(CompactString, Customer)>;

/// An index entry: the slot, and 32 bits of its id's hash. The table's hash is derived from
/// those bits ([`spread`]), so growing the table rehashes without reading any entry (before,
/// each growth read every id again, a cache miss each, and hashed it: 5 % of a restore), and a
/// probe reads an entry only when those bits match.
type Indexed = (Slot, u32);

/// The 32 bits of an id's hash kept in the index.
fn short_hash(hasher: &RandomState, id: &str) -> u32 {
    hasher.hash_one(id) as u32
}

/// The table's 64-bit hash from the 32 bits kept: the table takes its bucket from the low
/// bits and a tag from the top 7, so both must depend on all 32.
fn spread(h: u32) -> u64 {
    (h as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Bytes held by customers, by what holds them ([`Customers::held`]): the sizes asked of the
/// allocator, so neither its rounding to size classes nor partly used pages are in them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Held {
    pub customers: usize,
    /// The entries: each customer's id (inline up to 24 bytes) and struct, free slots too.
    pub entries: usize,
    /// The hash table of slots.
    pub index: usize,
    /// Ids too long to be kept inline.
    pub long_ids: usize,
    /// The activity buffers (rule words, attributes, counts, windows' entries, recent ids),
    /// by part.
    pub activity: ActivityBytes,
}

impl Held {
    /// Every byte counted.
    pub fn total(&self) -> usize {
        let a = &self.activity;
        self.entries
            + self.index
            + self.long_ids
            + a.counts
            + a.purchases
            + a.engagements
            + a.recent_ids
            + a.spare
            + a.attributes
            + a.rule_words
    }
}

impl std::ops::AddAssign for Held {
    fn add_assign(&mut self, o: Self) {
        self.customers += o.customers;
        self.entries += o.entries;
        self.index += o.index;
        self.long_ids += o.long_ids;
        self.activity += o.activity;
    }
}

/// One partition's customers (see the module docs).
#[derive(Default)]
pub struct Customers {
    hasher: RandomState,
    index: HashTable<Indexed>,
    chunks: Vec<Vec<Entry>>,
    /// Slots freed by removals, reused first.
    free: Vec<Slot>,
    len: usize,
    /// Per chunk, the bytes its customers' allocations held when it was last measured
    /// ([`Customers::approx_bytes`]); the next chunk to measure.
    measured: Vec<usize>,
    next_measure: usize,
}

impl std::fmt::Debug for Customers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Customers({})", self.len)
    }
}

/// The chunk and the place in it of `slot`.
fn place(slot: Slot) -> (usize, usize) {
    (slot as usize / CHUNK, slot as usize % CHUNK)
}

fn entry(chunks: &[Vec<Entry>], slot: Slot) -> Option<&(CompactString, Customer)> {
    let (ch, i) = place(slot);
    chunks.get(ch)?.get(i)?.as_ref()
}

fn entry_mut(chunks: &mut [Vec<Entry>], slot: Slot) -> Option<&mut Entry> {
    let (ch, i) = place(slot);
    chunks.get_mut(ch)?.get_mut(i)
}

/// Whether an index entry is customer `id`'s, whose short hash is `h`: the entry is read only
/// when the hash bits match.
fn is<'a>(chunks: &'a [Vec<Entry>], h: u32, id: &'a str) -> impl Fn(&Indexed) -> bool + 'a {
    move |&(s, hs)| hs == h && entry(chunks, s).is_some_and(|(held, _)| held == id)
}

impl Customers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The slot of customer `id`, if held.
    pub fn find(&self, id: &str) -> Option<Slot> {
        let h = short_hash(&self.hasher, id);
        self.index
            .find(spread(h), is(&self.chunks, h, id))
            .map(|&(s, _)| s)
    }

    pub fn get(&self, slot: Slot) -> Option<&Customer> {
        entry(&self.chunks, slot).map(|(_, c)| c)
    }

    /// The id of the customer at `slot`.
    pub fn id(&self, slot: Slot) -> Option<&CompactString> {
        entry(&self.chunks, slot).map(|(id, _)| id)
    }

    /// The id and the customer at `slot`.
    pub fn get_mut(&mut self, slot: Slot) -> Option<(&CompactString, &mut Customer)> {
        entry_mut(&mut self.chunks, slot)?
            .as_mut()
            .map(|(id, c)| (&*id, c))
    }

    /// Customer `id` by id.
    pub fn get_by_id(&self, id: &str) -> Option<&Customer> {
        self.find(id).and_then(|s| self.get(s))
    }

    /// Adds or replaces customer `id`. Returns its slot and the customer it replaced.
    pub fn insert(&mut self, id: CompactString, c: Customer) -> (Slot, Option<Customer>) {
        if let Some(slot) = self.find(&id) {
            let old = self
                .get_mut(slot)
                .map(|(_, held)| std::mem::replace(held, c));
            return (slot, old);
        }
        (self.add(id, c), None)
    }

    /// Adds customer `id`, which the caller has just looked for and not found ([`find`]
    /// again would only cost another probe). Returns its slot.
    ///
    /// [`find`]: Customers::find
    pub fn add(&mut self, id: CompactString, c: Customer) -> Slot {
        debug_assert!(self.find(&id).is_none(), "{id} is held already");
        let h = short_hash(&self.hasher, &id);
        let slot = match self.free.pop() {
            Some(slot) => {
                if let Some(e) = entry_mut(&mut self.chunks, slot) {
                    *e = Some((id, c));
                }
                slot
            }
            None => {
                if self.chunks.last().is_none_or(|ch| ch.len() == CHUNK) {
                    self.chunks.push(Vec::with_capacity(CHUNK));
                }
                let n = self.chunks.len() - 1;
                let last = &mut self.chunks[n];
                last.push(Some((id, c)));
                (n * CHUNK + last.len() - 1) as Slot
            }
        };
        self.index
            .insert_unique(spread(h), (slot, h), |&(_, hs)| spread(hs));
        self.len += 1;
        slot
    }

    /// Removes customer `id`; its slot is free for the next one added.
    pub fn remove(&mut self, id: &str) -> Option<Customer> {
        let (slot, c) = self.remove_keeping_slot(id)?;
        self.release(slot);
        Some(c)
    }

    /// Removes customer `id` and returns its slot, which stays empty, given to no other
    /// customer, until [`Customers::release`]: for a caller that still names the customer by
    /// that slot elsewhere (a restore's list of customers ahead of its checkpoint).
    pub fn remove_keeping_slot(&mut self, id: &str) -> Option<(Slot, Customer)> {
        let h = short_hash(&self.hasher, id);
        let found = self
            .index
            .find_entry(spread(h), is(&self.chunks, h, id))
            .ok()?;
        let ((slot, _), _) = found.remove();
        let (_, c) = entry_mut(&mut self.chunks, slot)?.take()?;
        self.len -= 1;
        Some((slot, c))
    }

    /// Makes a slot emptied by [`Customers::remove_keeping_slot`] free for the next customer.
    /// Release a slot once: a slot listed twice would go to two customers. A slot that holds a
    /// customer or was never handed out is ignored.
    pub fn release(&mut self, slot: Slot) {
        debug_assert!(!self.free.contains(&slot), "slot {slot} released twice");
        if matches!(entry_mut(&mut self.chunks, slot), Some(None)) {
            self.free.push(slot);
        }
    }

    /// Every customer held, with its slot and id, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Slot, &CompactString, &Customer)> {
        self.chunks
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(s, e)| e.as_ref().map(|(id, c)| (s as Slot, id, c)))
    }

    /// What the customers hold, by part ([`Held`]), reading every customer: for measurements
    /// (the benchmark), not for a running pipeline (see [`Customers::approx_bytes`]).
    pub fn held(&self) -> Held {
        let mut h = Held {
            customers: self.len,
            entries: self.entry_bytes(),
            index: self.index_bytes(),
            ..Held::default()
        };
        for (_, id, c) in self.iter() {
            if id.is_heap_allocated() {
                h.long_ids += id.len();
            }
            h.activity += c.state.activity.bytes();
        }
        h
    }

    /// Estimated bytes held: the entries (free ones included), the table, and each
    /// customer's allocations (ids too long to fit inline, state, memberships).
    ///
    /// Reading every customer's allocations takes 6–12 ms per million customers (measured),
    /// which the caller (the pipeline's metrics, on the consumer's task) must not spend at
    /// once. So each call measures at most `budget` chunks ([`CHUNK`] customers each), the
    /// ones never measured first and then in turn, and counts the others as they were last
    /// measured: the figure follows the customers' growth a few calls late. Chunks not
    /// measured yet count at the average per slot of those that were.
    pub fn approx_bytes(&mut self, budget: usize) -> usize {
        // Chunks are only ever added, so `measured` never runs past them.
        let n = self.chunks.len();
        let heap_of = |ch: &[Entry]| -> usize {
            ch.iter()
                .flatten()
                .map(|(id, c)| {
                    let id = if id.is_heap_allocated() { id.len() } else { 0 };
                    id + c.state.approx_bytes() - std::mem::size_of::<crate::state::CustomerState>()
                })
                .sum()
        };
        let mut left = budget;
        while left > 0 && self.measured.len() < n {
            let b = heap_of(&self.chunks[self.measured.len()]);
            self.measured.push(b);
            left -= 1;
        }
        let measured = self.measured.len();
        for _ in 0..left.min(measured) {
            let at = self.next_measure % measured;
            self.measured[at] = heap_of(&self.chunks[at]);
            self.next_measure = at + 1;
        }
        let heap = self.measured.iter().sum::<usize>();
        let slots = |chunks: &[Vec<Entry>]| chunks.iter().map(|c| c.len()).sum::<usize>();
        let (seen, unseen) = self.chunks.split_at(measured);
        let heap = heap + (heap * slots(unseen)).checked_div(slots(seen)).unwrap_or(0);
        self.entry_bytes() + self.index_bytes() + heap
    }

    /// Bytes of the entries, free slots included.
    fn entry_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.capacity()).sum::<usize>() * std::mem::size_of::<Entry>()
    }

    /// Bytes of the index (an entry and a control byte per bucket).
    fn index_bytes(&self) -> usize {
        self.index.capacity() * (std::mem::size_of::<Indexed>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// A new customer, told apart by `mark` (kept in its `seq`: see [`mark`]).
    fn customer(mark: i32) -> Customer {
        thread_local! {
            static ENGINE: crate::engine::Engine = crate::engine::Engine::new(
                std::sync::Arc::new(crate::rules::RuleSet::embedded_default()),
            );
        }
        let mut c = ENGINE.with(|e| e.new_customer());
        c.seq = mark as i64 as u64;
        c
    }

    fn mark(c: &Customer) -> i32 {
        c.seq as i32
    }

    #[test]
    fn a_free_slot_costs_no_more_than_a_customer() {
        assert_eq!(
            std::mem::size_of::<Entry>(),
            std::mem::size_of::<(CompactString, Customer)>()
        );
    }

    /// A chunk's block is the allocator's class for it, less than one entry of rounding.
    #[test]
    fn a_chunk_fills_its_size_class() {
        let bytes = CHUNK * std::mem::size_of::<Entry>();
        assert!(crate::alloc::good_size(bytes) - bytes < std::mem::size_of::<Entry>());
    }

    /// `held` counts each part of every customer once, and nothing of a removed one.
    #[test]
    fn held_counts_every_customer_by_part() {
        let mut s = Customers::new();
        let (a, _) = s.insert(CompactString::from("a"), customer(0));
        s.insert(CompactString::from("b"), customer(0));
        let long = "an id too long to be kept inline in the entry";
        let (gone, _) = s.insert(CompactString::from(long), customer(0));
        let (_, c) = s.get_mut(a).unwrap();
        c.state.activity.add_purchase(7, 1, 5);
        c.state.activity.push_recent(42);
        let one = c.state.activity.bytes();
        let words = one.rule_words;
        assert!(words > 0);
        let h = s.held();
        assert_eq!(h.customers, 3);
        assert_eq!(h.long_ids, long.len());
        assert_eq!(h.entries, CHUNK * std::mem::size_of::<Entry>());
        assert!(h.index > 0);
        assert_eq!(h.activity.purchases, one.purchases);
        assert_eq!(h.activity.recent_ids, 8);
        assert_eq!(h.activity.rule_words, 3 * words);
        s.remove_keeping_slot(long).unwrap();
        s.release(gone);
        let h = s.held();
        assert_eq!(
            (h.customers, h.long_ids, h.activity.rule_words),
            (2, 0, 2 * words)
        );
        // Adding a store's figures to themselves doubles every one of them.
        let mut twice = h;
        twice += h;
        let figures = |v: serde_json::Value| match v {
            serde_json::Value::Object(m) => m
                .into_iter()
                .flat_map(|(k, v)| match v {
                    serde_json::Value::Object(inner) => inner.into_iter().collect::<Vec<_>>(),
                    v => vec![(k, v)],
                })
                .map(|(k, v)| (k, v.as_u64()))
                .collect::<Vec<_>>(),
            _ => vec![],
        };
        let json = |h: &Held| serde_json::to_value(h).unwrap();
        let want: Vec<_> = figures(json(&h))
            .into_iter()
            .map(|(k, v)| (k, v.map(|v| 2 * v)))
            .collect();
        assert_eq!(figures(json(&twice)), want);
        assert!(want.len() >= 11, "every part: {want:?}");
        let a = &h.activity;
        assert_eq!(
            h.total(),
            h.entries
                + h.index
                + a.counts
                + a.purchases
                + a.engagements
                + a.recent_ids
                + a.spare
                + a.attributes
                + a.rule_words
        );
    }

    /// The estimate measures at most its budget of chunks per call and catches up with the
    /// customers' growth over the calls; chunks never measured count at the average.
    #[test]
    fn bytes_are_measured_a_few_chunks_per_call() {
        let mut s = Customers::new();
        let n = 2 * CHUNK + CHUNK / 2;
        for k in 0..n {
            s.add(CompactString::from(format!("c{k}")), customer(0));
        }
        // Three chunks, one measured: its average stands for the two others. Customers all
        // alike, so the two halves of the last chunk's entries make no difference.
        let one = s.approx_bytes(1);
        let all = s.approx_bytes(usize::MAX);
        assert_eq!(one, all);
        let ids: Vec<Slot> = (2 * CHUNK..n).map(|k| k as Slot).collect();
        let declared = 4;
        let mut grown = 0;
        for &slot in &ids {
            if let Some((_, c)) = s.get_mut(slot) {
                let before = c.state.activity.capacity_bytes();
                c.state
                    .set_attr(0, declared, Some(crate::state::AttrVal::Num(1.0)));
                grown += c.state.activity.capacity_bytes() - before;
            }
        }
        // Each activity buffer grew by at least a tag word and the number's two words.
        assert!(grown >= 4 * (1 + 2) * ids.len());
        // The round restarts at the first chunk: the grown last one is measured third.
        let mut seen = vec![];
        for _ in 0..3 {
            seen.push(s.approx_bytes(1));
        }
        assert_eq!(seen, vec![all, all, all + grown]);
        assert_eq!(s.approx_bytes(usize::MAX), all + grown);
    }

    #[test]
    fn a_slot_kept_empty_goes_to_no_one_until_released() {
        let mut s = Customers::new();
        let a = s.add("a".into(), customer(1));
        s.add("b".into(), customer(2));
        let (slot, c) = s.remove_keeping_slot("a").unwrap();
        assert_eq!((slot, mark(&c), s.len()), (a, 1, 1));
        assert_eq!((s.get(a).is_none(), s.find("a")), (true, None));
        let c = s.add("c".into(), customer(3));
        assert_ne!(c, a, "not reused while kept");
        s.release(c); // holds a customer: ignored
        s.release(999); // never handed out: ignored
        s.release(a);
        assert_eq!(s.add("d".into(), customer(4)), a);
        assert_eq!(s.add("e".into(), customer(5)), c + 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, i32),
        Remove(u16),
    }

    proptest! {
        /// Against a map by id: the same customers, found at the slots handed out, slots
        /// stable while held and reused after a removal, across chunk boundaries.
        #[test]
        fn behaves_as_a_map_by_id(ops in proptest::collection::vec(
            prop_oneof![
                3 => (0u16..1500, any::<i32>()).prop_map(|(k, p)| Op::Insert(k, p)),
                1 => (0u16..1500).prop_map(Op::Remove),
            ],
            1..3000,
        )) {
            let mut s = Customers::new();
            let mut model: HashMap<String, (Slot, i32)> = HashMap::new();
            let mut most = 0;
            for op in &ops {
                match *op {
                    Op::Insert(k, p) => {
                        let id = format!("customer-{k}");
                        let (slot, old) = s.insert(CompactString::from(id.as_str()), customer(p));
                        let before = model.insert(id, (slot, p));
                        prop_assert_eq!(old.map(|c| mark(&c)), before.map(|b| b.1));
                        if let Some((was, _)) = before {
                            prop_assert_eq!(slot, was, "a held customer keeps its slot");
                        }
                    }
                    Op::Remove(k) => {
                        let id = format!("customer-{k}");
                        prop_assert_eq!(s.remove(&id).map(|c| mark(&c)), model.remove(&id).map(|m| m.1));
                    }
                }
                prop_assert_eq!(s.len(), model.len());
                most = most.max(model.len());
            }
            for (id, (slot, p)) in &model {
                prop_assert_eq!(s.find(id), Some(*slot));
                prop_assert_eq!(s.get(*slot).map(mark), Some(*p));
                prop_assert_eq!(s.get_mut(*slot).map(|(i, _)| i.to_string()), Some(id.clone()));
            }
            prop_assert_eq!(s.find("nobody"), None);
            let listed: HashMap<String, (Slot, i32)> =
                s.iter().map(|(slot, id, c)| (id.to_string(), (slot, mark(c)))).collect();
            prop_assert_eq!(listed, model.clone());
            // Slots are reused: never more entries than the most customers held at once.
            let entries: usize = s.chunks.iter().map(|c| c.len()).sum();
            prop_assert_eq!(entries, most);
            prop_assert_eq!(entries, s.len() + s.free.len());
        }
    }
}
