//! The PostgreSQL sink: each delivery is one transaction that
//!
//! 1. locks the shard's fence row (`coalesce_sink_fence`, one per cluster id, sink, target
//!    table and shard) and gives up — *fenced* — when a leader of a newer Raft term has
//!    delivered there;
//! 2. keeps only outputs with a seq above the fence (re-deliveries change nothing);
//! 3. `COPY`s them (binary) into a session-local staging table;
//! 4. merges the stage into the target in one statement, by `mode`:
//!    - `upsert`: one row per (stream, key) holding the newest output;
//!    - `accumulate`: one row per (stream, key) whose `value` and `inputs` add up every output
//!      (for `sum_i64`, `sum_f64` and `count` streams): totals equal the acknowledged inputs;
//!    - `append`: one row per output, keyed by (cluster, shard, seq);
//! 5. moves the fence to (this leader's term, highest seq) and commits.
//!
//! So each output changes the target exactly once, across retries, failovers and stale
//! leaders; a re-created cluster (its seqs and terms start again) and a second sink on the
//! same table (for other streams: one stream into one table twice is refused at start) each
//! have fence rows of their own. A renamed sink starts a fresh fence (docs/sinks.md). The schema is in `docs/sinks.md`; with
//! `create_table = true` (default) the sink creates the tables it needs and adds the `cluster`
//! column to a target table made by an older build.
//!
//! **Fences written before cluster ids** (`coalesce_fence`, keyed by table and shard). A cluster
//! that predates ids ([`coalesce_core::cluster::ClusterIdentity::predates_id`]) keeps honouring
//! and moving its row there too, while that table exists: nodes of the older build delivering
//! during a rolling upgrade fence (and are fenced by) the upgraded ones, and nothing is
//! delivered twice across the upgrade. Until that table is dropped (once every node is
//! upgraded, docs/upgrades.md), such a cluster's sinks sharing a table still skip each other's
//! outputs through the old row, as before. A cluster created with an id never reads it.
//!
//! Connections (`tokio-postgres`, TLS by `sslmode` as libpq reads it: [`crate::pgtls`]) are
//! opened lazily and reopened after errors; a shard always uses the same one of the
//! `connections`.

use std::time::{Duration, SystemTime};

use coalesce_core::merge::MergeOp;
use coalesce_core::output::Output;
use coalesce_core::stream::StreamDef;
use serde::Deserialize;
use tokio_postgres::Client;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

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
    /// Connection string (`host=... user=... dbname=...` or `postgres://...`), with libpq's
    /// `sslmode` and `sslrootcert` ([`crate::pgtls`]).
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
            (Some(url), None) => {
                crate::pgtls::PgConnect::parse(url)?;
            }
            // Checked now when the variable is set (a node started without it reports that
            // when it connects, and retries).
            (None, Some(var)) => {
                if let Ok(url) = std::env::var(var) {
                    crate::pgtls::PgConnect::parse(&url).map_err(|e| format!("{var}: {e}"))?;
                }
            }
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
    layout: Layout,
}

/// What the database holds, read when a connection opens.
struct Layout {
    /// `coalesce_fence`, the fence table of builds before cluster ids, exists.
    legacy_fence: bool,
    /// The statement merging the stage into the target: without the target's `cluster` column
    /// (a table made by an older build, `create_table = false`), outputs of a re-created
    /// cluster cannot replace rows of the old one in `upsert` and `accumulate` modes.
    merge_sql: String,
}

/// Writes outputs into a PostgreSQL table.
pub struct PostgresSink {
    name: String,
    params: PostgresParams,
    conns: Vec<tokio::sync::Mutex<Option<Conn>>>,
}

impl std::fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSink").field("name", &self.name).field("params", &self.params).finish()
    }
}

/// The columns of the staging table and the target, in COPY order.
const COLUMNS: &str =
    "cluster, stream, key, value, inputs, window_start, window_end, reason, shard, seq, epoch_term, epoch_node";
/// [`COLUMNS`] but `cluster`, for a target without that column.
const COLUMNS_NO_CLUSTER: &str =
    "stream, key, value, inputs, window_start, window_end, reason, shard, seq, epoch_term, epoch_node";
