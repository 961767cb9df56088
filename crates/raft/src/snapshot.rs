//! Shard snapshots between replicas, streamed and bounded on both sides.
//!
//! A snapshot is what a leader sends a replica whose log it has purged: every state-machine
//! row of the shard ([`coalesce_storage::snapshot`] is the format). Nothing holds one whole in
//! memory:
//!
//! - **Building** one (openraft's [`SnapshotPolicy`](openraft::SnapshotPolicy), for log purge)
//!   checkpoints the applied state and reads the applied log id and membership from one
//!   consistent RocksDB view; no bytes are produced. The current snapshot *is* the applied state:
//!   [`ShardSnapshot::View`] reads it when a replica needs it.
//! - **Sending** ([`chunks`]) pulls 1 MiB chunks from that view as HTTP/2 flow control lets
//!   them go, optionally throttled ([`SnapshotOptions::send_bytes_per_second`]).
//! - **Receiving** ([`receive`]) checks every chunk as it arrives (size per chunk and in total,
//!   column families, key order, row count, stalls) and spools it to a file in the data
//!   directory; the state machine then installs the file in bounded RocksDB writes that a
//!   restart finishes if it interrupts them ([`coalesce_storage::transfer`]). At most
//!   [`SnapshotOptions::concurrent_receives`] snapshots are received at once per node.
//!
//! The wire format is unchanged from builds that sent a snapshot as one buffer: the first
//! [`SnapshotChunk`] carries the vote and metadata, every chunk some bytes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use coalesce_proto::v1::SnapshotChunk;
use coalesce_storage::snapshot::Limits;
use coalesce_storage::transfer::{SnapshotFile, Spool, SpoolError, StateView};
use coalesce_storage::{ShardStore, StorageError};
use futures::{Stream, StreamExt};
use prometheus::IntCounterVec;
use std::sync::LazyLock;
use tonic::Status;

/// What a shard snapshot's data is, to openraft.
#[derive(Debug)]
pub enum ShardSnapshot {
    /// This replica's applied state, read as it is sent.
    View(StateView),
    /// A complete snapshot received from a peer, on disk, waiting to be installed.
    Received(SnapshotFile),
}

/// Limits and pacing of snapshot transfers (`[raft]` in the node's config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// The largest snapshot this node accepts from a peer, in bytes.
    pub max_bytes: u64,
    /// A transfer that brings no chunk for this long is abandoned (and its file removed).
    pub stall_ms: u64,
    /// Snapshots this node receives at once; more are refused as busy (the leader retries).
    pub concurrent_receives: usize,
    /// Bytes per second this node sends one snapshot at, at most; 0: no limit.
    pub send_bytes_per_second: u64,
}

impl SnapshotOptions {
    /// 8 GiB at most, 30 s without a chunk, two at once, unthrottled.
    pub const DEFAULT: Self =
        Self { max_bytes: 8 << 30, stall_ms: 30_000, concurrent_receives: 2, send_bytes_per_second: 0 };
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The largest chunk a receiver accepts (senders of every version send 1 MiB).
pub const MAX_CHUNK_BYTES: usize = 4 << 20;

pub(crate) static SNAPSHOT_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "coalesce_raft_snapshot_bytes_total",
        "Bytes of shard snapshots sent to or received from peers, by direction (sent, received).",
        &["direction"],
    )
});
pub(crate) static SNAPSHOT_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "coalesce_raft_snapshot_refused_total",
        "Snapshots from peers refused before they were installed, by reason: busy (too many at once), \
         too_large, invalid (bytes that are not a snapshot, or metadata that contradicts them or the vote), \
         stale (a vote older than this node's), stalled (no chunk for the stall timeout, or slower than \
         64 KiB/s), io (the file could not be written).",
        &["reason"],
    )
});

