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

pub struct Broker {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
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
        init_logs();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("nisshi.log")).unwrap();
        let child = Command::new(nisshi_bin())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://{addr}"),
                "--advertised-listener-url",
                &format!("tcp://{addr}"),
                "--storage-engine",
                "memory://nisshi/",
                "--group-initial-rebalance-delay",
                "0s",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start nisshi");
        let broker = Broker {
            child,
            addr,
            _dir: dir,
        };
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &broker.addr)
            .create()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while probe.fetch_metadata(None, Duration::from_secs(1)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nisshi did not come up on {}",
                broker.addr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        broker
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
        let c: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
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
            if out.len() >= want && !settling {
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
                                        String::from_utf8_lossy(x.value.unwrap_or(&[]))
                                            .into_owned(),
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
