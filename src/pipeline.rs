//! The Kafka pipeline: consumer group in, engine, producer out, offsets committed only after
//! delivery.
//!
//! This module owns every effect of the running engine: the consumer (one group over the
//! input topics, `range` assignment so co-partitioned topics land together), the producer
//! (idempotent, keyed by customer id), the dead-letter path and the commit protocol:
//!
//! * every output record (change or dead letter) carries the position of the input message
//!   that caused it as its delivery opaque;
//! * a per-partition [`Progress`] tracks processed offsets and in-flight outputs; the
//!   committable offset of a partition is its oldest input offset with undelivered output, or
//!   the next offset to process when nothing is in flight;
//! * offsets are committed on a timer, on revocation (after flushing the producer) and at
//!   shutdown. A delivery that fails for good stops the pipeline without committing past it,
//!   so a restart replays it (at-least-once).
//!
//! What happens to events and time (watermarks, timers) is decided by the Kafka-free
//! [`Processor`]; this module feeds it messages and wall-clock ticks and publishes what it
//! emits. A change caused by a timer is tracked for commits like the output of the input
//! message that made it due (or, for a tick, of the partition's last processed message).
//!
//! Customer state is a `DashMap` shared with readers (the demo, the API); no map reference or
//! lock is ever held across an `.await`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use compact_str::CompactString;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::engine::{Applied, Engine};
use crate::event::decode;
use crate::metrics::{EventResult, Metrics};
use crate::output::{change_json, dlq_headers, Cause};
pub use crate::processor::Store;
use crate::processor::{Emitted, Fired, Processor, Source};
use crate::time::format_rfc3339;

/// Where an output record came from: (input topic index, partition, offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SourcePos {
    topic: u16,
    partition: i32,
    offset: i64,
}

#[derive(Debug, Default)]
struct PartProgress {
    /// Inputs below this offset were processed by an earlier owner: they rebuild state
    /// silently (no output) when this instance takes the partition over.
    restore_until: i64,
    /// Next offset to process (last processed + 1); -1 before any.
    next: i64,
    /// Input offsets with undelivered output → number of outputs in flight.
    inflight: BTreeMap<i64, u32>,
    /// Last committed offset.
    committed: i64,
}

/// Processed and delivered positions per input partition.
#[derive(Debug, Default)]
pub struct Progress {
    parts: HashMap<(u16, i32), PartProgress>,
    failed: Option<String>,
}

impl Progress {
    fn part(&mut self, topic: u16, partition: i32) -> &mut PartProgress {
        self.parts
            .entry((topic, partition))
            .or_insert(PartProgress {
                restore_until: 0,
                next: -1,
                inflight: BTreeMap::new(),
                committed: -1,
            })
    }

    /// Records that an input message was processed and produced `outputs` records.
    fn processed(&mut self, pos: SourcePos, outputs: u32) {
        let p = self.part(pos.topic, pos.partition);
        p.next = p.next.max(pos.offset + 1);
        if outputs > 0 {
            *p.inflight.entry(pos.offset).or_default() += outputs;
        }
    }

    /// Whether this input was already applied to the state this instance holds (a
    /// redelivery after a rebalance that kept the partition here, or a failed commit).
    fn already_applied(&self, pos: SourcePos) -> bool {
        self.parts
            .get(&(pos.topic, pos.partition))
            .is_some_and(|p| pos.offset < p.next)
    }

    /// Whether this input only rebuilds state (it was processed before a restart or by the
    /// partition's previous owner).
    fn restoring(&self, pos: SourcePos) -> bool {
        self.parts
            .get(&(pos.topic, pos.partition))
            .is_some_and(|p| pos.offset < p.restore_until)
    }

    fn delivered(&mut self, pos: SourcePos) {
        let p = self.part(pos.topic, pos.partition);
        if let Some(n) = p.inflight.get_mut(&pos.offset) {
            *n -= 1;
            if *n == 0 {
                p.inflight.remove(&pos.offset);
            }
        }
    }

    /// Offsets safe to commit that are newer than what was committed, restricted to `only`
    /// when given.
    fn committable(&self, only: Option<&HashSet<(u16, i32)>>) -> Vec<((u16, i32), i64)> {
        self.parts
            .iter()
            .filter(|(k, _)| only.is_none_or(|o| o.contains(k)))
            .filter_map(|(k, p)| {
                let off = p.inflight.keys().next().copied().unwrap_or(p.next);
                (off > p.committed && off >= 0).then_some((*k, off))
            })
            .collect()
    }

