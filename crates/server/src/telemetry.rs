//! Logs and traces. Logs: `tracing` with `tracing-subscriber`, as text or JSON lines on
//! stderr, filtered by an `EnvFilter` (`RUST_LOG` syntax) that can be replaced while the node
//! runs (`PUT /loglevel`). Traces: with `[telemetry] otlp_endpoint` set (and the `otlp` cargo
//! feature, on by default), spans are exported over OTLP/gRPC (`opentelemetry-otlp` with
//! `tracing-opentelemetry`) through their own filter, so exporting debug spans does not turn on
//! debug logs.
//!
//! Spans follow a request: `rpc` (one per client-port call; a W3C `traceparent` from the caller
//! becomes its parent) → `ingest` (events) → `forward` (to the shard leader; the context
//! travels in the peer call's metadata, see [`coalesce_raft::tracectx`]) → `forwarded` (on the
//! leader) → `replicate` (propose, commit, apply); the window scheduler's `seal` and the
//! delivery worker's `deliver` carry shard, stream and seq fields. They are at debug level: for
//! logs, enable them with e.g. `info,coalesce_server=debug,coalesce_raft=debug`.

use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// The filter used when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,openraft=error";

/// The OTLP endpoint the standard OpenTelemetry environment names, for a node whose config names
/// none: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` (OTLP/gRPC:
/// used as given); nothing when `OTEL_SDK_DISABLED` is `true`. `var` reads a variable.
pub fn otlp_endpoint_from_env(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .into_iter()
        .find_map(|name| var(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()))
}

/// `[telemetry]`: span export over OTLP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317` (or `https://…`); unset: no export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// PEM CA bundle for an `https` collector (relative to the config file); unset: the public
    /// web PKI roots.
    #[serde(default)]
    pub otlp_ca: Option<std::path::PathBuf>,
    /// Which spans are exported (`RUST_LOG` syntax), independent of the log filter.
    #[serde(default = "default_otlp_filter")]
    pub otlp_filter: String,
    /// Fraction of traces started here that are sampled (0 to 1). A trace continued from a
    /// caller's `traceparent` follows the caller's decision.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// `service.name` of the exported spans (each node adds `service.instance.id` = its name).
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// How long one export call may take before it is abandoned (spans are then dropped, and
    /// the node carries on).
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub export_timeout: Duration,
}

fn default_otlp_filter() -> String {
    "warn,coalesce_server=debug,coalesce_raft=debug".into()
}
fn default_sample_ratio() -> f64 {
    1.0
}
fn default_service_name() -> String {
    "coalesce".into()
}
fn default_export_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_ca: None,
            otlp_filter: default_otlp_filter(),
            sample_ratio: default_sample_ratio(),
            service_name: default_service_name(),
            export_timeout: default_export_timeout(),
        }
    }
}

impl TelemetryConfig {
    /// Checks the table before anything starts; `base` is the config file's directory.
    pub fn validate(&mut self, base: &std::path::Path) -> Result<(), String> {
        if let Some(ca) = &self.otlp_ca
            && ca.is_relative()
        {
            self.otlp_ca = Some(base.join(ca));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(format!("telemetry.sample_ratio must be between 0 and 1, got {}", self.sample_ratio));
        }
        if let Err(e) = EnvFilter::try_new(&self.otlp_filter) {
            return Err(format!("telemetry.otlp_filter {:?}: {e}", self.otlp_filter));
        }
        if self.export_timeout.is_zero() {
            return Err("telemetry.export_timeout must be more than 0".into());
        }
        let Some(endpoint) = &self.otlp_endpoint else { return Ok(()) };
        let uri: http::Uri =
            endpoint.parse().map_err(|e| format!("telemetry.otlp_endpoint {endpoint:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http" | "https") if uri.host().is_some() => {}
            _ => {
                return Err(format!(
                    "telemetry.otlp_endpoint {endpoint:?} must be an http:// or https:// URL with a host, e.g. \
                     http://otel-collector:4317"
                ));
            }
        }
        if self.otlp_ca.is_some() && uri.scheme_str() != Some("https") {
            return Err("telemetry.otlp_ca is set but telemetry.otlp_endpoint is not https://".into());
        }
        if !cfg!(feature = "otlp") {
            return Err("telemetry.otlp_endpoint is set but this coalesced was built without the `otlp` cargo \
                        feature"
                .into());
        }
        Ok(())
    }
}

