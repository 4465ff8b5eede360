//! `microseg bench`: measurements printed as JSON lines, one per measurement, each with the
//! command and the machine, so that anyone can rerun them (BENCHMARKS.md, README "Restore").
//!
//! This module owns the benchmark harness. It measures, in one run so that ratios hold on a
//! noisy machine:
//!
//! * `decode_only`: pre-serialized generated events (the bytes the engine sees) decoded into
//!   the engine's event type, one core — the input's limit (`decode_only_eps`);
//! * `engine`: decode + processor (watermark, timers, state update, rule evaluation, diff) +
//!   change serialization, one core, no Kafka, no I/O, with the default rules and a heavier
//!   set of 38 rules (`engine_eps`, `engine_vs_decode`). Events are generated in chunks of
//!   `CHUNK` outside the timed sections, and each chunk is decoded-only and then processed.
//!   The line also counts the changes caused by timers and the timers the partition clock
//!   fired. After each chunk, outside the engine's time, the changelog records of every
//!   customer the chunk changed are taken, as the pipeline does once per commit interval
//!   (`changelog_records_per_s`: encoding and copying out, the cost the consumer's task pays);
//! * `bytes_per_customer`: resident memory (VmRSS) growth while the engine built its
//!   customers, divided by the customers, with the default windows (7d/30d/90d, 1 h buckets).
//!   Before each such run the allocator returns its free memory to the OS
//!   ([`crate::alloc::release_free_memory`]), so that a run does not count as new the pages an
//!   earlier one freed, and again before the final reading, so that memory freed but not yet
//!   returned does not count (`bytes_per_customer_unreleased`: the reading before that).
//!   Beside it, `held_per_customer`: what the customer stores hold by part (entry, index,
//!   the activity buffer's counts, window entries, recent ids and spare room, attributes, the
//!   rules' words), the sizes asked of the allocator, read from every customer after the run;
//!
//! and restore from the changelog:
//!
//! * `restore_in_memory`: changelog records already in memory → customers, timers and
//!   checkpoints rebuilt as the pipeline rebuilds them ([`crate::restore`]: the partitions'
//!   restorers on worker threads, fed by one thread), into memory the process
//!   has not held restored customers in yet; then `restore_in_memory_one_core`, the
//!   restorers fed directly on one thread, into the memory the first one freed (the codec's
//!   and the restorer's limit on one core);
//! * `restore_kafka` (with `--brokers`): the same records in a compacted changelog topic on a
//!   real broker; a pipeline joins a fresh group, restores every partition before consuming
//!   and reports ready. The figure is the time the pipeline spent restoring (from
//!   assignment to ready), so the group join is not counted.
//!
//! Customer states come from generated input (all event types, windows, attributes): a pool
//! of distinct states is built by the engine and assigned round-robin to the benchmark's
//! customer ids, so record sizes and decode work are those of real customers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use serde_json::json;

use crate::changelog::{self, Checkpoint, CHECKPOINT_KEY};
use crate::config::Config;
use crate::engine::{Customer, Engine};
use crate::event::decode;
use crate::generate::Generator;
use crate::metrics::Metrics;
use crate::pipeline::{send_waiting, Pipeline};
use crate::processor::Processor;
use crate::rules::RuleSet;

mod e2e;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Customers (engine and restore measurements).
    pub customers: usize,
    /// Events for the engine measurements.
    pub events: u64,
    /// Also measure bytes per customer at this many customers (one event each), if set.
    pub big_customers: Option<usize>,
    /// Kafka bootstrap servers for the through-Kafka measurement (skipped without).
    pub brokers: Option<String>,
    pub partitions: i32,
    /// Events pre-loaded for the end-to-end measurement (with `brokers`).
    pub e2e_events: u64,
    /// Rounds of the end-to-end measurement: baseline, echo and pipeline passes (at least 1).
    pub e2e_pairs: u32,
    /// Offered load of the latency measurement, events/s (with `brokers`).
    pub latency_rate: u64,
    /// Duration of the latency measurement's load, seconds (the first second is a warm-up).
    pub latency_seconds: f64,
    /// One measurement only (`--only`), or all of them.
    pub only: Option<Only>,
    /// The command line, echoed in every result.
    pub command: String,
}

