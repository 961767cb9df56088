//! The `request` target: bytes a client sends as an `Ingest` request → what the node proposes.
//!
//! The bytes are decoded as the gRPC codec decodes them (prost), then go through the server's
//! own request path (`coalesce_wire::api::check_ingest`: the request's bounds, each event
//! converted, admitted — here every 7th is refused as a per-key rate limit would — validated
//! and pre-merged by the core's `BatchBuilder`) against the seed config on a 2-shard cluster.
//! The first byte says where the request's events start in a stream of requests (messages
//! name events by their place in the stream); the rest is the request.
//! Nothing panics, and every event is accounted for exactly once:
//! - a request refused whole is over one of its bounds;
//! - there is one status per event; an event in a batch is in exactly one group of exactly one
//!   shard's batch, its key hashes to that shard, and its status is OK for that shard; every
//!   other event's status is a refusal that names it (`events[offset + i]…`) and has a reason,
//!   the admission's own status for an event it refused;
//! - the inputs of a group's partials add up to its events (pre-merging loses none and makes
//!   none up), and every partial's key is of the batch's shard.
//!
//! Then each shard's batch becomes the Ingest entry its leader proposes (stamped, with the
//! streams' rules), which must pass entry validation — what the server accepted, a replica
//! must accept too — and apply with every check of the `apply` target.

use coalesce_core::hash::shard_for;
use coalesce_proto::v1 as pb;
use coalesce_proto::v1::EventCode;
use coalesce_wire::api::{RequestLimits, check_ingest, status};
use coalesce_wire::types::IngestGroup;
use prost::Message;

use crate::seeds::NOW;
use crate::shard::Shard;

/// Shards of the cluster.
pub const SHARDS: u32 = 2;

/// The server's default bounds (`[api] max_events_per_request`, `max_request_bytes`).
pub const LIMITS: RequestLimits = RequestLimits { max_events: 1_000, max_bytes: 4 << 20 };

/// Runs one input.
pub fn run(data: &[u8]) {
    // The first byte: where this request's events start in a stream of requests.
    let Some((&offset, data)) = data.split_first() else { return };
    let offset = usize::from(offset) * 100;
    let Ok(req) = pb::IngestRequest::decode(data) else { return };
    let table = crate::seeds::table();
    let mut limited_events = Vec::new();
    let limited = |_: &coalesce_core::batch::Event, i: usize| {
        if i % 7 == 6 {
            limited_events.push(i - offset);
            let message = format!("events[{i}].key: over the per-key rate limit");
            return Err(status(EventCode::ResourceExhausted, "key_rate_limited", message));
        }
        Ok(())
    };
    let checked = match check_ingest(&req, offset, LIMITS, &table, SHARDS, NOW, limited) {
        Ok(c) => c,
        Err(e) => {
            assert!(
                req.events.len() > LIMITS.max_events || req.encoded_len() > LIMITS.max_bytes,
                "a request within its bounds refused whole: {e}"
            );
            return;
        }
    };
    let n = req.events.len();
    assert_eq!(checked.statuses.len(), n, "one status per event");
    let mut placed = vec![false; n];
    for (&shard, batch) in &checked.batches {
        for group in &batch.groups {
            for &i in &group.events {
                let i = i as usize;
                assert!(i < n && !placed[i], "event {i} is in two groups, or is no event of the request");
                placed[i] = true;
                let s = &checked.statuses[i];
                assert_eq!((s.code, s.shard), (EventCode::Ok as i32, shard), "event {i}: placed, so OK on its shard");
                let e = &req.events[i];
                assert_eq!(shard_for(&e.stream, &e.key, SHARDS), shard, "event {i} in another shard's batch");
            }
            let inputs: u64 = group.partials.iter().map(|(_, p)| p.inputs).sum();
            assert_eq!(inputs, group.events.len() as u64, "a group's partials hold its events, no more, no less");
            for (key, _) in &group.partials {
                assert_eq!(shard_for(&key.stream, &key.key, SHARDS), shard, "a partial in another shard's batch");
            }
        }
    }
    for (i, s) in checked.statuses.iter().enumerate().filter(|(i, _)| !placed[*i]) {
        assert_ne!(s.code, EventCode::Ok as i32, "event {i}: in no batch, yet OK");
        let named = format!("events[{}]", offset + i);
        assert!(!s.reason.is_empty() && s.message.starts_with(&named), "event {i} at {offset}: {s:?}");
    }
    for &i in &limited_events {
        assert_eq!(checked.statuses[i].reason, "key_rate_limited", "event {i}: the admission's refusal is its status");
    }
    for batch in checked.batches.into_values() {
        let groups = batch.groups.into_iter().map(IngestGroup::from).collect();
        let cmd = crate::peer::ingest_command(&table, groups)
            .unwrap_or_else(|| panic!("a batch of the server's names a stream its leader does not know"));
        if let Err(e) = cmd.validate() {
            panic!("the server accepted events whose entry no replica accepts: {e:?}");
        }
        let mut shard = Shard::default();
        shard.apply(&cmd);
        shard.drain();
    }
}
