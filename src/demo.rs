//! `microseg demo`: the whole engine on the real Kafka client path, with no external broker.
//!
//! This module owns the demo: it starts librdkafka's in-process mock cluster, creates the
//! topics, produces synthetic B2B customers' events at a steady rate (simulated time runs
//! fast, so customers lapse within seconds), runs the [`Pipeline`] against it, reads the
//! segment-change topic back with a separate consumer, and prints throughput, segment sizes
//! and recent changes with their reasons.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use tokio::sync::watch;

use crate::config::Config;
use crate::engine::Engine;
use crate::generate::{Generator, Kind};
use crate::metrics::{EventResult, Metrics};
use crate::pipeline::Pipeline;
use crate::rules::RuleSet;
use crate::time::{parse_rfc3339, DAY_MS};

/// Demo settings (CLI flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Stop after this long (None: until Ctrl-C).
    pub duration: Option<Duration>,
    pub customers: usize,
    pub events_per_sec: u64,
    /// Simulated days per real second.
    pub sim_days_per_sec: f64,
    pub seed: u64,
    pub partitions: i32,
    /// Where to serve the HTTP API (if taken, any free port on 127.0.0.1); None: no API.
    pub http: Option<String>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            duration: None,
            customers: 2000,
            events_per_sec: 2000,
            sim_days_per_sec: 5.0,
            seed: 42,
            partitions: 3,
            http: Some("127.0.0.1:8080".into()),
        }
    }
}

/// What the demo saw, for the final summary (and tests).
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub produced: u64,
    pub processed: u64,
    pub dead_lettered: u64,
    pub entered: u64,
    pub exited: u64,
    pub changes_read_back: u64,
}

fn short_change(v: &serde_json::Value) -> String {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
    let mut line = format!("{:>7}  ", s("customer_id"));
    let seg = v.get("segmentation").and_then(|x| x.as_str());
    match (seg, s("change")) {
        (Some(g), "entered") => {
            let from = v.get("previous").and_then(|x| x.as_str()).unwrap_or("∅");
            let _ = write!(line, "{g}: {from} → {}", s("segment"));
        }
        (Some(g), _) => {
            let _ = write!(line, "{g}: left {}", s("segment"));
        }
        (None, c) => {
            let _ = write!(line, "{c:>7} {}", s("segment"));
        }
    }
    let cause = v
        .get("cause")
        .and_then(|c| c.get("kind"))
        .and_then(|k| k.as_str())
        .unwrap_or("?");
    let at = v.get("at").and_then(|x| x.as_str()).unwrap_or("");
    let because: Vec<String> = v
        .get("because")
        .and_then(|b| b.as_object())
        .map(|b| b.iter().take(3).map(|(k, v)| format!("{k}={v}")).collect())
        .unwrap_or_default();
    let _ = write!(
        line,
        "  [{cause} @ {}]  because {}",
        at.get(..10).unwrap_or(at),
        because.join(", ")
    );
    line
}

