//! The measurements through a real broker on loopback (`--brokers`):
//!
//! * `e2e`: one input topic is pre-loaded with generated events. A plain consumer with the
//!   pipeline's own consumer settings reads and decodes all of it (`baseline_eps`); then the
//!   full pipeline consumes the same topic, runs the engine and produces every change
//!   (`e2e_eps`, up to the last change acknowledged by the broker). Both are timed from the
//!   first message received to the last, so the group join is not counted, and both run
//!   in this process against the same broker. Between the two, an `echo` pass consumes
//!   and decodes like the baseline and also produces every event unchanged to an output
//!   topic with the pipeline's producer settings, until the broker acknowledged them all
//!   (`echo_eps`): what the broker allows a stream that writes about one record per event,
//!   with no engine at all. `e2e_vs_echo` is then what the pipeline's own work costs; it is
//!   steadier than `e2e_vs_baseline`, because the baseline's rate swings most.
//!
//!   The three alternate, `--e2e-pairs` rounds over the same topic (each pass in a group
//!   of its own), after one uncounted read of the topic (`warmup_eps`: the broker serves a
//!   topic faster once it has served it). The figures are the rounds' medians; each
//!   round's figures are reported as `pairs_*`. Over the same spans, the CPU time the
//!   process used (every thread), per event (`baseline_cpu_us_per_event`,
//!   `echo_cpu_us_per_event`, `e2e_cpu_us_per_event`): what each costs, less sensitive
//!   than throughput to the broker and the VM's drift.
//! * `latency`: a running pipeline (caught up, ready) is fed generated events at a fixed
//!   offered rate. A consumer of the output topic records, for every change caused by an
//!   event, the time from the event's send call to the change's arrival
//!   (`latency_p50_ms`, `latency_p99_ms`). The first second of the load is a warm-up and is
//!   not counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::json;

use super::{
    bench_config, create_topics, emit, load, loader, run_id, BenchOptions, Running, PHASE_TIMEOUT,
};
use crate::event::decode;
use crate::generate::Generator;
use crate::pipeline::{client_config, producer_config, send_pausing, CONSUMER_DEFAULTS};
use crate::rules::RuleSet;

/// Sum of the high watermarks of `topic`'s partitions (messages written to it).
fn messages_in(c: &BaseConsumer, topic: &str, partitions: i32) -> Result<i64, String> {
    let mut n = 0;
    for p in 0..partitions {
        let (lo, hi) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(|e| format!("watermarks of {topic}/{p}: {e}"))?;
        n += hi - lo;
    }
    Ok(n)
}

/// A client that only reads topics' watermarks ([`messages_in`]).
fn watermark_client(brokers: &str) -> Result<Arc<BaseConsumer>, String> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// [`messages_in`] off the async threads (it blocks on the broker).
async fn written(c: &Arc<BaseConsumer>, topic: &str, partitions: i32) -> Result<i64, String> {
    let (c, t) = (c.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || messages_in(&c, &t, partitions))
        .await
        .map_err(|e| e.to_string())?
}

