//! Test harness: a real Nisshi broker on a free loopback port, and Kafka helpers.
//! A test that needs a broker starts one; if Nisshi is not installed the test fails with the
//! command that installs it (scripts/test.sh does it for you).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};

use std::collections::BTreeMap;
use std::sync::Arc;

use microseg::config::Config;
use microseg::engine::Engine;
use microseg::event::decode;
use microseg::metrics::Metrics;
use microseg::output::{change_json, Cause};
use microseg::pipeline::Pipeline;
use microseg::processor::{Fired, Processor, Source};
use microseg::rules::RuleSet;
use serde_json::Value;
use tokio::sync::oneshot;

pub struct Broker {
    child: Child,
    pub addr: String,
    storage: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nisshi_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NISSHI_BIN") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("nisshi");
        if p.is_file() {
            return p;
        }
    }
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/nisshi");
    assert!(home.is_file(), "the Nisshi broker is not installed; run scripts/test.sh, or: cargo install nisshi --version 0.8.1 --locked --ignore-rust-version");
    home
}

/// Logs of the code under test, shown for failing tests: `RUST_LOG=microseg=debug`.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "microseg=info".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Broker {
    /// Starts an in-memory broker on a free port and waits until it answers metadata requests.
    pub fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        Broker::launch(free_port(), "memory://nisshi/".into(), dir)
    }

    /// Starts a broker that keeps topics, records and committed offsets in a SQLite file, so
    /// it can be stopped and started again ([`Broker::stop`], [`Broker::restart`]).
    pub fn start_persistent() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        // Nisshi resolves the path against its working directory (the temporary one).
        let storage = "sqlite://nisshi.db".to_owned();
        Broker::launch(free_port(), storage, dir)
    }

    fn launch(port: u16, storage: String, dir: tempfile::TempDir) -> Broker {
        init_logs();
        let addr = format!("127.0.0.1:{port}");
        let child = Broker::spawn(&addr, &storage, dir.path());
        let broker = Broker {
            child,
            addr,
            storage,
            _dir: dir,
        };
        broker.wait_up();
        broker
    }

    fn spawn(addr: &str, storage: &str, dir: &std::path::Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("nisshi.log"))
            .unwrap();
        Command::new(nisshi_bin())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{addr}"),
                "--advertised-listener-url",
                &format!("tcp://{addr}"),
                "--storage-engine",
                storage,
                "--group-initial-rebalance-delay",
                "0s",
            ])
            .current_dir(dir)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start nisshi")
    }

    fn wait_up(&self) {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .create()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while probe.fetch_metadata(None, Duration::from_secs(1)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nisshi did not come up on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the broker process (an outage).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the broker again on the same address and storage.
    pub fn restart(&mut self) {
        self.child = Broker::spawn(&self.addr, &self.storage, self._dir.path());
        self.wait_up();
    }

    pub async fn create_topics(&self, names: &[&str], partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .create()
            .unwrap();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
            .collect();
        for r in admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .unwrap()
        {
            r.unwrap_or_else(|(t, e)| panic!("create {t}: {e}"));
        }
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "1")
            .create()
            .unwrap()
    }

    /// Produces one record and returns the partition it landed in.
    pub async fn produce(&self, p: &FutureProducer, topic: &str, key: &str, payload: &[u8]) -> i32 {
        p.send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("produce: {e}"))
        .partition
    }

    /// Reads `topic` from the start until `want` records arrived (or `timeout`), then keeps
    /// reading for `settle` to catch unexpected extras.
    pub async fn read(
        &self,
        topic: &str,
        want: usize,
        timeout: Duration,
        settle: Duration,
    ) -> Vec<Record> {
        read_topic(&self.addr, topic, want, timeout, settle).await
    }
}

/// [`Broker::read`] for any bootstrap address (e.g. librdkafka's mock cluster).
pub async fn read_topic(
    addr: &str,
    topic: &str,
    want: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Record> {
    read_topic_until(addr, topic, timeout, settle, |read| read.len() >= want).await
}

/// Reads `topic` from the start until `enough` says what was read so far is (checked after
/// every record), then for `settle` more, to catch anything extra; or until `timeout`.
pub async fn read_topic_until(
    addr: &str,
    topic: &str,
    timeout: Duration,
    settle: Duration,
    mut enough: impl FnMut(&[Record]) -> bool,
) -> Vec<Record> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("group.id", format!("reader-{}", rand_suffix()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let mut deadline = Instant::now() + timeout;
    let mut settling = false;
    loop {
        if !settling && enough(&out) {
            settling = true;
            deadline = Instant::now() + settle;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, c.recv()).await {
            Ok(Ok(m)) => out.push(Record {
                timestamp: m.timestamp().to_millis(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                payload: m.payload().unwrap_or(&[]).to_vec(),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_owned(),
                                    String::from_utf8_lossy(x.value.unwrap_or(&[])).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                partition: m.partition(),
            }),
            Ok(Err(e)) => panic!("read {topic}: {e}"),
            Err(_) => break,
        }
    }
    out
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub partition: i32,
    /// The record's timestamp (producer create time), epoch ms.
    pub timestamp: Option<i64>,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.payload))
        })
    }
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(x, _)| x == k)
            .map(|(_, v)| v.as_str())
    }
}

