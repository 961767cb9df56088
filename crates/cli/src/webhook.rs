//! A throttled webhook: the downstream of `coalescectl bench adaptive` and of the adaptive-window
//! tests. It accepts the HTTP sink's JSON batches on `POST /{route}` and, while throttling,
//! takes at most `capacity` outputs per second per route (a fixed one-second budget), answering
//! `429 Too Many Requests` with `Retry-After: 0.1` to a batch that does not fit — the way a
//! rate-limited API pushes back. Every accepted output is kept with the time it arrived.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};

/// An output the webhook accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Wall clock (ms since the Unix epoch) when it arrived.
    pub received_ms: u64,
    /// The output as the sink sent it (`Output::to_json`).
    pub output: serde_json::Value,
}

impl Accepted {
    /// A numeric field of the output (0 when missing).
    pub fn field(&self, name: &str) -> u64 {
        self.output[name].as_u64().unwrap_or(0)
    }
}

/// The webhook's state; see the module docs.
#[derive(Debug)]
pub struct ThrottledHook {
    capacity: u64,
    throttling: AtomicBool,
    /// route → (start of the current second, outputs accepted in it)
    budget: Mutex<BTreeMap<String, (Instant, u64)>>,
    accepted: Mutex<BTreeMap<String, Vec<Accepted>>>,
    refused: Mutex<BTreeMap<String, u64>>,
}

impl ThrottledHook {
    /// Serves a webhook taking `capacity` outputs/s per route on a free loopback port; returns
    /// it and its base URL (`http://127.0.0.1:PORT`). It runs until the runtime stops.
    pub async fn serve(capacity: u64) -> anyhow::Result<(Arc<Self>, String)> {
        let hook = Arc::new(Self {
            capacity,
            throttling: AtomicBool::new(true),
            budget: Mutex::default(),
            accepted: Mutex::default(),
            refused: Mutex::default(),
        });
        let app = axum::Router::new().route("/{route}", axum::routing::post(receive)).with_state(Arc::clone(&hook));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((hook, base))
    }

    /// Turns the throttle on (the default) or off (everything is accepted).
    pub fn set_throttling(&self, on: bool) {
        self.throttling.store(on, Ordering::SeqCst);
    }

    /// The outputs `route` accepted so far, in arrival order.
    pub fn accepted(&self, route: &str) -> Vec<Accepted> {
        lock(&self.accepted).get(route).cloned().unwrap_or_default()
    }

    /// How many outputs `route` accepted so far.
    pub fn accepted_count(&self, route: &str) -> usize {
        lock(&self.accepted).get(route).map_or(0, Vec::len)
    }

    /// Batches `route` answered 429.
    pub fn refused(&self, route: &str) -> u64 {
        lock(&self.refused).get(route).copied().unwrap_or(0)
    }

    /// Σ `inputs` of the distinct (shard, seq) outputs `route` accepted: what reached it,
    /// redeliveries counted once.
    pub fn inputs(&self, route: &str) -> u64 {
        let unique: BTreeMap<(u64, u64), u64> = lock(&self.accepted)
            .get(route)
            .into_iter()
            .flatten()
            .map(|a| ((a.field("shard"), a.field("seq")), a.field("inputs")))
            .collect();
        unique.values().sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn receive(
    State(hook): State<Arc<ThrottledHook>>,
    Path(route): Path<String>,
    body: axum::Json<serde_json::Value>,
) -> (StatusCode, HeaderMap) {
    let outputs = body["outputs"].as_array().cloned().unwrap_or_default();
    let n = outputs.len() as u64;
    let mut reply = HeaderMap::new();
    if hook.throttling.load(Ordering::SeqCst) {
        let mut budget = lock(&hook.budget);
        let (start, used) = budget.entry(route.clone()).or_insert((Instant::now(), 0));
        if start.elapsed() >= Duration::from_secs(1) {
            (*start, *used) = (Instant::now(), 0);
        }
        if *used + n > hook.capacity {
            drop(budget);
            *lock(&hook.refused).entry(route).or_default() += 1;
            reply.insert("retry-after", HeaderValue::from_static("0.1"));
            return (StatusCode::TOO_MANY_REQUESTS, reply);
        }
        *used += n;
    }
    let received_ms = crate::outputs::now_ms();
    lock(&hook.accepted)
        .entry(route)
        .or_default()
        .extend(outputs.into_iter().map(|output| Accepted { received_ms, output }));
    (StatusCode::OK, reply)
}
