//! Load-adaptive windows: stretch time windows while the downstream is under pressure.
//!
//! A window's time bound (`tumbling` or `max_wait`) fixes how many outputs a stream emits per
//! second: about one per distinct key per window. When the sink is slow, throttled or failing,
//! those outputs pile up in the outbox. A stream that opts in lets the shard leader *seal late*:
//! while pressure lasts, each key's open window keeps absorbing inputs for `extra_ms` longer, so
//! each output covers more inputs and fewer outputs are produced — up to `max_staleness`.
//!
//! ```toml
//! [streams.alerts]
//! merge = "count"
//! window = { tumbling = "1s", adaptive = { max_staleness = "10s", backlog_high = 10000 } }
//! ```
//! | field           | default                      | meaning                                         |
//! |-----------------|------------------------------|-------------------------------------------------|
//! | `max_staleness` | required, ≥ base bound, ≤ 7d | the new staleness bound: base bound + extra     |
//! | `backlog_high`  | 10000                        | undelivered outputs at which pressure is high   |
//! | `backlog_low`   | `backlog_high / 4`           | below it (and no other signal) pressure is gone |
//! | `lag_high`      | `5s`                         | oldest undelivered output age that is high      |
//! | `buffer_high`   | 0.8                          | buffer fill (0..1) above which extra stops growing |
//! | `adjust_every`  | base bound, in `100ms..=10s` | one control step per interval                   |
//! | `cooldown`      | 3                            | calm intervals before extra starts shrinking    |
//!
//! ## The controller
//! [`AdaptiveController::update`] is a pure function of the policy, its own state and its
//! arguments (`now`, [`Pressure`]): no clock, no randomness, so a test (or a replay) feeding the
//! same sequence gets the same [`Decision`]s. Each call classifies the pressure as *high*
//! (sink failing or throttled, backlog ≥ `backlog_high`, or oldest undelivered age ≥ `lag_high`),
//! *calm* (backlog ≤ `backlog_low`, age < `lag_high / 2`, sink healthy) or *in between*. The
//! worst class seen during an `adjust_every` interval decides one step when the interval ends
//! (intervals are aligned to `now / adjust_every`, so the step times do not depend on how often
//! `update` is called):
//! - high: multiplicative increase, `extra = max(first_step, 2 × extra)`, `first_step` = a
//!   quarter of the base bound — unless the shard buffer is fuller than `buffer_high` (longer
//!   windows hold more distinct keys at once, so a full buffer brakes the stretch);
//! - in between: hold (the band between `backlog_low` and `backlog_high` is the hysteresis that
//!   keeps the controller from flapping);
//! - calm: after `cooldown` calm intervals in a row, shrink `extra` by a quarter each interval,
//!   dropping to 0 once it is below `first_step`.
//!
//! Fast up, gentle down: pressure that builds must be relieved quickly, while a calm outbox may
//! only mean the stretch is working — without a throttle signal the controller finds out by
//! probing downwards. Halving made the toy shard in `tests/adaptive.rs` flap with a ~20 s period
//! while its sink stayed slow; quarter steps settle it into a longer, shallower sawtooth.
//!
//! `extra_ms` never exceeds `max_staleness - base bound`. The response is monotone: a pressure
//! sequence that is everywhere at least as high yields an `extra_ms` at least as large.
//!
//! ## Integration (shard leader and state machine)
//! - The shard *leader* owns one controller per adaptive stream and calls `update` on its
//!   scheduler tick with the shard's [`Pressure`]: outbox backlog (outputs not acked by the
//!   slowest cursor), age of the oldest undelivered output, whether a sink reported throttling
//!   (429/`RESOURCE_EXHAUSTED`/rate limiter) or failures, and buffer fill
//!   (`max(keys / max_keys, bytes / max_bytes)`).
//! - The stretch travels in the rules of each Ingest entry: the leader proposes
//!   `rules.window = def.rules.window.with_extra_ms(extra_ms)`
//!   ([`crate::window::WindowPolicy::with_extra_ms`]). Apply computes a window's deadline as the
//!   policy's deadline plus the `extra_ms` of the entry that opened it or last merged into it, so
//!   the deadline index (and with it the Seal scheduler, `seal_due` and `next_deadline`) defers
//!   the seal by itself: no change to the Seal command, and replicas only read the entry, so
//!   apply stays deterministic. A key's open window keeps absorbing inputs while its seal is
//!   deferred, so each output covers more inputs.
//! - A window that received no input since the stretch changed keeps its deadline: it may close
//!   a little early when the stretch grows, or late (never past `max_staleness`) when it shrinks;
//!   a merge recomputes the deadline (never before the merging input's stamp).
//! - The window closes by `policy deadline + extra ≤ first input + max_staleness`:
//!   `max_staleness` is the stream's staleness bound
//!   ([`crate::window::WindowPolicy::max_staleness_ms`]). Data triggers (`max_count`,
//!   `max_bytes`) and overflow still seal at once. A tumbling window's end moves by the stretch
//!   while the next window's start stays aligned, so consecutive windows of a key may overlap in
//!   their reported bounds (never in their inputs).
//! - A new leader can resume from the `extra_ms` in the last Ingest entry it applied
//!   ([`AdaptiveController::resume`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::time::Millis;
use crate::window::MAX_WINDOW_MS;

