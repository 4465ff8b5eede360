//! The Kafka pipeline: consumer group in, engine, producer out, state in a changelog, offsets
//! committed only after both.
//!
//! This module owns every effect of the running engine: the consumer (one group over the
//! input topics, `range` assignment so co-partitioned topics land together), the producer
//! (idempotent, keyed by customer id), the dead-letter path, the changelog and the commit
//! protocol.
//!
//! **Commit interval** (at-least-once, the default), every `commit_interval_ms`, without
//! stopping consumption ([`CommitCycle`]):
//!
//! 1. take the latest record of every customer changed since the last interval, then each
//!    partition's checkpoint (input offsets and clock): they reflect the input processed so
//!    far;
//! 2. once every change and dead letter caused by that input is delivered (delivery reports,
//!    no flush), send them to the compacted changelog topic, in the customer's input
//!    partition;
//! 3. once the changelog is delivered, commit the input offsets it reflects (asynchronously).
//!
//! Input keeps flowing through all three steps; what it changes goes into the next interval,
//! which starts at the first tick after this one ends. A step that cannot go on (broker
//! away) simply waits, so nothing is committed ahead of what it depends on. On revocation, at
//! shutdown and in exactly-once mode the interval is blocking instead: flush the output,
//! send what the interval under way took (first) and the changelog due now, flush, commit.
//! After a crash the new owner restores the changelog and replays from the checkpoint: it
//! re-emits only changes already delivered, with the same `(customer_id, seq)` and payload,
//! and loses none. In exactly-once mode the output, the changelog and the offsets of an
//! interval are one Kafka transaction.
//!
//! **Restore**: when partitions are assigned, each one this instance holds no state for is
//! rebuilt from its changelog partition (read to its end) before any of its input is
//! processed, and consumption starts at the checkpoint. On revocation the interval above runs
//! for everything, and partitions that moved away are dropped from memory.
//!
//! What happens to events and time (watermarks, timers) is decided by the Kafka-free
//! [`Processor`]; this module feeds it messages and wall-clock ticks and publishes what it
//! emits. Every output record carries the input position that caused it as its delivery
//! opaque, so [`Progress`] knows which input offsets are safe to commit.
//!
//! Customer state is held per partition in the processor (a `DashMap` of partitions) and
//! read by the API and metrics through copies; no map reference or lock is ever held across
//! an `.await`. The blocking commit interval and the rebalance
//! callbacks block (librdkafka flushes) for at most the configured timeouts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

use crate::commit::{record_count, ChangelogBatch, CommitCycle, Offsets, Progress, SourcePos};
use crate::config::{Config, Guarantee};
use crate::engine::{Applied, Customer, Engine};
use crate::event::decode;
use crate::metrics::{EventResult, Metrics};
use crate::output::{change_json, dlq_headers, Cause};
use crate::processor::{Emitted, Fired, Processor, Source};
use crate::time::format_rfc3339;

/// What a produced record is, for its delivery report.
#[derive(Debug)]
enum Sent {
    /// A change or dead letter caused by this input.
    Output(SourcePos),
    /// A changelog record.
    Changelog,
}

/// State shared by the pipeline task and the Kafka callbacks.
struct Shared {
    topics: Vec<String>,
    changelog_topic: String,
    guarantee: Guarantee,
    progress: Mutex<Progress>,
    /// The non-blocking commit interval under way (at-least-once only). Lock order: this,
    /// then `progress`.
    cycle: Mutex<CommitCycle>,
    processor: Processor,
    metrics: Arc<Metrics>,
    /// Input partitions currently assigned, as (topic, partition).
    assigned: Mutex<Vec<(String, i32)>>,
    /// Partitions being restored from the changelog (0: ready).
    restoring: AtomicUsize,
    /// The input topics' partition count (0 until checked at start-up).
    partitions: AtomicI32,
    /// Settings of the consumer that reads the changelog on restore.
    restore_config: ClientConfig,
    drain_timeout: Duration,
    /// How long one step of a commit interval may wait for deliveries.
    flush_timeout: Duration,
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