/// CPU time this process has used so far (every thread: the consumer, librdkafka's, the
/// producer's), in seconds; 0 if the OS does not say.
fn process_cpu_secs() -> f64 {
    // SAFETY: `getrusage` only writes the struct it is given, which is zeroed and owned here.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Generated events (customer id as the key, JSON payload).
fn events(
    seed: u64,
    customers: usize,
    n: u64,
    start: i64,
    ms_per_event: i64,
) -> Vec<(String, String)> {
    let mut g = Generator::new(seed, customers, start, ms_per_event);
    (0..n)
        .map(|_| {
            let e = g.next_event();
            (e.customer_id, e.json)
        })
        .collect()
}

/// `e2e_eps` against `baseline_eps` and `echo_eps` over the same pre-loaded topic, in
/// `opts.e2e_pairs` rounds (baseline, echo, then pipeline) after one warm-up read; the
/// figures are the medians of the rounds, and every round's figures are reported too. The
/// broker and this VM drift by tens of per cent within a minute, so one round alone says
/// little about the ratios.
pub(super) async fn throughput(
    opts: &BenchOptions,
    rules: &Arc<RuleSet>,
    brokers: &str,
) -> Result<(), String> {
    let run = run_id();
    let cfg = bench_config(brokers, &run, "e2e");
    let input = cfg.kafka.input_topics[0].clone();
    let n = opts.e2e_events;
    // About ten events per customer over 90 simulated days, like the engine measurement.
    let customers = (n / 10).max(1) as usize;
    let evs = events(
        42,
        customers,
        n,
        1_767_225_600_000,
        (90 * 86_400_000 / n.max(1) as i64).max(1),
    );
    create_topics(brokers, &[(&input, opts.partitions, false)]).await?;
    let loading = Instant::now();
    load(
        &loader(brokers)?,
        &input,
        evs.iter().map(|(k, v)| (None, k.as_bytes(), v.as_bytes())),
    )?;
    let load_secs = loading.elapsed().as_secs_f64();
    drop(evs);
    // Nisshi serves a topic faster once it has served it (the first baseline of a run read
    // it at about three quarters of the rate of the later ones, BENCHMARKS.md): one read
    // first, not counted, so that every counted pass reads it warm.
    let warmup = baseline(&cfg, &format!("{run}-warmup"), n, None, opts.partitions).await?;

    let mut pairs = Vec::new();
    for i in 0..opts.e2e_pairs.max(1) {
        let base = baseline(
            &cfg,
            &format!("{run}-baseline-{i}"),
            n,
            None,
            opts.partitions,
        )
        .await?;
        let echo_topic = format!("{run}-echo-{i}");
        create_topics(brokers, &[(&echo_topic, opts.partitions, false)]).await?;
        let echo = baseline(
            &cfg,
            &format!("{run}-echo-{i}"),
            n,
            Some(&echo_topic),
            opts.partitions,
        )
        .await?;
        let mut pass = bench_config(brokers, &run, &format!("e2e-{i}"));
        pass.kafka.input_topics = vec![input.clone()];
        let full = pipeline(pass, rules, brokers, opts.partitions, n).await?;
        pairs.push((base, echo, full));
    }
    let eps = |p: &Pass| n as f64 / p.seconds.max(1e-9);
    let us_per_event = |p: &Pass| p.cpu_seconds * 1e6 / n.max(1) as f64;
    let round = |x: f64, places: i32| {
        let f = 10f64.powi(places);
        (x * f).round() / f
    };
    let col =
        |f: &dyn Fn(&(Pass, Pass, Pass)) -> f64| -> Vec<f64> { pairs.iter().map(f).collect() };
    let baseline_eps = col(&|(b, _, _)| eps(b));
    let echo_eps = col(&|(_, o, _)| eps(o));
    let e2e_eps = col(&|(_, _, e)| eps(e));
    let ratios = col(&|(b, _, e)| eps(e) / eps(b));
    let echo_ratios = col(&|(b, o, _)| eps(o) / eps(b));
    let vs_echo = col(&|(_, o, e)| eps(e) / eps(o));
    let baseline_cpu = col(&|(b, _, _)| us_per_event(b));
    let echo_cpu = col(&|(_, o, _)| us_per_event(o));
    let e2e_cpu = col(&|(_, _, e)| us_per_event(e));
    let rounded = |v: &[f64], places: i32| v.iter().map(|x| round(*x, places)).collect::<Vec<_>>();
    emit(
        "e2e",
        opts,
        json!({
            "events": n,
            "customers": customers,
            "partitions": opts.partitions,
            "pairs": pairs.len(),
            "changes": pairs.iter().map(|(_, _, e)| e.count).min().unwrap_or(0),
            "load_seconds": load_secs,
            "warmup_eps": eps(&warmup).round(),
            "baseline_decoded": pairs.iter().map(|(b, _, _)| b.count).min().unwrap_or(0),
            "echoed": pairs.iter().map(|(_, o, _)| o.count).min().unwrap_or(0),
            "baseline_eps": median(&baseline_eps).round(),
            "e2e_eps": median(&e2e_eps).round(),
            "e2e_vs_baseline": round(median(&ratios), 3),
            "baseline_cpu_us_per_event": round(median(&baseline_cpu), 1),
            "e2e_cpu_us_per_event": round(median(&e2e_cpu), 1),
            "echo_eps": median(&echo_eps).round(),
            "echo_vs_baseline": round(median(&echo_ratios), 3),
            "echo_cpu_us_per_event": round(median(&echo_cpu), 1),
            "e2e_vs_echo": round(median(&vs_echo), 3),
            "pairs_baseline_eps": rounded(&baseline_eps, 0),
            "pairs_e2e_eps": rounded(&e2e_eps, 0),
            "pairs_e2e_vs_baseline": rounded(&ratios, 3),
            "pairs_baseline_cpu_us_per_event": rounded(&baseline_cpu, 1),
            "pairs_e2e_cpu_us_per_event": rounded(&e2e_cpu, 1),
            "pairs_echo_eps": rounded(&echo_eps, 0),
            "pairs_echo_vs_baseline": rounded(&echo_ratios, 3),
            "pairs_echo_cpu_us_per_event": rounded(&echo_cpu, 1),
            "pairs_e2e_vs_echo": rounded(&vs_echo, 3),
        }),
    );
    Ok(())
}

/// One pass over the pre-loaded events: how long it took from its first message, the CPU
/// time the whole process used over the same span, and what it counted (events decoded by
/// the baseline, changes produced by the pipeline).
struct Pass {
    seconds: f64,
    cpu_seconds: f64,
    count: u64,
}

/// The median (the mean of the middle two for an even count); 0 for none.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The baseline: the pipeline's consumer settings, in a group of its own, consume and
/// decode all `n` pre-loaded events; nothing else (counts the events decoded). With `echo`,
/// each event is also produced unchanged to that topic (`partitions` partitions) with the
/// pipeline's producer settings, the pass ends when the broker has acknowledged them all,
/// and it counts the messages the topic holds: what the broker allows a stream that writes
/// about one record per event (the pipeline writes 1.09 changes per event here, plus the
/// changelog).
async fn baseline(
    cfg: &crate::config::Config,
    group: &str,
    n: u64,
    echo: Option<&str>,
    partitions: i32,
) -> Result<Pass, String> {
    let mut cc = client_config(cfg, &CONSUMER_DEFAULTS, &cfg.kafka.consumer);
    cc.set("group.id", group).set("enable.auto.commit", "false");
    let consumer: StreamConsumer = cc.create().map_err(|e| e.to_string())?;
    consumer
        .subscribe(&[&cfg.kafka.input_topics[0]])
        .map_err(|e| e.to_string())?;
    let producer: Option<ThreadedProducer<DefaultProducerContext>> = match echo {
        Some(_) => Some(producer_config(cfg).create().map_err(|e| e.to_string())?),
        None => None,
    };
    let (mut seen, mut decoded, mut first) = (0u64, 0u64, None);
    let mut cpu = 0.0;
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while seen < n {
        if Instant::now() > deadline {
            return Err(format!("baseline: {seen} of {n} messages in time"));
        }
        match tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            Ok(Ok(m)) => {
                first.get_or_insert_with(|| {
                    cpu = process_cpu_secs();
                    Instant::now()
                });
                seen += 1;
                let payload = m.payload().unwrap_or_default();
                if !payload.is_empty() {
                    decoded += std::hint::black_box(decode(payload)).is_ok() as u64;
                }
                if let (Some(p), Some(topic)) = (&producer, echo) {
                    let rec = BaseRecord::<[u8], [u8]>::to(topic)
                        .key(m.key().unwrap_or_default())
                        .payload(payload);
                    send_pausing(p, rec, Duration::from_millis(5))
                        .await
                        .map_err(|e| format!("echo: {e}"))?;
                }
            }
            Ok(Err(e)) => return Err(format!("baseline consumer: {e}")),
            Err(_) => {}
        }
    }
    if let Some(p) = producer {
        tokio::task::spawn_blocking(move || p.flush(PHASE_TIMEOUT))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("echo: not all acknowledged: {e}"))?;
    }
    let pass = Pass {
        seconds: first.map_or(0.0, |t| t.elapsed().as_secs_f64()),
        cpu_seconds: process_cpu_secs() - cpu,
        count: decoded,
    };
    match echo {
        None => Ok(pass),
        // Counted in the topic itself: what the broker holds, not what was handed over.
        Some(topic) => {
            let n = written(&watermark_client(&cfg.kafka.brokers)?, topic, partitions).await?;
            Ok(Pass {
                count: u64::try_from(n).unwrap_or(0),
                ..pass
            })
        }
    }
}