/// `window.adaptive` as written in config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConfig {
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    #[serde(default = "default_backlog_high")]
    pub backlog_high: u64,
    #[serde(default)]
    pub backlog_low: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub lag_high: Option<Duration>,
    #[serde(default)]
    pub buffer_high: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub adjust_every: Option<Duration>,
    #[serde(default)]
    pub cooldown: Option<u32>,
}

fn default_backlog_high() -> u64 {
    10_000
}

/// Default `lag_high`.
pub const DEFAULT_LAG_HIGH_MS: u64 = 5_000;
/// Default `buffer_high`, in permille.
pub const DEFAULT_BUFFER_HIGH_PERMILLE: u16 = 800;
/// Default `cooldown`, in intervals.
pub const DEFAULT_COOLDOWN: u32 = 3;

/// A validated adaptive policy; part of [`crate::window::WindowPolicy`], so Raft entries carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdaptivePolicy {
    /// The staleness bound with the stretch: base bound + extra ≤ this.
    pub max_staleness_ms: u64,
    /// The window's own time bound (`min(tumbling, max_wait)`), copied at validation.
    pub base_bound_ms: u64,
    pub backlog_high: u64,
    pub backlog_low: u64,
    pub lag_high_ms: u64,
    /// Buffer fill (0..=1000) above which extra stops growing.
    pub buffer_high_permille: u16,
    pub adjust_every_ms: u64,
    pub cooldown: u32,
    /// The stretch in force: 0 in the stream table; the shard leader sets the controller's
    /// `extra_ms` on the rules it puts in each Ingest entry ([`AdaptivePolicy::with_extra`]),
    /// and [`crate::window::WindowPolicy::deadline`] adds it (capped at
    /// [`AdaptivePolicy::max_extra_ms`]), so every replica computes the same deferred deadline.
    #[serde(default)]
    pub extra_ms: u64,
}

impl AdaptivePolicy {
    /// This policy with `extra_ms` in force (capped at [`AdaptivePolicy::max_extra_ms`]).
    pub fn with_extra(self, extra_ms: u64) -> Self {
        Self { extra_ms: extra_ms.min(self.max_extra_ms()), ..self }
    }

    /// The largest `extra_ms` the controller may return.
    pub fn max_extra_ms(&self) -> u64 {
        self.max_staleness_ms.saturating_sub(self.base_bound_ms)
    }

    /// The first increase from 0 (a quarter of the base bound, at least 1 ms), and the level
    /// below which a decrease drops to 0.
    pub fn first_step_ms(&self) -> u64 {
        (self.base_bound_ms / 4).max(1)
    }
}

impl AdaptivePolicy {
    /// Checks the policy's own bounds, for config validation and for the rules a Raft entry
    /// carries alike; the error names the field (`window.adaptive.backlog_low`).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.max_staleness_ms < self.base_bound_ms {
            return Err((
                "window.adaptive.max_staleness",
                format!("must be >= the window's time bound ({})", crate::window::fmt_ms(self.base_bound_ms)),
            ));
        }
        let in_window = |ms: u64| (1..=MAX_WINDOW_MS).contains(&ms);
        if self.max_staleness_ms > MAX_WINDOW_MS {
            return Err(("window.adaptive.max_staleness", "must be at most 7d".into()));
        }
        if self.backlog_high == 0 {
            return Err(("window.adaptive.backlog_high", "must be at least 1".into()));
        }
        if self.backlog_low >= self.backlog_high {
            return Err(("window.adaptive.backlog_low", "must be < window.adaptive.backlog_high".into()));
        }
        if !in_window(self.lag_high_ms) {
            return Err(("window.adaptive.lag_high", "must be in 1ms..=7d".into()));
        }
        if !(1..=1000).contains(&self.buffer_high_permille) {
            return Err(("window.adaptive.buffer_high", "must be in (0, 1]".into()));
        }
        if !in_window(self.adjust_every_ms) {
            return Err(("window.adaptive.adjust_every", "must be in 1ms..=7d".into()));
        }
        if self.cooldown == 0 || self.cooldown > 1000 {
            return Err(("window.adaptive.cooldown", "must be in 1..=1000".into()));
        }
        Ok(())
    }
}

