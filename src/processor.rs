//! The deterministic heart of the pipeline, without Kafka: the assigned partitions, each with
//! its customers ([`Customers`], by slot), its clock (watermark) and its timer index.
//!
//! This module owns *when* things happen. For every input partition it keeps a
//! [`Partition`]:
//!
//! * **Event time** (default): each input topic's newest event time on the partition is
//!   tracked; the watermark is the smallest of them over the topics heard from within
//!   `idle_timeout_ms` (wall clock), minus `allowed_lateness_ms`, and never goes back. When
//!   every topic of the partition has been silent for `idle_timeout_ms`, event time follows
//!   the wall clock from the newest event on (newest event time + wall time since it
//!   arrived), so a quiet partition's timers still fire. As long as input keeps flowing, the
//!   watermark depends only on the input, so a replay gives byte-identical output.
//! * **Processing time**: the wall clock; timers fire at the next tick after they are due.
//!
//! The timer index ([`TimerIndex`]) holds one entry per customer with a timer, `(due,
//! customer)`, and hands them out in due order, ties by customer id, so firing never scans
//! customers that are not due and reaches each one by its slot. Before an event is applied,
//! every timer the event's watermark makes due fires (they happened before it); then the
//! event is applied under the new watermark.
//!
//! It also owns what the changelog needs: the list of customers changed since their last
//! record, with each record's body encoded at the customer's first change while its state is
//! in cache ([`Processor::changelog`] adds the headers and hands the records out in one
//! buffer, with the partition's checkpoint), and the rebuild from those records
//! ([`Processor::restorer`]). A customer restored from a
//! record newer than the partition's checkpoint (a commit interval cut short by a crash)
//! skips replayed input its state already reflects ([`Applied::Reflected`]), so a replay
//! from the checkpoint neither applies an event twice nor emits a change twice with another
//! payload.
//!
//! Pure apart from reading the wall clock the caller passes in: the pipeline calls it with
//! real time, the tests with a controlled one.

use std::collections::HashMap;

use compact_str::CompactString;
use dashmap::DashMap;

use crate::changelog::{self, Checkpoint, CodecError, CHECKPOINT_KEY};
use crate::config::{ClockMode, TimeConfig};
use crate::engine::{Applied, Change, Clock, Customer, Engine};
use crate::event::Event;
use crate::state::{Rejected, NEVER, NO_TIME};
use crate::store::{Customers, Slot};
use crate::timer_index::TimerIndex;

/// One change of one customer.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted<'r> {
    pub customer_id: CompactString,
    pub change: Change<'r>,
}

#[derive(Debug, Clone, Copy)]
struct TopicTime {
    /// Newest event time seen on this topic's partition (`NO_TIME`: none yet).
    max_ts: i64,
    /// Wall time that event arrived.
    wall: i64,
}

/// One input partition: its customers, clock, timers and changelog bookkeeping.
#[derive(Debug)]
pub struct Partition {
    /// The partition's customers (input topics are co-partitioned by customer id, so a
    /// customer belongs to one partition).
    customers: Customers,
    topics: Vec<TopicTime>,
    watermark: i64,
    timers: TimerIndex,
    log: ChangeLog,
    /// Customers restored from a record newer than the partition's checkpoint (a commit
    /// interval cut short by a crash) → per input topic, the first offset their state does
    /// not reflect. Replayed input below it is skipped for them.
    reflected: HashMap<CompactString, Box<[i64]>>,
    /// The last checkpoint handed out, to skip writing an unchanged one.
    last_checkpoint: Option<Checkpoint>,
}

