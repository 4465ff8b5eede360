//! The `microseg` command: a thin shell over the library (see `lib.rs` for the architecture).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use tracing::error;

use microseg::config::Config;
use microseg::demo::{self, DemoOptions};
use microseg::engine::Engine;
use microseg::generate::Generator;
use microseg::metrics::Metrics;
use microseg::pipeline::{send_waiting, Pipeline};
use microseg::rules::RuleSet;
use microseg::time::{parse_rfc3339, DAY_MS};

/// mimalloc: the state is many small allocations; restore and churn measured faster with it
/// than with the system allocator, and word-aligned blocks in their exact size class
/// (`microseg::alloc`, BENCHMARKS.md).
#[global_allocator]
static GLOBAL: microseg::alloc::Allocator = microseg::alloc::Allocator;

#[derive(Parser)]
#[command(
    name = "microseg",
    version,
    about = "Real-time customer micro-segmentation: Kafka events in, segment changes out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine against Kafka (production).
    Run {
        /// Configuration file (TOML).
        #[arg(long, default_value = "config/microseg.toml")]
        config: PathBuf,
        /// Log as JSON lines.
        #[arg(long)]
        json_logs: bool,
    },
    /// Run everything in-process (embedded Kafka, generated customers) and show what happens.
    Demo {
        /// Stop after this many seconds and print a summary.
        #[arg(long)]
        duration: Option<u64>,
        /// Rules file (default: the embedded config/segments.toml).
        #[arg(long)]
        rules: Option<PathBuf>,
        #[arg(long, default_value_t = 2000)]
        customers: usize,
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Simulated days per real second.
        #[arg(long, default_value_t = 5.0)]
        sim_speed: f64,
    },
    /// Measure and print JSON lines (one per measurement, with the machine): today, restore
    /// from the changelog in memory and, with --brokers, through a real broker.
    Bench {
        /// A small run (20 000 customers, 200 000 events) that checks the harness.
        #[arg(long)]
        quick: bool,
        /// Customers (default 1 000 000).
        #[arg(long)]
        customers: Option<usize>,
        /// Events through the engine (default 10 000 000).
        #[arg(long)]
        events: Option<u64>,
        /// Also measure bytes per customer at this many customers (e.g. 10000000).
        #[arg(long)]
        big_customers: Option<usize>,
        /// Kafka bootstrap servers for the through-Kafka measurement.
        #[arg(long)]
        brokers: Option<String>,
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        /// Events pre-loaded for the end-to-end measurement (default 1 000 000; quick 20 000).
        #[arg(long)]
        e2e_events: Option<u64>,
        /// Rounds of the end-to-end measurement (a baseline, an echo and a pipeline pass
        /// each, alternately); the figures are their medians (default 3; quick 2).
        #[arg(long)]
        e2e_pairs: Option<u32>,
        /// Offered load of the latency measurement, events/s (the 50 000 is far above
        /// what the local Nisshi broker sustains on 2 cores; see BENCHMARKS.md).
        #[arg(long, default_value_t = 1_000)]
        latency_rate: u64,
        /// Seconds of load for the latency measurement (default 20; quick 3).
        #[arg(long)]
        latency_seconds: Option<f64>,
        /// Run one measurement only, for profiling and comparing builds: the engine with
        /// the default rules (and bytes per customer), with the heavy rules, or restore.
        #[arg(long, value_enum)]
        only: Option<microseg::bench::Only>,
    },
    /// Check a rules file: exit 0 if valid, otherwise list every problem and exit 1.
    CheckRules { file: PathBuf },
    /// Generate synthetic events: JSON lines on stdout, or produced to Kafka with --brokers.
    Generate {
        #[arg(long, default_value_t = 1000)]
        customers: usize,
        #[arg(long, default_value_t = 10_000)]
        events: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Simulated days covered by the whole run.
        #[arg(long, default_value_t = 90.0)]
        days: f64,
        /// Produce to Kafka instead of printing (topics from --config's input_topics:
        /// purchases, engagement, profiles).
        #[arg(long)]
        brokers: Option<String>,
        #[arg(long, default_value = "config/microseg.toml")]
        config: PathBuf,
    },
}

fn init_logs(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called (not when
/// the future is first polled), so call it first thing: a signal that arrives during start-up
/// is then a clean stop, not the default "terminate".
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term => {},
                _ = int => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown requested: draining");
    }
}

