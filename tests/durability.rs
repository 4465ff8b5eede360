//! State that survives restarts, crashes, rebalances and broker outages, through a real
//! Kafka-protocol broker (Nisshi): after each, the change stream with duplicates dropped by
//! `(customer_id, seq)` equals a run without incident, every duplicate is byte-identical, no
//! customer's seq has a gap, and the changelog's final state of every customer equals a
//! from-scratch computation over the whole input.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{change_key, comparable, config, day, oracle, start, wait_for, Broker};
use microseg::changelog;
use microseg::config::{Config, Guarantee};
use microseg::engine::Engine;
use microseg::generate::{Generated, Generator};
use microseg::metrics::Metrics;
use microseg::pipeline::Pipeline;
use microseg::rules::RuleSet;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

const TOPIC: &str = "events";
const PARTITIONS: i32 = 3;

fn rules() -> Arc<RuleSet> {
    Arc::new(RuleSet::embedded_default())
}

fn events(seed: u64, n: usize) -> Vec<Generated> {
    let mut g = Generator::new(seed, 150, day(0), 20 * 60_000);
    (0..n).map(|_| g.next_event()).collect()
}

/// An event as it landed: partition and offset.
type Placed = (Generated, i32, i64);

/// Produces `events` at about `per_sec`, surviving broker outages (no delivery timeout).
async fn produce_steadily(addr: String, events: Vec<Generated>, per_sec: u64) -> Vec<Placed> {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &addr)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "0")
        .create()
        .unwrap();
    let started = Instant::now();
    let mut placed = Vec::with_capacity(events.len());
    for chunk in events.chunks(20) {
        let sends: Vec<_> = chunk
            .iter()
            .map(|ev| {
                p.send(
                    FutureRecord::to(TOPIC)
                        .key(&ev.customer_id)
                        .payload(ev.json.as_bytes()),
                    Duration::from_secs(300),
                )
            })
            .collect();
        for (ev, r) in chunk.iter().zip(futures::future::join_all(sends).await) {
            let d = r.unwrap_or_else(|(e, _)| panic!("produce: {e}"));
            placed.push((ev.clone(), d.partition, d.offset));
        }
        let due = Duration::from_millis(placed.len() as u64 * 1000 / per_sec);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    placed
}

/// Waits until the group has committed every partition of the input to its end.
async fn wait_caught_up(addr: &str, group: &str, timeout: Duration) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("group.id", group)
        .create()
        .unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition(TOPIC, p);
        }
        let committed = c.committed_offsets(tpl, Duration::from_secs(5));
        let behind: Vec<(i32, i64, i64)> = (0..PARTITIONS)
            .filter_map(|p| {
                let (_, high) = c.fetch_watermarks(TOPIC, p, Duration::from_secs(5)).ok()?;
                let at = committed
                    .as_ref()
                    .ok()
                    .and_then(|t| t.find_partition(TOPIC, p))
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
                    .unwrap_or(0);
                (at < high).then_some((p, at, high))
            })
            .collect();
        if behind.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "group {group} did not catch up: (partition, committed, end) {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks the properties every durability test asserts (module docs). Returns how many
