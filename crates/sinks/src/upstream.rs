//! Fetch upstreams: the HTTP request the `Fetch` RPC makes for a stream's key, declared as the
//! stream's `[streams.NAME.fetch]` table (docs/api.md, "Fetch"):
//!
//! ```toml
//! [streams.accounts.fetch]
//! url = "http://accounts.internal/v1/accounts/{key}"   # {key} is percent-encoded
//! method = "GET"                # or POST (no body)
//! headers = { Accept = "application/json" }
//! timeout = "5s"
//! settle = "0s"                 # wait this long before calling; callers meanwhile join
//! ttl = "0s"                    # serve a successful (2xx) answer this long without calling
//! rate_limit_sink = "accounts"  # share this http sink's cluster-wide request ceiling
//! on_window_close = false       # deliver the fetched answer instead of the merged value
//! max_keys = 100000             # keys in flight or cached per node
//! max_body_bytes = 4194304
//! ```
//!
//! Any HTTP answer is a result (status, body, content type); only a call that got no answer
//! (connection refused, timeout, a body over the limit) is an error — and every caller of that
//! flight gets the same one.

use std::collections::BTreeMap;
use std::time::Duration;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::limiter::WindowLimiter;
use crate::{SinkConfig, SinkKind};

/// `[streams.NAME.fetch]`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchParams {
    /// `http://` or `https://` URL with a `{key}` placeholder.
    pub url: String,
    #[serde(default = "default_method")]
    pub method: String,
    /// Extra request headers (e.g. `Authorization`); values are never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde", default)]
    pub settle: Duration,
    #[serde(with = "humantime_serde", default)]
    pub ttl: Duration,
    /// An `http` sink with a `rate_limit` whose ceiling these calls share.
    #[serde(default)]
    pub rate_limit_sink: Option<String>,
    /// The event → fetch bridge: when a key's window closes, fetch it (joining any Fetch
    /// callers) and deliver the answer to the stream's push sinks in place of the merged value.
    #[serde(default)]
    pub on_window_close: bool,
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
}

impl std::fmt::Debug for FetchParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchParams")
            .field("url", &self.url)
            .field("method", &self.method)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("settle", &self.settle)
            .field("ttl", &self.ttl)
            .field("rate_limit_sink", &self.rate_limit_sink)
            .field("on_window_close", &self.on_window_close)
            .finish()
    }
}

fn default_method() -> String {
    "GET".into()
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_keys() -> usize {
    100_000
}
fn default_max_body() -> usize {
    4 << 20
}

/// A stream's fetch declaration the node cannot run.
#[derive(Debug, thiserror::Error)]
#[error("streams.{stream}.fetch: {message}")]
pub struct FetchConfigError {
    pub stream: String,
    pub message: String,
}

impl FetchParams {
    /// Parses and checks the `fetch` table of `stream` against the declared sinks.
    pub fn parse(stream: &str, table: &toml::Table, sinks: &[SinkConfig]) -> Result<Self, FetchConfigError> {
        let err = |message: String| FetchConfigError { stream: stream.to_owned(), message };
        let p = Self::deserialize(toml::Value::Table(table.clone())).map_err(|e| err(e.to_string().trim().into()))?;
        if !(p.url.starts_with("http://") || p.url.starts_with("https://")) {
            return Err(err(format!("url must start with http:// or https://, got {:?}", p.url)));
        }
        if !p.url.contains("{key}") {
            return Err(err(format!("url must contain {{key}} (where the key goes), got {:?}", p.url)));
        }
        reqwest::Url::parse(&p.url.replace("{key}", "k")).map_err(|e| err(format!("url: {e}")))?;
        if !matches!(p.method.as_str(), "GET" | "POST") {
            return Err(err(format!("method must be GET or POST, got {:?}", p.method)));
        }
        for (k, v) in &p.headers {
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| err(format!("headers: {k:?} is not a header name")))?;
            HeaderValue::from_str(v).map_err(|_| err(format!("headers.{k}: not a valid header value")))?;
        }
        if p.timeout.is_zero() {
            return Err(err("timeout must be positive".into()));
        }
        if p.max_keys == 0 || p.max_body_bytes == 0 {
            return Err(err("max_keys and max_body_bytes must be at least 1".into()));
        }
        if let Some(name) = &p.rate_limit_sink {
            match sinks.iter().find(|s| &s.name == name).map(|s| &s.kind) {
                Some(SinkKind::Http(h)) if h.rate_limit.is_some() => {}
                Some(SinkKind::Http(_)) => return Err(err(format!("rate_limit_sink {name:?} has no rate_limit"))),
                Some(_) => return Err(err(format!("rate_limit_sink {name:?} is not an http sink"))),
                None => return Err(err(format!("rate_limit_sink {name:?} is not a declared sink"))),
            }
        }
        Ok(p)
    }
}