const TYPES: &[Type] = &[
    Type::TEXT,
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

/// The fence table.
const FENCE_DDL: &str = "CREATE TABLE IF NOT EXISTS coalesce_sink_fence (
    cluster text NOT NULL,
    sink text NOT NULL,
    target text NOT NULL,
    shard integer NOT NULL,
    epoch_term bigint NOT NULL,
    epoch_node bigint NOT NULL,
    seq bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cluster, sink, target, shard))";

const STAGE_DDL: &str = "CREATE TEMP TABLE IF NOT EXISTS coalesce_stage (
    cluster text, stream text, key text, value jsonb, inputs bigint, window_start timestamptz,
    window_end timestamptz, reason text, shard integer, seq bigint, epoch_term bigint, epoch_node bigint)
    ON COMMIT DELETE ROWS";

fn target_ddl(table: &str, mode: PgMode) -> String {
    let key = if mode == PgMode::Append { "cluster, shard, seq" } else { "stream, key" };
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    cluster text NOT NULL DEFAULT '',
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

/// What a connection finds in the database (see [`PostgresSink::shape`]).
#[derive(Debug)]
struct Shape {
    target: bool,
    cluster_column: bool,
    legacy_fence: bool,
    fence: bool,
    /// The target's primary key: constraint name and columns.
    primary_key: Option<(String, Vec<String>)>,
}

const SHAPE_SQL: &str = "SELECT to_regclass($1) IS NOT NULL,
    EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'cluster'
            AND attnum > 0 AND NOT attisdropped),
    to_regclass('coalesce_fence') IS NOT NULL,
    to_regclass('coalesce_sink_fence') IS NOT NULL,
    (SELECT c.conname::text FROM pg_constraint c WHERE c.conrelid = to_regclass($1) AND c.contype = 'p'),
    (SELECT array_agg(a.attname::text ORDER BY k.ord)
       FROM pg_constraint c CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
      WHERE c.conrelid = to_regclass($1) AND c.contype = 'p')";

/// DDL waits this long for a table lock, then fails (retried later) rather than queue every
/// reader and writer of the table behind it while a long query holds the table.
const DDL_LOCK_TIMEOUT: &str = "5s";

fn merge_sql(table: &str, mode: PgMode, cluster_column: bool) -> String {
    let (cols, set_cluster, other_cluster) = if cluster_column {
        (COLUMNS, "cluster = EXCLUDED.cluster, ", " OR t.cluster <> EXCLUDED.cluster")
    } else {
        (COLUMNS_NO_CLUSTER, "", "")
    };
    let set_meta = format!(
        "{set_cluster}window_end = EXCLUDED.window_end, reason = EXCLUDED.reason, shard = EXCLUDED.shard, \
         seq = EXCLUDED.seq, epoch_term = EXCLUDED.epoch_term, epoch_node = EXCLUDED.epoch_node, updated_at = now()"
    );
    // The row is replaced by a newer output of its shard, by an output of another shard (the
    // key moved), or by one of another cluster (seqs start again in a re-created cluster).
    let newer = format!("t.seq < EXCLUDED.seq OR t.shard <> EXCLUDED.shard{other_cluster}");
    let first_cluster = if cluster_column { "(array_agg(cluster))[1], " } else { "" };
    match mode {
        PgMode::Upsert => format!(
            "INSERT INTO {table} AS t ({cols})
             SELECT DISTINCT ON (stream, key) {cols} FROM coalesce_stage ORDER BY stream, key, seq DESC
             ON CONFLICT (stream, key) DO UPDATE SET value = EXCLUDED.value, inputs = EXCLUDED.inputs,
                 window_start = EXCLUDED.window_start, {set_meta}
             WHERE {newer}"
        ),
        PgMode::Accumulate => format!(
            "INSERT INTO {table} AS t ({cols})
             SELECT {first_cluster}stream, key, to_jsonb(sum((value)::numeric)), sum(inputs)::bigint, min(window_start),
                    max(window_end), (array_agg(reason ORDER BY seq DESC))[1], max(shard), max(seq),
                    max(epoch_term), (array_agg(epoch_node ORDER BY seq DESC))[1]
             FROM coalesce_stage GROUP BY stream, key
             ON CONFLICT (stream, key) DO UPDATE SET value = to_jsonb((t.value)::numeric + (EXCLUDED.value)::numeric),
                 inputs = t.inputs + EXCLUDED.inputs, window_start = LEAST(t.window_start, EXCLUDED.window_start),
                 {set_meta}
             WHERE {newer}"
        ),
        // No conflict target: whichever unique key the table has ((cluster, shard, seq), or
        // (shard, seq) on a table of an older build this sink may not alter).
        PgMode::Append => {
            format!("INSERT INTO {table} ({cols}) SELECT {cols} FROM coalesce_stage ON CONFLICT DO NOTHING")
        }
    }
}

