//! Window policies and per-key window bookkeeping.
//!
//! A policy combines triggers; the first one to fire closes the window:
//!
//! | trigger      | fires when                                              | kind  |
//! |--------------|---------------------------------------------------------|-------|
//! | `tumbling`   | the aligned interval `[k·T, (k+1)·T)` holding the first input ends | time  |
//! | `max_wait`   | `max_wait` after the window's first input                | time  |
//! | `debounce`   | `debounce` after the key's last input (quiet period)     | time  |
//! | `idle`       | `idle` after the key's last input                        | time  |
//! | `max_count`  | the window holds at least `max_count` inputs             | data  |
//! | `max_bytes`  | the merged value is at least `max_bytes` bytes (default and most: [`MAX_MERGED_BYTES`]) | data  |
//!
//! Every key's merged value is bounded, whatever the operator: `max_bytes` defaults to (and may
//! not exceed) [`MAX_MERGED_BYTES`], the leader cuts a request's events of one key into partials
//! no larger than it, and apply seals a window as soon as its value reaches it — so a window's
//! value stays below twice `max_bytes` and every output fits a gRPC message (4 MiB). Such seals
//! have reason `max_bytes`.
//!
//! Time triggers are evaluated against the shard leader's wall clock (the stamps it puts on
//! Raft entries), never against event time, so a key that stops receiving input still closes
//! on time. Every policy must have a time bound (`tumbling` or `max_wait`): it is the staleness
//! bound — no input waits longer than it before its window closes. `debounce` alone would never
//! fire under steady traffic, so it must be paired with `max_wait` (and be no longer than it).
//!
//! `adaptive = { max_staleness = "10s", ... }` opts a stream into load-adaptive sealing: under
//! downstream pressure the leader seals time-triggered windows later, up to `max_staleness`,
//! which then is the stream's staleness bound ([`WindowPolicy::max_staleness_ms`]; see
//! [`crate::adaptive`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::adaptive::{AdaptiveConfig, AdaptivePolicy};
use crate::error::ConfigError;
use crate::time::Millis;

/// The window policy of a stream as written in config (durations in humantime: `"30s"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    #[serde(default, with = "humantime_serde")]
    pub tumbling: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_wait: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub debounce: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub idle: Option<Duration>,
    #[serde(default)]
    pub max_count: Option<u64>,
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Opt-in load-adaptive sealing: `adaptive = { max_staleness = "10s", ... }` (see
    /// [`crate::adaptive`]).
    #[serde(default)]
    pub adaptive: Option<AdaptiveConfig>,
}

/// The default and largest `max_bytes` (1 MiB): a window's value stays below twice it, and an
/// output (value, samples, envelope) below the 4 MiB a gRPC message may hold.
pub const MAX_MERGED_BYTES: u64 = 1 << 20;

/// Longest accepted window duration (7 days).
pub const MAX_WINDOW_MS: u64 = 7 * 24 * 3600 * 1000;

/// A validated window policy in milliseconds: what Raft entries carry and apply uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WindowPolicy {
    pub tumbling_ms: Option<u64>,
    pub max_wait_ms: Option<u64>,
    pub debounce_ms: Option<u64>,
    pub idle_ms: Option<u64>,
    pub max_count: Option<u64>,
    pub max_bytes: Option<u64>,
    /// Load-adaptive sealing ([`crate::adaptive`]); `None` for fixed windows. The serde default
    /// serves self-describing formats only: postcard is positional, so this field changed the
    /// encoding of every Raft entry that carries stream rules.
    #[serde(default)]
    pub adaptive: Option<AdaptivePolicy>,
}

/// A duration in the units a config would use: `250ms`, `10s`, `2m`, `1h`.
pub(crate) fn fmt_ms(ms: u64) -> String {
    match ms {
        m if m >= 3_600_000 && m % 3_600_000 == 0 => format!("{}h", m / 3_600_000),
        m if m >= 60_000 && m % 60_000 == 0 => format!("{}m", m / 60_000),
        m if m >= 1_000 && m % 1_000 == 0 => format!("{}s", m / 1_000),
        m => format!("{m}ms"),
    }
}

