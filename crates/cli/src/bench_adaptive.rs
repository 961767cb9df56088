//! `coalescectl bench adaptive`: a throttled sink, fixed windows vs load-adaptive windows.
//!
//! A webhook ([`coalesce_cli::webhook`]) accepts `--capacity` outputs per second and answers
//! 429 beyond. `--keys` keys are written every 100 ms, first into a stream with fixed
//! `--window` tumbling windows, then into the same stream with `adaptive = { max_staleness }`,
//! each delivered through its own HTTP sink to the webhook. Each phase runs `--seconds` under
//! the throttle, then `--relax-seconds` with the throttle lifted (load continuing), then drains.
//! Every second it samples the sink's backlog (`coalesce_sink_backlog_outputs`), the outputs
//! produced, the window stretch in force (`coalesce_adaptive_extra_seconds`) and the delivery
//! staleness of what the webhook accepted (arrival − first input of the window). With
//! `--plots DIR` it draws them (SVG).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use coalesce_chaos::report::{Line, lines_svg};
use coalesce_cli::local::LocalCluster;
use coalesce_cli::webhook::ThrottledHook;
use coalesce_client::{Client, event};
use serde_json::json;
use tokio::time::Instant;

use crate::bench::{LocalArgs, machine, start_local};

#[derive(Debug, clap::Args)]
pub(crate) struct AdaptiveArgs {
    #[command(flatten)]
    local: LocalArgs,
    /// Outputs per second the webhook accepts (HTTP 429 beyond).
    #[arg(long, default_value_t = 200)]
    capacity: u64,
    /// Keys written, each once every 100 ms.
    #[arg(long, default_value_t = 200)]
    keys: usize,
    /// Tumbling window of both streams.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Staleness bound of the adaptive stream.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    max_staleness: Duration,
    /// Seconds of load under the throttle, per phase.
    #[arg(long, default_value_t = 40)]
    seconds: u64,
    /// Seconds of load after the throttle is lifted, per phase.
    #[arg(long, default_value_t = 15)]
    relax_seconds: u64,
    /// Outputs per HTTP request (`batch_max` of both sinks; at most `--capacity`).
    #[arg(long, default_value_t = 50)]
    batch_max: u64,
    /// Write backlog and staleness plots (SVG) into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
}

/// One second of a phase.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Sample {
    /// Seconds since the phase started.
    t: f64,
    backlog: f64,
    /// Outputs sealed in the last second.
    made_per_s: f64,
    /// Outputs the webhook accepted in the last second.
    delivered_per_s: f64,
    /// Arrival − first input of the outputs accepted in the last second (NaN: none arrived).
    staleness_p50_s: f64,
    staleness_max_s: f64,
    /// The largest window stretch in force on any node.
    extra_s: f64,
}

const FIXED: (&str, &str) = ("fixed", "fixed_hook");
const ADAPTIVE: (&str, &str) = ("stretchy", "adaptive_hook");