pub fn rand_suffix() -> String {
    use std::time::SystemTime;
    format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Waits until `f` holds, polling.
pub async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn config(broker: &Broker, group: &str, inputs: &[&str]) -> Config {
    let mut c = Config::default();
    c.kafka.brokers = broker.addr.clone();
    c.kafka.group_id = group.into();
    c.kafka.client_id = format!("{group}-client");
    c.kafka.input_topics = inputs.iter().map(|s| s.to_string()).collect();
    c.kafka
        .consumer
        .insert("session.timeout.ms".into(), "6000".into());
    c.kafka
        .consumer
        .insert("heartbeat.interval.ms".into(), "500".into());
    c.pipeline.commit_interval_ms = 200;
    // Tests compare exact change streams: time must advance with the input only.
    c.time.idle_timeout_ms = 3_600_000;
    c
}

pub struct Running {
    pub pipeline: Arc<Pipeline>,
    pub metrics: Arc<Metrics>,
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<microseg::pipeline::RunSummary, String>>,
}

pub fn start(cfg: Config, rules: Arc<RuleSet>) -> Running {
    let metrics = Arc::new(Metrics::new(&rules, &cfg.kafka.input_topics));
    let pipeline = Arc::new(Pipeline::new(cfg, Engine::new(rules), metrics.clone()));
    let (stop, rx) = oneshot::channel::<()>();
    let p = pipeline.clone();
    let handle = tokio::spawn(async move {
        p.run(async {
            let _ = rx.await;
        })
        .await
        .map_err(|e| e.to_string())
    });
    Running {
        pipeline,
        metrics,
        stop,
        handle,
    }
}

impl Running {
    /// Waits for the pipeline to stop by itself (an error).
    pub async fn finished(
        self,
        timeout: Duration,
    ) -> Result<microseg::pipeline::RunSummary, String> {
        tokio::time::timeout(timeout, self.handle)
            .await
            .expect("the pipeline stops")
            .unwrap()
    }

    pub async fn stop(self) -> microseg::pipeline::RunSummary {
        let _ = self.stop.send(());
        self.handle.await.unwrap().unwrap()
    }
}

pub fn day(d: i64) -> i64 {
    1_767_225_600_000 + d * 86_400_000 // 2026-01-01 + d days
}

/// A change message without the fields that depend on where the input landed in Kafka.
pub fn comparable(mut v: Value) -> Value {
    if v["cause"]["kind"] == "event" {
        v["cause"]["partition"] = Value::Null;
        v["cause"]["offset"] = Value::Null;
    }
    v
}

pub fn change_key(v: &Value) -> (String, u64) {
    (
        v["customer_id"].as_str().unwrap().to_owned(),
        v["seq"].as_u64().unwrap(),
    )
}

/// The oracle: the Kafka-free processor over each partition's events in partition order (the
/// same watermarks and timers as the pipeline, with idle time never reached), as comparable
/// change messages; plus how many events do not decode. `events` carries the partition each
/// event landed in.
pub fn expected_changes(
    rules: &Arc<RuleSet>,
    cfg: &Config,
    events: &[(microseg::generate::Generated, i32)],
) -> (Vec<Value>, usize) {
    let o = oracle(rules, cfg, events);
    (o.changes, o.bad)
}

/// What a run without Kafka gives: the changes (comparable), the events that do not decode,
/// and each partition's processor with the final customers.
pub struct Oracle {
    pub changes: Vec<Value>,
    pub bad: usize,
    pub parts: BTreeMap<i32, Processor>,
}

impl Oracle {
    /// A customer's final state in the oracle.
    pub fn customer(&self, id: &str) -> Option<microseg::engine::Customer> {
        self.parts.values().find_map(|p| p.customer(id))
    }

    pub fn customers(&self) -> usize {
        self.parts.values().map(|p| p.customer_count()).sum()
    }
}

/// See [`expected_changes`].
pub fn oracle(
    rules: &Arc<RuleSet>,
    cfg: &Config,
    events: &[(microseg::generate::Generated, i32)],
) -> Oracle {
    let mut parts: BTreeMap<i32, Processor> = BTreeMap::new();
    let mut expected = Vec::new();
    let mut bad = 0;
    for (ev, partition) in events {
        let Ok(d) = decode(ev.json.as_bytes()) else {
            bad += 1;
            continue;
        };
        let p = parts
            .entry(*partition)
            .or_insert_with(|| Processor::new(Engine::new(rules.clone()), &cfg.time, 1));
        let mut out = Vec::new();
        let _ = p.event(
            Source {
                topic: 0,
                partition: *partition,
                offset: 0,
            },
            &d,
            0,
            &mut out,
            &mut Fired::default(),
        );
        for e in &out {
            let cause = Cause::of(
                &e.change,
                Cause::Event {
                    event_id: d.event_id.as_deref(),
                    topic: "events",
                    partition: 0,
                    offset: 0,
                },
            );
            expected.push(comparable(
                serde_json::from_slice(&change_json(rules, &e.customer_id, cause, &e.change))
                    .unwrap(),
            ));
        }
    }
    Oracle {
        changes: expected,
        bad,
        parts,
    }
}
