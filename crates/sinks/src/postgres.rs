//! The PostgreSQL sink: each delivery is one transaction that
//!
//! 1. locks the shard's fence row (`coalesce_fence`, one per target table and shard) and gives
//!    up — *fenced* — when a leader of a newer Raft term has delivered there;
//! 2. keeps only outputs with a seq above the fence (re-deliveries change nothing);
//! 3. `COPY`s them (binary) into a session-local staging table;
//! 4. merges the stage into the target in one statement, by `mode`:
//!    - `upsert`: one row per (stream, key) holding the newest output;
//!    - `accumulate`: one row per (stream, key) whose `value` and `inputs` add up every output
//!      (for `sum_i64`, `sum_f64` and `count` streams): totals equal the acknowledged inputs;
//!    - `append`: one row per output, keyed by (shard, seq);
//! 5. moves the fence to (this leader's term, highest seq) and commits.
//!
//! So each output changes the target exactly once, across retries, failovers and stale
//! leaders. The schema is in `docs/sinks.md`; with `create_table = true` (default) the sink
//! creates the tables it needs.
//!
//! Connections (`tokio-postgres`, no TLS yet) are opened lazily and reopened after errors; a
//! shard always uses the same one of the `connections`.

use std::time::{Duration, SystemTime};

use coalesce_core::merge::MergeOp;
use coalesce_core::output::Output;
use coalesce_core::stream::StreamDef;
use serde::Deserialize;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};

use crate::{Batch, DeliveryError, Sink};

/// How outputs land in the target table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PgMode {
    #[default]
    Upsert,
    Accumulate,
    Append,
}

#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresParams {
    /// Connection string (`host=... user=... dbname=...` or `postgres://...`).
    #[serde(default)]
    pub url: Option<String>,
    /// Or: the environment variable holding it, to keep passwords out of config files.
    #[serde(default)]
    pub url_env: Option<String>,
    /// Target table, `name` or `schema.name` (lower-case letters, digits, `_`).
    pub table: String,
    #[serde(default)]
    pub mode: PgMode,
    /// Create the target and fence tables when missing.
    #[serde(default = "yes")]
    pub create_table: bool,
    /// Connections per node.
    #[serde(default = "default_connections")]
    pub connections: usize,
}

impl std::fmt::Debug for PostgresParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresParams")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("url_env", &self.url_env)
            .field("table", &self.table)
            .field("mode", &self.mode)
            .field("create_table", &self.create_table)
            .field("connections", &self.connections)
            .finish()
    }
}

fn yes() -> bool {
    true
}
fn default_connections() -> usize {
    2
}

fn valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

impl PostgresParams {
    pub(crate) fn validate<'a>(
        self,
        streams: impl Iterator<Item = &'a std::sync::Arc<StreamDef>>,
    ) -> Result<Self, String> {
        match (&self.url, &self.url_env) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => return Err("set exactly one of url and url_env".into()),
        }
        let parts: Vec<&str> = self.table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| valid_ident(p)) {
            return Err(format!(
                "table must be `name` or `schema.name` of lower-case letters, digits and '_', got {:?}",
                self.table
            ));
        }
        if !(1..=32).contains(&self.connections) {
            return Err(format!("connections must be in 1..=32, got {}", self.connections));
        }
        if self.mode == PgMode::Accumulate {
            for s in streams {
                if !matches!(s.rules.op, MergeOp::SumI64 | MergeOp::SumF64 | MergeOp::Count) {
                    return Err(format!(
                        "mode = \"accumulate\" adds values up, but stream {:?} merges with {}; use sum_i64, sum_f64 \
                         or count, or mode = \"upsert\"",
                        s.name,
                        s.rules.op.name()
                    ));
                }
            }
        }
        Ok(self)
    }

    fn connection_string(&self) -> Result<String, DeliveryError> {
        match (&self.url, &self.url_env) {
            (Some(u), _) => Ok(u.clone()),
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| DeliveryError::transient(format!("environment variable {var} is not set"))),
            (None, None) => Err(DeliveryError::transient("no connection string")),
        }
    }
}

struct Conn {
    client: Client,
    staged: bool,
}

/// Writes outputs into a PostgreSQL table.
pub struct PostgresSink {
    name: String,
    params: PostgresParams,
    conns: Vec<tokio::sync::Mutex<Option<Conn>>>,
    created: tokio::sync::OnceCell<()>,
    merge_sql: String,
}

impl std::fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSink").field("name", &self.name).field("params", &self.params).finish()
    }
}

/// The columns of the staging table and the target, in COPY order.
const COLUMNS: &str =
    "stream, key, value, inputs, window_start, window_end, reason, shard, seq, epoch_term, epoch_node";