    fn cycle(&self) -> std::sync::MutexGuard<'_, CommitCycle> {
        self.cycle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, reason: String) {
        self.progress().failed.get_or_insert(reason);
    }

    /// Input partitions assigned (each partition once, whatever the number of input topics).
    fn assigned_partitions(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, p)| *p)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The changelog records due now over every assigned partition (customers changed since
    /// the last call, then each partition's checkpoint), with the input offsets they reflect.
    fn take_changelog(&self) -> (Vec<ChangelogBatch>, Offsets) {
        let mut records = Vec::new();
        let mut reflected = Vec::new();
        for partition in self.assigned_partitions() {
            let offsets = self.progress().offsets(partition, self.topics.len());
            let batch = self.processor.changelog(partition, &offsets);
            if !batch.is_empty() {
                records.push(ChangelogBatch {
                    partition,
                    records: batch,
                });
            }
            reflected.extend(
                offsets
                    .iter()
                    .enumerate()
                    .filter(|(_, off)| **off >= 0)
                    .map(|(t, off)| ((t as u16, partition), *off)),
            );
        }
        (records, reflected)
    }

    fn changelog_record<'a>(
        &'a self,
        partition: i32,
        (key, value): (&'a [u8], &'a [u8]),
    ) -> BaseRecord<'a, [u8], [u8], Box<Sent>> {
        BaseRecord::with_opaque_to(&self.changelog_topic, Box::new(Sent::Changelog))
            .partition(partition)
            .key(key)
            .payload(value)
    }

    /// Hands sent batches' buffers back to the processor (the records are copied into the
    /// producer's queue when sent).
    fn recycle(&self, batches: Vec<ChangelogBatch>) {
        for b in batches {
            self.processor.recycle(b.partition, b.records);
        }
    }

    /// Enqueues changelog records from a thread that may block, counting them in flight.
    fn send_changelog_blocking(
        &self,
        producer: &ThreadedProducer<ProducerCtx>,
        batches: &[ChangelogBatch],
    ) -> Result<(), PipelineError> {
        let n = record_count(batches) as u64;
        self.progress().changelog_inflight += n;
        for b in batches {
            for r in b.records.iter() {
                send_blocking(producer, self.changelog_record(b.partition, r), self)?;
            }
        }
        self.metrics.changelog_records.inc_by(n);
        Ok(())
    }

    /// Starts a non-blocking commit interval (at-least-once; see [`CommitCycle`]) unless one
    /// is under way, and moves it on as far as it can go now.
    async fn begin_commit<C: ConsumerContext>(
        &self,
        consumer: &impl Consumer<C>,
        producer: &ThreadedProducer<ProducerCtx>,
    ) -> Result<(), PipelineError> {
        if self.cycle().idle() {
            let (records, offsets) = self.take_changelog();
            self.cycle().take(records, offsets);
        } else {
            debug!("commit interval: the previous one is still under way");
        }
        self.advance_commit(consumer, producer).await
    }

    /// Whether a non-blocking commit interval is under way.
    fn commit_pending(&self) -> bool {
        !self.cycle().idle()
    }

    /// Moves the commit interval under way on: sends its changelog once the output it
    /// reflects is delivered, commits its offsets (asynchronously) once the changelog is.
    async fn advance_commit<C: ConsumerContext>(
        &self,
        consumer: &impl Consumer<C>,
        producer: &ThreadedProducer<ProducerCtx>,
    ) -> Result<(), PipelineError> {
        let sendable = {
            let mut cycle = self.cycle();
            let mut progress = self.progress();
            let batches = cycle.sendable(&progress);
            if let Some(b) = &batches {
                progress.changelog_inflight += record_count(b) as u64;
            }
            batches
        };
        if let Some(batches) = sendable {
            for b in &batches {
                for r in b.records.iter() {
                    send(producer, self.changelog_record(b.partition, r), self).await?;
                }
            }
            self.metrics
                .changelog_records
                .inc_by(record_count(&batches) as u64);
            self.recycle(batches);
        }
        let offsets = {
            let mut cycle = self.cycle();
            let progress = self.progress();
            cycle.committable(&progress)
        };
        if let Some(offsets) = offsets {
            match commit(consumer, self, &offsets, CommitMode::Async) {
                Ok(()) => self.metrics.commits.inc(),
                Err(e) => warn!(error = %e, "offset commit failed; will retry next interval"),
            }
        }
        Ok(())
    }

    /// One blocking commit interval (see the module docs) over every assigned partition, for
    /// revocation, shutdown and exactly-once. Returns whether offsets were committed; `Err`
    /// only for failures that must stop the pipeline.
    fn commit_interval<C: ConsumerContext>(
        &self,
        consumer: &impl Consumer<C>,
        producer: &ThreadedProducer<ProducerCtx>,
        wait: Duration,
    ) -> Result<bool, PipelineError> {
        let exactly_once = self.guarantee == Guarantee::ExactlyOnce;
        if !exactly_once {
            // 1. Output delivered (and any changelog sent before).
            let _ = producer.flush(wait);
            let p = self.progress();
            if p.in_flight() > 0 || p.changelog_inflight > 0 {
                debug!(
                    outputs = p.in_flight(),
                    changelog = p.changelog_inflight,
                    "commit interval: deliveries outstanding; trying again next interval"
                );
                return Ok(false);
            }
        }
        // 2. Changelog: what a non-blocking interval took and did not send yet goes first,
        // then the dirty customers and each partition's checkpoint.
        let unsent = self.cycle().take_unsent();
        let (records, _) = self.take_changelog();
        self.send_changelog_blocking(producer, &unsent)?;
        self.send_changelog_blocking(producer, &records)?;
        let sent_changelog = !unsent.is_empty() || !records.is_empty();
        self.recycle(unsent);
        self.recycle(records);
        let offsets = self.progress().committable();
        if exactly_once {
            // Output, changelog and offsets commit together.
            let cgm = consumer.group_metadata().ok_or_else(|| {
                PipelineError::Transaction("the consumer has no group metadata".into())
            })?;
            let tpl = offsets_tpl(self, &offsets).map_err(txn_error)?;
            producer
                .send_offsets_to_transaction(&tpl, &cgm, self.drain_timeout)
                .map_err(txn_error)?;
            producer
                .commit_transaction(self.drain_timeout)
                .map_err(txn_error)?;
            producer.begin_transaction().map_err(txn_error)?;
            self.progress().mark_committed(&offsets);
            self.metrics.commits.inc();
            return Ok(true);
        }
        // 3. Changelog delivered.
        if sent_changelog {
            let _ = producer.flush(wait);
            if self.progress().changelog_inflight > 0 {
                debug!("commit interval: changelog not delivered yet; not committing");
                return Ok(false);
            }
        }
        // 4. Offsets.
        match commit(consumer, self, &offsets, CommitMode::Sync) {
            Ok(()) => {
                self.metrics.commits.inc();
                Ok(true)
            }
            Err(e) => {
                warn!(error = %e, "offset commit failed; will retry next interval");
                Ok(false)
            }
        }
    }
}

