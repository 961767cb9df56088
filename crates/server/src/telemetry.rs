//! Logging: `tracing` with `tracing-subscriber`, as text or JSON lines on stderr, filtered by an
//! `EnvFilter` (`RUST_LOG` syntax) that can be replaced while the node runs (`PUT /loglevel`).
//!
//! Spans follow a request: `ingest` (client port, events) → `forward` (to the shard leader) →
//! `replicate` (propose, commit, apply) ; the window scheduler's `seal` and the delivery
//! worker's `deliver` carry shard, stream and seq fields. They are at debug level: enable them
//! with e.g. `info,coalesce_server=debug,coalesce_raft=debug`.

use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The filter used when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,openraft=error";

/// Replaces the process's log filter at run time.
#[derive(Debug)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl LogControl {
    /// The filter in force.
    pub fn current(&self) -> String {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the filter; a malformed one is refused and the old one stays.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let parsed = EnvFilter::try_new(filter).map_err(|e| format!("invalid filter {filter:?}: {e}"))?;
        self.handle.reload(parsed).map_err(|e| format!("reloading the filter: {e}"))?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = filter.to_owned();
        Ok(())
    }
}

/// Installs the global subscriber: `json` lines or human-readable text on stderr, filtered by
/// `RUST_LOG` (else [`DEFAULT_FILTER`]).
pub fn init_logging(json: bool) -> LogControl {
    let initial = std::env::var("RUST_LOG").ok().filter(|f| EnvFilter::try_new(f).is_ok());
    let initial = initial.unwrap_or_else(|| DEFAULT_FILTER.to_owned());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let (layer, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(layer);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    LogControl { handle, current: Mutex::new(initial) }
}