/// duplicates the output held.
async fn verify(
    broker: &Broker,
    group: &str,
    rules: &Arc<RuleSet>,
    mut placed: Vec<Placed>,
) -> usize {
    placed.sort_by_key(|(_, p, o)| (*p, *o));
    let input: Vec<(Generated, i32)> = placed.into_iter().map(|(g, p, _)| (g, p)).collect();
    let o = oracle(rules, &config(broker, group, &[TOPIC]), &input);
    assert!(o.changes.len() > 100, "the input moves customers");

    // Read until every expected change is there (duplicates do not count towards it), so a
    // slow fetch after the outage cannot end the read early; a lost change waits out the
    // timeout and fails below.
    let wanted: HashSet<(String, u64)> = o.changes.iter().map(change_key).collect();
    let (mut found, mut checked) = (HashSet::new(), 0);
    let got = common::read_topic_until(
        &broker.addr,
        "segment-changes",
        Duration::from_secs(90),
        Duration::from_secs(2),
        |read: &[common::Record]| {
            for r in &read[checked..] {
                let k = change_key(&r.json());
                if wanted.contains(&k) {
                    found.insert(k);
                }
            }
            checked = read.len();
            found.len() == wanted.len()
        },
    )
    .await;
    let mut seen: BTreeMap<(String, u64), Value> = BTreeMap::new();
    let mut duplicates = 0;
    for r in &got {
        let v = r.json();
        let k = change_key(&v);
        if let Some(prev) = seen.get(&k) {
            assert_eq!(prev, &v, "duplicate {k:?} with another payload");
            duplicates += 1;
        }
        seen.insert(k, v);
    }
    let mut last: HashMap<&str, u64> = HashMap::new();
    for (id, seq) in seen.keys() {
        let l = last.entry(id).or_default();
        assert_eq!(*seq, *l + 1, "customer {id}: seq {seq} follows {l}");
        *l = *seq;
    }
    let expected: BTreeMap<(String, u64), Value> = o
        .changes
        .iter()
        .map(|v| (change_key(v), v.clone()))
        .collect();
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !seen.contains_key(*k))
        .take(5)
        .collect();
    assert!(missing.is_empty(), "changes lost, e.g. {missing:?}");
    assert_eq!(seen.len(), expected.len(), "no change invented");
    for (k, v) in seen {
        assert_eq!(comparable(v), expected[&k], "change {k:?}");
    }

    // The changelog's latest record of each customer is the from-scratch final state.
    let engine = Engine::new(rules.clone());
    let records = broker
        .read(
            &format!("{group}-changelog"),
            usize::MAX,
            Duration::from_secs(5),
            Duration::ZERO,
        )
        .await;
    let mut latest: HashMap<String, Vec<u8>> = HashMap::new();
    for r in records {
        match r.key {
            // The checkpoint's key is not UTF-8 (read lossily here).
            Some(k) if k != "\u{fffd}" => {
                latest.insert(k, r.payload);
            }
            _ => {}
        }
    }
    assert_eq!(
        latest.len(),
        o.customers(),
        "one changelog entry per customer"
    );
    for (id, bytes) in &latest {
        let r = changelog::decode(&engine, bytes).unwrap();
        let (partition, c) = (r.partition, r.customer);
        let want = o.customer(id).unwrap();
        assert_eq!(
            engine.memberships(&c),
            engine.evaluate_all(
                &want.state,
                want.state
                    .last_seen
                    .max(o.parts[&partition].watermark(partition))
            ),
            "customer {id}: final memberships"
        );
        assert_eq!(
            engine.view(&c),
            engine.view(&want),
            "customer {id}: state, memberships, seq, timer as without incident"
        );
    }
    duplicates
}