fn txn_error(e: KafkaError) -> PipelineError {
    PipelineError::Transaction(e.to_string())
}

/// Producer callbacks: delivery reports advance [`Progress`].
struct ProducerCtx {
    shared: Arc<Shared>,
}

impl ClientContext for ProducerCtx {}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = Box<Sent>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<Sent>) {
        let mut p = self.shared.progress();
        match (result, *sent) {
            (Ok(_), Sent::Output(pos)) => p.delivered(pos),
            (Ok(_), Sent::Changelog) => p.changelog_inflight -= 1,
            (
                Err((
                    KafkaError::MessageProduction(
                        RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight,
                    ),
                    _,
                )),
                _,
            ) => {
                // An aborted transaction: the pipeline already stopped with the reason.
                debug!("record purged with its aborted transaction");
            }
            (Err((e, msg)), _) => {
                // Retries are librdkafka's job (idempotent producer, no message timeout); an
                // error here is final. Nothing is committed past it, and the pipeline stops.
                error!(error = %e, topic = msg.topic(), "delivery failed for good; stopping without committing past it");
                p.failed
                    .get_or_insert_with(|| format!("delivery to {} failed: {e}", msg.topic()));
            }
        }
    }
}

/// Consumer callbacks: a commit interval on revocation; restore of newly assigned
/// partitions, and the state of partitions that moved away dropped, on assignment.
struct ConsumerCtx {
    shared: Arc<Shared>,
    producer: ThreadedProducer<ProducerCtx>,
}

impl ClientContext for ConsumerCtx {
    /// librdkafka's statistics (every `statistics.interval.ms`): consumer lag per assigned
    /// input partition.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lags: Vec<(String, i32, i64)> = statistics
            .topics
            .iter()
            .filter(|(t, _)| self.shared.topic_index(t).is_some())
            .flat_map(|(t, topic)| {
                topic
                    .partitions
                    .values()
                    .filter(|p| p.partition >= 0 && p.desired && p.consumer_lag >= 0)
                    .map(move |p| (t.clone(), p.partition, p.consumer_lag))
            })
            .collect();
        self.shared.metrics.set_consumer_lag(&lags);
    }
}

impl ConsumerContext for ConsumerCtx {
    /// The outcome of an asynchronous commit (a non-blocking commit interval): a failed one is
    /// logged, and its partitions are committed again at the next interval.
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            warn!(error = %e, "offset commit failed; will retry next interval");
            let mut p = self.shared.progress();
            for el in offsets.elements() {
                if let Some(t) = self.shared.topic_index(el.topic()) {
                    p.commit_failed((t, el.partition()));
                }
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.shared
                .metrics
                .rebalances
                .with_label_values(&["revoke"])
                .inc();
            if let Some(reason) = self.shared.progress().failed.clone() {
                return info!(partitions = tpl.count(), %reason, "partitions revoked after a failure; nothing committed");
            }
            let committed = match self.shared.commit_interval(
                consumer,
                &self.producer,
                self.shared.drain_timeout,
            ) {
                Ok(c) => c,
                Err(e) => {
                    self.shared.fail(e.to_string());
                    false
                }
            };
            if !committed {
                warn!("revocation: output, changelog or commit did not finish in time; the next owner replays from the last checkpoint");
            }
            info!(partitions = tpl.count(), committed, "partitions revoked");
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
            self.shared.cycle().retain(|p| keep.contains(&p));
            let fresh: Vec<i32> = {
                let mut p = self.shared.progress();
                p.parts.retain(|(_, part), _| keep.contains(part));
                let held: HashSet<i32> = p.parts.keys().map(|(_, part)| *part).collect();
                let mut f: Vec<i32> = keep.iter().copied().filter(|x| !held.contains(x)).collect();
                f.sort_unstable();
                f
            };
            info!(partitions = ?now, dropped_customers = dropped, restoring = ?fresh, "partitions assigned");
            *self
                .shared
                .assigned
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = now;
            if !fresh.is_empty() {
                if let Err(e) = self.restore(consumer, &fresh) {
                    error!(error = %e, "restore failed; stopping");
                    self.shared.fail(format!("restore failed: {e}"));
                }
            }
            let processor = &self.shared.processor;
            let m = &self.shared.metrics;
            let customers = processor.customer_count();
            m.customers.set(customers as i64);
            m.recount_members(&processor.engine().rules, processor);
            m.timers_pending.set(processor.timers_pending() as i64);
            info!(customers, "ready");
        }
    }
}