impl std::fmt::Display for WindowPolicy {
    /// The triggers as config would name them: `tumbling 10s, max_count 50`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (name, v) in [
            ("tumbling", self.tumbling_ms),
            ("max_wait", self.max_wait_ms),
            ("debounce", self.debounce_ms),
            ("idle", self.idle_ms),
        ] {
            if let Some(ms) = v {
                parts.push(format!("{name} {}", fmt_ms(ms)));
            }
        }
        if let Some(n) = self.max_count {
            parts.push(format!("max_count {n}"));
        }
        // The default bound (every policy has it since December 2026) goes unsaid.
        if let Some(n) = self.max_bytes.filter(|n| *n != MAX_MERGED_BYTES) {
            parts.push(format!("max_bytes {n}"));
        }
        if let Some(a) = self.adaptive {
            parts.push(format!("adaptive up to {}", fmt_ms(a.max_staleness_ms)));
        }
        f.write_str(&parts.join(", "))
    }
}

impl WindowConfig {
    /// Validates the policy of stream `stream`; errors name the field.
    pub fn validate(&self, stream: &str) -> Result<WindowPolicy, ConfigError> {
        // Saturating: a duration past u64 milliseconds is refused as too long by `check`.
        let ms = |d: Option<Duration>| d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let p = WindowPolicy {
            tumbling_ms: ms(self.tumbling),
            max_wait_ms: ms(self.max_wait),
            debounce_ms: ms(self.debounce),
            idle_ms: ms(self.idle),
            max_count: self.max_count,
            max_bytes: Some(self.max_bytes.unwrap_or(MAX_MERGED_BYTES)),
            adaptive: None,
        };
        p.check().map_err(|(field, message)| ConfigError::stream(stream, field, message))?;
        if self.max_bytes.is_some_and(|b| b > MAX_MERGED_BYTES) {
            return Err(ConfigError::stream(
                stream,
                "window.max_bytes",
                format!("must be at most {MAX_MERGED_BYTES} (1 MiB): an output must fit a gRPC message"),
            ));
        }
        let adaptive = self.adaptive.as_ref().map(|a| a.validate(stream, p.staleness_bound_ms())).transpose()?;
        Ok(WindowPolicy { adaptive, ..p })
    }
}