pub(crate) async fn run(args: AdaptiveArgs) -> anyhow::Result<()> {
    if args.keys == 0 || args.capacity == 0 || args.seconds == 0 || args.window.is_zero() {
        bail!("--keys, --capacity, --seconds and --window must be positive");
    }
    if args.batch_max == 0 || args.batch_max > args.capacity {
        bail!("--batch-max must be in 1..=--capacity (a larger batch never fits the webhook's budget)");
    }
    if args.max_staleness < args.window {
        bail!("--max-staleness must be at least --window");
    }
    let (hook, base) = ThrottledHook::serve(args.capacity).await?;
    let window = humantime::format_duration(args.window);
    let sink = |name: &str| {
        format!(
            "[sinks.{name}]\nkind = \"http\"\nurl = \"{base}/{name}\"\nbatch_max = {}\n\
             retry_initial = \"50ms\"\nretry_max = \"500ms\"\n\n",
            args.batch_max
        )
    };
    let streams = format!(
        "{}{}[streams.{}]\nmerge = \"count\"\nwindow = {{ tumbling = \"{window}\" }}\nsinks = [\"{}\"]\n\n\
         [streams.{}]\nmerge = \"count\"\n\
         window = {{ tumbling = \"{window}\", adaptive = {{ max_staleness = \"{}\", backlog_high = {} }} }}\n\
         sinks = [\"{}\"]\n",
        sink(FIXED.1),
        sink(ADAPTIVE.1),
        FIXED.0,
        FIXED.1,
        ADAPTIVE.0,
        humantime::format_duration(args.max_staleness),
        2 * args.capacity,
        ADAPTIVE.1,
    );
    let mut cluster = start_local(&args.local, &streams).await?;
    let result = async {
        let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.client_addr.clone()).collect();
        let client = Client::connect_lazy(endpoints)?;
        client.wait_ready(Duration::from_secs(60)).await?;
        args.local.say(format!(
            "bench adaptive: {} keys every 100 ms ({:.0} outputs/s with {} windows) into a webhook taking {} outputs/s; \
             {} s throttled + {} s lifted per phase",
            args.keys,
            args.keys as f64 * 1000.0 / args.window.as_millis().max(1) as f64,
            window,
            args.capacity,
            args.seconds,
            args.relax_seconds
        ));
        let fixed = phase(&args, &cluster, &client, &hook, FIXED).await?;
        let adaptive = phase(&args, &cluster, &client, &hook, ADAPTIVE).await?;
        if let Some(dir) = &args.plots {
            plot(&args, dir, &fixed.1, &adaptive.1)?;
        }
        Ok::<_, anyhow::Error>(json!({
            "bench": "adaptive",
            "machine": machine(),
            "nodes": cluster.nodes.len(),
            "shards": args.local.shards(),
            "keys": args.keys,
            "window_ms": args.window.as_millis() as u64,
            "max_staleness_ms": args.max_staleness.as_millis() as u64,
            "capacity_outputs_per_s": args.capacity,
            "batch_max": args.batch_max,
            "throttled_seconds": args.seconds,
            "relax_seconds": args.relax_seconds,
            "fixed": fixed.0,
            "adaptive": adaptive.0,
            "fixed_samples": fixed.1,
            "adaptive_samples": adaptive.1,
        }))
    }
    .await;
    cluster.stop_all(Duration::from_secs(20));
    args.local.emit(&result?)
}