impl ConsumerCtx {
    /// Rebuilds `partitions` from the changelog (each read to its end), then points the
    /// consumer at their checkpoints. Runs inside the rebalance callback, so no input of
    /// these partitions is processed before it returns.
    fn restore(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) -> Result<(), String> {
        let shared = &self.shared;
        shared.restoring.store(partitions.len(), Ordering::SeqCst);
        let _ready = ResetOnDrop(&shared.restoring);
        let started = Instant::now();
        let reader: BaseConsumer<RestoreCtx> = shared
            .restore_config
            .create_with_context(RestoreCtx)
            .map_err(|e| format!("changelog consumer: {e}"))?;
        let topic = shared.changelog_topic.as_str();
        let mut tpl = TopicPartitionList::new();
        let mut open: HashSet<i32> = HashSet::new();
        let mut ends: HashMap<i32, i64> = HashMap::new();
        for &p in partitions {
            let (low, high) = reader
                .fetch_watermarks(topic, p, shared.drain_timeout)
                .map_err(|e| format!("changelog {topic} partition {p}: {e}"))?;
            if high > low {
                tpl.add_partition_offset(topic, p, Offset::Beginning)
                    .map_err(|e| e.to_string())?;
                open.insert(p);
                ends.insert(p, high);
            }
        }
        let mut records = 0u64;
        let threads = crate::restore::workers(partitions.len());
        let restorers = crate::restore::restore(&shared.processor, partitions, threads, |feed| {
            if open.is_empty() {
                return Ok(());
            }
            reader.assign(&tpl).map_err(|e| e.to_string())?;
            let mut last_log = Instant::now();
            while !open.is_empty() {
                let Some(m) = reader.poll(Duration::from_millis(500)) else {
                    continue;
                };
                let m = match m {
                    Ok(m) => m,
                    Err(KafkaError::PartitionEOF(p)) => {
                        open.remove(&p);
                        continue;
                    }
                    Err(e) => {
                        warn!(error = %e, "changelog read error; retrying");
                        continue;
                    }
                };
                let p = m.partition();
                feed.record(p, m.offset(), m.key().unwrap_or(&[]), m.payload())?;
                records += 1;
                if ends.get(&p).is_some_and(|end| m.offset() + 1 >= *end) {
                    open.remove(&p);
                }
                if last_log.elapsed() > Duration::from_secs(5) {
                    info!(records, "restoring…");
                    last_log = Instant::now();
                }
            }
            Ok(())
        })
        .map_err(|e| format!("{topic}: {e}"))?;
        // Input positions: the checkpoint where there is one, else the committed offset.
        let mut seek = TopicPartitionList::new();
        let mut customers = 0;
        {
            let mut progress = shared.progress();
            let restored: HashMap<i32, Option<Vec<i64>>> = restorers
                .into_iter()
                .map(|(p, r)| {
                    let done = r.finish();
                    customers += done.customers;
                    (p, done.offsets)
                })
                .collect();
            let assigned = consumer.assignment().map_err(|e| e.to_string())?;
            for e in assigned.elements() {
                let (t, p) = (e.topic(), e.partition());
                let checkpoint = shared.topic_index(t).and_then(|ti| {
                    let o = restored.get(&p)?.as_ref()?.get(ti as usize).copied()?;
                    (o >= 0).then_some((ti, o))
                });
                let offset = match checkpoint {
                    Some((ti, o)) => {
                        progress.part(ti, p).next = o;
                        Offset::Offset(o)
                    }
                    None => Offset::Stored,
                };
                seek.add_partition_offset(t, p, offset)
                    .map_err(|e| e.to_string())?;
            }
        }
        consumer.assign(&seek).map_err(|e| e.to_string())?;
        shared.metrics.restored_customers.inc_by(customers);
        shared
            .metrics
            .last_restore_seconds
            .set(started.elapsed().as_secs_f64());
        info!(
            partitions = ?partitions,
            records,
            customers,
            millis = started.elapsed().as_millis() as u64,
            "restored from the changelog"
        );
        Ok(())
    }
}

/// The changelog reader's callbacks: reaching the end of a partition is how a restore ends,
/// not an error worth a log line.
struct RestoreCtx;

impl ClientContext for RestoreCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        match error {
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF) => {
                debug!(reason, "changelog partition end")
            }
            e => warn!(error = %e, reason, "changelog reader"),
        }
    }
}

impl ConsumerContext for RestoreCtx {}

/// Sets a counter back to zero when dropped.
struct ResetOnDrop<'a>(&'a AtomicUsize);

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

fn offsets_tpl(
    shared: &Shared,
    offsets: &[((u16, i32), i64)],
) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), off) in offsets {
        tpl.add_partition_offset(&shared.topics[*t as usize], *p, Offset::Offset(*off))?;
    }
    Ok(tpl)
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
    consumer.commit(&offsets_tpl(shared, offsets)?, mode)?;
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
    #[error("topics: {0}")]
    Topics(String),
    #[error("exactly-once: {0} (nothing of the open transaction is visible; a restart restores the last committed one)")]
    Transaction(String),
    #[error("{0}")]
    Failed(String),
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

/// A client for `cfg`'s brokers: `defaults` first, then the user's `[kafka.common]`
/// properties, then `extra` (the user's properties for this kind of client), each winning
/// over what came before.
pub(crate) fn client_config(
    cfg: &Config,
    defaults: &[(&str, &str)],
    extra: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("client.id", &cfg.kafka.client_id);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in cfg.kafka.common.iter().chain(extra) {
        c.set(k, v);
    }
    c
}