impl WindowPolicy {
    /// Checks what windowing relies on — durations in 1 ms..=7 d, count and byte triggers at
    /// least 1, a time bound, a debounce only under a `max_wait` it does not exceed, and a
    /// consistent adaptive policy — for config validation and for the rules a Raft entry
    /// carries alike. The error names the field (`window.tumbling`) and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for (field, v) in [
            ("window.tumbling", self.tumbling_ms),
            ("window.max_wait", self.max_wait_ms),
            ("window.debounce", self.debounce_ms),
            ("window.idle", self.idle_ms),
        ] {
            match v {
                Some(0) => return Err((field, "must be at least 1ms".into())),
                Some(ms) if ms > MAX_WINDOW_MS => return Err((field, "must be at most 7d".into())),
                _ => {}
            }
        }
        if self.max_count == Some(0) {
            return Err(("window.max_count", "must be at least 1".into()));
        }
        if self.max_bytes == Some(0) {
            return Err(("window.max_bytes", "must be at least 1".into()));
        }
        if let Some(debounce) = self.debounce_ms {
            match self.max_wait_ms {
                None => {
                    return Err((
                        "window.debounce",
                        "requires window.max_wait (a debounce alone never fires under steady traffic)".into(),
                    ));
                }
                Some(max_wait) if debounce > max_wait => {
                    return Err(("window.debounce", "must be <= window.max_wait".into()));
                }
                Some(_) => {}
            }
        }
        if self.tumbling_ms.is_none() && self.max_wait_ms.is_none() {
            return Err(("window", "needs a time bound: set window.tumbling or window.max_wait".into()));
        }
        if let Some(a) = &self.adaptive {
            if a.base_bound_ms != self.staleness_bound_ms() {
                return Err((
                    "window.adaptive",
                    format!(
                        "was validated against a time bound of {}, the window's is {}",
                        fmt_ms(a.base_bound_ms),
                        fmt_ms(self.staleness_bound_ms())
                    ),
                ));
            }
            a.check()?;
            if a.extra_ms > a.max_extra_ms() {
                return Err(("window.adaptive", format!("stretch {} passes max_staleness", fmt_ms(a.extra_ms))));
            }
        }
        Ok(())
    }

    /// The staleness bound: no input waits longer than this (from the stamp of the window's
    /// first input) before its window closes.
    pub fn staleness_bound_ms(&self) -> u64 {
        [self.tumbling_ms, self.max_wait_ms].into_iter().flatten().min().unwrap_or(MAX_WINDOW_MS)
    }

    /// The staleness bound including the load-adaptive stretch: `max_staleness` for adaptive
    /// policies, else [`WindowPolicy::staleness_bound_ms`].
    pub fn max_staleness_ms(&self) -> u64 {
        self.adaptive.map_or_else(|| self.staleness_bound_ms(), |a| a.max_staleness_ms)
    }

    /// The start of the window that a first input stamped `stamp` opens.
    pub fn window_start(&self, stamp: Millis) -> Millis {
        match self.tumbling_ms {
            Some(t) => stamp - stamp % t,
            None => stamp,
        }
    }

    /// When the window described by `w` closes by time, under this policy: the earliest time
    /// trigger, plus the adaptive stretch in force ([`crate::adaptive::AdaptivePolicy::extra_ms`]).
    pub fn deadline(&self, w: &WindowState) -> Millis {
        let candidates = [
            self.tumbling_ms.map(|t| w.start.saturating_add(t)),
            self.max_wait_ms.map(|m| w.first_input_at.saturating_add(m)),
            self.debounce_ms.map(|d| w.last_input_at.saturating_add(d)),
            self.idle_ms.map(|i| w.last_input_at.saturating_add(i)),
        ];
        let extra = self.adaptive.map_or(0, |a| a.extra_ms.min(a.max_extra_ms()));
        candidates.into_iter().flatten().min().map_or(Millis::MAX, |d| d.saturating_add(extra))
    }

    /// This policy with the adaptive stretch `extra_ms` in force; unchanged if not adaptive.
    /// The shard leader calls it on the rules of each Ingest entry it proposes.
    pub fn with_extra_ms(self, extra_ms: u64) -> Self {
        Self { adaptive: self.adaptive.map(|a| a.with_extra(extra_ms)), ..self }
    }

    /// Whether a data trigger (count or bytes) closes the window now.
    pub fn data_trigger(&self, inputs: u64, value_bytes: usize) -> Option<SealReason> {
        if self.max_count.is_some_and(|m| inputs >= m) {
            return Some(SealReason::MaxCount);
        }
        if self.max_bytes.is_some_and(|m| value_bytes as u64 >= m) {
            return Some(SealReason::MaxBytes);
        }
        None
    }
}

/// Bookkeeping of one key's open window. All times are leader stamps except the event times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowState {
    /// Window start: aligned for tumbling windows, else the first input's stamp.
    pub start: Millis,
    /// Stamp of the first input in this window.
    pub first_input_at: Millis,
    /// Stamp of the last input in this window.
    pub last_input_at: Millis,
    /// Smallest and largest event time seen (producer clocks; informational).
    pub first_event_at: Millis,
    pub last_event_at: Millis,
    /// Number of events merged into this window.
    pub inputs: u64,
}

impl WindowState {
    /// The state of a window opened by an input stamped `stamp`.
    pub fn open(
        policy: &WindowPolicy,
        stamp: Millis,
        inputs: u64,
        first_event_at: Millis,
        last_event_at: Millis,
    ) -> Self {
        Self {
            start: policy.window_start(stamp),
            first_input_at: stamp,
            last_input_at: stamp,
            first_event_at,
            last_event_at,
            inputs,
        }
    }