    fn mark_committed(&mut self, offsets: &[((u16, i32), i64)]) {
        for (k, off) in offsets {
            if let Some(p) = self.parts.get_mut(k) {
                p.committed = p.committed.max(*off);
            }
        }
    }

    /// The last input processed on a partition (any input topic), to which output of a
    /// timer fired by a tick is attributed.
    fn last_processed(&self, partition: i32) -> Option<SourcePos> {
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

    /// Outputs not yet delivered.
    pub fn in_flight(&self) -> u64 {
        self.parts
            .values()
            .flat_map(|p| p.inflight.values())
            .map(|n| *n as u64)
            .sum()
    }
}

/// State shared by the pipeline task and the Kafka callbacks.
struct Shared {
    topics: Vec<String>,
    progress: Mutex<Progress>,
    processor: Processor,
    metrics: Arc<Metrics>,
    /// Input partitions currently assigned, as (topic, partition).
    assigned: Mutex<Vec<(String, i32)>>,
    drain_timeout: Duration,
}

impl Shared {
    /// Index of an input topic (the `topic` of [`SourcePos`]).
    fn topic_index(&self, topic: &str) -> Option<u16> {
        self.topics
            .iter()
            .position(|t| t == topic)
            .map(|i| i as u16)
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Producer callbacks: delivery reports advance [`Progress`].
struct ProducerCtx {
    shared: Arc<Shared>,
}

impl ClientContext for ProducerCtx {}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = Box<SourcePos>;

    fn delivery(&self, result: &DeliveryResult<'_>, pos: Box<SourcePos>) {
        let mut p = self.shared.progress();
        match result {
            Ok(_) => p.delivered(*pos),
            Err((e, msg)) => {
                // Retries are librdkafka's job (idempotent producer); an error here is final.
                // Keep the offset in flight so it is never committed, and stop.
                error!(error = %e, topic = msg.topic(), "delivery failed for good; stopping without committing past it");
                p.failed
                    .get_or_insert_with(|| format!("delivery to {} failed: {e}", msg.topic()));
            }
        }
    }
}

/// Consumer callbacks: commit on revocation, drop state of partitions that moved away.
struct ConsumerCtx {
    shared: Arc<Shared>,
    producer: ThreadedProducer<ProducerCtx>,
}

impl ClientContext for ConsumerCtx {}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.shared
                .metrics
                .rebalances
                .with_label_values(&["revoke"])
                .inc();
            let revoked: HashSet<(u16, i32)> = tpl
                .elements()
                .iter()
                .filter_map(|e| {
                    self.shared
                        .topic_index(e.topic())
                        .map(|t| (t, e.partition()))
                })
                .collect();
            if let Err(e) = self.producer.flush(self.shared.drain_timeout) {
                warn!(error = %e, "revocation: producer flush did not finish; committing only delivered work");
            }
            let offsets = self.shared.progress().committable(Some(&revoked));
            if let Err(e) = commit(consumer, &self.shared, &offsets, CommitMode::Sync) {
                warn!(error = %e, "revocation: commit failed; the next owner replays from the last commit");
            }
            info!(
                partitions = tpl.count(),
                committed = offsets.len(),
                "partitions revoked"
            );
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.shared
                .metrics
                .rebalances
                .with_label_values(&["assign"])
                .inc();
            let now: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            let keep: HashSet<i32> = now.iter().map(|(_, p)| *p).collect();
            let dropped = self
                .shared
                .processor
                .retain_partitions(|p| keep.contains(&p));
            self.shared
                .metrics
                .customers
                .set(self.shared.processor.store().len() as i64);
            let fresh: Vec<(u16, i32)> = {
                let mut p = self.shared.progress();
                p.parts.retain(|(_, part), _| keep.contains(part));
                tpl.elements()
                    .iter()
                    .filter_map(|e| {
                        self.shared
                            .topic_index(e.topic())
                            .map(|t| (t, e.partition()))
                    })
                    .filter(|k| !p.parts.contains_key(k))
                    .collect()
            };
            self.restore_from_input(consumer, &fresh);
            info!(partitions = ?now, dropped_customers = dropped, "partitions assigned");
            *self
                .shared
                .assigned
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = now;
        }
    }
}