/// A single measurement to run (`bench --only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// The engine with the default rules, and bytes per customer.
    Default,
    /// The engine with the heavy rules.
    Heavy,
    /// Restore from the changelog in memory (and through the broker with `--brokers`).
    Restore,
}

/// The machine, as reported with every measurement.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

/// Distinct realistic customer states built from generated input.
fn state_pool(engine: &Engine, n: usize) -> Vec<Customer> {
    let mut g = Generator::new(7, n, 1_767_225_600_000, 60_000);
    let mut pool: Vec<Option<Customer>> = vec![None; n];
    let mut out = Vec::new();
    for _ in 0..n * 25 {
        let ev = g.next_event();
        let Ok(d) = decode(ev.json.as_bytes()) else {
            continue;
        };
        let idx: usize = ev.customer_id.trim_start_matches("c-").parse().unwrap_or(0);
        let c = pool[idx % n].get_or_insert_with(|| engine.new_customer());
        let _ = engine.apply(c, &d, &mut out);
        out.clear();
    }
    pool.into_iter().flatten().collect()
}

/// The changelog of `customers` customers over `partitions` partitions: (partition, key,
/// value), customers first, then one checkpoint per partition.
fn records(engine: &Engine, customers: usize, partitions: i32) -> Vec<(i32, Vec<u8>, Vec<u8>)> {
    let pool = state_pool(engine, 2000.min(customers.max(1)));
    let encoded: Vec<Vec<u8>> = pool
        .iter()
        .map(|c| {
            let mut b = Vec::new();
            changelog::encode(engine, c, 0, &[0], &mut b);
            b
        })
        .collect();
    let mut out: Vec<(i32, Vec<u8>, Vec<u8>)> = (0..customers)
        .map(|i| {
            let key = format!("b-{i}").into_bytes();
            let p = (crate::rules::fnv1a(&key) % partitions.max(1) as u64) as i32;
            (p, key, encoded[i % encoded.len()].clone())
        })
        .collect();
    for p in 0..partitions {
        let mut b = Vec::new();
        Checkpoint {
            offsets: vec![0],
            watermark: 1_767_225_600_000,
            topics: vec![(1_767_225_600_000, 0)],
        }
        .encode(&mut b);
        out.push((p, CHECKPOINT_KEY.to_vec(), b));
    }
    out
}

fn emit(name: &str, opts: &BenchOptions, fields: serde_json::Value) {
    let mut v = json!({
        "measurement": name,
        "command": opts.command,
        "machine": machine(),
    });
    if let (Some(o), Some(f)) = (v.as_object_mut(), fields.as_object()) {
        for (k, x) in f {
            o.insert(k.clone(), x.clone());
        }
    }
    println!("{v}");
}

/// Resident memory of this process, bytes.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// One chunk of pre-serialized events with the partition each key maps to.
fn chunk(g: &mut Generator, n: u64) -> Vec<(i32, Vec<u8>)> {
    (0..n)
        .map(|_| {
            let ev = g.next_event();
            let p = crate::api::kafka_partition(ev.customer_id.as_bytes(), 3);
            (p, ev.json.into_bytes())
        })
        .collect()
}

/// Events generated at a time for the engine run. Small enough that the live chunk (about
/// 300 bytes an event) does not weigh in `bytes_per_customer` (30 MB over 1 M customers is
/// 30 bytes each; chunks of 1 M events added about 300), large enough to be far bigger than
/// the CPU caches, so decoding reads memory as it would from a consumer's buffers.
const CHUNK: u64 = 100_000;

/// Seconds spent decoding, seconds spent in the whole engine path, changes emitted, and the
/// processor (holding the customers).
struct EngineRun {
    decode_secs: f64,
    engine_secs: f64,
    changes: u64,
    /// Of `changes`, those caused by time passing (timers) rather than by the event.
    changes_by_timer: u64,
    /// Timers fired by the partition clock (customers re-evaluated without an event).
    timers_fired: u64,
    change_bytes: u64,
    /// Changelog records taken after each chunk (untimed in `engine_secs`), and their time.
    changelog_records: u64,
    changelog_secs: f64,
    processor: Processor,
}