/// A partition's changelog bookkeeping: the customers changed since their last record, with
/// their records' bodies.
#[derive(Debug)]
struct ChangeLog {
    /// Customers changed since their last changelog record, each once, in order of their
    /// first change; a customer knows its entry's index ([`Customer::dirty_slot`]), so no set
    /// lookup per event.
    dirty: Vec<Dirty>,
    /// Takes so far (wrapping): a customer's mark ([`Customer::dirty_slot`]) is this in the
    /// top 8 bits and its entry's index in `dirty` below ([`SLOT_BITS`]).
    takes: u8,
    /// What the next take hands out: per entry of `dirty`, its key, room for the record's
    /// header, then its body ([`Dirty`]).
    bodies: Vec<u8>,
    /// The room left for a record's header ([`changelog::header_room`]).
    header_room: usize,
    /// The buffers of a batch already sent ([`Processor::recycle`]), for the next take.
    spare: Option<(Vec<u8>, Vec<changelog::Span>)>,
}

impl Partition {
    fn new(topics: usize, header_room: usize) -> Self {
        Partition {
            customers: Customers::new(),
            topics: vec![
                TopicTime {
                    max_ts: NO_TIME,
                    wall: 0
                };
                topics.max(1)
            ],
            watermark: NO_TIME,
            timers: TimerIndex::new(),
            log: ChangeLog {
                dirty: Vec::new(),
                takes: 0,
                bodies: Vec::new(),
                header_room,
                spare: None,
            },
            reflected: HashMap::new(),
            last_checkpoint: None,
        }
    }

    fn checkpoint(&self, offsets: &[i64]) -> Checkpoint {
        Checkpoint {
            offsets: offsets.to_vec(),
            watermark: self.watermark,
            topics: self.topics.iter().map(|t| (t.max_ts, t.wall)).collect(),
        }
    }

    /// Whether replayed input at `offset` of input `topic` is already in `id`'s state.
    fn reflects(&self, id: &str, topic: usize, offset: i64) -> bool {
        // Empty except right after a crash: no hashing per event then.
        !self.reflected.is_empty()
            && self
                .reflected
                .get(id)
                .and_then(|o| o.get(topic))
                .is_some_and(|next| offset < *next)
    }

    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    fn observe(&mut self, topic: usize, ts: i64, wall: i64) {
        if let Some(t) = self.topics.get_mut(topic) {
            if ts > t.max_ts {
                t.max_ts = ts;
            }
            t.wall = wall;
        }
    }

    /// Recomputes the event-time watermark at wall time `wall` (see the module docs).
    fn update_watermark(&mut self, wall: i64, cfg: &TimeConfig) -> i64 {
        let seen = self.topics.iter().filter(|t| t.max_ts != NO_TIME);
        let active = seen
            .clone()
            .filter(|t| wall - t.wall < cfg.idle_timeout_ms)
            .map(|t| t.max_ts)
            .min();
        let newest = match active {
            Some(ts) => Some(ts),
            None => seen.map(|t| t.max_ts.saturating_add(wall - t.wall)).max(),
        };
        if let Some(n) = newest {
            self.watermark = self
                .watermark
                .max(n.saturating_sub(cfg.allowed_lateness_ms));
        }
        self.watermark
    }
}

impl ChangeLog {
    /// Notes that customer `id` changed. Its first change since the last take lists it and
    /// encodes its record's body now, while its state is in cache (at the take, most
    /// customers' state is not: reading it back then cost more than the engine's work per
    /// event, BENCHMARKS.md). A further change marks that body stale: it is encoded again at
    /// the take, once, however often the customer changes in between.
    fn changed(&mut self, engine: &Engine, id: &str, at: Slot, c: &mut Customer) {
        // Stored inverted, so that a new customer's 0 reads as no entry (all ones).
        let mark = !c.dirty_slot();
        // A mark from an earlier take (most customers, most of the time) is told apart
        // without reading the list or the buffer, both likely out of cache.
        if mark >> SLOT_BITS == self.takes as u32 {
            if let Some(d) = self.dirty.get_mut((mark & SLOT_MASK) as usize) {
                // Takes wrap around every 256: the entry must name this customer.
                if d.at == at {
                    d.end = STALE_BODY;
                    return;
                }
            }
        }
        let key = self.bodies.len();
        self.bodies.extend_from_slice(id.as_bytes());
        let value = self.bodies.len();
        self.bodies.resize(value + self.header_room, 0);
        changelog::encode_body(engine, c, &mut self.bodies);
        // Past 16 M entries the customer is listed again at its next change: two records.
        let slot = u32::try_from(self.dirty.len()).map_or(SLOT_MASK, |s| s.min(SLOT_MASK));
        c.set_dirty_slot(!((self.takes as u32) << SLOT_BITS | slot));
        self.dirty.push(Dirty {
            at,
            key,
            value,
            end: self.bodies.len(),
        });
    }

