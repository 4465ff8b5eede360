//! # microseg — real-time customer micro-segmentation
//!
//! microseg reads purchase, engagement and profile events from Kafka, keeps behavioural state
//! per customer in memory, re-assigns segments incrementally and publishes a segment-change
//! event (entered / exited, with the reason) for every change.
//!
//! ## Architecture
//!
//! ```text
//! Kafka input topics ─► pipeline (consumer group) ─► event::decode ──bad──► dead-letter topic
//!                                                      │
//!                                                      ▼
//!            processor::Processor  per partition: watermark + timer index (due, customer)
//!                │ fires due timers, then              │
//!                ▼                                     ▼
//!            engine::Engine::advance / apply_at (state::CustomerState + rules::program, the
//!                                                rules compiled to closures; rules::timing,
//!                                                their timer analysis compiled → the next timer)
//!                                                      │ changes
//!                                                      ▼
//!                        output::change_json ─► producer ─► segment-change topic
//!
//!   every commit interval: output delivered ─► changed customers + partition checkpoints
//!   (changelog::encode) ─► compacted changelog topic ─► input offsets committed
//!   on assignment: changelog ─► restore (a worker thread per share of the partitions:
//!                  processor::Restorer) ─► customers, timers, watermark
//! ```
//!
//! Pure logic (no I/O): [`time`], [`event`], [`state`] (with [`activity`], its buffer [`words`],
//! and [`windows`]),
//! [`rules`],
//! [`engine`], [`output`], [`changelog`] (record format), [`commit`] (what is safe to commit,
//! and when), and [`processor`] (which only reads the wall time it is given; a partition's
//! customers in [`store`], its timers in [`timer_index`]), [`restore`] (restorers on worker threads, fed by the caller). Effects:
//! [`pipeline`] (Kafka in and out, commit interval, restore), [`demo`] (embedded broker +
//! generator), [`generate`] (synthetic customers), [`bench`](mod@bench) (measurements).
//! Configuration: [`config`]. The global allocator: [`alloc`].

pub mod activity;
pub mod alloc;
pub mod api;
pub mod bench;
pub mod changelog;
pub mod commit;
pub mod config;
pub mod demo;
pub mod engine;
pub mod event;
pub mod generate;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod processor;
pub mod restore;
pub mod rules;
pub mod state;
pub mod store;
pub mod symbols;
pub mod time;
pub mod timer_index;
pub mod windows;
pub mod words;
