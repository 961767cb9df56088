//! Time. The core never reads a clock: every operation takes the timestamp it should act at.
//! Callers that need "now" get it from a [`Clock`], which tests replace with [`ManualClock`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (UTC). All timestamps in Coalesce use this unit.
pub type Millis = u64;

/// The latest leader stamp a Raft entry may carry: 9999-12-31T23:59:59.999Z. A shard's clock
/// never goes backwards, so one stamp near `u64::MAX` would pin it there for good (every window
/// due at once, every producer session expired); entries stamped later are refused.
pub const MAX_STAMP: Millis = 253_402_300_799_999;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time in milliseconds since the Unix epoch.
    fn now(&self) -> Millis;
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
    }
}

/// A clock that only moves when told to; for tests and simulations.
#[derive(Debug, Default)]
pub struct ManualClock {
    /// Shared so a test can hold the clock while the code under test reads it.
    now: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Millis) -> Self {
        Self { now: AtomicU64::new(start) }
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock; it may not go backwards.
    pub fn set(&self, to: Millis) {
        self.now.fetch_max(to, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.now.load(Ordering::SeqCst)
    }
}