/// Replaces the process's log filter at run time.
#[derive(Debug)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl LogControl {
    /// The filter in force.
    pub fn current(&self) -> String {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the filter; a malformed one is refused and the old one stays.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let parsed = EnvFilter::try_new(filter).map_err(|e| format!("invalid filter {filter:?}: {e}"))?;
        self.handle.reload(parsed).map_err(|e| format!("reloading the filter: {e}"))?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = filter.to_owned();
        Ok(())
    }
}

/// The span exporter, if any; [`SpanExport::shutdown`] flushes what is queued.
#[derive(Debug, Default)]
pub struct SpanExport {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl SpanExport {
    /// Exports the spans still queued (bounded by the export timeout) and stops the exporter.
    /// Call it after the node has stopped, outside the async runtime but while it still exists.
    pub fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "flushing OTLP spans at exit");
        }
    }
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global subscriber: `json` lines or human-readable text on stderr, filtered by
/// `RUST_LOG` (else [`DEFAULT_FILTER`]), plus the OTLP exporter when `telemetry` names one
/// (`node` and `cluster` label the spans). The OTLP client needs a Tokio runtime: call this
/// inside one (e.g. after `Runtime::enter`).
pub fn init(
    json: bool,
    telemetry: &TelemetryConfig,
    node: &str,
    cluster: &str,
) -> anyhow::Result<(LogControl, SpanExport)> {
    let initial = std::env::var("RUST_LOG").ok().filter(|f| EnvFilter::try_new(f).is_ok());
    let initial = initial.unwrap_or_else(|| DEFAULT_FILTER.to_owned());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only for a terminal: a log written to a file or a pipe carries no escape codes.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(colour);
    let fmt: BoxedLayer = if json { fmt.json().with_filter(filter).boxed() } else { fmt.with_filter(filter).boxed() };
    let mut layers = vec![fmt];
    #[cfg(feature = "otlp")]
    let provider = match &telemetry.otlp_endpoint {
        Some(endpoint) => {
            let (layer, provider) = otlp::layer(endpoint, telemetry, node, cluster)?;
            layers.push(layer);
            Some(provider)
        }
        None => None,
    };
    #[cfg(not(feature = "otlp"))]
    let _ = (telemetry, node, cluster);
    tracing_subscriber::registry().with(layers).try_init()?;
    let log = LogControl { handle, current: Mutex::new(initial) };
    Ok((
        log,
        SpanExport {
            #[cfg(feature = "otlp")]
            provider,
        },
    ))
}

/// The span of one call on the client port (`Server::trace_fn`): the caller's trace context, if
/// its metadata carries one, becomes the parent.
pub fn rpc_span(request: &http::Request<()>) -> tracing::Span {
    let span = tracing::debug_span!("rpc", method = request.uri().path());
    coalesce_raft::tracectx::extract(&span, request.headers());
    span
}

#[cfg(feature = "otlp")]
mod otlp {
    use http::{HeaderMap, HeaderName, HeaderValue};
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::{EnvFilter, Layer};

    use super::{BoxedLayer, TelemetryConfig};