/// An upstream's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as a value: JSON when it says so and parses, else text, else bytes.
    pub fn to_value(&self) -> coalesce_core::value::Value {
        use coalesce_core::value::Value;
        if self.content_type.split(';').next().is_some_and(|t| t.trim().ends_with("json"))
            && let Ok(j) = serde_json::from_slice(&self.body)
        {
            return Value::Json(j);
        }
        match String::from_utf8(self.body.clone()) {
            Ok(text) => Value::Str(text),
            Err(e) => Value::Bytes(e.into_bytes()),
        }
    }
}

/// Calls one stream's upstream.
#[derive(Debug)]
pub struct Upstream {
    params: FetchParams,
    client: reqwest::Client,
    method: reqwest::Method,
    limiter: Option<WindowLimiter>,
}

impl Upstream {
    /// `limiter`: the `rate_limit_sink`'s limiter, shared with its deliveries.
    pub fn new(stream: &str, params: &FetchParams, limiter: Option<WindowLimiter>) -> anyhow::Result<Self> {
        let mut headers = HeaderMap::new();
        for (k, v) in &params.headers {
            let mut value = HeaderValue::from_str(v)?;
            value.set_sensitive(true);
            headers.insert(HeaderName::from_bytes(k.as_bytes())?, value);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(params.timeout)
            .user_agent(format!("coalesce/{} (fetch {stream})", env!("CARGO_PKG_VERSION")))
            .build()?;
        let method = reqwest::Method::from_bytes(params.method.as_bytes())?;
        Ok(Self { params: params.clone(), client, method, limiter })
    }

    pub fn params(&self) -> &FetchParams {
        &self.params
    }

    /// The URL for `key`.
    pub fn url_for(&self, key: &str) -> String {
        self.params.url.replace("{key}", &utf8_percent_encode(key, NON_ALPHANUMERIC).to_string())
    }

    /// One call for `key`, after a rate-limit permit if the stream shares a ceiling (the time
    /// spent waiting for it is returned too).
    pub async fn call(&self, key: &str) -> (Result<Answer, String>, Duration) {
        let (sent, waited) = self.call_if(key, || true).await;
        (sent.unwrap_or_else(|| Err("not sent".into())), waited)
    }

    /// [`Upstream::call`] that asks `may_send` right before sending (after any rate-limit
    /// wait): `None` when it said no, and nothing was sent. The `Fetch` leader checks its
    /// lease there, so a leader deposed while it waited (or was paused) does not call.
    pub async fn call_if(
        &self,
        key: &str,
        may_send: impl FnOnce() -> bool,
    ) -> (Option<Result<Answer, String>>, Duration) {
        let started = std::time::Instant::now();
        // Held until the answer arrived; one taken for nothing still counts against the
        // ceiling (the limiter cannot tell), which errs on the safe side.
        let _permit = match &self.limiter {
            Some(l) => Some(l.acquire().await),
            None => None,
        };
        let waited = started.elapsed();
        if !may_send() {
            return (None, waited);
        }
        (Some(self.send(key).await), waited)
    }

    async fn send(&self, key: &str) -> Result<Answer, String> {
        let url = self.url_for(key);
        let mut response =
            self.client.request(self.method.clone(), &url).send().await.map_err(|e| crate::http::without_url(&e))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| crate::http::without_url(&e))? {
            if body.len() + chunk.len() > self.params.max_body_bytes {
                return Err(format!("the answer is over max_body_bytes ({})", self.params.max_body_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, content_type, body })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FetchParams, String> {
        let table: toml::Table = toml::from_str(text).unwrap();
        FetchParams::parse("accounts", &table, &[]).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_key_encoding() {
        let p = parse("url = \"http://api/v1/accounts/{key}?full=1\"").unwrap();
        assert_eq!(
            (p.method.as_str(), p.timeout, p.settle, p.ttl),
            ("GET", default_timeout(), Duration::ZERO, Duration::ZERO)
        );
        let up = Upstream::new("accounts", &p, None).unwrap();
        assert_eq!(up.url_for("a/b c"), "http://api/v1/accounts/a%2Fb%20c?full=1");
    }

    #[tokio::test]
    async fn call_if_sends_nothing_when_told_not_to() {
        // Port 9 (discard) on loopback: a call that were sent would fail, not return `None`.
        let up = Upstream::new("accounts", &parse("url = \"http://127.0.0.1:9/{key}\"").unwrap(), None).unwrap();
        let (sent, _) = up.call_if("k", || false).await;
        assert!(sent.is_none());
        let (sent, _) = up.call_if("k", || true).await;
        assert!(sent.is_some_and(|r| r.is_err()), "sent, and refused");
    }

    #[test]
    fn bad_tables_are_named() {
        for (text, expect) in [
            ("url = \"ftp://x/{key}\"", "must start with http://"),
            ("url = \"http://x/\"", "must contain {key}"),
            ("url = \"http://x/{key}\"\nmethod = \"DELETE\"", "method must be GET or POST"),
            ("url = \"http://x/{key}\"\ntimeout = \"0s\"", "timeout must be positive"),
            ("url = \"http://x/{key}\"\nrate_limit_sink = \"nope\"", "is not a declared sink"),
            ("url = \"http://x/{key}\"\nretries = 3", "unknown field"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(expect) && e.starts_with("streams.accounts.fetch: "), "{text:?}: {e}");
        }
    }
}