    /// Records more inputs stamped `stamp`.
    pub fn absorb(&mut self, stamp: Millis, inputs: u64, first_event_at: Millis, last_event_at: Millis) {
        self.last_input_at = self.last_input_at.max(stamp);
        self.first_event_at = self.first_event_at.min(first_event_at);
        self.last_event_at = self.last_event_at.max(last_event_at);
        self.inputs = self.inputs.saturating_add(inputs);
    }
}

/// Why a window closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SealReason {
    /// A time trigger (tumbling end, max-wait, debounce or idle) passed.
    Time,
    /// The window reached `max_count` inputs.
    MaxCount,
    /// The merged value reached `max_bytes`.
    MaxBytes,
    /// Merging the next input would overflow or exceed a bound, so the window closed early.
    Overflow,
    /// The stream's merge operator changed, so the old window closed.
    OpChanged,
    /// The shard buffer was full and the stream's overflow policy is `flush_early`.
    FlushEarly,
}

impl SealReason {
    /// A stable name for metrics and outputs.
    pub fn as_str(&self) -> &'static str {
        match self {
            SealReason::Time => "time",
            SealReason::MaxCount => "max_count",
            SealReason::MaxBytes => "max_bytes",
            SealReason::Overflow => "overflow",
            SealReason::OpChanged => "op_changed",
            SealReason::FlushEarly => "flush_early",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> WindowConfig {
        toml::from_str(toml_text).expect("window config parses")
    }

    #[test]
    fn debounce_needs_max_wait_and_must_not_exceed_it() {
        let e = cfg("debounce = \"30s\"").validate("api-calls").unwrap_err();
        assert!(e.to_string().contains("window.debounce requires window.max_wait"), "{e}");
        let e = cfg("debounce = \"30s\"\nmax_wait = \"10s\"").validate("api-calls").unwrap_err();
        assert_eq!(e.to_string(), "stream \"api-calls\": window.debounce must be <= window.max_wait");
        assert!(cfg("debounce = \"30s\"\nmax_wait = \"2m\"").validate("api-calls").is_ok());
    }

    #[test]
    fn policies_display_as_config_names_them() {
        let p = cfg("tumbling = \"1m\"\nmax_count = 50\nidle = \"20s\"").validate("s").unwrap();
        assert_eq!(p.to_string(), "tumbling 1m, idle 20s, max_count 50");
        let p = cfg("debounce = \"250ms\"\nmax_wait = \"2h\"").validate("s").unwrap();
        assert_eq!(p.to_string(), "max_wait 2h, debounce 250ms");
    }

    #[test]
    fn every_policy_bounds_the_merged_value() {
        assert_eq!(cfg("tumbling = \"1s\"").validate("s").unwrap().max_bytes, Some(MAX_MERGED_BYTES));
        assert_eq!(cfg("tumbling = \"1s\"\nmax_bytes = 4096").validate("s").unwrap().max_bytes, Some(4096));
        let e = cfg("tumbling = \"1s\"\nmax_bytes = 1048577").validate("s").unwrap_err();
        assert!(e.to_string().contains("window.max_bytes must be at most 1048576"), "{e}");
        // Entries of older leaders carry no bound; they still apply.
        let old = WindowPolicy { tumbling_ms: Some(1000), ..WindowPolicy::default() };
        assert_eq!(old.check(), Ok(()));
    }

    #[test]
    fn a_time_bound_is_required() {
        let e = cfg("max_count = 10").validate("s").unwrap_err();
        assert!(e.to_string().contains("needs a time bound"), "{e}");
        let e = cfg("idle = \"1s\"").validate("s").unwrap_err();
        assert!(e.to_string().contains("needs a time bound"), "{e}");
    }

    #[test]
    fn zero_and_huge_durations_are_refused() {
        assert!(
            cfg("tumbling = \"0s\"")
                .validate("s")
                .unwrap_err()
                .to_string()
                .contains("window.tumbling must be at least 1ms")
        );
        assert!(cfg("tumbling = \"8days\"").validate("s").unwrap_err().to_string().contains("at most 7d"));
        assert!(cfg("tumbling = \"1s\"\nmax_count = 0").validate("s").is_err());
    }

    #[test]
    fn adaptive_is_validated_against_the_time_bound() {
        let p =
            cfg("tumbling = \"1s\"\nadaptive = { max_staleness = \"10s\", backlog_high = 500 }").validate("s").unwrap();
        let a = p.adaptive.unwrap();
        assert_eq!((a.base_bound_ms, a.max_extra_ms(), a.backlog_high), (1000, 9000, 500));
        assert_eq!((p.staleness_bound_ms(), p.max_staleness_ms()), (1000, 10_000));
        assert_eq!(p.to_string(), "tumbling 1s, adaptive up to 10s");
        let e = cfg("max_wait = \"1m\"\ntumbling = \"2m\"\nadaptive = { max_staleness = \"30s\" }")
            .validate("s")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream \"s\": window.adaptive.max_staleness must be >= the window's time bound (1m)"
        );
        assert!(toml::from_str::<WindowConfig>("tumbling = \"1s\"\nadaptive = { max_stale = \"1s\" }").is_err());
        let plain = cfg("tumbling = \"1s\"").validate("s").unwrap();
        assert_eq!((plain.adaptive, plain.max_staleness_ms()), (None, 1000));
    }

