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
//!            engine::Engine::advance / apply_at (state::CustomerState + rules::compile::Expr;
//!                                                rules::timing → the customer's next timer)
//!                                                      │ changes
//!                                                      ▼
//!                        output::change_json ─► producer ─► segment-change topic
//!                        offsets committed only up to messages whose outputs are delivered
//! ```
//!
//! Pure logic (no I/O): [`time`], [`event`], [`state`], [`rules`], [`engine`], [`output`],
//! and [`processor`] (which only reads the wall time it is given).
//! Effects: [`pipeline`] (Kafka in and out), [`demo`] (embedded broker + generator),
//! [`generate`] (synthetic customers). Configuration: [`config`].

pub mod bench;
pub mod changelog;
pub mod config;
pub mod demo;
pub mod engine;
pub mod event;
pub mod generate;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod processor;
pub mod rules;
pub mod state;
pub mod symbols;
pub mod time;
