//! Proto ↔ domain conversions of the server's answers (a request's events are converted by
//! `coalesce_wire::api`).

use coalesce_core::output::Output;
use coalesce_proto::v1 as pb;
use coalesce_storage::StorageError;
use tonic::Status;

/// A core output as a proto output.
pub fn output(o: &Output) -> pb::Output {
    pb::Output {
        stream: o.stream.clone(),
        key: o.key.clone(),
        shard: o.shard,
        seq: o.seq,
        epoch: Some(pb::Epoch { term: o.epoch.term, node: o.epoch.node }),
        window_start: o.window_start,
        window_end: o.window_end,
        first_input_at: o.first_input_at,
        last_input_at: o.last_input_at,
        inputs: o.inputs,
        reason: o.reason.as_str().to_owned(),
        op: o.value.op_name().to_owned(),
        value_json: o.value.to_json().to_string(),
        samples: o
            .samples
            .iter()
            .flat_map(|s| s.iter())
            .map(|s| pb::Sample {
                event_time: s.event_time,
                value_json: s.value.to_json().to_string(),
                truncated: s.truncated,
            })
            .collect(),
    }
}

/// A dead letter as a proto message.
pub fn dead_letter(l: &coalesce_core::output::DeadLetter) -> pb::DeadLetter {
    pb::DeadLetter {
        sink: l.sink.clone(),
        output: Some(output(&l.output)),
        reason: l.reason.clone(),
        failed_at: l.failed_at,
        attempts: l.attempts,
    }
}

/// A storage error as a gRPC status: UNAVAILABLE (retry) while the replica installs a snapshot,
/// INTERNAL otherwise.
pub fn storage_status(e: StorageError) -> Status {
    match e {
        StorageError::Installing { .. } => Status::unavailable(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}