const TYPES: &[Type] = &[
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::INT4,
    Type::INT8,
    Type::INT8,
    Type::INT8,
];

const FENCE_DDL: &str = "CREATE TABLE IF NOT EXISTS coalesce_fence (
    target text NOT NULL,
    shard integer NOT NULL,
    epoch_term bigint NOT NULL,
    epoch_node bigint NOT NULL,
    seq bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, shard))";

const STAGE_DDL: &str = "CREATE TEMP TABLE IF NOT EXISTS coalesce_stage (
    stream text, key text, value jsonb, inputs bigint, window_start timestamptz, window_end timestamptz,
    reason text, shard integer, seq bigint, epoch_term bigint, epoch_node bigint) ON COMMIT DELETE ROWS";

fn target_ddl(table: &str, mode: PgMode) -> String {
    let key = if mode == PgMode::Append { "shard, seq" } else { "stream, key" };
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    stream text NOT NULL,
    key text NOT NULL,
    value jsonb NOT NULL,
    inputs bigint NOT NULL,
    window_start timestamptz NOT NULL,
    window_end timestamptz NOT NULL,
    reason text NOT NULL,
    shard integer NOT NULL,
    seq bigint NOT NULL,
    epoch_term bigint NOT NULL,
    epoch_node bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ({key}))"
    )
}

fn merge_sql(table: &str, mode: PgMode) -> String {
    const SET_META: &str = "window_end = EXCLUDED.window_end, reason = EXCLUDED.reason, shard = EXCLUDED.shard, \
                            seq = EXCLUDED.seq, epoch_term = EXCLUDED.epoch_term, epoch_node = EXCLUDED.epoch_node, \
                            updated_at = now()";
    match mode {
        PgMode::Upsert => format!(
            "INSERT INTO {table} AS t ({COLUMNS})
             SELECT DISTINCT ON (stream, key) {COLUMNS} FROM coalesce_stage ORDER BY stream, key, seq DESC
             ON CONFLICT (stream, key) DO UPDATE SET value = EXCLUDED.value, inputs = EXCLUDED.inputs,
                 window_start = EXCLUDED.window_start, {SET_META}
             WHERE t.seq < EXCLUDED.seq OR t.shard <> EXCLUDED.shard"
        ),
        PgMode::Accumulate => format!(
            "INSERT INTO {table} AS t ({COLUMNS})
             SELECT stream, key, to_jsonb(sum((value)::numeric)), sum(inputs)::bigint, min(window_start),
                    max(window_end), (array_agg(reason ORDER BY seq DESC))[1], max(shard), max(seq),
                    max(epoch_term), (array_agg(epoch_node ORDER BY seq DESC))[1]
             FROM coalesce_stage GROUP BY stream, key
             ON CONFLICT (stream, key) DO UPDATE SET value = to_jsonb((t.value)::numeric + (EXCLUDED.value)::numeric),
                 inputs = t.inputs + EXCLUDED.inputs, window_start = LEAST(t.window_start, EXCLUDED.window_start),
                 {SET_META}
             WHERE t.seq < EXCLUDED.seq OR t.shard <> EXCLUDED.shard"
        ),
        PgMode::Append => {
            format!(
                "INSERT INTO {table} ({COLUMNS}) SELECT {COLUMNS} FROM coalesce_stage ON CONFLICT (shard, seq) DO NOTHING"
            )
        }
    }
}

