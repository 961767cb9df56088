//! `coalescectl send`: events as JSON lines on stdin, sent through an idempotent producer.
//!
//! One object per line: `{"stream": "page-views", "key": "home", "value": 1}`. `value` is an
//! integer, a float, a string, an object or array (sent as JSON text, for `json_merge_patch`
//! streams), or absent/null (for `count` streams). `event_time_ms` is optional. `--stream`
//! supplies the stream for lines without one.

use std::io::BufRead;

use anyhow::{Context, bail};
use coalesce_cli::outln;
use coalesce_client::{Client, Event, Value};
use coalesce_proto::v1 as pb;
use serde_json::Value as Json;

#[derive(Debug, clap::Args)]
pub(crate) struct SendArgs {
    /// Stream for lines that name none.
    #[arg(long)]
    stream: Option<String>,
    /// Events per request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
}

/// Parses one input line into an event.
pub(crate) fn parse_line(line: &str, default_stream: Option<&str>) -> Result<Event, String> {
    let obj: serde_json::Map<String, Json> = match serde_json::from_str(line) {
        Ok(Json::Object(m)) => m,
        Ok(_) => return Err("expected a JSON object".into()),
        Err(e) => return Err(format!("not JSON: {e}")),
    };
    for k in obj.keys() {
        if !["stream", "key", "value", "event_time_ms"].contains(&k.as_str()) {
            return Err(format!("unknown field {k:?} (expected stream, key, value, event_time_ms)"));
        }
    }
    let stream = match obj.get("stream") {
        Some(Json::String(s)) => s.clone(),
        Some(_) => return Err("stream: must be a string".into()),
        None => default_stream.ok_or("stream: missing (or pass --stream)")?.to_owned(),
    };
    let key = match obj.get("key") {
        Some(Json::String(s)) => s.clone(),
        Some(_) => return Err("key: must be a string".into()),
        None => return Err("key: missing".into()),
    };
    let kind = match obj.get("value") {
        None | Some(Json::Null) => None,
        Some(Json::Bool(_)) => return Err("value: booleans are not a value type".into()),
        Some(Json::Number(n)) => Some(match n.as_i64() {
            Some(i) => pb::value::Kind::Int(i),
            None => pb::value::Kind::Float(n.as_f64().ok_or("value: number out of range")?),
        }),
        Some(Json::String(s)) => Some(pb::value::Kind::Str(s.clone())),
        Some(v @ (Json::Object(_) | Json::Array(_))) => Some(pb::value::Kind::Json(v.to_string())),
    };
    let event_time_ms = match obj.get("event_time_ms") {
        None | Some(Json::Null) => None,
        Some(v) => Some(v.as_u64().ok_or("event_time_ms: must be a non-negative integer")?),
    };
    Ok(Event { stream, key, value: kind.map(|k| Value { kind: Some(k) }), event_time_ms, producer_seq: 0 })
}

pub(crate) async fn run(addr: &str, args: SendArgs) -> anyhow::Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let client =
        Client::connect_with([addr], crate::options()).await.with_context(|| format!("connecting to {addr}"))?;
    let mut producer = client.producer();
    let (mut sent, mut failed) = (0usize, 0usize);
    let mut pending: Vec<(usize, Event)> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines().enumerate();
    loop {
        let next = lines.next();
        let done = next.is_none();
        if let Some((i, line)) = next {
            let line = line.context("reading stdin")?;
            if !line.trim().is_empty() {
                match parse_line(&line, args.stream.as_deref()) {
                    Ok(e) => pending.push((i + 1, e)),
                    Err(msg) => {
                        eprintln!("line {}: {msg}", i + 1);
                        failed += 1;
                    }
                }
            }
        }
        if pending.len() >= args.batch || (done && !pending.is_empty()) {
            let (numbers, events): (Vec<usize>, Vec<Event>) = std::mem::take(&mut pending).into_iter().unzip();
            let report = producer.send(events).await?;
            sent += report.acked();
            for (i, s) in report.failures() {
                eprintln!("line {}: {} ({})", numbers[i], s.message, s.reason);
                failed += 1;
            }
        }
        if done {
            break;
        }
    }
    outln!("{sent} events acknowledged, {failed} refused");
    if failed > 0 {
        bail!("{failed} events were not acknowledged");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_events_or_clear_errors() {
        let e = parse_line(r#"{"stream":"s","key":"k","value":3}"#, None).unwrap();
        assert_eq!(e.value.unwrap().kind, Some(pb::value::Kind::Int(3)));
        let e = parse_line(r#"{"key":"k","value":2.5}"#, Some("d")).unwrap();
        assert_eq!((e.stream.as_str(), e.value.unwrap().kind), ("d", Some(pb::value::Kind::Float(2.5))));
        let e = parse_line(r#"{"key":"k","value":{"a":1}}"#, Some("d")).unwrap();
        assert_eq!(e.value.unwrap().kind, Some(pb::value::Kind::Json(r#"{"a":1}"#.into())));
        assert!(parse_line(r#"{"key":"k"}"#, Some("d")).unwrap().value.is_none());
        assert_eq!(parse_line(r#"{"key":"k"}"#, None).unwrap_err(), "stream: missing (or pass --stream)");
        assert_eq!(parse_line(r#"{"stream":"s"}"#, None).unwrap_err(), "key: missing");
        assert!(parse_line(r#"{"stream":"s","key":"k","valu":1}"#, None).unwrap_err().contains("unknown field"));
        assert!(parse_line("[1]", None).unwrap_err().contains("object"));
        assert!(parse_line("{", None).unwrap_err().starts_with("not JSON"));
        assert!(parse_line(r#"{"stream":"s","key":"k","value":true}"#, None).is_err());
    }
}