/// Runs one phase on `stream` (delivered to webhook route `route`); returns its summary and
/// samples.
async fn phase(
    args: &AdaptiveArgs,
    cluster: &LocalCluster,
    client: &Client,
    hook: &ThrottledHook,
    (stream, route): (&str, &str),
) -> anyhow::Result<(serde_json::Value, Vec<Sample>)> {
    hook.set_throttling(true);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn(steady_load(client.clone(), stream.to_owned(), args.keys, stop.clone(), sent.clone()));
    let started = Instant::now();
    let total = args.seconds + args.relax_seconds;
    let made_series = format!("coalesce_stream_outputs_total{{reason=\"time\",stream=\"{stream}\"}}");
    let mut samples = Vec::new();
    let (mut made_before, mut seen) = (sum(cluster.metric(&made_series).await), hook.accepted_count(route));
    for second in 1..=total {
        tokio::time::sleep_until(started + Duration::from_secs(second)).await;
        if second == args.seconds + 1 {
            hook.set_throttling(false);
        }
        let made = sum(cluster.metric(&made_series).await);
        let accepted = hook.accepted(route);
        let mut staleness: Vec<f64> = accepted[seen..]
            .iter()
            .map(|a| a.received_ms.saturating_sub(a.field("first_input_at")) as f64 / 1000.0)
            .collect();
        staleness.sort_by(f64::total_cmp);
        let extra = cluster.metric(&format!("coalesce_adaptive_extra_seconds{{stream=\"{stream}\"}}")).await;
        let sample = Sample {
            t: started.elapsed().as_secs_f64(),
            backlog: sum(cluster.metric(&format!("coalesce_sink_backlog_outputs{{sink=\"{route}\"}}")).await),
            made_per_s: made - made_before,
            delivered_per_s: (accepted.len() - seen) as f64,
            staleness_p50_s: staleness.get(staleness.len() / 2).copied().unwrap_or(f64::NAN),
            staleness_max_s: staleness.last().copied().unwrap_or(f64::NAN),
            extra_s: extra.iter().copied().fold(0.0, f64::max),
        };
        args.local.say(format!(
            "{stream:>8} t={:>3}s {} backlog {:>7.0}  made {:>5.0}/s  delivered {:>5.0}/s  staleness p50 {:>5.1} s max {:>5.1} s  stretch {:>4.1} s",
            second,
            if second <= args.seconds { "throttled" } else { "lifted   " },
            sample.backlog,
            sample.made_per_s,
            sample.delivered_per_s,
            sample.staleness_p50_s,
            sample.staleness_max_s,
            sample.extra_s
        ));
        samples.push(sample);
        made_before = made;
        seen = accepted.len();
    }
    stop.store(true, Ordering::SeqCst);
    load.await.context("load task")??;
    // Drain: every input sent arrives (redeliveries counted once), so the next phase starts clean.
    let sent = sent.load(Ordering::SeqCst);
    let deadline = Instant::now() + args.max_staleness + Duration::from_secs(120);
    while hook.inputs(route) < sent {
        if Instant::now() > deadline {
            bail!("{stream}: only {} of {sent} inputs reached the webhook", hook.inputs(route));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let throttled = &samples[..args.seconds as usize];
    let second_half = &throttled[throttled.len() / 2..];
    let accepted = hook.accepted(route);
    let longest_window = accepted.iter().map(|a| a.field("window_end") - a.field("first_input_at")).max().unwrap_or(0);
    let mut staleness: Vec<u64> =
        accepted.iter().map(|a| a.received_ms.saturating_sub(a.field("first_input_at"))).collect();
    staleness.sort_unstable();
    let q = |p: f64| staleness.get(((staleness.len() as f64 * p) as usize).min(staleness.len().saturating_sub(1)));
    let summary = json!({
        "stream": stream,
        "events": sent,
        "outputs_delivered": accepted.len(),
        "refused_requests": hook.refused(route),
        "backlog_at_throttle_end": throttled.last().map_or(0.0, |s| s.backlog),
        "backlog_max_throttled": throttled.iter().map(|s| s.backlog).fold(0.0, f64::max),
        "backlog_second_half_max": second_half.iter().map(|s| s.backlog).fold(0.0, f64::max),
        "outputs_made_per_s_second_half": second_half.iter().map(|s| s.made_per_s).sum::<f64>() / second_half.len().max(1) as f64,
        "stretch_max_s": samples.iter().map(|s| s.extra_s).fold(0.0, f64::max),
        "stretch_at_end_s": samples.last().map_or(0.0, |s| s.extra_s),
        "longest_window_ms": longest_window,
        "delivery_staleness_ms": { "p50": q(0.5), "p99": q(0.99), "max": staleness.last() },
    });
    args.local.say(format!("{stream}: {summary}"));
    Ok((summary, samples))
}

fn sum(v: Vec<f64>) -> f64 {
    v.iter().sum()
}

/// One `count` event for each of `keys` keys every 100 ms until `stop`; counts acked events.
async fn steady_load(
    client: Client,
    stream: String,
    keys: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut producer = client.producer();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let batch = (0..keys).map(|k| event(&stream, &format!("k{k}"), ())).collect::<Vec<_>>();
        let report = producer.send(batch).await?;
        if let Some((i, s)) = report.failures().next() {
            bail!("event {i} of {stream} not acknowledged: {}", s.message);
        }
        sent.fetch_add(keys as u64, Ordering::SeqCst);
    }
    Ok(())
}

fn plot(args: &AdaptiveArgs, dir: &std::path::Path, fixed: &[Sample], adaptive: &[Sample]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let line = |name: &str, s: &[Sample], y: fn(&Sample) -> f64| Line {
        name: name.to_owned(),
        points: s.iter().map(|s| (s.t, y(s))).collect(),
    };
    let lifted = [(args.seconds as f64, "throttle lifted".to_owned())];
    let window = humantime::format_duration(args.window);
    let backlog = lines_svg(
        &format!("Sink backlog: webhook taking {} outputs/s, {} keys every 100 ms", args.capacity, args.keys),
        "outputs waiting",
        &[
            line(&format!("fixed {window} windows"), fixed, |s| s.backlog),
            line(
                &format!("adaptive (max_staleness {})", humantime::format_duration(args.max_staleness)),
                adaptive,
                |s| s.backlog,
            ),
        ],
        &lifted,
    )?;
    let staleness = lines_svg(
        "Delivery staleness (arrival − first input) and the adaptive stretch",
        "seconds",
        &[
            line("fixed: staleness max", fixed, |s| s.staleness_max_s),
            line("adaptive: staleness max", adaptive, |s| s.staleness_max_s),
            line("adaptive: stretch in force", adaptive, |s| s.extra_s),
        ],
        &lifted,
    )?;
    for (name, svg) in [("adaptive-backlog.svg", backlog), ("adaptive-staleness.svg", staleness)] {
        let path = dir.join(name);
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
        args.local.say(format!("wrote {}", path.display()));
    }
    Ok(())
}