/// Creates the families' children, so each is listed from the first scrape on.
pub(crate) fn init_metrics() {
    for d in ["sent", "received"] {
        SNAPSHOT_BYTES.with_label_values(&[d]);
    }
    for r in ["busy", "too_large", "invalid", "stale", "stalled", "io"] {
        SNAPSHOT_REFUSED.with_label_values(&[r]);
    }
}

/// Counts a refusal and turns it into the status the sender sees.
pub(crate) fn refuse(reason: &'static str, detail: impl std::fmt::Display) -> Status {
    SNAPSHOT_REFUSED.with_label_values(&[reason]).inc();
    let msg = format!("snapshot refused ({reason}): {detail}");
    tracing::warn!("{msg}");
    match reason {
        "busy" => Status::resource_exhausted(msg),
        "io" => Status::unavailable(msg),
        "stalled" => Status::deadline_exceeded(msg),
        _ => Status::invalid_argument(msg),
    }
}

/// Where a snapshot stream leaves the error that ended it early.
pub(crate) type ReadError = Arc<std::sync::Mutex<Option<String>>>;

/// A snapshot about to be sent, its first bytes already read.
pub(crate) struct Prepared {
    source: StateView,
    /// `None`: the snapshot had no bytes at all.
    first: Option<Vec<u8>>,
}

/// Reads the first chunk of `snapshot` (for a view, that counts its rows first, which may take
/// a while for a large shard): done before the transfer opens, so that the receiver's stall
/// timeout never waits on it.
pub(crate) async fn prepare(shard: u32, snapshot: ShardSnapshot) -> Result<Prepared, StorageError> {
    // openraft sends what `get_current_snapshot` returns, always a view of the applied state;
    // a received file is installed, never sent on.
    let mut source = match snapshot {
        ShardSnapshot::View(v) => v,
        ShardSnapshot::Received(_) => {
            let detail = "a received snapshot file is installed, not sent".to_owned();
            return Err(StorageError::SnapshotReader { shard, detail });
        }
    };
    tokio::task::spawn_blocking(move || {
        let first = source.next_chunk()?;
        Ok(Prepared { source, first })
    })
    .await
    .map_err(|e| StorageError::SnapshotReader { shard, detail: e.to_string() })?
}

/// The chunks that send `prepared`: the first carries `vote` and `meta`, then one per 1 MiB of
/// data, each read from disk only when the transport asks for it. A read error ends the stream
/// early (the receiver then refuses it as truncated) and is left in the returned slot.
pub(crate) fn chunks(
    group: u32,
    target: u64,
    vote: Vec<u8>,
    meta: Vec<u8>,
    prepared: Prepared,
    options: SnapshotOptions,
) -> (impl Stream<Item = SnapshotChunk> + Send + 'static, ReadError) {
    let failed = Arc::new(std::sync::Mutex::new(None));
    let slot = Arc::clone(&failed);
    let started = tokio::time::Instant::now();
    let Prepared { source, first } = prepared;
    // An empty snapshot still sends one chunk: the one that carries vote and meta.
    let rest = first.is_some().then_some(source);
    let head = SnapshotChunk { group, target, vote, meta, data: first.unwrap_or_default() };
    let sent = head.data.len() as u64;
    SNAPSHOT_BYTES.with_label_values(&["sent"]).inc_by(sent);
    let rest = futures::stream::unfold((rest, sent), move |(source, sent)| {
        let slot = Arc::clone(&slot);
        async move {
            let mut source = source?;
            if options.send_bytes_per_second > 0 {
                let due = Duration::from_secs_f64(sent as f64 / options.send_bytes_per_second as f64);
                tokio::time::sleep_until(started + due).await;
            }
            let read = tokio::task::spawn_blocking(move || {
                let chunk = source.next_chunk();
                (source, chunk)
            })
            .await;
            let (source, data) = match read {
                Ok((source, Ok(Some(data)))) => (source, data),
                Ok((_, Ok(None))) => return None,
                Ok((_, Err(e))) => {
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    return None;
                }
                Err(e) => {
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("snapshot reader: {e}"));
                    return None;
                }
            };
            SNAPSHOT_BYTES.with_label_values(&["sent"]).inc_by(data.len() as u64);
            let sent = sent + data.len() as u64;
            let msg = SnapshotChunk { group, target, vote: Vec::new(), meta: Vec::new(), data };
            Some((msg, (Some(source), sent)))
        }
    });
    (futures::stream::once(async move { head }).chain(rest), failed)
}

