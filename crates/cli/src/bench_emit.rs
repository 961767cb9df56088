//! `coalescectl bench emit`: how long after a window ends its output reaches a subscriber, at
//! low load — the sealer, the seal's replication and apply, and Subscribe, with nothing queued.
//!
//! One producer sends one event per request, each to a fresh key, at a fixed rate (at most:
//! each send waits for its acknowledgement); a subscriber on one node follows every shard
//! (with at most 3 nodes, every node holds every shard). Each output's delay is the
//! subscriber's wall clock at arrival minus the output's `window_end` (the window's end on the
//! leader's wall clock, a whole millisecond: same host, same clock), in microseconds, so it
//! excludes the window itself.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use coalesce_client::Client;
use coalesce_proto::v1 as pb;
use serde_json::json;

use crate::bench::{LocalArgs, fmt_q, histogram, machine, quantiles_ms, start_local};

#[derive(Debug, clap::Args)]
pub(crate) struct EmitArgs {
    #[command(flatten)]
    local: LocalArgs,
    /// Events per second, one per request, each to a new key.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Tumbling window of the stream.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    window: Duration,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

pub(crate) async fn run(args: EmitArgs) -> anyhow::Result<()> {
    if args.seconds == 0 || !(args.rate > 0.0 && args.rate <= 1_000.0) {
        bail!("--seconds must be at least 1 and --rate between 0 and 1000 events/s");
    }
    if args.local.nodes > 3 {
        bail!("--nodes at most 3: the subscriber follows one node, which holds every shard only then");
    }
    let streams = format!(
        "[streams.emit]\nmerge = \"sum_i64\"\nwindow = {{ tumbling = \"{}ms\" }}\n",
        args.window.as_millis().max(1)
    );
    let mut cluster = start_local(&args.local, &streams).await?;
    let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let result = measure(&args, &endpoints).await;
    cluster.stop_all(Duration::from_secs(20));
    args.local.emit(&result?)
}

async fn measure(args: &EmitArgs, endpoints: &[String]) -> anyhow::Result<serde_json::Value> {
    let client = Client::connect_lazy(endpoints.iter().cloned())?;
    client.wait_ready(Duration::from_secs(120)).await?;
    crate::bench::wait_balanced(&client, args.local.shards(), Duration::from_secs(60)).await;
    // The subscriber: every shard, as replicated on the first node.
    let mut api = pb::coalesce_client::CoalesceClient::connect(format!("http://{}", endpoints[0]))
        .await
        .context("connecting the subscriber")?;
    let request = pb::SubscribeRequest { consumer: "bench-emit".into(), shards: vec![], from_seq: Default::default() };
    let mut outputs = api.subscribe(request).await.context("subscribing")?.into_inner();
    let sent = (args.rate * args.seconds as f64).round().max(1.0) as u64;
    // How many outputs to wait for: the acknowledged events, once sending is over.
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(None::<u64>);
    let receiver = tokio::spawn(async move {
        let mut delays = histogram();
        let mut negative = 0u64;
        loop {
            let seen = delays.len() + negative;
            if acked_rx.borrow().is_some_and(|n| seen >= n) {
                break;
            }
            let msg = tokio::select! {
                m = outputs.message() => m,
                _ = acked_rx.changed() => continue,
            };
            let Ok(Some(msg)) = msg else { break };
            let at = now_us();
            for o in msg.outputs {
                // A clock step between the two reads would make it negative: counted apart.
                match at.checked_sub(o.window_end.saturating_mul(1_000)) {
                    Some(d) => delays.saturating_record(d.max(1)),
                    None => negative += 1,
                }
            }
        }
        (delays, negative)
    });
    let mut producer = client.producer();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut acked = 0u64;
    for i in 0..sent {
        tick.tick().await;
        let event = pb::Event {
            stream: "emit".into(),
            key: format!("k{i}"),
            value: Some(pb::Value { kind: Some(pb::value::Kind::Int(1)) }),
            event_time_ms: None,
            producer_seq: 0,
        };
        if producer.send(vec![event]).await.is_ok_and(|r| r.statuses.iter().all(|s| coalesce_client::is_acked(s.code)))
        {
            acked += 1;
        }
    }
    let _ = acked_tx.send(Some(acked));
    // Every window has closed a window length after the last send; give delivery a moment more.
    let wait = args.window + Duration::from_secs(5);
    let (delays, negative) = match tokio::time::timeout(wait, receiver).await {
        Ok(r) => r.context("the subscriber task")?,
        Err(_) => bail!("the subscriber saw fewer outputs than acknowledged events within {wait:?} of the last send"),
    };
    args.local.say(format!(
        "bench emit: {} nodes, {} shards, {} events at {} /s ({acked} acknowledged), tumbling {:?}",
        endpoints.len(),
        args.local.shards(),
        sent,
        args.rate,
        args.window
    ));
    args.local.say(format!("window end -> subscriber: {}", fmt_q(&delays)));
    Ok(json!({
        "bench": "emit",
        "machine": machine(),
        "nodes": endpoints.len(),
        "shards": args.local.shards(),
        "rate": args.rate,
        "window_ms": args.window.as_millis() as u64,
        "events": sent,
        "acked": acked,
        "window_end_to_subscriber": quantiles_ms(&delays),
        "clock_went_back": negative,
    }))
}