impl ConsumerCtx {
    /// State restore until the changelog exists: a partition this instance holds no state for
    /// is re-read from its beginning; inputs below the group's committed offset rebuild the
    /// customers' state (and change sequence numbers) without output, then processing
    /// continues normally. A replay after a restart or a move therefore re-emits the same
    /// `(customer_id, seq)` with the same payload. Cost: reading the partition's history.
    fn restore_from_input(&self, consumer: &BaseConsumer<Self>, fresh: &[(u16, i32)]) {
        if fresh.is_empty() {
            return;
        }
        let mut query = TopicPartitionList::new();
        for (t, p) in fresh {
            query.add_partition(&self.shared.topics[*t as usize], *p);
        }
        let committed = match consumer.committed_offsets(query, self.shared.drain_timeout) {
            Ok(c) => c,
            Err(e) => {
                return warn!(error = %e, "cannot read committed offsets; consuming from them without a state rebuild")
            }
        };
        let mut rewind = TopicPartitionList::new();
        let mut restoring = 0;
        {
            let mut p = self.shared.progress();
            for e in committed.elements() {
                let Some(t) = self.shared.topic_index(e.topic()) else {
                    continue;
                };
                let part = p.part(t, e.partition());
                if let Offset::Offset(o) = e.offset() {
                    if o > 0 {
                        part.restore_until = o;
                        part.committed = o;
                        restoring += 1;
                    }
                }
            }
            if let Ok(all) = consumer.assignment() {
                for e in all.elements() {
                    let key = self
                        .shared
                        .topic_index(e.topic())
                        .map(|t| (t, e.partition()));
                    let offset = match key.and_then(|k| p.parts.get(&k).map(|pp| (k, pp))) {
                        Some((k, pp)) if pp.restore_until > 0 && fresh.contains(&k) => {
                            Offset::Beginning
                        }
                        _ => Offset::Stored,
                    };
                    let _ = rewind.add_partition_offset(e.topic(), e.partition(), offset);
                }
            }
        }
        if restoring == 0 {
            return;
        }
        match consumer.assign(&rewind) {
            Ok(()) => info!(
                partitions = restoring,
                "restoring state: re-reading partitions up to their committed offsets"
            ),
            Err(e) => warn!(error = %e, "cannot rewind for the state rebuild"),
        }
    }
}

fn commit<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    shared: &Shared,
    offsets: &[((u16, i32), i64)],
    mode: CommitMode,
) -> Result<(), KafkaError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for ((t, p), off) in offsets {
        tpl.add_partition_offset(&shared.topics[*t as usize], *p, Offset::Offset(*off))?;
    }
    consumer.commit(&tpl, mode)?;
    shared.progress().mark_committed(offsets);
    Ok(())
}

/// Why the pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("Kafka client setup failed ({context}): {source}")]
    Setup {
        context: &'static str,
        source: KafkaError,
    },
    #[error("output could not be delivered: {0} (offsets were not committed past it; a restart replays it)")]
    Delivery(String),
}

/// Counts reported when the pipeline stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub events_ok: u64,
    pub dead_lettered: u64,
    pub changes: u64,
}

/// A configured engine instance. Build with [`Pipeline::new`], then [`Pipeline::run`].
pub struct Pipeline {
    cfg: Config,
    shared: Arc<Shared>,
}

fn client_config(cfg: &Config, extra: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("client.id", &cfg.kafka.client_id);
    for (k, v) in extra {
        c.set(k, v);
    }
    c
}

impl Pipeline {
    pub fn new(cfg: Config, engine: Engine, metrics: Arc<Metrics>) -> Pipeline {
        let shared = Arc::new(Shared {
            topics: cfg.kafka.input_topics.clone(),
            progress: Mutex::new(Progress::default()),
            processor: Processor::new(
                engine.with_dedup(cfg.time.dedup_ids),
                Arc::new(Store::new()),
                &cfg.time,
                cfg.kafka.input_topics.len(),
            ),
            metrics,
            assigned: Mutex::new(Vec::new()),
            drain_timeout: Duration::from_millis(cfg.pipeline.drain_timeout_ms),
        });
        Pipeline { cfg, shared }
    }

    /// The customer store (read it; never hold a reference across `.await`).
    pub fn store(&self) -> Arc<Store> {
        self.shared.processor.store().clone()
    }

    /// Timers scheduled over the assigned partitions.
    pub fn timers_pending(&self) -> usize {
        self.shared.processor.timers_pending()
    }