/// The slowest a snapshot may arrive, on average, once it has had one stall timeout to start:
/// a peer that trickles bytes cannot hold a receive slot for ever.
pub const MIN_RECEIVE_BYTES_PER_SECOND: u64 = 64 << 10;

/// Receives the rest of a snapshot whose first chunk is `first` into a spool file of `store`'s
/// node, checking it on the way (see the module docs); returns the durable file.
pub(crate) async fn receive(
    store: &ShardStore,
    first: SnapshotChunk,
    mut rest: Pin<&mut (dyn Stream<Item = Result<SnapshotChunk, Status>> + Send)>,
    options: SnapshotOptions,
) -> Result<SnapshotFile, Status> {
    let limits = Limits { max_bytes: options.max_bytes, ..Limits::default() };
    let shard = store.shard();
    let mut spool = Spool::create(store.db(), shard, limits).map_err(|e| refuse("io", e))?;
    let stall = Duration::from_millis(options.stall_ms.max(1));
    let started = tokio::time::Instant::now();
    let mut next = Some(first);
    loop {
        let late = started.elapsed().saturating_sub(stall);
        if spool.bytes() < (late.as_secs_f64() * MIN_RECEIVE_BYTES_PER_SECOND as f64) as u64 {
            let rate = spool.bytes() as f64 / started.elapsed().as_secs_f64() / 1024.0;
            return Err(refuse("stalled", format!("shard {shard}: {rate:.1} KiB/s, slower than 64 KiB/s")));
        }
        let chunk = match next.take() {
            Some(c) => c,
            None => match tokio::time::timeout(stall, rest.next()).await {
                Err(_) => {
                    return Err(refuse(
                        "stalled",
                        format!("shard {shard}: no chunk for {stall:?} after {} bytes", spool.bytes()),
                    ));
                }
                Ok(None) => break,
                Ok(Some(c)) => c?,
            },
        };
        if chunk.group != shard {
            return Err(refuse("invalid", "chunks of different groups in one stream"));
        }
        if chunk.data.len() > MAX_CHUNK_BYTES {
            return Err(refuse(
                "invalid",
                format!("a chunk of {} bytes (at most {MAX_CHUNK_BYTES})", chunk.data.len()),
            ));
        }
        SNAPSHOT_BYTES.with_label_values(&["received"]).inc_by(chunk.data.len() as u64);
        // Checking and writing up to 4 MiB is blocking work: off the runtime, whose threads
        // carry every group's heartbeats.
        let data = chunk.data;
        if data.is_empty() {
            continue;
        }
        let (back, pushed) = tokio::task::spawn_blocking(move || {
            let pushed = spool.push(&data);
            (spool, pushed)
        })
        .await
        .map_err(|e| refuse("io", e))?;
        spool = back;
        pushed.map_err(|e| spool_refusal(shard, e))?;
    }
    tokio::task::spawn_blocking(move || spool.finish())
        .await
        .map_err(|e| refuse("io", e))?
        .map_err(|e| spool_refusal(shard, e))
}

fn spool_refusal(shard: u32, e: SpoolError) -> Status {
    match e {
        SpoolError::Invalid(e @ coalesce_storage::snapshot::SnapshotError::TooLarge { .. }) => {
            refuse("too_large", format!("shard {shard}: {e}"))
        }
        SpoolError::Invalid(e) => refuse("invalid", format!("shard {shard}: {e}")),
        SpoolError::Io(e) => refuse("io", format!("shard {shard}: {e}")),
    }
}
