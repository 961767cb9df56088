//! `coalescectl bench postgres`: the same Zipf workload written to PostgreSQL three ways, side
//! by side in one run:
//!
//! 1. **per-event upserts** — what a consumer without coalescing does: one
//!    `INSERT … ON CONFLICT DO UPDATE SET total = total + x` per event, from `--connections`
//!    concurrent connections;
//! 2. **coalesced** — the events go through a local Coalesce cluster (sum per key per
//!    `--window`) whose PostgreSQL sink (`mode = "accumulate"`) writes one row change per key
//!    per window; timed from the first send until PostgreSQL holds every event;
//! 3. **raw COPY** — the PostgreSQL sink's write path alone (`COPY` into the stage, then the
//!    merge into an `append` table, fence included), fed synthetic outputs.
//!
//! Without `--pg-url` a throw-away PostgreSQL server is started (see [`coalesce_cli::pg`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use coalesce_cli::pg::{self, TempPostgres};
use coalesce_client::Client;
use coalesce_core::merge::Aggregate;
use coalesce_core::output::{Epoch, Output};
use coalesce_core::window::SealReason;
use coalesce_sinks::postgres::{PgMode, PostgresParams, PostgresSink};
use coalesce_sinks::{Batch, Sink};
use serde_json::json;
use tokio::time::Instant;

use crate::bench::{KeyGen, LocalArgs, machine, start_local};

#[derive(Debug, clap::Args)]
pub(crate) struct PostgresArgs {
    #[command(flatten)]
    local: LocalArgs,
    /// PostgreSQL to write to (libpq connection string); default: a throw-away local server.
    #[arg(long)]
    pg_url: Option<String>,
    /// Events in the workload.
    #[arg(long, default_value_t = 500_000)]
    events: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Zipf exponent of key popularity.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Concurrent connections for the per-event upserts and the raw COPY phase.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Producer lanes sending to the cluster.
    #[arg(long, default_value_t = 8)]
    producers: usize,
    /// Events per request to the cluster.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// The coalescing window (tumbling).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Outputs written in the raw COPY phase.
    #[arg(long, default_value_t = 1_000_000)]
    copy_rows: usize,
    /// Outputs per COPY in the raw phase.
    #[arg(long, default_value_t = 5_000)]
    copy_batch: usize,
    /// Seed of the key generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub(crate) async fn run(args: PostgresArgs) -> anyhow::Result<()> {
    if args.events == 0 || args.connections == 0 || args.producers == 0 || args.batch == 0 || args.copy_batch == 0 {
        bail!("--events, --connections, --producers, --batch and --copy-batch must be at least 1");
    }
    let temp = match &args.pg_url {
        Some(_) => None,
        None => Some(TempPostgres::start().context("starting a throw-away PostgreSQL (or pass --pg-url)")?),
    };
    let url = args.pg_url.clone().or_else(|| temp.as_ref().map(TempPostgres::url)).unwrap_or_default();
    let say = |s: String| args.local.say(s);
    let mut keygen = KeyGen::new(args.keys, args.zipf, args.seed)?;
    let workload: Vec<String> = (0..args.events).map(|_| keygen.next().to_owned()).collect();
    let distinct = workload.iter().collect::<std::collections::HashSet<_>>().len();
    say(format!(
        "bench postgres: {} events over {} keys (zipf {}, {} distinct used), {} connections",
        args.events, args.keys, args.zipf, distinct, args.connections
    ));

    let naive = per_event(&url, &workload, args.connections).await?;
    say(format!(
        "per-event upserts: {} rows written in {:.1} s = {:.0} rows/s",
        args.events,
        naive,
        args.events as f64 / naive
    ));

    let (wall, outputs) = coalesced(&args, &url, &workload).await?;
    let reduction = 100.0 * (1.0 - outputs as f64 / args.events as f64);
    say(format!(
        "coalesced ({} windows): {} events → {} rows written in {:.1} s = {:.0} events/s absorbed, write reduction {:.1}%",
        humantime::format_duration(args.window),
        args.events,
        outputs,
        wall,
        args.events as f64 / wall,
        reduction
    ));

