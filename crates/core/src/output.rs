//! What a closed window emits.

use serde::{Deserialize, Serialize};

use crate::hash::ShardId;
use crate::merge::Aggregate;
use crate::samples::Samples;
use crate::time::Millis;
use crate::window::SealReason;

/// The fencing epoch of a shard leader: its full Raft leader id, compared as (term, node).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch {
    pub term: u64,
    pub node: u64,
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.term, self.node)
    }
}

/// One output: the merged value of one key in one window.
///
/// `shard`, `seq` and `epoch` are zero until the shard's state machine assigns them when it
/// moves the output into its outbox: `seq` is gap-free and increasing per shard, `epoch` is the
/// leader that sealed it. Sinks dedupe and fence on (shard, seq, epoch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub stream: String,
    pub key: String,
    pub shard: ShardId,
    pub seq: u64,
    pub epoch: Epoch,
    /// Window start (aligned for tumbling windows, else the first input's stamp).
    pub window_start: Millis,
    /// When the window closed: its time deadline, or the stamp of the input that closed it.
    pub window_end: Millis,
    /// Leader stamps of the first and last input.
    pub first_input_at: Millis,
    pub last_input_at: Millis,
    /// Event times (producer clocks) of the earliest and latest input.
    pub first_event_at: Millis,
    pub last_event_at: Millis,
    /// Number of inputs absorbed.
    pub inputs: u64,
    pub reason: SealReason,
    pub value: Aggregate,
    /// Samples of the folded inputs for streams with a sample policy ([`crate::samples`]);
    /// `None` for streams without one.
    #[serde(default)]
    pub samples: Option<Samples>,
}

impl Output {
    /// The output as a JSON object, as the file, HTTP and gRPC-JSON sinks present it.
    /// `samples` appears only for streams with a sample policy.
    pub fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::json!({
            "stream": self.stream,
            "key": self.key,
            "shard": self.shard,
            "seq": self.seq,
            "epoch": { "term": self.epoch.term, "node": self.epoch.node },
            "window_start": self.window_start,
            "window_end": self.window_end,
            "first_input_at": self.first_input_at,
            "last_input_at": self.last_input_at,
            "first_event_at": self.first_event_at,
            "last_event_at": self.last_event_at,
            "inputs": self.inputs,
            "reason": self.reason.as_str(),
            "op": self.value.op_name(),
            "value": self.value.to_json(),
        });
        if let (Some(samples), Some(map)) = (&self.samples, o.as_object_mut()) {
            map.insert("samples".into(), samples.to_json());
        }
        o
    }
}

/// An output a sink refused permanently, kept (replicated) in the shard's dead-letter queue
/// until an operator replays or purges it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The sink that refused it.
    pub sink: String,
    pub output: Output,
    /// Why the sink refused it (e.g. `HTTP 422: ...`).
    pub reason: String,
    /// Leader time of the refusal.
    pub failed_at: Millis,
    /// Delivery attempts made.
    pub attempts: u32,
}
