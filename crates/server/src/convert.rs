//! Proto ↔ domain conversions, in one place.

use coalesce_core::batch::Event;
use coalesce_core::output::Output;
use coalesce_core::value::Value;
use coalesce_proto::v1 as pb;

/// A proto event as a core event. `producer` is the request's producer id (0 = none).
pub fn event(e: &pb::Event, producer: u64) -> Result<Event, (&'static str, String)> {
    let value = match e.value.as_ref().and_then(|v| v.kind.as_ref()) {
        None => Value::None,
        Some(pb::value::Kind::Int(i)) => Value::Int(*i),
        Some(pb::value::Kind::Float(f)) => Value::Float(*f),
        Some(pb::value::Kind::Str(s)) => Value::Str(s.clone()),
        Some(pb::value::Kind::Bytes(b)) => Value::Bytes(b.clone()),
        Some(pb::value::Kind::Json(j)) => {
            Value::Json(serde_json::from_str(j).map_err(|err| ("value", format!("value.json is not JSON: {err}")))?)
        }
    };
    if producer != 0 && e.producer_seq == 0 {
        return Err(("producer_seq", "producer_seq must be at least 1 when producer_id is set".into()));
    }
    Ok(Event {
        stream: e.stream.clone(),
        key: e.key.clone(),
        value,
        event_time: e.event_time_ms,
        producer: (producer != 0).then_some((producer, e.producer_seq)),
    })
}

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