fn engine_run(rules: &Arc<RuleSet>, customers: usize, events: u64) -> EngineRun {
    let time = Config::default().time;
    let processor = Processor::new(Engine::new(rules.clone()), &time, 1);
    // About 90 simulated days whatever the size, like a quarter of history.
    let ms_per_event = (90 * 86_400_000 / events.max(1) as i64).max(1);
    let mut g = Generator::new(42, customers, 1_767_225_600_000, ms_per_event);
    g.malformed_every = 1000;
    let (mut decode_secs, mut engine_secs, mut changes, mut change_bytes) = (0.0, 0.0, 0u64, 0u64);
    let (mut changes_by_timer, mut fired) = (0u64, crate::processor::Fired::default());
    let (mut changelog_records, mut changelog_secs) = (0u64, 0.0);
    let mut offsets = [0i64; 3];
    let mut done = 0;
    let mut out = Vec::new();
    while done < events {
        let n = (events - done).min(CHUNK);
        let batch = chunk(&mut g, n);
        let t = Instant::now();
        let mut ok = 0u64;
        for (_, bytes) in &batch {
            ok += std::hint::black_box(decode(bytes)).is_ok() as u64;
        }
        decode_secs += t.elapsed().as_secs_f64();
        std::hint::black_box(ok);
        let t = Instant::now();
        for (p, bytes) in &batch {
            let offset = offsets[*p as usize];
            offsets[*p as usize] += 1;
            let Ok(ev) = decode(bytes) else { continue };
            let src = crate::processor::Source {
                topic: 0,
                partition: *p,
                offset,
            };
            let _ = processor.event(src, &ev, 0, &mut out, &mut fired);
            for e in out.drain(..) {
                changes_by_timer += e.change.by_timer as u64;
                let cause = crate::output::Cause::of(
                    &e.change,
                    crate::output::Cause::Event {
                        event_id: ev.event_id.as_deref(),
                        topic: "events",
                        partition: *p,
                        offset,
                    },
                );
                let json = crate::output::change_json(rules, &e.customer_id, cause, &e.change);
                change_bytes += json.len() as u64;
                changes += 1;
            }
        }
        engine_secs += t.elapsed().as_secs_f64();
        // The pipeline takes the changelog records of every changed customer once per commit
        // interval, which empties the dirty lists; a chunk is a fraction of a second's input.
        let t = Instant::now();
        for (p, offset) in offsets.iter().enumerate() {
            let batch = processor.changelog(p as i32, &[*offset]);
            changelog_records += batch.len() as u64;
            // As the pipeline does once the records are sent.
            processor.recycle(p as i32, batch);
        }
        changelog_secs += t.elapsed().as_secs_f64();
        done += n;
    }
    EngineRun {
        decode_secs,
        engine_secs,
        changes,
        changes_by_timer,
        timers_fired: fired.timers,
        change_bytes,
        changelog_records,
        changelog_secs,
        processor,
    }
}

/// Resident memory grown since `before` (bytes): after the allocator has returned the memory
/// it holds free to the OS, and (second) before it did. mimalloc returns freed pages after a
/// delay, at its next calls, so without the return the reading depends on when the last frees
/// happened: about 90 bytes per customer either way at 1 M customers (BENCHMARKS.md,
/// fourteenth session). Memory freed is not memory the customers hold.
fn grown_since(before: u64) -> (u64, u64) {
    let unreleased = rss_bytes().saturating_sub(before);
    crate::alloc::release_free_memory();
    (rss_bytes().saturating_sub(before), unreleased)
}

