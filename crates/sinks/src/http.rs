//! The HTTP webhook sink: each delivery is one `POST` of a JSON body
//! `{"cluster": C, "shard": S, "epoch": {"term": T, "node": N}, "outputs": [...]}` (outputs as
//! `Output::to_json`), with `Idempotency-Key: <cluster id>-<sink>-<shard>-<first seq>-<last seq>`
//! — stable across re-deliveries when `batch_max = 1`, and different for another cluster (a
//! re-created one starts its seqs again) or another sink posting to the same receiver.
//!
//! Answers: 2xx delivered; 408, 429 and 5xx (and network errors, timeouts) are retried,
//! honouring `Retry-After` (seconds); any other status is a permanent refusal and the outputs
//! go to the dead-letter queue.
//!
//! `rate_limit` is a ceiling on requests per second for the whole cluster: each node takes the
//! share of the shards it leads (with a valid lease), so the sum over nodes never exceeds it,
//! in any 1-second window (see [`crate::limiter`]).

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::limiter::WindowLimiter;
use crate::{Batch, DeliveryError, Sink};

#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpParams {
    /// `http://` or `https://` endpoint.
    pub url: String,
    /// Extra request headers (e.g. `Authorization`); values are never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
    /// Cluster-wide ceiling on requests per second.
    #[serde(default)]
    pub rate_limit: Option<u32>,
}

impl std::fmt::Debug for HttpParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpParams")
            .field("url", &self.url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("rate_limit", &self.rate_limit)
            .finish()
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl HttpParams {
    pub(crate) fn validate(self) -> Result<Self, String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("url must start with http:// or https://, got {:?}", self.url));
        }
        reqwest::Url::parse(&self.url).map_err(|e| format!("url: {e}"))?;
        for (k, v) in &self.headers {
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("headers: {k:?} is not a valid header name"))?;
            HeaderValue::from_str(v).map_err(|_| format!("headers.{k}: not a valid header value"))?;
        }
        if self.timeout.is_zero() {
            return Err("timeout must be positive".into());
        }
        if self.rate_limit == Some(0) {
            return Err("rate_limit must be at least 1 (omit it for no ceiling)".into());
        }
        Ok(self)
    }
}

/// Posts outputs to a webhook.
#[derive(Debug)]
pub struct HttpSink {
    name: String,
    url: reqwest::Url,
    /// `url` without credentials, for messages.
    shown: String,
    client: reqwest::Client,
    rate_limit: Option<u32>,
    limiter: Option<WindowLimiter>,
    /// Microseconds deliveries waited for `limiter`.
    waited_us: std::sync::atomic::AtomicU64,
}

impl HttpSink {
    pub fn new(name: &str, p: &HttpParams) -> anyhow::Result<Self> {
        let mut headers = HeaderMap::new();
        for (k, v) in &p.headers {
            let mut value = HeaderValue::from_str(v)?;
            value.set_sensitive(true);
            headers.insert(HeaderName::from_bytes(k.as_bytes())?, value);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(p.timeout)
            .user_agent(format!("coalesce/{} (sink {name})", env!("CARGO_PKG_VERSION")))
            .build()?;
        let url = reqwest::Url::parse(&p.url)?;
        let mut shown = url.clone();
        let _ = shown.set_password(None);
        let _ = shown.set_username("");
        Ok(Self {
            name: name.to_owned(),
            url,
            shown: shown.to_string(),
            client,
            rate_limit: p.rate_limit,
            // Until this node leads a shard its share is zero.
            limiter: p.rate_limit.map(|_| WindowLimiter::new(0, Duration::from_secs(1))),
            waited_us: std::sync::atomic::AtomicU64::new(0),
        })
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: f64 = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

/// `<cluster id>-<sink>-<shard>-<first seq>-<last seq>`: unambiguous although sink names may
/// hold `-` (the id is 32 hex digits, and the last three parts are numbers).
fn idempotency_key(cluster: &str, sink: &str, shard: u32, first: u64, last: u64) -> String {
    format!("{cluster}-{sink}-{shard}-{first}-{last}")
}

#[async_trait::async_trait]
impl Sink for HttpSink {
    async fn deliver(&self, batch: Batch<'_>) -> Result<(), DeliveryError> {
        let (Some(first), Some(last)) = (batch.outputs.first(), batch.outputs.last()) else { return Ok(()) };
        let cluster = batch.cluster.id.to_string();
        let body = serde_json::json!({
            "cluster": cluster,
            "shard": batch.shard,
            "epoch": { "term": batch.epoch.term, "node": batch.epoch.node },
            "outputs": batch.outputs.iter().map(|o| o.to_json()).collect::<Vec<_>>(),
        });
        let _permit = match &self.limiter {
            Some(l) => {
                let started = std::time::Instant::now();
                let permit = l.acquire().await;
                let us = started.elapsed().as_micros() as u64;
                self.waited_us.fetch_add(us, std::sync::atomic::Ordering::Relaxed);
                Some(permit)
            }
            None => None,
        };
        let response = self
            .client
            .post(self.url.clone())
            .header("Idempotency-Key", idempotency_key(&cluster, &self.name, batch.shard, first.seq, last.seq))
            .header("Coalesce-Cluster", &cluster)
            .header("Coalesce-Shard", batch.shard.to_string())
            .header("Coalesce-Epoch", batch.epoch.to_string())
            .json(&body)
            .send()
            .await
            .map_err(|e| DeliveryError::transient(format!("POST {}: {}", self.shown, without_url(&e))))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let wait = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        let reason = format!("HTTP {}: {}", status.as_u16(), text.chars().take(200).collect::<String>());
        if status.as_u16() == 429 {
            Err(DeliveryError::Throttled { reason, retry_after: wait })
        } else if status.as_u16() == 408 || status.is_server_error() {
            Err(DeliveryError::Transient { reason, retry_after: wait })
        } else {
            Err(DeliveryError::Rejected { reason })
        }
    }

    fn set_share(&self, led: u32, total: u32) {
        if let (Some(l), Some(rate)) = (&self.limiter, self.rate_limit) {
            let share = (u64::from(rate) * u64::from(led)).checked_div(u64::from(total)).unwrap_or(0);
            l.set_limit(share as u32);
        }
    }

    fn rate_limit_waited(&self) -> Duration {
        Duration::from_micros(self.waited_us.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn limiter(&self) -> Option<WindowLimiter> {
        self.limiter.clone()
    }
}

/// A reqwest error's text without the URL (which may carry credentials) repeated.
pub(crate) fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<url>");
    }
    if e.is_timeout() { format!("timed out ({s})") } else { s }
}
