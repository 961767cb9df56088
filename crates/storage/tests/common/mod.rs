//! Helpers shared by the storage tests.

#![allow(dead_code)]

use coalesce_core::merge::Aggregate;
use coalesce_core::output::Output;

/// An output of stream `s` for `key` at `seq` on `shard`, holding `value`.
pub(crate) fn output(shard: u32, key: &str, seq: u64, value: Aggregate) -> Output {
    Output {
        stream: "s".into(),
        key: key.into(),
        shard,
        seq,
        epoch: Default::default(),
        window_start: 0,
        window_end: 1,
        first_input_at: 0,
        last_input_at: 0,
        first_event_at: 0,
        last_event_at: 0,
        inputs: 1,
        reason: coalesce_core::window::SealReason::Time,
        value,
        samples: None,
    }
}
