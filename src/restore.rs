//! Restoring several partitions at once, one worker thread per share of them.
//!
//! This module owns how a restore spreads over the cores: [`restore`] gives each worker
//! thread the [`Restorer`]s of some of the partitions, and the caller feeds every changelog
//! record through a [`Feed`], which copies it into the batch of the worker that owns its
//! partition. A partition's records stay in log order (one worker, one channel). Decoding
//! and building the customers, most of a restore's time, run on the workers, so the caller
//! (the changelog reader) only copies bytes. The restorers come back unfinished: finishing
//! them installs the partitions' clocks, which the caller does where it is safe to.
//!
//! No I/O: the feed closure does the reading.

use std::sync::mpsc::{sync_channel, SyncSender};

use crate::processor::{Processor, Restorer};

/// Records per batch handed to a worker.
const BATCH: usize = 256;

/// Batches in flight per worker before the feed waits.
const IN_FLIGHT: usize = 8;

/// One record of a batch: where its key and value are in the batch's bytes.
struct Item {
    partition: i32,
    offset: i64,
    key: (usize, usize),
    value: Option<(usize, usize)>,
}

/// Records for one worker, their bytes in one buffer.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    items: Vec<Item>,
}

impl Batch {
    fn push(&mut self, partition: i32, offset: i64, key: &[u8], value: Option<&[u8]>) {
        let mut span = |b: &[u8]| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(b);
            (start, self.bytes.len())
        };
        let key = span(key);
        let value = value.map(span);
        self.items.push(Item {
            partition,
            offset,
            key,
            value,
        });
    }
}

/// Hands changelog records to the restore workers (see [`restore`]).
pub struct Feed {
    /// Per partition restored, its worker.
    route: Vec<(i32, usize)>,
    batches: Vec<Batch>,
    workers: Vec<SyncSender<Batch>>,
}

impl Feed {
    /// Passes on one record (`None` value: a tombstone) of `partition` at `offset`, in log
    /// order. Records of partitions not being restored are ignored. An error: a worker
    /// stopped on a bad record (the restore's result says which); stop feeding.
    pub fn record(
        &mut self,
        partition: i32,
        offset: i64,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), String> {
        let Some(&(_, w)) = self.route.iter().find(|(p, _)| *p == partition) else {
            return Ok(());
        };
        let batch = &mut self.batches[w];
        batch.push(partition, offset, key, value);
        if batch.items.len() >= BATCH {
            self.flush(w)?;
        }
        Ok(())
    }

    fn flush(&mut self, w: usize) -> Result<(), String> {
        let batch = std::mem::take(&mut self.batches[w]);
        if batch.items.is_empty() {
            return Ok(());
        }
        self.workers[w]
            .send(batch)
            .map_err(|_| "a restore worker stopped".to_owned())
    }
}

/// Worker threads for restoring `partitions` partitions: one per partition, up to two per
/// core. A partition's records go to one worker, so with as many workers as cores some would
/// hold more partitions than others (3 on 2 cores: 2 and 1) and finish last; with more
/// workers than cores the scheduler evens the load out. Measured (BENCHMARKS.md, fifth
/// session): 3 workers restored 1 M customers from 3 partitions 7–67 % faster than 2, on 2
/// cores.
pub fn workers(partitions: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    partitions.clamp(1, 2 * cores)
}

/// Restores `partitions` of `processor` on up to `threads` worker threads (at least one),
/// fed by `feed`, and returns their restorers, unfinished, in the order of `partitions`.
/// The partitions are dealt to the workers in turn. A record that does not decode fails the
/// restore with its partition and offset; so does an error of `feed`. Errors are messages,
/// for the log.
pub fn restore<'p>(
    processor: &'p Processor,
    partitions: &[i32],
    threads: usize,
    feed: impl FnOnce(&mut Feed) -> Result<(), String>,
) -> Result<Vec<(i32, Restorer<'p>)>, String> {
    let threads = threads.clamp(1, partitions.len().max(1));
    // Created here, before any record is fed: a restorer takes its partition out of the
    // processor (dropping what it held).
    let mut shares: Vec<Vec<(i32, Restorer<'p>)>> = (0..threads).map(|_| Vec::new()).collect();
    let mut route = Vec::with_capacity(partitions.len());
    for (i, &p) in partitions.iter().enumerate() {
        shares[i % threads].push((p, processor.restorer(p)));
        route.push((p, i % threads));
    }
    std::thread::scope(|s| {
        let mut senders = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        for mut share in shares {
            let (tx, rx) = sync_channel::<Batch>(IN_FLIGHT);
            senders.push(tx);
            handles.push(s.spawn(move || {
                for batch in rx {
                    for it in &batch.items {
                        let Some((_, r)) = share.iter_mut().find(|(p, _)| *p == it.partition)
                        else {
                            continue;
                        };
                        let key = &batch.bytes[it.key.0..it.key.1];
                        let value = it.value.map(|(a, b)| &batch.bytes[a..b]);
                        r.record(key, value).map_err(|e| {
                            format!("partition {} offset {}: {e}", it.partition, it.offset)
                        })?;
                    }
                }
                Ok::<_, String>(share)
            }));
        }
        let mut f = Feed {
            route,
            batches: (0..threads).map(|_| Batch::default()).collect(),
            workers: senders,
        };
        let fed = feed(&mut f).and_then(|()| (0..threads).try_for_each(|w| f.flush(w)));
        // Closing the channels ends the workers.
        drop(f);
        let mut done: Vec<(i32, Restorer<'p>)> = Vec::with_capacity(partitions.len());
        let mut failed = None;
        for h in handles {
            match h.join() {
                Ok(Ok(share)) => done.extend(share),
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => failed = failed.or(Some("a restore worker panicked".to_owned())),
            }
        }
        // A worker's own error says more than the feed's "a worker stopped".
        if let Some(e) = failed {
            return Err(e);
        }
        fed?;
        let mut ordered = Vec::with_capacity(partitions.len());
        for p in partitions {
            if let Some(i) = done.iter().position(|(q, _)| q == p) {
                ordered.push(done.swap_remove(i));
            }
        }
        Ok(ordered)
    })
}