impl AdaptiveConfig {
    /// Validates `window.adaptive` of stream `stream` whose window's time bound is
    /// `base_bound_ms`; errors name the field.
    pub fn validate(&self, stream: &str, base_bound_ms: u64) -> Result<AdaptivePolicy, ConfigError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let buffer_high_permille = match self.buffer_high {
            None => DEFAULT_BUFFER_HIGH_PERMILLE,
            Some(f) if f > 0.0 && f <= 1.0 => (f * 1000.0).round().max(1.0) as u16,
            Some(f) => {
                return Err(ConfigError::stream(
                    stream,
                    "window.adaptive.buffer_high",
                    format!("must be in (0, 1], got {f}"),
                ));
            }
        };
        let policy = AdaptivePolicy {
            max_staleness_ms: ms(self.max_staleness),
            base_bound_ms,
            backlog_high: self.backlog_high,
            backlog_low: self.backlog_low.unwrap_or(self.backlog_high / 4),
            lag_high_ms: self.lag_high.map_or(DEFAULT_LAG_HIGH_MS, ms),
            buffer_high_permille,
            adjust_every_ms: self.adjust_every.map_or(base_bound_ms.clamp(100, 10_000), ms),
            cooldown: self.cooldown.unwrap_or(DEFAULT_COOLDOWN),
            extra_ms: 0,
        };
        policy.check().map_err(|(field, message)| ConfigError::stream(stream, field, message))?;
        Ok(policy)
    }
}

/// The downstream pressure the leader observes for a stream's shard.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pressure {
    /// Outputs sealed but not yet acknowledged by the slowest consumer.
    pub outbox_backlog: u64,
    /// Age of the oldest undelivered output (leader clock), 0 when none.
    pub oldest_undelivered_age_ms: u64,
    /// A sink reported throttling (HTTP 429, RESOURCE_EXHAUSTED, its own rate limiter).
    pub sink_throttled: bool,
    /// A sink is failing (retrying errors).
    pub sink_failing: bool,
    /// Buffer occupancy in 0..=1: `max(keys / max_keys, bytes / max_bytes)`.
    pub buffer_fill: f64,
}

/// What made the pressure high.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    Backlog,
    SinkLag,
    SinkThrottled,
    SinkFailing,
}

impl Cause {
    /// A stable name for metrics labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Cause::Backlog => "backlog",
            Cause::SinkLag => "sink_lag",
            Cause::SinkThrottled => "sink_throttled",
            Cause::SinkFailing => "sink_failing",
        }
    }
}

/// Why the controller returned its `extra_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No pressure and no extra delay.
    Calm,
    /// Pressure is high: extra grew (or sits at its cap).
    Stretching(Cause),
    /// Pressure is high but the buffer is fuller than `buffer_high`: extra does not grow.
    BufferBrake(Cause),
    /// Pressure is between the thresholds, or calm but cooling down: extra is kept.
    Holding,
    /// Calm for `cooldown` intervals: extra shrinks.
    Relaxing,
}

impl Reason {
    /// What made pressure high, when stretching or braking.
    pub fn cause(&self) -> Option<Cause> {
        match self {
            Reason::Stretching(c) | Reason::BufferBrake(c) => Some(*c),
            _ => None,
        }
    }

    /// A stable name for metrics labels and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Calm => "calm",
            Reason::Stretching(_) => "stretching",
            Reason::BufferBrake(_) => "buffer_brake",
            Reason::Holding => "holding",
            Reason::Relaxing => "relaxing",
        }
    }
}

/// The controller's answer: seal windows `extra_ms` after their deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub extra_ms: u64,
    pub reason: Reason,
}

/// How high one pressure sample is; ordered from calm to high.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Calm,
    Elevated,
    High(Cause),
}

/// The adaptive-window controller of one stream on one shard leader. See the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveController {
    policy: AdaptivePolicy,
    extra_ms: u64,
    /// `now / adjust_every` of the last step; `None` before the first update.
    last_interval: Option<u64>,
    /// Worst level and fullest buffer seen since the last step.
    worst: Level,
    max_fill: f64,
    /// Consecutive calm intervals.
    calm_steps: u32,
    reason: Reason,
    /// Control steps taken so far.
    steps: u64,
}