fn engine_config_file(dir: &std::path::Path, broker: &Broker, group: &str) -> PathBuf {
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/segments.toml");
    let text = format!(
        r#"
[kafka]
brokers = "{}"
group_id = "{group}"
client_id = "{group}-engine"
input_topics = ["{TOPIC}"]
[kafka.consumer]
"session.timeout.ms" = "2000"
"heartbeat.interval.ms" = "300"
[pipeline]
commit_interval_ms = 200
[time]
idle_timeout_ms = 3600000
[http]
address = ""
[rules]
file = "{}"
"#,
        broker.addr,
        rules.display()
    );
    let path = dir.join("microseg.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The `microseg run` process, logging to `log`.
fn spawn_engine(config: &std::path::Path, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_microseg"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "microseg=info")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start microseg")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_under_load_loses_nothing() {
    let broker = Broker::start();
    broker.create_topics(&[TOPIC], PARTITIONS).await;
    let rules = rules();
    let dir = tempfile::tempdir().unwrap();
    let group = "g-crash";
    let cfg = engine_config_file(dir.path(), &broker, group);
    let log = dir.path().join("engine.log");

    let producing = tokio::spawn(produce_steadily(broker.addr.clone(), events(11, 6000), 400));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc4a5);
    let mut engine = spawn_engine(&cfg, &log);
    let mut kills = 0;
    let mut restores_before_last = 0;
    while !producing.is_finished() || kills < 3 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1500..4000))).await;
        engine.kill().unwrap(); // SIGKILL
        engine.wait().unwrap();
        kills += 1;
        restores_before_last = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("restored from the changelog")
            .count();
        engine = spawn_engine(&cfg, &log);
    }
    let placed = producing.await.unwrap();
    let result = async {
        wait_caught_up(&broker.addr, group, Duration::from_secs(120)).await;
        // The last process restored before it is stopped (and so holds the state to write).
        wait_for("the last start restored", Duration::from_secs(60), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("restored from the changelog")
                .count()
                > restores_before_last
        })
        .await;
        // A clean stop writes the last changelog records.
        Command::new("kill")
            .args(["-TERM", &engine.id().to_string()])
            .status()
            .unwrap();
        let status = engine.wait().unwrap();
        assert!(status.success(), "clean stop: {status}");
        verify(&broker, group, &rules, placed).await
    };
    let duplicates = match tokio::time::timeout(Duration::from_secs(300), result).await {
        Ok(d) => d,
        Err(_) => {
            let _ = engine.kill();
            panic!(
                "timed out; engine log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    };
    let log_text = std::fs::read_to_string(&log).unwrap();
    let restores = log_text.matches("restored from the changelog").count();
    // A process may be killed before it is assigned anything; most restarts restore.
    assert!(
        restores >= 3,
        "{restores} restores in {} starts; log:\n{log_text}",
        kills + 1
    );
    eprintln!("{kills} SIGKILLs, {restores} restores, {duplicates} duplicate changes re-emitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_restores_state_and_re_emits_nothing() {
    let broker = Broker::start();
    broker.create_topics(&[TOPIC], PARTITIONS).await;
    let rules = rules();
    let group = "g-restart";
    let all = events(5, 1600);
    let (first, second) = all.split_at(800);

    let a = start(config(&broker, group, &[TOPIC]), rules.clone());
    let placed_a = produce_steadily(broker.addr.clone(), first.to_vec(), 4000).await;
    wait_caught_up(&broker.addr, group, Duration::from_secs(60)).await;
    let mut before: BTreeMap<String, microseg::engine::Customer> = BTreeMap::new();
    a.pipeline.for_each_customer(|id, c| {
        before.insert(id.to_string(), c.clone());
    });
    let held = before.len();
    a.stop().await;

    let b = start(config(&broker, group, &[TOPIC]), rules.clone());
    let (pb, mb) = (b.pipeline.clone(), b.metrics.clone());
    wait_for("restored and ready", Duration::from_secs(30), || pb.ready()).await;
    assert_eq!(pb.customer_count(), held, "every customer restored");
    for (id, c) in &before {
        let engine = pb.engine();
        assert_eq!(
            pb.customer(id).map(|r| engine.view(&r)),
            Some(engine.view(c)),
            "customer {id} restored exactly"
        );
    }
    assert_eq!(mb.restored_customers.get() as usize, held);
    assert_eq!(mb.events_processed(), 0, "no input replayed");
    let mut placed = placed_a;
    placed.extend(produce_steadily(broker.addr.clone(), second.to_vec(), 4000).await);
    wait_caught_up(&broker.addr, group, Duration::from_secs(60)).await;
    assert_eq!(mb.events_processed(), second.len() as u64);
    b.stop().await;
    assert_eq!(
        verify(&broker, group, &rules, placed).await,
        0,
        "a clean stop leaves nothing to re-emit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_joining_and_leaving_under_load_loses_nothing() {
    let broker = Broker::start();
    broker.create_topics(&[TOPIC], PARTITIONS).await;
    let rules = rules();
    let group = "g-rebalance";
    let producing = tokio::spawn(produce_steadily(broker.addr.clone(), events(23, 5000), 500));
    let a = start(config(&broker, group, &[TOPIC]), rules.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = start(config(&broker, group, &[TOPIC]), rules.clone());
    let (pa, pb) = (a.pipeline.clone(), b.pipeline.clone());
    wait_for("partitions shared", Duration::from_secs(30), || {
        !pa.assigned().is_empty() && !pb.assigned().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        b.metrics.events_processed() > 0,
        "the second instance worked"
    );
    b.stop().await;
    wait_for("partitions back", Duration::from_secs(30), || {
        pa.assigned().len() == PARTITIONS as usize
    })
    .await;
    let placed = producing.await.unwrap();
    wait_caught_up(&broker.addr, group, Duration::from_secs(60)).await;
    assert!(
        a.metrics.restored_customers.get() > 0,
        "taken-back partitions were restored"
    );
    a.stop().await;
    verify(&broker, group, &rules, placed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_under_load_loses_nothing() {
    let mut broker = Broker::start_persistent();
    broker.create_topics(&[TOPIC], PARTITIONS).await;
    let rules = rules();
    let group = "g-outage";
    let mut cfg = config(&broker, group, &[TOPIC]);
    // The broker is away for seconds, not for the group session.
    cfg.kafka
        .consumer
        .insert("session.timeout.ms".into(), "30000".into());
    let a = start(cfg, rules.clone());
    let ma = a.metrics.clone();
    let producing = tokio::spawn(produce_steadily(broker.addr.clone(), events(31, 4000), 500));
    wait_for("processing under way", Duration::from_secs(30), || {
        ma.events_processed() > 1000
    })
    .await;
    broker.stop();
    let at_stop = ma.events_processed();
    tokio::time::sleep(Duration::from_secs(4)).await;
    broker.restart();
    let placed = producing.await.unwrap();
    wait_caught_up(&broker.addr, group, Duration::from_secs(120)).await;
    assert!(ma.events_processed() > at_stop, "processing resumed");
    a.stop().await;
    verify(&broker, group, &rules, placed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changelog_with_another_partition_count_is_refused_at_start_up() {
    let broker = Broker::start();
    broker.create_topics(&[TOPIC], PARTITIONS).await;
    broker.create_topics(&["g-wrong-changelog"], 2).await;
    let cfg = config(&broker, "g-wrong", &[TOPIC]);
    let rules = rules();
    let p = Pipeline::new(
        cfg,
        Engine::new(rules.clone()),
        Arc::new(Metrics::new(&rules, &[TOPIC.into()])),
    );
    let err = tokio::time::timeout(Duration::from_secs(30), p.run(std::future::pending()))
        .await
        .expect("refused promptly")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("g-wrong-changelog")
            && err.contains("has 2 partitions but the input topics have 3"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_is_refused_by_a_broker_without_transactions() {
    let broker = Broker::start();
    broker.create_topics(&[TOPIC], PARTITIONS).await;
    let mut cfg: Config = config(&broker, "g-eos", &[TOPIC]);
    cfg.processing.guarantee = Guarantee::ExactlyOnce;
    cfg.pipeline.drain_timeout_ms = 10_000;
    let rules = rules();
    let p = Pipeline::new(
        cfg,
        Engine::new(rules.clone()),
        Arc::new(Metrics::new(&rules, &[TOPIC.into()])),
    );
    let err = tokio::time::timeout(Duration::from_secs(60), p.run(std::future::pending()))
        .await
        .expect("refused promptly")
        .unwrap_err()
        .to_string();
    assert!(err.contains("refused transactions"), "{err}");
    assert!(err.contains("at_least_once"), "says what to do: {err}");
}

/// librdkafka's mock cluster accepts the transactional calls (it writes no commit markers and
/// does not store transactional offsets, so it cannot prove atomicity): the exactly-once
/// interval runs init, begin, produce, send offsets, commit, begin…, the output and the
/// changelog are there once, and a failed transaction commit stops the pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_commits_each_interval_as_a_transaction_on_the_mock_cluster() {
    common::init_logs();
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let addr = mock.bootstrap_servers();
    let group = "g-eos-mock";
    for t in [
        TOPIC,
        "segment-changes",
        "microseg-dead-letters",
        "g-eos-mock-changelog",
    ] {
        mock.create_topic(t, 2, 1).unwrap();
    }
    let mut cfg = Config::default();
    cfg.kafka.brokers = addr.clone();
    cfg.kafka.group_id = group.into();
    cfg.kafka.input_topics = vec![TOPIC.into()];
    cfg.kafka.create_topics = false;
    cfg.pipeline.commit_interval_ms = 200;
    cfg.time.idle_timeout_ms = 3_600_000;
    cfg.processing.guarantee = Guarantee::ExactlyOnce;
    cfg.kafka
        .consumer
        .insert("session.timeout.ms".into(), "6000".into());
    let rules = rules();
    let run = start(cfg.clone(), rules.clone());
    let p = run.pipeline.clone();
    wait_for("assignment", Duration::from_secs(30), || p.ready()).await;
    // The mock keeps a bounded backlog: produce while the engine consumes.
    let placed = produce_steadily(addr.clone(), events(3, 600), 1000).await;
    let m = run.metrics.clone();
    wait_for("all processed", Duration::from_secs(60), || {
        m.events_processed() == placed.len() as u64
    })
    .await;
    // Every event's output and state committed by a transaction.
    let commits = m.commits.get();
    wait_for(
        "a transaction after the last event",
        Duration::from_secs(10),
        || m.commits.get() > commits + 1 && p.dirty() == 0,
    )
    .await;
    let changelog_records = m.changelog_records.get();
    assert!(changelog_records > 0);

    // The offsets go into the transaction (TxnOffsetCommit) and each interval ends with
    // EndTxn: a failure of either stops the pipeline (a restart restores the last committed
    // transaction), it is never ignored.
    let stops = [
        (
            rdkafka::types::RDKafkaApiKey::TxnOffsetCommit,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED,
        ),
        (
            rdkafka::types::RDKafkaApiKey::EndTxn,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
        ),
    ];
    let mut first = Some(run);
    for (i, (api, error)) in stops.into_iter().enumerate() {
        let run = match first.take() {
            Some(r) => r,
            None => {
                let r = start(cfg.clone(), rules.clone());
                let p = r.pipeline.clone();
                wait_for("restored", Duration::from_secs(30), || p.ready()).await;
                r
            }
        };
        mock.request_errors(api, &[error; 3]);
        produce_steadily(addr.clone(), events(4 + i as u64, 5), 1000).await;
        let err = run.finished(Duration::from_secs(30)).await.unwrap_err();
        assert!(err.contains("exactly-once"), "{api:?}: {err}");
        mock.clear_request_errors(api);
    }

    let mut sorted = placed.clone();
    sorted.sort_by_key(|(_, p, o)| (*p, *o));
    let input: Vec<(Generated, i32)> = sorted.into_iter().map(|(g, p, _)| (g, p)).collect();
    let o = oracle(&rules, &cfg, &input);
    let got = common::read_topic(
        &addr,
        "segment-changes",
        o.changes.len(),
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    let mut got: Vec<Value> = got.iter().map(|r| comparable(r.json())).collect();
    let mut want = o.changes.clone();
    got.sort_by_key(change_key);
    want.sort_by_key(change_key);
    assert_eq!(got, want, "every change once");
    let changelog = common::read_topic(
        &addr,
        "g-eos-mock-changelog",
        changelog_records as usize,
        Duration::from_secs(30),
        Duration::ZERO,
    )
    .await;
    assert!(
        changelog
            .iter()
            .any(|r| r.key.as_deref() == Some("\u{fffd}")),
        "checkpoints written: {:?}",
        changelog.iter().map(|r| r.key.clone()).collect::<Vec<_>>()
    );
}

/// The through-a-broker figures of BENCHMARKS.md come from `microseg bench --brokers`: it
/// restores every customer it loaded, runs the end-to-end comparison over every pre-loaded
/// event, and measures latency at an offered load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_benchmarks_restore_consume_and_measure_latency_through_the_broker() {
    let broker = Broker::start();
    let out = Command::new(env!("CARGO_BIN_EXE_microseg"))
        .args([
            "bench",
            "--quick",
            "--customers",
            "3000",
            "--events",
            "3000",
            "--e2e-events",
            "5000",
            "--latency-rate",
            "500",
            "--latency-seconds",
            "3",
            "--brokers",
            &broker.addr,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |m: &str| -> Value {
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["measurement"] == m)
            .unwrap_or_else(|| panic!("no {m} line: {text}"))
    };
    let positive = |v: &Value, field: &str| {
        assert!(v[field].as_f64().is_some_and(|x| x > 0.0), "{field} in {v}")
    };
    let kafka = line("restore_kafka");
    assert_eq!(kafka["customers"], 3000, "{kafka}");
    positive(&kafka, "seconds");

    let e2e = line("e2e");
    assert_eq!(e2e["events"], 5000, "{e2e}");
    // The baseline decoded every pre-loaded event; the pipeline produced changes for them.
    assert_eq!(e2e["baseline_decoded"], 5000, "{e2e}");
    assert!(e2e["changes"].as_u64().unwrap() >= 1000, "{e2e}");
    for f in [
        "e2e_eps",
        "baseline_eps",
        "e2e_vs_baseline",
        "baseline_cpu_us_per_event",
        "e2e_cpu_us_per_event",
        "echo_eps",
        "echo_vs_baseline",
        "echo_cpu_us_per_event",
        "warmup_eps",
        "e2e_vs_echo",
    ] {
        positive(&e2e, f);
    }
    // The echo pass produced every event it consumed, and each was acknowledged.
    assert_eq!(e2e["echoed"], 5000, "{e2e}");
    // Quick runs two alternating baseline / pipeline pairs and reports each.
    assert_eq!(e2e["pairs"], 2, "{e2e}");
    for f in [
        "pairs_baseline_eps",
        "pairs_e2e_eps",
        "pairs_e2e_vs_baseline",
        "pairs_baseline_cpu_us_per_event",
        "pairs_e2e_cpu_us_per_event",
        "pairs_echo_eps",
        "pairs_echo_vs_baseline",
        "pairs_echo_cpu_us_per_event",
        "pairs_e2e_vs_echo",
    ] {
        let v = e2e[f].as_array().unwrap_or_else(|| panic!("{f} in {e2e}"));
        assert_eq!(v.len(), 2, "{f} in {e2e}");
        assert!(
            v.iter().all(|x| x.as_f64().is_some_and(|x| x > 0.0)),
            "{f} in {e2e}"
        );
    }

    let lat = line("latency");
    assert_eq!(lat["offered_eps"], 500, "{lat}");
    assert_eq!(lat["events"], 1500, "{lat}");
    // Changes of events after the one-second warm-up arrived and were timed.
    assert!(lat["changes_measured"].as_u64().unwrap() >= 500, "{lat}");
    for f in [
        "latency_p50_ms",
        "latency_p99_ms",
        "broker_hop_p50_ms",
        "broker_hop_p99_ms",
    ] {
        positive(&lat, f);
    }
    assert!(lat["latency_p50_ms"].as_f64() <= lat["latency_p99_ms"].as_f64());
}
