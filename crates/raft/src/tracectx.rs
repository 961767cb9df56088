//! Trace context across peer RPCs. A follower that forwards a request to its shard's leader
//! puts the `forward` span's context in the call's metadata, and the leader continues that
//! trace in its `forwarded` span, so one trace shows a request across both nodes.
//!
//! This crate knows nothing of any tracing backend: the node installs a [`Propagator`] (the
//! server's OTLP exporter installs a W3C `traceparent` one); without one these are no-ops.

use std::sync::OnceLock;

use tonic::codegen::http::HeaderMap;

/// Moves a span's trace context into and out of gRPC metadata.
pub trait Propagator: Send + Sync + 'static {
    /// Writes `span`'s context into `headers` (gRPC metadata).
    fn inject(&self, span: &tracing::Span, headers: &mut HeaderMap);
    /// Makes the context found in `headers` (if any) the parent of `span`.
    fn extract(&self, span: &tracing::Span, headers: &HeaderMap);
}

static PROPAGATOR: OnceLock<Box<dyn Propagator>> = OnceLock::new();

/// Installs the process's propagator; the first one installed stays.
pub fn install(propagator: Box<dyn Propagator>) {
    let _ = PROPAGATOR.set(propagator);
}

/// Writes `span`'s context into `headers`, if a propagator is installed.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    if let Some(p) = PROPAGATOR.get() {
        p.inject(span, headers);
    }
}

/// Parents `span` on the context in `headers`, if a propagator is installed and finds one.
pub fn extract(span: &tracing::Span, headers: &HeaderMap) {
    if let Some(p) = PROPAGATOR.get() {
        p.extract(span, headers);
    }
}