/// The full pipeline over the pre-loaded events, from its first event until every change
/// is acknowledged by the broker (the output topic holds them all).
async fn pipeline(
    cfg: crate::config::Config,
    rules: &Arc<RuleSet>,
    brokers: &str,
    partitions: i32,
    n: u64,
) -> Result<Pass, String> {
    let out_topic = cfg.kafka.output_topic.clone();
    let mut running = Running::start(cfg, rules);
    running
        .until("the first event", |r| r.metrics.events_processed() > 0)
        .await?;
    let started = Instant::now();
    let cpu = process_cpu_secs();
    running
        .until("every event", |r| r.metrics.events_processed() >= n)
        .await?;
    let changes =
        running.metrics.changes_total("entered") + running.metrics.changes_total("exited");
    let watermarks = watermark_client(brokers)?;
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        let written = written(&watermarks, &out_topic, partitions).await?;
        if written >= changes as i64 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{written} of {changes} changes written in time"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pass = Pass {
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: process_cpu_secs() - cpu,
        count: changes,
    };
    running.stop().await;
    Ok(pass)
}

/// The consumers' longest fetch wait in the latency measurement. Nisshi holds a fetch for
/// up to this long even when data arrives, so librdkafka's default (500 ms) would dominate
/// every figure; a Kafka broker answers as soon as data is there.
const LATENCY_FETCH_WAIT_MS: &str = "5";

