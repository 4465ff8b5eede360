//! The HTTP API: what a personalisation service asks ("which segments is this customer in,
//! and why?") and what an operator scrapes (metrics, health, readiness).
//!
//! This module owns the routes and their JSON (README "HTTP API"):
//!
//! * `GET /v1/customers/{id}` — memberships, the features the rules read, the state's time
//!   and `seq`; 404 for an unknown customer of a partition held here, 421 when the customer's
//!   partition belongs to another instance;
//! * `GET /v1/customers/{id}/explain?segment=NAME` — the segment's rule split into its
//!   sub-conditions, each with the feature values it read and whether it held (for a
//!   segment of a segmentation, also the earlier segments, since the first match wins);
//! * `GET /v1/segments` — every segment's size on this instance;
//! * `GET /metrics`, `GET /healthz`, `GET /readyz`.
//!
//! Handlers copy the customer out of the shared map (one shard read lock, released at once)
//! and build the response from the copy: no map reference is held across an `.await` or
//! while another lock is taken, and the event path never waits for a reader longer than one
//! lookup.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::engine::{Customer, NO_SEGMENT};
use crate::pipeline::Pipeline;
use crate::rules::compile::Ctx;
use crate::time::format_rfc3339;

/// Kafka's default partitioner (murmur2, as the Java client and librdkafka's
/// `murmur2_random` compute it) applied to a key: the partition of a customer id.
pub fn kafka_partition(key: &[u8], partitions: i32) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ key.len() as u32;
    let mut chunks = key.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = chunks.remainder();
    if tail.len() == 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    ((h & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// The routes over one running pipeline.
pub fn router(pipeline: Arc<Pipeline>) -> Router {
    Router::new()
        .route("/v1/customers/{id}", get(customer))
        .route("/v1/customers/{id}/explain", get(explain))
        .route("/v1/segments", get(segments))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route", json!({})) })
        .with_state(pipeline)
}

/// Binds the API's address (at start-up, so a taken port is an error before anything runs).
pub async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    pipeline: Arc<Pipeline>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "HTTP API listening");
    axum::serve(listener, router(pipeline))
        .with_graceful_shutdown(shutdown)
        .await
}

fn error(status: StatusCode, message: &str, extra: Value) -> Response {
    let mut body = json!({ "error": message });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    (status, Json(body)).into_response()
}

/// 404, or 421 when the customer's partition is held by another instance.
fn not_here(p: &Pipeline, id: &str) -> Response {
    let Some(n) = p.partition_count() else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown customer",
            json!({"customer_id": id}),
        );
    };
    let partition = kafka_partition(id.as_bytes(), n);
    if p.owns(partition) {
        error(
            StatusCode::NOT_FOUND,
            "unknown customer",
            json!({"customer_id": id, "partition": partition}),
        )
    } else {
        error(
            StatusCode::MISDIRECTED_REQUEST,
            "the customer's partition is held by another instance",
            json!({"customer_id": id, "partition": partition, "owner": null}),
        )
    }
}

/// The evaluation time for a customer: its own clock or the partition's, whichever is later.
fn now_for(p: &Pipeline, partition: i32, c: &Customer) -> i64 {
    c.state.last_seen.max(p.clock(partition))
}

fn ctx<'a>(p: &'a Pipeline, c: &'a Customer, now: i64) -> Ctx<'a> {
    let rules = &p.engine().rules;
    Ctx::new(&c.state, &rules.state, &rules.symbols, now)
}

async fn customer(State(p): State<Arc<Pipeline>>, Path(id): Path<String>) -> Response {
    let Some((partition, c)) = p.find_customer(&id) else {
        return not_here(&p, &id);
    };
    let rules = &p.engine().rules;
    let now = now_for(&p, partition, &c);
    let segmentations: Map<String, Value> = rules
        .segmentations
        .iter()
        .zip(c.segments(p.engine().counts()))
        .map(|(s, i)| {
            let v = if i == NO_SEGMENT {
                Value::Null
            } else {
                Value::from(s.segment_name(i as usize))
            };
            (s.name.clone(), v)
        })
        .collect();
    let segments: Vec<&str> = rules
        .segments
        .iter()
        .enumerate()
        .filter(|(i, _)| c.is_member(p.engine().counts(), *i))
        .map(|(_, r)| r.name.as_str())
        .collect();
    let atoms = rules
        .segmentations
        .iter()
        .flat_map(|s| s.segments.iter())
        .chain(rules.segments.iter())
        .flat_map(|r| r.atoms.iter());
    let features: Map<String, Value> = p
        .engine()
        .because(atoms, &c.state, now)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let body = json!({
        "customer_id": id,
        "partition": partition,
        "seq": c.seq,
        "state_at": format_rfc3339(c.state.last_seen),
        "evaluated_at": format_rfc3339(now),
        "segmentations": segmentations,
        "segments": segments,
        "features": features,
        "rules_version": rules.version,
    });
    Json(body).into_response()
}

#[derive(Deserialize)]
struct ExplainQuery {
    segment: Option<String>,
}

