//! Group commit: one thread fsyncs the WAL once for every log append that was written before
//! the sync began, across all shard groups of the node.
//!
//! ```text
//!  group 3: write(batch, sync=false) ─┐
//!  group 9: write(batch, sync=false) ─┼─► queue ──► flusher thread: drain queue,
//!  group 3: write(batch, sync=false) ─┘               flush_wal(sync=true) once,
//!                                                     call every drained callback
//! ```
//! A callback is enqueued only after its write returned, so when the sync that follows the
//! drain completes, that write is durable. Under load many appends share one fsync.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use rocksdb::DB;

/// Called once the write it was enqueued after is durable (or the sync failed).
pub type FlushCallback = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Counters of the flusher, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct FlushStats {
    /// fsyncs performed.
    pub syncs: AtomicU64,
    /// Callbacks completed (appends made durable).
    pub callbacks: AtomicU64,
}

/// The group-commit flusher of a node.
#[derive(Debug)]
pub struct Flusher {
    /// `None` once shutting down; the sender is the only handle callers need.
    tx: Option<mpsc::Sender<FlushCallback>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<FlushStats>,
    /// Extra time every fsync takes, in µs: the chaos tool's slow-disk fault (0 normally).
    extra_latency_us: Arc<AtomicU64>,
}

impl Flusher {
    pub(crate) fn start(db: Arc<DB>) -> Self {
        let (tx, rx) = mpsc::channel::<FlushCallback>();
        let stats = Arc::new(FlushStats::default());
        let thread_stats = Arc::clone(&stats);
        let extra_latency_us = Arc::new(AtomicU64::new(0));
        let slow = Arc::clone(&extra_latency_us);
        let thread = std::thread::Builder::new()
            .name("coalesce-wal-flusher".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let extra = slow.load(Ordering::Relaxed);
                    if extra > 0 {
                        std::thread::sleep(std::time::Duration::from_micros(extra));
                    }
                    let result = db.flush_wal(true);
                    thread_stats.syncs.fetch_add(1, Ordering::Relaxed);
                    thread_stats.callbacks.fetch_add(waiting.len() as u64, Ordering::Relaxed);
                    for cb in waiting {
                        cb(result.as_ref().map(|_| ()).map_err(|e| io::Error::other(format!("WAL sync failed: {e}"))));
                    }
                }
            })
            .expect("spawning the WAL flusher thread");
        Self { tx: Some(tx), thread: Some(thread), stats, extra_latency_us }
    }

    /// Makes every fsync take `extra` longer (a slow disk, for fault injection; zero restores
    /// normal speed).
    pub fn set_extra_latency(&self, extra: std::time::Duration) {
        self.extra_latency_us.store(extra.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    /// The extra fsync latency in force.
    pub fn extra_latency(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.extra_latency_us.load(Ordering::Relaxed))
    }

    /// Calls `cb` once everything written before this call is durable.
    pub fn after_sync(&self, cb: FlushCallback) {
        match &self.tx {
            Some(tx) => {
                if let Err(mpsc::SendError(cb)) = tx.send(cb) {
                    cb(Err(io::Error::other("WAL flusher stopped")));
                }
            }
            None => cb(Err(io::Error::other("WAL flusher stopped"))),
        }
    }

    /// The flusher's counters.
    pub fn stats(&self) -> &FlushStats {
        &self.stats
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Closing the channel ends the thread after it has answered every queued callback.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