/// Event produced → its change consumed, at a fixed offered load; and, as the broker's own
/// share, event produced → the event itself consumed.
pub(super) async fn latency(
    opts: &BenchOptions,
    rules: &Arc<RuleSet>,
    brokers: &str,
) -> Result<(), String> {
    let run = run_id();
    let mut cfg = bench_config(brokers, &run, "latency");
    cfg.kafka
        .consumer
        .insert("fetch.wait.max.ms".into(), LATENCY_FETCH_WAIT_MS.into());
    let input = cfg.kafka.input_topics[0].clone();
    let out_topic = cfg.kafka.output_topic.clone();
    create_topics(
        brokers,
        &[
            (&input, opts.partitions, false),
            (&out_topic, opts.partitions, false),
        ],
    )
    .await?;
    let rate = opts.latency_rate.max(1);
    let n = (rate as f64 * opts.latency_seconds).ceil().max(1.0) as u64;
    let warmup = rate.min(n / 2);
    // Event time starts now and moves one millisecond per event.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let evs = events(7, (rate as usize).max(1), n, now_ms, 1);

    let mut running = Running::start(cfg, rules);
    running.until("ready", |r| r.pipeline.ready()).await?;

    // Send instants (µs after t0) by generator sequence number (`e-<seq>`, from 1).
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..=n).map(|_| AtomicU64::new(0)).collect());
    let t0 = Instant::now();
    let done = Arc::new(AtomicBool::new(false));

    let watcher = {
        let (sent, done, brokers) = (sent.clone(), done.clone(), brokers.to_owned());
        let (input, output) = (input.clone(), out_topic);
        let partitions = opts.partitions;
        std::thread::spawn(move || {
            watch(
                &brokers, &input, &output, partitions, &sent, t0, warmup, &done,
            )
        })
    };

    let producer = {
        let (sent, brokers, input) = (sent.clone(), brokers.to_owned(), input.clone());
        std::thread::spawn(move || -> Result<f64, String> {
            let p: rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
                ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .set("linger.ms", "1")
                    .create()
                    .map_err(|e| e.to_string())?;
            let interval_us = 1_000_000.0 / rate as f64;
            for (i, (k, v)) in evs.iter().enumerate() {
                let due = (i as f64 * interval_us) as u64;
                let now = t0.elapsed().as_micros() as u64;
                if due > now + 1000 {
                    std::thread::sleep(Duration::from_micros(due - now));
                }
                sent[i + 1].store(t0.elapsed().as_micros() as u64, Ordering::Release);
                let rec = rdkafka::producer::BaseRecord::to(&input)
                    .key(k.as_bytes())
                    .payload(v.as_bytes());
                p.send(rec).map_err(|(e, _)| format!("produce: {e}"))?;
            }
            let secs = t0.elapsed().as_secs_f64();
            rdkafka::producer::Producer::flush(&p, Duration::from_secs(60))
                .map_err(|e| format!("flush: {e}"))?;
            Ok(secs)
        })
    };
    let send_secs = tokio::task::spawn_blocking(move || producer.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the load producer panicked".to_string())??;
    let processed = running
        .until("every event of the load", |r| {
            r.metrics.events_processed() >= n
        })
        .await;
    done.store(true, Ordering::Release);
    let (mut lat, mut hop) = tokio::task::spawn_blocking(move || watcher.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the output consumer panicked".to_string())??;
    running.stop().await;
    processed?;
    if lat.is_empty() || hop.is_empty() {
        return Err("latency: nothing of the load arrived".into());
    }
    lat.sort_by(f64::total_cmp);
    hop.sort_by(f64::total_cmp);
    let pct = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    emit(
        "latency",
        opts,
        json!({
            "offered_eps": rate,
            "sent_eps": (n as f64 / send_secs.max(1e-9)).round(),
            "events": n,
            "warmup_events": warmup,
            "changes_measured": lat.len(),
            "latency_p50_ms": pct(&lat, 0.50),
            "latency_p99_ms": pct(&lat, 0.99),
            "latency_max_ms": pct(&lat, 1.0),
            "broker_hop_p50_ms": pct(&hop, 0.50),
            "broker_hop_p99_ms": pct(&hop, 0.99),
            "method": format!("latency: an event's send call -> its change polled from the output topic; broker_hop: the same event polled from the input topic by a plain consumer. One process, pipeline defaults except fetch.wait.max.ms = {LATENCY_FETCH_WAIT_MS} on every consumer"),
        }),
    );
    Ok(())
}

/// The sequence number `<seq>` of an event id `e-<seq>` at `path` in a JSON message.
fn seq_of(payload: Option<&[u8]>, output: bool) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(payload?).ok()?;
    let id = if output {
        &v["cause"]["event_id"]
    } else {
        &v["event_id"]
    };
    id.as_str()?.strip_prefix("e-")?.parse().ok()
}