/// The consumer that reads the changelog on restore: the input consumer's read-ahead and the
/// user's consumer properties (so connection, security and memory settings apply to it too),
/// then what restoring needs, which the user cannot change.
fn restore_config(cfg: &Config) -> ClientConfig {
    let mut c = client_config(cfg, &[READ_AHEAD], &cfg.kafka.consumer);
    // librdkafka wants a group id to assign partitions; this consumer never joins the group
    // nor commits. It reads only committed records (transactions in exactly-once mode).
    c.set("client.id", format!("{}-restore", cfg.kafka.client_id))
        .set("group.id", format!("{}-restore", cfg.kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    c
}

/// The output producer's settings: no delivery timeout (an outage is waited out), and a
/// bounded queue (64 MiB): when it is full, consumption waits. Idempotent, keyed like the
/// Java client. The user's `kafka.producer` properties override the defaults, not the last
/// two.
pub(crate) fn producer_config(cfg: &Config) -> ClientConfig {
    let defaults = [
        ("linger.ms", "5"),
        ("message.timeout.ms", "0"),
        ("queue.buffering.max.kbytes", "65536"),
    ];
    let mut pc = client_config(cfg, &defaults, &cfg.kafka.producer);
    pc.set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random");
    pc
}

/// How far both consumers (input and restore) read ahead, as librdkafka's
/// `queued.min.messages`: far enough that its byte cap for the consumer's queue
/// (`queued.max.messages.kbytes`, 64 MiB by default) is the bound, rather than its default
/// 100 000 messages per partition. Measured (BENCHMARKS.md, fifth session): through Nisshi the
/// plain consumer 3.5–4× and the pipeline 1.7–1.9× faster, the restore 1.2–1.3×, for more
/// memory held by librdkafka.
const READ_AHEAD: (&str, &str) = ("queued.min.messages", "1000000");

/// The input consumer's defaults (the user's `kafka.consumer` properties override them).
pub(crate) const CONSUMER_DEFAULTS: [(&str, &str); 4] = [
    READ_AHEAD,
    ("auto.offset.reset", "earliest"),
    ("partition.assignment.strategy", "range"),
    ("statistics.interval.ms", "5000"),
];

impl Pipeline {
    pub fn new(cfg: Config, engine: Engine, metrics: Arc<Metrics>) -> Pipeline {
        let shared = Arc::new(Shared {
            topics: cfg.kafka.input_topics.clone(),
            progress: Mutex::new(Progress::default()),
            cycle: Mutex::new(CommitCycle::default()),
            processor: Processor::new(
                engine.with_dedup(cfg.time.dedup_ids),
                &cfg.time,
                cfg.kafka.input_topics.len(),
            ),
            metrics,
            assigned: Mutex::new(Vec::new()),
            restoring: AtomicUsize::new(0),
            partitions: AtomicI32::new(0),
            restore_config: restore_config(&cfg),
            changelog_topic: cfg.changelog_topic(),
            guarantee: cfg.processing.guarantee,
            drain_timeout: Duration::from_millis(cfg.pipeline.drain_timeout_ms),
            flush_timeout: Duration::from_millis(cfg.pipeline.commit_interval_ms.max(100)),
        });
        Pipeline { cfg, shared }
    }

    /// Whether this instance has partitions and none of them is restoring.
    pub fn ready(&self) -> bool {
        self.shared.restoring.load(Ordering::SeqCst) == 0 && !self.assigned().is_empty()
    }

    /// Whether partitions are being restored from the changelog right now.
    pub fn restoring(&self) -> bool {
        self.shared.restoring.load(Ordering::SeqCst) > 0
    }

    /// Customers changed since their last changelog record.
    pub fn dirty(&self) -> usize {
        self.shared.processor.dirty()
    }

    /// A copy of customer `id`'s state, if held.
    pub fn customer(&self, id: &str) -> Option<Customer> {
        self.shared.processor.customer(id)
    }

    /// [`Pipeline::customer`], with the input partition that holds it.
    pub fn find_customer(&self, id: &str) -> Option<(i32, Customer)> {
        self.shared.processor.find_customer(id)
    }

    /// Customers held.
    pub fn customer_count(&self) -> usize {
        self.shared.processor.customer_count()
    }

    /// Calls `f` with every customer held (see [`Processor::for_each_customer`]).
    pub fn for_each_customer(&self, f: impl FnMut(&str, &Customer)) {
        self.shared.processor.for_each_customer(f)
    }

    /// Timers scheduled over the assigned partitions.
    pub fn timers_pending(&self) -> usize {
        self.shared.processor.timers_pending()
    }

    /// The engine (rules) this pipeline applies.
    pub fn engine(&self) -> &Engine {
        self.shared.processor.engine()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The input topics' partition count, once checked at start-up.
    pub fn partition_count(&self) -> Option<i32> {
        match self.shared.partitions.load(Ordering::SeqCst) {
            0 => None,
            n => Some(n),
        }
    }

    /// Input partitions held by this instance, each once, in order.
    pub fn partitions(&self) -> Vec<i32> {
        self.shared.assigned_partitions()
    }

    /// Whether this instance holds input partition `p`.
    pub fn owns(&self, p: i32) -> bool {
        self.partitions().contains(&p)
    }

    /// The time rules are evaluated at for a customer of `partition` with nothing newer of
    /// its own: the partition's watermark (event time) or the wall clock (processing time).
    pub fn clock(&self, partition: i32) -> i64 {
        match self.cfg.time.clock {
            crate::config::ClockMode::Event => self.shared.processor.watermark(partition),
            crate::config::ClockMode::Processing => wall_ms(),
        }
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
            match client_config(&self.cfg, &[], &BTreeMap::new()).create() {
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

    /// Checks that the input topics exist and are co-partitioned, and that the changelog topic
    /// has their partition count, creating it (compacted) if missing.
    async fn ensure_changelog(&self) -> Result<(), PipelineError> {
        let cfg = self.cfg.clone();
        let topic = self.cfg.changelog_topic();
        let admin: AdminClient<DefaultClientContext> = client_config(&cfg, &[], &BTreeMap::new())
            .create()
            .map_err(|source| PipelineError::Setup {
                context: "admin client",
                source,
            })?;
        let counts = move |names: Vec<String>| {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<Option<usize>>, PipelineError> {
                let probe: BaseConsumer = client_config(&cfg, &[], &BTreeMap::new())
                    .set("allow.auto.create.topics", "false")
                    .create()
                    .map_err(|source| PipelineError::Setup {
                        context: "metadata client",
                        source,
                    })?;
                names
                    .iter()
                    .map(|n| {
                        let md = probe
                            .fetch_metadata(Some(n), Duration::from_secs(10))
                            .map_err(|e| {
                                PipelineError::Topics(format!("cannot read metadata of {n}: {e}"))
                            })?;
                        Ok(md
                            .topics()
                            .first()
                            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                            .map(|t| t.partitions().len()))
                    })
                    .collect()
            })
        };
        let inputs = self.cfg.kafka.input_topics.clone();
        let found = counts(inputs.clone())
            .await
            .map_err(|e| PipelineError::Topics(e.to_string()))??;
        let mut partitions = None;
        for (name, n) in inputs.iter().zip(&found) {
            let Some(n) = *n else {
                return Err(PipelineError::Topics(format!(
                    "input topic {name:?} does not exist; create it (all input topics with the same partition count, keyed by customer id)"
                )));
            };
            match partitions {
                Some((first, m)) if m != n => {
                    return Err(PipelineError::Topics(format!(
                        "input topics are not co-partitioned: {first:?} has {m} partitions, {name:?} has {n}"
                    )))
                }
                None => partitions = Some((name, n)),
                _ => {}
            }
        }
        let Some((_, want)) = partitions else {
            return Ok(());
        };
        self.shared.partitions.store(want as i32, Ordering::SeqCst);
        let mut have = counts(vec![topic.clone()])
            .await
            .map_err(|e| PipelineError::Topics(e.to_string()))??[0];
        if have.is_none() {
            let new = NewTopic::new(&topic, want as i32, TopicReplication::Fixed(1))
                .set("cleanup.policy", "compact");
            let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
            match admin.create_topics([&new], &opts).await {
                Ok(results) => {
                    for r in results {
                        match r {
                            Ok(t) => {
                                info!(topic = %t, partitions = want, "created the changelog topic (compacted)")
                            }
                            Err((t, e)) => {
                                warn!(topic = %t, error = %e, "could not create the changelog topic")
                            }
                        }
                    }
                }
                Err(e) => warn!(error = %e, "could not create the changelog topic"),
            }
            have = counts(vec![topic.clone()])
                .await
                .map_err(|e| PipelineError::Topics(e.to_string()))??[0];
        }
        match have {
            Some(n) if n == want => Ok(()),
            Some(n) => Err(PipelineError::Topics(format!(
                "changelog topic {topic:?} has {n} partitions but the input topics have {want}; it must be co-partitioned with the input (delete it or set kafka.changelog_topic to another name)"
            ))),
            None => Err(PipelineError::Topics(format!(
                "changelog topic {topic:?} does not exist and could not be created; create it with {want} partitions and cleanup.policy=compact"
            ))),
        }
    }

    /// Runs until `shutdown` resolves (then drains, flushes and commits) or a fatal error.
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunSummary, PipelineError> {
        self.ensure_topics().await;
        self.ensure_changelog().await?;
        let k = &self.cfg.kafka;
        let exactly_once = self.cfg.processing.guarantee == Guarantee::ExactlyOnce;
        let mut pc = producer_config(&self.cfg);
        if exactly_once {
            pc.set("transactional.id", self.cfg.transactional_id());
        }
        let producer: ThreadedProducer<ProducerCtx> = pc
            .create_with_context(ProducerCtx {
                shared: self.shared.clone(),
            })
            .map_err(|source| PipelineError::Setup {
                context: "producer",
                source,
            })?;
        if exactly_once {
            let p = producer.clone();
            let timeout = self.shared.drain_timeout;
            tokio::task::spawn_blocking(move || {
                p.init_transactions(timeout)?;
                p.begin_transaction()
            })
            .await
            .map_err(|e| PipelineError::Transaction(e.to_string()))?
            .map_err(|e| {
                PipelineError::Transaction(format!(
                    "the broker refused transactions ({e}); processing.guarantee = \"exactly_once\" needs Kafka 2.5 or later with transactions enabled, otherwise use \"at_least_once\""
                ))
            })?;
            info!(transactional_id = %self.cfg.transactional_id(), "exactly-once: transactions initialised");
        }
        let mut cc = client_config(&self.cfg, &CONSUMER_DEFAULTS, &k.consumer);
        cc.set("group.id", &k.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
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
        info!(brokers = %k.brokers, group = %k.group_id, topics = ?topics, changelog = %self.shared.changelog_topic, guarantee = ?self.cfg.processing.guarantee, rules_version = %self.engine().rules.version, clock = ?self.cfg.time.clock, "pipeline started");

        let mut tick =
            tokio::time::interval(Duration::from_millis(self.cfg.pipeline.commit_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut clock_tick = tokio::time::interval(Duration::from_millis(self.cfg.time.tick_ms));
        clock_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // While a commit interval is under way: how often to look whether its next step can go.
        // Only this loop starts an interval, so a local flag (not a lock per message) tells
        // whether one is under way; a blocking interval in a rebalance can only end it early.
        let mut commit_under_way = false;
        let mut commit_poll = tokio::time::interval(Duration::from_millis(5));
        commit_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gauge_tick = tokio::time::interval(Duration::from_secs(5));
        gauge_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let mut summary = RunSummary::default();
        let mut consumer_errors = ErrorLog::default();
        let result = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                _ = tick.tick() => {
                    let done = if exactly_once {
                        self.shared.commit_interval(&consumer, &producer, self.shared.flush_timeout).map(|_| ())
                    } else {
                        let done = self.shared.begin_commit(&consumer, &producer).await;
                        commit_under_way = self.shared.commit_pending();
                        done
                    };
                    if let Err(e) = done {
                        break Err(e);
                    }
                    self.shared.metrics.dirty_customers.set(self.shared.processor.dirty() as i64);
                }
                _ = commit_poll.tick(), if commit_under_way => {
                    let done = self.shared.advance_commit(&consumer, &producer).await;
                    commit_under_way = self.shared.commit_pending();
                    if let Err(e) = done {
                        break Err(e);
                    }
                }
                _ = clock_tick.tick() => {
                    if let Err(e) = self.on_tick(&producer, &mut summary).await {
                        break Err(e);
                    }
                }
                _ = gauge_tick.tick() => {
                    let (metrics, processor) = (&self.shared.metrics, &self.shared.processor);
                    metrics.state_bytes.set(processor.state_bytes() as i64);
                    metrics.distinct_values.set(processor.engine().rules.symbols.len() as i64);
                }
                m = consumer.recv() => match m {
                    Ok(msg) => {
                        if let Err(e) = self.handle(&producer, &msg, &mut summary).await {
                            break Err(e);
                        }
                    }
                    Err(e) => consumer_errors.report(&e),
                },
            }
            if let Some(f) = self.shared.progress().failed.clone() {
                break Err(PipelineError::Failed(f));
            }
        };
        // Drain: one last commit interval (output, changelog, offsets), if nothing failed.
        if result.is_ok() {
            match self
                .shared
                .commit_interval(&consumer, &producer, self.shared.drain_timeout)
            {
                Ok(true) => {}
                Ok(false) => warn!(
                    in_flight = self.shared.progress().in_flight(),
                    "shutdown: output or changelog not delivered in time; a restart replays from the last checkpoint"
                ),
                Err(e) => warn!(error = %e, "shutdown: final commit failed"),
            }
        } else {
            // Nothing more is committed, not even on the revocation that closing causes.
            if let Err(e) = &result {
                self.shared.fail(e.to_string());
            }
            if exactly_once {
                let _ = producer.abort_transaction(self.shared.drain_timeout);
            }
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
                let cause = cause.map_or(Cause::Timer, |c| Cause::of(&e.change, c));
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
            Err(reason) => (Some(EventResult::DeadLettered), Some(reason)),
            Ok(Applied::Applied) => (Some(EventResult::Ok), None),
            Ok(Applied::Duplicate) => (Some(EventResult::Duplicate), None),
            // Counted when first processed, before a crash; only its timers may fire now.
            Ok(Applied::Reflected) => (None, None),
            Ok(Applied::Late) => (
                Some(EventResult::Late),
                self.cfg.time.late_to_dead_letter.then(|| {
                    format!(
                        "late event: older than the partition's watermark {}; applied to lifetime aggregates only",
                        format_rfc3339(proc.watermark(pos.partition))
                    )
                }),
            ),
        };
        if let Some(result) = result {
            self.shared.metrics.event(topic as usize, result);
            match result {
                EventResult::DeadLettered => summary.dead_lettered += 1,
                _ => summary.events_ok += 1,
            }
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
            let rec = BaseRecord::with_opaque_to(
                &self.cfg.kafka.dead_letter_topic,
                Box::new(Sent::Output(pos)),
            )
            .key(msg.key().unwrap_or(&[]))
            .payload(payload)
            .headers(headers);
            send(producer, rec, &self.shared).await?;
        }
        self.publish(producer, pos, &outputs).await?;
        if let (false, Some(ts)) = (outputs.is_empty(), msg.timestamp().to_millis()) {
            let secs = (wall_ms() - ts).max(0) as f64 / 1000.0;
            self.shared.metrics.change_latency.observe(secs);
        }
        Ok(())
    }

    /// Sends serialized changes to the output topic, attributed to input `pos`.
    async fn publish(
        &self,
        producer: &ThreadedProducer<ProducerCtx>,
        pos: SourcePos,
        outputs: &[(CompactString, Vec<u8>)],
    ) -> Result<(), PipelineError> {
        for (key, out) in outputs {
            let rec = BaseRecord::with_opaque_to(
                &self.cfg.kafka.output_topic,
                Box::new(Sent::Output(pos)),
            )
            .key(key.as_bytes())
            .payload(out.as_slice());
            send(producer, rec, &self.shared).await?;
        }
        Ok(())
    }
}

/// Logs consumer errors without flooding: librdkafka reports a broker outage many times a
/// second while it retries. A new kind of error is logged at once, a repeat at most every
/// 10 s with the count in between.
#[derive(Default)]
struct ErrorLog {
    last: Option<(String, Instant)>,
    repeats: u64,
}

impl ErrorLog {
    fn report(&mut self, e: &KafkaError) {
        let text = e.to_string();
        match &self.last {
            Some((t, at)) if *t == text && at.elapsed() < Duration::from_secs(10) => {
                self.repeats += 1;
            }
            _ => {
                warn!(error = %text, repeats = self.repeats, "consumer error (librdkafka retries)");
                self.last = Some((text, Instant::now()));
                self.repeats = 0;
            }
        }
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
    rec: BaseRecord<'_, [u8], [u8], Box<Sent>>,
    shared: &Shared,
) -> Result<(), PipelineError> {
    send_pausing(producer, rec, Duration::from_millis(5))
        .await
        .map_err(|e| {
            let reason = format!("cannot enqueue output: {e}");
            shared.progress().failed.get_or_insert(reason.clone());
            PipelineError::Delivery(reason)
        })
}

/// [`send_waiting`] for async code: while the producer's queue is full it awaits `pause`
/// (backpressure, not an error) instead of blocking the thread. Other errors are returned.
pub(crate) async fn send_pausing<C, K, P>(
    producer: &ThreadedProducer<C>,
    mut rec: BaseRecord<'_, K, P, C::DeliveryOpaque>,
    pause: Duration,
) -> Result<(), KafkaError>
where
    C: rdkafka::producer::ProducerContext,
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    while let Some(r) = try_send(producer, rec)? {
        rec = r;
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

/// [`send`] for the commit interval and the rebalance callbacks, which are not async.
fn send_blocking(
    producer: &ThreadedProducer<ProducerCtx>,
    rec: BaseRecord<'_, [u8], [u8], Box<Sent>>,
    shared: &Shared,
) -> Result<(), PipelineError> {
    send_waiting(producer, rec, Duration::from_millis(2)).map_err(|e| {
        shared.progress().changelog_inflight -= 1;
        let reason = format!("cannot enqueue a changelog record: {e}");
        shared.fail(reason.clone());
        PipelineError::Delivery(reason)
    })
}

/// Enqueues one record from a thread that may block, sleeping `pause` whenever the
/// producer's queue is full (backpressure, not an error). Other errors are returned.
pub fn send_waiting<C, K, P>(
    producer: &ThreadedProducer<C>,
    mut rec: BaseRecord<'_, K, P, C::DeliveryOpaque>,
    pause: Duration,
) -> Result<(), KafkaError>
where
    C: rdkafka::producer::ProducerContext,
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    while let Some(r) = try_send(producer, rec)? {
        rec = r;
        std::thread::sleep(pause);
    }
    Ok(())
}

/// One attempt to enqueue `rec`: `Ok(None)` enqueued, `Ok(Some(rec))` the producer's queue
/// is full (try again later), `Err` any other error. The waiting is the callers'
/// ([`send_waiting`], [`send_pausing`]).
fn try_send<'a, C, K, P>(
    producer: &ThreadedProducer<C>,
    rec: BaseRecord<'a, K, P, C::DeliveryOpaque>,
) -> Result<Option<BaseRecord<'a, K, P, C::DeliveryOpaque>>, KafkaError>
where
    C: rdkafka::producer::ProducerContext,
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    match producer.send(rec) {
        Ok(()) => Ok(None),
        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => Ok(Some(r)),
        Err((e, _)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = r#"
[kafka]
group_id = "g"
client_id = "c"
[kafka.common]
"security.protocol" = "sasl_ssl"
"queued.min.messages" = "5"
[kafka.consumer]
"queued.min.messages" = "1000"
"isolation.level" = "read_uncommitted"
[kafka.producer]
"linger.ms" = "50"
"#;
        Config::from_toml("c.toml", text, &[]).unwrap()
    }

    #[test]
    fn every_client_gets_the_common_properties_and_its_own_win() {
        let cfg = config();
        // The admin and metadata clients: the common properties only.
        let admin = client_config(&cfg, &[], &BTreeMap::new());
        assert_eq!(admin.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(admin.get("queued.min.messages"), Some("5"));
        let input = client_config(&cfg, &CONSUMER_DEFAULTS, &cfg.kafka.consumer);
        assert_eq!(input.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(input.get("queued.min.messages"), Some("1000"));
        assert_eq!(input.get("isolation.level"), Some("read_uncommitted"));
        let producer = producer_config(&cfg);
        assert_eq!(producer.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(producer.get("linger.ms"), Some("50"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn the_restore_consumer_takes_the_consumer_properties_but_not_what_restoring_needs() {
        let cfg = config();
        let r = restore_config(&cfg);
        assert_eq!(r.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(r.get("queued.min.messages"), Some("1000"));
        assert_eq!(r.get("isolation.level"), Some("read_committed"));
        assert_eq!(r.get("group.id"), Some("g-restore"));
        assert_eq!(r.get("client.id"), Some("c-restore"));
        assert_eq!(r.get("enable.auto.commit"), Some("false"));
        // Without user properties it reads ahead like the input consumer.
        let plain = restore_config(&Config::default());
        assert_eq!(plain.get(READ_AHEAD.0), Some(READ_AHEAD.1));
    }
}
