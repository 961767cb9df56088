//! Per-key input rate limits (`key_rate_limit` on a stream, [`coalesce_core::stream::KeyRateLimit`]).
//!
//! A runaway key (a retry loop, a bot, one tenant's bulk import) can flood a shard on its own;
//! coalescing absorbs its writes downstream, but the ingest path still pays for every event.
//! Streams that need a guard set `key_rate_limit = { per_second, burst, action }`: each event
//! takes a token from its key's bucket (GCRA, from the `governor` crate) on the node the event
//! arrives at, before it is merged. Over the rate an event is refused
//! (`RESOURCE_EXHAUSTED`, reason `key_rate_limited`, with the wait in `retry_after_ms`) or,
//! with `action = "shed"`, acknowledged as `SHED` and dropped. Either way it never enters a
//! Raft entry, and `coalesce_stream_rate_limited_inputs_total{stream,action}` counts it.
//!
//! The budget belongs to the receiving node: a leader-aware producer (the Rust and Python
//! clients) sends a shard's events to its leader, so a key's events meet one budget; events
//! sent to other nodes meet each node's budget, and a new leader starts with full buckets.
//!
//! Memory: one bucket per key seen recently. Buckets that are full again (the key has been
//! quiet for `burst / per_second`) are indistinguishable from new ones and are dropped every
//! [`SWEEP_EVERY`], so the table holds at most the keys of the last few seconds of input.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use coalesce_core::stream::{KeyRateAction, StreamTable};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How often buckets of quiet keys are dropped.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// An event over its key's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub action: KeyRateAction,
    /// When the key's bucket has a token again.
    pub retry_after: Duration,
    pub per_second: u32,
    pub burst: u32,
}

/// The per-key buckets of every stream with a `key_rate_limit`, on one node.
pub struct KeyRates {
    streams: BTreeMap<String, StreamBuckets>,
    clock: DefaultClock,
    last_sweep: Mutex<Instant>,
}

struct StreamBuckets {
    limiter: DefaultKeyedRateLimiter<String>,
    action: KeyRateAction,
    per_second: u32,
    burst: u32,
}

impl std::fmt::Debug for KeyRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRates").field("streams", &self.streams.keys().collect::<Vec<_>>()).finish()
    }
}

impl KeyRates {
    /// Buckets for the streams of `table` that have a `key_rate_limit`.
    pub fn new(table: &StreamTable) -> Self {
        let streams = table
            .iter()
            .filter_map(|def| {
                let l = def.key_rate_limit?;
                let quota = Quota::per_second(l.per_second).allow_burst(l.burst);
                let buckets = StreamBuckets {
                    limiter: RateLimiter::keyed(quota),
                    action: l.action,
                    per_second: l.per_second.get(),
                    burst: l.burst.get(),
                };
                Some((def.name.clone(), buckets))
            })
            .collect();
        Self { streams, clock: DefaultClock::default(), last_sweep: Mutex::new(Instant::now()) }
    }

    /// Whether any stream is limited (callers skip the per-event check when none is).
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Takes a token for one event of `key` in `stream`; `Err` when the key is over its rate.
    pub fn check(&self, stream: &str, key: &str) -> Result<(), Limited> {
        let Some(b) = self.streams.get(stream) else { return Ok(()) };
        self.sweep();
        // `check_key` wants `&String`; the map clones it only for a key it has not seen.
        let key = key.to_owned();
        b.limiter.check_key(&key).map_err(|not_until| {
            crate::metrics::RATE_LIMITED.with_label_values(&[stream, b.action.as_str()]).inc();
            Limited {
                action: b.action,
                retry_after: not_until.wait_time_from(self.clock.now()),
                per_second: b.per_second,
                burst: b.burst,
            }
        })
    }

    /// Keys tracked now, over all streams.
    pub fn tracked_keys(&self) -> usize {
        self.streams.values().map(|b| b.limiter.len()).sum()
    }

    /// Drops the buckets of quiet keys, at most once per [`SWEEP_EVERY`].
    fn sweep(&self) {
        let Ok(mut last) = self.last_sweep.try_lock() else { return };
        if last.elapsed() < SWEEP_EVERY {
            return;
        }
        *last = Instant::now();
        for b in self.streams.values() {
            b.limiter.retain_recent();
            b.limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use coalesce_core::stream::StreamsFile;

    fn rates(text: &str) -> KeyRates {
        KeyRates::new(&StreamsFile::parse(text).unwrap().validate(&["grpc"]).unwrap())
    }

    #[test]
    fn a_key_gets_its_burst_then_its_rate_and_other_keys_are_untouched() {
        let r = rates(
            "[streams.a]\nmerge = \"count\"\nwindow = { tumbling = \"1s\" }\n\
             key_rate_limit = { per_second = 10, burst = 3 }\n\
             [streams.free]\nmerge = \"count\"\nwindow = { tumbling = \"1s\" }\n",
        );
        let results: Vec<bool> = (0..5).map(|_| r.check("a", "hot").is_ok()).collect();
        assert_eq!(results, [true, true, true, false, false]);
        let limited = r.check("a", "hot").unwrap_err();
        assert_eq!((limited.action, limited.per_second, limited.burst), (KeyRateAction::Reject, 10, 3));
        assert!(limited.retry_after <= Duration::from_millis(100), "{limited:?}");
        assert!(r.check("a", "cold").is_ok(), "keys have their own buckets");
        assert!((0..100).all(|_| r.check("free", "hot").is_ok()), "streams without a limit are not limited");
        std::thread::sleep(Duration::from_millis(120));
        assert!(r.check("a", "hot").is_ok(), "a token comes back after 1/per_second");
        assert_eq!(r.tracked_keys(), 2);
    }
}