    fn engine(&self) -> &Engine {
        self.shared.processor.engine()
    }

    /// Input partitions currently assigned to this instance.
    pub fn assigned(&self) -> Vec<(String, i32)> {
        self.shared
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Creates the output and dead-letter topics if missing (best effort: a broker without
    /// the admin API, such as librdkafka's mock cluster, is only warned about).
    async fn ensure_topics(&self) {
        let k = &self.cfg.kafka;
        if !k.create_topics {
            return;
        }
        let admin: AdminClient<DefaultClientContext> =
            match client_config(&self.cfg, &BTreeMap::new()).create() {
                Ok(a) => a,
                Err(e) => {
                    return warn!(error = %e, "cannot create an admin client; not creating topics")
                }
            };
        let topics: Vec<NewTopic<'_>> = [&k.output_topic, &k.dead_letter_topic]
            .iter()
            .map(|t| NewTopic::new(t, k.create_partitions, TopicReplication::Fixed(1)))
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        match tokio::time::timeout(Duration::from_secs(15), admin.create_topics(&topics, &opts))
            .await
        {
            Ok(Ok(results)) => {
                for r in results {
                    match r {
                        Ok(t) => info!(topic = %t, "created topic"),
                        Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                            debug!(topic = %t, "topic exists")
                        }
                        Err((t, e)) => warn!(topic = %t, error = %e, "could not create topic"),
                    }
                }
            }
            Ok(Err(e)) => {
                warn!(error = %e, "topic creation not available; relying on existing or auto-created topics")
            }
            Err(_) => warn!("topic creation timed out; relying on existing or auto-created topics"),
        }
    }

    /// Runs until `shutdown` resolves (then drains, flushes and commits) or a fatal error.
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunSummary, PipelineError> {
        self.ensure_topics().await;
        let k = &self.cfg.kafka;
        let mut pc = client_config(&self.cfg, &k.producer);
        pc.set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random");
        for (key, default) in [("linger.ms", "5"), ("message.timeout.ms", "0")] {
            if !k.producer.contains_key(key) {
                pc.set(key, default);
            }
        }
        let producer: ThreadedProducer<ProducerCtx> = pc
            .create_with_context(ProducerCtx {
                shared: self.shared.clone(),
            })
            .map_err(|source| PipelineError::Setup {
                context: "producer",
                source,
            })?;
        let mut cc = client_config(&self.cfg, &k.consumer);
        cc.set("group.id", &k.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        for (key, default) in [
            ("auto.offset.reset", "earliest"),
            ("partition.assignment.strategy", "range"),
        ] {
            if !k.consumer.contains_key(key) {
                cc.set(key, default);
            }
        }
        let consumer: StreamConsumer<ConsumerCtx> = cc
            .create_with_context(ConsumerCtx {
                shared: self.shared.clone(),
                producer: producer.clone(),
            })
            .map_err(|source| PipelineError::Setup {
                context: "consumer",
                source,
            })?;
        let topics: Vec<&str> = k.input_topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|source| PipelineError::Setup {
                context: "subscribe",
                source,
            })?;
        info!(brokers = %k.brokers, group = %k.group_id, topics = ?topics, rules_version = %self.engine().rules.version, clock = ?self.cfg.time.clock, "pipeline started");

        let mut tick =
            tokio::time::interval(Duration::from_millis(self.cfg.pipeline.commit_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut clock_tick = tokio::time::interval(Duration::from_millis(self.cfg.time.tick_ms));
        clock_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let mut summary = RunSummary::default();
        let result = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                _ = tick.tick() => {
                    let offsets = self.shared.progress().committable(None);
                    if let Err(e) = commit(&consumer, &self.shared, &offsets, CommitMode::Async) {
                        warn!(error = %e, "periodic commit failed; will retry");
                    }
                }
                _ = clock_tick.tick() => {
                    if let Err(e) = self.on_tick(&producer, &mut summary).await {
                        break Err(e);
                    }
                }
                m = consumer.recv() => match m {
                    Ok(msg) => {
                        if let Err(e) = self.handle(&producer, &msg, &mut summary).await {
                            break Err(e);
                        }
                    }
                    Err(e) => warn!(error = %e, "consumer error"),
                },
            }
            if let Some(f) = self.shared.progress().failed.clone() {
                break Err(PipelineError::Delivery(f));
            }
        };
        // Drain: deliver what was produced, then commit what is safe.
        if let Err(e) = producer.flush(self.shared.drain_timeout) {
            warn!(error = %e, in_flight = self.shared.progress().in_flight(), "shutdown: producer flush incomplete");
        }
        let offsets = self.shared.progress().committable(None);
        if let Err(e) = commit(&consumer, &self.shared, &offsets, CommitMode::Sync) {
            warn!(error = %e, "shutdown: final commit failed");
        }
        info!(
            events = summary.events_ok,
            dead_lettered = summary.dead_lettered,
            changes = summary.changes,
            "pipeline stopped"
        );
        result.map(|()| summary)
    }

    fn record_fired(&self, fired: Fired) {
        self.shared.metrics.timers_fired.inc_by(fired.timers);
        self.shared
            .metrics
            .customers
            .add(fired.new_customers as i64);
    }

    /// Serializes emitted changes (counting them); `cause` is the event's, for changes it
    /// caused (timer changes say so themselves).
    fn serialize(
        &self,
        emitted: &[Emitted<'_>],
        cause: Option<Cause<'_>>,
        summary: &mut RunSummary,
    ) -> Vec<(CompactString, Vec<u8>)> {
        let rules = &self.engine().rules;
        summary.changes += emitted.len() as u64;
        emitted
            .iter()
            .map(|e| {
                self.shared.metrics.change(&e.change);
                let cause = match cause {
                    Some(c) if !e.change.by_timer => c,
                    _ => Cause::Timer,
                };
                let json = change_json(rules, &e.customer_id, cause, &e.change);
                (e.customer_id.clone(), json)
            })
            .collect()
    }

    /// Lets time pass with no input: fires the timers of idle partitions (event time) or all
    /// due timers (processing time), and publishes their changes.
    async fn on_tick(
        &self,
        producer: &ThreadedProducer<ProducerCtx>,
        summary: &mut RunSummary,
    ) -> Result<(), PipelineError> {
        let mut out = Vec::new();
        let fired = self.shared.processor.tick(wall_ms(), &mut out);
        self.record_fired(fired);
        self.shared
            .metrics
            .timers_pending
            .set(self.shared.processor.timers_pending() as i64);
        if out.is_empty() {
            return Ok(());
        }
        let mut by_partition: BTreeMap<i32, Vec<Emitted<'_>>> = BTreeMap::new();
        for (p, e) in out {
            by_partition.entry(p).or_default().push(e);
        }
        for (p, emitted) in by_partition {
            let outputs = self.serialize(&emitted, None, summary);
            let pos = self
                .shared
                .progress()
                .last_processed(p)
                .unwrap_or(SourcePos {
                    topic: 0,
                    partition: p,
                    offset: -1,
                });
            self.shared.progress().processed(pos, outputs.len() as u32);
            self.publish(producer, pos, &outputs).await?;
        }
        Ok(())
    }

    /// Processes one input message: decode, let the processor fire due timers and apply it,
    /// publish the changes and, for bad (or, if configured, late) input, a dead letter.
    async fn handle(
        &self,
        producer: &ThreadedProducer<ProducerCtx>,
        msg: &BorrowedMessage<'_>,
        summary: &mut RunSummary,
    ) -> Result<(), PipelineError> {
        // Only subscribed topics are delivered, so the lookup cannot miss.
        let topic = self.shared.topic_index(msg.topic()).unwrap_or(0);
        let pos = SourcePos {
            topic,
            partition: msg.partition(),
            offset: msg.offset(),
        };
        if self.shared.progress().already_applied(pos) {
            debug!(
                topic = msg.topic(),
                partition = pos.partition,
                offset = pos.offset,
                "skipping redelivered input already applied"
            );
            return Ok(());
        }
        let restoring = self.shared.progress().restoring(pos);
        let payload = msg.payload().unwrap_or(&[]);
        let proc = &self.shared.processor;
        let mut emitted = Vec::new();
        let mut fired = Fired::default();
        let decoded = decode(payload);
        let outcome = match &decoded {
            Err(e) => Err(e.0.clone()),
            Ok(ev) => proc
                .event(
                    Source {
                        topic: topic as usize,
                        partition: pos.partition,
                        offset: pos.offset,
                    },
                    ev,
                    wall_ms(),
                    &mut emitted,
                    &mut fired,
                )
                .map_err(|r| r.0),
        };
        self.record_fired(fired);
        if restoring {
            // Rebuild only: the changes were published when this input was first processed.
            self.shared.progress().processed(pos, 0);
            return Ok(());
        }
        // Outputs are fully built before anything is sent, so no map entry is held while
        // waiting for producer queue space.
        let cause = decoded.as_ref().ok().map(|ev| Cause::Event {
            event_id: ev.event_id.as_deref(),
            topic: msg.topic(),
            partition: pos.partition,
            offset: pos.offset,
        });
        let outputs = self.serialize(&emitted, cause, summary);
        let (result, dead) = match outcome {
            Err(reason) => (EventResult::DeadLettered, Some(reason)),
            Ok(Applied::Applied) => (EventResult::Ok, None),
            Ok(Applied::Duplicate) => (EventResult::Duplicate, None),
            Ok(Applied::Reflected) => (EventResult::Ok, None),
            Ok(Applied::Late) => (
                EventResult::Late,
                self.cfg.time.late_to_dead_letter.then(|| {
                    format!(
                        "late event: older than the partition's watermark {}; applied to lifetime aggregates only",
                        format_rfc3339(proc.watermark(pos.partition))
                    )
                }),
            ),
        };
        self.shared.metrics.event(topic as usize, result);
        match result {
            EventResult::DeadLettered => summary.dead_lettered += 1,
            _ => summary.events_ok += 1,
        }
        let n = outputs.len() as u32 + dead.is_some() as u32;
        self.shared.progress().processed(pos, n);
        if let Some(reason) = dead {
            debug!(topic = msg.topic(), partition = pos.partition, offset = pos.offset, %reason, "dead-lettering");
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: dlq_headers::REASON,
                    value: Some(reason.as_str()),
                })
                .insert(Header {
                    key: dlq_headers::TOPIC,
                    value: Some(msg.topic()),
                })
                .insert(Header {
                    key: dlq_headers::PARTITION,
                    value: Some(&pos.partition.to_string()),
                })
                .insert(Header {
                    key: dlq_headers::OFFSET,
                    value: Some(&pos.offset.to_string()),
                });
            let rec = BaseRecord::with_opaque_to(&self.cfg.kafka.dead_letter_topic, Box::new(pos))
                .key(msg.key().unwrap_or(&[]))
                .payload(payload)
                .headers(headers);
            send(producer, rec, &self.shared).await?;
        }
        self.publish(producer, pos, &outputs).await
    }