impl AdaptiveController {
    /// A controller with no extra delay.
    pub fn new(policy: AdaptivePolicy) -> Self {
        Self::resume(policy, 0)
    }

    /// A controller that starts at `extra_ms` (capped), e.g. the last value a new leader
    /// applied, so leadership changes do not seal every deferred window at once.
    pub fn resume(policy: AdaptivePolicy, extra_ms: u64) -> Self {
        let extra_ms = extra_ms.min(policy.max_extra_ms());
        Self {
            policy,
            extra_ms,
            last_interval: None,
            worst: Level::Calm,
            max_fill: 0.0,
            calm_steps: 0,
            reason: if extra_ms == 0 { Reason::Calm } else { Reason::Holding },
            steps: 0,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &AdaptivePolicy {
        &self.policy
    }

    /// How many control steps [`AdaptiveController::update`] has taken (one per interval with
    /// a sample): a caller that sees it grow knows the decision's reason is a fresh step.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The current decision without a new sample.
    pub fn decision(&self) -> Decision {
        Decision { extra_ms: self.extra_ms, reason: self.reason }
    }

    fn level(&self, p: &Pressure) -> Level {
        let pol = &self.policy;
        if p.sink_failing {
            Level::High(Cause::SinkFailing)
        } else if p.sink_throttled {
            Level::High(Cause::SinkThrottled)
        } else if p.oldest_undelivered_age_ms >= pol.lag_high_ms {
            Level::High(Cause::SinkLag)
        } else if p.outbox_backlog >= pol.backlog_high {
            Level::High(Cause::Backlog)
        } else if p.outbox_backlog <= pol.backlog_low && p.oldest_undelivered_age_ms.saturating_mul(2) < pol.lag_high_ms
        {
            // Below half of lag_high, exactly: with lag_high = 1 ms, `age < lag_high / 2` (0)
            // made calm unreachable and a stretch could never relax (found by proptest in CI).
            Level::Calm
        } else {
            Level::Elevated
        }
    }

    /// Records a pressure sample at leader time `now` and returns the decision. One control
    /// step is taken per `adjust_every` interval (the first sample steps at once), from the
    /// worst pressure seen since the previous step. Time going backwards only records.
    pub fn update(&mut self, now: Millis, pressure: &Pressure) -> Decision {
        self.worst = self.worst.max(self.level(pressure));
        let fill = if pressure.buffer_fill.is_nan() { 1.0 } else { pressure.buffer_fill };
        self.max_fill = self.max_fill.max(fill);
        let interval = now / self.policy.adjust_every_ms.max(1);
        if self.last_interval.is_some_and(|last| interval <= last) {
            return self.decision();
        }
        self.last_interval = Some(interval);
        self.steps += 1;
        let worst = std::mem::replace(&mut self.worst, Level::Calm);
        let brake = self.max_fill * 1000.0 >= f64::from(self.policy.buffer_high_permille);
        self.max_fill = 0.0;
        let cap = self.policy.max_extra_ms();
        let first = self.policy.first_step_ms();
        match worst {
            Level::High(cause) => {
                self.calm_steps = 0;
                if brake {
                    self.reason = Reason::BufferBrake(cause);
                } else {
                    self.extra_ms = self.extra_ms.saturating_mul(2).max(first).min(cap);
                    self.reason = Reason::Stretching(cause);
                }
            }
            Level::Elevated => {
                self.calm_steps = 0;
                self.reason = if self.extra_ms == 0 { Reason::Calm } else { Reason::Holding };
            }
            Level::Calm => {
                self.calm_steps = self.calm_steps.saturating_add(1);
                if self.extra_ms == 0 {
                    self.reason = Reason::Calm;
                } else if self.calm_steps >= self.policy.cooldown {
                    self.extra_ms -= (self.extra_ms / 4).max(1);
                    if self.extra_ms < first {
                        self.extra_ms = 0;
                    }
                    self.reason = if self.extra_ms == 0 { Reason::Calm } else { Reason::Relaxing };
                } else {
                    self.reason = Reason::Holding;
                }
            }
        }
        self.extra_ms = self.extra_ms.min(cap);
        self.decision()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(text: &str, base: u64) -> Result<AdaptivePolicy, ConfigError> {
        toml::from_str::<AdaptiveConfig>(text).unwrap().validate("s", base)
    }

    #[test]
    fn config_defaults_and_errors() {
        let p = policy("max_staleness = \"10s\"", 1000).unwrap();
        assert_eq!(p.max_extra_ms(), 9000);
        assert_eq!((p.backlog_high, p.backlog_low, p.lag_high_ms), (10_000, 2_500, 5_000));
        assert_eq!((p.buffer_high_permille, p.adjust_every_ms, p.cooldown), (800, 1000, 3));
        let e = policy("max_staleness = \"500ms\"", 1000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "stream \"s\": window.adaptive.max_staleness must be >= the window's time bound (1s)"
        );
        let e = policy("max_staleness = \"8days\"", 1000).unwrap_err();
        assert!(e.to_string().contains("max_staleness must be at most 7d"), "{e}");
        let e = policy("max_staleness = \"10s\"\nbacklog_high = 0", 1000).unwrap_err();
        assert!(e.to_string().contains("window.adaptive.backlog_high must be at least 1"), "{e}");
        let e = policy("max_staleness = \"10s\"\nbacklog_high = 10\nbacklog_low = 10", 1000).unwrap_err();
        assert!(e.to_string().contains("window.adaptive.backlog_low must be <"), "{e}");
        let e = policy("max_staleness = \"10s\"\nbuffer_high = 1.5", 1000).unwrap_err();
        assert!(e.to_string().contains("window.adaptive.buffer_high must be in (0, 1]"), "{e}");
        assert!(policy("max_staleness = \"10s\"\nlag_high = \"0s\"", 1000).is_err());
        assert!(policy("max_staleness = \"10s\"\ncooldown = 0", 1000).is_err());
        assert!(toml::from_str::<AdaptiveConfig>("max_staleness = \"10s\"\nbacklog = 1").is_err());
        assert!(toml::from_str::<AdaptiveConfig>("backlog_high = 1").is_err(), "max_staleness is required");
    }

    fn ctl() -> AdaptiveController {
        AdaptiveController::new(
            policy("max_staleness = \"10s\"\nbacklog_high = 100\nadjust_every = \"1s\"", 1000).unwrap(),
        )
    }

    const HIGH: Pressure = Pressure {
        outbox_backlog: 500,
        oldest_undelivered_age_ms: 0,
        sink_throttled: false,
        sink_failing: false,
        buffer_fill: 0.1,
    };

    #[test]
    fn increases_multiplicatively_to_the_cap_then_relaxes_after_cooldown() {
        let mut c = ctl();
        let extras: Vec<u64> = (0..8).map(|i| c.update(i * 1000, &HIGH).extra_ms).collect();
        assert_eq!(extras, [250, 500, 1000, 2000, 4000, 8000, 9000, 9000]);
        assert_eq!(c.decision().reason, Reason::Stretching(Cause::Backlog));
        let calm = Pressure::default();
        let extras: Vec<u64> = (8..26).map(|i| c.update(i * 1000, &calm).extra_ms).collect();
        assert_eq!(extras, [9000, 9000, 6750, 5063, 3798, 2849, 2137, 1603, 1203, 903, 678, 509, 382, 287, 0, 0, 0, 0]);
        assert_eq!(c.decision().reason, Reason::Calm);
    }

    #[test]
    fn one_step_per_interval_from_the_worst_sample() {
        let mut c = ctl();
        assert_eq!(c.update(0, &Pressure::default()).extra_ms, 0);
        // Many samples inside one interval do not compound; a spike inside it counts at the end.
        for t in (100..1000).step_by(100) {
            let p = if t == 500 { HIGH } else { Pressure::default() };
            assert_eq!(c.update(t, &p).extra_ms, 0);
        }
        assert_eq!(c.steps(), 1);
        assert_eq!(c.update(1000, &Pressure::default()).extra_ms, 250);
        assert_eq!((c.steps(), c.decision().reason.cause()), (2, Some(Cause::Backlog)));
    }

    #[test]
    fn the_band_between_thresholds_holds_and_the_buffer_brakes() {
        let mut c = ctl();
        c.update(0, &HIGH);
        c.update(1000, &HIGH);
        let between = Pressure { outbox_backlog: 50, ..Default::default() };
        for i in 2..10 {
            assert_eq!(c.update(i * 1000, &between), Decision { extra_ms: 500, reason: Reason::Holding });
        }
        let full = Pressure { sink_throttled: true, buffer_fill: 0.9, ..Default::default() };
        assert_eq!(
            c.update(10_000, &full),
            Decision { extra_ms: 500, reason: Reason::BufferBrake(Cause::SinkThrottled) }
        );
    }

    #[test]
    fn resume_is_capped() {
        let p = ctl().policy;
        assert_eq!(AdaptiveController::resume(p, u64::MAX).decision().extra_ms, 9000);
    }
}