    let copy = raw_copy(&url, args.copy_rows, args.copy_batch, args.connections).await?;
    say(format!(
        "raw COPY (sink write path, append, {} per COPY): {} rows in {:.1} s = {:.0} rows/s",
        args.copy_batch,
        args.copy_rows,
        copy,
        args.copy_rows as f64 / copy
    ));
    args.local.emit(&json!({
        "bench": "postgres",
        "machine": machine(),
        "events": args.events, "keys": args.keys, "zipf": args.zipf, "distinct_keys": distinct,
        "per_event": { "rows": args.events, "seconds": naive, "rows_per_s": args.events as f64 / naive },
        "coalesced": {
            "window_ms": args.window.as_millis() as u64, "rows": outputs, "seconds": wall,
            "events_per_s": args.events as f64 / wall, "write_reduction_pct": reduction,
        },
        "raw_copy": { "rows": args.copy_rows, "seconds": copy, "rows_per_s": args.copy_rows as f64 / copy },
    }))?;
    drop(temp);
    Ok(())
}

/// One upsert per event; returns the wall time in seconds.
async fn per_event(url: &str, workload: &[String], connections: usize) -> anyhow::Result<f64> {
    let db = pg::connect(url).await?;
    db.batch_execute(
        "DROP TABLE IF EXISTS bench_per_event; \
         CREATE TABLE bench_per_event (key text PRIMARY KEY, total bigint NOT NULL)",
    )
    .await?;
    let workload = Arc::new(workload.to_vec());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (url, workload) = (url.to_owned(), Arc::clone(&workload));
        tasks.push(tokio::spawn(async move {
            let db = pg::connect(&url).await?;
            let stmt = db
                .prepare(
                    "INSERT INTO bench_per_event (key, total) VALUES ($1, 1) \
                     ON CONFLICT (key) DO UPDATE SET total = bench_per_event.total + 1",
                )
                .await?;
            for key in workload.iter().skip(c).step_by(connections) {
                db.execute(&stmt, &[key]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("upsert task panicked")??;
    }
    let secs = started.elapsed().as_secs_f64();
    let total: i64 = db.query_one("SELECT coalesce(sum(total), 0)::bigint FROM bench_per_event", &[]).await?.get(0);
    if total != workload.len() as i64 {
        bail!("per-event table holds {total} of {} events", workload.len());
    }
    Ok(secs)
}

/// Through a local cluster with a PostgreSQL sink; returns (wall seconds, rows written).
async fn coalesced(args: &PostgresArgs, url: &str, workload: &[String]) -> anyhow::Result<(f64, u64)> {
    let db = pg::connect(url).await?;
    reset(&db, "bench_coalesced").await?;
    let streams = format!(
        "[limits]\nmax_keys = 4000000\nmax_bytes = 2147483648\n\n\
         [sinks.pg]\nkind = \"postgres\"\nurl = {url:?}\ntable = \"bench_coalesced\"\nmode = \"accumulate\"\n\
         batch_max = 5000\nconnections = 4\n\n\
         [streams.bench]\nmerge = \"sum_i64\"\nwindow = {{ tumbling = \"{}ms\" }}\nsinks = [\"pg\"]\n",
        args.window.as_millis()
    );
    let mut cluster = start_local(&args.local, &streams).await?;
    let result = async {
        let client = Client::connect_lazy(cluster.nodes.iter().map(|n| n.client_addr.clone()))?;
        client.wait_ready(Duration::from_secs(60)).await?;
        let started = Instant::now();
        let chunks: Vec<Vec<String>> = workload.chunks(args.batch).map(|c| c.to_vec()).collect();
        let chunks = Arc::new(chunks);
        let mut lanes = Vec::new();
        for lane in 0..args.producers {
            let (client, chunks, producers) = (client.clone(), Arc::clone(&chunks), args.producers);
            lanes.push(tokio::spawn(async move {
                let mut producer = client.producer();
                for chunk in chunks.iter().skip(lane).step_by(producers) {
                    let events = chunk.iter().map(|k| coalesce_client::event("bench", k, 1i64)).collect();
                    let report = producer.send(events).await?;
                    if !report.all_acked() {
                        bail!("events not acknowledged: {:?}", report.failures().next());
                    }
                }
                anyhow::Ok(())
            }));
        }
        for l in lanes {
            l.await.context("producer lane panicked")??;
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let total: i64 = db
                .query_one("SELECT coalesce(sum((value)::bigint), 0)::bigint FROM bench_coalesced", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            if total == workload.len() as i64 {
                break;
            }
            if Instant::now() > deadline {
                bail!("PostgreSQL holds {total} of {} events after 300 s", workload.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let rows: i64 = db
            .query_one(
                "SELECT coalesce(sum(seq), 0)::bigint FROM coalesce_sink_fence WHERE target = 'bench_coalesced'",
                &[],
            )
            .await?
            .get(0);
        anyhow::Ok((secs, rows as u64))
    }
    .await;
    cluster.stop_all(Duration::from_secs(20));
    result
}

/// Drops a sink's target table and its fence rows, for a fresh run.
async fn reset(db: &tokio_postgres::Client, table: &str) -> anyhow::Result<()> {
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}")).await?;
    // The fence table exists once a PostgreSQL sink has run against this database.
    let _ = db.execute("DELETE FROM coalesce_sink_fence WHERE target = $1", &[&table]).await;
    Ok(())
}

/// Synthetic outputs through the sink's write path; returns wall seconds.
async fn raw_copy(url: &str, rows: usize, batch: usize, connections: usize) -> anyhow::Result<f64> {
    let db = pg::connect(url).await?;
    reset(&db, "bench_copy").await?;
    let params = PostgresParams {
        url: Some(url.to_owned()),
        url_env: None,
        table: "bench_copy".into(),
        mode: PgMode::Append,
        create_table: true,
        connections,
    };
    let sink = Arc::new(PostgresSink::new("bench", params));
    // One lane per connection, each its own shard (a shard always uses the same connection).
    let per_lane = rows.div_ceil(connections);
    let cluster = coalesce_core::cluster::ClusterIdentity {
        id: coalesce_core::cluster::ClusterId(rand::random()),
        predates_id: false,
    };
    let started = Instant::now();
    let mut lanes = Vec::new();
    for lane in 0..connections {
        let sink = Arc::clone(&sink);
        let n = per_lane.min(rows.saturating_sub(lane * per_lane));
        lanes.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while (seq as usize) < n {
                let outputs: Vec<Output> = (0..batch.min(n - seq as usize))
                    .map(|_| {
                        seq += 1;
                        synthetic(lane as u32, seq)
                    })
                    .collect();
                let b = Batch { cluster, shard: lane as u32, epoch: Epoch { term: 1, node: 1 }, outputs: &outputs };
                sink.deliver(b).await.map_err(|e| anyhow::anyhow!("raw COPY: {e}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for l in lanes {
        l.await.context("copy lane panicked")??;
    }
    let secs = started.elapsed().as_secs_f64();
    let count: i64 = db.query_one("SELECT count(*) FROM bench_copy", &[]).await?.get(0);
    if count != rows as i64 {
        bail!("bench_copy holds {count} of {rows} rows");
    }
    Ok(secs)
}

fn synthetic(shard: u32, seq: u64) -> Output {
    let now = 1_700_000_000_000 + seq;
    Output {
        stream: "bench".into(),
        key: format!("key-{:08}", seq % 100_000),
        shard,
        seq,
        epoch: Epoch { term: 1, node: 1 },
        window_start: now,
        window_end: now + 1000,
        first_input_at: now,
        last_input_at: now,
        first_event_at: now,
        last_event_at: now,
        inputs: 3,
        reason: SealReason::Time,
        value: Aggregate::SumI64(seq as i64),
        samples: None,
    }
}