/// The engine and memory measurements.
fn engine_measurements(opts: &BenchOptions, rules: &Arc<RuleSet>) -> Result<(), String> {
    let heavy = Arc::new(
        RuleSet::from_toml("config/bench-heavy.toml (embedded)", HEAVY_RULES)
            .map_err(|e| e.to_string())?,
    );
    for (name, set) in [("default", rules), ("heavy", &heavy)] {
        let only = match opts.only {
            None => true,
            Some(Only::Default) => name == "default",
            Some(Only::Heavy) => name == "heavy",
            Some(Only::Restore) => false,
        };
        if !only {
            continue;
        }
        crate::alloc::release_free_memory();
        let before = rss_bytes();
        let r = engine_run(set, opts.customers, opts.events);
        let customers = r.processor.customer_count();
        let (grown, unreleased) = grown_since(before);
        let decode_eps = opts.events as f64 / r.decode_secs;
        let engine_eps = opts.events as f64 / r.engine_secs;
        if name == "default" {
            emit(
                "decode_only",
                opts,
                json!({"events": opts.events, "decode_only_eps": decode_eps.round()}),
            );
        }
        let rule_count: usize = set
            .segmentations
            .iter()
            .map(|s| s.segments.len())
            .sum::<usize>()
            + set.segments.len();
        emit(
            "engine",
            opts,
            json!({
                "rules": name,
                "rule_count": rule_count,
                "customers": customers,
                "events": opts.events,
                "changes": r.changes,
                "changes_by_timer": r.changes_by_timer,
                "timers_fired": r.timers_fired,
                "change_bytes_avg": r.change_bytes / r.changes.max(1),
                "engine_eps": engine_eps.round(),
                "decode_only_eps": decode_eps.round(),
                "engine_vs_decode": (engine_eps / decode_eps * 1000.0).round() / 1000.0,
                "changelog_records": r.changelog_records,
                "changelog_records_per_s": (r.changelog_records as f64 / r.changelog_secs.max(1e-9)).round(),
                // What the pipeline's consumer task does per event: the engine, then its share
                // of the changelog takes.
                "engine_with_changelog_eps": (opts.events as f64 / (r.engine_secs + r.changelog_secs)).round(),
            }),
        );
        if name == "default" {
            emit(
                "bytes_per_customer",
                opts,
                json!({
                    "customers": customers,
                    "events": opts.events,
                    "bytes_per_customer": grown / customers.max(1) as u64,
                    "bytes_per_customer_unreleased": unreleased / customers.max(1) as u64,
                    "held_per_customer": held_per_customer(&r.processor.held()),
                    "method": "VmRSS growth over the engine run (generated input, default windows) / customers, the allocator's free memory returned to the OS before the run and again before the final reading (bytes_per_customer_unreleased: without that second return); includes allocator overhead, the customer stores (entries and index), the timer index and the changelog take's buffers",
                    "held_method": HELD_METHOD,
                }),
            );
        }
        drop(r);
    }
    if let Some(n) = opts.big_customers.filter(|_| opts.only.is_none()) {
        // Without this, the run reused pages the runs above freed, and measured about 150
        // bytes per customer too few (BENCHMARKS.md, fourteenth run).
        crate::alloc::release_free_memory();
        let before = rss_bytes();
        let r = engine_run(rules, n, n as u64);
        let customers = r.processor.customer_count();
        let (grown, unreleased) = grown_since(before);
        emit(
            "bytes_per_customer",
            opts,
            json!({
                "customers": customers,
                "events": n,
                "bytes_per_customer": grown / customers.max(1) as u64,
                "bytes_per_customer_unreleased": unreleased / customers.max(1) as u64,
                "held_per_customer": held_per_customer(&r.processor.held()),
                "method": "VmRSS growth over an engine run of about one event per customer (default windows) / customers, the allocator's free memory returned to the OS before the run and again before the final reading (bytes_per_customer_unreleased: without that second return)",
                "held_method": HELD_METHOD,
            }),
        );
    }
    Ok(())
}

/// How `held_per_customer` is counted.
const HELD_METHOD: &str = "the sizes the customer stores asked of the allocator, read from every customer after the run, / customers; bytes_per_customer minus their total is the allocator's rounding to size classes, partly used pages, the timer index, the changelog's dirty lists and take buffers";

/// What the customers hold per customer, by part ([`crate::store::Held`]), to a tenth of a
/// byte: where `bytes_per_customer` goes.
fn held_per_customer(h: &crate::store::Held) -> serde_json::Value {
    let per = |b: usize| (b as f64 * 10.0 / h.customers.max(1) as f64).round() / 10.0;
    let a = &h.activity;
    json!({
        "entry": per(h.entries),
        "index": per(h.index),
        "long_ids": per(h.long_ids),
        "activity_counts": per(a.counts),
        "activity_purchases": per(a.purchases),
        "activity_engagements": per(a.engagements),
        "activity_recent_ids": per(a.recent_ids),
        "activity_spare": per(a.spare),
        "attributes": per(a.attributes),
        "rule_words": per(a.rule_words),
        "total": per(h.total()),
    })
}