    /// The exporting layer (behind its own filter) and the provider that owns the exporter.
    pub(super) fn layer(
        endpoint: &str,
        config: &TelemetryConfig,
        node: &str,
        cluster: &str,
    ) -> anyhow::Result<(BoxedLayer, SdkTracerProvider)> {
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(config.export_timeout);
        if endpoint.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            tls = match &config.otlp_ca {
                Some(path) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| anyhow::anyhow!("telemetry.otlp_ca {}: {e}", path.display()))?;
                    tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
                }
                None => tls.with_webpki_roots(),
            };
            builder = builder.with_tls_config(tls);
        }
        let exporter = builder.build()?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attributes([
                KeyValue::new("service.instance.id", node.to_owned()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("coalesce.cluster", cluster.to_owned()),
            ])
            .build();
        // Bounded: the batch processor keeps at most 2048 spans and drops beyond that.
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))))
            .with_resource(resource)
            .build();
        let filter = EnvFilter::try_new(&config.otlp_filter)?;
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("coalesce")).with_filter(filter).boxed();
        coalesce_raft::tracectx::install(Box::new(W3c(TraceContextPropagator::new())));
        Ok((layer, provider))
    }

    /// W3C `traceparent`/`tracestate` in gRPC metadata.
    struct W3c(TraceContextPropagator);

    impl coalesce_raft::tracectx::Propagator for W3c {
        fn inject(&self, span: &tracing::Span, headers: &mut HeaderMap) {
            self.0.inject_context(&span.context(), &mut Headers(headers));
        }

        fn extract(&self, span: &tracing::Span, headers: &HeaderMap) {
            let cx: Context = self.0.extract(&ReadHeaders(headers));
            if opentelemetry::trace::TraceContextExt::span(&cx).span_context().is_valid() {
                let _ = span.set_parent(cx);
            }
        }
    }

    struct Headers<'a>(&'a mut HeaderMap);

    impl Injector for Headers<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(key), HeaderValue::try_from(value)) {
                self.0.insert(k, v);
            }
        }
    }

    struct ReadHeaders<'a>(&'a HeaderMap);

    impl Extractor for ReadHeaders<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(HeaderName::as_str).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml_text: &str) -> Result<TelemetryConfig, String> {
        let mut c: TelemetryConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        c.validate(std::path::Path::new("/etc/coalesce")).map(|()| c)
    }

    #[test]
    fn the_standard_environment_names_an_endpoint() {
        fn from(vars: &[(&str, &str)]) -> Option<String> {
            otlp_endpoint_from_env(|name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned()))
        }
        assert_eq!(from(&[]), None);
        assert_eq!(from(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4317")]).as_deref(), Some("http://otel:4317"));
        let both = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4317"),
        ];
        assert_eq!(from(&both).as_deref(), Some("http://t:4317"), "the signal's own wins");
        assert_eq!(from(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4317"), ("OTEL_SDK_DISABLED", "TRUE")]), None);
        assert_eq!(from(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]), None);
    }

    #[test]
    fn defaults_export_nothing() {
        let c = check("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.otlp_endpoint, c.sample_ratio, c.service_name.as_str()), (None, 1.0, "coalesce"));
    }

    #[test]
    fn bad_settings_are_named() {
        for (text, expect) in [
            ("otlp_endpoint = \"otel:4317\"", "must be an http:// or https:// URL"),
            ("otlp_endpoint = \"ftp://otel:4317\"", "must be an http:// or https:// URL"),
            ("otlp_endpoint = \"http://\"", "is not a URL"),
            ("sample_ratio = 1.5", "sample_ratio must be between 0 and 1"),
            ("otlp_filter = \"coalesce=loud\"", "telemetry.otlp_filter"),
            ("export_timeout = \"0s\"", "export_timeout must be more than 0"),
            ("otlp_endpoint = \"http://otel:4317\"\notlp_ca = \"ca.pem\"", "otlp_ca is set but"),
        ] {
            let err = check(text).err().unwrap_or_else(|| panic!("{text:?} accepted"));
            assert!(err.contains(expect), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_collector_url_and_relative_ca_are_accepted() {
        let c = check("otlp_endpoint = \"https://otel.example:4317\"\notlp_ca = \"ca.pem\"\nsample_ratio = 0.1")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.otlp_ca.as_deref(), Some(std::path::Path::new("/etc/coalesce/ca.pem")));
    }
}