fn millis(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// An error and its sources (tokio-postgres says "error performing TLS handshake" and keeps
/// the reason — an unknown issuer, a name mismatch — in its source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
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
        let conns = (0..params.connections).map(|_| tokio::sync::Mutex::new(None)).collect();
        Self { name: name.to_owned(), params, conns }
    }

    /// Reads what the database holds of this sink's tables.
    async fn shape(&self, client: &Client) -> Result<Shape, DeliveryError> {
        let row = client
            .query_one(SHAPE_SQL, &[&self.params.table])
            .await
            .map_err(|e| DeliveryError::transient(format!("reading the tables' shape: {e}")))?;
        let pk: (Option<String>, Option<Vec<String>>) = (row.get(4), row.get(5));
        Ok(Shape {
            target: row.get(0),
            cluster_column: row.get(1),
            legacy_fence: row.get(2),
            fence: row.get(3),
            primary_key: pk.0.zip(pk.1),
        })
    }

    /// Creates what is missing (`create_table = true`): the fence table, the target, the
    /// target's `cluster` column; and re-keys an `append` table of an older build by (cluster,
    /// shard, seq) — only once no node can still write it the old way (`coalesce_fence` is
    /// gone: nodes of builds before cluster ids insert by (shard, seq)). Nothing runs when
    /// nothing is missing, so a restart takes no table lock. Nodes do this concurrently; a
    /// transaction-scoped advisory lock serializes them, DDL waits at most
    /// [`DDL_LOCK_TIMEOUT`] for its table lock, and any error is retried (never a refusal of
    /// the outputs).
    /// Returns whether it ran any DDL.
    async fn create_missing(&self, client: &Client, shape: &Shape) -> Result<bool, DeliveryError> {
        let (table, mode) = (self.params.table.as_str(), self.params.mode);
        let mut ddl = Vec::new();
        if !shape.fence {
            ddl.push(FENCE_DDL.to_owned());
        }
        if !shape.target {
            ddl.push(target_ddl(table, mode));
        } else if !shape.cluster_column {
            ddl.push(format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS cluster text NOT NULL DEFAULT ''"));
        }
        if let Some((name, cols)) = &shape.primary_key
            && mode == PgMode::Append
            && cols.as_slice() == ["shard", "seq"]
            && !shape.legacy_fence
        {
            let name = name.replace('"', "\"\"");
            ddl.push(format!("ALTER TABLE {table} DROP CONSTRAINT \"{name}\", ADD PRIMARY KEY (cluster, shard, seq)"));
        }
        if ddl.is_empty() {
            return Ok(false);
        }
        let sql = format!(
            "BEGIN; SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'; SELECT pg_advisory_xact_lock(7336455); {}; COMMIT",
            ddl.join("; ")
        );
        client.batch_execute(&sql).await.map_err(|e| DeliveryError::transient(format!("creating tables: {e}")))?;
        Ok(true)
    }

    async fn connect(&self) -> Result<Conn, DeliveryError> {
        let connect =
            crate::pgtls::PgConnect::parse(&self.params.connection_string()?).map_err(DeliveryError::transient)?;
        let (client, connection) =
            connect.config.connect(connect.tls).await.map_err(|e| {
                DeliveryError::transient(format!("connecting (sslmode {:?}): {}", connect.mode, chain(&e)))
            })?;
        let sink = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%sink, error = %e, "postgres connection closed");
            }
        });
        let table = self.params.table.as_str();
        let mut shape = self.shape(&client).await?;
        if self.params.create_table && self.create_missing(&client, &shape).await? {
            shape = self.shape(&client).await?;
        }
        let cluster_column = shape.cluster_column;
        if !cluster_column {
            tracing::warn!(
                sink = %self.name,
                table,
                "the target table has no `cluster` column (made by an older build, create_table = false): \
                 outputs of a cluster created anew cannot replace its rows; see docs/upgrades.md"
            );
        }
        if self.params.mode == PgMode::Append
            && shape.primary_key.as_ref().is_some_and(|(_, cols)| cols.as_slice() != ["cluster", "shard", "seq"])
        {
            tracing::warn!(
                sink = %self.name,
                table,
                key = ?shape.primary_key,
                "the append table is not keyed by (cluster, shard, seq): outputs of a cluster created anew that \
                 repeat an old (shard, seq) are dropped; see docs/upgrades.md"
            );
        }
        let legacy_fence = shape.legacy_fence;
        let merge_sql = merge_sql(table, self.params.mode, cluster_column);
        Ok(Conn { client, staged: false, layout: Layout { legacy_fence, merge_sql } })
    }

    async fn write(&self, conn: &mut Conn, batch: &Batch<'_>) -> Result<(), DeliveryError> {
        if !conn.staged {
            conn.client.batch_execute(STAGE_DDL).await.map_err(classify)?;
            conn.staged = true;
        }
        let table = self.params.table.as_str();
        let (sink, shard, cluster) = (self.name.as_str(), batch.shard as i32, batch.cluster.id.to_string());
        let tx = conn.client.transaction().await.map_err(classify)?;
        let key: [&(dyn ToSql + Sync); 4] = [&cluster, &sink, &table, &shard];
        tx.execute(
            "INSERT INTO coalesce_sink_fence (cluster, sink, target, shard, epoch_term, epoch_node, seq) \
             VALUES ($1, $2, $3, $4, 0, 0, 0) ON CONFLICT DO NOTHING",
            &key,
        )
        .await
        .map_err(classify)?;
        let row = tx
            .query_one(
                "SELECT epoch_term, seq FROM coalesce_sink_fence \
                 WHERE cluster = $1 AND sink = $2 AND target = $3 AND shard = $4 FOR UPDATE",
                &key,
            )
            .await
            .map_err(classify)?;
        let own: (i64, i64) = (row.get(0), row.get(1));
        // A cluster from before ids also honours (and moves) its fence row of that time.
        let legacy = if batch.cluster.predates_id && conn.layout.legacy_fence {
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
            Some((row.get::<_, i64>(0), row.get::<_, i64>(1)))
        } else {
            None
        };
        let (fence_term, fence_seq) = legacy.map_or(own, |l| (own.0.max(l.0), own.1.max(l.1)));
        let term = as_i64(batch.epoch.term);
        if fence_term > term {
            return Err(DeliveryError::Fenced {
                reason: format!("{table} shard {shard} took deliveries from term {fence_term}, this leader has {term}"),
            });
        }
        let fresh: Vec<&Output> = batch.outputs.iter().filter(|o| as_i64(o.seq) > fence_seq).collect();
        if !fresh.is_empty() {
            let sink =
                tx.copy_in(&format!("COPY coalesce_stage ({COLUMNS}) FROM STDIN BINARY")).await.map_err(classify)?;
            let writer = BinaryCopyInWriter::new(sink, TYPES);
            futures::pin_mut!(writer);
            for o in &fresh {
                let (value, inputs, start, end) =
                    (o.value.to_json(), o.inputs as i64, millis(o.window_start), millis(o.window_end));
                let (seq, eterm, enode) = (as_i64(o.seq), as_i64(o.epoch.term), as_i64(o.epoch.node));
                let row: [&(dyn ToSql + Sync); 12] = [
                    &cluster,
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
            tx.execute(&conn.layout.merge_sql, &[]).await.map_err(classify)?;
        }
        let moved = (term, fresh.last().map_or(fence_seq, |o| as_i64(o.seq)));
        let node = as_i64(batch.epoch.node);
        if moved != own {
            tx.execute(
                "UPDATE coalesce_sink_fence SET epoch_term = $5, epoch_node = $6, seq = $7, updated_at = now() \
                 WHERE cluster = $1 AND sink = $2 AND target = $3 AND shard = $4",
                &[&cluster, &sink, &table, &shard, &moved.0, &node, &moved.1],
            )
            .await
            .map_err(classify)?;
        }
        if legacy.is_some_and(|l| l != moved) {
            tx.execute(
                "UPDATE coalesce_fence SET epoch_term = $3, epoch_node = $4, seq = $5, updated_at = now() \
                 WHERE target = $1 AND shard = $2",
                &[&table, &shard, &moved.0, &node, &moved.1],
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