    /// Hands out the records of the customers changed since the last take (their state
    /// reflecting the input up to `offsets`) and empties the list.
    fn take(
        &mut self,
        engine: &Engine,
        customers: &Customers,
        partition: i32,
        offsets: &[i64],
    ) -> changelog::Batch {
        let mut header = Vec::new();
        changelog::encode_header(engine, partition, offsets, &mut header);
        let (next, mut spans) = self.spare.take().unwrap_or_default();
        let mut bytes = std::mem::replace(&mut self.bodies, next);
        spans.reserve(self.dirty.len() + 1);
        self.takes = self.takes.wrapping_add(1);
        for d in self.dirty.drain(..) {
            let room = d.value + self.header_room;
            let value = if d.end != STALE_BODY && header.len() <= self.header_room {
                // The header goes right before the body.
                let start = room - header.len();
                bytes[start..room].copy_from_slice(&header);
                (start, d.end)
            } else {
                // Changed again since its body was encoded: the record is written now (the
                // old body stays in the buffer, unused).
                let Some(c) = customers.get(d.at) else {
                    continue;
                };
                let start = bytes.len();
                bytes.extend_from_slice(&header);
                changelog::encode_body(engine, c, &mut bytes);
                (start, bytes.len())
            };
            spans.push(changelog::Span {
                key: (d.key, d.value),
                value,
            });
        }
        changelog::Batch::from_parts(bytes, spans)
    }
}

/// Moves customer `id`'s (at `at`) timer from `old` to `new`.
fn reschedule(timers: &mut TimerIndex, at: Slot, id: &CompactString, old: i64, new: i64) {
    if old == new {
        return;
    }
    if old != NEVER {
        timers.remove(old, at, id);
    }
    if new != NEVER {
        timers.insert(new, at, id);
    }
}

/// A customer changed since its last changelog record (see [`ChangeLog::changed`]):
/// in [`ChangeLog::bodies`], its id from `key` to `value`, then the header's room, then
/// its record's body up to `end` (`STALE_BODY`: changed again since, encoded at the take).
#[derive(Debug)]
struct Dirty {
    /// The customer's slot.
    at: Slot,
    key: usize,
    value: usize,
    end: usize,
}

const STALE_BODY: usize = usize::MAX;

/// Chunks of customers ([`crate::store::CHUNK`] each) that one [`Processor::state_bytes`]
/// call measures, over all partitions: about 1.5 ms (BENCHMARKS.md, eleventh session).
pub const STATE_BYTES_BUDGET: usize = 256;

/// The bits of a customer's dirty mark that hold its entry's index; the take count is above.
const SLOT_BITS: u32 = 24;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;

/// A spare buffer up to this size is kept whatever its batch used ([`Processor::recycle`]).
const SPARE_KEPT_ANYWAY: usize = 1 << 20;

/// Where an input message was read: input topic (index in the configuration), partition,
/// offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub topic: usize,
    pub partition: i32,
    pub offset: i64,
}

/// Engine + per-partition customers, clocks and timers.
///
/// The partitions are in a [`DashMap`]: the consumer's task holds one partition's entry for
/// the length of an event, restore workers build their partitions apart and install them
/// when done, and readers (the HTTP API, metrics) look customers up meanwhile, each waiting
/// at most for one event of the partition it reads.
pub struct Processor {
    engine: Engine,
    time: TimeConfig,
    topics: usize,
    /// [`changelog::header_room`] for `topics`.
    header_room: usize,
    parts: DashMap<i32, Partition, PartitionHash>,
}