/// The heavier rule set (38 rules): the defaults plus segments on attributes, windows,
/// actions and channels.
pub const HEAVY_RULES: &str = include_str!("../../config/bench-heavy.toml");

/// Runs every measurement.
pub async fn run(opts: BenchOptions, rules: Arc<RuleSet>) -> Result<(), String> {
    engine_measurements(&opts, &rules)?;
    match opts.only {
        None => {}
        Some(Only::Restore) => return restore_measurements(&opts, rules).await,
        Some(Only::Default | Only::Heavy) => return Ok(()),
    }
    // Latency first, while the broker holds little: Nisshi (in memory) slows down as the
    // loads of the other measurements pile up.
    if let Some(brokers) = &opts.brokers {
        e2e::latency(&opts, &rules, brokers).await?;
        e2e::throughput(&opts, &rules, brokers).await?;
    }
    restore_measurements(&opts, rules).await
}

/// Produces every record (partition: explicit, or by key), waiting whenever the producer's
/// queue is full, then flushes.
fn load<'a>(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    records: impl Iterator<Item = (Option<i32>, &'a [u8], &'a [u8])>,
) -> Result<(), String> {
    for (p, k, v) in records {
        let mut rec = BaseRecord::<[u8], [u8]>::to(topic).key(k).payload(v);
        rec.partition = p;
        send_waiting(producer, rec, Duration::from_millis(2))
            .map_err(|e| format!("produce: {e}"))?;
    }
    producer
        .flush(Duration::from_secs(300))
        .map_err(|e| format!("flush: {e}"))
}

/// A unique prefix for this run's topics and groups.
fn run_id() -> String {
    format!(
        "bench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    )
}

/// Creates topics (name, partitions, compacted) on `brokers`.
async fn create_topics(brokers: &str, topics: &[(&str, i32, bool)]) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| e.to_string())?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, p, compact)| {
            let t = NewTopic::new(name, *p, TopicReplication::Fixed(1));
            if *compact {
                t.set("cleanup.policy", "compact")
            } else {
                t
            }
        })
        .collect();
    for r in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .map_err(|e| e.to_string())?
    {
        r.map_err(|(t, e)| format!("create {t}: {e}"))?;
    }
    Ok(())
}

/// A producer for loading topics (batched: throughput, not latency).
fn loader(brokers: &str) -> Result<ThreadedProducer<DefaultProducerContext>, String> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .create()
        .map_err(|e| e.to_string())
}

/// A configuration for a pipeline of this run: `name`'s topics and group.
fn bench_config(brokers: &str, run_id: &str, name: &str) -> Config {
    let mut cfg = Config::default();
    cfg.kafka.brokers = brokers.to_owned();
    cfg.kafka.group_id = format!("{run_id}-{name}");
    cfg.kafka.input_topics = vec![format!("{run_id}-{name}-in")];
    cfg.kafka.output_topic = format!("{run_id}-{name}-out");
    cfg.kafka.dead_letter_topic = format!("{run_id}-{name}-dlq");
    cfg
}

/// The longest any one phase may take before the benchmark gives up.
const PHASE_TIMEOUT: Duration = Duration::from_secs(1800);

/// A pipeline running in this process, with its stop switch.
struct Running {
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// None once awaited.
    task: Option<
        tokio::task::JoinHandle<
            Result<crate::pipeline::RunSummary, crate::pipeline::PipelineError>,
        >,
    >,
}

