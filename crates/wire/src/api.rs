//! A client's `Ingest` request, from its protobuf to what the node proposes: the request's
//! bounds, each event converted ([`event`]), admitted by the node's own checks (per-key rate
//! limits) and validated and pre-merged by the core's [`BatchBuilder`], with one status per
//! event for those refused on the way ([`check_ingest`]). The server runs this on every
//! request; the fuzz targets run it on arbitrary bytes.

use std::collections::BTreeMap;

use coalesce_core::batch::{BatchBuilder, Event, EventBatch};
use coalesce_core::error::Category;
use coalesce_core::hash::ShardId;
use coalesce_core::stream::StreamTable;
use coalesce_core::time::Millis;
use coalesce_core::value::Value;
use coalesce_proto::v1 as pb;
use coalesce_proto::v1::EventCode;
use prost::Message;

/// A proto event as a core event. `producer` is the request's producer id (0 = none). A refusal
/// names the field and says why.
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

/// A per-event status.
pub fn status(code: EventCode, reason: &str, message: String) -> pb::EventStatus {
    pb::EventStatus { code: code as i32, reason: reason.to_owned(), message, ..Default::default() }
}

/// The bounds of one request (`[api]` in the node's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_events: usize,
    pub max_bytes: usize,
}

/// A request refused whole (INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("events: {events} events, the limit is {max} per request")]
    TooManyEvents { events: usize, max: usize },
    #[error("request is {bytes} bytes, the limit is {max}")]
    TooLarge { bytes: usize, max: usize },
}

/// A request's events, checked: per shard, the pre-merged batch to propose (each group lists
/// the indexes of its events); per event, its status so far — the default (OK, shard 0) for an
/// event in a batch, whose shard and final status the proposal's outcome sets, and the refusal
/// for every other.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedIngest {
    pub statuses: Vec<pb::EventStatus>,
    pub batches: BTreeMap<ShardId, EventBatch>,
}

/// Checks and pre-merges `req` for a cluster of `shards` shards running `streams`, at the
/// leader-independent time `now` (event-time checks). Event `i` is named `events[offset + i]`
/// in messages (a stream of requests numbers its events across them). `admit` is asked about
/// every event that converted (the node's per-key rate limits); a status it returns is the
/// event's, and the event goes no further.
pub fn check_ingest(
    req: &pb::IngestRequest,
    offset: usize,
    limits: RequestLimits,
    streams: &StreamTable,
    shards: u32,
    now: Millis,
    mut admit: impl FnMut(&Event, usize) -> Result<(), pb::EventStatus>,
) -> Result<CheckedIngest, RequestError> {
    if req.events.len() > limits.max_events {
        return Err(RequestError::TooManyEvents { events: req.events.len(), max: limits.max_events });
    }
    let bytes = req.encoded_len();
    if bytes > limits.max_bytes {
        return Err(RequestError::TooLarge { bytes, max: limits.max_bytes });
    }
    let mut statuses: Vec<pb::EventStatus> = vec![pb::EventStatus::default(); req.events.len()];
    let mut builder = BatchBuilder::new(streams, shards, now);
    for (i, e) in req.events.iter().enumerate() {
        let converted = event(e, req.producer_id).map_err(|(field, msg)| {
            status(EventCode::InvalidArgument, "invalid_value", format!("events[{}].{field}: {msg}", offset + i))
        });
        let admitted = converted.and_then(|ev| admit(&ev, offset + i).map(|()| ev));
        let added = match admitted {
            // Refused before the builder saw it: keep the indices of later events aligned.
            Err(s) => {
                builder.skip();
                Err(s)
            }
            Ok(ev) => builder.add(&ev).map_err(|err| {
                let code = match err.category() {
                    Category::InvalidArgument => EventCode::InvalidArgument,
                    Category::NotFound => EventCode::NotFound,
                    Category::ResourceExhausted => EventCode::ResourceExhausted,
                    Category::FailedPrecondition => EventCode::FailedPrecondition,
                };
                status(code, err.code(), format!("events[{}].{}: {err}", offset + i, err.field()))
            }),
        };
        match added {
            Ok(shard) => statuses[i].shard = shard,
            Err(s) => statuses[i] = s,
        }
    }
    Ok(CheckedIngest { statuses, batches: builder.finish() })
}