async fn explain(
    State(p): State<Arc<Pipeline>>,
    Path(id): Path<String>,
    Query(q): Query<ExplainQuery>,
) -> Response {
    let rules = &p.engine().rules;
    let known = || -> Vec<String> {
        rules
            .segmentations
            .iter()
            .flat_map(|s| {
                (0..=s.segments.len()).map(move |i| format!("{}/{}", s.name, s.segment_name(i)))
            })
            .chain(rules.segments.iter().map(|r| r.name.clone()))
            .collect()
    };
    let Some(name) = q.segment.filter(|s| !s.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "say which segment: ?segment=NAME (or SEGMENTATION/NAME)",
            json!({"segments": known()}),
        );
    };
    // An independent segment, or a segment of a segmentation ("lifecycle/active", or just
    // "active" when only one segmentation has it).
    let independent = rules.segments.iter().position(|r| r.name == name);
    let in_segmentation: Vec<(usize, usize)> = rules
        .segmentations
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            let name = name.as_str();
            (0..=s.segments.len())
                .filter(move |&i| {
                    let n = s.segment_name(i);
                    n == name || format!("{}/{}", s.name, n) == name
                })
                .map(move |i| (si, i))
        })
        .collect();
    if independent.is_none() && in_segmentation.len() != 1 {
        let msg = if in_segmentation.len() > 1 {
            "ambiguous segment: name it SEGMENTATION/NAME"
        } else {
            "unknown segment"
        };
        return error(
            StatusCode::BAD_REQUEST,
            msg,
            json!({"segment": name, "segments": known()}),
        );
    }
    let Some((partition, c)) = p.find_customer(&id) else {
        return not_here(&p, &id);
    };
    let now = now_for(&p, partition, &c);
    let cx = ctx(&p, &c, now);
    let body = if let Some(i) = independent {
        let r = &rules.segments[i];
        let (holds, condition) = r.condition.explain(&cx);
        json!({
            "customer_id": id,
            "segment": r.name,
            "segmentation": null,
            "member": c.is_member(p.engine().counts(), i),
            "holds": holds,
            "rule": r.source,
            "condition": condition,
            "evaluated_at": format_rfc3339(now),
        })
    } else {
        let (si, i) = in_segmentation[0];
        let s = &rules.segmentations[si];
        // First match wins: the segment holds if its rule does and no earlier one does.
        let earlier: Vec<Value> = s.segments[..i.min(s.segments.len())]
            .iter()
            .map(|r| {
                let (held, condition) = r.condition.explain(&cx);
                json!({"segment": r.name, "rule": r.source, "held": held, "condition": condition})
            })
            .collect();
        let blocked = earlier.iter().any(|e| e["held"] == true);
        let (own, rule, condition) = match s.segments.get(i) {
            Some(r) => {
                let (h, cond) = r.condition.explain(&cx);
                (h, Value::from(r.source.as_str()), cond)
            }
            None => (true, Value::Null, Value::Null), // the default: no rule of its own
        };
        json!({
            "customer_id": id,
            "segment": s.segment_name(i),
            "segmentation": s.name,
            "member": c.segment(si) as usize == i,
            "holds": own && !blocked,
            "rule": rule,
            "condition": condition,
            "earlier_segments": earlier,
            "evaluated_at": format_rfc3339(now),
        })
    };
    Json(body).into_response()
}

async fn segments(State(p): State<Arc<Pipeline>>) -> Response {
    let rules = &p.engine().rules;
    let m = p.metrics();
    let segmentations: Vec<Value> = rules
        .segmentations
        .iter()
        .map(|s| {
            let segs: Vec<Value> = (0..=s.segments.len())
                .map(|i| {
                    let n = s.segment_name(i);
                    json!({"name": n, "members": m.members(&s.name, n)})
                })
                .collect();
            json!({"name": s.name, "segments": segs})
        })
        .collect();
    let independent: Vec<Value> = rules
        .segments
        .iter()
        .map(|r| json!({"name": r.name, "members": m.members("", &r.name)}))
        .collect();
    Json(json!({
        "customers": p.customer_count(),
        "segmentations": segmentations,
        "segments": independent,
        "rules_version": rules.version,
    }))
    .into_response()
}

async fn metrics(State(p): State<Arc<Pipeline>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        p.metrics().render(),
    )
        .into_response()
}

async fn readyz(State(p): State<Arc<Pipeline>>) -> Response {
    let assigned = p.partitions();
    if p.ready() {
        Json(json!({"status": "ready", "partitions": assigned})).into_response()
    } else {
        let status = if p.restoring() {
            "restoring"
        } else {
            "waiting for partitions"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": status, "partitions": assigned})),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::kafka_partition;

    #[test]
    fn murmur2_partitions_like_the_java_client() {
        // Partitions of known keys over 1 000 000 partitions equal the positive murmur2
        // hash; values from the Java client's murmur2.
        for (key, hash) in [
            ("21", -973932308i32),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ] {
            let positive = (hash & 0x7fff_ffff) as i64;
            assert_eq!(
                kafka_partition(key.as_bytes(), i32::MAX) as i64,
                positive % i32::MAX as i64,
                "{key}"
            );
        }
    }
}