fn millis(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Unsigned 64-bit ids as PostgreSQL `bigint` (two's complement).
fn as_i64(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// Errors PostgreSQL will repeat for these rows whatever we do: data and constraint errors.
fn classify(e: tokio_postgres::Error) -> DeliveryError {
    let code = e.code().map(|c| c.code().to_owned());
    let reason = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    match code.as_deref() {
        Some(c) if c.starts_with("22") || c.starts_with("23") => DeliveryError::Rejected { reason },
        _ => DeliveryError::transient(reason),
    }
}

impl PostgresSink {
    pub fn new(name: &str, params: PostgresParams) -> Self {
        let merge_sql = merge_sql(&params.table, params.mode);
        let conns = (0..params.connections).map(|_| tokio::sync::Mutex::new(None)).collect();
        Self { name: name.to_owned(), params, conns, created: tokio::sync::OnceCell::new(), merge_sql }
    }

    async fn connect(&self) -> Result<Conn, DeliveryError> {
        let (client, connection) = tokio_postgres::connect(&self.params.connection_string()?, NoTls)
            .await
            .map_err(|e| DeliveryError::transient(format!("connecting: {e}")))?;
        let sink = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%sink, error = %e, "postgres connection closed");
            }
        });
        if self.params.create_table {
            // Nodes create the tables concurrently; PostgreSQL's CREATE TABLE IF NOT EXISTS can
            // then fail with a duplicate catalog entry. A transaction-scoped advisory lock
            // serializes them, and any error here is retried (never a refusal of the outputs).
            self.created
                .get_or_try_init(|| async {
                    let ddl = format!(
                        "BEGIN; SELECT pg_advisory_xact_lock(7336455); {FENCE_DDL}; {}; COMMIT",
                        target_ddl(&self.params.table, self.params.mode)
                    );
                    client
                        .batch_execute(&ddl)
                        .await
                        .map_err(|e| DeliveryError::transient(format!("creating tables: {e}")))
                })
                .await?;
        }
        Ok(Conn { client, staged: false })
    }

    async fn write(&self, conn: &mut Conn, batch: &Batch<'_>) -> Result<(), DeliveryError> {
        if !conn.staged {
            conn.client.batch_execute(STAGE_DDL).await.map_err(classify)?;
            conn.staged = true;
        }
        let table = self.params.table.as_str();
        let shard = batch.shard as i32;
        let tx = conn.client.transaction().await.map_err(classify)?;
        tx.execute(
            "INSERT INTO coalesce_fence (target, shard, epoch_term, epoch_node, seq) VALUES ($1, $2, 0, 0, 0) \
             ON CONFLICT DO NOTHING",
            &[&table, &shard],
        )
        .await
        .map_err(classify)?;
        let row = tx
            .query_one(
                "SELECT epoch_term, seq FROM coalesce_fence WHERE target = $1 AND shard = $2 FOR UPDATE",
                &[&table, &shard],
            )
            .await
            .map_err(classify)?;
        let (fence_term, fence_seq): (i64, i64) = (row.get(0), row.get(1));
        let term = as_i64(batch.epoch.term);
        if fence_term > term {
            return Err(DeliveryError::Fenced {
                reason: format!("{table} shard {shard} took deliveries from term {fence_term}, this leader has {term}"),
            });
        }
        let fresh: Vec<&Output> = batch.outputs.iter().filter(|o| as_i64(o.seq) > fence_seq).collect();
        if let Some(last) = fresh.last() {
            let sink =
                tx.copy_in(&format!("COPY coalesce_stage ({COLUMNS}) FROM STDIN BINARY")).await.map_err(classify)?;
            let writer = BinaryCopyInWriter::new(sink, TYPES);
            futures::pin_mut!(writer);
            for o in &fresh {
                let (value, inputs, start, end) =
                    (o.value.to_json(), o.inputs as i64, millis(o.window_start), millis(o.window_end));
                let (seq, eterm, enode) = (as_i64(o.seq), as_i64(o.epoch.term), as_i64(o.epoch.node));
                let row: [&(dyn ToSql + Sync); 11] = [
                    &o.stream,
                    &o.key,
                    &value,
                    &inputs,
                    &start,
                    &end,
                    &o.reason.as_str(),
                    &shard,
                    &seq,
                    &eterm,
                    &enode,
                ];
                writer.as_mut().write(&row).await.map_err(classify)?;
            }
            writer.finish().await.map_err(classify)?;
            tx.execute(&self.merge_sql, &[]).await.map_err(classify)?;
            tx.execute(
                "UPDATE coalesce_fence SET epoch_term = $3, epoch_node = $4, seq = $5, updated_at = now() \
                 WHERE target = $1 AND shard = $2",
                &[&table, &shard, &term, &as_i64(batch.epoch.node), &as_i64(last.seq)],
            )
            .await
            .map_err(classify)?;
        } else if fence_term < term {
            tx.execute(
                "UPDATE coalesce_fence SET epoch_term = $3, epoch_node = $4 WHERE target = $1 AND shard = $2",
                &[&table, &shard, &term, &as_i64(batch.epoch.node)],
            )
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }
}

#[async_trait::async_trait]
impl Sink for PostgresSink {
    async fn deliver(&self, batch: Batch<'_>) -> Result<(), DeliveryError> {
        let slot = &self.conns[batch.shard as usize % self.conns.len()];
        let mut guard = slot.lock().await;
        if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
            *guard = Some(self.connect().await?);
        }
        let Some(conn) = guard.as_mut() else { return Err(DeliveryError::transient("no connection")) };
        let result = self.write(conn, &batch).await;
        if let Err(DeliveryError::Transient { .. }) = &result {
            // The connection may be broken or mid-transaction: start afresh next time.
            *guard = None;
        }
        result
    }
}