fn load_rules(path: Option<&PathBuf>) -> Result<Arc<RuleSet>, String> {
    match path {
        Some(p) => RuleSet::load(p).map(Arc::new).map_err(|e| e.to_string()),
        None => Ok(Arc::new(RuleSet::embedded_default())),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckRules { file } => match RuleSet::load(&file) {
            Ok(r) => {
                let n: usize = r
                    .segmentations
                    .iter()
                    .map(|s| s.segments.len())
                    .sum::<usize>()
                    + r.segments.len();
                println!(
                    "{}: OK — {} segmentation(s), {} rule(s), version {}",
                    file.display(),
                    r.segmentations.len(),
                    n,
                    r.version
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, json_logs } => {
            let shutdown = shutdown_signal();
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            init_logs(&cfg.log.level, json_logs || cfg.log.format == "json");
            let rules = match load_rules(Some(&cfg.rules.file)) {
                Ok(r) => r,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let metrics = Arc::new(Metrics::new(&rules, &cfg.kafka.input_topics));
            let http = cfg.http.address.clone();
            let pipeline = Arc::new(Pipeline::new(cfg, Engine::new(rules), metrics));
            let api = if http.is_empty() {
                None
            } else {
                match microseg::api::bind(&http).await {
                    Ok(l) => Some(tokio::spawn(microseg::api::serve(
                        l,
                        pipeline.clone(),
                        std::future::pending(),
                    ))),
                    Err(e) => {
                        eprintln!("cannot listen on http.address {http}: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            };
            let result = pipeline.run(shutdown).await;
            if let Some(api) = api {
                api.abort();
            }
            match result {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    error!(error = %e, "pipeline stopped");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo {
            duration,
            rules,
            customers,
            rate,
            sim_speed,
        } => {
            init_logs("warn", false);
            let rules = match load_rules(rules.as_ref()) {
                Ok(r) => r,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            println!("microseg demo: embedded Kafka (librdkafka mock cluster), {customers} generated B2B customers, {rate} events/s, {sim_speed} simulated days per second, rules version {}", rules.version);
            let opts = DemoOptions {
                duration: duration.map(Duration::from_secs),
                customers,
                events_per_sec: rate,
                sim_days_per_sec: sim_speed,
                ..DemoOptions::default()
            };
            match demo::run(opts, rules, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            {
                Ok(s) => {
                    println!(
                        "demo finished: produced {} events, processed {}, dead-lettered {} (malformed on purpose), changes {} entered / {} exited, {} change messages read back from the output topic",
                        s.produced, s.processed, s.dead_lettered, s.entered, s.exited, s.changes_read_back
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bench {
            quick,
            customers,
            events,
            big_customers,
            brokers,
            partitions,
            e2e_events,
            e2e_pairs,
            latency_rate,
            latency_seconds,
            only,
        } => {
            let opts = microseg::bench::BenchOptions {
                customers: customers.unwrap_or(if quick { 20_000 } else { 1_000_000 }),
                events: events.unwrap_or(if quick { 200_000 } else { 10_000_000 }),
                big_customers,
                brokers,
                partitions: partitions.max(1),
                e2e_events: e2e_events.unwrap_or(if quick { 20_000 } else { 1_000_000 }),
                e2e_pairs: e2e_pairs.unwrap_or(if quick { 2 } else { 3 }).max(1),
                latency_rate,
                latency_seconds: latency_seconds.unwrap_or(if quick { 3.0 } else { 20.0 }),
                only,
                command: std::env::args().collect::<Vec<_>>().join(" "),
            };
            init_logs("warn", false);
            match microseg::bench::run(opts, Arc::new(RuleSet::embedded_default())).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bench failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Generate {
            customers,
            events,
            seed,
            days,
            brokers,
            config,
        } => {
            let start = parse_rfc3339("2026-01-01T00:00:00Z").unwrap_or(0);
            let ms_per_event = (days * DAY_MS as f64 / events.max(1) as f64) as i64;
            let mut g = Generator::new(seed, customers, start, ms_per_event);
            let Some(brokers) = brokers else {
                use std::io::Write;
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                for _ in 0..events {
                    if writeln!(out, "{}", g.next_event().json).is_err() {
                        return ExitCode::SUCCESS; // stdout closed (e.g. piped into head)
                    }
                }
                return if out.flush().is_ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                };
            };
            let topics = match Config::load(&config) {
                Ok(c) => c.kafka.input_topics,
                Err(_) => microseg::config::KafkaConfig::default().input_topics,
            };
            if topics.len() < 3 {
                eprintln!("generate needs three input topics (purchases, engagement, profiles); got {topics:?}");
                return ExitCode::FAILURE;
            }
            let producer: ThreadedProducer<DefaultProducerContext> = match ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("linger.ms", "5")
                .set("partitioner", "murmur2_random")
                .create()
            {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("cannot create a producer: {e}");
                    return ExitCode::FAILURE;
                }
            };
            for _ in 0..events {
                let ev = g.next_event();
                let rec = BaseRecord::to(&topics[ev.kind as usize])
                    .key(ev.customer_id.as_str())
                    .payload(ev.json.as_str());
                if let Err(e) = send_waiting(&producer, rec, Duration::from_millis(5)) {
                    eprintln!("produce failed: {e}");
                    return ExitCode::FAILURE;
                }
            }
            match producer.flush(Duration::from_secs(60)) {
                Ok(()) => {
                    eprintln!("produced {events} events to {brokers}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("flush failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