/// Hashes a partition number by one multiplication: every event looks its partition up, and
/// partition numbers come from the broker's assignment, not from the input, so the keyed
/// SipHash (DashMap's default) bought nothing there.
type PartitionHash = std::hash::BuildHasherDefault<PartitionHasher>;

#[derive(Default)]
struct PartitionHasher(u64);

impl std::hash::Hasher for PartitionHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_i32(&mut self, v: i32) {
        // Spread into the high bits too: DashMap picks the shard from them.
        self.0 = (v as u32 as u64 ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Counts of what a call did, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fired {
    pub timers: u64,
    pub new_customers: u64,
}

impl Processor {
    pub fn new(engine: Engine, time: &TimeConfig, topics: usize) -> Self {
        Processor {
            header_room: changelog::header_room(&engine, topics.max(1)),
            engine,
            time: time.clone(),
            topics,
            parts: DashMap::default(),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The partitions held, in order.
    fn partitions(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.parts.iter().map(|p| *p.key()).collect();
        v.sort_unstable();
        v
    }

    /// A copy of customer `id`'s state, if held: a copy, so that no partition stays locked
    /// while the caller uses it.
    pub fn customer(&self, id: &str) -> Option<Customer> {
        self.find_customer(id).map(|(_, c)| c)
    }

    /// [`Processor::customer`], with the input partition that holds it.
    pub fn find_customer(&self, id: &str) -> Option<(i32, Customer)> {
        self.parts
            .iter()
            .find_map(|p| Some((*p.key(), p.customers.get_by_id(id)?.clone())))
    }

    /// Customers held, over all partitions.
    pub fn customer_count(&self) -> usize {
        self.parts.iter().map(|p| p.customers.len()).sum()
    }

    /// Calls `f` with every customer held (partition by partition, each under its lock: do
    /// little in `f`).
    pub fn for_each_customer(&self, mut f: impl FnMut(&str, &Customer)) {
        for p in self.partitions() {
            if let Some(part) = self.parts.get(&p) {
                for (_, id, c) in part.customers.iter() {
                    f(id, c);
                }
            }
        }
    }

    /// What the customers hold, by part, over all partitions (reads every customer: for
    /// measurements).
    pub fn held(&self) -> crate::store::Held {
        let mut h = crate::store::Held::default();
        for p in self.parts.iter() {
            h += p.customers.held();
        }
        h
    }

    /// Estimated bytes of the customers held ([`Customers::approx_bytes`]), measuring about
    /// [`STATE_BYTES_BUDGET`] chunks of customers (a millisecond or so) per call: a call
    /// after every customer was added and each chunk measured since is exact.
    pub fn state_bytes(&self) -> usize {
        let per_partition = STATE_BYTES_BUDGET.div_ceil(self.parts.len().max(1));
        self.parts
            .iter_mut()
            .map(|mut p| p.customers.approx_bytes(per_partition))
            .sum()
    }

    /// Processes one decoded event read at `src`, received at wall time `wall` (ms): fires
    /// the timers it makes due, then applies it. Changes are appended to `out` in order
    /// (timers first). A refused event changes nothing but time; replayed input that a
    /// restored customer's state already reflects only moves time ([`Applied::Reflected`]).
    pub fn event<'r>(
        &'r self,
        src: Source,
        ev: &Event<'_>,
        wall: i64,
        out: &mut Vec<Emitted<'r>>,
        fired: &mut Fired,
    ) -> Result<Applied, Rejected> {
        let Source {
            topic,
            partition,
            offset,
        } = src;
        let mut part = self
            .parts
            .entry(partition)
            .or_insert_with(|| Partition::new(self.topics, self.header_room));
        let part = &mut *part;
        let at = match self.time.clock {
            ClockMode::Event => {
                part.observe(topic, ev.ts, wall);
                let w = part.update_watermark(wall, &self.time);
                Clock::Event { watermark: w }
            }
            ClockMode::Processing => Clock::Processing { now: wall },
        };
        let upto = match at {
            Clock::Event { watermark } => watermark,
            Clock::Processing { now } => now,
        };
        self.fire_due(part, upto, out, fired);

        let cid = ev.customer_id.as_ref();
        if part.reflects(cid, topic, offset) {
            return Ok(Applied::Reflected);
        }
        let mut changes = Vec::new();
        let held = part.customers.find(cid);
        let (slot, old, applied) = match held.and_then(|s| Some((s, part.customers.get_mut(s)?))) {
            Some((slot, (_, c))) => {
                c.prefetch();
                let old = c.timer;
                (slot, old, self.engine.apply_at(c, ev, at, &mut changes)?)
            }
            None => {
                // Added only once the event is accepted: a refused first event leaves nothing.
                let mut c = self.engine.new_customer();
                let applied = self.engine.apply_at(&mut c, ev, at, &mut changes)?;
                fired.new_customers += 1;
                (
                    part.customers.add(CompactString::from(cid), c),
                    NEVER,
                    applied,
                )
            }
        };
        let Some((id, c)) = part.customers.get_mut(slot) else {
            return Ok(applied);
        };
        if applied != Applied::Duplicate {
            part.log.changed(&self.engine, id, slot, c);
        }
        reschedule(&mut part.timers, slot, id, old, c.timer);
        fired.timers += changes.iter().filter(|c| c.by_timer).count() as u64;
        if !changes.is_empty() {
            out.extend(changes.into_iter().map(|change| Emitted {
                customer_id: id.clone(),
                change,
            }));
        }
        Ok(applied)
    }

    /// Fires every timer of the partition due at or before `upto`, in (due, customer) order.
    fn fire_due<'r>(
        &'r self,
        part: &mut Partition,
        upto: i64,
        out: &mut Vec<Emitted<'r>>,
        fired: &mut Fired,
    ) {
        let customers = &mut part.customers;
        loop {
            let id_of = |s: Slot| customers.id(s).cloned().unwrap_or_default();
            let Some((due, id, slot)) = part.timers.pop_due(upto, id_of) else {
                return;
            };
            let Some((_, c)) = customers.get_mut(slot) else {
                continue;
            };
            c.prefetch();
            let mut changes = Vec::new();
            self.engine.advance(c, due, &mut changes);
            let next = c.timer;
            part.log.changed(&self.engine, &id, slot, c);
            if next != NEVER {
                part.timers.insert(next, slot, &id);
            }
            fired.timers += 1;
            out.extend(changes.into_iter().map(|change| Emitted {
                customer_id: id.clone(),
                change,
            }));
        }
    }

    /// Advances time without input at wall time `wall`: in event time, the watermarks of
    /// idle partitions; in processing time, the wall clock. Appends `(partition, change)`.
    pub fn tick<'r>(&'r self, wall: i64, out: &mut Vec<(i32, Emitted<'r>)>) -> Fired {
        let mut fired = Fired::default();
        for p in self.partitions() {
            let Some(mut part) = self.parts.get_mut(&p) else {
                continue;
            };
            let upto = match self.time.clock {
                ClockMode::Event => part.update_watermark(wall, &self.time),
                ClockMode::Processing => wall,
            };
            let mut changes = Vec::new();
            self.fire_due(&mut part, upto, &mut changes, &mut fired);
            out.extend(changes.into_iter().map(|e| (p, e)));
        }
        fired
    }

    /// Keeps only the given partitions: their clocks, timers and customers. Returns how many
    /// customers were dropped.
    pub fn retain_partitions(&self, keep: impl Fn(i32) -> bool) -> usize {
        let mut dropped = 0;
        self.parts.retain(|p, part| {
            let kept = keep(*p);
            if !kept {
                dropped += part.customers.len();
            }
            kept
        });
        dropped
    }

    /// Timers currently scheduled, over all partitions.
    pub fn timers_pending(&self) -> usize {
        self.parts.iter().map(|c| c.timers.len()).sum()
    }

    /// A partition's watermark (`NO_TIME` if unknown).
    pub fn watermark(&self, partition: i32) -> i64 {
        self.parts.get(&partition).map_or(NO_TIME, |c| c.watermark)
    }

    /// The changelog records due for `partition`, whose state reflects its input up to
    /// `offsets` (per input topic, the next offset to process): the latest record of every
    /// customer changed since the last call, then the partition's checkpoint (key
    /// [`CHECKPOINT_KEY`]) if anything moved. Marks those customers clean.
    pub fn changelog(&self, partition: i32, offsets: &[i64]) -> changelog::Batch {
        let Some(mut part) = self.parts.get_mut(&partition) else {
            return changelog::Batch::default();
        };
        let part = &mut *part;
        let mut out = part
            .log
            .take(&self.engine, &part.customers, partition, offsets);
        let cp = part.checkpoint(offsets);
        part.reflected
            .retain(|_, reflected| ahead_of(reflected, offsets));
        if !out.is_empty() || part.last_checkpoint.as_ref() != Some(&cp) {
            let mut bytes = Vec::new();
            cp.encode(&mut bytes);
            out.push(CHECKPOINT_KEY, &bytes);
            part.last_checkpoint = Some(cp);
        }
        out
    }

    /// Takes back a batch of `partition`'s records once they are sent, so that the partition's
    /// next records are written into its buffers. A fresh buffer is fresh pages: zeroing
    /// them on first touch was most of the pipeline's page faults, and growing one copies
    /// it (BENCHMARKS.md). One spare per partition; one much larger than what its batch used
    /// (after a burst) is freed instead.
    pub fn recycle(&self, partition: i32, batch: changelog::Batch) {
        let used = batch.bytes_len();
        let (bytes, spans) = batch.into_buffers();
        if bytes.capacity() > 2 * used.max(SPARE_KEPT_ANYWAY) {
            return;
        }
        if let Some(mut part) = self.parts.get_mut(&partition) {
            part.log.spare.get_or_insert((bytes, spans));
        }
    }

    /// Customers changed since their last changelog record, over all partitions.
    pub fn dirty(&self) -> usize {
        self.parts.iter().map(|c| c.log.dirty.len()).sum()
    }

    /// Starts rebuilding `partition` from its changelog, replacing whatever this instance
    /// held for it (dropped now). Feed every record in log order, then [`Restorer::finish`].
    pub fn restorer(&self, partition: i32) -> Restorer<'_> {
        self.parts.remove(&partition);
        Restorer {
            processor: self,
            partition,
            part: Partition::new(self.topics, self.header_room),
            checkpoint: None,
            pending: Vec::new(),
            offsets: Vec::new(),
            timers: Vec::new(),
            replaced: false,
            emptied: Vec::new(),
            symbols: Default::default(),
        }
    }
}

/// Whether a customer's record reflects input beyond `checkpoint` on some input topic.
fn ahead_of(record: &[i64], checkpoint: &[i64]) -> bool {
    record.iter().zip(checkpoint).any(|(r, c)| r > c)
}

/// Rebuilds one partition from its changelog (see [`Processor::restorer`]).
///
/// Built for speed (a restore holds up the partition's input): per record, a decode, an
/// insert into the partition's own store (not shared with other restorers until
/// [`Restorer::finish`]) and two vector pushes; timers and the replay guard are assembled
/// once at the end.
pub struct Restorer<'p> {
    processor: &'p Processor,
    partition: i32,
    part: Partition,
    checkpoint: Option<Checkpoint>,
    /// Customers whose record may be ahead of the final checkpoint, by slot, in log order,
    /// with an index into `offsets`. Records before a checkpoint are dropped from it when
    /// covered. A slot a tombstone empties is not reused until the end (`emptied`), so a
    /// slot here never names another customer than the one its record restored.
    pending: Vec<(Slot, u32)>,
    /// Slots emptied by tombstones, released for reuse by [`Restorer::finish`].
    emptied: Vec<Slot>,
    /// Distinct source-offset vectors of the records in `pending` (a commit interval's
    /// records share one).
    offsets: Vec<Box<[i64]>>,
    /// `(due, customer)` of every restored timer, in log order.
    timers: Vec<(i64, Slot)>,
    /// A customer was restored twice or removed: `timers` may hold stale entries.
    replaced: bool,
    symbols: changelog::SymbolCache,
}

