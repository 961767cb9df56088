//! The `streams_config` target: text → the streams TOML parser and validator.
//!
//! Any UTF-8 is parsed ([`StreamsFile::parse`]) and validated ([`StreamsFile::validate`]) without
//! panicking; an error names what is wrong. A config that validates must be one the cluster can
//! run — what config validation accepts, entry validation must accept too (the November crash
//! was the other way round: an entry no config could produce):
//! - every stream's rules pass [`StreamRules::check`](coalesce_core::stream::StreamRules::check),
//!   also with any adaptive stretch the leader may put in an entry;
//! - events for every stream go through [`BatchBuilder`] (refusals are errors, not panics), and
//!   the per-shard batches, put in Ingest entries exactly as a leader proposes them, pass
//!   [`Command::validate`] after a postcard round trip and apply to a shard with every check of
//!   the `apply` target, down to a drained buffer.

use std::collections::BTreeMap;

use coalesce_core::batch::{BatchBuilder, Event};
use coalesce_core::stream::StreamsFile;
use coalesce_core::value::Value;

use crate::entry::{Command, IngestGroup};
use crate::roundtrip::must_roundtrip;
use crate::shard::Shard;

/// The sink kinds the server knows (`coalesce_sinks`).
pub const SINK_KINDS: &[&str] = &["file", "postgres", "http", "grpc"];

/// Streams of one config that get events (a config may declare thousands).
const MAX_STREAMS: usize = 16;

/// The leader's clock in the generated entries.
const NOW: u64 = 1_700_000_000_000;

fn values() -> Vec<Value> {
    vec![
        Value::None,
        Value::Int(1),
        Value::Int(-3),
        Value::Int(i64::MAX),
        Value::Float(2.5),
        Value::Float(-0.0),
        Value::Float(1e300),
        Value::Str("a".into()),
        Value::Str("{\"x\":1}".into()),
        Value::Bytes(vec![0, 255]),
        Value::Json(serde_json::json!({"a": {"b": null}, "c": [1, 2.5]})),
        Value::Json(serde_json::json!([1, "x"])),
    ]
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let file = match StreamsFile::parse(text) {
        Ok(f) => f,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "a parse error says something");
            return;
        }
    };
    let table = match file.validate(SINK_KINDS) {
        Ok(t) => t,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "a validation error names the field");
            return;
        }
    };
    for def in table.iter() {
        def.rules
            .check()
            .unwrap_or_else(|e| panic!("stream {:?} validated, but its rules fail the entry check: {e:?}", def.name));
        for extra in [1, 1_000, u64::MAX] {
            let mut stretched = def.rules.clone();
            stretched.window = stretched.window.with_extra_ms(extra);
            stretched.check().unwrap_or_else(|e| panic!("stream {:?} stretched by {extra}: {e:?}", def.name));
        }
    }

    let mut builder = BatchBuilder::new(&table, 4, NOW);
    for (i, def) in table.iter().take(MAX_STREAMS).enumerate() {
        for (j, value) in values().into_iter().enumerate() {
            let event = Event {
                stream: def.name.clone(),
                key: format!("k{}", j % 3),
                value,
                event_time: Some(NOW - j as u64),
                producer: Some((i as u64 + 1, j as u64 + 1)),
            };
            if let Err(e) = builder.add(&event) {
                assert!(!e.code().is_empty() && !e.to_string().is_empty(), "a refused event says why");
            }
        }
    }
    let rules: BTreeMap<_, _> = table.iter().map(|d| (d.name.clone(), d.rules.clone())).collect();
    let mut shard = Shard::default();
    for (stamp, batch) in builder.finish().into_values().enumerate() {
        let cmd = Command::Ingest {
            stamp: NOW + stamp as u64,
            rules: rules.clone(),
            limits: table.limits(),
            groups: batch.groups.into_iter().map(|g| IngestGroup { range: g.range, partials: g.partials }).collect(),
        };
        let cmd = must_roundtrip(&cmd, "log entry");
        cmd.validate().unwrap_or_else(|e| panic!("an entry built from a validated config is refused: {e:?}"));
        shard.apply(&cmd);
    }
    shard.apply(&Command::Seal { stamp: NOW + 1_000, max: 1_000, session_ttl_ms: 60_000 });
    shard.drain();
}