impl Running {
    fn start(cfg: crate::config::Config, rules: &Arc<RuleSet>) -> Running {
        let metrics = Arc::new(Metrics::new(rules, &cfg.kafka.input_topics));
        let pipeline = Arc::new(Pipeline::new(
            cfg,
            Engine::new(rules.clone()),
            metrics.clone(),
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let p = pipeline.clone();
        let task = tokio::spawn(async move {
            p.run(async {
                let _ = stopped.await;
            })
            .await
        });
        Running {
            pipeline,
            metrics,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Waits until `done` holds, polling every millisecond; an error if the pipeline stopped
    /// or the phase timed out.
    async fn until(
        &mut self,
        what: &str,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + PHASE_TIMEOUT;
        while !done(self) {
            if let Some(task) = self.task.take_if(|t| t.is_finished()) {
                return Err(match task.await {
                    Ok(Err(e)) => format!("the pipeline stopped while waiting for {what}: {e}"),
                    _ => format!("the pipeline stopped while waiting for {what}"),
                });
            }
            if Instant::now() > deadline {
                return Err(format!("timed out waiting for {what}"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Restores `recs` into a new processor as the pipeline does (`restore::restore`, on up to
/// `threads` worker threads), or (`None`) with the restorers fed directly on this thread:
/// (customers, seconds).
fn restore_in_memory(
    rules: &Arc<RuleSet>,
    recs: &[(i32, Vec<u8>, Vec<u8>)],
    partitions: i32,
    threads: Option<usize>,
) -> Result<(u64, f64), String> {
    let processor = Processor::new(Engine::new(rules.clone()), &Config::default().time, 1);
    let parts: Vec<i32> = (0..partitions).collect();
    let started = Instant::now();
    let restorers = match threads {
        Some(threads) => crate::restore::restore(&processor, &parts, threads, |feed| {
            recs.iter()
                .try_for_each(|(p, k, v)| feed.record(*p, 0, k, Some(v)))
        })?,
        None => {
            let mut restorers: Vec<_> = parts.iter().map(|&p| (p, processor.restorer(p))).collect();
            for (p, k, v) in recs {
                restorers[*p as usize]
                    .1
                    .record(k, Some(v))
                    .map_err(|e| e.to_string())?;
            }
            restorers
        }
    };
    let restored: u64 = restorers
        .into_iter()
        .map(|(_, r)| r.finish().customers)
        .sum();
    Ok((restored, started.elapsed().as_secs_f64()))
}

/// The restore measurements.
async fn restore_measurements(opts: &BenchOptions, rules: Arc<RuleSet>) -> Result<(), String> {
    let engine = Engine::new(rules.clone());
    let recs = records(&engine, opts.customers, opts.partitions);
    let bytes: usize = recs.iter().map(|(_, k, v)| k.len() + v.len()).sum();

    // In memory: on the pipeline's worker threads, into memory the process has not held
    // restored customers in yet (as after a restart), then on this thread alone, into the
    // memory the first restore freed.
    let workers = crate::restore::workers(opts.partitions.max(1) as usize);
    for (name, threads) in [
        ("restore_in_memory", Some(workers)),
        ("restore_in_memory_one_core", None),
    ] {
        let (restored, secs) = restore_in_memory(&rules, &recs, opts.partitions, threads)?;
        emit(
            name,
            opts,
            json!({
                "customers": restored,
                // Worker threads (0: none, the restorers fed on the reading thread).
                "workers": threads.unwrap_or(0),
                "record_bytes_avg": bytes / recs.len().max(1),
                "seconds": secs,
                "restore_customers_per_s": (restored as f64 / secs).round(),
            }),
        );
    }

    let Some(brokers) = opts.brokers.clone() else {
        return Ok(());
    };
    let run_id = run_id();
    let cfg = bench_config(&brokers, &run_id, "restore");
    let changelog_topic = cfg.changelog_topic();
    create_topics(
        &brokers,
        &[
            (&cfg.kafka.input_topics[0], opts.partitions, false),
            (&changelog_topic, opts.partitions, true),
        ],
    )
    .await?;
    let producer = loader(&brokers)?;
    let loading = Instant::now();
    load(
        &producer,
        &changelog_topic,
        recs.iter()
            .map(|(p, k, v)| (Some(*p), k.as_slice(), v.as_slice())),
    )?;
    let load_secs = loading.elapsed().as_secs_f64();

    let mut running = Running::start(cfg, &rules);
    let ready = running.until("the restore", |r| r.pipeline.ready()).await;
    let secs = running.metrics.last_restore_seconds.get();
    let customers = running.metrics.restored_customers.get();
    running.stop().await;
    ready?;
    emit(
        "restore_kafka",
        opts,
        json!({
            "customers": customers,
            "partitions": opts.partitions,
            "record_bytes_avg": bytes / recs.len().max(1),
            "load_seconds": load_secs,
            "seconds": secs,
            "restore_customers_per_s": (customers as f64 / secs.max(1e-9)).round(),
        }),
    );
    Ok(())
}