    #[test]
    fn policies_as_entries_carry_them_are_checked_like_config() {
        let valid = cfg("tumbling = \"1s\"\nadaptive = { max_staleness = \"10s\" }").validate("s").unwrap();
        assert_eq!(valid.check(), Ok(()));
        let refused = |p: WindowPolicy| p.check().unwrap_err();
        assert_eq!(refused(WindowPolicy { tumbling_ms: Some(0), ..valid }).0, "window.tumbling");
        assert_eq!(refused(WindowPolicy { max_wait_ms: Some(u64::MAX), ..valid }).0, "window.max_wait");
        assert_eq!(refused(WindowPolicy { tumbling_ms: None, ..valid }).0, "window");
        assert_eq!(refused(WindowPolicy { debounce_ms: Some(5), ..valid }).0, "window.debounce");
        let stretched =
            WindowPolicy { adaptive: valid.adaptive.map(|a| AdaptivePolicy { extra_ms: 9_001, ..a }), ..valid };
        assert_eq!(refused(stretched).0, "window.adaptive");
        let rebased =
            WindowPolicy { adaptive: valid.adaptive.map(|a| AdaptivePolicy { base_bound_ms: 2, ..a }), ..valid };
        assert_eq!(refused(rebased).0, "window.adaptive");
        let no_cooldown =
            WindowPolicy { adaptive: valid.adaptive.map(|a| AdaptivePolicy { cooldown: 0, ..a }), ..valid };
        assert_eq!(refused(no_cooldown).0, "window.adaptive.cooldown");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<WindowConfig>("tumblin = \"1s\"").is_err());
    }

    #[test]
    fn deadline_is_the_earliest_trigger() {
        let p = cfg("tumbling = \"10s\"\ndebounce = \"2s\"\nmax_wait = \"5s\"").validate("s").unwrap();
        let mut w = WindowState::open(&p, 12_500, 1, 0, 0);
        assert_eq!(w.start, 10_000);
        assert_eq!(p.deadline(&w), 14_500); // debounce
        w.absorb(14_000, 1, 0, 0);
        assert_eq!(p.deadline(&w), 16_000); // debounce again
        w.absorb(15_900, 1, 0, 0);
        assert_eq!(p.deadline(&w), 17_500); // max_wait caps the debounce
        w.absorb(19_000, 1, 0, 0);
        assert_eq!(p.deadline(&w), 17_500);
        let t = cfg("tumbling = \"10s\"").validate("s").unwrap();
        assert_eq!(t.deadline(&WindowState::open(&t, 19_999, 1, 0, 0)), 20_000);
    }
}