/// What a restore found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// Customers of the partition now in memory.
    pub customers: u64,
    /// Per input topic, the next offset to process (-1: unknown; consume from the committed
    /// offset). `None`: the changelog held no checkpoint.
    pub offsets: Option<Vec<i64>>,
}

impl Restorer<'_> {
    /// Applies one changelog record (`None` value: a tombstone, the customer is gone).
    pub fn record(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), CodecError> {
        let p = self.processor;
        if key == CHECKPOINT_KEY {
            let cp = Checkpoint::decode(value.unwrap_or(&[]))?;
            for (t, (max_ts, wall)) in self.part.topics.iter_mut().zip(&cp.topics) {
                *t = TopicTime {
                    max_ts: *max_ts,
                    wall: *wall,
                };
            }
            self.part.watermark = cp.watermark;
            // Records before a checkpoint are covered by it, except those of customers
            // written ahead of it: a crash cut the interval short, and the replay that
            // followed wrote this checkpoint before it caught up with them.
            let offsets = &self.offsets;
            self.pending
                .retain(|(_, i)| ahead_of(&offsets[*i as usize], &cp.offsets));
            if self.pending.is_empty() {
                self.offsets.clear();
            }
            self.part.last_checkpoint = Some(cp.clone());
            self.checkpoint = Some(cp);
            return Ok(());
        }
        let id = std::str::from_utf8(key).map_err(|_| CodecError("customer id is not UTF-8"))?;
        let id = CompactString::from(id);
        let Some(bytes) = value else {
            if let Some((slot, _)) = self.part.customers.remove_keeping_slot(&id) {
                self.emptied.push(slot);
                self.replaced = true;
            }
            return Ok(());
        };
        let r = changelog::decode_cached(&p.engine, bytes, &mut self.symbols)?;
        let mut c = r.customer;
        if r.rules_changed {
            let at = c.state.last_seen;
            p.engine.reset_memberships(&mut c, at);
        }
        let timer = c.timer;
        if self.offsets.last().map(|o| &**o) != Some(r.source_offsets.as_slice()) {
            self.offsets.push(r.source_offsets.into_boxed_slice());
        }
        let (slot, old) = self.part.customers.insert(id, c);
        self.pending.push((slot, (self.offsets.len() - 1) as u32));
        self.replaced |= old.is_some();
        if timer != NEVER {
            self.timers.push((timer, slot));
        }
        Ok(())
    }

    /// Installs the partition's clock, timers and replay guard; input may flow from here on.
    pub fn finish(mut self) -> Restored {
        let customers = &self.part.customers;
        self.timers.sort_unstable();
        self.timers.dedup();
        if self.replaced {
            // A customer restored twice left its earlier timer behind, and a tombstone an
            // empty slot.
            self.timers
                .retain(|(due, at)| customers.get(*at).is_some_and(|c| c.timer == *due));
        }
        self.part.timers = TimerIndex::from_timers(std::mem::take(&mut self.timers));
        for (slot, i) in self.pending.drain(..) {
            // An emptied slot: the customer is gone.
            if let Some(id) = self.part.customers.id(slot) {
                self.part
                    .reflected
                    .insert(id.clone(), self.offsets[i as usize].clone());
            }
        }
        for slot in self.emptied.drain(..) {
            self.part.customers.release(slot);
        }
        let offsets = self.checkpoint.map(|c| c.offsets);
        let restored = self.part.customers.len() as u64;
        self.processor.parts.insert(self.partition, self.part);
        Restored {
            customers: restored,
            offsets,
        }
    }
}