/// Reads the input and output topics from the start until the load is `done` and a second
/// passed without a message: the latencies (ms) of changes and of input events after the
/// warm-up.
#[allow(clippy::too_many_arguments)]
fn watch(
    brokers: &str,
    input: &str,
    output: &str,
    partitions: i32,
    sent: &[AtomicU64],
    t0: Instant,
    warmup: u64,
    done: &AtomicBool,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "microseg-bench-watch")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", LATENCY_FETCH_WAIT_MS)
        .create()
        .map_err(|e| e.to_string())?;
    let mut tpl = TopicPartitionList::new();
    for topic in [input, output] {
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(|e| e.to_string())?;
        }
    }
    c.assign(&tpl).map_err(|e| e.to_string())?;
    let (mut changes, mut hops) = (Vec::new(), Vec::new());
    let mut idle_since: Option<Instant> = None;
    loop {
        match c.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                idle_since = None;
                let at = t0.elapsed().as_micros() as u64;
                let output_msg = m.topic() == output;
                let Some(seq) = seq_of(m.payload(), output_msg) else {
                    continue;
                };
                if seq as u64 <= warmup {
                    continue;
                }
                if let Some(s) = sent.get(seq) {
                    let ms = at.saturating_sub(s.load(Ordering::Acquire)) as f64 / 1000.0;
                    if output_msg {
                        changes.push(ms);
                    } else {
                        hops.push(ms);
                    }
                }
            }
            Some(Err(e)) => return Err(format!("latency consumer: {e}")),
            None if done.load(Ordering::Acquire) => {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(1) {
                    return Ok((changes, hops));
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_is_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[0.9, 0.5, 0.7]), 0.7);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