    /// Sends serialized changes to the output topic, attributed to input `pos`.
    async fn publish(
        &self,
        producer: &ThreadedProducer<ProducerCtx>,
        pos: SourcePos,
        outputs: &[(CompactString, Vec<u8>)],
    ) -> Result<(), PipelineError> {
        for (key, out) in outputs {
            let rec = BaseRecord::with_opaque_to(&self.cfg.kafka.output_topic, Box::new(pos))
                .key(key.as_bytes())
                .payload(out.as_slice());
            send(producer, rec, &self.shared).await?;
        }
        Ok(())
    }
}

/// Wall-clock time, epoch ms.
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Enqueues one record, waiting (without holding anything) while the producer queue is full:
/// a full queue is backpressure, not an error.
async fn send(
    producer: &ThreadedProducer<ProducerCtx>,
    mut rec: BaseRecord<'_, [u8], [u8], Box<SourcePos>>,
    shared: &Shared,
) -> Result<(), PipelineError> {
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => {
                let reason = format!("cannot enqueue output: {e}");
                shared.progress().failed.get_or_insert(reason.clone());
                return Err(PipelineError::Delivery(reason));
            }
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
        assert_eq!(pr.committable(None), vec![((0, 0), 1)]);
        pr.delivered(pos(0, 1));
        assert_eq!(
            pr.committable(None),
            vec![((0, 0), 1)],
            "one of two outputs still in flight"
        );
        pr.delivered(pos(0, 1));
        assert_eq!(pr.committable(None), vec![((0, 0), 3)]);
        pr.delivered(pos(0, 3));
        assert_eq!(pr.committable(None), vec![((0, 0), 4)]);
        assert!(
            pr.already_applied(pos(0, 3))
                && !pr.already_applied(pos(0, 4))
                && !pr.already_applied(pos(1, 0))
        );
        pr.mark_committed(&[((0, 0), 4)]);
        assert!(pr.committable(None).is_empty(), "nothing new to commit");
        assert_eq!(pr.in_flight(), 0);
    }
}
