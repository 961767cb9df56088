//! `coalescectl bench savings`: how many downstream writes a workload costs with Coalesce, with
//! one write per event, and with a consumer that merges each batch of N consecutive messages by
//! key before writing (the method PlanetScale reported, N = 200).
//!
//! The events go through a local cluster at a fixed rate (open loop); Coalesce's writes are the
//! outputs its windows emitted (every shard's seq counter), i.e. what any sink would receive.
//! The consumer-batch count is computed from the acknowledged events in acknowledgement order
//! (what a log-based consumer would read): the number of distinct keys in each run of N.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use coalesce_client::Client;
use serde_json::json;

use crate::bench::{LoadArgs, fmt_q, machine, outputs_emitted, premerge_counts, quantiles_ms, run_phase};

#[derive(Debug, clap::Args)]
pub(crate) struct SavingsArgs {
    #[command(flatten)]
    work: LoadArgs,
    /// Events per second offered (open loop).
    #[arg(long, default_value_t = 50_000.0)]
    rate: f64,
    /// Tumbling window of the coalescing stream.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Messages per consumer batch in the comparison.
    #[arg(long, default_value_t = 200)]
    consumer_batch: usize,
}

/// Downstream writes of a consumer merging each run of `n` consecutive messages by key.
fn consumer_batch_writes(keys: &[u32], n: usize) -> u64 {
    let mut seen = std::collections::HashSet::with_capacity(n);
    keys.chunks(n)
        .map(|chunk| {
            seen.clear();
            seen.extend(chunk.iter().copied());
            seen.len() as u64
        })
        .sum()
}

fn reduction_pct(writes: u64, events: u64) -> f64 {
    ((1.0 - writes as f64 / events.max(1) as f64) * 10_000.0).round() / 100.0
}

pub(crate) async fn run(args: SavingsArgs) -> anyhow::Result<()> {
    let w = &args.work;
    w.check()?;
    if !(args.rate.is_finite() && args.rate > 0.0) || args.consumer_batch == 0 {
        bail!("--rate must be positive and --consumer-batch at least 1");
    }
    let window_ms = args.window.as_millis();
    if window_ms == 0 {
        bail!("--window must be at least 1ms");
    }
    let streams = format!(
        "[limits]\nmax_keys = 4000000\nmax_bytes = 2147483648\n\n\
         [streams.{}]\nmerge = \"sum_i64\"\nwindow = {{ tumbling = \"{window_ms}ms\" }}\n",
        w.stream
    );
    w.measure_on(&streams, async |client, endpoints| measure(&args, client, endpoints).await).await
}

async fn measure(args: &SavingsArgs, client: &Client, endpoints: &[String]) -> anyhow::Result<serde_json::Value> {
    let w = &args.work;
    w.local.say(format!(
        "bench savings: {:.0} events/s for {} s over {} keys (zipf {}), {} ms windows, consumer batches of {}",
        args.rate,
        w.seconds,
        w.keys,
        w.zipf,
        args.window.as_millis(),
        args.consumer_batch
    ));
    let before = outputs_emitted(client).await;
    let premerge_before = premerge_counts(client, &w.stream).await;
    let record = Arc::new(Mutex::new(Vec::new()));
    let load = run_phase(w, client, Some(args.rate), Duration::from_secs(w.seconds), Some(record.clone())).await?;
    // Let the last windows close and be sealed.
    tokio::time::sleep(args.window + Duration::from_millis(2_000)).await;
    let outputs = outputs_emitted(client).await - before;
    let premerge_after = premerge_counts(client, &w.stream).await;
    let (received, partials) = (premerge_after.0 - premerge_before.0, premerge_after.1 - premerge_before.1);
    let premerge_pct = reduction_pct(partials, received);
    let keys = std::mem::take(&mut *record.lock().unwrap_or_else(|p| p.into_inner()));
    let events = keys.len() as u64;
    let distinct = keys.iter().collect::<std::collections::HashSet<_>>().len() as u64;
    let batch_writes = consumer_batch_writes(&keys, args.consumer_batch);
    let coalesce_pct = reduction_pct(outputs, events);
    let batch_pct = reduction_pct(batch_writes, events);
    let say = |s: String| w.local.say(s);
    say(format!(
        "acknowledged {events} events ({:.0} events/s, {} failed), {distinct} distinct keys; ack latency {}",
        load.rate(),
        load.failed(),
        fmt_q(&load.latency)
    ));
    say(format!("per-event writes:                {events:>10}"));
    say(format!("consumer merging {:>4} messages:  {batch_writes:>10}  ({batch_pct:.2} % fewer)", args.consumer_batch));
    say(format!(
        "coalesce, {:>4} ms windows:      {outputs:>10}  ({coalesce_pct:.2} % fewer)",
        args.window.as_millis()
    ));
    say(format!(
        "ingest pre-merge ({} events/request): {received} events → {partials} partials to the leaders ({premerge_pct:.2} % fewer)",
        w.batch
    ));
    Ok(json!({
        "bench": "savings",
        "machine": machine(),
        "nodes": endpoints.len(),
        "shards": client.shards(),
        "keys": w.keys,
        "zipf": w.zipf,
        "window_ms": args.window.as_millis() as u64,
        "offered_events_per_s": args.rate,
        "events": events,
        "events_per_sec": load.rate().round(),
        "failed_events": load.failed(),
        "distinct_keys": distinct,
        "ack_latency": quantiles_ms(&load.latency),
        "per_event_writes": events,
        "consumer_batch": args.consumer_batch,
        "consumer_batch_writes": batch_writes,
        "consumer_batch_write_reduction": batch_pct / 100.0,
        "coalesce_writes": outputs,
        "downstream_write_reduction": coalesce_pct / 100.0,
        "events_per_request": w.batch,
        "premerge_events": received,
        "premerge_partials": partials,
        "premerge_reduction": premerge_pct / 100.0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_batches_merge_keys_within_each_run() {
        // Runs of 3: {1,1,2} → 2 writes, {2,2,2} → 1, {3} → 1.
        assert_eq!(consumer_batch_writes(&[1, 1, 2, 2, 2, 2, 3], 3), 4);
        assert_eq!(consumer_batch_writes(&[], 200), 0);
        assert_eq!(reduction_pct(4, 7), 42.86);
    }
}