/// Runs the demo. Returns when the duration elapses or `ctrl_c` fires.
pub async fn run(
    opts: DemoOptions,
    rules: Arc<RuleSet>,
    ctrl_c: impl std::future::Future<Output = ()>,
) -> Result<DemoSummary, String> {
    let mock = MockCluster::new(1)
        .map_err(|e| format!("cannot start the embedded Kafka (librdkafka mock cluster): {e}"))?;
    let mut cfg = Config::default();
    cfg.kafka.brokers = mock.bootstrap_servers();
    cfg.kafka.group_id = "microseg-demo".into();
    cfg.kafka.create_topics = false;
    cfg.kafka
        .consumer
        .insert("session.timeout.ms".into(), "6000".into());
    cfg.pipeline.commit_interval_ms = 500;
    cfg.pipeline.drain_timeout_ms = 5000;
    // Simulated time runs fast: allow two wall seconds of it as lateness, so the three input
    // topics (consumed with some skew) do not make events late.
    cfg.time.allowed_lateness_ms = (opts.sim_days_per_sec * DAY_MS as f64 * 2.0) as i64;
    let changelog = cfg.changelog_topic();
    for t in cfg.kafka.input_topics.iter().chain([
        &cfg.kafka.output_topic,
        &cfg.kafka.dead_letter_topic,
        &changelog,
    ]) {
        mock.create_topic(t, opts.partitions, 1)
            .map_err(|e| format!("cannot create topic {t}: {e}"))?;
    }
    let topic_for = |k: Kind| cfg.kafka.input_topics[k as usize].clone();

    let metrics = Arc::new(Metrics::new(&rules, &cfg.kafka.input_topics));
    let pipeline = Arc::new(Pipeline::new(
        cfg.clone(),
        Engine::new(rules.clone()),
        metrics.clone(),
    ));
    // The HTTP API, on the asked address or, if that is taken, any free port.
    let mut api_task = None;
    if let Some(addr) = &opts.http {
        let listener = match crate::api::bind(addr).await {
            Ok(l) => Ok(l),
            Err(_) => crate::api::bind("127.0.0.1:0").await,
        };
        match listener.and_then(|l| Ok((l.local_addr()?, l))) {
            Ok((at, l)) => {
                println!("HTTP API: http://{at}/v1/segments  ·  http://{at}/v1/customers/c-1  ·  http://{at}/v1/customers/c-1/explain?segment=lifecycle/active  ·  http://{at}/metrics");
                api_task = Some(tokio::spawn(crate::api::serve(
                    l,
                    pipeline.clone(),
                    std::future::pending(),
                )));
            }
            Err(e) => println!("HTTP API not started: {e}"),
        }
    }
    // Two-phase stop: the generator first, then (once the pipeline has caught up, or after a
    // grace period) the pipeline, the tail and the display.
    let (gen_stop_tx, gen_stop_rx) = watch::channel(false);
    // The generator says when it has stopped: until then it may still send a tick's events,
    // which the stop would otherwise not wait for.
    let (gen_done_tx, mut gen_done_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (tail_stop_tx, tail_stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // Generator → input topics, paced.
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("linger.ms", "5")
        .create()
        .map_err(|e| format!("demo producer: {e}"))?;
    let start_sim = parse_rfc3339("2026-01-01T00:00:00Z").unwrap_or(0);
    let ms_per_event =
        (opts.sim_days_per_sec * DAY_MS as f64 / opts.events_per_sec.max(1) as f64) as i64;
    let produced = Arc::new(Mutex::new(0u64));
    let sim_now = Arc::new(Mutex::new(start_sim));
    let gen_task = {
        let produced = produced.clone();
        let sim_now = sim_now.clone();
        let mut stop = gen_stop_rx;
        let producer = producer.clone();
        let topics: Vec<String> = (0..3)
            .map(|i| topic_for([Kind::Purchase, Kind::Engagement, Kind::Profile][i]))
            .collect();
        let mut generator = Generator::new(opts.seed, opts.customers, start_sim, ms_per_event);
        generator.malformed_every = 997;
        async move {
            let tick_ms = 20u64;
            let per_tick = (opts.events_per_sec * tick_ms / 1000).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tick.tick() => {}
                }
                for _ in 0..per_tick {
                    let g = generator.next_event();
                    let rec = BaseRecord::to(&topics[g.kind as usize])
                        .key(g.customer_id.as_str())
                        .payload(g.json.as_str());
                    if producer.send(rec).is_ok() {
                        *produced.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    }
                }
                *sim_now.lock().unwrap_or_else(|p| p.into_inner()) = generator.now();
            }
            let _ = gen_done_tx.send(true);
        }
    };

    // Tail of the output topic: what a downstream consumer sees.
    let tail: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", "microseg-demo-tail")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| format!("demo tail consumer: {e}"))?;
    tail.subscribe(&[&cfg.kafka.output_topic])
        .map_err(|e| format!("demo tail subscribe: {e}"))?;
    let recent = Arc::new(Mutex::new(VecDeque::<String>::new()));
    let read_back = Arc::new(Mutex::new(0u64));
    let tail_task = {
        let recent = recent.clone();
        let read_back = read_back.clone();
        let mut stop = tail_stop_rx;
        async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    m = tail.recv() => if let Ok(m) = m {
                        *read_back.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                        if let Some(v) = m.payload().and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok()) {
                            let mut r = recent.lock().unwrap_or_else(|p| p.into_inner());
                            // Prefer showing a mix: keep exits and segmentation moves.
                            r.push_back(short_change(&v));
                            if r.len() > 8 { r.pop_front(); }
                        }
                    },
                }
            }
        }
    };

    // Display.
    let started = Instant::now();
    let display_task = {
        let metrics = metrics.clone();
        let rules = rules.clone();
        let recent = recent.clone();
        let sim_now = sim_now.clone();
        let mut stop = stop_rx.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tick.tick() => {}
                }
                let processed = metrics.events_processed();
                let eps = (processed - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), processed);
                let sim =
                    crate::time::format_rfc3339(*sim_now.lock().unwrap_or_else(|p| p.into_inner()));
                let mut out = String::new();
                let _ = writeln!(out, "── t={:>4.0}s  simulated {}  events/s {:>7.0}  processed {}  dead-lettered {}  late {}  changes: {} entered, {} exited ({} by timers)",
                    started.elapsed().as_secs_f64(), sim.get(..10).unwrap_or(&sim), eps, processed, metrics.events_total(EventResult::DeadLettered),
                    metrics.events_total(EventResult::Late),
                    metrics.changes_total("entered"), metrics.changes_total("exited"), metrics.timer_changes.get());
                for s in &rules.segmentations {
                    let sizes: Vec<String> = (0..=s.segments.len())
                        .map(|i| {
                            format!(
                                "{}={}",
                                s.segment_name(i),
                                metrics.members(&s.name, s.segment_name(i))
                            )
                        })
                        .collect();
                    let _ = writeln!(out, "   {:<11} {}", s.name, sizes.join("  "));
                }
                let indep: Vec<String> = rules
                    .segments
                    .iter()
                    .map(|r| format!("{}={}", r.name, metrics.members("", &r.name)))
                    .collect();
                let _ = writeln!(out, "   {:<11} {}", "segments", indep.join("  "));
                let _ = writeln!(out, "   recent changes:");
                for line in recent.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    let _ = writeln!(out, "     {line}");
                }
                println!("{out}");
            }
        }
    };

    let timer = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let stopper = async {
        tokio::select! {
            _ = timer => {},
            _ = ctrl_c => {},
        }
        let _ = gen_stop_tx.send(true);
        let _ = gen_done_rx.wait_for(|d| *d).await;
        let _ = producer.flush(Duration::from_secs(2));
        let target = *produced.lock().unwrap_or_else(|p| p.into_inner());
        let grace = Instant::now();
        while metrics.events_processed() < target && grace.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop_tx.send(true);
    };
    let pipeline_task = async {
        let r = pipeline.run(stopped(stop_rx.clone())).await;
        // Let the tail read back what the pipeline delivered before it stops.
        let total = metrics.changes_total("entered") + metrics.changes_total("exited");
        let grace = Instant::now();
        while *read_back.lock().unwrap_or_else(|p| p.into_inner()) < total
            && grace.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = tail_stop_tx.send(true);
        r
    };
    let (result, _, _, _, _) =
        tokio::join!(pipeline_task, gen_task, tail_task, display_task, stopper);
    drop(producer);
    if let Some(t) = api_task {
        t.abort();
    }
    let run = result.map_err(|e| e.to_string())?;
    let summary = DemoSummary {
        produced: *produced.lock().unwrap_or_else(|p| p.into_inner()),
        processed: run.events_ok + run.dead_lettered,
        dead_lettered: run.dead_lettered,
        entered: metrics.changes_total("entered"),
        exited: metrics.changes_total("exited"),
        changes_read_back: *read_back.lock().unwrap_or_else(|p| p.into_inner()),
    };
    drop(mock);
    Ok(summary)
}
